//! HTTP limits (`[http]` timeouts and caps): slow and idle clients are closed at
//! their deadlines without holding up anyone else, the connection cap makes new
//! clients wait rather than exhaust the process, and past the in-flight webhook
//! cap intake answers 503 with `Retry-After` so Svix retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::proxy::Proxy;
use crate::common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a slow client misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// Sends the request head one byte a second.
    Head,
    /// Sends a webhook's head at once, then its body one byte a second.
    WebhookBody,
    /// Sends a read-API write's head at once, then its body one byte a second.
    ApiBody,
    /// Sends the HTTP/2 preface one byte a second (the server cannot tell HTTP/1
    /// from HTTP/2 until its 24 bytes are in).
    Http2Preface,
}

/// What became of a slow client.
#[derive(Debug)]
struct Closed {
    kind: Slow,
    /// From before the connect to the server closing it.
    after: Duration,
    /// What the server answered before closing, if anything.
    answer: String,
    /// How the client saw the end (end of stream, or a reset).
    how: String,
}

/// Opens one slow connection and trickles until the server closes it (or
/// `give_up` passes). `closed` counts the connections the server has closed.
async fn slow_client(
    port: u16,
    kind: Slow,
    closed: Arc<AtomicUsize>,
    give_up: Duration,
) -> Option<Closed> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (head, trickle) = match kind {
        Slow::Head => (
            String::new(),
            "POST /webhooks/clerk HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}".repeat(10),
        ),
        Slow::WebhookBody => (
            "POST /webhooks/clerk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\nsvix-id: msg_slow\r\nsvix-timestamp: 1\r\n\
             svix-signature: v1,x\r\n\r\n"
                .to_owned(),
            "x".repeat(1000),
        ),
        Slow::Http2Preface => (String::new(), "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_owned()),
        Slow::ApiBody => (
            format!(
                "POST /v1/workspaces/org_slow/onboarding/gong HTTP/1.1\r\nHost: x\r\n\
                 Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
                 Content-Length: 1000\r\n\r\n"
            ),
            " ".repeat(1000),
        ),
    };
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut bytes = trickle.bytes();
    let how;
    loop {
        if started.elapsed() > give_up {
            return None;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) => {
                    how = "end of stream".to_owned();
                    break;
                }
                Err(e) => {
                    how = format!("read: {e}");
                    break;
                }
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick() => {
                let Some(byte) = bytes.next() else { continue };
                if let Err(e) = stream.write_all(&[byte]).await {
                    how = format!("write: {e}");
                    break;
                }
            }
        }
    }
    closed.fetch_add(1, Ordering::SeqCst);
    Some(Closed {
        kind,
        after: started.elapsed(),
        answer: String::from_utf8_lossy(&answer).into_owned(),
        how,
    })
}

/// 500 connections trickling one byte a second (heads, webhook bodies, read-API
/// bodies, HTTP/2 prefaces) do not keep a signed webhook from its 200 while they are all open, and
/// each is closed after its deadline (a slow body with 408 from intake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_closed_at_their_deadlines_and_hold_no_one_up() {
    let deadline = Duration::from_secs(4);
    let app = spawn_app_with(TestOptions {
        extra_config: format!(
            "[http]\nheader_read_timeout_ms = {ms}\nbody_read_timeout_ms = {ms}\nidle_timeout_ms = {ms}\n",
            ms = deadline.as_millis()
        ),
        ..Default::default()
    })
    .await;
    let closed = Arc::new(AtomicUsize::new(0));
    let kinds = [
        Slow::Head,
        Slow::WebhookBody,
        Slow::ApiBody,
        Slow::Http2Preface,
    ];
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..500 {
        let kind = kinds[i % kinds.len()];
        let closed = closed.clone();
        let port = app.port;
        clients
            .spawn(async move { slow_client(port, kind, closed, Duration::from_secs(60)).await });
    }
    // Give every slow client time to connect and start trickling.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    let id = format!("msg_{}", random_id(24));
    let res = app.post_signed(&id, &body).await;
    let closed_by_then = closed.load(Ordering::SeqCst);

    assert_eq!(res.status(), 200);
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer, json!({"status": "queued", "id": id}));
    assert_eq!(
        closed_by_then, 0,
        "the webhook was answered while every slow connection was still open"
    );
    let mut outcomes = Vec::new();
    while let Some(outcome) = clients.join_next().await {
        outcomes.push(
            outcome
                .unwrap()
                .expect("the server closed the slow connection"),
        );
    }
    assert_eq!(outcomes.len(), 500);
    for c in &outcomes {
        assert!(
            c.after >= deadline,
            "{:?} closed after {:?}, before its deadline: {:?} ({})",
            c.kind,
            c.after,
            c.answer,
            c.how
        );
        assert!(
            c.after < deadline * 5,
            "{:?} closed only after {:?}",
            c.kind,
            c.after
        );
        match c.kind {
            Slow::WebhookBody => assert!(
                c.answer.starts_with("HTTP/1.1 408") && c.answer.contains("body_timeout"),
                "{}",
                c.answer
            ),
            Slow::Head | Slow::Http2Preface => {
                assert_eq!(c.answer, "", "a slow head is closed without an answer")
            }
            Slow::ApiBody => {}
        }
    }
    app.stop().await.unwrap();
}

