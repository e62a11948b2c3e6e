//! Multi-head self-attention over channels-first tokens, forward and backward, as one
//! candle custom op on the stacked projections `x = [N, (H + 2G)·d, T]` → `[N, H·d, T]`
//! (`G` key/value heads: `G = H` for multi-head attention, fewer for grouped-query
//! attention, query head `h` reading key/value head `h / (H/G)`).
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
    /// Key/value heads (grouped-query attention; `heads` for plain multi-head).
    pub kv_heads: usize,
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
    /// `(N, input channels, T)`, checked against the head counts.
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let d = l.dims();
        let (n, c, t) = (d[0], d[1], d.iter().skip(2).product::<usize>());
        let (h, g) = (self.heads, self.kv_heads);
        if g == 0 || h % g != 0 || c != (h + 2 * g) * self.head_dim {
            candle_core::bail!(
                "attention: {c} input channels for {h} query and {g} key/value heads of {}",
                self.head_dim
            );
        }
        Ok((n, c, t))
    }

    /// Channel offsets of query head `hi`'s key and value heads within one image.
    fn kv_rows(&self, hi: usize) -> (usize, usize) {
        let (h, g, d) = (self.heads, self.kv_heads, self.head_dim);
        let kv = hi / (h / g);
        ((h + kv) * d, (h + g + kv) * d)
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

    /// The forward on contiguous `x` (`[N, (H + 2G)·d, T]`) with an optional `[N, T]` key
    /// mask.
    fn forward(
        &self,
        x: &[f32],
        l: &Layout,
        mask: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, tl) = self.dims(l)?;
        let (h, d) = (self.heads, self.head_dim);
        let e = h * d;
        let mut out = vec![0f32; n * e * tl];
        if tl > 0 && d > 0 {
            super::par::chunks_mut(&mut out, d * tl, |i, o| {
                let (ni, hi) = (i / h, i % h);
                let img = &x[ni * c * tl..(ni + 1) * c * tl];
                let rows = |r: usize| &img[r * tl..(r + d) * tl];
                let (kr, vr) = self.kv_rows(hi);
                let mut a = vec![0f32; tl * tl];
                let keys = mask.map(|m| &m[ni * tl..(ni + 1) * tl]);
                self.probs(rows(hi * d), rows(kr), tl, &mut a, keys);
                // O[j, t] = Σ_s V[j, s]·A[t, s].
                sgemm(
                    d,
                    tl,
                    tl,
                    o,
                    Mat::rm(rows(vr), tl),
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
    /// Parallel over (image, kv group): the group's query heads run in turn, adding into
    /// the shared key and value gradients.
    fn backward(
        &self,
        x: &Tensor,
        grad: &Tensor,
        mask: Option<&[f32]>,
    ) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let grad = grad.contiguous()?;
        let (n, c, tl) = self.dims(x.layout())?;
        let (h, g, d) = (self.heads, self.kv_heads, self.head_dim);
        let (e, r) = (h * d, h / g);
        let run = |xv: &[f32], dy: &[f32]| {
            // Per (image, kv group): [dQ of its r heads | dK | dV], each head [d, T].
            let parts: Vec<Vec<f32>> = (0..n * g)
                .into_par_iter()
                .map(|i| {
                    let (ni, gi) = (i / g, i % g);
                    let img = &xv[ni * c * tl..(ni + 1) * c * tl];
                    let rows = |row: usize| &img[row * tl..(row + d) * tl];
                    let keys = mask.map(|m| &m[ni * tl..(ni + 1) * tl]);
                    let mut out = vec![0f32; (r + 2) * d * tl];
                    let (dqs, rest) = out.split_at_mut(r * d * tl);
                    let (dk, dv) = rest.split_at_mut(d * tl);
                    let mut a = vec![0f32; tl * tl];
                    let mut da = vec![0f32; tl * tl];
                    for (j, dq) in dqs.chunks_exact_mut(d * tl).enumerate() {
                        let hi = gi * r + j;
                        let (kr, vr) = self.kv_rows(hi);
                        let (q, k, v) = (rows(hi * d), rows(kr), rows(vr));
                        let dout = &dy[(ni * e + hi * d) * tl..][..d * tl];
                        self.probs(q, k, tl, &mut a, keys);
                        let acc = j > 0;
                        // dV[j, s] += Σ_t dO[j, t]·A[t, s].
                        sgemm(
                            d,
                            tl,
                            tl,
                            dv,
                            Mat::rm(dout, tl),
                            Mat::rm(&a, tl),
                            acc,
                            false,
                        );
                        // dA[t, s] = Σ_j dO[j, t]·V[j, s], then the softmax backward.
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
                        // dQ[j, t] = Σ_s K[j, s]·dL[t, s]; dK[j, s] += Σ_t Q[j, t]·dL[t, s].
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
                        sgemm(d, tl, tl, dk, Mat::rm(q, tl), Mat::rm(&da, tl), acc, false);
                    }
                    out
                })
                .collect();
            let mut dx = vec![0f32; xv.len()];
            for (i, part) in parts.iter().enumerate() {
                let (ni, gi) = (i / g, i % g);
                let img = &mut dx[ni * c * tl..(ni + 1) * c * tl];
                let (q0, (kr, vr)) = (gi * r * d * tl, self.kv_rows(gi * r));
                let (dqs, rest) = part.split_at(r * d * tl);
                img[q0..q0 + r * d * tl].copy_from_slice(dqs);
                img[kr * tl..(kr + d) * tl].copy_from_slice(&rest[..d * tl]);
                img[vr * tl..(vr + d) * tl].copy_from_slice(&rest[d * tl..]);
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
