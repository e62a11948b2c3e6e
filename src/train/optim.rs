//! Optimizers over the graph's trainable parameters: SGD (momentum, Nesterov, weight
//! decay, PyTorch semantics) and AdamW (decoupled weight decay). Updates run on detached
//! tensors, so no step's autograd graph outlives the step; state is keyed by parameter
//! name for checkpoints.

use anyhow::{anyhow, bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd { momentum: f64, nesterov: bool },
    Adamw { beta1: f64, beta2: f64, eps: f64 },
}

pub struct Optimizer {
    pub kind: OptimizerKind,
    pub weight_decay: f64,
    /// Per parameter: SGD momentum buffer, or Adam (m, v).
    state: BTreeMap<String, Vec<Tensor>>,
    steps: usize,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f64) -> Self {
        Optimizer {
            kind,
            weight_decay,
            state: BTreeMap::new(),
            steps: 0,
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self, params: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        for (key, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            let w = var.as_tensor().detach();
            let new_w = match self.kind {
                OptimizerKind::Sgd { momentum, nesterov } => {
                    let g = if self.weight_decay != 0.0 {
                        (&g + (&w * self.weight_decay)?)?
                    } else {
                        g
                    };
                    let d = if momentum != 0.0 {
                        let buf = match self.state.get(key) {
                            Some(b) => ((&b[0] * momentum)? + &g)?,
                            None => g.clone(),
                        };
                        self.state.insert(key.clone(), vec![buf.clone()]);
                        if nesterov {
                            (&g + (&buf * momentum)?)?
                        } else {
                            buf
                        }
                    } else {
                        g
                    };
                    (&w - (d * lr)?)?
                }
                OptimizerKind::Adamw { beta1, beta2, eps } => {
                    let (m, v) = match self.state.get(key) {
                        Some(s) => (
                            ((&s[0] * beta1)? + (&g * (1.0 - beta1))?)?,
                            ((&s[1] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                        ),
                        None => ((&g * (1.0 - beta1))?, (g.sqr()? * (1.0 - beta2))?),
                    };
                    self.state.insert(key.clone(), vec![m.clone(), v.clone()]);
                    let t = self.steps as i32;
                    let mhat = (m / (1.0 - beta1.powi(t)))?;
                    let vhat = (v / (1.0 - beta2.powi(t)))?;
                    let upd = (mhat / (vhat.sqrt()? + eps)?)?;
                    ((&w * (1.0 - lr * self.weight_decay))? - (upd * lr)?)?
                }
            };
            var.set(&new_w)?;
        }
        Ok(())
    }

    /// State as named tensors (`{param}.{i}`) plus the step count.
    pub fn state(&self) -> (BTreeMap<String, Tensor>, usize) {
        let mut out = BTreeMap::new();
        for (k, v) in &self.state {
            for (i, t) in v.iter().enumerate() {
                out.insert(format!("{k}.{i}"), t.clone());
            }
        }
        (out, self.steps)
    }

    /// Restores state written by [`Optimizer::state`].
    pub fn load_state(&mut self, st: &BTreeMap<String, Tensor>, steps: usize) -> Result<()> {
        self.state.clear();
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
            let e = self.state.entry(param.to_string()).or_default();
            if e.len() <= i {
                e.resize(i + 1, t.clone());
            }
            e[i] = t.clone();
        }
        self.steps = steps;
        Ok(())
    }
}
