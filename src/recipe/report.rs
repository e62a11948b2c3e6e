//! What a recipe run produces: its planned steps, each finished step's cached report, and
//! the whole run's report (rendered by `html`, written by `run`). Every step report is the
//! typed report of the library job that produced it ([`PruneReport`], [`SparsifyReport`]),
//! read back from the step process's JSON; the accessors below are what the HTML report
//! and the run summary show.

use super::Recipe;
use crate::methods::sparsify::SparsifyReport;
use crate::prune::report::PruneReport;
use crate::train::EvalResult;
use serde::{Deserialize, Serialize};

/// Which lopper command a step runs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// Structured pruning; the budget is the kept fraction of the dense MACs.
    Prune,
    /// Post-training sparsity; the budget is the fraction of zero weights.
    Sparsify,
}

impl StepKind {
    pub fn command(self) -> &'static str {
        match self {
            StepKind::Prune => "prune",
            StepKind::Sparsify => "sparsify",
        }
    }
}

/// One planned step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub id: String,
    pub label: String,
    pub method: String,
    pub kind: StepKind,
    pub budget: f64,
    pub seed: u64,
    pub args: Vec<String>,
}

/// A step's report as its process printed it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StepReport {
    Prune(Box<PruneReport>),
    Sparsify(Box<SparsifyReport>),
}

impl StepReport {
    /// The headline accuracy: fine-tuned if it was, else right after pruning.
    pub fn accuracy(&self) -> Option<f64> {
        match self {
            StepReport::Prune(r) => r.acc_finetuned.or(r.acc_pruned),
            StepReport::Sparsify(r) => Some(r.acc_sparse),
        }
    }

    /// The cost as a fraction of the dense MACs (sparse steps: MACs over non-zero weights).
    pub fn macs_fraction(&self) -> f64 {
        match self {
            StepReport::Prune(r) => r.macs_ratio,
            StepReport::Sparsify(r) => r.sparse_macs as f64 / r.dense_macs.max(1) as f64,
        }
    }

    /// Fraction of zero weights (sparse steps only).
    pub fn sparsity(&self) -> Option<f64> {
        match self {
            StepReport::Prune(_) => None,
            StepReport::Sparsify(r) => Some(r.sparsity),
        }
    }

    /// Measured latency of the result at batch 1 and 64, in ms.
    pub fn latency_ms(&self) -> (f64, f64) {
        match self {
            StepReport::Prune(r) => (r.pruned.latency_b1_ms, r.pruned.latency_b64_ms),
            StepReport::Sparsify(r) => (r.sparse_latency_b1_ms, r.sparse_latency_b64_ms),
        }
    }

    /// Per-layer structure: kept width (% of dense) or zero weights (%) per layer.
    pub fn layer_bars(&self) -> Vec<(String, f64)> {
        match self {
            StepReport::Prune(r) => r
                .widths
                .iter()
                .map(|w| {
                    (
                        w.node.clone(),
                        100.0 * w.after as f64 / w.before.max(1) as f64,
                    )
                })
                .collect(),
            StepReport::Sparsify(r) => r
                .layers
                .iter()
                .map(|l| (l.name.clone(), 100.0 * l.sparsity))
                .collect(),
        }
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
        let StepReport::Sparsify(r) = self else {
            return Vec::new();
        };
        r.details
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

/// A finished step as cached.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepResult {
    pub step: Step,
    pub report: StepReport,
    pub seconds: f64,
}

/// The dense model's cost (`lopper inspect --json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DenseCost {
    #[serde(alias = "total_macs")]
    pub macs: u64,
    #[serde(alias = "total_params")]
    pub params: u64,
}

/// The dense model's evaluation (`lopper eval --json`) and cost.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DenseEval {
    pub result: EvalResult,
    #[serde(default)]
    pub cost: Option<DenseCost>,
}

/// Where and on what a run was measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub threads: usize,
    pub cpu: String,
    pub os: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub recipe: Recipe,
    pub dense: DenseEval,
    pub steps: Vec<StepResult>,
    /// Steps run by this invocation (the rest came from the cache).
    pub ran: Vec<String>,
    pub machine: Machine,
    pub seconds: f64,
}
