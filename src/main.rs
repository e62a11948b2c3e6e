//! The `lopper` command line. Every failure prints one clear error line and exits 1.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use lopper::data::{self, Dataset, Split};
use lopper::graph::{cost, io, Graph};
use lopper::train::{self, OptimizerKind, Schedule, TrainConfig, TrainOpts};
use lopper::zoo;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "lopper",
    version,
    about = "Prune trained neural networks and measure accuracy, MACs and latency"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a small ResNet on the embedded 8x8 digits and print the summary (~1 minute).
    Demo {
        #[arg(long, default_value_t = 30)]
        epochs: usize,
        /// Print results as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Train a model (zoo name or saved model) on a dataset.
    Train(TrainArgs),
    /// Evaluate a model on a dataset's test split.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        #[arg(long)]
        json: bool,
    },
    /// Print the per-node table (shape, params, MACs) and totals.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        json: bool,
    },
    /// Structured pruning: remove channels by a criterion under a budget, fine-tune, report.
    Prune(Box<PruneArgs>),
    /// Prune each dependency group alone at several ratios; table + SVG chart.
    Sensitivity {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, default_value = "l1")]
        method: String,
        /// Comma-separated ratios of each group's channels to remove.
        #[arg(long, default_value = "0.25,0.5,0.75")]
        ratios: String,
        #[arg(long, default_value_t = 1000)]
        eval_limit: usize,
        #[arg(long, default_value_t = 512)]
        calib: usize,
        /// Write the chart here (SVG).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Time the reference workloads (median of N steps after warm-up, peak RSS).
    Bench {
        #[arg(long, default_value_t = 30)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Only workloads whose name contains this.
        #[arg(long, default_value = "")]
        filter: String,
        /// Use candle's own ops instead of lopper's kernels (for comparison).
        #[arg(long)]
        reference: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Zoo name (e.g. resnet20, mlp:784-300-10, digit_recognizer_cnn) or a saved model file.
    model: String,
    /// Plain safetensors weights (PyTorch names) to load into a zoo model.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed of the initial weights of a zoo model.
    #[arg(long, default_value_t = 0)]
    init_seed: u64,
}

#[derive(Args, Clone)]
struct DataArgs {
    /// Dataset: digits (embedded), mnist, fashion-mnist, cifar10, or a path to a JPEG tree/tar.
    #[arg(long, default_value = "digits")]
    data: String,
    /// Data directory (default: $LOPPER_DATA or ../shared/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct PruneArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Criterion: random, l1, l2, fpgm, bn-scale, taylor, act-mean, apoz.
    #[arg(long, default_value = "l1")]
    method: String,
    /// local (same ratio per group) or global (one ranking).
    #[arg(long, default_value = "local")]
    scope: String,
    /// LAMP-normalise scores for global ranking.
    #[arg(long)]
    lamp: bool,
    /// Remove this fraction of prunable channels.
    #[arg(long, conflicts_with_all = ["target_macs", "target_params"])]
    ratio: Option<f64>,
    /// Keep at most this fraction of the dense MACs (e.g. 0.5).
    #[arg(long, conflicts_with = "target_params")]
    target_macs: Option<f64>,
    /// Keep at most this fraction of the dense parameters.
    #[arg(long)]
    target_params: Option<f64>,
    /// Kept widths are multiples of this.
    #[arg(long, default_value_t = 1)]
    round_to: usize,
    /// Per-layer ratio override NODE=RATIO (repeatable).
    #[arg(long = "override")]
    overrides: Vec<String>,
    /// Samples of the training set for data-driven criteria.
    #[arg(long, default_value_t = 512)]
    calib: usize,
    #[arg(long, default_value_t = 0)]
    finetune_epochs: usize,
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Distil from the dense model while fine-tuning (weight of the KD term).
    #[arg(long)]
    distill: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate on only this many test samples (faster, less precise).
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Iterative pruning in this many steps (1 = one-shot).
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Fine-tuning epochs between iterative steps.
    #[arg(long, default_value_t = 1)]
    step_epochs: usize,
    /// Fine-tune on only this many training samples (seeded subset).
    #[arg(long)]
    train_limit: Option<usize>,
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// sgd or adamw.
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long)]
    no_nesterov: bool,
    /// cosine, step:E1,E2[:gamma], or constant.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    #[arg(long, default_value_t = 0.0)]
    warmup_epochs: f64,
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Random-crop padding and horizontal flip (default: on for cifar10).
    #[arg(long)]
    augment: Option<bool>,
    /// Use only this many training samples (seeded subset).
    #[arg(long)]
    limit: Option<usize>,
    /// Write the trained model here.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Checkpoint file, written after every epoch.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue from --checkpoint if it exists.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    json: bool,
}

