//! The effect of one decoded event on the workspace state, inside a transaction
//! the caller owns (DESIGN §5).
//!
//! Guarantee: run under the event's advisory locks (see [`lock_keys`]), an event
//! writes its processing-log row and its effect on the caller's transaction, and
//! leaves its audit rows and final status in [`Pending`], which the caller flushes
//! into the same transaction before committing: all commit or roll back together.
//!
//! Every stored field is a function of the set of events applied, not of their
//! order or repetition (docs/schema.md, "Versions and tombstones"):
//! - each group of fields that follows a snapshot (a workspace's data, its plan, a
//!   member's role, a member's display fields, a user) keeps the snapshot that
//!   [`Source::beats`] every other: the newest version (`data.updated_at`), and on
//!   equal versions the smaller svix id;
//! - deletions keep the earliest time; a membership's end keeps the earliest cause,
//!   and on equal times the reason first in byte order ([`earliest`]);
//! - tombstones are final: a deleted workspace or removed membership never becomes
//!   active again, though its fields still follow the snapshots that describe it.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;

use super::deferred::{Deferred, NewMember, StateKeys};
use super::display::{Display, Profile};
use super::inferred::{infer_membership_gone, infer_workspace_gone, restore_workspace};
use super::members::{Ending, end_memberships, inferred, remove_membership, upsert_membership};
use super::payload::{Decoded, Event, Organization, Removal};
use super::users::{delete_user, update_user};
use super::{Actor, Incoming, Outcome, Plans};
use crate::config::ProvisioningSettings;

/// Advisory-lock keys of an event, in the global lock order (workspaces before
/// users, each by id). Every transaction takes its keys in this order, so
/// concurrent workers serialize on shared entities without deadlocking; the
/// worker deals events into lanes by the first key, so events that would wait for
/// each other's locks share a lane.
pub fn lock_keys(decoded: &Decoded) -> Vec<String> {
    let workspace = decoded.workspace_id().map(ws_key);
    let user = decoded.user_id().map(user_key);
    workspace.into_iter().chain(user).collect()
}

fn ws_key(id: &str) -> String {
    format!("ws:{id}")
}

fn user_key(id: &str) -> String {
    format!("user:{id}")
}

/// Sorts and deduplicates keys into the global lock order.
pub(crate) fn order_keys(keys: &mut Vec<String>) {
    // "ws:" keys sort before "user:" keys, then by id.
    keys.sort_by(|a, b| {
        let rank = |k: &str| if k.starts_with("ws:") { 0 } else { 1 };
        rank(a).cmp(&rank(b)).then_with(|| a.cmp(b))
    });
    keys.dedup();
}

/// Takes the transaction-scoped advisory locks of `keys`, in the given order.
pub(crate) async fn lock(conn: &mut PgConnection, keys: &[String]) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    // With `order by`, PostgreSQL evaluates the volatile lock calls after sorting,
    // so they are taken in exactly the array's order.
    sqlx::query(
        "select pg_advisory_xact_lock(hashtextextended(k, 0)) \
         from unnest($1::text[]) with ordinality as t(k, n) order by n",
    )
    .bind(keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// Converts a Clerk ms timestamp (range checked when decoding) to a timestamp.
pub(super) fn ts(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Where a group of stored fields came from: the snapshot's version and the svix id
/// that carried it (`None` for rows written before svix ids were kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Source<'a> {
    pub(super) version: i64,
    pub(super) event: Option<&'a str>,
}

impl<'a> Source<'a> {
    pub(super) fn new(version: i64, event: &'a str) -> Self {
        Self {
            version,
            event: Some(event),
        }
    }

    /// The stored source of a group (`None`: nothing applied yet).
    pub(super) fn stored(version: Option<i64>, event: &'a Option<String>) -> Option<Self> {
        version.map(|version| Self {
            version,
            event: event.as_deref(),
        })
    }

    /// Whether this snapshot replaces `other`: a newer version wins; on equal
    /// versions the smaller svix id does (a fixed rule, so the outcome does not
    /// depend on which arrived first), and a known svix id beats an unknown one.
    pub(super) fn beats(self, other: Source<'_>) -> bool {
        match self.version.cmp(&other.version) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => match (self.event, other.event) {
                (Some(a), Some(b)) => a < b,
                (Some(_), None) => true,
                (None, _) => false,
            },
        }
    }

    /// [`Source::beats`] the stored source, if any.
    pub(super) fn beats_stored(self, stored: Option<Source<'_>>) -> bool {
        stored.is_none_or(|s| self.beats(s))
    }
}

/// Why and since when a membership ended.
pub(super) type End<'a> = (DateTime<Utc>, &'a str);

/// The end that stands among several causes: the earliest time, and on equal
/// times the reason first in byte order (`membership_deleted`, `user_deleted`,
/// `workspace_deleted`), the same order as `collate "C"` in [`super::members::end_memberships`].
pub(super) fn earliest<'a>(ends: impl IntoIterator<Item = Option<End<'a>>>) -> Option<End<'a>> {
    ends.into_iter().flatten().min()
}

/// One audit row waiting to be written with its event.
struct Audit {
    workspace_id: String,
    action: &'static str,
    actor: &'static str,
    subject: Option<String>,
    details: Value,
    event_id: String,
}

/// Writes that events of one transaction leave for its end: audit rows and
/// `superseded` statuses. They are flushed before the commit, so they still commit
/// (or roll back) together with the effects, at one statement each per batch.
#[derive(Default)]
pub(crate) struct Pending {
    audits: Vec<Audit>,
    pub(super) superseded: Vec<String>,
    /// The claims and inserts a prefetched batch defers ([`Pending::defer`]).
    pub(super) deferred: Deferred,
}

