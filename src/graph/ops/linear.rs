//! Fully connected layer, PyTorch weight layout `[out, in]`.

use super::param::{BIAS, WEIGHT};
use super::{expect_inputs, Coupling, InitRule, OpSpec, ParamKind, ParamSpec};
use crate::graph::shape::{fmt_shape, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

impl Linear {
    pub fn new(i: usize, o: usize) -> Self {
        Linear {
            in_features: i,
            out_features: o,
            bias: true,
        }
    }
}

impl OpSpec for Linear {
    fn kind(&self) -> &'static str {
        "Linear"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Linear", inputs, 1)?;
        let s = inputs[0];
        if s.len() != 1 || s[0] != self.in_features {
            bail!(
                "Linear expects a vector of {} features, got {}",
                self.in_features,
                fmt_shape(s)
            );
        }
        Ok(vec![self.out_features])
    }

    fn params(&self) -> Vec<ParamSpec> {
        let init = InitRule::Uniform {
            bound: 1.0 / (self.in_features as f64).sqrt(),
        };
        let mut p = vec![ParamSpec {
            name: WEIGHT,
            shape: vec![self.out_features, self.in_features],
            kind: ParamKind::Trainable,
            init,
            out_axis: Some(0),
            in_axis: Some(1),
        }];
        if self.bias {
            p.push(ParamSpec {
                name: BIAS,
                shape: vec![self.out_features],
                kind: ParamKind::Trainable,
                init,
                out_axis: Some(0),
                in_axis: None,
            });
        }
        p
    }

    fn macs(&self, _inputs: &[&Shape], _out: &Shape) -> u64 {
        (self.in_features * self.out_features) as u64
    }

    fn coupling(&self) -> Coupling {
        Coupling::Decouple
    }

    fn weight_matrix(&self) -> Option<(usize, usize)> {
        Some((self.out_features, self.in_features))
    }
}
