//! POT, the post-training pruning of OpenVINO's Post-training Optimization Tool
//! (Lazarevich, Kozlov & Malinin, ICCVW 2021), as the UniPTS spec §6.1 describes it:
//! on the BN-folded model, for sparsity levels `[S − 0.1, S]`:
//!   (a) masks from one global threshold on layer-normalised magnitudes `|w|/‖w‖₂`, then
//!       per-output-channel weight correction `w ← w·ρ + μ` restoring the channel's std and
//!       mean before re-zeroing;
//!   (b) fast bias correction: each layer's bias is set so its output mean on the FP
//!       model's mean input equals the FP layer's output mean;
//!   (c) layer-wise fine-tuning: every layer independently regresses the FP layer's output
//!       from the FP layer's input (MSE, Adam, lr 1e-5 weights / 1e-4 biases, gradients
//!       masked so zeros stay zero), 40 steps per 50-image batch from a 300-image pool.
//!
//! Deviation (documented): the reference only back-propagates on steps where the
//! normalised loss did not decrease (a bookkeeping quirk of its `J_prev`); here every step
//! back-propagates. The number of tuning iterations per level is a parameter (reference 30).

use crate::data::Dataset;
use crate::exec::{apply_node, forward_with, ForwardOpts, Mode};
use crate::graph::fold::fold_batchnorm;
use crate::graph::ops::param;
use crate::graph::ops::Op;
use crate::graph::{param_key, Graph, NodeId};
use crate::sparse::layers::{apply_masks, prunable_layers, weight_host, SparseLayer};
use crate::sparse::mask::global_masks;
use crate::train::fit_input;
use crate::train::optim::{Optimizer, OptimizerKind};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The FP model's activations (layer inputs and outputs) on some calibration samples.
type ActsFn<'a> = dyn Fn(&[usize]) -> Result<HashMap<NodeId, Tensor>> + 'a;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PotConfig {
    /// Tuning iterations per sparsity level (reference 30).
    pub iterations: usize,
    /// Optimizer steps per batch (reference 2000 / 50 = 40).
    pub steps: usize,
    /// Images per tuning batch (50) and the pool they are drawn from (300).
    pub batch: usize,
    pub pool: usize,
    pub lr_weights: f64,
    pub lr_bias: f64,
    /// Gap between the two levels (0.1).
    pub level_diff: f64,
    pub seed: u64,
}

impl Default for PotConfig {
    fn default() -> Self {
        PotConfig {
            iterations: 30,
            steps: 40,
            batch: 50,
            pool: 300,
            lr_weights: 1e-5,
            lr_bias: 1e-4,
            level_diff: 0.1,
            seed: 0,
        }
    }
}

