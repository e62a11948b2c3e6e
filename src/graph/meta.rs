//! What a model says about itself — ONNX's model and graph doc strings, graph name, domain,
//! model version, `metadata_props`, and the doc strings of its inputs and outputs — kept
//! from import through every rewrite to export, so that a pruned model still carries its
//! author's description (and a model converted twice does not lose it).
//!
//! Plain data beside the structure: nothing in execution or pruning reads it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// `ModelProto.doc_string`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub doc: String,
    /// `GraphProto.name` (exported as `lopper` when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub graph_name: String,
    /// `GraphProto.doc_string`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub graph_doc: String,
    /// `ModelProto.domain`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// `ModelProto.model_version`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub model_version: i64,
    /// `ModelProto.producer_name` / `producer_version` of the source model: export writes
    /// lopper as the producer and keeps these as `source_producer` metadata.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub producer: String,
    /// `ModelProto.metadata_props`, in the source's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub props: Vec<(String, String)>,
    /// Doc strings of graph inputs and outputs, by value name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub value_docs: BTreeMap<String, String>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl ModelMeta {
    /// Nothing recorded (the state of every model lopper builds itself).
    pub fn is_empty(&self) -> bool {
        self == &ModelMeta::default()
    }

    /// The `metadata_props` an export writes: the source's entries, then `extra` (which
    /// replaces a source entry of the same key), then `source_producer` if known.
    pub fn export_props(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .props
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k) && k != "source_producer")
            .cloned()
            .collect();
        out.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        if !self.producer.is_empty() && !extra.iter().any(|(e, _)| *e == "source_producer") {
            out.push(("source_producer".into(), self.producer.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_props_replace_source_entries_and_the_producer_is_kept() {
        let m = ModelMeta {
            producer: "pytorch 2.15".into(),
            props: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            ..Default::default()
        };
        let p = m.export_props(&[("b", "3"), ("c", "4")]);
        let want: Vec<(String, String)> = [
            ("a", "1"),
            ("b", "3"),
            ("c", "4"),
            ("source_producer", "pytorch 2.15"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(p, want);
        assert!(ModelMeta::default().is_empty() && !m.is_empty());
    }
}
