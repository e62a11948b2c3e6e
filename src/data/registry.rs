//! Named datasets and where their files are.

use super::dataset::Dataset;
use super::idx::{parse_idx, read_idx};
use super::jpeg_tar;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const DATASETS: &[&str] = &["digits", "mnist", "fashion-mnist", "cifar10"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// The data directory: `LOPPER_DATA`, else `../shared/data` relative to the working
/// directory, else relative to this crate's source (for tests run from anywhere).
pub fn data_dir() -> PathBuf {
    if let Ok(d) = std::env::var("LOPPER_DATA") {
        return PathBuf::from(d);
    }
    let rel = PathBuf::from("../shared/data");
    if rel.is_dir() {
        return rel;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

const DIGITS_IMAGES: &[u8] = include_bytes!("../../data/digits-8x8/digits-images-idx3-ubyte.gz");
const DIGITS_LABELS: &[u8] = include_bytes!("../../data/digits-8x8/digits-labels-idx1-ubyte.gz");

/// Digits 8x8 test split: the last 360 of 1,797 samples (fixed, ~20 %).
const DIGITS_TEST: usize = 360;

fn digit_names() -> Vec<String> {
    (0..10).map(|i| i.to_string()).collect()
}

/// Loads a named dataset split. `dir` overrides [`data_dir`].
pub fn load(name: &str, split: Split, dir: Option<&Path>) -> Result<Dataset> {
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(data_dir);
    let tr = split == Split::Train;
    match name {
        "digits" => {
            let imgs = parse_idx(
                &super::idx::gunzip_if_needed(DIGITS_IMAGES.to_vec(), "embedded digits")?,
                "embedded digits images",
            )?;
            let labs = parse_idx(
                &super::idx::gunzip_if_needed(DIGITS_LABELS.to_vec(), "embedded digits")?,
                "embedded digits labels",
            )?;
            let full = idx_dataset(
                "digits",
                imgs.data,
                imgs.dims,
                labs.data,
                16.0,
                "embedded digits",
            )?;
            let n = full.len();
            let pos: Vec<usize> = if tr {
                (0..n - DIGITS_TEST).collect()
            } else {
                (n - DIGITS_TEST..n).collect()
            };
            full.subset(&pos)
        }
        "mnist" | "fashion-mnist" => {
            let pre = if tr { "train" } else { "t10k" };
            let d = dir.join(name);
            let ip = d.join(format!("{pre}-images-idx3-ubyte.gz"));
            let lp = d.join(format!("{pre}-labels-idx1-ubyte.gz"));
            let imgs = read_idx(&ip)?;
            let labs = read_idx(&lp)?;
            let mut ds = idx_dataset(
                name,
                imgs.data,
                imgs.dims,
                labs.data,
                255.0,
                &ip.display().to_string(),
            )?;
            // Canonical train-set statistics, so both splits normalise alike.
            let (m, s) = if name == "mnist" {
                (0.1307, 0.3081)
            } else {
                (0.2860, 0.3530)
            };
            ds.mean = vec![m];
            ds.std = vec![s];
            Ok(ds)
        }
        "cifar10" => {
            let f = dir.join("cifar10-jpeg").join(format!(
                "cifar10-jpeg-{}.tar.gz",
                if tr { "train" } else { "test" }
            ));
            let d = jpeg_tar::load(&f)?;
            // Train-set statistics of this JPEG variant (shared/data README).
            Dataset::new(
                "cifar10",
                d.pixels,
                d.labels,
                d.shape,
                255.0,
                vec![0.4913, 0.4821, 0.4465],
                vec![0.2452, 0.2428, 0.2606],
                d.classes,
            )
        }
        other => {
            // A path to an image folder / tar of one.
            let p = Path::new(other);
            if p.exists() {
                let d = jpeg_tar::load(p)?;
                let mut ds = Dataset::new(
                    other,
                    d.pixels,
                    d.labels,
                    d.shape,
                    255.0,
                    vec![0.0; 3],
                    vec![1.0; 3],
                    d.classes,
                )?;
                let (m, s) = ds.channel_stats();
                ds.mean = m;
                ds.std = s;
                Ok(ds)
            } else {
                bail!("unknown dataset '{other}'; known: {} (or a path to a .tar/.tar.gz/folder of <class>/*.jpg)", DATASETS.join(", "))
            }
        }
    }
}

fn idx_dataset(
    name: &str,
    px: Vec<u8>,
    dims: Vec<usize>,
    labels: Vec<u8>,
    max: f32,
    origin: &str,
) -> Result<Dataset> {
    if dims.len() != 3 {
        bail!("{origin}: image IDX must be 3-d (N, rows, cols), got {dims:?}");
    }
    if labels.len() != dims[0] {
        bail!("{origin}: {} images but {} labels", dims[0], labels.len());
    }
    let mut ds = Dataset::new(
        name,
        px,
        labels.into_iter().map(|l| l as u16).collect(),
        [1, dims[1], dims[2]],
        max,
        vec![0.0],
        vec![1.0],
        digit_names(),
    )
    .with_context(|| origin.to_string())?;
    let (m, s) = ds.channel_stats();
    ds.mean = m;
    ds.std = s;
    Ok(ds)
}
