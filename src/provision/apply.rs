//! The effect of one decoded event on the workspace state, inside a transaction
//! the caller owns (DESIGN §5).
//!
//! Guarantee: run under the event's advisory locks (see [`lock_keys`]), an event
//! writes its processing-log row and its effect on the caller's transaction, and
//! leaves its audit rows and final status in [`Pending`], which the caller flushes
//! into the same transaction before committing: all commit or roll back together. Every write is gated by a
//! version (`data.updated_at`, the envelope timestamp for deletes) or a tombstone,
//! which makes the final state a function of the set of events applied, not of
//! their order or repetition.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;

use super::payload::{Decoded, Event, Membership, Organization, Removal, User};
use super::{Incoming, Outcome, Plans};
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
fn ts(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
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
    superseded: Vec<String>,
}

impl Pending {
    /// Writes the pending rows on `conn` (the transaction about to commit).
    pub(crate) async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
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
struct Ctx<'a> {
    settings: &'a ProvisioningSettings,
    plans: &'a Plans,
    incoming: &'a Incoming,
    pending: &'a mut Pending,
}

impl Ctx<'_> {
    fn audit(
        &mut self,
        workspace_id: &str,
        action: &'static str,
        subject: Option<&str>,
        details: Value,
    ) {
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

/// Applies one decoded event on `conn` (inside a transaction, possibly with other events, the
/// caller commits after [`Pending::flush`]), processing-log row included; its audit
/// rows and final status wait in `pending`.
pub(crate) async fn apply_event(
    conn: &mut PgConnection,
    settings: &ProvisioningSettings,
    plans: &Plans,
    incoming: &Incoming,
    decoded: &Decoded,
    pending: &mut Pending,
) -> Result<Outcome, sqlx::Error> {
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
        // User events read nothing up front: their upserts are gated in SQL.
        Event::UserUpdated(_) | Event::UserDeleted { .. } => ("processed", None, None, None),
    };
    let state = begin(
        conn,
        incoming,
        decoded,
        initial,
        ws_id,
        membership_id,
        user_id,
    )
    .await?;
    if !state.fresh {
        return Ok(Outcome::Duplicate);
    }
    let mut cx = Ctx {
        settings,
        plans,
        incoming,
        pending,
    };
    let changed = match &decoded.event {
        Event::Unhandled => return Ok(Outcome::Ignored),
        Event::OrganizationUpsert(org) => {
            upsert_workspace(conn, &mut cx, org, state.workspace())
                .await?
                .changed
        }
        Event::OrganizationDeleted { id, at_ms } => {
            delete_workspace(conn, &mut cx, id, *at_ms, state.workspace()).await?
        }
        Event::MembershipUpsert(m) => upsert_membership(conn, &mut cx, m, None, &state).await?,
        Event::MembershipDeleted { removal, at_ms } => match &removal.snapshot {
            Some(m) => upsert_membership(conn, &mut cx, m, Some(*at_ms), &state).await?,
            None => remove_membership(conn, &mut cx, removal, *at_ms, &state).await?,
        },
        Event::UserUpdated(u) => update_user(conn, &mut cx, u).await?,
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
struct Begin {
    /// The svix id is new here, or was dead: apply it.
    fresh: bool,
    w_exists: bool,
    w_name: Option<String>,
    w_slug: Option<String>,
    w_image_url: Option<String>,
    w_created_by: Option<String>,
    w_max_allowed_memberships: Option<i32>,
    w_status: Option<String>,
    w_plan: Option<String>,
    w_source_version: Option<i64>,
    w_plan_version: Option<i64>,
    w_clerk_created_at: Option<DateTime<Utc>>,
    w_deleted_at: Option<DateTime<Utc>>,
    m_exists: bool,
    m_user_id: Option<String>,
    m_role: Option<String>,
    m_clerk_role: Option<String>,
    m_email: Option<String>,
    m_first_name: Option<String>,
    m_last_name: Option<String>,
    m_image_url: Option<String>,
    m_source_version: Option<i64>,
    m_profile_version: Option<i64>,
    m_removed: bool,
    u_email: Option<String>,
    u_first_name: Option<String>,
    u_last_name: Option<String>,
    u_image_url: Option<String>,
    u_source_version: Option<i64>,
    u_deleted_at: Option<DateTime<Utc>>,
}

impl Begin {
    fn workspace(&self) -> Option<WorkspaceRow> {
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
            clerk_created_at: self.w_clerk_created_at,
            deleted_at: self.w_deleted_at,
        })
    }
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
    sqlx::query_as(
        "with log as ( \
           insert into events (svix_id, type, workspace_id, status, received_at, processed_at) \
           values ($1, $2, $3, $4, $5, clock_timestamp()) \
           on conflict (svix_id) do update set \
             type = excluded.type, workspace_id = excluded.workspace_id, \
             status = excluded.status, error = null, \
             attempts = events.attempts + 1, processed_at = clock_timestamp() \
           where events.status = 'dead' \
           returning 1) \
         select exists (select 1 from log) as fresh, \
           w.id is not null as w_exists, w.name as w_name, w.slug as w_slug, \
           w.image_url as w_image_url, w.created_by as w_created_by, \
           w.max_allowed_memberships as w_max_allowed_memberships, w.status as w_status, \
           w.plan as w_plan, w.source_version as w_source_version, \
           w.plan_version as w_plan_version, \
           w.clerk_created_at as w_clerk_created_at, w.deleted_at as w_deleted_at, \
           m.membership_id is not null as m_exists, m.user_id as m_user_id, m.role as m_role, \
           m.clerk_role as m_clerk_role, m.email as m_email, m.first_name as m_first_name, \
           m.last_name as m_last_name, m.image_url as m_image_url, \
           m.source_version as m_source_version, m.profile_version as m_profile_version, \
           m.removed_at is not null as m_removed, \
           u.email as u_email, u.first_name as u_first_name, u.last_name as u_last_name, \
           u.image_url as u_image_url, u.source_version as u_source_version, \
           u.deleted_at as u_deleted_at \
         from (select 1) as one \
         left join workspaces w on w.id = $6 \
         left join members m on m.membership_id = $7 \
         left join users u on u.id = $8",
    )
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
struct WorkspaceRow {
    name: Option<String>,
    slug: Option<String>,
    image_url: Option<String>,
    created_by: Option<String>,
    max_allowed_memberships: Option<i32>,
    status: String,
    plan: String,
    source_version: Option<i64>,
    /// Version of the snapshot that set `plan` (null: none did).
    plan_version: Option<i64>,
    clerk_created_at: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
}

/// The workspace after an upsert.
struct WorkspaceState {
    changed: bool,
    /// Set when the workspace is tombstoned.
    deleted_at: Option<DateTime<Utc>>,
}

/// Inserts a new workspace with its quotas and onboarding steps, in one statement.
async fn insert_workspace(
    conn: &mut PgConnection,
    cx: &Ctx<'_>,
    id: &str,
    org: Option<&Organization>,
    plan: &str,
    plan_version: Option<i64>,
    deleted: Option<(DateTime<Utc>, i64)>,
) -> Result<(), sqlx::Error> {
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
             plan_version) \
           values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $17) returning id), \
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
    .execute(conn)
    .await?;
    Ok(())
}

