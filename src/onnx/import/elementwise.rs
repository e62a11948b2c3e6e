//! Arithmetic and activations: Add/Sub/Mul/Div (two tensors, a tensor and a per-channel or
//! scalar constant, or two constants), Relu, Clip, LeakyRelu, Sigmoid, HardSigmoid,
//! HardSwish, Tanh, Softmax, Identity, Dropout.

use super::view::{self, View};
use super::{tensor, Ctx, NodeId, Value};
use crate::graph::ops::param;
use crate::graph::ops::{
    Activation, ActivationKind, Add, ChannelAffine, Dropout, Identity, Max, Min, Mul, Op, PRelu,
    PosEmbed, Softmax,
};
use crate::graph::shape::numel;
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
    if let Some(v) = super::erf_gelu::combine(ctx, label, op, a, b)? {
        return Ok(v);
    }
    if let Some(v) = super::rms_norm::combine(ctx, label, op, a, b)? {
        return Ok(v);
    }
    match (ctx.konst(a).cloned(), ctx.konst(b).cloned()) {
        (Some(x), Some(y)) => Ok(Value::Const(fold(op, &x, &y)?)),
        (None, None) => {
            if let Some(v) = two_views(ctx, label, op, a, b)? {
                return Ok(v);
            }
            ctx.materialise(a, label)?;
            ctx.materialise(b, label)?;
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
            // A scalar factor of a reshaped tensor (a per-head operand of attention) is
            // followed as a view's scale, not applied to the reshape.
            if c.numel() == 1 && matches!(op, "Mul" | "Div") {
                if let Some(Value::Node(x)) = ctx.values.get(name).cloned() {
                    let v = View::identity(ctx, x);
                    if v.node != x {
                        ctx.values.insert(name.to_string(), Value::View(v));
                    }
                }
            }
            if let Some(v) = view_const(ctx, label, op, name, &c)? {
                return Ok(v);
            }
            ctx.materialise(name, label)?;
            let x = ctx.node(name)?;
            let shape = ctx.shape(x).clone();
            let mut cd = c.dims.clone();
            while cd.len() > shape.len() && cd[0] == 1 {
                cd.remove(0);
            }
            if op == "Add" && shape.len() >= 2 && cd == shape && shape[1..].iter().any(|&d| d > 1) {
                // A full-size constant added to channels-first tokens: a position embedding.
                let (ch, p) = (shape[0], numel(&shape[1..]));
                let ir = Op::PosEmbed(PosEmbed {
                    channels: ch,
                    tokens: p,
                });
                let w = tensor(c.f32s(), &[ch, p])?;
                return Ok(Value::Node(ctx.add(
                    label,
                    ir,
                    &[x],
                    vec![(param::WEIGHT, w)],
                )?));
            }
            let Some(v) = per_channel(&c, &shape) else {
                bail!(
                    "constant of shape {:?} is neither a scalar nor per-channel for a tensor of shape {:?}",
                    c.dims,
                    shape
                );
            };
            Ok(Value::Node(per_channel_op(ctx, label, op, name, x, v)?))
        }
    }
}

/// `x op c` for per-channel values `v` of a node `x` (ONNX name `name`): the bias of the
/// layer before when that is free, else a channel affine.
fn per_channel_op(
    ctx: &mut Ctx,
    label: &str,
    op: &str,
    name: &str,
    x: NodeId,
    v: Vec<f32>,
) -> Result<NodeId> {
    {
        let ch = ctx.shape(x)[0];
        // A scale or shift right after a LayerNorm (the γ, β of an RMSNorm written out)
        // becomes its γ, β.
        if matches!(op, "Mul" | "Add")
            && ctx.single_use(name)
            && matches!(ctx.op(x), Op::LayerNorm(_))
        {
            let ps: &[&str] = if op == "Mul" {
                &[param::WEIGHT, param::BIAS]
            } else {
                &[param::BIAS]
            };
            for &p in ps {
                let t: Vec<f32> = ctx
                    .param(x, p)?
                    .iter()
                    .zip(&v)
                    .map(|(a, b)| if op == "Mul" { a * b } else { a + b })
                    .collect();
                ctx.set_param(x, p, tensor(t, &[ch])?);
            }
            return Ok(x);
        }
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
                return Ok(x);
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
        ctx.add(label, ir, &[x], params)
    }
}

