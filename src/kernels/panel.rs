//! A GEMM whose weight is packed once into register-tile panels: the 1×1 convs and the
//! linear layers of inference. The GEMM crate packs its operands on every call, and the
//! conv path calls it per image (or per few images): MLP inference at batch 64 spent a
//! fifth of its time re-packing its weights, EfficientNet-B0's 1152→192 conv at 7×7
//! re-packed a 0.9 MB weight per image. Here an eval plan packs the weight once (a call
//! without one packs it once for all its images), and each `MR × NR` register tile runs
//! the whole accumulation in registers, then adds the bias and residual, clamps (ReLU,
//! ReLU6, Clip) and stores; other activations run over the stored tile rows in L1.
//!
//! Two orientations share one tile kernel (`MR` broadcast rows × up to four 16-float
//! vectors of columns):
//! - **1×1 conv** `out[O, P] = W[O, C]·x[C, P]`: the weight rows are the broadcast
//!   operand, packed `MR` output channels at a time ([`pack_rows`]); the vectors are 16
//!   output positions of the input rows (NCHW in and out), the batch's positions one
//!   column space so that small maps fill the vectors.
//! - **linear** `y[N, O] = x[N, I]·Wᵀ`: the input rows are the broadcast operand as they
//!   lie; the vectors are 16 output features of the weight packed `NR` features at a
//!   time, feature-minor ([`pack_cols`]); `y` is row-major with no transpose after.
//!
//! Measured (AMD EPYC, 2 threads): MLP 784-1024-1024-10 inference at batch 64 0.78 →
//! 0.50 ms (onnxruntime 0.52), batch 8 0.25 → 0.10 ms; MobileNetV3-small at batch 8
//! 5.4 → 4.8 ms. Where the GEMM crate is faster (expansions over larger maps: a short
//! accumulation per tile), the conv keeps it by rule (`conv::pointwise_panels`).
//!
//! AVX-512 only (the tile is 24 accumulators of the 32 registers); elsewhere the callers
//! keep the GEMM-crate paths. `LOPPER_PANEL=0` turns it off for A/B runs.

// The explicit-vector kernels are x86-64 only; elsewhere the callers never take this path.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_variables, unused_imports)
)]

#[cfg(target_arch = "x86_64")]
use super::simd::{load16 as load, store16 as store};
use crate::graph::ops::ActivationKind as A;
use std::sync::atomic::{AtomicU8, Ordering};

/// Broadcast rows per register tile (output channels of a conv, batch rows of a linear).
pub const MR: usize = 6; // `tile` finishes its rows one by one: six of them.
/// Columns per register tile: four 16-float vectors.
pub const NR: usize = 64;

/// Multiply-adds below which a call stays on the calling thread (a fork and join costs
/// a few microseconds; this is about one of work).
const SEQ_MACS: usize = 1 << 18;

/// 0: undecided, 1: turned off, 2: not turned off.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether the panel kernels run: on AVX-512 (the level in use, which tests lower), unless
/// turned off by `LOPPER_PANEL=0` or [`set_enabled`].
pub fn enabled() -> bool {
    let on = match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("LOPPER_PANEL").map_or(true, |v| v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    };
    on && super::simd::isa() == super::simd::Isa::Avx512
}

/// Turns the panel kernels on (where the CPU has AVX-512) or off, process-wide (examples
/// and tests comparing paths).
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// `w[rows × k]` (row-major) in panels of `width` rows, each accumulation step's `width`
/// values together (`panel[kk·width + r] = w[panel·width + r][kk]`); rows past `rows` zero.
fn pack(w: &[f32], rows: usize, k: usize, width: usize) -> Vec<f32> {
    assert!(w.len() >= rows * k, "panel::pack: weight too short");
    let mut out = vec![0f32; rows.div_ceil(width) * width * k];
    for (pi, panel) in out.chunks_exact_mut(width * k.max(1)).enumerate() {
        for r in 0..width.min(rows - pi * width) {
            let row = &w[(pi * width + r) * k..][..k];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * width + r] = v;
            }
        }
    }
    out
}

