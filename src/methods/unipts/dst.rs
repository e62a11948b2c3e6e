//! Dynamic sparse training with the base-decayed distillation loss (spec §3.4–3.6).
//!
//! Every layer keeps a dense latent weight `w`. At every step its mask is recomputed as the
//! top-k of `|w|` (k fixed per layer by the searched sparsity, or N:M groups), the student
//! runs with `m ⊙ w`, the gradient reaches all of `w` straight through, and pruned entries
//! get an extra `λ·w` pull toward zero (SR-STE). A pruned weight regrows as soon as its
//! latent magnitude overtakes the k-th largest. With `dynamic = false` the mask is computed
//! once and gradients are masked (the "static mask" ablation). The teacher is the frozen
//! dense model, by default in training-mode batch norm as the reference runs it.

use super::loss::{base_decayed_kd, kd_kl, tau_at};
use super::schedule::lr_at;
use crate::data::{Augment, Dataset};
use crate::exec::{forward_with, ForwardOpts, Mode, WeightMask};
use crate::graph::ops::param;
use crate::graph::{Graph, NodeId};
use crate::sparse::layers::{apply_masks, weight_host, SparseLayer};
use crate::sparse::mask::{magnitude_mask, nm_mask, Pattern};
use crate::train::optim::{Optimizer, OptimizerKind};
use crate::train::{evaluate, fit_input};
use crate::util::Progress;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DstConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// SR-STE decay on pruned latent weights (5e-5).
    pub lambda: f64,
    /// Teacher temperature T (4).
    pub temperature: f64,
    /// τ_0 (8) and its per-epoch decay γ (0.99 over 100 epochs; scale as γ^(100/E)).
    pub tau0: f64,
    pub gamma: f64,
    /// false: τ stays at τ_0 (the "no base decay" ablation).
    pub base_decay: bool,
    /// false: static mask with masked gradients (the "no DST" ablation).
    pub dynamic: bool,
    /// Teacher batch norm in training mode (batch statistics), as the reference.
    pub teacher_train_bn: bool,
    pub crop_pad: usize,
    pub hflip: bool,
    pub seed: u64,
}

impl DstConfig {
    /// The reference's settings with `epochs` epochs (γ rescaled so the total decay of τ
    /// matches the reference's 100 epochs).
    pub fn with_epochs(epochs: usize) -> Self {
        DstConfig {
            epochs,
            batch: 64,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 1e-4,
            lambda: 5e-5,
            temperature: 4.0,
            tau0: 8.0,
            gamma: 0.99f64.powf(100.0 / epochs.max(1) as f64),
            base_decay: true,
            dynamic: true,
            teacher_train_bn: true,
            crop_pad: 0,
            hflip: false,
            seed: 0,
        }
    }
}

/// How many weights each layer keeps (or its N:M pattern).
#[derive(Clone, Debug)]
pub enum Budget {
    /// Zeros per layer, aligned with the layers.
    Zeros(Vec<usize>),
    NM {
        n: usize,
        m: usize,
    },
}

impl Budget {
    pub fn from_pattern(p: Pattern, zeros: Vec<usize>) -> Budget {
        match p {
            Pattern::Unstructured => Budget::Zeros(zeros),
            Pattern::NM { n, m } => Budget::NM { n, m },
        }
    }
}

/// Masks of the current latent weights.
pub fn current_masks(g: &Graph, layers: &[SparseLayer], budget: &Budget) -> Result<Vec<Vec<f32>>> {
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let a: Vec<f32> = weight_host(g, l)?.iter().map(|v| v.abs()).collect();
            Ok(match budget {
                Budget::Zeros(z) => magnitude_mask(&a, z[i]),
                Budget::NM { n, m } => nm_mask(&a, l.row_len, *n, *m),
            })
        })
        .collect()
}

