//! Read API (DESIGN §6): every route's answers and errors, authentication,
//! onboarding rules, audit paging, the events route and the OpenAPI document,
//! against a real PostgreSQL seeded with SQL in the worker's schema.

use crate::common;
use std::collections::BTreeSet;
use std::net::SocketAddr;

use crate::common::api_support::*;
use crate::common::*;
use serde_json::{Value, json};

const WORKSPACE_ROUTES: [&str; 4] = ["", "/members", "/audit", "/members/user_x"];

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Every `/v1` request needs a valid bearer token; the webhook, health and metrics
/// routes stay public.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_v1_route_needs_a_valid_token() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    seed.event(
        "msg_auth",
        "organization.created",
        Some(&ws),
        "processed",
        None,
    )
    .await;
    let mut calls: Vec<Call> = WORKSPACE_ROUTES
        .iter()
        .map(|r| Call::get(format!("/v1/workspaces/{ws}{r}")))
        .collect();
    calls.push(Call::post(
        format!("/v1/workspaces/{ws}/onboarding/gong"),
        r#"{"status":"completed"}"#,
    ));
    calls.push(Call::get("/v1/users/user_x/workspaces"));
    calls.push(Call::get("/v1/events/msg_auth"));
    calls.push(Call::get("/v1/openapi.json"));
    calls.push(Call::get("/v1/no/such/route"));
    calls.push(Call::get("/v1/workspaces"));

    for call in calls {
        let path = call.path.clone();
        for token in [None, Some("wrong-token"), Some("")] {
            let (status, body) = call.clone().token(token).send(&app).await;
            assert_eq!(status, 401, "{path} with token {token:?}");
            assert_eq!(error_code(&body), "unauthorized", "{path}");
            assert!(body["error"]["message"].is_string());
        }
    }
    // The onboarding write above never ran.
    assert!(
        seed.audit_rows(&ws, "onboarding.step_updated")
            .await
            .is_empty()
    );

    // Other schemes and a token with a suffix are refused too.
    for header in [
        format!("Basic {TOKEN}"),
        format!("Bearer {TOKEN}x"),
        TOKEN.to_string(),
    ] {
        let res = app
            .client
            .get(format!("{}/v1/workspaces/{ws}", app.address))
            .header("authorization", header.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{header}");
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
    }

    // Public routes answer without a token.
    for path in ["/healthz", "/metrics"] {
        let res = app
            .client
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
    let res = app
        .client
        .post(format!("{}/webhooks/clerk", app.address))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        400,
        "webhooks keep their own (signature) check"
    );
}

/// Several tokens are valid at once (rotation), and the development token stops
/// working once PROVISIONER_API_TOKENS replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_configured_token_works() {
    let app = spawn_app_with(TestOptions {
        env: vec![(
            "PROVISIONER_API_TOKENS".into(),
            "token-old-0123456789,token-new-9876543210".into(),
        )],
        ..Default::default()
    })
    .await;
    let ws = new_id("org");
    Seed::new(&app).workspace(&ws).await;
    for token in ["token-old-0123456789", "token-new-9876543210"] {
        let (status, body) = Call::get(format!("/v1/workspaces/{ws}"))
            .token(Some(token))
            .send(&app)
            .await;
        assert_eq!(status, 200, "{token}");
        assert_eq!(body["id"], ws.as_str());
    }
    let (status, _) = Call::get(format!("/v1/workspaces/{ws}")).send(&app).await;
    assert_eq!(status, 401, "the development token is no longer configured");
}

/// GET /v1/workspaces/{id} answers exactly the §6 fields (image_url included), with plan quotas, the
/// onboarding steps in order and RFC 3339 UTC timestamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_has_every_field() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace_with(&ws, "Acme Sales", "team").await;
    seed.member(&ws, "user_admin", "org:admin").await;
    seed.member(&ws, "user_m1", "org:member").await;
    seed.member(&ws, "user_m2", "org:member").await;
    let gone = seed.member(&ws, "user_gone", "org:admin").await;
    seed.remove_membership(&gone).await;

    let (status, body) = Call::get(format!("/v1/workspaces/{ws}")).send(&app).await;

    assert_eq!(status, 200);
    assert_eq!(
        keys(&body),
        set(&[
            "id",
            "name",
            "slug",
            "image_url",
            "status",
            "plan",
            "quotas",
            "onboarding",
            "member_count",
            "admin_count",
            "created_at",
            "updated_at",
            "deleted_at"
        ])
    );
    assert_eq!(body["id"], ws.as_str());
    assert_eq!(body["name"], "Acme Sales");
    assert_eq!(body["slug"], ws.as_str());
    assert_eq!(body["image_url"], format!("https://img.clerk.com/{ws}"));
    assert_eq!(body["status"], "active");
    assert_eq!(body["plan"], "team");
    let team = &app.settings.provisioning.plans["team"];
    assert_eq!(body["quotas"], serde_json::to_value(team).unwrap());
    assert_eq!(body["quotas"]["seats"], 25);
    assert_eq!(
        body["onboarding"],
        json!({
            "status": "pending",
            "current_step": "gong",
            "steps": [
                {"name": "gong", "required": true, "status": "pending"},
                {"name": "hubspot", "required": false, "status": "pending"},
                {"name": "slack", "required": false, "status": "pending"},
                {"name": "starter_analysis", "required": true, "status": "pending"},
            ]
        })
    );
    assert_eq!(body["member_count"], 3, "removed members do not count");
    assert_eq!(body["admin_count"], 1);
    assert_eq!(
        body["created_at"], "2024-05-28T08:00:00.000Z",
        "Clerk's creation time"
    );
    let updated = body["updated_at"].as_str().unwrap();
    assert!(updated.ends_with('Z'), "{updated}");
    assert!(
        chrono::DateTime::parse_from_rfc3339(updated).is_ok(),
        "{updated}"
    );
    assert_eq!(body["deleted_at"], Value::Null);
}

/// A workspace never provisioned is 404 with the error body; ids match exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_workspace_is_404_on_every_workspace_route() {
    let app = spawn_app().await;
    let ws = new_id("org");
    Seed::new(&app).workspace(&ws).await;
    for id in [
        "org_never",
        &ws.to_uppercase(),
        &format!("{ws} "),
        &ws[..ws.len() - 1],
    ] {
        for route in WORKSPACE_ROUTES {
            let path = format!("/v1/workspaces/{}{route}", urlencode(id));
            let (status, body) = Call::get(path.clone()).send(&app).await;
            assert_eq!(status, 404, "{path}");
            assert_eq!(error_code(&body), "not_found", "{path}");
        }
        let (status, _) = Call::post(
            format!("/v1/workspaces/{}/onboarding/gong", urlencode(id)),
            r#"{"status":"completed"}"#,
        )
        .send(&app)
        .await;
        assert_eq!(status, 404, "{id}");
    }
}

