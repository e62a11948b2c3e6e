//! 3×3 depthwise convolution on wide maps at stride 1 and 2, read from the input rows
//! where they lie (AVX-512).
//!
//! The plane kernels ([`super::planes`]) first copy each input plane into a padded buffer
//! (split into stride phases), then take each output vector as nine broadcast weights
//! times nine unaligned loads. At stride 2 the copy took more time than the multiply-adds
//! (96 channels of 112×112 at batch 1: 0.12 of 0.22 ms on an AMD EPYC, one thread); at
//! stride 1 the nine loads per output vector ran the layer at a third of the FMA rate
//! (32 channels of 112×112: 0.13 ms, onnxruntime 0.07).
//!
//! Here an input row is loaded once for every output row that reads it, their
//! accumulators live together:
//! - **stride 2**: sixteen outputs of one input row take two loads; a two-source permute
//!   gives the even columns (tap 0 at padding 1), one the odd columns (tap 1), and the
//!   even columns shifted by one (tap 2) come from `valignd` with the next value. Two
//!   output rows (five input rows) at a time, up to four vectors of a row.
//! - **stride 1**: each tap column is one (unaligned) load of the input row, used by up to
//!   three of the four output rows in flight: 4.5 loads per output vector instead of 9.
//!
//! Zero padding is masked-off lanes of the loads (at most one padded column on the left,
//! any on the right; rows outside the map are skipped). The rows a block will read next
//! are prefetched (at batch 8 the planes come from memory: one thread waited on them).
//! Narrower maps (output rows ≤ 28) stay on the channel-vector kernel
//! ([`super::dw_chanvec`]).

// The explicit-vector kernels are x86-64 only; elsewhere the callers never take this path.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_variables, unused_imports)
)]

use super::im2col::Geo;
use super::planes::clamp_split;
use super::simd::Isa;
use crate::graph::ops::ActivationKind;

/// Whether a depthwise conv runs here: AVX-512, 3×3, stride 1 or 2 (the same both ways),
/// no dilation, at most one padded row/column above and on the left, output rows wider
/// than the channel-vector kernel takes.
pub fn applies(g: &Geo) -> bool {
    cfg!(target_arch = "x86_64")
        && super::simd::isa() == Isa::Avx512
        && super::conv_tiles::mode() != super::conv_tiles::TileMode::Off
        && !env_off()
        && g.kh == 3
        && g.kw == 3
        && g.sh == g.sw
        && matches!(g.sh, 1 | 2)
        && g.dh == 1
        && g.dw == 1
        && g.pt <= 1
        && g.pl <= 1
        && g.ow > 28
        && g.oh > 0
}

/// `LOPPER_DW_WIDE=0` keeps these layers on the plane kernels (A/B runs); read once.
fn env_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::simd::env_off(&OFF, "LOPPER_DW_WIDE")
}

/// Forward of every `(image, channel)` plane (`x: [N, C, H, W]`, `w: [C, 1, 3, 3]`) into
/// `out`, with each channel's bias and the activation (`epi`), every element written.
pub fn forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
) {
    assert!(applies(g), "dw_wide: geometry {g:?} not handled");
    let (hw, p) = (g.h * g.w, g.p());
    let planes = out.len() / p;
    assert!(x.len() >= planes * hw && w.len() >= g.c * 9 && out.len() == planes * p);
    let ((lo, hi), rest) = clamp_split(epi.and_then(|e| e.1));
    // ~8 tasks per thread balance the load; a task is at least one plane.
    let tasks = (rayon::current_num_threads() * 8).max(1);
    let per = planes.div_ceil(tasks).max(1);
    super::par::chunks_mut(out, p * per, |ti, o| {
        for (i, op) in o.chunks_exact_mut(p).enumerate() {
            let nc = ti * per + i;
            let c = nc % g.c;
            let bias = epi.map_or(0.0, |e| e.0[c]);
            let k = Plane {
                x: &x[nc * hw..(nc + 1) * hw],
                w: w[c * 9..c * 9 + 9].try_into().expect("nine taps"),
                bias,
                lo,
                hi,
            };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked AVX-512; the plane and output sizes are asserted
            // in `plane`.
            unsafe {
                plane(g, &k, op)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = k;
            if rest.is_some() {
                super::act::bias_act(op, 0.0, None, rest);
            }
        }
    });
}

/// One plane's operands.
struct Plane<'a> {
    /// The input plane, `H·W`.
    x: &'a [f32],
    w: [f32; 9],
    bias: f32,
    /// The clamp applied at the store (ReLU, ReLU6 or none).
    lo: f32,
    hi: f32,
}

