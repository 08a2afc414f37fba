//! The nemesis's faults: a schedule drawn from the seed (when, what, for how long),
//! injected one after another while the webhooks flow, each healed before the next.
//!
//! What each does: docs/reliability.md.

use std::collections::BTreeMap;
use std::fmt;
use std::process::Command;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::nemesis::stack::Stack;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// SIGKILL a worker; a new one is started after the pause.
    KillWorker,
    /// SIGTERM a worker (it drains and exits 0); a new one is started.
    TermWorker,
    /// SIGSTOP a worker, SIGCONT after the pause.
    PauseWorker,
    /// SIGKILL an intake; a new one on its port after the pause.
    KillIntake,
    /// SIGTERM an intake (exits 0); a new one on its port.
    TermIntake,
    /// SIGSTOP an intake, SIGCONT after the pause.
    PauseIntake,
    /// Every connection to the broker cut, new ones refused, for the pause.
    CutBroker,
    /// Connections to the broker kept open but silent (a black hole).
    StallBroker,
    /// Every connection to PostgreSQL cut, new ones refused.
    CutPostgres,
    /// Connections to PostgreSQL kept open but silent.
    StallPostgres,
    /// PostgreSQL stopped with `-m immediate` (a crash), started after the pause.
    CrashPostgres,
    /// PostgreSQL read-only (`default_transaction_read_only`) for the pause.
    ReadOnlyPostgres,
    /// A broker node stopped cleanly, started after the pause (cluster runs).
    StopNode,
    /// A broker node's VM SIGKILLed, restarted after the pause (cluster runs).
    KillNode,
    /// A broker node's VM SIGSTOPped, SIGCONT after the pause (cluster runs).
    PauseNode,
    /// The node leading the work queue stopped, started after the pause.
    StopLeader,
    /// Clerk's Backend API answers 429 with `Retry-After: 1` for a while.
    ClerkRateLimited,
    /// Clerk's Backend API answers 500 for a while.
    ClerkErrors,
    /// Clerk's Backend API answers after 1 to 3 s.
    ClerkSlow,
    /// Clerk's organization list misses an organization (as a list that shifts
    /// while it is paged by offset does), while a GET by id still finds it.
    ClerkShiftingList,
}

impl Kind {
    /// The faults of a run on the machine's broker (behind the proxy).
    const SINGLE: [Kind; 16] = [
        Kind::KillWorker,
        Kind::TermWorker,
        Kind::PauseWorker,
        Kind::KillIntake,
        Kind::TermIntake,
        Kind::PauseIntake,
        Kind::CutBroker,
        Kind::StallBroker,
        Kind::CutPostgres,
        Kind::StallPostgres,
        Kind::CrashPostgres,
        Kind::ReadOnlyPostgres,
        Kind::ClerkRateLimited,
        Kind::ClerkErrors,
        Kind::ClerkSlow,
        Kind::ClerkShiftingList,
    ];

    /// The faults of a cluster run: the broker's are the nodes'.
    const CLUSTER: [Kind; 16] = [
        Kind::KillWorker,
        Kind::TermWorker,
        Kind::PauseWorker,
        Kind::KillIntake,
        Kind::PauseIntake,
        Kind::CutPostgres,
        Kind::CrashPostgres,
        Kind::ReadOnlyPostgres,
        Kind::StopNode,
        Kind::KillNode,
        Kind::PauseNode,
        Kind::StopLeader,
        Kind::ClerkRateLimited,
        Kind::ClerkErrors,
        Kind::ClerkSlow,
        Kind::ClerkShiftingList,
    ];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillWorker => "kill_worker",
            Kind::TermWorker => "term_worker",
            Kind::PauseWorker => "pause_worker",
            Kind::KillIntake => "kill_intake",
            Kind::TermIntake => "term_intake",
            Kind::PauseIntake => "pause_intake",
            Kind::CutBroker => "cut_broker",
            Kind::StallBroker => "stall_broker",
            Kind::CutPostgres => "cut_postgres",
            Kind::StallPostgres => "stall_postgres",
            Kind::CrashPostgres => "crash_postgres",
            Kind::ReadOnlyPostgres => "read_only_postgres",
            Kind::StopNode => "stop_node",
            Kind::KillNode => "kill_node",
            Kind::PauseNode => "pause_node",
            Kind::StopLeader => "stop_leader",
            Kind::ClerkRateLimited => "clerk_429",
            Kind::ClerkErrors => "clerk_500",
            Kind::ClerkSlow => "clerk_slow",
            Kind::ClerkShiftingList => "clerk_shifting_list",
        }
    }
}

