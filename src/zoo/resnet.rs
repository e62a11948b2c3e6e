//! CIFAR ResNets (He et al. 2016, §4.2): depth 6n+2, stages of 16/32/64 channels, basic
//! blocks, option-A shortcuts (subsample + zero channel padding: no parameters, no MACs),
//! the variant whose published cost is ResNet-56 = 125.49 M MACs, 0.85 M params.

use crate::graph::ops::{ChannelPad, Conv2d, Op, Pool2d};
use crate::graph::{Graph, GraphBuilder, NodeId};
use anyhow::{bail, Result};

/// Basic block `layerS.B`: conv-bn-relu-conv-bn, + shortcut, relu.
fn block(
    b: &mut GraphBuilder,
    x: NodeId,
    name: &str,
    cin: usize,
    cout: usize,
    stride: usize,
) -> Result<NodeId> {
    let y = b.conv(
        &format!("{name}.conv1"),
        x,
        Conv2d::new(cin, cout, 3, stride, 1),
    )?;
    let y = b.bn(&format!("{name}.bn1"), y)?;
    let y = b.relu(y)?;
    let y = b.conv(
        &format!("{name}.conv2"),
        y,
        Conv2d::new(cout, cout, 3, 1, 1),
    )?;
    let y = b.bn(&format!("{name}.bn2"), y)?;
    let sc = if stride != 1 || cin != cout {
        let s = b.add(
            &format!("{name}.shortcut.pool"),
            Op::AvgPool(Pool2d::new(1, stride, 0)),
            &[x],
        )?;
        let extra = cout - cin;
        b.add(
            &format!("{name}.shortcut.pad"),
            Op::ChannelPad(ChannelPad {
                before: extra / 2,
                after: extra - extra / 2,
            }),
            &[s],
        )?
    } else {
        x
    };
    let s = b.add_nodes(y, sc)?;
    b.relu(s)
}

pub fn resnet_cifar(depth: usize, shape: &[usize], classes: usize, seed: u64) -> Result<Graph> {
    if depth < 8 || !(depth - 2).is_multiple_of(6) {
        bail!("CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110), got {depth}");
    }
    let n = (depth - 2) / 6;
    let mut b = GraphBuilder::new(seed);
    let x = b.input(shape)?;
    let x = b.conv("conv1", x, Conv2d::new(shape[0], 16, 3, 1, 1))?;
    let x = b.bn("bn1", x)?;
    let mut x = b.relu(x)?;
    let mut cin = 16;
    for (s, cout) in [16, 32, 64].into_iter().enumerate() {
        for i in 0..n {
            let stride = if s > 0 && i == 0 { 2 } else { 1 };
            x = block(&mut b, x, &format!("layer{}.{i}", s + 1), cin, cout, stride)?;
            cin = cout;
        }
    }
    let x = b.gap(x)?;
    let x = b.flatten(x)?;
    let x = b.linear("fc", x, 64, classes)?;
    b.finish(&[x])
}
