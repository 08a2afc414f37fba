//! `provisioner dlq`: inspect, replay and purge dead letters (DESIGN §1, §4).
//!
//! Guarantee: nothing here loses a dead letter. `list` and `show` leave the queue
//! exactly as they found it (same messages, same order); `replay` removes a dead
//! copy only after the broker confirmed its republished copy, so a crash mid-replay
//! duplicates (the worker deduplicates by svix id) but never loses; `purge` removes
//! only what it names and only with `--yes`. Dead letters not selected, and those
//! arriving meanwhile, stay in their order. See [`queue`] for how.

pub mod letter;
pub mod queue;

use std::io::IsTerminal;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::Settings;
use crate::ops::{fmt_time, render_table};
pub use letter::DeadLetter;
use letter::{body_to_json, properties_to_json, table_to_json};
pub use queue::{DEFAULT_LOCK_WAIT, DeadQueue, ReplayError};

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (head of the queue first) without removing or reordering any.
    List {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter whole: properties, headers and body.
    Show {
        /// Svix id (the message's `message_id`).
        id: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to the events exchange, then remove the dead copies.
    Replay(ReplayArgs),
    /// Delete dead letters for good (requires --yes).
    Purge(PurgeArgs),
}

/// Arguments of `dlq replay`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("selection").required(true).args(["ids", "all", "kind", "org"])))]
pub struct ReplayArgs {
    /// Replay the dead letters with these svix ids.
    #[arg(long = "id", value_name = "ID", num_args = 1..)]
    pub ids: Vec<String>,
    /// Replay every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Replay the dead letters of this event type.
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// Replay the dead letters about this workspace (organization id).
    #[arg(long, value_name = "ID")]
    pub org: Option<String>,
    /// List what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// At most N replays per second.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: Option<u32>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `dlq purge`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("selection").required(true).args(["ids", "all"])))]
pub struct PurgeArgs {
    /// Delete the dead letters with these svix ids.
    #[arg(long = "id", value_name = "ID", num_args = 1..)]
    pub ids: Vec<String>,
    /// Delete every dead letter.
    #[arg(long)]
    pub all: bool,
    /// Confirm the deletion; without it purge refuses.
    #[arg(long)]
    pub yes: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Errors of the `dlq` commands; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The broker cannot be reached (URL shown without its password).
    #[error("cannot reach RabbitMQ at {url}: {reason}")]
    Unreachable {
        /// Redacted URL.
        url: String,
        /// Cause.
        reason: String,
    },
    /// The dead-letter queue is not declared.
    #[error(
        "dead-letter queue {queue} does not exist (run `provisioner migrate` to declare the broker topology)"
    )]
    QueueMissing {
        /// Queue name.
        queue: String,
    },
    /// Another `dlq` command kept the queue for too long.
    #[error("another dlq command is still working on {queue} after {waited:?}; try again later")]
    Busy {
        /// Queue name.
        queue: String,
        /// How long we waited.
        waited: Duration,
    },
    /// Named dead letters are not in the queue (nothing was changed).
    #[error("no dead letter with id {}; nothing was changed", .ids.join(", "))]
    NotFound {
        /// The missing svix ids.
        ids: Vec<String>,
    },
    /// The broker failed during the command.
    #[error("broker error: {0}")]
    Broker(String),
}

/// Which dead letters a replay or purge takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These svix ids (every copy of each).
    Ids(Vec<String>),
    /// Everything.
    All,
    /// One event type.
    Type(String),
    /// One workspace.
    Org(String),
}

impl Selection {
    /// Whether a dead letter is selected.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        match self {
            Selection::Ids(ids) => letter.id.as_ref().is_some_and(|id| ids.contains(id)),
            Selection::All => true,
            Selection::Type(t) => letter.kind.as_deref() == Some(t.as_str()),
            Selection::Org(o) => letter.workspace_id.as_deref() == Some(o.as_str()),
        }
    }

    fn from_args(ids: Vec<String>, all: bool, kind: Option<String>, org: Option<String>) -> Self {
        if all {
            Selection::All
        } else if let Some(t) = kind {
            Selection::Type(t)
        } else if let Some(o) = org {
            Selection::Org(o)
        } else {
            Selection::Ids(ids)
        }
    }
}

