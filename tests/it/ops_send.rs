//! `provisioner send`: signed Clerk-shaped events against a test app (intake only,
//! no worker), so the app's own signature check proves the signing (DESIGN §1).

use std::time::Duration;

use crate::common::ops::*;
use crate::common::*;
use provisioner::cli::send::{self, Scenario, SendArgs, SendError};
use provisioner::config::Secret;
use serde_json::Value;

/// A valid secret the test app does not know.
const OTHER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn url(app: &TestApp) -> String {
    format!("{}/webhooks/clerk", app.address)
}

fn body_of(m: &lapin::message::BasicGetMessage) -> Value {
    serde_json::from_slice(&m.delivery.data).unwrap()
}

/// `send` builds, signs and delivers each handled event type, and intake queues it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_handled_type_is_built_signed_and_queued() {
    // Arrange
    let app = spawn_app().await;
    let kinds = provisioner::clerk::HANDLED_TYPES;
    let before = chrono::Utc::now().timestamp_millis();

    // Act
    let mut sent = Vec::new();
    for kind in kinds {
        let mut args = SendArgs::event(kind);
        args.url = Some(url(&app));
        args.org = Some("org_sendtest".into());
        args.name = Some("Send Test Inc".into());
        args.user = Some("user_sendtest".into());
        args.role = Some("org:admin".into());
        args.id = Some(format!("msg_{}", random_id(20)));
        sent.push(send::send(&app.settings, &args).await.unwrap());
    }
    let after = chrono::Utc::now().timestamp_millis();

    // Assert: the app verified every signature and queued every event.
    for s in &sent {
        assert_eq!(s.status, 200, "{s:?}");
        assert_eq!(s.response["status"], "queued");
    }
    let queued = drain_queue(&app.settings.broker.queue).await;
    assert_eq!(
        message_ids(&queued),
        sent.iter().map(|s| s.id.clone()).collect::<Vec<_>>()
    );
    for (m, kind) in queued.iter().zip(kinds) {
        let b = body_of(m);
        assert_eq!(b["type"], kind);
        assert_eq!(b["object"], "event");
        let ts = b["timestamp"].as_i64().unwrap();
        assert!((before..=after).contains(&ts), "envelope timestamp is now");
        let data = &b["data"];
        match kind {
            "organization.created" | "organization.updated" => {
                assert_eq!(data["id"], "org_sendtest");
                assert_eq!(data["name"], "Send Test Inc");
                assert_eq!(data["created_by"], "user_sendtest");
                let v = data["updated_at"].as_i64().unwrap();
                assert!(
                    (before..=after).contains(&v),
                    "updated_at = now so later sends win"
                );
            }
            "organization.deleted" => {
                assert_eq!(data["id"], "org_sendtest");
                assert_eq!(data["deleted"], true);
            }
            "user.updated" => {
                assert_eq!(data["id"], "user_sendtest");
                assert!(data["email_addresses"][0]["email_address"].is_string());
            }
            "user.deleted" => assert_eq!(data["id"], "user_sendtest"),
            k if k.starts_with("subscription") => {
                assert_eq!(data["payer"]["organization_id"], "org_sendtest");
                assert!(data["id"].as_str().unwrap().starts_with("csub_"));
            }
            _ => {
                assert_eq!(data["organization"]["id"], "org_sendtest");
                assert_eq!(data["organization"]["name"], "Send Test Inc");
                assert_eq!(data["public_user_data"]["user_id"], "user_sendtest");
                assert_eq!(data["role"], "org:admin");
            }
        }
    }
    // The three membership events describe the same membership.
    let memberships: Vec<Value> = queued
        .iter()
        .map(body_of)
        .filter(|b| {
            b["type"]
                .as_str()
                .unwrap()
                .starts_with("organizationMembership.")
        })
        .map(|b| b["data"]["id"].clone())
        .collect();
    assert_eq!(memberships.len(), 3);
    assert!(memberships.iter().all(|id| id == &memberships[0]));
}

/// `send` of an unhandled type is delivered and answered `ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhandled_type_is_sent_and_ignored() {
    let app = spawn_app().await;
    let mut args = SendArgs::event("session.created");
    args.url = Some(url(&app));

    let s = send::send(&app.settings, &args).await.unwrap();

    assert_eq!(s.status, 200);
    assert_eq!(s.response["status"], "ignored");
    assert_eq!(queue_depth(&app.settings.broker.queue).await, 0);
}