/// One scheduled fault: `at` after the round's stream starts, on process `target`
/// (for process faults), lasting `hold`.
#[derive(Debug, Clone)]
pub struct Fault {
    pub at: Duration,
    pub kind: Kind,
    pub target: usize,
    pub hold: Duration,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{:.1}s {}[{}] for {:.1}s",
            self.at.as_secs_f64(),
            self.kind.name(),
            self.target,
            self.hold.as_secs_f64()
        )
    }
}

/// A schedule of faults for a stream of about `stream`: one every few seconds,
/// from the seed.
pub fn schedule(
    seed: u64,
    round: u64,
    stream: Duration,
    processes: usize,
    cluster: bool,
) -> Vec<Fault> {
    let kinds: &[Kind] = if cluster {
        &Kind::CLUSTER
    } else {
        &Kind::SINGLE
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7300 ^ round);
    let mut out = Vec::new();
    let mut at = Duration::from_millis(rng.random_range(500..2000));
    while at < stream {
        let kind = kinds[rng.random_range(0..kinds.len())];
        let hold = Duration::from_millis(match kind {
            Kind::PauseIntake | Kind::StallBroker | Kind::StallPostgres => {
                rng.random_range(500..4000)
            }
            _ => rng.random_range(300..5000),
        });
        out.push(Fault {
            at,
            kind,
            target: rng.random_range(0..processes.max(3)),
            hold,
        });
        at += hold + Duration::from_millis(rng.random_range(1000..4000));
    }
    // A cluster run always loses the work queue's leader once.
    let node = |k: Kind| {
        matches!(
            k,
            Kind::StopNode | Kind::KillNode | Kind::PauseNode | Kind::StopLeader
        )
    };
    if cluster && !out.iter().any(|f| node(f.kind)) && !out.is_empty() {
        let middle = out.len() / 2;
        out[middle].kind = Kind::StopLeader;
    }
    out
}

/// Faults injected so far, by kind.
pub type Tally = BTreeMap<&'static str, usize>;

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "SIG{sig} sent to {pid}");
}

/// Injects `schedule` (times from `start`), healing each fault before the next.
pub async fn run(
    stack: &mut Stack,
    schedule: &[Fault],
    start: tokio::time::Instant,
    tally: &mut Tally,
) {
    for fault in schedule {
        tokio::time::sleep_until(start + fault.at).await;
        inject(stack, fault).await;
        *tally.entry(fault.kind.name()).or_default() += 1;
    }
}

