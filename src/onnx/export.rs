//! Graph IR → ONNX opset 17. Every IR node becomes one ONNX node (or a short fixed
//! sequence: GELU, SiLU, per-channel affine), named after the IR node, so the pruned
//! widths are visible in any ONNX viewer. The batch axis is symbolic (`N`).

use super::value::{f32_proto, i64_proto, i64_scalar};
use crate::graph::ops::{param, ActivationKind, MultiHeadAttention, Op, Pool2d, Resize};
use crate::graph::shape::Shape;
use crate::graph::{param_key, Graph};
use anyhow::{anyhow, bail, Result};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{self, Tensor as TypeTensor};
use onnx_protobuf::{
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

fn attr_i(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}
fn attr_f(name: &str, v: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = v;
    a
}
fn attr_s(name: &str, v: &str) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::STRING.into();
    a.s = v.as_bytes().to_vec();
    a
}
fn attr_is(name: &str, v: &[usize]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = v.iter().map(|&x| x as i64).collect();
    a
}

fn value_info(name: &str, shape: &Shape) -> ValueInfoProto {
    typed_value_info(name, shape, 1)
}

/// A value of ONNX element type `elem` (1 float, 7 int64) with a symbolic batch.
fn typed_value_info(name: &str, shape: &Shape, elem: i32) -> ValueInfoProto {
    let mut dims = vec![{
        let mut d = Dimension::new();
        d.value = Some(dimension::Value::DimParam("N".into()));
        d
    }];
    for &s in shape {
        let mut d = Dimension::new();
        d.value = Some(dimension::Value::DimValue(s as i64));
        dims.push(d);
    }
    let mut sh = TensorShapeProto::new();
    sh.dim = dims;
    let mut tt = TypeTensor::new();
    tt.elem_type = elem;
    tt.shape = Some(sh).into();
    let mut tp = TypeProto::new();
    tp.value = Some(type_proto::Value::TensorType(tt));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(tp).into();
    v
}

struct Out {
    nodes: Vec<NodeProto>,
    inits: Vec<onnx_protobuf::TensorProto>,
}

impl Out {
    fn node(&mut self, op: &str, name: &str, ins: &[&str], out: &str, attrs: Vec<AttributeProto>) {
        let mut n = NodeProto::new();
        n.op_type = op.into();
        n.name = name.into();
        n.input = ins.iter().map(|s| s.to_string()).collect();
        n.output = vec![out.into()];
        n.attribute = attrs;
        self.nodes.push(n);
    }
    fn init(&mut self, g: &Graph, node: usize, p: &str, dims: Option<&[usize]>) -> Result<String> {
        // A shared weight is one initialiser, written at its owner (an earlier node).
        let owner = g.param_owner(node);
        if owner != node {
            return Ok(param_key(&g.nodes[owner].name, p));
        }
        let name = param_key(&g.nodes[node].name, p);
        let t = g.param(node, p)?.as_tensor();
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let d: Vec<usize> = dims
            .map(|d| d.to_vec())
            .unwrap_or_else(|| t.dims().to_vec());
        self.inits.push(f32_proto(&name, &d, &data));
        Ok(name)
    }
    /// One node named after its single output `out`.
    fn step(&mut self, op: &str, out: &str, ins: &[&str], attrs: Vec<AttributeProto>) {
        self.node(op, out, ins, out, attrs);
    }
    /// Node `name` = `x` reshaped to the batch (kept: 0) then per-sample `shape`.
    fn reshape_to(&mut self, name: &str, x: &str, shape: &Shape) {
        let s = format!("{name}.shape");
        let mut t = vec![0i64];
        t.extend(shape.iter().map(|&d| d as i64));
        self.inits.push(i64_proto(&s, &t));
        self.node("Reshape", name, &[x, &s], name, vec![]);
    }
    /// `[x, weight, bias?]` for a conv or linear node, adding the initialisers.
    fn weight_bias(&mut self, g: &Graph, node: usize, x: &str, bias: bool) -> Result<Vec<String>> {
        let mut inputs = vec![x.to_string(), self.init(g, node, param::WEIGHT, None)?];
        if bias {
            inputs.push(self.init(g, node, param::BIAS, None)?);
        }
        Ok(inputs)
    }
}

