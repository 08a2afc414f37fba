//! Dead letters: list, show, replay and purge the events the worker gave up on
//! (DESIGN §1, §4). The CLI (`provisioner dlq`) and the ops console both act
//! through these functions; nothing here parses arguments or prints.
//!
//! Guarantee: nothing here loses or duplicates a dead letter. [`list`] and [`show`]
//! ([`view`]) change no letter (the broker's delivery count aside) and keep no
//! bodies but the one shown; [`replay`] ([`action`]) removes a dead copy only after
//! the broker confirmed its republished copy, so a crash mid-replay duplicates (the
//! worker deduplicates by svix id) but never loses; [`purge`] removes only what it
//! names. Dead letters not selected, and those arriving meanwhile, stay in their
//! order. See [`queue`] for how.

pub mod action;
pub mod letter;
mod lock;
pub mod queue;
pub mod view;

use std::time::Duration;

pub use action::{
    PurgeReport, ReplayError, ReplayFailure, ReplayOptions, ReplayReport, purge, replay, republish,
};
pub use letter::DeadLetter;
pub use queue::{DEFAULT_LOCK_WAIT, DeadQueue, Taken};
pub use view::{DeadMessage, Listing, Page, PageRequest, list, page, show};

/// Errors of the dead-letter operations; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The broker cannot be reached (URL shown without its password).
    #[error("cannot reach RabbitMQ at {url}: {reason}")]
    Unreachable {
        /// Redacted URL.
        url: String,
        /// Cause.
        reason: String,
    },
    /// The dead-letter queue is not declared.
    #[error(
        "dead-letter queue {queue} does not exist (run `provisioner migrate` to declare the broker topology)"
    )]
    QueueMissing {
        /// Queue name.
        queue: String,
    },
    /// Another `dlq` command kept the queue for too long.
    #[error("another dlq command is still working on {queue} after {waited:?}; try again later")]
    Busy {
        /// Queue name.
        queue: String,
        /// How long we waited.
        waited: Duration,
    },
    /// Named dead letters are not in the queue (nothing was changed).
    #[error("no dead letter with id {}; nothing was changed", .ids.join(", "))]
    NotFound {
        /// The missing svix ids.
        ids: Vec<String>,
    },
    /// The broker failed during the command.
    #[error("broker error: {0}")]
    Broker(String),
}

/// Which dead letters a replay or purge takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These svix ids (every copy of each).
    Ids(Vec<String>),
    /// Everything.
    All,
    /// One event type.
    Type(String),
    /// One workspace.
    Org(String),
}

impl Selection {
    /// Whether a dead letter is selected.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        match self {
            Selection::Ids(ids) => letter.id.as_ref().is_some_and(|id| ids.contains(id)),
            Selection::All => true,
            Selection::Type(t) => letter.kind.as_deref() == Some(t.as_str()),
            Selection::Org(o) => letter.workspace_id.as_deref() == Some(o.as_str()),
        }
    }
}
