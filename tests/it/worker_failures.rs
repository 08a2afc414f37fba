//! The worker under failure (issue 3 "Failure behaviour"): PostgreSQL outage, a
//! worker process killed mid-stream, a message that keeps crashing workers, and a
//! broker outage — against the real services, outages through a TCP proxy.

use std::process::Stdio;
use std::time::Duration;

use crate::common;
use crate::common::proxy::Proxy;
use crate::common::worker::*;
use crate::common::*;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use serde_json::json;
use sqlx::PgPool;

fn membership_created(org: &str, user: &str, n: usize) -> Vec<u8> {
    let mut data = fixture("organizationMembership.created")["data"].clone();
    data["id"] = json!(format!("orgmem_{org}_{n}"));
    data["organization"]["id"] = json!(org);
    data["public_user_data"]["user_id"] = json!(user);
    envelope("organizationMembership.created", data, now_secs() * 1000)
}

/// Audit rows written twice for the same event, action and subject (must be none).
async fn doubled_audit_rows(db: &PgPool, like: &str) -> i64 {
    count(
        db,
        "select count(*) from (select 1 from audit_log where event_id like $1
         group by event_id, action, subject having count(*) > 1) doubled",
        like,
    )
    .await
}

/// PostgreSQL unreachable: events are held, then parked in the longest retry queue,
/// never dead-lettered; once it is back every event is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_holds_events_and_loses_none() {
    trace();
    // Arrange: the app reaches PostgreSQL only through a proxy we can cut.
    let iso = Isolation::new();
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let proxied = format!("postgres://postgres@{}/{}", proxy.addr, iso.database);
    let app = spawn_app_isolated(
        iso.clone(),
        TestOptions {
            worker: true,
            database_url: Some(proxied),
            extra_config:
                "[database]\nacquire_timeout_ms = 500\n[worker]\ndb_retry_max_ms = 1500\n".into(),
            ..TestOptions::default()
        },
    )
    .await;
    let direct = direct_pool(&iso).await;
    let b = app.settings.broker.clone();
    let topology = provisioner::broker::Topology::new(&b, &app.settings.worker);
    let longest = topology.retry_queues.last().unwrap().0.clone();
    let run = random_id(8);
    let first = format!("msg_{run}_first");
    assert_eq!(
        app.post_signed(&first, &org_created(&format!("org_{run}_first"), "First"))
            .await
            .status(),
        200
    );
    assert!(wait_status(&direct, &first, "processed").await);
    let audits_per_event = count(
        &direct,
        "select count(*) from audit_log where event_id = $1",
        &first,
    )
    .await;

    // Act: cut PostgreSQL, send events (intake does not need it).
    proxy.cut().await;
    let n = 20;
    for i in 0..n {
        let id = format!("msg_{run}_{i}");
        let res = app
            .post_signed(
                &id,
                &org_created(&format!("org_{run}_{i}"), &format!("Org {i}")),
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    // The worker gives up holding in process and parks them in the longest retry
    // queue, from which they come back to the work queue, and so on.
    assert!(
        wait_depth(&longest, 1).await,
        "held events were parked in {longest}"
    );
    assert_eq!(
        queue_depth(&b.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
    let like = format!("msg_{run}_%");
    assert_eq!(
        count(
            &direct,
            "select count(*) from events where svix_id like $1",
            &like
        )
        .await,
        1,
        "nothing applied while PostgreSQL is unreachable"
    );
    proxy.restore();

    // Assert: every event applied exactly once, none dead.
    let all = eventually(Duration::from_secs(60), || async {
        (count(
            &direct,
            "select count(*) from events where svix_id like $1 and status = 'processed'",
            &like,
        )
        .await
            == n + 1)
            .then_some(())
    })
    .await;
    assert!(all.is_some(), "every event applied after the outage");
    let audits = count(
        &direct,
        "select count(*) from audit_log where event_id like $1",
        &like,
    )
    .await;
    assert_eq!(
        audits,
        audits_per_event * (n + 1),
        "each event audited once"
    );
    assert_eq!(doubled_audit_rows(&direct, &like).await, 0);
    app.stop().await.unwrap();
    assert_eq!(
        queue_depth(&b.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
    for name in topology.queue_names() {
        if name != b.dead_letter_queue {
            assert_eq!(queue_depth(&name).await, 0, "{name} is empty");
        }
    }
}

/// A `provisioner worker` child process on the test's database and queues.
fn spawn_worker_process(iso: &Isolation, config: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .arg("worker")
        .env("PROVISIONER_CONFIG", config)
        .env("DATABASE_URL", iso.database_url())
        .env("AMQP_URL", base_amqp_url())
        .env("PROVISIONER_ENV", "development")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("provisioner binary starts")
}

/// A worker process killed with SIGKILL mid-stream leaves its unacked events to be
/// redelivered; after another worker drains the queue every event is applied exactly
/// once, and SIGTERM stops a worker cleanly with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_process_loses_and_doubles_nothing() {
    trace();
    // Arrange: the app prepares the database and queues; workers are child processes.
    let app = spawn_app().await;
    let iso = app.iso.clone();
    let b = app.settings.broker.clone();
    let config = common::ops::config_file(
        &iso,
        "[worker]\nconcurrency = 16\nbatch_size = 8\nbatch_wait_ms = 2\nretry_delays_ms = [200, 400]\n",
    );
    let publisher = test_publisher(&app.settings).await;
    let run = random_id(8);
    let n = 900;
    for i in 0..n {
        let org = format!("org_{run}_{}", i / 6);
        let (body, kind) = if i % 6 == 0 {
            (
                org_created(&org, &format!("Org {i}")),
                "organization.created",
            )
        } else {
            (
                membership_created(&org, &format!("user_{run}_{i}"), i),
                "organizationMembership.created",
            )
        };
        publisher
            .publish_event(&body, &format!("msg_{run}_{i}"), kind)
            .await
            .expect("published");
    }
    let like = format!("msg_{run}_%");

    // Act: a worker starts on the backlog and is killed mid-stream.
    let mut first = spawn_worker_process(&iso, &config);
    let started = eventually(Duration::from_secs(60), || async {
        (count(
            &app.db,
            "select count(*) from events where svix_id like $1",
            &like,
        )
        .await
            >= 100)
            .then_some(())
    })
    .await;
    assert!(started.is_some(), "the first worker made progress");
    first.kill().await.expect("SIGKILL");
    let applied_at_kill = count(
        &app.db,
        "select count(*) from events where svix_id like $1",
        &like,
    )
    .await;
    assert!(
        applied_at_kill < n as i64,
        "killed mid-stream ({applied_at_kill} of {n})"
    );
    let mut second = spawn_worker_process(&iso, &config);

    // Assert
    let drained = eventually(Duration::from_secs(120), || async {
        (count(
            &app.db,
            "select count(*) from events where svix_id like $1",
            &like,
        )
        .await
            == n as i64)
            .then_some(())
    })
    .await;
    assert!(drained.is_some(), "every event applied after the restart");
    let members: i64 =
        sqlx::query_scalar("select count(*) from members where workspace_id like $1")
            .bind(format!("org_{run}_%"))
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        members,
        (n - n / 6) as i64,
        "one member per membership event"
    );
    assert_eq!(
        doubled_audit_rows(&app.db, &like).await,
        0,
        "no audit row doubled"
    );
    assert_eq!(queue_depth(&b.dead_letter_queue).await, 0);

    // SIGTERM: the worker drains and exits 0.
    let pid = second.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), second.wait())
        .await
        .expect("the worker exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    assert_eq!(queue_depth(&b.queue).await, 0, "everything was acked");
    let _ = std::fs::remove_file(config);
    app.stop().await.unwrap();
}

/// Takes the next message off `queue` without acking it and drops the connection,
/// as a worker that crashes mid-event does; returns its `x-delivery-count`.
async fn crash_while_holding(queue: &str) -> Option<Option<i64>> {
    let (conn, ch) = broker_channel().await;
    let got = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()?;
    let count = header_int(&got.delivery.properties, "x-delivery-count");
    drop(got);
    let _ = conn.close(320, "crash".into()).await;
    Some(count)
}

/// RabbitMQ 3.10's delivery limit N allows N + 1 deliveries (x-delivery-count 0 or
/// absent, then 1..N) and then dead-letters the message itself with x-death reason
/// delivery_limit: the threshold the worker's own check is built on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_dead_letters_after_limit_plus_one_deliveries() {
    trace();
    let app = spawn_app_with(TestOptions {
        extra_config: "[broker]\ndelivery_limit = 2\n".into(),
        ..TestOptions::default()
    })
    .await;
    let b = app.settings.broker.clone();
    let id = format!("msg_{}", random_id(16));
    let body = org_created(&format!("org_{}", random_id(10)), "Crashy");
    publish_raw(
        &b.exchange,
        "organization.created",
        &body,
        event_props(&id, "organization.created"),
    )
    .await;

    let mut counts = Vec::new();
    for _ in 0..3 {
        counts.push(crash_while_holding(&b.queue).await.expect("delivered"));
    }

    // basic.get shows the first delivery's count as 0, basic.consume omits it.
    let counts: Vec<i64> = counts.into_iter().map(|c| c.unwrap_or(0)).collect();
    assert_eq!(counts, [0, 1, 2]);
    assert!(
        wait_depth(&b.dead_letter_queue, 1).await,
        "the broker dead-lettered it"
    );
    assert_eq!(queue_depth(&b.queue).await, 0);
    let dead = drain_queue(&b.dead_letter_queue).await;
    let headers = dead[0].delivery.properties.headers().clone().unwrap();
    let reason = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(death)) => match death.inner().get("reason") {
                Some(AMQPValue::LongString(r)) => r.to_string(),
                other => panic!("reason: {other:?}"),
            },
            other => panic!("death: {other:?}"),
        },
        other => panic!("x-death: {other:?}"),
    };
    assert_eq!(reason, "delivery_limit");
    app.stop().await.unwrap();
}

