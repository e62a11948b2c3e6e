//! Element-wise activations. They pass channels through and cost no MACs.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::Shape;
use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum ActivationKind {
    Relu,
    Relu6,
    LeakyRelu { slope: f32 },
    Gelu,
    Silu,
    Sigmoid,
    HardSigmoid,
    HardSwish,
    Tanh,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    pub kind: ActivationKind,
}

impl Activation {
    pub fn new(kind: ActivationKind) -> Self {
        Activation { kind }
    }
}

impl OpSpec for Activation {
    fn kind(&self) -> &'static str {
        match self.kind {
            ActivationKind::Relu => "ReLU",
            ActivationKind::Relu6 => "ReLU6",
            ActivationKind::LeakyRelu { .. } => "LeakyReLU",
            ActivationKind::Gelu => "GELU",
            ActivationKind::Silu => "SiLU",
            ActivationKind::Sigmoid => "Sigmoid",
            ActivationKind::HardSigmoid => "HardSigmoid",
            ActivationKind::HardSwish => "HardSwish",
            ActivationKind::Tanh => "Tanh",
        }
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs(self.kind(), inputs, 1)?;
        Ok(inputs[0].clone())
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}
