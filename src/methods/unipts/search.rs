//! The evolutionary search over sparsity genomes (spec §3.3, code `genetic_algorithm`).
//!
//! Faithful to the reference's bookkeeping: generation 0 is `[P]·L` plus `pop0 − 1` genomes
//! drawn from U(0,1)^L; each generation keeps the `parents` fittest, makes
//! `crossover` children (the `[P]·L` genome always re-injected first, then uniform
//! crossover of two distinct parents) and `mutation` children (a parent drawn with
//! replacement, each gene multiplied by `1 + N(0,1)` with probability `p_mut`; a product
//! of exactly 0 keeps the old gene). No elitism, no immigrant (quirk 1: the reference
//! computes one and drops it), and the final population is re-evaluated once more to pick
//! the winner. The fitness is any closure, so the bookkeeping is testable on its own.

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GaConfig {
    /// Size of generation 0 (the reference: 25).
    pub population: usize,
    /// Generations (25).
    pub generations: usize,
    /// Parents kept by selection (10).
    pub parents: usize,
    /// Crossover children per generation, the `[P]·L` genome included (12).
    pub crossover: usize,
    /// Mutation children per generation (12).
    pub mutation: usize,
    /// Per-gene mutation probability (0.1).
    pub p_mut: f64,
    pub seed: u64,
}

impl GaConfig {
    /// The reference's constants.
    pub fn reference(seed: u64) -> Self {
        GaConfig {
            population: 25,
            generations: 25,
            parents: 10,
            crossover: 12,
            mutation: 12,
            p_mut: 0.1,
            seed,
        }
    }

    /// The spec's CPU proxy (§7.2): pop 10, 5 generations, 4 parents, 3 + 3 children.
    pub fn proxy(seed: u64) -> Self {
        GaConfig {
            population: 10,
            generations: 5,
            parents: 4,
            crossover: 3,
            mutation: 3,
            p_mut: 0.1,
            seed,
        }
    }

    pub fn check(&self) -> Result<()> {
        if self.population < 2 || self.parents < 2 || self.parents > self.population {
            bail!(
                "GA needs population ≥ 2 and 2 ≤ parents ≤ population (got {} and {})",
                self.population,
                self.parents
            );
        }
        if self.crossover == 0 || self.crossover + self.mutation < self.parents {
            bail!("GA needs ≥ 1 crossover child and at least as many children as parents");
        }
        if !(0.0..=1.0).contains(&self.p_mut) {
            bail!("mutation probability {} is outside [0, 1]", self.p_mut);
        }
        Ok(())
    }

    /// Fitness evaluations of a full search: `pop0 + (gens − 1)·children + children`.
    pub fn evaluations(&self) -> usize {
        let kids = self.crossover + self.mutation;
        self.population + self.generations.saturating_sub(1) * kids + kids
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Generation {
    pub size: usize,
    pub best: f64,
    pub mean: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchResult {
    pub genome: Vec<f64>,
    /// The winner's fitness in the final re-evaluation.
    pub fitness: f64,
    pub generations: Vec<Generation>,
    pub evaluations: usize,
    /// Every population, for regression tests and plots.
    pub populations: Vec<Vec<Vec<f64>>>,
}

/// One uniform crossover: each gene from `a` or `b` with probability ½.
pub fn crossover(a: &[f64], b: &[f64], rng: &mut Pcg64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| if rng.gen_bool(0.5) { x } else { y })
        .collect()
}

/// One mutation: with probability `p` a gene becomes `g·(1 + ξ)`, `ξ ~ N(0,1)`, unless that
/// product is exactly 0.
pub fn mutate(p_genome: &[f64], p: f64, rng: &mut Pcg64) -> Vec<f64> {
    p_genome
        .iter()
        .map(|&g| {
            if rng.gen::<f64>() < p {
                let xi: f64 = StandardNormal.sample(rng);
                let v = g * (1.0 + xi);
                if v == 0.0 {
                    g
                } else {
                    v
                }
            } else {
                g
            }
        })
        .collect()
}

/// Runs the search for `layers` genes at target sparsity `target`.
pub fn search(
    layers: usize,
    target: f64,
    cfg: &GaConfig,
    mut fitness: impl FnMut(&[f64]) -> Result<f64>,
) -> Result<SearchResult> {
    cfg.check()?;
    if layers == 0 {
        bail!("no prunable layers to search over");
    }
    let mut rng = Pcg64::seed_from_u64(cfg.seed);
    let uniform = vec![target; layers];
    let mut pop: Vec<Vec<f64>> = vec![uniform.clone()];
    for _ in 1..cfg.population {
        pop.push((0..layers).map(|_| rng.gen::<f64>()).collect());
    }
    let mut evaluations = 0;
    let mut generations = Vec::new();
    let mut populations = Vec::new();
    for _ in 0..cfg.generations {
        let mut fit = Vec::with_capacity(pop.len());
        for g in &pop {
            let f = fitness(g)?;
            if !f.is_finite() {
                bail!("fitness of a genome is {f}");
            }
            fit.push(f);
            evaluations += 1;
        }
        generations.push(Generation {
            size: pop.len(),
            best: fit.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            mean: fit.iter().sum::<f64>() / fit.len() as f64,
        });
        populations.push(pop.clone());
        // Selection: the fittest `parents`, best first (stable on ties: earlier first).
        let mut order: Vec<usize> = (0..pop.len()).collect();
        order.sort_by(|&a, &b| fit[b].total_cmp(&fit[a]).then(a.cmp(&b)));
        let parents: Vec<Vec<f64>> = order
            .iter()
            .take(cfg.parents.min(pop.len()))
            .map(|&i| pop[i].clone())
            .collect();
        let mut next = vec![uniform.clone()];
        while next.len() < cfg.crossover {
            let pick: Vec<&Vec<f64>> = parents.choose_multiple(&mut rng, 2).collect();
            next.push(crossover(pick[0], pick[1], &mut rng));
        }
        for _ in 0..cfg.mutation {
            let p = &parents[rng.gen_range(0..parents.len())];
            next.push(mutate(p, cfg.p_mut, &mut rng));
        }
        pop = next;
    }
    populations.push(pop.clone());
    let mut best = (f64::NEG_INFINITY, 0);
    for (i, g) in pop.iter().enumerate() {
        let f = fitness(g)?;
        evaluations += 1;
        if f > best.0 {
            best = (f, i);
        }
    }
    Ok(SearchResult {
        genome: pop[best.1].clone(),
        fitness: best.0,
        generations,
        evaluations,
        populations,
    })
}
