//! A session on the dead-letter queue: reads the dead letters one at a time,
//! head first, lets the caller remove some of them, and gives every other one
//! back unchanged.
//!
//! Guarantees:
//! - Never a duplicate, never a loss. A session publishes nothing into the
//!   dead-letter queue: a dead letter it read stays the same message (same body,
//!   properties, headers, `x-death`, exchange and routing key), unacknowledged, until
//!   the session gives it back (`basic.nack` with requeue) or removes it (`basic.ack`,
//!   only through [`DeadQueue::remove`], after a replay's copy was confirmed). A
//!   session that ends any other way — a dropped future, a killed process, a lost
//!   connection — leaves its messages unacknowledged, and the broker returns them.
//!   The only change a session makes to a letter it gives back is the broker's own
//!   delivery count (`x-delivery-count`, +1 per session that read it), which the
//!   dead-letter queue's limit of 2^31 − 1 (`broker::DEAD_LETTER_DELIVERY_LIMIT`)
//!   never reaches.
//! - Bounded memory whatever the queue's size: at most [`WINDOW`] deliveries are
//!   on their way to the session at once, and the caller decides which bodies to
//!   keep (views keep summaries only); what the session itself keeps per letter read
//!   is a delivery tag.
//! - Each dead letter present when the session began is read at most once, and
//!   letters that arrive meanwhile are not chased: a session reads at most the
//!   number of ready messages a passive declare counted at its start.
//!
//! How: the session gives nothing back until it has read what it reads (a
//! requeued message goes ahead of those never delivered, not to the back), reads
//! through a chain of consumers with a prefetch of [`WINDOW`] each, gives back one
//! by one in delivery order with at most [`RETURN_CHUNK`] in flight, and removes
//! with one `basic.ack` with `multiple` after everything else was given back.
//! Why each step, and the broker's behaviour each rests on (measured on RabbitMQ
//! 3.10.8), is in `docs/dead-letters.md`, "How a view reads the queue without
//! changing it". Nothing here depends on where a returned message goes: a broker
//! that returns requeued messages to the back leaves the queue rotated by the
//! letters a session read, never duplicated or dropped.
//!
//! Sessions must not interleave (two would split the queue between them and read
//! only part of it each), so each session first takes the queue's lock (`lock.rs`).

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::time::Instant;

use super::DlqError;
use super::letter::DeadLetter;
use super::lock::{self, LockError, reply_code};
use crate::broker;
use crate::broker::headers::DELIVERY_COUNT;
use crate::config::Settings;

/// How long a session waits for another `dlq` command to release the queue.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Prefetch of each consumer of a session: the most deliveries (and so bodies) on
/// their way to the session at once.
pub const WINDOW: u16 = 16;

/// Messages given back before waiting for the queue to show them (below the ~32
/// outstanding settlements past which the broker's client batches and reorders).
pub const RETURN_CHUNK: usize = 16;

/// A gap in deliveries this long, before every letter counted at the start was
/// read, means the missing ones are held by someone else (e.g. a management UI
/// "get").
const QUIET: Duration = Duration::from_secs(2);

/// How long to wait for the queue to show a chunk of returned messages before
/// going on regardless (the order may then suffer; nothing else does).
const RETURN_WAIT: Duration = Duration::from_secs(10);

/// One dead letter read by a session: its summary and the message itself. Drop it
/// to drop the body; the session keeps only its delivery tag.
#[derive(Debug)]
pub struct Taken {
    /// Its summary (`position` = 1-based place in the queue at the session's start).
    pub letter: DeadLetter,
    /// The message.
    pub delivery: Delivery,
}

