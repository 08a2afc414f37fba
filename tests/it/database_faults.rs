//! PostgreSQL faults that are not an outage (issue 9 items 5 and 10): a database
//! that only reads for a while, a workspace row locked past `lock_timeout`, and an
//! intake-only process started while PostgreSQL is unreachable. Every test breaks
//! only what it owns: its own database (made read-only with `ALTER DATABASE`, its
//! own sessions ended), a row of its own, or a TCP proxy it cuts.

use std::time::Duration;

use crate::common::proxy::Proxy;
use crate::common::worker::*;
use crate::common::*;
use serde_json::{Value, json};
use sqlx::{Connection, PgPool};

/// `organization.created` or `.updated` for `id`, at version `updated_at`.
fn org_event(kind: &str, id: &str, name: &str, updated_at: i64) -> Vec<u8> {
    let mut data = fixture("organization.created")["data"].clone();
    data["id"] = json!(id);
    data["name"] = json!(name);
    data["slug"] = json!(id.replace('_', "-"));
    data["updated_at"] = json!(updated_at);
    envelope(kind, data, now_secs() * 1000)
}

/// `organizationMembership.created` of `user` in `org`.
fn membership_created(org: &str, user: &str) -> Vec<u8> {
    let mut data = fixture("organizationMembership.created")["data"].clone();
    data["id"] = json!(format!("orgmem_{user}"));
    data["organization"]["id"] = json!(org);
    data["public_user_data"]["user_id"] = json!(user);
    envelope("organizationMembership.created", data, now_secs() * 1000)
}

/// `organizationMembership.created` whose embedded organization is a newer snapshot
/// (`name` at `version`), so applying it writes the workspace row.
fn membership_created_renaming(org: &str, user: &str, name: &str, version: i64) -> Vec<u8> {
    let mut data = fixture("organizationMembership.created")["data"].clone();
    data["id"] = json!(format!("orgmem_{user}"));
    data["organization"]["id"] = json!(org);
    data["organization"]["name"] = json!(name);
    data["organization"]["updated_at"] = json!(version);
    data["public_user_data"]["user_id"] = json!(user);
    envelope("organizationMembership.created", data, now_secs() * 1000)
}

/// A connection to the server's `postgres` database, for `ALTER DATABASE`.
async fn admin() -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&format!("{}/postgres", base_database_url()))
        .await
        .expect("PostgreSQL reachable")
}

/// Processing-log rows of the run (`svix_id like`) with this status.
async fn with_status(db: &PgPool, like: &str, status: &str) -> i64 {
    sqlx::query_scalar("select count(*) from events where svix_id like $1 and status = $2")
        .bind(like)
        .bind(status)
        .fetch_one(db)
        .await
        .unwrap()
}

/// Events of the run that were applied: processed, or superseded by a newer
/// version applied first (the held events come back in any order).
async fn applied(db: &PgPool, like: &str) -> i64 {
    with_status(db, like, "processed").await + with_status(db, like, "superseded").await
}

/// Waits until `n` events of the run are applied; false if they never were.
async fn wait_applied(db: &PgPool, like: &str, n: i64) -> bool {
    eventually(Duration::from_secs(120), || async {
        (applied(db, like).await == n).then_some(())
    })
    .await
    .is_some()
}

/// Milliseconds since the epoch: a version newer than any fixture's.
fn now_ms() -> i64 {
    now_secs() * 1000
}

