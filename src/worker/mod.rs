//! The worker: consumes queued Clerk events and provisions them (DESIGN §4–§5).
//!
//! Guarantee: a delivery is acked only after its effect and processing-log row
//! committed, or after a copy of it was confirmed by the broker into a retry queue or
//! the dead-letter exchange. A payload that cannot be applied is dead-lettered with
//! its reason; PostgreSQL being unreachable holds events (in process, then in the
//! longest retry queue) and never dead-letters them; a lost broker connection is
//! rebuilt without a process restart.
//!
//! Flow: one consumer connection (per-consumer prefetch = `worker.concurrency`)
//! deals deliveries into lanes by subject (the organization, or the user of a user
//! event), so two lanes never wait for each other's workspace locks. Each lane
//! gathers up to `worker.batch_size` deliveries for at most `worker.batch_wait_ms`
//! and runs them as one batch through [`Provisioner::apply_batch`], one batch at a
//! time; while it runs, the next batch fills. The lanes run side by side, never more
//! than `concurrency` events in flight. Without lanes, consecutive batches of a
//! stream share a workspace at their boundary and each waited for the previous
//! one's commit. Retries and dead letters go through a confirmed [`Publisher`] on a
//! second connection.

pub mod delivery;
pub mod failure;
pub mod metrics;

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use futures_util::{FutureExt, StreamExt, future::join_all};
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{self, OutgoingMessage, PublishError, Publisher, Topology};
use crate::config::{ConnectionUrl, Settings};
use crate::provision::{Incoming, Outcome, ProcessError, Provisioner};

use delivery::{DeadClass, Envelope};
use failure::Next;
use metrics::Label;

/// What a worker needs.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// PostgreSQL pool (migrations applied).
    pub db: PgPool,
}

/// Why a consumer session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect to the broker: {0}")]
    Connect(lapin::Error),
    #[error("cannot set up the consumer: {0}")]
    Setup(lapin::Error),
    #[error("consumer connection failed: {0}")]
    Lost(lapin::Error),
    #[error("the broker cancelled the consumer")]
    Cancelled,
}

/// How long a retry or dead-letter publish keeps trying before the delivery is
/// rejected back to the queue instead.
const PUBLISH_BUDGET: Duration = Duration::from_secs(10);
/// How long recording a dead letter in the processing log may take: best effort,
/// the dead letter itself is already safe in the broker.
const RECORD_DEAD_TIMEOUT: Duration = Duration::from_secs(5);
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

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
    let concurrency = usize::from(settings.worker.concurrency);
    let engine = Arc::new(Engine {
        provisioner: Provisioner::new(settings.provisioning.clone()),
        db: ctx.db,
        publisher: publisher.clone(),
        url: settings.broker.url.clone(),
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

/// One consumer connection, from connect to loss or graceful shutdown.
async fn session(
    engine: &Arc<Engine>,
    tasks: &TaskTracker,
    delay: &mut Duration,
    grace: Duration,
) -> Result<(), SessionError> {
    let conn = broker::connect(&engine.url, "provisioner-worker")
        .await
        .map_err(SessionError::Connect)?;
    let result = consume(engine, tasks, &conn, delay, grace).await;
    // Closing requeues whatever is still unacked on this connection.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        conn.close(200, "worker stopping".into()),
    )
    .await;
    result
}

async fn consume(
    engine: &Arc<Engine>,
    tasks: &TaskTracker,
    conn: &Connection,
    delay: &mut Duration,
    grace: Duration,
) -> Result<(), SessionError> {
    let channel = conn.create_channel().await.map_err(SessionError::Setup)?;
    engine
        .topology
        .declare(&channel)
        .await
        .map_err(SessionError::Setup)?;
    // Per-consumer prefetch (global: false). RabbitMQ 3.10 answers global QoS on a
    // quorum queue with a connection-level NOT_IMPLEMENTED that kills every channel.
    channel
        .basic_qos(engine.prefetch, BasicQosOptions { global: false })
        .await
        .map_err(SessionError::Setup)?;
    let tag = format!("provisioner-worker-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            engine.topology.queue.as_str().into(),
            tag.as_str().into(),
            // no_ack: false — manual acks, only after the commit.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(SessionError::Setup)?;
    tracing::info!(queue = %engine.topology.queue, prefetch = engine.prefetch, "worker consuming");
    *delay = RECONNECT_MIN;

    let lanes = Lanes::start(engine, tasks);
    loop {
        let next = tokio::select! {
            biased;
            _ = engine.shutdown.cancelled() => break,
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(d)) => lanes.deal(engine.job(d).await),
            Some(Err(e)) => return Err(SessionError::Lost(e)),
            None => return Err(SessionError::Cancelled),
        }
    }

    // Graceful stop: cancel the consumer, then process what was already prefetched
    // (requeueing it would count as a failed delivery against the delivery limit).
    let deadline = Instant::now() + grace;
    let _ = tokio::time::timeout_at(
        deadline,
        channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    drain(engine, &lanes, &mut consumer, deadline).await;
    // The lanes finish what they hold once their senders are gone.
    drop(lanes);
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = tasks.len(),
            "worker grace period over; unacked events return to the queue"
        );
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        channel.close(200, "worker stopping".into()),
    )
    .await;
    Ok(())
}

