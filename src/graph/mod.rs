//! The graph IR: a DAG of typed operators with named parameters.
//!
//! Nodes are stored in topological order (every input of node `i` has an index `< i`),
//! which every constructor checks, so execution and analyses are single forward sweeps.
//! Parameters live beside the structure as candle [`Var`]s keyed `"{node}.{param}"`, the
//! same keys as PyTorch state dicts, so saved weights interoperate.

pub mod builder;
pub mod cost;
pub mod csr;
pub mod fold;
pub mod init;
pub mod io;
pub mod matrix;
pub mod meta;
pub mod ops;
pub mod shape;

pub use builder::GraphBuilder;
pub use meta::ModelMeta;
pub use ops::{Op, OpSpec, ParamKind, ParamSpec};
pub use shape::Shape;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Index of a node in [`Graph::nodes`].
pub type NodeId = usize;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<NodeId>,
    /// This node runs with the parameters of the earlier node of this name: one weight
    /// used several times (a detection head applied to every FPN level, tied layers).
    /// Both hold the same variable, so training updates it once with the gradients of
    /// every use, pruning removes the same channels from every use (the dependency
    /// groups couple them), and export writes one initialiser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<String>,
}

/// An input of integers: see [`Graph::token_input`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenInput {
    Ids { vocab: usize },
    KeyMask,
}

/// A model: typed nodes in topological order, graph outputs, and parameters.
#[derive(Debug)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub outputs: Vec<NodeId>,
    params: BTreeMap<String, Var>,
    /// Whether eval-mode execution plans run the layers whose weights are sparse enough on
    /// the sparse (CSR) kernels — a deployment preference, set for models saved sparse.
    /// The compressed weights themselves belong to the plan, not to the graph.
    sparse_kernels: bool,
    /// The source model's description (doc strings, names, metadata), kept to export.
    pub meta: ModelMeta,
}

/// A variable with storage of its own, whatever `t` is.
///
/// candle's `Var::from_tensor` *reuses* the storage of a tensor that already is a variable
/// (it copies only plain tensors), so building a graph from another graph's parameters
/// would alias them: writing into the new graph would write into the old one. Every graph
/// constructor goes through this helper, so no rewrite can share weights with its source.
pub fn owned_var(t: &Tensor) -> Result<Var> {
    // `detach` clears the variable flag without copying; `from_tensor` then copies once.
    Ok(Var::from_tensor(&t.detach())?)
}

/// Full parameter key of a node's parameter.
pub fn param_key(node: &str, param: &str) -> String {
    format!("{node}.{param}")
}

/// Points every sharing node's parameter keys at its owner's variables (see
/// [`Node::shares`]); the owner must be an earlier node with the same parameters.
fn tie(nodes: &[Node], params: &mut BTreeMap<String, Var>) -> Result<()> {
    for (i, n) in nodes.iter().enumerate() {
        let Some(src) = &n.shares else { continue };
        let j = nodes[..i]
            .iter()
            .position(|m| &m.name == src)
            .ok_or_else(|| {
                anyhow!(
                    "node '{}' shares the parameters of '{src}', which is not an earlier node",
                    n.name
                )
            })?;
        if nodes[j].shares.is_some() {
            bail!(
                "node '{}' shares the parameters of '{src}', which itself shares another node's",
                n.name
            );
        }
        let (mine, theirs) = (n.op.spec().params(), nodes[j].op.spec().params());
        if mine != theirs {
            bail!(
                "node '{}' shares the parameters of '{src}', but their parameters differ ({:?} vs {:?})",
                n.name,
                mine.iter().map(|p| (p.name, &p.shape)).collect::<Vec<_>>(),
                theirs.iter().map(|p| (p.name, &p.shape)).collect::<Vec<_>>()
            );
        }
        for p in &mine {
            let v = params
                .get(&param_key(src, p.name))
                .ok_or_else(|| anyhow!("missing parameter tensor '{}'", param_key(src, p.name)))?
                .clone();
            params.insert(param_key(&n.name, p.name), v);
        }
    }
    Ok(())
}

/// Per-sample output shapes of topologically ordered nodes (structure only, no weights).
pub fn infer_shapes(nodes: &[Node]) -> Result<Vec<Shape>> {
    let mut shapes: Vec<Shape> = Vec::with_capacity(nodes.len());
    for n in nodes {
        if n.inputs.iter().any(|&j| j >= shapes.len()) {
            bail!("node '{}' reads a node that is not before it", n.name);
        }
        let ins: Vec<&Shape> = n.inputs.iter().map(|&j| &shapes[j]).collect();
        let s =
            n.op.spec()
                .infer_shape(&ins)
                .with_context(|| format!("shape inference failed at node '{}'", n.name))?;
        shapes.push(s);
    }
    Ok(shapes)
}

