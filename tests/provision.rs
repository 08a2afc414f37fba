//! Provisioning semantics (DESIGN §5) against a real PostgreSQL: every row of the
//! event table, plans and quotas, roles, tombstones, deduplication, audit rows,
//! malformed payloads and batches with a poisoned event.

mod common;

use common::clerk_events::*;
use common::database::TestDatabase;
use provisioner::config::Settings;
use provisioner::provision::{Actor, Incoming, Outcome, ProcessError, Provisioner};
use serde_json::{Value, json};
use sqlx::PgPool;

fn provisioner_with(extra: &str) -> Provisioner {
    let settings = Settings::from_sources(Some(extra), |_| None).expect("valid settings");
    Provisioner::new(settings.provisioning)
}

fn provisioner() -> Provisioner {
    provisioner_with("")
}

async fn apply_one(p: &Provisioner, db: &PgPool, e: Incoming) -> Result<Outcome, ProcessError> {
    p.apply_batch(db, std::slice::from_ref(&e)).await.remove(0)
}

async fn apply_ok(p: &Provisioner, db: &PgPool, e: Incoming) -> Outcome {
    apply_one(p, db, e).await.expect("event applies")
}

fn payload_error(r: Result<Outcome, ProcessError>) -> String {
    match r {
        Err(ProcessError::Payload(msg)) => msg,
        other => panic!("expected a payload error, got {other:?}"),
    }
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Workspace {
    name: Option<String>,
    slug: Option<String>,
    status: String,
    plan: String,
    source_version: Option<i64>,
}

async fn workspace(db: &PgPool, id: &str) -> Option<Workspace> {
    sqlx::query_as("select name, slug, status, plan, source_version from workspaces where id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
        .unwrap()
}

async fn quotas(db: &PgPool, id: &str) -> Vec<(String, i64)> {
    sqlx::query_as(
        "select name, limit_value from workspace_quotas where workspace_id = $1 order by name",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .unwrap()
}

async fn event_status(db: &PgPool, svix_id: &str) -> Option<(String, Option<String>, i32)> {
    sqlx::query_as("select status, error, attempts from events where svix_id = $1")
        .bind(svix_id)
        .fetch_optional(db)
        .await
        .unwrap()
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Member {
    membership_id: String,
    workspace_id: String,
    user_id: String,
    role: String,
    clerk_role: String,
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    removed: bool,
    removal_reason: Option<String>,
}

async fn member(db: &PgPool, membership_id: &str) -> Option<Member> {
    sqlx::query_as(
        "select membership_id, workspace_id, user_id, role, clerk_role, email, first_name, \
           last_name, removed_at is not null as removed, removal_reason \
         from members where membership_id = $1",
    )
    .bind(membership_id)
    .fetch_optional(db)
    .await
    .unwrap()
}

/// (action, actor, subject, event_id) of every audit row of a workspace, oldest first.
async fn audit(
    db: &PgPool,
    workspace_id: &str,
) -> Vec<(String, String, Option<String>, Option<String>)> {
    sqlx::query_as(
        "select action, actor, subject, event_id from audit_log where workspace_id = $1 order by id",
    )
    .bind(workspace_id)
    .fetch_all(db)
    .await
    .unwrap()
}

async fn audit_actions(db: &PgPool, workspace_id: &str) -> Vec<String> {
    audit(db, workspace_id)
        .await
        .into_iter()
        .map(|a| a.0)
        .collect()
}

async fn audit_count(db: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from audit_log")
        .fetch_one(db)
        .await
        .unwrap()
}

const T0: i64 = 1_750_000_000_000;

fn org_event(
    svix: &str,
    kind: &str,
    org: &str,
    name: &str,
    plan: Option<&str>,
    v: i64,
) -> Incoming {
    incoming(svix, kind, org_data(org, name, plan, v), v)
}

fn mem_event(
    svix: &str,
    kind: &str,
    id: &str,
    org: Value,
    who: &Person,
    role: &str,
    v: i64,
) -> Incoming {
    incoming(svix, kind, membership_data(id, org, who, role, T0, v), v)
}

// organization.created provisions the workspace with the default plan, its quotas,
// pending onboarding steps and a `workspace.provisioned` audit row.
#[tokio::test]
async fn organization_created_provisions_workspace() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let e = incoming(
        "msg_1",
        "organization.created",
        org_data("org_a", "Acme", None, T0),
        T0,
    );
    assert_eq!(apply_ok(&p, &db.pool, e).await, Outcome::Processed);

    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(w.name.as_deref(), Some("Acme"));
    assert_eq!(w.slug.as_deref(), Some("acme"));
    assert_eq!(w.status, "active");
    assert_eq!(w.plan, "free");
    assert_eq!(w.source_version, Some(T0));
    let q = quotas(&db.pool, "org_a").await;
    assert_eq!(q.len(), 6);
    assert!(q.contains(&("seats".to_owned(), 5)));
    let steps: Vec<(String, i16, bool, String)> = sqlx::query_as(
        "select name, position, required, status from onboarding_steps where workspace_id = 'org_a' order by position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        steps,
        vec![
            ("gong".to_owned(), 0, true, "pending".to_owned()),
            ("hubspot".to_owned(), 1, false, "pending".to_owned()),
            ("slack".to_owned(), 2, false, "pending".to_owned()),
            ("starter_analysis".to_owned(), 3, true, "pending".to_owned()),
        ]
    );
    let audit: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
        "select action, actor, subject, event_id from audit_log where workspace_id = 'org_a'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        audit,
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
    db.drop_database().await;
}

// A handled type with a broken `data` is a payload error naming the field, and
// nothing is written.
#[tokio::test]
async fn malformed_organization_is_a_payload_error() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let mut data = org_data("org_a", "Acme", None, T0);
    data.as_object_mut().unwrap().remove("id");
    let msg = payload_error(
        apply_one(
            &p,
            &db.pool,
            incoming("msg_1", "organization.created", data, T0),
        )
        .await,
    );
    assert_eq!(msg, "data.id: missing");
    assert_eq!(event_status(&db.pool, "msg_1").await, None);
    assert!(workspace(&db.pool, "org_a").await.is_none());
    db.drop_database().await;
}

// record_dead writes status `dead` with the error; a replay of that svix id is
// processed afresh, counting the attempt.
#[tokio::test]
async fn dead_event_is_processed_afresh() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let e = incoming(
        "msg_1",
        "organization.created",
        org_data("org_a", "Acme", None, T0),
        T0,
    );
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
    db.drop_database().await;
}

// public_metadata.plan naming a configured plan selects it and its quotas; an
// unknown plan name falls back to the default plan.
#[tokio::test]
async fn plan_comes_from_public_metadata_or_default() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    apply_ok(
        &p,
        &db.pool,
        org_event(
            "m1",
            "organization.created",
            "org_team",
            "T",
            Some("team"),
            T0,
        ),
    )
    .await;
    apply_ok(
        &p,
        &db.pool,
        org_event(
            "m2",
            "organization.created",
            "org_gold",
            "G",
            Some("gold"),
            T0,
        ),
    )
    .await;
    let mut data = org_data("org_null", "N", None, T0);
    data["public_metadata"] = Value::Null;
    apply_ok(
        &p,
        &db.pool,
        incoming("m3", "organization.created", data, T0),
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
    db.drop_database().await;
}

// organization.updated renames (workspace.renamed), changes the plan and re-derives
// every quota (workspace.plan_changed), and records other field changes
// (workspace.updated).
#[tokio::test]
async fn organization_updated_renames_and_changes_plan() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    apply_ok(
        &p,
        &db.pool,
        org_event("m1", "organization.created", "org_a", "Acme", None, T0),
    )
    .await;
    let mut data = org_data("org_a", "Acme Two", Some("enterprise"), T0 + 10);
    data["max_allowed_memberships"] = json!(50);
    let out = apply_ok(
        &p,
        &db.pool,
        incoming("m2", "organization.updated", data, T0 + 10),
    )
    .await;
    assert_eq!(out, Outcome::Processed);

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
    let details: Vec<Value> = sqlx::query_scalar(
        "select details from audit_log where workspace_id = 'org_a' and action <> 'workspace.provisioned' order by id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
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
    apply_ok(
        &p,
        &db.pool,
        org_event(
            "m3",
            "organization.updated",
            "org_a",
            "Acme Two",
            None,
            T0 + 20,
        ),
    )
    .await;
    assert_eq!(workspace(&db.pool, "org_a").await.unwrap().plan, "free");
    assert!(
        quotas(&db.pool, "org_a")
            .await
            .contains(&("seats".to_owned(), 5))
    );
    db.drop_database().await;
}

// An older or equal organization version is superseded: no change, no audit row.
#[tokio::test]
async fn older_organization_update_is_superseded() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    apply_ok(
        &p,
        &db.pool,
        org_event(
            "m1",
            "organization.updated",
            "org_a",
            "New",
            Some("team"),
            T0 + 10,
        ),
    )
    .await;
    let before = audit_count(&db.pool).await;
    let out = apply_ok(
        &p,
        &db.pool,
        org_event("m2", "organization.created", "org_a", "Old", None, T0),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
    let out = apply_ok(
        &p,
        &db.pool,
        org_event("m3", "organization.updated", "org_a", "Same", None, T0 + 10),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!((w.name.as_deref(), w.plan.as_str()), (Some("New"), "team"));
    assert_eq!(audit_count(&db.pool).await, before);
    assert_eq!(event_status(&db.pool, "m2").await.unwrap().0, "superseded");
    db.drop_database().await;
}

// organization.deleted tombstones the workspace, ends its memberships and keeps
// its data; a second delete is superseded and keeps the first deletion time.
#[tokio::test]
async fn organization_deleted_tombstones_and_ends_memberships() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let org = org_data("org_a", "Acme", Some("team"), T0);
    let jane = Person::new("user_jane", "j");
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m1",
            "organizationMembership.created",
            "mem_1",
            org,
            &jane,
            "org:admin",
            T0,
        ),
    )
    .await;
    let out = apply_ok(
        &p,
        &db.pool,
        incoming(
            "m2",
            "organization.deleted",
            deleted_data("organization", "org_a"),
            T0 + 50,
        ),
    )
    .await;
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

    let out = apply_ok(
        &p,
        &db.pool,
        incoming(
            "m3",
            "organization.deleted",
            deleted_data("organization", "org_a"),
            T0 + 90,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
    let (deleted_at_ms, deleted_version): (i64, i64) = sqlx::query_as(
        "select (extract(epoch from deleted_at) * 1000)::bigint, deleted_version from workspaces where id = 'org_a'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((deleted_at_ms, deleted_version), (T0 + 50, T0 + 50));
    assert_eq!(audit_actions(&db.pool, "org_a").await.len(), 4);
    db.drop_database().await;
}

// A delete that arrives before the create leaves a tombstone the create fills in
// but never reactivates; memberships of it are stored as removed.
#[tokio::test]
async fn delete_before_create_stays_deleted() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let out = apply_ok(
        &p,
        &db.pool,
        incoming(
            "m1",
            "organization.deleted",
            deleted_data("organization", "org_a"),
            T0 + 50,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Processed);
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(
        (w.status.as_str(), w.name.as_deref(), w.plan.as_str()),
        ("deleted", None, "free")
    );
    assert_eq!(quotas(&db.pool, "org_a").await.len(), 6);

    apply_ok(
        &p,
        &db.pool,
        org_event(
            "m2",
            "organization.created",
            "org_a",
            "Acme",
            Some("team"),
            T0,
        ),
    )
    .await;
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(
        (w.status.as_str(), w.name.as_deref(), w.plan.as_str()),
        ("deleted", Some("Acme"), "team")
    );

    let jane = Person::new("user_jane", "j");
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m3",
            "organizationMembership.created",
            "mem_1",
            org_data("org_a", "Acme", Some("team"), T0),
            &jane,
            "org:member",
            T0 + 1,
        ),
    )
    .await;
    let m = member(&db.pool, "mem_1").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("workspace_deleted"));
    assert!(
        !audit_actions(&db.pool, "org_a")
            .await
            .contains(&"member.added".to_owned())
    );
    db.drop_database().await;
}

