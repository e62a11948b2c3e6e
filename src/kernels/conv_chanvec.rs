//! Direct convolution with vectors along the output channels, for dense convs on small
//! maps (the 8×8 to 2×2 stages of CIFAR nets, the 14×14 and 7×7 stages of ImageNet nets).
//!
//! The register tiles of [`super::conv_tiles`] put output positions in the vector lanes:
//! a 7×7 map flattened over its padded rows leaves a fifth of the lanes idle, and a 4×4
//! or 2×2 map half or more, so those layers went to im2col + GEMM, which copies the input
//! `kh·kw` times and packs it again. Here the lanes hold 16 output channels instead (the
//! layout onnxruntime's NCHWc kernels compute in): a tile of `R` channel blocks × `T`
//! output positions takes, per input channel and tap, `R` vector loads of weights packed
//! as `[O/16][C][kh·kw][16]` and `T` broadcasts of input values, for `R·T` FMAs (4 × 6 on
//! AVX-512, the GEMM micro-kernel's ratio) at any map size, stride and padding: the input
//! is the zero-padded, stride-phase layout of the position tiles ([`Grid`]).
//!
//! **Order.** Input channels are cut into blocks whose weights (for one group of `R`
//! channel blocks) stay in L2; within a block, every group of channel blocks sweeps all
//! positions. Partial sums live in a position-major scratch (`[P][O]`, 16-channel vectors
//! contiguous) and are finally transposed into NCHW with the bias, residual and
//! activation. With `K = C·kh·kw ≥ 256` accumulation steps per output that transpose is
//! a few per cent of the work.
//!
//! The packed weights are built per call, or once per eval plan (see `exec`). x86-64
//! with AVX-512 only; elsewhere the other paths run.

// The kernels are x86-64 only; elsewhere `applies` is false and they are not built.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_variables, unused_macros)
)]

use super::act;
use super::conv_tiles::{mode, pad_channel, Grid, OutPtr, TileMode};
use super::cpu::transpose;
use super::im2col::Geo;
use super::simd::Isa;
use crate::graph::ops::ActivationKind;

/// Lanes of a vector: output channels per block.
const L: usize = 16;
/// Channel blocks (registers of weights) per tile.
const RMAX: usize = 4;
/// Output positions (broadcasts) per tile of [`RMAX`] channel blocks.
const TMAX: usize = 6;

/// Output positions per forward tile of `r` channel blocks: as many as 24 accumulators
/// take (`r` weight registers and a broadcast beside them), so a narrow tile keeps the
/// 4 × 6 tile's ratio of FMAs to loads. With 6 positions for every `r`, the one-block
/// group of a 72-channel layer (5 blocks: 4 + 1) ran 6 FMAs per 7 loads, and the layer
/// at 298 GFLOP/s where the position tiles ran 407.
fn tmax(r: usize) -> usize {
    match r {
        1 | 2 => 8,
        _ => TMAX,
    }
}

/// The `i`-th of `parts` near-equal ranges of `0..n` (sizes differ by at most one).
fn balanced(n: usize, parts: usize, i: usize) -> (usize, usize) {
    let (base, extra) = (n / parts, n % parts);
    let lo = i * base + i.min(extra);
    (lo, lo + base + usize::from(i < extra))
}
/// Output positions a task's tiles sweep with each block of weights: small maps run
/// several images per task (a 2×2 map at batch 64 read the 9.4 MB of a 512-channel
/// layer's weights once per image).
const MIN_POSITIONS: usize = 64;
/// Accumulation steps (input channels × taps) per input-channel block: the weights of a
/// tile group's block, `RMAX·16·4` bytes a step, are 256 KB and stay in L2.
const STEPS_PER_BLOCK: usize = 1024;

/// Whether this kernel takes the conv, packing its weights per call: [`eligible`], and
/// (by rule) enough output positions in the batch that the packing costs little. At
/// batch 1 a 7×7 map's 49 positions made the packing of a 512-channel layer (9.4 MB)
/// cost as much as the conv (1.2 ms against 0.7 for im2col + GEMM, per layer on an AMD
/// EPYC); an eval plan packs once ([`applies_packed`]).
pub fn applies(g: &Geo) -> bool {
    eligible(g) && (mode() == TileMode::ChanVec || g.n * g.p() >= MIN_REUSE)
}

/// Whether this kernel takes the conv when its weights come packed.
pub fn applies_packed(g: &Geo) -> bool {
    eligible(g)
}

