//! Fuzzes the ONNX importer: random byte edits (overwrite, insert, delete, truncate) of
//! every seed model; any panic aborts with the offending input saved. Usage:
//! `cargo run --release --example onnx_fuzz -- [ITERATIONS] [SEED_FILES...]`
//! (default: 100,000 iterations on ../shared/data/models/mnist-8.onnx; RNG seed from
//! `LOPPER_FUZZ_SEED`, default 0).

use rand::{Rng, SeedableRng};
use std::panic;

fn main() {
    let mut args = std::env::args().skip(1);
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let mut seeds: Vec<String> = args.collect();
    if seeds.is_empty() {
        seeds.push(
            lopper::data::data_dir()
                .join("models/mnist-8.onnx")
                .display()
                .to_string(),
        );
    }
    let corpus: Vec<Vec<u8>> = seeds
        .iter()
        .map(|s| std::fs::read(s).expect("seed file"))
        .collect();
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
        match panic::catch_unwind(|| lopper::onnx::import::import_bytes(&b, "fuzz")) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => {
                std::fs::write("fuzz-crash.onnx", &b).unwrap();
                eprintln!("panic at iteration {i}; input saved to fuzz-crash.onnx");
                std::process::exit(1);
            }
        }
    }
    println!(
        "{iters} mutated inputs in {:.1}s: {ok} imported, {err} rejected with an error, 0 panics",
        t.elapsed().as_secs_f64()
    );
}
