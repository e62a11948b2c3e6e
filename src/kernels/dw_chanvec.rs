//! Depthwise convolution with vectors along channels — 16 on AVX-512, 8 on AVX2 — the
//! layout onnxruntime's NCHWc depthwise kernel computes in.
//!
//! The plane kernels ([`super::depthwise`], [`super::dw_flat`]) put output positions in
//! the vector lanes: a 7- or 14-wide row fills half a vector or needs masked loads, and
//! each output costs `kh·kw` separate FMAs over short runs. Here a task takes `L` channels
//! of one image (`L` the vector's lanes), transposes their input rows into a zero-padded
//! `[row][col][L]` grid (so padding, asymmetric included, and any map width cost nothing
//! in the inner loop), and computes `T` adjacent outputs of a row per tile: for each filter row, the row's `kw`
//! weight vectors stay in registers and each of the `(T − 1)·s + kw` input vectors under
//! the tile is loaded once and multiplied into every output that uses it. The results
//! (bias added in registers) are transposed back into the NCHW planes, where the
//! activation runs on whole rows. Per layer on an AMD EPYC (`examples/conv_paths.rs
//! depthwise5`), see [`applies`].

// The explicit-vector kernels are x86-64 only; elsewhere `applies` is false.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_variables, unused_macros, unused_imports)
)]

use super::act;
use super::conv_tiles::OutPtr;
use super::im2col::Geo;
use super::simd::Isa;
use crate::graph::ops::ActivationKind;

/// Channels per vector: 16 on AVX-512, 8 on AVX2 (the grid, the packed weights and the
/// output scratch are laid out in vectors of this many channels).
pub fn lanes() -> usize {
    match super::simd::isa() {
        Isa::Avx512 => 16,
        _ => 8,
    }
}

/// Whether this kernel takes depthwise conv `g` (the caller checked one filter per
/// channel): AVX-512 or AVX2, undilated, a square 3×3, 5×5 or 7×7 window, stride 1 or 2,
/// padding inside the window; not with the tile kernels off (A/B) or `LOPPER_DWCV=0`.
pub fn applies(g: &Geo) -> bool {
    cfg!(target_arch = "x86_64")
        && super::simd::isa() >= Isa::Avx2
        && super::conv_tiles::mode() != super::conv_tiles::TileMode::Off
        && !env_off()
        && g.dh == 1
        && g.dw == 1
        && g.kh == g.kw
        && matches!(g.kh, 3 | 5 | 7)
        && g.sh == g.sw
        && matches!(g.sh, 1 | 2)
        && g.pt < g.kh
        && g.pl < g.kw
        && g.p() > 0
        && g.ow <= max_width(g)
}

/// [`MAX_WIDTH`], but 14 for 5×5 and 7×7 windows at stride 2 on AVX2: there the grid holds
/// four input positions per output, each transposed for ~6 FMAs, and the 8-lane kernel
/// lost to the plane kernels at 28-wide rows (ms, `LOPPER_ISA=avx2 conv_paths
/// depthwise5`: batch 8, 144 channels at 56×56 0.81 against 0.68; 14-wide rows won, 240
/// channels at 28×28 0.37 against 0.43). On AVX-512 the two ran even at 28 (0.52 / 0.53).
fn max_width(g: &Geo) -> usize {
    if super::simd::isa() == Isa::Avx2 && g.sh == 2 && g.kh >= 5 {
        14
    } else {
        MAX_WIDTH
    }
}

/// Output rows wider than this stay on the plane kernels. Per layer on an AMD EPYC
/// (batch 8 unless noted, ms, this kernel against the plane kernels): 3×3 at 7×7 0.10
/// against 0.16, 14×14 0.15 / 0.22, 28×28 0.28 / 0.41, 8×8 batch 64 0.37 / 0.50, 4×4
/// 0.31 / 0.48; 5×5 at 7×7 0.17 / 0.33, 14×14 0.24 / 0.44, 28×28 0.43 / 0.66. At 32×32
/// (2.3 / 1.3 ms, 3×3 batch 64) and 112×112 (4.4 / 3.0) the sixteen input and output
/// planes a task streams side by side cost more than the lanes the plane kernels waste.
const MAX_WIDTH: usize = 28;

