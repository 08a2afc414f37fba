//! The broker topology of DESIGN §4, declared idempotently by `serve`, `worker`
//! and `migrate` (re-declaring with the same arguments is a no-op).

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use crate::config::{BrokerSettings, WorkerSettings};

/// Names and arguments of every exchange and queue this service uses.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Topic exchange Clerk events are published to (routing key = event type).
    pub exchange: String,
    /// Quorum work queue.
    pub queue: String,
    /// Dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Dead-letter queue (quorum, delivery limit [`DEAD_LETTER_DELIVERY_LIMIT`]).
    pub dead_letter_queue: String,
    /// Delayed-retry queues: (name, delay in ms), shortest first.
    pub retry_queues: Vec<(String, u64)>,
    /// `x-delivery-limit` of the work queue.
    pub delivery_limit: u32,
    /// Optional `x-expires` for every queue (tests).
    pub queue_expires_ms: Option<u64>,
    /// `x-quorum-initial-group-size` of every queue, when set
    /// ([`BrokerSettings::initial_group_size`]).
    pub initial_group_size: Option<u32>,
}

/// `x-delivery-limit` of the dead-letter queue: in effect none, and said explicitly.
///
/// A quorum queue without the argument has no limit up to RabbitMQ 3.13, but from 4.0
/// a default of 20 deliveries, after which a message is dropped (the dead-letter
/// queue has no dead-letter exchange of its own). `-1`, 4.x's "unlimited", is
/// refused by 3.x (`PRECONDITION_FAILED`, and no policy takes it either), so the
/// one value every supported version (3.10 to 4.x) accepts and treats alike is the
/// largest the argument holds: 2^31 − 1 deliveries is never reached. Every view
/// (`dlq list`, `show`, a console page) counts one delivery of each letter it reads,
/// since it gives the letters back unchanged rather than copying them (see
/// `dead_letters::queue`), so the limit must be one no view will ever reach.
pub const DEAD_LETTER_DELIVERY_LIMIT: i32 = i32::MAX;

fn quorum_args(expires: Option<u64>, group_size: Option<u32>) -> FieldTable {
    let mut args = FieldTable::default();
    // Quorum: replicated, always durable, with poison-message handling.
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if let Some(ms) = expires {
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms as i64));
    }
    // Members a new queue gets (spread over the cluster's nodes).
    if let Some(size) = group_size {
        args.insert(
            "x-quorum-initial-group-size".into(),
            AMQPValue::LongInt(size.min(i32::MAX as u32) as i32),
        );
    }
    args
}

/// The kinds of queue of the topology.
#[derive(Debug, Clone, Copy)]
enum Queue {
    Work,
    Dead,
    /// A delayed-retry queue and its delay (ms).
    Retry(u64),
}