/// Serialises `g` as an ONNX model (opset 17).
pub fn export_bytes(g: &Graph) -> Result<Vec<u8>> {
    export_bytes_with(g, &[])
}

/// [`export_bytes`] with extra `metadata_props` (key, value) entries, e.g. the report of
/// the run that produced the model. Every weight is inline: a model whose weights pass
/// ONNX's 2 GB protobuf limit is an error here ([`export_model`] writes external data).
pub fn export_bytes_with(g: &Graph, props: &[(&str, &str)]) -> Result<Vec<u8>> {
    Ok(export_model(g, props, None)?.model)
}

/// Protobuf cannot encode a message of 2 GiB or more; above this many bytes of weights an
/// export to a file moves them to external data.
pub const INLINE_LIMIT: usize = 2_000_000_000;

/// Initialisers of at least this many bytes go to the external file (the threshold of
/// onnx's `save_model`); small ones (shapes, pads) stay inline.
const EXTERNAL_MIN: usize = 1024;

/// An exported model: the ONNX bytes and, with external data, the data file's bytes.
pub struct Exported {
    pub model: Vec<u8>,
    pub data: Option<Vec<u8>>,
}

/// Exports `g`; with `external = Some(location)`, every initialiser of 1 KiB or more is
/// written to the data file `location` (relative to the model's folder: offset and
/// length recorded per tensor), which the caller writes beside the model.
pub fn export_model(g: &Graph, props: &[(&str, &str)], external: Option<&str>) -> Result<Exported> {
    let shapes = g.shapes()?;
    let mut o = Out {
        nodes: vec![],
        inits: vec![],
    };
    for (i, shape) in shapes.iter().enumerate() {
        export_node(&mut o, g, i, shape)?;
    }
    let data = match external {
        Some(loc) => Some(externalise(&mut o.inits, loc)),
        None => {
            let inline: usize = o.inits.iter().map(|t| t.raw_data.len()).sum();
            if inline >= INLINE_LIMIT {
                bail!(
                    "the model has {inline} bytes of weights, over ONNX's 2 GB protobuf limit; save it to a .onnx file, which then keeps them in external data beside it"
                );
            }
            None
        }
    };
    Ok(Exported {
        model: model_bytes(g, &shapes, o, props)?,
        data,
    })
}

