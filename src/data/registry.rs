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

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// How to split an image folder that has no `train/` and `test/` folders: hold out this
/// fraction of the samples (a seeded random choice) as the test split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Holdout {
    pub fraction: f64,
    pub seed: u64,
}

/// Loads a named dataset split. `dir` overrides [`data_dir`].
pub fn load(name: &str, split: Split, dir: Option<&Path>) -> Result<Dataset> {
    load_with(name, split, dir, None)
}

/// [`load`], with a holdout split for image folders without split folders.
pub fn load_with(
    name: &str,
    split: Split,
    dir: Option<&Path>,
    holdout: Option<Holdout>,
) -> Result<Dataset> {
    if holdout.is_some() && DATASETS.contains(&name) {
        bail!("--holdout is for image folders without train/ and test/ folders; '{name}' has its own test split");
    }
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
                "embedded digits labels",
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
                &lp.display().to_string(),
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
            let d = jpeg_tar::load(&f, None)?;
            // Train-set statistics of this JPEG variant (shared/data README).
            let mut ds = Dataset::new(
                "cifar10",
                d.pixels,
                d.labels,
                d.shape,
                255.0,
                vec![0.4913, 0.4821, 0.4465],
                vec![0.2452, 0.2428, 0.2606],
                d.classes,
            )?;
            ds.origin = f.display().to_string();
            ds.default_augment = super::Augment::cifar();
            Ok(ds)
        }
        other => {
            let p = Path::new(other);
            if super::tokens::is_token_folder(p) {
                super::tokens::token_folder(p, split, holdout)
            } else if p.exists() {
                image_folder(p, split, holdout)
            } else {
                bail!("unknown dataset '{other}'; known: {} (or a path to a .tar/.tar.gz/folder of [train|test/]<class>/*.jpg, or a token folder of [train|test/]labels.npy + input_ids.npy)", DATASETS.join(", "))
            }
        }
    }
}

/// A user's image folder or tar. With `train/` and `test/` folders those are the splits;
/// without them a [`Holdout`] is required. Both splits are normalised with the training
/// split's statistics.
fn image_folder(p: &Path, split: Split, holdout: Option<Holdout>) -> Result<Dataset> {
    let origin = p.display().to_string();
    let make = |d: jpeg_tar::Decoded| {
        let mut ds = Dataset::new(
            &origin,
            d.pixels,
            d.labels,
            d.shape,
            255.0,
            vec![0.0; 3],
            vec![1.0; 3],
            d.classes,
        )?;
        ds.origin = origin.clone();
        Ok::<_, anyhow::Error>(ds)
    };
    let (train, wanted) = match holdout {
        Some(h) => {
            if !(h.fraction > 0.0 && h.fraction < 1.0) {
                bail!("--holdout {} must be in (0, 1)", h.fraction);
            }
            if jpeg_tar::has_split_folders(p)? {
                bail!(
                    "{origin}: has train/ and test/ folders, which are its splits; drop --holdout"
                );
            }
            let full = make(jpeg_tar::load(p, None)?)?;
            let n = full.len();
            let n_test = ((n as f64 * h.fraction).round() as usize).clamp(1, n.saturating_sub(1));
            if n < 2 {
                bail!("{origin}: {n} image(s) cannot be split into train and test");
            }
            let order = full.shuffled(h.seed);
            let mut test: Vec<usize> = order[..n_test].to_vec();
            let mut train: Vec<usize> = order[n_test..].to_vec();
            test.sort_unstable();
            train.sort_unstable();
            let tr = full.subset(&train)?;
            let want = match split {
                Split::Train => tr.clone(),
                Split::Test => full.subset(&test)?,
            };
            (tr, want)
        }
        None => {
            let tr = make(jpeg_tar::load(p, Some("train"))?)?;
            let want = match split {
                Split::Train => tr.clone(),
                Split::Test => {
                    let te = make(jpeg_tar::load(p, Some("test"))?)?;
                    if te.classes != tr.classes {
                        bail!(
                            "{origin}: test/ has classes {:?} but train/ has {:?}; both splits need the same class folders",
                            te.classes,
                            tr.classes
                        );
                    }
                    if te.shape != tr.shape {
                        bail!(
                            "{origin}: test/ images are {:?}, train/ images {:?}",
                            te.shape,
                            tr.shape
                        );
                    }
                    te
                }
            };
            (tr, want)
        }
    };
    let (m, s) = train.channel_stats();
    let mut ds = wanted;
    ds.mean = m;
    ds.std = s;
    Ok(ds)
}

fn idx_dataset(
    name: &str,
    px: Vec<u8>,
    dims: Vec<usize>,
    labels: Vec<u8>,
    max: f32,
    origin: &str,
    label_origin: &str,
) -> Result<Dataset> {
    if dims.len() != 3 {
        bail!("{origin}: image IDX must be 3-d (N, rows, cols), got {dims:?}");
    }
    if labels.len() != dims[0] {
        bail!(
            "{origin}: {} images but {label_origin} has {} labels",
            dims[0],
            labels.len()
        );
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
    .with_context(|| label_origin.to_string())?;
    ds.origin = label_origin.to_string();
    let (m, s) = ds.channel_stats();
    ds.mean = m;
    ds.std = s;
    Ok(ds)
}
