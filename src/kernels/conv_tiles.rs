//! Direct convolution in register tiles for dense and grouped convs with a window larger
//! than 1×1 (the 3×3 convs that are most of a ResNet's or VGG's time).
//!
//! im2col + GEMM writes a `C·kh·kw × P` column matrix per image and the GEMM packs it
//! again: on ResNet-20 at batch 64 a quarter of the conv time was that copying. Here the
//! input is copied once into zero-padded planes (`C·H·W`, not `C·kh·kw·H·W`), and a tile
//! of `R` output channels × `T` output vectors is accumulated in registers: per filter
//! tap, `T` unaligned vector loads and `R` broadcast weights feed `R·T` FMAs (4 × 6 on
//! AVX-512, 10 loads per 24 FMAs; the GEMM micro-kernel's ratio).
//!
//! **Layout.** Each padded channel is split into stride phases along both axes (`sh·sw`
//! sub-planes of `rows × cols`), so that output `(oy, ox)` under tap `(ky, kx)` reads
//! sub-plane `(ky mod sh, kx mod sw)` at `(oy + ky / sh, ox + kx / sw)`. Output positions
//! are then flattened as `q = oy·cols + ox`: a tap is one constant offset for every `q`,
//! vectors run across row ends (the `cols − ow` extra columns per row are computed and
//! dropped), and narrow maps fill whole vectors — an 8×8 map is 5 AVX-512 vectors, where
//! per-row vectors would run at half width. Any stride and asymmetric padding.
//!
//! **Order.** Positions are cut into bands; within a band every block of `R` output
//! channels runs over the band's vectors, so the band's input stays in cache while the
//! weights stream. Each finished block is copied from the flattened layout into the
//! output with its activation and residual (the bias starts the accumulators).
//!
//! Pruned layers keep their efficiency: remainder channels and vectors get exact-size
//! tiles (`R`, `T` are const parameters, dispatched per remainder), not padded ones.
//! x86-64 with AVX2 or AVX-512 only; elsewhere (and for dilated convs) im2col + GEMM.

// The explicit-vector kernels are x86-64 only; elsewhere `applies` is false and they are
// not built.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_variables, unused_macros)
)]

use super::act;
use super::im2col::Geo;
use super::planes::{clamp_split, copy_strided, span};
use super::simd::{multiversion, Isa};
use crate::graph::ops::ActivationKind;
use std::sync::atomic::{AtomicU8, Ordering};

/// When the tile path runs: by its own rule, never, or wherever it can (tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileMode {
    Auto = 0,
    Off = 1,
    Always = 2,
    /// The channel-vector kernel ([`super::conv_chanvec`]) wherever it can run (tests).
    ChanVec = 3,
}

static MODE: AtomicU8 = AtomicU8::new(TileMode::Auto as u8);

/// Sets the mode process-wide: `Off` for A/B measurements against im2col + GEMM,
/// `Always` for tests that run the tiles on shapes the rule would give to the GEMM.
/// `LOPPER_CONV_TILES=0` at start-up is `Off`, `LOPPER_CONV_TILES=always` `Always` (A/B
/// runs of whole models).
pub fn set_mode(mode: TileMode) {
    MODE.store(mode as u8, Ordering::Relaxed);
}

pub(crate) fn mode() -> TileMode {
    static ENV: std::sync::OnceLock<Option<TileMode>> = std::sync::OnceLock::new();
    let env = ENV.get_or_init(|| match std::env::var("LOPPER_CONV_TILES").as_deref() {
        Ok("0") => Some(TileMode::Off),
        Ok("always") => Some(TileMode::Always),
        _ => None,
    });
    if let Some(m) = *env {
        return m;
    }
    match MODE.load(Ordering::Relaxed) {
        1 => TileMode::Off,
        2 => TileMode::Always,
        3 => TileMode::ChanVec,
        _ => TileMode::Auto,
    }
}

/// Whether the tile path takes this conv: a vector ISA and an undilated window (what
/// the kernels support), and by the rule (unless forced): a window larger than 1×1 (a
/// 1×1 conv is a GEMM without im2col), enough input channels per group that each
/// weight's reuse pays for the padding copy (the few-channel stems have
/// [`super::direct`]; depthwise convs theirs), enough of the lanes used, and AVX-512.
pub fn applies(g: &Geo) -> bool {
    let supported = cfg!(target_arch = "x86_64")
        && super::simd::isa() != Isa::Portable
        && g.dh == 1
        && g.dw == 1
        && g.oh > 0
        && g.ow > 0;
    supported
        && match mode() {
            TileMode::Off | TileMode::ChanVec => false,
            TileMode::Always => true,
            TileMode::Auto => {
                // AVX2 tiles (4 × 3 registers of 8 floats, through a scratch) ran ResNet-20
                // at b64 in 53 ms against 25 ms for the GEMM path on this AVX-512 machine
                // with LOPPER_ISA=avx2 (the GEMM crate keeps AVX-512 there); not measured
                // on an AVX2-only CPU, so by rule only AVX-512 takes the tiles. The AVX2
                // kernels stay correct and tested (`Always`).
                // Few input channels: RGB and grey stems the direct path leaves here.
                super::simd::isa() == Isa::Avx512
                    && g.kh * g.kw > 1
                    && (g.cg() >= 5 || g.groups == 1 && g.c <= super::direct::MAX_CHANNELS)
                    && dense_enough(g)
            }
        }
}

