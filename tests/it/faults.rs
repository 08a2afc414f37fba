//! The fault suite (issue 11): the real binary, as child processes, under a steady
//! stream of signed webhooks from a sender that behaves like Svix
//! (`common::svix_sender`), while one part of the system is broken and repaired.
//!
//! Each test owns what it breaks: its own RabbitMQ node, its own PostgreSQL cluster
//! (initdb/pg_ctl on a spare port), or the worker/intake process it started; the
//! machine's shared services are only used, with the test's own database and broker
//! names, for what the test does not break.
//!
//! After each fault, the same checks ([`Stack::settle`]): the sender gave up on no
//! message; every svix id that got a 2xx is in the processing log exactly once, as
//! applied (never `dead`, never taken up twice), and nothing else is; the dead-letter
//! queue is empty; no event's changes were applied twice (the audit log has no
//! repeated entry); the state equals the in-order application of the same history
//! (every column of every row); and every process the test did not stop itself is
//! still running. Each test prints one tally line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::children::{Process, free_port};
use crate::common::history::{self, Webhook};
use crate::common::pg_cluster::PgCluster;
use crate::common::rabbit::{self, RabbitNode};
use crate::common::svix_sender::{self, Attempt, Progress, Report, SenderConfig};
use crate::common::{Isolation, SECRET, base_amqp_url, base_database_url, eventually, random_id};
use sqlx::PgPool;

/// Organizations and users of every test's history (about 330 webhooks).
const ORGS: usize = 40;
const USERS: usize = 60;

/// The services one test runs its processes against, and its names.
struct Stack {
    iso: Isolation,
    amqp_url: String,
    database_url: String,
    config: PathBuf,
    port: u16,
    db: PgPool,
    /// Prefix of the entities the stream is about, and of the in-order copy.
    sent: String,
    oracle: String,
}

