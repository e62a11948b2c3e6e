//! Shared machinery of the direct convolutions that read zero-padded input planes
//! (depthwise convs, and dense convs with few input channels): the stride-phase padded
//! layout, a per-thread padded buffer whose border is zeroed once per geometry, and the
//! register-tile kernels (explicit AVX-512/AVX2 vectors, a portable fallback).
//!
//! A padded plane is split into stride phases (for stride s, padded columns q, q + s,
//! q + 2s, … side by side), so that every filter tap reads one contiguous run at any
//! stride and padding, including asymmetric padding. An output vector is a sum of taps,
//! each a broadcast weight times one unaligned load, accumulated in a register.

use super::im2col::Geo;
use super::simd::{multiversion, Isa};
use crate::graph::ops::ActivationKind;

/// The output columns `[lo, hi)` whose input column `ox·s + off` lies in `[0, len)`.
#[inline(always)]
pub(super) fn span(off: isize, s: usize, len: usize, out: usize) -> (usize, usize) {
    let lo = if off < 0 {
        ((-off) as usize).div_ceil(s)
    } else {
        0
    };
    let last = len as isize - 1 - off;
    let hi = if last < 0 {
        0
    } else {
        (last as usize / s + 1).min(out)
    };
    (lo, hi.max(lo))
}

/// An epilogue activation split into the clamp a register-tile kernel applies at its
/// store (ReLU → `[0, ∞)`, ReLU6 → `[0, 6]`, none → unbounded) and any other activation,
/// applied after. Shared by every direct conv kernel.
pub(super) fn clamp_split(act: Option<ActivationKind>) -> ((f32, f32), Option<ActivationKind>) {
    match act {
        Some(ActivationKind::Relu) => ((0.0, f32::INFINITY), None),
        Some(ActivationKind::Relu6) => ((0.0, 6.0), None),
        a => ((f32::NEG_INFINITY, f32::INFINITY), a),
    }
}

/// `d[j] = src[first + j·s]`: one padded row's interior from an input row. Stride 2 as
/// pairs (vector shuffles; a strided index loop stayed scalar and was 11 % of
/// MobileNetV3-small at batch 1). Inlined into the callers' per-ISA copies.
#[inline(always)]
pub(super) fn copy_strided(d: &mut [f32], src: &[f32], first: usize, s: usize) {
    if s == 1 {
        super::cpu::copy_row(d, &src[first..first + d.len()]);
    } else if s == 2 {
        let pairs = src[first..].chunks_exact(2);
        let n = pairs.len().min(d.len());
        for (v, pair) in d[..n].iter_mut().zip(pairs) {
            *v = pair[0];
        }
        if n < d.len() {
            d[n] = src[first + 2 * n];
        }
    } else {
        for (j, v) in d.iter_mut().enumerate() {
            *v = src[first + j * s];
        }
    }
}

/// Padded rows are laid out for output rows rounded up to this many columns (one
/// AVX-512 register), so a tile's vector loads never leave the buffer.
pub(super) const BLOCK: usize = 16;

/// The padded plane's phase layout: padded column `c` of padded row `r` is at
/// `r·row + (c mod s)·phase + c / s`, so a tap reads a contiguous run at any stride.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Phases {
    pub rows: usize,
    pub row: usize,
    pub phase: usize,
}

impl Phases {
    pub fn new(g: &Geo) -> Phases {
        let ow = g.ow.div_ceil(BLOCK) * BLOCK;
        // Columns a (rounded-up) output row can touch, and rows the output can touch.
        let cols = (ow - 1) * g.sw + g.kw;
        let phase = cols.div_ceil(g.sw);
        let rows = (g.oh - 1) * g.sh + g.kh;
        Phases {
            rows,
            row: phase * g.sw,
            phase,
        }
    }

    pub fn len(&self) -> usize {
        self.rows * self.row
    }
}

/// A thread's padded-plane buffer and the geometry its zero border was written for: every
/// plane of one geometry writes the same interior cells, so the border is zeroed once per
/// geometry, not once per plane (the fill was as costly as the copy).
struct Padded {
    buf: Vec<f32>,
    key: Option<(Phases, [usize; 6])>,
}

