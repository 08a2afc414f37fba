//! The worker end to end (DESIGN §4–§5): intake → RabbitMQ → worker → PostgreSQL,
//! acks, dead letters with their headers, retries through the retry queues.

use crate::common::worker::*;
use crate::common::*;
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use serde_json::json;

async fn audit_rows(db: &sqlx::PgPool, svix_id: &str) -> i64 {
    count(
        db,
        "select count(*) from audit_log where event_id = $1",
        svix_id,
    )
    .await
}

/// A signed organization.created through intake is provisioned, logged as processed
/// and acked: after a graceful stop nothing is left in the work queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_event_is_provisioned_and_acked() {
    trace();
    // Arrange
    let app = spawn_app_with(worker_opts()).await;
    let (db, queue) = (app.db.clone(), app.settings.broker.queue.clone());
    let id = format!("msg_{}", random_id(16));
    let org = format!("org_{}", random_id(12));

    // Act
    let res = app.post_signed(&id, &org_created(&org, "Acme Corp")).await;

    // Assert
    assert_eq!(res.status(), 200);
    assert!(wait_status(&db, &id, "processed").await, "event processed");
    let name: Option<String> = sqlx::query_scalar("select name from workspaces where id = $1")
        .bind(&org)
        .fetch_optional(&db)
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some("Acme Corp"));
    assert!(audit_rows(&db, &id).await >= 1, "the change is audited");
    app.stop().await.unwrap();
    // Unacked deliveries would be back in the queue once the consumer closed.
    assert_eq!(queue_depth(&queue).await, 0, "the delivery was acked");
}

/// A signed event of a handled type whose data has no id is dead-lettered once, with
/// its reason and class, recorded as dead, and not left to loop in the work queue;
/// a later replay of the same svix id with a fixed body is processed afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payload_is_dead_lettered_with_its_reason() {
    trace();
    // Arrange
    let app = spawn_app_with(worker_opts()).await;
    let db = app.db.clone();
    let b = app.settings.broker.clone();
    let topology = provisioner::broker::Topology::new(&b, &app.settings.worker);
    let id = format!("msg_{}", random_id(16));
    let mut data = fixture("organization.created")["data"].clone();
    data.as_object_mut().unwrap().remove("id");
    let body = envelope("organization.created", data, now_secs() * 1000);

    // Act
    assert_eq!(app.post_signed(&id, &body).await.status(), 200);

    // Assert
    assert!(
        wait_status(&db, &id, "dead").await,
        "recorded dead in the processing log"
    );
    let dead = the_one_message(&b.dead_letter_queue).await;
    let props = &dead.delivery.properties;
    assert_eq!(dead.delivery.data, body, "body unchanged");
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), id);
    assert_eq!(
        props.kind().as_ref().unwrap().as_str(),
        "organization.created"
    );
    assert_eq!(dead.delivery.routing_key.as_str(), "organization.created");
    assert_eq!(
        header_str(props, "x-error-class").as_deref(),
        Some("payload")
    );
    let reason = header_str(props, "x-error").unwrap();
    assert!(
        reason.contains("id"),
        "the reason names the problem: {reason}"
    );
    assert_eq!(header_int(props, "x-attempts"), Some(1));
    assert!(header_int(props, "x-failed-at").unwrap() > 1_700_000_000_000);
    let error: Option<String> = sqlx::query_scalar("select error from events where svix_id = $1")
        .bind(&id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(error.as_deref(), Some(reason.as_str()));

    // A replay of the fixed event under the same svix id runs (dead is not "applied").
    let org = format!("org_{}", random_id(12));
    assert_eq!(
        app.post_signed(&id, &org_created(&org, "Fixed"))
            .await
            .status(),
        200
    );
    assert!(
        wait_status(&db, &id, "processed").await,
        "replay processed afresh"
    );
    app.stop().await.unwrap();
    assert_eq!(
        queue_depth(&b.queue).await,
        0,
        "nothing loops in the work queue"
    );
    for (retry, _) in &topology.retry_queues {
        assert_eq!(queue_depth(retry).await, 0, "never retried");
    }
}

/// Wrong types in data (a numeric id, a string where a number belongs) are a payload
/// dead letter too, never a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_are_dead_lettered_as_payload() {
    trace();
    let app = spawn_app_with(worker_opts()).await;
    let db = app.db.clone();
    let b = app.settings.broker.clone();
    let id = format!("msg_{}", random_id(16));
    let mut data = fixture("organizationMembership.created")["data"].clone();
    data["id"] = json!(12345);
    data["created_at"] = json!("yesterday");
    let body = envelope("organizationMembership.created", data, now_secs() * 1000);

    assert_eq!(app.post_signed(&id, &body).await.status(), 200);

    assert!(wait_status(&db, &id, "dead").await);
    let dead = the_one_message(&b.dead_letter_queue).await;
    let props = &dead.delivery.properties;
    assert_eq!(
        header_str(props, "x-error-class").as_deref(),
        Some("payload")
    );
    assert_eq!(
        dead.delivery.routing_key.as_str(),
        "organizationMembership.created"
    );
    app.stop().await.unwrap();
    assert_eq!(queue_depth(&b.queue).await, 0);
}

