//! Tolerant decoding of Clerk webhook bodies into the facts provisioning needs.
//!
//! Guarantee: unknown fields are ignored and nullable fields (per
//! `reference/clerk-events.md`) may be null or absent, but every field the
//! provisioner relies on (ids, versions, names) is checked; anything missing or of
//! the wrong type is a [`PayloadError`] whose text names the field, so a dead
//! letter says exactly what to fix.

use serde_json::{Map, Value};

use crate::clerk::{EventType, Handled};

/// Why a body cannot be applied; the text names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PayloadError(pub String);

/// Envelope timestamps below this are seconds (Clerk's OpenAPI examples), not ms.
const SECONDS_THRESHOLD: i64 = 1_000_000_000_000;

/// A decoded webhook: its type, envelope timestamp and the handled facts.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Event type (`organization.created`, …), as in the body.
    pub kind: EventType,
    /// Envelope `timestamp` in ms (seconds converted); absent in some hand-made bodies.
    pub timestamp_ms: Option<i64>,
    /// What the event says.
    pub event: Event,
}

/// The facts of one handled event type.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `organization.created` / `organization.updated`.
    OrganizationUpsert(Organization),
    /// `organization.deleted` (version = envelope timestamp).
    OrganizationDeleted {
        /// Organization id.
        id: String,
        /// Envelope timestamp (ms).
        at_ms: i64,
    },
    /// `organizationMembership.created` / `.updated`.
    MembershipUpsert(Membership),
    /// `organizationMembership.deleted`: decoded leniently, since a removal that
    /// fails to decode would leave the member's access in place.
    MembershipDeleted {
        /// What the removal needs, and the full membership when the body has one.
        removal: Removal,
        /// Envelope timestamp (ms).
        at_ms: i64,
    },
    /// `user.updated`.
    UserUpdated(User),
    /// `user.deleted` (version = envelope timestamp).
    UserDeleted {
        /// User id.
        id: String,
        /// Envelope timestamp (ms).
        at_ms: i64,
    },
    /// `subscription.*` / `subscriptionItem.*` of an organization payer (DESIGN §5b).
    Billing(Billing),
    /// A type this service does not handle, or billing of a user payer (recorded
    /// as `ignored`).
    Unhandled,
}

impl Decoded {
    /// The workspace (organization id) the event is about, if it names one.
    pub fn workspace_id(&self) -> Option<&str> {
        match &self.event {
            Event::OrganizationUpsert(o) => Some(&o.id),
            Event::OrganizationDeleted { id, .. } => Some(id),
            Event::MembershipUpsert(m) => Some(&m.organization.id),
            Event::MembershipDeleted { removal, .. } => Some(&removal.organization_id),
            Event::Billing(b) => Some(&b.organization_id),
            Event::UserUpdated(_) | Event::UserDeleted { .. } | Event::Unhandled => None,
        }
    }

    /// The user the event is about, if it names one: the member of a membership
    /// event, the user of a user event.
    pub fn user_id(&self) -> Option<&str> {
        match &self.event {
            Event::MembershipUpsert(m) => Some(&m.user.user_id),
            Event::MembershipDeleted { removal, .. } => removal.user_id.as_deref(),
            Event::UserUpdated(u) => Some(&u.id),
            Event::UserDeleted { id, .. } => Some(id),
            Event::OrganizationUpsert(_)
            | Event::OrganizationDeleted { .. }
            | Event::Billing(_)
            | Event::Unhandled => None,
        }
    }
}

/// A body that does not decode, with what could still be read of it: the
/// processing log shows the type and workspace of a dead letter when it can.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    /// Why it cannot be applied.
    pub error: PayloadError,
    /// The body's `type`, when it is a string.
    pub kind: Option<EventType>,
    /// The organization id an organization or membership body names, if any.
    pub workspace_id: Option<String>,
}