/// Ids named by a selection that no held dead letter carries.
fn missing_ids(selection: &Selection, session: &DeadQueue) -> Vec<String> {
    let Selection::Ids(ids) = selection else {
        return Vec::new();
    };
    let mut missing: Vec<String> = ids
        .iter()
        .filter(|id| {
            !session
                .held
                .iter()
                .any(|h| h.letter.id.as_ref() == Some(id))
        })
        .cloned()
        .collect();
    missing.dedup();
    missing
}

/// The dead-letter queue's content, head first.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Queue name.
    pub queue: String,
    /// Number of dead letters listed.
    pub count: usize,
    /// The dead letters, head first.
    pub data: Vec<DeadLetter>,
    /// Dead letters that arrived while listing (kept behind these, not listed).
    pub arrived_during_listing: usize,
}

/// Lists the dead letters without removing or reordering any.
pub async fn list(settings: &Settings) -> Result<Listing, DlqError> {
    let session = DeadQueue::open(settings, DEFAULT_LOCK_WAIT).await?;
    let data: Vec<DeadLetter> = session.held.iter().map(|h| h.letter.clone()).collect();
    let closed = session.close().await?;
    Ok(Listing {
        queue: settings.broker.dead_letter_queue.clone(),
        count: data.len(),
        data,
        arrived_during_listing: closed.arrived,
    })
}

/// One dead letter whole.
#[derive(Debug, Clone, Serialize)]
pub struct DeadMessage {
    /// Its summary.
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// Exchange it was last published to.
    pub exchange: String,
    /// Routing key it was last published with.
    pub routing_key: String,
    /// AMQP properties (`message_id`, `type`, `timestamp`, …).
    pub properties: Value,
    /// Headers (`x-error`, `x-death`, …).
    pub headers: Value,
    /// The body, parsed when it is JSON.
    pub body: Value,
    /// How many dead letters carry this id (the first is shown).
    pub copies: usize,
}

/// Shows one dead letter (the first of its copies) without removing it.
pub async fn show(settings: &Settings, id: &str) -> Result<DeadMessage, DlqError> {
    let session = DeadQueue::open(settings, DEFAULT_LOCK_WAIT).await?;
    let copies: Vec<&queue::Held> = session
        .held
        .iter()
        .filter(|h| h.letter.id.as_deref() == Some(id))
        .collect();
    let found = copies.first().map(|h| DeadMessage {
        letter: h.letter.clone(),
        exchange: h.delivery.exchange.as_str().to_owned(),
        routing_key: h.delivery.routing_key.as_str().to_owned(),
        properties: properties_to_json(&h.delivery.properties),
        headers: h
            .delivery
            .properties
            .headers()
            .as_ref()
            .map(table_to_json)
            .unwrap_or_else(|| json!({})),
        body: body_to_json(&h.delivery.data),
        copies: copies.len(),
    });
    session.close().await?;
    found.ok_or_else(|| DlqError::NotFound {
        ids: vec![id.to_owned()],
    })
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// What to replay.
    pub selection: Selection,
    /// List only.
    pub dry_run: bool,
    /// At most this many replays per second.
    pub rate: Option<u32>,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
    /// How long to wait for another dlq command to finish.
    pub lock_wait: Duration,
    /// Who replays, when it is an operator of the ops console: the session label,
    /// sent as header `x-replayed-by` so the worker's audit rows name them.
    pub by: Option<String>,
}

