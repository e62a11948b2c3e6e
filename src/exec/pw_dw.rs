//! Eval plans: which 1×1 expansions run together with the depthwise conv that reads them
//! ([`crate::kernels::pw_dw`]), and that fused step.
//!
//! A pair is an eval-mode 1×1 conv (stride 1, no padding, ungrouped, dense) whose epilogue
//! has no residual add, whose output (after the batch norm and activation it absorbed)
//! has the depthwise conv as its only reader, and which sits right before it in the
//! schedule (only its absorbed nodes between them: nothing else may read or release a
//! value in between). The expansion is then deferred to the depthwise conv's step; where
//! the depthwise conv's output (after its absorbed nodes) is read only by a 1×1 conv right
//! after it — the block's projection, whose residual add reads a value from before the
//! pair — both are deferred to the projection's step (`LOPPER_PWDW_PROJ=0`: pairs only).

use super::fusion::Fusion;
use super::node::{conv_cfg, Folded};
use super::sparse_pack::SparsePack;
use crate::graph::ops::param::WEIGHT;
use crate::graph::ops::{ActivationKind, Op};
use crate::graph::{Graph, NodeId};
use crate::kernels::csr::SparseWeight;
use crate::kernels::im2col::Geo;
use crate::kernels::pw_dw::{Halves, PwDw, Weights};
use anyhow::{anyhow, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// One planned pair, its kernel built at the first fused run.
#[derive(Debug)]
pub struct Pair {
    /// The expansion.
    pub pw: NodeId,
    /// The depthwise conv.
    pub dw: NodeId,
    /// The 1×1 projection that reads the depthwise conv's output, if it runs in the same
    /// step (the step is then the projection's, and the depthwise conv is deferred too).
    pub proj: Option<NodeId>,
    /// The kernel, with its weights packed (built at the first fused run).
    built: OnceLock<Arc<PwDw>>,
}

/// The pairs of a plan, by the node whose step runs them (the depthwise conv, or the
/// projection).
#[derive(Debug, Default)]
pub struct Pairs {
    pub(super) by_dw: HashMap<NodeId, Pair>,
    /// `deferred[i]`: node `i` is a pair's expansion (or its depthwise conv, with a
    /// projection).
    deferred: Vec<bool>,
}

/// `LOPPER_PWDW=0` runs the pairs node by node (A/B runs); read once.
fn env_off() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    crate::kernels::simd::env_off(&OFF, "LOPPER_PWDW")
}

/// Whether a pass of `n` images runs its pairs fused: at least 4 images per thread
/// (`LOPPER_PWDW_MIN_N` to override), one task per image. Alternated against the
/// node-by-node pass on an AMD EPYC (ms): MobileNetV2 at batch 64 34.0 against 36.0,
/// MobileNetV3-small at 64 36.3 against 39.0, the L1-pruned MobileNetV2 at 64 18.3
/// against 19.4, MobileNetV3-large at 8 13.9 against 15.1, EfficientNet-B0 at 8 30.3
/// against 34.2 (noisy), MobileNetV3-small at 8 even. Channel blocks as tasks at smaller
/// batches lost (MobileNetV2 at batch 1 0.67–0.74 against 0.63–0.69: each block's
/// sub-GEMM is short and re-reads the expansion's input), and so did fusing the chunked
/// prefix's pairs (two images a chunk: 33.8 against 33.0 at batch 64).
pub fn batch_fuses(n: usize) -> bool {
    static MIN: OnceLock<usize> = OnceLock::new();
    let min = *MIN.get_or_init(|| {
        std::env::var("LOPPER_PWDW_MIN_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4 * rayon::current_num_threads().max(1))
    });
    n >= min
}

/// Whether a 1×1 conv that runs on the sparse kernels, with output `shape` (`[C, H, W]`),
/// may run inside a fused step (one image at a time): on maps of more than 16 positions
/// (`LOPPER_PWDW_SPARSE=0`: never). 4×4 maps keep the node-by-node sparse kernel, which
/// tiles the same channel of several images (`kernels::sparse_images`): 90 % sparse
/// MobileNetV2 (CIFAR) at batch 64, per block call, 160 → 960 → 160 at 4×4 0.98 ms fused
/// against 0.85 node by node, 96 → 576 → 96 at 8×8 1.10 against 1.34.
pub fn sparse_pairs(shape: &[usize]) -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    !crate::kernels::simd::env_off(&OFF, "LOPPER_PWDW_SPARSE")
        && shape.len() == 3
        && shape[1] * shape[2] > 16
}

