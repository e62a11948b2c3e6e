//! Hot CPU kernels as candle custom ops (forward + backward), and the dispatch that makes
//! them the default on CPU. On other devices (CUDA behind the `cuda` feature), or when the
//! reference backend is selected, the same functions run candle's own ops instead, which
//! is also what the kernel tests compare against.

pub mod act;
mod act_zmm;
mod attention;
pub mod batchnorm;
pub mod channel;
pub mod conv;
mod conv_batched;
pub mod conv_chanvec;
pub mod conv_tiles;
pub mod cpu;
pub mod csr;
mod depthwise;
mod direct;
mod dw_chanvec;
mod dw_flat;
mod dw_wide;
pub mod eltwise;
pub mod gemm;
pub mod im2col;
mod layer_norm;
pub mod linear;
pub mod panel;
pub mod par;
mod planes;
pub mod pool;
mod pool_ref;
pub mod pw_dw;
pub mod reduce;
pub mod simd;
pub mod sparse;
mod sparse_images;
pub mod sparse_pw;

pub use batchnorm::BatchStats;
pub use conv::ConvCfg;
pub use pool::PoolCfg;

use crate::graph::ops::ActivationKind;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use std::cell::Cell;
use std::sync::{Arc, Mutex};

thread_local! {
    static REFERENCE: Cell<bool> = const { Cell::new(false) };
}

/// Selects candle's own ops (`true`) or lopper's kernels (`false`, the default) on CPU,
/// for the calling thread (so concurrent tests and benchmarks do not interfere).
pub fn use_reference_ops(on: bool) {
    REFERENCE.with(|r| r.set(on));
}

/// Whether the calling thread runs candle's own ops ([`use_reference_ops`]).
pub fn reference_ops() -> bool {
    REFERENCE.with(|r| r.get())
}

fn fast(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !REFERENCE.with(|r| r.get())
}

/// 2-D convolution without bias.
pub fn conv2d(x: &Tensor, w: &Tensor, cfg: ConvCfg) -> Result<Tensor> {
    if fast(x) {
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        return Ok(x.apply_op2(&w, conv::Conv2dOp { cfg })?);
    }
    let p = cfg.padding;
    let x = if p[0] != p[2] || p[1] != p[3] || p[0] != p[1] {
        x.pad_with_zeros(2, p[0], p[2])?
            .pad_with_zeros(3, p[1], p[3])?
    } else {
        x.clone()
    };
    let pad = if p[0] == p[2] && p[1] == p[3] && p[0] == p[1] {
        p[0]
    } else {
        0
    };
    if cfg.stride[0] != cfg.stride[1] || cfg.dilation[0] != cfg.dilation[1] {
        bail!("reference conv2d needs square stride and dilation");
    }
    Ok(x.conv2d(w, pad, cfg.stride[0], cfg.dilation[0], cfg.groups)?)
}

/// 2-D convolution plus a per-channel bias `b: [O]`, with gradients for all three.
pub fn conv2d_bias(x: &Tensor, w: &Tensor, b: &Tensor, cfg: ConvCfg) -> Result<Tensor> {
    conv2d_bias_act(x, w, b, cfg, false)
}

/// [`conv2d_bias`] followed by a ReLU when `relu`, fused into one op with its gradient
/// (training a conv without batch norm: one pass each way instead of candle's five).
pub fn conv2d_bias_act(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    cfg: ConvCfg,
    relu: bool,
) -> Result<Tensor> {
    if fast(x) {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return Ok(x.apply_op3(&w, &b.contiguous()?, conv::Conv2dBiasOp { cfg, relu })?);
    }
    let o = b.elem_count();
    let y = conv2d(x, w, cfg)?.broadcast_add(&b.reshape((1, o, 1, 1))?)?;
    Ok(if relu { relu_pt(&y)? } else { y })
}

