//! Set-based writes for a batch: the processing-log claims, the rows that new
//! workspaces and new memberships insert, and the snapshot updates of stored
//! workspaces whose plan stays, wait here and go to PostgreSQL in one statement,
//! instead of one round trip per event.
//!
//! Guarantee: while a batch defers, the database holds exactly what it held when
//! the batch's [`prefetch`](super::state::prefetch) read it, plus what waits here;
//! so an event's state is the prefetched row with the waiting rows laid over it
//! ([`Deferred::overlay`]),
//! which is what the one-statement-per-event path would have read. (Billing rows
//! are written at once without ending the deferring: no prefetched state reads
//! them and nothing waiting here writes them.) The first
//! write that is not an insert waiting here ([`Deferred::stop`]) flushes them and
//! ends the deferring: every later event of the batch reads and writes one by one,
//! as a single event does. Flushed rows commit (or roll back) with the batch.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::display::Display;
use super::plans::Plans;
use super::state::{Begin, WorkspaceRow};
use crate::config::ProvisioningSettings;

/// One processing-log claim: the event's row, as the one-by-one `begin` writes it.
struct Claim {
    svix_id: String,
    kind: String,
    workspace_id: Option<String>,
    status: &'static str,
    received_at: DateTime<Utc>,
}

/// A workspace row to insert (with its plan's quotas and the onboarding steps),
/// or, when `stored`, the new fields of a stored workspace whose plan stays.
pub(super) struct NewWorkspace {
    pub id: String,
    pub row: WorkspaceRow,
    pub stored: bool,
}

/// A membership row to insert.
#[derive(Debug, Clone)]
pub(super) struct NewMember {
    pub membership_id: String,
    pub workspace_id: String,
    pub user_id: String,
    pub role: String,
    pub clerk_role: String,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub image_url: Option<String>,
    pub source_version: i64,
    pub profile_version: i64,
    pub joined_at: DateTime<Utc>,
    pub removed_at: Option<DateTime<Utc>>,
    pub removal_reason: Option<String>,
    pub source_event: String,
    pub profile_event: Option<String>,
    /// The display fields of the membership snapshot itself.
    pub snapshot: Display,
}

/// A real removal of a membership to record (`membership_removals`).
#[derive(Debug, Clone)]
pub(super) struct NewRemoval {
    pub membership_id: String,
    pub workspace_id: String,
    pub user_id: Option<String>,
    pub removed_at: DateTime<Utc>,
}