fn urlencode(s: &str) -> String {
    s.replace(' ', "%20")
}

/// Without X-Acting-User the main app sees a deleted workspace as `deleted`, with
/// no active members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_caller_sees_deleted_workspace() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    seed.member(&ws, "user_a", "org:admin").await;
    seed.delete_workspace(&ws, true).await;

    let (status, body) = Call::get(format!("/v1/workspaces/{ws}")).send(&app).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "deleted");
    assert_eq!(body["deleted_at"], "2024-05-29T08:00:00.000Z");
    assert_eq!(body["member_count"], 0);
    assert_eq!(body["admin_count"], 0);

    let (status, body) = Call::get(format!("/v1/workspaces/{ws}/members"))
        .send(&app)
        .await;
    assert_eq!((status, body), (200, json!({"data": [], "next": null})));
    let (status, _) = Call::get(format!("/v1/workspaces/{ws}/members/user_a"))
        .send(&app)
        .await;
    assert_eq!(status, 404);
    let (status, body) = Call::get(format!("/v1/workspaces/{ws}/audit"))
        .send(&app)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"][0]["action"], "workspace.deleted");
}

/// A deleted workspace whose memberships the worker has not ended yet still has no
/// active members (active requires an active workspace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_deleted_workspace_are_not_active_even_before_cascade() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    seed.member(&ws, "user_a", "org:admin").await;
    seed.delete_workspace(&ws, false).await;

    let (_, body) = Call::get(format!("/v1/workspaces/{ws}")).send(&app).await;
    assert_eq!(body["member_count"], 0);
    let (_, body) = Call::get(format!("/v1/workspaces/{ws}/members"))
        .send(&app)
        .await;
    assert_eq!(body, json!({"data": [], "next": null}));
    let (_, body) = Call::get("/v1/users/user_a/workspaces").send(&app).await;
    assert_eq!(body, json!({"data": [], "next": null}));
}

/// Members: active only, one per user (the row with the greatest source_version
/// when a user transiently has two), every §6 field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_lists_active_members_once_each() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    seed.member(&ws, "user_first", "org:admin").await;
    let gone = seed.member(&ws, "user_gone", "org:member").await;
    seed.remove_membership(&gone).await;
    // A re-add with a new membership id before the old removal arrived: two active
    // rows; the newer (admin) speaks.
    seed.member(&ws, "user_twice", "org:member").await;
    seed.member(&ws, "user_twice", "org:admin").await;
    seed.member(&ws, "user_custom", "org:billing").await;

    let (status, body) = Call::get(format!("/v1/workspaces/{ws}/members"))
        .send(&app)
        .await;

    assert_eq!(status, 200);
    assert_eq!(keys(&body), set(&["data", "next"]));
    assert_eq!(body["next"], Value::Null, "one page");
    let data = body["data"].as_array().unwrap();
    let users: Vec<&str> = data
        .iter()
        .map(|m| m["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        ["user_custom", "user_first", "user_twice"],
        "by user id, once each"
    );
    assert_eq!(
        keys(&data[0]),
        set(&[
            "user_id",
            "role",
            "clerk_role",
            "email",
            "first_name",
            "last_name",
            "joined_at"
        ])
    );
    assert_eq!(data[1]["role"], "admin");
    assert_eq!(data[1]["clerk_role"], "org:admin");
    assert_eq!(data[1]["email"], "user_first@example.com");
    assert_eq!(data[1]["first_name"], "First user_first");
    assert_eq!(data[1]["last_name"], "Last");
    let joined = data[1]["joined_at"].as_str().unwrap();
    assert!(
        joined.starts_with("2024-") && joined.ends_with(".000Z"),
        "{joined}"
    );
    assert_eq!(data[2]["role"], "admin", "newest row of user_twice");
    assert_eq!(data[2]["clerk_role"], "org:admin");
    assert_eq!(data[0]["role"], "member", "unmapped Clerk role");
    assert_eq!(data[0]["clerk_role"], "org:billing");

    let (_, ws_body) = Call::get(format!("/v1/workspaces/{ws}")).send(&app).await;
    assert_eq!(ws_body["member_count"], 3);
    assert_eq!(ws_body["admin_count"], 2);
}

/// `member_standing` is each user's newest row by the rule of docs/schema.md
/// (latest `joined_at`; on equal times a removed row first, then the greater
/// membership id), whichever way it is read: whole, by workspace (the read API's
/// counts and lists) or by user (the org switcher). Users with one to four rows
/// whose times tie often, removed or not, are compared with that rule written as
/// the anti-join "no newer row exists", and the workspace's counts with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_standing_is_each_users_newest_row_by_the_documented_order() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let workspaces = [new_id("org"), new_id("org")];
    for ws in &workspaces {
        seed.workspace(ws).await;
    }
    // A small deterministic generator: the same rows on every run.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n
    };
    let (mut ids, mut wss, mut users, mut roles, mut joined, mut removed) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (w, ws) in workspaces.iter().enumerate() {
        for u in 0..60 {
            // Users 0-29 are in both workspaces, so a read by user spans two.
            let user = format!("user_{}", if u < 30 { u } else { u + 100 * w });
            for r in 0..=next(4) {
                ids.push(format!("orgmem_{w}_{u}_{}_{r}", next(1000)));
                wss.push(ws.clone());
                users.push(user.clone());
                roles.push(if next(3) == 0 { "admin" } else { "member" });
                // Three instants only, so equal times are common.
                joined.push(t0() + chrono::Duration::seconds(next(3) as i64));
                removed.push(next(2) == 0);
            }
        }
    }
    sqlx::query(
        "insert into members (membership_id, workspace_id, user_id, role, clerk_role, \
                              source_version, profile_version, joined_at, removed_at, \
                              removal_reason) \
         select id, ws, u, r, 'org:' || r, 1, 1, j, case when gone then j end, \
                case when gone then 'membership_deleted' end \
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], \
                     $6::bool[]) as t(id, ws, u, r, j, gone)",
    )
    .bind(&ids)
    .bind(&wss)
    .bind(&users)
    .bind(&roles)
    .bind(&joined)
    .bind(&removed)
    .execute(&seed.db)
    .await
    .unwrap();

    // The documented rule, written as "no newer row exists".
    macro_rules! newest_rows {
        () => {
            "select m.workspace_id, m.user_id, m.membership_id from members m \
             where not exists (select 1 from members n \
                 where n.workspace_id = m.workspace_id and n.user_id = m.user_id \
                   and (n.joined_at, n.removed_at is not null, n.membership_id collate \"C\") \
                     > (m.joined_at, m.removed_at is not null, m.membership_id collate \"C\"))"
        };
    }
    macro_rules! standing {
        () => {
            "select workspace_id, user_id, membership_id from member_standing s"
        };
    }
    type Row = (String, String, String);
    let rows = |sql: &'static str, bind: Option<&str>| {
        let db = seed.db.clone();
        let bind = bind.map(str::to_owned);
        async move {
            let mut q = sqlx::query_as::<_, Row>(sql);
            if let Some(b) = bind {
                q = q.bind(b);
            }
            let mut rows = q.fetch_all(&db).await.unwrap();
            rows.sort();
            rows
        }
    };
    let expected = rows(newest_rows!(), None).await;
    assert_eq!(
        expected.len(),
        120,
        "one standing row per workspace and user"
    );
    assert_eq!(rows(standing!(), None).await, expected, "whole");
    for ws in &workspaces {
        let of_ws: Vec<Row> = expected.iter().filter(|r| r.0 == *ws).cloned().collect();
        let by_ws = concat!(standing!(), " where s.workspace_id = $1");
        assert_eq!(rows(by_ws, Some(ws)).await, of_ws, "by workspace");
    }
    for user in ["user_0", "user_7", "user_29", "user_130"] {
        let of_user: Vec<Row> = expected.iter().filter(|r| r.1 == user).cloned().collect();
        let by_user = concat!(standing!(), " where s.user_id = $1");
        assert_eq!(rows(by_user, Some(user)).await, of_user, "by user");
    }

    // The counts the read API answers follow the same rows.
    let (active, admins): (i64, i64) = sqlx::query_as(concat!(
        "select count(*) filter (where m.removed_at is null), \
                count(*) filter (where m.removed_at is null and m.role = 'admin') \
         from members m where m.workspace_id = $1 and m.membership_id in \
             (select membership_id from (",
        newest_rows!(),
        ") r)"
    ))
    .bind(&workspaces[0])
    .fetch_one(&seed.db)
    .await
    .unwrap();
    assert!(active > 0 && admins > 0 && active < 60, "{active} {admins}");
    let (_, body) = Call::get(format!("/v1/workspaces/{}", workspaces[0]))
        .send(&app)
        .await;
    assert_eq!(body["member_count"], active);
    assert_eq!(body["admin_count"], admins);
}

