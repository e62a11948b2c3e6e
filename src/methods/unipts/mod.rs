//! UniPTS (Xie et al., CVPR 2024): post-training sparsity from a small calibration set.
//! Spec: `shared/specs/unipts.md`.
//!
//! Pipeline (spec §3.1): the dense model and a calibration set → an evolutionary search of
//! the per-layer sparsity genome ([`search`], fitness = BN-recalibrated, noise-perturbed
//! accuracy on a bootstrap of the calibration set, [`fitness`]) → the genome decoded by
//! reducing–regrowing ([`decode`]) → dynamic sparse training of the student from the dense
//! teacher with the base-decayed distillation loss ([`dst`], [`loss`]). Each component can
//! be switched off for the ablations (uniform `[P]` genome, fixed τ, static mask).

pub mod decode;
pub mod dst;
pub mod fitness;
pub mod loss;
pub mod schedule;
pub mod search;

pub use decode::{kept_counts, layer_sparsity};
pub use dst::{DstConfig, DstEpoch};
pub use loss::{base_decayed_kd, tau_at};
pub use search::{GaConfig, SearchResult};

use crate::data::{Augment, Dataset};
use crate::graph::Graph;
use crate::sparse::layers::{prunable_layers, SparseLayer};
use crate::sparse::mask::{check_sparsity, zeros_for, Pattern};
use crate::util::Progress;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UniptsConfig {
    /// Target global sparsity P.
    pub target: f64,
    /// Regrow budget δ (0.05).
    pub extra: f64,
    /// The search; `None` = the uniform `[P]·L` genome (the "no search" ablation).
    pub ga: Option<GaConfig>,
    /// Size of the search's bootstrap loader (the reference reuses `num_samples_for_bn`).
    pub search_samples: usize,
    /// Input noise std of the BN re-estimation (1e-6).
    pub noise: f64,
    pub pattern: Pattern,
    pub dst: DstConfig,
    /// A genome found earlier (e.g. by the full run, for the training ablations): used
    /// as is, no search.
    #[serde(default)]
    pub genome: Option<Vec<f64>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UniptsResult {
    pub genome: Vec<f64>,
    /// Per-layer sparsity the genome decodes to (N:M: the pattern's).
    pub layer_sparsity: Vec<f64>,
    pub layer_names: Vec<String>,
    pub search: Option<SearchResult>,
    pub train: Vec<DstEpoch>,
    pub search_seconds: f64,
    pub train_seconds: f64,
}

/// Runs UniPTS on a copy of `dense`; returns the sparse model (weights `m ⊙ w`).
pub fn run(
    dense: &Graph,
    calib: &Dataset,
    cfg: &UniptsConfig,
    test: Option<&Dataset>,
    progress: &dyn Progress,
) -> Result<(Graph, UniptsResult)> {
    check_sparsity(cfg.target)?;
    if cfg.extra < 0.0 || cfg.target + cfg.extra >= 1.0 {
        bail!(
            "regrow budget δ = {} with sparsity {} must keep P + δ < 1",
            cfg.extra,
            cfg.target
        );
    }
    let layers: Vec<SparseLayer> = prunable_layers(dense);
    if layers.is_empty() {
        bail!("the model has no conv or linear layer to sparsify");
    }
    let sizes: Vec<usize> = layers.iter().map(|l| l.numel()).collect();
    let augment = Augment {
        crop_pad: cfg.dst.crop_pad,
        hflip: cfg.dst.hflip,
    };
    let t0 = Instant::now();
    let mut search = None;
    if let Some(g) = &cfg.genome {
        if g.len() != layers.len() {
            bail!(
                "the given genome has {} genes, the model has {} prunable layers",
                g.len(),
                layers.len()
            );
        }
    }
    let genome = match (&cfg.ga, cfg.pattern) {
        (_, Pattern::NM { .. }) => vec![cfg.target; layers.len()],
        _ if cfg.genome.is_some() => cfg.genome.clone().unwrap_or_default(),
        (None, _) => vec![cfg.target; layers.len()],
        (Some(ga), Pattern::Unstructured) => {
            // The search loader: a bootstrap (with replacement) of the calibration set.
            let mut rng = Pcg64::seed_from_u64(ga.seed ^ 0xB007);
            let pos: Vec<usize> = (0..cfg.search_samples)
                .map(|_| rng.gen_range(0..calib.len()))
                .collect();
            let boot = calib.subset(&pos)?;
            let fit = fitness::Fitness::new(
                dense,
                &layers,
                &boot,
                cfg.target,
                cfg.extra,
                cfg.noise,
                augment.clone(),
                64,
            )?;
            let mut k = 0u64;
            let res = search::search(layers.len(), cfg.target, ga, |g| {
                k += 1;
                let f = fit.eval(g, ga.seed.wrapping_mul(1_000_003).wrapping_add(k))?;
                if k.is_multiple_of(5) {
                    progress.line(&format!(
                        "  search: {k}/{} evaluations, last fitness {:.4}",
                        ga.evaluations(),
                        f
                    ));
                }
                Ok(f)
            })?;
            let g = res.genome.clone();
            search = Some(res);
            g
        }
    };
    let search_seconds = t0.elapsed().as_secs_f64();
    let layer_sparsity = match cfg.pattern {
        Pattern::Unstructured => decode::layer_sparsity(&genome, &sizes, cfg.target, cfg.extra)?,
        Pattern::NM { n, m } => vec![1.0 - n as f64 / m as f64; layers.len()],
    };
    let zeros: Vec<usize> = layer_sparsity
        .iter()
        .zip(&sizes)
        .map(|(&s, &n)| zeros_for(s, n))
        .collect();
    let budget = dst::Budget::from_pattern(cfg.pattern, zeros);
    let student = dense.deep_clone()?;
    let t1 = Instant::now();
    let train = dst::train(
        &student, dense, &layers, &budget, calib, &cfg.dst, test, progress,
    )?;
    Ok((
        student,
        UniptsResult {
            genome,
            layer_sparsity,
            layer_names: layers.iter().map(|l| l.name.clone()).collect(),
            search,
            train,
            search_seconds,
            train_seconds: t1.elapsed().as_secs_f64(),
        },
    ))
}
