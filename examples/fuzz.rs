//! Fuzzes a model reader: random byte edits (overwrite, insert, delete, truncate) of every
//! seed file; any panic aborts with the offending input saved. Usage:
//! `cargo run --release --example fuzz -- onnx|safetensors [ITERATIONS] [SEED_FILES...]`
//! (default: 100,000 iterations; seeds `../shared/data/models/mnist-8.onnx` for onnx, and
//! for safetensors `digit_recognizer_cnn.safetensors` plus a saved ResNet-8 and a
//! compressed 90 %-sparse MLP made on the spot; RNG seed from `LOPPER_FUZZ_SEED`,
//! default 0).

use rand::{Rng, SeedableRng};
use std::panic;

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_else(|| "onnx".into());
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let seeds: Vec<String> = args.collect();
    let models = lopper::data::data_dir().join("models");
    let mut corpus: Vec<Vec<u8>> = seeds
        .iter()
        .map(|s| std::fs::read(s).expect("seed file"))
        .collect();
    if corpus.is_empty() {
        match target.as_str() {
            "onnx" => corpus.push(std::fs::read(models.join("mnist-8.onnx")).expect("mnist-8")),
            "safetensors" => {
                corpus.push(
                    std::fs::read(models.join("digit_recognizer_cnn.safetensors"))
                        .expect("digit_recognizer_cnn"),
                );
                let dir = std::env::temp_dir().join(format!("lopper-fuzz-{}", std::process::id()));
                let r8 = lopper::zoo::build("resnet8", 0).unwrap();
                let p = dir.join("r8.safetensors");
                lopper::graph::io::save(&r8, &p).unwrap();
                corpus.push(std::fs::read(&p).unwrap());
                let mlp = lopper::zoo::build("mlp:64-32-10", 0).unwrap();
                let layers = lopper::sparse::layers::prunable_layers(&mlp);
                lopper::methods::pts::uniform_magnitude(
                    &mlp,
                    &layers,
                    0.9,
                    lopper::sparse::mask::Pattern::Unstructured,
                )
                .unwrap();
                let p = dir.join("sparse.safetensors");
                lopper::graph::io::save(&mlp, &p).unwrap();
                corpus.push(std::fs::read(&p).unwrap());
                std::fs::remove_dir_all(&dir).ok();
            }
            t => panic!("unknown target '{t}' (onnx, safetensors)"),
        }
    }
    let read: fn(&[u8]) -> bool = match target.as_str() {
        "onnx" => |b| lopper::onnx::import::import_bytes(b, "fuzz").is_ok(),
        _ => |b| lopper::graph::io::load_bytes(b, "fuzz").is_ok(),
    };
    let seed = std::env::var("LOPPER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let (mut ok, mut err) = (0usize, 0usize);
    let t = std::time::Instant::now();
    panic::set_hook(Box::new(|_| {}));
    for i in 0..iters {
        let mut b = corpus[i % corpus.len()].clone();
        for _ in 0..rng.gen_range(1..8) {
            let p = rng.gen_range(0..b.len().max(1));
            match rng.gen_range(0..4) {
                0 if !b.is_empty() => b[p] = rng.gen(),
                1 => b.insert(p.min(b.len()), rng.gen()),
                2 if !b.is_empty() => {
                    b.remove(p);
                }
                _ => b.truncate(rng.gen_range(0..=b.len())),
            }
        }
        match panic::catch_unwind(|| read(&b)) {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(_) => {
                let f = format!("fuzz-crash.{target}");
                std::fs::write(&f, &b).unwrap();
                eprintln!("panic at iteration {i}; input saved to {f}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "{target}: {iters} mutated inputs in {:.1}s: {ok} loaded, {err} rejected with an error, 0 panics",
        t.elapsed().as_secs_f64()
    );
}
