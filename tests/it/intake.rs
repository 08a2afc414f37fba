//! Intake: `POST /webhooks/clerk` against a real RabbitMQ, one test per row of the
//! DESIGN §3 table. Every refusal also proves the work queue stayed empty: a rejected
//! request never reaches the queue.

use crate::common::*;
use aws_lc_rs::hmac;
use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::json;

/// A second and third secret for rotation and "signed by someone else".
const OTHER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEW_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// Header name/value pairs.
type Headers = Vec<(String, String)>;

fn new_id() -> String {
    format!("msg_{}", random_id(24))
}

/// Svix headers for `body`, signed with `secret` at `ts`.
fn svix_headers(secret: &str, id: &str, ts: i64, body: &[u8]) -> Vec<(String, String)> {
    vec![
        ("svix-id".into(), id.into()),
        ("svix-timestamp".into(), ts.to_string()),
        ("svix-signature".into(), sign(secret, id, ts, body)),
    ]
}

/// HMAC over raw bytes, for bodies svix's signer refuses (not UTF-8).
fn raw_signature(secret: &str, id: &str, ts: i64, body: &[u8]) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let mut content = format!("{id}.{ts}.").into_bytes();
    content.extend_from_slice(body);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &content);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

async fn post(app: &TestApp, headers: &[(String, String)], body: Vec<u8>) -> reqwest::Response {
    let mut req = app
        .client
        .post(format!("{}/webhooks/clerk", app.address))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    req.send().await.expect("request sent")
}

/// Asserts the status, the `{"error":{"code","message"}}` shape and the code, and
/// that nothing reached the work queue.
async fn assert_refused(
    app: &TestApp,
    res: reqwest::Response,
    status: u16,
    code: &str,
    case: &str,
) {
    assert_eq!(res.status().as_u16(), status, "{case}");
    let body: serde_json::Value = res.json().await.expect("error body is JSON");
    let obj = body.as_object().expect("error body is an object");
    assert_eq!(obj.len(), 1, "{case}: only `error`: {body}");
    let error = body["error"].as_object().expect("`error` is an object");
    assert_eq!(error.len(), 2, "{case}: code and message only: {body}");
    assert_eq!(body["error"]["code"], code, "{case}: {body}");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{case}: a message: {body}"
    );
    assert_eq!(
        app.queue_depth(&app.settings.broker.queue).await,
        0,
        "{case}: a rejected request never reaches the queue"
    );
}

fn message_id(m: &lapin::message::BasicGetMessage) -> String {
    m.delivery
        .properties
        .message_id()
        .as_ref()
        .expect("message_id set")
        .to_string()
}

/// 200 queued: the unchanged body, with message_id, type, content type, persistence
/// and routing key = type, only after the broker confirmed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_handled_event_is_queued_after_confirm() {
    // Arrange
    let app = spawn_app().await;
    // Pretty-printed on purpose: a re-serialized body would differ byte for byte.
    let body = serde_json::to_vec_pretty(&fixture("organization.created")).unwrap();
    let id = new_id();

    // Act
    let res = app.post_signed(&id, &body).await;

    // Assert
    assert_eq!(res.status(), 200);
    let json: serde_json::Value = res.json().await.unwrap();
    assert_eq!(json, json!({"status": "queued", "id": id}));
    let msgs = app.drain_queue(&app.settings.broker.queue).await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    let p = &m.delivery.properties;
    assert_eq!(m.delivery.data, body, "body is published unchanged");
    assert_eq!(message_id(m), id);
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "organization.created");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(p.delivery_mode(), &Some(2), "persistent");
    assert_eq!(m.delivery.exchange.as_str(), app.settings.broker.exchange);
    assert_eq!(m.delivery.routing_key.as_str(), "organization.created");
    app.stop().await.unwrap();
}

/// Every handled type is queued with its type as routing key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handled_type_is_queued_with_its_routing_key() {
    let app = spawn_app().await;
    let mut expected = Vec::new();
    for kind in provisioner::clerk::HANDLED_TYPES {
        let id = new_id();
        let res = app
            .post_signed(&id, &envelope(kind, json!({"id": "x"}), 1))
            .await;
        assert_eq!(res.status(), 200, "{kind}");
        let json: serde_json::Value = res.json().await.unwrap();
        assert_eq!(json["status"], "queued", "{kind}");
        expected.push((id, kind.to_owned()));
    }
    let mut got: Vec<(String, String)> = app
        .drain_queue(&app.settings.broker.queue)
        .await
        .iter()
        .map(|m| (message_id(m), m.delivery.routing_key.to_string()))
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    app.stop().await.unwrap();
}

