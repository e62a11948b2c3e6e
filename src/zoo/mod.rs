//! Model zoo: builders for the architectures lopper prunes, by name.
//!
//! Names: `mlp:784-1024-1024-10` (sizes), `lenet5`, `vgg11`, `vgg16` (CIFAR, with BN),
//! `resnet20|32|56|110` (CIFAR, option-A shortcuts), `mobilenetv2` (CIFAR variant),
//! `digit_cnn` (the architecture of `digit_recognizer_cnn.safetensors`), `vit` (a small
//! ViT for 32×32 images; `vit:DIM-DEPTH-HEADS[-PATCH[-MLP]][-cls]` sizes it, `-cls` with a class token). An optional
//! `@CxHxW` suffix overrides the input shape, `#K` the number of classes.

mod cnn;
mod mobilenet;
mod resnet;
mod vgg;
mod vit;

pub use cnn::{digit_cnn, lenet5, mlp};
pub use mobilenet::mobilenet_v2;
pub use resnet::resnet_cifar;
pub use vgg::vgg_cifar;
pub use vit::{vit, VitConfig};

use crate::graph::Graph;
use anyhow::{bail, Context, Result};

/// Known model names, for help texts and errors.
pub const MODELS: &[&str] = &[
    "mlp:IN-H1-...-OUT",
    "lenet5",
    "resnet8",
    "vgg11",
    "vgg16",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "mobilenetv2",
    "vit",
    "vit:DIM-DEPTH-HEADS[-PATCH[-MLP]][-cls]",
    "digit_cnn",
];

/// Trained models shipped in the repository's `models/` folder (provenance in
/// `models/README.md`), by name: `lopper eval resnet20-cifar10 --data cifar10` finds
/// `models/resnet20-cifar10.safetensors`.
pub const SHIPPED: &[&str] = &[
    "resnet20-cifar10",
    "lenet5-mnist",
    "mlp-mnist",
    "stamp-ref-fmnist",
    "stamp-ref-cifar6",
    "vit-cifar10",
];

/// The file of a shipped model: `models/NAME.safetensors` under `$LOPPER_MODELS`, the
/// working directory, or the source tree the binary was built from (so it is found from
/// any directory of a clone).
pub fn shipped(name: &str) -> Option<std::path::PathBuf> {
    if !SHIPPED.contains(&name) {
        return None;
    }
    let file = format!("{name}.safetensors");
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("LOPPER_MODELS") {
        dirs.push(d.into());
    }
    dirs.push("models".into());
    dirs.push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models"));
    dirs.into_iter()
        .map(|d| d.join(&file))
        .find(|p| p.is_file())
}

/// Input shape and class count a model name implies unless overridden.
fn default_shape(base: &str) -> (Vec<usize>, usize) {
    match base {
        "lenet5" | "digit_cnn" => (vec![1, 28, 28], 10),
        _ => (vec![3, 32, 32], 10),
    }
}

/// Builds a zoo model by name with weights initialised from `seed`.
pub fn build(spec: &str, seed: u64) -> Result<Graph> {
    let (rest, classes) = match spec.split_once('#') {
        Some((r, k)) => (
            r,
            Some(
                k.parse::<usize>()
                    .with_context(|| format!("bad class count in '{spec}'"))?,
            ),
        ),
        None => (spec, None),
    };
    let (base, shape) = match rest.split_once('@') {
        Some((b, s)) => {
            let dims: Result<Vec<usize>, _> = s.split('x').map(|d| d.parse::<usize>()).collect();
            (
                b,
                Some(dims.with_context(|| format!("bad input shape in '{spec}'"))?),
            )
        }
        None => (rest, None),
    };
    let (dshape, dk) = default_shape(base);
    let shape = shape.unwrap_or(dshape);
    let k = classes.unwrap_or(dk);
    if k == 0 {
        bail!("'{spec}': a model needs at least 1 class (the number after '#')");
    }
    if shape.len() != 3 || shape.contains(&0) {
        bail!("'{spec}': the input shape after '@' must be CxHxW with every size >= 1");
    }
    let g = if let Some(sizes) = base.strip_prefix("mlp:") {
        let sizes: Result<Vec<usize>, _> = sizes.split('-').map(|d| d.parse::<usize>()).collect();
        let sizes = sizes.with_context(|| format!("bad MLP sizes in '{spec}'"))?;
        mlp(&sizes, seed)
    } else {
        match base {
            "lenet5" => lenet5(&shape, k, seed),
            "digit_cnn" => digit_cnn(&shape, k, seed),
            "vgg11" => vgg_cifar(11, &shape, k, seed),
            "vgg16" => vgg_cifar(16, &shape, k, seed),
            b if b.starts_with("resnet") && b[6..].parse::<usize>().is_ok() => {
                resnet_cifar(b[6..].parse()?, &shape, k, seed)
            }
            "mobilenetv2" => mobilenet_v2(&shape, k, seed),
            "vit" => vit(&shape, k, VitConfig::default(), seed),
            b if b.starts_with("vit:") => vit(&shape, k, VitConfig::parse(&b[4..])?, seed),
            _ => bail!(
                "unknown model '{base}'; zoo (random init): {}; trained: digit_recognizer_cnn (shared data), {} (models/); or a .safetensors / .onnx file",
                MODELS.join(", "),
                SHIPPED.join(", ")
            ),
        }
    };
    g.with_context(|| format!("building model '{spec}'"))
}
