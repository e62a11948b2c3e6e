//! Batch normalisation fused with an optional following ReLU, as one candle custom op over
//! `(x, gamma, beta)`. Training mode normalises with batch statistics and hands them to the
//! caller (who updates the running averages); eval mode uses the running statistics.
//! Forward is two passes (statistics, output); backward two (sums, input gradient).

use super::cpu::{ce, slice, tensor, with_f32};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Per-channel batch statistics recorded by a training-mode forward.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    pub mean: Vec<f32>,
    /// Biased variance (divided by the element count).
    pub var: Vec<f32>,
    /// Elements per channel that formed the statistics.
    pub count: usize,
}

pub struct BatchNormOp {
    pub eps: f32,
    pub relu: bool,
    /// `Some((mean, var))` = eval mode with these running statistics.
    pub fixed: Option<(Vec<f32>, Vec<f32>)>,
    /// Filled by a training-mode forward; read by backward and by the caller.
    pub stats: Arc<Mutex<Option<BatchStats>>>,
}

/// `(N, C, S)` view of a `[N, C, ...]` tensor.
fn ncs(dims: &[usize]) -> (usize, usize, usize) {
    let n = dims[0];
    let c = if dims.len() > 1 { dims[1] } else { 1 };
    let s = dims.iter().skip(2).product::<usize>();
    (n, c, s)
}

impl BatchNormOp {
    fn mean_invstd(&self, c: usize) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let (mean, var) = match &self.fixed {
            Some((m, v)) => (m.clone(), v.clone()),
            None => {
                let st = self.stats.lock().unwrap();
                let st = st
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("batchnorm: no batch stats".into()))?;
                (st.mean.clone(), st.var.clone())
            }
        };
        if mean.len() != c {
            candle_core::bail!("batchnorm: {} statistics for {c} channels", mean.len());
        }
        let inv = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        Ok((mean, inv))
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "lopper-batchnorm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "batchnorm input")?;
        let gamma = slice(s2, l2, "batchnorm weight")?;
        let beta = slice(s3, l3, "batchnorm bias")?;
        let (n, c, s) = ncs(l1.dims());
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("batchnorm: {c} channels but {} weights", gamma.len());
        }
        if self.fixed.is_none() {
            let m = (n * s) as f64;
            let stats: Vec<(f32, f32)> = (0..c)
                .into_par_iter()
                .map(|ci| {
                    let (mut sum, mut sq) = (0f64, 0f64);
                    for ni in 0..n {
                        let row = &x[(ni * c + ci) * s..(ni * c + ci + 1) * s];
                        let (a, b) = row
                            .iter()
                            .fold((0f32, 0f32), |(a, b), &v| (a + v, b + v * v));
                        sum += a as f64;
                        sq += b as f64;
                    }
                    let mean = sum / m;
                    ((mean) as f32, ((sq / m) - mean * mean).max(0.0) as f32)
                })
                .collect();
            *self.stats.lock().unwrap() = Some(BatchStats {
                mean: stats.iter().map(|s| s.0).collect(),
                var: stats.iter().map(|s| s.1).collect(),
                count: n * s,
            });
        }
        let (mean, inv) = self.mean_invstd(c)?;
        let scale: Vec<f32> = (0..c).map(|i| gamma[i] * inv[i]).collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
        let mut out = vec![0f32; x.len()];
        let relu = self.relu;
        out.par_chunks_mut(s.max(1))
            .zip(x.par_chunks(s.max(1)))
            .enumerate()
            .for_each(|(row, (o, xi))| {
                let ci = row % c;
                let (a, b) = (scale[ci], shift[ci]);
                if relu {
                    o.iter_mut()
                        .zip(xi)
                        .for_each(|(o, &v)| *o = (v * a + b).max(0.0));
                } else {
                    o.iter_mut().zip(xi).for_each(|(o, &v)| *o = v * a + b);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, s) = ncs(x.dims());
        let (mean, inv) = self.mean_invstd(c)?;
        let relu = self.relu;
        let train = self.fixed.is_none();
        let run = |xv: &[f32], g: &[f32], y: &[f32], gm: &[f32]| {
            // dy after the ReLU mask; per-channel sums of dy and dy * xhat.
            let sums: Vec<(f32, f32)> = (0..c)
                .into_par_iter()
                .map(|ci| {
                    let (mut sd, mut sdx) = (0f64, 0f64);
                    for ni in 0..n {
                        let r = (ni * c + ci) * s;
                        for j in r..r + s {
                            let d = if relu && y[j] <= 0.0 { 0.0 } else { g[j] };
                            sd += d as f64;
                            sdx += (d * (xv[j] - mean[ci])) as f64;
                        }
                    }
                    (sd as f32, (sdx as f32) * inv[ci])
                })
                .collect();
            let m = (n * s) as f32;
            let mut dx = vec![0f32; xv.len()];
            dx.par_chunks_mut(s.max(1))
                .enumerate()
                .for_each(|(row, d)| {
                    let ci = row % c;
                    let r = row * s;
                    let k = gm[ci] * inv[ci];
                    let (sd, sdx) = (sums[ci].0 / m, sums[ci].1 / m);
                    for j in 0..s {
                        let gj = if relu && y[r + j] <= 0.0 {
                            0.0
                        } else {
                            g[r + j]
                        };
                        d[j] = if train {
                            let xhat = (xv[r + j] - mean[ci]) * inv[ci];
                            k * (gj - sd - xhat * sdx)
                        } else {
                            k * gj
                        };
                    }
                });
            let dgamma: Vec<f32> = sums.iter().map(|s| s.1).collect();
            let dbeta: Vec<f32> = sums.iter().map(|s| s.0).collect();
            (dx, dgamma, dbeta)
        };
        let (dx, dgamma, dbeta) = with_f32(x, |xv| {
            with_f32(grad, |g| {
                with_f32(res, |y| with_f32(gamma, |gm| run(xv, g, y, gm)))
            })
        })
        .and_then(|r| r)
        .and_then(|r| r)
        .and_then(|r| r)
        .map_err(ce)?;
        Ok((
            Some(tensor(dx, x.dims())?),
            Some(tensor(dgamma, &[c])?),
            Some(tensor(dbeta, &[c])?),
        ))
    }
}
