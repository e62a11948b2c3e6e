//! Surgery: removing units of dependency groups returns a new, physically smaller graph
//! (conv/linear/BN widths, concat and padding offsets, every parameter and BN statistic
//! sliced). The input graph is never modified. The same structural rewrite, without
//! weights, predicts the pruned cost exactly.

use super::deps::Groups;
use crate::graph::cost::{cost_of_nodes, CostReport};
use crate::graph::ops::Op;
use crate::graph::{param_key, Graph, Node, NodeId};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Output channels to remove, per node.
#[derive(Clone, Debug, Default)]
pub struct Removal {
    pub removed: Vec<BTreeSet<usize>>,
}

impl Removal {
    /// The removal of the given `(group, unit)` pairs; blocked units are an error.
    pub fn from_units(g: &Graph, groups: &Groups, units: &[(usize, usize)]) -> Result<Removal> {
        let mut removed = vec![BTreeSet::new(); g.nodes.len()];
        for &(gi, u) in units {
            let grp = groups
                .groups
                .get(gi)
                .ok_or_else(|| anyhow::anyhow!("group {gi} does not exist"))?;
            let unit = grp
                .units
                .get(u)
                .ok_or_else(|| anyhow::anyhow!("group {gi} has no unit {u}"))?;
            if unit.blocked {
                let (n, c) = unit.elems[0];
                bail!("channel {c} of node '{}' cannot be pruned (it reaches a graph input/output or an opaque op)", g.nodes[n].name);
            }
            for &(n, c) in &unit.elems {
                removed[n].insert(c);
            }
        }
        for (n, r) in removed.iter().enumerate() {
            if !r.is_empty() && r.len() == groups.channels[n] {
                bail!(
                    "pruning would remove every channel of node '{}'",
                    g.nodes[n].name
                );
            }
        }
        Ok(Removal { removed })
    }

    fn keep(&self, channels: &[usize]) -> Vec<Vec<usize>> {
        channels
            .iter()
            .enumerate()
            .map(|(n, &c)| (0..c).filter(|i| !self.removed[n].contains(i)).collect())
            .collect()
    }
}

/// The rewritten nodes for kept channel lists `keep[node]` (of `channels[node]`).
fn shrink_nodes(g: &Graph, keep: &[Vec<usize>], channels: &[usize]) -> Vec<Node> {
    g.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut n = n.clone();
            let kin = n.inputs.first().map(|&j| keep[j].len());
            match &mut n.op {
                Op::Conv2d(c) => {
                    let depthwise = c.is_depthwise();
                    c.out_channels = keep[i].len();
                    c.in_channels = kin.unwrap_or(c.in_channels);
                    if depthwise {
                        c.groups = c.out_channels;
                    }
                }
                Op::ConvTranspose2d(c) => {
                    c.out_channels = keep[i].len();
                    c.in_channels = kin.unwrap_or(c.in_channels);
                }
                Op::Linear(l) => {
                    l.out_features = keep[i].len();
                    l.in_features = kin.unwrap_or(l.in_features);
                }
                Op::BatchNorm(b) => b.num_features = keep[i].len(),
                Op::ChannelAffine(a) => a.channels = keep[i].len(),
                Op::PRelu(p) => p.channels = keep[i].len(),
                Op::LayerNorm(l) => l.channels = keep[i].len(),
                Op::PosEmbed(p) => p.channels = keep[i].len(),
                Op::ClassToken(c) => c.channels = keep[i].len(),
                Op::Embedding(e) => e.dim = keep[i].len(),
                Op::TokenSelect(_) => {}
                // Whole heads are removed (one unit each): the head count follows.
                Op::MultiHeadAttention(a) => {
                    // Whole kv groups go: the query heads per kv head stay.
                    let r = a.heads / a.kv().max(1);
                    a.heads = keep[i].len() / a.head_dim.max(1);
                    if a.kv_heads != 0 {
                        a.kv_heads = a.heads / r.max(1);
                    }
                }
                Op::ChannelGather(gth) => {
                    // Kept outputs read kept inputs (same units); renumber both.
                    let kin = &keep[n.inputs[0]];
                    gth.indices = keep[i]
                        .iter()
                        .map(|&c| {
                            kin.binary_search(&gth.indices[c])
                                .expect("a kept gather output reads a kept input")
                        })
                        .collect();
                    gth.in_channels = kin.len();
                }
                Op::ChannelPad(p) => {
                    let (before, total_in) = (p.before, channels[n.inputs[0]]);
                    p.before = keep[i].iter().filter(|&&c| c < before).count();
                    p.after = keep[i].iter().filter(|&&c| c >= before + total_in).count();
                }
                // Shape follows the inputs; no attribute counts channels.
                Op::Input(_)
                | Op::Activation(_)
                | Op::MaxPool(_)
                | Op::AvgPool(_)
                | Op::GlobalAvgPool(_)
                | Op::Flatten(_)
                | Op::Add(_)
                | Op::Mul(_)
                | Op::Concat(_)
                | Op::Max(_)
                | Op::Min(_)
                | Op::Transpose(_)
                | Op::Dropout(_)
                | Op::Resize(_)
                | Op::SpatialPad(_)
                | Op::Identity(_) => {}
                // A reshape that couples channels keeps its leading axis in step with them
                // (a `-1` there is inferred anyway).
                Op::Reshape(r) => {
                    if r.shape.first().is_some_and(|&d| d > 0) {
                        r.shape[0] = keep[i].len() as i64;
                    }
                }
                // Its coupling blocks every group it touches: never resized.
                Op::Softmax(_) => {}
            }
            n
        })
        .collect()
}

