//! Reconciliation with Clerk's Backend API: backfill, drift report and repair,
//! and the sync of one workspace (for `reconcile --org`, the ops console and the
//! read API's just-in-time sync).
//!
//! Guarantees:
//! - Repairs go through provisioning ([`Provisioner::apply_batch`]) as synthetic
//!   Clerk events with actor `reconcile`, so the version gates and tombstones of
//!   DESIGN §5 hold: a snapshot older than what a webhook applied never overwrites
//!   it, and a workspace Clerk deleted is reported (`workspace_conflict`), never
//!   revived.
//! - Before anything is compared, the key's instance is checked against
//!   `CLERK_INSTANCE_ID` (when set).
//! - Deletions need proof (`reconcile/proof.rs`): absence from a listing paged
//!   by offset, or one 404, is not proof. The just-in-time sync never removes a
//!   workspace.
//! - What reconcile removed on inference is not a tombstone: when Clerk lists the
//!   membership or organization again, its snapshot is sent (with a svix id of
//!   its own) and provisioning restores it.
//! - More than `max_removals` removals in one run are refused without `--yes`.
//! - Memory is bounded by a page: what the scan saw is kept in temporary tables
//!   and compared with anti-joins.
//! - `dry_run` writes nothing anywhere (the temporary tables vanish with the
//!   connection).

mod compare;
mod just_in_time;
mod proof;
mod repair;
mod report;
mod scheduled;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;

use crate::clerk::api::{ClerkApi, ClerkError, Memberships, PAGE_LIMIT, Page};
use crate::progress::{Progress, Silent};
use crate::provision::Provisioner;
use compare::{id_of, id_str};
use proof::{Absence, Candidate};
use repair::{Pass, Pipeline};

pub use just_in_time::{JustInTime, SyncError};
pub use report::{Drift, DriftKind, Report};
pub use scheduled::{DRIFT, DURATION_SECONDS, RUNS_TOTAL, scheduled, spawn_scheduled};

/// How a run goes.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Report only.
    pub dry_run: bool,
    /// Allow more than `max_removals` removals.
    pub yes: bool,
}

