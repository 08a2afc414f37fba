//! Convergence (DESIGN §5): any permutation of a valid history, with any event
//! delivered more than once and in batches of any size, ends in exactly the state
//! of the history applied in order — every column of every workspace, quota,
//! onboarding step, member and user row, not only the membership set — and that
//! state is the one Clerk's history describes.
//!
//! Histories include snapshots with equal `updated_at` and different content
//! (decided by the smaller svix id, docs/schema.md), deletions Clerk sends again
//! later as new messages (the earliest time stands), every kind of deletion in its
//! sparse form (ids and the envelope timestamp only: no `public_user_data`, the
//! organization as `{id}`), users removed and re-added under new membership ids,
//! and reconcile's snapshots of organizations and memberships (actor `reconcile`,
//! its deterministic svix ids) interleaved with the webhooks. Deliveries put the
//! deletions first in some cases, so removals arrive before their memberships and
//! before their workspaces are known. Besides every column, the check compares who
//! may read what (`active_members`, what every read route decides on) and the
//! display fields of removed rows (only active rows follow the user) with the model.

mod model;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::database::TestDatabase;
use crate::common::history::{row_diff, rows};
use crate::common::story;
use model::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use provisioner::clerk::sample::{self as payload, Person};
use provisioner::config::Settings;
use provisioner::provision::{Actor, Incoming, Outcome, Provisioner};
use serde_json::json;
use sqlx::PgPool;

// ---- rendering the history as webhooks for one set of ids ----------------------------

/// A user's display fields at `tag` (the user id keeps the run's prefix).
fn person(prefix: &str, user: usize, tag: &str) -> Person {
    Person {
        user_id: format!("{prefix}user_{user}"),
        email: format!("u{user}.{tag}@example.com"),
        first_name: format!("First {tag}"),
        last_name: format!("Last {user}"),
    }
}

fn org_of(prefix: &str, snap: &OrgSnap) -> story::Org {
    let org = story::org(&format!("{prefix}org_{}", snap.idx))
        .named(&snap.name)
        .version(snap.updated_at);
    match snap.plan {
        Some(plan) => org.plan(plan),
        None => org,
    }
}

fn membership_of(prefix: &str, m: &MemSnap) -> story::Membership {
    org_of(prefix, &m.org)
        .membership(
            &format!("{prefix}mem_{}", m.id),
            &person(prefix, m.user, &m.tag),
        )
        .role(m.role)
        .since(m.created_at)
}

/// The webhook of a history event: its snapshot's version in `data`, sent at the
/// event's time.
fn render(prefix: &str, e: &HistEvent) -> Incoming {
    let event = match &e.ev {
        Ev::OrgUpsert { created: true, org } => org_of(prefix, org).created(org.updated_at),
        Ev::OrgUpsert {
            created: false,
            org,
        } => org_of(prefix, org).updated(org.updated_at),
        // Deletions of organizations and users in their sparse form: `{id}` only.
        Ev::OrgDeleted { idx } => story::org(&format!("{prefix}org_{idx}"))
            .deleted(e.ts)
            .with(|d| *d = json!({ "id": format!("{prefix}org_{idx}") })),
        Ev::OrgListed { org } => org_of(prefix, org)
            .created(org.updated_at)
            .by(Actor::Reconcile),
        Ev::MemUpsert { created: true, mem } => membership_of(prefix, mem).created(mem.updated_at),
        Ev::MemUpsert {
            created: false,
            mem,
        } => membership_of(prefix, mem).updated(mem.updated_at),
        Ev::MemDeleted { mem, form } => {
            let deleted = membership_of(prefix, mem).deleted(mem.updated_at);
            let ids = json!({
                "object": "organization_membership",
                "id": format!("{prefix}mem_{}", mem.id),
                "organization": { "id": format!("{prefix}org_{}", mem.org.idx) },
            });
            match form {
                Form::Full => deleted,
                Form::IdsOnly => deleted.with(|d| *d = ids),
                Form::IdsWithUser => deleted.with(|d| {
                    *d = ids;
                    d["public_user_data"] =
                        json!({ "user_id": format!("{prefix}user_{}", mem.user) });
                }),
            }
        }
        Ev::MemListed { mem } => membership_of(prefix, mem)
            .created(mem.updated_at)
            .by(Actor::Reconcile),
        Ev::UserUpdated { user, tag, version } => {
            story::user_updated(&person(prefix, *user, tag), *version)
        }
        Ev::UserDeleted { user } => story::user_deleted(&format!("{prefix}user_{user}"), e.ts)
            .with(|d| *d = json!({ "id": format!("{prefix}user_{user}") })),
    };
    event
        .sent_at(e.ts)
        .svix(&format!("{prefix}{}", e.svix))
        .into()
}

