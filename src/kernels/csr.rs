//! CSR kernels: the row-wise SpMM and SpMV over [`CsrMatrix`], and [`SparseWeight`], a
//! CSR weight with the index data a kernel derives from it for one geometry.
//!
//! The SpMM is row-wise axpy: `out[r, :] += v · B[c, :]` over a row's non-zeros, with `B`
//! the column matrix `[K, P]`. Each update streams a contiguous length-`P` vector, which
//! vectorises, and the work is proportional to the non-zeros — what makes 90 % sparsity
//! ≈ 10× fewer multiply-adds. Rows are split across threads.

use crate::graph::csr::CsrMatrix;
use std::sync::{Arc, Mutex};

/// Data derived for one geometry: `(geometry key, data)`.
type Slot<T> = Mutex<Option<(Vec<usize>, Arc<T>)>>;

/// A CSR weight as the kernels hold it: the matrix, plus kernel-specific index data
/// derived from `col_idx` for one geometry (the direct conv's input offsets, the image
/// tiles' taps), computed on first use. Lives in an execution plan, never in the graph.
#[derive(Debug)]
pub struct SparseWeight {
    pub csr: CsrMatrix,
    /// The values carry the rows' scale (a batch norm folded at plan time).
    scaled: bool,
    derived: Slot<Vec<u32>>,
    taps: Slot<Option<super::sparse_images::Taps>>,
}

/// The value of `slot` for `key`, computed by `f` and kept when the key changes.
fn cached<T>(slot: &Slot<T>, key: &[usize], f: impl FnOnce() -> T) -> Arc<T> {
    let mut d = slot.lock().unwrap_or_else(|e| e.into_inner());
    match &*d {
        Some((k, v)) if k == key => v.clone(),
        _ => {
            let v = Arc::new(f());
            *d = Some((key.to_vec(), v.clone()));
            v
        }
    }
}

impl SparseWeight {
    pub fn new(csr: CsrMatrix) -> Self {
        SparseWeight {
            csr,
            scaled: false,
            derived: Mutex::new(None),
            taps: Mutex::new(None),
        }
    }

    /// Multiplies row `r`'s values by `scale[r]` (once): the kernels' epilogue then needs
    /// no scale, and the flattened-position tiles start their sums at the bias (one
    /// multiply-add less per output vector). The cached index data stays valid.
    pub fn fold_scale(&mut self, scale: &[f32]) {
        assert!(!self.scaled, "sparse weight: scale folded twice");
        self.csr.scale_rows(scale);
        self.scaled = true;
    }

    /// Whether [`SparseWeight::fold_scale`] was applied.
    pub fn scale_folded(&self) -> bool {
        self.scaled
    }

    /// The derived index data for geometry `key`, computed by `f` once and cached.
    pub fn derived(&self, key: &[usize], f: impl FnOnce() -> Vec<u32>) -> Arc<Vec<u32>> {
        cached(&self.derived, key, f)
    }

    /// The image tiles' taps for geometry `key` (`None` where they do not apply),
    /// computed by `f` once and cached: built and bound-checked once per plan, not per
    /// forward.
    pub(super) fn taps(
        &self,
        key: &[usize],
        f: impl FnOnce() -> Option<super::sparse_images::Taps>,
    ) -> Arc<Option<super::sparse_images::Taps>> {
        cached(&self.taps, key, f)
    }
}

/// The products the sparse kernels are built from.
pub trait CsrKernels {
    /// `out[r, :] = Σ_k A[r, k] · b[k, :]` for `b` row-major `[cols, n]`, `out` `[rows, n]`.
    fn spmm(&self, b: &[f32], n: usize, out: &mut [f32]);
    /// `y[b, r] = Σ_k A[r, k] · x[b, k]` for a batch of `m` row vectors.
    fn spmv_rows(&self, x: &[f32], m: usize, y: &mut [f32]);
}

impl CsrKernels for CsrMatrix {
    /// `out[r, :] = Σ_k A[r, k] · b[k, :]` for `b` row-major `[cols, n]`, `out` `[rows, n]`
    /// (overwritten). Parallel over rows when the work is large enough to pay for it.
    fn spmm(&self, b: &[f32], n: usize, out: &mut [f32]) {
        debug_assert_eq!(b.len(), self.cols * n);
        debug_assert_eq!(out.len(), self.rows * n);
        if n == 0 {
            return;
        }
        let row = |r: usize, o: &mut [f32]| {
            let (a, z) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
            spmm_row(&self.values[a..z], &self.col_idx[a..z], b, n, o);
        };
        if self.nnz() * n >= 1 << 16 {
            // Four rows per task.
            super::par::chunks_mut(&mut out[..self.rows * n], 4 * n, |t, o| {
                for (j, o) in o.chunks_mut(n).enumerate() {
                    row(4 * t + j, o);
                }
            });
        } else {
            for (r, o) in out.chunks_mut(n).enumerate().take(self.rows) {
                row(r, o);
            }
        }
    }

