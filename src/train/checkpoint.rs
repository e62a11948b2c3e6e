//! Training checkpoints: the model format (graph + weights in one safetensors file) plus
//! optimizer state tensors under `__opt.` and, in the metadata, `lopper.format =
//! "checkpoint"`, epochs done, the training config and the history. Written atomically.

use super::config::{EpochLog, TrainConfig};
use crate::data::Dataset;
use crate::graph::io::{graph_from_parts, tensors_from_bytes, tensors_to_bytes, FORMAT_VERSION};
use crate::graph::Graph;
use crate::util::atomic_write;
use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub struct Checkpoint {
    pub graph: Graph,
    pub optimizer: BTreeMap<String, Tensor>,
    pub optimizer_steps: usize,
    pub epochs_done: usize,
    pub config: TrainConfig,
    pub history: Vec<EpochLog>,
    /// What the model was trained on; a resume on other data is refused. `None` in
    /// checkpoints written before this field existed.
    pub data: Option<DataIdentity>,
}

/// The identity of a training set: enough to tell that a resumed run reads the same data
/// (another dataset, `--limit`, `--classes` or a changed file all differ).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    /// The dataset view's name (includes a class subset).
    pub name: String,
    pub samples: usize,
    pub classes: usize,
    /// Per-sample shape.
    pub shape: [usize; 3],
    /// FNV-1a over the view's labels and pixels.
    pub fingerprint: String,
}

impl DataIdentity {
    /// The first field (in the order a person would check them) that differs.
    pub fn difference(&self, now: &DataIdentity) -> Option<(String, String, String)> {
        let f = |a: String, b: String, n: &str| (a != b).then(|| (n.to_string(), a, b));
        f(
            format!("'{}'", self.name),
            format!("'{}'", now.name),
            "name",
        )
        .or_else(|| f(self.samples.to_string(), now.samples.to_string(), "samples"))
        .or_else(|| f(self.classes.to_string(), now.classes.to_string(), "classes"))
        .or_else(|| {
            f(
                format!("{:?}", self.shape),
                format!("{:?}", now.shape),
                "shape",
            )
        })
        .or_else(|| {
            f(
                self.fingerprint.clone(),
                now.fingerprint.clone(),
                "fingerprint",
            )
        })
    }

    pub fn of(ds: &Dataset) -> DataIdentity {
        let mut h = crate::util::Fnv64::default();
        for i in 0..ds.len() {
            h.update(&ds.label(i).to_le_bytes());
            h.update(&ds.sample_bytes(i));
        }
        let h = h.finish();
        DataIdentity {
            name: ds.name.clone(),
            samples: ds.len(),
            classes: ds.num_classes,
            shape: ds.shape,
            fingerprint: format!("{h:016x}"),
        }
    }
}

/// The first field in which two JSON-serialisable values differ, as `(field, a, b)`.
pub fn first_difference<T: Serialize>(a: &T, b: &T) -> Option<(String, String, String)> {
    let (a, b) = (serde_json::to_value(a).ok()?, serde_json::to_value(b).ok()?);
    fn walk(
        path: &str,
        a: &serde_json::Value,
        b: &serde_json::Value,
    ) -> Option<(String, String, String)> {
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) => {
                for (k, va) in x {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match y.get(k) {
                        Some(vb) => {
                            if let Some(d) = walk(&p, va, vb) {
                                return Some(d);
                            }
                        }
                        None => return Some((p, va.to_string(), "(absent)".into())),
                    }
                }
                y.keys()
                    .find(|k| !x.contains_key(*k))
                    .map(|k| (k.clone(), "(absent)".into(), y[k].to_string()))
            }
            _ if a != b => Some((path.to_string(), a.to_string(), b.to_string())),
            _ => None,
        }
    }
    walk("", &a, &b)
}

pub fn save(path: &Path, ck: &Checkpoint) -> Result<()> {
    ck.graph
        .check_finite()
        .with_context(|| format!("refusing to write checkpoint {}", path.display()))?;
    let mut tensors: BTreeMap<String, Tensor> = ck
        .graph
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    for (k, t) in &ck.optimizer {
        tensors.insert(format!("__opt.{k}"), t.clone());
    }
    let mut meta = HashMap::new();
    meta.insert("lopper.format".into(), "checkpoint".into());
    meta.insert("lopper.version".into(), FORMAT_VERSION.into());
    meta.insert(
        "lopper.graph".into(),
        serde_json::to_string(
            &serde_json::json!({"nodes": ck.graph.nodes, "outputs": ck.graph.outputs}),
        )?,
    );
    meta.insert("lopper.epochs_done".into(), ck.epochs_done.to_string());
    meta.insert(
        "lopper.optimizer_steps".into(),
        ck.optimizer_steps.to_string(),
    );
    meta.insert("lopper.config".into(), serde_json::to_string(&ck.config)?);
    meta.insert("lopper.history".into(), serde_json::to_string(&ck.history)?);
    if let Some(d) = &ck.data {
        meta.insert("lopper.data".into(), serde_json::to_string(d)?);
    }
    atomic_write(path, &tensors_to_bytes(&tensors, meta)?)
}

pub fn load(path: &Path) -> Result<Checkpoint> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {origin}"))?;
    let (tensors, meta) = tensors_from_bytes(&bytes, &origin)?;
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| anyhow!("{origin}: not a lopper checkpoint (no {k})"))
    };
    let optimizer = tensors
        .iter()
        .filter_map(|(k, t)| k.strip_prefix("__opt.").map(|s| (s.to_string(), t.clone())))
        .collect();
    Ok(Checkpoint {
        graph: graph_from_parts(&meta, tensors, &origin)?,
        optimizer,
        optimizer_steps: get("lopper.optimizer_steps")?.parse()?,
        epochs_done: get("lopper.epochs_done")?.parse()?,
        config: serde_json::from_str(get("lopper.config")?)?,
        history: serde_json::from_str(get("lopper.history")?)?,
        data: meta
            .get("lopper.data")
            .map(|d| serde_json::from_str(d))
            .transpose()
            .with_context(|| format!("{origin}: lopper.data is not a data identity"))?,
    })
}
