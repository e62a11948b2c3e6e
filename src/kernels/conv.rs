//! Conv2d as a candle custom op: im2col + GEMM forward, GEMM + col2im input gradient,
//! pixel-major im2col + GEMM weight gradient; depthwise convolutions use direct loops
//! (a GEMM with one output row per group would waste the GEMM).
//!
//! Parallel over images (each GEMM single-threaded) when the batch has more than one
//! image; a lone image lets the GEMM use every thread. Reductions across images use a
//! fixed chunking, so results are deterministic for a given thread count.

use super::act;
use super::cpu::{ce, reduction_chunks, slice, tensor, with_f32, with_scratch};
use super::gemm::{sgemm, Mat};
use super::im2col::{col2im, im2col, im2col_t_cl, to_channels_last, Geo};
use super::{conv_batched, conv_chanvec, conv_tiles, depthwise, direct, dw_chanvec, panel};
use crate::graph::ops::ActivationKind;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Stride, padding `[top, left, bottom, right]`, dilation and groups of a convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvCfg {
    pub stride: [usize; 2],
    pub padding: [usize; 4],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl ConvCfg {
    /// Resolves the geometry from input `[N, C, H, W]` and weight `[O, C/g, kh, kw]` dims.
    pub fn geo(&self, x: &[usize], w: &[usize]) -> candle_core::Result<Geo> {
        if x.len() != 4 || w.len() != 4 {
            candle_core::bail!("conv2d: expected 4-d input and weight, got {x:?} and {w:?}");
        }
        let g = self.groups.max(1);
        if x[1] != w[1] * g || !w[0].is_multiple_of(g) {
            candle_core::bail!("conv2d: input {x:?} does not match weight {w:?} with groups {g}");
        }
        let out = |len: usize, k: usize, s: usize, pa: usize, pb: usize, d: usize| {
            let span = d * (k - 1) + 1;
            (len + pa + pb)
                .checked_sub(span)
                .map(|v| v / s + 1)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("conv2d: kernel {k} larger than input {len}"))
                })
        };
        Ok(Geo {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: w[0],
            kh: w[2],
            kw: w[3],
            oh: out(
                x[2],
                w[2],
                self.stride[0],
                self.padding[0],
                self.padding[2],
                self.dilation[0],
            )?,
            ow: out(
                x[3],
                w[3],
                self.stride[1],
                self.padding[1],
                self.padding[3],
                self.dilation[1],
            )?,
            sh: self.stride[0],
            sw: self.stride[1],
            pt: self.padding[0],
            pl: self.padding[1],
            dh: self.dilation[0],
            dw: self.dilation[1],
            groups: g,
        })
    }
}

/// `y = conv2d(x, w)` (no bias; the executor adds it).
pub struct Conv2dOp {
    pub cfg: ConvCfg,
}

fn is_depthwise(g: &Geo) -> bool {
    g.groups > 1 && g.cg() == 1 && g.og() == 1
}

/// A per-output-channel bias and optional activation applied to the conv output while it
/// is still in cache (inference with batch norm folded into the weights).
#[derive(Clone, Debug)]
pub struct Epilogue {
    pub bias: Vec<f32>,
    pub act: Option<ActivationKind>,
}

impl Epilogue {
    /// Applies to one image's output `[O, P]`, adding `res` (the same shape, before the
    /// activation) if given.
    fn apply(&self, out: &mut [f32], p: usize, res: Option<&[f32]>) {
        self.apply_from(out, p, 0, res)
    }

    /// Applies to output channels `o0..` of one image (`out` and `res` start at `o0`).
    fn apply_from(&self, out: &mut [f32], p: usize, o0: usize, res: Option<&[f32]>) {
        for (o, (row, &b)) in out.chunks_exact_mut(p).zip(&self.bias[o0..]).enumerate() {
            let r = res.map(|r| &r[o * p..(o + 1) * p]);
            act::bias_act(row, b, r, self.act);
        }
    }
}

/// Forward on raw slices; `out` is `[N, O, OH, OW]`.
pub fn conv_forward(g: &Geo, x: &[f32], w: &[f32], out: &mut [f32]) {
    conv_forward_epi(g, x, w, out, None, None)
}

