//! Fully connected layer `y = x·Wᵀ + b` as one custom op over `(x, W, b)`: the GEMMs read
//! the PyTorch `[out, in]` weight layout directly, so neither direction materialises a
//! transposed copy, and the bias is fused into the output pass (forward) and a column
//! sum (backward).

use super::act;
use super::cpu::{ce, slice, tensor, with_f32};
use super::gemm::{sgemm, Mat};
use crate::graph::ops::ActivationKind;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `y = f(x·Wᵀ + b)`; `act` (inference only: no gradient through it) is applied to each
/// output row in the same pass.
pub struct LinearOp {
    pub act: Option<ActivationKind>,
}

fn dims(x: &[usize], w: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    if x.len() != 2 || w.len() != 2 || x[1] != w[1] {
        candle_core::bail!("linear: input {x:?} does not match weight {w:?}");
    }
    Ok((x[0], w[1], w[0]))
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "lopper-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "linear input")?;
        let w = slice(s2, l2, "linear weight")?;
        let b = slice(s3, l3, "linear bias")?;
        let (n, i, o) = dims(l1.dims(), l2.dims())?;
        if b.len() != o {
            candle_core::bail!("linear: bias has {} values for {o} outputs", b.len());
        }
        let mut y = vec![0f32; n * o];
        y.par_chunks_mut(o.max(1))
            .for_each(|r| r.copy_from_slice(b));
        sgemm(n, o, i, &mut y, Mat::rm(x, i), Mat::rm_t(w, i), true, true);
        if let Some(k) = self.act {
            y.par_chunks_mut(o.max(1)).for_each(|r| act::apply(k, r));
        }
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.act.is_some() {
            candle_core::bail!("linear with a fused activation is inference-only");
        }
        let (n, i, o) = dims(x.dims(), w.dims())?;
        let r = with_f32(grad, |dy| {
            with_f32(w, |wv| {
                with_f32(x, |xv| {
                    let dx = x.track_op().then(|| {
                        let mut dx = vec![0f32; n * i];
                        sgemm(
                            n,
                            i,
                            o,
                            &mut dx,
                            Mat::rm(dy, o),
                            Mat::rm(wv, i),
                            false,
                            true,
                        );
                        dx
                    });
                    let mut dw = vec![0f32; o * i];
                    sgemm(
                        o,
                        i,
                        n,
                        &mut dw,
                        Mat::rm_t(dy, o),
                        Mat::rm(xv, i),
                        false,
                        true,
                    );
                    let mut db = vec![0f32; o];
                    for row in dy.chunks(o.max(1)) {
                        db.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                    }
                    (dx, dw, db)
                })
            })
        })
        .and_then(|r| r)
        .and_then(|r| r)
        .map_err(ce)?;
        let (dx, dw, db) = r;
        Ok((
            dx.map(|v| tensor(v, &[n, i])).transpose()?,
            Some(tensor(dw, &[o, i])?),
            Some(tensor(db, &[o])?),
        ))
    }
}
