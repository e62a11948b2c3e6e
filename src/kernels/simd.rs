//! Which instruction set the element-wise and direct kernels run with, chosen once at run
//! time: AVX-512, AVX2+FMA, or portable code (the only path on other architectures). The
//! binary is built for generic x86-64, so the same executable is fast on every CPU the
//! project meets (AMD EPYC and Intel Xeon both have AVX-512; older or smaller x86 parts
//! have AVX2 at most) and still runs where neither exists.
//!
//! [`force`] (or `LOPPER_ISA=avx512|avx2|portable` at start-up) pins a lower level, so the
//! tests run the AVX2 and the portable paths on a machine that has AVX-512.

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable = 1,
    Avx2 = 2,
    Avx512 = 3,
}

/// 0: not decided yet.
static CHOSEN: AtomicU8 = AtomicU8::new(0);

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

fn parse(s: &str) -> Option<Isa> {
    match s.trim().to_ascii_lowercase().as_str() {
        "avx512" => Some(Isa::Avx512),
        "avx2" => Some(Isa::Avx2),
        "portable" => Some(Isa::Portable),
        _ => None,
    }
}

/// The level in use: the best this CPU has, lowered by `LOPPER_ISA` or [`force`].
/// Inlined (one relaxed load): kernels ask per row, and as a call it showed in profiles
/// (7 % of a stride-2 depthwise layer's padding copy).
#[inline(always)]
pub fn isa() -> Isa {
    match CHOSEN.load(Ordering::Relaxed) {
        3 => Isa::Avx512,
        2 => Isa::Avx2,
        1 => Isa::Portable,
        _ => choose(),
    }
}

/// The first call's choice of [`isa`].
#[cold]
#[inline(never)]
fn choose() -> Isa {
    let best = detect();
    let want = std::env::var("LOPPER_ISA").ok().and_then(|s| parse(&s));
    let isa = want.map_or(best, |w| w.min(best));
    CHOSEN.store(isa as u8, Ordering::Relaxed);
    isa
}

/// Pins the level (never above what the CPU has); `None` returns to the best available.
/// Process-wide: tests that force a level run their comparisons serially.
pub fn force(level: Option<Isa>) {
    let best = detect();
    CHOSEN.store(level.map_or(best, |l| l.min(best)) as u8, Ordering::Relaxed);
}

/// Defines `pub fn $name(args)` whose body is compiled three times — for AVX-512, for
/// AVX2+FMA and portable — and dispatched on [`isa`]. The body should be plain loops over
/// slices, which the compiler vectorises for each level.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            unsafe fn v4($($arg: $ty),*) {
                imp($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3($($arg: $ty),*) {
                imp($($arg),*)
            }
            match $crate::kernels::simd::isa() {
                // SAFETY: `isa()` never reports a level the CPU lacks.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::simd::Isa::Avx512 => unsafe { v4($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                $crate::kernels::simd::Isa::Avx2 => unsafe { v3($($arg),*) },
                _ => imp($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

/// Whether environment variable `var` is `0` (a kernel path turned off for A/B runs),
/// read once into `cell`.
pub fn env_off(cell: &'static std::sync::OnceLock<bool>, var: &str) -> bool {
    *cell.get_or_init(|| std::env::var(var).is_ok_and(|v| v == "0"))
}

/// Asks for the cache line holding `xs[at]` in L1 (no access is made; a no-op off x86-64
/// or past the slice).
#[inline(always)]
pub(crate) fn prefetch(xs: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < xs.len() {
        // SAFETY: a prefetch of an address inside the slice; it reads nothing.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                xs.as_ptr().add(at) as *const i8,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (xs, at);
}

/// A masked 16-float store, plain where every lane is stored: on the AMD EPYC (Zen 5) a
/// masked 512-bit store of a full vector is several times slower than a plain one (a 1×1
/// conv writing 38 MB: 3.12 ms with every store masked, 1.82 with full vectors stored
/// plainly). Call it from AVX-512 code only (it is inlined there).
///
/// # Safety
/// The lanes of `m` at `p` writable; AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store16(p: *mut f32, m: u16, v: std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        if m == u16::MAX {
            _mm512_storeu_ps(p, v)
        } else {
            _mm512_mask_storeu_ps(p, m, v)
        }
    }
}

/// A masked 16-float load (zeros in the other lanes), plain where every lane is loaded.
///
/// # Safety
/// The lanes of `m` at `p` readable; AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn load16(p: *const f32, m: u16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        if m == u16::MAX {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(m, p)
        }
    }
}

/// The AVX2 mask of the first `n ≤ 8` lanes, for `maskload`/`maskstore`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn first8(n: usize) -> std::arch::x86_64::__m256i {
    const ONES: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    // SAFETY: 8 lanes from index 8 − n ≤ 8 of the 16-entry table.
    unsafe { std::arch::x86_64::_mm256_loadu_si256(ONES[8 - n.min(8)..].as_ptr().cast()) }
}

/// [`store16`] for 8-float vectors: the first `n` lanes, plain where all 8 are stored.
///
/// # Safety
/// `p..p + n` writable; AVX2 present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store8(p: *mut f32, n: usize, v: std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        if n >= 8 {
            _mm256_storeu_ps(p, v)
        } else {
            _mm256_maskstore_ps(p, first8(n), v)
        }
    }
}

/// [`load16`] for 8-float vectors: the first `n` lanes (zeros in the others).
///
/// # Safety
/// `p..p + n` readable; AVX2 present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn load8(p: *const f32, n: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        if n >= 8 {
            _mm256_loadu_ps(p)
        } else {
            _mm256_maskload_ps(p, first8(n))
        }
    }
}
