//! Issue 19 item 1 at the row level: every real removal is recorded by its
//! membership id whatever else is known, and every path that writes a membership
//! row (one event at a time, or a batch deciding on its prefetched state) takes
//! its end from that record.

use provisioner::provision::{Incoming, Outcome};
use serde_json::json;

use super::{T0, apply_ok, provisioner, rows_after};
use crate::common::database::TestDatabase;
use crate::common::rows::*;
use crate::common::story::{org, person};

/// A removal of ids only (no `public_user_data`, organization `{id}`) of a
/// membership whose workspace is unknown is processed and recorded; the workspace
/// and membership provisioned afterwards, in one deferring batch or one by one,
/// end with the membership removed since the removal's time and no access audited.
#[tokio::test]
async fn a_recorded_removal_ends_a_membership_provisioned_later_in_a_batch() {
    let acme = org("org_a").named("Acme").version(T0);
    let mem = acme
        .membership("mem_1", &person("user_jane", "j"))
        .role("org:admin")
        .since(T0 + 10);
    let removal = mem
        .deleted(T0 + 10)
        .sent_at(T0 + 20)
        .svix("m_del")
        .with(|d| *d = json!({ "id": "mem_1", "organization": { "id": "org_a" } }));
    let later: Vec<Incoming> = vec![
        acme.created(T0).svix("m_org").into(),
        mem.created(T0 + 10).svix("m_mem").into(),
    ];
    let p = provisioner();
    let mut seen = Vec::new();
    for together in [true, false] {
        let db = TestDatabase::create().await;
        assert_eq!(
            apply_ok(&p, &db.pool, removal.clone()).await,
            Outcome::Processed
        );
        assert_eq!(
            event_status(&db.pool, "m_del").await.unwrap().0,
            "processed"
        );
        let recorded: i64 = sqlx::query_scalar(
            "select count(*) from membership_removals \
             where membership_id = 'mem_1' and workspace_id = 'org_a' and user_id is null",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(recorded, 1, "the removal is recorded by its ids");
        if together {
            for r in p.apply_batch(&db.pool, &later).await {
                assert_eq!(r.unwrap(), Outcome::Processed);
            }
        } else {
            for e in &later {
                assert_eq!(apply_ok(&p, &db.pool, e.clone()).await, Outcome::Processed);
            }
        }
        let m = member(&db.pool, "mem_1").await.unwrap();
        assert!(m.removed, "together: {together}");
        assert_eq!(m.removal_reason.as_deref(), Some("membership_deleted"));
        assert_eq!(
            (m.role.as_str(), m.clerk_role.as_str()),
            ("admin", "org:admin")
        );
        assert_eq!(
            audit_actions(&db.pool, "org_a").await,
            ["workspace.provisioned"],
            "never a member, so never audited as one"
        );
        seen.push(state_rows(&db.pool).await);
    }
    assert_eq!(seen[0], seen[1], "batched and one by one");
}

/// A removal that names its user but not a known workspace stores the membership
/// as a removed row at once (its workspace may be unknown), and the row is the
/// same whichever of the removals and the snapshot arrive first, down to
/// `joined_at` and the end when the removal is sent twice.
#[tokio::test]
async fn removals_and_their_snapshot_converge_in_any_order() {
    let acme = org("org_a").named("Acme").version(T0);
    let jane = acme
        .membership("mem_j", &person("user_jane", "j"))
        .since(T0 + 10);
    let ids = |user: bool| {
        move |d: &mut serde_json::Value| {
            let mut sparse = json!({ "id": "mem_j", "organization": { "id": "org_a" } });
            if user {
                sparse["public_user_data"] = json!({ "user_id": "user_jane" });
            }
            *d = sparse;
        }
    };
    let events = [
        jane.deleted(T0 + 10)
            .sent_at(T0 + 40)
            .svix("m4")
            .with(ids(true)),
        jane.deleted(T0 + 10)
            .sent_at(T0 + 30)
            .svix("m3")
            .with(ids(false)),
        jane.deleted(T0 + 10)
            .sent_at(T0 + 50)
            .svix("m5")
            .with(ids(true)),
        acme.created(T0).svix("m1"),
        jane.created(T0 + 10).svix("m2"),
    ];
    // Before the snapshot: one removed row holding no snapshot, joined at the
    // earliest removal, whichever removal came first.
    let only_removals = rows_after(&events[..3]).await;
    let mut reversed = events[..3].to_vec();
    reversed.reverse();
    assert_eq!(rows_after(&reversed).await, only_removals);
    let row = &only_removals["members/mem_j"];
    assert_eq!(
        (
            &row["workspace_id"],
            &row["source_version"],
            &row["removal_reason"]
        ),
        (&json!("org_a"), &json!(0), &json!("membership_deleted"))
    );
    assert_eq!(row["joined_at"], row["removed_at"]);
    assert!(
        !only_removals.contains_key("workspaces/org_a"),
        "no workspace from a removal"
    );
    // Every event: the same rows in every order tried.
    let forward = rows_after(&events).await;
    let mut backward = events.to_vec();
    backward.reverse();
    assert_eq!(rows_after(&backward).await, forward);
    let mut snapshot_first = events.to_vec();
    snapshot_first.rotate_left(3);
    assert_eq!(rows_after(&snapshot_first).await, forward);
    let row = &forward["members/mem_j"];
    assert_eq!(row["removal_reason"], json!("membership_deleted"));
    assert_eq!(row["source_event"], json!("m2"));
}