// A membership stores role, Clerk role and identity; org:admin → admin, any other
// role → member, and `[roles]` can map a custom role to admin.
#[tokio::test]
async fn membership_roles_follow_the_role_map() {
    let db = TestDatabase::create().await;
    let p = provisioner_with("[roles]\n\"org:billing\" = \"admin\"\n");
    let org = org_data("org_a", "Acme", None, T0);
    let people: Vec<Person> = (0..4)
        .map(|i| Person::new(&format!("user_{i}"), "x"))
        .collect();
    let roles = ["org:admin", "org:member", "org:billing", "org:viewer"];
    for (i, (who, role)) in people.iter().zip(roles).enumerate() {
        let id = format!("mem_{i}");
        apply_ok(
            &p,
            &db.pool,
            mem_event(
                &format!("m{i}"),
                "organizationMembership.created",
                &id,
                org.clone(),
                who,
                role,
                T0,
            ),
        )
        .await;
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
    apply_ok(
        &plain,
        &db2.pool,
        mem_event(
            "m1",
            "organizationMembership.created",
            "mem_9",
            org,
            &people[2],
            "org:billing",
            T0,
        ),
    )
    .await;
    assert_eq!(member(&db2.pool, "mem_9").await.unwrap().role, "member");
    db.drop_database().await;
    db2.drop_database().await;
}

// A membership that arrives before its organization provisions the workspace from
// the embedded snapshot; the older organization.created is then superseded.
#[tokio::test]
async fn membership_before_organization_provisions_workspace() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = Person::new("user_jane", "j");
    let org = org_data("org_a", "Acme", Some("team"), T0 + 5);
    let out = apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m1",
            "organizationMembership.created",
            "mem_1",
            org,
            &jane,
            "org:admin",
            T0 + 5,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Processed);
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(
        (w.name.as_deref(), w.plan.as_str(), w.status.as_str()),
        (Some("Acme"), "team", "active")
    );
    assert_eq!(quotas(&db.pool, "org_a").await.len(), 6);
    let steps: i64 =
        sqlx::query_scalar("select count(*) from onboarding_steps where workspace_id = 'org_a'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(steps, 4);
    assert_eq!(member(&db.pool, "mem_1").await.unwrap().role, "admin");

    let out = apply_ok(
        &p,
        &db.pool,
        org_event("m2", "organization.created", "org_a", "Acme Old", None, T0),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
    assert_eq!(
        workspace(&db.pool, "org_a").await.unwrap().name.as_deref(),
        Some("Acme")
    );
    db.drop_database().await;
}

// organizationMembership.updated changes the role (member.role_changed); an older
// snapshot is superseded without audit.
#[tokio::test]
async fn membership_updated_changes_role_by_version() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = Person::new("user_jane", "j");
    let org = org_data("org_a", "Acme", None, T0);
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m1",
            "organizationMembership.created",
            "mem_1",
            org.clone(),
            &jane,
            "org:member",
            T0,
        ),
    )
    .await;
    let out = apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m2",
            "organizationMembership.updated",
            "mem_1",
            org.clone(),
            &jane,
            "org:admin",
            T0 + 20,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Processed);
    let m = member(&db.pool, "mem_1").await.unwrap();
    assert_eq!(
        (m.role.as_str(), m.clerk_role.as_str()),
        ("admin", "org:admin")
    );
    let before = audit_count(&db.pool).await;
    let out = apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m3",
            "organizationMembership.updated",
            "mem_1",
            org,
            &jane,
            "org:member",
            T0 + 10,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
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
    db.drop_database().await;
}

