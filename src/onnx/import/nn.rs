//! Layers with weights and windows: Conv, Gemm, MatMul, BatchNormalization, MaxPool,
//! AveragePool, GlobalAveragePool, LayerNormalization; MatMul of two computed tensors
//! hands over to [attention](super::attention).

use super::view::{self, View};
use super::{attention, tensor, Ctx, Value};
use crate::graph::ops::param;
use crate::graph::ops::{
    BatchNorm, Conv2d, ConvTranspose2d, GlobalAvgPool, LayerNorm, Linear, Op, Pool2d,
};
use crate::onnx::attrs::Attrs;
use crate::onnx::value::Const;
use anyhow::{anyhow, bail, Result};
use onnx_protobuf::NodeProto;

fn weight<'a>(ctx: &'a Ctx, n: &NodeProto, i: usize, what: &str) -> Result<&'a Const> {
    let name = n
        .input
        .get(i)
        .ok_or_else(|| anyhow!("missing input {i} ({what})"))?;
    ctx.konst(name)
        .ok_or_else(|| anyhow!("{what} '{name}' must be a constant (initialiser)"))
}

fn two(v: Option<Vec<i64>>, default: usize, what: &str) -> Result<[usize; 2]> {
    match v.as_deref() {
        None => Ok([default; 2]),
        Some([a, b]) if *a >= 0 && *b >= 0 => Ok([*a as usize, *b as usize]),
        Some(x) => bail!(
            "{what} {x:?} is not a 2-D spatial attribute (only 2-D convs and pools are supported)"
        ),
    }
}

/// `[top, left, bottom, right]` from `pads` / `auto_pad` for a window op.
fn padding(
    a: &Attrs,
    input: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dil: [usize; 2],
) -> Result<[usize; 4]> {
    let auto = a.string("auto_pad", "NOTSET");
    match auto.as_str() {
        "NOTSET" => match a.ints("pads").as_deref() {
            None => Ok([0; 4]),
            Some([t, l, b, r]) if [t, l, b, r].iter().all(|&&p| p >= 0) => {
                Ok([*t as usize, *l as usize, *b as usize, *r as usize])
            }
            Some(p) => bail!("pads {p:?} must be 4 non-negative values"),
        },
        "VALID" => Ok([0; 4]),
        "SAME_UPPER" | "SAME_LOWER" => {
            let mut p = [0usize; 4];
            for ax in 0..2 {
                let out = input[ax].div_ceil(stride[ax]);
                let need = (out - 1) * stride[ax] + (kernel[ax] - 1) * dil[ax] + 1;
                let total = need.saturating_sub(input[ax]);
                let small = total / 2;
                let (begin, end) = if auto == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                };
                p[ax] = begin;
                p[ax + 2] = end;
            }
            Ok(p)
        }
        x => bail!("auto_pad '{x}' is not supported (NOTSET, VALID, SAME_UPPER, SAME_LOWER)"),
    }
}

