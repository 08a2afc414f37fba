//! A session on the dead-letter queue: takes every dead letter without consuming it,
//! lets the caller settle some of them, and puts the rest back in their order —
//! without counting a delivery.
//!
//! Guarantee: a dead letter leaves the queue only through [`DeadQueue::ack`] (after
//! its replacement, if any, was confirmed), or when its exact copy was confirmed in
//! the queue; everything else, including dead letters that arrive during the
//! session, is back in the queue in its original order when the session ends — even
//! when the process dies, since the broker returns unacked messages of a closed
//! connection.
//!
//! Why a session puts back copies instead of returning what it took: a quorum queue
//! counts every return as a delivery (`x-delivery-count`) — `basic.nack`/`reject`
//! with requeue and a closed channel alike on 3.10; 4.x still counts `reject` and a
//! lost channel — and RabbitMQ 4.x drops a message once the count passes the
//! queue's delivery limit (20 unless set). Returning held messages would make each
//! `dlq list` or `show` use up one delivery of every dead letter. So a session ends
//! by publishing, on a confirm channel through the default exchange straight to the
//! dead-letter queue, a copy of each unsettled message in order — same body, same
//! properties, every header except the broker's own `x-delivery-count` (the copy
//! has never been delivered) — and acks each original only after its copy was
//! confirmed. Nothing is lost: an original goes only once its copy is in the queue.
//! A process that dies between a confirm and the ack leaves both (the original
//! comes back as the broker returns a dead connection's messages): a second
//! message with the same svix id, which `dlq list` shows twice and `dlq show`
//! counts in `copies`; never a silent loss. What a copy does not keep: the
//! delivery's exchange and routing key (now the default exchange and the queue's
//! name; the event type stays in the `type` property) and the `redelivered` flag.
//!
//! How order is kept (measured on RabbitMQ 3.10 quorum queues without a delivery
//! limit):
//! - `basic.nack(requeue)` and `basic.reject(requeue)` put a message at the BACK,
//!   and a batch of them (`multiple`, or several in a row) comes back partly
//!   reversed; `basic.get` followed by closing the channel returns in hash order.
//! - A *consumer* with an unlimited prefetch holds the whole queue, and messages
//!   arriving meanwhile are delivered to it too. Cancelling it, then copying what
//!   it held in delivery order, puts the queue back as it was, arrivals last. (A
//!   consumer's unacked messages also come back in delivery order, ahead of the
//!   ready ones, when its channel closes: the order survives a crash too.)
//!
//! So a session consumes with prefetch 0 (unlimited), never nacks, and ends by
//! cancelling its consumer and putting back copies. Sessions of different `dlq`
//! processes must not interleave (two consumers would split the queue and put their
//! shares back one after the other), so each session first takes a lock: the
//! exclusive consumer of a small classic queue `<dead queue>.lock`, which the broker
//! itself frees when the holder's connection ends, crash included. (A waiting
//! session sees the holder in the queue's consumer count, so waiting raises no
//! channel errors.)

use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer, ErrorKind};
use tokio::time::Instant;

use super::DlqError;
use super::letter::DeadLetter;
use crate::broker::headers::{DELIVERY_COUNT, REPLAYED, REPLAYED_BY};
use crate::broker::{self, PublishError};
use crate::config::Settings;

/// How long a session waits for another `dlq` command to release the queue.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(120);

/// A gap in deliveries this long, before the whole queue arrived, means the
/// missing messages are held by someone else (e.g. a management UI "get").
const QUIET: Duration = Duration::from_secs(2);

/// One dead letter held by the session.
#[derive(Debug)]
pub struct Held {
    /// Its summary.
    pub letter: DeadLetter,
    /// The message itself.
    pub delivery: Delivery,
    /// Acked (gone from the queue).
    pub settled: bool,
}

/// An open session; see the module docs.
#[derive(Debug)]
pub struct DeadQueue {
    connection: Connection,
    /// The lock: its channel and exclusive consumer (dropping either frees it).
    lock: Option<(Channel, Consumer)>,
    channel: Option<Channel>,
    consumer: Option<Consumer>,
    confirm: Option<Channel>,
    queue: String,
    redacted_url: String,
    /// How long to wait for the confirm of each copy put back.
    confirm_timeout: Duration,
    /// The dead letters present when the session started, head first.
    pub held: Vec<Held>,
}

/// What closing a session found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Closed {
    /// Dead letters that arrived during the session (kept, behind the others).
    pub arrived: usize,
}

fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