// organizationMembership.deleted removes the member for good: a late update of the
// same membership id never reactivates it, but a re-add (new membership id) does
// make the user a member again. An unseen deleted membership is stored as removed.
#[tokio::test]
async fn removed_membership_is_final_and_readd_uses_new_id() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = Person::new("user_jane", "j");
    let org = org_data("org_a", "Acme", None, T0);
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m1",
            "organizationMembership.created",
            "mem_1",
            org.clone(),
            &jane,
            "org:member",
            T0,
        ),
    )
    .await;
    let out = apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m2",
            "organizationMembership.deleted",
            "mem_1",
            org.clone(),
            &jane,
            "org:member",
            T0 + 10,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Processed);
    let m = member(&db.pool, "mem_1").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("membership_deleted"));

    let out = apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m3",
            "organizationMembership.updated",
            "mem_1",
            org.clone(),
            &jane,
            "org:admin",
            T0 + 20,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
    assert!(member(&db.pool, "mem_1").await.unwrap().removed);

    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m4",
            "organizationMembership.created",
            "mem_2",
            org.clone(),
            &jane,
            "org:admin",
            T0 + 30,
        ),
    )
    .await;
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
    let bob = Person::new("user_bob", "b");
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m5",
            "organizationMembership.deleted",
            "mem_3",
            org.clone(),
            &bob,
            "org:member",
            T0 + 40,
        ),
    )
    .await;
    let out = apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m6",
            "organizationMembership.created",
            "mem_3",
            org,
            &bob,
            "org:member",
            T0 + 35,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
    let m = member(&db.pool, "mem_3").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("membership_deleted"));
    db.drop_database().await;
}

