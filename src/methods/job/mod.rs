//! The `prune` job as a library call: one typed configuration ([`PruneJob`]) per run, one
//! entry point ([`run`]) returning the smaller graph and its typed report.
//!
//! The stages are the same for every method: measure the dense model, prune (an engine
//! criterion one-shot or iteratively, i-SpaSP module by module, STAMP from a target set,
//! DWR over depth × width × resolution), measure, fine-tune (optionally distilling from
//! the dense model), measure again. Progress goes to the caller's [`Progress`] sink, never to
//! the terminal.

mod dwr;
mod engine;
mod ispasp;
mod stamp;

pub use dwr::DwrRun;
pub use engine::{step_budget, EngineRun};
pub use ispasp::IspaspRun;
pub use stamp::StampRun;

use crate::data::Dataset;
use crate::graph::Graph;
use crate::methods::report::{self, Command, Report, Seconds, SCHEMA};
use crate::prune::Budget;
use crate::train::{self, OptimizerKind, Schedule, TrainConfig, TrainOpts};
use crate::util::Progress;
use anyhow::Result;
use std::cell::RefCell;

/// Which method prunes, with its own settings.
#[derive(Clone, Debug)]
pub enum Method {
    Engine(EngineRun),
    Ispasp(IspaspRun),
    Stamp(StampRun),
    Dwr(DwrRun),
}

/// Training settings shared by every training pass of a job.
#[derive(Clone, Debug)]
pub struct Training {
    pub lr: f64,
    pub batch_size: usize,
    /// Epochs of the final fine-tuning (cosine schedule).
    pub finetune_epochs: usize,
    /// Epochs of the short constant-rate passes between steps (engine, DWR collection).
    pub step_epochs: usize,
    /// Weight of the distillation term from the dense model in the final fine-tuning.
    pub distill: Option<f64>,
    /// Evaluate on the test set after every fine-tuning epoch (accuracy-vs-time curves).
    pub curve: bool,
    /// The fine-tuning optimizer (SGD with Nesterov momentum; AdamW for transformers) and
    /// its weight decay.
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
}

impl Default for Training {
    fn default() -> Self {
        Training {
            lr: 0.01,
            batch_size: 128,
            finetune_epochs: 0,
            step_epochs: 1,
            distill: None,
            curve: false,
            optimizer: TrainConfig::default().optimizer,
            weight_decay: TrainConfig::default().weight_decay,
        }
    }
}

/// One pruning run.
#[derive(Clone, Debug)]
pub struct PruneJob {
    pub method: Method,
    pub budget: Budget,
    pub training: Training,
    pub seed: u64,
    /// Names for the report (`method`, `scope`), as the user chose them.
    pub method_name: String,
    pub scope_name: String,
}

/// What a job returns: the pruned (and fine-tuned) graph and the report that proves it.
pub struct Outcome {
    pub graph: Graph,
    pub report: Report,
}

/// The pruning stage's result, before the final fine-tuning.
pub(crate) struct Pruned {
    pub graph: Graph,
    /// Time spent choosing and cutting channels (not training).
    pub prune_seconds: f64,
    /// Training done during pruning (between steps, after blocks).
    pub train_seconds: f64,
    /// Method-specific detail for the report.
    pub details: Option<serde_json::Value>,
}

/// What the method drivers share: the data, the training settings and the progress sink.
pub(crate) struct Ctx<'a> {
    pub train: &'a Dataset,
    /// Held-out data for progress lines and DWR's accuracy points (`None`: data-free).
    pub test: Option<&'a Dataset>,
    pub training: &'a Training,
    pub seed: u64,
    pub progress: &'a dyn Progress,
}

impl Ctx<'_> {
    /// Fine-tuning settings of every training pass (with the dataset's default
    /// augmentation: crop + flip for CIFAR-10).
    pub fn train_config(
        &self,
        ds: &Dataset,
        epochs: usize,
        schedule: Schedule,
        seed: u64,
    ) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size: self.training.batch_size,
            lr: self.training.lr,
            optimizer: self.training.optimizer.clone(),
            weight_decay: self.training.weight_decay,
            schedule,
            crop_pad: ds.default_augment.crop_pad,
            hflip: ds.default_augment.hflip,
            seed,
            ..Default::default()
        }
    }

    /// A short constant-rate fine-tuning pass (between steps, after blocks); its seconds.
    pub fn short_train(&self, g: &Graph, ds: &Dataset, epochs: usize, seed: u64) -> Result<f64> {
        let tcfg = self.train_config(ds, epochs, Schedule::Constant, seed);
        let opts = TrainOpts {
            progress: Some(self.progress),
            ..Default::default()
        };
        Ok(train::train(g, ds, &tcfg, &opts)?.seconds)
    }
}

