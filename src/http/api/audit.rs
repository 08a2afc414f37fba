//! `GET /v1/workspaces/{id}/audit`: the workspace's audit trail, newest first.
//!
//! Guarantees: paging with `next` never repeats or skips a row because of rows
//! written meanwhile — the cursor is the last audit id served (rows only ever get
//! higher ids), wrapped so clients treat it as opaque. A workspace member's view
//! (`X-Acting-User`) shows every row's time, action, actor, subject and event id,
//! but of its `details` only the keys [`MEMBER_DETAILS`] allows for the row's
//! actor: never an operator's name, `replayed_by`, or the console's free text
//! (sync drift, dead-letter errors). An allow-list, so a key added to a row later
//! stays hidden from members until it is listed here. The service's own view
//! (no acting user) gets every row whole.

use axum::Json;
use axum::extract::{Query, State};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;

use super::access::WorkspaceAccess;
use super::model::{AuditEntry, AuditPage, ErrorBody};
use crate::http::AppState;
use crate::http::error::{ErrorCode, HttpError};
use crate::store;

/// Rows per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest `limit` accepted.
pub const MAX_LIMIT: i64 = 500;

/// Query parameters of the audit route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Rows per page, 1–500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// The `next` of the previous page (opaque, base64url): rows older than its
    /// last row. Any other value is `400 invalid_cursor`.
    #[param(pattern = r"^[A-Za-z0-9_-]+$")]
    pub before: Option<String>,
}

/// The `details` keys provisioning writes (actors `clerk`, `reconcile` and
/// `replay`): what changed (`before`, `after`, `plan`, `applied`, `source`), the
/// membership and its roles, why a member left (`reason`) and when a workspace was
/// deleted.
const PROVISIONING_DETAILS: &[&str] = &[
    "membership_id",
    "role",
    "clerk_role",
    "reason",
    "before",
    "after",
    "plan",
    "applied",
    "source",
    "deleted_at",
];

/// The `details` keys a workspace member sees, by actor; every other key, and
/// every key of an actor not listed, is left out of the member's view. Actor
/// `ops` (console actions) shows none: its rows carry the operator's name, sync
/// drift and dead-letter errors. A console replay's own row (`dead_letter.*`,
/// actor `replay`) keeps none of its keys either, as none is a provisioning key.
pub const MEMBER_DETAILS: [(&str, &[&str]); 5] = [
    ("clerk", PROVISIONING_DETAILS),
    ("reconcile", PROVISIONING_DETAILS),
    ("replay", PROVISIONING_DETAILS),
    ("api", &["from", "to", "acting_user"]),
    ("ops", &[]),
];

/// The row as a workspace member may see it: `details` cut to the keys
/// [`MEMBER_DETAILS`] allows for its actor (an object, empty when none is).
pub fn member_view(mut entry: AuditEntry) -> AuditEntry {
    let allowed = MEMBER_DETAILS
        .iter()
        .find(|(actor, _)| *actor == entry.actor)
        .map_or(&[][..], |(_, keys)| *keys);
    let kept = match std::mem::take(&mut entry.details) {
        Value::Object(map) => map
            .into_iter()
            .filter(|(key, _)| allowed.contains(&key.as_str()))
            .collect(),
        _ => serde_json::Map::new(),
    };
    entry.details = Value::Object(kept);
    entry
}

/// The cursor naming "rows older than audit id `id`".
pub fn encode_cursor(id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("audit:{id}"))
}

/// The audit id inside a cursor, or `None` when it is not one of ours.
pub fn decode_cursor(cursor: &str) -> Option<i64> {
    let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let text = std::str::from_utf8(&raw).ok()?;
    let id: i64 = text.strip_prefix("audit:")?.parse().ok()?;
    // Re-encoding must give the cursor back: no leading zeros, signs or padding.
    (id > 0 && encode_cursor(id) == cursor).then_some(id)
}

fn parse_limit(raw: Option<&str>) -> Result<i64, HttpError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    match raw.parse::<i64>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(HttpError::bad_request(
            ErrorCode::InvalidLimit,
            format!("limit must be an integer from 1 to {MAX_LIMIT}"),
        )),
    }
}

