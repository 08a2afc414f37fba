//! What must hold after a round, each failure a violation (a line naming what and
//! where), never a panic, so a run reports all of them with its seed and schedule:
//!
//! - every webhook got its 2xx in the end (the sender gave up on none);
//! - every svix id that got a 2xx is in the processing log once, and nothing else;
//!   none was taken up twice and no audit entry repeats (exactly-once effects);
//! - dead: exactly the injected poisons, in the log and in the dead-letter queue;
//! - the stored state equals the model (workspaces, plans, quotas, every membership
//!   row with its display fields, who is an active member), and every column of
//!   every row equals the same history applied in order to a database of its own;
//! - the read API answers what the model says (workspace, plan, quotas, onboarding,
//!   members and roles, each user's workspaces);
//! - a reconcile against Clerk serving the model finds no drift and changes nothing;
//! - every process the nemesis did not stop is still running.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;

use crate::common::TOKEN;
use crate::common::eventually;
use crate::common::history::{row_diff, rows};
use crate::common::svix_sender::Report;
use crate::convergence::model::{Ev, Model};
use crate::convergence::oracle::{State, expected, membership_of, org_of, render, state};
use crate::nemesis::generator::Round;
use crate::nemesis::stack::{CLERK_KEY, Stack};
use provisioner::provision::Provisioner;

/// The provisioner the children run (built-in settings and the model's role map).
pub fn provisioner() -> Provisioner {
    let settings = provisioner::config::Settings::from_sources(
        Some(crate::convergence::model::ROLE_MAP),
        |_| None,
    )
    .expect("valid settings");
    Provisioner::new(settings.provisioning)
}