/// Forward with an optional epilogue and residual (`[N, O, OH, OW]`, added before ReLU).
pub fn conv_forward_epi(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    epi: Option<&Epilogue>,
    res: Option<&[f32]>,
) {
    conv_forward_packed(g, x, w, None, out, epi, res)
}

/// A conv's weights packed once (by an eval plan) for the kernel that takes its geometry.
#[derive(Debug)]
pub enum PackedWeight {
    /// [`conv_chanvec::pack`]: the channel-vector tiles.
    ChanVec(Vec<f32>),
    /// [`panel::pack_rows`]: the 1×1 conv's register-tile panels.
    Panels(Vec<f32>),
    /// [`dw_chanvec::pack`]: a depthwise conv's weight vectors of `lanes` channels (the
    /// ISA's: a level forced after packing must not read another layout).
    Depthwise { lanes: usize, w: Vec<f32> },
    /// [`panel::pack_cols`]: a 1×1 conv on [`panel::conv_rows`] (positions as rows).
    Columns(Vec<f32>),
}

impl PackedWeight {
    /// Whether the kernel that takes `g` runs on packed weights.
    pub fn wanted(g: &Geo) -> bool {
        let g = &subsampled(g).unwrap_or(*g);
        pointwise_rows(g)
            || pointwise_panels(g)
            || conv_chanvec::applies_packed(g)
            || (is_depthwise(g) && dw_chanvec::applies(g))
    }

    /// The packed weights of `w` for the kernel that takes `g`, if that kernel uses any.
    pub fn for_geo(g: &Geo, w: &[f32]) -> Option<PackedWeight> {
        let g = &subsampled(g).unwrap_or(*g);
        if pointwise_rows(g) {
            Some(PackedWeight::Columns(panel::pack_cols(w, g.o, g.c)))
        } else if pointwise_panels(g) {
            Some(PackedWeight::Panels(panel::pack_rows(w, g.o, g.c)))
        } else if conv_chanvec::applies_packed(g) {
            Some(PackedWeight::ChanVec(conv_chanvec::pack(g, w)))
        } else if is_depthwise(g) && dw_chanvec::applies(g) {
            Some(PackedWeight::Depthwise {
                lanes: dw_chanvec::lanes(),
                w: dw_chanvec::pack(g, w),
            })
        } else {
            None
        }
    }

    /// Whether these are the packed weights of `g`'s kernel.
    fn fits(&self, g: &Geo) -> bool {
        match self {
            PackedWeight::ChanVec(v) => v.len() == conv_chanvec::packed_len(g),
            PackedWeight::Panels(v) => v.len() == panel::rows_len(g.o, g.c),
            PackedWeight::Depthwise { lanes, w } => {
                *lanes == dw_chanvec::lanes() && w.len() == dw_chanvec::packed_len(g, *lanes)
            }
            PackedWeight::Columns(v) => v.len() == panel::cols_len(g.o, g.c),
        }
    }
}

/// A strided 1×1 conv without padding (ResNets' projection shortcuts) as the stride-1
/// conv of its subsampled input: the geometry of that conv. The subsample is a copy of
/// `1/(sh·sw)` of the input; im2col + GEMM took ResNet-18's 64→128 at 56×56 stride 2, at
/// batch 1, 0.085–0.095 ms where onnxruntime took 0.04–0.05.
fn subsampled(g: &Geo) -> Option<Geo> {
    let strided = g.kh == 1 && g.kw == 1 && g.sh * g.sw > 1;
    (strided && g.pt == 0 && g.pl == 0 && g.groups == 1 && g.oh > 0 && g.ow > 0).then_some(Geo {
        h: g.oh,
        w: g.ow,
        sh: 1,
        sw: 1,
        ..*g
    })
}

