//! Provisioning semantics (DESIGN §5) against a real PostgreSQL: every row of the
//! event table, plans and quotas, roles, tombstones, deduplication, audit rows,
//! malformed payloads and batches with a poisoned event.

mod display;
mod inferred;
mod races;
mod removals;

use crate::common;
use crate::common::database::TestDatabase;
use crate::common::rows::*;
use crate::common::story::{self, Event, Org, org, person, user_deleted, user_updated};
use provisioner::config::Settings;
use provisioner::provision::{Actor, Incoming, Outcome, ProcessError, Provisioner};
use serde_json::{Value, json};
use sqlx::PgPool;

const T0: i64 = 1_750_000_000_000;

fn provisioner_with(extra: &str) -> Provisioner {
    let settings = Settings::from_sources(Some(extra), |_| None).expect("valid settings");
    Provisioner::new(settings.provisioning)
}

fn provisioner() -> Provisioner {
    provisioner_with("")
}

async fn apply_one(
    p: &Provisioner,
    db: &PgPool,
    e: impl Into<Incoming>,
) -> Result<Outcome, ProcessError> {
    p.apply_batch(db, &[e.into()]).await.remove(0)
}

async fn apply_ok(p: &Provisioner, db: &PgPool, e: impl Into<Incoming>) -> Outcome {
    apply_one(p, db, e).await.expect("event applies")
}

fn payload_error(r: Result<Outcome, ProcessError>) -> String {
    match r {
        Err(ProcessError::Payload(msg)) => msg,
        other => panic!("expected a payload error, got {other:?}"),
    }
}

/// An audit row from Clerk: (action, actor, subject, event id).
fn audit_row(action: &str, subject: &str, event_id: &str) -> AuditRow {
    (
        action.to_owned(),
        "clerk".to_owned(),
        Some(subject.to_owned()),
        Some(event_id.to_owned()),
    )
}

/// Applies `events` in order, each expected to apply.
/// `who` joins workspace A (`mem_a`, member) and B (`mem_b`, admin): events
/// `m1` and `m2`.
async fn in_a_and_b(p: &Provisioner, db: &PgPool, who: &story::Person) -> (Org, Org) {
    let org_a = org("org_a").named("A").version(T0);
    let org_b = org("org_b").named("B").version(T0);
    apply_all(
        p,
        db,
        [
            org_a.membership("mem_a", who).created(T0).svix("m1"),
            org_b
                .membership("mem_b", who)
                .role("org:admin")
                .created(T0)
                .svix("m2"),
        ],
    )
    .await;
    (org_a, org_b)
}

async fn apply_all(p: &Provisioner, db: &PgPool, events: impl IntoIterator<Item = Event>) {
    for e in events {
        apply_ok(p, db, e).await;
    }
}

/// organization.created provisions the workspace with the default plan, its quotas,
/// pending onboarding steps and a `workspace.provisioned` audit row.
#[tokio::test]
async fn organization_created_provisions_workspace() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let created = org("org_a").named("Acme").created(T0).svix("msg_1");
    assert_eq!(apply_ok(&p, &db.pool, created).await, Outcome::Processed);

    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(w.name.as_deref(), Some("Acme"));
    assert_eq!(w.slug.as_deref(), Some("acme"));
    assert_eq!(w.status, "active");
    assert_eq!(w.plan, "free");
    assert_eq!(w.source_version, Some(T0));
    let q = quotas(&db.pool, "org_a").await;
    assert_eq!(q.len(), 6);
    assert!(q.contains(&("seats".to_owned(), 5)));
    assert_eq!(
        onboarding_steps(&db.pool, "org_a").await,
        vec![
            ("gong".to_owned(), 0, true, "pending".to_owned()),
            ("hubspot".to_owned(), 1, false, "pending".to_owned()),
            ("slack".to_owned(), 2, false, "pending".to_owned()),
            ("starter_analysis".to_owned(), 3, true, "pending".to_owned()),
        ]
    );
    assert_eq!(
        audit(&db.pool, "org_a").await,
        vec![(
            "workspace.provisioned".to_owned(),
            "clerk".to_owned(),
            Some("org_a".to_owned()),
            Some("msg_1".to_owned())
        )]
    );
    assert_eq!(
        event_status(&db.pool, "msg_1").await,
        Some(("processed".to_owned(), None, 1))
    );
}

/// A handled type with a broken `data` is a payload error naming the field, and
/// nothing is written.
#[tokio::test]
async fn malformed_organization_is_a_payload_error() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let without_id = org("org_a")
        .named("Acme")
        .created(T0)
        .svix("msg_1")
        .with(|d| {
            d.as_object_mut().unwrap().remove("id");
        });
    let msg = payload_error(apply_one(&p, &db.pool, without_id).await);
    assert_eq!(msg, "data.id: missing");
    assert_eq!(event_status(&db.pool, "msg_1").await, None);
    assert!(workspace(&db.pool, "org_a").await.is_none());
}

/// record_dead writes status `dead` with the error; a replay of that svix id is
/// processed afresh, counting the attempt.
#[tokio::test]
async fn dead_event_is_processed_afresh() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let e: Incoming = org("org_a").named("Acme").created(T0).svix("msg_1").into();
    p.record_dead(&db.pool, &e, "data.id: missing")
        .await
        .unwrap();
    assert_eq!(
        event_status(&db.pool, "msg_1").await,
        Some(("dead".to_owned(), Some("data.id: missing".to_owned()), 1))
    );
    p.record_dead(&db.pool, &e, "again").await.unwrap();
    assert_eq!(
        event_status(&db.pool, "msg_1").await,
        Some(("dead".to_owned(), Some("again".to_owned()), 2))
    );
    assert_eq!(apply_ok(&p, &db.pool, e).await, Outcome::Processed);
    assert_eq!(
        event_status(&db.pool, "msg_1").await,
        Some(("processed".to_owned(), None, 3))
    );
    assert!(workspace(&db.pool, "org_a").await.is_some());
}

/// public_metadata.plan naming a configured plan selects it and its quotas; an
/// unknown plan name falls back to the default plan.
#[tokio::test]
async fn plan_comes_from_public_metadata_or_default() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    apply_all(
        &p,
        &db.pool,
        [
            org("org_team")
                .named("T")
                .plan("team")
                .created(T0)
                .svix("m1"),
            org("org_gold")
                .named("G")
                .plan("gold")
                .created(T0)
                .svix("m2"),
            org("org_null")
                .named("N")
                .created(T0)
                .svix("m3")
                .with(|d| d["public_metadata"] = Value::Null),
        ],
    )
    .await;

    assert_eq!(workspace(&db.pool, "org_team").await.unwrap().plan, "team");
    assert!(
        quotas(&db.pool, "org_team")
            .await
            .contains(&("seats".to_owned(), 25))
    );
    assert_eq!(workspace(&db.pool, "org_gold").await.unwrap().plan, "free");
    assert!(
        quotas(&db.pool, "org_gold")
            .await
            .contains(&("seats".to_owned(), 5))
    );
    assert_eq!(workspace(&db.pool, "org_null").await.unwrap().plan, "free");
}

