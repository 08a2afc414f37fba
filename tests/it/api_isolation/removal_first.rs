//! Issue 19 item 1: a removal that arrives before its membership (or before its
//! workspace) is recorded by its id, so the late `created` never gives the user
//! access. Each story is applied through the provisioning library on the app's
//! database and read back through the read API: once every event has arrived, the
//! removed user gets 404 on every workspace route, is missing from the member list,
//! the org switcher and the counts, while the member who stays is counted.
//!
//! Also the read side of a removal reconcile infers (items 4 and 5): access goes
//! at once, and comes back when a later snapshot lifts the inference.

use provisioner::provision::{Actor, Incoming, Provisioner};
use serde_json::{Value, json};

use super::{assert_keeper_alone, assert_not_found, routes_of};
use crate::common::api_support::*;
use crate::common::story::{self, Org, person};
use crate::common::*;

const T0: i64 = 1_760_000_000_000;

/// The app and a provisioner applying events to its database one at a time.
struct Story {
    app: TestApp,
    p: Provisioner,
}

impl Story {
    async fn new() -> Self {
        let app = spawn_app().await;
        let p = Provisioner::new(app.settings.provisioning.clone());
        Self { app, p }
    }

    async fn apply(&self, e: story::Event) {
        let incoming: Incoming = e.into();
        let id = incoming.svix_id.clone();
        let result = self
            .p
            .apply_batch(&self.app.db, &[incoming])
            .await
            .remove(0);
        assert!(result.is_ok(), "{id}: {result:?}");
    }

    /// `u` is nobody in `ws` on every route, and `keeper` (an admin) is its only
    /// member.
    async fn assert_locked_out(&self, ws: &str, u: &str, keeper: &str, when: &str) {
        let app = &self.app;
        for member in [keeper, u] {
            for (method, path) in routes_of(ws, member) {
                let (status, body) = raw_request(app, method, &path, Some(u)).await;
                assert_not_found(status, &body, &format!("{when}: U {method} {path}"));
            }
        }
        assert_keeper_alone(app, ws, keeper, u, when).await;
        // Control: the keeper reads the workspace, so the 404s are about U.
        let (status, body) =
            raw_request(app, "GET", &format!("/v1/workspaces/{ws}"), Some(keeper)).await;
        assert_eq!(status, 200, "{when}: keeper {body}");
    }
}

/// The organization `ws` with an admin `keeper` who stays.
async fn workspace_with_keeper(s: &Story, ws: &str, keeper: &str) -> Org {
    let acme = story::org(ws).named("Acme").version(T0);
    s.apply(acme.created(T0)).await;
    s.apply(
        acme.membership(&new_id("orgmem"), &person(keeper, "k"))
            .role("org:admin")
            .created(T0 + 1),
    )
    .await;
    acme
}

/// Leaves only the ids of a removal: no `public_user_data`, organization `{id}`.
fn ids_only(ws: &str) -> impl FnOnce(&mut Value) {
    let ws = ws.to_owned();
    move |d: &mut Value| {
        let id = d["id"].clone();
        *d = json!({ "object": "organization_membership", "id": id, "organization": { "id": ws } });
    }
}

/// A removal without `public_user_data` reaches a known workspace before its
/// membership's `created` (an ordinary Svix retry): U never becomes a member, not
/// even for a moment with the admin role the late `created` carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_removal_before_its_created_keeps_the_user_out() {
    let s = Story::new().await;
    let (ws, u, keeper) = (new_id("org"), "user_gone", "user_keeper");
    let acme = workspace_with_keeper(&s, &ws, keeper).await;
    let mem = acme
        .membership(&new_id("orgmem"), &person(u, "u"))
        .role("org:admin")
        .since(T0 + 10);
    s.apply(mem.deleted(T0 + 10).sent_at(T0 + 20).with(|d| {
        d.as_object_mut().unwrap().remove("public_user_data");
    }))
    .await;
    s.assert_locked_out(&ws, u, keeper, "before the created")
        .await;
    s.apply(mem.created(T0 + 10)).await;
    s.assert_locked_out(&ws, u, keeper, "after the created")
        .await;
}

