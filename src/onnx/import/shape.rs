//! Shape manipulation: Flatten, Reshape, Transpose (layout no-ops), Squeeze, Unsqueeze,
//! Concat, Pad (channel padding), and constant folding of Shape, Gather, Constant, Cast and
//! of any of these on constants (the Shape→Gather→Unsqueeze→Concat→Reshape flatten chains).

use super::view::{self, View};
use super::{Ctx, Value};
use crate::graph::ops::{
    param, ChannelGather, ChannelPad, ClassToken, Concat, Embedding, Flatten, Identity, Op,
    PadMode, Pool2d, Reshape, SpatialPad, TokenSelect,
};
use crate::graph::shape::numel;
use crate::onnx::attrs::Attrs;
use crate::onnx::value::Const;
use anyhow::{anyhow, bail, Result};
use onnx_protobuf::NodeProto;

/// Full-rank dims (batch 1) of an input, constant or computed.
pub(super) fn dims_of(ctx: &Ctx, name: &str) -> Result<Vec<usize>> {
    Ok(match ctx.value(name)? {
        Value::Const(c) => c.dims.clone(),
        Value::View(v) => v.index.dims.clone(),
        Value::Attn(a) => a.dims.clone(),
        Value::Mask(v) => v.index.dims.clone(),
        Value::Gelu(_) | Value::IsNan(_) | Value::Rms(_) => {
            bail!("the shape of a part of a GELU or a NaN guard is not supported")
        }
        Value::Node(n) => {
            let mut d = vec![1];
            d.extend(ctx.shape(*n));
            d
        }
    })
}

fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    if a < -r || a >= r {
        bail!("axis {a} is out of range for rank {rank}");
    }
    Ok(((a + r) % r) as usize)
}

/// Axes from the attribute (older opsets) or the second input (opset 13+).
pub(super) fn axes_input(ctx: &Ctx, n: &NodeProto) -> Result<Option<Vec<i64>>> {
    if let Some(a) = Attrs::new(n).ints("axes") {
        return Ok(Some(a));
    }
    match n.input.get(1).filter(|s| !s.is_empty()) {
        Some(name) => Ok(Some(
            ctx.konst(name)
                .ok_or_else(|| anyhow!("axes '{name}' must be constant"))?
                .ints(),
        )),
        None => Ok(None),
    }
}

/// A computed tensor reshaped to full-rank `target` (batch first): Identity, Flatten, or an
/// (opaque) Reshape.
pub(super) fn reshape_node(
    ctx: &mut Ctx,
    label: &str,
    x: usize,
    target: &[usize],
) -> Result<Value> {
    // A reshape of a reshape reads the original tensor (the intermediate is dropped by
    // dead-node elimination), so a round trip through 5-D layouts costs nothing.
    let x = match ctx.op(x) {
        Op::Reshape(_) => ctx.first_input(x),
        _ => x,
    };
    let shape = ctx.shape(x).clone();
    if target.len() > 1 && target[1..] == shape[..] {
        return Ok(Value::Node(x));
    }
    if target.first() != Some(&1) || numel(&target[1..]) != numel(&shape) {
        bail!("reshape of a {shape:?} sample to {target:?} mixes the batch axis in; not supported");
    }
    let per = &target[1..];
    let op = if per == shape.as_slice() {
        Op::Identity(Identity {})
    } else if per.len() == 1 {
        Op::Flatten(Flatten {})
    } else {
        Op::Reshape(Reshape {
            shape: per.iter().map(|&d| d as i64).collect(),
        })
    };
    ctx.unary(label, op, x)
}

/// `Constant`: its value attribute as a constant.
pub(super) fn constant(_ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    for k in [
        "value",
        "value_float",
        "value_floats",
        "value_int",
        "value_ints",
    ] {
        if let Some(c) = a.tensor(k)? {
            return Ok(Value::Const(c));
        }
    }
    bail!("Constant without a supported value attribute")
}

