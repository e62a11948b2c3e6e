//! Raw access to CPU f32 data of candle tensors and storages, for the custom kernels.

use anyhow::{anyhow, Result};
use candle_core::{CpuStorage, Device, Layout, Storage, Tensor};

/// The contiguous f32 slice of a custom op's input storage.
pub fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("{what}: only f32 tensors are supported"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (copying only if not contiguous).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let (a, b) = l
                .contiguous_offsets()
                .ok_or_else(|| anyhow!("tensor not contiguous"))?;
            Ok(f(&v[a..b]))
        }
        _ => Err(anyhow!("expected an f32 CPU tensor")),
    }
}

/// A CPU tensor from a vector (no copy).
pub fn tensor(v: Vec<f32>, dims: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// Converts an anyhow error to candle's, for use inside `CustomOp` callbacks.
pub fn ce(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

/// Number of chunks for deterministic parallel reductions: fixed per thread count, so a
/// given machine always sums in the same order.
pub fn reduction_chunks(n: usize) -> usize {
    rayon::current_num_threads().max(1).min(n.max(1))
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A per-thread scratch buffer (im2col columns) that keeps its allocation across calls, so
/// a convolution does not allocate and zero-fill a fresh column buffer per image batch.
pub fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// An output buffer of `n` floats left uninitialised, for a kernel that writes every
/// element: a fresh `vec![0.0; n]` is a zero-fill of memory the kernel then overwrites
/// (glibc's calloc must clear reused heap memory), which the profile of sparse inference
/// showed as ~5 % of the time. Turn it into floats with [`assume_init`].
pub fn uninit(n: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    v.resize_with(n, std::mem::MaybeUninit::uninit);
    v
}

/// The buffer of [`uninit`] as floats.
///
/// # Safety
/// Every element has been written.
pub unsafe fn assume_init(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller guarantees initialisation;
    // pointer, length and capacity come from a live Vec that is not dropped.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
}

/// `dst = src` for a short row, in fixed-size chunks (the last one overlapping), so the
/// copy is a few inlined vector moves rather than a `memcpy` call.
#[inline(always)]
pub fn copy_row(dst: &mut [f32], src: &[f32]) {
    let n = src.len();
    debug_assert_eq!(dst.len(), n);
    macro_rules! chunks {
        ($k:literal) => {{
            let mut i = 0;
            while i + $k <= n {
                dst[i..i + $k].copy_from_slice(&src[i..i + $k]);
                i += $k;
            }
            if i < n {
                dst[n - $k..n].copy_from_slice(&src[n - $k..n]);
            }
        }};
    }
    match n {
        16.. => chunks!(16),
        8.. => chunks!(8),
        4.. => chunks!(4),
        _ => dst.copy_from_slice(src),
    }
}

/// `dst = 0` for a short row, like [`copy_row`].
#[inline(always)]
pub fn zero_row(dst: &mut [f32]) {
    let n = dst.len();
    macro_rules! chunks {
        ($k:literal) => {{
            let mut i = 0;
            while i + $k <= n {
                dst[i..i + $k].fill(0.0);
                i += $k;
            }
            if i < n {
                dst[n - $k..n].fill(0.0);
            }
        }};
    }
    match n {
        16.. => chunks!(16),
        8.. => chunks!(8),
        4.. => chunks!(4),
        _ => dst.fill(0.0),
    }
}

/// An output buffer of `n` floats that is not zero-filled (see [`uninit`]), for a kernel
/// that stores every element before anything reads it: the calloc of a fresh
/// `vec![0.0; n]` showed as ~6 % of MobileNetV2 inference at batch 64.
///
/// # Safety
/// The caller writes every element before any is read.
pub unsafe fn unfilled(n: usize) -> Vec<f32> {
    // SAFETY: the caller's contract.
    unsafe { assume_init(uninit(n)) }
}

/// `dst[j·ld + i] = src[i·sl + j]` for `i < rows`, `j < cols` (a strided source and
/// destination), in 16 × 16 blocks, each of which fills whole cache lines of `dst` (a
/// row-by-row transpose writes every value to a different line). On AVX-512 each block is
/// transposed in registers (masked loads and stores at the edges): the element loop ran at
/// ~1 ns per value, as long as the channel-vector depthwise kernel's arithmetic.
pub fn transpose(src: &[f32], sl: usize, rows: usize, cols: usize, dst: &mut [f32], ld: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        src.len() > (rows - 1) * sl + cols - 1,
        "transpose source too short"
    );
    assert!(
        dst.len() > (cols - 1) * ld + rows - 1,
        "transpose destination too short"
    );
    #[cfg(target_arch = "x86_64")]
    if super::simd::isa() == super::simd::Isa::Avx512 {
        // SAFETY: AVX-512F checked; both extents asserted above, and every block reads
        // and writes only inside them (masked at the edges).
        unsafe { transpose_avx512(src.as_ptr(), sl, rows, cols, dst.as_mut_ptr(), ld) };
        return;
    }
    transpose_elems(src, sl, rows, cols, dst, ld)
}

super::simd::multiversion! {
    /// [`transpose`] value by value.
    fn transpose_elems(src: &[f32], sl: usize, rows: usize, cols: usize, dst: &mut [f32], ld: usize) {
        for i0 in (0..rows).step_by(16) {
            for j0 in (0..cols).step_by(16) {
                for i in i0..(i0 + 16).min(rows) {
                    let s = &src[i * sl..];
                    for j in j0..(j0 + 16).min(cols) {
                        dst[j * ld + i] = s[j];
                    }
                }
            }
        }
    }
}

/// [`transpose`] in 16 × 16 register blocks.
///
/// # Safety
/// AVX-512F; `src` readable at `i·sl + j` and `dst` writable at `j·ld + i` for `i < rows`,
/// `j < cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_avx512(
    src: *const f32,
    sl: usize,
    rows: usize,
    cols: usize,
    dst: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    let mask = |n: usize| -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    };
    for i0 in (0..rows).step_by(16) {
        let (ni, mi) = ((rows - i0).min(16), mask(rows - i0));
        for j0 in (0..cols).step_by(16) {
            let (nj, mj) = ((cols - j0).min(16), mask(cols - j0));
            // SAFETY: rows i0..i0 + ni, columns j0..j0 + nj of src; the transposed block
            // into dst likewise (the caller's contract).
            unsafe {
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, v) in r.iter_mut().enumerate().take(ni) {
                    *v = super::simd::load16(src.add((i0 + i) * sl + j0), mj);
                }
                let t = transpose16(r);
                for (j, v) in t.iter().enumerate().take(nj) {
                    super::simd::store16(dst.add((j0 + j) * ld + i0), mi, *v);
                }
            }
        }
    }
}

