//! Inference kernels for sparse weights in CSR form (see [`crate::graph::csr`] and
//! [`super::csr`]).
//!
//! Conv: per image, im2col (skipped for pointwise convs) then `out[O, P] = W_csr · col[K, P]`
//! as row-wise axpys, then an epilogue (per-channel scale — a batch norm folded at run
//! time —, bias, residual, ReLU) while the row is in cache. Images run in parallel; a
//! single image parallelises over output rows. Linear: gathers for a few rows, otherwise
//! `yᵀ = W_csr · xᵀ`. Grouped convs are not handled (the pack leaves them dense).

use super::act;
use super::conv::ConvCfg;
use super::cpu::{assume_init, transpose, uninit, with_f32, with_scratch};
use super::csr::{madd, CsrKernels, SparseWeight};
use super::im2col::{im2col, Geo};
use super::simd::{self, multiversion, Isa};
use crate::graph::csr::CsrMatrix;
use crate::graph::ops::ActivationKind;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::mem::MaybeUninit;

/// Per-output-channel affine (+ residual) and activation applied after the sparse product.
pub struct SparseEpilogue<'a> {
    pub scale: Option<&'a [f32]>,
    pub bias: Option<&'a [f32]>,
    /// Any activation of the IR: ReLU is applied as the tiles are stored, the others in one
    /// pass over each output channel while it is in cache (a separate op per activation
    /// cost a full pass over the output: MobileNetV2's ReLU6 after every sparse 1×1 conv).
    pub act: Option<ActivationKind>,
}

impl SparseEpilogue<'_> {
    fn relu(&self) -> bool {
        self.act == Some(ActivationKind::Relu)
    }

    /// The activation still to apply after the stores (anything but ReLU).
    fn after(&self) -> Option<ActivationKind> {
        self.act.filter(|k| *k != ActivationKind::Relu)
    }
}

pub(super) fn epilogue(e: &SparseEpilogue, out: &mut [f32], p: usize, res: Option<&[f32]>) {
    let relu = e.relu();
    for (o, row) in out.chunks_exact_mut(p).enumerate() {
        let s = e.scale.map_or(1.0, |s| s[o]);
        let b = e.bias.map_or(0.0, |b| b[o]);
        let r = res.map(|r| &r[o * p..(o + 1) * p]);
        match r {
            Some(r) => row.iter_mut().zip(r).for_each(|(v, x)| {
                let y = *v * s + b + x;
                *v = if relu { y.max(0.0) } else { y };
            }),
            None => row.iter_mut().for_each(|v| {
                let y = *v * s + b;
                *v = if relu { y.max(0.0) } else { y };
            }),
        }
        if let Some(k) = e.after() {
            act::apply(k, row);
        }
    }
}

