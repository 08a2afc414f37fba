//! The proofs a removal needs before reconcile applies it (DESIGN §5: "reconcile
//! proves before it removes").
//!
//! Guarantees:
//! - Absence from a listing paged by offset is never proof: such a list shifts
//!   while it is paged (one membership leaving between two pages hides the one
//!   at the page boundary). A membership missing from a listing is asked of Clerk
//!   again by its user (`user_id` filter, 100 users a call); only one Clerk then
//!   does not return is removed, and only if its row here last changed before the
//!   run began (so a membership a webhook added meanwhile survives).
//! - An organization is removed only when a complete listing lacks it *and*
//!   `GET /v1/organizations/{id}` answers 404: a full run's scan is that listing;
//!   `reconcile --org` (and the console's sync) asks the listing for that id.
//! - The just-in-time sync never removes a workspace: Clerk's 404 is answered as
//!   404 and the workspace is left as it is.
//! - Every repair path has checked the key's instance first
//!   ([`ClerkApi::check_instance`](crate::clerk::api::ClerkApi::check_instance)).

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::compare::{decode_membership, id_of, id_str};
use super::repair::{Pass, synthetic};
use super::report::DriftKind;
use super::{Found, ReconcileError, Reconciler};
use crate::clerk::api::{Memberships, PAGE_LIMIT};

/// How a sync of one organization takes Clerk's 404 for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Absence {
    /// A full run: a complete listing already lacks the organization, so the 404
    /// completes the proof.
    Unlisted,
    /// `reconcile --org` and the console: the 404 counts only if a listing of
    /// that id lacks it too.
    Confirm,
    /// The just-in-time sync: a 404 removes nothing.
    Keep,
}

/// An active membership here that a listing of Clerk did not show.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    pub membership_id: String,
    pub user_id: String,
}

impl Reconciler {
    /// Fetches one organization and compares it and its current memberships; on
    /// Clerk's 404, proves the workspace gone as `absence` says (see [`Absence`]).
    pub(super) async fn sync_organization(
        &self,
        id: &str,
        started: DateTime<Utc>,
        absence: Absence,
        pass: &mut Pass<'_>,
    ) -> Result<Found, ReconcileError> {
        let organization = match self.api.organization(id).await? {
            Some(organization) => Some(organization),
            None => match absence {
                Absence::Keep => return Ok(Found::Gone),
                Absence::Unlisted => None,
                Absence::Confirm => {
                    let listed = self
                        .api
                        .organizations_with_ids(&[id])
                        .await?
                        .into_iter()
                        .find(|o| id_str(o) == id);
                    if listed.is_some() {
                        tracing::warn!(
                            workspace_id = %id,
                            "Clerk answers 404 for an organization it lists; comparing it, not removing it"
                        );
                    }
                    listed
                }
            },
        };
        let Some(organization) = organization else {
            let active: Option<bool> =
                sqlx::query_scalar("select status = 'active' from workspaces where id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            if active == Some(true) {
                pass.drift(
                    DriftKind::WorkspaceGone,
                    id,
                    None,
                    "active here; Clerk does not list it and answers 404".into(),
                );
                pass.removals.push(synthetic(
                    "organization.deleted",
                    &format!("orgdel_{id}"),
                    &json!({"object": "organization", "id": id, "deleted": true}),
                    Utc::now().timestamp_millis(),
                ));
            }
            return Ok(Found::Gone);
        };
        pass.report.organizations_seen += 1;
        self.compare_organizations(&[&organization], pass).await?;
        self.sync_members(id, started, pass).await?;
        Ok(Found::Present)
    }

    /// Compares one organization's current membership list with the members here;
    /// what the list lacks is asked again by user ([`Self::remove_unless_found`]).
    async fn sync_members(
        &self,
        workspace_id: &str,
        started: DateTime<Utc>,
        pass: &mut Pass<'_>,
    ) -> Result<(), ReconcileError> {
        let mut listed: HashMap<String, Value> = HashMap::new();
        let mut offset = 0u64;
        loop {
            let Some(page) = self
                .api
                .memberships(Memberships::Of(workspace_id), offset, PAGE_LIMIT)
                .await?
            else {
                // Deleted while we looked: the next run proves it.
                return Ok(());
            };
            offset += page.data.len() as u64;
            let done = page.data.is_empty() || offset >= page.total_count;
            for m in page.data {
                listed.insert(id_of(&m), m);
            }
            if done {
                break;
            }
        }
        pass.report.memberships_seen += listed.len() as u64;
        let values: Vec<&Value> = listed.values().collect();
        self.compare_memberships(&values, pass).await?;
        let ids: Vec<&String> = listed.keys().collect();
        let candidates: Vec<(String, String)> = sqlx::query_as(
            "select m.membership_id, m.user_id from members m \
             join workspaces w on w.id = m.workspace_id and w.status = 'active' \
             where m.workspace_id = $1 and m.removed_at is null and m.updated_at < $2 \
               and not (m.membership_id = any($3::text[])) \
             order by m.membership_id",
        )
        .bind(workspace_id)
        .bind(started)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let candidates = candidates
            .into_iter()
            .map(|(membership_id, user_id)| Candidate {
                membership_id,
                user_id,
            })
            .collect();
        self.remove_unless_found(workspace_id, candidates, pass)
            .await
    }

    /// Asks Clerk for the memberships of the candidates' users in `workspace_id`
    /// (a listing by offset did not show them): a candidate Clerk returns is kept
    /// and compared; one it does not is removed (`member_extra`). Nothing is
    /// removed if the organization is gone meanwhile (its own proof comes first).
    pub(super) async fn remove_unless_found(
        &self,
        workspace_id: &str,
        candidates: Vec<Candidate>,
        pass: &mut Pass<'_>,
    ) -> Result<(), ReconcileError> {
        if candidates.is_empty() {
            return Ok(());
        }
        let users: BTreeSet<&str> = candidates.iter().map(|c| c.user_id.as_str()).collect();
        let users: Vec<&str> = users.into_iter().collect();
        let Some(found) = self.api.memberships_of_users(workspace_id, &users).await? else {
            return Ok(());
        };
        // Only this organization's answers count, whatever the filter returned.
        let found: Vec<&Value> = found
            .iter()
            .filter(|m| decode_membership(m).is_ok_and(|m| m.organization.id == workspace_id))
            .collect();
        let in_clerk: HashSet<&str> = found.iter().map(|m| id_str(m)).collect();
        let mut confirmed = 0;
        let now = Utc::now().timestamp_millis();
        for c in &candidates {
            if in_clerk.contains(c.membership_id.as_str()) {
                confirmed += 1;
                continue;
            }
            pass.drift(
                DriftKind::MemberExtra,
                workspace_id,
                Some(&c.user_id),
                format!(
                    "{} is active here; Clerk does not list it nor return it for its user",
                    c.membership_id
                ),
            );
            pass.removals.push(synthetic(
                "organizationMembership.deleted",
                &format!("memdel_{}", c.membership_id),
                &json!({
                    "object": "organization_membership",
                    "id": c.membership_id,
                    "organization": {"object": "organization", "id": workspace_id},
                    "public_user_data": {"user_id": c.user_id},
                }),
                now,
            ));
        }
        if confirmed > 0 {
            tracing::info!(
                workspace_id,
                confirmed,
                "memberships a listing by offset missed are still in Clerk; kept"
            );
        }
        pass.report.memberships_seen += confirmed;
        // What Clerk returned is its current state: compared like a listing.
        self.compare_memberships(&found, pass).await
    }
}
