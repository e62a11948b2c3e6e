//! STAMP's meta-learning behaviour on the spec's planted-channel toy (§7.11–7.12; the
//! problem is `lopper::methods::stamp::toy`): `cargo run --release --example stamp_toy`.
//! Knobs (environment): IT (iterations, 600), GAMMA (0.01), SEED (3), LRG / LRE (generator
//! and encoder learning rates), WARM (KL warm-up fraction), BATCH_BN=1 (batch statistics
//! in the gated forwards: the reference), NO_CENTER=1 (raw embedding), DBG=1 (layer-1 gate
//! means of two targets). Results: BENCHMARKS.md §10.

use lopper::methods::stamp::bbdrop::{ab, mean_pi};
use lopper::methods::stamp::meta::{sample_set, Stamp};
use lopper::methods::stamp::toy::{config, evaluate, planted_data, planted_net, PATTERNS};
use std::time::Instant;

fn env(k: &str, d: f64) -> f64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() -> anyhow::Result<()> {
    let g = planted_net()?;
    let reference = planted_data(&(0..PATTERNS).collect::<Vec<_>>(), 60, 1)?;
    let mut cfg = config(
        env("IT", 600.0) as usize,
        env("GAMMA", 0.01),
        env("SEED", 3.0) as u64,
    );
    cfg.lr_generator = env("LRG", cfg.lr_generator);
    cfg.lr_encoder = env("LRE", cfg.lr_encoder);
    cfg.kl_warmup = env("WARM", 0.0);
    cfg.frozen_bn = std::env::var("BATCH_BN").is_err();
    cfg.center_embedding = std::env::var("NO_CENTER").is_err();
    let t = Instant::now();
    let st = Stamp::new(&g, &cfg)?;
    st.meta_train(&g, &reference, &cfg, |l| {
        if l.iteration % 100 == 0 {
            eprintln!(
                "iteration {}: outer CE {:.3}, KL {:.1}, mean E[π] {:.3}",
                l.iteration, l.outer_ce, l.kl, l.mean_gate
            )
        }
    })?;
    let meta_s = t.elapsed().as_secs_f64();
    let flat_cfg = lopper::methods::stamp::meta::MetaConfig {
        constant_embedding: true,
        ..cfg.clone()
    };
    let flat = Stamp::new(&g, &flat_cfg)?;
    flat.meta_train(&g, &reference, &flat_cfg, |_| {})?;
    if std::env::var("DBG").is_ok() {
        for cls in [[0usize, 1, 2, 3], [8, 9, 10, 11]] {
            let d = planted_data(&cls, 30, 5)?;
            let p = st.gate_params(&g, &d, &sample_set(&d, 40, 0)?)?;
            let m: Vec<String> = p[0]
                .0
                .to_vec1::<f32>()?
                .iter()
                .zip(p[0].1.to_vec1::<f32>()?)
                .map(|(x, y)| {
                    let (a, b) = ab(*x as f64, y as f64);
                    format!("{:.3}", mean_pi(a, b))
                })
                .collect();
            eprintln!("{cls:?}: layer-1 E[π] {m:?}");
        }
    }
    let r = evaluate(&g, &st, &flat, 8, 0.3)?;
    println!(
        "meta-training {meta_s:.1} s ({} iterations)\n\
         unseen 4-pattern datasets: informative layer-1 channels kept p = {:.3} (spec > 0.9), \
         others dropped p = {:.3} (spec > 0.7)\n\
         disjoint datasets {{0-3}} vs {{8-11}}: Jaccard of kept channels {:.3} (spec < 0.5)\n\
         accuracy of the pruned net at {:.0} % MACs, no training: STAMP {:.3}, \
         constant embedding {:.3}",
        cfg.iterations,
        r.p_keep,
        r.p_drop,
        r.jaccard,
        100.0 * r.macs,
        r.acc_stamp,
        r.acc_flat
    );
    Ok(())
}
