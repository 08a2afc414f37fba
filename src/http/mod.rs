//! The HTTP side: webhook intake, the read API, health and metrics, and the one
//! error type they answer with.
//!
//! Guarantee: every route is built here, from the shared [`AppState`], and nothing
//! below `http` imports it back, so the handlers depend on the service's modules
//! and never the other way round; [`app`] is the whole application, so tests drive
//! it exactly as production serves it.

pub mod api;
pub mod error;
pub mod health;
pub mod intake;
pub mod server;

use std::sync::Arc;
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

/// The HTTP application: intake, read API, health and metrics.
///
/// Every request body must arrive within `[http] body_read_timeout_ms` of its head
/// ([`server::body_deadline`]).
pub fn app(state: AppState) -> Router {
    let body_timeout = Duration::from_millis(state.settings.http.body_read_timeout_ms);
    Router::new()
        .merge(intake::router(&state.settings.http))
        .merge(health::router())
        .merge(api::router())
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                server::body_deadline(body_timeout, request, next)
            },
        ))
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
