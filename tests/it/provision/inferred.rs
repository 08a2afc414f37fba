//! Removals reconcile infers (issue 19, the provisioning side of items 4 and 5):
//! `organizationMembership.deleted` and `organization.deleted` applied with actor
//! `reconcile`, shaped as `src/reconcile` builds them (ids only, envelope timestamp
//! = now). They take access away at once but are not tombstones: any real end
//! replaces them whatever the times, and a later snapshot lifts them.

use provisioner::provision::{Actor, Outcome};
use serde_json::{Value, json};
use sqlx::PgPool;

use super::{T0, apply_ok, provisioner};
use crate::common::database::TestDatabase;
use crate::common::rows::*;
use crate::common::story::{Event, Org, org, person, user_deleted};

/// An event made for a story's organization.
type Make = Box<dyn Fn(&Org) -> Event>;

/// Reconcile's clock: well after every Clerk time of these stories.
const NOW: i64 = T0 + 1_000_000;

/// Reconcile's removal of a membership it did not find in Clerk's listing.
fn inferred_removal(ws: &str, membership: &str, user: &str, at: i64) -> Event {
    Event::new(
        "organizationMembership.deleted",
        json!({
            "object": "organization_membership", "id": membership,
            "organization": { "object": "organization", "id": ws },
            "public_user_data": { "user_id": user },
        }),
        at,
    )
    .svix(&format!("reconcile_memdel_{membership}_{at}"))
    .by(Actor::Reconcile)
}

/// Reconcile's deletion of an organization it did not find in Clerk.
fn inferred_deletion(ws: &str, at: i64) -> Event {
    Event::new(
        "organization.deleted",
        json!({ "object": "organization", "id": ws, "deleted": true }),
        at,
    )
    .svix(&format!("reconcile_orgdel_{ws}_{at}"))
    .by(Actor::Reconcile)
}

/// Users who are active members of `ws` (what every read route decides on).
async fn active(db: &PgPool, ws: &str) -> Vec<String> {
    sqlx::query_scalar(
        "select user_id from active_members where workspace_id = $1 order by user_id",
    )
    .bind(ws)
    .fetch_all(db)
    .await
    .unwrap()
}