/// One member by user id; 404 for a removed, unknown or case-changed user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_or_404() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    seed.member(&ws, "user_Alice", "org:admin").await;
    let gone = seed.member(&ws, "user_bob", "org:member").await;
    seed.remove_membership(&gone).await;

    let (status, body) = Call::get(format!("/v1/workspaces/{ws}/members/user_Alice"))
        .send(&app)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["user_id"], "user_Alice");
    assert_eq!(body["role"], "admin");
    assert_eq!(body["email"], "user_Alice@example.com");

    for user in ["user_bob", "user_alice", "user_nobody"] {
        let (status, body) = Call::get(format!("/v1/workspaces/{ws}/members/{user}"))
            .send(&app)
            .await;
        assert_eq!(status, 404, "{user}");
        assert_eq!(error_code(&body), "not_found");
    }
}

/// The org switcher: active memberships of active workspaces only, by id, with
/// the role; empty for an unknown user; another acting user gets 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_workspaces_lists_active_memberships_of_active_workspaces() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let (a, b, removed, deleted) = (new_id("org"), new_id("org"), new_id("org"), new_id("org"));
    seed.workspace_with(&a, "Beta team", "free").await;
    seed.workspace_with(&b, "Alpha team", "team").await;
    seed.workspace(&removed).await;
    seed.workspace(&deleted).await;
    seed.member(&a, "user_u", "org:member").await;
    seed.member(&b, "user_u", "org:admin").await;
    let m = seed.member(&removed, "user_u", "org:admin").await;
    seed.remove_membership(&m).await;
    seed.member(&deleted, "user_u", "org:admin").await;
    seed.delete_workspace(&deleted, true).await;
    seed.member(&a, "user_other", "org:member").await;

    let (status, body) = Call::get("/v1/users/user_u/workspaces").send(&app).await;
    assert_eq!(status, 200);
    let mut expected = vec![
        json!({"workspace_id": b, "name": "Alpha team", "slug": b, "role": "admin"}),
        json!({"workspace_id": a, "name": "Beta team", "slug": a, "role": "member"}),
    ];
    expected.sort_by_key(|w| w["workspace_id"].as_str().unwrap().to_owned());
    assert_eq!(
        body,
        json!({"data": expected, "next": null}),
        "by workspace id"
    );

    let (status, same) = Call::get("/v1/users/user_u/workspaces")
        .acting("user_u")
        .send(&app)
        .await;
    assert_eq!(
        (status, same),
        (200, body),
        "a user may list their own workspaces"
    );

    let (status, body) = Call::get("/v1/users/user_u/workspaces")
        .acting("user_other")
        .send(&app)
        .await;
    assert_eq!(status, 404, "one user cannot list another's workspaces");
    assert_eq!(error_code(&body), "not_found");

    let (status, body) = Call::get("/v1/users/user_nobody/workspaces")
        .send(&app)
        .await;
    assert_eq!((status, body), (200, json!({"data": [], "next": null})));
    let (_, body) = Call::get("/v1/users/USER_U/workspaces").send(&app).await;
    assert_eq!(
        body,
        json!({"data": [], "next": null}),
        "user ids match exactly"
    );
}

/// Members page by user id: 250 members in pages of 100 (the default), every
/// member exactly once and in order, `next` null on the last page; `limit` pages
/// alike, and a page ends where the last one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_page_over_250_members() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    // Seeded in an order unlike the user ids, so the order is the API's.
    let mut users: Vec<String> = (0..250).map(|i| format!("user_{i:03}")).collect();
    for i in (0..250).rev() {
        seed.member(&ws, &users[(i * 7) % 250], "org:member").await;
    }
    let gone = seed.member(&ws, "user_gone", "org:member").await;
    seed.remove_membership(&gone).await;
    users.sort();

    let pages = |limit: Option<usize>| {
        let (app, ws) = (&app, ws.clone());
        async move {
            let mut seen: Vec<String> = Vec::new();
            let mut sizes: Vec<usize> = Vec::new();
            let first = match limit {
                Some(l) => format!("/v1/workspaces/{ws}/members?limit={l}"),
                None => format!("/v1/workspaces/{ws}/members"),
            };
            let mut path = first;
            loop {
                let (status, page) = Call::get(path.clone()).send(app).await;
                assert_eq!(status, 200, "{path}: {page}");
                assert_eq!(keys(&page), set(&["data", "next"]));
                let data = page["data"].as_array().unwrap();
                sizes.push(data.len());
                seen.extend(
                    data.iter()
                        .map(|m| m["user_id"].as_str().unwrap().to_owned()),
                );
                match &page["next"] {
                    Value::Null => break,
                    Value::String(next) => {
                        path = match limit {
                            Some(l) => {
                                format!("/v1/workspaces/{ws}/members?limit={l}&after={next}")
                            }
                            None => format!("/v1/workspaces/{ws}/members?after={next}"),
                        }
                    }
                    other => panic!("next is {other}"),
                }
                assert!(sizes.len() < 300, "paging does not end");
            }
            (seen, sizes)
        }
    };

    let (seen, sizes) = pages(None).await;
    assert_eq!(seen, users, "every member exactly once, by user id");
    assert_eq!(sizes, [100, 100, 50], "default limit 100");

    let (seen, sizes) = pages(Some(250)).await;
    assert_eq!(seen, users);
    assert_eq!(sizes, [250], "exactly one page: next is null");

    let (seen, sizes) = pages(Some(7)).await;
    assert_eq!(seen, users);
    assert_eq!(sizes.len(), 36);
    assert!(sizes[..35].iter().all(|n| *n == 7) && sizes[35] == 5);

    let (_, body) = Call::get(format!("/v1/workspaces/{ws}/members?limit=500"))
        .send(&app)
        .await;
    assert_eq!(body["data"].as_array().unwrap().len(), 250);
}

