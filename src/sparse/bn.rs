//! Batch-norm re-estimation: after weights are masked the activations' statistics move, and
//! the stored running statistics no longer describe them. Resetting them and running the
//! calibration data through in training mode (no gradients) is the standard cheap repair
//! (UniPTS's fitness does exactly this, with tiny input noise).

use crate::data::{Augment, Dataset};
use crate::exec::{forward_with, ForwardOpts, Mode};
use crate::graph::ops::param;
use crate::graph::ops::Op;
use crate::graph::{param_key, Graph};
use crate::train::fit_input;
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_pcg::Pcg64;

/// Sets every batch norm's running mean to 0 and variance to 1 (PyTorch's
/// `reset_running_stats`).
pub fn reset_bn(g: &Graph) -> Result<()> {
    for n in &g.nodes {
        if let Op::BatchNorm(b) = &n.op {
            let c = b.num_features;
            g.set_param(
                &param_key(&n.name, param::RUNNING_MEAN),
                &Tensor::zeros(c, candle_core::DType::F32, &Device::Cpu)?,
            )?;
            g.set_param(
                &param_key(&n.name, param::RUNNING_VAR),
                &Tensor::ones(c, candle_core::DType::F32, &Device::Cpu)?,
            )?;
        }
    }
    Ok(())
}

/// Options of a re-estimation pass.
#[derive(Clone, Debug)]
pub struct RecalibOpts {
    pub batch: usize,
    /// Std of Gaussian noise added to the (normalised) inputs.
    pub noise: f64,
    pub augment: Augment,
    pub seed: u64,
    /// Cumulative average of the batch statistics (PyTorch `momentum=None`) instead of
    /// each layer's exponential running average. With few batches the EMA still holds a
    /// visible share of the reset values (0.9^32 ≈ 3 % of var = 1 after 32 batches, large
    /// next to typical variances of 0.1), so short recalibrations need this.
    pub cumulative: bool,
}

impl Default for RecalibOpts {
    fn default() -> Self {
        RecalibOpts {
            batch: 64,
            noise: 0.0,
            augment: Augment::default(),
            seed: 0,
            cumulative: true,
        }
    }
}

/// Resets the batch-norm statistics and re-estimates them over `data` (one pass, running
/// averages with each layer's momentum, as PyTorch does).
pub fn recalibrate_bn(g: &Graph, data: &Dataset, o: &RecalibOpts) -> Result<()> {
    reset_bn(g)?;
    let mut rng = Pcg64::seed_from_u64(o.seed);
    let order = data.shuffled(o.seed);
    for (k, chunk) in order.chunks(o.batch.max(1)).enumerate() {
        let (x, _) = data.batch(chunk, o.augment.with_rng(&mut rng), &Device::Cpu)?;
        let mut x = fit_input(g, x)?;
        if o.noise > 0.0 {
            // Noise on float inputs only (token ids and masks stay what they are).
            let nd = rand_distr::Normal::new(0f32, o.noise as f32)?;
            for (t, &id) in x.0.iter_mut().zip(&g.input_ids()) {
                if g.token_input(id).is_some() {
                    continue;
                }
                let e: Vec<f32> = (0..t.elem_count())
                    .map(|_| rand_distr::Distribution::sample(&nd, &mut rng))
                    .collect();
                *t = (&*t + Tensor::from_vec(e, t.dims(), &Device::Cpu)?)?;
            }
        }
        let opts = ForwardOpts {
            bn_momentum: o.cumulative.then(|| 1.0 / (k + 1) as f64),
            ..ForwardOpts::new(Mode::Train)
        };
        forward_with(g, &x, &opts)?;
    }
    Ok(())
}