// user.updated refreshes the user's display fields in every workspace (audited as
// member.updated in each) and wins over older membership snapshots, in any order.
#[tokio::test]
async fn user_updated_refreshes_display_fields_everywhere() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = Person::new("user_jane", "old");
    let org_a = org_data("org_a", "A", None, T0);
    let org_b = org_data("org_b", "B", None, T0);
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m1",
            "organizationMembership.created",
            "mem_a",
            org_a.clone(),
            &jane,
            "org:member",
            T0,
        ),
    )
    .await;
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m2",
            "organizationMembership.created",
            "mem_b",
            org_b,
            &jane,
            "org:admin",
            T0,
        ),
    )
    .await;

    let renamed = Person::new("user_jane", "new");
    let out = apply_ok(
        &p,
        &db.pool,
        incoming("m3", "user.updated", user_data(&renamed, T0 + 10), T0 + 10),
    )
    .await;
    assert_eq!(out, Outcome::Processed);
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
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m4",
            "organizationMembership.updated",
            "mem_a",
            org_a.clone(),
            &jane,
            "org:admin",
            T0 + 5,
        ),
    )
    .await;
    let m = member(&db.pool, "mem_a").await.unwrap();
    assert_eq!(
        (m.role.as_str(), m.email.as_deref()),
        ("admin", Some("user_jane.new@example.com"))
    );

    // A membership created after the user.updated but older than it takes the user's fields.
    let org_c = org_data("org_c", "C", None, T0);
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m5",
            "organizationMembership.created",
            "mem_c",
            org_c,
            &jane,
            "org:member",
            T0 + 2,
        ),
    )
    .await;
    assert_eq!(
        member(&db.pool, "mem_c").await.unwrap().email.as_deref(),
        Some("user_jane.new@example.com")
    );

    // A newer membership snapshot wins over the user record.
    let newest = Person::new("user_jane", "newest");
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m6",
            "organizationMembership.updated",
            "mem_a",
            org_a,
            &newest,
            "org:admin",
            T0 + 30,
        ),
    )
    .await;
    assert_eq!(
        member(&db.pool, "mem_a").await.unwrap().email.as_deref(),
        Some("user_jane.newest@example.com")
    );

    // An older user.updated is superseded.
    let out = apply_ok(
        &p,
        &db.pool,
        incoming("m7", "user.updated", user_data(&jane, T0 + 1), T0 + 1),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
    assert_eq!(
        member(&db.pool, "mem_b").await.unwrap().email.as_deref(),
        Some("user_jane.new@example.com")
    );
    db.drop_database().await;
}

