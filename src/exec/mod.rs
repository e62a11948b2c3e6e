//! Graph execution on candle tensors, in training or evaluation mode.
//!
//! A [`Plan`] is built once per graph, mode and options: the fusion decisions (batch norm
//! followed by its only consumer ReLU, and a residual add followed by ReLU, run as one
//! fused kernel; in eval mode a conv absorbs the batch norm after it, and the residual add
//! and ReLU after that), when each intermediate is released (eval mode drops it after its
//! last consumer), the folded weights and the compressed weights of sparse layers. Running
//! the plan is then one sweep over the nodes. [`forward`] and [`forward_with`] plan and run
//! in one call, for passes that run once; loops over many batches build the plan once.

mod chunks;
mod fusion;
mod inputs;
mod mode;
mod node;
mod plan;
pub mod profile;
mod pw_dw;
mod sparse_pack;
pub mod threads;

pub use inputs::{AsInputs, Inputs};
pub use mode::Mode;
pub use node::activation;
pub use plan::{Feeds, Plan, PlanOpts};
pub use sparse_pack::{max_linear_density, SparsePack, MAX_CONV_DENSITY, MAX_LINEAR_DENSITY};

use crate::graph::{Graph, NodeId};
use anyhow::{Context, Result};
use candle_core::{Tensor, D};
use std::collections::HashMap;

/// Options of one planned-and-run forward pass: the plan's options ([`PlanOpts`]) and the
/// run's ([`Feeds`]) in one struct, for call sites that run a pass once.
#[derive(Clone, Debug)]
pub struct ForwardOpts<'a> {
    pub mode: Mode,
    /// Nodes whose outputs are returned in [`ForwardOut::kept`] (never fused away).
    pub keep: &'a [NodeId],
    /// Seed of the dropout masks of this pass.
    pub seed: u64,
    /// Whether training mode updates the batch-norm running statistics.
    pub update_stats: bool,
    /// Multiplies a node's first input by this (broadcast) mask before the node runs:
    /// how search-time channel masks and masked-equivalence checks enter a forward.
    pub input_masks: Option<&'a HashMap<NodeId, Tensor>>,
    /// Gradients will be taken through this eval-mode pass (e.g. Taylor scores): disables
    /// the inference-only fusions (batch norm folded into convs), which have no backward.
    pub grad: bool,
    /// Element masks on conv/linear weights (sparsity): the node runs with `m ⊙ w`.
    pub weight_masks: Option<&'a HashMap<NodeId, WeightMask>>,
    /// Overrides every batch norm's running-average momentum in this pass (e.g. `1/(k+1)`
    /// at batch `k` makes the running statistics a cumulative average).
    pub bn_momentum: Option<f64>,
}

/// A weight mask of one conv or linear node.
#[derive(Clone, Debug)]
pub struct WeightMask {
    /// 0/1 mask with the weight's shape.
    pub mask: Tensor,
    /// Straight-through (dynamic sparse training, SR-STE): the forward uses `m ⊙ w`, the
    /// gradient reaches every latent weight unmasked. Otherwise the gradient is masked too,
    /// so pruned weights stay pruned.
    pub straight_through: bool,
}

impl<'a> ForwardOpts<'a> {
    pub fn new(mode: Mode) -> Self {
        ForwardOpts {
            mode,
            keep: &[],
            seed: 0,
            update_stats: true,
            input_masks: None,
            grad: false,
            weight_masks: None,
            bn_momentum: None,
        }
    }

    /// The structural half: what the plan needs.
    pub fn plan_opts(&self) -> PlanOpts {
        PlanOpts {
            keep: self.keep.to_vec(),
            masked_inputs: self
                .input_masks
                .map(|m| m.keys().copied().collect())
                .unwrap_or_default(),
            grad: self.grad,
            sparse: None,
        }
    }

    /// The run-time half.
    pub fn feeds(&self) -> Feeds<'a> {
        Feeds {
            seed: self.seed,
            frozen_stats: !self.update_stats,
            input_masks: self.input_masks,
            weight_masks: self.weight_masks,
            bn_momentum: self.bn_momentum,
        }
    }
}

