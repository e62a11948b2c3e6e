//! The `sparsify` job as a library call: post-training sparsity from a small calibration
//! set — magnitude (uniform or global), Wanda, POT or UniPTS — then the typed report:
//! accuracy, per-layer sparsity, non-zero MACs, dense vs sparse-kernel latency, wall time.

use crate::data::Dataset;
use crate::exec::SparsePack;
use crate::graph::Graph;
use crate::methods::pts::{self, PotConfig};
use crate::methods::report::{self, Command, Report, Seconds, SCHEMA};
use crate::methods::unipts::{self, UniptsConfig};
use crate::sparse::bn::{recalibrate_bn, RecalibOpts};
use crate::sparse::layers::prunable_layers;
use crate::sparse::mask::{check_sparsity, Pattern};
use crate::train;
use crate::util::Progress;
use anyhow::{bail, Result};
use std::cell::RefCell;
use std::time::Instant;

/// Which post-training sparsity method, with its own settings.
#[derive(Clone, Debug)]
pub enum SparsifyMethod {
    /// The same fraction of the smallest |w| in every layer.
    Magnitude,
    /// One magnitude threshold over all layers.
    Global,
    /// |w|·‖x‖ per output row, from the calibration activations.
    Wanda,
    /// Layer-wise optimal-brain-surgeon masks and weight updates (Frantar & Alistarh).
    SparseGpt,
    /// OpenVINO's layer-wise calibrated pruning (no N:M variant).
    Pot(PotConfig),
    /// Searched per-layer sparsity, base-decayed distillation, dynamic sparse training.
    Unipts(Box<UniptsConfig>),
}

impl SparsifyMethod {
    /// The one-shot baselines end with a batch-norm re-estimation (a free repair).
    fn one_shot(&self) -> bool {
        matches!(
            self,
            Self::Magnitude | Self::Global | Self::Wanda | Self::SparseGpt
        )
    }
}

/// One sparsification run.
#[derive(Clone, Debug)]
pub struct SparsifyJob {
    pub method: SparsifyMethod,
    /// Fraction of zero weights over all conv and linear layers, in [0, 1).
    pub target: f64,
    pub pattern: Pattern,
    /// Re-estimate batch-norm statistics after the one-shot masks.
    pub recalib: bool,
    pub seed: u64,
    /// UniPTS: evaluate on the test set after every sparse-training epoch.
    pub curve: bool,
    /// The method's name for the report, as the user chose it.
    pub method_name: String,
}

/// The target sparsity from an explicit fraction and/or an N:M pattern (which fixes it).
pub fn resolve_target(sparsity: Option<f64>, pattern: Pattern) -> Result<f64> {
    let target = match (sparsity, pattern.fixed_sparsity()) {
        (Some(s), None) | (None, Some(s)) => s,
        (Some(s), Some(f)) if (s - f).abs() < 1e-9 => s,
        (Some(s), Some(f)) => bail!("sparsity {s} contradicts pattern {pattern} ({f})"),
        (None, None) => {
            bail!("give a sparsity (a fraction of zeros in [0, 1)) or an N:M pattern")
        }
    };
    check_sparsity(target)?;
    Ok(target)
}

/// What a job returns: the sparse graph (sparse kernels enabled) and its report.
pub struct SparsifyOutcome {
    pub graph: Graph,
    pub report: Report,
}

/// The UniPTS genome a report recorded (to share one search between ablations).
pub fn genome(r: &Report) -> Option<Vec<f64>> {
    serde_json::from_value(r.details.as_ref()?.get("genome")?.clone()).ok()
}

