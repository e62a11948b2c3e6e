//! A 1×1 expansion, the depthwise conv that reads it and (optionally) the block's 1×1
//! projection, run as one parallel pass of per-image tasks: each task computes its image's
//! expanded channels into a scratch buffer of its own thread and convolves them there.
//!
//! An inverted-residual block (MobileNetV2, V3, EfficientNet) is 1×1 expand → depthwise →
//! 1×1 project. Run node by node on a batch, the expanded tensor — the largest of the
//! block — is written by one parallel loop and read back by the next, each loop ending in
//! a join, its tasks reading what the other core wrote, the tensor going through L3 or
//! memory. One image's expansion, depthwise conv and projection need nothing from other
//! images: here they are one task, the image's intermediate tensors never leave the
//! core's L2, and two joins per block go. Every conv runs the ordinary kernels
//! ([`super::conv::conv_forward_packed`]) on the one-image geometry, with weights packed
//! once; a 1×1 conv with sparse weights runs [`super::sparse_pw`] instead (the
//! expanded tensor of a sparse model is as large, its multiply-adds a tenth). (Tasks of
//! channel blocks, to feed the threads at small batches, lost: each
//! block's sub-GEMM is short and re-reads the expansion's input; see
//! `exec::pw_dw::batch_fuses`.)

use super::conv::{conv_forward_packed, Epilogue, PackedWeight};
use super::im2col::Geo;
use super::sparse_pw::SparsePointwise;
use crate::graph::csr::CsrMatrix;
use crate::graph::ops::ActivationKind;

/// One conv of the step for one image: geometry, weights (as given and packed for the
/// kernel that takes the geometry) and epilogue.
#[derive(Debug)]
struct Conv {
    g: Geo,
    w: Vec<f32>,
    packed: Option<PackedWeight>,
    epi: Epilogue,
}

/// A 1×1 conv of the step: dense (the ordinary kernels) or sparse.
#[derive(Debug)]
enum Pointwise {
    Dense(Conv),
    Sparse { g: Geo, k: SparsePointwise },
}

impl Conv {
    /// A dense conv (`h.w` dense; the caller checked).
    fn new(g: &Geo, h: &Halves, w: &[f32]) -> Conv {
        let g = Geo { n: 1, ..*g };
        Conv {
            packed: PackedWeight::for_geo(&g, w),
            w: w.to_vec(),
            epi: Epilogue {
                bias: h.bias.to_vec(),
                act: h.act,
            },
            g,
        }
    }

    /// `out = act(conv(x) + bias [+ res])` for one image.
    fn run(&self, x: &[f32], out: &mut [f32], res: Option<&[f32]>) {
        conv_forward_packed(
            &self.g,
            x,
            &self.w,
            self.packed.as_ref(),
            out,
            Some(&self.epi),
            res,
        );
    }
}

impl Pointwise {
    fn new(g: &Geo, h: Halves) -> Pointwise {
        match h.w {
            Weights::Dense(w) => Pointwise::Dense(Conv::new(g, &h, w)),
            Weights::Sparse { csr, scale } => {
                assert!(
                    csr.rows == g.o && csr.cols == g.c,
                    "pw_dw: sparse weight shape"
                );
                Pointwise::Sparse {
                    g: Geo { n: 1, ..*g },
                    k: SparsePointwise::new(csr.clone(), g.p(), scale, h.bias, h.act),
                }
            }
        }
    }

    fn geo(&self) -> &Geo {
        match self {
            Pointwise::Dense(c) => &c.g,
            Pointwise::Sparse { g, .. } => g,
        }
    }

    fn run(&self, x: &[f32], out: &mut [f32], res: Option<&[f32]>) {
        match self {
            Pointwise::Dense(c) => c.run(x, out, res),
            Pointwise::Sparse { k, .. } => k.run(x, out, res),
        }
    }
}

/// One fused step for one input geometry (per image; any batch).
#[derive(Debug)]
pub struct PwDw {
    pw: Pointwise,
    dw: Conv,
    /// The 1×1 projection that reads the depthwise conv's output, if it runs here too.
    proj: Option<Pointwise>,
}