/// What a sync of one workspace found in Clerk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Clerk has the organization; it is provisioned (unless a dry run).
    Present,
    /// Clerk answered 404 (for `reconcile --org`, and lists no such organization
    /// either: then a workspace active here is removed; the just-in-time sync
    /// removes nothing).
    Gone,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Clerk refused, failed or could not be reached.
    #[error(transparent)]
    Clerk(#[from] ClerkError),
    /// PostgreSQL failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Compares Clerk with the database and repairs the difference.
#[derive(Debug, Clone)]
pub struct Reconciler {
    api: ClerkApi,
    provisioner: Provisioner,
    pool: PgPool,
    max_removals: u32,
}

impl Reconciler {
    /// A reconciler over this client, provisioning and database.
    pub fn new(api: ClerkApi, provisioner: Provisioner, pool: PgPool, max_removals: u32) -> Self {
        Self {
            api,
            provisioner,
            pool,
            max_removals,
        }
    }

    /// A full run over every organization and membership of the instance.
    pub async fn run(
        &self,
        opts: &RunOptions,
        progress: &dyn Progress,
    ) -> Result<Report, ReconcileError> {
        // Before anything is compared: a key of another instance would make every
        // organization look gone.
        self.api.check_instance().await?;
        let mut report = Report {
            dry_run: opts.dry_run,
            ..Report::default()
        };
        let clock = std::time::Instant::now();
        let mut conn = self.pool.acquire().await?;
        for table in ["reconcile_seen_orgs", "reconcile_seen_members"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "create temporary table if not exists {table} (id text primary key)"
            )))
            .execute(&mut *conn)
            .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("truncate {table}")))
                .execute(&mut *conn)
                .await?;
        }
        let started: DateTime<Utc> = sqlx::query_scalar("select now()")
            .fetch_one(&mut *conn)
            .await?;

        // Organizations, then memberships, page by page. Each page's repairs go to
        // a pipeline of appliers that keeps working while the next page is fetched
        // and compared; the next page is fetched while this one is compared. Pages
        // hold different organizations, and different memberships, so their order
        // does not matter within a phase; every organization is in place before
        // any membership is applied.
        for phase in [Phase::Organizations, Phase::Memberships] {
            let mut pipeline = (!opts.dry_run).then(|| Pipeline::start(self));
            let mut next = Some(self.prefetch(phase, 0));
            let mut offset = 0u64;
            let mut first = true;
            while let Some(fetch) = next.take() {
                let page = match fetch.await {
                    Ok(page) => page?,
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                };
                if first {
                    progress.phase(phase.name(), Some(page.total_count));
                    first = false;
                }
                offset += page.data.len() as u64;
                if !(page.data.is_empty() || offset >= page.total_count) {
                    next = Some(self.prefetch(phase, offset));
                }
                let table = phase.seen_table();
                let new = self.note_seen(&mut conn, table, &page).await?;
                let new: std::collections::HashSet<String> = new.into_iter().collect();
                let fresh: Vec<&Value> = page
                    .data
                    .iter()
                    .filter(|v| new.contains(id_str(v)))
                    .collect();
                let mut pass = Pass::new(&mut report);
                match phase {
                    Phase::Organizations => {
                        pass.report.organizations_seen += new.len() as u64;
                        self.compare_organizations(&fresh, &mut pass).await?;
                    }
                    Phase::Memberships => {
                        pass.report.memberships_seen += new.len() as u64;
                        self.compare_memberships(&fresh, &mut pass).await?;
                    }
                }
                let repairs = pass.into_repairs();
                if let Some(pipeline) = pipeline.as_mut() {
                    pipeline.submit(repairs).await?;
                }
                progress.advance(page.data.len() as u64);
            }
            if let Some(pipeline) = pipeline {
                report.applied += pipeline.finish().await?;
            }
            tracing::debug!(
                phase = phase.name(),
                elapsed_ms = clock.elapsed().as_millis(),
                "reconcile phase done"
            );
        }

        // What is active here and the scan did not see: prove it gone, or compare it.
        progress.phase("removals", None);
        let mut pass = Pass::new(&mut report);
        let mut after = String::new();
        loop {
            let ids: Vec<String> = sqlx::query_scalar(
                "select w.id from workspaces w \
                 where w.status = 'active' and w.id > $1 \
                   and not exists (select 1 from reconcile_seen_orgs s where s.id = w.id) \
                 order by w.id limit 500",
            )
            .bind(&after)
            .fetch_all(&mut *conn)
            .await?;
            let Some(last) = ids.last() else { break };
            after = last.clone();
            for id in ids {
                // Absent from the complete scan: a 404 by id completes the proof.
                self.sync_organization(&id, started, Absence::Unlisted, &mut pass)
                    .await?;
                progress.advance(1);
            }
        }
        let mut after = String::new();
        loop {
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "select m.workspace_id, m.membership_id, m.user_id from members m \
                 join reconcile_seen_orgs s on s.id = m.workspace_id \
                 where m.removed_at is null and m.updated_at < $1 and m.membership_id > $2 \
                   and not exists (select 1 from reconcile_seen_members x where x.id = m.membership_id) \
                 order by m.membership_id limit 500",
            )
            .bind(started)
            .bind(&after)
            .fetch_all(&mut *conn)
            .await?;
            let Some((_, last, _)) = rows.last() else {
                break;
            };
            after = last.clone();
            let mut by_workspace: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
            for (workspace, membership_id, user_id) in rows {
                by_workspace.entry(workspace).or_default().push(Candidate {
                    membership_id,
                    user_id,
                });
            }
            for (workspace, candidates) in by_workspace {
                // The scan (by offset) missed them, which proves nothing: Clerk is
                // asked about each by its user.
                self.remove_unless_found(&workspace, candidates, &mut pass)
                    .await?;
                progress.advance(1);
            }
        }
        self.finish(pass, opts, true).await?;
        tracing::debug!(
            phase = "removals",
            elapsed_ms = clock.elapsed().as_millis(),
            "reconcile phase done"
        );
        drop(conn);
        Ok(report)
    }

    /// Syncs one organization and its memberships (`reconcile --org`, and the ops
    /// console's sync): a workspace is removed only when Clerk neither lists its
    /// organization nor finds it by id.
    pub async fn sync_one(
        &self,
        id: &str,
        opts: &RunOptions,
    ) -> Result<(Report, Found), ReconcileError> {
        self.sync_organization_run(id, opts, Absence::Confirm).await
    }

    async fn sync_organization_run(
        &self,
        id: &str,
        opts: &RunOptions,
        absence: Absence,
    ) -> Result<(Report, Found), ReconcileError> {
        self.api.check_instance().await?;
        let mut report = Report {
            dry_run: opts.dry_run,
            ..Report::default()
        };
        let started: DateTime<Utc> = sqlx::query_scalar("select now()")
            .fetch_one(&self.pool)
            .await?;
        let mut pass = Pass::new(&mut report);
        let found = self
            .sync_organization(id, started, absence, &mut pass)
            .await?;
        self.finish(pass, opts, true).await?;
        Ok((report, found))
    }

    /// Records the ids of a page in a temporary table; returns those not seen before
    /// (a scan by offset can list an item twice).
    async fn note_seen(
        &self,
        conn: &mut PoolConnection<Postgres>,
        table: &str,
        page: &Page,
    ) -> Result<Vec<String>, ReconcileError> {
        let ids: Vec<String> = page.data.iter().map(id_of).collect();
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "insert into {table} (id) select unnest($1::text[]) on conflict do nothing returning id"
        )))
        .bind(&ids)
        .fetch_all(&mut **conn)
        .await?)
    }

    /// Starts fetching a page of `phase` in the background.
    fn prefetch(
        &self,
        phase: Phase,
        offset: u64,
    ) -> tokio::task::JoinHandle<Result<Page, ReconcileError>> {
        let api = self.api.clone();
        tokio::spawn(async move {
            Ok(match phase {
                Phase::Organizations => api.organizations(offset, PAGE_LIMIT).await?,
                Phase::Memberships => api
                    .memberships(Memberships::All, offset, PAGE_LIMIT)
                    .await?
                    .unwrap_or(Page {
                        data: Vec::new(),
                        total_count: 0,
                    }),
            })
        })
    }
}

/// The two scans of a full run.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Organizations,
    Memberships,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Organizations => "organizations",
            Phase::Memberships => "memberships",
        }
    }

    fn seen_table(self) -> &'static str {
        match self {
            Phase::Organizations => "reconcile_seen_orgs",
            Phase::Memberships => "reconcile_seen_members",
        }
    }
}
