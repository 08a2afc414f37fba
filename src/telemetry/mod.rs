//! Logging and metrics set-up, and the process's poll of the broker's queue
//! depths and of the connection to PostgreSQL ([`poll`]).
//!
//! Guarantee: one global subscriber and one Prometheus recorder per process, however
//! many applications a test binary starts; log lines carry ids in fields, never
//! secrets. In JSON, the fields of every span a line is logged in (an event's
//! `svix.id`, `event.type`, `workspace.id`) are top-level keys of the line, beside
//! the line's own fields ([`FlatJson`]), so one `jq 'select(."svix.id"==…)'` finds
//! every line of an event's path.

pub mod poll;
pub mod series;

use std::fmt;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, prelude::*};

use crate::config::{LogFormat, LogSettings};

/// The name of the span an event's path is logged in (intake, worker, dead letter,
/// replay); its fields are [`SVIX_ID`], [`EVENT_TYPE`] and [`WORKSPACE_ID`].
pub const EVENT_SPAN: &str = "event";
/// Field: the svix id (`message_id` on the broker).
pub const SVIX_ID: &str = "svix.id";
/// Field: the Clerk event type.
pub const EVENT_TYPE: &str = "event.type";
/// Field: the workspace (Clerk organization id), once the body was read.
pub const WORKSPACE_ID: &str = "workspace.id";

/// A span for one event's path, at ERROR level so that it is enabled whenever
/// any line of its target is (an INFO span would vanish, with its ids, under
/// `RUST_LOG=warn`). Fields not yet known are recorded later
/// (`span.record("workspace.id", …)`).
#[macro_export]
macro_rules! event_span {
    ($svix_id:expr) => {
        tracing::error_span!(
            "event",
            svix.id = %$svix_id,
            event.type = tracing::field::Empty,
            workspace.id = tracing::field::Empty
        )
    };
}

/// Installs the global tracing subscriber (idempotent; later calls do nothing).
pub fn init_tracing(settings: &LogSettings) {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let filter =
            EnvFilter::try_new(&settings.filter).unwrap_or_else(|_| EnvFilter::new("info"));
        let registry = tracing_subscriber::registry().with(filter);
        let result = match settings.format {
            LogFormat::Json => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .fmt_fields(JsonFields::new())
                        .event_format(FlatJson)
                        .with_writer(std::io::stderr),
                )
                .try_init(),
            LogFormat::Text => registry
                .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
                .try_init(),
        };
        // A test harness may have installed its own subscriber first; keep it.
        let _ = result;
    });
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                // Full-name matchers win over the suffix one. The names are the
                // worker's (`worker::metrics`, which imports this module);
                // tests/it/observability.rs checks both are histograms.
                .set_buckets_for_metric(
                    Matcher::Full("provisioning_lag_seconds".to_owned()),
                    &[
                        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                        3600.0, 21600.0, 86400.0,
                    ],
                )
                .expect("bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full("worker_batch_size".to_owned()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                )
                .expect("bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0,
                    ],
                )
                .expect("bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be global in a test binary; ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

/// The JSON line format: `timestamp`, `level`, `target`, the fields of every span
/// the line is logged in (outermost first, so an inner span's value wins) and the
/// line's own fields (`message` among them), all top-level keys of one object.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                // The fmt layer keeps each span's fields as one JSON object.
                if let Some(fields) = extensions.get::<FormattedFields<JsonFields>>()
                    && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields)
                {
                    line.extend(fields);
                }
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        let meta = event.metadata();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".into(), Value::String(meta.level().to_string()));
        // A record of the `log` crate (rustls, …) arrives with target `log` and its
        // own in `log.target`: show it as the default formatter does.
        let target = match line.remove("log.target") {
            Some(Value::String(target)) => {
                for key in ["log.module_path", "log.file", "log.line"] {
                    line.remove(key);
                }
                target
            }
            _ => meta.target().to_owned(),
        };
        line.insert("target".into(), Value::String(target));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects a line's fields as JSON values.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn span_fields_are_top_level_keys_of_every_line() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(FlatJson)
                .with_writer(move || out.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = crate::event_span!("msg_1");
            let _outer = span.enter();
            span.record(EVENT_TYPE, "organization.created");
            tracing::info!(attempts = 2, "first");
            span.record(WORKSPACE_ID, "org_1");
            let inner = tracing::info_span!("apply", batch = 3);
            inner.in_scope(|| tracing::warn!(error = %"boom", "second"));
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["svix.id"], "msg_1");
        assert_eq!(lines[0]["event.type"], "organization.created");
        assert_eq!(lines[0]["attempts"], 2);
        assert_eq!(lines[0]["message"], "first");
        assert_eq!(lines[0]["level"], "INFO");
        assert!(lines[0].get("workspace.id").is_none(), "{text}");
        assert_eq!(lines[1]["workspace.id"], "org_1");
        assert_eq!(lines[1]["svix.id"], "msg_1");
        assert_eq!(lines[1]["batch"], 3);
        assert_eq!(lines[1]["error"], "boom");
        assert_eq!(lines[1]["level"], "WARN");
    }
}
