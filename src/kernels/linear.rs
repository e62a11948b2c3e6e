//! Fully connected layer `y = x·Wᵀ + b` as one custom op over `(x, W, b)`: the GEMMs read
//! the PyTorch `[out, in]` weight layout directly, so neither direction materialises a
//! transposed copy, and the bias is fused into the output pass (forward) and a column
//! sum (backward).

use super::act;
use super::cpu::{ce, slice, tensor, with_f32};
use super::gemm::{sgemm, Mat};
use super::simd::multiversion;
use crate::graph::ops::ActivationKind;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// `y = f(x·Wᵀ + b)`; `act` (inference only: no gradient through it) is applied to each
/// output row in the same pass.
/// `yt[r, j] = W[r, :] · x[j, :]` for a few inputs `x: [n, i]` (n ≤ 4): the weight is
/// streamed once, its rows split across threads (memory-bound; a GEMM would pack it).
fn gemv_rows(w: &[f32], i: usize, x: &[f32], n: usize, yt: &mut [f32]) {
    // Rows per task: at least 32 K weights each, so that a squeeze-excitation layer's
    // few-microsecond product is not split across threads.
    let per = 64.max((1 << 15) / i.max(1)).next_multiple_of(4);
    // Weights past L1 size are streamed with prefetches `dist` floats ahead: at batch 1
    // every layer's weight has left L2 by the time the next forward pass comes back to
    // it. 16 KB ahead (squeeze-excitation 240→960 on an AMD EPYC, one thread: 0.039 →
    // 0.023 ms per layer; 8 KB 0.025, 32 KB 0.031), or the next quad's rows if longer
    // (a classifier's: two quads ahead were slower).
    let far = std::mem::size_of_val(w) > 1 << 15;
    let dist = (4 * i).max(4096);
    super::par::chunks_mut(&mut yt[..], n * per, |blk, out| {
        let r0 = blk * per;
        let rows = out.len() / n;
        let quads = rows / 4;
        for q in 0..quads {
            let r = r0 + 4 * q;
            // The weight is read as one stream (a quad's rows are contiguous): the
            // stream `dist` floats ahead is asked for as this quad runs, so that the
            // lines arrive from L3 or memory in time (one quad ahead was too short a
            // lead for the short rows of squeeze-excitation layers).
            let ahead = if far {
                let a0 = (r * i + dist).min(w.len());
                &w[a0..(a0 + 4 * i).min(w.len())]
            } else {
                &[]
            };
            dots4(
                &w[r * i..(r + 4) * i],
                ahead,
                x,
                i,
                &mut out[4 * q * n..4 * (q + 1) * n],
            );
        }
        for rr in 4 * quads..rows {
            let r = r0 + rr;
            dots(&w[r * i..(r + 1) * i], x, i, &mut out[rr * n..(rr + 1) * n]);
        }
    });
}

multiversion! {
    /// `out[j] = row · x[j]` for each of the `out.len()` inputs of length `i`.
    fn dots(row: &[f32], x: &[f32], i: usize, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = super::reduce::row_dot(row, &x[j * i..(j + 1) * i]);
        }
    }
}

multiversion! {
    /// [`dots`] for four consecutive weight rows (`rows`: `4 × i`) at once: `out[r·n + j]
    /// = rows[r] · x[j]`. One dot product is a single chain of dependent vector FMAs
    /// (four cycles each), so a lone row ran at a quarter of the load rate; four rows
    /// give four independent chains and read each input vector once for all four (the
    /// MLP's batch-1 inference).
    fn dots4(rows: &[f32], ahead: &[f32], x: &[f32], i: usize, out: &mut [f32]) {
        const L: usize = 16;
        let n = out.len() / 4;
        let (r0, r1, r2, r3) = (&rows[..i], &rows[i..2 * i], &rows[2 * i..3 * i], &rows[3 * i..4 * i]);
        for j in 0..n {
            let xj = &x[j * i..(j + 1) * i];
            let mut acc = [[0f32; L]; 4];
            let full = i / L * L;
            let quads = r0[..full]
                .chunks_exact(L)
                .zip(r1[..full].chunks_exact(L))
                .zip(r2[..full].chunks_exact(L).zip(r3[..full].chunks_exact(L)));
            for (c0, (xv, ((a, b), (c, d)))) in xj[..full].chunks_exact(L).zip(quads).enumerate() {
                // One line of each of the next four rows per step (first input only): a
                // classifier's weight comes from memory at batch 1, and the four
                // streams alone left it at 60 % of onnxruntime's rate.
                if j == 0 {
                    prefetch_lines(ahead, c0 * 4 * L);
                }
                for l in 0..L {
                    acc[0][l] += a[l] * xv[l];
                    acc[1][l] += b[l] * xv[l];
                    acc[2][l] += c[l] * xv[l];
                    acc[3][l] += d[l] * xv[l];
                }
            }
            for (k, row) in [r0, r1, r2, r3].into_iter().enumerate() {
                let tail: f32 = row[full..].iter().zip(&xj[full..]).map(|(a, b)| a * b).sum();
                out[k * n + j] = tail + acc[k].iter().sum::<f32>();
            }
        }
    }
}

