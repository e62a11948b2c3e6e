//! What a recipe run produces: its planned steps, each finished step's cached report, and
//! the whole run's report (rendered by `html`, written by `run`). Every step report is the
//! report of the library job that produced it ([`Report`], one schema for pruning and
//! sparsity), read back from the step process's JSON; its accessors (beside the type) are
//! what the HTML report and the run summary show.

use super::Recipe;
use crate::methods::report::Report;
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

/// A finished step as cached.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepResult {
    pub step: Step,
    /// The step's report as its process printed it (the one schema of every job).
    pub report: Report,
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

impl RunReport {
    /// The dense model as measured by the steps (every step measures it the same way; the
    /// first one's numbers are shown): `None` for a run without steps.
    pub fn dense_measured(&self) -> Option<&crate::methods::report::Measured> {
        self.steps.first().map(|s| &s.report.dense)
    }
}
