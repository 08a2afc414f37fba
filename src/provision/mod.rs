//! Provisioning: applies Clerk events to the workspace state (DESIGN §5).
//!
//! Guarantee: each event's effect, its audit rows and its processing-log row commit
//! together; a svix id already applied is a no-op; an older version never overwrites
//! a newer one and tombstones are final, so any permutation of a history with any
//! duplicates converges to the state of the history applied in order.
//!
//! The worker (and `dlq replay`, `reconcile`) call [`Provisioner::apply_batch`]; it
//! is the only entry point that writes workspace state from events.
//!
//! Concurrency: before reading anything, a transaction takes transaction-scoped
//! advisory locks on the workspaces and users its events touch, in one global order
//! (workspaces, then users, each by id), so concurrent workers never interleave on
//! an entity and never deadlock on these locks. A batch takes the union of its
//! events' locks up front and applies its events in order in one transaction; if
//! any statement fails, the whole batch rolls back and its events are applied one
//! per transaction.

mod apply;
pub mod payload;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::config::ProvisioningSettings;
use payload::Decoded;

/// Who caused a change, as written in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// A webhook from Clerk.
    Clerk,
    /// `provisioner reconcile`.
    Reconcile,
    /// A replayed dead letter.
    Replay,
    /// The read API (onboarding writes).
    Api,
}

impl Actor {
    /// The actor's name in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Actor::Clerk => "clerk",
            Actor::Reconcile => "reconcile",
            Actor::Replay => "replay",
            Actor::Api => "api",
        }
    }
}

/// One event to apply.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Svix message id (dedup key).
    pub svix_id: String,
    /// Event type from the message (`type` property); empty when the message has
    /// none, and then the body's `type` is used. When both are given they must
    /// agree, else the event is a [`ProcessError::Payload`].
    pub kind: String,
    /// The webhook body as received.
    pub body: Vec<u8>,
    /// When intake queued it.
    pub received_at: DateTime<Utc>,
    /// Who caused it.
    pub actor: Actor,
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The effect was applied (status `processed`).
    Processed,
    /// Nothing to do for this service (status `ignored`).
    Ignored,
    /// Older than the state already applied, or hit a tombstone (status `superseded`).
    Superseded,
    /// The svix id was already applied; nothing was written.
    Duplicate,
}

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The payload cannot be applied as it is: dead-letter it (class `payload`).
    #[error("{0}")]
    Payload(String),
    /// A database failure: transient, retry later; never dead-letter for this alone.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Applies events with the configured plans, roles and onboarding steps.
#[derive(Debug, Clone)]
pub struct Provisioner {
    settings: Arc<ProvisioningSettings>,
    plans: Arc<Plans>,
}

/// Each plan's quotas as the parallel arrays the SQL binds.
#[derive(Debug, Default)]
pub(crate) struct Plans(BTreeMap<String, (Vec<String>, Vec<i64>)>);

impl Plans {
    fn new(settings: &ProvisioningSettings) -> Self {
        Self(
            settings
                .plans
                .iter()
                .map(|(plan, quotas)| {
                    let names = quotas.keys().cloned().collect();
                    let values = quotas.values().copied().collect();
                    (plan.clone(), (names, values))
                })
                .collect(),
        )
    }

    /// Quota names and limits of `plan` (empty for an unknown plan, which the
    /// validated settings never produce).
    pub(crate) fn quotas(&self, plan: &str) -> (&[String], &[i64]) {
        match self.0.get(plan) {
            Some((names, values)) => (names, values),
            None => (&[], &[]),
        }
    }
}

/// Times a single event is retried after a deadlock or serialization failure.
const CONFLICT_RETRIES: usize = 3;

impl Provisioner {
    /// A provisioner for these settings.
    pub fn new(settings: ProvisioningSettings) -> Self {
        let plans = Plans::new(&settings);
        Self {
            settings: Arc::new(settings),
            plans: Arc::new(plans),
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &ProvisioningSettings {
        &self.settings
    }

    /// Applies events, several per transaction when possible; one result per event,
    /// in order. A failing event never makes another fail: when a shared transaction
    /// fails the events are retried one by one.
    ///
    /// Malformed payloads are [`ProcessError::Payload`] without touching the
    /// database. When PostgreSQL is unreachable, every event that did not commit
    /// is [`ProcessError::Database`].
    pub async fn apply_batch(
        &self,
        pool: &PgPool,
        events: &[Incoming],
    ) -> Vec<Result<Outcome, ProcessError>> {
        let mut results: Vec<Option<Result<Outcome, ProcessError>>> =
            events.iter().map(|_| None).collect();
        let mut todo: Vec<(usize, Decoded)> = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            match payload::decode(&event.kind, &event.body) {
                Ok(d) => todo.push((i, d)),
                Err(e) => results[i] = Some(Err(ProcessError::Payload(e.0))),
            }
        }
        if todo.len() > 1 {
            match self.try_batch(pool, events, &todo).await {
                Ok(outcomes) => {
                    for ((i, _), outcome) in todo.iter().zip(outcomes) {
                        results[*i] = Some(Ok(outcome));
                    }
                    todo.clear();
                }
                Err(e) if is_connectivity(&e) => {
                    for (i, _) in &todo {
                        results[*i] = Some(Err(ProcessError::Database(copy_error(&e))));
                    }
                    todo.clear();
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = todo.len(), "batch failed; applying its events one by one");
                }
            }
        }
        // One transaction per event: a bad event fails alone.
        let mut down: Option<sqlx::Error> = None;
        for (i, decoded) in &todo {
            if let Some(e) = &down {
                results[*i] = Some(Err(ProcessError::Database(copy_error(e))));
                continue;
            }
            let result = self.apply_one(pool, &events[*i], decoded).await;
            results[*i] = Some(match result {
                Ok(outcome) => Ok(outcome),
                Err(e) if is_connectivity(&e) => {
                    down = Some(copy_error(&e));
                    Err(ProcessError::Database(e))
                }
                Err(e) if is_data_error(&e) => Err(ProcessError::Payload(format!(
                    "the payload cannot be stored: {e}"
                ))),
                Err(e) => Err(ProcessError::Database(e)),
            });
        }
        results
            .into_iter()
            .map(|r| r.expect("every event has a result"))
            .collect()
    }