impl Pending {
    /// Defers the claims and inserts of the events applied with a prefetched state
    /// (see [`super::deferred`]) until the first other write or the flush.
    pub(crate) fn defer(&mut self) {
        self.deferred.start();
    }

    /// Writes the pending rows on `conn` (the transaction about to commit): the
    /// deferred claims and inserts first, then statuses and audit rows.
    pub(crate) async fn flush(
        &mut self,
        conn: &mut PgConnection,
        settings: &ProvisioningSettings,
        plans: &Plans,
    ) -> Result<(), sqlx::Error> {
        self.deferred.stop(conn, settings, plans).await?;
        if !self.superseded.is_empty() {
            sqlx::query("update events set status = 'superseded' where svix_id = any($1)")
                .bind(&self.superseded)
                .execute(&mut *conn)
                .await?;
            self.superseded.clear();
        }
        if !self.audits.is_empty() {
            let a = &self.audits;
            let workspace: Vec<&str> = a.iter().map(|a| a.workspace_id.as_str()).collect();
            let action: Vec<&str> = a.iter().map(|a| a.action).collect();
            let actor: Vec<&str> = a.iter().map(|a| a.actor).collect();
            let subject: Vec<Option<&str>> = a.iter().map(|a| a.subject.as_deref()).collect();
            let details: Vec<sqlx::types::Json<&Value>> =
                a.iter().map(|a| sqlx::types::Json(&a.details)).collect();
            let event: Vec<&str> = a.iter().map(|a| a.event_id.as_str()).collect();
            // `with ordinality` keeps the rows (and their ids) in the order they happened.
            sqlx::query(
                "insert into audit_log (workspace_id, action, actor, subject, details, event_id) \
                 select w, a, r, s, d, e \
                 from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[]) \
                   with ordinality as t(w, a, r, s, d, e, n) \
                 order by n",
            )
            .bind(workspace)
            .bind(action)
            .bind(actor)
            .bind(subject)
            .bind(details)
            .bind(event)
            .execute(&mut *conn)
            .await?;
            self.audits.clear();
        }
        Ok(())
    }
}

/// What one event is doing: settings, identity and the pending rows it adds to.
pub(super) struct Ctx<'a> {
    pub(super) settings: &'a ProvisioningSettings,
    pub(super) plans: &'a Plans,
    pub(super) incoming: &'a Incoming,
    pub(super) pending: &'a mut Pending,
}

impl Ctx<'_> {
    /// Before a write that is not a deferred insert: ends the batch's deferring.
    pub(super) async fn stop_deferring(
        &mut self,
        conn: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        self.pending
            .deferred
            .stop(conn, self.settings, self.plans)
            .await
    }

    pub(super) fn audit(
        &mut self,
        workspace_id: &str,
        action: &'static str,
        subject: Option<&str>,
        mut details: Value,
    ) {
        if let (Some(by), Value::Object(map)) = (&self.incoming.replayed_by, &mut details) {
            map.insert("replayed_by".to_owned(), Value::String(by.clone()));
        }
        self.pending.audits.push(Audit {
            workspace_id: workspace_id.to_owned(),
            action,
            actor: self.incoming.actor.as_str(),
            subject: subject.map(str::to_owned),
            details,
            event_id: self.incoming.svix_id.clone(),
        });
    }
}

/// The processing-log status an event is claimed with, and the keys of the
/// workspace, membership and user rows it decides on.
pub(crate) fn state_keys(decoded: &Decoded) -> (&'static str, StateKeys<'_>) {
    let (initial, ws_id, membership_id, user_id) = match &decoded.event {
        Event::Unhandled => ("ignored", None, None, None),
        Event::OrganizationUpsert(o) => ("processed", Some(o.id.as_str()), None, None),
        Event::OrganizationDeleted { id, .. } => ("processed", Some(id.as_str()), None, None),
        Event::MembershipUpsert(m) => (
            "processed",
            Some(m.organization.id.as_str()),
            Some(m.id.as_str()),
            Some(m.user.user_id.as_str()),
        ),
        Event::MembershipDeleted { removal: r, .. } => (
            "processed",
            Some(r.organization_id.as_str()),
            Some(r.id.as_str()),
            r.user_id.as_deref(),
        ),
        Event::UserUpdated(u) => ("processed", None, None, Some(u.id.as_str())),
        Event::UserDeleted { id, .. } => ("processed", None, None, Some(id.as_str())),
    };
    (initial, (ws_id, membership_id, user_id))
}

