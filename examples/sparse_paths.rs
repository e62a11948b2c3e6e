//! Per-layer A/B of the sparse 1×1 conv against the dense path, on MobileNetV2 (CIFAR)'s
//! pointwise shapes at 90 % unstructured sparsity (the smallest magnitudes of a fixed
//! pseudo-random weight zeroed), with the ReLU6 or no activation a plan fuses, best of six
//! alternating rounds, engaged on the kernels' pool as a plan's forward is.
//!
//! `cargo run --release --example sparse_paths [b64|b8|b1]` — the per-shape numbers behind
//! `kernels/sparse.rs` (BENCHMARKS §27). `SPARSE_PATHS_ONLY=i` runs the i-th shape only,
//! `SPARSE_PATHS_DENSITY=0.2` another density. `SPARSE_PATHS_FUSED=1`: each conv as it
//! runs inside a fused inverted-residual step (`kernels::pw_dw`, maps of more than 16
//! positions): one image per task, its input and output in the thread's own buffers
//! (hot in L2, as the step's depthwise output and expanded tensor are), dense on the
//! packed one-image kernels, sparse on `SparsePointwise`.

use candle_core::{Device, Tensor};
use lopper::graph::csr::CsrMatrix;
use lopper::graph::ops::ActivationKind;
use lopper::kernels::conv::{conv_forward_packed, ConvCfg, Epilogue, PackedWeight};
use lopper::kernels::csr::SparseWeight;
use lopper::kernels::sparse::{conv2d, SparseEpilogue};
use lopper::kernels::sparse_pw::SparsePointwise;
use std::cell::RefCell;
use std::time::Instant;

/// Activation buffers start on cache lines (`lopper::util::aligned`).
#[global_allocator]
static ALLOC: lopper::util::aligned::CacheAligned = lopper::util::aligned::CacheAligned;

/// `(in channels, map side, out channels, ReLU6)`: every 1×1 conv of MobileNetV2 (CIFAR).
const SHAPES: &[(usize, usize, usize, bool)] = &[
    (32, 32, 16, false),
    (16, 32, 96, true),
    (96, 32, 24, false),
    (24, 32, 144, true),
    (144, 32, 24, false),
    (144, 16, 32, false),
    (32, 16, 192, true),
    (192, 16, 32, false),
    (192, 8, 64, false),
    (64, 8, 384, true),
    (384, 8, 64, false),
    (384, 8, 96, false),
    (96, 8, 576, true),
    (576, 8, 96, false),
    (576, 4, 160, false),
    (160, 4, 960, true),
    (960, 4, 160, false),
    (960, 4, 320, false),
    (320, 4, 1280, true),
];

/// Overwrites `junk` (evicting the caches' contents), on both threads.
fn flush(junk: &mut [u8]) {
    if !junk.is_empty() {
        lopper::kernels::par::chunks_mut(junk, 1 << 20, |i, c| c.fill(i as u8));
    }
}

fn main() {
    // As the CLI: freed buffers stay in the process (the sparse path allocates its output).
    lopper::util::tune_runtime();
    lopper::util::on_pool(|| lopper::kernels::par::engaged(run));
}

