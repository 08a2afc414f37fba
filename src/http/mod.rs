//! The HTTP side: webhook intake, the read API, the ops console, health and
//! metrics, and the one error type they answer with.
//!
//! Guarantee: every route is built here, from the shared [`AppState`], and nothing
//! below `http` imports it back, so the handlers depend on the service's modules
//! and never the other way round; [`app`] is the whole application, so tests drive
//! it exactly as production serves it.

pub mod api;
pub mod console;
pub mod error;
pub mod health;
pub mod intake;
pub mod server;

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::MatchedPath;
use axum::http::Request;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tower_http::trace::TraceLayer;

use crate::broker::Publisher;
use crate::config::Settings;
use crate::intake::Verifier;
use crate::reconcile::JustInTime;

/// Everything a request handler needs; cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// Confirmed publisher to the broker.
    pub publisher: Publisher,
    /// PostgreSQL pool.
    pub db: PgPool,
    /// Webhook signature verifier.
    pub verifier: Arc<Verifier>,
    /// Prometheus renderer.
    pub metrics: PrometheusHandle,
    /// Just-in-time sync from Clerk's Backend API.
    pub sync: JustInTime,
}

/// Requests answered, by `method`, `route` and `status`.
pub const REQUESTS_TOTAL: &str = "http_requests_total";
/// Time from a request's head to its response's head, by `method`, `route`, `status`.
pub const REQUEST_SECONDS: &str = "http_request_duration_seconds";

/// The `route` label: the route's pattern (`/v1/workspaces/{id}`), never the
/// request's own path, so no client can create series; `None` when no route
/// matched, which [`request_series`] labels `unmatched`.
fn route_label(request: &axum::extract::Request) -> Option<MatchedPath> {
    request.extensions().get::<MatchedPath>().cloned()
}

/// The `method` label: the standard methods, `other` for any a client invents.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// The two series of one (method, route, status).
struct RequestSeries {
    total: metrics::Counter,
    seconds: metrics::Histogram,
}

/// The series each (method, route, status) records into, looked up in the
/// recorder once each: building a metric key and finding it in the recorder's
/// registry on every request was a measurable share of a read (`bench/run_api.sh`;
/// figures in docs/benchmarks.md, issue 12). The labels are bounded (see [`route_label`] and [`method_label`];
/// statuses are three digits), so the list is as short as the set of answers the
/// routes give, and each entry is leaked once. The recorder never drops a series
/// (no idle timeout is configured in `telemetry`), so a handle stays live.
fn request_series(
    method: &'static str,
    route: Option<&str>,
    status: u16,
) -> &'static RequestSeries {
    type Entry = (&'static str, Option<String>, u16, &'static RequestSeries);
    static SERIES: RwLock<Vec<Entry>> = RwLock::new(Vec::new());
    let find = |list: &[Entry]| {
        list.iter()
            .find(|(m, r, s, _)| *s == status && *m == method && r.as_deref() == route)
            .map(|entry| entry.3)
    };
    if let Some(series) = find(&SERIES.read().unwrap_or_else(PoisonError::into_inner)) {
        return series;
    }
    let mut list = SERIES.write().unwrap_or_else(PoisonError::into_inner);
    if let Some(series) = find(&list) {
        return series;
    }
    let labels = [
        ("method", method.to_owned()),
        ("route", route.unwrap_or("unmatched").to_owned()),
        ("status", status.to_string()),
    ];
    let series: &'static RequestSeries = Box::leak(Box::new(RequestSeries {
        total: metrics::counter!(REQUESTS_TOTAL, &labels),
        seconds: metrics::histogram!(REQUEST_SECONDS, &labels),
    }));
    list.push((method, route.map(str::to_owned), status, series));
    series
}

/// Middleware: counts and times every request the application answers.
async fn count_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let route = route_label(&request);
    let method = method_label(request.method());
    let response = next.run(request).await;
    let series = request_series(
        method,
        route.as_ref().map(MatchedPath::as_str),
        response.status().as_u16(),
    );
    series.total.increment(1);
    series.seconds.record(started.elapsed().as_secs_f64());
    response
}

/// The HTTP application: intake, read API, ops console, health and metrics.
///
/// Every request body must arrive within `[http] body_read_timeout_ms` of its head
/// ([`server::body_deadline`]); a webhook's within the shorter
/// [`intake::webhook_body_timeout`], which intake's routes add inside this one.
pub fn app(state: AppState) -> Router {
    let body_timeout = Duration::from_millis(state.settings.http.body_read_timeout_ms);
    Router::new()
        .merge(intake::router(&state.settings.http))
        .merge(health::router())
        .merge(api::router())
        .merge(console::router())
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                server::body_deadline(body_timeout, request, next)
            },
        ))
        .layer(axum::middleware::from_fn(count_request))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let path = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map(MatchedPath::as_str)
                    .unwrap_or("-");
                tracing::debug_span!("http", method = %req.method(), route = %path)
            }),
        )
        .with_state(state)
}
