//! `provisioner-load e2e`: end-to-end throughput and provisioning lag.
//!
//! Sends unique signed Clerk events (each organization created, then its
//! memberships) to a running `serve`, at a fixed rate or as fast as a number of
//! requests in flight allows, then watches the processing log (`events` table, the
//! configured `DATABASE_URL`) until every accepted event is provisioned. Reports the
//! sustained provisioned events/s and the lag of each event (`processed_at` − the
//! moment its request was sent). Only ever talks to the given URL and database.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Args;
use provisioner::clerk::sample as payload;
use provisioner::config::Settings;
use provisioner::intake::Verifier;
use serde_json::json;

use crate::{Report, Samples};

/// Arguments of `provisioner-load e2e`.
#[derive(Debug, Args)]
pub struct E2eArgs {
    /// Base URL of a running `provisioner serve`.
    #[arg(default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Events to send.
    #[arg(long, default_value_t = 10_000)]
    pub events: usize,
    /// Events per second to send (0 = as fast as --concurrency allows).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Memberships created per organization (the mix: one organization.created,
    /// then this many organizationMembership.created).
    #[arg(long, default_value_t = 4)]
    pub members_per_org: usize,
    /// Give up waiting for the worker after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// What one run measured.
#[derive(Debug, serde::Serialize)]
pub struct E2eReport {
    /// Events accepted by intake (200 queued).
    pub accepted: u64,
    /// Events found provisioned in the processing log.
    pub provisioned: u64,
    /// Of those, with a status other than `processed`.
    pub not_processed: u64,
    /// Events intake refused even after retries.
    pub refused: u64,
    /// Seconds from the first request to the last event provisioned.
    pub wall_secs: f64,
    /// provisioned / wall_secs.
    pub overall_per_second: f64,
    /// Rate between the 10th and 90th percentile of provisioning times: the
    /// steady state, without ramp-up and tail.
    pub sustained_per_second: f64,
    /// Intake request latencies.
    pub intake: Report,
    /// Provisioning lag (processed_at − request sent).
    pub lag: Report,
}

/// Runs `provisioner-load e2e`.
pub async fn run(settings: &Settings, args: E2eArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be positive");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be positive");
    let pool = provisioner::db::pool(&settings.database).context("database settings")?;
    sqlx::query("select 1")
        .execute(&pool)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {}", settings.database.url))?;
    let verifier = Arc::new(Verifier::new(&settings.clerk.webhook_secrets));
    let url = format!("{}/webhooks/clerk", args.url.trim_end_matches('/'));
    let client = Arc::new(crate::http::PostClient::new(&url)?);
    let run_id = format!("{:x}", Utc::now().timestamp_millis());
    let prefix = format!("msg_e2e_{run_id}_");
    let started_wall = Utc::now();
    let start = Instant::now();

