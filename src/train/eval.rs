//! Evaluation: top-1/top-5 accuracy and loss in eval mode, counting non-finite outputs
//! as wrong, and fitting data batches to a graph's input.

use super::loss::cross_entropy;
use super::metrics::topk_correct;
use crate::data::Dataset;
use crate::exec::{Feeds, Mode, Plan, PlanOpts};
use crate::graph::Graph;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub n: usize,
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub correct: usize,
    /// Samples whose logits held a NaN or an infinity; they count as wrong.
    #[serde(default)]
    pub non_finite: usize,
}

impl EvalResult {
    /// A one-line warning when some outputs were not finite, for every report to print.
    pub fn warning(&self) -> Option<String> {
        (self.non_finite > 0).then(|| {
            format!(
                "{} of {} test outputs were not finite (NaN or infinity) and count as wrong; the model's weights or inputs are broken",
                self.non_finite, self.n
            )
        })
    }
}

/// Number of classes the graph's first output scores (its last dimension).
pub fn output_classes(g: &Graph) -> Result<usize> {
    let shapes = g.shapes()?;
    let out = *g.outputs.first().context("the model has no output")?;
    shapes[out]
        .last()
        .copied()
        .with_context(|| format!("output '{}' is a scalar", g.nodes[out].name))
}

/// Fits a `[B, C, H, W]` batch to the graph's input shape: reshaped for flat inputs (MLPs),
/// bilinearly resized when only the resolution differs (resolution-pruned models).
pub fn fit_input(g: &Graph, x: Tensor) -> Result<Tensor> {
    let want = g.input_shape();
    if &x.dims()[1..] == want.as_slice() {
        return Ok(x);
    }
    if x.rank() == 4 && want.len() == 3 && x.dim(1)? == want[0] {
        return crate::data::resize::bilinear(&x, want[1], want[2]);
    }
    let per: usize = x.dims()[1..].iter().product();
    if per != want.iter().product::<usize>() {
        bail!(
            "data samples have shape {:?}, the model expects {:?}",
            &x.dims()[1..],
            want
        );
    }
    let mut d = vec![x.dim(0)?];
    d.extend(want);
    Ok(x.reshape(d)?)
}

/// Top-1/top-5 accuracy and mean loss in eval mode.
pub fn evaluate(g: &Graph, ds: &Dataset, batch: usize) -> Result<EvalResult> {
    let dev = Device::Cpu;
    ds.check_labels(output_classes(g)?)?;
    let (mut c1, mut c5, mut bad, mut loss) = (0usize, 0usize, 0usize, 0f64);
    let pos: Vec<usize> = (0..ds.len()).collect();
    let plan = Plan::new(g, Mode::Eval, &PlanOpts::default())?;
    for chunk in pos.chunks(batch.max(1)) {
        let (x, y) = ds.batch(chunk, None, &dev)?;
        let logits = plan
            .run(g, &fit_input(g, x)?, &Feeds::default())?
            .outputs
            .swap_remove(0);
        let l = cross_entropy(&logits, &y, 0.0)?.to_scalar::<f32>()? as f64;
        loss += l * chunk.len() as f64;
        let t = topk_correct(&logits, &y)?;
        c1 += t.top1;
        c5 += t.top5;
        bad += t.non_finite;
    }
    let n = ds.len().max(1) as f64;
    Ok(EvalResult {
        n: ds.len(),
        loss: loss / n,
        top1: c1 as f64 / n,
        top5: c5 as f64 / n,
        correct: c1,
        non_finite: bad,
    })
}
