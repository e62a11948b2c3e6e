//! Inference kernels for sparse weights in CSR form (see [`crate::graph::csr`] and
//! [`super::csr`]).
//!
//! Conv: per image, im2col (skipped for pointwise convs) then `out[O, P] = W_csr · col[K, P]`
//! as row-wise axpys, then an epilogue (per-channel scale — a batch norm folded at run
//! time —, bias, residual, ReLU) while the row is in cache. Images run in parallel; a
//! single image parallelises over output rows. Linear: gathers for a few rows, otherwise
//! `yᵀ = W_csr · xᵀ`. Grouped convs are not handled (the pack leaves them dense).

use super::conv::ConvCfg;
use super::cpu::{with_f32, with_scratch};
use super::csr::{madd, CsrKernels, SparseWeight};
use super::im2col::{im2col, Geo};
use crate::graph::csr::CsrMatrix;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// Per-output-channel affine + ReLU (+ residual) applied after the sparse product.
pub struct SparseEpilogue<'a> {
    pub scale: Option<&'a [f32]>,
    pub bias: Option<&'a [f32]>,
    pub relu: bool,
}

fn epilogue(e: &SparseEpilogue, out: &mut [f32], p: usize, res: Option<&[f32]>) {
    for (o, row) in out.chunks_exact_mut(p).enumerate() {
        let s = e.scale.map_or(1.0, |s| s[o]);
        let b = e.bias.map_or(0.0, |b| b[o]);
        let r = res.map(|r| &r[o * p..(o + 1) * p]);
        match r {
            Some(r) => row.iter_mut().zip(r).for_each(|(v, x)| {
                let y = *v * s + b + x;
                *v = if e.relu { y.max(0.0) } else { y };
            }),
            None => row.iter_mut().for_each(|v| {
                let y = *v * s + b;
                *v = if e.relu { y.max(0.0) } else { y };
            }),
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
    let mut out = vec![0f32; g.n * img_out];
    if let Some(r) = residual {
        if r.dims() != [g.n, g.o, g.oh, g.ow] {
            bail!(
                "sparse conv residual {:?} does not match the output",
                r.dims()
            );
        }
    }
    if direct_ok(&g) {
        let d = Direct::new(&g, sw);
        fn ce<'r>(epi: &SparseEpilogue, o: usize, res: Option<&'r [f32]>) -> ChanEpi<'r> {
            ChanEpi {
                scale: epi.scale.map_or(1.0, |s| s[o]),
                bias: epi.bias.map_or(0.0, |b| b[o]),
                relu: epi.relu,
                res,
            }
        }
        let run = |xs: &[f32], rs: Option<&[f32]>, out: &mut [f32]| {
            let res_c = |n: usize, o: usize| rs.map(|r| &r[n * img_out + o * p..][..p]);
            if g.n == 1 {
                with_scratch(|xp| {
                    d.pad(&g, &xs[..img_in], xp);
                    let xp = &*xp;
                    out.par_chunks_mut(p)
                        .enumerate()
                        .with_min_len(2)
                        .for_each(|(o, oc)| d.channel(&g, xp, o, oc, ce(epi, o, res_c(0, o))));
                });
            } else {
                out.par_chunks_mut(img_out)
                    .enumerate()
                    .for_each(|(n, out_n)| {
                        with_scratch(|xp| {
                            d.pad(&g, &xs[n * img_in..(n + 1) * img_in], xp);
                            for (o, oc) in out_n.chunks_mut(p).enumerate() {
                                d.channel(&g, xp, o, oc, ce(epi, o, res_c(n, o)));
                            }
                        })
                    });
            }
        };
        with_f32(x, |xs| match residual {
            Some(r) => with_f32(r, |rs| run(xs, Some(rs), &mut out)),
            None => {
                run(xs, None, &mut out);
                Ok(())
            }
        })??;
        return Ok(Tensor::from_vec(out, (g.n, g.o, g.oh, g.ow), &Device::Cpu)?);
    }
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
            out.par_chunks_mut(img_out)
                .enumerate()
                .for_each(|(n, o)| with_scratch(|buf| one(buf, n, o)));
        }
    })?;
    Ok(Tensor::from_vec(out, (g.n, g.o, g.oh, g.ow), &Device::Cpu)?)
}

