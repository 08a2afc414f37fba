//! `dlq replay` and `dlq purge`: the only ways a dead letter leaves the queue.
//!
//! Guarantee: a replay removes a dead letter only after the broker confirmed its
//! republished copy, so a crash mid-replay duplicates but never loses; a purge
//! removes only what it names. Both act on the letters they select as they read
//! them — one body in hand at a time — and give every other letter back unchanged
//! (see [`super::queue`]). A refusal (an id named that is not there) changes nothing.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;

use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::queue::{DEFAULT_LOCK_WAIT, DeadQueue, Taken};
use super::{DeadLetter, DlqError, Selection};
use crate::broker::headers::{REPLAYED, REPLAYED_BY};
use crate::broker::{self, PublishError};
use crate::config::Settings;
use crate::progress::Progress;

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// What to replay.
    pub selection: Selection,
    /// List only.
    pub dry_run: bool,
    /// At most this many replays per second.
    pub rate: Option<u32>,
    /// How long to wait for another dlq command to finish.
    pub lock_wait: Duration,
    /// Who replays, when it is an operator of the ops console: the session label,
    /// sent as header `x-replayed-by` so the worker's audit rows name them.
    pub by: Option<String>,
    /// With [`Selection::Ids`]: replay the named ids still in the queue and list
    /// the others in [`ReplayReport::not_found`], instead of refusing the whole
    /// replay (the console's bulk replay of the ids its confirm step showed).
    pub skip_missing: bool,
}

impl ReplayOptions {
    /// Replay `selection` now, no rate limit.
    pub fn new(selection: Selection) -> Self {
        Self {
            selection,
            dry_run: false,
            rate: None,
            lock_wait: DEFAULT_LOCK_WAIT,
            by: None,
            skip_missing: false,
        }
    }
}

/// A dead letter that could not be replayed, and why (it is still dead).
#[derive(Debug, Clone, Serialize)]
pub struct ReplayFailure {
    /// The dead letter.
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// Why.
    pub reason: String,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// Whether it was a dry run (nothing changed).
    pub dry_run: bool,
    /// Dead letters selected (head first).
    pub selected: Vec<DeadLetter>,
    /// Republished (confirmed) and removed from the dead-letter queue.
    pub replayed: Vec<DeadLetter>,
    /// Still dead.
    pub failed: Vec<ReplayFailure>,
    /// Ids named (with `skip_missing`) that were no longer in the queue.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_found: Vec<String>,
}

impl ReplayReport {
    /// `replayed N, failed M` (or the dry-run equivalent).
    pub fn summary(&self) -> String {
        if self.dry_run {
            format!(
                "would replay {} (dry run; nothing changed)",
                self.selected.len()
            )
        } else {
            format!(
                "replayed {}, failed {}",
                self.replayed.len(),
                self.failed.len()
            )
        }
    }
}

/// A selection ready to test letters with, and the ids it names (each once, in
/// the order given).
struct Selector<'a> {
    selection: &'a Selection,
    named: Vec<&'a str>,
    ids: HashSet<&'a str>,
}

impl<'a> Selector<'a> {
    fn new(selection: &'a Selection) -> Self {
        let mut named = Vec::new();
        let mut ids = HashSet::new();
        if let Selection::Ids(given) = selection {
            for id in given {
                if ids.insert(id.as_str()) {
                    named.push(id.as_str());
                }
            }
        }
        Self {
            selection,
            named,
            ids,
        }
    }

    fn matches(&self, letter: &DeadLetter) -> bool {
        match self.selection {
            Selection::Ids(_) => letter.id.as_deref().is_some_and(|id| self.ids.contains(id)),
            other => other.matches(letter),
        }
    }

    /// The named ids not in `found`.
    fn missing(&self, found: &HashSet<String>) -> Vec<String> {
        self.named
            .iter()
            .filter(|id| !found.contains(**id))
            .map(|id| (*id).to_owned())
            .collect()
    }
}

/// Notes the id of a selected letter.
fn note(found: &mut HashSet<String>, letter: &DeadLetter) {
    if let Some(id) = &letter.id {
        found.insert(id.clone());
    }
}

/// Replays the selected dead letters: republish with confirm, then (when the
/// session closes) remove the dead copy.
pub async fn replay(
    settings: &Settings,
    opts: &ReplayOptions,
    progress: &dyn Progress,
) -> Result<ReplayReport, DlqError> {
    let mut session = DeadQueue::open(settings, opts.lock_wait).await?;
    let outcome = replay_in(&mut session, settings, opts, progress).await;
    if matches!(outcome, Err(DlqError::NotFound { .. })) {
        session.keep_all();
    }
    // Confirmed copies are removed even after a later error: keeping them would
    // leave them dead as well as replayed.
    let closed = session.close().await;
    let report = outcome?;
    closed?;
    Ok(report)
}

