//! Graph input and shape-preserving ops: dropout, softmax, identity.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::Shape;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// The graph's input; `shape` is per sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub shape: Shape,
}

impl OpSpec for Input {
    fn kind(&self) -> &'static str {
        "Input"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Input", inputs, 0)?;
        Ok(self.shape.clone())
    }
    fn coupling(&self) -> Coupling {
        Coupling::Source
    }
    fn arity(&self) -> Option<usize> {
        Some(0)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dropout {
    pub p: f32,
}

impl OpSpec for Dropout {
    fn kind(&self) -> &'static str {
        "Dropout"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Dropout", inputs, 1)?;
        if !(0.0..1.0).contains(&self.p) {
            anyhow::bail!("Dropout p = {} must be in [0, 1)", self.p);
        }
        Ok(inputs[0].clone())
    }
    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}

/// Softmax over per-sample axis `axis`: 0 is the class axis of a classifier (channels); a
/// detection head normalises over its last axis.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Softmax {
    #[serde(default)]
    pub axis: usize,
}

impl OpSpec for Softmax {
    fn kind(&self) -> &'static str {
        "Softmax"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Softmax", inputs, 1)?;
        if self.axis >= inputs[0].len() {
            anyhow::bail!(
                "Softmax over per-sample axis {} of a rank-{} input",
                self.axis,
                inputs[0].len()
            );
        }
        Ok(inputs[0].clone())
    }
    fn coupling(&self) -> Coupling {
        if self.axis == 0 {
            // Normalises across channels: removing one changes all others.
            Coupling::Opaque
        } else {
            Coupling::PassThrough
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Identity {}

impl OpSpec for Identity {
    fn kind(&self) -> &'static str {
        "Identity"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Identity", inputs, 1)?;
        Ok(inputs[0].clone())
    }
    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}
