//! Stride-1 "same" depthwise convolution on AVX-512 without a padding copy.
//!
//! The general depthwise path ([`super::depthwise`]) copies every plane into a padded
//! buffer first; with only `kh·kw` FMAs per output, that copy cost as much as the
//! convolution (13 % of MobileNetV2's inference at batch 64, against 17 % in the tile
//! kernels). When the output has the input's size (stride 1, `pt + pb = kh − 1`,
//! `pl + pr = kw − 1`), output position `q = oy·w + ox` under tap `(ky, kx)` reads input
//! `q + (ky − pt)·w + (kx − pl)`: one constant offset per tap over the flattened plane.
//! A vector of 16 consecutive positions (across row ends: an 8×8 map fills whole vectors)
//! then takes each tap as one masked load, the mask dropping the lanes whose input falls
//! in the padding (left/right columns, rows above/below). The masks depend only on the
//! geometry and are computed once per call.

// The explicit-vector kernels are x86-64 only; elsewhere `applies` is false and they are
// not built.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_variables, unused_macros)
)]

use super::act;
use super::im2col::Geo;
use super::simd::Isa;
use crate::graph::ops::ActivationKind;

/// Whether this path takes the conv (off with the register tiles, for A/B runs): AVX-512, depthwise-shaped planes (the caller's
/// check), stride 1, undilated, output the input's size, a window of at most 7×7, rows
/// narrower than a vector.
pub fn applies(g: &Geo) -> bool {
    super::conv_tiles::mode() != super::conv_tiles::TileMode::Off
        && cfg!(target_arch = "x86_64")
        && super::simd::isa() == Isa::Avx512
        && g.sh == 1
        && g.sw == 1
        && g.dh == 1
        && g.dw == 1
        && g.oh == g.h
        && g.ow == g.w
        && g.pt < g.kh
        && g.pl < g.kw
        && g.kh * g.kw <= 49
        && g.p() > 0
        && g.w < NARROW
}

/// Rows narrower than this take the flattened path. The per-row path computes rows in
/// whole vectors (8 lanes for a 7-wide row, 16 for 14), and here 16 lanes of positions
/// run across row ends: per layer on an AMD EPYC (batch 8, 3×3), 14×14 ran in 0.20 ms
/// against 0.36, 7×7 in 0.15 against 0.29, 4×4 (batch 64) 0.49 against 1.56. On wide
/// rows the per-row path wins (32×32: 1.6 ms against 3.7 here): its loads need no
/// masks, and every flattened vector that holds a row end pays for them.
const NARROW: usize = 16;

/// The per-geometry tables: each tap's input offset, and per (vector, tap) the lanes
/// whose input is inside the plane.
struct Masks {
    offs: Vec<isize>,
    masks: Vec<u16>,
    vecs: usize,
}

impl Masks {
    fn new(g: &Geo) -> Masks {
        let (h, w, p) = (g.h as isize, g.w as isize, g.p());
        let vecs = p.div_ceil(16);
        let mut offs = Vec::with_capacity(g.kh * g.kw);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                offs.push((ky as isize - g.pt as isize) * w + (kx as isize - g.pl as isize));
            }
        }
        let mut masks = Vec::with_capacity(vecs * offs.len());
        // Each lane's (row, column), counted along rather than divided out per lane and
        // tap (the divisions cost more than a small plane's FMAs).
        let lanes: Vec<(isize, isize)> = (0..g.h as isize)
            .flat_map(|oy| (0..w).map(move |ox| (oy, ox)))
            .take(p)
            .collect();
        for v in 0..vecs {
            for ky in 0..g.kh as isize {
                for kx in 0..g.kw as isize {
                    let mut m = 0u16;
                    for l in 0..16 {
                        let q = v * 16 + l;
                        if q >= p {
                            break;
                        }
                        let (oy, ox) = lanes[q];
                        let (iy, ix) = (oy + ky - g.pt as isize, ox + kx - g.pl as isize);
                        if iy >= 0 && iy < h && ix >= 0 && ix < w {
                            m |= 1 << l;
                        }
                    }
                    masks.push(m);
                }
            }
        }
        Masks { offs, masks, vecs }
    }
}

/// One plane: `o = clamp(bias + Σ_taps w·x[q + off])`, `T` vectors at a time.
///
/// # Safety
/// AVX-512F; `x` and `o` hold the plane (`p` floats); `wt` one weight per tap. Lanes
/// outside the plane are masked off: their addresses are formed with wrapping offsets
/// and never read or written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
unsafe fn plane(
    m: &Masks,
    p: usize,
    x: &[f32],
    wt: &[f32],
    bias: f32,
    lo: f32,
    hi: f32,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    const T: usize = 8;
    let taps = m.offs.len();
    let (b, lo, hi) = (_mm512_set1_ps(bias), _mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let xb = x.as_ptr();
    let mut v0 = 0;
    while v0 < m.vecs {
        let n = T.min(m.vecs - v0);
        let mut acc = [b; T];
        for (ti, (&off, &wv)) in m.offs.iter().zip(wt).enumerate() {
            let wv = _mm512_set1_ps(wv);
            for t in 0..T {
                if t < n {
                    let v = v0 + t;
                    let mk = m.masks[v * taps + ti];
                    // SAFETY: only the lanes of `mk` are read, and they are inside x.
                    let xv = unsafe {
                        _mm512_maskz_loadu_ps(mk, xb.wrapping_offset((v * 16) as isize + off))
                    };
                    acc[t] = _mm512_fmadd_ps(wv, xv, acc[t]);
                }
            }
        }
        for t in 0..n {
            let v = v0 + t;
            let valid = (p - v * 16).min(16);
            let keep: u16 = ((1u32 << valid) - 1) as u16;
            let y = _mm512_min_ps(hi, _mm512_max_ps(lo, acc[t]));
            // SAFETY: lanes < valid are positions < p of o.
            unsafe { super::simd::store16(o.as_mut_ptr().add(v * 16), keep, y) };
        }
        v0 += n;
    }
}

/// Forward of every `[N·C]` plane with the per-channel bias and activation of `epi`.
pub fn forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
) {
    assert!(applies(g) && x.len() >= out.len());
    let (p, khw) = (g.p(), g.kh * g.kw);
    let m = Masks::new(g);
    let ((lo, hi), rest) = super::planes::clamp_split(epi.and_then(|e| e.1));
    let planes = out.len() / p;
    // ~8 tasks per thread balance the load; a task is at least one plane.
    let per = planes
        .div_ceil((rayon::current_num_threads() * 8).max(1))
        .max(1);
    super::par::chunks_mut(&mut out[..], p * per, |ti, os| {
        for (i, o) in os.chunks_exact_mut(p).enumerate() {
            let nc = ti * per + i;
            let c = nc % g.c;
            let bias = epi.map_or(0.0, |e| e.0[c]);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked AVX-512; the plane and weights are in bounds.
            unsafe {
                plane(
                    &m,
                    p,
                    &x[nc * p..(nc + 1) * p],
                    &w[c * khw..(c + 1) * khw],
                    bias,
                    lo,
                    hi,
                    o,
                )
            };
            if rest.is_some() {
                act::bias_act(o, 0.0, None, rest);
            }
        }
    });
}
