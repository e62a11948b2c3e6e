//! Channel gather: output channel `c` is input channel `indices[c]`. One op covers what
//! imported graphs do with channels without arithmetic — Split and Slice (contiguous
//! ranges), channel shuffles (permutations) and Gather on the channel axis — and keeps
//! them prunable: each output channel is the same unit as the input channel it reads.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::Shape;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelGather {
    pub in_channels: usize,
    pub indices: Vec<usize>,
}

impl OpSpec for ChannelGather {
    fn kind(&self) -> &'static str {
        "ChannelGather"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("ChannelGather", inputs, 1)?;
        let s = inputs[0];
        if s.is_empty() || s[0] != self.in_channels {
            bail!(
                "ChannelGather expects {} channels, got {:?}",
                self.in_channels,
                s
            );
        }
        if self.indices.is_empty() || self.indices.iter().any(|&i| i >= self.in_channels) {
            bail!(
                "ChannelGather indices must be non-empty and below {}",
                self.in_channels
            );
        }
        let mut out = s.clone();
        out[0] = self.indices.len();
        Ok(out)
    }

    fn coupling(&self) -> Coupling {
        Coupling::Gather {
            indices: self.indices.clone(),
        }
    }
}
