//! Opting in to pruning a transformer's embedding dimension: the channels that run through
//! every residual add and LayerNorm. They are kept by default (a LayerNorm's statistics
//! change with every channel removed, so removal is not equivalent to masking and usually
//! costs more accuracy than heads or FFN units); this rewrite marks every LayerNorm as
//! prunable, after which the embedding is one ordinary group.
//!
//! Tied weights are refused: a token table that is also a layer's weight (BERT's masked-LM
//! decoder, GPT-2's LM head) is held by lopper as two copies (ONNX import unties them), and
//! cutting the embedding's columns out of one would silently leave the model no longer tied.

use crate::graph::ops::Op;
use crate::graph::Graph;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// The same graph with every LayerNorm's channels prunable (weights copied).
pub fn allow_embedding_pruning(g: &Graph) -> Result<Graph> {
    if let Some((table, layer)) = tied_table(g)? {
        bail!(
            "cannot prune the embedding dimension: the token table of '{table}' is tied to the \
             weight of '{layer}' (the same [vocab, dim] values); pruning tied embeddings is not \
             supported (prune heads and FFN units instead, or untie the weights before export)"
        );
    }
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
    Graph::with_parts(nodes, g.outputs.clone(), params)?.keeping(g)
}

/// The first embedding table that equals a conv's or linear layer's weight (same shape up
/// to trailing 1×1 axes, same values): `(embedding node, layer node)`.
fn tied_table(g: &Graph) -> Result<Option<(String, String)>> {
    let flat = |i: usize| -> Result<Vec<f32>> {
        Ok(g.param(i, crate::graph::ops::param::WEIGHT)?
            .as_tensor()
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    for (i, n) in g.nodes.iter().enumerate() {
        let Op::Embedding(e) = &n.op else { continue };
        let mut table: Option<Vec<f32>> = None;
        for (j, m) in g.nodes.iter().enumerate() {
            let fits = match &m.op {
                Op::Linear(l) => l.out_features == e.vocab && l.in_features == e.dim,
                Op::Conv2d(c) => {
                    c.out_channels == e.vocab
                        && c.in_channels == e.dim
                        && c.groups == 1
                        && c.kernel == [1, 1]
                }
                _ => false,
            };
            if !fits {
                continue;
            }
            if table.is_none() {
                table = Some(flat(i)?);
            }
            if table.as_deref() == Some(flat(j)?.as_slice()) {
                return Ok(Some((n.name.clone(), m.name.clone())));
            }
        }
    }
    Ok(None)
}