impl Stack {
    /// The test's database (created and migrated on `pg_base`), its broker names on
    /// `amqp_url`, a config file for the children, a port for intake.
    async fn new(amqp_url: &str, pg_base: &str) -> Self {
        let iso = Isolation::new();
        let database_url = format!("{pg_base}/{}", iso.database);
        let db = crate::common::database::prepare(database_url.clone(), 4).await;
        let config = std::env::temp_dir().join(format!("provisioner-faults-{}.toml", random_id(8)));
        std::fs::write(
            &config,
            format!(
                "{}\n[worker]\nretry_delays_ms = [200, 400, 1000]\ndb_retry_max_ms = 2000\nbatch_size = 16\n",
                iso.broker_toml()
            ),
        )
        .unwrap();
        let run = random_id(6);
        Self {
            iso,
            amqp_url: amqp_url.to_owned(),
            database_url,
            config,
            port: free_port(),
            db,
            sent: format!("s{run}_"),
            oracle: format!("o{run}_"),
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.database_url.clone()),
            ("AMQP_URL".into(), self.amqp_url.clone()),
            (
                "PROVISIONER_LISTEN".into(),
                format!("127.0.0.1:{}", self.port),
            ),
            (
                "PROVISIONER_CONFIG".into(),
                self.config.display().to_string(),
            ),
            ("PROVISIONER_ENV".into(), "development".into()),
            ("RUST_LOG".into(), "info".into()),
        ]
    }

    /// `provisioner serve` (with `--no-worker` unless `worker`), healthy.
    async fn serve(&self, name: &str, worker: bool) -> Process {
        let args: &[&str] = if worker {
            &["serve"]
        } else {
            &["serve", "--no-worker"]
        };
        let mut p = Process::start(name, args, &self.env());
        p.wait_healthy(&self.base()).await;
        p
    }

    /// `provisioner worker`.
    fn worker(&self, name: &str) -> Process {
        Process::start(name, &["worker"], &self.env())
    }

    /// The history this test streams, and its in-order copy.
    fn histories(&self, seed: u64) -> (Vec<Webhook>, Vec<Webhook>) {
        (
            history::history(&self.sent, ORGS, USERS, seed),
            history::history(&self.oracle, ORGS, USERS, seed),
        )
    }

    /// Starts the Svix-like sender on the history.
    fn send(
        &self,
        webhooks: &[Webhook],
    ) -> (std::sync::Arc<Progress>, tokio::task::JoinHandle<Report>) {
        svix_sender::spawn(SenderConfig::new(&self.base(), SECRET), webhooks.to_vec())
    }

    /// Waits for every acknowledged event, then checks everything the fault suite
    /// promises (module docs) and returns the tally line.
    async fn settle(
        &self,
        test: &str,
        report: &Report,
        oracle: &[Webhook],
        processes: &mut [&mut Process],
    ) -> String {
        let given_up = report.given_up();
        assert!(
            given_up.is_empty(),
            "{test}: the sender gave up on {} messages (first: {:?}); {}",
            given_up.len(),
            given_up.first(),
            report.summary()
        );
        let acknowledged = report.acknowledged();
        let like = format!("{}%", self.sent);
        let logged = eventually(Duration::from_secs(120), || async {
            let n: i64 = sqlx::query_scalar("select count(*) from events where svix_id like $1")
                .bind(&like)
                .fetch_one(&self.db)
                .await
                .ok()?;
            (n as usize >= acknowledged.len()).then_some(n)
        })
        .await;
        let log: Vec<(String, String, i32)> =
            sqlx::query_as("select svix_id, status, attempts from events where svix_id like $1")
                .bind(&like)
                .fetch_all(&self.db)
                .await
                .unwrap();
        let log: BTreeMap<String, (String, i32)> = log
            .into_iter()
            .map(|(id, status, attempts)| (id, (status, attempts)))
            .collect();
        assert!(
            logged.is_some(),
            "{test}: {} of {} acknowledged events are in the processing log after 120 s; \
             missing (first 10): {:?}; processes:\n{}",
            log.len(),
            acknowledged.len(),
            acknowledged
                .iter()
                .filter(|id| !log.contains_key(*id))
                .take(10)
                .collect::<Vec<_>>(),
            processes
                .iter()
                .map(|p| format!("--- {}\n{}", p.name, p.log_tail()))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let unknown: Vec<&String> = log
            .keys()
            .filter(|id| !acknowledged.contains(*id))
            .collect();
        assert!(
            unknown.is_empty(),
            "{test}: events nobody acknowledged were processed: {unknown:?}"
        );
        let dead: Vec<(&String, &String)> = log
            .iter()
            .filter(|(_, (status, _))| status == "dead")
            .map(|(id, (status, _))| (id, status))
            .collect();
        let dead_letters = queue_depth_at(
            &self.amqp_url,
            &format!("{}.provisioner.dead", self.iso.prefix),
        )
        .await;
        // Taken up more than once: only a dead event replayed is (the column counts
        // a worker taking the event up again after it was logged).
        let retaken = log.values().filter(|(_, attempts)| *attempts > 1).count();
        // One event's change written twice would repeat its audit entry.
        let repeated: i64 = sqlx::query_scalar(
            "select coalesce(sum(n - 1), 0)::bigint from (select count(*) as n from audit_log \
             where event_id like $1 group by event_id, action, subject, details::text \
             having count(*) > 1) t",
        )
        .bind(&like)
        .fetch_one(&self.db)
        .await
        .unwrap();
        let duplicates_applied = retaken + repeated as usize;
        let tally = format!(
            "{test}: {}, processed {}, dead {}, duplicates applied {}",
            report.summary(),
            log.len(),
            dead.len() + dead_letters as usize,
            duplicates_applied
        );
        println!("{tally}");
        assert!(
            dead.is_empty() && dead_letters == 0,
            "{test}: dead-lettered: {dead:?}, {dead_letters} in the dead-letter queue"
        );
        assert_eq!(duplicates_applied, 0, "{test}: an event was applied twice");
        assert_eq!(
            log.len(),
            acknowledged.len(),
            "{test}: every acknowledged event is in the processing log once"
        );

        history::apply_in_order(&self.db, oracle).await;
        let diff = history::row_diff(
            &history::rows(&self.db, &self.oracle).await,
            &history::rows(&self.db, &self.sent).await,
        );
        assert!(
            diff.is_empty(),
            "{test}: the state differs from the in-order history (key, in order, faulted): {diff:#?}"
        );
        for p in processes.iter_mut() {
            p.assert_running();
        }
        tally
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Ready messages in `queue` on the broker at `url` (0 if it does not exist).
async fn queue_depth_at(url: &str, queue: &str) -> u32 {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("broker reachable");
    let ch = conn.create_channel().await.unwrap();
    let depth = provisioner::broker::inspect(&ch, queue)
        .await
        .map(|q| q.message_count())
        .unwrap_or(0);
    let _ = conn.close(200, "bye".into()).await;
    depth
}

/// Waits until the sender has started `n` messages.
async fn wait_started(progress: &Progress, n: usize) {
    let started = eventually(Duration::from_secs(60), || async {
        (progress.started.load(Ordering::Relaxed) >= n).then_some(())
    })
    .await;
    assert!(started.is_some(), "the sender started {n} messages");
}

/// Attempts that started in `[from, to)` and how they ended.
fn attempts_between(report: &Report, from: Instant, to: Instant) -> Vec<Attempt> {
    report
        .attempts()
        .filter(|(start, _, _)| *start >= from && *start < to)
        .map(|(_, _, a)| a.clone())
        .collect()
}

/// 2. PostgreSQL (a cluster of the test's own) crashes mid-stream and stays away
/// for 12 s: intake goes on queueing (it needs only the broker), the worker holds
/// its events (in process, then parked in the retry queue) and applies them once the
/// server is back; nothing is dead-lettered or lost, and no process is restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_unreachable_for_ten_seconds_then_restored() {
    let pg = PgCluster::start();
    let stack = Stack::new(&base_amqp_url(), &pg.url()).await;
    let mut intake = stack.serve("serve --no-worker", false).await;
    let mut worker = stack.worker("worker");
    let (webhooks, oracle) = stack.histories(2);
    let (progress, sender) = stack.send(&webhooks);

    wait_started(&progress, webhooks.len() / 4).await;
    pg.crash();
    let down = Instant::now();
    // Unreachable: connections are refused for the whole outage.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let refused = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect(&stack.database_url)
        .await
        .is_err();
    assert!(refused, "PostgreSQL is unreachable during the outage");
    let up = Instant::now();
    pg.start_server();
    // The test's own pool lost its connections with the server: it reconnects.
    let report = sender.await.unwrap();

    // Intake never needed the database: every webhook of the outage was queued.
    let during = attempts_between(&report, down, up);
    assert!(
        !during.is_empty() && during.iter().all(Attempt::ok),
        "intake answered 2xx throughout the database outage: {during:?}"
    );
    stack
        .settle(
            "postgres_down",
            &report,
            &oracle,
            &mut [&mut intake, &mut worker],
        )
        .await;
}

/// 3. A worker is SIGKILLed in the middle of a batch (its transaction open, its
/// deliveries unacknowledged) and another is started: the broker hands the
/// unacknowledged deliveries to the new worker, the killed transaction never
/// commits, and every event is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_mid_batch_and_replaced() {
    let stack = Stack::new(&base_amqp_url(), &base_database_url()).await;
    let mut intake = stack.serve("serve --no-worker", false).await;
    let mut first = stack.worker("worker 1");
    let (webhooks, oracle) = stack.histories(3);
    let (progress, sender) = stack.send(&webhooks);

    // Mid-batch, for sure: the test holds the advisory lock of one organization, so
    // the worker's batch with that organization's next event waits inside its
    // transaction (lock_timeout is 10 s; the kill comes long before).
    wait_started(&progress, webhooks.len() / 3).await;
    let mut holder = stack.db.begin().await.unwrap();
    let org = format!("{}org_7", stack.sent);
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("ws:{org}"))
        .execute(&mut *holder)
        .await
        .unwrap();
    let waiting = eventually(Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where datname = $1 \
             and wait_event_type = 'Lock' and wait_event = 'advisory'",
        )
        .bind(&stack.iso.database)
        .fetch_one(&stack.db)
        .await
        .ok()?;
        (n > 0).then_some(())
    })
    .await;
    assert!(
        waiting.is_some(),
        "the worker reached an event of {org} inside a batch: {}",
        first.log_tail()
    );
    let before: i64 = sqlx::query_scalar("select count(*) from events where svix_id like $1")
        .bind(format!("{}%", stack.sent))
        .fetch_one(&stack.db)
        .await
        .unwrap();
    first.sigkill();
    holder.rollback().await.unwrap();
    let mut second = stack.worker("worker 2");

    let report = sender.await.unwrap();
    let tally = stack
        .settle(
            "worker_sigkill",
            &report,
            &oracle,
            &mut [&mut intake, &mut second],
        )
        .await;
    assert!(
        (before as usize) < report.acknowledged().len(),
        "the kill came mid-stream ({before} processed before it): {tally}"
    );
}

