//! Whether an inference plan's passes use the thread pool or run on the calling thread
//! alone: chosen by measuring both, and re-measured now and then.
//!
//! Splitting a layer across cores pays when the work saved exceeds the cost of moving
//! its data between them, and that cost is not a constant of the CPU: on the 2-vCPU
//! cloud machines of the benchmarks a round trip between the two cores measured 50 ns in
//! some hours and 350–700 ns in others (the host placing them on one core complex or on
//! two). In the slow hours ResNet-56 at batch 1 ran 1.7 ms on two threads against 1.2 on
//! one, its 10–20 µs layers waiting on the other core's caches; in the quiet hours two
//! threads ran it in 0.85. A fixed size rule is wrong in one of the two; the plan times
//! both instead.
//!
//! A plan alternates between the two modes for its first passes, then takes the one with
//! the lower running average and tries the other once every [`PROBE`] passes, so a change
//! of conditions is noticed within a few hundred passes. The choice is per pass, not per
//! node: timed per node, a layer run alone paid for pulling the previous layer's output
//! out of the other core's cache, and the per-node choices came out slower than the pool
//! alone (MobileNetV3-small at batch 1: 0.68 ms against 0.63). The kernels
//! split their work the same way in both modes (the thread count they see is unchanged;
//! only who runs the tasks differs), so results are bit-identical either way.
//! `LOPPER_TUNE=0` keeps every pass on the pool (A/B runs).

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Instant;

/// First passes not timed (the plan packs weights and its buffers are first touched).
const SKIP: u32 = 3;
/// Passes in each mode before the averages decide (the fastest of them counts).
const WARM: u32 = 3;
/// Passes after which a plan has chosen its mode: a benchmark's warm-up covers them, so
/// that its timed steps are the steady state rather than the alternation.
pub const SETTLE: u32 = SKIP + 2 * WARM + 1;
/// Passes longer than this on the pool stay there: their layers are long enough for the
/// split to pay whatever the hand-off costs (ResNet-50 at batch 1 in the slow hours:
/// 23.5 ms on two threads, 36 on one), and a few passes in the slower mode would show
/// in short benchmarks.
const GATE_NS: u32 = 5_000_000;
/// Once decided, one pass in this many tries the other mode; before that, the passes at
/// 2, 4, 8, … 64 after the decision do (a warm-up in a bad minute of the host — the other
/// core stolen for a few hundred µs — must not fix the mode for a whole short run: the
/// pruned MLP at b64 ran 0.26 or 0.47 ms from one process to the next).
const PROBE: u32 = 128;

/// A plan's record: running averages of a pass's time (ns) in each mode, and the pass
/// count (shared by concurrent passes: relaxed atomics, a heuristic). Off (every pass on
/// the pool) unless made [`Threads::on`].
#[derive(Debug, Default)]
pub struct Threads {
    on: bool,
    pool_ns: AtomicU32,
    solo_ns: AtomicU32,
    runs: AtomicU32,
}

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LOPPER_TUNE").is_ok_and(|v| v == "0"))
        && rayon::current_num_threads() > 1
}

impl Threads {
    /// A record that chooses.
    pub fn on() -> Threads {
        Threads {
            on: true,
            ..Threads::default()
        }
    }

    /// Runs pass `f`, on the pool or alone as the record says, and records its time.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        if !self.on || !enabled() {
            return f();
        }
        let r = self.runs.fetch_add(1, Relaxed);
        if r < SKIP {
            return f();
        }
        let r = r - SKIP;
        let (pool, solo) = (self.pool_ns.load(Relaxed), self.solo_ns.load(Relaxed));
        // Pass 0 on the pool, then WARM in each mode alternately (alone first); long
        // passes stay on the pool.
        let warm = r <= 2 * WARM;
        let long = pool > GATE_NS;
        let probe = !warm && is_probe(r - 2 * WARM);
        let alone = if long || r == 0 {
            false
        } else if warm {
            r % 2 == 1
        } else {
            // Alone only when 10 % faster: the pool is the mode the kernels are written
            // for, and a close call is noise.
            ((solo as u64) * 10 < (pool as u64) * 9) != probe
        };
        let t = Instant::now();
        let out = if alone {
            crate::kernels::par::alone(f)
        } else {
            f()
        };
        let ns = t.elapsed().as_nanos().min(u32::MAX as u128) as u32;
        let avg = if alone { &self.solo_ns } else { &self.pool_ns };
        let old = avg.load(Relaxed);
        let new = if old == 0 {
            ns.max(1)
        } else if warm {
            // The fastest pass of the warm-up: robust to one slow pass.
            old.min(ns.max(1))
        } else if probe {
            // A probe is rare: it moves the other mode's average half way, so that a
            // change of conditions switches the choice within a few probes.
            ((old as u64 + ns.min(old.saturating_mul(4)) as u64) / 2).max(1) as u32
        } else {
            update(old, ns)
        };
        avg.store(new, Relaxed);
        out
    }
}

