//! Where STAMP's channel gates sit, and how a gated network becomes a physically pruned
//! one (spec §3, §4.2 step 6, §4.3).
//!
//! A gate multiplies a channel after its batch norm and before the nonlinearity. A
//! dependency group is gateable when one batch norm produces all its channels — the group's
//! other nodes being that BN's conv and ops that map 0 to 0 (ReLU/ReLU6, pooling, flatten,
//! reshape, dropout, identity) — so a zero gate makes the channel exactly 0 everywhere
//! downstream and the engine can remove it. Residual streams (a sum of several BN outputs
//! and the shortcut) are not gateable: the reference design's internal-only pruning of
//! residual blocks. Eval-mode gate values fold into the batch norm (`γ·z`, `β·z`), so the
//! pruned network computes exactly what the gated network computes.

use crate::graph::ops::param;
use crate::graph::ops::{ActivationKind, Op};
use crate::graph::{param_key, Graph, NodeId};
use crate::prune::{remove_units, Groups, Removal};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// One gated group: its batch norm and, per BN channel, the group unit it belongs to.
#[derive(Clone, Debug)]
pub struct GateSite {
    pub group: usize,
    pub bn: NodeId,
    pub channels: usize,
    /// `unit[c]`: the group unit of BN channel `c`.
    pub unit: Vec<usize>,
}

fn zero_preserving(op: &Op) -> bool {
    match op {
        Op::Activation(a) => matches!(a.kind, ActivationKind::Relu | ActivationKind::Relu6),
        Op::MaxPool(_)
        | Op::AvgPool(_)
        | Op::GlobalAvgPool(_)
        | Op::Flatten(_)
        | Op::Reshape(_)
        | Op::Dropout(_)
        | Op::Identity(_) => true,
        _ => false,
    }
}

/// The gateable groups of `g`, in group order.
pub fn gate_sites(g: &Graph, groups: &Groups) -> Vec<GateSite> {
    let mut out = Vec::new();
    for (gi, grp) in groups.groups.iter().enumerate() {
        if grp.prunable_units().len() != grp.units.len() || grp.units.is_empty() {
            continue;
        }
        let bns: Vec<NodeId> = grp
            .nodes
            .iter()
            .copied()
            .filter(|&n| matches!(g.nodes[n].op, Op::BatchNorm(_)))
            .collect();
        let [bn] = bns[..] else { continue };
        let conv = g.nodes[bn].inputs[0];
        if !matches!(g.nodes[conv].op, Op::Conv2d(_)) {
            continue;
        }
        let ok = grp
            .nodes
            .iter()
            .all(|&n| n == bn || n == conv || zero_preserving(&g.nodes[n].op));
        if !ok {
            continue;
        }
        let channels = groups.channels[bn];
        let mut unit = vec![usize::MAX; channels];
        for (u, un) in grp.units.iter().enumerate() {
            for &(n, c) in &un.elems {
                if n == bn {
                    unit[c] = u;
                }
            }
        }
        if unit.contains(&usize::MAX) {
            continue;
        }
        out.push(GateSite {
            group: gi,
            bn,
            channels,
            unit,
        });
    }
    out
}

/// Forward masks applying gate values `z[site]` (`[C]` or `[B, C]` tensors, possibly
/// differentiable) after each site's batch norm: pass as `ForwardOpts::input_masks`.
pub fn gate_masks(g: &Graph, sites: &[GateSite], z: &[Tensor]) -> Result<HashMap<NodeId, Tensor>> {
    if z.len() != sites.len() {
        bail!("{} gate vectors for {} gated groups", z.len(), sites.len());
    }
    let consumers = g.consumers();
    let shapes = g.shapes()?;
    let mut out = HashMap::new();
    for (s, zs) in sites.iter().zip(z) {
        let rank = shapes[s.bn].len() + 1;
        let zb = match zs.rank() {
            1 => zs.unsqueeze(0)?,
            _ => zs.clone(),
        };
        let mut dims = zb.dims().to_vec();
        dims.extend(std::iter::repeat_n(1, rank - 2));
        let m = zb.reshape(dims)?;
        for &c in &consumers[s.bn] {
            out.insert(c, m.clone());
        }
    }
    Ok(out)
}

/// Folds eval-mode gate values into the batch norms and removes every channel whose gate
/// is 0: the physically pruned network.
pub fn fold_and_prune(
    g: &Graph,
    groups: &Groups,
    sites: &[GateSite],
    z: &[Vec<f32>],
) -> Result<Graph> {
    if z.len() != sites.len() {
        bail!("{} gate vectors for {} gated groups", z.len(), sites.len());
    }
    let folded = g.deep_clone()?;
    let mut units = Vec::new();
    for (s, zs) in sites.iter().zip(z) {
        if zs.len() != s.channels {
            bail!(
                "gate vector of '{}' has {} values for {} channels",
                g.nodes[s.bn].name,
                zs.len(),
                s.channels
            );
        }
        if zs.iter().all(|&v| v == 0.0) {
            bail!(
                "every gate of '{}' is closed; keep at least one channel",
                g.nodes[s.bn].name
            );
        }
        let name = &g.nodes[s.bn].name;
        for p in [param::WEIGHT, param::BIAS] {
            let k = param_key(name, p);
            let v: Vec<f32> = folded.params()[&k].as_tensor().to_vec1()?;
            let nv: Vec<f32> = v.iter().zip(zs).map(|(a, b)| a * b).collect();
            folded.set_param(&k, &Tensor::from_vec(nv, s.channels, &Device::Cpu)?)?;
        }
        for (c, &v) in zs.iter().enumerate() {
            if v == 0.0 {
                units.push((s.group, s.unit[c]));
            }
        }
    }
    let removal = Removal::from_units(&folded, groups, &units)?;
    remove_units(&folded, groups, &removal)
}
