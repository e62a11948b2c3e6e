//! lopper: prune trained neural networks and measure the result.
//!
//! Layers: [`graph`] (typed DAG IR, shapes, costs, save/load), [`kernels`] (fast CPU ops as
//! candle custom ops), [`exec`] (forward in train/eval mode), [`train`] (losses, optimizers,
//! schedules, the training loop), [`data`] (datasets and batching), [`zoo`] (model builders).

pub mod bench;
pub mod charts;
pub mod data;
pub mod device;
pub mod exec;
pub mod graph;
pub mod kernels;
pub mod methods;
pub mod onnx;
pub mod prune;
pub mod recipe;
pub mod sparse;
pub mod train;
pub mod util;
pub mod zoo;
