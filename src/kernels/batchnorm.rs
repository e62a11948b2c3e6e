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
    /// Off the CPU: the statistics as `[C]` tensors on the device (`mean` and `var` are
    /// then empty), so updating the running averages reads nothing back to the host.
    pub on_device: Option<(candle_core::Tensor, candle_core::Tensor)>,
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
                        let (a, b) = lane_sums(row, row);
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
                on_device: None,
            });
        }
        let (mean, inv) = self.mean_invstd(c)?;
        let scale: Vec<f32> = (0..c).map(|i| gamma[i] * inv[i]).collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
        let mut out = vec![0f32; x.len()];
        let relu = self.relu;
        // Whole (image, channel) rows per task, ≥ 16 K values each.
        let s1 = s.max(1);
        let rows = (16384 / s1).max(1);
        super::par::chunks_mut(&mut out, rows * s1, |t, o| {
            for (j, o) in o.chunks_mut(s1).enumerate() {
                let row = t * rows + j;
                let xi = &x[row * s1..row * s1 + o.len()];
                let ci = row % c;
                let (a, b) = (scale[ci], shift[ci]);
                if relu {
                    o.iter_mut()
                        .zip(xi)
                        .for_each(|(o, &v)| *o = (v * a + b).max(0.0));
                } else {
                    o.iter_mut().zip(xi).for_each(|(o, &v)| *o = v * a + b);
                }
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
            let rs = s.max(1);
            // Pass 1: the ReLU-masked output gradient, written where dx will go.
            let mut dx: Vec<f32> = if relu {
                g.iter()
                    .zip(y)
                    .map(|(&g, &y)| if y > 0.0 { g } else { 0.0 })
                    .collect()
            } else {
                g.to_vec()
            };
            // Per-channel sums of dz and dz*x (8 f32 lanes per row, rows summed in f64).
            let sums: Vec<(f32, f32)> = (0..c)
                .into_par_iter()
                .map(|ci| {
                    let (mut sd, mut sdx) = (0f64, 0f64);
                    for ni in 0..n {
                        let r = (ni * c + ci) * rs;
                        let (a, b) = lane_sums(&dx[r..r + rs], &xv[r..r + rs]);
                        sd += a as f64;
                        sdx += b as f64;
                    }
                    let sdxhat = (sdx - mean[ci] as f64 * sd) as f32 * inv[ci];
                    (sd as f32, sdxhat)
                })
                .collect();
            // Pass 2: dx in place.
            let m = (n * s) as f32;
            dx.par_chunks_mut(rs)
                .zip(xv.par_chunks(rs))
                .enumerate()
                .for_each(|(row, (d, xr))| {
                    let ci = row % c;
                    let k = gm[ci] * inv[ci];
                    if train {
                        let (sd, sdx) = (sums[ci].0 / m, sums[ci].1 / m);
                        let (mu, iv) = (mean[ci], inv[ci]);
                        for (d, &xv) in d.iter_mut().zip(xr) {
                            *d = k * (*d - sd - (xv - mu) * iv * sdx);
                        }
                    } else {
                        d.iter_mut().for_each(|d| *d *= k);
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

/// `(sum(a), sum(a * b))` with eight independent accumulators so the loop vectorises.
#[inline]
fn lane_sums(a: &[f32], b: &[f32]) -> (f32, f32) {
    let mut s1 = [0f32; 8];
    let mut s2 = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            s1[l] += x[l];
            s2[l] += x[l] * y[l];
        }
    }
    let mut t1: f32 = s1.iter().sum();
    let mut t2: f32 = s2.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        t1 += x;
        t2 += x * y;
    }
    (t1, t2)
}
