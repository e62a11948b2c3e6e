//! GELU written out with `Erf` (opsets before 20 have no Gelu op): PyTorch's TorchScript
//! exporter, lopper's own export and most BERT exports write `x · ½ · (1 + erf(x / √2))`
//! as Div → Erf → Add → Mul → Mul, in one of a few orders. The parts are carried as a
//! [`Gelu`] value until the last product, which becomes one GELU activation of `x`; any
//! other use of a part is an error naming the node (lopper has no Erf kernel).

use super::view::{self, View};
use super::{Ctx, Value};
use crate::graph::ops::{param, Activation, ActivationKind, Op};
use anyhow::{bail, Result};
use onnx_protobuf::NodeProto;

/// How much of `x · ½ · (1 + erf(x / √2))` has been seen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Stage {
    /// `erf(x / √2)`
    Erf,
    /// `1 + erf(x / √2)`
    OnePlusErf,
    /// `½ · (1 + erf(x / √2))`
    HalfOnePlusErf,
    /// `x · (1 + erf(x / √2))`
    XOnePlusErf,
}

#[derive(Clone, Debug)]
pub(crate) struct Gelu {
    /// The GELU's input: a node or a view.
    pub x: Value,
    pub stage: Stage,
}

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;

fn near(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// `y` as `k · x` for a node or view `x` of the scalar `k`: a view's pending scale or a
/// channel affine with one weight and no bias.
fn scaled(ctx: &Ctx, y: &Value) -> Option<(Value, f64)> {
    match y {
        Value::View(v) => Some((
            Value::View(View {
                scale: 1.0,
                ..v.clone()
            }),
            v.scale,
        )),
        Value::Node(n) => {
            if !matches!(ctx.op(*n), Op::ChannelAffine(_)) {
                return Some((y.clone(), 1.0));
            }
            let w = ctx.param(*n, param::WEIGHT).ok()?;
            let b = ctx.param(*n, param::BIAS).ok()?;
            let k = *w.first()?;
            if w.iter().all(|&v| v == k) && b.iter().all(|&v| v == 0.0) {
                Some((Value::Node(ctx.first_input(*n)), k as f64))
            } else {
                Some((y.clone(), 1.0))
            }
        }
        _ => None,
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Node(x), Value::Node(y)) => x == y,
        (Value::View(x), Value::View(y)) => {
            x.node == y.node && x.scale == y.scale && x.index == y.index
        }
        _ => false,
    }
}

/// `Erf`: folded on a constant; of `x / √2`, the first part of a GELU.
pub(super) fn erf(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    if ctx.konst(&n.input[0]).is_some() {
        return super::fold::unary(ctx, n, label);
    }
    let y = ctx.value(&n.input[0])?.clone();
    match scaled(ctx, &y) {
        Some((x, k)) if near(k, FRAC_1_SQRT_2) => Ok(Value::Gelu(Box::new(Gelu {
            x,
            stage: Stage::Erf,
        }))),
        _ => bail!(
            "Erf of a computed tensor is supported as part of GELU, x·½·(1 + erf(x/√2)); \
             here its input is not x/√2"
        ),
    }
}

/// `a op b` where one side is a GELU part: the next part, or the GELU itself.
/// `None` when neither input is a part.
pub(super) fn combine(
    ctx: &mut Ctx,
    label: &str,
    op: &str,
    a: &str,
    b: &str,
) -> Result<Option<Value>> {
    let (va, vb) = (ctx.value(a)?.clone(), ctx.value(b)?.clone());
    let (g, other) = match (&va, &vb) {
        (Value::Gelu(g), o) | (o, Value::Gelu(g)) => ((**g).clone(), o.clone()),
        _ => return Ok(None),
    };
    let k = match &other {
        Value::Const(c) if c.numel() == 1 => Some(c.data[0]),
        _ => None,
    };
    let next = |stage| {
        Ok(Some(Value::Gelu(Box::new(Gelu {
            x: g.x.clone(),
            stage,
        }))))
    };
    let is_x_times =
        |m: f64| scaled(ctx, &other).is_some_and(|(x, s)| same(&x, &g.x) && near(s, m));
    match (op, g.stage) {
        ("Add", Stage::Erf) if k.is_some_and(|k| near(k, 1.0)) => next(Stage::OnePlusErf),
        ("Mul", Stage::OnePlusErf) if k.is_some_and(|k| near(k, 0.5)) => {
            next(Stage::HalfOnePlusErf)
        }
        ("Mul", Stage::OnePlusErf) if is_x_times(1.0) => next(Stage::XOnePlusErf),
        ("Mul", Stage::OnePlusErf) if is_x_times(0.5) => gelu(ctx, label, &g.x).map(Some),
        ("Mul", Stage::HalfOnePlusErf) if is_x_times(1.0) => gelu(ctx, label, &g.x).map(Some),
        ("Mul", Stage::XOnePlusErf) if k.is_some_and(|k| near(k, 0.5)) => {
            gelu(ctx, label, &g.x).map(Some)
        }
        _ => bail!(
            "{op} of a part of an Erf-written GELU ({:?}) with something else: lopper \
             recognises x·½·(1 + erf(x/√2))",
            g.stage
        ),
    }
}

/// The GELU activation of a node or view.
fn gelu(ctx: &mut Ctx, label: &str, x: &Value) -> Result<Value> {
    let op = Op::Activation(Activation::new(ActivationKind::Gelu));
    match x {
        Value::Node(n) => ctx.unary(label, op, *n),
        Value::View(v) => {
            let v = view::apply_scale(ctx, label, v)?;
            let y = ctx.add(label, op, &[v.node], vec![])?;
            view::settle(ctx, label, v.on(y))
        }
        _ => bail!("internal: GELU of a constant"),
    }
}
