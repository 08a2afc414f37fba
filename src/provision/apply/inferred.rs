//! Removals reconcile infers (an organization or membership missing from Clerk's
//! listings), and their lifting (DESIGN §5: "what reconcile removes on inference
//! is not a tombstone").
//!
//! Guarantee: an inferred removal takes access away at once (the workspace is
//! `deleted`, the membership ended) but is stored apart from Clerk's deletions
//! (`workspaces.deletion_inferred`, `removal_reason` `not_in_clerk` /
//! `workspace_not_in_clerk`): any real deletion of the membership, its user or
//! its workspace replaces it whatever the times ([`super::membership`],
//! [`super::workspace`]), and any later snapshot of the organization lifts the
//! workspace's and restores the memberships it ended ([`restore_workspace`]), as a
//! later snapshot of a membership lifts its own. Never applied to what Clerk
//! itself ended.

use serde_json::json;
use sqlx::PgConnection;

use super::audit::Ctx;
use super::display::standing_display;
use super::membership::{Ending, end_memberships};
use super::rules::{NOT_IN_CLERK, WORKSPACE_NOT_IN_CLERK, ts};
use super::state::{Begin, WorkspaceRow};
use crate::provision::payload::Removal;

/// `organization.deleted` applied by reconcile: an active workspace becomes
/// `deleted` with its deletion marked inferred, and its active memberships end
/// (`workspace_not_in_clerk`). A workspace unknown or already deleted is left as
/// it is (false).
pub(super) async fn infer_workspace_gone(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    id: &str,
    at_ms: i64,
    existing: Option<WorkspaceRow>,
) -> Result<bool, sqlx::Error> {
    let Some(row) = existing.filter(|w| w.status == "active") else {
        return Ok(false);
    };
    let at = ts(at_ms);
    sqlx::query(
        "update workspaces set status = 'deleted', deleted_at = $2, deleted_version = $3, \
           deletion_inferred = true, updated_at = now() \
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
        json!({
            "before": { "status": row.status }, "after": { "status": "deleted" },
            "deleted_at": at, "reason": NOT_IN_CLERK,
        }),
    );
    end_memberships(conn, cx, Ending::WorkspaceInferred(id), at).await?;
    Ok(true)
}

/// Lifts a workspace's inferred deletion (a snapshot of the organization arrived):
/// active again, and every membership its inferred deletion ended is active again
/// (none of them has a real end: a real one would have replaced the inferred one),
/// with display fields that follow the user again. Audits `workspace.restored` and
/// a `member.restored` per membership.
///
/// Holds the workspace's lock, not the members' users': the rows are locked first,
/// so a `user.updated` of one of them either came first (and is seen) or waits and
/// then sees the row active.
pub(super) async fn restore_workspace(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update workspaces set status = 'active', deleted_at = null, deleted_version = null, \
           deletion_inferred = false, updated_at = now() \
         where id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    cx.audit(
        id,
        "workspace.restored",
        Some(id),
        json!({ "before": { "status": "deleted" }, "after": { "status": "active" }, "reason": NOT_IN_CLERK }),
    );
    let ended: Vec<(String, String)> = sqlx::query_as(
        "select membership_id, user_id from members \
         where workspace_id = $1 and removal_reason = 'workspace_not_in_clerk' \
         order by membership_id for update",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    if ended.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = ended.iter().map(|e| e.0.as_str()).collect();
    sqlx::query(concat!(
        "update members m set removed_at = null, removal_reason = null, \
           (email, first_name, last_name, image_url, profile_version, profile_event) = ",
        standing_display!("$2"),
        ", updated_at = now() \
         where membership_id = any($1)"
    ))
    .bind(&ids)
    .bind(None::<i64>)
    .execute(&mut *conn)
    .await?;
    for (membership_id, user_id) in &ended {
        cx.audit(
            id,
            "member.restored",
            Some(user_id),
            json!({ "membership_id": membership_id, "reason": WORKSPACE_NOT_IN_CLERK }),
        );
    }
    Ok(())
}

/// `organizationMembership.deleted` applied by reconcile: an active membership
/// ends (`not_in_clerk`, at the removal's time), so access goes at once; a
/// membership unknown or already ended is left as it is (false). Nothing is
/// recorded as Clerk's removal of it.
pub(super) async fn infer_membership_gone(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    r: &Removal,
    at_ms: i64,
    st: &Begin,
) -> Result<bool, sqlx::Error> {
    if !st.m_exists {
        return Ok(false);
    }
    let at = ts(at_ms);
    // Locked and read as it is now: the removal may not name the user, so this
    // event need not hold the user's lock.
    let row: (String, String, bool) = sqlx::query_as(
        "select workspace_id, user_id, removed_at is null from members \
         where membership_id = $1 for update",
    )
    .bind(&r.id)
    .fetch_one(&mut *conn)
    .await?;
    let (workspace_id, user_id, active) = row;
    if !active {
        return Ok(false);
    }
    sqlx::query(concat!(
        "update members m set removed_at = $2, removal_reason = $3, \
           (email, first_name, last_name, image_url, profile_version, profile_event) = ",
        standing_display!("$4"),
        ", updated_at = now() \
         where membership_id = $1"
    ))
    .bind(&r.id)
    .bind(at)
    .bind(NOT_IN_CLERK)
    .bind(at.timestamp_millis())
    .execute(&mut *conn)
    .await?;
    cx.audit(
        &workspace_id,
        "member.removed",
        Some(&user_id),
        json!({ "membership_id": r.id, "reason": NOT_IN_CLERK }),
    );
    Ok(true)
}
