//! The names of the Prometheus series that more than one role reads: the worker
//! and the intake record them, the ops console's overview reads them back from
//! the recorder's rendering.
//!
//! Guarantee: one spelling per series. Recording stays with its role
//! (`worker::metrics`, `http::intake`); this module only names.

/// Webhooks by what intake did with them (`outcome`, one of `http::intake::OUTCOMES`).
pub const RECEIVED_TOTAL: &str = "webhooks_received_total";
/// Events by type and outcome (recorded by the worker).
pub const EVENTS_TOTAL: &str = "worker_events_total";
/// Now − envelope timestamp, when an event is committed (recorded by the worker).
pub const LAG_SECONDS: &str = "provisioning_lag_seconds";