/// Applies one decoded event on `conn` (inside a transaction, possibly with other events, the
/// caller commits after [`Pending::flush`]), processing-log row included; its audit
/// rows and final status wait in `pending`.
///
/// `prefetched` is the event's state as [`super::deferred::prefetch`] read it for
/// the whole batch: while the batch defers, the event claims its svix id and
/// decides on that state (with the batch's waiting inserts laid over it) without a
/// round trip of its own; otherwise it claims and reads in one statement.
pub(crate) async fn apply_event(
    conn: &mut PgConnection,
    settings: &ProvisioningSettings,
    plans: &Plans,
    incoming: &Incoming,
    decoded: &Decoded,
    prefetched: Option<Begin>,
    pending: &mut Pending,
) -> Result<Outcome, sqlx::Error> {
    let (initial, (ws_id, membership_id, user_id)) = state_keys(decoded);
    let state = match prefetched {
        Some(state) if pending.deferred.active() => {
            let fresh = state.fresh
                && pending.deferred.claim(
                    &incoming.svix_id,
                    decoded.kind.as_str(),
                    decoded.workspace_id(),
                    initial,
                    incoming.received_at,
                );
            Begin {
                fresh,
                ..pending.deferred.overlay(state, ws_id, membership_id)
            }
        }
        _ => {
            begin(
                conn,
                incoming,
                decoded,
                initial,
                ws_id,
                membership_id,
                user_id,
            )
            .await?
        }
    };
    if !state.fresh {
        return Ok(Outcome::Duplicate);
    }
    let mut cx = Ctx {
        settings,
        plans,
        incoming,
        pending,
    };
    // A deletion reconcile applies is an inference, not Clerk's word: it is stored
    // apart from a tombstone (see `inferred`).
    let inference = incoming.actor == Actor::Reconcile;
    // Only snapshots of organizations and memberships know how to defer their
    // inserts; every other event writes at once.
    let defers = matches!(
        &decoded.event,
        Event::Unhandled
            | Event::OrganizationUpsert(_)
            | Event::MembershipUpsert(_)
            | Event::MembershipDeleted {
                removal: Removal {
                    snapshot: Some(_),
                    ..
                },
                ..
            }
    ) && !(inference && matches!(&decoded.event, Event::MembershipDeleted { .. }));
    if !defers {
        cx.stop_deferring(conn).await?;
    }
    let changed = match &decoded.event {
        Event::Unhandled => return Ok(Outcome::Ignored),
        Event::OrganizationUpsert(org) => {
            upsert_workspace(conn, &mut cx, org, state.workspace())
                .await?
                .changed
        }
        Event::OrganizationDeleted { id, at_ms } if inference => {
            infer_workspace_gone(conn, &mut cx, id, *at_ms, state.workspace()).await?
        }
        Event::OrganizationDeleted { id, at_ms } => {
            delete_workspace(conn, &mut cx, id, *at_ms, state.workspace()).await?
        }
        Event::MembershipUpsert(m) => upsert_membership(conn, &mut cx, m, None, &state).await?,
        Event::MembershipDeleted { removal, at_ms } if inference => {
            infer_membership_gone(conn, &mut cx, removal, *at_ms, &state).await?
        }
        Event::MembershipDeleted { removal, at_ms } => match &removal.snapshot {
            Some(m) => upsert_membership(conn, &mut cx, m, Some(*at_ms), &state).await?,
            None => remove_membership(conn, &mut cx, removal, *at_ms, &state).await?,
        },
        Event::UserUpdated(u) => update_user(conn, &mut cx, u, &state).await?,
        Event::UserDeleted { id, at_ms } => delete_user(conn, &mut cx, id, *at_ms).await?,
    };
    if changed {
        Ok(Outcome::Processed)
    } else {
        cx.pending.superseded.push(incoming.svix_id.clone());
        Ok(Outcome::Superseded)
    }
}

/// The stored state an event decides on, read in the same statement that claims
/// its svix id in the processing log.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct Begin {
    /// The svix id is new here, or was dead: apply it.
    pub(super) fresh: bool,
    pub(super) w_exists: bool,
    pub(super) w_name: Option<String>,
    pub(super) w_slug: Option<String>,
    pub(super) w_image_url: Option<String>,
    pub(super) w_created_by: Option<String>,
    pub(super) w_max_allowed_memberships: Option<i32>,
    pub(super) w_status: Option<String>,
    pub(super) w_plan: Option<String>,
    pub(super) w_source_version: Option<i64>,
    pub(super) w_plan_version: Option<i64>,
    pub(super) w_source_event: Option<String>,
    pub(super) w_plan_event: Option<String>,
    pub(super) w_clerk_created_at: Option<DateTime<Utc>>,
    pub(super) w_deleted_at: Option<DateTime<Utc>>,
    pub(super) w_deleted_version: Option<i64>,
    pub(super) w_deletion_inferred: Option<bool>,
    pub(super) m_exists: bool,
    pub(super) m_user_id: Option<String>,
    pub(super) m_role: Option<String>,
    pub(super) m_clerk_role: Option<String>,
    pub(super) m_email: Option<String>,
    pub(super) m_first_name: Option<String>,
    pub(super) m_last_name: Option<String>,
    pub(super) m_image_url: Option<String>,
    pub(super) m_source_version: Option<i64>,
    pub(super) m_profile_version: Option<i64>,
    pub(super) m_source_event: Option<String>,
    pub(super) m_profile_event: Option<String>,
    pub(super) m_removed_at: Option<DateTime<Utc>>,
    pub(super) m_removal_reason: Option<String>,
    pub(super) m_snapshot_email: Option<String>,
    pub(super) m_snapshot_first_name: Option<String>,
    pub(super) m_snapshot_last_name: Option<String>,
    pub(super) m_snapshot_image_url: Option<String>,
    pub(super) u_email: Option<String>,
    pub(super) u_first_name: Option<String>,
    pub(super) u_last_name: Option<String>,
    pub(super) u_image_url: Option<String>,
    pub(super) u_source_version: Option<i64>,
    pub(super) u_source_event: Option<String>,
    pub(super) u_deleted_at: Option<DateTime<Utc>>,
    /// The earliest real removal recorded for the membership (`membership_removals`).
    pub(super) r_removed_at: Option<DateTime<Utc>>,
}

impl Begin {
    /// Lays a workspace row not written yet over the state read.
    pub(super) fn set_workspace(&mut self, w: &WorkspaceRow) {
        self.w_exists = true;
        self.w_name = w.name.clone();
        self.w_slug = w.slug.clone();
        self.w_image_url = w.image_url.clone();
        self.w_created_by = w.created_by.clone();
        self.w_max_allowed_memberships = w.max_allowed_memberships;
        self.w_status = Some(w.status.clone());
        self.w_plan = Some(w.plan.clone());
        self.w_source_version = w.source_version;
        self.w_plan_version = w.plan_version;
        self.w_source_event = w.source_event.clone();
        self.w_plan_event = w.plan_event.clone();
        self.w_clerk_created_at = w.clerk_created_at;
        self.w_deleted_at = w.deleted_at;
        self.w_deleted_version = w.deleted_version;
        self.w_deletion_inferred = Some(w.deletion_inferred);
    }

