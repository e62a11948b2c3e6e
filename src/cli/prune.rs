//! `lopper prune`: the flags of [`lopper::methods::job`] — engine pruning with a criterion
//! (one-shot or iterative) or a method (i-SpaSP, STAMP, DWR), then optional fine-tuning,
//! then the report (cost, latency, accuracy, widths). The job itself runs in the library.

use super::choices::{name, BnModeArg, DwrAxes, PruneMethod, ScopeArg, ThresholdArg};
use super::{load_split, resolve_model, DataArgs, DeviceArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::data::{Dataset, Split};
use lopper::methods::ispasp;
use lopper::methods::job::{
    self, DwrRun, EngineRun, IspaspRun, Method, Outcome, PruneJob, StampRun, Training,
};
use lopper::prune::Budget;
use std::path::PathBuf;

#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// An importance criterion of the engine, or a method (ispasp, dwr, stamp).
    #[arg(long, value_enum, default_value_t = PruneMethod::L1)]
    method: PruneMethod,
    /// i-SpaSP: iterations T per module.
    #[arg(long, default_value_t = 20, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    iterations: usize,
    /// i-SpaSP: how the pruned branch's batch norm is run: eval (consistent) or code (as the
    /// official code: batch statistics).
    #[arg(long, value_enum, default_value_t = BnModeArg::Eval)]
    bn_mode: BnModeArg,
    /// i-SpaSP: threshold the merged set by activation (the paper) or importance.
    #[arg(long, value_enum, default_value_t = ThresholdArg::Activation)]
    threshold: ThresholdArg,
    /// i-SpaSP: after each module, fine-tune one pass over this many training samples.
    #[arg(long, default_value_t = 0)]
    block_ft_samples: usize,
    /// Evaluate on the test set after every fine-tuning epoch (report: finetune_history;
    /// epoch seconds exclude the evaluation), for accuracy-vs-time curves. Old name: --curve.
    #[arg(long = "eval-every-epoch", alias = "curve")]
    curve: bool,
    /// STAMP: the meta-trained generator (lopper stamp meta-train).
    #[arg(long)]
    generator: Option<PathBuf>,
    /// STAMP baseline: keep the generator's widths per group but random channels, gates not
    /// folded (the baseline (c): random pruning at the same widths).
    #[arg(long)]
    stamp_random: bool,
    /// STAMP: target-time adaptation steps (gated SGD on the target before pruning).
    #[arg(long, default_value_t = 0)]
    stamp_adapt: usize,
    /// STAMP: target samples the set encoder reads.
    #[arg(long, default_value_t = 100, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    set_size: usize,
    /// DWR: cache of collected (d, w, r, accuracy) points (reused when it matches).
    #[arg(long)]
    dwr_cache: Option<PathBuf>,
    /// DWR: which axes may change: all, depth, width or resolution (baselines).
    #[arg(long, value_enum, default_value_t = DwrAxes::All)]
    dwr_axes: DwrAxes,
    /// DWR: resolution step in pixels for collection and snapping.
    #[arg(long, default_value_t = 4, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    dwr_res_step: usize,
    /// local (same ratio per group) or global (one ranking).
    #[arg(long, value_enum, default_value_t = ScopeArg::Local)]
    scope: ScopeArg,
    /// LAMP-normalise scores for global ranking.
    #[arg(long)]
    lamp: bool,
    /// Fine-tuning optimizer (AdamW for transformers; SGD uses Nesterov momentum 0.9).
    #[arg(long, value_enum, default_value_t = super::choices::OptimizerArg::Sgd)]
    optimizer: super::choices::OptimizerArg,
    /// Fine-tuning weight decay.
    #[arg(long, default_value_t = 5e-4, value_parser = super::argcheck::non_negative, allow_negative_numbers = true)]
    weight_decay: f64,
    /// Transformers: also prune the embedding dimension (the channels through every
    /// residual add and LayerNorm), which is kept by default.
    #[arg(long)]
    prune_embedding: bool,
    /// Remove this fraction of the prunable channels of every group (old name: --ratio).
    #[arg(long = "remove-channels", alias = "ratio", conflicts_with_all = ["target_macs", "target_params"], value_parser = super::argcheck::unit_half_open, allow_negative_numbers = true)]
    ratio: Option<f64>,
    /// Keep at most this fraction of the dense MACs, e.g. 0.5 (old name: --target-macs).
    #[arg(long = "keep-macs", alias = "target-macs", conflicts_with = "target_params", value_parser = super::argcheck::keep_fraction, allow_negative_numbers = true)]
    target_macs: Option<f64>,
    /// Keep at most this fraction of the dense parameters (old name: --target-params).
    #[arg(long = "keep-params", alias = "target-params", value_parser = super::argcheck::keep_fraction, allow_negative_numbers = true)]
    target_params: Option<f64>,
    /// Kept widths are multiples of this.
    #[arg(long, default_value_t = 1, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    round_to: usize,
    /// Per-layer ratio override NODE=RATIO (repeatable).
    #[arg(long = "override")]
    overrides: Vec<String>,
    /// Calibration samples drawn from the training split for data-driven criteria and
    /// methods (default: the method's reference size, 512; i-SpaSP: 1,280 per module; at
    /// most the split). More than the split holds is an error.
    #[arg(long, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    calib: Option<usize>,
    #[arg(long, default_value_t = 0)]
    finetune_epochs: usize,
    #[arg(long, default_value_t = 0.01, value_parser = super::argcheck::positive, allow_negative_numbers = true)]
    lr: f64,
    #[arg(long, default_value_t = 128, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    batch_size: usize,
    /// Distil from the dense model while fine-tuning (weight of the KD term).
    #[arg(long, value_parser = super::argcheck::unit_closed, allow_negative_numbers = true)]
    distill: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate on only this many test samples (faster, less precise).
    #[arg(long, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    eval_limit: Option<usize>,
    /// Iterative pruning in this many steps (1 = one-shot).
    #[arg(long, default_value_t = 1, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    steps: usize,
    /// Fine-tuning epochs between iterative steps.
    #[arg(long, default_value_t = 1)]
    step_epochs: usize,
    /// Fine-tune on only this many training samples (seeded subset).
    #[arg(long, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    train_limit: Option<usize>,
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn parse_budget(a: &PruneArgs) -> Result<Budget> {
    let budget = match (a.ratio, a.target_macs, a.target_params) {
        (Some(r), _, _) => Budget::Ratio(r),
        (_, Some(m), _) => Budget::Macs(m),
        (_, _, Some(p)) => Budget::Params(p),
        _ => bail!("give a budget: --keep-macs, --keep-params or --remove-channels"),
    };
    budget.validate()?;
    Ok(budget)
}

fn parse_overrides(list: &[String]) -> Result<Vec<(String, f64)>> {
    list.iter()
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
        .collect()
}

/// The library's typed method settings from the flags.
fn method(a: &PruneArgs, overrides: Vec<(String, f64)>) -> Result<Method> {
    Ok(match a.method {
        PruneMethod::Ispasp => {
            if a.steps > 1 {
                bail!("i-SpaSP prunes module by module (use --block-ft-samples), not in --steps");
            }
            Method::Ispasp(IspaspRun {
                iterations: a.iterations,
                threshold: match a.threshold {
                    ThresholdArg::Activation => ispasp::Threshold::ActivationL1,
                    ThresholdArg::Importance => ispasp::Threshold::Importance,
                },
                bn_mode: match a.bn_mode {
                    BnModeArg::Eval => ispasp::BnMode::EvalConsistent,
                    BnModeArg::Code => ispasp::BnMode::CodeFaithful,
                },
                samples: a.calib.unwrap_or(1280),
                overrides,
                block_ft_samples: a.block_ft_samples,
            })
        }
        PruneMethod::Stamp => Method::Stamp(StampRun {
            generator: a.generator.clone().context(
                "--method stamp needs --generator G (written by lopper stamp meta-train)",
            )?,
            random: a.stamp_random,
            adapt: a.stamp_adapt,
            set_size: a.set_size,
        }),
        PruneMethod::Dwr => Method::Dwr(DwrRun {
            cache: a.dwr_cache.clone(),
            axes: a.dwr_axes.mask(),
            axes_name: name(&a.dwr_axes),
            res_step: a.dwr_res_step,
        }),
        m => Method::Engine(EngineRun {
            criterion: m.criterion().context("not an engine criterion")?,
            scope: a.scope.scope(),
            lamp: a.lamp,
            round_to: a.round_to.max(1),
            overrides,
            calib: a.calib.unwrap_or(512),
            steps: a.steps,
        }),
    })
}

pub fn cmd_prune(a: PruneArgs) -> Result<()> {
    let dev = a.device.open()?;
    if let Some(o) = &a.output {
        lopper::util::check_model_output(o)?;
    }
    if let Some(c) = &a.dwr_cache {
        lopper::util::check_writable(c, "--dwr-cache")?;
    }
    if a.lamp && a.scope != ScopeArg::Global {
        bail!("--lamp normalises scores for one global ranking; it needs --scope global (a local scope ranks each group alone, where LAMP changes nothing)");
    }
    let budget = parse_budget(&a)?;
    let overrides = parse_overrides(&a.overrides)?;
    // `--data none`: data-free pruning (weight criteria, no fine-tuning, no accuracy), e.g.
    // to shrink an imported ONNX model.
    let no_data = a.data.data == "none";
    if no_data {
        let crit = a.method.criterion();
        if crit.is_none_or(|c| c.needs_data()) || a.finetune_epochs > 0 || a.steps > 1 {
            bail!(
                "--data none allows only data-free criteria (random, l1, l2, fpgm, bn-scale), \
                 one step and no fine-tuning; '{}' needs data",
                name(&a.method)
            );
        }
    }
    let (train_ds, test_ds) = datasets(&a, no_data)?;
    if !no_data {
        super::calib_size(a.calib, 0, &train_ds, &a.data.data)?;
    }
    let mut dense = super::on_device(
        resolve_model(
            &a.model,
            (!no_data).then_some(&train_ds),
            a.data.data_dir.as_deref(),
        )?,
        &dev,
    )?;
    if a.prune_embedding {
        dense = lopper::prune::allow_embedding_pruning(&dense)?;
    }
    // STAMP gives the pruned net a new head for the target's classes: keep the renumbering.
    let (train_ds, test_ds) = if no_data || a.method == PruneMethod::Stamp {
        (train_ds, test_ds)
    } else {
        (
            super::labels_for_model(train_ds, &a.data, &dense, a.json)?,
            super::labels_for_model(test_ds, &a.data, &dense, true)?,
        )
    };
    let console = super::progress::Console::new();
    let job = PruneJob {
        method: method(&a, overrides)?,
        budget,
        training: Training {
            lr: a.lr,
            batch_size: a.batch_size,
            finetune_epochs: a.finetune_epochs,
            step_epochs: a.step_epochs,
            distill: a.distill,
            curve: a.curve,
            optimizer: a.optimizer.kind(0.9, true),
            weight_decay: a.weight_decay,
        },
        seed: a.seed,
        method_name: name(&a.method),
        scope_name: name(&a.scope),
    };
    let test = (!no_data).then_some(&test_ds);
    let Outcome {
        graph: pruned,
        report: rep,
    } = job::run(&dense, &train_ds, test, &job, &console)?;
    super::write_outputs(&pruned, a.output.as_deref(), &rep, a.json)?;
    if !a.json {
        super::print_report(&rep);
    }
    Ok(())
}

/// The train and test splits (`--train-limit`, `--eval-limit` applied); empty sets for
/// `--data none`.
fn datasets(a: &PruneArgs, no_data: bool) -> Result<(Dataset, Dataset)> {
    if no_data {
        let empty = || {
            Dataset::new(
                "none",
                vec![],
                vec![],
                [1, 1, 1],
                1.0,
                vec![0.0],
                vec![1.0],
                vec![],
            )
        };
        return Ok((empty()?, empty()?));
    }
    let mut train_ds = load_split(&a.data, Split::Train)?;
    if let Some(n) = a.train_limit {
        train_ds = train_ds.sample(n.min(train_ds.len()), a.seed)?;
    }
    let mut test_ds = load_split(&a.data, Split::Test)?;
    if let Some(n) = a.eval_limit {
        test_ds = test_ds.sample(n.min(test_ds.len()), 0)?;
    }
    Ok((train_ds, test_ds))
}