fn env_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::simd::env_off(&OFF, "LOPPER_DWCV")
}

/// Outputs per tile for rows `ow` wide: the width in 4..=8 that wastes the fewest lanes
/// of the last tile of a row (7 for 7-, 14- and 28-wide rows), the widest on ties.
fn tile_width(ow: usize) -> usize {
    (4..=8)
        .rev()
        .min_by_key(|&t| ow.div_ceil(t) * t - ow)
        .unwrap_or(8)
}

/// One call's shape: the grid and output-buffer geometry shared by every task.
struct Shape<'a> {
    g: &'a Geo,
    /// Grid columns: every input column a tile of the rounded row reads.
    cols: usize,
}

impl Shape<'_> {
    /// Grid rows for output rows `oy0..oy1`.
    fn rows(&self, oy0: usize, oy1: usize) -> usize {
        (oy1 - oy0 - 1) * self.g.sh + self.g.kh
    }
}

/// A thread's grid and output scratch.
#[derive(Default)]
struct Bufs {
    grid: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static BUFS: std::cell::RefCell<Bufs> = std::cell::RefCell::new(Bufs::default());
}

/// Floats of [`pack`]'s layout for `g` in vectors of `l` channels.
pub fn packed_len(g: &Geo, l: usize) -> usize {
    g.c.div_ceil(l) * g.kh * g.kw * l
}

/// Weights `[C, kh·kw]` as `[C/L][kh·kw][L]` (missing channels zero, `L` = [`lanes`]):
/// packed once by an eval plan ([`super::conv::PackedWeight`], which records `L`); per
/// call otherwise (at batch 1 on 4×4 maps the packing was a third of the layer).
pub fn pack(g: &Geo, w: &[f32]) -> Vec<f32> {
    let (k, l) = (g.kh * g.kw, lanes());
    let mut wp = vec![0f32; packed_len(g, l)];
    for c in 0..g.c {
        let (b, j) = (c / l, c % l);
        for t in 0..k {
            wp[(b * k + t) * l + j] = w[c * k + t];
        }
    }
    wp
}