/// `x` (`[N, C, H, W]`) at rows `oy·sh` and columns `ox·sw` of `g`: the input of
/// [`subsampled`]`(g)`.
fn subsample(g: &Geo, x: &[f32]) -> Vec<f32> {
    // SAFETY: `subsample_planes` writes every plane's every value.
    let mut xs = unsafe { super::cpu::unfilled(g.n * g.c * g.oh * g.ow) };
    super::cpu::subsample_planes(x, (g.h, g.w), (g.oh, g.ow), (g.sh, g.sw), &mut xs);
    xs
}

/// Whether a 1×1 conv runs with its positions as rows ([`panel::conv_rows`]): where
/// [`panel::conv`], with the batch's positions in the lanes, would leave more than an
/// eighth of them idle (a 7×7 or 14×14 map at batch 1 a quarter, a 4×4 map three
/// quarters), over at least 128 input channels (a shorter accumulation does not pay for
/// the transpose into the planes). Whole models on an AMD EPYC at batch 1, one thread:
/// MobileNetV2 1.04 → 0.99 ms, EfficientNet-B0 7.09 → 6.87, ResNet-50 37.9 → 37.3 (two
/// threads 21.8–22.1 → 20.9–21.4), MobileNetV3-small unchanged (BENCHMARKS §24).
fn pointwise_rows(g: &Geo) -> bool {
    let cols = g.n * g.p();
    let lanes = cols.div_ceil(panel::NR) * panel::NR;
    g.is_pointwise()
        && g.groups == 1
        && g.p() >= 2
        && cols * 8 < lanes * 7
        && g.c >= 128
        && panel::enabled()
        && !rows_off()
}

/// `LOPPER_NO_ROWS` set (to anything but `0`) keeps [`pointwise_rows`] off for A/B runs;
/// read once.
fn rows_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("LOPPER_NO_ROWS").is_ok_and(|v| v != "0"))
}

/// Whether a 1×1 conv runs on the register-tile panels ([`panel::conv`]): ungrouped, at
/// stride 1 without padding, over maps of more than one position (1×1 maps are linear
/// layers), by rule where they beat the GEMM crate's per-image products: contractions
/// (`C ≥ O`), and expansions over small maps. Per layer on an AMD EPYC
/// (`examples/conv_paths.rs pointwise`): 2048→512 at 7×7, batch 8, 1.93 against 2.32
/// ms; 960→320 at 4×4, batch 64, 1.35 against 1.66; 1152→192 at 7×7, batch 8, 0.46
/// against 0.58; 96→576 at 7×7 0.15 against 0.18; but 16→96 at 32×32, batch 64, 0.84
/// against 0.63, and 112→672 at 14×14 0.57 against 0.54 (a short accumulation per tile:
/// the GEMM crate's tiles finish faster).
fn pointwise_panels(g: &Geo) -> bool {
    g.is_pointwise()
        && g.groups == 1
        && g.p() >= 2
        && (g.c >= g.o || g.p() < 128 || std::env::var_os("LOPPER_PW_ALL").is_some())
        && panel::enabled()
}

