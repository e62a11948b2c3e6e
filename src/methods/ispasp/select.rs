//! The i-SpaSP selection loop on one two-layer module, independent of how the importance
//! is computed (spec §3.2): score units by the residual gradient `z`, take the `2s` best
//! as candidates, merge them with the active set, keep the `s` members with the largest
//! static score `a`. Exactly `T` iterations, no early stop, as in the official code.

use anyhow::{bail, Result};

/// How the merged candidate set is thresholded back to `s` units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Threshold {
    /// By the dense activation sum `a_i` (the official code).
    ActivationL1,
    /// By the current importance `z_i` (a CoSaMP-like variant, for ablation).
    Importance,
}

/// Knobs of the loop (spec §10.4).
#[derive(Clone, Debug, PartialEq)]
pub struct SelectConfig {
    pub iterations: usize,
    /// Candidates per iteration are `candidate_factor · s` (2 in the paper).
    pub candidate_factor: usize,
    /// Rank candidates by signed `z` (the code) or by `|z|` (CoSaMP proper).
    pub signed: bool,
    pub threshold: Threshold,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            iterations: 20,
            candidate_factor: 2,
            signed: true,
            threshold: Threshold::ActivationL1,
        }
    }
}

/// One iteration as the reference script traces it: the residual `‖V‖²_F` at the start
/// of the iteration and the active set after it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Step {
    pub residual: f64,
    pub active: Vec<usize>,
    /// Candidates `Ω` chosen in this iteration.
    pub candidates: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Selection {
    /// Kept units, ascending.
    pub kept: Vec<usize>,
    pub trace: Vec<Step>,
    /// `‖V‖²_F` with the final active set.
    pub final_residual: f64,
}

/// Indices of the `k` largest `vals` among `among` (all if `None`), by value descending
/// then index ascending — deterministic, unlike an unstable argsort.
pub fn top_k(vals: &[f64], k: usize, among: Option<&[usize]>) -> Vec<usize> {
    let mut idx: Vec<usize> = match among {
        Some(c) => c.to_vec(),
        None => (0..vals.len()).collect(),
    };
    idx.sort_by(|&i, &j| vals[j].total_cmp(&vals[i]).then(i.cmp(&j)));
    idx.truncate(k);
    idx
}

/// The importance of every unit and the residual `‖V‖²_F`, for an active set.
pub type Query = (Vec<f64>, f64);

/// Runs the loop. `a` is the static activation score of each unit; `oracle(S)` returns
/// `(z, ‖V‖²_F)` for active set `S`: the importance of every unit and the residual.
pub fn select(
    a: &[f64],
    s: usize,
    cfg: &SelectConfig,
    oracle: &mut dyn FnMut(&[usize]) -> Result<Query>,
) -> Result<Selection> {
    let n = a.len();
    if s == 0 {
        bail!("i-SpaSP needs at least one kept unit (s = 0)");
    }
    if cfg.iterations == 0 || cfg.candidate_factor == 0 {
        bail!("i-SpaSP needs iterations ≥ 1 and candidate factor ≥ 1");
    }
    let s = s.min(n);
    let mut active: Vec<usize> = Vec::new();
    let mut trace = Vec::with_capacity(cfg.iterations);
    for _ in 0..cfg.iterations {
        let (z, residual) = oracle(&active)?;
        if z.len() != n {
            bail!("importance has {} entries for {n} units", z.len());
        }
        if let Some(i) = z.iter().position(|v| !v.is_finite()) {
            bail!(
                "importance of unit {i} is {} (non-finite activations?)",
                z[i]
            );
        }
        let rank: Vec<f64> = if cfg.signed {
            z.clone()
        } else {
            z.iter().map(|v| v.abs()).collect()
        };
        let omega = top_k(&rank, (cfg.candidate_factor * s).min(n), None);
        let mut merged = omega.clone();
        merged.extend(active.iter().copied().filter(|i| !omega.contains(i)));
        let by = match cfg.threshold {
            Threshold::ActivationL1 => a,
            Threshold::Importance => &rank,
        };
        active = top_k(by, s, Some(&merged));
        active.sort_unstable();
        trace.push(Step {
            residual,
            active: active.clone(),
            candidates: omega,
        });
    }
    let (_, final_residual) = oracle(&active)?;
    Ok(Selection {
        kept: active,
        trace,
        final_residual,
    })
}
