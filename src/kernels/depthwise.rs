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
use super::planes::{pad_phases, span, with_padded, Phases, PlaneLayer};
use super::simd::multiversion;
use crate::graph::ops::ActivationKind;

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
    let layer = PlaneLayer::new(g, ph, 1, epi.and_then(|e| e.1));
    for (i, o) in out.chunks_exact_mut(p).enumerate() {
        let nc = first + i;
        let c = nc % g.c;
        pad_phases(g, ph, &x[nc * hw..(nc + 1) * hw], xp);
        let bias = epi.map_or(0.0, |e| e.0[c]);
        layer.run(xp, &w[c * khw..(c + 1) * khw], bias, o);
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
/// pays the dispatch and the scratch set-up once. `packed`: the weights as
/// [`super::dw_chanvec::pack`] lays them out (kept by an eval plan), if that kernel runs.
pub fn forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    packed: Option<&[f32]>,
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
) {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    if p == 0 {
        return;
    }
    let planes = out.len() / p;
    if g.dh != 1 || g.dw != 1 || g.kh * g.kw > 49 {
        super::par::chunks_mut(&mut out[..], p, |nc, o| {
            let c = nc % g.c;
            plane_fwd_any(g, &x[nc * hw..(nc + 1) * hw], &w[c * khw..(c + 1) * khw], o);
            if let Some((b, a)) = epi {
                act::bias_act(o, b[c], None, a);
            }
        });
        return;
    }
    if super::dw_chanvec::applies(g) {
        return super::dw_chanvec::forward_epi(g, x, w, packed, out, epi);
    }
    if super::dw_flat::applies(g) {
        return super::dw_flat::forward_epi(g, x, w, out, epi);
    }
    if super::dw_wide::applies(g) {
        return super::dw_wide::forward_epi(g, x, w, out, epi);
    }
    // The phase layout (dilation 1) is the same for every plane.
    let ph = Phases::new(g);
    // ~8 tasks per thread balance the load; a task is at least one plane.
    let tasks = (rayon::current_num_threads() * 8).max(1);
    let per = planes.div_ceil(tasks).max(1);
    super::par::chunks_mut(&mut out[..], p * per, |ti, o| {
        with_padded(g, &ph, 1, |xp| {
            planes_fwd(g, &ph, x, w, o, ti * per, epi, xp)
        });
    });
}

pub fn backward_input(g: &Geo, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    if g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && g.pt < g.kh && g.pl < g.kw {
        // Stride 1: the input gradient is the forward of `dy` with each window rotated
        // by 180° and the padding mirrored (`k − 1 − p` before), on the forward's tile
        // kernels; the scatter below ran at ~1 GFLOP/s (75 ms for a 112×112 batch-8
        // layer whose forward takes 3.5 ms).
        let t = Geo {
            h: g.oh,
            w: g.ow,
            oh: g.h,
            ow: g.w,
            pt: g.kh - 1 - g.pt,
            pl: g.kw - 1 - g.pl,
            ..*g
        };
        let flipped: Vec<f32> = w
            .chunks_exact(khw)
            .flat_map(|c| c.iter().rev().copied())
            .collect();
        forward_epi(&t, dy, &flipped, None, dx, None);
        return;
    }
    super::par::chunks_mut(&mut dx[..], hw.max(1), |nc, dxc| {
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
    super::par::chunks_mut(&mut dw[..], khw, |c, dwc| {
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
