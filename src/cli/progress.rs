//! The command line's [`Progress`] sink: a bar with ETA and live metrics on a terminal; a
//! line every few seconds (with ETA) when stderr is a file or pipe, so logs and `lopper
//! run` steps show that long work advances (`lopper run` forwards its steps' lines). All
//! of it goes to stderr, so `--json` output on stdout stays clean; `--quiet` silences it.

use indicatif::{ProgressBar, ProgressStyle};
use lopper::util::Progress;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds between progress lines when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

pub struct Console {
    quiet: bool,
    tty: bool,
    unit: Mutex<Option<Unit>>,
}

struct Unit {
    label: String,
    total: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

/// `--quiet` (a global flag): no progress at all.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Sets `--quiet` for every console of this process.
pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

impl Console {
    /// Progress on stderr unless `--quiet` (JSON output on stdout does not silence it).
    pub fn new() -> Console {
        Console {
            quiet: quiet(),
            tty: std::io::stderr().is_terminal(),
            unit: Mutex::new(None),
        }
    }
}

impl Default for Console {
    fn default() -> Self {
        Console::new()
    }
}

fn eta(started: Instant, done: u64, total: u64) -> String {
    if done == 0 || done >= total {
        return String::new();
    }
    let secs = started.elapsed().as_secs_f64() * (total - done) as f64 / done as f64;
    format!(", ETA {}", lopper::util::human_secs(secs))
}

impl Progress for Console {
    fn line(&self, msg: &str) {
        if self.quiet {
            return;
        }
        let unit = self.unit.lock().unwrap_or_else(|e| e.into_inner());
        match unit.as_ref().and_then(|u| u.bar.as_ref()) {
            Some(bar) => bar.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    fn start(&self, label: &str, total: u64) {
        if self.quiet {
            return;
        }
        let bar = self.tty.then(|| {
            let b = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
            {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_prefix(label.to_string());
            b
        });
        let now = Instant::now();
        let mut unit = self.unit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = unit.take().and_then(|u| u.bar) {
            old.finish_and_clear();
        }
        *unit = Some(Unit {
            label: label.to_string(),
            total,
            started: now,
            last_line: now,
            bar,
        });
    }

    fn step(&self, done: u64, status: &str) {
        if self.quiet {
            return;
        }
        let mut unit = self.unit.lock().unwrap_or_else(|e| e.into_inner());
        let Some(u) = unit.as_mut() else { return };
        if let Some(bar) = &u.bar {
            bar.set_position(done);
            bar.set_message(status.to_string());
        } else if u.last_line.elapsed() >= LINE_EVERY {
            u.last_line = Instant::now();
            eprintln!(
                "{}: {done}/{} ({:.0} %) {status}{}",
                u.label,
                u.total,
                100.0 * done as f64 / u.total.max(1) as f64,
                eta(u.started, done, u.total)
            );
        }
    }

    fn finish(&self) {
        let mut unit = self.unit.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bar) = unit.take().and_then(|u| u.bar) {
            bar.finish_and_clear();
        }
    }
}
