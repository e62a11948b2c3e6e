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

/// A variadic element-wise op whose inputs broadcast and share one channel index space.
macro_rules! join_op {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        pub struct $name {}

        impl OpSpec for $name {
            fn kind(&self) -> &'static str {
                stringify!($name)
            }
            fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
                broadcast(stringify!($name), inputs)
            }
            fn coupling(&self) -> Coupling {
                Coupling::Join
            }
            fn arity(&self) -> Option<usize> {
                None
            }
        }
    };
}

join_op!(
    /// Element-wise sum (residual adds; ONNX `Add`, or `Sum` of more than two).
    Add
);
join_op!(
    /// Element-wise product (squeeze-excitation gates).
    Mul
);
join_op!(
    /// Element-wise maximum of two or more tensors (broadcast), ONNX `Max`.
    Max
);
join_op!(
    /// Element-wise minimum of two or more tensors (broadcast), ONNX `Min`.
    Min
);

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
