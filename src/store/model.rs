//! The records the read queries return, which are also the JSON shapes of the
//! read API (DESIGN §6) and its OpenAPI schemas.
//!
//! Guarantee: every timestamp leaves as RFC 3339 in UTC with a `Z` suffix and
//! millisecond precision (`2024-05-28T08:00:00.000Z`), and every enumerated value
//! is one of the variants named here, so the document and the wire cannot drift.
//! Every field is always sent: an `Option` field is null when absent, never left
//! out, so its schema says `required = true` (required and nullable).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

// One Role for config, provisioning and the API; re-exported so `model::Role` still names it.
use crate::domain::text_enum;
pub use crate::domain::{EventStatus, Role, UnknownValue};

/// Serializes timestamps as RFC 3339 UTC (`…Z`), milliseconds.
pub mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};

    /// The wire form of one timestamp.
    pub fn format(at: &DateTime<Utc>) -> String {
        at.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// `#[serde(serialize_with)]` for `DateTime<Utc>`.
    pub fn serialize<S: serde::Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(at))
    }

    /// `#[serde(serialize_with)]` for `Option<DateTime<Utc>>` (null when absent).
    pub fn serialize_opt<S: serde::Serializer>(
        at: &Option<DateTime<Utc>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => s.serialize_str(&format(at)),
            None => s.serialize_none(),
        }
    }
}

text_enum!(
    /// Whether a workspace is live or tombstoned.
    WorkspaceStatus, "workspace status" {
        /// Provisioned and not deleted.
        Active = "active",
        /// Deleted in Clerk; a final tombstone whose data is kept.
        Deleted = "deleted",
    }
);

text_enum!(
    /// State of one onboarding step.
    StepStatus, "step status" {
        /// Not done yet.
        Pending = "pending",
        /// Done.
        Completed = "completed",
        /// Passed over (optional steps only).
        Skipped = "skipped",
    }
);

text_enum!(
    /// State of the whole onboarding.
    OnboardingStatus, "onboarding status" {
        /// Some step still stands in the way (a required step not completed, or an
        /// optional one neither completed nor skipped).
        Pending = "pending",
        /// Every required step completed, every optional one completed or skipped.
        Completed = "completed",
    }
);

/// One onboarding step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct OnboardingStep {
    /// Step name (`gong`, `hubspot`, `slack`, `starter_analysis`, …).
    #[schema(example = "gong")]
    pub name: String,
    /// A required step cannot be skipped.
    pub required: bool,
    /// Its state.
    pub status: StepStatus,
}

/// A workspace's onboarding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Onboarding {
    /// `completed` once every required step is completed and every optional one is
    /// completed or skipped; `pending` otherwise.
    pub status: OnboardingStatus,
    /// The first pending step in onboarding order; null when none is pending.
    #[schema(required = true, example = "gong")]
    pub current_step: Option<String>,
    /// Every step, in onboarding order.
    pub steps: Vec<OnboardingStep>,
}

impl Onboarding {
    /// Derives `status` and `current_step` from the steps (in order).
    pub fn from_steps(steps: Vec<OnboardingStep>) -> Self {
        let done = steps.iter().all(|s| match s.status {
            StepStatus::Completed => true,
            StepStatus::Skipped => !s.required,
            StepStatus::Pending => false,
        });
        let current_step = steps
            .iter()
            .find(|s| s.status == StepStatus::Pending)
            .map(|s| s.name.clone());
        Self {
            status: if done {
                OnboardingStatus::Completed
            } else {
                OnboardingStatus::Pending
            },
            current_step,
            steps,
        }
    }
}

/// A provisioned workspace (a Clerk organization).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Workspace {
    /// Clerk organization id.
    #[schema(example = "org_2abc")]
    pub id: String,
    /// Display name; null only for a workspace known from its deletion alone.
    #[schema(required = true)]
    pub name: Option<String>,
    /// Clerk slug.
    #[schema(required = true)]
    pub slug: Option<String>,
    /// The organization's logo in Clerk (`image_url`), when it has one.
    #[schema(required = true)]
    pub image_url: Option<String>,
    /// `active` or `deleted` (visible only to the trusted caller).
    pub status: WorkspaceStatus,
    /// Plan name, a key of the configured plans.
    #[schema(example = "free")]
    pub plan: String,
    /// Quota name -> limit, from the plan.
    #[schema(example = json!({"seats": 5, "reports": 10}))]
    pub quotas: BTreeMap<String, i64>,
    /// Onboarding progress.
    pub onboarding: Onboarding,
    /// Active members (one per user).
    pub member_count: i64,
    /// Active members whose role is `admin`.
    pub admin_count: i64,
    /// When the organization was created in Clerk (when first provisioned, if
    /// Clerk's time is unknown).
    #[serde(serialize_with = "rfc3339::serialize")]
    pub created_at: DateTime<Utc>,
    /// Last change of the workspace record.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub updated_at: DateTime<Utc>,
    /// When it was deleted; null while active.
    #[serde(serialize_with = "rfc3339::serialize_opt")]
    #[schema(required = true)]
    pub deleted_at: Option<DateTime<Utc>>,
}

