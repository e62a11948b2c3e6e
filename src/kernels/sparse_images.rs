//! Sparse pointwise convs on small maps, several images per tile (AVX-512).
//!
//! The per-image flat tiles ([`super::sparse`]) hold one channel's positions in 8 vector
//! accumulators. A 4×4 map is one vector: the tile splits the channel's non-zeros into 8
//! partial sums instead, and every non-zero still pays its broadcast and offset load for
//! one FMA, every channel its set-up and the partial sums' reduction. At 90 % sparsity
//! MobileNetV2's 4×4 and 8×8 1×1 convs (batch 64) ran 1.8–2.2× faster than dense where
//! the wide maps ran 2.5–3×. Here the tile is the same channel of `G` images (`G·V ≤ 8`
//! vectors, `V` per map): one broadcast and one offset per non-zero feed `G·V` FMAs, each
//! accumulator a whole output vector. The weights are the same for every image, so the
//! images of a batch are just more columns of the same sparse product.

use super::act;
use crate::graph::csr::CsrMatrix;
use crate::graph::ops::ActivationKind;
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

/// Calls of [`Batch::run`], numbering each so a thread's packed group is reused within
/// the call only.
static CALLS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's packed input of one image group: `(call, group)` and `[C][G][P']`.
    static PACKED: RefCell<((u64, usize), Vec<f32>)> =
        const { RefCell::new(((u64::MAX, usize::MAX), Vec::new())) };
}

/// Vectors (16 floats) a map may have for this kernel: 1–4 (maps of up to 64 positions).
const MAX_VECS: usize = 4;

/// Whether a pointwise conv of `n` images over maps of `p` positions runs here: AVX-512,
/// at least two images, a map of 1–4 vectors.
pub(super) fn applies(n: usize, p: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && super::simd::isa() == super::simd::Isa::Avx512
        && n >= 2
        && p > 0
        && p.div_ceil(16) <= MAX_VECS
}

/// Non-zeros per input channel (per image) from which the group's input is packed first.
/// Packing copies the input once; a channel read by few non-zeros does not repay it
/// (MobileNetV2's 384→64 at 8×8, 6.4 per channel: 0.17 ms in place, 0.28 packed at
/// batch 64), one read by many does (160→960 at 4×4, 96 per channel: 0.24 → 0.17 ms;
/// 320→1280: 0.61 → 0.43).
const PACK_REUSE: usize = 12;

/// Bytes of input a group of images may take: about an L1 data cache, so a channel's
/// non-zeros keep hitting it (96→576 at 8×8, batch 64: one image per group 0.30 ms,
/// two 0.37).
const GROUP_BYTES: usize = 40 << 10;

/// One batched pointwise conv: every image's `C` planes of `P` in, `O` planes out.
pub(super) struct Batch<'a> {
    pub csr: &'a CsrMatrix,
    pub x: &'a [f32],
    pub n: usize,
    pub p: usize,
    pub scale: Option<&'a [f32]>,
    pub bias: Option<&'a [f32]>,
    pub res: Option<&'a [f32]>,
    /// The activation: a ReLU or ReLU6 as a clamp at the store, any other after.
    pub act: Option<ActivationKind>,
}

/// The output's base pointer shared by tasks that write disjoint (image, channel) blocks.
struct Out(*mut f32);
// SAFETY: each task writes its own blocks only.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Where a tile reads its images' input planes.
#[derive(Clone, Copy)]
enum Src {
    /// The batch itself: image `g`'s plane `c` at `x + (n0 + g)·C·P + c·P`.
    InPlace(*const f32),
    /// The group packed as `[C][G][V·16]`: plane `c` of every image one contiguous row,
    /// each map padded to whole vectors.
    Packed(*const f32),
}

impl Batch<'_> {
    /// `out[n, o, :] = act(scale[o] · Σ_nz w · x[n, col, :] + bias[o] + res[n, o, :])` for
    /// every image and channel; every element written. Tasks are (image group, channel
    /// block) pairs, image groups outer (a thread's run of tasks reads few groups).
    pub fn run(&self, out: &mut [MaybeUninit<f32>]) {
        let (n, p, o, c) = (self.n, self.p, self.csr.rows, self.csr.cols);
        let img_in = c * p;
        let img_out = o * p;
        assert!(applies(n, p), "sparse image tiles: unsupported geometry");
        assert_eq!(out.len(), n * img_out, "sparse image tiles: output size");
        assert!(self.x.len() >= n * img_in, "sparse image tiles: input size");
        assert!(self.res.is_none_or(|r| r.len() >= n * img_out));
        // The bound every load relies on: a column names a plane of the image.
        assert!(self.csr.col_idx.iter().all(|&k| (k as usize) < c));
        let vecs = p.div_ceil(16);
        let pp = vecs * 16;
        let packed = self.csr.values.len() >= PACK_REUSE * c;
        let per_image = if packed { c * pp * 4 } else { img_in * 4 };
        // A power of two up to 8 vectors per tile, as the tiles' `G`.
        let fit = (GROUP_BYTES / per_image.max(1)).clamp(1, 8 / vecs).min(n);
        let g = 1 << fit.ilog2();
        let groups = n.div_ceil(g);
        // About 8 tasks per thread, each at least 32 K multiply-adds.
        let work = self.csr.values.len() * p * g;
        let threads = rayon::current_num_threads().max(1);
        let blocks = (8 * threads)
            .div_ceil(groups)
            .min((work >> 15).max(1))
            .min(o)
            .max(1);
        let per = o.div_ceil(blocks);
        let blocks = o.div_ceil(per);
        let ((lo, hi), after) = super::planes::clamp_split(self.act);
        let base = Out(out.as_mut_ptr() as *mut f32);
        let base = &base;
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        super::par::for_each(groups * blocks, |t| {
            let (gi, bi) = (t / blocks, t % blocks);
            let (n0, o0) = (gi * g, bi * per);
            let o1 = (o0 + per).min(o);
            let body = |src: Src| {
                // SAFETY: the asserts above bound every load (a packed group holds `C`
                // rows of `G·V·16`); this task stores only channels o0..o1 of images
                // n0..n0 + g clipped to n, disjoint from every other task's.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    macro_rules! go {
                        ($g:literal, $v:literal, $s:literal) => {
                            tile::<$g, $v, $s>(self, src, n0, o0, o1, lo, hi, base.0)
                        };
                    }
                    match (vecs, g) {
                        (1, 8) => go!(8, 1, 1),
                        (1, 4) => go!(4, 1, 2),
                        (1, 2) => go!(2, 1, 4),
                        (1, _) => go!(1, 1, 8),
                        (2, 4) => go!(4, 2, 1),
                        (2, 2) => go!(2, 2, 2),
                        (2, _) => go!(1, 2, 4),
                        (3, 2) => go!(2, 3, 1),
                        (3, _) => go!(1, 3, 2),
                        (_, 2) => go!(2, 4, 1),
                        _ => go!(1, 4, 2),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (src, lo, hi, o1);
            };
            if packed {
                PACKED.with(|cell| {
                    let mut guard = cell.borrow_mut();
                    let (key, buf) = &mut *guard;
                    let len = c * g * pp;
                    if buf.len() < len + 16 {
                        *buf = vec![0.0; len + 16];
                    }
                    // A 64-byte aligned start (a `Vec<f32>` reaches one within 16).
                    let a0 = buf.as_ptr().align_offset(64).min(16);
                    let xb = &mut buf[a0..a0 + len];
                    if *key != (call, gi) {
                        pack(self.x, img_in, n, n0, g, c, p, pp, xb);
                        *key = (call, gi);
                    }
                    body(Src::Packed(xb.as_ptr()))
                });
            } else {
                body(Src::InPlace(self.x.as_ptr()));
            }
            if let Some(k) = after {
                for ni in n0..(n0 + g).min(n) {
                    let at = ni * img_out + o0 * p;
                    // SAFETY: this task's block, every element written above.
                    let ys =
                        unsafe { std::slice::from_raw_parts_mut(base.0.add(at), (o1 - o0) * p) };
                    act::apply(k, ys);
                }
            }
        });
    }
}

/// Copies images `n0..n0 + g` (past the batch's end: its last image again) into `xb` as
/// `[C][g][pp]`; the padding past `p` in each row is left as it is (never stored).
#[allow(clippy::too_many_arguments)]
fn pack(
    x: &[f32],
    img_in: usize,
    n: usize,
    n0: usize,
    g: usize,
    c: usize,
    p: usize,
    pp: usize,
    xb: &mut [f32],
) {
    for gg in 0..g {
        let img = (n0 + gg).min(n - 1);
        let src = &x[img * img_in..(img + 1) * img_in];
        for (ci, plane) in src.chunks_exact(p).enumerate().take(c) {
            let d = (ci * g + gg) * pp;
            xb[d..d + p].copy_from_slice(plane);
        }
    }
}

/// Channels `o0..o1` of images `n0..n0 + G` (an image past the batch's last is read as
/// the last and not stored), `V` vectors per map, the non-zeros split into `S` partial
/// sums (`G·V·S = 8` independent chains).
///
/// # Safety
/// AVX-512F; the bounds [`Batch::run`] asserts; a packed `src` holds `C` rows of
/// `G·V·16` floats; `out` holds `n` images of `O·P` floats and no other thread writes
/// these blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
unsafe fn tile<const G: usize, const V: usize, const S: usize>(
    b: &Batch,
    src: Src,
    n0: usize,
    o0: usize,
    o1: usize,
    lo: f32,
    hi: f32,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let (n, p) = (b.n, b.p);
    let img_in = b.csr.cols * p;
    let img_out = b.csr.rows * p;
    let last: u16 = match p % 16 {
        0 => u16::MAX,
        r => ((1u32 << r) - 1) as u16,
    };
    let mask = |v: usize| if v + 1 == V { last } else { u16::MAX };
    let (vals, cols, ptr) = (&b.csr.values, &b.csr.col_idx, &b.csr.row_ptr);
    let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    // SAFETY (every block below): the caller's bounds. In place, image `g`'s plane
    // `col` is `P` floats at `x + img·C·P + col·P` (the last vector masked); packed,
    // plane `col` of the group is `G·V` whole vectors at `x + col·G·V·16`.
    let imgs: [usize; G] = std::array::from_fn(|g| (n0 + g).min(n - 1) * img_in);
    let nz = |acc: &mut [[__m512; V]; G], col: usize, w: f32| unsafe {
        let w = _mm512_set1_ps(w);
        match src {
            Src::Packed(x) => {
                let row = x.add(col * (G * V * 16));
                for g in 0..G {
                    for v in 0..V {
                        let xv = _mm512_loadu_ps(row.add((g * V + v) * 16));
                        acc[g][v] = _mm512_fmadd_ps(w, xv, acc[g][v]);
                    }
                }
            }
            Src::InPlace(x) => {
                for g in 0..G {
                    let plane = x.add(imgs[g] + col * p);
                    for v in 0..V {
                        let xv = _mm512_maskz_loadu_ps(mask(v), plane.add(v * 16));
                        acc[g][v] = _mm512_fmadd_ps(w, xv, acc[g][v]);
                    }
                }
            }
        }
    };
    unsafe {
        for o in o0..o1 {
            let (a, z) = (
                *ptr.get_unchecked(o) as usize,
                *ptr.get_unchecked(o + 1) as usize,
            );
            let mut part = [[[_mm512_setzero_ps(); V]; G]; S];
            let mut i = a;
            while i + S <= z {
                for (s, acc) in part.iter_mut().enumerate() {
                    nz(
                        acc,
                        *cols.get_unchecked(i + s) as usize,
                        *vals.get_unchecked(i + s),
                    );
                }
                i += S;
            }
            while i < z {
                nz(
                    &mut part[0],
                    *cols.get_unchecked(i) as usize,
                    *vals.get_unchecked(i),
                );
                i += 1;
            }
            let mut acc = part[0];
            for q in &part[1..] {
                for g in 0..G {
                    for v in 0..V {
                        acc[g][v] = _mm512_add_ps(acc[g][v], q[g][v]);
                    }
                }
            }
            let scale = _mm512_set1_ps(b.scale.map_or(1.0, |s| *s.get_unchecked(o)));
            let bias = _mm512_set1_ps(b.bias.map_or(0.0, |s| *s.get_unchecked(o)));
            for g in 0..G {
                if n0 + g >= n {
                    break;
                }
                let at = (n0 + g) * img_out + o * p;
                for v in 0..V {
                    let mut y = _mm512_fmadd_ps(acc[g][v], scale, bias);
                    if let Some(r) = b.res {
                        y = _mm512_add_ps(
                            y,
                            super::simd::load16(r.as_ptr().add(at + v * 16), mask(v)),
                        );
                    }
                    // Bound first, value second: a NaN passes through, as in the other kernels.
                    y = _mm512_min_ps(hi, _mm512_max_ps(lo, y));
                    super::simd::store16(out.add(at + v * 16), mask(v), y);
                }
            }
        }
    }
}