/// The geometry whose forward is `g`'s input gradient, when that runs on the tiles: a
/// stride-1 conv's input gradient is the conv of the output gradient (`O` channels, the
/// output's size) with the filters flipped and transposed ([`flip_transpose`]), padded by
/// `k − 1 − p` before (after: whatever reaches the input's size).
pub fn transposed(g: &Geo) -> Option<Geo> {
    transposed_geo(g).filter(applies)
}

/// The geometry of [`transposed`], whichever kernel runs it.
pub fn transposed_geo(g: &Geo) -> Option<Geo> {
    if g.sh != 1 || g.sw != 1 || g.pt >= g.kh || g.pl >= g.kw {
        return None;
    }
    let t = Geo {
        n: g.n,
        c: g.o,
        h: g.oh,
        w: g.ow,
        o: g.c,
        kh: g.kh,
        kw: g.kw,
        oh: g.h,
        ow: g.w,
        sh: 1,
        sw: 1,
        pt: g.kh - 1 - g.pt,
        pl: g.kw - 1 - g.pl,
        dh: g.dh,
        dw: g.dw,
        groups: g.groups,
    };
    Some(t)
}

/// Filters `[O, C/g, kh, kw]` → `[C, O/g, kh, kw]`, each window rotated by 180°, for the
/// input gradient of [`transposed`].
pub fn flip_transpose(g: &Geo, w: &[f32]) -> Vec<f32> {
    let (og, cg, khw) = (g.og(), g.cg(), g.kh * g.kw);
    let mut out = vec![0f32; g.c * og * khw];
    for gi in 0..g.groups {
        for oi in 0..og {
            for ci in 0..cg {
                let src = &w[((gi * og + oi) * cg + ci) * khw..][..khw];
                let dst = &mut out[((gi * cg + ci) * og + oi) * khw..][..khw];
                for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *s;
                }
            }
        }
    }
    out
}

/// At least this share of the vector lanes must be real outputs, not the extra columns
/// of the flattened rows, for the tiles to beat im2col + GEMM (whose micro-kernel reads
/// packed, aligned panels). Measured per layer on an AMD EPYC (AVX-512, 2 threads): a
/// 16×16 map (89 %) and larger win, by 10–40 % with few channels; 8×8 (80 %) and 7×7
/// (77 %) lose by 10–25 % with 64–512 channels; 4×4 and 2×2 maps (50 %, 25 %) run at
/// half speed or worse. Those maps go to the channel-vector tiles
/// ([`super::conv_chanvec`], whose lanes are output channels) where they apply, else to
/// several images per GEMM ([`super::conv_batched`]).
const MIN_LANE_USE: f32 = 0.85;

fn dense_enough(g: &Geo) -> bool {
    let used = lane_use(g);
    used >= MIN_LANE_USE || g.og() < FEW_OUTPUTS && used >= MIN_LANE_USE_FEW
}

/// The share of the tiles' vector lanes that hold real outputs (the rest are the extra
/// columns of the flattened, padded rows).
pub(super) fn lane_use(g: &Geo) -> f32 {
    let (lanes, _, _) = shape(super::simd::isa());
    let vecs = Grid::new(g).q(g).div_ceil(lanes);
    g.p() as f32 / (vecs * lanes) as f32
}

/// With fewer output channels per group than this (no channel-vector tiles, and a GEMM
/// whose left operand is that many rows per image), the tiles win at lower lane use:
/// LeNet-5's 6→16 5×5 conv onto 10×10 (69 % of the lanes) at batch 64 took the model from
/// 0.71–0.75 to 0.38 ms (onnxruntime 0.50).
const FEW_OUTPUTS: usize = 32;
const MIN_LANE_USE_FEW: f32 = 0.5;

/// The padded, phase-split layout of one input channel for a geometry.
#[derive(Clone, Copy, Debug)]
pub(super) struct Grid {
    /// Rows and columns of a sub-plane.
    pub rows: usize,
    pub cols: usize,
    /// Floats per channel (`sh·sw` sub-planes).
    pub plane: usize,
}

impl Grid {
    pub fn new(g: &Geo) -> Grid {
        let rows = g.oh + (g.kh - 1) / g.sh;
        let cols = g.ow + (g.kw - 1) / g.sw;
        Grid {
            rows,
            cols,
            plane: g.sh * g.sw * rows * cols,
        }
    }

    /// Offset of tap `(c, ky, kx)` from an output position's flattened index.
    pub fn tap(&self, g: &Geo, c: usize, ky: usize, kx: usize) -> usize {
        let sub = self.rows * self.cols;
        c * self.plane
            + ((ky % g.sh) * g.sw + kx % g.sw) * sub
            + (ky / g.sh) * self.cols
            + kx / g.sw
    }

    /// Flattened output positions (`oh` rows of `cols`).
    fn q(&self, g: &Geo) -> usize {
        g.oh * self.cols
    }
}

multiversion! {
/// Copies channel `x` (`h × w`) into the interior of its padded sub-planes `dst`
/// (`grid.plane` floats) whose border is already zero: the border cells are the same for
/// every channel and image of a geometry, so they are zeroed once per buffer and geometry
/// (see [`forward_epi`]), not per row (where they were a tenth of the copy's time).
/// Compiled per ISA: in baseline x86-64 code the copy was 12 % of ResNet-20's inference.
pub(super) fn pad_channel(g: &Geo, grid: &Grid, x: &[f32], dst: &mut [f32]) {
    let sub = grid.rows * grid.cols;
    for py in 0..g.sh {
        for px in 0..g.sw {
            let base = (py * g.sw + px) * sub;
            pad_phase(g, grid, x, &mut dst[base..base + sub], py, px);
        }
    }
}
}

