//! A 1×1 expansion and the depthwise conv that reads it, run as one parallel pass over
//! (image, channel block) tasks: each task computes its block's expanded channels into a
//! scratch buffer of its own thread and convolves them there.
//!
//! An inverted-residual block (MobileNetV2, V3, EfficientNet) is 1×1 expand → depthwise →
//! 1×1 project. Run node by node, the expanded tensor — the largest of the block — is
//! written by one parallel loop and read back by the next, each loop ending in a join;
//! at batch 1 the depthwise tasks read channels that the other core wrote, at large
//! batches the tensor goes through L3 or memory. The depthwise conv needs only the
//! channels it convolves, so the expansion of a channel block and its depthwise conv
//! need no join between them: here they are one task, the block's channels never leave
//! the core's L2, and one join per pair is saved. Where the depthwise output feeds the
//! block's 1×1 projection alone, a task of a whole image runs that too (with its
//! residual), and the block's two largest tensors never leave the core. Every conv runs
//! the ordinary kernels ([`super::conv::conv_forward_packed`]) on the block's
//! sub-geometry, with weights packed once per block.

use super::conv::{conv_forward_packed, Epilogue, PackedWeight};
use super::im2col::Geo;
use crate::graph::ops::ActivationKind;

/// Channels per block: a whole number of the depthwise kernel's 16-channel vectors.
const ALIGN: usize = 16;

/// One fused pair for one input geometry (per image; any batch).
#[derive(Debug)]
pub struct PwDw {
    /// The expansion's geometry for one image and all its output channels.
    pw: Geo,
    /// The depthwise conv's geometry for one image.
    dw: Geo,
    pw_w: Vec<f32>,
    dw_w: Vec<f32>,
    blocks: Vec<Block>,
    /// Channels per block (the last may have fewer).
    per: usize,
    /// The 1×1 projection that reads the depthwise conv's output, if it runs here too.
    proj: Option<Proj>,
}

/// A projection after the depthwise conv: a 1×1 conv over all its channels (one block per
/// image), with the residual its epilogue adds.
#[derive(Debug)]
struct Proj {
    g: Geo,
    w: Vec<f32>,
    packed: Option<PackedWeight>,
    epi: Epilogue,
}

/// One channel block's packed weights and epilogues.
#[derive(Debug)]
struct Block {
    pw_packed: Option<PackedWeight>,
    dw_packed: Option<PackedWeight>,
    pw_epi: Epilogue,
    dw_epi: Epilogue,
}

thread_local! {
    /// The expanded channels of the block a task computes, and (with a projection) the
    /// depthwise conv's output.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The two halves' weights (each row-major, one row per output channel), biases and
/// activations.
pub struct Halves<'a> {
    pub w: &'a [f32],
    pub bias: &'a [f32],
    pub act: Option<ActivationKind>,
}

impl PwDw {
    /// Whether `pw` (one image) is a 1×1 expansion at stride 1 without padding and `dw`
    /// the depthwise conv of its output.
    pub fn fits(pw: &Geo, dw: &Geo) -> bool {
        pw.kh == 1
            && pw.kw == 1
            && pw.sh == 1
            && pw.sw == 1
            && pw.pt == 0
            && pw.pl == 0
            && pw.groups == 1
            && pw.oh == pw.h
            && pw.ow == pw.w
            && dw.c == pw.o
            && dw.o == dw.c
            && dw.groups == dw.c
            && dw.h == pw.oh
            && dw.w == pw.ow
            && dw.p() > 0
            && pw.p() > 0
    }

    /// The pair, each image's channels in `blocks` tasks (rounded to whole 16-channel
    /// vectors; 1: one task per image, what the plans use — channel blocks as tasks lost
    /// at small batches, see `exec::pw_dw::batch_fuses`).
    pub fn new(pw: &Geo, a: Halves, dw: &Geo, b: Halves, blocks: usize) -> PwDw {
        assert!(
            Self::fits(pw, dw),
            "pw_dw: geometries {pw:?} / {dw:?} do not pair"
        );
        assert!(a.w.len() == pw.o * pw.c && a.bias.len() == pw.o);
        assert!(b.w.len() == dw.c * dw.kh * dw.kw && b.bias.len() == dw.c);
        let (pw, dw) = (Geo { n: 1, ..*pw }, Geo { n: 1, ..*dw });
        let c = pw.o;
        let want = blocks.clamp(1, c.div_ceil(ALIGN));
        let per = c.div_ceil(want).div_ceil(ALIGN) * ALIGN;
        let k = dw.kh * dw.kw;
        let blocks = (0..c.div_ceil(per))
            .map(|bi| {
                let (c0, cn) = (bi * per, per.min(c - bi * per));
                let (sp, sd) = sub(&pw, &dw, cn);
                Block {
                    pw_packed: PackedWeight::for_geo(&sp, &a.w[c0 * pw.c..(c0 + cn) * pw.c]),
                    dw_packed: PackedWeight::for_geo(&sd, &b.w[c0 * k..(c0 + cn) * k]),
                    pw_epi: Epilogue {
                        bias: a.bias[c0..c0 + cn].to_vec(),
                        act: a.act,
                    },
                    dw_epi: Epilogue {
                        bias: b.bias[c0..c0 + cn].to_vec(),
                        act: b.act,
                    },
                }
            })
            .collect();
        PwDw {
            pw,
            dw,
            pw_w: a.w.to_vec(),
            dw_w: b.w.to_vec(),
            blocks,
            per,
            proj: None,
        }
    }

