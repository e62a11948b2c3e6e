//! Views: a computed tensor seen through data movements that the IR does not perform.
//!
//! Transformer exports move the axes of the token tensor around (`[N, T, D]` ↔ `[T, N, D]`;
//! heads split off the embedding axis and moved in front of the tokens; keys transposed),
//! while lopper's IR keeps every token tensor channels-first (`[D, T, 1]` per sample, so
//! that projections are 1×1 convolutions). Instead of translating each Transpose, Reshape
//! or Gather into an IR op, the importer keeps such a value as a [`View`]: the IR node it
//! reads and, for every element of the ONNX tensor (at batch 1), the flat per-sample index
//! of the IR element it is. Data movements transform that index with the same constant
//! folding that shape arithmetic uses. The ops that compute (a MatMul by a weight,
//! LayerNormalization, a bias or position-embedding add, attention) check that the index
//! has the form they need, usually *channel-last*: the ONNX tensor's last axis is the IR
//! node's channel axis and the other axes pick positions. Whatever else reads a view gets
//! it materialised as an IR Transpose + Reshape, or an error naming the node when no such
//! pair produces it.
//!
//! The index is exact: it is held as f64 (integers to 2⁵³) and derived by the same code
//! that folds constants, so a pattern is recognised only when it *is* the computation.

use super::shape::{permute_const, reshape_node};
use super::{Ctx, NodeId, Value};
use crate::graph::ops::{param, ChannelAffine, Op, Reshape, Transpose};
use crate::graph::shape::numel;
use crate::onnx::value::Const;
use anyhow::{bail, Result};

/// Per-element ops of one input: on a view they run on its node and keep its index.
pub(super) const ELEMENTWISE: &[&str] = &[
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "Elu",
    "Selu",
    "Softplus",
    "Mish",
    "Gelu",
    "HardSwish",
    "Tanh",
    "Identity",
    "Dropout",
    "Cast",
];

/// Ops whose converters handle views themselves (the rest get them materialised).
pub(super) const AWARE: &[&str] = &[
    "Transpose",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Gather",
    "Concat",
    "MatMul",
    "Gemm",
    "LayerNormalization",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Softmax",
    "Shape",
    "Erf",
    "GatherND",
    "And",
    "Where",
    "Pow",
    "ReduceMean",
    "Sqrt",
    "Reciprocal",
    "Expand",
];

/// An ONNX tensor that is a rearrangement (and a scalar multiple) of an IR node's output.
#[derive(Clone, Debug)]
pub(crate) struct View {
    pub node: NodeId,
    /// ONNX dims (batch 1); each value is the flat per-sample index of the IR element.
    pub index: Const,
    /// A pending scalar factor: attention exports scale q and k before their product,
    /// which becomes the attention op's scale.
    pub scale: f64,
    /// The per-sample shape the node was reshaped to where the view began (`None`: the
    /// node's own): materialising tries transposes of it (YOLO heads' `[3, 9, H, W]`).
    pub frame: Option<Vec<usize>>,
}

impl View {
    /// The IR node as it is (batch first, then its per-sample axes). Reshapes are looked
    /// through (flat indices do not change), so that channels are the producer's.
    pub fn identity(ctx: &Ctx, node: NodeId) -> View {
        let mut src = node;
        while matches!(
            ctx.op(src),
            Op::Reshape(_) | Op::Flatten(_) | Op::Identity(_)
        ) {
            src = ctx.first_input(src);
        }
        let s = ctx.shape(node);
        let mut dims = vec![1];
        dims.extend(s);
        View {
            node: src,
            index: Const {
                dims,
                data: (0..numel(s)).map(|i| i as f64).collect(),
            },
            scale: 1.0,
            frame: (src != node).then(|| s.clone()),
        }
    }

    /// The same node and scale seen through another index.
    pub fn with_index(&self, index: Const) -> View {
        View {
            node: self.node,
            index,
            scale: self.scale,
            frame: self.frame.clone(),
        }
    }

    /// Another node of the same shape seen through this view's index (an element-wise
    /// op's output).
    pub fn on(&self, node: NodeId) -> View {
        View {
            node,
            index: self.index.clone(),
            scale: 1.0,
            frame: self.frame.clone(),
        }
    }

    /// Reads every element of its node once, in order.
    fn is_identity(&self) -> bool {
        self.index
            .data
            .iter()
            .enumerate()
            .all(|(i, &v)| v == i as f64)
    }
}

/// A channel-last reading of a view: its last ONNX axis is the IR node's channel axis and
/// every other index (a row) is one IR position.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ChannelLast {
    pub channels: usize,
    /// Positions of the IR node (the product of its non-channel axes).
    pub positions: usize,
    /// The IR position of each row, in ONNX order.
    pub pos: Vec<usize>,
}

