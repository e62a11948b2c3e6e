//! Every graph rewrite returns a graph with storage of its own (issue 15, item 1): rewrite,
//! overwrite every parameter of the result, and the source must be bit-identical to its
//! snapshot. candle's `Var::from_tensor` reuses a variable's storage, so a rewrite that
//! forgot to copy would pass every other test and silently corrupt the dense model.

use candle_core::{Device, Tensor};
use lopper::graph::fold::fold_batchnorm;
use lopper::graph::Graph;
use lopper::methods::dwr::ops::{prune_resolution, prune_width};
use lopper::methods::stamp::head::with_head;
use lopper::prune::{
    dependency_groups, plan, remove_blocks, remove_units, residual_blocks, with_resolution, Budget,
    Criterion, PlanConfig, Scope,
};
use lopper::zoo;
use proptest::prelude::*;
use std::collections::BTreeMap;

mod common;
use common::{randomise_bn, vals};

fn snapshot(g: &Graph) -> BTreeMap<String, Vec<f32>> {
    g.params()
        .iter()
        .map(|(k, v)| (k.clone(), vals(v.as_tensor())))
        .collect()
}

/// Writes `fill` into every parameter of `out`, then checks `src` is unchanged.
fn assert_independent(what: &str, src: &Graph, before: &BTreeMap<String, Vec<f32>>, out: &Graph) {
    for (k, v) in out.params() {
        let t = Tensor::full(1234.5f32, v.dims(), &Device::Cpu).unwrap();
        out.set_param(k, &t).unwrap();
    }
    // Training writes through `Var::set` as well as through the optimizer's own path.
    for (_, v) in out.trainable() {
        v.set(&Tensor::zeros(v.dims(), v.dtype(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let after = snapshot(src);
    for (k, b) in before {
        assert_eq!(
            &after[k], b,
            "{what}: writing into the rewritten graph changed the source's '{k}'"
        );
    }
}

fn model(spec: &str, seed: u64) -> Graph {
    let g = zoo::build(spec, seed).unwrap();
    randomise_bn(&g, seed);
    g
}

fn cfg(ratio: f64, seed: u64) -> PlanConfig {
    PlanConfig {
        criterion: Criterion::Random,
        scope: Scope::Local,
        budget: Budget::Ratio(ratio),
        round_to: 1,
        lamp: false,
        overrides: vec![],
        seed,
    }
}

const MODELS: &[&str] = &[
    "mlp:64-48-32-10",
    "digit_cnn",
    "resnet20@3x16x16",
    "mobilenetv2@3x16x16",
    "vit:32-2-4-4@3x16x16",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]

    #[test]
    fn every_rewrite_owns_its_parameters(mi in 0..MODELS.len(), seed in 0u64..1000, ratio in 0.0f64..0.8) {
        let spec = MODELS[mi];
        let g = model(spec, seed);
        let before = snapshot(&g);

        assert_independent("deep_clone", &g, &before, &g.deep_clone().unwrap());
        assert_independent("fold_batchnorm", &g, &before, &fold_batchnorm(&g).unwrap());
        // Same width (the deep-clone path) and a new width.
        assert_independent("with_head (same classes)", &g, &before, &with_head(&g, 10, seed).unwrap());
        assert_independent("with_head (new classes)", &g, &before, &with_head(&g, 4, seed).unwrap());

        let groups = dependency_groups(&g).unwrap();
        let removal = plan(&g, &groups, &cfg(ratio, seed), None).unwrap();
        assert_independent("remove_units", &g, &before, &remove_units(&g, &groups, &removal).unwrap());
        // Removing nothing must still copy.
        let none = plan(&g, &groups, &cfg(0.0, seed), None).unwrap();
        assert_independent("remove_units (nothing)", &g, &before, &remove_units(&g, &groups, &none).unwrap());
        assert_independent("prune_width", &g, &before, &prune_width(&g, 1.0 - ratio).unwrap());

        let blocks = residual_blocks(&g).unwrap();
        if let Some(b) = blocks.iter().find(|b| b.removable) {
            assert_independent("remove_blocks", &g, &before, &remove_blocks(&g, &[b.add]).unwrap());
        }
        if !spec.starts_with("mlp") {
            let s = g.input_shape().clone();
            assert_independent("with_resolution", &g, &before, &with_resolution(&g, s[1] - 2, s[2] - 2).unwrap());
            assert_independent("prune_resolution", &g, &before, &prune_resolution(&g, s[1]).unwrap());
        }
    }
}

/// Export then import gives a graph with its own storage too (the importer builds from
/// decoded tensors; the loaded copy must not alias anything the caller holds).
#[test]
fn load_and_import_own_their_parameters() {
    let g = model("resnet20@3x16x16", 3);
    let dir = std::env::temp_dir().join(format!("lopper-alias-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = dir.join("m.safetensors");
    lopper::graph::io::save(&g, &st).unwrap();
    let a = lopper::graph::io::load(&st).unwrap();
    let before = snapshot(&a);
    let b = a.deep_clone().unwrap();
    assert_independent("load + deep_clone", &a, &before, &b);
    let ox = dir.join("m.onnx");
    lopper::onnx::save(&g, &ox).unwrap();
    let o = lopper::onnx::load(&ox).unwrap();
    let before = snapshot(&o);
    assert_independent("import + fold", &o, &before, &fold_batchnorm(&o).unwrap());
    std::fs::remove_dir_all(&dir).ok();
}