/// 200 ignored for types this service does not handle, and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhandled_types_are_ignored_and_not_queued() {
    let app = spawn_app().await;
    let mut bodies: Vec<Vec<u8>> = [
        "session.created",
        "email.created",
        "role.created",
        "paymentAttempt.created",
        "paymentAttempt.updated",
    ]
    .iter()
    .map(|k| envelope(k, json!({"id": "x"}), 1))
    .collect();
    for name in [
        "user.created",
        "organizationInvitation.created",
        "organizationInvitation.accepted",
    ] {
        bodies.push(serde_json::to_vec(&fixture(name)).unwrap());
    }
    for body in bodies {
        let id = new_id();
        let res = app.post_signed(&id, &body).await;
        assert_eq!(res.status(), 200);
        let json: serde_json::Value = res.json().await.unwrap();
        assert_eq!(json, json!({"status": "ignored", "id": id}));
    }
    assert_eq!(app.queue_depth(&app.settings.broker.queue).await, 0);
    app.stop().await.unwrap();
}

/// The same svix id twice (a Svix retry) is answered 200 both times and queued twice;
/// the worker deduplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_svix_id_is_accepted_again() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&fixture("organization.updated")).unwrap();
    let id = new_id();
    for _ in 0..2 {
        let res = app.post_signed(&id, &body).await;
        assert_eq!(res.status(), 200);
        let json: serde_json::Value = res.json().await.unwrap();
        assert_eq!(json, json!({"status": "queued", "id": id}));
    }
    let msgs = app.drain_queue(&app.settings.broker.queue).await;
    assert_eq!(msgs.len(), 2);
    assert!(msgs.iter().all(|m| message_id(m) == id));
    app.stop().await.unwrap();
}

/// Standard Webhooks `webhook-*` headers are accepted in place of `svix-*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_prefixed_headers_are_accepted() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    let id = new_id();
    let ts = now_secs();
    let headers = vec![
        ("webhook-id".to_owned(), id.clone()),
        ("webhook-timestamp".to_owned(), ts.to_string()),
        ("webhook-signature".to_owned(), sign(SECRET, &id, ts, &body)),
    ];
    let res = post(&app, &headers, body).await;
    assert_eq!(res.status(), 200);
    let json: serde_json::Value = res.json().await.unwrap();
    assert_eq!(json, json!({"status": "queued", "id": id}));
    let msgs = app.drain_queue(&app.settings.broker.queue).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(message_id(&msgs[0]), id);
    app.stop().await.unwrap();
}

/// 400 when any one of the three svix headers is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_svix_header_is_400() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    let full = svix_headers(SECRET, &new_id(), now_secs(), &body);
    for missing in ["svix-id", "svix-timestamp", "svix-signature"] {
        let headers: Vec<_> = full.iter().filter(|(k, _)| k != missing).cloned().collect();
        let res = post(&app, &headers, body.clone()).await;
        assert_refused(&app, res, 400, "missing_header", missing).await;
    }
    let res = post(&app, &[], body.clone()).await;
    assert_refused(&app, res, 400, "missing_header", "no headers").await;
    app.stop().await.unwrap();
}

/// 401 for every way a signature can be wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_is_401() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    let id = new_id();
    let ts = now_secs();
    let good = sign(SECRET, &id, ts, &body);
    let with_sig = |sig: &str| {
        vec![
            ("svix-id".to_owned(), id.clone()),
            ("svix-timestamp".to_owned(), ts.to_string()),
            ("svix-signature".to_owned(), sig.to_owned()),
        ]
    };
    let mut tampered = body.clone();
    let pos = tampered.iter().position(|b| *b == b'A').unwrap(); // "Acme Corp"
    tampered[pos] = b'B';
    let not_utf8 = b"{\"type\":\"organization.created\",\"data\":{\"n\":\"\xff\"}}".to_vec();
    let cases: Vec<(&str, Headers, Vec<u8>)> = vec![
        (
            "random signature",
            with_sig("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
            body.clone(),
        ),
        ("empty v1, signature", with_sig("v1,"), body.clone()),
        ("empty signature header", with_sig(""), body.clone()),
        (
            "right MAC, wrong version",
            with_sig(&good.replacen("v1,", "v2,", 1)),
            body.clone(),
        ),
        ("tampered body", with_sig(&good), tampered),
        (
            "signed by another secret",
            svix_headers(OTHER_SECRET, &id, ts, &body),
            body.clone(),
        ),
        (
            "signature of another svix id",
            with_sig(&sign(SECRET, "msg_other", ts, &body)),
            body.clone(),
        ),
        ("unsigned non-UTF-8 body", with_sig(&good), not_utf8),
    ];
    for (case, headers, body) in cases {
        let res = post(&app, &headers, body).await;
        assert_refused(&app, res, 401, "invalid_signature", case).await;
    }
    app.stop().await.unwrap();
}

