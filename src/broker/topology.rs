//! The broker topology of DESIGN §4, declared idempotently by `serve`, `worker`
//! and `migrate` (re-declaring with the same arguments is a no-op).

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
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
}

/// `x-delivery-limit` of the dead-letter queue: in effect none, and said explicitly.
///
/// A quorum queue without the argument has no limit up to RabbitMQ 3.13, but from 4.0
/// a default of 20 deliveries, after which a message is dropped (the dead-letter
/// queue has no dead-letter exchange of its own). `-1`, 4.x's "unlimited", is
/// refused by 3.x (`PRECONDITION_FAILED`, and no policy takes it either), so the
/// one value every supported version (3.10 to 4.x) accepts and treats alike is the
/// largest the argument holds: 2^31 − 1 deliveries is never reached. `dlq list` and
/// `show` do not count a delivery anyway (see `ops::dlq::queue`); this is the net
/// under a crashed session, which does.
pub const DEAD_LETTER_DELIVERY_LIMIT: i32 = i32::MAX;

fn quorum_args(expires: Option<u64>) -> FieldTable {
    let mut args = FieldTable::default();
    // Quorum: replicated, always durable, with poison-message handling.
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if let Some(ms) = expires {
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms as i64));
    }
    args
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
        }
    }

    /// Declares exchanges, queues and bindings; safe to call from many processes.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let exchange_opts = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                exchange_opts,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Topic,
                exchange_opts,
                FieldTable::default(),
            )
            .await?;

        let mut work = quorum_args(self.queue_expires_ms);
        // Crash-loop safety net: a message redelivered this often is dead-lettered
        // by the broker itself (the worker dead-letters it first, with headers).
        work.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit as i32),
        );
        work.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange.as_str().into()),
        );
        // At-least-once dead-lettering: the broker keeps the message until the
        // dead-letter queue confirms it; it requires reject-publish overflow.
        work.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        work.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        channel
            .queue_declare(self.queue.as_str().into(), durable(), work)
            .await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        // The dead-letter queue's delivery limit is explicit and never reached:
        // without it RabbitMQ 4.x would drop a dead letter after 20 deliveries.
        let mut dead = quorum_args(self.queue_expires_ms);
        dead.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(DEAD_LETTER_DELIVERY_LIMIT),
        );
        channel
            .queue_declare(self.dead_letter_queue.as_str().into(), durable(), dead)
            .await?;
        channel
            .queue_bind(
                self.dead_letter_queue.as_str().into(),
                self.dead_letter_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        for (name, delay) in &self.retry_queues {
            let mut args = quorum_args(self.queue_expires_ms);
            // Per-queue TTL (not per message): each queue holds one delay, so a long
            // delay never blocks a shorter one at the head.
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(*delay as i64),
            );
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
            channel
                .queue_declare(ShortString::from(name.as_str()), durable(), args)
                .await?;
        }
        Ok(())
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
