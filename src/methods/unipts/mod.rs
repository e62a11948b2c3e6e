//! UniPTS (Xie et al., CVPR 2024): post-training sparsity from a small calibration set.
//! Spec: `shared/specs/unipts.md`. This module so far holds the method's two exact pieces —
//! the reducing–regrowing decoding of a per-layer sparsity genome and the base-decayed
//! distillation objective — with the spec's golden values in `tests/unipts.rs`. The
//! evolutionary search, dynamic sparse training and the sparse kernels are not built yet.

pub mod decode;
pub mod loss;

pub use decode::{kept_counts, layer_sparsity};
pub use loss::{base_decayed_kd, tau_at};