/// The same svix id delivered twice (a Svix retry) is applied once: one processing-log
/// row, audit rows not doubled, both deliveries acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_svix_id_is_acked_without_effect() {
    trace();
    let app = spawn_app_with(worker_opts()).await;
    let db = app.db.clone();
    let queue = app.settings.broker.queue.clone();
    let id = format!("msg_{}", random_id(16));
    let org = format!("org_{}", random_id(12));
    let body = org_created(&org, "Twice");

    assert_eq!(app.post_signed(&id, &body).await.status(), 200);
    assert!(wait_status(&db, &id, "processed").await);
    let audits = audit_rows(&db, &id).await;
    assert_eq!(app.post_signed(&id, &body).await.status(), 200);
    // A marker event sent after the duplicate: once it is processed, the duplicate
    // (ahead of it in the queue) has been handled too.
    let marker = format!("msg_{}", random_id(16));
    let other_org = format!("org_{}", random_id(12));
    assert_eq!(
        app.post_signed(&marker, &org_created(&other_org, "Marker"))
            .await
            .status(),
        200
    );
    assert!(wait_status(&db, &marker, "processed").await);

    assert_eq!(audit_rows(&db, &id).await, audits, "no new audit rows");
    assert_eq!(
        count(&db, "select count(*) from events where svix_id = $1", &id).await,
        1
    );
    assert_eq!(
        count(&db, "select count(*) from workspaces where id = $1", &org).await,
        1
    );
    app.stop().await.unwrap();
    assert_eq!(queue_depth(&queue).await, 0, "the duplicate was acked");
}

/// A message put in the queue without a message_id cannot be deduplicated: it is
/// dead-lettered (class payload) with that reason instead of being applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_without_id_is_dead_lettered() {
    trace();
    let app = spawn_app_with(worker_opts()).await;
    let b = app.settings.broker.clone();
    let body = org_created(&format!("org_{}", random_id(12)), "No Id");
    let props = BasicProperties::default()
        .with_type("organization.created".into())
        .with_content_type("application/json".into());

    publish_raw(&b.exchange, "organization.created", &body, props).await;

    let dead = the_one_message(&b.dead_letter_queue).await;
    let p = &dead.delivery.properties;
    assert_eq!(
        header_str(p, "x-error").as_deref(),
        Some("message has no message_id")
    );
    assert_eq!(header_str(p, "x-error-class").as_deref(), Some("payload"));
    assert_eq!(dead.delivery.data, body);
    app.stop().await.unwrap();
    assert_eq!(queue_depth(&b.queue).await, 0);
}

/// A message carrying `x-replayed` (set by `dlq replay`) is applied with actor
/// `replay` in the audit log; a message without a `type` property takes the body's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_message_is_audited_as_replay() {
    trace();
    let app = spawn_app_with(worker_opts()).await;
    let db = app.db.clone();
    let b = app.settings.broker.clone();
    let id = format!("msg_{}", random_id(16));
    let body = org_created(&format!("org_{}", random_id(12)), "Replayed");
    let props = with_headers(
        BasicProperties::default().with_message_id(id.as_str().into()),
        &[("x-replayed", AMQPValue::Boolean(true))],
    );

    publish_raw(&b.exchange, "organization.created", &body, props).await;

    assert!(wait_status(&db, &id, "processed").await);
    let actors: Vec<String> =
        sqlx::query_scalar("select distinct actor from audit_log where event_id = $1")
            .bind(&id)
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(actors, ["replay"]);
    app.stop().await.unwrap();
}

/// A replay from the ops console also carries `x-replayed-by` (the operator's session
/// label): every audit row of the event keeps actor `replay` and names the operator in
/// its details. Without `x-replayed`, the header is ignored (only a replay names one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_replay_names_its_operator_in_every_audit_row() {
    trace();
    let app = spawn_app_with(worker_opts()).await;
    let db = app.db.clone();
    let b = app.settings.broker.clone();
    let replayed = format!("msg_{}", random_id(16));
    let forged = format!("msg_{}", random_id(16));
    for (id, headers) in [
        (
            &replayed,
            vec![
                ("x-replayed", AMQPValue::Boolean(true)),
                ("x-replayed-by", AMQPValue::LongString("alice".into())),
            ],
        ),
        (
            &forged,
            vec![("x-replayed-by", AMQPValue::LongString("mallory".into()))],
        ),
    ] {
        let body = org_created(&format!("org_{}", random_id(12)), "Replayed");
        let props = with_headers(
            BasicProperties::default().with_message_id(id.as_str().into()),
            &headers,
        );
        publish_raw(&b.exchange, "organization.created", &body, props).await;
    }

    for id in [&replayed, &forged] {
        assert!(wait_status(&db, id, "processed").await, "{id}");
    }
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "select event_id, actor, details->>'replayed_by' from audit_log \
         where event_id = any($1) order by id",
    )
    .bind([replayed.clone(), forged.clone()])
    .fetch_all(&db)
    .await
    .unwrap();
    let of = |id: &String| -> Vec<(String, Option<String>)> {
        rows.iter()
            .filter(|r| &r.0 == id)
            .map(|r| (r.1.clone(), r.2.clone()))
            .collect()
    };
    let replayed_rows = of(&replayed);
    assert!(!replayed_rows.is_empty(), "{rows:?}");
    assert!(
        replayed_rows
            .iter()
            .all(|r| r == &("replay".to_owned(), Some("alice".to_owned()))),
        "{rows:?}"
    );
    let forged_rows = of(&forged);
    assert!(!forged_rows.is_empty());
    assert!(
        forged_rows.iter().all(|r| r == &("clerk".to_owned(), None)),
        "{rows:?}"
    );
    app.stop().await.unwrap();
}

