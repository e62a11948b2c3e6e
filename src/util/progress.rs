//! How library code reports long work: through a [`Progress`] the caller passes in, never
//! by printing. The command line turns these calls into a bar with an ETA on a terminal
//! and into periodic lines elsewhere (logs, `lopper run` steps); tests and JSON output
//! pass [`Silent`].

/// A sink for progress of long work. Every method has a no-op default, so a sink only
/// implements what it shows.
pub trait Progress: Sync {
    /// A one-line message (a stage finished, a result, a warning).
    fn line(&self, _msg: &str) {}
    /// A unit of work of `total` steps begins (an epoch of batches, a search).
    fn start(&self, _label: &str, _total: u64) {}
    /// `done` of the current unit's steps are finished; `status` is a short live metric
    /// (loss, accuracy, throughput) or empty.
    fn step(&self, _done: u64, _status: &str) {}
    /// The current unit ended.
    fn finish(&self) {}
}

/// Shows nothing.
pub struct Silent;

impl Progress for Silent {}

/// Calls a closure for every line and ignores the rest: for callers that only log.
pub struct Lines<F: Fn(&str) + Sync>(pub F);

impl<F: Fn(&str) + Sync> Progress for Lines<F> {
    fn line(&self, msg: &str) {
        (self.0)(msg)
    }
}
