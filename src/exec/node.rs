//! One node's kernel call: per op, which kernel runs with which parameters. Each op's
//! execution is its own function; [`run`] only dispatches (exhaustively, so a new op
//! cannot run by accident as something else).

use super::{Mode, WeightMask};
use crate::graph::ops::param::{BIAS, RUNNING_MEAN, RUNNING_VAR, WEIGHT};
use crate::graph::ops::{
    ActivationKind, BatchNorm, ChannelAffine, ChannelGather, Conv2d, Dropout, LayerNorm, Linear,
    MultiHeadAttention, Op, Pool2d, Reshape,
};
use crate::graph::{Graph, NodeId};
use crate::kernels::csr::SparseWeight;
use crate::kernels::sparse::SparseEpilogue;
use crate::kernels::{self, ConvCfg, PoolCfg};
use anyhow::Result;
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::collections::HashMap;

/// An eval-mode conv's epilogue constants: with a batch norm folded in, `w·s` and the
/// per-channel `(s, b')`; without one, the conv's own bias (zeros if it has none).
#[derive(Debug)]
pub(crate) struct Folded {
    /// The per-channel scale of a folded batch norm.
    pub scale: Option<Vec<f32>>,
    pub bias: Vec<f32>,
    /// The scaled dense weight (absent without a batch norm, and when the conv runs on
    /// the sparse kernel, which applies `s` in its epilogue).
    pub weight: Option<Tensor>,
    /// The weight in the channel-vector kernel's layout, packed at the second call (a
    /// plan run once, as `exec::forward` does, packs nothing beyond the kernel's own
    /// per-call rule), if that kernel takes the conv's geometry (`None` inside: it does
    /// not); kept for the plan's lifetime.
    pub packed: std::sync::OnceLock<Option<std::sync::Arc<kernels::conv::PackedWeight>>>,
    /// Calls so far, for `packed`.
    pub calls: std::sync::atomic::AtomicUsize,
}

impl Folded {
    /// The scale the sparse kernels apply for this conv with weight `sw`: none once the
    /// plan folded it into the values ([`SparseWeight::fold_scale`]).
    pub fn sparse_scale(&self, sw: &SparseWeight) -> Option<&[f32]> {
        self.scale.as_deref().filter(|_| !sw.scale_folded())
    }
}

/// An eval-mode linear layer's weight packed for the register-tile panels, at the second
/// call (as [`Folded::packed`]), kept for the plan's lifetime.
#[derive(Debug, Default)]
pub(crate) struct LinearPack {
    pub packed: std::sync::OnceLock<Option<std::sync::Arc<Vec<f32>>>>,
    pub calls: std::sync::atomic::AtomicUsize,
}

/// The run-time state a node's kernel may need.
pub(crate) struct Ctx<'a> {
    pub mode: Mode,
    pub seed: u64,
    pub update_stats: bool,
    pub bn_momentum: Option<f64>,
    pub weight_masks: Option<&'a HashMap<NodeId, WeightMask>>,
    /// No gradient is taken through this pass: ops may run kernels that have no
    /// backward (an eval plan's detached passes).
    pub no_grad: bool,
}