/// Floats of [`pack_rows`]`(_, m, k)`.
pub fn rows_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * MR * k
}

/// A 1×1 conv's `w[O × C]` in panels of `MR` output channels (the tile's broadcast rows).
pub fn pack_rows(w: &[f32], m: usize, k: usize) -> Vec<f32> {
    pack(w, m, k, MR)
}

/// Floats of [`pack_cols`]`(_, o, i)`.
pub fn cols_len(o: usize, i: usize) -> usize {
    o.div_ceil(NR) * NR * i
}

/// A linear layer's `w[O × I]` as `Wᵀ` in panels of `NR` output features (the tile's
/// vector columns).
pub fn pack_cols(w: &[f32], o: usize, i: usize) -> Vec<f32> {
    pack(w, o, i, NR)
}

/// The activations the tile applies in registers (a clamp); the rest run over the
/// stored tile rows.
fn split_act(act: Option<A>) -> (Option<(f32, f32)>, Option<A>) {
    match act {
        Some(A::Relu) => (Some((0.0, f32::INFINITY)), None),
        Some(A::Relu6) => (Some((0.0, 6.0)), None),
        Some(A::Clip { lo, hi }) => (Some((lo, hi)), None),
        other => (None, other),
    }
}

/// A raw output pointer shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes its own tiles only.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// What a tile adds and applies before its store.
#[derive(Clone, Copy)]
struct Epi {
    /// The bias of the tile's first row, one per row (a conv's output channels), or null.
    bias_row: *const f32,
    /// The bias of the tile's first column, one per column (a linear's features), or null.
    bias_col: *const f32,
    clamp: Option<(f32, f32)>,
    act: Option<A>,
}

/// Tile columns `a..a + len` and where they go: row `r` of the tile at `dst + r·ldc`
/// (`res + r·ldc` for the residual, if any). A 1×1 conv's tile may span images (the
/// batch's positions are one column space, so small maps fill the vectors).
#[derive(Clone, Copy)]
struct Run {
    a: usize,
    len: usize,
    dst: *mut f32,
    res: *const f32,
}

/// One `MR × 16·V` tile, the whole accumulation (`k` steps) in registers.
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    /// `PACKED`: the row panel (step `kk`'s `MR` values at `a + kk·MR`); otherwise unused.
    a: *const f32,
    /// Not `PACKED`: each row's first value (step `kk` at `rows[r] + kk·lda`).
    a_rows: [*const f32; MR],
    lda: usize,
    /// Step `kk`'s columns at `b + kk·ldb`: whole vectors (packed and zero-padded, or
    /// in place with the last vector's lanes `b_tail` when `TAIL`).
    b: *const f32,
    ldb: usize,
    b_tail: u16,
    k: usize,
    /// Rows stored (`≤ MR`), their stride in the output, and the stored columns: row `r`
    /// of a run at `dst + base + r·ldc`.
    rows: usize,
    ldc: usize,
    base: usize,
    runs: &'a [Run],
}

