//! Storing billing: every subscription and item keeps its newest snapshot
//! whatever the order and repetition of the events; billing is kept by
//! organization id, before the workspace and after its deletion.

use std::collections::BTreeMap;

use provisioner::clerk::sample::{self, BillingItem};
use provisioner::config::Settings;
use provisioner::provision::{Incoming, Outcome, Provisioner};
use serde_json::Value;
use sqlx::PgPool;

use crate::common::database::TestDatabase;
use crate::common::rows::*;
use crate::common::story::{Event, org, person};

const T0: i64 = 1_750_000_000_000;
const DAY: i64 = 86_400_000;

fn provisioner() -> Provisioner {
    let settings = Settings::from_sources(Some(""), |_| None).expect("valid settings");
    Provisioner::new(settings.provisioning)
}

async fn apply(p: &Provisioner, db: &PgPool, e: impl Into<Incoming>) -> Outcome {
    p.apply_batch(db, &[e.into()])
        .await
        .remove(0)
        .expect("event applies")
}

fn item_event(org_id: &str, kind: &str, item: &BillingItem) -> Event {
    Event::new(
        &format!("subscriptionItem.{kind}"),
        sample::subscription_item(org_id, item),
        item.updated_at,
    )
}

fn sub_event(
    org_id: &str,
    kind: &str,
    status: &str,
    past_due_at: Option<i64>,
    at: i64,
    items: &[BillingItem],
) -> Event {
    Event::new(
        &format!("subscription.{kind}"),
        sample::subscription(org_id, "csub_1", status, past_due_at, at, items),
        at,
    )
}

fn item(id: &str, plan: &str, status: &str, start: i64, at: i64) -> BillingItem {
    BillingItem {
        status: status.to_owned(),
        updated_at: at,
        ..BillingItem::new(id, "csub_1", plan, start)
    }
}

/// The billing rows of the database, as JSON of all their columns but this
/// service's write time.
async fn billing_rows(db: &PgPool) -> BTreeMap<String, Value> {
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "select 'sub/' || id, to_jsonb(t) - 'updated_at' from billing_subscriptions t \
         union all select 'item/' || id, to_jsonb(t) - 'updated_at' from billing_items t",
    )
    .fetch_all(db)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// (status, plan_slug, seat_based, seats, version) of an item.
async fn item_row(
    db: &PgPool,
    id: &str,
) -> Option<(String, Option<String>, bool, Option<i64>, i64)> {
    sqlx::query_as(
        "select status, plan_slug, seat_based, seats, version from billing_items where id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
    .unwrap()
}

/// The billing of a user payer (`payer.organization_id` = '') is ignored: logged
/// `ignored`, nothing stored.
#[tokio::test]
async fn user_payer_is_ignored() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let pro = item("csub_item_1", "pro", "active", T0, T0);
    let e = sub_event(
        "",
        "created",
        "active",
        None,
        T0,
        std::slice::from_ref(&pro),
    )
    .svix("msg_user");
    assert_eq!(apply(&p, &db.pool, e).await, Outcome::Ignored);
    let e = item_event("", "active", &pro).svix("msg_user_item");
    assert_eq!(apply(&p, &db.pool, e).await, Outcome::Ignored);
    // A payer with no organization_id at all is a user payer too.
    let e = item_event("org_x", "updated", &pro)
        .with(|d| {
            d["payer"]
                .as_object_mut()
                .unwrap()
                .remove("organization_id");
        })
        .svix("msg_no_org");
    assert_eq!(apply(&p, &db.pool, e).await, Outcome::Ignored);
    assert!(billing_rows(&db.pool).await.is_empty());
    for id in ["msg_user", "msg_user_item", "msg_no_org"] {
        assert_eq!(
            event_status(&db.pool, id).await,
            Some(("ignored".to_owned(), None, 1)),
            "{id}"
        );
    }
}

/// Billing that arrives before its organization is kept by organization id and
/// creates no workspace; the organization is provisioned as usual afterwards, and
/// the billing rows are still there.
#[tokio::test]
async fn billing_before_the_organization_is_kept() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let pro = BillingItem {
        seats: Some(Some(10)),
        ..item("csub_item_1", "pro", "active", T0, T0)
    };
    let e = sub_event("org_a", "created", "active", None, T0, &[pro]).svix("msg_sub");
    assert_eq!(apply(&p, &db.pool, e).await, Outcome::Processed);
    assert!(workspace(&db.pool, "org_a").await.is_none());
    assert_eq!(
        item_row(&db.pool, "csub_item_1").await,
        Some((
            "active".to_owned(),
            Some("pro".to_owned()),
            true,
            Some(10),
            T0
        ))
    );
    let (ws_id,): (Option<String>,) =
        sqlx::query_as("select workspace_id from events where svix_id = 'msg_sub'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(ws_id.as_deref(), Some("org_a"));

    apply(&p, &db.pool, org("org_a").created(T0 + 1)).await;
    assert_eq!(workspace(&db.pool, "org_a").await.unwrap().status, "active");
    assert_eq!(billing_rows(&db.pool).await.len(), 2);
}

