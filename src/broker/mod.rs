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

/// The longest [`connect`] may take, whatever the URL says: lapin's own
/// `connection_timeout` covers the TCP connect, not every later handshake step, and a
/// peer that accepts but never answers must not hang a command or a test forever.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(15);

/// Opens one AMQP connection; `name` shows in the management UI. Fails with
/// `TimedOut` after [`CONNECT_DEADLINE`].
pub async fn connect(url: &ConnectionUrl, name: &str) -> Result<Connection, lapin::Error> {
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

#[cfg(test)]
mod tests {
    use super::tuned_url;

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
