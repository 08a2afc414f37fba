//! `provisioner dlq`: inspect, replay and purge dead letters (DESIGN §1, §4).
//!
//! Guarantee: nothing here loses or duplicates a dead letter. `list` and `show`
//! ([`view`]) change no letter (the broker's delivery count aside) and keep no
//! bodies but the one shown; `replay` ([`action`]) removes a dead copy only after
//! the broker confirmed its republished copy, so a crash mid-replay duplicates (the
//! worker deduplicates by svix id) but never loses; `purge` removes only what it
//! names and only with `--yes`. Dead letters not selected, and those arriving
//! meanwhile, stay in their order. See [`queue`] for how.

pub mod action;
pub mod letter;
mod lock;
pub mod queue;
pub mod view;

use std::io::IsTerminal;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;
use serde_json::Value;

use crate::config::Settings;
use crate::ops::{fmt_time, render_table};
pub use action::{
    PurgeReport, ReplayError, ReplayFailure, ReplayOptions, ReplayReport, purge, replay, republish,
};
pub use letter::DeadLetter;
pub use queue::{DEFAULT_LOCK_WAIT, DeadQueue, Taken};
pub use view::{DeadMessage, Listing, Page, PageRequest, list, page, show};

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
            let twice = view::repeated_ids(&listing.data);
            if !twice.is_empty() {
                println!(
                    "{} id(s) appear more than once: {} (a replay interrupted between \
                     republishing and removing the dead copy, or a message put in the queue \
                     twice, leaves a second copy; `dlq replay --id` replays each copy and the \
                     worker applies an id once, `dlq purge --id` removes every copy)",
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
                skip_missing: false,
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
