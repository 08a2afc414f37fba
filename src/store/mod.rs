//! The read side's SQL over the schema the worker writes: what the read API
//! serves, as the records of [`model`]. Nothing here knows HTTP.
//!
//! Guarantee: "active member" means one thing everywhere — the SQL view
//! `active_members` (migrations, docs/schema.md): a user's standing in a workspace
//! is their newest membership row there, removed rows included, and they are an
//! active member when that row is not removed and the workspace is `active`. So a
//! stale row whose deletion is still on its way never speaks once a newer
//! membership of the user was removed, and every user counts and appears once.
//! Every membership read below goes through that view and nothing else.
//! Onboarding writes and their audit row commit together.

pub mod events;
pub mod model;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use model::{
    AuditEntry, Event, Member, Onboarding, OnboardingStep, Role, StepStatus, StepTarget,
    UnknownValue, UserWorkspace, Workspace, WorkspaceStatus,
};

/// A failed read or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL failed or is unreachable.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A stored value the API cannot represent.
    #[error(transparent)]
    Unknown(#[from] UnknownValue),
}

/// How a caller may see one workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The workspace's status.
    pub status: WorkspaceStatus,
    /// The acting user's role there, when they are an active member.
    pub role: Option<Role>,
}

/// The acting user's role among the active members (`w` the workspace, `$2` the
/// user); a scalar subquery so it can ride along in any statement about the
/// workspace. A macro so the statements stay `&'static str` (no per-request
/// formatting, and sqlx caches them as prepared statements).
macro_rules! acting_role {
    () => {
        "(select a.role from active_members a where a.workspace_id = w.id and a.user_id = $2)"
    };
}

/// The workspace's status and the acting user's role there (`None` when no such
/// workspace). `acting_user` `None` skips the membership lookup.
pub async fn access(
    db: &PgPool,
    workspace_id: &str,
    acting_user: Option<&str>,
) -> Result<Option<Access>, StoreError> {
    let row: Option<(String, Option<String>)> = sqlx::query_as(concat!(
        "select w.status, ",
        acting_role!(),
        " from workspaces w where w.id = $1"
    ))
    .bind(workspace_id)
    .bind(acting_user)
    .fetch_optional(db)
    .await?;
    row.map(access_of).transpose()
}

fn access_of((status, role): (String, Option<String>)) -> Result<Access, StoreError> {
    Ok(Access {
        status: WorkspaceStatus::parse(&status)?,
        role: role.as_deref().map(Role::parse).transpose()?,
    })
}

#[derive(sqlx::FromRow)]
struct WorkspaceReadRow {
    id: String,
    name: Option<String>,
    slug: Option<String>,
    image_url: Option<String>,
    status: String,
    plan: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    deleted_at: Option<DateTime<Utc>>,
    quotas: Json<BTreeMap<String, i64>>,
    steps: Json<Vec<StepJson>>,
    member_count: i64,
    admin_count: i64,
    acting_role: Option<String>,
}

#[derive(serde::Deserialize)]
struct StepJson {
    name: String,
    required: bool,
    status: String,
}

