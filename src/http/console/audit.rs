//! The console's own audit rows and log lines.
//!
//! Guarantee: every console action that changes something writes one `audit_log`
//! row per thing it changed — actor `ops`, or `replay` for a replay (as `dlq
//! replay`'s changes are), always with the operator's label in `details.operator` —
//! and one log line with `svix.id` and `workspace.id`. The row is written after the
//! action succeeded (a replay or purge happens on the broker, outside any
//! transaction of ours), so a row never claims what did not happen.

use serde_json::Value;
use sqlx::PgPool;
use sqlx::types::Json;

/// Who an audit row names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// A console action.
    Ops,
    /// A replay started from the console (the worker's changes say `replay` too).
    Replay,
}

impl Actor {
    fn as_str(self) -> &'static str {
        match self {
            Actor::Ops => "ops",
            Actor::Replay => "replay",
        }
    }
}

/// One console action, as audited.
#[derive(Debug, Clone)]
pub struct Action<'a> {
    /// `dead_letter.replayed`, `dead_letter.purged`, `workspace.synced`.
    pub action: &'static str,
    /// Actor of the row.
    pub actor: Actor,
    /// The workspace it is about; `None` for a dead letter that names none.
    pub workspace_id: Option<&'a str>,
    /// The svix id it is about.
    pub event_id: Option<&'a str>,
    /// The operator's session label.
    pub operator: &'a str,
    /// Context; `operator` is added.
    pub details: Value,
}

/// Writes the audit row and the log line of an action. A failed write is logged
/// (with the ids, so the action can still be traced) and returned.
pub async fn record(db: &PgPool, action: Action<'_>) -> sqlx::Result<()> {
    let mut details = action.details.clone();
    if let Value::Object(map) = &mut details {
        map.insert("operator".to_owned(), Value::from(action.operator));
    }
    tracing::info!(
        svix.id = action.event_id.unwrap_or("-"),
        workspace.id = action.workspace_id.unwrap_or("-"),
        operator = action.operator,
        actor = action.actor.as_str(),
        "ops console: {}",
        action.action
    );
    let written = sqlx::query(
        "insert into audit_log (workspace_id, action, actor, subject, details, event_id) \
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(action.workspace_id)
    .bind(action.action)
    .bind(action.actor.as_str())
    .bind(action.event_id.or(action.workspace_id))
    .bind(Json(details))
    .bind(action.event_id)
    .execute(db)
    .await;
    if let Err(e) = &written {
        tracing::error!(
            error = %e,
            svix.id = action.event_id.unwrap_or("-"),
            workspace.id = action.workspace_id.unwrap_or("-"),
            operator = action.operator,
            "ops console: the audit row of {} was not written",
            action.action
        );
    }
    written.map(|_| ())
}
