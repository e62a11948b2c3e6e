//! Multi-head attention recognised from its arithmetic, whatever the exporter's reshapes.
//!
//! Exporters write scaled dot-product attention as `softmax(q·kᵀ·s [+ mask]) · v` on
//! per-head tensors that reshapes, transposes and gathers cut out of the projections
//! (PyTorch's `nn.MultiheadAttention` moves the batch behind the tokens and merges it with
//! the heads; Hugging Face models keep it in front; the dynamo exporter splits the scale
//! between q and k). The importer follows these as [views](super::view), so when the
//! first MatMul of two computed tensors arrives, each operand is known element by element:
//! which projection channel and which token every entry is. [`Attn`] carries the scores and
//! then the probabilities; the second MatMul checks the three operands *are* per-head
//! slices of projections over the same tokens (head `b` of q, k and v reading the same
//! `d` channels for every token, keys and values in the same token order, covering every
//! position) and emits lopper's `MultiHeadAttention` on the q/k/v projections stacked into
//! one layer. Anything else (cross-attention over other positions, a score used twice) is
//! an error naming the node: lopper does not guess at an attention it cannot prune.

use super::view::{rank3, View};
use super::{Ctx, NodeId, Value};
use crate::graph::ops::{param, ChannelGather, Concat, Conv2d, MultiHeadAttention, Op};
use crate::graph::shape::numel;
use crate::onnx::value::Const;
use anyhow::{bail, Result};

/// Scores (`q·kᵀ`, scaled) or probabilities (their softmax over the keys).
#[derive(Clone, Debug)]
pub(crate) struct Attn {
    pub probs: bool,
    /// Transposed probabilities `[…, keys, queries]`, for `v[…, d, T] · pᵀ` (channels-first
    /// exports such as lopper's own).
    pub transposed: bool,
    /// Per-head queries `[…, T, d]`.
    pub q: View,
    /// Per-head keys, transposed: `[…, d, T]`.
    pub k: View,
    /// The product of every scalar applied to the scores.
    pub scale: f64,
    /// ONNX dims of the scores `[…, T, T]`.
    pub dims: Vec<usize>,
    /// The key mask's node (`[T]` per sample, 1 keep, 0 masked), if scores were masked.
    pub mask: Option<NodeId>,
}

/// The per-head reading of an attention operand.
struct Heads {
    /// `chans[b][j]`: the IR channel of head-batch `b`, feature `j`.
    chans: Vec<Vec<usize>>,
    /// The IR position of each token.
    pos: Vec<usize>,
    /// Positions of the IR node.
    positions: usize,
}

/// Decodes a `[…, T, d]` operand (or `[…, d, T]` when `tokens_last`): every head-batch
/// index `b` and feature `j` must read one IR channel for all tokens, and every token one
/// IR position for all heads and features.
fn heads(ctx: &Ctx, v: &View, tokens_last: bool, what: &str) -> Result<Heads> {
    let dims = &v.index.dims;
    let r = dims.len();
    if r < 2 {
        bail!("attention's {what} has shape {dims:?}; expected [..., tokens, head features]");
    }
    let (t_n, d_n) = if tokens_last {
        (dims[r - 1], dims[r - 2])
    } else {
        (dims[r - 2], dims[r - 1])
    };
    let b_n = numel(&dims[..r - 2]);
    let s = ctx.shape(v.node);
    let p = numel(&s[1..]);
    let mut chans = vec![vec![usize::MAX; d_n]; b_n];
    let mut pos = vec![usize::MAX; t_n];
    for (b, ch) in chans.iter_mut().enumerate() {
        #[allow(clippy::needless_range_loop)] // t indexes the element and its position
        for t in 0..t_n {
            for (j, c) in ch.iter_mut().enumerate() {
                let at = b * t_n * d_n
                    + if tokens_last {
                        j * t_n + t
                    } else {
                        t * d_n + j
                    };
                let e = v.index.data[at] as usize;
                let (c_here, p_here) = (e / p, e % p);
                if *c == usize::MAX {
                    *c = c_here;
                }
                if pos[t] == usize::MAX {
                    pos[t] = p_here;
                }
                if *c != c_here || pos[t] != p_here {
                    bail!(
                        "attention's {what} {dims:?} is not a per-head slice of a projection over \
                         tokens (element ({b}, {t}, {j}) reads channel {c_here} at position \
                         {p_here}); lopper recognises attention on the heads of q/k/v projections"
                    );
                }
            }
        }
    }
    Ok(Heads {
        chans,
        pos,
        positions: p,
    })
}

/// `q·kᵀ` of two computed tensors: the start of attention (checked now so that an
/// unrecognised product fails at its own node).
pub(super) fn scores(ctx: &Ctx, q: View, k: View) -> Result<Value> {
    let hq = heads(ctx, &q, false, "query")?;
    let hk = heads(ctx, &k, true, "key (transposed)")?;
    let (qd, kd) = (&q.index.dims, &k.index.dims);
    if qd[..qd.len() - 2] != kd[..kd.len() - 2] || hq.chans[0].len() != hk.chans[0].len() {
        bail!("attention scores of queries {qd:?} and transposed keys {kd:?}: the heads or head sizes differ");
    }
    let mut dims = qd[..qd.len() - 1].to_vec();
    dims.push(hk.pos.len());
    Ok(Value::Attn(Box::new(Attn {
        probs: false,
        transposed: false,
        q,
        k,
        scale: 1.0,
        dims,
        mask: None,
    })))
}

