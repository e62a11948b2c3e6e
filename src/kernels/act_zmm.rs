//! The activations built on the exponential (sigmoid, SiLU, tanh, both GELUs) in AVX-512
//! registers.
//!
//! The scalar forms in [`super::act`] vectorise, but as the compiler writes them: a
//! `vdivps` for each `1 / (1 + e)` and integer shifts to build `2ⁿ`. On an AMD EPYC
//! (Zen 5) that ran SiLU at 4.3–4.5 G values/s on one core, a seventh of
//! EfficientNet-B0's batch-1 time. Here the reciprocal is `vrcp14ps` with one Newton step
//! (relative error ≲ 2⁻²³, as the division's rounding) and `2ⁿ` is `vscalefps`; the
//! polynomial is the same Cephes `expf` as the scalar form.
//!
//! A NaN input gives NaN, ±∞ the limits, as the scalar forms do.

#[cfg(target_arch = "x86_64")]
use crate::graph::ops::ActivationKind as A;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether kind `k` has a body here (the rest are cheap or rare: the scalar loops).
#[cfg(target_arch = "x86_64")]
pub(super) fn covers(k: A) -> bool {
    matches!(k, A::Silu | A::Sigmoid | A::Tanh | A::Gelu | A::GeluTanh)
}

/// `eˣ` over the clamped range of [`super::act::exp`]: `2ᵗ` for `t = x·log₂e`, split
/// into `n + f` (`|f| ≤ ½`) by `vroundscaleps`/`vreduceps`, `2ᶠ` by its Taylor series to
/// degree 6 (error ≤ 1.2e-7 relative), `2ⁿ` by `vscalefps`. Rounding `t` costs
/// `|t|·2⁻²⁴` relative: ≤ 1e-6 for |x| ≤ 10.
///
/// # Safety
/// AVX-512F and DQ (inlined into such code only).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe { exp2_16(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E))) }
}

/// `2ᵗ` (see [`exp16`]); `t` clamped to the range of `eˣ` there.
///
/// # Safety
/// AVX-512F and DQ.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp2_16(t: __m512) -> __m512 {
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    // SAFETY: the caller's contract.
    unsafe {
        // Bound first, value second: a NaN passes through.
        let t = _mm512_min_ps(
            _mm512_set1_ps(127.388),
            _mm512_max_ps(_mm512_set1_ps(-126.0), t),
        );
        let n = _mm512_roundscale_ps::<NEAREST>(t);
        let f = _mm512_reduce_ps::<NEAREST>(t);
        let c = |v: f32| _mm512_set1_ps(v);
        let mut p = _mm512_fmadd_ps(c(1.540_353_e-4), f, c(1.333_355_8e-3));
        p = _mm512_fmadd_ps(p, f, c(9.618_129e-3));
        p = _mm512_fmadd_ps(p, f, c(5.550_411e-2));
        p = _mm512_fmadd_ps(p, f, c(0.240_226_5));
        p = _mm512_fmadd_ps(p, f, c(std::f32::consts::LN_2));
        p = _mm512_fmadd_ps(p, f, c(1.0));
        _mm512_scalef_ps(p, n)
    }
}

/// `1 / d` for `d ≥ 1` (finite): `vrcp14ps` and one Newton step.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn recip16(d: __m512) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe {
        let r = _mm512_rcp14_ps(d);
        _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
    }
}

/// `1 / (1 + e⁻ˣ)`.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sigmoid16(x: __m512) -> __m512 {
    // SAFETY: the caller's contract. `e⁻ˣ ≤ e^87.34`: the sum stays finite.
    unsafe {
        let e = exp2_16(_mm512_mul_ps(x, _mm512_set1_ps(-std::f32::consts::LOG2_E)));
        recip16(_mm512_add_ps(e, _mm512_set1_ps(1.0)))
    }
}

/// `erf(x)` as [`super::act`]'s (Abramowitz & Stegun 7.1.26).
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn erf16(x: __m512) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe {
        let sign = _mm512_set1_ps(-0.0);
        let c = |v: f32| _mm512_set1_ps(v);
        // |x| bounded (erf(10) is 1 in f32) so that the reciprocal's argument is finite;
        // a NaN passes through.
        let a = _mm512_min_ps(c(10.0), _mm512_andnot_ps(sign, x));
        let t = recip16(_mm512_fmadd_ps(c(0.327_591_1), a, c(1.0)));
        let mut p = _mm512_fmadd_ps(c(1.061_405_4), t, c(-1.453_152_1));
        p = _mm512_fmadd_ps(p, t, c(1.421_413_8));
        p = _mm512_fmadd_ps(p, t, c(-0.284_496_74));
        p = _mm512_fmadd_ps(p, t, c(0.254_829_6));
        p = _mm512_mul_ps(p, t);
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
        let y = _mm512_fnmadd_ps(p, e, c(1.0));
        // copysign(y, x)
        _mm512_or_ps(_mm512_andnot_ps(sign, y), _mm512_and_ps(sign, x))
    }
}

