//! How a long library operation (a reconcile run, a dead-letter replay) reports
//! its progress to whoever drives it: the CLI draws a terminal bar, the console
//! and tests show nothing ([`Silent`]).
//!
//! Guarantee: progress is a report only. An operation behaves the same whatever
//! [`Progress`] it is given; nothing here prints.

/// Progress of an operation, for a progress bar.
pub trait Progress: Send + Sync {
    /// A phase began; `total` items when known.
    fn phase(&self, name: &'static str, total: Option<u64>);
    /// `n` more items of the phase are done.
    fn advance(&self, n: u64);
    /// A short note on the phase so far (e.g. `replayed 3`); ignored by default.
    fn note(&self, _text: String) {}
}

/// No progress shown.
#[derive(Debug)]
pub struct Silent;

impl Progress for Silent {
    fn phase(&self, _: &'static str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
}