impl Pairs {
    /// Finds the pairs of an eval plan: `pinned` nodes (kept, masked) never pair, nor do
    /// convs the plan runs sparse unless [`sparse_pairs`] (`sparse`). A pass whose pairs
    /// fuse does not chunk its prefix ([`Pairs::start_before`]).
    pub fn plan(
        g: &Graph,
        fusion: &Fusion,
        folded: &HashMap<NodeId, Folded>,
        consumers: &[Vec<NodeId>],
        pinned: &[NodeId],
        sparse: impl Fn(NodeId) -> bool,
    ) -> Pairs {
        let n = g.nodes.len();
        let mut p = Pairs {
            by_dw: HashMap::new(),
            deferred: vec![false; n],
        };
        if env_off() {
            return p;
        }
        let free = |i: NodeId| !pinned.contains(&i) && !g.outputs.contains(&i);
        for (a, node) in g.nodes.iter().enumerate() {
            let Op::Conv2d(c) = &node.op else { continue };
            let pointwise = pointwise(c);
            let Some(e) = fusion.epilogue[a] else {
                continue;
            };
            if !pointwise || e.add.is_some() || !folded.contains_key(&a) || sparse(a) || !free(a) {
                continue;
            }
            let end = chain_end(a, fusion, consumers);
            let [b] = consumers[end][..] else { continue };
            let Op::Conv2d(d) = &g.nodes[b].op else {
                continue;
            };
            let depthwise = d.groups > 1
                && d.groups == d.in_channels
                && d.out_channels == d.in_channels
                && d.in_channels == c.out_channels;
            let adjacent = (a + 1..b).all(|j| fusion.alias[j].is_some() && j <= end);
            let epi_ok = fusion.epilogue[b].is_some_and(|e| e.add.is_none());
            if depthwise
                && adjacent
                && epi_ok
                && folded.contains_key(&b)
                && !sparse(b)
                && free(b)
                && free(end)
            {
                let proj = projection(g, b, fusion, folded, consumers, &free, &sparse)
                    .filter(|&(_, other)| other.is_none_or(|o| o < a))
                    .map(|(c, _)| c);
                p.deferred[a] = true;
                if proj.is_some() {
                    p.deferred[b] = true;
                }
                p.by_dw.insert(
                    proj.unwrap_or(b),
                    Pair {
                        pw: a,
                        dw: b,
                        proj,
                        built: Default::default(),
                    },
                );
            }
        }
        p
    }

    /// Whether a pair's expansion comes before node `cut`: the chunked prefix that ends
    /// there and the fused pairs exclude each other (a pair cut in two by it would run its
    /// expansion in the chunks and defer its depthwise conv in the rest). With the pairs
    /// fused, the prefix gains nothing: each image's expanded tensor already stays in L2.
    /// MobileNetV2 (CIFAR) at batch 64, alternated: dense 33.7 ms against 34.3 with the
    /// prefix chunked, 90 % sparse (its 1×1 convs fused too) 16.9 against 25–27.
    pub fn start_before(&self, cut: NodeId) -> bool {
        self.by_dw.values().any(|p| p.pw < cut)
    }

    /// Whether node `i` is a pair's expansion.
    pub fn deferred(&self, i: NodeId) -> bool {
        self.deferred.get(i).copied().unwrap_or(false)
    }

    /// The pair whose depthwise conv is node `i`.
    pub fn get(&self, i: NodeId) -> Option<&Pair> {
        self.by_dw.get(&i)
    }
}

/// A dense 1×1 conv at stride 1 without padding (an expansion or a projection).
fn pointwise(c: &crate::graph::ops::Conv2d) -> bool {
    c.kernel == [1, 1]
        && c.stride == [1, 1]
        && c.padding == [0; 4]
        && c.dilation == [1, 1]
        && c.groups == 1
}

