//! Datasets: IDX (MNIST, Fashion-MNIST, digits 8x8) and JPEG image folders (CIFAR-10
//! JPEG), views (class and sample subsets), augmentation and normalised batches.
//!
//! Data are read from `../shared/data` by default; `--data-dir` or `LOPPER_DATA`
//! override it. The 8x8 digits set is embedded in the binary, so the demo needs no files.

pub mod augment;
pub mod dataset;
pub mod idx;
pub mod jpeg_tar;
pub mod npy;
mod registry;
pub mod resize;
pub mod tokens;

pub use augment::Augment;
pub use dataset::{Dataset, Features, TokenArray};
pub use registry::{data_dir, load, load_with, Holdout, Split, DATASETS};