    /// Lays a membership row not written yet over the state read.
    pub(super) fn set_member(&mut self, m: &NewMember) {
        self.m_exists = true;
        self.m_user_id = Some(m.user_id.clone());
        self.m_role = Some(m.role.clone());
        self.m_clerk_role = Some(m.clerk_role.clone());
        self.m_email = m.email.clone();
        self.m_first_name = m.first_name.clone();
        self.m_last_name = m.last_name.clone();
        self.m_image_url = m.image_url.clone();
        self.m_source_version = Some(m.source_version);
        self.m_profile_version = Some(m.profile_version);
        self.m_source_event = Some(m.source_event.clone());
        self.m_profile_event = m.profile_event.clone();
        self.m_removed_at = m.removed_at;
        self.m_removal_reason = m.removal_reason.clone();
        self.m_snapshot_email = m.snapshot.email.clone();
        self.m_snapshot_first_name = m.snapshot.first_name.clone();
        self.m_snapshot_last_name = m.snapshot.last_name.clone();
        self.m_snapshot_image_url = m.snapshot.image_url.clone();
    }

    pub(super) fn workspace(&self) -> Option<WorkspaceRow> {
        self.w_exists.then(|| WorkspaceRow {
            name: self.w_name.clone(),
            slug: self.w_slug.clone(),
            image_url: self.w_image_url.clone(),
            created_by: self.w_created_by.clone(),
            max_allowed_memberships: self.w_max_allowed_memberships,
            status: self.w_status.clone().unwrap_or_default(),
            plan: self.w_plan.clone().unwrap_or_default(),
            source_version: self.w_source_version,
            plan_version: self.w_plan_version,
            source_event: self.w_source_event.clone(),
            plan_event: self.w_plan_event.clone(),
            clerk_created_at: self.w_clerk_created_at,
            deleted_at: self.w_deleted_at,
            deleted_version: self.w_deleted_version,
            deletion_inferred: self.w_deletion_inferred.unwrap_or(false),
        })
    }

    /// The user's own record (from user.updated): their standing snapshot.
    pub(super) fn user_profile(&self) -> Option<Profile> {
        Some(Profile {
            version: self.u_source_version?,
            event: self.u_source_event.clone(),
            display: Display {
                email: self.u_email.clone(),
                first_name: self.u_first_name.clone(),
                last_name: self.u_last_name.clone(),
                image_url: self.u_image_url.clone(),
            },
        })
    }

    /// The stored membership's own snapshot as a source of display fields; `None`
    /// for a row holding no snapshot (known from a removal only).
    pub(super) fn m_snapshot(&self) -> Option<Profile> {
        let version = self.m_source_version?;
        (version != 0 || self.m_source_event.is_some()).then(|| Profile {
            version,
            event: self.m_source_event.clone(),
            display: Display {
                email: self.m_snapshot_email.clone(),
                first_name: self.m_snapshot_first_name.clone(),
                last_name: self.m_snapshot_last_name.clone(),
                image_url: self.m_snapshot_image_url.clone(),
            },
        })
    }

    /// The stored membership's display fields and their source.
    pub(super) fn m_profile(&self) -> Profile {
        Profile {
            version: self.m_profile_version.unwrap_or_default(),
            event: self.m_profile_event.clone(),
            display: Display {
                email: self.m_email.clone(),
                first_name: self.m_first_name.clone(),
                last_name: self.m_last_name.clone(),
                image_url: self.m_image_url.clone(),
            },
        }
    }

    /// How the stored membership ended by Clerk's deletion of it, its user or its
    /// workspace, if it did (an end reconcile only inferred is not one).
    pub(super) fn m_real_end(&self) -> Option<End<'_>> {
        self.m_end().filter(|(_, reason)| !inferred(reason))
    }

    /// How the stored membership ended, if it did.
    pub(super) fn m_end(&self) -> Option<End<'_>> {
        let reason = self
            .m_removal_reason
            .as_deref()
            .unwrap_or("membership_deleted");
        self.m_removed_at.map(|at| (at, reason))
    }
}

/// The state columns of [`Begin`] (every column but `fresh`), read from the aliases
/// `w` (workspaces), `m` (members), `u` (users) and `r` (membership_removals): shared by the one-by-one
/// [`begin`] and the batch's [`super::deferred::prefetch`], so both read the same.
macro_rules! begin_columns {
    () => {
        "w.id is not null as w_exists, w.name as w_name, w.slug as w_slug, \
         w.image_url as w_image_url, w.created_by as w_created_by, \
         w.max_allowed_memberships as w_max_allowed_memberships, w.status as w_status, \
         w.plan as w_plan, w.source_version as w_source_version, \
         w.plan_version as w_plan_version, \
         w.source_event as w_source_event, w.plan_event as w_plan_event, \
         w.clerk_created_at as w_clerk_created_at, w.deleted_at as w_deleted_at, \
         w.deleted_version as w_deleted_version, \
         w.deletion_inferred as w_deletion_inferred, \
         m.membership_id is not null as m_exists, m.user_id as m_user_id, m.role as m_role, \
         m.clerk_role as m_clerk_role, m.email as m_email, m.first_name as m_first_name, \
         m.last_name as m_last_name, m.image_url as m_image_url, \
         m.source_version as m_source_version, m.profile_version as m_profile_version, \
         m.source_event as m_source_event, m.profile_event as m_profile_event, \
         m.removed_at as m_removed_at, \
         m.removal_reason as m_removal_reason, \
         m.snapshot_email as m_snapshot_email, m.snapshot_first_name as m_snapshot_first_name, \
         m.snapshot_last_name as m_snapshot_last_name, \
         m.snapshot_image_url as m_snapshot_image_url, \
         u.email as u_email, u.first_name as u_first_name, u.last_name as u_last_name, \
         u.image_url as u_image_url, u.source_version as u_source_version, \
         u.source_event as u_source_event, u.deleted_at as u_deleted_at, \
         r.removed_at as r_removed_at"
    };
}
pub(super) use begin_columns;