/// One workspace with its quotas, onboarding and member counts, and the acting
/// user's access — one round trip, since this is the main app's hottest read.
pub async fn workspace(
    db: &PgPool,
    workspace_id: &str,
    acting_user: Option<&str>,
) -> Result<Option<(Workspace, Access)>, StoreError> {
    let row: Option<WorkspaceReadRow> = sqlx::query_as(concat!(
        "select w.id, w.name, w.slug, w.image_url, w.status, w.plan, \
                coalesce(w.clerk_created_at, w.created_at) as created_at, \
                w.updated_at, w.deleted_at, \
                coalesce((select jsonb_object_agg(q.name, q.limit_value) \
                          from workspace_quotas q where q.workspace_id = w.id), \
                         '{}'::jsonb) as quotas, \
                coalesce((select jsonb_agg(jsonb_build_object( \
                              'name', s.name, 'required', s.required, 'status', s.status) \
                              order by s.position, s.name) \
                          from onboarding_steps s where s.workspace_id = w.id), \
                         '[]'::jsonb) as steps, \
                c.member_count, c.admin_count, ",
        acting_role!(),
        " as acting_role \
         from workspaces w \
         cross join lateral ( \
             select count(*) as member_count, \
                    count(*) filter (where a.role = 'admin') as admin_count \
             from active_members a where a.workspace_id = w.id \
         ) c \
         where w.id = $1"
    ))
    .bind(workspace_id)
    .bind(acting_user)
    .fetch_optional(db)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let access = access_of((row.status.clone(), row.acting_role))?;
    let steps = row
        .steps
        .0
        .into_iter()
        .map(|s| {
            Ok(OnboardingStep {
                status: StepStatus::parse(&s.status)?,
                name: s.name,
                required: s.required,
            })
        })
        .collect::<Result<Vec<_>, UnknownValue>>()?;
    let workspace = Workspace {
        id: row.id,
        name: row.name,
        slug: row.slug,
        image_url: row.image_url,
        status: access.status,
        plan: row.plan,
        quotas: row.quotas.0,
        onboarding: Onboarding::from_steps(steps),
        member_count: row.member_count,
        admin_count: row.admin_count,
        created_at: row.created_at,
        updated_at: row.updated_at,
        deleted_at: row.deleted_at,
    };
    Ok(Some((workspace, access)))
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    user_id: String,
    role: String,
    clerk_role: String,
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    joined_at: DateTime<Utc>,
}

impl TryFrom<MemberRow> for Member {
    type Error = UnknownValue;

    fn try_from(r: MemberRow) -> Result<Self, UnknownValue> {
        Ok(Member {
            role: Role::parse(&r.role)?,
            user_id: r.user_id,
            clerk_role: r.clerk_role,
            email: r.email,
            first_name: r.first_name,
            last_name: r.last_name,
            joined_at: r.joined_at,
        })
    }
}

/// Which rows of a list to read: at most `limit`, with keys greater than `after`.
#[derive(Debug, Clone, Copy)]
pub struct Keyset<'a> {
    /// Rows with a key greater than this (the last key of the previous page).
    pub after: Option<&'a str>,
    /// Most rows to return.
    pub limit: i64,
}

/// Active members of a workspace, one per user, by user id; `user_id` narrows it
/// to one user.
pub async fn members(
    db: &PgPool,
    workspace_id: &str,
    user_id: Option<&str>,
    keyset: Keyset<'_>,
) -> Result<Vec<Member>, StoreError> {
    let rows: Vec<MemberRow> = sqlx::query_as(
        "select user_id, role, clerk_role, email, first_name, last_name, joined_at \
         from active_members a \
         where a.workspace_id = $1 and ($2::text is null or a.user_id = $2) \
           and ($3::text is null or a.user_id > $3) \
         order by user_id limit $4",
    )
    .bind(workspace_id)
    .bind(user_id)
    .bind(keyset.after)
    .bind(keyset.limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(Member::try_from)
        .collect::<Result<_, _>>()?)
}

/// A user's active memberships in active workspaces, by workspace id.
pub async fn user_workspaces(
    db: &PgPool,
    user_id: &str,
    keyset: Keyset<'_>,
) -> Result<Vec<UserWorkspace>, StoreError> {
    let rows: Vec<(String, Option<String>, Option<String>, String)> = sqlx::query_as(
        "select a.workspace_id, w.name, w.slug, a.role \
         from active_members a join workspaces w on w.id = a.workspace_id \
         where a.user_id = $1 and ($2::text is null or a.workspace_id > $2) \
         order by a.workspace_id limit $3",
    )
    .bind(user_id)
    .bind(keyset.after)
    .bind(keyset.limit)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(workspace_id, name, slug, role)| {
            Ok(UserWorkspace {
                workspace_id,
                name,
                slug,
                role: Role::parse(&role)?,
            })
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    at: DateTime<Utc>,
    action: String,
    actor: String,
    subject: Option<String>,
    details: Json<serde_json::Value>,
    event_id: Option<String>,
}

/// Up to `limit` audit rows of a workspace older than audit id `before`, newest
/// first, each with its audit id (the cursor key).
pub async fn audit(
    db: &PgPool,
    workspace_id: &str,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<(i64, AuditEntry)>, StoreError> {
    // Keyset on the primary key: rows inserted while a client pages have higher
    // ids, so they never shift or repeat the pages after the first.
    let rows: Vec<AuditRow> = sqlx::query_as(
        "select id, at, action, actor, subject, details, event_id \
         from audit_log \
         where workspace_id = $1 and ($2::bigint is null or id < $2) \
         order by id desc limit $3",
    )
    .bind(workspace_id)
    .bind(before)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.id,
                AuditEntry {
                    at: r.at,
                    action: r.action,
                    actor: r.actor,
                    subject: r.subject,
                    details: r.details.0,
                    event_id: r.event_id,
                },
            )
        })
        .collect())
}

