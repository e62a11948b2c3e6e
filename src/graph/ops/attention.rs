//! Multi-head scaled dot-product self-attention over a channels-first token tensor.
//!
//! Input: the fused projections `[3·H·d, T…]` (queries, keys, values stacked on the
//! channel axis, as one 1×1 conv or linear produces them: PyTorch's `in_proj`), the
//! positions `T…` being tokens (`[·, T, 1]`) or an image's pixels (`[·, H, W]`).
//! Output: the heads' results concatenated, `[H·d, T…]`, which the output projection (a
//! 1×1 conv) mixes. Per head `h`, with `Q_h, K_h, V_h` its `d` rows of each third:
//! `O_h = V_h · softmax(Q_hᵀ K_h · scale)ᵀ` (softmax over keys).
//!
//! Keeping tokens channels-first makes every projection a 1×1 conv, so the GEMM, sparse,
//! pruning and criteria machinery of convolutions applies to transformers unchanged.
//!
//! **Heads are the pruning unit** ([`Coupling::Heads`]): head `h` is its `d` query, key
//! and value channels and its `d` output channels; removing it shrinks `in_proj` by `3d`
//! rows, the output projection by `d` input columns and `heads` by one. `scale` is kept
//! (the head dimension does not change).
//!
//! **Grouped-query attention** (`kv_heads` < `heads`, LLaMA-2/3's GQA, MQA at 1): the input
//! is `[(H + 2G)·d, T…]`, the `H` query heads then `G` key and `G` value heads; query head
//! `h` attends with key/value head `h / (H/G)`. The pruning unit is then a kv group: its key
//! and value head, its `H/G` query heads and their output channels, so every kept kv head
//! keeps the same number of query heads.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::{fmt_shape, numel, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MultiHeadAttention {
    pub heads: usize,
    pub head_dim: usize,
    /// Multiplies the logits (`1/√head_dim` in the original model).
    pub scale: f64,
    /// A second input, the key mask `[T]` per sample (BERT's `attention_mask`): keys where
    /// it is 0 get no attention (their logits become −10⁹ before the softmax).
    #[serde(default)]
    pub masked: bool,
    /// Key/value heads (grouped-query attention); 0 means one per query head.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kv_heads: usize,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl MultiHeadAttention {
    pub fn new(heads: usize, head_dim: usize) -> Self {
        MultiHeadAttention {
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            masked: false,
            kv_heads: 0,
        }
    }

    /// Width of the output (and of the query part of the input).
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Key/value heads: `kv_heads`, or `heads` for plain multi-head attention.
    pub fn kv(&self) -> usize {
        if self.kv_heads == 0 {
            self.heads
        } else {
            self.kv_heads
        }
    }

    /// Input channels: the queries, then the keys and the values.
    pub fn in_channels(&self) -> usize {
        (self.heads + 2 * self.kv()) * self.head_dim
    }
}

impl OpSpec for MultiHeadAttention {
    fn kind(&self) -> &'static str {
        "MultiHeadAttention"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("MultiHeadAttention", inputs, 1 + usize::from(self.masked))?;
        let s = inputs[0];
        if self.masked && numel(inputs[1]) != numel(&s[1..]) {
            bail!(
                "MultiHeadAttention's key mask {} does not have one value per position of {}",
                fmt_shape(inputs[1]),
                fmt_shape(s)
            );
        }
        if self.head_dim == 0 {
            bail!("MultiHeadAttention with a zero head dimension");
        }
        let kv = self.kv();
        if kv == 0 || !self.heads.is_multiple_of(kv) {
            bail!(
                "MultiHeadAttention with {} query heads and {kv} key/value heads: the query heads must be a whole multiple of the key/value heads",
                self.heads
            );
        }
        if s.len() < 2 || s[0] != self.in_channels() {
            bail!(
                "MultiHeadAttention with {} heads ({kv} key/value heads) of {} expects {} stacked q/k/v channels \
                 and at least one position axis, got {}",
                self.heads,
                self.head_dim,
                self.in_channels(),
                fmt_shape(s)
            );
        }
        let mut out = s.clone();
        out[0] = self.width();
        Ok(out)
    }

    /// `QKᵀ` and `A·V`: `2·H·d·T²` multiply-accumulates per sample.
    fn macs(&self, inputs: &[&Shape], _output: &Shape) -> u64 {
        let t = inputs.first().map_or(0, |s| numel(&s[1..])) as u64;
        2 * self.width() as u64 * t * t
    }

    fn arity(&self) -> Option<usize> {
        Some(1 + usize::from(self.masked))
    }

    fn coupling(&self) -> Coupling {
        Coupling::Heads {
            heads: self.heads,
            head_dim: self.head_dim,
            kv_heads: self.kv(),
        }
    }
}