/// A message that crashed workers up to its last allowed delivery is dead-lettered by
/// the worker (class delivery-limit, with its reason) instead of being processed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_crashing_workers_is_dead_lettered_at_the_delivery_limit() {
    trace();
    // Arrange: delivery_limit 2; two "workers" take the message and crash.
    let opts = TestOptions {
        extra_config: "[broker]\ndelivery_limit = 2\n".into(),
        ..TestOptions::default()
    };
    let intake = spawn_app_with(opts.clone()).await;
    let b = intake.settings.broker.clone();
    let id = format!("msg_{}", random_id(16));
    let org = format!("org_{}", random_id(10));
    publish_raw(
        &b.exchange,
        "organization.created",
        &org_created(&org, "Crashy"),
        event_props(&id, "organization.created"),
    )
    .await;
    for _ in 0..2 {
        crash_while_holding(&b.queue).await.expect("delivered");
    }

    // Act: a real worker gets its last allowed delivery.
    let worker = spawn_app_isolated(
        intake.iso.clone(),
        TestOptions {
            worker: true,
            ..opts
        },
    )
    .await;

    // Assert
    let dead = the_one_message(&b.dead_letter_queue).await;
    let p = &dead.delivery.properties;
    assert_eq!(
        header_str(p, "x-error-class").as_deref(),
        Some("delivery-limit")
    );
    let reason = header_str(p, "x-error").unwrap();
    assert!(reason.contains("2 times"), "{reason}");
    assert_eq!(header_int(p, "x-attempts"), Some(2));
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), id);
    assert!(wait_status(&worker.db, &id, "dead").await, "recorded dead");
    let provisioned = count(
        &worker.db,
        "select count(*) from workspaces where id = $1",
        &org,
    )
    .await;
    assert_eq!(provisioned, 0, "not processed once more");
    worker.stop().await.unwrap();
    intake.stop().await.unwrap();
    assert_eq!(queue_depth(&b.queue).await, 0);
}

