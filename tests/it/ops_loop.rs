//! The operator loop of issue 5 with the real worker and read API: an event that
//! cannot be applied is dead-lettered with its reason, `dlq list` shows it, a replay
//! after the cause is gone provisions it (audited as `replay`), a still-broken event
//! replayed is dead again rather than lost; and every `send --scenario` converges.

use crate::common;
use std::time::Duration;

use crate::common::worker::{
    count, fail_workspace_writes, heal_workspace_writes, wait_depth, wait_status, worker_opts,
};
use crate::common::*;
use provisioner::cli::send::{self, Scenario, SendArgs};
use provisioner::dead_letters::{self as dlq, ReplayOptions, Selection};
use provisioner::progress::Silent;
use serde_json::json;

/// A dead letter replayed once its cause is gone is provisioned through the real worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_after_its_cause_is_gone_is_provisioned() {
    // Arrange: an event that fails every attempt while workspace writes are broken.
    let app = spawn_app_with(worker_opts()).await;
    let org = format!("org_{}", random_id(16));
    fail_workspace_writes(&app.db, &org, None, "workspace writes are broken").await;
    let mut args = SendArgs::event("organization.created");
    args.url = Some(format!("{}/webhooks/clerk", app.address));
    args.org = Some(org.clone());
    args.name = Some("Phoenix".into());
    let sent = send::send(&app.settings, &args).await.unwrap();
    assert_eq!(sent.status, 200);
    assert!(
        wait_status(&app.db, &sent.id, "dead").await,
        "recorded dead"
    );
    assert!(wait_depth(&app.settings.broker.dead_letter_queue, 1).await);

    // dlq list shows it with its reason.
    let listing = dlq::list(&app.settings).await.unwrap();
    assert_eq!(listing.count, 1);
    let l = &listing.data[0];
    assert_eq!(l.id.as_deref(), Some(sent.id.as_str()));
    assert_eq!(l.kind.as_deref(), Some("organization.created"));
    assert_eq!(l.workspace_id.as_deref(), Some(org.as_str()));
    assert_eq!(l.error_class.as_deref(), Some("retries-exhausted"));
    assert!(
        l.error
            .as_deref()
            .unwrap()
            .contains("workspace writes are broken"),
        "{l:?}"
    );
    assert!(l.attempts.unwrap() >= 1);
    assert!(l.first_failed_at.is_some());

    // Act: the cause goes away, then ops replay it.
    heal_workspace_writes(&app.db).await;
    let report = dlq::replay(
        &app.settings,
        &ReplayOptions::new(Selection::Org(org.clone())),
        &Silent,
    )
    .await
    .unwrap();

    // Assert
    assert_eq!(report.summary(), "replayed 1, failed 0");
    assert!(
        wait_status(&app.db, &sent.id, "processed").await,
        "provisioned by the replay"
    );
    let res = app.get_api(&format!("/v1/workspaces/{org}")).await;
    assert_eq!(res.status(), 200);
    let ws: serde_json::Value = res.json().await.unwrap();
    assert_eq!(ws["name"], "Phoenix");
    let actors: Vec<String> =
        sqlx::query_scalar("select distinct actor from audit_log where event_id = $1")
            .bind(&sent.id)
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        actors,
        ["replay"],
        "the replay's changes are audited as replay"
    );
    assert_eq!(queue_depth(&app.settings.broker.dead_letter_queue).await, 0);
    app.stop().await.unwrap();
}