/// Processes the deliveries still buffered after the consumer was cancelled.
async fn drain(engine: &Arc<Engine>, lanes: &Lanes, consumer: &mut Consumer, deadline: Instant) {
    while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, consumer.next()).await {
        match tokio::time::timeout_at(deadline, engine.job(d)).await {
            Ok(job) => lanes.deal(job),
            Err(_) => break,
        }
    }
}

/// The batchers of one consumer session, one per lane.
struct Lanes {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
}

impl Lanes {
    /// Two lanes per batch that fits in the prefetch window: enough to keep
    /// PostgreSQL busy while one lane commits, few enough to keep batches large.
    fn count(engine: &Engine) -> usize {
        let window = usize::from(engine.prefetch).max(1);
        (window.div_ceil(engine.batch_size.max(1)) * 2).clamp(1, 16)
    }

    fn start(engine: &Arc<Engine>, tasks: &TaskTracker) -> Self {
        let senders = (0..Self::count(engine))
            .map(|_| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tasks.spawn(lane(engine.clone(), rx));
                tx
            })
            .collect();
        Self { senders }
    }

    /// Hands a job to the lane of its subject (events without one spread by id).
    fn deal(&self, job: Job) {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        match &job.env.subject {
            Some(subject) => subject.hash(&mut h),
            None => job.env.event.svix_id.hash(&mut h),
        }
        let n = (h.finish() % self.senders.len() as u64) as usize;
        if self.senders[n].send(job).is_err() {
            // A lane ends only with its sender, or by a panic outside `run_batch`'s
            // guard. The unacked delivery returns to the queue with the channel.
            tracing::error!(
                lane = n,
                "worker lane is gone; the delivery will be redelivered"
            );
        }
    }
}

/// One lane: gathers a batch (the first job, then whatever arrives within
/// `batch_wait`, up to `batch_size`) and runs it to the end before the next.
async fn lane(engine: Arc<Engine>, mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = Vec::with_capacity(engine.batch_size);
        batch.push(first);
        let deadline = Instant::now() + engine.batch_wait;
        while batch.len() < engine.batch_size {
            // Jobs already waiting join even when the wait is zero.
            match tokio::time::timeout_at(deadline, jobs.recv()).await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        run_batch(engine.clone(), batch).await;
    }
}