/// The lanes of tile columns `a..a + len` in vector `v`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes(v: usize, a: usize, len: usize) -> u16 {
    let lo = a.saturating_sub(16 * v).min(16);
    let hi = (a + len).saturating_sub(16 * v).min(16);
    (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn tile<const V: usize, const PACKED: bool, const TAIL: bool>(t: &Tile, e: &Epi) {
    use std::arch::x86_64::*;
    let mut bp = t.b;
    // SAFETY (whole body): the caller's tile lies inside its operands: `k` steps of the
    // panel or rows, `k` rows of `NR` columns at `b`, `rows` rows of each run at its
    // `dst` (and `res`). Masked lanes are neither read nor written, so a vector's
    // address may lie before a run's start (`wrapping_sub`).
    unsafe {
        // The output lines (for writing) and the residual's, while the accumulation runs:
        // the epilogue waited on them from memory (ResNet-50's 64→256 at 56×56 with its
        // residual, batch 8: 14.0 ms against 11.0 on the GEMM path).
        for run in t.runs.iter().filter(|r| !r.res.is_null()) {
            for r in 0..t.rows {
                let at = t.base + r * t.ldc;
                for j in (0..run.len).step_by(16) {
                    _mm_prefetch::<_MM_HINT_T0>(run.res.add(at + j) as *const i8);
                }
            }
        }
        // Constant bounds throughout (unrolled: the accumulators stay in registers).
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        // One accumulation step's column vectors (the last one masked with `TAIL`). The
        // two orientations below differ only in where a row's scalar lies; each keeps its
        // own loop so that both compile to a plain step of loads, broadcasts and FMAs.
        macro_rules! load_b {
            ($bp:expr) => {{
                let bv: [__m512; V] = std::array::from_fn(|v| {
                    if TAIL && v == V - 1 {
                        _mm512_maskz_loadu_ps(t.b_tail, $bp.add(16 * v))
                    } else {
                        _mm512_loadu_ps($bp.add(16 * v))
                    }
                });
                bv
            }};
        }
        if PACKED {
            let mut ap = t.a;
            for _ in 0..t.k {
                let bv = load_b!(bp);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let s = _mm512_set1_ps(*ap.add(r));
                    for v in 0..V {
                        acc_r[v] = _mm512_fmadd_ps(s, bv[v], acc_r[v]);
                    }
                }
                ap = ap.add(MR);
                bp = bp.add(t.ldb);
            }
        } else {
            let ar = t.a_rows;
            let mut off = 0;
            for _ in 0..t.k {
                let bv = load_b!(bp);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let s = _mm512_set1_ps(*ar[r].add(off));
                    for v in 0..V {
                        acc_r[v] = _mm512_fmadd_ps(s, bv[v], acc_r[v]);
                    }
                }
                off += t.lda;
                bp = bp.add(t.ldb);
            }
        }
        let (lo, hi) = e.clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
        // Row by row with the row a constant (a loop over the rows was not unrolled:
        // the accumulators went to the stack and back, a fifth of a 16-input layer).
        let [a0, a1, a2, a3, a4, a5] = acc;
        finish_row(t, e, 0, a0, lo, hi);
        finish_row(t, e, 1, a1, lo, hi);
        finish_row(t, e, 2, a2, lo, hi);
        finish_row(t, e, 3, a3, lo, hi);
        finish_row(t, e, 4, a4, lo, hi);
        finish_row(t, e, 5, a5, lo, hi);
        if let Some(k) = e.act {
            act_rows(t, k);
        }
    }
}

/// Adds row `r`'s bias and residual, clamps and stores it (the rows past `t.rows`: not
/// at all).
///
/// # Safety
/// As [`tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finish_row<const V: usize>(
    t: &Tile,
    e: &Epi,
    r: usize,
    acc: [std::arch::x86_64::__m512; V],
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
) {
    use std::arch::x86_64::*;
    if r >= t.rows {
        return;
    }
    // SAFETY: as in `tile`.
    unsafe {
        let at = t.base + r * t.ldc;
        let brow = if e.bias_row.is_null() {
            _mm512_setzero_ps()
        } else {
            _mm512_set1_ps(*e.bias_row.add(r))
        };
        if let [run] = t.runs {
            // One run from the tile's first column (all but tiles that span images):
            // vector by vector with the vector a constant (a loop kept the accumulators
            // on the stack).
            // (A macro: a closure would not inherit the target features.)
            macro_rules! vec {
                ($v:expr) => {
                    if V > $v {
                        let m = lanes($v, 0, run.len);
                        let mut y = _mm512_add_ps(acc[$v], brow);
                        if !e.bias_col.is_null() {
                            y = _mm512_add_ps(y, _mm512_loadu_ps(e.bias_col.add(16 * $v)));
                        }
                        if !run.res.is_null() {
                            y = _mm512_add_ps(y, load(run.res.add(at + 16 * $v), m));
                        }
                        if e.clamp.is_some() {
                            y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
                        }
                        store(run.dst.add(at + 16 * $v), m, y);
                    }
                };
            }
            vec![0];
            vec![1];
            vec![2];
            vec![3];
            return;
        }
        for (v, &a) in acc.iter().enumerate() {
            let mut y = _mm512_add_ps(a, brow);
            if !e.bias_col.is_null() {
                y = _mm512_add_ps(y, _mm512_loadu_ps(e.bias_col.add(16 * v)));
            }
            for run in t.runs {
                let m = lanes(v, run.a, run.len);
                if m == 0 {
                    continue;
                }
                // Lane `l` of vector `v` is tile column `16v + l`: run column `16v + l − a`.
                let off = (at + 16 * v).wrapping_sub(run.a);
                let mut z = y;
                if !run.res.is_null() {
                    z = _mm512_add_ps(z, load(run.res.wrapping_add(off), m));
                }
                if e.clamp.is_some() {
                    z = _mm512_min_ps(_mm512_max_ps(z, lo), hi);
                }
                store(run.dst.wrapping_add(off), m, z);
            }
        }
    }
}