/// organization.updated naming an unknown plan keeps a paying workspace's plan and
/// quotas (a `workspace.plan_unknown` audit row names it) and still applies the
/// other fields; a late older snapshot naming a known plan still sets the plan.
#[tokio::test]
async fn unknown_plan_keeps_the_current_plan() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let acme = org("org_a").named("Acme").plan("enterprise");
    apply_ok(&p, &db.pool, acme.created(T0).svix("m1")).await;
    let quotas_before = quotas(&db.pool, "org_a").await;

    let typo = acme.clone().named("Acme Two").plan("enterprize");
    let out = apply_ok(&p, &db.pool, typo.updated(T0 + 10).svix("m2")).await;

    assert_eq!(out, Outcome::Processed);
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(w.plan, "enterprise");
    assert_eq!(w.name.as_deref(), Some("Acme Two"));
    assert_eq!(w.source_version, Some(T0 + 10));
    assert_eq!(quotas(&db.pool, "org_a").await, quotas_before);
    assert_eq!(
        audit(&db.pool, "org_a").await,
        [
            audit_row("workspace.provisioned", "org_a", "m1"),
            audit_row("workspace.plan_unknown", "org_a", "m2"),
            audit_row("workspace.renamed", "org_a", "m2"),
            // The slug follows the name.
            audit_row("workspace.updated", "org_a", "m2"),
        ]
    );
    assert_eq!(
        audit_details(&db.pool, "org_a").await[0],
        json!({ "plan": "enterprize", "applied": "enterprise" })
    );

    // Delivered late, an older snapshot naming a configured plan is the newest
    // one that names a plan: the plan follows it (as in order), the data does not.
    let older = acme.clone().named("Acme Old").plan("team");
    let out = apply_ok(&p, &db.pool, older.updated(T0 + 5).svix("m3")).await;
    assert_eq!(out, Outcome::Processed);
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(
        (w.plan.as_str(), w.name.as_deref()),
        ("team", Some("Acme Two"))
    );
    assert!(
        quotas(&db.pool, "org_a")
            .await
            .contains(&("seats".to_owned(), 25))
    );
}

/// A new workspace whose snapshot names an unknown plan gets the default plan, with
/// a `workspace.plan_unknown` audit row; a later known plan replaces it.
#[tokio::test]
async fn new_workspace_with_unknown_plan_gets_default_plan() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let gold = org("org_g").named("G").plan("gold");
    apply_ok(&p, &db.pool, gold.created(T0).svix("m1")).await;

    assert_eq!(workspace(&db.pool, "org_g").await.unwrap().plan, "free");
    assert!(
        quotas(&db.pool, "org_g")
            .await
            .contains(&("seats".to_owned(), 5))
    );
    assert_eq!(
        audit_actions(&db.pool, "org_g").await,
        ["workspace.provisioned", "workspace.plan_unknown"]
    );
    assert_eq!(
        audit_details(&db.pool, "org_g").await,
        [json!({ "plan": "gold", "applied": "free" })]
    );

    let team = gold.plan("team").updated(T0 + 10).svix("m2");
    apply_ok(&p, &db.pool, team).await;
    assert_eq!(workspace(&db.pool, "org_g").await.unwrap().plan, "team");
}

/// organization.updated renames (workspace.renamed), changes the plan and re-derives
/// every quota (workspace.plan_changed), and records other field changes
/// (workspace.updated).
#[tokio::test]
async fn organization_updated_renames_and_changes_plan() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let acme = org("org_a").named("Acme");
    apply_ok(&p, &db.pool, acme.created(T0).svix("m1")).await;
    let renamed = acme
        .named("Acme Two")
        .plan("enterprise")
        .updated(T0 + 10)
        .svix("m2")
        .with(|d| d["max_allowed_memberships"] = json!(50));
    assert_eq!(apply_ok(&p, &db.pool, renamed).await, Outcome::Processed);

    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(w.name.as_deref(), Some("Acme Two"));
    assert_eq!(w.plan, "enterprise");
    assert_eq!(w.source_version, Some(T0 + 10));
    let expected: Vec<(String, i64)> = p.settings().plans["enterprise"]
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(quotas(&db.pool, "org_a").await, expected);
    assert_eq!(
        audit_actions(&db.pool, "org_a").await,
        [
            "workspace.provisioned",
            "workspace.plan_changed",
            "workspace.renamed",
            "workspace.updated"
        ]
    );
    let details = audit_details(&db.pool, "org_a").await;
    assert_eq!(
        details[0],
        json!({"before": {"plan": "free"}, "after": {"plan": "enterprise"}})
    );
    assert_eq!(
        details[1],
        json!({"before": {"name": "Acme"}, "after": {"name": "Acme Two"}})
    );
    assert_eq!(
        details[2],
        json!({"before": {"max_allowed_memberships": 5, "slug": "acme"}, "after": {"max_allowed_memberships": 50, "slug": "acme-two"}})
    );

    // Back to a plan without metadata: the default plan's quotas again.
    let without_plan = org("org_a").named("Acme Two").updated(T0 + 20).svix("m3");
    apply_ok(&p, &db.pool, without_plan).await;
    assert_eq!(workspace(&db.pool, "org_a").await.unwrap().plan, "free");
    assert!(
        quotas(&db.pool, "org_a")
            .await
            .contains(&("seats".to_owned(), 5))
    );
}

/// An older or equal organization version is superseded: no change, no audit row.
#[tokio::test]
async fn older_organization_update_is_superseded() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let newer = org("org_a").named("New").plan("team").updated(T0 + 10);
    apply_ok(&p, &db.pool, newer.svix("m1")).await;
    let before = audit_count(&db.pool).await;
    let older = org("org_a").named("Old").created(T0).svix("m2");
    assert_eq!(apply_ok(&p, &db.pool, older).await, Outcome::Superseded);
    let same = org("org_a").named("Same").updated(T0 + 10).svix("m3");
    assert_eq!(apply_ok(&p, &db.pool, same).await, Outcome::Superseded);
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!((w.name.as_deref(), w.plan.as_str()), (Some("New"), "team"));
    assert_eq!(audit_count(&db.pool).await, before);
    assert_eq!(event_status(&db.pool, "m2").await.unwrap().0, "superseded");
}