/// The last node of the chain conv `i` absorbed (batch norm, residual add, activation).
fn chain_end(i: NodeId, fusion: &Fusion, consumers: &[Vec<NodeId>]) -> NodeId {
    let mut end = i;
    while let [j] = consumers[end][..] {
        if fusion.alias[j] != Some(end) {
            break;
        }
        end = j;
    }
    end
}

/// The 1×1 projection that depthwise conv `b`'s output (after its absorbed nodes) feeds
/// alone, right after it in the schedule, and the node its residual add reads (if it
/// has one), unless `LOPPER_PWDW_PROJ=0`.
#[allow(clippy::too_many_arguments)]
fn projection(
    g: &Graph,
    b: NodeId,
    fusion: &Fusion,
    folded: &HashMap<NodeId, Folded>,
    consumers: &[Vec<NodeId>],
    free: &impl Fn(NodeId) -> bool,
    sparse: &impl Fn(NodeId) -> bool,
) -> Option<(NodeId, Option<NodeId>)> {
    static OFF: OnceLock<bool> = OnceLock::new();
    if crate::kernels::simd::env_off(&OFF, "LOPPER_PWDW_PROJ") {
        return None;
    }
    let end = chain_end(b, fusion, consumers);
    let [c] = consumers[end][..] else { return None };
    let Op::Conv2d(k) = &g.nodes[c].op else {
        return None;
    };
    let pointwise = pointwise(k);
    let adjacent = (b + 1..c).all(|j| fusion.alias[j].is_some() && j <= end);
    let e = fusion.epilogue[c]?;
    let ok = pointwise && adjacent && free(end) && free(c) && folded.contains_key(&c) && !sparse(c);
    ok.then_some((c, e.add.map(|(_, other)| other)))
}

/// Runs pair `p` on the expansion's input `x` (and the projection's residual `res`):
/// the value of its last node.
pub fn run(
    g: &Graph,
    p: &Pair,
    folded: &HashMap<NodeId, Folded>,
    fusion: &Fusion,
    sparse: Option<&SparsePack>,
    x: &Tensor,
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims.first().copied().unwrap_or(0);
    let k = match p.built.get() {
        Some(k) => k,
        None => {
            let k = build(g, p, folded, fusion, sparse, &dims)?;
            p.built.get_or_init(|| Arc::new(k))
        }
    };
    #[cfg(test)]
    tests::RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (c, oh, ow) = k.out_dims();
    let x = x.contiguous()?;
    let res = res.map(|r| r.contiguous()).transpose()?;
    let out = crate::kernels::cpu::with_f32(&x, |xv| {
        let run = |rv: Option<&[f32]>| {
            // SAFETY: `forward` writes every element.
            let mut out = unsafe { crate::kernels::cpu::unfilled(n * c * oh * ow) };
            k.forward(xv, n, &mut out, rv);
            out
        };
        match &res {
            Some(r) => crate::kernels::cpu::with_f32(r, |rv| run(Some(rv))),
            None => Ok(run(None)),
        }
    })??;
    Ok(Tensor::from_vec(out, (n, c, oh, ow), x.device())?)
}

/// The folded weight of conv `i` as floats (the batch-norm-scaled copy, or the weight).
fn weight(g: &Graph, i: NodeId, f: &Folded) -> Result<Vec<f32>> {
    let w = match &f.weight {
        Some(w) => w.clone(),
        None => g.param(i, WEIGHT)?.as_tensor().clone(),
    };
    Ok(w.flatten_all()?.to_vec1()?)
}

/// A conv of the step: geometry, weights (folded dense, or the plan's sparse ones with the
/// batch norm's scale), bias and fused activation.
struct Half<'a> {
    geo: Geo,
    dense: Vec<f32>,
    sparse: Option<&'a SparseWeight>,
    f: &'a Folded,
    act: Option<ActivationKind>,
}