/// `softmax(scores)·v`: the attention op over the stacked projections, and its output as a
/// view `[…, T, d]` like the exporter's.
/// Scores plus an additive key mask (`Where(mask, 0, -inf)` of a 0/1 tensor): the mask
/// must give every key one value for all heads and queries (a padding mask, not a causal
/// one) and read the keys' own positions.
pub(super) fn with_mask(ctx: &Ctx, a: &Attn, m: &View) -> Result<Value> {
    if a.probs || a.mask.is_some() {
        bail!("an attention mask added to probabilities or twice");
    }
    let scores = Const {
        dims: a.dims.clone(),
        data: vec![0.0; numel(&a.dims)],
    };
    let idx = super::fold::map_n(&[&scores, &m.index], |x| x[1])?;
    if idx.dims != a.dims {
        bail!(
            "an attention mask {:?} larger than the scores {:?}",
            m.index.dims,
            a.dims
        );
    }
    let tk = *a.dims.last().unwrap_or(&0);
    let keys = &idx.data[..tk];
    if idx.data.chunks(tk).any(|row| row != keys) {
        bail!("an attention mask that differs between heads or queries (e.g. causal) is not supported; lopper takes key padding masks");
    }
    let k = heads(ctx, &a.k, true, "key (transposed)")?;
    let n = numel(ctx.shape(m.node));
    if n != k.positions || keys.iter().zip(&k.pos).any(|(&e, &p)| e as usize != p) {
        bail!("an attention mask whose entries are not the keys' positions");
    }
    let mut out = a.clone();
    out.mask = Some(m.node);
    Ok(Value::Attn(Box::new(out)))
}

/// The attention probabilities transposed (the last two axes swapped).
pub(super) fn transpose(a: &Attn, perm: &[usize]) -> Result<Attn> {
    let r = perm.len();
    let swap = r >= 2
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2
        && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p);
    if !swap || !a.probs {
        bail!(
            "a transpose {perm:?} of attention {}: lopper follows the swap of keys and queries \
             of the probabilities only",
            if a.probs { "probabilities" } else { "scores" }
        );
    }
    let mut t = a.clone();
    t.transposed = !a.transposed;
    t.dims.swap(r - 2, r - 1);
    Ok(t)
}

/// `softmax(scores)·v` (or `v·softmax(scores)ᵀ` when `v_first`).
pub(super) fn finish(
    ctx: &mut Ctx,
    label: &str,
    a: &Attn,
    v: &View,
    v_first: bool,
) -> Result<Value> {
    if !a.probs {
        bail!("a product of attention scores with values before their softmax is not attention");
    }
    if a.transposed != v_first {
        bail!("a product of attention probabilities with values whose orientation is not softmax(q·kᵀ)·v or v·softmax(q·kᵀ)ᵀ");
    }
    let q = heads(ctx, &a.q, false, "query")?;
    let mut k = heads(ctx, &a.k, true, "key (transposed)")?;
    let mut vv = heads(ctx, v, v_first, "value")?;
    let (hn, d) = (q.chans.len(), q.chans[0].len());
    // Grouped-query attention: runs of `r` query heads reading one key/value head.
    let r = (1..=hn)
        .rev()
        .find(|&r| {
            hn % r == 0
                && k.chans.len() == hn
                && vv.chans.len() == hn
                && (0..hn)
                    .all(|b| k.chans[b] == k.chans[b / r * r] && vv.chans[b] == vv.chans[b / r * r])
        })
        .unwrap_or(1);
    if r > 1 {
        k.chans = k.chans.iter().step_by(r).cloned().collect();
        vv.chans = vv.chans.iter().step_by(r).cloned().collect();
    } else if k.chans.len() == hn && (1..hn).any(|b| (0..b).any(|c| k.chans[c] == k.chans[b])) {
        bail!("attention whose query heads share key/value heads other than in runs (heads h·r … h·r + r − 1 reading kv head h): not supported");
    }
    let kv_heads = hn / r;
    if k.chans.len() != kv_heads || vv.chans.len() != kv_heads || vv.chans[0].len() != d {
        bail!(
            "attention with {hn} heads of {d} for queries but {} of {} for values",
            vv.chans.len(),
            vv.chans[0].len()
        );
    }
    if k.pos != vv.pos {
        bail!("attention whose keys and values are in a different token order");
    }
    let p = q.positions;
    let mut seen = vec![false; p];
    let covers = k.positions == p
        && vv.positions == p
        && k.pos.len() == p
        && k.pos
            .iter()
            .all(|&x| !std::mem::replace(&mut seen[x], true));
    if !covers {
        bail!(
            "attention over {} keys of a tensor with {p} positions: lopper recognises \
             self-attention over every token",
            k.pos.len()
        );
    }
    let input = stacked(
        ctx,
        label,
        [
            (a.q.node, &q.chans),
            (a.k.node, &k.chans),
            (v.node, &vv.chans),
        ],
    )?;
    let mut op = MultiHeadAttention::new(hn, d);
    if kv_heads != hn {
        op.kv_heads = kv_heads;
    }
    op.scale = a.scale * a.q.scale * a.k.scale;
    op.masked = a.mask.is_some();
    let mut ins = vec![input];
    ins.extend(a.mask);
    let node = ctx.add(label, Op::MultiHeadAttention(op), &ins, vec![])?;
    let r = a.dims.len();
    let mut dims = a.dims[..r - 2].to_vec();
    let t_n = q.pos.len();
    let mut data = Vec::with_capacity(hn * t_n * d);
    if v_first {
        dims.extend([d, t_n]);
        for b in 0..hn {
            for j in 0..d {
                data.extend(q.pos.iter().map(|&pt| ((b * d + j) * p + pt) as f64));
            }
        }
    } else {
        dims.extend([t_n, d]);
        for b in 0..hn {
            for &pt in &q.pos {
                data.extend((0..d).map(|j| ((b * d + j) * p + pt) as f64));
            }
        }
    }
    Ok(Value::View(View {
        node,
        frame: None,
        index: Const { dims, data },
        scale: v.scale,
    }))
}

