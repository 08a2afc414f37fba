//! The JSON envelopes of the read API (DESIGN §6) around the records of
//! [`crate::store::model`], and its error body; all are also OpenAPI schemas.
//!
//! Guarantee: the document and the wire cannot drift — every shape a handler
//! serializes is declared here or in the store's model, with its schema.

use serde::Serialize;
use utoipa::ToSchema;

pub use crate::store::model::{
    AuditEntry, Event, EventStatus, Member, Onboarding, OnboardingStatus, OnboardingStep, Role,
    StepStatus, StepTarget, UserWorkspace, Workspace, WorkspaceStatus,
};

/// A page of members: `{"data": [...], "next": …}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberList {
    /// Active members, by user id.
    pub data: Vec<Member>,
    /// Pass as `after` to get the next page; null on the last page.
    #[schema(required = true, pattern = r"^[A-Za-z0-9_-]+$")]
    pub next: Option<String>,
}

/// A page of a user's workspaces: `{"data": [...], "next": …}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserWorkspaceList {
    /// Active memberships of active workspaces, by workspace id.
    pub data: Vec<UserWorkspace>,
    /// Pass as `after` to get the next page; null on the last page.
    #[schema(required = true, pattern = r"^[A-Za-z0-9_-]+$")]
    pub next: Option<String>,
}

/// A page of the audit log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Rows, newest first.
    pub data: Vec<AuditEntry>,
    /// Pass as `before` to get the next (older) page; null on the last page.
    #[schema(required = true)]
    pub next: Option<String>,
}

/// Body of `POST /v1/workspaces/{id}/onboarding/{step}`.
#[derive(Debug, ToSchema)]
pub struct StepUpdate {
    /// `completed`, or `skipped` (optional steps only).
    pub status: StepTarget,
}

/// Every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside [`ErrorBody`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`unauthorized`, `not_found`, …).
    #[schema(example = "not_found")]
    pub code: String,
    /// Human-readable message.
    pub message: String,
}