/// Applies activation `k` to the tile's stored rows, in L1 (out of line: inlined per
/// row and kind, the tile grew to 60 KB of code).
///
/// # Safety
/// As [`tile`].
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn act_rows(t: &Tile, k: A) {
    for r in 0..t.rows {
        for run in t.runs {
            // SAFETY: row `r` of the run was just stored by the tile.
            let row =
                unsafe { std::slice::from_raw_parts_mut(run.dst.add(t.base + r * t.ldc), run.len) };
            super::act::apply(k, row);
        }
    }
}

/// Runs one tile with as many vectors as its columns need.
///
/// # Safety
/// As [`tile`]; AVX-512 present ([`enabled`]).
#[cfg(target_arch = "x86_64")]
unsafe fn run_tile<const PACKED: bool>(t: &Tile, e: &Epi) {
    let cols = t.runs.last().map_or(0, |r| r.a + r.len);
    // SAFETY: the caller's contract.
    unsafe {
        match (cols.div_ceil(16), t.b_tail != u16::MAX) {
            (1, false) => tile::<1, PACKED, false>(t, e),
            (2, false) => tile::<2, PACKED, false>(t, e),
            (3, false) => tile::<3, PACKED, false>(t, e),
            (_, false) => tile::<4, PACKED, false>(t, e),
            (1, true) => tile::<1, PACKED, true>(t, e),
            (2, true) => tile::<2, PACKED, true>(t, e),
            (3, true) => tile::<3, PACKED, true>(t, e),
            (_, true) => tile::<4, PACKED, true>(t, e),
        }
    }
}

/// A tile of broadcast rows against one column panel ([`pack_cols`]): what the linear
/// layer and the 1×1 conv with positions as rows ([`conv_rows`]) run.
#[cfg(target_arch = "x86_64")]
struct ColTile {
    /// The panel's `k` steps of `NR` columns.
    panel: *const f32,
    /// Each tile row's first value; step `kk` at `+ kk·lda`.
    a_rows: [*const f32; MR],
    lda: usize,
    k: usize,
    /// Rows and columns stored, row `r` at `dst + r·ldc`.
    rows: usize,
    cols: usize,
    dst: *mut f32,
    ldc: usize,
    /// The bias of the tile's first column (one per column), or null.
    bias_col: *const f32,
}

