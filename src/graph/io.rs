//! Saved model format, version 1: one safetensors file whose tensors are the parameters
//! (`"{node}.{param}"`, f32, PyTorch layouts) and whose metadata holds
//! `lopper.format = "model"`, `lopper.version = "1"` and `lopper.graph` = the JSON graph
//! (nodes in topological order, outputs). Any safetensors reader can read the weights;
//! lopper reads both back into an identical graph. Writes are atomic.

use super::ops::param::WEIGHT;
use super::{param_key, Graph, ModelMeta, Node, NodeId};
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
    /// The imported model's description (absent for lopper's own models).
    #[serde(default, skip_serializing_if = "ModelMeta::is_empty")]
    meta: ModelMeta,
}

/// Serialises tensors plus metadata to safetensors bytes.
pub fn tensors_to_bytes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, t) in tensors {
        // u32 tensors (sparse indices) stay u32; everything else is stored as f32.
        let (dt, bytes): (Dtype, Vec<u8>) = if t.dtype() == candle_core::DType::U32 {
            let v: Vec<u32> = t.flatten_all()?.to_vec1()?;
            (Dtype::U32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        } else {
            let v: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        bufs.push((k.clone(), dt, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(k, dt, s, b)| Ok((k.clone(), TensorView::new(*dt, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    sorted_header(safetensors::serialize(views, Some(metadata))?)
}

/// Rewrites a safetensors header with its JSON keys sorted. `safetensors` serialises the
/// metadata from a `HashMap`, whose order changes from run to run; sorted keys make the
/// same model give byte-identical files (reproducible outputs, stable hashes). Header
/// length and tensor offsets are unchanged (same JSON, other order).
fn sorted_header(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let mut header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n])?;
    if let Some(serde_json::Value::Object(m)) = header.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> = std::mem::take(m).into_iter().collect();
        *m = sorted.into_iter().collect();
    }
    let mut sorted = serde_json::to_vec(&header)?;
    if sorted.len() > n {
        bail!("safetensors header grew when sorted");
    }
    sorted.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&sorted);
    Ok(bytes)
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
        if view.dtype() == Dtype::U32 {
            let v: Vec<u32> = data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.insert(
                name.clone(),
                Tensor::from_vec(v, view.shape().to_vec(), &Device::Cpu)?,
            );
            continue;
        }
        let vals: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| crate::util::f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            // PyTorch's BatchNorm keeps a step counter in every state dict: not a weight.
            Dtype::I64 if name.ends_with("num_batches_tracked") => continue,
            d => bail!(
                "{origin}: tensor '{name}' has dtype {d:?}; weights must be F32, F64, F16 or BF16"
            ),
        };
        out.insert(
            name.clone(),
            Tensor::from_vec(vals, view.shape().to_vec(), &Device::Cpu)?,
        );
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// Conv/linear weights with at least this fraction of zeros are stored compressed (CSR:
/// `{key}.csr_values` f32, `{key}.csr_col_idx` and `{key}.csr_row_ptr` u32, listed in the
/// `lopper.sparse` metadata); below it, 8 bytes per non-zero would not beat 4 per weight.
pub const COMPRESS_MIN_SPARSITY: f64 = 0.5;

/// Saves a model (graph + weights) atomically; sparse weights in compressed form.
/// Refuses a model with non-finite weights (naming the tensor).
pub fn save(g: &Graph, path: &Path) -> Result<()> {
    save_with(g, path, &[]).map(|_| ())
}

/// [`save`] with extra metadata entries (e.g. `lopper.report`, the report of the run that
/// made the model, so the two can never disagree); returns the bytes' [`fnv64`].
///
/// [`fnv64`]: crate::util::fnv64
pub fn save_with(g: &Graph, path: &Path, extra: &[(&str, &str)]) -> Result<u64> {
    g.check_finite()
        .with_context(|| format!("refusing to write {}", path.display()))?;
    let graph = serde_json::to_string(&GraphJson {
        nodes: g.nodes.clone(),
        outputs: g.outputs.clone(),
        meta: g.meta.clone(),
    })?;
    let mut meta = HashMap::new();
    meta.insert("lopper.format".into(), "model".into());
    meta.insert("lopper.version".into(), FORMAT_VERSION.into());
    meta.insert("lopper.graph".into(), graph);
    let mut tensors: BTreeMap<String, Tensor> = g
        .params()
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    // A shared weight is stored once, under its owner's key; loading ties it again.
    for n in g.nodes.iter().filter(|n| n.shares.is_some()) {
        for p in n.op.spec().params() {
            tensors.remove(&param_key(&n.name, p.name));
        }
    }
    let mut sparse = Vec::new();
    for l in super::matrix::weight_matrices(g) {
        let w = super::matrix::weight_host(g, &l)?;
        let zeros = w.iter().filter(|v| **v == 0.0).count();
        if w.is_empty() || (zeros as f64) < COMPRESS_MIN_SPARSITY * w.len() as f64 {
            continue;
        }
        let csr = super::csr::CsrMatrix::from_dense(&w, l.rows, l.row_len)?;
        let nnz = csr.nnz();
        let dev = &Device::Cpu;
        tensors.remove(&l.key);
        tensors.insert(
            format!("{}.csr_values", l.key),
            Tensor::from_vec(csr.values, nnz, dev)?,
        );
        tensors.insert(
            format!("{}.csr_col_idx", l.key),
            Tensor::from_vec(csr.col_idx, nnz, dev)?,
        );
        tensors.insert(
            format!("{}.csr_row_ptr", l.key),
            Tensor::from_vec(csr.row_ptr, l.rows + 1, dev)?,
        );
        sparse.push(l.key);
    }
    if !sparse.is_empty() {
        meta.insert("lopper.sparse".into(), serde_json::to_string(&sparse)?);
    }
    for (k, v) in extra {
        meta.insert((*k).into(), (*v).into());
    }
    let bytes = tensors_to_bytes(&tensors, meta)?;
    atomic_write(path, &bytes)?;
    Ok(crate::util::fnv64(&bytes))
}

/// Where the report of a model written to `model` goes: `OUT.report.json` beside it.
pub fn report_path(model: &Path) -> std::path::PathBuf {
    model.with_extension("report.json")
}

/// The report of a model file, checked against it: the sidecar `OUT.report.json` when its
/// `model_file.fnv64` matches the model's bytes, else the report embedded in the model
/// (which a kill between the two writes cannot separate from it). `Ok(None)` when neither
/// exists.
pub fn paired_report(model: &Path) -> Result<Option<serde_json::Value>> {
    let bytes =
        std::fs::read(model).with_context(|| format!("cannot read model {}", model.display()))?;
    let hash = format!("{:016x}", crate::util::fnv64(&bytes));
    if let Ok(txt) = std::fs::read_to_string(report_path(model)) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&txt) {
            if v["model_file"]["fnv64"].as_str() == Some(hash.as_str()) {
                return Ok(Some(v));
            }
        }
    }
    embedded_report(model)
}

/// The report embedded in a model file by the command that wrote it, if any.
pub fn embedded_report(path: &Path) -> Result<Option<serde_json::Value>> {
    if path.extension().is_some_and(|e| e == "onnx") {
        // ONNX models carry it in metadata_props; reading those is the onnx module's job.
        return Ok(None);
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read model {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    meta.metadata()
        .as_ref()
        .and_then(|m| m.get("lopper.report"))
        .map(|r| {
            serde_json::from_str(r)
                .with_context(|| format!("{}: lopper.report is not JSON", path.display()))
        })
        .transpose()
}

/// Rebuilds the dense weights of compressed tensors (listed in `lopper.sparse`), checking
/// every index so a corrupt file gives an error naming the tensor.
fn decompress(
    meta: &HashMap<String, String>,
    nodes: &[Node],
    tensors: &mut BTreeMap<String, Tensor>,
    origin: &str,
) -> Result<bool> {
    let Some(list) = meta.get("lopper.sparse") else {
        return Ok(false);
    };
    let keys: Vec<String> = serde_json::from_str(list)
        .with_context(|| format!("{origin}: lopper.sparse metadata is not a list of names"))?;
    for key in keys {
        let node = key.strip_suffix(&format!(".{WEIGHT}")).unwrap_or(&key);
        let n = nodes
            .iter()
            .find(|n| n.name == node)
            .ok_or_else(|| anyhow!("{origin}: sparse tensor '{key}' matches no node"))?;
        let spec = n.op.spec();
        let no_matrix = || anyhow!("{origin}: node '{node}' has no weight matrix");
        let (rows, cols) = spec.weight_matrix().ok_or_else(no_matrix)?;
        let shape = spec
            .params()
            .into_iter()
            .find(|p| p.name == WEIGHT)
            .map(|p| p.shape)
            .ok_or_else(no_matrix)?;
        let mut take = |suffix: &str| {
            tensors
                .remove(&format!("{key}.{suffix}"))
                .ok_or_else(|| anyhow!("{origin}: tensor '{key}.{suffix}' is missing"))
        };
        let values: Vec<f32> = take("csr_values")?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let col_idx: Vec<u32> = take("csr_col_idx")?
            .to_vec1()
            .with_context(|| format!("{origin}: tensor '{key}.csr_col_idx' must be u32"))?;
        let row_ptr: Vec<u32> = take("csr_row_ptr")?
            .to_vec1()
            .with_context(|| format!("{origin}: tensor '{key}.csr_row_ptr' must be u32"))?;
        let csr = super::csr::CsrMatrix::from_parts(rows, cols, row_ptr, col_idx, values)
            .with_context(|| format!("{origin}: compressed tensor '{key}'"))?;
        tensors.insert(key, Tensor::from_vec(csr.to_dense(), shape, &Device::Cpu)?);
    }
    Ok(true)
}

/// Loads a model written by [`save`].
pub fn load(path: &Path) -> Result<Graph> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read model {}", path.display()))?;
    load_bytes(&bytes, &path.display().to_string())
}

/// [`load`] from bytes in memory (`origin` names them in errors).
pub fn load_bytes(bytes: &[u8], origin: &str) -> Result<Graph> {
    let (tensors, meta) = tensors_from_bytes(bytes, origin)?;
    graph_from_parts(&meta, tensors, origin)
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
    let sparse = decompress(meta, &gj.nodes, &mut tensors, origin)?;
    let mut g = Graph::with_parts(gj.nodes, gj.outputs, tensors)
        .with_context(|| format!("{origin}: invalid model"))?;
    // A model saved sparse runs on the sparse kernels where they are faster.
    g.set_sparse_kernels(sparse);
    g.meta = gj.meta;
    Ok(g)
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