/// organization.deleted tombstones the workspace, ends its memberships and keeps
/// its data; a second delete is superseded and keeps the first deletion time.
#[tokio::test]
async fn organization_deleted_tombstones_and_ends_memberships() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let acme = org("org_a").named("Acme").plan("team").version(T0);
    let jane = person("user_jane", "j");
    let admin = acme.membership("mem_1", &jane).role("org:admin");
    apply_ok(&p, &db.pool, admin.created(T0).svix("m1")).await;
    let out = apply_ok(&p, &db.pool, acme.deleted(T0 + 50).svix("m2")).await;
    assert_eq!(out, Outcome::Processed);

    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(
        (w.status.as_str(), w.name.as_deref(), w.plan.as_str()),
        ("deleted", Some("Acme"), "team")
    );
    let m = member(&db.pool, "mem_1").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("workspace_deleted"));
    assert_eq!(
        audit_actions(&db.pool, "org_a").await,
        [
            "workspace.provisioned",
            "member.added",
            "workspace.deleted",
            "member.removed"
        ]
    );

    let out = apply_ok(&p, &db.pool, acme.deleted(T0 + 90).svix("m3")).await;
    assert_eq!(out, Outcome::Superseded);
    let (deleted_at_ms, deleted_version): (i64, i64) = sqlx::query_as(
        "select (extract(epoch from deleted_at) * 1000)::bigint, deleted_version from workspaces where id = 'org_a'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((deleted_at_ms, deleted_version), (T0 + 50, T0 + 50));
    assert_eq!(audit_actions(&db.pool, "org_a").await.len(), 4);
}

/// A delete that arrives before the create leaves a tombstone the create fills in
/// but never reactivates; memberships of it are stored as removed.
#[tokio::test]
async fn delete_before_create_stays_deleted() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let acme = org("org_a").named("Acme").plan("team").version(T0);
    let out = apply_ok(&p, &db.pool, acme.deleted(T0 + 50).svix("m1")).await;
    assert_eq!(out, Outcome::Processed);
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(
        (w.status.as_str(), w.name.as_deref(), w.plan.as_str()),
        ("deleted", None, "free")
    );
    assert_eq!(quotas(&db.pool, "org_a").await.len(), 6);

    apply_ok(&p, &db.pool, acme.created(T0).svix("m2")).await;
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(
        (w.status.as_str(), w.name.as_deref(), w.plan.as_str()),
        ("deleted", Some("Acme"), "team")
    );

    let jane = person("user_jane", "j");
    let late = acme.membership("mem_1", &jane).created(T0 + 1).svix("m3");
    apply_ok(&p, &db.pool, late).await;
    let m = member(&db.pool, "mem_1").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("workspace_deleted"));
    assert!(
        !audit_actions(&db.pool, "org_a")
            .await
            .contains(&"member.added".to_owned())
    );
}

/// A membership stores role, Clerk role and identity; org:admin → admin, any other
/// role → member, and `[roles]` can map a custom role to admin.
#[tokio::test]
async fn membership_roles_follow_the_role_map() {
    let db = TestDatabase::create().await;
    let p = provisioner_with("[roles]\n\"org:billing\" = \"admin\"\n");
    let acme = org("org_a").named("Acme").version(T0);
    let people: Vec<_> = (0..4).map(|i| person(&format!("user_{i}"), "x")).collect();
    let roles = ["org:admin", "org:member", "org:billing", "org:viewer"];
    for (i, (who, role)) in people.iter().zip(roles).enumerate() {
        let joined = acme.membership(&format!("mem_{i}"), who).role(role);
        apply_ok(&p, &db.pool, joined.created(T0).svix(&format!("m{i}"))).await;
    }
    let got: Vec<(String, String)> =
        sqlx::query_as("select role, clerk_role from members order by membership_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        got,
        [
            ("admin", "org:admin"),
            ("member", "org:member"),
            ("admin", "org:billing"),
            ("member", "org:viewer")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let m = member(&db.pool, "mem_0").await.unwrap();
    assert_eq!(m.email.as_deref(), Some("user_0.x@example.com"));
    assert_eq!(
        (m.first_name.as_deref(), m.last_name.as_deref()),
        (Some("Firstx"), Some("Lastx"))
    );
    assert_eq!(
        (m.workspace_id.as_str(), m.user_id.as_str()),
        ("org_a", "user_0")
    );

    // The same custom role without the mapping is a plain member.
    let db2 = TestDatabase::create().await;
    let plain = provisioner();
    let billing = acme.membership("mem_9", &people[2]).role("org:billing");
    apply_ok(&plain, &db2.pool, billing.created(T0).svix("m1")).await;
    assert_eq!(member(&db2.pool, "mem_9").await.unwrap().role, "member");
}

/// A membership that arrives before its organization provisions the workspace from
/// the embedded snapshot; the older organization.created is then superseded.
#[tokio::test]
async fn membership_before_organization_provisions_workspace() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = person("user_jane", "j");
    let acme = org("org_a").named("Acme").plan("team").version(T0 + 5);
    let admin = acme.membership("mem_1", &jane).role("org:admin").since(T0);
    let out = apply_ok(&p, &db.pool, admin.created(T0 + 5).svix("m1")).await;
    assert_eq!(out, Outcome::Processed);
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(
        (w.name.as_deref(), w.plan.as_str(), w.status.as_str()),
        (Some("Acme"), "team", "active")
    );
    assert_eq!(quotas(&db.pool, "org_a").await.len(), 6);
    assert_eq!(onboarding_steps(&db.pool, "org_a").await.len(), 4);
    assert_eq!(member(&db.pool, "mem_1").await.unwrap().role, "admin");

    let older = org("org_a").named("Acme Old").created(T0).svix("m2");
    assert_eq!(apply_ok(&p, &db.pool, older).await, Outcome::Superseded);
    assert_eq!(
        workspace(&db.pool, "org_a").await.unwrap().name.as_deref(),
        Some("Acme")
    );
}

/// organizationMembership.updated changes the role (member.role_changed); an older
/// snapshot is superseded without audit.
#[tokio::test]
async fn membership_updated_changes_role_by_version() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = person("user_jane", "j");
    let mem = org("org_a")
        .named("Acme")
        .version(T0)
        .membership("mem_1", &jane);
    apply_ok(&p, &db.pool, mem.created(T0).svix("m1")).await;
    let promoted = mem.clone().role("org:admin").updated(T0 + 20).svix("m2");
    assert_eq!(apply_ok(&p, &db.pool, promoted).await, Outcome::Processed);
    let m = member(&db.pool, "mem_1").await.unwrap();
    assert_eq!(
        (m.role.as_str(), m.clerk_role.as_str()),
        ("admin", "org:admin")
    );
    let before = audit_count(&db.pool).await;
    let older = mem.updated(T0 + 10).svix("m3");
    assert_eq!(apply_ok(&p, &db.pool, older).await, Outcome::Superseded);
    assert_eq!(member(&db.pool, "mem_1").await.unwrap().role, "admin");
    assert_eq!(audit_count(&db.pool).await, before);
    assert_eq!(
        audit_actions(&db.pool, "org_a").await,
        [
            "workspace.provisioned",
            "member.added",
            "member.role_changed"
        ]
    );
}

