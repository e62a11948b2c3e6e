//! Typed access to ONNX node attributes, with errors that name the node and attribute.

use super::value::{from_proto, Const};
use anyhow::{bail, Result};
use onnx_protobuf::{AttributeProto, NodeProto};

pub struct Attrs<'a> {
    node: &'a NodeProto,
}

impl<'a> Attrs<'a> {
    pub fn new(node: &'a NodeProto) -> Self {
        Attrs { node }
    }
    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map_or(default, |a| a.i)
    }
    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map_or(default, |a| a.f)
    }
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    pub fn floats(&self, name: &str) -> Option<Vec<f32>> {
        self.get(name).map(|a| a.floats.clone())
    }
    pub fn string(&self, name: &str, default: &str) -> String {
        self.get(name).map_or(default.to_string(), |a| {
            String::from_utf8_lossy(&a.s).into_owned()
        })
    }
    pub fn tensor(&self, name: &str) -> Result<Option<Const>> {
        match self.get(name) {
            Some(a) => match a.t.as_ref() {
                Some(t) => Ok(Some(from_proto(t)?)),
                None if !a.floats.is_empty() => Ok(Some(Const {
                    dims: vec![a.floats.len()],
                    data: a.floats.iter().map(|&v| v as f64).collect(),
                })),
                None if !a.ints.is_empty() => Ok(Some(Const::vec_i64(&a.ints))),
                None if name == "value_float" => Ok(Some(Const::scalar(a.f as f64))),
                None if name == "value_int" => Ok(Some(Const::scalar(a.i as f64))),
                None => bail!("attribute '{name}' has no tensor value"),
            },
            None => Ok(None),
        }
    }
    /// Rejects attributes this importer does not understand (never ignore silently).
    pub fn only(&self, known: &[&str]) -> Result<()> {
        for a in &self.node.attribute {
            if !known.contains(&a.name.as_str()) {
                bail!(
                    "attribute '{}' is not supported (supported: {})",
                    a.name,
                    known.join(", ")
                );
            }
        }
        Ok(())
    }
}