/// `ConstantOfShape` of a constant shape: folded (exporters build pads and shapes this way).
pub(super) fn constant_of_shape(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["value"])?;
    let shape = ctx
        .konst(&n.input[0])
        .ok_or_else(|| anyhow!("ConstantOfShape needs a constant shape"))?
        .ints();
    if shape.iter().any(|&d| d < 0) {
        bail!("ConstantOfShape of negative dims {shape:?}");
    }
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let n_el: usize = dims.iter().product();
    if n_el > 1 << 24 {
        bail!("ConstantOfShape of {n_el} values is too large to fold");
    }
    let v = a
        .tensor("value")?
        .and_then(|c| c.data.first().copied())
        .unwrap_or(0.0);
    Ok(Value::Const(Const {
        dims,
        data: vec![v; n_el],
    }))
}

/// `Shape` (with `start`/`end`): folded to a constant, shapes are static.
pub(super) fn shape_of(ctx: &mut Ctx, n: &NodeProto, _label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    let input = n.input.first().cloned().unwrap_or_default();
    a.only(&["start", "end"])?;
    let d = dims_of(ctx, &input)?;
    let r = d.len();
    if r == 0 {
        return Ok(Value::Const(Const::vec_i64(&[])));
    }
    let s = axis(a.int("start", 0).clamp(-(r as i64), r as i64 - 1), r)?;
    let e = match a.int("end", r as i64) {
        e if e >= r as i64 => r,
        e => axis(e, r)?,
    };
    let v: Vec<i64> = d[s..e.max(s)].iter().map(|&x| x as i64).collect();
    Ok(Value::Const(Const::vec_i64(&v)))
}

/// `Cast`: constants pass through (values are kept as f64); a computed tensor is unchanged (float only).
pub(super) fn cast(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    let input = n.input.first().cloned().unwrap_or_default();
    let konst = ctx.konst(&input).cloned();
    a.only(&["to", "saturate"])?;
    match konst {
        Some(c) => Ok(Value::Const(c)),
        None => {
            let x = ctx.node(&input)?;
            ctx.unary(label, Op::Identity(Identity {}), x)
        }
    }
}

/// `Gather`: folded on 1-D constants; on a computed tensor, a channel selection.
pub(super) fn gather_op(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    let input = n.input.first().cloned().unwrap_or_default();
    let konst = ctx.konst(&input).cloned();
    a.only(&["axis"])?;
    let Some(idx) = ctx.konst(&n.input[1]).cloned() else {
        return match konst {
            Some(table) if a.int("axis", 0) == 0 && table.dims.len() == 2 => {
                embedding(ctx, label, &table, &n.input[1])
            }
            _ => bail!(
                "Gather with computed indices is supported as an embedding lookup (a constant \
                 [vocab, dim] table, axis 0)"
            ),
        };
    };
    let Some(data) = konst else {
        if let Some(v) = ctx.values.get(&input).and_then(|_| ctx.view(&input)) {
            let ax = axis(a.int("axis", 0), v.index.dims.len())?;
            // A channel gather of a plain node stays the IR op it was.
            if ctx.is_view(&input) || ax != 1 || idx.dims.len() != 1 {
                return gather_view(ctx, label, v, ax, &idx);
            }
        }
        let x = ctx.node(&input)?;
        let rank = ctx.shape(x).len() + 1;
        if axis(a.int("axis", 0), rank)? != 1 || idx.dims.len() != 1 {
            bail!("Gather on a computed tensor is only supported along the channel axis with 1-D indices");
        }
        let c = ctx.shape(x)[0] as i64;
        let indices = idx
            .ints()
            .iter()
            .map(|&i| {
                let j = if i < 0 { i + c } else { i };
                if j < 0 || j >= c {
                    bail!("Gather index {i} is out of range for {c} channels");
                }
                Ok(j as usize)
            })
            .collect::<Result<Vec<_>>>()?;
        return gather(ctx, label, x, indices);
    };
    let ax = axis(a.int("axis", 0), data.dims.len().max(1))?;
    if data.dims.len() != 1 || ax != 0 {
        return Ok(Value::Const(view::take(&data, ax, &idx)?));
    }
    let len = data.dims[0] as i64;
    let mut out = vec![];
    for &i in &idx.ints() {
        let j = if i < 0 { i + len } else { i };
        if j < 0 || j >= len {
            bail!("Gather index {i} is out of range for length {len}");
        }
        out.push(data.data[j as usize]);
    }
    Ok(Value::Const(Const {
        dims: idx.dims.clone(),
        data: out,
    }))
}

