//! Sensitivity analysis: prune each group alone at several ratios and measure accuracy.

use super::criteria::{score_group, Criterion, Stats};
use super::deps::Groups;
use super::surgery::{remove_units, Removal};
use crate::data::Dataset;
use crate::graph::ops::Op;
use crate::graph::Graph;
use crate::train::evaluate;
use anyhow::Result;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct SensitivityRow {
    pub group: usize,
    /// The first conv/linear layer whose output this group prunes (a readable label).
    pub layer: String,
    pub width: usize,
    pub ratios: Vec<f64>,
    pub accuracy: Vec<f64>,
}

/// For every group with at least two prunable units, the accuracy on `data` after
/// removing each `ratio` of its lowest-scoring units (other groups untouched).
pub fn sensitivity(
    g: &Graph,
    groups: &Groups,
    data: &Dataset,
    crit: Criterion,
    ratios: &[f64],
    stats: Option<&Stats>,
) -> Result<Vec<SensitivityRow>> {
    let mut rows = Vec::new();
    for (gi, grp) in groups.groups.iter().enumerate() {
        let prunable = grp.prunable_units();
        if prunable.len() < 2 {
            continue;
        }
        let layer = grp
            .nodes
            .iter()
            .find(|&&n| matches!(g.nodes[n].op, Op::Conv2d(_) | Op::Linear(_)))
            .map(|&n| g.nodes[n].name.clone())
            .unwrap_or_else(|| g.nodes[grp.nodes[0]].name.clone());
        let scores = score_group(g, groups, gi, crit, stats, 0)?;
        super::plan::nan_free(g, groups, gi, crit, &scores)?;
        let mut order = prunable.clone();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let mut acc = Vec::new();
        let mut used = Vec::new();
        for &r in ratios {
            let k = ((r * prunable.len() as f64).floor() as usize).min(prunable.len() - 1);
            let units: Vec<(usize, usize)> = order[..k].iter().map(|&u| (gi, u)).collect();
            let Ok(removal) = Removal::from_units(g, groups, &units) else {
                continue;
            };
            let p = remove_units(g, groups, &removal)?;
            acc.push(evaluate(&p, data, 500)?.top1);
            used.push(r);
        }
        rows.push(SensitivityRow {
            group: gi,
            layer,
            width: grp.units.len(),
            ratios: used,
            accuracy: acc,
        });
    }
    Ok(rows)
}