/// `out [N, C, OH, OW] = depthwise(x, w) + bias`, then the activation, with the weights
/// `packed` by [`pack`] (at the current [`lanes`]) if given. `out` needs no
/// initialisation.
pub fn forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    packed: Option<&[f32]>,
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
) {
    assert!(applies(g));
    let l = lanes();
    let (hw, p) = (g.h * g.w, g.p());
    assert!(x.len() >= g.n * g.c * hw && out.len() >= g.n * g.c * p);
    let own;
    let wp = match packed {
        Some(v) => v,
        None => {
            own = pack(g, w);
            &own[..]
        }
    };
    assert_eq!(
        wp.len(),
        packed_len(g, l),
        "depthwise packed weights for another shape"
    );
    let bias = epi.map(|e| e.0);
    assert!(bias.is_none_or(|b| b.len() >= g.c));
    let t = tile_width(g.ow);
    let owt = g.ow.div_ceil(t) * t;
    let shape = Shape {
        g,
        cols: (owt - 1) * g.sw + g.kw,
    };
    let nb = g.c.div_ceil(l);
    // Tasks: (image, channel block, run of output rows); rows split until there are
    // ~4 tasks per thread (batch 1 with few channels), each at least 2 rows.
    let threads = rayon::current_num_threads().max(1);
    let splits = (4 * threads)
        .div_ceil(g.n * nb)
        .min(g.oh.div_ceil(2))
        .max(1);
    // A task's grid and output rows stay in L2 (~160 KB): 112×112 maps in one task ran
    // 1.5× slower than the plane kernels, from memory.
    let row_bytes = (g.sh + 1) * shape.cols * l * 4;
    let per = g.oh.div_ceil(splits).min((160 << 10) / row_bytes).max(1);
    let splits = g.oh.div_ceil(per);
    let outp = OutPtr(out.as_mut_ptr());
    let act = epi.and_then(|e| e.1);
    let shape = &shape;
    super::par::for_each(g.n * nb * splits, move |task| {
        let (n, b, s) = (task / (nb * splits), task / splits % nb, task % splits);
        let (oy0, oy1) = (s * per, ((s + 1) * per).min(g.oh));
        let (c0, cn) = (b * l, l.min(g.c - b * l));
        BUFS.with(|bufs| {
            let Bufs { grid, acc } = &mut *bufs.borrow_mut();
            let xs = &x[(n * g.c + c0) * hw..];
            fill_grid(shape, l, xs, cn, oy0, oy1, grid);
            let rows = oy1 - oy0;
            acc.resize(rows * owt * l, 0.0);
            let k = g.kh * g.kw;
            // The block's bias, zero in missing channels: one vector load per task.
            let mut bv = [0f32; 16];
            if let Some(b) = bias {
                bv[..cn].copy_from_slice(&b[c0..c0 + cn]);
            }
            let tile = Tile {
                grid: grid.as_ptr(),
                cols: shape.cols,
                w: wp[b * k * l..].as_ptr(),
                bias: bv.as_ptr(),
                acc: acc.as_mut_ptr(),
            };
            // SAFETY: the grid holds rows(oy0, oy1) rows of `cols` l-channel columns,
            // which covers every tap of every tile of the rounded rows; acc holds
            // rows × owt outputs; weights k vectors from the block's, the bias l values;
            // the ISA is the one `lanes` chose.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                run(l, g.kh, g.sh, t, &tile, rows, owt)
            };
            // The activation over the task's outputs while they are in L1, in one pass
            // (per output plane, a 4×4 map's 16 values were a call each).
            if let Some(a) = act {
                act::apply(a, acc);
            }
            // Back into the NCHW planes: channels c0.., rows oy0..oy1 of image n, owned
            // by this task.
            let base = (n * g.c + c0) * p + oy0 * g.ow;
            let dst = outp.get().wrapping_add(base);
            // SAFETY: the ISA of `l`; acc holds rows × owt outputs; the cn planes' rows
            // oy0..oy1 are this task's.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if l == 16 {
                    from_acc_zmm(acc.as_ptr(), rows, owt, g.ow, dst, p, cn)
                } else {
                    from_acc_ymm(acc.as_ptr(), rows, owt, g.ow, dst, p, cn)
                }
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = dst;
        })
    });
}

