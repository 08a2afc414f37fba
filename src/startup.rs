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
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::{Publisher, Topology};
use crate::clerk::api::ClerkApi;
use crate::config::Settings;
use crate::http::{AppState, app};
use crate::intake::Verifier;
use crate::provision::Provisioner;
use crate::reconcile::{JustInTime, Reconciler};
use crate::{db, telemetry, worker};

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
    declare_topology(settings).await?;
    Ok(pool)
}

/// Declares the broker topology.
async fn declare_topology(settings: &Settings) -> anyhow::Result<()> {
    let topology = Topology::new(&settings.broker, &settings.worker);
    let conn = crate::broker::connect(&settings.broker.url, "provisioner-migrate")
        .await
        .with_context(|| format!("cannot reach RabbitMQ at {}", settings.broker.url))?;
    topology
        .declare_on(&conn)
        .await
        .context("declaring the broker topology")?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// The process's reconciler (one Backend API client, so every call shares one rate
/// limit); `None` without a `CLERK_SECRET_KEY`.
pub fn reconciler(settings: &Settings, pool: &PgPool) -> anyhow::Result<Option<Reconciler>> {
    if settings.clerk.secret_key.is_none() {
        return Ok(None);
    }
    let api = ClerkApi::new(&settings.clerk, &settings.reconcile)?;
    Ok(Some(Reconciler::new(
        api,
        Provisioner::new(settings.provisioning.clone()),
        pool.clone(),
        settings.reconcile.max_removals,
    )))
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
    ///
    /// Without the worker (intake and the read API only), PostgreSQL need not
    /// answer: intake needs only the broker, so the process starts anyway, applies
    /// the migrations in the background once PostgreSQL answers, and meanwhile
    /// the read API answers 503 `database_unavailable` (`db::prepare_or_defer`).
    pub async fn build(settings: Settings, options: ServeOptions) -> anyhow::Result<Self> {
        // The recorder first: a series set before it exists (the publisher's
        // connection gauge) would be lost.
        let metrics = telemetry::metrics_handle();
        let shutdown = CancellationToken::new();
        // A failed build stops what it started (the background migrations).
        let stop_on_failure = shutdown.clone().drop_guard();
        let pool = if options.worker {
            prepare(&settings).await?
        } else {
            let pool = db::prepare_or_defer(&settings.database, shutdown.clone())
                .await
                .context("preparing the database")?;
            declare_topology(&settings).await?;
            pool
        };
        let publisher = Publisher::start_with_channels(
            settings.broker.url.clone(),
            Topology::new(&settings.broker, &settings.worker),
            "provisioner-intake",
            Duration::from_millis(settings.broker.publish_timeout_ms),
            settings.broker.publish_channels,
            shutdown.clone(),
        );
        // Two connect deadlines: one slow handshake on a loaded broker is retried.
        if !publisher
            .wait_connected(2 * crate::broker::CONNECT_DEADLINE)
            .await
        {
            anyhow::bail!("cannot reach RabbitMQ at {}", settings.broker.url);
        }
        let listener = crate::http::server::bind(settings.http.listen)
            .with_context(|| format!("cannot listen on {}", settings.http.listen))?;
        let sync = JustInTime::new(reconciler(&settings, &pool)?);
        let state = AppState {
            sync,
            verifier: Arc::new(Verifier::new(&settings.clerk.webhook_secrets)),
            settings: Arc::new(settings),
            publisher,
            db: pool,
            metrics,
        };
        stop_on_failure.disarm();
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

        // The worker stops taking events as soon as the signal comes, while HTTP
        // drains; the publisher lives until HTTP has drained.
        let worker_stop = shutdown.child_token();
        let worker = if options.worker {
            let ctx = worker::WorkerContext {
                settings: state.settings.clone(),
                db: state.db.clone(),
            };
            let token = worker_stop.clone();
            Some(tokio::spawn(async move { worker::run(ctx, token).await }))
        } else {
            None
        };

        telemetry::poll::spawn(
            state.settings.broker.url.clone(),
            Topology::new(&state.settings.broker, &state.settings.worker),
            state.db.clone(),
            Duration::from_millis(state.settings.metrics.poll_interval_ms),
            shutdown.child_token(),
        );

        let _reconcile = crate::reconcile::spawn_scheduled(
            state.sync.reconciler(),
            state.settings.reconcile.interval_s,
            worker_stop.clone(),
        );

        let http_stop = CancellationToken::new();
        // One deadline for the whole drain (HTTP, then the worker), counted from
        // the signal, so the process exits within the grace period plus closing.
        let stopped_at = Arc::new(std::sync::OnceLock::<tokio::time::Instant>::new());
        {
            let http_stop = http_stop.clone();
            let stopped_at = stopped_at.clone();
            tokio::spawn(async move {
                signal.await;
                let _ = stopped_at.set(tokio::time::Instant::now());
                http_stop.cancel();
                worker_stop.cancel();
            });
        }
        let drain_deadline = {
            let stopped_at = stopped_at.clone();
            move || {
                stopped_at
                    .get()
                    .copied()
                    .unwrap_or_else(tokio::time::Instant::now)
                    + grace
            }
        };
        tracing::info!(listen = %addr, worker = options.worker, "serving");
        let server = crate::http::server::serve(
            listener,
            app(state.clone()),
            crate::http::server::Limits::of(&state.settings.http),
            http_stop.clone(),
        );
        // Graceful shutdown waits for every open connection; a client that never
        // finishes its request must not hold the process past the grace period.
        let deadline = async {
            http_stop.cancelled().await;
            tokio::time::sleep_until(drain_deadline()).await;
        };
        let served = tokio::select! {
            served = server => served,
            _ = deadline => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "HTTP connections still open after the grace period; closing them");
                Ok(())
            }
        };
        tracing::info!("HTTP drained");
        shutdown.cancel();
        if let Some(handle) = worker {
            // At least a moment for the worker to ack what it committed.
            let until =
                drain_deadline().max(tokio::time::Instant::now() + Duration::from_millis(500));
            match tokio::time::timeout_at(until, handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::error!(error = %format!("{e:#}"), "worker stopped with an error")
                }
                Ok(Err(e)) => tracing::error!(error = %e, "worker task panicked"),
                Err(_) => tracing::warn!("worker did not stop within the grace period"),
            }
        }
        // Bounded: a broker or database that stopped answering must not hold the exit.
        let _ = tokio::time::timeout(Duration::from_secs(1), state.publisher.close()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), state.db.close()).await;
        served.context("HTTP server failed")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Runs `provisioner worker`: the worker, the scheduled reconcile, the metrics
