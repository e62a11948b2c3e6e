//! Importance criteria, scored per unit of a dependency group.
//!
//! Reduction (documented choice, as Torch-Pruning's defaults): each *member* (a parameter
//! axis of the group: conv/linear output filters and input slices, BN scales) gives a
//! per-unit score; each member's scores are divided by their mean over the group's units,
//! so members with large fan-in do not dominate; the unit's score is the mean over
//! members. Data-driven criteria read statistics collected by [`collect_stats`] (in `stats.rs`).
//! Low score = pruned first. Blocked units score +inf.

use super::deps::{Group, Groups};
pub use super::stats::{collect_stats, Stats};
use crate::graph::ops::{param, Op};
use crate::graph::{param_key, Graph};
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Criterion {
    Random,
    L1,
    L2,
    Fpgm,
    BnScale,
    Taylor,
    ActMean,
    Apoz,
}

impl Criterion {
    pub const NAMES: &'static [&'static str] = &[
        "random", "l1", "l2", "fpgm", "bn-scale", "taylor", "act-mean", "apoz",
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "random" => Criterion::Random,
            "l1" => Criterion::L1,
            "l2" => Criterion::L2,
            "fpgm" => Criterion::Fpgm,
            "bn-scale" | "slim" => Criterion::BnScale,
            "taylor" => Criterion::Taylor,
            "act-mean" => Criterion::ActMean,
            "apoz" => Criterion::Apoz,
            _ => bail!("unknown criterion '{s}'; known: {}", Self::NAMES.join(", ")),
        })
    }

    /// The command-line name (inverse of [`Criterion::parse`]).
    pub fn name(self) -> &'static str {
        match self {
            Criterion::Random => "random",
            Criterion::L1 => "l1",
            Criterion::L2 => "l2",
            Criterion::Fpgm => "fpgm",
            Criterion::BnScale => "bn-scale",
            Criterion::Taylor => "taylor",
            Criterion::ActMean => "act-mean",
            Criterion::Apoz => "apoz",
        }
    }

    pub fn needs_data(self) -> bool {
        matches!(
            self,
            Criterion::Taylor | Criterion::ActMean | Criterion::Apoz
        )
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1()?)
}

/// Per-index slices of a parameter along `axis`: `(values of index i)` for each i.
fn slices(v: &[f32], dims: &[usize], axis: usize) -> Vec<Vec<f32>> {
    let outer: usize = dims[..axis].iter().product();
    let n = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut out = vec![Vec::with_capacity(outer * inner); n];
    for o in 0..outer {
        for (i, s) in out.iter_mut().enumerate() {
            let base = (o * n + i) * inner;
            s.extend_from_slice(&v[base..base + inner]);
        }
    }
    out
}

/// Scores of every unit of group `gi` (low = remove first).
pub fn score_group(
    g: &Graph,
    groups: &Groups,
    gi: usize,
    crit: Criterion,
    stats: Option<&Stats>,
    seed: u64,
) -> Result<Vec<f32>> {
    let grp: &Group = &groups.groups[gi];
    let nu = grp.units.len();
    if crit == Criterion::Random {
        let mut rng = Pcg64::seed_from_u64(seed ^ (gi as u64).wrapping_mul(0x9E37_79B9));
        return Ok(finish(grp, (0..nu).map(|_| rng.gen::<f32>()).collect()));
    }
    if crit.needs_data() && stats.is_none() {
        bail!("criterion {crit:?} needs data statistics (a calibration set)");
    }
    let per_member = match (crit, stats) {
        (Criterion::ActMean | Criterion::Apoz, Some(st)) => activation_scores(grp, crit, st),
        _ => weight_scores(g, grp, crit, stats)?,
    };
    if per_member.is_empty() {
        // e.g. BN-scale on a group without batch norm: fall back to L1.
        if crit == Criterion::BnScale {
            return score_group(g, groups, gi, Criterion::L1, stats, seed);
        }
        return Ok(finish(grp, vec![0.0; nu]));
    }
    let mut total = vec![0f32; nu];
    for s in &per_member {
        let mean = s.iter().sum::<f32>() / nu as f32;
        let norm = if mean > 0.0 { mean } else { 1.0 };
        total.iter_mut().zip(s).for_each(|(t, v)| *t += v / norm);
    }
    let k = per_member.len() as f32;
    Ok(finish(grp, total.into_iter().map(|t| t / k).collect()))
}

/// Per-unit scores from activation statistics, one vector per node of the group that has
/// them (activation mean; APoZ as `1 - fraction of zeros`, so fewer zeros rank higher).
fn activation_scores(grp: &Group, crit: Criterion, st: &Stats) -> Vec<Vec<f32>> {
    let src = if crit == Criterion::ActMean {
        &st.act_mean
    } else {
        &st.apoz
    };
    let nu = grp.units.len();
    let mut per_member = Vec::new();
    for &node in &grp.nodes {
        if let Some(v) = src.get(&node) {
            let mut s = vec![0f32; nu];
            for (u, unit) in grp.units.iter().enumerate() {
                for &(n, c) in &unit.elems {
                    if n == node {
                        s[u] += if crit == Criterion::Apoz {
                            1.0 - v[c]
                        } else {
                            v[c]
                        };
                    }
                }
            }
            per_member.push(s);
        }
    }
    per_member
}