/// A database error that is not an outage goes through the retry queues in order and
/// the event is applied once the error stops (retries carry x-attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_event_is_retried_through_the_retry_queues() {
    trace();
    let app = spawn_app_with(worker_opts()).await;
    let db = app.db.clone();
    let b = app.settings.broker.clone();
    let org = format!("org_{}", random_id(12));
    fail_workspace_writes(&db, &org, Some(2), "injected failure").await;
    let id = format!("msg_{}", random_id(16));

    assert_eq!(
        app.post_signed(&id, &org_created(&org, "Flaky"))
            .await
            .status(),
        200
    );

    assert!(
        wait_status(&db, &id, "processed").await,
        "applied after two retries"
    );
    let injected: i64 = sqlx::query_scalar("select last_value from injected_failures")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        injected, 3,
        "two failed attempts, then the one that succeeded"
    );
    assert_eq!(
        count(&db, "select count(*) from workspaces where id = $1", &org).await,
        1
    );
    app.stop().await.unwrap();
    assert_eq!(
        queue_depth(&b.dead_letter_queue).await,
        0,
        "never dead-lettered"
    );
    assert_eq!(queue_depth(&b.queue).await, 0);
}

/// An event that keeps failing is dead-lettered after the last retry queue, with class
/// retries-exhausted and every attempt counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_failing_every_retry_is_dead_lettered_as_exhausted() {
    trace();
    let app = spawn_app_with(worker_opts()).await;
    let db = app.db.clone();
    let b = app.settings.broker.clone();
    let org = format!("org_{}", random_id(12));
    fail_workspace_writes(&db, &org, Some(1_000), "injected failure").await;
    let id = format!("msg_{}", random_id(16));

    assert_eq!(
        app.post_signed(&id, &org_created(&org, "Broken"))
            .await
            .status(),
        200
    );

    let dead = the_one_message(&b.dead_letter_queue).await;
    let p = &dead.delivery.properties;
    assert_eq!(
        header_str(p, "x-error-class").as_deref(),
        Some("retries-exhausted")
    );
    // Two retry queues in the test config: three attempts in all.
    assert_eq!(header_int(p, "x-attempts"), Some(3));
    assert!(
        header_str(p, "x-error")
            .unwrap()
            .contains("injected failure")
    );
    assert!(wait_status(&db, &id, "dead").await);
    app.stop().await.unwrap();
    assert_eq!(queue_depth(&b.queue).await, 0);
}

/// Many events published at once are spread over concurrent batches and each is
/// applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_are_each_applied_once() {
    trace();
    let app = spawn_app_with(TestOptions {
        worker: true,
        extra_config: "[worker]\nconcurrency = 16\nbatch_size = 8\nbatch_wait_ms = 5\n".into(),
        ..TestOptions::default()
    })
    .await;
    let db = app.db.clone();
    let b = app.settings.broker.clone();
    let run = random_id(8);
    let n = 300;
    let publisher = test_publisher(&app.settings).await;
    for i in 0..n {
        let id = format!("msg_{run}_{i}");
        let body = org_created(&format!("org_{run}_{}", i % 50), &format!("Org {i}"));
        publisher
            .publish_event(&body, &id, "organization.created")
            .await
            .expect("published");
    }

    let like = format!("msg_{run}_%");
    let done = eventually(std::time::Duration::from_secs(60), || async {
        (count(
            &db,
            "select count(*) from events where svix_id like $1",
            &like,
        )
        .await
            == n)
            .then_some(())
    })
    .await;

    assert!(done.is_some(), "every event reached the processing log");
    let org_like = format!("org_{run}_%");
    assert_eq!(
        count(
            &db,
            "select count(*) from workspaces where id like $1",
            &org_like
        )
        .await,
        50
    );
    app.stop().await.unwrap();
    assert_eq!(queue_depth(&b.queue).await, 0);
    assert_eq!(queue_depth(&b.dead_letter_queue).await, 0);
}