/// Runs node `i` on its input values (`input` is the graph input, for the Input node);
/// `relu` applies a fused ReLU (batch norm, add, a training conv with a bias); `sw` its compressed weight, if planned.
pub(crate) fn run(
    g: &Graph,
    i: NodeId,
    ins: &[&Tensor],
    input: &Tensor,
    ctx: &Ctx,
    relu: bool,
    sw: Option<&SparseWeight>,
) -> Result<Tensor> {
    let op = &g.nodes[i].op;
    if let Op::Input(_) = op {
        return Ok(input.clone());
    }
    let Some(&x) = ins.first() else {
        anyhow::bail!("node '{}' has no input value", g.nodes[i].name);
    };
    match op {
        Op::Input(_) => Ok(input.clone()),
        Op::Conv2d(c) => conv(g, i, c, x, ctx, sw, relu),
        Op::Linear(l) => linear(g, i, l, x, ctx, sw),
        Op::BatchNorm(bn) => batch_norm(g, i, bn, x, ctx, relu),
        Op::Activation(a) => activation(x, a.kind),
        Op::ChannelGather(gth) => gather(gth, x),
        Op::ChannelAffine(a) => affine(g, i, a, x),
        Op::PRelu(_) => prelu(g, i, x),
        Op::ConvTranspose2d(c) => conv_transpose(g, i, c, x, ctx),
        Op::Resize(r) => resize(r, x),
        Op::SpatialPad(p) => spatial_pad(p, x),
        Op::MaxPool(pc) => pool(pc, x, true),
        Op::AvgPool(pc) => pool(pc, x, false),
        Op::GlobalAvgPool(_) => Ok(kernels::global_avg_pool(x)?),
        Op::Flatten(_) => Ok(x.flatten_from(1)?),
        Op::Reshape(r) => reshape(r, x),
        Op::Add(_) if relu => Ok(kernels::add_relu(ins[0], ins[1])?),
        Op::Add(_) => fold_inputs(ins, |a, b| a.broadcast_add(b)),
        Op::Mul(_) => fold_inputs(ins, |a, b| {
            kernels::mul(a, b).map_err(candle_core::Error::wrap)
        }),
        Op::Concat(c) => Ok(Tensor::cat(ins, c.axis + 1)?),
        Op::Max(_) => fold_inputs(ins, |a, b| a.broadcast_maximum(b)),
        Op::Min(_) => fold_inputs(ins, |a, b| a.broadcast_minimum(b)),
        Op::Transpose(t) => {
            let perm: Vec<usize> = std::iter::once(0)
                .chain(t.perm.iter().map(|&p| p + 1))
                .collect();
            Ok(x.permute(perm)?.contiguous()?)
        }
        Op::ChannelPad(cp) => Ok(x.pad_with_zeros(1, cp.before, cp.after)?),
        Op::Dropout(d) => dropout(d, i, x, ctx),
        Op::Softmax(sm) => Ok(candle_nn::ops::softmax(x, sm.axis + 1)?),
        Op::Identity(_) => Ok(x.clone()),
        Op::LayerNorm(l) => layer_norm(g, i, l, x),
        Op::PosEmbed(_) => pos_embed(g, i, x, ctx.no_grad),
        Op::MultiHeadAttention(a) if a.masked => Ok(kernels::attention_masked(
            x,
            ins[1],
            a.heads,
            a.kv(),
            a.head_dim,
            a.scale,
        )?),
        Op::MultiHeadAttention(a) => attention(a, x),
        Op::ClassToken(_) => class_token(g, i, x, ctx.no_grad),
        Op::TokenSelect(t) => Ok(x.flatten_from(2)?.narrow(2, t.index, 1)?.squeeze(2)?),
        Op::Embedding(_) => embedding(g, i, x),
    }
}

/// The table's row for every id: `[N, T]` ids (f32) → `[N, D, T, 1]`. Ids are checked on
/// the host (they come from there): one that is not a row is an error, not a panic.
fn embedding(g: &Graph, i: NodeId, x: &Tensor) -> Result<Tensor> {
    let w = param(g, i, WEIGHT)?;
    let (n, t) = x.dims2()?;
    let (vocab, dim) = w.dims2()?;
    let idx = if x.device().is_cpu() {
        let ids = x.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = ids
            .iter()
            .find(|&&v| !(v >= 0.0 && v < vocab as f32 && v.fract() == 0.0))
        {
            anyhow::bail!(
                "token id {bad} at node '{}' is not a row of its {vocab}-entry table",
                g.nodes[i].name
            );
        }
        Tensor::from_vec(
            ids.iter().map(|&v| v as u32).collect::<Vec<_>>(),
            n * t,
            x.device(),
        )?
    } else {
        // Off the CPU the ids were checked on the host by `fit_input` before they moved:
        // reading them back would synchronise the device every step.
        x.flatten_all()?.to_dtype(candle_core::DType::U32)?
    };
    let rows = w.index_select(&idx, 0)?;
    Ok(rows
        .reshape((n, t, dim))?
        .transpose(1, 2)?
        .contiguous()?
        .unsqueeze(3)?)
}