/// `Gather(table, ids)` of a constant `[vocab, dim]` table by computed ids `[T]`: an
/// `Embedding` op, seen as the exporter's `[1, T, dim]` (channel-last over `[dim, T, 1]`).
fn embedding(ctx: &mut Ctx, label: &str, table: &Const, ids: &str) -> Result<Value> {
    ctx.materialise(ids, label)?;
    let x = ctx.node(ids)?;
    let t = match ctx.shape(x)[..] {
        [t] => t,
        ref s => bail!("an embedding lookup of ids with per-sample shape {s:?}; expected [tokens]"),
    };
    let (vocab, dim) = (table.dims[0], table.dims[1]);
    let op = Op::Embedding(Embedding { vocab, dim });
    let w = super::tensor(table.f32s(), &[vocab, dim])?;
    let node = ctx.add(label, op, &[x], vec![(param::WEIGHT, w)])?;
    view::ChannelLast::tokens(dim, t).view_of(ctx, label, node, &[1, t], dim)
}

/// `Gather` on a view: the index is gathered. One token of a channel-last token tensor
/// (`x[:, 0]`, ViT's class token) becomes a `TokenSelect`.
fn gather_view(ctx: &mut Ctx, label: &str, v: View, ax: usize, idx: &Const) -> Result<Value> {
    let index = view::take(&v.index, ax, idx)?;
    let w = v.with_index(index);
    if w.index.dims.len() == 2 && w.index.dims[0] == 1 {
        if let Some(cl) = view::channel_last(ctx, &w) {
            let w = view::apply_scale(ctx, label, &w)?;
            let op = Op::TokenSelect(TokenSelect { index: cl.pos[0] });
            return ctx.unary(label, op, w.node);
        }
    }
    view::settle(ctx, label, w)
}

/// `Squeeze` / `Unsqueeze`: a constant's dims change; a computed tensor is reshaped.
pub(super) fn squeeze(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let input = n.input.first().cloned().unwrap_or_default();
    let konst = ctx.konst(&input).cloned();
    let d = dims_of(ctx, &input)?;
    let axes = axes_input(ctx, n)?;
    let new: Vec<usize> = if n.op_type == "Unsqueeze" {
        let axes = axes.ok_or_else(|| anyhow!("Unsqueeze needs axes"))?;
        let r = d.len() + axes.len();
        let mut ax: Vec<usize> = axes.iter().map(|&x| axis(x, r)).collect::<Result<_>>()?;
        ax.sort_unstable();
        let mut it = d.iter();
        (0..r)
            .map(|i| {
                if ax.contains(&i) {
                    1
                } else {
                    *it.next().unwrap_or(&1)
                }
            })
            .collect()
    } else {
        let ax: Vec<usize> = match axes {
            Some(v) => v.iter().map(|&x| axis(x, d.len())).collect::<Result<_>>()?,
            None => (0..d.len()).filter(|&i| d[i] == 1 && i > 0).collect(),
        };
        d.iter()
            .enumerate()
            .filter(|(i, _)| !ax.contains(i))
            .map(|(_, &v)| v)
            .collect()
    };
    match konst {
        Some(c) => Ok(Value::Const(Const {
            dims: new,
            data: c.data,
        })),
        None => {
            if let Some(Value::View(v)) = ctx.values.get(&input).cloned() {
                let index = Const {
                    dims: new.clone(),
                    data: v.index.data.clone(),
                };
                return view::settle(ctx, label, v.with_index(index));
            }
            let x = ctx.node(&input)?;
            reshape_node(ctx, label, x, &new)
        }
    }
}

