//! The billing state of a workspace, derived from its stored subscription items
//! and subscription (DESIGN §5b): pure, no PostgreSQL.
//!
//! Guarantee: every function here is a fixed function of the stored rows (and,
//! for [`restricted`], of the time asked about), never of their order: the
//! current and next items are chosen by total orders ([`current_item`],
//! [`next_item`]), never by position, so the same rows derive the same state
//! whatever order the events that wrote them arrived in.
//!
//! Not yet applied: the worker stores billing rows but does not yet change a
//! workspace's plan or quotas from this derivation (issue 22, step 3).

use std::cmp::Ordering;

use chrono::{DateTime, Duration, Utc};

use crate::config::ProvisioningSettings;
use crate::provision::payload::Seats;

/// A stored subscription item (`billing_items`).
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRecord {
    /// `csub_item_…`
    pub id: String,
    /// The subscription listing it, when known.
    pub subscription_id: Option<String>,
    /// Clerk's status as sent.
    pub status: String,
    /// The plan's slug.
    pub plan_slug: Option<String>,
    /// A free trial.
    pub is_free_trial: bool,
    /// Start of the period.
    pub period_start: Option<DateTime<Utc>>,
    /// End of the period (none for the free default plan).
    pub period_end: Option<DateTime<Utc>>,
    /// When Clerk says it went past due.
    pub past_due_at: Option<DateTime<Utc>>,
    /// The seats it grants.
    pub seats: Seats,
    /// Clerk's `updated_at` (ms).
    pub version: i64,
}

/// A stored subscription (`billing_subscriptions`).
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionRecord {
    /// `csub_…`
    pub id: String,
    /// Clerk's status as sent.
    pub status: String,
    /// When Clerk says it went past due.
    pub past_due_at: Option<DateTime<Utc>>,
    /// Clerk's `updated_at` (ms).
    pub version: i64,
}

/// A workspace's billing standing (`billing.status` of the read API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The current item or the subscription is past due.
    PastDue,
    /// The current item is canceled: its plan holds until `period_end`.
    Canceling,
    /// The current item is a free trial.
    Trialing,
    /// Paying, in good standing.
    Active,
    /// Items exist but none is current.
    Ended,
}

impl Standing {
    /// The status on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::PastDue => "past_due",
            Standing::Canceling => "canceling",
            Standing::Trialing => "trialing",
            Standing::Active => "active",
            Standing::Ended => "ended",
        }
    }
}

/// The billing state derived from a workspace's items and subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    /// Standing.
    pub status: Standing,
    /// The current item's plan slug (none when ended, or when it names no plan).
    pub plan: Option<String>,
    /// The current item's seats (none when ended).
    pub seats: Option<Seats>,
    /// The current item's period.
    pub period_start: Option<DateTime<Utc>>,
    /// The current item's period end.
    pub period_end: Option<DateTime<Utc>>,
    /// A trial's `period_end`.
    pub trial_ends_at: Option<DateTime<Utc>>,
    /// A canceled current item's `period_end`.
    pub cancel_at: Option<DateTime<Utc>>,
    /// Since when it is past due (when it is).
    pub past_due_since: Option<DateTime<Utc>>,
    /// The next (upcoming) item's plan slug.
    pub next_plan: Option<String>,
    /// The next item's `period_start`.
    pub next_plan_at: Option<DateTime<Utc>>,
}

/// Statuses of an item that holds the plan now.
const CURRENT: [&str; 3] = ["active", "past_due", "canceled"];

/// Later `period_start` first; ties: later version, then the greater id.
fn later(a: &ItemRecord, b: &ItemRecord) -> Ordering {
    a.period_start
        .cmp(&b.period_start)
        .then(a.version.cmp(&b.version))
        .then_with(|| a.id.cmp(&b.id))
}

/// The item that holds the plan now: status `active`, `past_due` or `canceled`,
/// the latest `period_start` (ties: latest version, then the greater id). Never
/// the first listed; an unknown status is never current.
pub fn current_item(items: &[ItemRecord]) -> Option<&ItemRecord> {
    items
        .iter()
        .filter(|i| CURRENT.contains(&i.status.as_str()))
        .max_by(|a, b| later(a, b))
}

/// The `upcoming` item with the latest `period_start` (same ties).
pub fn next_item(items: &[ItemRecord]) -> Option<&ItemRecord> {
    items
        .iter()
        .filter(|i| i.status == "upcoming")
        .max_by(|a, b| later(a, b))
}

/// The subscription that speaks for the workspace: the current item's, else the
/// newest (version, then the greater id).
fn subscription<'a>(
    subs: &'a [SubscriptionRecord],
    current: Option<&ItemRecord>,
) -> Option<&'a SubscriptionRecord> {
    let own = current
        .and_then(|c| c.subscription_id.as_deref())
        .and_then(|id| subs.iter().find(|s| s.id == id));
    own.or_else(|| {
        subs.iter()
            .max_by(|a, b| a.version.cmp(&b.version).then_with(|| a.id.cmp(&b.id)))
    })
}