    /// Applies decoded events in one transaction under the union of their locks,
    /// taken upfront in the global order.
    async fn try_batch(
        &self,
        pool: &PgPool,
        events: &[Incoming],
        todo: &[(usize, Decoded)],
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        let mut keys: Vec<String> = todo.iter().flat_map(|(_, d)| apply::lock_keys(d)).collect();
        apply::order_keys(&mut keys);
        let mut tx = pool.begin().await?;
        let mut outcomes = Vec::with_capacity(todo.len());
        let work = async {
            apply::lock(&mut tx, &keys).await?;
            let mut pending = apply::Pending::default();
            // No savepoints: any failed statement rolls the whole batch back and
            // its events are applied one per transaction, so a savepoint per event
            // would only cost a round trip and a subtransaction each.
            for (i, decoded) in todo {
                let outcome = apply::apply_event(
                    &mut tx,
                    &self.settings,
                    &self.plans,
                    &events[*i],
                    decoded,
                    &mut pending,
                )
                .await?;
                outcomes.push(outcome);
            }
            pending.flush(&mut tx).await
        };
        if let Err(e) = work.await {
            // Roll back now rather than when the pool recycles the connection, so
            // the batch's advisory locks are free before its events are retried
            // one by one on other connections.
            let _ = tx.rollback().await;
            return Err(e);
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// Applies one event in its own transaction, retrying deadlocks and
    /// serialization failures a few times.
    async fn apply_one(
        &self,
        pool: &PgPool,
        event: &Incoming,
        decoded: &Decoded,
    ) -> Result<Outcome, sqlx::Error> {
        let mut keys = apply::lock_keys(decoded);
        apply::order_keys(&mut keys);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = async {
                let mut tx = pool.begin().await?;
                let work = async {
                    apply::lock(&mut tx, &keys).await?;
                    let mut pending = apply::Pending::default();
                    let outcome = apply::apply_event(
                        &mut tx,
                        &self.settings,
                        &self.plans,
                        event,
                        decoded,
                        &mut pending,
                    )
                    .await?;
                    pending.flush(&mut tx).await?;
                    Ok::<_, sqlx::Error>(outcome)
                };
                match work.await {
                    Ok(outcome) => {
                        tx.commit().await?;
                        Ok(outcome)
                    }
                    Err(e) => {
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            }
            .await;
            match result {
                Err(e) if is_conflict(&e) && attempt < CONFLICT_RETRIES => {
                    tracing::debug!(svix_id = %event.svix_id, error = %e, "retrying event after a conflict");
                }
                other => return other,
            }
        }
    }

    /// Records a dead-lettered event in the processing log (status `dead`, the
    /// error, one more attempt). An event already applied (processed, ignored,
    /// superseded) keeps its status: it was applied, and a replay must stay a no-op.
    pub async fn record_dead(
        &self,
        pool: &PgPool,
        event: &Incoming,
        error: &str,
    ) -> Result<(), sqlx::Error> {
        // Best effort: the type and workspace are shown by `events list`, but a body
        // too broken to decode is still recorded.
        let decoded = payload::decode("", &event.body).ok();
        let kind = match (&decoded, event.kind.is_empty()) {
            (_, false) => event.kind.clone(),
            (Some(d), true) => d.kind.clone(),
            (None, true) => payload::peek_type(&event.body).unwrap_or_else(|| "unknown".to_owned()),
        };
        let workspace_id = decoded
            .as_ref()
            .and_then(|d| d.workspace_id().map(str::to_owned))
            .or_else(|| payload::peek_workspace_id(&event.body));
        sqlx::query(
            "insert into events (svix_id, type, workspace_id, status, error, attempts, received_at) \
             values ($1, $2, $3, 'dead', $4, 1, $5) \
             on conflict (svix_id) do update set error = excluded.error, \
               attempts = events.attempts + 1, processed_at = now() \
             where events.status = 'dead'",
        )
        .bind(&event.svix_id)
        .bind(kind)
        .bind(workspace_id)
        .bind(error)
        .bind(event.received_at)
        .execute(pool)
        .await?;
        Ok(())
    }
}

/// Errors that mean PostgreSQL is unreachable or going away: the event is fine,
/// the database is not.
pub fn is_connectivity(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // 08: connection exception; 57P01-03: shutdown / cannot connect now;
        // 53300: too many connections.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
        _ => false,
    }
}

/// Deadlock or serialization failure: retrying the same transaction may succeed.
fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

/// A value PostgreSQL refuses to store (class 22, data exception, e.g. a NUL
/// character in a name; class 54, e.g. an id too long to index): retrying cannot
/// help, the payload must be fixed.
fn is_data_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("54")))
}

/// `sqlx::Error` is not `Clone`; one outage is reported for several events.
fn copy_error(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::WorkerCrashed => sqlx::Error::WorkerCrashed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => sqlx::Error::Io(std::io::Error::other(other.to_string())),
    }
}
