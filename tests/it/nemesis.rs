//! The nemesis (issue 21): seeded random Clerk histories sent like Svix through the
//! real binary (intake and worker child processes) while random faults hit the
//! processes, the broker and PostgreSQL, with the main app's reads sampled all the
//! while, then checked against the model of Clerk (`nemesis/checker.rs`).
//!
//! The CI seeds run here (a few minutes in all). A failure prints the seed, the
//! fault schedule and every violation with the history steps it concerns;
//! `NEMESIS_SEED=N [NEMESIS_MINUTES=M] cargo test --test it nemesis_seed --
//! --ignored --nocapture` runs that seed again (`bench/nemesis.sh` wraps it and
//! prints the table of docs/reliability.md).

mod checker;
mod faults;
mod generator;
mod run;
mod stack;
mod traffic;

use std::time::Duration;

use crate::common::{SECRET, eventually, now_secs, sign};
use run::Config;

fn ci(seed: u64, faults: bool) -> Config {
    Config {
        seed,
        rounds: 1,
        minutes: 0.0,
        ops: 160,
        interval_ms: 120,
        intakes: 1,
        workers: 1,
        faults,
        cluster: false,
    }
}

/// The pipeline alone (no faults): a seeded history with duplicates, reordering,
/// sparse deletions, poisons and a replay ends in the model's state, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_seed_1_without_faults() {
    run::assert_holds(ci(1, false)).await;
}

/// Seed 2 with its faults (process kills, pauses, broker and PostgreSQL cuts,
/// black holes, a crash, read-only PostgreSQL, as the seed draws them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_seed_2_with_faults() {
    run::assert_holds(ci(2, true)).await;
}

/// Seed 3 with its faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_seed_3_with_faults() {
    run::assert_holds(ci(3, true)).await;
}

/// Seed 5 on a three-node RabbitMQ cluster of its own, two intakes and three
/// workers: node stops, kills and pauses (the work queue's leader included), one
/// at a time, besides the process and PostgreSQL faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_seed_5_on_a_cluster() {
    run::assert_holds(Config {
        intakes: 2,
        workers: 3,
        cluster: true,
        ..ci(5, true)
    })
    .await;
}

/// A run of `NEMESIS_SEED` (default 1) for `NEMESIS_MINUTES` (default 1), with
/// `NEMESIS_WORKERS` workers (default 2) and `NEMESIS_INTAKES` intakes (default
/// 1); `NEMESIS_FAULTS=0` turns the faults off. Prints the table row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the long run, by hand or bench/nemesis.sh"]
async fn nemesis_seed() {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let cfg = Config {
        seed: var("NEMESIS_SEED", "1")
            .parse()
            .expect("NEMESIS_SEED is a number"),
        rounds: 1,
        minutes: var("NEMESIS_MINUTES", "1")
            .parse()
            .expect("NEMESIS_MINUTES is a number"),
        ops: var("NEMESIS_OPS", "200")
            .parse()
            .expect("NEMESIS_OPS is a number"),
        interval_ms: var("NEMESIS_INTERVAL_MS", "60")
            .parse()
            .expect("NEMESIS_INTERVAL_MS is a number"),
        intakes: var("NEMESIS_INTAKES", "1")
            .parse()
            .expect("NEMESIS_INTAKES is a number"),
        workers: var("NEMESIS_WORKERS", "2")
            .parse()
            .expect("NEMESIS_WORKERS is a number"),
        faults: var("NEMESIS_FAULTS", "1") != "0",
        cluster: var("NEMESIS_CLUSTER", "0") == "1",
    };
    run::assert_holds(cfg).await;
}

/// Regression (the nemesis, seed 11 round 1: a poison dead-lettered while
/// PostgreSQL was crashed never reached the processing log). A payload error
/// dead-lettered while PostgreSQL cannot take its `dead` row is still recorded
/// once PostgreSQL is back: the worker parks the event instead of acking it away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_made_while_postgres_is_away_is_recorded_once_it_is_back() {
    let stack = stack::Stack::start(1, 1, false)
        .await
        .expect("no cluster needed");
    let send = |w: crate::common::history::Webhook| {
        let url = format!("{}/webhooks/clerk", stack.base(0));
        async move {
            let ts = now_secs();
            reqwest::Client::new()
                .post(url)
                .header("svix-id", &w.svix_id)
                .header("svix-timestamp", ts.to_string())
                .header("svix-signature", sign(SECRET, &w.svix_id, ts, &w.body))
                .header("content-type", "application/json")
                .body(w.body.clone())
                .send()
                .await
                .expect("intake answers")
                .status()
        }
    };
    let status_of = |id: String| {
        let db = stack.db.clone();
        async move {
            sqlx::query_scalar::<_, String>("select status from events where svix_id = $1")
                .bind(id)
                .fetch_optional(&db)
                .await
                .ok()
                .flatten()
        }
    };
    // The worker is up and recording (one dead letter while PostgreSQL is there).
    let first = generator::poison("here", 0);
    assert_eq!(send(first.clone()).await, 200);
    let up = eventually(Duration::from_secs(60), || async {
        (status_of(first.svix_id.clone()).await.as_deref() == Some("dead")).then_some(())
    })
    .await;
    assert!(up.is_some(), "{}", stack.workers[0].process.log_tail());

    let poison = generator::poison("away", 0);
    stack.pg_proxy.cut().await;
    assert_eq!(
        send(poison.clone()).await,
        200,
        "intake queues without PostgreSQL"
    );
    // Dead-lettered while PostgreSQL is away.
    let dead_queue = format!("{}.provisioner.dead", stack.iso.prefix);
    let broker = stack.broker_url().await;
    let lettered = eventually(Duration::from_secs(60), || async {
        checker::dead_letter_ids(&broker, &dead_queue)
            .await
            .contains_key(&poison.svix_id)
            .then_some(())
    })
    .await;
    assert!(lettered.is_some(), "the poison is dead-lettered");
    // Away longer than the worker tries to record it (db_retry_max_ms = 2000).
    tokio::time::sleep(Duration::from_secs(8)).await;
    stack.pg_proxy.restore();
    let recorded = eventually(Duration::from_secs(60), || async {
        (status_of(poison.svix_id.clone()).await.as_deref() == Some("dead")).then_some(())
    })
    .await;
    assert!(
        recorded.is_some(),
        "the processing log records the dead letter once PostgreSQL is back: {}",
        stack.workers[0].process.log_tail()
    );
}
