//! The compressed weights an eval-mode plan runs on the sparse (CSR) kernels: built once
//! per plan from the graph's current weights, never stored in the graph.

use crate::graph::csr::CsrMatrix;
use crate::graph::matrix::{weight_host, weight_matrices};
use crate::graph::ops::Op;
use crate::graph::{Graph, NodeId};
use crate::kernels::csr::SparseWeight;
use anyhow::Result;
use std::collections::HashMap;

/// A layer runs on the sparse kernel when at most this fraction of its weights is non-zero:
/// the measured crossovers on the benchmark machine (BENCHMARKS.md §8). Convolutions: the
/// direct sparse conv at density 0.3 is as fast as the dense GEMM path on ResNet-20, so
/// 0.25; linear layers: the SpMM still wins at 0.3 on the MLP against the GEMM crate, not
/// at 0.5, so 0.4 ([`max_linear_density`]: lower where the dense layer runs on the
/// register-tile panels).
pub const MAX_CONV_DENSITY: f64 = 0.25;
pub const MAX_LINEAR_DENSITY: f64 = 0.4;

/// The linear layers' limit on this machine: with the dense layer on the register-tile
/// panels (AVX-512, its weight packed per plan), the MLP at batch 64 ran dense in 0.49
/// ms, sparse in 0.70 at density 0.3 and 0.33 at 0.1 (crossover near 0.19), so 0.15;
/// elsewhere [`MAX_LINEAR_DENSITY`].
pub fn max_linear_density() -> f64 {
    if crate::kernels::panel::enabled() {
        0.15
    } else {
        MAX_LINEAR_DENSITY
    }
}

/// CSR weights of the layers that run sparse at inference, keyed by node.
#[derive(Debug, Default)]
pub struct SparsePack {
    pub layers: HashMap<NodeId, SparseWeight>,
}

impl SparsePack {
    /// Compresses every ungrouped conv with density at most [`MAX_CONV_DENSITY`] and every
    /// linear layer with density at most [`max_linear_density`].
    pub fn build(g: &Graph) -> Result<SparsePack> {
        SparsePack::build_with(g, MAX_CONV_DENSITY, max_linear_density())
    }

    /// [`SparsePack::build`] with explicit density limits.
    pub fn build_with(g: &Graph, max_conv: f64, max_linear: f64) -> Result<SparsePack> {
        let mut layers = HashMap::new();
        for l in weight_matrices(g) {
            let max_density = match &g.nodes[l.node].op {
                Op::Conv2d(c) if c.groups != 1 => continue,
                Op::Conv2d(_) => max_conv,
                _ => max_linear,
            };
            let w = weight_host(g, &l)?;
            let nnz = w.iter().filter(|v| **v != 0.0).count();
            if nnz as f64 <= max_density * w.len() as f64 {
                let csr = CsrMatrix::from_dense(&w, l.rows, l.row_len)?;
                layers.insert(l.node, SparseWeight::new(csr));
            }
        }
        Ok(SparsePack { layers })
    }

    pub fn get(&self, node: NodeId) -> Option<&SparseWeight> {
        self.layers.get(&node)
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}
