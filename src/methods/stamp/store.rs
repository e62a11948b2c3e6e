//! Saving a meta-trained encoder + generator, tied to the architecture it was trained for:
//! one safetensors file (`enc.*`, `gen.{i}.{w,c}`) whose metadata records the gated
//! groups (batch-norm names and widths), the feature node and width, and the encoder shape.
//! Loading it for another architecture is an error naming the mismatch.

use super::generator::Generator;
use super::meta::{MetaConfig, Stamp};
use crate::graph::io::{tensors_from_bytes, tensors_to_bytes};
use crate::graph::Graph;
use crate::util::atomic_write;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Fingerprint {
    /// `(batch-norm node, channels)` of every gated group, in order.
    sites: Vec<(String, usize)>,
    feature_node: String,
    feature_dim: usize,
    enc_dim: usize,
    heads: usize,
}

fn fingerprint(g: &Graph, st: &Stamp, enc_dim: usize, heads: usize) -> Result<Fingerprint> {
    Ok(Fingerprint {
        sites: st
            .sites
            .iter()
            .map(|s| (g.nodes[s.bn].name.clone(), s.channels))
            .collect(),
        feature_node: g.nodes[st.feature_node].name.clone(),
        feature_dim: g.shapes()?[st.feature_node][0],
        enc_dim,
        heads,
    })
}

/// Writes the encoder and generator (atomically).
pub fn save(path: &Path, g: &Graph, st: &Stamp, cfg: &MetaConfig) -> Result<()> {
    let mut t = BTreeMap::new();
    for (k, v) in st.encoder_params()? {
        t.insert(format!("enc.{k}"), v.as_tensor().clone());
    }
    for (k, v) in st.generator.vars() {
        t.insert(k, v.as_tensor().clone());
    }
    t.insert("gen.center".into(), st.generator.center.as_tensor().clone());
    let mut meta = HashMap::new();
    meta.insert("lopper.format".into(), "stamp-generator".into());
    meta.insert(
        "stamp.fingerprint".into(),
        serde_json::to_string(&fingerprint(g, st, cfg.enc_dim, cfg.heads)?)?,
    );
    meta.insert("stamp.config".into(), serde_json::to_string(cfg)?);
    atomic_write(path, &tensors_to_bytes(&t, meta)?)
}

/// Loads a generator for model `g`; errors if it was trained for another architecture.
pub fn load(path: &Path, g: &Graph) -> Result<(Stamp, MetaConfig)> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read generator {origin}"))?;
    let (tensors, meta) = tensors_from_bytes(&bytes, &origin)?;
    if meta.get("lopper.format").map(String::as_str) != Some("stamp-generator") {
        bail!("{origin}: not a STAMP generator (lopper stamp meta-train writes one)");
    }
    let cfg: MetaConfig = serde_json::from_str(
        meta.get("stamp.config")
            .ok_or_else(|| anyhow!("{origin}: no stamp.config metadata"))?,
    )?;
    let want: Fingerprint = serde_json::from_str(
        meta.get("stamp.fingerprint")
            .ok_or_else(|| anyhow!("{origin}: no stamp.fingerprint metadata"))?,
    )?;
    let st = Stamp::new(g, &cfg)?;
    let have = fingerprint(g, &st, cfg.enc_dim, cfg.heads)?;
    if have != want {
        bail!(
            "{origin}: the generator was trained for a different architecture \
             (gated groups {:?} with features '{}' [{}]; this model has {:?} with '{}' [{}])",
            want.sites,
            want.feature_node,
            want.feature_dim,
            have.sites,
            have.feature_node,
            have.feature_dim
        );
    }
    let set = |name: &str, v: &candle_core::Var| -> Result<()> {
        let t = tensors
            .get(name)
            .ok_or_else(|| anyhow!("{origin}: tensor '{name}' is missing"))?;
        if t.dims() != v.dims() {
            bail!(
                "{origin}: tensor '{name}' has shape {:?}, expected {:?}",
                t.dims(),
                v.dims()
            );
        }
        v.set(t)?;
        Ok(())
    };
    for (k, v) in st.encoder_params()? {
        set(&format!("enc.{k}"), &v)?;
    }
    for (k, v) in st.generator.vars() {
        set(&k, &v)?;
    }
    // Files from before the centring have none: a zero centre is the old behaviour.
    if tensors.contains_key("gen.center") {
        set("gen.center", &st.generator.center)?;
    }
    let _: &Generator = &st.generator;
    Ok((st, cfg))
}
