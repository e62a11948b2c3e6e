//! Typed operators of the graph IR. Every operator states, through [`OpSpec`], its shape
//! rule, its parameters, its cost and how its channels couple to those of its inputs; the
//! pruning engine derives dependency groups from these rules alone.

mod activation;
mod affine;
mod attention;
mod batchnorm;
mod class_token;
mod conv;
mod conv_transpose;
mod embedding;
mod gather;
mod join;
mod layer_norm;
mod linear;
mod misc;
mod pad;
mod pool;
mod pos_embed;
mod prelu;
mod reshape;
mod resize;
mod spatial_pad;

pub use activation::{Activation, ActivationKind};
pub use affine::ChannelAffine;
pub use attention::MultiHeadAttention;
pub use batchnorm::BatchNorm;
pub use class_token::{ClassToken, TokenSelect};
pub use conv::Conv2d;
pub use conv_transpose::ConvTranspose2d;
pub use embedding::Embedding;
pub use gather::ChannelGather;
pub use join::{Add, Concat, Max, Min, Mul};
pub use layer_norm::LayerNorm;
pub use linear::Linear;
pub use misc::{Dropout, Identity, Input, Softmax};
pub use pad::ChannelPad;
pub use pool::{GlobalAvgPool, Pool2d};
pub use pos_embed::PosEmbed;
pub use prelu::PRelu;
pub use reshape::{Flatten, Reshape, Transpose};
pub use resize::{CoordMode, Nearest, Resize, ResizeMode, ResizeTarget};
pub use spatial_pad::{PadMode, SpatialPad};

use crate::graph::shape::Shape;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// What a parameter is for: trained weights, or statistics that are updated but not trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    /// Trained by the optimizer and counted in the parameter total.
    Trainable,
    /// Running statistics (batch norm): saved and sliced, never trained nor counted.
    Buffer,
}

/// Parameter names shared by the ops (the PyTorch state-dict suffixes), so code that
/// reads a weight names it once.
pub mod param {
    pub const WEIGHT: &str = "weight";
    pub const BIAS: &str = "bias";
    pub const RUNNING_MEAN: &str = "running_mean";
    pub const RUNNING_VAR: &str = "running_var";
}

/// How a parameter starts out, as its op states it (PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InitRule {
    Zeros,
    Ones,
    /// Every entry `value` (e.g. PReLU's slope 0.25).
    Constant {
        value: f64,
    },
    /// Kaiming-normal with ReLU gain over the fan-out: std `√(2 / fan_out)` (torchvision's
    /// ResNet convolutions).
    KaimingNormalFanOut {
        fan_out: usize,
    },
    /// Uniform on `(−bound, bound)` (PyTorch's default for linear layers, `1/√in`).
    Uniform {
        bound: f64,
    },
}

/// One named parameter of an operator, e.g. `weight` of shape `[O, I/g, kh, kw]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    pub init: InitRule,
    /// Axis of this parameter indexed by the op's output channels, if any.
    pub out_axis: Option<usize>,
    /// Axis of this parameter indexed by the op's input channels, if any.
    pub in_axis: Option<usize>,
}

/// How an operator's channels (axis 0 of the per-sample shape) relate to its inputs'.
#[derive(Clone, Debug, PartialEq)]
pub enum Coupling {
    /// A graph input: its channels are never removed.
    Source,
    /// Output channels are independent of input channels (dense conv, linear).
    Decouple,
    /// Grouped convolution: channel group `g` of the input feeds group `g` of the output.
    /// Depthwise (`groups == in == out`) couples input channel `c` with output channel `c`.
    Grouped { groups: usize },
    /// Output channel `c` is input channel `c` (batch norm, activations, pooling, dropout).
    PassThrough,
    /// All inputs and the output share one channel index space (add, mul). An input with a
    /// single channel (broadcast) does not take part.
    Join,
    /// Output channels are the inputs' channels laid end to end, starting at output
    /// channel `lead` (concat: 0; a channel pad: the number of zero channels before).
    Concat { lead: usize },
    /// Output channel `c` is input channel `indices[c]` (channel gather / split / shuffle).
    Gather { indices: Vec<usize> },
    /// Input channel `c` becomes the block of output features `[c*inner, (c+1)*inner)`,
    /// `inner` being the input's per-channel size (read from the shapes, which the op
    /// alone does not know).
    Flatten,
    /// A reshape: read from the shapes. Keeping the leading axis keeps every channel's
    /// block (`c → c`, e.g. `[C,1,1] ↔ [C]` around squeeze-excitation); a leading axis of
    /// `in[0]·inner` flattens (`c → [c·inner, (c+1)·inner)`); the reverse un-flattens.
    /// Anything else is opaque.
    Reshape,
    /// Channels cannot be followed through this op: pruning stops at its boundary.
    Opaque,
    /// Like `PassThrough`, but the op normalises across the channels (LayerNorm), so
    /// removing any changes the others: the channels are coupled and kept at full width
    /// (a transformer's embedding dimension; prunable only on request).
    Normalized,
    /// Multi-head attention over stacked q/k/v input channels `[(heads + 2·kv_heads)·head_dim]`
    /// with output `[heads·head_dim]`: each kv group (its key and value head, the
    /// `heads/kv_heads` query heads that read them and their output channels) is one unit;
    /// with `kv_heads == heads`, each head.
    Heads {
        heads: usize,
        head_dim: usize,
        kv_heads: usize,
    },
}