/// 4. `serve` (intake and worker in one process) gets SIGTERM mid-stream and is
/// started again on the same port: it drains and exits 0, Svix's attempts while it
/// is away fail and are retried, and every acknowledged event is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_sigterm_mid_stream_and_restarted() {
    let stack = Stack::new(&base_amqp_url(), &base_database_url()).await;
    let mut first = stack.serve("serve 1", true).await;
    let (webhooks, oracle) = stack.histories(4);
    let (progress, sender) = stack.send(&webhooks);

    wait_started(&progress, webhooks.len() / 3).await;
    first.sigterm();
    let status = first.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "serve exits 0 after SIGTERM ({status}): {}",
        first.log_tail()
    );
    // Away long enough for attempts to fail and be retried.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut second = stack.serve("serve 2", true).await;

    let report = sender.await.unwrap();
    assert!(
        report.count(|a| *a == Attempt::ConnectionError) > 0,
        "some attempts found serve away: {}",
        report.summary()
    );
    stack
        .settle("serve_sigterm", &report, &oracle, &mut [&mut second])
        .await;
}

/// 1. The broker (a RabbitMQ node of the test's own) is stopped mid-stream and
/// started again with its data: intake answers 503 while it is away (Svix retries),
/// the publisher and the worker reconnect by themselves, and the events queued
/// before the stop are still there and applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restarted_mid_stream() {
    let Some(node) = rabbit::or_skip(RabbitNode::start().await) else {
        return;
    };
    let stack = Stack::new(&node.amqp_url(), &base_database_url()).await;
    let mut intake = stack.serve("serve --no-worker", false).await;
    let mut worker = stack.worker("worker");
    let (webhooks, oracle) = stack.histories(1);
    let (progress, sender) = stack.send(&webhooks);

    wait_started(&progress, webhooks.len() / 3).await;
    node.stop().await.expect("the node stops");
    let down = Instant::now();
    // Away for a while: attempts meet a broker that is not there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Certainly away until here (the restart may let the publisher back in before
    // it returns).
    let up = Instant::now();
    node.restart().await.expect("the node starts again");

    let report = sender.await.unwrap();
    let during = attempts_between(&report, down, up);
    assert!(
        during.iter().any(|a| !a.ok()),
        "attempts during the outage were refused: {during:?}"
    );
    assert!(
        during.iter().all(|a| !a.ok()),
        "nothing was acknowledged while the broker was away: {during:?}"
    );
    stack
        .settle(
            "broker_restart",
            &report,
            &oracle,
            &mut [&mut intake, &mut worker],
        )
        .await;
}

