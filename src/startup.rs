//! Builds the application from settings and runs it until a shutdown signal.
//!
//! Guarantee: tests and production start the same code — the listener and the
//! shutdown signal are injected — and shutdown drains: the listener stops accepting,
//! in-flight requests and publishes finish, the worker acks what it committed, then
//! connections close.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::MatchedPath;
use axum::http::Request;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::broker::{Publisher, Topology};
use crate::config::Settings;
use crate::intake::Verifier;
use crate::{api, db, health, intake, telemetry, worker};

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
}

/// The HTTP application: intake, read API, health and metrics.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(intake::router())
        .merge(health::router())
        .merge(api::router())
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

/// Which roles this process plays.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Run the worker beside HTTP (`serve` without `--no-worker`).
    pub worker: bool,
}

/// Prepares PostgreSQL and the broker topology (the `migrate` command, and the
/// first step of `serve` and `worker`).
pub async fn prepare(settings: &Settings) -> anyhow::Result<PgPool> {
    let pool = db::prepare(&settings.database)
        .await
        .context("preparing the database")?;
    let topology = Topology::new(&settings.broker, &settings.worker);
    let conn = crate::broker::connect(&settings.broker.url, "provisioner-migrate")
        .await
        .with_context(|| format!("cannot reach RabbitMQ at {}", settings.broker.url))?;
    let channel = conn.create_channel().await.context("opening a channel")?;
    topology
        .declare(&channel)
        .await
        .context("declaring the broker topology")?;
    let _ = conn.close(200, "done".into()).await;
    Ok(pool)
}

/// A built application, bound to its listener, ready to run.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    state: AppState,
    options: ServeOptions,
    shutdown: CancellationToken,
}

impl Application {
    /// Creates the database if missing, applies migrations, connects to the broker
    /// (declaring the topology) and binds the configured listener (port 0 = any).
    pub async fn build(settings: Settings, options: ServeOptions) -> anyhow::Result<Self> {
        let pool = prepare(&settings).await?;
        let shutdown = CancellationToken::new();
        let publisher = Publisher::start(
            settings.broker.url.clone(),
            Topology::new(&settings.broker, &settings.worker),
            "provisioner-intake",
            Duration::from_millis(settings.http.publish_timeout_ms),
            shutdown.clone(),
        );
        if !publisher.wait_connected(Duration::from_secs(15)).await {
            anyhow::bail!("cannot reach RabbitMQ at {}", settings.broker.url);
        }
        let listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.http.listen))?;
        let state = AppState {
            verifier: Arc::new(Verifier::new(&settings.clerk.webhook_secrets)),
            settings: Arc::new(settings),
            publisher,
            db: pool,
            metrics: telemetry::metrics_handle(),
        };
        Ok(Self {
            listener,
            state,
            options,
            shutdown,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The shared state (tests use its pool and publisher).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` completes, then drains and returns.
    pub async fn run(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            options,
            shutdown,
        } = self;
        let grace = Duration::from_millis(state.settings.http.shutdown_grace_ms);
        let addr = listener.local_addr()?;

        let worker = if options.worker {
            let ctx = worker::WorkerContext {
                settings: state.settings.clone(),
                db: state.db.clone(),
            };
            let token = shutdown.child_token();
            Some(tokio::spawn(async move { worker::run(ctx, token).await }))
        } else {
            None
        };

        let http_stop = CancellationToken::new();
        {
            let http_stop = http_stop.clone();
            tokio::spawn(async move {
                signal.await;
                http_stop.cancel();
            });
        }
        tracing::info!(listen = %addr, worker = options.worker, "serving");
        let server = axum::serve(listener, app(state.clone()))
            .with_graceful_shutdown(http_stop.clone().cancelled_owned());
        let served = server.await;
        tracing::info!("HTTP drained; stopping the worker");
        shutdown.cancel();
        if let Some(handle) = worker {
            match tokio::time::timeout(grace, handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::error!(error = %format!("{e:#}"), "worker stopped with an error")
                }
                Ok(Err(e)) => tracing::error!(error = %e, "worker task panicked"),
                Err(_) => tracing::warn!("worker did not stop within the grace period"),
            }
        }
        state.publisher.close().await;
        state.db.close().await;
        served.context("HTTP server failed")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
