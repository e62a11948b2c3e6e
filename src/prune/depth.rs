//! Depth and resolution surgery: removing whole residual blocks, and changing the input
//! resolution of networks that end in global pooling.

use crate::graph::ops::param::WEIGHT;
use crate::graph::ops::{Input, Op, PosEmbed};
use crate::graph::{param_key, Graph, Node, NodeId, Shape};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, BTreeSet};

/// A residual block: `add = branch(skip) + skip`.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidualBlock {
    /// The Add node that merges branch and shortcut.
    pub add: NodeId,
    /// The block input the shortcut carries unchanged.
    pub skip: NodeId,
    /// Nodes computing the branch (between `skip` and `add`, exclusive).
    pub branch: Vec<NodeId>,
    /// Whether the block preserves shape (identity shortcut), so it can be removed.
    pub removable: bool,
}

/// Ancestors of `from` (inclusive) that are strict descendants of `stop`.
fn branch_between(g: &Graph, from: NodeId, stop: NodeId) -> Option<Vec<NodeId>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from];
    while let Some(n) = stack.pop() {
        if n == stop || !seen.insert(n) {
            continue;
        }
        if g.nodes[n].inputs.is_empty() {
            return None; // reached the graph input without meeting `stop`
        }
        stack.extend(&g.nodes[n].inputs);
    }
    Some(seen.into_iter().collect())
}

