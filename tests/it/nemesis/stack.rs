//! The system the nemesis breaks: a PostgreSQL cluster of its own and the machine's
//! RabbitMQ (its own broker names), each behind a TCP proxy the nemesis can cut or
//! stall, a fake Clerk Backend API, and the real binary as child processes (intake
//! `serve --no-worker` and `worker`), restarted after the nemesis kills them.

use std::net::SocketAddr;
use std::path::PathBuf;

use sqlx::PgPool;

use crate::common::children::{Process, free_port};
use crate::common::pg_cluster::PgCluster;
use crate::common::proxy::Proxy;
use crate::common::rabbit::{self, RabbitCluster};
use crate::common::{Isolation, base_amqp_url, random_id};
use crate::convergence::model::ROLE_MAP;
use provisioner::clerk::fake::FakeClerk;

/// The fake Backend API's key.
pub const CLERK_KEY: &str = "sk_test_nemesis_fake_key_0123456789";

/// One process slot: the process running in it now, and how many times it was
/// started.
pub struct Slot {
    pub process: Process,
    pub starts: usize,
    /// Highest `VmHWM` (kB) seen of any process of the slot.
    pub peak_rss_kb: u64,
}

/// The services, proxies and processes of one nemesis run.
pub struct Stack {
    pub iso: Isolation,
    pub pg: PgCluster,
    pub pg_proxy: Proxy,
    pub amqp_proxy: Proxy,
    /// The database, directly (the checker's view, never through the proxy).
    pub direct_url: String,
    pub db: PgPool,
    pub fake: FakeClerk,
    /// The broker, through its proxy, as the children see it.
    pub amqp_url: String,
    /// The database, through its proxy, as the children see it.
    pub database_url: String,
    config: PathBuf,
    pub intakes: Vec<(u16, Slot)>,
    pub workers: Vec<Slot>,
    /// A three-node RabbitMQ cluster of the run's own, when the run asked for one
    /// (the children then connect to its nodes directly, not through the proxy).
    pub cluster: Option<RabbitCluster>,
}

/// `host:port` of an AMQP URL (`amqp://user:pass@host:port/vhost`).
fn amqp_addr(url: &str) -> (SocketAddr, String) {
    let after_scheme = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let (userinfo, rest) = after_scheme
        .rsplit_once('@')
        .unwrap_or(("guest:guest", after_scheme));
    let (hostport, vhost) = rest.split_once('/').unwrap_or((rest, "%2f"));
    let hostport = hostport.replace("localhost", "127.0.0.1");
    (
        hostport.parse().expect("the broker URL names host:port"),
        format!("{userinfo}@{{}}/{vhost}"),
    )
}

impl Stack {
    /// Starts the services, `intakes` intake processes and `workers` workers; on
    /// a three-node RabbitMQ cluster of its own when `cluster` (`None` when the
    /// machine cannot start one and `PROVISIONER_SKIP_CLUSTER=1` asks for a skip).
    pub async fn start(intakes: usize, workers: usize, cluster: bool) -> Option<Self> {
        let cluster = if cluster {
            Some(rabbit::or_skip(RabbitCluster::start(3).await)?)
        } else {
            None
        };
        let iso = Isolation::new();
        let pg = PgCluster::start();
        let pg_upstream: SocketAddr = pg
            .url()
            .rsplit_once(':')
            .map(|(_, port)| format!("127.0.0.1:{port}"))
            .unwrap()
            .parse()
            .unwrap();
        let pg_proxy = Proxy::start(pg_upstream).await;
        let (amqp_upstream, amqp_template) = amqp_addr(&base_amqp_url());
        let amqp_proxy = Proxy::start(amqp_upstream).await;
        let direct_url = format!("{}/{}", pg.url(), iso.database);
        let settings = provisioner::config::DatabaseSettings {
            url: provisioner::config::ConnectionUrl::new(direct_url.clone()),
            max_connections: 4,
            acquire_timeout_ms: 30_000,
            lock_timeout_ms: 0,
            statement_timeout_ms: 0,
            idle_in_transaction_session_timeout_ms: 0,
        };
        let db = provisioner::db::prepare(&settings)
            .await
            .expect("the nemesis database is prepared");
        let config =
            std::env::temp_dir().join(format!("provisioner-nemesis-{}.toml", random_id(8)));
        std::fs::write(
            &config,
            format!(
                "{}\n[worker]\nretry_delays_ms = [200, 400, 1000]\ndb_retry_max_ms = 2000\n\
                 batch_size = 16\n\n[reconcile]\ninterval_s = 4\nrequests_per_second = 50\n\n{ROLE_MAP}",
                iso.broker_toml()
            ),
        )
        .unwrap();
        let fake = FakeClerk::start(CLERK_KEY).await;
        let amqp_url = match &cluster {
            Some(c) => c.amqp_urls(),
            None => format!(
                "amqp://{}",
                amqp_template.replace("{}", &amqp_proxy.addr.to_string())
            ),
        };
        let database_url = format!("postgres://postgres@{}/{}", pg_proxy.addr, iso.database);
        let mut stack = Self {
            iso,
            pg,
            pg_proxy,
            amqp_proxy,
            direct_url,
            db,
            fake,
            amqp_url,
            database_url,
            config,
            intakes: Vec::new(),
            workers: Vec::new(),
            cluster,
        };
        for i in 0..intakes {
            let port = free_port();
            let process = stack.start_intake(i, port).await;
            stack.intakes.push((
                port,
                Slot {
                    process,
                    starts: 1,
                    peak_rss_kb: 0,
                },
            ));
        }
        for i in 0..workers {
            let process = stack.start_worker(i);
            stack.workers.push(Slot {
                process,
                starts: 1,
                peak_rss_kb: 0,
            });
        }
        Some(stack)
    }
}