/// Output positions per call below which packing per call does not pay.
const MIN_REUSE: usize = 256;

/// AVX-512, ungrouped, undilated; by rule, a window larger than 1×1 with at least 32
/// output channels (two blocks) and 256 accumulation steps (so the final transpose is
/// cheap), on a map the position tiles leave (too few lanes used), where at least as
/// large a share of this kernel's lanes (output channels) holds real outputs as of the
/// position tiles' lanes (output positions), or strided with at least 128 input
/// channels: per layer on an AMD EPYC at batch 8, 128→128 at 56×56 stride 2 ran at 379
/// GFLOP/s against 332 on the position tiles, 256→256 at 28×28 at 415 against 313
/// (their stride-phase planes make every tap a separate sub-plane), 64→128 even
/// (`examples/conv_paths.rs`). The lane rule, per layer with the weights packed once:
/// 64→64 at 56×56 at batch 1 0.511 ms against 0.587 on the position tiles (96.5 % of
/// their lanes used), 32→32 at 16×16 at batch 64 0.70 against 0.74, 256→256 at 14×14
/// at batch 1 0.50 against 0.63, 136→152 at 14×14 (95 % against 87.5 %) 0.170 against
/// 0.185; pruned widths the other way: 40→40 at 56×56 (83 % against 96.5 %) 0.249
/// against 0.209, 88→72 at 28×28 (90 % against 92.5 %) 0.240 against 0.219
/// (`examples/conv_paths.rs dense|pruned`).
/// `TileMode::ChanVec` forces it wherever it can run; `Off` and `Always` never.
pub fn eligible(g: &Geo) -> bool {
    let supported = cfg!(target_arch = "x86_64")
        && super::simd::isa() == Isa::Avx512
        && g.groups == 1
        && g.dh == 1
        && g.dw == 1
        && g.oh > 0
        && g.ow > 0
        && g.o > 0
        && g.c > 0;
    supported
        && match mode() {
            TileMode::Off | TileMode::Always => false,
            TileMode::ChanVec => true,
            TileMode::Auto => {
                g.kh * g.kw > 1
                    && g.o >= 32
                    && g.k() >= 256
                    && !env_off()
                    && (!super::conv_tiles::applies(g)
                        || (g.sh * g.sw > 1 && g.c >= 128)
                        || lane_use(g) >= super::conv_tiles::lane_use(g))
            }
        }
}

/// The share of this kernel's lanes that hold real output channels (the last block's
/// missing channels are computed and dropped).
fn lane_use(g: &Geo) -> f32 {
    g.o as f32 / (g.o.div_ceil(L) * L) as f32
}

/// `LOPPER_CHANVEC=0` at start-up takes this kernel out of the rule (A/B runs against
/// the other paths; `LOPPER_CONV_TILES=0` turns off every direct path).
fn env_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::simd::env_off(&OFF, "LOPPER_CHANVEC")
}

/// Floats of the packed weights of `g`: `O` rounded up to whole blocks.
pub fn packed_len(g: &Geo) -> usize {
    g.o.div_ceil(L) * L * g.k()
}

/// Weights `[O, C, kh, kw]` → `[O/16][C][kh·kw][16]`, the last block's missing channels
/// zero.
pub fn pack(g: &Geo, w: &[f32]) -> Vec<f32> {
    let (k, taps) = (g.k(), g.kh * g.kw);
    let mut out = vec![0f32; packed_len(g)];
    super::par::chunks_mut(&mut out[..], L * k, |ob, blk| {
        for l in 0..L.min(g.o - ob * L) {
            let row = &w[(ob * L + l) * k..(ob * L + l + 1) * k];
            for (ci, wc) in row.chunks_exact(taps).enumerate() {
                for (t, &v) in wc.iter().enumerate() {
                    blk[(ci * taps + t) * L + l] = v;
                }
            }
        }
    });
    out
}