fn param(g: &Graph, i: NodeId, name: &str) -> Result<Tensor> {
    Ok(g.param(i, name)?.as_tensor().clone())
}

pub(crate) fn conv_cfg(c: &Conv2d) -> ConvCfg {
    ConvCfg {
        stride: c.stride,
        padding: c.padding,
        dilation: c.dilation,
        groups: c.groups,
    }
}

/// The weight node `i` runs with: its parameter, masked if the pass carries a mask for it.
fn weight(g: &Graph, i: NodeId, ctx: &Ctx) -> Result<Tensor> {
    let w = g.param(i, WEIGHT)?.as_tensor();
    // A shared weight carries its owner's mask.
    Ok(
        match ctx.weight_masks.and_then(|m| m.get(&g.param_owner(i))) {
            None => w.clone(),
            Some(m) if m.straight_through => {
                // w + sg(m⊙w − w): value m⊙w, gradient identity.
                (w + (w * &m.mask.to_device(w.device())?)?.sub(w)?.detach())?
            }
            Some(m) => (w * &m.mask.to_device(w.device())?)?,
        },
    )
}

fn conv(
    g: &Graph,
    i: NodeId,
    c: &Conv2d,
    x: &Tensor,
    ctx: &Ctx,
    sw: Option<&SparseWeight>,
    relu: bool,
) -> Result<Tensor> {
    let cfg = conv_cfg(c);
    if let Some(sw) = sw {
        let b = c.bias.then(|| param(g, i, BIAS)).transpose()?;
        let b = b.map(|b| b.to_vec1::<f32>()).transpose()?;
        let epi = SparseEpilogue {
            scale: None,
            bias: b.as_deref(),
            act: relu.then_some(ActivationKind::Relu),
        };
        let w_dims = g.param(i, WEIGHT)?.dims().to_vec();
        return kernels::sparse::conv2d(x, sw, &w_dims, cfg, &epi, None);
    }
    let w = weight(g, i, ctx)?;
    if c.bias {
        kernels::conv2d_bias_act(x, &w, &param(g, i, BIAS)?, cfg, relu)
    } else {
        kernels::conv2d(x, &w, cfg)
    }
}

/// Eval-mode conv `i` run with its epilogue: bias (with the batch norm folded in, its
/// weights scaled at plan time), + residual, + activation — one pass over the output
/// instead of one per node. A conv with compressed sparse weights applies all of it in its
/// own epilogue.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_folded(
    g: &Graph,
    i: NodeId,
    f: &Folded,
    x: &Tensor,
    act: Option<ActivationKind>,
    residual: Option<&Tensor>,
    ctx: &Ctx,
    sw: Option<&SparseWeight>,
) -> Result<Tensor> {
    let Op::Conv2d(c) = &g.nodes[i].op else {
        anyhow::bail!("internal: fold plan names a non-conv node");
    };
    let cfg = conv_cfg(c);
    if let Some(sw) = sw {
        let w_dims = g.param(i, WEIGHT)?.dims().to_vec();
        let epi = SparseEpilogue {
            scale: f.sparse_scale(sw),
            bias: Some(&f.bias),
            act,
        };
        return kernels::sparse::conv2d(x, sw, &w_dims, cfg, &epi, residual);
    }
    let masked = ctx.weight_masks.and_then(|m| m.get(&i)).is_some();
    let w = match (
        ctx.weight_masks.and_then(|m| m.get(&i)),
        &f.weight,
        &f.scale,
    ) {
        (None, Some(w), _) => w.clone(),
        (_, _, None) => weight(g, i, ctx)?,
        (_, _, Some(scale)) => {
            // A masked weight (or no precomputed fold): scale it now.
            let w = weight(g, i, ctx)?;
            let mut wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
            crate::graph::fold::scale_rows(&mut wv, scale);
            Tensor::from_vec(wv, w.dims(), w.device())?
        }
    };
    // Unmasked weights are the plan's (a snapshot, like the folded bias): pack them once.
    let second = f.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1;
    let packed = if masked || !second {
        None
    } else {
        f.packed.get_or_init(|| pack_for(&w, x, cfg)).clone()
    };
    kernels::conv2d_epilogue_packed(x, &w, packed, f.bias.clone(), act, residual, cfg)
}

