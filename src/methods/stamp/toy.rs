//! The spec's planted-channel toy (§7.11–7.12): a problem where the right mask for each
//! dataset is known, to check that the generator reads the sample set at all.
//!
//! The "pretrained" network is built by hand so that the channel carrying each input
//! pattern is known: 8×8 images with 16 input planes, class `k` lights a 3×3 block of
//! plane `k` (the other planes are blank). Layer 1 (`conv1`, 16 channels) routes plane `k`
//! through channel `k` only; `conv2` (1×1) and the classifier pass channel `k` to logit `k`.
//! A dataset is a random subset of 4 of the 16 patterns, so its informative layer-1
//! channels are exactly those 4. Blank planes give exactly zero responses, so
//! batch-statistics BN in a training forward does not turn absent channels into noise.
//! Used by `examples/stamp_toy.rs` (the full measurement) and `tests/stamp.rs` (a short
//! run).

use super::meta::{sample_set, MetaConfig, Stamp};
use crate::data::{Augment, Dataset};
use crate::graph::ops::Conv2d;
use crate::graph::{Graph, GraphBuilder};
use crate::sparse::eval::accuracy;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// Patterns = input planes = layer-1 channels = classes.
pub const PATTERNS: usize = 16;
const P: usize = PATTERNS;

/// The hand-built network: conv1 (3×3 box filter of plane k into channel k) → BN (γ 8,
/// β −2.5: a threshold) → ReLU → conv2 (1×1 identity) → BN (γ 10) → ReLU → GAP → fc (4·I).
pub fn planted_net() -> Result<Graph> {
    let dev = Device::Cpu;
    let mut b = GraphBuilder::new(0);
    let x = b.input(&[P, 8, 8])?;
    let x = b.conv("conv1", x, Conv2d::new(P, P, 3, 1, 1))?;
    let x = b.bn("bn1", x)?;
    let x = b.relu(x)?;
    let x = b.conv("conv2", x, Conv2d::new(P, P, 1, 1, 0))?;
    let x = b.bn("bn2", x)?;
    let x = b.relu(x)?;
    let x = b.gap(x)?;
    let x = b.flatten(x)?;
    let x = b.linear("fc", x, P, P)?;
    let mut w1 = vec![0f32; P * P * 9];
    for k in 0..P {
        for t in 0..9 {
            w1[(k * P + k) * 9 + t] = 1.0 / 9.0;
        }
    }
    b.set("conv1.weight", Tensor::from_vec(w1, (P, P, 3, 3), &dev)?)?;
    let eye = Tensor::eye(P, DType::F32, &dev)?;
    b.set("conv2.weight", eye.reshape((P, P, 1, 1))?)?;
    let full = |v: f32| Tensor::full(v, P, &dev);
    for (bn, gamma, beta) in [("bn1", 8.0, -2.5), ("bn2", 10.0, 0.0)] {
        b.set(&format!("{bn}.weight"), full(gamma)?)?;
        b.set(&format!("{bn}.bias"), full(beta)?)?;
        b.set(&format!("{bn}.running_mean"), full(0.0)?)?;
        b.set(&format!("{bn}.running_var"), full(1.0)?)?;
    }
    b.set("fc.weight", (eye * 4.0)?)?;
    b.set("fc.bias", full(0.0)?)?;
    b.finish(&[x])
}

/// `per_class` images of each class in `classes`: a noisy bright 3×3 block at a random
/// place in the class's plane; labels are the pattern indices.
pub fn planted_data(classes: &[usize], per_class: usize, seed: u64) -> Result<Dataset> {
    let mut rng = Pcg64::seed_from_u64(seed);
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for &c in classes {
        for _ in 0..per_class {
            let mut img = vec![0u8; P * 64];
            let (r0, c0) = (rng.gen_range(0..6), rng.gen_range(0..6));
            for r in r0..r0 + 3 {
                for q in c0..c0 + 3 {
                    img[c * 64 + r * 8 + q] = rng.gen_range(180..=255);
                }
            }
            pixels.extend(img);
            labels.push(c as u16);
        }
    }
    Dataset::new(
        "planted",
        pixels,
        labels,
        [P, 8, 8],
        255.0,
        vec![0.0; P],
        vec![1.0; P],
        (0..P).map(|k| format!("pattern{k}")).collect(),
    )
}