/// Every two-input Add whose one input is an ancestor of the other (a residual block).
pub fn residual_blocks(g: &Graph) -> Result<Vec<ResidualBlock>> {
    let shapes = g.shapes()?;
    let consumers = g.consumers();
    let mut out = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if !matches!(n.op, Op::Add(_)) || n.inputs.len() != 2 {
            continue;
        }
        for (a, b) in [(n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])] {
            // `b` is the skip if the branch ending at `a` starts from `b`.
            if let Some(branch) = branch_between(g, a, b) {
                // The branch must be private to this block.
                let private = branch
                    .iter()
                    .all(|&x| consumers[x].iter().all(|&c| c == i || branch.contains(&c)));
                let reaches_b = branch.iter().any(|&x| g.nodes[x].inputs.contains(&b));
                if private && reaches_b {
                    out.push(ResidualBlock {
                        add: i,
                        skip: b,
                        branch,
                        removable: shapes[b] == shapes[i],
                    });
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// Rebuilds `g` without the nodes in `drop`, with every read of a node in `rewire`
/// redirected to its target. Parameters of kept nodes are copied.
fn rebuild(g: &Graph, drop: &BTreeSet<NodeId>, rewire: &BTreeMap<NodeId, NodeId>) -> Result<Graph> {
    let mut new_id = vec![usize::MAX; g.nodes.len()];
    let mut nodes = Vec::new();
    let resolve = |mut x: NodeId| {
        while let Some(&t) = rewire.get(&x) {
            x = t;
        }
        x
    };
    let mut params = BTreeMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if drop.contains(&i) {
            continue;
        }
        let inputs = n
            .inputs
            .iter()
            .map(|&j| new_id[resolve(j)])
            .collect::<Vec<_>>();
        if inputs.contains(&usize::MAX) {
            bail!("node '{}' would read a removed node", n.name);
        }
        for p in n.op.spec().params() {
            let k = param_key(&n.name, p.name);
            params.insert(k.clone(), g.params()[&k].as_tensor().copy()?);
        }
        new_id[i] = nodes.len();
        nodes.push(Node {
            name: n.name.clone(),
            op: n.op.clone(),
            inputs,
            shares: n.shares.clone(),
        });
    }
    let outputs = g.outputs.iter().map(|&o| new_id[resolve(o)]).collect();
    Graph::with_parts(nodes, outputs, params)?.keeping(g)
}

/// Removes residual blocks (given by their Add node): the block's output becomes its
/// input. Only shape-preserving blocks can go; the input graph is untouched.
pub fn remove_blocks(g: &Graph, adds: &[NodeId]) -> Result<Graph> {
    let blocks = residual_blocks(g)?;
    let mut drop = BTreeSet::new();
    let mut rewire = BTreeMap::new();
    for &a in adds {
        let b = blocks.iter().find(|b| b.add == a).with_context(|| {
            format!(
                "node '{}' is not the Add of a residual block",
                g.nodes.get(a).map(|n| n.name.as_str()).unwrap_or("?")
            )
        })?;
        if !b.removable {
            bail!(
                "residual block at '{}' changes shape (downsampling); it cannot be removed",
                g.nodes[a].name
            );
        }
        drop.extend(&b.branch);
        drop.insert(a);
        rewire.insert(a, b.skip);
    }
    rebuild(g, &drop, &rewire)
}

/// The same network at input resolution `h x w` (weights unchanged). Fails, naming the
/// node, when a layer's shape depends on the resolution (e.g. flatten into a linear
/// layer without global pooling).
pub fn with_resolution(g: &Graph, h: usize, w: usize) -> Result<Graph> {
    let mut nodes = g.nodes.clone();
    let inp = g.input_id();
    let Op::Input(Input { shape }) = &g.nodes[inp].op else {
        unreachable!()
    };
    if shape.len() != 3 {
        bail!("resolution applies to image inputs (CxHxW), this model takes {shape:?}");
    }
    nodes[inp].op = Op::Input(Input {
        shape: vec![shape[0], h, w],
    });
    let mut params: BTreeMap<String, Tensor> = g
        .params()
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect::<Result<_>>()?;
    resample_position_embeddings(g, &mut nodes, &mut params)
        .with_context(|| format!("model does not run at {h}x{w}"))?;
    Graph::with_parts(nodes, g.outputs.clone(), params)
        .with_context(|| format!("model does not run at {h}x{w}"))?
        .keeping(g)
}

/// Position embeddings follow a new token count (ViT at another image size): each is
/// resampled from its old grid of positions to the new one (see [`PosEmbed::resample`]).
/// `nodes` carry the new input shape; shapes are inferred in order up to each embedding.
fn resample_position_embeddings(
    g: &Graph,
    nodes: &mut [Node],
    params: &mut BTreeMap<String, Tensor>,
) -> Result<()> {
    let old = g.shapes()?;
    let mut shapes: Vec<Shape> = Vec::with_capacity(nodes.len());
    for i in 0..nodes.len() {
        let ins: Vec<&Shape> = nodes[i].inputs.iter().map(|&j| &shapes[j]).collect();
        if let Op::PosEmbed(p) = &nodes[i].op {
            let (from, to) = (&old[i][1..], &ins[0][1..]);
            if from != to {
                let key = param_key(&nodes[g.param_owner(i)].name, WEIGHT);
                let w: Vec<f32> = params[&key].flatten_all()?.to_vec1()?;
                // After a class token, its embedding stays and the grid behind it resamples.
                let j = nodes[i].inputs[0];
                let v = if let (Op::ClassToken(_), Some(&k)) =
                    (&nodes[j].op, nodes[j].inputs.first())
                {
                    let (gf, gt) = (&old[k][1..], &shapes[k][1..]);
                    let t0 = gf.iter().product::<usize>() + 1;
                    let grid: Vec<f32> = (0..p.channels)
                        .flat_map(|c| w[c * t0 + 1..(c + 1) * t0].to_vec())
                        .collect();
                    let r = PosEmbed::resample(&grid, p.channels, gf, gt)
                        .with_context(|| format!("at node '{}'", nodes[i].name))?;
                    let t1 = gt.iter().product::<usize>();
                    (0..p.channels)
                        .flat_map(|c| {
                            std::iter::once(w[c * t0])
                                .chain(r[c * t1..(c + 1) * t1].iter().copied())
                        })
                        .collect()
                } else {
                    PosEmbed::resample(&w, p.channels, from, to)
                        .with_context(|| format!("at node '{}'", nodes[i].name))?
                };
                let tokens = to.iter().product();
                params.insert(
                    key,
                    Tensor::from_vec(v, (p.channels, tokens), &Device::Cpu)?,
                );
                nodes[i].op = Op::PosEmbed(PosEmbed {
                    channels: p.channels,
                    tokens,
                });
            }
        }
        let s = nodes[i]
            .op
            .spec()
            .infer_shape(&ins)
            .with_context(|| format!("shape inference failed at node '{}'", nodes[i].name))?;
        shapes.push(s);
    }
    Ok(())
}