/// The processing-log row of a svix id, as the read API serves it.
pub async fn event(db: &PgPool, svix_id: &str) -> Result<Option<Event>, StoreError> {
    Ok(events::find(db, svix_id).await?.map(Event::from))
}

/// A step as locked for an onboarding write.
#[derive(Debug, Clone)]
pub struct LockedStep {
    /// Whether it may be skipped.
    pub required: bool,
    /// Its current state.
    pub status: StepStatus,
}

/// An open onboarding write: the workspace is share-locked (it cannot be deleted
/// until this commits) and the step row is locked against concurrent writes.
#[derive(Debug)]
pub struct OnboardingWrite {
    tx: Transaction<'static, Postgres>,
    workspace_id: String,
    step: String,
}

impl OnboardingWrite {
    /// Begins: locks the workspace and reads the acting user's access.
    pub async fn begin(
        db: &PgPool,
        workspace_id: &str,
        step: &str,
        acting_user: Option<&str>,
    ) -> Result<(Self, Option<Access>), StoreError> {
        let mut tx = db.begin().await?;
        let row: Option<(String, Option<String>)> = sqlx::query_as(concat!(
            "select w.status, ",
            acting_role!(),
            " from workspaces w where w.id = $1 for share of w"
        ))
        .bind(workspace_id)
        .bind(acting_user)
        .fetch_optional(&mut *tx)
        .await?;
        let access = row.map(access_of).transpose()?;
        Ok((
            Self {
                tx,
                workspace_id: workspace_id.to_owned(),
                step: step.to_owned(),
            },
            access,
        ))
    }

    /// Locks and reads the step; `None` when the workspace has no such step.
    pub async fn step(&mut self) -> Result<Option<LockedStep>, StoreError> {
        let row: Option<(bool, String)> = sqlx::query_as(
            "select required, status from onboarding_steps \
             where workspace_id = $1 and name = $2 for update",
        )
        .bind(&self.workspace_id)
        .bind(&self.step)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|(required, status)| {
            Ok(LockedStep {
                required,
                status: StepStatus::parse(&status)?,
            })
        })
        .transpose()
    }

    /// Sets the step and writes its audit row (actor `api`).
    pub async fn set(
        &mut self,
        from: StepStatus,
        to: StepTarget,
        acting_user: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "update onboarding_steps set status = $3, updated_at = now() \
             where workspace_id = $1 and name = $2",
        )
        .bind(&self.workspace_id)
        .bind(&self.step)
        .bind(to.as_str())
        .execute(&mut *self.tx)
        .await?;
        let details = serde_json::json!({
            "from": from.as_str(),
            "to": to.as_str(),
            "acting_user": acting_user,
        });
        sqlx::query(
            "insert into audit_log (workspace_id, action, actor, subject, details) \
             values ($1, 'onboarding.step_updated', 'api', $2, $3)",
        )
        .bind(&self.workspace_id)
        .bind(&self.step)
        .bind(Json(details))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Reads the onboarding as this write leaves it, then commits.
    pub async fn commit(mut self) -> Result<Onboarding, StoreError> {
        let rows: Vec<(String, bool, String)> = sqlx::query_as(
            "select name, required, status from onboarding_steps \
             where workspace_id = $1 order by position, name",
        )
        .bind(&self.workspace_id)
        .fetch_all(&mut *self.tx)
        .await?;
        let steps = rows
            .into_iter()
            .map(|(name, required, status)| {
                Ok(OnboardingStep {
                    name,
                    required,
                    status: StepStatus::parse(&status)?,
                })
            })
            .collect::<Result<Vec<_>, UnknownValue>>()?;
        self.tx.commit().await?;
        Ok(Onboarding::from_steps(steps))
    }
}