impl DeadQueue {
    /// Connects, takes the lock (waiting up to `lock_wait`) and takes every dead
    /// letter present now, without removing any.
    pub async fn open(settings: &Settings, lock_wait: Duration) -> Result<Self, DlqError> {
        let url = &settings.broker.url;
        let redacted_url = url.redacted();
        let connection = crate::broker::connect(url, "provisioner-dlq")
            .await
            .map_err(|e| {
                // Belt and braces: a lapin error has no reason to echo the URL, but
                // the password must never reach a terminal.
                DlqError::Unreachable {
                    url: redacted_url.clone(),
                    reason: url.scrub(&e.to_string()),
                }
            })?;
        let mut session = DeadQueue {
            connection,
            lock: None,
            channel: None,
            consumer: None,
            confirm: None,
            queue: settings.broker.dead_letter_queue.clone(),
            redacted_url,
            confirm_timeout: Duration::from_millis(settings.broker.publish_timeout_ms),
            held: Vec::new(),
        };
        match session.start(lock_wait).await {
            Ok(()) => Ok(session),
            Err(e) => {
                // Whatever was taken goes back with the channel.
                session.shutdown().await;
                Err(e)
            }
        }
    }

    fn broker(&self, e: lapin::Error) -> DlqError {
        DlqError::Broker(format!("{e} (broker {})", self.redacted_url))
    }

