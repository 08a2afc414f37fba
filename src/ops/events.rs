//! `provisioner events`: the processing log (table `events`): what happened to each
//! svix id, newest first.
//!
//! Guarantee: read-only. Filters are bound parameters, never spliced into SQL.

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::config::Settings;
use crate::ops::{fmt_time, render_table};

/// Statuses of the processing log (DESIGN §6).
pub const STATUSES: [&str; 4] = ["processed", "ignored", "superseded", "dead"];

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
    #[arg(long, value_name = "S", value_parser = STATUSES)]
    pub status: Option<String>,
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

fn parse_time(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("`{raw}` is not an RFC 3339 time like 2026-11-29T08:00:00Z ({e})"))
}

/// Errors of the `events` commands; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The database could not be read (URL without its password).
    #[error("cannot read the processing log at {url}: {source}")]
    Database {
        /// Redacted URL.
        url: String,
        /// Cause.
        source: sqlx::Error,
    },
    /// The database URL is unusable.
    #[error("{0}")]
    Config(#[from] crate::db::DbError),
    /// No such svix id (404).
    #[error("no event with id {0} in the processing log (404: no worker has seen it)")]
    NotFound(String),
}

/// One row of the processing log, shaped like `GET /v1/events/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EventRecord {
    /// Svix id.
    #[sqlx(rename = "svix_id")]
    pub id: String,
    /// Event type.
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    /// Workspace the event is about.
    pub workspace_id: Option<String>,
    /// `processed`, `ignored`, `superseded` or `dead`.
    pub status: String,
    /// Why it is dead.
    pub error: Option<String>,
    /// Times a worker took it up.
    pub attempts: i32,
    /// When intake queued it.
    pub received_at: DateTime<Utc>,
    /// When it was last processed.
    pub processed_at: DateTime<Utc>,
}

/// Filters of `events list`.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Status.
    pub status: Option<String>,
    /// Workspace id.
    pub workspace_id: Option<String>,
    /// Event type.
    pub kind: Option<String>,
    /// Processed at or after.
    pub since: Option<DateTime<Utc>>,
    /// At most this many (default 50).
    pub limit: Option<i64>,
}

const COLUMNS: &str = "select svix_id, type, workspace_id, status, error, attempts, received_at, processed_at from events";

/// The processing log, newest first, filtered.
pub async fn list(
    settings: &Settings,
    pool: &PgPool,
    filter: &EventFilter,
) -> Result<Vec<EventRecord>, EventsError> {
    let mut q: QueryBuilder<Postgres> = QueryBuilder::new(COLUMNS);
    let mut sep = " where ";
    if let Some(s) = &filter.status {
        q.push(sep).push("status = ").push_bind(s.clone());
        sep = " and ";
    }
    if let Some(w) = &filter.workspace_id {
        q.push(sep).push("workspace_id = ").push_bind(w.clone());
        sep = " and ";
    }
    if let Some(k) = &filter.kind {
        q.push(sep).push("type = ").push_bind(k.clone());
        sep = " and ";
    }
    if let Some(t) = filter.since {
        q.push(sep).push("processed_at >= ").push_bind(t);
    }
    q.push(" order by processed_at desc, svix_id desc limit ")
        .push_bind(filter.limit.unwrap_or(50));
    q.build_query_as::<EventRecord>()
        .fetch_all(pool)
        .await
        .map_err(|source| EventsError::Database {
            url: settings.database.url.redacted(),
            source,
        })
}

/// One event by svix id.
pub async fn show(
    settings: &Settings,
    pool: &PgPool,
    id: &str,
) -> Result<EventRecord, EventsError> {
    let sql = format!("{COLUMNS} where svix_id = $1");
    sqlx::query_as::<_, EventRecord>(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(|source| EventsError::Database {
            url: settings.database.url.redacted(),
            source,
        })?
        .ok_or_else(|| EventsError::NotFound(id.to_owned()))
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
                            e.status.clone(),
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
            println!("status:     {}", e.status);
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
