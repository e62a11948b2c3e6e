//! `lopper bench`: step latencies of the reference workloads (ResNet-20 train step b64,
//! inference b64 and b1; MLP 784-1024-1024-10 train step b128), median over timed steps
//! after warm-up, and peak RSS per workload. `bench/pytorch_bench.py` runs the same.

pub mod model;

use crate::exec::{forward_with, Feeds, ForwardOpts, Mode, Plan, PlanOpts};
use crate::graph::Graph;
use crate::prune;
use crate::train::loss::cross_entropy;
use crate::train::{Optimizer, OptimizerKind};
use crate::util::{peak_rss_bytes, reset_peak_rss};
use crate::zoo;
use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::time::Instant;

/// The workloads, in report order.
pub const WORKLOADS: &[&str] = &[
    "resnet20_train_b64",
    "resnet20_infer_b64",
    "resnet20_infer_b1",
    "mlp_train_b128",
    "resnet56_dense_infer_b64",
    "resnet56_l1half_infer_b64",
    "resnet56_l1half_r8_infer_b64",
    "sparse_resnet20_dense_b1",
    "sparse_resnet20_dense_b64",
    "sparse_resnet20_s50_b1",
    "sparse_resnet20_s50_b64",
    "sparse_resnet20_s70_b1",
    "sparse_resnet20_s70_b64",
    "sparse_resnet20_s90_b1",
    "sparse_resnet20_s90_b64",
    "sparse_resnet20_nm24_b1",
    "sparse_resnet20_nm24_b64",
    "sparse_mlp_dense_b1",
    "sparse_mlp_dense_b64",
    "sparse_mlp_s50_b1",
    "sparse_mlp_s50_b64",
    "sparse_mlp_s70_b1",
    "sparse_mlp_s70_b64",
    "sparse_mlp_s90_b1",
    "sparse_mlp_s90_b64",
    "sparse_mlp_nm24_b1",
    "sparse_mlp_nm24_b64",
    "sparse_mobilenetv2_dense_b1",
    "sparse_mobilenetv2_dense_b64",
    "sparse_mobilenetv2_s90_b1",
    "sparse_mobilenetv2_s90_b64",
];

/// A sparse inference workload: ResNet-20, MobileNetV2 (CIFAR) or MLP 784-1024-1024-10
/// with every conv/linear layer magnitude-pruned to the given level (dense, 50/70/90 %,
/// 2:4), eval mode with the sparse kernels enabled (layers below the density threshold
/// stay dense, and so do MobileNetV2's depthwise convs: the sparse pack takes ungrouped
/// layers — its 1×1 convs, the stem and the classifier).
fn sparse_workload(name: &str, warmup: usize, steps: usize) -> Result<BenchRow> {
    use crate::methods::pts::uniform_magnitude;
    use crate::sparse::layers::prunable_layers;
    use crate::sparse::mask::Pattern;
    let parts: Vec<&str> = name.split('_').collect();
    let (model, level, batch) = (parts[1], parts[2], &parts[3][1..]);
    let (g, dims) = match model {
        "resnet20" => (zoo::build("resnet20", 0)?, vec![3, 32, 32]),
        "mobilenetv2" => (zoo::build("mobilenetv2", 0)?, vec![3, 32, 32]),
        _ => (zoo::build("mlp:784-1024-1024-10", 0)?, vec![784]),
    };
    let layers = prunable_layers(&g);
    match level {
        "dense" => {}
        "nm24" => {
            uniform_magnitude(&g, &layers, 0.5, Pattern::NM { n: 2, m: 4 })?;
        }
        l => {
            let s = l[1..].parse::<f64>()? / 100.0;
            uniform_magnitude(&g, &layers, s, Pattern::Unstructured)?;
        }
    }
    let sparse = PlanOpts {
        sparse: Some(true),
        ..PlanOpts::default()
    };
    let plan = Plan::new(&g, Mode::Eval, &sparse)?;
    let packed = plan.sparse_layers();
    let b: usize = batch.parse()?;
    let (x, _) = data(b, &dims, 10)?;
    let mut row = time(name, warmup, if b == 1 { steps * 5 } else { steps }, || {
        plan.run(&g, &x, &Feeds::default()).map(|_| ())
    })?;
    row.name = format!("{name} ({packed}/{} sparse)", layers.len());
    Ok(row)
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct BenchRow {
    pub name: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub steps: usize,
    pub peak_rss_mb: f64,
}

fn time<F: FnMut() -> Result<()>>(
    name: &str,
    warmup: usize,
    steps: usize,
    mut f: F,
) -> Result<BenchRow> {
    reset_peak_rss();
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(steps);
    for _ in 0..steps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(BenchRow {
        name: name.to_string(),
        median_ms: t[t.len() / 2],
        min_ms: t[0],
        max_ms: t[t.len() - 1],
        steps,
        peak_rss_mb: peak_rss_bytes().unwrap_or(0) as f64 / 1e6,
    })
}

/// Eval-mode inference as deployed: the plan (fusion, folded batch norm) is built once,
/// outside the timed steps, as an inference session would.
/// Runs `g` in eval mode (planned once) on one tensor per graph input.
fn infer(g: &Graph) -> Result<impl Fn(&[Tensor]) -> Result<()> + '_> {
    let plan = Plan::new(g, Mode::Eval, &PlanOpts::default())?;
    Ok(move |xs: &[Tensor]| {
        let refs: Vec<&Tensor> = xs.iter().collect();
        plan.run_inputs(g, &refs, &Feeds::default()).map(|_| ())
    })
}

