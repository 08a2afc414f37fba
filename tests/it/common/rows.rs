//! Readers of the rows provisioning writes (workspaces, quotas, onboarding steps,
//! members, audit log, processing log), for tests that check them.

use sqlx::PgPool;

/// A workspace row's provisioned fields.
#[derive(Debug, PartialEq, sqlx::FromRow)]
pub struct Workspace {
    /// Organization name.
    pub name: Option<String>,
    /// Organization slug.
    pub slug: Option<String>,
    /// `active` or `deleted`.
    pub status: String,
    /// Plan name.
    pub plan: String,
    /// Version of the organization snapshot applied.
    pub source_version: Option<i64>,
}

/// The workspace `id`, if provisioned.
pub async fn workspace(db: &PgPool, id: &str) -> Option<Workspace> {
    sqlx::query_as("select name, slug, status, plan, source_version from workspaces where id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
        .unwrap()
}

/// (name, limit) of every quota of a workspace, by name.
pub async fn quotas(db: &PgPool, id: &str) -> Vec<(String, i64)> {
    sqlx::query_as(
        "select name, limit_value from workspace_quotas where workspace_id = $1 order by name",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .unwrap()
}

/// (name, position, required, status) of every onboarding step of a workspace, in order.
pub async fn onboarding_steps(db: &PgPool, id: &str) -> Vec<(String, i16, bool, String)> {
    sqlx::query_as(
        "select name, position, required, status from onboarding_steps \
         where workspace_id = $1 order by position",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .unwrap()
}

/// (status, error, attempts) of an event's processing-log row.
pub async fn event_status(db: &PgPool, svix_id: &str) -> Option<(String, Option<String>, i32)> {
    sqlx::query_as("select status, error, attempts from events where svix_id = $1")
        .bind(svix_id)
        .fetch_optional(db)
        .await
        .unwrap()
}

/// A member row.
#[derive(Debug, PartialEq, sqlx::FromRow)]
pub struct Member {
    /// Clerk membership id.
    pub membership_id: String,
    /// Workspace (organization) id.
    pub workspace_id: String,
    /// Clerk user id.
    pub user_id: String,
    /// `admin` or `member`.
    pub role: String,
    /// The Clerk role key it came from.
    pub clerk_role: String,
    /// Email.
    pub email: Option<String>,
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: Option<String>,
    /// Whether the membership ended.
    pub removed: bool,
    /// Why it ended.
    pub removal_reason: Option<String>,
}

/// The member row of a membership.
pub async fn member(db: &PgPool, membership_id: &str) -> Option<Member> {
    sqlx::query_as(
        "select membership_id, workspace_id, user_id, role, clerk_role, email, first_name, \
           last_name, removed_at is not null as removed, removal_reason \
         from members where membership_id = $1",
    )
    .bind(membership_id)
    .fetch_optional(db)
    .await
    .unwrap()
}

/// One audit row: (action, actor, subject, event_id).
pub type AuditRow = (String, String, Option<String>, Option<String>);

/// Every audit row of a workspace, oldest first.
pub async fn audit(db: &PgPool, workspace_id: &str) -> Vec<AuditRow> {
    sqlx::query_as(
        "select action, actor, subject, event_id from audit_log where workspace_id = $1 order by id",
    )
    .bind(workspace_id)
    .fetch_all(db)
    .await
    .unwrap()
}

/// The actions of a workspace's audit rows, oldest first.
pub async fn audit_actions(db: &PgPool, workspace_id: &str) -> Vec<String> {
    audit(db, workspace_id)
        .await
        .into_iter()
        .map(|a| a.0)
        .collect()
}

/// The `details` of a workspace's audit rows other than `workspace.provisioned`, oldest first.
pub async fn audit_details(db: &PgPool, workspace_id: &str) -> Vec<serde_json::Value> {
    sqlx::query_scalar(
        "select details from audit_log where workspace_id = $1 \
         and action <> 'workspace.provisioned' order by id",
    )
    .bind(workspace_id)
    .fetch_all(db)
    .await
    .unwrap()
}

/// Audit rows of every workspace.
pub async fn audit_count(db: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from audit_log")
        .fetch_one(db)
        .await
        .unwrap()
}

/// Every provisioned row of the database (workspaces, quotas, onboarding steps,
/// members, users, removal records, kept user snapshots, billing), keyed by table and primary key, as JSON of all its columns but
/// the times this service wrote the row (`created_at`, `updated_at`): what must be
/// equal after any two deliveries of one history.
pub async fn state_rows(db: &PgPool) -> std::collections::BTreeMap<String, serde_json::Value> {
    let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "select 'workspaces/' || id, to_jsonb(t) - 'created_at' - 'updated_at' from workspaces t \
         union all \
         select 'workspace_quotas/' || workspace_id || '/' || name, to_jsonb(t) \
           from workspace_quotas t \
         union all \
         select 'onboarding_steps/' || workspace_id || '/' || name, to_jsonb(t) - 'updated_at' \
           from onboarding_steps t \
         union all \
         select 'members/' || membership_id, to_jsonb(t) - 'created_at' - 'updated_at' \
           from members t \
         union all \
         select 'users/' || id, to_jsonb(t) - 'updated_at' from users t \
         union all \
         select 'membership_removals/' || membership_id, to_jsonb(t) \
           from membership_removals t \
         union all \
         select 'user_profiles/' || user_id || '/' || version || '/' || svix_id, to_jsonb(t) \
           from user_profiles t \
         union all \
         select 'billing_subscriptions/' || id, to_jsonb(t) - 'updated_at' \
           from billing_subscriptions t \
         union all \
         select 'billing_items/' || id, to_jsonb(t) - 'updated_at' from billing_items t",
    )
    .fetch_all(db)
    .await
    .unwrap();
    rows.into_iter().collect()
}
