//! PostgreSQL: pool, database creation, migrations, and the one classifier of
//! database errors.
//!
//! Guarantee: `prepare` is safe when several processes start at once — creating an
//! existing database is not an error and migrations run under sqlx's advisory lock.
//! Every component decides what a database error means through [`is_unavailable`],
//! [`is_transient`] and [`fault`], so the worker, provisioning and the API never
//! disagree on "PostgreSQL is down" (docs/faults.md says what each class does).
//! A pooled connection left on a server that only reads (a standby after a
//! failover, `default_transaction_read_only`) is replaced once a statement on any
//! connection failed for that, so the work proceeds as soon as the server writes
//! again.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Errors preparing the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL could not be parsed.
    #[error("invalid DATABASE_URL ({url}): {source}")]
    Url {
        /// Redacted URL.
        url: String,
        /// Parse error.
        source: sqlx::Error,
    },
    /// The server could not be reached or refused.
    #[error("cannot reach PostgreSQL at {url}: {source}")]
    Connect {
        /// Redacted URL.
        url: String,
        /// Cause.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl DbError {
    /// Whether preparing failed only because PostgreSQL is unavailable now (see
    /// [`is_unavailable`]), so trying again later may succeed.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Url { .. } => false,
            DbError::Connect { source, .. } => is_unavailable(source),
            DbError::Migrate(
                sqlx::migrate::MigrateError::Execute(e)
                | sqlx::migrate::MigrateError::ExecuteMigration(e, _),
            ) => is_unavailable(e),
            DbError::Migrate(_) => false,
        }
    }
}

/// The query parameters sqlx reads from a PostgreSQL URL (sqlx-postgres 0.9,
/// `options/parse.rs`), besides `options[…]`.
const SQLX_PARAMETERS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The URL without the query parameters sqlx does not read, and their names. sqlx
/// ignores such a parameter with a warning that quotes its value — a secret for
/// libpq's `sslpassword=` — so it never sees them; the caller names them instead.
fn readable_url(raw: &str) -> (String, Vec<String>) {
    let Ok(mut url) = url::Url::parse(raw) else {
        return (raw.to_owned(), Vec::new());
    };
    let known = |k: &str| SQLX_PARAMETERS.contains(&k) || k.starts_with("options[");
    let (kept, dropped): (Vec<_>, Vec<_>) = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .partition(|(k, _)| known(k));
    if dropped.is_empty() {
        return (raw.to_owned(), Vec::new());
    }
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    (
        url.to_string(),
        dropped.into_iter().map(|(k, _)| k).collect(),
    )
}

/// The connection options of `settings.url`, application name and slow-statement
/// logging set, and no parameter sqlx would log the value of (see `readable_url`).
/// Every connection this code base makes to PostgreSQL starts here.
pub fn options(settings: &DatabaseSettings) -> Result<PgConnectOptions, DbError> {
    let (url, ignored) = readable_url(settings.url.expose());
    for parameter in ignored {
        tracing::warn!(
            %parameter,
            url = %settings.url,
            "ignoring a connection parameter the PostgreSQL driver does not read"
        );
    }
    PgConnectOptions::from_str(&url)
        .map(|o| {
            o.log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1))
                .application_name("callmine-provisioner")
        })
        .map_err(|source| DbError::Url {
            url: settings.url.redacted(),
            source,
        })
}

/// The options of the service's pool: the URL's, plus `lock_timeout`,
/// `statement_timeout` and `idle_in_transaction_session_timeout` on every session
/// when configured (0 leaves the server's). The last is a backstop: a transaction
/// whose driver stopped polling it (a bug, a lost task) would otherwise hold its
/// advisory locks and its connection until the process exits.
fn pool_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, DbError> {
    let timeouts = [
        ("lock_timeout", settings.lock_timeout_ms),
        ("statement_timeout", settings.statement_timeout_ms),
        (
            "idle_in_transaction_session_timeout",
            settings.idle_in_transaction_session_timeout_ms,
        ),
    ];
    Ok(options(settings)?.options(timeouts.into_iter().filter(|(_, ms)| *ms > 0)))
}