/// An open session; see the module docs.
#[derive(Debug)]
pub struct DeadQueue {
    connection: Connection,
    /// The lock: its channel and exclusive consumer (dropping either frees it).
    lock: Option<(Channel, Consumer)>,
    /// Consumers, returns and removals.
    channel: Option<Channel>,
    /// Passive declares (a failed one closes its channel, so not `channel`).
    inspect: Option<Channel>,
    /// Replays' publishes.
    confirm: Option<Channel>,
    consumer: Option<Consumer>,
    queue: String,
    redacted_url: String,
    /// Ready messages when the session began: the most it reads.
    total: usize,
    /// The most the caller wants read (at most `total`).
    wanted: usize,
    /// Letters handed to the caller so far.
    read: usize,
    /// Whether the last letter read had been given back before.
    given_back_before: bool,
    /// Deliveries of the current consumer, and its prefetch.
    in_window: u16,
    window: u16,
    /// The channel's prefetch for new consumers.
    prefetch: u16,
    /// Consumers started (for unique tags).
    consumers: u32,
    /// Deliveries received but not handed out yet (only after a cancel).
    pending: VecDeque<Delivery>,
    /// Every delivery tag of the session, in delivery order.
    tags: Vec<u64>,
    /// Tags to remove (acknowledge) when the session closes.
    removed: BTreeSet<u64>,
    /// Deliveries received beyond what was handed out (read by nobody).
    unread: usize,
    /// The rest is held by someone else: stop reading.
    exhausted: bool,
}

/// What closing a session found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Closed {
    /// Dead letters that arrived during the session (kept, behind the others).
    pub arrived: usize,
}

