//! ONNX → graph IR. Nodes are converted in file order (ONNX requires topological order);
//! every tensor name maps to an IR node or to a constant. Constant subgraphs (initialisers,
//! `Constant`, and the Shape/Gather/Unsqueeze/Concat chains PyTorch emits for flatten) are
//! folded; bias adds after Conv/Gemm/MatMul are folded into the layer's bias. Each op
//! family lives in its own file; anything unsupported is an error naming the node.

mod attention;
mod elementwise;
mod erf_gelu;
mod fold;
mod nn;
pub mod registry;
mod resize;
mod rms_norm;
mod shape;
mod view;

use super::external::ExternalData;
use super::value::{from_proto_with, Const};
use crate::graph::ops::{Input, Op};
use crate::graph::shape::Shape;
use crate::graph::{param_key, Graph, ModelMeta, Node, NodeId};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use onnx_protobuf::{Message, ModelProto, NodeProto};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

#[derive(Clone, Debug)]
pub(super) enum Value {
    Node(NodeId),
    Const(Const),
    /// A node seen through data movements (transformer layouts): see [`view`].
    View(view::View),
    /// Attention scores or probabilities on their way to the attention op.
    Attn(Box<attention::Attn>),
    /// Part of a GELU written out with Erf.
    Gelu(Box<erf_gelu::Gelu>),
    /// `IsNaN` of the named tensor, waiting for its `Where` NaN guard.
    IsNan(String),
    /// An additive attention mask: 0 where the view's (0/1) values are 1, a very negative
    /// number where they are 0 (`Where(mask, 0, -inf)`).
    Mask(view::View),
    /// Part of an RMSNorm written out.
    Rms(Box<rms_norm::Rms>),
}

/// Import state: the IR being built and the value of every ONNX tensor name.
pub(super) struct Ctx {
    nodes: Vec<Node>,
    shapes: Vec<Shape>,
    params: BTreeMap<String, Tensor>,
    values: HashMap<String, Value>,
    /// How many ONNX nodes (and graph outputs) read each tensor.
    uses: HashMap<String, usize>,
    names: HashSet<String>,
    /// The model's opset of the default domain (some ops changed meaning across opsets).
    pub(super) opset: i64,
    /// Layer nodes by the ONNX tensor their weight came from: a weight read by several
    /// convs (or Gemms) is one shared parameter, confirmed when the import ends.
    weight_of: Vec<(NodeId, String)>,
}

impl Ctx {
    /// Adds a one-input, parameter-free IR node and returns it as the value.
    pub(super) fn unary(&mut self, name: &str, op: Op, x: NodeId) -> Result<Value> {
        Ok(Value::Node(self.add(name, op, &[x], vec![])?))
    }

    /// Adds an IR node with its parameters; returns its id.
    pub(super) fn add(
        &mut self,
        name: &str,
        op: Op,
        inputs: &[NodeId],
        params: Vec<(&str, Tensor)>,
    ) -> Result<NodeId> {
        let mut unique = if name.is_empty() {
            format!("{}_{}", op.kind().to_lowercase(), self.nodes.len())
        } else {
            name.to_string()
        };
        while self.names.contains(&unique) {
            unique = format!("{unique}_{}", self.nodes.len());
        }
        let ins: Vec<&Shape> = inputs.iter().map(|&i| &self.shapes[i]).collect();
        let shape = op.spec().infer_shape(&ins)?;
        let declared = op.spec().params();
        for spec in &declared {
            let t = params
                .iter()
                .find(|(n, _)| *n == spec.name)
                .ok_or_else(|| anyhow!("internal: parameter {} not given", spec.name))?;
            if t.1.dims() != spec.shape.as_slice() {
                bail!(
                    "parameter {} has shape {:?}, the op needs {:?}",
                    spec.name,
                    t.1.dims(),
                    spec.shape
                );
            }
            self.params
                .insert(param_key(&unique, spec.name), t.1.clone());
        }
        self.names.insert(unique.clone());
        self.nodes.push(Node {
            name: unique,
            op,
            inputs: inputs.to_vec(),
            shares: None,
        });
        self.shapes.push(shape);
        Ok(self.nodes.len() - 1)
    }

