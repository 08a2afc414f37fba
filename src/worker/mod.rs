//! The worker: consumes queued Clerk events and provisions them (DESIGN §4–§5).
//!
//! Guarantee: a delivery is acked only after its effect and processing-log row
//! committed, or after a copy of it was confirmed by the broker into a retry queue or
//! the dead-letter exchange. A payload that cannot be applied is dead-lettered with
//! its reason; PostgreSQL being unreachable holds events (in process, then in the
//! longest retry queue) and never dead-letters them; a lost broker connection is
//! rebuilt without a process restart.
//!
//! Flow, one file each: `session` holds one consumer connection (per-consumer
//! prefetch = `worker.concurrency`) and reads each delivery once
//! ([`delivery::DeliveredEvent::read`] is the one parse of its body); `lanes` deals
//! deliveries into lanes by the first advisory lock they take (the organization,
//! or the user of a user event), so two lanes never wait for each other's
//! workspace locks. Each lane gathers up to `worker.batch_size` deliveries for at
//! most `worker.batch_wait_ms` and runs them as one batch, one batch at a time;
//! while it runs, the next batch fills. `settle` screens the batch, applies it
//! through [`Provisioner::apply_decoded`] and settles every delivery. The lanes run
//! side by side, never more than `concurrency` events in flight. Retries and dead
//! letters go through a confirmed [`Publisher`] on a second connection.

pub mod delivery;
pub mod failure;
mod lanes;
pub mod metrics;
mod session;
mod settle;

use std::sync::Arc;
use std::time::Duration;

use lapin::Acker;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Endpoints, Publisher, Topology};
use crate::config::Settings;
use crate::provision::Provisioner;

use delivery::DeliveredEvent;
use session::{RECONNECT_MAX, RECONNECT_MIN, session};

/// What a worker needs.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// PostgreSQL pool (migrations applied).
    pub db: PgPool,
}

/// Consumes until `shutdown` is cancelled, then stops consuming, finishes and acks
/// in-flight events (within `http.shutdown_grace_ms`) and closes its connections.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let settings = ctx.settings;
    let topology = Topology::new(&settings.broker, &settings.worker);
    // The publisher outlives the consumer: in-flight events may still need to be
    // parked in a retry queue or dead-lettered while the worker drains.
    let publisher_stop = CancellationToken::new();
    let publisher = Publisher::start(
        settings.broker.url.clone(),
        topology.clone(),
        "provisioner-worker-publisher",
        Duration::from_millis(settings.broker.publish_timeout_ms),
        publisher_stop.clone(),
    );
    metrics::Connected::consumer_down();
    metrics::register();
    let concurrency = usize::from(settings.worker.concurrency);
    let engine = Arc::new(Engine {
        provisioner: Provisioner::new(settings.provisioning.clone()),
        db: ctx.db,
        publisher: publisher.clone(),
        endpoints: Endpoints::new(&settings.broker.url),
        prefetch: settings.worker.concurrency,
        batch_size: settings.worker.batch_size.min(concurrency),
        batch_wait: Duration::from_millis(settings.worker.batch_wait_ms),
        db_retry_max: Duration::from_millis(settings.worker.db_retry_max_ms),
        delivery_limit: settings.broker.delivery_limit,
        permits: Arc::new(Semaphore::new(concurrency)),
        shutdown: shutdown.clone(),
        topology,
    });
    // Leave the caller (serve's own grace timer) a margin to close the rest.
    let full_grace = Duration::from_millis(settings.http.shutdown_grace_ms);
    let grace = full_grace - full_grace / 8;
    tracing::info!(
        queue = %engine.topology.queue,
        concurrency,
        batch_size = engine.batch_size,
        batch_wait_ms = settings.worker.batch_wait_ms,
        "worker started"
    );

    let tasks = TaskTracker::new();
    let mut delay = RECONNECT_MIN;
    while !shutdown.is_cancelled() {
        match session(&engine, &tasks, &mut delay, grace).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "worker lost its broker connection; reconnecting"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RECONNECT_MAX);
            }
        }
    }

    // Batches of an earlier, lost session may still be finishing.
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            in_flight = tasks.len(),
            "worker grace period over; unacked events return to the queue"
        );
    }
    publisher.close().await;
    publisher_stop.cancel();
    tracing::info!("worker stopped");
    Ok(())
}

/// Shared by the consumer loop and every batch task.
#[derive(Debug)]
struct Engine {
    provisioner: Provisioner,
    db: PgPool,
    publisher: Publisher,
    topology: Topology,
    /// The broker's addresses: the consumer connects to the first that answers.
    endpoints: Endpoints,
    prefetch: u16,
    batch_size: usize,
    batch_wait: Duration,
    db_retry_max: Duration,
    delivery_limit: u32,
    /// One permit per event in flight, across reconnects.
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
}

/// One delivery being worked on.
#[derive(Debug, Clone)]
struct Job {
    env: Arc<DeliveredEvent>,
    acker: Acker,
    /// Released when the job is dropped, i.e. once the delivery is settled.
    _permit: Arc<OwnedSemaphorePermit>,
    started: Instant,
    /// The event's span (`svix.id`, `event.type`, `workspace.id`): every line
    /// logged while settling it is logged in it.
    span: tracing::Span,
}
