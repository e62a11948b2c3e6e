//! Multi-input ops: element-wise add, mul, max and min (with broadcast, for
//! squeeze-excitation gates) and concatenation.

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

/// Element-wise maximum of two or more tensors (broadcast), ONNX `Max`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Max {}

impl OpSpec for Max {
    fn kind(&self) -> &'static str {
        "Max"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        broadcast("Max", inputs)
    }
    fn coupling(&self) -> Coupling {
        Coupling::Join
    }
    fn arity(&self) -> Option<usize> {
        None
    }
}

/// Element-wise minimum of two or more tensors (broadcast), ONNX `Min`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Min {}

impl OpSpec for Min {
    fn kind(&self) -> &'static str {
        "Min"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        broadcast("Min", inputs)
    }
    fn coupling(&self) -> Coupling {
        Coupling::Join
    }
    fn arity(&self) -> Option<usize> {
        None
    }
}

/// Concatenation along per-sample axis `axis`: 0 is the channel axis (channels laid end
/// to end); along any other axis (anchors of a detection head, say) every input keeps the
/// same channels, which are then one index space.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Concat {
    #[serde(default)]
    pub axis: usize,
}

impl OpSpec for Concat {
    fn kind(&self) -> &'static str {
        "Concat"
    }
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        if inputs.is_empty() {
            bail!("Concat takes at least one input");
        }
        let first = inputs[0];
        let a = self.axis;
        if a >= first.len() {
            bail!(
                "Concat along per-sample axis {a} of a rank-{} input {}",
                first.len(),
                fmt_shape(first)
            );
        }
        let mut out = first.clone();
        out[a] = 0;
        for s in inputs {
            let differs = s.len() != first.len()
                || s.iter()
                    .zip(first.iter())
                    .enumerate()
                    .any(|(k, (x, y))| k != a && x != y);
            if differs {
                bail!(
                    "Concat inputs {} and {} differ beyond the concatenated axis {a}",
                    fmt_shape(first),
                    fmt_shape(s)
                );
            }
            out[a] += s[a];
        }
        Ok(out)
    }
    fn coupling(&self) -> Coupling {
        if self.axis == 0 {
            Coupling::Concat { lead: 0 }
        } else {
            Coupling::Join
        }
    }
    fn arity(&self) -> Option<usize> {
        None
    }
}
