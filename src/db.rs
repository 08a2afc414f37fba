//! PostgreSQL: pool, database creation, migrations, and the one classifier of
//! database errors.
//!
//! Guarantee: `prepare` is safe when several processes start at once — creating an
//! existing database is not an error and migrations run under sqlx's advisory lock.
//! Every component decides what a database error means through [`fault`], so the
//! worker, provisioning and the API never disagree on "PostgreSQL is down".

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

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

/// A lazily connecting pool: the process starts even while PostgreSQL is down.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .connect_lazy_with(options(settings)?))
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

/// Creates the database if missing, connects and applies migrations.
pub async fn prepare(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    ensure_database(settings).await?;
    let pool = pool(settings)?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// What a database error means for the work that hit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFault {
    /// PostgreSQL cannot be reached or used right now: the work is fine, the
    /// database is not; wait and try again, never give up on the work for this.
    Unreachable,
    /// Deadlock or serialization failure: the same transaction may succeed at once.
    Conflict,
    /// A value PostgreSQL refuses to store (class 22, data exception, e.g. a NUL
    /// character in a name; class 54, e.g. an id too long to index): retrying
    /// cannot help, the input must be fixed.
    Data,
    /// Anything else: an error about these statements, possibly transient.
    Other,
}

/// Classifies a database error (see [`DbFault`]).
pub fn fault(error: &sqlx::Error) -> DbFault {
    match error {
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
    }
}

/// The class of a SQLSTATE code.
fn fault_of_code(code: &str) -> DbFault {
    // 08: connection exception; 53: insufficient resources (too many connections,
    // disk full, out of memory); 57P: the server is shutting down, crashed or still
    // starting; 28: authentication and 3D000 (database missing): the pool cannot
    // connect.
    if code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code.starts_with("28")
        || code == "3D000"
    {
        DbFault::Unreachable
    } else if matches!(code, "40P01" | "40001") {
        DbFault::Conflict
    } else if code.starts_with("22") || code.starts_with("54") {
        DbFault::Data
    } else {
        DbFault::Other
    }
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
            "08006", "53300", "53100", "57P01", "57P03", "28P01", "3D000",
        ] {
            assert_eq!(fault_of_code(code), DbFault::Unreachable, "{code}");
        }
        for code in ["40P01", "40001"] {
            assert_eq!(fault_of_code(code), DbFault::Conflict, "{code}");
        }
        for code in ["22021", "22001", "54000"] {
            assert_eq!(fault_of_code(code), DbFault::Data, "{code}");
        }
        for code in ["23505", "42P01"] {
            assert_eq!(fault_of_code(code), DbFault::Other, "{code}");
        }
    }

    #[test]
    fn lost_connections_are_unreachable() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(fault(&io), DbFault::Unreachable);
        assert_eq!(fault(&sqlx::Error::PoolTimedOut), DbFault::Unreachable);
        assert_eq!(fault(&sqlx::Error::RowNotFound), DbFault::Other);
    }
}
