//! Meta-training of the set encoder and mask generator on the reference dataset (spec
//! §4.1, first-order bi-level reference design), and target-time pruning (§4.2).
//!
//! A task is a random class subset of the reference data (labels kept: the pretrained head
//! scores all reference classes). Per task: the encoder reads features `e(x)` of a small
//! sample set (GAP of the last feature map of the frozen pretrained net), the generator
//! gives gate distributions, a copy of the pretrained weights takes `K` SGD steps on task
//! data through sampled gates (gate parameters held constant: first order), and the outer
//! loss — cross-entropy on held-out task data through freshly sampled gates plus
//! `γ·Σ KL` — is back-propagated into the encoder and generator only.

use super::bbdrop::{ab, mean_pi, ALPHA, THRES};
use super::gates::{fold_and_prune, gate_masks, gate_sites, GateSite};
use super::generator::{kl_term, sample_gates, Generator, TEMPERATURE};
use super::set_encoder::SetEncoder;
use crate::data::Dataset;
use crate::exec::{forward_with, ForwardOpts, Mode};
use crate::graph::cost::cost;
use crate::graph::{Graph, NodeId};
use crate::prune::{dependency_groups, Groups};
use crate::train::fit_input;
use crate::train::loss::cross_entropy;
use crate::train::optim::{Optimizer, OptimizerKind};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaConfig {
    pub iterations: usize,
    pub tasks: usize,
    /// Classes per task.
    pub n_way: usize,
    /// Set examples per class for the encoder.
    pub n_per_class: usize,
    pub inner_steps: usize,
    pub inner_lr: f64,
    pub inner_batch: usize,
    pub outer_batch: usize,
    /// Weight of `Σ KL` (sparsity strength).
    pub gamma: f64,
    pub enc_dim: usize,
    pub heads: usize,
    pub lr_encoder: f64,
    pub lr_generator: f64,
    pub seed: u64,
    /// Ablation (spec §7.12): the generator reads a constant instead of the set embedding,
    /// so it can only learn one dataset-agnostic mask distribution.
    #[serde(default)]
    pub constant_embedding: bool,
    /// Gated forwards (inner loop, outer loss, target adaptation) use the pretrained
    /// running statistics instead of batch statistics. With batch statistics a following
    /// batch norm re-normalises a channel that a gate scales down for the whole batch, so
    /// the loss barely sees the gate; with frozen statistics the gated forward is the
    /// pruned network's (what the gates are folded into). Off by default (the BBDropout
    /// reference); it makes the planted-channel toy work, see BENCHMARKS §10.
    #[serde(default)]
    pub frozen_bn: bool,
    /// Ramp `γ` linearly from 0 over this fraction of the iterations (0 = off).
    #[serde(default)]
    pub kl_warmup: f64,
    /// Subtract the running mean embedding before the generator heads (see
    /// [`Generator::center`]).
    #[serde(default)]
    pub center_embedding: bool,
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            iterations: 200,
            tasks: 4,
            n_way: 5,
            n_per_class: 10,
            inner_steps: 5,
            inner_lr: 0.01,
            inner_batch: 64,
            outer_batch: 128,
            gamma: 1e-4,
            enc_dim: 64,
            heads: 4,
            lr_encoder: 1e-3,
            lr_generator: 1e-2,
            seed: 0,
            constant_embedding: false,
            frozen_bn: false,
            kl_warmup: 0.0,
            center_embedding: false,
        }
    }
}

