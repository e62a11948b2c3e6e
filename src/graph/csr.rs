//! Compressed sparse rows: the stored form of sparse weights (plain data, checked on
//! construction). The inference kernels over it live in `kernels::csr`.
//!
//! A conv weight `[O, I/g, kh, kw]` is an `O × (I/g·kh·kw)` matrix in the GEMM's reduction
//! order (its [`super::matrix`] view), so one format serves conv and linear layers.

use anyhow::{bail, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct CsrMatrix {
    pub rows: usize,
    pub cols: usize,
    pub row_ptr: Vec<u32>,
    pub col_idx: Vec<u32>,
    pub values: Vec<f32>,
}

impl CsrMatrix {
    /// Multiplies row `r`'s values by `scale[r]` (a per-output-channel scale folded in).
    pub fn scale_rows(&mut self, scale: &[f32]) {
        assert_eq!(scale.len(), self.rows, "csr: one scale per row");
        for (r, s) in scale.iter().enumerate() {
            let (a, z) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
            self.values[a..z].iter_mut().for_each(|v| *v *= s);
        }
    }

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
}