/// Sub-plane `(py, px)` of [`pad_channel`] (`dst`: its `rows × cols` floats).
#[inline(always)]
fn pad_phase(g: &Geo, grid: &Grid, x: &[f32], dst: &mut [f32], py: usize, px: usize) {
    // Sub-plane columns j hold input column j·sw + px − pl: valid in [lo, hi).
    let (lo, hi) = span(px as isize - g.pl as isize, g.sw, g.w, grid.cols);
    if lo >= hi {
        return;
    }
    let first = (lo * g.sw + px) - g.pl;
    for i in 0..grid.rows {
        let y = (i * g.sh + py) as isize - g.pt as isize;
        if y < 0 || y as usize >= g.h {
            continue;
        }
        let d = &mut dst[i * grid.cols + lo..i * grid.cols + hi];
        copy_strided(d, &x[y as usize * g.w..(y as usize + 1) * g.w], first, g.sw);
    }
}

multiversion! {
/// [`pad_channel`] for one sub-plane, compiled per ISA (the parallel padding's task).
fn pad_phase_isa(g: &Geo, grid: &Grid, x: &[f32], dst: &mut [f32], py: usize, px: usize) {
    pad_phase(g, grid, x, dst, py, px)
}
}

/// The first `len` floats of `xp` with every cell outside the planes' interiors zero for
/// the geometry `key`: zeroed when the key changes (the padding writes only interiors,
/// so a buffer padded before for the same key keeps its zero border and slack), grown
/// with zeros when short.
pub(super) fn zeroed_for<'a, const K: usize>(
    key: [usize; K],
    have: &mut Option<[usize; K]>,
    xp: &'a mut Vec<f32>,
    len: usize,
) -> &'a mut [f32] {
    if *have != Some(key) {
        xp.clear();
        *have = Some(key);
    }
    if xp.len() < len {
        xp.resize(len, 0.0);
    }
    &mut xp[..len]
}

thread_local! {
    /// The calling thread's padded image for calls whose tasks share it (fewer images
    /// than threads), with the key it was laid out for.
    static SHARED: std::cell::RefCell<(Option<[usize; 10]>, Vec<f32>)> =
        const { std::cell::RefCell::new((None, Vec::new())) };
}

/// Input floats from which the shared padding is split between the pool's threads.
const PAR_PAD: usize = 1 << 16;

/// Runs `f` on the `imgs` images of `x` padded into `grid`'s planes (`len` floats in
/// all, each image `C` planes): a buffer kept by the calling thread and zeroed once per
/// geometry (only the planes' interiors are ever written). Allocated and zeroed per call,
/// it cost ResNet-56 4 % of its batch-1 time on two threads (0.884 → 0.847 ms; the other
/// thread waits for the padding).
pub(super) fn with_shared_pad<R>(
    g: &Geo,
    grid: &Grid,
    x: &[f32],
    imgs: usize,
    len: usize,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    let key = [
        g.c, g.h, g.w, g.sh, g.sw, g.pt, g.pl, grid.rows, grid.cols, len,
    ];
    let (mut have, mut buf) = SHARED.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let xp = zeroed_for(key, &mut have, &mut buf, len);
    let (hw, pl) = (g.h * g.w, grid.plane);
    assert!(x.len() >= imgs * g.c * hw && len >= imgs * g.c * pl);
    if imgs * g.c * hw >= PAR_PAD && super::par::on_pool() {
        // A large input (a 224×224 stem's): one task per sub-plane of each channel.
        let sub = grid.rows * grid.cols;
        let phases = g.sh * g.sw;
        let mut parts: Vec<&mut [f32]> = xp[..imgs * g.c * pl]
            .chunks_exact_mut(pl)
            .flat_map(|d| d[..phases * sub].chunks_exact_mut(sub))
            .collect();
        super::par::chunks_mut(&mut parts, 1, |t, d| {
            let (i, ph) = (t / phases, t % phases);
            let xc = &x[i * hw..(i + 1) * hw];
            pad_phase_isa(g, grid, xc, d[0], ph / g.sw, ph % g.sw)
        });
    } else {
        // On the calling thread: shared out per channel it was no faster (ResNet-56 at
        // batch 1 on two threads, 16 K floats a layer).
        for (i, d) in xp[..imgs * g.c * pl].chunks_exact_mut(pl).enumerate() {
            pad_channel(g, grid, &x[i * hw..(i + 1) * hw], d)
        }
    }
    let r = f(xp);
    SHARED.with(|s| *s.borrow_mut() = (have, buf));
    r
}

/// Vector width and tile limits of an ISA: (lanes, max R, max T).
fn shape(isa: Isa) -> (usize, usize, usize) {
    match isa {
        Isa::Avx512 => (16, 4, 6),
        _ => (8, 4, 3),
    }
}

/// One tile's operands. `x` points at the group's padded input plus the tile's first
/// position; `w` at the first channel's weight row (rows `k` apart, one weight per tap);
/// `bias` at the first channel's bias.
struct Tile {
    x: *const f32,
    w: *const f32,
    k: usize,
    bias: *const f32,
    out: Out,
}

/// Where a tile's results go.
enum Out {
    /// AVX-512: straight into the output.
    Direct(Store),
    /// AVX2 (no compress): into a flattened scratch, rows `ds` apart.
    Scratch { dst: *mut f32, ds: usize },
}

