//! Compressed sparse rows: the stored form of sparse weights and the operand of the sparse
//! inference kernels.
//!
//! A conv weight `[O, I/g, kh, kw]` is an `O × (I/g·kh·kw)` matrix in the GEMM's reduction
//! order, so one format serves conv (against im2col columns) and linear layers. The kernel
//! is row-wise axpy: `out[r, :] += v · B[c, :]` over a row's non-zeros, with `B` the column
//! matrix `[K, P]`. Each update streams a contiguous length-`P` vector, which vectorises,
//! and the work is proportional to the non-zeros — what makes 90 % sparsity ≈ 10× fewer
//! multiply-adds. Rows are split across threads.

use anyhow::{bail, Result};
use rayon::prelude::*;
use std::collections::HashMap;

use super::layers::{prunable_layers, weight_host};
use crate::graph::ops::Op;
use crate::graph::{Graph, NodeId};

/// Index data derived for one geometry: `(geometry key, data)`.
pub type Derived = (Vec<usize>, std::sync::Arc<Vec<u32>>);

#[derive(Debug)]
pub struct CsrMatrix {
    pub rows: usize,
    pub cols: usize,
    pub row_ptr: Vec<u32>,
    pub col_idx: Vec<u32>,
    pub values: Vec<f32>,
    /// Kernel-specific index data derived from `col_idx` for one geometry (the direct
    /// conv's input offsets), computed on first use: `(geometry key, data)`.
    pub derived: std::sync::Mutex<Option<Derived>>,
}

impl Clone for CsrMatrix {
    fn clone(&self) -> Self {
        CsrMatrix {
            rows: self.rows,
            cols: self.cols,
            row_ptr: self.row_ptr.clone(),
            col_idx: self.col_idx.clone(),
            values: self.values.clone(),
            derived: Default::default(),
        }
    }
}

impl CsrMatrix {
    /// Compresses a row-major dense matrix (exact zeros are dropped).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<CsrMatrix> {
        if w.len() != rows * cols {
            bail!(
                "dense matrix has {} entries, expected {rows}×{cols}",
                w.len()
            );
        }
        let mut row_ptr = Vec::with_capacity(rows + 1);
        let (mut col_idx, mut values) = (Vec::new(), Vec::new());
        row_ptr.push(0u32);
        for r in 0..rows {
            for (c, &v) in w[r * cols..(r + 1) * cols].iter().enumerate() {
                if v != 0.0 {
                    col_idx.push(c as u32);
                    values.push(v);
                }
            }
            row_ptr.push(values.len() as u32);
        }
        CsrMatrix::from_parts(rows, cols, row_ptr, col_idx, values)
    }

    /// Assembles a matrix from its arrays (e.g. read from a file), checking every invariant.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        row_ptr: Vec<u32>,
        col_idx: Vec<u32>,
        values: Vec<f32>,
    ) -> Result<CsrMatrix> {
        let m = CsrMatrix {
            rows,
            cols,
            row_ptr,
            col_idx,
            values,
            derived: Default::default(),
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks the invariants (after reading from a file).
    pub fn validate(&self) -> Result<()> {
        let nnz = self.values.len();
        if self.row_ptr.len() != self.rows + 1
            || self.col_idx.len() != nnz
            || self.row_ptr[0] != 0
            || self.row_ptr[self.rows] as usize != nnz
            || self.row_ptr.windows(2).any(|w| w[0] > w[1])
            || self.col_idx.iter().any(|&c| c as usize >= self.cols)
        {
            bail!(
                "inconsistent CSR matrix ({}×{}, {} non-zeros)",
                self.rows,
                self.cols,
                nnz
            );
        }
        Ok(())
    }

    /// The derived index data for geometry `key`, computed by `f` once and cached.
    pub fn derived(&self, key: &[usize], f: impl FnOnce() -> Vec<u32>) -> std::sync::Arc<Vec<u32>> {
        let mut d = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        match &*d {
            Some((k, v)) if k == key => v.clone(),
            _ => {
                let v = std::sync::Arc::new(f());
                *d = Some((key.to_vec(), v.clone()));
                v
            }
        }
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    pub fn density(&self) -> f64 {
        self.nnz() as f64 / (self.rows * self.cols).max(1) as f64
    }

    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for k in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                w[r * self.cols + self.col_idx[k] as usize] = self.values[k];
            }
        }
        w
    }

    /// `out[r, :] = Σ_k A[r, k] · b[k, :]` for `b` row-major `[cols, n]`, `out` `[rows, n]`
    /// (overwritten). Parallel over rows when the work is large enough to pay for it.
    pub fn spmm(&self, b: &[f32], n: usize, out: &mut [f32]) {
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
            out.par_chunks_mut(n)
                .enumerate()
                .with_min_len(4)
                .for_each(|(r, o)| row(r, o));
        } else {
            for (r, o) in out.chunks_mut(n).enumerate().take(self.rows) {
                row(r, o);
            }
        }
    }

    /// `y[b, r] = Σ_k A[r, k] · x[b, k]` for a batch of `m` row vectors (linear layers at
    /// small batch: gathers from `x`, no transpose).
    pub fn spmv_rows(&self, x: &[f32], m: usize, y: &mut [f32]) {
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
            y.par_chunks_mut(64).enumerate().for_each(|(c, yc)| {
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
            x.par_chunks(self.cols)
                .zip(y.par_chunks_mut(self.rows))
                .take(m)
                .for_each(|(xb, yb)| one(xb, yb));
        }
    }
}

/// A layer runs on the sparse kernel when at most this fraction of its weights is non-zero:
/// the measured crossovers on the benchmark machine (BENCHMARKS.md §8). Convolutions: the
/// direct sparse conv at density 0.3 is as fast as the dense GEMM path on ResNet-20, so
/// 0.25; linear layers: the SpMM still wins at 0.3 on the MLP, not at 0.5, so 0.4.
pub const MAX_CONV_DENSITY: f64 = 0.25;
pub const MAX_LINEAR_DENSITY: f64 = 0.4;

/// CSR weights of the layers that run sparse at inference, keyed by node.
#[derive(Clone, Debug, Default)]
pub struct SparsePack {
    pub layers: HashMap<NodeId, CsrMatrix>,
}

impl SparsePack {
    /// Compresses every ungrouped conv with density at most `max_conv` and every linear
    /// layer with density at most `max_linear`.
    pub fn build(g: &Graph, max_conv: f64, max_linear: f64) -> Result<SparsePack> {
        let mut layers = HashMap::new();
        for l in prunable_layers(g) {
            let max_density = match &g.nodes[l.node].op {
                Op::Conv2d(c) if c.groups != 1 => continue,
                Op::Conv2d(_) => max_conv,
                _ => max_linear,
            };
            let w = weight_host(g, &l)?;
            let nnz = w.iter().filter(|v| **v != 0.0).count();
            if nnz as f64 <= max_density * w.len() as f64 {
                layers.insert(l.node, CsrMatrix::from_dense(&w, l.rows, l.row_len)?);
            }
        }
        Ok(SparsePack { layers })
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
