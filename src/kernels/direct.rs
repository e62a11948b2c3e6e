//! Direct convolution for dense layers with few input channels: the RGB stem of nearly
//! every CNN (3 → 16..64 channels at full resolution, often stride 2).
//!
//! im2col + GEMM is a poor fit there: the reduction is only `C·kh·kw` (27 for a 3×3 RGB
//! stem) long, so writing and re-reading the column matrix costs as much as the product
//! (the stem was ~19 % of MobileNetV3-small at batch 1, a third of it in im2col). Here an
//! image's `C` input planes are padded once into the stride-phase layout of
//! [`super::planes`], and every output channel is one plane computed by the register-tile
//! kernels with `C·kh·kw` taps, its bias and clamp applied at the store.

use super::im2col::Geo;
use super::planes::{pad_phases, with_padded, Phases, PlaneLayer};
use crate::graph::ops::ActivationKind;

/// At most this many input channels take the direct path (beyond, the GEMM's reuse of
/// each input across output channels wins).
pub const MAX_CHANNELS: usize = 4;

/// Whether the direct path applies: an ungrouped, undilated conv with few input channels
/// and a non-empty output; with AVX-512, only outputs of at most 16 K values (ResNet-20's
/// stem at batch 1): the position tiles ([`super::conv_tiles`]) run larger stems faster,
/// per layer on an AMD EPYC (`examples/conv_paths.rs stem3`, `stem`): 3→32 3×3 stride 2
/// at 224, batch 1, 0.23 ms against 0.36, batch 8 1.19 against 1.70; 3→64 7×7 stride 2
/// batch 1 0.77 against 1.69, batch 8 7.0 against 11.2; MNIST's 1→32 at batch 64 0.20
/// against 0.43; but 3→16 at 32×32, batch 1, 0.051 against 0.020.
pub fn applies(g: &Geo) -> bool {
    let tiles = super::simd::isa() == super::simd::Isa::Avx512
        && match super::conv_tiles::mode() {
            super::conv_tiles::TileMode::Always => true,
            super::conv_tiles::TileMode::Auto => g.n * g.o * g.p() > 1 << 14,
            _ => false,
        };
    !tiles
        && g.groups == 1
        && g.dh == 1
        && g.dw == 1
        && g.c <= MAX_CHANNELS
        && g.kh * g.kw <= 49
        && g.oh > 0
        && g.ow > 0
}

/// `out [N, O, OH, OW] = conv(x, w)`, with the per-output-channel bias and activation
/// of `epi` applied while each plane is in cache.
pub fn forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
) {
    debug_assert!(applies(g));
    let (p, img_in, k) = (g.p(), g.c * g.h * g.w, g.c * g.kh * g.kw);
    let ph = Phases::new(g);
    let layer = PlaneLayer::new(g, &ph, g.c, epi.and_then(|e| e.1));
    // Output channels `o0..` of one image from its padded planes `xp`.
    let channels = |xp: &[f32], o0: usize, outs: &mut [f32]| {
        for (j, o) in outs.chunks_exact_mut(p).enumerate() {
            let oc = o0 + j;
            layer.run(
                xp,
                &w[oc * k..(oc + 1) * k],
                epi.map_or(0.0, |e| e.0[oc]),
                o,
            );
        }
    };
    let pad_image = |n: usize, xp: &mut [f32]| {
        let xn = &x[n * img_in..(n + 1) * img_in];
        for (c, plane) in xp.chunks_exact_mut(ph.len()).enumerate() {
            pad_phases(g, &ph, &xn[c * g.h * g.w..(c + 1) * g.h * g.w], plane);
        }
    };
    let threads = rayon::current_num_threads().max(1);
    if g.n >= threads {
        // Enough images: one task per image, padded once into the thread's buffer.
        super::par::chunks_mut(&mut out[..], g.o * p, |n, img| {
            with_padded(g, &ph, g.c, |xp| {
                pad_image(n, xp);
                channels(xp, 0, img);
            })
        });
    } else {
        // Few images (batch 1): each padded once into a shared buffer, its output channels
        // split across the threads (padding per task repeated the copy of a large image).
        let mut xp = vec![0f32; g.c * ph.len()];
        let ob = g.o.div_ceil(4 * threads).max(1);
        for (n, img) in out.chunks_mut(g.o * p).enumerate() {
            pad_image(n, &mut xp);
            super::par::chunks_mut(&mut img[..], ob * p, |bi, outs| {
                channels(&xp, bi * ob, outs)
            });
        }
    }
}