impl ReplayOptions {
    /// Replay `selection` now, no rate limit, no progress bar.
    pub fn new(selection: Selection) -> Self {
        Self {
            selection,
            dry_run: false,
            rate: None,
            progress: false,
            lock_wait: DEFAULT_LOCK_WAIT,
            by: None,
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

/// Replays the selected dead letters: republish with confirm, then ack the dead copy.
pub async fn replay(settings: &Settings, opts: &ReplayOptions) -> Result<ReplayReport, DlqError> {
    let mut session = DeadQueue::open(settings, opts.lock_wait).await?;
    let missing = missing_ids(&opts.selection, &session);
    if !missing.is_empty() {
        session.close().await?;
        return Err(DlqError::NotFound { ids: missing });
    }
    let selected: Vec<usize> = (0..session.held.len())
        .filter(|i| opts.selection.matches(&session.held[*i].letter))
        .collect();
    let mut report = ReplayReport {
        dry_run: opts.dry_run,
        selected: selected
            .iter()
            .map(|i| session.held[*i].letter.clone())
            .collect(),
        replayed: Vec::new(),
        failed: Vec::new(),
    };
    if opts.dry_run || selected.is_empty() {
        session.close().await?;
        return Ok(report);
    }

    let bar = if opts.progress {
        ProgressBar::new(selected.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} replayed {msg}") {
        bar.set_style(style);
    }
    let confirm_timeout = Duration::from_millis(settings.broker.publish_timeout_ms);
    let spacing = opts
        .rate
        .map(|n| Duration::from_secs_f64(1.0 / f64::from(n)));
    let started = tokio::time::Instant::now();
    let mut broken: Option<String> = None;
    for (n, &i) in selected.iter().enumerate() {
        let letter = session.held[i].letter.clone();
        if let Some(reason) = &broken {
            report.failed.push(ReplayFailure {
                letter,
                reason: format!("not attempted: {reason}"),
            });
            continue;
        }
        if let Some(spacing) = spacing {
            tokio::time::sleep_until(started + spacing * n as u32).await;
        }
        let result = match session
            .republish(
                i,
                &settings.broker.exchange,
                confirm_timeout,
                opts.by.as_deref(),
            )
            .await
        {
            // Only now that the copy is confirmed may the dead copy go.
            Ok(()) => session.ack(i).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => {
                tracing::debug!(
                    svix.id = letter.id.as_deref().unwrap_or("-"),
                    event.type = letter.kind.as_deref(),
                    workspace.id = letter.workspace_id.as_deref(),
                    "dead letter replayed"
                );
                report.replayed.push(letter);
            }
            Err(reason) => {
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
        bar.inc(1);
    }
    bar.finish_and_clear();
    session.close().await?;
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

/// Removes the selected dead letters for good (`Ids` or `All`).
pub async fn purge(settings: &Settings, selection: &Selection) -> Result<PurgeReport, DlqError> {
    let mut session = DeadQueue::open(settings, DEFAULT_LOCK_WAIT).await?;
    let missing = missing_ids(selection, &session);
    if !missing.is_empty() {
        session.close().await?;
        return Err(DlqError::NotFound { ids: missing });
    }
    let mut removed = Vec::new();
    for i in 0..session.held.len() {
        if selection.matches(&session.held[i].letter) {
            session.ack(i).await?;
            removed.push(session.held[i].letter.clone());
        }
    }
    session.close().await?;
    Ok(PurgeReport {
        count: removed.len(),
        removed,
    })
}

/// The svix ids more than one listed dead letter carries, in first-seen order.
fn repeated_ids(letters: &[DeadLetter]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut twice: Vec<String> = Vec::new();
    for id in letters.iter().filter_map(|l| l.id.as_ref()) {
        if !seen.insert(id) && !twice.contains(id) {
            twice.push(id.clone());
        }
    }
    twice
}

fn letters_table(letters: &[DeadLetter]) -> String {
    let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".to_owned());
    render_table(
        &[
            "#",
            "ID",
            "TYPE",
            "WORKSPACE",
            "CLASS",
            "ATTEMPTS",
            "FIRST FAILED",
            "ERROR",
        ],
        letters
            .iter()
            .map(|l| {
                vec![
                    l.position.to_string(),
                    dash(&l.id),
                    dash(&l.kind),
                    dash(&l.workspace_id),
                    dash(&l.error_class),
                    l.attempts
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "-".into()),
                    l.first_failed_at
                        .map(fmt_time)
                        .unwrap_or_else(|| "-".into()),
                    dash(&l.error),
                ]
            })
            .collect(),
    )
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Runs a `dlq` subcommand.
pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { json } => {
            let listing = list(settings).await?;
            if json {
                return print_json(&listing);
            }
            if listing.data.is_empty() {
                println!("no dead letters in {}", listing.queue);
            } else {
                print!("{}", letters_table(&listing.data));
                println!("{} dead letter(s) in {}", listing.count, listing.queue);
            }
            let twice = repeated_ids(&listing.data);
            if !twice.is_empty() {
                println!(
                    "{} id(s) appear more than once: {} (a dlq command interrupted while \
                     putting dead letters back leaves a second copy; `dlq replay --id` \
                     replays each copy and the worker applies an id once, `dlq purge --id` \
                     removes every copy)",
                    twice.len(),
                    twice.join(", ")
                );
            }
            if listing.arrived_during_listing > 0 {
                println!(
                    "{} more arrived while listing; they are kept behind these (list again to see them)",
                    listing.arrived_during_listing
                );
            }
            Ok(())
        }
        DlqCommand::Show { id, json } => {
            let msg = show(settings, &id).await?;
            if json {
                return print_json(&msg);
            }
            let l = &msg.letter;
            let opt = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".to_owned());
            println!("id:            {}", opt(&l.id));
            println!("type:          {}", opt(&l.kind));
            println!("workspace:     {}", opt(&l.workspace_id));
            println!(
                "position:      {} (copies with this id: {})",
                l.position, msg.copies
            );
            println!("error class:   {}", opt(&l.error_class));
            println!("error:         {}", opt(&l.error));
            println!(
                "attempts:      {}",
                l.attempts
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into())
            );
            println!(
                "first failed:  {}",
                l.first_failed_at
                    .map(fmt_time)
                    .unwrap_or_else(|| "-".into())
            );
            println!(
                "received:      {}",
                l.received_at.map(fmt_time).unwrap_or_else(|| "-".into())
            );
            println!("exchange:      {}", msg.exchange);
            println!("routing key:   {}", msg.routing_key);
            println!(
                "properties:\n{}",
                serde_json::to_string_pretty(&msg.properties)?
            );
            println!("headers:\n{}", serde_json::to_string_pretty(&msg.headers)?);
            println!("body:\n{}", serde_json::to_string_pretty(&msg.body)?);
            Ok(())
        }
        DlqCommand::Replay(args) => {
            let opts = ReplayOptions {
                selection: Selection::from_args(args.ids, args.all, args.kind, args.org),
                dry_run: args.dry_run,
                rate: args.rate,
                progress: !args.json && std::io::stdout().is_terminal(),
                lock_wait: DEFAULT_LOCK_WAIT,
                by: None,
            };
            let report = replay(settings, &opts).await?;
            if args.json {
                let mut doc = serde_json::to_value(&report)?;
                doc["summary"] = Value::from(report.summary());
                print_json(&doc)?;
            } else {
                if report.dry_run {
                    if !report.selected.is_empty() {
                        print!("{}", letters_table(&report.selected));
                    }
                } else {
                    for l in &report.replayed {
                        println!(
                            "replayed {} ({})",
                            l.id.as_deref().unwrap_or("-"),
                            l.kind.as_deref().unwrap_or("-")
                        );
                    }
                    for f in &report.failed {
                        eprintln!(
                            "not replayed {}: {}",
                            f.letter.id.as_deref().unwrap_or("-"),
                            f.reason
                        );
                    }
                }
                println!("{}", report.summary());
            }
            if !report.failed.is_empty() {
                anyhow::bail!(
                    "{} dead letter(s) could not be replayed and stay in {}",
                    report.failed.len(),
                    settings.broker.dead_letter_queue
                );
            }
            Ok(())
        }
        DlqCommand::Purge(args) => {
            if !args.yes {
                anyhow::bail!(
                    "refusing to purge without --yes: purged dead letters are gone for good (see them with `dlq list`)"
                );
            }
            let selection = if args.all {
                Selection::All
            } else {
                Selection::Ids(args.ids)
            };
            let report = purge(settings, &selection).await?;
            if args.json {
                return print_json(&report);
            }
            for l in &report.removed {
                println!(
                    "removed {} ({}, workspace {})",
                    l.id.as_deref().unwrap_or("-"),
                    l.kind.as_deref().unwrap_or("-"),
                    l.workspace_id.as_deref().unwrap_or("-")
                );
            }
            println!("removed {} dead letter(s)", report.count);
            Ok(())
        }
    }
}