// ---- the provisioned state, with the run's id prefix stripped ------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    /// id -> (name, slug, status, plan)
    workspaces: BTreeMap<String, (Option<String>, Option<String>, String, String)>,
    /// (workspace, quota) -> limit
    quotas: BTreeMap<(String, String), i64>,
    /// membership id -> its row, removed ones included
    members: BTreeMap<String, MemberView>,
    /// (workspace, user) -> role of every active member (`active_members`: what
    /// every read route decides access, member lists, counts and the org switcher on)
    access: BTreeMap<(String, String), String>,
}

/// A member row: workspace, user, role, Clerk role, email, first and last name,
/// and whether it is removed.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct MemberView {
    workspace_id: String,
    user_id: String,
    role: String,
    clerk_role: String,
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    removed: bool,
}

async fn state(db: &PgPool, prefix: &str) -> State {
    let like = format!("{prefix}%");
    let strip = |s: String| s.strip_prefix(prefix).map(str::to_owned).unwrap_or(s);
    type WorkspaceRow = (String, Option<String>, Option<String>, String, String);
    let rows: Vec<WorkspaceRow> =
        sqlx::query_as("select id, name, slug, status, plan from workspaces where id like $1")
            .bind(&like)
            .fetch_all(db)
            .await
            .unwrap();
    let workspaces = rows
        .into_iter()
        .map(|(id, name, slug, status, plan)| (strip(id), (name, slug, status, plan)))
        .collect();
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "select workspace_id, name, limit_value from workspace_quotas where workspace_id like $1",
    )
    .bind(&like)
    .fetch_all(db)
    .await
    .unwrap();
    let quotas = rows
        .into_iter()
        .map(|(w, n, v)| ((strip(w), n), v))
        .collect();
    let rows: Vec<(String, MemberView)> = sqlx::query_as::<
        _,
        (
            String,
            String,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            bool,
        ),
    >(
        "select membership_id, workspace_id, user_id, role, clerk_role, email, first_name, \
           last_name, removed_at is not null \
         from members where workspace_id like $1",
    )
    .bind(&like)
    .fetch_all(db)
    .await
    .unwrap()
    .into_iter()
    .map(
        |(m, w, u, role, clerk_role, email, first_name, last_name, removed)| {
            (
                m,
                MemberView {
                    workspace_id: w,
                    user_id: u,
                    role,
                    clerk_role,
                    email,
                    first_name,
                    last_name,
                    removed,
                },
            )
        },
    )
    .collect();
    let members = rows
        .into_iter()
        .map(|(m, v)| {
            let v = MemberView {
                workspace_id: strip(v.workspace_id),
                user_id: strip(v.user_id),
                email: v.email.map(|e| e.replace(prefix, "")),
                ..v
            };
            (strip(m), v)
        })
        .collect();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "select workspace_id, user_id, role from active_members where workspace_id like $1",
    )
    .bind(&like)
    .fetch_all(db)
    .await
    .unwrap();
    let access = rows
        .into_iter()
        .map(|(w, u, role)| ((strip(w), strip(u)), role))
        .collect();
    State {
        workspaces,
        quotas,
        members,
        access,
    }
}

