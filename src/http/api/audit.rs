//! `GET /v1/workspaces/{id}/audit`: the workspace's audit trail, newest first.
//!
//! Guarantee: paging with `next` never repeats or skips a row because of rows
//! written meanwhile — the cursor is the last audit id served (rows only ever get
//! higher ids), wrapped so clients treat it as opaque.

use axum::Json;
use axum::extract::{Query, State};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use utoipa::IntoParams;

use super::access::WorkspaceAccess;
use super::model::{AuditPage, ErrorBody};
use crate::http::AppState;
use crate::http::error::HttpError;
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
            "invalid_limit",
            format!("limit must be an integer from 1 to {MAX_LIMIT}"),
        )),
    }
}

/// A page of the workspace's audit log.
#[utoipa::path(
    get,
    path = "/v1/workspaces/{id}/audit",
    tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id"), AuditQuery),
    responses(
        (status = 200, description = "Audit rows, newest first, and the cursor of the next page", body = AuditPage),
        (status = 400, description = "`invalid_limit` (limit outside 1–500), `invalid_cursor` (before is not a `next` this API gave), `invalid_query` (a parameter repeated)", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "Never provisioned, or not visible to the acting user", body = ErrorBody),
        (status = 503, description = "`database_unavailable`, with Retry-After", body = ErrorBody),
    ),
)]
pub async fn list_audit(
    State(state): State<AppState>,
    workspace: WorkspaceAccess,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, HttpError> {
    let Query(query) = query.map_err(|_| {
        HttpError::bad_request("invalid_query", "query string must be limit=…&before=…")
    })?;
    let limit = parse_limit(query.limit.as_deref())?;
    let before = match query.before.as_deref() {
        None => None,
        Some(cursor) => Some(decode_cursor(cursor).ok_or_else(|| {
            HttpError::bad_request(
                "invalid_cursor",
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
    Ok(Json(AuditPage {
        data: rows.into_iter().map(|(_, entry)| entry).collect(),
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