/// Reads the state of a membership event again, within its transaction (after a
/// write of its own changed it: an inferred deletion of its workspace lifted).
pub(super) async fn read_state(
    conn: &mut PgConnection,
    ws_id: &str,
    membership_id: &str,
    user_id: &str,
) -> Result<Begin, sqlx::Error> {
    sqlx::query_as(concat!(
        "select true as fresh, ",
        begin_columns!(),
        " from (select 1) as one \
         left join workspaces w on w.id = $1 \
         left join members m on m.membership_id = $2 \
         left join users u on u.id = $3 \
         left join membership_removals r on r.membership_id = $2"
    ))
    .bind(ws_id)
    .bind(membership_id)
    .bind(user_id)
    .fetch_one(conn)
    .await
}

/// Claims the svix id in the processing log and reads the workspace, member and
/// user rows the event is about (null keys read nothing), in one round trip.
///
/// A dead svix id is taken up afresh (a replay must run); any other existing
/// status means the event was applied already and `fresh` is false. The reads see
/// every transaction that committed before the event's advisory locks were granted.
async fn begin(
    conn: &mut PgConnection,
    incoming: &Incoming,
    decoded: &Decoded,
    initial: &str,
    ws_id: Option<&str>,
    membership_id: Option<&str>,
    user_id: Option<&str>,
) -> Result<Begin, sqlx::Error> {
    sqlx::query_as(concat!(
        "with log as ( \
           insert into events (svix_id, type, workspace_id, status, received_at, processed_at) \
           values ($1, $2, $3, $4, $5, clock_timestamp()) \
           on conflict (svix_id) do update set \
             type = excluded.type, workspace_id = excluded.workspace_id, \
             status = excluded.status, error = null, \
             attempts = events.attempts + 1, processed_at = clock_timestamp() \
           where events.status = 'dead' \
           returning 1) \
         select exists (select 1 from log) as fresh, ",
        begin_columns!(),
        " \
         from (select 1) as one \
         left join workspaces w on w.id = $6 \
         left join members m on m.membership_id = $7 \
         left join users u on u.id = $8 \
         left join membership_removals r on r.membership_id = $7"
    ))
    .bind(&incoming.svix_id)
    .bind(decoded.kind.as_str())
    .bind(decoded.workspace_id())
    .bind(initial)
    .bind(incoming.received_at)
    .bind(ws_id)
    .bind(membership_id)
    .bind(user_id)
    .fetch_one(conn)
    .await
}

// ---- workspaces --------------------------------------------------------------------

/// A workspace row as far as provisioning decisions need it.
#[derive(Debug, Clone)]
pub(super) struct WorkspaceRow {
    pub(super) name: Option<String>,
    pub(super) slug: Option<String>,
    pub(super) image_url: Option<String>,
    pub(super) created_by: Option<String>,
    pub(super) max_allowed_memberships: Option<i32>,
    pub(super) status: String,
    pub(super) plan: String,
    pub(super) source_version: Option<i64>,
    /// Version of the snapshot that set `plan` (null: none did).
    pub(super) plan_version: Option<i64>,
    /// Svix ids of the snapshots the data and the plan came from.
    pub(super) source_event: Option<String>,
    pub(super) plan_event: Option<String>,
    pub(super) clerk_created_at: Option<DateTime<Utc>>,
    pub(super) deleted_at: Option<DateTime<Utc>>,
    pub(super) deleted_version: Option<i64>,
    /// Its deletion is only inferred by reconcile (not a tombstone).
    pub(super) deletion_inferred: bool,
}

/// The workspace after an upsert.
pub(super) struct WorkspaceState {
    pub(super) changed: bool,
    /// Set when the workspace is tombstoned (by Clerk: an inferred deletion is
    /// lifted by the snapshot).
    pub(super) deleted_at: Option<DateTime<Utc>>,
    /// The snapshot lifted an inferred deletion, and restored the memberships it
    /// had ended.
    pub(super) restored: bool,
}

