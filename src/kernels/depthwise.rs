//! Direct depthwise convolution (one filter per channel): forward, input and weight
//! gradients. Parallel over (image, channel) planes or, for the weight gradient, channels.

use super::im2col::Geo;
use rayon::prelude::*;

#[inline]
fn taps(g: &Geo) -> impl Iterator<Item = (usize, usize)> + '_ {
    (0..g.kh).flat_map(move |ky| (0..g.kw).map(move |kx| (ky, kx)))
}

/// Input coordinate of output `o` and tap `k` along one axis, if inside.
#[inline]
fn coord(o: usize, s: usize, k: usize, d: usize, pad: usize, len: usize) -> Option<usize> {
    let i = (o * s + k * d) as isize - pad as isize;
    (i >= 0 && (i as usize) < len).then_some(i as usize)
}

pub fn forward(g: &Geo, x: &[f32], w: &[f32], out: &mut [f32]) {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    out.par_chunks_mut(p).enumerate().for_each(|(nc, o)| {
        let c = nc % g.c;
        let xc = &x[nc * hw..(nc + 1) * hw];
        let wc = &w[c * khw..(c + 1) * khw];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let mut acc = 0f32;
                for (ky, kx) in taps(g) {
                    if let (Some(iy), Some(ix)) = (
                        coord(oy, g.sh, ky, g.dh, g.pt, g.h),
                        coord(ox, g.sw, kx, g.dw, g.pl, g.w),
                    ) {
                        acc += wc[ky * g.kw + kx] * xc[iy * g.w + ix];
                    }
                }
                o[oy * g.ow + ox] = acc;
            }
        }
    });
}

pub fn backward_input(g: &Geo, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    dx.par_chunks_mut(hw).enumerate().for_each(|(nc, dxc)| {
        let c = nc % g.c;
        let dyc = &dy[nc * p..(nc + 1) * p];
        let wc = &w[c * khw..(c + 1) * khw];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let gy = dyc[oy * g.ow + ox];
                for (ky, kx) in taps(g) {
                    if let (Some(iy), Some(ix)) = (
                        coord(oy, g.sh, ky, g.dh, g.pt, g.h),
                        coord(ox, g.sw, kx, g.dw, g.pl, g.w),
                    ) {
                        dxc[iy * g.w + ix] += wc[ky * g.kw + kx] * gy;
                    }
                }
            }
        }
    });
}

pub fn backward_weight(g: &Geo, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (hw, p, khw) = (g.h * g.w, g.p(), g.kh * g.kw);
    let mut dw = vec![0f32; g.c * khw];
    dw.par_chunks_mut(khw).enumerate().for_each(|(c, dwc)| {
        for n in 0..g.n {
            let nc = n * g.c + c;
            let xc = &x[nc * hw..(nc + 1) * hw];
            let dyc = &dy[nc * p..(nc + 1) * p];
            for (ky, kx) in taps(g) {
                let mut acc = 0f32;
                for oy in 0..g.oh {
                    let Some(iy) = coord(oy, g.sh, ky, g.dh, g.pt, g.h) else {
                        continue;
                    };
                    for ox in 0..g.ow {
                        if let Some(ix) = coord(ox, g.sw, kx, g.dw, g.pl, g.w) {
                            acc += xc[iy * g.w + ix] * dyc[oy * g.ow + ox];
                        }
                    }
                }
                dwc[ky * g.kw + kx] += acc;
            }
        }
    });
    dw
}