/// Sparse conv of `x: [N, C, H, W]` with a weight of dims `w_dims` held as `csr`.
pub fn conv2d(
    x: &Tensor,
    sw: &SparseWeight,
    w_dims: &[usize],
    cfg: ConvCfg,
    epi: &SparseEpilogue,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let csr = &sw.csr;
    let g: Geo = cfg.geo(x.dims(), w_dims)?;
    if g.groups != 1 || csr.rows != g.o || csr.cols != g.k() {
        bail!(
            "sparse conv: weight {w_dims:?} with groups {} does not fit a {}×{} CSR",
            g.groups,
            csr.rows,
            csr.cols
        );
    }
    let (k, p) = (g.k(), g.p());
    let img_in = g.c * g.h * g.w;
    let img_out = g.o * p;
    if let Some(r) = residual {
        if r.dims() != [g.n, g.o, g.oh, g.ow] {
            bail!(
                "sparse conv residual {:?} does not match the output",
                r.dims()
            );
        }
    }
    // Small maps of several images, k×k convs read in place through masks.
    // (Keyed by the image's geometry: the batch does not change them.)
    let key = [
        g.c, g.h, g.w, g.kh, g.kw, g.oh, g.ow, g.sh, g.sw, g.pt, g.pl, g.dh, g.dw,
    ];
    let taps = (!g.is_pointwise() && super::sparse_images::applies(g.n, p))
        .then(|| sw.taps(&key, || super::sparse_images::Taps::new(&g, &csr.col_idx)));
    let taps = taps.as_deref().and_then(Option::as_ref);
    // The grouped image tiles, for a k×k conv's taps or a pointwise conv (`None`).
    let images = |xs: &[f32],
                  rs: Option<&[f32]>,
                  out: &mut [MaybeUninit<f32>],
                  taps: Option<&super::sparse_images::Taps>| {
        super::sparse_images::Batch {
            csr,
            x: xs,
            n: g.n,
            p,
            scale: epi.scale,
            bias: epi.bias,
            res: rs,
            act: epi.act,
            taps,
        }
        .run(out)
    };
    if let Some(taps) = taps {
        let run = |xs: &[f32], rs: Option<&[f32]>, out: &mut [MaybeUninit<f32>]| {
            images(xs, rs, out, Some(taps))
        };
        // SAFETY: `Batch::run` writes every element.
        return unsafe { filled(&g, x, residual, run) };
    }
    if direct_ok(&g) {
        let d = Direct::new(&g, sw, epi.after());
        fn ce<'r>(epi: &SparseEpilogue, o: usize, res: Option<&'r [f32]>) -> ChanEpi<'r> {
            ChanEpi {
                scale: epi.scale.map_or(1.0, |s| s[o]),
                bias: epi.bias.map_or(0.0, |b| b[o]),
                relu: epi.relu(),
                res,
            }
        }
        let run = |xs: &[f32], rs: Option<&[f32]>, out: &mut [MaybeUninit<f32>]| {
            let res_c = |n: usize, o: usize| rs.map(|r| &r[n * img_out + o * p..][..p]);
            if d.flat {
                // Pointwise: whole runs of channels per call, the input read where it is.
                let res_n = |n: usize, o0: usize| rs.map(|r| &r[n * img_out + o0 * p..]);
                if super::sparse_images::applies(g.n, p) {
                    // Small maps: the same channel of several images per tile.
                    images(xs, rs, out, None);
                } else if g.n == 1 {
                    // ~8 tasks per thread, each at least 16 K multiply-adds.
                    let work = csr.values.len() * p;
                    let tasks = (8 * rayon::current_num_threads()).min(work >> 14).max(1);
                    let per = g.o.div_ceil(tasks);
                    super::par::chunks_mut(out, per * p, |i, oc| {
                        d.flat_channels(&g, &xs[..img_in], i * per, oc, epi, res_n(0, i * per))
                    });
                } else {
                    super::par::chunks_mut(out, img_out, |n, out_n| {
                        let xn = &xs[n * img_in..(n + 1) * img_in];
                        d.flat_channels(&g, xn, 0, out_n, epi, res_n(n, 0))
                    });
                }
                return;
            }
            if g.n == 1 {
                d.with_input(&g, &xs[..img_in], |xin| {
                    // Pairs of channels per task.
                    super::par::chunks_mut(out, 2 * p, |t, oc| {
                        for (j, oc) in oc.chunks_mut(p).enumerate() {
                            let o = 2 * t + j;
                            d.channel(&g, xin, o, oc, ce(epi, o, res_c(0, o)));
                        }
                    });
                });
            } else {
                super::par::chunks_mut(out, img_out, |n, out_n| {
                    d.with_input(&g, &xs[n * img_in..(n + 1) * img_in], |xin| {
                        for (o, oc) in out_n.chunks_mut(p).enumerate() {
                            d.channel(&g, xin, o, oc, ce(epi, o, res_c(n, o)));
                        }
                    })
                });
            }
        };
        // SAFETY: every element is written by `Direct::channel` or the image tiles (no
        // zero-fill first).
        return unsafe { filled(&g, x, residual, run) };
    }
    let mut out = vec![0f32; g.n * img_out];
    let res = residual.map(|r| with_f32(r, |v| v.to_vec())).transpose()?;
    with_f32(x, |xs| {
        let one = |buf: &mut Vec<f32>, n: usize, out_n: &mut [f32]| {
            let xn = &xs[n * img_in..(n + 1) * img_in];
            let col: &[f32] = if g.is_pointwise() {
                xn
            } else {
                if buf.len() < k * p {
                    buf.resize(k * p, 0.0);
                }
                im2col(&g, xn, &mut buf[..k * p]);
                &buf[..k * p]
            };
            csr.spmm(col, p, out_n);
            epilogue(
                epi,
                out_n,
                p,
                res.as_deref().map(|r| &r[n * img_out..(n + 1) * img_out]),
            );
        };
        if g.n == 1 || rayon::current_num_threads() == 1 {
            with_scratch(|buf| {
                for (n, o) in out.chunks_mut(img_out).enumerate() {
                    one(buf, n, o);
                }
            });
        } else {
            super::par::chunks_mut(&mut out, img_out, |n, o| with_scratch(|buf| one(buf, n, o)));
        }
    })?;
    Ok(Tensor::from_vec(out, (g.n, g.o, g.oh, g.ow), &Device::Cpu)?)
}

/// The conv's output tensor `[N, O, OH, OW]`, made by `run` from the input's and the
/// residual's values into an uninitialised buffer.
///
/// # Safety
/// `run` writes every element of the buffer it is given.
unsafe fn filled(
    g: &Geo,
    x: &Tensor,
    residual: Option<&Tensor>,
    run: impl Fn(&[f32], Option<&[f32]>, &mut [MaybeUninit<f32>]),
) -> Result<Tensor> {
    let mut out = uninit(g.n * g.o * g.p());
    with_f32(x, |xs| match residual {
        Some(r) => with_f32(r, |rs| run(xs, Some(rs), &mut out)),
        None => {
            run(xs, None, &mut out);
            Ok(())
        }
    })??;
    // SAFETY: `run` wrote every element (the caller's contract).
    let out = unsafe { assume_init(out) };
    Ok(Tensor::from_vec(out, (g.n, g.o, g.oh, g.ow), &Device::Cpu)?)
}