/// [`conv_forward_epi`] with the weights also given packed ([`PackedWeight::for_geo`],
/// kept by an eval plan), used by the kernel they were packed for.
pub fn conv_forward_packed(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    packed: Option<&PackedWeight>,
    out: &mut [f32],
    epi: Option<&Epilogue>,
    res: Option<&[f32]>,
) {
    if let Some(s) = subsampled(g) {
        let xs = subsample(g, x);
        return conv_forward_packed(&s, &xs, w, packed, out, epi, res);
    }
    let img_out = g.o * g.p();
    let res_n = |n: usize| res.map(|r| &r[n * img_out..(n + 1) * img_out]);
    if g.is_pointwise() && g.p() == 1 && g.groups == 1 {
        // A 1×1 conv over 1×1 maps (squeeze-excitation) is a linear layer on `[N, C]`.
        linear_1x1(g, x, w, out, epi, res);
        return;
    }
    // 1×1 convs on the register-tile panels, positions as rows or in the lanes.
    let rows = pointwise_rows(g);
    if rows || pointwise_panels(g) {
        let own;
        let wp = match packed {
            Some(PackedWeight::Columns(p)) if rows => &p[..],
            Some(PackedWeight::Panels(p)) if !rows => &p[..],
            _ => {
                own = if rows {
                    panel::pack_cols(w, g.o, g.c)
                } else {
                    panel::pack_rows(w, g.o, g.c)
                };
                &own[..]
            }
        };
        let a = panel::Pointwise {
            o: g.o,
            c: g.c,
            x,
            n: g.n,
            p: g.p(),
            bias: epi.map(|e| &e.bias[..]),
            act: epi.and_then(|e| e.act),
            res: epi.and(res),
        };
        let run = if rows { panel::conv_rows } else { panel::conv };
        run(wp, &a, out);
        return;
    }
    let dw_packed = match packed {
        Some(p @ PackedWeight::Depthwise { w, .. }) if p.fits(g) => Some(&w[..]),
        _ => None,
    };
    let packed = match packed {
        Some(PackedWeight::ChanVec(p)) => Some(&p[..]),
        _ => None,
    };
    // Direct kernels over padded planes: depthwise convs, and dense convs with few input
    // channels (stems); the rest is im2col + GEMM.
    let depthwise = is_depthwise(g);
    if depthwise || direct::applies(g) {
        let run = |out: &mut [f32], e: Option<(&[f32], Option<ActivationKind>)>| {
            if depthwise {
                depthwise::forward_epi(g, x, w, dw_packed, out, e)
            } else {
                direct::forward_epi(g, x, w, out, e)
            }
        };
        match (epi, res) {
            (Some(e), None) => run(out, Some((&e.bias, e.act))),
            (Some(e), Some(_)) => {
                run(out, None);
                out.chunks_exact_mut(img_out)
                    .enumerate()
                    .for_each(|(n, o)| e.apply(o, g.p(), res_n(n)));
            }
            (None, _) => run(out, None),
        }
        return;
    }
    let chanvec = match packed {
        Some(_) => conv_chanvec::applies_packed(g),
        None => conv_chanvec::applies(g),
    };
    if chanvec {
        let e = epi.map(|e| (&e.bias[..], e.act));
        conv_chanvec::forward_epi(g, x, w, packed, out, e, res);
        return;
    }
    if conv_tiles::applies(g) {
        conv_tiles::forward_epi(g, x, w, out, epi.map(|e| (&e.bias[..], e.act)), res);
        return;
    }
    if let Some(b) = conv_batched::batch(g) {
        // Small maps: several images per GEMM, the epilogue per finished batch.
        let after = |n0: usize, imgs: &mut [f32]| {
            if let Some(e) = epi {
                for (i, o) in imgs.chunks_exact_mut(img_out).enumerate() {
                    e.apply(o, g.p(), res_n(n0 + i));
                }
            }
        };
        conv_batched::forward(g, x, w, out, b, &after);
        return;
    }
    let (k, p, og, cg) = (g.k(), g.p(), g.og(), g.cg());
    let img_in = g.c * g.h * g.w;
    let img_out = g.o * p;
    let one = |buf: &mut Vec<f32>, n: usize, out_n: &mut [f32], par: bool| {
        let xn = &x[n * img_in..(n + 1) * img_in];
        if par && g.groups == 1 && conv_tiles::thin_applies(p) {
            // A lone image with few positions: stream the weights once (no GEMM packing).
            let need = k * p + conv_tiles::THIN_SLACK;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            if g.is_pointwise() {
                buf[..k * p].copy_from_slice(xn);
            } else {
                im2col(g, xn, &mut buf[..k * p]);
            }
            let e = epi.map(|e| (&e.bias[..], e.act));
            conv_tiles::thin((g.o, k, p), &buf[..need], w, out_n, e, res_n(n));
            return;
        }
        for gi in 0..g.groups {
            let xg = &xn[gi * cg * g.h * g.w..(gi + 1) * cg * g.h * g.w];
            let col: &[f32] = if g.is_pointwise() {
                xg
            } else {
                if buf.len() < k * p {
                    buf.resize(k * p, 0.0);
                }
                im2col(g, xg, &mut buf[..k * p]);
                &buf[..k * p]
            };
            let wg = &w[gi * og * k..(gi + 1) * og * k];
            let dst = &mut out_n[gi * og * p..(gi + 1) * og * p];
            // The epilogue on each block of rows as its GEMM finishes (in cache, and on
            // every thread at batch 1: after the whole image it ran on one, 14 % of
            // EfficientNet-B0's batch-1 time).
            let after = |r0: usize, rows: &mut [f32]| {
                if let Some(e) = epi {
                    let o0 = gi * og + r0;
                    e.apply_from(rows, p, o0, res_n(n).map(|r| &r[o0 * p..]));
                }
            };
            gemm_rows(og, p, k, dst, wg, col, par, &after);
        }
    };
    if g.n == 1 || rayon::current_num_threads() == 1 {
        with_scratch(|buf| {
            for (n, out_n) in out.chunks_mut(img_out).enumerate() {
                one(buf, n, out_n, true);
            }
        });
    } else {
        super::par::chunks_mut(&mut out[..], img_out, |n, out_n| {
            with_scratch(|buf| one(buf, n, out_n, false))
        });
    }
}