/// The state the model's history describes (the oracle for the in-order run).
fn expected(model: &Model, p: &Provisioner) -> State {
    let s = p.settings();
    let mut st = State {
        workspaces: BTreeMap::new(),
        quotas: BTreeMap::new(),
        members: BTreeMap::new(),
        access: BTreeMap::new(),
    };
    for (i, org) in model.orgs.iter().enumerate() {
        let id = format!("org_{i}");
        let Some(snap) = best(&org.cands) else {
            // Only reachable through a delete, which needs a created organization.
            continue;
        };
        // The standing snapshot among those naming a configured plan or none
        // decides; an unknown name never changes the plan.
        let deciding: Vec<Cand<Option<&str>>> = org
            .cands
            .iter()
            .filter(|c| c.value.plan.is_none_or(|p| s.plans.contains_key(p)))
            .map(|c| Cand {
                version: c.version,
                svix: c.svix.clone(),
                value: c.value.plan,
            })
            .collect();
        let plan = s.plan_for(best(&deciding).copied().flatten()).to_owned();
        for (q, v) in &s.plans[&plan] {
            st.quotas.insert((id.clone(), q.clone()), *v);
        }
        let status = if org.deleted { "deleted" } else { "active" };
        let slug = payload::slug(&snap.name);
        st.workspaces.insert(
            id,
            (Some(snap.name.clone()), Some(slug), status.to_owned(), plan),
        );
    }
    // When each membership ended: the earliest of its own removals, its
    // organization's deletion and its user's (every send of each counts).
    let mut mem_end: BTreeMap<usize, i64> = BTreeMap::new();
    let mut org_end: BTreeMap<usize, i64> = BTreeMap::new();
    let mut user_end: BTreeMap<usize, i64> = BTreeMap::new();
    for e in &model.history {
        let (map, key) = match &e.ev {
            Ev::MemDeleted { mem, .. } => (&mut mem_end, mem.id),
            Ev::OrgDeleted { idx } => (&mut org_end, *idx),
            Ev::UserDeleted { user } => (&mut user_end, *user),
            _ => continue,
        };
        let t = map.entry(key).or_insert(e.ts);
        *t = (*t).min(e.ts);
    }
    for (m, active) in &model.mems {
        let end = [
            mem_end.get(&m.id),
            org_end.get(&m.org.idx),
            user_end.get(&m.user),
        ]
        .into_iter()
        .flatten()
        .min()
        .copied();
        assert_eq!(end.is_none(), *active, "the model ends what it removes");
        // Display fields: the standing source among the membership's snapshots
        // and the user's user.updated, those not after its end for a removed one.
        let sources: Vec<Cand<String>> = model.mem_cands[m.id]
            .iter()
            .map(|c| Cand {
                version: c.version,
                svix: c.svix.clone(),
                value: c.value.tag.clone(),
            })
            .chain(
                model.users[m.user]
                    .cands
                    .iter()
                    .filter(|c| end.is_none_or(|t| c.version <= t))
                    .cloned(),
            )
            .collect();
        let tag = best(&sources).expect("a membership has a snapshot");
        let who = person("", m.user, tag);
        let role = s.role_for(m.role).as_str().to_owned();
        let (ws, user) = (format!("org_{}", m.org.idx), who.user_id.clone());
        if *active && !model.orgs[m.org.idx].deleted {
            st.access.insert((ws.clone(), user.clone()), role.clone());
        }
        st.members.insert(
            format!("mem_{}", m.id),
            MemberView {
                workspace_id: ws,
                user_id: user,
                role,
                clerk_role: m.role.to_owned(),
                email: Some(who.email),
                first_name: Some(who.first_name),
                last_name: Some(who.last_name),
                removed: !*active,
            },
        );
    }
    st
}

// ---- the property ---------------------------------------------------------------------

