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
use super::simd::multiversion;
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

/// Output rows are computed rounded up to this many columns (one AVX-512 register).
const BLOCK: usize = 16;

thread_local! {
    static PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The padded plane's phase layout: padded column `c` of padded row `r` is at
/// `r·row + (c mod s)·phase + c / s`, so a tap reads a contiguous run at any stride.
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
}

multiversion! {
    /// Copies plane `x` into `buf` zero-padded and split into stride phases.
    fn pad_phases(g: &Geo, ph: &Phases, x: &[f32], buf: &mut [f32]) {
        buf.fill(0.0);
        for r in 0..ph.rows {
            let iy = r as isize - g.pt as isize;
            if iy < 0 || iy as usize >= g.h {
                continue;
            }
            let src = &x[iy as usize * g.w..(iy as usize + 1) * g.w];
            let dst = &mut buf[r * ph.row..(r + 1) * ph.row];
            for q in 0..g.sw {
                // Phase q holds padded columns q, q + s, …: input column t·s + q − pl.
                let (lo, hi) = span(q as isize - g.pl as isize, g.sw, g.w, ph.phase);
                let d = &mut dst[q * ph.phase..(q + 1) * ph.phase];
                let first = (lo * g.sw + q) - g.pl;
                if g.sw == 1 {
                    d[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                } else {
                    for (j, v) in d[lo..hi].iter_mut().enumerate() {
                        *v = src[first + j * g.sw];
                    }
                }
            }
        }
    }
}

multiversion! {
    /// One plane from its padded phases (dilation 1): each output row accumulates one
    /// contiguous scaled row per tap (in a row buffer rounded up to whole vectors, so the
    /// loops have no remainder), then gets its epilogue.
    #[allow(clippy::too_many_arguments)]
    fn plane_fwd_phased(
        g: &Geo,
        ph: &Phases,
        xp: &[f32],
        w: &[f32],
        o: &mut [f32],
        bias: f32,
        act: Option<ActivationKind>,
        acc: &mut [f32],
    ) {
        let n = acc.len();
        for oy in 0..g.oh {
            acc.fill(0.0);
            for ky in 0..g.kh {
                let r = &xp[(oy * g.sh + ky) * ph.row..(oy * g.sh + ky + 1) * ph.row];
                for kx in 0..g.kw {
                    let wv = w[ky * g.kw + kx];
                    let at = (kx % g.sw) * ph.phase + kx / g.sw;
                    let src = &r[at..at + n];
                    for (a, &b) in acc.iter_mut().zip(src) {
                        *a += wv * b;
                    }
                }
            }
            let orow = &mut o[oy * g.ow..(oy + 1) * g.ow];
            orow.copy_from_slice(&acc[..g.ow]);
            act::bias_act(orow, bias, None, act);
        }
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
/// row is finished (`epi`), or none.
pub fn forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
) {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    // The phase layout (dilation 1 only) is the same for every plane.
    let phases = (g.dh == 1 && g.dw == 1 && g.oh > 0 && g.ow > 0).then(|| Phases::new(g));
    out.par_chunks_mut(p.max(1))
        .enumerate()
        .for_each(|(nc, o)| {
            let c = nc % g.c;
            let (xc, wc) = (&x[nc * hw..(nc + 1) * hw], &w[c * khw..(c + 1) * khw]);
            let (bias, act) = epi.map_or((0.0, None), |(b, a)| (b[c], a));
            if let Some(ph) = &phases {
                PADDED.with(|b| {
                    let mut buf = b.borrow_mut();
                    let (len, accn) = (ph.rows * ph.row, g.ow.div_ceil(BLOCK) * BLOCK);
                    buf.resize(len + accn, 0.0);
                    let (xp, acc) = buf.split_at_mut(len);
                    pad_phases(g, ph, xc, xp);
                    plane_fwd_phased(g, ph, xp, wc, o, bias, act, acc);
                });
            } else {
                plane_fwd_any(g, xc, wc, o);
                if epi.is_some() {
                    for row in o.chunks_mut(g.ow.max(1)) {
                        act::bias_act(row, bias, None, act);
                    }
                }
            }
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
