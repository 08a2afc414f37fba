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
use crate::generator::{ORGS, USERS};

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