/// organizationMembership.deleted removes the member for good: a late update of the
/// same membership id never reactivates it, but a re-add (new membership id) does
/// make the user a member again. An unseen deleted membership is stored as removed.
#[tokio::test]
async fn removed_membership_is_final_and_readd_uses_new_id() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = person("user_jane", "j");
    let acme = org("org_a").named("Acme").version(T0);
    let mem = acme.membership("mem_1", &jane);
    apply_ok(&p, &db.pool, mem.created(T0).svix("m1")).await;
    let out = apply_ok(&p, &db.pool, mem.deleted(T0 + 10).svix("m2")).await;
    assert_eq!(out, Outcome::Processed);
    let m = member(&db.pool, "mem_1").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("membership_deleted"));

    let late = mem.role("org:admin").updated(T0 + 20).svix("m3");
    assert_eq!(apply_ok(&p, &db.pool, late).await, Outcome::Superseded);
    assert!(member(&db.pool, "mem_1").await.unwrap().removed);

    let readded = acme.membership("mem_2", &jane).role("org:admin");
    apply_ok(&p, &db.pool, readded.created(T0 + 30).svix("m4")).await;
    let m = member(&db.pool, "mem_2").await.unwrap();
    assert!(!m.removed);
    assert_eq!(m.role, "admin");
    assert_eq!(
        audit_actions(&db.pool, "org_a").await,
        [
            "workspace.provisioned",
            "member.added",
            "member.removed",
            "member.added"
        ]
    );

    // A deletion seen before its membership creates it as removed, and the late
    // created stays removed.
    let bob = acme.membership("mem_3", &person("user_bob", "b"));
    apply_ok(&p, &db.pool, bob.deleted(T0 + 40).svix("m5")).await;
    let late = bob.created(T0 + 35).svix("m6");
    assert_eq!(apply_ok(&p, &db.pool, late).await, Outcome::Superseded);
    let m = member(&db.pool, "mem_3").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("membership_deleted"));
}

/// Applies jane's admin membership, then its removal with `data` edited by `edit`,
/// and checks the removal applied: member removed, log row `processed`, not dead,
/// display fields kept, one `member.removed` audit row about jane.
async fn sparse_removal_applies(edit: impl FnOnce(&mut Value)) {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = person("user_jane", "j");
    let mem = org("org_a")
        .named("Acme")
        .version(T0)
        .membership("mem_1", &jane)
        .role("org:admin");
    apply_ok(&p, &db.pool, mem.created(T0).svix("m1")).await;

    let removal = mem.deleted(T0 + 10).svix("m2").with(edit);
    assert_eq!(apply_ok(&p, &db.pool, removal).await, Outcome::Processed);

    let m = member(&db.pool, "mem_1").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("membership_deleted"));
    assert_eq!(m.email.as_deref(), Some(jane.email.as_str()));
    assert_eq!(m.role, "admin");
    let (status, error, _) = event_status(&db.pool, "m2").await.unwrap();
    assert_eq!((status.as_str(), error), ("processed", None));
    let last = audit(&db.pool, "org_a").await.pop().unwrap();
    assert_eq!(
        (last.0.as_str(), last.2.as_deref(), last.3.as_deref()),
        ("member.removed", Some("user_jane"), Some("m2"))
    );
    assert_eq!(
        workspace(&db.pool, "org_a").await.unwrap().name.as_deref(),
        Some("Acme")
    );
}

/// A membership removal without `public_user_data` still removes the member.
#[tokio::test]
async fn removal_without_public_user_data_applies() {
    sparse_removal_applies(|d| {
        d.as_object_mut().unwrap().remove("public_user_data");
    })
    .await;
}

/// A membership removal whose organization is just `{id}` still removes the member
/// and leaves the workspace's fields as they are.
#[tokio::test]
async fn removal_with_minimal_organization_applies() {
    sparse_removal_applies(|d| d["organization"] = json!({ "id": "org_a" })).await;
}

/// A removal carrying only its ids among unknown fields (no role, no versions)
/// still removes the member.
#[tokio::test]
async fn removal_with_only_ids_and_unknown_fields_applies() {
    sparse_removal_applies(|d| {
        *d = json!({
            "object": "organization_membership", "id": "mem_1", "deleted": true,
            "organization": { "id": "org_a", "brand_new": [1, 2] },
            "public_user_data": { "user_id": "user_jane", "unheard_of": { "x": 1 } },
            "another_new_field": "value",
        });
    })
    .await;
}

/// A sparse removal seen before its membership leaves a tombstone: the late
/// `created` stays removed, so it never grants access; it fills in the fields the
/// removal did not carry, as the in-order history would have stored them (issue 9
/// item 3: every field converges, so the late `created` is applied, not superseded).
#[tokio::test]
async fn sparse_removal_before_created_keeps_a_tombstone() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let acme = org("org_a").named("Acme").version(T0);
    apply_ok(&p, &db.pool, acme.created(T0).svix("m1")).await;
    let bob = acme.membership("mem_b", &person("user_bob", "b"));
    let removal = bob
        .deleted(T0 + 10)
        .svix("m2")
        .with(|d| *d = json!({ "id": "mem_b", "organization": { "id": "org_a" }, "public_user_data": { "user_id": "user_bob" } }));
    assert_eq!(apply_ok(&p, &db.pool, removal).await, Outcome::Processed);
    let late = bob.created(T0 + 5).svix("m3");
    assert_eq!(apply_ok(&p, &db.pool, late).await, Outcome::Processed);
    let m = member(&db.pool, "mem_b").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("membership_deleted"));
    assert_eq!(
        (m.clerk_role.as_str(), m.email.as_deref()),
        ("org:member", Some("user_bob.b@example.com"))
    );
    assert_eq!(
        audit_actions(&db.pool, "org_a").await,
        ["workspace.provisioned"]
    );
}

/// organization.deleted and user.deleted with only `{id, deleted}` apply.
#[tokio::test]
async fn minimal_deletions_apply() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let acme = org("org_a").named("Acme").version(T0);
    let jane = person("user_jane", "j");
    let bob = person("user_bob", "b");
    apply_all(
        &p,
        &db.pool,
        [
            acme.membership("mem_j", &jane).created(T0),
            org("org_b")
                .version(T0)
                .membership("mem_b", &bob)
                .created(T0),
        ],
    )
    .await;
    let org_gone = acme
        .deleted(T0 + 10)
        .svix("d1")
        .with(|d| *d = json!({ "id": "org_a", "deleted": true }));
    assert_eq!(apply_ok(&p, &db.pool, org_gone).await, Outcome::Processed);
    let user_gone = user_deleted("user_bob", T0 + 10)
        .svix("d2")
        .with(|d| *d = json!({ "id": "user_bob", "deleted": true }));
    assert_eq!(apply_ok(&p, &db.pool, user_gone).await, Outcome::Processed);
    assert_eq!(
        workspace(&db.pool, "org_a").await.unwrap().status,
        "deleted"
    );
    assert!(member(&db.pool, "mem_j").await.unwrap().removed);
    assert!(member(&db.pool, "mem_b").await.unwrap().removed);
}

