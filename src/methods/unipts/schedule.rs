//! The training schedule of the reference (timm `CosineLRScheduler`, per iteration, one
//! warm-up epoch from 0, `step_update` called after the optimizer step so step `t` uses
//! `lr(t)`): `lr(t) = t·lr0/I` for `t < I`, else `½·lr0·(1 + cos(π t / (E·I)))`.

/// Learning rate at iteration `t` of `epochs · iters` (warm-up of one epoch).
pub fn lr_at(t: usize, iters: usize, epochs: usize, lr0: f64) -> f64 {
    let iters = iters.max(1);
    if t < iters {
        return t as f64 * lr0 / iters as f64;
    }
    let total = (epochs * iters).max(1) as f64;
    0.5 * lr0 * (1.0 + (std::f64::consts::PI * (t as f64 / total).min(1.0)).cos())
}
