//! Repairs: the synthetic Clerk events that answer drift, and the pipeline that
//! applies them through provisioning.
//!
//! Guarantee: every repair goes through provisioning
//! ([`Provisioner::apply_decoded`](crate::provision::Provisioner::apply_decoded))
//! with actor `reconcile`, so its version gates and tombstones hold; batches
//! applied at once never share a workspace, and one workspace's repairs keep
//! their order; removals are applied only within `max_removals` or with `--yes`,
//! and a dry run applies nothing.

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use super::report::{Drift, DriftKind, Report};
use super::{ReconcileError, Reconciler, RunOptions};
use crate::clerk::EventType;
use crate::provision::payload::{Decoded, Event};
use crate::provision::{Actor, Incoming, Outcome, ProcessError, ReadyEvent};

/// Repairs applied per transaction (as the worker's default batch).
const APPLY_BATCH: usize = 32;
/// Batches of repairs applied at once.
const APPLIERS: usize = 8;

/// One run's findings and the events that repair them.
pub(super) struct Pass<'a> {
    pub(super) report: &'a mut Report,
    pub(super) events: Vec<Repair>,
    pub(super) removals: Vec<Incoming>,
    pub(super) quotas: Vec<String>,
}

impl Pass<'_> {
    /// Reports a difference (once per run).
    pub(super) fn drift(
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

impl<'a> Pass<'a> {
    /// The repairs of a page pass (which never finds removals: those are proved
    /// at the end of a run).
    pub(super) fn into_repairs(self) -> PageRepairs {
        debug_assert!(self.removals.is_empty());
        PageRepairs {
            events: self.events,
            quotas: self.quotas,
        }
    }

    /// A pass that reports into `report`.
    pub(super) fn new(report: &'a mut Report) -> Self {
        Self {
            report,
            events: Vec::new(),
            removals: Vec::new(),
            quotas: Vec::new(),
        }
    }
}

/// The envelope of a synthetic event, serialized around the snapshot by reference
/// (a page's objects are not copied to build their repairs).
#[derive(Serialize)]
struct SyntheticEnvelope<'a> {
    object: &'static str,
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: i64,
    data: &'a Value,
}

/// A synthetic Clerk event carrying an API snapshot, applied with actor `reconcile`.
pub(super) fn synthetic(kind: &str, id_part: &str, data: &Value, timestamp_ms: i64) -> Incoming {
    let body = serde_json::to_vec(&SyntheticEnvelope {
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
///
/// [`Provisioner::apply_decoded`]: crate::provision::Provisioner::apply_decoded
pub(super) struct Repair {
    /// The synthetic message (its `body` empty unless it was decoded from one).
    pub(super) incoming: Incoming,
    /// The snapshot it carries, decoded.
    pub(super) decoded: Decoded,
}

/// A repair carrying `event`, with its synthetic svix id.
pub(super) fn prepared(kind: &str, id_part: &str, timestamp_ms: i64, event: Event) -> Repair {
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
    Repair { incoming, decoded }
}

/// A removal (few per run) decoded from its synthetic body.
fn decode_removal(incoming: Incoming) -> Option<Repair> {
    match incoming.decode() {
        Ok(decoded) => Some(Repair { incoming, decoded }),
        Err(e) => {
            tracing::warn!(event = %incoming.svix_id, error = %e.error, "a removal could not be prepared");
            None
        }
    }
}

impl Reconciler {
    /// Applies a pass's repairs (unless a dry run); removals only when `removals`
    /// (at the end of a run, once they are all known) and within the budget.
    pub(super) async fn finish(
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
            let removal_events: Vec<Repair> = removal_events
                .into_iter()
                .filter_map(decode_removal)
                .collect();
            report.applied += self.apply(removal_events).await?;
        }
        Ok(())
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
    async fn apply(&self, events: Vec<Repair>) -> Result<u64, ReconcileError> {
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
    async fn apply_events(&self, events: Vec<Repair>) -> Result<u64, ReconcileError> {
        let mut applied = 0;
        for chunk in events.chunks(APPLY_BATCH) {
            let ready: Vec<ReadyEvent<'_>> = chunk
                .iter()
                .map(|r| ReadyEvent {
                    incoming: &r.incoming,
                    decoded: &r.decoded,
                })
                .collect();
            let outcomes = self.provisioner.apply_decoded(&self.pool, &ready).await;
            for (repair, result) in chunk.iter().zip(outcomes) {
                match result {
                    Ok(Outcome::Processed) => applied += 1,
                    Ok(_) => {}
                    Err(ProcessError::Database(e)) => return Err(e.into()),
                    Err(ProcessError::Payload(e)) => {
                        tracing::warn!(event = %repair.incoming.svix_id, error = %e, "a repair could not be applied");
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
fn batches(mut events: Vec<Repair>) -> Vec<Vec<Repair>> {
    // Stable: the order within a workspace is kept.
    events.sort_by(|a, b| a.decoded.workspace_id().cmp(&b.decoded.workspace_id()));
    let mut jobs = Vec::new();
    let mut current: Vec<Repair> = Vec::new();
    let mut events = events.into_iter().peekable();
    while let Some(first) = events.next() {
        let workspace = first.decoded.workspace_id().map(str::to_owned);
        let mut group = vec![first];
        while let Some(next) = events.next_if(|e| e.decoded.workspace_id() == workspace.as_deref())
        {
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
pub(super) struct PageRepairs {
    events: Vec<Repair>,
    quotas: Vec<String>,
}

/// A unit of work of the appliers: one batch of events, or one quota refresh.
enum Job {
    Events(Vec<Repair>),
    Quotas(String),
}

/// [`APPLIERS`] tasks applying repairs as the scan hands them over, so a page's
/// last batches never leave the others idle while the next page is compared.
pub(super) struct Pipeline {
    jobs: tokio::sync::mpsc::Sender<Job>,
    appliers: tokio::task::JoinSet<Result<u64, ReconcileError>>,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Pipeline {
    pub(super) fn start(reconciler: &Reconciler) -> Self {
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
    pub(super) async fn submit(&mut self, repairs: PageRepairs) -> Result<(), ReconcileError> {
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
    pub(super) async fn finish(self) -> Result<u64, ReconcileError> {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::compare::decode_membership;
    use super::*;
    use crate::clerk::sample as make;

    fn repair(workspace: &str, n: usize) -> Repair {
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
    fn ids(job: &[Repair]) -> Vec<(String, String)> {
        job.iter()
            .map(|r| match &r.decoded.event {
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