/// The weight `w` and the optional bias (input 2, one value per output channel `o`) of a
/// conv-like node as IR parameters; also whether there is a bias.
fn weight_and_bias(
    ctx: &Ctx,
    n: &NodeProto,
    w: &Const,
    o: usize,
) -> Result<(Vec<(&'static str, candle_core::Tensor)>, bool)> {
    let bias = n.input.get(2).filter(|s| !s.is_empty()).is_some();
    let mut params = vec![(param::WEIGHT, tensor(w.f32s(), &w.dims)?)];
    if bias {
        let b = weight(ctx, n, 2, param::BIAS)?;
        if b.numel() != o {
            bail!("bias has {} values for {o} output channels", b.numel());
        }
        params.push((param::BIAS, tensor(b.f32s(), &[o])?));
    }
    Ok((params, bias))
}

/// A `kernel_shape` attribute, when given, must match the weight.
fn check_kernel_shape(a: &Attrs, k: [usize; 2], w: &Const) -> Result<()> {
    match a.ints("kernel_shape") {
        Some(ks) if ks != [k[0] as i64, k[1] as i64] => {
            bail!("kernel_shape {ks:?} does not match the weight {:?}", w.dims)
        }
        _ => Ok(()),
    }
}

fn spatial(ctx: &Ctx, x: usize) -> Result<[usize; 2]> {
    match ctx.shape(x)[..] {
        [_, h, w] => Ok([h, w]),
        ref s => bail!("expects a CxHxW input, got {s:?}"),
    }
}

pub(super) fn conv(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&[
        "auto_pad",
        "dilations",
        "group",
        "kernel_shape",
        "pads",
        "strides",
    ])?;
    let x = ctx.node(&n.input[0])?;
    let w = weight(ctx, n, 1, param::WEIGHT)?.clone();
    let [o, ig, kh, kw] = w.dims[..] else {
        bail!(
            "weight has shape {:?}; only 2-D convolutions are supported",
            w.dims
        );
    };
    let groups = a.int("group", 1).max(1) as usize;
    let stride = two(a.ints("strides"), 1, "strides")?;
    let dilation = two(a.ints("dilations"), 1, "dilations")?;
    let kernel = [kh, kw];
    check_kernel_shape(&a, [kh, kw], &w)?;
    let padding = padding(&a, spatial(ctx, x)?, kernel, stride, dilation)?;
    let cin = ctx.shape(x)[0];
    if cin != ig * groups {
        bail!(
            "input has {cin} channels, the weight expects {} × {groups} groups",
            ig
        );
    }
    let (params, bias) = weight_and_bias(ctx, n, &w, o)?;
    let op = Op::Conv2d(Conv2d {
        in_channels: cin,
        out_channels: o,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        bias,
    });
    Ok(Value::Node(ctx.add(label, op, &[x], params)?))
}

/// `ConvTranspose` with constant weights `[I, O/g, kh, kw]`: explicit pads (or VALID),
/// output_padding, strides, dilations, groups. `output_shape` and SAME auto-padding are
/// refused (their padding depends on a target size the importer does not track).
pub(super) fn conv_transpose(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&[
        "auto_pad",
        "dilations",
        "group",
        "kernel_shape",
        "output_padding",
        "pads",
        "strides",
    ])?;
    if !matches!(a.string("auto_pad", "NOTSET").as_str(), "NOTSET" | "VALID") {
        bail!("ConvTranspose with SAME auto_pad is not supported (use explicit pads)");
    }
    let x = ctx.node(&n.input[0])?;
    let w = weight(ctx, n, 1, param::WEIGHT)?.clone();
    let [i, og, kh, kw] = w.dims[..] else {
        bail!(
            "weight has shape {:?}; only 2-D transposed convolutions are supported",
            w.dims
        );
    };
    let groups = a.int("group", 1).max(1) as usize;
    let cin = ctx.shape(x)[0];
    if cin != i {
        bail!("input has {cin} channels, the weight expects {i}");
    }
    check_kernel_shape(&a, [kh, kw], &w)?;
    let stride = two(a.ints("strides"), 1, "strides")?;
    let dilation = two(a.ints("dilations"), 1, "dilations")?;
    // NOTSET or VALID (SAME was refused above): the shared reader of explicit pads.
    let padding = padding(&a, spatial(ctx, x)?, [kh, kw], stride, dilation)?;
    let o = og * groups;
    let (params, bias) = weight_and_bias(ctx, n, &w, o)?;
    let op = Op::ConvTranspose2d(ConvTranspose2d {
        in_channels: cin,
        out_channels: o,
        kernel: [kh, kw],
        stride,
        padding,
        output_padding: two(a.ints("output_padding"), 0, "output_padding")?,
        dilation,
        groups,
        bias,
    });
    Ok(Value::Node(ctx.add(label, op, &[x], params)?))
}

