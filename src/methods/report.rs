//! The one report every compression job returns — structured pruning (`prune`, and each
//! structured step of `lopper run`) and post-training sparsity (`sparsify`, and each sparse
//! step) — and that `--json` prints. One schema, versioned by [`SCHEMA`], with the same keys
//! for both kinds of job (a key that does not apply is `null`), so that tools reading the
//! reports, the recipe runner and the HTML report need not know which command produced
//! one. Documented key by key in `docs/report-schema.md`.
//!
//! The dense model and the result are measured the same way ([`Measured`]): structure
//! (parameters, MACs), weights (non-zero MACs, sparsity), accuracy and latency. Which of
//! them the job changed is the method's business; the report states all of them.

use crate::exec::{Feeds, Mode, Plan, PlanOpts};
use crate::graph::cost::cost;
use crate::graph::ops::Op;
use crate::graph::Graph;
use crate::sparse::layers::{sparsity_report, LayerSparsity};
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

/// The schema name and version every report carries in its `schema` key. The version goes
/// up when a key changes meaning or disappears (added keys keep it).
pub const SCHEMA: &str = "lopper.report/1";

/// Which kind of job produced a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Structured pruning: channels removed, the model is smaller.
    Prune,
    /// Post-training sparsity: weights zeroed, the structure unchanged.
    Sparsify,
}

/// One model as measured: the dense start or the job's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub params: u64,
    /// Multiply-accumulates of one sample, counting every weight (the structure's cost).
    pub macs: u64,
    /// MACs of the conv and linear layers over their non-zero weights only (what a sparse
    /// kernel can skip); other layers counted in full.
    pub nonzero_macs: u64,
    /// Fraction of zero weights over all conv and linear layers.
    pub sparsity: f64,
    /// Test top-1 (`null`: no test data, e.g. data-free pruning).
    pub top1: Option<f64>,
    /// Median eval-mode latency, batch 1 and batch 64, in ms (planned once, as an inference
    /// session would; sparse models on the sparse kernels where they are faster).
    pub latency_b1_ms: f64,
    pub latency_b64_ms: f64,
}

/// One conv, transposed-conv or linear layer of the dense model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    pub name: String,
    /// Output channels / features, dense and in the result.
    pub width_before: usize,
    pub width_after: usize,
    /// Weights of the layer in the result, and how many are zero.
    pub weights: usize,
    pub zeros: usize,
    /// `zeros / weights` (0 for a layer without weights).
    pub sparsity: f64,
}

/// Wall time, in seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Seconds {
    /// The method itself: choosing what to remove (structured: choosing and cutting
    /// channels; sparsity: masks, search and the method's own training such as UniPTS's).
    pub method: f64,
    /// Training after (and between) pruning steps; 0 when the job does none.
    pub finetune: f64,
}

/// The report of one job (see the module doc and `docs/report-schema.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: String,
    pub command: Command,
    /// The method as the user named it (`l1`, `ispasp`, `unipts`, ...).
    pub method: String,
    /// The budget in words that say whether a fraction is kept or removed ("keep 50 % of
    /// MACs", "90 % of weights zero").
    pub budget: String,
    /// Structured pruning's ranking scope (`local`, `global`); `null` for sparsity.
    pub scope: Option<String>,
    /// Sparsity pattern (`unstructured`, `2:4`); `null` for structured pruning.
    pub pattern: Option<String>,
    /// Calibration samples the method read (`null`: none, or as many as the method chose).
    pub calib: Option<usize>,
    pub dense: Measured,
    pub result: Measured,
    /// Top-1 right after pruning, before any fine-tuning (`null` for sparsity jobs, whose
    /// training is part of the method, and without test data).
    pub top1_before_finetune: Option<f64>,
    pub seconds: Seconds,
    pub layers: Vec<Layer>,
    /// Per-epoch fine-tuning log with test accuracy (`--eval-every-epoch`).
    pub finetune_history: Option<Vec<crate::train::EpochLog>>,
    /// Method-specific detail (i-SpaSP's per-module times, DWR's predictor, UniPTS's
    /// genome, search and per-epoch training log).
    pub details: Option<serde_json::Value>,
    /// Problems the numbers above carry (e.g. non-finite outputs counted as wrong).
    pub warnings: Vec<String>,
    /// Groups of the dense model that could not be pruned fully, and which op blocks each.
    pub blocked: Vec<crate::prune::BlockedGroup>,
}

impl Report {
    /// The result's MACs as a fraction of the dense MACs: structure for pruning, non-zero
    /// weights for sparsity (the cost each kind of job reduces).
    pub fn macs_fraction(&self) -> f64 {
        let (d, r) = match self.command {
            Command::Prune => (self.dense.macs, self.result.macs),
            Command::Sparsify => (self.dense.macs, self.result.nonzero_macs),
        };
        r as f64 / d.max(1) as f64
    }

    /// The result's parameters as a fraction of the dense parameters.
    pub fn params_fraction(&self) -> f64 {
        self.result.params as f64 / self.dense.params.max(1) as f64
    }

    /// Per-layer structure for charts: kept width (% of dense) for pruning, zero weights
    /// (%) for sparsity.
    pub fn layer_bars(&self) -> Vec<(String, f64)> {
        self.layers
            .iter()
            .map(|l| {
                let v = match self.command {
                    Command::Prune => l.width_after as f64 / l.width_before.max(1) as f64,
                    Command::Sparsify => l.sparsity,
                };
                (l.name.clone(), 100.0 * v)
            })
            .collect()
    }