    /// Whether `proj` (one image) is a 1×1 conv at stride 1 without padding over the
    /// depthwise conv's output.
    pub fn projects(&self, proj: &Geo) -> bool {
        proj.kh == 1
            && proj.kw == 1
            && proj.sh == 1
            && proj.sw == 1
            && proj.pt == 0
            && proj.pl == 0
            && proj.groups == 1
            && proj.c == self.dw.o
            && proj.h == self.dw.oh
            && proj.w == self.dw.ow
            && proj.oh == proj.h
            && proj.ow == proj.w
    }

    /// The pair with the projection `proj` (weights `[O, C]`, bias, activation; the
    /// residual is given to [`PwDw::forward`]) run in the same task: one block per image.
    pub fn with_projection(mut self, proj: &Geo, h: Halves) -> PwDw {
        assert!(
            self.projects(proj),
            "pw_dw: projection {proj:?} does not fit"
        );
        assert!(
            self.blocks.len() == 1,
            "pw_dw: a projection needs whole images"
        );
        assert!(h.w.len() == proj.o * proj.c && h.bias.len() == proj.o);
        let g = Geo { n: 1, ..*proj };
        self.proj = Some(Proj {
            packed: PackedWeight::for_geo(&g, h.w),
            w: h.w.to_vec(),
            epi: Epilogue {
                bias: h.bias.to_vec(),
                act: h.act,
            },
            g,
        });
        self
    }

    /// The output's `(channels, rows, columns)` per image.
    pub fn out_dims(&self) -> (usize, usize, usize) {
        let c = self.proj.as_ref().map_or(self.dw.o, |p| p.g.o);
        (c, self.dw.oh, self.dw.ow)
    }

    /// Floats of one image's input and output.
    pub fn image_sizes(&self) -> (usize, usize) {
        let (c, oh, ow) = self.out_dims();
        (self.pw.c * self.pw.h * self.pw.w, c * oh * ow)
    }

    /// `out [N, C, OH, OW] = dw(act(pw(x) + b₁)) + b₂`, activated, for `x [N, C_in, H, W]`
    /// (then, with a projection, its 1×1 conv + bias + `res`, activated); every element of
    /// `out` written.
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32], res: Option<&[f32]>) {
        let (img_in, img_out) = self.image_sizes();
        assert!(
            x.len() >= n * img_in && out.len() == n * img_out,
            "pw_dw: buffer sizes"
        );
        assert!(res.is_none_or(|r| self.proj.is_some() && r.len() == out.len()));
        let nb = self.blocks.len();
        let outp = super::conv_tiles::OutPtr(out.as_mut_ptr());
        let k = self.dw.kh * self.dw.kw;
        let (p_in, p_out) = (self.pw.p(), self.dw.p());
        super::par::for_each(n * nb, |t| {
            let (img, bi) = (t / nb, t % nb);
            let b = &self.blocks[bi];
            let (c0, cn) = (bi * self.per, self.per.min(self.pw.o - bi * self.per));
            let (sp, sd) = sub(&self.pw, &self.dw, cn);
            let xi = &x[img * img_in..(img + 1) * img_in];
            // The task's output channels: c0..c0 + cn of the depthwise conv, or every
            // channel of the projection (one block).
            let len = if self.proj.is_some() {
                img_out
            } else {
                cn * p_out
            };
            // SAFETY: this task alone writes these channels of image `img`, a contiguous
            // run inside `out` (n·img_out floats).
            let o = unsafe {
                std::slice::from_raw_parts_mut(outp.get().add(img * img_out + c0 * p_out), len)
            };
            SCRATCH.with(|s| {
                let (s, mid) = &mut *s.borrow_mut();
                s.resize(cn * p_in, 0.0);
                conv_forward_packed(
                    &sp,
                    xi,
                    &self.pw_w[c0 * self.pw.c..(c0 + cn) * self.pw.c],
                    b.pw_packed.as_ref(),
                    s,
                    Some(&b.pw_epi),
                    None,
                );
                let dw_w = &self.dw_w[c0 * k..(c0 + cn) * k];
                let Some(pj) = &self.proj else {
                    conv_forward_packed(
                        &sd,
                        s,
                        dw_w,
                        b.dw_packed.as_ref(),
                        o,
                        Some(&b.dw_epi),
                        None,
                    );
                    return;
                };
                // One block (asserted when the projection was added): all channels.
                mid.resize(cn * p_out, 0.0);
                conv_forward_packed(
                    &sd,
                    s,
                    dw_w,
                    b.dw_packed.as_ref(),
                    mid,
                    Some(&b.dw_epi),
                    None,
                );
                let r = res.map(|r| &r[img * img_out..(img + 1) * img_out]);
                conv_forward_packed(&pj.g, mid, &pj.w, pj.packed.as_ref(), o, Some(&pj.epi), r);
            });
        });
    }
}

