//! In-memory classification datasets with cheap views: images, or token sequences.
//!
//! Pixels stay as bytes (`N x C x H x W`, shared behind an `Arc`); token sets hold one
//! integer array per model input (`input_ids`, `attention_mask`: pre-tokenised text, the
//! tokenizer-free path). A view is a list of sample indices plus an optional label
//! remapping, so class subsets, sample subsets and calibration sets cost no copy. Image
//! batches are normalised to f32 on the fly; token batches are the integers as f32
//! (exact below 2²⁴, which loading checks).

use super::augment::Augment;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use std::sync::Arc;

/// One integer array of a token dataset: the values of one model input (named like it),
/// `len` per sample.
#[derive(Debug, PartialEq)]
pub struct TokenArray {
    pub name: String,
    pub len: usize,
    pub values: Vec<i64>,
}

/// The samples themselves.
#[derive(Clone, Debug)]
enum Store {
    Pixels(Arc<Vec<u8>>),
    Tokens(Arc<Vec<TokenArray>>),
}

/// A batch of samples as model inputs: one image tensor, or one tensor per token array
/// (with its name, which says which model input it feeds).
#[derive(Debug)]
pub enum Features {
    Images(Tensor),
    Tokens(Vec<(String, Tensor)>),
}

impl Features {
    /// The image batch; an error for token batches.
    pub fn into_images(self) -> Result<Tensor> {
        match self {
            Features::Images(t) => Ok(t),
            Features::Tokens(_) => bail!("expected an image batch, got token arrays"),
        }
    }
}

/// Largest token value a batch carries exactly (batches are f32).
const MAX_TOKEN: i64 = 1 << 24;

#[derive(Clone, Debug)]
pub struct Dataset {
    pub name: String,
    /// Where the samples came from (a file path, or "embedded digits"), for error messages.
    pub origin: String,
    store: Store,
    labels: Arc<Vec<u16>>,
    /// Sample indices of this view into `pixels`/`labels`.
    index: Vec<usize>,
    /// Label remapping of this view (class subsets renumber their classes from 0).
    remap: Option<Vec<Option<u16>>>,
    /// Per-sample shape `[C, H, W]` (token sets: `[1, 1, T]`).
    pub shape: [usize; 3],
    pub num_classes: usize,
    /// Value of a full-intensity pixel (255, or 16 for the 8x8 digits).
    pub max_value: f32,
    /// Per-channel mean and std of `pixel / max_value`.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Class names, if known.
    pub classes: Vec<String>,
    /// Class names of the full dataset (before any class subset).
    all_classes: Arc<Vec<String>>,
    /// The training augmentation this dataset gets unless told otherwise (set by the
    /// registry: CIFAR-10's pad-4 crop + flip; none for the digit sets, where flips would
    /// change the classes).
    pub default_augment: Augment,
}

