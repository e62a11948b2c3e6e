//! Parameter initialisation, seeded, by the rule each op states for each parameter
//! ([`InitRule`]). The rules follow PyTorch: Kaiming-normal (fan-out,
//! ReLU gain) for convolutions as in torchvision's ResNet, PyTorch's default uniform for
//! linear layers, and identity batch norm.

use super::ops::{InitRule, Op};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_pcg::Pcg64;

/// Deterministic generator for initial weights.
pub struct Init {
    rng: Pcg64,
}

impl Init {
    pub fn new(seed: u64) -> Self {
        Init {
            rng: Pcg64::seed_from_u64(seed),
        }
    }

    fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        let d = Normal::new(0.0, std).expect("finite std");
        (0..n).map(|_| d.sample(&mut self.rng) as f32).collect()
    }

    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.gen_range(-bound..bound) as f32)
            .collect()
    }

    /// Initial values of every parameter of `op`, by parameter name, following the rule
    /// each parameter's op states ([`InitRule`]).
    pub fn op_params(&mut self, op: &Op) -> Result<Vec<(&'static str, Tensor)>> {
        let mut out = Vec::new();
        for p in op.spec().params() {
            let n: usize = p.shape.iter().product();
            let data = match p.init {
                InitRule::Zeros => vec![0.0; n],
                InitRule::Ones => vec![1.0; n],
                InitRule::Constant { value } => vec![value as f32; n],
                InitRule::KaimingNormalFanOut { fan_out } => {
                    self.normal(n, (2.0 / fan_out.max(1) as f64).sqrt())
                }
                InitRule::Uniform { bound } => self.uniform(n, bound),
            };
            out.push((
                p.name,
                Tensor::from_vec(data, p.shape.clone(), &Device::Cpu)?,
            ));
        }
        Ok(out)
    }
}
