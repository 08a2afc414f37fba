//! PostgreSQL: pool, database creation and migrations.
//!
//! Guarantee: `prepare` is safe when several processes start at once — creating an
//! existing database is not an error and migrations run under sqlx's advisory lock.

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

fn options(settings: &DatabaseSettings) -> Result<PgConnectOptions, DbError> {
    PgConnectOptions::from_str(settings.url.expose())
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
