//! Direct depthwise convolution (one filter per channel): forward, input and weight
//! gradients. Parallel over (image, channel) planes or, for the weight gradient, channels.
//!
//! The forward copies each plane once into a zero-padded buffer split into stride phases
//! (for stride s, padded columns q, q + s, q + 2s, … side by side), so that every filter
//! tap reads one contiguous run at any stride and padding, including asymmetric padding;
//! an output row then is one scaled row addition per tap into a row buffer rounded up to
//! whole vectors (no remainder loops, no bounds tests), finished by the epilogue (bias and
//! activation) while in cache. The gradients work row by row with each tap's valid output
//! range worked out once. All loops vectorise for AVX-512, AVX2 or portable code (see
//! [`super::simd`]).

use super::act;
use super::im2col::Geo;
use super::simd::{multiversion, Isa};
use crate::graph::ops::ActivationKind;
use rayon::prelude::*;

/// The output columns `[lo, hi)` whose input column `ox·s + off` lies in `[0, len)`.
#[inline(always)]
fn span(off: isize, s: usize, len: usize, out: usize) -> (usize, usize) {
    let lo = if off < 0 {
        ((-off) as usize).div_ceil(s)
    } else {
        0
    };
    let last = len as isize - 1 - off;
    let hi = if last < 0 {
        0
    } else {
        (last as usize / s + 1).min(out)
    };
    (lo, hi.max(lo))
}

/// The input row of output row `oy` and tap row `ky`, if inside.
#[inline(always)]
fn in_row(g: &Geo, oy: usize, ky: usize) -> Option<usize> {
    let iy = (oy * g.sh + ky * g.dh) as isize - g.pt as isize;
    (iy >= 0 && (iy as usize) < g.h).then_some(iy as usize)
}

/// Column offset of tap `kx` (input column = `ox·sw + off`).
#[inline(always)]
fn col_off(g: &Geo, kx: usize) -> isize {
    (kx * g.dw) as isize - g.pl as isize
}

multiversion! {
    /// One plane, any geometry (dilated filters): `o[oy, ox] = Σ_taps w[ky, kx]·x[iy, ix]`.
    fn plane_fwd_any(g: &Geo, x: &[f32], w: &[f32], o: &mut [f32]) {
        o.fill(0.0);
        for oy in 0..g.oh {
            let orow = &mut o[oy * g.ow..(oy + 1) * g.ow];
            for ky in 0..g.kh {
                let Some(iy) = in_row(g, oy, ky) else { continue };
                let xrow = &x[iy * g.w..(iy + 1) * g.w];
                for kx in 0..g.kw {
                    let wv = w[ky * g.kw + kx];
                    let off = col_off(g, kx);
                    let (lo, hi) = span(off, g.sw, g.w, g.ow);
                    let start = (lo as isize * g.sw as isize + off) as usize;
                    for (j, a) in orow[lo..hi].iter_mut().enumerate() {
                        *a += wv * xrow[start + j * g.sw];
                    }
                }
            }
        }
    }
}

/// Padded rows are laid out for output rows rounded up to this many columns (one
/// AVX-512 register), so a tile's vector loads never leave the buffer.
const BLOCK: usize = 16;

/// The padded plane's phase layout: padded column `c` of padded row `r` is at
/// `r·row + (c mod s)·phase + c / s`, so a tap reads a contiguous run at any stride.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Phases {
    rows: usize,
    row: usize,
    phase: usize,
}

impl Phases {
    fn new(g: &Geo) -> Phases {
        let ow = g.ow.div_ceil(BLOCK) * BLOCK;
        // Columns a (rounded-up) output row can touch, and rows the output can touch.
        let cols = (ow - 1) * g.sw + g.kw;
        let phase = cols.div_ceil(g.sw);
        let rows = (g.oh - 1) * g.sh + g.kh;
        Phases {
            rows,
            row: phase * g.sw,
            phase,
        }
    }

    fn len(&self) -> usize {
        self.rows * self.row
    }
}

/// A thread's padded-plane buffer and the geometry its zero border was written for: every
/// plane of one geometry writes the same interior cells, so the border is zeroed once per
/// geometry, not once per plane (the fill was as costly as the copy).
struct Padded {
    buf: Vec<f32>,
    key: Option<(Phases, [usize; 5])>,
}

thread_local! {
    static PADDED: std::cell::RefCell<Padded> =
        const { std::cell::RefCell::new(Padded { buf: Vec::new(), key: None }) };
}

