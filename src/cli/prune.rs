//! `lopper prune`: engine pruning with a criterion (one-shot or iterative) or a method
//! (i-SpaSP), then optional fine-tuning, then the report (cost, latency, accuracy, widths).

use super::choices::{name, BnModeArg, DwrAxes, PruneMethod, ScopeArg, ThresholdArg};
use super::{load_split, pct, resolve_model, DataArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::data::{Dataset, Split};
use lopper::graph::{cost, Graph};
use lopper::methods::ispasp;
use lopper::prune::{self, report, Budget, PlanConfig};
use lopper::train::{self, Schedule, TrainConfig, TrainOpts};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct PruneArgs {
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
    /// epoch seconds exclude the evaluation), for accuracy-vs-time curves.
    #[arg(long)]
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
    /// Remove this fraction of prunable channels.
    #[arg(long, conflicts_with_all = ["target_macs", "target_params"], value_parser = super::argcheck::unit_half_open, allow_negative_numbers = true)]
    ratio: Option<f64>,
    /// Keep at most this fraction of the dense MACs (e.g. 0.5).
    #[arg(long, conflicts_with = "target_params", value_parser = super::argcheck::keep_fraction, allow_negative_numbers = true)]
    target_macs: Option<f64>,
    /// Keep at most this fraction of the dense parameters.
    #[arg(long, value_parser = super::argcheck::keep_fraction, allow_negative_numbers = true)]
    target_params: Option<f64>,
    /// Kept widths are multiples of this.
    #[arg(long, default_value_t = 1, value_parser = super::argcheck::at_least_one, allow_negative_numbers = true)]
    round_to: usize,
    /// Per-layer ratio override NODE=RATIO (repeatable).
    #[arg(long = "override")]
    overrides: Vec<String>,
    /// Samples of the training set for data-driven criteria (default 512; i-SpaSP: 1280
    /// per module).
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

/// The outcome of the pruning stage, before the final fine-tuning.
struct Pruned {
    graph: Graph,
    /// Time spent choosing and cutting channels (not training).
    prune_seconds: f64,
    /// Training done during pruning (between steps, after blocks).
    train_seconds: f64,
    /// Method-specific detail for the report.
    details: Option<serde_json::Value>,
}

fn parse_budget(a: &PruneArgs) -> Result<Budget> {
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

/// Fine-tuning settings shared by every training pass of `prune` (with the dataset's
/// default augmentation: crop + flip for CIFAR-10).
fn ft_config(
    a: &PruneArgs,
    ds: &Dataset,
    epochs: usize,
    schedule: Schedule,
    seed: u64,
) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        schedule,
        crop_pad: ds.default_augment.crop_pad,
        hflip: ds.default_augment.hflip,
        seed,
        ..Default::default()
    }
}

/// A short constant-rate fine-tuning pass used between pruning steps and after blocks.
fn short_train(a: &PruneArgs, g: &Graph, ds: &Dataset, epochs: usize, seed: u64) -> Result<f64> {
    let tcfg = ft_config(a, ds, epochs, Schedule::Constant, seed);
    let opts = TrainOpts {
        progress: !a.json,
        ..Default::default()
    };
    Ok(train::train(g, ds, &tcfg, &opts)?.seconds)
}

pub fn cmd_prune(a: PruneArgs) -> Result<()> {
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
    let (train_ds, test_ds) = if no_data {
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
        (empty()?, empty()?)
    } else {
        let mut train_ds = load_split(&a.data, Split::Train)?;
        if let Some(n) = a.train_limit {
            train_ds = train_ds.sample(n.min(train_ds.len()), a.seed)?;
        }
        let mut test_ds = load_split(&a.data, Split::Test)?;
        if let Some(n) = a.eval_limit {
            test_ds = test_ds.sample(n.min(test_ds.len()), 0)?;
        }
        (train_ds, test_ds)
    };
    let dense = resolve_model(
        &a.model,
        (!no_data).then_some(&train_ds),
        a.data.data_dir.as_deref(),
    )?;
    // STAMP gives the pruned net a new head for the target's classes: keep the renumbering.
    let (train_ds, test_ds) = if no_data || a.method == PruneMethod::Stamp {
        (train_ds, test_ds)
    } else {
        (
            super::labels_for_model(train_ds, &a.data, &dense, a.json)?,
            super::labels_for_model(test_ds, &a.data, &dense, true)?,
        )
    };
    let warnings = std::cell::RefCell::new(Vec::new());
    let log = |m: String| {
        if !a.json {
            eprintln!("{m}");
        }
    };
    let accuracy = |g: &Graph| -> Result<Option<f64>> {
        Ok(match no_data {
            true => None,
            false => Some(super::eval_warn(g, &test_ds, "test", &warnings, a.json)?.top1),
        })
    };
    let show = |x: Option<f64>| x.map_or("n/a".to_string(), pct);
    let acc_dense = accuracy(&dense)?;
    log(format!("dense: top-1 {}", show(acc_dense)));
    let p = match a.method {
        PruneMethod::Ispasp => prune_ispasp(&a, &dense, &train_ds, budget, &overrides, &log)?,
        PruneMethod::Dwr => prune_dwr(&a, &dense, &train_ds, &test_ds, budget, &log)?,
        PruneMethod::Stamp => prune_stamp(&a, &dense, &train_ds, budget)?,
        _ => prune_engine(&a, &dense, &train_ds, &test_ds, budget, &overrides, &log)?,
    };
    let pruned = p.graph;
    let prune_seconds = p.prune_seconds;
    let acc_pruned = accuracy(&pruned)?;
    log(format!(
        "pruned in {prune_seconds:.1}s: top-1 {}",
        show(acc_pruned)
    ));
    let mut acc_ft = None;
    let mut curve = None;
    let mut ft_secs = p.train_seconds;
    if a.finetune_epochs > 0 {
        let tcfg = ft_config(
            &a,
            &train_ds,
            a.finetune_epochs,
            Schedule::Cosine { min_lr: 0.0 },
            a.seed,
        );
        let teacher = a.distill.map(|alpha| train::Teacher {
            graph: &dense,
            temperature: 4.0,
            alpha,
        });
        let opts = TrainOpts {
            progress: !a.json,
            teacher,
            test: a.curve.then_some(&test_ds),
            ..Default::default()
        };
        let r = train::train(&pruned, &train_ds, &tcfg, &opts)?;
        ft_secs += r.seconds;
        if a.curve {
            curve = Some(r.history.clone());
        }
        let acc = super::eval_warn(&pruned, &test_ds, "fine-tuned", &warnings, a.json)?.top1;
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
        method: name(&a.method),
        scope: name(&a.scope),
        budget: format!("{budget:?}"),
        macs_ratio: ps.macs as f64 / ds.macs as f64,
        params_ratio: ps.params as f64 / ds.params as f64,
        dense: ds,
        pruned: ps,
        acc_dense,
        acc_pruned,
        acc_finetuned: acc_ft,
        prune_seconds,
        finetune_seconds: ft_secs,
        widths: report::widths(&dense, &pruned),
        details: p.details,
        finetune_history: curve,
        warnings: warnings.into_inner(),
    };
    super::write_outputs(&pruned, a.output.as_deref(), &rep, a.json)?;
    if !a.json {
        println!(
            "{} ({}, {}): MACs {} -> {} ({:.2}x fewer), params {} -> {}, latency b1 {:.2} -> {:.2} ms, b64 {:.1} -> {:.1} ms",
            rep.method,
            rep.scope,
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
            show(acc_dense),
            show(acc_pruned),
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

/// Engine pruning: criterion scores, scope and budget planned over the dependency groups.
fn prune_engine(
    a: &PruneArgs,
    dense: &Graph,
    train_ds: &Dataset,
    test_ds: &Dataset,
    budget: Budget,
    overrides: &[(String, f64)],
    log: &dyn Fn(String),
) -> Result<Pruned> {
    let criterion = a.method.criterion().context("not an engine criterion")?;
    let scope = a.scope.scope();
    // One-shot (steps = 1) or iterative: each step moves the budget a step closer to the
    // target, relative to the original dense model, with optional fine-tuning between.
    let t = Instant::now();
    let steps = a.steps.max(1);
    let dense_cost = cost::cost(dense)?;
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
            let n = a.calib.unwrap_or(512);
            let calib = train_ds.sample(n.min(train_ds.len()), a.seed)?;
            Some(prune::collect_stats(&current, &calib, n, 64)?)
        } else {
            None
        };
        let cfg = PlanConfig {
            criterion,
            scope,
            budget: step_budget,
            round_to: a.round_to.max(1),
            lamp: a.lamp,
            overrides: overrides.to_vec(),
            seed: a.seed + step as u64,
        };
        let removal = prune::plan(&current, &groups, &cfg, stats.as_ref())
            .with_context(|| format!("pruning step {step}/{steps}"))?;
        current = prune::remove_units(&current, &groups, &removal)?;
        if step < steps && a.step_epochs > 0 {
            between_secs +=
                short_train(a, &current, train_ds, a.step_epochs, a.seed + step as u64)?;
            log(format!(
                "step {step}/{steps}: {} MACs, top-1 {}",
                cost::human(cost::cost(&current)?.total_macs),
                pct(train::evaluate(&current, test_ds, 500)?.top1)
            ));
        }
    }
    Ok(Pruned {
        graph: current,
        prune_seconds: t.elapsed().as_secs_f64() - between_secs,
        train_seconds: between_secs,
        details: None,
    })
}

/// i-SpaSP, module by module, with optional block fine-tuning; the budget is a removal
/// ratio per module or a MACs target met by the largest uniform keep ratio.
fn prune_ispasp(
    a: &PruneArgs,
    dense: &Graph,
    train_ds: &Dataset,
    budget: Budget,
    overrides: &[(String, f64)],
    log: &dyn Fn(String),
) -> Result<Pruned> {
    let select = ispasp::SelectConfig {
        iterations: a.iterations,
        threshold: match a.threshold {
            ThresholdArg::Activation => ispasp::Threshold::ActivationL1,
            ThresholdArg::Importance => ispasp::Threshold::Importance,
        },
        ..Default::default()
    };
    let mut cfg = ispasp::IspaspConfig {
        overrides: overrides
            .iter()
            .map(|(n, r)| (n.clone(), 1.0 - r))
            .collect(),
        select,
        samples: a.calib.unwrap_or(1280),
        bn_mode: match a.bn_mode {
            BnModeArg::Eval => ispasp::BnMode::EvalConsistent,
            BnModeArg::Code => ispasp::BnMode::CodeFaithful,
        },
        seed: a.seed,
        ..Default::default()
    };
    let modules = ispasp::two_layer_modules(dense, &prune::dependency_groups(dense)?);
    cfg.keep = match budget {
        Budget::Ratio(r) => 1.0 - r,
        Budget::Macs(f) => ispasp::keep_for_macs(dense, &modules, &cfg, f)?,
        Budget::Params(_) => bail!("i-SpaSP takes --ratio or --target-macs, not --target-params"),
    };
    if a.steps > 1 {
        bail!("i-SpaSP prunes module by module (use --block-ft-samples), not in --steps");
    }
    log(format!(
        "i-SpaSP: {} two-layer modules, keep ratio {:.4}",
        modules.len(),
        cfg.keep
    ));
    let t = Instant::now();
    let mut block_secs = 0.0;
    let (graph, reports) = ispasp::prune(dense, train_ds, &cfg, &mut |g, rep| {
        log(format!(
            "  {:<24} {:>5} -> {:>5} in {:.2}s, residual {:.4e} -> {:.4e}",
            rep.module, rep.width, rep.kept, rep.seconds, rep.residual_start, rep.residual_final
        ));
        if a.block_ft_samples > 0 {
            let sub = train_ds.sample(a.block_ft_samples.min(train_ds.len()), a.seed + 1)?;
            block_secs += short_train(a, g, &sub, 1, a.seed)?;
        }
        Ok(())
    })?;
    Ok(Pruned {
        graph,
        prune_seconds: t.elapsed().as_secs_f64() - block_secs,
        train_seconds: block_secs,
        details: Some(serde_json::json!({
            "keep": cfg.keep,
            "iterations": cfg.select.iterations,
            "samples": cfg.samples,
            "bn_mode": cfg.bn_mode,
            "modules": reports,
        })),
    })
}

/// STAMP: encode a target sample set, generate gates, threshold them (or meet a MACs
/// budget), fold into batch norm, remove channels; a new head if the target has other
/// classes. Fine-tuning is the common `--finetune-epochs` stage.
fn prune_stamp(a: &PruneArgs, dense: &Graph, train_ds: &Dataset, budget: Budget) -> Result<Pruned> {
    use lopper::methods::stamp::{head, meta, store};
    let path = a
        .generator
        .as_ref()
        .context("--method stamp needs --generator G (written by lopper stamp meta-train)")?;
    let macs = match budget {
        Budget::Macs(f) => Some(f),
        Budget::Ratio(0.0) => None,
        _ => bail!("STAMP takes --target-macs (a fraction of the dense MACs) or --ratio 0 (the generator's own threshold)"),
    };
    let (st, _) = store::load(path, dense)?;
    let t = Instant::now();
    let set = meta::sample_set(train_ds, a.set_size, a.seed)?;
    let (mut z, tau) = st.target_gates(dense, train_ds, &set, macs)?;
    if a.stamp_random {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand_pcg::Pcg64::seed_from_u64(a.seed ^ 0x5EED);
        for zs in z.iter_mut() {
            let k = zs.iter().filter(|v| **v != 0.0).count();
            let mut idx: Vec<usize> = (0..zs.len()).collect();
            idx.shuffle(&mut rng);
            zs.iter_mut().for_each(|v| *v = 0.0);
            for &i in &idx[..k] {
                zs[i] = 1.0;
            }
        }
    }
    let out_width = dense.shapes()?[dense.outputs[0]].iter().product::<usize>();
    let pruned = if a.stamp_adapt > 0 {
        // Adapt a copy with the target's head through the generated gates, then prune it.
        let net = head::with_head(dense, train_ds.num_classes, a.seed)?;
        let params = st.gate_params(dense, train_ds, &set)?;
        let net = st.adapt(
            &net,
            train_ds,
            &params,
            a.stamp_adapt,
            a.lr,
            a.batch_size,
            a.seed,
        )?;
        let groups = lopper::prune::dependency_groups(&net)?;
        let sites = lopper::methods::stamp::gates::gate_sites(&net, &groups);
        lopper::methods::stamp::gates::fold_and_prune(&net, &groups, &sites, &z)?
    } else {
        let pruned =
            lopper::methods::stamp::gates::fold_and_prune(dense, &st.groups, &st.sites, &z)?;
        if out_width != train_ds.num_classes {
            head::with_head(&pruned, train_ds.num_classes, a.seed)?
        } else {
            pruned
        }
    };
    let kept: Vec<usize> = z
        .iter()
        .map(|v| v.iter().filter(|x| **x != 0.0).count())
        .collect();
    Ok(Pruned {
        graph: pruned,
        prune_seconds: t.elapsed().as_secs_f64(),
        train_seconds: 0.0,
        details: Some(
            serde_json::json!({"threshold": tau, "kept_per_group": kept, "set_size": a.set_size, "adapt_steps": a.stamp_adapt}),
        ),
    })
}

/// DWR: collect axis points (step fine-tuning: --step-epochs), fit, solve, snap, build.
fn prune_dwr(
    a: &PruneArgs,
    dense: &Graph,
    train_ds: &Dataset,
    test_ds: &Dataset,
    budget: Budget,
    log: &dyn Fn(String),
) -> Result<Pruned> {
    use lopper::methods::dwr;
    let Budget::Macs(t) = budget else {
        bail!("DWR takes --target-macs (a fraction of the dense MACs)");
    };
    let axes = a.dwr_axes.mask();
    let cfg = dwr::DwrConfig {
        ft_epochs: a.step_epochs,
        res_step: a.dwr_res_step,
        seed: a.seed,
        ..Default::default()
    };
    let t0 = Instant::now();
    let order = dwr::depth_order(dense, train_ds, 512)?;
    let mut train_secs = 0.0;
    let points = dwr::collect(
        dense,
        &order,
        &cfg,
        a.dwr_cache.as_deref(),
        &mut |g, seed| {
            if cfg.ft_epochs > 0 {
                train_secs += short_train(a, g, train_ds, cfg.ft_epochs, seed)?;
            }
            Ok(())
        },
        &|g| Ok(train::evaluate(g, test_ds, 500)?.top1),
    )?;
    for p in &points {
        log(format!(
            "  {:<10} d {:.3} w {:.3} r {:.3}: top-1 {}",
            p.axis,
            p.point.d,
            p.point.w,
            p.point.r,
            pct(p.point.acc)
        ));
    }
    let sol = dwr::solve(dense, &order, &points, &cfg, t)?;
    let (config, macs, predicted) = if axes == [true; 3] {
        (sol.config, sol.macs, sol.predicted)
    } else {
        dwr::snap(dense, &order, &sol.map, t, cfg.lo, cfg.res_step, axes)?
    };
    log(format!(
        "DWR: predictor degree {} (LOO {:?}); continuous optimum d {:.3} w {:.3} r {:.3} (F {:.4}); \
         snapped: {} blocks removed, width {:.3}, {} px, {} MACs, predicted top-1 {}",
        sol.map.degree,
        sol.loo,
        sol.optimum.d,
        sol.optimum.w,
        sol.optimum.r,
        sol.optimum.f,
        config.blocks_removed,
        config.width,
        config.px,
        cost::human(macs),
        pct(predicted)
    ));
    let slope = sol.map.min_slope(cfg.lo, 12);
    if slope < -1e-6 {
        log(format!(
            "warning: the fitted predictor decreases somewhere on the box (slope {slope:.3}): \
             accuracy rose as the model shrank (is the dense model trained?)"
        ));
    }
    let graph = dwr::build(dense, &order, config)?;
    Ok(Pruned {
        graph,
        prune_seconds: t0.elapsed().as_secs_f64() - train_secs,
        train_seconds: train_secs,
        details: Some(serde_json::json!({
            "axes": name(&a.dwr_axes),
            "points": points,
            "map": sol.map,
            "loo": sol.loo,
            "optimum": sol.optimum,
            "config": config,
            "macs": macs,
            "predicted": predicted,
            "depth_order": order,
        })),
    })
}
