//! The processing log (table `events`): what happened to each svix id, newest
//! first. One query and one row type, [`EventRecord`]: the CLI (`provisioner
//! events`) and the ops console read it whole, the read API serves it as
//! [`Event`] (`GET /v1/events/{id}`, without `attempts`).
//!
//! Guarantee: read-only. Filters are bound parameters, never spliced into SQL;
//! every status read is an [`EventStatus`] (a stored value outside
//! [`EventStatus::ALL`] is an error, never passed on).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::StoreError;
use super::model::{Event, EventStatus, UnknownValue};
use crate::config::Settings;

/// Errors of the processing-log reads for an operator; each displays as one line.
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
    /// A stored status this build does not know.
    #[error(transparent)]
    Unknown(#[from] UnknownValue),
    /// No such svix id (404).
    #[error("no event with id {0} in the processing log (404: no worker has seen it)")]
    NotFound(String),
}

/// One row of the processing log, shaped like `GET /v1/events/{id}` plus `attempts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRecord {
    /// Svix id.
    pub id: String,
    /// Event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Workspace the event is about.
    pub workspace_id: Option<String>,
    /// What happened to it.
    pub status: EventStatus,
    /// Why it is dead.
    pub error: Option<String>,
    /// Times a worker took it up.
    pub attempts: i32,
    /// When intake queued it.
    pub received_at: DateTime<Utc>,
    /// When it was last processed.
    pub processed_at: DateTime<Utc>,
}

impl From<EventRecord> for Event {
    fn from(r: EventRecord) -> Self {
        Event {
            id: r.id,
            kind: r.kind,
            workspace_id: r.workspace_id,
            status: r.status,
            error: r.error,
            received_at: r.received_at,
            processed_at: r.processed_at,
        }
    }
}

/// The row as stored (status as text).
#[derive(sqlx::FromRow)]
struct Row {
    svix_id: String,
    #[sqlx(rename = "type")]
    kind: String,
    workspace_id: Option<String>,
    status: String,
    error: Option<String>,
    attempts: i32,
    received_at: DateTime<Utc>,
    processed_at: DateTime<Utc>,
}

impl TryFrom<Row> for EventRecord {
    type Error = UnknownValue;

    fn try_from(r: Row) -> Result<Self, UnknownValue> {
        Ok(EventRecord {
            status: EventStatus::parse(&r.status)?,
            id: r.svix_id,
            kind: r.kind,
            workspace_id: r.workspace_id,
            error: r.error,
            attempts: r.attempts,
            received_at: r.received_at,
            processed_at: r.processed_at,
        })
    }
}

/// Filters of the processing log's list.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Status.
    pub status: Option<EventStatus>,
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

/// The row of one svix id, if a worker has seen it.
pub async fn find(db: &PgPool, svix_id: &str) -> Result<Option<EventRecord>, StoreError> {
    let sql = format!("{COLUMNS} where svix_id = $1");
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(svix_id)
        .fetch_optional(db)
        .await?;
    Ok(row.map(EventRecord::try_from).transpose()?)
}

/// The processing log, newest first, filtered.
pub async fn list(
    settings: &Settings,
    pool: &PgPool,
    filter: &EventFilter,
) -> Result<Vec<EventRecord>, EventsError> {
    let mut q: QueryBuilder<Postgres> = QueryBuilder::new(COLUMNS);
    let mut sep = " where ";
    if let Some(s) = filter.status {
        q.push(sep).push("status = ").push_bind(s.as_str());
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
    let rows = q
        .build_query_as::<Row>()
        .fetch_all(pool)
        .await
        .map_err(|source| EventsError::Database {
            url: settings.database.url.redacted(),
            source,
        })?;
    Ok(rows
        .into_iter()
        .map(EventRecord::try_from)
        .collect::<Result<_, _>>()?)
}

/// One event by svix id.
pub async fn show(
    settings: &Settings,
    pool: &PgPool,
    id: &str,
) -> Result<EventRecord, EventsError> {
    match find(pool, id).await {
        Ok(Some(record)) => Ok(record),
        Ok(None) => Err(EventsError::NotFound(id.to_owned())),
        Err(StoreError::Database(source)) => Err(EventsError::Database {
            url: settings.database.url.redacted(),
            source,
        }),
        Err(StoreError::Unknown(e)) => Err(EventsError::Unknown(e)),
    }
}
