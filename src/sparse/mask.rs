//! Element masks from scores (|w| for magnitude, |w|·‖x‖ for Wanda, …).
//!
//! Ties are broken by flat index (`(score asc, index asc)` are pruned first), as the UniPTS
//! spec requires, so masks are deterministic. Selection uses `select_nth_unstable_by` with
//! that total order: O(n) per layer, cheap enough to recompute every training step
//! (dynamic sparse training does).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// Sparsity pattern of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pattern {
    /// Any element may be zeroed.
    Unstructured,
    /// In every group of `m` consecutive weights of a row (the GEMM reduction order:
    /// input channel, then kernel row, then kernel column) at most `n` are non-zero.
    NM { n: usize, m: usize },
}

impl Pattern {
    /// Parses `unstructured` or `N:M` (e.g. `2:4`).
    pub fn parse(s: &str) -> Result<Pattern> {
        if s == "unstructured" {
            return Ok(Pattern::Unstructured);
        }
        let Some((a, b)) = s.split_once(':') else {
            bail!("sparsity pattern '{s}': expected 'unstructured' or N:M such as 2:4");
        };
        let (n, m): (usize, usize) = match (a.trim().parse(), b.trim().parse()) {
            (Ok(n), Ok(m)) => (n, m),
            _ => bail!("sparsity pattern '{s}': N and M must be integers"),
        };
        if m == 0 || n == 0 || n >= m {
            bail!("sparsity pattern {n}:{m}: need 0 < N < M");
        }
        Ok(Pattern::NM { n, m })
    }

    /// Fraction of zeros the pattern implies (N:M), if fixed.
    pub fn fixed_sparsity(&self) -> Option<f64> {
        match *self {
            Pattern::Unstructured => None,
            Pattern::NM { n, m } => Some(1.0 - n as f64 / m as f64),
        }
    }
}

impl std::fmt::Display for Pattern {
    /// The name [`Pattern::parse`] reads back: `unstructured` or `N:M`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Unstructured => write!(f, "unstructured"),
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// `(score asc, index asc)`; NaN scores sort first (pruned first).
fn order(s: &[f32], a: usize, b: usize) -> Ordering {
    s[a].partial_cmp(&s[b])
        .unwrap_or_else(|| s[a].is_nan().cmp(&s[b].is_nan()).reverse())
        .then(a.cmp(&b))
}

/// Indices of the `j` lowest scores.
fn lowest(scores: &[f32], j: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if j == 0 {
        return Vec::new();
    }
    if j < idx.len() {
        idx.select_nth_unstable_by(j - 1, |&a, &b| order(scores, a, b));
    }
    idx.truncate(j.min(scores.len()));
    idx
}

/// Mask zeroing the `j` lowest-scoring entries (0/1 values).
pub fn magnitude_mask(scores: &[f32], j: usize) -> Vec<f32> {
    let mut m = vec![1f32; scores.len()];
    for i in lowest(scores, j) {
        m[i] = 0.0;
    }
    m
}

/// Per-row masks: the `j` lowest scores of every row of length `row_len` are zeroed
/// (Wanda's per-output comparison group).
pub fn row_masks(scores: &[f32], row_len: usize, j: usize) -> Vec<f32> {
    scores
        .chunks(row_len.max(1))
        .flat_map(|r| magnitude_mask(r, j.min(r.len())))
        .collect()
}

/// N:M mask: in each group of `m` consecutive entries of a row keep the `n` highest
/// scores. A row tail shorter than `m` keeps `ceil(n·len/m)`.
pub fn nm_mask(scores: &[f32], row_len: usize, n: usize, m: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(scores.len());
    for row in scores.chunks(row_len.max(1)) {
        for grp in row.chunks(m) {
            let keep = (n * grp.len()).div_ceil(m);
            out.extend(magnitude_mask(grp, grp.len() - keep));
        }
    }
    out
}

/// One global ranking over all layers: the `floor(s·N)` lowest scores over the union are
/// zeroed (global magnitude; POT uses it on norm-normalised magnitudes).
pub fn global_masks(scores: &[Vec<f32>], sparsity: f64) -> Vec<Vec<f32>> {
    let flat: Vec<f32> = scores.iter().flatten().copied().collect();
    let j = (sparsity * flat.len() as f64).floor() as usize;
    let m = magnitude_mask(&flat, j);
    let mut out = Vec::with_capacity(scores.len());
    let mut at = 0;
    for s in scores {
        out.push(m[at..at + s.len()].to_vec());
        at += s.len();
    }
    out
}

/// `floor(s·n)`, the number of zeros of a layer at sparsity `s` (the reference's rounding).
pub fn zeros_for(sparsity: f64, n: usize) -> usize {
    ((sparsity * n as f64) as usize).min(n)
}

/// Checks a sparsity level from user input.
pub fn check_sparsity(s: f64) -> Result<()> {
    if !(0.0..1.0).contains(&s) || s.is_nan() {
        bail!("sparsity {s} is outside [0, 1)");
    }
    Ok(())
}
