//! Which workspace a read API request may see: the isolation rule, written once.
//!
//! Guarantee: a workspace route reaches its workspace only through a
//! [`WorkspaceAccess`] (or, for the one-round-trip read of the workspace itself, a
//! [`VisibleWorkspace`]); both are built only by [`WorkspaceAccess::grant`], whose
//! rule is that the trusted caller sees every provisioned workspace and an acting
//! user only one where they are an active member (which the store reports only
//! for active workspaces, and decides from the user's newest membership row there,
//! removed rows included, so a stale row never grants access). Everything else is
//! the same 404 as an id that never existed, so existence does not leak.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::Deserialize;
use sqlx::PgPool;

use super::auth::Caller;
use super::extract::Ids;
use super::model::{Role, Workspace, WorkspaceStatus};
use super::not_found;
use crate::http::AppState;
use crate::http::error::HttpError;
use crate::store::{self, Access};

/// A caller cleared to see one workspace. As a handler argument it authenticates
/// the caller, reads the workspace id from the `{id}` path segment and checks
/// access before the handler runs.
#[derive(Debug, Clone)]
pub struct WorkspaceAccess {
    /// Who is calling.
    pub caller: Caller,
    /// The workspace, as named in the path.
    pub workspace_id: String,
    /// The workspace's status (`deleted` only reaches the trusted caller).
    pub status: WorkspaceStatus,
    /// The acting user's role there; `None` for the trusted caller.
    pub role: Option<Role>,
}

impl WorkspaceAccess {
    /// The one rule: `access` as the store read it for `caller` (`None`: no such
    /// workspace) either clears the caller or is the 404 of a `what`.
    pub fn grant(
        caller: Caller,
        workspace_id: String,
        access: Option<Access>,
        what: &str,
    ) -> Result<Self, HttpError> {
        match access {
            Some(access) if caller.acting_user.is_none() || access.role.is_some() => Ok(Self {
                caller,
                workspace_id,
                status: access.status,
                role: access.role,
            }),
            _ => Err(not_found(what)),
        }
    }

    /// Reads the caller's access to a workspace and [`grant`](Self::grant)s it.
    pub async fn open(
        db: &PgPool,
        caller: Caller,
        workspace_id: String,
        what: &str,
    ) -> Result<Self, HttpError> {
        let access = store::access(db, &workspace_id, caller.acting_user.as_deref()).await?;
        Self::grant(caller, workspace_id, access, what)
    }

    /// The user the main app acts for, if any.
    pub fn acting_user(&self) -> Option<&str> {
        self.caller.acting_user.as_deref()
    }
}

/// The `{id}` of a workspace route (other segments are read by the handler).
#[derive(Debug, Deserialize)]
struct WorkspacePath {
    id: String,
}

/// The caller and the plausible workspace id, in the order every `/v1` route
/// refuses: 401/400 for the caller first, then 404 for an odd id.
async fn caller_and_id(parts: &mut Parts, state: &AppState) -> Result<(Caller, String), HttpError> {
    let caller = Caller::from_request_parts(parts, state).await?;
    let Ids(WorkspacePath { id }) = Ids::from_request_parts(parts, state).await?;
    Ok((caller, id))
}

impl FromRequestParts<AppState> for WorkspaceAccess {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        let (caller, id) = caller_and_id(parts, state).await?;
        Self::open(&state.db, caller, id, "workspace").await
    }
}

/// A workspace the caller may see, read with the caller's access in one round
/// trip (`GET /v1/workspaces/{id}` is the main app's hottest read).
#[derive(Debug)]
pub struct VisibleWorkspace(pub Workspace);

impl FromRequestParts<AppState> for VisibleWorkspace {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        let (caller, id) = caller_and_id(parts, state).await?;
        Self::read(&state.db, caller, id).await
    }
}

impl VisibleWorkspace {
    /// Reads the workspace `id` as `caller` may see it (the 404 otherwise).
    pub async fn read(db: &PgPool, caller: Caller, id: String) -> Result<Self, HttpError> {
        let found = store::workspace(db, &id, caller.acting_user.as_deref()).await?;
        let Some((workspace, access)) = found else {
            return Err(not_found("workspace"));
        };
        WorkspaceAccess::grant(caller, id, Some(access), "workspace")?;
        Ok(Self(workspace))
    }
}

/// The caller and the `{id}` of a workspace route, checked in the order every
/// route refuses (401/400 first, then an odd id), without reading the workspace:
/// for a route that must act before it can read (the just-in-time sync).
#[derive(Debug)]
pub struct WorkspaceTarget {
    /// Who is calling.
    pub caller: Caller,
    /// The workspace id of the path.
    pub workspace_id: String,
}

impl FromRequestParts<AppState> for WorkspaceTarget {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        let (caller, workspace_id) = caller_and_id(parts, state).await?;
        Ok(Self {
            caller,
            workspace_id,
        })
    }
}
