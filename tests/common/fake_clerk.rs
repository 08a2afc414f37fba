//! A local fake of Clerk's Backend API (the one thing tests may fake: it is outside
//! our control and unreachable here). It serves the documented shapes of
//! `../shared/reference/clerk-backend-api.md`: `{"data", "total_count"}` pages
//! with `limit` (1–500, default 10), `offset` and `order_by` (`±created_at`),
//! `404 resource_not_found` for a missing organization, `401` for a wrong key, and
//! the `ClerkErrors` body on every error; the list filters reconcile relies on
//! (repeatable `user_id` on an organization's memberships, repeatable
//! `organization_id` on the organizations), and `GET /v1/instance`.
//!
//! Tests script faults (`fail_next`), read what was asked (`requests`), can stop
//! a request halfway (`gate`) and can change the world between two page fetches
//! (`before_page`), as Clerk's lists shift while they are paged by offset.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// A scripted answer served instead of the next real one.
#[derive(Debug, Clone)]
pub struct Scripted {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` seconds, if any.
    pub retry_after: Option<u64>,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Path, e.g. `/v1/organizations`.
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// `Clerk-API-Version` header.
    pub version: Option<String>,
    /// When it arrived.
    pub at: std::time::Instant,
}

struct Gate {
    path: String,
    reached: Option<oneshot::Sender<()>>,
    release: Option<oneshot::Receiver<()>>,
}

/// A change of the world the fake makes on its own, as Clerk would between two
/// page fetches of a scan.
#[derive(Debug, Clone)]
pub enum Change {
    /// The membership leaves Clerk.
    DeleteMembership(String),
    /// The organization is deleted, with its memberships.
    DeleteOrganization(String),
}

/// A [`Change`] made when a list request of `path` at `offset` arrives, before it
/// is answered.
struct PageHook {
    path: String,
    offset: i64,
    change: Option<Change>,
}

#[derive(Default)]
struct World {
    organizations: Vec<Value>,
    memberships: Vec<Value>,
    script: VecDeque<Scripted>,
    seen: Vec<Seen>,
    gates: Vec<Gate>,
    hidden: Vec<String>,
    unfindable: Vec<String>,
    hooks: Vec<PageHook>,
    /// `GET /v1/instance`'s id; `None` answers 404 (an API without it).
    instance: Option<String>,
}

impl World {
    fn apply(&mut self, change: Change) {
        match change {
            Change::DeleteMembership(id) => self.memberships.retain(|m| m["id"] != id.as_str()),
            Change::DeleteOrganization(id) => {
                self.organizations.retain(|o| o["id"] != id.as_str());
                self.memberships
                    .retain(|m| m["organization"]["id"] != id.as_str());
            }
        }
    }
}

/// The instance id the fake's key belongs to unless a test says otherwise.
pub const INSTANCE_ID: &str = "ins_fake_clerk";

#[derive(Clone)]
struct Shared {
    key: String,
    world: Arc<Mutex<World>>,
}

/// The running fake; stops when dropped.
#[derive(Clone)]
pub struct FakeClerk {
    /// Base URL to give as `CLERK_API_URL`.
    pub url: String,
    /// The secret key it accepts.
    pub key: String,
    world: Arc<Mutex<World>>,
    _stop: Arc<StopOnDrop>,
}

struct StopOnDrop(Option<mpsc::Sender<()>>, tokio::task::AbortHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.take();
        self.1.abort();
    }
}

impl FakeClerk {
    /// Starts a fake on a free local port that accepts `key`.
    pub async fn start(key: &str) -> Self {
        let world = Arc::new(Mutex::new(World {
            instance: Some(INSTANCE_ID.to_owned()),
            ..World::default()
        }));
        let shared = Shared {
            key: key.to_owned(),
            world: world.clone(),
        };
        let app = Router::new()
            .route("/v1/organizations", get(list_organizations))
            .route("/v1/organizations/{id}", get(get_organization))
            .route(
                "/v1/organizations/{id}/memberships",
                get(list_org_memberships),
            )
            .route("/v1/organization_memberships", get(list_memberships))
            .route("/v1/instance", get(get_instance))
            .fallback(|| async { error(404, "resource_not_found", "no such route") })
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    rx.recv().await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            key: key.to_owned(),
            world,
            _stop: Arc::new(StopOnDrop(Some(tx), task.abort_handle())),
        }
    }

    /// Adds or replaces an organization (by id).
    pub fn put_organization(&self, organization: Value) {
        let mut w = self.world.lock().unwrap();
        let id = organization["id"].clone();
        w.organizations.retain(|o| o["id"] != id);
        w.organizations.push(organization);
    }

    /// Deletes an organization and its memberships, as Clerk does.
    pub fn delete_organization(&self, id: &str) {
        let mut w = self.world.lock().unwrap();
        w.organizations.retain(|o| o["id"] != id);
        w.memberships.retain(|m| m["organization"]["id"] != id);
    }

    /// Adds or replaces a membership (by id).
    pub fn put_membership(&self, membership: Value) {
        let mut w = self.world.lock().unwrap();
        let id = membership["id"].clone();
        w.memberships.retain(|m| m["id"] != id);
        w.memberships.push(membership);
    }

    /// Removes a membership.
    pub fn delete_membership(&self, id: &str) {
        self.world
            .lock()
            .unwrap()
            .memberships
            .retain(|m| m["id"] != id);
    }

    /// Leaves an organization out of the list (as a scan by offset can miss an
    /// item), while `GET /v1/organizations/{id}` still finds it.
    pub fn hide_from_list(&self, id: &str) {
        self.world.lock().unwrap().hidden.push(id.to_owned());
    }

    /// `GET /v1/organizations/{id}` answers 404 for it, while the list still
    /// shows it (a GET that cannot find what exists).
    pub fn unfindable_by_id(&self, id: &str) {
        self.world.lock().unwrap().unfindable.push(id.to_owned());
    }

    /// Makes `change` when the first list request of `path` (e.g.
    /// `/v1/organizations`) at `offset` arrives, before answering it: the world
    /// shifts between two page fetches.
    pub fn before_page(&self, path: &str, offset: i64, change: Change) {
        self.world.lock().unwrap().hooks.push(PageHook {
            path: path.to_owned(),
            offset,
            change: Some(change),
        });
    }

    /// The instance the key belongs to (`GET /v1/instance`); `None` makes that
    /// route answer 404, as an API without it would.
    pub fn set_instance(&self, id: Option<&str>) {
        self.world.lock().unwrap().instance = id.map(str::to_owned);
    }

    /// The next requests get these answers, in order, before real ones again.
    pub fn fail_next(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.world.lock().unwrap().script.extend(answers);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.world.lock().unwrap().seen.clone()
    }

    /// Holds the first request whose path is `path` until the returned sender is
    /// used (or dropped); the receiver fires when that request arrives.
    pub fn gate(&self, path: &str) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.world.lock().unwrap().gates.push(Gate {
            path: path.to_owned(),
            reached: Some(reached_tx),
            release: Some(release_rx),
        });
        (reached_rx, release_tx)
    }
}

#[derive(Debug, Default)]
struct ListQuery {
    limit: Option<i64>,
    offset: Option<i64>,
    order_by: Option<String>,
    /// Repeatable `user_id` filter (an organization's memberships).
    user_ids: Vec<String>,
    /// Repeatable `organization_id` filter (the organizations).
    organization_ids: Vec<String>,
}

impl ListQuery {
    /// Parses a raw query string; repeated keys are kept in order. The error is
    /// the message of Clerk's 422 (a malformed number, too many ids).
    fn parse(raw: Option<&str>) -> Result<Self, &'static str> {
        let mut q = ListQuery::default();
        let number = |v: &str| v.parse::<i64>().map_err(|_| "not a number");
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "limit" => q.limit = Some(number(&v)?),
                "offset" => q.offset = Some(number(&v)?),
                "order_by" => q.order_by = Some(v.into_owned()),
                "user_id" => q.user_ids.push(v.into_owned()),
                "organization_id" => q.organization_ids.push(v.into_owned()),
                _ => {}
            }
        }
        if q.user_ids.len() > 100 || q.organization_ids.len() > 100 {
            return Err("at most 100 ids");
        }
        Ok(q)
    }
}

fn error(status: u16, code: &str, message: &str) -> Response {
    let body = json!({
        "errors": [{"message": message, "long_message": message, "code": code, "meta": {}}],
        "clerk_trace_id": "trace_fake_0001",
    });
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

/// Records the request, checks the key, serves a scripted fault or waits at a
/// gate; then makes the change hooked on this page, if any.
async fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    path: String,
    query: String,
    offset: Option<i64>,
) -> Option<Response> {
    let answer = admit_checked(shared, headers, path.clone(), query).await;
    if answer.is_none() {
        let mut w = shared.world.lock().unwrap();
        let change = w
            .hooks
            .iter_mut()
            .find(|h| h.path == path && Some(h.offset) == offset && h.change.is_some())
            .and_then(|h| h.change.take());
        if let Some(change) = change {
            w.apply(change);
        }
    }
    answer
}

async fn admit_checked(
    shared: &Shared,
    headers: &HeaderMap,
    path: String,
    query: String,
) -> Option<Response> {
    let release = {
        let mut w = shared.world.lock().unwrap();
        w.seen.push(Seen {
            path: path.clone(),
            query,
            version: headers
                .get("clerk-api-version")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            at: std::time::Instant::now(),
        });
        let expected = format!("Bearer {}", shared.key);
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return Some(error(
                401,
                "authentication_invalid",
                "Unable to authenticate the request, you need to supply an active session",
            ));
        }
        if let Some(s) = w.script.pop_front() {
            let mut response = error(
                s.status,
                if s.status == 429 {
                    "too_many_requests"
                } else {
                    "internal_clerk_error"
                },
                "scripted fault",
            );
            if let Some(secs) = s.retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
            }
            return Some(response);
        }
        match w
            .gates
            .iter_mut()
            .find(|g| g.path == path && g.release.is_some())
        {
            Some(gate) => {
                if let Some(reached) = gate.reached.take() {
                    let _ = reached.send(());
                }
                gate.release.take()
            }
            None => None,
        }
    };
    if let Some(release) = release {
        let _ = release.await;
    }
    None
}

fn page(mut items: Vec<Value>, q: &ListQuery) -> Response {
    let limit = q.limit.unwrap_or(10);
    let offset = q.offset.unwrap_or(0);
    if !(1..=500).contains(&limit) || offset < 0 {
        return error(
            422,
            "form_param_invalid",
            "limit must be 1..500, offset >= 0",
        );
    }
    let descending = match q.order_by.as_deref() {
        None | Some("-created_at") => true,
        Some("+created_at") | Some("created_at") => false,
        Some(_) => return error(422, "form_param_invalid", "unsupported order_by"),
    };
    items.sort_by_key(|v| {
        (
            v["created_at"].as_i64(),
            v["id"].as_str().map(str::to_owned),
        )
    });
    if descending {
        items.reverse();
    }
    let total = items.len();
    let data: Vec<Value> = items
        .into_iter()
        .skip(offset as usize)
        .take(limit as usize)
        .collect();
    Json(json!({"data": data, "total_count": total})).into_response()
}

fn raw_query(q: &ListQuery) -> String {
    let mut raw = format!(
        "limit={:?}&offset={:?}&order_by={:?}",
        q.limit, q.offset, q.order_by
    );
    for u in &q.user_ids {
        raw.push_str(&format!("&user_id={u}"));
    }
    for o in &q.organization_ids {
        raw.push_str(&format!("&organization_id={o}"));
    }
    raw
}

/// Whether `id` passes a repeatable id filter (none given: everything does).
fn selected(filter: &[String], id: &Value) -> bool {
    filter.is_empty() || filter.iter().any(|f| id == f.as_str())
}

async fn list_organizations(
    State(shared): State<Shared>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = match ListQuery::parse(raw.as_deref()) {
        Ok(q) => q,
        Err(message) => return error(422, "form_param_invalid", message),
    };
    let path = "/v1/organizations".to_owned();
    if let Some(r) = admit(&shared, &headers, path, raw_query(&q), q.offset).await {
        return r;
    }
    let items = {
        let w = shared.world.lock().unwrap();
        w.organizations
            .iter()
            .filter(|o| !w.hidden.iter().any(|h| o["id"] == h.as_str()))
            .filter(|o| selected(&q.organization_ids, &o["id"]))
            .cloned()
            .collect()
    };
    page(items, &q)
}

async fn get_instance(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(r) = admit(
        &shared,
        &headers,
        "/v1/instance".into(),
        String::new(),
        None,
    )
    .await
    {
        return r;
    }
    let instance = shared.world.lock().unwrap().instance.clone();
    match instance {
        Some(id) => Json(json!({
            "object": "instance",
            "id": id,
            "environment_type": "development",
            "allowed_origins": null,
        }))
        .into_response(),
        None => error(404, "resource_not_found", "Resource not found"),
    }
}

async fn get_organization(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let path = format!("/v1/organizations/{id}");
    if let Some(r) = admit(&shared, &headers, path, String::new(), None).await {
        return r;
    }
    let found = {
        let w = shared.world.lock().unwrap();
        w.organizations
            .iter()
            .filter(|o| !w.unfindable.iter().any(|u| o["id"] == u.as_str()))
            .find(|o| o["id"] == id.as_str() || o["slug"] == id.as_str())
            .cloned()
    };
    match found {
        Some(o) => Json(o).into_response(),
        None => error(404, "resource_not_found", "Resource not found"),
    }
}

async fn list_org_memberships(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = match ListQuery::parse(raw.as_deref()) {
        Ok(q) => q,
        Err(message) => return error(422, "form_param_invalid", message),
    };
    let path = format!("/v1/organizations/{id}/memberships");
    if let Some(r) = admit(&shared, &headers, path, raw_query(&q), q.offset).await {
        return r;
    }
    let (exists, items) = {
        let w = shared.world.lock().unwrap();
        let exists = w.organizations.iter().any(|o| o["id"] == id.as_str());
        let items = w
            .memberships
            .iter()
            .filter(|m| m["organization"]["id"] == id.as_str())
            .filter(|m| selected(&q.user_ids, &m["public_user_data"]["user_id"]))
            .cloned()
            .collect();
        (exists, items)
    };
    if !exists {
        return error(404, "resource_not_found", "Resource not found");
    }
    page(items, &q)
}

async fn list_memberships(
    State(shared): State<Shared>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = match ListQuery::parse(raw.as_deref()) {
        Ok(q) => q,
        Err(message) => return error(422, "form_param_invalid", message),
    };
    let path = "/v1/organization_memberships".to_owned();
    if let Some(r) = admit(&shared, &headers, path, raw_query(&q), q.offset).await {
        return r;
    }
    let items = shared.world.lock().unwrap().memberships.clone();
    page(items, &q)
}