/// When `text` (an error) is RabbitMQ refusing a queue declaration because the
/// queue exists with another `x-quorum-initial-group-size`: `Some(Some(size))` with
/// the size it has (`None`: declared without one), or `Some(None)` when the message
/// does not say. `None` for any other error.
fn current_group_size(text: &str) -> Option<Option<Option<u32>>> {
    if !(text.contains("PRECONDITION_FAILED") && text.contains("x-quorum-initial-group-size")) {
        return None;
    }
    let Some((_, current)) = text.split_once("but current is ") else {
        // Exists with another size we cannot read: check it exists, nothing more.
        return Some(None);
    };
    if current.starts_with("none") {
        return Some(Some(None));
    }
    let size = current
        .strip_prefix("the value '")
        .and_then(|rest| rest.split('\'').next())
        .and_then(|n| n.parse().ok());
    Some(size.map(Some))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

impl Topology {
    /// Topology from the configured names.
    pub fn new(broker: &BrokerSettings, worker: &WorkerSettings) -> Self {
        Self {
            exchange: broker.exchange.clone(),
            queue: broker.queue.clone(),
            dead_letter_exchange: broker.dead_letter_exchange.clone(),
            dead_letter_queue: broker.dead_letter_queue.clone(),
            retry_queues: worker
                .retry_delays_ms
                .iter()
                .map(|ms| (format!("{}.{ms}ms", broker.retry_queue_prefix), *ms))
                .collect(),
            delivery_limit: broker.delivery_limit,
            queue_expires_ms: broker.queue_expires_ms,
            initial_group_size: broker.initial_group_size(),
        }
    }

    /// Declares exchanges, queues and bindings on `connection`; safe to call from
    /// many processes, also after `initial_group_size` changed.
    ///
    /// RabbitMQ checks `x-quorum-initial-group-size` for equivalence on every
    /// re-declaration (3.10: `PRECONDITION_FAILED - inequivalent arg … received the
    /// value '3' … but current is none`), though it only matters when a queue is
    /// created. So a queue that exists with another group size (or none) is
    /// re-declared with the one it has, read from that refusal (or, should the
    /// message not say, only checked to exist): a deployment that moves from one
    /// broker address to several, or changes the size, keeps its queues and starts,
    /// and every other argument is still checked.
    pub async fn declare_on(&self, connection: &Connection) -> Result<(), lapin::Error> {
        let mut channel = connection.create_channel().await?;
        self.declare_exchanges(&channel).await?;
        for (name, queue) in self.queues() {
            let first = channel
                .queue_declare(
                    name.as_str().into(),
                    durable(),
                    self.queue_args(queue, self.initial_group_size),
                )
                .await;
            if let Err(e) = first {
                let Some(current) = current_group_size(&e.to_string()) else {
                    return Err(e);
                };
                // The refusal closed the channel.
                channel = connection.create_channel().await?;
                let (options, args) = match current {
                    Some(size) => (durable(), self.queue_args(queue, size)),
                    None => (
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    ),
                };
                channel
                    .queue_declare(name.as_str().into(), options, args)
                    .await?;
            }
            self.bind(&channel, queue).await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Declares exchanges, queues and bindings on `channel`, every quorum queue with
    /// `initial_group_size` (when set): for a topology whose queues do not exist yet
    /// or have the same arguments; [`Topology::declare_on`] copes with others.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        self.declare_exchanges(channel).await?;
        for (name, queue) in self.queues() {
            channel
                .queue_declare(
                    name.as_str().into(),
                    durable(),
                    self.queue_args(queue, self.initial_group_size),
                )
                .await?;
            self.bind(channel, queue).await?;
        }
        Ok(())
    }

    async fn declare_exchanges(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let exchange_opts = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for exchange in [&self.exchange, &self.dead_letter_exchange] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    exchange_opts,
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Every queue with its kind, in declaration order.
    fn queues(&self) -> Vec<(String, Queue)> {
        let mut queues = vec![
            (self.queue.clone(), Queue::Work),
            (self.dead_letter_queue.clone(), Queue::Dead),
        ];
        queues.extend(
            self.retry_queues
                .iter()
                .map(|(name, delay)| (name.clone(), Queue::Retry(*delay))),
        );
        queues
    }

    /// A queue's binding: the work queue takes every event, the dead-letter queue
    /// every dead letter; retry queues are only published to directly.
    async fn bind(&self, channel: &Channel, queue: Queue) -> Result<(), lapin::Error> {
        let (name, exchange) = match queue {
            Queue::Work => (&self.queue, &self.exchange),
            Queue::Dead => (&self.dead_letter_queue, &self.dead_letter_exchange),
            Queue::Retry(_) => return Ok(()),
        };
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// The arguments of a queue of kind `queue`, with `group_size` as its
    /// `x-quorum-initial-group-size` when given.
    fn queue_args(&self, queue: Queue, group_size: Option<u32>) -> FieldTable {
        let mut args = quorum_args(self.queue_expires_ms, group_size);
        match queue {
            Queue::Work => {
                // Crash-loop safety net: a message redelivered this often is
                // dead-lettered by the broker itself (the worker dead-letters it
                // first, with headers).
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongInt(self.delivery_limit as i32),
                );
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(self.dead_letter_exchange.as_str().into()),
                );
                // At-least-once dead-lettering: the broker keeps the message until
                // the dead-letter queue confirms it; it requires reject-publish
                // overflow.
                args.insert(
                    "x-dead-letter-strategy".into(),
                    AMQPValue::LongString("at-least-once".into()),
                );
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString("reject-publish".into()),
                );
            }
            Queue::Dead => {
                // The dead-letter queue's delivery limit is explicit and never
                // reached: without it RabbitMQ 4.x would drop a dead letter after 20
                // deliveries.
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongInt(DEAD_LETTER_DELIVERY_LIMIT),
                );
            }
            Queue::Retry(delay) => {
                // Per-queue TTL (not per message): each queue holds one delay, so a
                // long delay never blocks a shorter one at the head.
                args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay as i64));
                // Expired messages go straight back to the work queue through the
                // default exchange.
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString("".into()),
                );
                args.insert(
                    "x-dead-letter-routing-key".into(),
                    AMQPValue::LongString(self.queue.as_str().into()),
                );
                args.insert(
                    "x-dead-letter-strategy".into(),
                    AMQPValue::LongString("at-least-once".into()),
                );
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString("reject-publish".into()),
                );
            }
        }
        args
    }

    /// The retry queue for the given retry number (0-based), if any remain.
    pub fn retry_queue(&self, retry: usize) -> Option<&str> {
        self.retry_queues.get(retry).map(|(name, _)| name.as_str())
    }

    /// Every queue name, for tests and cleanup.
    pub fn queue_names(&self) -> Vec<String> {
        let mut names = vec![self.queue.clone(), self.dead_letter_queue.clone()];
        names.extend(self.retry_queues.iter().map(|(n, _)| n.clone()));
        names
    }
}

#[cfg(test)]
mod tests {
    use super::current_group_size;

    #[test]
    fn reads_the_group_size_a_queue_has_from_the_refusal() {
        let refusal = |received: &str, current: &str| {
            format!(
                "protocol error: AMQP soft error: PRECONDITION-FAILED: PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' for queue 'q' in vhost '/': received {received} but current is {current}"
            )
        };
        let three = "the value '3' of type 'signedint'";
        assert_eq!(
            current_group_size(&refusal(three, "none")),
            Some(Some(None))
        );
        assert_eq!(
            current_group_size(&refusal("none", three)),
            Some(Some(Some(3)))
        );
        assert_eq!(
            current_group_size(&refusal("the value '2' of type 'signedint'", three)),
            Some(Some(Some(3)))
        );
        assert_eq!(
            current_group_size(
                "PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size'"
            ),
            Some(None)
        );
        assert_eq!(
            current_group_size("PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit'"),
            None
        );
    }
}