/// The org switcher pages like members, by workspace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_workspaces_page_by_workspace_id() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let user = new_id("user");
    let mut workspaces: Vec<String> = (0..5).map(|_| new_id("org")).collect();
    for ws in &workspaces {
        seed.workspace(ws).await;
        seed.member(ws, &user, "org:member").await;
    }
    workspaces.sort();

    let mut seen: Vec<String> = Vec::new();
    let mut path = format!("/v1/users/{user}/workspaces?limit=2");
    let mut pages = 0;
    loop {
        let (status, page) = Call::get(path.clone()).send(&app).await;
        assert_eq!(status, 200, "{path}: {page}");
        pages += 1;
        seen.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["workspace_id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/users/{user}/workspaces?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, workspaces);
    assert_eq!(pages, 3);
}

/// A tampered cursor, a cursor of another list and a bad `limit` are 400 with the
/// error body and their codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_reject_bad_limit_and_cursor() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let (ws, other) = (new_id("org"), new_id("org"));
    seed.workspace(&ws).await;
    seed.workspace(&other).await;
    for user in ["user_a", "user_b", "user_c"] {
        seed.member(&ws, user, "org:member").await;
        seed.member(&other, user, "org:member").await;
    }
    let (_, page) = Call::get(format!("/v1/workspaces/{ws}/members?limit=1"))
        .send(&app)
        .await;
    let next = page["next"].as_str().expect("a next cursor").to_owned();
    let (_, page) = Call::get("/v1/users/user_a/workspaces?limit=1")
        .send(&app)
        .await;
    let switcher_next = page["next"].as_str().expect("a next cursor").to_owned();

    // The cursor works where it was issued.
    let (status, _) = Call::get(format!("/v1/workspaces/{ws}/members?after={next}"))
        .send(&app)
        .await;
    assert_eq!(status, 200);

    let mut flipped: Vec<char> = next.chars().collect();
    let last = flipped.len() - 2;
    flipped[last] = if flipped[last] == 'A' { 'B' } else { 'A' };
    let flipped: String = flipped.into_iter().collect();
    let plain = "dXNlcl9h"; // base64url("user_a"): a guess at the format
    let members = format!("/v1/workspaces/{ws}/members");
    let cases = [
        (format!("{members}?after={flipped}"), "invalid_cursor"),
        (format!("{members}?after={next}x"), "invalid_cursor"),
        (format!("{members}?after={plain}"), "invalid_cursor"),
        (format!("{members}?after=user_a"), "invalid_cursor"),
        (format!("{members}?after="), "invalid_cursor"),
        (
            format!("/v1/workspaces/{other}/members?after={next}"),
            "invalid_cursor",
        ),
        (format!("{members}?after={switcher_next}"), "invalid_cursor"),
        (
            format!("/v1/users/user_a/workspaces?after={next}"),
            "invalid_cursor",
        ),
        (
            format!("/v1/users/user_b/workspaces?after={switcher_next}"),
            "invalid_cursor",
        ),
        (format!("{members}?limit=0"), "invalid_limit"),
        (format!("{members}?limit=501"), "invalid_limit"),
        (format!("{members}?limit=ten"), "invalid_limit"),
        (format!("{members}?limit=-1"), "invalid_limit"),
        (
            "/v1/users/user_a/workspaces?limit=0".to_owned(),
            "invalid_limit",
        ),
        (format!("{members}?limit=1&limit=2"), "invalid_query"),
    ];
    for (path, code) in cases {
        let (status, body) = Call::get(path.clone()).send(&app).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(error_code(&body), code, "{path}");
        assert!(body["error"]["message"].is_string(), "{path}");
    }
}

/// Audit: newest first, every §6 field, default limit 50, `next` until the last page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_is_newest_first_with_default_limit() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    let other = new_id("org");
    seed.workspace(&ws).await; // writes workspace.provisioned
    seed.workspace(&other).await;
    for i in 0..59 {
        seed.audit(&ws, "member.added", Some(&format!("user_{i:02}")))
            .await;
        seed.audit(&other, "member.added", Some("user_elsewhere"))
            .await;
    }

    let (status, page1) = Call::get(format!("/v1/workspaces/{ws}/audit"))
        .send(&app)
        .await;

    assert_eq!(status, 200);
    assert_eq!(keys(&page1), set(&["data", "next"]));
    let data = page1["data"].as_array().unwrap();
    assert_eq!(data.len(), 50, "default limit");
    assert_eq!(
        keys(&data[0]),
        set(&["at", "action", "actor", "subject", "details", "event_id"])
    );
    assert_eq!(data[0]["subject"], "user_58", "newest first");
    assert_eq!(data[0]["action"], "member.added");
    assert_eq!(data[0]["actor"], "clerk");
    assert_eq!(data[0]["details"], json!({"seeded": true}));
    assert!(data[0]["event_id"].as_str().unwrap().starts_with("msg_"));
    assert!(data[0]["at"].as_str().unwrap().ends_with('Z'));
    let next = page1["next"].as_str().expect("a next cursor");

    let (status, page2) = Call::get(format!("/v1/workspaces/{ws}/audit?before={next}"))
        .send(&app)
        .await;
    assert_eq!(status, 200);
    let data2 = page2["data"].as_array().unwrap();
    assert_eq!(data2.len(), 10);
    assert_eq!(data2[0]["subject"], "user_08");
    assert_eq!(data2[9]["action"], "workspace.provisioned", "oldest last");
    assert_eq!(page2["next"], Value::Null, "last page");
    assert!(
        data.iter()
            .chain(data2)
            .all(|r| r["subject"] != "user_elsewhere"),
        "only this workspace's rows"
    );

    // Exactly one page: no next.
    let (_, all) = Call::get(format!("/v1/workspaces/{ws}/audit?limit=60"))
        .send(&app)
        .await;
    assert_eq!(all["data"].as_array().unwrap().len(), 60);
    assert_eq!(all["next"], Value::Null);
}

