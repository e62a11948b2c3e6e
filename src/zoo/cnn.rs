//! Small networks: MLP, LeNet-5 and the pretrained MNIST digit CNN's architecture.

use crate::graph::ops::Conv2d;
use crate::graph::{Graph, GraphBuilder};
use anyhow::{bail, Result};

/// MLP `sizes[0] -> ... -> sizes[last]` with ReLU between layers; layers `fc1, fc2, ...`.
pub fn mlp(sizes: &[usize], seed: u64) -> Result<Graph> {
    if sizes.len() < 2 || sizes.contains(&0) {
        bail!("an MLP needs at least two positive sizes, got {sizes:?}");
    }
    let mut b = GraphBuilder::new(seed);
    let mut x = b.input(&[sizes[0]])?;
    for (i, w) in sizes.windows(2).enumerate() {
        x = b.linear(&format!("fc{}", i + 1), x, w[0], w[1])?;
        if i + 2 < sizes.len() {
            x = b.relu(x)?;
        }
    }
    b.finish(&[x])
}

/// LeNet-5 (ReLU + max-pool variant): conv5x5(6, pad 2) → pool → conv5x5(16) → pool →
/// 120 → 84 → classes.
pub fn lenet5(shape: &[usize], classes: usize, seed: u64) -> Result<Graph> {
    let mut b = GraphBuilder::new(seed);
    let x = b.input(shape)?;
    let x = b.conv(
        "conv1",
        x,
        Conv2d::new(shape[0], 6, 5, 1, 2).with_bias(true),
    )?;
    let x = b.relu(x)?;
    let x = b.maxpool(x, 2, 2, 0)?;
    let x = b.conv("conv2", x, Conv2d::new(6, 16, 5, 1, 0).with_bias(true))?;
    let x = b.relu(x)?;
    let x = b.maxpool(x, 2, 2, 0)?;
    let x = b.flatten(x)?;
    let f = b.shape(x)[0];
    let x = b.linear("fc1", x, f, 120)?;
    let x = b.relu(x)?;
    let x = b.linear("fc2", x, 120, 84)?;
    let x = b.relu(x)?;
    let x = b.linear("fc3", x, 84, classes)?;
    b.finish(&[x])
}

/// The `digit_recognizer_cnn` architecture with its PyTorch parameter names
/// (`conv_layers.{0,3,6}`, `fc_layers.{0,2}`), so its safetensors load as they are.
pub fn digit_cnn(shape: &[usize], classes: usize, seed: u64) -> Result<Graph> {
    let mut b = GraphBuilder::new(seed);
    let mut x = b.input(shape)?;
    let mut cin = shape[0];
    for (name, cout) in [
        ("conv_layers.0", 32),
        ("conv_layers.3", 64),
        ("conv_layers.6", 128),
    ] {
        x = b.conv(name, x, Conv2d::new(cin, cout, 3, 1, 1).with_bias(true))?;
        x = b.relu(x)?;
        x = b.maxpool(x, 2, 2, 0)?;
        cin = cout;
    }
    let x = b.flatten(x)?;
    let f = b.shape(x)[0];
    let x = b.linear("fc_layers.0", x, f, 256)?;
    let x = b.relu(x)?;
    let x = b.linear("fc_layers.2", x, 256, classes)?;
    b.finish(&[x])
}