/// A page of the workspace's audit log.
///
/// With `X-Acting-User` (a workspace member's view) every row keeps its time,
/// action, actor, subject and event id, but `details` holds only the keys a member
/// may see for the row's actor: `clerk`, `reconcile` and `replay` rows
/// `membership_id`, `role`, `clerk_role`, `reason`, `before`, `after`, `plan`,
/// `applied`, `source`, `deleted_at`; `api` rows `from`, `to`, `acting_user`;
/// `ops` rows (console actions) none — never an operator's name, `replayed_by`,
/// sync drift or a dead letter's error. Without `X-Acting-User` rows are whole.
#[utoipa::path(
    get,
    path = "/v1/workspaces/{id}/audit",
    tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id"), AuditQuery),
    responses(
        (status = 200, description = "Audit rows, newest first, and the cursor of the next page; with X-Acting-User, `details` cut to the keys a member may see (see the description)", body = AuditPage),
        (status = 400, description = ErrorCode::InvalidLimit.describe(" (limit outside 1–500), `invalid_cursor` (before is not a `next` this API gave), `invalid_query` (a parameter repeated)"), body = ErrorBody),
        (status = 401, description = ErrorCode::Unauthorized.describe(": missing or invalid bearer token"), body = ErrorBody),
        (status = 404, description = "Never provisioned, or not visible to the acting user", body = ErrorBody),
        (status = 503, description = ErrorCode::DatabaseUnavailable.describe(", with Retry-After"), body = ErrorBody),
    ),
)]
pub async fn list_audit(
    State(state): State<AppState>,
    workspace: WorkspaceAccess,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, HttpError> {
    let Query(query) = query.map_err(|_| {
        HttpError::bad_request(
            ErrorCode::InvalidQuery,
            "query string must be limit=…&before=…",
        )
    })?;
    let limit = parse_limit(query.limit.as_deref())?;
    let before = match query.before.as_deref() {
        None => None,
        Some(cursor) => Some(decode_cursor(cursor).ok_or_else(|| {
            HttpError::bad_request(
                ErrorCode::InvalidCursor,
                "before must be a `next` value from this API",
            )
        })?),
    };
    // One row more than asked tells whether another page exists.
    let mut rows = store::audit(&state.db, &workspace.workspace_id, before, limit + 1).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|(audit_id, _)| encode_cursor(*audit_id))
    } else {
        None
    };
    let member = workspace.acting_user().is_some();
    Ok(Json(AuditPage {
        data: rows
            .into_iter()
            .map(|(_, entry)| if member { member_view(entry) } else { entry })
            .collect(),
        next,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_forgeries() {
        for id in [1, 42, i64::MAX] {
            assert_eq!(decode_cursor(&encode_cursor(id)), Some(id));
        }
        assert_eq!(decode_cursor("42"), None);
        assert_eq!(decode_cursor(""), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode("audit:042")), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode("audit:-1")), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode("audit:0")), None);
        assert_eq!(decode_cursor(&URL_SAFE_NO_PAD.encode("audit:+5")), None);
    }

    fn entry(actor: &str, details: Value) -> AuditEntry {
        AuditEntry {
            at: chrono::Utc::now(),
            action: "x".into(),
            actor: actor.into(),
            subject: Some("s".into()),
            details,
            event_id: Some("msg_1".into()),
        }
    }

    /// A member's view keeps only the listed keys of each actor and nothing of an
    /// unlisted actor or a non-object `details`.
    #[test]
    fn a_member_sees_only_the_allowed_details_of_each_actor() {
        let all = serde_json::json!({
            "operator": "alice", "replayed_by": "bob", "drift": ["x"], "error": "e",
            "membership_id": "orgmem_1", "before": {"role": "member"}, "from": "pending",
            "applied": 3,
        });
        let view = |actor: &str| member_view(entry(actor, all.clone())).details;
        let provisioning = serde_json::json!({
            "membership_id": "orgmem_1", "before": {"role": "member"}, "applied": 3,
        });
        assert_eq!(view("clerk"), provisioning);
        assert_eq!(view("reconcile"), provisioning);
        assert_eq!(view("replay"), provisioning);
        assert_eq!(view("api"), serde_json::json!({"from": "pending"}));
        assert_eq!(view("ops"), serde_json::json!({}));
        assert_eq!(view("someone_new"), serde_json::json!({}));
        let odd = member_view(entry("clerk", serde_json::json!("free text")));
        assert_eq!(odd.details, serde_json::json!({}));
        assert_eq!(
            (odd.subject.as_deref(), odd.event_id.as_deref()),
            (Some("s"), Some("msg_1"))
        );
    }

    #[test]
    fn limit_defaults_and_bounds() {
        assert_eq!(parse_limit(None).unwrap(), 50);
        assert_eq!(parse_limit(Some("1")).unwrap(), 1);
        assert_eq!(parse_limit(Some("500")).unwrap(), 500);
        for bad in ["0", "501", "-1", "abc", "", "1.5"] {
            assert!(parse_limit(Some(bad)).is_err(), "{bad}");
        }
    }
}
