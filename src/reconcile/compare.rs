//! The comparison of what Clerk lists with the rows here: each difference is
//! reported as drift and, where provisioning can repair it, answered by a repair.
//!
//! Guarantee: a snapshot older than what a webhook applied is no drift; a
//! workspace or membership Clerk ended is reported, never revived; one reconcile
//! only inferred gone is restored by its snapshot; nothing here writes: repairs
//! are only collected in the [`Pass`].

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::repair::{Pass, prepared};
use super::report::DriftKind;
use super::{ReconcileError, Reconciler};
use crate::provision::payload::{self, Event, Membership, Organization};

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

pub(super) fn decode_organization(value: &Value) -> Result<Organization, String> {
    payload::organization_object(value).map_err(|e| e.0)
}

pub(super) fn decode_membership(value: &Value) -> Result<Membership, String> {
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

/// The `id` of a Clerk object (empty when it has none).
pub(super) fn id_of(value: &Value) -> String {
    id_str(value).to_owned()
}

/// [`id_of`], borrowed.
pub(super) fn id_str(value: &Value) -> &str {
    value["id"].as_str().unwrap_or_default()
}

impl Reconciler {
    /// Compares organizations Clerk listed with the workspaces here.
    pub(super) async fn compare_organizations(
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

    /// Compares memberships Clerk listed with the members here.
    pub(super) async fn compare_memberships(
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
}