/// The meta-trained parts, tied to one architecture.
pub struct Stamp {
    pub encoder: SetEncoder,
    pub encoder_vars: VarMap,
    pub generator: Generator,
    pub sites: Vec<GateSite>,
    pub groups: Groups,
    /// The node whose output (GAP over space) is a sample's feature `e(x)`.
    pub feature_node: NodeId,
    /// See [`MetaConfig::constant_embedding`].
    pub constant_embedding: bool,
    /// See [`MetaConfig::frozen_bn`].
    pub frozen_bn: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaLog {
    pub iteration: usize,
    pub outer_ce: f64,
    pub kl: f64,
    /// Mean `E[π]` over all gates of the last task.
    pub mean_gate: f64,
    pub seconds: f64,
}

/// The last node with a spatial `[C, H, W]` output before the first linear layer: its
/// global average is the sample feature the encoder reads.
pub fn feature_node(g: &Graph) -> Result<NodeId> {
    let shapes = g.shapes()?;
    let first_linear = g
        .nodes
        .iter()
        .position(|n| matches!(n.op, crate::graph::Op::Linear(_)))
        .unwrap_or(g.nodes.len());
    (0..first_linear)
        .rev()
        .find(|&i| shapes[i].len() == 3 && !matches!(g.nodes[i].op, crate::graph::Op::Input(_)))
        .context("the model has no spatial feature map to encode samples with")
}

/// Features `[n, C]` of samples `pos` (eval mode, pretrained weights), on the host: the
/// set encoder and the mask generator are small and stay on the CPU whatever device the
/// backbone runs on (their masks move to it, differentiably, in the gated forward).
pub fn features(g: &Graph, node: NodeId, data: &Dataset, pos: &[usize]) -> Result<Tensor> {
    let (x, _) = data.batch(pos, None, &Device::Cpu)?;
    let x = fit_input(g, x)?;
    let out = forward_with(
        g,
        &x,
        &ForwardOpts {
            keep: &[node],
            ..ForwardOpts::new(Mode::Eval)
        },
    )?;
    Ok(out.kept[&node]
        .flatten_from(2)?
        .mean(2)?
        .to_device(&Device::Cpu)?)
}

impl Stamp {
    /// Fresh encoder and generator for `g`'s gateable groups.
    pub fn new(g: &Graph, cfg: &MetaConfig) -> Result<Stamp> {
        let groups = dependency_groups(g)?;
        let sites = gate_sites(g, &groups);
        if sites.is_empty() {
            bail!("the model has no gateable channel group (a conv followed by batch norm)");
        }
        let fnode = feature_node(g)?;
        let d_e = g.shapes()?[fnode][0];
        let (encoder, encoder_vars) = SetEncoder::init(d_e, cfg.enc_dim, cfg.heads, cfg.seed)?;
        let channels: Vec<usize> = sites.iter().map(|s| s.channels).collect();
        let mut generator = Generator::new(&channels, cfg.enc_dim)?;
        generator.centered = cfg.center_embedding;
        Ok(Stamp {
            encoder,
            encoder_vars,
            generator,
            sites,
            groups,
            feature_node: fnode,
            constant_embedding: cfg.constant_embedding,
            frozen_bn: cfg.frozen_bn,
        })
    }

    /// The encoder's variables by name, sorted (optimizer order, file order).
    pub fn encoder_params(&self) -> Result<Vec<(String, Var)>> {
        let d = self
            .encoder_vars
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("encoder parameter map poisoned"))?;
        let mut v: Vec<(String, Var)> = d.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// `(a_uc, b_uc)` per gated group for a sample set of `data`.
    pub fn gate_params(
        &self,
        g: &Graph,
        data: &Dataset,
        set: &[usize],
    ) -> Result<Vec<(Tensor, Tensor)>> {
        self.generator.params(&self.embedding(g, data, set)?)
    }

    /// The dataset embedding `s` of a sample set (zeros under the constant-embedding
    /// ablation).
    pub fn embedding(&self, g: &Graph, data: &Dataset, set: &[usize]) -> Result<Tensor> {
        let f = features(g, self.feature_node, data, set)?;
        let s = self.encoder.forward(&f.unsqueeze(0)?)?.squeeze(0)?;
        Ok(if self.constant_embedding {
            s.zeros_like()?
        } else {
            s
        })
    }

    /// Differentiable gated forward with freshly sampled per-example gates (batch-norm
    /// statistics from the batch, or the pretrained ones under `frozen_bn`).
    fn gated_logits(
        &self,
        g: &Graph,
        x: &crate::exec::Inputs,
        params: &[(Tensor, Tensor)],
        rng: &mut Pcg64,
    ) -> Result<Tensor> {
        let b = x.batch();
        let z: Vec<Tensor> = params
            .iter()
            .map(|(a, bb)| sample_gates(a, bb, b, TEMPERATURE, rng))
            .collect::<Result<_>>()?;
        let masks = gate_masks(g, &self.sites, &z)?;
        let o = if self.frozen_bn {
            ForwardOpts {
                input_masks: Some(&masks),
                grad: true,
                ..ForwardOpts::new(Mode::Eval)
            }
        } else {
            ForwardOpts {
                input_masks: Some(&masks),
                update_stats: false,
                ..ForwardOpts::new(Mode::Train)
            }
        };
        Ok(forward_with(g, x, &o)?.outputs.swap_remove(0))
    }

