//! Graph execution on candle tensors, in training or evaluation mode.
//!
//! One forward sweep over the topologically ordered nodes. Batch norm followed by its
//! only consumer ReLU, and a residual add followed by ReLU, run as one fused kernel; the
//! fused-away intermediate is not materialised (ask for it in `keep` to prevent fusion).
//! In eval mode every intermediate is dropped as soon as its last consumer ran.

mod plan;

pub use plan::{plan, Fusion};

use crate::graph::ops::{ActivationKind, Op};
use crate::graph::{Graph, NodeId};
use crate::kernels::sparse::SparseEpilogue;
use crate::kernels::{self, ConvCfg, PoolCfg};
use crate::sparse::SparsePack;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Tensor, D};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics, running averages updated, dropout active.
    Train,
    /// Running statistics, dropout off.
    Eval,
}

/// Options of one forward pass.
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
}

pub struct ForwardOut {
    /// The graph outputs, in order.
    pub outputs: Vec<Tensor>,
    /// Outputs of the requested `keep` nodes.
    pub kept: HashMap<NodeId, Tensor>,
}

/// Forward of a single-output graph: `x` is `[N, ...input shape]`.
pub fn forward(g: &Graph, x: &Tensor, mode: Mode) -> Result<Tensor> {
    let mut out = forward_with(g, x, &ForwardOpts::new(mode))?;
    Ok(out.outputs.swap_remove(0))
}