/// One output plane `o` (`OH·OW`).
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane(g: &Geo, k: &Plane, o: &mut [f32]) {
    assert!(k.x.len() >= g.h * g.w && o.len() >= g.oh * g.ow);
    // SAFETY (both): AVX-512F; the sizes just asserted.
    unsafe {
        if g.sh == 2 {
            plane_s2(g, k, o)
        } else {
            plane_s1(g, k, o)
        }
    }
}

/// [`plane`] at stride 2: two output rows at a time.
///
/// # Safety
/// As [`plane`], sizes checked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane_s2(g: &Geo, k: &Plane, o: &mut [f32]) {
    let vecs = g.ow.div_ceil(16);
    let mut oy = 0;
    while oy < g.oh {
        let two = oy + 1 < g.oh;
        // The rows two pairs ahead, into L1: at batch 8 (planes from memory) one thread
        // waited on them (4.8 against 3.4 ms for the plane kernels' streaming copy; 2.1
        // with this).
        prefetch_rows(g, k, 2 * oy + 6, 2);
        let mut v0 = 0;
        while v0 < vecs {
            let nb = (vecs - v0).min(4);
            // SAFETY: AVX-512F; `block_s2` bounds every access by the plane and output
            // sizes.
            unsafe {
                match (nb, two) {
                    (4, true) => block_s2::<4, true>(g, k, oy, v0, o),
                    (3, true) => block_s2::<3, true>(g, k, oy, v0, o),
                    (2, true) => block_s2::<2, true>(g, k, oy, v0, o),
                    (_, true) => block_s2::<1, true>(g, k, oy, v0, o),
                    (4, false) => block_s2::<4, false>(g, k, oy, v0, o),
                    (3, false) => block_s2::<3, false>(g, k, oy, v0, o),
                    (2, false) => block_s2::<2, false>(g, k, oy, v0, o),
                    (_, false) => block_s2::<1, false>(g, k, oy, v0, o),
                }
            }
            v0 += nb;
        }
        oy += 2;
    }
}

/// [`plane`] at stride 1: four output rows at a time, two vectors of them per block.
///
/// # Safety
/// As [`plane`], sizes checked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn plane_s1(g: &Geo, k: &Plane, o: &mut [f32]) {
    let vecs = g.ow.div_ceil(16);
    let mut oy = 0;
    while oy < g.oh {
        let rows = (g.oh - oy).min(4);
        // The next group's new input rows.
        prefetch_rows(g, k, oy + 6, 4);
        let mut v0 = 0;
        while v0 < vecs {
            let nb = (vecs - v0).min(2);
            // SAFETY: AVX-512F; `block_s1` bounds every access by the plane and output
            // sizes.
            unsafe {
                match (nb, rows) {
                    (2, 4) => block_s1::<2, 4>(g, k, oy, v0, o),
                    (2, 3) => block_s1::<2, 3>(g, k, oy, v0, o),
                    (2, 2) => block_s1::<2, 2>(g, k, oy, v0, o),
                    (2, _) => block_s1::<2, 1>(g, k, oy, v0, o),
                    (_, 4) => block_s1::<1, 4>(g, k, oy, v0, o),
                    (_, 3) => block_s1::<1, 3>(g, k, oy, v0, o),
                    (_, 2) => block_s1::<1, 2>(g, k, oy, v0, o),
                    (_, _) => block_s1::<1, 1>(g, k, oy, v0, o),
                }
            }
            v0 += nb;
        }
        oy += rows;
    }
}

