//! Accuracy of a model on a (possibly augmented) sample set — the UniPTS fitness reads it
//! on the augmented calibration data, not on held-out data.

use crate::data::{Augment, Dataset};
use crate::exec::{self, Feeds, Mode, Plan, PlanOpts};
use crate::graph::Graph;
use crate::train::fit_input;
use anyhow::Result;
use candle_core::Device;
use rand::SeedableRng;
use rand_pcg::Pcg64;

/// Top-1 accuracy in eval mode over `data`, augmenting with `augment` seeded by `seed`.
pub fn accuracy(
    g: &Graph,
    data: &Dataset,
    augment: &Augment,
    seed: u64,
    batch: usize,
) -> Result<f64> {
    let mut rng = Pcg64::seed_from_u64(seed);
    let pos: Vec<usize> = (0..data.len()).collect();
    let mut correct = 0usize;
    let plan = Plan::new(g, Mode::Eval, &PlanOpts::default())?;
    for chunk in pos.chunks(batch.max(1)) {
        let (x, y) = data.batch(chunk, augment.with_rng(&mut rng), &Device::Cpu)?;
        let mut out = plan.run(g, &fit_input(g, x)?, &Feeds::default())?;
        let logits = out.outputs.swap_remove(0);
        let pred = exec::argmax(&logits)?;
        let y = y.to_vec1::<u32>()?;
        correct += pred.iter().zip(&y).filter(|(a, b)| a == b).count();
    }
    Ok(correct as f64 / data.len().max(1) as f64)
}
