//! The training loop. Deterministic for a seed: epoch `e` shuffles with `seed·1000 + e`,
//! augments and drops out from seeds derived the same way, so a run resumed from an
//! epoch checkpoint continues exactly as the uninterrupted run would.

use super::checkpoint::{self, Checkpoint, DataIdentity};
use super::config::{EpochLog, TrainConfig, TrainOpts, TrainResult};
use super::eval::{evaluate, fit_input, output_classes};
use super::loss::{cross_entropy, distillation};
use super::metrics::topk_correct;
use super::optim::Optimizer;
use super::schedule::lr_at;
use crate::data::{Augment, Dataset};
use crate::exec::{forward_with, ForwardOpts, Mode};
use crate::graph::Graph;
use crate::util::Silent;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use std::time::Instant;

/// Trains `g` in place on `train`. With `opts.checkpoint` set and a checkpoint present
/// there, continues from it (same config required).
pub fn train(
    g: &Graph,
    data: &Dataset,
    cfg: &TrainConfig,
    opts: &TrainOpts,
) -> Result<TrainResult> {
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        bail!("epochs and batch size must be positive");
    }
    if data.is_empty() {
        bail!("training set '{}' is empty", data.name);
    }
    data.check_labels(output_classes(g)?)?;
    if let Some(t) = opts.test {
        t.check_labels(output_classes(g)?)?;
    }
    let params = g.trainable();
    let device_path = opts.device_path || !g.device().is_cpu();
    let mut opt =
        Optimizer::new(cfg.optimizer.clone(), cfg.weight_decay).with_tensor_ops(device_path);
    let mut history = Vec::new();
    let mut start_epoch = 0;
    // Hashing the pixels costs a pass over the data: only for checkpointed runs, once.
    let ident = opts.checkpoint.as_ref().map(|_| DataIdentity::of(data));
    if let Some((epochs_done, past)) = resume(g, cfg, opts, ident.as_ref(), &mut opt)? {
        start_epoch = epochs_done;
        history = past;
    }
    let steps_per_epoch = data.len().div_ceil(cfg.batch_size);
    let total = steps_per_epoch * cfg.epochs;
    let warmup = (cfg.warmup_epochs * steps_per_epoch as f64) as usize;
    let augment = Augment {
        crop_pad: cfg.crop_pad,
        hflip: cfg.hflip,
    };
    let ctx = Step {
        g,
        data,
        cfg,
        opts,
        params: &params,
        steps_per_epoch,
        total,
        warmup,
        augment,
        device_path,
    };
    let t0 = Instant::now();
    for (ran, epoch) in (start_epoch..cfg.epochs).enumerate() {
        if opts.stop_after.is_some_and(|s| ran >= s) {
            break;
        }
        let te = Instant::now();
        let order = data.shuffled(cfg.seed.wrapping_mul(1000).wrapping_add(epoch as u64));
        let mut rng = Pcg64::seed_from_u64(cfg.seed.wrapping_mul(7919).wrapping_add(epoch as u64));
        let pb = opts.progress.unwrap_or(&Silent);
        pb.start(
            &format!("epoch {}/{}", epoch + 1, cfg.epochs),
            steps_per_epoch as u64,
        );
        let (loss_sum, correct, seen, lr) = ctx.epoch(epoch, &order, &mut rng, &mut opt, pb, te)?;
        pb.finish();
        // A last step can overflow the weights while its loss was still finite.
        g.check_finite()
            .with_context(|| format!("after training epoch {} (lr {lr:.4})", epoch + 1))?;
        let train_secs = te.elapsed().as_secs_f64();
        let ev = match opts.test {
            Some(t) => Some(evaluate(g, t, 500)?),
            None => None,
        };
        let log = EpochLog {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / seen as f64,
            train_top1: correct as f64 / seen as f64,
            test_top1: ev.as_ref().map(|e| e.top1),
            test_top5: ev.as_ref().map(|e| e.top5),
            seconds: train_secs,
            samples_per_sec: seen as f64 / train_secs,
        };
        if let Some(p) = opts.progress {
            p.line(&epoch_line(&log, cfg.epochs));
        }
        history.push(log);
        if let Some(path) = &opts.checkpoint {
            let (st, steps) = opt.state()?;
            checkpoint::save(
                path,
                &Checkpoint {
                    graph: g.deep_clone()?,
                    optimizer: st,
                    optimizer_steps: steps,
                    epochs_done: epoch + 1,
                    config: cfg.clone(),
                    history: history.clone(),
                    data: ident.clone(),
                },
            )?;
        }
    }
    Ok(TrainResult {
        history,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Loads the checkpoint at `opts.checkpoint` into `g` and `opt` when one exists, after
/// checking that it was written with the same config and data; returns the epochs done
/// and their logs.
fn resume(
    g: &Graph,
    cfg: &TrainConfig,
    opts: &TrainOpts,
    ident: Option<&DataIdentity>,
    opt: &mut Optimizer,
) -> Result<Option<(usize, Vec<EpochLog>)>> {
    if let Some(path) = &opts.checkpoint {
        if path.exists() {
            let ck = checkpoint::load(path)?;
            if let Some((field, was, now)) = checkpoint::first_difference(&ck.config, cfg) {
                bail!(
                    "{}: checkpoint was written with a different training config: '{field}' was {was}, this run has {now}",
                    path.display()
                );
            }
            let here = ident.expect("computed for checkpointed runs");
            match &ck.data {
                Some(d) => {
                    if let Some((field, was, now)) = d.difference(here) {
                        bail!(
                            "{}: checkpoint was trained on other data: '{field}' was {was}, this run has {now} (same --data, --limit, --classes and files are needed to resume)",
                            path.display()
                        );
                    }
                }
                None => bail!(
                    "{}: checkpoint does not record its training data (written by an older lopper), so a resume cannot be checked; start a new checkpoint",
                    path.display()
                ),
            }
            for (k, t) in ck.graph.params() {
                g.set_param(k, t.as_tensor()).with_context(|| {
                    format!("{}: checkpoint does not fit the model", path.display())
                })?;
            }
            opt.load_state(&ck.optimizer, ck.optimizer_steps)?;
            return Ok(Some((ck.epochs_done, ck.history)));
        }
    }
    Ok(None)
}

/// On the device path, the loss and accuracy sums are read back every this many steps
/// (and at the end of an epoch): each read synchronises a GPU.
pub const SYNC_EVERY: usize = 25;

/// What one training step needs besides the batch: fixed for the whole run.
struct Step<'a> {
    g: &'a Graph,
    data: &'a Dataset,
    cfg: &'a TrainConfig,
    opts: &'a TrainOpts<'a>,
    params: &'a [(String, candle_core::Var)],
    steps_per_epoch: usize,
    total: usize,
    warmup: usize,
    augment: Augment,
    /// The GPU's path (see [`TrainOpts::device_path`]): decided once per run.
    device_path: bool,
}

impl Step<'_> {
    /// One epoch over `order`; returns (summed loss, top-1 correct, samples seen, last lr).
    fn epoch(
        &self,
        epoch: usize,
        order: &[usize],
        rng: &mut Pcg64,
        opt: &mut Optimizer,
        pb: &dyn crate::util::Progress,
        te: Instant,
    ) -> Result<(f64, usize, usize, f64)> {
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let mut lr = self.cfg.lr;
        let dev = self.g.device();
        // Device path: [Σ loss·n, Σ correct] on the device since the last read.
        let mut pending: Option<Tensor> = None;
        let steps = order.len().div_ceil(self.cfg.batch_size);
        for (bi, chunk) in order.chunks(self.cfg.batch_size).enumerate() {
            let step = epoch * self.steps_per_epoch + bi;
            lr = lr_at(
                self.cfg.lr,
                &self.cfg.schedule,
                step,
                self.total,
                self.warmup,
                self.steps_per_epoch,
            );
            let (x, y) = self.data.batch(chunk, self.augment.with_rng(rng), &dev)?;
            let x = fit_input(self.g, x)?;
            let fo = ForwardOpts {
                seed: self.cfg.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ..ForwardOpts::new(Mode::Train)
            };
            let logits = forward_with(self.g, &x, &fo)?.outputs.swap_remove(0);
            let mut loss = cross_entropy(&logits, &y, self.cfg.label_smoothing)?;
            if let Some(t) = &self.opts.teacher {
                // The teacher is fixed: no gradient flows into it.
                let tl = crate::exec::forward(t.graph, &x, Mode::Eval)?.detach();
                loss = ((loss * (1.0 - t.alpha))?
                    + (distillation(&logits, &tl, t.temperature)? * t.alpha)?)?;
            }
            if self.device_path {
                // Nothing leaves the device inside the step: the sums are read every
                // SYNC_EVERY steps (a NaN loss is caught there, a few steps late).
                let hits = logits
                    .detach()
                    .argmax(candle_core::D::Minus1)?
                    .eq(&y)?
                    .to_dtype(candle_core::DType::F32)?
                    .sum_all()?;
                let lsum = loss.detach().affine(chunk.len() as f64, 0.0)?;
                let both = Tensor::stack(&[lsum, hits], 0)?;
                pending = Some(match pending.take() {
                    Some(p) => (p + both)?,
                    None => both,
                });
                let grads = crate::exec::in_pool(|| loss.backward())?;
                opt.step(self.params, &grads, lr)?;
                seen += chunk.len();
                if (bi + 1) % SYNC_EVERY != 0 && bi + 1 != steps {
                    continue;
                }
                let read = crate::device::to_host(&pending.take().expect("sums pending"))?;
                if !read[0].is_finite() {
                    bail!("training loss became {} by epoch {} step {bi} (lr {lr:.4}); lower the learning rate", read[0], epoch + 1);
                }
                loss_sum += read[0] as f64;
                correct += read[1] as usize;
            } else {
                let lv = crate::device::scalar(&loss)? as f64;
                if !lv.is_finite() {
                    bail!("training loss became {lv} at epoch {} step {bi} (lr {lr:.4}); lower the learning rate", epoch + 1);
                }
                let grads = crate::exec::in_pool(|| loss.backward())?;
                opt.step(self.params, &grads, lr)?;
                crate::device::count_host_read();
                let c1 = topk_correct(&logits, &y)?.top1;
                loss_sum += lv * chunk.len() as f64;
                correct += c1;
                seen += chunk.len();
            }
            pb.step(
                bi as u64 + 1,
                &format!(
                    "loss {:.3} acc {:.2}% {:.0} img/s",
                    loss_sum / seen as f64,
                    100.0 * correct as f64 / seen as f64,
                    seen as f64 / te.elapsed().as_secs_f64()
                ),
            );
        }
        Ok((loss_sum, correct, seen, lr))
    }
}

/// The one-line summary of a finished epoch.
fn epoch_line(log: &EpochLog, epochs: usize) -> String {
    format!(
        "epoch {}/{}: loss {:.4} train {:.2}%{} lr {:.4} {:.1}s ({:.0} img/s)",
        log.epoch,
        epochs,
        log.train_loss,
        100.0 * log.train_top1,
        log.test_top1
            .map(|a| format!(" test {:.2}%", 100.0 * a))
            .unwrap_or_default(),
        log.lr,
        log.seconds,
        log.samples_per_sec
    )
}
