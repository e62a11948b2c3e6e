//! The pruning report: cost, latency, accuracy at each stage and per-layer widths.

use crate::exec::{Feeds, Mode, Plan, PlanOpts};
use crate::graph::cost::cost;
use crate::graph::ops::Op;
use crate::graph::Graph;
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub params: u64,
    pub macs: u64,
    pub latency_b1_ms: f64,
    pub latency_b64_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerWidth {
    pub node: String,
    pub before: usize,
    pub after: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PruneReport {
    pub method: String,
    pub scope: String,
    pub budget: String,
    pub dense: Snapshot,
    pub pruned: Snapshot,
    pub macs_ratio: f64,
    pub params_ratio: f64,
    pub acc_dense: Option<f64>,
    pub acc_pruned: Option<f64>,
    pub acc_finetuned: Option<f64>,
    pub prune_seconds: f64,
    pub finetune_seconds: f64,
    pub widths: Vec<LayerWidth>,
    /// Method-specific detail (e.g. i-SpaSP's per-module selection times).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    /// Per-epoch fine-tuning log with test accuracy (`--curve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune_history: Option<Vec<crate::train::EpochLog>>,
    /// Problems the numbers above carry (e.g. non-finite outputs counted as wrong).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Groups of the dense model that could not be pruned fully, and which op blocks each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<crate::prune::BlockedGroup>,
}

/// Median eval-mode latency over `reps` runs after 2 warm-ups, at batch `b`.
pub fn latency_ms(g: &Graph, b: usize, reps: usize) -> Result<f64> {
    let xs = crate::exec::random_inputs(g, b)?;
    let x: Vec<&Tensor> = xs.iter().collect();
    // Planned once, as an inference session would (sparse kernels if the graph wants them).
    let plan = Plan::new(g, Mode::Eval, &PlanOpts::default())?;
    let feeds = Feeds::default();
    for _ in 0..2 {
        plan.run_inputs(g, &x, &feeds)?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        plan.run_inputs(g, &x, &feeds)?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

pub fn snapshot(g: &Graph, reps: usize) -> Result<Snapshot> {
    let c = cost(g)?;
    Ok(Snapshot {
        params: c.total_params,
        macs: c.total_macs,
        latency_b1_ms: latency_ms(g, 1, reps * 5)?,
        latency_b64_ms: latency_ms(g, 64, reps)?,
    })
}

/// Output widths of every conv and linear layer, dense vs pruned (matched by name).
pub fn widths(dense: &Graph, pruned: &Graph) -> Vec<LayerWidth> {
    let width = |op: &Op| match op {
        Op::Conv2d(c) => Some(c.out_channels),
        Op::ConvTranspose2d(c) => Some(c.out_channels),
        Op::Linear(l) => Some(l.out_features),
        _ => None,
    };
    dense
        .nodes
        .iter()
        .filter_map(|n| {
            let before = width(&n.op)?;
            let after = pruned
                .node_id(&n.name)
                .and_then(|i| width(&pruned.nodes[i].op))?;
            Some(LayerWidth {
                node: n.name.clone(),
                before,
                after,
            })
        })
        .collect()
}