    pub(super) fn value(&self, name: &str) -> Result<&Value> {
        self.values
            .get(name)
            .ok_or_else(|| anyhow!("input '{name}' is not produced by any earlier node"))
    }
    /// The IR node behind a non-constant tensor.
    pub(super) fn node(&self, name: &str) -> Result<NodeId> {
        match self.value(name)? {
            Value::Node(n) => Ok(*n),
            Value::Const(_) => bail!(
                "input '{name}' is a constant where a tensor computed from the input is expected"
            ),
            Value::View(_) => bail!("internal: input '{name}' is a view that was not materialised"),
            Value::Attn(_) => bail!(
                "input '{name}' is attention scores or probabilities, read here by something \
                 other than the softmax and the product with the values"
            ),
            Value::Gelu(_) => bail!(
                "input '{name}' is part of a GELU written with Erf, read here by something \
                 other than the rest of x·½·(1 + erf(x/√2))"
            ),
            Value::Mask(_) => bail!(
                "input '{name}' is an additive attention mask, read here by something other \
                 than the attention scores"
            ),
            Value::Rms(_) => bail!(
                "input '{name}' is part of an RMSNorm written out, read here by something \
                 other than the rest of x / √(mean(x²) + ε)"
            ),
            Value::IsNan(_) => bail!(
                "input '{name}' is an IsNaN test, read here by something other than the \
                 Where NaN guard"
            ),
        }
    }
    /// The view behind `name` (a computed node is its identity view); `None` for constants
    /// and attention values.
    pub(super) fn view(&self, name: &str) -> Option<view::View> {
        match self.values.get(name)? {
            Value::Node(n) => Some(view::View::identity(self, *n)),
            Value::View(v) => Some(v.clone()),
            _ => None,
        }
    }
    /// True if `name` is a view (not a plain node).
    pub(super) fn is_view(&self, name: &str) -> bool {
        matches!(self.values.get(name), Some(Value::View(_)))
    }
    /// Replaces a view input by its materialised node (for ops that read plain layouts).
    pub(super) fn materialise(&mut self, name: &str, label: &str) -> Result<()> {
        if let Some(Value::View(v)) = self.values.get(name).cloned() {
            let n =
                view::materialise(self, label, &v).with_context(|| format!("input '{name}'"))?;
            self.values.insert(name.to_string(), Value::Node(n));
        }
        Ok(())
    }
    /// A parameter of node `n`, flattened.
    pub(super) fn param(&self, n: NodeId, p: &str) -> Result<Vec<f32>> {
        let key = param_key(&self.nodes[n].name, p);
        let t = self
            .params
            .get(&key)
            .ok_or_else(|| anyhow!("internal: {key} is not set"))?;
        Ok(t.flatten_all()?.to_vec1::<f32>()?)
    }
    pub(super) fn konst(&self, name: &str) -> Option<&Const> {
        match self.values.get(name) {
            Some(Value::Const(c)) => Some(c),
            _ => None,
        }
    }
    pub(super) fn shape(&self, n: NodeId) -> &Shape {
        &self.shapes[n]
    }
    pub(super) fn op_mut(&mut self, n: NodeId) -> &mut Op {
        &mut self.nodes[n].op
    }
    pub(super) fn op(&self, n: NodeId) -> &Op {
        &self.nodes[n].op
    }
    pub(super) fn first_input(&self, n: NodeId) -> NodeId {
        self.nodes[n].inputs[0]
    }
    pub(super) fn set_param(&mut self, n: NodeId, p: &str, t: Tensor) {
        let key = param_key(&self.nodes[n].name, p);
        self.params.insert(key, t);
    }
    /// Renames node `id` to `name` (moving its parameters) unless another node has that
    /// name: graph outputs keep the names the exporter gave them.
    pub(super) fn rename(&mut self, id: NodeId, name: &str) {
        let old = self.nodes[id].name.clone();
        if old == name || self.names.contains(name) {
            return;
        }
        for spec in self.nodes[id].op.spec().params() {
            if let Some(t) = self.params.remove(&param_key(&old, spec.name)) {
                self.params.insert(param_key(name, spec.name), t);
            }
        }
        self.names.remove(&old);
        self.names.insert(name.to_string());
        self.nodes[id].name = name.to_string();
    }
    /// True if the ONNX tensor `name` has exactly one reader.
    pub(super) fn single_use(&self, name: &str) -> bool {
        self.uses.get(name).copied().unwrap_or(0) == 1
    }
}