/// Moves the raw bytes of every initialiser of `EXTERNAL_MIN` bytes or more into one
/// blob, recording where each went; returns the blob.
fn externalise(inits: &mut [onnx_protobuf::TensorProto], location: &str) -> Vec<u8> {
    use onnx_protobuf::tensor_proto::DataLocation;
    let entry = |k: &str, v: String| {
        let mut e = onnx_protobuf::StringStringEntryProto::new();
        e.key = k.into();
        e.value = v;
        e
    };
    let mut data = Vec::new();
    for t in inits
        .iter_mut()
        .filter(|t| t.raw_data.len() >= EXTERNAL_MIN)
    {
        // 64-byte alignment, so that readers may map the tensors in place.
        data.resize(data.len().div_ceil(64) * 64, 0);
        let raw = std::mem::take(&mut t.raw_data);
        t.external_data = vec![
            entry("location", location.to_string()),
            entry("offset", data.len().to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = DataLocation::EXTERNAL.into();
        data.extend_from_slice(&raw);
    }
    data
}

/// One IR node as its ONNX node(s), appended to `o`; `shape` is the node's output shape
/// (without the batch axis).
fn export_node(o: &mut Out, g: &Graph, i: usize, shape: &Shape) -> Result<()> {
    let n = &g.nodes[i];
    let name = n.name.as_str();
    let ins: Vec<&str> = n.inputs.iter().map(|&j| g.nodes[j].name.as_str()).collect();
    let x = ins.first().copied().unwrap_or("");
    // Broadcast shape of a per-channel constant against this node's output.
    let chan = |c: usize| -> Vec<usize> {
        let mut d = vec![c];
        d.extend(std::iter::repeat_n(1, shape.len().saturating_sub(1)));
        d
    };
    match &n.op {
        Op::Input(_) => {}
        Op::Conv2d(c) => {
            let inputs = o.weight_bias(g, i, x, c.bias)?;
            let refs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
            let attrs = window_attrs(c.kernel, c.stride, c.padding, c.dilation, c.groups);
            o.node("Conv", name, &refs, name, attrs);
        }
        Op::ConvTranspose2d(c) => {
            let inputs = o.weight_bias(g, i, x, c.bias)?;
            let refs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
            let mut attrs = window_attrs(c.kernel, c.stride, c.padding, c.dilation, c.groups);
            attrs.push(attr_is("output_padding", &c.output_padding));
            o.node("ConvTranspose", name, &refs, name, attrs);
        }
        Op::Linear(l) => {
            let inputs = o.weight_bias(g, i, x, l.bias)?;
            let refs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
            o.node("Gemm", name, &refs, name, vec![attr_i("transB", 1)]);
        }
        Op::BatchNorm(b) => {
            let ps: Vec<String> = [
                param::WEIGHT,
                param::BIAS,
                param::RUNNING_MEAN,
                param::RUNNING_VAR,
            ]
            .iter()
            .map(|p| o.init(g, i, p, None))
            .collect::<Result<_>>()?;
            let mut refs = vec![x];
            refs.extend(ps.iter().map(|s| s.as_str()));
            o.node(
                "BatchNormalization",
                name,
                &refs,
                name,
                vec![
                    attr_f("epsilon", b.eps as f32),
                    attr_f("momentum", (1.0 - b.momentum) as f32),
                ],
            );
        }
        Op::Activation(a) => export_activation(o, name, x, a.kind),
        Op::MaxPool(p) | Op::AvgPool(p) => {
            let max = matches!(n.op, Op::MaxPool(_));
            let op = if max { "MaxPool" } else { "AveragePool" };
            o.node(op, name, &[x], name, pool_attrs(p, max));
        }
        Op::GlobalAvgPool(_) => o.node("GlobalAveragePool", name, &[x], name, vec![]),
        Op::Flatten(_) => o.node("Flatten", name, &[x], name, vec![attr_i("axis", 1)]),
        Op::Reshape(_) => o.reshape_to(name, x, shape),
        // ONNX Add is binary; the IR's n-ary add is a Sum.
        Op::Add(_) if ins.len() > 2 => o.node("Sum", name, &ins, name, vec![]),
        Op::Add(_) => o.node("Add", name, &ins, name, vec![]),
        Op::Mul(_) => o.node("Mul", name, &ins, name, vec![]),
        Op::Concat(c) => o.node(
            "Concat",
            name,
            &ins,
            name,
            vec![attr_i("axis", c.axis as i64 + 1)],
        ),
        Op::Max(_) => o.node("Max", name, &ins, name, vec![]),
        Op::Min(_) => o.node("Min", name, &ins, name, vec![]),
        Op::Transpose(t) => {
            let perm: Vec<usize> = std::iter::once(0)
                .chain(t.perm.iter().map(|&p| p + 1))
                .collect();
            o.node("Transpose", name, &[x], name, vec![attr_is("perm", &perm)]);
        }
        Op::ChannelPad(p) => {
            let r = shape.len() + 1;
            let mut pads = vec![0i64; 2 * r];
            pads[1] = p.before as i64;
            pads[1 + r] = p.after as i64;
            let s = format!("{name}.pads");
            o.inits.push(i64_proto(&s, &pads));
            o.node("Pad", name, &[x, &s], name, vec![]);
        }
        Op::ChannelAffine(a) => {
            let d = chan(a.channels);
            let w = o.init(g, i, param::WEIGHT, Some(&d))?;
            let b = o.init(g, i, param::BIAS, Some(&d))?;
            let m = format!("{name}.scaled");
            o.node("Mul", &m, &[x, &w], &m, vec![]);
            o.node("Add", name, &[&m, &b], name, vec![]);
        }
        Op::Resize(r) => export_resize(o, name, x, r),
        Op::SpatialPad(p) => {
            use crate::graph::ops::PadMode;
            let [t, l, b, r] = p.pads.map(|v| v as i64);
            let s = format!("{name}.pads");
            o.inits.push(i64_proto(&s, &[0, 0, t, l, 0, 0, b, r]));
            let (mode, value) = match p.mode {
                PadMode::Constant { value } => ("constant", value),
                PadMode::Reflect => ("reflect", 0.0),
                PadMode::Edge => ("edge", 0.0),
            };
            let v = format!("{name}.value");
            o.inits.push(f32_proto(&v, &[], &[value]));
            o.node("Pad", name, &[x, &s, &v], name, vec![attr_s("mode", mode)]);
        }
        Op::PRelu(p) => {
            let d = chan(p.channels);
            let w = o.init(g, i, param::WEIGHT, Some(&d))?;
            o.node("PRelu", name, &[x, &w], name, vec![]);
        }
        Op::ChannelGather(gth) => {
            let s = format!("{name}.indices");
            let idx: Vec<i64> = gth.indices.iter().map(|&v| v as i64).collect();
            o.inits.push(i64_proto(&s, &idx));
            o.node("Gather", name, &[x, &s], name, vec![attr_i("axis", 1)]);
        }
        Op::Dropout(_) | Op::Identity(_) => o.node("Identity", name, &[x], name, vec![]),
        Op::Softmax(sm) => o.node(
            "Softmax",
            name,
            &[x],
            name,
            vec![attr_i("axis", sm.axis as i64 + 1)],
        ),
        Op::LayerNorm(l) if l.rms => {
            // x / √(mean_c x² + ε) · γ + β over the channel axis, as PyTorch decomposes it.
            let c = |k: &str| format!("{name}.{k}");
            o.inits.push(f32_proto(&c("two"), &[], &[2.0]));
            o.inits.push(f32_proto(&c("eps"), &[], &[l.eps as f32]));
            o.step("Pow", &c("sq"), &[x, &c("two")], vec![]);
            o.step(
                "ReduceMean",
                &c("ms"),
                &[&c("sq")],
                vec![attr_is("axes", &[1]), attr_i("keepdims", 1)],
            );
            o.step("Add", &c("mse"), &[&c("ms"), &c("eps")], vec![]);
            o.step("Sqrt", &c("rms"), &[&c("mse")], vec![]);
            o.step("Reciprocal", &c("inv"), &[&c("rms")], vec![]);
            o.step("Mul", &c("normed"), &[x, &c("inv")], vec![]);
            let w = o.init(g, i, param::WEIGHT, Some(&chan(l.channels)))?;
            let b = o.init(g, i, param::BIAS, Some(&chan(l.channels)))?;
            o.step("Mul", &c("scaled"), &[&c("normed"), &w], vec![]);
            o.node("Add", name, &[&c("scaled"), &b], name, vec![]);
        }
        Op::LayerNorm(l) => {
            // ONNX normalises trailing axes: channels moved last, normalised, moved back.
            let rank = shape.len() + 1;
            let to_last: Vec<usize> = (0..rank).filter(|&a| a != 1).chain([1]).collect();
            let mut back = vec![0usize; rank];
            for (k, &a) in to_last.iter().enumerate() {
                back[a] = k;
            }
            let (t, n) = (format!("{name}.last"), format!("{name}.norm"));
            o.node("Transpose", &t, &[x], &t, vec![attr_is("perm", &to_last)]);
            let w = o.init(g, i, param::WEIGHT, None)?;
            let b = o.init(g, i, param::BIAS, None)?;
            let attrs = vec![attr_i("axis", -1), attr_f("epsilon", l.eps as f32)];
            o.node("LayerNormalization", &n, &[&t, &w, &b], &n, attrs);
            o.node("Transpose", name, &[&n], name, vec![attr_is("perm", &back)]);
        }
        Op::PosEmbed(_) => {
            let mut d = vec![1];
            d.extend(shape.iter().copied());
            let e = o.init(g, i, param::WEIGHT, Some(&d))?;
            o.node("Add", name, &[x, &e], name, vec![]);
        }
        Op::MultiHeadAttention(a) => export_attention(o, name, x, ins.get(1).copied(), a, shape),
        Op::ClassToken(ct) => {
            // [N, C, P…] → [N, C, T]; the token broadcast to [N, C, 1] (Expand to the batch
            // read from Shape(x)); concatenated first; back to [N, C, 1 + T, 1].
            let c = |k: &str| format!("{name}.{k}");
            let ch = ct.channels as i64;
            o.inits.push(i64_proto(&c("flat_shape"), &[0, ch, -1]));
            o.step("Reshape", &c("flat"), &[x, &c("flat_shape")], vec![]);
            let tok = o.init(g, i, param::WEIGHT, Some(&[1, ct.channels, 1]))?;
            o.step("Shape", &c("input_shape"), &[x], vec![]);
            o.inits.push(i64_proto(&c("zero"), &[0]));
            o.inits.push(i64_proto(&c("one"), &[1]));
            o.step(
                "Slice",
                &c("batch"),
                &[&c("input_shape"), &c("zero"), &c("one")],
                vec![],
            );
            o.inits.push(i64_proto(&c("ones"), &[1, 1]));
            o.step(
                "Concat",
                &c("tshape"),
                &[&c("batch"), &c("ones")],
                vec![attr_i("axis", 0)],
            );
            o.step("Expand", &c("token"), &[&tok, &c("tshape")], vec![]);
            o.step(
                "Concat",
                &c("cat"),
                &[&c("token"), &c("flat")],
                vec![attr_i("axis", 2)],
            );
            o.reshape_to(name, &c("cat"), shape);
        }
        Op::Embedding(e) => {
            // Gather the table's rows by id ([N, T] → [N, T, D]), then channels-first.
            let c = |k: &str| format!("{name}.{k}");
            let w = o.init(g, i, param::WEIGHT, None)?;
            o.step("Cast", &c("ids"), &[x], vec![attr_i("to", 7)]);
            o.step(
                "Gather",
                &c("rows"),
                &[&w, &c("ids")],
                vec![attr_i("axis", 0)],
            );
            o.step(
                "Transpose",
                &c("cf"),
                &[&c("rows")],
                vec![attr_is("perm", &[0, 2, 1])],
            );
            o.reshape_to(name, &c("cf"), &vec![e.dim, shape[1], 1]);
        }
        Op::TokenSelect(t) => {
            let c = |k: &str| format!("{name}.{k}");
            o.inits
                .push(i64_proto(&c("flat_shape"), &[0, shape[0] as i64, -1]));
            o.step("Reshape", &c("flat"), &[x, &c("flat_shape")], vec![]);
            o.inits.push(i64_scalar(&c("index"), t.index as i64));
            o.node(
                "Gather",
                name,
                &[&c("flat"), &c("index")],
                name,
                vec![attr_i("axis", 2)],
            );
        }
    }
    Ok(())
}

/// Multi-head attention as standard ONNX ops (opset 17): `[N, 3·H·d, T…]` reshaped to
/// `[N, 3, H, d, T]`, split into q, k, v (grouped-query: split into `H`, `G`, `G` heads and
/// the key/value heads gathered per query head); `softmax(qᵀk·scale)` over keys; `v·Aᵀ`;
/// reshaped back to `[N, H·d, T…]` (the head count is in the exported shapes, so a
/// pruned model's reshapes carry its new count).
fn export_attention(
    o: &mut Out,
    name: &str,
    x: &str,
    mask: Option<&str>,
    a: &MultiHeadAttention,
    shape: &Shape,
) {
    let c = |k: &str| format!("{name}.{k}");
    let t: usize = shape[1..].iter().product();
    let (h, d) = (a.heads as i64, a.head_dim as i64);
    if a.kv() == a.heads {
        o.inits
            .push(i64_proto(&c("split_shape"), &[0, 3, h, d, t as i64]));
        o.step("Reshape", &c("split"), &[x, &c("split_shape")], vec![]);
        for (k, part) in ["q", "k", "v"].iter().enumerate() {
            let idx = c(&format!("{part}_index"));
            o.inits.push(i64_scalar(&idx, k as i64));
            o.node(
                "Gather",
                &c(part),
                &[&c("split"), &idx],
                &c(part),
                vec![attr_i("axis", 1)],
            );
        }
    } else {
        // Grouped-query: the input is H query, G key and G value heads; each part is
        // gathered on the head axis, a key/value head once per query head reading it (the
        // reshape is 5-D like the one above, `[N, 1, H + 2G, d, T]`, then squeezed).
        let g = a.kv() as i64;
        let r = h / g;
        o.inits.push(i64_proto(
            &c("split_shape"),
            &[0, 1, h + 2 * g, d, t as i64],
        ));
        o.step("Reshape", &c("split"), &[x, &c("split_shape")], vec![]);
        o.inits.push(i64_proto(&c("squeeze_axes"), &[1]));
        for (part, first, step) in [("q", 0, 1), ("k", h, r), ("v", h + g, r)] {
            let idx = c(&format!("{part}_heads"));
            let heads: Vec<i64> = (0..h).map(|q| first + q / step).collect();
            o.inits.push(i64_proto(&idx, &heads));
            let picked = c(&format!("{part}_picked"));
            o.step(
                "Gather",
                &picked,
                &[&c("split"), &idx],
                vec![attr_i("axis", 2)],
            );
            o.step("Squeeze", &c(part), &[&picked, &c("squeeze_axes")], vec![]);
        }
    }
    o.step(
        "Transpose",
        &c("q_t"),
        &[&c("q")],
        vec![attr_is("perm", &[0, 1, 3, 2])],
    );
    o.step("MatMul", &c("logits"), &[&c("q_t"), &c("k")], vec![]);
    o.inits.push(f32_proto(&c("scale"), &[], &[a.scale as f32]));
    o.step("Mul", &c("scaled"), &[&c("logits"), &c("scale")], vec![]);
    let mut logits = c("scaled");
    if let (true, Some(m)) = (a.masked, mask) {
        // Where(mask, 0, −10⁹) per key, as [N, 1, 1, T], added to the logits (the form
        // PyTorch's exporter writes, so lopper reads its own export back).
        o.step("Cast", &c("mask_bool"), &[m], vec![attr_i("to", 9)]);
        o.inits
            .push(i64_proto(&c("mask_shape"), &[0, 1, 1, t as i64]));
        o.step(
            "Reshape",
            &c("mask_b"),
            &[&c("mask_bool"), &c("mask_shape")],
            vec![],
        );
        o.inits.push(f32_proto(&c("zero"), &[], &[0.0]));
        o.inits.push(f32_proto(&c("neg"), &[], &[-1e9]));
        o.step(
            "Where",
            &c("mask_bias"),
            &[&c("mask_b"), &c("zero"), &c("neg")],
            vec![],
        );
        o.step(
            "Add",
            &c("masked"),
            &[&c("scaled"), &c("mask_bias")],
            vec![],
        );
        logits = c("masked");
    }
    o.step("Softmax", &c("attn"), &[&logits], vec![attr_i("axis", -1)]);
    o.step(
        "Transpose",
        &c("attn_t"),
        &[&c("attn")],
        vec![attr_is("perm", &[0, 1, 3, 2])],
    );
    o.step("MatMul", &c("heads"), &[&c("v"), &c("attn_t")], vec![]);
    o.reshape_to(name, &c("heads"), shape);
}

/// `Resize` (opset 17 form: X, roi, scales, sizes). A fixed size becomes `sizes` built as
/// `Shape(x)[0:2] ++ [h, w]`, since the batch is symbolic; a scale stays a scale.
fn export_resize(o: &mut Out, name: &str, x: &str, r: &Resize) {
    use crate::graph::ops::{CoordMode as C, Nearest as R, ResizeMode as M, ResizeTarget as T};
    let c = |k: &str| format!("{name}.{k}");
    let coord = match r.coord {
        C::HalfPixel => "half_pixel",
        C::PytorchHalfPixel => "pytorch_half_pixel",
        C::AlignCorners => "align_corners",
        C::Asymmetric => "asymmetric",
    };
    let mut attrs = vec![attr_s("coordinate_transformation_mode", coord)];
    match r.mode {
        M::Linear => attrs.push(attr_s("mode", "linear")),
        M::Nearest(n) => {
            attrs.push(attr_s("mode", "nearest"));
            let nm = match n {
                R::RoundPreferFloor => "round_prefer_floor",
                R::RoundPreferCeil => "round_prefer_ceil",
                R::Floor => "floor",
                R::Ceil => "ceil",
            };
            attrs.push(attr_s("nearest_mode", nm));
        }
    }
    match r.target {
        T::Scales { h, w } => {
            o.inits.push(f32_proto(
                &c("scales"),
                &[4],
                &[1.0, 1.0, h as f32, w as f32],
            ));
            o.node("Resize", name, &[x, "", &c("scales")], name, attrs);
        }
        T::Sizes { h, w } => {
            o.inits.push(i64_proto(&c("start"), &[0]));
            o.inits.push(i64_proto(&c("end"), &[2]));
            o.inits.push(i64_proto(&c("hw"), &[h as i64, w as i64]));
            o.step("Shape", &c("input_shape"), &[x], vec![]);
            let ins = [c("input_shape"), c("start"), c("end")];
            o.node(
                "Slice",
                &c("nc"),
                &[&ins[0], &ins[1], &ins[2]],
                &c("nc"),
                vec![],
            );
            let cat = vec![attr_i("axis", 0)];
            o.node(
                "Concat",
                &c("sizes"),
                &[&c("nc"), &c("hw")],
                &c("sizes"),
                cat,
            );
            o.node("Resize", name, &[x, "", "", &c("sizes")], name, attrs);
        }
    }
}

/// The attributes Conv and ConvTranspose share.
fn window_attrs(
    kernel: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 4],
    dilation: [usize; 2],
    groups: usize,
) -> Vec<AttributeProto> {
    vec![
        attr_is("kernel_shape", &kernel),
        attr_is("strides", &stride),
        attr_is("pads", &pads),
        attr_is("dilations", &dilation),
        attr_i("group", groups as i64),
    ]
}

/// Pooling attributes; `count_include_pad` exists only on AveragePool.
fn pool_attrs(p: &Pool2d, max: bool) -> Vec<AttributeProto> {
    let mut attrs = vec![
        attr_is("kernel_shape", &p.kernel),
        attr_is("strides", &p.stride),
        attr_is("pads", &p.padding),
        attr_i("ceil_mode", p.ceil_mode as i64),
    ];
    if !max {
        attrs.push(attr_i("count_include_pad", p.count_include_pad as i64));
    }
    attrs
}

/// An activation as ONNX opset-17 nodes (GELU and SiLU as their decompositions).
fn export_activation(o: &mut Out, name: &str, x: &str, kind: ActivationKind) {
    match kind {
        ActivationKind::Relu => o.node("Relu", name, &[x], name, vec![]),
        ActivationKind::Relu6 => {
            let (lo, hi) = (format!("{name}.min"), format!("{name}.max"));
            o.inits.push(f32_proto(&lo, &[], &[0.0]));
            o.inits.push(f32_proto(&hi, &[], &[6.0]));
            o.node("Clip", name, &[x, &lo, &hi], name, vec![]);
        }
        ActivationKind::LeakyRelu { slope } => {
            o.node("LeakyRelu", name, &[x], name, vec![attr_f("alpha", slope)])
        }
        ActivationKind::Sigmoid => o.node("Sigmoid", name, &[x], name, vec![]),
        ActivationKind::Tanh => o.node("Tanh", name, &[x], name, vec![]),
        ActivationKind::HardSwish => o.node("HardSwish", name, &[x], name, vec![]),
        ActivationKind::HardSigmoid => o.node(
            "HardSigmoid",
            name,
            &[x],
            name,
            vec![attr_f("alpha", 1.0 / 6.0), attr_f("beta", 0.5)],
        ),
        ActivationKind::Silu => {
            let s = format!("{name}.sigmoid");
            o.node("Sigmoid", &s, &[x], &s, vec![]);
            o.node("Mul", name, &[x, &s], name, vec![]);
        }
        ActivationKind::Gelu => {
            // x · ½ · (1 + erf(x / √2)) — opset 17 has no Gelu.
            let c = |k: &str| format!("{name}.{k}");
            o.inits
                .push(f32_proto(&c("sqrt2"), &[], &[std::f32::consts::SQRT_2]));
            o.inits.push(f32_proto(&c("one"), &[], &[1.0]));
            o.inits.push(f32_proto(&c("half"), &[], &[0.5]));
            o.step("Div", &c("div"), &[x, &c("sqrt2")], vec![]);
            o.step("Erf", &c("erf"), &[&c("div")], vec![]);
            o.step("Add", &c("add"), &[&c("erf"), &c("one")], vec![]);
            o.step("Mul", &c("mul"), &[x, &c("add")], vec![]);
            o.node("Mul", name, &[&c("mul"), &c("half")], name, vec![]);
        }
        ActivationKind::HardSigmoidWith { alpha, beta } => o.node(
            "HardSigmoid",
            name,
            &[x],
            name,
            vec![attr_f("alpha", alpha), attr_f("beta", beta)],
        ),
        ActivationKind::Clip { lo, hi } => {
            let (l, h) = (format!("{name}.min"), format!("{name}.max"));
            o.inits.push(f32_proto(&l, &[], &[lo]));
            o.inits.push(f32_proto(&h, &[], &[hi]));
            o.node("Clip", name, &[x, &l, &h], name, vec![]);
        }
        ActivationKind::Elu { alpha } => {
            o.node("Elu", name, &[x], name, vec![attr_f("alpha", alpha)])
        }
        ActivationKind::Selu { alpha, gamma } => o.node(
            "Selu",
            name,
            &[x],
            name,
            vec![attr_f("alpha", alpha), attr_f("gamma", gamma)],
        ),
        ActivationKind::Softplus => o.node("Softplus", name, &[x], name, vec![]),
        ActivationKind::Mish => {
            // x · tanh(softplus(x)) — Mish is an opset-18 op; this file writes opset 17.
            let (sp, th) = (format!("{name}.softplus"), format!("{name}.tanh"));
            o.node("Softplus", &sp, &[x], &sp, vec![]);
            o.node("Tanh", &th, &[&sp], &th, vec![]);
            o.node("Mul", name, &[x, &th], name, vec![]);
        }
        ActivationKind::GeluTanh => {
            // ½x(1 + tanh(√(2/π)(x + 0.044715x³))).
            let c = |k: &str| format!("{name}.{k}");
            let k0 = (2.0f32 / std::f32::consts::PI).sqrt();
            for (k, v) in [("k0", k0), ("k1", 0.044715), ("one", 1.0), ("half", 0.5)] {
                o.inits.push(f32_proto(&c(k), &[], &[v]));
            }
            o.step("Mul", &c("sq"), &[x, x], vec![]);
            o.step("Mul", &c("cube"), &[&c("sq"), x], vec![]);
            o.node(
                "Mul",
                &c("k1x3"),
                &[&c("cube"), &c("k1")],
                &c("k1x3"),
                vec![],
            );
            o.step("Add", &c("inner"), &[x, &c("k1x3")], vec![]);
            o.step("Mul", &c("scaled"), &[&c("inner"), &c("k0")], vec![]);
            o.step("Tanh", &c("tanh"), &[&c("scaled")], vec![]);
            o.step("Add", &c("add"), &[&c("tanh"), &c("one")], vec![]);
            o.step("Mul", &c("mul"), &[x, &c("add")], vec![]);
            o.node("Mul", name, &[&c("mul"), &c("half")], name, vec![]);
        }
    }
}

/// Wraps the converted nodes into a model: input/output value infos, opset, metadata.
fn model_bytes(g: &Graph, shapes: &[Shape], o: Out, props: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut graph = GraphProto::new();
    let meta = &g.meta;
    graph.name = if meta.graph_name.is_empty() {
        "lopper".into()
    } else {
        meta.graph_name.clone()
    };
    graph.doc_string = meta.graph_doc.clone();
    graph.node = o.nodes;
    graph.initializer = o.inits;
    graph.input = g
        .input_ids()
        .into_iter()
        .map(|i| {
            // Token ids and key masks are int64, as tokenizers and exporters give them.
            let elem = if g.token_input(i).is_some() { 7 } else { 1 };
            typed_value_info(&g.nodes[i].name, &shapes[i], elem)
        })
        .collect();
    graph.output = g
        .outputs
        .iter()
        .map(|&i| value_info(&g.nodes[i].name, &shapes[i]))
        .collect();
    for v in graph.input.iter_mut().chain(graph.output.iter_mut()) {
        if let Some(d) = meta.value_docs.get(&v.name) {
            v.doc_string = d.clone();
        }
    }
    let mut m = ModelProto::new();
    m.ir_version = 8;
    m.producer_name = "lopper".into();
    m.producer_version = env!("CARGO_PKG_VERSION").into();
    let mut op = OperatorSetIdProto::new();
    op.version = 17;
    m.opset_import = vec![op];
    m.doc_string = meta.doc.clone();
    m.domain = meta.domain.clone();
    m.model_version = meta.model_version;
    m.graph = Some(graph).into();
    for (k, v) in meta.export_props(props) {
        let mut e = onnx_protobuf::StringStringEntryProto::new();
        e.key = k;
        e.value = v;
        m.metadata_props.push(e);
    }
    m.write_to_bytes()
        .map_err(|e| anyhow!("encoding ONNX: {e}"))
}
