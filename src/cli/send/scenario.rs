//! Canned, signed event sequences for local testing and demos (`send --scenario`),
//! and the check of the workspace they should leave behind.
//!
//! Guarantee: every scenario uses fresh svix, user and membership ids (and a fresh
//! organization unless `--org` names one), with versions (`updated_at`, envelope
//! `timestamp`) from the current time, so it never collides with earlier runs and
//! its events win over older state.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use serde::Serialize;
use serde_json::Value;

use crate::clerk::sample::{self as payload, Person};
use crate::config::ProvisioningSettings;

/// The canned scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Org created, owner admin, member added, role change, member removed, org renamed.
    Lifecycle,
    /// The lifecycle history, shuffled.
    Reorder,
    /// The lifecycle history, each event delivered 3 times with the same svix id.
    Duplicates,
    /// The organization's deletion arrives before its creation.
    DeleteFirst,
    /// A membership arrives before its organization.
    MemberFirst,
}

impl Scenario {
    /// The scenario's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Lifecycle => "lifecycle",
            Scenario::Reorder => "reorder",
            Scenario::Duplicates => "duplicates",
            Scenario::DeleteFirst => "delete-first",
            Scenario::MemberFirst => "member-first",
        }
    }
}

/// One signed delivery of a scenario.
#[derive(Debug, Clone)]
pub struct Step {
    /// Svix id (repeated for duplicates).
    pub svix_id: String,
    /// Event type.
    pub kind: String,
    /// Body to sign and send.
    pub body: Vec<u8>,
}

/// The state the read API must show once every event is processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Expected {
    /// `active` or `deleted`.
    pub status: String,
    /// The final name, when the scenario determines it.
    pub name: Option<String>,
    /// Active members: user id → Callmine role; `None` when not checked.
    pub members: Option<BTreeMap<String, String>>,
}

/// A scenario ready to send.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Which scenario.
    pub scenario: Scenario,
    /// The workspace it is about.
    pub org_id: String,
    /// Deliveries in sending order.
    pub steps: Vec<Step>,
    /// What it should leave behind.
    pub expected: Expected,
}

struct Builder<'a> {
    org_id: &'a str,
    instance_id: &'a str,
}

impl Builder<'_> {
    fn step(&self, kind: &str, data: Value, timestamp_ms: i64) -> Step {
        let body = payload::envelope(kind, data, timestamp_ms, self.instance_id);
        Step {
            svix_id: payload::fresh_id("msg"),
            kind: kind.to_owned(),
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }

    fn org(&self, name: &str, creator: &Person, created: i64, updated: i64, members: u32) -> Value {
        payload::organization(
            self.org_id,
            name,
            &creator.user_id,
            created,
            updated,
            members,
        )
    }

    fn member(&self, org: Value, person: &Person, role: &str, created: i64, updated: i64) -> Value {
        let id = payload::membership_id(self.org_id, &person.user_id);
        payload::membership(&id, org, person, role, created, updated)
    }
}