impl Dataset {
    /// A dataset over all samples. Mean and std are given (per channel, in `[0, 1]` units).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        pixels: Vec<u8>,
        labels: Vec<u16>,
        shape: [usize; 3],
        max_value: f32,
        mean: Vec<f32>,
        std: Vec<f32>,
        classes: Vec<String>,
    ) -> Result<Self> {
        let per: usize = shape.iter().product();
        if per == 0 || pixels.len() != labels.len() * per {
            bail!(
                "{name}: {} pixel bytes do not make {} samples of {:?}",
                pixels.len(),
                labels.len(),
                shape
            );
        }
        Dataset::over(
            name,
            Store::Pixels(Arc::new(pixels)),
            labels,
            shape,
            max_value,
            mean,
            std,
            classes,
        )
    }

    /// The dataset over `store` (whose size the caller checked): labels checked against
    /// the classes.
    #[allow(clippy::too_many_arguments)]
    fn over(
        name: &str,
        store: Store,
        labels: Vec<u16>,
        shape: [usize; 3],
        max_value: f32,
        mean: Vec<f32>,
        std: Vec<f32>,
        classes: Vec<String>,
    ) -> Result<Self> {
        if !classes.is_empty() {
            if let Some(i) = labels.iter().position(|&l| l as usize >= classes.len()) {
                bail!(
                    "{name}: sample {i} has label {}, outside the {} classes 0..{} of this dataset",
                    labels[i],
                    classes.len(),
                    classes.len() - 1
                );
            }
        }
        let num_classes = classes
            .len()
            .max(labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0));
        Ok(Dataset {
            name: name.to_string(),
            origin: name.to_string(),
            index: (0..labels.len()).collect(),
            store,
            labels: Arc::new(labels),
            remap: None,
            shape,
            num_classes,
            max_value,
            mean,
            std,
            all_classes: Arc::new(classes.clone()),
            default_augment: Augment::default(),
            classes,
        })
    }

    /// A token dataset: one array per model input, every array `len` values per sample
    /// for the same `labels.len()` samples; values must lie in `0..2²⁴`.
    pub fn from_tokens(
        name: &str,
        arrays: Vec<TokenArray>,
        labels: Vec<u16>,
        classes: Vec<String>,
    ) -> Result<Self> {
        let n = labels.len();
        let Some(first) = arrays.first() else {
            bail!("{name}: a token dataset needs at least one array");
        };
        for a in &arrays {
            if a.len != first.len || a.values.len() != n * a.len {
                bail!(
                    "{name}: array '{}' has {} values, not {n} samples of {} (the length of '{}')",
                    a.name,
                    a.values.len(),
                    first.len,
                    first.name
                );
            }
            if let Some(k) = a.values.iter().position(|&v| !(0..MAX_TOKEN).contains(&v)) {
                bail!(
                    "{name}: array '{}' has value {} at sample {}, position {}; token ids and masks must lie in 0..{MAX_TOKEN}",
                    a.name,
                    a.values[k],
                    k / a.len.max(1),
                    k % a.len.max(1)
                );
            }
        }
        let t = first.len;
        let store = Store::Tokens(Arc::new(arrays));
        Dataset::over(
            name,
            store,
            labels,
            [1, 1, t],
            1.0,
            vec![0.0],
            vec![1.0],
            classes,
        )
    }

    /// Whether the samples are token arrays (not images).
    pub fn is_tokens(&self) -> bool {
        matches!(self.store, Store::Tokens(_))
    }

    /// Names of the token arrays (empty for images).
    pub fn token_names(&self) -> Vec<&str> {
        match &self.store {
            Store::Tokens(a) => a.iter().map(|a| a.name.as_str()).collect(),
            Store::Pixels(_) => Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Label of view sample `i`.
    pub fn label(&self, i: usize) -> u16 {
        let l = self.labels[self.index[i]];
        match &self.remap {
            Some(m) => m[l as usize].expect("views only hold mapped classes"),
            None => l,
        }
    }

    /// Errors naming the file and the sample when a label is not one of a model's
    /// `outputs` classes (a label 200 for a 10-class head would otherwise be a candle
    /// `gather` error, or silent training towards an output that does not exist).
    pub fn check_labels(&self, outputs: usize) -> Result<()> {
        if let Some(i) = (0..self.len()).find(|&i| self.label(i) as usize >= outputs) {
            bail!(
                "{}: sample {} has label {}, but the model scores only {outputs} classes (0..{}); check the data file or replace the model's head",
                self.origin,
                self.index[i],
                self.label(i),
                outputs.saturating_sub(1)
            );
        }
        Ok(())
    }

    /// Whether this view renumbers its classes (a [`Dataset::class_subset`]).
    pub fn is_relabelled(&self) -> bool {
        self.remap.is_some()
    }

    /// The same samples with their labels as in the full dataset (undoes the renumbering
    /// of [`Dataset::class_subset`]): for evaluating a model whose head still scores all
    /// the original classes.
    pub fn with_original_labels(&self) -> Dataset {
        let mut d = self.clone();
        d.remap = None;
        d.classes = self.all_classes.to_vec();
        d.num_classes = d.classes.len().max(
            (0..d.len())
                .map(|i| d.label(i) as usize + 1)
                .max()
                .unwrap_or(0),
        );
        d
    }

    /// Raw pixel bytes of view sample `i` (empty for token sets).
    pub fn pixels(&self, i: usize) -> &[u8] {
        let Store::Pixels(px) = &self.store else {
            return &[];
        };
        let per: usize = self.shape.iter().product();
        let j = self.index[i];
        &px[j * per..(j + 1) * per]
    }

    /// The bytes of view sample `i`, whatever it is (pixels, or every token array's values
    /// little-endian): what a data fingerprint hashes.
    pub fn sample_bytes(&self, i: usize) -> std::borrow::Cow<'_, [u8]> {
        match &self.store {
            Store::Pixels(_) => std::borrow::Cow::Borrowed(self.pixels(i)),
            Store::Tokens(arrays) => {
                let j = self.index[i];
                std::borrow::Cow::Owned(
                    arrays
                        .iter()
                        .flat_map(|a| &a.values[j * a.len..(j + 1) * a.len])
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                )
            }
        }
    }

    /// A view over the given positions of this view.
    pub fn subset(&self, positions: &[usize]) -> Result<Dataset> {
        if let Some(&p) = positions.iter().find(|&&p| p >= self.len()) {
            bail!(
                "{}: sample {p} out of range (view has {})",
                self.name,
                self.len()
            );
        }
        let mut d = self.clone();
        d.index = positions.iter().map(|&p| self.index[p]).collect();
        Ok(d)
    }

    /// `n` samples drawn without replacement with a seed (calibration sets, few-shot sets).
    pub fn sample(&self, n: usize, seed: u64) -> Result<Dataset> {
        if n > self.len() {
            bail!(
                "{}: asked for {n} samples, the set has only {}",
                self.name,
                self.len()
            );
        }
        let mut pos: Vec<usize> = (0..self.len()).collect();
        pos.shuffle(&mut Pcg64::seed_from_u64(seed));
        pos.truncate(n);
        pos.sort_unstable();
        self.subset(&pos)
    }

    /// The samples of the listed classes, relabelled `0..classes.len()` in the given order.
    pub fn class_subset(&self, classes: &[usize]) -> Result<Dataset> {
        let mut map: Vec<Option<u16>> = vec![None; self.num_classes];
        for (new, &c) in classes.iter().enumerate() {
            if c >= self.num_classes {
                bail!(
                    "{}: class {c} does not exist ({} classes)",
                    self.name,
                    self.num_classes
                );
            }
            map[c] = Some(new as u16);
        }
        let pos: Vec<usize> = (0..self.len())
            .filter(|&i| map[self.label(i) as usize].is_some())
            .collect();
        let mut d = self.subset(&pos)?;
        // Compose with any existing remap: map is over this view's labels.
        let base: Vec<Option<u16>> = match &self.remap {
            Some(m) => m.iter().map(|o| o.and_then(|l| map[l as usize])).collect(),
            None => map,
        };
        d.remap = Some(base);
        d.num_classes = classes.len();
        d.classes = classes
            .iter()
            .map(|&c| {
                self.classes
                    .get(c)
                    .cloned()
                    .unwrap_or_else(|| c.to_string())
            })
            .collect();
        d.name = format!("{}[classes {:?}]", self.name, classes);
        Ok(d)
    }

    /// A batch of view samples plus `[B]` u32 labels: images as normalised `[B, C, H, W]`
    /// f32 (flat inputs, MLPs, reshape the result themselves), token arrays as `[B, T]`
    /// each. Augmentation is for images: asked of a token set, it is an error.
    pub fn batch(
        &self,
        positions: &[usize],
        augment: Option<(&Augment, &mut Pcg64)>,
        device: &Device,
    ) -> Result<(Features, Tensor)> {
        let y: Vec<u32> = positions.iter().map(|&p| self.label(p) as u32).collect();
        let y = Tensor::from_vec(y, positions.len(), device)?;
        let Store::Tokens(arrays) = &self.store else {
            let x = self.image_batch(positions, augment, device)?;
            return Ok((Features::Images(x), y));
        };
        if augment.is_some() {
            bail!(
                "{}: image augmentation (crop, flip) does not apply to token sequences; turn it off (--augment false)",
                self.origin
            );
        }
        let xs = arrays
            .iter()
            .map(|a| {
                let v: Vec<f32> = positions
                    .iter()
                    .flat_map(|&p| {
                        let j = self.index[p];
                        a.values[j * a.len..(j + 1) * a.len]
                            .iter()
                            .map(|&v| v as f32)
                    })
                    .collect();
                Ok((
                    a.name.clone(),
                    Tensor::from_vec(v, (positions.len(), a.len), device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok((Features::Tokens(xs), y))
    }

    fn image_batch(
        &self,
        positions: &[usize],
        augment: Option<(&Augment, &mut Pcg64)>,
        device: &Device,
    ) -> Result<Tensor> {
        let [c, h, w] = self.shape;
        let per = c * h * w;
        let mut x = vec![0f32; positions.len() * per];
        let scale: Vec<f32> = self
            .std
            .iter()
            .map(|s| 1.0 / (s * self.max_value))
            .collect();
        let shift: Vec<f32> = self
            .mean
            .iter()
            .zip(&self.std)
            .map(|(m, s)| -m / s)
            .collect();
        let mut aug = augment;
        for (b, &p) in positions.iter().enumerate() {
            let src = self.pixels(p);
            let dst = &mut x[b * per..(b + 1) * per];
            for ch in 0..c {
                let (a, s) = (scale[ch], shift[ch]);
                for (d, &v) in dst[ch * h * w..(ch + 1) * h * w]
                    .iter_mut()
                    .zip(&src[ch * h * w..(ch + 1) * h * w])
                {
                    *d = v as f32 * a + s;
                }
            }
            if let Some((aug, rng)) = aug.as_mut() {
                aug.apply(dst, self.shape, rng);
            }
        }
        Ok(Tensor::from_vec(x, (positions.len(), c, h, w), device)?)
    }

    /// Positions `0..len` in a seeded random order (one epoch).
    pub fn shuffled(&self, seed: u64) -> Vec<usize> {
        let mut pos: Vec<usize> = (0..self.len()).collect();
        pos.shuffle(&mut Pcg64::seed_from_u64(seed));
        pos
    }

    /// Per-channel mean and std of the pixels (in `[0, 1]` units) of this view.
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let [c, h, w] = self.shape;
        let mut s = vec![0f64; c];
        let mut sq = vec![0f64; c];
        for i in 0..self.len() {
            let px = self.pixels(i);
            for ch in 0..c {
                for &v in &px[ch * h * w..(ch + 1) * h * w] {
                    let v = v as f64 / self.max_value as f64;
                    s[ch] += v;
                    sq[ch] += v * v;
                }
            }
        }
        let n = (self.len() * h * w).max(1) as f64;
        let mean: Vec<f32> = s.iter().map(|v| (v / n) as f32).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, &m)| ((q / n - (m as f64) * (m as f64)).max(1e-12).sqrt()) as f32)
            .collect();
        (mean, std)
    }
}
