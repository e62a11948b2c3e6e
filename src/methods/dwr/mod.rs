//! DWR (Wang et al., ICML 2021): pruning along depth, width and input resolution together.
//! Spec: `shared/specs/dwr.md`. The formulation (a polynomial accuracy predictor over
//! (d, w, r), maximised under `d·w²·r² = T`) is the paper's; the rank-1 CP form, LOO degree
//! choice, grid + Nelder–Mead solver and snapping are the spec's reference design.

pub mod linalg;
pub mod map;
pub mod solve;

pub use map::{fit, fit_auto, fit_degrees, loo_rmse, Map, Point};
pub use solve::{maximise, Optimum};
pub mod ops;
pub mod pipeline;

pub use ops::{depth_order, DepthOrder};
pub use pipeline::{build, collect, snap, solve, Collected, Config, DwrConfig, Solution};
