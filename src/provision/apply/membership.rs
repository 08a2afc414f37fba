//! Membership rows: the effect of membership snapshots and removals, and the end
//! of every membership of a deleted workspace or user (DESIGN §5).
//!
//! Guarantee: run under the event's advisory locks inside the caller's
//! transaction, each function leaves a member row whose every field is a function
//! of the set of events applied (see [`super::rules`]): the membership's data follows
//! its standing snapshot, the display fields their standing source, and the end
//! its earliest cause; a removed row never becomes active again.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;

use super::audit::Ctx;
use super::deferred::{NewMember, NewRemoval};
use super::display::{Display, Profile, standing, standing_display, user_source_until};
use super::rules::{End, Source, WORKSPACE_NOT_IN_CLERK, earliest, inferred, ts};
use super::state::{Begin, WorkspaceState, read_state};
use crate::provision::payload::{Membership, Removal};

/// Whose active memberships end, and so the reason recorded on them.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ending<'a> {
    /// Every membership of this workspace (`workspace_deleted`).
    Workspace(&'a str),
    /// Every membership of this user (`user_deleted`).
    User(&'a str),
    /// The active memberships of this workspace, whose deletion reconcile inferred
    /// (`workspace_not_in_clerk`).
    WorkspaceInferred(&'a str),
}

/// Ends the memberships `of` at `at`: the active ones, the ones whose end reconcile
/// only inferred (a real end replaces it whatever the times), and the ended ones
/// whose end is later (or, at the same time, has a reason later in byte order), so
/// the earliest cause stands whatever the order of arrival; an inferred end
/// (`WorkspaceInferred`) takes the active ones only. A `member.removed` audit
/// row goes to each membership's workspace for those that were active; true when
/// any row changed.
///
/// A workspace's deletion holds the workspace's lock and a user's the user's, not
/// each other's: both lock the rows they end first (in membership id order, so
/// they never deadlock on each other) and decide on them as they are then, so the
/// earlier end stands and the rows that were active are told right.
pub(super) async fn end_memberships(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    of: Ending<'_>,
    at: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    // One static statement per case, so each keeps its own index-friendly plan.
    let (sql, id, reason) = match of {
        Ending::Workspace(id) => (
            "select membership_id, workspace_id, user_id, removed_at is null from members m \
             where m.workspace_id = $1 \
               and (m.removed_at is null \
                    or m.removal_reason in ('not_in_clerk', 'workspace_not_in_clerk') \
                    or (m.removed_at, m.removal_reason collate \"C\") \
                       > ($2, $3::text collate \"C\")) \
             order by m.membership_id for update",
            id,
            "workspace_deleted",
        ),
        // Binds the same parameters as the others ($2 and $3 are always set).
        Ending::WorkspaceInferred(id) => (
            "select membership_id, workspace_id, user_id, true from members m \
             where m.workspace_id = $1 and m.removed_at is null \
               and $2::timestamptz is not null and $3::text is not null \
             order by m.membership_id for update",
            id,
            WORKSPACE_NOT_IN_CLERK,
        ),
        Ending::User(id) => (
            "select membership_id, workspace_id, user_id, removed_at is null from members m \
             where m.user_id = $1 \
               and (m.removed_at is null \
                    or m.removal_reason in ('not_in_clerk', 'workspace_not_in_clerk') \
                    or (m.removed_at, m.removal_reason collate \"C\") \
                       > ($2, $3::text collate \"C\")) \
             order by m.membership_id for update",
            id,
            "user_deleted",
        ),
    };
    let ending: Vec<(String, String, String, bool)> = sqlx::query_as(sql)
        .bind(id)
        .bind(at)
        .bind(reason)
        .fetch_all(&mut *conn)
        .await?;
    if ending.is_empty() {
        return Ok(false);
    }
    let ids: Vec<&str> = ending.iter().map(|e| e.0.as_str()).collect();
    // Each row's display falls back to its best source not after the end.
    sqlx::query(concat!(
        "update members m set removed_at = $2, removal_reason = $3, \
           (email, first_name, last_name, image_url, profile_version, profile_event) = ",
        standing_display!("$4"),
        ", updated_at = now() \
         where membership_id = any($1)"
    ))
    .bind(&ids)
    .bind(at)
    .bind(reason)
    .bind(at.timestamp_millis())
    .execute(&mut *conn)
    .await?;
    for (membership_id, workspace_id, user_id, _) in ending.iter().filter(|e| e.3) {
        cx.audit(
            workspace_id,
            "member.removed",
            Some(user_id),
            json!({ "membership_id": membership_id, "reason": reason }),
        );
    }
    Ok(true)
}

/// `organizationMembership.created/updated` (`deleted_at_ms` None) and
/// `organizationMembership.deleted` (`deleted_at_ms` = envelope timestamp).
///
/// Three groups of fields, each decided on its own: the membership's data (role,
/// Clerk role, `joined_at`, and the snapshot's own display fields) follows the
/// standing membership snapshot; the display fields follow the standing source
/// among that snapshot and the user's `user.updated` snapshots not after the
/// membership's end (all of them while it is active: only active rows follow the
/// user); the end is the earliest cause known ([`earliest`]). A removed row keeps
/// taking the snapshots that describe the membership while it existed (versions
/// up to its end), so its fields do not depend on whether they arrived before or
/// after the removal; it never becomes active again.
///
/// `ws` is the membership's workspace as the snapshot's organization left it
/// (the caller upserts it first, from `st`).
pub(super) async fn upsert_membership(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    m: &Membership,
    deleted_at_ms: Option<i64>,
    st: &Begin,
    ws: WorkspaceState,
) -> Result<bool, sqlx::Error> {
    // Lifting an inferred deletion of the workspace restored its memberships,
    // perhaps this one: decide on them as they are now.
    let restored;
    let st = if ws.restored {
        restored = read_state(conn, &m.organization.id, &m.id, &m.user.user_id).await?;
        &restored
    } else {
        st
    };
    let incoming = cx.incoming;
    let this = Source::new(m.updated_at, &incoming.svix_id);
    let ws_id = m.organization.id.as_str();
    let user_id = m.user.user_id.as_str();
    let role = cx.settings.role_for(&m.role).as_str();
    let removal = deleted_at_ms.map(ts);
    let mut recorded = false;
    if let Some(at) = removal {
        recorded = record_removal(
            conn,
            cx,
            st,
            NewRemoval {
                membership_id: m.id.clone(),
                workspace_id: ws_id.to_owned(),
                user_id: Some(user_id.to_owned()),
                removed_at: at,
            },
        )
        .await?;
    }
    // Every cause known now that ends this membership (a removal recorded before
    // its snapshot arrived among them); the earliest stands. An end reconcile only
    // inferred is not one: this snapshot of the membership lifts it, a real end
    // replaces it.
    let end = earliest([
        st.m_real_end(),
        recorded_removal(st, removal).map(|at| (at, "membership_deleted")),
        ws.deleted_at.map(|at| (at, "workspace_deleted")),
        st.u_deleted_at.map(|at| (at, "user_deleted")),
    ]);
    let snapshot = Profile {
        display: Display::of(&m.user),
        version: m.updated_at,
        event: Some(incoming.svix_id.clone()),
    };

    if !st.m_exists {
        let user = user_source_until(conn, st.user_profile(), user_id, end).await?;
        let profile = standing(Some(snapshot.clone()), user).unwrap_or_default();
        if cx.pending.deferred.active() {
            cx.pending.deferred.insert_member(NewMember {
                membership_id: m.id.clone(),
                workspace_id: ws_id.to_owned(),
                user_id: user_id.to_owned(),
                role: role.to_owned(),
                clerk_role: m.role.clone(),
                email: profile.display.email.clone(),
                first_name: profile.display.first_name.clone(),
                last_name: profile.display.last_name.clone(),
                image_url: profile.display.image_url.clone(),
                source_version: m.updated_at,
                profile_version: profile.version,
                joined_at: ts(m.created_at),
                removed_at: end.map(|e| e.0),
                removal_reason: end.map(|e| e.1.to_owned()),
                source_event: incoming.svix_id.clone(),
                profile_event: profile.event.clone(),
                snapshot: snapshot.display,
            });
        } else {
            sqlx::query(
                "insert into members (membership_id, workspace_id, user_id, role, clerk_role, \
                   email, first_name, last_name, image_url, source_version, profile_version, \
                   joined_at, removed_at, removal_reason, source_event, profile_event, \
                   snapshot_email, snapshot_first_name, snapshot_last_name, snapshot_image_url) \
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                   $17, $18, $19, $20)",
            )
            .bind(&m.id)
            .bind(ws_id)
            .bind(user_id)
            .bind(role)
            .bind(&m.role)
            .bind(&profile.display.email)
            .bind(&profile.display.first_name)
            .bind(&profile.display.last_name)
            .bind(&profile.display.image_url)
            .bind(m.updated_at)
            .bind(profile.version)
            .bind(ts(m.created_at))
            .bind(end.map(|e| e.0))
            .bind(end.map(|e| e.1))
            .bind(&incoming.svix_id)
            .bind(&profile.event)
            .bind(&snapshot.display.email)
            .bind(&snapshot.display.first_name)
            .bind(&snapshot.display.last_name)
            .bind(&snapshot.display.image_url)
            .execute(&mut *conn)
            .await?;
        }
        // A membership stored as already ended was never a member here: no audit.
        if end.is_none() {
            let mut details = json!({
                "membership_id": m.id, "role": role, "clerk_role": m.role,
            });
            details["after"] = profile.display.json();
            cx.audit(ws_id, "member.added", Some(user_id), details);
        }
        return Ok(true);
    }

    // Clerk changes no membership after it ended: a snapshot newer than the end
    // describes nothing Clerk had, and only the end may still apply.
    let describes = end.is_none_or(|(at, _)| m.updated_at <= at.timestamp_millis());
    let source_new =
        describes && this.beats_stored(Source::stored(st.m_source_version, &st.m_source_event));
    let own = if source_new {
        Some(snapshot.clone())
    } else {
        st.m_snapshot()
    };
    let user = user_source_until(conn, st.user_profile(), user_id, end).await?;
    let profile = standing(own, user).unwrap_or_default();
    let before = st.m_profile();
    let profile_new = profile != before;
    let end_new = end != st.m_end();
    // A row holding no snapshot joined when it was first removed.
    let placeholder = st.m_snapshot().is_none();
    let joined_new = placeholder && recorded;
    if !source_new && !profile_new && !end_new && !joined_new {
        return Ok(ws.changed);
    }
    cx.stop_deferring(conn).await?;
    sqlx::query(
        "update members set \
           role = case when $2 then $3 else role end, \
           clerk_role = case when $2 then $4 else clerk_role end, \
           joined_at = case when $2 then $5 \
             when source_version = 0 and source_event is null then least(joined_at, $15) \
             else joined_at end, \
           source_version = case when $2 then $6 else source_version end, \
           source_event = case when $2 then $7 else source_event end, \
           snapshot_email = case when $2 then $16 else snapshot_email end, \
           snapshot_first_name = case when $2 then $17 else snapshot_first_name end, \
           snapshot_last_name = case when $2 then $18 else snapshot_last_name end, \
           snapshot_image_url = case when $2 then $19 else snapshot_image_url end, \
           email = $8, first_name = $9, last_name = $10, image_url = $11, \
           profile_version = $12, profile_event = $20, \
           removed_at = $13, removal_reason = $14, updated_at = now() \
         where membership_id = $1",
    )
    .bind(&m.id)
    .bind(source_new)
    .bind(role)
    .bind(&m.role)
    .bind(ts(m.created_at))
    .bind(m.updated_at)
    .bind(&incoming.svix_id)
    .bind(&profile.display.email)
    .bind(&profile.display.first_name)
    .bind(&profile.display.last_name)
    .bind(&profile.display.image_url)
    .bind(profile.version)
    .bind(end.map(|e| e.0))
    .bind(end.map(|e| e.1))
    .bind(recorded_removal(st, removal))
    .bind(&snapshot.display.email)
    .bind(&snapshot.display.first_name)
    .bind(&snapshot.display.last_name)
    .bind(&snapshot.display.image_url)
    .bind(&profile.event)
    .execute(&mut *conn)
    .await?;
    if let Some((_, was)) = st.m_end() {
        // Not a member before: the changes of a removed row are not audited, but
        // the end of an inference lifted is.
        if end.is_none() {
            cx.audit(
                ws_id,
                "member.restored",
                Some(user_id),
                json!({
                    "membership_id": m.id, "reason": was, "role": role,
                    "clerk_role": m.role, "after": profile.display.json(),
                }),
            );
        }
        return Ok(true);
    }
    if let Some((_, reason)) = end {
        cx.audit(
            ws_id,
            "member.removed",
            Some(user_id),
            json!({ "membership_id": m.id, "reason": reason }),
        );
        return Ok(true);
    }
    let old_role = st.m_role.as_deref().unwrap_or_default();
    let old_clerk_role = st.m_clerk_role.as_deref().unwrap_or_default();
    if source_new && (old_role != role || old_clerk_role != m.role) {
        cx.audit(
            ws_id,
            "member.role_changed",
            Some(user_id),
            json!({
                "membership_id": m.id,
                "before": { "role": old_role, "clerk_role": old_clerk_role },
                "after": { "role": role, "clerk_role": m.role },
            }),
        );
    }
    if profile.display != before.display {
        cx.audit(
            ws_id,
            "member.updated",
            Some(user_id),
            json!({
                "membership_id": m.id,
                "before": before.display.json(),
                "after": profile.display.json(),
            }),
        );
    }
    Ok(true)
}

/// A member row as it is once this transaction holds its row lock.
#[derive(Debug, sqlx::FromRow)]
struct Locked {
    workspace_id: String,
    user_id: String,
    removed_at: Option<DateTime<Utc>>,
    removal_reason: Option<String>,
}

impl Locked {
    fn end(&self) -> Option<End<'_>> {
        self.removed_at.map(|at| {
            (
                at,
                self.removal_reason
                    .as_deref()
                    .unwrap_or("membership_deleted"),
            )
        })
    }

    /// [`Locked::end`] unless reconcile only inferred it.
    fn real_end(&self) -> Option<End<'_>> {
        self.end().filter(|(_, reason)| !inferred(reason))
    }
}