impl Out {
    /// The direct store of the AVX-512 kernels.
    fn direct(&self) -> &Store {
        match self {
            Out::Direct(s) => s,
            Out::Scratch { .. } => unreachable!("AVX-512 tiles store directly"),
        }
    }
}

/// The AVX-512 store: `out` (and `res`, or null) point at the first channel's plane
/// (planes `p` apart); vector `t` keeps the lanes of `mask[t]`, packed (compressed) to
/// output position `idx[t]`; the result is clamped to `[lo, hi]`.
struct Store {
    out: *mut f32,
    res: *const f32,
    p: usize,
    mask: *const u16,
    idx: *const u32,
    lo: f32,
    hi: f32,
}

impl Store {
    /// Stores `v` (its first lanes, those of `keep`) as channel `r`'s outputs from
    /// position `at`: plus the residual, clamped (bound first, value second: a NaN passes
    /// through). Shared by the tile and thin kernels.
    ///
    /// # Safety
    /// AVX-512F; the lanes of `keep` from `at` are inside channel `r`'s plane.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn put(&self, v: std::arch::x86_64::__m512, r: usize, at: usize, keep: u16) {
        use std::arch::x86_64::*;
        unsafe {
            let mut v = v;
            if !self.res.is_null() {
                let rv = super::simd::load16(self.res.add(r * self.p + at), keep);
                v = _mm512_add_ps(v, rv);
            }
            v = _mm512_min_ps(
                _mm512_set1_ps(self.hi),
                _mm512_max_ps(_mm512_set1_ps(self.lo), v),
            );
            super::simd::store16(self.out.add(r * self.p + at), keep, v);
        }
    }
}

/// The accumulation shared by the AVX-512 and AVX2 tile kernels (they differ in register
/// type and store): `R × T` accumulators start at the bias; per tap, `T` unaligned loads
/// and `R` broadcast weights feed `R·T` FMAs. Expands inside the kernels' `unsafe` block.
macro_rules! accumulate {
    ($tile:expr, $taps:expr, $r:ident, $t:ident, $lanes:literal, $zero:ident, $set1:ident,
     $loadu:ident, $fmadd:ident) => {{
        let mut acc = [[$zero(); $t]; $r];
        for r in 0..$r {
            let b = $set1(*$tile.bias.add(r));
            for t in 0..$t {
                acc[r][t] = b;
            }
        }
        for (i, &off) in $taps.iter().enumerate() {
            let xp = $tile.x.add(off);
            let mut xs = [$zero(); $t];
            for t in 0..$t {
                xs[t] = $loadu(xp.add(t * $lanes));
            }
            for r in 0..$r {
                let wv = $set1(*$tile.w.add(r * $tile.k + i));
                for t in 0..$t {
                    acc[r][t] = $fmadd(wv, xs[t], acc[r][t]);
                }
            }
        }
        acc
    }};
}

/// `R` channels × `T` vectors of one tile on AVX-512 (see the module doc): the bias
/// starts the accumulators, each tap is `T` loads, `R` broadcasts and `R·T` FMAs, and
/// each finished vector is compressed to its valid lanes, given its residual and clamp
/// and stored with a mask.
///
/// # Safety
/// The CPU has AVX-512F; every `x + tap + t·16 + 16` stays inside the padded buffer;
/// `w` holds `R` rows of `taps.len()` (stride `k`), `bias` `R` values; `out` is
/// `Out::Direct` whose planes hold `idx[t] + popcount(mask[t])` for every `t < T`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
// Index loops over the register arrays: what the compiler keeps in registers.
#[allow(clippy::needless_range_loop)]
unsafe fn tile_zmm<const R: usize, const T: usize>(tile: &Tile, taps: &[usize]) {
    use std::arch::x86_64::*;
    let st = tile.out.direct();
    unsafe {
        let acc = accumulate!(
            tile,
            taps,
            R,
            T,
            16,
            _mm512_setzero_ps,
            _mm512_set1_ps,
            _mm512_loadu_ps,
            _mm512_fmadd_ps
        );
        for t in 0..T {
            let m = *st.mask.add(t);
            if m == 0 {
                continue;
            }
            let low: u16 = ((1u32 << m.count_ones()) - 1) as u16;
            let at = *st.idx.add(t) as usize;
            for r in 0..R {
                st.put(_mm512_maskz_compress_ps(m, acc[r][t]), r, at, low);
            }
        }
    }
}

/// `R` channels × `T` vectors on AVX2, stored flattened into the scratch.
///
/// # Safety
/// As [`tile_zmm`] with AVX2+FMA and 8-float vectors; `out` is `Out::Scratch` with `R`
/// rows of `T·8` (stride `ds`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
// Index loops over the register arrays: what the compiler keeps in registers.
#[allow(clippy::needless_range_loop)]
unsafe fn tile_ymm<const R: usize, const T: usize>(tile: &Tile, taps: &[usize]) {
    use std::arch::x86_64::*;
    let Out::Scratch { dst, ds } = tile.out else {
        unreachable!("AVX2 tiles store to the scratch")
    };
    unsafe {
        let acc = accumulate!(
            tile,
            taps,
            R,
            T,
            8,
            _mm256_setzero_ps,
            _mm256_set1_ps,
            _mm256_loadu_ps,
            _mm256_fmadd_ps
        );
        for r in 0..R {
            for t in 0..T {
                _mm256_storeu_ps(dst.add(r * ds + t * 8), acc[r][t]);
            }
        }
    }
}

