//! Training and evaluation: losses, metrics, optimizers, schedules, the training loop with
//! progress, JSON-able logs and atomic, resumable checkpoints.

pub mod checkpoint;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod schedule;
mod trainer;

pub use optim::{Optimizer, OptimizerKind};
pub use schedule::Schedule;
pub use trainer::{
    evaluate, fit_input, output_classes, train, EpochLog, EvalResult, Teacher, TrainConfig,
    TrainOpts, TrainResult,
};