/// The packed weights of [`super::conv_tiles::transposed_geo`]`(g)` (the input
/// gradient as a conv) straight from `g`'s weights `[O, C, kh, kw]`: block `cb` holds, per
/// output-gradient channel `o` and tap, the 16 input channels `cb·16..` of the window
/// rotated by 180° (one pass instead of a transpose and a pack).
pub fn pack_flipped(g: &Geo, w: &[f32]) -> Vec<f32> {
    let taps = g.kh * g.kw;
    let k = g.o * taps;
    let mut out = vec![0f32; g.c.div_ceil(L) * L * k];
    super::par::chunks_mut(&mut out[..], L * k, |cb, blk| {
        for l in 0..L.min(g.c - cb * L) {
            let c = cb * L + l;
            for o in 0..g.o {
                let src = &w[(o * g.c + c) * taps..(o * g.c + c + 1) * taps];
                for (t, &v) in src.iter().rev().enumerate() {
                    blk[(o * taps + t) * L + l] = v;
                }
            }
        }
    });
    out
}

/// Image `xn` (`C·H·W`) into the interiors of its padded planes `d` (`C·plane`, border
/// cells already zero: a fresh buffer, or one padded before for the same geometry).
fn pad_image(g: &Geo, grid: &Grid, xn: &[f32], d: &mut [f32]) {
    let hw = g.h * g.w;
    for (c, dc) in d.chunks_exact_mut(grid.plane).enumerate() {
        pad_channel(g, grid, &xn[c * hw..(c + 1) * hw], dc);
    }
}

/// The padded-input offset of every output position of `imgs` images (padded images
/// `C·plane` apart), in NCHW position order.
fn position_offsets(g: &Geo, grid: &Grid, imgs: usize) -> Vec<usize> {
    let img_len = g.c * grid.plane;
    let mut offs = Vec::with_capacity(imgs * g.p());
    for n in 0..imgs {
        for oy in 0..g.oh {
            offs.extend((0..g.ow).map(|ox| n * img_len + oy * grid.cols + ox));
        }
    }
    offs
}

/// One call's fixed operands.
struct Layer<'a> {
    g: &'a Geo,
    grid: Grid,
    /// Images per task: enough that a tile group's weights serve [`MIN_POSITIONS`].
    imgs: usize,
    /// Padded-input offset of each output position of `imgs` images (padded images
    /// `C·plane` apart), and of each tap.
    offs: Vec<usize>,
    taps: Vec<usize>,
    w: &'a [f32],
    /// Input channels per block.
    cb: usize,
}

/// A thread's padded input (with the geometry its zero border was written for) and
/// partial-sum scratch.
struct Bufs {
    xp: Vec<f32>,
    key: Option<[usize; 9]>,
    acc: Vec<f32>,
}

thread_local! {
    static BUFS: std::cell::RefCell<Bufs> = const {
        std::cell::RefCell::new(Bufs { xp: Vec::new(), key: None, acc: Vec::new() })
    };
}

