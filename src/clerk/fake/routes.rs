//! The fake's routes: the documented shapes of Clerk's Backend API
//! (`{"data", "total_count"}` pages, the `ClerkErrors` body), after the scripted
//! faults, gates and page hooks of [`super::FakeClerk`].

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{Seen, Shared};

/// The fake's router.
pub(super) fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/organizations", get(list_organizations))
        .route("/v1/organizations/{id}", get(get_organization))
        .route(
            "/v1/organizations/{id}/memberships",
            get(list_org_memberships),
        )
        .route("/v1/organization_memberships", get(list_memberships))
        .route("/v1/instance", get(get_instance))
        .fallback(|| async { error(404, "resource_not_found", "no such route") })
        .with_state(shared)
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

    /// The query as [`Seen::query`] records it.
    fn raw(&self) -> String {
        let mut raw = format!(
            "limit={:?}&offset={:?}&order_by={:?}",
            self.limit, self.offset, self.order_by
        );
        for u in &self.user_ids {
            raw.push_str(&format!("&user_id={u}"));
        }
        for o in &self.organization_ids {
            raw.push_str(&format!("&organization_id={o}"));
        }
        raw
    }
}

/// Clerk's error body.
fn error(status: u16, code: &str, message: &str) -> Response {
    let body = json!({
        "errors": [{"message": message, "long_message": message, "code": code, "meta": {}}],
        "clerk_trace_id": "trace_fake_0001",
    });
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

fn not_found() -> Response {
    error(404, "resource_not_found", "Resource not found")
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
        let mut s = shared.state.lock().unwrap();
        let change = s
            .hooks
            .iter_mut()
            .find(|h| h.path == path && Some(h.offset) == offset && h.change.is_some())
            .and_then(|h| h.change.take());
        if let Some(change) = change {
            s.world.apply(change);
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
    let latency = shared.state.lock().unwrap().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let release = {
        let mut s = shared.state.lock().unwrap();
        s.seen.push(Seen {
            path: path.clone(),
            query,
            version: headers
                .get("clerk-api-version")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            at: std::time::Instant::now(),
        });
        if headers.get("authorization").and_then(|v| v.to_str().ok())
            != Some(shared.bearer.as_str())
        {
            return Some(error(
                401,
                "authentication_invalid",
                "Unable to authenticate the request, you need to supply an active session",
            ));
        }
        if let Some(s) = s.script.pop_front() {
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
        match s
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

/// One page of `items` (given oldest first) in the order `q` asks for.
fn page<'a>(items: impl DoubleEndedIterator<Item = &'a Value> + Clone, q: &ListQuery) -> Response {
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
    let total = items.clone().count();
    let (skip, take) = (offset as usize, limit as usize);
    let data: Vec<Value> = if descending {
        items.rev().skip(skip).take(take).cloned().collect()
    } else {
        items.skip(skip).take(take).cloned().collect()
    };
    Json(json!({"data": data, "total_count": total})).into_response()
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
    if let Some(r) = admit(&shared, &headers, path, q.raw(), q.offset).await {
        return r;
    }
    let s = shared.state.lock().unwrap();
    let items = s
        .world
        .organizations
        .values()
        .filter(|o| !s.hidden.iter().any(|h| o["id"] == h.as_str()))
        .filter(|o| selected(&q.organization_ids, &o["id"]));
    page(items, &q)
}

async fn get_instance(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let path = "/v1/instance".to_owned();
    if let Some(r) = admit(&shared, &headers, path, String::new(), None).await {
        return r;
    }
    let instance = shared.state.lock().unwrap().instance.clone();
    match instance {
        Some(id) => Json(json!({
            "object": "instance",
            "id": id,
            "environment_type": "development",
            "allowed_origins": null,
        }))
        .into_response(),
        None => not_found(),
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
    let s = shared.state.lock().unwrap();
    let findable = |o: &&Value| !s.unfindable.iter().any(|u| o["id"] == u.as_str());
    // By id, else by slug, as Clerk's `{organization_id}` accepts either.
    let found = s.world.organizations.get(&id).filter(findable).or_else(|| {
        s.world
            .organizations
            .values()
            .filter(findable)
            .find(|o| o["slug"] == id.as_str())
    });
    match found {
        Some(o) => Json(o).into_response(),
        None => not_found(),
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
    if let Some(r) = admit(&shared, &headers, path, q.raw(), q.offset).await {
        return r;
    }
    let s = shared.state.lock().unwrap();
    if s.world.organizations.get(&id).is_none() {
        return not_found();
    }
    let items = s
        .world
        .memberships_of(&id)
        .filter(|m| selected(&q.user_ids, &m["public_user_data"]["user_id"]));
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
    if let Some(r) = admit(&shared, &headers, path, q.raw(), q.offset).await {
        return r;
    }
    let s = shared.state.lock().unwrap();
    page(s.world.memberships.values(), &q)
}
