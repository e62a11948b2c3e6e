//! Two-layer modules `Y = g(σ(L1(X)))` found in any graph from its dependency groups, and
//! the residual/importance oracle of one module on cached hidden activations.
//!
//! A group is a two-layer module when its channels are internal: every node carrying them
//! feeds only other nodes of the group, except one dense conv or linear (`g`), which reads
//! the hidden representation `H`. That covers MLP hidden layers, ResNet basic-block inner
//! channels, MobileNetV2 expanded channels and VGG conv pairs (through pooling), with no
//! name matching. A batch norm right after `g` is part of `g` (spec §4).

use super::importance::{self, ConvGeom};
use crate::exec::{apply_node, Mode};
use crate::graph::ops::param;
use crate::graph::ops::Op;
use crate::graph::{Graph, NodeId};
use crate::prune::Groups;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use std::collections::BTreeSet;

/// How the pruned output `ĝ_S` is formed (spec §3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BnMode {
    /// `ĝ_S = g(H ⊙ 1_S)` with the dense running statistics: the BN shift cancels.
    EvalConsistent,
    /// As the official code: the pruned branch's batch norm uses the chunk's batch
    /// statistics, and the pruned output is 0 (not BN(0)) while `S` is empty.
    CodeFaithful,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TwoLayerModule {
    pub group: usize,
    /// The node whose output is `H` (the input of `second`).
    pub hidden: NodeId,
    /// The conv/linear reading `H`.
    pub second: NodeId,
    /// Batch norm directly after `second`, folded into `g`.
    pub bn: Option<NodeId>,
    /// Conv/linear layers producing the hidden channels (for names in reports).
    pub first: Vec<NodeId>,
    /// Hidden width in units.
    pub units: usize,
}

impl TwoLayerModule {
    /// The report name: the first producing layer (e.g. `layer1.0.conv1`).
    pub fn name(&self, g: &Graph) -> String {
        let n = self.first.first().copied().unwrap_or(self.hidden);
        g.nodes[n].name.clone()
    }
}

/// Every two-layer module of `g`, in forward order of their second layer.
pub fn two_layer_modules(g: &Graph, groups: &Groups) -> Vec<TwoLayerModule> {
    let consumers = g.consumers();
    let mut out = Vec::new();
    for (gi, grp) in groups.groups.iter().enumerate() {
        if grp.units.is_empty() || grp.units.iter().any(|u| u.blocked) {
            continue;
        }
        let inside: BTreeSet<NodeId> = grp.nodes.iter().copied().collect();
        let mut sinks = BTreeSet::new();
        for &n in &grp.nodes {
            for &c in &consumers[n] {
                if !inside.contains(&c) {
                    sinks.insert((c, n));
                }
            }
        }
        let [(second, hidden)] = sinks.into_iter().collect::<Vec<_>>()[..] else {
            continue;
        };
        let dense = match &g.nodes[second].op {
            Op::Conv2d(c) => c.groups == 1,
            Op::Linear(_) => true,
            _ => false,
        };
        if !dense || g.nodes[second].inputs.first() != Some(&hidden) {
            continue;
        }
        let bn = match consumers[second][..] {
            [b] if matches!(g.nodes[b].op, Op::BatchNorm(_)) => Some(b),
            _ => None,
        };
        let first = grp
            .nodes
            .iter()
            .copied()
            .filter(|&n| matches!(g.nodes[n].op, Op::Conv2d(_) | Op::Linear(_)))
            .collect();
        out.push(TwoLayerModule {
            group: gi,
            hidden,
            second,
            bn,
            first,
            units: grp.units.len(),
        });
    }
    out.sort_by_key(|m| m.second);
    out
}

/// One module with its cached dense hidden activations and outputs: answers the
/// selection loop's `(z, ‖V‖²)` queries.
pub struct ModuleOracle<'a> {
    g: &'a Graph,
    m: &'a TwoLayerModule,
    mode: BnMode,
    /// `H` per chunk, `[b, ...hidden shape]`.
    hidden: Vec<Tensor>,
    /// Dense `g(H)` per chunk (eval mode).
    dense: Vec<Tensor>,
    /// Hidden-axis indices of each unit.
    unit_index: Vec<Vec<usize>>,
    /// Batch-norm scale `γ/√(σ²+ε)` of `g`'s output channels, if any.
    scale: Option<Tensor>,
}