pub(super) fn tensor(data: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
}

/// Parses ONNX bytes into a graph. `what` names the source in errors. Tensors with
/// external data are refused (there is no folder to read them from): see
/// [`import_bytes_at`].
pub fn import_bytes(bytes: &[u8], what: &str) -> Result<Graph> {
    import_bytes_at(bytes, what, None)
}

/// [`import_bytes`] for a model whose external data files are in `dir`.
pub fn import_bytes_at(bytes: &[u8], what: &str, dir: Option<&Path>) -> Result<Graph> {
    Ok(import_noting(bytes, what, dir)?.0)
}

/// [`import_bytes_at`], also returning what the import changed that a user should know
/// (e.g. a batch fixed in the file, made symbolic).
pub fn import_noting(bytes: &[u8], what: &str, dir: Option<&Path>) -> Result<(Graph, Vec<String>)> {
    import_model(parse(bytes, what)?, what, dir)
}

/// The ONNX model in `bytes` (`what` names them in errors).
pub fn parse(bytes: &[u8], what: &str) -> Result<ModelProto> {
    if bytes.is_empty() {
        bail!("{what}: the file is empty (0 bytes), not an ONNX model");
    }
    let model = ModelProto::parse_from_bytes(bytes)
        .map_err(|e| anyhow!("{what}: not a valid ONNX protobuf ({e})"))?;
    if model.graph.is_none() && model.opset_import.is_empty() {
        bail!("{what}: not an ONNX model (no graph and no opset; is it another kind of file?)");
    }
    Ok(model)
}

/// [`import_noting`] of a parsed model, which it consumes: each initialiser's bytes are
/// freed once the nodes reading it are converted.
pub fn import_model(
    model: ModelProto,
    what: &str,
    dir: Option<&Path>,
) -> Result<(Graph, Vec<String>)> {
    convert(model, &mut ExternalData::new(dir)).with_context(|| format!("importing {what}"))
}

