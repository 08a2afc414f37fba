//! Intake when the broker fails, for real: a TCP proxy between the service and the
//! machine's RabbitMQ is cut, restored and stalled, and the test's own queue is
//! deleted under the service. Never 2xx without the broker's confirm, never a hang,
//! and recovery without a restart.

use std::time::Duration;

use crate::common::proxy::Proxy;
use crate::common::*;
use serde_json::json;

fn new_id() -> String {
    format!("msg_{}", random_id(24))
}

fn event() -> Vec<u8> {
    serde_json::to_vec(&fixture("organization.created")).unwrap()
}

/// An app whose broker connection goes through a fresh proxy.
async fn app_behind_proxy(extra_config: &str) -> (TestApp, Proxy) {
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let app = spawn_app_with(TestOptions {
        amqp_url: Some(format!("amqp://guest:guest@{}/%2f", proxy.addr)),
        extra_config: extra_config.to_owned(),
        ..TestOptions::default()
    })
    .await;
    (app, proxy)
}

/// Asserts a 503 `broker_unavailable` with a `Retry-After`.
async fn assert_unavailable(res: reqwest::Response, case: &str) {
    assert_eq!(res.status(), 503, "{case}");
    let retry_after = res
        .headers()
        .get("retry-after")
        .unwrap_or_else(|| panic!("{case}: Retry-After"))
        .to_str()
        .unwrap()
        .parse::<u64>()
        .expect("Retry-After in seconds");
    assert!(retry_after > 0, "{case}");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        body["error"]["code"], "broker_unavailable",
        "{case}: {body}"
    );
}

async fn readyz(app: &TestApp) -> (u16, serde_json::Value) {
    let res = app
        .client
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

/// While RabbitMQ is unreachable intake answers 503 + Retry-After and /readyz fails;
/// when it returns, the same process answers 200 again (the publisher reconnects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_gives_503_then_recovers_without_restart() {
    // Arrange
    let (app, proxy) = app_behind_proxy("").await;
    assert_eq!(app.post_signed(&new_id(), &event()).await.status(), 200);
    assert_eq!(readyz(&app).await.0, 200);

    // Act: the broker goes away.
    proxy.cut().await;

    // Assert: refused at once, repeatedly, and not ready.
    for _ in 0..3 {
        let res = app.post_signed(&new_id(), &event()).await;
        assert_unavailable(res, "during the outage").await;
    }
    let (status, body) = eventually(Duration::from_secs(10), || async {
        let (status, body) = readyz(&app).await;
        (status == 503).then_some((status, body))
    })
    .await
    .expect("/readyz fails while the broker is unreachable");
    assert_eq!(status, 503);
    assert_eq!(body["checks"]["broker"], "unavailable");
    assert_eq!(body["checks"]["database"], "ok");

    // Act: the broker comes back.
    proxy.restore();

    // Assert: the same app queues again and is ready.
    let id = new_id();
    let recovered = eventually(Duration::from_secs(30), || async {
        let res = app.post_signed(&id, &event()).await;
        (res.status() == 200).then_some(())
    })
    .await;
    assert!(
        recovered.is_some(),
        "intake answers 200 again without a restart"
    );
    assert_eq!(readyz(&app).await.0, 200);
    let msgs = app.drain_queue(&app.settings.broker.queue).await;
    assert!(
        msgs.iter().any(|m| m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
            == Some(id.as_str())),
        "the event accepted after recovery is in the queue"
    );
    app.stop().await.unwrap();
}

/// A message the broker acks but returns unroutable (the work queue was deleted, so
/// the exchange routes nowhere) is a 503, not a 200; the publisher then re-declares
/// the topology and intake heals by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_message_is_503_and_the_topology_heals() {
    // Arrange
    let app = spawn_app().await;
    assert_eq!(app.post_signed(&new_id(), &event()).await.status(), 200);
    delete_queues(std::slice::from_ref(&app.settings.broker.queue)).await;

    // Act
    let res = app.post_signed(&new_id(), &event()).await;

    // Assert
    assert_unavailable(res, "returned").await;
    let id = new_id();
    let healed = eventually(Duration::from_secs(20), || async {
        (app.post_signed(&id, &event()).await.status() == 200).then_some(())
    })
    .await;
    assert!(
        healed.is_some(),
        "the work queue is re-declared and intake queues again"
    );
    let msgs = app.drain_queue(&app.settings.broker.queue).await;
    assert_eq!(msgs.len(), 1, "only the event accepted after the repair");
    assert_eq!(
        msgs[0]
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        id
    );
    app.stop().await.unwrap();
}

