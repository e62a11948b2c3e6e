//! The cost model: per-node output shape, parameter count and MACs, with totals.
//! MACs count convolutions and linear layers only (the convention of published figures).

use super::shape::fmt_shape;
use super::{infer_shapes, Graph, Node, ParamKind};
use anyhow::Result;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct NodeCost {
    pub name: String,
    pub kind: String,
    pub shape: Vec<usize>,
    pub params: u64,
    pub macs: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CostReport {
    pub nodes: Vec<NodeCost>,
    pub total_params: u64,
    pub total_macs: u64,
}

/// Computes the cost of every node at the graph's own input shape.
pub fn cost(g: &Graph) -> Result<CostReport> {
    cost_of_nodes(&g.nodes)
}

/// The cost of a graph structure (no weights needed): used to predict the cost of a
/// pruning plan before any surgery.
pub fn cost_of_nodes(graph_nodes: &[Node]) -> Result<CostReport> {
    let shapes = infer_shapes(graph_nodes)?;
    let mut nodes = Vec::with_capacity(graph_nodes.len());
    for (i, n) in graph_nodes.iter().enumerate() {
        let spec = n.op.spec();
        let ins: Vec<&Vec<usize>> = n.inputs.iter().map(|&j| &shapes[j]).collect();
        // A shared weight counts once, at its owner.
        let params: u64 = spec
            .params()
            .iter()
            .filter(|p| p.kind == ParamKind::Trainable && n.shares.is_none())
            .map(|p| p.shape.iter().product::<usize>() as u64)
            .sum();
        nodes.push(NodeCost {
            name: n.name.clone(),
            kind: n.op.kind().to_string(),
            shape: shapes[i].clone(),
            params,
            macs: spec.macs(&ins, &shapes[i]),
        });
    }
    Ok(CostReport {
        total_params: nodes.iter().map(|n| n.params).sum(),
        total_macs: nodes.iter().map(|n| n.macs).sum(),
        nodes,
    })
}

/// Human-readable count: 125.49M, 0.85M, 9.9K.
pub fn human(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2}G", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}K", f / 1e3)
    } else {
        n.to_string()
    }
}

impl CostReport {
    /// Fixed-width per-node table with totals.
    pub fn table(&self) -> String {
        let w = self
            .nodes
            .iter()
            .map(|n| n.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let mut s = format!(
            "{:<w$}  {:<14} {:>14} {:>12} {:>14}\n",
            "node", "op", "shape", "params", "MACs"
        );
        for n in &self.nodes {
            s += &format!(
                "{:<w$}  {:<14} {:>14} {:>12} {:>14}\n",
                n.name,
                n.kind,
                fmt_shape(&n.shape),
                n.params,
                n.macs
            );
        }
        s += &format!(
            "total: {} params ({}), {} MACs ({})\n",
            self.total_params,
            human(self.total_params),
            self.total_macs,
            human(self.total_macs)
        );
        s
    }
}
