//! Per-layer A/B of lopper's convolution paths: every conv shape below runs with the
//! register tiles (and the other direct paths that follow the tile mode: thin batch-1
//! products, flattened depthwise) and with them off (im2col + GEMM, the per-row
//! depthwise), alternately, best of six rounds; forward and input gradient.
//!
//! `cargo run --release --example conv_paths [dense|pruned|thin|depthwise|…]` — the numbers behind
//! the rules in `kernels/conv_tiles.rs` and `kernels/dw_flat.rs` (BENCHMARKS §19).

use lopper::kernels::conv::{
    conv_backward_input, conv_backward_weight, conv_forward, conv_forward_packed, Epilogue,
    PackedWeight,
};
use lopper::kernels::conv_tiles::{set_mode, TileMode};
use lopper::kernels::im2col::Geo;
use lopper::kernels::panel;
use std::time::Instant;

/// Activation buffers start on cache lines (`lopper::util::aligned`).
#[global_allocator]
static ALLOC: lopper::util::aligned::CacheAligned = lopper::util::aligned::CacheAligned;

/// `(batch, in channels, map side, out channels, stride)`.
type Shape = (usize, usize, usize, usize, usize);

const DENSE: &[Shape] = &[
    (64, 16, 32, 16, 1),
    (64, 32, 16, 32, 1),
    (64, 64, 8, 64, 1),
    (64, 32, 32, 32, 2),
    (64, 64, 16, 128, 1),
    (64, 256, 8, 256, 1),
    (1, 64, 56, 64, 1),
    // Batch-1 CIFAR ResNet stages.
    (1, 16, 32, 16, 1),
    (1, 32, 16, 32, 1),
    (1, 64, 8, 64, 1),
    (1, 256, 14, 256, 1),
    (1, 512, 7, 512, 1),
    (8, 64, 56, 64, 1),
    (8, 512, 7, 512, 1),
    (64, 512, 4, 512, 1),
    (64, 512, 2, 512, 1),
    (8, 256, 14, 256, 1),
    (8, 128, 28, 128, 1),
    (8, 256, 28, 256, 2),
    (8, 64, 56, 128, 2),
    (8, 128, 56, 128, 2),
    (1, 128, 28, 256, 2),
    // ResNet-50's strided 3×3 convs at batch 1.
    (1, 128, 56, 128, 2),
    (1, 256, 28, 256, 2),
    (1, 512, 14, 512, 2),
    // The digit CNN (MNIST) at batch 64.
    (64, 32, 28, 32, 1),
    (64, 32, 14, 64, 1),
    (64, 64, 14, 64, 1),
];

/// Pruned widths (`--round-to 8`): output channels that fill part of a 16-lane block.
const PRUNED: &[Shape] = &[
    (1, 40, 56, 40, 1),
    (8, 40, 56, 40, 1),
    (1, 88, 28, 72, 1),
    (1, 136, 14, 152, 1),
    (64, 24, 32, 40, 1),
    (64, 40, 16, 40, 1),
    (64, 32, 8, 40, 1),
    (64, 48, 8, 48, 1),
    (64, 24, 32, 40, 2),
    (8, 72, 56, 72, 2),
];

const THIN: &[Shape] = &[
    (1, 256, 4, 512, 1),
    (1, 512, 4, 512, 1),
    (1, 512, 2, 512, 1),
];

const POINTWISE: &[Shape] = &[
    (8, 16, 56, 64, 1),
    (8, 24, 28, 72, 1),
    (8, 72, 28, 24, 1),
    (8, 40, 14, 240, 1),
    (8, 240, 14, 40, 1),
    (8, 96, 7, 576, 1),
    (8, 576, 7, 96, 1),
    (64, 16, 32, 96, 1),
    (64, 144, 16, 32, 1),
    (64, 384, 8, 64, 1),
    (64, 960, 4, 320, 1),
    (8, 64, 56, 256, 1),
    (8, 256, 56, 64, 1),
    (8, 512, 7, 2048, 1),
    // Batch 1 (EfficientNet-B0's expansions and projections).
    (1, 16, 112, 96, 1),
    (1, 16, 112, 64, 1),
    (1, 16, 112, 16, 1),
    (1, 32, 112, 16, 1),
    (1, 112, 14, 672, 1),
    (1, 192, 7, 1152, 1),
    (1, 1152, 7, 192, 1),
    (1, 80, 14, 480, 1),
    (1, 40, 28, 240, 1),
    (1, 24, 56, 144, 1),
    // Batch-1 projections back to few channels (MobileNetV3, EfficientNet).
    (1, 72, 56, 24, 1),
    (1, 120, 28, 40, 1),
    (1, 240, 14, 40, 1),
    (1, 480, 14, 80, 1),
    (1, 672, 14, 112, 1),
    (1, 960, 7, 160, 1),
    // ResNet-50 at batch 8 and 1 (bottleneck 1×1 convs).
    (8, 128, 28, 512, 1),
    (8, 256, 14, 1024, 1),
    (8, 1024, 14, 256, 1),
    (8, 2048, 7, 512, 1),
    (1, 64, 56, 256, 1),
    (1, 256, 14, 1024, 1),
    (1, 512, 7, 2048, 1),
    (1, 2048, 7, 512, 1),
    (1, 256, 56, 64, 1),
    (1, 512, 28, 128, 1),
    (1, 1024, 14, 256, 1),
    // EfficientNet-B0 at batch 8.
    (8, 1152, 7, 192, 1),
    (8, 112, 14, 672, 1),
    (8, 672, 14, 112, 1),
];

