//! Intake: `POST /webhooks/clerk` against a real RabbitMQ (DESIGN §3).

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_handled_event_is_queued_after_confirm() {
    // Arrange
    let app = spawn_app().await;
    let body = serde_json::to_vec(&fixture("organization.created")).unwrap();
    let id = format!("msg_{}", random_id(20));

    // Act
    let res = app.post_signed(&id, &body).await;

    // Assert
    assert_eq!(res.status(), 200);
    let json: serde_json::Value = res.json().await.unwrap();
    assert_eq!(json, serde_json::json!({"status": "queued", "id": id}));
    let msgs = app.drain_queue(&app.settings.broker.queue).await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.delivery.data, body, "body is published unchanged");
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        id
    );
    assert_eq!(
        m.delivery.properties.kind().as_ref().unwrap().as_str(),
        "organization.created"
    );
    assert_eq!(m.delivery.properties.delivery_mode(), &Some(2));
    assert_eq!(m.delivery.routing_key.as_str(), "organization.created");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhandled_type_is_ignored_and_not_queued() {
    let app = spawn_app().await;
    let body = envelope("session.created", serde_json::json!({"id": "sess_1"}), 1);
    let res = app.post_signed("msg_ignored", &body).await;
    assert_eq!(res.status(), 200);
    let json: serde_json::Value = res.json().await.unwrap();
    assert_eq!(json["status"], "ignored");
    assert_eq!(app.queue_depth(&app.settings.broker.queue).await, 0);
}