/// `w` packed for the kernel that takes this conv's geometry on the CPU, if that kernel
/// uses packed weights (else `None`, and the conv runs as it would unpacked).
fn pack_for(
    w: &Tensor,
    x: &Tensor,
    cfg: ConvCfg,
) -> Option<std::sync::Arc<kernels::conv::PackedWeight>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || kernels::reference_ops() {
        return None;
    }
    let geo = cfg.geo(x.dims(), w.dims()).ok()?;
    if !kernels::conv::PackedWeight::wanted(&geo) {
        return None;
    }
    let wv: Vec<f32> = w.flatten_all().ok()?.to_vec1().ok()?;
    kernels::conv::PackedWeight::for_geo(&geo, &wv).map(std::sync::Arc::new)
}

/// Eval-mode linear layer `i` with the activation after it (if any) fused into its
/// output pass, and its weight packed once for the plan (`pack`).
pub(crate) fn linear_act(
    g: &Graph,
    i: NodeId,
    x: &Tensor,
    act: Option<ActivationKind>,
    ctx: &Ctx,
    sw: Option<&SparseWeight>,
    pack: Option<&LinearPack>,
) -> Result<Tensor> {
    let Op::Linear(l) = &g.nodes[i].op else {
        anyhow::bail!("internal: linear epilogue on a non-linear node");
    };
    let masked = ctx
        .weight_masks
        .and_then(|m| m.get(&g.param_owner(i)))
        .is_some();
    if sw.is_some() || (!l.bias && pack.is_none()) {
        let y = linear(g, i, l, x, ctx, sw)?;
        return match act {
            Some(k) => activation(&y, k),
            None => Ok(y),
        };
    }
    let w = weight(g, i, ctx)?;
    let b = l.bias.then(|| param(g, i, BIAS)).transpose()?;
    // Unmasked weights are the plan's: pack them once (at the second call, as convs do).
    let packed = pack.filter(|_| !masked).and_then(|p| {
        let second = p.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1;
        second
            .then(|| p.packed.get_or_init(|| pack_linear(&w, x)).clone())
            .flatten()
    });
    kernels::linear_packed(x, &w, b.as_ref(), act, packed)
}

/// `w` packed for the register-tile panels, if they run on this machine and device.
fn pack_linear(w: &Tensor, x: &Tensor) -> Option<std::sync::Arc<Vec<f32>>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || kernels::reference_ops() {
        return None;
    }
    if !kernels::panel::enabled() || w.rank() != 2 {
        return None;
    }
    let (o, i) = (w.dim(0).ok()?, w.dim(1).ok()?);
    let wv: Vec<f32> = w.flatten_all().ok()?.to_vec1().ok()?;
    Some(std::sync::Arc::new(kernels::panel::pack_cols(&wv, o, i)))
}

fn linear(
    g: &Graph,
    i: NodeId,
    l: &Linear,
    x: &Tensor,
    ctx: &Ctx,
    sw: Option<&SparseWeight>,
) -> Result<Tensor> {
    let b = l.bias.then(|| param(g, i, BIAS)).transpose()?;
    // A few rows: the gather-based product only wins when very sparse (measured: the MLP
    // at batch 1 is slower sparse at 70 %, faster at 90 %).
    let few_rows = x.dim(0)? <= 4;
    if let Some(sw) = sw.filter(|s| !few_rows || s.csr.density() <= 0.15) {
        let bv = b.map(|b| b.to_vec1::<f32>()).transpose()?;
        return kernels::sparse::linear(x, &sw.csr, bv.as_deref());
    }
    kernels::linear(x, &weight(g, i, ctx)?, b.as_ref())
}