/// Transposes input rows of channels `cn` (planes `h·w` apart in `xs`) under output rows
/// `oy0..oy1` into `grid` (`[row][col][l]`), zero outside the input and in missing
/// channels.
fn fill_grid(
    s: &Shape,
    l: usize,
    xs: &[f32],
    cn: usize,
    oy0: usize,
    oy1: usize,
    grid: &mut Vec<f32>,
) {
    let g = s.g;
    let rows = s.rows(oy0, oy1);
    let line = s.cols * l;
    grid.clear();
    grid.resize(rows * line, 0.0);
    // The input rows inside the plane, as one run of flattened positions.
    let r0 = g.pt.saturating_sub(oy0 * g.sh);
    let iy0 = (oy0 * g.sh + r0) - g.pt;
    let iy1 = (oy0 * g.sh + rows).saturating_sub(g.pt).min(g.h);
    if iy0 >= iy1 {
        return;
    }
    let hw = g.h * g.w;
    assert!(xs.len() >= (cn - 1) * hw + iy1 * g.w);
    let wn = g.w.min(s.cols - g.pl);
    let src = xs[iy0 * g.w..].as_ptr();
    let dst = grid[(r0 * s.cols + g.pl) * l..].as_mut_ptr();
    let len = (iy1 - iy0) * g.w;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the ISA of `l`; the source run lies inside each of the cn planes
    // (asserted), and each position's column is stored only if it lies in the grid row.
    unsafe {
        if l == 16 {
            to_grid_zmm(src, hw, cn, len, g.w, wn, dst, s.cols)
        } else {
            to_grid_ymm(src, hw, cn, len, g.w, wn, dst, s.cols)
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (src, dst, len, wn);
}

/// Defines the two transposes of one register type: `$to_grid` takes positions `0..len`
/// of `cn ≤ L` planes (`sl` apart from `src`, rows `w` wide) into a grid of rows `cols`
/// positions wide from `dst` (columns `wn` and beyond of a row dropped), `L` positions at
/// a time loaded from the `L` planes, transposed in registers, stored as `L`-channel
/// vectors; `$from_acc` takes output rows `rows` (`[row][owt][L]` in `acc`, the first
/// `ow` of each row valid) into `cn` planes from `dst` (`p` apart; the rows' `rows · ow`
/// positions contiguous) the same way back. `$load(ptr, n)` / `$store(ptr, n, v)` move
/// the first `n` lanes.
macro_rules! transposes {
    ($to_grid:ident, $from_acc:ident, $features:literal, $lanes:literal, $zero:ident,
     $loadu:ident, $storeu:ident, $load:path, $store:path, $transpose:path) => {
        /// # Safety
        /// The CPU has these features; `src` readable for `len` floats in each of
        /// `cn ≤ L` planes; `dst` writable for `len / w` rows of `wn` vectors, `cols · L`
        /// floats apart.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $to_grid(
            src: *const f32,
            sl: usize,
            cn: usize,
            len: usize,
            w: usize,
            wn: usize,
            dst: *mut f32,
            cols: usize,
        ) {
            use std::arch::x86_64::*;
            const L: usize = $lanes;
            let (mut q0, mut y, mut x) = (0, 0, 0);
            while q0 < len {
                let n = (len - q0).min(L);
                let mut r = [$zero(); L];
                for (c, v) in r.iter_mut().enumerate().take(cn) {
                    // SAFETY: positions q0..q0 + n of plane c; the prefetch (a hint, never
                    // a fault) 64 floats ahead in the same plane: L planes read side by
                    // side are more streams than the hardware prefetcher follows.
                    unsafe {
                        *v = $load(src.add(c * sl + q0), n);
                        _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add(c * sl + q0 + 64) as *const i8);
                    }
                }
                let t = $transpose(r);
                for v in t.iter().take(n) {
                    if x < wn {
                        // SAFETY: row y, column x of the grid.
                        unsafe { $storeu(dst.add((y * cols + x) * L), *v) };
                    }
                    x += 1;
                    if x == w {
                        (y, x) = (y + 1, 0);
                    }
                }
                q0 += n;
            }
        }

        /// # Safety
        /// The CPU has these features; `acc` readable as described; `dst` writable for
        /// `rows · ow` floats in each of `cn ≤ L` planes.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $from_acc(
            acc: *const f32,
            rows: usize,
            owt: usize,
            ow: usize,
            dst: *mut f32,
            p: usize,
            cn: usize,
        ) {
            use std::arch::x86_64::*;
            const L: usize = $lanes;
            let len = rows * ow;
            let (mut q0, mut y, mut x) = (0, 0, 0);
            while q0 < len {
                let n = (len - q0).min(L);
                let mut r = [$zero(); L];
                for v in r.iter_mut().take(n) {
                    // SAFETY: output (y, x), inside the rows.
                    *v = unsafe { $loadu(acc.add((y * owt + x) * L)) };
                    x += 1;
                    if x == ow {
                        (y, x) = (y + 1, 0);
                    }
                }
                let t = $transpose(r);
                for (c, v) in t.iter().enumerate().take(cn) {
                    // SAFETY: positions q0..q0 + n of plane c.
                    unsafe { $store(dst.add(c * p + q0), n, *v) };
                }
                q0 += n;
            }
        }
    };
}

/// The first `n ≤ 16` lanes at `p` (zeros in the others).
///
/// # Safety
/// AVX-512F; `p..p + n` readable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_first16(p: *const f32, n: usize) -> std::arch::x86_64::__m512 {
    // SAFETY: the caller's contract.
    unsafe { super::simd::load16(p, if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }) }
}

/// The first `n ≤ 16` lanes of `v` to `p`.
///
/// # Safety
/// AVX-512F; `p..p + n` writable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_first16(p: *mut f32, n: usize, v: std::arch::x86_64::__m512) {
    // SAFETY: the caller's contract.
    unsafe { super::simd::store16(p, if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }, v) }
}