/// user.updated refreshes the user's display fields in every workspace (audited as
/// member.updated in each) and wins over older membership snapshots, in any order.
#[tokio::test]
async fn user_updated_refreshes_display_fields_everywhere() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = person("user_jane", "old");
    let (org_a, _) = in_a_and_b(&p, &db.pool, &jane).await;

    let renamed = user_updated(&person("user_jane", "new"), T0 + 10).svix("m3");
    assert_eq!(apply_ok(&p, &db.pool, renamed).await, Outcome::Processed);
    for id in ["mem_a", "mem_b"] {
        let m = member(&db.pool, id).await.unwrap();
        assert_eq!(
            m.email.as_deref(),
            Some("user_jane.new@example.com"),
            "{id}"
        );
        assert_eq!(m.first_name.as_deref(), Some("Firstnew"));
    }
    assert_eq!(
        audit_actions(&db.pool, "org_a").await.last().unwrap(),
        "member.updated"
    );
    assert_eq!(
        audit_actions(&db.pool, "org_b").await.last().unwrap(),
        "member.updated"
    );

    // An older membership snapshot changes the role but not the newer display fields.
    let mem_a = org_a.membership("mem_a", &jane).role("org:admin");
    apply_ok(&p, &db.pool, mem_a.updated(T0 + 5).svix("m4")).await;
    let m = member(&db.pool, "mem_a").await.unwrap();
    assert_eq!(
        (m.role.as_str(), m.email.as_deref()),
        ("admin", Some("user_jane.new@example.com"))
    );

    // A membership created after the user.updated but older than it takes the user's fields.
    let mem_c = org("org_c")
        .named("C")
        .version(T0)
        .membership("mem_c", &jane);
    apply_ok(&p, &db.pool, mem_c.created(T0 + 2).svix("m5")).await;
    assert_eq!(
        member(&db.pool, "mem_c").await.unwrap().email.as_deref(),
        Some("user_jane.new@example.com")
    );

    // A newer membership snapshot wins over the user record.
    let newest = org_a
        .membership("mem_a", &person("user_jane", "newest"))
        .role("org:admin");
    apply_ok(&p, &db.pool, newest.updated(T0 + 30).svix("m6")).await;
    assert_eq!(
        member(&db.pool, "mem_a").await.unwrap().email.as_deref(),
        Some("user_jane.newest@example.com")
    );

    // An older user.updated is superseded.
    let older = user_updated(&jane, T0 + 1).svix("m7");
    assert_eq!(apply_ok(&p, &db.pool, older).await, Outcome::Superseded);
    assert_eq!(
        member(&db.pool, "mem_b").await.unwrap().email.as_deref(),
        Some("user_jane.new@example.com")
    );
}

/// user.updated picks the primary email address, and stores an unseen user.
#[tokio::test]
async fn user_updated_uses_primary_email() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let updated = user_updated(&person("user_jane", "j"), T0).svix("m1");
    assert_eq!(apply_ok(&p, &db.pool, updated).await, Outcome::Processed);
    let email: Option<String> =
        sqlx::query_scalar("select email from users where id = 'user_jane'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(email.as_deref(), Some("user_jane.j@example.com"));
}

/// user.deleted removes the user's memberships everywhere, and for good: a later
/// membership of that user is stored as removed; a second delete is superseded.
#[tokio::test]
async fn deleted_user_memberships_end_for_good() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = person("user_jane", "j");
    let (org_a, _) = in_a_and_b(&p, &db.pool, &jane).await;
    let deleted = user_deleted("user_jane", T0 + 10).svix("m3");
    assert_eq!(apply_ok(&p, &db.pool, deleted).await, Outcome::Processed);
    for id in ["mem_a", "mem_b"] {
        let m = member(&db.pool, id).await.unwrap();
        assert!(m.removed, "{id}");
        assert_eq!(m.removal_reason.as_deref(), Some("user_deleted"));
    }
    assert_eq!(
        audit_actions(&db.pool, "org_b").await.last().unwrap(),
        "member.removed"
    );

    let late = org_a
        .membership("mem_a", &jane)
        .role("org:admin")
        .updated(T0 + 20)
        .svix("m4");
    assert_eq!(apply_ok(&p, &db.pool, late).await, Outcome::Superseded);
    let rejoined = org_a.membership("mem_new", &jane).role("org:admin");
    apply_ok(&p, &db.pool, rejoined.created(T0 + 30).svix("m5")).await;
    let m = member(&db.pool, "mem_new").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("user_deleted"));
    let again = user_deleted("user_jane", T0 + 40).svix("m6");
    assert_eq!(apply_ok(&p, &db.pool, again).await, Outcome::Superseded);
}

/// A svix id already applied is a Duplicate that writes nothing, also within one
/// batch; a superseded or ignored svix id is a Duplicate too.
#[tokio::test]
async fn duplicates_write_nothing() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let e: Incoming = org("org_a").named("Acme").created(T0).svix("m1").into();
    assert_eq!(apply_ok(&p, &db.pool, e.clone()).await, Outcome::Processed);
    assert_eq!(apply_ok(&p, &db.pool, e.clone()).await, Outcome::Duplicate);
    // The same id with another body is still the same message.
    let renamed = org("org_a").named("Other").updated(T0 + 1).svix("m1");
    assert_eq!(apply_ok(&p, &db.pool, renamed).await, Outcome::Duplicate);
    assert_eq!(
        workspace(&db.pool, "org_a").await.unwrap().name.as_deref(),
        Some("Acme")
    );
    assert_eq!(audit(&db.pool, "org_a").await.len(), 1);
    assert_eq!(event_status(&db.pool, "m1").await.unwrap().2, 1);

    let u: Incoming = org("org_a")
        .named("Acme 2")
        .updated(T0 + 5)
        .svix("m2")
        .into();
    let results = p.apply_batch(&db.pool, &[u.clone(), u.clone(), u]).await;
    let outcomes: Vec<Outcome> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        outcomes,
        [Outcome::Processed, Outcome::Duplicate, Outcome::Duplicate]
    );
    assert_eq!(
        audit_actions(&db.pool, "org_a").await,
        [
            "workspace.provisioned",
            "workspace.renamed",
            "workspace.updated"
        ]
    );

    let old: Incoming = org("org_a").named("Old").updated(T0 + 1).svix("m3").into();
    assert_eq!(
        apply_ok(&p, &db.pool, old.clone()).await,
        Outcome::Superseded
    );
    assert_eq!(apply_ok(&p, &db.pool, old).await, Outcome::Duplicate);
}

/// Types this service does not handle are recorded as ignored, and only once.
#[tokio::test]
async fn unhandled_type_is_ignored() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let e = story::raw(
        "m1",
        "organizationInvitation.created",
        serde_json::to_vec(&common::fixture("organizationInvitation.created")).unwrap(),
    );
    assert_eq!(apply_ok(&p, &db.pool, e.clone()).await, Outcome::Ignored);
    assert_eq!(event_status(&db.pool, "m1").await.unwrap().0, "ignored");
    assert_eq!(apply_ok(&p, &db.pool, e).await, Outcome::Duplicate);
    assert_eq!(audit_count(&db.pool).await, 0);
}