fn batch_norm(
    g: &Graph,
    i: NodeId,
    bn: &BatchNorm,
    x: &Tensor,
    ctx: &Ctx,
    relu: bool,
) -> Result<Tensor> {
    let (w, b) = (param(g, i, WEIGHT)?, param(g, i, BIAS)?);
    let (rm, rv) = (g.param(i, RUNNING_MEAN)?, g.param(i, RUNNING_VAR)?);
    if !ctx.mode.batch_statistics() {
        return Ok(kernels::batch_norm(x, &w, &b, Some((rm, rv)), bn.eps, relu)?.0);
    }
    let (y, st) = kernels::batch_norm(x, &w, &b, None, bn.eps, relu)?;
    if let (Some(st), true) = (st, ctx.update_stats) {
        // PyTorch's running averages: the variance with Bessel's correction.
        let m = ctx.bn_momentum.unwrap_or(bn.momentum) as f32;
        let unbias = st.count as f32 / (st.count.max(2) - 1) as f32;
        let ema = |old: &[f32], new: &[f32], k: f32| -> Vec<f32> {
            old.iter()
                .zip(new)
                .map(|(o, b)| (1.0 - m) * o + m * b * k)
                .collect()
        };
        if let Some((mean, var)) = &st.on_device {
            // Off the CPU: the same averages as tensor ops, nothing read back.
            let (om, ov) = (rm.as_tensor(), rv.as_tensor());
            rm.set(&(om.affine(1.0 - m as f64, 0.0)? + mean.affine(m as f64, 0.0)?)?)?;
            rv.set(&(ov.affine(1.0 - m as f64, 0.0)? + var.affine((m * unbias) as f64, 0.0)?)?)?;
            return Ok(y);
        }
        let old_m = rm.as_tensor().to_vec1::<f32>()?;
        let old_v = rv.as_tensor().to_vec1::<f32>()?;
        let dev = rm.device();
        rm.set(&Tensor::from_vec(
            ema(&old_m, &st.mean, 1.0),
            old_m.len(),
            dev,
        )?)?;
        rv.set(&Tensor::from_vec(
            ema(&old_v, &st.var, unbias),
            old_v.len(),
            dev,
        )?)?;
    }
    Ok(y)
}

fn gather(gth: &ChannelGather, x: &Tensor) -> Result<Tensor> {
    let idx: Vec<u32> = gth.indices.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(idx, gth.indices.len(), x.device())?;
    Ok(x.index_select(&idx, 1)?)
}

