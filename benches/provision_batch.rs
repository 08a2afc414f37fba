//! Throughput of `Provisioner::apply_batch` against the machine's PostgreSQL:
//! events/s with one event per transaction and with batches, 8 concurrent appliers
//! (as the worker runs them), on a realistic mix (1 organization.created, 8
//! organizationMembership.created, 1 organization.updated with a plan change per 10);
//! then, same sitting, membership events against billing events (issue 22: each
//! organization.created followed by 9 membership events, or by 9 billing events,
//! subscriptionItem.* and subscription.* alternating).
//!
//! Run: `cargo bench --bench provision_batch` (env: `BENCH_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432`; `BENCH_EVENTS` per applier, default 2000).
//! It creates and drops its own database `prov_bench_<pid>`.

use std::time::Instant;

use provisioner::clerk::EventType;
use provisioner::clerk::sample as payload;
use provisioner::config::{ConnectionUrl, DatabaseSettings, Settings};
use provisioner::provision::{Actor, Incoming, Provisioner};

const APPLIERS: usize = 8;

fn org(id: &str, name: &str, plan: Option<&str>, v: i64) -> serde_json::Value {
    let org = payload::organization(id, name, "user_creator", 1_700_000_000_000, v, 1);
    payload::with_plan(org, plan)
}

fn event(svix_id: String, kind: &str, data: serde_json::Value, ts: i64) -> Incoming {
    let body = payload::envelope(kind, data, ts, "ins_bench");
    Incoming {
        svix_id,
        kind: Some(EventType::parse(kind)),
        body: serde_json::to_vec(&body).unwrap(),
        received_at: chrono::Utc::now(),
        actor: Actor::Clerk,
        replayed_by: None,
    }
}

/// What follows each organization.created in a run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mix {
    /// The realistic mix (memberships and a plan change).
    Realistic,
    /// Membership events only.
    Memberships,
    /// Billing events only.
    Billing,
}

/// A billing event of the `i`th event of an organization.
fn billing_event(svix: String, org_id: &str, i: usize, t: i64) -> Incoming {
    let mut item = payload::BillingItem::new(
        &format!("csub_item_{org_id}_{}", i % 3),
        &format!("csub_{org_id}"),
        "team",
        t,
    );
    item.seats = Some(Some(10));
    if i.is_multiple_of(2) {
        event(
            svix,
            "subscriptionItem.updated",
            payload::subscription_item(org_id, &item),
            t,
        )
    } else {
        let sub_id = item.subscription_id.clone();
        let data = payload::subscription(org_id, &sub_id, "active", None, t, &[item]);
        event(svix, "subscription.updated", data, t)
    }
}

/// Events of one applier; `run` keeps ids of different runs apart.
fn events(run: &str, applier: usize, n: usize, mix: Mix) -> Vec<Incoming> {
    (0..n)
        .map(|i| {
            let org_id = format!("org_{run}_{applier}_{}", i / 10);
            let t = 1_750_000_000_000 + i as i64;
            let svix = format!("msg_{run}_{applier}_{i}");
            match i % 10 {
                0 => event(
                    svix,
                    "organization.created",
                    org(&org_id, "Org", None, t),
                    t,
                ),
                _ if mix == Mix::Billing => billing_event(svix, &org_id, i % 10, t),
                9 if mix == Mix::Realistic => event(
                    svix,
                    "organization.updated",
                    org(&org_id, "Org Renamed", Some("team"), t),
                    t,
                ),
                _ => {
                    let user = format!("user_{run}_{applier}_{i}");
                    let data = payload::membership(
                        &format!("orgmem_{run}_{applier}_{i}"),
                        org(&org_id, "Org", None, t - (i % 10) as i64),
                        &payload::Person::of(&user),
                        "org:member",
                        t,
                        t,
                    );
                    event(svix, "organizationMembership.created", data, t)
                }
            }
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
    let per_applier: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    // `cargo test --all-targets` runs this binary without `--bench`: a smoke run only.
    let per_applier = if std::env::args().any(|a| a == "--bench") {
        per_applier
    } else {
        20
    };
    let name = format!("prov_bench_{}", std::process::id());
    let db = DatabaseSettings {
        url: ConnectionUrl::new(format!("{base}/{name}")),
        max_connections: APPLIERS as u32,
        acquire_timeout_ms: 30_000,
        lock_timeout_ms: 0,
        statement_timeout_ms: 0,
        idle_in_transaction_session_timeout_ms: 0,
    };
    let pool = provisioner::db::prepare(&db).await?;
    let settings = Settings::from_sources(None, |_| None)?;
    let p = Provisioner::new(settings.provisioning);

    let runs = [
        (Mix::Realistic, 1usize),
        (Mix::Realistic, 8),
        (Mix::Realistic, 32),
        (Mix::Memberships, 1),
        (Mix::Billing, 1),
        (Mix::Memberships, 32),
        (Mix::Billing, 32),
    ];
    for (mix, batch) in runs {
        let run = format!("{mix:?}{batch}");
        let work: Vec<Vec<Incoming>> = (0..APPLIERS)
            .map(|a| events(&run, a, per_applier, mix))
            .collect();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for evs in work {
            let (p, pool) = (p.clone(), pool.clone());
            tasks.push(tokio::spawn(async move {
                for chunk in evs.chunks(batch) {
                    for r in p.apply_batch(&pool, chunk).await {
                        r.expect("event applies");
                    }
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let secs = start.elapsed().as_secs_f64();
        let total = APPLIERS * per_applier;
        println!(
            "apply_batch: {mix:?}, batch size {batch:>2}, {APPLIERS} appliers: {total} events in {secs:.2} s = {:.0} events/s",
            total as f64 / secs
        );
    }

    pool.close().await;
    let admin = sqlx::PgPool::connect(&format!("{base}/postgres")).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists \"{name}\" with (force)"
    )))
    .execute(&admin)
    .await?;
    Ok(())
}
