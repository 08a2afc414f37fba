//! `GET /v1/events/{svix_id}`: the processing log, for the main app and ops.
//!
//! Guarantee: with `X-Acting-User`, an event is shown only when it names a
//! workspace the user may see; otherwise it is the same 404 as an unknown id.

use axum::Json;
use axum::extract::State;

use super::access::WorkspaceAccess;
use super::auth::Caller;
use super::extract::Ids;
use super::model::{ErrorBody, Event};
use super::not_found;
use crate::http::AppState;
use crate::http::error::{ErrorCode, HttpError};
use crate::store;

/// What happened to one webhook event.
#[utoipa::path(
    get,
    path = "/v1/events/{svix_id}",
    tag = "events",
    params(("svix_id" = String, Path, description = "Svix message id")),
    responses(
        (status = 200, description = "The processing-log row", body = Event),
        (status = 401, description = ErrorCode::Unauthorized.describe(": missing or invalid bearer token"), body = ErrorBody),
        (status = 404, description = "No worker has seen it yet (or, with X-Acting-User, it is not about a workspace the user may see)", body = ErrorBody),
        (status = 503, description = ErrorCode::DatabaseUnavailable.describe(", with Retry-After"), body = ErrorBody),
    ),
)]
pub async fn get_event(
    State(state): State<AppState>,
    caller: Caller,
    Ids(svix_id): Ids<String>,
) -> Result<Json<Event>, HttpError> {
    let event = store::event(&state.db, &svix_id)
        .await?
        .ok_or_else(|| not_found("event"))?;
    // The trusted caller sees every event; an acting user only those about a
    // workspace they may see.
    if caller.acting_user.is_some() {
        let workspace = event
            .workspace_id
            .clone()
            .ok_or_else(|| not_found("event"))?;
        WorkspaceAccess::open(&state.db, caller, workspace, "event").await?;
    }
    Ok(Json(event))
}