thread_local! {
    /// The image's expanded channels and (with a projection) the depthwise output.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// A conv's weights, bias and activation.
pub struct Halves<'a> {
    pub w: Weights<'a>,
    pub bias: &'a [f32],
    pub act: Option<ActivationKind>,
}

/// A conv's weights: dense (row-major, one row per output channel), or — for the 1×1
/// convs — sparse, with the per-output-channel scale of a batch norm folded at run time.
pub enum Weights<'a> {
    Dense(&'a [f32]),
    Sparse {
        csr: &'a CsrMatrix,
        scale: Option<&'a [f32]>,
    },
}

impl Halves<'_> {
    /// Dense weights of `len` floats, or a sparse `rows × cols` matrix.
    fn fits(&self, len: usize, rows: usize, cols: usize) -> bool {
        match self.w {
            Weights::Dense(w) => w.len() == len,
            Weights::Sparse { csr, scale } => {
                csr.rows == rows && csr.cols == cols && scale.is_none_or(|s| s.len() == rows)
            }
        }
    }
}

impl PwDw {
    /// Whether `pw` is a 1×1 expansion at stride 1 without padding and `dw` the depthwise
    /// conv of its output.
    pub fn fits(pw: &Geo, dw: &Geo) -> bool {
        pointwise(pw)
            && dw.c == pw.o
            && dw.o == dw.c
            && dw.groups == dw.c
            && dw.h == pw.oh
            && dw.w == pw.ow
            && dw.p() > 0
            && pw.p() > 0
    }

    /// The pair (geometries of any batch; the weights as [`Halves`]).
    pub fn new(pw: &Geo, a: Halves, dw: &Geo, b: Halves) -> PwDw {
        assert!(
            Self::fits(pw, dw),
            "pw_dw: geometries {pw:?} / {dw:?} do not pair"
        );
        assert!(a.fits(pw.o * pw.c, pw.o, pw.c) && a.bias.len() == pw.o);
        let Weights::Dense(wb) = b.w else {
            panic!("pw_dw: a sparse depthwise weight");
        };
        assert!(wb.len() == dw.c * dw.kh * dw.kw && b.bias.len() == dw.c);
        PwDw {
            pw: Pointwise::new(pw, a),
            dw: Conv::new(dw, &b, wb),
            proj: None,
        }
    }

    /// Whether `proj` is a 1×1 conv at stride 1 without padding over the depthwise conv's
    /// output.
    pub fn projects(&self, proj: &Geo) -> bool {
        let dw = &self.dw.g;
        pointwise(proj) && proj.c == dw.o && proj.h == dw.oh && proj.w == dw.ow
    }

    /// The pair with the projection `proj` (the residual is given to [`PwDw::forward`]).
    pub fn with_projection(mut self, proj: &Geo, h: Halves) -> PwDw {
        assert!(
            self.projects(proj),
            "pw_dw: projection {proj:?} does not fit"
        );
        assert!(h.fits(proj.o * proj.c, proj.o, proj.c) && h.bias.len() == proj.o);
        self.proj = Some(Pointwise::new(proj, h));
        self
    }

    /// The output's `(channels, rows, columns)` per image.
    pub fn out_dims(&self) -> (usize, usize, usize) {
        let dw = &self.dw.g;
        (self.proj.as_ref().map_or(dw.o, |p| p.geo().o), dw.oh, dw.ow)
    }

    /// Floats of one image's input and output.
    pub fn image_sizes(&self) -> (usize, usize) {
        let (c, oh, ow) = self.out_dims();
        let pw = self.pw.geo();
        (pw.c * pw.h * pw.w, c * oh * ow)
    }