/// Paging with `next` neither repeats nor skips rows when new rows are written
/// between pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_cursor_is_stable_while_rows_arrive() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    for i in 0..20 {
        seed.audit(&ws, "member.added", Some(&format!("old_{i:02}")))
            .await;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut path = format!("/v1/workspaces/{ws}/audit?limit=7");
    let mut pages = 0;
    loop {
        let (status, page) = Call::get(path.clone()).send(&app).await;
        assert_eq!(status, 200, "{path}");
        pages += 1;
        seen.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["subject"].as_str().unwrap().to_owned()),
        );
        // New rows arrive between pages.
        seed.audit(&ws, "member.added", Some(&format!("new_{pages}")))
            .await;
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/workspaces/{ws}/audit?limit=7&before={next}"),
            None => break,
        }
    }
    let mut expected: Vec<String> = (0..20).rev().map(|i| format!("old_{i:02}")).collect();
    expected.push(ws.clone());
    assert_eq!(
        seen, expected,
        "every old row once, in order, none of the new ones"
    );
    assert_eq!(pages, 3);
}

/// A member's view of the audit (X-Acting-User) shows console rows (actor `ops`,
/// and a console replay's `replay` row) with their time, action, subject and
/// event id but no operator, drift or dead-letter error, and provisioning rows
/// without `replayed_by`; the service's own view keeps every row whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_never_see_operator_details_in_the_audit() {
    use provisioner::http::console::audit::{Action, Actor, record};
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    let membership = seed.member(&ws, "user_member", "org:member").await;
    // Rows as the console writes them: a sync, a purge, a replay.
    let console = [
        (
            "workspace.synced",
            Actor::Ops,
            None,
            json!({"found": true, "summary": "1 repair", "applied": 1, "refused": null,
                   "drift": ["member_missing org_x user_secret: Clerk lists user_secret"]}),
        ),
        (
            "dead_letter.purged",
            Actor::Ops,
            Some("msg_purged"),
            json!({"type": "organization.updated", "error_class": "payload",
                   "error": "data.name: invalid type, payload {\"secret\":1}"}),
        ),
        (
            "dead_letter.replayed",
            Actor::Replay,
            Some("msg_replayed"),
            json!({"type": "organizationMembership.created", "error_class": "payload",
                   "error": "data.role missing", "selection": "type=organizationMembership.created"}),
        ),
    ];
    for (action, actor, event_id, details) in console {
        record(
            &app.db,
            Action {
                action,
                actor,
                workspace_id: Some(&ws),
                event_id,
                operator: "alice (on-call)",
                details,
            },
        )
        .await
        .unwrap();
    }
    // What the worker writes for an event the console replayed.
    sqlx::query(
        "insert into audit_log (workspace_id, action, actor, subject, details, event_id) \
         values ($1, 'member.added', 'replay', 'user_member', $2, 'msg_replayed')",
    )
    .bind(&ws)
    .bind(sqlx::types::Json(json!({
        "membership_id": membership, "role": "member", "clerk_role": "org:member",
        "after": {"email": "user_member@example.com"}, "replayed_by": "alice (on-call)",
    })))
    .execute(&app.db)
    .await
    .unwrap();

    let (status, member_view) = Call::get(format!("/v1/workspaces/{ws}/audit"))
        .acting("user_member")
        .send(&app)
        .await;
    let (_, service_view) = Call::get(format!("/v1/workspaces/{ws}/audit"))
        .send(&app)
        .await;

    assert_eq!(status, 200);
    let rows = member_view["data"].as_array().unwrap();
    let whole = service_view["data"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "a member still sees every row");
    let text = member_view.to_string();
    for hidden in [
        "alice",
        "on-call",
        "user_secret",
        "secret",
        "data.role",
        "selection",
    ] {
        assert!(!text.contains(hidden), "{hidden} in {text}");
    }
    assert_eq!(rows[0]["action"], "member.added");
    assert_eq!(
        rows[0]["details"],
        json!({"membership_id": membership, "role": "member", "clerk_role": "org:member",
               "after": {"email": "user_member@example.com"}}),
        "provisioning keys stay, replayed_by goes"
    );
    for (row, action, actor, event_id) in [
        (
            &rows[1],
            "dead_letter.replayed",
            "replay",
            json!("msg_replayed"),
        ),
        (&rows[2], "dead_letter.purged", "ops", json!("msg_purged")),
        (&rows[3], "workspace.synced", "ops", Value::Null),
    ] {
        assert_eq!(row["action"], action);
        assert_eq!(row["actor"], actor);
        assert_eq!(row["event_id"], event_id);
        assert!(row["at"].as_str().unwrap().ends_with('Z'));
        assert!(row["subject"].is_string(), "{row}");
        assert_eq!(row["details"], json!({}), "{action}: no operator details");
    }
    // The service's own view (no acting user) is whole.
    assert_eq!(whole[0]["details"]["replayed_by"], "alice (on-call)");
    assert_eq!(whole[1]["details"]["operator"], "alice (on-call)");
    assert_eq!(whole[2]["details"]["error_class"], "payload");
    assert!(
        whole[3]["details"]["drift"][0]
            .as_str()
            .unwrap()
            .contains("user_secret")
    );
}

/// Bad `limit` values and cursors this API did not issue are 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_rejects_bad_limit_and_cursor() {
    let app = spawn_app().await;
    let ws = new_id("org");
    Seed::new(&app).workspace(&ws).await;
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=501", "invalid_limit"),
        ("limit=-5", "invalid_limit"),
        ("limit=ten", "invalid_limit"),
        ("limit=", "invalid_limit"),
        ("before=42", "invalid_cursor"),
        ("before=%FF%FE", "invalid_cursor"),
        ("before=", "invalid_cursor"),
        ("limit=1&limit=2", "invalid_query"),
    ] {
        let (status, body) = Call::get(format!("/v1/workspaces/{ws}/audit?{query}"))
            .send(&app)
            .await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(error_code(&body), code, "{query}");
    }
    let (status, body) = Call::get(format!("/v1/workspaces/{ws}/audit?limit=500"))
        .send(&app)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
}

