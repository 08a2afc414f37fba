//! The worker's Prometheus series (rendered by `/metrics` of `serve`).
//!
//! Guarantee: every delivery the worker finishes with is counted exactly once in
//! `worker_events_total` under the outcome that ended its attempt.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::provision::Outcome;

pub use crate::telemetry::series::{EVENTS_TOTAL, LAG_SECONDS};

/// Processing time of an event (its batch's transaction, retries included).
pub const EVENT_SECONDS: &str = "worker_event_seconds";
/// Dead-lettered events by class.
pub const DEAD_LETTERED_TOTAL: &str = "worker_dead_lettered_total";
/// Events per `apply_batch` call.
pub const BATCH_SIZE: &str = "worker_batch_size";
/// Events held in process right now because PostgreSQL cannot take them.
pub const HELD_EVENTS: &str = "worker_held_events";
/// 1 while a named broker connection is up (the publishers set theirs too).
pub const BROKER_CONNECTED: &str = "broker_connected";
/// The `connection` label of the worker's consumer connection.
pub const CONSUMER_CONNECTION: &str = "provisioner-worker";

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

/// Exports the fixed-label series at 0 before the first occurrence.
pub fn register() {
    use super::delivery::DeadClass;
    for class in [
        DeadClass::Payload,
        DeadClass::RetriesExhausted,
        DeadClass::DeliveryLimit,
    ] {
        counter!(DEAD_LETTERED_TOTAL, "class" => class.as_str()).increment(0);
    }
    gauge!(HELD_EVENTS).increment(0.0);
}

/// Counts one dead letter.
pub fn dead_lettered(class: &'static str) {
    counter!(DEAD_LETTERED_TOTAL, "class" => class).increment(1);
}

/// Records the size of one batch.
pub fn batch_size(size: usize) {
    histogram!(BATCH_SIZE).record(size as f64);
}

/// Counts events held in process while PostgreSQL cannot take them: the gauge
/// follows [`Held::set`] and gives its count back when dropped (a batch settled,
/// parked or panicked).
#[derive(Debug, Default)]
pub struct Held(usize);

impl Held {
    /// The batch holds `now` events.
    pub fn set(&mut self, now: usize) {
        let g = gauge!(HELD_EVENTS);
        if now > self.0 {
            g.increment((now - self.0) as f64);
        } else {
            g.decrement((self.0 - now) as f64);
        }
        self.0 = now;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// `broker_connected{connection="provisioner-worker"}` is 1 while this lives.
#[derive(Debug)]
pub struct Connected(());

impl Connected {
    /// The consumer connection is up.
    pub fn consumer() -> Self {
        gauge!(BROKER_CONNECTED, "connection" => CONSUMER_CONNECTION).set(1.0);
        Self(())
    }

    /// Sets the consumer's gauge to 0 before it ever connected.
    pub fn consumer_down() {
        gauge!(BROKER_CONNECTED, "connection" => CONSUMER_CONNECTION).set(0.0);
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        Self::consumer_down();
    }
}