/// The thin product's tile: `R` rows × `T ≤ 2` vectors of `col` (rows `p` apart), with
/// the reduction split four ways: one accumulator chain per row and vector would wait on
/// the FMA latency (4 cycles) at every step, and a thin tile has too few of them.
///
/// # Safety
/// As [`tile_zmm`], with `x` the column matrix (`k` rows of `p`, `T` vectors readable
/// from each row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
unsafe fn thin_zmm<const R: usize, const T: usize>(tile: &Tile, k: usize, p: usize) {
    use std::arch::x86_64::*;
    const J: usize = 4;
    let st = tile.out.direct();
    unsafe {
        let mut acc = [[[_mm512_setzero_ps(); T]; R]; J];
        let mut i = 0;
        while i + J <= k {
            for j in 0..J {
                let xp = tile.x.add((i + j) * p);
                let mut xs = [_mm512_setzero_ps(); T];
                for t in 0..T {
                    xs[t] = _mm512_loadu_ps(xp.add(t * 16));
                }
                for r in 0..R {
                    let wv = _mm512_set1_ps(*tile.w.add(r * tile.k + i + j));
                    for t in 0..T {
                        acc[j][r][t] = _mm512_fmadd_ps(wv, xs[t], acc[j][r][t]);
                    }
                }
            }
            i += J;
        }
        while i < k {
            let xp = tile.x.add(i * p);
            for r in 0..R {
                let wv = _mm512_set1_ps(*tile.w.add(r * tile.k + i));
                for t in 0..T {
                    acc[0][r][t] =
                        _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp.add(t * 16)), acc[0][r][t]);
                }
            }
            i += 1;
        }
        for r in 0..R {
            let b = _mm512_set1_ps(*tile.bias.add(r));
            for t in 0..T {
                let sum = _mm512_add_ps(
                    _mm512_add_ps(acc[0][r][t], acc[1][r][t]),
                    _mm512_add_ps(acc[2][r][t], acc[3][r][t]),
                );
                // The thin masks start at lane 0: no compress needed.
                let (m, at) = (*st.mask.add(t), *st.idx.add(t) as usize);
                st.put(_mm512_add_ps(sum, b), r, at, m);
            }
        }
    }
}

/// Runs the tile kernel for `r ≤ 4` channels and `t ≤ 6` (AVX-512) or `≤ 3` (AVX2)
/// vectors.
///
/// # Safety
/// As the tile kernels; `isa` is what the CPU has (never Portable here).
#[allow(unused_variables)]
unsafe fn run_tile(isa: Isa, r: usize, t: usize, tile: &Tile, taps: &[usize]) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        macro_rules! dispatch {
            ($f:ident; $($r:literal),*; $($t:literal),*) => {
                dispatch!(@r $f, r, t; [$($r),*]; [$($t),*])
            };
            (@r $f:ident, $rv:ident, $tv:ident; [$($r:literal),*]; $ts:tt) => {
                match $rv {
                    $($r => dispatch!(@t $f, $r, $tv; $ts),)*
                    _ => unreachable!("tile rows"),
                }
            };
            (@t $f:ident, $r:literal, $tv:ident; [$($t:literal),*]) => {
                match $tv {
                    $($t => $f::<$r, $t>(tile, taps),)*
                    _ => unreachable!("tile vectors"),
                }
            };
        }
        match isa {
            Isa::Avx512 => dispatch!(tile_zmm; 1, 2, 3, 4; 1, 2, 3, 4, 5, 6),
            _ => dispatch!(tile_ymm; 1, 2, 3, 4; 1, 2, 3),
        }
    }
}

/// A raw output pointer shared by tasks that write disjoint regions.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub *mut f32);
// SAFETY: the tasks holding copies write disjoint (channel, position) regions.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// What every tile of one conv shares.
struct Layer<'a> {
    g: &'a Geo,
    grid: Grid,
    /// Tap offsets within a group, in weight order `(c, ky, kx)`.
    taps: Vec<usize>,
    w: &'a [f32],
    bias: Vec<f32>,
    /// The clamp applied at the store (ReLU, ReLU6 or none) and any other activation,
    /// applied after.
    lo: f32,
    hi: f32,
    rest: Option<ActivationKind>,
    /// The whole activation (the AVX2 scratch path applies it after the copy).
    act: Option<ActivationKind>,
    isa: Isa,
    lanes: usize,
    rmax: usize,
    tmax: usize,
    /// Vectors of flattened positions per image and per band.
    vecs: usize,
    band: usize,
    /// Per vector (AVX-512): its valid lanes and the output position of the first.
    mask: Vec<u16>,
    idx: Vec<u32>,
}