/// Inference conv with a per-channel bias and optional activation fused into its output
/// pass (batch norm folded into `w` by the caller). No gradient.
/// With `residual`, it is added before the activation (a residual block's add fused in).
pub fn conv2d_epilogue(
    x: &Tensor,
    w: &Tensor,
    bias: Vec<f32>,
    act: Option<ActivationKind>,
    residual: Option<&Tensor>,
    cfg: ConvCfg,
) -> Result<Tensor> {
    conv2d_epilogue_packed(x, w, None, bias, act, residual, cfg)
}

/// [`conv2d_epilogue`] with `w` also packed for the kernel that takes the conv
/// ([`conv::PackedWeight::for_geo`]), as an eval plan keeps it.
pub fn conv2d_epilogue_packed(
    x: &Tensor,
    w: &Tensor,
    packed: Option<std::sync::Arc<conv::PackedWeight>>,
    bias: Vec<f32>,
    act: Option<ActivationKind>,
    residual: Option<&Tensor>,
    cfg: ConvCfg,
) -> Result<Tensor> {
    if fast(x) {
        let op = conv::Conv2dInferOp {
            cfg,
            epi: conv::Epilogue { bias, act },
            packed,
        };
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return Ok(match residual {
            Some(r) => x.apply_op3(&w, &r.contiguous()?, conv::Conv2dInferResOp(op))?,
            None => x.apply_op2(&w, op)?,
        });
    }
    let n = bias.len();
    let b = Tensor::from_vec(bias, (1, n, 1, 1), x.device())?;
    let mut y = conv2d(x, w, cfg)?.broadcast_add(&b)?;
    if let Some(r) = residual {
        y = (y + r)?;
    }
    match act {
        Some(k) => activation(&y, k),
        None => Ok(y),
    }
}

/// `x` clamped to `[lo, hi]` with PyTorch's gradient (`hardtanh_backward`: 1 strictly
/// inside, 0 on the bounds), which lopper's CPU kernel has too. candle's `clamp` passes
/// the gradient at the bounds, and values sit exactly on a bound all the time (the zeros a
/// previous clamp made): on another device that made MobileNetV2's gradients differ from
/// the CPU's by 10 % (`tests/device_parity.rs`). Values are exactly `clamp`'s:
/// `x·1 + 0` inside, `x·0 + bound` outside.
fn clamp(x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
    let inside = x
        .gt(lo as f64)?
        .mul(&x.lt(hi as f64)?)?
        .to_dtype(x.dtype())?;
    let bound = (x.le(lo as f64)?.to_dtype(x.dtype())? * lo as f64)?
        .add(&(x.ge(hi as f64)?.to_dtype(x.dtype())? * hi as f64)?)?;
    Ok(x.mul(&inside.detach())?.add(&bound.detach())?)
}

/// ReLU with PyTorch's gradient (0 at 0, as lopper's CPU kernels and fused ReLUs have it;
/// candle's `relu` passes the gradient at 0, where the zeros of a previous ReLU and of
/// all-zero conv windows sit).
fn relu_pt(x: &Tensor) -> Result<Tensor> {
    Ok(x.mul(&x.gt(0.0)?.to_dtype(x.dtype())?.detach())?)
}

/// An activation with its gradient: lopper's vectorised kernel on CPU, candle's ops on
/// other devices and as the reference, with the same gradients at every kink (the
/// PyTorch convention: the gradient of ReLU at 0 and of a clamp on its bounds is 0).
pub fn activation(x: &Tensor, kind: ActivationKind) -> Result<Tensor> {
    use ActivationKind as A;
    if fast(x) {
        return Ok(x.contiguous()?.apply_op1(act::ActOp(kind))?);
    }
    Ok(match kind {
        A::Relu => relu_pt(x)?,
        A::Relu6 => clamp(x, 0.0, 6.0)?,
        A::LeakyRelu { slope } => {
            let s = (x * slope as f64)?;
            if slope <= 1.0 {
                x.maximum(&s)?
            } else {
                x.minimum(&s)?
            }
        }
        A::Gelu => x.gelu_erf()?,
        A::Silu => x.silu()?,
        A::Sigmoid => candle_nn::ops::sigmoid(x)?,
        A::HardSigmoid => (clamp(&(x + 3.0)?, 0.0, 6.0)? / 6.0)?,
        A::HardSwish => x.mul(&(clamp(&(x + 3.0)?, 0.0, 6.0)? / 6.0)?)?,
        A::Tanh => x.tanh()?,
        A::HardSigmoidWith { alpha, beta } => {
            clamp(&x.affine(alpha as f64, beta as f64)?, 0.0, 1.0)?
        }
        A::Clip { lo, hi } => clamp(x, lo, hi)?,
        A::Elu { alpha } => elu(x, alpha as f64)?,
        A::Selu { alpha, gamma } => (elu(x, alpha as f64)? * gamma as f64)?,
        A::Softplus => softplus(x)?,
        A::Mish => x.mul(&softplus(x)?.tanh()?)?,
        A::GeluTanh => x.gelu()?,
    })
}

