//! Provisioning: applies Clerk events to the workspace state (DESIGN §5).
//!
//! Guarantee: each event's effect, its audit rows and its processing-log row commit
//! together; a svix id already applied is a no-op; an older version never overwrites
//! a newer one and tombstones are final, so any permutation of a history with any
//! duplicates converges to the state of the history applied in order.
//!
//! The worker calls [`Provisioner::apply_decoded`] with events it decoded once
//! (see `worker::delivery::DeliveredEvent::read`); other callers use
//! [`Provisioner::apply_batch`], which decodes and then does the same. They are the
//! only entry points that write workspace state from events, and both run every
//! transaction through one helper (`run_tx`: lock, apply, flush audit, commit).
//!
//! Concurrency: before reading anything, a transaction takes transaction-scoped
//! advisory locks on the workspaces and users its events touch, in one global order
//! (workspaces, then users, each by id), so concurrent workers never interleave on
//! an entity and never deadlock on these locks. A membership row belongs to a
//! workspace and a user; an event that writes rows holding only one of the two
//! locks (a workspace's deletion, a removal naming no user, `user.updated`,
//! `user.deleted`) locks those rows first, in membership id order, and decides on
//! them as they are then. A batch takes the union of its
//! events' locks up front and applies its events in order in one transaction; if
//! any statement fails, the whole batch rolls back and its events are applied one
//! per transaction.

mod apply;
pub mod billing;
mod event;
pub mod payload;

use std::sync::Arc;

use sqlx::PgPool;

use crate::clerk::EventType;
use crate::config::ProvisioningSettings;
use crate::db::{self, DbFault};
use payload::{Decoded, Undecodable};

use apply::Plans;

pub use apply::lock_keys;
pub use event::{Actor, Incoming, Outcome, ReadyEvent};

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The payload cannot be applied as it is: dead-letter it (class `payload`).
    #[error("{0}")]
    Payload(String),
    /// A database failure that is not about the payload: the worker holds the
    /// event while [`db::is_unavailable`] or [`db::is_transient`] says so, and
    /// sends anything else through its retry queues.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Applies events with the configured plans, roles and onboarding steps.
#[derive(Debug, Clone)]
pub struct Provisioner {
    settings: Arc<ProvisioningSettings>,
    plans: Arc<Plans>,
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
    /// is [`ProcessError::Database`]. Callers that decoded the events already (the
    /// worker) use [`Provisioner::apply_decoded`].
    pub async fn apply_batch(
        &self,
        pool: &PgPool,
        events: &[Incoming],
    ) -> Vec<Result<Outcome, ProcessError>> {
        let decoded: Vec<Result<Decoded, Undecodable>> =
            events.iter().map(Incoming::decode).collect();
        let ready: Vec<ReadyEvent<'_>> = events
            .iter()
            .zip(&decoded)
            .filter_map(|(incoming, d)| {
                Some(ReadyEvent {
                    incoming,
                    decoded: d.as_ref().ok()?,
                })
            })
            .collect();
        let mut applied = self.apply_decoded(pool, &ready).await.into_iter();
        decoded
            .iter()
            .map(|d| match d {
                Ok(_) => applied.next().expect("one result per decoded event"),
                Err(u) => Err(ProcessError::Payload(u.error.0.clone())),
            })
            .collect()
    }

    /// Applies decoded events like [`Provisioner::apply_batch`]; one result per
    /// event, in order.
    pub async fn apply_decoded(
        &self,
        pool: &PgPool,
        events: &[ReadyEvent<'_>],
    ) -> Vec<Result<Outcome, ProcessError>> {
        if events.len() > 1 {
            // The union of the events' locks, taken upfront in the global order.
            let mut keys: Vec<String> = events.iter().flat_map(|e| lock_keys(e.decoded)).collect();
            apply::order_keys(&mut keys);
            match self.run_tx(pool, &keys, events).await {
                Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
                // The server cannot take any of them now: no use trying one by one.
                Err(e) if server_down(&e) => {
                    return events
                        .iter()
                        .map(|_| Err(ProcessError::Database(copy_error(&e))))
                        .collect();
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = events.len(), "batch failed; applying its events one by one");
                }
            }
        }
        // One transaction per event: a bad event fails alone.
        let mut results = Vec::with_capacity(events.len());
        let mut down: Option<sqlx::Error> = None;
        for event in events {
            if let Some(e) = &down {
                results.push(Err(ProcessError::Database(copy_error(e))));
                continue;
            }
            results.push(match self.apply_one(pool, *event).await {
                Ok(outcome) => Ok(outcome),
                Err(e) => match db::fault(&e) {
                    DbFault::Unreachable | DbFault::ReadOnly => {
                        down = Some(copy_error(&e));
                        Err(ProcessError::Database(e))
                    }
                    DbFault::Data => Err(ProcessError::Payload(format!(
                        "the payload cannot be stored: {e}"
                    ))),
                    // A timeout or conflict is this event's (a row held elsewhere):
                    // the others still go ahead.
                    DbFault::Timeout | DbFault::Conflict | DbFault::Other => {
                        Err(ProcessError::Database(e))
                    }
                },
            });
        }
        results
    }

