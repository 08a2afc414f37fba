//! Stories of Clerk events for tests that drive the provisioner directly:
//! `org("org_a").named("Acme").created(T0).svix("m1")`, `acme.membership("mem_1",
//! &jane).role("org:admin").created(T0)`, `user_updated(&jane, T0)`.
//!
//! Guarantee: every body comes from the product's one Clerk JSON generator
//! (`provisioner::clerk::sample`), so tests apply the shapes `send` and the
//! load tools send; what this module adds is only what a test needs to state a
//! case (a plan in the metadata, a second email address, a hand-edited field).

use provisioner::clerk::EventType;
use provisioner::clerk::sample as payload;
pub use provisioner::clerk::sample::Person;
use provisioner::provision::{Actor, Incoming};
use serde_json::{Value, json};

/// The envelope `instance_id` of every test event.
const INSTANCE_ID: &str = "ins_test";
/// Who created every test organization, and when.
const CREATOR: &str = "user_creator";
const ORG_CREATED_AT: i64 = 1_700_000_000_000;

/// A person whose display fields derive from `tag`: `{user_id}.{tag}@example.com`,
/// `First{tag}`, `Last{tag}`, so a test changes them by changing the tag.
pub fn person(user_id: &str, tag: &str) -> Person {
    Person {
        user_id: user_id.to_owned(),
        email: format!("{user_id}.{tag}@example.com"),
        first_name: format!("First{tag}"),
        last_name: format!("Last{tag}"),
    }
}

/// An organization as Clerk describes it at one version.
#[derive(Debug, Clone)]
pub struct Org {
    id: String,
    name: String,
    plan: Option<String>,
    version: i64,
}

/// The organization `id`, named after its id, on the default plan, at version 0
/// (events set their own version; see [`Org::version`] for embedded snapshots).
pub fn org(id: &str) -> Org {
    Org {
        id: id.to_owned(),
        name: payload::default_org_name(id),
        plan: None,
        version: 0,
    }
}

impl Org {
    /// Its name (the slug follows it).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// `public_metadata.plan`.
    pub fn plan(mut self, plan: &str) -> Self {
        self.plan = Some(plan.to_owned());
        self
    }

    /// The snapshot's `updated_at`, as embedded in memberships.
    pub fn version(mut self, at: i64) -> Self {
        self.version = at;
        self
    }

    /// The Organization object at `updated_at = at`.
    pub fn data_at(&self, at: i64) -> Value {
        let mut data = payload::organization(&self.id, &self.name, CREATOR, ORG_CREATED_AT, at, 1);
        if let Some(plan) = &self.plan {
            data["public_metadata"] = json!({ "plan": plan });
        }
        data
    }

    /// `organization.created` of this snapshot at version `at`.
    pub fn created(&self, at: i64) -> Event {
        Event::new("organization.created", self.data_at(at), at)
    }

    /// `organization.updated` of this snapshot at version `at`.
    pub fn updated(&self, at: i64) -> Event {
        Event::new("organization.updated", self.data_at(at), at)
    }

    /// `organization.deleted` at `at`.
    pub fn deleted(&self, at: i64) -> Event {
        let data = payload::deleted_organization(&self.id, &self.name);
        Event::new("organization.deleted", data, at)
    }

    /// A membership of `person` in this organization (this snapshot embedded),
    /// role `org:member`, created at [`Org::version`].
    pub fn membership(&self, id: &str, person: &Person) -> Membership {
        Membership {
            id: id.to_owned(),
            org: self.clone(),
            person: person.clone(),
            role: "org:member".to_owned(),
            created_at: self.version,
        }
    }
}

/// An organization membership as Clerk describes it.
#[derive(Debug, Clone)]
pub struct Membership {
    id: String,
    org: Org,
    person: Person,
    role: String,
    created_at: i64,
}

impl Membership {
    /// Its Clerk role key (`org:admin`, `org:member`, a custom one).
    pub fn role(mut self, role: &str) -> Self {
        self.role = role.to_owned();
        self
    }

