//! Synthetic two-layer modules (spec §11.1, §11.3): a dense linear second layer on a given
//! hidden matrix, and the proposed power-law generator standing in for the paper's
//! unknown one. Used by the golden/invariant tests and the decay experiment
//! (`cargo run --release --example ispasp_synthetic`).

use super::select::{select, SelectConfig, Selection};
use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rand_pcg::Pcg64;

/// `Y = H · W`, with `H ∈ R^{B×N}` (hidden) and `W ∈ R^{N×C}`, row-major, in f64.
#[derive(Clone, Debug)]
pub struct MatrixModule {
    pub b: usize,
    pub n: usize,
    pub c: usize,
    pub h: Vec<f64>,
    pub w: Vec<f64>,
}

impl MatrixModule {
    fn out(&self, active: Option<&[bool]>) -> Vec<f64> {
        let mut y = vec![0.0; self.b * self.c];
        for bi in 0..self.b {
            for i in 0..self.n {
                if active.is_some_and(|a| !a[i]) {
                    continue;
                }
                let hv = self.h[bi * self.n + i];
                for j in 0..self.c {
                    y[bi * self.c + j] += hv * self.w[i * self.c + j];
                }
            }
        }
        y
    }

    /// `a_i = Σ_b H[b,i]`.
    pub fn activation_sums(&self) -> Vec<f64> {
        (0..self.n)
            .map(|i| (0..self.b).map(|bi| self.h[bi * self.n + i]).sum())
            .collect()
    }

    /// `‖Y − Y_S‖²_F` for a set of kept units.
    pub fn residual(&self, kept: &[usize]) -> f64 {
        self.query(kept).1
    }

    /// `(z, ‖V‖²_F)`: `z_i = Σ_b (V Wᵀ)[b,i]`; the empty set gives `V = Y`.
    pub fn query(&self, kept: &[usize]) -> (Vec<f64>, f64) {
        let mut act = vec![false; self.n];
        kept.iter().for_each(|&i| act[i] = true);
        let y = self.out(None);
        let ys = if kept.is_empty() {
            vec![0.0; y.len()]
        } else {
            self.out(Some(&act))
        };
        let v: Vec<f64> = y.iter().zip(&ys).map(|(a, b)| a - b).collect();
        let res = v.iter().map(|x| x * x).sum();
        let mut z = vec![0.0; self.n];
        for bi in 0..self.b {
            for (i, zi) in z.iter_mut().enumerate() {
                for j in 0..self.c {
                    *zi += v[bi * self.c + j] * self.w[i * self.c + j];
                }
            }
        }
        (z, res)
    }

    pub fn run(&self, s: usize, cfg: &SelectConfig) -> Result<Selection> {
        select(&self.activation_sums(), s, cfg, &mut |k| Ok(self.query(k)))
    }

    /// The spec's generator: `H[b,i] = max(0, 𝒩(0,1)) · (π(i)+1)^{−1/p}` for a random
    /// permutation π, `W ~ 𝒩(0, 1/N)`. Smaller `p` = more compressible hidden units.
    pub fn power_law(b: usize, n: usize, c: usize, p: f64, rng: &mut Pcg64) -> MatrixModule {
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(rng);
        let std = Normal::<f64>::new(0.0, 1.0).expect("unit normal");
        let h = (0..b * n)
            .map(|k| {
                let i = k % n;
                std.sample(rng).max(0.0) * ((perm[i] + 1) as f64).powf(-1.0 / p)
            })
            .collect();
        let w = (0..n * c)
            .map(|_| std.sample(rng) / (n as f64).sqrt())
            .collect();
        MatrixModule { b, n, c, h, w }
    }
}

/// One point of the decay experiment.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DecayPoint {
    pub p: f64,
    pub s: usize,
    pub ispasp: f64,
    /// Mean residual of `random_trials` random subsets of the same size.
    pub random: f64,
    /// Top-`s` by activation sum (the `2s ≥ N` degenerate answer), for reference.
    pub act_l1: f64,
}

/// Residual `‖V‖²_F` against the kept width `s`, for each sparsity exponent `p`.
pub fn decay_experiment(
    b: usize,
    n: usize,
    c: usize,
    ps: &[f64],
    sizes: &[usize],
    random_trials: usize,
    seed: u64,
) -> Result<Vec<DecayPoint>> {
    let mut rng = Pcg64::seed_from_u64(seed);
    let cfg = SelectConfig::default();
    let mut out = Vec::new();
    for &p in ps {
        let m = MatrixModule::power_law(b, n, c, p, &mut rng);
        let a = m.activation_sums();
        for &s in sizes {
            let sel = m.run(s, &cfg)?;
            let mut random = 0.0;
            for _ in 0..random_trials.max(1) {
                let mut idx: Vec<usize> = (0..n).collect();
                idx.shuffle(&mut rng);
                idx.truncate(s);
                random += m.residual(&idx);
            }
            let top = super::select::top_k(&a, s, None);
            out.push(DecayPoint {
                p,
                s,
                ispasp: sel.final_residual,
                random: random / random_trials.max(1) as f64,
                act_l1: m.residual(&top),
            });
        }
    }
    Ok(out)
}