fn convert(mut model: ModelProto, ext: &mut ExternalData) -> Result<(Graph, Vec<String>)> {
    // Initialisers are decoded (to f64 constants) just before their first reader, and they
    // and every other constant are dropped after their last: decoding them all up front
    // and keeping the protobuf's copy held extra copies of every weight (ViT-B/16 peaked at
    // 3.2 GB for 346 MB of weights).
    let mut lazy: HashMap<String, onnx_protobuf::TensorProto> = model
        .graph
        .as_mut()
        .map(|g| std::mem::take(&mut g.initializer))
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let model = &model;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0);
    let (lo, hi) = registry::OPSETS;
    if !(lo..=hi).contains(&opset) {
        bail!("opset {opset} is not supported ({lo} to {hi})");
    }
    if model.ir_version < 3 {
        bail!(
            "IR version {} is not supported (3 or later)",
            model.ir_version
        );
    }
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| anyhow!("the model has no graph"))?;
    check_ops(g, opset)?;
    let mut ctx = Ctx {
        nodes: vec![],
        shapes: vec![],
        params: BTreeMap::new(),
        values: HashMap::new(),
        uses: HashMap::new(),
        names: HashSet::new(),
        opset,
        weight_of: Vec::new(),
    };
    for n in &g.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *ctx.uses.entry(i.clone()).or_default() += 1;
        }
    }
    for o in &g.output {
        *ctx.uses.entry(o.name.clone()).or_default() += 1;
    }
    let mut remaining = ctx.uses.clone();
    let inputs: Vec<_> = g
        .input
        .iter()
        .filter(|i| !lazy.contains_key(i.name.as_str()))
        .collect();
    if inputs.is_empty() {
        bail!("the graph has no non-constant input");
    }
    let mut notes = Vec::new();
    for input in inputs {
        let dims = input_dims(input)?;
        if fixed_batch(input) == Some(1) {
            notes.push(format!(
                "input '{}' has its batch fixed at 1 in the file (PyTorch's exporters do this unless told otherwise); lopper runs it at any batch and exports the batch as symbolic",
                input.name
            ));
        }
        if dims.len() < 2 {
            bail!(
                "input '{}' has shape {dims:?}; expected [N, ...]",
                input.name
            );
        }
        let id = ctx.add(
            &input.name,
            Op::Input(Input {
                shape: dims[1..].to_vec(),
            }),
            &[],
            vec![],
        )?;
        ctx.values.insert(input.name.clone(), Value::Node(id));
    }
    // A node that cannot be converted does not stop the import: its outputs are marked
    // failed, the nodes reading them are skipped, and every failure is reported at once.
    let mut errors: Vec<anyhow::Error> = Vec::new();
    let mut failed: HashSet<&str> = HashSet::new();
    let mut skipped = 0usize;
    for n in &g.node {
        let label = if n.name.is_empty() {
            n.output.first().cloned().unwrap_or_default()
        } else {
            n.name.clone()
        };
        if n.input.iter().any(|i| failed.contains(i.as_str())) {
            failed.extend(n.output.iter().map(String::as_str));
            skipped += 1;
            continue;
        }
        for i in &n.input {
            if let Some(t) = lazy.get(i) {
                if !ctx.values.contains_key(i) {
                    ctx.values
                        .insert(i.clone(), Value::Const(from_proto_with(t, ext)?));
                }
            }
        }
        let before = ctx.nodes.len();
        let out = if !n.domain.is_empty() && n.domain != "ai.onnx" {
            Err(anyhow!(
                "node '{label}' ({}) is in domain '{}', which is not supported",
                n.op_type,
                n.domain
            ))
        } else {
            convert_node(&mut ctx, n, &label, opset)
                .with_context(|| format!("ONNX node '{label}' ({})", n.op_type))
        };
        match out {
            Ok(out) => {
                let layer = (before..ctx.nodes.len())
                    .find(|&i| ctx.nodes[i].op.spec().weight_matrix().is_some());
                if let (Some(i), Some(w)) = (layer, n.input.get(1)) {
                    if ctx.konst(w).is_some() {
                        ctx.weight_of.push((i, w.clone()));
                    }
                }
                for (name, v) in n.output.iter().zip(out) {
                    ctx.values.insert(name.clone(), v);
                }
            }
            Err(e) => {
                errors.push(e);
                failed.extend(n.output.iter().map(String::as_str));
            }
        }
        // A constant (an initialiser or a folded result) or a view (its per-element index)
        // that no later node reads is dropped.
        for i in &n.input {
            if let Some(k) = remaining.get_mut(i) {
                *k = k.saturating_sub(1);
                if *k == 0 && matches!(ctx.values.get(i), Some(Value::Const(_) | Value::View(_))) {
                    ctx.values.remove(i);
                    lazy.remove(i);
                }
            }
        }
    }
    if errors.len() == 1 && skipped == 0 {
        return Err(errors.remove(0));
    }
    if !errors.is_empty() {
        let lines: Vec<String> = errors.iter().map(|e| format!("  - {e:#}")).collect();
        bail!(
            "{} node(s) cannot be imported{}:\n{}",
            errors.len(),
            if skipped > 0 {
                format!(" ({skipped} node(s) reading their outputs were not tried)")
            } else {
                String::new()
            },
            lines.join("\n")
        );
    }
    for o in &g.output {
        ctx.materialise(&o.name, &o.name)
            .with_context(|| format!("graph output '{}'", o.name))?;
    }
    let outputs = g
        .output
        .iter()
        .map(|o| {
            ctx.node(&o.name)
                .with_context(|| format!("graph output '{}'", o.name))
        })
        .collect::<Result<Vec<_>>>()?;
    for (o, &id) in g.output.iter().zip(&outputs) {
        if !matches!(ctx.nodes[id].op, Op::Input(_)) {
            ctx.rename(id, &o.name);
        }
    }
    let mut graph = prune_dead(ctx, outputs)?;
    // Integer inputs are token ids or attention masks; anything else reading one is refused.
    for input in g.input.iter().filter(|i| int_input(i)) {
        let id = graph.nodes.iter().position(|n| n.name == input.name);
        if id.is_some_and(|i| graph.token_input(i).is_none()) {
            bail!(
                "input '{}' has element type int64/int32 and is read as values, not as token ids \
                 (an embedding lookup) or an attention mask: lopper needs a floating-point input there",
                input.name
            );
        }
    }
    graph.meta = describe(model);
    Ok((graph, notes))
}

