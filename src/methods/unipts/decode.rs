//! Reducing–regrowing decoding (spec §3.2, code `get_sparisity`): every layer is first
//! pruned to `P + δ`, then a budget of `δ·N` weights is given back in proportion to
//! `softmax(genome)`. The search space is therefore only how the regrow budget is spread,
//! and every layer keeps at least a `1 − P − δ` density.

use anyhow::{bail, Result};

/// Per-layer sparsity `s_l = max(0, P + δ − δ·N·softmax(g)_l / n_l)`.
pub fn layer_sparsity(
    genome: &[f64],
    sizes: &[usize],
    target: f64,
    extra: f64,
) -> Result<Vec<f64>> {
    if genome.len() != sizes.len() || sizes.is_empty() {
        bail!(
            "the genome has {} genes for {} layers",
            genome.len(),
            sizes.len()
        );
    }
    if !(0.0..1.0).contains(&target) || extra < 0.0 || target + extra > 1.0 {
        bail!("sparsity {target} with regrow budget {extra} must satisfy 0 ≤ P < 1, P + δ ≤ 1");
    }
    if let Some(g) = genome.iter().find(|g| !g.is_finite()) {
        bail!("genome value {g} is not finite");
    }
    let total: usize = sizes.iter().sum();
    let avail = extra * total as f64;
    let m = genome.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = genome.iter().map(|g| (g - m).exp()).collect();
    let z: f64 = e.iter().sum();
    Ok(sizes
        .iter()
        .zip(&e)
        .map(|(&n, &w)| (target + extra - avail * (w / z) / n as f64).max(0.0))
        .collect())
}

/// Weights kept per layer, `n − ⌊s·n⌋` (the code's rounding).
pub fn kept_counts(sparsity: &[f64], sizes: &[usize]) -> Vec<usize> {
    sparsity
        .iter()
        .zip(sizes)
        .map(|(&s, &n)| n - ((s * n as f64) as usize).min(n))
        .collect()
}