impl<'a> ModuleOracle<'a> {
    pub fn new(
        g: &'a Graph,
        groups: &Groups,
        m: &'a TwoLayerModule,
        hidden: Vec<Tensor>,
        mode: BnMode,
    ) -> Result<Self> {
        let grp = &groups.groups[m.group];
        let unit_index = (0..grp.units.len())
            .map(|u| {
                grp.units[u]
                    .elems
                    .iter()
                    .filter(|(n, _)| *n == m.hidden)
                    .map(|&(_, i)| i)
                    .collect()
            })
            .collect();
        let dense = hidden
            .iter()
            .map(|h| g_apply(g, m, h, Mode::Eval))
            .collect::<Result<Vec<_>>>()?;
        let scale = match m.bn {
            Some(b) => {
                let Op::BatchNorm(bn) = &g.nodes[b].op else {
                    unreachable!("module bn is a batch norm")
                };
                let gamma = g.param(b, param::WEIGHT)?.as_tensor();
                let var = g.param(b, param::RUNNING_VAR)?.as_tensor();
                Some(gamma.broadcast_div(&(var + bn.eps)?.sqrt()?)?)
            }
            None => None,
        };
        Ok(ModuleOracle {
            g,
            m,
            mode,
            hidden,
            dense,
            unit_index,
            scale,
        })
    }

    /// Static score `a_u = Σ |H|` over the batch, positions and the unit's indices (equal to
    /// the spec's `Σ H` after ReLU-family activations).
    pub fn activation_sums(&self) -> Result<Vec<f64>> {
        let mut per = Vec::new();
        for h in &self.hidden {
            let c = h.dim(1)?;
            let v: Vec<f32> = h.abs()?.flatten_all()?.to_vec1()?;
            per.resize(c, 0f64);
            let inner = v.len() / (h.dim(0)? * c);
            for (i, x) in v.iter().enumerate() {
                per[(i / inner) % c] += *x as f64;
            }
        }
        Ok(self.per_unit(&per))
    }

    fn per_unit(&self, per_index: &[f64]) -> Vec<f64> {
        self.unit_index
            .iter()
            .map(|ix| ix.iter().map(|&i| per_index[i]).sum())
            .collect()
    }

    /// `(z per unit, ‖V‖²_F)` for active set `active` (unit indices).
    pub fn query(&self, active: &[usize]) -> Result<(Vec<f64>, f64)> {
        let h0 = &self.hidden[0];
        let c = h0.dim(1)?;
        let mut mask = vec![0f32; c];
        for &u in active {
            for &i in &self.unit_index[u] {
                mask[i] = 1.0;
            }
        }
        let mut mshape = vec![1usize; h0.rank()];
        mshape[1] = c;
        let mask = Tensor::from_vec(mask, mshape, h0.device())?;
        let mut z = vec![0f64; c];
        let mut residual = 0f64;
        for (h, y) in self.hidden.iter().zip(&self.dense) {
            let r = if active.is_empty() && self.mode == BnMode::CodeFaithful {
                y.clone()
            } else {
                let pruned_mode = match self.mode {
                    BnMode::EvalConsistent => Mode::Eval,
                    BnMode::CodeFaithful => Mode::Train,
                };
                (y - g_apply(self.g, self.m, &h.broadcast_mul(&mask)?, pruned_mode)?)?
            };
            residual += r
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            let r = match &self.scale {
                Some(s) => {
                    let mut sh = vec![1usize; r.rank()];
                    sh[1] = s.dim(0)?;
                    r.broadcast_mul(&s.reshape(sh)?)?
                }
                None => r,
            };
            let zc = importance_of(self.g, self.m.second, &r, h)?;
            z.iter_mut().zip(zc).for_each(|(a, b)| *a += b);
        }
        Ok((self.per_unit(&z), residual))
    }
}

/// `g(H)`: the second layer and its batch norm.
fn g_apply(g: &Graph, m: &TwoLayerModule, h: &Tensor, mode: Mode) -> Result<Tensor> {
    let y = apply_node(g, m.second, &[h], mode)?;
    match m.bn {
        Some(b) => apply_node(g, b, &[&y], mode),
        None => Ok(y),
    }
}

/// Closed-form `z` per hidden index for residual `r` (BN scale applied) at layer `second`.
pub fn importance_of(g: &Graph, second: NodeId, r: &Tensor, h: &Tensor) -> Result<Vec<f64>> {
    let w = g.param(second, param::WEIGHT)?.as_tensor();
    let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
    let rv: Vec<f32> = r.flatten_all()?.to_vec1()?;
    let batch = r.dim(0)?;
    Ok(match &g.nodes[second].op {
        Op::Linear(l) => {
            let r2 = r.flatten_from(1)?;
            if r2.dim(D::Minus1)? != l.out_features {
                bail!(
                    "residual width does not match layer '{}'",
                    g.nodes[second].name
                );
            }
            importance::linear(&rv, batch, &wv, l.out_features, l.in_features)
        }
        Op::Conv2d(c) => {
            let geo = ConvGeom {
                weight: [c.out_channels, c.in_channels, c.kernel[0], c.kernel[1]],
                input: [h.dim(2)?, h.dim(3)?],
                output: [r.dim(2)?, r.dim(3)?],
                stride: c.stride,
                padding: c.padding,
                dilation: c.dilation,
            };
            importance::conv(&rv, batch, &wv, &geo)
        }
        op => bail!(
            "node '{}' ({}) is not a conv or linear second layer",
            g.nodes[second].name,
            op.kind()
        ),
    })
}
