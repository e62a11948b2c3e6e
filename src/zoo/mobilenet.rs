//! MobileNetV2 (Sandler et al. 2018), CIFAR variant: stem stride 1 and the second stage at
//! stride 1 (so 32x32 inputs end at 4x4), ReLU6, inverted residuals with linear
//! bottlenecks, residual only where stride is 1 and widths agree.

use crate::graph::ops::{ActivationKind, Conv2d};
use crate::graph::{Graph, GraphBuilder, NodeId};
use anyhow::Result;

fn cbr(b: &mut GraphBuilder, x: NodeId, name: &str, conv: Conv2d, act: bool) -> Result<NodeId> {
    let y = b.conv(&format!("{name}.conv"), x, conv)?;
    let y = b.bn(&format!("{name}.bn"), y)?;
    if act {
        b.act(y, ActivationKind::Relu6)
    } else {
        Ok(y)
    }
}

pub fn mobilenet_v2(shape: &[usize], classes: usize, seed: u64) -> Result<Graph> {
    // (expansion t, channels c, repeats n, stride s)
    let cfg = [
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let mut b = GraphBuilder::new(seed);
    let x = b.input(shape)?;
    let mut x = cbr(&mut b, x, "stem", Conv2d::new(shape[0], 32, 3, 1, 1), true)?;
    let mut cin = 32;
    let mut bi = 0;
    for (t, c, n, s) in cfg {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let hidden = cin * t;
            let name = format!("blocks.{bi}");
            let mut y = x;
            if t != 1 {
                y = cbr(
                    &mut b,
                    y,
                    &format!("{name}.expand"),
                    Conv2d::new(cin, hidden, 1, 1, 0),
                    true,
                )?;
            }
            y = cbr(
                &mut b,
                y,
                &format!("{name}.dw"),
                Conv2d::new(hidden, hidden, 3, stride, 1).with_groups(hidden),
                true,
            )?;
            y = cbr(
                &mut b,
                y,
                &format!("{name}.project"),
                Conv2d::new(hidden, c, 1, 1, 0),
                false,
            )?;
            x = if stride == 1 && cin == c {
                b.add_nodes(y, x)?
            } else {
                y
            };
            cin = c;
            bi += 1;
        }
    }
    let x = cbr(&mut b, x, "head", Conv2d::new(cin, 1280, 1, 1, 0), true)?;
    let x = b.gap(x)?;
    let x = b.flatten(x)?;
    let x = b.linear("classifier", x, 1280, classes)?;
    b.finish(&[x])
}