/// `row[i] = f(row[i] + b + res[i])` for a kind [`covers`] (`res` optional; when given,
/// at least as long as `row`).
///
/// # Safety
/// AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,fma")]
pub(super) unsafe fn bias_act(row: &mut [f32], b: f32, res: Option<&[f32]>, k: A) {
    // SAFETY: the caller's contract; every access is inside `row` (and `res`), the last
    // vector masked.
    unsafe {
        match k {
            A::Silu => run(row, b, res, |x| _mm512_mul_ps(x, sigmoid16(x))),
            A::Sigmoid => run(row, b, res, |x| sigmoid16(x)),
            A::Tanh => run(row, b, res, |x| {
                let two = _mm512_set1_ps(2.0);
                let s = sigmoid16(_mm512_mul_ps(two, x));
                _mm512_fmsub_ps(two, s, _mm512_set1_ps(1.0))
            }),
            A::Gelu => run(row, b, res, |x| {
                let half_x = _mm512_mul_ps(_mm512_set1_ps(0.5), x);
                let e = erf16(_mm512_mul_ps(
                    x,
                    _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
                ));
                _mm512_fmadd_ps(half_x, e, half_x)
            }),
            A::GeluTanh => run(row, b, res, |x| {
                // ½x(1 + tanh(u)) = x·σ(2u), u = c(x + 0.044715x³).
                let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
                let u = _mm512_fmadd_ps(_mm512_set1_ps(0.044_715), x3, x);
                let s = sigmoid16(_mm512_mul_ps(_mm512_set1_ps(2.0 * 0.797_884_6), u));
                _mm512_mul_ps(x, s)
            }),
            _ => unreachable!("act_zmm::bias_act on a kind it does not cover"),
        }
    }
}

/// The loop of [`bias_act`] for one kind's body `f`: 16 values at a time, the tail masked.
///
/// # Safety
/// As [`bias_act`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn run(row: &mut [f32], b: f32, res: Option<&[f32]>, f: impl Fn(__m512) -> __m512) {
    assert!(res.is_none_or(|r| r.len() >= row.len()));
    let n = row.len();
    let p = row.as_mut_ptr();
    // SAFETY: `i + 16 ≤ n` in the loop, the tail's lanes masked to `n − i`.
    unsafe {
        let bv = _mm512_set1_ps(b);
        let mut i = 0;
        while i < n {
            let m: u16 = if n - i >= 16 {
                u16::MAX
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            let mut x = _mm512_add_ps(super::simd::load16(p.add(i), m), bv);
            if let Some(r) = res {
                x = _mm512_add_ps(x, super::simd::load16(r.as_ptr().add(i), m));
            }
            super::simd::store16(p.add(i), m, f(x));
            i += 16;
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::act::value;

    /// Every covered kind against the scalar form over [−100, 100] (plus the bias and
    /// residual), at lengths that end mid-vector; NaN stays NaN, ±∞ give the limits.
    #[test]
    fn matches_scalar_forms() {
        if !std::arch::is_x86_feature_detected!("avx512dq") {
            return;
        }
        let kinds = [A::Silu, A::Sigmoid, A::Tanh, A::Gelu, A::GeluTanh];
        let xs: Vec<f32> = (0..40_001).map(|i| i as f32 * 0.005 - 100.0).collect();
        let res: Vec<f32> = (0..xs.len()).map(|i| (i % 7) as f32 * 0.01).collect();
        for k in kinds {
            for (len, b, with_res) in [(xs.len(), 0.0, false), (37, 0.25, true), (16, -1.0, true)] {
                let mut row = xs[..len].to_vec();
                let r = with_res.then(|| &res[..len]);
                // SAFETY: AVX-512 F and DQ checked above.
                unsafe { bias_act(&mut row, b, r, k) };
                for (i, &y) in row.iter().enumerate() {
                    let x = xs[i] + b + r.map_or(0.0, |r| r[i]);
                    let want = value(k, x);
                    let tol = 2e-7 + 1e-5 * want.abs();
                    assert!((y - want).abs() <= tol, "{k:?}({x}) = {y}, scalar {want}");
                }
            }
            let mut special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
            // SAFETY: as above.
            unsafe { bias_act(&mut special, 0.0, None, k) };
            assert!(special[0].is_nan(), "{k:?}(NaN) = {}", special[0]);
            let lim = |x: f32| match k {
                A::Sigmoid => (x > 0.0) as u8 as f32,
                A::Tanh => x.signum(),
                _ => x.max(0.0),
            };
            assert_eq!(special[1], lim(f32::INFINITY), "{k:?}(+inf)");
            if k != A::Silu && k != A::Gelu && k != A::GeluTanh {
                // σ(−∞) is 2⁻¹²⁷-ish, as in the scalar form (a denormal, not 0).
                let y = special[2];
                assert!(
                    (y - lim(f32::NEG_INFINITY)).abs() < 1e-30,
                    "{k:?}(-inf) = {y}"
                );
            }
        }
    }
}