/// Completing and skipping steps: the answer is the updated onboarding, each
/// change writes one `onboarding.step_updated` row (actor api), and onboarding
/// completes once required steps are completed and optional ones settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_steps_complete_and_are_audited() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    let step = |name: &str, status: &str| {
        Call::post(
            format!("/v1/workspaces/{ws}/onboarding/{name}"),
            format!(r#"{{"status":"{status}"}}"#),
        )
    };

    let (status, body) = step("gong", "completed").send(&app).await;
    assert_eq!(status, 200);
    assert_eq!(keys(&body), set(&["status", "current_step", "steps"]));
    assert_eq!(body["status"], "pending");
    assert_eq!(body["current_step"], "hubspot");
    assert_eq!(
        body["steps"][0],
        json!({"name": "gong", "required": true, "status": "completed"})
    );

    let (status, body) = step("hubspot", "skipped").send(&app).await;
    assert_eq!(status, 200);
    assert_eq!(body["current_step"], "slack");
    assert_eq!(body["steps"][1]["status"], "skipped");

    // Out of order is fine: current_step is the first pending by position.
    let (_, body) = step("starter_analysis", "completed").send(&app).await;
    assert_eq!(body["current_step"], "slack");
    assert_eq!(body["status"], "pending");

    let (status, body) = step("slack", "completed").send(&app).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "completed");
    assert_eq!(body["current_step"], Value::Null);

    // The same status again changes nothing and writes no audit row.
    let (status, again) = step("slack", "completed").send(&app).await;
    assert_eq!((status, &again), (200, &body));

    // An optional step may go from completed to skipped (a change, audited).
    let (status, body) = step("slack", "skipped").send(&app).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "completed");

    let (_, ws_body) = Call::get(format!("/v1/workspaces/{ws}")).send(&app).await;
    assert_eq!(ws_body["onboarding"], body, "GET shows the same onboarding");

    let rows = seed.audit_rows(&ws, "onboarding.step_updated").await;
    let summary: Vec<(String, String, Value)> = rows
        .into_iter()
        .map(|(actor, subject, details)| (actor, subject.unwrap(), details))
        .collect();
    let row = |s: &str, from: &str, to: &str| {
        (
            "api".to_string(),
            s.to_string(),
            json!({"from": from, "to": to, "acting_user": null}),
        )
    };
    assert_eq!(
        summary,
        vec![
            row("gong", "pending", "completed"),
            row("hubspot", "pending", "skipped"),
            row("starter_analysis", "pending", "completed"),
            row("slack", "pending", "completed"),
            row("slack", "completed", "skipped"),
        ]
    );
    let (_, audit) = Call::get(format!("/v1/workspaces/{ws}/audit?limit=1"))
        .send(&app)
        .await;
    assert_eq!(audit["data"][0]["action"], "onboarding.step_updated");
    assert_eq!(audit["data"][0]["actor"], "api");
    assert_eq!(audit["data"][0]["subject"], "slack");
    assert_eq!(audit["data"][0]["event_id"], Value::Null);
}

