//! `lopper sparsify`: post-training sparsity from a small calibration set — magnitude
//! (uniform or global), Wanda, POT or UniPTS — then the report: accuracy, per-layer
//! sparsity, sparse MACs, dense vs sparse-kernel latency, wall time.

use super::choices::{name, SearchArg, SparsifyMethod};
use super::{load_split, pct, resolve_model, DataArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::data::Split;
use lopper::graph::{cost, Graph};
use lopper::methods::pts::{self, PotConfig};
use lopper::methods::unipts::{self, DstConfig, GaConfig, UniptsConfig};
use lopper::prune::report;
use lopper::sparse::bn::{recalibrate_bn, RecalibOpts};
use lopper::sparse::layers::{prunable_layers, sparsity_report, LayerSparsity};
use lopper::sparse::mask::{check_sparsity, Pattern};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct SparsifyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// magnitude (uniform per layer), global (one magnitude threshold), wanda, pot, unipts.
    #[arg(long, value_enum, default_value_t = SparsifyMethod::Unipts)]
    method: SparsifyMethod,
    /// Target fraction of zero weights over all conv and linear layers, in [0, 1).
    #[arg(long, value_parser = super::argcheck::unit_half_open, allow_negative_numbers = true)]
    sparsity: Option<f64>,
    /// unstructured, or N:M such as 2:4 (magnitude, wanda, unipts).
    #[arg(long, default_value = "unstructured")]
    pattern: String,
    /// Calibration images drawn from the training split (no other training data is used).
    #[arg(long, default_value_t = 2048, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    calib: usize,
    /// Skip the batch-norm re-estimation of the one-shot baselines.
    #[arg(long)]
    no_recalib: bool,
    /// UniPTS: sparse-training epochs over the calibration set (reference 100).
    #[arg(long, default_value_t = 10, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
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
    /// UniPTS: evaluate on the test set after every epoch (logging only).
    #[arg(long)]
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

#[derive(Serialize)]
pub struct SparsifyReport {
    pub method: String,
    pub pattern: String,
    pub target: f64,
    /// Realised fraction of zeros over all conv and linear weights.
    pub sparsity: f64,
    pub calib: usize,
    pub acc_dense: f64,
    pub acc_sparse: f64,
    pub dense_macs: u64,
    /// MACs of the conv/linear layers counted over non-zero weights only.
    pub sparse_macs: u64,
    pub dense_latency_b1_ms: f64,
    pub dense_latency_b64_ms: f64,
    /// With the sparse kernels on the layers where they are faster.
    pub sparse_latency_b1_ms: f64,
    pub sparse_latency_b64_ms: f64,
    pub seconds: f64,
    pub layers: Vec<LayerSparsity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    /// Problems the numbers above carry (e.g. non-finite outputs counted as wrong).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// MACs over non-zero weights: each conv/linear layer's MACs scaled by its density.
pub fn sparse_macs(g: &Graph) -> Result<u64> {
    let c = cost::cost(g)?;
    let (rows, _) = sparsity_report(g)?;
    let dens: std::collections::HashMap<&str, f64> = rows
        .iter()
        .map(|r| (r.name.as_str(), 1.0 - r.sparsity))
        .collect();
    Ok(c.nodes
        .iter()
        .map(|n| match dens.get(n.name.as_str()) {
            Some(d) => (n.macs as f64 * d).round() as u64,
            None => n.macs,
        })
        .sum())
}

pub fn cmd_sparsify(a: SparsifyArgs) -> Result<()> {
    if let Some(o) = &a.output {
        lopper::util::check_model_output(o)?;
    }
    if let Some(p) = &a.genome_from {
        if !p.is_file() {
            bail!("--genome-from {}: no such report file", p.display());
        }
    }
    let pattern = Pattern::parse(&a.pattern)?;
    let target = match (a.sparsity, pattern.fixed_sparsity()) {
        (Some(s), None) => s,
        (None, Some(s)) => s,
        (Some(s), Some(f)) if (s - f).abs() < 1e-9 => s,
        (Some(s), Some(f)) => bail!("--sparsity {s} contradicts pattern {} ({f})", a.pattern),
        (None, None) => {
            bail!("give --sparsity (a fraction of zeros in [0, 1)) or an N:M --pattern")
        }
    };
    check_sparsity(target)?;
    if matches!(pattern, Pattern::NM { .. })
        && matches!(a.method, SparsifyMethod::Global | SparsifyMethod::Pot)
    {
        bail!(
            "method '{}' has no N:M variant; use magnitude, wanda or unipts",
            name(&a.method)
        );
    }
    let train_ds = load_split(&a.data, Split::Train)?;
    if a.calib == 0 || a.calib > train_ds.len() {
        bail!(
            "calibration set of {} images requested, the training split of {} has {}",
            a.calib,
            a.data.data,
            train_ds.len()
        );
    }
    let calib = train_ds.sample(a.calib, a.seed)?;
    let mut test_ds = load_split(&a.data, Split::Test)?;
    if let Some(n) = a.eval_limit {
        test_ds = test_ds.sample(n.min(test_ds.len()), 0)?;
    }
    let dense = resolve_model(&a.model, Some(&train_ds), a.data.data_dir.as_deref())?;
    let calib = super::labels_for_model(calib, &a.data, &dense, a.json)?;
    let test_ds = super::labels_for_model(test_ds, &a.data, &dense, true)?;
    let log = |m: String| {
        if !a.json {
            eprintln!("{m}");
        }
    };
    let warnings = std::cell::RefCell::new(Vec::new());
    let acc_dense = super::eval_warn(&dense, &test_ds, "dense", &warnings, a.json)?.top1;
    log(format!("dense: top-1 {}", pct(acc_dense)));
    let t = Instant::now();
    let mut details = None;
    let layers = prunable_layers(&dense);
    let recal = |g: &Graph| -> Result<()> {
        if !a.no_recalib {
            recalibrate_bn(
                g,
                &calib,
                &RecalibOpts {
                    seed: a.seed,
                    ..Default::default()
                },
            )?;
        }
        Ok(())
    };
    let sparse = match a.method {
        SparsifyMethod::Magnitude => {
            let g = dense.deep_clone()?;
            pts::uniform_magnitude(&g, &layers, target, pattern)?;
            recal(&g)?;
            g
        }
        SparsifyMethod::Global => {
            let g = dense.deep_clone()?;
            pts::global_magnitude(&g, &layers, target)?;
            recal(&g)?;
            g
        }
        SparsifyMethod::Wanda => {
            let g = dense.deep_clone()?;
            pts::wanda(&g, &layers, &calib, target, pattern)?;
            recal(&g)?;
            g
        }
        SparsifyMethod::Pot => pts::pot(
            &dense,
            &calib,
            target,
            &PotConfig {
                iterations: a.pot_iters,
                seed: a.seed,
                ..Default::default()
            },
        )?,
        SparsifyMethod::Unipts => {
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
            let genome = match &a.genome_from {
                Some(p) => {
                    let txt = std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read report {}", p.display()))?;
                    let v: serde_json::Value = serde_json::from_str(&txt)
                        .with_context(|| format!("{}: not a JSON report", p.display()))?;
                    let g: Vec<f64> = serde_json::from_value(v["details"]["genome"].clone())
                        .with_context(|| {
                            format!("{}: no details.genome (not a UniPTS report?)", p.display())
                        })?;
                    Some(g)
                }
                None => None,
            };
            let cfg = UniptsConfig {
                genome,
                target,
                extra: 0.05,
                ga,
                search_samples: a.search_samples.unwrap_or(a.calib),
                noise: 1e-6,
                pattern,
                dst,
            };
            let (g, res) = unipts::run(
                &dense,
                &calib,
                &cfg,
                a.eval_every_epoch.then_some(&test_ds),
                !a.json,
            )?;
            log(format!(
                "search {:.1}s ({} evaluations), sparse training {:.1}s",
                res.search_seconds,
                res.search.as_ref().map_or(0, |s| s.evaluations),
                res.train_seconds
            ));
            details = Some(serde_json::to_value(&res)?);
            g
        }
    };
    let seconds = t.elapsed().as_secs_f64();
    let acc_sparse = super::eval_warn(&sparse, &test_ds, "sparse", &warnings, a.json)?.top1;
    let (rows, realised) = sparsity_report(&sparse)?;
    // Inference from here on runs the sparse kernels on the layers sparse enough for them.
    let packed = sparse.enable_sparse_kernels()?;
    log(format!("{packed} layers run on the sparse kernels"));
    let rep = SparsifyReport {
        method: name(&a.method),
        pattern: a.pattern.clone(),
        target,
        sparsity: realised,
        calib: a.calib,
        acc_dense,
        acc_sparse,
        dense_macs: cost::cost(&dense)?.total_macs,
        sparse_macs: sparse_macs(&sparse)?,
        dense_latency_b1_ms: report::latency_ms(&dense, 1, 20)?,
        dense_latency_b64_ms: report::latency_ms(&dense, 64, 5)?,
        sparse_latency_b1_ms: report::latency_ms(&sparse, 1, 20)?,
        sparse_latency_b64_ms: report::latency_ms(&sparse, 64, 5)?,
        seconds,
        layers: rows,
        details,
        warnings: warnings.into_inner(),
    };
    super::write_outputs(&sparse, a.output.as_deref(), &rep, a.json)?;
    if !a.json {
        println!(
            "{} {} at {:.1}% target: realised sparsity {:.2}%, MACs {} -> {} (non-zero), {:.1}s",
            rep.method,
            a.pattern,
            100.0 * target,
            100.0 * realised,
            cost::human(rep.dense_macs),
            cost::human(rep.sparse_macs),
            seconds
        );
        println!(
            "accuracy: dense {} -> sparse {}; latency b1 {:.2} -> {:.2} ms, b64 {:.1} -> {:.1} ms",
            pct(acc_dense),
            pct(acc_sparse),
            rep.dense_latency_b1_ms,
            rep.sparse_latency_b1_ms,
            rep.dense_latency_b64_ms,
            rep.sparse_latency_b64_ms
        );
        for l in &rep.layers {
            println!(
                "  {:<24} {:>8} weights  {:>6.2}% zero",
                l.name,
                l.numel,
                100.0 * l.sparsity
            );
        }
    }
    Ok(())
}