/// A 1×1 conv over 1×1 maps as the linear layer it is (`[N, C, 1, 1]` is `[N, C]`):
/// the weight streamed once by the GEMV kernel at small batch, where the position tiles
/// would use one lane in sixteen (squeeze-excitation was ~10 % of MobileNetV3's batch-1
/// time). A residual is added before the activation.
fn linear_1x1(
    g: &Geo,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    epi: Option<&Epilogue>,
    res: Option<&[f32]>,
) {
    let dims = (g.n, g.c, g.o);
    let zeros;
    let bias = match epi {
        Some(e) => &e.bias[..],
        None => {
            zeros = vec![0f32; g.o];
            &zeros
        }
    };
    let act = epi.and_then(|e| e.act);
    let y = &mut out[..g.n * g.o];
    super::linear::forward(x, w, bias, dims, if res.is_some() { None } else { act }, y);
    if let Some(r) = res {
        for (o, &rv) in y.iter_mut().zip(r) {
            *o += rv;
        }
        if let Some(k) = act {
            act::apply(k, y);
        }
    }
}

/// `dst[m × p] = w[m × k] · col[k × p]`. With `par` (a lone image), the output rows are
/// split into one block per thread, each a single-threaded GEMM over the shared `col`:
/// measured faster than the GEMM's own threading on 2 cores (ResNet-18 at batch 1), which
/// synchronises inside every product. Too few rows to split: the GEMM threads itself.
/// `after(r0, rows)` runs on each finished block of rows (`r0` its first row), on the
/// thread that computed it.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    m: usize,
    p: usize,
    k: usize,
    dst: &mut [f32],
    w: &[f32],
    col: &[f32],
    par: bool,
    after: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let threads = rayon::current_num_threads();
    let Some(rows) = super::gemm::row_blocks(m).filter(|_| par) else {
        sgemm(m, p, k, dst, Mat::rm(w, k), Mat::rm(col, p), false, par);
        // Shared out only when there is enough of it to pay for the fork and join.
        if par && threads > 1 && m * p >= 1 << 15 {
            let per = m.div_ceil(threads);
            super::par::chunks_mut(&mut dst[..m * p], per * p, |bi, d| after(bi * per, d));
        } else {
            after(0, &mut dst[..m * p]);
        }
        return;
    };
    super::par::chunks_mut(&mut dst[..], rows * p, |bi, d| {
        let r0 = bi * rows;
        let mb = d.len() / p;
        sgemm(
            mb,
            p,
            k,
            d,
            Mat::rm(&w[r0 * k..(r0 + mb) * k], k),
            Mat::rm(col, p),
            false,
            false,
        );
        after(r0, d);
    });
}