/// An organization snapshot (`data` of organization events, or embedded in a membership).
#[derive(Debug, Clone, PartialEq)]
pub struct Organization {
    /// `org_…`
    pub id: String,
    /// Display name.
    pub name: String,
    /// May be absent or null when slugs are disabled.
    pub slug: Option<String>,
    /// Logo URL.
    pub image_url: Option<String>,
    /// Creator's user id.
    pub created_by: Option<String>,
    /// Clerk's member limit.
    pub max_allowed_memberships: Option<i32>,
    /// `public_metadata.plan` when it is a string.
    pub requested_plan: Option<String>,
    /// ms
    pub created_at: i64,
    /// ms; the snapshot's version.
    pub updated_at: i64,
}

/// A membership snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    /// `orgmem_…`
    pub id: String,
    /// Clerk role key (`org:admin`, `org:member`, custom).
    pub role: String,
    /// The organization as embedded in the membership.
    pub organization: Organization,
    /// The member's identity.
    pub user: PublicUser,
    /// ms; when the user joined.
    pub created_at: i64,
    /// ms; the snapshot's version.
    pub updated_at: i64,
}

/// What an `organizationMembership.deleted` must say: the membership, its
/// organization and (when given) its user. Nothing else is required, so a sparse
/// removal still takes the member's access away.
#[derive(Debug, Clone, PartialEq)]
pub struct Removal {
    /// `orgmem_…`
    pub id: String,
    /// `organization.id` (or `organization_id`).
    pub organization_id: String,
    /// `public_user_data.user_id` (or `user_id`), when the body names the user.
    pub user_id: Option<String>,
    /// The membership as it was, when the body carries a complete one.
    pub snapshot: Option<Membership>,
}

/// `public_user_data` of a membership.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicUser {
    /// `user_…`
    pub user_id: String,
    /// `identifier` (usually the email).
    pub identifier: Option<String>,
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: Option<String>,
    /// Avatar URL.
    pub image_url: Option<String>,
}

/// A user snapshot (`data` of `user.updated`).
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// `user_…`
    pub id: String,
    /// The primary email address, else the first one.
    pub email: Option<String>,
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: Option<String>,
    /// Avatar URL.
    pub image_url: Option<String>,
    /// ms; the snapshot's version.
    pub updated_at: i64,
}

/// The billing facts of one event: the organization that pays, the subscription
/// (from `subscription.*`) and the items the event carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Billing {
    /// `payer.organization_id`: the workspace.
    pub organization_id: String,
    /// The subscription's own fields, for `subscription.*` (and the Backend API's
    /// subscription); `None` for `subscriptionItem.*`.
    pub subscription: Option<Subscription>,
    /// The items listed (`items` of a subscription, or the one item of an item event).
    pub items: Vec<BillingItem>,
}

/// A subscription's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// `csub_…`
    pub id: String,
    /// Clerk's status as sent (`active`, `past_due`, …; unknown ones kept as they are).
    pub status: String,
    /// ms; when it became past due.
    pub past_due_at: Option<i64>,
    /// ms; the subscription's version.
    pub updated_at: i64,
}

/// One subscription item: a plan over a period.
#[derive(Debug, Clone, PartialEq)]
pub struct BillingItem {
    /// `csub_item_…`
    pub id: String,
    /// `subscription_id`, else the id of the subscription that lists it.
    pub subscription_id: Option<String>,
    /// Clerk's status as sent (`active`, `canceled`, `upcoming`, …; an unknown one
    /// is kept and is simply never current).
    pub status: String,
    /// `plan.slug`, when the item names a plan.
    pub plan_slug: Option<String>,
    /// `is_free_trial`.
    pub is_free_trial: bool,
    /// ms
    pub period_start: Option<i64>,
    /// ms; null for the free default plan.
    pub period_end: Option<i64>,
    /// ms
    pub canceled_at: Option<i64>,
    /// ms
    pub past_due_at: Option<i64>,
    /// ms
    pub ended_at: Option<i64>,
    /// `seats.quantity`.
    pub seats: Seats,
    /// ms; the item's version.
    pub updated_at: i64,
}

/// The seats an item grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seats {
    /// No `seats`: not a seat-based plan, the plan's own quota stands.
    NotSeatBased,
    /// `seats.quantity` = n.
    Limited(i64),
    /// `seats.quantity` = null: unlimited.
    Unlimited,
}