    async fn lock(&self, lock_wait: Duration) -> Result<(Channel, Consumer), DlqError> {
        let name = format!("{}.lock", self.queue);
        let deadline = Instant::now() + lock_wait;
        let mut warned = false;
        let mut channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| self.broker(e))?;
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
                Err(e) => return Err(self.broker(e)),
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
                        channel = self
                            .connection
                            .create_channel()
                            .await
                            .map_err(|e| self.broker(e))?;
                    }
                    Err(e) => return Err(self.broker(e)),
                }
            }
            if Instant::now() >= deadline {
                return Err(DlqError::Busy {
                    queue: self.queue.clone(),
                    waited: lock_wait,
                });
            }
            if !warned {
                tracing::warn!(queue = %self.queue, "another dlq command is using the dead-letter queue; waiting for it");
                warned = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn start(&mut self, lock_wait: Duration) -> Result<(), DlqError> {
        self.lock = Some(self.lock(lock_wait).await?);
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| self.broker(e))?;
        self.channel = Some(channel.clone());
        let count = self.ready_count(&channel).await?;
        if count > 0 {
            // Unlimited prefetch: the session must hold the whole queue to see it
            // without requeueing anything (see the module docs).
            channel
                .basic_qos(0, BasicQosOptions::default())
                .await
                .map_err(|e| self.broker(e))?;
            let mut consumer = channel
                .basic_consume(
                    self.queue.as_str().into(),
                    format!("provisioner-dlq-{}", std::process::id()).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| self.broker(e))?;
            while self.held.len() < count as usize {
                match tokio::time::timeout(QUIET, consumer.next()).await {
                    Ok(Some(Ok(delivery))) => {
                        let letter = DeadLetter::from_message(
                            self.held.len() + 1,
                            &delivery.properties,
                            &delivery.data,
                        );
                        self.held.push(Held {
                            letter,
                            delivery,
                            settled: false,
                        });
                    }
                    Ok(Some(Err(e))) => return Err(self.broker(e)),
                    Ok(None) => {
                        return Err(DlqError::Broker(
                            "the broker cancelled the dead-letter consumer".to_owned(),
                        ));
                    }
                    Err(_) => {
                        tracing::warn!(
                            queue = %self.queue,
                            expected = count,
                            got = self.held.len(),
                            "some dead letters are held by another consumer; they are not included"
                        );
                        break;
                    }
                }
            }
            self.consumer = Some(consumer);
        }
        Ok(())
    }

    async fn ready_count(&self, channel: &Channel) -> Result<u32, DlqError> {
        match crate::broker::inspect(channel, self.queue.as_str()).await {
            Ok(q) => Ok(q.message_count()),
            Err(e) if reply_code(&e) == Some(404) => Err(DlqError::QueueMissing {
                queue: self.queue.clone(),
            }),
            Err(e) => Err(self.broker(e)),
        }
    }

    /// Removes a held dead letter from the queue for good, when the session closes
    /// (with everything else it settles, in one acknowledgement: see
    /// [`close`](Self::close)). Call it only once its replacement, if any, is
    /// confirmed; a process that dies before closing leaves it in place.
    pub async fn ack(&mut self, index: usize) -> Result<(), DlqError> {
        self.held[index].settled = true;
        Ok(())
    }

    /// Publishes a copy of a held dead letter to `exchange` (routing key = its type,
    /// same body, `message_id`, `type` and intake timestamp, header `x-replayed`) and
    /// waits for the broker's confirm. Does not ack the dead copy.
    pub async fn republish(
        &mut self,
        index: usize,
        exchange: &str,
        confirm_timeout: Duration,
        by: Option<&str>,
    ) -> Result<(), ReplayError> {
        let held = &self.held[index];
        let id = held.letter.id.clone().ok_or(ReplayError::NoMessageId)?;
        let kind = held.letter.kind.clone().ok_or(ReplayError::NoType)?;
        let original = &held.delivery.properties;
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from(REPLAYED), AMQPValue::Boolean(true));
        if let Some(by) = by {
            headers.insert(
                ShortString::from(REPLAYED_BY),
                AMQPValue::LongString(by.into()),
            );
        }
        // Persistent JSON like every event of this service, keeping the original
        // content type if it had one.
        let mut props = broker::event_properties(&id, &kind)
            .with_content_type(
                original
                    .content_type()
                    .clone()
                    .unwrap_or_else(|| broker::CONTENT_TYPE.into()),
            )
            .with_headers(headers);
        // Keep the intake time: the processing log's `received_at` comes from it.
        if let Some(ts) = original.timestamp() {
            props = props.with_timestamp(*ts);
        }
        let body = held.delivery.data.clone();

        if self.confirm.is_none() {
            let ch = broker::confirm_channel(&self.connection)
                .await
                .map_err(|e| ReplayError::Broker(e.to_string()))?;
            self.confirm = Some(ch);
        }
        let Some(channel) = self.confirm.as_ref() else {
            return Err(ReplayError::Broker("no confirm channel".to_owned()));
        };
        broker::publish_confirmed(channel, exchange, &kind, &body, props, confirm_timeout)
            .await
            .map_err(|e| match e {
                PublishError::Returned(returned) => ReplayError::Unroutable(format!(
                    "{} (no queue bound to {exchange} for {kind})",
                    returned.reply_text
                )),
                PublishError::Nacked => ReplayError::Nacked,
                PublishError::Timeout(limit) => ReplayError::Timeout(limit),
                PublishError::Disconnected(e) => ReplayError::Broker(e),
                PublishError::Unavailable | PublishError::Blocked => {
                    ReplayError::Broker(e.to_string())
                }
            })
    }

    /// Whether the confirm channel broke (e.g. the exchange does not exist); later
    /// publishes on this session would fail the same way.
    pub fn publishing_broken(&self) -> bool {
        self.confirm
            .as_ref()
            .map(|c| !c.status().connected())
            .unwrap_or(false)
            || !self.connection.status().connected()
    }

    /// Puts back every unsettled dead letter in its order (see the module docs:
    /// confirmed copies, then the originals acked), arrivals behind them, and waits
    /// until the queue shows them, then releases the lock.
    pub async fn close(mut self) -> Result<Closed, DlqError> {
        let result = self.put_back().await;
        self.shutdown().await;
        result
    }

    async fn put_back(&mut self) -> Result<Closed, DlqError> {
        let mut closed = Closed::default();
        let Some(channel) = self.channel.clone() else {
            return Ok(closed);
        };
        // Stop deliveries first, then take what was delivered before the cancel: the
        // dead letters that arrived during the session (they go behind the others).
        // lapin ends the stream after the deliveries it already received.
        let mut arrived: Vec<Delivery> = Vec::new();
        if let Some(mut consumer) = self.consumer.take() {
            channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
                .map_err(|e| self.broker(e))?;
            while let Ok(Some(next)) = tokio::time::timeout(QUIET, consumer.next()).await {
                arrived.push(next.map_err(|e| self.broker(e))?);
            }
        }
        closed.arrived = arrived.len();
        let pending: Vec<&Delivery> = self
            .held
            .iter()
            .filter(|h| !h.settled)
            .map(|h| &h.delivery)
            .chain(arrived.iter())
            .collect();
        if pending.is_empty() {
            // Only settled ones (a purge or replay of everything).
            self.settle(&arrived, &[]).await?;
            return Ok(closed);
        }

        // A channel of its own: a replay may have broken `self.confirm`.
        let confirm = broker::confirm_channel(&self.connection)
            .await
            .map_err(|e| self.broker(e))?;
        let mut copied = 0;
        let mut failure = None;
        for delivery in &pending {
            match broker::publish_confirmed(
                &confirm,
                "",
                &self.queue,
                &delivery.data,
                copy_properties(&delivery.properties),
                self.confirm_timeout,
            )
            .await
            {
                Ok(()) => copied += 1,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        close_channel(confirm).await;
        // Only now that its copy is confirmed may an original go.
        let kept: Vec<&Delivery> = pending[copied..].to_vec();
        self.settle(&arrived, &kept).await?;
        if let Some(e) = failure {
            // The originals not copied come back when the channel closes (counting
            // one delivery each), ahead of the copies: nothing lost or doubled.
            return Err(DlqError::Broker(format!(
                "could not put dead letter {} of {} back ({e}); it and the {} after it \
                 are returned to the queue as they were, ahead of those put back",
                copied + 1,
                pending.len(),
                pending.len() - copied - 1,
            )));
        }
        // Acks and confirms are asynchronous to the queue's count; keep the lock
        // until the queue shows them all, so the next session sees the whole queue.
        self.channel = None;
        close_channel(channel).await;
        self.wait_until_ready(pending.len() as u32).await?;
        Ok(closed)
    }

    /// Acknowledges every delivery of the session but `kept`: the ones settled by
    /// [`ack`](Self::ack) and those whose copy is confirmed.
    ///
    /// In as few acknowledgements as possible, ideally one (`multiple` up to the last
    /// delivery): RabbitMQ 3.10's channel holds back a quorum queue's settlements
    /// beyond a few dozen in flight, and closing the channel drops those held back,
    /// so a burst of single acks followed by the close gave some messages back
    /// (measured: the last 10 of 80). One acknowledgement is sent at once, and the
    /// queue applies it before it sees the channel close.
    async fn settle(&self, arrived: &[Delivery], kept: &[&Delivery]) -> Result<(), DlqError> {
        let all: Vec<&Delivery> = self
            .held
            .iter()
            .map(|h| &h.delivery)
            .chain(arrived.iter())
            .collect();
        let keep = |d: &Delivery| kept.iter().any(|k| k.delivery_tag == d.delivery_tag);
        // Deliveries come in tag order: everything before the first kept one goes in
        // one `multiple` ack, the rest one by one (only after a failed copy).
        let first_kept = all.iter().position(|d| keep(d)).unwrap_or(all.len());
        let ack = |d: &Delivery, multiple: bool| {
            let acker = d.acker.clone();
            async move {
                acker
                    .ack(BasicAckOptions { multiple })
                    .await
                    .map_err(|e| DlqError::Broker(e.to_string()))
            }
        };
        if first_kept > 0 {
            ack(all[first_kept - 1], true).await?;
        }
        for d in all.iter().skip(first_kept).filter(|d| !keep(d)) {
            ack(d, false).await?;
        }
        Ok(())
    }

    async fn wait_until_ready(&self, count: u32) -> Result<(), DlqError> {
        let ch = self
            .connection
            .create_channel()
            .await
            .map_err(|e| self.broker(e))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut result = Ok(());
        loop {
            match self.ready_count(&ch).await {
                Ok(n) if n >= count || Instant::now() >= deadline => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        close_channel(ch).await;
        result
    }

    /// Closes every channel explicitly (lapin would otherwise close dropped
    /// channels behind our back, racing the connection close), lock last.
    async fn shutdown(&mut self) {
        self.consumer = None;
        for ch in [self.channel.take(), self.confirm.take()]
            .into_iter()
            .flatten()
        {
            close_channel(ch).await;
        }
        if let Some((ch, consumer)) = self.lock.take() {
            drop(consumer);
            close_channel(ch).await;
        }
        let _ = self.connection.close(200, "dlq done".into()).await;
    }
}

/// The properties of the copy that replaces a dead letter: all of them, every header
/// but the broker's delivery count (the copy has never been delivered; the broker
/// adds the header again when it counts one).
fn copy_properties(original: &BasicProperties) -> BasicProperties {
    let Some(headers) = original.headers() else {
        return original.clone();
    };
    let mut kept = FieldTable::default();
    for (key, value) in headers.inner() {
        if key.as_str() != DELIVERY_COUNT {
            kept.insert(key.clone(), value.clone());
        }
    }
    original.clone().with_headers(kept)
}

async fn close_channel(channel: Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "dlq done".into()).await;
    }
}

/// Why one dead letter could not be replayed (it stays dead).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No `message_id`: the worker could not deduplicate it.
    #[error("it has no message_id (svix id)")]
    NoMessageId,
    /// No `type` property and no `type` in the body: no routing key.
    #[error("it has no event type (no `type` property, no `type` in the body)")]
    NoType,
    /// The copy was not routed to any queue.
    #[error("the copy was returned unroutable: {0}")]
    Unroutable(String),
    /// The broker refused the copy.
    #[error("the broker refused the copy (nack)")]
    Nacked,
    /// No confirm in time; the copy may or may not be queued (the dead copy stays).
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
    /// The connection or channel failed.
    #[error("broker error: {0}")]
    Broker(String),
}
