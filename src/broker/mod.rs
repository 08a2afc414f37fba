//! RabbitMQ: connections, the topology of DESIGN §4, the one confirmed publish
//! ([`publish_confirmed`]) and the pooled publisher built on it.
//!
//! Guarantee: a publish reports success only after the broker's positive confirm of a
//! message that was routed to a queue (a returned message is a failure even when the
//! broker acks it), so a caller never acknowledges what was not durably handed on.

mod confirmed;
pub mod headers;
mod publisher;
mod topology;

pub use confirmed::{
    APP_ID, CONTENT_TYPE, PublishError, Returned, confirm_channel, event_properties, now_timestamp,
    publish_confirmed,
};
pub use publisher::{
    DEFAULT_PUBLISH_CHANNELS, HeaderValue, OutgoingMessage, Publisher, header_table,
};
pub use topology::{DEAD_LETTER_DELIVERY_LIMIT, Topology};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use crate::config::ConnectionUrl;

/// Adds a 10 s heartbeat and a 5 s connection timeout unless the URL sets them:
/// without heartbeats a silently dead peer takes minutes to notice.
pub fn tuned_url(url: &str) -> String {
    let mut out = url.to_owned();
    for (key, value) in [("heartbeat", "10"), ("connection_timeout", "5000")] {
        if !out.contains(&format!("{key}=")) {
            out.push(if out.contains('?') { '&' } else { '?' });
            out.push_str(&format!("{key}={value}"));
        }
    }
    out
}

/// The longest connecting to one address may take, whatever the URL says: lapin's
/// own `connection_timeout` covers the TCP connect, not every later handshake step,
/// and a peer that accepts but never answers must not hang a command or a test
/// forever.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(15);

/// Opens one AMQP connection to the first address of `url` that answers (`url` may
/// list several, comma-separated: the nodes of a cluster); `name` shows in the
/// management UI. Each address fails with `TimedOut` after [`CONNECT_DEADLINE`];
/// when none answers, the last address's error is returned.
pub async fn connect(url: &ConnectionUrl, name: &str) -> Result<Connection, lapin::Error> {
    Endpoints::new(url).connect(name).await
}

/// The addresses of `broker.url` and the one to try first: a long-lived client
/// (publisher, consumer) keeps one, connects with [`Endpoints::connect`] and calls
/// [`Endpoints::lost`] when an established connection fails, so the next attempt
/// starts with the other addresses and comes back to the failed one last.
#[derive(Debug)]
pub struct Endpoints {
    addresses: Vec<ConnectionUrl>,
    /// Index of the address connected last (or to try first).
    current: AtomicUsize,
}

impl Endpoints {
    /// The addresses `url` lists (one when it is a single URL).
    pub fn new(url: &ConnectionUrl) -> Self {
        Self {
            addresses: url.addresses(),
            current: AtomicUsize::new(0),
        }
    }

    /// How many addresses there are.
    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    /// Never true: a URL has at least one address.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }

    /// The address connected last (or to be tried first), redacted.
    pub fn current(&self) -> String {
        self.addresses[self.current.load(Ordering::Relaxed) % self.addresses.len()].redacted()
    }

    /// Tries every address in turn, starting with the current one, and keeps the
    /// first that answers.
    pub async fn connect(&self, name: &str) -> Result<Connection, lapin::Error> {
        let n = self.addresses.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in (0..n).map(|k| (start + k) % n) {
            match connect_one(&self.addresses[i], name).await {
                Ok(connection) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(connection);
                }
                Err(e) => {
                    if n > 1 {
                        tracing::warn!(broker.address = %self.addresses[i], connection = %name, error = %e, "broker address does not answer; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one address"))
    }

    /// An established connection failed: start the next attempt with the address
    /// after the one it was on.
    pub fn lost(&self) {
        let n = self.addresses.len();
        let next = (self.current.load(Ordering::Relaxed) + 1) % n;
        self.current.store(next, Ordering::Relaxed);
    }
}

async fn connect_one(url: &ConnectionUrl, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(
        CONNECT_DEADLINE,
        Connection::connect(&tuned_url(url.expose()), props),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no AMQP handshake within {} s", CONNECT_DEADLINE.as_secs()),
        ))),
    }
}

/// Reads a queue's counts with a passive declare: never creates or changes it.
/// A missing queue answers 404 and closes `channel`.
pub async fn inspect(channel: &lapin::Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::{Endpoints, tuned_url};
    use crate::config::ConnectionUrl;

    #[test]
    fn after_a_lost_connection_the_next_address_comes_first() {
        let endpoints = Endpoints::new(&ConnectionUrl::new(
            "amqp://u:pw@a:5672/v,amqp://u:pw@b:5673/v,amqp://u:pw@c:5674/v",
        ));
        assert_eq!(endpoints.len(), 3);
        assert_eq!(endpoints.current(), "amqp://u:***@a:5672/v");
        endpoints.lost();
        assert_eq!(endpoints.current(), "amqp://u:***@b:5673/v");
        endpoints.lost();
        endpoints.lost();
        assert_eq!(endpoints.current(), "amqp://u:***@a:5672/v");
    }

    #[test]
    fn tuned_url_adds_heartbeat_once() {
        assert_eq!(
            tuned_url("amqp://g:g@h:5672/%2f"),
            "amqp://g:g@h:5672/%2f?heartbeat=10&connection_timeout=5000"
        );
        assert_eq!(
            tuned_url("amqp://h/%2f?heartbeat=3"),
            "amqp://h/%2f?heartbeat=3&connection_timeout=5000"
        );
    }
}
