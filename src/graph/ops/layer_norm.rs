//! Layer normalisation across channels, at every position: `y[c, p] = (x[c, p] − μ_p) /
//! √(σ²_p + ε) · γ[c] + β[c]`, the statistics taken over the channel axis (axis 0 of the
//! per-sample shape). Token tensors are kept channels-first (`[D, T, 1]`, see
//! [`super::MultiHeadAttention`]), so a transformer's LayerNorm over the embedding is this
//! op, and a CNN's channel LayerNorm (ConvNeXt) is the same op.
//!
//! Channels pass through, so its `γ`, `β` are sliced with the group of its input. That
//! group is the embedding dimension of a transformer; removing one of its channels changes
//! every position's statistics, so the dependency engine keeps it at full width unless
//! asked (see [`Coupling::Normalized`] and `prune_channels`).
//!
//! With `rms` it is RMSNorm (LLaMA-style models): no mean is subtracted,
//! `y = x / √(mean_c x² + ε) · γ + β` (β stays zero when imported).

use super::{expect_inputs, per_channel_affine, Coupling, OpSpec, ParamSpec};
use crate::graph::shape::{fmt_shape, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerNorm {
    pub channels: usize,
    pub eps: f64,
    /// Let pruning remove channels through this op (its coupling becomes pass-through):
    /// off by default, set by `lopper prune --prune-embedding`
    /// ([`crate::prune::allow_embedding_pruning`]).
    #[serde(default)]
    pub prune_channels: bool,
    /// RMSNorm: scale by the root mean square, no centring.
    #[serde(default)]
    pub rms: bool,
}

impl LayerNorm {
    /// PyTorch's default ε.
    pub fn new(channels: usize) -> Self {
        LayerNorm {
            channels,
            eps: 1e-5,
            prune_channels: false,
            rms: false,
        }
    }
}

impl OpSpec for LayerNorm {
    fn kind(&self) -> &'static str {
        "LayerNorm"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("LayerNorm", inputs, 1)?;
        let s = inputs[0];
        if s.is_empty() || s[0] != self.channels {
            bail!(
                "LayerNorm over {} channels got input {}",
                self.channels,
                fmt_shape(s)
            );
        }
        Ok(s.clone())
    }

    fn params(&self) -> Vec<ParamSpec> {
        per_channel_affine(self.channels)
    }

    fn coupling(&self) -> Coupling {
        if self.prune_channels {
            Coupling::PassThrough
        } else {
            Coupling::Normalized
        }
    }
}
