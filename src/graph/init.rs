//! Parameter initialisation, seeded. Defaults follow PyTorch: Kaiming-normal (fan-out,
//! ReLU gain) for convolutions as in torchvision's ResNet, PyTorch's default uniform for
//! linear layers, and identity batch norm.

use super::ops::Op;
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

    /// Initial values of every parameter of `op`, by parameter name.
    pub fn op_params(&mut self, op: &Op) -> Result<Vec<(&'static str, Tensor)>> {
        let mut out = Vec::new();
        for p in op.spec().params() {
            let n: usize = p.shape.iter().product();
            let data = match (op, p.name) {
                (Op::Conv2d(c), "weight") => {
                    let fan_out = c.out_channels / c.groups * c.kernel[0] * c.kernel[1];
                    self.normal(n, (2.0 / fan_out as f64).sqrt())
                }
                (Op::Linear(l), "weight") | (Op::Linear(l), "bias") => {
                    self.uniform(n, 1.0 / (l.in_features as f64).sqrt())
                }
                (Op::BatchNorm(_), "weight")
                | (Op::BatchNorm(_), "running_var")
                | (Op::ChannelAffine(_), "weight") => vec![1.0; n],
                _ => vec![0.0; n],
            };
            out.push((
                p.name,
                Tensor::from_vec(data, p.shape.clone(), &Device::Cpu)?,
            ));
        }
        Ok(out)
    }
}