fn shared_model(name: &str, dir: Option<&Path>) -> Option<(String, PathBuf)> {
    match name {
        "digit_recognizer_cnn" => {
            let d = dir.map(Path::to_path_buf).unwrap_or_else(data::data_dir);
            Some((
                "digit_cnn".into(),
                d.join("models/digit_recognizer_cnn.safetensors"),
            ))
        }
        _ => None,
    }
}

/// A saved model file, a shared pretrained model, or a zoo model shaped for `data`.
fn resolve_model(m: &ModelArgs, data: Option<&Dataset>, dir: Option<&Path>) -> Result<Graph> {
    let p = Path::new(&m.model);
    if p.is_file() {
        return io::load(p);
    }
    if m.model.ends_with(".safetensors") || m.model.contains('/') {
        bail!("model file {} does not exist", m.model);
    }
    let (spec, weights) = match shared_model(&m.model, dir) {
        Some((s, w)) => (s, Some(m.weights.clone().unwrap_or(w))),
        None => (m.model.clone(), m.weights.clone()),
    };
    let mut spec = spec;
    if let Some(d) = data {
        if !spec.starts_with("mlp:") && !spec.contains('@') {
            spec = format!("{spec}@{}x{}x{}", d.shape[0], d.shape[1], d.shape[2]);
        }
        if !spec.contains('#') && !spec.starts_with("mlp:") {
            spec = format!("{spec}#{}", d.num_classes);
        }
    }
    let g = zoo::build(&spec, m.init_seed)?;
    if let Some(w) = weights {
        io::load_weights(&g, &w)?;
    }
    Ok(g)
}

fn load_split(d: &DataArgs, split: Split) -> Result<Dataset> {
    data::load(&d.data, split, d.data_dir.as_deref())
}

fn parse_schedule(s: &str) -> Result<Schedule> {
    Ok(match s {
        "cosine" => Schedule::Cosine { min_lr: 0.0 },
        "constant" => Schedule::Constant,
        _ if s.starts_with("step:") => {
            let mut parts = s[5..].split(':');
            let ms: Result<Vec<usize>, _> = parts
                .next()
                .unwrap_or("")
                .split(',')
                .map(|x| x.parse())
                .collect();
            let gamma = parts
                .next()
                .map(|g| g.parse::<f64>())
                .transpose()
                .context("bad step gamma")?
                .unwrap_or(0.1);
            Schedule::Step {
                milestones: ms.with_context(|| format!("bad milestones in '{s}'"))?,
                gamma,
            }
        }
        _ => bail!("unknown schedule '{s}' (cosine, constant, step:E1,E2[:gamma])"),
    })
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let mut train_ds = load_split(&a.data, Split::Train)?;
    if let Some(n) = a.limit {
        train_ds = train_ds.sample(n, a.seed)?;
    }
    let test_ds = load_split(&a.data, Split::Test)?;
    let g = resolve_model(&a.model, Some(&train_ds), a.data.data_dir.as_deref())?;
    let aug = a.augment.unwrap_or(a.data.data == "cifar10");
    let optimizer = match a.optimizer.as_str() {
        "sgd" => OptimizerKind::Sgd {
            momentum: a.momentum,
            nesterov: !a.no_nesterov,
        },
        "adamw" => OptimizerKind::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        o => bail!("unknown optimizer '{o}' (sgd, adamw)"),
    };
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: a.weight_decay,
        optimizer,
        schedule: parse_schedule(&a.schedule)?,
        warmup_epochs: a.warmup_epochs,
        label_smoothing: a.label_smoothing,
        seed: a.seed,
        crop_pad: if aug { 4 } else { 0 },
        hflip: aug,
    };
    if a.resume && a.checkpoint.is_none() {
        bail!("--resume needs --checkpoint FILE");
    }
    if !a.resume {
        if let Some(c) = &a.checkpoint {
            if c.exists() {
                bail!(
                    "checkpoint {} exists; pass --resume to continue it or remove it",
                    c.display()
                );
            }
        }
    }
    let opts = TrainOpts {
        progress: !a.json,
        checkpoint: a.checkpoint.clone(),
        test: Some(&test_ds),
        ..Default::default()
    };
    let res = train::train(&g, &train_ds, &cfg, &opts)?;
    let ev = train::evaluate(&g, &test_ds, 500)?;
    if let Some(o) = &a.output {
        io::save(&g, o)?;
    }
    let c = cost::cost(&g)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": a.model.model, "data": a.data.data, "config": cfg, "history": res.history,
                "test": ev, "seconds": res.seconds, "params": c.total_params, "macs": c.total_macs,
                "output": a.output,
            }))?
        );
    } else {
        println!(
            "trained {} on {} for {} epochs in {:.1}s: test top-1 {} top-5 {} ({} params, {} MACs){}",
            a.model.model,
            a.data.data,
            a.epochs,
            res.seconds,
            pct(ev.top1),
            pct(ev.top5),
            cost::human(c.total_params),
            cost::human(c.total_macs),
            a.output.as_ref().map(|o| format!(", saved to {}", o.display())).unwrap_or_default()
        );
    }
    Ok(())
}

