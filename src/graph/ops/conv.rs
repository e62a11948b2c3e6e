//! 2-D convolution (dense, grouped and depthwise), PyTorch weight layout `[O, I/g, kh, kw]`.

use super::param::{BIAS, WEIGHT};
use super::{expect_inputs, Coupling, InitRule, OpSpec, ParamKind, ParamSpec};
use crate::graph::shape::{fmt_shape, window_out, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conv2d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Zero padding `[top, left, bottom, right]` (asymmetric allowed, as in ONNX).
    pub padding: [usize; 4],
    pub dilation: [usize; 2],
    pub groups: usize,
    pub bias: bool,
}

impl Conv2d {
    /// Square kernel with symmetric padding, stride and no dilation.
    pub fn new(cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Self {
        Conv2d {
            in_channels: cin,
            out_channels: cout,
            kernel: [k, k],
            stride: [stride, stride],
            padding: [pad, pad, pad, pad],
            dilation: [1, 1],
            groups: 1,
            bias: false,
        }
    }

    pub fn with_groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// True for depthwise convolution (one filter per input channel).
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.groups == self.out_channels
    }
}

impl OpSpec for Conv2d {
    fn kind(&self) -> &'static str {
        "Conv2d"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Conv2d", inputs, 1)?;
        let s = inputs[0];
        if s.len() != 3 {
            bail!("Conv2d needs a CxHxW input, got {}", fmt_shape(s));
        }
        if s[0] != self.in_channels {
            bail!(
                "Conv2d expects {} input channels, got {}",
                self.in_channels,
                s[0]
            );
        }
        let g = self.groups;
        if g == 0 || !self.in_channels.is_multiple_of(g) || !self.out_channels.is_multiple_of(g) {
            bail!(
                "Conv2d groups {g} must divide in ({}) and out ({}) channels",
                self.in_channels,
                self.out_channels
            );
        }
        let oh = window_out(
            s[1],
            self.kernel[0],
            self.stride[0],
            self.padding[0],
            self.padding[2],
            self.dilation[0],
            false,
        );
        let ow = window_out(
            s[2],
            self.kernel[1],
            self.stride[1],
            self.padding[1],
            self.padding[3],
            self.dilation[1],
            false,
        );
        match (oh, ow) {
            (Some(oh), Some(ow)) => Ok(vec![self.out_channels, oh, ow]),
            _ => bail!(
                "Conv2d kernel {:?} does not fit input {}",
                self.kernel,
                fmt_shape(s)
            ),
        }
    }

    fn params(&self) -> Vec<ParamSpec> {
        let fan_out = self.out_channels / self.groups.max(1) * self.kernel[0] * self.kernel[1];
        let mut p = vec![ParamSpec {
            name: WEIGHT,
            shape: vec![
                self.out_channels,
                self.in_channels / self.groups.max(1),
                self.kernel[0],
                self.kernel[1],
            ],
            kind: ParamKind::Trainable,
            init: InitRule::KaimingNormalFanOut { fan_out },
            out_axis: Some(0),
            in_axis: if self.groups == 1 { Some(1) } else { None },
        }];
        if self.bias {
            p.push(ParamSpec {
                name: BIAS,
                shape: vec![self.out_channels],
                kind: ParamKind::Trainable,
                init: InitRule::Zeros,
                out_axis: Some(0),
                in_axis: None,
            });
        }
        p
    }

    fn macs(&self, _inputs: &[&Shape], out: &Shape) -> u64 {
        let per_out = (self.in_channels / self.groups) * self.kernel[0] * self.kernel[1];
        (out.iter().product::<usize>() * per_out) as u64
    }

    fn coupling(&self) -> Coupling {
        if self.groups == 1 {
            Coupling::Decouple
        } else {
            Coupling::Grouped {
                groups: self.groups,
            }
        }
    }

    fn weight_matrix(&self) -> Option<(usize, usize)> {
        let g = self.groups.max(1);
        Some((
            self.out_channels,
            self.in_channels / g * self.kernel[0] * self.kernel[1],
        ))
    }
}