// user.updated picks the primary email address, and stores an unseen user.
#[tokio::test]
async fn user_updated_uses_primary_email() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = Person::new("user_jane", "j");
    let out = apply_ok(
        &p,
        &db.pool,
        incoming("m1", "user.updated", user_data(&jane, T0), T0),
    )
    .await;
    assert_eq!(out, Outcome::Processed);
    let email: Option<String> =
        sqlx::query_scalar("select email from users where id = 'user_jane'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(email.as_deref(), Some("user_jane.j@example.com"));
    db.drop_database().await;
}

// user.deleted removes the user's memberships everywhere, and for good: a later
// membership of that user is stored as removed; a second delete is superseded.
#[tokio::test]
async fn deleted_user_memberships_end_for_good() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = Person::new("user_jane", "j");
    let org_a = org_data("org_a", "A", None, T0);
    let org_b = org_data("org_b", "B", None, T0);
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m1",
            "organizationMembership.created",
            "mem_a",
            org_a.clone(),
            &jane,
            "org:member",
            T0,
        ),
    )
    .await;
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m2",
            "organizationMembership.created",
            "mem_b",
            org_b,
            &jane,
            "org:admin",
            T0,
        ),
    )
    .await;
    let out = apply_ok(
        &p,
        &db.pool,
        incoming(
            "m3",
            "user.deleted",
            deleted_data("user", "user_jane"),
            T0 + 10,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Processed);
    for id in ["mem_a", "mem_b"] {
        let m = member(&db.pool, id).await.unwrap();
        assert!(m.removed, "{id}");
        assert_eq!(m.removal_reason.as_deref(), Some("user_deleted"));
    }
    assert_eq!(
        audit_actions(&db.pool, "org_b").await.last().unwrap(),
        "member.removed"
    );

    let out = apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m4",
            "organizationMembership.updated",
            "mem_a",
            org_a.clone(),
            &jane,
            "org:admin",
            T0 + 20,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
    apply_ok(
        &p,
        &db.pool,
        mem_event(
            "m5",
            "organizationMembership.created",
            "mem_new",
            org_a,
            &jane,
            "org:admin",
            T0 + 30,
        ),
    )
    .await;
    let m = member(&db.pool, "mem_new").await.unwrap();
    assert!(m.removed);
    assert_eq!(m.removal_reason.as_deref(), Some("user_deleted"));
    let out = apply_ok(
        &p,
        &db.pool,
        incoming(
            "m6",
            "user.deleted",
            deleted_data("user", "user_jane"),
            T0 + 40,
        ),
    )
    .await;
    assert_eq!(out, Outcome::Superseded);
    db.drop_database().await;
}