/// Locks a member row and reads it as it is now: after any transaction that
/// changed it meanwhile has committed. The advisory locks serialize events on one
/// workspace or one user; a row belongs to both, and an event holding only one of
/// them (a removal naming no user holds the workspace's, `user.deleted` the
/// user's) decides on the row under its row lock instead.
async fn lock_member(conn: &mut PgConnection, id: &str) -> Result<Locked, sqlx::Error> {
    sqlx::query_as(
        "select workspace_id, user_id, removed_at, removal_reason from members \
         where membership_id = $1 for update",
    )
    .bind(id)
    .fetch_one(conn)
    .await
}

/// Records a real removal of membership `id` (`membership_removals`: the earliest
/// time, the user when named), whether or not its workspace or row is known; in a
/// deferring batch the record waits with the batch's inserts. True when the
/// earliest time recorded changed.
async fn record_removal(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    st: &Begin,
    removal: NewRemoval,
) -> Result<bool, sqlx::Error> {
    let changed = st.r_removed_at.is_none_or(|t| removal.removed_at < t);
    if cx.pending.deferred.active() {
        cx.pending.deferred.record_removal(removal);
        return Ok(changed);
    }
    sqlx::query(
        "insert into membership_removals (membership_id, workspace_id, user_id, removed_at) \
         values ($1, $2, $3, $4) \
         on conflict (membership_id) do update set \
           removed_at = least(membership_removals.removed_at, excluded.removed_at), \
           workspace_id = least(membership_removals.workspace_id collate \"C\", \
             excluded.workspace_id collate \"C\"), \
           user_id = least(membership_removals.user_id collate \"C\", excluded.user_id collate \"C\")",
    )
    .bind(&removal.membership_id)
    .bind(&removal.workspace_id)
    .bind(&removal.user_id)
    .bind(removal.removed_at)
    .execute(&mut *conn)
    .await?;
    Ok(changed)
}

