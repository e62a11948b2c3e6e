//! Fusion planning (part of a [`super::Plan`]). In eval mode every convolution runs with an
//! epilogue that absorbs what follows it — its batch norm (folded into the weights), a
//! residual add, and any activation of the IR — and a linear layer absorbs its activation:
//! one pass over each output while it is in cache instead of one per node. Batch norms
//! and adds that no conv absorbed (and every one in training mode) still apply the ReLU
//! after them in their own kernel.

use crate::graph::ops::{ActivationKind, Op};
use crate::graph::{Graph, NodeId, Shape};

/// What an eval-mode conv or linear node performs besides itself.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Epi {
    /// The batch norm folded into the conv's weights and bias.
    pub bn: Option<NodeId>,
    /// The residual add `(add, other)`: the output plus node `other` (computed before).
    pub add: Option<(NodeId, NodeId)>,
    /// The activation applied last.
    pub act: Option<ActivationKind>,
}

#[derive(Debug)]
pub struct Fusion {
    /// `fused_relu[i]`: node `i` (BatchNorm, a two-input Add of equal shapes, or in
    /// training a conv with a bias) applies the ReLU of its only consumer.
    pub fused_relu: Vec<bool>,
    /// `alias[j] = Some(i)`: node `j` (fused into an earlier node) takes node `i`'s value.
    pub alias: Vec<Option<NodeId>>,
    /// `epilogue[i]`: eval-mode conv or linear `i` runs with these nodes fused in.
    pub epilogue: Vec<Option<Epi>>,
}

/// The only consumer of `i`, if `i` has exactly one and neither is pinned or an output.
fn sole_consumer(
    g: &Graph,
    i: NodeId,
    keep: &[NodeId],
    consumers: &[Vec<NodeId>],
) -> Option<NodeId> {
    if keep.contains(&i) || g.outputs.contains(&i) {
        return None;
    }
    match consumers[i][..] {
        [j] if !keep.contains(&j) => Some(j),
        _ => None,
    }
}

/// A two-input add of equal shapes (no broadcasting).
fn plain_add(g: &Graph, k: NodeId, shapes: &[Shape]) -> bool {
    let add = &g.nodes[k];
    matches!(add.op, Op::Add(_))
        && add.inputs.len() == 2
        && shapes[add.inputs[0]] == shapes[add.inputs[1]]
}

/// The epilogue of conv or linear `i`, and the chain of nodes it absorbs as
/// `(node, node whose value it takes)`.
fn epilogue_of(
    g: &Graph,
    i: NodeId,
    keep: &[NodeId],
    consumers: &[Vec<NodeId>],
    shapes: &[Shape],
) -> (Epi, Vec<(NodeId, NodeId)>) {
    let mut absorbed = Vec::new();
    let conv = matches!(g.nodes[i].op, Op::Conv2d(_));
    let mut e = Epi::default();
    let mut cur = i;
    let next = |cur| sole_consumer(g, cur, keep, consumers);
    if let Some(j) = next(cur).filter(|&j| conv && shapes[j].len() == 3) {
        if matches!(g.nodes[j].op, Op::BatchNorm(_)) {
            e.bn = Some(j);
            absorbed.push((j, cur));
            cur = j;
        }
    }
    if let Some(k) = next(cur).filter(|&k| conv && plain_add(g, k, shapes)) {
        let ins = &g.nodes[k].inputs;
        let other = if ins[0] == cur { ins[1] } else { ins[0] };
        if other < i && other != cur {
            e.add = Some((k, other));
            absorbed.push((k, cur));
            cur = k;
        }
    }
    if let Some(a) = next(cur) {
        if let Op::Activation(act) = &g.nodes[a].op {
            e.act = Some(act.kind);
            absorbed.push((a, cur));
        }
    }
    (e, absorbed)
}

/// Plans the fusion; nodes in `keep` (whose own value must stay observable, or which have
/// an input mask) and graph outputs are never fused away. `eval`: inference rewrites
/// (epilogues) are allowed.
pub fn plan(
    g: &Graph,
    keep: &[NodeId],
    consumers: &[Vec<NodeId>],
    shapes: &[Shape],
    eval: bool,
) -> Fusion {
    let n = g.nodes.len();
    let mut fused_relu = vec![false; n];
    let mut alias = vec![None; n];
    let mut epilogue = vec![None; n];
    if eval {
        for (i, node) in g.nodes.iter().enumerate() {
            if !matches!(node.op, Op::Conv2d(_) | Op::Linear(_)) || keep.contains(&i) {
                continue;
            }
            let (e, absorbed) = epilogue_of(g, i, keep, consumers, shapes);
            // A conv always runs through its epilogue (its bias is fused there); a linear
            // layer fuses its bias itself and only gains from an activation.
            if matches!(node.op, Op::Conv2d(_)) || e.act.is_some() {
                epilogue[i] = Some(e);
                for (j, src) in absorbed {
                    alias[j] = Some(src);
                }
            }
        }
    }
    for (i, node) in g.nodes.iter().enumerate() {
        let fusable = match &node.op {
            Op::BatchNorm(_) => true,
            Op::Add(_) => plain_add(g, i, shapes),
            // Training a conv with a bias and no batch norm (eval mode has epilogues).
            Op::Conv2d(c) => !eval && c.bias,
            _ => false,
        };
        if !fusable || alias[i].is_some() {
            continue;
        }
        let Some(j) = sole_consumer(g, i, keep, consumers) else {
            continue;
        };
        if let Op::Activation(a) = &g.nodes[j].op {
            if a.kind == ActivationKind::Relu && alias[j].is_none() {
                fused_relu[i] = true;
                alias[j] = Some(i);
            }
        }
    }
    Fusion {
        fused_relu,
        alias,
        epilogue,
    }
}
