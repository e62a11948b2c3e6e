//! ONNX at the edges: import (IR 3+, opsets 7–21) into the graph IR, and export of any IR
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
    // External data files are resolved against the model's own folder.
    let dir = path.parent().unwrap_or(Path::new("."));
    import::import_noting(&bytes, &path.display().to_string(), Some(dir))
}

/// Exports `g` to `path` atomically (refusing non-finite weights).
pub fn save(g: &Graph, path: &Path) -> Result<()> {
    save_with(g, path, &[]).map(|_| ())
}

/// [`save`] with extra `metadata_props`; returns the bytes' [`crate::util::fnv64`].
pub fn save_with(g: &Graph, path: &Path, props: &[(&str, &str)]) -> Result<u64> {
    g.check_finite()
        .with_context(|| format!("refusing to write {}", path.display()))?;
    let bytes = export::export_bytes_with(g, props)?;
    crate::util::atomic_write(path, &bytes)?;
    Ok(crate::util::fnv64(&bytes))
}