/// Everything random about one case.
#[derive(Debug, Clone)]
struct Case {
    ops: Vec<(u8, usize, usize, u8)>,
    /// Sort keys that shuffle the history.
    shuffle: Vec<u32>,
    /// (which event, where) for each extra delivery of an event.
    duplicates: Vec<(u16, u16)>,
    /// Sizes of the batches handed to apply_batch in the shuffled run.
    batches: Vec<usize>,
    /// Deliver every deletion first (still shuffled among themselves): removals
    /// before their memberships, their users' and their workspaces' snapshots.
    deletions_first: bool,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((0u8..23, 0..ORGS, 0..USERS, any::<u8>()), 6..60),
        prop::collection::vec(any::<u32>(), 128),
        prop::collection::vec((any::<u16>(), any::<u16>()), 0..10),
        prop::collection::vec(1usize..10, 128),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(ops, shuffle, duplicates, batches, deletions_first)| Case {
                ops,
                shuffle,
                duplicates,
                batches,
                deletions_first,
            },
        )
}

/// The shuffled delivery: a permutation of the history plus duplicate deliveries.
fn delivery(case: &Case, history: &[HistEvent]) -> Vec<HistEvent> {
    let mut order: Vec<usize> = (0..history.len()).collect();
    let first = |e: &HistEvent| {
        case.deletions_first
            && matches!(
                e.ev,
                Ev::MemDeleted { .. } | Ev::OrgDeleted { .. } | Ev::UserDeleted { .. }
            )
    };
    order.sort_by_key(|&i| (!first(&history[i]), case.shuffle[i % case.shuffle.len()], i));
    let mut out: Vec<HistEvent> = order.into_iter().map(|i| history[i].clone()).collect();
    if !history.is_empty() {
        for &(which, at) in &case.duplicates {
            let e = history[usize::from(which) % history.len()].clone();
            let at = usize::from(at) % (out.len() + 1);
            out.insert(at, e);
        }
    }
    out
}

static RUN: AtomicUsize = AtomicUsize::new(0);
/// Webhooks in all histories checked, and deliveries of the shuffled runs.
static EVENTS: AtomicUsize = AtomicUsize::new(0);
static DELIVERIES: AtomicUsize = AtomicUsize::new(0);

async fn check_case(db: &PgPool, p: &Provisioner, case: &Case) -> Result<(), TestCaseError> {
    let mut model = Model::new();
    for &(op, o, u, param) in &case.ops {
        model.step(op, o, u, param);
    }
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let (a, b) = (format!("r{run}a_"), format!("r{run}b_"));
    EVENTS.fetch_add(model.history.len(), Ordering::Relaxed);

    // In order, one event at a time.
    for e in &model.history {
        let result = p.apply_batch(db, &[render(&a, e)]).await.remove(0);
        prop_assert!(result.is_ok(), "in-order event {e:?} failed: {result:?}");
    }

    // Shuffled, duplicated, in batches of random sizes.
    let shuffled: Vec<Incoming> = delivery(case, &model.history)
        .iter()
        .map(|e| render(&b, e))
        .collect();
    DELIVERIES.fetch_add(shuffled.len(), Ordering::Relaxed);
    let mut applied: BTreeMap<String, usize> = BTreeMap::new();
    let mut start = 0;
    for size in case.batches.iter().cycle() {
        if start >= shuffled.len() {
            break;
        }
        let batch = &shuffled[start..(start + size).min(shuffled.len())];
        let results = p.apply_batch(db, batch).await;
        for (e, r) in batch.iter().zip(results) {
            match r {
                Ok(Outcome::Duplicate) => {}
                Ok(_) => *applied.entry(e.svix_id.clone()).or_default() += 1,
                Err(err) => {
                    return Err(TestCaseError::fail(format!(
                        "shuffled event {} failed: {err}",
                        e.svix_id
                    )));
                }
            }
        }
        start += size;
    }
    // Every svix id was applied exactly once; every other delivery was a Duplicate.
    prop_assert_eq!(applied.len(), model.history.len());
    prop_assert!(
        applied.values().all(|&n| n == 1),
        "applied twice: {applied:?}"
    );

    let in_order = state(db, &a).await;
    let shuffled = state(db, &b).await;
    prop_assert_eq!(
        &in_order,
        &expected(&model, p),
        "in-order run differs from the history"
    );
    prop_assert_eq!(
        &shuffled,
        &in_order,
        "shuffled run differs from the in-order run"
    );
    // Every column of every row, not only the membership set.
    let diff = row_diff(&rows(db, &a).await, &rows(db, &b).await);
    prop_assert!(
        diff.is_empty(),
        "shuffled rows differ from the in-order rows (key, in order, shuffled): {diff:#?}"
    );
    Ok(())
}