/// A transposed conv as a direct conv (so it runs on lopper's conv kernel, forward and
/// backward, with any padding): zeros inserted between input pixels (stride), the kernel
/// flipped and transposed per group, padding `d·(k−1) − pad` per side (a negative amount
/// crops), `output_padding` added at the bottom/right.
fn conv_transpose(
    g: &Graph,
    i: NodeId,
    c: &crate::graph::ops::ConvTranspose2d,
    x: &Tensor,
    ctx: &Ctx,
) -> Result<Tensor> {
    let (n, cin, h, w) = x.dims4()?;
    let gr = c.groups;
    // Zero insertion: [N,C,H,W] → [N,C,(H−1)s+1,(W−1)s+1].
    let up = |t: Tensor, axis: usize, s: usize| -> Result<Tensor> {
        if s == 1 {
            return Ok(t);
        }
        let len = t.dim(axis)?;
        let t = t.unsqueeze(axis + 1)?.pad_with_zeros(axis + 1, 0, s - 1)?;
        let mut dims = t.dims().to_vec();
        dims.remove(axis + 1);
        dims[axis] = len * s;
        Ok(t.reshape(dims)?.narrow(axis, 0, (len - 1) * s + 1)?)
    };
    let xu = up(up(x.clone(), 2, c.stride[0])?, 3, c.stride[1])?;
    // Weight [I, O/g, kh, kw] → [O, I/g, kh, kw], spatially flipped.
    let wt = weight(g, i, ctx)?;
    let (kh, kw) = (c.kernel[0], c.kernel[1]);
    let og = c.out_channels / gr;
    let wt = wt
        .reshape((gr, cin / gr, og, kh, kw))?
        .transpose(1, 2)?
        .reshape((c.out_channels, cin / gr, kh, kw))?;
    let flip =
        |len: usize| Tensor::from_vec((0..len as u32).rev().collect::<Vec<_>>(), len, x.device());
    let wt = wt
        .index_select(&flip(kh)?, 2)?
        .index_select(&flip(kw)?, 3)?
        .contiguous()?;
    // Padding per side; negative means crop afterwards.
    let side = |k: usize, d: usize, p: usize, extra: usize| {
        d as i64 * (k as i64 - 1) - p as i64 + extra as i64
    };
    let pads = [
        side(kh, c.dilation[0], c.padding[0], 0),
        side(kw, c.dilation[1], c.padding[1], 0),
        side(kh, c.dilation[0], c.padding[2], c.output_padding[0]),
        side(kw, c.dilation[1], c.padding[3], c.output_padding[1]),
    ];
    let cfg = ConvCfg {
        stride: [1, 1],
        padding: pads.map(|p| p.max(0) as usize),
        dilation: c.dilation,
        groups: gr,
    };
    let mut y = kernels::conv2d(&xu, &wt, cfg)?;
    let (oh, ow) = (c.out_len(0, h), c.out_len(1, w));
    let (Some(oh), Some(ow)) = (oh, ow) else {
        anyhow::bail!("ConvTranspose2d output is empty for a {h}x{w} input");
    };
    let crop = |p: i64| (-p).max(0) as usize;
    y = y
        .narrow(2, crop(pads[0]), oh)?
        .narrow(3, crop(pads[1]), ow)?;
    let _ = n;
    Ok(if c.bias {
        y.broadcast_add(&param(g, i, BIAS)?.reshape((1, c.out_channels, 1, 1))?)?
    } else {
        y
    })
}

/// Pads H and W; reflect and edge read the source rows/columns by index (so the
/// gradient flows back to them).
fn spatial_pad(p: &crate::graph::ops::SpatialPad, x: &Tensor) -> Result<Tensor> {
    use crate::graph::ops::PadMode;
    let [t, l, b, r] = p.pads;
    if let PadMode::Constant { value } = p.mode {
        let y = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
        if value == 0.0 {
            return Ok(y);
        }
        // Add `value` on the border only: the padded ones-mask of x is 1 inside, 0 out.
        let inside = x
            .ones_like()?
            .pad_with_zeros(2, t, b)?
            .pad_with_zeros(3, l, r)?;
        return Ok((y + (inside.affine(-1.0, 1.0)? * value as f64)?)?);
    }
    let index = |len: usize, before: usize, after: usize| -> Vec<u32> {
        (0..len + before + after)
            .map(|o| {
                let i = o as i64 - before as i64;
                let last = len as i64 - 1;
                let j = match p.mode {
                    PadMode::Reflect => {
                        if i < 0 {
                            -i
                        } else if i > last {
                            2 * last - i
                        } else {
                            i
                        }
                    }
                    _ => i.clamp(0, last),
                };
                j as u32
            })
            .collect()
    };
    let (h, w) = (x.dim(2)?, x.dim(3)?);
    let iy = Tensor::from_vec(index(h, t, b), h + t + b, x.device())?;
    let ix = Tensor::from_vec(index(w, l, r), w + l + r, x.device())?;
    Ok(x.index_select(&iy, 2)?.index_select(&ix, 3)?)
}

