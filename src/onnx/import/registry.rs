//! The one table of ONNX ops the importer accepts: op type, opset range, input and output
//! arities, the converter, and what is supported of it. Dispatch, the arity check, the
//! "supported:" list of the unsupported-op error and the README's op table are all read
//! from here (`tests/onnx.rs` checks the README against [`markdown_table`]).

use super::{elementwise as ew, erf_gelu, fold, nn, resize, rms_norm, shape, Ctx, Value};
use crate::graph::ops::ActivationKind as A;
use anyhow::Result;
use onnx_protobuf::NodeProto;

/// Converts one ONNX node to IR nodes or constants, one value per ONNX output.
pub(super) type Convert = fn(&mut Ctx, &NodeProto, &str) -> Result<Vec<Value>>;

/// One supported op type.
pub(super) struct OpEntry {
    pub op_type: &'static str,
    /// Opsets (of the default domain) the converter follows, inclusive.
    pub opsets: (i64, i64),
    /// Required inputs, and the most inputs the op takes (optional ones included).
    pub inputs: (usize, usize),
    /// Outputs the op may declare (extra outputs such as Dropout's mask must be unused).
    pub outputs: (usize, usize),
    pub convert: Convert,
    /// What of the op is supported, for the README.
    pub note: &'static str,
}

/// Opsets the importer reads (the range of the whole model).
pub const OPSETS: (i64, i64) = (7, 23);

const ALL: (i64, i64) = OPSETS;
const MANY: usize = usize::MAX;

macro_rules! one {
    ($f:expr) => {
        |c, n, l| Ok(vec![$f(c, n, l)?])
    };
}
macro_rules! act {
    ($k:expr) => {
        |c, n, l| Ok(vec![ew::activation(c, n, l, $k)?])
    };
}