transposes!(
    to_grid_zmm,
    from_acc_zmm,
    "avx512f",
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    load_first16,
    store_first16,
    super::cpu::transpose16
);
transposes!(
    to_grid_ymm,
    from_acc_ymm,
    "avx2,fma",
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    super::simd::load8,
    super::simd::store8,
    super::cpu::transpose8
);

/// A task's operands: the grid (`cols` channel vectors per row), the block's packed
/// weights and bias (a full vector, zero in missing channels), and the output scratch
/// (`[row][owt][L]`).
struct Tile {
    grid: *const f32,
    cols: usize,
    w: *const f32,
    bias: *const f32,
    acc: *mut f32,
}

/// Defines the tile kernel over one register type: output rows `0..rows` (grid rows `S`
/// apart) in tiles of `T` outputs, filter `K×K`, `$lanes` channels a vector.
macro_rules! rows_kst {
    ($(#[$m:meta])* $name:ident, $features:literal, $lanes:literal, $zero:ident, $loadu:ident,
     $storeu:ident, $fmadd:ident) => {
        $(#[$m])*
        /// # Safety
        /// The CPU has these features; the operands as [`Tile`] describes, in bounds for
        /// `rows` rows of `owt`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn $name<const K: usize, const S: usize, const T: usize>(
            k: &Tile,
            rows: usize,
            owt: usize,
        ) {
            use std::arch::x86_64::*;
            const L: usize = $lanes;
            unsafe {
                let bias = $loadu(k.bias);
                let line = k.cols * L;
                for r in 0..rows {
                    for ox in (0..owt).step_by(T) {
                        let mut acc = [bias; T];
                        for ky in 0..K {
                            let mut wv = [$zero(); K];
                            for kx in 0..K {
                                wv[kx] = $loadu(k.w.add((ky * K + kx) * L));
                            }
                            let src = k.grid.add((r * S + ky) * line + ox * S * L);
                            // Input column j serves output t under tap kx = j − t·S.
                            for j in 0..(T - 1) * S + K {
                                let xv = $loadu(src.add(j * L));
                                for t in 0..T {
                                    if j >= t * S && j - t * S < K {
                                        acc[t] = $fmadd(xv, wv[j - t * S], acc[t]);
                                    }
                                }
                            }
                        }
                        let dst = k.acc.add((r * owt + ox) * L);
                        for t in 0..T {
                            $storeu(dst.add(t * L), acc[t]);
                        }
                    }
                }
            }
        }
    };
}

rows_kst!(
    /// 16-channel (AVX-512) tiles.
    rows_zmm, "avx512f", 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps,
    _mm512_fmadd_ps
);
rows_kst!(
    /// 8-channel (AVX2) tiles.
    rows_ymm, "avx2,fma", 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps,
    _mm256_fmadd_ps
);

/// Calls the tile kernel for the lanes, run-time window, stride and tile width.
///
/// # Safety
/// As the tile kernels; `l` is 16 (AVX-512) or 8 (AVX2), `k` in 3, 5, 7, `s` in 1, 2, `t`
/// in 4..=8.
#[cfg(target_arch = "x86_64")]
unsafe fn run(l: usize, kk: usize, s: usize, t: usize, k: &Tile, rows: usize, owt: usize) {
    macro_rules! table {
        ($($a:literal, $b:literal, $c:literal);*) => {
            match (l == 16, kk, s, t) {
                // SAFETY: the caller's contract.
                $((true, $a, $b, $c) => unsafe { rows_zmm::<$a, $b, $c>(k, rows, owt) },
                  (false, $a, $b, $c) => unsafe { rows_ymm::<$a, $b, $c>(k, rows, owt) },)*
                other => unreachable!("depthwise tile {other:?} outside the dispatch table"),
            }
        };
    }
    table!(3,1,4; 3,1,5; 3,1,6; 3,1,7; 3,1,8; 3,2,4; 3,2,5; 3,2,6; 3,2,7; 3,2,8;
           5,1,4; 5,1,5; 5,1,6; 5,1,7; 5,1,8; 5,2,4; 5,2,5; 5,2,6; 5,2,7; 5,2,8;
           7,1,4; 7,1,5; 7,1,6; 7,1,7; 7,1,8; 7,2,4; 7,2,5; 7,2,6; 7,2,7; 7,2,8)
}