impl ChannelLast {
    /// Rows that read every position once, in any order.
    pub fn covers_all(&self) -> bool {
        let mut seen = vec![false; self.positions];
        self.pos.len() == self.positions
            && self
                .pos
                .iter()
                .all(|&p| !std::mem::replace(&mut seen[p], true))
    }

    /// The index of a channel-last view with `channels` channels over the same positions,
    /// the ONNX dims being `prefix` + `[channels]`.
    pub fn index(&self, prefix: &[usize], channels: usize) -> Const {
        let mut dims = prefix.to_vec();
        dims.push(channels);
        let mut data = Vec::with_capacity(self.pos.len() * channels);
        for &p in &self.pos {
            data.extend((0..channels).map(|c| (c * self.positions + p) as f64));
        }
        Const { dims, data }
    }
}

impl ChannelLast {
    /// Tokens `[1, T, channels]` over a `[channels, T, …]` node whose positions are the
    /// tokens in order (an embedding lookup, a class token's output).
    pub fn tokens(channels: usize, t: usize) -> ChannelLast {
        ChannelLast {
            channels,
            positions: t,
            pos: (0..t).collect(),
        }
    }

    /// `node` (a fresh op's output) seen through this reading with `channels` channels,
    /// the ONNX dims being `prefix` + `[channels]`.
    pub fn view_of(
        &self,
        ctx: &mut Ctx,
        label: &str,
        node: NodeId,
        prefix: &[usize],
        channels: usize,
    ) -> Result<Value> {
        settle(
            ctx,
            label,
            View {
                node,
                frame: None,
                index: self.index(prefix, channels),
                scale: 1.0,
            },
        )
    }
}

/// The channel-last reading of `v`, if it has one.
pub(crate) fn channel_last(ctx: &Ctx, v: &View) -> Option<ChannelLast> {
    let s = ctx.shape(v.node);
    let c = s[0];
    let p = numel(&s[1..]);
    if v.index.dims.last() != Some(&c) || c == 0 {
        return None;
    }
    let rows = v.index.numel() / c;
    let mut pos = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &v.index.data[r * c..(r + 1) * c];
        let base = row[0] as usize;
        if base >= p
            || row
                .iter()
                .enumerate()
                .any(|(ch, &i)| i as usize != ch * p + base)
        {
            return None;
        }
        pos.push(base);
    }
    Some(ChannelLast {
        channels: c,
        positions: p,
        pos,
    })
}

/// `v`'s node with the pending scale applied (a channel affine), as a view of it.
pub(super) fn apply_scale(ctx: &mut Ctx, label: &str, v: &View) -> Result<View> {
    if v.scale == 1.0 {
        return Ok(v.clone());
    }
    let c = ctx.shape(v.node)[0];
    let params = vec![
        (param::WEIGHT, super::tensor(vec![v.scale as f32; c], &[c])?),
        (param::BIAS, super::tensor(vec![0.0; c], &[c])?),
    ];
    let node = ctx.add(
        &format!("{label}_scale"),
        Op::ChannelAffine(ChannelAffine { channels: c }),
        &[v.node],
        params,
    )?;
    Ok(View {
        node,
        index: v.index.clone(),
        scale: 1.0,
        frame: v.frame.clone(),
    })
}

/// A plain tensor whose *last* axis holds the features (a float `[N, T, F]` input of
/// token features) as a channel-last view over one IR transpose that moves that axis first:
/// the only data movement lopper performs for such inputs.
pub(super) fn channels_last_of(ctx: &mut Ctx, label: &str, x: NodeId) -> Result<View> {
    let s = ctx.shape(x).clone();
    let r = s.len();
    let mut perm = vec![r - 1];
    perm.extend(0..r - 1);
    let t = ctx.add(
        &format!("{label}_channels"),
        Op::Transpose(Transpose { perm }),
        &[x],
        vec![],
    )?;
    let p = numel(&s[..r - 1]);
    let cl = ChannelLast {
        channels: s[r - 1],
        positions: p,
        pos: (0..p).collect(),
    };
    let mut prefix = vec![1];
    prefix.extend(&s[..r - 1]);
    Ok(View {
        node: t,
        index: cl.index(&prefix, s[r - 1]),
        scale: 1.0,
        frame: None,
    })
}

/// `node` as a rank-3 `[C, P, 1]` tensor when it is `[C, P]` (1×1 convolutions and
/// attention need an image-shaped input; flat indices do not change).
pub(super) fn rank3(ctx: &mut Ctx, label: &str, node: NodeId) -> Result<NodeId> {
    let s = ctx.shape(node).clone();
    match s.len() {
        3 => Ok(node),
        2 => ctx.add(
            &format!("{label}_tokens"),
            Op::Reshape(Reshape {
                shape: vec![s[0] as i64, s[1] as i64, 1],
            }),
            &[node],
            vec![],
        ),
        _ => bail!("expected a [channels, positions] tensor, got per-sample shape {s:?}"),
    }
}

