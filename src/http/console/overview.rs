//! `GET /ops`: how the service is doing — intake and worker rates of the last
//! minutes, provisioning lag p50/p99, dead letters, queue depths, broker and
//! database state.
//!
//! Guarantee: every figure is measured, or says "unknown" and why. Rates and lag
//! come from this process's own Prometheus series, sampled every
//! [`SAMPLE_EVERY`] once the page was first opened (the counters are cumulative,
//! so a rate needs two samples: until then the page says it is measuring); the
//! lag quantiles are bucket bounds of `provisioning_lag_seconds` ("≤ 0.1 s"), as
//! precise as the histogram. Queue depths are read from the broker now (passive
//! declare: nothing is created or changed), the database is asked `select 1`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::html;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::time::Instant;

use super::session::Operator;
use super::view::{self, Nav};
use crate::broker::Topology;
use crate::http::AppState;
use crate::telemetry::series::{EVENTS_TOTAL, LAG_SECONDS, RECEIVED_TOTAL};

/// How often the overview samples the metrics once opened.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// The window rates and lag are measured over.
pub const WINDOW: Duration = Duration::from_secs(5 * 60);
/// How long the broker and database checks may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Intake outcomes that mean the webhook was taken.
const ACCEPTED: [&str; 2] = ["queued", "ignored"];
/// Worker outcomes that ended with a commit.
const COMMITTED: [&str; 4] = ["processed", "ignored", "superseded", "duplicate"];

/// The series of one sample: `name{labels}` → value.
type Series = BTreeMap<String, f64>;

/// One reading of the counters.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    series: Series,
}

/// Samples of the last [`WINDOW`] (and one older), for rates.
#[derive(Debug, Default)]
pub struct Recent {
    samples: Mutex<VecDeque<Sample>>,
    sampler_started: AtomicBool,
}

impl Recent {
    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back(sample);
        // Keep one sample older than the window, so a full window is measurable.
        while samples.len() > 2 && samples[1].at.elapsed() > WINDOW {
            samples.pop_front();
        }
    }

    /// The oldest sample no older than the window (plus one sampling period).
    fn base(&self) -> Option<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples
            .iter()
            .find(|s| s.at.elapsed() <= WINDOW + SAMPLE_EVERY)
            .cloned()
    }

    /// Starts the background sampler once; it ends when the application is dropped.
    fn start_sampler(self: &Arc<Self>, handle: PrometheusHandle) {
        if self.sampler_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Recent> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(recent) = weak.upgrade() else { break };
                recent.push(read(&handle));
            }
        });
    }
}

fn read(handle: &PrometheusHandle) -> Sample {
    Sample {
        at: Instant::now(),
        series: parse(&handle.render()),
    }
}

/// The series this page uses, from Prometheus text.
fn parse(text: &str) -> Series {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(RECEIVED_TOTAL)
                || l.starts_with(EVENTS_TOTAL)
                || l.starts_with(LAG_SECONDS)
        })
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse::<f64>().ok()?))
        })
        .collect()
}

/// The value of label `name` in a series key (`x{a="1",b="2"}`).
fn label<'a>(key: &'a str, name: &str) -> Option<&'a str> {
    let inside = key.split_once('{')?.1.strip_suffix('}')?;
    inside.split("\",").find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.trim_matches('"'))
    })
}

/// Per `label` value of the series `name`: value now minus value at `base`.
fn deltas(now: &Series, base: Option<&Series>, name: &str, by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (key, value) in now {
        if key.split_once('{').map(|(n, _)| n) != Some(name) {
            continue;
        }
        let Some(v) = label(key, by) else { continue };
        let before = base.and_then(|b| b.get(key)).copied().unwrap_or(0.0);
        *out.entry(v.to_owned()).or_default() += (value - before).max(0.0);
    }
    out
}

/// The bucket bound under which fraction `q` of the window's samples fall.
fn quantile(buckets: &BTreeMap<String, f64>, q: f64) -> Option<String> {
    let mut bounds: Vec<(f64, f64)> = buckets
        .iter()
        .filter_map(|(le, n)| {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *n))
        })
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = bounds.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let finite_max = bounds
        .iter()
        .rev()
        .find(|(le, _)| le.is_finite())
        .map(|b| b.0);
    let (le, _) = bounds.iter().find(|(_, n)| *n >= q * total)?;
    Some(if le.is_finite() {
        format!("≤ {} s", le)
    } else {
        format!("> {} s", finite_max.unwrap_or(0.0))
    })
}

