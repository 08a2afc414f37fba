//! Clerk-shaped event bodies, after the shapes in `reference/clerk-events.md` (Clerk's
//! webhook OpenAPI examples): the one generator of Clerk JSON, used by `send` and its
//! scenarios, the load tools (`provisioner-load`), the benchmarks and the tests.
//!
//! Guarantee: pure and deterministic given its inputs. Names, emails and membership
//! ids are derived from the ids, so separate `send` calls about the same
//! organization and user describe the same things.

use rand::Rng;
use serde_json::{Value, json};

/// The instance id used when `clerk.instance_id` is not configured.
pub const DEVELOPMENT_INSTANCE_ID: &str = "ins_2callminedevelopment0000";

/// A fresh Clerk-style id: `prefix` + `_` + 27 base-62 characters.
pub fn fresh_id(prefix: &str) -> String {
    const CHARS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let tail: String = (0..27)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect();
    format!("{prefix}_{tail}")
}

/// FNV-1a, for stable derived names and ids (not for security).
fn fnv(text: &str, seed: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn tail(id: &str, n: usize) -> String {
    let chars: Vec<char> = id.chars().collect();
    chars[chars.len().saturating_sub(n)..].iter().collect()
}

/// The default name of an organization: stable for a given id.
pub fn default_org_name(org_id: &str) -> String {
    const NAMES: [&str; 8] = [
        "Acme", "Globex", "Initech", "Hooli", "Umbrella", "Soylent", "Vandelay", "Wonka",
    ];
    let name = NAMES[(fnv(org_id, 1) % NAMES.len() as u64) as usize];
    format!("{name} {}", tail(org_id, 4).to_uppercase())
}

/// A URL slug of a name (`Acme Corp` → `acme-corp`).
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_owned()
}

/// The membership id of a user in an organization: stable, so `send` can update or
/// delete the membership an earlier `send` created.
pub fn membership_id(org_id: &str, user_id: &str) -> String {
    let key = format!("{org_id}/{user_id}");
    format!("orgmem_{:016x}{:011x}", fnv(&key, 2), fnv(&key, 3) >> 20)
}

/// A person's display fields, derived from the user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// `user_…`.
    pub user_id: String,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// Primary email.
    pub email: String,
}

impl Person {
    /// Derives a person from a user id.
    pub fn of(user_id: &str) -> Self {
        const PEOPLE: [(&str, &str); 8] = [
            ("Ada", "Lovelace"),
            ("Grace", "Hopper"),
            ("Alan", "Turing"),
            ("Katherine", "Johnson"),
            ("Edsger", "Dijkstra"),
            ("Barbara", "Liskov"),
            ("Donald", "Knuth"),
            ("Margaret", "Hamilton"),
        ];
        let (first, last) = PEOPLE[(fnv(user_id, 4) % PEOPLE.len() as u64) as usize];
        let email = format!(
            "{}.{}+{}@example.com",
            first.to_lowercase(),
            last.to_lowercase(),
            tail(user_id, 6).to_lowercase()
        );
        Person {
            user_id: user_id.to_owned(),
            first_name: first.to_owned(),
            last_name: last.to_owned(),
            email,
        }
    }
}

/// The event envelope around `data`.
pub fn envelope(kind: &str, data: Value, timestamp_ms: i64, instance_id: &str) -> Value {
    json!({
        "data": data,
        "event_attributes": {
            "http_request": {
                "client_ip": "127.0.0.1",
                "user_agent": concat!("provisioner-send/", env!("CARGO_PKG_VERSION")),
            }
        },
        "instance_id": instance_id,
        "object": "event",
        "timestamp": timestamp_ms,
        "type": kind,
    })
}

/// An Organization object (`data` of `organization.created|updated`, and embedded
/// in memberships).
pub fn organization(
    id: &str,
    name: &str,
    created_by: &str,
    created_at: i64,
    updated_at: i64,
    members_count: u32,
) -> Value {
    json!({
        "object": "organization",
        "id": id,
        "name": name,
        "slug": slug(name),
        "image_url": "https://img.clerk.com/eyJ0eXBlIjoiZGVmYXVsdCJ9",
        "has_image": false,
        "members_count": members_count,
        "missing_member_with_elevated_permissions": false,
        "pending_invitations_count": 0,
        "max_allowed_memberships": 5,
        "admin_delete_enabled": true,
        "public_metadata": {},
        "private_metadata": {},
        "created_by": created_by,
        "created_at": created_at,
        "updated_at": updated_at,
    })
}