/// Per-unit scores from the weight members the criterion reads (BN-scale: batch-norm
/// scales only; FPGM: output filters only; the others: every weight axis).
fn weight_scores(
    g: &Graph,
    grp: &Group,
    crit: Criterion,
    stats: Option<&Stats>,
) -> Result<Vec<Vec<f32>>> {
    let nu = grp.units.len();
    let mut per_member = Vec::new();
    for m in &grp.members {
        let node = &g.nodes[m.node];
        let is_weight = m.param == param::WEIGHT;
        let is_bn = matches!(node.op, Op::BatchNorm(_));
        let use_it = match crit {
            Criterion::BnScale => is_bn && is_weight,
            Criterion::Fpgm => is_weight && !is_bn && m.indexed_by == m.node,
            _ => is_weight,
        };
        if !use_it {
            continue;
        }
        let var = g.param(m.node, m.param)?;
        let w = host(var.as_tensor())?;
        let grads = match (crit, stats) {
            (Criterion::Taylor, Some(st)) => st.grads.get(&param_key(&node.name, m.param)),
            _ => None,
        };
        let per_index = index_scores(crit, &w, var.dims(), m.axis, grads.map(|v| v.as_slice()));
        let s: Vec<f32> = (0..nu)
            .map(|u| grp.indices(u, m).iter().map(|&i| per_index[i]).sum())
            .collect();
        per_member.push(s);
    }
    Ok(per_member)
}

/// One score per index of `axis` of the weight `w` (shape `dims`). `grads` is the
/// accumulated gradient of `w` (Taylor; absent = zero).
fn index_scores(
    crit: Criterion,
    w: &[f32],
    dims: &[usize],
    axis: usize,
    grads: Option<&[f32]>,
) -> Vec<f32> {
    match crit {
        Criterion::L1 | Criterion::BnScale => slices(w, dims, axis)
            .iter()
            .map(|s| s.iter().map(|x| x.abs()).sum())
            .collect(),
        Criterion::L2 => slices(w, dims, axis)
            .iter()
            .map(|s| s.iter().map(|x| x * x).sum::<f32>().sqrt())
            .collect(),
        Criterion::Taylor => {
            let prod: Vec<f32> = match grads {
                Some(gr) => w.iter().zip(gr).map(|(a, b)| a * b).collect(),
                None => vec![0.0; w.len()],
            };
            slices(&prod, dims, axis)
                .iter()
                .map(|s| s.iter().sum::<f32>().abs())
                .collect()
        }
        Criterion::Fpgm => {
            // Sum of distances to every other filter: the geometric-median criterion.
            let sl = slices(w, dims, axis);
            let dist = |i: usize, j: usize| -> f32 {
                sl[i]
                    .iter()
                    .zip(&sl[j])
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt()
            };
            (0..sl.len())
                .map(|i| (0..sl.len()).map(|j| dist(i, j)).sum())
                .collect()
        }
        // Not weight criteria: scored from statistics or at random before reaching here.
        Criterion::Random | Criterion::ActMean | Criterion::Apoz => vec![0.0; dims[axis]],
    }
}

fn finish(grp: &Group, mut s: Vec<f32>) -> Vec<f32> {
    for (u, unit) in grp.units.iter().enumerate() {
        if unit.blocked {
            s[u] = f32::INFINITY;
        }
    }
    s
}

/// LAMP normalisation (Lee et al. 2021) of one group's scores: with scores sorted
/// ascending, `s_i² / Σ_{j≥i} s_j²`, making scores comparable across groups for global
/// ranking. Infinite (blocked) scores stay infinite.
pub fn lamp(scores: &[f32]) -> Vec<f32> {
    let mut idx: Vec<usize> = (0..scores.len())
        .filter(|&i| scores[i].is_finite())
        .collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut out = scores.to_vec();
    let mut tail: f32 = idx.iter().map(|&i| scores[i] * scores[i]).sum();
    for &i in &idx {
        let s2 = scores[i] * scores[i];
        out[i] = if tail > 0.0 { s2 / tail } else { 0.0 };
        tail -= s2;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lamp_is_monotone_and_ends_at_one() {
        let l = lamp(&[3.0, 1.0, 2.0, f32::INFINITY]);
        assert!(l[1] < l[2] && l[2] < l[0]);
        assert!((l[0] - 1.0).abs() < 1e-6);
        assert!(l[3].is_infinite());
        assert!((l[1] - 1.0 / 14.0).abs() < 1e-6);
    }

    #[test]
    fn slices_along_axes() {
        let v: Vec<f32> = (0..6).map(|x| x as f32).collect();
        assert_eq!(
            slices(&v, &[2, 3], 0),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        assert_eq!(
            slices(&v, &[2, 3], 1),
            vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]
        );
    }
}