/// Prefetches the four lines of `ahead` from float `at` on (those past its end not).
#[inline(always)]
fn prefetch_lines(ahead: &[f32], at: usize) {
    for k in 0..4 {
        super::simd::prefetch(ahead, at + 16 * k);
    }
}

/// `y[r, c] = yt[c, r] + b[c]` for `yt: [o, n]`, in tiles that stay in cache.
fn transpose_bias(yt: &[f32], o: usize, n: usize, b: &[f32], y: &mut [f32]) {
    const T: usize = 32;
    let block = |(rb, ys): (usize, &mut [f32])| {
        let r0 = rb * T;
        let rows = ys.len() / o.max(1);
        for c0 in (0..o).step_by(T) {
            for r in 0..rows {
                let yr = &mut ys[r * o..(r + 1) * o];
                for c in c0..(c0 + T).min(o) {
                    yr[c] = yt[c * n + r0 + r] + b[c];
                }
            }
        }
    };
    let chunks = y.chunks_mut((T * o).max(1)).enumerate();
    if n * o <= SMALL {
        chunks.for_each(block);
    } else {
        super::par::chunks_mut(y, (T * o).max(1), |i, c| block((i, c)));
    }
}

/// `y = act(x·Wᵀ + b)` with the output features split into one block of `rows` per
/// thread: each block is a single-threaded GEMM `yᵀ[rows, n] = W[rows, i]·xᵀ`, transposed
/// into its columns of `y` with the bias and activation while in cache. The GEMM's own
/// threading synchronises inside the product, and the transpose and activation after it
/// ran on one thread (the MLP's 1024→1024 layer at batch 64 ran at ~190 GFLOP/s against
/// onnxruntime's ~300; the conv GEMM path splits its rows the same way).
fn split_rows(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (n, i, o): (usize, usize, usize),
    rows: usize,
    act: Option<ActivationKind>,
    y: &mut [f32],
) {
    assert!(y.len() >= n * o);
    let mut yt = vec![0f32; o * n];
    let yp = super::conv_tiles::OutPtr(y.as_mut_ptr());
    super::par::chunks_mut(&mut yt[..], rows * n, |bi, ytb| {
        let (o0, ob) = (bi * rows, ytb.len() / n);
        sgemm(
            ob,
            n,
            i,
            ytb,
            Mat::rm(&w[o0 * i..(o0 + ob) * i], i),
            Mat::rm_t(x, i),
            false,
            false,
        );
        // SAFETY: columns o0..o0 + ob of every row of y: this block's alone.
        let dst = unsafe { std::slice::from_raw_parts_mut(yp.get().add(o0), (n - 1) * o + ob) };
        super::cpu::transpose(ytb, n, ob, n, dst, o);
        for r in 0..n {
            let row = &mut dst[r * o..r * o + ob];
            for (v, &bv) in row.iter_mut().zip(&b[o0..o0 + ob]) {
                *v += bv;
            }
            if let Some(k) = act {
                act::apply(k, row);
            }
        }
    });
}

/// Outputs up to this many floats are finished on the calling thread: handing a few
/// microseconds of work to the other thread costs more than it saves (batch 1).
const SMALL: usize = 1 << 14;