/// Inserts a new workspace with its quotas and onboarding steps, in one statement;
/// the snapshot's data and the plan (when `plan_version` is given) come from this
/// event.
async fn insert_workspace(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    id: &str,
    org: Option<&Organization>,
    plan: &str,
    plan_version: Option<i64>,
    deleted: Option<(DateTime<Utc>, i64)>,
) -> Result<(), sqlx::Error> {
    if cx.pending.deferred.active() {
        // The same row as below; quotas and steps follow its plan when it is written.
        let svix_id = cx.incoming.svix_id.as_str();
        let row = WorkspaceRow {
            name: org.map(|o| o.name.clone()),
            slug: org.and_then(|o| o.slug.clone()),
            image_url: org.and_then(|o| o.image_url.clone()),
            created_by: org.and_then(|o| o.created_by.clone()),
            max_allowed_memberships: org.and_then(|o| o.max_allowed_memberships),
            status: if deleted.is_some() {
                "deleted"
            } else {
                "active"
            }
            .to_owned(),
            plan: plan.to_owned(),
            source_version: org.map(|o| o.updated_at),
            plan_version,
            source_event: org.map(|_| svix_id.to_owned()),
            plan_event: plan_version.map(|_| svix_id.to_owned()),
            clerk_created_at: org.map(|o| ts(o.created_at)),
            deleted_at: deleted.map(|d| d.0),
            deleted_version: deleted.map(|d| d.1),
            deletion_inferred: false,
        };
        cx.pending.deferred.insert_workspace(id, row);
        return Ok(());
    }
    let (quota_names, quota_values) = cx.plans.quotas(plan);
    let steps: Vec<&str> = cx
        .settings
        .onboarding_steps
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    let required: Vec<bool> = cx
        .settings
        .onboarding_steps
        .iter()
        .map(|s| s.required)
        .collect();
    // Parent and children in one statement: the foreign-key checks run at its end.
    sqlx::query(
        "with w as ( \
           insert into workspaces (id, name, slug, image_url, created_by, max_allowed_memberships, \
             status, plan, source_version, clerk_created_at, deleted_at, deleted_version, \
             plan_version, source_event, plan_event) \
           values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $17, $18, $19) \
           returning id), \
         q as ( \
           insert into workspace_quotas (workspace_id, name, limit_value) \
           select $1, n, v from unnest($13::text[], $14::bigint[]) as t(n, v)), \
         o as ( \
           insert into onboarding_steps (workspace_id, name, position, required) \
           select $1, n, (p - 1)::smallint, r \
           from unnest($15::text[], $16::bool[]) with ordinality as t(n, r, p)) \
         select count(*) from w",
    )
    .bind(id)
    .bind(org.map(|o| o.name.as_str()))
    .bind(org.and_then(|o| o.slug.as_deref()))
    .bind(org.and_then(|o| o.image_url.as_deref()))
    .bind(org.and_then(|o| o.created_by.as_deref()))
    .bind(org.and_then(|o| o.max_allowed_memberships))
    .bind(if deleted.is_some() {
        "deleted"
    } else {
        "active"
    })
    .bind(plan)
    .bind(org.map(|o| o.updated_at))
    .bind(org.map(|o| ts(o.created_at)))
    .bind(deleted.map(|d| d.0))
    .bind(deleted.map(|d| d.1))
    .bind(quota_names)
    .bind(quota_values)
    .bind(steps)
    .bind(required)
    .bind(plan_version)
    .bind(org.map(|_| cx.incoming.svix_id.as_str()))
    .bind(plan_version.map(|_| cx.incoming.svix_id.as_str()))
    .execute(conn)
    .await?;
    Ok(())
}

/// Applies an organization snapshot: data fields only when it beats the stored
/// one ([`Source::beats`]); plan and quotas follow the standing snapshot among
/// those that name a configured plan or none (an unknown name never downgrades a
/// workspace, it keeps its plan; a new workspace gets the default plan); a
/// tombstoned workspace takes the data but stays deleted.
pub(super) async fn upsert_workspace(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    org: &Organization,
    existing: Option<WorkspaceRow>,
) -> Result<WorkspaceState, sqlx::Error> {
    let requested = org.requested_plan.as_deref();
    let unknown = requested.filter(|p| !cx.settings.plans.contains_key(*p));
    let plan = cx.settings.plan_for(requested).to_owned();
    let Some(row) = existing else {
        // An unknown plan sets nothing: a later snapshot of any version may set it.
        let plan_version = unknown.is_none().then_some(org.updated_at);
        insert_workspace(conn, cx, &org.id, Some(org), &plan, plan_version, None).await?;
        cx.audit(
            &org.id,
            "workspace.provisioned",
            Some(&org.id),
            json!({ "after": {
                "name": org.name, "slug": org.slug, "plan": plan,
                "version": org.updated_at,
            }}),
        );
        if let Some(given) = unknown {
            plan_unknown(cx, &org.id, given, &plan, "default plan applied");
        }
        return Ok(WorkspaceState {
            changed: true,
            deleted_at: None,
            restored: false,
        });
    };
    // A deletion reconcile only inferred is lifted by any snapshot of the
    // organization: Clerk has it.
    let mut row = row;
    let restored = row.deletion_inferred;
    if restored {
        cx.stop_deferring(conn).await?;
        restore_workspace(conn, cx, &org.id).await?;
        row.status = "active".to_owned();
        row.deleted_at = None;
        row.deleted_version = None;
        row.deletion_inferred = false;
    }
    let incoming = cx.incoming;
    let this = Source::new(org.updated_at, &incoming.svix_id);
    let newer = this.beats_stored(Source::stored(row.source_version, &row.source_event));
    let plan_newer =
        unknown.is_none() && this.beats_stored(Source::stored(row.plan_version, &row.plan_event));
    if !newer && !plan_newer {
        return Ok(WorkspaceState {
            changed: restored,
            deleted_at: row.deleted_at,
            restored,
        });
    }
    let (plan, plan_version, plan_event) = if plan_newer {
        (plan, Some(org.updated_at), Some(incoming.svix_id.as_str()))
    } else {
        (
            row.plan.clone(),
            row.plan_version,
            row.plan_event.as_deref(),
        )
    };
    if let Some(waiting) = cx
        .pending
        .deferred
        .update_workspace(&org.id, &row, row.plan != plan)
    {
        // The batch defers: the row to insert (a workspace new in this batch, whose
        // quotas follow its plan when written) or to update (a stored one whose
        // plan stays) takes the snapshot's fields, as the statements below would.
        if newer {
            waiting.name = Some(org.name.clone());
            waiting.slug = org.slug.clone();
            waiting.image_url = org.image_url.clone();
            waiting.created_by = org.created_by.clone();
            waiting.max_allowed_memberships = org.max_allowed_memberships;
            waiting.source_version = Some(org.updated_at);
            waiting.clerk_created_at = Some(ts(org.created_at));
            waiting.source_event = Some(incoming.svix_id.clone());
        }
        waiting.plan = plan.clone();
        waiting.plan_version = plan_version;
        waiting.plan_event = plan_event.map(str::to_owned);
        if newer && let Some(given) = unknown {
            plan_unknown(cx, &org.id, given, &plan, "current plan kept");
        }
    } else {
        cx.stop_deferring(conn).await?;
        write_workspace_update(
            conn,
            cx,
            org,
            newer,
            &plan,
            plan_version,
            plan_event,
            unknown,
            &row.plan,
        )
        .await?;
    }
    if row.plan != plan {
        cx.audit(
            &org.id,
            "workspace.plan_changed",
            Some(&org.id),
            json!({ "before": { "plan": row.plan }, "after": { "plan": plan } }),
        );
    }
    if !newer {
        return Ok(WorkspaceState {
            changed: true,
            deleted_at: row.deleted_at,
            restored,
        });
    }
    let clerk_created_at = ts(org.created_at);
    if row.name.as_deref() != Some(org.name.as_str()) {
        cx.audit(
            &org.id,
            "workspace.renamed",
            Some(&org.id),
            json!({ "before": { "name": row.name }, "after": { "name": org.name } }),
        );
    }
    let mut before = serde_json::Map::new();
    let mut after = serde_json::Map::new();
    let mut diff = |field: &str, old: Value, new: Value| {
        if old != new {
            before.insert(field.to_owned(), old);
            after.insert(field.to_owned(), new);
        }
    };
    diff("slug", json!(row.slug), json!(org.slug));
    diff("image_url", json!(row.image_url), json!(org.image_url));
    diff("created_by", json!(row.created_by), json!(org.created_by));
    diff(
        "max_allowed_memberships",
        json!(row.max_allowed_memberships),
        json!(org.max_allowed_memberships),
    );
    diff(
        "clerk_created_at",
        json!(row.clerk_created_at),
        json!(clerk_created_at),
    );
    if !after.is_empty() {
        cx.audit(
            &org.id,
            "workspace.updated",
            Some(&org.id),
            json!({ "before": before, "after": after }),
        );
    }
    Ok(WorkspaceState {
        changed: true,
        deleted_at: row.deleted_at,
        restored,
    })
}

