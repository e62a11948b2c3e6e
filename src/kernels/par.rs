//! The kernels' parallel loops: a small spinning fork-join pool while an inference plan
//! runs, rayon otherwise.
//!
//! At batch 1 a forward pass is fifty to a hundred layers of 3–30 µs each. Rayon's idle
//! worker looks for work between `sched_yield` calls and falls asleep after ~15 µs
//! without any, so every layer paid a fork-join of 1–2 µs, and one after a gap (a layer
//! too small to split, the plan's own bookkeeping) a futex wake-up of ~10 µs, during
//! which the caller did the whole layer alone (a loop of 10 µs layers with 20 µs gaps
//! between them: 35 µs per layer on rayon against 27 here, where 25 is the ideal).
//! onnxruntime's pool spins in the same way.
//!
//! [`engaged`] marks the calling thread for the length of a plan run; its calls to
//! [`for_each`] and [`chunks_mut`] then publish the loop to `threads − 1` helper threads
//! that spin on it (for [`SPIN`] after the last loop, then park), and the caller takes
//! tasks too. Every other call (training, tests, library users outside a plan, a loop
//! inside a task) goes to rayon or runs inline, as before.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks: longer than the gaps between the layers
/// of a plan run and between back-to-back runs, and than the passes a plan runs alone
/// (`exec::threads`); short enough not to hold a core long after the last pass. A
/// helper parked during a pass run alone was woken by the next one, often onto the
/// caller's own core (the scheduler places a woken thread beside its waker), where it
/// helped no one until moved: with 300 µs, short benchmarks of LeNet-5 at batch 64 ran
/// at one thread's speed in a fifth of the processes (0.37 ms against 0.27); with 5 ms,
/// in none of 16.
const SPIN: Duration = Duration::from_millis(5);

thread_local! {
    /// The thread runs a plan (its loops go to the pool).
    static ENGAGED: Cell<bool> = const { Cell::new(false) };
    /// The thread is inside a task (its loops run inline).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    /// The thread runs [`alone`].
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// Participants a job's tasks are split between (the caller and up to this many − 1
/// helpers; more helpers take from the others' ranges only).
const RANGES: usize = 8;

/// One published loop, on the caller's stack while helpers may use it.
///
/// The tasks are cut into one contiguous range per participant (the caller's first),
/// each taken in order from its own cursor, then from the others' (the balance at the
/// end). Claiming from one shared counter interleaved the threads' tasks: MobileNetV2's
/// depthwise layers at batch 64 ran a third slower than rayon's halves, their memory
/// streams broken up between the cores.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    parts: usize,
    next: [AtomicUsize; RANGES],
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl Job<'_> {
    /// The end of range `r`.
    fn end(&self, r: usize) -> usize {
        (r + 1) * self.n / self.parts
    }
}

struct Pool {
    /// The published job (a `Job` erased to its address), or null.
    slot: AtomicPtr<()>,
    /// Helpers that have entered the published job and may still read it.
    entered: AtomicUsize,
    /// How many jobs were published (the current one's number while one is).
    epoch: AtomicUsize,
    helpers: Vec<Helper>,
}

struct Helper {
    thread: Thread,
    parked: AtomicBool,
}

static POOL: OnceLock<Option<Pool>> = OnceLock::new();

/// The pool with `threads − 1` helpers (rayon's thread count), none on one thread.
fn pool() -> Option<&'static Pool> {
    POOL.get_or_init(|| {
        let helpers = rayon::current_num_threads().saturating_sub(1);
        if helpers == 0 {
            return None;
        }
        // The helpers are started below and find the pool through `POOL` once it is set.
        let handles: Vec<Thread> = (0..helpers)
            .map(|h| {
                std::thread::Builder::new()
                    .name(format!("lopper-par-{h}"))
                    .stack_size(16 << 20)
                    .spawn(move || helper_main(h))
                    .expect("starting a kernel pool thread")
                    .thread()
                    .clone()
            })
            .collect();
        Some(Pool {
            slot: AtomicPtr::new(std::ptr::null_mut()),
            entered: AtomicUsize::new(0),
            epoch: AtomicUsize::new(0),
            helpers: handles
                .into_iter()
                .map(|thread| Helper {
                    thread,
                    parked: AtomicBool::new(false),
                })
                .collect(),
        })
    })
    .as_ref()
}