/// `send --file` delivers the file byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_is_sent_byte_for_byte() {
    let app = spawn_app().await;
    let path = std::path::PathBuf::from(format!(
        "{}/tests/fixtures/organizationMembership.created.json",
        env!("CARGO_MANIFEST_DIR")
    ));
    let mut args = SendArgs::event("organizationMembership.created");
    args.event_type = None;
    args.file = Some(path.clone());
    args.url = Some(url(&app));
    args.id = Some("msg_from_file".into());

    let s = send::send(&app.settings, &args).await.unwrap();

    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(
        s.kind, "organizationMembership.created",
        "type read from the file"
    );
    let queued = drain_queue(&app.settings.broker.queue).await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].delivery.data, std::fs::read(&path).unwrap());
    assert_eq!(message_ids(&queued), ["msg_from_file"]);

    // A file whose type contradicts EVENT_TYPE is refused before sending.
    args.event_type = Some("organization.deleted".into());
    let err = send::send(&app.settings, &args).await.unwrap_err();
    assert!(matches!(err, SendError::Args(_)), "{err}");
    assert_eq!(queue_depth(&app.settings.broker.queue).await, 0);
}

/// `send` with a wrong secret gets 401 and queues nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_gets_401_and_queues_nothing() {
    let app = spawn_app().await;
    let mut settings = app.settings.clone();
    settings.clerk.webhook_secrets = vec![Secret::new(OTHER_SECRET)];
    let mut args = SendArgs::event("organization.created");
    args.url = Some(url(&app));

    let s = send::send(&settings, &args).await.unwrap();

    assert_eq!(s.status, 401);
    assert!(!s.accepted());
    assert_eq!(queue_depth(&app.settings.broker.queue).await, 0);
}

/// A `send` scenario delivers its signed history (each event three times), and says
/// so after a bounded wait when no worker runs to process it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_sends_its_signed_history_and_times_out_without_a_worker() {
    // No worker runs here, so the read API never shows the events processed: the
    // scenario must say so (bounded wait) after queueing every delivery.
    let app = spawn_app().await;

    let err = send::run_scenario(
        &app.settings,
        Scenario::Duplicates,
        Some("org_scenario".into()),
        &url(&app),
        Duration::from_secs(1),
    )
    .await
    .unwrap_err();

    assert!(
        matches!(
            err,
            SendError::Timeout {
                processed: 0,
                total: 6,
                ..
            }
        ),
        "{err}"
    );
    let queued = drain_queue(&app.settings.broker.queue).await;
    assert_eq!(queued.len(), 18, "6 events, each delivered 3 times");
    let ids = message_ids(&queued);
    for id in &ids {
        assert_eq!(ids.iter().filter(|i| *i == id).count(), 3);
    }
    for m in &queued {
        let b = body_of(m);
        let org = if b["type"].as_str().unwrap().starts_with("organization.") {
            &b["data"]["id"]
        } else {
            &b["data"]["organization"]["id"]
        };
        assert_eq!(org, "org_scenario");
    }
}

// ---- the binary -------------------------------------------------------------------

/// The `provisioner send` binary delivers, prints the answer, and exits non-zero on a
/// non-2xx answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_sends_prints_and_fails_on_non_2xx() {
    let app = spawn_app().await;
    let cfg = config_file(&app.iso, "");
    let target = url(&app);

    // Accepted: status and body printed, exit 0.
    let out = run_binary(
        &cfg,
        &[],
        &[
            "send",
            "organization.created",
            "--url",
            &target,
            "--id",
            "msg_bin_ok",
            "--org",
            "org_bin",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("HTTP 200"), "{text}");
    assert!(text.contains(r#""status":"queued""#), "{text}");

    // --json: one document.
    let out = run_binary(
        &cfg,
        &[],
        &["send", "user.updated", "--url", &target, "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["status"], 200);
    assert_eq!(doc["response"]["status"], "queued");

    // Signed with another secret: 401, non-zero exit, one-line reason.
    let out = run_binary(
        &cfg,
        &[("CLERK_WEBHOOK_SECRET", OTHER_SECRET.to_owned())],
        &["send", "organization.created", "--url", &target],
    )
    .await;
    assert!(!out.status.success());
    assert!(stdout(&out).contains("HTTP 401"), "{}", stdout(&out));
    assert!(
        error_line(&out).contains("the receiver answered 401"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        message_ids(&drain_queue(&app.settings.broker.queue).await).len(),
        2
    );

    // Unreachable receiver: non-zero, names the URL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dead = format!("http://127.0.0.1:{port}/webhooks/clerk");
    let out = run_binary(&cfg, &[], &["send", "organization.created", "--url", &dead]).await;
    assert!(!out.status.success());
    assert!(
        error_line(&out).contains(&format!("cannot reach {dead}")),
        "{}",
        stderr(&out)
    );

    // Arguments: a type or --file or --scenario is required; a scenario takes no type.
    let out = run_binary(&cfg, &[], &["send"]).await;
    assert!(!out.status.success());
    let out = run_binary(
        &cfg,
        &[],
        &["send", "organization.created", "--scenario", "lifecycle"],
    )
    .await;
    assert!(!out.status.success());
    let out = run_binary(&cfg, &[], &["send", "--scenario", "nonsense"]).await;
    assert!(!out.status.success());
    let out = run_binary(&cfg, &[], &["send", "--help"]).await;
    assert!(out.status.success() && stdout(&out).contains("--scenario"));
    let _ = std::fs::remove_file(cfg);
}
