//! The read API's just-in-time sync (`POST /v1/workspaces/{id}/sync`) and the ops
//! console's sync: one organization from Clerk now, provisioned as a webhook
//! would be.
//!
//! Guarantees:
//! - A sync runs to its end (or fails) in a task of its own, whatever happens to
//!   the requests waiting for it: a client that gives up never leaves a
//!   transaction half-done, holding its workspace's lock and a pooled connection.
//! - Concurrent syncs of one workspace share one run; the run's entry in the map
//!   of runs in flight is removed by the run itself when it ends, awaited or not,
//!   so the next sync of that workspace starts afresh.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::proof::Absence;
use super::{Found, ReconcileError, Reconciler, Report, RunOptions};
use crate::clerk::api::ClerkError;

/// Why a just-in-time sync failed (cloneable: concurrent callers share one).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SyncError {
    /// No `CLERK_SECRET_KEY`.
    #[error("CLERK_SECRET_KEY is not set: this process cannot sync from Clerk")]
    NotConfigured,
    /// Clerk refused, failed or could not be reached.
    #[error("{0}")]
    Clerk(String),
    /// `CLERK_SECRET_KEY` belongs to another instance than `CLERK_INSTANCE_ID`:
    /// nothing is compared or repaired until the settings agree.
    #[error("{0}")]
    Misconfigured(String),
    /// PostgreSQL failed; `unavailable` when it is down rather than wrong.
    #[error("database error: {message}")]
    Database {
        /// The error, for the log.
        message: String,
        /// [`crate::db::DbFault::Unreachable`].
        unavailable: bool,
    },
}

/// The sync's view of a failed run.
impl From<ReconcileError> for SyncError {
    fn from(e: ReconcileError) -> Self {
        match e {
            ReconcileError::Clerk(ClerkError::NotConfigured) => SyncError::NotConfigured,
            ReconcileError::Clerk(e @ ClerkError::WrongInstance { .. }) => {
                SyncError::Misconfigured(e.to_string())
            }
            ReconcileError::Clerk(e) => SyncError::Clerk(e.to_string()),
            ReconcileError::Database(e) => SyncError::Database {
                unavailable: crate::db::fault(&e) == crate::db::DbFault::Unreachable,
                message: e.to_string(),
            },
        }
    }
}

type SharedSync = Shared<BoxFuture<'static, Result<Found, SyncError>>>;

/// A run in flight: its result, shared by every caller, and which run it is (so
/// a run that ends removes its own entry, never a later run's).
struct InFlight {
    run: u64,
    result: SharedSync,
}

/// The read API's just-in-time sync: one organization from Clerk now, provisioned
/// like a webhook would; concurrent syncs of one workspace share one run.
#[derive(Clone)]
pub struct JustInTime {
    reconciler: Option<Reconciler>,
    inflight: Arc<Mutex<HashMap<String, InFlight>>>,
    runs: Arc<AtomicU64>,
}

impl fmt::Debug for JustInTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JustInTime")
            .field("configured", &self.reconciler.is_some())
            .finish()
    }
}

impl JustInTime {
    /// A sync service; `None` when the process has no `CLERK_SECRET_KEY`.
    pub fn new(reconciler: Option<Reconciler>) -> Self {
        Self {
            reconciler,
            inflight: Default::default(),
            runs: Default::default(),
        }
    }

    /// Fetches the organization `id` and its memberships and provisions them
    /// (actor `reconcile`, same gates and proofs as a run). The run is a task of
    /// its own: dropping this future (a client that gave up) leaves it running
    /// to its end.
    pub async fn sync(&self, id: &str) -> Result<Found, SyncError> {
        let Some(reconciler) = self.reconciler.clone() else {
            return Err(SyncError::NotConfigured);
        };
        let result = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(id) {
                Some(running) => running.result.clone(),
                None => {
                    let run = self.runs.fetch_add(1, Ordering::Relaxed);
                    // Spawned while the map is locked: the task's own removal
                    // (below) waits for the entry to be in place.
                    let task = tokio::spawn(run_sync(
                        reconciler,
                        id.to_owned(),
                        run,
                        self.inflight.clone(),
                    ));
                    let result = async move {
                        task.await.unwrap_or_else(|e| {
                            // The task panicked (or the runtime is shutting down).
                            Err(SyncError::Database {
                                message: format!("the sync task ended abnormally: {e}"),
                                unavailable: false,
                            })
                        })
                    }
                    .boxed()
                    .shared();
                    inflight.insert(
                        id.to_owned(),
                        InFlight {
                            run,
                            result: result.clone(),
                        },
                    );
                    result
                }
            }
        };
        result.await
    }

    /// Like [`sync`](Self::sync), but hands back the run's report (the drift found
    /// and the repairs applied) for the ops console to show; not shared with
    /// concurrent syncs of the same workspace. It too runs in a task of its own,
    /// to its end whatever happens to the request.
    pub async fn sync_report(&self, id: &str) -> Result<(Report, Found), SyncError> {
        let Some(reconciler) = self.reconciler.clone() else {
            return Err(SyncError::NotConfigured);
        };
        let id = id.to_owned();
        let task =
            tokio::spawn(async move { reconciler.sync_one(&id, &RunOptions::default()).await });
        match task.await {
            Ok(result) => Ok(result?),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(SyncError::Database {
                message: format!("the sync task ended abnormally: {e}"),
                unavailable: false,
            }),
        }
    }

    /// The process's reconciler, when configured.
    pub fn reconciler(&self) -> Option<&Reconciler> {
        self.reconciler.as_ref()
    }
}

/// One just-in-time run of `id`, as a task: syncs and logs; its entry in
/// `inflight` goes when it ends (whether or not anyone still waits for it, and
/// also if it panics).
async fn run_sync(
    reconciler: Reconciler,
    id: String,
    run: u64,
    inflight: Arc<Mutex<HashMap<String, InFlight>>>,
) -> Result<Found, SyncError> {
    let _entry = Entry {
        inflight,
        id: id.clone(),
        run,
    };
    match reconciler.sync_just_in_time(&id).await {
        Ok((report, found)) => {
            if let Some(refused) = &report.refused {
                tracing::warn!(workspace_id = %id, %refused, "sync left removals undone");
            }
            tracing::info!(workspace_id = %id, summary = %report.summary(), "synced from Clerk");
            Ok(found)
        }
        Err(e) => Err(SyncError::from(e)),
    }
}

/// A run's entry in the map of runs in flight, removed when the run's task ends.
struct Entry {
    inflight: Arc<Mutex<HashMap<String, InFlight>>>,
    id: String,
    run: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if inflight.get(&self.id).is_some_and(|e| e.run == self.run) {
            inflight.remove(&self.id);
        }
    }
}

impl Reconciler {
    /// The read API's just-in-time sync of one organization: like
    /// [`sync_one`](Self::sync_one), but Clerk's 404 removes nothing (the
    /// workspace is left as it is; the caller answers 404).
    pub async fn sync_just_in_time(&self, id: &str) -> Result<(Report, Found), ReconcileError> {
        self.sync_organization_run(id, &RunOptions::default(), Absence::Keep)
            .await
    }
}
