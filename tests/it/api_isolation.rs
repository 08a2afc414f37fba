//! Read API isolation (DESIGN §6): with `X-Acting-User` there is no path from one
//! workspace to another. Members and admins of workspace B, removed members and
//! members of deleted workspaces try every workspace route of A — by id, by a
//! case-changed id, by encoded and odd ids — and each gets the same 404 as an id
//! that never existed, so existence does not leak.

mod removal_first;

use crate::common;
use crate::common::api_support::*;
use crate::common::*;
use serde_json::{Value, json};

/// Two active workspaces, a deleted one, and users in every relation to A.
struct World {
    app: TestApp,
    seed: Seed,
    a: String,
    b: String,
    /// Deleted, memberships ended (the worker's cascade done).
    deleted: String,
    /// Deleted, memberships not ended yet (the cascade still to come).
    deleted_late: String,
}

const A_ADMIN: &str = "user_a_admin";
const A_MEMBER: &str = "user_a_member";
const B_ADMIN: &str = "user_b_admin";
const B_MEMBER: &str = "user_b_member";
const REMOVED: &str = "user_removed";
const READDED: &str = "user_readded";
const OF_DELETED: &str = "user_of_deleted";
const OF_DELETED_UNCASCADED: &str = "user_of_deleted_uncascaded";

async fn world() -> World {
    let app = spawn_app().await;
    let seed = Seed::new(&app);
    let (a, b, deleted) = (new_id("org"), new_id("org"), new_id("org"));
    let deleted_late = new_id("org");
    for ws in [&a, &b, &deleted, &deleted_late] {
        seed.workspace(ws).await;
    }
    seed.member(&a, A_ADMIN, "org:admin").await;
    seed.member(&a, A_MEMBER, "org:member").await;
    seed.member(&b, B_ADMIN, "org:admin").await;
    seed.member(&b, B_MEMBER, "org:member").await;
    let m = seed.member(&a, REMOVED, "org:admin").await;
    seed.remove_membership(&m).await;
    seed.member(&b, REMOVED, "org:member").await;
    // Removed, then re-added under a new membership id: a member again.
    let m = seed.member(&a, READDED, "org:member").await;
    seed.remove_membership(&m).await;
    seed.member(&a, READDED, "org:member").await;
    seed.member(&deleted, OF_DELETED, "org:admin").await;
    seed.delete_workspace(&deleted, true).await;
    // A deletion whose membership cascade has not been applied yet.
    seed.member(&deleted_late, OF_DELETED_UNCASCADED, "org:admin")
        .await;
    seed.delete_workspace(&deleted_late, false).await;
    seed.event("msg_a", "organization.updated", Some(&a), "processed", None)
        .await;
    seed.event("msg_none", "user.updated", None, "processed", None)
        .await;
    World {
        app,
        seed,
        a,
        b,
        deleted,
        deleted_late,
    }
}

impl World {
    /// Every workspace route of `ws` as (method, path).
    fn routes(&self, ws: &str) -> Vec<(&'static str, String)> {
        vec![
            ("GET", format!("/v1/workspaces/{ws}")),
            ("GET", format!("/v1/workspaces/{ws}/members")),
            ("GET", format!("/v1/workspaces/{ws}/members/{A_ADMIN}")),
            ("GET", format!("/v1/workspaces/{ws}/audit")),
            ("POST", format!("/v1/workspaces/{ws}/onboarding/gong")),
        ]
    }

    async fn call(&self, method: &str, path: &str, acting: Option<&str>) -> (u16, Value) {
        raw_request(&self.app, method, path, acting).await
    }
}

fn assert_not_found(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 404, "{what}");
    assert_eq!(body["error"]["code"], "not_found", "{what}: {body}");
}

/// The same 404 body for a hidden workspace as for one that never existed.
fn hidden_like_missing(hidden: &Value, missing: &Value, what: &str) {
    assert_eq!(
        hidden, missing,
        "{what}: the answer must not tell hidden from missing"
    );
}