/// `Concat`: of 1-D constants (shape arithmetic) folded; of tensors along channels.
pub(super) fn concat(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    a.only(&["axis"])?;
    let consts: Vec<Option<Const>> = n.input.iter().map(|i| ctx.konst(i).cloned()).collect();
    if consts.iter().all(|c| c.is_some()) {
        let cs: Vec<Const> = consts.into_iter().flatten().collect();
        if cs.iter().any(|c| c.dims.len() > 1) {
            bail!("Concat of constants is only supported for 1-D constants");
        }
        let data: Vec<f64> = cs.iter().flat_map(|c| c.data.clone()).collect();
        return Ok(Value::Const(Const {
            dims: vec![data.len()],
            data,
        }));
    }
    if let Some(v) = class_token(ctx, n, label, a.int("axis", 1))? {
        return Ok(v);
    }
    for i in &n.input {
        ctx.materialise(i, label)?;
    }
    let xs: Vec<usize> = n.input.iter().map(|i| ctx.node(i)).collect::<Result<_>>()?;
    let rank = ctx.shape(xs[0]).len() + 1;
    let k = axis(a.int("axis", 1), rank)?;
    if k == 0 {
        bail!("Concat along the batch axis 0 is not supported");
    }
    Ok(Value::Node(ctx.add(
        label,
        Op::Concat(Concat { axis: k - 1 }),
        &xs,
        vec![],
    )?))
}

/// `Concat([token, x], axis = tokens)` of a learned `[1, 1, D]` token and a channel-last
/// token tensor `[1, T, D]` (ViT's class token): a `ClassToken` op.
fn class_token(ctx: &mut Ctx, n: &NodeProto, label: &str, ax: i64) -> Result<Option<Value>> {
    let [c, x] = &n.input[..] else {
        return Ok(None);
    };
    let (Some(tok), Some(v)) = (ctx.konst(c).cloned(), ctx.view(x)) else {
        return Ok(None);
    };
    let d = v.index.dims.clone();
    // Channels-first `[1, D, T]` with the token `[1, D, 1]` along axis 2 (lopper's own
    // export): the same op.
    let s = ctx.shape(v.node).clone();
    let iota = v.index.data.iter().enumerate().all(|(i, &x)| x == i as f64);
    if d.len() == 3
        && d[..2] == [1, s[0]]
        && iota
        && v.index.numel() == numel(&s)
        && tok.dims == [1, s[0], 1]
        && axis(ax, 3)? == 2
        && v.scale == 1.0
    {
        let ch = s[0];
        let op = Op::ClassToken(ClassToken { channels: ch });
        let w = super::tensor(tok.f32s(), &[ch])?;
        let node = ctx.add(label, op, &[v.node], vec![(param::WEIGHT, w)])?;
        let t = ctx.shape(node)[1];
        return reshape_node(ctx, &format!("{label}_flat"), node, &[1, ch, t]).map(Some);
    }
    let Some(cl) = view::channel_last(ctx, &v) else {
        return Ok(None);
    };
    let ch = cl.channels;
    let in_order = cl.pos.iter().enumerate().all(|(i, &p)| i == p) && cl.covers_all();
    if d.len() != 3 || d[0] != 1 || axis(ax, 3)? != 1 || tok.dims != [1, 1, ch] || !in_order {
        return Ok(None);
    }
    let v = view::apply_scale(ctx, label, &v)?;
    let op = Op::ClassToken(ClassToken { channels: ch });
    let w = super::tensor(tok.f32s(), &[ch])?;
    let node = ctx.add(label, op, &[v.node], vec![(param::WEIGHT, w)])?;
    let t = cl.positions + 1;
    view::ChannelLast::tokens(ch, t)
        .view_of(ctx, label, node, &[1, t], ch)
        .map(Some)
}

/// `Flatten` from axis 1.
pub(super) fn flatten(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    let input = n.input.first().cloned().unwrap_or_default();
    a.only(&["axis"])?;
    let x = ctx.node(&input)?;
    let rank = ctx.shape(x).len() + 1;
    if axis(a.int("axis", 1), rank)? != 1 {
        bail!("Flatten is only supported from axis 1");
    }
    let n_el = numel(ctx.shape(x));
    reshape_node(ctx, label, x, &[1, n_el])
}

