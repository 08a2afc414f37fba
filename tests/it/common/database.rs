//! A fresh, migrated PostgreSQL database for tests that drive the library directly
//! (no HTTP app, no broker), and the drop of every test database.
//!
//! Guarantee: the database of an [`Isolation`] is dropped when the last clone of
//! that `Isolation` goes out of scope (a [`TestDatabase`] and a `TestApp` each hold
//! one), also when the test panics, so no test drops it by hand and a failing test
//! leaves nothing behind.

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{Isolation, base_database_url};

/// A migrated database of one test, dropped with it.
#[derive(Debug)]
pub struct TestDatabase {
    /// Pool on the database.
    pub pool: PgPool,
    /// Its name.
    pub name: String,
    /// Drops the database when the test database goes.
    _iso: Isolation,
}

impl TestDatabase {
    /// Creates and migrates a database with a `prov_test_…` name.
    pub async fn create() -> Self {
        Self::create_with_pool_size(8).await
    }

    /// Same, with a pool of `max_connections`.
    pub async fn create_with_pool_size(max_connections: u32) -> Self {
        let iso = Isolation::new();
        // Test data needs no crash durability: commits skip the WAL flush wait, so
        // tests that commit thousands of transactions stay fast.
        let url = format!(
            "{}?options=-c%20synchronous_commit%3Doff",
            iso.database_url()
        );
        let pool = prepare(url, max_connections).await;
        Self {
            pool,
            name: iso.database.clone(),
            _iso: iso,
        }
    }
}

/// Creates (if missing) and migrates the database at `url`, as the service does,
/// with a pool of `max_connections` and no statement or lock timeouts.
pub async fn prepare(url: String, max_connections: u32) -> PgPool {
    let settings = provisioner::config::DatabaseSettings {
        url: provisioner::config::ConnectionUrl::new(url),
        max_connections,
        acquire_timeout_ms: 30_000,
        lock_timeout_ms: 0,
        statement_timeout_ms: 0,
        idle_in_transaction_session_timeout_ms: 0,
    };
    provisioner::db::prepare(&settings)
        .await
        .expect("test database prepared")
}

/// Transactions of this database waiting for a lock (a row or an advisory lock).
pub async fn lock_waiters(db: &PgPool) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity \
         where datname = current_database() and wait_event_type = 'Lock'",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

/// Drops the database `name` now, whatever the caller's context: on a thread of
/// its own with its own runtime, because `drop` cannot await and the test's runtime
/// may be unwinding or (in a `#[test]` that builds one) already gone. Waiting for
/// that thread means the database is gone when the caller returns; `with (force)`
/// ends the connections still open on it (an app's pool, a child process).
pub(super) fn drop_database_now(name: &str) {
    let name = name.to_owned();
    let dropper = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(drop_database(&name));
    });
    let _ = dropper.join();
}

/// Drops `name` (a missing database is a no-op; an unreachable server leaves it to
/// the harness's sweep of old test databases).
async fn drop_database(name: &str) {
    let Ok(admin) = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(&format!("{}/postgres", base_database_url()))
        .await
    else {
        return;
    };
    let sql = format!("drop database if exists \"{name}\" with (force)");
    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&admin).await;
    admin.close().await;
}