/// Decodes a webhook body. `kind` is the message's `type` property (empty when the
/// message carried none); when given it must agree with the body's `type`.
pub fn decode(kind: &str, body: &[u8]) -> Result<Decoded, PayloadError> {
    read(kind, body).map_err(|u| u.error)
}

/// [`decode`], keeping on failure what could be read of the body. This is the one
/// parse of a body: the worker calls it once per delivery and every later step
/// (lane, screen, lock keys, lag, apply, processing log) uses its result.
pub fn read(kind: &str, body: &[u8]) -> Result<Decoded, Undecodable> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Undecodable {
        error: PayloadError(format!("body is not valid JSON: {e}")),
        kind: None,
        workspace_id: None,
    })?;
    let Value::Object(root) = value else {
        return Err(Undecodable {
            error: PayloadError(format!(
                "body must be a JSON object, got {}",
                type_name(&value)
            )),
            kind: None,
            workspace_id: None,
        });
    };
    decode_object(kind, &root).map_err(|error| {
        let kind = root
            .get("type")
            .and_then(Value::as_str)
            .map(EventType::parse);
        let workspace_id = kind
            .as_ref()
            .and_then(|k| raw_workspace_id(k, root.get("data")?))
            .map(str::to_owned);
        Undecodable {
            error,
            kind,
            workspace_id,
        }
    })
}

/// The organization id in the `data` of a body that did not decode, by the same
/// rule as [`Decoded::workspace_id`].
fn raw_workspace_id<'v>(kind: &EventType, data: &'v Value) -> Option<&'v str> {
    let id = match kind.handled()? {
        Handled::OrganizationCreated
        | Handled::OrganizationUpdated
        | Handled::OrganizationDeleted => data.get("id"),
        Handled::MembershipCreated | Handled::MembershipUpdated | Handled::MembershipDeleted => {
            data.get("organization")?.get("id")
        }
        Handled::UserUpdated | Handled::UserDeleted => None,
        _ => data.get("payer")?.get("organization_id"),
    };
    id?.as_str().filter(|s| !s.trim().is_empty())
}

fn decode_object(kind: &str, root: &Map<String, Value>) -> Result<Decoded, PayloadError> {
    let root = Obj::new("", root);
    let body_kind = EventType::parse(root.req_str("type")?);
    if !kind.is_empty() && kind != body_kind.as_str() {
        return Err(PayloadError(format!(
            "message type `{kind}` does not match the body's type `{body_kind}`"
        )));
    }
    let timestamp_ms = match root.opt_i64("timestamp")? {
        Some(t) => {
            let ms = if t < SECONDS_THRESHOLD {
                t.saturating_mul(1000)
            } else {
                t
            };
            Some(check_time("timestamp", ms)?)
        }
        None => None,
    };
    let Some(handled) = body_kind.handled() else {
        return Ok(Decoded {
            kind: body_kind,
            timestamp_ms,
            event: Event::Unhandled,
        });
    };
    let data = root.req_obj("data")?;
    let at = || timestamp_ms.ok_or_else(|| PayloadError(missing("timestamp")));
    let event = match handled {
        Handled::OrganizationCreated | Handled::OrganizationUpdated => {
            Event::OrganizationUpsert(organization(&data)?)
        }
        Handled::OrganizationDeleted => Event::OrganizationDeleted {
            id: data.req_str("id")?.to_owned(),
            at_ms: at()?,
        },
        Handled::MembershipCreated | Handled::MembershipUpdated => {
            Event::MembershipUpsert(membership(&data)?)
        }
        Handled::MembershipDeleted => Event::MembershipDeleted {
            removal: removal(&data)?,
            at_ms: at()?,
        },
        Handled::UserUpdated => Event::UserUpdated(user(&data)?),
        Handled::UserDeleted => Event::UserDeleted {
            id: data.req_str("id")?.to_owned(),
            at_ms: at()?,
        },
        h if h.is_subscription() => match payer_organization(&data) {
            Some(org) => Event::Billing(subscription(&data, "items", org)?),
            None => Event::Unhandled,
        },
        _ => match payer_organization(&data) {
            Some(org) => Event::Billing(Billing {
                organization_id: org,
                subscription: None,
                items: vec![billing_item(&data, None)?],
            }),
            None => Event::Unhandled,
        },
    };
    Ok(Decoded {
        kind: body_kind,
        timestamp_ms,
        event,
    })
}

