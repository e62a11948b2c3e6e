//! 2-D transposed convolution (the learned upsampling of UNet/FCN decoders), PyTorch weight
//! layout `[I, O/g, kh, kw]`: the output channel axis of the weight is axis 1, so pruning
//! slices axis 1 with the output channels and axis 0 with the input's.

use super::param::{BIAS, WEIGHT};
use super::{expect_inputs, Coupling, InitRule, OpSpec, ParamKind, ParamSpec};
use crate::graph::shape::{fmt_shape, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvTranspose2d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Padding removed from the full output `[top, left, bottom, right]` (ONNX `pads`).
    pub padding: [usize; 4],
    /// Extra rows/columns added at the bottom/right (ONNX `output_padding`).
    pub output_padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
    pub bias: bool,
}

impl ConvTranspose2d {
    /// Output length along one axis: `(in − 1)·s − pads + d·(k − 1) + output_padding + 1`.
    pub fn out_len(&self, axis: usize, len: usize) -> Option<usize> {
        let full = (len.checked_sub(1)?) * self.stride[axis]
            + self.dilation[axis] * (self.kernel[axis] - 1)
            + self.output_padding[axis]
            + 1;
        full.checked_sub(self.padding[axis] + self.padding[axis + 2])
            .filter(|&n| n > 0)
    }
}

impl OpSpec for ConvTranspose2d {
    fn kind(&self) -> &'static str {
        "ConvTranspose2d"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("ConvTranspose2d", inputs, 1)?;
        let s = inputs[0];
        if s.len() != 3 || s[0] != self.in_channels {
            bail!(
                "ConvTranspose2d expects a {}xHxW input, got {}",
                self.in_channels,
                fmt_shape(s)
            );
        }
        let g = self.groups;
        if g == 0 || !self.in_channels.is_multiple_of(g) || !self.out_channels.is_multiple_of(g) {
            bail!(
                "ConvTranspose2d groups {g} must divide in ({}) and out ({}) channels",
                self.in_channels,
                self.out_channels
            );
        }
        if self.kernel.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            bail!("ConvTranspose2d kernel, stride and dilation must be positive");
        }
        if self.output_padding[0] >= self.stride[0].max(self.dilation[0])
            || self.output_padding[1] >= self.stride[1].max(self.dilation[1])
        {
            bail!(
                "ConvTranspose2d output_padding {:?} must be smaller than the stride or dilation",
                self.output_padding
            );
        }
        match (self.out_len(0, s[1]), self.out_len(1, s[2])) {
            (Some(oh), Some(ow)) => Ok(vec![self.out_channels, oh, ow]),
            _ => bail!(
                "ConvTranspose2d pads {:?} remove the whole output of input {}",
                self.padding,
                fmt_shape(s)
            ),
        }
    }

    fn params(&self) -> Vec<ParamSpec> {
        let g = self.groups.max(1);
        // PyTorch's default: kaiming-uniform(a=√5), i.e. U(±1/√fan_in) with fan_in taken
        // from the weight's axis 1 (output channels per group) × kernel.
        let fan_in = self.out_channels / g * self.kernel[0] * self.kernel[1];
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let dense = self.groups == 1;
        let mut p = vec![ParamSpec {
            name: WEIGHT,
            shape: vec![
                self.in_channels,
                self.out_channels / g,
                self.kernel[0],
                self.kernel[1],
            ],
            kind: ParamKind::Trainable,
            init: InitRule::Uniform { bound },
            out_axis: dense.then_some(1),
            in_axis: dense.then_some(0),
        }];
        if self.bias {
            p.push(ParamSpec {
                name: BIAS,
                shape: vec![self.out_channels],
                kind: ParamKind::Trainable,
                init: InitRule::Uniform { bound },
                out_axis: Some(0),
                in_axis: None,
            });
        }
        p
    }

    fn macs(&self, inputs: &[&Shape], _out: &Shape) -> u64 {
        // Every input pixel scatters a (O/g)·kh·kw block per input channel.
        let s = inputs[0];
        let per_in = self.out_channels / self.groups.max(1) * self.kernel[0] * self.kernel[1];
        (s.iter().product::<usize>() * per_in) as u64
    }

    fn coupling(&self) -> Coupling {
        if self.groups == 1 {
            Coupling::Decouple
        } else {
            // Grouped transposed convs are rare; their channels stay.
            Coupling::Opaque
        }
    }
}