/// 7×7 stride-2 stems (ResNets at 224).
const STEM: &[Shape] = &[(1, 3, 224, 64, 2), (8, 3, 224, 64, 2)];

/// 3×3 stride-2 RGB stems (MobileNets, EfficientNet at 224).
const STEM3: &[Shape] = &[
    (1, 3, 224, 16, 2),
    (1, 3, 224, 32, 2),
    (8, 3, 224, 16, 2),
    (8, 3, 224, 32, 2),
    // First convs of the CIFAR and MNIST nets (stride 1).
    (64, 3, 32, 16, 1),
    (1, 3, 32, 16, 1),
    (64, 1, 28, 32, 1),
    (1, 1, 28, 32, 1),
    // A pruned MobileNetV3 stem (16 channels rounded to 8).
    (8, 3, 224, 8, 2),
];

const DEPTHWISE: &[Shape] = &[
    (64, 96, 32, 96, 1),
    (64, 144, 16, 144, 1),
    (64, 384, 8, 384, 1),
    (64, 960, 4, 960, 1),
    (8, 96, 112, 96, 1),
    (8, 240, 28, 240, 1),
    (8, 480, 14, 480, 1),
    (8, 960, 7, 960, 1),
    (8, 144, 56, 144, 2),
    (8, 240, 28, 240, 2),
    (8, 672, 14, 672, 2),
    (1, 672, 14, 672, 1),
    (1, 32, 112, 32, 1),
    // Batch-1 stride-2 layers of the ImageNet mobile nets at 224.
    (1, 16, 112, 16, 2),
    (1, 64, 112, 64, 2),
    (1, 96, 112, 96, 2),
    (8, 96, 112, 96, 2),
    (8, 64, 112, 64, 2),
    (1, 72, 56, 72, 2),
    (1, 144, 56, 144, 2),
    (1, 96, 28, 96, 2),
    (1, 288, 14, 288, 2),
    (1, 240, 28, 240, 2),
    // Batch-1 56×56, 28×28 and 14×14 maps at stride 1 (MobileNetV3-large,
    // EfficientNet-B0).
    (1, 144, 56, 144, 1),
    (1, 120, 28, 120, 1),
    (1, 480, 14, 480, 1),
    // Batch-1 small maps of MobileNetV2 (CIFAR).
    (1, 960, 4, 960, 1),
    (1, 384, 8, 384, 1),
    (1, 576, 8, 576, 2),
];

/// A 3×3 conv with padding 1 (depthwise: one group per channel), or a 1×1 conv.
fn geo(&(n, c, hw, o, s): &Shape, depthwise: bool, k: usize) -> Geo {
    let pad = k / 2;
    let oh = (hw + 2 * pad - k) / s + 1;
    Geo {
        n,
        c,
        h: hw,
        w: hw,
        o,
        kh: k,
        kw: k,
        oh,
        ow: oh,
        sh: s,
        sw: s,
        pt: pad,
        pl: pad,
        dh: 1,
        dw: 1,
        groups: if depthwise { c } else { 1 },
    }
}

fn main() {
    // On a pool thread, as `lopper bench` runs a plan: from outside the pool every
    // parallel loop is injected and the caller sleeps on a futex (tens of µs a call).
    // Engaged as an inference plan's forward is (its loops on the spinning pool).
    lopper::util::on_pool(|| lopper::kernels::par::engaged(paths));
}

