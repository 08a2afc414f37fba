//! The confirmed publisher and the supervisor that keeps its connection alive.
//!
//! A background task owns the AMQP connection: it connects (with backoff), declares
//! the topology and parks the connection where `publish` finds it. When the
//! connection fails the slot is emptied at once — publishes fail fast with
//! [`PublishError::Unavailable`] instead of hanging — and a new connection is built.
//! No process restart is ever needed after a broker outage.
//!
//! Publishes go through a pool of confirm-mode channels, **one message in flight per
//! channel**. lapin hands a `basic.return` to whichever pending confirm of the
//! channel completes next (and completes a `multiple` ack in hash order), so with
//! several messages in flight on one channel, matching a return to its message
//! would rest on how the broker orders and coalesces returns and acks. With one
//! message per channel every confirm and every return is unambiguous; a channel
//! whose publish ended without a clear answer (timeout, error, cancelled caller) is
//! closed, never reused, so a late confirm cannot be taken for the next message's.
//! Many channels also keep the broker's per-channel work in parallel.
//!
//! While the broker blocks the connection (`connection.blocked`, sent when a memory
//! or free-disk alarm is in effect and the connection publishes), a publish fails at
//! once with [`PublishError::Blocked`] and sends nothing: the broker would read no
//! frame of it until the alarm clears, so waiting could only end in a timeout, and a
//! message sent anyway would be queued later, after its caller was told it was not.
//! Only the publishes already in flight when the block begins wait out the confirm
//! timeout. lapin clears the state on `connection.unblocked`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::{
    Channel, Connection,
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio::sync::{Notify, OwnedSemaphorePermit, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;

use super::confirmed::{self, PublishError};
use super::{Endpoints, Topology};
use crate::config::ConnectionUrl;

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

/// Confirm channels a publisher opens at most (publishes in flight at once) unless
/// told otherwise; more concurrent publishes wait for a free channel.
pub const DEFAULT_PUBLISH_CHANNELS: usize = 64;

/// One live connection and its pool of idle confirm channels.
#[derive(Debug)]
struct Link {
    connection: Connection,
    idle: Mutex<Vec<Channel>>,
    /// One permit per channel that may be in use: bounds the pool.
    permits: Arc<Semaphore>,
}

impl Link {
    /// A confirm channel for exactly one publish: an idle one, or a new one while
    /// the pool has room.
    async fn lease(self: &Arc<Self>) -> Result<Lease, lapin::Error> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            std::iter::from_fn(|| idle.pop()).find(|c| c.status().connected())
        };
        let channel = match idle {
            Some(channel) => channel,
            None => confirmed::confirm_channel(&self.connection).await?,
        };
        Ok(Lease {
            link: self.clone(),
            channel: Some(channel),
            _permit: permit,
        })
    }
}

/// A channel borrowed for one publish. Returned to the pool only by
/// [`Lease::release`] after a clear answer; dropped any other way (timeout, error,
/// cancelled request) it is closed, because a late confirm or return could otherwise
/// be taken for the next message's.
struct Lease {
    link: Arc<Link>,
    channel: Option<Channel>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    fn channel(&self) -> &Channel {
        self.channel
            .as_ref()
            .expect("present until released or dropped")
    }

    fn release(mut self) {
        if let Some(channel) = self.channel.take()
            && channel.status().connected()
        {
            self.link
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(channel);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take()
            && channel.status().connected()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Bounded: on a stalled connection the close itself would never finish.
            runtime.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    channel.close(200, "retired after an unanswered publish".into()),
                )
                .await;
            });
        }
    }
}

#[derive(Debug)]
struct Shared {
    url: ConnectionUrl,
    /// The addresses of `url` (the nodes of a cluster) and the one to try first.
    endpoints: Endpoints,
    topology: Topology,
    name: String,
    confirm_timeout: Duration,
    channels: usize,
    link: RwLock<Option<Arc<Link>>>,
    /// A publish saw the connection or a channel fail: check the connection.
    broken: Notify,
    /// A message came back unroutable: re-declare the topology (a queue or binding
    /// was deleted under us).
    repair: Notify,
    connected: Notify,
}