/// Prefetches `count` input rows from padded row `from` (those inside the map).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_rows(g: &Geo, k: &Plane, from: usize, count: usize) {
    for r in from..from + count {
        let iy = r as isize - g.pt as isize;
        if iy >= 0 && (iy as usize) < g.h {
            prefetch_row(&k.x[iy as usize * g.w..][..g.w]);
        }
    }
}

/// The lanes of a 16-float load from column `from` of a row of `w` that lie in the row.
#[inline(always)]
fn row_lanes(from: isize, w: isize) -> u16 {
    let lo = (-from).clamp(0, 16);
    let hi = (w - from).clamp(0, 16);
    if hi <= lo {
        0
    } else {
        (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16
    }
}

/// Stores accumulator `acc` clamped to `[lo, hi]` at output column `col` of row `oy`
/// (the lanes inside the row).
///
/// # Safety
/// AVX-512F; `oy < OH`, `col < OW`, `o` holds `OH·OW`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_out(
    o: &mut [f32],
    ow: usize,
    oy: usize,
    col: usize,
    acc: std::arch::x86_64::__m512,
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) {
    use std::arch::x86_64::*;
    let n = (ow - col).min(16);
    // SAFETY: the caller's bounds; lanes past the row are masked.
    unsafe {
        // Bound first, value second: a NaN passes through.
        let y = _mm512_min_ps(hi, _mm512_max_ps(lo, acc));
        super::simd::store16(
            o.as_mut_ptr().add(oy * ow + col),
            ((1u32 << n) - 1) as u16,
            y,
        );
    }
}

/// Output vectors `v0..v0 + NB` of output rows `oy..oy + R` at stride 1.
///
/// # Safety
/// AVX-512F; `oy + R ≤ OH`, `v0 + NB ≤ ⌈OW / 16⌉`, the plane `H·W` and the output
/// `OH·OW` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn block_s1<const NB: usize, const R: usize>(
    g: &Geo,
    k: &Plane,
    oy: usize,
    v0: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let w_in = g.w as isize;
    // Each vector's first input column (tap 0) and the lanes of the three tap loads that
    // lie inside the row.
    let mut base = [0isize; NB];
    let mut m = [[0u16; 3]; NB];
    for v in 0..NB {
        base[v] = 16 * (v0 + v) as isize - g.pl as isize;
        for kx in 0..3 {
            m[v][kx] = row_lanes(base[v] + kx as isize, w_in);
        }
    }
    // SAFETY (whole body): every load is masked to the lanes inside its input row (the
    // addresses of masked-off lanes are formed with `wrapping_offset`, never read); the
    // stores are masked to the output row.
    unsafe {
        let wv: [__m512; 9] = std::array::from_fn(|t| _mm512_set1_ps(k.w[t]));
        let bias = _mm512_set1_ps(k.bias);
        let mut acc = [[bias; NB]; R];
        // Input rows oy − pt + r, r < R + 2: row r is tap row r − j of output row oy + j.
        for r in 0..R + 2 {
            let iy = (oy + r) as isize - g.pt as isize;
            if iy < 0 || iy >= g.h as isize {
                continue;
            }
            let row = k.x.as_ptr().add(iy as usize * g.w);
            for v in 0..NB {
                let p = row.wrapping_offset(base[v]);
                let x: [__m512; 3] =
                    std::array::from_fn(|kx| super::simd::load16(p.wrapping_add(kx), m[v][kx]));
                for j in 0..R {
                    if r >= j && r - j < 3 {
                        let t = 3 * (r - j);
                        acc[j][v] = _mm512_fmadd_ps(wv[t], x[0], acc[j][v]);
                        acc[j][v] = _mm512_fmadd_ps(wv[t + 1], x[1], acc[j][v]);
                        acc[j][v] = _mm512_fmadd_ps(wv[t + 2], x[2], acc[j][v]);
                    }
                }
            }
        }
        let (lo, hi) = (_mm512_set1_ps(k.lo), _mm512_set1_ps(k.hi));
        for j in 0..R {
            for v in 0..NB {
                store_out(o, g.ow, oy + j, 16 * (v0 + v), acc[j][v], lo, hi);
            }
        }
    }
}