/// Members and admins of B get 404 on every route of A — the same answer as for a
/// workspace that does not exist — and their onboarding writes change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_another_workspace_get_404_everywhere() {
    let w = world().await;
    let missing = "org_doesnotexist";
    for user in [B_MEMBER, B_ADMIN] {
        for ((method, path), (_, missing_path)) in w.routes(&w.a).into_iter().zip(w.routes(missing))
        {
            let what = format!("{user} {method} {path}");
            let (status, body) = w.call(method, &path, Some(user)).await;
            assert_not_found(status, &body, &what);
            let (_, missing_body) = w.call(method, &missing_path, Some(user)).await;
            hidden_like_missing(&body, &missing_body, &what);
        }
        let (status, body) = w.call("GET", "/v1/events/msg_a", Some(user)).await;
        assert_not_found(status, &body, &format!("{user} event of A"));
    }
    assert!(
        w.seed
            .audit_rows(&w.a, "onboarding.step_updated")
            .await
            .is_empty()
    );

    // Control: the same requests by A's own admin succeed, so the 404s above are
    // about who asks, not about the requests.
    for (method, path) in w.routes(&w.a) {
        let (status, body) = w.call(method, &path, Some(A_ADMIN)).await;
        assert_eq!(status, 200, "{method} {path}: {body}");
    }
    let (status, _) = w.call("GET", "/v1/events/msg_a", Some(A_MEMBER)).await;
    assert_eq!(status, 200);
    // An event about no workspace is only for the trusted caller.
    let (status, _) = w.call("GET", "/v1/events/msg_none", Some(A_ADMIN)).await;
    assert_eq!(status, 404);
    let (status, _) = w.call("GET", "/v1/events/msg_none", None).await;
    assert_eq!(status, 200);
}

/// A member of B cannot reach A through a case-changed workspace id, and case
/// changes of A's id or of the acting user id match nothing even for A's members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_changed_ids_match_nothing() {
    let w = world().await;
    let upper = w.a.to_uppercase();
    let capital = format!("O{}", &w.a[1..]);
    for id in [&upper, &capital] {
        for (method, path) in w.routes(id) {
            for acting in [Some(B_MEMBER), Some(A_ADMIN), None] {
                let (status, body) = w.call(method, &path, acting).await;
                assert_not_found(status, &body, &format!("{acting:?} {method} {path}"));
            }
        }
    }
    for acting in ["USER_A_ADMIN", "User_a_admin", "user_a_admiN"] {
        for (method, path) in w.routes(&w.a) {
            let (status, body) = w.call(method, &path, Some(acting)).await;
            assert_not_found(status, &body, &format!("{acting} {method} {path}"));
        }
    }
    let (status, body) = w
        .call(
            "GET",
            &format!("/v1/workspaces/{}/members/USER_A_ADMIN", w.a),
            Some(A_ADMIN),
        )
        .await;
    assert_not_found(status, &body, "case-changed member id");
}

/// Encoded and odd ids — dot segments, encoded slashes, trailing slashes, NULs,
/// unicode look-alikes, invalid UTF-8, huge ids — are 404 for a member of B, and
/// never resolve to A even for the trusted caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_and_odd_ids_are_404() {
    let w = world().await;
    let a = &w.a;
    let b = &w.b;
    let long = "a".repeat(5000);
    let odd: Vec<String> = vec![
        "%2e%2e".into(),
        "%2E%2E".into(),
        "..".into(),
        ".".into(),
        format!("{b}%2F..%2F{a}"),
        format!("{b}%2f..%2f{a}"),
        format!("..%2F{a}"),
        format!("{a}%00"),
        format!("{a}%0A"),
        format!("{a}%20"),
        format!("%20{a}"),
        format!("{a}%FF"),
        format!("{a}%"),
        format!("{a};"),
        format!("{a}%3B"),
        format!("{a}%C3%A9"),
        // Fullwidth "ｏｒｇ" and a combining accent: unicode look-alikes of A.
        format!("%EF%BD%8F%EF%BD%92%EF%BD%87{}", &a[3..]),
        format!("{a}%CC%81"),
        format!("{a}'%20or%20'1'='1"),
        "%25".into(),
        "*".into(),
        long,
    ];
    for id in &odd {
        for (method, path) in w.routes(id) {
            for acting in [Some(B_MEMBER), Some(B_ADMIN), None] {
                let (status, body) = w.call(method, &path, acting).await;
                let shown = &path[..path.len().min(120)];
                assert_not_found(status, &body, &format!("{acting:?} {method} {shown}"));
            }
        }
    }
    // Paths that leave or bend the route shape.
    let bent = [
        format!("/v1/workspaces/{a}/"),
        format!("/v1/workspaces/{a}/members/"),
        format!("/v1/workspaces/{a}//members"),
        format!("/v1/workspaces//{a}"),
        format!("/v1/workspaces/{b}/../{a}"),
        format!("/v1/workspaces/{b}/members/../../{a}"),
        format!("/v1/workspaces/{b}/members/..%2F..%2F{a}"),
        format!("/v1/workspaces/{b}%2Fmembers"),
        format!("/v1/workspaces/{a}%2Fmembers"),
        format!("/v1//workspaces/{a}"),
        format!("/v1/workspaces/{a}/audit/"),
        format!("/v1/workspaces/{a}/onboarding/gong/"),
        format!("/v1/users/{B_MEMBER}/../../workspaces/{a}"),
    ];
    for path in &bent {
        for acting in [Some(B_MEMBER), Some(B_ADMIN)] {
            let (status, body) = w.call("GET", path, acting).await;
            assert_not_found(status, &body, &format!("{acting:?} GET {path}"));
        }
    }
    let (status, body) = w
        .call(
            "POST",
            &format!("/v1/workspaces/{a}/onboarding/gong/"),
            Some(B_ADMIN),
        )
        .await;
    assert_not_found(status, &body, "POST with trailing slash");
    assert!(
        w.seed
            .audit_rows(a, "onboarding.step_updated")
            .await
            .is_empty()
    );
}