#[derive(Debug)]
pub struct ForwardOut {
    /// The graph outputs, in order.
    pub outputs: Vec<Tensor>,
    /// Outputs of the requested `keep` nodes.
    pub kept: HashMap<NodeId, Tensor>,
}

/// Forward of a single-output graph: `x` is `[N, ...input shape]` (or one such tensor per
/// graph input, [`Inputs`]).
pub fn forward(g: &Graph, x: &(impl AsInputs + ?Sized), mode: Mode) -> Result<Tensor> {
    let mut out = forward_with(g, x, &ForwardOpts::new(mode))?;
    Ok(out.outputs.swap_remove(0))
}

/// Plans and runs one forward with options; see [`ForwardOpts`].
pub fn forward_with(
    g: &Graph,
    x: &(impl AsInputs + ?Sized),
    opts: &ForwardOpts,
) -> Result<ForwardOut> {
    // A graph preferring sparse kernels pays the compression once per plan, so one-shot
    // passes run dense; loops that want the sparse kernels build a plan.
    let mut po = opts.plan_opts();
    po.sparse = Some(false);
    Plan::new(g, opts.mode, &po)?.run(g, x, &opts.feeds())
}

/// Runs `f` on a thread of the kernels' pool (on this one if it already is one), with the
/// caller's kernel choice. Every kernel's parallel loop called from outside the pool is
/// sent to it while the caller sleeps — two context switches per op, which dominated
/// small models' batch-1 latency (measured); inside the pool a small loop runs inline.
/// Forward passes, backward passes and training steps run through this.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let reference = crate::kernels::reference_ops();
    rayon::scope(|_| {
        let before = crate::kernels::reference_ops();
        crate::kernels::use_reference_ops(reference);
        let out = f();
        crate::kernels::use_reference_ops(before);
        out
    })
}

/// Runs one node of `g` on given input values, outside a full forward: how methods
/// evaluate a layer (or a layer restricted to some input channels) on cached activations.
/// Training mode uses batch statistics and leaves the running statistics alone.
pub fn apply_node(g: &Graph, i: NodeId, ins: &[&Tensor], mode: Mode) -> Result<Tensor> {
    let ctx = node::Ctx {
        mode,
        seed: 0,
        update_stats: false,
        bn_momentum: None,
        weight_masks: None,
        no_grad: false,
    };
    // Values computed on the host (methods' probes) go to the parameters' device.
    let dev = g.device();
    let moved = ins
        .iter()
        .map(|t| t.to_device(&dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let ins: Vec<&Tensor> = moved.iter().collect();
    node::run(g, i, &ins, ins[0], &ctx, false, None)
        .with_context(|| format!("running node '{}'", g.nodes[i].name))
}

/// Standard-normal tensors for every input of `g` at batch `b` (latency measurements and
/// shape checks that need no real data).
pub fn random_inputs(g: &Graph, b: usize) -> Result<Vec<Tensor>> {
    let shapes = g.shapes()?;
    g.input_ids()
        .into_iter()
        .map(|i| {
            let mut dims = vec![b];
            dims.extend(&shapes[i]);
            let dev = &g.device();
            Ok(match g.token_input(i) {
                // Token ids spread over the vocabulary; masks that keep every key.
                Some(crate::graph::TokenInput::Ids { vocab }) => {
                    let n: usize = dims.iter().product();
                    let v: Vec<f32> = (0..n).map(|k| ((k * 7919 + 13) % vocab) as f32).collect();
                    Tensor::from_vec(v, dims, dev)?
                }
                Some(crate::graph::TokenInput::KeyMask) => {
                    Tensor::ones(dims, candle_core::DType::F32, dev)?
                }
                None => Tensor::randn(0f32, 1f32, dims, dev)?,
            })
        })
        .collect()
}

/// Arg-max class of each row of `[N, K]` logits.
pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}
