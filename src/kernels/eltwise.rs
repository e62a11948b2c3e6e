//! Residual `relu(a + b)` fused into one pass, with its backward.

use super::cpu::{ce, slice, tensor, with_f32};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "lopper-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1, "add input")?;
        let b = slice(s2, l2, "add input")?;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "add-relu: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for i in 0..o.len() {
                    o[i] = (a[i] + b[i]).max(0.0);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = relu_grad(res, grad)?;
        let t = g.reshape(a.dims())?;
        Ok((Some(t.clone()), Some(t)))
    }
}

/// The gradient through a ReLU from its output: `dy` where `y > 0`, else 0 (PyTorch's
/// `threshold_backward`). Shared by every op with a fused ReLU (add, a training conv).
pub(crate) fn relu_grad(y: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    let d = with_f32(y, |y| {
        with_f32(dy, |g| {
            // SAFETY: the loop below stores every element.
            let mut d = unsafe { super::cpu::unfilled(g.len()) };
            d.par_chunks_mut(CHUNK)
                .zip(y.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(d, (y, g))| {
                    for i in 0..d.len() {
                        d[i] = if y[i] > 0.0 { g[i] } else { 0.0 };
                    }
                });
            d
        })
    })
    .and_then(|r| r)
    .map_err(ce)?;
    tensor(d, y.dims())
}