fn provisioner() -> Provisioner {
    let settings = Settings::from_sources(Some(ROLE_MAP), |_| None).expect("valid settings");
    Provisioner::new(settings.provisioning)
}

/// 500 random histories over 3 organizations and 4 users (creates, renames, plan
/// changes, role changes, removals full and sparse, re-adds under new ids, user
/// updates and deletions, organization deletions with and without membership
/// webhooks, snapshots tying on `updated_at` with other content, deletions sent
/// again later, reconcile's snapshots), delivered shuffled (deletions first in some)
/// with duplicates in batches, end in the state of the in-order history, column by
/// column, and in the access and removed rows' display the history describes.
#[test]
fn shuffled_duplicated_histories_converge() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDatabase::create());
    let p = provisioner();
    let config = ProptestConfig {
        // A failing case is printed (and shrunk); no regression file is written
        // from this hand-driven runner.
        failure_persistence: None,
        ..ProptestConfig::with_cases(500)
    };
    let mut runner = TestRunner::new(config);
    let cases = AtomicUsize::new(0);
    let result = runner.run(&case_strategy(), |case| {
        cases.fetch_add(1, Ordering::Relaxed);
        rt.block_on(check_case(&db.pool, &p, &case))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "convergence: {} cases passed ({} webhooks in order, {} shuffled deliveries)",
        cases.load(Ordering::Relaxed),
        EVENTS.load(Ordering::Relaxed),
        DELIVERIES.load(Ordering::Relaxed)
    );
}

/// Workers racing on the same entities (four concurrent appliers of one shuffled,
/// duplicated delivery) still end in the in-order state: the advisory locks
/// serialize them and a failed batch falls back to single events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_workers_converge() {
    let db = TestDatabase::create_with_pool_size(8).await;
    let p = provisioner();
    let mut runner = TestRunner::deterministic();
    for _ in 0..10 {
        let case = case_strategy()
            .new_tree(&mut runner)
            .expect("a case")
            .current();
        let mut model = Model::new();
        for &(op, o, u, param) in &case.ops {
            model.step(op, o, u, param);
        }
        let run = RUN.fetch_add(1, Ordering::Relaxed);
        let (a, b) = (format!("c{run}a_"), format!("c{run}b_"));
        for e in &model.history {
            p.apply_batch(&db.pool, &[render(&a, e)])
                .await
                .remove(0)
                .expect("in-order event applies");
        }
        let shuffled: Vec<Incoming> = delivery(&case, &model.history)
            .iter()
            .map(|e| render(&b, e))
            .collect();
        // Deal the deliveries round-robin to four workers, each applying batches of 3.
        let mut tasks = Vec::new();
        for w in 0..4 {
            let mine: Vec<Incoming> = shuffled.iter().skip(w).step_by(4).cloned().collect();
            let (p, pool) = (p.clone(), db.pool.clone());
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for batch in mine.chunks(3) {
                    for r in p.apply_batch(&pool, batch).await {
                        outcomes.push(r.expect("event applies"));
                    }
                }
                outcomes
            }));
        }
        let mut applied = 0;
        for t in tasks {
            applied += t
                .await
                .unwrap()
                .into_iter()
                .filter(|o| *o != Outcome::Duplicate)
                .count();
        }
        assert_eq!(applied, model.history.len(), "each svix id applied once");
        let in_order = state(&db.pool, &a).await;
        assert_eq!(in_order, expected(&model, &p));
        assert_eq!(state(&db.pool, &b).await, in_order);
        let diff = row_diff(&rows(&db.pool, &a).await, &rows(&db.pool, &b).await);
        assert!(diff.is_empty(), "rows differ: {diff:#?}");
    }
}
