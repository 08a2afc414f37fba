//! Provisioning: applies Clerk events to the workspace state (DESIGN §5).
//!
//! Guarantee: each event's effect, its audit rows and its processing-log row commit
//! together; a svix id already applied is a no-op; an older version never overwrites
//! a newer one and tombstones are final, so any permutation of a history with any
//! duplicates converges to the state of the history applied in order.
//!
//! The worker (and `dlq replay`, `reconcile`) call [`Provisioner::apply_batch`]; it
//! is the only entry point that writes workspace state from events.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::config::ProvisioningSettings;

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
    /// Event type from the message (`type` property), or from the body.
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
    settings: ProvisioningSettings,
}

impl Provisioner {
    /// A provisioner for these settings.
    pub fn new(settings: ProvisioningSettings) -> Self {
        Self { settings }
    }

    /// The settings in use.
    pub fn settings(&self) -> &ProvisioningSettings {
        &self.settings
    }

    /// Applies events, several per transaction when possible; one result per event,
    /// in order. A failing event never makes another fail: when a shared transaction
    /// fails the events are retried one by one.
    pub async fn apply_batch(
        &self,
        pool: &PgPool,
        events: &[Incoming],
    ) -> Vec<Result<Outcome, ProcessError>> {
        let _ = (pool, events);
        unimplemented!("provisioning is being built")
    }

    /// Records a dead-lettered event in the processing log (status `dead`).
    pub async fn record_dead(
        &self,
        pool: &PgPool,
        event: &Incoming,
        error: &str,
    ) -> Result<(), sqlx::Error> {
        let _ = (pool, event, error);
        unimplemented!("provisioning is being built")
    }
}