/// A helper: spin on the slot, take tasks of each job published, park when idle.
fn helper_main(h: usize) {
    let pool = loop {
        match POOL.get() {
            Some(Some(p)) => break p,
            Some(None) => return,
            None => std::thread::park_timeout(Duration::from_millis(1)),
        }
    };
    IN_TASK.with(|t| t.set(true));
    let me = &pool.helpers[h];
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    // The last job this helper entered, by its publication number: jobs are published
    // at the same stack address each time, so a helper that waited for the address to
    // change could miss the gap between back-to-back jobs and sit the next ones out.
    let mut last = 0;
    loop {
        let p = pool.slot.load(SeqCst);
        let e = pool.epoch.load(SeqCst);
        if !p.is_null() && e != last {
            pool.entered.fetch_add(1, SeqCst);
            // Still the job published as number `e` (the caller waits for `entered` to
            // fall back before it returns, so the job outlives this use).
            if pool.slot.load(SeqCst) == p && pool.epoch.load(SeqCst) == e {
                // SAFETY: see above; the pointer was published from a live `Job`.
                let job = unsafe { &*(p as *const Job) };
                run_tasks(job, h + 1);
                last = e;
            }
            pool.entered.fetch_sub(1, SeqCst);
            idle_since = Instant::now();
            continue;
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) {
            if idle_since.elapsed() > SPIN {
                me.parked.store(true, SeqCst);
                // A job published before the flag was set is seen here; one after it
                // unparks this thread (a token std keeps if it comes first).
                if pool.slot.load(SeqCst).is_null() {
                    std::thread::park();
                }
                me.parked.store(false, SeqCst);
                idle_since = Instant::now();
            } else if spins.is_multiple_of(16 * 1024) {
                // Let another runnable thread (a rayon worker) have the core now and then.
                std::thread::yield_now();
            }
        }
    }
}

/// Claims and runs tasks of `job` until none is left: from participant `me`'s own range
/// first, then from the others'.
fn run_tasks(job: &Job, me: usize) {
    for k in 0..job.parts {
        let r = (me + k) % job.parts;
        let end = job.end(r);
        loop {
            let i = job.next[r].fetch_add(1, SeqCst);
            if i >= end {
                break;
            }
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.f)(i))).is_err() {
                job.panicked.store(true, SeqCst);
            }
            job.done.fetch_add(1, SeqCst);
        }
    }
}

/// Runs `f` with the calling thread's loops on the spinning pool (an inference plan's
/// forward pass); nested calls keep the outer setting.
pub fn engaged<R>(f: impl FnOnce() -> R) -> R {
    let before = ENGAGED.with(|e| e.replace(true));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENGAGED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Runs `f` with the calling thread's loops inline (no helper takes part; the GEMM crate
/// runs single-threaded): the tasks are the same as on the pool, run one after another
/// (`exec::threads` picks this for whole passes where it measures faster).
pub fn alone<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_TASK.with(|t| t.set(self.0));
            ALONE.with(|a| a.set(self.1));
        }
    }
    let _restore = Restore(
        IN_TASK.with(|t| t.replace(true)),
        ALONE.with(|a| a.replace(true)),
    );
    f()
}

/// Whether the calling thread runs [`alone`] now.
pub fn is_alone() -> bool {
    ALONE.with(|a| a.get())
}

/// Whether the calling thread's loops run on the spinning pool now (never with
/// `LOPPER_SPIN=0`, for A/B runs against rayon).
pub(crate) fn on_pool() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    ENGAGED.with(|e| e.get())
        && !IN_TASK.with(|t| t.get())
        && !*OFF.get_or_init(|| std::env::var("LOPPER_SPIN").is_ok_and(|v| v == "0"))
}

/// `f(i)` for every `i < n`, in parallel: on the spinning pool inside [`engaged`], on
/// rayon elsewhere, inline inside a task.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync + Send) {
    if n == 0 {
        return;
    }
    if IN_TASK.with(|t| t.get()) || n == 1 {
        (0..n).for_each(f);
        return;
    }
    if on_pool() {
        if let Some(pool) = pool() {
            return publish(pool, n, &f);
        }
    }
    use rayon::prelude::*;
    (0..n).into_par_iter().for_each(f);
}

