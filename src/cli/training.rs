//! `lopper train`: train a model (zoo name or saved model) on a dataset, with resumable
//! checkpoints.

use super::choices::OptimizerArg;
use super::*;
use lopper::train::{Schedule, TrainConfig, TrainOpts};

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    device: DeviceArgs,
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
    #[arg(long, value_enum, default_value_t = OptimizerArg::Sgd)]
    optimizer: OptimizerArg,
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
    /// Train on only this many training samples (seeded subset). Old name: --limit.
    #[arg(long = "train-limit", alias = "limit", value_parser = argcheck::at_least_one, allow_negative_numbers = true)]
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

pub fn run(a: TrainArgs) -> Result<()> {
    let dev = a.device.open()?;
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
    let g = on_device(
        resolve_model(&a.model, Some(&train_ds), a.data.data_dir.as_deref())?,
        &dev,
    )?;
    let train_ds = labels_for_model(train_ds, &a.data, &g, a.json)?;
    let test_ds = labels_for_model(test_ds, &a.data, &g, true)?;
    // --augment true gives the CIFAR recipe to any dataset; by default, the dataset's own.
    let aug = a
        .augment
        .unwrap_or(train_ds.default_augment != data::Augment::default());
    let optimizer = a.optimizer.kind(a.momentum, !a.no_nesterov);
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
    let console = super::progress::Console::new();
    let opts = TrainOpts {
        progress: Some(&console),
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