/// What the toy measures (spec thresholds in brackets).
#[derive(Debug, Clone)]
pub struct ToyReport {
    /// P(informative layer-1 channel kept at τ = 1e-3) over unseen datasets [> 0.9].
    pub p_keep: f64,
    /// P(other layer-1 channel dropped at τ = 1e-3) [> 0.7].
    pub p_drop: f64,
    /// Jaccard of the kept layer-1 channels of two disjoint datasets [< 0.5].
    pub jaccard: f64,
    /// Mean accuracy of the pruned net (no training) at `macs` of the dense MACs.
    pub acc_stamp: f64,
    /// The same for the constant-embedding generator.
    pub acc_flat: f64,
    pub macs: f64,
}

fn kept_layer1(z: &[Vec<f32>]) -> Vec<bool> {
    z[0].iter().map(|&v| v > 0.0).collect()
}

/// Evaluates a meta-trained `st` (and the constant-embedding `flat`) on `trials` unseen
/// datasets of 4 random patterns with fresh images, pruning both to `macs`.
pub fn evaluate(g: &Graph, st: &Stamp, flat: &Stamp, trials: u64, macs: f64) -> Result<ToyReport> {
    let mut rng = Pcg64::seed_from_u64(99);
    let (mut keep_inf, mut n_inf, mut drop_rest, mut n_rest) = (0, 0, 0, 0);
    let (mut acc_stamp, mut acc_flat) = (0.0, 0.0);
    let none = Augment::default();
    for trial in 0..trials {
        let mut cls: Vec<usize> = (0..P).collect();
        cls.shuffle(&mut rng);
        cls.truncate(4);
        let target = planted_data(&cls, 30, 1000 + trial)?;
        let set = sample_set(&target, 40, trial)?;
        let (z, _) = st.target_gates(g, &target, &set, None)?;
        for (k, kept) in kept_layer1(&z).into_iter().enumerate() {
            if cls.contains(&k) {
                n_inf += 1;
                keep_inf += kept as usize;
            } else {
                n_rest += 1;
                drop_rest += !kept as usize;
            }
        }
        let pruned = st.prune(g, &target, &set, Some(macs))?;
        acc_stamp += accuracy(&pruned, &target, &none, 0, 256)? / trials as f64;
        let pruned = flat.prune(g, &target, &set, Some(macs))?;
        acc_flat += accuracy(&pruned, &target, &none, 0, 256)? / trials as f64;
    }
    let a = planted_data(&[0, 1, 2, 3], 30, 7)?;
    let b = planted_data(&[8, 9, 10, 11], 30, 8)?;
    let ka = kept_layer1(&st.target_gates(g, &a, &sample_set(&a, 40, 0)?, None)?.0);
    let kb = kept_layer1(&st.target_gates(g, &b, &sample_set(&b, 40, 0)?, None)?.0);
    let inter = ka.iter().zip(&kb).filter(|(x, y)| **x && **y).count();
    let union = ka.iter().zip(&kb).filter(|(x, y)| **x || **y).count();
    Ok(ToyReport {
        p_keep: keep_inf as f64 / n_inf.max(1) as f64,
        p_drop: drop_rest as f64 / n_rest.max(1) as f64,
        jaccard: inter as f64 / union.max(1) as f64,
        acc_stamp,
        acc_flat,
        macs,
    })
}

/// The meta-training settings the toy uses (tasks of 4 of the 16 patterns).
pub fn config(iterations: usize, gamma: f64, seed: u64) -> MetaConfig {
    MetaConfig {
        iterations,
        tasks: 4,
        n_way: 4,
        n_per_class: 10,
        inner_steps: 1,
        inner_batch: 32,
        outer_batch: 64,
        gamma,
        enc_dim: 32,
        heads: 4,
        lr_encoder: 1e-3,
        lr_generator: 1e-2,
        seed,
        frozen_bn: true,
        center_embedding: true,
        ..Default::default()
    }
}
