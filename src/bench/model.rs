//! Timing one model — a zoo model or a user's file — rather than a fixed workload: eval-mode
//! inference at a batch size (the plan built once, outside the timed steps, as an inference
//! session would) or a training step (forward, cross-entropy on the model's first output,
//! backward, SGD with momentum). The side-by-side suite (`bench/suite.py`) runs this on the
//! same ONNX files it gives onnxruntime and builds the same modules in PyTorch.

use super::{data, infer, time, train_step, BenchRow};
use crate::graph::Graph;
use crate::train::{Optimizer, OptimizerKind};
use anyhow::{bail, Result};

/// What to time on a model.
#[derive(Clone, Debug)]
pub struct ModelBench {
    /// Batch size of the timed input.
    pub batch: usize,
    /// Time a training step instead of inference.
    pub train: bool,
    pub warmup: usize,
    pub steps: usize,
}

/// Times `g` as `o` says; the row is named `{label}_{train|infer}_b{batch}`.
pub fn time_model(g: &Graph, label: &str, o: &ModelBench) -> Result<BenchRow> {
    if o.batch == 0 {
        bail!("batch size must be at least 1");
    }
    let name = format!(
        "{label}_{}_b{}",
        if o.train { "train" } else { "infer" },
        o.batch
    );
    let dims: Vec<usize> = g.input_shape().to_vec();
    if !o.train {
        let xs = crate::exec::random_inputs(g, o.batch)?;
        let f = infer(g)?;
        // Batch-1 steps are short: time more of them for a stable median.
        let steps = if o.batch == 1 { o.steps * 5 } else { o.steps };
        // A GPU runs asynchronously: each timed step ends when the device is done.
        let dev = g.device();
        // The warm-up covers the plan's choice between the pool and one thread.
        let warmup = o.warmup.max(crate::exec::threads::SETTLE as usize);
        return time(&name, warmup, steps, || {
            f(&xs)?;
            Ok(dev.synchronize()?)
        });
    }
    let shapes = g.shapes()?;
    let out = &shapes[g.outputs[0]];
    if out.len() != 1 {
        bail!(
            "a training step needs a model whose first output is [batch, classes]; \
             '{label}' outputs [batch, {out:?}]"
        );
    }
    let dev = g.device();
    let (x, y) = data(o.batch, &dims, out[0])?;
    let (x, y) = (x.to_device(&dev)?, y.to_device(&dev)?);
    let mut opt = Optimizer::new(
        OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: false,
        },
        5e-4,
    );
    time(&name, o.warmup, o.steps, || {
        train_step(g, &mut opt, &x, &y)?;
        Ok(dev.synchronize()?)
    })
}