impl Half<'_> {
    fn halves(&self) -> Halves<'_> {
        Halves {
            w: match self.sparse {
                Some(sw) => Weights::Sparse {
                    csr: &sw.csr,
                    scale: self.f.sparse_scale(sw),
                },
                None => Weights::Dense(&self.dense),
            },
            bias: &self.f.bias,
            act: self.act,
        }
    }
}

/// Conv `i` of a pair with its geometry on input `dims`.
fn half<'a>(
    g: &Graph,
    i: NodeId,
    folded: &'a HashMap<NodeId, Folded>,
    fusion: &Fusion,
    sparse: Option<&'a SparsePack>,
    dims: &[usize],
) -> Result<Half<'a>> {
    let Op::Conv2d(c) = &g.nodes[i].op else {
        return Err(anyhow!("internal: pw/dw pair node #{i} is not a conv"));
    };
    let f = folded
        .get(&i)
        .ok_or_else(|| anyhow!("internal: pair node #{i} without fold"))?;
    let wd = g.param(i, WEIGHT)?.dims().to_vec();
    let geo = conv_cfg(c).geo(dims, &wd)?;
    let sparse = sparse.and_then(|p| p.get(i));
    Ok(Half {
        geo,
        dense: if sparse.is_some() {
            Vec::new()
        } else {
            weight(g, i, f)?
        },
        sparse,
        f,
        act: fusion.epilogue[i].and_then(|e| e.act),
    })
}

/// The kernel of pair `p` for input dims `dims`.
fn build(
    g: &Graph,
    p: &Pair,
    folded: &HashMap<NodeId, Folded>,
    fusion: &Fusion,
    sparse: Option<&SparsePack>,
    dims: &[usize],
) -> Result<PwDw> {
    let a = half(g, p.pw, folded, fusion, sparse, dims)?;
    let ga = a.geo;
    let b = half(
        g,
        p.dw,
        folded,
        fusion,
        None,
        &[dims[0], ga.o, ga.oh, ga.ow],
    )?;
    let gb = b.geo;
    if !PwDw::fits(&ga, &gb) {
        return Err(anyhow!("geometries {ga:?} / {gb:?} do not pair"));
    }
    let k = PwDw::new(&ga, a.halves(), &gb, b.halves());
    let Some(c) = p.proj else { return Ok(k) };
    let c = half(g, c, folded, fusion, sparse, &[dims[0], gb.o, gb.oh, gb.ow])?;
    if !k.projects(&c.geo) {
        return Err(anyhow!("projection {:?} does not fit the pair", c.geo));
    }
    Ok(k.with_projection(&c.geo, c.halves()))
}

#[cfg(test)]
mod tests {
    use crate::exec::{Feeds, Mode, Plan, PlanOpts};
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Fused pair runs (all tests of the binary).
    pub(super) static RUNS: AtomicUsize = AtomicUsize::new(0);

    /// The plan's output with the pairs fused, and node by node (an empty weight-mask map
    /// turns the fusion off and changes nothing else).
    fn both(g: &crate::graph::Graph, n: usize, side: usize) -> (Vec<f32>, Vec<f32>) {
        both_with(g, n, side, &PlanOpts::default())
    }