impl Layer<'_> {
    /// Floats of one padded image.
    fn img_len(&self) -> usize {
        self.g.c * self.grid.plane
    }

    /// What decides which cells of a padded image are border (always zero).
    fn key(&self) -> [usize; 9] {
        let (g, grid) = (self.g, &self.grid);
        [g.c, g.h, g.w, g.sh, g.sw, g.pt, g.pl, grid.rows, grid.cols]
    }

    /// Pads the images of `xs` (whole images) into `xp`, whose border cells are zero
    /// (only the interiors are written).
    fn pad(&self, xs: &[f32], xp: &mut [f32]) {
        let img = self.g.c * self.g.h * self.g.w;
        for (xn, d) in xs
            .chunks_exact(img)
            .zip(xp.chunks_exact_mut(self.img_len()))
        {
            pad_image(self.g, &self.grid, xn, d);
        }
    }

    /// Output channel blocks `b0..b1` of `imgs` padded images in `xp`, at positions
    /// `qa..qb` of the images' `imgs·P`: accumulate into `acc` (`(qb − qa) × (b1 − b0)·16`),
    /// then transpose into `out` (the first image's NCHW output, the others after it)
    /// with the epilogue; `res` likewise.
    ///
    /// # Safety
    /// `out` holds the images' `O·P` outputs each and no other task writes channels
    /// `b0·16..b1·16` at these positions.
    #[allow(clippy::too_many_arguments)]
    unsafe fn blocks(
        &self,
        xp: &[f32],
        imgs: usize,
        (b0, b1): (usize, usize),
        (qa, qb): (usize, usize),
        acc: &mut Vec<f32>,
        out: OutPtr,
        epi: Option<(&[f32], Option<ActivationKind>)>,
        res: Option<&[f32]>,
    ) {
        let g = self.g;
        let (k, ntaps) = (g.k(), self.taps.len());
        let width = (b1 - b0) * L;
        if acc.len() < (qb - qa) * width {
            acc.resize((qb - qa) * width, 0.0);
        }
        assert!(imgs <= self.imgs && xp.len() >= imgs * self.img_len());
        assert!(qb <= imgs * g.p() && self.w.len() >= b1 * L * k);
        let mut c0 = 0;
        while c0 < g.c {
            let cb = self.cb.min(g.c - c0);
            // Near-equal groups of at most RMAX blocks (5 blocks as 3 + 2, not 4 + 1).
            let ngroups = (b1 - b0).div_ceil(RMAX);
            for gi in 0..ngroups {
                let (lo, hi) = balanced(b1 - b0, ngroups, gi);
                let (ob, r) = (b0 + lo, hi - lo);
                let mut q0 = qa;
                while q0 < qb {
                    let t = tmax(r).min(qb - q0);
                    let tile = Tile {
                        x: xp[c0 * self.grid.plane..].as_ptr(),
                        plane: self.grid.plane,
                        offs: &self.offs[q0..q0 + t],
                        taps: &self.taps,
                        cb,
                        w: self.w[(ob * k + c0 * ntaps) * L..].as_ptr(),
                        wstride: k * L,
                        acc: Acc {
                            at: acc[(q0 - qa) * width + (ob - b0) * L..].as_mut_ptr(),
                            stride: width,
                            first: c0 == 0,
                        },
                    };
                    // SAFETY: every tap of every position of the block's channels is
                    // inside xp (the grid covers the window of every output); weights
                    // r blocks of k·16 from block ob ≤ b1; acc rows t of width.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        run(r, t, &tile)
                    };
                    q0 += t;
                }
            }
            c0 += cb;
        }
        // Transpose each image's part into NCHW rows (through a small block in cache,
        // since other tasks may own the rest of the rows) with the epilogue.
        let (pi, o1) = (g.p(), (b1 * L).min(g.o));
        let nch = o1 - b0 * L;
        let mut tmp = Vec::new();
        for n in qa / pi..qb.div_ceil(pi) {
            let (lo, hi) = (qa.max(n * pi) - n * pi, qb.min((n + 1) * pi) - n * pi);
            let len = hi - lo;
            tmp.resize(nch * len, 0.0);
            transpose(
                &acc[(n * pi + lo - qa) * width..],
                width,
                len,
                nch,
                &mut tmp,
                len,
            );
            for (c, src) in tmp.chunks_exact(len).enumerate() {
                let o = b0 * L + c;
                let at = (n * g.o + o) * pi + lo;
                // SAFETY: channel o of image n at positions lo..hi, owned by this task.
                let row = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), len) };
                row.copy_from_slice(src);
                let b = epi.map_or(0.0, |e| e.0[o]);
                let a = epi.and_then(|e| e.1);
                let r = res.map(|r| &r[at..at + len]);
                if b != 0.0 || a.is_some() || r.is_some() {
                    act::bias_act(row, b, r, a);
                }
            }
        }
    }
}

/// One tile's operands: `x` at the block's first padded input channel (`plane` apart),
/// the tile's position offsets and the tap offsets, `cb` channels; `w` at the first
/// channel block's weights for the block's first channel (blocks `wstride` apart), `acc`
/// at the tile's first position and block (positions its `stride` apart).
struct Tile<'a> {
    x: *const f32,
    plane: usize,
    offs: &'a [usize],
    taps: &'a [usize],
    cb: usize,
    w: *const f32,
    wstride: usize,
    acc: Acc,
}

/// A tile's partial sums in a scratch: `T` rows `stride` floats apart of `R` channel
/// blocks from `at`; they start at zero in the first sweep (`first`), else from there.
struct Acc {
    at: *mut f32,
    stride: usize,
    first: bool,
}

/// The accumulators of `a`.
///
/// # Safety
/// AVX-512F; unless `first`, `a` holds `T` rows of `R` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_acc<const R: usize, const T: usize>(a: &Acc) -> [[std::arch::x86_64::__m512; T]; R] {
    use std::arch::x86_64::*;
    let mut v = [[_mm512_setzero_ps(); T]; R];
    if !a.first {
        for (r, vr) in v.iter_mut().enumerate() {
            for (t, x) in vr.iter_mut().enumerate() {
                // SAFETY: the caller's contract.
                *x = unsafe { _mm512_loadu_ps(a.at.add(t * a.stride + r * L)) };
            }
        }
    }
    v
}

