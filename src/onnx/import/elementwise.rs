//! Arithmetic and activations: Add/Sub/Mul/Div (two tensors, a tensor and a per-channel or
//! scalar constant, or two constants), Relu, Clip, LeakyRelu, Sigmoid, HardSigmoid,
//! HardSwish, Tanh, Softmax, Identity, Dropout.

use super::{tensor, Ctx, Value};
use crate::graph::ops::param;
use crate::graph::ops::{
    Activation, ActivationKind, Add, ChannelAffine, Dropout, Identity, Max, Min, Mul, Op, PRelu,
    Softmax,
};
use crate::onnx::attrs::Attrs;
use crate::onnx::value::Const;
use anyhow::{anyhow, bail, Result};
use onnx_protobuf::NodeProto;

/// Per-channel values of a constant broadcast against a tensor of per-sample `shape`
/// (channel axis first), or `None` if it varies along other axes.
fn per_channel(c: &Const, shape: &[usize]) -> Option<Vec<f32>> {
    let ch = shape[0];
    if c.numel() == 1 {
        return Some(vec![c.data[0] as f32; ch]);
    }
    // Drop leading 1s beyond the per-sample rank (the batch axis).
    let mut dims: Vec<usize> = c.dims.clone();
    while dims.len() > shape.len() && dims[0] == 1 {
        dims.remove(0);
    }
    if dims.len() != shape.len() || dims[0] != ch || dims[1..].iter().any(|&d| d != 1) {
        return None;
    }
    Some(c.f32s())
}

fn fold(op: &str, a: &Const, b: &Const) -> Result<Const> {
    let (big, small) = if a.numel() >= b.numel() {
        (a, b)
    } else {
        (b, a)
    };
    if small.numel() != 1 && small.dims != big.dims {
        bail!(
            "folding {op} of constants with shapes {:?} and {:?} is not supported",
            a.dims,
            b.dims
        );
    }
    let at = |c: &Const, i: usize| if c.numel() == 1 { c.data[0] } else { c.data[i] };
    let data = (0..big.numel())
        .map(|i| {
            let (x, y) = (at(a, i), at(b, i));
            match op {
                "Add" => x + y,
                "Sub" => x - y,
                "Mul" => x * y,
                _ => x / y,
            }
        })
        .collect();
    Ok(Const {
        dims: big.dims.clone(),
        data,
    })
}

pub(super) fn binary(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    Attrs::new(n).only(&["axis", "broadcast"])?;
    let (a, b) = (&n.input[0], &n.input[1]);
    let op = n.op_type.as_str();
    match (ctx.konst(a).cloned(), ctx.konst(b).cloned()) {
        (Some(x), Some(y)) => Ok(Value::Const(fold(op, &x, &y)?)),
        (None, None) => {
            let (x, y) = (ctx.node(a)?, ctx.node(b)?);
            if op == "Mul" {
                if let Some(v) = self_gate(ctx, (a, x), (b, y)) {
                    return Ok(v);
                }
            }
            let ir = match op {
                "Add" => Op::Add(Add {}),
                "Mul" => Op::Mul(Mul {}),
                _ => bail!("{op} of two computed tensors is not supported (Add and Mul are)"),
            };
            Ok(Value::Node(ctx.add(label, ir, &[x, y], vec![])?))
        }
        (xc, _) => {
            // One side constant. `c op x` is only expressible for commutative ops.
            let (name, c) = match xc {
                Some(c) if matches!(op, "Add" | "Mul") => (b, c),
                Some(_) => bail!("constant {op} tensor (constant on the left) is not supported"),
                None => (a, ctx.konst(b).cloned().expect("b is constant")),
            };
            let x = ctx.node(name)?;
            let shape = ctx.shape(x).clone();
            let Some(v) = per_channel(&c, &shape) else {
                bail!(
                    "constant of shape {:?} is neither a scalar nor per-channel for a tensor of shape {:?}",
                    c.dims,
                    shape
                );
            };
            let ch = shape[0];
            // A bias add right after a bias-free conv/linear becomes that layer's bias.
            if op == "Add" && ctx.single_use(name) {
                let free = match ctx.op_mut(x) {
                    Op::Conv2d(cv) if !cv.bias => {
                        cv.bias = true;
                        true
                    }
                    Op::Linear(l) if !l.bias => {
                        l.bias = true;
                        true
                    }
                    _ => false,
                };
                if free {
                    ctx.set_param(x, param::BIAS, tensor(v, &[ch])?);
                    return Ok(Value::Node(x));
                }
            }
            let (w, bias): (Vec<f32>, Vec<f32>) = match op {
                "Add" => (vec![1.0; ch], v),
                "Sub" => (vec![1.0; ch], v.iter().map(|x| -x).collect()),
                "Mul" => (v, vec![0.0; ch]),
                _ => {
                    if v.contains(&0.0) {
                        bail!("division by a constant containing zero");
                    }
                    (v.iter().map(|x| 1.0 / x).collect(), vec![0.0; ch])
                }
            };
            let params = vec![
                (param::WEIGHT, tensor(w, &[ch])?),
                (param::BIAS, tensor(bias, &[ch])?),
            ];
            let ir = Op::ChannelAffine(ChannelAffine { channels: ch });
            Ok(Value::Node(ctx.add(label, ir, &[x], params)?))
        }
    }
}

