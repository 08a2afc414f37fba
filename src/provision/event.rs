//! One event to provision: who caused it, the message as received, the message
//! with its body decoded, and what applying it did.
//!
//! Guarantee: an [`Incoming`] is decoded by one parse of its body
//! ([`Incoming::decode`]), and its message type, when given, must agree with the
//! body's.

use chrono::{DateTime, Utc};

use super::payload::{self, Decoded, Undecodable};
use crate::clerk::EventType;

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
    /// Event type from the message (`type` property); `None` when the message has
    /// none, and then the body's `type` is used. When both are given they must
    /// agree, else the event is a [`ProcessError::Payload`](super::ProcessError::Payload).
    pub kind: Option<EventType>,
    /// The webhook body as received.
    pub body: Vec<u8>,
    /// When intake queued it.
    pub received_at: DateTime<Utc>,
    /// Who caused it.
    pub actor: Actor,
    /// For a replay from the ops console: the operator's session label, added to
    /// the details of the event's audit rows (`replayed_by`).
    pub replayed_by: Option<String>,
}

impl Incoming {
    /// The message's type as [`payload::read`] takes it (empty when absent).
    pub fn kind_str(&self) -> &str {
        self.kind.as_ref().map_or("", EventType::as_str)
    }

    /// Decodes the body under the message's type: the one parse of the body.
    pub fn decode(&self) -> Result<Decoded, Undecodable> {
        payload::read(self.kind_str(), &self.body)
    }
}

/// An event ready to apply: the message and its decoded body, both borrowed, so
/// a caller that tries again (the worker holding events through an outage) never
/// copies either.
#[derive(Debug, Clone, Copy)]
pub struct ReadyEvent<'a> {
    /// The message.
    pub incoming: &'a Incoming,
    /// Its body, decoded from [`Incoming::body`] (or built by the caller).
    pub decoded: &'a Decoded,
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