thread_local! {
    static PADDED: std::cell::RefCell<Padded> =
        const { std::cell::RefCell::new(Padded { buf: Vec::new(), key: None }) };
}

/// Runs `f` on this thread's buffer for `count` padded planes of geometry `g` (layout
/// `ph`), whose zero border is in place; `f` writes only the interiors (`pad_phases`).
pub(super) fn with_padded<R>(
    g: &Geo,
    ph: &Phases,
    count: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    PADDED.with(|b| {
        let mut pad = b.borrow_mut();
        let len = ph.len() * count;
        let key = (*ph, [g.h, g.w, g.pt, g.pl, g.sw, count]);
        if pad.key != Some(key) || pad.buf.len() < len {
            pad.buf.clear();
            pad.buf.resize(len, 0.0);
            pad.key = Some(key);
        }
        f(&mut pad.buf[..len])
    })
}

/// What every output plane of one layer shares: the taps of its window over `planes`
/// padded input planes, the reach of its vector loads, and its epilogue split into the
/// clamp the tile kernels apply at the store (ReLU, ReLU6 or none) and the rest.
pub(super) struct PlaneLayer {
    taps: Vec<usize>,
    oh: usize,
    ow: usize,
    step: usize,
    reach: usize,
    lo: f32,
    hi: f32,
    rest: Option<ActivationKind>,
    isa: Isa,
}

impl PlaneLayer {
    pub fn new(g: &Geo, ph: &Phases, planes: usize, act: Option<ActivationKind>) -> PlaneLayer {
        // Buffer offsets of the taps (plane after plane, rows, then columns: PyTorch's
        // weight order `[C, kh, kw]`), relative to an output vector's first input.
        let mut taps = Vec::with_capacity(planes * g.kh * g.kw);
        for c in 0..planes {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    taps.push(c * ph.len() + ky * ph.row + (kx % g.sw) * ph.phase + kx / g.sw);
                }
            }
        }
        let step = g.sh * ph.row;
        // The last output row's base, plus the largest tap, plus the row rounded up to
        // BLOCK columns (≥ any tile's lanes): every vector load ends before it.
        let reach = (g.oh.max(1) - 1) * step
            + taps.iter().max().copied().unwrap_or(0)
            + g.ow.div_ceil(BLOCK) * BLOCK;
        let ((lo, hi), rest) = clamp_split(act);
        PlaneLayer {
            taps,
            oh: g.oh,
            ow: g.ow,
            step,
            reach,
            lo,
            hi,
            rest,
            isa: super::simd::isa(),
        }
    }

    /// One output plane `o` from the padded planes `xp` with this channel's weights `w`
    /// (one per tap) and `bias`: the tile kernel, then the rest of the epilogue.
    pub fn run(&self, xp: &[f32], w: &[f32], bias: f32, o: &mut [f32]) {
        // The unsafe tile kernels rely on this bound.
        assert!(self.reach <= xp.len(), "padded plane buffer too short");
        let p = Plane {
            xp,
            w,
            taps: &self.taps,
            oh: self.oh,
            ow: self.ow,
            step: self.step,
            bias,
            lo: self.lo,
            hi: self.hi,
        };
        if !plane_vector(self.isa, &p, o) {
            plane_tiles(&p, o);
        }
        if self.rest.is_some() {
            super::act::bias_act(o, 0.0, None, self.rest);
        }
    }
}

multiversion! {
/// Copies plane `x` into the interior of `buf` (whose border is already zero), split into
/// stride phases. (This is where the input plane comes in from memory.)
pub(super) fn pad_phases(g: &Geo, ph: &Phases, x: &[f32], buf: &mut [f32]) {
    // Padded rows that hold input rows.
    let (r0, r1) = (g.pt.min(ph.rows), (g.pt + g.h).min(ph.rows));
    for q in 0..g.sw {
        // Phase q holds padded columns q, q + s, …: input column t·s + q − pl. Its span
        // is the same for every row (worked out once: the divisions showed in profiles).
        let (lo, hi) = span(q as isize - g.pl as isize, g.sw, g.w, ph.phase);
        let first = (lo * g.sw + q) - g.pl;
        for r in r0..r1 {
            let src = &x[(r - g.pt) * g.w..(r - g.pt + 1) * g.w];
            let d = &mut buf[r * ph.row + q * ph.phase..][lo..hi];
            copy_strided(d, src, first, g.sw);
        }
    }
}
}

