//! Convolution lowering: im2col (channel-major rows, for the forward GEMM), a pixel-major
//! im2col from a channels-last copy (for the weight-gradient GEMM without a transposed
//! operand, which measured several times slower), and col2im (for the input gradient).

/// Geometry of one convolution, all sizes resolved.
#[derive(Clone, Copy, Debug)]
pub struct Geo {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub sh: usize,
    pub sw: usize,
    pub pt: usize,
    pub pl: usize,
    pub dh: usize,
    pub dw: usize,
    pub groups: usize,
}

impl Geo {
    /// A 1×1 conv at stride 1 without padding, ungrouped: `n` images of `c` channels of
    /// `h × w` to `o` channels.
    pub fn pointwise(n: usize, c: usize, h: usize, w: usize, o: usize) -> Geo {
        Geo {
            n,
            c,
            h,
            w,
            o,
            kh: 1,
            kw: 1,
            oh: h,
            ow: w,
            sh: 1,
            sw: 1,
            pt: 0,
            pl: 0,
            dh: 1,
            dw: 1,
            groups: 1,
        }
    }

    /// Input channels per group.
    pub fn cg(&self) -> usize {
        self.c / self.groups
    }
    /// Output channels per group.
    pub fn og(&self) -> usize {
        self.o / self.groups
    }
    /// Reduction length of one group's GEMM.
    pub fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    /// Output pixels per image.
    pub fn p(&self) -> usize {
        self.oh * self.ow
    }
    /// True when the input itself is the im2col matrix (1x1, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.sh == 1
            && self.sw == 1
            && self.pt == 0
            && self.pl == 0
            && self.oh == self.h
            && self.ow == self.w
    }
    /// Range of output columns `ox` whose input column `ox*sw - pl + kx*dw` is inside.
    #[inline]
    fn valid_x(&self, kx: usize) -> (usize, usize) {
        valid_range(self.ow, self.sw, self.pl, kx * self.dw, self.w)
    }
    #[inline]
    fn valid_y(&self, ky: usize) -> (usize, usize) {
        valid_range(self.oh, self.sh, self.pt, ky * self.dh, self.h)
    }
}

/// Output indices `o` in `[lo, hi)` with `0 <= o*s - pad + off < len`.
#[inline]
fn valid_range(out: usize, s: usize, pad: usize, off: usize, len: usize) -> (usize, usize) {
    // o*s + off >= pad  =>  o >= ceil((pad - off) / s)
    let lo = if off >= pad {
        0
    } else {
        (pad - off).div_ceil(s)
    };
    // o*s + off - pad < len  =>  o < (len + pad - off) / s  (ceil)
    let hi = if len + pad <= off {
        0
    } else {
        (len + pad - off).div_ceil(s)
    };
    (lo.min(out), hi.min(out).max(lo.min(out)))
}

/// True for stride-1, undilated convolutions whose output has the input's size ("same"
/// padding): then every im2col row is the input plane shifted by one constant offset.
fn is_same_stride1(g: &Geo) -> bool {
    g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && g.oh == g.h && g.ow == g.w
}