    let sent_ms: Arc<Vec<AtomicI64>> =
        Arc::new((0..args.events).map(|_| AtomicI64::new(0)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..args.concurrency {
        let (client, verifier, sent_ms, next, refused, run_id) = (
            client.clone(),
            verifier.clone(),
            sent_ms.clone(),
            next.clone(),
            refused.clone(),
            run_id.clone(),
        );
        let (events, rate, per_org) = (args.events, args.rate, args.members_per_org);
        senders.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= events {
                    break;
                }
                if rate > 0 {
                    // Open loop: event i leaves at its scheduled time, whatever the
                    // latency of earlier ones.
                    let at = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
                    tokio::time::sleep_until(at.into()).await;
                }
                let svix_id = format!("msg_e2e_{run_id}_{i}");
                let mut ok = false;
                for _attempt in 0..10 {
                    let now_ms = Utc::now().timestamp_millis();
                    let body = event_body(&run_id, i, per_org, now_ms);
                    let Some(signature) = verifier.sign(&svix_id, now_ms / 1000, &body) else {
                        break;
                    };
                    let t0 = Instant::now();
                    let ts = (now_ms / 1000).to_string();
                    let headers = [
                        ("svix-id", svix_id.as_str()),
                        ("svix-timestamp", ts.as_str()),
                        ("svix-signature", signature.as_str()),
                    ];
                    let sent =
                        tokio::time::timeout(Duration::from_secs(30), client.post(&headers, &body))
                            .await;
                    if let Ok(Ok(200)) = sent {
                        samples.record(t0.elapsed());
                        sent_ms[i].store(now_ms, Ordering::Relaxed);
                        ok = true;
                        break;
                    }
                    samples.error();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !ok {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            samples
        }));
    }
    let mut intake = Samples::default();
    for s in senders {
        intake.merge(s.await?);
    }
    let send_elapsed = start.elapsed();
    let refused = refused.load(Ordering::Relaxed);
    let accepted = args.events as u64 - refused;

    // Wait until the processing log has every accepted event.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let like = format!("{prefix}%");
    let mut seen: i64 = 0;
    while Instant::now() < deadline {
        seen = sqlx::query_scalar(
            "select count(*) from events where processed_at >= $1 and svix_id like $2",
        )
        .bind(started_wall - chrono::Duration::seconds(5))
        .bind(&like)
        .fetch_one(&pool)
        .await?;
        if seen as u64 >= accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if (seen as u64) < accepted {
        eprintln!("warning: only {seen} of {accepted} events were provisioned before the timeout");
    }

    let rows: Vec<(String, String, f64)> = sqlx::query_as(
        "select svix_id, status, (extract(epoch from processed_at) * 1000)::float8
         from events where processed_at >= $1 and svix_id like $2",
    )
    .bind(started_wall - chrono::Duration::seconds(5))
    .bind(&like)
    .fetch_all(&pool)
    .await?;
    let mut lag = Samples::default();
    let mut done_ms: Vec<f64> = Vec::with_capacity(rows.len());
    let mut not_processed = 0;
    for (svix_id, status, processed_ms) in &rows {
        if status != "processed" {
            not_processed += 1;
        }
        let Some(i) = svix_id
            .strip_prefix(&prefix)
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let sent = sent_ms
            .get(i)
            .map(|a| a.load(Ordering::Relaxed))
            .unwrap_or(0);
        if sent > 0 {
            lag.record(Duration::from_secs_f64(
                ((processed_ms - sent as f64).max(0.0)) / 1000.0,
            ));
        }
        done_ms.push(*processed_ms);
    }
    done_ms.sort_by(f64::total_cmp);
    let first_sent = started_wall.timestamp_millis() as f64;
    let wall_secs = done_ms
        .last()
        .map(|last| (last - first_sent) / 1000.0)
        .unwrap_or(send_elapsed.as_secs_f64())
        .max(1e-3);
    let sustained = if done_ms.len() >= 10 {
        let lo = done_ms[done_ms.len() / 10];
        let hi = done_ms[done_ms.len() * 9 / 10];
        let n = (done_ms.len() * 9 / 10 - done_ms.len() / 10) as f64;
        if hi > lo {
            n / ((hi - lo) / 1000.0)
        } else {
            0.0
        }
    } else {
        done_ms.len() as f64 / wall_secs
    };
    let wall = Duration::from_secs_f64(wall_secs);
    let report = E2eReport {
        accepted,
        provisioned: rows.len() as u64,
        not_processed,
        refused,
        wall_secs,
        overall_per_second: rows.len() as f64 / wall_secs,
        sustained_per_second: sustained,
        intake: intake.report("intake (POST, 200 queued)", send_elapsed),
        lag: lag.report("provisioning lag", wall),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mode = if args.rate > 0 {
            format!("rate {}/s", args.rate)
        } else {
            format!("concurrency {}", args.concurrency)
        };
        println!(
            "load e2e: {} events ({mode}) against {}",
            args.events, args.url
        );
        println!("{}", report.intake);
        println!("{}", report.lag);
        println!(
            "provisioned {} of {} accepted ({} refused, {} not `processed`) in {:.2} s: {:.0}/s overall, {:.0}/s sustained",
            report.provisioned,
            report.accepted,
            report.refused,
            report.not_processed,
            report.wall_secs,
            report.overall_per_second,
            report.sustained_per_second
        );
    }
    anyhow::ensure!(
        report.provisioned >= report.accepted,
        "{} accepted events were not provisioned",
        report.accepted - report.provisioned
    );
    Ok(())
}

/// Event `i` of a run: organization `i / (per_org + 1)` is created first, then gets
/// `per_org` memberships (each embedding its organization, as Clerk sends them).
fn event_body(run_id: &str, i: usize, per_org: usize, now_ms: i64) -> Vec<u8> {
    let org_n = i / (per_org + 1);
    let member_n = i % (per_org + 1);
    let org_id = format!("org_e2e{run_id}x{org_n}");
    let mut organization = payload::organization(
        &org_id,
        &format!("Load Org {org_n}"),
        &format!("user_e2e{run_id}x{org_n}x1"),
        now_ms,
        now_ms,
        per_org as u32,
    );
    // Every fifth organization on a paid plan, so the worker reads metadata too.
    if org_n.is_multiple_of(5) {
        organization["public_metadata"] = json!({"plan": "team"});
    }
    let (kind, data) = if member_n == 0 {
        ("organization.created", organization)
    } else {
        let person = payload::Person::of(&format!("user_e2e{run_id}x{org_n}x{member_n}"));
        let role = if member_n == 1 {
            "org:admin"
        } else {
            "org:member"
        };
        (
            "organizationMembership.created",
            payload::membership(
                &format!("orgmem_e2e{run_id}x{org_n}x{member_n}"),
                organization,
                &person,
                role,
                now_ms,
                now_ms,
            ),
        )
    };
    serde_json::to_vec(&payload::envelope(kind, data, now_ms, "ins_load"))
        .expect("a JSON value serializes")
}

#[cfg(test)]
mod tests {
    use super::event_body;

    #[test]
    fn mix_is_an_organization_then_its_memberships() {
        let kinds: Vec<String> = (0..6)
            .map(|i| {
                let v: serde_json::Value =
                    serde_json::from_slice(&event_body("r", i, 2, 1)).unwrap();
                v["type"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "organization.created",
                "organizationMembership.created",
                "organizationMembership.created",
                "organization.created",
                "organizationMembership.created",
                "organizationMembership.created",
            ]
        );
        let m: serde_json::Value = serde_json::from_slice(&event_body("r", 4, 2, 1)).unwrap();
        assert_eq!(m["data"]["organization"]["id"], "org_e2erx1");
        assert_eq!(m["data"]["public_user_data"]["user_id"], "user_e2erx1x1");
    }
}