/// A broker that keeps the connection open but never confirms: every request gets a
/// 503 once the publish timeout passes (none hangs), and intake queues again once
/// the broker answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirm_within_the_timeout_is_503() {
    // Arrange
    let (app, proxy) = app_behind_proxy("[broker]\npublish_timeout_ms = 1000\n").await;
    assert_eq!(app.post_signed(&new_id(), &event()).await.status(), 200);

    // Act: the broker stops answering; several requests arrive at once.
    proxy.stall();
    let requests = (0..4).map(|_| {
        let app = &app;
        async move {
            // Generous bound for waiting only: a hang fails here instead of blocking.
            tokio::time::timeout(
                Duration::from_secs(20),
                app.post_signed(&new_id(), &event()),
            )
            .await
            .expect("intake answers while the broker is stalled")
        }
    });
    let responses = futures_util::future::join_all(requests).await;

    // Assert
    for res in responses {
        assert_unavailable(res, "stalled").await;
    }

    // The broker answers again: intake queues again.
    proxy.unstall();
    let id = new_id();
    let recovered = eventually(Duration::from_secs(30), || async {
        (app.post_signed(&id, &event()).await.status() == 200).then_some(())
    })
    .await;
    assert!(
        recovered.is_some(),
        "intake answers 200 once the broker answers"
    );
    app.stop().await.unwrap();
}

/// The ignored path never touches the broker: unhandled types are still answered
/// 200 ignored during an outage (Svix must not retry them for a day).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_types_do_not_need_the_broker() {
    let (app, proxy) = app_behind_proxy("").await;
    proxy.cut().await;
    let body = envelope("session.created", json!({"id": "sess_1"}), 1);
    let res = app.post_signed(&new_id(), &body).await;
    assert_eq!(res.status(), 200);
    let json: serde_json::Value = res.json().await.unwrap();
    assert_eq!(json["status"], "ignored");
    proxy.restore();
    app.stop().await.unwrap();
}

/// Under concurrency every confirm is matched to its own message: of many publishes in
/// flight at once, exactly the unroutable ones fail as returned and exactly the
/// routed ones succeed and are in the queue (lapin alone would hand a return to
/// whichever confirm of the channel completes next).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_get_their_own_confirms() {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use provisioner::broker::{OutgoingMessage, PublishError, Publisher, Topology};

    // Arrange: an exchange whose only binding is for routing key `routed`.
    let iso = Isolation::new();
    let settings = test_settings(&iso, &TestOptions::default());
    let exchange = format!("{}.mixed", iso.prefix);
    let queue = format!("{}.mixed.routed", iso.prefix);
    let (conn, ch) = broker_channel().await;
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongLongInt(300_000),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "routed".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let publisher = Publisher::start(
        settings.broker.url.clone(),
        Topology::new(&settings.broker, &settings.worker),
        "test-mixed",
        Duration::from_secs(10),
        shutdown.clone(),
    );
    assert!(publisher.wait_connected(Duration::from_secs(30)).await);

    // Act: 1000 publishes at once, every third one unroutable.
    let results = futures_util::future::join_all((0..1000).map(|i| {
        let publisher = publisher.clone();
        let exchange = exchange.clone();
        async move {
            let routed = i % 3 != 0;
            let id = format!("m{i}");
            let body = format!("{{\"i\":{i}}}");
            let result = publisher
                .publish(OutgoingMessage {
                    exchange: &exchange,
                    routing_key: if routed { "routed" } else { "nowhere" },
                    body: body.as_bytes(),
                    message_id: &id,
                    kind: "test",
                    timestamp: None,
                    headers: None,
                })
                .await;
            (routed, result)
        }
    }))
    .await;

    // Assert
    for (i, (routed, result)) in results.iter().enumerate() {
        match (routed, result) {
            (true, Ok(())) | (false, Err(PublishError::Returned(_))) => {}
            other => panic!("publish {i}: {other:?}"),
        }
    }
    let routed = results.iter().filter(|(r, _)| *r).count() as u32;
    assert_eq!(queue_depth(&queue).await, routed);
    publisher.close().await;
    shutdown.cancel();
    delete_queues(&[queue]).await;
    let _ = conn.close(200, "bye".into()).await;
}