/// One plane's work for the explicit-vector tiles: the padded input, the channel's
/// weights and tap offsets, the output and its epilogue (`bias` added at the start, the
/// result clamped to `[lo, hi]`, which is ReLU, ReLU6 or nothing).
struct Plane<'a> {
    xp: &'a [f32],
    w: &'a [f32],
    taps: &'a [usize],
    oh: usize,
    ow: usize,
    /// Padded-buffer distance between consecutive output rows (`sh` padded rows).
    step: usize,
    bias: f32,
    lo: f32,
    hi: f32,
}

/// Defines an explicit-vector depthwise tile kernel over one register type: `T`
/// accumulators, each one output vector of `lanes` columns, take every tap as a broadcast
/// weight times an unaligned load (one FMA each), then get bias and clamp and are stored.
/// (Written with intrinsics: the compiler turned the portable form into gathers and
/// separate multiplies and adds.)
macro_rules! dw_tiles {
    ($(#[$m:meta])* $name:ident, $features:literal, $lanes:literal, $vec:ty,
     $set1:ident, $loadu:ident, $storeu:ident, $part:ident, $fmadd:ident, $max:ident,
     $min:ident) => {
        $(#[$m])*
        /// # Safety
        /// The CPU has these features; every load stays inside `p.xp` (checked by the
        /// caller: last vector's base + largest tap + lanes ≤ len); `o` holds `oh·ow`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: usize>(p: &Plane, o: &mut [f32]) {
            use std::arch::x86_64::*;
            let per_row = p.ow.div_ceil($lanes);
            let last = p.oh * per_row - 1;
            let (bias, lo, hi) = ($set1(p.bias), $set1(p.lo), $set1(p.hi));
            let (mut k, mut oy, mut j) = (0, 0, 0);
            loop {
                // The group's vectors: (input base, output offset, valid columns); past
                // the last vector the slots repeat it.
                let mut at = [(0usize, 0usize, 0usize); T];
                let mut end = false;
                for slot in at.iter_mut() {
                    *slot = (oy * p.step + j * $lanes, oy * p.ow + j * $lanes, (p.ow - j * $lanes).min($lanes));
                    if k < last {
                        k += 1;
                        j += 1;
                        if j == per_row {
                            j = 0;
                            oy += 1;
                        }
                    } else {
                        end = true;
                    }
                }
                let mut acc: [$vec; T] = [bias; T];
                let x = p.xp.as_ptr();
                for (&tap, &wv) in p.taps.iter().zip(p.w) {
                    let wv = $set1(wv);
                    for t in 0..T {
                        // SAFETY: the caller's bound.
                        let v = unsafe { $loadu(x.add(at[t].0 + tap)) };
                        acc[t] = $fmadd(wv, v, acc[t]);
                    }
                }
                for t in 0..T {
                    // Bound first, value second: a NaN passes through (max/min return the second).
                    let y = $min(hi, $max(lo, acc[t]));
                    let (off, n) = (at[t].1, at[t].2);
                    if n == $lanes {
                        // SAFETY: off + lanes ≤ oh·ow = o.len().
                        unsafe { $storeu(o.as_mut_ptr().add(off), y) };
                    } else {
                        // SAFETY: off + n ≤ oh·ow = o.len().
                        unsafe { $part(o.as_mut_ptr().add(off), y, n) };
                    }
                }
                if end {
                    break;
                }
            }
        }
    };
}

/// Stores the first `n` lanes of `y` at `dst` (a row's last, partial vector): a masked
/// store, where a copy through a stack buffer was a `memmove` call per row (a tenth of a
/// stride-2 depthwise layer with 28-wide rows).
///
/// # Safety
/// AVX-512F; `dst..dst + n` is writable, `n < 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn part_zmm(dst: *mut f32, y: std::arch::x86_64::__m512, n: usize) {
    // SAFETY: the caller's contract; masked-off lanes are not written.
    unsafe { std::arch::x86_64::_mm512_mask_storeu_ps(dst, ((1u32 << n) - 1) as u16, y) }
}