fn run() {
    // `b<N>`: batch N (64 by default).
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.strip_prefix('b').and_then(|v| v.parse().ok()))
        .unwrap_or(64);
    let only: Option<usize> = std::env::var("SPARSE_PATHS_ONLY")
        .ok()
        .and_then(|v| v.parse().ok());
    let density: f32 = std::env::var("SPARSE_PATHS_DENSITY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.1);
    let how = if std::env::var_os("SPARSE_PATHS_FUSED").is_some() {
        " (per image as in the fused steps on maps > 16 positions)"
    } else {
        ""
    };
    println!("b{n}, density {density}{how}: best of 6 alternating rounds, ms");
    println!(
        "{:>28} {:>9} {:>9} {:>7}",
        "shape", "dense", "sparse", "ratio"
    );
    let (mut sum_d, mut sum_s) = (0.0, 0.0);
    // `SPARSE_PATHS_COLD=1`: 64 MB written between calls (inputs and weights from memory,
    // as in a model whose layers' activations outgrow the caches); untimed.
    let cold = std::env::var_os("SPARSE_PATHS_COLD").is_some();
    // `SPARSE_PATHS_SCALE=10`: ten times the repetitions (profiling one shape).
    let scale: f64 = std::env::var("SPARSE_PATHS_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let fused = std::env::var_os("SPARSE_PATHS_FUSED").is_some();
    let mut junk = vec![0u8; if cold { 64 << 20 } else { 0 }];
    for (si, &(c, hw, o, relu6)) in SHAPES.iter().enumerate() {
        if only.is_some_and(|i| i != si) {
            continue;
        }
        let cfg = ConvCfg {
            stride: [1, 1],
            padding: [0; 4],
            dilation: [1, 1],
            groups: 1,
        };
        let g = cfg.geo(&[n, c, hw, hw], &[o, c, 1, 1]).unwrap();
        let xs: Vec<f32> = (0..n * c * hw * hw)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let mut w: Vec<f32> = (0..o * c)
            .map(|i| ((i.wrapping_mul(2654435761) >> 7) % 1000) as f32 * 0.001 - 0.5)
            .collect();
        let mut mags: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        mags.sort_by(f32::total_cmp);
        let cut = mags[((1.0 - density) * mags.len() as f32) as usize];
        w.iter_mut()
            .filter(|v| v.abs() < cut)
            .for_each(|v| *v = 0.0);
        let act = relu6.then_some(ActivationKind::Relu6);
        let bias = vec![0.1f32; o];
        let sw = SparseWeight::new(CsrMatrix::from_dense(&w, o, c).unwrap());
        let x = Tensor::from_vec(xs.clone(), (n, c, hw, hw), &Device::Cpu).unwrap();
        let packed = PackedWeight::for_geo(&g, &w);
        let epi = Epilogue {
            bias: bias.clone(),
            act,
        };
        let sepi = SparseEpilogue {
            scale: None,
            bias: Some(&bias),
            act,
        };
        let mut out = vec![0f32; n * o * hw * hw];
        let macs = n * o * c * hw * hw;
        // The fused step's way: per image, thread-local input and output.
        let g1 = cfg.geo(&[1, c, hw, hw], &[o, c, 1, 1]).unwrap();
        let packed1 = PackedWeight::for_geo(&g1, &w);
        let sp1 = SparsePointwise::new(sw.csr.clone(), hw * hw, None, &bias, act);
        thread_local! {
            static BUF: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
        }
        let per_image = |sparse: bool| {
            lopper::kernels::par::for_each(n, |_| {
                BUF.with(|b| {
                    let (xi, oi) = &mut *b.borrow_mut();
                    if xi.len() != c * hw * hw || oi.len() != o * hw * hw {
                        *xi = xs[..c * hw * hw].to_vec();
                        *oi = vec![0.0; o * hw * hw];
                    }
                    if sparse {
                        sp1.run(xi, oi, None);
                    } else {
                        conv_forward_packed(&g1, xi, &w, packed1.as_ref(), oi, Some(&epi), None);
                    }
                })
            })
        };
        let fused = fused && hw * hw > 16;
        let reps = (scale * 1e9 / macs as f64).ceil() as usize;
        let mut best = [f64::MAX; 2];
        for _ in 0..6 {
            let mut t = 0.0;
            for _ in 0..reps {
                flush(&mut junk);
                let t0 = Instant::now();
                if fused {
                    per_image(false);
                } else {
                    conv_forward_packed(&g, &xs, &w, packed.as_ref(), &mut out, Some(&epi), None);
                }
                t += t0.elapsed().as_secs_f64();
            }
            best[0] = best[0].min(t / reps as f64);
            let mut t = 0.0;
            for _ in 0..reps {
                flush(&mut junk);
                let t0 = Instant::now();
                if fused {
                    per_image(true);
                } else {
                    std::hint::black_box(conv2d(&x, &sw, &[o, c, 1, 1], cfg, &sepi, None).unwrap());
                }
                t += t0.elapsed().as_secs_f64();
            }
            best[1] = best[1].min(t / reps as f64);
        }
        sum_d += best[0];
        sum_s += best[1];
        println!(
            "{:>28} {:9.4} {:9.4} {:7.2}",
            format!("[{n}, {c}, {hw}, {hw}]->{o}"),
            best[0] * 1e3,
            best[1] * 1e3,
            best[0] / best[1]
        );
    }
    println!(
        "{:>28} {:9.4} {:9.4} {:7.2}",
        "sum",
        sum_d * 1e3,
        sum_s * 1e3,
        sum_d / sum_s
    );
}
