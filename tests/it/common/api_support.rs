//! Test data and requests for the read-API tests.
//!
//! Rows are written with SQL straight into the worker's schema, shaped as the
//! worker writes them (a tombstoned workspace ends its memberships, and so on), so
//! the API is tested on its own; [`raw_request`] sends a path byte for byte, because
//! HTTP clients normalise `..`, `%2e%2e` and friends before they reach the server.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use provisioner::config::ProvisioningSettings;
use reqwest::Method;
use serde_json::Value;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{TOKEN, TestApp, random_id};

/// A fixed instant for `joined_at` and the like: 2024-05-28T08:00:00Z.
pub fn t0() -> DateTime<Utc> {
    "2024-05-28T08:00:00Z".parse().unwrap()
}

/// Versions that only grow, so "newest row wins" is decided by call order.
fn next_version() -> i64 {
    static V: AtomicI64 = AtomicI64::new(1_700_000_000_000);
    V.fetch_add(1, Ordering::SeqCst)
}

/// A unique id with a prefix (`org_…`, `user_…`, `msg_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_id(16))
}

/// Writes rows into a test app's database.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The app's pool.
    pub db: PgPool,
    provisioning: ProvisioningSettings,
}

impl Seed {
    /// Seeds the database of `app`, with its plans and onboarding steps.
    pub fn new(app: &TestApp) -> Self {
        Self {
            db: app.db.clone(),
            provisioning: app.settings.provisioning.clone(),
        }
    }

    /// An active workspace on the default plan, with its quotas and pending
    /// onboarding steps; named `Workspace <id>`, slug = id.
    pub async fn workspace(&self, id: &str) {
        let plan = self.provisioning.default_plan.clone();
        self.workspace_with(id, &format!("Workspace {id}"), &plan)
            .await;
    }

