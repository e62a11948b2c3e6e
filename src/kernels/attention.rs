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
//!
//! [`MaskedAttentionOp`] is the same with a key padding mask `[N, T]` (1 keep, 0 masked,
//! BERT's `attention_mask`): a masked key's logit gets −10⁹ before the softmax, so its
//! weight is exactly zero; the mask gets no gradient.

use super::act;
use super::cpu::{ce, slice, tensor, with_f32};
use super::gemm::{sgemm, Mat};
use super::reduce::{row_dot, row_max, row_sum};
use super::simd::multiversion;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

pub struct AttentionOp {
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

multiversion! {
    /// Row-wise `a = softmax(scale·a)` over rows of `n`: max, exponentials, sum and scaling
    /// as separate passes (each vectorises; one fused loop with a running sum did not, and
    /// was two thirds of the attention's time).
    fn softmax_rows(a: &mut [f32], n: usize, scale: f32) {
        for row in a.chunks_exact_mut(n) {
            let m = row_max(row);
            for v in row.iter_mut() {
                *v = act::exp((*v - m) * scale);
            }
            let k = 1.0 / row_sum(row);
            row.iter_mut().for_each(|v| *v *= k);
        }
    }
}

multiversion! {
    /// `dA ← scale·A⊙(dA − rowsum(A⊙dA))`, the softmax backward, in place in `da`.
    fn softmax_back(a: &[f32], da: &mut [f32], n: usize, scale: f32) {
        for (ar, dr) in a.chunks_exact(n).zip(da.chunks_exact_mut(n)) {
            let dot = row_dot(ar, dr);
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

    /// `A = softmax(scale·QᵀK + bias)` of one head into `a` (`[T, T]`); `keys` is the
    /// image's key mask (1 keep, 0 masked), if any.
    fn probs(&self, q: &[f32], k: &[f32], t: usize, a: &mut [f32], keys: Option<&[f32]>) {
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
        if let Some(m) = keys {
            // −10⁹ after scaling: −10⁹/scale before it.
            let off = -1e9 / self.scale;
            for row in a.chunks_exact_mut(t) {
                for (v, &keep) in row.iter_mut().zip(m) {
                    if keep == 0.0 {
                        *v += off;
                    }
                }
            }
        }
        softmax_rows(a, t, self.scale);
    }

    /// The forward on contiguous `x` (`[N, 3e, T]`) with an optional `[N, T]` key mask.
    fn forward(
        &self,
        x: &[f32],
        l: &Layout,
        mask: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, e, tl) = self.dims(l)?;
        let (h, d) = (self.heads, self.head_dim);
        let mut out = vec![0f32; n * e * tl];
        if tl > 0 && d > 0 {
            out.par_chunks_mut(d * tl).enumerate().for_each(|(i, o)| {
                let (ni, hi) = (i / h, i % h);
                let base = ni * 3 * e * tl;
                let at = |third: usize| &x[base + (third * e + hi * d) * tl..][..d * tl];
                let mut a = vec![0f32; tl * tl];
                let keys = mask.map(|m| &m[ni * tl..(ni + 1) * tl]);
                self.probs(at(0), at(1), tl, &mut a, keys);
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
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "lopper-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "attention input")?;
        self.forward(x, l, None)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(x, grad, None)?))
    }
}

impl AttentionOp {
    /// The gradient with respect to `x`, recomputing the probabilities (with the key mask).
    fn backward(
        &self,
        x: &Tensor,
        grad: &Tensor,
        mask: Option<&[f32]>,
    ) -> candle_core::Result<Tensor> {
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
                    let keys = mask.map(|m| &m[ni * tl..(ni + 1) * tl]);
                    self.probs(q, k, tl, &mut a, keys);
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
        tensor(dx, x.dims())
    }
}

/// [`AttentionOp`] with a key padding mask as the second operand (`[N, T]`, 1 keep, 0
/// masked); no gradient reaches the mask.
pub struct MaskedAttentionOp(pub AttentionOp);

impl CustomOp2 for MaskedAttentionOp {
    fn name(&self) -> &'static str {
        "lopper-attention-masked"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "attention input")?;
        let m = slice(ms, ml, "attention mask")?;
        let (n, _, t) = self.0.dims(l)?;
        if m.len() != n * t {
            candle_core::bail!(
                "attention mask of {} values for {n} sequences of {t} tokens",
                m.len()
            );
        }
        self.0.forward(x, l, Some(m))
    }

    fn bwd(
        &self,
        x: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let m = mask.flatten_all()?.to_vec1::<f32>()?;
        Ok((Some(self.0.backward(x, grad, Some(&m))?), None))
    }
}
