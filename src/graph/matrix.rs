//! The weight-matrix view of a graph: every layer whose op has a `weight` matrix
//! ([`OpSpec::weight_matrix`](super::OpSpec::weight_matrix): conv and linear, the stem and
//! classifier included), as sparsity masks, CSR storage and row-wise criteria see it.

use super::ops::param::WEIGHT;
use super::{param_key, Graph, NodeId};
use anyhow::Result;

/// One layer's weight as a `rows × row_len` matrix.
#[derive(Clone, Debug)]
pub struct WeightMatrix {
    pub node: NodeId,
    pub name: String,
    /// Parameter key (`"{node}.weight"`).
    pub key: String,
    /// The weight tensor's own shape.
    pub shape: Vec<usize>,
    /// Output channels (rows of the weight matrix).
    pub rows: usize,
    /// Elements per row (`in/groups · kh · kw` or `in`).
    pub row_len: usize,
}

impl WeightMatrix {
    pub fn numel(&self) -> usize {
        self.rows * self.row_len
    }
}

/// Every layer with a weight matrix, in topological order; a weight several nodes share
/// is listed once, at its owner.
pub fn weight_matrices(g: &Graph) -> Vec<WeightMatrix> {
    g.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.shares.is_none())
        .filter_map(|(i, n)| {
            let spec = n.op.spec();
            let (rows, row_len) = spec.weight_matrix()?;
            let shape = spec.params().into_iter().find(|p| p.name == WEIGHT)?.shape;
            Some(WeightMatrix {
                node: i,
                name: n.name.clone(),
                key: param_key(&n.name, WEIGHT),
                shape,
                rows,
                row_len,
            })
        })
        .collect()
}

/// Host copy of a layer's weight, flattened row-major.
pub fn weight_host(g: &Graph, l: &WeightMatrix) -> Result<Vec<f32>> {
    Ok(g.param(l.node, WEIGHT)?
        .as_tensor()
        .flatten_all()?
        .to_vec1()?)
}
