//! Hot CPU kernels as candle custom ops (forward + backward), and the dispatch that makes
//! them the default on CPU. On other devices (CUDA behind the `cuda` feature), or when the
//! reference backend is selected, the same functions run candle's own ops instead, which
//! is also what the kernel tests compare against.

pub mod batchnorm;
pub mod conv;
pub mod cpu;
pub mod csr;
mod depthwise;
pub mod eltwise;
pub mod gemm;
pub mod im2col;
pub mod linear;
pub mod pool;
pub mod sparse;

pub use batchnorm::BatchStats;
pub use conv::ConvCfg;
pub use pool::PoolCfg;

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

/// Inference conv with a per-channel bias and optional ReLU fused into its output pass
/// (batch norm folded into `w` by the caller). No gradient.
/// With `residual`, it is added before the ReLU (a residual block's add fused in).
pub fn conv2d_bias_relu(
    x: &Tensor,
    w: &Tensor,
    bias: Vec<f32>,
    relu: bool,
    residual: Option<&Tensor>,
    cfg: ConvCfg,
) -> Result<Tensor> {
    if fast(x) {
        let op = conv::Conv2dInferOp {
            cfg,
            epi: conv::Epilogue { bias, relu },
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
    Ok(if relu { y.relu()? } else { y })
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
                mean: mean.flatten_all()?.to_vec1()?,
                var: var.flatten_all()?.to_vec1()?,
                count,
            };
            (mean, var, Some(st))
        }
    };
    let y = x
        .broadcast_sub(&mean)?
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape(shape.as_slice())?)?
        .broadcast_add(&beta.reshape(shape.as_slice())?)?;
    Ok((if relu { y.relu()? } else { y }, stats))
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
    let plain = cfg.padding == [0; 4] && !cfg.ceil_mode && cfg.kernel == cfg.stride;
    if !plain {
        bail!("reference pooling supports only kernel == stride without padding");
    }
    let k = (cfg.kernel[0], cfg.kernel[1]);
    Ok(if max {
        x.max_pool2d(k)?
    } else {
        x.avg_pool2d(k)?
    })
}

/// `relu(a + b)` for equal shapes.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fast(a) && a.dims() == b.dims() {
        return Ok(a
            .contiguous()?
            .apply_op2(&b.contiguous()?, eltwise::AddReluOp)?);
    }
    Ok(a.broadcast_add(b)?.relu()?)
}

/// Global average pooling `[N, C, H, W] -> [N, C, 1, 1]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(2)?
        .mean_keepdim(D::Minus1)?
        .unsqueeze(D::Minus1)?)
}

/// `x·Wᵀ + b` for `x: [N, in]`, `W: [out, in]`, optional `b: [out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if fast(x) {
        if let Some(b) = b {
            return Ok(x
                .contiguous()?
                .apply_op3(&w.contiguous()?, b, linear::LinearOp)?);
        }
    }
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}