/// A kept-alive connection with nothing in flight is closed after the idle timeout,
/// even when the header read timeout is longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let app = spawn_app_with(TestOptions {
        extra_config: "[http]\nheader_read_timeout_ms = 60000\nidle_timeout_ms = 1000\n".into(),
        ..Default::default()
    })
    .await;
    let mut stream = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "kept alive after a 200"
    );
    let answered = Instant::now();

    let eof = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await;

    assert!(
        matches!(eof, Ok(Ok(0)) | Ok(Err(_))),
        "the idle connection is closed: {eof:?}"
    );
    assert!(answered.elapsed() >= Duration::from_millis(900));
    app.stop().await.unwrap();
}

/// Past `max_connections` a new client waits (it is not accepted) until a
/// connection closes; then it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_clients_wait_for_a_free_slot() {
    let app = spawn_app_with(TestOptions {
        extra_config: "[http]\nmax_connections = 2\nheader_read_timeout_ms = 60000\n".into(),
        ..Default::default()
    })
    .await;
    let health = format!("{}/healthz", app.address);
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let first = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let _second = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();

    let waited = fresh()
        .get(&health)
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        waited.as_ref().is_err_and(|e| e.is_timeout()),
        "a third connection is not served while two are held: {waited:?}"
    );

    drop(first);
    let served = fresh()
        .get(&health)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("served once a slot is free");
    assert_eq!(served.status(), 200);
    app.stop().await.unwrap();
}

/// `max_inflight_webhooks` clients trickling unsigned webhook bodies take no
/// webhook slot: a genuine signed webhook sent meanwhile gets its 200 while every
/// trickle is still open. The trickles are answered 408 at the short
/// `webhook_body_timeout_ms`, while a read-API body keeps `body_read_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_webhook_bodies_do_not_starve_genuine_webhooks() {
    let webhook_deadline = Duration::from_secs(3);
    let app = spawn_app_with(TestOptions {
        extra_config: format!(
            "[http]\nmax_inflight_webhooks = 4\nbody_read_timeout_ms = 60000\n\
             webhook_body_timeout_ms = {}\n",
            webhook_deadline.as_millis()
        ),
        ..Default::default()
    })
    .await;
    let closed = Arc::new(AtomicUsize::new(0));
    let mut trickles = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (port, closed) = (app.port, closed.clone());
        trickles.spawn(slow_client(
            port,
            Slow::WebhookBody,
            closed,
            Duration::from_secs(30),
        ));
    }
    let api_body = tokio::spawn(slow_client(
        app.port,
        Slow::ApiBody,
        Arc::new(AtomicUsize::new(0)),
        webhook_deadline * 3,
    ));
    // Every trickle has sent its head and is sending its body.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    let id = format!("msg_{}", random_id(24));
    let res = app.post_signed(&id, &body).await;
    let closed_by_then = closed.load(Ordering::SeqCst);

    assert_eq!(res.status(), 200, "a genuine webhook is not refused");
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer, json!({"status": "queued", "id": id}));
    assert_eq!(
        closed_by_then, 0,
        "answered before the trickle deadline, every trickle still open"
    );
    while let Some(trickle) = trickles.join_next().await {
        let c = trickle.unwrap().expect("the trickle is closed");
        assert!(c.after >= webhook_deadline, "{c:?}");
        assert!(c.after < webhook_deadline * 3, "{c:?}");
        assert!(
            c.answer.starts_with("HTTP/1.1 408") && c.answer.contains("body_timeout"),
            "{}",
            c.answer
        );
    }
    assert!(
        api_body.await.unwrap().is_none(),
        "a read-API body still has body_read_timeout_ms"
    );
    app.stop().await.unwrap();
}

