//! Zero padding of the channel axis: `[C, ...] -> [before + C + after, ...]`.
//! Needed for the parameter-free "option A" shortcut of CIFAR ResNets (subsample, then
//! pad channels with zeros), which is what the published 0.85 M / 125.49 M figures count.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::Shape;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelPad {
    pub before: usize,
    pub after: usize,
}

impl OpSpec for ChannelPad {
    fn kind(&self) -> &'static str {
        "ChannelPad"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("ChannelPad", inputs, 1)?;
        let mut s = inputs[0].clone();
        if s.is_empty() {
            bail!("ChannelPad needs a channel axis");
        }
        s[0] += self.before + self.after;
        Ok(s)
    }

    fn coupling(&self) -> Coupling {
        // Input channel c is output channel before + c; the padded channels are constant zero.
        Coupling::Concat { lead: self.before }
    }
}