/// `W` of a linear layer `[out, in]` plus optional bias, as a node.
fn linear(
    ctx: &mut Ctx,
    label: &str,
    x: usize,
    w: Vec<f32>,
    (o, i): (usize, usize),
    bias: Option<Vec<f32>>,
) -> Result<Value> {
    if ctx.shape(x)[..] != [i] {
        bail!(
            "expects a flat input of {i} features, got {:?} (flatten first)",
            ctx.shape(x)
        );
    }
    let mut params = vec![(param::WEIGHT, tensor(w, &[o, i])?)];
    let has_bias = bias.is_some();
    if let Some(b) = bias {
        params.push((param::BIAS, tensor(b, &[o])?));
    }
    let op = Op::Linear(Linear {
        in_features: i,
        out_features: o,
        bias: has_bias,
    });
    Ok(Value::Node(ctx.add(label, op, &[x], params)?))
}

fn transpose(w: &[f32], r: usize, c: usize) -> Vec<f32> {
    (0..c * r).map(|k| w[(k % r) * c + k / r]).collect()
}

pub(super) fn gemm(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["alpha", "beta", "transA", "transB"])?;
    if a.int("transA", 0) != 0 {
        bail!("transA = 1 is not supported");
    }
    let b = weight(ctx, n, 1, "B")?.clone();
    let [r, c] = b.dims[..] else {
        bail!("B has shape {:?}, expected a matrix", b.dims);
    };
    let alpha = a.float("alpha", 1.0);
    let beta = a.float("beta", 1.0);
    let (w, o, i) = if a.int("transB", 0) != 0 {
        (b.f32s(), r, c)
    } else {
        (transpose(&b.f32s(), r, c), c, r)
    };
    let w: Vec<f32> = w.iter().map(|v| v * alpha).collect();
    let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
        Some(_) => {
            let cst = weight(ctx, n, 2, "C")?;
            let v = match cst.numel() {
                1 => vec![cst.data[0] as f32; o],
                k if k == o => cst.f32s(),
                k => bail!("C has {k} values for {o} outputs"),
            };
            Some(v.iter().map(|x| x * beta).collect())
        }
        None => None,
    };
    if let Some(Value::View(v)) = ctx.values.get(&n.input[0]).cloned() {
        return linear_view(ctx, label, v, w, (o, i), bias);
    }
    ctx.materialise(&n.input[0], label)?;
    let x = ctx.node(&n.input[0])?;
    linear(ctx, label, x, w, (o, i), bias)
}

pub(super) fn matmul(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let (a, b) = (&n.input[0], &n.input[1]);
    if ctx.konst(b).is_none() {
        return activations_product(ctx, label, a, b);
    }
    let b = weight(ctx, n, 1, "the second operand")?.clone();
    let [k, m] = b.dims[..] else {
        bail!(
            "only matrix × constant matrix is supported, the constant has shape {:?}",
            b.dims
        );
    };
    let w = transpose(&b.f32s(), k, m);
    if let Some(Value::View(v)) = ctx.values.get(a).cloned() {
        return linear_view(ctx, label, v, w, (m, k), None);
    }
    ctx.materialise(a, label)?;
    let x = ctx.node(a)?;
    if ctx.shape(x).len() >= 2 && ctx.shape(x).last() == Some(&k) {
        // Features on the last axis of a plain tensor ([N, T, F] token features).
        let v = view::channels_last_of(ctx, label, x)?;
        return linear_view(ctx, label, v, w, (m, k), None);
    }
    linear(ctx, label, x, w, (m, k), None)
}

/// A MatMul of two computed tensors: attention's `q·kᵀ` or `softmax(…)·v`.
fn activations_product(ctx: &mut Ctx, label: &str, a: &str, b: &str) -> Result<Value> {
    if let Some(Value::Attn(at)) = ctx.values.get(a).cloned() {
        let v = ctx.view(b).ok_or_else(|| {
            anyhow!("attention probabilities times '{b}', which is not a computed tensor")
        })?;
        return attention::finish(ctx, label, &at, &v, false);
    }
    if let Some(Value::Attn(at)) = ctx.values.get(b).cloned() {
        let v = ctx.view(a).ok_or_else(|| {
            anyhow!("'{a}' times attention probabilities, which is not a computed tensor")
        })?;
        return attention::finish(ctx, label, &at, &v, true);
    }
    match (ctx.view(a), ctx.view(b)) {
        (Some(q), Some(k)) => attention::scores(ctx, q, k),
        _ => bail!(
            "a MatMul of two computed tensors that is not part of attention \
             (softmax(q·kᵀ)·v) is not supported"
        ),
    }
}