/// A constant input of Clip (opset ≥ 11) or its attribute (older opsets).
fn clip_bound(ctx: &Ctx, n: &NodeProto, i: usize, attr: &str, default: f32) -> Result<f32> {
    match n.input.get(i).filter(|s| !s.is_empty()) {
        Some(name) => match ctx.konst(name) {
            Some(c) if c.numel() == 1 => Ok(c.data[0] as f32),
            _ => bail!("Clip bound '{name}' must be a scalar constant"),
        },
        None => Ok(Attrs::new(n).float(attr, default)),
    }
}

/// An activation without attributes (Relu, Sigmoid, Tanh, HardSwish).
pub(super) fn activation(
    ctx: &mut Ctx,
    n: &NodeProto,
    label: &str,
    kind: ActivationKind,
) -> Result<Value> {
    add_activation(ctx, n, label, kind)
}

/// `LeakyRelu` with its `alpha`.
pub(super) fn leaky_relu(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["alpha"])?;
    let slope = a.float("alpha", 0.01);
    add_activation(ctx, n, label, ActivationKind::LeakyRelu { slope })
}

/// `HardSigmoid`: PyTorch's form (alpha 1/6, beta 0.5).
pub(super) fn hard_sigmoid(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["alpha", "beta"])?;
    let (alpha, beta) = (a.float("alpha", 0.2), a.float("beta", 0.5));
    let kind = if (alpha - 1.0 / 6.0).abs() < 1e-6 && (beta - 0.5).abs() < 1e-6 {
        ActivationKind::HardSigmoid
    } else {
        ActivationKind::HardSigmoidWith { alpha, beta }
    };
    add_activation(ctx, n, label, kind)
}

/// `Sum` of computed tensors (broadcasting): one n-ary add; of one input, that input.
pub(super) fn sum(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    nary(ctx, n, label, Op::Add(Add {}))
}

/// `Max` of computed tensors (broadcast).
pub(super) fn max(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    nary(ctx, n, label, Op::Max(Max {}))
}

/// `Min` of computed tensors (broadcast).
pub(super) fn min(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    nary(ctx, n, label, Op::Min(Min {}))
}

/// A variadic element-wise op of computed tensors; one input is the identity.
fn nary(ctx: &mut Ctx, n: &NodeProto, label: &str, op: Op) -> Result<Value> {
    Attrs::new(n).only(&[])?;
    if let Some(c) = n.input.iter().find(|i| ctx.konst(i).is_some()) {
        bail!(
            "{} with a constant input ('{c}') is not supported",
            n.op_type
        );
    }
    let xs: Vec<usize> = n.input.iter().map(|i| ctx.node(i)).collect::<Result<_>>()?;
    if let [x] = xs[..] {
        return Ok(Value::Node(x));
    }
    Ok(Value::Node(ctx.add(label, op, &xs, vec![])?))
}

/// `Elu` with its `alpha`.
pub(super) fn elu(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["alpha"])?;
    let alpha = a.float("alpha", 1.0);
    add_activation(ctx, n, label, ActivationKind::Elu { alpha })
}

/// `Selu` with its `alpha` and `gamma` (ONNX's defaults are the self-normalising ones).
pub(super) fn selu(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["alpha", "gamma"])?;
    let alpha = a.float("alpha", 1.673_263_2);
    let gamma = a.float("gamma", 1.050_701);
    add_activation(ctx, n, label, ActivationKind::Selu { alpha, gamma })
}

/// `PRelu` with a constant slope: one per channel, or one shared by all (expanded).
pub(super) fn prelu(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    Attrs::new(n).only(&[])?;
    let x = ctx.node(&n.input[0])?;
    let slope = ctx
        .konst(&n.input[1])
        .ok_or_else(|| anyhow!("PRelu slope '{}' must be a constant", n.input[1]))?
        .clone();
    let shape = &ctx.shapes[x];
    let ch = shape.first().copied().unwrap_or(1);
    // Per channel: [C], [C, 1, 1] or [1, C, 1, 1]; everything else but one value is not.
    let per_channel = slope.numel() == ch
        && slope.dims.iter().filter(|&&d| d != 1).count() <= 1
        && (slope.dims.len() <= shape.len() || slope.dims[0] == 1);
    let w: Vec<f32> = match slope.numel() {
        1 => vec![slope.data[0] as f32; ch],
        _ if per_channel => slope.f32s(),
        _ => bail!(
            "PRelu slope of shape {:?} on input {:?}: only one slope per channel or one shared slope is supported",
            slope.dims,
            shape
        ),
    };
    let op = Op::PRelu(PRelu { channels: ch });
    Ok(Value::Node(ctx.add(
        label,
        op,
        &[x],
        vec![(param::WEIGHT, tensor(w, &[ch])?)],
    )?))
}