/// A lazily connecting pool: the process starts even while PostgreSQL is down.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    pool_gated(settings, None)
}

/// A lazily connecting pool that, when `migrated` is given, opens no connection
/// until it is true (the schema is not there yet).
fn pool_gated(
    settings: &DatabaseSettings,
    migrated: Option<Arc<AtomicBool>>,
) -> Result<PgPool, DbError> {
    let mut pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .before_acquire(|conn, meta| Box::pin(replace_if_read_only(conn, meta.age)));
    if let Some(migrated) = migrated {
        pool = pool.after_connect(move |_, _| {
            let ready = migrated.load(Ordering::Acquire);
            Box::pin(async move {
                if ready {
                    Ok(())
                } else {
                    Err(sqlx::Error::Io(std::io::Error::other(
                        "migrations not applied yet",
                    )))
                }
            })
        });
    }
    Ok(pool.connect_lazy_with(pool_options(settings)?))
}

/// Creates the database named in the URL if it does not exist.
pub async fn ensure_database(settings: &DatabaseSettings) -> Result<(), DbError> {
    let opts = options(settings)?;
    let name = opts.get_database().unwrap_or("postgres").to_owned();
    let admin = opts.clone().database("postgres");
    let mut conn = admin.connect().await.map_err(|source| DbError::Connect {
        url: settings.url.redacted(),
        source,
    })?;
    let exists: bool =
        sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .map_err(|source| DbError::Connect {
                url: settings.url.redacted(),
                source,
            })?;
    if !exists {
        let sql = format!("create database \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // 42P04 duplicate_database: another process won the race.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            // 23505: concurrent create on the catalog's unique index.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {}
            Err(source) => {
                return Err(DbError::Connect {
                    url: settings.url.redacted(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Applies the migrations on a connection of its own, without the service's
/// session timeouts: a migration may take long, and a process that starts while
/// another migrates waits for sqlx's advisory lock.
async fn migrate(settings: &DatabaseSettings) -> Result<(), DbError> {
    // A pool of one, not a bare connection: `Migrator::run` on `&mut PgConnection`
    // makes the future unsendable into a spawned task (a higher-ranked lifetime).
    let conn = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .connect_with(options(settings)?)
        .await
        .map_err(|source| DbError::Connect {
            url: settings.url.redacted(),
            source,
        })?;
    let result = MIGRATOR.run(&conn).await;
    conn.close().await;
    Ok(result?)
}

/// Creates the database if missing, connects and applies migrations.
pub async fn prepare(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    ensure_database(settings).await?;
    migrate(settings).await?;
    pool(settings)
}

/// [`prepare`] for a process that can do its main work without PostgreSQL
/// (intake only needs the broker). When PostgreSQL answers, the same as
/// [`prepare`]. When it is unavailable (see [`DbError::is_unavailable`]), a pool
/// that opens no connection until a background task, retrying with backoff until
/// `stop`, has created the database and applied the migrations: meanwhile every
/// use of the pool fails as PostgreSQL being unavailable. Any other error is
/// returned, as from [`prepare`].
pub async fn prepare_or_defer(
    settings: &DatabaseSettings,
    stop: CancellationToken,
) -> Result<PgPool, DbError> {
    let error = match prepare(settings).await {
        Ok(pool) => return Ok(pool),
        Err(e) if e.is_unavailable() => e,
        Err(e) => return Err(e),
    };
    tracing::warn!(error = %error, "PostgreSQL unavailable; starting without it, migrations are applied once it answers");
    let migrated = Arc::new(AtomicBool::new(false));
    let pool = pool_gated(settings, Some(migrated.clone()))?;
    let settings = settings.clone();
    tokio::spawn(async move {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let pause = delays.next().unwrap_or(Duration::from_secs(2));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            let prepared = async {
                ensure_database(&settings).await?;
                migrate(&settings).await
            };
            match prepared.await {
                Ok(()) => {
                    migrated.store(true, Ordering::Release);
                    tracing::info!("PostgreSQL answers; database ready and migrations applied");
                    return;
                }
                Err(e) if e.is_unavailable() => {
                    tracing::debug!(error = %e, "PostgreSQL still unavailable");
                }
                Err(e) => tracing::error!(error = %e, "cannot prepare the database; retrying"),
            }
        }
    });
    Ok(pool)
}

/// What a database error means for the work that hit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFault {
    /// PostgreSQL cannot be reached or used right now: the connection is lost or
    /// refused, the server is starting, shutting down or out of resources, the login
    /// or the database is refused, a transaction could not begin, the pool timed out.
    /// The work is fine, the database is not; wait and try again.
    Unreachable,
    /// The server only reads (25006): a standby after a failover, or
    /// `default_transaction_read_only`. Also wait; the connection is replaced.
    ReadOnly,
    /// `statement_timeout` or `lock_timeout` ended a statement (57014, 55P03), or
    /// a transaction timeout ended the session: something else holds the rows or
    /// the server is too slow now. Wait and try again.
    Timeout,
    /// Deadlock or serialization failure: the same transaction may succeed at once.
    Conflict,
    /// A value PostgreSQL refuses to store (class 22, data exception, e.g. a NUL
    /// character in a name; class 54, e.g. an id too long to index; a NOT NULL or
    /// CHECK constraint the value violates): retrying cannot help, the input must
    /// be fixed.
    Data,
    /// Anything else: an error about these statements, possibly transient.
    Other,
}

/// Classifies a database error (see [`DbFault`]). Classifying a read-only error
/// also has the pool check its older connections before handing them out again.
pub fn fault(error: &sqlx::Error) -> DbFault {
    let fault = match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => DbFault::Unreachable,
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => fault_of_code(&code),
            None => DbFault::Other,
        },
        _ => DbFault::Other,
    };
    if fault == DbFault::ReadOnly {
        note_read_only();
    }
    fault
}

/// The one answer to "is the database unavailable?": PostgreSQL cannot take this
/// work now, for a reason that is not the work's (unreachable, read-only, timed
/// out). The worker holds such events and never dead-letters them for it; the
/// API answers 503 `database_unavailable`.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        fault(error),
        DbFault::Unreachable | DbFault::ReadOnly | DbFault::Timeout
    )
}

/// A deadlock or serialization failure (40P01, 40001): the transaction may
/// succeed when tried again. Provisioning retries it at once a few times; after
/// that the worker holds the event like an outage, never dead-letters it.
pub fn is_transient(error: &sqlx::Error) -> bool {
    fault(error) == DbFault::Conflict
}

/// The class of a SQLSTATE code.
fn fault_of_code(code: &str) -> DbFault {
    // 08: connection exception; 53: insufficient resources (too many connections,
    // disk full, out of memory); 57P: the server is shutting down, crashed or still
    // starting (57P01-05); 28: authentication and 3D000 (database missing): the
    // pool cannot connect.
    if code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code.starts_with("28")
        || code == "3D000"
    {
        DbFault::Unreachable
    } else if code == "25006" {
        DbFault::ReadOnly
    } else if matches!(code, "57014" | "55P03" | "25P03" | "25P04") {
        // query_canceled (statement_timeout), lock_not_available (lock_timeout),
        // idle-in-transaction and transaction timeouts.
        DbFault::Timeout
    } else if matches!(code, "40P01" | "40001") {
        DbFault::Conflict
    } else if code.starts_with("22") || code.starts_with("54") || matches!(code, "23502" | "23514")
    {
        DbFault::Data
    } else {
        DbFault::Other
    }
}

/// Time origin of [`READ_ONLY_SEEN_MS`].
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);
/// When a statement last failed because the server only reads, in ms since
/// [`ORIGIN`] plus one (0: never).
static READ_ONLY_SEEN_MS: AtomicU64 = AtomicU64::new(0);