/// Builds a scenario's deliveries and expectation. `t` is the first version (ms).
pub fn plan(
    scenario: Scenario,
    org_id: &str,
    instance_id: &str,
    t: i64,
    provisioning: &ProvisioningSettings,
) -> Plan {
    let b = Builder {
        org_id,
        instance_id,
    };
    let owner = Person::of(&payload::fresh_id("user"));
    let member = Person::of(&payload::fresh_id("user"));
    let name = payload::default_org_name(org_id);
    let renamed = format!("{name} Renamed");
    let role = |clerk: &str| provisioning.role_for(clerk).as_str().to_owned();

    // The organization as Clerk embeds it in memberships at each point in time.
    let org_v0 = |members: u32| b.org(&name, &owner, t, t, members);

    let lifecycle = || {
        vec![
            b.step("organization.created", org_v0(0), t),
            b.step(
                "organizationMembership.created",
                b.member(org_v0(1), &owner, "org:admin", t + 1, t + 1),
                t + 1,
            ),
            b.step(
                "organizationMembership.created",
                b.member(org_v0(2), &member, "org:member", t + 2, t + 2),
                t + 2,
            ),
            b.step(
                "organizationMembership.updated",
                b.member(org_v0(2), &member, "org:admin", t + 2, t + 3),
                t + 3,
            ),
            b.step(
                "organizationMembership.deleted",
                b.member(org_v0(1), &member, "org:admin", t + 2, t + 4),
                t + 4,
            ),
            b.step(
                "organization.updated",
                b.org(&renamed, &owner, t, t + 5, 1),
                t + 5,
            ),
        ]
    };
    let lifecycle_expected = Expected {
        status: "active".into(),
        name: Some(renamed.clone()),
        members: Some(BTreeMap::from([(owner.user_id.clone(), role("org:admin"))])),
    };

    let (steps, expected) = match scenario {
        Scenario::Lifecycle => (lifecycle(), lifecycle_expected),
        Scenario::Reorder => {
            let ordered = lifecycle();
            let mut shuffled = ordered.clone();
            let mut rng = rand::rng();
            // Six events: a shuffle equals the original 1 time in 720; make sure
            // the demo really is out of order.
            while shuffled
                .iter()
                .map(|s| &s.svix_id)
                .eq(ordered.iter().map(|s| &s.svix_id))
            {
                shuffled.shuffle(&mut rng);
            }
            (shuffled, lifecycle_expected)
        }
        Scenario::Duplicates => {
            let once = lifecycle();
            let mut thrice = Vec::with_capacity(once.len() * 3);
            for _ in 0..3 {
                thrice.extend(once.iter().cloned());
            }
            (thrice, lifecycle_expected)
        }
        Scenario::DeleteFirst => (
            vec![
                b.step(
                    "organization.deleted",
                    payload::deleted_organization(org_id, &name),
                    t + 10,
                ),
                b.step("organization.created", org_v0(0), t),
                b.step(
                    "organizationMembership.created",
                    b.member(org_v0(1), &owner, "org:admin", t + 1, t + 1),
                    t + 1,
                ),
            ],
            Expected {
                status: "deleted".into(),
                name: None,
                members: Some(BTreeMap::new()),
            },
        ),
        Scenario::MemberFirst => (
            vec![
                b.step(
                    "organizationMembership.created",
                    b.member(org_v0(1), &owner, "org:admin", t + 1, t + 1),
                    t + 1,
                ),
                b.step("organization.created", org_v0(0), t),
                b.step(
                    "organizationMembership.created",
                    b.member(org_v0(2), &member, "org:member", t + 2, t + 2),
                    t + 2,
                ),
            ],
            Expected {
                status: "active".into(),
                name: Some(name.clone()),
                members: Some(BTreeMap::from([
                    (owner.user_id.clone(), role("org:admin")),
                    (member.user_id.clone(), role("org:member")),
                ])),
            },
        ),
    };
    Plan {
        scenario,
        org_id: org_id.to_owned(),
        steps,
        expected,
    }
}