/// A removed member gets 404 on every route of the workspace they left (and still
/// reads the workspace they remain in); a re-added member is a member again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_member_gets_404() {
    let w = world().await;
    for (method, path) in w.routes(&w.a) {
        let (status, body) = w.call(method, &path, Some(REMOVED)).await;
        assert_not_found(status, &body, &format!("removed {method} {path}"));
    }
    let (status, _) = w
        .call("GET", &format!("/v1/workspaces/{}", w.b), Some(REMOVED))
        .await;
    assert_eq!(status, 200);
    let (status, _) = w
        .call("GET", &format!("/v1/workspaces/{}", w.a), Some(READDED))
        .await;
    assert_eq!(status, 200);
    // The removed user is not listed as a member of A either.
    let (status, body) = w
        .call(
            "GET",
            &format!("/v1/workspaces/{}/members/{REMOVED}", w.a),
            None,
        )
        .await;
    assert_not_found(status, &body, "removed member lookup");
}

/// Members of a deleted workspace get 404 on all its routes — whether or not the
/// worker has ended their memberships yet — while the trusted caller still reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_deleted_workspace_get_404() {
    let w = world().await;
    for (ws, user) in [
        (&w.deleted, OF_DELETED),
        (&w.deleted_late, OF_DELETED_UNCASCADED),
    ] {
        for (method, path) in w.routes(ws) {
            let (status, body) = w.call(method, &path, Some(user)).await;
            assert_not_found(status, &body, &format!("{user} {method} {path}"));
        }
        let (status, body) = w.call("GET", &format!("/v1/workspaces/{ws}"), None).await;
        assert_eq!(status, 200);
        assert_eq!(body["status"], "deleted");
    }
}

/// The org switcher hides removed memberships and deleted workspaces, and one
/// user cannot list another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_workspace_list_hides_what_the_user_may_not_see() {
    let w = world().await;
    let list = |user: &'static str, acting: Option<&'static str>| {
        let w = &w;
        async move {
            w.call("GET", &format!("/v1/users/{user}/workspaces"), acting)
                .await
        }
    };
    let ids = |body: &Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["workspace_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, body) = list(REMOVED, Some(REMOVED)).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&body), [w.b.as_str()], "removed from A, still in B");
    let (_, body) = list(OF_DELETED, None).await;
    assert_eq!(body, json!({"data": [], "next": null}));
    let (_, body) = list(OF_DELETED_UNCASCADED, None).await;
    assert_eq!(body, json!({"data": [], "next": null}));
    let (_, body) = list(READDED, None).await;
    assert_eq!(ids(&body), [w.a.as_str()]);
    for (user, acting) in [
        (A_ADMIN, B_MEMBER),
        (B_MEMBER, A_ADMIN),
        (A_MEMBER, "USER_A_MEMBER"),
    ] {
        let (status, body) = list(user, Some(acting)).await;
        assert_not_found(status, &body, &format!("{acting} listing {user}"));
    }
}

/// Every route a user's `X-Acting-User` can reach about workspace `ws`, with the
/// member lookup naming `member`.
fn routes_of(ws: &str, member: &str) -> Vec<(&'static str, String)> {
    vec![
        ("GET", format!("/v1/workspaces/{ws}")),
        ("GET", format!("/v1/workspaces/{ws}/members")),
        ("GET", format!("/v1/workspaces/{ws}/members/{member}")),
        ("GET", format!("/v1/workspaces/{ws}/audit")),
        ("POST", format!("/v1/workspaces/{ws}/onboarding/gong")),
    ]
}