    /// First-order meta-training over class-subset tasks of the reference data.
    pub fn meta_train(
        &self,
        g: &Graph,
        data: &Dataset,
        cfg: &MetaConfig,
        mut log: impl FnMut(&MetaLog),
    ) -> Result<Vec<MetaLog>> {
        let classes = data.num_classes;
        if cfg.n_way == 0 || cfg.n_way > classes {
            bail!(
                "tasks of {} classes from a reference set with {classes}",
                cfg.n_way
            );
        }
        let by_class: Vec<Vec<usize>> = (0..classes)
            .map(|c| {
                (0..data.len())
                    .filter(|&i| data.label(i) as usize == c)
                    .collect()
            })
            .collect();
        let valid =
            (0.0..=1.0).contains(&cfg.kl_warmup) && cfg.gamma >= 0.0 && cfg.gamma.is_finite();
        if !valid {
            bail!(
                "KL warm-up {} must be a fraction in [0, 1] and γ {} finite and ≥ 0",
                cfg.kl_warmup,
                cfg.gamma
            );
        }
        if let Some(c) = by_class.iter().position(|v| v.len() < cfg.n_per_class + 2) {
            bail!("reference class {c} has too few samples for a task");
        }
        let mut rng = Pcg64::seed_from_u64(cfg.seed);
        let adam = OptimizerKind::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut opt_enc = Optimizer::new(adam.clone(), 0.0);
        let mut opt_gen = Optimizer::new(adam, 0.0);
        let enc_vars = self.encoder_params()?;
        let gen_vars = self.generator.vars();
        let mut history = Vec::new();
        for it in 0..cfg.iterations {
            let t0 = Instant::now();
            let gamma_t = if cfg.kl_warmup > 0.0 {
                let ramp = (it + 1) as f64 / (cfg.kl_warmup * cfg.iterations as f64);
                cfg.gamma * ramp.min(1.0)
            } else {
                cfg.gamma
            };
            let mut outer: Option<Tensor> = None;
            let (mut ce_sum, mut kl_sum, mut mean_gate) = (0.0, 0.0, 0.0);
            for _ in 0..cfg.tasks {
                let task = sample_task(&by_class, cfg, &mut rng);
                let t = self.task_loss(g, data, cfg, &task, gamma_t, &mut rng)?;
                kl_sum += t.kl / cfg.tasks as f64;
                mean_gate = t.mean_gate;
                ce_sum += t.ce / cfg.tasks as f64;
                let loss = t.loss;
                outer = Some(match outer {
                    None => loss,
                    Some(o) => (o + loss)?,
                });
            }
            let Some(outer) = outer else { break };
            let outer = (outer / cfg.tasks as f64)?;
            let lv = outer.to_scalar::<f32>()?;
            if !lv.is_finite() {
                bail!("meta-training loss became {lv} at iteration {it}");
            }
            let grads = outer.backward()?;
            opt_enc.step(&enc_vars, &grads, cfg.lr_encoder)?;
            opt_gen.step(&gen_vars, &grads, cfg.lr_generator)?;
            let l = MetaLog {
                iteration: it + 1,
                outer_ce: ce_sum,
                kl: kl_sum,
                mean_gate,
                seconds: t0.elapsed().as_secs_f64(),
            };
            log(&l);
            history.push(l);
        }
        Ok(history)
    }

    /// One task's outer loss: the inner loop adapts a copy of the pretrained weights on
    /// the task's training half through gates generated from its set embedding; the loss
    /// on the held-out half plus γ_t·KL is differentiable in the encoder and generator.
    fn task_loss(
        &self,
        g: &Graph,
        data: &Dataset,
        cfg: &MetaConfig,
        task: &Task,
        gamma_t: f64,
        rng: &mut Pcg64,
    ) -> Result<TaskLoss> {
        let emb = self.embedding(g, data, &task.set)?;
        if self.generator.centered {
            self.generator.track(&emb)?;
        }
        let params = self.generator.params(&emb)?;
        // Inner loop on a copy of the pretrained weights, gates held constant.
        let sgd = GatedSgd {
            steps: cfg.inner_steps,
            lr: cfg.inner_lr,
            momentum: 0.0,
            batch: cfg.inner_batch,
        };
        let theta = self.gated_sgd(g, data, &task.train, &params, &sgd, rng)?;
        // Outer loss on held-out task data, differentiable in the gate parameters.
        let (x, y) = task_batch(&theta, data, &task.val, cfg.outer_batch, rng)?;
        let logits = self.gated_logits(&theta, &x, &params, rng)?;
        // The gate parameters live on the host: the task loss joins their KL terms there.
        let ce = cross_entropy(&logits, &y, 0.0)?.to_device(&Device::Cpu)?;
        let mut loss = ce.clone();
        let (mut kl, mut gates) = (0.0, (0.0, 0usize));
        for (a, b) in &params {
            let (sur, v) = kl_term(a, b, ALPHA)?;
            loss = (loss + (sur * gamma_t)?)?;
            kl += v;
            for (x, y) in a.to_vec1::<f32>()?.iter().zip(b.to_vec1::<f32>()?) {
                let (p, q) = ab(*x as f64, y as f64);
                gates.0 += mean_pi(p, q);
                gates.1 += 1;
            }
        }
        Ok(TaskLoss {
            ce: ce.to_scalar::<f32>()? as f64,
            loss,
            kl,
            mean_gate: gates.0 / gates.1.max(1) as f64,
        })
    }