multiversion! {
/// Copies plane `x` into the interior of `buf` (whose border is already zero), split into
/// stride phases. (This is where the input plane comes in from memory.)
fn pad_phases(g: &Geo, ph: &Phases, x: &[f32], buf: &mut [f32]) {
    for r in 0..ph.rows {
        let Some(iy) = r.checked_sub(g.pt).filter(|&y| y < g.h) else {
            continue;
        };
        let src = &x[iy * g.w..(iy + 1) * g.w];
        let dst = &mut buf[r * ph.row..(r + 1) * ph.row];
        for q in 0..g.sw {
            // Phase q holds padded columns q, q + s, …: input column t·s + q − pl.
            let (lo, hi) = span(q as isize - g.pl as isize, g.sw, g.w, ph.phase);
            let d = &mut dst[q * ph.phase..(q + 1) * ph.phase];
            let first = (lo * g.sw + q) - g.pl;
            if g.sw == 1 {
                super::cpu::copy_row(&mut d[lo..hi], &src[first..first + (hi - lo)]);
            } else {
                for (j, v) in d[lo..hi].iter_mut().enumerate() {
                    *v = src[first + j * g.sw];
                }
            }
        }
    }
}
}

/// One plane's work for the explicit-vector tiles: the padded input, the channel's
/// weights and tap offsets, the output and its epilogue (`bias` added at the start, the
/// result clamped to `[lo, hi]`, which is ReLU, ReLU6 or nothing).
struct Plane<'a> {
    xp: &'a [f32],
    w: &'a [f32],
    taps: &'a [usize],
    oh: usize,
    ow: usize,
    /// Padded-buffer distance between consecutive output rows (`sh` padded rows).
    step: usize,
    bias: f32,
    lo: f32,
    hi: f32,
}