/// Applies an organization snapshot: data fields only when it is newer than the
/// stored one; plan and quotas follow the newest snapshot that names a configured
/// plan or none (an unknown name never downgrades a workspace, it keeps its plan;
/// a new workspace gets the default plan); a tombstoned workspace takes the data
/// but stays deleted.
async fn upsert_workspace(
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
        });
    };
    let newer = row.source_version.is_none_or(|v| org.updated_at > v);
    let plan_newer = unknown.is_none() && row.plan_version.is_none_or(|v| org.updated_at > v);
    if !newer && !plan_newer {
        return Ok(WorkspaceState {
            changed: false,
            deleted_at: row.deleted_at,
        });
    }
    let (plan, plan_version) = if plan_newer {
        (plan, Some(org.updated_at))
    } else {
        (row.plan.clone(), row.plan_version)
    };
    if newer {
        let clerk_created_at = ts(org.created_at);
        sqlx::query(
            "update workspaces set name = $2, slug = $3, image_url = $4, created_by = $5, \
               max_allowed_memberships = $6, plan = $7, source_version = $8, \
               clerk_created_at = $9, plan_version = $10, updated_at = now() \
             where id = $1",
        )
        .bind(&org.id)
        .bind(&org.name)
        .bind(&org.slug)
        .bind(&org.image_url)
        .bind(&org.created_by)
        .bind(org.max_allowed_memberships)
        .bind(&plan)
        .bind(org.updated_at)
        .bind(clerk_created_at)
        .bind(plan_version)
        .execute(&mut *conn)
        .await?;
        if let Some(given) = unknown {
            plan_unknown(cx, &org.id, given, &plan, "current plan kept");
        }
    } else {
        // Older data, but the newest snapshot naming a known plan (or none): only
        // the plan follows it.
        sqlx::query(
            "update workspaces set plan = $2, plan_version = $3, updated_at = now() where id = $1",
        )
        .bind(&org.id)
        .bind(&plan)
        .bind(plan_version)
        .execute(&mut *conn)
        .await?;
    }
    if row.plan != plan {
        let (names, values) = cx.plans.quotas(&plan);
        // Two disjoint sets of rows (names leaving, names staying or arriving), so
        // one statement may touch both.
        sqlx::query(
            "with d as ( \
               delete from workspace_quotas \
               where workspace_id = $1 and not (name = any($2::text[]))) \
             insert into workspace_quotas (workspace_id, name, limit_value) \
             select $1, n, v from unnest($2::text[], $3::bigint[]) as t(n, v) \
             on conflict (workspace_id, name) do update set limit_value = excluded.limit_value",
        )
        .bind(&org.id)
        .bind(names)
        .bind(values)
        .execute(&mut *conn)
        .await?;
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
    })
}