/// Input gradient `[N, C, H, W]` from the output gradient.
pub fn conv_backward_input(g: &Geo, dy: &[f32], w: &[f32]) -> Vec<f32> {
    if let Some(t) = conv_tiles::transposed(g) {
        // Stride 1: the input gradient is a conv of dy with the flipped, transposed
        // filters, on the register tiles (no GEMM into columns and col2im back).
        let wt = conv_tiles::flip_transpose(g, w);
        // SAFETY: the tile forward stores every output.
        let mut dx = unsafe { super::cpu::unfilled(g.n * g.c * g.h * g.w) };
        conv_tiles::forward_epi(&t, dy, &wt, &mut dx, None, None);
        return dx;
    }
    if let Some(t) = conv_tiles::transposed_geo(g).filter(conv_chanvec::applies) {
        // The same on the channel-vector tiles (small maps), packed in one pass.
        let wp = conv_chanvec::pack_flipped(g, w);
        // SAFETY: the channel-vector forward stores every output.
        let mut dx = unsafe { super::cpu::unfilled(g.n * g.c * g.h * g.w) };
        conv_chanvec::forward_epi(&t, dy, &[], Some(&wp), &mut dx, None, None);
        return dx;
    }
    if let Some(b) = conv_batched::batch(g) {
        return conv_batched::backward_input(g, dy, w, b);
    }
    let mut dx = vec![0f32; g.n * g.c * g.h * g.w];
    if is_depthwise(g) {
        depthwise::backward_input(g, dy, w, &mut dx);
        return dx;
    }
    let (k, p, og, cg) = (g.k(), g.p(), g.og(), g.cg());
    let img_in = g.c * g.h * g.w;
    let img_out = g.o * p;
    let one = |buf: &mut Vec<f32>, n: usize, dx_n: &mut [f32], par: bool| {
        let dyn_ = &dy[n * img_out..(n + 1) * img_out];
        for gi in 0..g.groups {
            let wg = &w[gi * og * k..(gi + 1) * og * k];
            let dyg = &dyn_[gi * og * p..(gi + 1) * og * p];
            let dxg = &mut dx_n[gi * cg * g.h * g.w..(gi + 1) * cg * g.h * g.w];
            if g.is_pointwise() {
                // dx = W^T dy directly into the image.
                sgemm(k, p, og, dxg, Mat::rm_t(wg, k), Mat::rm(dyg, p), false, par);
            } else {
                if buf.len() < k * p {
                    buf.resize(k * p, 0.0);
                }
                let col = &mut buf[..k * p];
                sgemm(k, p, og, col, Mat::rm_t(wg, k), Mat::rm(dyg, p), false, par);
                col2im(g, col, dxg);
            }
        }
    };
    if g.n == 1 || rayon::current_num_threads() == 1 {
        with_scratch(|buf| {
            for (n, dx_n) in dx.chunks_mut(img_in).enumerate() {
                one(buf, n, dx_n, true);
            }
        });
    } else {
        super::par::chunks_mut(&mut dx[..], img_in, |n, dx_n| {
            with_scratch(|buf| one(buf, n, dx_n, false))
        });
    }
    dx
}

