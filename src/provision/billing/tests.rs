//! One test per rule of DESIGN §5b's derivation.

use super::*;
use crate::config::Settings;

const T0: i64 = 1_750_000_000_000;
const DAY: i64 = 86_400_000;

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

fn item(id: &str, status: &str, plan: &str, start: i64) -> ItemRecord {
    ItemRecord {
        id: id.to_owned(),
        subscription_id: Some("csub_1".to_owned()),
        status: status.to_owned(),
        plan_slug: Some(plan.to_owned()),
        is_free_trial: false,
        period_start: Some(at(start)),
        period_end: Some(at(start + 30 * DAY)),
        past_due_at: None,
        seats: Seats::NotSeatBased,
        version: start,
    }
}

fn sub(status: &str, past_due_at: Option<i64>, version: i64) -> SubscriptionRecord {
    SubscriptionRecord {
        id: "csub_1".to_owned(),
        status: status.to_owned(),
        past_due_at: past_due_at.map(at),
        version,
    }
}

fn settings() -> ProvisioningSettings {
    let mut s = Settings::from_sources(None, |_| None)
        .expect("valid settings")
        .provisioning;
    let team = s.plans["team"].clone();
    s.plans.insert("pro-plan".to_owned(), team);
    s
}

/// Every order of the items derives the same state.
fn all_orders(items: &[ItemRecord]) -> Vec<Vec<ItemRecord>> {
    fn permute(rest: &mut Vec<ItemRecord>, k: usize, out: &mut Vec<Vec<ItemRecord>>) {
        if k == rest.len() {
            out.push(rest.clone());
            return;
        }
        for i in k..rest.len() {
            rest.swap(k, i);
            permute(rest, k + 1, out);
            rest.swap(k, i);
        }
    }
    let mut out = Vec::new();
    permute(&mut items.to_vec(), 0, &mut out);
    out
}

#[test]
fn current_item_is_never_items_0_in_any_order() {
    let items = vec![
        item("csub_item_old", "ended", "free", T0),
        item("csub_item_now", "active", "pro", T0 + 30 * DAY),
        item("csub_item_next", "upcoming", "team", T0 + 60 * DAY),
    ];
    for order in all_orders(&items) {
        assert_eq!(current_item(&order).unwrap().id, "csub_item_now");
        assert_eq!(next_item(&order).unwrap().id, "csub_item_next");
        let d = derive(&order, &[]).unwrap();
        assert_eq!(d.plan.as_deref(), Some("pro"));
        assert_eq!(d.next_plan.as_deref(), Some("team"));
        assert_eq!(d.next_plan_at, Some(at(T0 + 60 * DAY)));
    }
}

#[test]
fn current_item_is_active_past_due_or_canceled_with_the_latest_start() {
    for status in ["active", "past_due", "canceled"] {
        let items = [
            item("a", "active", "free", T0),
            item("b", status, "pro", T0 + DAY),
        ];
        assert_eq!(current_item(&items).unwrap().id, "b", "{status}");
    }
    for status in [
        "upcoming",
        "ended",
        "abandoned",
        "incomplete",
        "expired",
        "paused_by_aliens",
    ] {
        let items = [
            item("a", "active", "free", T0),
            item("b", status, "pro", T0 + DAY),
        ];
        assert_eq!(current_item(&items).unwrap().id, "a", "{status}");
    }
}

#[test]
fn current_item_ties_take_the_later_version_then_the_greater_id() {
    let mut a = item("a", "active", "free", T0);
    let mut b = item("b", "active", "pro", T0);
    a.version = T0 + 5;
    b.version = T0 + 1;
    for order in all_orders(&[a.clone(), b.clone()]) {
        assert_eq!(current_item(&order).unwrap().id, "a");
    }
    a.version = b.version;
    for order in all_orders(&[a, b]) {
        assert_eq!(current_item(&order).unwrap().id, "b");
    }
}