/// Billing never revives a deleted workspace: it is stored, the workspace stays
/// deleted.
#[tokio::test]
async fn deleted_workspace_stays_deleted() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let acme = org("org_a");
    apply(&p, &db.pool, acme.created(T0)).await;
    apply(&p, &db.pool, acme.deleted(T0 + DAY)).await;
    let pro = item("csub_item_1", "pro", "active", T0, T0 + 2 * DAY);
    let e = sub_event("org_a", "active", "active", None, T0 + 2 * DAY, &[pro]);
    assert_eq!(apply(&p, &db.pool, e).await, Outcome::Processed);
    let w = workspace(&db.pool, "org_a").await.unwrap();
    assert_eq!(w.status, "deleted");
    assert_eq!(billing_rows(&db.pool).await.len(), 2);
}

/// An older snapshot of an item or subscription is superseded; a newer one
/// replaces it; unlimited seats and a plan without seats are told apart.
#[tokio::test]
async fn older_snapshots_are_superseded() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let newer = BillingItem {
        seats: Some(None),
        ..item("csub_item_1", "pro", "canceled", T0, T0 + 10)
    };
    assert_eq!(
        apply(&p, &db.pool, item_event("org_a", "canceled", &newer)).await,
        Outcome::Processed
    );
    let older = item("csub_item_1", "pro", "active", T0, T0 + 5);
    let e = item_event("org_a", "active", &older).svix("msg_old");
    assert_eq!(apply(&p, &db.pool, e).await, Outcome::Superseded);
    assert_eq!(
        event_status(&db.pool, "msg_old").await,
        Some(("superseded".to_owned(), None, 1))
    );
    assert_eq!(
        item_row(&db.pool, "csub_item_1").await,
        Some((
            "canceled".to_owned(),
            Some("pro".to_owned()),
            true,
            None,
            T0 + 10
        ))
    );
    // A subscription listing the older item: its own fields are new, the item's not.
    let e = sub_event("org_a", "updated", "active", None, T0 + 20, &[older]);
    assert_eq!(apply(&p, &db.pool, e).await, Outcome::Processed);
    assert_eq!(
        item_row(&db.pool, "csub_item_1").await.unwrap().0,
        "canceled"
    );
    let ended = item("csub_item_1", "pro", "ended", T0, T0 + 30);
    apply(&p, &db.pool, item_event("org_a", "ended", &ended)).await;
    assert_eq!(
        item_row(&db.pool, "csub_item_1").await,
        Some((
            "ended".to_owned(),
            Some("pro".to_owned()),
            false,
            None,
            T0 + 30
        ))
    );
    // The same snapshot again under another svix id changes nothing.
    let again = item_event("org_a", "ended", &ended).svix("msg_zzz");
    assert_eq!(apply(&p, &db.pool, again).await, Outcome::Superseded);
}

/// An unknown item status is stored as sent (Clerk Billing is beta).
#[tokio::test]
async fn unknown_status_is_stored() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let odd = item("csub_item_1", "pro", "paused_by_aliens", T0, T0);
    let e = item_event("org_a", "updated", &odd).with(|d| {
        d["brand_new"] = serde_json::json!([1, 2]);
    });
    assert_eq!(apply(&p, &db.pool, e).await, Outcome::Processed);
    assert_eq!(
        item_row(&db.pool, "csub_item_1").await.unwrap().0,
        "paused_by_aliens"
    );
}

