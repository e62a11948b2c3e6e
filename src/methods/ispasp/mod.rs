//! i-SpaSP (Wolfe & Kyrillidis, L4DC 2022): structured pruning of the hidden units of
//! two-layer modules by sparse signal recovery, CoSaMP-style. Spec:
//! `shared/specs/ispasp.md`; semantics follow the official code (signed importance, `2s`
//! candidates, threshold by the dense activation sum, exactly `T` iterations, pure slice
//! of the dense weights).
//!
//! Deep nets are pruned module by module in forward order: the inputs of each module come
//! from the already pruned (and optionally fine-tuned) prefix, its hidden activations and
//! target from its own dense weights, on a fresh sample of the data (spec §5).
//!
//! Deviations, documented in the README: batch norm defaults to `eval_consistent` (the
//! spec's recommended clean form; `code_faithful` is a switch), running statistics are
//! sliced rather than reset, selection data are not augmented, and block fine-tuning runs
//! on a sample of the training set rather than a full epoch.

pub mod importance;
pub mod module;
pub mod select;
pub mod synthetic;

pub use module::{two_layer_modules, BnMode, ModuleOracle, TwoLayerModule};
pub use select::{select, top_k, SelectConfig, Selection, Threshold};

use crate::data::Dataset;
use crate::exec::{forward_with, ForwardOpts, Mode};
use crate::graph::cost::cost;
use crate::graph::Graph;
use crate::prune::{dependency_groups, predict_cost, remove_units, Removal};
use crate::train::fit_input;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct IspaspConfig {
    /// Fraction of hidden units kept in every module (spec: `r`).
    pub keep: f64,
    /// `(node name, keep ratio)`: the module holding that node uses this ratio.
    pub overrides: Vec<(String, f64)>,
    pub select: SelectConfig,
    /// Selection samples per module (1,280 in the paper), processed in chunks.
    pub samples: usize,
    pub chunk: usize,
    pub bn_mode: BnMode,
    pub seed: u64,
}

impl Default for IspaspConfig {
    fn default() -> Self {
        IspaspConfig {
            keep: 0.5,
            overrides: Vec::new(),
            select: SelectConfig::default(),
            samples: 1280,
            chunk: 256,
            bn_mode: BnMode::EvalConsistent,
            seed: 0,
        }
    }
}

/// What happened to one module.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModuleReport {
    pub module: String,
    pub second: String,
    pub width: usize,
    pub kept: usize,
    /// The kept units of the module's group (indices before pruning), ascending.
    pub kept_units: Vec<usize>,
    /// Selection time (hidden activations + T iterations), seconds.
    pub seconds: f64,
    /// `‖V‖²_F` with the empty set (i.e. `‖Y‖²`, or its BN-shift-free part) and at the end.
    pub residual_start: f64,
    pub residual_final: f64,
}

fn check_ratio(what: &str, r: f64) -> Result<()> {
    if !(r > 0.0 && r <= 1.0) {
        bail!("{what}: keep ratio {r} must be in (0, 1]");
    }
    Ok(())
}

/// The keep ratio of each module (default or override); an override naming a node that is
/// not in any two-layer module is an error.
pub fn module_ratios(
    g: &Graph,
    modules: &[TwoLayerModule],
    cfg: &IspaspConfig,
) -> Result<Vec<f64>> {
    check_ratio("i-SpaSP", cfg.keep)?;
    let groups = dependency_groups(g)?;
    let mut ratios = vec![cfg.keep; modules.len()];
    for (name, r) in &cfg.overrides {
        check_ratio(&format!("override '{name}'"), *r)?;
        let id = g
            .node_id(name)
            .ok_or_else(|| anyhow!("override names node '{name}', which is not in the model"))?;
        let gi = groups.owner[id].first().map(|o| o.0);
        let Some(mi) = modules.iter().position(|m| Some(m.group) == gi) else {
            bail!(
                "node '{name}' is not in a two-layer module: its channels reach a residual add, \
                 a graph input/output, or more than one layer (i-SpaSP prunes hidden units only)"
            );
        };
        ratios[mi] = *r;
    }
    Ok(ratios)
}

fn kept_units(width: usize, ratio: f64) -> usize {
    ((width as f64 * ratio + 1e-9).floor() as usize).clamp(1, width)
}