/// An event replayed while its cause remains is dead-lettered again, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_still_broken_event_replayed_is_dead_again_not_lost() {
    // Arrange: a signed organization.created whose data has no id.
    let app = spawn_app_with(worker_opts()).await;
    let id = format!("msg_{}", random_id(20));
    let body = envelope(
        "organization.created",
        json!({"object": "organization", "name": "No Id"}),
        now_secs() * 1000,
    );
    assert_eq!(app.post_signed(&id, &body).await.status(), 200);
    assert!(wait_status(&app.db, &id, "dead").await);
    assert!(wait_depth(&app.settings.broker.dead_letter_queue, 1).await);
    let before = dlq::list(&app.settings).await.unwrap();
    assert_eq!(before.data[0].error_class.as_deref(), Some("payload"));
    assert!(before.data[0].error.is_some(), "the reason is shown");

    // Act
    let report = dlq::replay(
        &app.settings,
        &ReplayOptions::new(Selection::Ids(vec![id.clone()])),
        &Silent,
    )
    .await
    .unwrap();
    assert_eq!(report.replayed.len(), 1);

    // Assert: the worker took it up again and dead-lettered it again.
    let attempts = common::eventually(Duration::from_secs(60), || async {
        let n: i32 = sqlx::query_scalar("select attempts from events where svix_id = $1")
            .bind(&id)
            .fetch_one(&app.db)
            .await
            .ok()?;
        (n >= 2).then_some(n)
    })
    .await;
    assert!(attempts.is_some(), "the replay was processed afresh");
    assert!(
        wait_depth(&app.settings.broker.dead_letter_queue, 1).await,
        "dead again"
    );
    let after = dlq::list(&app.settings).await.unwrap();
    assert_eq!(after.count, 1);
    assert_eq!(after.data[0].id.as_deref(), Some(id.as_str()));
    assert_eq!(after.data[0].error_class.as_deref(), Some("payload"));
    assert_eq!(
        count(
            &app.db,
            "select count(*) from workspaces where name = $1",
            "No Id"
        )
        .await,
        0
    );
    app.stop().await.unwrap();
}

/// Every `send` scenario, through intake and the real worker, converges to the state the
/// read API answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_converges_through_the_real_worker_and_api() {
    let app = spawn_app_with(worker_opts()).await;
    let url = format!("{}/webhooks/clerk", app.address);
    for which in [
        Scenario::Lifecycle,
        Scenario::Reorder,
        Scenario::Duplicates,
        Scenario::DeleteFirst,
        Scenario::MemberFirst,
    ] {
        let report = send::run_scenario(&app.settings, which, None, &url, Duration::from_secs(90))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", which.name()));
        assert!(
            report.differences.is_empty(),
            "{}: {:?}\n{}",
            which.name(),
            report.differences,
            report.workspace
        );
        assert_eq!(report.workspace["id"], report.org_id.as_str());
    }
    app.stop().await.unwrap();
}

/// Separate `send`s about one workspace compose into one consistent workspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_sends_about_one_workspace_compose() {
    // `send` derives the membership id from org + user, and embeds an organization it
    // knows nothing about with an old version: later membership sends update the
    // same member and never rename the workspace.
    let app = spawn_app_with(worker_opts()).await;
    let org = format!("org_{}", random_id(16));
    let user = format!("user_{}", random_id(16));
    let url = format!("{}/webhooks/clerk", app.address);
    let mut last = String::new();
    for (kind, name, role) in [
        ("organization.created", Some("Composed Ltd"), None),
        ("organizationMembership.created", None, Some("org:admin")),
        ("organizationMembership.updated", None, Some("org:member")),
    ] {
        let mut args = SendArgs::event(kind);
        args.url = Some(url.clone());
        args.org = Some(org.clone());
        args.user = Some(user.clone());
        args.name = name.map(str::to_owned);
        args.role = role.map(str::to_owned);
        let sent = send::send(&app.settings, &args).await.unwrap();
        assert_eq!(sent.status, 200);
        last = sent.id;
    }
    assert!(wait_status(&app.db, &last, "processed").await);

    let ws: serde_json::Value = app
        .get_api(&format!("/v1/workspaces/{org}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ws["name"], "Composed Ltd", "membership sends do not rename");
    let members: serde_json::Value = app
        .get_api(&format!("/v1/workspaces/{org}/members"))
        .await
        .json()
        .await
        .unwrap();
    let data = members["data"].as_array().unwrap();
    assert_eq!(
        data.len(),
        1,
        "one member: the update hit the same membership"
    );
    assert_eq!(data[0]["user_id"], user.as_str());
    assert_eq!(data[0]["role"], "member");
    app.stop().await.unwrap();
}