/// `x` where positive, `alpha·(eˣ − 1)` elsewhere (the exponential of the positive part
/// is never taken, so large inputs cannot overflow).
fn elu(x: &Tensor, alpha: f64) -> Result<Tensor> {
    let neg = x.minimum(0f32)?;
    Ok((x.relu()? + (neg.exp()? - 1.0)?.affine(alpha, 0.0)?)?)
}

/// `ln(1 + eˣ)` computed as `max(x, 0) + ln(1 + e^(−|x|))`, stable for large |x|.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Batch norm over axis 1 of `[N, C, ...]`, optionally fused with ReLU.
/// `running = Some((mean, var))` selects eval mode; otherwise batch statistics are used
/// and returned so the caller can update its running averages.
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running: Option<(&Tensor, &Tensor)>,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Option<BatchStats>)> {
    if fast(x) {
        let fixed = match running {
            Some((m, v)) => Some((m.to_vec1::<f32>()?, v.to_vec1::<f32>()?)),
            None => None,
        };
        let train = fixed.is_none();
        let stats = Arc::new(Mutex::new(None));
        let op = batchnorm::BatchNormOp {
            eps: eps as f32,
            relu,
            fixed,
            stats: stats.clone(),
        };
        let y = x.contiguous()?.apply_op3(gamma, beta, op)?;
        let st = if train {
            stats.lock().unwrap().clone()
        } else {
            None
        };
        return Ok((y, st));
    }
    let c = x.dim(1)?;
    let mut shape = vec![1usize; x.rank()];
    shape[1] = c;
    let axes: Vec<usize> = (0..x.rank()).filter(|&a| a != 1).collect();
    let (mean, var, stats) = match running {
        Some((m, v)) => (
            m.reshape(shape.as_slice())?,
            v.reshape(shape.as_slice())?,
            None,
        ),
        None => {
            let mean = x.mean_keepdim(axes.as_slice())?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(axes.as_slice())?;
            let count = x.elem_count() / c;
            let st = BatchStats {
                mean: Vec::new(),
                var: Vec::new(),
                count,
                on_device: Some((mean.flatten_all()?.detach(), var.flatten_all()?.detach())),
            };
            (mean, var, Some(st))
        }
    };
    let y = x
        .broadcast_sub(&mean)?
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape(shape.as_slice())?)?
        .broadcast_add(&beta.reshape(shape.as_slice())?)?;
    Ok((if relu { relu_pt(&y)? } else { y }, stats))
}

/// Max or average pooling.
pub fn pool2d(x: &Tensor, cfg: PoolCfg, max: bool) -> Result<Tensor> {
    if fast(x) {
        return Ok(x.contiguous()?.apply_op1(pool::PoolOp { cfg, max })?);
    }
    let (n, c, h, w) = x.dims4()?;
    let (sh, sw) = (cfg.stride[0], cfg.stride[1]);
    if cfg.kernel == [1, 1] && cfg.padding == [0; 4] && h % sh == 0 && w % sw == 0 {
        // Strided subsampling (ResNet option-A shortcut).
        return Ok(x
            .reshape((n, c, h / sh, sh, w / sw, sw))?
            .narrow(3, 0, 1)?
            .narrow(5, 0, 1)?
            .reshape((n, c, h / sh, w / sw))?);
    }
    // Not candle's max_pool2d: its gradient is 0.25x for 2x2 windows (pool_ref.rs).
    pool_ref::pool2d(x, &cfg, max)
}

