//! i-SpaSP as a job stage: module by module, with optional block fine-tuning; the budget
//! is a removal ratio per module or a MACs target met by the largest uniform keep ratio.

use super::{Ctx, Pruned};
use crate::graph::Graph;
use crate::methods::ispasp::{self, BnMode, Threshold};
use crate::prune::{self, Budget};
use anyhow::{bail, Result};
use std::time::Instant;

/// Settings of an i-SpaSP run.
#[derive(Clone, Debug)]
pub struct IspaspRun {
    /// Iterations T per module.
    pub iterations: usize,
    pub threshold: Threshold,
    pub bn_mode: BnMode,
    /// Training samples per module.
    pub samples: usize,
    /// `(node, removal ratio)` per-module overrides.
    pub overrides: Vec<(String, f64)>,
    /// After each module, fine-tune one pass over this many training samples (0: none).
    pub block_ft_samples: usize,
}

pub(super) fn prune(m: &IspaspRun, dense: &Graph, budget: Budget, ctx: &Ctx) -> Result<Pruned> {
    let select = ispasp::SelectConfig {
        iterations: m.iterations,
        threshold: m.threshold,
        ..Default::default()
    };
    let mut cfg = ispasp::IspaspConfig {
        overrides: m
            .overrides
            .iter()
            .map(|(n, r)| (n.clone(), 1.0 - r))
            .collect(),
        select,
        samples: m.samples,
        bn_mode: m.bn_mode,
        seed: ctx.seed,
        ..Default::default()
    };
    let modules = ispasp::two_layer_modules(dense, &prune::dependency_groups(dense)?);
    cfg.keep = match budget {
        Budget::Ratio(r) => 1.0 - r,
        Budget::Macs(f) => ispasp::keep_for_macs(dense, &modules, &cfg, f)?,
        Budget::Params(_) => {
            bail!("i-SpaSP takes a removal ratio or a MACs target, not a parameter target")
        }
    };
    if let Budget::Macs(f) = budget {
        // The uniform ratio's flooring leaves budget unused: give it back unit by unit.
        cfg.overrides = ispasp::fill_macs(dense, &modules, &cfg, f)?;
    }
    ctx.progress.line(&format!(
        "i-SpaSP: {} two-layer modules, keep ratio {:.4}",
        modules.len(),
        cfg.keep
    ));
    let t = Instant::now();
    let mut block_secs = 0.0;
    let (graph, reports) = ispasp::prune(dense, ctx.train, &cfg, &mut |g, rep| {
        ctx.progress.line(&format!(
            "  {:<24} {:>5} -> {:>5} in {:.2}s, residual {:.4e} -> {:.4e}",
            rep.module, rep.width, rep.kept, rep.seconds, rep.residual_start, rep.residual_final
        ));
        if m.block_ft_samples > 0 {
            let n = m.block_ft_samples.min(ctx.train.len());
            let sub = ctx.train.sample(n, ctx.seed + 1)?;
            block_secs += ctx.short_train(g, &sub, 1, ctx.seed)?;
        }
        Ok(())
    })?;
    Ok(Pruned {
        graph,
        prune_seconds: t.elapsed().as_secs_f64() - block_secs,
        train_seconds: block_secs,
        details: Some(serde_json::json!({
            "keep": cfg.keep,
            "iterations": cfg.select.iterations,
            "samples": cfg.samples,
            "bn_mode": cfg.bn_mode,
            "modules": reports,
        })),
    })
}