impl NewRemoval {
    /// Merges another removal of the same membership as the table does: the
    /// earliest time, the smaller ids (a fixed rule, whatever the order).
    fn merge(&mut self, other: NewRemoval) {
        self.removed_at = self.removed_at.min(other.removed_at);
        self.workspace_id = self.workspace_id.clone().min(other.workspace_id);
        self.user_id = match (self.user_id.take(), other.user_id) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The writes a batch defers, and whether it still defers.
#[derive(Default)]
pub(super) struct Deferred {
    /// True while the batch defers (set by the caller for a prefetched batch).
    active: bool,
    claims: Vec<Claim>,
    claimed: HashSet<String>,
    workspaces: Vec<NewWorkspace>,
    workspace_index: HashMap<String, usize>,
    members: Vec<NewMember>,
    member_index: HashMap<String, usize>,
    /// Removal records, one per membership (merged).
    removals: Vec<NewRemoval>,
    removal_index: HashMap<String, usize>,
}

impl Deferred {
    /// Starts deferring (a batch whose state was prefetched).
    pub(super) fn start(&mut self) {
        self.active = true;
    }

    /// Whether writes are deferred now.
    pub(super) fn active(&self) -> bool {
        self.active
    }

    /// Claims an event whose prefetched row said it is new here; false when the
    /// batch claimed the same svix id already (a duplicate delivery in one batch).
    pub(super) fn claim(
        &mut self,
        svix_id: &str,
        kind: &str,
        workspace_id: Option<&str>,
        status: &'static str,
        received_at: DateTime<Utc>,
    ) -> bool {
        if !self.claimed.insert(svix_id.to_owned()) {
            return false;
        }
        self.claims.push(Claim {
            svix_id: svix_id.to_owned(),
            kind: kind.to_owned(),
            workspace_id: workspace_id.map(str::to_owned),
            status,
            received_at,
        });
        true
    }

    /// Defers a new workspace.
    pub(super) fn insert_workspace(&mut self, id: &str, row: WorkspaceRow) {
        self.workspace_index
            .insert(id.to_owned(), self.workspaces.len());
        self.workspaces.push(NewWorkspace {
            id: id.to_owned(),
            row,
            stored: false,
        });
    }

    /// The workspace row to change in place of an update of `current` (its state
    /// now): the waiting insert of a workspace new in this batch, or a waiting
    /// update of a stored one. `None` when the update cannot wait: the batch no
    /// longer defers, or the plan of a stored workspace changes (its quotas are
    /// replaced row by row).
    pub(super) fn update_workspace(
        &mut self,
        id: &str,
        current: &WorkspaceRow,
        plan_changes: bool,
    ) -> Option<&mut WorkspaceRow> {
        if !self.active {
            return None;
        }
        let i = match self.workspace_index.get(id) {
            Some(&i) => i,
            None if plan_changes => return None,
            None => {
                self.workspace_index
                    .insert(id.to_owned(), self.workspaces.len());
                self.workspaces.push(NewWorkspace {
                    id: id.to_owned(),
                    row: current.clone(),
                    stored: true,
                });
                self.workspaces.len() - 1
            }
        };
        let waiting = &mut self.workspaces[i];
        if waiting.stored && plan_changes {
            return None;
        }
        Some(&mut waiting.row)
    }

    /// Defers a new membership.
    pub(super) fn insert_member(&mut self, member: NewMember) {
        self.member_index
            .insert(member.membership_id.clone(), self.members.len());
        self.members.push(member);
    }

    /// Defers a removal record, merged with any waiting for the same membership.
    pub(super) fn record_removal(&mut self, removal: NewRemoval) {
        match self.removal_index.get(&removal.membership_id) {
            Some(&i) => self.removals[i].merge(removal),
            None => {
                self.removal_index
                    .insert(removal.membership_id.clone(), self.removals.len());
                self.removals.push(removal);
            }
        }
    }

    /// The prefetched state of an event with the rows waiting here laid over it.
    pub(super) fn overlay(
        &self,
        mut b: Begin,
        workspace: Option<&str>,
        membership: Option<&str>,
    ) -> Begin {
        if let Some(w) = workspace
            .and_then(|id| self.workspace_index.get(id))
            .map(|&i| &self.workspaces[i].row)
        {
            lay_workspace(&mut b, w);
        }
        if let Some(m) = membership
            .and_then(|id| self.member_index.get(id))
            .map(|&i| &self.members[i])
        {
            lay_member(&mut b, m);
        }
        if let Some(r) = membership
            .and_then(|id| self.removal_index.get(id))
            .map(|&i| &self.removals[i])
        {
            b.r_removed_at = Some(b.r_removed_at.map_or(r.removed_at, |t| t.min(r.removed_at)));
        }
        b
    }

    /// Ends the deferring before a write that is not a waiting insert: writes what
    /// waits, so that write and every later read see it.
    pub(super) async fn stop(
        &mut self,
        conn: &mut PgConnection,
        settings: &ProvisioningSettings,
        plans: &Plans,
    ) -> Result<(), sqlx::Error> {
        if self.active {
            self.active = false;
            self.flush(conn, settings, plans).await?;
        }
        Ok(())
    }

    /// Writes the waiting claims, workspaces (with quotas and onboarding steps) and
    /// memberships in one statement. The foreign keys are checked at its end, when
    /// every parent row is in.
    pub(super) async fn flush(
        &mut self,
        conn: &mut PgConnection,
        settings: &ProvisioningSettings,
        plans: &Plans,
    ) -> Result<(), sqlx::Error> {
        if self.claims.is_empty()
            && self.workspaces.is_empty()
            && self.members.is_empty()
            && self.removals.is_empty()
        {
            return Ok(());
        }
        let c = &self.claims;
        let w: Vec<(&str, &WorkspaceRow)> = self
            .workspaces
            .iter()
            .filter(|n| !n.stored)
            .map(|n| (n.id.as_str(), &n.row))
            .collect();
        let up: Vec<(&str, &WorkspaceRow)> = self
            .workspaces
            .iter()
            .filter(|n| n.stored)
            .map(|n| (n.id.as_str(), &n.row))
            .collect();
        let (mut q_ws, mut q_name, mut q_value) = (Vec::new(), Vec::new(), Vec::new());
        let (mut s_ws, mut s_name, mut s_pos, mut s_required) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, row) in &w {
            let (names, values) = plans.quotas(&row.plan);
            for (n, v) in names.iter().zip(values) {
                q_ws.push(*id);
                q_name.push(n.as_str());
                q_value.push(*v);
            }
            for (p, step) in settings.onboarding_steps.iter().enumerate() {
                s_ws.push(*id);
                s_name.push(step.name.as_str());
                s_pos.push(p as i16);
                s_required.push(step.required);
            }
        }
        let m = &self.members;
        let r = &self.removals;
        sqlx::query(
            "with e as ( \
               insert into events (svix_id, type, workspace_id, status, received_at, processed_at) \
               select s, t, w, st, r, clock_timestamp() \
               from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) \
                 as u(s, t, w, st, r) \
               on conflict (svix_id) do update set \
                 type = excluded.type, workspace_id = excluded.workspace_id, \
                 status = excluded.status, error = null, \
                 attempts = events.attempts + 1, processed_at = clock_timestamp() \
               where events.status = 'dead'), \
             w as ( \
               insert into workspaces (id, name, slug, image_url, created_by, \
                 max_allowed_memberships, status, plan, source_version, clerk_created_at, \
                 deleted_at, deleted_version, plan_version, source_event, plan_event) \
               select * from unnest($6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                 $11::int[], $12::text[], $13::text[], $14::int8[], $15::timestamptz[], \
                 $16::timestamptz[], $17::int8[], $18::int8[], $19::text[], $20::text[])), \
             q as ( \
               insert into workspace_quotas (workspace_id, name, limit_value) \
               select * from unnest($21::text[], $22::text[], $23::int8[])), \
             o as ( \
               insert into onboarding_steps (workspace_id, name, position, required) \
               select * from unnest($24::text[], $25::text[], $26::int2[], $27::bool[])), \
             m as ( \
               insert into members (membership_id, workspace_id, user_id, role, clerk_role, \
                 email, first_name, last_name, image_url, source_version, profile_version, \
                 joined_at, removed_at, removal_reason, source_event, profile_event, \
                 snapshot_email, snapshot_first_name, snapshot_last_name, snapshot_image_url) \
               select * from unnest($28::text[], $29::text[], $30::text[], $31::text[], \
                 $32::text[], $33::text[], $34::text[], $35::text[], $36::text[], $37::int8[], \
                 $38::int8[], $39::timestamptz[], $40::timestamptz[], $41::text[], $42::text[], \
                 $43::text[], $60::text[], $61::text[], $62::text[], $63::text[])), \
             u as ( \
               update workspaces w set name = u.name, slug = u.slug, image_url = u.image_url, \
                 created_by = u.created_by, max_allowed_memberships = u.max_allowed_memberships, \
                 plan = u.plan, source_version = u.source_version, \
                 clerk_created_at = u.clerk_created_at, plan_version = u.plan_version, \
                 source_event = u.source_event, plan_event = u.plan_event, updated_at = now() \
               from unnest($44::text[], $45::text[], $46::text[], $47::text[], $48::text[], \
                 $49::int[], $50::text[], $51::int8[], $52::timestamptz[], $53::int8[], \
                 $54::text[], $55::text[]) \
                 as u(id, name, slug, image_url, created_by, max_allowed_memberships, plan, \
                   source_version, clerk_created_at, plan_version, source_event, plan_event) \
               where w.id = u.id), \
             r as ( \
               insert into membership_removals (membership_id, workspace_id, user_id, removed_at) \
               select * from unnest($56::text[], $57::text[], $58::text[], $59::timestamptz[]) \
               on conflict (membership_id) do update set \
                 removed_at = least(membership_removals.removed_at, excluded.removed_at), \
                 workspace_id = least(membership_removals.workspace_id collate \"C\", \
                   excluded.workspace_id collate \"C\"), \
                 user_id = least(membership_removals.user_id collate \"C\", \
                   excluded.user_id collate \"C\")) \
             select 1",
        )
        .bind(c.iter().map(|c| c.svix_id.as_str()).collect::<Vec<_>>())
        .bind(c.iter().map(|c| c.kind.as_str()).collect::<Vec<_>>())
        .bind(
            c.iter()
                .map(|c| c.workspace_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(c.iter().map(|c| c.status).collect::<Vec<_>>())
        .bind(c.iter().map(|c| c.received_at).collect::<Vec<_>>())
        .bind(w.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(w.iter().map(|(_, r)| r.name.as_deref()).collect::<Vec<_>>())
        .bind(w.iter().map(|(_, r)| r.slug.as_deref()).collect::<Vec<_>>())
        .bind(
            w.iter()
                .map(|(_, r)| r.image_url.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            w.iter()
                .map(|(_, r)| r.created_by.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            w.iter()
                .map(|(_, r)| r.max_allowed_memberships)
                .collect::<Vec<_>>(),
        )
        .bind(w.iter().map(|(_, r)| r.status.as_str()).collect::<Vec<_>>())
        .bind(w.iter().map(|(_, r)| r.plan.as_str()).collect::<Vec<_>>())
        .bind(w.iter().map(|(_, r)| r.source_version).collect::<Vec<_>>())
        .bind(
            w.iter()
                .map(|(_, r)| r.clerk_created_at)
                .collect::<Vec<_>>(),
        )
        .bind(w.iter().map(|(_, r)| r.deleted_at).collect::<Vec<_>>())
        .bind(w.iter().map(|(_, r)| r.deleted_version).collect::<Vec<_>>())
        .bind(w.iter().map(|(_, r)| r.plan_version).collect::<Vec<_>>())
        .bind(
            w.iter()
                .map(|(_, r)| r.source_event.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            w.iter()
                .map(|(_, r)| r.plan_event.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(q_ws)
        .bind(q_name)
        .bind(q_value)
        .bind(s_ws)
        .bind(s_name)
        .bind(s_pos)
        .bind(s_required)
        .bind(
            m.iter()
                .map(|m| m.membership_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|m| m.workspace_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(m.iter().map(|m| m.user_id.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.role.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.clerk_role.as_str()).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.email.as_deref()).collect::<Vec<_>>())
        .bind(
            m.iter()
                .map(|m| m.first_name.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(m.iter().map(|m| m.last_name.as_deref()).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.image_url.as_deref()).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.source_version).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.profile_version).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.joined_at).collect::<Vec<_>>())
        .bind(m.iter().map(|m| m.removed_at).collect::<Vec<_>>())
        .bind(
            m.iter()
                .map(|m| m.removal_reason.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|m| m.source_event.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|m| m.profile_event.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(up.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(
            up.iter()
                .map(|(_, r)| r.name.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            up.iter()
                .map(|(_, r)| r.slug.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            up.iter()
                .map(|(_, r)| r.image_url.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            up.iter()
                .map(|(_, r)| r.created_by.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            up.iter()
                .map(|(_, r)| r.max_allowed_memberships)
                .collect::<Vec<_>>(),
        )
        .bind(up.iter().map(|(_, r)| r.plan.as_str()).collect::<Vec<_>>())
        .bind(up.iter().map(|(_, r)| r.source_version).collect::<Vec<_>>())
        .bind(
            up.iter()
                .map(|(_, r)| r.clerk_created_at)
                .collect::<Vec<_>>(),
        )
        .bind(up.iter().map(|(_, r)| r.plan_version).collect::<Vec<_>>())
        .bind(
            up.iter()
                .map(|(_, r)| r.source_event.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            up.iter()
                .map(|(_, r)| r.plan_event.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            r.iter()
                .map(|r| r.membership_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            r.iter()
                .map(|r| r.workspace_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(r.iter().map(|r| r.user_id.as_deref()).collect::<Vec<_>>())
        .bind(r.iter().map(|r| r.removed_at).collect::<Vec<_>>())
        .bind(
            m.iter()
                .map(|m| m.snapshot.email.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|m| m.snapshot.first_name.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|m| m.snapshot.last_name.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            m.iter()
                .map(|m| m.snapshot.image_url.as_deref())
                .collect::<Vec<_>>(),
        )
        .execute(&mut *conn)
        .await?;
        self.claims.clear();
        self.removals.clear();
        self.removal_index.clear();
        self.workspaces.clear();
        self.workspace_index.clear();
        self.members.clear();
        self.member_index.clear();
        Ok(())
    }
}

/// Lays a workspace row not written yet over the state read.
fn lay_workspace(b: &mut Begin, w: &WorkspaceRow) {
    b.w_exists = true;
    b.w_name = w.name.clone();
    b.w_slug = w.slug.clone();
    b.w_image_url = w.image_url.clone();
    b.w_created_by = w.created_by.clone();
    b.w_max_allowed_memberships = w.max_allowed_memberships;
    b.w_status = Some(w.status.clone());
    b.w_plan = Some(w.plan.clone());
    b.w_source_version = w.source_version;
    b.w_plan_version = w.plan_version;
    b.w_source_event = w.source_event.clone();
    b.w_plan_event = w.plan_event.clone();
    b.w_clerk_created_at = w.clerk_created_at;
    b.w_deleted_at = w.deleted_at;
    b.w_deleted_version = w.deleted_version;
    b.w_deletion_inferred = Some(w.deletion_inferred);
}

/// Lays a membership row not written yet over the state read.
fn lay_member(b: &mut Begin, m: &NewMember) {
    b.m_exists = true;
    b.m_user_id = Some(m.user_id.clone());
    b.m_role = Some(m.role.clone());
    b.m_clerk_role = Some(m.clerk_role.clone());
    b.m_email = m.email.clone();
    b.m_first_name = m.first_name.clone();
    b.m_last_name = m.last_name.clone();
    b.m_image_url = m.image_url.clone();
    b.m_source_version = Some(m.source_version);
    b.m_profile_version = Some(m.profile_version);
    b.m_source_event = Some(m.source_event.clone());
    b.m_profile_event = m.profile_event.clone();
    b.m_removed_at = m.removed_at;
    b.m_removal_reason = m.removal_reason.clone();
    b.m_snapshot_email = m.snapshot.email.clone();
    b.m_snapshot_first_name = m.snapshot.first_name.clone();
    b.m_snapshot_last_name = m.snapshot.last_name.clone();
    b.m_snapshot_image_url = m.snapshot.image_url.clone();
}
