//! Every activation of the IR as an element-wise kernel, forward and gradient, in
//! branch-free scalar forms that the compiler vectorises (for AVX-512, AVX2 and portable
//! code, see [`super::simd`]); the exponential is a polynomial (Cephes `expf`, ~1 ulp over
//! the clamped range), so sigmoid, SiLU, tanh, GELU and ELU vectorise too.
//!
//! The same functions are the epilogue of the fused conv and linear kernels (applied to a
//! row while it is still in cache) and the body of [`ActOp`], the stand-alone op with a
//! backward that training uses.

use super::cpu::{slice, tensor, with_f32};
use super::simd::multiversion;
use crate::graph::ops::ActivationKind as A;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

const LOG2E: f32 = std::f32::consts::LOG2_E;

/// `eˣ`, clamped to the normal range of f32 (Cephes' `expf` polynomial).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.3);
    // n = round(x·log2 e) with the 1.5·2²³ trick: the sum's low mantissa bits hold n, so
    // neither a library `floorf` nor a saturating conversion stops the loop vectorising.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let fx = t - MAGIC;
    let r = x - fx * 0.693_359_4 + fx * 2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    y * f32::from_bits((n.wrapping_add(127) as u32) << 23)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn tanh(x: f32) -> f32 {
    2.0 * sigmoid(2.0 * x) - 1.0
}

/// `erf(x)` (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - p * exp(-a * a)).copysign(x)
}

const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// √(2/π), the tanh-GELU constant.
const GELU_C: f32 = 0.797_884_6;

#[inline(always)]
fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Runs `$body` with `$f` bound to the forward of activation `$k` as a closure of its
/// own per kind, so each kind's loop is monomorphic (the match is outside the loop) and
/// vectorises.
macro_rules! forward_fn {
    ($k:expr, $f:ident => $body:expr) => {
        match $k {
            A::Relu => {
                let $f = |x: f32| x.max(0.0);
                $body
            }
            A::Relu6 => {
                let $f = |x: f32| x.clamp(0.0, 6.0);
                $body
            }
            A::Clip { lo, hi } => {
                let $f = |x: f32| x.max(lo).min(hi);
                $body
            }
            A::LeakyRelu { slope } => {
                let $f = |x: f32| if x > 0.0 { x } else { slope * x };
                $body
            }
            A::HardSigmoid => {
                let $f = |x: f32| ((x + 3.0) * (1.0 / 6.0)).clamp(0.0, 1.0);
                $body
            }
            A::HardSigmoidWith { alpha, beta } => {
                let $f = |x: f32| (alpha * x + beta).clamp(0.0, 1.0);
                $body
            }
            A::HardSwish => {
                let $f = |x: f32| x * ((x + 3.0) * (1.0 / 6.0)).clamp(0.0, 1.0);
                $body
            }
            A::Silu => {
                let $f = |x: f32| x * sigmoid(x);
                $body
            }
            A::Sigmoid => {
                let $f = sigmoid;
                $body
            }
            A::Tanh => {
                let $f = tanh;
                $body
            }
            A::Gelu => {
                let $f = |x: f32| 0.5 * x * (1.0 + erf(x * SQRT_HALF));
                $body
            }
            A::GeluTanh => {
                let $f = |x: f32| 0.5 * x * (1.0 + tanh(GELU_C * (x + 0.044_715 * x * x * x)));
                $body
            }
            A::Elu { alpha } => {
                let $f = |x: f32| {
                    if x > 0.0 {
                        x
                    } else {
                        alpha * (exp(x.min(0.0)) - 1.0)
                    }
                };
                $body
            }
            A::Selu { alpha, gamma } => {
                let $f = |x: f32| {
                    gamma
                        * if x > 0.0 {
                            x
                        } else {
                            alpha * (exp(x.min(0.0)) - 1.0)
                        }
                };
                $body
            }
            A::Softplus => {
                let $f = softplus;
                $body
            }
            A::Mish => {
                let $f = |x: f32| x * tanh(softplus(x));
                $body
            }
        }
    };
}

