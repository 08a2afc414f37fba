//! Issue 19 item 13: only active membership rows follow `user.updated`. A removed
//! row shows the standing source among its membership's own snapshot and the
//! user's snapshots not after its end, whatever the order the end and the user's
//! updates arrive in.

use std::collections::BTreeMap;

use provisioner::provision::Incoming;
use serde_json::{Value, json};

use super::{T0, apply_all, provisioner};
use crate::common::database::TestDatabase;
use crate::common::rows::*;
use crate::common::story::{Event, org, person, user_updated};

/// Every rotation of `events` and of their reverse (each event first and last,
/// before and after each other one), applied one by one on one database emptied
/// between orders, leaves the rows of the first order; returns them.
async fn same_rows_in_many_orders(events: &[Event]) -> BTreeMap<String, Value> {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let mut reversed = events.to_vec();
    reversed.reverse();
    let mut first: Option<BTreeMap<String, Value>> = None;
    for base in [events.to_vec(), reversed] {
        for k in 0..base.len() {
            let mut order = base.clone();
            order.rotate_left(k);
            sqlx::query(
                "truncate workspaces, workspace_quotas, onboarding_steps, members, users, \
                   audit_log, events, membership_removals, user_profiles",
            )
            .execute(&db.pool)
            .await
            .unwrap();
            let svix: Vec<String> = order
                .iter()
                .map(|e| Incoming::from(e.clone()).svix_id)
                .collect();
            apply_all(&p, &db.pool, order).await;
            let rows = state_rows(&db.pool).await;
            match &first {
                None => first = Some(rows),
                Some(first) => assert_eq!(&rows, first, "order {svix:?}"),
            }
        }
    }
    first.expect("some events")
}

/// A user who left workspace A and stays in B changes their names and email: B's
/// row follows (audited `member.updated` in B), A's row keeps what it showed when
/// the user left (no audit in A).
#[tokio::test]
async fn a_departed_users_new_details_reach_only_active_rows() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = person("user_jane", "old");
    let (org_a, org_b) = (org("org_a").version(T0), org("org_b").version(T0));
    apply_all(
        &p,
        &db.pool,
        [
            org_a.membership("mem_a", &jane).created(T0).svix("m1"),
            org_b.membership("mem_b", &jane).created(T0).svix("m2"),
            org_a
                .membership("mem_a", &jane)
                .deleted(T0)
                .sent_at(T0 + 10)
                .svix("m3"),
            user_updated(&person("user_jane", "new"), T0 + 20).svix("m4"),
        ],
    )
    .await;
    let a = member(&db.pool, "mem_a").await.unwrap();
    let b = member(&db.pool, "mem_b").await.unwrap();
    assert!(a.removed);
    assert_eq!(
        (a.email.as_deref(), a.first_name.as_deref()),
        (Some("user_jane.old@example.com"), Some("Firstold")),
        "the former workspace keeps what it knew"
    );
    assert_eq!(
        (b.email.as_deref(), b.first_name.as_deref()),
        (Some("user_jane.new@example.com"), Some("Firstnew"))
    );
    assert_eq!(
        audit_actions(&db.pool, "org_a").await.last().unwrap(),
        "member.removed"
    );
    assert_eq!(
        audit_actions(&db.pool, "org_b").await.last().unwrap(),
        "member.updated"
    );
}

/// The user's updates before and after a membership's end, and the end, in many
/// orders: the removed row shows the last update not after its end (or the
/// membership's own snapshot), whether the end came from the membership's removal
/// (full, or ids only), or from its workspace's deletion; the active row elsewhere
/// shows the newest update.
#[tokio::test]
async fn a_removed_row_falls_back_to_the_best_source_not_after_its_end() {
    let jane = |tag: &str| person("user_jane", tag);
    let (org_a, org_b) = (org("org_a").version(T0), org("org_b").version(T0));
    let mem_a = org_a.membership("mem_a", &jane("snap"));
    let endings = [
        ("removal", mem_a.deleted(T0).sent_at(T0 + 10)),
        (
            "removal of ids only",
            mem_a
                .deleted(T0)
                .sent_at(T0 + 10)
                .with(|d| *d = json!({ "id": "mem_a", "organization": { "id": "org_a" } })),
        ),
        ("workspace deletion", org_a.deleted(T0 + 10)),
    ];
    for (what, end) in endings {
        let events = [
            mem_a.created(T0).svix("m1"),
            org_b
                .membership("mem_b", &jane("snap"))
                .created(T0)
                .svix("m2"),
            user_updated(&jane("before"), T0 + 5).svix("m3"),
            user_updated(&jane("after"), T0 + 20).svix("m4"),
            end.svix("m5"),
        ];
        let rows = same_rows_in_many_orders(&events).await;
        let a = &rows["members/mem_a"];
        assert_eq!(
            (&a["email"], &a["profile_event"], &a["snapshot_email"]),
            (
                &json!("user_jane.before@example.com"),
                &json!("m3"),
                &json!("user_jane.snap@example.com")
            ),
            "{what}"
        );
        assert_eq!(
            rows["members/mem_b"]["email"],
            json!("user_jane.after@example.com"),
            "{what}"
        );
    }
    // Without an update before the end, the membership's own snapshot stands.
    let events = [
        mem_a.created(T0).svix("m1"),
        user_updated(&jane("after"), T0 + 20).svix("m4"),
        mem_a.deleted(T0).sent_at(T0 + 10).svix("m5"),
    ];
    let rows = same_rows_in_many_orders(&events).await;
    let a = &rows["members/mem_a"];
    assert_eq!(
        (&a["email"], &a["profile_event"]),
        (&json!("user_jane.snap@example.com"), &json!("m1"))
    );
}