/// Sparse `x·Wᵀ + b` for `x: [M, in]`.
pub fn linear(x: &Tensor, csr: &CsrMatrix, bias: Option<&[f32]>) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if k != csr.cols {
        bail!(
            "sparse linear: input has {k} features, the weight {}",
            csr.cols
        );
    }
    let o = csr.rows;
    let mut y = vec![0f32; m * o];
    with_f32(x, |xs| {
        if m <= 4 {
            csr.spmv_rows(xs, m, &mut y);
        } else {
            let mut xt = vec![0f32; k * m];
            transpose(xs, k, m, k, &mut xt, m);
            let mut yt = vec![0f32; o * m];
            csr.spmm(&xt, m, &mut yt);
            transpose(&yt, m, o, m, &mut y, o);
        }
    })?;
    if let Some(b) = bias {
        y.chunks_exact_mut(o)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
    Ok(Tensor::from_vec(y, (m, o), &Device::Cpu)?)
}

/// Direct sparse convolution (Park et al., "Faster CNNs with direct sparse convolutions",
/// ICLR 2017) for undilated, ungrouped convs of stride 1 or 2: no im2col. The input is
/// copied once into a zero-padded buffer — for stride 2 split into its four
/// (row parity, column parity) phase planes, so every tap again reads a contiguous run; an
/// unpadded stride-1 conv (every 1×1) reads the image itself — and a non-zero
/// `(c, ky, kx)` of output channel `o` adds `v · plane[y + ky/s, kx/s ..]` to output row
/// `y`. A tile of `R` output rows stays in registers across all the channel's non-zeros;
/// the epilogue (scale, bias, residual, ReLU) is applied as the tile is stored.
struct Direct<'a> {
    csr: &'a CsrMatrix,
    /// Per non-zero, its offset into one image's padded (phase-split) input at row 0.
    offs: std::sync::Arc<Vec<u32>>,
    /// The largest of `offs`: one bounds check per image covers every load of the tiles.
    max_off: usize,
    s: usize,
    /// The extent of one (phase) plane of the padded input.
    hs: usize,
    ws: usize,
    /// The padded input is the image itself (stride 1, no padding, nothing cropped).
    identity: bool,
    /// A pointwise conv on AVX-512: output positions flattened ([`flat_zmm`]).
    flat: bool,
    /// The instruction set, chosen once per call.
    isa: Isa,
    /// The activation applied after the tiles (anything but ReLU, which they apply).
    after: Option<ActivationKind>,
}

impl<'a> Direct<'a> {
    fn new(g: &Geo, sw: &'a SparseWeight, after: Option<ActivationKind>) -> Self {
        let csr = &sw.csr;
        let s = g.sh;
        let hp = (g.oh - 1) * s + g.kh;
        let wp = (g.ow - 1) * s + g.kw;
        let (hs, ws) = (hp.div_ceil(s), wp.div_ceil(s));
        let khw = g.kh * g.kw;
        let offs = sw.derived(&[s, hs, ws, g.kh, g.kw], || {
            csr.col_idx
                .iter()
                .map(|&k| {
                    let k = k as usize;
                    let (c, r) = (k / khw, k % khw);
                    let (ky, kx) = (r / g.kw, r % g.kw);
                    let plane = c * s * s + (ky % s) * s + kx % s;
                    ((plane * hs + ky / s) * ws + kx / s) as u32
                })
                .collect()
        });
        let max_off = offs.iter().copied().max().unwrap_or(0) as usize;
        let isa = simd::isa();
        Direct {
            csr,
            offs,
            max_off,
            s,
            hs,
            ws,
            identity: s == 1 && g.pt == 0 && g.pl == 0 && hs == g.h && ws == g.w,
            flat: flat_ok(g),
            isa,
            after,
        }
    }