/// A subscription item as Clerk Billing describes it (`reference/clerk-billing.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct BillingItem {
    /// `csub_item_…`
    pub id: String,
    /// `csub_…`
    pub subscription_id: String,
    /// `active`, `canceled`, `upcoming`, `ended`, `past_due`, …
    pub status: String,
    /// The plan's slug (`pro-plan`); `None` sends `plan: null`.
    pub plan: Option<String>,
    /// `is_free_trial`.
    pub is_free_trial: bool,
    /// ms
    pub period_start: i64,
    /// ms; `None` for the free default plan.
    pub period_end: Option<i64>,
    /// `None`: no `seats` (not seat-based); `Some(None)`: unlimited.
    pub seats: Option<Option<i64>>,
    /// ms; also `canceled_at` / `past_due_at` / `ended_at` for those statuses.
    pub updated_at: i64,
}

impl BillingItem {
    /// An item of `subscription_id` on `plan`, `active` from `period_start` for 30
    /// days, not seat-based, at version `period_start`.
    pub fn new(id: &str, subscription_id: &str, plan: &str, period_start: i64) -> Self {
        Self {
            id: id.to_owned(),
            subscription_id: subscription_id.to_owned(),
            status: "active".to_owned(),
            plan: Some(plan.to_owned()),
            is_free_trial: false,
            period_start,
            period_end: Some(period_start + 30 * 86_400_000),
            seats: None,
            updated_at: period_start,
        }
    }
}

/// The payer of an organization's subscription (`''` for a user payer).
pub fn payer(organization_id: &str) -> Value {
    json!({
        "object": "commerce_payer",
        "id": format!("cpayer_{}", fnv(organization_id, 7) % 1_000_000_007),
        "user_id": if organization_id.is_empty() { "user_payer" } else { "" },
        "organization_id": organization_id,
        "organization_name": if organization_id.is_empty() { String::new() } else { default_org_name(organization_id) },
        "created_at": 1_700_000_000_000_i64,
        "updated_at": 1_700_000_000_000_i64,
    })
}

/// A subscription item without its payer (as a subscription lists it).
fn item_object(item: &BillingItem) -> Value {
    let at = |status: &str| (item.status == status).then_some(item.updated_at);
    let mut v = json!({
        "object": "commerce_subscription_item",
        "id": item.id,
        "status": item.status,
        "is_free_trial": item.is_free_trial,
        "created_at": item.period_start.min(item.updated_at),
        "updated_at": item.updated_at,
        "period_start": item.period_start,
        "period_end": item.period_end,
        "interval": "month",
        "canceled_at": at("canceled"),
        "past_due_at": at("past_due"),
        "ended_at": at("ended"),
        "plan_id": item.plan.as_ref().map(|p| format!("cplan_{p}")),
        "plan": item.plan.as_ref().map(|p| json!({
            "id": format!("cplan_{p}"), "slug": p, "name": p, "is_recurring": true,
            "amount": 2000, "currency": "USD",
        })),
        "subscription_id": item.subscription_id,
    });
    if let Some(quantity) = item.seats {
        v["seats"] = json!({ "quantity": quantity });
    }
    v
}

/// The `data` of `subscriptionItem.*`: one item with its payer.
pub fn subscription_item(organization_id: &str, item: &BillingItem) -> Value {
    let mut v = item_object(item);
    v["payer"] = payer(organization_id);
    v
}

/// The `data` of `subscription.*`: the subscription with its payer and `items`.
pub fn subscription(
    organization_id: &str,
    id: &str,
    status: &str,
    past_due_at: Option<i64>,
    updated_at: i64,
    items: &[BillingItem],
) -> Value {
    let payer = payer(organization_id);
    json!({
        "object": "commerce_subscription",
        "id": id,
        "status": status,
        "active_at": items.iter().map(|i| i.period_start).min(),
        "canceled_at": null,
        "ended_at": null,
        "past_due_at": past_due_at,
        "created_at": items.iter().map(|i| i.period_start).min().unwrap_or(updated_at),
        "updated_at": updated_at,
        "payer_id": payer["id"],
        "payer": payer,
        "items": items.iter().map(item_object).collect::<Vec<_>>(),
    })
}