/// 401 for a timestamp more than 5 minutes old or ahead, or not a number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_outside_five_minutes_is_401() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    let id = new_id();
    for (case, ts) in [
        ("6 minutes old", now_secs() - 360),
        ("6 minutes ahead", now_secs() + 360),
        ("a day old", now_secs() - 86_400),
        ("milliseconds", now_secs() * 1000),
    ] {
        // Correctly signed for that timestamp: only its age is wrong.
        let res = post(&app, &svix_headers(SECRET, &id, ts, &body), body.clone()).await;
        assert_refused(&app, res, 401, "invalid_timestamp", case).await;
    }
    let mut headers = svix_headers(SECRET, &id, now_secs(), &body);
    headers[1].1 = "yesterday".into();
    let res = post(&app, &headers, body.clone()).await;
    assert_refused(&app, res, 401, "invalid_timestamp", "not a number").await;
    app.stop().await.unwrap();
}

/// Timestamps within the tolerance (4 minutes old or ahead) are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_within_five_minutes_is_accepted() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    for offset in [-240, 240] {
        let id = new_id();
        let ts = now_secs() + offset;
        let res = post(&app, &svix_headers(SECRET, &id, ts, &body), body.clone()).await;
        assert_eq!(res.status(), 200, "offset {offset}");
    }
    assert_eq!(app.drain_queue(&app.settings.broker.queue).await.len(), 2);
    app.stop().await.unwrap();
}

/// Secret rotation: with two secrets in CLERK_WEBHOOK_SECRET, an event signed by
/// either is accepted; one signed by a secret no longer configured is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_configured_secret_verifies() {
    let app = spawn_app_with(TestOptions {
        env: vec![(
            "CLERK_WEBHOOK_SECRET".into(),
            format!("{OTHER_SECRET}, {NEW_SECRET}"),
        )],
        ..TestOptions::default()
    })
    .await;
    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    for secret in [NEW_SECRET, OTHER_SECRET] {
        let id = new_id();
        let res = post(
            &app,
            &svix_headers(secret, &id, now_secs(), &body),
            body.clone(),
        )
        .await;
        assert_eq!(res.status(), 200, "signed by {secret}");
    }
    assert_eq!(app.drain_queue(&app.settings.broker.queue).await.len(), 2);
    let res = post(
        &app,
        &svix_headers(SECRET, &new_id(), now_secs(), &body),
        body.clone(),
    )
    .await;
    assert_refused(
        &app,
        res,
        401,
        "invalid_signature",
        "development secret, not configured",
    )
    .await;
    app.stop().await.unwrap();
}

/// A signed, valid Clerk event of exactly `size` bytes.
fn event_of_size(size: usize) -> Vec<u8> {
    let mut data = fixture("organization.created");
    data["data"]["public_metadata"]["notes"] = json!("");
    let base = serde_json::to_vec(&data).unwrap().len();
    data["data"]["public_metadata"]["notes"] = json!("x".repeat(size - base));
    let body = serde_json::to_vec(&data).unwrap();
    assert_eq!(body.len(), size);
    body
}

/// POSTs `body` with `Transfer-Encoding: chunked` (no Content-Length) over a raw
/// connection; returns the status and the response body.
async fn post_chunked(app: &TestApp, headers: &[(String, String)], body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .unwrap();
    let mut head = "POST /webhooks/clerk HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n".to_owned();
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer and close before the whole body is sent: write errors
    // after that are expected.
    for chunk in body.chunks(64 * 1024) {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(chunk);
        framed.extend_from_slice(b"\r\n");
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut response),
    )
    .await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// 413 for a body over 1 MiB, announced by Content-Length or streamed chunked; a body
/// of exactly 1 MiB is still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_one_mib_is_413() {
    let app = spawn_app().await;
    let limit = app.settings.http.max_body_bytes;
    assert_eq!(limit, 1024 * 1024);

    // Content-Length over the limit, correctly signed: refused for its size alone.
    let big = event_of_size(limit + 1);
    let id = new_id();
    let res = post(
        &app,
        &svix_headers(SECRET, &id, now_secs(), &big),
        big.clone(),
    )
    .await;
    assert_refused(&app, res, 413, "payload_too_large", "content-length").await;

    // No Content-Length: chunked transfer, cut off once past the limit.
    let (status, response) =
        post_chunked(&app, &svix_headers(SECRET, &id, now_secs(), &big), &big).await;
    assert_eq!(status, 413, "chunked: {response}");
    let json: serde_json::Value = serde_json::from_str(&response).expect("JSON error body");
    assert_eq!(json["error"]["code"], "payload_too_large");
    assert_eq!(app.queue_depth(&app.settings.broker.queue).await, 0);

    // Exactly at the limit: accepted and queued.
    let exact = event_of_size(limit);
    let res = app.post_signed(&new_id(), &exact).await;
    assert_eq!(res.status(), 200);
    let msgs = app.drain_queue(&app.settings.broker.queue).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].delivery.data, exact);
    app.stop().await.unwrap();
}

