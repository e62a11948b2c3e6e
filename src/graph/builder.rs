//! Incremental graph construction with shape checks at every step, used by the model zoo
//! and importers. Errors surface at the node that is wrong, not at the end.

use super::init::Init;
use super::ops::*;
use super::{param_key, Graph, Node, NodeId, Shape};
use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

pub struct GraphBuilder {
    nodes: Vec<Node>,
    shapes: Vec<Shape>,
    params: BTreeMap<String, Var>,
    init: Init,
    counter: usize,
    /// Parameter scalars allocated so far (for the memory check).
    elems: usize,
}

impl GraphBuilder {
    /// A builder whose parameters are initialised from `seed`.
    pub fn new(seed: u64) -> Self {
        GraphBuilder {
            nodes: Vec::new(),
            shapes: Vec::new(),
            params: BTreeMap::new(),
            init: Init::new(seed),
            counter: 0,
            elems: 0,
        }
    }

    /// Adds a node with freshly initialised parameters; returns its id.
    pub fn add(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let ins: Vec<&Shape> = inputs.iter().map(|&i| &self.shapes[i]).collect();
        let shape = op
            .spec()
            .infer_shape(&ins)
            .with_context(|| format!("building node '{name}'"))?;
        // Refuse before allocating: `mlp:784-99999999-10` would otherwise abort the process
        // on a 313 GB allocation.
        let need: usize = op
            .spec()
            .params()
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .fold(0usize, |a, b| a.saturating_add(b));
        let total = self.elems.saturating_add(need);
        crate::util::check_allocation(
            total.saturating_mul(4),
            &format!("the parameters up to node '{name}'"),
        )?;
        self.elems = total;
        for (p, t) in self.init.op_params(&op)? {
            self.params
                .insert(param_key(name, p), super::owned_var(&t)?);
        }
        self.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs: inputs.to_vec(),
            shares: None,
        });
        self.shapes.push(shape);
        Ok(self.nodes.len() - 1)
    }

    /// Adds a node with an automatic name `{kind}{n}` (for parameter-free ops).
    pub fn auto(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        self.counter += 1;
        let name = format!("{}_{}", op.kind().to_lowercase(), self.counter);
        self.add(&name, op, inputs)
    }

    pub fn shape(&self, id: NodeId) -> &Shape {
        &self.shapes[id]
    }

    pub fn input(&mut self, shape: &[usize]) -> Result<NodeId> {
        self.add(
            "input",
            Op::Input(Input {
                shape: shape.to_vec(),
            }),
            &[],
        )
    }

    pub fn conv(&mut self, name: &str, x: NodeId, conv: Conv2d) -> Result<NodeId> {
        self.add(name, Op::Conv2d(conv), &[x])
    }

    pub fn linear(&mut self, name: &str, x: NodeId, i: usize, o: usize) -> Result<NodeId> {
        self.add(name, Op::Linear(Linear::new(i, o)), &[x])
    }

    pub fn bn(&mut self, name: &str, x: NodeId) -> Result<NodeId> {
        let c = self.shapes[x][0];
        self.add(name, Op::BatchNorm(BatchNorm::new(c)), &[x])
    }

    pub fn act(&mut self, x: NodeId, kind: ActivationKind) -> Result<NodeId> {
        self.auto(Op::Activation(Activation::new(kind)), &[x])
    }

    pub fn relu(&mut self, x: NodeId) -> Result<NodeId> {
        self.act(x, ActivationKind::Relu)
    }

    pub fn maxpool(&mut self, x: NodeId, k: usize, s: usize, p: usize) -> Result<NodeId> {
        self.auto(Op::MaxPool(Pool2d::new(k, s, p)), &[x])
    }

    pub fn avgpool(&mut self, x: NodeId, k: usize, s: usize, p: usize) -> Result<NodeId> {
        self.auto(Op::AvgPool(Pool2d::new(k, s, p)), &[x])
    }

    pub fn gap(&mut self, x: NodeId) -> Result<NodeId> {
        self.auto(Op::GlobalAvgPool(GlobalAvgPool::default()), &[x])
    }

    pub fn flatten(&mut self, x: NodeId) -> Result<NodeId> {
        self.auto(Op::Flatten(Flatten::default()), &[x])
    }

    pub fn add_nodes(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.auto(Op::Add(Add::default()), &[a, b])
    }

    pub fn mul_nodes(&mut self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.auto(Op::Mul(Mul::default()), &[a, b])
    }

    pub fn concat(&mut self, xs: &[NodeId]) -> Result<NodeId> {
        self.auto(Op::Concat(Concat::default()), xs)
    }

    pub fn dropout(&mut self, x: NodeId, p: f32) -> Result<NodeId> {
        self.auto(Op::Dropout(Dropout { p }), &[x])
    }

    /// Overrides an initialised parameter (e.g. loading pretrained values while building).
    pub fn set(&mut self, key: &str, t: Tensor) -> Result<()> {
        self.params.insert(key.to_string(), super::owned_var(&t)?);
        Ok(())
    }

    pub fn finish(self, outputs: &[NodeId]) -> Result<Graph> {
        Graph::new(self.nodes, outputs.to_vec(), self.params)
    }
}
