//! What a training run is told and what it reports: the configuration (serialised into
//! checkpoints, so a resume can check it), options, and the per-epoch log.

use super::optim::OptimizerKind;
use super::schedule::Schedule;
use crate::data::Dataset;
use crate::graph::Graph;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub optimizer: OptimizerKind,
    pub schedule: Schedule,
    pub warmup_epochs: f64,
    pub label_smoothing: f64,
    pub seed: u64,
    pub crop_pad: usize,
    pub hflip: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            lr: 0.1,
            weight_decay: 5e-4,
            optimizer: OptimizerKind::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            schedule: Schedule::Cosine { min_lr: 0.0 },
            warmup_epochs: 0.0,
            label_smoothing: 0.0,
            seed: 0,
            crop_pad: 0,
            hflip: false,
        }
    }
}

/// A dense model to distil from: loss = (1-alpha)·CE + alpha·KD(T).
pub struct Teacher<'a> {
    pub graph: &'a Graph,
    pub temperature: f64,
    pub alpha: f64,
}

#[derive(Default)]
pub struct TrainOpts<'a> {
    /// Where per-batch progress and per-epoch lines go (`None`: nowhere).
    pub progress: Option<&'a dyn crate::util::Progress>,
    /// Write a checkpoint here after every epoch.
    pub checkpoint: Option<PathBuf>,
    pub teacher: Option<Teacher<'a>>,
    /// Evaluate on this set after every epoch.
    pub test: Option<&'a Dataset>,
    /// Stop after this many epochs in this call (for interrupt/resume tests), if set.
    pub stop_after: Option<usize>,
    /// Take the path a GPU takes even on the CPU: tensor-op optimizer updates, the loss
    /// and accuracy summed on the device and read back every
    /// [`crate::train::SYNC_EVERY`] steps. Always on for a graph off the CPU.
    pub device_path: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub test_top1: Option<f64>,
    pub test_top5: Option<f64>,
    pub seconds: f64,
    pub samples_per_sec: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainResult {
    pub history: Vec<EpochLog>,
    pub seconds: f64,
}