/// The removal that keeps the first `kept_units` of each module: only its size matters,
/// for cost prediction.
fn any_removal(g: &Graph, modules: &[TwoLayerModule], ratios: &[f64]) -> Result<Removal> {
    let groups = dependency_groups(g)?;
    let units: Vec<(usize, usize)> = modules
        .iter()
        .zip(ratios)
        .flat_map(|(m, &r)| (kept_units(m.units, r)..m.units).map(move |u| (m.group, u)))
        .collect();
    Removal::from_units(g, &groups, &units)
}

/// Per-module keep ratios that use a MACs budget up: from the uniform ratio in `cfg.keep`
/// (e.g. [`keep_for_macs`]), one unit at a time goes back to the module keeping the
/// smallest fraction of its width, while the pruned MACs stay within `target` × dense.
/// Flooring one uniform ratio can leave a narrow module far below it (a ViT block's 4
/// heads at 0.49 keep 1, and the model ends at 36 % of its MACs for a 50 % target).
/// Returns `cfg.overrides` plus one override per module that gained units; modules with
/// an override of their own are left alone.
pub fn fill_macs(
    g: &Graph,
    modules: &[TwoLayerModule],
    cfg: &IspaspConfig,
    target: f64,
) -> Result<Vec<(String, f64)>> {
    let groups = dependency_groups(g)?;
    let ratios = module_ratios(g, modules, cfg)?;
    let fixed: Vec<bool> = modules
        .iter()
        .map(|m| {
            cfg.overrides.iter().any(|(name, _)| {
                g.node_id(name)
                    .and_then(|id| groups.owner[id].first())
                    .is_some_and(|o| o.0 == m.group)
            })
        })
        .collect();
    let mut counts: Vec<usize> = modules
        .iter()
        .zip(&ratios)
        .map(|(m, &r)| kept_units(m.units, r))
        .collect();
    let start = counts.clone();
    let limit = target * cost(g)?.total_macs as f64;
    let macs = |counts: &[usize]| -> Result<f64> {
        let units: Vec<(usize, usize)> = modules
            .iter()
            .zip(counts)
            .flat_map(|(m, &k)| (k..m.units).map(move |u| (m.group, u)))
            .collect();
        let removal = Removal::from_units(g, &groups, &units)?;
        Ok(predict_cost(g, &groups, &removal)?.total_macs as f64)
    };
    if macs(&counts)? > limit + 0.5 {
        return Ok(cfg.overrides.clone());
    }
    loop {
        let mut order: Vec<usize> = (0..modules.len())
            .filter(|&i| !fixed[i] && counts[i] < modules[i].units)
            .collect();
        let frac = |i: usize| counts[i] as f64 / modules[i].units as f64;
        order.sort_by(|&a, &b| frac(a).total_cmp(&frac(b)).then(a.cmp(&b)));
        let mut added = false;
        for i in order {
            counts[i] += 1;
            if macs(&counts)? <= limit + 0.5 {
                added = true;
                break;
            }
            counts[i] -= 1;
        }
        if !added {
            break;
        }
    }
    let mut out = cfg.overrides.clone();
    for (i, m) in modules.iter().enumerate() {
        if counts[i] != start[i] {
            out.push((
                g.nodes[m.hidden].name.clone(),
                counts[i] as f64 / m.units as f64,
            ));
        }
    }
    Ok(out)
}

/// MACs after pruning every module at its ratio, exactly from the cost model.
pub fn predicted_macs(g: &Graph, modules: &[TwoLayerModule], ratios: &[f64]) -> Result<u64> {
    let groups = dependency_groups(g)?;
    Ok(predict_cost(g, &groups, &any_removal(g, modules, ratios)?)?.total_macs)
}