impl<'a> Layer<'a> {
    fn new(g: &'a Geo, w: &'a [f32], epi: Option<(&[f32], Option<ActivationKind>)>) -> Self {
        let grid = Grid::new(g);
        let mut taps = Vec::with_capacity(g.k());
        for c in 0..g.cg() {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    taps.push(grid.tap(g, c, ky, kx));
                }
            }
        }
        let isa = super::simd::isa();
        let (lanes, rmax, tmax) = shape(isa);
        let q = grid.q(g);
        let vecs = q.div_ceil(lanes);
        // Output position of flattened index `q` (or of the next valid one).
        let pos = |q: usize| (q / grid.cols) * g.ow + (q % grid.cols).min(g.ow);
        let (mut mask, mut idx) = (Vec::new(), Vec::new());
        if isa == Isa::Avx512 {
            // The column of each flattened index counted along, not divided out per lane:
            // at 112×112 the divisions took longer than a batch-1 stem's FMAs.
            let mut col = 0;
            for v in 0..vecs {
                let mut m = 0u16;
                for l in 0..16 {
                    if v * 16 + l < q && col < g.ow {
                        m |= 1 << l;
                    }
                    col += 1;
                    if col == grid.cols {
                        col = 0;
                    }
                }
                mask.push(m);
                idx.push(pos(v * 16) as u32);
            }
        }
        let ((lo, hi), rest) = clamp_split(epi.and_then(|e| e.1));
        Layer {
            g,
            grid,
            taps,
            w,
            bias: epi.map_or_else(|| vec![0.0; g.o], |e| e.0.to_vec()),
            lo,
            hi,
            rest,
            act: epi.and_then(|e| e.1),
            isa,
            lanes,
            rmax,
            tmax,
            vecs,
            // Four full tiles of vectors per band: the band's input rows stay in L1/L2
            // while every channel block runs over them.
            band: 4 * tmax,
            mask,
            idx,
        }
    }

    /// Floats of the padded buffer of one image: every channel, and room for the last
    /// vector's loads past the last plane.
    fn padded_len(&self) -> usize {
        let max_tap = self.taps.iter().max().copied().unwrap_or(0);
        let last_group = (self.g.groups - 1) * self.g.cg() * self.grid.plane;
        (self.g.c * self.grid.plane).max(last_group + max_tap + self.vecs * self.lanes)
    }

    fn bands(&self) -> usize {
        self.vecs.div_ceil(self.band)
    }

    /// Pads image `xn` into `xp`.
    fn pad(&self, xn: &[f32], xp: &mut [f32]) {
        let hw = self.g.h * self.g.w;
        let pl = self.grid.plane;
        for (c, d) in xp[..self.g.c * pl].chunks_exact_mut(pl).enumerate() {
            pad_channel(self.g, &self.grid, &xn[c * hw..(c + 1) * hw], d);
        }
    }

    /// What decides which cells of the padded buffer are border (always zero).
    fn key(&self) -> [usize; 9] {
        let g = self.g;
        [
            g.c,
            g.h,
            g.w,
            g.sh,
            g.sw,
            g.pt,
            g.pl,
            self.grid.rows,
            self.grid.cols,
        ]
    }

    /// Output channels `o0..o1` (within one group) over band `b` of one image, written
    /// into `out` (the image's `[O, P]` output, through a raw pointer since tasks share
    /// it) with the activation and residual `res` (the image's, same shape).
    ///
    /// # Safety
    /// `out` points at this image's `O·P` outputs; no other task writes channels
    /// `o0..o1` of band `b`; `xp` is this image's padded buffer of `padded_len()`.
    unsafe fn block(
        &self,
        xp: &[f32],
        b: usize,
        (o0, o1): (usize, usize),
        scratch: &mut Vec<f32>,
        out: OutPtr,
        res: Option<&[f32]>,
    ) {
        let g = self.g;
        let (lanes, cols) = (self.lanes, self.grid.cols);
        let v0 = b * self.band;
        let nv = self.band.min(self.vecs - v0);
        let width = nv * lanes;
        let direct = self.isa == Isa::Avx512;
        if !direct {
            scratch.resize(self.rmax * width, 0.0);
        }
        let (k, og, p) = (g.k(), g.og(), g.p());
        let gi = o0 / og;
        debug_assert!(o1 <= (gi + 1) * og);
        let gbase = gi * g.cg() * self.grid.plane;
        assert!(
            gbase + self.taps.iter().max().copied().unwrap_or(0) + self.vecs * lanes <= xp.len(),
            "conv tiles: padded buffer too short"
        );
        let q0 = v0 * lanes;
        let q1 = (q0 + width).min(self.grid.q(g));
        // Output positions this band covers (contiguous in the output).
        let (p0, p1) = (
            (q0 / cols) * g.ow + (q0 % cols).min(g.ow),
            (q1 / cols) * g.ow + (q1 % cols).min(g.ow),
        );
        let mut oc = o0;
        while oc < o1 {
            let r = self.rmax.min(o1 - oc);
            let mut t0 = 0;
            while t0 < nv {
                let t = self.tmax.min(nv - t0);
                let tile = Tile {
                    x: xp[gbase + q0 + t0 * lanes..].as_ptr(),
                    w: self.w[oc * k..].as_ptr(),
                    k,
                    bias: self.bias[oc..].as_ptr(),
                    out: if direct {
                        Out::Direct(Store {
                            // SAFETY (of the add): channel oc's plane is in the image.
                            out: unsafe { out.0.add(oc * p) },
                            res: res.map_or(std::ptr::null(), |r| r[oc * p..].as_ptr()),
                            p,
                            mask: self.mask[v0 + t0..].as_ptr(),
                            idx: self.idx[v0 + t0..].as_ptr(),
                            lo: self.lo,
                            hi: self.hi,
                        })
                    } else {
                        Out::Scratch {
                            dst: scratch[t0 * lanes..].as_mut_ptr(),
                            ds: width,
                        }
                    },
                };
                // SAFETY: the assert above bounds every load; w has r rows of k from oc
                // (oc + r ≤ o1 ≤ O); bias r values; the direct stores land in channels
                // oc..oc+r at the positions of their vectors (< P); the scratch has r
                // rows of width ≥ t0·lanes + t·lanes.
                unsafe { run_tile(self.isa, r, t, &tile, &self.taps) };
                t0 += t;
            }
            for j in 0..r {
                let ch = oc + j;
                if direct {
                    if self.rest.is_some() {
                        // SAFETY: this task's channel ch, positions p0..p1.
                        let d = unsafe {
                            std::slice::from_raw_parts_mut(out.0.add(ch * p + p0), p1 - p0)
                        };
                        act::bias_act(d, 0.0, None, self.rest);
                    }
                    continue;
                }
                // Flattened rows → output rows, with the epilogue.
                let src = &scratch[j * width..(j + 1) * width];
                let mut q = q0;
                while q < q1 {
                    let (oy, ox) = (q / cols, q % cols);
                    let end = (oy * cols + cols).min(q1);
                    if ox < g.ow {
                        let n = (g.ow - ox).min(end - q);
                        let at = ch * p + oy * g.ow + ox;
                        // SAFETY: channel ch, row oy, columns ox..ox+n of this image; only
                        // this task writes them (the caller's contract).
                        let d = unsafe { std::slice::from_raw_parts_mut(out.0.add(at), n) };
                        d.copy_from_slice(&src[q - q0..q - q0 + n]);
                        let rs = res.map(|r| &r[at..at + n]);
                        let a = self.act;
                        if rs.is_some() || a.is_some() {
                            act::bias_act(d, 0.0, rs, a);
                        }
                    }
                    q = end;
                }
            }
            oc += r;
        }
    }
}

