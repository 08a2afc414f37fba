//! Scale-out on a real RabbitMQ cluster (issue 11): a three-node cluster of the
//! test's own, two intake processes and three worker processes of the built binary,
//! one PostgreSQL database, a steady stream of signed webhooks from a sender that
//! behaves like Svix, and the node leading the work queue stopped mid-stream and
//! brought back later.
//!
//! If this machine cannot start RabbitMQ nodes of a test's own, the tests fail with
//! the reason, unless `PROVISIONER_SKIP_CLUSTER=1` is set.

use crate::common;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::children::{Process, free_port};
use crate::common::database::TestDatabase;
use crate::common::rabbit::{self, RabbitCluster, RabbitNode};
use crate::common::story::{self, Event};
use crate::common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use provisioner::config::ConnectionUrl;
use provisioner::provision::{Incoming, Provisioner};
use tokio::sync::watch;

const T0: i64 = 1_765_000_000_000;
/// Organizations in the stream.
const ORGS: usize = 300;
/// Concurrent senders, and the pause each takes between two events (the stream's
/// pace: about 50 events a second).
const SENDERS: usize = 8;
const PACE: Duration = Duration::from_millis(150);

/// A node that cannot start fails the test with the reason, unless
/// `PROVISIONER_SKIP_CLUSTER=1` asks for a skip.
#[test]
fn a_cluster_that_cannot_start_fails_the_test_unless_skipping_is_asked_for() {
    let why = || Err::<(), _>(rabbit::RabbitError("rabbitmq-server: not found".into()));
    let failed = std::panic::catch_unwind(|| rabbit::or_skip_if(why(), false)).unwrap_err();
    let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("rabbitmq-server: not found"), "{message}");
    assert!(message.contains(rabbit::SKIP_ENV), "{message}");
    assert_eq!(rabbit::or_skip_if(why(), true), None);
    assert_eq!(rabbit::or_skip_if(Ok(7), false), Some(7));
}

/// The node helper starts a node on its own port, stops and starts its broker
/// application, kills and restarts it with its data, and removes its directories
/// when dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbit_node_helper_starts_stops_and_cleans_up() {
    let Some(node) = rabbit::or_skip(RabbitNode::start().await) else {
        return;
    };
    let dir = node.dir().to_path_buf();
    assert_ne!(node.port(), 5672);
    assert_ne!(node.name(), "rabbit@localhost");
    let conn = lapin::Connection::connect(&node.amqp_url(), Default::default())
        .await
        .expect("the node answers AMQP");
    let _ = conn.close(200, "bye".into()).await;
    node.stop_app().await.unwrap();
    assert!(
        lapin::Connection::connect(&node.amqp_url(), Default::default())
            .await
            .is_err(),
        "stop_app closes the node's listener"
    );
    node.start_app().await.unwrap();
    let conn = lapin::Connection::connect(&node.amqp_url(), Default::default())
        .await
        .expect("the node answers AMQP after start_app");
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("kept".into(), durable, FieldTable::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    node.set_disk_free_limit("1000GB").await.unwrap();
    node.set_disk_free_limit("50MB").await.unwrap();

    // SIGKILL, then a restart on the same name, port and data. The queue's record is
    // in Mnesia's transaction log, which the broker writes lazily: flush it first, or a
    // kill right after the declaration can lose it (seen once under load).
    node.ctl(&["eval", "mnesia:sync_log()."]).await.unwrap();
    node.kill().unwrap();
    assert!(!node.is_running().await, "the killed node is gone");
    node.restart().await.expect("the node restarts");
    let conn = lapin::Connection::connect(&node.amqp_url(), Default::default())
        .await
        .expect("the node answers AMQP after a restart");
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare("kept".into(), passive, FieldTable::default())
        .await
        .expect("its durable queue survived the kill");
    let _ = conn.close(200, "bye".into()).await;
    drop(node);
    assert!(!dir.exists(), "Drop removes the node's directories");
}

