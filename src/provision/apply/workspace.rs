//! Workspaces: the effect of organization snapshots and deletions, and the refresh
//! of a workspace's quotas after its plan's limits changed (DESIGN §5).
//!
//! Guarantee: run under the workspace's advisory lock inside the caller's
//! transaction, a workspace's data and its plan each follow their standing
//! snapshot ([`Source::beats`]), its quotas follow its plan, its deletion keeps
//! the earliest time, and a tombstone is final.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgConnection;

use super::audit::Ctx;
use super::inferred::restore_workspace;
use super::locks::{lock, ws_key};
use super::membership::{Ending, end_memberships};
use super::plans::Plans;
use super::rules::{Source, ts};
use super::state::{WorkspaceRow, WorkspaceState};
use crate::provision::payload::Organization;

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
pub(super) async fn delete_workspace(
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
