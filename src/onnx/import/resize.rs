//! `Resize` (opsets 10+) and `Upsample` (7–9) to the IR's [`Resize`]: nearest or linear on
//! the two spatial axes, scales or sizes as constants (folded shape arithmetic counts),
//! every coordinate transformation PyTorch and other exporters emit. Cubic, antialiasing
//! and crop-and-resize are refused by name.

use super::{Ctx, Value};
use crate::graph::ops::{CoordMode, Nearest, Op, Resize, ResizeMode, ResizeTarget};
use crate::onnx::attrs::Attrs;
use anyhow::{anyhow, bail, Result};
use onnx_protobuf::NodeProto;

/// The constant input `i`, if present (an empty name means absent).
fn input_const(ctx: &Ctx, n: &NodeProto, i: usize) -> Result<Option<Vec<f64>>> {
    match n.input.get(i).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(name) => ctx
            .konst(name)
            .map(|c| Some(c.data.clone()))
            .ok_or_else(|| {
                anyhow!("input '{name}' must be a constant (or foldable shape arithmetic)")
            }),
    }
}

fn mode(a: &Attrs, nearest_default: Nearest) -> Result<ResizeMode> {
    Ok(match a.string("mode", "nearest").as_str() {
        "nearest" => ResizeMode::Nearest(match a.string("nearest_mode", "").as_str() {
            "" => nearest_default,
            "round_prefer_floor" => Nearest::RoundPreferFloor,
            "round_prefer_ceil" => Nearest::RoundPreferCeil,
            "floor" => Nearest::Floor,
            "ceil" => Nearest::Ceil,
            other => bail!("nearest_mode '{other}' is not supported"),
        }),
        "linear" | "bilinear" => ResizeMode::Linear,
        other => bail!("Resize mode '{other}' is not supported (nearest, linear)"),
    })
}

/// `[N, C, H, W]` scales or sizes → the spatial target; batch and channels must stay.
fn target(
    ctx: &Ctx,
    x: usize,
    scales: Option<Vec<f64>>,
    sizes: Option<Vec<f64>>,
) -> Result<ResizeTarget> {
    let shape = &ctx.shapes[x];
    if shape.len() != 3 {
        bail!("Resize needs an NxCxHxW input, got per-sample shape {shape:?}");
    }
    match (sizes, scales) {
        (Some(s), _) if !s.is_empty() => {
            if s.len() != 4 || s[1] as usize != shape[0] {
                bail!("Resize sizes {s:?} must be [N, {}, H, W]", shape[0]);
            }
            Ok(ResizeTarget::Sizes {
                h: s[2] as usize,
                w: s[3] as usize,
            })
        }
        (_, Some(s)) if !s.is_empty() => {
            if s.len() != 4 || s[0] != 1.0 || s[1] != 1.0 {
                bail!("Resize scales {s:?} must be [1, 1, sh, sw] (only the spatial axes resize)");
            }
            if s[2] <= 0.0 || s[3] <= 0.0 || !s[2].is_finite() || !s[3].is_finite() {
                bail!("Resize scales {s:?} must be positive");
            }
            Ok(ResizeTarget::Scales { h: s[2], w: s[3] })
        }
        _ => bail!("Resize has neither scales nor sizes"),
    }
}

/// ONNX `Resize`: (X, scales) at opset 10, (X, roi, scales, sizes) from opset 11.
pub(super) fn resize(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&[
        "mode",
        "coordinate_transformation_mode",
        "nearest_mode",
        "cubic_coeff_a",
        "exclude_outside",
        "extrapolation_value",
        "antialias",
        "axes",
        "keep_aspect_ratio_policy",
    ])?;
    if a.int("exclude_outside", 0) != 0 || a.int("antialias", 0) != 0 {
        bail!("Resize with exclude_outside or antialias is not supported");
    }
    if a.string("keep_aspect_ratio_policy", "stretch") != "stretch" {
        bail!("Resize keep_aspect_ratio_policy other than 'stretch' is not supported");
    }
    if let Some(axes) = a.ints("axes") {
        let norm: Vec<i64> = axes
            .iter()
            .map(|&v| if v < 0 { v + 4 } else { v })
            .collect();
        if norm != [0, 1, 2, 3] {
            bail!("Resize over axes {axes:?} is not supported (all four axes)");
        }
    }
    let x = ctx.node(&n.input[0])?;
    let (scales, sizes) = if n.input.len() == 2 {
        (input_const(ctx, n, 1)?, None)
    } else {
        (input_const(ctx, n, 2)?, input_const(ctx, n, 3)?)
    };
    // Opset 10 has no coordinate attribute: its rule is the asymmetric one, with floor.
    let opset10 = n.input.len() == 2;
    let coord = match a
        .string(
            "coordinate_transformation_mode",
            if opset10 { "asymmetric" } else { "half_pixel" },
        )
        .as_str()
    {
        "half_pixel" => CoordMode::HalfPixel,
        "pytorch_half_pixel" => CoordMode::PytorchHalfPixel,
        "align_corners" => CoordMode::AlignCorners,
        "asymmetric" => CoordMode::Asymmetric,
        other => bail!("coordinate_transformation_mode '{other}' is not supported"),
    };
    let nearest = if opset10 {
        Nearest::Floor
    } else {
        Nearest::RoundPreferFloor
    };
    let op = Resize {
        mode: mode(&a, nearest)?,
        coord,
        target: target(ctx, x, scales, sizes)?,
    };
    ctx.unary(label, Op::Resize(op), x)
}

/// ONNX `Upsample` (deprecated): scales as attribute (opset 7) or input (9), asymmetric
/// coordinates, nearest rounding down.
pub(super) fn upsample(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["mode", "scales"])?;
    let x = ctx.node(&n.input[0])?;
    let scales = match input_const(ctx, n, 1)? {
        Some(s) => Some(s),
        None => a
            .floats("scales")
            .map(|v| v.iter().map(|&f| f as f64).collect()),
    };
    let op = Resize {
        mode: mode(&a, Nearest::Floor)?,
        coord: CoordMode::Asymmetric,
        target: target(ctx, x, scales, None)?,
    };
    ctx.unary(label, Op::Resize(op), x)
}
