//! `lopper sparsify`: post-training sparsity from a small calibration set — magnitude
//! (uniform or global), Wanda, POT or UniPTS — then the report: accuracy, per-layer
//! sparsity, sparse MACs, dense vs sparse-kernel latency, wall time.

use super::choices::{name, SearchArg, SparsifyMethod as SparsifyMethodArg};
use super::{load_split, resolve_model, DataArgs, DeviceArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::data::Split;
use lopper::methods::pts::PotConfig;
use lopper::methods::sparsify::{self, SparsifyJob, SparsifyMethod, SparsifyOutcome};
use lopper::methods::unipts::{DstConfig, GaConfig, UniptsConfig};
use lopper::sparse::mask::Pattern;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct SparsifyArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// magnitude (uniform per layer), global (one magnitude threshold), wanda, pot, unipts.
    #[arg(long, value_enum, default_value_t = SparsifyMethodArg::Unipts)]
    method: SparsifyMethodArg,
    /// Target fraction of zero weights over all conv and linear layers, in [0, 1).
    #[arg(long, value_parser = super::argcheck::unit_half_open, allow_negative_numbers = true)]
    sparsity: Option<f64>,
    /// unstructured, or N:M such as 2:4 (magnitude, wanda, sparsegpt, unipts).
    #[arg(long, default_value = "unstructured")]
    pattern: String,
    /// Calibration images drawn from the training split (no other training data is used);
    /// default 2,048, or the whole split when it is smaller.
    #[arg(long, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    calib: Option<usize>,
    /// Skip the batch-norm re-estimation of the one-shot baselines.
    #[arg(long)]
    no_recalib: bool,
    /// UniPTS: sparse-training epochs over the calibration set, reference 100 (old name:
    /// --epochs).
    #[arg(long = "finetune-epochs", alias = "epochs", default_value_t = 10, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    epochs: usize,
    #[arg(long, default_value_t = 0.01, value_parser = super::argcheck::positive, allow_negative_numbers = true)]
    lr: f64,
    #[arg(long, default_value_t = 64, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    batch_size: usize,
    /// UniPTS: the evolutionary search (ga) or the uniform [P] genome (none, an ablation).
    #[arg(long, value_enum, default_value_t = SearchArg::Ga)]
    search: SearchArg,
    /// UniPTS GA: population, generations, parents, and children of each kind
    /// (reference 25/25/10/12; the default is the spec's CPU proxy).
    #[arg(long, default_value_t = 10, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    ga_pop: usize,
    #[arg(long, default_value_t = 5, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    ga_gens: usize,
    #[arg(long, default_value_t = 4, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    ga_parents: usize,
    #[arg(long, default_value_t = 3, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    ga_children: usize,
    /// UniPTS: size of the search's bootstrap loader (default: the calibration size).
    #[arg(long, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    search_samples: Option<usize>,
    /// UniPTS: take the searched genome from an earlier run's report (REPORT.json) instead
    /// of searching again (the training ablations share one search).
    #[arg(long)]
    genome_from: Option<PathBuf>,
    /// UniPTS ablation: keep τ fixed at τ_0 (no base decay).
    #[arg(long)]
    no_base_decay: bool,
    /// UniPTS ablation: static mask with masked gradients (no dynamic sparse training).
    #[arg(long)]
    static_mask: bool,
    /// UniPTS: run the teacher with running BN statistics instead of batch statistics.
    #[arg(long)]
    teacher_eval_bn: bool,
    /// POT: layer-wise tuning iterations per sparsity level (reference 30).
    #[arg(long, default_value_t = 30, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    pot_iters: usize,
    /// UniPTS: evaluate on the test set after every epoch (logging only). Also: --curve.
    #[arg(long, alias = "curve")]
    eval_every_epoch: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate on only this many test samples.
    #[arg(long, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    eval_limit: Option<usize>,
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn cmd_sparsify(a: SparsifyArgs) -> Result<()> {
    let dev = a.device.open()?;
    if let Some(o) = &a.output {
        lopper::util::check_model_output(o)?;
    }
    let pattern = Pattern::parse(&a.pattern)?;
    if a.sparsity.is_none() && pattern.fixed_sparsity().is_none() {
        bail!("give --sparsity (a fraction of zeros in [0, 1)) or an N:M --pattern");
    }
    let target = sparsify::resolve_target(a.sparsity, pattern)?;
    let genome = a.genome_from.as_deref().map(genome_from).transpose()?;
    let train_ds = load_split(&a.data, Split::Train)?;
    let n_calib = super::calib_size(a.calib, 2048, &train_ds, &a.data.data)?;
    if n_calib == 0 {
        bail!("the training split of {} is empty", a.data.data);
    }
    let calib = train_ds.sample(n_calib, a.seed)?;
    let mut test_ds = load_split(&a.data, Split::Test)?;
    if let Some(n) = a.eval_limit {
        test_ds = test_ds.sample(n.min(test_ds.len()), 0)?;
    }
    let dense = super::on_device(
        resolve_model(&a.model, Some(&train_ds), a.data.data_dir.as_deref())?,
        &dev,
    )?;
    let calib = super::labels_for_model(calib, &a.data, &dense, a.json)?;
    let test_ds = super::labels_for_model(test_ds, &a.data, &dense, true)?;
    let job = SparsifyJob {
        method: method(&a, target, pattern, genome, &calib),
        target,
        pattern,
        recalib: !a.no_recalib,
        seed: a.seed,
        curve: a.eval_every_epoch,
        method_name: name(&a.method),
    };
    let console = super::progress::Console::new();
    let SparsifyOutcome {
        graph: sparse,
        report: rep,
    } = sparsify::run(&dense, &calib, &test_ds, &job, &console)?;
    super::write_outputs(&sparse, a.output.as_deref(), &rep, a.json)?;
    if !a.json {
        super::print_report(&rep);
    }
    Ok(())
}

/// The typed method settings from the flags.
fn method(
    a: &SparsifyArgs,
    target: f64,
    pattern: Pattern,
    genome: Option<Vec<f64>>,
    calib: &lopper::data::Dataset,
) -> SparsifyMethod {
    match a.method {
        SparsifyMethodArg::Magnitude => SparsifyMethod::Magnitude,
        SparsifyMethodArg::Global => SparsifyMethod::Global,
        SparsifyMethodArg::Wanda => SparsifyMethod::Wanda,
        SparsifyMethodArg::Sparsegpt => SparsifyMethod::SparseGpt,
        SparsifyMethodArg::Pot => SparsifyMethod::Pot(PotConfig {
            iterations: a.pot_iters,
            seed: a.seed,
            ..Default::default()
        }),
        SparsifyMethodArg::Unipts => {
            let ga = match a.search {
                SearchArg::Ga => Some(GaConfig {
                    population: a.ga_pop,
                    generations: a.ga_gens,
                    parents: a.ga_parents,
                    crossover: a.ga_children,
                    mutation: a.ga_children,
                    p_mut: 0.1,
                    seed: a.seed,
                }),
                SearchArg::None => None,
            };
            let mut dst = DstConfig::with_epochs(a.epochs);
            dst.lr = a.lr;
            dst.batch = a.batch_size;
            dst.base_decay = !a.no_base_decay;
            dst.dynamic = !a.static_mask;
            dst.teacher_train_bn = !a.teacher_eval_bn;
            dst.crop_pad = calib.default_augment.crop_pad;
            dst.hflip = calib.default_augment.hflip;
            dst.seed = a.seed;
            SparsifyMethod::Unipts(Box::new(UniptsConfig {
                genome,
                target,
                extra: 0.05,
                ga,
                search_samples: a.search_samples.unwrap_or(calib.len()),
                noise: 1e-6,
                pattern,
                dst,
            }))
        }
    }
}

/// The searched genome of an earlier UniPTS run's report (`--genome-from`).
fn genome_from(p: &Path) -> Result<Vec<f64>> {
    if !p.is_file() {
        bail!("--genome-from {}: no such report file", p.display());
    }
    let txt = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read report {}", p.display()))?;
    let rep: lopper::methods::report::Report = serde_json::from_str(&txt)
        .with_context(|| format!("{}: not a lopper report", p.display()))?;
    sparsify::genome(&rep)
        .with_context(|| format!("{}: no details.genome (not a UniPTS report?)", p.display()))
}
