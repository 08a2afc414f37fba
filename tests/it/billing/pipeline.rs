//! Billing end to end: Clerk's own example bodies through intake, RabbitMQ and
//! the worker. Nothing is dead-lettered: a user payer is `ignored`, an
//! organization payer's subscription is stored, `paymentAttempt.*` never queued.

use serde_json::json;

use crate::common::worker::*;
use crate::common::*;

fn worker_opts() -> TestOptions {
    TestOptions {
        worker: true,
        ..TestOptions::default()
    }
}

/// A fixture's body with a fresh envelope time, paid by `org` ('' = the user).
fn billing_body(name: &str, org: &str) -> Vec<u8> {
    let f = fixture(name);
    let mut data = f["data"].clone();
    data["payer"]["organization_id"] = json!(org);
    envelope(f["type"].as_str().unwrap(), data, now_secs() * 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clerk_billing_examples_flow_through_the_worker() {
    let app = spawn_app_with(worker_opts()).await;
    let (db, queue) = (app.db.clone(), app.settings.broker.queue.clone());
    let org = format!("org_{}", random_id(12));

    let user_paid = format!("msg_{}", random_id(16));
    let res = app
        .post_signed(&user_paid, &billing_body("subscription.created", ""))
        .await;
    assert_eq!(res.status(), 200);
    let org_paid = format!("msg_{}", random_id(16));
    let res = app
        .post_signed(&org_paid, &billing_body("subscription.created", &org))
        .await;
    assert_eq!(res.status(), 200);
    let item = format!("msg_{}", random_id(16));
    let res = app
        .post_signed(&item, &billing_body("subscriptionItem.pastDue", &org))
        .await;
    assert_eq!(res.status(), 200);
    let attempt = format!("msg_{}", random_id(16));
    let body = envelope(
        "paymentAttempt.created",
        json!({"id": "cpa_1", "payer": {"organization_id": org}}),
        now_secs() * 1000,
    );
    let res = app.post_signed(&attempt, &body).await;
    let json: serde_json::Value = res.json().await.unwrap();
    assert_eq!(json["status"], "ignored");

    assert!(
        wait_status(&db, &user_paid, "ignored").await,
        "user payer ignored"
    );
    assert!(
        wait_status(&db, &org_paid, "processed").await,
        "subscription stored"
    );
    assert!(wait_status(&db, &item, "processed").await, "item stored");
    // The item event is newer than the subscription's copy of the item.
    let status: Option<String> =
        sqlx::query_scalar("select status from billing_items where organization_id = $1")
            .bind(&org)
            .fetch_optional(&db)
            .await
            .unwrap();
    assert_eq!(status.as_deref(), Some("past_due"));
    let subs = count(
        &db,
        "select count(*) from billing_subscriptions where organization_id = $1",
        &org,
    )
    .await;
    assert_eq!(subs, 1);
    app.stop().await.unwrap();
    assert_eq!(queue_depth(&queue).await, 0, "every delivery was acked");
}
