//! The element-wise, depthwise, per-channel and epilogue kernels (issue 17), forward and
//! gradients, against candle's own ops (the reference path) and a naive f64 depthwise
//! convolution — at odd sizes, stride 2, asymmetric padding and 3×3/5×5/7×7 windows, and
//! with each instruction-set level forced in turn (AVX-512, AVX2, portable), so the paths
//! this machine would not pick by itself are checked too.

use candle_core::{Device, Tensor, Var};
use lopper::graph::ops::ActivationKind as A;
use lopper::kernels::conv_tiles::{set_mode, TileMode};
use lopper::kernels::simd::{force, Isa};
use lopper::kernels::{self, ConvCfg};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// Every activation kind of the IR, with non-default constants where they have any.
const KINDS: &[A] = &[
    A::Relu,
    A::Relu6,
    A::Clip { lo: -0.7, hi: 1.3 },
    A::LeakyRelu { slope: 0.1 },
    A::LeakyRelu { slope: 1.7 },
    A::HardSigmoid,
    A::HardSigmoidWith {
        alpha: 0.2,
        beta: 0.5,
    },
    A::HardSwish,
    A::Silu,
    A::Sigmoid,
    A::Tanh,
    A::Gelu,
    A::GeluTanh,
    A::Elu { alpha: 0.8 },
    A::Selu {
        alpha: 1.673_263_2,
        gamma: 1.050_701,
    },
    A::Softplus,
    A::Mish,
];

const LEVELS: &[Isa] = &[Isa::Avx512, Isa::Avx2, Isa::Portable];

fn rand_vec(rng: &mut Pcg64, n: usize, r: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-r..r)).collect()
}

