//! Magnitude pruning: per layer at the same sparsity (uniform), or one global threshold on
//! |w| across all layers (global: layers with small weights end up sparser).

use crate::graph::Graph;
use crate::sparse::layers::{apply_masks, weight_host, SparseLayer};
use crate::sparse::mask::{global_masks, magnitude_mask, nm_mask, zeros_for, Pattern};
use anyhow::Result;

fn abs_weights(g: &Graph, layers: &[SparseLayer]) -> Result<Vec<Vec<f32>>> {
    layers
        .iter()
        .map(|l| Ok(weight_host(g, l)?.iter().map(|v| v.abs()).collect()))
        .collect()
}

/// Every layer at sparsity `s` (or N:M), smallest |w| first; masks applied to `g`.
pub fn uniform_magnitude(
    g: &Graph,
    layers: &[SparseLayer],
    s: f64,
    pattern: Pattern,
) -> Result<Vec<Vec<f32>>> {
    let masks: Vec<Vec<f32>> = abs_weights(g, layers)?
        .iter()
        .zip(layers)
        .map(|(a, l)| match pattern {
            Pattern::Unstructured => magnitude_mask(a, zeros_for(s, a.len())),
            Pattern::NM { n, m } => nm_mask(a, l.row_len, n, m),
        })
        .collect();
    apply_masks(g, layers, &masks)?;
    Ok(masks)
}

/// One threshold on |w| over all layers; masks applied to `g`.
pub fn global_magnitude(g: &Graph, layers: &[SparseLayer], s: f64) -> Result<Vec<Vec<f32>>> {
    let masks = global_masks(&abs_weights(g, layers)?, s);
    apply_masks(g, layers, &masks)?;
    Ok(masks)
}