/// Runs a pruning job on `dense`: `train` feeds criteria, methods and fine-tuning, `test`
/// measures accuracy (`None`: data-free pruning, no accuracy). The dense graph is left
/// unchanged.
pub fn run(
    dense: &Graph,
    train_ds: &Dataset,
    test: Option<&Dataset>,
    job: &PruneJob,
    progress: &dyn Progress,
) -> Result<Outcome> {
    job.budget.validate()?;
    let warnings = RefCell::new(Vec::new());
    let accuracy = |g: &Graph, what: &str| -> Result<Option<f64>> {
        let Some(ds) = test else { return Ok(None) };
        let ev = train::evaluate(g, ds, 500)?;
        if let Some(w) = ev.warning() {
            let w = format!("{what}: {w}");
            progress.line(&format!("warning: {w}"));
            warnings.borrow_mut().push(w);
        }
        Ok(Some(ev.top1))
    };
    let show = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{:.2}%", 100.0 * v));
    let acc_dense = accuracy(dense, "test")?;
    progress.line(&format!("dense: top-1 {}", show(acc_dense)));
    let ctx = Ctx {
        train: train_ds,
        test,
        training: &job.training,
        seed: job.seed,
        progress,
    };
    let p = match &job.method {
        Method::Engine(m) => engine::prune(m, dense, job.budget, &ctx)?,
        Method::Ispasp(m) => ispasp::prune(m, dense, job.budget, &ctx)?,
        Method::Stamp(m) => stamp::prune(m, dense, job.budget, &ctx)?,
        Method::Dwr(m) => dwr::prune(m, dense, job.budget, &ctx)?,
    };
    let pruned = p.graph;
    let acc_pruned = accuracy(&pruned, "test")?;
    progress.line(&format!(
        "pruned in {:.1}s: top-1 {}",
        p.prune_seconds,
        show(acc_pruned)
    ));
    let mut ft_secs = p.train_seconds;
    let (mut acc_ft, mut curve) = (None, None);
    let t = &job.training;
    if t.finetune_epochs > 0 {
        let cosine = Schedule::Cosine { min_lr: 0.0 };
        let tcfg = ctx.train_config(train_ds, t.finetune_epochs, cosine, job.seed);
        let teacher = t.distill.map(|alpha| train::Teacher {
            graph: dense,
            temperature: 4.0,
            alpha,
        });
        let opts = TrainOpts {
            progress: Some(progress),
            teacher,
            test: test.filter(|_| t.curve),
            ..Default::default()
        };
        let r = train::train(&pruned, train_ds, &tcfg, &opts)?;
        ft_secs += r.seconds;
        curve = t.curve.then(|| r.history.clone());
        acc_ft = accuracy(&pruned, "fine-tuned")?;
        progress.line(&format!(
            "fine-tuned {} epochs in {ft_secs:.1}s: top-1 {}",
            t.finetune_epochs,
            show(acc_ft)
        ));
    }
    let (result, layers) = report::measure_result(dense, &pruned, acc_ft.or(acc_pruned), 10)?;
    let report = Report {
        schema: SCHEMA.into(),
        command: Command::Prune,
        method: job.method_name.clone(),
        budget: job.budget.to_string(),
        scope: Some(job.scope_name.clone()),
        pattern: None,
        calib: None,
        dense: report::measure(dense, acc_dense, 10)?,
        result,
        top1_before_finetune: acc_pruned,
        seconds: Seconds {
            method: p.prune_seconds,
            finetune: ft_secs,
        },
        layers,
        finetune_history: curve,
        details: p.details,
        warnings: warnings.into_inner(),
        blocked: crate::prune::blocked_groups(dense, &crate::prune::dependency_groups(dense)?),
    };
    Ok(Outcome {
        graph: pruned,
        report,
    })
}
