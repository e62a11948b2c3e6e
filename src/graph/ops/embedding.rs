//! A token embedding table: integer ids `[T]` per sample (held as f32, exact below 2²⁴) →
//! their rows, channels-first `[D, T, 1]` like every token tensor. BERT's word embeddings,
//! imported from ONNX `Gather(table, input_ids)`. Weight `[vocab, D]` (PyTorch's layout).
//!
//! Its channels are the table's columns (the embedding dimension), decoupled from the ids:
//! they join the embedding group through every residual add and LayerNorm, which keeps the
//! group at full width unless embedding pruning is asked for
//! ([`crate::prune::allow_embedding_pruning`]); then the table loses those columns.

use super::param::WEIGHT;
use super::{expect_inputs, Coupling, InitRule, OpSpec, ParamKind, ParamSpec};
use crate::graph::shape::{fmt_shape, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    pub vocab: usize,
    pub dim: usize,
}

impl OpSpec for Embedding {
    fn kind(&self) -> &'static str {
        "Embedding"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Embedding", inputs, 1)?;
        let s = inputs[0];
        if s.len() != 1 {
            bail!(
                "Embedding reads a vector of token ids per sample, got {}",
                fmt_shape(s)
            );
        }
        Ok(vec![self.dim, s[0], 1])
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: WEIGHT,
            shape: vec![self.vocab, self.dim],
            kind: ParamKind::Trainable,
            init: InitRule::Uniform { bound: 0.02 },
            out_axis: Some(1),
            in_axis: None,
        }]
    }

    fn coupling(&self) -> Coupling {
        Coupling::Decouple
    }
}