fn since_origin_ms(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*ORIGIN).as_millis()).unwrap_or(u64::MAX)
}

fn note_read_only() {
    READ_ONLY_SEEN_MS.fetch_max(since_origin_ms(Instant::now()) + 1, Ordering::AcqRel);
}

/// Whether a pooled connection opened `age` ago may still be on a server that only
/// reads: it was opened before the last read-only error anywhere in the process.
fn suspect(age: Duration) -> bool {
    let seen = READ_ONLY_SEEN_MS.load(Ordering::Acquire);
    if seen == 0 {
        return false;
    }
    let opened = Instant::now().checked_sub(age).unwrap_or(*ORIGIN);
    since_origin_ms(opened) < seen
}

/// The pool's check before it hands out an idle connection: a connection opened
/// before a read-only error was seen is asked whether its session only reads
/// (a session keeps `default_transaction_read_only` as it was at connect, and a
/// standby answers `on` too); if so it is closed and the pool opens another.
/// Otherwise nothing is sent (the pool's own ping already checked it is alive).
async fn replace_if_read_only(conn: &mut PgConnection, age: Duration) -> Result<bool, sqlx::Error> {
    if !suspect(age) {
        return Ok(true);
    }
    let read_only: String = sqlx::query_scalar("select current_setting('transaction_read_only')")
        .fetch_one(conn)
        .await?;
    if read_only == "on" {
        tracing::info!("closing a pooled connection whose session only reads");
        return Ok(false);
    }
    Ok(true)
}

