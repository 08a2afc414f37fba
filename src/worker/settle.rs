//! Working a batch to its end: screening, applying, and settling each delivery
//! (ack after the commit, a confirmed copy in a retry queue or the dead-letter
//! exchange, or holding it through a database outage).
//!
//! Guarantee: a delivery is acked only after its effect committed or a copy of it
//! was confirmed by the broker; a dead letter whose publish fails goes back to the
//! queue instead.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use futures_util::future::join_all;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use tokio::time::Instant;
use tracing::Instrument;

use super::delivery::{DeadClass, DeliveredEvent};
use super::failure::{self, Next};
use super::metrics::{self, Label};
use super::{Engine, Job};
use crate::broker::{OutgoingMessage, PublishError};
use crate::provision::{Outcome, ProcessError, ReadyEvent};

/// How long a retry or dead-letter publish keeps trying before the delivery is
/// rejected back to the queue instead.
const PUBLISH_BUDGET: Duration = Duration::from_secs(10);
/// How long one attempt to record a dead letter in the processing log may take
/// (the dead letter itself is already safe in the broker; see
/// `Engine::record_dead` for the attempts).
const RECORD_DEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// One delivery's settling (ack, retry, dead letter), run side by side with the
/// others of its batch.
type Settle<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

impl Engine {
    /// Reads a delivery and takes its in-flight permit.
    pub(super) async fn job(&self, delivery: Delivery) -> Job {
        let Delivery {
            data,
            properties,
            acker,
            ..
        } = delivery;
        let env = DeliveredEvent::read(&properties, data, Utc::now());
        let span = crate::event_span!(env.event.svix_id);
        if !env.type_name().is_empty() {
            span.record(crate::telemetry::EVENT_TYPE, env.type_name());
        }
        if let Some(workspace) = env.decoded.as_ref().ok().and_then(|d| d.workspace_id()) {
            span.record(crate::telemetry::WORKSPACE_ID, workspace);
        }
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
            span,
        }
    }

    /// Screens, applies and settles a batch.
    pub(super) async fn process(&self, jobs: Vec<Job>) {
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
                    let span = job.span.clone();
                    screened.push(Box::pin(
                        self.dead_letter(job, class, reason, attempts)
                            .instrument(span),
                    ));
                }
            }
        }
        tokio::join!(join_all(screened), self.apply(ready));
    }

    /// Applies events until each is settled: committed and acked, sent to a retry
    /// queue, dead-lettered, or — while PostgreSQL cannot take them (see
    /// [`failure::after_failure`]) — held with backoff and, once
    /// `worker.db_retry_max_ms` is spent, parked in the longest retry queue.
    async fn apply(&self, jobs: Vec<Job>) {
        let mut pending = jobs;
        let mut hold: Option<(backon::ExponentialBackoff, Instant)> = None;
        let mut held_gauge = metrics::Held::default();
        while !pending.is_empty() {
            // Borrowed from the jobs: a hold round copies neither bodies nor decodings.
            let events: Vec<ReadyEvent<'_>> = pending
                .iter()
                .map(|j| {
                    let decoded = j.env.decoded.as_ref().ok();
                    ReadyEvent {
                        incoming: &j.env.event,
                        decoded: decoded.expect("screened events are decoded"),
                    }
                })
                .collect();
            let mut results = self.provisioner.apply_decoded(&self.db, &events).await;
            if results.len() != events.len() {
                // A provisioner bug; treat it like a crash so nothing is acked blindly.
                panic!(
                    "apply_decoded returned {} results for {} events",
                    results.len(),
                    events.len()
                );
            }
            let mut held = Vec::new();
            let mut settle: Vec<Settle<'_>> = Vec::new();
            for (job, result) in pending.into_iter().zip(results.drain(..)) {
                let span = job.span.clone();
                match result {
                    Ok(outcome) => {
                        settle.push(Box::pin(self.commit(job, outcome).instrument(span)))
                    }
                    Err(error) => {
                        match failure::after_failure(&error, job.env.attempts, &self.topology) {
                            Next::Hold => {
                                if hold.is_none() {
                                    metrics::event(job.env.metric_type(), Label::Held);
                                    span.in_scope(|| {
                                        tracing::debug!(error = %error, "PostgreSQL cannot take the event now; holding it")
                                    });
                                }
                                held.push((job, error));
                            }
                            Next::Retry { queue, attempts } => settle.push(Box::pin(
                                self.retry(job, queue, attempts, error).instrument(span),
                            )),
                            Next::DeadLetter {
                                class,
                                reason,
                                attempts,
                            } => settle.push(Box::pin(
                                self.dead_letter(job, class, reason, attempts)
                                    .instrument(span),
                            )),
                        }
                    }
                }
            }
            held_gauge.set(held.len());
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
                    "PostgreSQL cannot take these events now (unreachable, read-only, timed out or in conflict); holding them and retrying"
                );
            }
            let mut jobs: Vec<Job> = held.into_iter().map(|(job, _)| job).collect();
            // A job whose channel died is back in the queue already; let it go.
            jobs.retain(|j| j.acker.usable());
            let pause = delays.next().unwrap_or(Duration::from_secs(5));
            if self.shutdown.is_cancelled() || Instant::now() + pause > *deadline {
                if let Some(queue) = failure::longest_retry_queue(&self.topology) {
                    let parked = join_all(jobs.into_iter().map(|job| {
                        let span = job.span.clone();
                        self.park(job, queue).instrument(span)
                    }))
                    .await;
                    jobs = parked.into_iter().flatten().collect();
                }
                if self.shutdown.is_cancelled() {
                    // Unacked, they return to the queue when the connection closes.
                    return;
                }
            }
            held_gauge.set(jobs.len());
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
        let kind = job.env.metric_type();
        metrics::event(kind, Label::Committed(outcome));
        metrics::processing_time(job.started.elapsed());
        if outcome != Outcome::Duplicate {
            metrics::lag(job.env.envelope_ms(), Utc::now().timestamp_millis());
        }
        tracing::debug!(outcome = ?outcome, "event committed");
        self.ack(&job).await;
    }

    /// Sends an event to a retry queue (confirmed), then acks it.
    async fn retry(&self, job: Job, queue: String, attempts: i64, error: ProcessError) {
        let headers = job.env.retry_headers(attempts);
        match self.publish_copy(&job.env, "", &queue, headers).await {
            Ok(()) => {
                metrics::event(job.env.metric_type(), Label::Retry);
                tracing::warn!(
                    attempts,
                    retry_queue = %queue,
                    error = %error,
                    "event failed; retrying later"
                );
                self.ack(&job).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot publish to the retry queue; returning the event to the queue");
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
                metrics::event(job.env.metric_type(), Label::Retry);
                tracing::info!(retry_queue = %queue, "PostgreSQL still cannot take the event; parked in the retry queue");
                self.ack(&job).await;
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot park the event; still holding it");
                Some(job)
            }
        }
    }

    /// Publishes a dead-lettered copy (confirmed), records it in the processing log,
    /// then acks; when the publish fails the event goes back to the queue instead —
    /// a dead letter is never acked away unless it is safe — and while PostgreSQL
    /// cannot record it the event is parked to be dead-lettered and recorded later,
    /// so the processing log always learns of it.
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
            tracing::error!(error = %e, "cannot publish the dead letter; returning the event to the queue");
            self.requeue(&job).await;
            return;
        }
        metrics::dead_lettered(class.as_str());
        metrics::event(env.metric_type(), Label::Dead);
        tracing::warn!(
            error_class = class.as_str(),
            attempts,
            reason = %reason,
            "event dead-lettered"
        );
        if env.has_message_id && !self.record_dead(env, &reason).await {
            // The processing log must learn of it: the original waits in the longest
            // retry queue, comes back, is dead-lettered again (a dead svix id is
            // processed afresh) and recorded then. The dead-letter queue may hold
            // that second copy; replaying both applies the event once.
            tracing::warn!(
                "PostgreSQL cannot record the dead letter now; the event waits in a retry queue to be recorded"
            );
            let parked = match failure::longest_retry_queue(&self.topology) {
                Some(queue) => self.park(job, queue).await,
                None => Some(job),
            };
            if let Some(job) = parked {
                self.requeue(&job).await;
            }
            return;
        }
        self.ack(&job).await;
    }

    /// Records a dead letter in the processing log, trying again with backoff while
    /// PostgreSQL cannot take it, for `worker.db_retry_max_ms` (at least
    /// [`RECORD_DEAD_TIMEOUT`]). False when it is still unrecorded for that reason
    /// (or the worker is stopping); any other error is logged and given up (true),
    /// as trying again would not help.
    async fn record_dead(&self, env: &DeliveredEvent, reason: &str) -> bool {
        let deadline = Instant::now() + self.db_retry_max.max(RECORD_DEAD_TIMEOUT);
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let recorded = tokio::time::timeout(
                RECORD_DEAD_TIMEOUT,
                self.provisioner
                    .record_dead_decoded(&self.db, &env.event, &env.decoded, reason),
            )
            .await;
            match recorded {
                Ok(Ok(())) => return true,
                Ok(Err(e)) if crate::db::is_unavailable(&e) || crate::db::is_transient(&e) => {
                    tracing::debug!(error = %e, "dead letter not recorded yet; trying again")
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "dead letter not recorded in the processing log");
                    return true;
                }
                Err(_) => tracing::debug!("recording the dead letter timed out; trying again"),
            }
            let pause = delays.next().unwrap_or(Duration::from_secs(2));
            if self.shutdown.is_cancelled() || Instant::now() + pause > deadline {
                return false;
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Publishes a copy of the event (same body, id, type and timestamp), retrying
    /// with backoff for a while: the publisher reconnects by itself.
    async fn publish_copy(
        &self,
        env: &DeliveredEvent,
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
        // The event type, or `unknown` when the message never said.
        let kind = env.routing_key();
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
                tracing::debug!("ack skipped: channel closed")
            }
            Err(e) => {
                tracing::debug!(error = %e, "ack failed: channel closed")
            }
        }
    }

    pub(super) async fn requeue(&self, job: &Job) {
        if let Err(e) = job.acker.reject(BasicRejectOptions { requeue: true }).await {
            tracing::debug!(error = %e, "reject failed: channel closed");
        }
    }
}
