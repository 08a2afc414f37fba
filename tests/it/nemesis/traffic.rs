//! The main app's traffic during a round: read-API reads of a random (workspace,
//! user), with and without `X-Acting-User`, each checked against the stored state
//! read just before and just after it ("access never outlives Clerk").
//!
//! A read is judged only when the pair's stored standing (workspace status, every
//! membership row of the pair with its removal) is the same before and after it:
//! then the answer must follow it exactly, 200 for an active member and 404 for
//! anyone else. A read that fails (a fault in the way) is counted, not judged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::common::TOKEN;
use crate::nemesis::generator::{ORGS, USERS};

/// What the reads saw.
#[derive(Debug, Default)]
pub struct Reads {
    /// Reads judged (the pair's standing did not change during them).
    pub judged: AtomicUsize,
    /// Reads sent in all.
    pub sampled: AtomicUsize,
    /// Access violations, described.
    pub violations: std::sync::Mutex<Vec<String>>,
}

/// The pair's standing: workspace status, `active_members` says active, and every
/// membership row of the pair.
async fn standing(db: &PgPool, ws: &str, user: &str) -> Option<(Option<String>, bool, String)> {
    sqlx::query_as(
        "select (select status from workspaces where id = $1), \
                exists(select 1 from active_members where workspace_id = $1 and user_id = $2), \
                coalesce((select string_agg(membership_id || ':' || coalesce(removed_at::text, '-'), \
                   ',' order by membership_id) from members where workspace_id = $1 and user_id = $2), '')",
    )
    .bind(ws)
    .bind(user)
    .fetch_one(db)
    .await
    .ok()
}

/// Reads until `stop`, against `bases` (intakes), about ten a second.
pub fn spawn(
    seed: u64,
    prefix: String,
    bases: Vec<String>,
    db: PgPool,
    stop: CancellationToken,
) -> (Arc<Reads>, tokio::task::JoinHandle<()>) {
    let reads = Arc::new(Reads::default());
    let out = reads.clone();
    let task = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7265_6164);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        while !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))).await;
            let ws = format!("{prefix}org_{}", rng.random_range(0..ORGS));
            let user = format!("{prefix}user_{}", rng.random_range(0..USERS));
            let base = &bases[rng.random_range(0..bases.len())];
            let (path, acting) = match rng.random_range(0..3) {
                0 => (format!("/v1/workspaces/{ws}"), true),
                1 => (format!("/v1/workspaces/{ws}/members/{user}"), true),
                _ => (format!("/v1/workspaces/{ws}/members/{user}"), false),
            };
            let Some(before) = standing(&db, &ws, &user).await else {
                continue;
            };
            let mut req = client.get(format!("{base}{path}")).bearer_auth(TOKEN);
            if acting {
                req = req.header("X-Acting-User", &user);
            }
            out.sampled.fetch_add(1, Ordering::Relaxed);
            let Ok(res) = req.send().await else { continue };
            let status = res.status().as_u16();
            let Some(after) = standing(&db, &ws, &user).await else {
                continue;
            };
            if before != after || !matches!(status, 200 | 404) {
                continue;
            }
            // Without an acting user, only the member route is about the pair, and
            // only while the workspace is active.
            if !acting && before.0.as_deref() != Some("active") {
                continue;
            }
            out.judged.fetch_add(1, Ordering::Relaxed);
            let active = before.1;
            if (status == 200) != active {
                out.violations.lock().unwrap().push(format!(
                    "GET {path} (acting user: {acting}) answered {status} while {user} was {} \
                     in {ws} before and after the read (standing {before:?})",
                    if active {
                        "an active member"
                    } else {
                        "not an active member"
                    }
                ));
            }
        }
    });
    (reads, task)
}

/// Onboarding steps and whether each is required (the built-in configuration).
pub const STEPS: [(&str, bool); 4] = [
    ("gong", true),
    ("hubspot", false),
    ("slack", false),
    ("starter_analysis", true),
];

/// What the writes did: every onboarding step's possible statuses (one after a
/// 2xx; more after a write whose answer was lost), and the syncs.
#[derive(Debug, Default)]
pub struct Writes {
    /// (workspace without prefix, step) -> statuses it may have now.
    pub onboarding: std::sync::Mutex<std::collections::BTreeMap<(String, String), Vec<String>>>,
    pub writes: AtomicUsize,
    pub syncs: AtomicUsize,
    pub abandoned: AtomicUsize,
    pub violations: std::sync::Mutex<Vec<String>>,
}

/// Onboarding writes and just-in-time syncs (some abandoned by their client
/// mid-flight) until `stop`, a few a second. `in_clerk(o)`: whether Clerk (the
/// fake, serving the round's model) has organization `o`.
pub fn spawn_writes(
    seed: u64,
    prefix: String,
    bases: Vec<String>,
    in_clerk: Vec<bool>,
    stop: CancellationToken,
) -> (Arc<Writes>, tokio::task::JoinHandle<()>) {
    let writes = Arc::new(Writes::default());
    let out = writes.clone();
    let task = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7772_6974_6573);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        while !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..500))).await;
            let o = rng.random_range(0..ORGS);
            let ws = format!("org_{o}");
            let base = &bases[rng.random_range(0..bases.len())];
            if rng.random_bool(0.7) {
                let (step, required) = STEPS[rng.random_range(0..STEPS.len())];
                let status = if !required && rng.random_bool(0.5) {
                    "skipped"
                } else {
                    "completed"
                };
                out.writes.fetch_add(1, Ordering::Relaxed);
                let sent = client
                    .post(format!(
                        "{base}/v1/workspaces/{prefix}{ws}/onboarding/{step}"
                    ))
                    .bearer_auth(TOKEN)
                    .json(&serde_json::json!({ "status": status }))
                    .send()
                    .await;
                let mut map = out.onboarding.lock().unwrap();
                let possible = map
                    .entry((ws.clone(), step.to_owned()))
                    .or_insert_with(|| vec!["pending".to_owned()]);
                match sent.map(|r| r.status().as_u16()) {
                    Ok(200) => *possible = vec![status.to_owned()],
                    // Refused: nothing changed.
                    Ok(400..=499) => {}
                    // The answer was lost or failed: it may have committed.
                    _ => {
                        if !possible.iter().any(|s| s == status) {
                            possible.push(status.to_owned());
                        }
                    }
                }
            } else {
                out.syncs.fetch_add(1, Ordering::Relaxed);
                let abandon = rng.random_bool(0.4);
                let timeout = if abandon {
                    Duration::from_millis(rng.random_range(5..150))
                } else {
                    Duration::from_secs(20)
                };
                let sent = client
                    .post(format!("{base}/v1/workspaces/{prefix}{ws}/sync"))
                    .bearer_auth(TOKEN)
                    .timeout(timeout)
                    .send()
                    .await;
                match sent.map(|r| r.status().as_u16()) {
                    Ok(200) if !in_clerk[o] => out.violations.lock().unwrap().push(format!(
                        "POST /v1/workspaces/{ws}/sync answered 200; Clerk has no such organization"
                    )),
                    Ok(404) if in_clerk[o] => out.violations.lock().unwrap().push(format!(
                        "POST /v1/workspaces/{ws}/sync answered 404; Clerk has the organization"
                    )),
                    Ok(_) => {}
                    Err(_) => {
                        if abandon {
                            out.abandoned.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    });
    (writes, task)
}
