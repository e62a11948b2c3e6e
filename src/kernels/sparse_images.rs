//! Sparse convs on small maps, several images per tile (AVX-512): pointwise convs, and
//! stride-1 k×k convs read in place through per-tap masks ([`Taps`]).
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

// The explicit-vector kernels are x86-64 only; elsewhere the callers never take this path.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_variables, unused_imports)
)]

use super::act;
use super::conv_tiles::OutPtr;
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

/// Whether a conv of `n` images with output maps of `p` positions may run here: AVX-512,
/// at least two images (one image ran slower than on the per-image kernels: ResNet-20's
/// 8×8 layers at batch 1), a map of 1–4 vectors; a k×k conv also needs [`Taps::new`].
pub(super) fn applies(n: usize, p: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && super::simd::isa() == super::simd::Isa::Avx512
        && !env_off()
        && n >= 2
        && p > 0
        && p.div_ceil(16) <= MAX_VECS
}

/// `LOPPER_SPARSE_IMAGES=0`: the per-image kernels instead (A/B runs).
fn env_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::simd::env_off(&OFF, "LOPPER_SPARSE_IMAGES")
}

/// Non-zeros per input channel (per image) from which the group's input is packed first.
/// Packing copies the input once; a channel read by few non-zeros does not repay it
/// (MobileNetV2's 384→64 at 8×8, 6.4 per channel: 0.17 ms in place, 0.28 packed at
/// batch 64), one read by many does (160→960 at 4×4, 96 per channel: 0.24 → 0.17 ms;
/// 320→1280: 0.61 → 0.43).
const PACK_REUSE: usize = 12;

/// Bytes of input a group of images may take: about an L1 data cache, so a channel's
/// non-zeros keep hitting it (packed, batch 64: 160→960 at 4×4 with 4 images per group,
/// 40 KB, 0.17 ms, with 8 0.28; 320→1280 with 2, 0.43 ms, with 8 0.72).
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
    /// A k×k conv ([`Taps`]); `None` for a pointwise one.
    pub taps: Option<&'a Taps>,
}

/// A stride-1 k×k conv whose output rows are as wide as its input rows ('same' padding
/// across): output position `q` of the flattened map reads input position `q + δ` for
/// tap `(ky, kx)`, `δ = (ky − pt)·W + (kx − pl)`, where the tap lands inside the image —
/// so a non-zero is again whole vectors of the image read in place, the positions whose
/// tap falls in the padding masked off. No padded copy of the input is made (the direct
/// kernel's copy was a fifth of ResNet-20's sparse time at batch 64), and a 16-float
/// register holds two rows of an 8×8 map (the direct kernel: one 8-float row each).
#[derive(Debug)]
pub(super) struct Taps {
    /// Per non-zero, its input offset from an image's start (may be negative).
    offs: Vec<isize>,
    /// Per non-zero, its tap (an index into `masks`).
    tap: Vec<u16>,
    /// Per tap, each output vector's lanes that read inside the image.
    masks: Vec<[u16; MAX_VECS]>,
    /// Floats of one input image.
    img_in: usize,
}

impl Taps {
    /// The taps of a conv of geometry `g` with its CSR weight's columns (`c·kh·kw + ky·kw
    /// + kx`), or `None` where they do not apply (see [`Taps`]).
    pub fn new(g: &super::im2col::Geo, col_idx: &[u32]) -> Option<Taps> {
        let p = g.oh * g.ow;
        let ok = g.sh == 1
            && g.sw == 1
            && g.dh == 1
            && g.dw == 1
            && g.groups == 1
            && g.ow == g.w
            && p > 0
            && p.div_ceil(16) <= MAX_VECS;
        if !ok {
            return None;
        }
        let (kh, kw, w, h) = (g.kh, g.kw, g.w as isize, g.h as isize);
        let khw = kh * kw;
        let masks = (0..khw)
            .map(|t| {
                let (dy, dx) = (
                    (t / kw) as isize - g.pt as isize,
                    (t % kw) as isize - g.pl as isize,
                );
                std::array::from_fn(|v| {
                    let mut m = 0u16;
                    for j in 0..16 {
                        let q = v * 16 + j;
                        if q >= p {
                            break;
                        }
                        let (iy, ix) = ((q / g.ow) as isize + dy, (q % g.ow) as isize + dx);
                        if (0..h).contains(&iy) && (0..w).contains(&ix) {
                            m |= 1 << j;
                        }
                    }
                    m
                })
            })
            .collect();
        let plane = (g.h * g.w) as isize;
        let (offs, tap) = col_idx
            .iter()
            .map(|&k| {
                let k = k as usize;
                let (c, t) = (k / khw, k % khw);
                let (dy, dx) = (
                    (t / kw) as isize - g.pt as isize,
                    (t % kw) as isize - g.pl as isize,
                );
                (c as isize * plane + dy * w + dx, t as u16)
            })
            .unzip();
        let taps = Taps {
            offs,
            tap,
            masks,
            img_in: g.c * g.h * g.w,
        };
        // A column outside the weight's channels (a malformed matrix) would read outside
        // the image: the other kernels check theirs.
        taps.in_bounds().then_some(taps)
    }