/// Shared by the consumer loop and every batch task.
#[derive(Debug)]
struct Engine {
    provisioner: Provisioner,
    db: PgPool,
    publisher: Publisher,
    topology: Topology,
    url: ConnectionUrl,
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
    env: Arc<Envelope>,
    acker: Acker,
    /// Released when the job is dropped, i.e. once the delivery is settled.
    _permit: Arc<OwnedSemaphorePermit>,
    started: Instant,
}

type Settle<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Runs one batch; if it panics, its unsettled events run again one by one, and an
/// event that panics alone goes back to the queue (where the delivery limit stops
/// it from crashing workers forever).
async fn run_batch(engine: Arc<Engine>, jobs: Vec<Job>) {
    let backup = jobs.clone();
    if AssertUnwindSafe(engine.process(jobs))
        .catch_unwind()
        .await
        .is_ok()
    {
        return;
    }
    let unsettled: Vec<Job> = backup.into_iter().filter(|j| j.acker.usable()).collect();
    tracing::error!(
        events = unsettled.len(),
        "a batch panicked; retrying its events one by one"
    );
    for job in unsettled {
        let again = job.clone();
        if AssertUnwindSafe(engine.process(vec![job]))
            .catch_unwind()
            .await
            .is_err()
            && again.acker.usable()
        {
            tracing::error!(
                svix_id = %again.env.event.svix_id,
                event_type = %again.env.event.kind,
                delivery_count = again.env.delivery_count,
                "processing the event panicked; returning it to the queue"
            );
            engine.requeue(&again).await;
        }
    }
}

impl Engine {
    /// Reads a delivery and takes its in-flight permit.
    async fn job(&self, delivery: Delivery) -> Job {
        let Delivery {
            data,
            properties,
            acker,
            ..
        } = delivery;
        let env = Envelope::read(&properties, data, Utc::now());
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the permit semaphore is never closed");
        Job {
            env: Arc::new(env),
            acker,
            _permit: Arc::new(permit),
            started: Instant::now(),
        }
    }

    /// Screens, applies and settles a batch.
    async fn process(&self, jobs: Vec<Job>) {
        metrics::batch_size(jobs.len());
        let mut ready = Vec::with_capacity(jobs.len());
        let mut screened: Vec<Settle<'_>> = Vec::new();
        for job in jobs {
            match job.env.screen(self.delivery_limit) {
                None => ready.push(job),
                Some((class, reason)) => {
                    let attempts = job.env.attempts
                        + match class {
                            // Every one of those deliveries was an attempt that died.
                            DeadClass::DeliveryLimit => job.env.delivery_count,
                            _ => 1,
                        };
                    screened.push(Box::pin(self.dead_letter(job, class, reason, attempts)));
                }
            }
        }
        tokio::join!(join_all(screened), self.apply(ready));
    }

