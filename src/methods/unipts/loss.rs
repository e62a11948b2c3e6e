//! The base-decayed distillation objective (spec §3.5, code `DistillKL`):
//! `L_e = (T²/B) Σ_b Σ_c p_t [ln p_t − (1/τ_e) ln p_s]`, `p_t = softmax(u/T)`,
//! `p_s = softmax(v)` (student not softened, as the code does), `τ_e = τ_0 γ^e`. Its
//! gradient `(T²/(B τ_e))(p_s − p_t)` grows as `τ_e` decays, which keeps the distillation
//! signal from vanishing as the sparse student approaches the teacher. The value can be
//! negative (the teacher entropy is not divided by `τ_e`).

use anyhow::Result;
use candle_core::{Tensor, D};
use candle_nn::ops::{log_softmax, softmax};

/// `τ_e = τ_0 · γ^e`.
pub fn tau_at(epoch: usize, tau0: f64, gamma: f64) -> f64 {
    tau0 * gamma.powi(epoch as i32)
}

/// `(T²/B) Σ p_t [ln p_t − ln p_s]`: the KL divergence from the softened teacher to the
/// student, which is never negative. Logged next to the objective (which can be), so
/// that progress reads as a distance to the teacher.
pub fn kd_kl(student: &Tensor, teacher: &Tensor, t: f64) -> Result<f64> {
    let b = student.dim(0)? as f64;
    let soft = (teacher.detach() / t)?;
    let pt = softmax(&soft, D::Minus1)?;
    let diff = (log_softmax(&soft, D::Minus1)? - log_softmax(&student.detach(), D::Minus1)?)?;
    Ok((pt * diff)?.sum_all()?.to_scalar::<f32>()? as f64 * t * t / b)
}

/// The loss for `[B, C]` student and teacher logits (teacher treated as constant).
pub fn base_decayed_kd(student: &Tensor, teacher: &Tensor, t: f64, tau: f64) -> Result<Tensor> {
    let b = student.dim(0)? as f64;
    let soft = (teacher.detach() / t)?;
    let pt = softmax(&soft, D::Minus1)?;
    let ln_pt = log_softmax(&soft, D::Minus1)?;
    let ln_ps = log_softmax(student, D::Minus1)?;
    let inner = (ln_pt - (ln_ps / tau)?)?;
    Ok(((pt * inner)?.sum_all()? * (t * t / b))?)
}