/// An Organization object as Clerk's Backend API lists it (the webhook's `data`
/// schema), decoded by the same rules as a webhook's.
pub fn organization_object(value: &Value) -> Result<Organization, PayloadError> {
    match value {
        Value::Object(map) => organization(&Obj::new("data", map)),
        other => Err(PayloadError(format!(
            "an organization must be a JSON object, got {}",
            type_name(other)
        ))),
    }
}

/// An OrganizationMembership object as Clerk's Backend API lists it, decoded by
/// the same rules as a webhook's.
pub fn membership_object(value: &Value) -> Result<Membership, PayloadError> {
    match value {
        Value::Object(map) => membership(&Obj::new("data", map)),
        other => Err(PayloadError(format!(
            "a membership must be a JSON object, got {}",
            type_name(other)
        ))),
    }
}

/// The organization's subscription as the Backend API answers
/// `GET /v1/organizations/{id}/billing/subscription` (items under
/// `subscription_items`, no payer), decoded by the same rules as a webhook's.
pub fn subscription_object(organization_id: &str, value: &Value) -> Result<Billing, PayloadError> {
    match value {
        Value::Object(map) => subscription(
            &Obj::new("data", map),
            "subscription_items",
            organization_id.to_owned(),
        ),
        other => Err(PayloadError(format!(
            "a subscription must be a JSON object, got {}",
            type_name(other)
        ))),
    }
}

/// `payer.organization_id` when it names an organization; missing, empty or not
/// a string means a user payer (DESIGN §5b: such events are `ignored`).
fn payer_organization(data: &Obj<'_>) -> Option<String> {
    data.map
        .get("payer")?
        .get("organization_id")?
        .as_str()
        .filter(|s| !s.trim().is_empty())
        .map(str::to_owned)
}

