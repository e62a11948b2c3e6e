//! The mask generator (spec §3): one linear head per gated group maps the dataset embedding
//! `s` to the gates' unconstrained Kumaraswamy parameters, `[a_uc; b_uc] = W_l s + c_l`.
//! Initialised with `W_l = 0`, `c_l = [a_init; 0.5413]`, so before meta-training every set
//! yields the plain BBDropout initial state (`E[π] ≈ 0.68` at `a_init = 2`).
//!
//! Differentiable pieces on candle tensors: `a = softplus(a_uc)` etc., the reparameterised
//! Kumaraswamy sample `π = (1 − u^{1/b})^{1/a}`, the relaxed-Bernoulli gate
//! `z = σ((logit π + logit u') / t)` per example, and the KL term as a surrogate whose value
//! is `Σ ∂KL/∂θ · θ` with host-computed exact gradients (candle has no digamma): its gradient
//! is the KL's, the true KL value is returned beside it for logging.

use super::bbdrop::{ab, kl, kl_grad_uc};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// Reference defaults (spec §5).
pub const A_INIT: f64 = 2.0;
pub const B_INIT: f64 = 0.5413;
pub const TEMPERATURE: f64 = 0.1;

/// One head per gated group.
pub struct Generator {
    /// `[2C_l, d_s]` weights and `[2C_l]` biases per group (a rows first, then b rows).
    pub w: Vec<Var>,
    pub c: Vec<Var>,
    /// Running mean of the embeddings seen in meta-training, subtracted before the heads
    /// (not optimised). Without it the embedding's large task-independent part makes the
    /// heads' gradient `g·sᵀ` mostly a second bias, and the task-dependent part is learnt
    /// slowly (measured on the planted-channel toy, examples/stamp_toy.rs).
    pub center: Var,
    /// Whether the heads read the centred, normalised embedding.
    pub centered: bool,
    pub channels: Vec<usize>,
    pub dim: usize,
}

impl Generator {
    pub fn new(channels: &[usize], dim: usize) -> Result<Self> {
        let dev = Device::Cpu;
        let mut w = Vec::new();
        let mut c = Vec::new();
        for &ch in channels {
            w.push(Var::zeros((2 * ch, dim), DType::F32, &dev)?);
            let mut init = vec![A_INIT as f32; ch];
            init.extend(std::iter::repeat_n(B_INIT as f32, ch));
            c.push(Var::from_tensor(&Tensor::from_vec(init, 2 * ch, &dev)?)?);
        }
        Ok(Generator {
            w,
            c,
            center: Var::zeros(dim, DType::F32, &dev)?,
            centered: false,
            channels: channels.to_vec(),
            dim,
        })
    }

    /// All trainable variables, named for the optimizer.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (i, (w, c)) in self.w.iter().zip(&self.c).enumerate() {
            v.push((format!("gen.{i}.w"), w.clone()));
            v.push((format!("gen.{i}.c"), c.clone()));
        }
        v
    }

    /// Moves the running embedding mean toward `s` (momentum 0.1; detached).
    pub fn track(&self, s: &Tensor) -> Result<()> {
        let m = ((self.center.as_tensor() * 0.9)? + (s.detach() * 0.1)?)?;
        self.center.set(&m)?;
        Ok(())
    }

    /// `(a_uc, b_uc)` per group, each `[C_l]`, for one embedding `s: [d_s]`.
    pub fn params(&self, s: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        if s.dims() != [self.dim] {
            bail!(
                "generator expects a [{}] embedding, got {:?}",
                self.dim,
                s.dims()
            );
        }
        let col = if self.centered {
            // Centred and RMS-normalised: only the task-dependent direction of `s` reaches
            // the heads, at a fixed scale (so the encoder gains nothing by inflating it).
            let v = s.broadcast_sub(self.center.as_tensor())?;
            let rms = (v.sqr()?.mean_all()? + 1e-6)?.sqrt()?;
            v.broadcast_div(&rms)?.unsqueeze(1)?
        } else {
            s.unsqueeze(1)?
        };
        self.w
            .iter()
            .zip(&self.c)
            .zip(&self.channels)
            .map(|((w, c), &ch)| {
                let v = (w.as_tensor().matmul(&col)?.squeeze(1)? + c.as_tensor())?;
                Ok((v.narrow(0, 0, ch)?, v.narrow(0, ch, ch)?))
            })
            .collect()
    }
}