/// The Clerk example payloads apply as one consistent story.
#[tokio::test]
async fn clerk_fixtures_apply() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let names = [
        "organization.created",
        "organizationMembership.created",
        "organization.updated",
        "organizationMembership.updated",
        "user.updated",
        "organizationMembership.deleted",
        "user.deleted",
        "organization.deleted",
    ];
    for (i, name) in names.iter().enumerate() {
        let body = serde_json::to_vec(&common::fixture(name)).unwrap();
        let out = apply_ok(&p, &db.pool, story::raw(&format!("msg_{i}"), name, body)).await;
        assert_ne!(out, Outcome::Duplicate, "{name}");
    }
    let w = workspace(&db.pool, "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
        .await
        .unwrap();
    assert_eq!(w.status, "deleted");
    let m = member(&db.pool, "orgmem_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
        .await
        .unwrap();
    assert!(m.removed);
    assert_eq!(m.email.as_deref(), Some("jane.doe@acme.com"));
}

/// Malformed payloads are payload errors naming the problem; nothing is written.
#[tokio::test]
async fn malformed_payloads_name_the_problem() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let acme = org("org_a").named("Acme").version(T0);
    let mem = acme.membership("mem_1", &person("user_jane", "j"));

    let cases: Vec<(Incoming, &str)> = vec![
        (
            mem.created(T0)
                .svix("b1")
                .with(|d| {
                    d.as_object_mut().unwrap().remove("organization");
                })
                .into(),
            "data.organization: missing",
        ),
        (
            mem.created(T0)
                .svix("b2")
                .with(|d| {
                    d["public_user_data"]
                        .as_object_mut()
                        .unwrap()
                        .remove("user_id");
                })
                .into(),
            "data.public_user_data.user_id: missing",
        ),
        (
            mem.updated(T0)
                .svix("b3")
                .with(|d| d["public_user_data"] = Value::Null)
                .into(),
            "data.public_user_data: expected an object, got null",
        ),
        (
            mem.updated(T0)
                .svix("b4")
                .with(|d| d["updated_at"] = json!("yesterday"))
                .into(),
            "data.updated_at: expected an integer, got a string",
        ),
        (
            mem.created(T0)
                .svix("b5")
                .with(|d| d["organization"]["updated_at"] = json!(1.5))
                .into(),
            "data.organization.updated_at: expected an integer, got 1.5",
        ),
        (
            acme.created(T0)
                .svix("b6")
                .with(|d| d["name"] = json!(42))
                .into(),
            "data.name: expected a string, got a number",
        ),
        (
            acme.updated(T0)
                .svix("b7")
                .with(|d| d["id"] = Value::Null)
                .into(),
            "data.id: expected a string, got null",
        ),
        (
            Event::new("organization.created", json!("not an object"), T0)
                .svix("b8")
                .into(),
            "data: expected an object, got a string",
        ),
        (
            Event::new(
                "user.deleted",
                json!({"object": "user", "deleted": true}),
                T0,
            )
            .svix("b9")
            .into(),
            "data.id: missing",
        ),
        (
            Event::new("user.updated", json!({"id": "user_1"}), T0)
                .svix("b10")
                .into(),
            "data.updated_at: missing",
        ),
        (
            story::raw("b11", "organization.created", b"{not json".to_vec()),
            "body is not valid JSON",
        ),
        (
            // The message's type property disagrees with the body.
            story::raw(
                "b12",
                "organization.updated",
                story::envelope("organization.created", acme.data_at(T0), T0),
            ),
            "message type `organization.updated` does not match the body's type `organization.created`",
        ),
        (
            story::raw(
                "b13",
                "organization.deleted",
                br#"{"type":"organization.deleted","data":{"id":"org_a"}}"#.to_vec(),
            ),
            "timestamp: missing",
        ),
    ];
    for (event, expected) in cases {
        let id = event.svix_id.clone();
        let msg = payload_error(apply_one(&p, &db.pool, event).await);
        assert!(
            msg.starts_with(expected),
            "{id}: got `{msg}`, want `{expected}`"
        );
        assert_eq!(
            event_status(&db.pool, &id).await,
            None,
            "{id} left a log row"
        );
    }
    let rows: i64 = sqlx::query_scalar("select (select count(*) from workspaces) + (select count(*) from members) + (select count(*) from audit_log)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

/// A batch with a malformed event and one PostgreSQL refuses (a NUL character)
/// still commits every other event; the poisoned ones fail alone as payload errors.
#[tokio::test]
async fn poisoned_batch_commits_the_others() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let batch = [
        org("org_a").named("A").created(T0).svix("m1"),
        org("org_bad")
            .named("Bad")
            .created(T0)
            .svix("m2")
            .with(|d| d["updated_at"] = json!(null)),
        org("org_nul").named("Nul\u{0}Name").created(T0).svix("m3"),
        org("org_b").named("B").plan("team").created(T0).svix("m4"),
        org("org_a").named("A").created(T0).svix("m1"),
    ]
    .map(Incoming::from);
    let results = p.apply_batch(&db.pool, &batch).await;
    assert_eq!(results.len(), 5);
    assert!(matches!(results[0], Ok(Outcome::Processed)));
    match &results[1] {
        Err(ProcessError::Payload(msg)) => {
            assert_eq!(msg, "data.updated_at: expected an integer, got null")
        }
        other => panic!("expected a payload error, got {other:?}"),
    }
    let nul = match &results[2] {
        Err(ProcessError::Payload(msg)) => msg.clone(),
        other => panic!("NUL name should be a payload error, got {other:?}"),
    };
    assert!(nul.contains("cannot be stored"), "{nul}");
    assert!(matches!(results[3], Ok(Outcome::Processed)));
    assert!(matches!(results[4], Ok(Outcome::Duplicate)));
    assert!(workspace(&db.pool, "org_a").await.is_some());
    assert_eq!(workspace(&db.pool, "org_b").await.unwrap().plan, "team");
    assert!(workspace(&db.pool, "org_nul").await.is_none());
    assert_eq!(event_status(&db.pool, "m3").await, None);
}

/// Audit rows carry the event's actor and svix id; each action names its subject.
#[tokio::test]
async fn audit_rows_carry_actor_and_event_id() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let admin = org("org_a")
        .named("Acme")
        .version(T0)
        .membership("mem_1", &person("user_jane", "j"))
        .role("org:admin");
    let replayed = admin.created(T0).svix("msg_replayed").by(Actor::Replay);
    apply_ok(&p, &db.pool, replayed).await;
    // The deletion carries the membership as it was (version T0), sent later.
    let reconciled = admin
        .deleted(T0)
        .sent_at(T0 + 10)
        .svix("msg_reconciled")
        .by(Actor::Reconcile);
    apply_ok(&p, &db.pool, reconciled).await;
    let rows = audit(&db.pool, "org_a").await;
    let expect = |a: &str, actor: &str, subject: &str, ev: &str| {
        (
            a.to_owned(),
            actor.to_owned(),
            Some(subject.to_owned()),
            Some(ev.to_owned()),
        )
    };
    assert_eq!(
        rows,
        vec![
            expect("workspace.provisioned", "replay", "org_a", "msg_replayed"),
            expect("member.added", "replay", "user_jane", "msg_replayed"),
            expect("member.removed", "reconcile", "user_jane", "msg_reconciled"),
        ]
    );
    let details: Value =
        sqlx::query_scalar("select details from audit_log where action = 'member.added'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(details["membership_id"], "mem_1");
    assert_eq!(details["role"], "admin");
    assert_eq!(details["after"]["email"], "user_jane.j@example.com");
}

/// While PostgreSQL is unreachable every decodable event is a Database error (never
/// a payload error, so the worker holds it instead of dead-lettering it) and nothing
/// is written; once it is back the same events apply.
#[tokio::test]
async fn unreachable_database_is_a_database_error() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let base = url::Url::parse(&common::base_database_url()).unwrap();
    let upstream = format!(
        "{}:{}",
        base.host_str().unwrap(),
        base.port().unwrap_or(5432)
    );
    let proxy = common::proxy::Proxy::start(upstream.parse().unwrap()).await;
    let mut url = base.clone();
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.addr.port())).unwrap();
    url.set_path(&db.name);
    let through_proxy = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy(url.as_str())
        .unwrap();
    let batch = [
        org("org_a").named("A").created(T0).svix("m1"),
        org("org_bad")
            .named("Bad")
            .created(T0)
            .svix("m2")
            .with(|d| d["id"] = json!(7)),
        org("org_b").named("B").created(T0).svix("m3"),
    ]
    .map(Incoming::from);
    // Warm the pool so the outage also kills open connections.
    let warm = org("org_warm").named("W").created(T0).svix("m0");
    assert_eq!(apply_ok(&p, &through_proxy, warm).await, Outcome::Processed);

    proxy.cut().await;
    let results = p.apply_batch(&through_proxy, &batch).await;
    assert!(
        matches!(results[0], Err(ProcessError::Database(_))),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(results[1], Err(ProcessError::Payload(_))),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(ProcessError::Database(_))),
        "{:?}",
        results[2]
    );
    let single = apply_one(&p, &through_proxy, batch[0].clone()).await;
    assert!(
        matches!(single, Err(ProcessError::Database(_))),
        "{single:?}"
    );
    assert_eq!(event_status(&db.pool, "m1").await, None);
    assert!(workspace(&db.pool, "org_a").await.is_none());

    proxy.restore();
    let results = p.apply_batch(&through_proxy, &batch).await;
    assert!(
        matches!(results[0], Ok(Outcome::Processed)),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(results[1], Err(ProcessError::Payload(_))),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Ok(Outcome::Processed)),
        "{:?}",
        results[2]
    );
    through_proxy.close().await;
    proxy.shutdown();
}