/// 400 for a verified body that is not a Clerk event: not JSON, not UTF-8, no `type`,
/// no `data`, or `data` not an object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_body_that_is_not_an_event_is_400() {
    let app = spawn_app().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"hello, world".to_vec()),
        ("empty body", Vec::new()),
        (
            "truncated JSON",
            br#"{"type":"organization.created","data":{"#.to_vec(),
        ),
        (
            "a JSON array",
            br#"[{"type":"organization.created","data":{}}]"#.to_vec(),
        ),
        (
            "no type",
            br#"{"object":"event","data":{"id":"org_1"}}"#.to_vec(),
        ),
        (
            "type not a string",
            br#"{"type":7,"data":{"id":"org_1"}}"#.to_vec(),
        ),
        (
            "no data",
            br#"{"object":"event","type":"organization.created"}"#.to_vec(),
        ),
        (
            "data an array",
            br#"{"type":"organization.created","data":[1]}"#.to_vec(),
        ),
        (
            "data a string",
            br#"{"type":"organization.created","data":"org_1"}"#.to_vec(),
        ),
        (
            "data null",
            br#"{"type":"organization.created","data":null}"#.to_vec(),
        ),
    ];
    for (case, body) in cases {
        let res = app.post_signed(&new_id(), &body).await;
        assert_refused(&app, res, 400, "invalid_payload", case).await;
    }
    // Not UTF-8 but correctly signed over its raw bytes.
    let body = b"{\"type\":\"organization.created\",\"data\":{\"name\":\"\xff\xfe\"}}".to_vec();
    let id = new_id();
    let ts = now_secs();
    let headers = vec![
        ("svix-id".to_owned(), id.clone()),
        ("svix-timestamp".to_owned(), ts.to_string()),
        (
            "svix-signature".to_owned(),
            raw_signature(SECRET, &id, ts, &body),
        ),
    ];
    let res = post(&app, &headers, body).await;
    assert_refused(&app, res, 400, "invalid_payload", "not UTF-8").await;
    app.stop().await.unwrap();
}

/// A broken `data` object is not intake's business: it is queued for the worker to
/// dead-letter with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_event_with_a_broken_data_object_is_queued() {
    let app = spawn_app().await;
    let body = envelope("organization.created", json!({"name": 42}), 1);
    let res = app.post_signed(&new_id(), &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(app.drain_queue(&app.settings.broker.queue).await.len(), 1);
    app.stop().await.unwrap();
}

/// With CLERK_INSTANCE_ID set, events of another instance (or of none) are 422 and not
/// queued; events of that instance are queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_another_instance_is_422_when_configured() {
    let app = spawn_app_with(TestOptions {
        env: vec![("CLERK_INSTANCE_ID".into(), "ins_expected".into())],
        ..TestOptions::default()
    })
    .await;
    let event = |instance: Option<&str>| {
        let mut e = fixture("organization.created");
        match instance {
            Some(i) => e["instance_id"] = json!(i),
            None => {
                e.as_object_mut().unwrap().remove("instance_id");
            }
        }
        serde_json::to_vec(&e).unwrap()
    };
    let res = app.post_signed(&new_id(), &event(Some("ins_other"))).await;
    assert_refused(&app, res, 422, "wrong_instance", "another instance").await;
    let res = app.post_signed(&new_id(), &event(None)).await;
    assert_refused(&app, res, 422, "wrong_instance", "no instance").await;

    let id = new_id();
    let res = app.post_signed(&id, &event(Some("ins_expected"))).await;
    assert_eq!(res.status(), 200);
    let msgs = app.drain_queue(&app.settings.broker.queue).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(message_id(&msgs[0]), id);
    app.stop().await.unwrap();
}

/// Any method but POST on the webhook route is 405 with `Allow: POST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_are_405() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    for method in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
        let mut req = app
            .client
            .request(method.clone(), format!("{}/webhooks/clerk", app.address))
            .body(body.clone());
        for (k, v) in svix_headers(SECRET, &new_id(), now_secs(), &body) {
            req = req.header(k, v);
        }
        let res = req.send().await.unwrap();
        assert_eq!(
            res.headers().get("allow").map(|v| v.to_str().unwrap()),
            Some("POST"),
            "{method}"
        );
        assert_refused(&app, res, 405, "method_not_allowed", method.as_str()).await;
    }
    // Unknown routes are 404, not swallowed by the webhook route.
    let res = app
        .client
        .post(format!("{}/webhooks/clerk/extra", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    app.stop().await.unwrap();
}