impl Stack {
    /// The environment of every child: only what it is given.
    fn env(&self, port: u16) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.database_url.clone()),
            ("AMQP_URL".into(), self.amqp_url.clone()),
            ("PROVISIONER_LISTEN".into(), format!("127.0.0.1:{port}")),
            (
                "PROVISIONER_CONFIG".into(),
                self.config.display().to_string(),
            ),
            ("PROVISIONER_ENV".into(), "development".into()),
            ("CLERK_SECRET_KEY".into(), CLERK_KEY.into()),
            ("CLERK_API_URL".into(), self.fake.url.clone()),
            ("RUST_LOG".into(), "info".into()),
        ]
    }

    /// A broker URL the checker can use directly (a running node of the cluster, or
    /// the machine's broker).
    pub async fn broker_url(&self) -> String {
        let Some(cluster) = &self.cluster else {
            return base_amqp_url();
        };
        for node in cluster.nodes() {
            let url = node.amqp_url();
            if let Ok(conn) =
                lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
            {
                let _ = conn.close(200, "bye".into()).await;
                return url;
            }
        }
        cluster.node(0).amqp_url()
    }

    /// `http://127.0.0.1:PORT` of intake `i`.
    pub fn base(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.intakes[i].0)
    }

    /// Starts intake `i` on `port` and waits until it is healthy.
    pub async fn start_intake(&self, i: usize, port: u16) -> Process {
        let mut p = Process::start(
            &format!("intake {i}"),
            &["serve", "--no-worker"],
            &self.env(port),
        );
        p.wait_healthy(&format!("http://127.0.0.1:{port}")).await;
        p
    }

    /// Starts worker `i`.
    pub fn start_worker(&self, i: usize) -> Process {
        // A worker has no listener; the port is never bound.
        Process::start(&format!("worker {i}"), &["worker"], &self.env(free_port()))
    }

    /// Replaces intake `i` (after it exited) with a new process on its port.
    pub async fn restart_intake(&mut self, i: usize) {
        let port = self.intakes[i].0;
        let process = self.start_intake(i, port).await;
        let slot = &mut self.intakes[i].1;
        slot.process = process;
        slot.starts += 1;
    }

    /// Replaces worker `i` (after it exited) with a new process.
    pub fn restart_worker(&mut self, i: usize) {
        let process = self.start_worker(i);
        let slot = &mut self.workers[i];
        slot.process = process;
        slot.starts += 1;
    }

    /// Runs `provisioner ARGS` to its end (60 s at most): exit status and log.
    pub async fn cli(&self, args: &[&str]) -> (std::process::ExitStatus, String) {
        let mut p = Process::start(&args.join(" "), args, &self.env(free_port()));
        let status = p.wait_exit(std::time::Duration::from_secs(60)).await;
        (status, p.log())
    }

    /// Every slot, intakes first.
    pub fn slots_mut(&mut self) -> impl Iterator<Item = &mut Slot> {
        self.intakes
            .iter_mut()
            .map(|(_, s)| s)
            .chain(self.workers.iter_mut())
    }

    /// Reads every process's peak resident set (`VmHWM`) into its slot.
    pub fn sample_rss(&mut self) {
        for slot in self.slots_mut() {
            let kb = peak_rss_kb(slot.process.pid()).unwrap_or(0);
            slot.peak_rss_kb = slot.peak_rss_kb.max(kb);
        }
    }

    /// The highest peak resident set of any process so far (kB).
    pub fn peak_rss_kb(&mut self) -> u64 {
        self.sample_rss();
        self.slots_mut().map(|s| s.peak_rss_kb).max().unwrap_or(0)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

/// `VmHWM` of a process, in kB.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
