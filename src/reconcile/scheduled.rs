//! The scheduled reconcile: a full run every `[reconcile] interval_s`, one process
//! of a deployment at a time, with its metrics.
//!
//! Guarantee: while another process holds the run's session advisory lock, a tick
//! is skipped, never run twice at once; a failed run is logged and tried again at
//! the next interval, and every tick records its result.

use super::report::{DriftKind, Report};
use super::{ReconcileError, Reconciler, RunOptions, Silent};

/// Metric: scheduled runs by `result` (`ok`, `refused`, `failed`, `skipped` when
/// another process held the run).
pub const RUNS_TOTAL: &str = "provisioner_reconcile_runs_total";
/// Metric: drift of the last completed run, by `kind`.
pub const DRIFT: &str = "provisioner_reconcile_drift";
/// Metric: duration of the last completed run, seconds.
pub const DURATION_SECONDS: &str = "provisioner_reconcile_duration_seconds";

/// The advisory lock that lets one process of a deployment run the scheduled
/// reconcile at a time.
const SCHEDULE_LOCK: &str = "callmine-provisioner:reconcile";

impl Reconciler {
    /// One scheduled run, unless another process of the deployment is running
    /// one (then `None`): a session advisory lock on its own connection.
    pub async fn run_exclusive(&self) -> Result<Option<Report>, ReconcileError> {
        let mut lock = self.pool.acquire().await?;
        let got: bool = sqlx::query_scalar("select pg_try_advisory_lock(hashtext($1))")
            .bind(SCHEDULE_LOCK)
            .fetch_one(&mut *lock)
            .await?;
        if !got {
            return Ok(None);
        }
        let result = self.run(&RunOptions::default(), &Silent).await;
        let unlocked = sqlx::query("select pg_advisory_unlock(hashtext($1))")
            .bind(SCHEDULE_LOCK)
            .execute(&mut *lock)
            .await;
        if unlocked.is_err() {
            // The connection is suspect: close it, which releases the lock.
            let _ = lock.detach();
        }
        result.map(Some)
    }
}

/// Runs a full reconcile every `every` until `stop`, recording the metrics.
pub async fn scheduled(
    reconciler: Reconciler,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = std::time::Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = reconciler.run_exclusive() => r,
        };
        let label = match &result {
            Ok(None) => "skipped",
            Ok(Some(report)) => {
                metrics::gauge!(DURATION_SECONDS).set(started.elapsed().as_secs_f64());
                let counts = report.counts();
                for kind in DriftKind::ALL {
                    let n = counts.get(&kind).copied().unwrap_or(0);
                    metrics::gauge!(DRIFT, "kind" => kind.as_str()).set(n as f64);
                }
                match &report.refused {
                    Some(refused) => {
                        tracing::warn!(summary = %report.summary(), %refused, "scheduled reconcile refused its removals");
                        "refused"
                    }
                    None => {
                        tracing::info!(summary = %report.summary(), "scheduled reconcile done");
                        "ok"
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "scheduled reconcile failed; next try at the next interval");
                "failed"
            }
        };
        metrics::counter!(RUNS_TOTAL, "result" => label).increment(1);
    }
}

/// Starts [`scheduled`] when `[reconcile] interval_s` is set and the process has a
/// reconciler; says why not otherwise.
pub fn spawn_scheduled(
    reconciler: Option<&Reconciler>,
    interval_s: u64,
    stop: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if interval_s == 0 {
        return None;
    }
    let Some(reconciler) = reconciler else {
        tracing::warn!(
            "[reconcile] interval_s is set but CLERK_SECRET_KEY is not: no scheduled reconcile"
        );
        return None;
    };
    tracing::info!(interval_s, "scheduled reconcile on");
    Some(tokio::spawn(scheduled(
        reconciler.clone(),
        std::time::Duration::from_secs(interval_s),
        stop,
    )))
}