/// record_dead stores a body that does not decode under the message's type, and
/// never turns an applied event back into a dead one (its replay stays a no-op).
#[tokio::test]
async fn record_dead_keeps_applied_status_and_takes_broken_bodies() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let broken = story::raw("m1", "organizationMembership.created", b"{oops".to_vec());
    p.record_dead(&db.pool, &broken, "body is not valid JSON")
        .await
        .unwrap();
    let (kind, status, ws): (String, String, Option<String>) =
        sqlx::query_as("select type, status, workspace_id from events where svix_id = 'm1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (kind.as_str(), status.as_str(), ws),
        ("organizationMembership.created", "dead", None)
    );

    let no_name: Incoming = org("org_a")
        .named("A")
        .created(T0)
        .svix("m2")
        .with(|d| {
            d.as_object_mut().unwrap().remove("name");
        })
        .into();
    p.record_dead(&db.pool, &no_name, "data.name: missing")
        .await
        .unwrap();
    let ws: Option<String> =
        sqlx::query_scalar("select workspace_id from events where svix_id = 'm2'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(ws.as_deref(), Some("org_a"));

    let ok: Incoming = org("org_b").named("B").created(T0).svix("m3").into();
    apply_ok(&p, &db.pool, ok.clone()).await;
    p.record_dead(&db.pool, &ok, "late").await.unwrap();
    assert_eq!(
        event_status(&db.pool, "m3").await,
        Some(("processed".to_owned(), None, 1))
    );
    assert_eq!(apply_ok(&p, &db.pool, ok).await, Outcome::Duplicate);
}

/// The harness drops a test's database also when the test panics.
#[test]
fn database_of_a_panicking_test_is_dropped() {
    let name = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = name.clone();
    let panicked = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let db = TestDatabase::create().await;
            *seen.lock().unwrap() = db.name.clone();
            panic!("a failing test");
        })
    })
    .join();
    assert!(panicked.is_err());
    let name = name.lock().unwrap().clone();
    assert!(name.starts_with("prov_test_"), "{name}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let left: i64 = rt.block_on(async {
        let admin = PgPool::connect(&format!("{}/postgres", common::base_database_url()))
            .await
            .unwrap();
        sqlx::query_scalar("select count(*) from pg_database where datname = $1")
            .bind(&name)
            .fetch_one(&admin)
            .await
            .unwrap()
    });
    assert_eq!(left, 0, "{name} outlived its test");
}

/// Applies `events` one by one, in this order, to a fresh database; returns every
/// provisioned row.
async fn rows_after(events: &[Event]) -> std::collections::BTreeMap<String, Value> {
    let db = TestDatabase::create().await;
    let p = provisioner();
    apply_all(&p, &db.pool, events.iter().cloned()).await;
    state_rows(&db.pool).await
}

/// Two different snapshots with the same `updated_at` (organization, membership,
/// user): the one carried by the smaller svix id wins, whichever arrives first, so
/// every column ends the same in both orders (issue 9 item 3).
#[tokio::test]
async fn equal_versions_go_to_the_smaller_svix_id_in_any_order() {
    let jane = |tag: &str| person("user_jane", tag);
    let acme = org("org_a").named("Acme").version(T0);
    let beta = org("org_a").named("Beta").plan("team");
    let alpha = org("org_a").named("Alpha").plan("enterprise");
    let mem = acme.membership("mem_1", &jane("j"));
    let events = [
        acme.created(T0).svix("m1"),
        mem.created(T0).svix("m2"),
        beta.updated(T0 + 10).svix("m5"),
        alpha.updated(T0 + 10).svix("m4"),
        mem.clone().role("org:admin").updated(T0 + 20).svix("m7"),
        mem.clone().role("org:member").updated(T0 + 20).svix("m6"),
        user_updated(&jane("x"), T0 + 30).svix("m9"),
        user_updated(&jane("y"), T0 + 30).svix("m8"),
    ];
    let forward = rows_after(&events).await;
    let mut reversed = events.clone();
    reversed[1..].reverse();
    assert_eq!(rows_after(&reversed).await, forward);

    let ws = &forward["workspaces/org_a"];
    assert_eq!(
        (
            &ws["name"],
            &ws["plan"],
            &ws["source_event"],
            &ws["plan_event"]
        ),
        (
            &json!("Alpha"),
            &json!("enterprise"),
            &json!("m4"),
            &json!("m4")
        )
    );
    let m = &forward["members/mem_1"];
    assert_eq!(
        (&m["clerk_role"], &m["email"], &m["profile_event"]),
        (
            &json!("org:member"),
            &json!("user_jane.y@example.com"),
            &json!("m8")
        )
    );
    assert_eq!(forward["users/user_jane"]["first_name"], json!("Firsty"));
}