/// The queues' depths, read from the broker now.
async fn depths(
    state: &AppState,
) -> Result<Vec<(String, &'static str, Result<u32, String>)>, String> {
    let topology = Topology::new(&state.settings.broker, &state.settings.worker);
    let conn = tokio::time::timeout(
        CHECK_TIMEOUT,
        crate::broker::connect(&state.settings.broker.url, "provisioner-ops"),
    )
    .await
    .map_err(|_| "no answer in time".to_owned())?
    .map_err(|e| state.settings.broker.url.scrub(&e.to_string()))?;
    let mut out = Vec::new();
    for (queue, role) in crate::telemetry::poll::queues(&topology) {
        // A channel per queue: a missing queue closes its channel.
        let depth = async {
            let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
            let declared = crate::broker::inspect(&channel, queue.as_str())
                .await
                .map_err(|e| e.to_string());
            if channel.status().connected() {
                let _ = channel.close(200, "ops overview".into()).await;
            }
            declared.map(|q| q.message_count())
        };
        let depth = tokio::time::timeout(CHECK_TIMEOUT, depth)
            .await
            .unwrap_or_else(|_| Err("no answer in time".to_owned()));
        out.push((queue, role, depth));
    }
    let _ = conn.close(200, "ops overview".into()).await;
    Ok(out)
}

fn per_minute(n: f64, secs: f64) -> String {
    // `+ 0.0` turns an empty sum's -0.0 into 0.
    let rate = n / secs * 60.0 + 0.0;
    if rate >= 10.0 {
        format!("{rate:.0}/min")
    } else {
        format!("{rate:.1}/min")
    }
}

fn whole(n: f64) -> String {
    // An empty sum of floats is -0.0; show it as 0.
    format!("{:.0}", n + 0.0)
}

