//! Recipes: a whole comparison pipeline in one TOML file — data, the dense model (zoo,
//! saved, or ONNX; optionally trained first), methods with their options and budgets,
//! fine-tuning budget, seeds. `lopper run RECIPE` expands it into steps, runs each as a
//! `lopper prune` / `lopper sparsify` process, caches every finished step's report, and
//! writes `report.json` and a self-contained `report.html`.
//!
//! Errors name the recipe file, the line and the key: TOML syntax and type errors come
//! from the parser with their spans; semantic checks (unknown method, budget out of range)
//! carry the span of the offending value.

pub mod html;
pub mod report;
pub mod run;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use toml::Spanned;

/// Structured (channel) pruning methods: `lopper prune --method`.
pub const PRUNE_METHODS: &[&str] = &[
    "random", "l1", "l2", "fpgm", "bn-scale", "taylor", "act-mean", "apoz", "ispasp", "dwr",
    "stamp",
];
/// Post-training sparsity methods: `lopper sparsify --method`.
pub const SPARSIFY_METHODS: &[&str] =
    &["magnitude", "global", "wanda", "sparsegpt", "pot", "unipts"];

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub data: DataSpec,
    pub model: ModelSpec,
    #[serde(default)]
    pub finetune: Finetune,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    pub methods: Vec<MethodSpec>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// digits, mnist, fashion-mnist, cifar10, or a path.
    pub name: String,
    /// Evaluate on this many test samples (all if absent).
    pub eval_limit: Option<usize>,
    /// Fine-tune on this many training samples (all if absent).
    pub train_limit: Option<usize>,
    /// Calibration images for the sparsity methods.
    pub calib: Option<usize>,
    pub input_scale: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A zoo name (`lenet5`, `resnet20`, `mlp:784-256-10`, …) or a model file
    /// (`.safetensors`, `.onnx`) or a shared-data model name.
    pub source: String,
    /// Train the dense model first (zoo models start from random weights).
    pub train: Option<TrainSpec>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub epochs: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_lr() -> f64 {
    0.05
}
fn default_batch() -> usize {
    64
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Finetune {
    #[serde(default)]
    pub epochs: usize,
    #[serde(default = "default_ft_lr")]
    pub lr: f64,
}

fn default_ft_lr() -> f64 {
    0.01
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    /// A structured method (`l1`, `taylor`, `ispasp`, `dwr`, …) or a sparsity method
    /// (`magnitude`, `global`, `wanda`, `pot`, `unipts`).
    pub name: Spanned<String>,
    /// Display label (default: the name); lets one method appear with different options.
    pub label: Option<String>,
    /// Structured budgets: kept fraction of the dense MACs, each in (0, 1] (old name:
    /// `macs`).
    #[serde(alias = "macs")]
    pub keep_macs: Option<Spanned<Vec<f64>>>,
    /// Sparsity budgets: fraction of zero weights, each in [0, 1).
    pub sparsity: Option<Spanned<Vec<f64>>>,
    /// Extra command-line options of `lopper prune` / `lopper sparsify`
    /// (`key = value` becomes `--key value`; `key = true` becomes `--key`). For `stamp`
    /// without a `generator`, the run meta-trains one on the recipe's data first, and
    /// `meta-KEY = value` options go to `lopper stamp meta-train` as `--KEY value`.
    #[serde(default)]
    pub options: BTreeMap<String, toml::Value>,
}

impl MethodSpec {
    /// A STAMP step whose generator the run meta-trains (no `generator` option given).
    pub fn needs_meta_training(&self) -> bool {
        self.name.get_ref() == "stamp" && !self.options.contains_key("generator")
    }
    pub fn label(&self) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| self.name.get_ref().clone())
    }
    pub fn is_sparsity(&self) -> bool {
        SPARSIFY_METHODS.contains(&self.name.get_ref().as_str())
    }
}

/// 1-based line of a byte offset.
fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].matches('\n').count() + 1
}

/// Reads and checks a recipe; every error names the file, and where possible the line and
/// key.
pub fn load(path: &Path) -> Result<Recipe> {
    let src = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read recipe {}: {e}", path.display()))?;
    parse(&src, &path.display().to_string())
}

/// Parses recipe text (`origin` names it in errors).
pub fn parse(src: &str, origin: &str) -> Result<Recipe> {
    let r: Recipe = toml::from_str(src).map_err(|e| {
        let at = e
            .span()
            .map(|s| format!(" (line {})", line_of(src, s.start)))
            .unwrap_or_default();
        anyhow!("{origin}{at}: {}", e.message())
    })?;
    let at = |span: std::ops::Range<usize>| format!("{origin} (line {})", line_of(src, span.start));
    if r.methods.is_empty() {
        bail!("{origin}: the recipe lists no [[methods]]");
    }
    if r.seeds.is_empty() {
        bail!("{origin}: key 'seeds' is empty");
    }
    for m in &r.methods {
        let name = m.name.get_ref();
        let structured = PRUNE_METHODS.contains(&name.as_str());
        let sparse = SPARSIFY_METHODS.contains(&name.as_str());
        if !structured && !sparse {
            bail!(
                "{}: key 'name': unknown method '{name}' (structured: {}; sparsity: {})",
                at(m.name.span()),
                PRUNE_METHODS.join(", "),
                SPARSIFY_METHODS.join(", ")
            );
        }
        match (structured, &m.keep_macs, &m.sparsity) {
            (true, Some(b), None) => {
                if b.get_ref().is_empty() {
                    bail!("{}: key 'keep_macs' is empty", at(b.span()));
                }
                if let Some(v) = b.get_ref().iter().find(|v| !(**v > 0.0 && **v <= 1.0)) {
                    bail!("{}: key 'keep_macs': budget {v} must be in (0, 1]", at(b.span()));
                }
            }
            (false, None, Some(b)) => {
                if b.get_ref().is_empty() {
                    bail!("{}: key 'sparsity' is empty", at(b.span()));
                }
                if let Some(v) = b.get_ref().iter().find(|v| !(0.0..1.0).contains(*v)) {
                    bail!("{}: key 'sparsity': {v} must be in [0, 1)", at(b.span()));
                }
            }
            (true, _, _) => bail!(
                "{}: structured method '{name}' needs key 'keep_macs' (kept fractions of the dense MACs) and no 'sparsity'",
                at(m.name.span())
            ),
            (false, _, _) => bail!(
                "{}: sparsity method '{name}' needs key 'sparsity' and no 'keep_macs'",
                at(m.name.span())
            ),
        }
        if name != "stamp" {
            if let Some(k) = m.options.keys().find(|k| k.starts_with("meta-")) {
                bail!(
                    "{}: option '{k}' is for method 'stamp' (its meta-training), not '{name}'",
                    at(m.name.span())
                );
            }
        } else if m.options.contains_key("generator") {
            if let Some(k) = m.options.keys().find(|k| k.starts_with("meta-")) {
                bail!(
                    "{}: option '{k}' configures the meta-training of a generator, but this \
                     method is given one (generator = ...): drop one of the two",
                    at(m.name.span())
                );
            }
        }
        for (k, v) in &m.options {
            if !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bail!("{}: option key '{k}' is not a flag name", at(m.name.span()));
            }
            if matches!(v, toml::Value::Array(_) | toml::Value::Table(_)) {
                bail!(
                    "{}: option '{k}' of method '{name}' must be a string, number or boolean",
                    at(m.name.span())
                );
            }
        }
    }
    Ok(r)
}