/// The rule set every operator implements.
pub trait OpSpec {
    /// Short operator name used in tables and errors.
    fn kind(&self) -> &'static str;
    /// Output shape from input shapes (per sample), or an error saying what does not fit.
    fn infer_shape(&self, inputs: &[&Shape]) -> Result<Shape>;
    /// Parameters this operator owns.
    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    /// Multiply-accumulates per sample (conv and linear only, the convention of published
    /// CIFAR/ImageNet figures).
    fn macs(&self, _inputs: &[&Shape], _output: &Shape) -> u64 {
        0
    }
    /// Channel coupling rule.
    fn coupling(&self) -> Coupling;
    /// How many inputs the op takes (`None` = one or more).
    fn arity(&self) -> Option<usize> {
        Some(1)
    }
    /// The `weight` parameter as a matrix `(rows, row_len)`: one row per output channel in
    /// the GEMM's reduction order. The layers that have one (conv, linear) are the ones
    /// sparsity masks, CSR storage and row-wise criteria work on.
    fn weight_matrix(&self) -> Option<(usize, usize)> {
        None
    }
}

/// A typed operator: the node payload of the graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Op {
    Input(Input),
    Conv2d(Conv2d),
    ConvTranspose2d(ConvTranspose2d),
    Linear(Linear),
    BatchNorm(BatchNorm),
    Activation(Activation),
    MaxPool(Pool2d),
    AvgPool(Pool2d),
    GlobalAvgPool(GlobalAvgPool),
    Flatten(Flatten),
    Reshape(Reshape),
    Add(Add),
    Mul(Mul),
    Concat(Concat),
    Max(Max),
    Min(Min),
    Transpose(Transpose),
    ChannelPad(ChannelPad),
    ChannelAffine(ChannelAffine),
    PRelu(PRelu),
    Resize(Resize),
    SpatialPad(SpatialPad),
    ChannelGather(ChannelGather),
    Dropout(Dropout),
    Softmax(Softmax),
    Identity(Identity),
    LayerNorm(LayerNorm),
    MultiHeadAttention(MultiHeadAttention),
    PosEmbed(PosEmbed),
    ClassToken(ClassToken),
    TokenSelect(TokenSelect),
    Embedding(Embedding),
}

impl Op {
    /// The operator's rules as a trait object.
    pub fn spec(&self) -> &dyn OpSpec {
        match self {
            Op::Input(o) => o,
            Op::Conv2d(o) => o,
            Op::ConvTranspose2d(o) => o,
            Op::Linear(o) => o,
            Op::BatchNorm(o) => o,
            Op::Activation(o) => o,
            Op::MaxPool(o) => o,
            Op::AvgPool(o) => o,
            Op::GlobalAvgPool(o) => o,
            Op::Flatten(o) => o,
            Op::Reshape(o) => o,
            Op::Add(o) => o,
            Op::Mul(o) => o,
            Op::Concat(o) => o,
            Op::Max(o) => o,
            Op::Min(o) => o,
            Op::Transpose(o) => o,
            Op::ChannelPad(o) => o,
            Op::ChannelAffine(o) => o,
            Op::PRelu(o) => o,
            Op::Resize(o) => o,
            Op::SpatialPad(o) => o,
            Op::ChannelGather(o) => o,
            Op::Dropout(o) => o,
            Op::Softmax(o) => o,
            Op::Identity(o) => o,
            Op::LayerNorm(o) => o,
            Op::MultiHeadAttention(o) => o,
            Op::PosEmbed(o) => o,
            Op::ClassToken(o) => o,
            Op::TokenSelect(o) => o,
            Op::Embedding(o) => o,
        }
    }

    /// Table name: pooling ops share one struct, so the variant decides.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::MaxPool(_) => "MaxPool",
            Op::AvgPool(_) => "AvgPool",
            o => o.spec().kind(),
        }
    }
}

/// A per-channel `weight` (ones) and `bias` (zeros), both indexed by the output channels:
/// the affine parameters of ChannelAffine and LayerNorm.
pub(crate) fn per_channel_affine(channels: usize) -> Vec<ParamSpec> {
    let mk = |name, init| ParamSpec {
        name,
        shape: vec![channels],
        kind: ParamKind::Trainable,
        init,
        out_axis: Some(0),
        in_axis: None,
    };
    vec![
        mk(param::WEIGHT, InitRule::Ones),
        mk(param::BIAS, InitRule::Zeros),
    ]
}

/// Checks the number of inputs and returns a clear error otherwise.
pub(crate) fn expect_inputs(kind: &str, inputs: &[&Shape], n: usize) -> Result<()> {
    if inputs.len() != n {
        anyhow::bail!("{kind} takes {n} input(s), got {}", inputs.len());
    }
    Ok(())
}