/// The batch size the file fixes for input `v`, if it fixes one.
fn fixed_batch(v: &onnx_protobuf::ValueInfoProto) -> Option<i64> {
    use onnx_protobuf::tensor_shape_proto::dimension::Value as D;
    use onnx_protobuf::type_proto::Value as T;
    let Some(T::TensorType(tt)) = v.type_.as_ref()?.value.as_ref() else {
        return None;
    };
    match tt.shape.as_ref()?.dim.first()?.value.as_ref()? {
        D::DimValue(b) => Some(*b),
        // Symbolic (and any future kind of dimension): not fixed.
        _ => None,
    }
}

/// Drops nodes no output depends on (shape-only branches, folded reshapes) and renumbers.
fn prune_dead(ctx: Ctx, outputs: Vec<NodeId>) -> Result<Graph> {
    let n = ctx.nodes.len();
    // Inputs stay even if unused: the model's interface does not change.
    let mut live: Vec<bool> = ctx
        .nodes
        .iter()
        .map(|n| matches!(n.op, Op::Input(_)))
        .collect();
    let mut stack = outputs.clone();
    while let Some(i) = stack.pop() {
        if !live[i] || matches!(ctx.nodes[i].op, Op::Input(_)) {
            live[i] = true;
            stack.extend(&ctx.nodes[i].inputs);
        }
    }
    let mut new_id = vec![usize::MAX; n];
    let mut nodes = Vec::new();
    let mut params = BTreeMap::new();
    for (i, mut node) in ctx.nodes.into_iter().enumerate() {
        if !live[i] {
            continue;
        }
        new_id[i] = nodes.len();
        node.inputs.iter_mut().for_each(|j| *j = new_id[*j]);
        for spec in node.op.spec().params() {
            let key = param_key(&node.name, spec.name);
            if let Some(t) = ctx.params.get(&key) {
                params.insert(key, t.clone());
            }
        }
        nodes.push(node);
    }
    // Shared weights: a later layer reading the same weight tensor as an earlier one, with
    // the same op and (after any folded bias) the same parameter values, shares its
    // parameters; a use whose values differ keeps its own copy.
    let mut first: HashMap<&str, NodeId> = HashMap::new();
    for (i, w) in &ctx.weight_of {
        if !live[*i] {
            continue;
        }
        let Some(&j) = first.get(w.as_str()) else {
            first.insert(w, *i);
            continue;
        };
        let (a, b) = (&nodes[new_id[j]], &nodes[new_id[*i]]);
        let same = a.op == b.op
            && a.op.spec().params().iter().all(|p| {
                let (ka, kb) = (param_key(&a.name, p.name), param_key(&b.name, p.name));
                match (params.get(&ka), params.get(&kb)) {
                    (Some(x), Some(y)) => same_values(x, y),
                    _ => false,
                }
            });
        if same {
            let owner = a.name.clone();
            let k = new_id[*i];
            for p in nodes[k].op.spec().params() {
                params.remove(&param_key(&nodes[k].name, p.name));
            }
            nodes[k].shares = Some(owner);
        }
    }
    let outputs = outputs.iter().map(|&o| new_id[o]).collect();
    Graph::with_parts(nodes, outputs, params)
}