    /// `out [N, C, OH, OW] = act(dw(act(pw(x) + b₁)) + b₂)` for `x [N, C_in, H, W]` (then,
    /// with a projection, its 1×1 conv + bias + `res`, activated); every element of `out`
    /// written.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], res: Option<&[f32]>) {
        let (img_in, img_out) = self.image_sizes();
        assert!(
            x.len() >= n * img_in && out.len() == n * img_out,
            "pw_dw: buffer sizes"
        );
        assert!(res.is_none_or(|r| self.proj.is_some() && r.len() == out.len()));
        let pw = self.pw.geo();
        let (mid_len, dw_len) = (pw.o * pw.p(), self.dw.g.o * self.dw.g.p());
        super::par::chunks_mut(out, img_out, |img, o| {
            let xi = &x[img * img_in..(img + 1) * img_in];
            SCRATCH.with(|s| {
                let (mid, dwo) = &mut *s.borrow_mut();
                mid.resize(mid_len, 0.0);
                self.pw.run(xi, mid, None);
                let Some(pj) = &self.proj else {
                    return self.dw.run(mid, o, None);
                };
                dwo.resize(dw_len, 0.0);
                self.dw.run(mid, dwo, None);
                pj.run(dwo, o, res.map(|r| &r[img * img_out..(img + 1) * img_out]));
            });
        });
    }
}