fn t(v: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

type Run = (Vec<f32>, Vec<Vec<f32>>);

/// Output and gradients of `f` (against a fixed output gradient), with lopper's kernels
/// and with candle's reference ops.
fn both(inputs: &[(&[f32], &[usize])], f: &dyn Fn(&[Tensor]) -> Tensor) -> [Run; 2] {
    let run = |reference: bool| {
        kernels::use_reference_ops(reference);
        let vars: Vec<Var> = inputs
            .iter()
            .map(|(v, d)| Var::from_tensor(&t(v, d)).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let dy = Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu)
            .unwrap()
            .affine(0.37, 0.0)
            .unwrap()
            .sin()
            .unwrap()
            .reshape(y.dims())
            .unwrap();
        let grads = (y.clone() * dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = vars
            .iter()
            .map(|v| vals(grads.get(v.as_tensor()).unwrap()))
            .collect();
        kernels::use_reference_ops(false);
        (vals(&y), gs)
    };
    [run(false), run(true)]
}

/// Runs `check` once per instruction-set level (process-wide, so one test does it all).
fn each_level(check: impl Fn(Isa)) {
    for &l in LEVELS {
        force(Some(l));
        check(l);
    }
    force(None);
}

#[test]
fn every_kernel_matches_the_reference_at_every_instruction_set_level() {
    each_level(|l| {
        activations(l);
        // The convolutions three times: with the register tiles where their rules put
        // them, and each kind of tile wherever it can run (shapes the rule gives to
        // im2col + GEMM or to the other tiles).
        for mode in [TileMode::Auto, TileMode::Always, TileMode::ChanVec] {
            set_mode(mode);
            depthwise(l);
            epilogues(l);
        }
        set_mode(TileMode::Auto);
        packed_weights(l);
        channel_ops(l);
        sparse_direct(l);
        layer_norm(l);
        attention(l);
    });
}

/// Multi-head and grouped-query attention (tokens `[N, (H + 2G)·d, T, 1]` and a `[·, H, W]`
/// map; one head, odd head dims and token counts), with and without a key mask, forward and
/// input gradient, against candle's ops.
fn attention(l: Isa) {
    let mut rng = Pcg64::seed_from_u64(12);
    // (images, query heads, key/value heads, head dim, positions): multi-head, then
    // grouped-query (2 and 3 query heads per kv head) and multi-query attention.
    for (n, h, kv, d, pos) in [
        (2, 3, 3, 4, vec![7, 1]),
        (1, 1, 1, 5, vec![3, 4]),
        (3, 2, 2, 8, vec![17, 1]),
        (2, 4, 2, 4, vec![9, 1]),
        (2, 6, 2, 3, vec![5, 2]),
        (3, 5, 1, 4, vec![6, 1]),
    ] {
        let mut dims = vec![n, (h + 2 * kv) * d];
        dims.extend(&pos);
        let x = rand_vec(&mut rng, dims.iter().product(), 1.5);
        let scale = 1.0 / (d as f64).sqrt();
        let [ours, theirs] = both(&[(&x, &dims)], &|ts| {
            kernels::attention(&ts[0], h, kv, d, scale).unwrap()
        });
        let what = format!("attention n{n} h{h} kv{kv} d{d} {pos:?} ({l:?})");
        assert_close(&ours.0, &theirs.0, 1e-5, &what);
        assert_close(&ours.1[0], &theirs.1[0], 1e-4, &format!("{what} grad"));
        // With a key padding mask: sequence i has its last i keys masked.
        let tl: usize = pos.iter().product();
        let m: Vec<f32> = (0..n * tl)
            .map(|i| if i % tl + i / tl >= tl { 0.0 } else { 1.0 })
            .collect();
        let mut md = vec![n];
        md.extend(&pos);
        let [ours, theirs] = both(&[(&x, &dims)], &|ts| {
            kernels::attention_masked(&ts[0], &t(&m, &md), h, kv, d, scale).unwrap()
        });
        let what = format!("masked attention n{n} h{h} kv{kv} d{d} {pos:?} ({l:?})");
        assert_close(&ours.0, &theirs.0, 1e-5, &what);
        assert_close(&ours.1[0], &theirs.1[0], 1e-4, &format!("{what} grad"));
    }
}

/// LayerNorm across channels (tokens `[N, C, T, 1]`, an image map, odd widths, one
/// channel), forward and all three gradients, against candle's ops.
fn layer_norm(l: Isa) {
    let mut rng = Pcg64::seed_from_u64(11);
    for d in [[3, 12, 7, 1], [2, 5, 3, 4], [1, 1, 5, 1], [2, 33, 17, 1]] {
        let x = rand_vec(&mut rng, d.iter().product(), 2.0);
        let g = rand_vec(&mut rng, d[1], 1.0);
        let b = rand_vec(&mut rng, d[1], 1.0);
        let [ours, theirs] = both(&[(&x, &d), (&g, &[d[1]]), (&b, &[d[1]])], &|ts| {
            kernels::layer_norm(&ts[0], &ts[1], &ts[2], 1e-5).unwrap()
        });
        assert_close(
            &ours.0,
            &theirs.0,
            1e-5,
            &format!("layer norm {d:?} ({l:?})"),
        );
        for k in 0..3 {
            let what = format!("layer norm {d:?} grad {k} ({l:?})");
            assert_close(&ours.1[k], &theirs.1[k], 1e-4, &what);
        }
        let [ours, theirs] = both(&[(&x, &d), (&g, &[d[1]]), (&b, &[d[1]])], &|ts| {
            kernels::rms_norm(&ts[0], &ts[1], &ts[2], 1e-6).unwrap()
        });
        assert_close(&ours.0, &theirs.0, 1e-5, &format!("rms norm {d:?} ({l:?})"));
        for k in 0..3 {
            let what = format!("rms norm {d:?} grad {k} ({l:?})");
            assert_close(&ours.1[k], &theirs.1[k], 1e-4, &what);
        }
    }
}

/// The direct sparse convolution (every output width it takes, stride 1 and 2, 1×1 to 5×5,
/// asymmetric padding, heights that leave no whole tile, an unpadded conv that reads its
/// input in place; and one width it does not take, which runs im2col + SpMM) with scale,
/// bias, residual and an activation (ReLU in the store, others after it), against the
/// dense convolution of the same weights on candle's reference ops.
fn sparse_direct(l: Isa) {
    use lopper::graph::csr::CsrMatrix;
    use lopper::kernels::csr::SparseWeight;
    use lopper::kernels::sparse::{conv2d as sparse_conv, SparseEpilogue};
    let mut rng = Pcg64::seed_from_u64(9);
    // (input [N, C, H, W], weight [O, C, kh, kw], stride, padding [t, l, b, r]) → OW.
    let convs = [
        ([2, 5, 32, 32], [6, 5, 3, 3], 1, [1, 1, 1, 1]), // 32
        ([2, 4, 19, 16], [5, 4, 3, 3], 1, [1, 1, 1, 1]), // 16, 19 rows
        ([1, 3, 8, 8], [7, 3, 3, 3], 1, [1, 1, 1, 1]),   // 8
        ([2, 3, 16, 16], [4, 3, 3, 3], 2, [1, 1, 1, 1]), // 8, stride 2
        ([1, 6, 28, 28], [3, 6, 5, 5], 1, [2, 2, 2, 2]), // 28
        ([2, 4, 14, 13], [5, 4, 3, 3], 1, [0, 1, 0, 2]), // 14, asymmetric
        ([1, 3, 13, 14], [4, 3, 3, 3], 2, [1, 1, 1, 1]), // 7, stride 2
        ([2, 8, 7, 7], [9, 8, 1, 1], 1, [0, 0, 0, 0]),   // 7, 1×1 in place
        ([1, 5, 6, 6], [3, 5, 3, 3], 1, [0, 0, 0, 0]),   // 4, unpadded in place
        ([2, 4, 9, 8], [3, 4, 3, 3], 2, [0, 1, 1, 1]),   // 4, stride 2, odd height
        ([1, 3, 12, 16], [4, 3, 5, 5], 1, [1, 2, 3, 2]), // 16 in place, uneven rows
        ([1, 2, 6, 8], [3, 2, 1, 3], 1, [0, 0, 0, 2]),   // 8 in place, right pad only
        ([2, 3, 10, 10], [4, 3, 3, 3], 1, [1, 1, 1, 1]), // 10: im2col + SpMM instead
        // Pointwise convs on flattened positions (AVX-512): a 4×4 map (one vector, the
        // non-zeros split eight ways), 8×8 (four vectors), 2×2 (a partial vector),
        // 5×7 (two whole vectors and a partial one), 16×9 (eight vectors and a tail
        // of one), with more non-zeros per channel than one round of partial sums.
        ([2, 40, 4, 4], [9, 40, 1, 1], 1, [0, 0, 0, 0]),
        ([2, 12, 8, 8], [5, 12, 1, 1], 1, [0, 0, 0, 0]),
        ([2, 30, 2, 2], [7, 30, 1, 1], 1, [0, 0, 0, 0]),
        ([1, 11, 5, 7], [6, 11, 1, 1], 1, [0, 0, 0, 0]),
        ([2, 20, 16, 9], [5, 20, 1, 1], 1, [0, 0, 0, 0]),
        // Maps of 1–4 vectors with several images: the same channel of a group of images
        // per tile (`sparse_images`), in place, or packed where each input channel feeds
        // ≥ 12 non-zeros (here ≥ 60 outputs); groups of 8, 4, 2 and 1 image, batches that
        // leave a partial last group, partial last vectors (1×1, 3×3, 6×6, 7×7 maps).
        ([3, 8, 4, 4], [70, 8, 1, 1], 1, [0, 0, 0, 0]),
        ([9, 20, 4, 4], [80, 20, 1, 1], 1, [0, 0, 0, 0]),
        ([5, 16, 7, 7], [64, 16, 1, 1], 1, [0, 0, 0, 0]),
        ([3, 24, 6, 6], [10, 24, 1, 1], 1, [0, 0, 0, 0]),
        ([4, 16, 1, 1], [70, 16, 1, 1], 1, [0, 0, 0, 0]),
        ([2, 300, 8, 8], [70, 300, 1, 1], 1, [0, 0, 0, 0]),
        ([9, 40, 3, 3], [9, 40, 1, 1], 1, [0, 0, 0, 0]),
        ([6, 700, 4, 4], [80, 700, 1, 1], 1, [0, 0, 0, 0]),
        // k×k convs at stride 1 whose output rows are as wide as the input's, maps of
        // 1–4 vectors, several images: read in place through per-tap masks (`Taps`):
        // 8×8 and 7×7 3×3, 5×5 on 4×4, asymmetric padding (fewer output rows than
        // input rows in one), a 1×3 kernel with groups of images and a partial group.
        ([3, 6, 8, 8], [5, 6, 3, 3], 1, [1, 1, 1, 1]),
        ([2, 5, 7, 7], [4, 5, 3, 3], 1, [1, 1, 1, 1]),
        ([4, 4, 4, 4], [6, 4, 5, 5], 1, [2, 2, 2, 2]),
        ([2, 3, 6, 5], [4, 3, 3, 3], 1, [0, 1, 2, 1]),
        ([2, 4, 5, 4], [3, 4, 3, 3], 1, [0, 1, 0, 1]),
        ([9, 3, 4, 6], [3, 3, 1, 3], 1, [0, 1, 0, 1]),
    ];
    for (ci, &(xd, wd, s, padding)) in convs.iter().enumerate() {
        let cfg = ConvCfg {
            stride: [s, s],
            padding,
            dilation: [1, 1],
            groups: 1,
        };
        let x = t(&rand_vec(&mut rng, xd.iter().product(), 1.0), &xd);
        // ~80 % zeros, one output channel empty.
        let mut wv = rand_vec(&mut rng, wd.iter().product(), 1.0);
        let per_o = wv.len() / wd[0];
        for (i, v) in wv.iter_mut().enumerate() {
            if rng.gen_bool(0.8) || i / per_o == 1 {
                *v = 0.0;
            }
        }
        let w = t(&wv, &wd);
        let (scale, bias) = (
            rand_vec(&mut rng, wd[0], 1.5),
            rand_vec(&mut rng, wd[0], 1.0),
        );
        kernels::use_reference_ops(true);
        let y = kernels::conv2d(&x, &w, cfg).unwrap();
        kernels::use_reference_ops(false);
        let dims = y.dims().to_vec();
        let res = rand_vec(&mut rng, y.elem_count(), 1.0);
        let p = dims[2] * dims[3];
        let csr = CsrMatrix::from_dense(&wv, wd[0], per_o).unwrap();
        let sw = SparseWeight::new(csr);
        for (with_res, act) in [
            (false, None),
            (true, Some(A::Relu)),
            (false, Some(A::Relu)),
            (true, Some(A::Relu6)),
            (false, Some(A::HardSwish)),
        ] {
            let pre: Vec<f32> = vals(&y)
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let o = (i / p) % dims[1];
                    let r = if with_res { res[i] } else { 0.0 };
                    v * scale[o] + bias[o] + r
                })
                .collect();
            let want = match act {
                None => pre,
                Some(k) => {
                    kernels::use_reference_ops(true);
                    let a = vals(&kernels::activation(&t(&pre, &dims), k).unwrap());
                    kernels::use_reference_ops(false);
                    a
                }
            };
            let epi = SparseEpilogue {
                scale: Some(&scale),
                bias: Some(&bias),
                act,
            };
            let rt = t(&res, &dims);
            let got = sparse_conv(&x, &sw, &wd, cfg, &epi, with_res.then_some(&rt)).unwrap();
            assert_eq!(got.dims(), &dims[..]);
            let what = format!("sparse direct conv {ci} residual {with_res} {act:?} ({l:?})");
            assert_close(&vals(&got), &want, 1e-5, &what);
            // Batch 1 takes the per-channel parallel path.
            let one = sparse_conv(
                &x.narrow(0, 0, 1).unwrap(),
                &sw,
                &wd,
                cfg,
                &epi,
                with_res.then(|| rt.narrow(0, 0, 1).unwrap()).as_ref(),
            )
            .unwrap();
            assert_close(&vals(&one), &want[..one.elem_count()], 1e-5, &what);
        }
    }
}