/// The organization's one subscription item as a `subscriptionItem.*` event of
/// `kind` says it stands (`…canceled` → `canceled`, `…freeTrialEnding` → an active
/// free trial, …), on the `pro` plan, at version `now`: what `send` sends.
fn billing_item_for(kind: &str, organization_id: &str, now: i64) -> BillingItem {
    let key = fnv(organization_id, 11) % 1_000_000_007;
    let mut item = BillingItem::new(
        &format!("csub_item_{key}"),
        &format!("csub_{key}"),
        "pro",
        now,
    );
    let (status, trial) = match kind.rsplit('.').next().unwrap_or_default() {
        "canceled" => ("canceled", false),
        "upcoming" => ("upcoming", false),
        "ended" => ("ended", false),
        "abandoned" => ("abandoned", false),
        "incomplete" => ("incomplete", false),
        "pastDue" => ("past_due", false),
        "freeTrialEnding" => ("active", true),
        _ => ("active", false),
    };
    item.status = status.to_owned();
    item.is_free_trial = trial;
    item
}

/// The DeletedObject of `organization.deleted`.
pub fn deleted_organization(id: &str, name: &str) -> Value {
    json!({"object": "organization", "id": id, "slug": slug(name), "deleted": true})
}

fn role_name(role: &str) -> String {
    let key = role.strip_prefix("org:").unwrap_or(role);
    let mut chars = key.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn permissions(role: &str) -> Value {
    if role == "org:admin" {
        json!([
            "org:sys_profile:manage",
            "org:sys_profile:delete",
            "org:sys_memberships:read",
            "org:sys_memberships:manage",
            "org:sys_domains:read",
            "org:sys_domains:manage"
        ])
    } else {
        json!(["org:sys_memberships:read"])
    }
}

/// An OrganizationMembership object (`data` of `organizationMembership.*`).
pub fn membership(
    id: &str,
    organization: Value,
    person: &Person,
    role: &str,
    created_at: i64,
    updated_at: i64,
) -> Value {
    json!({
        "object": "organization_membership",
        "id": id,
        "role": role,
        "role_name": role_name(role),
        "permissions": permissions(role),
        "public_metadata": {},
        "private_metadata": {},
        "organization": organization,
        "public_user_data": {
            "user_id": person.user_id,
            "first_name": person.first_name,
            "last_name": person.last_name,
            "profile_image_url": "https://img.clerk.com/eyJ0eXBlIjoicHJveHkifQ",
            "image_url": "https://img.clerk.com/eyJ0eXBlIjoicHJveHkifQ",
            "has_image": false,
            "identifier": person.email,
        },
        "created_at": created_at,
        "updated_at": updated_at,
    })
}

/// A User object (`data` of `user.created|updated`).
pub fn user(person: &Person, created_at: i64, updated_at: i64) -> Value {
    let email_id = format!("idn_{:016x}", fnv(&person.user_id, 5));
    json!({
        "object": "user",
        "id": person.user_id,
        "external_id": null,
        "username": null,
        "first_name": person.first_name,
        "last_name": person.last_name,
        "image_url": "https://img.clerk.com/eyJ0eXBlIjoicHJveHkifQ",
        "has_image": false,
        "primary_email_address_id": email_id,
        "primary_phone_number_id": null,
        "primary_web3_wallet_id": null,
        "email_addresses": [{
            "id": email_id,
            "object": "email_address",
            "email_address": person.email,
            "reserved": false,
            "verification": {"status": "verified", "strategy": "email_code", "attempts": 1, "expire_at": null},
            "linked_to": [],
            "created_at": created_at,
            "updated_at": updated_at,
        }],
        "phone_numbers": [],
        "web3_wallets": [],
        "passkeys": [],
        "external_accounts": [],
        "saml_accounts": [],
        "enterprise_accounts": [],
        "public_metadata": {},
        "private_metadata": null,
        "unsafe_metadata": {},
        "password_enabled": false,
        "two_factor_enabled": false,
        "totp_enabled": false,
        "backup_code_enabled": false,
        "banned": false,
        "locked": false,
        "delete_self_enabled": true,
        "create_organization_enabled": true,
        "last_sign_in_at": null,
        "last_active_at": updated_at,
        "created_at": created_at,
        "updated_at": updated_at,
    })
}

/// The DeletedObject of `user.deleted`.
pub fn deleted_user(id: &str) -> Value {
    deleted("user", id)
}

/// A bare DeletedObject of any `object` kind (`organization`, `user`, …).
pub fn deleted(object: &str, id: &str) -> Value {
    json!({"object": object, "id": id, "deleted": true})
}

/// An organization object on `plan` (`public_metadata.plan`), or on none.
pub fn with_plan(mut organization: Value, plan: Option<&str>) -> Value {
    organization["public_metadata"] = match plan {
        Some(p) => json!({ "plan": p }),
        None => json!({}),
    };
    organization
}

/// An OrganizationInvitation object (`data` of `organizationInvitation.*`).
pub fn invitation(kind: &str, org_id: &str, person: &Person, role: &str, now_ms: i64) -> Value {
    let status = match kind {
        "organizationInvitation.accepted" => "accepted",
        "organizationInvitation.revoked" => "revoked",
        _ => "pending",
    };
    let mut data = json!({
        "object": "organization_invitation",
        "id": format!("orginv_{:016x}", fnv(&format!("{org_id}/{}", person.email), 6)),
        "email_address": person.email,
        "role": role,
        "role_name": role_name(role),
        "organization_id": org_id,
        "status": status,
        "public_metadata": {},
        "private_metadata": {},
        "url": null,
        "expires_at": now_ms + 30 * 24 * 3600 * 1000,
        "created_at": now_ms,
        "updated_at": now_ms,
    });
    if status == "accepted" {
        data["user_id"] = Value::from(person.user_id.clone());
    }
    data
}

/// Version of an embedded organization whose real state `send` does not know
/// (2020-01-01): older than any real state, so it provisions an unknown workspace
/// but never renames a known one with a made-up name.
pub const UNKNOWN_ORG_VERSION: i64 = 1_577_836_800_000;

/// Size of the events the load tools and the signature benchmark send, close to a
/// real organization event with a little metadata.
pub const EVENT_SIZE: usize = 1536;

/// A realistic `organization.created` event of exactly `size` bytes (or the smallest
/// possible when `size` is smaller), unique per `(run, seq)`: the load tools' event.
pub fn organization_event(run: &str, seq: u64, size: usize) -> Vec<u8> {
    let org_id = format!("org_load{run}{seq:010}");
    let at = 1_716_883_200_000_i64 + seq as i64;
    let build = |padding: &str| {
        let mut data = organization(
            &org_id,
            &format!("Load test {run} #{seq}"),
            &format!("user_load{run}{seq:010}"),
            at,
            at,
            1,
        );
        data["public_metadata"] = json!({"plan": "team", "region": "eu-west-1", "notes": padding});
        let event = envelope("organization.created", data, at, DEVELOPMENT_INSTANCE_ID);
        serde_json::to_vec(&event).expect("a JSON value serializes")
    };
    let base = build("");
    if base.len() >= size {
        return base;
    }
    build(&"x".repeat(size - base.len()))
}

/// What a single `send EVENT_TYPE` describes.
#[derive(Debug, Clone)]
pub struct EventSpec {
    /// Event type.
    pub kind: String,
    /// Organization id.
    pub org_id: String,
    /// Organization name.
    pub org_name: String,
    /// User id (member, or the organization's creator).
    pub user_id: String,
    /// Clerk role key of the membership.
    pub role: String,
    /// Version: `updated_at` and the envelope timestamp (ms).
    pub now_ms: i64,
    /// `updated_at` of the organization embedded in a membership: `now_ms` when the
    /// caller named the organization, else [`UNKNOWN_ORG_VERSION`].
    pub embedded_org_version: i64,
    /// Envelope `instance_id`.
    pub instance_id: String,
}

/// The body of one event: a realistic payload of `spec.kind` (types this service
/// does not handle get a minimal object, so intake can be seen ignoring them).
pub fn event(spec: &EventSpec) -> Value {
    let now = spec.now_ms;
    let person = Person::of(&spec.user_id);
    let org = || organization(&spec.org_id, &spec.org_name, &spec.user_id, now, now, 1);
    let data = match spec.kind.as_str() {
        "organization.created" | "organization.updated" => org(),
        "organization.deleted" => deleted_organization(&spec.org_id, &spec.org_name),
        "organizationMembership.created"
        | "organizationMembership.updated"
        | "organizationMembership.deleted" => membership(
            &membership_id(&spec.org_id, &spec.user_id),
            organization(
                &spec.org_id,
                &spec.org_name,
                &spec.user_id,
                spec.embedded_org_version,
                spec.embedded_org_version,
                1,
            ),
            &person,
            &spec.role,
            now,
            now,
        ),
        "user.created" | "user.updated" => user(&person, now, now),
        "user.deleted" => deleted_user(&spec.user_id),
        k if k.starts_with("organizationInvitation.") => {
            invitation(k, &spec.org_id, &person, &spec.role, now)
        }
        k if k.starts_with("subscriptionItem.") => {
            subscription_item(&spec.org_id, &billing_item_for(k, &spec.org_id, now))
        }
        k if k.starts_with("subscription.") => {
            let item = billing_item_for("subscriptionItem.active", &spec.org_id, now);
            let past_due = (k == "subscription.pastDue").then_some(now);
            let status = if past_due.is_some() {
                "past_due"
            } else {
                "active"
            };
            subscription(
                &spec.org_id,
                &item.subscription_id,
                status,
                past_due,
                now,
                std::slice::from_ref(&item),
            )
        }
        other => {
            let object = other.split('.').next().unwrap_or("object");
            json!({"object": object, "id": fresh_id(&object.chars().take(4).collect::<String>())})
        }
    };
    envelope(&spec.kind, data, now, &spec.instance_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: &str) -> EventSpec {
        EventSpec {
            kind: kind.into(),
            org_id: "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S".into(),
            org_name: "Acme Corp".into(),
            user_id: "user_2h8op3Isl1QR7tKu5FGNfaLKEoU".into(),
            role: "org:admin".into(),
            now_ms: 1_795_000_000_123,
            embedded_org_version: UNKNOWN_ORG_VERSION,
            instance_id: "ins_x".into(),
        }
    }

    #[test]
    fn organization_events_carry_id_name_slug_and_version() {
        let e = event(&spec("organization.created"));
        assert_eq!(e["type"], "organization.created");
        assert_eq!(e["object"], "event");
        assert_eq!(e["instance_id"], "ins_x");
        assert_eq!(e["timestamp"], 1_795_000_000_123_i64);
        assert_eq!(e["data"]["id"], "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S");
        assert_eq!(e["data"]["name"], "Acme Corp");
        assert_eq!(e["data"]["slug"], "acme-corp");
        assert_eq!(e["data"]["updated_at"], 1_795_000_000_123_i64);
        let d = event(&spec("organization.deleted"));
        assert_eq!(
            d["data"],
            json!({"object": "organization", "id": "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S", "slug": "acme-corp", "deleted": true})
        );
    }

    #[test]
    fn membership_events_embed_org_and_user_with_a_stable_membership_id() {
        let c = event(&spec("organizationMembership.created"));
        let u = event(&spec("organizationMembership.updated"));
        assert_eq!(
            c["data"]["organization"]["id"],
            "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S"
        );
        assert_eq!(
            c["data"]["public_user_data"]["user_id"],
            "user_2h8op3Isl1QR7tKu5FGNfaLKEoU"
        );
        assert_eq!(c["data"]["role"], "org:admin");
        assert_eq!(c["data"]["role_name"], "Admin");
        assert_eq!(
            c["data"]["id"], u["data"]["id"],
            "same membership across sends"
        );
        assert!(c["data"]["id"].as_str().unwrap().starts_with("orgmem_"));
        assert!(
            c["data"]["public_user_data"]["identifier"]
                .as_str()
                .unwrap()
                .contains('@')
        );
    }

    #[test]
    fn user_events_have_a_primary_email_and_deletes_are_deleted_objects() {
        let u = event(&spec("user.updated"));
        let primary = u["data"]["primary_email_address_id"].clone();
        assert_eq!(u["data"]["email_addresses"][0]["id"], primary);
        assert_eq!(
            event(&spec("user.deleted"))["data"],
            json!({"object": "user", "id": "user_2h8op3Isl1QR7tKu5FGNfaLKEoU", "deleted": true})
        );
    }

    #[test]
    fn derived_names_are_stable_and_ids_fresh() {
        assert_eq!(default_org_name("org_abc"), default_org_name("org_abc"));
        assert_eq!(Person::of("user_1"), Person::of("user_1"));
        assert_ne!(fresh_id("org"), fresh_id("org"));
        assert_eq!(fresh_id("msg").len(), 4 + 27);
        assert_eq!(slug("  Hooli -- XYZ! "), "hooli-xyz");
        assert_eq!(role_name("org:billing_manager"), "Billing_manager");
    }

    #[test]
    fn load_events_have_the_requested_size_and_are_unique() {
        let a = organization_event("t", 1, EVENT_SIZE);
        let b = organization_event("t", 2, EVENT_SIZE);
        assert_eq!(a.len(), EVENT_SIZE);
        assert_eq!(b.len(), EVENT_SIZE);
        assert_ne!(a, b);
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["type"], "organization.created");
        assert!(v["data"].is_object());
        // Too small a size gives the smallest real event, never a broken one.
        assert!(organization_event("t", 1, 10).len() > 10);
    }

    #[test]
    fn unknown_types_get_a_minimal_object() {
        let e = event(&spec("session.created"));
        assert_eq!(e["type"], "session.created");
        assert_eq!(e["data"]["object"], "session");
    }
}