/// `Gelu` (opset 20): exact (erf) or the tanh approximation.
pub(super) fn gelu(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["approximate"])?;
    let kind = match a.string("approximate", "none").as_str() {
        "none" => ActivationKind::Gelu,
        "tanh" => ActivationKind::GeluTanh,
        other => bail!("Gelu approximate='{other}' is not supported (none, tanh)"),
    };
    add_activation(ctx, n, label, kind)
}

/// `Clip` to [0, 6] (ReLU6) or [0, inf) (ReLU), bounds from attributes or inputs.
pub(super) fn clip(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    Attrs::new(n).only(&["min", "max"])?;
    let lo = clip_bound(ctx, n, 1, "min", f32::NEG_INFINITY)?;
    let hi = clip_bound(ctx, n, 2, "max", f32::INFINITY)?;
    let kind = match (lo, hi) {
        (l, h) if l == 0.0 && h == 6.0 => ActivationKind::Relu6,
        (l, h) if l == 0.0 && h == f32::INFINITY => ActivationKind::Relu,
        (l, h) if l.is_nan() || h.is_nan() || l > h => {
            bail!("Clip to [{lo}, {hi}] is not a valid range")
        }
        (l, h) => ActivationKind::Clip { lo: l, hi: h },
    };
    add_activation(ctx, n, label, kind)
}

fn add_activation(
    ctx: &mut Ctx,
    n: &NodeProto,
    label: &str,
    kind: ActivationKind,
) -> Result<Value> {
    let x = ctx.node(&n.input[0])?;
    let op = Op::Activation(Activation::new(kind));
    ctx.unary(label, op, x)
}

/// `Softmax` over one axis. Before opset 13 it normalised over the flattened axes from
/// `axis` on (default 1), which is one axis when the axes after it have size 1; from 13 on
/// it is one axis (default -1).
pub(super) fn softmax(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["axis"])?;
    let x = ctx.node(&n.input[0])?;
    let s = ctx.shape(x).clone();
    let rank = s.len() as i64 + 1;
    let legacy = ctx.opset < 13;
    let given = a.int("axis", if legacy { 1 } else { -1 });
    let k = if given < 0 { given + rank } else { given };
    if k < 1 || k >= rank {
        bail!("Softmax over axis {given} of a rank-{rank} tensor (the batch axis 0 cannot be normalised over)");
    }
    let axis = (k - 1) as usize;
    if legacy && s[axis + 1..].iter().any(|&d| d != 1) {
        bail!(
            "Softmax (opset {} semantics) over the flattened axes {k}.. of {:?} is not supported; only over one axis",
            ctx.opset,
            s
        );
    }
    ctx.unary(label, Op::Softmax(Softmax { axis }), x)
}

/// `Dropout` (an identity at inference; kept so fine-tuning can use it).
pub(super) fn dropout(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["ratio", "seed"])?;
    let x = ctx.node(&n.input[0])?;
    let p = match n.input.get(1).and_then(|r| ctx.konst(r)) {
        Some(c) if c.numel() == 1 => c.data[0] as f32,
        Some(_) => bail!("Dropout ratio must be a scalar"),
        None => a.float("ratio", 0.5),
    };
    ctx.unary(label, Op::Dropout(Dropout { p }), x)
}

/// `Identity`: a constant stays a constant (exporters put Identity on weights); a
/// computed tensor gets an identity node.
pub(super) fn identity(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    if let Some(c) = ctx.konst(&n.input[0]) {
        return Ok(Value::Const(c.clone()));
    }
    let x = ctx.node(&n.input[0])?;
    ctx.unary(label, Op::Identity(Identity {}), x)
}

/// `x · g(x)` where the gate `g(x)` is used only here: the activation that product is —
/// SiLU for a sigmoid gate, HardSwish for PyTorch's hard sigmoid, Mish for
/// `tanh(softplus(x))` — as one node (the gate node becomes it), so the executor runs one
/// kernel (fused into the conv before it) instead of a gate and a full-size product.
fn self_gate(ctx: &mut Ctx, a: (&str, super::NodeId), b: (&str, super::NodeId)) -> Option<Value> {
    for ((_, x), (gname, gate)) in [(a, b), (b, a)] {
        if !ctx.single_use(gname) || ctx.first_input(gate) != x {
            continue;
        }
        let kind = match ctx.op(gate) {
            Op::Activation(g) => match g.kind {
                ActivationKind::Sigmoid => ActivationKind::Silu,
                ActivationKind::HardSigmoid => ActivationKind::HardSwish,
                _ => continue,
            },
            _ => continue,
        };
        *ctx.op_mut(gate) = Op::Activation(Activation::new(kind));
        return Some(Value::Node(gate));
    }
    None
}