/// Defines an explicit-vector depthwise tile kernel over one register type: `T`
/// accumulators, each one output vector of `lanes` columns, take every tap as a broadcast
/// weight times an unaligned load (one FMA each), then get bias and clamp and are stored.
/// (Written with intrinsics: the compiler turned the portable form into gathers and
/// separate multiplies and adds.)
macro_rules! dw_tiles {
    ($(#[$m:meta])* $name:ident, $features:literal, $lanes:literal, $vec:ty,
     $set1:ident, $loadu:ident, $storeu:ident, $fmadd:ident, $max:ident, $min:ident) => {
        $(#[$m])*
        /// # Safety
        /// The CPU has these features; every load stays inside `p.xp` (checked by the
        /// caller: last vector's base + largest tap + lanes ≤ len); `o` holds `oh·ow`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: usize>(p: &Plane, o: &mut [f32]) {
            use std::arch::x86_64::*;
            let per_row = p.ow.div_ceil($lanes);
            let last = p.oh * per_row - 1;
            let (bias, lo, hi) = ($set1(p.bias), $set1(p.lo), $set1(p.hi));
            let (mut k, mut oy, mut j) = (0, 0, 0);
            loop {
                // The group's vectors: (input base, output offset, valid columns); past
                // the last vector the slots repeat it.
                let mut at = [(0usize, 0usize, 0usize); T];
                let mut end = false;
                for slot in at.iter_mut() {
                    *slot = (oy * p.step + j * $lanes, oy * p.ow + j * $lanes, (p.ow - j * $lanes).min($lanes));
                    if k < last {
                        k += 1;
                        j += 1;
                        if j == per_row {
                            j = 0;
                            oy += 1;
                        }
                    } else {
                        end = true;
                    }
                }
                let mut acc: [$vec; T] = [bias; T];
                let x = p.xp.as_ptr();
                for (&tap, &wv) in p.taps.iter().zip(p.w) {
                    let wv = $set1(wv);
                    for t in 0..T {
                        // SAFETY: the caller's bound.
                        let v = unsafe { $loadu(x.add(at[t].0 + tap)) };
                        acc[t] = $fmadd(wv, v, acc[t]);
                    }
                }
                for t in 0..T {
                    // Bound first, value second: a NaN passes through (max/min return the second).
                    let y = $min(hi, $max(lo, acc[t]));
                    let (off, n) = (at[t].1, at[t].2);
                    if n == $lanes {
                        // SAFETY: off + lanes ≤ oh·ow = o.len().
                        unsafe { $storeu(o.as_mut_ptr().add(off), y) };
                    } else {
                        let mut tmp = [0f32; $lanes];
                        // SAFETY: tmp holds one vector.
                        unsafe { $storeu(tmp.as_mut_ptr(), y) };
                        o[off..off + n].copy_from_slice(&tmp[..n]);
                    }
                }
                if end {
                    break;
                }
            }
        }
    };
}

dw_tiles!(
    /// 16-float (AVX-512) tiles, for rows wider than 8.
    dw_zmm, "avx512f", 16, __m512,
    _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, _mm512_max_ps, _mm512_min_ps
);
dw_tiles!(
    /// 8-float (AVX2) tiles: rows of 5–8 columns on AVX-512, every row on AVX2.
    dw_ymm, "avx2,fma", 8, __m256,
    _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, _mm256_max_ps, _mm256_min_ps
);
dw_tiles!(
    /// 4-float tiles for rows of at most 4 columns (the 4x4 maps of CIFAR nets).
    dw_xmm, "avx2,fma", 4, __m128,
    _mm_set1_ps, _mm_loadu_ps, _mm_storeu_ps, _mm_fmadd_ps, _mm_max_ps, _mm_min_ps
);

/// Runs one plane on the best tile kernel for its width and the ISA in use; `false` when
/// none applies (portable code), so the caller runs [`plane_tiles`].
#[inline(always)]
#[allow(unused_variables)]
fn plane_vector(isa: Isa, p: &Plane, o: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa` never exceeds what the CPU has; the bound was checked by the caller.
        match (isa, p.ow) {
            (Isa::Portable, _) => return false,
            (_, 0..=4) => unsafe { dw_xmm::<8>(p, o) },
            (Isa::Avx512, 5..=8) | (Isa::Avx2, _) => unsafe { dw_ymm::<8>(p, o) },
            (Isa::Avx512, _) => unsafe { dw_zmm::<8>(p, o) },
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Forward of planes `first..` into `out` (whole planes), each padded into `xp` and
/// computed in register tiles as wide as its rows need, then given the rest of its
/// epilogue (activations other than ReLU/ReLU6) while in cache.
#[allow(clippy::too_many_arguments)]
fn planes_fwd(
    g: &Geo,
    ph: &Phases,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    first: usize,
    epi: Option<(&[f32], Option<ActivationKind>)>,
    xp: &mut [f32],
) {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    let mut taps = [0usize; 49];
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            taps[ky * g.kw + kx] = ky * ph.row + (kx % g.sw) * ph.phase + kx / g.sw;
        }
    }
    let taps = &taps[..khw];
    // Every vector load ends inside the buffer: the last output row's base, plus the
    // largest tap, plus the row rounded up to BLOCK columns (≥ any tile's lanes).
    let step = g.sh * ph.row;
    let reach =
        (g.oh - 1) * step + taps.iter().max().copied().unwrap_or(0) + g.ow.div_ceil(BLOCK) * BLOCK;
    assert!(reach <= xp.len(), "depthwise padded buffer too short");
    let (clamp, rest) = match epi.and_then(|e| e.1) {
        Some(ActivationKind::Relu) => ((0.0, f32::INFINITY), None),
        Some(ActivationKind::Relu6) => ((0.0, 6.0), None),
        a => ((f32::NEG_INFINITY, f32::INFINITY), a),
    };
    let isa = super::simd::isa();
    for (i, o) in out.chunks_exact_mut(p).enumerate() {
        let nc = first + i;
        let c = nc % g.c;
        pad_phases(g, ph, &x[nc * hw..(nc + 1) * hw], xp);
        let plane = Plane {
            xp,
            w: &w[c * khw..(c + 1) * khw],
            taps,
            oh: g.oh,
            ow: g.ow,
            step,
            bias: epi.map_or(0.0, |e| e.0[c]),
            lo: clamp.0,
            hi: clamp.1,
        };
        if !plane_vector(isa, &plane, o) {
            plane_tiles(&plane, o);
        }
        if rest.is_some() {
            act::bias_act(o, 0.0, None, rest);
        }
    }
}

/// The portable form of the tile kernels (8 columns × 4 accumulators), for CPUs without
/// AVX2 and other architectures.
fn plane_tiles(p: &Plane, o: &mut [f32]) {
    const V: usize = 8;
    const T: usize = 4;
    let per_row = p.ow.div_ceil(V);
    let count = p.oh * per_row;
    let mut v0 = 0;
    while v0 < count {
        let idx: [usize; T] = std::array::from_fn(|t| (v0 + t).min(count - 1));
        let mut acc = [[p.bias; V]; T];
        for (&tap, &wv) in p.taps.iter().zip(p.w) {
            for t in 0..T {
                let b = (idx[t] / per_row) * p.step + (idx[t] % per_row) * V + tap;
                let src: &[f32; V] = p.xp[b..b + V].try_into().expect("in bounds");
                for i in 0..V {
                    acc[t][i] += wv * src[i];
                }
            }
        }
        for t in 0..T {
            let (oy, c0) = (idx[t] / per_row, (idx[t] % per_row) * V);
            let n = (p.ow - c0).min(V);
            for (d, &a) in o[oy * p.ow + c0..][..n].iter_mut().zip(&acc[t]) {
                *d = a.clamp(p.lo, p.hi);
            }
        }
        v0 += T;
    }
}

multiversion! {
    /// One plane's input gradient: `dx[iy, ix] += w[ky, kx]·dy[oy, ox]` (`dx` zeroed).
    fn plane_bwd_input(g: &Geo, dy: &[f32], w: &[f32], dx: &mut [f32]) {
        for oy in 0..g.oh {
            let drow = &dy[oy * g.ow..(oy + 1) * g.ow];
            for ky in 0..g.kh {
                let Some(iy) = in_row(g, oy, ky) else { continue };
                let xrow = &mut dx[iy * g.w..(iy + 1) * g.w];
                for kx in 0..g.kw {
                    let wv = w[ky * g.kw + kx];
                    let off = col_off(g, kx);
                    let (lo, hi) = span(off, g.sw, g.w, g.ow);
                    let start = (lo as isize * g.sw as isize + off) as usize;
                    if g.sw == 1 {
                        let xs = &mut xrow[start..start + (hi - lo)];
                        for (a, &b) in xs.iter_mut().zip(&drow[lo..hi]) {
                            *a += wv * b;
                        }
                    } else {
                        for (j, &b) in drow[lo..hi].iter().enumerate() {
                            xrow[start + j * g.sw] += wv * b;
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// Adds one plane's weight gradient `Σ x[iy, ix]·dy[oy, ox]` per tap into `dw`.
    fn plane_bwd_weight(g: &Geo, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        for oy in 0..g.oh {
            let drow = &dy[oy * g.ow..(oy + 1) * g.ow];
            for ky in 0..g.kh {
                let Some(iy) = in_row(g, oy, ky) else { continue };
                let xrow = &x[iy * g.w..(iy + 1) * g.w];
                for kx in 0..g.kw {
                    let off = col_off(g, kx);
                    let (lo, hi) = span(off, g.sw, g.w, g.ow);
                    let start = (lo as isize * g.sw as isize + off) as usize;
                    let mut acc = 0f32;
                    if g.sw == 1 {
                        let xs = &xrow[start..start + (hi - lo)];
                        for (&a, &b) in xs.iter().zip(&drow[lo..hi]) {
                            acc += a * b;
                        }
                    } else {
                        for (j, &b) in drow[lo..hi].iter().enumerate() {
                            acc += xrow[start + j * g.sw] * b;
                        }
                    }
                    dw[ky * g.kw + kx] += acc;
                }
            }
        }
    }
}

/// Forward of every plane, with the per-channel `bias` and activation applied as each
/// plane is finished (`epi`), or none. Parallel over runs of planes, so that each task
/// pays the dispatch and the scratch set-up once.
pub fn forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
) {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    if p == 0 {
        return;
    }
    let planes = out.len() / p;
    if g.dh != 1 || g.dw != 1 || g.kh * g.kw > 49 {
        out.par_chunks_mut(p).enumerate().for_each(|(nc, o)| {
            let c = nc % g.c;
            plane_fwd_any(g, &x[nc * hw..(nc + 1) * hw], &w[c * khw..(c + 1) * khw], o);
            if let Some((b, a)) = epi {
                act::bias_act(o, b[c], None, a);
            }
        });
        return;
    }
    // The phase layout (dilation 1) is the same for every plane.
    let ph = Phases::new(g);
    // ~8 tasks per thread balance the load; a task is at least one plane.
    let tasks = (rayon::current_num_threads() * 8).max(1);
    let per = planes.div_ceil(tasks).max(1);
    out.par_chunks_mut(p * per).enumerate().for_each(|(ti, o)| {
        PADDED.with(|b| {
            let mut pad = b.borrow_mut();
            let key = (ph, [g.h, g.w, g.pt, g.pl, g.sw]);
            if pad.key != Some(key) || pad.buf.len() < ph.len() {
                pad.buf.clear();
                pad.buf.resize(ph.len(), 0.0);
                pad.key = Some(key);
            }
            let xp = &mut pad.buf[..ph.len()];
            planes_fwd(g, &ph, x, w, o, ti * per, epi, xp);
        });
    });
}

pub fn forward(g: &Geo, x: &[f32], w: &[f32], out: &mut [f32]) {
    forward_epi(g, x, w, out, None)
}

pub fn backward_input(g: &Geo, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    dx.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(nc, dxc)| {
            let c = nc % g.c;
            plane_bwd_input(
                g,
                &dy[nc * p..(nc + 1) * p],
                &w[c * khw..(c + 1) * khw],
                dxc,
            );
        });
}

pub fn backward_weight(g: &Geo, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    let mut dw = vec![0f32; g.c * khw];
    dw.par_chunks_mut(khw).enumerate().for_each(|(c, dwc)| {
        for n in 0..g.n {
            let nc = n * g.c + c;
            plane_bwd_weight(
                g,
                &x[nc * hw..(nc + 1) * hw],
                &dy[nc * p..(nc + 1) * p],
                dwc,
            );
        }
    });
    dw
}