fn cmd_demo(epochs: usize, json_out: bool) -> Result<()> {
    let tr = data::load("digits", Split::Train, None)?;
    let te = data::load("digits", Split::Test, None)?;
    let g = zoo::build("resnet8@1x8x8#10", 0)?;
    let c = cost::cost(&g)?;
    if !json_out {
        println!(
            "lopper demo: ResNet-8 on the embedded 8x8 digits ({} train / {} test images)\n",
            tr.len(),
            te.len()
        );
        print!("{}", c.table());
        println!();
    }
    let before = train::evaluate(&g, &te, 500)?;
    let cfg = TrainConfig {
        epochs,
        batch_size: 64,
        lr: 0.05,
        weight_decay: 5e-4,
        crop_pad: 1,
        ..Default::default()
    };
    let t = Instant::now();
    let res = train::train(
        &g,
        &tr,
        &cfg,
        &TrainOpts {
            progress: !json_out,
            test: Some(&te),
            ..Default::default()
        },
    )?;
    let after = train::evaluate(&g, &te, 500)?;
    let secs = t.elapsed().as_secs_f64();
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": "resnet8@1x8x8", "data": "digits", "params": c.total_params, "macs": c.total_macs,
                "before": before, "after": after, "seconds": secs, "history": res.history,
            }))?
        );
    } else {
        println!(
            "\nsummary: test accuracy {} -> {} after {} epochs in {:.1}s; {} params, {} MACs per image",
            pct(before.top1),
            pct(after.top1),
            epochs,
            secs,
            cost::human(c.total_params),
            cost::human(c.total_macs)
        );
    }
    Ok(())
}