    /// `y[b, r] = Σ_k A[r, k] · x[b, k]` for a batch of `m` row vectors (linear layers at
    /// small batch: gathers from `x`, no transpose).
    fn spmv_rows(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let one = |xb: &[f32], yb: &mut [f32]| {
            for (r, yr) in yb.iter_mut().enumerate() {
                let mut acc = 0f32;
                for k in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                    acc += self.values[k] * xb[self.col_idx[k] as usize];
                }
                *yr = acc;
            }
        };
        if m == 1 && self.nnz() >= 1 << 15 {
            super::par::chunks_mut(&mut y[..self.rows], 64, |c, yc| {
                let r0 = c * 64;
                for (i, yr) in yc.iter_mut().enumerate() {
                    let r = r0 + i;
                    let mut acc = 0f32;
                    for k in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                        acc += self.values[k] * x[self.col_idx[k] as usize];
                    }
                    *yr = acc;
                }
            });
        } else {
            super::par::chunks_mut(&mut y[..m * self.rows], self.rows, |b, yb| {
                one(&x[b * self.cols..(b + 1) * self.cols], yb)
            });
        }
    }
}

/// One output row of the SpMM: `out = Σ v · b[c, :]` over the row's non-zeros, picking the
/// widest vector unit the CPU has at run time (the crate is built for baseline x86-64, so
/// the portable loop alone would be SSE2).
fn spmm_row(vals: &[f32], cols: &[u32], b: &[f32], n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected on this CPU.
            return unsafe { spmm_row_avx512(vals, cols, b, n, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected on this CPU.
            return unsafe { spmm_row_avx2(vals, cols, b, n, out) };
        }
    }
    spmm_row_generic::<false>(vals, cols, b, n, out)
}

/// `a + v·s`, as one fused instruction where the caller was compiled with FMA (a plain
/// `mul_add` without it would be a libm call).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(v: f32, s: f32, a: f32) -> f32 {
    if FMA {
        v.mul_add(s, a)
    } else {
        a + v * s
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn spmm_row_avx512(vals: &[f32], cols: &[u32], b: &[f32], n: usize, out: &mut [f32]) {
    spmm_row_generic::<true>(vals, cols, b, n, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn spmm_row_avx2(vals: &[f32], cols: &[u32], b: &[f32], n: usize, out: &mut [f32]) {
    spmm_row_generic::<true>(vals, cols, b, n, out)
}

/// Register-blocked: a 64-wide slice of the output row stays in registers while every
/// non-zero of the row adds its scaled input slice, so each non-zero costs loads of `b`
/// only, never a load and store of `out`.
#[inline(always)]
fn spmm_row_generic<const FMA: bool>(
    vals: &[f32],
    cols: &[u32],
    b: &[f32],
    n: usize,
    out: &mut [f32],
) {
    const W: usize = 64;
    const V: usize = 16;
    let mut j = 0;
    while j + W <= n {
        let mut acc = [0f32; W];
        for (&v, &c) in vals.iter().zip(cols) {
            let src: &[f32; W] = b[c as usize * n + j..][..W].try_into().unwrap();
            for t in 0..W {
                acc[t] = madd::<FMA>(v, src[t], acc[t]);
            }
        }
        out[j..j + W].copy_from_slice(&acc);
        j += W;
    }
    while j + V <= n {
        let mut acc = [0f32; V];
        for (&v, &c) in vals.iter().zip(cols) {
            let src: &[f32; V] = b[c as usize * n + j..][..V].try_into().unwrap();
            for t in 0..V {
                acc[t] = madd::<FMA>(v, src[t], acc[t]);
            }
        }
        out[j..j + V].copy_from_slice(&acc);
        j += V;
    }
    for (t, o) in out.iter_mut().enumerate().skip(j) {
        let mut acc = 0f32;
        for (&v, &c) in vals.iter().zip(cols) {
            acc = madd::<FMA>(v, b[c as usize * n + t], acc);
        }
        *o = acc;
    }
}