/// (status, deletion_inferred, deleted_at in ms) of a workspace.
async fn deletion(db: &PgPool, ws: &str) -> (String, bool, Option<i64>) {
    let (status, inferred, at): (String, bool, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as(
            "select status, deletion_inferred, deleted_at from workspaces where id = $1",
        )
        .bind(ws)
        .fetch_one(db)
        .await
        .unwrap();
    (status, inferred, at.map(|t| t.timestamp_millis()))
}

/// (removal reason, removed_at in ms) of a membership.
async fn end(db: &PgPool, membership: &str) -> (Option<String>, Option<i64>) {
    let (reason, at): (Option<String>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("select removal_reason, removed_at from members where membership_id = $1")
            .bind(membership)
            .fetch_one(db)
            .await
            .unwrap();
    (reason, at.map(|t| t.timestamp_millis()))
}

/// The `details` of a workspace's audit rows with `action`, oldest first.
async fn audit_of(db: &PgPool, ws: &str, action: &str) -> Vec<(String, Value)> {
    sqlx::query_as::<_, (String, sqlx::types::Json<Value>)>(
        "select actor, details from audit_log where workspace_id = $1 and action = $2 order by id",
    )
    .bind(ws)
    .bind(action)
    .fetch_all(db)
    .await
    .unwrap()
    .into_iter()
    .map(|(a, d)| (a, d.0))
    .collect()
}

/// Acme with jane (admin) and bob.
async fn acme(db: &PgPool) -> Org {
    let p = provisioner();
    let acme = org("org_a").named("Acme").version(T0);
    apply_ok(&p, db, acme.created(T0).svix("m_org")).await;
    let jane = acme
        .membership("mem_j", &person("user_jane", "j"))
        .role("org:admin");
    apply_ok(&p, db, jane.created(T0).svix("m_jane")).await;
    let bob = acme.membership("mem_b", &person("user_bob", "b"));
    apply_ok(&p, db, bob.created(T0).svix("m_bob")).await;
    acme
}

/// An inferred removal ends the membership at once (`not_in_clerk`, audited by
/// reconcile); a second one, or one of a membership unknown here, changes nothing;
/// a later snapshot of the membership lifts it — a Clerk webhook, or reconcile's
/// own snapshot even of an older version — and is audited `member.restored`.
#[tokio::test]
async fn an_inferred_membership_removal_is_lifted_by_a_later_snapshot() {
    let p = provisioner();
    let lifts: [(&str, Make); 2] = [
        (
            "webhook",
            Box::new(|a: &Org| {
                a.membership("mem_j", &person("user_jane", "j2"))
                    .role("org:admin")
                    .updated(T0 + 10)
                    .svix("m_lift")
            }),
        ),
        (
            "reconcile snapshot",
            Box::new(|a: &Org| {
                a.membership("mem_j", &person("user_jane", "j"))
                    .role("org:admin")
                    .created(T0)
                    .svix("reconcile_mem_mem_j_x")
                    .by(Actor::Reconcile)
            }),
        ),
    ];
    for (what, lift) in lifts {
        let db = TestDatabase::create().await;
        let acme = acme(&db.pool).await;
        let out = apply_ok(
            &p,
            &db.pool,
            inferred_removal("org_a", "mem_j", "user_jane", NOW),
        )
        .await;
        assert_eq!(out, Outcome::Processed);
        assert_eq!(
            end(&db.pool, "mem_j").await,
            (Some("not_in_clerk".into()), Some(NOW))
        );
        assert_eq!(
            active(&db.pool, "org_a").await,
            ["user_bob"],
            "{what}: access gone at once"
        );
        assert_eq!(
            audit_of(&db.pool, "org_a", "member.removed").await,
            [(
                "reconcile".to_owned(),
                json!({ "membership_id": "mem_j", "reason": "not_in_clerk" })
            )]
        );
        let again = inferred_removal("org_a", "mem_j", "user_jane", NOW + 1);
        assert_eq!(apply_ok(&p, &db.pool, again).await, Outcome::Superseded);
        let unknown = inferred_removal("org_a", "mem_x", "user_x", NOW);
        assert_eq!(apply_ok(&p, &db.pool, unknown).await, Outcome::Superseded);
        assert!(member(&db.pool, "mem_x").await.is_none());
        let recorded: i64 = sqlx::query_scalar("select count(*) from membership_removals")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(recorded, 0, "an inference is not Clerk's removal");

        assert_eq!(
            apply_ok(&p, &db.pool, lift(&acme)).await,
            Outcome::Processed
        );
        assert_eq!(end(&db.pool, "mem_j").await, (None, None), "{what}");
        assert_eq!(active(&db.pool, "org_a").await, ["user_bob", "user_jane"]);
        let restored = audit_of(&db.pool, "org_a", "member.restored").await;
        assert_eq!(restored.len(), 1, "{what}");
        assert_eq!(restored[0].1["reason"], "not_in_clerk");
        assert_eq!(member(&db.pool, "mem_j").await.unwrap().role, "admin");
    }
}

/// Every real end — Clerk's removal of the membership (earlier or later than the
/// inference), the user's deletion, the workspace's deletion — replaces an inferred
/// end whatever the times, and is then final: a later snapshot does not lift it.
#[tokio::test]
async fn a_real_end_replaces_an_inferred_one_whatever_the_times() {
    let p = provisioner();
    let ends: [(&str, i64, &str, Make); 4] = [
        (
            "removal before the inference",
            T0 + 20,
            "membership_deleted",
            Box::new(|a: &Org| {
                a.membership("mem_j", &person("user_jane", "j"))
                    .deleted(T0)
                    .sent_at(T0 + 20)
            }),
        ),
        (
            "removal after the inference",
            NOW + 20,
            "membership_deleted",
            Box::new(|a: &Org| {
                a.membership("mem_j", &person("user_jane", "j"))
                    .deleted(T0)
                    .sent_at(NOW + 20)
                    .with(|d| *d = json!({ "id": "mem_j", "organization": { "id": "org_a" } }))
            }),
        ),
        (
            "user deleted",
            NOW + 30,
            "user_deleted",
            Box::new(|_: &Org| user_deleted("user_jane", NOW + 30)),
        ),
        (
            "workspace deleted",
            T0 + 40,
            "workspace_deleted",
            Box::new(|a: &Org| a.deleted(T0 + 40)),
        ),
    ];
    for (what, at, reason, real) in ends {
        let db = TestDatabase::create().await;
        let acme = acme(&db.pool).await;
        apply_ok(
            &p,
            &db.pool,
            inferred_removal("org_a", "mem_j", "user_jane", NOW),
        )
        .await;
        assert_eq!(
            apply_ok(&p, &db.pool, real(&acme)).await,
            Outcome::Processed,
            "{what}"
        );
        assert_eq!(
            end(&db.pool, "mem_j").await,
            (Some(reason.into()), Some(at)),
            "{what}"
        );
        // One member.removed of jane: the inference's; the real end of a removed
        // row is not a removal of a member.
        let of_jane = audit_of(&db.pool, "org_a", "member.removed")
            .await
            .into_iter()
            .filter(|(_, d)| d["membership_id"] == "mem_j")
            .count();
        assert_eq!(of_jane, 1, "{what}");
        let late = acme
            .membership("mem_j", &person("user_jane", "j"))
            .updated(T0 + 50);
        apply_ok(&p, &db.pool, late).await;
        assert_eq!(
            end(&db.pool, "mem_j").await,
            (Some(reason.into()), Some(at)),
            "{what}: final"
        );
        assert!(
            !active(&db.pool, "org_a")
                .await
                .contains(&"user_jane".to_owned())
        );
    }
}

/// An inferred deletion of a workspace makes it `deleted` at once and ends its
/// active memberships (`workspace_not_in_clerk`); a later snapshot of the
/// organization — its own, or embedded in a membership — makes it active again and
/// restores exactly those memberships (not one reconcile removed on its own
/// inference before), audited `workspace.restored` and `member.restored`.
#[tokio::test]
async fn an_inferred_workspace_deletion_is_lifted_by_a_later_snapshot() {
    let p = provisioner();
    for embedded in [false, true] {
        let db = TestDatabase::create().await;
        let acme = acme(&db.pool).await;
        apply_ok(
            &p,
            &db.pool,
            inferred_removal("org_a", "mem_b", "user_bob", NOW),
        )
        .await;
        let out = apply_ok(&p, &db.pool, inferred_deletion("org_a", NOW + 1)).await;
        assert_eq!(out, Outcome::Processed);
        assert_eq!(
            deletion(&db.pool, "org_a").await,
            ("deleted".into(), true, Some(NOW + 1))
        );
        assert_eq!(
            end(&db.pool, "mem_j").await,
            (Some("workspace_not_in_clerk".into()), Some(NOW + 1))
        );
        assert!(active(&db.pool, "org_a").await.is_empty());
        let deleted = audit_of(&db.pool, "org_a", "workspace.deleted").await;
        assert_eq!(deleted[0].0, "reconcile");
        assert_eq!(deleted[0].1["reason"], "not_in_clerk");
        assert_eq!(
            apply_ok(&p, &db.pool, inferred_deletion("org_a", NOW + 2)).await,
            Outcome::Superseded
        );

        let snapshot = if embedded {
            acme.membership("mem_k", &person("user_kim", "k"))
                .created(T0 + 10)
                .svix("m_kim")
        } else {
            acme.clone()
                .named("Acme Inc")
                .updated(T0 + 10)
                .svix("m_renamed")
        };
        assert_eq!(apply_ok(&p, &db.pool, snapshot).await, Outcome::Processed);
        assert_eq!(
            deletion(&db.pool, "org_a").await,
            ("active".into(), false, None)
        );
        assert_eq!(end(&db.pool, "mem_j").await, (None, None));
        assert_eq!(
            end(&db.pool, "mem_b").await,
            (Some("not_in_clerk".into()), Some(NOW)),
            "bob's own inference stands"
        );
        let mut expected = vec!["user_jane".to_owned()];
        if embedded {
            expected.push("user_kim".to_owned());
        }
        assert_eq!(active(&db.pool, "org_a").await, expected);
        assert_eq!(
            audit_of(&db.pool, "org_a", "workspace.restored")
                .await
                .len(),
            1
        );
        let restored = audit_of(&db.pool, "org_a", "member.restored").await;
        assert_eq!(
            restored,
            [(
                "clerk".to_owned(),
                json!({ "membership_id": "mem_j", "reason": "workspace_not_in_clerk" })
            )]
        );
    }
}

/// Clerk's deletion of a workspace replaces an inferred one whatever the times
/// (its time, not reconcile's, and not inferred any more), its members end as
/// `workspace_deleted`, and it is final: a later snapshot leaves it deleted.
#[tokio::test]
async fn a_real_workspace_deletion_replaces_an_inferred_one() {
    let p = provisioner();
    let db = TestDatabase::create().await;
    let acme = acme(&db.pool).await;
    apply_ok(&p, &db.pool, inferred_deletion("org_a", NOW)).await;
    assert_eq!(
        apply_ok(&p, &db.pool, acme.deleted(NOW + 50).svix("m_del")).await,
        Outcome::Processed
    );
    assert_eq!(
        deletion(&db.pool, "org_a").await,
        ("deleted".into(), false, Some(NOW + 50))
    );
    assert_eq!(
        end(&db.pool, "mem_j").await,
        (Some("workspace_deleted".into()), Some(NOW + 50))
    );
    apply_ok(&p, &db.pool, acme.clone().named("Back").updated(T0 + 10)).await;
    assert_eq!(deletion(&db.pool, "org_a").await.0, "deleted");
    assert_eq!(
        end(&db.pool, "mem_j").await.0.as_deref(),
        Some("workspace_deleted")
    );
    assert!(
        audit_of(&db.pool, "org_a", "workspace.restored")
            .await
            .is_empty()
    );
    // An inference never touches what Clerk deleted.
    assert_eq!(
        apply_ok(&p, &db.pool, inferred_deletion("org_a", NOW + 100)).await,
        Outcome::Superseded
    );
    assert_eq!(
        apply_ok(
            &p,
            &db.pool,
            inferred_removal("org_a", "mem_j", "user_jane", NOW + 100)
        )
        .await,
        Outcome::Superseded
    );
}