/// Stores the accumulators `v` to `a`.
///
/// # Safety
/// AVX-512F; `a` holds `T` rows of `R` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_acc<const R: usize, const T: usize>(
    a: &Acc,
    v: &[[std::arch::x86_64::__m512; T]; R],
) {
    use std::arch::x86_64::*;
    for (r, vr) in v.iter().enumerate() {
        for (t, x) in vr.iter().enumerate() {
            // SAFETY: the caller's contract.
            unsafe { _mm512_storeu_ps(a.at.add(t * a.stride + r * L), *x) };
        }
    }
}

/// `R` channel blocks × `T` positions.
///
/// # Safety
/// AVX-512F; the operands as [`Tile`] describes, in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const R: usize, const T: usize>(k: &Tile) {
    use std::arch::x86_64::*;
    unsafe {
        let mut a = load_acc::<R, T>(&k.acc);
        let offs: [usize; T] = std::array::from_fn(|t| k.offs[t]);
        let ntaps = k.taps.len();
        let (mut xc, mut wc) = (k.x, k.w);
        for _ in 0..k.cb {
            for (ti, &tap) in k.taps.iter().enumerate() {
                let mut wv = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    wv[r] = _mm512_loadu_ps(wc.add(r * k.wstride + ti * L));
                }
                for t in 0..T {
                    let xv = _mm512_set1_ps(*xc.add(offs[t] + tap));
                    for r in 0..R {
                        a[r][t] = _mm512_fmadd_ps(wv[r], xv, a[r][t]);
                    }
                }
            }
            xc = xc.add(k.plane);
            wc = wc.add(ntaps * L);
        }
        store_acc::<R, T>(&k.acc, &a);
    }
}

/// Calls `$f::<R, T>($k)` for the run-time `($r, $t)`, `1 ≤ R ≤ RMAX`, `1 ≤ T ≤ TMAX`:
/// every tile, remainders included, runs on its exact-size kernel.
macro_rules! exact {
    ($f:ident, $r:expr, $t:expr, $k:expr) => {
        exact!(@ $f, $r, $t, $k; 1,1; 1,2; 1,3; 1,4; 1,5; 1,6; 2,1; 2,2; 2,3; 2,4; 2,5; 2,6;
               3,1; 3,2; 3,3; 3,4; 3,5; 3,6; 4,1; 4,2; 4,3; 4,4; 4,5; 4,6)
    };
    (@ $f:ident, $r:expr, $t:expr, $k:expr; $($a:literal, $b:literal);*) => {
        match ($r, $t) {
            $(($a, $b) => $f::<$a, $b>($k),)*
            (r, t) => unreachable!("tile {r}×{t} outside the dispatch table"),
        }
    };
}

/// Dispatches a forward tile to its exact-size kernel.
///
/// # Safety
/// As [`tile`]; `1 ≤ r ≤ RMAX`, `1 ≤ t ≤ tmax(r)`.
#[cfg(target_arch = "x86_64")]
unsafe fn run(r: usize, t: usize, k: &Tile) {
    // SAFETY: the caller's contract.
    unsafe {
        exact!(@ tile, r, t, k;
            1,1; 1,2; 1,3; 1,4; 1,5; 1,6; 1,7; 1,8;
            2,1; 2,2; 2,3; 2,4; 2,5; 2,6; 2,7; 2,8;
            3,1; 3,2; 3,3; 3,4; 3,5; 3,6;
            4,1; 4,2; 4,3; 4,4; 4,5; 4,6)
    }
}

