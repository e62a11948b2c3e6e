//! Batch normalisation over axis 0 of the per-sample shape (BatchNorm1d on `[F]`,
//! BatchNorm2d on `[C, H, W]`).

use super::param::{BIAS, RUNNING_MEAN, RUNNING_VAR, WEIGHT};
use super::{expect_inputs, Coupling, InitRule, OpSpec, ParamKind, ParamSpec};
use crate::graph::shape::Shape;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNorm {
    pub num_features: usize,
    pub eps: f64,
    /// Running-statistics update factor (PyTorch convention: new = (1-m)·old + m·batch).
    pub momentum: f64,
}

impl BatchNorm {
    pub fn new(c: usize) -> Self {
        BatchNorm {
            num_features: c,
            eps: 1e-5,
            momentum: 0.1,
        }
    }
}

impl OpSpec for BatchNorm {
    fn kind(&self) -> &'static str {
        "BatchNorm"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("BatchNorm", inputs, 1)?;
        let s = inputs[0];
        if s.is_empty() || s[0] != self.num_features {
            bail!(
                "BatchNorm expects {} channels, got {:?}",
                self.num_features,
                s
            );
        }
        Ok(s.clone())
    }

    fn params(&self) -> Vec<ParamSpec> {
        let c = self.num_features;
        let mk = |name, kind, init| ParamSpec {
            name,
            shape: vec![c],
            kind,
            init,
            out_axis: Some(0),
            in_axis: None,
        };
        vec![
            mk(WEIGHT, ParamKind::Trainable, InitRule::Ones),
            mk(BIAS, ParamKind::Trainable, InitRule::Zeros),
            mk(RUNNING_MEAN, ParamKind::Buffer, InitRule::Zeros),
            mk(RUNNING_VAR, ParamKind::Buffer, InitRule::Ones),
        ]
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}
