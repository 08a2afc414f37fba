//! `provisioner dlq`: inspect, replay and purge dead letters (DESIGN §1, §4), as
//! tables or one JSON document, through [`crate::dead_letters`].
//!
//! Guarantee: the library's (nothing lost or duplicated), plus: `purge` removes
//! nothing without `--yes`.

use std::io::IsTerminal;

use clap::{ArgGroup, Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;

use super::{fmt_time, render_table};
use crate::config::Settings;
use crate::dead_letters::{
    DEFAULT_LOCK_WAIT, DeadLetter, ReplayOptions, Selection, list, purge, replay, show, view,
};
use crate::progress::Progress;

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

/// The selection `dlq replay`'s arguments name (clap makes exactly one of them given).
fn selection(ids: Vec<String>, all: bool, kind: Option<String>, org: Option<String>) -> Selection {
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

/// A replay's terminal progress bar: dead letters read, and how many replayed.
struct ReplayBar(ProgressBar);

impl Progress for ReplayBar {
    fn phase(&self, _: &'static str, total: Option<u64>) {
        if let Some(n) = total {
            self.0.set_length(n);
        }
    }

    fn advance(&self, n: u64) {
        self.0.inc(n);
    }

    fn note(&self, text: String) {
        self.0.set_message(text);
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
                selection: selection(args.ids, args.all, args.kind, args.org),
                dry_run: args.dry_run,
                rate: args.rate,
                lock_wait: DEFAULT_LOCK_WAIT,
                by: None,
                skip_missing: false,
            };
            let bar = if !args.json && std::io::stdout().is_terminal() {
                ProgressBar::new(0)
            } else {
                ProgressBar::hidden()
            };
            if let Ok(style) =
                ProgressStyle::with_template("{bar:40} {pos}/{len} dead letters read, {msg}")
            {
                bar.set_style(style);
            }
            let replayed = replay(settings, &opts, &ReplayBar(bar.clone())).await;
            bar.finish_and_clear();
            let report = replayed?;
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
