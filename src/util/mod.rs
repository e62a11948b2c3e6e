//! Small shared helpers: atomic file writes and raw CPU tensor access.

pub mod aligned;
pub mod progress;

pub use progress::{Lines, Progress, Silent};

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename.
/// A crash leaves either the old file or the new one, never half a file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let fname = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    remove_stale_temps(dir, &fname.to_string_lossy());
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        fname.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}

/// Removes `.{fname}.tmp{PID}` files left by writers that died (kill -9, power loss)
/// before renaming: a process `PID` that no longer exists will never finish them. Files
/// of live processes (a concurrent writer) are left alone.
fn remove_stale_temps(dir: &Path, fname: &str) {
    let prefix = format!(".{fname}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether a process with this id exists (Linux: `kill(pid, 0)` fails with ESRCH only
/// for a missing process). Elsewhere every process is assumed alive.
pub fn process_alive(pid: i32) -> bool {
    #[cfg(unix)]
    {
        if pid <= 0 {
            return false;
        }
        // SAFETY: signal 0 only checks for existence and permission.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Checks, before any work starts, that `path` can be written: its directory exists (or
/// can be made) and accepts a new file. Long runs call this for every output first, so a
/// read-only or missing directory is reported in a second, not after an hour of training.
pub fn check_writable(path: &Path, what: &str) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!("{what} {} is a directory; give a file path", path.display());
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "{what} {}: cannot create directory {}",
            path.display(),
            dir.display()
        )
    })?;
    let probe = dir.join(format!(
        ".{}.probe{}",
        path.file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "{what} {} cannot be written (directory {} is not writable)",
                path.display(),
                dir.display()
            )
        })?;
    Ok(())
}

/// Checks that a model output path ends in `.safetensors` or `.onnx` (the extension picks
/// the format) and can be written.
pub fn check_model_output(path: &Path) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!("output {} is a directory; give a file path", path.display());
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") | Some("onnx") => {}
        _ => anyhow::bail!(
            "output {}: a model file must end in .safetensors (lopper's format) or .onnx",
            path.display()
        ),
    }
    check_writable(path, "output")
}

/// IEEE half → f32 (float16 weights, from safetensors or ONNX, run in f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Seconds as a person reads them: 42 s, 7.5 min, 1.3 h (progress ETAs, run summaries).
pub fn human_secs(s: f64) -> String {
    match s {
        s if s >= 3600.0 => format!("{:.1} h", s / 3600.0),
        s if s >= 120.0 => format!("{:.1} min", s / 60.0),
        s => format!("{s:.0} s"),
    }
}

/// A 64-bit FNV-1a hash of some bytes (pairs a model file with its report, keys caches,
/// fingerprints data; not for security).
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h = Fnv64::default();
    h.update(bytes);
    h.finish()
}

/// FNV-1a fed in pieces: the same value as [`fnv64`] of the concatenation.
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Memory this process may still allocate: Linux `MemAvailable`, else 16 GiB.
pub fn available_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or(16 << 30)
}

/// Errors (instead of aborting the process) when `bytes` exceed the memory available.
pub fn check_allocation(bytes: usize, what: &str) -> Result<()> {
    let avail = available_memory_bytes();
    if bytes as u64 > avail {
        anyhow::bail!(
            "{what} need {:.1} GB, more than the {:.1} GB of memory available",
            bytes as f64 / 1e9,
            avail as f64 / 1e9
        );
    }
    Ok(())
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if readable.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak RSS counter (Linux `clear_refs` 5); ignored where unsupported.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs `f` on a thread of rayon's global pool and waits for it.
///
/// A kernel's parallel loop called from outside the pool is injected into it and the
/// caller sleeps until a worker has finished: two thread switches per op. At batch 1 a
/// whole forward pass is 20–60 µs, and LeNet-5's profile was over half kernel scheduling
/// (`sched_yield`, futex wake-ups). From a worker, a loop too small to split runs inline
/// and a larger one is shared by work stealing. The pool's threads get a main-sized stack.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // Only the first build can succeed; a pool already built (tests, a library user) stays.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(16 << 20)
        .build_global();
    rayon::scope(|_| f())
}

/// Process-wide runtime settings for CPU training; call first thing in `main`.
///
/// 1. Keeps freed tensor buffers inside the process (glibc): otherwise every per-step
///    activation buffer above 128 KiB is a fresh `mmap` whose pages fault in on first
///    touch and whose `munmap` flushes both cores' TLBs (ResNet-20 b64 train step
///    ~320 ms -> ~250 ms here). glibc caps the mmap threshold at 32 MiB, so buffers above
///    it (EfficientNet-B0's 112×112×96 expansion at batch 8 is 38.5 MB) still faulted in
///    on every pass: no mmap at all (`M_MMAP_MAX` 0) took its b8 forward from ~58 to
///    ~47 ms and 10× fewer page faults, at a lower peak RSS (BENCHMARKS §21).
///    `LOPPER_MALLOC=0` leaves glibc's defaults (A/B).
/// 2. Stops candle's element-wise worker threads from spinning after each job (default
///    25,000 iterations), which otherwise steals a core from our kernels. 0 was measured
///    no worse than 1,000 (the earlier setting) on an AVX2 and an AVX-512 EPYC, and up
///    to ~10 % better at batch 1, with no `sched_yield` storm (BENCHMARKS §14b).
pub fn tune_runtime() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("LOPPER_MALLOC").is_none_or(|v| v != "0") {
        // SAFETY: mallopt only changes allocator thresholds; called before heavy allocation.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            // Large blocks come from the heap too (glibc still maps when the heap cannot grow).
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
            // One arena: kernels allocate on pool threads and free on others, and per-thread
            // arenas each kept their own freed memory (training peak RSS +60 %, measured).
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