/// A subscription and the items it lists under `items_key`. Only the ids and the
/// versions are required: statuses are kept as sent, and a malformed optional
/// field reads as absent (Clerk Billing is beta; an event is never dead-lettered
/// for a field it may yet change).
fn subscription(
    s: &Obj<'_>,
    items_key: &str,
    organization_id: String,
) -> Result<Billing, PayloadError> {
    let id = s.req_id("id")?;
    let sub = Subscription {
        status: lenient_status(s),
        past_due_at: lenient_time(s, "past_due_at"),
        updated_at: s.req_i64("updated_at")?,
        id,
    };
    let items = match s.map.get(items_key) {
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(n, item)| match item {
                Value::Object(map) => billing_item(
                    &Obj::new(&s.path(&format!("{items_key}[{n}]")), map),
                    Some(&sub.id),
                ),
                other => Err(PayloadError(format!(
                    "{}[{n}]: expected an object, got {}",
                    s.path(items_key),
                    type_name(other)
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => Vec::new(),
    };
    // An item listed twice is stored once: the newest of its snapshots (the first
    // of equal ones), as the version gate would keep.
    let mut items: Vec<BillingItem> = items;
    items.sort_by(|a, b| a.id.cmp(&b.id).then(b.updated_at.cmp(&a.updated_at)));
    items.dedup_by(|later, kept| later.id == kept.id);
    Ok(Billing {
        organization_id,
        subscription: Some(sub),
        items,
    })
}

/// One subscription item; `subscription_id` is the listing subscription's id when
/// the item does not name one.
fn billing_item(i: &Obj<'_>, listed_by: Option<&str>) -> Result<BillingItem, PayloadError> {
    let plan_slug = i
        .map
        .get("plan")
        .and_then(|p| p.get("slug"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let seats = match i.map.get("seats") {
        Some(Value::Object(seats)) => match seats.get("quantity") {
            None | Some(Value::Null) => Seats::Unlimited,
            Some(q) => q
                .as_i64()
                .filter(|n| *n >= 0)
                .map_or(Seats::NotSeatBased, Seats::Limited),
        },
        _ => Seats::NotSeatBased,
    };
    Ok(BillingItem {
        id: i.req_id("id")?,
        subscription_id: lenient_str(i, "subscription_id").or_else(|| listed_by.map(str::to_owned)),
        status: lenient_status(i),
        plan_slug,
        is_free_trial: i
            .map
            .get("is_free_trial")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        period_start: lenient_time(i, "period_start"),
        period_end: lenient_time(i, "period_end"),
        canceled_at: lenient_time(i, "canceled_at"),
        past_due_at: lenient_time(i, "past_due_at"),
        ended_at: lenient_time(i, "ended_at"),
        seats,
        updated_at: i.req_i64("updated_at")?,
    })
}

/// `status` as sent; missing or not a string reads as `unknown`.
fn lenient_status(o: &Obj<'_>) -> String {
    lenient_str(o, "status").unwrap_or_else(|| "unknown".to_owned())
}

/// A non-empty string, or `None` for anything else.
fn lenient_str(o: &Obj<'_>, key: &str) -> Option<String> {
    o.map
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A plausible ms time, or `None` for anything else.
fn lenient_time(o: &Obj<'_>, key: &str) -> Option<i64> {
    o.map
        .get(key)
        .and_then(Value::as_i64)
        .filter(|ms| (0..=MAX_TIME_MS).contains(ms))
}

fn organization(o: &Obj<'_>) -> Result<Organization, PayloadError> {
    let requested_plan = match o.opt_obj("public_metadata")? {
        // Only a string can name a plan; anything else means "no plan requested".
        Some(meta) => meta
            .map
            .get("plan")
            .and_then(Value::as_str)
            .map(str::to_owned),
        None => None,
    };
    let max_allowed_memberships = match o.opt_i64("max_allowed_memberships")? {
        Some(n) => Some(i32::try_from(n).map_err(|_| {
            PayloadError(format!(
                "{}: {n} is out of range",
                o.path("max_allowed_memberships")
            ))
        })?),
        None => None,
    };
    Ok(Organization {
        id: o.req_id("id")?,
        name: o.req_str("name")?.to_owned(),
        slug: o.opt_str("slug")?,
        image_url: o.opt_str("image_url")?,
        created_by: o.opt_str("created_by")?,
        max_allowed_memberships,
        requested_plan,
        created_at: check_time(&o.path("created_at"), o.req_i64("created_at")?)?,
        updated_at: o.req_i64("updated_at")?,
    })
}

fn membership(m: &Obj<'_>) -> Result<Membership, PayloadError> {
    let id = m.req_id("id")?;
    let role = m.req_str("role")?.to_owned();
    let organization = organization(&m.req_obj("organization")?)?;
    let u = m.req_obj("public_user_data")?;
    let user = PublicUser {
        user_id: u.req_id("user_id")?,
        identifier: u.opt_str("identifier")?,
        first_name: u.opt_str("first_name")?,
        last_name: u.opt_str("last_name")?,
        image_url: u.opt_str("image_url")?,
    };
    Ok(Membership {
        id,
        role,
        organization,
        user,
        created_at: check_time(&m.path("created_at"), m.req_i64("created_at")?)?,
        updated_at: m.req_i64("updated_at")?,
    })
}

/// A removal: the membership id and organization id are required; the user id
/// and the full snapshot are taken when they are there and well-formed, and
/// ignored otherwise.
fn removal(m: &Obj<'_>) -> Result<Removal, PayloadError> {
    let id = m.req_id("id")?;
    let embedded = |obj: &str, key: &str| {
        m.map
            .get(obj)
            .and_then(|o| o.get(key))
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_owned)
    };
    let flat = |key: &str| {
        m.map
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_owned)
    };
    let organization_id = embedded("organization", "id")
        .or_else(|| flat("organization_id"))
        .ok_or_else(|| PayloadError(missing(&m.path("organization.id"))))?;
    let user_id = embedded("public_user_data", "user_id").or_else(|| flat("user_id"));
    // A snapshot naming another organization or user than the removal is not its own.
    let snapshot = membership(m).ok().filter(|s| {
        s.organization.id == organization_id && Some(&s.user.user_id) == user_id.as_ref()
    });
    Ok(Removal {
        id,
        organization_id,
        user_id,
        snapshot,
    })
}

fn user(u: &Obj<'_>) -> Result<User, PayloadError> {
    let id = u.req_id("id")?;
    let primary = u.opt_str("primary_email_address_id")?;
    let email = match u.map.get("email_addresses") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => {
            // (id, address) of each well-formed entry; malformed entries are skipped.
            let entries: Vec<(Option<&str>, &str)> = list
                .iter()
                .filter_map(|e| {
                    let address = e.get("email_address")?.as_str()?;
                    Some((e.get("id").and_then(Value::as_str), address))
                })
                .collect();
            entries
                .iter()
                .find(|(eid, _)| eid.is_some() && *eid == primary.as_deref())
                .or(entries.first())
                .map(|(_, a)| (*a).to_owned())
        }
        Some(other) => {
            return Err(PayloadError(format!(
                "{}: expected an array, got {}",
                u.path("email_addresses"),
                type_name(other)
            )));
        }
    };
    Ok(User {
        id,
        email,
        first_name: u.opt_str("first_name")?,
        last_name: u.opt_str("last_name")?,
        image_url: u.opt_str("image_url")?,
        updated_at: u.req_i64("updated_at")?,
    })
}

/// Latest ms timestamp accepted (9999-12-31T23:59:59.999Z).
const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// A ms timestamp that is stored as a time: between 1970 and 9999.
fn check_time(field: &str, ms: i64) -> Result<i64, PayloadError> {
    if (0..=MAX_TIME_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(PayloadError(format!(
            "{field}: {ms} is not a plausible Unix time in milliseconds"
        )))
    }
}

fn missing(field: &str) -> String {
    format!("{field}: missing")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object with its path from the root, for error messages.
struct Obj<'a> {
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn new(prefix: &str, map: &'a Map<String, Value>) -> Self {
        Self {
            prefix: prefix.to_owned(),
            map,
        }
    }

    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn wrong(&self, key: &str, expected: &str, got: &Value) -> PayloadError {
        PayloadError(format!(
            "{}: expected {expected}, got {}",
            self.path(key),
            type_name(got)
        ))
    }

    fn req_str(&self, key: &str) -> Result<&'a str, PayloadError> {
        match self.map.get(key) {
            None => Err(PayloadError(missing(&self.path(key)))),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.wrong(key, "a string", other)),
        }
    }

    /// An id: a non-empty string.
    fn req_id(&self, key: &str) -> Result<String, PayloadError> {
        let s = self.req_str(key)?;
        if s.trim().is_empty() {
            return Err(PayloadError(format!("{}: empty", self.path(key))));
        }
        Ok(s.to_owned())
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>, PayloadError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong(key, "a string or null", other)),
        }
    }

    fn req_i64(&self, key: &str) -> Result<i64, PayloadError> {
        match self.map.get(key) {
            None => Err(PayloadError(missing(&self.path(key)))),
            Some(v) => self.int(key, v),
        }
    }

    fn opt_i64(&self, key: &str) -> Result<Option<i64>, PayloadError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.int(key, v).map(Some),
        }
    }

    fn int(&self, key: &str, v: &Value) -> Result<i64, PayloadError> {
        match v {
            Value::Number(n) => n.as_i64().ok_or_else(|| {
                PayloadError(format!("{}: expected an integer, got {n}", self.path(key)))
            }),
            other => Err(self.wrong(key, "an integer", other)),
        }
    }

    fn req_obj(&self, key: &str) -> Result<Obj<'a>, PayloadError> {
        match self.map.get(key) {
            None => Err(PayloadError(missing(&self.path(key)))),
            Some(Value::Object(m)) => Ok(Obj::new(&self.path(key), m)),
            Some(other) => Err(self.wrong(key, "an object", other)),
        }
    }

    fn opt_obj(&self, key: &str) -> Result<Option<Obj<'a>>, PayloadError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Obj::new(&self.path(key), m))),
            Some(other) => Err(self.wrong(key, "an object or null", other)),
        }
    }
}

#[cfg(test)]
mod tests;