/// The history steps (indices) touching the entity a state key names (`org_3`,
/// `mem_7`, `user_2`), to name where a failure lives.
pub fn steps_touching(model: &Model, key: &str) -> Vec<usize> {
    let find = |tag: &str| -> Option<usize> {
        let at = key.find(tag)? + tag.len();
        key[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    let (org, mem, user) = (find("org_"), find("mem_"), find("user_"));
    model
        .history
        .iter()
        .enumerate()
        .filter(|(_, e)| match &e.ev {
            Ev::OrgUpsert { org: o, .. } | Ev::OrgListed { org: o } => org == Some(o.idx),
            Ev::OrgDeleted { idx } => org == Some(*idx),
            Ev::MemUpsert { mem: m, .. }
            | Ev::MemDeleted { mem: m, .. }
            | Ev::MemListed { mem: m } => {
                mem == Some(m.id)
                    || (mem.is_none() && (org == Some(m.org.idx) || user == Some(m.user)))
            }
            Ev::UserUpdated { user: u, .. } | Ev::UserDeleted { user: u } => {
                mem.is_none() && user == Some(*u)
            }
        })
        .map(|(i, _)| i)
        .collect()
}

fn locate(model: &Model, key: &str) -> String {
    let steps = steps_touching(model, key);
    match (steps.first(), steps.last()) {
        (Some(first), Some(last)) => format!(
            "steps {first}..={last} touch it (first: {:?})",
            model.history[*first].ev
        ),
        _ => "no step touches it".to_owned(),
    }
}

/// Everything the checker needs of a round.
pub struct Ctx<'a> {
    pub stack: &'a mut Stack,
    pub round: &'a Round,
    pub report: &'a Report,
    /// The in-order oracle's database.
    pub oracle_db: &'a PgPool,
    /// Poisons sent so far in the run (all kept as dead letters).
    pub poisons_so_far: &'a BTreeSet<String>,
    /// The onboarding writes' possible outcomes.
    pub onboarding: &'a BTreeMap<(String, String), Vec<String>>,
}

/// Checks a round; returns its violations.
pub async fn check(ctx: Ctx<'_>) -> Vec<String> {
    let mut v = Vec::new();
    let Ctx {
        stack,
        round,
        report,
        oracle_db,
        poisons_so_far,
        onboarding,
    } = ctx;
    let prefix = &round.prefix;
    let db = stack.db.clone();
    let given_up = report.given_up();
    if !given_up.is_empty() {
        v.push(format!(
            "the sender gave up on {} messages (first: {:?}): {}",
            given_up.len(),
            given_up.first(),
            report.summary()
        ));
    }
    let acknowledged = report.acknowledged();
    let poisons: BTreeSet<String> = round.poisons.iter().map(|w| w.svix_id.clone()).collect();
    let like = format!("{prefix}%");
    // Every acknowledged event logged, and the poisons dead.
    let settled = eventually(Duration::from_secs(180), || async {
        let (n, dead): (i64, i64) = sqlx::query_as(
            "select count(*), count(*) filter (where status = 'dead') from events \
             where svix_id like $1",
        )
        .bind(&like)
        .fetch_one(&db)
        .await
        .ok()?;
        (n as usize >= acknowledged.len() && dead as usize >= poisons.len()).then_some(())
    })
    .await;
    let log: Vec<(String, String, i32)> =
        sqlx::query_as("select svix_id, status, attempts from events where svix_id like $1")
            .bind(&like)
            .fetch_all(&db)
            .await
            .unwrap();
    let log: BTreeMap<String, (String, i32)> =
        log.into_iter().map(|(id, s, a)| (id, (s, a))).collect();
    if settled.is_none() {
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|id| !log.contains_key(*id))
            .take(10)
            .collect();
        v.push(format!(
            "lost: {} of {} acknowledged events are not in the processing log after 180 s \
             (first: {missing:?})",
            acknowledged
                .iter()
                .filter(|id| !log.contains_key(*id))
                .count(),
            acknowledged.len()
        ));
    }
    for (id, (status, attempts)) in &log {
        if !acknowledged.contains(id) {
            v.push(format!(
                "{id} was processed ({status}) but never acknowledged"
            ));
        }
        let poison = poisons.contains(id);
        if poison && status != "dead" {
            v.push(format!("poison {id} ended {status}, not dead"));
        }
        if !poison && status == "dead" {
            v.push(format!(
                "{id} was dead-lettered; {}",
                locate_svix(&round.model, prefix, id)
            ));
        }
        if !poison && *attempts > 1 {
            v.push(format!("{id} was taken up {attempts} times"));
        }
    }
    let repeated: Vec<(String, String, i64)> = sqlx::query_as(
        "select event_id, action, count(*) from audit_log where event_id like $1 \
         group by event_id, action, subject, details::text having count(*) > 1",
    )
    .bind(&like)
    .fetch_all(&db)
    .await
    .unwrap();
    for (event, action, n) in repeated {
        v.push(format!("{event}'s {action} audit entry written {n} times"));
    }
    // Exactly the poisons are dead letters. A Svix re-delivery (or a replay) of a
    // dead event is processed afresh (DESIGN §5) and dead-lettered again, so a
    // poison may be there more than once; nothing else may be there at all.
    let dead_queue = format!("{}.provisioner.dead", stack.iso.prefix);
    let broker = stack.broker_url().await;
    let settled = eventually(Duration::from_secs(30), || async {
        let ids = dead_letter_ids(&broker, &dead_queue).await;
        let held: BTreeSet<String> = ids.keys().cloned().collect();
        (&held == poisons_so_far).then_some(())
    })
    .await;
    if settled.is_none() {
        v.push(format!(
            "the dead-letter queue holds {:?}, not the poisons {poisons_so_far:?}",
            dead_letter_ids(&broker, &dead_queue).await
        ));
    }

    // The state equals the model.
    let p = provisioner();
    let want = expected(&round.model, &p);
    let have = state(&db, prefix).await;
    v.extend(state_diff(&round.model, &want, &have));

    // The read API answers what the model says.
    v.extend(read_api(&stack.base(0), prefix, &want, onboarding).await);

    // A reconcile against Clerk serving the model finds nothing and changes nothing.
    v.extend(reconcile(stack, &round.model, prefix).await);

    // A just-in-time sync of every organization now changes nothing: 200 for
    // Clerk's, 404 for the others.
    v.extend(syncs(stack, &round.model, prefix).await);

    // Every column equals the history applied in order.
    let oracle = provisioner();
    for e in &round.model.history {
        let result = oracle
            .apply_batch(oracle_db, &[render(prefix, e)])
            .await
            .remove(0);
        assert!(result.is_ok(), "in-order event {e:?} failed: {result:?}");
    }
    // The onboarding writes were not Clerk's: the in-order copy takes their
    // outcome as stored (the read API's check above held it to the writes).
    for (ws, step) in onboarding.keys() {
        let id = format!("{prefix}{ws}");
        let stored: Option<String> = sqlx::query_scalar(
            "select status from onboarding_steps where workspace_id = $1 and name = $2",
        )
        .bind(&id)
        .bind(step)
        .fetch_optional(&db)
        .await
        .unwrap();
        if let Some(status) = stored {
            sqlx::query(
                "update onboarding_steps set status = $3 where workspace_id = $1 and name = $2",
            )
            .bind(&id)
            .bind(step)
            .bind(status)
            .execute(oracle_db)
            .await
            .unwrap();
        }
    }
    for (key, in_order, faulted) in
        row_diff(&rows(oracle_db, prefix).await, &rows(&db, prefix).await)
    {
        v.push(format!(
            "row {key} differs from the in-order history: in order {in_order:?}, \
             under the nemesis {faulted:?}; {}",
            locate(&round.model, &key)
        ));
    }

    // Every process is still running.
    for slot in stack.slots_mut() {
        if let Some(status) = slot.process.exited() {
            v.push(format!(
                "{} exited by itself ({status}): {}",
                slot.process.name,
                slot.process.log_tail()
            ));
        }
    }
    v
}

