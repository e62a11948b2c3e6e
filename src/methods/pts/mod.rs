//! Post-training sparsity baselines: one-shot masks from a small calibration set, no
//! full training data. Uniform and global magnitude, Wanda (activation-weighted magnitude),
//! POT (OpenVINO's layer-wise calibrated pruning) and SparseGPT (layer-wise
//! optimal-brain-surgeon updates). Every one-shot baseline ends with a
//! batch-norm re-estimation on the calibration set, the standard free repair after masking.
//! UniPTS, the method these are compared with, is in [`crate::methods::unipts`].

pub mod magnitude;
pub mod pot;
pub mod sparsegpt;
pub mod wanda;

pub use magnitude::{global_magnitude, uniform_magnitude};
pub use pot::{pot, PotConfig};
pub use sparsegpt::sparsegpt;
pub use wanda::wanda;
