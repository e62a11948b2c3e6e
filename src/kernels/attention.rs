//! Multi-head self-attention over channels-first tokens, forward and backward, as one
//! candle custom op on the stacked projections `x = [N, 3·H·d, T]` → `[N, H·d, T]`.
//!
//! Per (image, head), with `Q, K, V` its `[d, T]` row blocks (rows contiguous along
//! tokens, read in place): logits `L = Qᵀ·K` (a `T×T` GEMM), `A = softmax(scale·L)` row by
//! row (vectorised exp), and `O = V·Aᵀ` written straight into the head's rows of the
//! output. Nothing but `A` is materialised, one `T×T` block per task; the backward
//! recomputes it (cheaper than keeping `N·H·T²` floats alive between passes) and runs
//! four GEMMs: `dV = dO·A`, `dA = dOᵀ·V`, `dL = scale·A⊙(dA − rowsum(A⊙dA))`,
//! `dQ = K·dLᵀ`, `dK = Q·dL`. Parallel over (image, head); each product single-threaded.

use super::act;
use super::cpu::{ce, slice, tensor, with_f32};
use super::gemm::{sgemm, Mat};
use super::simd::multiversion;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

pub struct AttentionOp {
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

multiversion! {
    /// Row-wise `a = softmax(scale·a)` over rows of `n`.
    fn softmax_rows(a: &mut [f32], n: usize, scale: f32) {
        for row in a.chunks_exact_mut(n) {
            let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = act::exp((*v - m) * scale);
                sum += *v;
            }
            let k = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= k);
        }
    }
}

multiversion! {
    /// `dA ← scale·A⊙(dA − rowsum(A⊙dA))`, the softmax backward, in place in `da`.
    fn softmax_back(a: &[f32], da: &mut [f32], n: usize, scale: f32) {
        for (ar, dr) in a.chunks_exact(n).zip(da.chunks_exact_mut(n)) {
            let dot: f32 = ar.iter().zip(dr.iter()).map(|(&x, &y)| x * y).sum();
            for (d, &x) in dr.iter_mut().zip(ar) {
                *d = scale * x * (*d - dot);
            }
        }
    }
}

impl AttentionOp {
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let d = l.dims();
        let (n, c, t) = (d[0], d[1], d.iter().skip(2).product::<usize>());
        let e = self.heads * self.head_dim;
        if c != 3 * e {
            candle_core::bail!(
                "attention: {c} input channels for {} heads of {}",
                self.heads,
                self.head_dim
            );
        }
        Ok((n, e, t))
    }

    /// `A = softmax(scale·QᵀK)` of one head into `a` (`[T, T]`).
    fn probs(&self, q: &[f32], k: &[f32], t: usize, a: &mut [f32]) {
        sgemm(
            t,
            t,
            self.head_dim,
            a,
            Mat::rm_t(q, t),
            Mat::rm(k, t),
            false,
            false,
        );
        softmax_rows(a, t, self.scale);
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "lopper-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "attention input")?;
        let (n, e, tl) = self.dims(l)?;
        let (h, d) = (self.heads, self.head_dim);
        let mut out = vec![0f32; n * e * tl];
        if tl > 0 && d > 0 {
            out.par_chunks_mut(d * tl).enumerate().for_each(|(i, o)| {
                let (ni, hi) = (i / h, i % h);
                let base = ni * 3 * e * tl;
                let at = |third: usize| &x[base + (third * e + hi * d) * tl..][..d * tl];
                let mut a = vec![0f32; tl * tl];
                self.probs(at(0), at(1), tl, &mut a);
                // O[j, t] = Σ_s V[j, s]·A[t, s].
                sgemm(
                    d,
                    tl,
                    tl,
                    o,
                    Mat::rm(at(2), tl),
                    Mat::rm_t(&a, tl),
                    false,
                    false,
                );
            });
        }
        let mut dims = l.dims().to_vec();
        dims[1] = e;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = x.contiguous()?;
        let grad = grad.contiguous()?;
        let (n, e, tl) = self.dims(x.layout())?;
        let (h, d) = (self.heads, self.head_dim);
        let run = |xv: &[f32], dy: &[f32]| {
            // Per (image, head): [dQ | dK | dV], each [d, T].
            let parts: Vec<Vec<f32>> = (0..n * h)
                .into_par_iter()
                .map(|i| {
                    let (ni, hi) = (i / h, i % h);
                    let base = ni * 3 * e * tl;
                    let at = |third: usize| &xv[base + (third * e + hi * d) * tl..][..d * tl];
                    let (q, k, v) = (at(0), at(1), at(2));
                    let dout = &dy[(ni * e + hi * d) * tl..][..d * tl];
                    let mut a = vec![0f32; tl * tl];
                    self.probs(q, k, tl, &mut a);
                    let mut g = vec![0f32; 3 * d * tl];
                    let (dq, rest) = g.split_at_mut(d * tl);
                    let (dk, dv) = rest.split_at_mut(d * tl);
                    // dV[j, s] = Σ_t dO[j, t]·A[t, s].
                    sgemm(
                        d,
                        tl,
                        tl,
                        dv,
                        Mat::rm(dout, tl),
                        Mat::rm(&a, tl),
                        false,
                        false,
                    );
                    // dA[t, s] = Σ_j dO[j, t]·V[j, s], then the softmax backward.
                    let mut da = vec![0f32; tl * tl];
                    sgemm(
                        tl,
                        tl,
                        d,
                        &mut da,
                        Mat::rm_t(dout, tl),
                        Mat::rm(v, tl),
                        false,
                        false,
                    );
                    softmax_back(&a, &mut da, tl, self.scale);
                    // dQ[j, t] = Σ_s K[j, s]·dL[t, s]; dK[j, s] = Σ_t Q[j, t]·dL[t, s].
                    sgemm(
                        d,
                        tl,
                        tl,
                        dq,
                        Mat::rm(k, tl),
                        Mat::rm_t(&da, tl),
                        false,
                        false,
                    );
                    sgemm(
                        d,
                        tl,
                        tl,
                        dk,
                        Mat::rm(q, tl),
                        Mat::rm(&da, tl),
                        false,
                        false,
                    );
                    g
                })
                .collect();
            let mut dx = vec![0f32; xv.len()];
            for (i, g) in parts.iter().enumerate() {
                let (ni, hi) = (i / h, i % h);
                for third in 0..3 {
                    let dst = ni * 3 * e * tl + (third * e + hi * d) * tl;
                    dx[dst..dst + d * tl].copy_from_slice(&g[third * d * tl..(third + 1) * d * tl]);
                }
            }
            dx
        };
        let dx = with_f32(&x, |xv| with_f32(&grad, |dy| run(xv, dy)))
            .and_then(|r| r)
            .map_err(ce)?;
        Ok(Some(tensor(dx, x.dims())?))
    }
}
