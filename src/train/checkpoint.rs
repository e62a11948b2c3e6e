//! Training checkpoints: the model format (graph + weights in one safetensors file) plus
//! optimizer state tensors under `__opt.` and, in the metadata, `lopper.format =
//! "checkpoint"`, epochs done, the training config and the history. Written atomically.

use super::trainer::{EpochLog, TrainConfig};
use crate::graph::io::{graph_from_parts, tensors_from_bytes, tensors_to_bytes, FORMAT_VERSION};
use crate::graph::Graph;
use crate::util::atomic_write;
use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub struct Checkpoint {
    pub graph: Graph,
    pub optimizer: BTreeMap<String, Tensor>,
    pub optimizer_steps: usize,
    pub epochs_done: usize,
    pub config: TrainConfig,
    pub history: Vec<EpochLog>,
}

pub fn save(path: &Path, ck: &Checkpoint) -> Result<()> {
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
    })
}
