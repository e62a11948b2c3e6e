//! Max and average pooling with padding, and global average pooling.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::{fmt_shape, window_out, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Windowed pooling; the variant (`Op::MaxPool` / `Op::AvgPool`) decides the reduction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pool2d {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub padding: [usize; 4],
    pub ceil_mode: bool,
    /// Average pooling only: divide by the full window including padding (PyTorch default).
    pub count_include_pad: bool,
}

impl Pool2d {
    pub fn new(k: usize, stride: usize, pad: usize) -> Self {
        Pool2d {
            kernel: [k, k],
            stride: [stride, stride],
            padding: [pad; 4],
            ceil_mode: false,
            count_include_pad: true,
        }
    }
}

impl OpSpec for Pool2d {
    fn kind(&self) -> &'static str {
        "Pool2d"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Pool", inputs, 1)?;
        let s = inputs[0];
        if s.len() != 3 {
            bail!("pooling needs a CxHxW input, got {}", fmt_shape(s));
        }
        let oh = window_out(
            s[1],
            self.kernel[0],
            self.stride[0],
            self.padding[0],
            self.padding[2],
            1,
            self.ceil_mode,
        );
        let ow = window_out(
            s[2],
            self.kernel[1],
            self.stride[1],
            self.padding[1],
            self.padding[3],
            1,
            self.ceil_mode,
        );
        match (oh, ow) {
            (Some(oh), Some(ow)) => Ok(vec![s[0], oh, ow]),
            _ => bail!(
                "pool kernel {:?} does not fit input {}",
                self.kernel,
                fmt_shape(s)
            ),
        }
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}

/// Mean over all spatial positions: `[C, H, W] -> [C, 1, 1]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GlobalAvgPool {}

impl OpSpec for GlobalAvgPool {
    fn kind(&self) -> &'static str {
        "GlobalAvgPool"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("GlobalAvgPool", inputs, 1)?;
        let s = inputs[0];
        if s.len() != 3 {
            bail!("GlobalAvgPool needs a CxHxW input, got {}", fmt_shape(s));
        }
        Ok(vec![s[0], 1, 1])
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}
