//! Per-channel affine `y = x·weight[c] + bias[c]`: what an imported graph's Add/Sub/Mul/Div
//! by a constant becomes (e.g. the bias adds of ONNX exports that keep conv bias separate,
//! or input scaling). Channels pass through, so it is sliced with its group.

use super::{expect_inputs, per_channel_affine, Coupling, OpSpec, ParamSpec};
use crate::graph::shape::Shape;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelAffine {
    pub channels: usize,
}

impl OpSpec for ChannelAffine {
    fn kind(&self) -> &'static str {
        "ChannelAffine"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("ChannelAffine", inputs, 1)?;
        let s = inputs[0];
        if s.is_empty() || s[0] != self.channels {
            bail!(
                "ChannelAffine expects {} channels, got {:?}",
                self.channels,
                s
            );
        }
        Ok(s.clone())
    }

    fn params(&self) -> Vec<ParamSpec> {
        per_channel_affine(self.channels)
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}
