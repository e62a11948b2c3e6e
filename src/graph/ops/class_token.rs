//! ViT's class token, in channels-first form: [`ClassToken`] lays a learned `[D]` token
//! before the positions of `[D, P…]` (flattened, so the output is `[D, 1 + ΠP, 1]`), and
//! [`TokenSelect`] takes one token back out as a `[D]` vector for the classifier (the class
//! token at index 0). Both pass channels through, so the embedding group slices the token.

use super::param::WEIGHT;
use super::{expect_inputs, Coupling, InitRule, OpSpec, ParamKind, ParamSpec};
use crate::graph::shape::{fmt_shape, numel, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassToken {
    pub channels: usize,
}

impl OpSpec for ClassToken {
    fn kind(&self) -> &'static str {
        "ClassToken"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("ClassToken", inputs, 1)?;
        let s = inputs[0];
        if s.len() < 2 || s[0] != self.channels {
            bail!(
                "ClassToken of {} channels got input {} (needs [C, positions…])",
                self.channels,
                fmt_shape(s)
            );
        }
        Ok(vec![s[0], 1 + numel(&s[1..]), 1])
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: WEIGHT,
            shape: vec![self.channels],
            kind: ParamKind::Trainable,
            init: InitRule::Zeros,
            out_axis: Some(0),
            in_axis: None,
        }]
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenSelect {
    pub index: usize,
}

impl OpSpec for TokenSelect {
    fn kind(&self) -> &'static str {
        "TokenSelect"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("TokenSelect", inputs, 1)?;
        let s = inputs[0];
        if s.len() < 2 || self.index >= numel(&s[1..]) {
            bail!(
                "TokenSelect of token {} from input {} (needs [C, positions…] with more positions)",
                self.index,
                fmt_shape(s)
            );
        }
        Ok(vec![s[0]])
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}
