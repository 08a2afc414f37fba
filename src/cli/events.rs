//! `provisioner events`: the processing log (table `events`), what happened to each
//! svix id, newest first, as a table or one JSON document (through
//! [`crate::store::events`]).
//!
//! Guarantee: read-only.

use chrono::{DateTime, Utc};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand};
use serde::Serialize;
use sqlx::PgPool;

use super::{fmt_time, render_table};
use crate::config::Settings;
use crate::store::events::{EventFilter, EventsError, list, show};
use crate::store::model::EventStatus;

/// `events` subcommands.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List processed events, newest first.
    List(ListArgs),
    /// Show one event of the processing log.
    Show {
        /// Svix id.
        id: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `events list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only events with this status.
    #[arg(long, value_name = "S", value_parser = status_parser())]
    pub status: Option<EventStatus>,
    /// Only events about this workspace (organization id).
    #[arg(long, value_name = "ID")]
    pub org: Option<String>,
    /// Only events of this type.
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// Only events processed at or after this time (RFC 3339, e.g. 2026-11-29T08:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// At most N events.
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub limit: i64,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `--status`: one of [`EventStatus::ALL`], listed as possible values.
fn status_parser() -> impl TypedValueParser<Value = EventStatus> {
    PossibleValuesParser::new(EventStatus::ALL.iter().map(|s| s.as_str()))
        .try_map(|s| EventStatus::parse(&s))
}

fn parse_time(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("`{raw}` is not an RFC 3339 time like 2026-11-29T08:00:00Z ({e})"))
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Runs an `events` subcommand.
pub async fn run(settings: &Settings, command: EventsCommand) -> anyhow::Result<()> {
    let pool = crate::db::pool(&settings.database).map_err(EventsError::from)?;
    let result = run_with(settings, &pool, command).await;
    pool.close().await;
    result
}

async fn run_with(
    settings: &Settings,
    pool: &PgPool,
    command: EventsCommand,
) -> anyhow::Result<()> {
    match command {
        EventsCommand::List(args) => {
            let filter = EventFilter {
                status: args.status,
                workspace_id: args.org,
                kind: args.kind,
                since: args.since,
                limit: Some(args.limit),
            };
            let events = list(settings, pool, &filter).await?;
            if args.json {
                return print_json(&serde_json::json!({ "data": events }));
            }
            if events.is_empty() {
                println!("no events");
                return Ok(());
            }
            let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".to_owned());
            print!(
                "{}",
                render_table(
                    &[
                        "PROCESSED",
                        "ID",
                        "TYPE",
                        "WORKSPACE",
                        "STATUS",
                        "ATTEMPTS",
                        "ERROR"
                    ],
                    events
                        .iter()
                        .map(|e| vec![
                            fmt_time(e.processed_at),
                            e.id.clone(),
                            e.kind.clone(),
                            dash(&e.workspace_id),
                            e.status.as_str().to_owned(),
                            e.attempts.to_string(),
                            dash(&e.error),
                        ])
                        .collect(),
                )
            );
            Ok(())
        }
        EventsCommand::Show { id, json } => {
            let e = show(settings, pool, &id).await?;
            if json {
                return print_json(&e);
            }
            println!("id:         {}", e.id);
            println!("type:       {}", e.kind);
            println!("workspace:  {}", e.workspace_id.as_deref().unwrap_or("-"));
            println!("status:     {}", e.status.as_str());
            println!("error:      {}", e.error.as_deref().unwrap_or("-"));
            println!("attempts:   {}", e.attempts);
            println!("received:   {}", fmt_time(e.received_at));
            println!("processed:  {}", fmt_time(e.processed_at));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc3339_only() {
        assert_eq!(
            parse_time("2026-11-29T09:00:00+01:00").unwrap(),
            parse_time("2026-11-29T08:00:00Z").unwrap()
        );
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert!(parse_time("2026-11-29").is_err());
    }
}