async fn replay_in(
    session: &mut DeadQueue,
    settings: &Settings,
    opts: &ReplayOptions,
    progress: &dyn Progress,
) -> Result<ReplayReport, DlqError> {
    let selector = Selector::new(&opts.selection);
    // A refusal changes nothing: with several ids named, make sure they are all
    // there before replaying any (one id missing is simply nothing to replay).
    if !opts.skip_missing && selector.named.len() > 1 {
        let mut found = HashSet::new();
        while let Some(taken) = session.next().await? {
            if selector.matches(&taken.letter) {
                note(&mut found, &taken.letter);
            }
        }
        let missing = selector.missing(&found);
        if !missing.is_empty() {
            return Err(DlqError::NotFound { ids: missing });
        }
        session.rewind().await?;
    }

    let mut report = ReplayReport {
        dry_run: opts.dry_run,
        selected: Vec::new(),
        replayed: Vec::new(),
        failed: Vec::new(),
        not_found: Vec::new(),
    };
    progress.phase("dead letters read", Some(session.total() as u64));
    let confirm_timeout = Duration::from_millis(settings.broker.publish_timeout_ms);
    let spacing = opts
        .rate
        .map(|n| Duration::from_secs_f64(1.0 / f64::from(n)));
    let started = tokio::time::Instant::now();
    let mut attempts: u32 = 0;
    let mut broken: Option<String> = None;
    let mut found = HashSet::new();
    while let Some(taken) = session.next().await? {
        progress.advance(1);
        if !selector.matches(&taken.letter) {
            continue;
        }
        note(&mut found, &taken.letter);
        report.selected.push(taken.letter.clone());
        if opts.dry_run {
            continue;
        }
        let letter = taken.letter.clone();
        if let Some(reason) = &broken {
            report.failed.push(ReplayFailure {
                letter,
                reason: format!("not attempted: {reason}"),
            });
            continue;
        }
        if let Some(spacing) = spacing {
            tokio::time::sleep_until(started + spacing * attempts).await;
        }
        attempts += 1;
        let result = republish(
            session,
            &taken,
            &settings.broker.exchange,
            confirm_timeout,
            opts.by.as_deref(),
        )
        .await;
        match result {
            Ok(()) => {
                // Only now that the copy is confirmed may the dead copy go.
                session.remove(&taken);
                tracing::debug!(
                    svix.id = letter.id.as_deref().unwrap_or("-"),
                    event.type = letter.kind.as_deref(),
                    workspace.id = letter.workspace_id.as_deref(),
                    "dead letter replayed"
                );
                report.replayed.push(letter);
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::debug!(
                    svix.id = letter.id.as_deref().unwrap_or("-"),
                    event.type = letter.kind.as_deref(),
                    workspace.id = letter.workspace_id.as_deref(),
                    error = %reason,
                    "dead letter not replayed; it stays dead"
                );
                if session.publishing_broken() {
                    broken = Some(reason.clone());
                }
                report.failed.push(ReplayFailure { letter, reason });
            }
        }
        progress.note(format!("replayed {}", report.replayed.len()));
    }
    let missing = selector.missing(&found);
    if !missing.is_empty() {
        if !opts.skip_missing && report.selected.is_empty() {
            return Err(DlqError::NotFound { ids: missing });
        }
        report.not_found = missing;
    }
    Ok(report)
}

/// What a purge removed.
#[derive(Debug, Clone, Serialize)]
pub struct PurgeReport {
    /// Number removed.
    pub count: usize,
    /// The removed dead letters.
    pub removed: Vec<DeadLetter>,
}

/// Removes the selected dead letters for good (`Ids` or `All`); with an id named
/// that is not there, removes nothing.
pub async fn purge(settings: &Settings, selection: &Selection) -> Result<PurgeReport, DlqError> {
    let mut session = DeadQueue::open(settings, DEFAULT_LOCK_WAIT).await?;
    let selector = Selector::new(selection);
    let outcome = async {
        let mut removed = Vec::new();
        let mut found = HashSet::new();
        while let Some(taken) = session.next().await? {
            if selector.matches(&taken.letter) {
                // Removed only when the session closes: a refusal still can undo it.
                session.remove(&taken);
                note(&mut found, &taken.letter);
                removed.push(taken.letter);
            }
        }
        let missing = selector.missing(&found);
        if missing.is_empty() {
            Ok(removed)
        } else {
            Err(DlqError::NotFound { ids: missing })
        }
    }
    .await;
    if outcome.is_err() {
        session.keep_all();
    }
    let closed = session.close().await;
    let removed = outcome?;
    closed?;
    Ok(PurgeReport {
        count: removed.len(),
        removed,
    })
}

/// Publishes a copy of a letter to `exchange` (routing key = its type, same
/// body, `message_id`, `type` and intake timestamp, header `x-replayed`) and
/// waits for the broker's confirm. Does not remove the dead copy.
pub async fn republish(
    session: &mut DeadQueue,
    taken: &Taken,
    exchange: &str,
    confirm_timeout: Duration,
    by: Option<&str>,
) -> Result<(), ReplayError> {
    let id = taken.letter.id.clone().ok_or(ReplayError::NoMessageId)?;
    let kind = taken.letter.kind.clone().ok_or(ReplayError::NoType)?;
    let original = &taken.delivery.properties;
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

    let channel = session
        .confirm_channel()
        .await
        .map_err(|e| ReplayError::Broker(e.to_string()))?;
    broker::publish_confirmed(
        channel,
        exchange,
        &kind,
        &taken.delivery.data,
        props,
        confirm_timeout,
    )
    .await
    .map_err(|e| match e {
        PublishError::Returned(returned) => ReplayError::Unroutable(format!(
            "{} (no queue bound to {exchange} for {kind})",
            returned.reply_text
        )),
        PublishError::Nacked => ReplayError::Nacked,
        PublishError::Timeout(limit) => ReplayError::Timeout(limit),
        PublishError::Disconnected(e) => ReplayError::Broker(e),
        PublishError::Unavailable | PublishError::Blocked => ReplayError::Broker(e.to_string()),
    })
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