// A svix id already applied is a Duplicate that writes nothing, also within one
// batch; a superseded or ignored svix id is a Duplicate too.
#[tokio::test]
async fn duplicates_write_nothing() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let e = org_event("m1", "organization.created", "org_a", "Acme", None, T0);
    assert_eq!(apply_ok(&p, &db.pool, e.clone()).await, Outcome::Processed);
    assert_eq!(apply_ok(&p, &db.pool, e.clone()).await, Outcome::Duplicate);
    // The same id with another body is still the same message.
    let renamed = org_event("m1", "organization.updated", "org_a", "Other", None, T0 + 1);
    assert_eq!(apply_ok(&p, &db.pool, renamed).await, Outcome::Duplicate);
    assert_eq!(
        workspace(&db.pool, "org_a").await.unwrap().name.as_deref(),
        Some("Acme")
    );
    assert_eq!(audit(&db.pool, "org_a").await.len(), 1);
    assert_eq!(event_status(&db.pool, "m1").await.unwrap().2, 1);

    let u = org_event(
        "m2",
        "organization.updated",
        "org_a",
        "Acme 2",
        None,
        T0 + 5,
    );
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

    let old = org_event("m3", "organization.updated", "org_a", "Old", None, T0 + 1);
    assert_eq!(
        apply_ok(&p, &db.pool, old.clone()).await,
        Outcome::Superseded
    );
    assert_eq!(apply_ok(&p, &db.pool, old).await, Outcome::Duplicate);
    db.drop_database().await;
}

// Types this service does not handle are recorded as ignored, and only once.
#[tokio::test]
async fn unhandled_type_is_ignored() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let e = incoming_raw(
        "m1",
        "organizationInvitation.created",
        serde_json::to_vec(&common::fixture("organizationInvitation.created")).unwrap(),
    );
    assert_eq!(apply_ok(&p, &db.pool, e.clone()).await, Outcome::Ignored);
    assert_eq!(event_status(&db.pool, "m1").await.unwrap().0, "ignored");
    assert_eq!(apply_ok(&p, &db.pool, e).await, Outcome::Duplicate);
    assert_eq!(audit_count(&db.pool).await, 0);
    db.drop_database().await;
}

// The Clerk example payloads apply as one consistent story.
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
        let out = apply_ok(&p, &db.pool, incoming_raw(&format!("msg_{i}"), name, body)).await;
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
    db.drop_database().await;
}