/// Forward and gradient of every activation on values from −12 to 12 (an odd count, so
/// vector remainders run), plus the points where the piecewise kinds switch.
fn activations(l: Isa) {
    let mut rng = Pcg64::seed_from_u64(1);
    let mut x = rand_vec(&mut rng, 1003, 12.0);
    x.extend([-3.0, 3.0, 0.0, 6.0, -0.5, 0.5, 90.0, -90.0]);
    let dims = [x.len()];
    for &k in KINDS {
        let [ours, theirs] = both(&[(&x, &dims)], &|ts| {
            kernels::activation(&ts[0], k).unwrap()
        });
        assert_close(&ours.0, &theirs.0, 2e-5, &format!("{k:?} forward ({l:?})"));
        // Gradients at the switch points are conventions (candle and PyTorch differ
        // too): compare away from them.
        let n = 1003;
        assert_close(
            &ours.1[0][..n],
            &theirs.1[0][..n],
            1e-4,
            &format!("{k:?} gradient ({l:?})"),
        );
    }
}

/// Naive f64 depthwise convolution `[N, C, H, W]` with weights `[C, 1, kh, kw]`.
fn naive_depthwise(x: &[f32], w: &[f32], d: [usize; 4], k: [usize; 2], cfg: &ConvCfg) -> Vec<f32> {
    let [n, c, h, wd] = d;
    let p = cfg.padding;
    let oh = (h + p[0] + p[2] - k[0]) / cfg.stride[0] + 1;
    let ow = (wd + p[1] + p[3] - k[1]) / cfg.stride[1] + 1;
    let mut y = vec![0f32; n * c * oh * ow];
    for b in 0..n {
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0f64;
                    for ky in 0..k[0] {
                        for kx in 0..k[1] {
                            let iy = (oy * cfg.stride[0] + ky) as isize - p[0] as isize;
                            let ix = (ox * cfg.stride[1] + kx) as isize - p[1] as isize;
                            if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= wd {
                                continue;
                            }
                            let xv = x[((b * c + ch) * h + iy as usize) * wd + ix as usize];
                            acc += xv as f64 * w[(ch * k[0] + ky) * k[1] + kx] as f64;
                        }
                    }
                    y[((b * c + ch) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    y
}

/// Depthwise 3×3/5×5/7×7 at stride 1 and 2, symmetric and asymmetric padding, odd widths
/// (a row shorter than a vector, and one just over): forward against the naive loop,
/// forward and gradients against candle's grouped convolution where it applies.
fn depthwise(l: Isa) {
    let mut rng = Pcg64::seed_from_u64(2);
    // (input dims, window, stride, padding [top, left, bottom, right])
    type Case = ([usize; 4], usize, [usize; 2], [usize; 4]);
    let cases: &[Case] = &[
        ([2, 3, 9, 13], 3, [1, 1], [1, 1, 1, 1]),
        ([2, 3, 9, 13], 3, [2, 2], [1, 1, 1, 1]),
        ([1, 2, 11, 17], 3, [2, 2], [0, 0, 1, 1]), // TensorFlow-style "same" at stride 2
        ([1, 4, 7, 5], 5, [1, 1], [2, 2, 2, 2]),
        ([2, 2, 12, 19], 5, [2, 2], [1, 2, 2, 1]),
        ([1, 3, 10, 9], 7, [1, 1], [3, 3, 3, 3]),
        ([1, 2, 15, 33], 7, [2, 2], [3, 3, 3, 3]),
        ([1, 2, 1, 1], 3, [1, 1], [1, 1, 1, 1]),
        ([1, 2, 6, 6], 3, [1, 2], [1, 0, 1, 2]),
        // Every register-tile width (4, 8 and 16 columns) with plane counts and vector
        // counts that do not divide into tasks or tiles, many planes of one geometry (the
        // zero border is written once per geometry and reused), then another geometry.
        ([3, 7, 4, 4], 3, [1, 1], [1, 1, 1, 1]),
        ([2, 5, 7, 7], 3, [1, 1], [1, 1, 1, 1]),
        ([2, 3, 8, 8], 3, [2, 2], [0, 0, 1, 1]),
        ([5, 9, 16, 16], 3, [1, 1], [1, 1, 1, 1]),
        ([3, 4, 32, 32], 3, [2, 2], [1, 1, 1, 1]),
        ([2, 3, 17, 33], 5, [1, 1], [2, 2, 2, 2]),
        ([1, 2, 3, 40], 3, [1, 1], [1, 1, 1, 1]),
        // "Same" output at stride 1 with the padding all on one side (the flattened,
        // copy-free path).
        ([1, 3, 6, 7], 3, [1, 1], [0, 0, 2, 2]),
        ([2, 3, 6, 7], 3, [1, 1], [2, 1, 0, 1]),
        // The same on rows of 16 or more (the padded per-row path: a masked-load
        // version without the copy ran 2× slower): one-sided, and a 7×7 window.
        ([1, 2, 5, 21], 3, [1, 1], [0, 0, 2, 2]),
        ([2, 2, 9, 20], 7, [1, 1], [3, 3, 3, 3]),
        // Channel-vector tiles (rows up to 28 wide): a whole 16-channel block and a tail
        // block, every tile width (4..8) with a short last tile, stride 2 with asymmetric
        // padding, one image split into row-range tasks, a 4×4 map.
        ([2, 35, 9, 11], 5, [2, 2], [1, 2, 2, 1]),
        ([1, 17, 14, 14], 3, [1, 1], [1, 1, 1, 1]),
        ([3, 16, 7, 7], 7, [1, 1], [3, 3, 3, 3]),
        ([1, 16, 28, 27], 3, [1, 1], [0, 1, 2, 1]),
        ([1, 33, 13, 26], 5, [2, 2], [2, 2, 2, 2]),
        ([4, 20, 4, 4], 3, [1, 1], [1, 1, 1, 1]),
        // 3×3 stride 2 on rows wider than 28 outputs (read in place, `dw_wide`): two
        // images and an odd output height (a last single row), a whole number of
        // vectors with the padding on the right only, five vectors (a block of four and
        // one), no left padding, no right padding, the row's last value read as the
        // value after a vector's two loads.
        ([2, 3, 9, 61], 3, [2, 2], [1, 1, 1, 1]),
        ([1, 2, 6, 64], 3, [2, 2], [0, 0, 1, 1]),
        ([1, 3, 7, 150], 3, [2, 2], [1, 1, 1, 1]),
        ([1, 2, 5, 58], 3, [2, 2], [1, 0, 1, 1]),
        ([1, 2, 8, 66], 3, [2, 2], [0, 1, 0, 0]),
        ([1, 2, 4, 64], 3, [2, 2], [1, 1, 1, 1]),
        // The same kernel at stride 1 (four output rows at a time): three vectors (a
        // block of two and one) and a last group of three rows, padding on one side only
        // (a last group of two), none on the left with two on the right (a last single
        // row), none above or below.
        ([2, 3, 7, 33], 3, [1, 1], [1, 1, 1, 1]),
        ([1, 2, 6, 40], 3, [1, 1], [0, 0, 2, 2]),
        ([1, 2, 9, 30], 3, [1, 1], [1, 0, 1, 2]),
        ([1, 2, 5, 32], 3, [1, 1], [0, 1, 0, 1]),
    ];
    for (ci, &(d, k, stride, padding)) in cases.iter().enumerate() {
        let cfg = ConvCfg {
            stride,
            padding,
            dilation: [1, 1],
            groups: d[1],
        };
        let wd = [d[1], 1, k, k];
        let x = rand_vec(&mut rng, d.iter().product(), 1.0);
        let w = rand_vec(&mut rng, wd.iter().product(), 1.0);
        let y = vals(&kernels::conv2d(&t(&x, &d), &t(&w, &wd), cfg).unwrap());
        let want = naive_depthwise(&x, &w, d, [k, k], &cfg);
        assert_close(&y, &want, 1e-5, &format!("depthwise case {ci} ({l:?})"));
        // Fused epilogue: bias and an activation.
        // (A clamp applied at the store, or an activation after it, by turns.)
        let bias = rand_vec(&mut rng, d[1], 1.0);
        let act = if ci % 2 == 0 { A::HardSwish } else { A::Relu6 };
        let ye =
            kernels::conv2d_epilogue(&t(&x, &d), &t(&w, &wd), bias.clone(), Some(act), None, cfg)
                .unwrap();
        kernels::use_reference_ops(true);
        let yr = kernels::conv2d_epilogue(&t(&x, &d), &t(&w, &wd), bias, Some(act), None, cfg);
        kernels::use_reference_ops(false);
        if let Ok(yr) = yr {
            let what = format!("depthwise epilogue case {ci} ({l:?})");
            assert_close(&vals(&ye), &vals(&yr), 1e-5, &what);
        }
        // Gradients against candle where it supports the geometry (square stride, an
        // output that tiles the input exactly).
        let exact = |len: usize, a: usize, b: usize, s: usize| (len + a + b - k).is_multiple_of(s);
        if stride[0] != stride[1]
            || !exact(d[2], padding[0], padding[2], stride[0])
            || !exact(d[3], padding[1], padding[3], stride[1])
        {
            continue;
        }
        let [ours, theirs] = both(&[(&x, &d), (&w, &wd)], &|ts| {
            kernels::conv2d(&ts[0], &ts[1], cfg).unwrap()
        });
        assert_close(
            &ours.0,
            &theirs.0,
            1e-5,
            &format!("depthwise {ci} y ({l:?})"),
        );
        for g in 0..2 {
            let what = format!("depthwise {ci} grad {g} ({l:?})");
            assert_close(&ours.1[g], &theirs.1[g], 1e-4, &what);
        }
    }
}

/// Dense conv (3×3 stride 2 asymmetric, 1×1, grouped) and linear layers with every
/// activation (and a residual) in the epilogue, against the unfused reference.
fn epilogues(l: Isa) {
    let mut rng = Pcg64::seed_from_u64(3);
    let convs = [
        ([2, 5, 9, 7], [6, 5, 3, 3], [2, 2], [0, 1, 1, 0], 1),
        ([2, 6, 5, 5], [7, 6, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        ([1, 6, 6, 6], [4, 3, 3, 3], [1, 1], [1, 1, 1, 1], 2),
        // Few input channels (the direct path): an RGB stem at stride 2, a 7×7 stem with
        // asymmetric padding and a row wider than two vectors, a one-channel 5×5.
        ([2, 3, 19, 21], [5, 3, 3, 3], [2, 2], [1, 1, 1, 1], 1),
        ([1, 3, 17, 40], [9, 3, 7, 7], [2, 2], [3, 2, 3, 3], 1),
        ([3, 1, 6, 5], [4, 1, 5, 5], [1, 1], [2, 2, 2, 2], 1),
        // Five or more channels per group (the register-tile path): odd widths with a
        // remainder channel block, per image; grouped at stride 2 with
        // asymmetric padding at batch 1 (the shared-image path); a map of several bands
        // at batch 1; a tiny map; a 7×7 window; a 5×5 at stride 2 on a wide row.
        ([2, 7, 11, 13], [9, 7, 3, 3], [1, 1], [1, 1, 1, 1], 1),
        ([1, 12, 9, 11], [10, 6, 3, 3], [2, 2], [0, 1, 2, 1], 2),
        ([1, 6, 60, 50], [3, 6, 3, 3], [1, 1], [1, 1, 1, 1], 1),
        ([3, 5, 6, 4], [5, 5, 3, 3], [1, 1], [1, 1, 1, 1], 1),
        ([2, 5, 12, 12], [3, 5, 7, 7], [1, 1], [3, 3, 3, 3], 1),
        ([1, 16, 20, 37], [6, 16, 5, 5], [2, 2], [2, 2, 1, 2], 1),
        // Stride 1 with five or more output channels: the input gradient runs on the
        // tiles too (asymmetric padding, a 5×5 at batch 1).
        ([2, 6, 13, 17], [8, 6, 3, 3], [1, 1], [1, 0, 1, 2], 1),
        ([1, 5, 18, 18], [7, 5, 5, 5], [1, 1], [2, 2, 2, 2], 1),
        // Batch 1 with at most 32 positions (the weight-streaming thin tiles): one
        // vector with a remainder row block, two vectors, a 1×1 with a short reduction.
        ([1, 9, 4, 4], [13, 9, 3, 3], [1, 1], [1, 1, 1, 1], 1),
        ([1, 6, 5, 5], [7, 6, 3, 3], [1, 1], [1, 1, 1, 1], 1),
        ([1, 10, 3, 5], [6, 10, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        // Small maps with many channels (the channel-vector tiles): two input-channel
        // blocks and a remainder channel block with asymmetric padding; batch 1 at stride
        // 2 with more channel blocks than one tile group (split across threads); a 2×2
        // map at batch 3.
        ([2, 120, 5, 7], [37, 120, 3, 3], [1, 1], [1, 0, 1, 2], 1),
        ([1, 30, 10, 9], [80, 30, 3, 3], [2, 2], [1, 1, 0, 1], 1),
        ([3, 16, 2, 2], [33, 16, 3, 3], [1, 1], [1, 1, 1, 1], 1),
        // Batch 1 with one tile group of channel blocks: split by positions instead.
        ([1, 32, 8, 8], [40, 32, 3, 3], [1, 1], [1, 1, 1, 1], 1),
        // Channel blocks not a multiple of four, split into near-equal groups (10 blocks
        // as 4 + 3 + 3 across tasks at batch 1; 5 as 3 + 2 per image, the two-block
        // tiles eight positions wide with a short last tile).
        ([1, 24, 6, 7], [150, 24, 3, 3], [1, 1], [1, 1, 1, 1], 1),
        ([2, 20, 5, 6], [72, 20, 3, 3], [1, 1], [1, 0, 1, 1], 1),
        // A weight gradient summed over more positions than one sweep takes.
        ([2, 8, 20, 20], [32, 8, 3, 3], [1, 1], [1, 1, 1, 1], 1),
        // 1×1 convs over 1×1 maps (squeeze-excitation) run as linear layers: batch 1
        // with more rows than one weight-streaming task, a few images, and enough images
        // for the GEMM's per-thread row blocks; odd widths.
        ([1, 70, 1, 1], [131, 70, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        ([3, 37, 1, 1], [19, 37, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        ([9, 33, 1, 1], [70, 33, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        // 1×1 convs on the register-tile panels (AVX-512): the batch's positions one
        // column space, so tiles span images (5×5 maps, three to a tile with a short
        // last tile; 2×3 maps, many runs per tile); a 7×7 expansion; a contraction at
        // batch 1 large enough to be split across threads, rows not a multiple of six;
        // a long accumulation with panels split between tasks.
        ([3, 20, 5, 5], [13, 20, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        ([4, 96, 2, 3], [50, 96, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        ([2, 40, 7, 7], [70, 40, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        ([1, 64, 16, 17], [17, 64, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        ([2, 300, 9, 9], [37, 300, 1, 1], [1, 1], [0, 0, 0, 0], 1),
        // A strided 1×1 conv (a projection shortcut): the subsampled input (sides the
        // stride covers: the reference's gradient, a transposed conv, has no output padding).
        ([2, 12, 9, 7], [10, 12, 1, 1], [2, 2], [0, 0, 0, 0], 1),
    ];
    for (ci, &(xd, wd, stride, padding, groups)) in convs.iter().enumerate() {
        let cfg = ConvCfg {
            stride,
            padding,
            dilation: [1, 1],
            groups,
        };
        let x = t(&rand_vec(&mut rng, xd.iter().product(), 1.0), &xd);
        let w = t(&rand_vec(&mut rng, wd.iter().product(), 1.0), &wd);
        let bias = rand_vec(&mut rng, wd[0], 1.0);
        // The training conv with its bias: forward and all three gradients.
        let (xv, wv) = (vals(&x), vals(&w));
        let [ours, theirs] = both(&[(&xv, &xd), (&wv, &wd), (&bias, &[wd[0]])], &|ts| {
            kernels::conv2d_bias(&ts[0], &ts[1], &ts[2], cfg).unwrap()
        });
        assert_close(
            &ours.0,
            &theirs.0,
            1e-5,
            &format!("conv {ci} + bias ({l:?})"),
        );
        for g in 0..3 {
            let what = format!("conv {ci} + bias grad {g} ({l:?})");
            assert_close(&ours.1[g], &theirs.1[g], 1e-4, &what);
        }
        // The same with its ReLU fused (a training conv without batch norm).
        let [ours, theirs] = both(&[(&xv, &xd), (&wv, &wd), (&bias, &[wd[0]])], &|ts| {
            kernels::conv2d_bias_act(&ts[0], &ts[1], &ts[2], cfg, true).unwrap()
        });
        assert_close(
            &ours.0,
            &theirs.0,
            1e-5,
            &format!("conv {ci} + bias + relu ({l:?})"),
        );
        for g in 0..3 {
            let what = format!("conv {ci} + bias + relu grad {g} ({l:?})");
            assert_close(&ours.1[g], &theirs.1[g], 1e-4, &what);
        }
        let y0 = kernels::conv2d(&x, &w, cfg).unwrap();
        let res = t(&rand_vec(&mut rng, y0.elem_count(), 1.0), y0.dims());
        for &k in KINDS {
            for r in [None, Some(&res)] {
                let ours = kernels::conv2d_epilogue(&x, &w, bias.clone(), Some(k), r, cfg);
                kernels::use_reference_ops(true);
                let theirs = kernels::conv2d_epilogue(&x, &w, bias.clone(), Some(k), r, cfg);
                kernels::use_reference_ops(false);
                let what = format!("conv {ci} epilogue {k:?} residual {} ({l:?})", r.is_some());
                assert_close(&vals(&ours.unwrap()), &vals(&theirs.unwrap()), 2e-5, &what);
            }
        }
    }
    // A few rows (the weight-streaming path) and many (the GEMM path), odd widths; with
    // ≥ 64 outputs the GEMM splits them into per-thread row blocks (a short last block).
    for (n, i, o) in [
        (3, 37, 19),
        (1, 70, 131),
        (9, 37, 19),
        (7, 33, 70),
        (20, 64, 131),
    ] {
        linear_epilogues(&mut rng, n, i, o, l);
    }
}

fn linear_epilogues(rng: &mut Pcg64, n: usize, i: usize, o: usize, l: Isa) {
    let x = t(&rand_vec(rng, n * i, 1.0), &[n, i]);
    let w = t(&rand_vec(rng, o * i, 1.0), &[o, i]);
    let b = t(&rand_vec(rng, o, 1.0), &[o]);
    for &k in KINDS {
        let ours = vals(&kernels::linear_act(&x, &w, &b, k).unwrap());
        kernels::use_reference_ops(true);
        let plain = kernels::linear(&x, &w, Some(&b)).unwrap();
        let theirs = vals(&kernels::activation(&plain, k).unwrap());
        kernels::use_reference_ops(false);
        assert_close(
            &ours,
            &theirs,
            2e-5,
            &format!("linear {n}x{i}x{o} + {k:?} ({l:?})"),
        );
    }
}

/// Weights packed once, as an eval plan keeps them: 1×1 convs on the register-tile
/// panels (tiles spanning images, partial row panels, every epilogue with and without a
/// residual) and linear layers (batch rows not a multiple of six, outputs not a multiple
/// of 64, every activation, with and without a bias), against the reference ops. On the
/// levels without AVX-512 the packed weights are ignored (the same comparison).
fn packed_weights(l: Isa) {
    use lopper::kernels::conv::{conv_forward_packed, Epilogue, PackedWeight};
    use lopper::kernels::im2col::Geo;
    use lopper::kernels::panel;
    let mut rng = Pcg64::seed_from_u64(11);
    for (n, c, h, w, o, st) in [
        (3, 20, 5, 5, 13, [1, 1]),
        (2, 33, 7, 7, 64, [1, 1]),
        (5, 96, 4, 4, 65, [1, 1]),
        (1, 130, 9, 11, 7, [1, 1]),
        (2, 40, 16, 16, 24, [1, 1]),
        // Positions as rows (`panel::conv_rows`, 128 input channels or more): batch-1
        // 7×7, 4×4 and 14×14 maps, three 3×3 images, output channels off the multiple
        // of 64 (three panels, the last short), row groups split across tasks; and a
        // 7×7 map with 64 (the panels).
        (1, 288, 7, 7, 160, [1, 1]),
        (1, 200, 7, 7, 150, [1, 1]),
        (1, 64, 7, 7, 130, [1, 1]),
        (1, 160, 4, 4, 96, [1, 1]),
        (1, 136, 14, 14, 200, [1, 1]),
        (1, 512, 7, 7, 70, [1, 1]),
        (3, 130, 3, 3, 40, [1, 1]),
        // Strided 1×1 convs (projection shortcuts) as stride-1 convs of the subsampled
        // input: the panels, positions as rows, stride 3 on sides it does not divide.
        (1, 64, 11, 13, 40, [2, 2]),
        (1, 130, 14, 14, 70, [2, 2]),
        (2, 20, 9, 8, 13, [3, 3]),
    ] {
        let g = Geo {
            n,
            c,
            h,
            w,
            o,
            kh: 1,
            kw: 1,
            oh: (h - 1) / st[0] + 1,
            ow: (w - 1) / st[1] + 1,
            sh: st[0],
            sw: st[1],
            pt: 0,
            pl: 0,
            dh: 1,
            dw: 1,
            groups: 1,
        };
        let xv = rand_vec(&mut rng, n * c * h * w, 1.0);
        let wv = rand_vec(&mut rng, o * c, 1.0);
        let bias = rand_vec(&mut rng, o, 1.0);
        let (oh, ow) = (g.oh, g.ow);
        let res = rand_vec(&mut rng, n * o * oh * ow, 1.0);
        let packed = PackedWeight::for_geo(&g, &wv);
        if l == Isa::Avx512 {
            assert!(
                matches!(
                    packed,
                    Some(PackedWeight::Panels(_) | PackedWeight::Columns(_))
                ),
                "{n}x{c}x{h}x{w}->{o} not on the panels"
            );
        }
        let cfg = ConvCfg {
            stride: st,
            padding: [0, 0, 0, 0],
            dilation: [1, 1],
            groups: 1,
        };
        for k in KINDS.iter().map(|&k| Some(k)).chain([None]) {
            for r in [None, Some(&res[..])] {
                let epi = Epilogue {
                    bias: bias.clone(),
                    act: k,
                };
                let mut ours = vec![f32::NAN; n * o * oh * ow];
                conv_forward_packed(&g, &xv, &wv, packed.as_ref(), &mut ours, Some(&epi), r);
                kernels::use_reference_ops(true);
                let (x, wt) = (t(&xv, &[n, c, h, w]), t(&wv, &[o, c, 1, 1]));
                let rt = r.map(|r| t(r, &[n, o, oh, ow]));
                let theirs = kernels::conv2d_epilogue(&x, &wt, bias.clone(), k, rt.as_ref(), cfg);
                kernels::use_reference_ops(false);
                let what = format!(
                    "packed 1x1 {n}x{c}x{h}x{w}->{o} stride {st:?} {k:?} residual {} ({l:?})",
                    r.is_some()
                );
                assert_close(&ours, &vals(&theirs.unwrap()), 2e-5, &what);
            }
        }
    }
    // Depthwise convs with their weights packed once (16-channel vectors on AVX-512, 8 on
    // AVX2): channel counts off the multiple of 16 and of 8, small maps, stride 2,
    // asymmetric padding, 3×3, 5×5 and 7×7.
    for (n, c, h, w, k, s, pad) in [
        (1, 40, 4, 4, 3, 1, [1, 1, 1, 1]),
        (2, 17, 7, 7, 5, 1, [2, 2, 2, 2]),
        (1, 13, 11, 10, 7, 1, [3, 3, 3, 3]),
        (2, 21, 15, 13, 7, 2, [2, 3, 3, 2]),
        (1, 96, 8, 8, 3, 2, [0, 0, 1, 1]),
        (3, 33, 5, 9, 3, 1, [1, 0, 1, 2]),
        (1, 50, 14, 14, 5, 2, [1, 1, 2, 2]),
    ] {
        let (oh, ow) = (
            (h + pad[0] + pad[2] - k) / s + 1,
            (w + pad[1] + pad[3] - k) / s + 1,
        );
        let g = Geo {
            n,
            c,
            h,
            w,
            o: c,
            kh: k,
            kw: k,
            oh,
            ow,
            sh: s,
            sw: s,
            pt: pad[0],
            pl: pad[1],
            dh: 1,
            dw: 1,
            groups: c,
        };
        let xv = rand_vec(&mut rng, n * c * h * w, 1.0);
        let wv = rand_vec(&mut rng, c * k * k, 1.0);
        let bias = rand_vec(&mut rng, c, 1.0);
        let packed = PackedWeight::for_geo(&g, &wv);
        if l >= Isa::Avx2 {
            assert!(
                matches!(packed, Some(PackedWeight::Depthwise { .. })),
                "depthwise {n}x{c}x{h}x{w} k{k} s{s} not packed"
            );
        }
        let cfg = ConvCfg {
            stride: [s, s],
            padding: pad,
            dilation: [1, 1],
            groups: c,
        };
        for act in KINDS.iter().map(|&k| Some(k)).chain([None]) {
            let epi = Epilogue {
                bias: bias.clone(),
                act,
            };
            let mut ours = vec![f32::NAN; n * c * oh * ow];
            conv_forward_packed(&g, &xv, &wv, packed.as_ref(), &mut ours, Some(&epi), None);
            kernels::use_reference_ops(true);
            let (x, wt) = (t(&xv, &[n, c, h, w]), t(&wv, &[c, 1, k, k]));
            let theirs = kernels::conv2d_epilogue(&x, &wt, bias.clone(), act, None, cfg);
            kernels::use_reference_ops(false);
            let what =
                format!("packed depthwise {n}x{c}x{h}x{w} k{k} s{s} {pad:?} {act:?} ({l:?})");
            assert_close(&ours, &vals(&theirs.unwrap()), 2e-5, &what);
        }
    }
    for (n, i, o) in [
        (5, 37, 19),
        (6, 64, 64),
        (13, 33, 131),
        (64, 70, 10),
        (29, 200, 65),
    ] {
        let xv = rand_vec(&mut rng, n * i, 1.0);
        let wv = rand_vec(&mut rng, o * i, 1.0);
        let bv = rand_vec(&mut rng, o, 1.0);
        let packed = std::sync::Arc::new(panel::pack_cols(&wv, o, i));
        let (x, w, b) = (t(&xv, &[n, i]), t(&wv, &[o, i]), t(&bv, &[o]));
        for k in KINDS.iter().map(|&k| Some(k)).chain([None]) {
            for bias in [Some(&b), None] {
                let ours = kernels::linear_packed(&x, &w, bias, k, Some(packed.clone()));
                kernels::use_reference_ops(true);
                let theirs = kernels::linear_packed(&x, &w, bias, k, None);
                kernels::use_reference_ops(false);
                let what = format!(
                    "packed linear {n}x{i}x{o} {k:?} bias {} ({l:?})",
                    bias.is_some()
                );
                assert_close(&vals(&ours.unwrap()), &vals(&theirs.unwrap()), 2e-5, &what);
            }
        }
    }
}

/// Global average pooling and the squeeze-excitation product, forward and gradients.
fn channel_ops(l: Isa) {
    let mut rng = Pcg64::seed_from_u64(4);
    // The second shape spans several tasks of ~16 K values, the last one partial.
    for (xd, sd) in [
        ([3, 5, 7, 9], [3, 5, 1, 1]),
        ([2, 700, 5, 5], [2, 700, 1, 1]),
    ] {
        let x = rand_vec(&mut rng, xd.iter().product(), 1.0);
        let s = rand_vec(&mut rng, sd.iter().product(), 1.0);
        let [ours, theirs] = both(&[(&x, &xd)], &|ts| {
            kernels::global_avg_pool(&ts[0]).unwrap()
        });
        assert_close(&ours.0, &theirs.0, 1e-6, &format!("GAP {xd:?} ({l:?})"));
        assert_close(
            &ours.1[0],
            &theirs.1[0],
            1e-6,
            &format!("GAP grad {xd:?} ({l:?})"),
        );
        for swap in [false, true] {
            let [ours, theirs] = both(&[(&x, &xd), (&s, &sd)], &|ts| {
                let (a, b) = if swap {
                    (&ts[1], &ts[0])
                } else {
                    (&ts[0], &ts[1])
                };
                kernels::mul(a, b).unwrap()
            });
            assert_close(&ours.0, &theirs.0, 1e-6, &format!("gate {xd:?} ({l:?})"));
            for g in 0..2 {
                let what = format!("gate grad {g} swap {swap} {xd:?} ({l:?})");
                assert_close(&ours.1[g], &theirs.1[g], 1e-5, &what);
            }
        }
    }
}
