//! The prunable layers of a graph (every conv and linear weight, the stem and classifier
//! included, as UniPTS does) and per-layer sparsity bookkeeping.

use crate::graph::ops::Op;
use crate::graph::{param_key, Graph, NodeId};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// One prunable weight tensor.
#[derive(Clone, Debug)]
pub struct SparseLayer {
    pub node: NodeId,
    pub name: String,
    /// Parameter key (`"{node}.weight"`).
    pub key: String,
    pub shape: Vec<usize>,
    /// Output channels (rows of the weight matrix).
    pub rows: usize,
    /// Elements per row (`in/groups · kh · kw` or `in`).
    pub row_len: usize,
}

impl SparseLayer {
    pub fn numel(&self) -> usize {
        self.rows * self.row_len
    }
}

/// Every conv and linear weight, in topological order.
pub fn prunable_layers(g: &Graph) -> Vec<SparseLayer> {
    g.nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let (rows, row_len, shape) = match &n.op {
                Op::Conv2d(c) => {
                    let per = c.in_channels / c.groups * c.kernel[0] * c.kernel[1];
                    let shape = vec![
                        c.out_channels,
                        c.in_channels / c.groups,
                        c.kernel[0],
                        c.kernel[1],
                    ];
                    (c.out_channels, per, shape)
                }
                Op::Linear(l) => (
                    l.out_features,
                    l.in_features,
                    vec![l.out_features, l.in_features],
                ),
                _ => return None,
            };
            Some(SparseLayer {
                node: i,
                name: n.name.clone(),
                key: param_key(&n.name, "weight"),
                shape,
                rows,
                row_len,
            })
        })
        .collect()
}

/// Host copy of a layer's weight, flattened row-major.
pub fn weight_host(g: &Graph, l: &SparseLayer) -> Result<Vec<f32>> {
    Ok(g.param(l.node, "weight")?
        .as_tensor()
        .flatten_all()?
        .to_vec1()?)
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
