//! ONNX at the edges: import (IR 3+, opsets 7–23) into the graph IR, and export of any IR
//! graph — pruned or not — to ONNX opset 17 with the same input/output names and shapes.
//! Protobuf decoding/encoding is the `onnx-protobuf` crate (rust-protobuf generated code
//! for the ONNX schema); nothing here parses wire bytes by hand.

pub mod attrs;
pub mod export;
pub mod external;
pub mod import;
pub mod value;

use crate::graph::Graph;
use anyhow::{Context, Result};
use std::path::Path;

/// Imports an `.onnx` file; errors name the file, the node and what is supported.
pub fn load(path: &Path) -> Result<Graph> {
    Ok(load_noting(path)?.0)
}

/// [`load`], also returning notes on what the import changed (see
/// [`import::import_noting`]).
pub fn load_noting(path: &Path) -> Result<(Graph, Vec<String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let what = path.display().to_string();
    // The file's bytes go as soon as they are parsed (a large model's weights would
    // otherwise be held three times during the import).
    let model = import::parse(&bytes, &what)?;
    drop(bytes);
    // External data files are resolved against the model's own folder.
    let dir = path.parent().unwrap_or(Path::new("."));
    import::import_model(model, &what, Some(dir))
}

/// Exports `g` to `path` atomically (refusing non-finite weights).
pub fn save(g: &Graph, path: &Path) -> Result<()> {
    save_with(g, path, &[]).map(|_| ())
}

/// [`save`] with extra `metadata_props`; returns the bytes' [`crate::util::fnv64`].
/// Weights over ONNX's 2 GB protobuf limit go to external data ([`save_opts`]).
pub fn save_with(g: &Graph, path: &Path, props: &[(&str, &str)]) -> Result<u64> {
    save_opts(g, path, props, false)
}

/// [`save_with`], writing the weights to external data `<file name>.data` beside the model
/// when `external` is set or when they pass [`export::INLINE_LIMIT`]. The data file is
/// written (atomically) before the model, so a model on disk never points at missing
/// data. The hash covers the model and the data.
pub fn save_opts(g: &Graph, path: &Path, props: &[(&str, &str)], external: bool) -> Result<u64> {
    g.check_finite()
        .with_context(|| format!("refusing to write {}", path.display()))?;
    let weights: usize = g.params().values().map(|v| v.elem_count() * 4).sum();
    let name = path
        .file_name()
        .map(|f| format!("{}.data", f.to_string_lossy()))
        .unwrap_or_else(|| "model.onnx.data".into());
    let external = external || weights >= export::INLINE_LIMIT;
    let out = export::export_model(g, props, external.then_some(name.as_str()))?;
    let mut hash = crate::util::fnv64(&out.model);
    if let Some(data) = &out.data {
        crate::util::atomic_write(&path.with_file_name(&name), data)?;
        hash ^= crate::util::fnv64(data).rotate_left(1);
    }
    crate::util::atomic_write(path, &out.model)?;
    Ok(hash)
}