/// Weight gradient `[O, C/g, kh, kw]`: sum over images of `dY_n · colT_n`.
pub fn conv_backward_weight(g: &Geo, x: &[f32], dy: &[f32]) -> Vec<f32> {
    if is_depthwise(g) {
        return depthwise::backward_weight(g, x, dy);
    }
    if conv_chanvec::weight_grad_applies(g) {
        return conv_chanvec::backward_weight(g, x, dy);
    }
    if let Some(b) = conv_batched::batch(g) {
        return conv_batched::backward_weight(g, x, dy, b);
    }
    let (k, p, og, cg) = (g.k(), g.p(), g.og(), g.cg());
    let img_in = g.c * g.h * g.w;
    let img_out = g.o * p;
    let wlen = g.o * k;
    let chunks = reduction_chunks(g.n);
    let per = g.n.div_ceil(chunks);
    let par_gemm = chunks == 1;
    let khw = g.kh * g.kw;
    // Below this many input channels per group the plain im2col path wins (measured on
    // LeNet-5's and the digit CNN's first convs).
    let narrow = cg < 8;
    // Partial sums per chunk of images, in (ky, kx, c) order for the non-pointwise case.
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|ci| {
            let mut dw = vec![0f32; wlen];
            let mut col_t = vec![0f32; if g.is_pointwise() || narrow { 0 } else { p * k }];
            let mut col = vec![0f32; if narrow { p * k } else { 0 }];
            let mut xt = Vec::new();
            for n in ci * per..((ci + 1) * per).min(g.n) {
                let xn = &x[n * img_in..(n + 1) * img_in];
                let dyn_ = &dy[n * img_out..(n + 1) * img_out];
                for gi in 0..g.groups {
                    let xg = &xn[gi * cg * g.h * g.w..(gi + 1) * cg * g.h * g.w];
                    let dyg = &dyn_[gi * og * p..(gi + 1) * og * p];
                    let dwg = &mut dw[gi * og * k..(gi + 1) * og * k];
                    if narrow && !g.is_pointwise() {
                        // Few input channels (a stem conv): the pixel-major layout would
                        // copy `cg` values per tap; the plain im2col read transposed
                        // is cheaper, and already in (c, ky, kx) order.
                        im2col(g, xg, &mut col);
                        sgemm(
                            og,
                            k,
                            p,
                            dwg,
                            Mat::rm(dyg, p),
                            Mat::rm_t(&col, p),
                            true,
                            par_gemm,
                        );
                    } else if g.is_pointwise() {
                        // colT is x^T: a strided view, no copy.
                        sgemm(
                            og,
                            k,
                            p,
                            dwg,
                            Mat::rm(dyg, p),
                            Mat::rm_t(xg, p),
                            true,
                            par_gemm,
                        );
                    } else {
                        to_channels_last(g, xg, &mut xt);
                        im2col_t_cl(g, &xt, &mut col_t);
                        sgemm(
                            og,
                            k,
                            p,
                            dwg,
                            Mat::rm(dyg, p),
                            Mat::rm(&col_t, k),
                            true,
                            par_gemm,
                        );
                    }
                }
            }
            if !g.is_pointwise() && !narrow && khw > 1 {
                // (ky, kx, c) -> (c, ky, kx) per output channel.
                let mut out = vec![0f32; wlen];
                for o in 0..g.o {
                    let src = &dw[o * k..(o + 1) * k];
                    let dst = &mut out[o * k..(o + 1) * k];
                    for t in 0..khw {
                        for c in 0..cg {
                            dst[c * khw + t] = src[t * cg + c];
                        }
                    }
                }
                dw = out;
            }
            dw
        })
        .collect();
    let mut it = partials.into_iter();
    let mut dw = it.next().unwrap_or_else(|| vec![0f32; wlen]);
    for part in it {
        dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    dw
}

/// Inference-only conv with a fused bias (+ ReLU) epilogue: how eval mode runs a conv
/// whose batch norm was folded into its weights. It has no backward.
pub struct Conv2dInferOp {
    pub cfg: ConvCfg,
    pub epi: Epilogue,
    /// The weights packed for the kernel that takes the conv, if the caller keeps them.
    pub packed: Option<std::sync::Arc<PackedWeight>>,
}

impl Conv2dInferOp {
    /// The shared forward of the plain and the residual variant.
    fn run(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        res: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "conv2d input")?;
        let w = slice(s2, l2, "conv2d weight")?;
        let g = self.cfg.geo(l1.dims(), l2.dims())?;
        let out_dims = [g.n, g.o, g.oh, g.ow];
        let r = match res {
            Some((s3, l3)) if l3.dims() == out_dims => Some(slice(s3, l3, "conv2d residual")?),
            Some((_, l3)) => candle_core::bail!(
                "conv2d residual {:?} does not match the output {out_dims:?}",
                l3.dims()
            ),
            None => None,
        };
        if self.epi.bias.len() != g.o {
            candle_core::bail!(
                "conv2d epilogue has {} biases for {} channels",
                self.epi.bias.len(),
                g.o
            );
        }
        // SAFETY: every path of the forward stores each output once (depthwise planes,
        // GEMMs that do not read their destination, an empty reduction zero-filled).
        let mut out = unsafe { super::cpu::unfilled(g.n * g.o * g.p()) };
        let packed = self.packed.as_deref();
        if packed.is_some_and(|p| !p.fits(&g)) {
            candle_core::bail!("conv2d: packed weights do not match {:?}", l2.dims());
        }
        conv_forward_packed(&g, x, w, packed, &mut out, Some(&self.epi), r);
        Ok((CpuStorage::F32(out), Shape::from(out_dims.to_vec())))
    }
}

