//! Depth (residual block removal) and resolution surgery.

use candle_core::{Device, Tensor};
use lopper::exec::{forward, forward_with, ForwardOpts, Mode};
use lopper::graph::cost::cost;
use lopper::prune::{remove_blocks, residual_blocks, with_resolution};
use lopper::zoo;
use std::collections::HashMap;

mod common;
use common::vals;

#[test]
fn removing_a_residual_block_equals_zeroing_its_branch() {
    let g = zoo::build("resnet20", 5).unwrap();
    let blocks = residual_blocks(&g).unwrap();
    // 9 blocks, of which the two downsampling ones have no identity shortcut.
    assert_eq!(blocks.len(), 7);
    assert!(blocks.iter().all(|b| b.removable));
    let b = blocks
        .iter()
        .find(|b| g.nodes[b.branch[0]].name.starts_with("layer1.1"))
        .unwrap();
    let pruned = remove_blocks(&g, &[b.add]).unwrap();
    assert!(pruned.node_id("layer1.1.conv1").is_none());
    let dense_macs = cost(&g).unwrap().total_macs;
    assert_eq!(
        dense_macs - cost(&pruned).unwrap().total_macs,
        2 * 16 * 16 * 9 * 32 * 32
    );
    let x = Tensor::randn(0f32, 1f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
    // The Add's first input is the branch: a zero mask removes it.
    let mut masks = HashMap::new();
    masks.insert(
        b.add,
        Tensor::zeros((1, 16, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let opts = ForwardOpts {
        input_masks: Some(&masks),
        ..ForwardOpts::new(Mode::Eval)
    };
    let want = vals(&forward_with(&g, &x, &opts).unwrap().outputs[0]);
    let got = vals(&forward(&pruned, &x, Mode::Eval).unwrap());
    for (a, b) in want.iter().zip(&got) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    // The dense graph is untouched.
    assert!(g.node_id("layer1.1.conv1").is_some());
    let e = remove_blocks(&g, &[g.node_id("fc").unwrap()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not the Add of a residual block"), "{e}");
}

#[test]
fn resolution_changes_for_global_pooling_nets_only() {
    let g = zoo::build("resnet20", 0).unwrap();
    let small = with_resolution(&g, 24, 24).unwrap();
    let x = Tensor::randn(0f32, 1f32, (2, 3, 24, 24), &Device::Cpu).unwrap();
    assert_eq!(forward(&small, &x, Mode::Eval).unwrap().dims(), &[2, 10]);
    let ratio = cost(&small).unwrap().total_macs as f64 / cost(&g).unwrap().total_macs as f64;
    assert!((ratio - 0.5625).abs() < 0.01, "{ratio}");
    // Independent weights: changing one leaves the other.
    let k = "conv1.weight";
    small
        .set_param(k, &small.params()[k].as_tensor().zeros_like().unwrap())
        .unwrap();
    assert!(vals(g.params()[k].as_tensor()).iter().any(|&v| v != 0.0));
    let e = format!(
        "{:#}",
        with_resolution(&zoo::build("digit_cnn", 0).unwrap(), 20, 20).unwrap_err()
    );
    assert!(e.contains("20x20") && e.contains("fc_layers.0"), "{e}");
}