/// `Reshape` to a constant (or foldable) target shape; `0` copies a dim unless `allowzero`.
pub(super) fn reshape(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    let input = n.input.first().cloned().unwrap_or_default();
    let konst = ctx.konst(&input).cloned();
    a.only(&["allowzero"])?;
    let target = ctx
        .konst(&n.input[1])
        .ok_or_else(|| anyhow!("the target shape must be constant (or foldable)"))?
        .ints();
    let d = dims_of(ctx, &input)?;
    let allow_zero = a.int("allowzero", 0) != 0;
    let mut t: Vec<i64> = target
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v == 0 && !allow_zero {
                d.get(i).map_or(0, |&x| x as i64)
            } else {
                v
            }
        })
        .collect();
    let total: usize = d.iter().product();
    if let Some(p) = t.iter().position(|&v| v == -1) {
        let known: i64 = t.iter().filter(|&&v| v != -1).product();
        if known <= 0 || total as i64 % known != 0 {
            bail!("cannot reshape {d:?} to {target:?}");
        }
        t[p] = total as i64 / known;
    }
    if t.iter().any(|&v| v < 0) || t.iter().product::<i64>() != total as i64 {
        bail!("cannot reshape {d:?} to {target:?}");
    }
    let t: Vec<usize> = t.iter().map(|&v| v as usize).collect();
    match konst {
        Some(c) => Ok(Value::Const(Const {
            dims: t,
            data: c.data,
        })),
        None => {
            let x_is_node = !ctx.is_view(&input);
            if !x_is_node || t.first() != Some(&1) {
                // A view, or a reshape that merges the batch axis in (the dynamo exporter's
                // batch-1 `as_strided` decompositions): followed as a view.
                let v = ctx.view(&input).expect("a computed tensor");
                let index = Const {
                    dims: t.clone(),
                    data: v.index.data.clone(),
                };
                return view::settle(ctx, label, v.with_index(index));
            }
            let x = ctx.node(&input)?;
            reshape_node(ctx, label, x, &t)
        }
    }
}

/// `Transpose`: layout no-ops (unit axes move) and ShuffleNet channel shuffles.
pub(super) fn transpose(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    let input = n.input.first().cloned().unwrap_or_default();
    a.only(&["perm"])?;
    if let Some(c) = ctx.konst(&input).cloned() {
        let r = c.dims.len();
        let perm: Vec<usize> = match a.ints("perm") {
            Some(p) => p.iter().map(|&v| axis(v, r)).collect::<Result<_>>()?,
            None => (0..r).rev().collect(),
        };
        return Ok(Value::Const(permute_const(&c, &perm)?));
    }
    let d = dims_of(ctx, &input)?;
    let perm = a
        .ints("perm")
        .unwrap_or_else(|| (0..d.len() as i64).rev().collect());
    let mut sorted = perm.clone();
    sorted.sort_unstable();
    if sorted != (0..d.len() as i64).collect::<Vec<_>>() {
        bail!("perm {perm:?} is not a permutation of the {} axes", d.len());
    }
    let moved = |ctx: &mut Ctx, v: View| -> Result<Value> {
        let p: Vec<usize> = perm.iter().map(|&p| p as usize).collect();
        let index = permute_const(&v.index, &p)?;
        view::settle(ctx, label, v.with_index(index))
    };
    if let Some(Value::View(v)) = ctx.values.get(&input).cloned() {
        return moved(ctx, v);
    }
    if let Some(Value::Attn(at)) = ctx.values.get(&input).cloned() {
        let p: Vec<usize> = perm.iter().map(|&p| p as usize).collect();
        return Ok(Value::Attn(Box::new(super::attention::transpose(&at, &p)?)));
    }
    let x = ctx.node(&input)?;
    if let Some(v) = channel_shuffle(ctx, label, x, &d, &perm)? {
        return Ok(v);
    }
    // A layout no-op: the non-unit axes keep their order.
    let kept: Vec<i64> = perm
        .iter()
        .copied()
        .filter(|&p| d[p as usize] != 1)
        .collect();
    if kept.windows(2).all(|w| w[0] < w[1]) {
        let new: Vec<usize> = perm.iter().map(|&p| d[p as usize]).collect();
        return reshape_node(ctx, label, x, &new);
    }
    // Data moves: kept as a view, materialised (as an IR Transpose) only if a plain op
    // reads it; transformer layouts are consumed by layers and attention as they are.
    let v = View::identity(ctx, x);
    moved(ctx, v)
}