fn ms(version: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(version).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The billing state; `None` when the workspace has no items (no billing object:
/// `public_metadata.plan` decides its plan).
pub fn derive(items: &[ItemRecord], subs: &[SubscriptionRecord]) -> Option<Derived> {
    if items.is_empty() {
        return None;
    }
    let next = next_item(items);
    let (next_plan, next_plan_at) = match next {
        Some(n) => (n.plan_slug.clone(), n.period_start),
        None => (None, None),
    };
    let Some(current) = current_item(items) else {
        return Some(Derived {
            status: Standing::Ended,
            plan: None,
            seats: None,
            period_start: None,
            period_end: None,
            trial_ends_at: None,
            cancel_at: None,
            past_due_since: None,
            next_plan,
            next_plan_at,
        });
    };
    let sub = subscription(subs, Some(current));
    // Since when, by whichever of the two says past due (its own time, else the
    // version that said so); the earliest when both do.
    let item_since = (current.status == "past_due")
        .then(|| current.past_due_at.unwrap_or_else(|| ms(current.version)));
    let sub_since = sub
        .filter(|s| s.status == "past_due")
        .map(|s| s.past_due_at.unwrap_or_else(|| ms(s.version)));
    let past_due_since = match (item_since, sub_since) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let status = if past_due_since.is_some() {
        Standing::PastDue
    } else if current.status == "canceled" {
        Standing::Canceling
    } else if current.is_free_trial {
        Standing::Trialing
    } else {
        Standing::Active
    };
    Some(Derived {
        status,
        plan: current.plan_slug.clone(),
        seats: Some(current.seats),
        period_start: current.period_start,
        period_end: current.period_end,
        trial_ends_at: current
            .is_free_trial
            .then_some(current.period_end)
            .flatten(),
        cancel_at: (current.status == "canceled")
            .then_some(current.period_end)
            .flatten(),
        past_due_since,
        next_plan,
        next_plan_at,
    })
}

/// Where a workspace's plan comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanSource {
    /// Clerk Billing.
    Billing,
    /// `public_metadata.plan` (no billing items).
    Metadata,
}

impl PlanSource {
    /// `details.source` of `workspace.plan_changed`.
    pub fn as_str(self) -> &'static str {
        match self {
            PlanSource::Billing => "billing",
            PlanSource::Metadata => "metadata",
        }
    }
}

/// What the billing state says a workspace's plan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanChoice<'a> {
    /// This configured plan.
    Plan(&'a str, PlanSource),
    /// The current item's plan has no `[plans.<slug>]` (or names no plan): keep
    /// the workspace's plan and audit `workspace.plan_unknown`.
    KeepUnknown(Option<&'a str>),
}

/// The plan: a current item's slug when configured; an unknown slug keeps the
/// plan; items but none current → `default_plan`; no items →
/// `public_metadata.plan` as before.
pub fn choose_plan<'a>(
    billing: Option<&'a Derived>,
    settings: &'a ProvisioningSettings,
    requested: Option<&'a str>,
) -> PlanChoice<'a> {
    match billing {
        None => PlanChoice::Plan(settings.plan_for(requested), PlanSource::Metadata),
        Some(d) if d.status == Standing::Ended => {
            PlanChoice::Plan(&settings.default_plan, PlanSource::Billing)
        }
        Some(d) => match d.plan.as_deref() {
            Some(slug) if settings.plans.contains_key(slug) => {
                PlanChoice::Plan(slug, PlanSource::Billing)
            }
            other => PlanChoice::KeepUnknown(other),
        },
    }
}

/// The `seats` quota: the current item's `seats.quantity` replaces the plan's
/// (`None` = unlimited); without `seats` the plan's value stands (`plan_seats`,
/// `None` when the plan sets no seats quota).
pub fn seat_limit(billing: Option<&Derived>, plan_seats: Option<i64>) -> Option<i64> {
    match billing.and_then(|d| d.seats) {
        Some(Seats::Limited(n)) => Some(n),
        Some(Seats::Unlimited) => None,
        Some(Seats::NotSeatBased) | None => plan_seats,
    }
}

/// More active members than seats (never when unlimited). Members are never
/// removed for it.
pub fn over_seat_limit(active_members: i64, seats: Option<i64>) -> bool {
    seats.is_some_and(|limit| active_members > limit)
}

/// `past_due_since` + the grace days, when past due.
pub fn grace_ends_at(billing: &Derived, grace_days: u32) -> Option<DateTime<Utc>> {
    billing
        .past_due_since
        .map(|since| since + Duration::days(i64::from(grace_days)))
}

/// Past due and `now` ≥ `grace_ends_at` (computed when read).
pub fn restricted(billing: &Derived, grace_days: u32, now: DateTime<Utc>) -> bool {
    billing.status == Standing::PastDue
        && grace_ends_at(billing, grace_days).is_some_and(|end| now >= end)
}

#[cfg(test)]
mod tests;