/// Onboarding refusals: 422 skipping a required step, 404 unknown step, 400 bad
/// JSON, 422 unknown status, 409 deleted workspace — none changes or audits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_refusals_change_nothing() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    let gone = new_id("org");
    seed.workspace(&ws).await;
    seed.workspace(&gone).await;
    seed.delete_workspace(&gone, true).await;
    let post = |id: &str, step: &str, body: &str| {
        Call::post(
            format!("/v1/workspaces/{id}/onboarding/{step}"),
            body.to_owned(),
        )
    };

    for (call, expected, code) in [
        (
            post(&ws, "gong", r#"{"status":"skipped"}"#),
            422,
            "step_required",
        ),
        (
            post(&ws, "starter_analysis", r#"{"status":"skipped"}"#),
            422,
            "step_required",
        ),
        (
            post(&ws, "salesforce", r#"{"status":"completed"}"#),
            404,
            "not_found",
        ),
        (
            post(&ws, "GONG", r#"{"status":"completed"}"#),
            404,
            "not_found",
        ),
        (post(&ws, "gong", r#"{"status":"#), 400, "invalid_json"),
        (post(&ws, "gong", "status=completed"), 400, "invalid_json"),
        (post(&ws, "gong", ""), 400, "invalid_json"),
        (
            post(&ws, "gong", r#"{"status":"done"}"#),
            422,
            "invalid_status",
        ),
        (
            post(&ws, "gong", r#"{"status":"pending"}"#),
            422,
            "invalid_status",
        ),
        (
            post(&ws, "gong", r#"{"state":"completed"}"#),
            422,
            "invalid_status",
        ),
        (
            post(&gone, "gong", r#"{"status":"completed"}"#),
            409,
            "workspace_deleted",
        ),
    ] {
        let what = format!(
            "{} {:?}",
            call.path,
            String::from_utf8_lossy(call.body.as_deref().unwrap())
        );
        let (status, body) = call.send(&app).await;
        assert_eq!(status, expected, "{what}");
        assert_eq!(error_code(&body), code, "{what}");
    }
    for id in [&ws, &gone] {
        assert!(
            seed.audit_rows(id, "onboarding.step_updated")
                .await
                .is_empty()
        );
    }
    let (_, body) = Call::get(format!("/v1/workspaces/{ws}")).send(&app).await;
    assert!(
        body["onboarding"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "pending")
    );
    let (_, body) = Call::get(format!("/v1/workspaces/{gone}")).send(&app).await;
    assert_eq!(body["onboarding"]["steps"][0]["status"], "pending");

    // GET on the write route is not allowed (but still needs the token first).
    let (status, body) = Call::get(format!("/v1/workspaces/{ws}/onboarding/gong"))
        .send(&app)
        .await;
    assert_eq!(status, 405);
    assert_eq!(error_code(&body), "method_not_allowed");
}

/// With X-Acting-User an admin may write (acting user in the audit details) and a
/// plain member gets 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_writes_need_admin_when_acting() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    seed.member(&ws, "user_admin", "org:admin").await;
    seed.member(&ws, "user_member", "org:member").await;
    let path = format!("/v1/workspaces/{ws}/onboarding/gong");

    let (status, body) = Call::post(path.clone(), r#"{"status":"completed"}"#)
        .acting("user_member")
        .send(&app)
        .await;
    assert_eq!(status, 403);
    assert_eq!(error_code(&body), "forbidden");
    assert!(
        seed.audit_rows(&ws, "onboarding.step_updated")
            .await
            .is_empty()
    );

    let (status, body) = Call::post(path, r#"{"status":"completed"}"#)
        .acting("user_admin")
        .send(&app)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["steps"][0]["status"], "completed");
    let rows = seed.audit_rows(&ws, "onboarding.step_updated").await;
    assert_eq!(
        rows,
        vec![(
            "api".into(),
            Some("gong".into()),
            json!({"from": "pending", "to": "completed", "acting_user": "user_admin"})
        )]
    );

    // Members may read; the acting header must be usable.
    let (status, _) = Call::get(format!("/v1/workspaces/{ws}"))
        .acting("user_member")
        .send(&app)
        .await;
    assert_eq!(status, 200);
    let (status, body) = Call::get(format!("/v1/workspaces/{ws}"))
        .acting("")
        .send(&app)
        .await;
    assert_eq!(
        status, 400,
        "an empty X-Acting-User is not the trusted caller"
    );
    assert_eq!(error_code(&body), "invalid_acting_user");
}

/// GET /v1/events/{svix_id}: the processing-log row with every §6 field; 404
/// until a worker has seen it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_route_shows_the_processing_log() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    seed.event(
        "msg_ok",
        "organization.created",
        Some(&ws),
        "processed",
        None,
    )
    .await;
    seed.event(
        "msg_dead",
        "organizationMembership.created",
        None,
        "dead",
        Some("data.id missing"),
    )
    .await;

    let (status, body) = Call::get("/v1/events/msg_ok").send(&app).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "id": "msg_ok",
            "type": "organization.created",
            "workspace_id": ws,
            "status": "processed",
            "error": null,
            "received_at": "2024-05-28T08:00:00.000Z",
            "processed_at": "2024-05-28T08:00:01.500Z",
        })
    );
    let (status, body) = Call::get("/v1/events/msg_dead").send(&app).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "dead");
    assert_eq!(body["error"], "data.id missing");
    assert_eq!(body["workspace_id"], Value::Null);

    for id in ["msg_unknown", "MSG_OK", "msg_ok%20"] {
        let (status, body) = Call::get(format!("/v1/events/{id}")).send(&app).await;
        assert_eq!(status, 404, "{id}");
        assert_eq!(error_code(&body), "not_found");
    }
}

/// The OpenAPI document lists every route with its method, declares the bearer
/// scheme, and each listed path answers on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_every_route() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace(&ws).await;
    seed.member(&ws, "user_a", "org:admin").await;
    seed.event(
        "msg_doc",
        "organization.created",
        Some(&ws),
        "processed",
        None,
    )
    .await;

    let (status, doc) = Call::get("/v1/openapi.json").send(&app).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let listed: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("GET", "/v1/workspaces/{id}"),
        ("GET", "/v1/workspaces/{id}/members"),
        ("GET", "/v1/workspaces/{id}/members/{user_id}"),
        ("POST", "/v1/workspaces/{id}/sync"),
        ("GET", "/v1/workspaces/{id}/audit"),
        ("POST", "/v1/workspaces/{id}/onboarding/{step}"),
        ("GET", "/v1/users/{user_id}/workspaces"),
        ("GET", "/v1/events/{svix_id}"),
        ("GET", "/v1/openapi.json"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(listed, expected);

    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    for schema in [
        "Workspace",
        "Onboarding",
        "Member",
        "AuditPage",
        "Event",
        "ErrorBody",
    ] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
    let params = |path: &str| -> Vec<String> {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        params("/v1/workspaces/{id}/audit"),
        ["id", "limit", "before", "X-Acting-User"]
    );
    assert_eq!(
        params("/v1/workspaces/{id}/members"),
        ["id", "limit", "after", "X-Acting-User"]
    );
    assert_eq!(
        params("/v1/users/{user_id}/workspaces"),
        ["user_id", "limit", "after", "X-Acting-User"]
    );

    // Every documented route is real: filled in, it answers 200.
    for (method, path) in &expected {
        let real = path
            .replace("{id}", &ws)
            .replace("{user_id}", "user_a")
            .replace("{step}", "slack")
            .replace("{svix_id}", "msg_doc");
        let call = match method.as_str() {
            "POST" => Call::post(real.clone(), r#"{"status":"completed"}"#),
            _ => Call::get(real.clone()),
        };
        let (status, body) = call.send(&app).await;
        if path.ends_with("/sync") {
            // This app has no Clerk key: the route is there and says so (its 200
            // against a fake Clerk is in the `sync` module).
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (501, Some("reconcile_not_configured")),
                "{method} {real}"
            );
            continue;
        }
        assert_eq!(status, 200, "{method} {real}");
    }
}

/// The document declares every status each route can answer (with the error
/// codes of its 400s), the X-Acting-User header everywhere, and the cursors' and
/// limits' formats; the schemathesis run of .ci/schemathesis.sh checks the same
/// against the running server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_declares_every_status_and_parameter_format() {
    let app = spawn_app().await;
    let (status, doc) = Call::get("/v1/openapi.json").send(&app).await;
    assert_eq!(status, 200);
    let workspace_route = ["401", "400", "404", "503", "200"];
    let cases: [(&str, &str, &[&str]); 8] = [
        ("get", "/v1/workspaces/{id}", &workspace_route),
        ("get", "/v1/workspaces/{id}/members", &workspace_route),
        (
            "get",
            "/v1/workspaces/{id}/members/{user_id}",
            &workspace_route,
        ),
        ("get", "/v1/workspaces/{id}/audit", &workspace_route),
        (
            "post",
            "/v1/workspaces/{id}/onboarding/{step}",
            &["200", "400", "401", "403", "404", "409", "422", "503"],
        ),
        ("get", "/v1/users/{user_id}/workspaces", &workspace_route),
        ("get", "/v1/events/{svix_id}", &workspace_route),
        ("get", "/v1/openapi.json", &["200", "400", "401"]),
    ];
    for (method, path, statuses) in cases {
        let operation = &doc["paths"][path][method];
        let declared: BTreeSet<String> = operation["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path}"))
            .keys()
            .cloned()
            .collect();
        let expected: BTreeSet<String> = statuses.iter().map(|s| s.to_string()).collect();
        assert_eq!(declared, expected, "{method} {path}");
        let bad_request = operation["responses"]["400"]["description"]
            .as_str()
            .unwrap();
        assert!(
            bad_request.contains("invalid_acting_user"),
            "{method} {path}: {bad_request}"
        );
        let acting = operation["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "X-Acting-User")
            .unwrap_or_else(|| panic!("{method} {path} declares X-Acting-User"));
        assert_eq!(acting["in"], "header");
        assert_eq!(acting["required"], false);
    }
    for (path, cursor) in [
        ("/v1/workspaces/{id}/members", "after"),
        ("/v1/users/{user_id}/workspaces", "after"),
        ("/v1/workspaces/{id}/audit", "before"),
    ] {
        let operation = &doc["paths"][path]["get"];
        let description = operation["responses"]["400"]["description"]
            .as_str()
            .unwrap();
        for code in ["invalid_limit", "invalid_cursor", "invalid_query"] {
            assert!(description.contains(code), "{path}: {description}");
        }
        let param = |name: &str| {
            operation["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{path} declares {name}"))
                .clone()
        };
        assert_eq!(
            param(cursor)["schema"]["pattern"],
            "^[A-Za-z0-9_-]+$",
            "{path}"
        );
        let limit = param("limit");
        assert_eq!(limit["schema"]["minimum"], 1, "{path}");
        assert_eq!(limit["schema"]["maximum"], 500, "{path}");
    }
    for list in ["MemberList", "UserWorkspaceList", "AuditPage"] {
        let properties = &doc["components"]["schemas"][list]["properties"];
        assert!(properties["data"].is_object(), "{list}");
        assert!(properties["next"].is_object(), "{list}");
    }
}

/// While PostgreSQL is unreachable the API answers 503 with the error body, and
/// recovers by itself when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_is_503_then_recovers() {
    let upstream: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = common::proxy::Proxy::start(upstream).await;
    let iso = Isolation::new();
    let url = format!("postgres://postgres@{}/{}", proxy.addr, iso.database);
    let app = spawn_app_isolated(
        iso,
        TestOptions {
            database_url: Some(url),
            extra_config: "[database]\nacquire_timeout_ms = 1000\n".into(),
            ..Default::default()
        },
    )
    .await;
    let ws = new_id("org");
    Seed::new(&app).workspace(&ws).await;
    let (status, _) = Call::get(format!("/v1/workspaces/{ws}")).send(&app).await;
    assert_eq!(status, 200);

    proxy.cut().await;
    for path in [
        format!("/v1/workspaces/{ws}"),
        format!("/v1/workspaces/{ws}/members"),
    ] {
        let (status, body) = Call::get(path.clone()).send(&app).await;
        assert_eq!(status, 503, "{path}");
        assert_eq!(error_code(&body), "database_unavailable");
    }
    let (status, _) = Call::post(
        format!("/v1/workspaces/{ws}/onboarding/gong"),
        r#"{"status":"completed"}"#,
    )
    .send(&app)
    .await;
    assert_eq!(status, 503);

    proxy.restore();
    let back = eventually(std::time::Duration::from_secs(20), || async {
        let (status, _) = Call::get(format!("/v1/workspaces/{ws}")).send(&app).await;
        (status == 200).then_some(())
    })
    .await;
    assert!(back.is_some(), "the API recovers without a restart");
}

