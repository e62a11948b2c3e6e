//! One image of a 1×1 conv (stride 1, no padding) with sparse weights, the weights and
//! their per-non-zero input offsets held: the sparse convs of a fused inverted-residual
//! step ([`super::pw_dw`]).
//!
//! Node by node, a 90 % sparse expansion of MobileNetV2 (CIFAR) at batch 64 writes its
//! 37.7 MB output to memory and the depthwise conv reads it back: with a tenth of the
//! multiply-adds left, the sparse model's depthwise convs took more time than its 1×1
//! convs (15 ms of a 28 ms pass, against 6 ms in the dense model whose expansions run
//! fused). Run per image inside the fused step, the expanded tensor stays in the core's
//! L2. The tiles are [`super::sparse`]'s flattened-position kernel (AVX-512); elsewhere a
//! row-wise SpMM and the epilogue.

use super::csr::CsrKernels;
use super::sparse::{epilogue, SparseEpilogue};
use crate::graph::csr::CsrMatrix;
use crate::graph::ops::ActivationKind;
use std::mem::MaybeUninit;

/// A sparse 1×1 conv for one image of `c` channels of `p` positions.
#[derive(Debug)]
pub struct SparsePointwise {
    csr: CsrMatrix,
    /// Per non-zero, its input plane's offset (`channel · p`).
    offs: Vec<u32>,
    p: usize,
    bias: Vec<f32>,
    act: Option<ActivationKind>,
    /// The flattened-position tiles apply (AVX-512).
    flat: bool,
}

impl SparsePointwise {
    /// The conv `out[o] = act(scale[o] · Σ w·x + bias[o] [+ res])` of weight `csr`
    /// (`O × C`) on maps of `p` positions.
    pub fn new(
        csr: CsrMatrix,
        p: usize,
        scale: Option<&[f32]>,
        bias: &[f32],
        act: Option<ActivationKind>,
    ) -> SparsePointwise {
        assert!(p > 0 && bias.len() == csr.rows && scale.is_none_or(|s| s.len() == csr.rows));
        assert!(
            csr.cols * p <= u32::MAX as usize,
            "sparse 1x1 conv: image too large"
        );
        let offs = csr.col_idx.iter().map(|&c| c * p as u32).collect();
        // The scale folded into the values: the tiles' sums then start at the bias.
        let mut csr = csr;
        if let Some(s) = scale {
            csr.scale_rows(s);
        }
        let g = super::im2col::Geo::pointwise(1, csr.cols, 1, p, csr.rows);
        SparsePointwise {
            flat: super::sparse::flat_ok(&g),
            csr,
            offs,
            p,
            bias: bias.to_vec(),
            act,
        }
    }

    /// One image: `x` `[C, P]`, `out` `[O, P]` (every element written), `res` as `out`.
    pub fn run(&self, x: &[f32], out: &mut [f32], res: Option<&[f32]>) {
        let (c, o, p) = (self.csr.cols, self.csr.rows, self.p);
        assert!(
            x.len() >= c * p && out.len() == o * p,
            "sparse 1x1 conv: buffer sizes"
        );
        assert!(res.is_none_or(|r| r.len() == out.len()));
        let epi = SparseEpilogue {
            scale: None,
            bias: Some(&self.bias),
            act: self.act,
        };
        #[cfg(target_arch = "x86_64")]
        if self.flat {
            let ((lo, hi), after) = super::planes::clamp_split(self.act);
            let f = super::sparse::Flat {
                csr: &self.csr,
                offs: &self.offs,
                x: &x[..c * p],
                p,
                scale: epi.scale,
                bias: epi.bias,
                lo,
                hi,
            };
            // SAFETY: `flat` holds only with AVX-512; every offset is `channel · P` with
            // channel < C, so each load lies in `x[..C·P]`; `out` and `res` hold the `O`
            // channels of `P`.
            unsafe {
                let out_u = &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]);
                super::sparse::flat_zmm(&f, 0, out_u, res);
            }
            if let Some(k) = after {
                super::act::apply(k, out);
            }
            return;
        }
        self.csr.spmm(&x[..c * p], p, out);
        epilogue(&epi, out, p, res);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the dense product with scale, bias, residual and each kind of activation
    /// (clamped at the store, or applied after), on maps off the vector width.
    #[test]
    fn matches_the_dense_product() {
        let (c, o) = (13, 21);
        for p in [1, 7, 16, 45, 130] {
            let w: Vec<f32> = (0..o * c)
                .map(|i| {
                    if i % 7 == 3 {
                        (i % 11) as f32 / 4.0 - 1.2
                    } else {
                        0.0
                    }
                })
                .collect();
            let x: Vec<f32> = (0..c * p)
                .map(|i| ((i * 29) % 23) as f32 / 7.0 - 1.5)
                .collect();
            let res: Vec<f32> = (0..o * p).map(|i| ((i * 13) % 5) as f32 - 2.0).collect();
            let scale: Vec<f32> = (0..o).map(|i| 0.5 + i as f32 / 10.0).collect();
            let bias: Vec<f32> = (0..o).map(|i| i as f32 / 8.0 - 1.0).collect();
            let csr = CsrMatrix::from_dense(&w, o, c).unwrap();
            for act in [
                None,
                Some(ActivationKind::Relu),
                Some(ActivationKind::Relu6),
                Some(ActivationKind::HardSwish),
            ] {
                for r in [None, Some(&res[..])] {
                    let k = SparsePointwise::new(csr.clone(), p, Some(&scale), &bias, act);
                    let mut out = vec![f32::NAN; o * p];
                    k.run(&x, &mut out, r);
                    for oc in 0..o {
                        for q in 0..p {
                            let s: f32 = (0..c).map(|k| w[oc * c + k] * x[k * p + q]).sum();
                            let mut y = s * scale[oc] + bias[oc] + r.map_or(0.0, |r| r[oc * p + q]);
                            if let Some(a) = act {
                                let mut v = [y];
                                crate::kernels::act::apply(a, &mut v);
                                y = v[0];
                            }
                            let got = out[oc * p + q];
                            assert!(
                                (got - y).abs() <= 1e-4 * (1.0 + y.abs()),
                                "p {p} {act:?} res {} [{oc}, {q}]: {got} vs {y}",
                                r.is_some()
                            );
                        }
                    }
                }
            }
        }
    }
}