    /// Its `created_at`.
    pub fn since(mut self, at: i64) -> Self {
        self.created_at = at;
        self
    }

    /// The OrganizationMembership object at `updated_at = at`.
    pub fn data_at(&self, at: i64) -> Value {
        let org = self.org.data_at(self.org.version);
        payload::membership(&self.id, org, &self.person, &self.role, self.created_at, at)
    }

    /// `organizationMembership.created` at version `at`.
    pub fn created(&self, at: i64) -> Event {
        Event::new("organizationMembership.created", self.data_at(at), at)
    }

    /// `organizationMembership.updated` at version `at`.
    pub fn updated(&self, at: i64) -> Event {
        Event::new("organizationMembership.updated", self.data_at(at), at)
    }

    /// `organizationMembership.deleted`: the membership as it was, sent at `at`.
    pub fn deleted(&self, at: i64) -> Event {
        Event::new("organizationMembership.deleted", self.data_at(at), at)
    }
}

/// `user.updated` of `person` at version `at`. The user has a secondary address
/// listed before the primary one, so the primary must be picked by id.
pub fn user_updated(person: &Person, at: i64) -> Event {
    let mut data = payload::user(person, ORG_CREATED_AT, at);
    data["email_addresses"]
        .as_array_mut()
        .expect("the generator lists email addresses")
        .insert(
            0,
            json!({ "id": "idn_other", "object": "email_address", "email_address": "secondary@example.com" }),
        );
    Event::new("user.updated", data, at)
}

/// `user.deleted` of `user_id` at `at`.
pub fn user_deleted(user_id: &str, at: i64) -> Event {
    Event::new("user.deleted", payload::deleted_user(user_id), at)
}

/// One webhook about to be handed to the provisioner.
#[derive(Debug, Clone)]
pub struct Event {
    svix_id: String,
    kind: String,
    data: Value,
    at: i64,
    actor: Actor,
}

impl Event {
    /// A `kind` event with `data`, envelope timestamp `at`, from Clerk, with a fresh
    /// svix id.
    pub fn new(kind: &str, data: Value, at: i64) -> Self {
        Self {
            svix_id: payload::fresh_id("msg"),
            kind: kind.to_owned(),
            data,
            at,
            actor: Actor::Clerk,
        }
    }

    /// Its svix id (the dedup key a test looks its log row up by).
    pub fn svix(mut self, id: &str) -> Self {
        self.svix_id = id.to_owned();
        self
    }

    /// Its envelope timestamp, when it differs from the version in `data` (a
    /// deletion sends the membership as it was, later).
    pub fn sent_at(mut self, at: i64) -> Self {
        self.at = at;
        self
    }

    /// Who sent it (a replay, `reconcile`).
    pub fn by(mut self, actor: Actor) -> Self {
        self.actor = actor;
        self
    }

    /// Edits `data` by hand, to state a malformed or unusual payload.
    pub fn with(mut self, edit: impl FnOnce(&mut Value)) -> Self {
        edit(&mut self.data);
        self
    }

    /// The event as the worker hands it over.
    pub fn incoming(self) -> Incoming {
        let body = envelope(&self.kind, self.data, self.at);
        let mut incoming = raw(&self.svix_id, &self.kind, body);
        incoming.actor = self.actor;
        incoming
    }
}

impl From<Event> for Incoming {
    fn from(event: Event) -> Self {
        event.incoming()
    }
}

/// The body of a `kind` webhook around `data` with envelope timestamp `at`.
pub fn envelope(kind: &str, data: Value, at: i64) -> Vec<u8> {
    serde_json::to_vec(&payload::envelope(kind, data, at, INSTANCE_ID)).expect("JSON")
}

/// An event with a hand-made body, as the worker hands it over.
pub fn raw(svix_id: &str, kind: &str, body: Vec<u8>) -> Incoming {
    Incoming {
        svix_id: svix_id.to_owned(),
        kind: (!kind.is_empty()).then(|| EventType::parse(kind)),
        body,
        received_at: chrono::Utc::now(),
        actor: Actor::Clerk,
        replayed_by: None,
    }
}