/// A removal of ids only reaches the service before its workspace is known; the
/// workspace and the membership are provisioned afterwards (organization first,
/// or the membership provisioning it from its embedded organization): U is never
/// a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_before_its_workspace_keeps_the_user_out() {
    for org_first in [true, false] {
        let s = Story::new().await;
        let (ws, u, keeper) = (new_id("org"), "user_gone", "user_keeper");
        let acme = story::org(&ws).named("Acme").version(T0);
        let mem = acme
            .membership(&new_id("orgmem"), &person(u, "u"))
            .role("org:admin")
            .since(T0 + 10);
        s.apply(mem.deleted(T0 + 10).sent_at(T0 + 20).with(ids_only(&ws)))
            .await;
        let keeper_joins = acme
            .membership(&new_id("orgmem"), &person(keeper, "k"))
            .role("org:admin")
            .created(T0 + 1);
        if org_first {
            s.apply(acme.created(T0)).await;
            s.apply(mem.created(T0 + 10)).await;
            s.apply(keeper_joins).await;
        } else {
            s.apply(mem.created(T0 + 10)).await;
            s.apply(keeper_joins).await;
            s.apply(acme.created(T0)).await;
        }
        s.assert_locked_out(&ws, u, keeper, &format!("organization first: {org_first}"))
            .await;
    }
}

/// The stale-row revival through a sparse removal: U is admin via `orgmem_1`, whose
/// removal is delayed; U is re-added as `orgmem_2` and removed again, and that
/// removal (ids only) arrives before `orgmem_2`'s `created`. Once every event has
/// arrived U is nobody, and `orgmem_2` is a removed row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_removal_of_a_readded_member_keeps_the_stale_row_dead() {
    let s = Story::new().await;
    let (ws, u, keeper) = (new_id("org"), "user_stale", "user_keeper");
    let acme = workspace_with_keeper(&s, &ws, keeper).await;
    let (id_1, id_2) = (new_id("orgmem"), new_id("orgmem"));
    let first = acme
        .membership(&id_1, &person(u, "a"))
        .role("org:admin")
        .since(T0 + 10);
    let second = acme
        .membership(&id_2, &person(u, "b"))
        .role("org:admin")
        .since(T0 + 30);
    s.apply(first.created(T0 + 10)).await;
    // orgmem_1 was deleted at T0 + 20; that delivery is delayed.
    s.apply(second.deleted(T0 + 30).sent_at(T0 + 40).with(ids_only(&ws)))
        .await;
    s.apply(second.created(T0 + 30)).await;
    s.apply(first.deleted(T0 + 10).sent_at(T0 + 20)).await;
    s.assert_locked_out(&ws, u, keeper, "every event arrived")
        .await;
    let removed: Option<String> = sqlx::query_scalar(
        "select removal_reason from members where membership_id = $1 and removed_at is not null",
    )
    .bind(&id_2)
    .fetch_optional(&s.app.db)
    .await
    .unwrap();
    assert_eq!(removed.as_deref(), Some("membership_deleted"), "orgmem_2");
}

/// A membership reconcile did not find in Clerk (actor `reconcile`, ids and user
/// only, timestamp now) is removed at once: its user gets 404 on every route and
/// leaves the counts. A later snapshot of the membership (Clerk lists it after all)
/// gives the access back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inferred_removal_takes_access_at_once_and_a_snapshot_gives_it_back() {
    let s = Story::new().await;
    let (ws, u, keeper) = (new_id("org"), "user_inferred", "user_keeper");
    let acme = workspace_with_keeper(&s, &ws, keeper).await;
    let id = new_id("orgmem");
    let mem = acme.membership(&id, &person(u, "u")).since(T0 + 10);
    s.apply(mem.created(T0 + 10)).await;
    let now = chrono::Utc::now().timestamp_millis();
    let removal = story::Event::new(
        "organizationMembership.deleted",
        json!({
            "object": "organization_membership", "id": id,
            "organization": { "object": "organization", "id": ws },
            "public_user_data": { "user_id": u },
        }),
        now,
    )
    .svix(&format!("reconcile_memdel_{id}_{now}"))
    .by(Actor::Reconcile);
    s.apply(removal).await;
    s.assert_locked_out(&ws, u, keeper, "after the inferred removal")
        .await;
    s.apply(mem.updated(T0 + 20)).await;
    let (status, body) = raw_request(&s.app, "GET", &format!("/v1/workspaces/{ws}"), Some(u)).await;
    assert_eq!(status, 200, "restored: {body}");
    assert_eq!(body["member_count"], json!(2));
}