/// Whether the node has its free-disk alarm in effect.
async fn disk_alarm(node: &RabbitNode) -> bool {
    node.ctl(&["eval", "rabbit_alarm:get_alarms()."])
        .await
        .expect("the node answers")
        .contains("resource_limit,disk")
}

/// Waits until the node's disk alarm is `on` (or off).
async fn wait_disk_alarm(node: &RabbitNode, on: bool) {
    let reached = eventually(Duration::from_secs(60), || async {
        (disk_alarm(node).await == on).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "the disk alarm is {}",
        if on { "on" } else { "off" }
    );
}

/// `amqp_publish_failures_total{reason="blocked"}` of the intake at `base`.
async fn blocked_publishes(base: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("amqp_publish_failures_total") && l.contains("reason=\"blocked\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// 5. The broker node's free-disk alarm goes off mid-stream (its `disk_free_limit`
/// set far above the free space, then back): the broker blocks publishers, and
/// intake answers 503 to every webhook while the alarm holds (never 200, never a
/// hang: once the broker said `connection.blocked` intake refuses at once, sending
/// nothing), then queues again once the alarm clears; every 2xx is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_alarm_answers_503_until_it_clears() {
    let Some(node) = rabbit::or_skip(RabbitNode::start().await) else {
        return;
    };
    let stack = Stack::new(&node.amqp_url(), &base_database_url()).await;
    let mut intake = stack.serve("serve --no-worker", false).await;
    let mut worker = stack.worker("worker");
    let (webhooks, oracle) = stack.histories(5);
    let (progress, sender) = stack.send(&webhooks);

    wait_started(&progress, webhooks.len() / 4).await;
    node.set_disk_free_limit("100000GB")
        .await
        .expect("the limit is set");
    wait_disk_alarm(&node, true).await;
    let held_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let held_to = Instant::now();
    let blocked = blocked_publishes(&stack.base()).await;
    node.set_disk_free_limit("50MB")
        .await
        .expect("the limit is set back");
    wait_disk_alarm(&node, false).await;
    let cleared = Instant::now();

    let report = sender.await.unwrap();
    // Attempts made and answered while the alarm held: all 503.
    let during: Vec<&(Instant, Duration, Attempt)> = report
        .attempts()
        .filter(|(start, took, _)| *start >= held_from && *start + *took <= held_to)
        .collect();
    assert!(!during.is_empty(), "webhooks arrived while the alarm held");
    assert!(
        during.iter().all(|a| a.2 == Attempt::Status(503)),
        "intake answered 503 to every webhook while the alarm held: {:?}",
        during.iter().map(|a| &a.2).collect::<Vec<_>>()
    );
    // None hung past Svix's timeout (an attempt is a Timeout after it).
    let hung = report
        .attempts()
        .filter(|(start, _, a)| *start >= held_from && *start < held_to && *a == Attempt::Timeout)
        .count();
    assert_eq!(hung, 0, "no webhook waited past Svix's timeout");
    // Refused because the broker said it blocks the connection, not by waiting out
    // the publish timeout.
    assert!(
        blocked > 0.0,
        "intake refused publishes the broker blocked: {}",
        intake.log_tail()
    );
    // Recovered: webhooks sent after the alarm cleared were queued.
    assert!(
        report
            .attempts()
            .any(|(start, _, a)| *start >= cleared && a.ok()),
        "intake queues again after the alarm: {}",
        report.summary()
    );
    stack
        .settle(
            "disk_alarm",
            &report,
            &oracle,
            &mut [&mut intake, &mut worker],
        )
        .await;
}
