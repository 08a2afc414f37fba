//! `provisioner-load fake-clerk`: a Backend API of N organizations with M members
//! each, served from memory on this machine, for the reconcile backfill benchmark
//! (no rate limit, the documented page shapes).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Args;
use provisioner::clerk::sample::{Person, membership, organization};
use provisioner::config::Settings;
use serde::Deserialize;
use serde_json::{Value, json};

/// Arguments of `fake-clerk`.
#[derive(Debug, Args)]
pub struct FakeClerkArgs {
    /// Organizations to serve.
    #[arg(long, default_value_t = 10_000)]
    orgs: usize,
    /// Memberships per organization.
    #[arg(long, default_value_t = 5)]
    members: usize,
    /// Address to listen on (this machine only).
    #[arg(long, default_value = "127.0.0.1:18530")]
    listen: std::net::SocketAddr,
    /// The secret key it accepts (`Authorization: Bearer …`).
    #[arg(long, default_value = "sk_test_load_fake_clerk")]
    key: String,
}

struct World {
    key: String,
    organizations: Vec<Value>,
    memberships: Vec<Value>,
    /// Index ranges of each organization's memberships in `memberships`.
    per_org: std::collections::HashMap<String, std::ops::Range<usize>>,
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    offset: Option<usize>,
}

/// Runs the fake until interrupted.
pub async fn run(_settings: &Settings, args: FakeClerkArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "fake-clerk listens on this machine only"
    );
    let t0 = 1_700_000_000_000i64;
    let mut organizations = Vec::with_capacity(args.orgs);
    let mut memberships = Vec::with_capacity(args.orgs * args.members);
    let mut per_org = std::collections::HashMap::new();
    for i in 0..args.orgs {
        let id = format!("org_load{i:07}");
        let at = t0 + i as i64;
        let org = organization(
            &id,
            &format!("Load Org {i}"),
            "user_load_creator",
            at,
            at,
            args.members as u32,
        );
        let start = memberships.len();
        for j in 0..args.members {
            let person = Person::of(&format!("user_load{i:07}_{j}"));
            let role = if j == 0 { "org:admin" } else { "org:member" };
            memberships.push(membership(
                &format!("orgmem_load{i:07}_{j}"),
                org.clone(),
                &person,
                role,
                at + 1 + j as i64,
                at + 1 + j as i64,
            ));
        }
        per_org.insert(id, start..memberships.len());
        organizations.push(org);
    }
    let world = Arc::new(World {
        key: format!("Bearer {}", args.key),
        organizations,
        memberships,
        per_org,
    });
    let app = Router::new()
        .route("/v1/organizations", get(list_organizations))
        .route("/v1/organizations/{id}", get(get_organization))
        .route(
            "/v1/organizations/{id}/memberships",
            get(list_org_memberships),
        )
        .route("/v1/organization_memberships", get(list_memberships))
        .with_state(world);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "fake Clerk Backend API on http://{} ({} organizations, {} memberships each)",
        listener.local_addr()?,
        args.orgs,
        args.members
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn refused() -> Response {
    let body = json!({"errors": [{"code": "authentication_invalid", "message": "invalid key",
        "long_message": "invalid key"}], "clerk_trace_id": "load"});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

fn not_found() -> Response {
    let body = json!({"errors": [{"code": "resource_not_found", "message": "not found",
        "long_message": "not found"}], "clerk_trace_id": "load"});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

fn authorized(world: &World, headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(world.key.as_str())
}

fn page(items: &[Value], q: &ListQuery) -> Response {
    let limit = q.limit.unwrap_or(10).clamp(1, 500);
    let offset = q.offset.unwrap_or(0).min(items.len());
    let end = (offset + limit).min(items.len());
    Json(json!({"data": &items[offset..end], "total_count": items.len()})).into_response()
}

async fn list_organizations(
    State(world): State<Arc<World>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if !authorized(&world, &headers) {
        return refused();
    }
    page(&world.organizations, &q)
}

async fn get_organization(
    State(world): State<Arc<World>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&world, &headers) {
        return refused();
    }
    match world.organizations.iter().find(|o| o["id"] == id.as_str()) {
        Some(o) => Json(o).into_response(),
        None => not_found(),
    }
}

async fn list_org_memberships(
    State(world): State<Arc<World>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    if !authorized(&world, &headers) {
        return refused();
    }
    match world.per_org.get(&id) {
        Some(range) => page(&world.memberships[range.clone()], &q),
        None => not_found(),
    }
}

async fn list_memberships(
    State(world): State<Arc<World>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if !authorized(&world, &headers) {
        return refused();
    }
    page(&world.memberships, &q)
}
