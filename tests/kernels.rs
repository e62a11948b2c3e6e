//! Every custom kernel's forward and backward, checked against (a) a naive f64
//! implementation with central finite differences and (b) candle's own ops in f32 where
//! candle supports the configuration.

#![allow(clippy::too_many_arguments, clippy::manual_is_multiple_of)]

use candle_core::{Device, Tensor, Var};
use lopper::kernels::{self, ConvCfg, PoolCfg};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

fn rand_vec(rng: &mut Pcg64, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn t32(v: &[f64], dims: &[usize]) -> Tensor {
    Tensor::from_vec(
        v.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
        dims,
        &Device::Cpu,
    )
    .unwrap()
}

fn v32(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|x| x as f64)
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().map(|x| x.abs()).fold(1e-3, f64::max);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: {x} vs {y} (scale {scale})"
        );
    }
}

/// Gradient of `sum(dy * f(x))` by central differences, for every coordinate of `x`.
fn fd_grad(x: &[f64], dy: &[f64], f: &dyn Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let h = 1e-5;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let a: f64 = f(&xp).iter().zip(dy).map(|(y, d)| y * d).sum();
            xp[i] = x[i] - h;
            let b: f64 = f(&xp).iter().zip(dy).map(|(y, d)| y * d).sum();
            xp[i] = x[i];
            (a - b) / (2.0 * h)
        })
        .collect()
}

struct ConvCase {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: [usize; 2],
    cfg: ConvCfg,
}

fn out_len(len: usize, k: usize, s: usize, a: usize, b: usize, d: usize) -> usize {
    (len + a + b - d * (k - 1) - 1) / s + 1
}

