//! Builders of Clerk-shaped event bodies and `Incoming` events, for tests that drive
//! the provisioner directly.

use provisioner::clerk::EventType;
use provisioner::provision::{Actor, Incoming};
use serde_json::{Value, json};

use super::envelope;

/// `data` of an organization event (also embedded in memberships).
pub fn org_data(id: &str, name: &str, plan: Option<&str>, updated_at: i64) -> Value {
    json!({
        "object": "organization",
        "id": id,
        "name": name,
        "slug": name.to_lowercase().replace(' ', "-"),
        "image_url": format!("https://img.example/{id}"),
        "has_image": true,
        "max_allowed_memberships": 5,
        "admin_delete_enabled": true,
        "public_metadata": match plan { Some(p) => json!({ "plan": p }), None => json!({}) },
        "private_metadata": {},
        "created_by": "user_creator",
        "created_at": 1_700_000_000_000i64,
        "updated_at": updated_at,
    })
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
    json!({
        "object": "organization_membership",
        "id": id,
        "role": role,
        "role_name": role,
        "permissions": [],
        "public_metadata": {},
        "private_metadata": {},
        "organization": org,
        "public_user_data": {
            "user_id": person.user_id,
            "first_name": person.first_name,
            "last_name": person.last_name,
            "profile_image_url": null,
            "image_url": format!("https://img.example/{}", person.user_id),
            "has_image": false,
            "identifier": person.email,
        },
        "created_at": created_at,
        "updated_at": updated_at,
    })
}

/// `data` of a `user.updated` event.
pub fn user_data(person: &Person, updated_at: i64) -> Value {
    json!({
        "object": "user",
        "id": person.user_id,
        "first_name": person.first_name,
        "last_name": person.last_name,
        "image_url": format!("https://img.example/{}", person.user_id),
        "has_image": false,
        "primary_email_address_id": format!("idn_{}", person.user_id),
        "email_addresses": [
            { "id": "idn_other", "object": "email_address", "email_address": "secondary@example.com" },
            { "id": format!("idn_{}", person.user_id), "object": "email_address", "email_address": person.email },
        ],
        "private_metadata": null,
        "created_at": 1_700_000_000_000i64,
        "updated_at": updated_at,
    })
}

/// `data` of a deleted object (`organization.deleted`, `user.deleted`).
pub fn deleted_data(object: &str, id: &str) -> Value {
    json!({ "object": object, "id": id, "deleted": true })
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
