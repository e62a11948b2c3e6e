//! Fusion planning: which nodes run fused with the ReLU that follows them.

use crate::graph::ops::{ActivationKind, Op};
use crate::graph::{Graph, NodeId, Shape};

pub struct Fusion {
    /// `fused_relu[i]`: node `i` (BatchNorm or a two-input Add of equal shapes) applies the
    /// ReLU of its only consumer.
    pub fused_relu: Vec<bool>,
    /// `alias[j] = Some(i)`: ReLU node `j` takes node `i`'s (already activated) value.
    pub alias: Vec<Option<NodeId>>,
}

/// Plans BN+ReLU and Add+ReLU fusion; nodes in `keep` and graph outputs are never fused
/// away, because their own value must stay observable.
pub fn plan(g: &Graph, keep: &[NodeId], consumers: &[Vec<NodeId>], shapes: &[Shape]) -> Fusion {
    let n = g.nodes.len();
    let mut fused_relu = vec![false; n];
    let mut alias = vec![None; n];
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
        if let Op::Activation(a) = &g.nodes[j].op {
            if a.kind == ActivationKind::Relu {
                fused_relu[i] = true;
                alias[j] = Some(i);
            }
        }
    }
    Fusion { fused_relu, alias }
}