/// `out [N, O, OH, OW] = conv(x, w) + bias`, then the activation, with `res` added
/// before it; `packed` is [`pack`]`(g, w)` if the caller keeps one (else built here).
/// `out` needs no initialisation.
pub fn forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    packed: Option<&[f32]>,
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
    res: Option<&[f32]>,
) {
    assert!(if packed.is_some() {
        applies_packed(g)
    } else {
        applies(g)
    });
    let owned;
    let wp = match packed {
        Some(p) => p,
        None => {
            owned = pack(g, w);
            &owned
        }
    };
    assert!(wp.len() >= packed_len(g), "packed conv weights too short");
    let (img_in, img_out) = (g.c * g.h * g.w, g.o * g.p());
    assert!(x.len() >= g.n * img_in && out.len() >= g.n * img_out);
    let threads = rayon::current_num_threads().max(1);
    let grid = Grid::new(g);
    // Images per task: enough positions for the weights' reuse, but a task per thread;
    // fewer images than threads are one task group sharing the channel blocks.
    let imgs = if g.n >= threads {
        MIN_POSITIONS.div_ceil(g.p()).min(g.n / threads).max(1)
    } else {
        g.n
    };
    let img_len = g.c * grid.plane;
    let offs = position_offsets(g, &grid, imgs);
    let taps = (0..g.kh)
        .flat_map(|ky| (0..g.kw).map(move |kx| (ky, kx)))
        .map(|(ky, kx)| grid.tap(g, 0, ky, kx))
        .collect();
    let layer = Layer {
        g,
        grid,
        imgs,
        offs,
        taps,
        w: wp,
        cb: (STEPS_PER_BLOCK / (g.kh * g.kw)).max(1),
    };
    let nb = g.o.div_ceil(L);
    if g.n >= threads {
        // One task per run of `imgs` images, padded into the thread's own buffer.
        super::par::chunks_mut(&mut out[..g.n * img_out], imgs * img_out, |ti, o| {
            let (n0, m) = (ti * imgs, o.len() / img_out);
            BUFS.with(|b| {
                let Bufs { xp, key, acc } = &mut *b.borrow_mut();
                let xp = super::conv_tiles::zeroed_for(layer.key(), key, xp, m * img_len);
                layer.pad(&x[n0 * img_in..(n0 + m) * img_in], xp);
                let rn = res.map(|r| &r[n0 * img_out..(n0 + m) * img_out]);
                let outp = OutPtr(o.as_mut_ptr());
                // SAFETY: this task owns the images.
                unsafe { layer.blocks(xp, m, (0, nb), (0, m * g.p()), acc, outp, epi, rn) };
            })
        });
        return;
    }
    // Fewer images than threads: padded once, shared out as (tile groups of channel
    // blocks × position ranges); position ranges too, or a 64-channel layer at batch 1
    // (one tile group) would run on one thread.
    let groups = nb.div_ceil(RMAX);
    let csplits = (2 * threads).min(groups).max(1);
    let total = g.n * g.p();
    let psplits = (2 * threads)
        .div_ceil(csplits)
        .min(total / (4 * TMAX))
        .max(1);
    let pper = total.div_ceil(psplits);
    let outp = OutPtr(out.as_mut_ptr());
    let layer = &layer;
    let len = g.n * img_len;
    super::conv_tiles::with_shared_pad(g, &layer.grid, x, g.n, len, |xp| {
        super::par::for_each(csplits * psplits, move |task| {
            let (s, ps) = (task / psplits, task % psplits);
            let (b0, b1) = balanced(nb, csplits, s);
            let (qa, qb) = (ps * pper, ((ps + 1) * pper).min(total));
            if b0 >= b1 || qa >= qb {
                return;
            }
            BUFS.with(|b| {
                let acc = &mut b.borrow_mut().acc;
                // SAFETY: the tasks own disjoint (channel block, position) ranges.
                unsafe { layer.blocks(xp, g.n, (b0, b1), (qa, qb), acc, outp, epi, res) };
            })
        })
    });
}

/// Whether [`backward_weight`] takes the weight gradient of `g`: AVX-512, ungrouped,
/// undilated, a window larger than 1×1 (a 1×1 conv's weight gradient is a GEMM on the
/// input as it is), at least 32 output channels; by rule, maps under 256 positions or
/// batches of at most 8, where the GEMM's per-image reductions are short. Per layer on an
/// AMD EPYC (`examples/conv_paths.rs`): 2×2 at batch 64, 512 channels, 308 GFLOP/s
/// against 158; 4×4 370 against 247; 7×7 at batch 1 155 against 11; 56×56 at batch 8
/// 329 against 202. Stride-1 maps up to 28×28 at any batch since the thirteenth session's
/// GEMM changes: at batch 64, 32→32 at 16×16 0.93 ms against 1.07 on the GEMM, 64→128
/// at 16×16 5.56 against 5.77, 32→32 at 28×28 2.90 against 3.08, 40→40 at 16×16 1.25
/// against 1.60; 24→40 at 32×32 4.12 against 3.87 stays on the GEMM. Follows the tile
/// mode like the forward.
pub fn weight_grad_applies(g: &Geo) -> bool {
    cfg!(target_arch = "x86_64")
        && super::simd::isa() == Isa::Avx512
        && g.groups == 1
        && g.dh == 1
        && g.dw == 1
        && g.p() > 0
        && g.o >= 32
        && g.kh * g.kw > 1
        && match mode() {
            TileMode::Off | TileMode::Always => false,
            TileMode::ChanVec => true,
            TileMode::Auto => {
                !env_off()
                    && (g.p() <= MAX_WGRAD_MAP
                        || g.sh * g.sw == 1 && g.p() <= MAX_WGRAD_MAP_S1
                        || g.n <= 8)
            }
        }
}

