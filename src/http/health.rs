//! `/healthz`, `/readyz` and `/metrics`.
//!
//! Guarantee: `/readyz` answers 200 only while both PostgreSQL and the broker answer,
//! so a load balancer stops sending webhooks that could only get 503; and however
//! often it is asked, it queries PostgreSQL at most once per [`READINESS_TTL`], so
//! probes (or a flood of them) never take the worker's pooled connections.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::http::AppState;

/// How long one database check answers `/readyz`.
pub const READINESS_TTL: Duration = Duration::from_secs(1);

/// The last database check and when it ran; one per application.
#[derive(Debug)]
pub struct CachedCheck {
    ttl: Duration,
    last: Mutex<Option<(Instant, bool)>>,
}

impl CachedCheck {
    /// A cache whose answers last `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            last: Mutex::new(None),
        }
    }

    /// The last result if younger than the TTL, else `check`'s. Callers arriving
    /// while a check runs wait for it and take its result: at most one check at a
    /// time, and at most one per TTL.
    pub async fn get<F: Future<Output = bool>>(&self, check: impl FnOnce() -> F) -> bool {
        let mut last = self.last.lock().await;
        if let Some((at, ok)) = *last
            && at.elapsed() < self.ttl
        {
            return ok;
        }
        let ok = check().await;
        *last = Some((Instant::now(), ok));
        ok
    }
}

/// Health and metrics routes (public).
pub fn router() -> Router<AppState> {
    // Built once per application, so the cache is its own.
    let database = Arc::new(CachedCheck::new(READINESS_TTL));
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(move |state: State<AppState>| readyz(state, database.clone())),
        )
        .route("/metrics", get(metrics))
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>, cache: Arc<CachedCheck>) -> impl IntoResponse {
    let database = cache
        .get(|| async {
            tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::query("select 1").execute(&state.db),
            )
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
        })
        .await;
    crate::telemetry::poll::database_connected(database);
    let broker = state.publisher.is_connected().await;
    let status = if database && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "checks": {"database": word(database), "broker": word(broker)}
        })),
    )
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    render(&state.metrics)
}

fn render(handle: &PrometheusHandle) -> impl IntoResponse + use<> {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}

/// `provisioner worker`'s own listener (`[metrics] worker_listen`): `/metrics`
/// and a `/healthz` that answers while the process runs.
pub fn worker_router(handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(move || async move { render(&handle) }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_readiness_checks_share_one_query_per_ttl() {
        let cache = Arc::new(CachedCheck::new(Duration::from_secs(1)));
        let checks = Arc::new(AtomicUsize::new(0));
        let ask = |cache: Arc<CachedCheck>, checks: Arc<AtomicUsize>| async move {
            cache
                .get(|| async {
                    checks.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    true
                })
                .await
        };

        // 200 at once: one check, every caller gets its answer.
        let answers =
            futures_util::future::join_all((0..200).map(|_| ask(cache.clone(), checks.clone())))
                .await;
        assert!(answers.iter().all(|ok| *ok));
        assert_eq!(checks.load(Ordering::SeqCst), 1);

        // Still fresh: no check; past the TTL: one more.
        ask(cache.clone(), checks.clone()).await;
        assert_eq!(checks.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        ask(cache.clone(), checks.clone()).await;
        assert_eq!(checks.load(Ordering::SeqCst), 2);
    }
}