/// SR-STE's latent-weight gradient: `G + λ·(1 − m) ⊙ w` for the straight-through gradient
/// `G` of the masked weight (spec §3.4).
pub fn sr_ste_grad(g: &Tensor, mask: &Tensor, w: &Tensor, lambda: f64) -> Result<Tensor> {
    Ok((g + ((mask.affine(-1.0, 1.0)? * w)? * lambda)?)?)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DstEpoch {
    pub epoch: usize,
    pub tau: f64,
    pub lr: f64,
    /// The base-decayed objective (spec §3.5); it can be negative.
    pub loss: f64,
    /// KL divergence from the softened teacher to the student (≥ 0), for reading progress.
    #[serde(default)]
    pub kl: f64,
    /// Fraction of mask entries that changed during the epoch (regrowth activity).
    pub mask_flips: f64,
    pub test_top1: Option<f64>,
    pub seconds: f64,
}

/// Trains `student` in place; at the end its weights are `m ⊙ w` with `m` the final masks.
#[allow(clippy::too_many_arguments)]
pub fn train(
    student: &Graph,
    teacher: &Graph,
    layers: &[SparseLayer],
    budget: &Budget,
    data: &Dataset,
    cfg: &DstConfig,
    test: Option<&Dataset>,
    progress: &dyn Progress,
) -> Result<Vec<DstEpoch>> {
    if cfg.epochs == 0 || cfg.batch == 0 {
        bail!("sparse training needs epochs ≥ 1 and batch ≥ 1");
    }
    if data.is_empty() {
        bail!("calibration set '{}' is empty", data.name);
    }
    let dev = student.device();
    let params = student.trainable();
    let mut opt = Optimizer::new(
        OptimizerKind::Sgd {
            momentum: cfg.momentum,
            nesterov: false,
        },
        cfg.weight_decay,
    );
    let iters = data.len().div_ceil(cfg.batch);
    let augment = Augment {
        crop_pad: cfg.crop_pad,
        hflip: cfg.hflip,
    };
    let mut masks = current_masks(student, layers, budget)?;
    if !cfg.dynamic {
        apply_masks(student, layers, &masks)?;
    }
    let total: usize = layers.iter().map(|l| l.numel()).sum();
    let mut log = Vec::new();
    for epoch in 0..cfg.epochs {
        let te = Instant::now();
        let tau = if cfg.base_decay {
            tau_at(epoch, cfg.tau0, cfg.gamma)
        } else {
            cfg.tau0
        };
        let order = data.shuffled(cfg.seed.wrapping_mul(1000).wrapping_add(epoch as u64));
        let mut rng = Pcg64::seed_from_u64(cfg.seed.wrapping_mul(7919).wrapping_add(epoch as u64));
        let (mut loss_sum, mut kl_sum, mut seen, mut flips) = (0f64, 0f64, 0usize, 0usize);
        let mut lr = 0.0;
        for (bi, chunk) in order.chunks(cfg.batch).enumerate() {
            let t = epoch * iters + bi;
            lr = lr_at(t, iters, cfg.epochs, cfg.lr);
            if cfg.dynamic && t > 0 {
                flips += refresh(student, layers, budget, &mut masks)?;
            }
            let wm = weight_masks(&dev, layers, &masks, cfg.dynamic)?;
            let (x, _) = data.batch(chunk, augment.with_rng(&mut rng), &dev)?;
            let x = fit_input(student, x)?;
            let tl = teacher_logits(teacher, &x, cfg.teacher_train_bn)?;
            let so = ForwardOpts {
                weight_masks: Some(&wm),
                seed: cfg.seed ^ (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ..ForwardOpts::new(Mode::Train)
            };
            let logits = forward_with(student, &x, &so)?.outputs.swap_remove(0);
            let loss = base_decayed_kd(&logits, &tl, cfg.temperature, tau)?;
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                bail!(
                    "sparse training loss became {lv} at epoch {} step {bi} (lr {lr:.5}); lower the learning rate",
                    epoch + 1
                );
            }
            let mut grads = crate::exec::in_pool(|| loss.backward())?;
            if cfg.dynamic && cfg.lambda != 0.0 {
                sr_ste(student, layers, &wm, &mut grads, cfg.lambda)?;
            }
            opt.step(&params, &grads, lr)?;
            loss_sum += lv * chunk.len() as f64;
            kl_sum += kd_kl(&logits, &tl, cfg.temperature)? * chunk.len() as f64;
            seen += chunk.len();
        }
        student
            .check_finite()
            .with_context(|| format!("after sparse training epoch {} (lr {lr:.5})", epoch + 1))?;
        let test_top1 = match test {
            Some(t) => Some(masked_top1(student, layers, budget, t)?),
            None => None,
        };
        let e = DstEpoch {
            epoch: epoch + 1,
            tau,
            lr,
            loss: loss_sum / seen.max(1) as f64,
            kl: kl_sum / seen.max(1) as f64,
            mask_flips: flips as f64 / (total * iters).max(1) as f64,
            test_top1,
            seconds: te.elapsed().as_secs_f64(),
        };
        progress.line(&epoch_line(&e, cfg.epochs));
        log.push(e);
    }
    let fin = current_masks(student, layers, budget)?;
    apply_masks(student, layers, &fin)?;
    Ok(log)
}

/// Recomputes the masks from the latent weights (regrowth happens here); returns how many
/// entries changed.
fn refresh(
    student: &Graph,
    layers: &[SparseLayer],
    budget: &Budget,
    masks: &mut Vec<Vec<f32>>,
) -> Result<usize> {
    let fresh = current_masks(student, layers, budget)?;
    let flips = fresh
        .iter()
        .zip(masks.iter())
        .map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count())
        .sum();
    *masks = fresh;
    Ok(flips)
}