#[test]
fn no_items_is_no_billing_and_items_without_a_current_one_are_ended() {
    assert_eq!(derive(&[], &[sub("active", None, T0)]), None);
    let d = derive(
        &[
            item("a", "ended", "pro", T0),
            item("b", "abandoned", "team", T0 + DAY),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(d.status, Standing::Ended);
    assert_eq!(d.plan, None);
    assert_eq!(d.seats, None);
}

#[test]
fn status_past_due_before_canceling_before_trialing_before_active() {
    let mut i = item("a", "active", "pro", T0);
    assert_eq!(derive(&[i.clone()], &[]).unwrap().status, Standing::Active);
    i.is_free_trial = true;
    let d = derive(&[i.clone()], &[]).unwrap();
    assert_eq!(d.status, Standing::Trialing);
    assert_eq!(d.trial_ends_at, Some(at(T0 + 30 * DAY)));
    i.status = "canceled".to_owned();
    let d = derive(&[i.clone()], &[]).unwrap();
    assert_eq!(d.status, Standing::Canceling);
    assert_eq!(d.cancel_at, Some(at(T0 + 30 * DAY)));
    // The subscription past due makes the workspace past due too.
    let d = derive(
        &[i.clone()],
        &[sub("past_due", Some(T0 + 2 * DAY), T0 + 2 * DAY)],
    )
    .unwrap();
    assert_eq!(d.status, Standing::PastDue);
    assert_eq!(d.past_due_since, Some(at(T0 + 2 * DAY)));
    // So does the item; the earliest time of the two stands; without its own
    // time the version that said so.
    i.status = "past_due".to_owned();
    i.version = T0 + DAY;
    let d = derive(
        &[i.clone()],
        &[sub("past_due", Some(T0 + 2 * DAY), T0 + 2 * DAY)],
    )
    .unwrap();
    assert_eq!(d.past_due_since, Some(at(T0 + DAY)));
    let d = derive(&[i], &[sub("active", None, T0 + 3 * DAY)]).unwrap();
    assert_eq!(d.status, Standing::PastDue);
    assert_eq!(d.past_due_since, Some(at(T0 + DAY)));
}

#[test]
fn the_current_items_subscription_speaks() {
    let i = item("a", "active", "pro", T0);
    let other = SubscriptionRecord {
        id: "csub_0".to_owned(),
        ..sub("past_due", Some(T0), T0 + 9 * DAY)
    };
    let d = derive(&[i], &[other, sub("active", None, T0)]).unwrap();
    assert_eq!(d.status, Standing::Active);
}

#[test]
fn plan_billing_first_unknown_slug_keeps_ended_goes_default_none_is_metadata() {
    let s = settings();
    let pro = derive(&[item("a", "active", "pro-plan", T0)], &[]).unwrap();
    assert_eq!(
        choose_plan(Some(&pro), &s, Some("team")),
        PlanChoice::Plan("pro-plan", PlanSource::Billing)
    );
    let odd = derive(&[item("a", "active", "gold", T0)], &[]).unwrap();
    assert_eq!(
        choose_plan(Some(&odd), &s, Some("team")),
        PlanChoice::KeepUnknown(Some("gold"))
    );
    let ended = derive(&[item("a", "ended", "pro-plan", T0)], &[]).unwrap();
    assert_eq!(
        choose_plan(Some(&ended), &s, Some("team")),
        PlanChoice::Plan("free", PlanSource::Billing)
    );
    assert_eq!(
        choose_plan(None, &s, Some("team")),
        PlanChoice::Plan("team", PlanSource::Metadata)
    );
    assert_eq!(
        choose_plan(None, &s, Some("nope")),
        PlanChoice::Plan("free", PlanSource::Metadata)
    );
}

#[test]
fn seats_replace_the_plans_quota_null_is_unlimited_absent_keeps_it() {
    let mut i = item("a", "active", "pro", T0);
    let plain = derive(&[i.clone()], &[]).unwrap();
    assert_eq!(seat_limit(Some(&plain), Some(10)), Some(10));
    i.seats = Seats::Limited(3);
    let three = derive(&[i.clone()], &[]).unwrap();
    assert_eq!(seat_limit(Some(&three), Some(10)), Some(3));
    i.seats = Seats::Unlimited;
    let unlimited = derive(&[i], &[]).unwrap();
    assert_eq!(seat_limit(Some(&unlimited), Some(10)), None);
    assert_eq!(seat_limit(None, Some(5)), Some(5));
    let ended = derive(&[item("a", "ended", "pro", T0)], &[]).unwrap();
    assert_eq!(seat_limit(Some(&ended), Some(5)), Some(5));
}

#[test]
fn over_seat_limit_when_more_active_members_than_seats() {
    assert!(!over_seat_limit(3, Some(3)));
    assert!(over_seat_limit(4, Some(3)));
    assert!(!over_seat_limit(1_000, None));
}

#[test]
fn grace_then_restricted_zero_days_restricts_at_once() {
    let mut i = item("a", "past_due", "pro", T0);
    i.past_due_at = Some(at(T0 + DAY));
    let d = derive(&[i], &[]).unwrap();
    assert_eq!(grace_ends_at(&d, 7), Some(at(T0 + 8 * DAY)));
    assert!(!restricted(&d, 7, at(T0 + 8 * DAY - 1)));
    assert!(restricted(&d, 7, at(T0 + 8 * DAY)));
    assert!(restricted(&d, 0, at(T0 + DAY)));
    assert!(!restricted(&d, 0, at(T0 + DAY - 1)));
    let active = derive(&[item("a", "active", "pro", T0)], &[]).unwrap();
    assert_eq!(grace_ends_at(&active, 7), None);
    assert!(!restricted(&active, 0, at(T0 + 100 * DAY)));
}

#[test]
fn next_item_is_the_latest_upcoming() {
    let items = [
        item("now", "active", "pro", T0),
        item("n1", "upcoming", "team", T0 + 30 * DAY),
        item("n2", "upcoming", "free", T0 + 60 * DAY),
        item("gone", "abandoned", "enterprise", T0 + 90 * DAY),
    ];
    for order in all_orders(&items) {
        let d = derive(&order, &[]).unwrap();
        assert_eq!(d.next_plan.as_deref(), Some("free"));
        assert_eq!(d.next_plan_at, Some(at(T0 + 60 * DAY)));
    }
}

#[test]
fn grace_days_default_to_7_take_the_file_and_the_environment_and_allow_0() {
    let s = Settings::from_sources(None, |_| None).unwrap();
    assert_eq!(s.billing.past_due_grace_days, 7);
    let s = Settings::from_sources(Some("[billing]\npast_due_grace_days = 3\n"), |_| None).unwrap();
    assert_eq!(s.billing.past_due_grace_days, 3);
    let s = Settings::from_sources(Some("[billing]\npast_due_grace_days = 3\n"), |k| {
        (k == "PROVISIONER_BILLING_PAST_DUE_GRACE_DAYS").then(|| "0".to_owned())
    })
    .unwrap();
    assert_eq!(s.billing.past_due_grace_days, 0);
    assert!(
        Settings::from_sources(Some("[billing]\npast_due_grace_days = -1\n"), |_| None).is_err()
    );
}