/// The two halves' geometries for a block of `cn` channels of one image.
fn sub(pw: &Geo, dw: &Geo, cn: usize) -> (Geo, Geo) {
    (
        Geo { o: cn, ..*pw },
        Geo {
            c: cn,
            o: cn,
            groups: cn,
            ..*dw
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Channel blocks (40 channels in three: 16 + 16 + 8, batch 1) and whole images (batch 20)
    /// give the two convs run one after the other, bias and activations applied; with a
    /// projection and its residual (whole images), the three.
    #[test]
    fn blocks_match_the_two_convs() {
        let (c_in, c, h, w) = (12, 40, 9, 7);
        for n in [1, 20] {
            let pw = Geo {
                n,
                c: c_in,
                h,
                w,
                o: c,
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
            };
            let dw = Geo {
                c,
                o: c,
                h,
                w,
                kh: 3,
                kw: 3,
                oh: (h + 1 - 3) / 2 + 1,
                ow: (w + 2 - 3) / 2 + 1,
                sh: 2,
                sw: 2,
                pt: 0,
                pl: 1,
                groups: c,
                ..pw
            };
            let v = |len: usize, s: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| ((i * s + 3) % 17) as f32 / 8.0 - 1.0)
                    .collect()
            };
            let (x, wa, wb) = (v(n * c_in * h * w, 7), v(c * c_in, 5), v(c * 9, 11));
            let (ba, bb) = (v(c, 3), v(c, 13));
            let act = Some(ActivationKind::Relu6);
            let k = PwDw::new(
                &pw,
                Halves {
                    w: &wa,
                    bias: &ba,
                    act,
                },
                &dw,
                Halves {
                    w: &wb,
                    bias: &bb,
                    act: None,
                },
                if n == 1 { 3 } else { 1 },
            );
            if n == 1 {
                assert!(
                    k.blocks.len() == 3 && k.per == 16,
                    "{} blocks of {}",
                    k.blocks.len(),
                    k.per
                );
            }
            let mut fused = vec![f32::NAN; n * c * dw.p()];
            k.forward(&x, n, &mut fused, None);
            let mut mid = vec![0f32; n * c * h * w];
            let ea = Epilogue {
                bias: ba.clone(),
                act,
            };
            conv_forward_packed(&pw, &x, &wa, None, &mut mid, Some(&ea), None);
            let eb = Epilogue {
                bias: bb.clone(),
                act: None,
            };
            let mut want = vec![0f32; n * c * dw.p()];
            conv_forward_packed(&dw, &mid, &wb, None, &mut want, Some(&eb), None);
            for (i, (a, b)) in fused.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-4, "n {n} [{i}]: {a} vs {b}");
            }
            if n == 1 {
                continue;
            }
            // With the projection (40 → 9 channels) and a residual, whole images.
            let proj = Geo {
                c,
                o: 9,
                h: dw.oh,
                w: dw.ow,
                kh: 1,
                kw: 1,
                oh: dw.oh,
                ow: dw.ow,
                sh: 1,
                sw: 1,
                pt: 0,
                pl: 0,
                groups: 1,
                ..dw
            };
            let (wc, bc) = (v(9 * c, 19), v(9, 23));
            let res = v(n * 9 * dw.p(), 29);
            let act = Some(ActivationKind::Relu);
            let k = k.with_projection(
                &proj,
                Halves {
                    w: &wc,
                    bias: &bc,
                    act,
                },
            );
            let mut fused = vec![f32::NAN; n * 9 * dw.p()];
            k.forward(&x, n, &mut fused, Some(&res));
            let ec = Epilogue { bias: bc, act };
            let mut want_c = vec![0f32; n * 9 * dw.p()];
            conv_forward_packed(&proj, &want, &wc, None, &mut want_c, Some(&ec), Some(&res));
            for (i, (a, b)) in fused.iter().zip(&want_c).enumerate() {
                assert!((a - b).abs() <= 1e-4, "projected n {n} [{i}]: {a} vs {b}");
            }
        }
    }
}
