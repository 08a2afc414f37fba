//! The confirmed publisher and the supervisor that keeps its connection alive.
//!
//! A background task owns the AMQP connection: it connects (with backoff), declares
//! the topology, opens a confirm-mode channel and parks it where `publish` finds it.
//! When the connection fails the slot is emptied at once — publishes fail fast with
//! [`PublishError::Unavailable`] instead of hanging — and a new connection is built.
//! No process restart is ever needed after a broker outage.

use std::sync::Arc;
use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio::sync::{Notify, RwLock};
use tokio_util::sync::CancellationToken;

use super::Topology;
use crate::config::ConnectionUrl;

/// Why a publish did not get a positive confirm.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No connection to the broker right now.
    #[error("broker unavailable")]
    Unavailable,
    /// The connection or channel failed during the publish.
    #[error("broker connection failed during publish: {0}")]
    Disconnected(String),
    /// The broker refused the message (`basic.nack`, e.g. a full queue).
    #[error("broker refused the message (nack)")]
    Nacked,
    /// The message was not routed to any queue (`basic.return`).
    #[error("message returned unroutable: {0}")]
    Returned(String),
    /// No confirm arrived in time; the message may or may not be queued.
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
}

impl PublishError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Unavailable => "unavailable",
            PublishError::Disconnected(_) => "disconnected",
            PublishError::Nacked => "nack",
            PublishError::Returned(_) => "returned",
            PublishError::Timeout(_) => "timeout",
        }
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutgoingMessage<'a> {
    /// Target exchange (`""` = default exchange, routing key = queue name).
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body, unchanged webhook bytes.
    pub body: &'a [u8],
    /// Svix id, carried as `message_id`.
    pub message_id: &'a str,
    /// Event type, carried as `type`.
    pub kind: &'a str,
    /// Original intake time (Unix seconds) to keep across retries, or now.
    pub timestamp: Option<u64>,
    /// Extra headers (dead-letter reasons, attempts).
    pub headers: Option<FieldTable>,
}

#[derive(Debug)]
struct Link {
    connection: Connection,
    channel: Channel,
}

#[derive(Debug)]
struct Shared {
    url: ConnectionUrl,
    topology: Topology,
    name: String,
    confirm_timeout: Duration,
    link: RwLock<Option<Arc<Link>>>,
    broken: Notify,
    connected: Notify,
}

/// Publishes with confirms over a self-healing connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    /// Starts the connection supervisor; returns at once (connected or not).
    pub fn start(
        url: ConnectionUrl,
        topology: Topology,
        name: &str,
        confirm_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared {
            url,
            topology,
            name: name.to_owned(),
            confirm_timeout,
            link: RwLock::new(None),
            broken: Notify::new(),
            connected: Notify::new(),
        });
        tokio::spawn(supervise(shared.clone(), shutdown));
        Self { shared }
    }

    /// Whether a connection with a confirm channel is up right now.
    pub async fn is_connected(&self) -> bool {
        match self.shared.link.read().await.as_ref() {
            Some(link) => link.connection.status().connected() && link.channel.status().connected(),
            None => false,
        }
    }

    /// Waits until connected, up to `timeout`; true when connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.connected.notified();
            if self.is_connected().await {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_connected().await;
            }
        }
    }

    /// The topology this publisher declares.
    pub fn topology(&self) -> &Topology {
        &self.shared.topology
    }

    /// Publishes a Clerk event to the events exchange, routing key = its type.
    pub async fn publish_event(
        &self,
        body: &[u8],
        svix_id: &str,
        kind: &str,
    ) -> Result<(), PublishError> {
        self.publish(OutgoingMessage {
            exchange: &self.shared.topology.exchange,
            routing_key: kind,
            body,
            message_id: svix_id,
            kind,
            timestamp: None,
            headers: None,
        })
        .await
    }

    /// Publishes one persistent, mandatory message and waits for its confirm.
    pub async fn publish(&self, msg: OutgoingMessage<'_>) -> Result<(), PublishError> {
        let link = self
            .shared
            .link
            .read()
            .await
            .clone()
            .ok_or(PublishError::Unavailable)?;
        let timestamp = msg.timestamp.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
        let mut props = BasicProperties::default()
            // 2 = persistent: written to disk by the (durable, quorum) queue.
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(msg.message_id.into())
            .with_type(msg.kind.into())
            .with_app_id("callmine-provisioner".into())
            .with_timestamp(timestamp);
        if let Some(headers) = msg.headers {
            props = props.with_headers(headers);
        }
        let confirm = link
            .channel
            .basic_publish(
                msg.exchange.into(),
                msg.routing_key.into(),
                // mandatory: an unroutable message comes back as basic.return
                // instead of being silently dropped.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                msg.body,
                props,
            )
            .await
            .map_err(|e| {
                self.shared.broken.notify_one();
                PublishError::Disconnected(e.to_string())
            })?;
        // RabbitMQ promises no confirm latency; never wait forever.
        let confirmation = tokio::time::timeout(self.shared.confirm_timeout, confirm)
            .await
            .map_err(|_| PublishError::Timeout(self.shared.confirm_timeout))?
            .map_err(|e| {
                self.shared.broken.notify_one();
                PublishError::Disconnected(e.to_string())
            })?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                Err(PublishError::Returned(returned.reply_text.to_string()))
            }
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            Confirmation::NotRequested => Err(PublishError::Disconnected(
                "channel is not in confirm mode".to_owned(),
            )),
        }
    }

    /// Closes the connection cleanly (after in-flight publishes are done).
    pub async fn close(&self) {
        if let Some(link) = self.shared.link.write().await.take() {
            let _ = link.connection.close(200, "shutdown".into()).await;
        }
    }
}

async fn open(shared: &Shared) -> Result<Link, lapin::Error> {
    let connection = super::connect(&shared.url, &shared.name).await?;
    let channel = connection.create_channel().await?;
    shared.topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(Link {
        connection,
        channel,
    })
}

async fn supervise(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(200);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match open(&shared).await {
            Ok(link) => {
                tracing::info!(broker.url = %shared.url, connection = %shared.name, "connected to broker");
                delay = Duration::from_millis(200);
                let link = Arc::new(link);
                *shared.link.write().await = Some(link.clone());
                shared.connected.notify_waiters();
                // Watch the connection until it fails, a publish reports it broken,
                // or we shut down.
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = shared.broken.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    if !link.connection.status().connected() || !link.channel.status().connected() {
                        break;
                    }
                }
                tracing::warn!(broker.url = %shared.url, connection = %shared.name, "broker connection lost; reconnecting");
                shared.link.write().await.take();
                let _ = link.connection.close(320, "reconnecting".into()).await;
            }
            Err(e) => {
                tracing::warn!(broker.url = %shared.url, connection = %shared.name, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot connect to broker");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Builds a header table from string and integer values.
pub fn header_table(entries: &[(&str, HeaderValue<'_>)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        let v = match value {
            HeaderValue::Text(s) => AMQPValue::LongString((*s).into()),
            HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        };
        table.insert(ShortString::from(*key), v);
    }
    table
}

/// A header value for [`header_table`].
#[derive(Debug, Clone, Copy)]
pub enum HeaderValue<'a> {
    /// Text header.
    Text(&'a str),
    /// Integer header.
    Int(i64),
}