    fn both_with(
        g: &crate::graph::Graph,
        n: usize,
        side: usize,
        o: &PlanOpts,
    ) -> (Vec<f32>, Vec<f32>) {
        let plan = Plan::new(g, Mode::Eval, o).unwrap();
        let xv: Vec<f32> = (0..n * 3 * side * side)
            .map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(xv, (n, 3, side, side), &Device::Cpu).unwrap();
        let none = HashMap::new();
        let run = |f: &Feeds| {
            let out = plan.run(g, &x, f).unwrap();
            out.outputs[0]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let fused = run(&Feeds::default());
        let plain = run(&Feeds {
            weight_masks: Some(&none),
            ..Feeds::default()
        });
        (fused, plain)
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * scale, "{what} [{i}]: {x} vs {y}");
        }
    }

    /// MobileNetV2 (CIFAR) pairs every expansion with its depthwise conv and projection
    /// (16 of its 17 blocks expand), and the fused pass gives the node-by-node outputs at a
    /// batch that fuses (no chunked prefix then), on 32×32 and 16×16 inputs and pruned to
    /// odd widths.
    #[test]
    fn fused_pairs_match_the_node_by_node_pass() {
        let g = crate::zoo::build("mobilenetv2@3x32x32#10", 5).unwrap();
        let plan = Plan::new(&g, Mode::Eval, &PlanOpts::default()).unwrap();
        assert_eq!(plan.pairs.by_dw.len(), 16);
        // Each with its block's projection (a residual add in the blocks that keep the
        // shape), the prefix's too.
        let cut = plan.chunked_prefix().expect("a prefix");
        assert!(plan.pairs.start_before(cut));
        for p in plan.pairs.by_dw.values() {
            assert!(p.proj.is_some(), "{p:?}");
        }
        let n = 4 * rayon::current_num_threads().max(1);
        let before = RUNS.load(Ordering::Relaxed);
        let (f, p) = both(&g, n, 32);
        assert_close(&f, &p, "mobilenetv2 32x32");
        assert!(RUNS.load(Ordering::Relaxed) > before, "no pair ran fused");
        let small = crate::zoo::build("mobilenetv2@3x16x16#10", 5).unwrap();
        let (f, p) = both(&small, n + 1, 16);
        assert_close(&f, &p, "mobilenetv2 16x16");
        let pruned = crate::methods::dwr::ops::prune_width(&small, 0.7).unwrap();
        let (f, p) = both(&pruned, n, 16);
        assert_close(&f, &p, "pruned mobilenetv2");
        // A training plan pairs nothing.
        let train = Plan::new(&g, Mode::Train, &PlanOpts::default()).unwrap();
        assert!(train.pairs.by_dw.is_empty());
    }

    /// A 90 % sparse MobileNetV2 runs its sparse 1×1 convs inside the fused steps on maps
    /// of more than 16 positions (the others node by node), and its output is the dense
    /// node-by-node pass's (the weight masks of `both` turn the sparse kernels off too).
    #[test]
    fn sparse_pairs_match_the_dense_pass() {
        use crate::graph::ops::{param, Op};
        use crate::sparse::mask::Pattern;
        let g = crate::zoo::build("mobilenetv2@3x32x32#10", 5).unwrap();
        let layers = crate::sparse::layers::prunable_layers(&g);
        crate::methods::pts::uniform_magnitude(&g, &layers, 0.9, Pattern::Unstructured).unwrap();
        // Running variances away from 1: the folded scale is far from 1 (a kernel that
        // dropped it, or applied it twice, fails).
        for n in &g.nodes {
            if let Op::BatchNorm(b) = &n.op {
                let var: Vec<f32> = (0..b.num_features)
                    .map(|i| 0.2 + (i % 7) as f32 * 0.5)
                    .collect();
                let t = Tensor::from_vec(var, b.num_features, &Device::Cpu).unwrap();
                let key = crate::graph::param_key(&n.name, param::RUNNING_VAR);
                g.set_param(&key, &t).unwrap();
            }
        }
        let o = PlanOpts {
            sparse: Some(true),
            ..PlanOpts::default()
        };
        let plan = Plan::new(&g, Mode::Eval, &o).unwrap();
        let shapes = g.shapes().unwrap();
        let sparse_pw: Vec<usize> = plan
            .pairs
            .by_dw
            .values()
            .filter(|p| plan.sparse.get(p.pw).is_some())
            .map(|p| p.pw)
            .collect();
        // The expansions on 32×32, 16×16 and 8×8 maps, none on 4×4.
        assert!(sparse_pw.len() >= 10, "{sparse_pw:?}");
        assert!(sparse_pw.iter().all(|&i| shapes[i][1] * shapes[i][2] > 16));
        let n = 4 * rayon::current_num_threads().max(1);
        let before = RUNS.load(Ordering::Relaxed);
        let (f, p) = both_with(&g, n, 32, &o);
        assert!(RUNS.load(Ordering::Relaxed) > before, "no pair ran fused");
        assert_close(&f, &p, "sparse mobilenetv2");
    }
}
