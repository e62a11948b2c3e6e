//! RMSNorm written out (PyTorch's exporter decomposes `nn.RMSNorm` and LLaMA-style norms
//! alike): `x · 1/√(mean(x²) + ε)` as Pow → ReduceMean over the channel axis → Add ε →
//! Sqrt → Reciprocal → Mul (or Div by the root). The parts are carried as an [`Rms`] value
//! until the product with `x`, which becomes lopper's `LayerNorm` with `rms` set (γ = 1;
//! the usual `· weight` after it folds into γ). Any other use of a part is an error naming
//! the node.

use super::view::{self, View};
use super::{Ctx, Value};
use crate::graph::ops::{param, LayerNorm, Op};
use anyhow::{bail, Result};
use onnx_protobuf::NodeProto;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Stage {
    /// `x²`
    Square,
    /// `mean_c x²`
    MeanSquare,
    /// `mean_c x² + ε`
    PlusEps(f64),
    /// `√(mean_c x² + ε)`
    Root(f64),
    /// `1/√(mean_c x² + ε)`
    Inverse(f64),
}

#[derive(Clone, Debug)]
pub(crate) struct Rms {
    pub x: View,
    pub stage: Stage,
}

fn part(ctx: &Ctx, name: &str) -> Option<Rms> {
    match ctx.values.get(name) {
        Some(Value::Rms(r)) => Some((**r).clone()),
        _ => None,
    }
}

fn next(r: &Rms, stage: Stage) -> Value {
    Value::Rms(Box::new(Rms {
        x: r.x.clone(),
        stage,
    }))
}

/// The ONNX axis of `v` that is its node's channel axis: the last of a channel-last view,
/// axis 1 of a plain (channels-first) tensor.
fn channel_axis(ctx: &Ctx, v: &View) -> Option<usize> {
    let r = v.index.dims.len();
    if view::channel_last(ctx, v).is_some() {
        return Some(r - 1);
    }
    let plain = v.index.data.iter().enumerate().all(|(i, &e)| e == i as f64);
    let c = ctx.shape(v.node)[0];
    (plain && r >= 2 && v.index.dims[1] == c).then_some(1)
}

/// `Pow(x, 2)` of a computed tensor: the first part. Constants fold.
pub(super) fn pow(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    let Some(e) = ctx
        .konst(&n.input[1])
        .filter(|c| c.numel() == 1)
        .map(|c| c.data[0])
    else {
        bail!("Pow with a computed or non-scalar exponent is not supported");
    };
    if let Some(c) = ctx.konst(&n.input[0]) {
        return Ok(Value::Const(super::fold::map_n(&[c], |a| a[0].powf(e))?));
    }
    match ctx.view(&n.input[0]) {
        Some(x) if e == 2.0 && x.scale == 1.0 => Ok(Value::Rms(Box::new(Rms {
            x,
            stage: Stage::Square,
        }))),
        _ => bail!(
            "Pow of a computed tensor is supported as the x² of an RMSNorm, \
             x / √(mean(x²) + ε)"
        ),
    }
}

/// `ReduceMean(x², channel axis, keepdims)`: the mean square. `None`: not an RMSNorm part.
pub(super) fn reduce_mean(
    ctx: &Ctx,
    n: &NodeProto,
    axes: &[i64],
    keep: bool,
) -> Result<Option<Value>> {
    let Some(r) = part(ctx, &n.input[0]) else {
        return Ok(None);
    };
    let rank = r.x.index.dims.len() as i64;
    let ax: Vec<usize> = axes.iter().map(|&a| ((a + rank) % rank) as usize).collect();
    match (r.stage, channel_axis(ctx, &r.x)) {
        (Stage::Square, Some(c)) if ax == [c] && keep => Ok(Some(next(&r, Stage::MeanSquare))),
        _ => bail!(
            "a mean of x² over axes {axes:?}: lopper recognises RMSNorm over the channel \
             (embedding) axis with keepdims"
        ),
    }
}

/// `Sqrt` and `Reciprocal` of a part. `None`: not an RMSNorm part.
pub(super) fn unary(ctx: &mut Ctx, n: &NodeProto) -> Result<Option<Value>> {
    let Some(r) = part(ctx, &n.input[0]) else {
        return Ok(None);
    };
    match (n.op_type.as_str(), r.stage) {
        ("Sqrt", Stage::PlusEps(e)) => Ok(Some(next(&r, Stage::Root(e)))),
        ("Reciprocal", Stage::Root(e)) => Ok(Some(next(&r, Stage::Inverse(e)))),
        (op, s) => bail!("{op} of an RMSNorm part ({s:?}): lopper recognises x / √(mean(x²) + ε)"),
    }
}

/// `a op b` where one side is an RMSNorm part: the next part, or the norm itself.
/// `None` when neither input is a part.
pub(super) fn combine(
    ctx: &mut Ctx,
    label: &str,
    op: &str,
    a: &str,
    b: &str,
) -> Result<Option<Value>> {
    let (pa, pb) = (part(ctx, a), part(ctx, b));
    let (r, other, part_first) = match (pa, pb) {
        (Some(r), None) => (r, b, true),
        (None, Some(r)) => (r, a, false),
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => bail!("{op} of two RMSNorm parts"),
    };
    let k = ctx
        .konst(other)
        .filter(|c| c.numel() == 1)
        .map(|c| c.data[0]);
    let is_x = || {
        ctx.view(other)
            .is_some_and(|v| v.node == r.x.node && v.index == r.x.index && v.scale == r.x.scale)
    };
    match (op, r.stage) {
        ("Add", Stage::MeanSquare) if k.is_some_and(|e| e >= 0.0) => {
            Ok(Some(next(&r, Stage::PlusEps(k.unwrap_or(0.0)))))
        }
        ("Mul", Stage::Inverse(e)) if is_x() => norm(ctx, label, &r.x, e).map(Some),
        ("Div", Stage::Root(e)) if !part_first && is_x() => norm(ctx, label, &r.x, e).map(Some),
        _ => bail!(
            "{op} of an RMSNorm part ({:?}) with something else: lopper recognises \
             x / √(mean(x²) + ε)",
            r.stage
        ),
    }
}

/// The RMSNorm of `x` (γ = 1, β = 0), seen through `x`'s view.
fn norm(ctx: &mut Ctx, label: &str, x: &View, eps: f64) -> Result<Value> {
    let c = ctx.shape(x.node)[0];
    let mut op = LayerNorm::new(c);
    op.eps = eps;
    op.rms = true;
    let params = vec![
        (param::WEIGHT, super::tensor(vec![1.0; c], &[c])?),
        (param::BIAS, super::tensor(vec![0.0; c], &[c])?),
    ];
    let y = ctx.add(label, Op::LayerNorm(op), &[x.node], params)?;
    view::settle(ctx, label, x.on(y))
}
