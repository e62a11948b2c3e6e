//! LayerNorm across channels at every position of `[N, C, P…]` (channels-first tokens:
//! a transformer's LayerNorm over its embedding), forward and backward, as one candle
//! custom op over `(x, gamma, beta)`.
//!
//! An image's `[C, P]` block is small (a ViT's 128×64 floats = 32 KB) and its rows are
//! contiguous along positions, so the per-position statistics are row-by-row vector
//! accumulations: mean, then the centred variance (two passes, no cancellation), then the
//! output. The backward recomputes `x̂` (cheaper than storing it) and needs two
//! per-position sums, `Σ_c dx̂` and `Σ_c dx̂·x̂`. Parallel over images; `γ`/`β` gradients are
//! per-image partial sums added in image order (deterministic).
//!
//! With `rms` set it is RMSNorm (LLaMA's): no centring (the mean is taken as zero, so the
//! statistic is the root mean square) and the backward loses its `Σ_c dx̂` term.

use super::cpu::{ce, slice, tensor, with_f32};
use super::simd::multiversion;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

pub struct LayerNormOp {
    pub eps: f32,
    pub rms: bool,
}

/// `(N, C, P)` of a `[N, C, …]` shape.
fn ncp(dims: &[usize]) -> (usize, usize, usize) {
    (
        dims[0],
        dims.get(1).copied().unwrap_or(1),
        dims.iter().skip(2).product(),
    )
}

multiversion! {
    /// Per-position mean and inverse standard deviation of one image's `[C, P]` block
    /// (`rms`: mean zero, inverse root mean square).
    fn stats(x: &[f32], c: usize, p: usize, eps: f32, rms: bool, mean: &mut [f32], inv: &mut [f32]) {
        mean.fill(0.0);
        let k = 1.0 / c as f32;
        if !rms {
            for row in x.chunks_exact(p) {
                for (m, &v) in mean.iter_mut().zip(row) {
                    *m += v;
                }
            }
            mean.iter_mut().for_each(|m| *m *= k);
        }
        inv.fill(0.0);
        for row in x.chunks_exact(p) {
            for ((s, &v), &m) in inv.iter_mut().zip(row).zip(mean.iter()) {
                *s += (v - m) * (v - m);
            }
        }
        inv.iter_mut().for_each(|s| *s = 1.0 / (*s * k + eps).sqrt());
    }
}

multiversion! {
    /// `y = x̂·γ + β` for one image.
    fn normalise(x: &[f32], p: usize, mean: &[f32], inv: &[f32], g: &[f32], b: &[f32], y: &mut [f32]) {
        for (ci, (yr, xr)) in y.chunks_exact_mut(p).zip(x.chunks_exact(p)).enumerate() {
            let (gc, bc) = (g[ci], b[ci]);
            for (((o, &v), &m), &s) in yr.iter_mut().zip(xr).zip(mean).zip(inv) {
                *o = (v - m) * s * gc + bc;
            }
        }
    }
}

multiversion! {
    /// One image's backward: `dx`, and its `dγ`, `dβ` partial sums added into `dg`, `db`.
    /// `a`, `b2` are per-position scratch (`Σ_c dx̂`, `Σ_c dx̂·x̂`).
    #[allow(clippy::too_many_arguments)]
    fn backward_image(
        x: &[f32],
        dy: &[f32],
        g: &[f32],
        p: usize,
        mean: &[f32],
        inv: &[f32],
        dx: &mut [f32],
        dg: &mut [f32],
        db: &mut [f32],
        a: &mut [f32],
        b2: &mut [f32],
        rms: bool,
    ) {
        a.fill(0.0);
        b2.fill(0.0);
        for (ci, (xr, dr)) in x.chunks_exact(p).zip(dy.chunks_exact(p)).enumerate() {
            let gc = g[ci];
            let (mut sg, mut sb) = (0f32, 0f32);
            for (k, (&v, &d)) in xr.iter().zip(dr).enumerate() {
                let xh = (v - mean[k]) * inv[k];
                let dxh = d * gc;
                a[k] += dxh;
                b2[k] += dxh * xh;
                sg += d * xh;
                sb += d;
            }
            dg[ci] += sg;
            db[ci] += sb;
        }
        let k = 1.0 / (x.len() / p) as f32;
        // RMSNorm has no centring: no Σ_c dx̂ term.
        let ka = if rms { 0.0 } else { k };
        for (ci, ((xr, dr), o)) in x
            .chunks_exact(p)
            .zip(dy.chunks_exact(p))
            .zip(dx.chunks_exact_mut(p))
            .enumerate()
        {
            let gc = g[ci];
            for (j, ((&v, &d), o)) in xr.iter().zip(dr).zip(o.iter_mut()).enumerate() {
                let xh = (v - mean[j]) * inv[j];
                *o = inv[j] * (d * gc - a[j] * ka - xh * b2[j] * k);
            }
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "lopper-layer-norm"
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
        let x = slice(s1, l1, "layer norm input")?;
        let g = slice(s2, l2, "layer norm weight")?;
        let b = slice(s3, l3, "layer norm bias")?;
        let (_, c, p) = ncp(l1.dims());
        if g.len() != c || b.len() != c {
            candle_core::bail!("layer norm over {c} channels with {} weights", g.len());
        }
        let (eps, rms) = (self.eps, self.rms);
        let mut y = vec![0f32; x.len()];
        if c * p > 0 {
            super::par::chunks_mut(&mut y, c * p, |i, yi| {
                let xi = &x[i * c * p..(i + 1) * c * p];
                let (mut mean, mut inv) = (vec![0f32; p], vec![0f32; p]);
                stats(xi, c, p, eps, rms, &mut mean, &mut inv);
                normalise(xi, p, &mean, &inv, g, b, yi);
            });
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, c, p) = ncp(x.dims());
        let (eps, rms) = (self.eps, self.rms);
        let run = |xv: &[f32], dy: &[f32], g: &[f32]| {
            let mut dx = vec![0f32; xv.len()];
            let img = (c * p).max(1);
            // Per image: dx, and partial (dγ, dβ) summed afterwards in image order.
            let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
                .par_chunks_mut(img)
                .zip(xv.par_chunks(img).zip(dy.par_chunks(img)))
                .map(|(dxi, (xi, di))| {
                    let (mut mean, mut inv) = (vec![0f32; p], vec![0f32; p]);
                    stats(xi, c, p, eps, rms, &mut mean, &mut inv);
                    let (mut dg, mut db) = (vec![0f32; c], vec![0f32; c]);
                    let (mut a, mut b2) = (vec![0f32; p], vec![0f32; p]);
                    backward_image(
                        xi, di, g, p, &mean, &inv, dxi, &mut dg, &mut db, &mut a, &mut b2, rms,
                    );
                    (dg, db)
                })
                .collect();
            let (mut dg, mut db) = (vec![0f32; c], vec![0f32; c]);
            for (g1, b1) in &parts {
                dg.iter_mut().zip(g1).for_each(|(a, b)| *a += b);
                db.iter_mut().zip(b1).for_each(|(a, b)| *a += b);
            }
            (dx, dg, db)
        };
        let x = x.contiguous()?;
        let grad = grad.contiguous()?;
        let (dx, dg, db) = with_f32(&x, |xv| {
            with_f32(&grad, |dy| with_f32(gamma, |g| run(xv, dy, g)))
        })
        .and_then(|r| r)
        .and_then(|r| r)
        .map_err(ce)?;
        Ok((
            Some(tensor(dx, x.dims())?),
            Some(tensor(dg, &[c])?),
            Some(tensor(db, &[c])?),
        ))
    }
}