/// Forward with options; see [`ForwardOpts`].
pub fn forward_with(g: &Graph, x: &Tensor, opts: &ForwardOpts) -> Result<ForwardOut> {
    let want = g.input_shape();
    if x.rank() != want.len() + 1 || &x.dims()[1..] != want.as_slice() {
        bail!(
            "input has shape {:?}, the model expects [N, {}]",
            x.dims(),
            want.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // One structural pass per forward: consumers and shapes feed fusion planning and the
    // early release of intermediates.
    let consumers = g.consumers();
    // Nodes with an input mask take no part in fusion (their masked input must be used).
    let mut pinned = opts.keep.to_vec();
    if let Some(m) = opts.input_masks {
        pinned.extend(m.keys());
    }
    let fusion = plan(
        g,
        &pinned,
        &consumers,
        &g.shapes()?,
        opts.mode == Mode::Eval && !opts.grad,
    );
    // Sparse (CSR) kernels for inference only: never under gradients or weight masks.
    let pack = (opts.mode == Mode::Eval && !opts.grad && opts.weight_masks.is_none())
        .then(|| g.sparse_pack())
        .flatten();
    let mut remaining: Vec<usize> = consumers.iter().map(|c| c.len()).collect();
    for &o in g.outputs.iter().chain(opts.keep) {
        remaining[o] += 1; // never dropped
    }
    let mut vals: Vec<Option<Tensor>> = vec![None; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        if let Some(src) = fusion.alias[i] {
            // This ReLU was fused into its producer, whose value is already the output.
            vals[i] = vals[src].take();
            continue;
        }
        let ins: Vec<&Tensor> = node
            .inputs
            .iter()
            .map(|&j| {
                vals[j]
                    .as_ref()
                    .ok_or_else(|| anyhow!("value of node #{j} missing"))
            })
            .collect::<Result<_>>()?;
        let masked;
        let mut ins = ins;
        if let Some(m) = opts.input_masks.and_then(|m| m.get(&i)) {
            masked = ins[0].broadcast_mul(m)?;
            ins[0] = &masked;
        }
        let y = match (fusion.fold_bn[i], fusion.fold_add[i]) {
            (Some(bn), Some((add, other))) => {
                let r = vals[other]
                    .as_ref()
                    .ok_or_else(|| anyhow!("value of node #{other} missing"))?;
                let relu = fusion.fused_relu[add];
                conv_folded(g, i, bn, ins[0], relu, Some(r), opts, pack.as_deref())
            }
            (Some(bn), None) => {
                let relu = fusion.fused_relu[bn];
                conv_folded(g, i, bn, ins[0], relu, None, opts, pack.as_deref())
            }
            _ => run_node(g, i, &ins, x, opts, fusion.fused_relu[i], pack.as_deref()),
        }
        .with_context(|| {
            format!(
                "forward failed at node '{}' ({})",
                node.name,
                node.op.kind()
            )
        })?;
        vals[i] = Some(y);
        if opts.mode == Mode::Eval {
            // A fused residual add consumed its shortcut here, on the add's behalf.
            let fused = fusion.fold_add[i].map(|(_, other)| other);
            for &j in node.inputs.iter().chain(fused.iter()) {
                remaining[j] -= 1;
                if remaining[j] == 0 {
                    vals[j] = None;
                }
            }
        }
    }
    let outputs = g
        .outputs
        .iter()
        .map(|&o| {
            vals[o]
                .clone()
                .ok_or_else(|| anyhow!("output #{o} missing"))
        })
        .collect::<Result<_>>()?;
    let kept = opts
        .keep
        .iter()
        .filter_map(|&k| vals[k].clone().map(|v| (k, v)))
        .collect();
    Ok(ForwardOut { outputs, kept })
}

/// Eval-mode conv `i` with batch norm `bn` folded in: `w' = w·s`, `b' = (b − μ)·s + β`,
/// `s = γ/√(σ² + ε)`, run with a bias (+ ReLU) epilogue — one pass over the output
/// instead of three. A conv with compressed sparse weights applies `s` in its epilogue.
#[allow(clippy::too_many_arguments)]
fn conv_folded(
    g: &Graph,
    i: NodeId,
    bn: NodeId,
    x: &Tensor,
    relu: bool,
    residual: Option<&Tensor>,
    opts: &ForwardOpts,
    sparse: Option<&SparsePack>,
) -> Result<Tensor> {
    let (Op::Conv2d(c), Op::BatchNorm(b)) = (&g.nodes[i].op, &g.nodes[bn].op) else {
        bail!("internal: fold plan names a non-conv/bn pair");
    };
    let host = |n: NodeId, p: &str| -> Result<Vec<f32>> {
        Ok(g.param(n, p)?.as_tensor().flatten_all()?.to_vec1()?)
    };
    let (gamma, beta) = (host(bn, "weight")?, host(bn, "bias")?);
    let (mean, var) = (host(bn, "running_mean")?, host(bn, "running_var")?);
    let scale: Vec<f32> = gamma
        .iter()
        .zip(&var)
        .map(|(g, v)| g / (v + b.eps as f32).sqrt())
        .collect();
    let conv_b = if c.bias {
        host(i, "bias")?
    } else {
        vec![0.0; c.out_channels]
    };
    let bias: Vec<f32> = (0..c.out_channels)
        .map(|o| (conv_b[o] - mean[o]) * scale[o] + beta[o])
        .collect();
    let cfg = ConvCfg {
        stride: c.stride,
        padding: c.padding,
        dilation: c.dilation,
        groups: c.groups,
    };
    if let Some(csr) = sparse.and_then(|p| p.layers.get(&i)) {
        let w_dims = g.param(i, "weight")?.dims().to_vec();
        let epi = SparseEpilogue {
            scale: Some(&scale),
            bias: Some(&bias),
            relu,
        };
        return kernels::sparse::conv2d(x, csr, &w_dims, cfg, &epi, residual);
    }
    let w = &weight(g, i, opts)?;
    let per = w.elem_count() / c.out_channels;
    let mut wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
    wv.chunks_exact_mut(per)
        .zip(&scale)
        .for_each(|(row, s)| row.iter_mut().for_each(|v| *v *= s));
    let w = Tensor::from_vec(wv, w.dims(), w.device())?;
    kernels::conv2d_bias_relu(x, &w, bias, relu, residual, cfg)
}

/// Runs one node of `g` on given input values, outside a full forward: how methods
/// evaluate a layer (or a layer restricted to some input channels) on cached activations.
/// Training mode uses batch statistics and leaves the running statistics alone.
pub fn apply_node(g: &Graph, i: NodeId, ins: &[&Tensor], mode: Mode) -> Result<Tensor> {
    let opts = ForwardOpts {
        update_stats: false,
        ..ForwardOpts::new(mode)
    };
    run_node(g, i, ins, ins[0], &opts, false, None)
        .with_context(|| format!("running node '{}'", g.nodes[i].name))
}

/// The weight node `i` runs with: its parameter, masked if the pass carries a mask for it.
fn weight(g: &Graph, i: NodeId, opts: &ForwardOpts) -> Result<Tensor> {
    let w = g.param(i, "weight")?.as_tensor();
    Ok(match opts.weight_masks.and_then(|m| m.get(&i)) {
        None => w.clone(),
        Some(m) if m.straight_through => {
            // w + sg(m⊙w − w): value m⊙w, gradient identity.
            (w + (w * &m.mask)?.sub(w)?.detach())?
        }
        Some(m) => (w * &m.mask)?,
    })
}

fn run_node(
    g: &Graph,
    i: NodeId,
    ins: &[&Tensor],
    input: &Tensor,
    opts: &ForwardOpts,
    relu: bool,
    sparse: Option<&SparsePack>,
) -> Result<Tensor> {
    let node = &g.nodes[i];
    let csr = sparse.and_then(|p| p.layers.get(&i));
    let p = |name: &str| -> Result<Tensor> { Ok(g.param(i, name)?.as_tensor().clone()) };
    Ok(match &node.op {
        Op::Input(_) => input.clone(),
        Op::Conv2d(c) => {
            let cfg = ConvCfg {
                stride: c.stride,
                padding: c.padding,
                dilation: c.dilation,
                groups: c.groups,
            };
            if let Some(csr) = csr {
                let b = if c.bias {
                    Some(p("bias")?.to_vec1::<f32>()?)
                } else {
                    None
                };
                let epi = SparseEpilogue {
                    scale: None,
                    bias: b.as_deref(),
                    relu: false,
                };
                let w_dims = g.param(i, "weight")?.dims().to_vec();
                return kernels::sparse::conv2d(ins[0], csr, &w_dims, cfg, &epi, None);
            }
            let y = kernels::conv2d(ins[0], &weight(g, i, opts)?, cfg)?;
            if c.bias {
                y.broadcast_add(&p("bias")?.reshape((1, c.out_channels, 1, 1))?)?
            } else {
                y
            }
        }
        Op::Linear(l) => {
            let b = if l.bias { Some(p("bias")?) } else { None };
            // A few rows: the gather-based product only wins when very sparse (measured:
            // the MLP at batch 1 is slower sparse at 70 %, faster at 90 %).
            let few_rows = ins[0].dim(0)? <= 4;
            if let Some(csr) = csr.filter(|c| !few_rows || c.density() <= 0.15) {
                let bv = b.map(|b| b.to_vec1::<f32>()).transpose()?;
                return kernels::sparse::linear(ins[0], csr, bv.as_deref());
            }
            kernels::linear(ins[0], &weight(g, i, opts)?, b.as_ref())?
        }
        Op::BatchNorm(bn) => {
            let (w, b) = (p("weight")?, p("bias")?);
            let (rm, rv) = (g.param(i, "running_mean")?, g.param(i, "running_var")?);
            match opts.mode {
                Mode::Eval => kernels::batch_norm(ins[0], &w, &b, Some((rm, rv)), bn.eps, relu)?.0,
                Mode::Train => {
                    let (y, st) = kernels::batch_norm(ins[0], &w, &b, None, bn.eps, relu)?;
                    if let (Some(st), true) = (st, opts.update_stats) {
                        let m = opts.bn_momentum.unwrap_or(bn.momentum) as f32;
                        let unbias = st.count as f32 / (st.count.max(2) - 1) as f32;
                        let old_m = rm.as_tensor().to_vec1::<f32>()?;
                        let old_v = rv.as_tensor().to_vec1::<f32>()?;
                        let nm: Vec<f32> = old_m
                            .iter()
                            .zip(&st.mean)
                            .map(|(o, b)| (1.0 - m) * o + m * b)
                            .collect();
                        let nv: Vec<f32> = old_v
                            .iter()
                            .zip(&st.var)
                            .map(|(o, b)| (1.0 - m) * o + m * b * unbias)
                            .collect();
                        let dev = rm.device();
                        rm.set(&Tensor::from_vec(nm, old_m.len(), dev)?)?;
                        rv.set(&Tensor::from_vec(nv, old_v.len(), dev)?)?;
                    }
                    y
                }
            }
        }
        Op::Activation(a) => activation(ins[0], a.kind)?,
        Op::ChannelGather(gth) => {
            let idx: Vec<u32> = gth.indices.iter().map(|&i| i as u32).collect();
            let idx = Tensor::from_vec(idx, gth.indices.len(), ins[0].device())?;
            ins[0].index_select(&idx, 1)?
        }
        Op::ChannelAffine(a) => {
            let mut shape = vec![1usize; ins[0].rank()];
            shape[1] = a.channels;
            ins[0]
                .broadcast_mul(&p("weight")?.reshape(shape.as_slice())?)?
                .broadcast_add(&p("bias")?.reshape(shape.as_slice())?)?
        }
        Op::MaxPool(pc) | Op::AvgPool(pc) => {
            let cfg = PoolCfg {
                kernel: pc.kernel,
                stride: pc.stride,
                padding: pc.padding,
                ceil_mode: pc.ceil_mode,
                count_include_pad: pc.count_include_pad,
            };
            kernels::pool2d(ins[0], cfg, matches!(node.op, Op::MaxPool(_)))?
        }
        Op::GlobalAvgPool(_) => kernels::global_avg_pool(ins[0])?,
        Op::Flatten(_) => ins[0].flatten_from(1)?,
        Op::Reshape(r) => {
            let n = ins[0].dim(0)?;
            let mut shape = vec![n];
            shape.extend(r.resolve(ins[0].elem_count() / n.max(1))?);
            ins[0].reshape(shape)?
        }
        Op::Add(_) => {
            if relu {
                kernels::add_relu(ins[0], ins[1])?
            } else {
                let mut y = ins[0].clone();
                for t in &ins[1..] {
                    y = y.broadcast_add(t)?;
                }
                y
            }
        }
        Op::Mul(_) => {
            let mut y = ins[0].clone();
            for t in &ins[1..] {
                y = y.broadcast_mul(t)?;
            }
            y
        }
        Op::Concat(_) => Tensor::cat(ins, 1)?,
        Op::ChannelPad(cp) => ins[0].pad_with_zeros(1, cp.before, cp.after)?,
        Op::Dropout(d) => match opts.mode {
            Mode::Eval => ins[0].clone(),
            Mode::Train if d.p == 0.0 => ins[0].clone(),
            Mode::Train => {
                let mut rng = Pcg64::seed_from_u64(opts.seed ^ ((i as u64 + 1) << 32));
                let keep = 1.0 - d.p;
                let mask: Vec<f32> = (0..ins[0].elem_count())
                    .map(|_| {
                        if rng.gen::<f32>() < keep {
                            1.0 / keep
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let m = Tensor::from_vec(mask, ins[0].dims(), ins[0].device())?;
                ins[0].mul(&m)?
            }
        },
        Op::Softmax(_) => candle_nn::ops::softmax(ins[0], 1)?,
        Op::Identity(_) => ins[0].clone(),
    })
}

/// Element-wise activation on candle ops (these are cheap next to conv and batch norm).
pub fn activation(x: &Tensor, kind: ActivationKind) -> Result<Tensor> {
    Ok(match kind {
        ActivationKind::Relu => x.relu()?,
        ActivationKind::Relu6 => x.clamp(0f32, 6f32)?,
        ActivationKind::LeakyRelu { slope } => {
            let s = (x * slope as f64)?;
            if slope <= 1.0 {
                x.maximum(&s)?
            } else {
                x.minimum(&s)?
            }
        }
        ActivationKind::Gelu => x.gelu_erf()?,
        ActivationKind::Silu => x.silu()?,
        ActivationKind::Sigmoid => candle_nn::ops::sigmoid(x)?,
        ActivationKind::HardSigmoid => ((x + 3.0)?.clamp(0f32, 6f32)? / 6.0)?,
        ActivationKind::HardSwish => x.mul(&((x + 3.0)?.clamp(0f32, 6f32)? / 6.0)?)?,
        ActivationKind::Tanh => x.tanh()?,
    })
}

/// Arg-max class of each row of `[N, K]` logits.
pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}
