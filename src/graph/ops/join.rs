//! Multi-input ops: element-wise add and mul (with broadcast, for squeeze-excitation gates)
//! and channel concatenation.

use super::{Coupling, OpSpec};
use crate::graph::shape::{fmt_shape, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Broadcast of per-sample shapes, numpy rules, right-aligned.
pub(crate) fn broadcast(kind: &str, inputs: &[&Shape]) -> Result<Shape> {
    if inputs.len() < 2 {
        bail!("{kind} takes at least 2 inputs, got {}", inputs.len());
    }
    let rank = inputs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in inputs {
        let off = rank - s.len();
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[off + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                let shapes: Vec<String> = inputs.iter().map(|s| fmt_shape(s)).collect();
                bail!("{kind}: shapes {} do not broadcast", shapes.join(", "));
            }
        }
    }
    Ok(out)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Add {}

impl OpSpec for Add {
    fn kind(&self) -> &'static str {
        "Add"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        broadcast("Add", inputs)
    }
    fn coupling(&self) -> Coupling {
        Coupling::Join
    }
    fn arity(&self) -> Option<usize> {
        None
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Mul {}

impl OpSpec for Mul {
    fn kind(&self) -> &'static str {
        "Mul"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        broadcast("Mul", inputs)
    }
    fn coupling(&self) -> Coupling {
        Coupling::Join
    }
    fn arity(&self) -> Option<usize> {
        None
    }
}

/// Concatenation along the channel axis (axis 0 of the per-sample shape).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Concat {}

impl OpSpec for Concat {
    fn kind(&self) -> &'static str {
        "Concat"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        if inputs.is_empty() {
            bail!("Concat takes at least one input");
        }
        let first = inputs[0];
        let mut out = first.clone();
        out[0] = 0;
        for s in inputs {
            if s.len() != first.len() || s[1..] != first[1..] {
                bail!(
                    "Concat inputs {} and {} differ beyond the channel axis",
                    fmt_shape(first),
                    fmt_shape(s)
                );
            }
            out[0] += s[0];
        }
        Ok(out)
    }
    fn coupling(&self) -> Coupling {
        Coupling::Concat { lead: 0 }
    }
    fn arity(&self) -> Option<usize> {
        None
    }
}