/// A history of one organization's billing: a trial, its upgrade, a downgrade
/// queued, a cancellation, the end, the free plan, a payment failure, and two
/// snapshots of equal version (the smaller svix id stands).
fn history() -> Vec<Event> {
    let trial = BillingItem {
        is_free_trial: true,
        seats: Some(Some(3)),
        ..item("csub_item_a", "pro", "active", T0, T0)
    };
    let paid = BillingItem {
        is_free_trial: false,
        seats: Some(Some(8)),
        updated_at: T0 + DAY,
        ..trial.clone()
    };
    let canceled = BillingItem {
        status: "canceled".to_owned(),
        updated_at: T0 + 2 * DAY,
        ..paid.clone()
    };
    let free = BillingItem {
        period_end: None,
        ..item(
            "csub_item_b",
            "free",
            "upcoming",
            T0 + 30 * DAY,
            T0 + 2 * DAY,
        )
    };
    let ended = BillingItem {
        status: "ended".to_owned(),
        updated_at: T0 + 30 * DAY,
        ..canceled.clone()
    };
    let free_active = BillingItem {
        status: "active".to_owned(),
        updated_at: T0 + 30 * DAY,
        ..free.clone()
    };
    let free_tie = BillingItem {
        status: "past_due".to_owned(),
        ..free_active.clone()
    };
    let acme = org("org_a");
    let jane = person("user_jane", "a");
    vec![
        // The organization and a member: in a batch, their inserts are deferred
        // while billing writes at once.
        acme.created(T0 + DAY).svix("msg_00"),
        acme.membership("orgmem_jane", &jane)
            .created(T0 + DAY)
            .svix("msg_08"),
        sub_event("org_a", "created", "active", None, T0, &[trial]).svix("msg_01"),
        item_event("org_a", "updated", &paid).svix("msg_02"),
        item_event("org_a", "canceled", &canceled).svix("msg_03"),
        sub_event(
            "org_a",
            "updated",
            "active",
            None,
            T0 + 2 * DAY,
            &[canceled.clone(), free.clone()],
        )
        .svix("msg_04"),
        sub_event(
            "org_a",
            "active",
            "active",
            None,
            T0 + 30 * DAY,
            &[ended, free_active],
        )
        .svix("msg_05"),
        item_event("org_a", "pastDue", &free_tie).svix("msg_06"),
        sub_event(
            "org_a",
            "pastDue",
            "past_due",
            Some(T0 + 31 * DAY),
            T0 + 31 * DAY,
            &[],
        )
        .svix("msg_07"),
    ]
}

/// Deterministic shuffles (xorshift), so a failure names its seed.
fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = items.to_vec();
    for i in (1..out.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.swap(i, (state % (i as u64 + 1)) as usize);
    }
    out
}

async fn reset(db: &PgPool) {
    sqlx::query(
        "truncate billing_items, billing_subscriptions, events, workspaces, workspace_quotas, \
         onboarding_steps, members, users, membership_removals, user_profiles, audit_log",
    )
    .execute(db)
    .await
    .unwrap();
}

/// The history applied in order is the oracle; any permutation with duplicates,
/// one by one or in batches, ends in the same rows (billing, workspace, members).
#[tokio::test]
async fn any_order_with_duplicates_converges() {
    let db = TestDatabase::create().await;
    let p = provisioner();
    let events = history();
    for e in events.clone() {
        apply(&p, &db.pool, e).await;
    }
    let oracle = billing_rows(&db.pool).await;
    let oracle_state = state_rows(&db.pool).await;
    assert!(oracle_state.contains_key("members/orgmem_jane"));
    // The in-order result as §5b describes it.
    assert_eq!(oracle["sub/csub_1"]["status"], "past_due");
    assert_eq!(oracle["sub/csub_1"]["source_event"], "msg_07");
    assert_eq!(oracle["item/csub_item_a"]["status"], "ended");
    assert_eq!(oracle["item/csub_item_a"]["seats"], 8);
    // msg_05 and msg_06 carry csub_item_b at the same version: msg_05 stands.
    assert_eq!(oracle["item/csub_item_b"]["status"], "active");
    assert_eq!(oracle["item/csub_item_b"]["source_event"], "msg_05");
    assert_eq!(oracle["item/csub_item_b"]["seat_based"], false);

    for seed in 1..=40u64 {
        reset(&db.pool).await;
        let mut delivered: Vec<Incoming> = events.iter().cloned().map(Event::incoming).collect();
        // Every other event twice (a Svix retry: the same svix id).
        let again: Vec<Incoming> = delivered.iter().step_by(2).cloned().collect();
        delivered.extend(again);
        let delivered = shuffled(&delivered, seed);
        if seed % 2 == 0 {
            for chunk in delivered.chunks(4) {
                for r in p.apply_batch(&db.pool, chunk).await {
                    r.expect("event applies");
                }
            }
        } else {
            for e in delivered {
                apply(&p, &db.pool, e).await;
            }
        }
        assert_eq!(billing_rows(&db.pool).await, oracle, "seed {seed}");
        assert_eq!(state_rows(&db.pool).await, oracle_state, "seed {seed}");
    }
}