/// The history: per organization a creation, memberships (some users shared with
/// the next organization), updates, deletions; interleaved round by round so the
/// stream keeps many organizations in flight. Each event is one webhook.
fn history(run: &str) -> Vec<Incoming> {
    let mut per_org: Vec<Vec<Event>> = Vec::new();
    for k in 0..ORGS {
        let id = format!("org_{run}_{k}");
        let v = |step: i64| T0 + (k as i64) * 100 + step;
        let mut events = Vec::new();
        let org = story::org(&id).version(v(1));
        events.push(org.created(v(1)));
        let alice = story::person(&format!("user_{run}_{k}"), "a");
        // The next organization's first member is this one's second: users shared
        // across organizations.
        let bob = story::person(&format!("user_{run}_{}", (k + 1) % ORGS), "a");
        let m1 = org
            .membership(&format!("orgmem_{run}_{k}_1"), &alice)
            .since(v(2));
        let m2 = org
            .membership(&format!("orgmem_{run}_{k}_2"), &bob)
            .role("org:admin")
            .since(v(3));
        events.push(m1.created(v(2)));
        events.push(m2.created(v(3)));
        if k % 2 == 0 {
            let renamed = story::org(&id).named(&format!("Renamed {k}")).plan("team");
            events.push(renamed.updated(v(4)));
        }
        if k % 3 == 0 {
            events.push(m1.clone().role("org:admin").updated(v(5)));
        }
        if k % 4 == 1 {
            events.push(m2.deleted(v(6)).sent_at(v(6)));
        }
        if k % 5 == 2 {
            events.push(story::user_updated(
                &story::person(&format!("user_{run}_{k}"), "z"),
                v(7),
            ));
        }
        if k % 10 == 7 {
            events.push(org.deleted(v(8)));
        }
        per_org.push(events);
    }
    let rounds = per_org.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::new();
    for r in 0..rounds {
        for events in &per_org {
            if let Some(e) = events.get(r) {
                out.push(e.clone().incoming());
            }
        }
    }
    out
}

/// What the sender saw.
#[derive(Debug, Default)]
struct Tally {
    /// Deliveries sent (first tries and retries).
    sent: AtomicUsize,
    /// Deliveries answered 2xx.
    ok: AtomicUsize,
    /// Retries after a non-2xx or a failed request.
    retried: AtomicUsize,
    /// Webhooks (distinct svix ids) acknowledged with a 2xx.
    acked: AtomicUsize,
}

/// Phases of the fault: the stream holds the last part of its events back until
/// the node is stopped, and the very last part until it is back, so both happen
/// mid-stream whatever the machine's speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    AllUp,
    LeaderStopped,
    LeaderBack,
}