fn paths() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "dense".into());
    let (shapes, depthwise) = match which.as_str() {
        "dense" => (DENSE, false),
        "thin" => (THIN, false),
        "pruned" => (PRUNED, false),
        "depthwise" | "depthwise5" => (DEPTHWISE, true),
        "pointwise" => (POINTWISE, false),
        "stem" => (STEM, false),
        "stem3" => (STEM3, false),
        other => {
            eprintln!("unknown shape set '{other}': dense, pruned, thin, depthwise, depthwise5, pointwise, stem or stem3");
            std::process::exit(2);
        }
    };
    println!("{which}: best of 6 alternating rounds, ms (GFLOP/s)");
    // `CONV_PATHS_ONLY=i`: only the i-th shape of the set (profiling one layer).
    let only: Option<usize> = std::env::var("CONV_PATHS_ONLY")
        .ok()
        .and_then(|v| v.parse().ok());
    // `CONV_PATHS_FWD_ONLY=1`: forward timings only (profiling a forward path).
    let fwd_only = std::env::var_os("CONV_PATHS_FWD_ONLY").is_some();
    for (si, s) in shapes.iter().enumerate() {
        if only.is_some_and(|o| o != si) {
            continue;
        }
        let pointwise = which == "pointwise";
        let k = match which.as_str() {
            "pointwise" => 1,
            "depthwise5" => 5,
            "stem" => 7,
            "stem3" => 3,
            _ => 3,
        };
        let g = geo(s, depthwise, k);
        // 1×1 convs are GEMMs by rule: compare the tiles forced against that.
        // `CONV_PATHS_FORCE=chanvec`: the channel-vector tiles forced against the rule.
        let modes = if std::env::var("CONV_PATHS_FORCE").is_ok_and(|v| v == "chanvec") {
            [TileMode::ChanVec, TileMode::Auto]
        } else if pointwise || which.starts_with("stem") {
            [TileMode::Always, TileMode::Auto]
        } else {
            [TileMode::Auto, TileMode::Off]
        };
        let k = g.k();
        let x: Vec<f32> = (0..g.n * g.c * g.h * g.w)
            .map(|i| (i * 7 % 13) as f32 * 0.1)
            .collect();
        let w: Vec<f32> = (0..g.o * k).map(|i| (i * 5 % 11) as f32 * 0.01).collect();
        let dy: Vec<f32> = (0..g.n * g.o * g.p())
            .map(|i| (i * 3 % 7) as f32 * 0.1)
            .collect();
        let mut out = vec![0f32; g.n * g.o * g.p()];
        let macs = g.n * g.o * k * g.p();
        let reps = (2e9 / macs as f64).ceil() as usize;
        let mut best = [[f64::MAX; 2]; 2];
        let mut wgrad = [f64::MAX; 2];
        // The 1×1 set: the register-tile panels with the weight packed once (as an eval
        // plan has it; `CONV_PATHS_PANEL=unpacked`: packed per call) against the GEMM
        // paths with the panels off.
        let prepacked = std::env::var("CONV_PATHS_PANEL").map_or(true, |v| v != "unpacked");
        // Other sets: the weights packed once where an eval plan packs them (the
        // channel-vector tiles, depthwise vectors), in the first mode only.
        set_mode(modes[0]);
        panel::set_enabled(true);
        let packed = PackedWeight::for_geo(&g, &w).filter(|_| prepacked);
        // `CONV_PATHS_EPI=relu`: the first mode with a bias and ReLU epilogue (as a plan
        // fuses them), through the packed entry point.
        let epi = std::env::var("CONV_PATHS_EPI")
            .is_ok_and(|v| v == "relu")
            .then(|| Epilogue {
                bias: vec![0.1; g.o],
                act: Some(lopper::graph::ops::ActivationKind::Relu),
            });
        for _ in 0..6 {
            for (i, mode) in modes.into_iter().enumerate() {
                set_mode(mode);
                if pointwise {
                    panel::set_enabled(i == 0);
                }
                let t = Instant::now();
                for _ in 0..reps {
                    if i == 0 && (packed.is_some() || epi.is_some()) {
                        conv_forward_packed(
                            &g,
                            &x,
                            &w,
                            packed.as_ref(),
                            &mut out,
                            epi.as_ref(),
                            None,
                        );
                    } else {
                        conv_forward(&g, &x, &w, &mut out);
                    }
                }
                best[0][i] = best[0][i].min(t.elapsed().as_secs_f64() / reps as f64);
                if fwd_only {
                    continue;
                }
                let t = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(conv_backward_input(&g, &dy, &w));
                }
                best[1][i] = best[1][i].min(t.elapsed().as_secs_f64() / reps as f64);
                let t = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(conv_backward_weight(&g, &x, &dy));
                }
                wgrad[i] = wgrad[i].min(t.elapsed().as_secs_f64() / reps as f64);
            }
        }
        set_mode(TileMode::Auto);
        panel::set_enabled(true);
        let gf = |t: f64| 2.0 * macs as f64 / t / 1e9;
        println!(
            "n{} c{} {}x{} o{} s{}: forward {:.3} ({:.0}) vs off {:.3} ({:.0}) | input grad {:.3} vs off {:.3} | weight grad {:.3} ({:.0}) vs off {:.3} ({:.0})",
            s.0,
            s.1,
            s.2,
            s.2,
            s.3,
            s.4,
            best[0][0] * 1e3,
            gf(best[0][0]),
            best[0][1] * 1e3,
            gf(best[0][1]),
            best[1][0] * 1e3,
            best[1][1] * 1e3,
            wgrad[0] * 1e3,
            gf(wgrad[0]),
            wgrad[1] * 1e3,
            gf(wgrad[1])
        );
    }
}
