//! Engine pruning: criterion scores, scope and budget planned over the dependency groups,
//! one-shot or iteratively with short fine-tuning between the steps.

use super::{Ctx, Pruned};
use crate::graph::{cost, Graph};
use crate::prune::{self, Budget, Criterion, PlanConfig, Scope};
use crate::train;
use anyhow::{bail, Context, Result};
use std::time::Instant;

/// Settings of engine pruning.
#[derive(Clone, Debug)]
pub struct EngineRun {
    pub criterion: Criterion,
    pub scope: Scope,
    /// LAMP-normalise scores for the global ranking.
    pub lamp: bool,
    /// Kept widths are multiples of this.
    pub round_to: usize,
    /// `(node, ratio)` per-group overrides.
    pub overrides: Vec<(String, f64)>,
    /// Training samples the data-driven criteria read.
    pub calib: usize,
    /// Iterative pruning in this many steps (1 = one-shot).
    pub steps: usize,
}

/// The budget of step `step` of `steps`, relative to the current model, so that the last
/// step reaches the overall target relative to the dense model: a removal ratio compounds
/// (`1 − (1 − r)^(1/steps)` per step), a MACs/params target moves linearly.
pub fn step_budget(
    budget: Budget,
    step: usize,
    steps: usize,
    dense: &cost::CostReport,
    now: &cost::CostReport,
) -> Budget {
    let frac = step as f64 / steps as f64;
    let rel = |f: f64, dense: u64, now: u64| {
        ((1.0 - (1.0 - f) * frac) * dense as f64 / now as f64).min(1.0)
    };
    match budget {
        Budget::Ratio(r) => Budget::Ratio(1.0 - (1.0 - r).powf(1.0 / steps as f64)),
        Budget::Macs(f) => Budget::Macs(rel(f, dense.total_macs, now.total_macs)),
        Budget::Params(f) => Budget::Params(rel(f, dense.total_params, now.total_params)),
    }
}

pub(super) fn prune(m: &EngineRun, dense: &Graph, budget: Budget, ctx: &Ctx) -> Result<Pruned> {
    if m.lamp && m.scope != Scope::Global {
        bail!("LAMP normalises scores for one global ranking; it needs the global scope (a local scope ranks each group alone, where LAMP changes nothing)");
    }
    let t = Instant::now();
    let steps = m.steps.max(1);
    let dense_cost = cost::cost(dense)?;
    let mut current = dense.deep_clone()?;
    let mut between_secs = 0.0;
    for step in 1..=steps {
        let now = cost::cost(&current)?;
        let groups = prune::dependency_groups(&current)?;
        let stats = if m.criterion.needs_data() {
            let calib = ctx.train.sample(m.calib.min(ctx.train.len()), ctx.seed)?;
            Some(prune::collect_stats(&current, &calib, m.calib, 64)?)
        } else {
            None
        };
        let cfg = PlanConfig {
            criterion: m.criterion,
            scope: m.scope,
            budget: step_budget(budget, step, steps, &dense_cost, &now),
            round_to: m.round_to.max(1),
            lamp: m.lamp,
            overrides: m.overrides.clone(),
            seed: ctx.seed + step as u64,
        };
        let removal = prune::plan(&current, &groups, &cfg, stats.as_ref())
            .with_context(|| format!("pruning step {step}/{steps}"))?;
        current = prune::remove_units(&current, &groups, &removal)?;
        let epochs = ctx.training.step_epochs;
        if step < steps && epochs > 0 {
            between_secs += ctx.short_train(&current, ctx.train, epochs, ctx.seed + step as u64)?;
            let acc = match ctx.test {
                Some(ds) => format!("{:.2}%", 100.0 * train::evaluate(&current, ds, 500)?.top1),
                None => "n/a".into(),
            };
            ctx.progress.line(&format!(
                "step {step}/{steps}: {} MACs, top-1 {acc}",
                cost::human(cost::cost(&current)?.total_macs),
            ));
        }
    }
    Ok(Pruned {
        graph: current,
        prune_seconds: t.elapsed().as_secs_f64() - between_secs,
        train_seconds: between_secs,
        details: None,
    })
}