/// The largest uniform keep ratio whose pruned MACs are at most `target` × dense MACs
/// (overrides stay fixed). An unreachable target is an error naming the floor.
pub fn keep_for_macs(
    g: &Graph,
    modules: &[TwoLayerModule],
    cfg: &IspaspConfig,
    target: f64,
) -> Result<f64> {
    if !(target > 0.0 && target <= 1.0) {
        bail!("target MACs fraction {target} must be in (0, 1]");
    }
    let dense = cost(g)?.total_macs as f64;
    let with = |keep: f64| -> Result<f64> {
        let c = IspaspConfig {
            keep,
            ..cfg.clone()
        };
        Ok(predicted_macs(g, modules, &module_ratios(g, modules, &c)?)? as f64 / dense)
    };
    let floor = with(1e-9)?;
    if floor > target + 1e-12 {
        bail!(
            "target of {:.1}% MACs is unreachable by pruning hidden units: keeping one unit per \
             module still costs {:.1}% of the dense MACs",
            target * 100.0,
            floor * 100.0
        );
    }
    let (mut lo, mut hi) = (1e-9, 1.0);
    if with(hi)? <= target {
        return Ok(1.0);
    }
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if with(mid)? <= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Prunes `g` module by module. `after` runs after each module (e.g. block fine-tuning)
/// on the current graph. Returns the pruned graph and a report per pruned module.
pub fn prune(
    g: &Graph,
    data: &Dataset,
    cfg: &IspaspConfig,
    after: &mut dyn FnMut(&Graph, &ModuleReport) -> Result<()>,
) -> Result<(Graph, Vec<ModuleReport>)> {
    if cfg.samples == 0 || cfg.chunk == 0 {
        bail!("i-SpaSP needs at least one selection sample and a chunk size ≥ 1");
    }
    if data.is_empty() {
        bail!("i-SpaSP needs selection data, got an empty dataset");
    }
    let groups0 = dependency_groups(g)?;
    let modules0 = two_layer_modules(g, &groups0);
    if modules0.is_empty() {
        bail!("the model has no two-layer module (no hidden width that is internal to a conv/linear pair)");
    }
    let ratios = module_ratios(g, &modules0, cfg)?;
    let mut current = g.deep_clone()?;
    let mut reports = Vec::new();
    for (k, (m0, &ratio)) in modules0.iter().zip(&ratios).enumerate() {
        let s = kept_units(m0.units, ratio);
        if s >= m0.units {
            continue;
        }
        let t0 = Instant::now();
        // Node ids survive channel surgery; the groups are re-derived on the current graph.
        let groups = dependency_groups(&current)?;
        let m = two_layer_modules(&current, &groups)
            .into_iter()
            .find(|m| m.second == m0.second)
            .ok_or_else(|| anyhow!("module '{}' vanished during pruning", m0.name(g)))?;
        let sample = data.sample(cfg.samples.min(data.len()), cfg.seed.wrapping_add(k as u64))?;
        let mut hidden = Vec::new();
        let pos: Vec<usize> = (0..sample.len()).collect();
        for chunk in pos.chunks(cfg.chunk) {
            let (x, _) = sample.batch(chunk, None, &Device::Cpu)?;
            let x = fit_input(&current, x)?;
            let keep = [m.hidden];
            let opts = ForwardOpts {
                keep: &keep,
                ..ForwardOpts::new(Mode::Eval)
            };
            let mut out = forward_with(&current, &x, &opts)?;
            hidden.push(out.kept.remove(&m.hidden).expect("kept hidden"));
        }
        let oracle = ModuleOracle::new(&current, &groups, &m, hidden, cfg.bn_mode)?;
        let a = oracle.activation_sums()?;
        let sel = select(&a, s, &cfg.select, &mut |act| oracle.query(act))
            .with_context(|| format!("i-SpaSP on module '{}'", m.name(&current)))?;
        let kept: std::collections::BTreeSet<usize> = sel.kept.iter().copied().collect();
        let removed: Vec<(usize, usize)> = (0..m.units)
            .filter(|u| !kept.contains(u))
            .map(|u| (m.group, u))
            .collect();
        let removal = Removal::from_units(&current, &groups, &removed)?;
        let rep = ModuleReport {
            module: m.name(&current),
            second: current.nodes[m.second].name.clone(),
            width: m.units,
            kept: sel.kept.len(),
            kept_units: sel.kept.clone(),
            seconds: t0.elapsed().as_secs_f64(),
            residual_start: sel.trace.first().map(|t| t.residual).unwrap_or(0.0),
            residual_final: sel.final_residual,
        };
        drop(oracle);
        current = remove_units(&current, &groups, &removal)?;
        after(&current, &rep)?;
        reports.push(rep);
    }
    Ok((current, reports))
}
