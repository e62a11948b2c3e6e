//! Residual `relu(a + b)` fused into one pass, with its backward.

use super::cpu::{ce, slice, tensor, with_f32};
use super::simd::multiversion;
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
        // SAFETY: the loop below stores every element.
        let mut out = unsafe { super::cpu::unfilled(a.len()) };
        super::par::chunks_mut(&mut out[..], CHUNK, |i, o| {
            let r = i * CHUNK..i * CHUNK + o.len();
            add_relu(o, &a[r.clone()], &b[r])
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
                .for_each(|(d, (y, g))| relu_mask(d, y, g));
            d
        })
    })
    .and_then(|r| r)
    .map_err(ce)?;
    tensor(d, y.dims())
}

multiversion! {
    /// `o = max(a + b, 0)`, compiled per ISA (in baseline x86-64 code the residual adds
    /// and their gradients were 4-wide SSE loops: a fifth of ResNet-20's training step).
    fn add_relu(o: &mut [f32], a: &[f32], b: &[f32]) {
        for (o, (&a, &b)) in o.iter_mut().zip(a.iter().zip(b)) {
            *o = (a + b).max(0.0);
        }
    }
}

multiversion! {
    /// `d = g` where `y > 0`, else 0.
    fn relu_mask(d: &mut [f32], y: &[f32], g: &[f32]) {
        for (d, (&y, &g)) in d.iter_mut().zip(y.iter().zip(g)) {
            *d = if y > 0.0 { g } else { 0.0 };
        }
    }
}