/// Cost of the graph after a removal, without building it.
pub fn predict_cost(g: &Graph, groups: &Groups, removal: &Removal) -> Result<CostReport> {
    cost_of_nodes(&shrink_nodes(
        g,
        &removal.keep(&groups.channels),
        &groups.channels,
    ))
}

/// Removes the given units; returns a new graph (the input graph is untouched).
pub fn remove_units(g: &Graph, groups: &Groups, removal: &Removal) -> Result<Graph> {
    let keep = removal.keep(&groups.channels);
    let nodes = shrink_nodes(g, &keep, &groups.channels);
    let mut params: BTreeMap<String, Tensor> = BTreeMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for p in n.op.spec().params() {
            let key = param_key(&n.name, p.name);
            let mut t = g.params()[&key].as_tensor().clone();
            if let Some(ax) = p.out_axis {
                if keep[i].len() != groups.channels[i] {
                    t = t.index_select(&idx(&keep[i], t.device())?, ax)?;
                }
            }
            if let Some(ax) = p.in_axis {
                let src = n.inputs[0];
                if keep[src].len() != groups.channels[src] {
                    t = t.index_select(&idx(&keep[src], t.device())?, ax)?;
                }
            }
            params.insert(key, t.copy()?);
        }
    }
    Graph::with_parts(nodes, g.outputs.clone(), params)?.keeping(g)
}

fn idx(v: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        v.iter().map(|&x| x as u32).collect::<Vec<_>>(),
        v.len(),
        dev,
    )?)
}

/// Channel masks that make the dense graph compute what the pruned graph computes: for
/// every conv/linear whose input loses channels, a `[1, C, 1, 1]` (or `[1, F]`) 0/1 mask
/// of that input. Pass them as `ForwardOpts::input_masks`.
pub fn consumer_masks(
    g: &Graph,
    groups: &Groups,
    removal: &Removal,
) -> Result<HashMap<NodeId, Tensor>> {
    let shapes = g.shapes()?;
    let mut out = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if !matches!(n.op, Op::Conv2d(_) | Op::Linear(_)) {
            continue;
        }
        let src = n.inputs[0];
        if removal.removed[src].is_empty() {
            continue;
        }
        let c = groups.channels[src];
        let m: Vec<f32> = (0..c)
            .map(|k| {
                if removal.removed[src].contains(&k) {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let mut dims = vec![1, c];
        dims.extend(std::iter::repeat_n(1, shapes[src].len() - 1));
        out.insert(i, Tensor::from_vec(m, dims, &Device::Cpu)?);
    }
    Ok(out)
}