/// The executor's weight masks for the current top-k masks (straight-through when the
/// masks are dynamic, so the gradient reaches every latent weight).
fn weight_masks(
    dev: &Device,
    layers: &[SparseLayer],
    masks: &[Vec<f32>],
    dynamic: bool,
) -> Result<HashMap<NodeId, WeightMask>> {
    layers
        .iter()
        .zip(masks)
        .map(|(l, m)| {
            let mask = Tensor::from_vec(m.clone(), l.shape.as_slice(), dev)?;
            Ok((
                l.node,
                WeightMask {
                    mask,
                    straight_through: dynamic,
                },
            ))
        })
        .collect()
}

/// Top-1 on `test` of the student with its current masks applied (on a copy: the latent
/// weights keep training).
fn masked_top1(
    student: &Graph,
    layers: &[SparseLayer],
    budget: &Budget,
    test: &Dataset,
) -> Result<f64> {
    let probe = student.deep_clone()?;
    apply_masks(&probe, layers, &current_masks(student, layers, budget)?)?;
    Ok(evaluate(&probe, test, 500)?.top1)
}

/// The frozen dense teacher's logits (no gradient, batch statistics not updated).
fn teacher_logits(teacher: &Graph, x: &crate::exec::Inputs, train_bn: bool) -> Result<Tensor> {
    let mode = if train_bn { Mode::Train } else { Mode::Eval };
    let o = ForwardOpts {
        update_stats: false,
        ..ForwardOpts::new(mode)
    };
    Ok(forward_with(teacher, x, &o)?
        .outputs
        .swap_remove(0)
        .detach())
}

/// Replaces each layer's latent-weight gradient by its SR-STE form.
fn sr_ste(
    student: &Graph,
    layers: &[SparseLayer],
    wm: &HashMap<NodeId, WeightMask>,
    grads: &mut candle_core::backprop::GradStore,
    lambda: f64,
) -> Result<()> {
    for l in layers {
        let var = student.param(l.node, param::WEIGHT)?;
        if let Some(gr) = grads.get(var.as_tensor()) {
            let ng = sr_ste_grad(gr, &wm[&l.node].mask, var.as_tensor(), lambda)?;
            grads.insert(var.as_tensor(), ng);
        }
    }
    Ok(())
}

/// The one-line summary of a finished sparse-training epoch.
fn epoch_line(e: &DstEpoch, epochs: usize) -> String {
    format!(
        "  sparse epoch {}/{}: KL to teacher {:.4} (objective {:.4}) tau {:.3} lr {:.5} flips/step {:.2e}{} {:.1}s",
        e.epoch,
        epochs,
        e.kl,
        e.loss,
        e.tau,
        e.lr,
        e.mask_flips,
        e.test_top1
            .map(|a| format!(" test {:.2}%", 100.0 * a))
            .unwrap_or_default(),
        e.seconds
    )
}
