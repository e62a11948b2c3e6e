//! 3×3 stride-2 depthwise convolution on wide maps, read from the input rows where they
//! lie (AVX-512).
//!
//! The plane kernels ([`super::planes`]) first copy each input plane into a padded buffer
//! split into stride phases; on a 112×112 map at batch 1 that copy took more time than the
//! multiply-adds (96 channels: 0.12 of 0.22 ms on an AMD EPYC, one thread). Here sixteen
//! outputs of one input row take two loads: a two-source permute gives the even columns
//! (tap 0 at padding 1), one the odd columns (tap 1), and the even columns shifted by one
//! (tap 2) come from `valignd` with the next value. Each input row serves the two output
//! rows that read it (their accumulators are live together), up to four vectors of a row
//! at a time, so the taps of one row are shuffled once for six multiply-adds. Zero padding
//! is masked-off lanes of the loads (any padding of at most one column on the left, and
//! any on the right; rows outside the map are skipped).
//!
//! Narrower maps (output rows ≤ 28) stay on the channel-vector kernel
//! ([`super::dw_chanvec`]), which the plane copy never slowed.

use super::im2col::Geo;
use super::planes::clamp_split;
use super::simd::Isa;
use crate::graph::ops::ActivationKind;

/// Whether a depthwise conv runs here: AVX-512, 3×3, stride 2, no dilation, at most one
/// padded row/column above and on the left, output rows wider than the channel-vector
/// kernel takes.
pub fn applies(g: &Geo) -> bool {
    cfg!(target_arch = "x86_64")
        && super::simd::isa() == Isa::Avx512
        && super::conv_tiles::mode() != super::conv_tiles::TileMode::Off
        && !env_off()
        && g.kh == 3
        && g.kw == 3
        && g.sh == 2
        && g.sw == 2
        && g.dh == 1
        && g.dw == 1
        && g.pt <= 1
        && g.pl <= 1
        && g.ow > 28
        && g.oh > 0
}

/// `LOPPER_DW_S2=0` keeps stride-2 layers on the plane kernels (A/B runs); read once.
fn env_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::simd::env_off(&OFF, "LOPPER_DW_S2")
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
    assert!(applies(g), "dw_s2: geometry {g:?} not handled");
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
    let vecs = g.ow.div_ceil(16);
    let mut oy = 0;
    while oy < g.oh {
        let two = oy + 1 < g.oh;
        // The rows two pairs ahead, into L1: at batch 8 (planes from memory) one thread
        // waited on them (4.8 against 3.4 ms for the plane kernels' streaming copy; 2.1
        // with this).
        for r in [2 * oy + 6, 2 * oy + 7] {
            let iy = r as isize - g.pt as isize;
            if iy >= 0 && (iy as usize) < g.h {
                prefetch_row(&k.x[iy as usize * g.w..][..g.w]);
            }
        }
        let mut v0 = 0;
        while v0 < vecs {
            let nb = (vecs - v0).min(4);
            // SAFETY: AVX-512F; `block` bounds every access by the plane and output sizes.
            unsafe {
                match (nb, two) {
                    (4, true) => block::<4, true>(g, k, oy, v0, o),
                    (3, true) => block::<3, true>(g, k, oy, v0, o),
                    (2, true) => block::<2, true>(g, k, oy, v0, o),
                    (_, true) => block::<1, true>(g, k, oy, v0, o),
                    (4, false) => block::<4, false>(g, k, oy, v0, o),
                    (3, false) => block::<3, false>(g, k, oy, v0, o),
                    (2, false) => block::<2, false>(g, k, oy, v0, o),
                    (_, false) => block::<1, false>(g, k, oy, v0, o),
                }
            }
            v0 += nb;
        }
        oy += 2;
    }
}

/// Asks for `row` in L1.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_row(row: &[f32]) {
    for j in (0..row.len()).step_by(16) {
        // SAFETY: a prefetch of an address inside the slice (no access is made).
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                row.as_ptr().add(j) as *const i8,
            )
        };
    }
}

/// Output vectors `v0..v0 + NB` of output row `oy` (and of `oy + 1` with `TWO`).
///
/// # Safety
/// AVX-512F; `oy (+ 1) < OH`, `v0 + NB ≤ ⌈OW / 16⌉`, the plane `H·W` and the output
/// `OH·OW` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn block<const NB: usize, const TWO: bool>(
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
    let lanes = |from: isize| -> u16 {
        let lo = (-from).clamp(0, 16);
        let hi = (w_in - from).clamp(0, 16);
        if hi <= lo {
            0
        } else {
            (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16
        }
    };
    let mut base = [0isize; NB];
    let mut m = [(0u16, 0u16, false); NB];
    for v in 0..NB {
        let b = 32 * (v0 + v) as isize - g.pl as isize;
        base[v] = b;
        m[v] = (lanes(b), lanes(b + 16), b + 32 >= 0 && b + 32 < w_in);
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
        let dst = o.as_mut_ptr();
        for v in 0..NB {
            let col = 16 * (v0 + v);
            let n = (ow - col).min(16);
            let mask = ((1u32 << n) - 1) as u16;
            // Bound first, value second: a NaN passes through.
            let ya = _mm512_min_ps(hi, _mm512_max_ps(lo, a[v]));
            super::simd::store16(dst.add(oy * ow + col), mask, ya);
            if TWO {
                let yb = _mm512_min_ps(hi, _mm512_max_ps(lo, b[v]));
                super::simd::store16(dst.add((oy + 1) * ow + col), mask, yb);
            }
        }
    }
}