/// `a op b` where either is a view: on the nodes when both read them channel-last at the
/// same positions (a residual add of token tensors). `None`: materialise instead.
fn two_views(ctx: &mut Ctx, label: &str, op: &str, a: &str, b: &str) -> Result<Option<Value>> {
    match (ctx.value(a)?.clone(), ctx.value(b)?.clone()) {
        (Value::Attn(at), Value::Mask(m)) | (Value::Mask(m), Value::Attn(at)) if op == "Add" => {
            return super::attention::with_mask(ctx, &at, &m).map(Some);
        }
        (Value::Attn(_), _) | (_, Value::Attn(_)) => {
            bail!("attention scores {op} a computed tensor: lopper takes an additive key padding mask, Where(mask, 0, -inf)")
        }
        _ => {}
    }
    if !ctx.is_view(a) && !ctx.is_view(b) {
        return Ok(None);
    }
    let (Some(va), Some(vb)) = (ctx.view(a), ctx.view(b)) else {
        return Ok(None);
    };
    let ir = match op {
        "Add" => Op::Add(Add {}),
        "Mul" => Op::Mul(Mul {}),
        _ => return Ok(None),
    };
    let (ca, cb) = (view::channel_last(ctx, &va), view::channel_last(ctx, &vb));
    if ca.is_none() || ca != cb || va.index.dims != vb.index.dims {
        return Ok(None);
    }
    let va = view::apply_scale(ctx, label, &va)?;
    let vb = view::apply_scale(ctx, label, &vb)?;
    let (mut x, mut y) = (va.node, vb.node);
    if ctx.shape(x) != ctx.shape(y) {
        x = view::rank3(ctx, label, x)?;
        y = view::rank3(ctx, label, y)?;
    }
    let z = ctx.add(label, ir, &[x, y], vec![])?;
    view::settle(ctx, label, va.on(z)).map(Some)
}

/// A constant operand of a view or of attention scores: a scalar factor becomes the
/// view's (or the attention's) scale, a per-channel constant of a channel-last view acts on
/// its node's channels, and a full-size constant added to a channel-last token tensor is a
/// position embedding. `None`: not one of these (the caller materialises the view).
fn view_const(
    ctx: &mut Ctx,
    label: &str,
    op: &str,
    name: &str,
    c: &Const,
) -> Result<Option<Value>> {
    let scalar = (c.numel() == 1).then(|| c.data[0]);
    if let Some(Value::Attn(mut a)) = ctx.values.get(name).cloned() {
        return match (op, scalar) {
            ("Mul", Some(s)) => {
                a.scale *= s;
                Ok(Some(Value::Attn(a)))
            }
            ("Div", Some(s)) if s != 0.0 => {
                a.scale /= s;
                Ok(Some(Value::Attn(a)))
            }
            ("Add" | "Sub", _) if c.data.iter().all(|&x| x == 0.0) => Ok(Some(Value::Attn(a))),
            _ => bail!(
                "attention scores {op} a constant of shape {:?}: lopper takes scalar scales \
                 (constant additive masks are not supported)",
                c.dims
            ),
        };
    }
    let Some(Value::View(mut v)) = ctx.values.get(name).cloned() else {
        return Ok(None);
    };
    match (op, scalar) {
        ("Mul", Some(s)) => {
            v.scale *= s;
            return Ok(Some(Value::View(v)));
        }
        ("Div", Some(s)) if s != 0.0 => {
            v.scale /= s;
            return Ok(Some(Value::View(v)));
        }
        _ => {}
    }
    let Some(cl) = view::channel_last(ctx, &v) else {
        return Ok(None);
    };
    let v = view::apply_scale(ctx, label, &v)?;
    let ch = cl.channels;
    let lead_ones =
        c.dims.len() <= v.index.dims.len() && c.dims.iter().rev().skip(1).all(|&d| d == 1);
    if scalar.is_some() || (lead_ones && c.dims.last() == Some(&ch)) {
        let vals = if c.numel() == 1 {
            vec![c.data[0] as f32; ch]
        } else {
            c.f32s()
        };
        let y = per_channel_op(ctx, label, op, name, v.node, vals)?;
        return view::settle(ctx, label, v.on(y)).map(Some);
    }
    let mut dims = c.dims.clone();
    while dims.len() > v.index.dims.len() && dims[0] == 1 {
        dims.remove(0);
    }
    if op == "Add" && dims == v.index.dims && cl.covers_all() {
        // Position embedding: value (row r, channel k) is added at IR (k, pos[r]).
        let p = cl.positions;
        let mut w = vec![0f32; ch * p];
        for (r, &pr) in cl.pos.iter().enumerate() {
            for k in 0..ch {
                w[k * p + pr] = c.data[r * ch + k] as f32;
            }
        }
        let op = Op::PosEmbed(PosEmbed {
            channels: ch,
            tokens: p,
        });
        let y = ctx.add(
            label,
            op,
            &[v.node],
            vec![(param::WEIGHT, tensor(w, &[ch, p])?)],
        )?;
        return view::settle(ctx, label, v.on(y)).map(Some);
    }
    Ok(None)
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
    if let Some(Value::Attn(mut at)) = ctx.values.get(&n.input[0]).cloned() {
        let r = at.dims.len() as i64;
        let k = a.int("axis", if ctx.opset < 13 { 1 } else { -1 });
        if at.probs || (k != -1 && k != r - 1) {
            bail!("a softmax of attention scores {:?} over axis {k}: attention normalises over the keys (the last axis) once", at.dims);
        }
        at.probs = true;
        return Ok(Value::Attn(at));
    }
    ctx.materialise(&n.input[0], label)?;
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