    /// Applies one event in its own transaction, retrying deadlocks and
    /// serialization failures a few times.
    async fn apply_one(
        &self,
        pool: &PgPool,
        event: ReadyEvent<'_>,
    ) -> Result<Outcome, sqlx::Error> {
        let mut keys = lock_keys(event.decoded);
        apply::order_keys(&mut keys);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.run_tx(pool, &keys, &[event]).await {
                Ok(mut outcomes) => return Ok(outcomes.remove(0)),
                Err(e) if db::is_transient(&e) && attempt < CONFLICT_RETRIES => {
                    tracing::debug!(
                        svix.id = %event.incoming.svix_id,
                        event.type = %event.incoming.kind_str(),
                        workspace.id = event.decoded.workspace_id(),
                        error = %e,
                        "retrying event after a conflict"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The one transaction of provisioning: lock `keys` (in the order given),
    /// apply `events` in order, flush their audit rows and statuses, commit. On any
    /// error it rolls back at once rather than when the pool recycles the
    /// connection, so the advisory locks are free before the events are retried
    /// on other connections.
    async fn run_tx(
        &self,
        pool: &PgPool,
        keys: &[String],
        events: &[ReadyEvent<'_>],
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let applied = apply::apply_events(&mut tx, &self.settings, &self.plans, keys, events).await;
        let outcomes = match applied {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e);
            }
        };
        tx.commit().await?;
        Ok(outcomes)
    }

    /// Sets a workspace's quotas to the configured limits of its plan (reconcile's
    /// repair of `quotas_stale`); true when something changed. An unknown or
    /// deleted workspace is left alone.
    pub async fn refresh_quotas(
        &self,
        pool: &PgPool,
        workspace_id: &str,
        actor: Actor,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let changed =
            apply::refresh_quotas(&mut tx, &self.plans, workspace_id, actor.as_str()).await?;
        tx.commit().await?;
        Ok(changed)
    }

    /// Records a dead-lettered event in the processing log (status `dead`, the
    /// error, one more attempt). An event already applied (processed, ignored,
    /// superseded) keeps its status: it was applied, and a replay must stay a no-op.
    /// Decodes the body itself; the worker, which has, calls
    /// [`Provisioner::record_dead_decoded`].
    pub async fn record_dead(
        &self,
        pool: &PgPool,
        event: &Incoming,
        error: &str,
    ) -> Result<(), sqlx::Error> {
        let decoded = payload::read("", &event.body);
        self.record_dead_decoded(pool, event, &decoded, error).await
    }

    /// [`Provisioner::record_dead`] with the body's decoding at hand. Best effort:
    /// the type and workspace are shown by `events list`, but a body too broken to
    /// decode is still recorded.
    pub async fn record_dead_decoded(
        &self,
        pool: &PgPool,
        event: &Incoming,
        decoded: &Result<Decoded, Undecodable>,
        error: &str,
    ) -> Result<(), sqlx::Error> {
        let (body_kind, workspace_id) = match decoded {
            Ok(d) => (Some(&d.kind), d.workspace_id()),
            Err(u) => (u.kind.as_ref(), u.workspace_id.as_deref()),
        };
        let kind = event
            .kind
            .as_ref()
            .or(body_kind)
            .map_or("unknown", EventType::as_str);
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

/// Whether PostgreSQL cannot take any transaction now (unreachable or read-only),
/// as opposed to a fault of one transaction (a timeout, a conflict, its data).
fn server_down(e: &sqlx::Error) -> bool {
    matches!(db::fault(e), DbFault::Unreachable | DbFault::ReadOnly)
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