/// Writes an organization snapshot's update of a stored workspace: its data and
/// plan (`newer`), or only its plan, and the plan's quotas when the plan changes.
#[allow(clippy::too_many_arguments)]
async fn write_workspace_update(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    org: &Organization,
    newer: bool,
    plan: &str,
    plan_version: Option<i64>,
    plan_event: Option<&str>,
    unknown: Option<&str>,
    before_plan: &str,
) -> Result<(), sqlx::Error> {
    let incoming = cx.incoming;
    if newer {
        let clerk_created_at = ts(org.created_at);
        sqlx::query(
            "update workspaces set name = $2, slug = $3, image_url = $4, created_by = $5, \
               max_allowed_memberships = $6, plan = $7, source_version = $8, \
               clerk_created_at = $9, plan_version = $10, source_event = $11, \
               plan_event = $12, updated_at = now() \
             where id = $1",
        )
        .bind(&org.id)
        .bind(&org.name)
        .bind(&org.slug)
        .bind(&org.image_url)
        .bind(&org.created_by)
        .bind(org.max_allowed_memberships)
        .bind(plan)
        .bind(org.updated_at)
        .bind(clerk_created_at)
        .bind(plan_version)
        .bind(&incoming.svix_id)
        .bind(plan_event)
        .execute(&mut *conn)
        .await?;
        if let Some(given) = unknown {
            plan_unknown(cx, &org.id, given, plan, "current plan kept");
        }
    } else {
        // Older data, but the newest snapshot naming a known plan (or none): only
        // the plan follows it.
        sqlx::query(
            "update workspaces set plan = $2, plan_version = $3, plan_event = $4, \
               updated_at = now() \
             where id = $1",
        )
        .bind(&org.id)
        .bind(plan)
        .bind(plan_version)
        .bind(plan_event)
        .execute(&mut *conn)
        .await?;
    }
    if before_plan != plan {
        let (names, values) = cx.plans.quotas(plan);
        replace_quotas(conn, &org.id, names, values).await?;
    }
    Ok(())
}

/// Sets a workspace's quotas to exactly `names` with `values`: the names leaving
/// and the names staying or arriving are two disjoint sets of rows, so one
/// statement may touch both.
async fn replace_quotas(
    conn: &mut PgConnection,
    workspace_id: &str,
    names: &[String],
    values: &[i64],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "with d as ( \
           delete from workspace_quotas \
           where workspace_id = $1 and not (name = any($2::text[]))) \
         insert into workspace_quotas (workspace_id, name, limit_value) \
         select $1, n, v from unnest($2::text[], $3::bigint[]) as t(n, v) \
         on conflict (workspace_id, name) do update set limit_value = excluded.limit_value",
    )
    .bind(workspace_id)
    .bind(names)
    .bind(values)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records that a snapshot named a plan that is not configured: a warning with the