/// Lane mask of the first `n` of `N ≤ 8` 32-bit lanes, for `maskstore`.
#[cfg(target_arch = "x86_64")]
const fn first_lanes<const N: usize>(n: usize) -> [i32; 8] {
    let mut m = [0i32; 8];
    let mut i = 0;
    while i < N && i < n {
        m[i] = -1;
        i += 1;
    }
    m
}

/// [`part_zmm`] for 8-float vectors.
///
/// # Safety
/// AVX2; `dst..dst + n` is writable, `n < 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn part_ymm(dst: *mut f32, y: std::arch::x86_64::__m256, n: usize) {
    use std::arch::x86_64::*;
    let m = first_lanes::<8>(n);
    // SAFETY: the caller's contract; masked-off lanes are not written.
    unsafe { _mm256_maskstore_ps(dst, _mm256_loadu_si256(m.as_ptr().cast()), y) }
}

/// [`part_zmm`] for 4-float vectors.
///
/// # Safety
/// AVX2; `dst..dst + n` is writable, `n < 4`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn part_xmm(dst: *mut f32, y: std::arch::x86_64::__m128, n: usize) {
    use std::arch::x86_64::*;
    let m = first_lanes::<4>(n);
    // SAFETY: the caller's contract; masked-off lanes are not written.
    unsafe { _mm_maskstore_ps(dst, _mm_loadu_si128(m.as_ptr().cast()), y) }
}

dw_tiles!(
    /// 16-float (AVX-512) tiles, for rows wider than 8.
    dw_zmm, "avx512f", 16, __m512,
    _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, part_zmm, _mm512_fmadd_ps, _mm512_max_ps, _mm512_min_ps
);
dw_tiles!(
    /// 8-float (AVX2) tiles: rows of 5–8 columns on AVX-512, every row on AVX2.
    dw_ymm, "avx2,fma", 8, __m256,
    _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, part_ymm, _mm256_fmadd_ps, _mm256_max_ps, _mm256_min_ps
);
dw_tiles!(
    /// 4-float tiles for rows of at most 4 columns (the 4x4 maps of CIFAR nets).
    dw_xmm, "avx2,fma", 4, __m128,
    _mm_set1_ps, _mm_loadu_ps, _mm_storeu_ps, part_xmm, _mm_fmadd_ps, _mm_max_ps, _mm_min_ps
);

/// Runs one plane on the best tile kernel for its width and the ISA in use; `false` when
/// none applies (portable code), so the caller runs [`plane_tiles`].
#[inline(always)]
#[allow(unused_variables)]
fn plane_vector(isa: Isa, p: &Plane, o: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa` never exceeds what the CPU has; the bound was checked by the caller.
        match (isa, p.ow) {
            (Isa::Portable, _) => return false,
            (_, 0..=4) => unsafe { dw_xmm::<8>(p, o) },
            (Isa::Avx512, 5..=8) | (Isa::Avx2, _) => unsafe { dw_ymm::<8>(p, o) },
            (Isa::Avx512, _) => unsafe { dw_zmm::<8>(p, o) },
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The portable form of the tile kernels (8 columns × 4 accumulators), for CPUs without
/// AVX2 and other architectures.
fn plane_tiles(p: &Plane, o: &mut [f32]) {
    const V: usize = 8;
    const T: usize = 4;
    let per_row = p.ow.div_ceil(V);
    let count = p.oh * per_row;
    let mut v0 = 0;
    while v0 < count {
        let idx: [usize; T] = std::array::from_fn(|t| (v0 + t).min(count - 1));
        let mut acc = [[p.bias; V]; T];
        for (&tap, &wv) in p.taps.iter().zip(p.w) {
            for t in 0..T {
                let b = (idx[t] / per_row) * p.step + (idx[t] % per_row) * V + tap;
                let src: &[f32; V] = p.xp[b..b + V].try_into().expect("in bounds");
                for i in 0..V {
                    acc[t][i] += wv * src[i];
                }
            }
        }
        for t in 0..T {
            let (oy, c0) = (idx[t] / per_row, (idx[t] % per_row) * V);
            let n = (p.ow - c0).min(V);
            for (d, &a) in o[oy * p.ow + c0..][..n].iter_mut().zip(&acc[t]) {
                *d = a.clamp(p.lo, p.hi);
            }
        }
        v0 += T;
    }
}