#[cfg(test)]
mod url_tests {
    use super::readable_url;

    #[test]
    fn parameters_sqlx_would_log_are_dropped_and_named() {
        let (url, ignored) =
            readable_url("postgres://u@db/app?sslpassword=hunter2&sslmode=disable&password=p");
        assert_eq!(url, "postgres://u@db/app?sslmode=disable&password=p");
        assert_eq!(ignored, ["sslpassword"]);
        let (url, ignored) = readable_url("postgres://u@db/app?sslpassword=hunter2");
        assert_eq!(url, "postgres://u@db/app");
        assert_eq!(ignored, ["sslpassword"]);
        let plain = "postgres://u:p@db/app?options[search_path]=x&application_name=a";
        assert_eq!(readable_url(plain), (plain.to_owned(), Vec::new()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified_by_their_class() {
        for code in [
            "08006", "08001", "53300", "53100", "53200", "57P01", "57P03", "57P04", "57P05",
            "28P01", "28000", "3D000",
        ] {
            assert_eq!(fault_of_code(code), DbFault::Unreachable, "{code}");
        }
        assert_eq!(fault_of_code("25006"), DbFault::ReadOnly);
        for code in ["57014", "55P03", "25P03"] {
            assert_eq!(fault_of_code(code), DbFault::Timeout, "{code}");
        }
        for code in ["40P01", "40001"] {
            assert_eq!(fault_of_code(code), DbFault::Conflict, "{code}");
        }
        for code in ["22021", "22001", "54000", "23502", "23514"] {
            assert_eq!(fault_of_code(code), DbFault::Data, "{code}");
        }
        for code in ["23505", "23503", "42P01", "42703"] {
            assert_eq!(fault_of_code(code), DbFault::Other, "{code}");
        }
    }

    #[test]
    fn lost_connections_and_failed_begins_are_unreachable() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(fault(&io), DbFault::Unreachable);
        assert_eq!(fault(&sqlx::Error::PoolTimedOut), DbFault::Unreachable);
        assert_eq!(fault(&sqlx::Error::BeginFailed), DbFault::Unreachable);
        assert_eq!(fault(&sqlx::Error::RowNotFound), DbFault::Other);
        assert!(is_unavailable(&io));
        assert!(!is_transient(&io));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
    }

    #[test]
    fn preparing_is_deferred_only_for_an_unavailable_database() {
        let refused = || sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        let connect = DbError::Connect {
            url: "postgres://db/x".into(),
            source: refused(),
        };
        assert!(connect.is_unavailable());
        let lost = DbError::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(refused(), 1));
        assert!(lost.is_unavailable());
        let modified = DbError::Migrate(sqlx::migrate::MigrateError::VersionMismatch(1));
        assert!(!modified.is_unavailable());
    }

    #[test]
    fn a_connection_is_suspect_only_when_opened_before_a_read_only_error() {
        // Opened "now": after every error noted so far in this process.
        assert!(!suspect(Duration::ZERO));
        note_read_only();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            suspect(Duration::from_secs(1)),
            "opened before the error was seen"
        );
        assert!(!suspect(Duration::ZERO), "opened after it");
    }
}
