//! The execution plan: everything about a forward that depends on the graph, the mode and
//! the options but not on the input values — fusion, when each intermediate can be
//! released, the batch-norm folds (with the folded weights), and the compressed weights of
//! the sparse layers — computed once, then run on any number of batches.
//!
//! An eval-mode plan snapshots the weights it folds and compresses: build it after the
//! weights are final (evaluation loops, benchmarks, deployment) and rebuild it after
//! changing them. A training-mode plan holds structure only and stays valid while
//! training.

use super::fusion::{plan as plan_fusion, Epi, Fusion};
use super::node::{self, Ctx, Folded, LinearPack};
use super::sparse_pack::SparsePack;
use super::{ForwardOut, Mode, WeightMask};
use crate::graph::fold::{conv_bn_affine, scale_rows};
use crate::graph::ops::param::{BIAS, WEIGHT};
use crate::graph::ops::Op;
use crate::graph::{Graph, NodeId, Shape};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// What a plan is built for (everything structural about a pass).
#[derive(Clone, Debug, Default)]
pub struct PlanOpts {
    /// Nodes whose outputs are returned in [`ForwardOut::kept`] (never fused away).
    pub keep: Vec<NodeId>,
    /// Nodes whose first input is multiplied by a mask at run time (they take no part
    /// in fusion: their masked input must be used).
    pub masked_inputs: Vec<NodeId>,
    /// Gradients will be taken through this pass: no inference-only rewrites.
    pub grad: bool,
    /// Run layers that are sparse enough on the CSR kernels (eval, no gradients). `None`
    /// follows the graph's preference ([`Graph::sparse_kernels`]).
    pub sparse: Option<bool>,
}

/// Run-time inputs of a pass besides the data.
#[derive(Clone, Copy, Debug, Default)]
pub struct Feeds<'a> {
    /// Seed of the dropout masks of this pass.
    pub seed: u64,
    /// Whether training mode updates the batch-norm running statistics.
    pub frozen_stats: bool,
    /// Multiplies a node's first input by this (broadcast) mask before the node runs.
    pub input_masks: Option<&'a HashMap<NodeId, Tensor>>,
    /// Element masks on conv/linear weights: the node runs with `m ⊙ w`.
    pub weight_masks: Option<&'a HashMap<NodeId, WeightMask>>,
    /// Overrides every batch norm's running-average momentum in this pass.
    pub bn_momentum: Option<f64>,
}

/// A forward, planned once.
#[derive(Debug)]
pub struct Plan {
    mode: Mode,
    /// The graph's Input nodes, in order, with their per-sample shapes.
    inputs: Vec<(NodeId, Shape)>,
    outputs: Vec<NodeId>,
    keep: Vec<NodeId>,
    masked_inputs: Vec<NodeId>,
    fusion: Fusion,
    /// `release[i]`: the values that are dead once node `i` ran (eval mode).
    release: Vec<Vec<NodeId>>,
    folded: HashMap<NodeId, Folded>,
    /// Inference: each dense linear layer's weight, packed once (see [`LinearPack`]).
    linear: HashMap<NodeId, LinearPack>,
    pub(super) sparse: SparsePack,
    /// No gradient is taken through this pass: each value is detached from candle's op
    /// graph as it is made. (The weights are variables, so every output would otherwise
    /// record its inputs, and each intermediate would stay alive through its consumer's
    /// record until the end of the pass, whatever the release lists say.)
    detach: bool,
    /// Each resize's interpolation matrices `(A_h, A_wᵀ)` for the planned input shape.
    resize: HashMap<NodeId, (Tensor, Tensor)>,
    /// Inference: passes on the pool or on the calling thread alone, by measurement.
    threads: super::threads::Threads,
    /// Inference: the nodes on large maps, run a few images at a time on large batches.
    prefix: Option<super::chunks::Prefix>,
    /// A pair starts inside the chunked prefix: a pass whose pairs fuse runs unchunked
    /// ([`super::pw_dw::Pairs::start_before`]; decided once here, not per pass).
    prefix_paired: bool,
    /// Inference: 1×1 expansions run with the depthwise conv that reads them.
    pub(super) pairs: super::pw_dw::Pairs,
}

