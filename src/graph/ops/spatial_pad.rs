//! Padding of the two spatial axes: constant (any value), reflect or edge — what
//! `ReflectionPad2d`/`ReplicationPad2d` and explicit `Pad` nodes before convolutions
//! (TensorFlow-style "same" strides) export to. Channels pass through.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::{fmt_shape, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum PadMode {
    Constant {
        value: f32,
    },
    /// Mirror without repeating the border (`dcb|abcd|cba`).
    Reflect,
    /// Repeat the border (`aaa|abcd|ddd`).
    Edge,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpatialPad {
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    pub mode: PadMode,
}

impl OpSpec for SpatialPad {
    fn kind(&self) -> &'static str {
        "SpatialPad"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("SpatialPad", inputs, 1)?;
        let s = inputs[0];
        if s.len() != 3 {
            bail!("SpatialPad needs a CxHxW input, got {}", fmt_shape(s));
        }
        let [t, l, b, r] = self.pads;
        if self.mode == PadMode::Reflect && (t.max(b) >= s[1] || l.max(r) >= s[2]) {
            bail!(
                "reflect padding {:?} needs pads smaller than the input {}",
                self.pads,
                fmt_shape(s)
            );
        }
        Ok(vec![s[0], s[1] + t + b, s[2] + l + r])
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}