/// The earliest real removal of a membership known to this event: the one
/// recorded and its own (`at`, when it is one).
fn recorded_removal(st: &Begin, at: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    [st.r_removed_at, at].into_iter().flatten().min()
}

/// `organizationMembership.deleted` without a complete membership snapshot: record
/// the removal by its ids, and end the membership row if there is one, leaving
/// every other stored field as it is.
///
/// An unknown membership whose user the removal names is stored at once as a
/// removed row holding no snapshot (versions 0, `joined_at` = the earliest
/// removal, so any snapshot of it later fills its fields in), whether or not its
/// workspace is known, so it hides an older row of the same user; one whose user
/// is not named waits in the record for its snapshot. Either way the late
/// `created` cannot grant the access Clerk already took away.
pub(super) async fn remove_membership(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    r: &Removal,
    at_ms: i64,
    st: &Begin,
) -> Result<bool, sqlx::Error> {
    let at = ts(at_ms);
    let recorded = record_removal(
        conn,
        cx,
        st,
        NewRemoval {
            membership_id: r.id.clone(),
            workspace_id: r.organization_id.clone(),
            user_id: r.user_id.clone(),
            removed_at: at,
        },
    )
    .await?;
    let removed = recorded_removal(st, Some(at)).expect("this removal's time");
    let this = Some((removed, "membership_deleted"));
    if st.m_exists {
        // The removal may not name the user, so this event need not hold the
        // user's lock: their user.deleted may be ending this row right now. Lock
        // the row and decide on it as it is then (item 16: the earlier end stands).
        let row = lock_member(conn, &r.id).await?;
        let stored = row.end();
        // A real removal replaces an end reconcile only inferred.
        let end = earliest([row.real_end(), this]);
        if end == stored && !recorded {
            // Ended already, as early or earlier, and recorded so.
            return Ok(false);
        }
        let Some((removed_at, reason)) = end else {
            return Ok(recorded);
        };
        // A row holding no snapshot joined when it was first removed. Its display
        // falls back to the best source not after the end; the row lock held makes
        // every user.updated of its user either applied already or waiting to see
        // the end.
        sqlx::query(concat!(
            "update members m set removed_at = $2, removal_reason = $3, \
               joined_at = case when source_version = 0 and source_event is null \
                 then least(joined_at, $4) else joined_at end, \
               (email, first_name, last_name, image_url, profile_version, profile_event) = ",
            standing_display!("$5"),
            ", updated_at = now() \
             where membership_id = $1"
        ))
        .bind(&r.id)
        .bind(removed_at)
        .bind(reason)
        .bind(removed)
        .bind(removed_at.timestamp_millis())
        .execute(&mut *conn)
        .await?;
        if row.removed_at.is_none() {
            cx.audit(
                &row.workspace_id,
                "member.removed",
                Some(&row.user_id),
                json!({ "membership_id": r.id, "reason": reason }),
            );
        }
        return Ok(true);
    }
    // Without the user id there is no row to hang it on: the record waits for the
    // membership's snapshot, which takes the end from it.
    let Some(user_id) = r.user_id.as_deref() else {
        return Ok(recorded);
    };
    let workspace_deleted = st
        .w_deleted_at
        .filter(|_| st.w_deletion_inferred != Some(true));
    let Some((removed_at, reason)) = earliest([
        this,
        workspace_deleted.map(|t| (t, "workspace_deleted")),
        st.u_deleted_at.map(|t| (t, "user_deleted")),
    ]) else {
        return Ok(true);
    };
    // The user's own snapshots not after the end give the display fields, as they
    // would have to a membership stored from its snapshot.
    let profile = user_source_until(conn, st.user_profile(), user_id, Some((removed_at, reason)))
        .await?
        .unwrap_or_default();
    let display = &profile.display;
    // Never a member here: no audit row, like a full removal of an unknown membership.
    sqlx::query(
        "insert into members (membership_id, workspace_id, user_id, role, clerk_role, \
           email, first_name, last_name, image_url, source_version, profile_version, \
           profile_event, joined_at, removed_at, removal_reason) \
         values ($1, $2, $3, 'member', '', $4, $5, $6, $7, 0, $8, $9, $10, $11, $12) \
         on conflict (membership_id) do nothing",
    )
    .bind(&r.id)
    .bind(&r.organization_id)
    .bind(user_id)
    .bind(&display.email)
    .bind(&display.first_name)
    .bind(&display.last_name)
    .bind(&display.image_url)
    .bind(profile.version)
    .bind(&profile.event)
    .bind(removed)
    .bind(removed_at)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}
