//! Fusion planning (part of a [`super::Plan`]): which nodes run fused with the ReLU that follows them, and (in eval
//! mode) which convolutions absorb the batch norm after them.

use crate::graph::ops::{ActivationKind, Op};
use crate::graph::{Graph, NodeId, Shape};

#[derive(Debug)]
pub struct Fusion {
    /// `fused_relu[i]`: node `i` (BatchNorm or a two-input Add of equal shapes) applies the
    /// ReLU of its only consumer.
    pub fused_relu: Vec<bool>,
    /// `alias[j] = Some(i)`: node `j` (a fused ReLU, or a batch norm folded into a conv)
    /// takes node `i`'s value.
    pub alias: Vec<Option<NodeId>>,
    /// `fold_bn[i] = Some(j)`: conv `i` runs with batch norm `j` folded into its weights and
    /// bias (eval mode only), and with `j`'s fused ReLU if it had one.
    pub fold_bn: Vec<Option<NodeId>>,
    /// `fold_add[i] = Some((add, other))`: folded conv `i` also performs the residual
    /// `add` of its batch norm's output with node `other` (computed before `i`), and the
    /// add's fused ReLU.
    pub fold_add: Vec<Option<(NodeId, NodeId)>>,
}

/// Plans BN+ReLU and Add+ReLU fusion; nodes in `keep` (whose own value must stay
/// observable, or which have an input mask) and graph outputs never take part.
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
    let mut fold_bn = vec![None; n];
    let mut fold_add = vec![None; n];
    for (i, node) in g.nodes.iter().enumerate() {
        let fusable = match &node.op {
            Op::BatchNorm(_) => true,
            Op::Add(_) => {
                node.inputs.len() == 2 && shapes[node.inputs[0]] == shapes[node.inputs[1]]
            }
            _ => false,
        };
        if !fusable || keep.contains(&i) || g.outputs.contains(&i) || consumers[i].len() != 1 {
            continue;
        }
        let j = consumers[i][0];
        if keep.contains(&j) {
            continue;
        }
        if let Op::Activation(a) = &g.nodes[j].op {
            if a.kind == ActivationKind::Relu {
                fused_relu[i] = true;
                alias[j] = Some(i);
            }
        }
    }
    if eval {
        for (i, node) in g.nodes.iter().enumerate() {
            if !matches!(node.op, Op::Conv2d(_))
                || keep.contains(&i)
                || g.outputs.contains(&i)
                || consumers[i].len() != 1
            {
                continue;
            }
            let j = consumers[i][0];
            if !matches!(g.nodes[j].op, Op::BatchNorm(_))
                || shapes[j].len() != 3
                || keep.contains(&j)
            {
                continue;
            }
            fold_bn[i] = Some(j);
            alias[j] = Some(i);
            // relu(bn(conv) + shortcut): the add joins the epilogue too.
            let free = !keep.contains(&j) && !g.outputs.contains(&j) && !fused_relu[j];
            if let ([k], true) = (&consumers[j][..], free) {
                let add = &g.nodes[*k];
                if matches!(add.op, Op::Add(_))
                    && !keep.contains(k)
                    && add.inputs.len() == 2
                    && shapes[add.inputs[0]] == shapes[add.inputs[1]]
                {
                    let other = if add.inputs[0] == j {
                        add.inputs[1]
                    } else {
                        add.inputs[0]
                    };
                    if other < i && other != j {
                        fold_add[i] = Some((*k, other));
                        alias[*k] = Some(j);
                    }
                }
            }
        }
    }
    Fusion {
        fused_relu,
        alias,
        fold_bn,
        fold_add,
    }
}
