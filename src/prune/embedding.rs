//! Opting in to pruning a transformer's embedding dimension: the channels that run through
//! every residual add and LayerNorm. They are kept by default (a LayerNorm's statistics
//! change with every channel removed, so removal is not equivalent to masking and usually
//! costs more accuracy than heads or FFN units); this rewrite marks every LayerNorm as
//! prunable, after which the embedding is one ordinary group.

use crate::graph::ops::Op;
use crate::graph::Graph;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::BTreeMap;

/// The same graph with every LayerNorm's channels prunable (weights copied).
pub fn allow_embedding_pruning(g: &Graph) -> Result<Graph> {
    let mut nodes = g.nodes.clone();
    for n in &mut nodes {
        if let Op::LayerNorm(l) = &mut n.op {
            l.prune_channels = true;
        }
    }
    let params: BTreeMap<String, Tensor> = g
        .params()
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<Result<_>>()?;
    Ok(Graph::with_parts(nodes, g.outputs.clone(), params)?.keeping(g))
}