    /// Applies events until each is settled: committed and acked, sent to a retry
    /// queue, dead-lettered, or — while PostgreSQL is unreachable — held and, once
    /// `worker.db_retry_max_ms` is spent, parked in the longest retry queue.
    async fn apply(&self, jobs: Vec<Job>) {
        let mut pending = jobs;
        let mut hold: Option<(backon::ExponentialBackoff, Instant)> = None;
        while !pending.is_empty() {
            let events: Vec<Incoming> = pending.iter().map(|j| j.env.event.clone()).collect();
            let mut results = self.provisioner.apply_batch(&self.db, &events).await;
            if results.len() != events.len() {
                // A provisioner bug; treat it like a crash so nothing is acked blindly.
                panic!(
                    "apply_batch returned {} results for {} events",
                    results.len(),
                    events.len()
                );
            }
            let mut held = Vec::new();
            let mut settle: Vec<Settle<'_>> = Vec::new();
            for (job, result) in pending.into_iter().zip(results.drain(..)) {
                match result {
                    Ok(outcome) => settle.push(Box::pin(self.commit(job, outcome))),
                    Err(error) => {
                        match failure::after_failure(&error, job.env.attempts, &self.topology) {
                            Next::Hold => {
                                if hold.is_none() {
                                    metrics::event(&job.env.event.kind, Label::Held);
                                }
                                held.push((job, error));
                            }
                            Next::Retry { queue, attempts } => {
                                settle.push(Box::pin(self.retry(job, queue, attempts, error)));
                            }
                            Next::DeadLetter {
                                class,
                                reason,
                                attempts,
                            } => settle
                                .push(Box::pin(self.dead_letter(job, class, reason, attempts))),
                        }
                    }
                }
            }
            join_all(settle).await;
            if held.is_empty() {
                return;
            }

            let first_hold = hold.is_none();
            let (delays, deadline) = hold.get_or_insert_with(|| {
                let delays = ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .without_max_times()
                    .build();
                (delays, Instant::now() + self.db_retry_max)
            });
            if first_hold {
                tracing::warn!(
                    events = held.len(),
                    error = %held[0].1,
                    "PostgreSQL unreachable; holding events and retrying"
                );
            }
            let mut jobs: Vec<Job> = held.into_iter().map(|(job, _)| job).collect();
            // A job whose channel died is back in the queue already; let it go.
            jobs.retain(|j| j.acker.usable());
            let pause = delays.next().unwrap_or(Duration::from_secs(5));
            if self.shutdown.is_cancelled() || Instant::now() + pause > *deadline {
                if let Some(queue) = failure::longest_retry_queue(&self.topology) {
                    let parked = join_all(jobs.into_iter().map(|job| self.park(job, queue))).await;
                    jobs = parked.into_iter().flatten().collect();
                }
                if self.shutdown.is_cancelled() {
                    // Unacked, they return to the queue when the connection closes.
                    return;
                }
            }
            if jobs.is_empty() {
                return;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            pending = jobs;
        }
    }

    /// Acks a committed event.
    async fn commit(&self, job: Job, outcome: Outcome) {
        let kind = metric_type(&job.env.event.kind);
        metrics::event(kind, Label::Committed(outcome));
        metrics::processing_time(job.started.elapsed());
        if outcome != Outcome::Duplicate {
            metrics::lag(job.env.envelope_ms, Utc::now().timestamp_millis());
        }
        tracing::debug!(svix_id = %job.env.event.svix_id, event_type = %job.env.event.kind, outcome = ?outcome, "event committed");
        self.ack(&job).await;
    }

    /// Sends an event to a retry queue (confirmed), then acks it.
    async fn retry(&self, job: Job, queue: String, attempts: i64, error: ProcessError) {
        let headers = job.env.retry_headers(attempts);
        match self.publish_copy(&job.env, "", &queue, headers).await {
            Ok(()) => {
                metrics::event(metric_type(&job.env.event.kind), Label::Retry);
                tracing::warn!(
                    svix_id = %job.env.event.svix_id,
                    event_type = %job.env.event.kind,
                    attempts,
                    retry_queue = %queue,
                    error = %error,
                    "event failed; retrying later"
                );
                self.ack(&job).await;
            }
            Err(e) => {
                tracing::error!(svix_id = %job.env.event.svix_id, error = %e, "cannot publish to the retry queue; returning the event to the queue");
                self.requeue(&job).await;
            }
        }
    }

    /// Moves a held event to the longest retry queue (`x-attempts` unchanged), then
    /// acks it; gives it back when the publish failed.
    async fn park(&self, job: Job, queue: &str) -> Option<Job> {
        let headers = job.env.retry_headers(job.env.attempts);
        match self.publish_copy(&job.env, "", queue, headers).await {
            Ok(()) => {
                metrics::event(metric_type(&job.env.event.kind), Label::Retry);
                tracing::info!(svix_id = %job.env.event.svix_id, retry_queue = %queue, "PostgreSQL still unreachable; event parked in the retry queue");
                self.ack(&job).await;
                None
            }
            Err(e) => {
                tracing::warn!(svix_id = %job.env.event.svix_id, error = %e, "cannot park the event; still holding it");
                Some(job)
            }
        }
    }

    /// Publishes a dead-lettered copy (confirmed), records it in the processing log
    /// (best effort), then acks; when the publish fails the event goes back to the
    /// queue instead — a dead letter is never acked away unless it is safe.
    async fn dead_letter(&self, job: Job, class: DeadClass, reason: String, attempts: i64) {
        if !job.acker.usable() {
            // The channel died: the broker requeued the original already.
            return;
        }
        let env = &job.env;
        let failed_at = Utc::now().timestamp_millis();
        let headers = env.dead_headers(class, &reason, attempts, failed_at);
        let exchange = self.topology.dead_letter_exchange.as_str();
        if let Err(e) = self
            .publish_copy(env, exchange, env.routing_key(), headers)
            .await
        {
            tracing::error!(svix_id = %env.event.svix_id, error = %e, "cannot publish the dead letter; returning the event to the queue");
            self.requeue(&job).await;
            return;
        }
        metrics::dead_lettered(class.as_str());
        metrics::event(metric_type(&env.event.kind), Label::Dead);
        tracing::warn!(
            svix_id = %env.event.svix_id,
            event_type = %env.event.kind,
            error_class = class.as_str(),
            attempts,
            reason = %reason,
            "event dead-lettered"
        );
        if env.has_message_id {
            let recorded = tokio::time::timeout(
                RECORD_DEAD_TIMEOUT,
                self.provisioner.record_dead(&self.db, &env.event, &reason),
            )
            .await;
            match recorded {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(svix_id = %env.event.svix_id, error = %e, "dead letter not recorded in the processing log")
                }
                Err(_) => {
                    tracing::warn!(svix_id = %env.event.svix_id, "dead letter not recorded in the processing log: timed out")
                }
            }
        }
        self.ack(&job).await;
    }

