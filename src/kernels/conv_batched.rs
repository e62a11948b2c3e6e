//! Convolutions over small maps with several images per GEMM.
//!
//! The per-image GEMMs of a conv have as many columns as the map has positions: 4 or 16
//! for the last stages of a CIFAR VGG (2×2, 4×4 maps), 49 for ImageNet nets at 7×7. Such
//! thin products run the GEMM's edge micro-kernels at a fraction of its speed, and the
//! weight gradient becomes a sum of rank-4 updates of a 512×4608 matrix, each one a full
//! read-modify-write of it. Here `B` images' im2col columns are laid side by side, so the
//! forward, the input gradient and the weight gradient are each one GEMM with `B·P`
//! columns (or reduction length), at the cost of copying columns and outputs between the
//! per-image and the batched layouts (`O(K·B·P)`, small beside the `O(O·K·B·P)` product).
//! Ungrouped convs only; the GEMMs thread themselves.

use super::gemm::{sgemm, Mat};
use super::im2col::{col2im, im2col, Geo};

/// Below this many positions per map, images are batched.
const NARROW: usize = 64;
/// Target GEMM width (columns) of a batch.
const WIDTH: usize = 256;

/// Images per GEMM for `g`, or `None` when the per-image path is as good (a wide map, one
/// image, a grouped conv).
pub fn batch(g: &Geo) -> Option<usize> {
    let p = g.p();
    (g.groups == 1 && g.n >= 2 && p > 0 && p < NARROW).then(|| (WIDTH / p).clamp(2, g.n))
}

/// `cols[K × B·P]` from images `n0..n0+b` of `x` (image `i`'s columns at `i·P`).
fn gather_cols(g: &Geo, x: &[f32], n0: usize, b: usize, cols: &mut [f32], tmp: &mut Vec<f32>) {
    let (k, p, img) = (g.k(), g.p(), g.c * g.h * g.w);
    let width = b * p;
    tmp.resize(k * p, 0.0);
    for i in 0..b {
        let xn = &x[(n0 + i) * img..(n0 + i + 1) * img];
        let src: &[f32] = if g.is_pointwise() {
            xn
        } else {
            im2col(g, xn, tmp);
            tmp
        };
        for r in 0..k {
            cols[r * width + i * p..r * width + (i + 1) * p]
                .copy_from_slice(&src[r * p..(r + 1) * p]);
        }
    }
}

/// `[O × B·P]` from images `n0..n0+b` of a `[N, O, P]` tensor, and back.
fn to_batched(o: usize, p: usize, t: &[f32], n0: usize, b: usize, dst: &mut [f32]) {
    let width = b * p;
    for i in 0..b {
        for oc in 0..o {
            let s = ((n0 + i) * o + oc) * p;
            dst[oc * width + i * p..oc * width + (i + 1) * p].copy_from_slice(&t[s..s + p]);
        }
    }
}

fn from_batched(o: usize, p: usize, src: &[f32], n0: usize, b: usize, t: &mut [f32]) {
    let width = b * p;
    for i in 0..b {
        for oc in 0..o {
            let d = ((n0 + i) * o + oc) * p;
            t[d..d + p].copy_from_slice(&src[oc * width + i * p..oc * width + (i + 1) * p]);
        }
    }
}

/// Forward `out [N, O, P] = conv(x, w)` in batches of `b` images; `after(n0, images)` runs
/// on each finished batch's outputs (the epilogue).
pub fn forward(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    b: usize,
    after: &dyn Fn(usize, &mut [f32]),
) {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let (mut cols, mut tmp, mut dst) = (vec![0f32; k * b * p], Vec::new(), vec![0f32; o * b * p]);
    for n0 in (0..g.n).step_by(b) {
        let bn = b.min(g.n - n0);
        let width = bn * p;
        gather_cols(g, x, n0, bn, &mut cols[..k * width], &mut tmp);
        sgemm(
            o,
            width,
            k,
            &mut dst[..o * width],
            Mat::rm(w, k),
            Mat::rm(&cols[..k * width], width),
            false,
            true,
        );
        from_batched(o, p, &dst[..o * width], n0, bn, out);
        after(n0, &mut out[n0 * o * p..(n0 + bn) * o * p]);
    }
}

/// Input gradient `[N, C, H, W]`.
pub fn backward_input(g: &Geo, dy: &[f32], w: &[f32], b: usize) -> Vec<f32> {
    let (k, p, o, img) = (g.k(), g.p(), g.o, g.c * g.h * g.w);
    let mut dx = vec![0f32; g.n * img];
    let (mut dyb, mut dcol, mut tmp) = (
        vec![0f32; o * b * p],
        vec![0f32; k * b * p],
        vec![0f32; k * p],
    );
    for n0 in (0..g.n).step_by(b) {
        let bn = b.min(g.n - n0);
        let width = bn * p;
        to_batched(o, p, dy, n0, bn, &mut dyb[..o * width]);
        // dcol = Wᵀ·dY.
        sgemm(
            k,
            width,
            o,
            &mut dcol[..k * width],
            Mat::rm_t(w, k),
            Mat::rm(&dyb[..o * width], width),
            false,
            true,
        );
        for i in 0..bn {
            for r in 0..k {
                tmp[r * p..(r + 1) * p]
                    .copy_from_slice(&dcol[r * width + i * p..r * width + (i + 1) * p]);
            }
            let dxn = &mut dx[(n0 + i) * img..(n0 + i + 1) * img];
            if g.is_pointwise() {
                dxn.copy_from_slice(&tmp);
            } else {
                col2im(g, &mut tmp, dxn);
            }
        }
    }
    dx
}

/// Weight gradient `[O, C, kh, kw]`: `Σ_batches dY_b · cols_bᵀ`.
pub fn backward_weight(g: &Geo, x: &[f32], dy: &[f32], b: usize) -> Vec<f32> {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let mut dw = vec![0f32; o * k];
    let (mut cols, mut tmp, mut dyb) = (vec![0f32; k * b * p], Vec::new(), vec![0f32; o * b * p]);
    for n0 in (0..g.n).step_by(b) {
        let bn = b.min(g.n - n0);
        let width = bn * p;
        gather_cols(g, x, n0, bn, &mut cols[..k * width], &mut tmp);
        to_batched(o, p, dy, n0, bn, &mut dyb[..o * width]);
        sgemm(
            o,
            k,
            width,
            &mut dw,
            Mat::rm(&dyb[..o * width], width),
            Mat::rm_t(&cols[..k * width], width),
            true,
            true,
        );
    }
    dw
}
