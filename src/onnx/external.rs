//! ONNX external data: tensors whose bytes live in a file beside the model (PyTorch's
//! default exporter writes `model.onnx.data`; every model over 2 GB must).
//!
//! Each tensor names its file by a `location` relative to the model's folder, plus an
//! optional `offset` and `length` in bytes (and an optional SHA-1 `checksum`, checked
//! when present). Locations that are absolute or climb out of the model's folder are
//! refused: a model file must not make lopper read arbitrary files.

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::TensorProto;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// The external-data files of one model, each read once.
pub struct ExternalData {
    dir: Option<PathBuf>,
    files: HashMap<String, Vec<u8>>,
}

/// Where one tensor's bytes are.
struct Location {
    file: String,
    offset: usize,
    length: Option<usize>,
    checksum: Option<String>,
}

impl ExternalData {
    /// External data resolved against `dir` (the model's folder); `None` when the model
    /// came from memory, in which case external tensors are an error.
    pub fn new(dir: Option<&Path>) -> Self {
        ExternalData {
            dir: dir.map(Path::to_path_buf),
            files: HashMap::new(),
        }
    }

    /// The bytes of external tensor `t`.
    pub fn bytes(&mut self, t: &TensorProto) -> Result<&[u8]> {
        let loc = location(t)?;
        let Some(dir) = &self.dir else {
            bail!(
                "tensor '{}' keeps its data in the external file '{}'; import the model from its file path so that lopper can read the data beside it",
                t.name,
                loc.file
            );
        };
        if !self.files.contains_key(&loc.file) {
            let path = dir.join(&loc.file);
            let data = std::fs::read(&path).with_context(|| {
                format!(
                    "reading the external data of tensor '{}' from {}",
                    t.name,
                    path.display()
                )
            })?;
            self.files.insert(loc.file.clone(), data);
        }
        let data = &self.files[&loc.file];
        let end = match loc.length {
            Some(n) => loc.offset.checked_add(n),
            None => Some(data.len()),
        };
        let slice = end
            .filter(|&e| loc.offset <= e && e <= data.len())
            .map(|e| &data[loc.offset..e])
            .ok_or_else(|| {
                anyhow!(
                    "tensor '{}': external data at offset {} length {:?} lies beyond the end of '{}' ({} bytes): truncated file?",
                    t.name,
                    loc.offset,
                    loc.length,
                    loc.file,
                    data.len()
                )
            })?;
        if let Some(want) = &loc.checksum {
            let got = sha1_smol::Sha1::from(slice).digest().to_string();
            if !got.eq_ignore_ascii_case(want) {
                bail!(
                    "tensor '{}': external data checksum {got} does not match the recorded {want}",
                    t.name
                );
            }
        }
        Ok(slice)
    }
}

fn location(t: &TensorProto) -> Result<Location> {
    let mut loc = Location {
        file: String::new(),
        offset: 0,
        length: None,
        checksum: None,
    };
    let number = |k: &str, v: &str| -> Result<usize> {
        v.parse().map_err(|_| {
            anyhow!(
                "tensor '{}': external data {k} '{v}' is not a number",
                t.name
            )
        })
    };
    for e in &t.external_data {
        match e.key.as_str() {
            "location" => loc.file = e.value.clone(),
            "offset" => loc.offset = number("offset", &e.value)?,
            "length" => loc.length = Some(number("length", &e.value)?),
            "checksum" => loc.checksum = Some(e.value.clone()),
            // Other keys are hints (e.g. for memory mapping) that do not change the bytes.
            _ => {}
        }
    }
    let safe = !loc.file.is_empty()
        && Path::new(&loc.file)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !safe {
        bail!(
            "tensor '{}': external data location '{}' must be a file name relative to the model's folder",
            t.name,
            loc.file
        );
    }
    Ok(loc)
}