#[rustfmt::skip]
pub(super) const OPS: &[OpEntry] = &[
    OpEntry { op_type: "Conv", opsets: ALL, inputs: (2, 3), outputs: (1, 1), convert: one!(nn::conv), note: "constant weights; groups (depthwise), dilation, strides, explicit pads and every auto_pad mode" },
    OpEntry { op_type: "ConvTranspose", opsets: ALL, inputs: (2, 3), outputs: (1, 1), convert: one!(nn::conv_transpose), note: "constant weights; strides, dilations, explicit pads, output_padding, groups (pruned on both channel axes when ungrouped)" },
    OpEntry { op_type: "Gemm", opsets: ALL, inputs: (2, 3), outputs: (1, 1), convert: one!(nn::gemm), note: "constant B (transB either way, transA 0), constant C, alpha, beta" },
    OpEntry { op_type: "MatMul", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(nn::matmul), note: "activation × constant matrix (a linear layer, over the channels of token tensors too); a following bias Add is folded; two computed tensors: attention's q·kᵀ and softmax·v, recognised as multi-head attention" },
    OpEntry { op_type: "LayerNormalization", opsets: (17, 23), inputs: (2, 3), outputs: (1, 1), convert: one!(nn::layer_norm), note: "over the last (embedding) axis" },
    OpEntry { op_type: "BatchNormalization", opsets: ALL, inputs: (5, 5), outputs: (1, 3), convert: one!(nn::batch_norm), note: "inference form (running statistics)" },
    OpEntry { op_type: "MaxPool", opsets: ALL, inputs: (1, 1), outputs: (1, 2), convert: one!(nn::pool), note: "2-D, pads or auto_pad, strides, ceil_mode (the Indices output unused)" },
    OpEntry { op_type: "AveragePool", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(nn::pool), note: "2-D, pads or auto_pad, strides, ceil_mode, count_include_pad" },
    OpEntry { op_type: "GlobalAveragePool", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(nn::global_avg_pool), note: "" },
    OpEntry { op_type: "ReduceMean", opsets: ALL, inputs: (1, 2), outputs: (1, 1), convert: one!(nn::reduce_mean), note: "over the spatial axes (global average pooling); the mean square of an RMSNorm" },
    OpEntry { op_type: "Add", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(ew::binary), note: "two tensors (residual), or a per-channel constant (folded into a bias or a channel affine)" },
    OpEntry { op_type: "Sum", opsets: ALL, inputs: (1, MANY), outputs: (1, 1), convert: one!(ew::sum), note: "of computed tensors (broadcast)" },
    OpEntry { op_type: "Max", opsets: ALL, inputs: (1, MANY), outputs: (1, 1), convert: one!(ew::max), note: "of computed tensors (broadcast)" },
    OpEntry { op_type: "Min", opsets: ALL, inputs: (1, MANY), outputs: (1, 1), convert: one!(ew::min), note: "of computed tensors (broadcast)" },
    OpEntry { op_type: "Sub", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(ew::binary), note: "by a per-channel constant" },
    OpEntry { op_type: "Mul", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(ew::binary), note: "two tensors (gating), or a per-channel constant" },
    OpEntry { op_type: "Div", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(ew::binary), note: "by a per-channel constant" },
    OpEntry { op_type: "Relu", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: act!(A::Relu), note: "" },
    OpEntry { op_type: "Clip", opsets: ALL, inputs: (1, 3), outputs: (1, 1), convert: one!(ew::clip), note: "constant bounds (ReLU6 and ReLU recognised)" },
    OpEntry { op_type: "LeakyRelu", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(ew::leaky_relu), note: "any alpha" },
    OpEntry { op_type: "Sigmoid", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: act!(A::Sigmoid), note: "" },
    OpEntry { op_type: "HardSigmoid", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(ew::hard_sigmoid), note: "any alpha, beta" },
    OpEntry { op_type: "Elu", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(ew::elu), note: "any alpha" },
    OpEntry { op_type: "Selu", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(ew::selu), note: "any alpha, gamma" },
    OpEntry { op_type: "Softplus", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: act!(A::Softplus), note: "" },
    OpEntry { op_type: "Mish", opsets: (18, 23), inputs: (1, 1), outputs: (1, 1), convert: act!(A::Mish), note: "" },
    OpEntry { op_type: "Gelu", opsets: (20, 23), inputs: (1, 1), outputs: (1, 1), convert: one!(ew::gelu), note: "exact and tanh approximation" },
    OpEntry { op_type: "PRelu", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(ew::prelu), note: "constant slope, per channel or shared (pruned with its channel)" },
    OpEntry { op_type: "HardSwish", opsets: (14, 23), inputs: (1, 1), outputs: (1, 1), convert: act!(A::HardSwish), note: "" },
    OpEntry { op_type: "Tanh", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: act!(A::Tanh), note: "" },
    OpEntry { op_type: "Resize", opsets: (10, 23), inputs: (1, 4), outputs: (1, 1), convert: one!(resize::resize), note: "nearest (every nearest_mode) and linear on H, W; half_pixel, pytorch_half_pixel, align_corners, asymmetric; constant scales or sizes" },
    OpEntry { op_type: "Upsample", opsets: (7, 9), inputs: (1, 2), outputs: (1, 1), convert: one!(resize::upsample), note: "nearest and linear" },
    OpEntry { op_type: "Softmax", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(ew::softmax), note: "over any one axis but the batch (opsets < 13: when the flattened axes are one); of attention scores over the keys" },
    OpEntry { op_type: "Identity", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(ew::identity), note: "on tensors and on constants" },
    OpEntry { op_type: "Dropout", opsets: ALL, inputs: (1, 3), outputs: (1, 2), convert: one!(ew::dropout), note: "ratio from the attribute or a constant input (the mask output unused)" },
    OpEntry { op_type: "Flatten", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(shape::flatten), note: "from axis 1" },
    OpEntry { op_type: "Reshape", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(shape::reshape), note: "to a constant or foldable shape that keeps the batch axis" },
    OpEntry { op_type: "Transpose", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(shape::transpose), note: "constants (folded); tensors: any permutation (layout no-ops become reshapes, channel shuffles gathers; other data movements are followed as views that layers, LayerNorm and attention read in place, or an IR transpose where a plain op reads them)" },
    OpEntry { op_type: "Squeeze", opsets: ALL, inputs: (1, 2), outputs: (1, 1), convert: one!(shape::squeeze), note: "axes as attribute or input" },
    OpEntry { op_type: "Unsqueeze", opsets: ALL, inputs: (1, 2), outputs: (1, 1), convert: one!(shape::squeeze), note: "axes as attribute or input" },
    OpEntry { op_type: "Concat", opsets: ALL, inputs: (1, MANY), outputs: (1, 1), convert: one!(shape::concat), note: "tensors along any axis but the batch; 1-D constants folded; a learned token before a token tensor (class token)" },
    OpEntry { op_type: "Split", opsets: ALL, inputs: (1, 2), outputs: (1, MANY), convert: shape::split, note: "along channels, sizes as attribute, input or equal parts" },
    OpEntry { op_type: "Slice", opsets: ALL, inputs: (1, 5), outputs: (1, 1), convert: one!(shape::slice_op), note: "constants: any axes and steps (folded); tensors: one axis, positive steps, the channel axis" },
    OpEntry { op_type: "Pad", opsets: ALL, inputs: (1, 4), outputs: (1, 1), convert: one!(shape::pad), note: "H and W: constant (any value), reflect, edge; the channel axis: zeros" },
    OpEntry { op_type: "Constant", opsets: ALL, inputs: (0, 0), outputs: (1, 1), convert: one!(shape::constant), note: "value, value_float(s), value_int(s)" },
    OpEntry { op_type: "ConstantOfShape", opsets: (9, 23), inputs: (1, 1), outputs: (1, 1), convert: one!(shape::constant_of_shape), note: "of a constant shape (folded)" },
    OpEntry { op_type: "Shape", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(shape::shape_of), note: "folded (shapes are static), start/end" },
    OpEntry { op_type: "Gather", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(shape::gather_op), note: "constant indices: on constants of any rank (folded), channels of a tensor, one token of a token tensor (class token), heads of a projection (attention); computed int ids into a constant [vocab, dim] table: an embedding lookup" },
    OpEntry { op_type: "Erf", opsets: (9, 23), inputs: (1, 1), outputs: (1, 1), convert: one!(erf_gelu::erf), note: "constants (folded); as part of GELU, x·½·(1 + erf(x/√2)), in any order of the products" },
    OpEntry { op_type: "Sqrt", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(fold::unary), note: "of constants (folded); inside an RMSNorm" },
    OpEntry { op_type: "Reciprocal", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(fold::unary), note: "of constants (folded); inside an RMSNorm" },
    OpEntry { op_type: "Pow", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(rms_norm::pow), note: "of constants (folded); x² of an RMSNorm, x / √(mean(x²) + ε) over the channels, recognised as one op" },
    OpEntry { op_type: "Mod", opsets: (10, 23), inputs: (2, 2), outputs: (1, 1), convert: one!(fold::binary), note: "of constants (folded)" },
    OpEntry { op_type: "Equal", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(fold::binary), note: "of constants (folded)" },
    OpEntry { op_type: "Where", opsets: (9, 23), inputs: (3, 3), outputs: (1, 1), convert: one!(fold::where_op), note: "of constants (folded); the NaN guard after a softmax; Where(mask, 0, -inf) as an attention mask" },
    OpEntry { op_type: "GatherElements", opsets: (11, 23), inputs: (2, 2), outputs: (1, 1), convert: one!(fold::gather_elements), note: "of constants (folded)" },
    OpEntry { op_type: "IsNaN", opsets: (9, 23), inputs: (1, 1), outputs: (1, 1), convert: one!(fold::is_nan), note: "of constants (folded); the NaN guard Where(IsNaN(p), 0, p) after a softmax" },
    OpEntry { op_type: "GatherND", opsets: (11, 23), inputs: (2, 2), outputs: (1, 1), convert: one!(fold::gather_nd), note: "constant indices, batch_dims 0: of constants (folded) or of an attention mask" },
    OpEntry { op_type: "And", opsets: ALL, inputs: (2, 2), outputs: (1, 1), convert: one!(fold::and), note: "of constants (folded); an attention mask with an all-true constant" },
    OpEntry { op_type: "Expand", opsets: (8, 23), inputs: (2, 2), outputs: (1, 1), convert: one!(fold::expand), note: "of constants (folded); of computed tensors as views (grouped-query attention's repeated key/value heads)" },
    OpEntry { op_type: "Cast", opsets: ALL, inputs: (1, 1), outputs: (1, 1), convert: one!(shape::cast), note: "of constants (folded) and of float tensors (a no-op)" },
];

/// The entry for an op type.
pub(super) fn lookup(op_type: &str) -> Option<&'static OpEntry> {
    OPS.iter().find(|e| e.op_type == op_type)
}

/// The supported op types, comma-separated (for errors).
pub(super) fn names() -> String {
    OPS.iter().map(|e| e.op_type).collect::<Vec<_>>().join(", ")
}

/// The README's table of supported ops, generated from [`OPS`].
pub fn markdown_table() -> String {
    let mut s = String::from("| op | opsets | supported |\n|---|---|---|\n");
    for e in OPS {
        s += &format!(
            "| {} | {}–{} | {} |\n",
            e.op_type,
            e.opsets.0,
            e.opsets.1,
            if e.note.is_empty() { "yes" } else { e.note }
        );
    }
    s
}
