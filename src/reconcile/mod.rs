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

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;

use crate::clerk::EventType;
use crate::clerk::api::{ClerkApi, ClerkError, Memberships, PAGE_LIMIT, Page};
use crate::progress::{Progress, Silent};
use crate::provision::payload::{self, Decoded, Event, Membership, Organization};
use crate::provision::{Actor, Incoming, Outcome, ProcessError, Provisioner};

mod just_in_time;
mod proof;

pub use just_in_time::{JustInTime, SyncError};
use proof::{Absence, Candidate};

/// Repairs applied per transaction (as the worker's default batch).
const APPLY_BATCH: usize = 32;
/// Batches of repairs applied at once.
const APPLIERS: usize = 8;

/// The kinds of drift (exact strings of the `--json` report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// In Clerk, not here (or removed here by reconcile on inference).
    WorkspaceMissing,
    /// Name, slug, image or plan differ.
    WorkspaceStale,
    /// Active here; Clerk neither lists it nor finds it by id.
    WorkspaceGone,
    /// Deleted here by Clerk, present in Clerk: reported, never repaired.
    WorkspaceConflict,
    /// A membership in Clerk that is not active here.
    MemberMissing,
    /// Active here; Clerk neither lists it nor returns it for its user.
    MemberExtra,
    /// Role or Clerk role differ.
    MemberRole,
    /// Quotas differ from their plan's configured limits.
    QuotasStale,
}

impl DriftKind {
    /// Every kind, in report order.
    pub const ALL: [DriftKind; 8] = [
        DriftKind::WorkspaceMissing,
        DriftKind::WorkspaceStale,
        DriftKind::WorkspaceGone,
        DriftKind::WorkspaceConflict,
        DriftKind::MemberMissing,
        DriftKind::MemberExtra,
        DriftKind::MemberRole,
        DriftKind::QuotasStale,
    ];

    /// The kind's name in reports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::WorkspaceMissing => "workspace_missing",
            DriftKind::WorkspaceStale => "workspace_stale",
            DriftKind::WorkspaceGone => "workspace_gone",
            DriftKind::WorkspaceConflict => "workspace_conflict",
            DriftKind::MemberMissing => "member_missing",
            DriftKind::MemberExtra => "member_extra",
            DriftKind::MemberRole => "member_role",
            DriftKind::QuotasStale => "quotas_stale",
        }
    }

    fn is_removal(self) -> bool {
        matches!(self, DriftKind::WorkspaceGone | DriftKind::MemberExtra)
    }
}

impl fmt::Display for DriftKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One difference between Clerk and this service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Drift {
    /// What kind.
    pub kind: DriftKind,
    /// The workspace (organization id).
    pub workspace_id: String,
    /// The user, for member kinds.
    pub user_id: Option<String>,
    /// What differs, for a human.
    pub detail: String,
}

/// What a run saw, found and did (the `--json` document).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Organizations Clerk listed (each counted once).
    pub organizations_seen: u64,
    /// Memberships Clerk listed (each counted once).
    pub memberships_seen: u64,
    /// Every difference found.
    pub drift: Vec<Drift>,
    /// Repairs that changed the state.
    pub applied: u64,
    /// Set when removals were refused (more than `max_removals` without `--yes`).
    #[serde(skip)]
    pub refused: Option<String>,
    /// Drift already reported (a run may look at an item twice: a scan by offset
    /// can list it twice, and the removal phase re-reads an organization's list).
    #[serde(skip)]
    reported: std::collections::HashSet<Drift>,
}

impl Report {
    /// Drift counts per kind, in report order.
    pub fn counts(&self) -> BTreeMap<DriftKind, u64> {
        let mut counts = BTreeMap::new();
        for d in &self.drift {
            *counts.entry(d.kind).or_default() += 1;
        }
        counts
    }

    /// `seen N organizations, M memberships; drift: …; applied: K`.
    pub fn summary(&self) -> String {
        let counts = self.counts();
        let drift = if counts.is_empty() {
            "none".to_owned()
        } else {
            counts
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "seen {} organizations, {} memberships; drift: {drift}; applied: {}{}",
            self.organizations_seen,
            self.memberships_seen,
            self.applied,
            if self.dry_run { " (dry run)" } else { "" }
        )
    }
}

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