/// `Pad`: zero padding of the channel axis.
pub(super) fn pad(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let a = Attrs::new(n);
    let input = n.input.first().cloned().unwrap_or_default();
    a.only(&["mode", "pads", "value"])?;
    let mode = a.string("mode", "constant");
    let pads = match a.ints("pads") {
        Some(p) => p,
        None => ctx
            .konst(&n.input[1])
            .ok_or_else(|| anyhow!("pads must be constant"))?
            .ints(),
    };
    let value = match n.input.get(2).filter(|s| !s.is_empty()) {
        Some(v) => ctx
            .konst(v)
            .and_then(|c| c.data.first().copied())
            .unwrap_or(0.0),
        None => a.float("value", 0.0) as f64,
    };
    if n.input.get(3).is_some_and(|s| !s.is_empty()) {
        bail!("Pad with an axes input is not supported (give pads for every axis)");
    }
    let x = ctx.node(&input)?;
    let r = ctx.shape(x).len() + 1;
    if pads.len() != 2 * r {
        bail!(
            "Pad needs {} pads for a rank-{r} input, got {pads:?}",
            2 * r
        );
    }
    if pads.iter().any(|&p| p < 0) {
        bail!("negative pads (cropping) {pads:?} are not supported");
    }
    let spatial_only = r == 4 && [0, 1, 4, 5].iter().all(|&i| pads[i] == 0);
    if spatial_only && pads.iter().any(|&p| p != 0) {
        let pm = match mode.as_str() {
            "constant" => PadMode::Constant {
                value: value as f32,
            },
            "reflect" => PadMode::Reflect,
            "edge" => PadMode::Edge,
            other => bail!("Pad mode '{other}' is not supported (constant, reflect, edge)"),
        };
        let op = Op::SpatialPad(SpatialPad {
            pads: [pads[2], pads[3], pads[6], pads[7]].map(|p| p as usize),
            mode: pm,
        });
        return ctx.unary(label, op, x);
    }
    if mode != "constant" || value != 0.0 {
        bail!("Pad of the channel axis must be constant zeros, got mode '{mode}' value {value}");
    }
    let others = (0..r)
        .filter(|&i| i != 1)
        .any(|i| pads[i] != 0 || pads[i + r] != 0);
    if others || pads[1] < 0 || pads[1 + r] < 0 {
        bail!("only zero padding of the channel axis is supported, got pads {pads:?}");
    }
    let op = Op::ChannelPad(ChannelPad {
        before: pads[1] as usize,
        after: pads[1 + r] as usize,
    });
    ctx.unary(label, op, x)
}