/// Deletions sent more than once (later, as new messages) and memberships ended by
/// several causes: the earliest deletion time stands, and a membership's end is
/// its earliest cause with that cause's reason, whichever arrives first (issue 9
/// item 3).
#[tokio::test]
async fn deletions_keep_the_earliest_time_and_cause_in_any_order() {
    let acme = org("org_a").named("Acme").version(T0);
    let jane = acme.membership("mem_j", &person("user_jane", "j"));
    let bob = acme.membership("mem_b", &person("user_bob", "b"));
    let events = [
        jane.created(T0).svix("m1"),
        bob.created(T0).svix("m2"),
        jane.deleted(T0).sent_at(T0 + 30).svix("m3"),
        user_deleted("user_bob", T0 + 40).svix("m4"),
        acme.deleted(T0 + 50).svix("m5"),
        user_deleted("user_bob", T0 + 60).svix("m6"),
        acme.deleted(T0 + 70).svix("m7"),
        jane.deleted(T0).sent_at(T0 + 80).svix("m8"),
    ];
    let forward = rows_after(&events).await;
    let mut reversed = events.clone();
    reversed[2..].reverse();
    assert_eq!(rows_after(&reversed).await, forward);

    let ms = |t: i64| json!(T0 + t);
    assert_eq!(forward["workspaces/org_a"]["deleted_version"], ms(50));
    let at = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    assert_eq!(at(&forward["workspaces/org_a"]["deleted_at"]), T0 + 50);
    assert_eq!(at(&forward["users/user_bob"]["deleted_at"]), T0 + 40);
    let jane_row = &forward["members/mem_j"];
    assert_eq!(
        (at(&jane_row["removed_at"]), &jane_row["removal_reason"]),
        (T0 + 30, &json!("membership_deleted"))
    );
    let bob_row = &forward["members/mem_b"];
    assert_eq!(
        (at(&bob_row["removed_at"]), &bob_row["removal_reason"]),
        (T0 + 40, &json!("user_deleted"))
    );
}

/// The events a set-based batch defers (claims, new workspaces and members,
/// snapshot updates of stored workspaces) and the ones that end the deferring
/// (a plan change of a stored workspace, a user event) leave, in one batch,
/// exactly the outcomes, state, processing log and audit trail of the same events
/// applied one by one: a dead svix id is taken up afresh, an applied one and a
/// repeat within the batch are duplicates.
#[tokio::test]
async fn a_deferring_batch_matches_the_events_applied_one_by_one() {
    let p = provisioner();
    let stored = org("org_s").named("Stored");
    let fresh = org("org_n").named("New");
    let alice = person("user_alice", "a");
    let bob = person("user_bob", "b");
    let before: Vec<(Incoming, Option<&str>)> = vec![
        (stored.created(T0).svix("msg_s0").into(), None),
        (org("org_p").created(T0).svix("msg_done").into(), None),
        (
            org("org_d").created(T0).svix("msg_dead").into(),
            Some("data.id: missing"),
        ),
    ];
    let renamed = fresh
        .clone()
        .named("New renamed")
        .version(T0 + 10)
        .membership("mem_n1", &alice)
        .created(T0 + 10)
        .svix("msg_n1");
    let batch: Vec<Incoming> = vec![
        org("org_d").created(T0).svix("msg_dead").into(),
        org("org_p").created(T0).svix("msg_done").into(),
        fresh.created(T0).svix("msg_n0").into(),
        // A newer snapshot of the organization created just before, embedded;
        // then the same delivery again.
        renamed.clone().into(),
        renamed.into(),
        // A newer snapshot of a stored workspace, same plan: a deferred update.
        stored
            .clone()
            .named("Stored renamed")
            .version(T0 + 10)
            .membership("mem_s1", &bob)
            .created(T0 + 10)
            .svix("msg_s1")
            .into(),
        // Its plan changes: the deferring ends here.
        stored
            .clone()
            .named("Stored renamed")
            .plan("team")
            .updated(T0 + 20)
            .svix("msg_s2")
            .into(),
        fresh
            .clone()
            .named("New renamed")
            .version(T0 + 10)
            .membership("mem_n2", &bob)
            .created(T0 + 30)
            .svix("msg_n2")
            .into(),
        user_updated(&person("user_alice", "a2"), T0 + 40)
            .svix("msg_u")
            .into(),
    ];

    let mut seen = Vec::new();
    for together in [true, false] {
        let db = TestDatabase::create().await;
        for (e, dead) in &before {
            match dead {
                Some(reason) => p.record_dead(&db.pool, e, reason).await.unwrap(),
                None => assert_eq!(apply_ok(&p, &db.pool, e.clone()).await, Outcome::Processed),
            }
        }
        let outcomes: Vec<Outcome> = if together {
            p.apply_batch(&db.pool, &batch)
                .await
                .into_iter()
                .map(|r| r.expect("event applies"))
                .collect()
        } else {
            let mut outcomes = Vec::new();
            for e in &batch {
                outcomes.push(apply_ok(&p, &db.pool, e.clone()).await);
            }
            outcomes
        };
        let log: Vec<(String, String, i32)> =
            sqlx::query_as("select svix_id, status, attempts from events order by svix_id")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        let mut trail = Vec::new();
        for w in ["org_d", "org_n", "org_p", "org_s"] {
            trail.push((
                w,
                audit(&db.pool, w).await,
                audit_details(&db.pool, w).await,
            ));
        }
        seen.push((
            outcomes,
            state_rows(&db.pool).await,
            log,
            format!("{trail:?}"),
        ));
    }
    let (one_by_one, batched) = (seen.pop().unwrap(), seen.pop().unwrap());
    assert_eq!(
        batched.0,
        [
            Outcome::Processed,
            Outcome::Duplicate,
            Outcome::Processed,
            Outcome::Processed,
            Outcome::Duplicate,
            Outcome::Processed,
            Outcome::Processed,
            Outcome::Processed,
            Outcome::Processed,
        ]
    );
    assert_eq!(batched.0, one_by_one.0, "outcomes");
    assert_eq!(batched.1, one_by_one.1, "state");
    assert_eq!(batched.2, one_by_one.2, "processing log");
    assert_eq!(batched.3, one_by_one.3, "audit trail");
    let renamed = workspace_name(&batched.1, "org_n");
    assert_eq!(renamed, "New renamed");
    assert_eq!(workspace_name(&batched.1, "org_s"), "Stored renamed");
    assert!(
        batched
            .2
            .contains(&("msg_dead".to_owned(), "processed".to_owned(), 2))
    );
}

fn workspace_name(state: &std::collections::BTreeMap<String, Value>, id: &str) -> String {
    state[&format!("workspaces/{id}")]["name"]
        .as_str()
        .expect("a named workspace")
        .to_owned()
}