/// `softplus` with the reference's clamps: `a = softplus(max(a_uc, −10))`,
/// `b = softplus(clamp(b_uc, −10, 50))`.
pub fn ab_tensors(a_uc: &Tensor, b_uc: &Tensor) -> Result<(Tensor, Tensor)> {
    // Stable softplus `max(x, 0) + ln(1 + e^{−|x|})`: the naive `ln(1 + e^x)` overflows
    // for x > 88 and its gradient becomes inf/inf = NaN (seen in meta-training).
    let sp = |x: &Tensor| -> Result<Tensor> {
        Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
    };
    Ok((
        sp(&a_uc.maximum(-10f32)?)?,
        sp(&b_uc.clamp(-10f32, 50f32)?)?,
    ))
}

/// Per-example relaxed-Bernoulli gates `[B, C]` from one Kumaraswamy sample `π` per channel
/// (shared across the batch, as the reference), differentiable in `(a_uc, b_uc)`.
pub fn sample_gates(
    a_uc: &Tensor,
    b_uc: &Tensor,
    batch: usize,
    temp: f64,
    rng: &mut Pcg64,
) -> Result<Tensor> {
    let c = a_uc.dim(0)?;
    let dev = Device::Cpu;
    let (a, b) = ab_tensors(a_uc, b_uc)?;
    let u: Vec<f32> = (0..c).map(|_| rng.gen_range(1e-6f32..1.0 - 1e-6)).collect();
    let lu = Tensor::from_vec(u.iter().map(|v| v.ln()).collect::<Vec<_>>(), c, &dev)?;
    // π = (1 − exp(ln u / b))^(1/a), kept inside (0, 1).
    let inner = (1.0 - (lu / &b)?.exp()?)?.clamp(1e-6f32, 1.0)?;
    let pi = (inner.log()? / &a)?.exp()?.clamp(1e-6f32, 1.0 - 1e-6)?;
    let logit_pi = (pi.log()? - (1.0 - &pi)?.log()?)?;
    relaxed_bernoulli(&logit_pi, batch, temp, rng)
}

/// Relaxed-Bernoulli (binary concrete) samples `[batch, C]` for logits `[C]`:
/// `σ((ℓ + log U − log(1−U)) / t)`, differentiable in `ℓ` (spec §8).
pub fn relaxed_bernoulli(
    logit: &Tensor,
    batch: usize,
    temp: f64,
    rng: &mut Pcg64,
) -> Result<Tensor> {
    let c = logit.dim(0)?;
    let noise: Vec<f32> = (0..batch * c)
        .map(|_| {
            let v = rng.gen_range(1e-6f32..1.0 - 1e-6);
            v.ln() - (1.0 - v).ln()
        })
        .collect();
    let noise = Tensor::from_vec(noise, (batch, c), logit.device())?;
    Ok(candle_nn::ops::sigmoid(
        &(noise.broadcast_add(&logit.unsqueeze(0)?)? / temp)?,
    )?)
}

/// The KL regulariser `Σ_c KL(a_c, b_c)` of one group: `(surrogate, value)`; the
/// surrogate's gradient w.r.t. `(a_uc, b_uc)` is the KL's exact gradient.
pub fn kl_term(a_uc: &Tensor, b_uc: &Tensor, alpha: f64) -> Result<(Tensor, f64)> {
    let av: Vec<f32> = a_uc.to_vec1()?;
    let bv: Vec<f32> = b_uc.to_vec1()?;
    let (mut value, mut ga, mut gb) = (0.0, Vec::new(), Vec::new());
    for (&x, &y) in av.iter().zip(&bv) {
        let (a, b) = ab(x as f64, y as f64);
        value += kl(a, b, alpha);
        let (da, db) = kl_grad_uc(x as f64, y as f64, alpha);
        ga.push(da as f32);
        gb.push(db as f32);
    }
    let dev = Device::Cpu;
    let n = av.len();
    let s = ((a_uc * Tensor::from_vec(ga, n, &dev)?)?.sum_all()?
        + (b_uc * Tensor::from_vec(gb, n, &dev)?)?.sum_all()?)?;
    Ok((s, value))
}

/// A seeded generator for gate noise.
pub fn rng(seed: u64) -> Pcg64 {
    Pcg64::seed_from_u64(seed)
}