/// workspace id and a `workspace.plan_unknown` audit row naming it.
fn plan_unknown(cx: &mut Ctx<'_>, workspace_id: &str, given: &str, plan: &str, outcome: &str) {
    tracing::warn!(
        workspace.id = %workspace_id,
        plan.requested = %given,
        plan.current = %plan,
        svix.id = %cx.incoming.svix_id,
        event.type = %cx.incoming.kind_str(),
        "organization names an unknown plan; {outcome}"
    );
    cx.audit(
        workspace_id,
        "workspace.plan_unknown",
        Some(workspace_id),
        json!({ "plan": given, "applied": plan }),
    );
}

/// `organization.deleted`: tombstone the workspace (creating it if unknown) and end
/// its memberships. The earliest deletion time is kept, whatever the order the
/// deletes arrive in (Clerk may send one again later as a new message).
async fn delete_workspace(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    id: &str,
    at_ms: i64,
    existing: Option<WorkspaceRow>,
) -> Result<bool, sqlx::Error> {
    let at = ts(at_ms);
    let mut changed = false;
    match existing {
        None => {
            let plan = cx.settings.default_plan.clone();
            insert_workspace(conn, cx, id, None, &plan, None, Some((at, at_ms))).await?;
            cx.audit(
                id,
                "workspace.deleted",
                Some(id),
                json!({ "before": { "status": null }, "after": { "status": "deleted" }, "deleted_at": at }),
            );
            changed = true;
        }
        Some(row) if row.status == "deleted" => {
            // A deletion by Clerk replaces an inferred one whatever the times.
            if row.deletion_inferred || row.deleted_version.is_none_or(|v| at_ms < v) {
                sqlx::query(
                    "update workspaces set deleted_at = $2, deleted_version = $3, \
                       deletion_inferred = false, updated_at = now() \
                     where id = $1",
                )
                .bind(id)
                .bind(at)
                .bind(at_ms)
                .execute(&mut *conn)
                .await?;
                changed = true;
            }
        }
        Some(row) => {
            sqlx::query(
                "update workspaces set status = 'deleted', deleted_at = $2, deleted_version = $3, \
                   updated_at = now() \
                 where id = $1",
            )
            .bind(id)
            .bind(at)
            .bind(at_ms)
            .execute(&mut *conn)
            .await?;
            cx.audit(
                id,
                "workspace.deleted",
                Some(id),
                json!({ "before": { "status": row.status }, "after": { "status": "deleted" }, "deleted_at": at }),
            );
            changed = true;
        }
    }
    let ended = end_memberships(conn, cx, Ending::Workspace(id), at).await?;
    Ok(changed || ended)
}

/// Sets a workspace's quotas to its plan's configured limits (after the limits of
/// a plan were changed in config), on `conn` inside a transaction that holds the
/// workspace's lock. True when something changed; one `workspace.quotas_refreshed`
/// audit row then says what.
pub(crate) async fn refresh_quotas(
    conn: &mut PgConnection,
    plans: &Plans,
    workspace_id: &str,
    actor: &'static str,
) -> Result<bool, sqlx::Error> {
    lock(conn, &[ws_key(workspace_id)]).await?;
    let plan: Option<String> =
        sqlx::query_scalar("select plan from workspaces where id = $1 and status = 'active'")
            .bind(workspace_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(plan) = plan else {
        return Ok(false);
    };
    let (names, values) = plans.quotas(&plan);
    let before: Vec<(String, i64)> = sqlx::query_as(
        "select name, limit_value from workspace_quotas where workspace_id = $1 order by name",
    )
    .bind(workspace_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut after: Vec<(String, i64)> = names.iter().cloned().zip(values.iter().copied()).collect();
    after.sort();
    if before == after {
        return Ok(false);
    }
    replace_quotas(conn, workspace_id, names, values).await?;
    let map = |rows: &[(String, i64)]| -> Value {
        rows.iter()
            .map(|(n, v)| (n.clone(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    sqlx::query(
        "insert into audit_log (workspace_id, action, actor, subject, details) \
         values ($1, 'workspace.quotas_refreshed', $2, $1, $3)",
    )
    .bind(workspace_id)
    .bind(actor)
    .bind(sqlx::types::Json(json!({
        "plan": plan,
        "before": map(&before),
        "after": map(&after),
    })))
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_version_wins_and_a_tie_goes_to_the_smaller_svix_id() {
        let s = |version, event| Source { version, event };
        assert!(s(2, Some("msg_b")).beats(s(1, Some("msg_a"))));
        assert!(!s(1, Some("msg_a")).beats(s(2, Some("msg_b"))));
        assert!(s(1, Some("msg_a")).beats(s(1, Some("msg_b"))));
        assert!(!s(1, Some("msg_b")).beats(s(1, Some("msg_a"))));
        // The same snapshot again does not replace itself.
        assert!(!s(1, Some("msg_a")).beats(s(1, Some("msg_a"))));
        // A stored source without a svix id (written before they were kept) loses a tie.
        assert!(s(1, Some("msg_z")).beats(s(1, None)));
        assert!(!s(1, None).beats(s(1, Some("msg_a"))));
        assert!(s(0, Some("msg_a")).beats_stored(None));
    }

    #[test]
    fn the_earliest_end_stands_and_equal_times_go_by_reason() {
        let (t1, t2) = (ts(1_000), ts(2_000));
        assert_eq!(
            earliest([
                Some((t2, "membership_deleted")),
                Some((t1, "workspace_deleted"))
            ]),
            Some((t1, "workspace_deleted"))
        );
        assert_eq!(
            earliest([
                Some((t1, "workspace_deleted")),
                None,
                Some((t1, "user_deleted")),
                Some((t1, "membership_deleted")),
            ]),
            Some((t1, "membership_deleted"))
        );
        assert_eq!(earliest([None, None]), None);
    }
}
