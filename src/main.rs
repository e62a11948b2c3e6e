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

mod cmd_prune;
mod cmd_sparsify;
mod cmd_stamp;
use cmd_prune::{cmd_prune, PruneArgs};
use cmd_sparsify::{cmd_sparsify, SparsifyArgs};

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
    /// Run a model (eval mode) on raw little-endian f32 inputs `[B, ...input shape]`; writes
    /// the first output as raw f32 (for comparisons with other runtimes).
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Convert a model between formats: lopper safetensors (.safetensors) and ONNX (.onnx).
    Convert {
        #[command(flatten)]
        model: ModelArgs,
        /// Output file; the extension picks the format.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Structured pruning: remove channels by a criterion under a budget, fine-tune, report.
    Prune(Box<PruneArgs>),
    /// Post-training sparsity from a small calibration set: magnitude, global, wanda, pot,
    /// unipts (unstructured or N:M); saves the model with compressed sparse weights.
    Sparsify(Box<SparsifyArgs>),
    /// STAMP: meta-train the set encoder and mask generator on a reference dataset.
    Stamp {
        #[command(subcommand)]
        cmd: StampCmd,
    },
    /// Run a TOML recipe (data, dense model, methods × budgets × seeds), resuming from
    /// finished steps; writes report.json and a self-contained report.html.
    Run {
        recipe: PathBuf,
        /// Output directory (default runs/<recipe name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Data directory passed to every step (default: $LOPPER_DATA or ../shared/data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
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
    /// Input scaling: normalized (per-channel mean/std), unit ([0, 1]) or raw (0..255),
    /// e.g. raw for models that expect raw pixels such as mnist-8.onnx.
    #[arg(long, default_value = "normalized")]
    input_scale: String,
    /// Only these classes (comma-separated indices), relabelled 0.. in the given order.
    #[arg(long)]
    classes: Option<String>,
}

#[derive(Subcommand)]
enum StampCmd {
    /// Meta-train over class-subset tasks of the reference data (the model is the network
    /// pretrained on it); writes the generator.
    MetaTrain(Box<cmd_stamp::MetaTrainArgs>),
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
        if p.extension().is_some_and(|e| e == "onnx") {
            return lopper::onnx::load(p);
        }
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

/// Saves as ONNX for `.onnx` paths, else in lopper's safetensors format (both atomic).
fn save_model(g: &Graph, path: &Path) -> Result<()> {
    if path.extension().is_some_and(|e| e == "onnx") {
        lopper::onnx::save(g, path)
    } else {
        io::save(g, path)
    }
}

/// Writes a result model and its report beside it (`OUT.report.json`), then prints the
/// report if `json`. Both files are written atomically.
fn write_outputs(
    g: &Graph,
    output: Option<&Path>,
    report: &impl serde::Serialize,
    json: bool,
) -> Result<()> {
    if let Some(o) = output {
        save_model(g, o)?;
        let rp = o.with_extension("report.json");
        lopper::util::atomic_write(&rp, serde_json::to_string_pretty(report)?.as_bytes())?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

fn load_split(d: &DataArgs, split: Split) -> Result<Dataset> {
    let mut ds = data::load(&d.data, split, d.data_dir.as_deref())?;
    let c = ds.shape[0];
    match d.input_scale.as_str() {
        "normalized" => {}
        "unit" => (ds.mean, ds.std) = (vec![0.0; c], vec![1.0; c]),
        "raw" => (ds.mean, ds.std, ds.max_value) = (vec![0.0; c], vec![1.0; c], 1.0),
        s => bail!("unknown --input-scale '{s}' (normalized, unit, raw)"),
    }
    if let Some(list) = &d.classes {
        let cls: Vec<usize> = list
            .split(',')
            .map(|c| {
                c.trim()
                    .parse()
                    .with_context(|| format!("--classes: '{c}' is not a class index"))
            })
            .collect::<Result<_>>()?;
        ds = ds.class_subset(&cls)?;
    }
    Ok(ds)
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
        save_model(&g, o)?;
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

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo { epochs, json } => cmd_demo(epochs, json),
        Cmd::Train(a) => cmd_train(a),
        Cmd::Prune(a) => cmd_prune(*a),
        Cmd::Sparsify(a) => cmd_sparsify(*a),
        Cmd::Stamp {
            cmd: StampCmd::MetaTrain(a),
        } => cmd_stamp::meta_train(*a),
        Cmd::Run {
            recipe,
            out,
            data_dir,
            json: j,
        } => {
            let r = lopper::recipe::load(&recipe)?;
            let out = match out {
                Some(o) => o,
                None => lopper::recipe::run::default_out(&r)?,
            };
            let opts = lopper::recipe::run::RunOpts {
                out: out.clone(),
                exe: std::env::current_exe()?,
                data_dir,
                progress: !j,
            };
            let rep = lopper::recipe::run::run(&r, &opts)?;
            if j {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                println!(
                    "{}: {} steps ({} run, {} cached) in {:.0}s; report: {}",
                    r.name,
                    rep.steps.len(),
                    rep.ran.len(),
                    rep.steps.len() - rep.ran.len(),
                    rep.seconds,
                    out.join("report.html").display()
                );
                for s in &rep.steps {
                    println!(
                        "  {:<36} top-1 {:>7}  MACs {:>7}",
                        s.step.id,
                        lopper::recipe::html::step_accuracy(&s.report).map_or("—".into(), pct),
                        lopper::recipe::html::step_macs(&s.report).map_or("—".into(), pct)
                    );
                }
            }
            Ok(())
        }
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
        Cmd::Forward {
            model,
            input,
            output,
        } => {
            let g = resolve_model(&model, None, None)?;
            let bytes =
                std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
            let per: usize = g.input_shape().iter().product();
            if bytes.len() % 4 != 0 || bytes.is_empty() || (bytes.len() / 4) % per != 0 {
                bail!(
                    "{}: {} bytes are not a whole number of f32 samples of shape {:?}",
                    input.display(),
                    bytes.len(),
                    g.input_shape()
                );
            }
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let mut dims = vec![v.len() / per];
            dims.extend(g.input_shape());
            let x = candle_core::Tensor::from_vec(v, dims, &candle_core::Device::Cpu)?;
            let y = lopper::exec::forward(&g, &x, lopper::exec::Mode::Eval)?;
            let out: Vec<u8> = y
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|f| f.to_le_bytes())
                .collect();
            lopper::util::atomic_write(&output, &out)
        }
        Cmd::Convert { model, output } => {
            let g = resolve_model(&model, None, None)?;
            save_model(&g, &output)?;
            eprintln!("wrote {}", output.display());
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