/// A thread's padded-input buffer (with the geometry its zero border was written for)
/// and its scratch.
struct Bufs {
    xp: Vec<f32>,
    key: Option<[usize; 9]>,
    scratch: Vec<f32>,
}

thread_local! {
    static BUFS: std::cell::RefCell<Bufs> = const {
        std::cell::RefCell::new(Bufs { xp: Vec::new(), key: None, scratch: Vec::new() })
    };
}

/// `out [N, O, OH, OW] = conv(x, w) + bias`, then the activation, with `res` (same shape
/// as `out`) added before it. `out` needs no initialisation.
pub fn forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
    res: Option<&[f32]>,
) {
    debug_assert!(applies(g));
    let layer = Layer::new(g, w, epi);
    let (img_in, img_out) = (g.c * g.h * g.w, g.o * g.p());
    assert!(x.len() >= g.n * img_in && out.len() >= g.n * img_out && w.len() >= g.o * g.k());
    let plen = layer.padded_len();
    let (og, rmax) = (g.og(), layer.rmax);
    // Channel blocks of whole tiles, never across a group.
    let blocks: Vec<(usize, usize)> = (0..g.groups)
        .flat_map(|gi| {
            (gi * og..(gi + 1) * og)
                .step_by(layer.rmax)
                .map(move |o| (o, (o + rmax).min((gi + 1) * og)))
        })
        .collect();
    let threads = rayon::current_num_threads().max(1);
    if g.n >= threads {
        // One task per image, padded into the thread's own buffer.
        super::par::chunks_mut(&mut out[..], img_out, |n, img| {
            BUFS.with(|b| {
                let Bufs { xp, key, scratch } = &mut *b.borrow_mut();
                let xp = zeroed_for(layer.key(), key, xp, plen);
                layer.pad(&x[n * img_in..(n + 1) * img_in], xp);
                let outp = OutPtr(img.as_mut_ptr());
                let rn = res.map(|r| &r[n * img_out..(n + 1) * img_out]);
                for b in 0..layer.bands() {
                    for &blk in &blocks {
                        // SAFETY: this task owns the image; blocks and bands are disjoint.
                        unsafe { layer.block(xp, b, blk, scratch, outp, rn) };
                    }
                }
            })
        });
        return;
    }
    // Few images (batch 1): each padded once, its (band, channel range) pieces shared
    // out; channel ranges are whole blocks, split finely enough to balance the threads.
    let bands = layer.bands();
    let splits = (4 * threads).div_ceil(bands).clamp(1, blocks.len());
    let per = blocks.len().div_ceil(splits);
    for n in 0..g.n {
        let xn = &x[n * img_in..(n + 1) * img_in];
        with_shared_pad(g, &layer.grid, xn, 1, plen, |xp| {
            let outp = OutPtr(out[n * img_out..(n + 1) * img_out].as_mut_ptr());
            let rn = res.map(|r| &r[n * img_out..(n + 1) * img_out]);
            let blocks = &blocks;
            let layer = &layer;
            super::par::for_each(bands * splits, move |task| {
                let (b, s) = (task / splits, task % splits);
                BUFS.with(|bufs| {
                    let scratch = &mut bufs.borrow_mut().scratch;
                    for &blk in blocks.iter().skip(s * per).take(per) {
                        // SAFETY: (band, block) pairs are disjoint across tasks.
                        unsafe { layer.block(xp, b, blk, scratch, outp, rn) };
                    }
                })
            });
        });
    }
}

/// Whether a lone image's product `out[O × P] = w[O × K] · col[K × P]` with few
/// positions runs on [`thin`]: AVX-512, and at most two vectors of positions (the 2×2
/// to 5×5 maps of CIFAR nets' last stages at batch 1).
pub fn thin_applies(p: usize) -> bool {
    mode() != TileMode::Off && super::simd::isa() == Isa::Avx512 && p > 0 && p <= 32
}