    /// Every unmasked lane of every non-zero reads inside its image (what the tiles'
    /// loads rely on): per tap, the first and last unmasked position; per non-zero, both
    /// shifted inside. Checked once, when the taps are built (they never change).
    fn in_bounds(&self) -> bool {
        let span: Vec<Option<(isize, isize)>> = self
            .masks
            .iter()
            .map(|m| {
                let mut lanes = (0..MAX_VECS * 16).filter(|&q| m[q / 16] & (1 << (q % 16)) != 0);
                let first = lanes.clone().next()? as isize;
                Some((first, lanes.next_back()? as isize))
            })
            .collect();
        self.offs.iter().zip(&self.tap).all(|(&off, &tp)| {
            span[tp as usize].is_none_or(|(a, z)| off + a >= 0 && off + z < self.img_in as isize)
        })
    }
}

/// Where a tile reads its images' input planes.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// The batch itself: image `g`'s plane `c` at `x + (n0 + g)·C·P + c·P`.
    InPlace(*const f32),
    /// The group packed as `[C][G][V·16]`: plane `c` of every image one contiguous row,
    /// each map padded to whole vectors.
    Packed(*const f32),
    /// The batch itself read through a k×k conv's taps.
    Masked(*const f32, &'a Taps),
}

impl Batch<'_> {
    /// `out[n, o, :] = act(scale[o] · Σ_nz w · x[n, col, :] + bias[o] + res[n, o, :])` for
    /// every image and channel; every element written. Tasks are (image group, channel
    /// block) pairs, image groups outer (a thread's run of tasks reads few groups).
    pub fn run(&self, out: &mut [MaybeUninit<f32>]) {
        let (n, p, o, c) = (self.n, self.p, self.csr.rows, self.csr.cols);
        let img_in = self.taps.map_or(c * p, |t| t.img_in);
        let img_out = o * p;
        assert!(applies(n, p), "sparse image tiles: unsupported geometry");
        assert_eq!(out.len(), n * img_out, "sparse image tiles: output size");
        assert!(self.x.len() >= n * img_in, "sparse image tiles: input size");
        assert!(self.res.is_none_or(|r| r.len() >= n * img_out));
        match self.taps {
            // Their offsets were bound-checked when built (`Taps::new`).
            Some(t) => assert!(
                t.offs.len() == self.csr.values.len() && t.tap.len() == self.csr.values.len()
            ),
            // The bound every in-place or packed load relies on: a column names a plane.
            None => assert!(self.csr.col_idx.iter().all(|&k| (k as usize) < c)),
        }
        let vecs = p.div_ceil(16);
        let pp = vecs * 16;
        let packed = self.taps.is_none() && self.csr.values.len() >= PACK_REUSE * c;
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
        // Tasks write disjoint (image, channel) blocks.
        let base = OutPtr(out.as_mut_ptr() as *mut f32);
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
            } else if let Some(t) = self.taps {
                body(Src::Masked(self.x.as_ptr(), t));
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
    let img_in = b.taps.map_or(b.csr.cols * p, |t| t.img_in);
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
    let nz = |acc: &mut [[__m512; V]; G], i: usize| unsafe {
        let w = _mm512_set1_ps(*vals.get_unchecked(i));
        let col = *cols.get_unchecked(i) as usize;
        match src {
            Src::Masked(x, t) => {
                let off = *t.offs.get_unchecked(i);
                let m = t.masks.get_unchecked(*t.tap.get_unchecked(i) as usize);
                for g in 0..G {
                    // Masked lanes are never read: the address may lie outside the image.
                    let at = x.wrapping_add(imgs[g]).wrapping_offset(off);
                    for v in 0..V {
                        let xv = _mm512_maskz_loadu_ps(m[v], at.wrapping_add(v * 16));
                        acc[g][v] = _mm512_fmadd_ps(w, xv, acc[g][v]);
                    }
                }
            }
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
                    nz(acc, i + s);
                }
                i += S;
            }
            while i < z {
                nz(&mut part[0], i);
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
