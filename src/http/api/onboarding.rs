//! `POST /v1/workspaces/{id}/onboarding/{step}`: the main app records onboarding
//! progress.
//!
//! Guarantee: a change and its `onboarding.step_updated` audit row (actor `api`,
//! details `{from, to, acting_user}`) commit in one transaction, under a share lock
//! on the workspace, so a step is never changed on a workspace whose deletion
//! committed first, and a write that changes nothing writes no audit row.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;

use super::access::WorkspaceAccess;
use super::auth::Caller;
use super::extract::Ids;
use super::model::{
    ErrorBody, Onboarding, Role, StepStatus, StepTarget, StepUpdate, WorkspaceStatus,
};
use super::not_found;
use crate::http::AppState;
use crate::http::error::{ErrorCode, HttpError};
use crate::store::OnboardingWrite;

/// Parses `{"status":"completed"|"skipped"}`: 400 when it is not JSON, 422 when it
/// is JSON without a usable `status`.
pub fn parse_body(body: &[u8]) -> Result<StepTarget, HttpError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
        HttpError::bad_request(ErrorCode::InvalidJson, "body must be a JSON object")
    })?;
    value
        .get("status")
        .and_then(serde_json::Value::as_str)
        .and_then(|s| StepTarget::parse(s).ok())
        .ok_or_else(|| {
            HttpError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidStatus,
                r#"body must be {"status":"completed"} or {"status":"skipped"}"#,
            )
        })
}

/// Marks an onboarding step completed or skipped.
#[utoipa::path(
    post,
    path = "/v1/workspaces/{id}/onboarding/{step}",
    tag = "workspaces",
    params(
        ("id" = String, Path, description = "Workspace id"),
        ("step" = String, Path, description = "Step name (gong, hubspot, slack, starter_analysis, …)"),
    ),
    request_body = StepUpdate,
    responses(
        (status = 200, description = "The onboarding after the change", body = Onboarding),
        (status = 400, description = ErrorCode::InvalidJson.describe(" (the body is not JSON)"), body = ErrorBody),
        (status = 401, description = ErrorCode::Unauthorized.describe(": missing or invalid bearer token"), body = ErrorBody),
        (status = 403, description = ErrorCode::Forbidden.describe(": the acting user is a member but not an admin"), body = ErrorBody),
        (status = 404, description = "Unknown workspace or step, or not visible to the acting user", body = ErrorBody),
        (status = 409, description = ErrorCode::WorkspaceDeleted.describe(": the workspace is deleted"), body = ErrorBody),
        (status = 422, description = ErrorCode::InvalidStatus.describe(" (status is not completed/skipped), `step_required` (skips a required step)"), body = ErrorBody),
        (status = 503, description = ErrorCode::DatabaseUnavailable.describe(", with Retry-After"), body = ErrorBody),
    ),
)]
pub async fn update_step(
    State(state): State<AppState>,
    caller: Caller,
    Ids((id, step)): Ids<(String, String)>,
    body: Bytes,
) -> Result<Json<Onboarding>, HttpError> {
    let (mut write, access) =
        OnboardingWrite::begin(&state.db, &id, &step, caller.acting_user.as_deref()).await?;
    // Not the WorkspaceAccess extractor: the access must be read under the
    // write's share lock, so a deletion cannot commit between check and write.
    let access = WorkspaceAccess::grant(caller, id, access, "workspace")?;
    let acting = access.acting_user();
    if acting.is_some() && access.role != Some(Role::Admin) {
        return Err(HttpError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "only a workspace admin may change onboarding",
        ));
    }
    if access.status == WorkspaceStatus::Deleted {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            ErrorCode::WorkspaceDeleted,
            "the workspace is deleted",
        ));
    }
    let current = write
        .step()
        .await?
        .ok_or_else(|| not_found("onboarding step"))?;
    let target = parse_body(&body)?;
    if target == StepTarget::Skipped && current.required {
        return Err(HttpError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::StepRequired,
            format!("{step} is required and cannot be skipped"),
        ));
    }
    if current.status != StepStatus::from(target) {
        write.set(current.status, target, acting).await?;
    }
    Ok(Json(write.commit().await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_syntax_errors_are_400_and_bad_values_422() {
        assert_eq!(
            parse_body(br#"{"status":"completed"}"#).unwrap(),
            StepTarget::Completed
        );
        assert_eq!(
            parse_body(br#"{"status":"skipped","x":1}"#).unwrap(),
            StepTarget::Skipped
        );
        for bad in [&b"{"[..], b"", b"status=completed", b"{\"status\":"] {
            assert_eq!(parse_body(bad).unwrap_err().status, StatusCode::BAD_REQUEST);
        }
        for bad in [
            &br#"{"status":"pending"}"#[..],
            br#"{"status":"Completed"}"#,
            br#"{"status":1}"#,
            br#"{}"#,
            br#"[]"#,
            br#""completed""#,
        ] {
            assert_eq!(
                parse_body(bad).unwrap_err().status,
                StatusCode::UNPROCESSABLE_ENTITY
            );
        }
    }
}