/// Runs a [`ColTile`] with its clamp and activation.
///
/// # Safety
/// AVX-512 present; the rows read `k` steps inside their operand, the panel holds `NR·k`
/// floats, the `rows × cols` stored values are the caller's alone.
#[cfg(target_arch = "x86_64")]
unsafe fn col_tile(t: ColTile, clamp: Option<(f32, f32)>, act: Option<A>) {
    let runs = [Run {
        a: 0,
        len: t.cols,
        dst: t.dst,
        res: std::ptr::null(),
    }];
    let tile = Tile {
        a: std::ptr::null(),
        a_rows: t.a_rows,
        lda: t.lda,
        b: t.panel,
        ldb: NR,
        b_tail: u16::MAX,
        k: t.k,
        rows: t.rows,
        ldc: t.ldc,
        base: 0,
        runs: &runs,
    };
    let e = Epi {
        bias_row: std::ptr::null(),
        bias_col: t.bias_col,
        clamp,
        act,
    };
    // SAFETY: the caller's contract.
    unsafe { run_tile::<false>(&tile, &e) }
}

/// Copies `x[kk·ld + from .. + len]` for `kk < k` to `buf[kk·NR + a ..]` (one run of a
/// column tile).
///
/// # Safety
/// AVX-512 present; the source rows and `k` rows of `NR` floats at `buf` in bounds,
/// `a + len ≤ NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn pack_run(x: *const f32, ld: usize, k: usize, a: usize, len: usize, buf: *mut f32) {
    // SAFETY: the caller's contract; lanes past `len` are masked.
    unsafe {
        for kk in 0..k {
            let (src, dst) = (x.add(kk * ld), buf.add(kk * NR + a));
            let mut j = 0;
            while j < len {
                let m = ((1u32 << (len - j).min(16)) - 1) as u16;
                store(dst.add(j), m, load(src.add(j), m));
                j += 16;
            }
        }
    }
}

/// How to split each of `tiles` independent column chunks' `panels` panels so that the
/// pool has a few tasks per thread: `(per, groups)`, panels per task and tasks per chunk
/// (one group on one thread or in a small call).
fn groups(tiles: usize, panels: usize, macs: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads();
    let want = if threads == 1 || macs < SEQ_MACS {
        1
    } else {
        (4 * threads).div_ceil(tiles.max(1)).clamp(1, panels.max(1))
    };
    let per = panels.div_ceil(want).max(1);
    (per, panels.div_ceil(per))
}

/// Runs `units` tasks, on the pool unless the call is small.
fn for_units(units: usize, macs: usize, run: impl Fn(usize) + Sync + Send) {
    if units <= 1 || macs < SEQ_MACS || rayon::current_num_threads() == 1 {
        (0..units).for_each(run);
    } else {
        super::par::for_each(units, run);
    }
}

/// Floats of input columns per task: a chunk of positions of all `C` input rows that
/// stays in L2 while every row panel of the weight passes over it (2¹⁴ to 2¹⁶ measured
/// alike within the noise).
const CHUNK_FLOATS: usize = 1 << 14;

/// A batch of 1×1 convs' operands besides the packed weight and the output: `O` output
/// and `C` input channels, `x` `[N, C, P]`, the per-channel bias, the activation and the
/// residual `[N, O, P]` (added before the activation).
#[derive(Clone, Copy)]
pub struct Pointwise<'a> {
    pub o: usize,
    pub c: usize,
    pub x: &'a [f32],
    pub n: usize,
    pub p: usize,
    pub bias: Option<&'a [f32]>,
    pub act: Option<A>,
    pub res: Option<&'a [f32]>,
}

impl Pointwise<'_> {
    /// The operands fit `out` (`packed`: the packed weight is long enough).
    fn check(&self, kernel: &str, packed: bool, out: &[f32]) {
        let (o, c, n, p) = (self.o, self.c, self.n, self.p);
        assert!(enabled(), "panel::{kernel} without AVX-512");
        assert!(
            packed && self.bias.is_none_or(|b| b.len() >= o),
            "panel::{kernel}: weights"
        );
        assert!(self.x.len() >= n * c * p && out.len() >= n * o * p);
        assert!(self.res.is_none_or(|r| r.len() >= n * o * p));
    }
}