/// Publishes with confirms over a self-healing connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    /// Starts the connection supervisor with [`DEFAULT_PUBLISH_CHANNELS`]; returns at
    /// once (connected or not).
    pub fn start(
        url: ConnectionUrl,
        topology: Topology,
        name: &str,
        confirm_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self::start_with_channels(
            url,
            topology,
            name,
            confirm_timeout,
            DEFAULT_PUBLISH_CHANNELS,
            shutdown,
        )
    }

    /// Like [`Publisher::start`], with at most `channels` publishes in flight.
    pub fn start_with_channels(
        url: ConnectionUrl,
        topology: Topology,
        name: &str,
        confirm_timeout: Duration,
        channels: usize,
        shutdown: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared {
            endpoints: Endpoints::new(&url),
            url,
            topology,
            name: name.to_owned(),
            confirm_timeout,
            channels: channels.max(1),
            link: RwLock::new(None),
            broken: Notify::new(),
            repair: Notify::new(),
            connected: Notify::new(),
        });
        tokio::spawn(supervise(shared.clone(), shutdown));
        Self { shared }
    }

    /// Whether a connection to the broker is up right now.
    pub async fn is_connected(&self) -> bool {
        match self.shared.link.read().await.as_ref() {
            Some(link) => link.connection.status().connected(),
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
    ///
    /// Ok only for a positive confirm of a routed message. The whole call — waiting
    /// for a free channel, sending, waiting for the confirm — is bounded by the
    /// confirm timeout, so a stalled broker costs a caller at most that long.
    pub async fn publish(&self, msg: OutgoingMessage<'_>) -> Result<(), PublishError> {
        let limit = self.shared.confirm_timeout;
        tokio::time::timeout(limit, self.publish_unbounded(msg))
            .await
            .unwrap_or(Err(PublishError::Timeout(limit)))
    }

    async fn publish_unbounded(&self, msg: OutgoingMessage<'_>) -> Result<(), PublishError> {
        let link = self
            .shared
            .link
            .read()
            .await
            .clone()
            .ok_or(PublishError::Unavailable)?;
        if link.connection.status().blocked() {
            return Err(PublishError::Blocked);
        }
        let disconnected = |e: lapin::Error| {
            self.shared.broken.notify_one();
            PublishError::Disconnected(e.to_string())
        };
        let lease = link.lease().await.map_err(disconnected)?;
        // The wait for a free channel may have outlasted the start of a block.
        if link.connection.status().blocked() {
            lease.release();
            return Err(PublishError::Blocked);
        }
        let mut props = confirmed::event_properties(msg.message_id, msg.kind)
            .with_timestamp(msg.timestamp.unwrap_or_else(confirmed::now_timestamp));
        if let Some(headers) = msg.headers {
            props = props.with_headers(headers);
        }
        // Bounded by `publish`'s own timeout; this one is only a backstop.
        let result = confirmed::publish_confirmed(
            lease.channel(),
            msg.exchange,
            msg.routing_key,
            msg.body,
            props,
            self.shared.confirm_timeout,
        )
        .await;
        match &result {
            // A clear answer: the channel can take the next message.
            Ok(()) | Err(PublishError::Nacked) => lease.release(),
            Err(PublishError::Returned(_)) => {
                lease.release();
                self.shared.repair.notify_one();
            }
            // Any other ending drops the lease, which closes the channel.
            Err(PublishError::Disconnected(_)) => self.shared.broken.notify_one(),
            Err(PublishError::Unavailable | PublishError::Blocked | PublishError::Timeout(_)) => {}
        }
        result
    }

    /// Closes the connection cleanly (after in-flight publishes are done).
    pub async fn close(&self) {
        if let Some(link) = self.shared.link.write().await.take() {
            let _ = link.connection.close(200, "shutdown".into()).await;
        }
    }
}

async fn open(shared: &Shared) -> Result<Link, lapin::Error> {
    let connection = shared.endpoints.connect(&shared.name).await?;
    declare(&connection, &shared.topology).await?;
    Ok(Link {
        connection,
        idle: Mutex::new(Vec::new()),
        permits: Arc::new(Semaphore::new(shared.channels)),
    })
}

/// Declares the topology on a short-lived channel (a failed declare closes its
/// channel, never a publishing one).
async fn declare(connection: &Connection, topology: &Topology) -> Result<(), lapin::Error> {
    topology.declare_on(connection).await
}

/// 1 while the named connection is up, else 0 (docs/operations.md).
fn connected_gauge(shared: &Shared, up: bool) {
    metrics::gauge!("broker_connected", "connection" => shared.name.clone()).set(if up {
        1.0
    } else {
        0.0
    });
}

async fn supervise(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(200);
    connected_gauge(&shared, false);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match open(&shared).await {
            Ok(link) => {
                tracing::info!(broker.url = %shared.endpoints.current(), connection = %shared.name, "connected to broker");
                delay = Duration::from_millis(200);
                let link = Arc::new(link);
                *shared.link.write().await = Some(link.clone());
                shared.connected.notify_waiters();
                connected_gauge(&shared, true);
                let mut last_repair: Option<Instant> = None;
                // Watch the connection until it fails or we shut down. While it is
                // up, a returned message or a failed channel means the topology was
                // damaged under us (a queue, binding or exchange deleted): re-declare
                // it, at most once a second, so intake heals without a restart.
                loop {
                    let repair = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = shared.broken.notified() => true,
                        _ = shared.repair.notified() => true,
                        _ = tokio::time::sleep(Duration::from_millis(250)) => false,
                    };
                    if !link.connection.status().connected() {
                        break;
                    }
                    if repair && last_repair.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        last_repair = Some(Instant::now());
                        match declare(&link.connection, &shared.topology).await {
                            Ok(()) => {
                                tracing::warn!(connection = %shared.name, "a message was returned unroutable; topology re-declared")
                            }
                            Err(e) => {
                                tracing::warn!(connection = %shared.name, error = %e, "a message was returned unroutable; re-declaring the topology failed")
                            }
                        }
                    }
                }
                tracing::warn!(broker.url = %shared.endpoints.current(), connection = %shared.name, "broker connection lost; reconnecting");
                connected_gauge(&shared, false);
                // Try the other addresses (cluster nodes) first.
                shared.endpoints.lost();
                shared.link.write().await.take();
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    link.connection.close(320, "reconnecting".into()),
                )
                .await;
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
