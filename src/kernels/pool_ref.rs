//! Pooling from candle's ops alone, with PyTorch's semantics and correct gradients: the
//! path every non-CPU device takes (and `--reference` on the CPU).
//!
//! candle's own `max_pool2d` handles only kernel = stride without padding, and its backward
//! is 0.25× the true gradient for 2×2 windows (shared/specs/kernels.md); a GPU training a
//! max-pooling network on it would learn wrong. Here each window tap is gathered with
//! `index_select` (padding, any stride, ceil mode), the taps are stacked on a new axis, and:
//! - max: the value at the first arg-max (a one-hot of `argmax`, detached), so the gradient
//!   goes to that one input — PyTorch's choice on ties, and lopper's CPU kernel's;
//! - average: the sum over the taps divided by the window's count (with or without the
//!   padding, `count_include_pad`).

use super::pool::PoolCfg;
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// Input row (or column) of tap `k` for every output position, with `None` in the padding.
fn taps(out: usize, len: usize, k: usize, stride: usize, pad: usize) -> Vec<Option<u32>> {
    (0..out)
        .map(|o| {
            let i = (o * stride + k) as isize - pad as isize;
            (i >= 0 && (i as usize) < len).then_some(i as u32)
        })
        .collect()
}

/// Max or average pooling of `x: [N, C, H, W]` by composed candle ops.
pub fn pool2d(x: &Tensor, cfg: &PoolCfg, max: bool) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let out = |len, k, s, a, b| {
        crate::graph::shape::window_out(len, k, s, a, b, 1, cfg.ceil_mode)
            .ok_or_else(|| anyhow::anyhow!("pool: kernel {k} too large for {len}"))
    };
    let [kh, kw] = cfg.kernel;
    let [sh, sw] = cfg.stride;
    let [pt, pl, pb, pr] = cfg.padding;
    let (oh, ow) = (out(h, kh, sh, pt, pb)?, out(w, kw, sw, pl, pr)?);
    let dev = x.device();
    // A zero row and column appended to the input stand for every padded position.
    let xp = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
    let (zero_row, zero_col) = (h as u32, w as u32);
    let mut values = Vec::with_capacity(kh * kw);
    let mut inside = Vec::with_capacity(kh * kw);
    for ky in 0..kh {
        let rows = taps(oh, h, ky, sh, pt);
        for kx in 0..kw {
            let cols = taps(ow, w, kx, sw, pl);
            let ri: Vec<u32> = rows.iter().map(|r| r.unwrap_or(zero_row)).collect();
            let ci: Vec<u32> = cols.iter().map(|q| q.unwrap_or(zero_col)).collect();
            let v = xp
                .index_select(&Tensor::new(ri.as_slice(), dev)?, 2)?
                .index_select(&Tensor::new(ci.as_slice(), dev)?, 3)?;
            values.push(v);
            // 1 where the tap is inside the image, per output position.
            let m: Vec<f32> = rows
                .iter()
                .flat_map(|r| {
                    cols.iter()
                        .map(move |q| (r.is_some() && q.is_some()) as u8 as f32)
                })
                .collect();
            inside.push(Tensor::from_vec(m, (oh, ow), dev)?);
        }
    }
    let v = Tensor::stack(&values, 4)?; // [N, C, OH, OW, K]
    let inside = Tensor::stack(&inside, 2)?; // [OH, OW, K]
    if max {
        // Padded taps never win: pushed far below any value (a window entirely in the
        // padding, possible only in ceil mode, yields that floor, as it yields -inf in
        // the CPU kernel).
        let floor = inside.affine(3.0e38, -3.0e38)?; // 0 inside, -3e38 outside
        let v = v.broadcast_add(&floor)?;
        let idx = v.detach().argmax_keepdim(D::Minus1)?; // [N, C, OH, OW, 1]
        let k = Tensor::arange(0u32, (kh * kw) as u32, dev)?;
        let onehot = idx.broadcast_eq(&k)?.to_dtype(DType::F32)?.detach();
        return Ok((v * onehot)?.sum(D::Minus1)?);
    }
    let count = if cfg.count_include_pad {
        // PyTorch: the window clipped to the padded extent (ceil mode's overhang excluded).
        let clip = |len: usize, o: usize, k: usize, s: usize, p: usize, pe: usize| {
            let start = (o * s) as isize - p as isize;
            let end = (start + k as isize).min((len + pe) as isize);
            (end - start) as f32
        };
        let m: Vec<f32> = (0..oh)
            .flat_map(|oy| {
                (0..ow).map(move |ox| clip(h, oy, kh, sh, pt, pb) * clip(w, ox, kw, sw, pl, pr))
            })
            .collect();
        Tensor::from_vec(m, (oh, ow), dev)?
    } else {
        inside.sum(D::Minus1)?
    };
    let count = count.maximum(1f32)?;
    Ok(v.sum(D::Minus1)?
        .broadcast_div(&count)?
        .reshape((n, c, oh, ow))?)
}