/// `A_h · x · A_wᵀ` with the op's interpolation matrices (differentiable: both products
/// are matmuls). Run by the plan with matrices built once per input shape
/// ([`resize_matrices`]); this path serves a direct call.
fn resize(r: &crate::graph::ops::Resize, x: &Tensor) -> Result<Tensor> {
    let (ah, awt) = resize_pair(r, x.dim(2)?, x.dim(3)?, x.device())?;
    resize_by(x, &ah, &awt)
}

/// `(A_h, A_wᵀ)` of resize `r` for an `h × w` input.
fn resize_pair(
    r: &crate::graph::ops::Resize,
    h: usize,
    w: usize,
    dev: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let (oh, ow) = r.out_size(h, w);
    let ah = Tensor::from_vec(r.matrix(true, h, oh), (oh, h), dev)?;
    let awt = Tensor::from_vec(r.matrix(false, w, ow), (ow, w), dev)?
        .t()?
        .contiguous()?;
    Ok((ah, awt))
}

/// The interpolation matrices of every resize in `g`, for its per-sample `shapes`.
pub(crate) fn resize_matrices(
    g: &Graph,
    shapes: &[crate::graph::Shape],
) -> Result<HashMap<NodeId, (Tensor, Tensor)>> {
    let mut m = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if let Op::Resize(r) = &n.op {
            let s = &shapes[n.inputs[0]];
            m.insert(i, resize_pair(r, s[1], s[2], &g.device())?);
        }
    }
    Ok(m)
}

/// Applies precomputed interpolation matrices: `A_h · (x · A_wᵀ)`.
pub(crate) fn resize_by(x: &Tensor, ah: &Tensor, awt: &Tensor) -> Result<Tensor> {
    Ok(ah.broadcast_matmul(&x.broadcast_matmul(awt)?)?)
}

/// `max(x, 0) + slope[c]·min(x, 0)`, the slope broadcast over the channel axis.
fn prelu(g: &Graph, i: NodeId, x: &Tensor) -> Result<Tensor> {
    let slope = g.param(i, WEIGHT)?.as_tensor().clone();
    let mut shape = vec![1usize; x.rank()];
    shape[1] = slope.dim(0)?;
    let slope = slope.reshape(shape)?;
    Ok((x.relu()? + x.minimum(0f32)?.broadcast_mul(&slope)?)?)
}

fn affine(g: &Graph, i: NodeId, a: &ChannelAffine, x: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1usize; x.rank()];
    shape[1] = a.channels;
    let w = param(g, i, WEIGHT)?.reshape(shape.as_slice())?;
    let b = param(g, i, BIAS)?.reshape(shape.as_slice())?;
    Ok(x.broadcast_mul(&w)?.broadcast_add(&b)?)
}

/// LayerNorm across channels (axis 1 of the batch), at every position.
fn layer_norm(g: &Graph, i: NodeId, l: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    let (w, b) = (param(g, i, WEIGHT)?, param(g, i, BIAS)?);
    if l.rms {
        return kernels::rms_norm(x, &w, &b, l.eps);
    }
    kernels::layer_norm(x, &w, &b, l.eps)
}