/// Asks for `row` in L1, line by line.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_row(row: &[f32]) {
    for j in (0..row.len()).step_by(16) {
        super::simd::prefetch(row, j);
    }
}

/// Output vectors `v0..v0 + NB` of output row `oy` (and of `oy + 1` with `TWO`) at
/// stride 2.
///
/// # Safety
/// AVX-512F; `oy (+ 1) < OH`, `v0 + NB ≤ ⌈OW / 16⌉`, the plane `H·W` and the output
/// `OH·OW` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn block_s2<const NB: usize, const TWO: bool>(
    g: &Geo,
    k: &Plane,
    oy: usize,
    v0: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (w_in, ow) = (g.w as isize, g.ow);
    // Each vector's first input column (tap 0) and the lanes of its two loads and of the
    // value after them that lie inside the row.
    let mut base = [0isize; NB];
    let mut m = [(0u16, 0u16, false); NB];
    for v in 0..NB {
        let b = 32 * (v0 + v) as isize - g.pl as isize;
        base[v] = b;
        m[v] = (
            row_lanes(b, w_in),
            row_lanes(b + 16, w_in),
            b + 32 >= 0 && b + 32 < w_in,
        );
    }
    // SAFETY (whole body): every load is masked to the lanes inside its input row (the
    // addresses of masked-off lanes are formed with `wrapping_offset`, never read); the
    // stores are masked to the output row.
    unsafe {
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let wv: [__m512; 9] = std::array::from_fn(|t| _mm512_set1_ps(k.w[t]));
        let bias = _mm512_set1_ps(k.bias);
        let mut a = [bias; NB];
        let mut b = [bias; NB];
        // Input rows 2·oy − pt + r, r < 5: row r is tap row r of output row oy (r < 3)
        // and tap row r − 2 of output row oy + 1 (r ≥ 2).
        let rows = if TWO { 5 } else { 3 };
        for r in 0..rows {
            let iy = (2 * oy + r) as isize - g.pt as isize;
            if iy < 0 || iy >= g.h as isize {
                continue;
            }
            let row = k.x.as_ptr().add(iy as usize * g.w);
            for v in 0..NB {
                let (m0, m1, last) = m[v];
                let p = row.wrapping_offset(base[v]);
                let x0 = _mm512_maskz_loadu_ps(m0, p);
                let x1 = _mm512_maskz_loadu_ps(m1, p.wrapping_add(16));
                let e = _mm512_permutex2var_ps(x0, evens, x1);
                let od = _mm512_permutex2var_ps(x0, odds, x1);
                let next = if last {
                    _mm512_set1_ps(*p.wrapping_add(32))
                } else {
                    _mm512_setzero_ps()
                };
                let e2 = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                    _mm512_castps_si512(next),
                    _mm512_castps_si512(e),
                ));
                if r < 3 {
                    let t = 3 * r;
                    a[v] = _mm512_fmadd_ps(wv[t], e, a[v]);
                    a[v] = _mm512_fmadd_ps(wv[t + 1], od, a[v]);
                    a[v] = _mm512_fmadd_ps(wv[t + 2], e2, a[v]);
                }
                if TWO && r >= 2 {
                    let t = 3 * (r - 2);
                    b[v] = _mm512_fmadd_ps(wv[t], e, b[v]);
                    b[v] = _mm512_fmadd_ps(wv[t + 1], od, b[v]);
                    b[v] = _mm512_fmadd_ps(wv[t + 2], e2, b[v]);
                }
            }
        }
        let (lo, hi) = (_mm512_set1_ps(k.lo), _mm512_set1_ps(k.hi));
        for v in 0..NB {
            let col = 16 * (v0 + v);
            store_out(o, ow, oy, col, a[v], lo, hi);
            if TWO {
                store_out(o, ow, oy + 1, col, b[v], lo, hi);
            }
        }
    }
}
