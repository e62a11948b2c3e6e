//! Learning-rate schedules with optional linear warm-up, evaluated per step.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Multiply by `gamma` at each milestone epoch.
    Step {
        milestones: Vec<usize>,
        gamma: f64,
    },
    /// Cosine decay from the base rate to `min_lr` over the whole run.
    Cosine {
        min_lr: f64,
    },
}

/// Learning rate at global step `step` of `total` (after warm-up of `warmup` steps).
pub fn lr_at(
    base: f64,
    sched: &Schedule,
    step: usize,
    total: usize,
    warmup: usize,
    steps_per_epoch: usize,
) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    match sched {
        Schedule::Constant => base,
        Schedule::Step { milestones, gamma } => {
            let epoch = step / steps_per_epoch.max(1);
            base * gamma.powi(milestones.iter().filter(|&&m| epoch >= m).count() as i32)
        }
        Schedule::Cosine { min_lr } => {
            let span = total.saturating_sub(warmup).max(1);
            let t = (step - warmup) as f64 / span as f64;
            min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let c = Schedule::Cosine { min_lr: 0.0 };
        assert!((lr_at(0.1, &c, 0, 100, 0, 10) - 0.1).abs() < 1e-12);
        assert!((lr_at(0.1, &c, 50, 100, 0, 10) - 0.05).abs() < 1e-12);
        assert!(lr_at(0.1, &c, 100, 100, 0, 10).abs() < 1e-12);
        assert!((lr_at(0.1, &c, 4, 100, 10, 10) - 0.05).abs() < 1e-12);
        let s = Schedule::Step {
            milestones: vec![2, 4],
            gamma: 0.1,
        };
        assert!((lr_at(1.0, &s, 19, 100, 0, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(1.0, &s, 20, 100, 0, 10) - 0.1).abs() < 1e-12);
        assert!((lr_at(1.0, &s, 45, 100, 0, 10) - 0.01).abs() < 1e-12);
    }
}
