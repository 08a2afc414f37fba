//! Workspace, member and org-switcher reads.
//!
//! Guarantee: with `X-Acting-User`, a workspace answers only to its active members
//! while it is active — every other case is the same 404 as a workspace that never
//! existed — and a user's workspace list shows only active memberships of active
//! workspaces. The two lists page by key (user id, workspace id), see [`super::page`].

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;

use super::access::{VisibleWorkspace, WorkspaceAccess, WorkspaceTarget};
use super::auth::Caller;
use super::extract::Ids;
use super::model::{ErrorBody, Member, MemberList, UserWorkspaceList, Workspace};
use super::not_found;
use super::page::{self, List, PageQuery};
use crate::http::AppState;
use crate::http::error::{ErrorCode, HttpError};
use crate::reconcile::{Found, SyncError};
use crate::store;

/// One workspace: plan, quotas, onboarding and member counts.
#[utoipa::path(
    get,
    path = "/v1/workspaces/{id}",
    tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id (Clerk organization id)")),
    responses(
        (status = 200, description = "The workspace (deleted ones only without X-Acting-User)", body = Workspace),
        (status = 401, description = ErrorCode::Unauthorized.describe(": missing or invalid bearer token"), body = ErrorBody),
        (status = 404, description = "Never provisioned, or not visible to the acting user", body = ErrorBody),
        (status = 503, description = ErrorCode::DatabaseUnavailable.describe(", with Retry-After"), body = ErrorBody),
    ),
)]
pub async fn get_workspace(VisibleWorkspace(workspace): VisibleWorkspace) -> Json<Workspace> {
    Json(workspace)
}

/// Fetches the workspace from Clerk now and provisions it (and its memberships),
/// then answers like `GET /v1/workspaces/{id}`: for the main app when a workspace
/// it was just sent to is not provisioned yet.
#[utoipa::path(
    post,
    path = "/v1/workspaces/{id}/sync",
    tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id (Clerk organization id)")),
    responses(
        (status = 200, description = "Synced; the workspace as GET /v1/workspaces/{id} shows it", body = Workspace),
        (status = 401, description = ErrorCode::Unauthorized.describe(": missing or invalid bearer token"), body = ErrorBody),
        (status = 404, description = "Clerk has no such organization (the workspace is left as it is), or the acting user is not an active member after the sync", body = ErrorBody),
        (status = 501, description = ErrorCode::ReconcileNotConfigured.describe(": this service has no CLERK_SECRET_KEY (no Retry-After)"), body = ErrorBody),
        (status = 503, description = ErrorCode::ClerkUnavailable.describe(" (Clerk could not be reached, kept failing or refused the key), `database_unavailable`, with Retry-After; `clerk_misconfigured` (CLERK_SECRET_KEY belongs to another Clerk instance than CLERK_INSTANCE_ID), without"), body = ErrorBody),
    ),
)]
pub async fn sync_workspace(
    State(state): State<AppState>,
    target: WorkspaceTarget,
) -> Result<Json<Workspace>, HttpError> {
    let retry_after = state.settings.http.retry_after_secs;
    match state.sync.sync(&target.workspace_id).await {
        Ok(Found::Present) => {}
        Ok(Found::Gone) => return Err(not_found("workspace")),
        Err(SyncError::NotConfigured) => {
            // Not a passing state: no Retry-After (DESIGN §6).
            return Err(HttpError::new(
                StatusCode::NOT_IMPLEMENTED,
                ErrorCode::ReconcileNotConfigured,
                "this service has no CLERK_SECRET_KEY, so it cannot sync from Clerk",
            ));
        }
        Err(SyncError::Clerk(reason)) => {
            tracing::warn!(workspace_id = %target.workspace_id, error = %reason, "sync from Clerk failed");
            return Err(HttpError::unavailable(
                ErrorCode::ClerkUnavailable,
                format!("Clerk could not be asked: {reason}"),
                retry_after,
            ));
        }
        Err(SyncError::Misconfigured(reason)) => {
            tracing::error!(workspace_id = %target.workspace_id, error = %reason, "sync refused");
            // No Retry-After: trying again does not help until ops fix the settings.
            return Err(HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ClerkMisconfigured,
                reason,
            ));
        }
        Err(SyncError::Database {
            message,
            unavailable,
        }) => {
            tracing::warn!(workspace_id = %target.workspace_id, error = %message, "sync failed in the database");
            return Err(if unavailable {
                HttpError::unavailable(
                    ErrorCode::DatabaseUnavailable,
                    "the database is unavailable; try again",
                    retry_after,
                )
            } else {
                HttpError::internal(message)
            });
        }
    }
    let VisibleWorkspace(workspace) =
        VisibleWorkspace::read(&state.db, target.caller, target.workspace_id).await?;
    Ok(Json(workspace))
}

