//! Training and evaluation: losses, metrics, optimizers, schedules, the training loop with
//! progress, JSON-able logs and atomic, resumable checkpoints.

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod schedule;
mod trainer;

pub use config::{EpochLog, Teacher, TrainConfig, TrainOpts, TrainResult};
pub use eval::{evaluate, fit_input, output_classes, EvalResult};
pub use optim::{Optimizer, OptimizerKind};
pub use schedule::Schedule;
pub use trainer::{train, SYNC_EVERY};
