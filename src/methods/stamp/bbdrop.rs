//! Beta-Bernoulli dropout gates (Lee et al.; spec §2.2, official `bbdropout.py`): per channel
//! `π ~ Beta(α, 1)`, `z ~ Bernoulli(π)`, variational posterior Kumaraswamy(a, b) with
//! `a = softplus(max(a_uc, −10))`, `b = softplus(clamp(b_uc, −10, 50))`.
//! A channel is kept when `E[π] ≥ thres` (1e-3); in eval mode its gate is `E[π]`, which
//! folds into the batch norm before it.

use super::special::{digamma, lgamma, sigmoid, softplus, trigamma};

/// Euler–Mascheroni γ, as the reference code writes it.
pub const EULER: f64 = 0.577_215_664_901_532;

/// The reference defaults.
pub const ALPHA: f64 = 1e-4;
pub const THRES: f64 = 1e-3;

/// `(a, b)` from the unconstrained parameters.
pub fn ab(a_uc: f64, b_uc: f64) -> (f64, f64) {
    (softplus(a_uc.max(-10.0)), softplus(b_uc.clamp(-10.0, 50.0)))
}

/// `E[π] = b·B(1 + 1/a, b)`.
pub fn mean_pi(a: f64, b: f64) -> f64 {
    b * (lgamma(1.0 + 1.0 / a) + lgamma(b) - lgamma(1.0 + 1.0 / a + b)).exp()
}

/// Reparameterised Kumaraswamy sample `π = (1 − u^{1/b})^{1/a}`, `u` clamped to
/// `[1e-6, 1 − 1e-6]`.
pub fn sample_pi(a: f64, b: f64, u: f64) -> f64 {
    let u = u.clamp(1e-6, 1.0 - 1e-6);
    (1.0 - u.powf(1.0 / b)).powf(1.0 / a)
}

/// `KL(Kumaraswamy(a, b) ‖ Beta(α, 1))` per gate, as the reference computes it.
pub fn kl(a: f64, b: f64, alpha: f64) -> f64 {
    (1.0 - alpha / a) * (-EULER - digamma(b) - 1.0 / b) + (a * b + 1e-10).ln()
        - alpha.ln()
        - (b - 1.0) / b
}

/// `∂KL/∂a_uc`, `∂KL/∂b_uc` (through the softplus and the clamps).
pub fn kl_grad_uc(a_uc: f64, b_uc: f64, alpha: f64) -> (f64, f64) {
    let (a, b) = ab(a_uc, b_uc);
    let h = -EULER - digamma(b) - 1.0 / b;
    let dka = alpha / (a * a) * h + a * b / (a * b + 1e-10) / a;
    let dkb =
        (1.0 - alpha / a) * (-trigamma(b) + 1.0 / (b * b)) + a / (a * b + 1e-10) - 1.0 / (b * b);
    let da = if a_uc > -10.0 { sigmoid(a_uc) } else { 0.0 };
    let db = if b_uc > -10.0 && b_uc < 50.0 {
        sigmoid(b_uc)
    } else {
        0.0
    };
    (dka * da, dkb * db)
}

/// Eval-mode gate: `E[π]` when kept (`E[π] ≥ thres`), else 0.
pub fn eval_gate(a_uc: f64, b_uc: f64, thres: f64) -> f64 {
    let (a, b) = ab(a_uc, b_uc);
    let m = mean_pi(a, b);
    if m >= thres {
        m
    } else {
        0.0
    }
}