/// `Slice` along one axis: 1-D constants folded, the channel axis as a channel gather.
pub(super) fn slice_op(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Value> {
    let konst = ctx.konst(&n.input[0]).cloned();
    slice(ctx, n, label, konst)
}

/// A channel gather node.
fn gather(ctx: &mut Ctx, label: &str, x: usize, indices: Vec<usize>) -> Result<Value> {
    let op = Op::ChannelGather(ChannelGather {
        in_channels: ctx.shape(x)[0],
        indices,
    });
    ctx.unary(label, op, x)
}

/// ShuffleNet's `Reshape [N, g, C/g, H, W] → Transpose (0, 2, 1, 3, 4)`: a channel
/// permutation of the reshape's input, kept in the transposed 5-D layout so the
/// following Reshape back to `[N, C, H, W]` folds away.
fn channel_shuffle(
    ctx: &mut Ctx,
    label: &str,
    x: usize,
    d: &[usize],
    perm: &[i64],
) -> Result<Option<Value>> {
    if perm != [0, 2, 1, 3, 4] || !matches!(ctx.op(x), Op::Reshape(_)) {
        return Ok(None);
    }
    let src = ctx.first_input(x);
    let (g, cpg) = (d[1], d[2]);
    if ctx.shape(src).len() != 3 || ctx.shape(src)[0] != g * cpg {
        return Ok(None);
    }
    let indices = (0..g * cpg).map(|c| (c % g) * cpg + c / g).collect();
    let Value::Node(sh) = gather(ctx, &format!("{label}_shuffle"), src, indices)? else {
        unreachable!()
    };
    let op = Op::Reshape(Reshape {
        shape: vec![cpg as i64, g as i64, d[3] as i64, d[4] as i64],
    });
    Ok(Some(Value::Node(ctx.add(label, op, &[sh], vec![])?)))
}

/// `[start, end)` with ONNX clamping rules for one axis of length `len`.
/// A constant with its axes permuted (`out axis i = in axis perm[i]`).
pub(super) fn permute_const(c: &Const, perm: &[usize]) -> Result<Const> {
    let r = c.dims.len();
    let mut seen = vec![false; r];
    if perm.len() != r
        || perm
            .iter()
            .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
    {
        bail!("Transpose perm {perm:?} is not a permutation of {r} axes");
    }
    let picks: Vec<Vec<usize>> = perm.iter().map(|&p| (0..c.dims[p]).collect()).collect();
    Ok(gather_const(c, perm, &picks))
}

/// The constant whose output axis `i` reads input axis `axes[i]` at indices `picks[i]`
/// (a permutation and a per-axis selection in one walk).
fn gather_const(c: &Const, axes: &[usize], picks: &[Vec<usize>]) -> Const {
    let r = axes.len();
    let dims: Vec<usize> = picks.iter().map(|p| p.len()).collect();
    let strides = strides_of(&c.dims);
    let n: usize = dims.iter().product();
    let mut data = Vec::with_capacity(n);
    let mut idx = vec![0usize; r];
    for _ in 0..n {
        data.push(
            c.data[(0..r)
                .map(|i| picks[i][idx[i]] * strides[axes[i]])
                .sum::<usize>()],
        );
        for ax in (0..r).rev() {
            idx[ax] += 1;
            if idx[ax] < dims[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    Const { dims, data }
}

fn strides_of(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// ONNX Slice on a constant: any axes, any non-zero steps (negative ones reverse).
fn slice_const(
    c: &Const,
    starts: &[i64],
    ends: &[i64],
    axes: &[i64],
    steps: &[i64],
) -> Result<Const> {
    let r = c.dims.len();
    let mut picks: Vec<Vec<usize>> = c.dims.iter().map(|&d| (0..d).collect()).collect();
    for k in 0..starts.len() {
        let ax = axis(axes[k], r)?;
        let (len, step) = (c.dims[ax] as i64, steps[k]);
        if step == 0 {
            bail!("Slice step 0");
        }
        let fix = |v: i64, lo: i64, hi: i64| if v < 0 { (v + len).max(lo) } else { v.min(hi) };
        picks[ax] = if step > 0 {
            let (s, e) = (fix(starts[k], 0, len), fix(ends[k], 0, len));
            (s..e.max(s))
                .step_by(step as usize)
                .map(|v| v as usize)
                .collect()
        } else {
            let (s, e) = (fix(starts[k], -1, len - 1), fix(ends[k], -1, len - 1));
            let mut v = Vec::new();
            let mut i = s;
            while i > e {
                v.push(i as usize);
                i += step;
            }
            v
        };
    }
    let axes: Vec<usize> = (0..r).collect();
    Ok(gather_const(c, &axes, &picks))
}

fn clamp_range(start: i64, end: i64, len: i64) -> (i64, i64) {
    let fix = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
    (fix(start), fix(end))
}

fn slice(ctx: &mut Ctx, n: &NodeProto, label: &str, konst: Option<Const>) -> Result<Value> {
    let a = Attrs::new(n);
    let get = |i: usize, attr: &str| -> Result<Option<Vec<i64>>> {
        if let Some(v) = a.ints(attr) {
            return Ok(Some(v));
        }
        match n.input.get(i).filter(|s| !s.is_empty()) {
            Some(name) => Ok(Some(
                ctx.konst(name)
                    .ok_or_else(|| anyhow!("Slice {attr} '{name}' must be constant"))?
                    .ints(),
            )),
            None => Ok(None),
        }
    };
    let starts = get(1, "starts")?.ok_or_else(|| anyhow!("Slice needs starts"))?;
    let ends = get(2, "ends")?.ok_or_else(|| anyhow!("Slice needs ends"))?;
    let d = dims_of(ctx, &n.input[0])?;
    let axes = get(3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = get(4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
    if let Some(c) = &konst {
        if axes.len() != starts.len() || ends.len() != starts.len() || steps.len() != starts.len() {
            bail!("Slice starts, ends, axes and steps differ in length");
        }
        return Ok(Value::Const(slice_const(c, &starts, &ends, &axes, &steps)?));
    }
    if axes.len() != starts.len() || ends.len() != starts.len() || steps.len() != starts.len() {
        bail!("Slice starts, ends, axes and steps differ in length");
    }
    if steps.iter().any(|&s| s <= 0) {
        bail!("Slice of a computed tensor needs positive steps, got {steps:?}");
    }
    // The axes that select something less than everything.
    let mut cuts = Vec::new();
    for k in 0..axes.len() {
        let ax = axis(axes[k], d.len())?;
        let (s0, e0) = clamp_range(starts[k], ends[k], d[ax] as i64);
        if s0 >= e0 {
            bail!("Slice selects nothing along axis {ax}");
        }
        if s0 != 0 || e0 != d[ax] as i64 || steps[k] != 1 {
            cuts.push((ax, s0 as usize, e0 as usize, steps[k] as usize));
        }
    }
    let x = ctx.node(&n.input[0])?;
    match cuts[..] {
        [] => Ok(Value::Node(x)),
        // Channels: a gather (prunable through).
        [(0, ..), ..] => bail!("Slice along the batch axis is not supported"),
        [(1, s0, e0, st)] => gather(ctx, label, x, (s0..e0).step_by(st).collect()),
        // Spatial subsampling from the first row/column to the end (ResNet's option-A
        // shortcut `x[:, :, ::2, ::2]`): a 1×1 pooling window with that stride.
        _ if d.len() == 4 && cuts.iter().all(|&(ax, s0, e0, _)| ax >= 2 && s0 == 0 && e0 == d[ax]) => {
            let mut stride = [1, 1];
            for &(ax, _, _, st) in &cuts {
                stride[ax - 2] = st;
            }
            let mut p = Pool2d::new(1, 1, 0);
            p.stride = stride;
            ctx.unary(label, Op::AvgPool(p), x)
        }
        _ => bail!(
            "Slice of a computed tensor is supported along the channel axis, or as a spatial \
             subsampling that starts at 0 and runs to the end; got (axis, start, end, step) {cuts:?}"
        ),
    }
}

/// Split along the channel axis: one channel gather per output.
pub(super) fn split(ctx: &mut Ctx, n: &NodeProto, label: &str) -> Result<Vec<Value>> {
    let a = Attrs::new(n);
    a.only(&["axis", "split", "num_outputs"])?;
    let x = ctx.node(&n.input[0])?;
    let rank = ctx.shape(x).len() + 1;
    if axis(a.int("axis", 0), rank)? != 1 {
        bail!("Split is only supported along the channel axis 1");
    }
    let c = ctx.shape(x)[0];
    let k = n.output.len();
    let sizes: Vec<usize> =
        match a
            .ints("split")
            .or(match n.input.get(1).filter(|s| !s.is_empty()) {
                Some(name) => Some(
                    ctx.konst(name)
                        .ok_or_else(|| anyhow!("split sizes '{name}' must be constant"))?
                        .ints(),
                ),
                None => None,
            }) {
            Some(v) => v.iter().map(|&s| s.max(0) as usize).collect(),
            None => {
                // Equal parts, the last one smaller (opset 18 rule).
                let part = c.div_ceil(k.max(1));
                (0..k)
                    .map(|i| part.min(c.saturating_sub(i * part)))
                    .collect()
            }
        };
    if sizes.len() != k || sizes.iter().sum::<usize>() != c || sizes.contains(&0) {
        bail!("split sizes {sizes:?} do not divide {c} channels into {k} outputs");
    }
    let mut start = 0;
    let mut out = vec![];
    for (i, &s) in sizes.iter().enumerate() {
        out.push(gather(
            ctx,
            &format!("{label}_{i}"),
            x,
            (start..start + s).collect(),
        )?);
        start += s;
    }
    Ok(out)
}