/// A 1×1, ungrouped, unpadded convolution's input, if `n` is one.
fn pointwise_input(ctx: &Ctx, n: NodeId) -> Option<NodeId> {
    match ctx.op(n) {
        Op::Conv2d(c)
            if c.kernel == [1, 1]
                && c.stride == [1, 1]
                && c.padding == [0; 4]
                && c.dilation == [1, 1]
                && c.groups == 1 =>
        {
            Some(ctx.first_input(n))
        }
        _ => None,
    }
}

/// The `[3·H·d, P…]` input of the attention op: q's heads, then k's, then v's. The
/// projection itself when it is already in that order; one projection built from the rows
/// of the q/k/v projections when they are 1×1 convolutions of the same tensor (Hugging
/// Face's three Linears, a permuted fused one); else a concatenation and a channel gather.
fn stacked(ctx: &mut Ctx, label: &str, parts: [(NodeId, &Vec<Vec<usize>>); 3]) -> Result<NodeId> {
    let rows: Vec<(NodeId, usize)> = parts
        .iter()
        .flat_map(|(n, ch)| ch.iter().flatten().map(move |&c| (*n, c)))
        .collect();
    let x = parts[0].0;
    if parts.iter().all(|p| p.0 == x)
        && ctx.shape(x)[0] == rows.len()
        && rows.iter().enumerate().all(|(i, r)| r.1 == i)
    {
        return rank3(ctx, label, x);
    }
    let src = pointwise_input(ctx, x);
    if let Some(src) = src.filter(|&s| parts.iter().all(|p| pointwise_input(ctx, p.0) == Some(s))) {
        let cin = ctx.shape(src)[0];
        let (mut w, mut b) = (Vec::with_capacity(rows.len() * cin), Vec::new());
        for &(n, c) in &rows {
            let wt = ctx.param(n, param::WEIGHT)?;
            w.extend_from_slice(&wt[c * cin..(c + 1) * cin]);
            b.push(match ctx.param(n, param::BIAS) {
                Ok(bias) => bias[c],
                Err(_) => 0.0,
            });
        }
        let o = rows.len();
        let conv = Conv2d::new(cin, o, 1, 1, 0).with_bias(true);
        let params = vec![
            (param::WEIGHT, super::tensor(w, &[o, cin, 1, 1])?),
            (param::BIAS, super::tensor(b, &[o])?),
        ];
        return ctx.add(&format!("{label}_qkv"), Op::Conv2d(conv), &[src], params);
    }
    // General case: the distinct sources side by side, then the rows picked out.
    let mut srcs: Vec<NodeId> = Vec::new();
    for p in &parts {
        if !srcs.contains(&p.0) {
            srcs.push(p.0);
        }
    }
    let mut offset = std::collections::HashMap::new();
    let mut total = 0;
    let mut ins = Vec::new();
    for &s in &srcs {
        offset.insert(s, total);
        total += ctx.shape(s)[0];
        ins.push(rank3(ctx, label, s)?);
    }
    let cat = if ins.len() == 1 {
        ins[0]
    } else {
        ctx.add(
            &format!("{label}_qkv_concat"),
            Op::Concat(Concat { axis: 0 }),
            &ins,
            vec![],
        )?
    };
    let indices = rows.iter().map(|(n, c)| offset[n] + c).collect();
    ctx.add(
        &format!("{label}_qkv"),
        Op::ChannelGather(ChannelGather {
            in_channels: total,
            indices,
        }),
        &[cat],
        vec![],
    )
}