/// A batch of 1×1 convs: `out[n][O, P] = act(W·x[n] + bias + res[n])` for `x`
/// `[N, C, P]`, with `panels` = [`pack_rows`]`(W, O, C)`. Every output is written.
///
/// The batch's positions are one column space (image after image), so a 7×7 map does
/// not leave a quarter of the lanes idle and 4×4 maps fill whole vectors. Each task
/// takes a chunk of it and runs its row panels over the chunk, panel by panel (the
/// output written row after row); a column tile within one image is read where it lies,
/// one that spans images is first copied into `NR`-wide rows (zero-padded). Copying every
/// tile was measured slower (144→24 at 56×56, batch 8: 0.58 against 0.50 ms) and made
/// no difference on the power-of-two maps where the rows share L1 sets.
pub fn conv(panels: &[f32], a: &Pointwise, out: &mut [f32]) {
    a.check("conv", panels.len() >= rows_len(a.o, a.c), out);
    let Pointwise {
        o,
        c,
        x,
        n,
        p,
        bias,
        act,
        res,
    } = *a;
    assert!(p >= 2, "panel::conv: 1×1 maps are linear layers");
    if n == 0 || o == 0 {
        return;
    }
    let (pn, total) = (o.div_ceil(MR), n * p);
    let macs = n * o * c * p;
    // Columns per chunk: whole tiles, as many as keep the packed chunk in budget and
    // leave a few tasks per thread; with fewer tiles than that, the row panels are split
    // too (each such task then packs the same columns).
    let tasks = if macs < SEQ_MACS {
        1
    } else {
        4 * rayon::current_num_threads()
    };
    let nc = (CHUNK_FLOATS / c.max(1) / NR * NR)
        .min(total.div_ceil(tasks).next_multiple_of(NR))
        .max(NR);
    let chunks = total.div_ceil(nc);
    let (per, gs) = groups(chunks, pn, macs);
    let (clamp, act) = split_act(act);
    let dst = Out(out.as_mut_ptr());
    let run = |u: usize| {
        let (ci, gi) = (u / gs, u % gs);
        let g0 = ci * nc;
        let cols = nc.min(total - g0);
        let tiles = cols.div_ceil(NR);
        super::cpu::with_scratch(|buf| {
            let need = tiles * c * NR;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            // Each tile's runs (one per image it spans) and its columns: in place if
            // they are one image's, else packed.
            let mut runs = Vec::with_capacity(tiles + cols / p + 1);
            let mut first = Vec::with_capacity(tiles + 1);
            let mut bs = Vec::with_capacity(tiles);
            for ti in 0..tiles {
                let (t0, tc) = (g0 + ti * NR, NR.min(cols - ti * NR));
                first.push(runs.len());
                let mut a = 0;
                while a < tc {
                    let (img, pos) = ((t0 + a) / p, (t0 + a) % p);
                    let len = (p - pos).min(tc - a);
                    let at = img * o * p + pos;
                    runs.push(Run {
                        a,
                        len,
                        dst: dst.get().wrapping_add(at),
                        res: res.map_or(std::ptr::null(), |r| r.as_ptr().wrapping_add(at)),
                    });
                    a += len;
                }
                let own = &runs[first[ti]..];
                let src = |r: &Run| {
                    let (img, pos) = ((t0 + r.a) / p, (t0 + r.a) % p);
                    x[img * c * p + pos..].as_ptr()
                };
                if let [r] = own {
                    let tail = (r.len % 16 != 0).then(|| ((1u32 << (r.len % 16)) - 1) as u16);
                    bs.push((src(r), p, tail.unwrap_or(u16::MAX)));
                    continue;
                }
                let tb = &mut buf[ti * c * NR..(ti + 1) * c * NR];
                if tc < NR {
                    tb.chunks_exact_mut(NR).for_each(|row| row[tc..].fill(0.0));
                }
                for r in own {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: rows `0..c` of the run's image at its positions lie in
                    // `x`; the tile has `c` rows of `NR`; AVX-512 checked above.
                    unsafe {
                        pack_run(src(r), p, c, r.a, r.len, tb.as_mut_ptr());
                    }
                }
                bs.push((tb.as_ptr(), NR, u16::MAX));
            }
            first.push(runs.len());
            for pi in gi * per..((gi + 1) * per).min(pn) {
                let r0 = pi * MR;
                for ti in 0..tiles {
                    let rs = &runs[first[ti]..first[ti + 1]];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: panel `pi` has `MR·c` floats, column tile `ti` `c·NR`;
                    // rows `r0..r0 + rows` of every run's columns in `out` are this
                    // task's alone, and lie in `res`; AVX-512 checked above.
                    unsafe {
                        let tile = Tile {
                            a: panels.as_ptr().add(pi * MR * c),
                            a_rows: [std::ptr::null(); MR],
                            lda: 0,
                            b: bs[ti].0,
                            ldb: bs[ti].1,
                            b_tail: bs[ti].2,
                            k: c,
                            rows: (o - r0).min(MR),
                            ldc: p,
                            base: r0 * p,
                            runs: rs,
                        };
                        let e = Epi {
                            bias_row: bias.map_or(std::ptr::null(), |b| b.as_ptr().add(r0)),
                            bias_col: std::ptr::null(),
                            clamp,
                            act,
                        };
                        run_tile::<true>(&tile, &e);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (&rs, clamp);
                }
            }
        });
    };
    for_units(chunks * gs, macs, run);
}

/// A linear layer: `y[N, O] = act(x[N, I]·Wᵀ + bias)` with `panels` =
/// [`pack_cols`]`(W, O, I)`. Every output is written.
pub fn linear(
    panels: &[f32],
    (n, i, o): (usize, usize, usize),
    x: &[f32],
    bias: Option<&[f32]>,
    act: Option<A>,
    y: &mut [f32],
) {
    assert!(enabled(), "panel::linear without AVX-512");
    assert!(panels.len() >= cols_len(o, i) && bias.is_none_or(|b| b.len() >= o));
    assert!(x.len() >= n * i && y.len() >= n * o);
    if n == 0 || o == 0 {
        return;
    }
    let (qn, rt) = (o.div_ceil(NR), n.div_ceil(MR));
    let macs = n * i * o;
    let (per, gs) = groups(qn, rt, macs);
    let (clamp, act) = split_act(act);
    let dst = Out(y.as_mut_ptr());
    let run = |u: usize| {
        let (q, gi) = (u / gs, u % gs);
        let j0 = q * NR;
        for ti in gi * per..((gi + 1) * per).min(rt) {
            let r0 = ti * MR;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: panel `q` has `NR·i` floats; rows past `n` read row `n − 1` again
            // and are not stored; rows `r0..`, columns `j0..j0 + cols` of `y` are this
            // task's alone; AVX-512 checked above.
            unsafe {
                let cols = (o - j0).min(NR);
                col_tile(
                    ColTile {
                        panel: panels.as_ptr().add(q * NR * i),
                        a_rows: std::array::from_fn(|r| x.as_ptr().add((r0 + r).min(n - 1) * i)),
                        lda: 1,
                        k: i,
                        rows: (n - r0).min(MR),
                        cols,
                        dst: dst.get().add(r0 * o + j0),
                        ldc: o,
                        bias_col: bias.map_or(std::ptr::null(), |b| b.as_ptr().add(j0)),
                    },
                    clamp,
                    act,
                );
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (r0, j0, &dst, clamp);
        }
    };
    for_units(qn * gs, macs, run);
}

/// Rows (output positions) a task computes into its scratch before transposing them out.
const ROW_GROUP: usize = 64;

/// A batch of 1×1 convs with the positions as broadcast rows and 64 output channels in
/// the lanes: `out[n][O, P] = act(W·x[n] + bias + res[n])`, with `panels` =
/// [`pack_cols`]`(W, O, C)` (the linear layer's layout: `W` is `[O, C]`).
///
/// [`conv`] puts positions in the lanes: a 7×7 map at batch 1 fills 49 of 64, a 14×14 map
/// 196 of 256, a 4×4 map 16 of 64. Here a tile is 6 positions (read from the NCHW planes,
/// `P` apart per channel) × 64 channels, so only the last tile of an image's rows is
/// short. A task takes one image and one panel of 64 output channels (its weights stay
/// in L2 while it sweeps the image's rows), computes up to [`ROW_GROUP`] positions into a
/// `[row][64]` scratch with the bias and clamp in registers, and transposes them into the
/// channel planes (the residual, and an activation after it, on the transposed rows).
pub fn conv_rows(panels: &[f32], a: &Pointwise, out: &mut [f32]) {
    a.check("conv_rows", panels.len() >= cols_len(a.o, a.c), out);
    let Pointwise {
        o,
        c,
        x,
        n,
        p,
        bias,
        act,
        res,
    } = *a;
    if n == 0 || o == 0 || p == 0 {
        return;
    }
    let qn = o.div_ceil(NR);
    let groups = p.div_ceil(ROW_GROUP);
    let macs = n * o * c * p;
    // Row groups split across tasks only when images × panels leave threads idle.
    let threads = rayon::current_num_threads().max(1);
    let gsplit = if macs < SEQ_MACS {
        1
    } else {
        (2 * threads).div_ceil(n * qn).clamp(1, groups)
    };
    let gper = groups.div_ceil(gsplit);
    // Without a residual the activation goes with the bias into the tile; with one, it
    // follows the residual on the transposed rows.
    let (clamp, tile_act) = if res.is_none() {
        split_act(act)
    } else {
        (None, None)
    };
    let dst = Out(out.as_mut_ptr());
    let run = |u: usize| {
        let (img, q, gs) = (u / (qn * gsplit), u / gsplit % qn, u % gsplit);
        let j0 = q * NR;
        let cols = (o - j0).min(NR);
        let xi = &x[img * c * p..(img + 1) * c * p];
        ROWS_SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            s.resize(ROW_GROUP * NR, 0.0);
            for gi in gs * gper..((gs + 1) * gper).min(groups) {
                let (g0, g1) = (gi * ROW_GROUP, ((gi + 1) * ROW_GROUP).min(p));
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512 (asserted); panel `q` has `NR·c` floats; tile rows past
                // the image read its last position again and are not stored; the scratch
                // holds ROW_GROUP rows of NR; this task alone writes channels
                // j0..j0 + cols at positions g0..g1 of image `img` (and reads the
                // residual there).
                unsafe {
                    let sp = s.as_mut_ptr();
                    for r0 in (g0..g1).step_by(MR) {
                        col_tile(
                            ColTile {
                                panel: panels.as_ptr().add(q * NR * c),
                                a_rows: std::array::from_fn(|r| {
                                    xi.as_ptr().add((r0 + r).min(p - 1))
                                }),
                                lda: p,
                                k: c,
                                rows: (g1 - r0).min(MR),
                                cols,
                                dst: sp.add((r0 - g0) * NR),
                                ldc: NR,
                                bias_col: bias.map_or(std::ptr::null(), |b| b.as_ptr().add(j0)),
                            },
                            clamp,
                            tile_act,
                        );
                    }
                    let base = img * o * p + j0 * p + g0;
                    super::cpu::transpose_avx512(sp, NR, g1 - g0, cols, dst.get().add(base), p);
                    if let Some(r) = res {
                        for f in 0..cols {
                            let at = base + f * p;
                            let row = std::slice::from_raw_parts_mut(dst.get().add(at), g1 - g0);
                            super::act::bias_act(row, 0.0, Some(&r[at..at + g1 - g0]), act);
                        }
                    }
                }
            }
        })
    };
    for_units(n * qn * gsplit, macs, run);
}

thread_local! {
    /// [`conv_rows`]' `[row][64]` scratch per thread.
    static ROWS_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}