fn cmd_prune(a: PruneArgs) -> Result<()> {
    use lopper::prune::{self, report, Budget, Criterion, PlanConfig, Scope};
    let criterion = Criterion::parse(&a.method)?;
    let scope = match a.scope.as_str() {
        "local" => Scope::Local,
        "global" => Scope::Global,
        s => bail!("unknown scope '{s}' (local, global)"),
    };
    let budget = match (a.ratio, a.target_macs, a.target_params) {
        (Some(r), _, _) => Budget::Ratio(r),
        (_, Some(m), _) => Budget::Macs(m),
        (_, _, Some(p)) => Budget::Params(p),
        _ => bail!("give a budget: --ratio, --target-macs or --target-params"),
    };
    match budget {
        Budget::Ratio(r) if !(0.0..1.0).contains(&r) => bail!("--ratio {r} must be in [0, 1)"),
        Budget::Macs(f) | Budget::Params(f) if !(f > 0.0 && f <= 1.0) => {
            bail!("target fraction {f} must be in (0, 1]")
        }
        _ => {}
    }
    let overrides = a
        .overrides
        .iter()
        .map(|o| {
            let (n, r) = o
                .split_once('=')
                .with_context(|| format!("override '{o}' must be NODE=RATIO"))?;
            Ok((
                n.to_string(),
                r.parse::<f64>()
                    .with_context(|| format!("bad ratio in override '{o}'"))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut train_ds = load_split(&a.data, Split::Train)?;
    if let Some(n) = a.train_limit {
        train_ds = train_ds.sample(n.min(train_ds.len()), a.seed)?;
    }
    let mut test_ds = load_split(&a.data, Split::Test)?;
    if let Some(n) = a.eval_limit {
        test_ds = test_ds.sample(n.min(test_ds.len()), 0)?;
    }
    let dense = resolve_model(&a.model, Some(&train_ds), a.data.data_dir.as_deref())?;
    let log = |m: String| {
        if !a.json {
            eprintln!("{m}");
        }
    };
    let acc_dense = train::evaluate(&dense, &test_ds, 500)?.top1;
    log(format!("dense: top-1 {}", pct(acc_dense)));
    // One-shot (steps = 1) or iterative: each step moves the budget a step closer to the
    // target, relative to the original dense model, with optional fine-tuning between.
    let t = Instant::now();
    let steps = a.steps.max(1);
    let dense_cost = cost::cost(&dense)?;
    let mut current = dense.deep_clone()?;
    let mut between_secs = 0.0;
    for step in 1..=steps {
        let frac = step as f64 / steps as f64;
        let now = cost::cost(&current)?;
        let step_budget = match budget {
            Budget::Ratio(r) => Budget::Ratio(1.0 - (1.0 - r).powf(1.0 / steps as f64)),
            Budget::Macs(f) => Budget::Macs(
                ((1.0 - (1.0 - f) * frac) * dense_cost.total_macs as f64 / now.total_macs as f64)
                    .min(1.0),
            ),
            Budget::Params(f) => Budget::Params(
                ((1.0 - (1.0 - f) * frac) * dense_cost.total_params as f64
                    / now.total_params as f64)
                    .min(1.0),
            ),
        };
        let groups = prune::dependency_groups(&current)?;
        let stats = if criterion.needs_data() {
            let calib = train_ds.sample(a.calib.min(train_ds.len()), a.seed)?;
            Some(prune::collect_stats(&current, &calib, a.calib, 64)?)
        } else {
            None
        };
        let cfg = PlanConfig {
            criterion,
            scope,
            budget: step_budget,
            round_to: a.round_to.max(1),
            lamp: a.lamp,
            overrides: overrides.clone(),
            seed: a.seed + step as u64,
        };
        let removal = prune::plan(&current, &groups, &cfg, stats.as_ref())
            .with_context(|| format!("pruning step {step}/{steps}"))?;
        current = prune::remove_units(&current, &groups, &removal)?;
        if step < steps && a.step_epochs > 0 {
            let tb = Instant::now();
            let tcfg = TrainConfig {
                epochs: a.step_epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                seed: a.seed + step as u64,
                ..Default::default()
            };
            train::train(
                &current,
                &train_ds,
                &tcfg,
                &TrainOpts {
                    progress: !a.json,
                    ..Default::default()
                },
            )?;
            between_secs += tb.elapsed().as_secs_f64();
            log(format!(
                "step {step}/{steps}: {} MACs, top-1 {}",
                cost::human(cost::cost(&current)?.total_macs),
                pct(train::evaluate(&current, &test_ds, 500)?.top1)
            ));
        }
    }
    let pruned = current;
    let prune_seconds = t.elapsed().as_secs_f64() - between_secs;
    let acc_pruned = train::evaluate(&pruned, &test_ds, 500)?.top1;
    log(format!(
        "pruned in {prune_seconds:.1}s: top-1 {}",
        pct(acc_pruned)
    ));
    let mut acc_ft = None;
    let mut ft_secs = 0.0;
    if a.finetune_epochs > 0 {
        let tcfg = TrainConfig {
            epochs: a.finetune_epochs,
            batch_size: a.batch_size,
            lr: a.lr,
            crop_pad: if a.data.data == "cifar10" { 4 } else { 0 },
            hflip: a.data.data == "cifar10",
            seed: a.seed,
            ..Default::default()
        };
        let teacher = a.distill.map(|alpha| train::Teacher {
            graph: &dense,
            temperature: 4.0,
            alpha,
        });
        let opts = TrainOpts {
            progress: !a.json,
            teacher,
            ..Default::default()
        };
        let r = train::train(&pruned, &train_ds, &tcfg, &opts)?;
        ft_secs = r.seconds;
        let acc = train::evaluate(&pruned, &test_ds, 500)?.top1;
        log(format!(
            "fine-tuned {} epochs in {ft_secs:.1}s: top-1 {}",
            a.finetune_epochs,
            pct(acc)
        ));
        acc_ft = Some(acc);
    }
    let ds = report::snapshot(&dense, 10)?;
    let ps = report::snapshot(&pruned, 10)?;
    let rep = report::PruneReport {
        method: a.method.clone(),
        scope: a.scope.clone(),
        budget: format!("{budget:?}"),
        macs_ratio: ps.macs as f64 / ds.macs as f64,
        params_ratio: ps.params as f64 / ds.params as f64,
        dense: ds,
        pruned: ps,
        acc_dense: Some(acc_dense),
        acc_pruned: Some(acc_pruned),
        acc_finetuned: acc_ft,
        prune_seconds,
        finetune_seconds: ft_secs,
        widths: report::widths(&dense, &pruned),
    };
    if let Some(o) = &a.output {
        io::save(&pruned, o)?;
        let rp = o.with_extension("report.json");
        lopper::util::atomic_write(&rp, serde_json::to_string_pretty(&rep)?.as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "{} ({}, {}): MACs {} -> {} ({:.2}x fewer), params {} -> {}, latency b1 {:.2} -> {:.2} ms, b64 {:.1} -> {:.1} ms",
            a.method,
            a.scope,
            rep.budget,
            cost::human(rep.dense.macs),
            cost::human(rep.pruned.macs),
            1.0 / rep.macs_ratio,
            cost::human(rep.dense.params),
            cost::human(rep.pruned.params),
            rep.dense.latency_b1_ms,
            rep.pruned.latency_b1_ms,
            rep.dense.latency_b64_ms,
            rep.pruned.latency_b64_ms
        );
        println!(
            "accuracy: dense {} -> pruned {}{}",
            pct(acc_dense),
            pct(acc_pruned),
            acc_ft
                .map(|x| format!(" -> fine-tuned {}", pct(x)))
                .unwrap_or_default()
        );
        for w in rep.widths.iter().filter(|w| w.before != w.after) {
            println!("  {:<24} {:>5} -> {:>5}", w.node, w.before, w.after);
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo { epochs, json } => cmd_demo(epochs, json),
        Cmd::Train(a) => cmd_train(a),
        Cmd::Prune(a) => cmd_prune(*a),
        Cmd::Sensitivity {
            model,
            data: d,
            method,
            ratios,
            eval_limit,
            calib,
            output,
            json: j,
        } => {
            use lopper::prune::{self, Criterion};
            let crit = Criterion::parse(&method)?;
            let ratios: Vec<f64> = ratios
                .split(',')
                .map(|r| {
                    r.trim()
                        .parse::<f64>()
                        .with_context(|| format!("bad ratio '{r}'"))
                })
                .collect::<Result<_>>()?;
            if let Some(r) = ratios.iter().find(|r| !(0.0..1.0).contains(*r)) {
                bail!("ratio {r} must be in [0, 1)");
            }
            let train_ds = load_split(&d, Split::Train)?;
            let test = load_split(&d, Split::Test)?;
            let test = test.sample(eval_limit.min(test.len()), 0)?;
            let g = resolve_model(&model, Some(&train_ds), d.data_dir.as_deref())?;
            let groups = prune::dependency_groups(&g)?;
            let stats = if crit.needs_data() {
                Some(prune::collect_stats(
                    &g,
                    &train_ds.sample(calib.min(train_ds.len()), 0)?,
                    calib,
                    64,
                )?)
            } else {
                None
            };
            let dense = train::evaluate(&g, &test, 500)?.top1;
            let rows = prune::sensitivity(&g, &groups, &test, crit, &ratios, stats.as_ref())?;
            if let Some(o) = &output {
                let series: Vec<lopper::svg::Series> = rows
                    .iter()
                    .map(|r| lopper::svg::Series {
                        name: format!("{} ({})", r.layer, r.width),
                        points: std::iter::once((0.0, 100.0 * dense))
                            .chain(
                                r.ratios
                                    .iter()
                                    .zip(&r.accuracy)
                                    .map(|(&x, &y)| (x, 100.0 * y)),
                            )
                            .collect(),
                    })
                    .collect();
                let svg = lopper::svg::line_chart(
                    &format!("Sensitivity ({method}): {}", model.model),
                    "fraction of the group's channels removed",
                    "top-1 accuracy (%)",
                    &series,
                );
                lopper::util::atomic_write(o, svg.as_bytes())?;
            }
            if j {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"dense": dense, "rows": rows}))?
                );
            } else {
                println!("dense top-1 {}", pct(dense));
                print!("{:<24} {:>6}", "group (first layer)", "width");
                for r in &ratios {
                    print!(" {:>8}", format!("-{:.0}%", 100.0 * r));
                }
                println!();
                for r in &rows {
                    print!("{:<24} {:>6}", r.layer, r.width);
                    for a in &r.accuracy {
                        print!(" {:>8}", format!("{:+.2}", 100.0 * (a - dense)));
                    }
                    println!();
                }
            }
            Ok(())
        }
        Cmd::Eval {
            model,
            data: d,
            batch_size,
            json: j,
        } => {
            let ds = load_split(&d, Split::Test)?;
            let g = resolve_model(&model, Some(&ds), d.data_dir.as_deref())?;
            let t = Instant::now();
            let ev = train::evaluate(&g, &ds, batch_size)?;
            let secs = t.elapsed().as_secs_f64();
            if j {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"model": model.model, "data": d.data, "result": ev, "seconds": secs})
                    )?
                );
            } else {
                println!(
                    "{} on {} test: top-1 {} ({}/{}), top-5 {}, loss {:.4}, {:.1}s",
                    model.model,
                    d.data,
                    pct(ev.top1),
                    ev.correct,
                    ev.n,
                    pct(ev.top5),
                    ev.loss,
                    secs
                );
            }
            Ok(())
        }
        Cmd::Inspect { model, json: j } => {
            let g = resolve_model(&model, None, None)?;
            let c = cost::cost(&g)?;
            if j {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print!("{}", c.table());
            }
            Ok(())
        }
        Cmd::Bench {
            steps,
            warmup,
            filter,
            reference,
            json: j,
        } => {
            lopper::kernels::use_reference_ops(reference);
            let print = |r: &lopper::bench::BenchRow| {
                if !j {
                    println!(
                        "{:<22} {:>10.2} {:>10.2} {:>10.2} {:>6} {:>12.0}",
                        r.name, r.median_ms, r.min_ms, r.max_ms, r.steps, r.peak_rss_mb
                    );
                }
            };
            if !j {
                println!(
                    "{:<22} {:>10} {:>10} {:>10} {:>6} {:>12}",
                    "workload", "median ms", "min ms", "max ms", "steps", "peak RSS MB"
                );
            }
            let rows = if filter.is_empty() {
                // One process per workload, so each peak RSS is that workload's own.
                let exe = std::env::current_exe()?;
                let mut rows = Vec::new();
                for w in lopper::bench::WORKLOADS {
                    let mut cmd = std::process::Command::new(&exe);
                    cmd.args([
                        "bench",
                        "--json",
                        "--filter",
                        w,
                        "--steps",
                        &steps.to_string(),
                        "--warmup",
                        &warmup.to_string(),
                    ]);
                    if reference {
                        cmd.arg("--reference");
                    }
                    let out = cmd
                        .output()
                        .with_context(|| format!("cannot run {}", exe.display()))?;
                    if !out.status.success() {
                        bail!("bench {w} failed: {}", String::from_utf8_lossy(&out.stderr));
                    }
                    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                    let r: Vec<lopper::bench::BenchRow> =
                        serde_json::from_value(v["rows"].clone())?;
                    r.iter().for_each(print);
                    rows.extend(r);
                }
                rows
            } else {
                lopper::bench::run(steps, warmup, &filter, print)?
            };
            if j {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "backend": if reference { "candle" } else { "lopper" },
                        "threads": rayon::current_num_threads(),
                        "rows": rows
                    }))?
                );
            }
            Ok(())
        }
    }
}

fn main() {
    lopper::util::tune_runtime();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
