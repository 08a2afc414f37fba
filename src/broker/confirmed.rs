//! The one confirmed publish: every message this code base sends (intake's
//! [`Publisher`](super::Publisher), `dlq replay`, the load tools, the test harness)
//! goes through [`publish_confirmed`].
//!
//! Guarantee: `Ok` only for the broker's positive confirm of a message that was routed
//! to a queue. The message is `mandatory`, so an unroutable one comes back as
//! `basic.return` and is an error even though the broker then acks it; the call never
//! takes longer than its timeout.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

/// `app_id` of every message this service publishes.
pub const APP_ID: &str = "callmine-provisioner";

/// Content type of every event body (the unchanged webhook JSON).
pub const CONTENT_TYPE: &str = "application/json";

/// Why a publish did not get a positive confirm.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No connection to the broker right now.
    #[error("broker unavailable")]
    Unavailable,
    /// The broker blocks this connection's publishes (`connection.blocked`: a
    /// memory or free-disk alarm on some node of the cluster); nothing was sent.
    #[error("broker blocks publishers (resource alarm)")]
    Blocked,
    /// The connection or channel failed during the publish.
    #[error("broker connection failed during publish: {0}")]
    Disconnected(String),
    /// The broker refused the message (`basic.nack`, e.g. a full queue).
    #[error("broker refused the message (nack)")]
    Nacked,
    /// The message was not routed to any queue (`basic.return`).
    #[error("message returned unroutable: {0}")]
    Returned(Returned),
    /// No confirm arrived in time; the message may or may not be queued.
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
}

impl PublishError {
    /// Every value of [`PublishError::reason`].
    pub const REASONS: [&'static str; 5] =
        ["unavailable", "disconnected", "nack", "returned", "timeout"];

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Unavailable => "unavailable",
            PublishError::Blocked => "blocked",
            PublishError::Disconnected(_) => "disconnected",
            PublishError::Nacked => "nack",
            PublishError::Returned(_) => "returned",
            PublishError::Timeout(_) => "timeout",
        }
    }
}

/// The broker's `basic.return` of an unroutable message; shows as `"{code} {text}"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Returned {
    /// AMQP reply code (312 = no route).
    pub reply_code: u16,
    /// AMQP reply text (`NO_ROUTE`).
    pub reply_text: String,
}

impl std::fmt::Display for Returned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.reply_code, self.reply_text)
    }
}

/// The properties of a Clerk event as intake publishes it: persistent, JSON, the svix
/// id as `message_id` (the worker's deduplication key), the event type as `type`.
/// Callers add the intake `timestamp` and any headers.
pub fn event_properties(svix_id: &str, event_type: &str) -> BasicProperties {
    BasicProperties::default()
        // 2 = persistent: written to disk by the (durable, quorum) queue.
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(svix_id.into())
        .with_type(event_type.into())
        .with_app_id(APP_ID.into())
}

/// Seconds since the Unix epoch, the unit of the AMQP `timestamp` property.
pub fn now_timestamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Opens a channel in confirm mode on `connection`.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes one `mandatory` message on a confirm-mode channel and waits for its
/// confirm, all within `timeout`.
///
/// With several messages in flight on one channel lapin may hand a `basic.return` to
/// another message's confirm; callers that must match every return to its message
/// (intake) keep one message in flight per channel.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), PublishError> {
    tokio::time::timeout(
        timeout,
        publish_unbounded(channel, exchange, routing_key, body, properties),
    )
    .await
    .unwrap_or(Err(PublishError::Timeout(timeout)))
}

async fn publish_unbounded(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let disconnected = |e: lapin::Error| PublishError::Disconnected(e.to_string());
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            // mandatory: an unroutable message comes back as basic.return instead of
            // being silently dropped.
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .map_err(disconnected)?;
    match confirm.await.map_err(disconnected)? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(PublishError::Returned(Returned {
            reply_code: returned.reply_code,
            reply_text: returned.reply_text.to_string(),
        })),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
        Confirmation::NotRequested => Err(PublishError::Disconnected(
            "channel is not in confirm mode".to_owned(),
        )),
    }
}