/// Output maps up to this many positions take [`backward_weight`] at any batch and
/// stride (a 32×32 input at stride 2, 256 output positions, at batch 64 ran 1.42 ms
/// against 1.37 on the GEMM) ...
const MAX_WGRAD_MAP: usize = 255;
/// ... and stride-1 maps up to 28×28.
const MAX_WGRAD_MAP_S1: usize = 784;

/// Positions of a weight-gradient sweep: one tile group's output-gradient rows for them
/// (`RMAX·16` floats each, 128 KB) stay in L2 while every pair tile reads them.
const WG_CHUNK: usize = 512;

/// The weight gradient `dW [O, C, kh, kw] = Σ_{n,q} dy[n, o, q] · x_pad[n, c, q + tap]` in
/// channel-vector tiles: the output gradient transposed once to position-major rows of
/// 16-channel vectors, a tile of `R` channel blocks × `T` (input channel, tap) pairs
/// takes, per output position, `R` vector loads of it and `T` broadcasts of padded input
/// for `R·T` FMAs. im2col + GEMM ran the 2×2 maps of a CIFAR VGG at 114 GFLOP/s (its
/// reduction is over only `B·4` columns per batch of images, and the column matrix is
/// copied twice). Tasks own disjoint (channel group, pair range) blocks and sum over
/// every position in a fixed order: deterministic for any thread count.
pub fn backward_weight(g: &Geo, x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert!(weight_grad_applies(g));
    let (p, k) = (g.p(), g.k());
    let (img_in, img_out) = (g.c * g.h * g.w, g.o * p);
    assert!(x.len() >= g.n * img_in && dy.len() >= g.n * img_out);
    let grid = Grid::new(g);
    let img_len = g.c * grid.plane;
    let m = g.n * p;
    let opad = g.o.div_ceil(L) * L;
    // Position-major output gradient, padded channels zero.
    // SAFETY: each image's block is filled below: transposed channels, zero padding.
    let mut dyt = unsafe { super::cpu::unfilled(m * opad) };
    super::par::chunks_mut(&mut dyt[..], p * opad, |n, d| {
        transpose(&dy[n * img_out..(n + 1) * img_out], p, g.o, p, d, opad);
        if opad > g.o {
            for row in d.chunks_exact_mut(opad) {
                row[g.o..].fill(0.0);
            }
        }
    });
    // Padded inputs, all images.
    let mut xp = vec![0f32; g.n * img_len];
    super::par::chunks_mut(&mut xp[..], img_len, |n, d| {
        pad_image(g, &grid, &x[n * img_in..(n + 1) * img_in], d)
    });
    let offs = position_offsets(g, &grid, g.n);
    // (c, tap) pairs in dW's order.
    let pairs: Vec<usize> = (0..g.c)
        .flat_map(|c| (0..g.kh).flat_map(move |ky| (0..g.kw).map(move |kx| (c, ky, kx))))
        .map(|(c, ky, kx)| grid.tap(g, c, ky, kx))
        .collect();
    debug_assert_eq!(pairs.len(), k);
    let nb = opad / L;
    let groups = nb.div_ceil(RMAX);
    // Tasks: channel groups × pair ranges (whole tiles), ~2 per thread (every range
    // re-reads its group's output-gradient rows).
    let threads = rayon::current_num_threads().max(1);
    let ranges = (2 * threads).div_ceil(groups).max(1);
    let per = k.div_ceil(ranges).next_multiple_of(TMAX);
    let ranges = k.div_ceil(per);
    let mut dw = vec![0f32; g.o * k];
    let out = OutPtr(dw.as_mut_ptr());
    let (dyt, xp, offs, pairs) = (&dyt, &xp, &offs, &pairs);
    super::par::for_each(groups * ranges, move |task| {
        let (gi, ri) = (task / ranges, task % ranges);
        let (b0, b1) = (gi * RMAX, ((gi + 1) * RMAX).min(nb));
        let (p0, p1) = (ri * per, ((ri + 1) * per).min(k));
        let width = (b1 - b0) * L;
        // Partial sums, pair-major: [p1 − p0][width].
        let mut acc = vec![0f32; (p1 - p0) * width];
        let mut m0 = 0;
        while m0 < m {
            let mc = WG_CHUNK.min(m - m0);
            let mut pi = p0;
            while pi < p1 {
                let t = TMAX.min(p1 - pi);
                let tile = WTile {
                    x: xp.as_ptr(),
                    offs: &offs[m0..m0 + mc],
                    pairs: &pairs[pi..pi + t],
                    dy: dyt[m0 * opad + b0 * L..].as_ptr(),
                    dstride: opad,
                    acc: Acc {
                        at: acc[(pi - p0) * width..].as_mut_ptr(),
                        stride: width,
                        first: m0 == 0,
                    },
                };
                // SAFETY: every pair's tap of every position is inside xp (the grid
                // covers each output's window); dy rows of the chunk hold the blocks
                // b0..b1; acc holds t rows of width from pi.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    run_w(b1 - b0, t, &tile)
                };
                pi += t;
            }
            m0 += mc;
        }
        // Pair-major partial sums → dW rows (this task's channels and pairs only).
        // In 16-pair blocks, so that each dW row is written a cache line at a time.
        for j0 in (p0..p1).step_by(16) {
            for o in b0 * L..(b1 * L).min(g.o) {
                let col = o - b0 * L;
                for j in j0..(j0 + 16).min(p1) {
                    // SAFETY: row o, pairs p0..p1 of dW belong to this task alone.
                    unsafe { *out.get().add(o * k + j) = acc[(j - p0) * width + col] };
                }
            }
        }
    });
    dw
}

