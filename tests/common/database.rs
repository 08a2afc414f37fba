//! A fresh, migrated PostgreSQL database for tests that drive the library directly
//! (no HTTP app, no broker).

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{Isolation, base_database_url};

/// A migrated database of one test; `drop_database` removes it (a failed test's
/// database is swept by the harness an hour later, like those of `spawn_app`).
#[derive(Debug)]
pub struct TestDatabase {
    /// Pool on the database.
    pub pool: PgPool,
    /// Its name.
    pub name: String,
}

impl TestDatabase {
    /// Creates and migrates a database with a `prov_test_…` name.
    pub async fn create() -> Self {
        Self::create_with_pool_size(8).await
    }

    /// Same, with a pool of `max_connections`.
    pub async fn create_with_pool_size(max_connections: u32) -> Self {
        let iso = Isolation::new();
        let settings = provisioner::config::DatabaseSettings {
            url: provisioner::config::ConnectionUrl::new(iso.database_url()),
            max_connections,
            acquire_timeout_ms: 30_000,
        };
        let pool = provisioner::db::prepare(&settings)
            .await
            .expect("test database prepared");
        Self {
            pool,
            name: iso.database,
        }
    }

    /// Closes the pool and drops the database.
    pub async fn drop_database(self) {
        self.pool.close().await;
        let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", base_database_url()))
            .await
        else {
            return;
        };
        let sql = format!("drop database if exists \"{}\" with (force)", self.name);
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&admin).await;
        admin.close().await;
    }
}
