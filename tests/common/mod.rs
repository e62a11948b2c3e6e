//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use lopper::graph::Graph;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

pub fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
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