    /// Target-time adaptation (spec §4.2 step 4): `steps` SGD steps of a copy of `net`
    /// (pretrained weights, possibly with a new head) on target data through gates sampled
    /// from the generated distributions, which stay fixed. Returns the adapted copy.
    #[allow(clippy::too_many_arguments)]
    pub fn adapt(
        &self,
        net: &Graph,
        data: &Dataset,
        params: &[(Tensor, Tensor)],
        steps: usize,
        lr: f64,
        batch: usize,
        seed: u64,
    ) -> Result<Graph> {
        let mut rng = Pcg64::seed_from_u64(seed);
        let pool: Vec<usize> = (0..data.len()).collect();
        let sgd = GatedSgd {
            steps,
            lr,
            momentum: 0.9,
            batch,
        };
        self.gated_sgd(net, data, &pool, params, &sgd, &mut rng)
    }

    /// SGD on a copy of `net` through gates sampled from `params` (held constant): the
    /// meta-training inner loop and target adaptation. Returns the trained copy.
    fn gated_sgd(
        &self,
        net: &Graph,
        data: &Dataset,
        pool: &[usize],
        params: &[(Tensor, Tensor)],
        o: &GatedSgd,
        rng: &mut Pcg64,
    ) -> Result<Graph> {
        let theta = net.deep_clone()?;
        let vars = theta.trainable();
        let mut sgd = Optimizer::new(
            OptimizerKind::Sgd {
                momentum: o.momentum,
                nesterov: false,
            },
            0.0,
        );
        let fixed: Vec<(Tensor, Tensor)> = params
            .iter()
            .map(|(a, b)| (a.detach(), b.detach()))
            .collect();
        for step in 0..o.steps {
            let (x, y) = task_batch(&theta, data, pool, o.batch, rng)?;
            let logits = self.gated_logits(&theta, &x, &fixed, rng)?;
            let loss = cross_entropy(&logits, &y, 0.0)?;
            let lv = loss.to_scalar::<f32>()?;
            if !lv.is_finite() {
                bail!(
                    "gated SGD loss became {lv} at step {} (lr {}); lower the learning rate",
                    step + 1,
                    o.lr
                );
            }
            let grads = loss.backward()?;
            sgd.step(&vars, &grads, o.lr)?;
        }
        Ok(theta)
    }

