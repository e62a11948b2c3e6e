//! VGG with batch norm, CIFAR variant: 3x3 convs, 2x2 max-pools, a single 512→classes
//! classifier after the last pool (1x1 spatial at 32x32 input).

use crate::graph::ops::Conv2d;
use crate::graph::{Graph, GraphBuilder};
use anyhow::{bail, Result};

const M: usize = 0;

pub fn vgg_cifar(depth: usize, shape: &[usize], classes: usize, seed: u64) -> Result<Graph> {
    let cfg: &[usize] = match depth {
        11 => &[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
        16 => &[
            64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M,
        ],
        _ => bail!("VGG depth must be 11 or 16, got {depth}"),
    };
    let mut b = GraphBuilder::new(seed);
    let mut x = b.input(shape)?;
    let mut cin = shape[0];
    let mut li = 0;
    for &v in cfg {
        if v == M {
            x = b.maxpool(x, 2, 2, 0)?;
        } else {
            x = b.conv(
                &format!("features.conv{li}"),
                x,
                Conv2d::new(cin, v, 3, 1, 1),
            )?;
            x = b.bn(&format!("features.bn{li}"), x)?;
            x = b.relu(x)?;
            cin = v;
            li += 1;
        }
    }
    let x = b.flatten(x)?;
    let f = b.shape(x)[0];
    let x = b.linear("classifier", x, f, classes)?;
    b.finish(&[x])
}
