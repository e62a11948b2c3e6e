//! DWR as a job stage: collect axis points (each shrunk model fine-tuned for the job's
//! step epochs), fit the accuracy predictor, solve under the MACs budget, snap, build.

use super::{Ctx, Pruned};
use crate::graph::{cost, Graph};
use crate::methods::dwr;
use crate::prune::Budget;
use crate::train;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Instant;

/// Settings of a DWR run.
#[derive(Clone, Debug)]
pub struct DwrRun {
    /// Cache of collected (d, w, r, accuracy) points (reused when it matches).
    pub cache: Option<PathBuf>,
    /// Which axes may change: `[depth, width, resolution]` (baselines fix some).
    pub axes: [bool; 3],
    /// Name of the axes choice, for the report.
    pub axes_name: String,
    /// Resolution step in pixels for collection and snapping.
    pub res_step: usize,
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

pub(super) fn prune(m: &DwrRun, dense: &Graph, budget: Budget, ctx: &Ctx) -> Result<Pruned> {
    let Budget::Macs(t) = budget else {
        bail!("DWR takes a MACs target (a fraction of the dense MACs)");
    };
    let test = ctx
        .test
        .context("DWR measures accuracy points: it needs test data")?;
    let cfg = dwr::DwrConfig {
        ft_epochs: ctx.training.step_epochs,
        res_step: m.res_step,
        seed: ctx.seed,
        ..Default::default()
    };
    let t0 = Instant::now();
    let order = dwr::depth_order(dense, ctx.train, 512)?;
    let mut train_secs = 0.0;
    let points = dwr::collect(
        dense,
        &order,
        &cfg,
        m.cache.as_deref(),
        &mut |g, seed| {
            if cfg.ft_epochs > 0 {
                train_secs += ctx.short_train(g, ctx.train, cfg.ft_epochs, seed)?;
            }
            Ok(())
        },
        &|g| Ok(train::evaluate(g, test, 500)?.top1),
    )?;
    for p in &points {
        let q = &p.point;
        ctx.progress.line(&format!(
            "  {:<10} d {:.3} w {:.3} r {:.3}: top-1 {}",
            p.axis,
            q.d,
            q.w,
            q.r,
            pct(q.acc)
        ));
    }
    let sol = dwr::solve(dense, &order, &points, &cfg, t)?;
    let (config, macs, predicted) = if m.axes == [true; 3] {
        (sol.config, sol.macs, sol.predicted)
    } else {
        dwr::snap(dense, &order, &sol.map, t, cfg.lo, cfg.res_step, m.axes)?
    };
    ctx.progress.line(&format!(
        "DWR: predictor degrees d/w/r {:?} (LOO by degree {:?}); continuous optimum d {:.3} w {:.3} r {:.3} (F {:.4}); \
         snapped: {} blocks removed, width {:.3}, {} px, {} MACs, predicted top-1 {}",
        sol.map.degrees,
        sol.loo,
        sol.optimum.d,
        sol.optimum.w,
        sol.optimum.r,
        sol.optimum.f,
        config.blocks_removed,
        config.width,
        config.px,
        cost::human(macs),
        pct(predicted)
    ));
    let slope = sol.map.min_slope(cfg.lo, 12);
    if slope < -1e-6 {
        ctx.progress.line(&format!(
            "warning: the fitted predictor decreases somewhere on the box (slope {slope:.3}): \
             accuracy rose as the model shrank (is the dense model trained?)"
        ));
    }
    let graph = dwr::build(dense, &order, config)?;
    Ok(Pruned {
        graph,
        prune_seconds: t0.elapsed().as_secs_f64() - train_secs,
        train_seconds: train_secs,
        details: Some(serde_json::json!({
            "axes": m.axes_name,
            "points": points,
            "map": sol.map,
            "loo": sol.loo,
            "optimum": sol.optimum,
            "config": config,
            "macs": macs,
            "predicted": predicted,
            "depth_order": order,
        })),
    })
}