/// `relu(a + b)` for equal shapes.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fast(a) && a.dims() == b.dims() {
        return Ok(a
            .contiguous()?
            .apply_op2(&b.contiguous()?, eltwise::AddReluOp)?);
    }
    relu_pt(&a.broadcast_add(b)?)
}

/// Inference `f(x·Wᵀ + b)` with the activation in the output pass (no gradient).
pub fn linear_act(x: &Tensor, w: &Tensor, b: &Tensor, act: ActivationKind) -> Result<Tensor> {
    if fast(x) {
        return Ok(x.contiguous()?.apply_op3(
            &w.contiguous()?,
            b,
            linear::LinearOp {
                act: Some(act),
                packed: None,
            },
        )?);
    }
    activation(&linear(x, w, Some(b))?, act)
}

/// Inference linear layer `act(x·wᵀ + b)` with `w` also packed for the register-tile
/// panels ([`panel::pack_cols`]), as an eval plan keeps it. No gradient.
pub fn linear_packed(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Option<ActivationKind>,
    packed: Option<Arc<Vec<f32>>>,
) -> Result<Tensor> {
    if fast(x) {
        let zeros;
        let b = match b {
            Some(b) => b,
            None => {
                zeros = Tensor::zeros(w.dim(0)?, DType::F32, x.device())?;
                &zeros
            }
        };
        let op = linear::LinearOp { act, packed };
        return Ok(x.contiguous()?.apply_op3(&w.contiguous()?, b, op)?);
    }
    let y = linear(x, w, b)?;
    match act {
        Some(k) => activation(&y, k),
        None => Ok(y),
    }
}

/// Global average pooling `[N, C, H, W] -> [N, C, 1, 1]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    if fast(x) && x.rank() == 4 {
        return Ok(x.contiguous()?.apply_op1(channel::GlobalAvgPoolOp)?);
    }
    Ok(x.flatten_from(2)?
        .mean_keepdim(D::Minus1)?
        .unsqueeze(D::Minus1)?)
}

/// `a · b` with broadcasting; a `[N, C, H, W]` tensor times a `[N, C, 1, 1]` gate (either
/// order) runs on the per-channel kernel.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let gate = |x: &Tensor, s: &Tensor| {
        x.rank() == 4 && s.dims() == [x.dim(0).unwrap_or(0), x.dim(1).unwrap_or(0), 1, 1]
    };
    if fast(a) && b.dtype() == a.dtype() {
        if gate(a, b) {
            return Ok(a
                .contiguous()?
                .apply_op2(&b.contiguous()?, channel::ChannelScaleOp)?);
        }
        if gate(b, a) {
            return Ok(b
                .contiguous()?
                .apply_op2(&a.contiguous()?, channel::ChannelScaleOp)?);
        }
    }
    Ok(a.broadcast_mul(b)?)
}

/// `x·Wᵀ + b` for `x: [N, in]`, `W: [out, in]`, optional `b: [out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if fast(x) {
        if let Some(b) = b {
            return Ok(x.contiguous()?.apply_op3(
                &w.contiguous()?,
                b,
                linear::LinearOp {
                    act: None,
                    packed: None,
                },
            )?);
        }
    }
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// LayerNorm (`rms` false) or RMSNorm on lopper's kernel.
fn fused_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64, rms: bool) -> Result<Tensor> {
    let op = layer_norm::LayerNormOp {
        eps: eps as f32,
        rms,
    };
    Ok(x.contiguous()?.apply_op3(gamma, beta, op)?)
}

/// RMSNorm across channels (axis 1): `x / √(mean_c x² + ε) · γ + β` (the layer-norm
/// kernel without centring; composed candle ops on the reference path).
pub fn rms_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if fast(x) {
        return fused_norm(x, gamma, beta, eps, true);
    }
    let mut shape = vec![1usize; x.rank()];
    shape[1] = x.dim(1)?;
    let ms = x.sqr()?.mean_keepdim(1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(&gamma.reshape(shape.as_slice())?)?
        .broadcast_add(&beta.reshape(shape.as_slice())?)?)
}

