//! Max and average pooling with padding, any kernel/stride, floor or ceil mode, and
//! correct backward passes (candle 0.11's max-pool backward is 0.25x off for 2x2/2 and
//! supports neither padding nor kernel != stride).

use super::cpu::{ce, slice, tensor, with_f32};
use super::simd::multiversion;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolCfg {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub padding: [usize; 4],
    pub ceil_mode: bool,
    pub count_include_pad: bool,
}

pub struct PoolOp {
    pub cfg: PoolCfg,
    pub max: bool,
}

/// A half-open range of input rows or columns.
type Span = (usize, usize);

struct PGeo {
    nc: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl PoolCfg {
    fn geo(&self, dims: &[usize]) -> candle_core::Result<PGeo> {
        if dims.len() != 4 {
            candle_core::bail!("pool: expected a 4-d input, got {dims:?}");
        }
        let o = |len, k, s, a, b| {
            crate::graph::shape::window_out(len, k, s, a, b, 1, self.ceil_mode).ok_or_else(|| {
                candle_core::Error::Msg(format!("pool: kernel {k} too large for {len}"))
            })
        };
        Ok(PGeo {
            nc: dims[0] * dims[1],
            h: dims[2],
            w: dims[3],
            oh: o(
                dims[2],
                self.kernel[0],
                self.stride[0],
                self.padding[0],
                self.padding[2],
            )?,
            ow: o(
                dims[3],
                self.kernel[1],
                self.stride[1],
                self.padding[1],
                self.padding[3],
            )?,
        })
    }

    /// The clipped input rows `[y0, y1)` of every output row and columns `[x0, x1)` of
    /// every output column (a window is their product), worked out once per call.
    fn spans(&self, g: &PGeo) -> (Vec<Span>, Vec<Span>) {
        let rows = (0..g.oh)
            .map(|oy| {
                let (y0, y1, ..) = self.window(g, oy, 0);
                (y0, y1)
            })
            .collect();
        let cols = (0..g.ow)
            .map(|ox| {
                let (_, _, x0, x1, _) = self.window(g, 0, ox);
                (x0, x1)
            })
            .collect();
        (rows, cols)
    }

    /// Input window `[y0, y1) x [x0, x1)` clipped to the image, and the divisor for
    /// average pooling.
    #[inline]
    fn window(&self, g: &PGeo, oy: usize, ox: usize) -> (usize, usize, usize, usize, f32) {
        let ys = (oy * self.stride[0]) as isize - self.padding[0] as isize;
        let xs = (ox * self.stride[1]) as isize - self.padding[1] as isize;
        let ye = ys + self.kernel[0] as isize;
        let xe = xs + self.kernel[1] as isize;
        let (y0, y1) = (ys.max(0) as usize, (ye.min(g.h as isize)).max(0) as usize);
        let (x0, x1) = (xs.max(0) as usize, (xe.min(g.w as isize)).max(0) as usize);
        let div = if self.count_include_pad {
            // PyTorch: the window clipped to the padded extent.
            let ph = (ye.min((g.h + self.padding[2]) as isize) - ys) as f32;
            let pw = (xe.min((g.w + self.padding[3]) as isize) - xs) as f32;
            ph * pw
        } else {
            ((y1 - y0) * (x1 - x0)) as f32
        };
        (y0, y1, x0, x1, div.max(1.0))
    }
}

impl CustomOp1 for PoolOp {
    fn name(&self) -> &'static str {
        if self.max {
            "lopper-maxpool"
        } else {
            "lopper-avgpool"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "pool input")?;
        let g = self.cfg.geo(l.dims())?;
        let (hw, p) = (g.h * g.w, g.oh * g.ow);
        let mut out = vec![0f32; g.nc * p];
        if self.cfg.kernel == [1, 1] && self.cfg.padding == [0; 4] {
            // A 1×1 window (a strided subsample: ResNet option-A shortcuts, strided
            // slices) is a gather, max and average alike.
            let [sh, sw] = self.cfg.stride;
            super::cpu::subsample_planes(x, (g.h, g.w), (g.oh, g.ow), (sh, sw), &mut out);
            let d = l.dims();
            return Ok((CpuStorage::F32(out), Shape::from((d[0], d[1], g.oh, g.ow))));
        }
        if self.max
            && self.cfg.kernel == [2, 2]
            && self.cfg.stride == [2, 2]
            && self.cfg.padding == [0; 4]
            && g.h % 2 == 0
            && g.w % 2 == 0
        {
            // The 2×2/2 max pool of most CNNs on even maps: output row R of the whole
            // [N·C·OH] stack reads input rows 2R and 2R + 1, across plane boundaries, so
            // it is one flat loop in large parallel chunks. Per plane, a 14×14 map's
            // seven short rows cost more in set-up than in work (the digit CNN's 64×14×14
            // pool at batch 64 took 0.34 ms, onnxruntime's 0.055).
            let rows_out = g.nc * g.oh;
            let per = (1usize << 14).div_ceil(g.ow.max(1)).max(1);
            super::par::chunks_mut(&mut out[..], per * g.ow, |t, o| {
                #[cfg(target_arch = "x86_64")]
                if super::simd::isa() == super::simd::Isa::Avx512 {
                    assert!(x.len() >= 2 * (t * per) * g.w + 2 * o.len());
                    // SAFETY: AVX-512F; input rows 2·r0.. of `o`'s rows lie in `x`
                    // (asserted), `o` holds whole output rows.
                    return unsafe { max2x2_rows_zmm(x.as_ptr(), g.w, t * per, o) };
                }
                max2x2_rows(x, g.w, t * per, o)
            });
            debug_assert_eq!(out.len(), rows_out * g.ow);
            let d = l.dims();
            return Ok((CpuStorage::F32(out), Shape::from((d[0], d[1], g.oh, g.ow))));
        }
        // Separable: each output row first reduces its input rows elementwise (contiguous,
        // vectorised), then each output column reduces its window of that row. The
        // per-output window loop this replaces was 11 % of ResNet-18's forward at b8.
        let (rows, cols) = self.cfg.spans(&g);
        let max = self.max;
        // Every column window is the pair (2·ox, 2·ox + 1): the 2×2/2 pool of most CNNs.
        let pairs = cols
            .iter()
            .enumerate()
            .all(|(i, &c)| c == (2 * i, 2 * i + 2));
        let cfg = &self.cfg;
        // Max pools' column windows of more than two, or strided other than as pairs (the
        // 3×3/2 pool after ResNets' stems): reduced from the row's stride phases with
        // contiguous, vectorised maxima instead of a fold per output.
        let phases = (max && !pairs && self.cfg.kernel[1] > 1).then(|| {
            let (kw, sw) = (self.cfg.kernel[1], self.cfg.stride[1]);
            ColPhases {
                kw,
                sw,
                pl: self.cfg.padding[1],
                len: ((g.ow - 1) * sw + kw).div_ceil(sw),
            }
        });
        // Planes per work item: a small map (a batch-1 digit CNN's 32×28×28) pays more in
        // thread hand-offs than its reductions cost, so it stays on fewer threads.
        let per_item = (1usize << 15).div_ceil((hw * self.cfg.kernel[0]).max(1));
        // On the kernels' pool (inside an inference pass, rayon's idle worker woken here
        // spun beside the pass's helper thread).
        let plane = |acc: &mut Vec<f32>, ph: &mut Vec<f32>, i: usize, o: &mut [f32]| {
            let xc = &x[i * hw..(i + 1) * hw];
            if max {
                let cols = match phases {
                    Some(c) => Cols::Phases(c, ph),
                    None => Cols::Spans(&cols, pairs),
                };
                return max_plane(xc, g.w, g.ow, &rows, cols, acc, o);
            }
            for (oy, orow) in o.chunks_exact_mut(g.ow).enumerate() {
                let (y0, y1) = rows[oy];
                let init = if max { f32::NEG_INFINITY } else { 0.0 };
                acc.fill(init);
                for yy in y0..y1 {
                    let row = &xc[yy * g.w..(yy + 1) * g.w];
                    if max {
                        acc.iter_mut().zip(row).for_each(|(a, &v)| *a = a.max(v));
                    } else {
                        acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                    }
                }
                for (ox, v) in orow.iter_mut().enumerate() {
                    let (x0, x1) = cols[ox];
                    let win = &acc[x0..x1];
                    *v = if max {
                        win.iter().fold(init, |m, &a| m.max(a))
                    } else {
                        let div = cfg.window(&g, oy, ox).4;
                        win.iter().sum::<f32>() / div
                    };
                }
            }
        };
        super::par::chunks_mut(&mut out[..], per_item * p.max(1), |t, o| {
            let mut acc = vec![0f32; g.w];
            let mut ph = vec![f32::NEG_INFINITY; phases.map_or(0, |c| c.sw * c.len)];
            for (j, op) in o.chunks_mut(p.max(1)).enumerate() {
                plane(&mut acc, &mut ph, t * per_item + j, op);
            }
        });
        let d = l.dims();
        Ok((CpuStorage::F32(out), Shape::from((d[0], d[1], g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = self.cfg.geo(x.dims())?;
        let (hw, p) = (g.h * g.w, g.oh * g.ow);
        let dx = with_f32(x, |xv| {
            with_f32(grad, |gv| {
                let mut dx = vec![0f32; g.nc * hw];
                let (rows, cols) = self.cfg.spans(&g);
                super::par::chunks_mut(&mut dx[..], hw, |i, d| {
                    let xc = &xv[i * hw..(i + 1) * hw];
                    let gc = &gv[i * p..(i + 1) * p];
                    for (oy, &(y0, y1)) in rows.iter().enumerate() {
                        let grow = &gc[oy * g.ow..(oy + 1) * g.ow];
                        for (ox, (&(x0, x1), &gy)) in cols.iter().zip(grow).enumerate() {
                            if self.max {
                                // The first maximum takes the gradient (PyTorch's choice).
                                let mut best = (f32::NEG_INFINITY, usize::MAX);
                                for yy in y0..y1 {
                                    let r = &xc[yy * g.w + x0..yy * g.w + x1];
                                    for (j, &v) in r.iter().enumerate() {
                                        if v > best.0 {
                                            best = (v, yy * g.w + x0 + j);
                                        }
                                    }
                                }
                                if best.1 != usize::MAX {
                                    d[best.1] += gy;
                                }
                            } else {
                                let v = gy / self.cfg.window(&g, oy, ox).4;
                                for yy in y0..y1 {
                                    d[yy * g.w + x0..yy * g.w + x1]
                                        .iter_mut()
                                        .for_each(|e| *e += v);
                                }
                            }
                        }
                    }
                });
                dx
            })
        })
        .and_then(|r| r)
        .map_err(ce)?;
        Ok(Some(tensor(dx, x.dims())?))
    }
}

multiversion! {
    /// Output rows `r0..` of a 2×2/2 max pool over input rows `w` wide (`o` holds whole
    /// output rows of `w / 2`): row `r` is the pairwise max of input rows `2r`, `2r + 1`.
    fn max2x2_rows(x: &[f32], w: usize, r0: usize, o: &mut [f32]) {
        let ow = w / 2;
        for (r, orow) in o.chunks_exact_mut(ow).enumerate() {
            let a = &x[2 * (r0 + r) * w..][..w];
            let b = &x[(2 * (r0 + r) + 1) * w..][..w];
            for ((v, pa), pb) in orow.iter_mut().zip(a.chunks_exact(2)).zip(b.chunks_exact(2)) {
                *v = pa[0].max(pa[1]).max(pb[0].max(pb[1]));
            }
        }
    }
}

/// [`max2x2_rows`] in explicit AVX-512: per 16 outputs, two vectors of each input row,
/// their maxima, then the even and odd lanes of the pair gathered by two permutes and
/// reduced. The compiled loop (scalar pairs, NaN-ignoring `f32::max`) ran the digit CNN's
/// 32×28×28 pool at batch 64 in 0.11 ms, onnxruntime's in 0.05. A NaN in a window gives
/// NaN or the window's other maximum (the hardware's `max`), not a fold that skips it.
///
/// # Safety
/// AVX-512F; `x` readable for input rows `2·r0 .. 2·(r0 + o.len() / (w / 2))`, `w` even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max2x2_rows_zmm(x: *const f32, w: usize, r0: usize, o: &mut [f32]) {
    use std::arch::x86_64::*;
    let ow = w / 2;
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (r, orow) in o.chunks_exact_mut(ow).enumerate() {
        // SAFETY (all): rows 2(r0 + r) and the next lie in `x` (the caller's contract);
        // each load or store covers columns of those rows only (masked at the end).
        unsafe {
            let a = x.add(2 * (r0 + r) * w);
            let b = a.add(w);
            let d = orow.as_mut_ptr();
            let mut j = 0;
            while j < ow {
                let n = (ow - j).min(16);
                let (m0, m1) = if n == 16 {
                    (u16::MAX, u16::MAX)
                } else {
                    let m = (1u32 << (2 * n)) - 1;
                    (m as u16, (m >> 16) as u16)
                };
                let lo = _mm512_max_ps(
                    super::simd::load16(a.add(2 * j), m0),
                    super::simd::load16(b.add(2 * j), m0),
                );
                let hi = _mm512_max_ps(
                    super::simd::load16(a.add(2 * j + 16), m1),
                    super::simd::load16(b.add(2 * j + 16), m1),
                );
                let v = _mm512_max_ps(
                    _mm512_permutex2var_ps(lo, evens, hi),
                    _mm512_permutex2var_ps(lo, odds, hi),
                );
                super::simd::store16(d.add(j), ((1u32 << n) - 1) as u16, v);
                j += n;
            }
        }
    }
}

/// The column windows of a max pool as the row's stride phases: the row (padded with
/// `-inf`) split into `sw` phases of `len` values, phase `r` holding columns `i·sw + r`;
/// output `ox` is the maximum over `kx` of phase `kx mod sw` at `ox + kx / sw`.
#[derive(Clone, Copy)]
struct ColPhases {
    kw: usize,
    sw: usize,
    pl: usize,
    len: usize,
}

/// How a max pool reduces each row's column windows.
enum Cols<'a> {
    /// Clipped spans per output; `true`: every span is the pair `(2·ox, 2·ox + 1)`.
    Spans(&'a [Span], bool),
    /// Stride phases in this scratch (`sw·len` values, the padding cells `-inf`).
    Phases(ColPhases, &'a mut [f32]),
}

multiversion! {
    /// One plane of a max pool, separably (see `PoolOp::cpu_fwd`), compiled per ISA: in
    /// baseline x86-64 code the pooling was 29 % of LeNet-5's inference at batch 64.
    /// Pairs (every column window `(2·ox, 2·ox + 1)`) are reduced as pairs (vector
    /// shuffles); other strided windows from the row's stride phases (ResNet-18's 3×3/2
    /// pool of 64×112×112 at batch 1 took 0.25 ms folding each window, onnxruntime's
    /// 0.08).
    fn max_plane(
        xc: &[f32],
        w: usize,
        ow: usize,
        rows: &[Span],
        cols: Cols,
        acc: &mut [f32],
        o: &mut [f32],
    ) {
        let mut cols = cols;
        for (oy, orow) in o.chunks_exact_mut(ow).enumerate() {
            let (y0, y1) = rows[oy];
            acc.fill(f32::NEG_INFINITY);
            for yy in y0..y1 {
                let row = &xc[yy * w..(yy + 1) * w];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a = a.max(v);
                }
            }
            match &mut cols {
                Cols::Spans(_, true) => {
                    for (v, p) in orow.iter_mut().zip(acc.chunks_exact(2)) {
                        *v = p[0].max(p[1]);
                    }
                }
                Cols::Spans(spans, false) => {
                    for (v, &(x0, x1)) in orow.iter_mut().zip(spans.iter()) {
                        *v = acc[x0..x1].iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
                    }
                }
                Cols::Phases(c, ph) => {
                    // Columns past the last window are dropped; the padding cells stay
                    // -inf from the scratch's start (only row cells are written).
                    if c.sw == 2 {
                        // Pairs of the row to the two phases (vector shuffles): column
                        // j goes to phase (j + pl) mod 2 at (j + pl) / 2.
                        let (e, od) = ph.split_at_mut(c.len);
                        let (first, second, at) = if c.pl % 2 == 0 {
                            (e, od, c.pl / 2)
                        } else {
                            (od, e, c.pl / 2)
                        };
                        let (a0, a1) = (at, at + c.pl % 2);
                        let n = (w / 2).min(c.len - a0).min(c.len - a1);
                        let (d0, d1) = (&mut first[a0..a0 + n], &mut second[a1..a1 + n]);
                        for ((x, y), p) in d0.iter_mut().zip(d1.iter_mut()).zip(acc.chunks_exact(2)) {
                            *x = p[0];
                            *y = p[1];
                        }
                        if w % 2 == 1 && a0 + n < c.len && 2 * n == w - 1 {
                            first[a0 + n] = acc[w - 1];
                        }
                        // (columns past the phases' length feed no window)
                    } else {
                    // Phase r, cell i: column i·sw + r of the padded row, acc[i·sw + r − pl].
                    for (r, dst) in ph.chunks_exact_mut(c.len).enumerate() {
                        let i0 = c.pl.saturating_sub(r).div_ceil(c.sw);
                        let i1 = (w + c.pl).saturating_sub(r).div_ceil(c.sw).min(c.len);
                        if i0 >= i1 {
                            continue;
                        }
                        let src = &acc[i0 * c.sw + r - c.pl..];
                        for (d, &v) in dst[i0..i1].iter_mut().zip(src.iter().step_by(c.sw)) {
                            *d = v;
                        }
                    }
                    }
                    orow.fill(f32::NEG_INFINITY);
                    for kx in 0..c.kw {
                        let src = &ph[(kx % c.sw) * c.len + kx / c.sw..][..ow];
                        for (v, &a) in orow.iter_mut().zip(src) {
                            *v = v.max(a);
                        }
                    }
                }
            }
        }
    }
}