    /// Publishes a copy of the event (same body, id, type and timestamp), retrying
    /// with backoff for a while: the publisher reconnects by itself.
    async fn publish_copy(
        &self,
        env: &Envelope,
        exchange: &str,
        routing_key: &str,
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let deadline = Instant::now() + PUBLISH_BUDGET;
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build();
        let kind = if env.event.kind.is_empty() {
            env.routing_key()
        } else {
            env.event.kind.as_str()
        };
        loop {
            let result = self
                .publisher
                .publish(OutgoingMessage {
                    exchange,
                    routing_key,
                    body: &env.event.body,
                    message_id: &env.event.svix_id,
                    kind,
                    timestamp: env.timestamp,
                    headers: Some(headers.clone()),
                })
                .await;
            let pause = delays.next().unwrap_or(Duration::from_secs(2));
            match result {
                Ok(()) => return Ok(()),
                Err(e) if self.shutdown.is_cancelled() || Instant::now() + pause > deadline => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "publish failed; retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    async fn ack(&self, job: &Job) {
        match job.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            // The channel is gone: the broker redelivers the event, and the processing
            // log turns the redelivery into a no-op.
            Ok(false) => {
                tracing::debug!(svix_id = %job.env.event.svix_id, "ack skipped: channel closed")
            }
            Err(e) => {
                tracing::debug!(svix_id = %job.env.event.svix_id, error = %e, "ack failed: channel closed")
            }
        }
    }

    async fn requeue(&self, job: &Job) {
        if let Err(e) = job.acker.reject(BasicRejectOptions { requeue: true }).await {
            tracing::debug!(svix_id = %job.env.event.svix_id, error = %e, "reject failed: channel closed");
        }
    }
}

/// The `type` label: handled types as they are, anything else folded into `other`
/// so a stray message cannot create unbounded series.
fn metric_type(kind: &str) -> &str {
    if crate::clerk::is_handled(kind) {
        kind
    } else {
        "other"
    }
}