/// im2col for "same" stride-1 convolutions: one bulk copy per row (the plane shifted by
/// `(ky - pt) * w + (kx - pl)`), then the few wrapped-around border columns are zeroed.
/// At 8x8 spatial size this replaces ~8 tiny copies per row, whose call overhead
/// dominated pruned (narrow) networks.
fn im2col_same(g: &Geo, x: &[f32], col: &mut [f32]) {
    let (h, w, p) = (g.h, g.w, g.p());
    let mut row = 0;
    for c in 0..g.cg() {
        let xc = &x[c * h * w..(c + 1) * h * w];
        for ky in 0..g.kh {
            let dy = ky as isize - g.pt as isize;
            for kx in 0..g.kw {
                let dx = kx as isize - g.pl as isize;
                let dst = &mut col[row * p..(row + 1) * p];
                // Valid output rows: 0 <= oy + dy < h.
                let ylo = (-dy).max(0) as usize;
                let yhi = ((h as isize - dy).min(h as isize)).max(ylo as isize) as usize;
                dst[..ylo * w].fill(0.0);
                dst[yhi * w..].fill(0.0);
                if yhi > ylo {
                    // dst[q] = src[q + s] for q in [ylo*w, yhi*w), clipped to the plane.
                    let s = dy * w as isize + dx;
                    let q0 = ((ylo * w) as isize).max(-s) as usize;
                    let q1 = ((yhi * w) as isize).min(h as isize * w as isize - s) as usize;
                    dst[ylo * w..q0].fill(0.0);
                    dst[q1..yhi * w].fill(0.0);
                    let s0 = (q0 as isize + s) as usize;
                    dst[q0..q1].copy_from_slice(&xc[s0..s0 + (q1 - q0)]);
                    // Columns that wrapped into the neighbouring row must be zero. One
                    // column (3x3 kernels) is a plain store: a memset call per row cost
                    // more than the copy on narrow layers.
                    if dx == 1 {
                        for oy in ylo..yhi {
                            dst[oy * w + w - 1] = 0.0;
                        }
                    } else if dx == -1 {
                        for oy in ylo..yhi {
                            dst[oy * w] = 0.0;
                        }
                    } else if dx > 0 {
                        for oy in ylo..yhi {
                            dst[oy * w + w - dx as usize..(oy + 1) * w].fill(0.0);
                        }
                    } else if dx < 0 {
                        for oy in ylo..yhi {
                            dst[oy * w..oy * w + (-dx) as usize].fill(0.0);
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// `col[K x P]` from one image group `x[cg, h, w]`.
pub fn im2col(g: &Geo, x: &[f32], col: &mut [f32]) {
    if is_same_stride1(g) && g.pl < g.w && g.pt < g.h {
        return im2col_same(g, x, col);
    }
    general_im2col(g, x, col)
}

/// im2col for any geometry, row by row.
fn general_im2col(g: &Geo, x: &[f32], col: &mut [f32]) {
    let p = g.p();
    let mut row = 0;
    for c in 0..g.cg() {
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (ylo, yhi) = g.valid_y(ky);
            for kx in 0..g.kw {
                let (xlo, xhi) = g.valid_x(kx);
                let dst = &mut col[row * p..(row + 1) * p];
                for oy in 0..g.oh {
                    let d = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                    if oy < ylo || oy >= yhi {
                        d.fill(0.0);
                        continue;
                    }
                    let iy = oy * g.sh + ky * g.dh - g.pt;
                    let src = &xc[iy * g.w..(iy + 1) * g.w];
                    d[..xlo].fill(0.0);
                    d[xhi..].fill(0.0);
                    if xhi == xlo {
                        // The tap falls outside the input for every column (a dilation
                        // wider than the padded input): the row is all padding.
                        continue;
                    }
                    if g.sw == 1 {
                        let ix0 = xlo + kx * g.dw - g.pl;
                        d[xlo..xhi].copy_from_slice(&src[ix0..ix0 + (xhi - xlo)]);
                    } else {
                        for ox in xlo..xhi {
                            d[ox] = src[ox * g.sw + kx * g.dw - g.pl];
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Copies a short slice in fixed 8-wide pieces, which compile to inline vector moves
/// (a `memcpy` call per 16-64 byte tap cost more than the copy itself).
#[inline(always)]
fn copy_small(dst: &mut [f32], src: &[f32]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (a, b) in (&mut d).zip(&mut s) {
        let b: &[f32; 8] = b.try_into().unwrap();
        let a: &mut [f32; 8] = a.try_into().unwrap();
        *a = *b;
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a = *b;
    }
}

/// Scatter-adds `col[K x P]` into one image group `dx[cg, h, w]` (which is not cleared).
/// `col` is scratch: the "same" stride-1 path zeroes its wrapped-around border columns.
pub fn col2im(g: &Geo, col: &mut [f32], dx: &mut [f32]) {
    if is_same_stride1(g) && g.pl < g.w && g.pt < g.h {
        return col2im_same(g, col, dx);
    }
    general_col2im(g, col, dx)
}

/// col2im for "same" stride-1 convolutions, the mirror of [`im2col_same`]: each row is
/// the plane shifted by one constant offset, so once the columns that would wrap into
/// the neighbouring image row are zeroed, the row adds to the plane in one contiguous
/// (vectorised) pass. Row by row this was 12 % of a ResNet-20 training step, its 8- to
/// 32-wide rows paying the loop overhead.
fn col2im_same(g: &Geo, col: &mut [f32], dx: &mut [f32]) {
    let (h, w, p) = (g.h, g.w, g.p());
    let mut row = 0;
    for c in 0..g.cg() {
        let dc = &mut dx[c * h * w..(c + 1) * h * w];
        for ky in 0..g.kh {
            let dy = ky as isize - g.pt as isize;
            for kx in 0..g.kw {
                let dxo = kx as isize - g.pl as isize;
                let src = &mut col[row * p..(row + 1) * p];
                row += 1;
                let ylo = (-dy).max(0) as usize;
                let yhi = ((h as isize - dy).min(h as isize)).max(ylo as isize) as usize;
                if yhi <= ylo {
                    continue;
                }
                if dxo > 0 {
                    for oy in ylo..yhi {
                        src[oy * w + w - dxo as usize..(oy + 1) * w].fill(0.0);
                    }
                } else if dxo < 0 {
                    for oy in ylo..yhi {
                        src[oy * w..oy * w + (-dxo) as usize].fill(0.0);
                    }
                }
                // dc[q + s] += src[q] for q in [ylo*w, yhi*w), clipped to the plane.
                let s = dy * w as isize + dxo;
                let q0 = ((ylo * w) as isize).max(-s) as usize;
                let q1 = ((yhi * w) as isize).min((h * w) as isize - s) as usize;
                if q1 > q0 {
                    let d0 = (q0 as isize + s) as usize;
                    dc[d0..d0 + (q1 - q0)]
                        .iter_mut()
                        .zip(&src[q0..q1])
                        .for_each(|(a, &b)| *a += b);
                }
            }
        }
    }
}

/// col2im for any geometry, row by row.
fn general_col2im(g: &Geo, col: &[f32], dx: &mut [f32]) {
    let p = g.p();
    let mut row = 0;
    for c in 0..g.cg() {
        let dc = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (ylo, yhi) = g.valid_y(ky);
            for kx in 0..g.kw {
                let (xlo, xhi) = g.valid_x(kx);
                let src = &col[row * p..(row + 1) * p];
                // A tap outside the input for every column contributes nothing.
                let ys = if xhi > xlo { ylo..yhi } else { 0..0 };
                for oy in ys {
                    let iy = oy * g.sh + ky * g.dh - g.pt;
                    let d = &mut dc[iy * g.w..(iy + 1) * g.w];
                    let s = &src[oy * g.ow..(oy + 1) * g.ow];
                    if g.sw == 1 {
                        let ix0 = xlo + kx * g.dw - g.pl;
                        for (a, b) in d[ix0..ix0 + (xhi - xlo)].iter_mut().zip(&s[xlo..xhi]) {
                            *a += *b;
                        }
                    } else {
                        for ox in xlo..xhi {
                            d[ox * g.sw + kx * g.dw - g.pl] += s[ox];
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Channels-last copy of one image group: `x[cg, h*w] -> xt[h*w, cg]`.
pub fn to_channels_last(g: &Geo, x: &[f32], xt: &mut Vec<f32>) {
    let (cg, hw) = (g.cg(), g.h * g.w);
    xt.resize(hw * cg, 0.0);
    // Blocked transpose: 16 pixels at a time keep both sides in cache.
    for p0 in (0..hw).step_by(16) {
        let p1 = (p0 + 16).min(hw);
        for c in 0..cg {
            let src = &x[c * hw..(c + 1) * hw];
            for p in p0..p1 {
                xt[p * cg + c] = src[p];
            }
        }
    }
}

/// Pixel-major im2col from a channels-last image: `colT[P x K]` with K ordered
/// `(ky, kx, c)`, so each tap is one contiguous copy of `cg` values.
pub fn im2col_t_cl(g: &Geo, xt: &[f32], col_t: &mut [f32]) {
    let (cg, k) = (g.cg(), g.k());
    // Bounds are resolved once per (row, tap), not per pixel and tap: a tap's valid
    // columns are one range, so the inner loop is a run of plain `cg`-long copies.
    let xr: Vec<(usize, usize)> = (0..g.kw).map(|kx| g.valid_x(kx)).collect();
    for oy in 0..g.oh {
        let out_row = &mut col_t[oy * g.ow * k..(oy + 1) * g.ow * k];
        for ky in 0..g.kh {
            let (ylo, yhi) = g.valid_y(ky);
            let inside = oy >= ylo && oy < yhi;
            let iy = if inside {
                oy * g.sh + ky * g.dh - g.pt
            } else {
                0
            };
            for (kx, &(xlo, xhi)) in xr.iter().enumerate() {
                let tap = (ky * g.kw + kx) * cg;
                let (lo, hi) = if inside { (xlo, xhi) } else { (g.ow, g.ow) };
                for ox in (0..lo.min(g.ow)).chain(hi.max(lo)..g.ow) {
                    out_row[ox * k + tap..ox * k + tap + cg].fill(0.0);
                }
                for ox in lo..hi {
                    let p = iy * g.w + ox * g.sw + kx * g.dw - g.pl;
                    copy_small(
                        &mut out_row[ox * k + tap..ox * k + tap + cg],
                        &xt[p * cg..(p + 1) * cg],
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_brute_force() {
        for out in 1..6 {
            for s in 1..4 {
                for pad in 0..3 {
                    for off in 0..4 {
                        for len in 1..7 {
                            let (lo, hi) = valid_range(out, s, pad, off, len);
                            for o in 0..out {
                                let i = (o * s + off) as i64 - pad as i64;
                                let inside = i >= 0 && i < len as i64;
                                assert_eq!(
                                    inside,
                                    o >= lo && o < hi,
                                    "{out} {s} {pad} {off} {len} {o}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn same_padding_fast_path_matches_the_general_im2col() {
        for (h, w, k, pad) in [
            (5, 7, 3, 1),
            (8, 8, 3, 1),
            (4, 4, 5, 2),
            (6, 3, 1, 0),
            (3, 3, 3, 1),
        ] {
            let g = Geo {
                n: 1,
                c: 2,
                h,
                w,
                o: 1,
                kh: k,
                kw: k,
                oh: h,
                ow: w,
                sh: 1,
                sw: 1,
                pt: pad,
                pl: pad,
                dh: 1,
                dw: 1,
                groups: 1,
            };
            let x: Vec<f32> = (0..2 * h * w).map(|i| i as f32 + 1.0).collect();
            let mut a = vec![-1f32; g.k() * g.p()];
            let mut b = vec![-2f32; g.k() * g.p()];
            im2col_same(&g, &x, &mut a);
            general_im2col(&g, &x, &mut b);
            assert_eq!(a, b, "{h}x{w} k{k} p{pad}");
            // And the scatter-add back: the same-padding path equals the general one.
            let col: Vec<f32> = (0..g.k() * g.p()).map(|i| (i % 13) as f32 - 6.0).collect();
            let (mut da, mut db) = (vec![0.5f32; 2 * h * w], vec![0.5f32; 2 * h * w]);
            col2im_same(&g, &mut col.clone(), &mut da);
            general_col2im(&g, &col, &mut db);
            assert_eq!(da, db, "col2im {h}x{w} k{k} p{pad}");
        }
    }

    #[test]
    fn pixel_major_im2col_is_the_permuted_transpose_of_im2col() {
        // (h, w, k, stride, [pt, pl], dilation): stride 2, asymmetric and no padding,
        // dilation, a kernel wider than the padded row.
        for &(h, w, k, st, [pt, pl], d) in &[
            (5, 7, 3, 1, [1, 1], 1),
            (9, 6, 3, 2, [0, 1], 1),
            (7, 7, 3, 1, [2, 2], 2),
            (4, 3, 5, 1, [2, 2], 1),
            (6, 8, 1, 2, [0, 0], 1),
        ] {
            let span = d * (k - 1) + 1;
            let (oh, ow) = ((h + 2 * pt - span) / st + 1, (w + 2 * pl - span) / st + 1);
            let g = Geo {
                n: 1,
                c: 3,
                h,
                w,
                o: 1,
                kh: k,
                kw: k,
                oh,
                ow,
                sh: st,
                sw: st,
                pt,
                pl,
                dh: d,
                dw: d,
                groups: 1,
            };
            let x: Vec<f32> = (0..3 * h * w).map(|i| i as f32 + 1.0).collect();
            let mut col = vec![-1f32; g.k() * g.p()];
            general_im2col(&g, &x, &mut col);
            let mut xt = Vec::new();
            to_channels_last(&g, &x, &mut xt);
            let mut col_t = vec![-2f32; g.k() * g.p()];
            im2col_t_cl(&g, &xt, &mut col_t);
            for c in 0..3 {
                for t in 0..k * k {
                    for q in 0..g.p() {
                        assert_eq!(
                            col_t[q * g.k() + t * 3 + c],
                            col[(c * k * k + t) * g.p() + q],
                            "{h}x{w} k{k} s{st} pad {pt},{pl} d{d}: c{c} tap{t} px{q}"
                        );
                    }
                }
            }
        }
    }
}
