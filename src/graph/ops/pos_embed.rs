//! A learned additive position embedding `y[c, t] = x[c, t] + e[c, t]` over a
//! channels-first token tensor `[D, T, 1]` (or any `[D, …]` whose positions number `T`):
//! ViT's `pos_embedding`. Channels pass through (the embedding is sliced with the
//! embedding dimension's group).

use super::param::WEIGHT;
use super::{expect_inputs, Coupling, InitRule, OpSpec, ParamKind, ParamSpec};
use crate::graph::shape::{fmt_shape, numel, Shape};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PosEmbed {
    pub channels: usize,
    pub tokens: usize,
}

impl OpSpec for PosEmbed {
    fn kind(&self) -> &'static str {
        "PosEmbed"
    }

    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape> {
        expect_inputs("PosEmbed", inputs, 1)?;
        let s = inputs[0];
        if s.len() < 2 || s[0] != self.channels || numel(&s[1..]) != self.tokens {
            bail!(
                "PosEmbed of {} channels x {} positions got input {}",
                self.channels,
                self.tokens,
                fmt_shape(s)
            );
        }
        Ok(s.clone())
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: WEIGHT,
            shape: vec![self.channels, self.tokens],
            kind: ParamKind::Trainable,
            // ViT's N(0, 0.02²) is approximated by a small uniform (the IR's init rules).
            init: InitRule::Uniform { bound: 0.02 },
            out_axis: Some(0),
            in_axis: None,
        }]
    }

    fn coupling(&self) -> Coupling {
        Coupling::PassThrough
    }
}

impl PosEmbed {
    /// The embedding `[C, positions of from]` resampled to the positions of `to` (both
    /// per-channel position shapes, e.g. `[8, 8]` → `[10, 10]`): bilinear over a 2-D grid
    /// (half-pixel centres, PyTorch's `align_corners=False`), linear over a sequence. A
    /// design choice: ViT checkpoints are usually resampled bicubically; bilinear keeps the
    /// values inside the original range, and fine-tuning after a resolution change absorbs
    /// the difference.
    pub fn resample(
        weight: &[f32],
        channels: usize,
        from: &[usize],
        to: &[usize],
    ) -> Result<Vec<f32>> {
        let grid = |s: &[usize]| -> Result<(usize, usize)> {
            match s {
                [t] => Ok((*t, 1)),
                [h, w] => Ok((*h, *w)),
                [t, 1, ..] | [t, ..] if s[1..].iter().all(|&d| d == 1) => Ok((*t, 1)),
                _ => bail!("position embedding over positions {s:?}: only sequences and 2-D grids resample"),
            }
        };
        let ((h0, w0), (h1, w1)) = (grid(from)?, grid(to)?);
        if weight.len() != channels * h0 * w0 || h1 == 0 || w1 == 0 {
            bail!(
                "position embedding of {} values is not {channels} x {h0} x {w0}",
                weight.len()
            );
        }
        // Source coordinate and weights of each target index along one axis.
        let axis = |n0: usize, n1: usize| -> Vec<(usize, usize, f32)> {
            (0..n1)
                .map(|i| {
                    let x = ((i as f32 + 0.5) * n0 as f32 / n1 as f32 - 0.5)
                        .clamp(0.0, (n0 - 1) as f32);
                    let lo = x.floor() as usize;
                    (lo, (lo + 1).min(n0 - 1), x - lo as f32)
                })
                .collect()
        };
        let (ys, xs) = (axis(h0, h1), axis(w0, w1));
        let mut out = Vec::with_capacity(channels * h1 * w1);
        for c in 0..channels {
            let p = &weight[c * h0 * w0..(c + 1) * h0 * w0];
            for &(y0, y1, fy) in &ys {
                for &(x0, x1, fx) in &xs {
                    let top = p[y0 * w0 + x0] * (1.0 - fx) + p[y0 * w0 + x1] * fx;
                    let bot = p[y1 * w0 + x0] * (1.0 - fx) + p[y1 * w0 + x1] * fx;
                    out.push(top * (1.0 - fy) + bot * fy);
                }
            }
        }
        Ok(out)
    }
}