/// A workspace row as the comparison needs it.
#[derive(Debug, sqlx::FromRow)]
struct LocalWorkspace {
    id: String,
    status: String,
    name: Option<String>,
    slug: Option<String>,
    image_url: Option<String>,
    plan: String,
    source_version: Option<i64>,
    /// Deleted by reconcile on inference (not by Clerk): a snapshot restores it.
    deletion_inferred: bool,
    /// When it was deleted (ms), to tell one removal's restore from another's.
    deleted_version: Option<i64>,
}

/// Whether a workspace's deletion was an inference of reconcile (no Clerk
/// deletion), as provisioning records it: the column `deletion_inferred` of
/// `workspaces`. Read through `to_jsonb` so a schema without the column (before
/// provisioning records inferences) reads `false`: every deletion is then final.
const WORKSPACE_DELETION_INFERRED: &str =
    "coalesce((to_jsonb(w) ->> 'deletion_inferred')::boolean, false)";

/// The `removal_reason`s of a real end, one Clerk said happened (a deletion of
/// the membership, its workspace or its user); any other reason is an inference
/// of reconcile (provisioning's `not_in_clerk`), which a snapshot undoes.
const REAL_REMOVAL_REASONS: [&str; 3] = ["membership_deleted", "workspace_deleted", "user_deleted"];

/// A member row as the comparison needs it.
#[derive(Debug, sqlx::FromRow)]
struct LocalMember {
    membership_id: String,
    role: String,
    clerk_role: String,
    removed: bool,
    removal_reason: Option<String>,
    source_version: Option<i64>,
    /// When it ended (ms), to tell one removal's restore from another's.
    removed_ms: Option<i64>,
}

impl LocalMember {
    /// Removed by reconcile on inference, not by Clerk.
    fn removal_inferred(&self) -> bool {
        self.removed
            && self
                .removal_reason
                .as_deref()
                .is_some_and(|r| !REAL_REMOVAL_REASONS.contains(&r))
    }
}

/// One run's findings and the events that repair them.
struct Pass<'a> {
    report: &'a mut Report,
    events: Vec<Prepared>,
    removals: Vec<Incoming>,
    quotas: Vec<String>,
}

impl Pass<'_> {
    fn drift(
        &mut self,
        kind: DriftKind,
        workspace_id: &str,
        user_id: Option<&str>,
        detail: String,
    ) {
        let drift = Drift {
            kind,
            workspace_id: workspace_id.to_owned(),
            user_id: user_id.map(str::to_owned),
            detail,
        };
        if self.report.reported.insert(drift.clone()) {
            self.report.drift.push(drift);
        }
    }
}

/// The envelope of a synthetic event, serialized around the snapshot by reference
/// (a page's objects are not copied to build their repairs).
#[derive(Serialize)]
struct Envelope<'a> {
    object: &'static str,
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: i64,
    data: &'a Value,
}

/// A synthetic Clerk event carrying an API snapshot, applied with actor `reconcile`.
fn synthetic(kind: &str, id_part: &str, data: &Value, timestamp_ms: i64) -> Incoming {
    let body = serde_json::to_vec(&Envelope {
        object: "event",
        kind,
        timestamp: timestamp_ms,
        data,
    })
    .expect("a JSON value serializes");
    Incoming {
        // Deterministic: the same snapshot applied twice is one processing-log row.
        svix_id: format!("reconcile_{id_part}_{timestamp_ms}"),
        kind: Some(EventType::parse(kind)),
        body,
        received_at: Utc::now(),
        actor: Actor::Reconcile,
        replayed_by: None,
    }
}

/// A repair ready to apply: the synthetic event and the snapshot it carries,
/// already decoded (the comparison read it), so it is parsed once. The event's
/// `body` stays empty: [`Provisioner::apply_decoded`] applies the decoding and the
/// processing log keeps no bodies, so serializing a page's objects again would
/// be work nobody reads.
type Prepared = (Incoming, Decoded);

fn prepared(kind: &str, id_part: &str, timestamp_ms: i64, event: Event) -> Prepared {
    let incoming = Incoming {
        svix_id: format!("reconcile_{id_part}_{timestamp_ms}"),
        kind: Some(EventType::parse(kind)),
        body: Vec::new(),
        received_at: Utc::now(),
        actor: Actor::Reconcile,
        replayed_by: None,
    };
    let decoded = Decoded {
        kind: EventType::parse(kind),
        timestamp_ms: Some(timestamp_ms),
        event,
    };
    (incoming, decoded)
}