// Malformed payloads are payload errors naming the problem; nothing is written.
#[tokio::test]
async fn malformed_payloads_name_the_problem() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = Person::new("user_jane", "j");
    let org = org_data("org_a", "Acme", None, T0);
    let good_mem = membership_data("mem_1", org.clone(), &jane, "org:member", T0, T0);

    let mut no_org = good_mem.clone();
    no_org.as_object_mut().unwrap().remove("organization");
    let mut no_user_id = good_mem.clone();
    no_user_id["public_user_data"]
        .as_object_mut()
        .unwrap()
        .remove("user_id");
    let mut no_user = good_mem.clone();
    no_user["public_user_data"] = Value::Null;
    let mut bad_version = good_mem.clone();
    bad_version["updated_at"] = json!("yesterday");
    let mut bad_org_version = good_mem.clone();
    bad_org_version["organization"]["updated_at"] = json!(1.5);
    let mut bad_name = org.clone();
    bad_name["name"] = json!(42);
    let mut null_id = org.clone();
    null_id["id"] = Value::Null;

    let cases: Vec<(Incoming, &str)> = vec![
        (
            incoming("b1", "organizationMembership.created", no_org, T0),
            "data.organization: missing",
        ),
        (
            incoming("b2", "organizationMembership.created", no_user_id, T0),
            "data.public_user_data.user_id: missing",
        ),
        (
            incoming("b3", "organizationMembership.updated", no_user, T0),
            "data.public_user_data: expected an object, got null",
        ),
        (
            incoming("b4", "organizationMembership.updated", bad_version, T0),
            "data.updated_at: expected an integer, got a string",
        ),
        (
            incoming("b5", "organizationMembership.created", bad_org_version, T0),
            "data.organization.updated_at: expected an integer, got 1.5",
        ),
        (
            incoming("b6", "organization.created", bad_name, T0),
            "data.name: expected a string, got a number",
        ),
        (
            incoming("b7", "organization.updated", null_id, T0),
            "data.id: expected a string, got null",
        ),
        (
            incoming("b8", "organization.created", json!("not an object"), T0),
            "data: expected an object, got a string",
        ),
        (
            incoming(
                "b9",
                "user.deleted",
                json!({"object": "user", "deleted": true}),
                T0,
            ),
            "data.id: missing",
        ),
        (
            incoming("b10", "user.updated", json!({"id": "user_1"}), T0),
            "data.updated_at: missing",
        ),
        (
            incoming_raw("b11", "organization.created", b"{not json".to_vec()),
            "body is not valid JSON",
        ),
        (
            // The message's type property disagrees with the body.
            incoming_raw(
                "b12",
                "organization.updated",
                common::envelope("organization.created", org, T0),
            ),
            "message type `organization.updated` does not match the body's type `organization.created`",
        ),
        (
            incoming_raw(
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
    db.drop_database().await;
}

// A batch with a malformed event and one PostgreSQL refuses (a NUL character)
// still commits every other event; the poisoned ones fail alone as payload errors.
#[tokio::test]
async fn poisoned_batch_commits_the_others() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let mut malformed = org_data("org_bad", "Bad", None, T0);
    malformed["updated_at"] = json!(null);
    let batch = vec![
        org_event("m1", "organization.created", "org_a", "A", None, T0),
        incoming("m2", "organization.created", malformed, T0),
        org_event(
            "m3",
            "organization.created",
            "org_nul",
            "Nul\u{0}Name",
            None,
            T0,
        ),
        org_event("m4", "organization.created", "org_b", "B", Some("team"), T0),
        org_event("m1", "organization.created", "org_a", "A", None, T0),
    ];
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
    db.drop_database().await;
}

// Audit rows carry the event's actor and svix id; each action names its subject.
#[tokio::test]
async fn audit_rows_carry_actor_and_event_id() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let jane = Person::new("user_jane", "j");
    let mut e = mem_event(
        "msg_replayed",
        "organizationMembership.created",
        "mem_1",
        org_data("org_a", "Acme", None, T0),
        &jane,
        "org:admin",
        T0,
    );
    e.actor = Actor::Replay;
    apply_ok(&p, &db.pool, e).await;
    let mut e = incoming(
        "msg_reconciled",
        "organizationMembership.deleted",
        membership_data(
            "mem_1",
            org_data("org_a", "Acme", None, T0),
            &jane,
            "org:admin",
            T0,
            T0,
        ),
        T0 + 10,
    );
    e.actor = Actor::Reconcile;
    apply_ok(&p, &db.pool, e).await;
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
    db.drop_database().await;
}