    /// Runs `f` on one image's input as the tiles read it: the image itself when no
    /// padding is needed, else its padded (phase-split) copy. The copy lives in a
    /// per-thread buffer kept per geometry ([`PADDED`]), whose padding stays zero from
    /// call to call, so only the image's own pixels are written (at 90 % sparsity
    /// rewriting the zeros too took as long as a third of the multiply-adds).
    fn with_input<R>(&self, g: &Geo, x: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
        if self.identity {
            return f(x);
        }
        let s = self.s;
        let key = [g.c, g.h, g.w, s, self.hs, self.ws, g.pt, g.pl];
        let len = g.c * s * s * self.hs * self.ws;
        PADDED.with(|cache| {
            let Ok(mut cache) = cache.try_borrow_mut() else {
                // Re-entered (a pool thread ran another conv while this one waits):
                // a fresh buffer.
                let mut xp = vec![0f32; len];
                pad_interior(x, &mut xp, key);
                return f(&xp);
            };
            let at = match cache.iter().position(|(k, _)| *k == key) {
                Some(at) => at,
                None if len > PADDED_FLOATS => {
                    // Too large to keep (a 224×224 stem's planes): a fresh buffer.
                    drop(cache);
                    let mut xp = vec![0f32; len];
                    pad_interior(x, &mut xp, key);
                    return f(&xp);
                }
                None => {
                    // Oldest out until the new one fits the budget.
                    while cache.len() == PADDED_KEPT
                        || cache.iter().map(|(_, v)| v.len()).sum::<usize>() + len > PADDED_FLOATS
                    {
                        cache.remove(0);
                    }
                    cache.push((key, vec![0f32; len]));
                    cache.len() - 1
                }
            };
            let xp = &mut cache[at].1;
            pad_interior(x, xp, key);
            f(xp)
        })
    }

    /// Output channels `o0..o0 + out.len() / P` of one image of a pointwise conv on
    /// flattened positions (`self.flat`), epilogue applied, every element written. `res`
    /// is the residual of the same channels.
    fn flat_channels(
        &self,
        g: &Geo,
        x: &[f32],
        o0: usize,
        out: &mut [MaybeUninit<f32>],
        epi: &SparseEpilogue,
        res: Option<&[f32]>,
    ) {
        let p = g.p();
        assert!(self.flat && out.len().is_multiple_of(p) && o0 + out.len() / p <= g.o);
        assert!(res.is_none_or(|r| r.len() >= out.len()));
        // The bound every load of the tiles relies on: an offset plus one plane.
        assert!(
            self.max_off + p <= x.len(),
            "flat sparse conv: input buffer too small"
        );
        let ((lo, hi), after) = super::planes::clamp_split(epi.act);
        let f = Flat {
            csr: self.csr,
            offs: &self.offs,
            x,
            p,
            scale: epi.scale,
            bias: epi.bias,
            lo,
            hi,
        };
        // SAFETY: `flat` holds only with AVX-512; the asserts above bound every access.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            flat_zmm(&f, o0, out, res)
        };
        // Elsewhere `flat` is never set.
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (f, res);
        if let Some(k) = after {
            // SAFETY: the tiles wrote every element of these channels.
            let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
            act::apply(k, out);
        }
    }

    /// Output channel `o` of one image (`out`: `[OH·OW]`), epilogue applied, every element
    /// written.
    fn channel(&self, g: &Geo, xp: &[f32], o: usize, out: &mut [MaybeUninit<f32>], e: ChanEpi) {
        let (a, z) = (
            self.csr.row_ptr[o] as usize,
            self.csr.row_ptr[o + 1] as usize,
        );
        assert_eq!(out.len(), g.oh * g.ow);
        // The bound every load of `tiles` relies on: offset + last row + one row of output.
        assert!(
            a == z || self.max_off + (g.oh - 1) * self.ws + g.ow <= xp.len(),
            "direct sparse conv: input buffer too small"
        );
        let t = Tiles {
            vals: &self.csr.values[a..z],
            offs: &self.offs[a..z],
            xp,
            wp: self.ws,
            oh: g.oh,
            e,
        };
        // SAFETY: `simd::isa()` never reports a level the CPU lacks; the bound above
        // holds for every load.
        unsafe { run_tiles(self.isa, g.ow, &t, out) }
        if let Some(k) = self.after {
            // SAFETY: the tiles wrote every element of the channel.
            let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
            act::apply(k, out);
        }
    }
}

/// Padded input buffers kept per thread, per geometry (`[C, H, W, s, hs, ws, pt, pl]`),
/// for [`Direct::with_input`]: their padding is zero once and stays so.
type PaddedCache = Vec<([usize; 8], Vec<f32>)>;

