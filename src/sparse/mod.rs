//! Weight sparsity: which layers are prunable, element masks (unstructured and N:M), how
//! masks are applied and measured, and batch-norm re-estimation after masking. The
//! compressed (CSR) storage is plain IR data ([`crate::graph::csr`]); the kernels over it
//! are in [`crate::kernels::csr`] and the plan that packs a graph's sparse layers is
//! [`crate::exec::SparsePack`].
//!
//! Structured pruning ([`crate::prune`]) removes channels and returns a smaller graph;
//! sparsity keeps the graph and zeroes weights. Both report the same costs, with sparse MACs
//! counted over non-zero weights.

pub mod bn;
pub mod eval;
pub mod layers;
pub mod mask;

pub use crate::graph::csr::CsrMatrix;
pub use bn::recalibrate_bn;
pub use layers::{apply_masks, prunable_layers, sparsity_report, LayerSparsity, SparseLayer};
pub use mask::{global_masks, magnitude_mask, nm_mask, row_masks, Pattern};