/// The 16 × 16 transpose of `r` (row `i` lane `j` → row `j` lane `i`): pairs of rows
/// interleaved by 32 then 64 bits within 128-bit lanes, then 128-bit lanes exchanged twice.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let mut a = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + m], 128-bit lane k: column 4k + m of rows 4i..4i + 4.
    let mut b = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let q = 4 * i;
        let (a0, a1) = (_mm512_castps_pd(a[q]), _mm512_castps_pd(a[q + 1]));
        let (a2, a3) = (_mm512_castps_pd(a[q + 2]), _mm512_castps_pd(a[q + 3]));
        b[q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        b[q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        b[q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        b[q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        let (x0, x1, x2, x3) = (b[m], b[4 + m], b[8 + m], b[12 + m]);
        let c0 = _mm512_shuffle_f32x4::<0x44>(x0, x1);
        let c1 = _mm512_shuffle_f32x4::<0xEE>(x0, x1);
        let c2 = _mm512_shuffle_f32x4::<0x44>(x2, x3);
        let c3 = _mm512_shuffle_f32x4::<0xEE>(x2, x3);
        out[m] = _mm512_shuffle_f32x4::<0x88>(c0, c2);
        out[4 + m] = _mm512_shuffle_f32x4::<0xDD>(c0, c2);
        out[8 + m] = _mm512_shuffle_f32x4::<0x88>(c1, c3);
        out[12 + m] = _mm512_shuffle_f32x4::<0xDD>(c1, c3);
    }
    out
}

/// The 8 × 8 transpose of `r` (row `i` lane `j` → row `j` lane `i`): pairs of rows
/// interleaved by 32 bits, then 64, then the 128-bit halves exchanged.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // b[4h + m], 128-bit half k: column 4k + m of rows 4h..4h + 4.
    let mut b = [_mm256_setzero_ps(); 8];
    for h in 0..2 {
        let q = 4 * h;
        b[q] = _mm256_shuffle_ps::<0x44>(a[q], a[q + 2]);
        b[q + 1] = _mm256_shuffle_ps::<0xEE>(a[q], a[q + 2]);
        b[q + 2] = _mm256_shuffle_ps::<0x44>(a[q + 1], a[q + 3]);
        b[q + 3] = _mm256_shuffle_ps::<0xEE>(a[q + 1], a[q + 3]);
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for m in 0..4 {
        out[m] = _mm256_permute2f128_ps::<0x20>(b[m], b[4 + m]);
        out[4 + m] = _mm256_permute2f128_ps::<0x31>(b[m], b[4 + m]);
    }
    out
}

/// Planes `[·, H, W]` of `x` at rows `oy·sh` and columns `ox·sw` into `out` (`OH·OW` per
/// plane): a strided 1×1 window, as pools and strided 1×1 convs take it. Parallel over
/// planes.
pub fn subsample_planes(
    x: &[f32],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    (sh, sw): (usize, usize),
    out: &mut [f32],
) {
    let (hw, p) = (h * w, oh * ow);
    if p == 0 {
        return;
    }
    assert!(
        (oh - 1) * sh < h && (ow - 1) * sw < w,
        "subsample outside the planes"
    );
    assert!(x.len() >= out.len() / p * hw);
    let planes = (1usize << 14).div_ceil(p).max(1);
    super::par::chunks_mut(out, planes * p, |t, d| {
        for (j, dp) in d.chunks_exact_mut(p).enumerate() {
            let src = &x[(t * planes + j) * hw..][..hw];
            for (oy, row) in dp.chunks_exact_mut(ow).enumerate() {
                let sr = &src[oy * sh * w..];
                for (ox, v) in row.iter_mut().enumerate() {
                    *v = sr[ox * sw];
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block shape (whole, edge, both) against the element loop, with strides wider
    /// than the extents.
    #[test]
    fn transpose_matches_elements() {
        for &(rows, cols) in &[(1, 1), (16, 16), (5, 37), (33, 7), (40, 40), (17, 1)] {
            let (sl, ld) = (cols + 3, rows + 5);
            let src: Vec<f32> = (0..rows * sl).map(|i| i as f32).collect();
            let mut want = vec![-1f32; cols * ld];
            let mut got = want.clone();
            transpose_elems(&src, sl, rows, cols, &mut want, ld);
            transpose(&src, sl, rows, cols, &mut got, ld);
            assert_eq!(got, want, "{rows}×{cols}");
        }
    }
}