impl Graph {
    /// Assembles a graph and checks it: topological order, unique names, arity, shapes, and
    /// that every parameter exists with the shape its op declares.
    pub fn new(
        nodes: Vec<Node>,
        outputs: Vec<NodeId>,
        params: BTreeMap<String, Var>,
    ) -> Result<Self> {
        let mut params = params;
        tie(&nodes, &mut params)?;
        let g = Graph {
            nodes,
            outputs,
            params,
            sparse_kernels: false,
            meta: ModelMeta::default(),
        };
        g.validate()?;
        Ok(g)
    }

    /// Structural and parameter checks; errors name the node or tensor at fault.
    pub fn validate(&self) -> Result<()> {
        let mut names = HashSet::new();
        let mut inputs = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            if !names.insert(n.name.as_str()) {
                bail!("duplicate node name '{}'", n.name);
            }
            if matches!(n.op, Op::Input(_)) {
                inputs += 1;
            }
            for &j in &n.inputs {
                if j >= i {
                    bail!(
                        "node '{}' reads node #{j}, which is not before it (graph must be topologically ordered)",
                        n.name
                    );
                }
            }
            if let Some(a) = n.op.spec().arity() {
                if n.inputs.len() != a {
                    bail!(
                        "node '{}' ({}) takes {a} input(s), has {}",
                        n.name,
                        n.op.kind(),
                        n.inputs.len()
                    );
                }
            } else if n.inputs.is_empty() {
                bail!("node '{}' ({}) has no inputs", n.name, n.op.kind());
            }
        }
        if inputs == 0 {
            bail!("a graph needs an Input node, found none");
        }
        if self.outputs.is_empty() {
            bail!("graph has no outputs");
        }
        for &o in &self.outputs {
            if o >= self.nodes.len() {
                bail!("graph output #{o} does not exist");
            }
        }
        self.shapes()?;
        let mut expected = HashSet::new();
        for n in &self.nodes {
            for p in n.op.spec().params() {
                let key = param_key(&n.name, p.name);
                let v = self
                    .params
                    .get(&key)
                    .ok_or_else(|| anyhow!("missing parameter tensor '{key}'"))?;
                if v.dims() != p.shape.as_slice() {
                    bail!(
                        "parameter '{key}' has shape {:?}, node '{}' needs {:?}",
                        v.dims(),
                        n.name,
                        p.shape
                    );
                }
                expected.insert(key);
            }
        }
        for k in self.params.keys() {
            if !expected.contains(k) {
                bail!("parameter tensor '{k}' belongs to no node");
            }
        }
        Ok(())
    }

    /// Per-sample output shape of every node.
    pub fn shapes(&self) -> Result<Vec<Shape>> {
        infer_shapes(&self.nodes)
    }

    /// The (first) Input node: the one data sets, training and the methods feed.
    pub fn input_id(&self) -> NodeId {
        self.nodes
            .iter()
            .position(|n| matches!(n.op, Op::Input(_)))
            .expect("validated graph has an input")
    }

    /// Every Input node, in graph order (the order of the model's inputs).
    /// What input `i` holds when it is not dense values: token ids (read by an
    /// `Embedding`; the vocabulary is the smallest table's) or a key mask (read only as
    /// attention's mask). Integer-valued inputs are read and exported as int64.
    pub fn token_input(&self, i: NodeId) -> Option<TokenInput> {
        // Readers of the input, through identities (an imported Cast).
        let mut from = vec![i];
        let mut readers: Vec<(&Op, usize)> = Vec::new();
        while let Some(j) = from.pop() {
            for (r, n) in self.nodes.iter().enumerate() {
                for (k, _) in n.inputs.iter().enumerate().filter(|(_, &x)| x == j) {
                    match n.op {
                        Op::Identity(_) => from.push(r),
                        _ => readers.push((&n.op, k)),
                    }
                }
            }
        }
        let vocab = readers
            .iter()
            .filter_map(|(op, _)| match op {
                Op::Embedding(e) => Some(e.vocab),
                _ => None,
            })
            .min();
        if let Some(v) = vocab {
            return Some(TokenInput::Ids { vocab: v });
        }
        let mask = !readers.is_empty()
            && readers
                .iter()
                .all(|(op, k)| matches!(op, Op::MultiHeadAttention(a) if a.masked && *k == 1));
        mask.then_some(TokenInput::KeyMask)
    }

    pub fn input_ids(&self) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&i| matches!(self.nodes[i].op, Op::Input(_)))
            .collect()
    }

    /// Per-sample shape of the (first) input.
    pub fn input_shape(&self) -> &Shape {
        match &self.nodes[self.input_id()].op {
            Op::Input(i) => &i.shape,
            _ => unreachable!(),
        }
    }

    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// For each node, the nodes that read it.
    pub fn consumers(&self) -> Vec<Vec<NodeId>> {
        let mut c = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &j in &n.inputs {
                c[j].push(i);
            }
        }
        c
    }

    /// A node's parameter.
    pub fn param(&self, node: NodeId, name: &str) -> Result<&Var> {
        let key = param_key(&self.nodes[node].name, name);
        self.params
            .get(&key)
            .ok_or_else(|| anyhow!("missing parameter '{key}'"))
    }

    /// All parameters by key.
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// Replaces a parameter's values in place (same shape), e.g. loading weights.
    pub fn set_param(&self, key: &str, value: &Tensor) -> Result<()> {
        let v = self
            .params
            .get(key)
            .ok_or_else(|| anyhow!("unknown parameter '{key}'"))?;
        if v.dims() != value.dims() {
            bail!(
                "tensor '{key}' has shape {:?}, the graph needs {:?}",
                value.dims(),
                v.dims()
            );
        }
        v.set(&value.to_dtype(v.dtype())?.to_device(v.device())?)?;
        Ok(())
    }

    /// The node whose parameters node `i` runs with: itself, or the node it shares them
    /// with ([`Node::shares`]).
    pub fn param_owner(&self, i: NodeId) -> NodeId {
        match &self.nodes[i].shares {
            Some(src) => self.node_id(src).unwrap_or(i),
            None => i,
        }
    }

    /// Trainable parameters in a stable order (node order), with their keys; a shared
    /// variable appears once, under its owner's key.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| n.shares.is_none()) {
            for p in n.op.spec().params() {
                if p.kind == ParamKind::Trainable {
                    let k = param_key(&n.name, p.name);
                    out.push((k.clone(), self.params[&k].clone()));
                }
            }
        }
        out
    }

    /// An independent copy: new parameter storage, so training one leaves the other alone
    /// (shared parameters stay shared within the copy).
    pub fn deep_clone(&self) -> Result<Graph> {
        let mut params = BTreeMap::new();
        for (k, v) in &self.params {
            params.insert(k.clone(), owned_var(v.as_tensor())?);
        }
        tie(&self.nodes, &mut params)?;
        Ok(Graph {
            nodes: self.nodes.clone(),
            outputs: self.outputs.clone(),
            params,
            sparse_kernels: self.sparse_kernels,
            meta: self.meta.clone(),
        })
    }

    /// Rebuilds a graph with new structure and parameters (every rewrite: surgery, depth,
    /// resolution, BN folding, head replacement, import, load). The parameters are always
    /// copied ([`owned_var`]), so the result never shares storage with its source.
    pub fn with_parts(
        nodes: Vec<Node>,
        outputs: Vec<NodeId>,
        params: BTreeMap<String, Tensor>,
    ) -> Result<Graph> {
        let mut vars = BTreeMap::new();
        for (k, t) in params {
            vars.insert(k, owned_var(&t)?);
        }
        Graph::new(nodes, outputs, vars)
    }

    /// This graph with `src`'s description and deployment preference: every rewrite of a
    /// graph (surgery, depth, folding, head replacement) ends with it, so what a model says
    /// about itself survives pruning.
    /// The parameters move to `src`'s device (rewrites build new tensors on the host).
    pub fn keeping(mut self, src: &Graph) -> Result<Graph> {
        self.meta = src.meta.clone();
        self.sparse_kernels = src.sparse_kernels;
        self.to_device(&src.device())?;
        Ok(self)
    }

    /// The device the parameters live on (the CPU for a graph without parameters).
    pub fn device(&self) -> candle_core::Device {
        self.params
            .values()
            .next()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu)
    }

    /// Moves every parameter to `dev` (a no-op for those already there); shared
    /// parameters stay shared.
    pub fn to_device(&mut self, dev: &candle_core::Device) -> Result<()> {
        if self.params.values().all(|v| v.device().same_device(dev)) {
            return Ok(());
        }
        let mut moved = BTreeMap::new();
        for (k, v) in &self.params {
            moved.insert(k.clone(), Var::from_tensor(&v.as_tensor().to_device(dev)?)?);
        }
        tie(&self.nodes, &mut moved)?;
        self.params = moved;
        Ok(())
    }

    /// Whether eval-mode plans use the sparse kernels where weights are sparse enough.
    pub fn sparse_kernels(&self) -> bool {
        self.sparse_kernels
    }

    /// Sets the sparse-kernel preference (see [`Graph::sparse_kernels`]).
    pub fn set_sparse_kernels(&mut self, on: bool) {
        self.sparse_kernels = on;
    }

    /// Errors naming the first parameter that holds a NaN or an infinity. Training loops
    /// call it after every epoch and every writer before saving, so a diverged model is
    /// never reported or written as if it were fine.
    pub fn check_finite(&self) -> Result<()> {
        for (k, v) in &self.params {
            let vals: Vec<f32> = v
                .as_tensor()
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?;
            let bad = vals.iter().filter(|x| !x.is_finite()).count();
            if bad > 0 {
                bail!(
                    "parameter '{k}' holds {bad} non-finite value(s) (NaN or infinity) of {}: the model diverged (lower the learning rate) or its file is corrupt",
                    vals.len()
                );
            }
        }
        Ok(())
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.nodes
            .iter()
            .flat_map(|n| n.op.spec().params())
            .filter(|p| p.kind == ParamKind::Trainable)
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }
}