/// One fault, held and healed.
async fn inject(stack: &mut Stack, fault: &Fault) {
    let hold = fault.hold;
    let w = fault.target % stack.workers.len().max(1);
    let i = fault.target % stack.intakes.len().max(1);
    stack.sample_rss();
    match fault.kind {
        Kind::KillWorker => {
            stack.workers[w].process.sigkill();
            tokio::time::sleep(hold).await;
            stack.restart_worker(w);
        }
        Kind::TermWorker => {
            let slot = &mut stack.workers[w];
            slot.process.sigterm();
            let status = slot.process.wait_exit(Duration::from_secs(30)).await;
            assert!(
                status.success(),
                "worker {w} exits 0 after SIGTERM ({status}): {}",
                slot.process.log_tail()
            );
            tokio::time::sleep(hold).await;
            stack.restart_worker(w);
        }
        Kind::PauseWorker => {
            let pid = stack.workers[w].process.pid();
            signal(pid, "STOP");
            tokio::time::sleep(hold).await;
            signal(pid, "CONT");
        }
        Kind::KillIntake => {
            stack.intakes[i].1.process.sigkill();
            tokio::time::sleep(hold).await;
            stack.restart_intake(i).await;
        }
        Kind::TermIntake => {
            let slot = &mut stack.intakes[i].1;
            slot.process.sigterm();
            let status = slot.process.wait_exit(Duration::from_secs(30)).await;
            assert!(
                status.success(),
                "intake {i} exits 0 after SIGTERM ({status}): {}",
                slot.process.log_tail()
            );
            tokio::time::sleep(hold).await;
            stack.restart_intake(i).await;
        }
        Kind::PauseIntake => {
            let pid = stack.intakes[i].1.process.pid();
            signal(pid, "STOP");
            tokio::time::sleep(hold).await;
            signal(pid, "CONT");
        }
        Kind::CutBroker => {
            stack.amqp_proxy.cut().await;
            tokio::time::sleep(hold).await;
            stack.amqp_proxy.restore();
        }
        Kind::StallBroker => {
            stack.amqp_proxy.stall();
            tokio::time::sleep(hold).await;
            stack.amqp_proxy.unstall();
        }
        Kind::CutPostgres => {
            stack.pg_proxy.cut().await;
            tokio::time::sleep(hold).await;
            stack.pg_proxy.restore();
        }
        Kind::StallPostgres => {
            stack.pg_proxy.stall();
            tokio::time::sleep(hold).await;
            stack.pg_proxy.unstall();
        }
        Kind::CrashPostgres => {
            stack.pg.crash();
            tokio::time::sleep(hold).await;
            stack.pg.start_server();
        }
        Kind::ReadOnlyPostgres => {
            read_only(stack, true).await;
            tokio::time::sleep(hold).await;
            read_only(stack, false).await;
        }
        Kind::StopNode | Kind::KillNode | Kind::PauseNode | Kind::StopLeader => {
            node_fault(stack, fault).await;
        }
        Kind::ClerkRateLimited | Kind::ClerkErrors => {
            let (status, retry_after) = if fault.kind == Kind::ClerkRateLimited {
                (429, Some(1))
            } else {
                (500, None)
            };
            stack
                .fake
                .fail_next((0..1000).map(|_| provisioner::clerk::fake::Scripted {
                    status,
                    retry_after,
                }));
            tokio::time::sleep(hold).await;
            stack.fake.clear_faults();
        }
        Kind::ClerkSlow => {
            stack.fake.set_latency(Duration::from_millis(
                1000 + 500 * (fault.target as u64 % 5),
            ));
            tokio::time::sleep(hold).await;
            stack.fake.clear_faults();
        }
        Kind::ClerkShiftingList => {
            // Every organization of the run so far may be missed by the list.
            let like = format!("n%org_{}", fault.target % crate::nemesis::generator::ORGS);
            let ids: Vec<String> = sqlx::query_scalar("select id from workspaces where id like $1")
                .bind(&like)
                .fetch_all(&stack.db)
                .await
                .unwrap_or_default();
            for id in &ids {
                stack.fake.hide_from_list(id);
            }
            tokio::time::sleep(hold).await;
            stack.fake.clear_faults();
        }
    }
}

/// Turns the server's `default_transaction_read_only` on or off and reloads: every
/// session's next transaction is read-only (or writable again).
async fn read_only(stack: &Stack, on: bool) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&stack.direct_url)
        .await
        .expect("the nemesis reaches its PostgreSQL");
    sqlx::query("set default_transaction_read_only = off")
        .execute(&mut conn)
        .await
        .unwrap();
    let sql = if on {
        "alter system set default_transaction_read_only = on"
    } else {
        "alter system reset default_transaction_read_only"
    };
    sqlx::query(sql).execute(&mut conn).await.unwrap();
    sqlx::query("select pg_reload_conf()")
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
}

/// One broker node down (or paused) for the fault's hold, then back: only one at
/// a time, so a majority of the three is always up when the next one goes.
async fn node_fault(stack: &Stack, fault: &Fault) {
    let cluster = stack
        .cluster
        .as_ref()
        .expect("node faults run on a cluster");
    let n = match fault.kind {
        Kind::StopLeader => {
            let queue = format!("{}.provisioner.events", stack.iso.prefix);
            cluster.leader_of(&queue).await.unwrap_or(0)
        }
        _ => fault.target % cluster.nodes().len(),
    };
    let node = cluster.node(n);
    match fault.kind {
        Kind::PauseNode => {
            let pid = std::fs::read_to_string(node.dir().join("pid")).expect("the node's pid");
            let pid: u32 = pid.trim().parse().expect("a pid");
            signal(pid, "STOP");
            tokio::time::sleep(fault.hold).await;
            signal(pid, "CONT");
        }
        Kind::KillNode => {
            node.kill().expect("the node is killed");
            tokio::time::sleep(fault.hold).await;
            node.restart().await.expect("the node starts again");
        }
        _ => {
            node.stop().await.expect("the node stops");
            tokio::time::sleep(fault.hold).await;
            node.restart().await.expect("the node starts again");
        }
    }
}
