//! Losses: cross-entropy with label smoothing, and knowledge distillation.

use anyhow::Result;
use candle_core::{Tensor, D};
use candle_nn::ops::{log_softmax, softmax};

/// Mean cross-entropy of `[B, K]` logits against `[B]` u32 labels, with label smoothing
/// `eps` (target `1 - eps` on the label plus `eps / K` everywhere, PyTorch's definition).
/// Labels batched on the host move to the logits' device.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> Result<Tensor> {
    let logp = log_softmax(logits, D::Minus1)?;
    let labels = labels.to_device(logits.device())?;
    let nll = logp.gather(&labels.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    if eps <= 0.0 {
        return Ok(nll);
    }
    let smooth = logp.mean(D::Minus1)?.neg()?.mean_all()?;
    Ok(((nll * (1.0 - eps))? + (smooth * eps)?)?)
}

/// Distillation loss `T² · mean_b KL(softmax(t/T) ‖ softmax(s/T))` (Hinton et al.).
pub fn distillation(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let t = temperature;
    let pt = softmax(&(teacher.detach() / t)?, D::Minus1)?;
    let lpt = log_softmax(&(teacher.detach() / t)?, D::Minus1)?;
    let lps = log_softmax(&(student / t)?, D::Minus1)?;
    let kl = (pt * (lpt - lps)?)?.sum(D::Minus1)?.mean_all()?;
    Ok((kl * (t * t))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let l = cross_entropy(&logits, &labels, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        let want = ((lse - 3.0) + 3f32.ln()) / 2.0;
        assert!((l - want).abs() < 1e-6);
        // smoothing: (1-e)*nll + e*mean_k(-logp_k)
        let ls = cross_entropy(&logits, &labels, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let u0 = (3.0 * lse - 6.0) / 3.0;
        let u1 = 3f32.ln();
        let want_s = 0.9 * want + 0.1 * (u0 + u1) / 2.0;
        assert!((ls - want_s).abs() < 1e-6, "{ls} {want_s}");
    }

    #[test]
    fn distillation_is_zero_for_equal_logits_and_positive_otherwise() {
        let a = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[3f32, 2., 1.]], &Device::Cpu).unwrap();
        assert!(
            distillation(&a, &a, 4.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .abs()
                < 1e-6
        );
        assert!(
            distillation(&a, &b, 4.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.01
        );
    }
}
