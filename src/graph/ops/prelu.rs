//! PReLU, `y = max(x, 0) + slope[c]·min(x, 0)`: an activation with a learned slope per
//! channel (face detectors, some super-resolution nets). Channels pass through, and the
//! slope is sliced with its channel when the group is pruned.

use super::param::WEIGHT;
use super::{expect_inputs, Coupling, InitRule, OpSpec, ParamKind, ParamSpec};
use crate::graph::shape::Shape;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PRelu {
    pub channels: usize,
}

impl OpSpec for PRelu {
    fn kind(&self) -> &'static str {
        "PReLU"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("PReLU", inputs, 1)?;
        let s = inputs[0];
        if s.is_empty() || s[0] != self.channels {
            bail!("PReLU expects {} channels, got {:?}", self.channels, s);
        }
        Ok(s.clone())
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: WEIGHT,
            shape: vec![self.channels],
            kind: ParamKind::Trainable,
            // PyTorch's default slope.
            init: InitRule::Constant { value: 0.25 },
            out_axis: Some(0),
            in_axis: None,
        }]
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}