/// `GET /ops`.
pub async fn page(
    operator: Operator,
    State(state): State<AppState>,
    recent: Arc<Recent>,
) -> Response {
    recent.start_sampler(state.metrics.clone());
    let now = read(&state.metrics);
    let base = recent.base();
    recent.push(now.clone());
    let window = base
        .as_ref()
        .map(|b| now.at.duration_since(b.at))
        .filter(|w| *w >= Duration::from_secs(5));
    let base_series = window.and(base.as_ref()).map(|b| &b.series);

    let (database, broker_link, queues) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("select 1").execute(&state.db)),
        state.publisher.is_connected(),
        depths(&state),
    );
    let database = matches!(database, Ok(Ok(_)));

    let intake_since_start = deltas(&now.series, None, RECEIVED_TOTAL, "outcome");
    let intake = deltas(&now.series, base_series, RECEIVED_TOTAL, "outcome");
    let worker = deltas(&now.series, base_series, EVENTS_TOTAL, "outcome");
    let has_worker = now.series.keys().any(|k| k.starts_with(EVENTS_TOTAL));
    let lag_key = format!("{LAG_SECONDS}_bucket");
    let lag = deltas(&now.series, base_series, &lag_key, "le");
    let lag_since_start = deltas(&now.series, None, &lag_key, "le");

    let sum = |m: &BTreeMap<String, f64>, names: &[&str]| -> f64 {
        m.iter()
            .filter(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v)
            .sum()
    };
    let refused: Vec<(String, f64)> = intake
        .iter()
        .filter(|(k, v)| !ACCEPTED.contains(&k.as_str()) && **v > 0.0)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let dead_queue = &state.settings.broker.dead_letter_queue;
    let dead_count = queues
        .as_ref()
        .ok()
        .and_then(|qs| qs.iter().find(|(q, _, _)| q == dead_queue))
        .and_then(|(_, _, d)| d.as_ref().ok().copied());

    let body = html! {
        h1 { "Overview" }
        p.lead {
            @match window {
                Some(w) => { "Rates and lag over the last " (human(w)) " (this process's own metrics)." }
                None => { "Rates need two readings of the counters: measuring now — reload in a minute. Totals since this process started are shown meanwhile." }
            }
        }
        div.cards {
            section.card {
                h2 { "Intake" }
                @if let Some(w) = window {
                    p.big { (per_minute(sum(&intake, &ACCEPTED), w.as_secs_f64())) }
                    p { "webhooks taken (queued or ignored)" }
                    @if refused.is_empty() {
                        p.good { "no refusals" }
                    } @else {
                        p.bad { "refused: " @for (i, (k, v)) in refused.iter().enumerate() { @if i > 0 { ", " } (whole(*v)) " " (k) } }
                    }
                } @else {
                    p.big { (whole(sum(&intake_since_start, &ACCEPTED))) }
                    p { "webhooks taken since start; "
                        (whole(intake_since_start.iter().filter(|(k, _)| !ACCEPTED.contains(&k.as_str())).map(|(_, v)| v).sum::<f64>())) " refused" }
                }
            }
            section.card {
                h2 { "Worker" }
                @if !has_worker {
                    p.big.muted { "unknown" }
                    p { "no worker runs in this process (serve --no-worker)" }
                } @else if let Some(w) = window {
                    p.big { (per_minute(sum(&worker, &COMMITTED), w.as_secs_f64())) }
                    p { "events committed" }
                    p.bad[sum(&worker, &["dead", "retry"]) > 0.0] {
                        (whole(worker.get("dead").copied().unwrap_or(0.0))) " dead-lettered, "
                        (whole(worker.get("retry").copied().unwrap_or(0.0))) " sent to retry"
                    }
                } @else {
                    @let since_start = deltas(&now.series, None, EVENTS_TOTAL, "outcome");
                    p.big { (whole(sum(&since_start, &COMMITTED))) }
                    p { "events committed since start" }
                    p.bad[sum(&since_start, &["dead", "retry"]) > 0.0] {
                        (whole(since_start.get("dead").copied().unwrap_or(0.0))) " dead-lettered, "
                        (whole(since_start.get("retry").copied().unwrap_or(0.0))) " sent to retry"
                    }
                }
            }
            section.card {
                h2 { "Provisioning lag" }
                @let (buckets, scope) = if window.is_some() { (&lag, "in the window") } else { (&lag_since_start, "since start") };
                @match (has_worker, quantile(buckets, 0.5), quantile(buckets, 0.99)) {
                    (false, _, _) => { p.big.muted { "unknown" } p { "no worker runs in this process" } }
                    (true, Some(p50), Some(p99)) => {
                        p.big { "p50 " (p50) }
                        p { "p99 " (p99) " · " (whole(buckets.get("+Inf").copied().unwrap_or(0.0))) " events " (scope) }
                    }
                    _ => { p.big.muted { "no events" } p { "no event was committed " (scope) } }
                }
            }
            section.card {
                h2 { a href="/ops/dead-letters" { "Dead letters" } }
                @match dead_count {
                    Some(0) => { p.big.good { "0" } p { "nothing to look at" } }
                    Some(n) => { p.big.bad { (n) } p { a href="/ops/dead-letters" { "see why they died →" } } }
                    None => { p.big.muted { "unknown" } p { "the broker did not answer" } }
                }
            }
        }
        div.grid {
            section.panel {
                h2 { "Queues" }
                @match &queues {
                    Ok(qs) => {
                        table.data.compact {
                            thead { tr { th { "Queue" } th { "Role" } th.num { "Ready" } } }
                            tbody {
                                @for (q, role, depth) in qs {
                                    tr {
                                        td.mono { (q) }
                                        td { (role) }
                                        td.num { @match depth { Ok(n) => (n), Err(e) => span.bad title=(e) { "unknown" } } }
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => { p.bad { "unknown: the broker did not answer (" (e) ")" } }
                }
            }
            section.panel {
                h2 { "Dependencies" }
                dl.facts {
                    dt { "PostgreSQL" } dd { @if database { span.good { "answers" } } @else { span.bad { "does not answer" } } }
                    dt { "RabbitMQ (intake's link)" } dd { @if broker_link { span.good { "connected" } } @else { span.bad { "disconnected" } } }
                    dt { "RabbitMQ (queues)" } dd { @if queues.is_ok() { span.good { "answers" } } @else { span.bad { "does not answer" } } }
                }
                p.muted { "Everything here is also on " code { "/metrics" } " for Prometheus; see docs/operations.md for the alerts." }
            }
        }
    };
    view::page("Overview", Some(&operator), Nav::Overview, body).into_response()
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s} s")
    } else if s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{} min {} s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE webhooks_received_total counter
webhooks_received_total{outcome="queued"} 12
webhooks_received_total{outcome="unauthorized"} 3
worker_events_total{type="organization",outcome="processed"} 7
worker_events_total{type="membership",outcome="processed"} 2
worker_events_total{type="organization",outcome="dead"} 1
provisioning_lag_seconds_bucket{le="0.05"} 5
provisioning_lag_seconds_bucket{le="0.1"} 9
provisioning_lag_seconds_bucket{le="1"} 10
provisioning_lag_seconds_bucket{le="+Inf"} 10
other_total 4
"#;

    #[test]
    fn series_are_read_and_summed_by_label() {
        let s = parse(TEXT);
        assert!(!s.keys().any(|k| k.starts_with("other")));
        let w = deltas(&s, None, EVENTS_TOTAL, "outcome");
        assert_eq!(w.get("processed"), Some(&9.0));
        assert_eq!(w.get("dead"), Some(&1.0));
        let mut base = s.clone();
        base.insert(r#"webhooks_received_total{outcome="queued"}"#.into(), 10.0);
        let i = deltas(&s, Some(&base), RECEIVED_TOTAL, "outcome");
        assert_eq!(i.get("queued"), Some(&2.0));
        assert_eq!(i.get("unauthorized"), Some(&0.0));
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let s = parse(TEXT);
        let b = deltas(&s, None, &format!("{LAG_SECONDS}_bucket"), "le");
        assert_eq!(
            quantile(&b, 0.5).as_deref(),
            Some("≤ 0.05 s"),
            "5 of 10 at most 0.05 s"
        );
        assert_eq!(quantile(&b, 0.99).as_deref(), Some("≤ 1 s"));
        assert_eq!(quantile(&BTreeMap::new(), 0.5), None);
        let mut over = BTreeMap::new();
        over.insert("1".to_owned(), 0.0);
        over.insert("+Inf".to_owned(), 2.0);
        assert_eq!(quantile(&over, 0.5).as_deref(), Some("> 1 s"));
    }

    #[test]
    fn an_empty_sum_shows_as_zero() {
        let empty: f64 = std::iter::empty::<f64>().sum();
        assert_eq!(whole(empty), "0");
        assert_eq!(per_minute(empty, 60.0), "0.0/min");
        assert_eq!(per_minute(30.0, 60.0), "30/min");
    }
}