fn naive_conv(cs: &ConvCase, x: &[f64], w: &[f64]) -> Vec<f64> {
    let c = &cs.cfg;
    let (oh, ow) = (
        out_len(
            cs.h,
            cs.k[0],
            c.stride[0],
            c.padding[0],
            c.padding[2],
            c.dilation[0],
        ),
        out_len(
            cs.w,
            cs.k[1],
            c.stride[1],
            c.padding[1],
            c.padding[3],
            c.dilation[1],
        ),
    );
    let (cg, og) = (cs.c / c.groups, cs.o / c.groups);
    let mut y = vec![0.0; cs.n * cs.o * oh * ow];
    for n in 0..cs.n {
        for o in 0..cs.o {
            let g = o / og;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0;
                    for ci in 0..cg {
                        for ky in 0..cs.k[0] {
                            for kx in 0..cs.k[1] {
                                let iy = (oy * c.stride[0] + ky * c.dilation[0]) as isize
                                    - c.padding[0] as isize;
                                let ix = (ox * c.stride[1] + kx * c.dilation[1]) as isize
                                    - c.padding[1] as isize;
                                if iy < 0 || ix < 0 || iy >= cs.h as isize || ix >= cs.w as isize {
                                    continue;
                                }
                                let xc = g * cg + ci;
                                acc += x
                                    [((n * cs.c + xc) * cs.h + iy as usize) * cs.w + ix as usize]
                                    * w[((o * cg + ci) * cs.k[0] + ky) * cs.k[1] + kx];
                            }
                        }
                    }
                    y[((n * cs.o + o) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    y
}

fn conv_cases() -> Vec<ConvCase> {
    let cfg = |s: [usize; 2], p: [usize; 4], d: [usize; 2], g: usize| ConvCfg {
        stride: s,
        padding: p,
        dilation: d,
        groups: g,
    };
    vec![
        ConvCase {
            n: 2,
            c: 3,
            h: 7,
            w: 6,
            o: 4,
            k: [3, 3],
            cfg: cfg([1, 1], [1; 4], [1, 1], 1),
        },
        ConvCase {
            n: 3,
            c: 2,
            h: 9,
            w: 8,
            o: 5,
            k: [3, 3],
            cfg: cfg([2, 2], [1; 4], [1, 1], 1),
        },
        ConvCase {
            n: 2,
            c: 3,
            h: 6,
            w: 7,
            o: 2,
            k: [2, 3],
            cfg: cfg([1, 2], [0, 1, 2, 0], [1, 1], 1),
        },
        ConvCase {
            n: 2,
            c: 2,
            h: 8,
            w: 8,
            o: 3,
            k: [3, 3],
            cfg: cfg([1, 1], [2; 4], [2, 2], 1),
        },
        ConvCase {
            n: 2,
            c: 4,
            h: 5,
            w: 5,
            o: 6,
            k: [3, 3],
            cfg: cfg([1, 1], [1; 4], [1, 1], 2),
        },
        ConvCase {
            n: 3,
            c: 5,
            h: 6,
            w: 6,
            o: 5,
            k: [3, 3],
            cfg: cfg([2, 2], [1; 4], [1, 1], 5),
        },
        ConvCase {
            n: 2,
            c: 4,
            h: 5,
            w: 4,
            o: 3,
            k: [1, 1],
            cfg: cfg([1, 1], [0; 4], [1, 1], 1),
        },
        ConvCase {
            n: 1,
            c: 3,
            h: 5,
            w: 5,
            o: 2,
            k: [5, 5],
            cfg: cfg([1, 1], [2; 4], [1, 1], 1),
        },
        // Eight or more channels per group: the weight gradient's channels-last path
        // (fewer take the plain im2col path).
        ConvCase {
            n: 2,
            c: 9,
            h: 6,
            w: 5,
            o: 4,
            k: [3, 3],
            cfg: cfg([1, 1], [1; 4], [1, 1], 1),
        },
        ConvCase {
            n: 2,
            c: 16,
            h: 5,
            w: 5,
            o: 4,
            k: [3, 3],
            cfg: cfg([2, 2], [1; 4], [1, 1], 2),
        },
        // Atrous conv on a map smaller than its dilation (DeepLab's ASPP at low
        // resolution): the outer taps never touch the input (once a panic in im2col).
        ConvCase {
            n: 2,
            c: 3,
            h: 3,
            w: 2,
            o: 4,
            k: [3, 3],
            cfg: cfg([1, 1], [4; 4], [4, 4], 1),
        },
        // A map of 64+ positions with two images: the per-image GEMM path (smaller maps
        // with several images take the batched one).
        ConvCase {
            n: 2,
            c: 3,
            h: 10,
            w: 9,
            o: 4,
            k: [3, 3],
            cfg: cfg([1, 1], [1; 4], [1, 1], 1),
        },
        // The same with a depthwise conv.
        ConvCase {
            n: 1,
            c: 4,
            h: 2,
            w: 3,
            o: 4,
            k: [3, 3],
            cfg: cfg([1, 1], [3; 4], [3, 3], 4),
        },
    ]
}

#[test]
fn conv2d_forward_and_backward_match_finite_differences() {
    let mut rng = Pcg64::seed_from_u64(7);
    for (ci, cs) in conv_cases().iter().enumerate() {
        let xd = [cs.n, cs.c, cs.h, cs.w];
        let wd = [cs.o, cs.c / cs.cfg.groups, cs.k[0], cs.k[1]];
        let x = rand_vec(&mut rng, xd.iter().product());
        let w = rand_vec(&mut rng, wd.iter().product());
        let xv = Var::from_tensor(&t32(&x, &xd)).unwrap();
        let wv = Var::from_tensor(&t32(&w, &wd)).unwrap();
        let y = kernels::conv2d(xv.as_tensor(), wv.as_tensor(), cs.cfg).unwrap();
        let yref = naive_conv(cs, &x, &w);
        assert_close(&v32(&y), &yref, 1e-5, &format!("case {ci} forward"));
        let dy = rand_vec(&mut rng, yref.len());
        let loss = (y * t32(&dy, &y_dims(&yref, cs)))
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let gx = v32(grads.get(xv.as_tensor()).unwrap());
        let gw = v32(grads.get(wv.as_tensor()).unwrap());
        let fx = fd_grad(&x, &dy, &|xx| naive_conv(cs, xx, &w));
        let fw = fd_grad(&w, &dy, &|ww| naive_conv(cs, &x, ww));
        assert_close(&gx, &fx, 1e-4, &format!("case {ci} dx"));
        assert_close(&gw, &fw, 1e-4, &format!("case {ci} dw"));
    }
}

fn y_dims(y: &[f64], cs: &ConvCase) -> Vec<usize> {
    let c = &cs.cfg;
    let oh = out_len(
        cs.h,
        cs.k[0],
        c.stride[0],
        c.padding[0],
        c.padding[2],
        c.dilation[0],
    );
    let ow = y.len() / (cs.n * cs.o * oh);
    vec![cs.n, cs.o, oh, ow]
}

/// Forward and gradients through our kernel, then through candle's reference ops.
fn both_backends(
    inputs: &[(&[f64], &[usize])],
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> [(Vec<f64>, Vec<Vec<f64>>); 2] {
    let run = |reference: bool| {
        kernels::use_reference_ops(reference);
        let vars: Vec<Var> = inputs
            .iter()
            .map(|(v, d)| Var::from_tensor(&t32(v, d)).unwrap())
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
            .map(|v| v32(grads.get(v.as_tensor()).unwrap()))
            .collect();
        kernels::use_reference_ops(false);
        (v32(&y), gs)
    };
    [run(false), run(true)]
}

#[test]
fn conv2d_matches_candle_reference_ops() {
    let mut rng = Pcg64::seed_from_u64(11);
    for (ci, cs) in conv_cases().iter().enumerate() {
        let c = cs.cfg;
        let symmetric = c.stride[0] == c.stride[1] && c.dilation[0] == c.dilation[1];
        let exact = |len: usize, k: usize, i: usize| {
            (len + c.padding[i] + c.padding[i + 2] - c.dilation[i % 2] * (k - 1) - 1)
                % c.stride[i % 2]
                == 0
        };
        if !symmetric
            || c.groups > 1 && c.groups == cs.c
            || !exact(cs.h, cs.k[0], 0)
            || !exact(cs.w, cs.k[1], 1)
        {
            // candle supports neither non-square strides nor (fast) depthwise, and its
            // input gradient has the wrong size when the last window leaves a remainder.
            continue;
        }
        let xd = [cs.n, cs.c, cs.h, cs.w];
        let wd = [cs.o, cs.c / c.groups, cs.k[0], cs.k[1]];
        let x = rand_vec(&mut rng, xd.iter().product());
        let w = rand_vec(&mut rng, wd.iter().product());
        let [ours, theirs] = both_backends(&[(&x, &xd), (&w, &wd)], &|t| {
            kernels::conv2d(&t[0], &t[1], c).unwrap()
        });
        assert_close(&ours.0, &theirs.0, 1e-5, &format!("case {ci} y"));
        for k in 0..2 {
            assert_close(
                &ours.1[k],
                &theirs.1[k],
                1e-5,
                &format!("case {ci} grad {k}"),
            );
        }
    }
}

fn naive_bn(
    x: &[f64],
    g: &[f64],
    b: &[f64],
    n: usize,
    c: usize,
    s: usize,
    fixed: Option<(&[f64], &[f64])>,
    relu: bool,
) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for ci in 0..c {
        let vals: Vec<f64> = (0..n)
            .flat_map(|ni| (0..s).map(move |j| (ni * c + ci) * s + j))
            .map(|i| x[i])
            .collect();
        let (mean, var) = match fixed {
            Some((m, v)) => (m[ci], v[ci]),
            None => {
                let m = vals.iter().sum::<f64>() / vals.len() as f64;
                (
                    m,
                    vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / vals.len() as f64,
                )
            }
        };
        for ni in 0..n {
            for j in 0..s {
                let i = (ni * c + ci) * s + j;
                let v = g[ci] * (x[i] - mean) / (var + 1e-5).sqrt() + b[ci];
                y[i] = if relu { v.max(0.0) } else { v };
            }
        }
    }
    y
}

#[test]
fn batchnorm_relu_matches_finite_differences_and_candle() {
    let mut rng = Pcg64::seed_from_u64(3);
    for &(train, relu, ref dims) in &[
        (true, true, vec![4, 3, 5, 5]),
        (true, false, vec![5, 4, 3, 2]),
        (false, true, vec![3, 3, 4, 4]),
        (false, false, vec![6, 7]),
        (true, true, vec![8, 5]),
    ] {
        let (n, c) = (dims[0], dims[1]);
        let s: usize = dims[2..].iter().product();
        let x = rand_vec(&mut rng, dims.iter().product());
        let g: Vec<f64> = (0..c).map(|_| rng.gen_range(0.5..1.5)).collect();
        let b = rand_vec(&mut rng, c);
        let rm = rand_vec(&mut rng, c);
        let rv: Vec<f64> = (0..c).map(|_| rng.gen_range(0.5..2.0)).collect();
        let fixed = if train {
            None
        } else {
            Some((&rm[..], &rv[..]))
        };
        let (rmt, rvt) = (t32(&rm, &[c]), t32(&rv, &[c]));
        let f = |t: &[Tensor]| {
            let run = if train { None } else { Some((&rmt, &rvt)) };
            kernels::batch_norm(&t[0], &t[1], &t[2], run, 1e-5, relu)
                .unwrap()
                .0
        };
        let [ours, theirs] = both_backends(&[(&x, dims), (&g, &[c]), (&b, &[c])], &f);
        let what = format!("bn train={train} relu={relu} {dims:?}");
        assert_close(
            &ours.0,
            &naive_bn(&x, &g, &b, n, c, s, fixed, relu),
            1e-4,
            &format!("{what} fwd"),
        );
        for k in 0..3 {
            assert_close(
                &ours.1[k],
                &theirs.1[k],
                2e-4,
                &format!("{what} vs candle grad {k}"),
            );
        }
        // finite differences of the same weighted sum both_backends uses
        let dy: Vec<f64> = (0..x.len())
            .map(|i| ((i as f32 * 0.37).sin()) as f64)
            .collect();
        let fx = fd_grad(&x, &dy, &|xx| naive_bn(xx, &g, &b, n, c, s, fixed, relu));
        let fg = fd_grad(&g, &dy, &|gg| naive_bn(&x, gg, &b, n, c, s, fixed, relu));
        assert_close(&ours.1[0], &fx, 2e-3, &format!("{what} dx fd"));
        assert_close(&ours.1[1], &fg, 2e-3, &format!("{what} dgamma fd"));
    }
}

fn naive_pool(x: &[f64], nc: usize, h: usize, w: usize, cfg: &PoolCfg, max: bool) -> Vec<f64> {
    let oh = lopper::graph::shape::window_out(
        h,
        cfg.kernel[0],
        cfg.stride[0],
        cfg.padding[0],
        cfg.padding[2],
        1,
        cfg.ceil_mode,
    )
    .unwrap();
    let ow = lopper::graph::shape::window_out(
        w,
        cfg.kernel[1],
        cfg.stride[1],
        cfg.padding[1],
        cfg.padding[3],
        1,
        cfg.ceil_mode,
    )
    .unwrap();
    let mut y = vec![0.0; nc * oh * ow];
    for i in 0..nc {
        for oy in 0..oh {
            for ox in 0..ow {
                let (mut m, mut sum, mut cnt, mut padcnt) =
                    (f64::NEG_INFINITY, 0.0, 0usize, 0usize);
                for ky in 0..cfg.kernel[0] {
                    for kx in 0..cfg.kernel[1] {
                        let iy = (oy * cfg.stride[0] + ky) as isize - cfg.padding[0] as isize;
                        let ix = (ox * cfg.stride[1] + kx) as isize - cfg.padding[1] as isize;
                        let in_padded = iy < (h + cfg.padding[2]) as isize
                            && ix < (w + cfg.padding[3]) as isize;
                        if in_padded {
                            padcnt += 1;
                        }
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let v = x[(i * h + iy as usize) * w + ix as usize];
                        m = m.max(v);
                        sum += v;
                        cnt += 1;
                    }
                }
                let div = if cfg.count_include_pad { padcnt } else { cnt } as f64;
                y[(i * oh + oy) * ow + ox] = if max { m } else { sum / div };
            }
        }
    }
    y
}

#[test]
fn pooling_matches_finite_differences_and_candle() {
    let mut rng = Pcg64::seed_from_u64(5);
    let cases = [
        (
            PoolCfg {
                kernel: [2, 2],
                stride: [2, 2],
                padding: [0; 4],
                ceil_mode: false,
                count_include_pad: true,
            },
            [2, 3, 8, 8],
        ),
        (
            PoolCfg {
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1; 4],
                ceil_mode: false,
                count_include_pad: true,
            },
            [2, 2, 7, 7],
        ),
        (
            PoolCfg {
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1; 4],
                ceil_mode: false,
                count_include_pad: false,
            },
            [1, 2, 6, 5],
        ),
        (
            PoolCfg {
                kernel: [2, 2],
                stride: [2, 2],
                padding: [0; 4],
                ceil_mode: true,
                count_include_pad: true,
            },
            [1, 2, 7, 7],
        ),
        (
            PoolCfg {
                kernel: [3, 3],
                stride: [3, 3],
                padding: [0; 4],
                ceil_mode: false,
                count_include_pad: true,
            },
            [2, 2, 14, 14],
        ),
        (
            // Asymmetric padding (TF "same"), ceil mode, padding excluded from the mean.
            PoolCfg {
                kernel: [3, 2],
                stride: [2, 3],
                padding: [0, 1, 2, 0],
                ceil_mode: true,
                count_include_pad: false,
            },
            [1, 3, 9, 10],
        ),
        // Strided column windows from the row's stride phases: no padding on an even
        // row; padding 2 (even) on an odd row; padding 1 (odd) with ceil mode reaching
        // past the row; padding 3 with a window of four.
        (
            PoolCfg {
                kernel: [3, 3],
                stride: [2, 2],
                padding: [0; 4],
                ceil_mode: false,
                count_include_pad: true,
            },
            [1, 2, 9, 10],
        ),
        (
            PoolCfg {
                kernel: [3, 5],
                stride: [1, 2],
                padding: [1, 2, 1, 2],
                ceil_mode: false,
                count_include_pad: true,
            },
            [1, 2, 6, 11],
        ),
        (
            PoolCfg {
                kernel: [2, 3],
                stride: [2, 2],
                padding: [0, 1, 0, 0],
                ceil_mode: true,
                count_include_pad: false,
            },
            [1, 2, 5, 8],
        ),
        (
            PoolCfg {
                kernel: [1, 4],
                stride: [1, 3],
                padding: [0, 3, 0, 1],
                ceil_mode: false,
                count_include_pad: true,
            },
            [1, 1, 3, 9],
        ),
        // A 1×1 window at stride 2 (a strided subsample: option-A shortcuts) on odd sides.
        (
            PoolCfg {
                kernel: [1, 1],
                stride: [2, 2],
                padding: [0; 4],
                ceil_mode: false,
                count_include_pad: true,
            },
            [2, 3, 7, 5],
        ),
    ];
    for (cfg, dims) in cases {
        for max in [true, false] {
            let x = rand_vec(&mut rng, dims.iter().product());
            let (ours, theirs) = both_backends_or_ours(&x, &dims, cfg, max);
            let nc = dims[0] * dims[1];
            let what = format!("{cfg:?} max={max}");
            let yref = naive_pool(&x, nc, dims[2], dims[3], &cfg, max);
            assert_close(&ours.0, &yref, 1e-5, &format!("{what} fwd"));
            let dy: Vec<f64> = (0..yref.len())
                .map(|i| ((i as f32 * 0.37).sin()) as f64)
                .collect();
            let fx = fd_grad(&x, &dy, &|xx| {
                naive_pool(xx, nc, dims[2], dims[3], &cfg, max)
            });
            assert_close(&ours.1[0], &fx, 1e-3, &format!("{what} dx fd"));
            if let Some(theirs) = theirs {
                assert_close(
                    &ours.0,
                    &theirs.0,
                    1e-6,
                    &format!("{what} vs reference fwd"),
                );
                // (candle's own max_pool2d gradient is 0.25x; the reference is not it.)
                assert_close(
                    &ours.1[0],
                    &theirs.1[0],
                    1e-5,
                    &format!("{what} vs reference grad"),
                );
            }
        }
    }
    // Many planes: the flat 2×2/2 max pool in several parallel chunks whose boundaries
    // fall inside planes (forward against the naive loop, gradient against the reference);
    // then rows of 25 and 32 outputs (a whole vector and a part; two whole vectors).
    for dims in [[4, 70, 24, 10], [2, 3, 6, 50], [1, 2, 4, 64]] {
        let cfg = cases[0].0;
        let x = rand_vec(&mut rng, dims.iter().product());
        let (ours, theirs) = both_backends_or_ours(&x, &dims, cfg, true);
        let yref = naive_pool(&x, dims[0] * dims[1], dims[2], dims[3], &cfg, true);
        assert_close(
            &ours.0,
            &yref,
            1e-6,
            &format!("flat 2x2 max pool fwd {dims:?}"),
        );
        let theirs = theirs.expect("reference run");
        assert_close(&ours.1[0], &theirs.1[0], 1e-5, "flat 2x2 max pool grad");
    }
}

type Run = (Vec<f64>, Vec<Vec<f64>>);

/// lopper's pooling kernel and the composed-op reference every other device runs (any
/// padding, stride and ceil mode since issue 21).
fn both_backends_or_ours(x: &[f64], dims: &[usize], cfg: PoolCfg, max: bool) -> (Run, Option<Run>) {
    let f = |t: &[Tensor]| kernels::pool2d(&t[0], cfg, max).unwrap();
    let [a, b] = both_backends(&[(x, dims)], &f);
    (a, Some(b))
}

#[test]
fn add_relu_matches_candle() {
    let mut rng = Pcg64::seed_from_u64(9);
    let dims = [3, 4, 5, 5];
    let a = rand_vec(&mut rng, 300);
    let b = rand_vec(&mut rng, 300);
    let [ours, theirs] = both_backends(&[(&a, &dims), (&b, &dims)], &|t| {
        kernels::add_relu(&t[0], &t[1]).unwrap()
    });
    assert_close(&ours.0, &theirs.0, 1e-7, "add_relu fwd");
    assert_close(&ours.1[0], &theirs.1[0], 1e-7, "add_relu da");
    assert_close(&ours.1[1], &theirs.1[1], 1e-7, "add_relu db");
}

#[test]
fn linear_matches_candle_and_finite_differences() {
    let mut rng = Pcg64::seed_from_u64(21);
    let (n, i, o) = (5, 7, 3);
    let x = rand_vec(&mut rng, n * i);
    let w = rand_vec(&mut rng, o * i);
    let b = rand_vec(&mut rng, o);
    let [ours, theirs] = both_backends(&[(&x, &[n, i]), (&w, &[o, i]), (&b, &[o])], &|t| {
        kernels::linear(&t[0], &t[1], Some(&t[2])).unwrap()
    });
    assert_close(&ours.0, &theirs.0, 1e-5, "linear fwd");
    for k in 0..3 {
        assert_close(&ours.1[k], &theirs.1[k], 1e-5, &format!("linear grad {k}"));
    }
    let naive = |x: &[f64], w: &[f64]| -> Vec<f64> {
        let mut y = vec![0.0; n * o];
        for r in 0..n {
            for c in 0..o {
                y[r * o + c] = b[c] + (0..i).map(|k| x[r * i + k] * w[c * i + k]).sum::<f64>();
            }
        }
        y
    };
    let dy: Vec<f64> = (0..n * o)
        .map(|k| ((k as f32 * 0.37).sin()) as f64)
        .collect();
    assert_close(
        &ours.1[0],
        &fd_grad(&x, &dy, &|xx| naive(xx, &w)),
        1e-4,
        "linear dx fd",
    );
    assert_close(
        &ours.1[1],
        &fd_grad(&w, &dy, &|ww| naive(&x, ww)),
        1e-4,
        "linear dw fd",
    );
}

/// Eval mode folds batch norm (and its ReLU) into the preceding conv; asking to keep the
/// conv outputs disables the folding, so both paths can be compared on a net with
/// non-trivial BN statistics, biases and depthwise convs.
#[test]
fn eval_batch_norm_folding_matches_the_unfolded_forward() {
    use lopper::exec::{forward, forward_with, ForwardOpts, Mode};
    use lopper::graph::ops::Op;
    for spec in ["resnet20@3x16x16", "mobilenetv2@3x16x16", "vgg11"] {
        let g = lopper::zoo::build(spec, 3).unwrap();
        let mut rng = Pcg64::seed_from_u64(4);
        for (k, v) in g.params() {
            let n = v.elem_count();
            let d: Vec<f32> = if k.ends_with("running_var") {
                (0..n).map(|_| rng.gen_range(0.5..2.0)).collect()
            } else if k.ends_with("running_mean") || k.ends_with(".bias") {
                (0..n).map(|_| rng.gen_range(-0.5..0.5)).collect()
            } else if k.contains("bn") && k.ends_with(".weight") {
                (0..n).map(|_| rng.gen_range(0.5..1.5)).collect()
            } else {
                continue;
            };
            v.set(&Tensor::from_vec(d, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let convs: Vec<usize> = (0..g.nodes.len())
            .filter(|&i| matches!(g.nodes[i].op, Op::Conv2d(_)))
            .collect();
        let mut dims = vec![4];
        dims.extend(g.input_shape());
        let x = Tensor::randn(0f32, 1., dims, &Device::Cpu).unwrap();
        let folded = v32(&forward(&g, &x, Mode::Eval).unwrap());
        let opts = ForwardOpts {
            keep: &convs,
            ..ForwardOpts::new(Mode::Eval)
        };
        let plain = v32(&forward_with(&g, &x, &opts).unwrap().outputs[0]);
        assert_close(&folded, &plain, 1e-4, spec);
    }
}

/// An eval pass without gradients detaches every value from candle's op graph: otherwise
/// each output records its inputs (the weights are variables) and every intermediate of
/// the pass stays alive until the end (EfficientNet-B0 at b64 peaked at 2.4 GB that way).
#[test]
fn eval_pass_values_do_not_record_their_inputs() {
    use lopper::exec::{forward, Mode};
    let g = lopper::zoo::build("mobilenetv2@3x16x16", 0).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 3, 16, 16), &Device::Cpu).unwrap();
    assert!(!forward(&g, &x, Mode::Eval).unwrap().track_op());
    // Training passes keep the record (the backward needs it).
    assert!(forward(&g, &x, Mode::Train).unwrap().track_op());
}

/// Ties (the zeros after a ReLU): the max-pool gradient goes to the first maximum of each
/// window, in lopper's kernel and in the reference other devices run, as in PyTorch.
#[test]
fn max_pool_ties_send_the_gradient_to_the_first_maximum() {
    let cfg = PoolCfg {
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0; 4],
        ceil_mode: false,
        count_include_pad: true,
    };
    let mut x = vec![0f64; 16];
    x[5] = 1.0; // window (0,0) has a unique maximum at (1,1)
    let (ours, theirs) = both_backends_or_ours(&x, &[1, 1, 4, 4], cfg, true);
    let theirs = theirs.unwrap();
    let dx_ours = &ours.1[0];
    let nonzero: Vec<usize> = (0..16).filter(|&i| dx_ours[i] != 0.0).collect();
    // Window (0,0) sends its gradient to 5, the unique maximum, but the upstream gradient
    // there is sin(0) = 0; the three all-zero windows send theirs to their first input.
    assert_eq!(nonzero, vec![2, 8, 10], "{dx_ours:?}");
    assert_eq!(dx_ours, &theirs.1[0]);
}