impl DeadQueue {
    /// Connects, takes the lock (waiting up to `lock_wait`) and counts the dead
    /// letters present now; reads none yet.
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
            inspect: None,
            confirm: None,
            consumer: None,
            queue: settings.broker.dead_letter_queue.clone(),
            redacted_url,
            total: 0,
            wanted: 0,
            read: 0,
            given_back_before: false,
            in_window: 0,
            window: 0,
            prefetch: 0,
            consumers: 0,
            pending: VecDeque::new(),
            tags: Vec::new(),
            removed: BTreeSet::new(),
            unread: 0,
            exhausted: false,
        };
        match session.start(lock_wait).await {
            Ok(()) => Ok(session),
            Err(e) => {
                session.shutdown().await;
                Err(e)
            }
        }
    }

    fn broker(&self, e: lapin::Error) -> DlqError {
        DlqError::Broker(format!("{e} (broker {})", self.redacted_url))
    }

    async fn start(&mut self, lock_wait: Duration) -> Result<(), DlqError> {
        let lock = lock::take(&self.connection, &self.queue, lock_wait)
            .await
            .map_err(|e| match e {
                LockError::Broker(e) => self.broker(e),
                LockError::Busy => DlqError::Busy {
                    queue: self.queue.clone(),
                    waited: lock_wait,
                },
            })?;
        self.lock = Some(lock);
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(|e| self.broker(e))?;
        self.channel = Some(channel);
        self.total = self.ready_count().await? as usize;
        self.wanted = self.total;
        Ok(())
    }

    /// Reads `n` letters (a page needs no more), and past them only as far as the
    /// queue's order needs: while the letters read are ones given back before
    /// (`x-delivery-count` > 0), up to and including the first never delivered.
    /// RabbitMQ 3.10 puts a letter given back behind the letters given back before
    /// it (ahead of those never delivered), so a session that stopped among them
    /// would leave the queue rotated. Of the letters after that, at most the rest of
    /// the last consumer's window (15) is sent, and given back in order too.
    pub fn read_at_most(&mut self, n: usize) {
        self.wanted = n.min(self.total);
    }

    /// How far reading may go now (see [`read_at_most`](Self::read_at_most)).
    fn reach(&self) -> usize {
        if self.read >= self.wanted && self.given_back_before {
            self.total
        } else {
            self.wanted
        }
    }

    /// Ready messages in the queue now (passive declare).
    async fn ready_count(&mut self) -> Result<u32, DlqError> {
        if self
            .inspect
            .as_ref()
            .is_none_or(|c| !c.status().connected())
        {
            let ch = self
                .connection
                .create_channel()
                .await
                .map_err(|e| self.broker(e))?;
            self.inspect = Some(ch);
        }
        let Some(ch) = self.inspect.as_ref() else {
            return Err(DlqError::Broker("no channel".to_owned()));
        };
        match crate::broker::inspect(ch, self.queue.as_str()).await {
            Ok(q) => Ok(q.message_count()),
            Err(e) if reply_code(&e) == Some(404) => Err(DlqError::QueueMissing {
                queue: self.queue.clone(),
            }),
            Err(e) => Err(self.broker(e)),
        }
    }

    /// Dead letters in the queue when the session began (the most it reads).
    pub fn total(&self) -> usize {
        self.total
    }

    /// Dead letters read so far.
    pub fn read(&self) -> usize {
        self.read
    }

    fn read_channel(&self) -> Result<Channel, DlqError> {
        self.channel
            .clone()
            .ok_or_else(|| DlqError::Broker("the session is closed".to_owned()))
    }

    /// The next dead letter, head first; `None` once every letter counted at the
    /// start was read (or the rest is held by another consumer). The letter stays
    /// in the queue unless [`remove`](Self::remove)d.
    pub async fn next(&mut self) -> Result<Option<Taken>, DlqError> {
        if self.read >= self.reach() || self.exhausted {
            return Ok(None);
        }
        let delivery = match self.pending.pop_front() {
            Some(d) => {
                self.unread -= 1;
                d
            }
            None => match self.receive().await? {
                Some(d) => d,
                None => {
                    self.exhausted = true;
                    return Ok(None);
                }
            },
        };
        self.read += 1;
        self.given_back_before = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(DELIVERY_COUNT))
            .and_then(crate::broker::headers::int_value)
            .is_some_and(|n| n > 0);
        let letter = DeadLetter::from_message(self.read, &delivery.properties, &delivery.data);
        Ok(Some(Taken { letter, delivery }))
    }

    /// One delivery from the consumer chain; `None` when none comes for [`QUIET`].
    async fn receive(&mut self) -> Result<Option<Delivery>, DlqError> {
        if self.in_window >= self.window {
            // This consumer was sent its whole window and gets nothing more while
            // those are unacknowledged: the next consumer gets the next window.
            self.stop_consumer().await?;
        }
        if self.consumer.is_none() {
            let channel = self.read_channel()?;
            // Per consumer (never `global`: quorum queues refuse it, killing the
            // connection): a consumer is sent WINDOW, or what is left to read.
            let left = self.reach() - self.read - self.pending.len();
            let window = u16::try_from(left).unwrap_or(WINDOW).clamp(1, WINDOW);
            if window != self.prefetch {
                channel
                    .basic_qos(window, BasicQosOptions::default())
                    .await
                    .map_err(|e| self.broker(e))?;
                self.prefetch = window;
            }
            self.window = window;
            self.consumers += 1;
            let tag = format!("provisioner-dlq-{}-{}", std::process::id(), self.consumers);
            let consumer = channel
                .basic_consume(
                    self.queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| self.broker(e))?;
            self.consumer = Some(consumer);
            self.in_window = 0;
        }
        let Some(consumer) = self.consumer.as_mut() else {
            return Ok(None);
        };
        match tokio::time::timeout(QUIET, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                self.in_window += 1;
                self.tags.push(delivery.delivery_tag);
                Ok(Some(delivery))
            }
            Ok(Some(Err(e))) => Err(self.broker(e)),
            Ok(None) => Err(DlqError::Broker(
                "the broker cancelled the dead-letter consumer".to_owned(),
            )),
            Err(_) => {
                tracing::warn!(
                    queue = %self.queue,
                    expected = self.total,
                    got = self.read,
                    "some dead letters are held by another consumer; they are not included"
                );
                Ok(None)
            }
        }
    }

    /// Cancels the current consumer. What it was sent before the cancel took effect
    /// (lapin ends the stream after those) stays in the session, unread.
    async fn stop_consumer(&mut self) -> Result<(), DlqError> {
        let Some(mut consumer) = self.consumer.take() else {
            return Ok(());
        };
        let channel = self.read_channel()?;
        channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .map_err(|e| self.broker(e))?;
        while let Ok(Some(next)) = tokio::time::timeout(QUIET, consumer.next()).await {
            let delivery = next.map_err(|e| self.broker(e))?;
            self.tags.push(delivery.delivery_tag);
            self.unread += 1;
            // Its body is not needed unless it is read next; keep it only while
            // the session may still hand it out.
            if self.read + self.pending.len() < self.total {
                self.pending.push_back(delivery);
            }
        }
        Ok(())
    }

    /// Removes a letter read by this session from the queue for good when the
    /// session closes. Call it only once its replacement, if any, is confirmed; a
    /// session that does not close normally leaves it in place.
    pub fn remove(&mut self, taken: &Taken) {
        self.removed.insert(taken.delivery.delivery_tag);
    }

    /// Keeps every letter the session was going to remove (nothing is removed).
    pub fn keep_all(&mut self) {
        self.removed.clear();
    }

    /// Gives back everything read so far and starts reading again from the head
    /// (the letters counted anew), keeping the lock. Nothing may be removed yet.
    pub async fn rewind(&mut self) -> Result<(), DlqError> {
        debug_assert!(self.removed.is_empty(), "rewind drops nothing");
        self.stop_consumer().await?;
        self.pending.clear();
        let tags = std::mem::take(&mut self.tags);
        self.give_back(&tags).await?;
        self.total = self.ready_count().await? as usize;
        self.wanted = self.total;
        self.read = 0;
        self.given_back_before = false;
        self.unread = 0;
        self.in_window = 0;
        self.exhausted = false;
        Ok(())
    }

    /// The session's publisher-confirm channel (opened on first use), for replays.
    pub async fn confirm_channel(&mut self) -> Result<&Channel, lapin::Error> {
        let channel = match self.confirm.take() {
            Some(channel) => channel,
            None => broker::confirm_channel(&self.connection).await?,
        };
        Ok(self.confirm.insert(channel))
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

    /// Gives back every letter not removed, in delivery order, waiting until the
    /// queue shows them; then removes the removed ones and releases the lock.
    pub async fn close(mut self) -> Result<Closed, DlqError> {
        let result = self.finish().await;
        self.shutdown().await;
        result.map_err(|e| match e {
            DlqError::Broker(reason) if !self.removed.is_empty() => DlqError::Broker(format!(
                "{reason}; the {} dead letter(s) to be removed (replayed or purged) were not, \
                 and are still in the queue with the others",
                self.removed.len()
            )),
            e => e,
        })
    }

    async fn finish(&mut self) -> Result<Closed, DlqError> {
        if self.channel.is_none() {
            return Ok(Closed::default());
        }
        self.stop_consumer().await?;
        self.pending.clear();
        // Ready now: letters not read plus arrivals not delivered to the session;
        // with those delivered but unread, this tells the arrivals apart.
        let ready = self.ready_count().await? as usize;
        let arrived = (ready + self.unread).saturating_sub(self.total - self.read);
        let back: Vec<u64> = self
            .tags
            .iter()
            .copied()
            .filter(|t| !self.removed.contains(t))
            .collect();
        self.give_back(&back).await?;
        if let Some(&last) = self.removed.last() {
            // Every other delivery of the channel was given back: `multiple` up to
            // the last removed one acknowledges exactly the removed ones, in one
            // settlement the broker applies before it sees the channel close.
            let channel = self.read_channel()?;
            channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| self.broker(e))?;
        }
        Ok(Closed { arrived })
    }

    /// Returns `tags` to the queue in this order (see the module docs).
    async fn give_back(&mut self, tags: &[u64]) -> Result<(), DlqError> {
        if tags.is_empty() {
            return Ok(());
        }
        let channel = self.read_channel()?;
        let base = self.ready_count().await? as usize;
        let mut returned = 0;
        // Waiting keeps the order; once the queue fails to show a chunk in time
        // (someone else is taking letters), later chunks are not waited for.
        let mut patient = true;
        for chunk in tags.chunks(RETURN_CHUNK) {
            for &tag in chunk {
                channel
                    .basic_nack(
                        tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await
                    .map_err(|e| {
                        DlqError::Broker(format!(
                            "{e}: the dead letters not yet given back return to the queue as \
                             the channel closes"
                        ))
                    })?;
            }
            returned += chunk.len();
            let deadline = Instant::now() + RETURN_WAIT;
            while patient {
                let ready = self.ready_count().await? as usize;
                if ready >= base + returned {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        queue = %self.queue,
                        expected = base + returned,
                        ready,
                        "the dead-letter queue does not show the returned letters; going on \
                         without waiting (their order may change, nothing else)"
                    );
                    patient = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(())
    }

    /// Closes every channel explicitly (lapin would otherwise close dropped
    /// channels behind our back, racing the connection close), lock last. Letters
    /// still unacknowledged go back with their channel.
    async fn shutdown(&mut self) {
        self.consumer = None;
        self.pending.clear();
        for ch in [
            self.channel.take(),
            self.inspect.take(),
            self.confirm.take(),
        ]
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

async fn close_channel(channel: Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "dlq done".into()).await;
    }
}
