//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use lopper::graph::Graph;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

pub fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max)
}

/// Gives BN layers (and biases) non-trivial statistics so masking errors cannot hide.
pub fn randomise_bn(g: &Graph, seed: u64) {
    let mut rng = Pcg64::seed_from_u64(seed);
    for (k, v) in g.params() {
        let n = v.elem_count();
        let d: Vec<f32> = if k.ends_with("running_mean") || k.ends_with(".bias") {
            (0..n).map(|_| rng.gen_range(-0.5..0.5)).collect()
        } else if k.ends_with("running_var") {
            (0..n).map(|_| rng.gen_range(0.5..2.0)).collect()
        } else {
            continue;
        };
        v.set(&Tensor::from_vec(d, v.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

/// Applies fuzz edits to `b`: `(position, byte, kind)` with kind 0 = overwrite,
/// 1 = insert, 2 = delete, then an optional truncation.
pub fn mutate(b: &mut Vec<u8>, edits: &[(usize, u8, u8)], cut: Option<usize>) {
    for &(pos, byte, kind) in edits {
        if b.is_empty() {
            break;
        }
        let p = pos % b.len();
        match kind {
            0 => b[p] = byte,
            1 => b.insert(p, byte),
            _ => {
                b.remove(p);
            }
        }
    }
    if let Some(c) = cut {
        b.truncate(c.min(b.len()));
    }
}

/// Runs the `lopper` binary: (success, stdout, stderr); a panic fails the test.
pub fn lopper_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        err,
    )
}

/// A fresh temporary directory for one test.
pub fn fresh_dir(prefix: &str, name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lopper-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// L1, local scope, half of every group's units removed (widths not rounded): the plan
/// and the pruned graph.
pub fn l1_half(g: &Graph, groups: &lopper::prune::Groups) -> (lopper::prune::Removal, Graph) {
    use lopper::prune::{plan, remove_units, Budget, Criterion, PlanConfig, Scope};
    let cfg = PlanConfig {
        criterion: Criterion::L1,
        scope: Scope::Local,
        budget: Budget::Ratio(0.5),
        round_to: 1,
        lamp: false,
        overrides: vec![],
        seed: 0,
    };
    let removal = plan(g, groups, &cfg, None).unwrap();
    let pruned = remove_units(g, groups, &removal).unwrap();
    (removal, pruned)
}

/// The kept fraction of the dense MACs in a `lopper.report/1` JSON report.
pub fn macs_kept(r: &serde_json::Value) -> f64 {
    r["result"]["macs"].as_f64().unwrap() / r["dense"]["macs"].as_f64().unwrap()
}