fn train_step(g: &Graph, opt: &mut Optimizer, x: &Tensor, y: &Tensor) -> Result<()> {
    let logits = forward_with(g, x, &ForwardOpts::new(Mode::Train))?
        .outputs
        .swap_remove(0);
    let loss = cross_entropy(&logits, y, 0.0)?;
    let grads = crate::exec::in_pool(|| loss.backward())?;
    opt.step(&g.trainable(), &grads, 0.01)
}

/// A random batch of `n` inputs of shape `dims` and labels cycling through `classes`.
fn data(n: usize, dims: &[usize], classes: usize) -> Result<(Tensor, Tensor)> {
    let mut d = vec![n];
    d.extend(dims);
    let x = Tensor::randn(0f32, 1f32, d, &Device::Cpu)?;
    let y = Tensor::from_vec(
        (0..n as u32)
            .map(|i| i % classes.max(1) as u32)
            .collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )?;
    Ok((x, y))
}

/// Runs the workloads whose names contain `filter` (all if empty) in this process.
pub fn run(
    steps: usize,
    warmup: usize,
    filter: &str,
    mut report: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let sgd = || {
        Optimizer::new(
            OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            5e-4,
        )
    };
    let mut push = |r: BenchRow| {
        report(&r);
        rows.push(r);
    };
    let want = |n: &str| filter.is_empty() || n.contains(filter);
    for w in WORKLOADS
        .iter()
        .filter(|w| w.starts_with("sparse_") && want(w))
    {
        push(sparse_workload(w, warmup, steps)?);
    }
    if !WORKLOADS
        .iter()
        .any(|w| !w.starts_with("sparse_") && want(w))
    {
        return Ok(rows);
    }
    let r20 = zoo::build("resnet20", 0)?;
    if want("resnet20_train_b64") {
        let (x, y) = data(64, &[3, 32, 32], 10)?;
        let mut opt = sgd();
        push(time("resnet20_train_b64", warmup, steps, || {
            train_step(&r20, &mut opt, &x, &y)
        })?);
    }
    if want("resnet20_infer_b64") {
        let (x, _) = data(64, &[3, 32, 32], 10)?;
        let f = infer(&r20)?;
        push(time("resnet20_infer_b64", warmup, steps, || {
            f(std::slice::from_ref(&x))
        })?);
    }
    if want("resnet20_infer_b1") {
        let (x, _) = data(1, &[3, 32, 32], 10)?;
        let f = infer(&r20)?;
        push(time("resnet20_infer_b1", warmup, steps * 5, || {
            f(std::slice::from_ref(&x))
        })?);
    }
    if want("mlp_train_b128") {
        let mlp = zoo::build("mlp:784-1024-1024-10", 0)?;
        let (x, y) = data(128, &[784], 10)?;
        let mut opt = sgd();
        push(time("mlp_train_b128", warmup, steps, || {
            train_step(&mlp, &mut opt, &x, &y)
        })?);
    }
    if want("resnet56_dense_infer_b64")
        || want("resnet56_l1half_infer_b64")
        || want("resnet56_l1half_r8_infer_b64")
    {
        let r56 = zoo::build("resnet56", 0)?;
        let (x, _) = data(64, &[3, 32, 32], 10)?;
        if want("resnet56_dense_infer_b64") {
            let f = infer(&r56)?;
            push(time("resnet56_dense_infer_b64", warmup, steps, || {
                f(std::slice::from_ref(&x))
            })?);
        }
        // ResNet-56 with L1 (local) structured pruning to at most 50 % of its MACs, with
        // free widths and with widths rounded to multiples of 8.
        let groups = prune::dependency_groups(&r56)?;
        let dense_macs = crate::graph::cost::cost(&r56)?.total_macs as f64;
        for (name, round_to) in [
            ("resnet56_l1half_infer_b64", 1),
            ("resnet56_l1half_r8_infer_b64", 8),
        ] {
            if !want(name) {
                continue;
            }
            let cfg = prune::PlanConfig {
                criterion: prune::Criterion::L1,
                scope: prune::Scope::Local,
                budget: prune::Budget::Macs(0.5),
                round_to,
                lamp: false,
                overrides: vec![],
                seed: 0,
            };
            let removal = prune::plan(&r56, &groups, &cfg, None)?;
            let small = prune::remove_units(&r56, &groups, &removal)?;
            let frac = crate::graph::cost::cost(&small)?.total_macs as f64 / dense_macs;
            let f = infer(&small)?;
            let mut row = time(name, warmup, steps, || f(std::slice::from_ref(&x)))?;
            row.name = format!("{name} ({:.1}% MACs)", 100.0 * frac);
            push(row);
        }
    }
    Ok(rows)
}