/// Checks `answer` against `schema` of `doc`, resolving `$ref`s: every property
/// of an answer object is declared, and every declared property is `required`
/// and present; nested objects and array items alike. `at` names the place.
fn check_always_sent(doc: &Value, schema: &Value, answer: &Value, at: &str) {
    if let Some(name) = schema["$ref"].as_str() {
        let name = name.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        assert!(target.is_object(), "{at}: unresolved $ref {name}");
        return check_always_sent(doc, target, answer, at);
    }
    if answer.is_null() {
        return;
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(alternatives) = schema[key].as_array() {
            for alternative in alternatives {
                if alternative["type"] != "null" {
                    check_always_sent(doc, alternative, answer, at);
                }
            }
        }
    }
    if let Some(items) = answer.as_array() {
        for (i, item) in items.iter().enumerate() {
            check_always_sent(doc, &schema["items"], item, &format!("{at}[{i}]"));
        }
    }
    let (Some(object), Some(properties)) = (answer.as_object(), schema["properties"].as_object())
    else {
        return;
    };
    let declared: BTreeSet<String> = properties.keys().cloned().collect();
    let required: BTreeSet<String> = schema["required"]
        .as_array()
        .map(|r| r.iter().map(|k| k.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    let sent: BTreeSet<String> = object.keys().cloned().collect();
    assert_eq!(sent, declared, "{at}: sent vs declared properties");
    assert_eq!(required, declared, "{at}: required vs declared properties");
    for (key, value) in object {
        check_always_sent(doc, &properties[key], value, &format!("{at}.{key}"));
    }
}

/// For real answers of every read route, the onboarding write and an error body,
/// the OpenAPI document declares exactly the properties sent and lists each as
/// `required` (a nullable one too), so clients may rely on every field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_requires_every_property_the_server_sends() {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let ws = new_id("org");
    seed.workspace_with(&ws, "Acme", "team").await;
    seed.member(&ws, "user_a", "org:admin").await;
    seed.audit(&ws, "member.added", None).await;
    seed.event(
        "msg_req",
        "organization.created",
        Some(&ws),
        "processed",
        None,
    )
    .await;
    seed.event(
        "msg_req_dead",
        "organization.created",
        None,
        "dead",
        Some("x"),
    )
    .await;

    let (status, doc) = Call::get("/v1/openapi.json").send(&app).await;
    assert_eq!(status, 200);
    let cases: [(&str, &str, Call, u16); 10] = [
        (
            "get",
            "/v1/workspaces/{id}",
            Call::get(format!("/v1/workspaces/{ws}")),
            200,
        ),
        (
            "get",
            "/v1/workspaces/{id}/members",
            Call::get(format!("/v1/workspaces/{ws}/members")),
            200,
        ),
        (
            "get",
            "/v1/workspaces/{id}/members/{user_id}",
            Call::get(format!("/v1/workspaces/{ws}/members/user_a")),
            200,
        ),
        (
            "get",
            "/v1/users/{user_id}/workspaces",
            Call::get("/v1/users/user_a/workspaces"),
            200,
        ),
        (
            "post",
            "/v1/workspaces/{id}/onboarding/{step}",
            Call::post(
                format!("/v1/workspaces/{ws}/onboarding/slack"),
                r#"{"status":"completed"}"#,
            ),
            200,
        ),
        (
            "get",
            "/v1/workspaces/{id}/audit",
            Call::get(format!("/v1/workspaces/{ws}/audit?limit=1")),
            200,
        ),
        (
            "get",
            "/v1/events/{svix_id}",
            Call::get("/v1/events/msg_req"),
            200,
        ),
        (
            "get",
            "/v1/events/{svix_id}",
            Call::get("/v1/events/msg_req_dead"),
            200,
        ),
        (
            "get",
            "/v1/workspaces/{id}",
            Call::get("/v1/workspaces/org_never_seen"),
            404,
        ),
        (
            "get",
            "/v1/workspaces/{id}/members",
            Call::get(format!("/v1/workspaces/{ws}/members?limit=0")),
            400,
        ),
    ];
    for (method, path, call, expected) in cases {
        let (status, answer) = call.send(&app).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        let response = &doc["paths"][path][method]["responses"][status.to_string()];
        let schema = &response["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{method} {path} {status}: no schema");
        check_always_sent(&doc, schema, &answer, &format!("{method} {path} {status}"));
    }
}
