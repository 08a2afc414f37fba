//! The lock that keeps sessions on the dead-letter queue from interleaving, across
//! processes: the exclusive consumer of a small classic queue `<dead queue>.lock`.
//!
//! Guarantee: at most one session holds it; the broker itself frees it when the
//! holder's channel or connection ends, crash included. A waiting session sees the
//! holder in the queue's consumer count, so waiting raises no channel errors.

use std::time::Duration;

use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer, ErrorKind};
use tokio::time::Instant;

/// Why the lock was not taken.
#[derive(Debug)]
pub(super) enum LockError {
    /// The broker failed.
    Broker(lapin::Error),
    /// Another session held it for the whole wait.
    Busy,
}

impl From<lapin::Error> for LockError {
    fn from(e: lapin::Error) -> Self {
        Self::Broker(e)
    }
}

/// Takes the lock of `queue`, waiting up to `lock_wait`: the channel and consumer
/// that hold it (dropping or closing either frees it).
pub(super) async fn take(
    connection: &Connection,
    queue: &str,
    lock_wait: Duration,
) -> Result<(Channel, Consumer), LockError> {
    let name = format!("{queue}.lock");
    let deadline = Instant::now() + lock_wait;
    let mut warned = false;
    let mut channel = connection.create_channel().await?;
    loop {
        let mut args = FieldTable::default();
        // A plain classic queue that only ever has one (exclusive) consumer;
        // it disappears with that consumer, or after a minute unused.
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        args.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
        let opts = QueueDeclareOptions {
            auto_delete: true,
            durable: false,
            ..QueueDeclareOptions::default()
        };
        let free = match channel
            .queue_declare(name.as_str().into(), opts, args)
            .await
        {
            Ok(q) => q.consumer_count() == 0,
            Err(e) => return Err(LockError::Broker(e)),
        };
        if free {
            let consume = channel
                .basic_consume(
                    name.as_str().into(),
                    "provisioner-dlq-lock".into(),
                    BasicConsumeOptions {
                        exclusive: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match consume {
                // Held until this channel closes (with the connection, on a crash).
                Ok(consumer) => return Ok((channel, consumer)),
                // 403 ACCESS_REFUSED (another process won the race) or 404 (the
                // queue was auto-deleted in between): the channel is gone, retry.
                Err(e) if matches!(reply_code(&e), Some(403 | 404)) => {
                    tracing::debug!(error = %e, "lost the race for the dlq lock");
                    channel = connection.create_channel().await?;
                }
                Err(e) => return Err(LockError::Broker(e)),
            }
        }
        if Instant::now() >= deadline {
            return Err(LockError::Busy);
        }
        if !warned {
            tracing::warn!(queue = %queue, "another dlq command is using the dead-letter queue; waiting for it");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The AMQP reply code of a channel or connection error, if the broker sent one.
pub(super) fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}
