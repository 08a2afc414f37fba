//! The history model's webhooks and the state it describes: each event of a
//! [`Model`] rendered as the webhook Clerk sends, for one run's ids (a prefix), and
//! the provisioned state the history describes, compared with the stored one.
//! Shared by the convergence property and the nemesis (one place to add an event
//! kind: `Ev` in model.rs, its rendering and its expected effect here).

use std::collections::BTreeMap;

use super::model::*;
use crate::common::story;
use provisioner::clerk::sample::{self as payload, Person};
use provisioner::provision::{Actor, Incoming, Provisioner};
use serde_json::json;
use sqlx::PgPool;

// ---- rendering the history as webhooks for one set of ids ----------------------------

/// A user's display fields at `tag` (the user id keeps the run's prefix).
pub(crate) fn person(prefix: &str, user: usize, tag: &str) -> Person {
    Person {
        user_id: format!("{prefix}user_{user}"),
        email: format!("u{user}.{tag}@example.com"),
        first_name: format!("First {tag}"),
        last_name: format!("Last {user}"),
    }
}

pub(crate) fn org_of(prefix: &str, snap: &OrgSnap) -> story::Org {
    let org = story::org(&format!("{prefix}org_{}", snap.idx))
        .named(&snap.name)
        .version(snap.updated_at);
    match snap.plan {
        Some(plan) => org.plan(plan),
        None => org,
    }
}

pub(crate) fn membership_of(prefix: &str, m: &MemSnap) -> story::Membership {
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
pub(crate) fn render(prefix: &str, e: &HistEvent) -> Incoming {
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
pub(crate) struct State {
    /// id -> (name, slug, status, plan)
    pub(crate) workspaces: BTreeMap<String, (Option<String>, Option<String>, String, String)>,
    /// (workspace, quota) -> limit
    pub(crate) quotas: BTreeMap<(String, String), i64>,
    /// membership id -> its row, removed ones included
    pub(crate) members: BTreeMap<String, MemberView>,
    /// (workspace, user) -> role of every active member (`active_members`: what
    /// every read route decides access, member lists, counts and the org switcher on)
    pub(crate) access: BTreeMap<(String, String), String>,
}

/// A member row: workspace, user, role, Clerk role, email, first and last name,
/// and whether it is removed.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct MemberView {
    pub(crate) workspace_id: String,
    pub(crate) user_id: String,
    pub(crate) role: String,
    pub(crate) clerk_role: String,
    pub(crate) email: Option<String>,
    pub(crate) first_name: Option<String>,
    pub(crate) last_name: Option<String>,
    pub(crate) removed: bool,
}

pub(crate) async fn state(db: &PgPool, prefix: &str) -> State {
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
pub(crate) fn expected(model: &Model, p: &Provisioner) -> State {
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