/// LayerNorm across channels (axis 1 of `[N, C, P…]`) at every position, `y = x̂·γ + β`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if fast(x) {
        return fused_norm(x, gamma, beta, eps, false);
    }
    let mut shape = vec![1usize; x.rank()];
    shape[1] = x.dim(1)?;
    let mean = x.mean_keepdim(1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(&gamma.reshape(shape.as_slice())?)?
        .broadcast_add(&beta.reshape(shape.as_slice())?)?)
}

/// [`attention`] with a key mask `[N, T…]` (1 keep, 0 masked): masked keys' logits get
/// −10⁹ before the softmax (exactly zero weight in f32); no gradient reaches the mask.
pub fn attention_masked(
    x: &Tensor,
    mask: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
) -> Result<Tensor> {
    attention_with(x, Some(mask), heads, kv_heads, head_dim, scale)
}

/// Multi-head self-attention on stacked q/k/v channels `[N, (H + 2G)·d, T…]` →
/// `[N, H·d, T…]` (per query head `O = V·softmax(scale·QᵀK)ᵀ`, softmax over keys; query
/// head `h` reads key/value head `h / (H/G)`: `G = H` is plain multi-head attention,
/// fewer is grouped-query attention).
pub fn attention(
    x: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
) -> Result<Tensor> {
    attention_with(x, None, heads, kv_heads, head_dim, scale)
}

fn attention_with(
    x: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, t) = (dims[0], dims[2..].iter().product::<usize>());
    let mut out = dims.clone();
    out[1] = heads * head_dim;
    if kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || dims[1] != (heads + 2 * kv_heads) * head_dim
    {
        bail!(
            "attention: {} input channels for {heads} query and {kv_heads} key/value heads of {head_dim}",
            dims[1]
        );
    }
    if fast(x) {
        let op = attention::AttentionOp {
            heads,
            kv_heads,
            head_dim,
            scale: scale as f32,
        };
        let x3 = x.contiguous()?.reshape((n, dims[1], t))?;
        let y = match mask {
            Some(m) => {
                let m = m.detach().contiguous()?.reshape((n, t))?;
                x3.apply_op2(&m, attention::MaskedAttentionOp(op))?
            }
            None => x3.apply_op1(op)?,
        };
        return Ok(y.reshape(out)?);
    }
    let x = x.contiguous()?.reshape((n, dims[1], t))?;
    let (e, kvw) = (heads * head_dim, kv_heads * head_dim);
    // [N, H, T, d] queries; [N, H, d, T] keys and values (each kv head repeated for its
    // query heads).
    let q = x
        .narrow(1, 0, e)?
        .reshape((n, heads, head_dim, t))?
        .transpose(2, 3)?
        .contiguous()?;
    let per_q = |start: usize| -> Result<Tensor> {
        let part = x
            .narrow(1, start, kvw)?
            .reshape((n, kv_heads, head_dim, t))?;
        if kv_heads == heads {
            return Ok(part.contiguous()?);
        }
        let r = heads / kv_heads;
        let idx: Vec<u32> = (0..heads).map(|h| (h / r) as u32).collect();
        let idx = Tensor::from_vec(idx, heads, x.device())?;
        Ok(part.contiguous()?.index_select(&idx, 1)?)
    };
    let (k, v) = (per_q(e)?, per_q(e + kvw)?);
    let mut logits = (q.matmul(&k)? * scale)?;
    if let Some(m) = mask {
        let bias = ((m.detach().reshape((n, 1, 1, t))? - 1.0)? * 1e9)?;
        logits = logits.broadcast_add(&bias)?;
    }
    // (candle_nn's `softmax_last_dim` has no backward: the composed form has.)
    let attn = candle_nn::ops::softmax(&logits, D::Minus1)?;
    // O[d, t] = Σ_s V[d, s]·A[t, s].
    let o = v.matmul(&attn.transpose(2, 3)?.contiguous()?)?;
    Ok(o.reshape(out)?)
}