/// Sparsifies a copy of `dense` from `calib` and measures it on `test`.
pub fn run(
    dense: &Graph,
    calib: &Dataset,
    test: &Dataset,
    job: &SparsifyJob,
    progress: &dyn Progress,
) -> Result<SparsifyOutcome> {
    check_sparsity(job.target)?;
    let nm = matches!(job.pattern, Pattern::NM { .. });
    if nm && matches!(job.method, SparsifyMethod::Global | SparsifyMethod::Pot(_)) {
        bail!(
            "method '{}' has no N:M variant; use magnitude, wanda, sparsegpt or unipts",
            job.method_name
        );
    }
    if calib.is_empty() {
        bail!("the calibration set is empty");
    }
    let warnings = RefCell::new(Vec::new());
    let accuracy = |g: &Graph, what: &str| -> Result<f64> {
        let ev = train::evaluate(g, test, 500)?;
        if let Some(w) = ev.warning() {
            let w = format!("{what}: {w}");
            progress.line(&format!("warning: {w}"));
            warnings.borrow_mut().push(w);
        }
        Ok(ev.top1)
    };
    let acc_dense = accuracy(dense, "dense")?;
    progress.line(&format!("dense: top-1 {:.2}%", 100.0 * acc_dense));
    let t = Instant::now();
    let (mut sparse, details) = sparsify(dense, calib, test, job, progress)?;
    if job.recalib && job.method.one_shot() {
        let opts = RecalibOpts {
            seed: job.seed,
            ..Default::default()
        };
        recalibrate_bn(&sparse, calib, &opts)?;
    }
    let seconds = t.elapsed().as_secs_f64();
    let acc_sparse = accuracy(&sparse, "sparse")?;
    // Inference from here on runs the sparse kernels on the layers sparse enough for them.
    sparse.set_sparse_kernels(true);
    let packed = SparsePack::build(&sparse)?.len();
    progress.line(&format!("{packed} layers run on the sparse kernels"));
    let (result, layers) = report::measure_result(dense, &sparse, Some(acc_sparse), 4)?;
    let report = Report {
        schema: SCHEMA.into(),
        command: Command::Sparsify,
        method: job.method_name.clone(),
        budget: format!("zero {} of the weights", job.target),
        scope: None,
        pattern: Some(job.pattern.to_string()),
        calib: Some(calib.len()),
        dense: report::measure(dense, Some(acc_dense), 4)?,
        result,
        top1_before_finetune: None,
        seconds: Seconds {
            method: seconds,
            finetune: 0.0,
        },
        layers,
        finetune_history: None,
        details,
        warnings: warnings.into_inner(),
        blocked: Vec::new(),
    };
    Ok(SparsifyOutcome {
        graph: sparse,
        report,
    })
}

/// The method itself: a sparse copy of `dense` and the method's report detail.
fn sparsify(
    dense: &Graph,
    calib: &Dataset,
    test: &Dataset,
    job: &SparsifyJob,
    progress: &dyn Progress,
) -> Result<(Graph, Option<serde_json::Value>)> {
    let layers = prunable_layers(dense);
    let one_shot = |f: &dyn Fn(&Graph) -> Result<()>| -> Result<Graph> {
        let g = dense.deep_clone()?;
        f(&g)?;
        Ok(g)
    };
    let (s, p) = (job.target, job.pattern);
    Ok(match &job.method {
        SparsifyMethod::Magnitude => (
            one_shot(&|g| pts::uniform_magnitude(g, &layers, s, p).map(drop))?,
            None,
        ),
        SparsifyMethod::Global => (
            one_shot(&|g| pts::global_magnitude(g, &layers, s).map(drop))?,
            None,
        ),
        SparsifyMethod::Wanda => (
            one_shot(&|g| pts::wanda(g, &layers, calib, s, p).map(drop))?,
            None,
        ),
        SparsifyMethod::SparseGpt => (
            one_shot(&|g| pts::sparsegpt(g, &layers, calib, s, p).map(drop))?,
            None,
        ),
        SparsifyMethod::Pot(cfg) => (pts::pot(dense, calib, s, cfg)?, None),
        SparsifyMethod::Unipts(cfg) => {
            let mut cfg = (**cfg).clone();
            cfg.target = s;
            cfg.pattern = p;
            let curve = job.curve.then_some(test);
            let (g, res) = unipts::run(dense, calib, &cfg, curve, progress)?;
            progress.line(&format!(
                "search {:.1}s ({} evaluations), sparse training {:.1}s",
                res.search_seconds,
                res.search.as_ref().map_or(0, |s| s.evaluations),
                res.train_seconds
            ));
            (g, Some(serde_json::to_value(&res)?))
        }
    })
}