/// The broker connection cut and restored: the worker reconnects by itself and
/// consumes what was queued meanwhile, without a process restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_consumer_recovers_without_restart() {
    trace();
    // Arrange: the app reaches RabbitMQ only through a proxy.
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let app = spawn_app_with(TestOptions {
        worker: true,
        amqp_url: Some(format!("amqp://guest:guest@{}/%2f", proxy.addr)),
        ..TestOptions::default()
    })
    .await;
    let db = app.db.clone();
    let b = app.settings.broker.clone();
    let before = format!("msg_{}", random_id(16));
    assert_eq!(
        app.post_signed(
            &before,
            &org_created(&format!("org_{}", random_id(10)), "Before")
        )
        .await
        .status(),
        200
    );
    assert!(wait_status(&db, &before, "processed").await);

    // Act: cut the broker; an event is queued meanwhile (directly, not via the proxy).
    proxy.cut().await;
    let during = format!("msg_{}", random_id(16));
    publish_raw(
        &b.exchange,
        "organization.created",
        &org_created(&format!("org_{}", random_id(10)), "During"),
        event_props(&during, "organization.created"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        event_status(&db, &during).await,
        None,
        "the worker is cut off"
    );
    proxy.restore();

    // Assert: the same worker picks it up; intake recovers too.
    assert!(
        wait_status(&db, &during, "processed").await,
        "consumer recovered"
    );
    let after = format!("msg_{}", random_id(16));
    let body = org_created(&format!("org_{}", random_id(10)), "After");
    let accepted = eventually(Duration::from_secs(30), || async {
        (app.post_signed(&after, &body).await.status() == 200).then_some(())
    })
    .await;
    assert!(accepted.is_some());
    assert!(wait_status(&db, &after, "processed").await);
    app.stop().await.unwrap();
    assert_eq!(queue_depth(&b.queue).await, 0);
}
