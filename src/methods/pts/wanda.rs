//! Wanda (Sun et al., 2023): score `|W_ij| · ‖X_j‖₂`, the weight magnitude times the norm of
//! the input feature it multiplies over the calibration set, compared within each output
//! row (every row keeps the same fraction). For a conv, the feature of weight
//! `[o, c, kh, kw]` is input channel `c` of its group, whose norm is taken over samples and
//! positions. Needs only forward passes.

use crate::data::Dataset;
use crate::exec::{forward_with, ForwardOpts, Mode};
use crate::graph::ops::Op;
use crate::graph::Graph;
use crate::sparse::layers::{apply_masks, weight_host, SparseLayer};
use crate::sparse::mask::{nm_mask, row_masks, zeros_for, Pattern};
use crate::train::fit_input;
use anyhow::Result;
use candle_core::Device;

/// Per layer, the L2 norm of each input channel / feature over `data`.
pub fn input_norms(g: &Graph, layers: &[SparseLayer], data: &Dataset) -> Result<Vec<Vec<f64>>> {
    let ins: Vec<usize> = layers.iter().map(|l| g.nodes[l.node].inputs[0]).collect();
    let mut sq: Vec<Vec<f64>> = vec![Vec::new(); layers.len()];
    let pos: Vec<usize> = (0..data.len()).collect();
    for chunk in pos.chunks(128) {
        let (x, _) = data.batch(chunk, None, &Device::Cpu)?;
        let x = fit_input(g, x)?;
        let out = forward_with(
            g,
            &x,
            &ForwardOpts {
                keep: &ins,
                ..ForwardOpts::new(Mode::Eval)
            },
        )?;
        for (li, &n) in ins.iter().enumerate() {
            let t = &out.kept[&n];
            let c = t.dim(1)?;
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let per = v.len() / (t.dim(0)? * c);
            if sq[li].is_empty() {
                sq[li] = vec![0.0; c];
            }
            for (k, blk) in v.chunks_exact(per).enumerate() {
                sq[li][k % c] += blk.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>();
            }
        }
    }
    Ok(sq
        .into_iter()
        .map(|v| v.into_iter().map(f64::sqrt).collect())
        .collect())
}

/// Wanda masks at sparsity `s` per row (or N:M), applied to `g`.
pub fn wanda(
    g: &Graph,
    layers: &[SparseLayer],
    data: &Dataset,
    s: f64,
    pattern: Pattern,
) -> Result<Vec<Vec<f32>>> {
    let norms = input_norms(g, layers, data)?;
    let mut masks = Vec::with_capacity(layers.len());
    for (l, nrm) in layers.iter().zip(&norms) {
        let w = weight_host(g, l)?;
        let (cpg, khw, opg) = match &g.nodes[l.node].op {
            Op::Conv2d(c) => (
                c.in_channels / c.groups,
                c.kernel[0] * c.kernel[1],
                c.out_channels / c.groups,
            ),
            _ => (l.row_len, 1, l.rows),
        };
        let score: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(idx, &v)| {
                let (o, r) = (idx / l.row_len, idx % l.row_len);
                let ch = (o / opg) * cpg + r / khw;
                (v.abs() as f64 * nrm[ch]) as f32
            })
            .collect();
        masks.push(match pattern {
            Pattern::Unstructured => row_masks(&score, l.row_len, zeros_for(s, l.row_len)),
            Pattern::NM { n, m } => nm_mask(&score, l.row_len, n, m),
        });
    }
    apply_masks(g, layers, &masks)?;
    Ok(masks)
}