thread_local! {
    static PADDED: std::cell::RefCell<PaddedCache> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Geometries kept per thread (ResNet-20 has six: three stages, two strided convs, and
/// the shortcut's), and their floats at most (16 MB).
const PADDED_KEPT: usize = 8;
const PADDED_FLOATS: usize = 1 << 22;

multiversion! {
    /// Writes one image `[C, H, W]` into its zero-padded planes, whose padding must be
    /// zero already: for stride `s`, plane `(c, py, px)` row `yq` column `k` holds padded
    /// pixel `(yq·s + py, k·s + px)`, i.e. input pixel `(yq·s + py − pt, k·s + px − pl)`,
    /// or (untouched) 0 outside the image. Row by row with fixed-size vector moves: a
    /// padded row is a few dozen floats, and a `memcpy` call per row (with `Vec::extend`'s
    /// bookkeeping, and for stride 2 a branch per element) cost as much as the sparse
    /// multiply-adds at 90 % sparsity.
    fn pad_interior(x: &[f32], xp: &mut [f32], d: [usize; 8]) {
        let [cn, h, w, s, hs, ws, pt, pl] = d;
        assert!(xp.len() >= cn * s * s * hs * ws && x.len() >= cn * h * w);
        // Nested loops, not divisions per row (five of them cost more than the copy).
        let mut rows = xp.chunks_exact_mut(ws);
        for c in 0..cn {
            for py in 0..s {
                for px in 0..s {
                    for yq in 0..hs {
                        let Some(row) = rows.next() else { return };
                        let Some(y) = (yq * s + py).checked_sub(pt).filter(|&y| y < h) else {
                            continue;
                        };
                        let src = &x[(c * h + y) * w..][..w];
                        if s == 1 {
                            let n = w.min(ws.saturating_sub(pl));
                            super::cpu::copy_row(&mut row[pl..pl + n], &src[..n]);
                        } else {
                            // Columns k with input column k·s + px − pl in [0, W), copied
                            // as pairs by the planes' strided copy (the index loop here
                            // compiled to scalar moves).
                            let k_lo = pl.saturating_sub(px).div_ceil(s);
                            let k_hi = ((w + pl).saturating_sub(px)).div_ceil(s).min(ws);
                            if k_lo < k_hi {
                                let first = k_lo * s + px - pl;
                                super::planes::copy_strided(&mut row[k_lo..k_hi], src, first, s);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One output channel's epilogue.
#[derive(Clone, Copy)]
struct ChanEpi<'a> {
    scale: f32,
    bias: f32,
    relu: bool,
    res: Option<&'a [f32]>,
}

/// Whether the direct kernel handles this geometry (any other runs im2col + SpMM).
fn direct_ok(g: &Geo) -> bool {
    flat_ok(g)
        || (g.sh == 1 || g.sh == 2)
            && g.sh == g.sw
            && g.dh == 1
            && g.dw == 1
            && g.groups == 1
            && matches!(g.ow, 32 | 16 | 8 | 28 | 14 | 7 | 4)
}

/// Whether a pointwise conv runs on flattened positions ([`flat_zmm`]): AVX-512 and
/// an ungrouped 1×1 conv at stride 1 without padding, any map size.
pub(super) fn flat_ok(g: &Geo) -> bool {
    cfg!(target_arch = "x86_64")
        && simd::isa() == Isa::Avx512
        && g.groups == 1
        && g.is_pointwise()
        && g.p() > 0
}

/// What every channel of a pointwise conv on flattened positions shares
/// ([`Direct::flat_channels`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct Flat<'a> {
    pub(super) csr: &'a CsrMatrix,
    pub(super) offs: &'a [u32],
    /// The image: `C` planes of `P` floats.
    pub(super) x: &'a [f32],
    pub(super) p: usize,
    pub(super) scale: Option<&'a [f32]>,
    pub(super) bias: Option<&'a [f32]>,
    /// The clamp applied at the store (ReLU, ReLU6 or none).
    pub(super) lo: f32,
    pub(super) hi: f32,
}

/// Output channels `o0..o0 + out.len() / P` of one image of a pointwise conv, positions
/// flattened: `out[o, q] = Σ_nz w·x[k, q]`, each non-zero one broadcast weight times whole
/// vectors of its input plane, scale, bias, residual and clamp at the store. The row-tile
/// kernels saw a 4×4 or 8×8 map as rows of 4 or 8 floats (one 16-float accumulator, or
/// 8-float ones), one dependent FMA chain per non-zero, and were called once per channel
/// (a 16-output channel of a 4×4 map is ~20 FMAs): MobileNetV2's widest 1×1 convs, on
/// 4×4 and 8×8 maps, ran no faster than the dense GEMM at 90 % sparsity. Here tiles of
/// `T` vectors split the non-zeros `S` ways (`T·S = 8` independent chains): 8 vectors of
/// a wide map, or one vector of a 4×4 map with its non-zeros in eight partial sums.
///
/// # Safety
/// AVX-512F; `f.x` holds `P` floats from every offset of `f.offs`; `out` (and `res`, if
/// given) hold whole channels of `P` from channel `o0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn flat_zmm(
    f: &Flat,
    o0: usize,
    out: &mut [MaybeUninit<f32>],
    res: Option<&[f32]>,
) {
    // Without a scale the sums start at the bias; without a clamp none is applied (the
    // epilogue is most of a tile's work when a channel has two or three non-zeros).
    // One loop per case, chosen once per call.
    let affine = f.scale.is_some();
    let clamp = f.lo > f32::NEG_INFINITY || f.hi < f32::INFINITY;
    // SAFETY: the caller's contract.
    unsafe {
        match (affine, clamp) {
            (true, true) => flat_channels_zmm::<true, true>(f, o0, out, res),
            (true, false) => flat_channels_zmm::<true, false>(f, o0, out, res),
            (false, true) => flat_channels_zmm::<false, true>(f, o0, out, res),
            (false, false) => flat_channels_zmm::<false, false>(f, o0, out, res),
        }
    }
}

/// [`flat_zmm`] with the scale applied (`A`) and the clamp (`C`) or not.
///
/// # Safety
/// As [`flat_zmm`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn flat_channels_zmm<const A: bool, const C: bool>(
    f: &Flat,
    o0: usize,
    out: &mut [MaybeUninit<f32>],
    res: Option<&[f32]>,
) {
    let p = f.p;
    let vecs = p.div_ceil(16);
    let last: u16 = match p % 16 {
        0 => u16::MAX,
        r => ((1u32 << r) - 1) as u16,
    };
    for (j, oc) in out.chunks_exact_mut(p).enumerate() {
        let o = o0 + j;
        let (a, z) = (f.csr.row_ptr[o] as usize, f.csr.row_ptr[o + 1] as usize);
        // The row tiles' operands, the map as one row of `P` (the clamp comes from `f`).
        let ch = Tiles {
            vals: &f.csr.values[a..z],
            offs: &f.offs[a..z],
            xp: f.x,
            wp: p,
            oh: 1,
            e: ChanEpi {
                scale: f.scale.map_or(1.0, |s| s[o]),
                bias: f.bias.map_or(0.0, |b| b[o]),
                relu: false,
                res: res.map(|r| &r[j * p..(j + 1) * p]),
            },
        };
        let mut v = 0;
        while v < vecs {
            let t = match vecs - v {
                8.. => 8,
                4..=7 => 4,
                2..=3 => 2,
                _ => 1,
            };
            // SAFETY: vectors v..v + t lie in the map; the caller's bounds.
            unsafe {
                match t {
                    8 => flat_tile::<8, 1, A, C>(f, &ch, v, vecs, last, oc),
                    4 => flat_tile::<4, 2, A, C>(f, &ch, v, vecs, last, oc),
                    2 => flat_tile::<2, 4, A, C>(f, &ch, v, vecs, last, oc),
                    _ => flat_tile::<1, 8, A, C>(f, &ch, v, vecs, last, oc),
                }
            }
            v += t;
        }
    }
}

/// Vectors `v0..v0 + T` of one channel (see [`flat_zmm`]); the map's last vector
/// (`vecs − 1`) keeps the lanes of `last`.
///
/// # Safety
/// As [`flat_zmm`]; `v0 + T ≤ vecs`; `out` and `ch.e.res` hold the channel's `P` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn flat_tile<const T: usize, const S: usize, const A: bool, const C: bool>(
    f: &Flat,
    ch: &Tiles,
    v0: usize,
    vecs: usize,
    last: u16,
    out: &mut [MaybeUninit<f32>],
) {
    use std::arch::x86_64::*;
    let mask: [u16; T] = std::array::from_fn(|i| if v0 + i + 1 == vecs { last } else { u16::MAX });
    let x = ch.xp.as_ptr();
    let nnz = ch.vals.len();
    // SAFETY: every load is inside plane `off` (masked at the map's end); the stores and
    // residual loads inside the channel's `P` values.
    unsafe {
        let (scale, bias) = (_mm512_set1_ps(ch.e.scale), _mm512_set1_ps(ch.e.bias));
        let mut acc = [[_mm512_setzero_ps(); T]; S];
        if !A {
            // No scale: the sums start at the bias.
            acc[0] = [bias; T];
        }
        let mut i = 0;
        while i + S <= nnz {
            for s in 0..S {
                let w = _mm512_set1_ps(*ch.vals.get_unchecked(i + s));
                let base = x.add(*ch.offs.get_unchecked(i + s) as usize + v0 * 16);
                for j in 0..T {
                    let xv = _mm512_maskz_loadu_ps(mask[j], base.add(j * 16));
                    acc[s][j] = _mm512_fmadd_ps(w, xv, acc[s][j]);
                }
            }
            i += S;
        }
        while i < nnz {
            let w = _mm512_set1_ps(*ch.vals.get_unchecked(i));
            let base = x.add(*ch.offs.get_unchecked(i) as usize + v0 * 16);
            for j in 0..T {
                let xv = _mm512_maskz_loadu_ps(mask[j], base.add(j * 16));
                acc[0][j] = _mm512_fmadd_ps(w, xv, acc[0][j]);
            }
            i += 1;
        }
        let (lo, hi) = (_mm512_set1_ps(f.lo), _mm512_set1_ps(f.hi));
        let o = out.as_mut_ptr() as *mut f32;
        for j in 0..T {
            let mut sum = acc[0][j];
            for s in 1..S {
                sum = _mm512_add_ps(sum, acc[s][j]);
            }
            let at = (v0 + j) * 16;
            let mut y = if A {
                _mm512_fmadd_ps(sum, scale, bias)
            } else {
                sum
            };
            if let Some(r) = ch.e.res {
                y = _mm512_add_ps(y, super::simd::load16(r.as_ptr().add(at), mask[j]));
            }
            if C {
                // Bound first, value second: a NaN passes through, as in the other kernels.
                y = _mm512_min_ps(hi, _mm512_max_ps(lo, y));
            }
            super::simd::store16(o.add(at), mask[j], y);
        }
    }
}

/// The operands of one output channel's tiles.
struct Tiles<'a> {
    vals: &'a [f32],
    offs: &'a [u32],
    xp: &'a [f32],
    wp: usize,
    oh: usize,
    e: ChanEpi<'a>,
}

/// Runs one output channel's tiles on the kernel for its width and instruction set.
///
/// Register tiles hold 8 vector accumulators — 8 independent FMA chains, enough to hide
/// the FMA latency (a tile of 4, the earlier AVX-512 layout, ran latency-bound at about one
/// FMA per cycle). Widths that are a multiple of 8 use explicit vector code: AVX-512 takes
/// 32 and 16 in 16-float registers (4 and 8 rows per tile) and 8 in 8-float registers
/// (8 rows); AVX2 takes all three in 8-float registers (2, 4 and 8 rows). The other widths
/// (28, 14, 7, 4) run a loop the compiler vectorises, with tiles of up to 64 floats. A tile
/// never has more rows than the image (a 4×4 or 7×7 map is one tile, not 4 or 7 one-row
/// tiles); rows that do not fill a whole tile run one at a time.
///
/// # Safety
/// `isa` is available on this CPU; every `off + (oh − 1)·wp + ow ≤ xp.len()`.
unsafe fn run_tiles(isa: Isa, ow: usize, t: &Tiles, out: &mut [MaybeUninit<f32>]) {
    // Whole tiles of the first `R` (of those listed) not above the height, then the
    // remaining rows one at a time.
    macro_rules! whole_then_rows {
        ($f:ident, $ow:literal, $($r:literal),+) => {{
            $(
                if $r <= t.oh {
                    let full = t.oh / $r * $r;
                    $f::<$ow, $r>(t, 0..full, out);
                    $f::<$ow, 1>(t, full..t.oh, out);
                    return;
                }
            )+
            $f::<$ow, 1>(t, 0..t.oh, out);
        }};
    }
    macro_rules! generic {
        ($f:ident) => {
            match ow {
                32 => whole_then_rows!($f, 32, 2),
                28 => whole_then_rows!($f, 28, 2),
                16 => whole_then_rows!($f, 16, 4, 2),
                14 => whole_then_rows!($f, 14, 4, 2),
                8 => whole_then_rows!($f, 8, 8, 4, 2),
                7 => whole_then_rows!($f, 7, 8, 7, 4, 2),
                4 => whole_then_rows!($f, 4, 16, 8, 4, 2),
                w => unreachable!("direct sparse conv called with output width {w}"),
            }
        };
    }
    // SAFETY (every call below): the caller's bound and instruction set.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => match ow {
                32 => whole_then_rows!(tiles_zmm, 32, 4, 2),
                16 => whole_then_rows!(tiles_zmm, 16, 8, 4, 2),
                8 => whole_then_rows!(tiles_ymm, 8, 8, 4, 2),
                _ => generic!(tiles_avx512),
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => match ow {
                32 => whole_then_rows!(tiles_ymm, 32, 2),
                16 => whole_then_rows!(tiles_ymm, 16, 4, 2),
                8 => whole_then_rows!(tiles_ymm, 8, 8, 4, 2),
                _ => generic!(tiles_avx2),
            },
            _ => generic!(tiles_portable),
        }
    }
}

/// Defines an explicit-vector tile kernel over one register type: output rows `rows` of
/// one channel in tiles of `R` rows of width `OW` (`OW` a multiple of the lane count),
/// `R·OW/lanes ≤ 8` accumulators, the epilogue applied at the store.
macro_rules! vector_tiles {
    ($(#[$m:meta])* $name:ident, $features:literal, $lanes:literal, $vec:ty,
     $zero:ident, $set1:ident, $loadu:ident, $storeu:ident, $fmadd:ident, $add:ident, $max:ident) => {
        $(#[$m])*
        /// # Safety
        /// The CPU has these features; every `off + (rows.end − 1)·wp + OW ≤ xp.len()`;
        /// `out` holds the channel's `oh·OW` outputs.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const OW: usize, const R: usize>(
            t: &Tiles,
            rows: std::ops::Range<usize>,
            out: &mut [MaybeUninit<f32>],
        ) {
            use std::arch::x86_64::*;
            let per_row = OW / $lanes;
            let n = R * per_row;
            debug_assert!(OW % $lanes == 0 && n <= 8 && rows.end <= t.oh);
            debug_assert!(out.len() >= t.oh * OW);
            let (scale, bias, zero) = ($set1(t.e.scale), $set1(t.e.bias), $zero());
            let mut y0 = rows.start;
            while y0 + R <= rows.end {
                let mut acc: [$vec; 8] = [$zero(); 8];
                for (&v, &off) in t.vals.iter().zip(t.offs) {
                    let vv = $set1(v);
                    // SAFETY: the caller's bound covers rows y0..y0 + R.
                    let base = unsafe { t.xp.as_ptr().add(off as usize + y0 * t.wp) };
                    for r in 0..R {
                        for j in 0..per_row {
                            let i = r * per_row + j;
                            // SAFETY: as above.
                            let x = unsafe { $loadu(base.add(r * t.wp + j * $lanes)) };
                            acc[i] = $fmadd(vv, x, acc[i]);
                        }
                    }
                }
                let at = y0 * OW;
                for (i, a) in acc.iter().enumerate().take(n) {
                    let mut y = $fmadd(*a, scale, bias);
                    if let Some(res) = t.e.res {
                        // SAFETY: the residual has the channel's oh·OW values.
                        y = $add(y, unsafe { $loadu(res.as_ptr().add(at + i * $lanes)) });
                    }
                    if t.e.relu {
                        y = $max(y, zero);
                    }
                    // SAFETY: at + (i + 1)·lanes ≤ (y0 + R)·OW ≤ out.len().
                    unsafe { $storeu(out.as_mut_ptr().add(at + i * $lanes) as *mut f32, y) };
                }
                y0 += R;
            }
        }
    };
}

vector_tiles!(
    /// 16-float (AVX-512) register tiles.
    tiles_zmm, "avx512f", 16, __m512,
    _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps,
    _mm512_add_ps, _mm512_max_ps
);
vector_tiles!(
    /// 8-float (AVX2) register tiles.
    tiles_ymm, "avx2,fma", 8, __m256,
    _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps,
    _mm256_add_ps, _mm256_max_ps
);

/// Defines the compiler-vectorised tile kernel for one instruction set (see [`tiles`]).
macro_rules! generic_tiles {
    ($name:ident, $features:literal, $fma:literal) => {
        /// # Safety
        /// The CPU has these features; the bound of [`tiles`].
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const OW: usize, const R: usize>(
            t: &Tiles,
            rows: std::ops::Range<usize>,
            out: &mut [MaybeUninit<f32>],
        ) {
            // SAFETY: the caller's bound.
            unsafe { tiles::<OW, R, $fma>(t, rows, out) }
        }
    };
}
generic_tiles!(
    tiles_avx512,
    "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma",
    true
);
generic_tiles!(tiles_avx2, "avx2,fma", true);

/// # Safety
/// The bound of [`tiles`].
unsafe fn tiles_portable<const OW: usize, const R: usize>(
    t: &Tiles,
    rows: std::ops::Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    // SAFETY: the caller's bound.
    unsafe { tiles::<OW, R, false>(t, rows, out) }
}

#[inline(always)]
fn store(acc: &[f32], out: &mut [MaybeUninit<f32>], res: Option<&[f32]>, e: &ChanEpi) {
    debug_assert_eq!(acc.len(), out.len());
    match res {
        Some(r) => {
            for ((o, a), r) in out.iter_mut().zip(acc).zip(r) {
                let y = a * e.scale + e.bias + r;
                o.write(if e.relu { y.max(0.0) } else { y });
            }
        }
        None => {
            for (o, a) in out.iter_mut().zip(acc) {
                let y = a * e.scale + e.bias;
                o.write(if e.relu { y.max(0.0) } else { y });
            }
        }
    }
}

/// Output floats of the compiler-vectorised tile (its accumulator array).
const TILE: usize = 64;

/// Output rows `rows` of one channel in tiles of `R` rows of width `OW` (`R·OW ≤ TILE`),
/// each tile accumulated over the channel's non-zeros and stored once, epilogue applied.
///
/// # Safety
/// Every `off + (rows.end − 1)·wp + OW ≤ xp.len()` (checked once per image by the caller).
#[inline(always)]
unsafe fn tiles<const OW: usize, const R: usize, const FMA: bool>(
    t: &Tiles,
    rows: std::ops::Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    debug_assert!(R * OW <= TILE && rows.end <= t.oh);
    let mut y0 = rows.start;
    while y0 + R <= rows.end {
        let mut acc = [0f32; TILE];
        for (&v, &off) in t.vals.iter().zip(t.offs) {
            let base = off as usize + y0 * t.wp;
            for r in 0..R {
                // SAFETY: the caller's bound covers rows y0..y0 + R.
                let src = unsafe { &*(t.xp.as_ptr().add(base + r * t.wp) as *const [f32; OW]) };
                for x in 0..OW {
                    acc[r * OW + x] = madd::<FMA>(v, src[x], acc[r * OW + x]);
                }
            }
        }
        let span = y0 * OW..(y0 + R) * OW;
        let res = t.e.res.map(|q| &q[span.clone()]);
        store(&acc[..R * OW], &mut out[span], res, &t.e);
        y0 += R;
    }
}
