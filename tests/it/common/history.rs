//! A long, realistic Clerk history over many organizations, for tests that drive
//! the running service with a stream of webhooks, and the in-order oracle it is
//! compared with.
//!
//! Guarantee: [`history`] is a pure function of its arguments but the prefix, so
//! two calls with the same seed and different prefixes describe the same story about
//! disjoint entities (ids, users, svix ids all carry the prefix). A test sends one
//! copy through the service under a fault and applies the other in order with
//! [`apply_in_order`]; [`rows`] of the two must then be equal, column by column.
//! Every body comes from the product's Clerk JSON generator through [`super::story`].

use std::collections::BTreeMap;

use provisioner::config::Settings;
use provisioner::provision::{Incoming, Provisioner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

use super::story::{self, Org};

/// One webhook of a history: what Svix sends.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// `svix-id` (stable across retries).
    pub svix_id: String,
    /// Clerk event type.
    pub kind: String,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// First envelope timestamp of a history (ms).
const T0: i64 = 1_765_000_000_000;
/// Plans an organization may ask for (`gold` is not configured: it keeps the plan).
const PLANS: [Option<&str>; 4] = [None, Some("team"), Some("enterprise"), Some("gold")];
/// Clerk roles.
const ROLES: [&str; 3] = ["org:admin", "org:member", "org:viewer"];

/// What one organization of the story looks like while it is written.
struct OrgStory {
    org: Org,
    version: i64,
    /// (membership id, user index, role, created_at) of live memberships.
    members: Vec<(String, usize, &'static str, i64)>,
    deleted: bool,
}

/// A history of `orgs` organizations sharing `users` users, in phases: every
/// organization is created (with a plan, sometimes), gets 2 to 4 members, has
/// members' roles changed, is renamed or moves plan, sees its users change their
/// names, loses members, and every fifth organization is deleted at the end, some
/// with membership webhooks first. About 8 webhooks per organization; the clock is
/// strictly increasing, so the in-order application is well defined.
pub fn history(prefix: &str, orgs: usize, users: usize, seed: u64) -> Vec<Webhook> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut clock = T0;
    let mut tick = || {
        clock += 10;
        clock
    };
    let mut out: Vec<Webhook> = Vec::new();
    let push = |out: &mut Vec<Webhook>, kind: &str, event: story::Event| {
        let svix = format!("{prefix}msg_{:05}", out.len());
        let incoming = event.svix(&svix).incoming();
        out.push(Webhook {
            svix_id: incoming.svix_id,
            kind: kind.to_owned(),
            body: incoming.body,
        });
    };
    let user_id = |u: usize| format!("{prefix}user_{u}");
    // Membership `id` of user `u` (as `tag` shows them) in `org`.
    let member = |org: &story::Org, id: &str, u: usize, tag: &str, role: &str, since: i64| {
        org.membership(id, &story::person(&user_id(u), tag))
            .role(role)
            .since(since)
    };
    // The display tag each user has now (their last user.updated).
    let mut tags: Vec<String> = vec!["0".to_owned(); users];
    let mut stories: Vec<OrgStory> = (0..orgs)
        .map(|i| OrgStory {
            org: story::org(&format!("{prefix}org_{i}")).named(&format!("Org {i}")),
            version: 0,
            members: Vec::new(),
            deleted: false,
        })
        .collect();

    // 1. created
    for s in stories.iter_mut() {
        let at = tick();
        if let Some(plan) = PLANS[rng.random_range(0..PLANS.len())] {
            s.org = s.org.clone().plan(plan);
        }
        s.version = at;
        s.org = s.org.clone().version(at);
        push(&mut out, "organization.created", s.org.created(at));
    }
    // 2. members join (in rounds, so organizations interleave)
    let mut mem_seq = 0;
    for round in 0..4 {
        for s in stories.iter_mut() {
            if round >= 2 && rng.random_bool(0.5) {
                continue;
            }
            let u = rng.random_range(0..users);
            if s.members.iter().any(|m| m.1 == u) {
                continue;
            }
            let at = tick();
            let id = format!("{prefix}orgmem_{mem_seq}");
            mem_seq += 1;
            let role = ROLES[rng.random_range(0..ROLES.len())];
            let event = member(&s.org, &id, u, &tags[u], role, at).created(at);
            s.members.push((id, u, role, at));
            push(&mut out, "organizationMembership.created", event);
        }
    }
    // 3. roles change, organizations are renamed or change plan, users edit themselves
    for s in stories.iter_mut() {
        if let Some(i) = (!s.members.is_empty()).then(|| rng.random_range(0..s.members.len())) {
            let at = tick();
            let role = ROLES[rng.random_range(0..ROLES.len())];
            s.members[i].2 = role;
            let (id, u, _, since) = s.members[i].clone();
            let event = member(&s.org, &id, u, &tags[u], role, since).updated(at);
            push(&mut out, "organizationMembership.updated", event);
        }
        let at = tick();
        let mut org = s.org.clone();
        if rng.random_bool(0.5) {
            org = org.named(&format!("Org {} renamed", rng.random_range(0..1000)));
        }
        if let Some(plan) = PLANS[rng.random_range(0..PLANS.len())] {
            org = org.plan(plan);
        }
        s.org = org.version(at);
        s.version = at;
        push(&mut out, "organization.updated", s.org.updated(at));
        let u = rng.random_range(0..users);
        let at = tick();
        tags[u] = format!("{}", at - T0);
        push(
            &mut out,
            "user.updated",
            story::user_updated(&story::person(&user_id(u), &tags[u]), at),
        );
    }
    // 4. members leave, every fifth organization is deleted
    for (i, s) in stories.iter_mut().enumerate() {
        if s.members.len() > 1 {
            let at = tick();
            let (id, u, role, since) = s.members.remove(0);
            let event = member(&s.org, &id, u, &tags[u], role, since).deleted(at);
            push(&mut out, "organizationMembership.deleted", event);
        }
        if i % 5 == 4 {
            if i % 10 == 9 {
                for (id, u, role, since) in std::mem::take(&mut s.members) {
                    let at = tick();
                    let event = member(&s.org, &id, u, &tags[u], role, since).deleted(at);
                    push(&mut out, "organizationMembership.deleted", event);
                }
            }
            let at = tick();
            s.deleted = true;
            push(&mut out, "organization.deleted", s.org.deleted(at));
        }
    }
    out
}

/// The provisioner the child processes run: the built-in settings (a test's config
/// file sets only broker names and worker timings).
pub fn default_provisioner() -> Provisioner {
    let settings = Settings::from_sources(None, |_| None).expect("built-in settings are valid");
    Provisioner::new(settings.provisioning)
}

/// Applies `webhooks` one at a time, in order: the oracle a faulted run must equal.
pub async fn apply_in_order(db: &PgPool, webhooks: &[Webhook]) {
    let p = default_provisioner();
    for w in webhooks {
        let incoming: Incoming = story::raw(&w.svix_id, &w.kind, w.body.clone());
        let result = p.apply_batch(db, &[incoming]).await.remove(0);
        assert!(
            result.is_ok(),
            "in-order event {} failed: {result:?}",
            w.svix_id
        );
    }
}

/// Every stored row of the entities under `prefix`, by table and key, as the JSON of
/// its columns with `prefix` taken out of every value. Left out: when this service
/// wrote a row, and the audit and processing logs (they record the delivery).
pub async fn rows(db: &PgPool, prefix: &str) -> BTreeMap<String, String> {
    let like = format!("{prefix}%");
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select 'workspaces/' || id, (to_jsonb(t) - 'created_at' - 'updated_at')::text \
           from workspaces t where id like $1 \
         union all \
         select 'workspace_quotas/' || workspace_id || '/' || name, to_jsonb(t)::text \
           from workspace_quotas t where workspace_id like $1 \
         union all \
         select 'onboarding_steps/' || workspace_id || '/' || name, \
                (to_jsonb(t) - 'updated_at')::text \
           from onboarding_steps t where workspace_id like $1 \
         union all \
         select 'members/' || membership_id, (to_jsonb(t) - 'created_at' - 'updated_at')::text \
           from members t where workspace_id like $1 \
         union all \
         select 'users/' || id, (to_jsonb(t) - 'updated_at')::text from users t where id like $1 \
         union all \
         select 'membership_removals/' || membership_id, to_jsonb(t)::text \
           from membership_removals t where membership_id like $1 \
         union all \
         select 'user_profiles/' || user_id || '/' || version || '/' || svix_id, \
                to_jsonb(t)::text \
           from user_profiles t where user_id like $1",
    )
    .bind(&like)
    .fetch_all(db)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(k, v)| (k.replace(prefix, ""), v.replace(prefix, "")))
        .collect()
}

/// The keys whose rows differ between two [`rows`] maps, with both versions.
pub fn row_diff(
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
) -> Vec<(String, Option<String>, Option<String>)> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| ((*k).clone(), a.get(k).cloned(), b.get(k).cloned()))
        .collect()
}