    /// The headline accuracy (fine-tuned if it was, else right after the job).
    pub fn accuracy(&self) -> Option<f64> {
        self.result.top1
    }

    /// Fraction of zero weights (sparse steps only).
    pub fn sparsity(&self) -> Option<f64> {
        (self.command == Command::Sparsify).then_some(self.result.sparsity)
    }

    /// Measured latency of the result at batch 1 and 64, in ms.
    pub fn latency_ms(&self) -> (f64, f64) {
        (self.result.latency_b1_ms, self.result.latency_b64_ms)
    }

    /// The sparse-training loss per epoch (UniPTS), if the step trained.
    pub fn loss_curve(&self) -> Vec<(f64, f64)> {
        #[derive(Deserialize)]
        struct Epoch {
            epoch: usize,
            loss: f64,
            #[serde(default)]
            kl: Option<f64>,
        }
        self.details
            .as_ref()
            .and_then(|d| d.get("train"))
            .and_then(|t| serde_json::from_value::<Vec<Epoch>>(t.clone()).ok())
            .unwrap_or_default()
            .into_iter()
            // The KL to the teacher where recorded (never negative), else the objective.
            .map(|e| (e.epoch as f64, e.kl.unwrap_or(e.loss)))
            .collect()
    }
}

/// Seconds one latency measurement may take: past it, fewer runs are timed.
const LATENCY_BUDGET_S: f64 = 5.0;

/// Median eval-mode latency over `reps` runs after 2 warm-ups, at batch `b`. A model whose
/// first run is slow (ViT-B/16 at batch 64 takes a minute on 2 cores) gets as many runs as
/// fit [`LATENCY_BUDGET_S`], at least one: the first run itself when even that is over.
pub fn latency_ms(g: &Graph, b: usize, reps: usize) -> Result<f64> {
    let xs = crate::exec::random_inputs(g, b)?;
    let x: Vec<&Tensor> = xs.iter().collect();
    // Planned once, as an inference session would (sparse kernels if the graph wants them).
    let plan = Plan::new(g, Mode::Eval, &PlanOpts::default())?;
    let feeds = Feeds::default();
    let s = Instant::now();
    plan.run_inputs(g, &x, &feeds)?;
    let first = s.elapsed().as_secs_f64();
    if first > LATENCY_BUDGET_S / 2.0 {
        return Ok(first * 1e3);
    }
    plan.run_inputs(g, &x, &feeds)?;
    let reps = reps.min((LATENCY_BUDGET_S / first) as usize).max(1);
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        plan.run_inputs(g, &x, &feeds)?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Measures `g`: cost, weights, latency (`reps` runs at batch 64, five times as many at
/// batch 1) and the given accuracy.
pub fn measure(g: &Graph, top1: Option<f64>, reps: usize) -> Result<Measured> {
    let (rows, sparsity) = sparsity_report(g)?;
    measure_with(g, &rows, sparsity, top1, reps)
}

/// The job's result measured as [`measure`] does, and every conv, transposed-conv and
/// linear layer of `dense` with its width in `result` (matched by name) and the result's
/// zero weights — one pass over the result's weights for both.
pub fn measure_result(
    dense: &Graph,
    result: &Graph,
    top1: Option<f64>,
    reps: usize,
) -> Result<(Measured, Vec<Layer>)> {
    let (rows, sparsity) = sparsity_report(result)?;
    let measured = measure_with(result, &rows, sparsity, top1, reps)?;
    Ok((measured, layers(dense, result, &rows)))
}

fn measure_with(
    g: &Graph,
    rows: &[LayerSparsity],
    sparsity: f64,
    top1: Option<f64>,
    reps: usize,
) -> Result<Measured> {
    let c = cost(g)?;
    let density: HashMap<&str, f64> = rows
        .iter()
        .map(|r| (r.name.as_str(), 1.0 - r.sparsity))
        .collect();
    let nonzero_macs = c
        .nodes
        .iter()
        .map(|n| match density.get(n.name.as_str()) {
            Some(d) => (n.macs as f64 * d).round() as u64,
            None => n.macs,
        })
        .sum();
    Ok(Measured {
        params: c.total_params,
        macs: c.total_macs,
        nonzero_macs,
        sparsity,
        top1,
        latency_b1_ms: latency_ms(g, 1, reps * 5)?,
        latency_b64_ms: latency_ms(g, 64, reps)?,
    })
}

fn layers(dense: &Graph, result: &Graph, rows: &[LayerSparsity]) -> Vec<Layer> {
    let width = |op: &Op| match op {
        Op::Conv2d(c) => Some(c.out_channels),
        Op::ConvTranspose2d(c) => Some(c.out_channels),
        Op::Linear(l) => Some(l.out_features),
        _ => None,
    };
    let zeros: HashMap<&str, (usize, usize)> = rows
        .iter()
        .map(|r| (r.name.as_str(), (r.numel, r.zeros)))
        .collect();
    dense
        .nodes
        .iter()
        .filter_map(|n| {
            let width_before = width(&n.op)?;
            let width_after = result
                .node_id(&n.name)
                .and_then(|i| width(&result.nodes[i].op))?;
            let (weights, zeros) = zeros.get(n.name.as_str()).copied().unwrap_or((0, 0));
            Some(Layer {
                name: n.name.clone(),
                width_before,
                width_after,
                weights,
                zeros,
                sparsity: zeros as f64 / weights.max(1) as f64,
            })
        })
        .collect()
}