fn locate_svix(model: &Model, prefix: &str, svix: &str) -> String {
    let bare = svix.strip_prefix(prefix).unwrap_or(svix);
    match model.history.iter().position(|e| e.svix == bare) {
        Some(i) => format!("step {i}: {:?}", model.history[i].ev),
        None => "no step of the history".to_owned(),
    }
}

/// The message ids in `queue` and how many copies of each (taken without an ack
/// and returned when the channel closes).
pub async fn dead_letter_ids(url: &str, queue: &str) -> BTreeMap<String, usize> {
    use lapin::options::BasicGetOptions;
    let mut ids = BTreeMap::new();
    let Ok(conn) = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
    else {
        return ids;
    };
    if let Ok(ch) = conn.create_channel().await {
        while let Ok(Some(msg)) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
        {
            let id = msg
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            *ids.entry(id).or_default() += 1;
        }
        let _ = ch.close(200, "bye".into()).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    ids
}

fn state_diff(model: &Model, want: &State, have: &State) -> Vec<String> {
    let mut v = Vec::new();
    let mut diff = |what: &str, key: String, w: Option<String>, h: Option<String>| {
        if w != h {
            v.push(format!(
                "{what} {key}: the model says {w:?}, stored {h:?}; {}",
                locate(model, &key)
            ));
        }
    };
    let keys =
        |a: Vec<String>, b: Vec<String>| -> BTreeSet<String> { a.into_iter().chain(b).collect() };
    for k in keys(
        want.workspaces.keys().cloned().collect(),
        have.workspaces.keys().cloned().collect(),
    ) {
        diff(
            "workspace",
            k.clone(),
            want.workspaces.get(&k).map(|x| format!("{x:?}")),
            have.workspaces.get(&k).map(|x| format!("{x:?}")),
        );
    }
    for k in keys(
        want.quotas.keys().map(|k| format!("{k:?}")).collect(),
        have.quotas.keys().map(|k| format!("{k:?}")).collect(),
    ) {
        let find = |m: &BTreeMap<(String, String), i64>| {
            m.iter()
                .find(|(x, _)| format!("{x:?}") == k)
                .map(|(_, l)| l.to_string())
        };
        diff("quota", k.clone(), find(&want.quotas), find(&have.quotas));
    }
    for k in keys(
        want.members.keys().cloned().collect(),
        have.members.keys().cloned().collect(),
    ) {
        diff(
            "membership",
            k.clone(),
            want.members.get(&k).map(|x| format!("{x:?}")),
            have.members.get(&k).map(|x| format!("{x:?}")),
        );
    }
    for k in keys(
        want.access.keys().map(|k| format!("{k:?}")).collect(),
        have.access.keys().map(|k| format!("{k:?}")).collect(),
    ) {
        let find = |m: &BTreeMap<(String, String), String>| {
            m.iter()
                .find(|(x, _)| format!("{x:?}") == k)
                .map(|(_, r)| r.clone())
        };
        diff("access", k.clone(), find(&want.access), find(&have.access));
    }
    v
}

/// GETs `path` on `base` with the API token.
async fn get(client: &reqwest::Client, base: &str, path: &str) -> Result<(u16, Value), String> {
    let res = client
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = res.status().as_u16();
    let body = res.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

fn strip(prefix: &str, v: &Value) -> String {
    v.as_str().unwrap_or_default().replace(prefix, "")
}

async fn read_api(
    base: &str,
    prefix: &str,
    want: &State,
    onboarding: &BTreeMap<(String, String), Vec<String>>,
) -> Vec<String> {
    let mut v = Vec::new();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for (id, (name, slug, status, plan)) in &want.workspaces {
        let (code, ws) = match get(&client, base, &format!("/v1/workspaces/{prefix}{id}")).await {
            Ok(x) => x,
            Err(e) => {
                v.push(e);
                continue;
            }
        };
        if code != 200 {
            v.push(format!("GET /v1/workspaces/{id} answered {code}"));
            continue;
        }
        let quotas: BTreeMap<String, i64> = want
            .quotas
            .iter()
            .filter(|((w, _), _)| w == id)
            .map(|((_, q), l)| (q.clone(), *l))
            .collect();
        let got_quotas: BTreeMap<String, i64> =
            serde_json::from_value(ws["quotas"].clone()).unwrap_or_default();
        let members: Vec<&String> = want
            .access
            .iter()
            .filter(|((w, _), _)| w == id)
            .map(|(_, role)| role)
            .collect();
        let admins = members.iter().filter(|r| r.as_str() == "admin").count();
        let steps: Vec<(String, String)> = ws["onboarding"]["steps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| (strip("", &s["name"]), strip("", &s["status"])))
                    .collect()
            })
            .unwrap_or_default();
        // Each step as the writes left it (when one's answer was lost, either).
        let want_steps: Vec<(String, String)> = crate::nemesis::traffic::STEPS
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let got = steps.get(i).map(|(_, s)| s.clone()).unwrap_or_default();
                let possible = onboarding
                    .get(&(id.clone(), name.to_string()))
                    .cloned()
                    .unwrap_or_else(|| vec!["pending".to_owned()]);
                let status = if possible.contains(&got) {
                    got
                } else {
                    possible.join("|")
                };
                (name.to_string(), status)
            })
            .collect();
        let checks = [
            ("name", ws["name"].as_str().map(str::to_owned), name.clone()),
            ("slug", ws["slug"].as_str().map(str::to_owned), slug.clone()),
            (
                "status",
                ws["status"].as_str().map(str::to_owned),
                Some(status.clone()),
            ),
            (
                "plan",
                ws["plan"].as_str().map(str::to_owned),
                Some(plan.clone()),
            ),
            (
                "quotas",
                Some(format!("{got_quotas:?}")),
                Some(format!("{quotas:?}")),
            ),
            (
                "member_count",
                Some(ws["member_count"].to_string()),
                Some(members.len().to_string()),
            ),
            (
                "admin_count",
                Some(ws["admin_count"].to_string()),
                Some(admins.to_string()),
            ),
            (
                "onboarding",
                Some(format!("{steps:?}")),
                Some(format!("{want_steps:?}")),
            ),
        ];
        for (field, got, wanted) in checks {
            if got != wanted {
                v.push(format!(
                    "GET /v1/workspaces/{id}: {field} is {got:?}, the model says {wanted:?}"
                ));
            }
        }
        if status != "active" {
            continue;
        }
        let (code, list) = match get(
            &client,
            base,
            &format!("/v1/workspaces/{prefix}{id}/members?limit=500"),
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                v.push(e);
                continue;
            }
        };
        let got: BTreeSet<String> = list["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        format!(
                            "{} {} {} {} {} {}",
                            strip(prefix, &m["user_id"]),
                            strip("", &m["role"]),
                            strip("", &m["clerk_role"]),
                            strip("", &m["email"]),
                            strip("", &m["first_name"]),
                            strip("", &m["last_name"])
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let wanted: BTreeSet<String> = want
            .members
            .values()
            .filter(|m| &m.workspace_id == id && !m.removed)
            .map(|m| {
                format!(
                    "{} {} {} {} {} {}",
                    m.user_id,
                    m.role,
                    m.clerk_role,
                    m.email.clone().unwrap_or_default(),
                    m.first_name.clone().unwrap_or_default(),
                    m.last_name.clone().unwrap_or_default()
                )
            })
            .collect();
        if code != 200 || got != wanted {
            v.push(format!(
                "GET /v1/workspaces/{id}/members answered {code} {got:?}, the model says {wanted:?}"
            ));
        }
    }
    // Each user's workspaces (the org switcher).
    let users: BTreeSet<String> = want.members.values().map(|m| m.user_id.clone()).collect();
    for user in users {
        let Ok((code, list)) = get(
            &client,
            base,
            &format!("/v1/users/{prefix}{user}/workspaces?limit=500"),
        )
        .await
        else {
            v.push(format!("GET /v1/users/{user}/workspaces failed"));
            continue;
        };
        let got: BTreeSet<String> = list["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|w| {
                        format!(
                            "{} {}",
                            strip(prefix, &w["workspace_id"]),
                            strip("", &w["role"])
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let wanted: BTreeSet<String> = want
            .access
            .iter()
            .filter(|((_, u), _)| *u == user)
            .map(|((w, _), role)| format!("{w} {role}"))
            .collect();
        if code != 200 || got != wanted {
            v.push(format!(
                "GET /v1/users/{user}/workspaces answered {code} {got:?}, the model says {wanted:?}"
            ));
        }
    }
    v
}

/// Clerk's truth in the fake Backend API: the model's live organizations and
/// their active memberships, as Clerk lists them now (the standing snapshots).
pub fn serve_model(fake: &provisioner::clerk::fake::FakeClerk, model: &Model, prefix: &str) {
    for o in 0..model.orgs.len() {
        if let Some(snap) = model.live_org(o) {
            fake.put_organization(org_of(prefix, &snap).data_at(snap.updated_at));
        }
    }
    for (m, active) in &model.mems {
        if *active && model.live_org(m.org.idx).is_some() {
            fake.put_membership(membership_of(prefix, m).data_at(m.updated_at));
        }
    }
}

/// Puts the model's live organizations and active memberships into the fake
/// Clerk, then runs reconcile: a dry run must find no drift, a real one change
/// nothing.
async fn reconcile(stack: &Stack, model: &Model, prefix: &str) -> Vec<String> {
    use provisioner::progress::Silent;
    use provisioner::reconcile::{Reconciler, RunOptions};
    serve_model(&stack.fake, model, prefix);
    let mut s = provisioner::config::Settings::from_sources(
        Some(crate::convergence::model::ROLE_MAP),
        |_| None,
    )
    .expect("valid settings");
    s.clerk.secret_key = Some(provisioner::config::Secret::new(CLERK_KEY.to_owned()));
    s.clerk.api_url = stack.fake.url.clone();
    s.reconcile.requests_per_second = 0.0;
    let api = provisioner::clerk::api::ClerkApi::new(&s.clerk, &s.reconcile).unwrap();
    let r = Reconciler::new(
        api,
        Provisioner::new(s.provisioning),
        stack.db.clone(),
        s.reconcile.max_removals,
    );
    let mut v = Vec::new();
    for dry_run in [true, false] {
        match r
            .run(
                &RunOptions {
                    dry_run,
                    yes: false,
                },
                &Silent,
            )
            .await
        {
            Ok(report) => {
                for d in &report.drift {
                    v.push(format!(
                        "reconcile ({}) found drift {} in {} {:?}: {}; {}",
                        if dry_run { "dry run" } else { "run" },
                        d.kind.as_str(),
                        d.workspace_id,
                        d.user_id,
                        d.detail,
                        locate(model, &d.workspace_id.replace(prefix, ""))
                    ));
                }
                let live = (0..model.orgs.len())
                    .filter(|&o| model.live_org(o).is_some())
                    .count() as u64;
                if report.organizations_seen < live {
                    v.push(format!(
                        "reconcile saw {} organizations, the round alone has {live}",
                        report.organizations_seen
                    ));
                }
                if report.applied > 0 {
                    v.push(format!("reconcile changed {} things", report.applied));
                }
            }
            Err(e) => v.push(format!("reconcile failed: {e}")),
        }
    }
    v
}

/// Syncs every organization of the round after it settled: the answer follows
/// Clerk, and the stored rows do not change.
async fn syncs(stack: &Stack, model: &Model, prefix: &str) -> Vec<String> {
    let mut v = Vec::new();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let before = rows(&stack.db, prefix).await;
    for o in 0..model.orgs.len() {
        let want = if model.live_org(o).is_some() {
            200
        } else {
            404
        };
        let sent = client
            .post(format!(
                "{}/v1/workspaces/{prefix}org_{o}/sync",
                stack.base(0)
            ))
            .bearer_auth(TOKEN)
            .send()
            .await;
        match sent.map(|r| r.status().as_u16()) {
            Ok(code) if code == want => {}
            other => v.push(format!(
                "POST /v1/workspaces/org_{o}/sync after the round answered {other:?}, not {want}"
            )),
        }
    }
    for (key, was, is) in row_diff(&before, &rows(&stack.db, prefix).await) {
        v.push(format!(
            "a sync after the round changed {key}: {was:?} -> {is:?}; {}",
            locate(model, &key)
        ));
    }
    v
}
