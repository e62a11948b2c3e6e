//! Saved models load back identically; bad files give errors that name the file/tensor.

use candle_core::{Device, Tensor};
use lopper::exec::{forward, Mode};
use lopper::graph::io;
use lopper::zoo;
use std::path::PathBuf;

mod common;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lopper-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn save_load_roundtrip_is_identical_for_every_zoo_model() {
    for name in [
        "mlp:64-32-10",
        "lenet5",
        "resnet20",
        "mobilenetv2",
        "vgg11",
        "digit_cnn",
    ] {
        let g = zoo::build(name, 3).unwrap();
        let p = tmp(&format!("{}.safetensors", name.replace(':', "_")));
        io::save(&g, &p).unwrap();
        let h = io::load(&p).unwrap();
        assert_eq!(g.nodes, h.nodes, "{name} nodes");
        assert_eq!(g.outputs, h.outputs);
        for (k, v) in g.params() {
            let a: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = h.params()[k]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "{name} {k}");
        }
        let mut dims = vec![2];
        dims.extend(g.input_shape());
        let x = Tensor::randn(0f32, 1f32, dims, &Device::Cpu).unwrap();
        let ya: Vec<f32> = forward(&g, &x, Mode::Eval)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let yb: Vec<f32> = forward(&h, &x, Mode::Eval)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ya, yb, "{name} outputs");
    }
}

#[test]
fn weights_with_wrong_shape_name_the_tensor() {
    let big = zoo::build("mlp:64-32-10", 0).unwrap();
    let p = tmp("mlp_big.safetensors");
    io::save(&big, &p).unwrap();
    let small = zoo::build("mlp:64-16-10", 0).unwrap();
    let e = format!("{:#}", io::load_weights(&small, &p).unwrap_err());
    assert!(
        e.contains("tensor 'fc1.") && e.contains("mlp_big.safetensors"),
        "{e}"
    );
}

#[test]
fn missing_and_corrupt_files_are_clear_errors() {
    let e = format!("{:#}", io::load(&tmp("nope.safetensors")).unwrap_err());
    assert!(e.contains("nope.safetensors"), "{e}");
    let p = tmp("garbage.safetensors");
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let e = format!("{:#}", io::load(&p).unwrap_err());
    assert!(e.contains("garbage.safetensors"), "{e}");
    // Truncated model file.
    let g = zoo::build("mlp:64-32-10", 0).unwrap();
    let p = tmp("trunc.safetensors");
    io::save(&g, &p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", io::load(&p).unwrap_err());
    assert!(e.contains("trunc.safetensors"), "{e}");
}

#[test]
fn atomic_save_leaves_no_temp_files() {
    let g = zoo::build("mlp:8-4-2", 0).unwrap();
    let dir = tmp("atomic");
    std::fs::create_dir_all(&dir).unwrap();
    io::save(&g, &dir.join("m.safetensors")).unwrap();
    io::save(&g, &dir.join("m.safetensors")).unwrap();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["m.safetensors".to_string()]);
}

/// A small dense model and a compressed (CSR) sparse one, as saved bytes: the seeds of
/// the loader fuzz test.
fn fuzz_seeds() -> Vec<Vec<u8>> {
    let dense = zoo::build("resnet8", 0).unwrap();
    let p = tmp("fuzz-dense.safetensors");
    io::save(&dense, &p).unwrap();
    let mlp = zoo::build("mlp:64-32-10", 0).unwrap();
    let layers = lopper::sparse::layers::prunable_layers(&mlp);
    lopper::methods::pts::uniform_magnitude(
        &mlp,
        &layers,
        0.9,
        lopper::sparse::mask::Pattern::Unstructured,
    )
    .unwrap();
    let q = tmp("fuzz-sparse.safetensors");
    io::save(&mlp, &q).unwrap();
    vec![std::fs::read(&p).unwrap(), std::fs::read(&q).unwrap()]
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Mutated safetensors model bytes (overwrite, insert, delete, truncate; in the
    /// header and in the data): the loader returns Ok or an error, never panics. The
    /// long run is `cargo run --release --example fuzz -- safetensors N` (BENCHMARKS §7).
    #[test]
    fn mutated_model_files_never_panic(
        which in 0usize..2,
        edits in prop::collection::vec((0usize..4000, any::<u8>(), 0u8..3), 1..8),
        cut in prop::option::of(0usize..200_000),
    ) {
        thread_local!(static SEEDS: Vec<Vec<u8>> = fuzz_seeds());
        let mut b = SEEDS.with(|s| s[which].clone());
        // Positions fall in the first 4 KB: the header (graph JSON, tensor table).
        common::mutate(&mut b, &edits, cut);
        let _ = io::load_bytes(&b, "fuzz.safetensors");
    }
}

/// A plain PyTorch state dict of a net with batch norm, as `safetensors.torch.save_file`
/// writes it: every BN carries an I64 `num_batches_tracked` (ignored), and the weights may
/// be BF16 (converted). The loaded model matches the F32 one to BF16 precision.
#[test]
fn pytorch_state_dicts_with_num_batches_tracked_and_bf16_load() {
    use safetensors::tensor::{Dtype, TensorView};
    let g = zoo::build("resnet8", 4).unwrap();
    common::randomise_bn(&g, 1);
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, v) in g.params() {
        let f: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // BF16 is the top half of an f32 (rounded to nearest even).
        let b: Vec<u8> = f
            .iter()
            .flat_map(|x| {
                let u = x.to_bits();
                let r = ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16;
                r.to_le_bytes()
            })
            .collect();
        bufs.push((k.clone(), Dtype::BF16, v.dims().to_vec(), b));
        if let Some(bn) = k.strip_suffix(".running_mean") {
            let n: Vec<u8> = 7i64.to_le_bytes().to_vec();
            bufs.push((format!("{bn}.num_batches_tracked"), Dtype::I64, vec![], n));
        }
    }
    assert!(
        bufs.iter().any(|b| b.1 == Dtype::I64),
        "resnet8 has batch norm"
    );
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let p = tmp("state_dict_bf16.safetensors");
    std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
    let fresh = zoo::build("resnet8", 99).unwrap();
    io::load_weights(&fresh, &p).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let a: Vec<f32> = common::vals(&forward(&g, &x, Mode::Eval).unwrap());
    let b: Vec<f32> = common::vals(&forward(&fresh, &x, Mode::Eval).unwrap());
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() < 0.05 * scale, "{p} vs {q}");
    }
}