/// A removal (few per run) decoded from its synthetic body.
fn decode_removal(incoming: Incoming) -> Option<Prepared> {
    match incoming.decode() {
        Ok(decoded) => Some((incoming, decoded)),
        Err(e) => {
            tracing::warn!(event = %incoming.svix_id, error = %e.error, "a removal could not be prepared");
            None
        }
    }
}

fn decode_organization(value: &Value) -> Result<Organization, String> {
    payload::organization_object(value).map_err(|e| e.0)
}

fn decode_membership(value: &Value) -> Result<Membership, String> {
    payload::membership_object(value).map_err(|e| e.0)
}

fn differs(field: &str, here: Option<&str>, clerk: Option<&str>, out: &mut Vec<String>) {
    if here != clerk {
        out.push(format!(
            "{field}: {} here, {} in Clerk",
            here.map_or("none".to_owned(), |s| format!("{s:?}")),
            clerk.map_or("none".to_owned(), |s| format!("{s:?}"))
        ));
    }
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

    /// The read API's just-in-time sync of one organization: like
    /// [`sync_one`](Self::sync_one), but Clerk's 404 removes nothing (the
    /// workspace is left as it is; the caller answers 404).
    pub async fn sync_just_in_time(&self, id: &str) -> Result<(Report, Found), ReconcileError> {
        self.sync_organization_run(id, &RunOptions::default(), Absence::Keep)
            .await
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

    async fn compare_organizations(
        &self,
        values: &[&Value],
        pass: &mut Pass<'_>,
    ) -> Result<(), ReconcileError> {
        let mut organizations = Vec::new();
        for v in values {
            match decode_organization(v) {
                Ok(org) => organizations.push(org),
                Err(e) => {
                    tracing::warn!(organization = %id_of(v), error = %e, "skipping an organization Clerk listed that cannot be read")
                }
            }
        }
        let ids: Vec<&str> = organizations.iter().map(|o| o.id.as_str()).collect();
        let local: HashMap<String, LocalWorkspace> =
            sqlx::query_as::<_, LocalWorkspace>(sqlx::AssertSqlSafe(format!(
                "select id, status, name, slug, image_url, plan, source_version, deleted_version, \
                        {WORKSPACE_DELETION_INFERRED} as deletion_inferred \
                 from workspaces w where id = any($1)"
            )))
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|w| (w.id.clone(), w))
            .collect();
        let quotas: Vec<(String, String, i64)> = sqlx::query_as(
            "select workspace_id, name, limit_value from workspace_quotas where workspace_id = any($1)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut quotas_of: HashMap<String, BTreeMap<String, i64>> = HashMap::new();
        for (workspace, name, limit) in quotas {
            quotas_of.entry(workspace).or_default().insert(name, limit);
        }
        let settings = self.provisioner.settings();
        for org in organizations {
            let Some(here) = local.get(&org.id) else {
                pass.drift(
                    DriftKind::WorkspaceMissing,
                    &org.id,
                    None,
                    format!("{:?} is in Clerk, not here", org.name),
                );
                pass.events.push(prepared(
                    "organization.created",
                    &format!("org_{}", org.id),
                    org.updated_at,
                    Event::OrganizationUpsert(org),
                ));
                continue;
            };
            if here.status != "active" && here.deletion_inferred {
                // Reconcile removed it for want of it in Clerk; Clerk lists it: the
                // snapshot restores it (DESIGN §5). Its own svix id per removal,
                // since the same snapshot may have been applied before it.
                pass.drift(
                    DriftKind::WorkspaceMissing,
                    &org.id,
                    None,
                    "removed here by reconcile on inference, listed by Clerk: restored".into(),
                );
                let id_part = format!(
                    "restore_org_{}_{}",
                    org.id,
                    here.deleted_version.unwrap_or_default()
                );
                pass.events.push(prepared(
                    "organization.updated",
                    &id_part,
                    org.updated_at,
                    Event::OrganizationUpsert(org),
                ));
                continue;
            }
            if here.status != "active" {
                pass.drift(
                    DriftKind::WorkspaceConflict,
                    &org.id,
                    None,
                    "deleted here by Clerk, present in Clerk; a tombstone is final, not repaired"
                        .into(),
                );
                continue;
            }
            // A snapshot older than what a webhook applied is not drift.
            if org.updated_at >= here.source_version.unwrap_or(i64::MIN) {
                let mut what = Vec::new();
                differs("name", here.name.as_deref(), Some(&org.name), &mut what);
                differs("slug", here.slug.as_deref(), org.slug.as_deref(), &mut what);
                differs(
                    "image_url",
                    here.image_url.as_deref(),
                    org.image_url.as_deref(),
                    &mut what,
                );
                // An unknown plan name keeps the plan (DESIGN §5), so it is no drift.
                let plan = match org.requested_plan.as_deref() {
                    Some(p) if !settings.plans.contains_key(p) => here.plan.as_str(),
                    requested => settings.plan_for(requested),
                };
                differs("plan", Some(&here.plan), Some(plan), &mut what);
                if !what.is_empty() {
                    pass.drift(DriftKind::WorkspaceStale, &org.id, None, what.join("; "));
                    pass.events.push(prepared(
                        "organization.updated",
                        &format!("org_{}", org.id),
                        org.updated_at,
                        Event::OrganizationUpsert(org),
                    ));
                    // The update re-derives the quotas if the plan changes.
                    continue;
                }
            }
            let expected: BTreeMap<String, i64> = settings
                .plans
                .get(&here.plan)
                .map(|q| q.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default();
            let actual = quotas_of.remove(&org.id).unwrap_or_default();
            if actual != expected {
                let what: Vec<String> = expected
                    .iter()
                    .filter(|(k, v)| actual.get(*k) != Some(v))
                    .map(|(k, v)| {
                        format!(
                            "{k}: {} here, {v} in plan {}",
                            actual.get(k).map_or("none".into(), |a| a.to_string()),
                            here.plan
                        )
                    })
                    .chain(
                        actual
                            .keys()
                            .filter(|k| !expected.contains_key(*k))
                            .map(|k| format!("{k}: not in plan {}", here.plan)),
                    )
                    .collect();
                pass.drift(DriftKind::QuotasStale, &org.id, None, what.join("; "));
                pass.quotas.push(org.id.clone());
            }
        }
        Ok(())
    }

    async fn compare_memberships(
        &self,
        values: &[&Value],
        pass: &mut Pass<'_>,
    ) -> Result<(), ReconcileError> {
        let mut memberships = Vec::new();
        for v in values {
            match decode_membership(v) {
                Ok(m) => memberships.push(m),
                Err(e) => {
                    tracing::warn!(membership = %id_of(v), error = %e, "skipping a membership Clerk listed that cannot be read")
                }
            }
        }
        let ids: Vec<&str> = memberships.iter().map(|m| m.id.as_str()).collect();
        let workspaces: Vec<&str> = memberships
            .iter()
            .map(|m| m.organization.id.as_str())
            .collect();
        let local: HashMap<String, LocalMember> = sqlx::query_as::<_, LocalMember>(
            "select membership_id, role, clerk_role, removed_at is not null as removed, \
                    removal_reason, source_version, \
                    (extract(epoch from removed_at) * 1000)::bigint as removed_ms \
             from members where membership_id = any($1)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|m| (m.membership_id.clone(), m))
        .collect();
        // Workspaces Clerk deleted (an inferred deletion is undone by the
        // organization's snapshot, so its members are compared as usual).
        let deleted: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select id from workspaces w where id = any($1) and status <> 'active' \
               and not {WORKSPACE_DELETION_INFERRED}"
        )))
        .bind(&workspaces)
        .fetch_all(&self.pool)
        .await?;
        let settings = self.provisioner.settings();
        for m in memberships {
            let ws = m.organization.id.as_str();
            let user = m.user.user_id.as_str();
            if deleted.iter().any(|d| d == ws) {
                // Reported as workspace_conflict with its organization.
                continue;
            }
            let upsert = |kind: &str| {
                prepared(
                    kind,
                    &format!("mem_{}", m.id),
                    m.updated_at,
                    Event::MembershipUpsert(m.clone()),
                )
            };
            match local.get(&m.id) {
                None => {
                    pass.drift(
                        DriftKind::MemberMissing,
                        ws,
                        Some(user),
                        format!("{} ({}) is in Clerk, not here", m.id, m.role),
                    );
                    pass.events.push(upsert("organizationMembership.created"));
                }
                Some(here) if here.removal_inferred() => {
                    pass.drift(
                        DriftKind::MemberMissing,
                        ws,
                        Some(user),
                        format!(
                            "{} was removed here by reconcile on inference ({}), listed by Clerk: restored",
                            m.id,
                            here.removal_reason.as_deref().unwrap_or("removed")
                        ),
                    );
                    // Its own svix id per removal: the same snapshot may have been
                    // applied before the removal.
                    let id_part = format!(
                        "restore_mem_{}_{}",
                        m.id,
                        here.removed_ms.unwrap_or_default()
                    );
                    pass.events.push(prepared(
                        "organizationMembership.updated",
                        &id_part,
                        m.updated_at,
                        Event::MembershipUpsert(m.clone()),
                    ));
                }
                Some(here) if here.removed => {
                    pass.drift(
                        DriftKind::MemberMissing,
                        ws,
                        Some(user),
                        format!(
                            "{} is removed here ({}), listed by Clerk; a removal is final, not repaired",
                            m.id,
                            here.removal_reason.as_deref().unwrap_or("removed")
                        ),
                    );
                }
                Some(here) => {
                    let role = settings.role_for(&m.role).as_str();
                    if (here.role.as_str(), here.clerk_role.as_str()) != (role, m.role.as_str())
                        && m.updated_at >= here.source_version.unwrap_or(i64::MIN)
                    {
                        pass.drift(
                            DriftKind::MemberRole,
                            ws,
                            Some(user),
                            format!(
                                "{}: {} ({}) here, {role} ({}) in Clerk",
                                m.id, here.role, here.clerk_role, m.role
                            ),
                        );
                        pass.events.push(upsert("organizationMembership.updated"));
                    }
                }
            }
        }
        Ok(())
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

    /// Applies a pass's repairs (unless a dry run); removals only when `removals`
    /// (at the end of a run, once they are all known) and within the budget.
    async fn finish(
        &self,
        pass: Pass<'_>,
        opts: &RunOptions,
        removals: bool,
    ) -> Result<(), ReconcileError> {
        let Pass {
            report,
            events,
            removals: removal_events,
            quotas,
        } = pass;
        if opts.dry_run {
            return Ok(());
        }
        report.applied += self.apply(events).await?;
        for workspace in quotas {
            if self
                .provisioner
                .refresh_quotas(&self.pool, &workspace, Actor::Reconcile)
                .await?
            {
                report.applied += 1;
            }
        }
        if removals && !removal_events.is_empty() {
            let count = report.drift.iter().filter(|d| d.kind.is_removal()).count();
            if count > self.max_removals as usize && !opts.yes {
                report.refused = Some(format!(
                    "{count} removals exceed [reconcile] max_removals = {}; none applied (run again with --yes to apply them)",
                    self.max_removals
                ));
                return Ok(());
            }
            let removal_events: Vec<Prepared> = removal_events
                .into_iter()
                .filter_map(decode_removal)
                .collect();
            report.applied += self.apply(removal_events).await?;
        }
        Ok(())
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

    /// Applies one job of a [`Pipeline`]; what it changed.
    async fn apply_job(&self, job: Job) -> Result<u64, ReconcileError> {
        match job {
            Job::Events(events) => self.apply_events(events).await,
            Job::Quotas(workspace) => Ok(u64::from(
                self.provisioner
                    .refresh_quotas(&self.pool, &workspace, Actor::Reconcile)
                    .await?,
            )),
        }
    }

    /// Applies repairs as the worker would, in batches of at most [`APPLY_BATCH`],
    /// up to [`APPLIERS`] jobs of [`batches`] at once (each batch takes its advisory
    /// locks in the global order, so concurrent batches never deadlock).
    async fn apply(&self, events: Vec<Prepared>) -> Result<u64, ReconcileError> {
        use futures_util::StreamExt;
        let mut jobs = futures_util::stream::iter(batches(events))
            .map(|job| self.apply_events(job))
            .buffer_unordered(APPLIERS);
        let mut applied = 0;
        while let Some(result) = jobs.next().await {
            applied += result?;
        }
        Ok(applied)
    }

    /// Applies one job of [`batches`]: its batches in turn, one transaction each.
    async fn apply_events(&self, events: Vec<Prepared>) -> Result<u64, ReconcileError> {
        let mut applied = 0;
        for chunk in events.chunks(APPLY_BATCH) {
            let ready: Vec<(&Incoming, &Decoded)> = chunk.iter().map(|(i, d)| (i, d)).collect();
            let outcomes = self.provisioner.apply_decoded(&self.pool, &ready).await;
            for ((event, _), result) in chunk.iter().zip(outcomes) {
                match result {
                    Ok(Outcome::Processed) => applied += 1,
                    Ok(_) => {}
                    Err(ProcessError::Database(e)) => return Err(e.into()),
                    Err(ProcessError::Payload(e)) => {
                        tracing::warn!(event = %event.svix_id, error = %e, "a repair could not be applied");
                    }
                }
            }
        }
        Ok(applied)
    }
}

/// Cuts repairs into the appliers' jobs: batches of up to [`APPLY_BATCH`] that
/// never split one workspace's repairs, so batches applied at once do not queue on
/// each other's workspace lock (Clerk lists a workspace's memberships side by side
/// or scattered; either way, cut by position, neighbouring batches would share
/// workspaces and run one after the other). A workspace with [`APPLY_BATCH`]
/// repairs or more is a job of its own, whose batches are applied in turn. The
/// repairs of one workspace keep their order.
fn batches(mut events: Vec<Prepared>) -> Vec<Vec<Prepared>> {
    // Stable: the order within a workspace is kept.
    events.sort_by(|a, b| a.1.workspace_id().cmp(&b.1.workspace_id()));
    let mut jobs = Vec::new();
    let mut current: Vec<Prepared> = Vec::new();
    let mut events = events.into_iter().peekable();
    while let Some(first) = events.next() {
        let workspace = first.1.workspace_id().map(str::to_owned);
        let mut group = vec![first];
        while let Some(next) = events.next_if(|e| e.1.workspace_id() == workspace.as_deref()) {
            group.push(next);
        }
        if !current.is_empty() && current.len() + group.len() > APPLY_BATCH {
            jobs.push(std::mem::take(&mut current));
        }
        if group.len() >= APPLY_BATCH {
            jobs.push(group);
        } else {
            current.extend(group);
        }
    }
    if !current.is_empty() {
        jobs.push(current);
    }
    jobs
}

/// A page's repairs, owned, to apply in the background.
struct Repairs {
    events: Vec<Prepared>,
    quotas: Vec<String>,
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

/// A unit of work of the appliers: one batch of events, or one quota refresh.
enum Job {
    Events(Vec<Prepared>),
    Quotas(String),
}

/// [`APPLIERS`] tasks applying repairs as the scan hands them over, so a page's
/// last batches never leave the others idle while the next page is compared.
struct Pipeline {
    jobs: tokio::sync::mpsc::Sender<Job>,
    appliers: tokio::task::JoinSet<Result<u64, ReconcileError>>,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Pipeline {
    fn start(reconciler: &Reconciler) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let (jobs, queue) = tokio::sync::mpsc::channel::<Job>(APPLIERS * 2);
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        let failed = Arc::new(AtomicBool::new(false));
        let mut appliers = tokio::task::JoinSet::new();
        for _ in 0..APPLIERS {
            let me = reconciler.clone();
            let queue = queue.clone();
            let failed = failed.clone();
            appliers.spawn(async move {
                let mut applied = 0;
                loop {
                    let job = queue.lock().await.recv().await;
                    let Some(job) = job else { break };
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    match me.apply_job(job).await {
                        Ok(n) => applied += n,
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                }
                Ok(applied)
            });
        }
        Pipeline {
            jobs,
            appliers,
            failed,
        }
    }

    /// Hands a page's repairs to the appliers, as the jobs of [`batches`]
    /// (waits while they are all busy and the queue is full). An applier's
    /// failure ends the run with its error.
    async fn submit(&mut self, repairs: Repairs) -> Result<(), ReconcileError> {
        let jobs = batches(repairs.events).into_iter().map(Job::Events);
        for job in jobs.chain(repairs.quotas.into_iter().map(Job::Quotas)) {
            if self.failed.load(std::sync::atomic::Ordering::Relaxed)
                || self.jobs.send(job).await.is_err()
            {
                return self.fail().await;
            }
        }
        Ok(())
    }

    /// Waits for every job handed over; what they changed in all.
    async fn finish(self) -> Result<u64, ReconcileError> {
        let Pipeline {
            jobs, mut appliers, ..
        } = self;
        drop(jobs);
        let mut applied = 0;
        let mut first_error = None;
        while let Some(joined) = appliers.join_next().await {
            match joined {
                Ok(Ok(n)) => applied += n,
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(applied),
        }
    }

    /// An applier failed: stop the others and return its error.
    async fn fail(&mut self) -> Result<(), ReconcileError> {
        let (closed, _) = tokio::sync::mpsc::channel(1);
        let pipeline = std::mem::replace(
            self,
            Pipeline {
                jobs: closed,
                appliers: tokio::task::JoinSet::new(),
                failed: self.failed.clone(),
            },
        );
        match pipeline.finish().await {
            Err(e) => Err(e),
            Ok(_) => unreachable!("the appliers stop before the end only on an error"),
        }
    }
}

impl<'a> Pass<'a> {
    /// The repairs of a page pass (which never finds removals: those are proved
    /// at the end of a run).
    fn into_repairs(self) -> Repairs {
        debug_assert!(self.removals.is_empty());
        Repairs {
            events: self.events,
            quotas: self.quotas,
        }
    }

    fn new(report: &'a mut Report) -> Self {
        Self {
            report,
            events: Vec::new(),
            removals: Vec::new(),
            quotas: Vec::new(),
        }
    }
}

fn id_of(value: &Value) -> String {
    id_str(value).to_owned()
}

fn id_str(value: &Value) -> &str {
    value["id"].as_str().unwrap_or_default()
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clerk::sample as make;

    fn repair(workspace: &str, n: usize) -> Prepared {
        let org = make::organization(workspace, "Org", "user_creator", 1, 1, 1);
        let value = make::membership(
            &format!("orgmem_{workspace}_{n}"),
            org,
            &make::Person::of(&format!("user_{workspace}_{n}")),
            "org:member",
            2,
            2,
        );
        let m = decode_membership(&value).expect("a membership");
        prepared(
            "organizationMembership.created",
            &format!("mem_{}", m.id),
            2,
            Event::MembershipUpsert(m),
        )
    }

    /// The membership ids of a job, with their workspaces.
    fn ids(job: &[Prepared]) -> Vec<(String, String)> {
        job.iter()
            .map(|(_, d)| match &d.event {
                Event::MembershipUpsert(m) => (m.organization.id.clone(), m.id.clone()),
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn batches_never_split_a_workspace_and_keep_its_order() {
        // Scattered, as an instance-wide list by creation time gives them, and in
        // runs that straddle any cut by position: 7 × 5 memberships side by side,
        // then one workspace of 40 interleaved with one of 3.
        let mut events = Vec::new();
        for w in 0..7 {
            for n in 0..5 {
                events.push(repair(&format!("org_side{w}"), n));
            }
        }
        for n in 0..40 {
            events.push(repair("org_big", n));
            if n < 3 {
                events.push(repair("org_small", n));
            }
        }
        let all = events.len();
        let jobs = batches(events);

        let mut seen = std::collections::HashSet::new();
        let mut job_of: HashMap<String, usize> = HashMap::new();
        for (j, job) in jobs.iter().enumerate() {
            let ids = ids(job);
            let workspaces: std::collections::BTreeSet<&String> =
                ids.iter().map(|(w, _)| w).collect();
            assert!(
                job.len() <= APPLY_BATCH || workspaces.len() == 1,
                "job {j} has {} repairs of {} workspaces",
                job.len(),
                workspaces.len()
            );
            let mut last: HashMap<&String, usize> = HashMap::new();
            for (w, id) in &ids {
                let n: usize = id.rsplit('_').next().unwrap().parse().unwrap();
                if let Some(prev) = last.insert(w, n) {
                    assert!(prev < n, "{w}: {id} after number {prev}");
                }
                assert!(seen.insert(id.clone()), "{id} twice");
                if let Some(other) = job_of.insert(w.clone(), j) {
                    assert_eq!(other, j, "{w} is split between jobs {other} and {j}");
                }
            }
        }
        assert_eq!(seen.len(), all, "every repair is in a job");
        let big = &jobs[job_of["org_big"]];
        assert_eq!(
            big.len(),
            40,
            "a workspace of 40 repairs is a job of its own"
        );
    }
}