/// Whether the `k`-th pass after the warm-up tries the other mode: early ones at powers of
/// two, then every [`PROBE`]th.
fn is_probe(k: u32) -> bool {
    ((2..PROBE).contains(&k) && k.is_power_of_two()) || k.is_multiple_of(PROBE)
}

/// The running average after sample `ns`: an eighth of the way to it, the sample capped
/// at four times the average (a preempted run should not decide alone). The first
/// sample sets it.
fn update(old: u32, ns: u32) -> u32 {
    if old == 0 {
        return ns.max(1);
    }
    let s = ns.min(old.saturating_mul(4)) as i64;
    let o = old as i64;
    (o + (s - o) / 8).clamp(1, u32::MAX as i64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_moves_an_eighth_and_caps_outliers() {
        assert_eq!(update(0, 800), 800);
        assert_eq!(update(800, 1600), 900);
        assert_eq!(update(800, 0), 700);
        // 100 µs against an 8 µs average counts as 32 µs.
        assert_eq!(update(8_000, 100_000), 11_000);
    }

    /// The faster mode wins after the warm-up; the other is still tried every PROBE runs.
    #[test]
    fn picks_the_faster_mode_and_probes() {
        crate::util::on_pool(|| {
            if rayon::current_num_threads() < 2 || !enabled() {
                return;
            }
            let t = Threads::on();
            let mut modes = Vec::new();
            for _ in 0..(SKIP + 2 * WARM + 1 + 4 * PROBE) {
                t.run(|| {
                    let alone = crate::kernels::par::is_alone();
                    modes.push(alone);
                    // Alone is made the slow mode here.
                    if alone {
                        std::thread::sleep(std::time::Duration::from_micros(300));
                    }
                });
            }
            let after: Vec<bool> = modes[(SKIP + 2 * WARM + 1) as usize..].to_vec();
            let alone_runs = after.iter().filter(|&&a| a).count();
            // 2, 4, … 64 after the warm-up, then every PROBE: 6 + 4.
            assert!((9..=11).contains(&alone_runs), "{alone_runs} probes");
            assert!(modes[..(SKIP + 2 * WARM + 1) as usize].iter().any(|&a| a));
        });
    }

    /// A pass gives the same bits on the pool and alone (the claim the choice rests on):
    /// every kernel of a CIFAR ResNet and a MobileNetV2 at batch 1 and 3.
    #[test]
    fn alone_is_bit_identical() {
        use crate::exec::{Mode, Plan, PlanOpts};
        const _: () = assert!(SKIP >= 2);
        use candle_core::{Device, Tensor};
        crate::util::on_pool(|| {
            let models = [
                crate::zoo::resnet_cifar(20, &[3, 32, 32], 10, 7).unwrap(),
                crate::zoo::mobilenet_v2(&[3, 32, 32], 10, 7).unwrap(),
            ];
            for g in &models {
                for n in [1, 3] {
                    let x = Tensor::randn(0f32, 1.0, (n, 3, 32, 32), &Device::Cpu).unwrap();
                    let plan = Plan::new(g, Mode::Eval, &PlanOpts::default()).unwrap();
                    // The plan's first passes (fewer than SKIP + 1) run on the pool unless
                    // made to run alone; the first packs the weights the others use.
                    let run = || plan.run_inputs(g, &[&x], &Default::default()).unwrap();
                    run();
                    {
                        let a = run().outputs[0]
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap();
                        let b = crate::kernels::par::alone(run).outputs[0]
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap();
                        let d = a
                            .iter()
                            .zip(&b)
                            .map(|(p, q)| (p - q).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "{} at batch {n}: differs by up to {d}",
                            g.nodes.len()
                        );
                    }
                }
            }
        });
    }
}