impl CustomOp2 for Conv2dInferOp {
    fn name(&self) -> &'static str {
        "lopper-conv2d-infer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }
}

/// [`Conv2dInferOp`] that also adds a residual tensor in the epilogue (a basic block's
/// `relu(bn(conv(x)) + shortcut)` in one output pass).
pub struct Conv2dInferResOp(pub Conv2dInferOp);

impl candle_core::CustomOp3 for Conv2dInferResOp {
    fn name(&self) -> &'static str {
        "lopper-conv2d-infer-res"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.run((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "lopper-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "conv2d input")?;
        let w = slice(s2, l2, "conv2d weight")?;
        let g = self.cfg.geo(l1.dims(), l2.dims())?;
        // SAFETY: every path of the forward stores each output once (depthwise planes,
        // GEMMs that do not read their destination, an empty reduction zero-filled).
        let mut out = unsafe { super::cpu::unfilled(g.n * g.o * g.p()) };
        conv_forward(&g, x, w, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        conv_grads(&self.cfg, x, w, grad)
    }
}

/// The input and weight gradients of a convolution (`None` where no gradient is tracked).
fn conv_grads(
    cfg: &ConvCfg,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let g = cfg.geo(x.dims(), w.dims())?;
    let dx = if x.track_op() {
        let v = with_f32(grad, |dy| with_f32(w, |w| conv_backward_input(&g, dy, w)))
            .and_then(|r| r)
            .map_err(ce)?;
        Some(tensor(v, x.dims())?)
    } else {
        None // the network input needs no gradient
    };
    let dw = if w.track_op() {
        let v = with_f32(grad, |dy| with_f32(x, |x| conv_backward_weight(&g, x, dy)))
            .and_then(|r| r)
            .map_err(ce)?;
        Some(tensor(v, w.dims())?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// `y = conv2d(x, w) + b`: a convolution with its bias added in the output pass, and the
/// bias gradient (the output gradient summed per channel) in the backward — how a conv
/// without batch norm trains (candle's broadcast add and its reduction cost more than
/// the conv on narrow layers).
pub struct Conv2dBiasOp {
    pub cfg: ConvCfg,
    /// Applies a ReLU in the output pass (training a conv without batch norm); the
    /// backward masks the incoming gradient by the saved output instead of candle's
    /// five-op ReLU gradient.
    pub relu: bool,
}

impl candle_core::CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "lopper-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "conv2d input")?;
        let w = slice(s2, l2, "conv2d weight")?;
        let b = slice(s3, l3, "conv2d bias")?;
        let g = self.cfg.geo(l1.dims(), l2.dims())?;
        if b.len() != g.o {
            candle_core::bail!("conv2d: {} biases for {} channels", b.len(), g.o);
        }
        let epi = Epilogue {
            bias: b.to_vec(),
            act: self.relu.then_some(ActivationKind::Relu),
        };
        // SAFETY: every path of the forward stores each output once (depthwise planes,
        // GEMMs that do not read their destination, an empty reduction zero-filled).
        let mut out = unsafe { super::cpu::unfilled(g.n * g.o * g.p()) };
        conv_forward_epi(&g, x, w, &mut out, Some(&epi), None);
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let masked;
        let grad = if self.relu {
            masked = super::eltwise::relu_grad(res, grad)?;
            &masked
        } else {
            grad
        };
        let (dx, dw) = conv_grads(&self.cfg, x, w, grad)?;
        let o = b.elem_count();
        let db = with_f32(grad, |dy| {
            let p = dy.len() / (x.dim(0).unwrap_or(1).max(1) * o.max(1));
            let mut db = vec![0f32; o];
            for img in dy.chunks(o * p.max(1)) {
                for (acc, row) in db.iter_mut().zip(img.chunks(p.max(1))) {
                    *acc += super::reduce::row_sum(row);
                }
            }
            db
        })
        .map_err(ce)?;
        Ok((dx, dw, Some(tensor(db, b.dims())?)))
    }
}
