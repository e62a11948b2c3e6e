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

mod argcheck;
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
        #[arg(long, default_value_t = 30, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
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
        #[arg(long, default_value_t = 500, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
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
        #[arg(long, default_value_t = 1000, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
        eval_limit: usize,
        #[arg(long, default_value_t = 512, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
        calib: usize,
        /// Write the chart here (SVG).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Time the reference workloads (median of N steps after warm-up, peak RSS).
    Bench {
        #[arg(long, default_value_t = 30, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
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
    /// Dataset: digits (embedded), mnist, fashion-mnist, cifar10, or a path to a JPEG
    /// folder or tar with train/ and test/ folders of <class>/*.jpg (else --holdout).
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
    /// For an image folder without train/ and test/ folders: hold out this fraction of
    /// its images (a seeded random choice) as the test split.
    #[arg(long, value_parser = argcheck::unit_open, allow_negative_numbers = true)]
    holdout: Option<f64>,
    /// Seed of the --holdout choice.
    #[arg(long, default_value_t = 0)]
    holdout_seed: u64,
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
    #[arg(long, default_value_t = 10, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    epochs: usize,
    #[arg(long, default_value_t = 128, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
    batch_size: usize,
    #[arg(long, default_value_t = 0.1, value_parser = argcheck::positive, allow_negative_numbers = true)]
    lr: f64,
    #[arg(long, default_value_t = 5e-4, value_parser = argcheck::non_negative, allow_negative_numbers = true)]
    weight_decay: f64,
    /// sgd or adamw.
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    #[arg(long, default_value_t = 0.9, value_parser = argcheck::unit_half_open, allow_negative_numbers = true)]
    momentum: f64,
    #[arg(long)]
    no_nesterov: bool,
    /// cosine, step:E1,E2[:gamma], or constant.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    #[arg(long, default_value_t = 0.0, value_parser = argcheck::non_negative, allow_negative_numbers = true)]
    warmup_epochs: f64,
    #[arg(long, default_value_t = 0.0, value_parser = argcheck::unit_half_open, allow_negative_numbers = true)]
    label_smoothing: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Random-crop padding and horizontal flip (default: on for cifar10).
    #[arg(long)]
    augment: Option<bool>,
    /// Use only this many training samples (seeded subset).
    #[arg(long, value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
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

/// A saved model file, a shared pretrained model, or a zoo model shaped for `data`. A
/// model with non-finite weights loads (to be inspected) with a warning naming the tensor.
fn resolve_model(m: &ModelArgs, data: Option<&Dataset>, dir: Option<&Path>) -> Result<Graph> {
    let g = resolve_model_inner(m, data, dir)?;
    if let Err(e) = g.check_finite() {
        eprintln!("warning: {}: {e:#}", m.model);
    }
    Ok(g)
}

fn resolve_model_inner(m: &ModelArgs, data: Option<&Dataset>, dir: Option<&Path>) -> Result<Graph> {
    let p = Path::new(&m.model);
    if p.is_dir() {
        bail!(
            "model {} is a directory; give a .safetensors or .onnx file, or a zoo name",
            m.model
        );
    }
    if p.is_file() {
        if m.weights.is_some() {
            bail!(
                "--weights loads plain weights into a zoo model; {} is a saved model that has its weights already",
                m.model
            );
        }
        let g = if p.extension().is_some_and(|e| e == "onnx") {
            lopper::onnx::load(p)?
        } else {
            io::load(p)?
        };
        if let Some(d) = data {
            check_input_fits(&g, d, &m.model)?;
        }
        return Ok(g);
    }
    if m.model.ends_with(".safetensors") || m.model.ends_with(".onnx") || m.model.contains('/') {
        bail!("model file {} does not exist", m.model);
    }
    let (spec, weights) = match shared_model(&m.model, dir) {
        Some((s, w)) => (s, Some(m.weights.clone().unwrap_or(w))),
        None => (m.model.clone(), m.weights.clone()),
    };
    let shared = spec != m.model;
    let mut spec = spec;
    if let Some(d) = data {
        // A shared pretrained model keeps its own input shape and classes (its weights
        // need them); a zoo model is shaped for the data: `name@CxHxW#K`.
        if !shared && !spec.starts_with("mlp:") {
            let (base, classes) = match spec.split_once('#') {
                Some((b, k)) => (b.to_string(), k.to_string()),
                None => (spec.clone(), d.num_classes.to_string()),
            };
            let base = if base.contains('@') {
                base
            } else {
                format!("{base}@{}x{}x{}", d.shape[0], d.shape[1], d.shape[2])
            };
            spec = format!("{base}#{classes}");
        }
    }
    let g = zoo::build(&spec, m.init_seed).map_err(|e| match data {
        Some(d) if spec != m.model => e.context(format!(
            "{} was shaped for the data '{}' ({}x{}x{} images{}); pass --data with a dataset it fits, or a shape such as {}@1x28x28",
            m.model,
            d.name,
            d.shape[0],
            d.shape[1],
            d.shape[2],
            if d.name == "digits" { ", the default dataset" } else { "" },
            m.model.split(['@', '#']).next().unwrap_or(&m.model)
        )),
        _ => e,
    })?;
    if let Some(w) = weights {
        io::load_weights(&g, &w)?;
    }
    if let Some(d) = data {
        check_input_fits(&g, d, &m.model)?;
    }
    Ok(g)
}

/// Refuses data whose images are smaller than the model's input (they would be upsampled
/// silently): the usual cause is a 28×28 model run on the default 8×8 digits. Larger
/// images are resized down (models whose resolution was pruned).
fn check_input_fits(g: &Graph, d: &Dataset, model: &str) -> Result<()> {
    let want = g.input_shape();
    let per: usize = d.shape.iter().product();
    if want.len() == 3 {
        if want[0] != d.shape[0] || want[1] > d.shape[1] || want[2] > d.shape[2] {
            bail!(
                "{model} takes {}x{}x{} inputs but the data '{}' has {}x{}x{} images; pass --data with a dataset of that size (the default is the embedded 8x8 digits)",
                want[0], want[1], want[2], d.name, d.shape[0], d.shape[1], d.shape[2]
            );
        }
    } else if want.iter().product::<usize>() != per {
        bail!(
            "{model} takes inputs of {:?} values but the data '{}' has {}x{}x{} images ({per} values); pass --data with a dataset of that size (the default is the embedded 8x8 digits)",
            want, d.name, d.shape[0], d.shape[1], d.shape[2]
        );
    }
    Ok(())
}

/// Saves as ONNX for `.onnx` paths, else in lopper's safetensors format (both atomic).
fn save_model(g: &Graph, path: &Path) -> Result<()> {
    if path.extension().is_some_and(|e| e == "onnx") {
        lopper::onnx::save(g, path)
    } else {
        io::save(g, path)
    }
}

/// Writes a result model and its report: the report is embedded in the model file's
/// metadata (`lopper.report`), so the model always carries the report of the run that made
/// it, and written beside it as `OUT.report.json` with the model file's hash
/// (`model_file.fnv64`), so a report left over from an earlier run (a kill between the two
/// renames) is recognisable ([`lopper::graph::io::paired_report`]). Both writes are
/// atomic. Prints the report if `json`.
fn write_outputs(
    g: &Graph,
    output: Option<&Path>,
    report: &impl serde::Serialize,
    json: bool,
) -> Result<()> {
    let mut rep = serde_json::to_value(report)?;
    if let Some(o) = output {
        let text = serde_json::to_string(&rep)?;
        let props = [("lopper.report", text.as_str())];
        let hash = if o.extension().is_some_and(|e| e == "onnx") {
            lopper::onnx::save_with(g, o, &props)?
        } else {
            io::save_with(g, o, &props)?
        };
        rep["model_file"] = json!({
            "name": o.file_name().map(|f| f.to_string_lossy().to_string()),
            "fnv64": format!("{hash:016x}"),
        });
        let rp = io::report_path(o);
        lopper::util::atomic_write(&rp, serde_json::to_string_pretty(&rep)?.as_bytes())?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    }
    Ok(())
}

/// Evaluates and turns non-finite outputs into a warning (printed unless `quiet`, and
/// kept for the report).
fn eval_warn(
    g: &Graph,
    ds: &Dataset,
    what: &str,
    warnings: &std::cell::RefCell<Vec<String>>,
    quiet: bool,
) -> Result<train::EvalResult> {
    let ev = train::evaluate(g, ds, 500)?;
    if let Some(w) = ev.warning() {
        let w = format!("{what}: {w}");
        if !quiet {
            eprintln!("warning: {w}");
        }
        warnings.borrow_mut().push(w);
    }
    Ok(ev)
}

/// With `--classes` the data are renumbered `0..k`; a model whose head still scores the
/// original classes (and was not given a new head) must see the original labels, or its
/// accuracy is meaningless.
fn labels_for_model(ds: Dataset, d: &DataArgs, g: &Graph, quiet: bool) -> Result<Dataset> {
    if d.classes.is_none() || !ds.is_relabelled() {
        return Ok(ds);
    }
    let k = train::output_classes(g)?;
    if k == ds.num_classes {
        return Ok(ds);
    }
    let orig = ds.with_original_labels();
    if (0..orig.len()).all(|i| (orig.label(i) as usize) < k) {
        if !quiet {
            eprintln!(
                "note: the model scores {k} classes, so --classes keeps the original labels (no renumbering)"
            );
        }
        return Ok(orig);
    }
    bail!(
        "--classes selects {} classes, but the model scores {k} classes and some selected class is beyond them; give a model with {} outputs or one that scores the original classes",
        ds.num_classes,
        ds.num_classes
    )
}

fn load_split(d: &DataArgs, split: Split) -> Result<Dataset> {
    let holdout = d.holdout.map(|fraction| data::Holdout {
        fraction,
        seed: d.holdout_seed,
    });
    let mut ds = data::load_with(&d.data, split, d.data_dir.as_deref(), holdout)?;
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
    if let Some(o) = &a.output {
        lopper::util::check_model_output(o)?;
    }
    if let Some(c) = &a.checkpoint {
        lopper::util::check_writable(c, "checkpoint")?;
    }
    let mut train_ds = load_split(&a.data, Split::Train)?;
    if let Some(n) = a.limit {
        train_ds = train_ds.sample(n, a.seed)?;
    }
    let test_ds = load_split(&a.data, Split::Test)?;
    let g = resolve_model(&a.model, Some(&train_ds), a.data.data_dir.as_deref())?;
    let train_ds = labels_for_model(train_ds, &a.data, &g, a.json)?;
    let test_ds = labels_for_model(test_ds, &a.data, &g, true)?;
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
    if let Some(w) = ev.warning() {
        eprintln!("warning: {w}");
    }
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
            if let Some(o) = &output {
                lopper::util::check_writable(o, "output")?;
            }
            let train_ds = load_split(&d, Split::Train)?;
            let test = load_split(&d, Split::Test)?;
            let test = test.sample(eval_limit.min(test.len()), 0)?;
            let g = resolve_model(&model, Some(&train_ds), d.data_dir.as_deref())?;
            let train_ds = labels_for_model(train_ds, &d, &g, j)?;
            let test = labels_for_model(test, &d, &g, true)?;
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
            let ds = labels_for_model(ds, &d, &g, j)?;
            let t = Instant::now();
            let ev = train::evaluate(&g, &ds, batch_size)?;
            if let Some(w) = ev.warning() {
                eprintln!("warning: {w}");
            }
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
            lopper::util::check_writable(&output, "output")?;
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
            lopper::util::check_model_output(&output)?;
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
    // Output piped into `head` (or a closed stderr) ends the process quietly, as for any
    // Unix tool, instead of a panic and exit code 101 from the failed write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    lopper::util::tune_runtime();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