/// A linear layer over the last axis of a channel-last view: a 1×1 convolution of its
/// node (tokens stay channels-first), seen through the same positions.
fn linear_view(
    ctx: &mut Ctx,
    label: &str,
    v: View,
    w: Vec<f32>,
    (o, i): (usize, usize),
    bias: Option<Vec<f32>>,
) -> Result<Value> {
    let Some(cl) = view::channel_last(ctx, &v) else {
        bail!(
            "a linear layer over the last axis of {:?}, which is not the channel axis of the \
             tensor it rearranges",
            v.index.dims
        );
    };
    if cl.channels != i {
        bail!("a linear layer of {i} inputs over {} channels", cl.channels);
    }
    let w: Vec<f32> = w.iter().map(|x| x * v.scale as f32).collect();
    let x = view::rank3(ctx, label, v.node)?;
    let conv = Conv2d::new(i, o, 1, 1, 0).with_bias(bias.is_some());
    let mut params = vec![(param::WEIGHT, tensor(w, &[o, i, 1, 1])?)];
    if let Some(b) = bias {
        params.push((param::BIAS, tensor(b, &[o])?));
    }
    let node = ctx.add(label, Op::Conv2d(conv), &[x], params)?;
    let prefix = &v.index.dims[..v.index.dims.len() - 1];
    cl.view_of(ctx, label, node, prefix, o)
}

/// `LayerNormalization` over the last axis: lopper's LayerNorm over the channels of a
/// channel-last token tensor (or of a flat feature vector).
pub(super) fn layer_norm(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["axis", "epsilon", "stash_type"])?;
    let input = &n.input[0];
    let dims = super::shape::dims_of(ctx, input)?;
    let ax = a.int("axis", -1);
    let r = dims.len() as i64;
    if ax != -1 && ax != r - 1 {
        bail!(
            "LayerNormalization over axes {ax}.. of {dims:?}: lopper normalises over the last \
             (embedding) axis only"
        );
    }
    let scale = weight(ctx, n, 1, "Scale")?.f32s();
    let c = scale.len();
    let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
        Some(_) => weight(ctx, n, 2, "B")?.f32s(),
        None => vec![0.0; c],
    };
    if bias.len() != c {
        bail!(
            "LayerNormalization scale has {c} values, its bias {}",
            bias.len()
        );
    }
    let mut op = LayerNorm::new(c);
    op.eps = a.float("epsilon", 1e-5) as f64;
    let params = |scale: Vec<f32>, bias: Vec<f32>| -> Result<_> {
        Ok(vec![
            (param::WEIGHT, tensor(scale, &[c])?),
            (param::BIAS, tensor(bias, &[c])?),
        ])
    };
    // Any computed tensor whose last axis is its node's channel axis: a channel-last view,
    // a flat feature vector, a `[C, 1, 1]` map seen as `[1, 1, 1, C]`.
    let Some(mut v) = ctx.view(input) else {
        bail!("LayerNormalization of '{input}', which is not a computed tensor");
    };
    if view::channel_last(ctx, &v).is_none() && !ctx.is_view(input) {
        // Features on the last axis of a plain tensor ([N, T, F] token features).
        let x = ctx.node(input)?;
        if ctx.shape(x).len() >= 2 {
            v = view::channels_last_of(ctx, label, x)?;
        }
    }
    if view::channel_last(ctx, &v).map(|cl| cl.channels) != Some(c) {
        bail!(
            "LayerNormalization over the last axis of {dims:?}, which is not the channel axis \
             of the tensor it reads: lopper normalises channels"
        );
    }
    let v = view::apply_scale(ctx, label, &v)?;
    let y = ctx.add(label, Op::LayerNorm(op), &[v.node], params(scale, bias)?)?;
    view::settle(ctx, label, v.on(y))
}

