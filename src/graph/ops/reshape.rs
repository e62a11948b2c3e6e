//! Flatten, reshape and transpose. Flatten keeps channel blocks contiguous (C, H, W order), which is
//! what lets the pruning engine map a channel to its block of linear-layer features.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::{fmt_shape, numel, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Flatten {}

impl OpSpec for Flatten {
    fn kind(&self) -> &'static str {
        "Flatten"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Flatten", inputs, 1)?;
        Ok(vec![numel(inputs[0])])
    }

    fn coupling(&self) -> Coupling {
        Coupling::Flatten
    }
}

/// Reshape to a per-sample target shape; one entry may be `-1` (inferred).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reshape {
    pub shape: Vec<i64>,
}

impl Reshape {
    /// Resolves `-1` against an input element count.
    pub fn resolve(&self, numel_in: usize) -> Result<Shape> {
        let known: i64 = self.shape.iter().filter(|&&d| d != -1).product();
        let unknown = self.shape.iter().filter(|&&d| d == -1).count();
        if unknown > 1 || self.shape.iter().any(|&d| d == 0 || d < -1) {
            bail!("Reshape target {:?} is invalid", self.shape);
        }
        let mut out: Vec<usize> = Vec::with_capacity(self.shape.len());
        for &d in &self.shape {
            if d == -1 {
                if known == 0 || numel_in as i64 % known != 0 {
                    bail!("Reshape {:?} cannot take {} elements", self.shape, numel_in);
                }
                out.push((numel_in as i64 / known) as usize);
            } else {
                out.push(d as usize);
            }
        }
        if numel(&out) != numel_in {
            bail!(
                "Reshape to {} needs {} elements, input has {}",
                fmt_shape(&out),
                numel(&out),
                numel_in
            );
        }
        Ok(out)
    }
}

impl OpSpec for Reshape {
    fn kind(&self) -> &'static str {
        "Reshape"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Reshape", inputs, 1)?;
        self.resolve(numel(inputs[0]))
    }

    fn coupling(&self) -> Coupling {
        Coupling::Reshape
    }
}

/// A data-moving transpose of the per-sample axes (the batch stays first): output axis
/// `k` is input axis `perm[k]`. Detection heads use it to put anchors before classes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transpose {
    pub perm: Vec<usize>,
}

impl OpSpec for Transpose {
    fn kind(&self) -> &'static str {
        "Transpose"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Transpose", inputs, 1)?;
        let s = inputs[0];
        let mut sorted = self.perm.clone();
        sorted.sort_unstable();
        if sorted != (0..s.len()).collect::<Vec<_>>() {
            bail!(
                "Transpose perm {:?} is not a permutation of the {} per-sample axes of {}",
                self.perm,
                s.len(),
                fmt_shape(s)
            );
        }
        Ok(self.perm.iter().map(|&p| s[p]).collect())
    }

    fn coupling(&self) -> Coupling {
        // Channels stay channels only if axis 0 stays first; otherwise they are spread
        // over another axis and cannot be followed.
        if self.perm.first() == Some(&0) {
            Coupling::PassThrough
        } else {
            Coupling::Opaque
        }
    }
}
