//! The search fitness (spec §3.3, code `fitness_function`): mask a copy of the DENSE
//! weights with the genome's per-layer sparsities, reset batch norm, re-estimate it in
//! training mode over the bootstrapped calibration loader with inputs perturbed by
//! N(0, σ²) noise (σ = 1e-6), then return the eval-mode top-1 on one more (re-augmented)
//! pass over the same loader. The search never trains weights.

use super::decode::layer_sparsity;
use crate::data::{Augment, Dataset};
use crate::graph::Graph;
use crate::sparse::bn::{recalibrate_bn, RecalibOpts};
use crate::sparse::eval::accuracy;
use crate::sparse::layers::{apply_masks, weight_host, SparseLayer};
use crate::sparse::mask::zeros_for;
use anyhow::Result;
use std::cmp::Ordering;

pub struct Fitness<'a> {
    pub dense: &'a Graph,
    pub layers: &'a [SparseLayer],
    /// The search loader's samples (a bootstrap of the calibration set).
    pub data: &'a Dataset,
    pub target: f64,
    pub extra: f64,
    pub noise: f64,
    pub augment: Augment,
    pub batch: usize,
    /// Per layer, flat indices by `(|w| asc, index asc)`: a mask for any sparsity is a prefix.
    order: Vec<Vec<usize>>,
}

impl<'a> Fitness<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dense: &'a Graph,
        layers: &'a [SparseLayer],
        data: &'a Dataset,
        target: f64,
        extra: f64,
        noise: f64,
        augment: Augment,
        batch: usize,
    ) -> Result<Self> {
        let mut order = Vec::with_capacity(layers.len());
        for l in layers {
            let w = weight_host(dense, l)?;
            let mut idx: Vec<usize> = (0..w.len()).collect();
            idx.sort_by(|&a, &b| {
                w[a].abs()
                    .partial_cmp(&w[b].abs())
                    .unwrap_or(Ordering::Equal)
                    .then(a.cmp(&b))
            });
            order.push(idx);
        }
        Ok(Fitness {
            dense,
            layers,
            data,
            target,
            extra,
            noise,
            augment,
            batch,
            order,
        })
    }

    pub fn sizes(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.numel()).collect()
    }

    /// Magnitude masks of the dense weights at the given per-layer sparsities.
    pub fn masks(&self, sparsity: &[f64]) -> Vec<Vec<f32>> {
        self.order
            .iter()
            .zip(sparsity)
            .map(|(idx, &s)| {
                let mut m = vec![1f32; idx.len()];
                for &i in &idx[..zeros_for(s, idx.len())] {
                    m[i] = 0.0;
                }
                m
            })
            .collect()
    }

    /// The masked dense model with re-estimated batch norm.
    pub fn masked_model(&self, sparsity: &[f64], seed: u64) -> Result<Graph> {
        let net = self.dense.deep_clone()?;
        apply_masks(&net, self.layers, &self.masks(sparsity))?;
        recalibrate_bn(
            &net,
            self.data,
            &RecalibOpts {
                batch: self.batch,
                noise: self.noise,
                augment: self.augment.clone(),
                seed,
                cumulative: true,
            },
        )?;
        Ok(net)
    }

    /// Fitness of a genome (accuracy in [0, 1]); `seed` fixes augmentation, order and noise.
    pub fn eval(&self, genome: &[f64], seed: u64) -> Result<f64> {
        let s = layer_sparsity(genome, &self.sizes(), self.target, self.extra)?;
        self.eval_sparsity(&s, seed)
    }

    pub fn eval_sparsity(&self, s: &[f64], seed: u64) -> Result<f64> {
        let net = self.masked_model(s, seed)?;
        accuracy(
            &net,
            self.data,
            &self.augment,
            seed.wrapping_add(0x5EED),
            self.batch.max(256),
        )
    }
}
