//! Billing: `subscription.*` and `subscriptionItem.*` store the subscription and
//! its items as Clerk last described them (DESIGN §5b).
//!
//! Guarantee: run under the organization's advisory lock inside the caller's
//! transaction; each subscription and item row keeps the snapshot that
//! [`Source::beats`](super::rules::Source::beats) every other (newest `updated_at`,
//! then the smaller svix id), so duplicates and any arrival order converge. Rows
//! are keyed by organization id and never touch the workspace: billing that
//! arrives first is kept, and a deleted workspace stays deleted.
//!
//! This part stores only; the derived billing state (plan, seats, standing) is not
//! yet applied to the workspace.

use sqlx::PgConnection;

use super::audit::Ctx;
use super::rules::ts;
use crate::provision::payload::{Billing, Seats};

/// The `where` of an upsert that keeps the snapshot that beats: a newer version,
/// or on equal versions the smaller svix id.
macro_rules! beats_stored {
    ($table:literal) => {
        concat!(
            " where ",
            $table,
            ".version < excluded.version or (",
            $table,
            ".version = excluded.version and excluded.source_event < ",
            $table,
            ".source_event)"
        )
    };
}

/// Upserts the subscription (if the event carries one) and every item it lists,
/// in one statement; true when any row took this snapshot.
pub(super) async fn store_billing(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    b: &Billing,
) -> Result<bool, sqlx::Error> {
    let svix = cx.incoming.svix_id.as_str();
    let sub = b.subscription.as_ref();
    let items = &b.items;
    let col = |f: fn(&crate::provision::payload::BillingItem) -> Option<i64>| -> Vec<_> {
        items.iter().map(|i| f(i).map(ts)).collect()
    };
    let (seat_based, seats): (Vec<bool>, Vec<Option<i64>>) = items
        .iter()
        .map(|i| match i.seats {
            Seats::NotSeatBased => (false, None),
            Seats::Limited(n) => (true, Some(n)),
            Seats::Unlimited => (true, None),
        })
        .unzip();
    let changed: i64 = sqlx::query_scalar(concat!(
        "with sub as ( \
           insert into billing_subscriptions as s \
             (id, organization_id, status, past_due_at, version, source_event) \
           select $1, $2, $3, $4, $5, $6 where $1::text is not null \
           on conflict (id) do update set organization_id = excluded.organization_id, \
             status = excluded.status, past_due_at = excluded.past_due_at, \
             version = excluded.version, source_event = excluded.source_event, \
             updated_at = now()",
        beats_stored!("s"),
        " returning 1), \
         item as ( \
           insert into billing_items as i (id, organization_id, subscription_id, status, \
             plan_slug, is_free_trial, period_start, period_end, canceled_at, past_due_at, \
             ended_at, seat_based, seats, version, source_event) \
           select t.id, $2, t.sub, t.status, t.slug, t.trial, t.ps, t.pe, t.ca, t.pd, t.ea, \
             t.sb, t.seats, t.version, $6 \
           from unnest($7::text[], $8::text[], $9::text[], $10::text[], $11::bool[], \
             $12::timestamptz[], $13::timestamptz[], $14::timestamptz[], $15::timestamptz[], \
             $16::timestamptz[], $17::bool[], $18::bigint[], $19::bigint[]) \
             as t(id, sub, status, slug, trial, ps, pe, ca, pd, ea, sb, seats, version) \
           on conflict (id) do update set organization_id = excluded.organization_id, \
             subscription_id = excluded.subscription_id, status = excluded.status, \
             plan_slug = excluded.plan_slug, is_free_trial = excluded.is_free_trial, \
             period_start = excluded.period_start, period_end = excluded.period_end, \
             canceled_at = excluded.canceled_at, past_due_at = excluded.past_due_at, \
             ended_at = excluded.ended_at, seat_based = excluded.seat_based, \
             seats = excluded.seats, version = excluded.version, \
             source_event = excluded.source_event, updated_at = now()",
        beats_stored!("i"),
        " returning 1) \
         select (select count(*) from sub) + (select count(*) from item)"
    ))
    .bind(sub.map(|s| s.id.as_str()))
    .bind(&b.organization_id)
    .bind(sub.map(|s| s.status.as_str()))
    .bind(sub.and_then(|s| s.past_due_at).map(ts))
    .bind(sub.map(|s| s.updated_at))
    .bind(svix)
    .bind(items.iter().map(|i| i.id.as_str()).collect::<Vec<_>>())
    .bind(
        items
            .iter()
            .map(|i| i.subscription_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(items.iter().map(|i| i.status.as_str()).collect::<Vec<_>>())
    .bind(
        items
            .iter()
            .map(|i| i.plan_slug.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(items.iter().map(|i| i.is_free_trial).collect::<Vec<_>>())
    .bind(col(|i| i.period_start))
    .bind(col(|i| i.period_end))
    .bind(col(|i| i.canceled_at))
    .bind(col(|i| i.past_due_at))
    .bind(col(|i| i.ended_at))
    .bind(seat_based)
    .bind(seats)
    .bind(items.iter().map(|i| i.updated_at).collect::<Vec<_>>())
    .fetch_one(conn)
    .await?;
    Ok(changed > 0)
}
