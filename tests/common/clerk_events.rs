//! Clerk-shaped event bodies and `Incoming` events for tests that drive the
//! provisioner directly: a thin layer over the one generator,
//! `provisioner::ops::send::payload`, that pins the values these tests assert on
//! (image URLs, a secondary email before the primary one, plain role names).

use provisioner::clerk::EventType;
use provisioner::ops::send::payload;
use provisioner::provision::{Actor, Incoming};
use serde_json::{Value, json};

use super::envelope;

/// `created_at` of every object these builders make.
const CREATED_AT: i64 = 1_700_000_000_000;

/// `data` of an organization event (also embedded in memberships).
pub fn org_data(id: &str, name: &str, plan: Option<&str>, updated_at: i64) -> Value {
    let mut org = payload::with_plan(
        payload::organization(id, name, "user_creator", CREATED_AT, updated_at, 1),
        plan,
    );
    org["slug"] = json!(name.to_lowercase().replace(' ', "-"));
    org["image_url"] = json!(format!("https://img.example/{id}"));
    org["has_image"] = json!(true);
    org
}

/// Display fields of a member as Clerk sends them in `public_user_data`.
#[derive(Debug, Clone)]
pub struct Person {
    /// `user_…`
    pub user_id: String,
    /// Email (identifier).
    pub email: String,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
}

impl Person {
    /// A person with derived names.
    pub fn new(user_id: &str, tag: &str) -> Self {
        Self {
            user_id: user_id.to_owned(),
            email: format!("{user_id}.{tag}@example.com"),
            first_name: format!("First{tag}"),
            last_name: format!("Last{tag}"),
        }
    }

    /// The same person for the generator.
    pub fn clerk(&self) -> payload::Person {
        payload::Person {
            user_id: self.user_id.clone(),
            first_name: self.first_name.clone(),
            last_name: self.last_name.clone(),
            email: self.email.clone(),
        }
    }

    fn image_url(&self) -> String {
        format!("https://img.example/{}", self.user_id)
    }
}

/// `data` of a membership event.
pub fn membership_data(
    id: &str,
    org: Value,
    person: &Person,
    role: &str,
    created_at: i64,
    updated_at: i64,
) -> Value {
    let mut m = payload::membership(id, org, &person.clerk(), role, created_at, updated_at);
    m["role_name"] = json!(role);
    m["permissions"] = json!([]);
    m["public_user_data"]["profile_image_url"] = Value::Null;
    m["public_user_data"]["image_url"] = json!(person.image_url());
    m
}

/// `data` of a `user.updated` event: the primary email is the second of two.
pub fn user_data(person: &Person, updated_at: i64) -> Value {
    let mut u = payload::user(&person.clerk(), CREATED_AT, updated_at);
    let primary = format!("idn_{}", person.user_id);
    u["image_url"] = json!(person.image_url());
    u["primary_email_address_id"] = json!(primary);
    u["email_addresses"] = json!([
        { "id": "idn_other", "object": "email_address", "email_address": "secondary@example.com" },
        { "id": primary, "object": "email_address", "email_address": person.email },
    ]);
    u
}

/// `data` of a deleted object (`organization.deleted`, `user.deleted`).
pub fn deleted_data(object: &str, id: &str) -> Value {
    payload::deleted(object, id)
}

/// An event as the worker would hand it over.
pub fn incoming(svix_id: &str, kind: &str, data: Value, timestamp_ms: i64) -> Incoming {
    incoming_raw(svix_id, kind, envelope(kind, data, timestamp_ms))
}

/// An event with a hand-made body.
pub fn incoming_raw(svix_id: &str, kind: &str, body: Vec<u8>) -> Incoming {
    Incoming {
        svix_id: svix_id.to_owned(),
        kind: (!kind.is_empty()).then(|| EventType::parse(kind)),
        body,
        received_at: chrono::Utc::now(),
        actor: Actor::Clerk,
    }
}