/// Floats [`thin`] may read past the end of `col` (its last row's vector).
pub const THIN_SLACK: usize = 16;

/// `out[O × P] = epilogue(w[O × K] · col[K × P])` for a product with few columns, as
/// register tiles that stream the weights once: a GEMM packs the whole weight matrix for
/// a product this thin (9.4 MB for VGG's 512-channel 3×3 layers, re-read to do 4 FMAs
/// per element on a 2×2 map), which made those layers memory-bound at ~20 GB/s. Here
/// each tile of 4 rows reads its weights once as broadcasts against `col`'s rows (one
/// or two vectors, masked to `P`); blocks of rows are split across the threads.
/// `col` holds `K·P + THIN_SLACK` floats.
pub fn thin(
    (o, k, p): (usize, usize, usize),
    col: &[f32],
    w: &[f32],
    out: &mut [f32],
    epi: Option<(&[f32], Option<ActivationKind>)>,
    res: Option<&[f32]>,
) {
    assert!(thin_applies(p) && col.len() >= k * p + THIN_SLACK && w.len() >= o * k);
    assert!(out.len() >= o * p && res.is_none_or(|r| r.len() >= o * p));
    let vecs = p.div_ceil(16);
    let mask: Vec<u16> = (0..vecs)
        .map(|v| {
            let n = (p - v * 16).min(16);
            ((1u32 << n) - 1) as u16
        })
        .collect();
    let idx: Vec<u32> = (0..vecs).map(|v| (v * 16) as u32).collect();
    let zeros;
    let bias = match epi {
        Some((b, _)) => b,
        None => {
            zeros = vec![0f32; o];
            &zeros
        }
    };
    let ((lo, hi), rest) = clamp_split(epi.and_then(|e| e.1));
    let outp = OutPtr(out.as_mut_ptr());
    let threads = rayon::current_num_threads().max(1);
    // Blocks of 4 rows, a few per task so that both threads stay busy to the end.
    let per = o.div_ceil(4).div_ceil(4 * threads).max(1) * 4;
    super::par::for_each(o.div_ceil(per), |b| {
        let (o0, o1) = (b * per, ((b + 1) * per).min(o));
        let mut oc = o0;
        while oc < o1 {
            let r = 4.min(o1 - oc);
            let tile = Tile {
                x: col.as_ptr(),
                w: w[oc * k..].as_ptr(),
                k,
                bias: bias[oc..].as_ptr(),
                out: Out::Direct(Store {
                    // SAFETY (of the add): row oc is inside out (oc < o, o·p ≤ len).
                    out: unsafe { outp.get().add(oc * p) },
                    res: res.map_or(std::ptr::null(), |r| r[oc * p..].as_ptr()),
                    p,
                    mask: mask.as_ptr(),
                    idx: idx.as_ptr(),
                    lo,
                    hi,
                }),
            };
            // SAFETY: loads reach (k−1)·p + vecs·16 ≤ k·p + 16 ≤ col.len(); w has r rows
            // of k from oc; bias r values; the stores write rows oc..oc+r, columns < p
            // (the masks, which start at lane 0: idx is t·16), which only this task writes.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                match (r, vecs) {
                    (4, 1) => thin_zmm::<4, 1>(&tile, k, p),
                    (4, _) => thin_zmm::<4, 2>(&tile, k, p),
                    (3, 1) => thin_zmm::<3, 1>(&tile, k, p),
                    (3, _) => thin_zmm::<3, 2>(&tile, k, p),
                    (2, 1) => thin_zmm::<2, 1>(&tile, k, p),
                    (2, _) => thin_zmm::<2, 2>(&tile, k, p),
                    (_, 1) => thin_zmm::<1, 1>(&tile, k, p),
                    _ => thin_zmm::<1, 2>(&tile, k, p),
                }
            }
            oc += r;
        }
        if rest.is_some() {
            // SAFETY: rows o0..o1 belong to this task.
            let rows =
                unsafe { std::slice::from_raw_parts_mut(outp.get().add(o0 * p), (o1 - o0) * p) };
            act::bias_act(rows, 0.0, None, rest);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::conv::{conv_forward, ConvCfg};

    /// A batch-1 input large enough for the padding to be split between the pool's
    /// threads (an RGB stem at stride 2 and a stride-1 conv on the position tiles): the
    /// same bits as padded on one thread.
    #[test]
    fn parallel_padding_matches_serial() {
        for (c, hw, o, s) in [(3, 160, 16, 2), (6, 110, 8, 1)] {
            assert!(c * hw * hw >= super::PAR_PAD);
            let cfg = ConvCfg {
                stride: [s, s],
                padding: [1, 1, 1, 1],
                dilation: [1, 1],
                groups: 1,
            };
            let g = cfg.geo(&[1, c, hw, hw], &[o, c, 3, 3]).unwrap();
            let x: Vec<f32> = (0..c * hw * hw)
                .map(|i| ((i * 7 % 29) as f32 - 14.0) * 0.1)
                .collect();
            let w: Vec<f32> = (0..o * c * 9)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let mut serial = vec![0f32; o * g.p()];
            conv_forward(&g, &x, &w, &mut serial);
            let mut pooled = vec![0f32; o * g.p()];
            crate::util::on_pool(|| {
                crate::kernels::par::engaged(|| conv_forward(&g, &x, &w, &mut pooled))
            });
            assert_eq!(pooled, serial, "{c}×{hw}×{hw} → {o}, stride {s}");
        }
    }
}
