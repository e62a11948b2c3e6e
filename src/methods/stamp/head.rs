//! A new classifier head for a target label set (spec §4.2 step 3): the final linear layer
//! gets `classes` outputs with fresh PyTorch-default weights; everything else is kept.

use crate::graph::init::Init;
use crate::graph::ops::Op;
use crate::graph::{param_key, Graph};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

pub fn with_head(g: &Graph, classes: usize, seed: u64) -> Result<Graph> {
    let Some(&out) = g.outputs.first() else {
        bail!("the model has no output");
    };
    let Some(i) = (0..=out)
        .rev()
        .find(|&i| matches!(g.nodes[i].op, Op::Linear(_)))
    else {
        bail!("the model has no linear classifier to replace");
    };
    let mut nodes = g.nodes.clone();
    let Op::Linear(l) = &mut nodes[i].op else {
        unreachable!()
    };
    if l.out_features == classes {
        return g.deep_clone();
    }
    l.out_features = classes;
    let op = nodes[i].op.clone();
    let mut params: BTreeMap<String, Tensor> = g
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    for (name, t) in Init::new(seed).op_params(&op)? {
        params.insert(param_key(&nodes[i].name, name), t);
    }
    Graph::with_parts(nodes, g.outputs.clone(), params)?.keeping(g)
}