/// Past `max_inflight_webhooks` webhooks being verified and published (here held
/// by a broker that does not confirm), intake answers 503 with `Retry-After` and
/// the error body at once (Svix retries), queues nothing, and the read API still
/// answers; once a slot frees, webhooks are queued again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_inflight_webhooks_intake_answers_503_with_retry_after() {
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let app = spawn_app_with(TestOptions {
        amqp_url: Some(format!("amqp://guest:guest@{}/%2f", proxy.addr)),
        extra_config: "[http]\nmax_inflight_webhooks = 2\nretry_after_secs = 7\n\
                       [broker]\npublish_timeout_ms = 60000\n"
            .into(),
        ..Default::default()
    })
    .await;
    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    let post = || async {
        app.post_signed(&format!("msg_{}", random_id(24)), &body)
            .await
    };
    // Two webhooks whose publishes the stalled broker does not confirm hold both
    // slots.
    proxy.stall();
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (client, address, body) = (app.client.clone(), app.address.clone(), body.clone());
        let id = format!("msg_{}", random_id(24));
        let timestamp = now_secs();
        let signature = app.sign(&id, timestamp, &body);
        held.spawn(async move {
            loop {
                let status = client
                    .post(format!("{address}/webhooks/clerk"))
                    .header("content-type", "application/json")
                    .header("svix-id", &id)
                    .header("svix-timestamp", timestamp.to_string())
                    .header("svix-signature", &signature)
                    .body(body.clone())
                    .send()
                    .await
                    .map(|res| res.status());
                // Refused only if a probe below came first and took the slot: as
                // Svix would, try again once it has given up.
                if !matches!(status, Ok(s) if s == 503) {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    // The held requests take their slots once they reach the server; a probe that
    // comes first takes one itself and hangs with them, so it gives up after a
    // second (its slot is freed when its connection goes).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = eventually(Duration::from_secs(10), || async {
        let res = tokio::time::timeout(Duration::from_secs(1), post())
            .await
            .ok()?;
        (res.status() == 503).then_some(res)
    })
    .await
    .expect("a third webhook is refused while two are in flight");

    assert_eq!(
        refused.headers()["retry-after"],
        "7",
        "Svix is told when to retry"
    );
    let error: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "overloaded");
    assert!(error["error"]["message"].is_string());
    let depth = app.queue_depth(&app.settings.broker.queue).await;
    for _ in 0..5 {
        assert_eq!(post().await.status(), 503);
    }
    assert_eq!(
        app.queue_depth(&app.settings.broker.queue).await,
        depth,
        "a refusal queues nothing"
    );
    assert_eq!(
        app.get_api("/healthz").await.status(),
        200,
        "other routes are not limited"
    );

    proxy.unstall();
    while let Some(status) = held.join_next().await {
        assert_eq!(
            status.unwrap().unwrap(),
            200,
            "the held webhooks are queued"
        );
    }
    let id = format!("msg_{}", random_id(24));
    let queued = eventually(Duration::from_secs(10), || async {
        let res = app.post_signed(&id, &body).await;
        (res.status() == 200).then_some(())
    })
    .await;
    assert!(
        queued.is_some(),
        "webhooks are queued again once slots free"
    );
    app.stop().await.unwrap();
}