/// Population standard deviation.
fn std(v: &[f32]) -> f64 {
    let n = v.len().max(1) as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt()
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

/// Weight correction of one output channel (spec §6.1a): with `w̃` = `w` masked,
/// `ρ = std(w)/(std(w̃) + 1e-9)`, `μ = mean(w) − mean(w̃·ρ)`, `w ← w·ρ + μ`, then masked.
/// Returns `(ρ, μ)`.
pub fn correct_channel(w: &mut [f32], mask: &[f32]) -> (f64, f64) {
    let masked: Vec<f32> = w.iter().zip(mask).map(|(a, m)| a * m).collect();
    let rho = std(w) / (std(&masked) + 1e-9);
    let mu = mean(w) - masked.iter().map(|&x| x as f64 * rho).sum::<f64>() / w.len().max(1) as f64;
    for (a, m) in w.iter_mut().zip(mask) {
        *a = if *m == 0.0 {
            0.0
        } else {
            (*a as f64 * rho + mu) as f32
        };
    }
    (rho, mu)
}

/// Runs POT on a BN-folded copy of `dense` to global sparsity `s`; returns the sparse model.
pub fn pot(dense: &Graph, calib: &Dataset, s: f64, cfg: &PotConfig) -> Result<Graph> {
    if calib.is_empty() {
        bail!("POT needs a non-empty calibration set");
    }
    let fp = fold_batchnorm(dense)?;
    let net = fold_batchnorm(dense)?;
    let layers = prunable_layers(&net);
    let mut rng = Pcg64::seed_from_u64(cfg.seed);
    let mut pool: Vec<usize> = (0..calib.len()).collect();
    pool.shuffle(&mut rng);
    pool.truncate(cfg.pool.min(calib.len()));
    let mut levels = vec![];
    if s - cfg.level_diff > 0.0 {
        levels.push(s - cfg.level_diff);
    }
    levels.push(s);
    let ins: Vec<NodeId> = layers.iter().map(|l| fp.nodes[l.node].inputs[0]).collect();
    let mut keep: Vec<NodeId> = ins.clone();
    keep.extend(layers.iter().map(|l| l.node));
    let fp_acts = |pos: &[usize]| -> Result<HashMap<NodeId, Tensor>> {
        let (x, _) = calib.batch(pos, None, &Device::Cpu)?;
        let x = fit_input(&fp, x)?;
        Ok(forward_with(
            &fp,
            &x,
            &ForwardOpts {
                keep: &keep,
                ..ForwardOpts::new(Mode::Eval)
            },
        )?
        .kept)
    };
    for &level in &levels {
        // (a) normalised-magnitude masks + weight correction.
        let scores: Vec<Vec<f32>> = layers
            .iter()
            .map(|l| {
                let w = weight_host(&net, l)?;
                let nrm = w
                    .iter()
                    .map(|&v| ((v + f32::EPSILON) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    .max(1e-30);
                Ok(w.iter()
                    .map(|&v| ((v + f32::EPSILON).abs() as f64 / nrm) as f32)
                    .collect())
            })
            .collect::<Result<_>>()?;
        let masks = global_masks(&scores, level);
        for (l, m) in layers.iter().zip(&masks) {
            let mut w = weight_host(&net, l)?;
            for (row, mrow) in w.chunks_mut(l.row_len).zip(m.chunks(l.row_len)) {
                correct_channel(row, mrow);
            }
            net.set_param(
                &l.key,
                &Tensor::from_vec(w, l.shape.as_slice(), &Device::Cpu)?,
            )?;
        }
        // (b) fast bias correction on the pool's FP statistics.
        bias_correction(&fp, &net, &layers, &ins, &fp_acts(&pool)?)?;
        // (c) layer-wise fine-tuning with FP inputs.
        tune(&net, &layers, &ins, &masks, &pool, cfg, &mut rng, &fp_acts)?;
        apply_masks(&net, &layers, &masks)?;
    }
    Ok(net)
}

/// Per-channel mean of an `[N, C, ...]` tensor.
fn channel_mean(t: &Tensor) -> Result<Vec<f64>> {
    let c = t.dim(1)?;
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let per = v.len() / (t.dim(0)? * c).max(1);
    let mut m = vec![0f64; c];
    for (k, blk) in v.chunks_exact(per.max(1)).enumerate() {
        m[k % c] += blk.iter().map(|&a| a as f64).sum::<f64>();
    }
    let n = (v.len() / c).max(1) as f64;
    Ok(m.into_iter().map(|x| x / n).collect())
}

/// Spec §6.1b: `bias ← ȳ − ŷ`, `ŷ` the bias-free sparse layer's mean output on a constant
/// input holding the FP input means. Layers whose bias has an exact zero are skipped, as in
/// the reference.
pub fn bias_correction(
    fp: &Graph,
    net: &Graph,
    layers: &[SparseLayer],
    ins: &[NodeId],
    acts: &HashMap<NodeId, Tensor>,
) -> Result<()> {
    for (l, &inp) in layers.iter().zip(ins) {
        let has_bias = match &net.nodes[l.node].op {
            Op::Conv2d(c) => c.bias,
            Op::Linear(li) => li.bias,
            _ => false,
        };
        if !has_bias {
            continue;
        }
        let bk = param_key(&net.nodes[l.node].name, param::BIAS);
        let b: Vec<f32> = net.params()[&bk].as_tensor().to_vec1()?;
        if b.contains(&0.0) {
            continue;
        }
        let (x, y) = (&acts[&inp], &acts[&l.node]);
        let xm = channel_mean(x)?;
        let ym = channel_mean(y)?;
        let mut shape = x.dims().to_vec();
        shape[0] = 1;
        let per: usize = shape[2..].iter().product();
        let cst: Vec<f32> = xm
            .iter()
            .flat_map(|&m| std::iter::repeat_n(m as f32, per.max(1)))
            .collect();
        let cst = Tensor::from_vec(cst, shape, &Device::Cpu)?;
        let out = apply_node(net, l.node, &[&cst], Mode::Eval)?;
        let hat = channel_mean(&out)?;
        let nb: Vec<f32> = (0..b.len())
            .map(|o| (ym[o] - (hat[o] - b[o] as f64)) as f32)
            .collect();
        net.set_param(&bk, &Tensor::from_vec(nb, b.len(), &Device::Cpu)?)?;
    }
    let _ = fp;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn tune(
    net: &Graph,
    layers: &[SparseLayer],
    ins: &[NodeId],
    masks: &[Vec<f32>],
    pool: &[usize],
    cfg: &PotConfig,
    rng: &mut Pcg64,
    fp_acts: &ActsFn,
) -> Result<()> {
    let adam = OptimizerKind::Adamw {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let mut ow = Optimizer::new(adam.clone(), 0.0);
    let mut ob = Optimizer::new(adam, 0.0);
    let wparams: Vec<(String, candle_core::Var)> = layers
        .iter()
        .map(|l| (l.key.clone(), net.params()[&l.key].clone()))
        .collect();
    let bparams: Vec<(String, candle_core::Var)> = layers
        .iter()
        .filter_map(|l| {
            let k = param_key(&l.name, param::BIAS);
            net.params().get(&k).map(|v| (k, v.clone()))
        })
        .collect();
    let mask_t: Vec<Tensor> = layers
        .iter()
        .zip(masks)
        .map(|(l, m)| {
            Ok(Tensor::from_vec(
                m.clone(),
                l.shape.as_slice(),
                &Device::Cpu,
            )?)
        })
        .collect::<Result<_>>()?;
    for _ in 0..cfg.iterations {
        let batch: Vec<usize> = pool
            .choose_multiple(rng, cfg.batch.min(pool.len()))
            .copied()
            .collect();
        let acts = fp_acts(&batch)?;
        for _ in 0..cfg.steps {
            let mut total: Option<Tensor> = None;
            for (l, &inp) in layers.iter().zip(ins) {
                let y = apply_node(net, l.node, &[&acts[&inp]], Mode::Eval)?;
                let loss = (y - &acts[&l.node])?.sqr()?.mean_all()?;
                total = Some(match total {
                    None => loss,
                    Some(t) => (t + loss)?,
                });
            }
            let Some(total) = total else { return Ok(()) };
            let lv = total.to_scalar::<f32>()?;
            if !lv.is_finite() {
                bail!("POT layer-wise tuning loss became {lv}");
            }
            let mut grads = crate::exec::in_pool(|| total.backward())?;
            for ((_, v), m) in wparams.iter().zip(&mask_t) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let gm = (g * m)?;
                    grads.insert(v.as_tensor(), gm);
                }
            }
            ow.step(&wparams, &grads, cfg.lr_weights)?;
            ob.step(&bparams, &grads, cfg.lr_bias)?;
        }
    }
    Ok(())
}