pub(super) fn batch_norm(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["epsilon", "momentum", "training_mode", "spatial"])?;
    if a.int("training_mode", 0) != 0 {
        bail!("training_mode = 1 is not supported");
    }
    let x = ctx.node(&n.input[0])?;
    let c = ctx.shape(x)[0];
    let mut params = vec![];
    for (i, name) in [
        (1, param::WEIGHT),
        (2, param::BIAS),
        (3, param::RUNNING_MEAN),
        (4, param::RUNNING_VAR),
    ] {
        let v = weight(ctx, n, i, name)?;
        if v.numel() != c {
            bail!("{name} has {} values for {c} channels", v.numel());
        }
        params.push((name, tensor(v.f32s(), &[c])?));
    }
    let op = Op::BatchNorm(BatchNorm {
        num_features: c,
        eps: a.float("epsilon", 1e-5) as f64,
        momentum: 1.0 - a.float("momentum", 0.9) as f64,
    });
    Ok(Value::Node(ctx.add(label, op, &[x], params)?))
}

pub(super) fn pool(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&[
        "auto_pad",
        "ceil_mode",
        "count_include_pad",
        "dilations",
        "kernel_shape",
        "pads",
        "storage_order",
        "strides",
    ])?;
    if a.int("storage_order", 0) != 0 {
        bail!("storage_order = 1 is not supported");
    }
    let dil = two(a.ints("dilations"), 1, "dilations")?;
    if dil != [1, 1] {
        bail!("dilated pooling is not supported");
    }
    let x = ctx.node(&n.input[0])?;
    let kernel = two(
        Some(
            a.ints("kernel_shape")
                .ok_or_else(|| anyhow!("kernel_shape is required"))?,
        ),
        1,
        "kernel_shape",
    )?;
    let stride = two(a.ints("strides"), 1, "strides")?;
    let padding = padding(&a, spatial(ctx, x)?, kernel, stride, dil)?;
    let p = Pool2d {
        kernel,
        stride,
        padding,
        ceil_mode: a.int("ceil_mode", 0) != 0,
        count_include_pad: a.int("count_include_pad", 0) != 0,
    };
    let op = if n.op_type == "MaxPool" {
        Op::MaxPool(p)
    } else {
        Op::AvgPool(p)
    };
    ctx.unary(label, op, x)
}

pub(super) fn global_avg_pool(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    Attrs::new(n).only(&[])?;
    let x = ctx.node(&n.input[0])?;
    ctx.unary(label, Op::GlobalAvgPool(GlobalAvgPool {}), x)
}

/// `ReduceMean` over the spatial axes: global average pooling (then flatten unless
/// `keepdims`).
pub(super) fn reduce_mean(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["axes", "keepdims", "noop_with_empty_axes"])?;
    let axes = match a.ints("axes") {
        Some(v) => v,
        None => match n.input.get(1).filter(|s| !s.is_empty()) {
            Some(name) => ctx
                .konst(name)
                .ok_or_else(|| anyhow!("axes '{name}' must be constant"))?
                .ints(),
            None => vec![],
        },
    };
    let keep = a.int("keepdims", 1) != 0;
    if let Some(v) = super::rms_norm::reduce_mean(ctx, n, &axes, keep)? {
        return Ok(v);
    }
    ctx.materialise(&n.input[0], label)?;
    let x = ctx.node(&n.input[0])?;
    let mut ax: Vec<i64> = axes
        .iter()
        .map(|&v| if v < 0 { v + 4 } else { v })
        .collect();
    ax.sort_unstable();
    if ctx.shape(x).len() != 3 || ax != [2, 3] {
        bail!("ReduceMean is only supported over the spatial axes [2, 3] of an NCHW tensor");
    }
    let gap = ctx.add(label, Op::GlobalAvgPool(GlobalAvgPool {}), &[x], vec![])?;
    if a.int("keepdims", 1) != 0 {
        return Ok(Value::Node(gap));
    }
    let op = Op::Flatten(crate::graph::ops::Flatten {});
    ctx.unary(&format!("{label}_flatten"), op, gap)
}