impl Plan {
    /// Plans a forward of `g` in `mode`.
    pub fn new(g: &Graph, mode: Mode, o: &PlanOpts) -> Result<Plan> {
        let consumers = g.consumers();
        let mut pinned = o.keep.clone();
        pinned.extend(&o.masked_inputs);
        let rewrites = mode.inference_rewrites(o.grad);
        let shapes = g.shapes()?;
        let fusion = plan_fusion(g, &pinned, &consumers, &shapes, rewrites);
        let resize = node::resize_matrices(g, &shapes)?;
        let mut sparse = if rewrites && o.sparse.unwrap_or(g.sparse_kernels()) {
            SparsePack::build(g)?
        } else {
            SparsePack::default()
        };
        let mut folded = HashMap::new();
        for (i, e) in fusion.epilogue.iter().enumerate() {
            let Some(e) = e else { continue };
            if !matches!(g.nodes[i].op, Op::Conv2d(_)) {
                continue;
            }
            folded.insert(i, fold(g, i, e.bn, sparse.get(i).is_some())?);
        }
        // A sparse conv's batch-norm scale goes into its values once (the dense path,
        // taken with weight masks, still scales its weights from `Folded::scale`).
        for (i, f) in &folded {
            if let (Some(sw), Some(scale)) = (sparse.layers.get_mut(i), &f.scale) {
                sw.fold_scale(scale);
            }
        }
        let linear = if rewrites {
            (0..g.nodes.len())
                .filter(|&i| matches!(g.nodes[i].op, Op::Linear(_)) && sparse.get(i).is_none())
                .map(|i| (i, LinearPack::default()))
                .collect()
        } else {
            HashMap::new()
        };
        let release = if mode.releases_intermediates() {
            release_points(g, &consumers, &fusion, &o.keep)
        } else {
            vec![Vec::new(); g.nodes.len()]
        };
        let prefix = (mode == Mode::Eval && rewrites && pinned.is_empty())
            .then(|| super::chunks::prefix(g, &shapes, &consumers))
            .flatten();
        let pairs = if mode == Mode::Eval && rewrites {
            super::pw_dw::Pairs::plan(g, &fusion, &folded, &consumers, &pinned, |i| {
                sparse.get(i).is_some() && !super::pw_dw::sparse_pairs(&shapes[i])
            })
        } else {
            super::pw_dw::Pairs::default()
        };
        Ok(Plan {
            prefix_paired: prefix.is_some_and(|p| pairs.start_before(p.cut)),
            prefix,
            pairs,
            mode,
            inputs: g
                .input_ids()
                .into_iter()
                .map(|i| (i, shapes[i].clone()))
                .collect(),
            outputs: g.outputs.clone(),
            keep: o.keep.clone(),
            masked_inputs: o.masked_inputs.clone(),
            fusion,
            release,
            detach: rewrites,
            folded,
            linear,
            sparse,
            resize,
            threads: if mode == Mode::Eval {
                super::threads::Threads::on()
            } else {
                super::threads::Threads::default()
            },
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How many layers run on the sparse kernels.
    pub fn sparse_layers(&self) -> usize {
        self.sparse.len()
    }

    /// Runs the plan on `x: [N, ...input shape]` (one tensor per graph input for graphs with
    /// several, [`super::Inputs`]); `g` must be the graph it was built for.
    pub fn run(
        &self,
        g: &Graph,
        x: &(impl super::AsInputs + ?Sized),
        f: &Feeds,
    ) -> Result<ForwardOut> {
        self.run_inputs(g, &x.tensors(), f)
    }

    /// Runs the plan on one tensor per graph input, in the order of the Input nodes.
    pub fn run_inputs(&self, g: &Graph, xs: &[&Tensor], f: &Feeds) -> Result<ForwardOut> {
        let chunk = match (self.prefix, xs.first()) {
            (Some(p), Some(x)) => super::chunks::images(x.dim(0)?, &p),
            _ => None,
        };
        self.run_chunked(g, xs, f, chunk)
    }

    /// [`Plan::run_inputs`] with the chunked prefix (if the plan has one) run `chunk`
    /// images at a time, or the whole pass on the whole batch (`None`).
    pub(crate) fn run_chunked(
        &self,
        g: &Graph,
        xs: &[&Tensor],
        f: &Feeds,
        chunk: Option<usize>,
    ) -> Result<ForwardOut> {
        super::in_pool(|| {
            // An inference pass is many short layers back to back: its kernels' loops go
            // to the spinning pool (`kernels::par`); training keeps rayon throughout.
            if self.mode == super::Mode::Eval {
                crate::kernels::par::engaged(|| {
                    self.threads.run(|| self.run_in_pool(g, xs, f, chunk))
                })
            } else {
                self.run_in_pool(g, xs, f, chunk)
            }
        })
    }

    /// The node the chunked prefix ends before, if the plan has one.
    #[cfg(test)]
    pub(crate) fn chunked_prefix(&self) -> Option<usize> {
        self.prefix.map(|p| p.cut)
    }

    fn run_in_pool(
        &self,
        g: &Graph,
        xs: &[&Tensor],
        f: &Feeds,
        chunk: Option<usize>,
    ) -> Result<ForwardOut> {
        self.check(g, xs, f)?;
        let ctx = Ctx {
            mode: self.mode,
            seed: f.seed,
            update_stats: !f.frozen_stats,
            bn_momentum: f.bn_momentum,
            weight_masks: f.weight_masks,
            no_grad: self.detach,
        };
        // Weight masks change the weights the kernels see: the compressed copies do not
        // apply then.
        let sparse = f.weight_masks.is_none().then_some(&self.sparse);
        let mut vals: Vec<Option<Tensor>> = vec![None; g.nodes.len()];
        // Inputs go to the device of the parameters (a no-op on the CPU): callers batch
        // on the host, and one copy per input per pass is the only transfer a forward makes.
        let dev = g.device();
        let batch = xs[0].dim(0)?;
        // Fused pairs take the place of a chunked prefix they start in (`Pairs::start_before`).
        let fuse = self.pairs_fuse(g, batch, f);
        let chunked = self
            .prefix
            .filter(|_| f.input_masks.is_none() && dev.is_cpu() && !(fuse && self.prefix_paired))
            .and_then(|p| Some((p, chunk.filter(|&k| k > 0)?)));
        let start =
            match chunked {
                Some((p, k)) => {
                    // The prefix a chunk at a time; its one live value concatenated.
                    let mut parts = Vec::with_capacity(batch.div_ceil(k));
                    for s in (0..batch).step_by(k) {
                        let len = k.min(batch - s);
                        let mut cv: Vec<Option<Tensor>> = vec![None; g.nodes.len()];
                        for (&(id, _), &x) in self.inputs.iter().zip(xs) {
                            cv[id] = Some(x.narrow(0, s, len)?.contiguous()?);
                        }
                        let x0 = cv[self.inputs[0].0].clone().expect("input set");
                        self.run_nodes(g, 0..p.cut, &mut cv, &x0, f, &ctx, sparse, false)?;
                        parts.push(cv[p.live].take().ok_or_else(|| {
                            anyhow!("internal: chunked value #{} missing", p.live)
                        })?);
                    }
                    vals[p.live] = Some(Tensor::cat(&parts, 0)?);
                    p.cut
                }
                None => {
                    for (&(id, _), &x) in self.inputs.iter().zip(xs) {
                        vals[id] = Some(x.to_device(&dev)?);
                    }
                    0
                }
            };
        self.run_nodes(
            g,
            start..g.nodes.len(),
            &mut vals,
            xs[0],
            f,
            &ctx,
            sparse,
            fuse,
        )?;
        let outputs = self
            .outputs
            .iter()
            .map(|&o| {
                vals[o]
                    .clone()
                    .ok_or_else(|| anyhow!("output #{o} missing"))
            })
            .collect::<Result<_>>()?;
        let kept = self
            .keep
            .iter()
            .filter_map(|&k| vals[k].clone().map(|v| (k, v)))
            .collect();
        Ok(ForwardOut { outputs, kept })
    }

    /// Whether a pass of `n` images runs its pairs fused: only on the CPU kernels and
    /// unmasked weights (the expansion's step defers to the depthwise conv's, which
    /// releases what the expansion would), at a batch that fuses.
    fn pairs_fuse(&self, g: &Graph, n: usize, f: &Feeds) -> bool {
        !self.pairs.by_dw.is_empty()
            && f.weight_masks.is_none()
            && f.input_masks.is_none()
            && g.device().is_cpu()
            && !crate::kernels::reference_ops()
            && super::pw_dw::batch_fuses(n)
    }

    /// Runs nodes `range` on the values in `vals` (inputs and every earlier value still
    /// read set), releasing each value after its last reader; pairs fused if `fuse`
    /// ([`Plan::pairs_fuse`]; never inside a chunked prefix).
    #[allow(clippy::too_many_arguments)]
    fn run_nodes(
        &self,
        g: &Graph,
        range: std::ops::Range<usize>,
        vals: &mut [Option<Tensor>],
        x: &Tensor,
        f: &Feeds,
        ctx: &Ctx,
        sparse: Option<&SparsePack>,
        fuse: bool,
    ) -> Result<()> {
        let mut deferred = None;
        for i in range {
            let n = &g.nodes[i];
            if vals[i].is_some() {
                continue; // an input
            }
            if let Some(src) = self.fusion.alias[i] {
                // Fused into its producer, whose value already is this node's output.
                vals[i] = vals[src].take();
                continue;
            }
            if fuse && self.pairs.deferred(i) {
                // The expansion (and, with a projection, the depthwise conv after it).
                deferred = deferred.or(Some(i));
                continue;
            }
            let t = super::profile::enabled().then(std::time::Instant::now);
            let pair = self.pairs.get(i).filter(|p| deferred == Some(p.pw));
            let y = match pair {
                Some(p) => {
                    let xa = g.nodes[p.pw]
                        .inputs
                        .first()
                        .and_then(|&j| vals[j].as_ref())
                        .ok_or_else(|| anyhow!("input of node #{} missing", p.pw))?;
                    let res = match self.fusion.epilogue[i].and_then(|e| e.add) {
                        Some((_, other)) if p.proj == Some(i) => Some(
                            vals[other]
                                .as_ref()
                                .ok_or_else(|| anyhow!("value of node #{other} missing"))?,
                        ),
                        _ => None,
                    };
                    super::pw_dw::run(g, p, &self.folded, &self.fusion, sparse, xa, res)
                }
                None => self.run_node(g, i, vals, x, f, ctx, sparse),
            }
            .with_context(|| format!("forward failed at node '{}' ({})", n.name, n.op.kind()))?;
            if let Some(t) = t {
                let sp = sparse.and_then(|p| p.get(i)).is_some();
                // A fused step is shown as one, with the expansion's input.
                let first = pair.map_or(i, |p| p.pw);
                let dims = super::profile::by_shape()
                    .then(|| {
                        g.nodes[first]
                            .inputs
                            .first()
                            .and_then(|&j| vals[j].as_ref())
                    })
                    .flatten()
                    .map(|v| v.dims().to_vec());
                let mut cat = super::profile::category(g, i, sp, dims.as_deref());
                if let Some(p) = pair {
                    let dw = super::profile::category(g, p.dw, false, dims.as_deref());
                    let proj = if p.proj.is_some() { " + conv 1x1" } else { "" };
                    cat = format!("conv 1x1 + {dw}{proj}");
                }
                super::profile::record(cat, t.elapsed());
            }
            vals[i] = Some(if self.detach { y.detach() } else { y });
            if let Some(p) = pair {
                let dw = p.proj.map(|_| p.dw);
                for &j in self.release[p.pw]
                    .iter()
                    .chain(dw.iter().flat_map(|&d| &self.release[d]))
                {
                    vals[j] = None;
                }
                deferred = None;
            }
            for &j in &self.release[i] {
                vals[j] = None;
            }
        }
        Ok(())
    }

    /// The inputs fit and the feeds match what the plan was built for.
    fn check(&self, g: &Graph, xs: &[&Tensor], f: &Feeds) -> Result<()> {
        if g.nodes.len() != self.release.len() || g.outputs != self.outputs {
            bail!("internal: plan run on a graph it was not built for");
        }
        if xs.len() != self.inputs.len() {
            let names: Vec<&str> = self
                .inputs
                .iter()
                .map(|&(i, _)| g.nodes[i].name.as_str())
                .collect();
            bail!(
                "the model has {} inputs ({}); {} given",
                self.inputs.len(),
                names.join(", "),
                xs.len()
            );
        }
        let batch = xs[0].dims().first().copied();
        for (&(id, ref want), x) in self.inputs.iter().zip(xs) {
            if x.rank() != want.len() + 1 || &x.dims()[1..] != want.as_slice() {
                let dims: Vec<String> = want.iter().map(|d| d.to_string()).collect();
                bail!(
                    "input '{}' has shape {:?}, the model expects [N, {}]",
                    g.nodes[id].name,
                    x.dims(),
                    dims.join(", ")
                );
            }
            if x.dims().first().copied() != batch {
                bail!(
                    "input '{}' has batch {}, the first input {}",
                    g.nodes[id].name,
                    x.dims()[0],
                    batch.unwrap_or(0)
                );
            }
        }
        if let Some(m) = f.input_masks {
            if let Some(k) = m.keys().find(|k| !self.masked_inputs.contains(k)) {
                bail!("internal: input mask on node #{k}, which the plan did not pin");
            }
        }
        Ok(())
    }

    /// One scheduled node: a folded conv (with its batch norm, ReLU and residual add), or
    /// the node's own kernel (with a fused ReLU where planned).
    #[allow(clippy::too_many_arguments)]
    fn run_node(
        &self,
        g: &Graph,
        i: NodeId,
        vals: &[Option<Tensor>],
        x: &Tensor,
        f: &Feeds,
        ctx: &Ctx,
        sparse: Option<&SparsePack>,
    ) -> Result<Tensor> {
        let value = |j: NodeId| {
            vals[j]
                .as_ref()
                .ok_or_else(|| anyhow!("value of node #{j} missing"))
        };
        let mut ins: Vec<&Tensor> = g.nodes[i]
            .inputs
            .iter()
            .map(|&j| value(j))
            .collect::<Result<_>>()?;
        let masked;
        if let Some(m) = f.input_masks.and_then(|m| m.get(&i)) {
            masked = ins[0].broadcast_mul(&m.to_device(ins[0].device())?)?;
            ins[0] = &masked;
        }
        let sw = sparse.and_then(|p| p.get(i));
        let epi = self.fusion.epilogue[i];
        match (self.folded.get(&i), epi) {
            (Some(fold), Some(e)) => {
                let residual = e.add.map(|(_, other)| value(other)).transpose()?;
                node::conv_folded(g, i, fold, ins[0], e.act, residual, ctx, sw)
            }
            (None, Some(Epi { act: Some(act), .. })) => {
                node::linear_act(g, i, ins[0], Some(act), ctx, sw, self.linear.get(&i))
            }
            (None, _) if self.linear.contains_key(&i) => {
                node::linear_act(g, i, ins[0], None, ctx, sw, self.linear.get(&i))
            }
            _ => match self.resize.get(&i) {
                Some((ah, awt)) => node::resize_by(ins[0], ah, awt),
                None => node::run(g, i, &ins, x, ctx, self.fusion.fused_relu[i], sw),
            },
        }
    }
}

/// For each node, the values whose last reader it is (graph outputs and kept nodes are
/// never released; a folded residual add reads its shortcut at the conv).
fn release_points(
    g: &Graph,
    consumers: &[Vec<NodeId>],
    fusion: &Fusion,
    keep: &[NodeId],
) -> Vec<Vec<NodeId>> {
    let mut remaining: Vec<usize> = consumers.iter().map(|c| c.len()).collect();
    for &o in g.outputs.iter().chain(keep) {
        remaining[o] += 1;
    }
    let mut release = vec![Vec::new(); g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        if fusion.alias[i].is_some() {
            continue;
        }
        let fused = fusion.epilogue[i]
            .and_then(|e| e.add)
            .map(|(_, other)| other);
        for &j in node.inputs.iter().chain(fused.iter()) {
            remaining[j] -= 1;
            if remaining[j] == 0 {
                release[i].push(j);
            }
        }
    }
    release
}

/// The epilogue constants of eval-mode conv `i`: batch norm `bn` folded into its weights
/// (the scaled dense copy made unless the conv runs sparse), or its own bias.
fn fold(g: &Graph, i: NodeId, bn: Option<NodeId>, sparse: bool) -> Result<Folded> {
    let Some(bn) = bn else {
        let Op::Conv2d(c) = &g.nodes[i].op else {
            bail!("internal: epilogue on a non-conv node");
        };
        let bias = if c.bias {
            g.param(i, BIAS)?.as_tensor().to_vec1()?
        } else {
            vec![0.0; c.out_channels]
        };
        return Ok(Folded {
            scale: None,
            bias,
            weight: None,
            packed: Default::default(),
            calls: Default::default(),
        });
    };
    let (scale, bias) = conv_bn_affine(g, i, bn)?;
    let weight = if sparse {
        None
    } else {
        let w = g.param(i, WEIGHT)?.as_tensor();
        let mut wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        scale_rows(&mut wv, &scale);
        Some(Tensor::from_vec(wv, w.dims(), w.device())?)
    };
    Ok(Folded {
        scale: Some(scale),
        bias,
        weight,
        packed: Default::default(),
        calls: Default::default(),
    })
}