/// The model's own description (doc strings, names, metadata), kept for export.
fn describe(model: &ModelProto) -> ModelMeta {
    let g = model.graph.as_ref();
    let producer = match (
        model.producer_name.as_str(),
        model.producer_version.as_str(),
    ) {
        ("", _) => String::new(),
        (n, "") => n.to_string(),
        (n, v) => format!("{n} {v}"),
    };
    let value_docs = g
        .map(|g| {
            g.input
                .iter()
                .chain(&g.output)
                .filter(|v| !v.doc_string.is_empty())
                .map(|v| (v.name.clone(), v.doc_string.clone()))
                .collect()
        })
        .unwrap_or_default();
    ModelMeta {
        doc: model.doc_string.clone(),
        graph_name: g.map(|g| g.name.clone()).unwrap_or_default(),
        graph_doc: g.map(|g| g.doc_string.clone()).unwrap_or_default(),
        domain: model.domain.clone(),
        model_version: model.model_version,
        producer,
        props: model
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect(),
        value_docs,
    }
}

/// Bit-identical tensors (same shape, same f32 values).
fn same_values(a: &Tensor, b: &Tensor) -> bool {
    let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok();
    a.dims() == b.dims() && flat(a).zip(flat(b)).is_some_and(|(x, y)| x == y)
}

/// An input of int32/int64 elements (token ids or a mask).
fn int_input(v: &onnx_protobuf::ValueInfoProto) -> bool {
    use onnx_protobuf::type_proto::Value as T;
    matches!(
        v.type_.as_ref().and_then(|t| t.value.as_ref()),
        Some(T::TensorType(tt)) if matches!(tt.elem_type, 6 | 7)
    )
}

fn input_dims(v: &onnx_protobuf::ValueInfoProto) -> Result<Vec<usize>> {
    use onnx_protobuf::tensor_shape_proto::dimension::Value as D;
    use onnx_protobuf::type_proto::Value as T;
    let t = v
        .type_
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .ok_or_else(|| anyhow!("input '{}' has no type", v.name))?;
    let T::TensorType(tt) = t else {
        bail!("input '{}' is not a tensor", v.name);
    };
    let ids = matches!(tt.elem_type, 6 | 7); // int32, int64: token ids
    if !super::value::is_float_type(tt.elem_type) && !ids {
        bail!(
            "input '{}' has element type {}; lopper imports floating-point inputs (images, features) and int32/int64 token ids",
            v.name,
            super::value::elem_type_name(tt.elem_type)
        );
    }
    let shape = tt
        .shape
        .as_ref()
        .ok_or_else(|| anyhow!("input '{}' has no shape", v.name))?;
    shape
        .dim
        .iter()
        .enumerate()
        .map(|(i, d)| match &d.value {
            Some(D::DimValue(x)) if *x > 0 => Ok(*x as usize),
            // A symbolic batch dimension is fine; other symbolic dims are not.
            _ if i == 0 => Ok(1),
            _ => bail!(
                "input '{}' has a symbolic dimension {i}; lopper needs fixed sizes",
                v.name
            ),
        })
        .collect()
}