/// `dst[c, r] = src[r, c]` for a row-major `rows × cols` source, in 16×16 blocks so both
/// sides stay in cache lines.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const B: usize = 16;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
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
            transpose(xs, m, k, &mut xt);
            let mut yt = vec![0f32; o * m];
            csr.spmm(&xt, m, &mut yt);
            transpose(&yt, o, m, &mut y);
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
/// (row parity, column parity) phase planes, so every tap again reads a contiguous run —
/// and a non-zero `(c, ky, kx)` of output channel `o` adds `v · plane[y + ky/s, kx/s ..]` to
/// output row `y`. A tile of `T` output rows (`T·OW ≤ TILE` floats) stays in registers across
/// all the channel's non-zeros; the epilogue (scale, bias, residual, ReLU) is applied as
/// the tile is stored.
struct Direct<'a> {
    csr: &'a CsrMatrix,
    /// Per non-zero, its offset into one image's padded (phase-split) input at row 0.
    offs: std::sync::Arc<Vec<u32>>,
    s: usize,
    /// Padded extent, and the extent of one phase plane.
    hp: usize,
    wp: usize,
    hs: usize,
    ws: usize,
}

impl<'a> Direct<'a> {
    fn new(g: &Geo, sw: &'a SparseWeight) -> Self {
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
        Direct {
            csr,
            offs,
            s,
            hp,
            wp,
            hs,
            ws,
        }
    }

    fn pad(&self, g: &Geo, x: &[f32], xp: &mut Vec<f32>) {
        let s = self.s;
        xp.clear();
        if s == 1 {
            // Row by row, each element written once (no zero-fill then copy).
            let w = g.w.min(self.ws.saturating_sub(g.pl));
            let right = self.ws - g.pl - w;
            for c in 0..g.c {
                for yp in 0..self.hs {
                    match yp.checked_sub(g.pt).filter(|&y| y < g.h) {
                        Some(y) => {
                            xp.extend(std::iter::repeat_n(0.0, g.pl));
                            xp.extend_from_slice(&x[(c * g.h + y) * g.w..][..w]);
                            xp.extend(std::iter::repeat_n(0.0, right));
                        }
                        None => xp.extend(std::iter::repeat_n(0.0, self.ws)),
                    }
                }
            }
            return;
        }
        xp.resize(g.c * s * s * self.hs * self.ws, 0.0);
        for c in 0..g.c {
            for y in 0..g.h {
                let yp = y + g.pt;
                if yp >= self.hp {
                    break;
                }
                let src = &x[(c * g.h + y) * g.w..][..g.w];
                let w = g.w.min(self.wp.saturating_sub(g.pl));
                if s == 1 {
                    let d = (c * self.hs + yp) * self.ws + g.pl;
                    xp[d..d + w].copy_from_slice(&src[..w]);
                } else {
                    // Stride 2: even and odd padded columns go to their two planes.
                    let row =
                        |px: usize| ((c * 4 + (yp % 2) * 2 + px) * self.hs + yp / 2) * self.ws;
                    let (r0, r1) = (row(0), row(1));
                    for (xx, &v) in src[..w].iter().enumerate() {
                        let xq = xx + g.pl;
                        let d = if xq & 1 == 0 { r0 } else { r1 };
                        xp[d + (xq >> 1)] = v;
                    }
                }
            }
        }
    }