/// As [`forward_fn`], with `$d` bound to `(x, dy) ↦ f'(x)·dy`.
macro_rules! grad_fn {
    ($k:expr, $d:ident => $body:expr) => {
        match $k {
            A::Relu => {
                let $d = |x: f32, g: f32| if x > 0.0 { g } else { 0.0 };
                $body
            }
            A::Relu6 => {
                let $d = |x: f32, g: f32| if x > 0.0 && x < 6.0 { g } else { 0.0 };
                $body
            }
            A::Clip { lo, hi } => {
                let $d = |x: f32, g: f32| if x > lo && x < hi { g } else { 0.0 };
                $body
            }
            A::LeakyRelu { slope } => {
                let $d = |x: f32, g: f32| if x > 0.0 { g } else { slope * g };
                $body
            }
            A::HardSigmoid => {
                let $d = |x: f32, g: f32| {
                    if x > -3.0 && x < 3.0 {
                        g * (1.0 / 6.0)
                    } else {
                        0.0
                    }
                };
                $body
            }
            A::HardSigmoidWith { alpha, beta } => {
                let $d = |x: f32, g: f32| {
                    let u = alpha * x + beta;
                    if u > 0.0 && u < 1.0 {
                        alpha * g
                    } else {
                        0.0
                    }
                };
                $body
            }
            A::HardSwish => {
                let $d = |x: f32, g: f32| {
                    let mid = g * (2.0 * x + 3.0) * (1.0 / 6.0);
                    if x <= -3.0 {
                        0.0
                    } else if x >= 3.0 {
                        g
                    } else {
                        mid
                    }
                };
                $body
            }
            A::Silu => {
                let $d = |x: f32, g: f32| {
                    let s = sigmoid(x);
                    g * s * (1.0 + x * (1.0 - s))
                };
                $body
            }
            A::Sigmoid => {
                let $d = |x: f32, g: f32| {
                    let s = sigmoid(x);
                    g * s * (1.0 - s)
                };
                $body
            }
            A::Tanh => {
                let $d = |x: f32, g: f32| {
                    let t = tanh(x);
                    g * (1.0 - t * t)
                };
                $body
            }
            A::Gelu => {
                let $d = |x: f32, g: f32| {
                    let cdf = 0.5 * (1.0 + erf(x * SQRT_HALF));
                    let pdf = exp(-0.5 * x * x) * 0.398_942_3;
                    g * (cdf + x * pdf)
                };
                $body
            }
            A::GeluTanh => {
                let $d = |x: f32, g: f32| {
                    let t = tanh(GELU_C * (x + 0.044_715 * x * x * x));
                    let du = GELU_C * (1.0 + 3.0 * 0.044_715 * x * x);
                    g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
                };
                $body
            }
            A::Elu { alpha } => {
                let $d = |x: f32, g: f32| {
                    if x > 0.0 {
                        g
                    } else {
                        g * alpha * exp(x.min(0.0))
                    }
                };
                $body
            }
            A::Selu { alpha, gamma } => {
                let $d = |x: f32, g: f32| {
                    gamma
                        * if x > 0.0 {
                            g
                        } else {
                            g * alpha * exp(x.min(0.0))
                        }
                };
                $body
            }
            A::Softplus => {
                let $d = |x: f32, g: f32| g * sigmoid(x);
                $body
            }
            A::Mish => {
                let $d = |x: f32, g: f32| {
                    let t = tanh(softplus(x));
                    g * (t + x * (1.0 - t * t) * sigmoid(x))
                };
                $body
            }
        }
    };
}

/// `f(x)` for one value.
#[inline(always)]
pub fn value(k: A, x: f32) -> f32 {
    forward_fn!(k, f => f(x))
}

/// `f'(x)·dy` for one value.
#[inline(always)]
pub fn grad(k: A, x: f32, dy: f32) -> f32 {
    grad_fn!(k, d => d(x, dy))
}

/// `xs[i] = f(xs[i])`, dispatched on the instruction set.
pub fn apply(k: A, xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::act_zmm::covers(k) && super::simd::isa() == super::simd::Isa::Avx512 {
        // SAFETY: AVX-512 checked.
        unsafe { super::act_zmm::bias_act(xs, 0.0, None, k) };
        return;
    }
    apply_scalar(k, xs)
}

multiversion! {
    /// [`apply`] in the scalar forms the compiler vectorises (each kind's loop monomorphic).
    fn apply_scalar(k: A, xs: &mut [f32]) {
        forward_fn!(k, f => {
            for v in xs.iter_mut() {
                *v = f(*v);
            }
        })
    }
}

multiversion! {
    /// `dx[i] = f'(x[i])·dy[i]`.
    pub fn apply_grad(k: A, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        grad_fn!(k, d => {
            for ((o, &xv), &g) in dx.iter_mut().zip(x).zip(dy) {
                *o = d(xv, g);
            }
        })
    }
}

/// The epilogue of one output row: `row = f(row + b + res)` (`res` and `f` optional).
pub fn bias_act(row: &mut [f32], b: f32, res: Option<&[f32]>, k: Option<A>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = k.filter(|&k| super::act_zmm::covers(k)) {
        if super::simd::isa() == super::simd::Isa::Avx512 {
            // SAFETY: AVX-512 checked.
            unsafe { super::act_zmm::bias_act(row, b, res, k) };
            return;
        }
    }
    bias_act_scalar(row, b, res, k)
}

multiversion! {
    /// [`bias_act`] in the scalar forms the compiler vectorises.
    fn bias_act_scalar(row: &mut [f32], b: f32, res: Option<&[f32]>, k: Option<A>) {
        match (res, k) {
            (Some(r), None) => {
                for (v, &x) in row.iter_mut().zip(r) {
                    *v += b + x;
                }
            }
            (Some(r), Some(k)) => forward_fn!(k, f => {
                for (v, &x) in row.iter_mut().zip(r) {
                    *v = f(*v + b + x);
                }
            }),
            (None, None) => {
                for v in row.iter_mut() {
                    *v += b;
                }
            }
            (None, Some(k)) => forward_fn!(k, f => {
                for v in row.iter_mut() {
                    *v = f(*v + b);
                }
            }),
        }
    }
}

/// Elements per parallel task (large enough that the split costs nothing).
const CHUNK: usize = 1 << 14;

/// A stand-alone activation with its gradient (the unfused case and training).
pub struct ActOp(pub A);

impl CustomOp1 for ActOp {
    fn name(&self) -> &'static str {
        "lopper-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "activation input")?;
        let mut y = x.to_vec();
        super::par::chunks_mut(&mut y[..], CHUNK, |_, c| apply(self.0, c));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_f32(x, |xv| {
            with_f32(dy, |g| {
                let mut dx = vec![0f32; xv.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(xv.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                    .for_each(|(d, (xc, gc))| apply_grad(self.0, xc, gc, d));
                dx
            })
        })
        .and_then(|r| r)
        .map_err(super::cpu::ce)?;
        Ok(Some(tensor(dx, x.dims())?))
    }
}
