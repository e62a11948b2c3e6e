//! Optimizers over the graph's trainable parameters: SGD (momentum, Nesterov, weight
//! decay, PyTorch semantics) and AdamW (decoupled weight decay).
//!
//! Updates are plain loops over host vectors, one pass per parameter: no autograd graph
//! can outlive a step, and a step costs no tensor-op dispatch (hundreds of small candle
//! ops per step measurably cost more than the arithmetic). State is keyed by parameter
//! name for checkpoints.

use anyhow::{anyhow, bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Elements per parallel work item of an update.
const CHUNK: usize = 1 << 15;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd { momentum: f64, nesterov: bool },
    Adamw { beta1: f64, beta2: f64, eps: f64 },
}

pub struct Optimizer {
    pub kind: OptimizerKind,
    pub weight_decay: f64,
    /// Per parameter: SGD momentum buffer, or Adam (m, v); each with the param's shape.
    state: BTreeMap<String, (Vec<usize>, Vec<Vec<f32>>)>,
    /// The same state for parameters updated with tensor ops (on their own device).
    dstate: BTreeMap<String, Vec<Tensor>>,
    /// Update with tensor ops even on the CPU (the path a GPU takes, tested here).
    tensor_ops: bool,
    steps: usize,
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f64) -> Self {
        Optimizer {
            kind,
            weight_decay,
            state: BTreeMap::new(),
            dstate: BTreeMap::new(),
            tensor_ops: false,
            steps: 0,
        }
    }

    /// Updates with tensor ops on the parameters' device even when it is the CPU: the
    /// GPU path (which never copies to the host), run where it can be tested.
    pub fn with_tensor_ops(mut self, on: bool) -> Self {
        self.tensor_ops = on;
        self
    }

    /// One parameter's update as tensor ops on its device (same formulas as the host
    /// loops): no value leaves the device, so a GPU step never synchronises here.
    fn step_on_device(&mut self, key: &str, var: &Var, g: &Tensor, lr: f64) -> Result<()> {
        let wd = self.weight_decay;
        let w = var.as_tensor().detach();
        let g = g.detach();
        if !self.dstate.contains_key(key) {
            // Resumed state (host vectors from a checkpoint) moves to the device once.
            if let Some((dims, bufs)) = self.state.remove(key) {
                let ts = bufs
                    .into_iter()
                    .map(|b| Tensor::from_vec(b, dims.as_slice(), w.device()))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                self.dstate.insert(key.to_string(), ts);
            }
        }
        let new_w = match self.kind {
            OptimizerKind::Sgd { momentum, nesterov } => {
                let gi = if wd != 0.0 {
                    (&g + w.affine(wd, 0.0)?)?
                } else {
                    g
                };
                let d = if momentum != 0.0 {
                    let buf = match self.dstate.get(key) {
                        Some(b) => (b[0].affine(momentum, 0.0)? + &gi)?,
                        None => gi.clone(),
                    };
                    self.dstate.insert(key.to_string(), vec![buf.clone()]);
                    if nesterov {
                        (gi + buf.affine(momentum, 0.0)?)?
                    } else {
                        buf
                    }
                } else {
                    // An unused buffer, kept as the host path keeps it, so checkpoints
                    // carry the same state whichever path wrote them.
                    if !self.dstate.contains_key(key) {
                        self.dstate.insert(key.to_string(), vec![gi.zeros_like()?]);
                    }
                    gi
                };
                (w - d.affine(lr, 0.0)?)?
            }
            OptimizerKind::Adamw { beta1, beta2, eps } => {
                let t = self.steps as i32;
                let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
                let (m, v) = match self.dstate.get(key) {
                    Some(s) => (s[0].clone(), s[1].clone()),
                    None => (g.zeros_like()?, g.zeros_like()?),
                };
                let m = (m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
                let v = (v.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
                let upd = (m.affine(1.0 / c1, 0.0)? / (v.affine(1.0 / c2, 0.0)?.sqrt()? + eps)?)?;
                self.dstate.insert(key.to_string(), vec![m, v]);
                (w.affine(1.0 - lr * wd, 0.0)? - upd.affine(lr, 0.0)?)?
            }
        };
        var.set(&new_w)?;
        Ok(())
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self, params: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let (lr, wd) = (lr as f32, self.weight_decay as f32);
        for (key, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            if self.tensor_ops || !var.device().is_cpu() {
                self.step_on_device(key, var, g, lr as f64)?;
                continue;
            }
            let g = host(g)?;
            let mut w = host(var.as_tensor())?;
            match self.kind {
                OptimizerKind::Sgd { momentum, nesterov } => {
                    let mu = momentum as f32;
                    let fresh = !self.state.contains_key(key);
                    let st = self
                        .state
                        .entry(key.clone())
                        .or_insert_with(|| (var.dims().to_vec(), vec![vec![0.0; w.len()]]));
                    let buf = &mut st.1[0];
                    w.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(buf.par_chunks_mut(CHUNK))
                        .for_each(|((w, g), buf)| {
                            for i in 0..w.len() {
                                let gi = g[i] + wd * w[i];
                                let d = if mu != 0.0 {
                                    buf[i] = if fresh { gi } else { mu * buf[i] + gi };
                                    if nesterov {
                                        gi + mu * buf[i]
                                    } else {
                                        buf[i]
                                    }
                                } else {
                                    gi
                                };
                                w[i] -= lr * d;
                            }
                        });
                }
                OptimizerKind::Adamw { beta1, beta2, eps } => {
                    let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
                    let st = self.state.entry(key.clone()).or_insert_with(|| {
                        (
                            var.dims().to_vec(),
                            vec![vec![0.0; w.len()], vec![0.0; w.len()]],
                        )
                    });
                    let t = self.steps as i32;
                    let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                    let (m, v) = st.1.split_at_mut(1);
                    let (m, v) = (&mut m[0], &mut v[0]);
                    w.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                        .for_each(|((w, g), (m, v))| {
                            for i in 0..w.len() {
                                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                                let upd = (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                                w[i] = w[i] * (1.0 - lr * wd) - lr * upd;
                            }
                        });
                }
            }
            var.set(&Tensor::from_vec(w, var.dims(), var.device())?)?;
        }
        Ok(())
    }

    /// State as named tensors (`{param}.{i}`) plus the step count.
    pub fn state(&self) -> Result<(BTreeMap<String, Tensor>, usize)> {
        let mut out = BTreeMap::new();
        for (k, bufs) in &self.dstate {
            for (i, b) in bufs.iter().enumerate() {
                let t = b.to_device(&Device::Cpu)?;
                out.insert(format!("{k}.{i}"), t);
            }
        }
        for (k, (dims, bufs)) in &self.state {
            for (i, b) in bufs.iter().enumerate() {
                let t = Tensor::from_vec(b.clone(), dims.as_slice(), &Device::Cpu)?;
                out.insert(format!("{k}.{i}"), t);
            }
        }
        Ok((out, self.steps))
    }

    /// Restores state written by [`Optimizer::state`].
    pub fn load_state(&mut self, st: &BTreeMap<String, Tensor>, steps: usize) -> Result<()> {
        self.state.clear();
        self.dstate.clear();
        let per = match self.kind {
            OptimizerKind::Sgd { .. } => 1,
            OptimizerKind::Adamw { .. } => 2,
        };
        for (k, t) in st {
            let (param, idx) = k
                .rsplit_once('.')
                .ok_or_else(|| anyhow!("bad optimizer state key '{k}'"))?;
            let i: usize = idx
                .parse()
                .map_err(|_| anyhow!("bad optimizer state key '{k}'"))?;
            if i >= per {
                bail!("optimizer state '{k}' does not fit this optimizer");
            }
            let e = self
                .state
                .entry(param.to_string())
                .or_insert_with(|| (t.dims().to_vec(), vec![Vec::new(); per]));
            e.1[i] = host(t)?;
        }
        if self
            .state
            .values()
            .any(|(_, b)| b.iter().any(|v| v.is_empty()))
        {
            bail!("optimizer state is incomplete");
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two SGD steps against PyTorch's formulas by hand.
    #[test]
    fn sgd_nesterov_matches_pytorch_semantics() {
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = Optimizer::new(
            OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            0.1,
        );
        let params = vec![("w".to_string(), w.clone())];
        let (lr, mu, wd) = (0.5f32, 0.9f32, 0.1f32);
        let mut wr = [1.0f32, -2.0];
        let mut buf = [0f32; 2];
        for step in 0..2 {
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&params, &grads, lr as f64).unwrap();
            for i in 0..2 {
                let g = wr[i] + wd * wr[i];
                buf[i] = if step == 0 { g } else { mu * buf[i] + g };
                wr[i] -= lr * (g + mu * buf[i]);
            }
        }
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        for i in 0..2 {
            assert!((got[i] - wr[i]).abs() < 1e-6, "{got:?} {wr:?}");
        }
    }

    /// The tensor-op update (the GPU path) against the host loops, step by step, for
    /// every optimizer form, on gradients of mixed magnitudes.
    #[test]
    fn tensor_op_updates_match_the_host_loops() {
        let kinds = [
            OptimizerKind::Sgd {
                momentum: 0.0,
                nesterov: false,
            },
            OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            OptimizerKind::Adamw {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        ];
        let init: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.1)
            .collect();
        for kind in kinds {
            let run = |tensor_ops: bool| {
                let w =
                    Var::from_tensor(&Tensor::new(init.as_slice(), &Device::Cpu).unwrap()).unwrap();
                let mut opt = Optimizer::new(kind.clone(), 0.05).with_tensor_ops(tensor_ops);
                let params = vec![("w".to_string(), w.clone())];
                for step in 0..5 {
                    // Gradient of Σ c_i w_i³ / 3 with c spanning 1e-6 .. 1.
                    let c: Vec<f32> = (0..64)
                        .map(|i: i32| 10f32.powi(-((i + step) % 7)))
                        .collect();
                    let c = Tensor::new(c.as_slice(), &Device::Cpu).unwrap();
                    let loss = (w.as_tensor().powf(3.0).unwrap() * c)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .affine(1.0 / 3.0, 0.0)
                        .unwrap();
                    let grads = loss.backward().unwrap();
                    opt.step(&params, &grads, 0.01).unwrap();
                }
                let (st, _) = opt.state().unwrap();
                (w.as_tensor().to_vec1::<f32>().unwrap(), st)
            };
            let ((wh, sh), (wd, sd)) = (run(false), run(true));
            for (a, b) in wh.iter().zip(&wd) {
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
                    "{kind:?}: {a} vs {b}"
                );
            }
            assert_eq!(sh.keys().collect::<Vec<_>>(), sd.keys().collect::<Vec<_>>());
        }
    }
}