/// `y[n × o] = act(x[n × i]·Wᵀ + b)` for a row-major `x` and the PyTorch `[o, i]` weight.
/// Also a 1×1 conv over 1×1 maps (squeeze-excitation's two layers: `[N, C, 1, 1]` is
/// `[N, C]`), which the conv's position tiles would run one lane in sixteen. Every
/// element of `y[..n·o]` is written.
pub fn forward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (n, i, o): (usize, usize, usize),
    act: Option<ActivationKind>,
    y: &mut [f32],
) {
    let y = &mut y[..n * o];
    // yᵀ = W·xᵀ: the weight is the GEMM's left operand in its stored layout; as the
    // right operand `Wᵀ` it is repacked on every call (measured: the MLP's b64
    // inference spent a third of its time there).
    if let Some(rows) = super::gemm::row_blocks(o).filter(|_| n > 4) {
        return split_rows(x, w, b, (n, i, o), rows, act, y);
    }
    let mut yt = vec![0f32; o * n];
    if n <= 4 {
        gemv_rows(w, i, x, n, &mut yt);
    } else {
        sgemm(
            o,
            n,
            i,
            &mut yt,
            Mat::rm(w, i),
            Mat::rm_t(x, i),
            false,
            true,
        );
    }
    transpose_bias(&yt, o, n, b, y);
    if let Some(k) = act {
        if n * o <= SMALL {
            y.chunks_mut(o.max(1)).for_each(|r| act::apply(k, r));
        } else {
            super::par::chunks_mut(y, o.max(1), |_, r| act::apply(k, r));
        }
    }
}

pub struct LinearOp {
    pub act: Option<ActivationKind>,
    /// The weight as [`super::panel::pack_cols`] made it, kept by an eval plan: more than
    /// a few rows run on the register-tile panels without packing the weight per call.
    pub packed: Option<std::sync::Arc<Vec<f32>>>,
}

fn dims(x: &[usize], w: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    if x.len() != 2 || w.len() != 2 || x[1] != w[1] {
        candle_core::bail!("linear: input {x:?} does not match weight {w:?}");
    }
    Ok((x[0], w[1], w[0]))
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "lopper-linear"
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
        let x = slice(s1, l1, "linear input")?;
        let w = slice(s2, l2, "linear weight")?;
        let b = slice(s3, l3, "linear bias")?;
        let (n, i, o) = dims(l1.dims(), l2.dims())?;
        if b.len() != o {
            candle_core::bail!("linear: bias has {} values for {o} outputs", b.len());
        }
        // SAFETY: `forward` and `panel::linear` write every element.
        let mut y = unsafe { super::cpu::unfilled(n * o) };
        match &self.packed {
            Some(p)
                if n > 4 && p.len() == super::panel::cols_len(o, i) && super::panel::enabled() =>
            {
                super::panel::linear(p, (n, i, o), x, Some(b), self.act, &mut y)
            }
            _ => forward(x, w, b, (n, i, o), self.act, &mut y),
        }
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.act.is_some() {
            candle_core::bail!("linear with a fused activation is inference-only");
        }
        let (n, i, o) = dims(x.dims(), w.dims())?;
        let r = with_f32(grad, |dy| {
            with_f32(w, |wv| {
                with_f32(x, |xv| {
                    let dx = x.track_op().then(|| {
                        let mut dx = vec![0f32; n * i];
                        sgemm(
                            n,
                            i,
                            o,
                            &mut dx,
                            Mat::rm(dy, o),
                            Mat::rm(wv, i),
                            false,
                            true,
                        );
                        dx
                    });
                    let mut dw = vec![0f32; o * i];
                    sgemm(
                        o,
                        i,
                        n,
                        &mut dw,
                        Mat::rm_t(dy, o),
                        Mat::rm(xv, i),
                        false,
                        true,
                    );
                    let mut db = vec![0f32; o];
                    for row in dy.chunks(o.max(1)) {
                        db.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                    }
                    (dx, dw, db)
                })
            })
        })
        .and_then(|r| r)
        .and_then(|r| r)
        .map_err(ce)?;
        let (dx, dw, db) = r;
        Ok((
            dx.map(|v| tensor(v, &[n, i])).transpose()?,
            Some(tensor(dw, &[o, i])?),
            Some(tensor(db, &[o])?),
        ))
    }
}