/// A 1×1 conv at stride 1 without padding, ungrouped.
fn pointwise(g: &Geo) -> bool {
    g.is_pointwise() && g.groups == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' block: 12 → 40 channels on a 9×7 map, a 3×3 depthwise conv at stride 2
    /// padded on the left only, 40 → 9.
    const C_IN: usize = 12;
    const C: usize = 40;
    const H: usize = 9;
    const W: usize = 7;

    /// Deterministic values in [−1, 1).
    fn v(len: usize, s: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * s + 3) % 17) as f32 / 8.0 - 1.0)
            .collect()
    }

    /// Expansion, depthwise conv and projection geometries at batch `n`.
    fn geos(n: usize) -> (Geo, Geo, Geo) {
        let pw = Geo::pointwise(n, C_IN, H, W, C);
        let dw = Geo {
            c: C,
            o: C,
            kh: 3,
            kw: 3,
            oh: (H + 1 - 3) / 2 + 1,
            ow: (W + 2 - 3) / 2 + 1,
            sh: 2,
            sw: 2,
            pt: 0,
            pl: 1,
            groups: C,
            ..pw
        };
        let proj = Geo::pointwise(n, C, dw.oh, dw.ow, 9);
        (pw, dw, proj)
    }

    /// Batches of 1 and 20 images give the convs run one after the other (bias and
    /// activations applied); with a 40 → 9 projection and its residual, the three.
    #[test]
    fn fused_step_matches_the_convs() {
        let (c_in, c, h, w) = (C_IN, C, H, W);
        for n in [1, 20] {
            let (pw, dw, proj) = geos(n);
            let (x, wa, wb, wc) = (
                v(n * c_in * h * w, 7),
                v(c * c_in, 5),
                v(c * 9, 11),
                v(9 * c, 19),
            );
            let (ba, bb, bc) = (v(c, 3), v(c, 13), v(9, 23));
            let res = v(n * 9 * dw.p(), 29);
            let (relu6, relu) = (Some(ActivationKind::Relu6), Some(ActivationKind::Relu));
            let hv = |w, bias, act| Halves {
                w: Weights::Dense(w),
                bias,
                act,
            };
            let k = PwDw::new(&pw, hv(&wa, &ba, relu6), &dw, hv(&wb, &bb, None));
            let mut fused = vec![f32::NAN; n * c * dw.p()];
            k.forward(&x, n, &mut fused, None);
            let mut mid = vec![0f32; n * c * h * w];
            let e = |bias: &[f32], act| Epilogue {
                bias: bias.to_vec(),
                act,
            };
            conv_forward_packed(&pw, &x, &wa, None, &mut mid, Some(&e(&ba, relu6)), None);
            let mut want = vec![0f32; n * c * dw.p()];
            conv_forward_packed(&dw, &mid, &wb, None, &mut want, Some(&e(&bb, None)), None);
            let close = |a: &[f32], b: &[f32], what: &str| {
                for (i, (p, q)) in a.iter().zip(b).enumerate() {
                    assert!((p - q).abs() <= 1e-4, "{what} n {n} [{i}]: {p} vs {q}");
                }
            };
            close(&fused, &want, "pair");
            let k = k.with_projection(&proj, hv(&wc, &bc, relu));
            let mut fused = vec![f32::NAN; n * 9 * dw.p()];
            k.forward(&x, n, &mut fused, Some(&res));
            let mut want_c = vec![0f32; n * 9 * dw.p()];
            let ec = e(&bc, relu);
            conv_forward_packed(&proj, &want, &wc, None, &mut want_c, Some(&ec), Some(&res));
            close(&fused, &want_c, "projected");
        }
    }

    /// Sparse expansion (with a per-channel scale, as a batch norm folded at run time) and
    /// sparse projection (with its residual) in the step give the dense convs on the same
    /// weights: 12 → 40 channels on a 9×7 map, a stride-2 depthwise conv padded on the
    /// left only, 40 → 9, batches of 1 and 6.
    #[test]
    fn sparse_convs_in_the_step_match_the_dense_ones() {
        let (c_in, c, h, w) = (C_IN, C, H, W);
        // Four in five weights zero.
        let sparse = |w: Vec<f32>| -> Vec<f32> {
            w.into_iter()
                .enumerate()
                .map(|(i, x)| if (i * 7) % 5 == 0 { x } else { 0.0 })
                .collect()
        };
        for n in [1, 6] {
            let (pw, dw, proj) = geos(n);
            let (x, wa, wb, wc) = (
                v(n * c_in * h * w, 7),
                sparse(v(c * c_in, 5)),
                v(c * 9, 11),
                sparse(v(9 * c, 19)),
            );
            let (ba, bb, bc) = (v(c, 3), v(c, 13), v(9, 23));
            let scale: Vec<f32> = (0..c).map(|i| 0.3 + i as f32 / 16.0).collect();
            let res = v(n * 9 * dw.p(), 29);
            let (csr_a, csr_c) = (
                CsrMatrix::from_dense(&wa, c, c_in).unwrap(),
                CsrMatrix::from_dense(&wc, 9, c).unwrap(),
            );
            let relu6 = Some(ActivationKind::Relu6);
            let k = PwDw::new(
                &pw,
                Halves {
                    w: Weights::Sparse {
                        csr: &csr_a,
                        scale: Some(&scale),
                    },
                    bias: &ba,
                    act: relu6,
                },
                &dw,
                Halves {
                    w: Weights::Dense(&wb),
                    bias: &bb,
                    act: None,
                },
            )
            .with_projection(
                &proj,
                Halves {
                    w: Weights::Sparse {
                        csr: &csr_c,
                        scale: None,
                    },
                    bias: &bc,
                    act: None,
                },
            );
            let mut fused = vec![f32::NAN; n * 9 * dw.p()];
            k.forward(&x, n, &mut fused, Some(&res));
            // The dense convs, the scale applied to the expansion's rows.
            let wa_s: Vec<f32> = wa
                .chunks(c_in)
                .zip(&scale)
                .flat_map(|(row, s)| row.iter().map(move |x| x * s))
                .collect();
            let e = |bias: &[f32], act| Epilogue {
                bias: bias.to_vec(),
                act,
            };
            let mut mid = vec![0f32; n * c * h * w];
            conv_forward_packed(&pw, &x, &wa_s, None, &mut mid, Some(&e(&ba, relu6)), None);
            let mut d = vec![0f32; n * c * dw.p()];
            conv_forward_packed(&dw, &mid, &wb, None, &mut d, Some(&e(&bb, None)), None);
            let mut want = vec![0f32; n * 9 * dw.p()];
            let ec = e(&bc, None);
            conv_forward_packed(&proj, &d, &wc, None, &mut want, Some(&ec), Some(&res));
            for (i, (p, q)) in fused.iter().zip(&want).enumerate() {
                assert!((p - q).abs() <= 1e-4, "n {n} [{i}]: {p} vs {q}");
            }
        }
    }
}
