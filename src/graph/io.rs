//! Saved model format, version 1: one safetensors file whose tensors are the parameters
//! (`"{node}.{param}"`, f32, PyTorch layouts) and whose metadata holds
//! `lopper.format = "model"`, `lopper.version = "1"` and `lopper.graph` = the JSON graph
//! (nodes in topological order, outputs). Any safetensors reader can read the weights;
//! lopper reads both back into an identical graph. Writes are atomic.

use super::{Graph, Node, NodeId};
use crate::util::atomic_write;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const FORMAT_VERSION: &str = "1";

#[derive(Serialize, Deserialize)]
struct GraphJson {
    nodes: Vec<Node>,
    outputs: Vec<NodeId>,
}

/// Serialises tensors plus metadata to safetensors bytes.
pub fn tensors_to_bytes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, t) in tensors {
        let v: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        bufs.push((k.clone(), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(k, s, b)| Ok((k.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, Some(metadata))?)
}

/// Reads every tensor of a safetensors buffer (f32 or f64 → f32), plus its metadata.
pub fn tensors_from_bytes(
    bytes: &[u8],
    origin: &str,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow!("{origin}: not a safetensors file ({e})"))?;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{origin}: corrupt safetensors file ({e})"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let vals: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            d => bail!("{origin}: tensor '{name}' has dtype {d:?}; only F32/F64 are supported"),
        };
        out.insert(
            name.clone(),
            Tensor::from_vec(vals, view.shape().to_vec(), &Device::Cpu)?,
        );
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Saves a model (graph + weights) atomically.
pub fn save(g: &Graph, path: &Path) -> Result<()> {
    let graph = serde_json::to_string(&GraphJson {
        nodes: g.nodes.clone(),
        outputs: g.outputs.clone(),
    })?;
    let mut meta = HashMap::new();
    meta.insert("lopper.format".into(), "model".into());
    meta.insert("lopper.version".into(), FORMAT_VERSION.into());
    meta.insert("lopper.graph".into(), graph);
    let tensors: BTreeMap<String, Tensor> = g
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    atomic_write(path, &tensors_to_bytes(&tensors, meta)?)
}

/// Loads a model written by [`save`].
pub fn load(path: &Path) -> Result<Graph> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read model {}", path.display()))?;
    let origin = path.display().to_string();
    let (tensors, meta) = tensors_from_bytes(&bytes, &origin)?;
    graph_from_parts(&meta, tensors, &origin)
}

/// Rebuilds a graph from safetensors metadata + tensors (shared with checkpoints).
pub fn graph_from_parts(
    meta: &HashMap<String, String>,
    mut tensors: BTreeMap<String, Tensor>,
    origin: &str,
) -> Result<Graph> {
    let version = meta.get("lopper.version").ok_or_else(|| {
        anyhow!("{origin}: no lopper graph in this safetensors file (plain weights? use --weights with a zoo model)")
    })?;
    if version != FORMAT_VERSION {
        bail!("{origin}: model format version {version}, this lopper reads {FORMAT_VERSION}");
    }
    let gj: GraphJson = serde_json::from_str(
        meta.get("lopper.graph")
            .ok_or_else(|| anyhow!("{origin}: metadata lacks lopper.graph"))?,
    )
    .with_context(|| format!("{origin}: graph description is invalid"))?;
    // Keep only graph parameters; checkpoints carry optimizer state beside them.
    tensors.retain(|k, _| !k.starts_with("__"));
    Graph::with_parts(gj.nodes, gj.outputs, tensors)
        .with_context(|| format!("{origin}: invalid model"))
}

/// Loads plain weights (e.g. a PyTorch state dict exported to safetensors) into an existing
/// graph, checking every tensor's name and shape.
pub fn load_weights(g: &Graph, path: &Path) -> Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read weights {}", path.display()))?;
    let origin = path.display().to_string();
    let (tensors, _) = tensors_from_bytes(&bytes, &origin)?;
    // Check everything before changing anything: a failed load leaves the graph intact.
    for (k, v) in g.params() {
        let t = tensors
            .get(k)
            .ok_or_else(|| anyhow!("{origin}: tensor '{k}' required by the graph is missing"))?;
        if t.dims() != v.dims() {
            bail!(
                "{origin}: tensor '{k}' has shape {:?}, the graph needs {:?}",
                t.dims(),
                v.dims()
            );
        }
    }
    for k in tensors.keys() {
        if !g.params().contains_key(k) && !k.ends_with("num_batches_tracked") {
            bail!("{origin}: tensor '{k}' matches no parameter of the graph");
        }
    }
    for (k, t) in &tensors {
        if g.params().contains_key(k) {
            g.set_param(k, t)?;
        }
    }
    Ok(())
}