/// Publishes `f` over `0..n`, takes tasks with the helpers, and returns when all are done
/// and no helper still reads the job.
fn publish(pool: &Pool, n: usize, f: &(dyn Fn(usize) + Sync)) {
    let parts = (pool.helpers.len() + 1).min(RANGES).min(n);
    let job = Job {
        f,
        n,
        parts,
        next: std::array::from_fn(|r| AtomicUsize::new(r * n / parts)),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    };
    // The number first, then the job: a helper that sees the job sees its number.
    pool.epoch.fetch_add(1, SeqCst);
    pool.slot.store(&job as *const Job as *mut (), SeqCst);
    for h in &pool.helpers {
        if h.parked.load(SeqCst) {
            h.thread.unpark();
        }
    }
    IN_TASK.with(|t| t.set(true));
    run_tasks(&job, 0);
    IN_TASK.with(|t| t.set(false));
    // Every task is claimed: withdraw the job, then wait for the ones still running and
    // for the helpers that entered it.
    pool.slot.store(std::ptr::null_mut(), SeqCst);
    while job.done.load(SeqCst) < n || pool.entered.load(SeqCst) > 0 {
        std::hint::spin_loop();
    }
    if job.panicked.load(SeqCst) {
        panic!("a parallel kernel task panicked");
    }
}

/// A raw base pointer shared by tasks that touch disjoint chunks.
struct Base<T>(*mut T);
// SAFETY: each task makes a slice of its own chunk only.
unsafe impl<T: Send> Send for Base<T> {}
unsafe impl<T: Send> Sync for Base<T> {}

/// `f(i, chunk)` for the `size`-long chunks of `xs` (the last may be shorter), in
/// parallel as [`for_each`].
pub fn chunks_mut<T: Send>(xs: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    assert!(size > 0, "chunks of size 0");
    let len = xs.len();
    let base = Base(xs.as_mut_ptr());
    let base = &base;
    for_each(len.div_ceil(size), move |i| {
        let start = i * size;
        let end = (start + size).min(len);
        // SAFETY: chunk i is `start..end` of `xs`, disjoint from every other task's, and
        // `xs` is borrowed mutably for the whole call.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
        f(i, chunk)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Every index runs exactly once, on the pool (engaged, from a rayon worker as a plan
    /// runs) and off it, for counts around the task sizes; loops inside a task run inline.
    #[test]
    fn every_task_once() {
        crate::util::on_pool(|| {
            for engage in [true, false] {
                for n in [0, 1, 2, 3, 7, 64, 1000] {
                    let hits: Vec<AtomicU32> = (0..n * 3).map(|_| AtomicU32::new(0)).collect();
                    let body = || {
                        for_each(n, |i| {
                            hits[i].fetch_add(1, SeqCst);
                            // Nested: inline on the same thread.
                            for_each(2, |j| {
                                hits[n + 2 * i + j].fetch_add(1, SeqCst);
                            });
                        })
                    };
                    if engage {
                        engaged(body)
                    } else {
                        body()
                    }
                    assert!(
                        hits.iter().all(|h| h.load(SeqCst) == 1),
                        "n {n} engaged {engage}"
                    );
                }
            }
        });
    }

    /// The chunks cover the slice, the last one short, each with its index.
    #[test]
    fn chunks_cover_the_slice() {
        crate::util::on_pool(|| {
            engaged(|| {
                for (len, size) in [(0, 3), (10, 3), (12, 4), (1, 8), (1000, 7)] {
                    let mut xs = vec![0usize; len];
                    chunks_mut(&mut xs, size, |i, c| {
                        assert!(c.len() == size || (i + 1) * size >= len);
                        for (j, v) in c.iter_mut().enumerate() {
                            *v = i * size + j + 1;
                        }
                    });
                    assert!(
                        xs.iter().enumerate().all(|(j, &v)| v == j + 1),
                        "{len} {size}"
                    );
                }
            })
        });
    }

    /// A task's panic reaches the caller as a panic, and the pool keeps working after it.
    #[test]
    fn a_panicking_task_panics_the_caller() {
        crate::util::on_pool(|| {
            engaged(|| {
                let r = std::panic::catch_unwind(|| {
                    for_each(16, |i| {
                        if i == 9 {
                            panic!("task 9");
                        }
                    })
                });
                assert!(r.is_err());
                let count = AtomicU32::new(0);
                for_each(16, |_| {
                    count.fetch_add(1, SeqCst);
                });
                assert_eq!(count.load(SeqCst), 16);
            })
        });
    }
}
