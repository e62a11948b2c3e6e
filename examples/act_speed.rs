//! Throughput of the element-wise activations (`kernels::act::apply`) over a buffer that
//! stays in L2 and one that does not, one thread: `cargo run --release --example act_speed`.

use lopper::graph::ops::ActivationKind as A;
use lopper::kernels::act;
use std::time::Instant;

/// Activation buffers start on cache lines (`lopper::util::aligned`).
#[global_allocator]
static ALLOC: lopper::util::aligned::CacheAligned = lopper::util::aligned::CacheAligned;

fn main() {
    let kinds = [
        ("relu", A::Relu),
        ("silu", A::Silu),
        ("sigmoid", A::Sigmoid),
        ("hardswish", A::HardSwish),
        ("tanh", A::Tanh),
        ("gelu", A::Gelu),
    ];
    for len in [1usize << 16, 1 << 20] {
        let src: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 2001) as f32 * 0.01 - 10.0)
            .collect();
        let mut buf = src.clone();
        for (name, k) in kinds {
            let reps = (1usize << 26) / len;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    buf.copy_from_slice(&src);
                    act::apply(k, &mut buf);
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            let mut copy = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    buf.copy_from_slice(&src);
                    std::hint::black_box(&mut buf);
                }
                copy = copy.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            let t = best - copy;
            println!(
                "{len:>8} {name:10} {:8.1} µs  {:6.2} G/s (copy {:.1} µs subtracted)",
                t * 1e6,
                len as f64 / t / 1e9,
                copy * 1e6
            );
        }
    }
}
