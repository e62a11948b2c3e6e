//! Element-wise activations. They pass channels through and cost no MACs.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::Shape;
use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum ActivationKind {
    Relu,
    Relu6,
    LeakyRelu {
        slope: f32,
    },
    Gelu,
    Silu,
    Sigmoid,
    /// PyTorch's hard sigmoid, `clamp(x/6 + 1/2, 0, 1)`.
    HardSigmoid,
    HardSwish,
    Tanh,
    /// `clamp(alpha·x + beta, 0, 1)` with other constants (ONNX's default is 0.2, 0.5).
    HardSigmoidWith {
        alpha: f32,
        beta: f32,
    },
    /// `clamp(x, lo, hi)` for bounds other than ReLU's and ReLU6's.
    Clip {
        lo: f32,
        hi: f32,
    },
    /// `x` for x > 0, `alpha·(eˣ − 1)` otherwise.
    Elu {
        alpha: f32,
    },
    /// `gamma·x` for x > 0, `gamma·alpha·(eˣ − 1)` otherwise.
    Selu {
        alpha: f32,
        gamma: f32,
    },
    /// `ln(1 + eˣ)`.
    Softplus,
    /// `x·tanh(ln(1 + eˣ))`.
    Mish,
    /// GELU with the tanh approximation.
    GeluTanh,
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
            ActivationKind::HardSigmoidWith { .. } => "HardSigmoid",
            ActivationKind::Clip { .. } => "Clip",
            ActivationKind::Elu { .. } => "ELU",
            ActivationKind::Selu { .. } => "SELU",
            ActivationKind::Softplus => "Softplus",
            ActivationKind::Mish => "Mish",
            ActivationKind::GeluTanh => "GELU-tanh",
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
