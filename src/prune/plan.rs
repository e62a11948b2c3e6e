//! From scores to a removal: scopes (local ratio per group, or one global ranking),
//! `round_to` channel multiples, per-layer overrides, and budgets (channel ratio, target
//! MACs, target params) met exactly against the cost model by bisection.

use super::criteria::{lamp, score_group, Criterion, Stats};
use super::deps::Groups;
use super::surgery::{predict_cost, Removal};
use crate::graph::cost::cost;
use crate::graph::Graph;
use anyhow::{anyhow, bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The same ratio in every group.
    Local,
    /// One ranking across groups (scores mean-normalised per group, or LAMP).
    Global,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Remove this fraction of each group's prunable channels (local) or of all (global).
    Ratio(f64),
    /// Keep at most this fraction of the dense MACs.
    Macs(f64),
    /// Keep at most this fraction of the dense parameters.
    Params(f64),
}

/// How reports and messages show a budget: which fraction it is, kept or removed.
impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Ratio(r) => write!(f, "remove {r} of the channels"),
            Budget::Macs(m) => write!(f, "keep <= {m} of the MACs"),
            Budget::Params(p) => write!(f, "keep <= {p} of the params"),
        }
    }
}

impl Budget {
    /// The one range check of a budget: a removal ratio in `[0, 1)`, a kept fraction of
    /// MACs or parameters in `(0, 1]`.
    pub fn validate(self) -> Result<()> {
        match self {
            Budget::Ratio(r) if !(0.0..1.0).contains(&r) => {
                bail!("pruning ratio {r} must be in [0, 1)")
            }
            Budget::Macs(f) | Budget::Params(f) if !(f > 0.0 && f <= 1.0) => {
                bail!("target fraction {f} must be in (0, 1]")
            }
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub criterion: Criterion,
    pub scope: Scope,
    pub budget: Budget,
    /// Kept widths are multiples of this (where the group is wide enough).
    pub round_to: usize,
    /// LAMP-normalise scores before global ranking.
    pub lamp: bool,
    /// `(node name, ratio)`: the group holding that node uses this ratio instead.
    pub overrides: Vec<(String, f64)>,
    pub seed: u64,
}

/// A NaN importance cannot be ranked: it means the weights (or the calibration
/// statistics) hold NaN, and any order built on it would be arbitrary. Refuse, naming the
/// group. (Infinite scores are legal: they mark units that must be kept.)
pub(crate) fn nan_free(
    g: &Graph,
    groups: &Groups,
    gi: usize,
    criterion: Criterion,
    s: &[f32],
) -> Result<()> {
    if let Some(u) = s.iter().position(|v| v.is_nan()) {
        let first = groups.groups[gi]
            .nodes
            .first()
            .map(|&n| g.nodes[n].name.as_str())
            .unwrap_or("?");
        bail!(
            "criterion {} gave a NaN score to unit {u} of the group at '{first}': the model's weights or the calibration statistics hold NaN",
            criterion.name()
        );
    }
    Ok(())
}

/// Per-group scores and the ascending order of each group's prunable units.
struct Ranked {
    scores: Vec<Vec<f32>>,
    order: Vec<Vec<usize>>,
}

fn rank(g: &Graph, groups: &Groups, cfg: &PlanConfig, stats: Option<&Stats>) -> Result<Ranked> {
    let mut scores = Vec::new();
    let mut order = Vec::new();
    for gi in 0..groups.groups.len() {
        let mut s = score_group(g, groups, gi, cfg.criterion, stats, cfg.seed)?;
        nan_free(g, groups, gi, cfg.criterion, &s)?;
        if cfg.scope == Scope::Global {
            if cfg.lamp {
                s = lamp(&s);
            } else {
                let fin: Vec<f32> = s.iter().copied().filter(|v| v.is_finite()).collect();
                let mean = fin.iter().sum::<f32>() / fin.len().max(1) as f32;
                if mean > 0.0 {
                    s.iter_mut()
                        .filter(|v| v.is_finite())
                        .for_each(|v| *v /= mean);
                }
            }
        }
        let mut o = groups.groups[gi].prunable_units();
        o.sort_by(|&a, &b| s[a].total_cmp(&s[b]).then(a.cmp(&b)));
        scores.push(s);
        order.push(o);
    }
    Ok(Ranked { scores, order })
}

/// Greedy removal in the given order, up to `want[group]` units per group, skipping any
/// unit whose removal would empty a node.
fn take(groups: &Groups, candidates: &[(usize, usize)], want: &[usize]) -> Vec<(usize, usize)> {
    let mut left: Vec<usize> = groups.channels.clone();
    let mut taken_per_group = vec![0usize; groups.groups.len()];
    let mut out = Vec::new();
    for &(gi, u) in candidates {
        if taken_per_group[gi] >= want[gi] {
            continue;
        }
        let unit = &groups.groups[gi].units[u];
        let mut per_node: Vec<(usize, usize)> = Vec::new();
        for &(n, _) in &unit.elems {
            match per_node.iter_mut().find(|(m, _)| *m == n) {
                Some(e) => e.1 += 1,
                None => per_node.push((n, 1)),
            }
        }
        if per_node.iter().any(|&(n, k)| left[n] <= k) {
            continue;
        }
        per_node.iter().for_each(|&(n, k)| left[n] -= k);
        taken_per_group[gi] += 1;
        out.push((gi, u));
    }
    out
}

/// Number of units to remove from a group of `width` units with `prunable` removable at
/// ratio `r`, so the kept width is a multiple of `round_to` (rounded up: keep more).
fn local_count(width: usize, prunable: usize, r: f64, round_to: usize) -> usize {
    let mut k = (r * prunable as f64).floor() as usize;
    if round_to > 1 && width > round_to {
        let kept = width - k;
        let kept = kept.div_ceil(round_to) * round_to;
        k = width.saturating_sub(kept).min(k);
    }
    k.min(width.saturating_sub(1))
}

/// The units a local plan at ratio `r` removes.
fn local_units(
    groups: &Groups,
    ranked: &Ranked,
    r: f64,
    cfg: &PlanConfig,
    overrides: &[(usize, f64)],
) -> Vec<(usize, usize)> {
    let mut want = vec![0usize; groups.groups.len()];
    let mut cands = Vec::new();
    for (gi, grp) in groups.groups.iter().enumerate() {
        let ratio = overrides
            .iter()
            .find(|(g2, _)| *g2 == gi)
            .map(|&(_, r)| r)
            .unwrap_or(r);
        want[gi] = local_count(grp.units.len(), ranked.order[gi].len(), ratio, cfg.round_to);
        cands.extend(ranked.order[gi].iter().map(|&u| (gi, u)));
    }
    take(groups, &cands, &want)
}

/// The first `k` units of the global ranking (with per-group local overrides applied).
fn global_units(
    groups: &Groups,
    ranked: &Ranked,
    k: usize,
    cfg: &PlanConfig,
) -> Vec<(usize, usize)> {
    let mut all: Vec<(f32, usize, usize)> = Vec::new();
    for (gi, o) in ranked.order.iter().enumerate() {
        for &u in o {
            all.push((ranked.scores[gi][u], gi, u));
        }
    }
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let cands: Vec<(usize, usize)> = all.iter().take(k).map(|&(_, g, u)| (g, u)).collect();
    let want: Vec<usize> = groups
        .groups
        .iter()
        .map(|grp| {
            let w = grp.units.len();
            if cfg.round_to > 1 && w > cfg.round_to {
                w - cfg.round_to
            } else {
                w.saturating_sub(1)
            }
        })
        .collect();
    take(groups, &cands, &want)
}

fn total_prunable(ranked: &Ranked) -> usize {
    ranked.order.iter().map(|o| o.len()).sum()
}

/// Chooses the units to remove under `cfg`; the returned removal meets the budget.
pub fn plan(
    g: &Graph,
    groups: &Groups,
    cfg: &PlanConfig,
    stats: Option<&Stats>,
) -> Result<Removal> {
    let overrides: Vec<(usize, f64)> = cfg
        .overrides
        .iter()
        .map(|(name, r)| {
            if !(0.0..1.0).contains(r) {
                bail!("override ratio {r} for '{name}' must be in [0, 1)");
            }
            let n = g
                .node_id(name)
                .ok_or_else(|| anyhow!("unknown layer '{name}' in override"))?;
            Ok((groups.owner[n].first().map(|o| o.0).unwrap_or(0), *r))
        })
        .collect::<Result<_>>()?;
    let ranked = rank(g, groups, cfg, stats)?;
    let dense = cost(g)?;
    let units_at = |x: f64| -> Vec<(usize, usize)> {
        match cfg.scope {
            Scope::Local => local_units(groups, &ranked, x, cfg, &overrides),
            Scope::Global => global_units(
                groups,
                &ranked,
                (x * total_prunable(&ranked) as f64).round() as usize,
                cfg,
            ),
        }
    };
    cfg.budget.validate()?;
    let units = match cfg.budget {
        Budget::Ratio(r) => units_at(r),
        Budget::Macs(f) | Budget::Params(f) => {
            let is_macs = matches!(cfg.budget, Budget::Macs(_));
            let measure = |units: &[(usize, usize)]| -> Result<f64> {
                let r = Removal::from_units(g, groups, units)?;
                let c = predict_cost(g, groups, &r)?;
                Ok(if is_macs {
                    c.total_macs as f64 / dense.total_macs as f64
                } else {
                    c.total_params as f64 / dense.total_params as f64
                })
            };
            let floor = measure(&units_at(0.9999))?;
            if floor > f {
                let held: Vec<String> = super::deps::blocked_groups(g, groups)
                    .into_iter()
                    .flat_map(|b| b.by)
                    .take(6)
                    .collect();
                bail!(
                    "target {} of {:.4} is impossible: pruning every group to its minimum width leaves {:.4} of the dense {}{}",
                    if is_macs { "MACs" } else { "params" },
                    f,
                    floor,
                    if is_macs { "MACs" } else { "params" },
                    if held.is_empty() {
                        String::new()
                    } else {
                        format!("; channels are held at full width by: {}", held.join("; "))
                    }
                );
            }
            // Bisect the smallest ratio whose cost fits.
            let (mut lo, mut hi) = (0.0f64, 0.9999f64);
            if measure(&units_at(0.0))? <= f {
                hi = 0.0;
            }
            for _ in 0..30 {
                if hi - lo < 1e-4 {
                    break;
                }
                let mid = 0.5 * (lo + hi);
                if measure(&units_at(mid))? <= f {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            units_at(hi)
        }
    };
    Removal::from_units(g, groups, &units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_count_rounds_kept_width_up() {
        assert_eq!(local_count(64, 64, 0.5, 1), 32);
        assert_eq!(local_count(64, 64, 0.3, 8), 16); // keep 44.8 -> 48
        assert_eq!(local_count(10, 10, 0.99, 1), 9);
        assert_eq!(local_count(16, 0, 0.5, 1), 0);
    }
}
