//! Weight sparsity: which layers are prunable, element masks (unstructured and N:M), how
//! masks are applied and measured, batch-norm re-estimation after masking, and the
//! compressed (CSR) form that sparse inference kernels run on and sparse models are saved in.
//!
//! Structured pruning ([`crate::prune`]) removes channels and returns a smaller graph;
//! sparsity keeps the graph and zeroes weights. Both report the same costs, with sparse MACs
//! counted over non-zero weights.

pub mod bn;
pub mod csr;
pub mod eval;
pub mod layers;
pub mod mask;

pub use bn::recalibrate_bn;
pub use csr::{CsrMatrix, SparsePack};
pub use layers::{apply_masks, prunable_layers, sparsity_report, LayerSparsity, SparseLayer};
pub use mask::{global_masks, magnitude_mask, nm_mask, row_masks, Pattern};
