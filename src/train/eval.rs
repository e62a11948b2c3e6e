//! Evaluation: top-1/top-5 accuracy and loss in eval mode, counting non-finite outputs
//! as wrong, and fitting data batches to a graph's input.

use super::loss::cross_entropy;
use super::metrics::topk_correct;
use crate::data::{Dataset, Features};
use crate::exec::{Feeds, Inputs, Mode, Plan, PlanOpts};
use crate::graph::{Graph, TokenInput};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
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

/// The model inputs for a data batch. Images: fitted to the graph's input shape (reshaped
/// for flat inputs, MLPs; bilinearly resized when only the resolution differs,
/// resolution-pruned models). Token arrays: matched to the graph's inputs by name (an
/// attention mask the data lacks is all ones, the tokenizers' default; arrays the model does
/// not read are ignored), each checked against its input's length.
pub fn fit_input(g: &Graph, x: Features) -> Result<Inputs> {
    let ids = g.input_ids();
    // What each input is (token ids, a key mask, or float values), worked out once.
    let kinds: Vec<Option<TokenInput>> = ids.iter().map(|&i| g.token_input(i)).collect();
    let tokens = kinds.iter().any(Option::is_some);
    match x {
        Features::Images(x) => {
            if ids.len() != 1 || tokens {
                let names: Vec<&str> = ids.iter().map(|&i| g.nodes[i].name.as_str()).collect();
                bail!(
                    "the model reads {} ({}); the data are images: give it a token dataset (a folder of .npy arrays named after its inputs)",
                    if tokens { "token inputs" } else { "several inputs" },
                    names.join(", ")
                );
            }
            Ok(Inputs(vec![fit_image(g, x)?]))
        }
        Features::Tokens(arrays) => {
            let b = arrays.first().map_or(0, |(_, t)| t.dims()[0]);
            let have: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
            let xs = ids
                .iter()
                .zip(&kinds)
                .map(|(&i, &kind)| {
                    let name = &g.nodes[i].name;
                    let crate::graph::ops::Op::Input(input) = &g.nodes[i].op else {
                        bail!("graph input '{name}' is not an Input op");
                    };
                    let want = &input.shape;
                    let t = match arrays.iter().find(|(n, _)| n == name) {
                        Some((_, t)) => t.clone(),
                        None if kind == Some(TokenInput::KeyMask) => {
                            let mut d = vec![b];
                            d.extend(want);
                            Tensor::ones(d, DType::F32, &Device::Cpu)?
                        }
                        None => bail!(
                            "the model's input '{name}' has no array in the data (arrays: {}); name the .npy file after the input",
                            have.join(", ")
                        ),
                    };
                    if kind.is_none() {
                        bail!("the model's input '{name}' takes float values, not token ids (the data are token arrays)");
                    }
                    if &t.dims()[1..] != want.as_slice() {
                        bail!(
                            "data array '{name}' has {:?} values per sample, the model's input takes {:?}",
                            &t.dims()[1..],
                            want
                        );
                    }
                    Ok(t)
                })
                .collect::<Result<_>>()?;
            Ok(Inputs(xs))
        }
    }
}

fn fit_image(g: &Graph, x: Tensor) -> Result<Tensor> {
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
    let dev = g.device();
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