/// `[N, C, P…]` → `[N, C, 1 + ΠP, 1]`: the learned token first, then the positions.
fn class_token(g: &Graph, i: NodeId, x: &Tensor, no_grad: bool) -> Result<Tensor> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let w = param(g, i, WEIGHT)?;
    if no_grad && x.device().is_cpu() {
        // Without a gradient, one pass writing each channel's token and its positions
        // (candle's concatenation along the last axis copied position by position: 1.3 ms
        // per pass of a CIFAR ViT at batch 64, 4 % of it).
        let t = x.elem_count() / (n * c).max(1);
        let mut out = vec![0f32; n * c * (t + 1)];
        kernels::cpu::with_f32(x, |xs| {
            kernels::cpu::with_f32(&w, |tok| {
                kernels::par::chunks_mut(&mut out, c * (t + 1), |img, o| {
                    let xi = &xs[img * c * t..(img + 1) * c * t];
                    for ((oc, xc), &tc) in
                        o.chunks_exact_mut(t + 1).zip(xi.chunks_exact(t)).zip(tok)
                    {
                        oc[0] = tc;
                        oc[1..].copy_from_slice(xc);
                    }
                })
            })
        })??;
        return Ok(Tensor::from_vec(out, (n, c, t + 1, 1), x.device())?);
    }
    let tok = w.reshape((1, c, 1))?.broadcast_as((n, c, 1))?;
    Ok(Tensor::cat(&[&tok, &x.flatten_from(2)?], 2)?.unsqueeze(3)?)
}

/// `x + e`, the `[C, T]` embedding laid over `x`'s positions.
fn pos_embed(g: &Graph, i: NodeId, x: &Tensor, no_grad: bool) -> Result<Tensor> {
    let e = param(g, i, WEIGHT)?;
    if no_grad && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        // Without a gradient, one vectorised pass per image (candle's broadcast add: 1.3
        // ms per pass of a CIFAR ViT at batch 64).
        let per = e.elem_count();
        let mut out = vec![0f32; x.elem_count()];
        kernels::cpu::with_f32(x, |xs| {
            kernels::cpu::with_f32(&e, |es| {
                kernels::par::chunks_mut(&mut out, per.max(1), |img, o| {
                    let xi = &xs[img * per..(img + 1) * per];
                    for ((ov, &xv), &ev) in o.iter_mut().zip(xi).zip(es) {
                        *ov = xv + ev;
                    }
                })
            })
        })??;
        return Ok(Tensor::from_vec(out, x.dims(), x.device())?);
    }
    let mut shape = x.dims().to_vec();
    shape[0] = 1;
    let e = e.reshape(shape.as_slice())?;
    Ok(x.broadcast_add(&e)?)
}

/// Multi-head self-attention on stacked q/k/v channels `[N, 3·H·d, T…]` → `[N, H·d, T…]`.
fn attention(a: &MultiHeadAttention, x: &Tensor) -> Result<Tensor> {
    kernels::attention(x, a.heads, a.kv(), a.head_dim, a.scale)
}

fn pool(pc: &Pool2d, x: &Tensor, max: bool) -> Result<Tensor> {
    let cfg = PoolCfg {
        kernel: pc.kernel,
        stride: pc.stride,
        padding: pc.padding,
        ceil_mode: pc.ceil_mode,
        count_include_pad: pc.count_include_pad,
    };
    kernels::pool2d(x, cfg, max)
}

fn reshape(r: &Reshape, x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    let mut shape = vec![n];
    shape.extend(r.resolve(x.elem_count() / n.max(1))?);
    Ok(x.reshape(shape)?)
}

/// `ins[0] ∘ ins[1] ∘ …` with a broadcasting binary op.
fn fold_inputs(
    ins: &[&Tensor],
    op: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let mut y = ins[0].clone();
    for t in &ins[1..] {
        y = op(&y, t)?;
    }
    Ok(y)
}

/// Inverted dropout, seeded per pass and node so a pass is reproducible.
fn dropout(d: &Dropout, i: NodeId, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
    if !ctx.mode.dropout_active() || d.p == 0.0 {
        return Ok(x.clone());
    }
    let mut rng = Pcg64::seed_from_u64(ctx.seed ^ ((i as u64 + 1) << 32));
    let keep = 1.0 - d.p;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.gen::<f32>() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    Ok(x.mul(&Tensor::from_vec(mask, x.dims(), x.device())?)?)
}

/// Element-wise activation on candle ops (these are cheap next to conv and batch norm).
pub fn activation(x: &Tensor, kind: ActivationKind) -> Result<Tensor> {
    kernels::activation(x, kind)
}