/// Sends one webhook like Svix: the same svix id on every try, freshly signed,
/// alternating between the intakes, retrying non-2xx answers and failed requests
/// with backoff until a 2xx (or a generous deadline, after which it gives up).
async fn deliver(
    client: &reqwest::Client,
    intakes: &[String],
    first: usize,
    svix_id: &str,
    body: &[u8],
    tally: &Tally,
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut backoff = Duration::from_millis(50);
    for attempt in 0.. {
        let base = &intakes[(first + attempt) % intakes.len()];
        let ts = now_secs();
        tally.sent.fetch_add(1, Ordering::Relaxed);
        let res = client
            .post(format!("{base}/webhooks/clerk"))
            .header("content-type", "application/json")
            .header("svix-id", svix_id)
            .header("svix-timestamp", ts.to_string())
            .header("svix-signature", sign(SECRET, svix_id, ts, body))
            .body(body.to_vec())
            .send()
            .await;
        if res.is_ok_and(|r| r.status().is_success()) {
            tally.ok.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tally.retried.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    unreachable!()
}

/// Message count of `queue` on the cluster (through any node that answers).
async fn depth(urls: &str, queue: &str) -> u32 {
    let conn = provisioner::broker::connect(&ConnectionUrl::new(urls), "cluster-test")
        .await
        .expect("a node answers");
    let ch = conn.create_channel().await.unwrap();
    let q = provisioner::broker::inspect(&ch, queue)
        .await
        .expect("the queue exists");
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

/// Two intakes and three workers on a three-node cluster; the node leading
/// `provisioner.events` stops mid-stream (`stop_app`) and comes back later. Every
/// acknowledged webhook is processed exactly once, none is dead-lettered, the state
/// is the in-order application of the history, and every process is still the one
/// started (none needed a restart by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_losing_the_queue_leader_mid_stream() {
    let Some(cluster) = rabbit::or_skip(RabbitCluster::start(3).await) else {
        return;
    };
    let cluster_urls = cluster.amqp_urls();
    let iso = Isolation::new();
    let queue = format!("{}.provisioner.events", iso.prefix);
    let dead_queue = format!("{}.provisioner.dead", iso.prefix);
    let config = common::ops::config_file(&iso, "");
    let env = |urls: &str, extra: &[(&str, String)]| -> Vec<(String, String)> {
        let mut env = vec![
            ("DATABASE_URL".to_owned(), iso.database_url()),
            ("AMQP_URL".to_owned(), urls.to_owned()),
            ("PROVISIONER_ENV".to_owned(), "development".to_owned()),
            (
                "PROVISIONER_CONFIG".to_owned(),
                config.display().to_string(),
            ),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        env
    };

    // The database, its schema and the topology, once, before the fleet starts.
    let out = common::ops::run_binary(
        &config,
        &[
            ("DATABASE_URL", iso.database_url()),
            ("AMQP_URL", cluster_urls.clone()),
        ],
        &["migrate"],
    )
    .await;
    assert!(
        out.status.success(),
        "migrate: {}",
        common::ops::stderr(&out)
    );
    // Three addresses: each queue gets three members, one on every node.
    assert_eq!(cluster.members_of(&queue).await.unwrap().len(), 3);
    // Every process gets the addresses with the work queue's leader first: they all
    // connect to it, so stopping it makes each of them fail over to another node.
    let leader = cluster
        .leader_of(&queue)
        .await
        .expect("the queue has a leader");
    let mut order: Vec<usize> = (0..3).collect();
    order.sort_by_key(|&i| i != leader);
    let urls: String = order
        .iter()
        .map(|&i| cluster.node(i).amqp_url())
        .collect::<Vec<_>>()
        .join(",");

    let ports = [free_port(), free_port()];
    let mut procs = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        procs.push(Process::start(
            &format!("intake{i}"),
            &["serve", "--no-worker"],
            &env(
                &urls,
                &[("PROVISIONER_LISTEN", format!("127.0.0.1:{port}"))],
            ),
        ));
    }
    for i in 0..3 {
        procs.push(Process::start(
            &format!("worker{i}"),
            &["worker"],
            &env(&urls, &[]),
        ));
    }
    let intakes: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for base in &intakes {
        let healthy = eventually(Duration::from_secs(60), || async {
            client
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
                .then_some(())
        })
        .await;
        if healthy.is_none() {
            for p in &procs {
                eprintln!("--- {}:\n{}", p.name, p.log_tail());
            }
            panic!("{base} never became healthy");
        }
    }

    // The history, and its in-order application into a database of its own.
    let run = random_id(6);
    let events = Arc::new(history(&run));
    let n = events.len();
    assert!(n >= 1000, "a stream of {n} events");
    let settings = test_settings(&iso, &TestOptions::default());
    let oracle = TestDatabase::create().await;
    let p = Provisioner::new(settings.provisioning.clone());
    for e in events.iter() {
        p.apply_batch(&oracle.pool, std::slice::from_ref(e))
            .await
            .remove(0)
            .expect("the in-order history applies");
    }
    // Svix sends some messages twice: every 10th again, 40 webhooks later, with
    // its svix id.
    let schedule: Arc<Vec<usize>> = Arc::new(
        (0..n)
            .flat_map(|i| {
                let again = (i >= 40 && (i - 40) % 10 == 0).then(|| i - 40);
                std::iter::once(i).chain(again)
            })
            .collect(),
    );

    // The stream.
    let tally = Arc::new(Tally::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::AllUp);
    let next = Arc::new(AtomicUsize::new(0));
    let acked: Arc<std::sync::Mutex<HashMap<String, bool>>> = Arc::default();
    let total = schedule.len();
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (events, schedule, tally, next, acked, client, intakes) = (
            events.clone(),
            schedule.clone(),
            tally.clone(),
            next.clone(),
            acked.clone(),
            client.clone(),
            intakes.clone(),
        );
        let mut phase = phase_rx.clone();
        senders.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                // The last 40 % wait for the stop, the last 15 % for the return.
                let needed = if k * 100 >= total * 85 {
                    Phase::LeaderBack
                } else if k * 100 >= total * 60 {
                    Phase::LeaderStopped
                } else {
                    Phase::AllUp
                };
                let _ = phase.wait_for(|p| *p >= needed).await;
                let e = &events[schedule[k]];
                let ok = deliver(&client, &intakes, k + s, &e.svix_id, &e.body, &tally).await;
                {
                    let mut acked = acked.lock().unwrap();
                    let before = acked.get(&e.svix_id).copied().unwrap_or(false);
                    acked.insert(e.svix_id.clone(), before || ok);
                    if ok && !before {
                        tally.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(PACE).await;
            }
        }));
    }

    // Mid-stream: once a quarter is acknowledged, stop the queue's leader; once
    // 70 % is, bring it back.
    let wait_acked = |fraction: usize| {
        let tally = tally.clone();
        async move {
            while tally.acked.load(Ordering::Relaxed) * 100 < n * fraction {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_acked(25).await;
    assert_eq!(
        cluster.leader_of(&queue).await.unwrap(),
        leader,
        "the leader every process is connected to"
    );
    cluster
        .stop_app(leader)
        .await
        .expect("stop_app on the leader");
    let acked_at_stop = tally.acked.load(Ordering::Relaxed);
    phase_tx.send(Phase::LeaderStopped).unwrap();
    wait_acked(70).await;
    let new_leader = eventually(Duration::from_secs(30), || async {
        cluster.leader_of(&queue).await.ok()
    })
    .await
    .expect("the queue has a new leader");
    assert_ne!(
        new_leader, leader,
        "another node leads while the old leader is down"
    );
    let acked_while_down = tally.acked.load(Ordering::Relaxed) - acked_at_stop;
    // The workers failed over too: what intake acknowledged so far is processed
    // while the old leader is still down.
    let db = common::worker::direct_pool(&iso).await;
    let caught_up = eventually(Duration::from_secs(90), || async {
        let logged: i64 = sqlx::query_scalar("select count(*) from events")
            .fetch_one(&db)
            .await
            .unwrap();
        (logged as usize >= acked_at_stop + acked_while_down).then_some(())
    })
    .await;
    assert!(
        caught_up.is_some(),
        "the workers process the stream while the old leader is down"
    );
    // And an operator command given the same addresses reaches the cluster.
    let dlq = common::ops::run_binary(
        &config,
        &[
            ("DATABASE_URL", iso.database_url()),
            ("AMQP_URL", urls.clone()),
        ],
        &["dlq", "list"],
    )
    .await;
    assert!(
        dlq.status.success(),
        "dlq list with the first address down: {}",
        common::ops::stderr(&dlq)
    );
    cluster
        .start_app(leader)
        .await
        .expect("start_app on the old leader");
    phase_tx.send(Phase::LeaderBack).unwrap();
    for s in senders {
        s.await.unwrap();
    }
    assert_eq!(
        cluster.running_nodes().await.unwrap().len(),
        3,
        "the node is back in the cluster"
    );

    // Every webhook was acknowledged in the end (the sender gave none up).
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let given_up: Vec<&String> = acked
        .iter()
        .filter(|(_, ok)| !**ok)
        .map(|(id, _)| id)
        .collect();
    assert!(
        given_up.is_empty(),
        "webhooks never acknowledged: {given_up:?}"
    );
    assert_eq!(acked.len(), n);

    // Wait until the workers have taken every acknowledged event up and the work
    // queue is empty.
    let ids: Vec<String> = acked.keys().cloned().collect();
    let logged = eventually(Duration::from_secs(120), || {
        let (db, ids) = (db.clone(), ids.clone());
        async move {
            let count: i64 =
                sqlx::query_scalar("select count(*) from events where svix_id = any($1)")
                    .bind(&ids)
                    .fetch_one(&db)
                    .await
                    .unwrap();
            (count as usize == ids.len()).then_some(())
        }
    })
    .await;
    let drained = eventually(Duration::from_secs(60), || async {
        (depth(&urls, &queue).await == 0).then_some(())
    })
    .await;
    if logged.is_none() || drained.is_none() {
        for p in &procs {
            eprintln!("--- {}:\n{}", p.name, p.log_tail());
        }
    }
    assert!(
        logged.is_some(),
        "every acknowledged event reaches the processing log"
    );
    assert!(drained.is_some(), "the work queue drains");

    // Exactly once, none dead.
    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("select svix_id, status, attempts from events")
            .fetch_all(&db)
            .await
            .unwrap();
    let log: BTreeMap<String, (String, i32)> = rows
        .into_iter()
        .map(|(id, status, attempts)| (id, (status, attempts)))
        .collect();
    let dead: Vec<&String> = log
        .iter()
        .filter(|(_, (s, _))| s == "dead")
        .map(|(id, _)| id)
        .collect();
    let again: Vec<&String> = log
        .iter()
        .filter(|(_, (_, a))| *a != 1)
        .map(|(id, _)| id)
        .collect();
    let dead_letters = depth(&urls, &dead_queue).await;
    assert!(dead.is_empty(), "dead events: {dead:?}");
    assert!(
        again.is_empty(),
        "events taken up more than once: {again:?}"
    );
    assert_eq!(dead_letters, 0, "the dead-letter queue is empty");
    for id in acked.keys() {
        assert!(log.contains_key(id), "{id} is in the processing log");
    }
    assert_eq!(log.len(), n, "one log row per webhook, no other");

    // The state is the in-order application of the history, column by column.
    let got = common::rows::state_rows(&db).await;
    let want = common::rows::state_rows(&oracle.pool).await;
    let differ: Vec<(
        &String,
        Option<&serde_json::Value>,
        Option<&serde_json::Value>,
    )> = want
        .keys()
        .chain(got.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .map(|k| (k, want.get(k), got.get(k)))
        .take(10)
        .collect();
    assert!(
        differ.is_empty(),
        "state differs from the in-order history (key, in order, cluster): {differ:#?}"
    );
    assert!(
        want.len() > 2 * ORGS,
        "the history built a real state ({} rows)",
        want.len()
    );

    // No process needed a restart: every one is the one started.
    for p in &mut procs {
        p.assert_running();
    }
    // `quorum_initial_group_size`: a new queue gets that many members; queues that
    // exist (declared with 3) are re-declared without complaint when it changes.
    let fresh = Isolation::new();
    let fresh_config = common::ops::config_file(&fresh, "");
    for (config, db_url) in [
        (&config, iso.database_url()),
        (&fresh_config, fresh.database_url()),
    ] {
        let out = common::ops::run_binary(
            config,
            &[
                ("DATABASE_URL", db_url),
                ("AMQP_URL", urls.clone()),
                (
                    "PROVISIONER_BROKER_QUORUM_INITIAL_GROUP_SIZE",
                    "2".to_owned(),
                ),
            ],
            &["migrate"],
        )
        .await;
        assert!(
            out.status.success(),
            "migrate with another group size: {}",
            common::ops::stderr(&out)
        );
    }
    let fresh_queue = format!("{}.provisioner.events", fresh.prefix);
    assert_eq!(cluster.members_of(&fresh_queue).await.unwrap().len(), 2);
    assert_eq!(cluster.members_of(&queue).await.unwrap().len(), 3);
    let _ = std::fs::remove_file(&fresh_config);

    let superseded = log.values().filter(|(s, _)| s == "superseded").count();
    println!(
        "cluster tally: events {n}, sent {}, 2xx {}, retried by the sender {}, duplicates sent {}, acknowledged while the leader was down {acked_while_down}, processed {}, superseded {superseded}, dead {}, dead letters {dead_letters}, duplicates applied {}",
        tally.sent.load(Ordering::Relaxed),
        tally.ok.load(Ordering::Relaxed),
        tally.retried.load(Ordering::Relaxed),
        total - n,
        log.len(),
        dead.len(),
        again.len(),
    );
    let _ = std::fs::remove_file(&config);
}
