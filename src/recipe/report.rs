//! What a recipe run produces: its planned steps, each finished step's cached report, and
//! the whole run's report (rendered by `html`, written by `run`).

use super::Recipe;
use serde::{Deserialize, Serialize};

/// One planned step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub id: String,
    pub label: String,
    pub method: String,
    /// "prune" (budget = kept MACs fraction) or "sparsify" (budget = sparsity).
    pub kind: String,
    pub budget: f64,
    pub seed: u64,
    pub args: Vec<String>,
}

/// A finished step as cached.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepResult {
    pub step: Step,
    pub report: serde_json::Value,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub recipe: Recipe,
    pub dense: serde_json::Value,
    pub steps: Vec<StepResult>,
    /// Steps run by this invocation (the rest came from the cache).
    pub ran: Vec<String>,
    pub machine: serde_json::Value,
    pub seconds: f64,
}
