//! Per-channel kernels of `[N, C, H, W]` tensors: global average pooling and the
//! squeeze-excitation product `x · s` with `s: [N, C, 1, 1]`, forward and backward, one
//! pass over each plane (candle's broadcasting ops spend more in indexing and thread
//! hand-off than in arithmetic on these shapes).

use super::cpu::{ce, slice, tensor, with_f32};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `(N·C, H·W)` of a 4-d layout.
fn planes(dims: &[usize], what: &str) -> candle_core::Result<(usize, usize)> {
    match dims {
        [n, c, h, w] => Ok((n * c, h * w)),
        _ => candle_core::bail!("{what}: expected [N, C, H, W], got {dims:?}"),
    }
}

/// Global average pooling `[N, C, H, W] → [N, C, 1, 1]`.
pub struct GlobalAvgPoolOp;

impl CustomOp1 for GlobalAvgPoolOp {
    fn name(&self) -> &'static str {
        "lopper-global-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "global pool input")?;
        let (nc, p) = planes(l.dims(), "global pool")?;
        let mut y = vec![0f32; nc];
        let inv = 1.0 / p.max(1) as f32;
        // Planes per task: ~16 K inputs (a 4×4 map's 1280 planes were 1280 tasks).
        let per = (1usize << 14).div_ceil(p.max(1));
        super::par::chunks_mut(&mut y[..], per, |t, ys| {
            for (j, v) in ys.iter_mut().enumerate() {
                let i = t * per + j;
                *v = super::reduce::row_sum(&x[i * p..(i + 1) * p]) * inv;
            }
        });
        let d = l.dims();
        Ok((CpuStorage::F32(y), Shape::from((d[0], d[1], 1, 1))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (nc, p) = planes(x.dims(), "global pool")?;
        let dx = with_f32(dy, |g| {
            let mut dx = vec![0f32; nc * p];
            let inv = 1.0 / p.max(1) as f32;
            dx.par_chunks_mut(p.max(1))
                .zip(g.par_iter())
                .for_each(|(row, &gv)| row.fill(gv * inv));
            dx
        })
        .map_err(ce)?;
        Ok(Some(tensor(dx, x.dims())?))
    }
}

/// `y[n, c, :, :] = x[n, c, :, :] · s[n, c]` (a squeeze-excitation gate).
pub struct ChannelScaleOp;

impl CustomOp2 for ChannelScaleOp {
    fn name(&self) -> &'static str {
        "lopper-channel-scale"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "channel scale input")?;
        let s = slice(s2, l2, "channel scale gate")?;
        let (nc, p) = planes(l1.dims(), "channel scale")?;
        if s.len() != nc {
            candle_core::bail!(
                "channel scale: gate {:?} does not match input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let mut y = vec![0f32; nc * p];
        // Planes per task: ~16 K values.
        let p1 = p.max(1);
        let per = (1usize << 14).div_ceil(p1);
        super::par::chunks_mut(&mut y[..], per * p1, |t, ys| {
            for (j, o) in ys.chunks_mut(p1).enumerate() {
                let i = t * per + j;
                let sv = s[i];
                for (a, &b) in o.iter_mut().zip(&x[i * p1..(i + 1) * p1]) {
                    *a = b * sv;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (nc, p) = planes(x.dims(), "channel scale")?;
        let p1 = p.max(1);
        let r = with_f32(dy, |g| {
            with_f32(s, |sv| {
                with_f32(x, |xv| {
                    let mut dx = vec![0f32; nc * p];
                    dx.par_chunks_mut(p1)
                        .zip(g.par_chunks(p1).zip(sv.par_iter()))
                        .for_each(|(d, (gr, &s))| {
                            for (a, &b) in d.iter_mut().zip(gr) {
                                *a = b * s;
                            }
                        });
                    let ds: Vec<f32> = g
                        .par_chunks(p1)
                        .zip(xv.par_chunks(p1))
                        .map(|(gr, xr)| super::reduce::row_dot(gr, xr))
                        .collect();
                    (dx, ds)
                })
            })
        })
        .and_then(|r| r)
        .and_then(|r| r)
        .map_err(ce)?;
        Ok((Some(tensor(r.0, x.dims())?), Some(tensor(r.1, s.dims())?)))
    }
}
