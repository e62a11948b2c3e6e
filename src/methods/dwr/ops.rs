//! The three DWR operators on the engine (spec §4, all [I]): depth removes residual blocks
//! in the order of the relative norm of their branch output (the spec's cheap criterion,
//! measured once on the dense model); width keeps a uniform fraction of every dependency
//! group by L1 (residual streams share one channel set per stage, from the groups); the
//! resolution operator sets the input size of a globally pooled net.

use crate::data::Dataset;
use crate::exec::{forward_with, ForwardOpts, Mode};
use crate::graph::{Graph, NodeId};
use crate::prune::{
    dependency_groups, plan, remove_blocks, remove_units, residual_blocks, with_resolution, Budget,
    Criterion, PlanConfig, Scope,
};
use crate::train::fit_input;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// The depth axis of a model: removable blocks in removal order, and the block count.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DepthOrder {
    /// Names of the Add nodes of removable blocks, least important first.
    pub adds: Vec<String>,
    /// All residual merges (two-input adds, including downsampling blocks whose shortcut
    /// is a projection or padding): the depth denominator.
    pub total_blocks: usize,
}

fn l2(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64)
}

/// Ranks removable blocks by `E ‖branch(x)‖ / ‖x‖` on `samples` of `data`.
pub fn depth_order(g: &Graph, data: &Dataset, samples: usize) -> Result<DepthOrder> {
    let blocks = residual_blocks(g)?;
    let removable: Vec<_> = blocks.iter().filter(|b| b.removable).collect();
    if removable.is_empty() {
        bail!("the model has no removable residual block: depth pruning needs identity-shortcut blocks");
    }
    let mut keep: Vec<NodeId> = Vec::new();
    for b in &removable {
        keep.push(b.skip);
        let branch_out = g.nodes[b.add]
            .inputs
            .iter()
            .copied()
            .find(|&i| i != b.skip)
            .expect("a residual add has a branch input");
        keep.push(branch_out);
    }
    let mut score = vec![0f64; removable.len()];
    let sample = data.sample(samples.min(data.len()), 7)?;
    let pos: Vec<usize> = (0..sample.len()).collect();
    for chunk in pos.chunks(128) {
        let (x, _) = sample.batch(chunk, None, &Device::Cpu)?;
        let x = fit_input(g, x)?;
        let opts = ForwardOpts {
            keep: &keep,
            ..ForwardOpts::new(Mode::Eval)
        };
        let out = forward_with(g, &x, &opts)?;
        for (k, pair) in keep.chunks(2).enumerate() {
            score[k] += l2(&out.kept[&pair[1]])? / l2(&out.kept[&pair[0]])?.max(1e-12);
        }
    }
    let mut idx: Vec<usize> = (0..removable.len()).collect();
    idx.sort_by(|&a, &b| score[a].total_cmp(&score[b]).then(a.cmp(&b)));
    Ok(DepthOrder {
        adds: idx
            .iter()
            .map(|&i| g.nodes[removable[i].add].name.clone())
            .collect(),
        total_blocks: g
            .nodes
            .iter()
            .filter(|n| matches!(n.op, crate::graph::ops::Op::Add(_)) && n.inputs.len() == 2)
            .count()
            .max(blocks.len()),
    })
}

/// Removes the first `n` blocks of the order.
pub fn prune_depth(g: &Graph, order: &DepthOrder, n: usize) -> Result<Graph> {
    let adds: Vec<NodeId> = order.adds[..n.min(order.adds.len())]
        .iter()
        .map(|name| {
            g.node_id(name)
                .ok_or_else(|| anyhow::anyhow!("block '{name}' is not in the model"))
        })
        .collect::<Result<_>>()?;
    remove_blocks(g, &adds)
}

/// Total prunable channels over all groups (the width denominator).
pub fn prunable_channels(g: &Graph) -> Result<usize> {
    Ok(dependency_groups(g)?
        .groups
        .iter()
        .map(|gr| gr.prunable_units().len())
        .sum())
}

/// Removes the fraction `1 − keep` of every group's prunable channels, by L1.
pub fn prune_width(g: &Graph, keep: f64) -> Result<Graph> {
    if keep >= 1.0 {
        return g.deep_clone();
    }
    let groups = dependency_groups(g)?;
    let cfg = PlanConfig {
        criterion: Criterion::L1,
        scope: Scope::Local,
        budget: Budget::Ratio(1.0 - keep),
        round_to: 1,
        lamp: false,
        overrides: vec![],
        seed: 0,
    };
    let removal = plan(g, &groups, &cfg, None)?;
    remove_units(g, &groups, &removal)
}

/// Sets the input resolution to `px × px`.
pub fn prune_resolution(g: &Graph, px: usize) -> Result<Graph> {
    match super::pipeline::base_px(g)? {
        Some(p) if p != px => with_resolution(g, px, px),
        // The same size, or a model without an image input (its resolution is pinned).
        _ => g.deep_clone(),
    }
}