    /// Eval-mode gate values `E[π]·1[E[π] ≥ τ]` per group for a target sample set, with
    /// `τ` = 1e-3 (the reference threshold) or, given a MACs budget (fraction of the dense
    /// MACs), the smallest threshold whose pruned network fits it (spec §4.4, second
    /// option: the meta-trained generator stays unchanged). Returns the gates and `τ`.
    pub fn target_gates(
        &self,
        g: &Graph,
        data: &Dataset,
        set: &[usize],
        macs_budget: Option<f64>,
    ) -> Result<(Vec<Vec<f32>>, f64)> {
        let params = self.gate_params(g, data, set)?;
        let means: Vec<Vec<f64>> = params
            .iter()
            .map(|(a, b)| {
                Ok(a.to_vec1::<f32>()?
                    .iter()
                    .zip(b.to_vec1::<f32>()?)
                    .map(|(x, y)| {
                        let (p, q) = ab(*x as f64, y as f64);
                        mean_pi(p, q)
                    })
                    .collect())
            })
            .collect::<Result<_>>()?;
        let gates_at = |tau: f64| -> Vec<Vec<f32>> {
            means
                .iter()
                .map(|m| {
                    let best = m.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    // Keep at least one channel per group (the most open gate).
                    m.iter()
                        .map(|&v| if v >= tau || v == best { v as f32 } else { 0.0 })
                        .collect()
                })
                .collect()
        };
        let Some(budget) = macs_budget else {
            return Ok((gates_at(THRES), THRES));
        };
        if !(budget > 0.0 && budget <= 1.0) {
            bail!("MACs budget {budget} must be in (0, 1]");
        }
        let dense = cost(g)?.total_macs as f64;
        let fits = |tau: f64| -> Result<bool> {
            let pruned = fold_and_prune(g, &self.groups, &self.sites, &gates_at(tau))?;
            Ok(cost(&pruned)?.total_macs as f64 <= budget * dense)
        };
        // Candidate thresholds: the distinct gate means, ascending; the first that fits.
        let mut cands: Vec<f64> = means
            .iter()
            .flatten()
            .copied()
            .filter(|&v| v >= THRES)
            .collect();
        cands.push(THRES);
        cands.sort_by(|a, b| a.total_cmp(b));
        cands.dedup();
        let (mut lo, mut hi) = (0usize, cands.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if fits(cands[mid] + 1e-12)? {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        if lo == cands.len() {
            bail!(
                "no threshold meets the MACs budget {budget} (one channel per gated group is kept)"
            );
        }
        let tau = cands[lo] + 1e-12;
        Ok((gates_at(tau), tau))
    }

    /// The physically pruned network for a target sample set (gates folded into BN).
    pub fn prune(
        &self,
        g: &Graph,
        data: &Dataset,
        set: &[usize],
        macs_budget: Option<f64>,
    ) -> Result<Graph> {
        let (z, _) = self.target_gates(g, data, set, macs_budget)?;
        fold_and_prune(g, &self.groups, &self.sites, &z)
    }
}

/// Settings of one gated SGD run.
struct GatedSgd {
    steps: usize,
    lr: f64,
    momentum: f64,
    batch: usize,
}

/// A random mini-batch of `n` samples from `pool`, fitted to `g`'s input.
fn task_batch(
    g: &Graph,
    data: &Dataset,
    pool: &[usize],
    n: usize,
    rng: &mut Pcg64,
) -> Result<(crate::exec::Inputs, Tensor)> {
    let pos: Vec<usize> = pool
        .choose_multiple(rng, n.min(pool.len()))
        .copied()
        .collect();
    let (x, y) = data.batch(&pos, None, &Device::Cpu)?;
    Ok((fit_input(g, x)?, y))
}

/// A random stratified sample set of `n` examples (round-robin over classes).
pub fn sample_set(data: &Dataset, n: usize, seed: u64) -> Result<Vec<usize>> {
    if n == 0 || n > data.len() {
        bail!(
            "a sample set of {n} examples from '{}' with {} samples",
            data.name,
            data.len()
        );
    }
    let mut rng = Pcg64::seed_from_u64(seed);
    let mut pos: Vec<usize> = (0..data.len()).collect();
    pos.shuffle(&mut rng);
    let k = data.num_classes.max(1);
    let mut by: Vec<Vec<usize>> = vec![Vec::new(); k];
    for p in pos {
        by[(data.label(p) as usize).min(k - 1)].push(p);
    }
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while out.len() < n {
        if let Some(v) = by[i % k].get(i / k) {
            out.push(*v);
        }
        i += 1;
        if i > n * k + data.len() {
            break;
        }
    }
    Ok(out)
}

/// One meta-training task: `n_way` random reference classes; the set the encoder reads
/// (`n_per_class` per class) and the rest split into inner-loop and outer-loss halves.
struct Task {
    set: Vec<usize>,
    train: Vec<usize>,
    val: Vec<usize>,
}

fn sample_task(by_class: &[Vec<usize>], cfg: &MetaConfig, rng: &mut Pcg64) -> Task {
    let mut cls: Vec<usize> = (0..by_class.len()).collect();
    cls.shuffle(rng);
    cls.truncate(cfg.n_way);
    let mut set = Vec::new();
    let mut pool = Vec::new();
    for &c in &cls {
        let mut v = by_class[c].clone();
        v.shuffle(rng);
        set.extend_from_slice(&v[..cfg.n_per_class]);
        pool.extend_from_slice(&v[cfg.n_per_class..]);
    }
    pool.shuffle(rng);
    let val = pool.split_off(pool.len() / 2);
    Task {
        set,
        train: pool,
        val,
    }
}

/// A task's outer loss and what is logged of it.
struct TaskLoss {
    loss: Tensor,
    ce: f64,
    kl: f64,
    mean_gate: f64,
}