/// An active member of a workspace.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Member {
    /// Clerk user id.
    #[schema(example = "user_2xyz")]
    pub user_id: String,
    /// Callmine role.
    pub role: Role,
    /// Clerk role key as sent (`org:admin`, `org:member`, custom keys).
    #[schema(example = "org:admin")]
    pub clerk_role: String,
    /// Email (Clerk identifier).
    #[schema(required = true)]
    pub email: Option<String>,
    /// First name.
    #[schema(required = true)]
    pub first_name: Option<String>,
    /// Last name.
    #[schema(required = true)]
    pub last_name: Option<String>,
    /// When the membership was created in Clerk.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub joined_at: DateTime<Utc>,
}

/// One of a user's workspaces (the org switcher).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserWorkspace {
    /// Clerk organization id.
    pub workspace_id: String,
    /// Display name.
    #[schema(required = true)]
    pub name: Option<String>,
    /// Clerk slug.
    #[schema(required = true)]
    pub slug: Option<String>,
    /// The user's Callmine role there.
    pub role: Role,
}

/// One audit row.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditEntry {
    /// When the change was recorded.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub at: DateTime<Utc>,
    /// What changed (`workspace.provisioned`, `member.added`, `onboarding.step_updated`, …).
    #[schema(example = "member.added")]
    pub action: String,
    /// Who caused it: `clerk`, `reconcile`, `replay`, `api` or `ops` (the ops console).
    #[schema(example = "clerk")]
    pub actor: String,
    /// What it is about: a user id, a step name, the workspace id, a svix id.
    #[schema(required = true)]
    pub subject: Option<String>,
    /// Before/after values and context; in a member's view (`X-Acting-User`) only
    /// the keys members may see for the actor (see the route's description).
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// Svix id of the event that caused it; null for API changes.
    #[schema(required = true)]
    pub event_id: Option<String>,
}

/// The processing-log row of one webhook event.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Event {
    /// Svix message id.
    #[schema(example = "msg_2abc")]
    pub id: String,
    /// Clerk event type.
    #[serde(rename = "type")]
    #[schema(example = "organization.created")]
    pub kind: String,
    /// The workspace the event is about, when it names one.
    #[schema(required = true)]
    pub workspace_id: Option<String>,
    /// What happened to it.
    pub status: EventStatus,
    /// Why it was dead-lettered.
    #[schema(required = true)]
    pub error: Option<String>,
    /// When intake queued it (or a worker first saw it).
    #[serde(serialize_with = "rfc3339::serialize")]
    pub received_at: DateTime<Utc>,
    /// When a worker last finished with it.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub processed_at: DateTime<Utc>,
}

text_enum!(
    /// What an onboarding write may set a step to.
    StepTarget, "step target" {
        /// The step is done.
        Completed = "completed",
        /// Pass over the step (optional steps only: 422 for a required one).
        Skipped = "skipped",
    }
);

impl From<StepTarget> for StepStatus {
    fn from(t: StepTarget) -> Self {
        match t {
            StepTarget::Completed => StepStatus::Completed,
            StepTarget::Skipped => StepStatus::Skipped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, required: bool, status: StepStatus) -> OnboardingStep {
        OnboardingStep {
            name: name.into(),
            required,
            status,
        }
    }

    #[test]
    fn fresh_onboarding_is_pending_at_the_first_step() {
        let o = Onboarding::from_steps(vec![
            step("gong", true, StepStatus::Pending),
            step("slack", false, StepStatus::Pending),
        ]);
        assert_eq!(o.status, OnboardingStatus::Pending);
        assert_eq!(o.current_step.as_deref(), Some("gong"));
    }

    #[test]
    fn current_step_is_the_first_pending_one_by_order() {
        let o = Onboarding::from_steps(vec![
            step("gong", true, StepStatus::Completed),
            step("hubspot", false, StepStatus::Skipped),
            step("slack", false, StepStatus::Pending),
            step("starter_analysis", true, StepStatus::Pending),
        ]);
        assert_eq!(o.status, OnboardingStatus::Pending);
        assert_eq!(o.current_step.as_deref(), Some("slack"));
    }

    #[test]
    fn completed_needs_required_completed_and_optional_settled() {
        let o = Onboarding::from_steps(vec![
            step("gong", true, StepStatus::Completed),
            step("hubspot", false, StepStatus::Skipped),
            step("slack", false, StepStatus::Completed),
        ]);
        assert_eq!(o.status, OnboardingStatus::Completed);
        assert_eq!(o.current_step, None);
    }

    #[test]
    fn a_skipped_required_step_never_completes_onboarding() {
        // The API refuses it, but a row written by hand must not read as done.
        let o = Onboarding::from_steps(vec![step("gong", true, StepStatus::Skipped)]);
        assert_eq!(o.status, OnboardingStatus::Pending);
        assert_eq!(o.current_step, None);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_z() {
        let at = DateTime::parse_from_rfc3339("2024-05-28T10:00:00+02:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(rfc3339::format(&at), "2024-05-28T08:00:00.000Z");
    }

    #[test]
    fn stored_values_parse_strictly() {
        assert_eq!(Role::parse("admin").unwrap(), Role::Admin);
        assert!(Role::parse("Admin").is_err());
        assert_eq!(EventStatus::parse("dead").unwrap().as_str(), "dead");
    }
}
