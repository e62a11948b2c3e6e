//! The command line: one module per subcommand (its arguments and its `run`), and here
//! what they share: the model and data arguments, model resolution, output writing and
//! evaluation with warnings. `main.rs` only parses and dispatches.

pub mod argcheck;
pub mod bench;
pub mod choices;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod forward;
pub mod inspect;
pub mod progress;
pub mod prune;
pub mod run;
pub mod sensitivity;
pub mod sparsify;
pub mod stamp;
pub mod training;

pub(crate) use anyhow::{bail, Context, Result};
pub(crate) use clap::Args;
pub(crate) use lopper::data::{self, Dataset, Split};
pub(crate) use lopper::graph::{cost, io, Graph};
pub(crate) use lopper::train;
pub(crate) use lopper::zoo;
pub(crate) use serde_json::json;
pub(crate) use std::path::{Path, PathBuf};
pub(crate) use std::time::Instant;

#[derive(Args, Clone)]
struct ModelArgs {
    /// A model file (.safetensors or .onnx), a trained model by name — resnet20-cifar10,
    /// lenet5-mnist, mlp-mnist, stamp-ref-fmnist, stamp-ref-cifar6, vit-cifar10 (shipped in
    /// models/),
    /// digit_recognizer_cnn
    /// (shared data) — or a zoo architecture with random weights: mlp:IN-H1-...-OUT, lenet5,
    /// resnet8, vgg11, vgg16, resnet20, resnet32, resnet56, resnet110, mobilenetv2, vit,
    /// vit:DIM-DEPTH-HEADS[-PATCH[-MLP]][-cls], digit_cnn (a shape may follow: resnet20@3x32x32#10).
    model: String,
    /// Plain safetensors weights (PyTorch names) to load into a zoo model.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Seed of the initial weights of a zoo model.
    #[arg(long, default_value_t = 0)]
    init_seed: u64,
}

/// Where the model runs (every command that runs one).
#[derive(Args, Clone)]
struct DeviceArgs {
    /// cpu, cuda (= cuda:0) or cuda:N. CUDA needs a build with `--features cuda` and an
    /// NVIDIA GPU with its driver; lopper's own kernels are CPU kernels, other devices run
    /// candle's ops.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl DeviceArgs {
    /// Opens the device: called before any data is read, so a wrong `--device` fails fast.
    fn open(&self) -> Result<candle_core::Device> {
        lopper::device::open(&self.device)
    }
}

/// `g` with its parameters on `dev`.
fn on_device(mut g: Graph, dev: &candle_core::Device) -> Result<Graph> {
    g.to_device(dev)
        .with_context(|| format!("moving the model to {}", lopper::device::name(dev)))?;
    Ok(g)
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
    /// Input scaling.
    #[arg(long, value_enum, default_value_t = choices::InputScale::Normalized)]
    input_scale: choices::InputScale,
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
            let (g, notes) = lopper::onnx::load_noting(p)?;
            for n in notes {
                eprintln!("note: {}: {n}", p.display());
            }
            g
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
    if let Some(p) = zoo::shipped(&m.model) {
        let shipped = ModelArgs {
            model: p.display().to_string(),
            ..m.clone()
        };
        return resolve_model_inner(&shipped, data, dir);
    }
    if zoo::SHIPPED.contains(&m.model.as_str()) {
        bail!(
            "the shipped model '{}' is not here: models/{}.safetensors is looked up under $LOPPER_MODELS, the working directory and {}; `ONLY={} bench/train_shipped.sh` trains and records it",
            m.model,
            m.model,
            env!("CARGO_MANIFEST_DIR"),
            m.model
        );
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
    rep["model_file"] = serde_json::Value::Null;
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

/// The calibration size every command uses: `--calib N` as given (more than the training
/// split holds is an error, in every command alike), else the method's `default`, at most
/// the split.
fn calib_size(given: Option<usize>, default: usize, train: &Dataset, data: &str) -> Result<usize> {
    match given {
        Some(n) if n > train.len() => bail!(
            "--calib {n}: the training split of {data} has only {} samples",
            train.len()
        ),
        Some(n) => Ok(n),
        None => Ok(default.min(train.len())),
    }
}

/// The human-readable summary of a job's report: cost, latency, accuracy, then the layers
/// the job changed (widths for pruning, zero weights for sparsity).
fn print_report(rep: &lopper::methods::report::Report) {
    use lopper::methods::report::Command;
    let (d, r) = (&rep.dense, &rep.result);
    let show = |x: Option<f64>| x.map_or("n/a".to_string(), pct);
    let how = [rep.scope.as_deref(), rep.pattern.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
    println!("{} ({how}; {}):", rep.method, rep.budget);
    println!(
        "  MACs {} -> {} ({:.2}x fewer{}), params {} -> {}, zero weights {:.1} % -> {:.1} %",
        cost::human(d.macs),
        cost::human(r.macs),
        d.macs as f64 / r.macs.max(1) as f64,
        if r.nonzero_macs < r.macs {
            format!("; {} over non-zero weights", cost::human(r.nonzero_macs))
        } else {
            String::new()
        },
        cost::human(d.params),
        cost::human(r.params),
        100.0 * d.sparsity,
        100.0 * r.sparsity,
    );
    println!(
        "  latency b1 {:.2} -> {:.2} ms, b64 {:.1} -> {:.1} ms; {:.1} s (method {:.1} s, fine-tuning {:.1} s)",
        d.latency_b1_ms,
        r.latency_b1_ms,
        d.latency_b64_ms,
        r.latency_b64_ms,
        rep.seconds.method + rep.seconds.finetune,
        rep.seconds.method,
        rep.seconds.finetune,
    );
    match (rep.command, rep.top1_before_finetune) {
        (Command::Prune, before) if rep.seconds.finetune > 0.0 || before != r.top1 => println!(
            "  top-1: dense {} -> pruned {} -> fine-tuned {}",
            show(d.top1),
            show(before),
            show(r.top1)
        ),
        _ => println!("  top-1: dense {} -> {}", show(d.top1), show(r.top1)),
    }
    for l in &rep.layers {
        match rep.command {
            Command::Prune if l.width_before != l.width_after => {
                println!(
                    "  {:<24} {:>5} -> {:>5}",
                    l.name, l.width_before, l.width_after
                )
            }
            Command::Sparsify => println!(
                "  {:<24} {:>8} weights  {:>6.2} % zero",
                l.name,
                l.weights,
                100.0 * l.sparsity
            ),
            _ => {}
        }
    }
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
    match d.input_scale {
        choices::InputScale::Normalized => {}
        choices::InputScale::Unit => (ds.mean, ds.std) = (vec![0.0; c], vec![1.0; c]),
        choices::InputScale::Raw => {
            (ds.mean, ds.std, ds.max_value) = (vec![0.0; c], vec![1.0; c], 1.0)
        }
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

pub(crate) fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}