/// One weight-gradient tile's operands: the padded inputs, the chunk's position offsets
/// and the tile's pair offsets; `dy` at the chunk's first position-major row and the
/// group's first block (rows `dstride` apart); `acc` at the tile's first pair (rows its
/// `stride` apart).
struct WTile<'a> {
    x: *const f32,
    offs: &'a [usize],
    pairs: &'a [usize],
    dy: *const f32,
    dstride: usize,
    acc: Acc,
}

/// `R` channel blocks × `T` pairs over the chunk's positions.
///
/// # Safety
/// AVX-512F; the operands as [`WTile`] describes, in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
unsafe fn wtile<const R: usize, const T: usize>(k: &WTile) {
    use std::arch::x86_64::*;
    unsafe {
        let mut a = load_acc::<R, T>(&k.acc);
        let pairs: [usize; T] = std::array::from_fn(|t| k.pairs[t]);
        let mut dy = k.dy;
        for &off in k.offs {
            let mut dv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                dv[r] = _mm512_loadu_ps(dy.add(r * L));
            }
            let xb = k.x.add(off);
            for t in 0..T {
                let xv = _mm512_set1_ps(*xb.add(pairs[t]));
                for r in 0..R {
                    a[r][t] = _mm512_fmadd_ps(dv[r], xv, a[r][t]);
                }
            }
            dy = dy.add(k.dstride);
        }
        store_acc::<R, T>(&k.acc, &a);
    }
}

/// Dispatches a weight-gradient tile to its exact-size kernel.
///
/// # Safety
/// As [`wtile`]; `1 ≤ r ≤ RMAX`, `1 ≤ t ≤ TMAX`.
#[cfg(target_arch = "x86_64")]
unsafe fn run_w(r: usize, t: usize, k: &WTile) {
    // SAFETY: the caller's contract.
    unsafe { exact!(wtile, r, t, k) }
}

#[cfg(test)]
mod tests {
    use super::balanced;

    /// The ranges cover `0..n` in order, without gaps or overlaps, sizes within one.
    #[test]
    fn balanced_ranges_partition() {
        for n in 0..40 {
            for parts in 1..9 {
                let rs: Vec<_> = (0..parts).map(|i| balanced(n, parts, i)).collect();
                assert_eq!(rs[0].0, 0);
                assert_eq!(rs[parts - 1].1, n);
                for w in rs.windows(2) {
                    assert_eq!(w[0].1, w[1].0, "n {n} parts {parts}");
                }
                let sizes: Vec<_> = rs.iter().map(|r| r.1 - r.0).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "n {n} parts {parts}: {sizes:?}");
            }
        }
    }
}
