//! The prunable layers of a graph (every conv and linear weight, the stem and classifier
//! included, as UniPTS does) and per-layer sparsity bookkeeping.

pub use crate::graph::matrix::weight_host;
use crate::graph::matrix::{weight_matrices, WeightMatrix};
use crate::graph::Graph;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// One prunable weight tensor: the IR's weight-matrix view of a conv or linear layer.
pub type SparseLayer = WeightMatrix;

/// Every conv and linear weight, in topological order.
pub fn prunable_layers(g: &Graph) -> Vec<SparseLayer> {
    weight_matrices(g)
}

/// Writes `m ⊙ w` into the graph for every layer (masks aligned with `layers`, 0/1 values).
pub fn apply_masks(g: &Graph, layers: &[SparseLayer], masks: &[Vec<f32>]) -> Result<()> {
    if masks.len() != layers.len() {
        bail!("{} masks for {} layers", masks.len(), layers.len());
    }
    for (l, m) in layers.iter().zip(masks) {
        if m.len() != l.numel() {
            bail!(
                "mask of '{}' has {} entries, the weight {}",
                l.name,
                m.len(),
                l.numel()
            );
        }
        let w = weight_host(g, l)?;
        let v: Vec<f32> = w.iter().zip(m).map(|(w, m)| w * m).collect();
        g.set_param(
            &l.key,
            &Tensor::from_vec(v, l.shape.as_slice(), &candle_core::Device::Cpu)?,
        )?;
    }
    Ok(())
}

/// Zeros of one layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerSparsity {
    pub name: String,
    pub numel: usize,
    pub zeros: usize,
    pub sparsity: f64,
}

/// Per-layer zero counts and the global sparsity over all prunable weights.
pub fn sparsity_report(g: &Graph) -> Result<(Vec<LayerSparsity>, f64)> {
    let mut out = Vec::new();
    let (mut z, mut n) = (0usize, 0usize);
    for l in prunable_layers(g) {
        let w = weight_host(g, &l)?;
        let zeros = w.iter().filter(|v| **v == 0.0).count();
        z += zeros;
        n += w.len();
        out.push(LayerSparsity {
            name: l.name.clone(),
            numel: w.len(),
            zeros,
            sparsity: zeros as f64 / w.len().max(1) as f64,
        });
    }
    Ok((out, z as f64 / n.max(1) as f64))
}
