//! What a reconcile run found: the kinds of drift, each difference, and the
//! report a run returns (the `--json` document).
//!
//! Guarantee: a difference is reported once per run, however often the run looks
//! at it, and the report's names are the exact strings of the `--json` report and
//! the metrics.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// The kinds of drift (exact strings of the `--json` report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// In Clerk, not here (or removed here by reconcile on inference).
    WorkspaceMissing,
    /// Name, slug, image or plan differ.
    WorkspaceStale,
    /// Active here; Clerk neither lists it nor finds it by id.
    WorkspaceGone,
    /// Deleted here by Clerk, present in Clerk: reported, never repaired.
    WorkspaceConflict,
    /// A membership in Clerk that is not active here.
    MemberMissing,
    /// Active here; Clerk neither lists it nor returns it for its user.
    MemberExtra,
    /// Role or Clerk role differ.
    MemberRole,
    /// Quotas differ from their plan's configured limits.
    QuotasStale,
}

impl DriftKind {
    /// Every kind, in report order.
    pub const ALL: [DriftKind; 8] = [
        DriftKind::WorkspaceMissing,
        DriftKind::WorkspaceStale,
        DriftKind::WorkspaceGone,
        DriftKind::WorkspaceConflict,
        DriftKind::MemberMissing,
        DriftKind::MemberExtra,
        DriftKind::MemberRole,
        DriftKind::QuotasStale,
    ];

    /// The kind's name in reports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::WorkspaceMissing => "workspace_missing",
            DriftKind::WorkspaceStale => "workspace_stale",
            DriftKind::WorkspaceGone => "workspace_gone",
            DriftKind::WorkspaceConflict => "workspace_conflict",
            DriftKind::MemberMissing => "member_missing",
            DriftKind::MemberExtra => "member_extra",
            DriftKind::MemberRole => "member_role",
            DriftKind::QuotasStale => "quotas_stale",
        }
    }

    pub(super) fn is_removal(self) -> bool {
        matches!(self, DriftKind::WorkspaceGone | DriftKind::MemberExtra)
    }
}

impl fmt::Display for DriftKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One difference between Clerk and this service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Drift {
    /// What kind.
    pub kind: DriftKind,
    /// The workspace (organization id).
    pub workspace_id: String,
    /// The user, for member kinds.
    pub user_id: Option<String>,
    /// What differs, for a human.
    pub detail: String,
}

/// What a run saw, found and did (the `--json` document).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Organizations Clerk listed (each counted once).
    pub organizations_seen: u64,
    /// Memberships Clerk listed (each counted once).
    pub memberships_seen: u64,
    /// Every difference found.
    pub drift: Vec<Drift>,
    /// Repairs that changed the state.
    pub applied: u64,
    /// Set when removals were refused (more than `max_removals` without `--yes`).
    #[serde(skip)]
    pub refused: Option<String>,
    /// Drift already reported (a run may look at an item twice: a scan by offset
    /// can list it twice, and the removal phase re-reads an organization's list).
    #[serde(skip)]
    pub(super) reported: std::collections::HashSet<Drift>,
}

impl Report {
    /// Drift counts per kind, in report order.
    pub fn counts(&self) -> BTreeMap<DriftKind, u64> {
        let mut counts = BTreeMap::new();
        for d in &self.drift {
            *counts.entry(d.kind).or_default() += 1;
        }
        counts
    }

    /// `seen N organizations, M memberships; drift: …; applied: K`.
    pub fn summary(&self) -> String {
        let counts = self.counts();
        let drift = if counts.is_empty() {
            "none".to_owned()
        } else {
            counts
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "seen {} organizations, {} memberships; drift: {drift}; applied: {}{}",
            self.organizations_seen,
            self.memberships_seen,
            self.applied,
            if self.dry_run { " (dry run)" } else { "" }
        )
    }
}
