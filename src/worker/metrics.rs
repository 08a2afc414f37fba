//! The worker's Prometheus series (rendered by `/metrics` of `serve`).
//!
//! Guarantee: every delivery the worker finishes with is counted exactly once in
//! `worker_events_total` under the outcome that ended its attempt.

use std::time::Duration;

use metrics::{counter, histogram};

use crate::provision::Outcome;

/// Events by type and outcome.
pub const EVENTS_TOTAL: &str = "worker_events_total";
/// Processing time of an event (its batch's transaction, retries included).
pub const EVENT_SECONDS: &str = "worker_event_seconds";
/// Now − envelope timestamp, when an event is committed.
pub const LAG_SECONDS: &str = "provisioning_lag_seconds";
/// Dead-lettered events by class.
pub const DEAD_LETTERED_TOTAL: &str = "worker_dead_lettered_total";
/// Events per `apply_batch` call.
pub const BATCH_SIZE: &str = "worker_batch_size";

/// How an attempt at an event ended, as the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// Committed with this outcome.
    Committed(Outcome),
    /// Dead-lettered.
    Dead,
    /// Sent to a retry queue.
    Retry,
    /// Held in process because PostgreSQL cannot take it now (docs/faults.md).
    Held,
}

impl Label {
    fn as_str(self) -> &'static str {
        match self {
            Label::Committed(Outcome::Processed) => "processed",
            Label::Committed(Outcome::Ignored) => "ignored",
            Label::Committed(Outcome::Superseded) => "superseded",
            Label::Committed(Outcome::Duplicate) => "duplicate",
            Label::Dead => "dead",
            Label::Retry => "retry",
            Label::Held => "held",
        }
    }
}

/// Counts one event outcome. `kind` is a bounded label
/// ([`EventType::metric_label`](crate::clerk::EventType::metric_label), `other`); a
/// `&'static str`, so no event's own type name can become a new series.
pub fn event(kind: &'static str, label: Label) {
    counter!(EVENTS_TOTAL, "type" => kind, "outcome" => label.as_str()).increment(1);
}

/// Records the time spent applying an event.
pub fn processing_time(elapsed: Duration) {
    histogram!(EVENT_SECONDS).record(elapsed.as_secs_f64());
}

/// Records the provisioning lag of a committed event from its envelope timestamp.
pub fn lag(envelope_ms: Option<i64>, now_ms: i64) {
    if let Some(ts) = envelope_ms {
        // A clock skew between Clerk and us must not produce negative samples.
        let lag_ms = (now_ms - ts).max(0);
        histogram!(LAG_SECONDS).record(lag_ms as f64 / 1000.0);
    }
}

/// Counts one dead letter.
pub fn dead_lettered(class: &'static str) {
    counter!(DEAD_LETTERED_TOTAL, "class" => class).increment(1);
}

/// Records the size of one batch.
pub fn batch_size(size: usize) {
    histogram!(BATCH_SIZE).record(size as f64);
}
