//! Spatial resize (ONNX `Resize` / `Upsample`): nearest or bilinear, with ONNX's
//! coordinate transformations, to a fixed size or by a scale factor. What segmentation
//! decoders and FPN/UNet-style necks use. Channels pass through.
//!
//! Both modes are separable: along each spatial axis the output is a fixed linear map of
//! the input (`out[o] = Σᵢ A[o][i]·in[i]`), so the op is `A_h · X · A_wᵀ`. [`Resize::matrix`]
//! states `A` from the op's rule; the executor multiplies by it, and the gradient is the
//! transposed map for free.

use super::{expect_inputs, Coupling, OpSpec};
use crate::graph::shape::{fmt_shape, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How output coordinates map back to input coordinates (ONNX names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordMode {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
}

/// Rounding of the source coordinate in nearest mode (ONNX `nearest_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Nearest {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResizeMode {
    Nearest(Nearest),
    Linear,
}

/// The output size: fixed, or `floor(input · scale)` (which follows a resolution change).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum ResizeTarget {
    Sizes { h: usize, w: usize },
    Scales { h: f64, w: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resize {
    pub mode: ResizeMode,
    pub coord: CoordMode,
    pub target: ResizeTarget,
}

impl Resize {
    /// Output (h, w) for an input of (h, w).
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        match self.target {
            ResizeTarget::Sizes { h: oh, w: ow } => (oh, ow),
            ResizeTarget::Scales { h: sh, w: sw } => (
                (h as f64 * sh).floor() as usize,
                (w as f64 * sw).floor() as usize,
            ),
        }
    }

    /// The scale ONNX uses in the coordinate transform along one axis: the given scale,
    /// or `out / in` for a fixed size.
    fn scale(&self, axis_h: bool, inp: usize, out: usize) -> f64 {
        match self.target {
            ResizeTarget::Scales { h, w } => {
                if axis_h {
                    h
                } else {
                    w
                }
            }
            ResizeTarget::Sizes { .. } => out as f64 / inp as f64,
        }
    }

    /// The `out × inp` interpolation matrix along one spatial axis (row-major).
    pub fn matrix(&self, axis_h: bool, inp: usize, out: usize) -> Vec<f32> {
        let s = self.scale(axis_h, inp, out);
        let mut a = vec![0f32; out * inp];
        for o in 0..out {
            let x = match self.coord {
                CoordMode::HalfPixel => (o as f64 + 0.5) / s - 0.5,
                CoordMode::PytorchHalfPixel if out > 1 => (o as f64 + 0.5) / s - 0.5,
                CoordMode::PytorchHalfPixel => 0.0,
                CoordMode::AlignCorners if out > 1 => {
                    o as f64 * (inp as f64 - 1.0) / (out as f64 - 1.0)
                }
                CoordMode::AlignCorners => 0.0,
                CoordMode::Asymmetric => o as f64 / s,
            };
            let last = inp as f64 - 1.0;
            let row = &mut a[o * inp..(o + 1) * inp];
            match self.mode {
                ResizeMode::Nearest(r) => {
                    let i = match r {
                        Nearest::RoundPreferFloor => (x - 0.5).ceil(),
                        Nearest::RoundPreferCeil => (x + 0.5).floor(),
                        Nearest::Floor => x.floor(),
                        Nearest::Ceil => x.ceil(),
                    };
                    row[i.clamp(0.0, last) as usize] = 1.0;
                }
                ResizeMode::Linear => {
                    let x = x.clamp(0.0, last);
                    let i0 = x.floor();
                    let i1 = (i0 + 1.0).min(last);
                    let f = (x - i0) as f32;
                    row[i0 as usize] += 1.0 - f;
                    row[i1 as usize] += f;
                }
            }
        }
        a
    }
}

impl OpSpec for Resize {
    fn kind(&self) -> &'static str {
        "Resize"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("Resize", inputs, 1)?;
        let s = inputs[0];
        if s.len() != 3 {
            bail!("Resize needs a CxHxW input, got {}", fmt_shape(s));
        }
        let (oh, ow) = self.out_size(s[1], s[2]);
        if oh == 0 || ow == 0 {
            bail!("Resize of {} gives an empty {oh}x{ow} output", fmt_shape(s));
        }
        Ok(vec![s[0], oh, ow])
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}