/// A page of the active members of a workspace, by user id.
#[utoipa::path(
    get,
    path = "/v1/workspaces/{id}/members",
    tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id"), PageQuery),
    responses(
        (status = 200, description = "Active members by user id (none for a deleted workspace), and the cursor of the next page", body = MemberList),
        (status = 400, description = ErrorCode::InvalidLimit.describe(" (limit outside 1–500), `invalid_cursor` (after is not a `next` of this list), `invalid_query`"), body = ErrorBody),
        (status = 401, description = ErrorCode::Unauthorized.describe(": missing or invalid bearer token"), body = ErrorBody),
        (status = 404, description = "Never provisioned, or not visible to the acting user", body = ErrorBody),
        (status = 503, description = ErrorCode::DatabaseUnavailable.describe(", with Retry-After"), body = ErrorBody),
    ),
)]
pub async fn list_members(
    State(state): State<AppState>,
    workspace: WorkspaceAccess,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<MemberList>, HttpError> {
    let Query(query) = query.map_err(|_| page::invalid_query())?;
    let list = List::Members(&workspace.workspace_id);
    let page = list.page(&query)?;
    let keyset = store::Keyset {
        after: page.after.as_deref(),
        limit: page.fetch(),
    };
    let rows = store::members(&state.db, &workspace.workspace_id, None, keyset).await?;
    let (data, next) = list.finish(&page, rows, |m| &m.user_id);
    Ok(Json(MemberList { data, next }))
}

/// One active member of a workspace.
#[utoipa::path(
    get,
    path = "/v1/workspaces/{id}/members/{user_id}",
    tag = "workspaces",
    params(
        ("id" = String, Path, description = "Workspace id"),
        ("user_id" = String, Path, description = "Clerk user id"),
    ),
    responses(
        (status = 200, description = "The member", body = Member),
        (status = 401, description = ErrorCode::Unauthorized.describe(": missing or invalid bearer token"), body = ErrorBody),
        (status = 404, description = "No such workspace or no such active member, or not visible to the acting user", body = ErrorBody),
        (status = 503, description = ErrorCode::DatabaseUnavailable.describe(", with Retry-After"), body = ErrorBody),
    ),
)]
pub async fn get_member(
    State(state): State<AppState>,
    workspace: WorkspaceAccess,
    Ids((_workspace_id, user_id)): Ids<(String, String)>,
) -> Result<Json<Member>, HttpError> {
    let one = store::Keyset {
        after: None,
        limit: 1,
    };
    let member = store::members(&state.db, &workspace.workspace_id, Some(&user_id), one)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| not_found("member"))?;
    Ok(Json(member))
}

/// A user's workspaces (the org switcher).
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/workspaces",
    tag = "users",
    params(("user_id" = String, Path, description = "Clerk user id"), PageQuery),
    responses(
        (status = 200, description = "Active memberships of active workspaces by workspace id (empty for an unknown user), and the cursor of the next page", body = UserWorkspaceList),
        (status = 400, description = ErrorCode::InvalidLimit.describe(" (limit outside 1–500), `invalid_cursor` (after is not a `next` of this list), `invalid_query`"), body = ErrorBody),
        (status = 401, description = ErrorCode::Unauthorized.describe(": missing or invalid bearer token"), body = ErrorBody),
        (status = 404, description = "X-Acting-User names another user: one user cannot list another's workspaces", body = ErrorBody),
        (status = 503, description = ErrorCode::DatabaseUnavailable.describe(", with Retry-After"), body = ErrorBody),
    ),
)]
pub async fn list_user_workspaces(
    State(state): State<AppState>,
    caller: Caller,
    Ids(user_id): Ids<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<UserWorkspaceList>, HttpError> {
    // Another user's memberships would reveal workspaces the acting user is not in.
    if caller.acting_user.as_ref().is_some_and(|u| *u != user_id) {
        return Err(not_found("user"));
    }
    let Query(query) = query.map_err(|_| page::invalid_query())?;
    let list = List::UserWorkspaces(&user_id);
    let page = list.page(&query)?;
    let keyset = store::Keyset {
        after: page.after.as_deref(),
        limit: page.fetch(),
    };
    let rows = store::user_workspaces(&state.db, &user_id, keyset).await?;
    let (data, next) = list.finish(&page, rows, |w| &w.workspace_id);
    Ok(Json(UserWorkspaceList { data, next }))
}