/// The value a view stands for: the node itself when the view reads it unchanged (so
/// transposes that undo each other cost nothing), else the view.
pub(super) fn settle(ctx: &mut Ctx, label: &str, v: View) -> Result<Value> {
    if v.scale == 1.0
        && v.index.dims.first() == Some(&1)
        && v.index.numel() == numel(ctx.shape(v.node))
        && v.is_identity()
    {
        return reshape_node(ctx, label, v.node, &v.index.dims);
    }
    Ok(Value::View(v))
}

/// Every permutation of `0..r` (r ≤ 6 in practice).
fn permutations(r: usize) -> Vec<Vec<usize>> {
    if r == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(r - 1) {
        for k in 0..=p.len() {
            let mut q = p.clone();
            q.insert(k, r - 1);
            out.push(q);
        }
    }
    out
}

/// The view as an IR node in ONNX layout (batch first): a Transpose of the node's
/// per-sample axes and a Reshape, when such a pair reads the elements in the view's order.
pub(super) fn materialise(ctx: &mut Ctx, label: &str, v: &View) -> Result<NodeId> {
    let v = apply_scale(ctx, label, v)?;
    let s = ctx.shape(v.node).clone();
    let dims = v.index.dims.clone();
    if v.index.numel() != numel(&s) {
        bail!(
            "the tensor {dims:?} reads part of a computed tensor through a data movement; \
             lopper supports that only where a layer, attention or a token selection consumes it"
        );
    }
    if dims.first() != Some(&1) {
        bail!("the tensor {dims:?} has the batch axis moved from axis 0, which lopper cannot run as a layer input");
    }
    let mut frames = vec![s.clone()];
    frames.extend(v.frame.clone());
    for f in frames.into_iter().rev().filter(|f| f.len() <= 6) {
        let iota = Const {
            dims: f.clone(),
            data: (0..numel(&f)).map(|i| i as f64).collect(),
        };
        for perm in permutations(f.len()) {
            if permute_const(&iota, &perm)?.data != v.index.data {
                continue;
            }
            let mut x = v.node;
            if f != s {
                let mut full = vec![1];
                full.extend(&f);
                x = match reshape_node(ctx, &format!("{label}_frame"), x, &full)? {
                    Value::Node(n) => n,
                    _ => unreachable!("reshape_node returns a node"),
                };
            }
            let x = if perm.iter().enumerate().all(|(i, &p)| i == p) {
                x
            } else {
                ctx.add(
                    &format!("{label}_transpose"),
                    Op::Transpose(Transpose { perm }),
                    &[x],
                    vec![],
                )?
            };
            return match reshape_node(ctx, label, x, &dims)? {
                Value::Node(n) => Ok(n),
                _ => unreachable!("reshape_node returns a node"),
            };
        }
    }
    bail!(
        "the data movement from a per-sample {s:?} tensor to {dims:?} is not a transpose and \
         reshape lopper can run"
    )
}

/// `take(c, axis, indices)`: ONNX Gather on a constant of any rank (negative indices wrap).
pub(super) fn take(c: &Const, axis: usize, idx: &Const) -> Result<Const> {
    let len = c.dims[axis];
    let outer: usize = c.dims[..axis].iter().product();
    let inner: usize = c.dims[axis + 1..].iter().product();
    let picks = idx
        .ints()
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + len as i64 } else { i };
            if j < 0 || j >= len as i64 {
                bail!("Gather index {i} is out of range for an axis of {len}");
            }
            Ok(j as usize)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut data = Vec::with_capacity(outer * picks.len() * inner);
    for o in 0..outer {
        for &j in &picks {
            let at = (o * len + j) * inner;
            data.extend_from_slice(&c.data[at..at + inner]);
        }
    }
    let mut dims = c.dims[..axis].to_vec();
    dims.extend(&idx.dims);
    dims.extend(&c.dims[axis + 1..]);
    Ok(Const { dims, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_all_distinct() {
        let p = permutations(4);
        assert_eq!(p.len(), 24);
        let set: std::collections::HashSet<_> = p.into_iter().collect();
        assert_eq!(set.len(), 24);
    }

    #[test]
    fn take_matches_onnx_gather() {
        // data [2, 3], axis 1, indices [[2, 0]] -> [2, 1, 2]
        let c = Const {
            dims: vec![2, 3],
            data: vec![0., 1., 2., 3., 4., 5.],
        };
        let idx = Const {
            dims: vec![1, 2],
            data: vec![2., 0.],
        };
        let t = take(&c, 1, &idx).unwrap();
        assert_eq!(t.dims, vec![2, 1, 2]);
        assert_eq!(t.data, vec![2., 0., 5., 3.]);
        let s = take(&c, 0, &Const::scalar(-1.0)).unwrap();
        assert_eq!(s.dims, vec![3]);
        assert_eq!(s.data, vec![3., 4., 5.]);
        assert!(take(&c, 0, &Const::scalar(2.0)).is_err());
    }
}