/// Issue 9 item 1: a stale membership row never revives a removed user's access.
/// U is admin through `orgmem_1`; the delivery of `orgmem_1`'s deletion is delayed;
/// U is re-added as `orgmem_2` (admin again) and removed, and that removal is
/// applied. The only non-removed row left is `orgmem_1`, but U's newest row is the
/// removed `orgmem_2`: every route answers U like a stranger (404, the onboarding
/// write refused), the org switcher and the counts leave U out — before the delayed
/// deletion arrives, and unchanged after it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_membership_row_does_not_revive_access() {
    use common::story::{self, person};
    use provisioner::provision::{Incoming, Provisioner};

    const T0: i64 = 1_760_000_000_000;
    let app = spawn_app().await;
    let p = Provisioner::new(app.settings.provisioning.clone());
    let apply = |e: story::Event| {
        let (p, db) = (p.clone(), app.db.clone());
        async move {
            let incoming: Incoming = e.into();
            p.apply_batch(&db, &[incoming])
                .await
                .remove(0)
                .expect("applies")
        }
    };
    let ws = new_id("org");
    let u = "user_stale";
    let keeper = "user_keeper";
    let acme = story::org(&ws).named("Acme").version(T0);
    let first = acme
        .membership("orgmem_1", &person(u, "a"))
        .role("org:admin")
        .since(T0 + 10);
    let second = acme
        .membership("orgmem_2", &person(u, "b"))
        .role("org:admin")
        .since(T0 + 30);
    let ws_event = new_id("msg");
    apply(acme.created(T0).svix(&ws_event)).await;
    apply(
        acme.membership("orgmem_k", &person(keeper, "k"))
            .role("org:admin")
            .created(T0 + 5),
    )
    .await;
    apply(first.created(T0 + 10)).await;
    // Control: through orgmem_1, U is an admin on every route.
    for (method, path) in routes_of(&ws, keeper) {
        let (status, body) = raw_request(&app, method, &path, Some(u)).await;
        assert_eq!(status, 200, "U as admin: {method} {path}: {body}");
    }
    // orgmem_1 is deleted at T0 + 20, but that delivery is delayed; U is re-added
    // and removed again, and that removal is applied.
    let delayed = first.deleted(T0 + 10).sent_at(T0 + 20);
    apply(second.created(T0 + 30)).await;
    apply(second.deleted(T0 + 30).sent_at(T0 + 40)).await;
    let step_before = onboarding_step(&app, &ws, "gong").await;
    let seed = Seed::new(&app);
    let writes_before = seed.audit_rows(&ws, "onboarding.step_updated").await;

    for phase in ["before the delayed deletion", "after the delayed deletion"] {
        for member in [keeper, u] {
            for (method, path) in routes_of(&ws, member) {
                let what = format!("U {phase}: {method} {path}");
                let (status, body) = raw_request(&app, method, &path, Some(u)).await;
                assert_not_found(status, &body, &what);
            }
        }
        let (status, body) =
            raw_request(&app, "GET", &format!("/v1/events/{ws_event}"), Some(u)).await;
        assert_not_found(status, &body, &format!("U {phase}: event of the workspace"));
        assert_keeper_alone(&app, &ws, keeper, u, phase).await;
        // U's onboarding writes changed nothing.
        assert_eq!(
            onboarding_step(&app, &ws, "gong").await,
            step_before,
            "{phase}"
        );
        assert_eq!(
            seed.audit_rows(&ws, "onboarding.step_updated").await,
            writes_before,
            "{phase}"
        );
        if phase.starts_with("before") {
            apply(delayed.clone()).await;
        }
    }
}

/// After `u` left workspace `ws`: `u`'s org switcher leaves it out, and the
/// trusted caller sees `keeper` alone in its counts and member list, `u` as no
/// member.
async fn assert_keeper_alone(app: &TestApp, ws: &str, keeper: &str, u: &str, when: &str) {
    let (status, body) =
        raw_request(app, "GET", &format!("/v1/users/{u}/workspaces"), Some(u)).await;
    assert_eq!(status, 200, "{when}: {body}");
    assert_eq!(
        body,
        json!({"data": [], "next": null}),
        "{when}: U's workspaces"
    );
    let (status, body) = raw_request(app, "GET", &format!("/v1/workspaces/{ws}"), None).await;
    assert_eq!(status, 200, "{when}: {body}");
    assert_eq!(
        (&body["member_count"], &body["admin_count"]),
        (&json!(1), &json!(1)),
        "{when}: counts {body}"
    );
    let (_, body) = raw_request(app, "GET", &format!("/v1/workspaces/{ws}/members"), None).await;
    let users: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, [keeper], "{when}: members");
    let (status, body) = raw_request(
        app,
        "GET",
        &format!("/v1/workspaces/{ws}/members/{u}"),
        None,
    )
    .await;
    assert_not_found(status, &body, &format!("{when}: U as a member"));
}

/// (status, updated_at) of an onboarding step.
async fn onboarding_step(
    app: &TestApp,
    ws: &str,
    step: &str,
) -> (String, chrono::DateTime<chrono::Utc>) {
    sqlx::query_as(
        "select status, updated_at from onboarding_steps where workspace_id = $1 and name = $2",
    )
    .bind(ws)
    .bind(step)
    .fetch_one(&app.db)
    .await
    .unwrap()
}
