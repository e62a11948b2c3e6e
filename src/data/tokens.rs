//! Token datasets from pre-tokenised files: the tokenizer-free path for BERT-style models.
//! A folder holds `labels.npy` (`[N]` class indices) and one `[N, T]` integer array per
//! model input, named after the input (`input_ids.npy`, `attention_mask.npy`; a model's
//! missing attention mask is all ones), as `np.save` writes tokenizer output; optionally
//! `classes.txt` (one name per line). With `train/` and `test/` sub-folders those are the
//! splits; without them a [`Holdout`] splits the one set.

use super::dataset::{Dataset, TokenArray};
use super::npy::read_ints;
use super::registry::{Holdout, Split};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Whether `p` is a token dataset folder (has `labels.npy` at the top or in `train/`).
pub fn is_token_folder(p: &Path) -> bool {
    p.join("labels.npy").is_file() || p.join("train").join("labels.npy").is_file()
}

/// Loads one split of a token dataset folder.
pub fn token_folder(p: &Path, split: Split, holdout: Option<Holdout>) -> Result<Dataset> {
    let split_dirs = p.join("train").join("labels.npy").is_file();
    match (split_dirs, holdout) {
        (true, Some(_)) => bail!(
            "{}: has train/ and test/ folders, which are its splits; drop --holdout",
            p.display()
        ),
        (true, None) => read_set(&p.join(split.name()), p),
        (false, None) => bail!(
            "{}: a token dataset without train/ and test/ folders needs --holdout to split off a test set",
            p.display()
        ),
        (false, Some(h)) => {
            if !(h.fraction > 0.0 && h.fraction < 1.0) {
                bail!("--holdout {} must be in (0, 1)", h.fraction);
            }
            let full = read_set(p, p)?;
            let n = full.len();
            if n < 2 {
                bail!("{}: {n} sample(s) cannot be split into train and test", p.display());
            }
            let n_test = ((n as f64 * h.fraction).round() as usize).clamp(1, n - 1);
            let order = full.shuffled(h.seed);
            let mut pos = match split {
                Split::Test => order[..n_test].to_vec(),
                Split::Train => order[n_test..].to_vec(),
            };
            pos.sort_unstable();
            full.subset(&pos)
        }
    }
}

/// The arrays of one folder: `labels.npy` plus every other `.npy`, sorted by name.
fn read_set(dir: &Path, root: &Path) -> Result<Dataset> {
    let lp = dir.join("labels.npy");
    let labels = read_ints(&lp)?;
    if labels.shape.len() != 1 {
        bail!(
            "{}: labels must be one class index per sample ([N]), got shape {:?}",
            lp.display(),
            labels.shape
        );
    }
    let n = labels.shape[0];
    let labels: Vec<u16> = labels
        .values
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            u16::try_from(l).with_context(|| {
                format!(
                    "{}: sample {i} has label {l}, not a class index",
                    lp.display()
                )
            })
        })
        .collect::<Result<_>>()?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| {
            f.extension().is_some_and(|e| e == "npy")
                && f.file_name() != Some("labels.npy".as_ref())
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no token arrays beside labels.npy (expected e.g. input_ids.npy)",
            dir.display()
        );
    }
    let arrays = files
        .iter()
        .map(|f| {
            let a = read_ints(f)?;
            if a.shape.len() != 2 || a.shape[0] != n {
                bail!(
                    "{}: expected [{n}, T] (one row per label in labels.npy), got shape {:?}",
                    f.display(),
                    a.shape
                );
            }
            let name = f
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            Ok(TokenArray {
                name,
                len: a.shape[1],
                values: a.values,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let classes = match std::fs::read_to_string(root.join("classes.txt")) {
        Ok(t) => t
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect(),
        Err(_) => Vec::new(),
    };
    let origin = dir.display().to_string();
    let mut d = Dataset::from_tokens(&origin, arrays, labels, classes)?;
    d.origin = origin;
    Ok(d)
}