/// Records that a snapshot named a plan that is not configured: a warning with the
/// workspace id and a `workspace.plan_unknown` audit row naming it.
fn plan_unknown(cx: &mut Ctx<'_>, workspace_id: &str, given: &str, plan: &str, outcome: &str) {
    tracing::warn!(
        workspace.id = %workspace_id,
        plan.requested = %given,
        plan.current = %plan,
        svix.id = %cx.incoming.svix_id,
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
/// its memberships. The first delete's time is kept.
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
        Some(row) if row.status == "deleted" => {}
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

/// Whose active memberships end, and so the reason recorded on them.
#[derive(Debug, Clone, Copy)]
enum Ending<'a> {
    /// Every membership of this workspace (`workspace_deleted`).
    Workspace(&'a str),
    /// Every membership of this user (`user_deleted`).
    User(&'a str),
}

/// Ends the active memberships `of` at `at`, with a `member.removed` audit row in
/// each membership's workspace; true when any ended.
async fn end_memberships(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    of: Ending<'_>,
    at: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    // One static statement per case, so each keeps its own index-friendly plan.
    let (sql, id, reason) = match of {
        Ending::Workspace(id) => (
            "update members set removed_at = $2, removal_reason = $3, updated_at = now() \
             where workspace_id = $1 and removed_at is null \
             returning membership_id, workspace_id, user_id",
            id,
            "workspace_deleted",
        ),
        Ending::User(id) => (
            "update members set removed_at = $2, removal_reason = $3, updated_at = now() \
             where user_id = $1 and removed_at is null \
             returning membership_id, workspace_id, user_id",
            id,
            "user_deleted",
        ),
    };
    let ended: Vec<(String, String, String)> = sqlx::query_as(sql)
        .bind(id)
        .bind(at)
        .bind(reason)
        .fetch_all(&mut *conn)
        .await?;
    let any = !ended.is_empty();
    for (membership_id, workspace_id, user_id) in ended {
        cx.audit(
            &workspace_id,
            "member.removed",
            Some(&user_id),
            json!({ "membership_id": membership_id, "reason": reason }),
        );
    }
    Ok(any)
}

// ---- members -----------------------------------------------------------------------

/// Display fields of a member, with the version of their source.
#[derive(Debug, Clone, PartialEq)]
struct Display {
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    image_url: Option<String>,
}

impl Display {
    fn json(&self) -> Value {
        json!({
            "email": self.email, "first_name": self.first_name,
            "last_name": self.last_name, "image_url": self.image_url,
        })
    }
}

/// `organizationMembership.created/updated` (`deleted_at_ms` None) and
/// `organizationMembership.deleted` (`deleted_at_ms` = envelope timestamp).
async fn upsert_membership(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    m: &Membership,
    deleted_at_ms: Option<i64>,
    st: &Begin,
) -> Result<bool, sqlx::Error> {
    let ws = upsert_workspace(conn, cx, &m.organization, st.workspace()).await?;
    let mut changed = ws.changed;
    let ws_id = m.organization.id.as_str();
    let user_id = m.user.user_id.as_str();
    let role = cx.settings.role_for(&m.role).as_str();
    // Why this membership cannot be (or stay) active, and since when.
    let ended: Option<(DateTime<Utc>, &str)> = if let Some(at) = deleted_at_ms {
        Some((ts(at), "membership_deleted"))
    } else if let Some(at) = ws.deleted_at {
        Some((at, "workspace_deleted"))
    } else {
        st.u_deleted_at.map(|at| (at, "user_deleted"))
    };
    let snapshot = Display {
        email: m.user.identifier.clone(),
        first_name: m.user.first_name.clone(),
        last_name: m.user.last_name.clone(),
        image_url: m.user.image_url.clone(),
    };

    if !st.m_exists {
        // Display fields from whichever source is newer: this snapshot or the user's
        // own record from user.updated.
        let (display, profile_version) = match st.u_source_version {
            Some(uv) if uv > m.updated_at => (
                Display {
                    email: st.u_email.clone(),
                    first_name: st.u_first_name.clone(),
                    last_name: st.u_last_name.clone(),
                    image_url: st.u_image_url.clone(),
                },
                uv,
            ),
            _ => (snapshot, m.updated_at),
        };
        sqlx::query(
            "insert into members (membership_id, workspace_id, user_id, role, clerk_role, \
               email, first_name, last_name, image_url, source_version, profile_version, \
               joined_at, removed_at, removal_reason) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&m.id)
        .bind(ws_id)
        .bind(user_id)
        .bind(role)
        .bind(&m.role)
        .bind(&display.email)
        .bind(&display.first_name)
        .bind(&display.last_name)
        .bind(&display.image_url)
        .bind(m.updated_at)
        .bind(profile_version)
        .bind(ts(m.created_at))
        .bind(ended.map(|e| e.0))
        .bind(ended.map(|e| e.1))
        .execute(&mut *conn)
        .await?;
        // A membership stored as already ended was never a member here: no audit.
        if ended.is_none() {
            let mut details = json!({
                "membership_id": m.id, "role": role, "clerk_role": m.role,
            });
            details["after"] = display.json();
            cx.audit(ws_id, "member.added", Some(user_id), details);
        }
        return Ok(true);
    }
    if st.m_removed {
        // Tombstone of this membership id: final.
        return Ok(changed);
    }
    if let Some((at, reason)) = ended {
        sqlx::query(
            "update members set removed_at = $2, removal_reason = $3, updated_at = now() \
             where membership_id = $1",
        )
        .bind(&m.id)
        .bind(at)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
        cx.audit(
            ws_id,
            "member.removed",
            Some(user_id),
            json!({ "membership_id": m.id, "reason": reason }),
        );
        return Ok(true);
    }
    let source_version = st.m_source_version.unwrap_or(i64::MIN);
    if m.updated_at <= source_version {
        return Ok(changed);
    }
    let profile_version = st.m_profile_version.unwrap_or(i64::MIN);
    let before = Display {
        email: st.m_email.clone(),
        first_name: st.m_first_name.clone(),
        last_name: st.m_last_name.clone(),
        image_url: st.m_image_url.clone(),
    };
    let (display, new_profile_version) = if m.updated_at > profile_version {
        (snapshot, m.updated_at)
    } else {
        (before.clone(), profile_version)
    };
    sqlx::query(
        "update members set role = $2, clerk_role = $3, email = $4, first_name = $5, \
           last_name = $6, image_url = $7, source_version = $8, profile_version = $9, \
           joined_at = $10, updated_at = now() \
         where membership_id = $1",
    )
    .bind(&m.id)
    .bind(role)
    .bind(&m.role)
    .bind(&display.email)
    .bind(&display.first_name)
    .bind(&display.last_name)
    .bind(&display.image_url)
    .bind(m.updated_at)
    .bind(new_profile_version)
    .bind(ts(m.created_at))
    .execute(&mut *conn)
    .await?;
    changed = true;
    let old_role = st.m_role.as_deref().unwrap_or_default();
    let old_clerk_role = st.m_clerk_role.as_deref().unwrap_or_default();
    if old_role != role || old_clerk_role != m.role {
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
    if display != before {
        cx.audit(
            ws_id,
            "member.updated",
            Some(user_id),
            json!({ "membership_id": m.id, "before": before.json(), "after": display.json() }),
        );
    }
    Ok(changed)
}

/// `organizationMembership.deleted` without a complete membership snapshot: end
/// the membership from its ids alone, leaving every other stored field as it is.
/// An unknown membership of a known workspace and user is stored as a tombstone,
/// so its late `created` cannot grant the access Clerk already took away.
async fn remove_membership(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    r: &Removal,
    at_ms: i64,
    st: &Begin,
) -> Result<bool, sqlx::Error> {
    let at = ts(at_ms);
    let reason = "membership_deleted";
    if st.m_exists {
        if st.m_removed {
            // Tombstone of this membership id: final.
            return Ok(false);
        }
        let workspace_id: String = sqlx::query_scalar(
            "update members set removed_at = $2, removal_reason = $3, updated_at = now() \
             where membership_id = $1 \
             returning workspace_id",
        )
        .bind(&r.id)
        .bind(at)
        .bind(reason)
        .fetch_one(&mut *conn)
        .await?;
        cx.audit(
            &workspace_id,
            "member.removed",
            st.m_user_id.as_deref(),
            json!({ "membership_id": r.id, "reason": reason }),
        );
        return Ok(true);
    }
    // Without the workspace row or the user id there is nothing a tombstone could
    // hang on; the membership was never stored here, so no access to take away.
    let (true, Some(user_id)) = (st.w_exists, r.user_id.as_deref()) else {
        return Ok(true);
    };
    // Never a member here: no audit row, like a full removal of an unknown membership.
    sqlx::query(
        "insert into members (membership_id, workspace_id, user_id, role, clerk_role, \
           source_version, profile_version, joined_at, removed_at, removal_reason) \
         values ($1, $2, $3, 'member', '', $4, $4, $5, $5, $6) \
         on conflict (membership_id) do nothing",
    )
    .bind(&r.id)
    .bind(&r.organization_id)
    .bind(user_id)
    .bind(at_ms)
    .bind(at)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

// ---- users -------------------------------------------------------------------------

/// `user.updated`: keep the newest user snapshot and refresh the display fields of
/// every active membership whose fields come from an older source.
async fn update_user(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    u: &User,
) -> Result<bool, sqlx::Error> {
    let stored: Option<i32> = sqlx::query_scalar(
        "insert into users (id, email, first_name, last_name, image_url, source_version) \
         values ($1, $2, $3, $4, $5, $6) \
         on conflict (id) do update set email = excluded.email, \
           first_name = excluded.first_name, last_name = excluded.last_name, \
           image_url = excluded.image_url, source_version = excluded.source_version, \
           updated_at = now() \
         where users.source_version is null or users.source_version < excluded.source_version \
         returning 1",
    )
    .bind(&u.id)
    .bind(&u.email)
    .bind(&u.first_name)
    .bind(&u.last_name)
    .bind(&u.image_url)
    .bind(u.updated_at)
    .fetch_optional(&mut *conn)
    .await?;
    if stored.is_none() {
        // Every member row already carries a source at least this new.
        return Ok(false);
    }
    type Refreshed = (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let refreshed: Vec<Refreshed> = sqlx::query_as(
        "update members m set email = $2, first_name = $3, last_name = $4, image_url = $5, \
           profile_version = $6, updated_at = now() \
         from members o \
         where o.membership_id = m.membership_id and m.user_id = $1 \
           and m.removed_at is null and m.profile_version < $6 \
         returning m.membership_id, m.workspace_id, o.email, o.first_name, o.last_name, o.image_url",
    )
    .bind(&u.id)
    .bind(&u.email)
    .bind(&u.first_name)
    .bind(&u.last_name)
    .bind(&u.image_url)
    .bind(u.updated_at)
    .fetch_all(&mut *conn)
    .await?;
    let after = Display {
        email: u.email.clone(),
        first_name: u.first_name.clone(),
        last_name: u.last_name.clone(),
        image_url: u.image_url.clone(),
    };
    for (membership_id, workspace_id, email, first_name, last_name, image_url) in refreshed {
        let before = Display {
            email,
            first_name,
            last_name,
            image_url,
        };
        if before != after {
            cx.audit(
                &workspace_id,
                "member.updated",
                Some(&u.id),
                json!({ "membership_id": membership_id, "before": before.json(), "after": after.json() }),
            );
        }
    }
    Ok(true)
}

/// `user.deleted`: tombstone the user (first delete's time kept) and end every
/// membership of theirs.
async fn delete_user(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    id: &str,
    at_ms: i64,
) -> Result<bool, sqlx::Error> {
    let at = ts(at_ms);
    let tombstoned: Option<i32> = sqlx::query_scalar(
        "insert into users (id, deleted_at) values ($1, $2) \
         on conflict (id) do update set deleted_at = excluded.deleted_at, updated_at = now() \
         where users.deleted_at is null \
         returning 1",
    )
    .bind(id)
    .bind(at)
    .fetch_optional(&mut *conn)
    .await?;
    let ended = end_memberships(conn, cx, Ending::User(id), at).await?;
    Ok(tombstoned.is_some() || ended)
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
    .execute(&mut *conn)
    .await?;
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