/// Every node whose op type (or domain, or opset) the importer does not take, listed at
/// once with node names, so that one run tells the whole story of a model.
fn check_ops(g: &onnx_protobuf::GraphProto, opset: i64) -> Result<()> {
    let mut bad: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, n) in g.node.iter().enumerate() {
        let what = if !n.domain.is_empty() && n.domain != "ai.onnx" {
            format!("{} (domain '{}')", n.op_type, n.domain)
        } else {
            match registry::lookup(&n.op_type) {
                None => n.op_type.clone(),
                Some(e) if opset < e.opsets.0 || opset > e.opsets.1 => format!(
                    "{} at opset {opset} (supported for {}–{})",
                    n.op_type, e.opsets.0, e.opsets.1
                ),
                Some(_) => continue,
            }
        };
        let name = if n.name.is_empty() {
            format!("#{k}")
        } else {
            n.name.clone()
        };
        bad.entry(what).or_default().push(name);
    }
    if bad.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = bad
        .iter()
        .map(|(op, nodes)| {
            let shown: Vec<&str> = nodes.iter().take(5).map(String::as_str).collect();
            let more = if nodes.len() > 5 {
                format!(" and {} more", nodes.len() - 5)
            } else {
                String::new()
            };
            format!(
                "{op} ({} node(s): '{}'{more})",
                nodes.len(),
                shown.join("', '")
            )
        })
        .collect();
    bail!(
        "{} unsupported op type(s): {}; supported: {}",
        bad.len(),
        list.join("; "),
        registry::names()
    )
}

fn convert_node(ctx: &mut Ctx, n: &NodeProto, label: &str, opset: i64) -> Result<Vec<Value>> {
    let Some(e) = registry::lookup(&n.op_type) else {
        bail!(
            "op type '{}' is not supported (supported: {})",
            n.op_type,
            registry::names()
        );
    };
    if opset < e.opsets.0 || opset > e.opsets.1 {
        bail!(
            "{} is supported for opsets {}–{}, the model declares opset {opset}",
            e.op_type,
            e.opsets.0,
            e.opsets.1
        );
    }
    let (need, most) = e.inputs;
    if n.input.len() < need || n.input.iter().take(need).any(|i| i.is_empty()) {
        bail!("needs at least {need} inputs, has {:?}", n.input);
    }
    if n.input.len() > most {
        bail!("takes at most {most} inputs, has {:?}", n.input);
    }
    let (lo, hi) = e.outputs;
    if n.output.len() < lo || n.output.len() > hi {
        bail!(
            "declares {} outputs; {} has {lo} to {hi}",
            n.output.len(),
            e.op_type
        );
    }
    if matches!(e.op_type, "Identity" | "Dropout" | "Cast")
        && matches!(
            ctx.values.get(&n.input[0]),
            Some(Value::Attn(_) | Value::Gelu(_))
        )
    {
        // Inference no-ops inside attention or a GELU.
        return Ok(vec![ctx.value(&n.input[0])?.clone()]);
    }
    if view::ELEMENTWISE.contains(&e.op_type) && ctx.is_view(&n.input[0]) {
        // A per-element op reads the view's node and keeps its index.
        let Some(Value::View(v)) = ctx.values.get(&n.input[0]).cloned() else {
            unreachable!("checked")
        };
        let v = view::apply_scale(ctx, label, &v)?;
        ctx.values.insert(n.input[0].clone(), Value::Node(v.node));
        let out = (e.convert)(ctx, n, label);
        ctx.values
            .insert(n.input[0].clone(), Value::View(v.clone()));
        return match out?.as_slice() {
            [Value::Node(y)] => Ok(vec![view::settle(ctx, label, v.on(*y))?]),
            [other] => Ok(vec![other.clone()]),
            _ => bail!("internal: an element-wise op with several outputs"),
        };
    }
    if !view::AWARE.contains(&e.op_type) {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            ctx.materialise(i, label)?;
        }
    }
    (e.convert)(ctx, n, label)
}