/// POSTs a JSON body to the read API with the development token.
async fn post_api(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.client
        .post(format!("{}{}", app.address, path))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

/// The `error.code` of an error answer.
async fn error_code(res: reqwest::Response) -> String {
    let body: Value = res.json().await.expect("JSON error body");
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The test's database made read-only for 20 s under a stream of events (the
/// server-side setting, and the app's sessions ended so they reconnect read-only,
/// as after a failover to a standby): nothing is dead-lettered, the read API still
/// reads and answers a write 503 `database_unavailable`; once it writes again the
/// pooled read-only sessions are replaced and every event is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_database_holds_events_and_dead_letters_none() {
    trace();
    // Arrange: a pool of one connection, so that once the database only reads,
    // every connection the app has only reads (with more, a connection opened after
    // the restore would let some events through by chance).
    let app = spawn_app_with(TestOptions {
        worker: true,
        extra_config: "[database]\nmax_connections = 1\n".into(),
        ..TestOptions::default()
    })
    .await;
    let db_name = app.iso.database.clone();
    let direct = direct_pool(&app.iso).await;
    let b = app.settings.broker.clone();
    let run = random_id(8);
    let like = format!("msg_{run}_%");
    let first_org = format!("org_{run}_first");
    let first = format!("msg_{run}_first");
    let res = app
        .post_signed(
            &first,
            &org_event("organization.created", &first_org, "First", now_ms()),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert!(wait_status(&direct, &first, "processed").await);

    // Act: read-only, and the app's sessions ended so every new one only reads.
    let mut admin = admin().await;
    let alter = format!("alter database \"{db_name}\" set default_transaction_read_only = on");
    sqlx::query(sqlx::AssertSqlSafe(alter))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(
        "select pg_terminate_backend(pid) from pg_stat_activity \
         where datname = $1 and application_name = 'callmine-provisioner' \
           and pid <> pg_backend_pid()",
    )
    .bind(&db_name)
    .execute(&mut admin)
    .await
    .unwrap();
    let read_only_until = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut n = 1;
    let mut i = 0;
    while tokio::time::Instant::now() < read_only_until {
        let org = format!("org_{run}_{}", i / 2);
        let body = if i % 2 == 0 {
            org_event("organization.created", &org, &format!("Org {i}"), now_ms())
        } else {
            membership_created(&org, &format!("user_{run}_{i}"))
        };
        let res = app.post_signed(&format!("msg_{run}_{i}"), &body).await;
        assert_eq!(
            res.status(),
            200,
            "intake does not need PostgreSQL to write"
        );
        n += 1;
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // While it only reads: nothing applied, nothing dead, reads answer, writes 503.
    assert_eq!(
        applied(&direct, &like).await,
        1,
        "nothing applied while read-only"
    );
    assert_eq!(
        queue_depth(&b.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(
        app.get_api(&format!("/v1/workspaces/{first_org}"))
            .await
            .status(),
        200,
        "a read-only database still answers reads"
    );
    let skip = format!("/v1/workspaces/{first_org}/onboarding/hubspot");
    let res = post_api(&app, &skip, json!({"status": "skipped"})).await;
    assert_eq!(res.status(), 503, "a write to a read-only database");
    assert!(res.headers().get("retry-after").is_some());
    assert_eq!(error_code(res).await, "database_unavailable");

    // The database writes again; the app's read-only sessions are NOT ended.
    let reset = format!("alter database \"{db_name}\" reset default_transaction_read_only");
    sqlx::query(sqlx::AssertSqlSafe(reset))
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;

    // Assert: every event processed, none dead; the API writes again.
    assert!(
        wait_applied(&direct, &like, n).await,
        "every event applied after the database writes again ({} of {n})",
        applied(&direct, &like).await
    );
    assert_eq!(with_status(&direct, &like, "dead").await, 0);
    assert_eq!(
        queue_depth(&b.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
    let written = eventually(Duration::from_secs(30), || async {
        (post_api(&app, &skip, json!({"status": "skipped"}))
            .await
            .status()
            == 200)
            .then_some(())
    })
    .await;
    assert!(written.is_some(), "the read API writes again");
    app.stop().await.unwrap();
    assert_eq!(queue_depth(&b.queue).await, 0, "everything was acked");
}

/// A workspace row locked by another session (`select … for update` in an open
/// transaction) far past `lock_timeout`: the events that need it are held, not
/// dead-lettered, an event of another workspace goes ahead meanwhile, and once the
/// lock is released every event is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_locked_past_lock_timeout_holds_events_and_dead_letters_none() {
    trace();
    // Arrange: lock_timeout 300 ms; retry queues of 200 and 400 ms.
    let app = spawn_app_with(TestOptions {
        worker: true,
        extra_config: "[database]\nlock_timeout_ms = 300\n".into(),
        ..TestOptions::default()
    })
    .await;
    let direct = direct_pool(&app.iso).await;
    let b = app.settings.broker.clone();
    let run = random_id(8);
    let like = format!("msg_{run}_%");
    let locked = format!("org_{run}_locked");
    let version = now_ms();
    let created = format!("msg_{run}_created");
    let res = app
        .post_signed(
            &created,
            &org_event("organization.created", &locked, "Locked", version),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert!(wait_status(&direct, &created, "processed").await);

    // Act: another session holds the workspace row.
    let mut holder = sqlx::PgConnection::connect(&app.iso.database_url())
        .await
        .unwrap();
    sqlx::query("begin").execute(&mut holder).await.unwrap();
    sqlx::query("select id from workspaces where id = $1 for update")
        .bind(&locked)
        .execute(&mut holder)
        .await
        .unwrap();
    let held_from = tokio::time::Instant::now();
    let mut n = 1;
    for i in 0..10 {
        let body = if i % 2 == 0 {
            org_event(
                "organization.updated",
                &locked,
                &format!("Renamed {i}"),
                version + 10 + i,
            )
        } else {
            // A membership of a known workspace writes the workspace row only when
            // its embedded organization is newer (members have no foreign key to
            // workspaces, so inserting one takes no lock on the row).
            membership_created_renaming(
                &locked,
                &format!("user_{run}_{i}"),
                &format!("Renamed {i}"),
                version + 10 + i,
            )
        };
        let res = app.post_signed(&format!("msg_{run}_{i}"), &body).await;
        assert_eq!(res.status(), 200);
        n += 1;
    }
    let other = format!("msg_{run}_other");
    let res = app
        .post_signed(
            &other,
            &org_event(
                "organization.created",
                &format!("org_{run}_other"),
                "Other",
                now_ms(),
            ),
        )
        .await;
    assert_eq!(res.status(), 200);
    n += 1;
    assert!(
        wait_status(&direct, &other, "processed").await,
        "another workspace's event goes ahead while the row is locked"
    );
    // Hold the lock for a while: many lock timeouts, well past every retry queue.
    tokio::time::sleep_until(held_from + Duration::from_secs(8)).await;
    assert_eq!(
        applied(&direct, &like).await,
        2,
        "nothing that needs the locked row was applied"
    );
    assert_eq!(
        queue_depth(&b.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
    sqlx::query("rollback").execute(&mut holder).await.unwrap();
    let _ = holder.close().await;

    // Assert
    assert!(
        wait_applied(&direct, &like, n).await,
        "every event applied after the lock is released ({} of {n})",
        applied(&direct, &like).await
    );
    assert_eq!(with_status(&direct, &like, "dead").await, 0);
    assert_eq!(
        queue_depth(&b.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
    let name: String = sqlx::query_scalar("select name from workspaces where id = $1")
        .bind(&locked)
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(name, "Renamed 9", "the newest snapshot won");
    app.stop().await.unwrap();
}

/// `serve --no-worker` started while PostgreSQL is unreachable: it starts, queues
/// signed webhooks (200), and its read API answers 503 `database_unavailable`;
/// once PostgreSQL answers it creates the database and applies the migrations by
/// itself, and the read API answers (404 for a workspace no worker provisioned
/// yet; 200 once a worker applied the queued events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_starts_and_queues_while_postgres_is_unreachable() {
    trace();
    // Arrange: PostgreSQL only through a proxy, cut before the process starts.
    let iso = Isolation::new();
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    proxy.cut().await;
    let proxied = format!("postgres://postgres@{}/{}", proxy.addr, iso.database);
    let intake = spawn_app_isolated(
        iso.clone(),
        TestOptions {
            worker: false,
            database_url: Some(proxied),
            extra_config: "[database]\nacquire_timeout_ms = 500\n".into(),
            ..TestOptions::default()
        },
    )
    .await;
    let b = intake.settings.broker.clone();
    let run = random_id(8);
    let org = format!("org_{run}");

    // Act: signed events while PostgreSQL is unreachable.
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = format!("msg_{run}_{i}");
        let body = if i == 0 {
            org_event("organization.created", &org, "Intake Only", now_ms())
        } else {
            membership_created(&org, &format!("user_{run}_{i}"))
        };
        let res = intake.post_signed(&id, &body).await;
        assert_eq!(res.status(), 200, "queued without PostgreSQL");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["status"], "queued");
        ids.push(id);
    }
    assert_eq!(
        queue_depth(&b.queue).await,
        5,
        "every event is in the broker"
    );
    let res = intake.get_api(&format!("/v1/workspaces/{org}")).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("retry-after").is_some());
    assert_eq!(error_code(res).await, "database_unavailable");
    let res = intake
        .client
        .get(format!("{}/readyz", intake.address))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let ready: Value = res.json().await.unwrap();
    assert_eq!(ready["checks"]["database"], "unavailable");
    assert_eq!(ready["checks"]["broker"], "ok");

    // PostgreSQL answers again.
    proxy.restore();

    // Assert: the read API answers (the database was created and migrated).
    let answered = eventually(Duration::from_secs(60), || async {
        let status = intake
            .get_api(&format!("/v1/workspaces/{org}"))
            .await
            .status();
        (status == 404).then_some(())
    })
    .await;
    assert!(
        answered.is_some(),
        "the read API answers once PostgreSQL does"
    );
    let ready = eventually(Duration::from_secs(30), || async {
        let res = intake
            .client
            .get(format!("{}/readyz", intake.address))
            .send()
            .await
            .ok()?;
        (res.status() == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "ready once PostgreSQL answers");
    // A worker applies what intake queued; the same intake process reads it.
    let worker = spawn_app_isolated(
        iso.clone(),
        TestOptions {
            worker: true,
            ..TestOptions::default()
        },
    )
    .await;
    for id in &ids {
        assert!(
            wait_status(&worker.db, id, "processed").await,
            "{id} processed"
        );
    }
    let res = intake.get_api(&format!("/v1/workspaces/{org}")).await;
    assert_eq!(res.status(), 200);
    let workspace: Value = res.json().await.unwrap();
    assert_eq!(workspace["member_count"], 4);
    worker.stop().await.unwrap();
    intake.stop().await.unwrap();
    assert_eq!(queue_depth(&b.queue).await, 0);
}