/// Differences between the read API's answers and the expectation (empty = match).
pub fn differences(expected: &Expected, workspace: &Value, members: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    if workspace.is_null() {
        diffs.push("the workspace was not provisioned (404)".to_owned());
        return diffs;
    }
    if workspace["status"].as_str() != Some(expected.status.as_str()) {
        diffs.push(format!(
            "status is {}, expected {}",
            workspace["status"], expected.status
        ));
    }
    if let Some(name) = &expected.name
        && workspace["name"].as_str() != Some(name.as_str())
    {
        diffs.push(format!("name is {}, expected {name:?}", workspace["name"]));
    }
    if let Some(want) = &expected.members {
        // A deleted workspace may answer 404 for its members: none are active.
        let got: BTreeMap<String, String> = members["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        Some((
                            m["user_id"].as_str()?.to_owned(),
                            m["role"].as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if &got != want {
            diffs.push(format!("active members are {got:?}, expected {want:?}"));
        }
    }
    diffs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn settings() -> Settings {
        Settings::from_sources(None, |_| None).unwrap()
    }

    fn kinds(p: &Plan) -> Vec<&str> {
        p.steps.iter().map(|s| s.kind.as_str()).collect()
    }

    #[test]
    fn lifecycle_is_the_history_in_order_with_rising_versions() {
        let s = settings();
        let p = plan(
            Scenario::Lifecycle,
            "org_abc",
            "ins_x",
            1_000,
            &s.provisioning,
        );
        assert_eq!(
            kinds(&p),
            [
                "organization.created",
                "organizationMembership.created",
                "organizationMembership.created",
                "organizationMembership.updated",
                "organizationMembership.deleted",
                "organization.updated"
            ]
        );
        let versions: Vec<i64> = p
            .steps
            .iter()
            .map(|s| {
                serde_json::from_slice::<Value>(&s.body).unwrap()["timestamp"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert_eq!(p.expected.status, "active");
        assert_eq!(p.expected.members.as_ref().unwrap().len(), 1);
        let ids: std::collections::HashSet<_> = p.steps.iter().map(|s| &s.svix_id).collect();
        assert_eq!(ids.len(), 6, "fresh svix id per event");
    }

    #[test]
    fn reorder_shuffles_and_duplicates_repeat_svix_ids() {
        let s = settings();
        let r = plan(
            Scenario::Reorder,
            "org_abc",
            "ins_x",
            1_000,
            &s.provisioning,
        );
        assert_eq!(r.steps.len(), 6);
        assert_ne!(
            kinds(&r),
            kinds(&plan(
                Scenario::Lifecycle,
                "org_abc",
                "ins_x",
                1_000,
                &s.provisioning
            ))
        );
        let d = plan(
            Scenario::Duplicates,
            "org_abc",
            "ins_x",
            1_000,
            &s.provisioning,
        );
        assert_eq!(d.steps.len(), 18);
        for step in &d.steps {
            let n = d.steps.iter().filter(|s| s.svix_id == step.svix_id).count();
            assert_eq!(n, 3);
        }
    }

    #[test]
    fn delete_first_and_member_first_put_the_late_event_first() {
        let s = settings();
        let d = plan(
            Scenario::DeleteFirst,
            "org_abc",
            "ins_x",
            1_000,
            &s.provisioning,
        );
        assert_eq!(kinds(&d)[0], "organization.deleted");
        assert_eq!(d.expected.status, "deleted");
        let m = plan(
            Scenario::MemberFirst,
            "org_abc",
            "ins_x",
            1_000,
            &s.provisioning,
        );
        assert_eq!(kinds(&m)[0], "organizationMembership.created");
        let first: Value = serde_json::from_slice(&m.steps[0].body).unwrap();
        assert_eq!(first["data"]["organization"]["id"], "org_abc");
        assert_eq!(m.expected.members.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn differences_name_what_is_off() {
        let e = Expected {
            status: "active".into(),
            name: Some("Acme".into()),
            members: Some(BTreeMap::from([("user_1".into(), "admin".into())])),
        };
        let ws = serde_json::json!({"status": "active", "name": "Acme"});
        let ok = serde_json::json!({"data": [{"user_id": "user_1", "role": "admin"}]});
        assert!(differences(&e, &ws, &ok).is_empty());
        let off = serde_json::json!({"data": [{"user_id": "user_1", "role": "member"}]});
        assert_eq!(differences(&e, &ws, &off).len(), 1);
        assert_eq!(differences(&e, &Value::Null, &ok).len(), 1);
        let deleted = serde_json::json!({"status": "deleted", "name": "Other"});
        assert_eq!(differences(&e, &deleted, &ok).len(), 2);
    }
}
