//! `provisioner events`: the processing log, read from table `events` with rows the
//! test writes by SQL (DESIGN §1).

use crate::common::ops::*;
use crate::common::*;
use chrono::{DateTime, Duration, Utc};
use provisioner::config::Settings;
use provisioner::store::events::{self, EventFilter, EventsError};
use provisioner::store::model::EventStatus;
use sqlx::PgPool;

async fn database() -> (Isolation, Settings, PgPool) {
    let iso = Isolation::new();
    let settings = test_settings(&iso, &TestOptions::default());
    let pool = provisioner::db::prepare(&settings.database)
        .await
        .expect("test database");
    (iso, settings, pool)
}

/// Writes one processing-log row, `minutes_ago` before `base`.
async fn row(
    pool: &PgPool,
    base: DateTime<Utc>,
    id: &str,
    kind: &str,
    workspace: Option<&str>,
    status: &str,
    minutes_ago: i64,
) {
    let at = base - Duration::minutes(minutes_ago);
    let error = (status == "dead").then_some("data.id is missing");
    sqlx::query(
        "insert into events (svix_id, type, workspace_id, status, error, attempts, received_at, processed_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(kind)
    .bind(workspace)
    .bind(status)
    .bind(error)
    .bind(if status == "dead" { 3 } else { 1 })
    .bind(at - Duration::seconds(2))
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
}

/// A small history: ids e1 (oldest) … e6 (newest).
async fn history(pool: &PgPool) -> DateTime<Utc> {
    let base = Utc::now();
    row(
        pool,
        base,
        "msg_e1",
        "organization.created",
        Some("org_a"),
        "processed",
        60,
    )
    .await;
    row(
        pool,
        base,
        "msg_e2",
        "organizationMembership.created",
        Some("org_a"),
        "processed",
        50,
    )
    .await;
    row(
        pool,
        base,
        "msg_e3",
        "organization.created",
        Some("org_b"),
        "dead",
        40,
    )
    .await;
    row(pool, base, "msg_e4", "user.updated", None, "ignored", 30).await;
    row(
        pool,
        base,
        "msg_e5",
        "organization.updated",
        Some("org_a"),
        "superseded",
        20,
    )
    .await;
    row(
        pool,
        base,
        "msg_e6",
        "organization.deleted",
        Some("org_b"),
        "processed",
        10,
    )
    .await;
    base
}

fn ids(records: &[events::EventRecord]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

/// `events list` is newest first, and each filter narrows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_is_newest_first_and_each_filter_narrows_it() {
    let (_iso, settings, pool) = database().await;
    let base = history(&pool).await;
    let list = |f: EventFilter| {
        let (settings, pool) = (settings.clone(), pool.clone());
        async move { events::list(&settings, &pool, &f).await.unwrap() }
    };

    let all = list(EventFilter::default()).await;
    assert_eq!(
        ids(&all),
        ["msg_e6", "msg_e5", "msg_e4", "msg_e3", "msg_e2", "msg_e1"]
    );

    let dead = list(EventFilter {
        status: Some(EventStatus::Dead),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&dead), ["msg_e3"]);
    assert_eq!(dead[0].error.as_deref(), Some("data.id is missing"));
    assert_eq!(dead[0].attempts, 3);

    let org_a = list(EventFilter {
        workspace_id: Some("org_a".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&org_a), ["msg_e5", "msg_e2", "msg_e1"]);

    let created = list(EventFilter {
        kind: Some("organization.created".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&created), ["msg_e3", "msg_e1"]);

    let recent = list(EventFilter {
        since: Some(base - Duration::minutes(35)),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&recent), ["msg_e6", "msg_e5", "msg_e4"]);

    let two = list(EventFilter {
        limit: Some(2),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&two), ["msg_e6", "msg_e5"]);

    let combined = list(EventFilter {
        status: Some(EventStatus::Processed),
        workspace_id: Some("org_b".into()),
        since: Some(base - Duration::minutes(90)),
        ..Default::default()
    })
    .await;
    assert_eq!(ids(&combined), ["msg_e6"]);
}

/// `events list` without a limit returns the newest 50 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_limit_is_fifty() {
    let (_iso, settings, pool) = database().await;
    let base = Utc::now();
    for i in 0..55 {
        row(
            &pool,
            base,
            &format!("msg_{i:02}"),
            "user.updated",
            None,
            "ignored",
            i,
        )
        .await;
    }
    let all = events::list(&settings, &pool, &EventFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 50);
    assert_eq!(all[0].id, "msg_00", "newest first");
}

/// `events show` finds one event by id; an unknown id is not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_finds_one_event_and_unknown_is_not_found() {
    let (_iso, settings, pool) = database().await;
    history(&pool).await;

    let e = events::show(&settings, &pool, "msg_e3").await.unwrap();
    assert_eq!(e.kind, "organization.created");
    assert_eq!(e.workspace_id.as_deref(), Some("org_b"));
    assert_eq!(e.status, EventStatus::Dead);

    let err = events::show(&settings, &pool, "msg_nope")
        .await
        .unwrap_err();
    assert!(matches!(err, EventsError::NotFound(_)), "{err}");
}

/// The `provisioner events` binary lists as JSON, shows one event, and refuses bad
/// arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_lists_as_json_shows_and_refuses_bad_arguments() {
    let (iso, settings, pool) = database().await;
    history(&pool).await;
    let cfg = config_file(&iso, "");
    let env = [("DATABASE_URL", settings.database.url.expose().to_owned())];

    let out = run_binary(&cfg, &env, &["events", "list", "--json", "--org", "org_a"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let got: Vec<&str> = doc["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["msg_e5", "msg_e2", "msg_e1"]);
    assert_eq!(doc["data"][0]["type"], "organization.updated");
    assert_eq!(doc["data"][0]["status"], "superseded");

    let out = run_binary(
        &cfg,
        &env,
        &["events", "list", "--status", "dead", "--limit", "5"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("msg_e3") && !stdout(&out).contains("msg_e1"));

    let out = run_binary(&cfg, &env, &["events", "show", "msg_e4", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["id"], "msg_e4");
    assert_eq!(doc["status"], "ignored");
    assert!(doc["received_at"].as_str().unwrap().ends_with('Z'));

    let out = run_binary(&cfg, &env, &["events", "show", "msg_unknown"]).await;
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(
        line.contains("no event with id msg_unknown") && line.contains("404"),
        "{line}"
    );

    for bad in [
        &["events", "list", "--since", "yesterday"][..],
        &["events", "list", "--status", "bogus"][..],
        &["events", "list", "--limit", "0"][..],
    ] {
        let out = run_binary(&cfg, &env, bad).await;
        assert!(!out.status.success(), "{bad:?}");
    }
    let out = run_binary(&cfg, &env, &["events", "list", "--help"]).await;
    assert!(out.status.success());
    let _ = std::fs::remove_file(cfg);
}

/// `provisioner events` against an unreachable database names it in its error, without the
/// password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_names_an_unreachable_database_without_its_password() {
    let iso = Isolation::new();
    let cfg = config_file(&iso, "");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("postgres://ops:pg-s3cr3t@127.0.0.1:{port}/provisioner");

    let out = run_binary(&cfg, &[("DATABASE_URL", url)], &["events", "list"]).await;

    let redacted = format!("postgres://ops:***@127.0.0.1:{port}/provisioner");
    assert_failed_naming(&out, &redacted, "pg-s3cr3t", "events list");
    let _ = std::fs::remove_file(cfg);
}

/// A password given as a query parameter (sqlx reads `password=`; libpq's
/// `sslpassword=` is not read, and would be logged by the driver with its value) is
/// hidden like the userinfo one, in the error and in every log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_names_an_unreachable_database_without_its_query_parameter_password() {
    let iso = Isolation::new();
    let cfg = config_file(&iso, "");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!(
        "postgres://ops@127.0.0.1:{port}/provisioner?password=pg-qu3ry&sslpassword=pg-ssl-s3cr3t"
    );

    let out = run_binary(
        &cfg,
        &[("DATABASE_URL", url), ("RUST_LOG", "debug".into())],
        &["events", "list"],
    )
    .await;

    let redacted =
        format!("postgres://ops@127.0.0.1:{port}/provisioner?password=***&sslpassword=***");
    assert_failed_naming(&out, &redacted, "pg-qu3ry", "events list");
    assert_failed_naming(&out, &redacted, "pg-ssl-s3cr3t", "events list");
    let _ = std::fs::remove_file(cfg);
}