    /// An active workspace with this name and plan.
    pub async fn workspace_with(&self, id: &str, name: &str, plan: &str) {
        sqlx::query(
            "insert into workspaces (id, name, slug, image_url, status, plan, source_version, \
                                     clerk_created_at, created_at, updated_at) \
             values ($1, $2, $1, 'https://img.clerk.com/' || $1, 'active', $3, $4, $5, \
                     now(), now())",
        )
        .bind(id)
        .bind(name)
        .bind(plan)
        .bind(next_version())
        .bind(t0())
        .execute(&self.db)
        .await
        .unwrap();
        for (quota, limit) in &self.provisioning.plans[plan] {
            sqlx::query(
                "insert into workspace_quotas (workspace_id, name, limit_value) values ($1, $2, $3)",
            )
            .bind(id)
            .bind(quota)
            .bind(limit)
            .execute(&self.db)
            .await
            .unwrap();
        }
        for (position, step) in self.provisioning.onboarding_steps.iter().enumerate() {
            sqlx::query(
                "insert into onboarding_steps (workspace_id, name, position, required) \
                 values ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(&step.name)
            .bind(position as i16)
            .bind(step.required)
            .execute(&self.db)
            .await
            .unwrap();
        }
        self.audit(id, "workspace.provisioned", Some(id)).await;
    }

    /// An active membership (`org:admin` or `org:member`); returns its membership id.
    /// Its version is newer than every row seeded before it.
    pub async fn member(&self, workspace: &str, user: &str, clerk_role: &str) -> String {
        let membership = new_id("orgmem");
        let role = self.provisioning.role_for(clerk_role).as_str();
        let version = next_version();
        sqlx::query(
            "insert into members (membership_id, workspace_id, user_id, role, clerk_role, \
                                  email, first_name, last_name, source_version, \
                                  profile_version, joined_at) \
             values ($1, $2, $3, $4, $5, $6, 'First ' || $3, 'Last', $7, $7, $8)",
        )
        .bind(&membership)
        .bind(workspace)
        .bind(user)
        .bind(role)
        .bind(clerk_role)
        .bind(format!("{user}@example.com"))
        .bind(version)
        .bind(t0() + chrono::Duration::seconds(version % 1_000_000))
        .execute(&self.db)
        .await
        .unwrap();
        membership
    }

    /// Ends a membership (organizationMembership.deleted).
    pub async fn remove_membership(&self, membership_id: &str) {
        sqlx::query(
            "update members set removed_at = now(), removal_reason = 'membership_deleted' \
             where membership_id = $1",
        )
        .bind(membership_id)
        .execute(&self.db)
        .await
        .unwrap();
    }

    /// Tombstones a workspace as organization.deleted does: status, deleted_at, and
    /// every membership ended. `end_memberships = false` leaves them as a worker
    /// mid-way would (the API must hide them anyway).
    pub async fn delete_workspace(&self, id: &str, end_memberships: bool) {
        sqlx::query(
            "update workspaces set status = 'deleted', deleted_at = $2, deleted_version = $3, \
                                   updated_at = now() \
             where id = $1",
        )
        .bind(id)
        .bind(t0() + chrono::Duration::days(1))
        .bind(next_version())
        .execute(&self.db)
        .await
        .unwrap();
        if end_memberships {
            sqlx::query(
                "update members set removed_at = now(), removal_reason = 'workspace_deleted' \
                 where workspace_id = $1 and removed_at is null",
            )
            .bind(id)
            .execute(&self.db)
            .await
            .unwrap();
        }
        self.audit(id, "workspace.deleted", Some(id)).await;
    }

    /// One audit row by Clerk; returns its id.
    pub async fn audit(&self, workspace: &str, action: &str, subject: Option<&str>) -> i64 {
        sqlx::query_scalar(
            "insert into audit_log (workspace_id, action, actor, subject, details, event_id) \
             values ($1, $2, 'clerk', $3, '{\"seeded\": true}', $4) \
             returning id",
        )
        .bind(workspace)
        .bind(action)
        .bind(subject)
        .bind(new_id("msg"))
        .fetch_one(&self.db)
        .await
        .unwrap()
    }

    /// A processing-log row.
    pub async fn event(
        &self,
        svix_id: &str,
        kind: &str,
        workspace: Option<&str>,
        status: &str,
        error: Option<&str>,
    ) {
        sqlx::query(
            "insert into events (svix_id, type, workspace_id, status, error, attempts, \
                                 received_at, processed_at) \
             values ($1, $2, $3, $4, $5, 1, $6, $7)",
        )
        .bind(svix_id)
        .bind(kind)
        .bind(workspace)
        .bind(status)
        .bind(error)
        .bind(t0())
        .bind(t0() + chrono::Duration::milliseconds(1500))
        .execute(&self.db)
        .await
        .unwrap();
    }

    /// Audit rows of a workspace with this action, oldest first.
    pub async fn audit_rows(
        &self,
        workspace: &str,
        action: &str,
    ) -> Vec<(String, Option<String>, Value)> {
        sqlx::query_as::<_, (String, Option<String>, sqlx::types::Json<Value>)>(
            "select actor, subject, details from audit_log \
             where workspace_id = $1 and action = $2 order by id",
        )
        .bind(workspace)
        .bind(action)
        .fetch_all(&self.db)
        .await
        .unwrap()
        .into_iter()
        .map(|(a, s, d)| (a, s, d.0))
        .collect()
    }
}

/// A request to the read API: method, path, token, acting user, JSON body.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// HTTP method.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Bearer token; `None` sends no Authorization header.
    pub token: Option<&'a str>,
    /// `X-Acting-User`.
    pub acting: Option<&'a str>,
    /// Raw body.
    pub body: Option<Vec<u8>>,
}

impl<'a> Call<'a> {
    /// GET with the development token.
    pub fn get(path: impl Into<String>) -> Self {
        Self {
            method: Method::GET,
            path: path.into(),
            token: Some(TOKEN),
            acting: None,
            body: None,
        }
    }

    /// POST of a raw body with the development token.
    pub fn post(path: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Self {
            method: Method::POST,
            body: Some(body.into()),
            ..Self::get(path)
        }
    }

    /// As acting user.
    pub fn acting(mut self, user: &'a str) -> Self {
        self.acting = Some(user);
        self
    }

    /// With another token (`None`: no Authorization header).
    pub fn token(mut self, token: Option<&'a str>) -> Self {
        self.token = token;
        self
    }

    /// Sends it; returns status and JSON body (`Null` when empty or not JSON).
    pub async fn send(self, app: &TestApp) -> (u16, Value) {
        let mut req = app
            .client
            .request(self.method, format!("{}{}", app.address, self.path));
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        if let Some(u) = self.acting {
            req = req.header("x-acting-user", u);
        }
        if let Some(b) = self.body {
            req = req.header("content-type", "application/json").body(b);
        }
        let res = req.send().await.expect("request sent");
        let status = res.status().as_u16();
        let bytes = res.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

/// Sends `METHOD path` exactly as given (no normalisation) with the development
/// token and optional acting user; returns status and JSON body (`Null` if none).
pub async fn raw_request(
    app: &TestApp,
    method: &str,
    path: &str,
    acting: Option<&str>,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n"
    );
    if let Some(u) = acting {
        req.push_str(&format!("X-Acting-User: {u}\r\n"));
    }
    if method == "POST" {
        let body = r#"{"status":"completed"}"#;
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}