/// poll and, when `[metrics] worker_listen` is set, a listener for `/metrics` and
/// `/healthz`, until `signal` completes.
pub async fn run_worker(
    settings: Settings,
    signal: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The recorder first: a series set before it exists would be lost.
    let metrics = telemetry::metrics_handle();
    // Bound before the slow start, so a bad address fails at once.
    let listener = match settings.metrics.worker_listen {
        Some(addr) => Some(
            crate::http::server::bind(addr)
                .with_context(|| format!("cannot listen on {addr} (metrics.worker_listen)"))?,
        ),
        None => None,
    };
    let pool = prepare(&settings).await?;
    let ctx = worker::WorkerContext {
        settings: Arc::new(settings),
        db: pool,
    };
    let token = CancellationToken::new();
    let reconciler = reconciler(&ctx.settings, &ctx.db)?;
    let _reconcile = crate::reconcile::spawn_scheduled(
        reconciler.as_ref(),
        ctx.settings.reconcile.interval_s,
        token.clone(),
    );
    telemetry::poll::spawn(
        ctx.settings.broker.url.clone(),
        Topology::new(&ctx.settings.broker, &ctx.settings.worker),
        ctx.db.clone(),
        Duration::from_millis(ctx.settings.metrics.poll_interval_ms),
        token.child_token(),
    );
    let stop = token.clone();
    tokio::spawn(async move {
        signal.await;
        stop.cancel();
    });
    let http_stop = CancellationToken::new();
    if let Some(listener) = listener {
        tracing::info!(listen = %listener.local_addr()?, "serving /metrics and /healthz");
        let limits = crate::http::server::Limits::of(&ctx.settings.http);
        let stop = http_stop.clone();
        tokio::spawn(async move {
            let app = crate::http::health::worker_router(metrics);
            if let Err(e) = crate::http::server::serve(listener, app, limits, stop).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        });
    }
    let result = worker::run(ctx, token).await;
    http_stop.cancel();
    result
}

/// Completes on SIGTERM or Ctrl-C.
///
/// The handlers are installed when this is called, not when the future is first
/// polled: call it before building the application, so a SIGTERM that arrives while
/// the service starts or serves is always a graceful shutdown, never the default
/// "terminate at once".
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let wait = {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            let recv = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = recv(term) => {},
                _ = recv(int) => {},
            }
        }
    };
    #[cfg(not(unix))]
    let wait = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    async move {
        wait.await;
        tracing::info!("shutdown signal received");
    }
}