    /// Output channel `o` of one image (`out`: `[OH·OW]`), epilogue applied.
    fn channel(&self, g: &Geo, xp: &[f32], o: usize, out: &mut [f32], e: ChanEpi) {
        let (a, z) = (
            self.csr.row_ptr[o] as usize,
            self.csr.row_ptr[o + 1] as usize,
        );
        let (vals, offs) = (&self.csr.values[a..z], &self.offs[a..z]);
        let ws = self.ws;
        match g.ow {
            32 => tile_dispatch::<32>(vals, offs, xp, ws, g.oh, out, e),
            16 => tile_dispatch::<16>(vals, offs, xp, ws, g.oh, out, e),
            8 => tile_dispatch::<8>(vals, offs, xp, ws, g.oh, out, e),
            28 => tile_dispatch::<28>(vals, offs, xp, ws, g.oh, out, e),
            14 => tile_dispatch::<14>(vals, offs, xp, ws, g.oh, out, e),
            7 => tile_dispatch::<7>(vals, offs, xp, ws, g.oh, out, e),
            4 => tile_dispatch::<4>(vals, offs, xp, ws, g.oh, out, e),
            w => unreachable!("direct sparse conv called with output width {w}"),
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
    (g.sh == 1 || g.sh == 2)
        && g.sh == g.sw
        && g.dh == 1
        && g.dw == 1
        && g.groups == 1
        && matches!(g.ow, 32 | 16 | 8 | 28 | 14 | 7 | 4)
}

fn tile_dispatch<const OW: usize>(
    vals: &[f32],
    offs: &[u32],
    xp: &[f32],
    wp: usize,
    oh: usize,
    out: &mut [f32],
    e: ChanEpi,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected on this CPU.
            return unsafe { tiles_avx512::<OW>(vals, offs, xp, wp, oh, out, e) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected on this CPU.
            return unsafe { tiles_avx2::<OW>(vals, offs, xp, wp, oh, out, e) };
        }
    }
    tiles::<OW, false>(vals, offs, xp, wp, oh, out, e)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tiles_avx512<const OW: usize>(
    vals: &[f32],
    offs: &[u32],
    xp: &[f32],
    wp: usize,
    oh: usize,
    out: &mut [f32],
    e: ChanEpi,
) {
    tiles::<OW, true>(vals, offs, xp, wp, oh, out, e)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles_avx2<const OW: usize>(
    vals: &[f32],
    offs: &[u32],
    xp: &[f32],
    wp: usize,
    oh: usize,
    out: &mut [f32],
    e: ChanEpi,
) {
    tiles::<OW, true>(vals, offs, xp, wp, oh, out, e)
}

#[inline(always)]
fn store(acc: &[f32], out: &mut [f32], res: Option<&[f32]>, e: &ChanEpi) {
    match res {
        Some(r) => {
            for ((o, a), r) in out.iter_mut().zip(acc).zip(r) {
                let y = a * e.scale + e.bias + r;
                *o = if e.relu { y.max(0.0) } else { y };
            }
        }
        None => {
            for (o, a) in out.iter_mut().zip(acc) {
                let y = a * e.scale + e.bias;
                *o = if e.relu { y.max(0.0) } else { y };
            }
        }
    }
}

/// Output floats per register tile: 8 AVX-512 accumulators, so each non-zero's overhead
/// (index, broadcast) is spread over 128 multiply-adds.
const TILE: usize = 64;

#[inline(always)]
fn tiles<const OW: usize, const FMA: bool>(
    vals: &[f32],
    offs: &[u32],
    xp: &[f32],
    wp: usize,
    oh: usize,
    out: &mut [f32],
    e: ChanEpi,
) {
    let t_rows = (TILE / OW).max(1);
    let mut y0 = 0;
    while y0 < oh {
        let t = t_rows.min(oh - y0);
        let span = y0 * OW..(y0 + t) * OW;
        let res = e.res.map(|r| &r[span.clone()]);
        if t == t_rows {
            let mut acc = [0f32; TILE];
            for (&v, &off) in vals.iter().zip(offs) {
                let base = off as usize + y0 * wp;
                for r in 0..t_rows {
                    let src: &[f32; OW] = xp[base + r * wp..][..OW].try_into().unwrap();
                    for x in 0..OW {
                        acc[r * OW + x] = madd::<FMA>(v, src[x], acc[r * OW + x]);
                    }
                }
            }
            store(&acc[..t * OW], &mut out[span], res, &e);
        } else {
            for r in 0..t {
                let mut acc = [0f32; OW];
                for (&v, &off) in vals.iter().zip(offs) {
                    let src: &[f32; OW] =
                        xp[off as usize + (y0 + r) * wp..][..OW].try_into().unwrap();
                    for x in 0..OW {
                        acc[x] = madd::<FMA>(v, src[x], acc[x]);
                    }
                }
                let rr = res.map(|q| &q[r * OW..(r + 1) * OW]);
                store(&acc, &mut out[(y0 + r) * OW..(y0 + r + 1) * OW], rr, &e);
            }
        }
        y0 += t;
    }
}
