//! RabbitMQ nodes and clusters of a test's own (see the recipe in the project's
//! reference notes): each node gets its own name (random suffix, so parallel tests
//! never clash), its own AMQP port, its own config file and directories under the
//! temp dir. Dropping a node stops it and removes its directories. Nothing here
//! ever touches the machine's shared broker `rabbit@localhost`.
//!
//! A test that needs a node calls [`or_skip`] on the start result: if the node
//! cannot start the test fails with the reason, unless `PROVISIONER_SKIP_CLUSTER=1`
//! is set, in which case it prints the reason and returns.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::process::Command;

/// The env var that turns "cannot start a node" from a failure into a skip.
pub const SKIP_ENV: &str = "PROVISIONER_SKIP_CLUSTER";

/// How long a node may take to register with epmd and then to boot (generous: a
/// loaded 2-core machine may be booting a cluster and running a fleet beside it).
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
/// How long one CLI command may take.
const CLI_DEADLINE: Duration = Duration::from_secs(60);

/// Why a node or cluster could not be started or driven.
#[derive(Debug)]
pub struct RabbitError(pub String);

impl std::fmt::Display for RabbitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RabbitError {}

fn err(msg: impl Into<String>) -> RabbitError {
    RabbitError(msg.into())
}

/// Unwraps a start result. On error: panics with the reason (the test fails), or,
/// when `PROVISIONER_SKIP_CLUSTER=1`, prints the reason and returns `None` so the
/// test can return early:
///
/// `let Some(cluster) = rabbit::or_skip(RabbitCluster::start(3).await) else { return };`
pub fn or_skip<T>(result: Result<T, RabbitError>) -> Option<T> {
    or_skip_if(result, skip_requested())
}

/// [`or_skip`] with the skip decided by the caller.
pub fn or_skip_if<T>(result: Result<T, RabbitError>, skip: bool) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) if skip => {
            eprintln!(
                "SKIPPED: cannot start a RabbitMQ node of the test's own ({e}); {SKIP_ENV}=1 is set"
            );
            None
        }
        Err(e) => panic!(
            "cannot start a RabbitMQ node of the test's own: {e}\n(set {SKIP_ENV}=1 to skip such tests on a machine that cannot run them)"
        ),
    }
}

/// Whether `PROVISIONER_SKIP_CLUSTER=1` is set.
pub fn skip_requested() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|v| v == "1")
}

/// AMQP ports handed out by this process and not yet released.
static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port `p` with `p` and `p + 20000` (the node's default distribution port) free.
fn free_port() -> Result<u16, RabbitError> {
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port: u16 = rng.random_range(21000..40000);
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        let taken = taken.get_or_insert_with(HashSet::new);
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 20000)).is_ok()
        {
            taken.insert(port);
            return Ok(port);
        }
    }
    Err(err("no free port pair for a RabbitMQ node in 21000..40000"))
}

fn release_port(port: u16) {
    if let Some(taken) = TAKEN.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        taken.remove(&port);
    }
}

/// Runs a command with a deadline; Ok(stdout) on exit status 0.
async fn run(program: &str, args: &[&str], deadline: Duration) -> Result<String, RabbitError> {
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true);
    let out = match tokio::time::timeout(deadline, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(err(format!("cannot run `{program}`: {e}"))),
        Err(_) => {
            return Err(err(format!(
                "`{program} {}` did not finish within {} s",
                args.join(" "),
                deadline.as_secs()
            )));
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(err(format!(
            "`{program} {}` failed ({}): {} {}",
            args.join(" "),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// One RabbitMQ node of the test's own.
#[derive(Debug)]
pub struct RabbitNode {
    /// Full node name, `short@localhost`.
    name: String,
    short: String,
    port: u16,
    dir: PathBuf,
}

impl RabbitNode {
    /// Starts a node with a random name on a free port and waits until it has booted.
    pub async fn start() -> Result<Self, RabbitError> {
        Self::start_named(&format!("pv{}", super::random_id(8))).await
    }

    /// Starts a node called `short@localhost` (make `short` unique).
    pub async fn start_named(short: &str) -> Result<Self, RabbitError> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("provisioner-rabbit-{short}"));
        let node = Self {
            name: format!("{short}@localhost"),
            short: short.to_owned(),
            port,
            dir,
        };
        // From here on Drop cleans up whatever part of the start happened.
        node.prepare_dirs()?;
        node.launch().await?;
        Ok(node)
    }

    fn prepare_dirs(&self) -> Result<(), RabbitError> {
        let d = &self.dir;
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(d.join(sub))
                .map_err(|e| err(format!("cannot create {}: {e}", d.join(sub).display())))?;
        }
        std::fs::write(
            d.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{}\n", self.port),
        )
        .map_err(|e| err(format!("cannot write the node's config: {e}")))?;
        // No management plugin: it would want port 15672.
        std::fs::write(d.join("enabled_plugins"), "[].\n")
            .map_err(|e| err(format!("cannot write enabled_plugins: {e}")))?;
        let status = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(d)
            .status()
            .map_err(|e| err(format!("cannot run chown: {e}")))?;
        if !status.success() {
            return Err(err(format!(
                "chown -R rabbitmq:rabbitmq {} failed ({status}); the node's directories must belong to the rabbitmq user (run the tests as root)",
                d.display()
            )));
        }
        Ok(())
    }

    /// `rabbitmq-server -detached` with this node's environment, then waits for boot.
    async fn launch(&self) -> Result<(), RabbitError> {
        let d = &self.dir;
        let path = |p: &str| d.join(p).display().to_string();
        let mut cmd = Command::new("rabbitmq-server");
        cmd.arg("-detached")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", (self.port + 20000).to_string())
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", path("pid"))
            .kill_on_drop(true);
        let out = tokio::time::timeout(CLI_DEADLINE, cmd.output())
            .await
            .map_err(|_| err("rabbitmq-server -detached did not return"))?
            .map_err(|e| err(format!("cannot run rabbitmq-server: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "rabbitmq-server -detached for {} failed ({}): {} {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        self.await_boot().await
    }

    /// Polls epmd until the node registered (`await_startup` fails at once before
    /// that), then `rabbitmqctl await_startup`.
    async fn await_boot(&self) -> Result<(), RabbitError> {
        let deadline = Instant::now() + BOOT_DEADLINE;
        let needle = format!("name {} at port", self.short);
        loop {
            if let Ok(names) = run("epmd", &["-names"], CLI_DEADLINE).await
                && names.contains(&needle)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "node {} did not register with epmd within {} s; log tail: {}",
                    self.name,
                    BOOT_DEADLINE.as_secs(),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let timeout = BOOT_DEADLINE.as_secs().to_string();
        run(
            "rabbitmqctl",
            &["-n", &self.name, "await_startup", "--timeout", &timeout],
            BOOT_DEADLINE + Duration::from_secs(10),
        )
        .await
        .map(|_| ())
        .map_err(|e| err(format!("{e}; log tail: {}", self.log_tail())))
    }

    /// The last lines of the node's log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.name));
        match std::fs::read_to_string(&log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(8)..].join(" | ")
            }
            Err(e) => format!("(no log at {}: {e})", log.display()),
        }
    }

    /// Full node name, `short@localhost`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's data and log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl -n NODE args...`; stdout on success.
    pub async fn ctl(&self, args: &[&str]) -> Result<String, RabbitError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("rabbitmqctl", &all, CLI_DEADLINE).await
    }

    /// `rabbitmq-queues -n NODE args...`; stdout on success.
    pub async fn queues_cli(&self, args: &[&str]) -> Result<String, RabbitError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("rabbitmq-queues", &all, CLI_DEADLINE).await
    }

    /// Stops the broker application (its AMQP listener closes, the Erlang node
    /// stays up).
    pub async fn stop_app(&self) -> Result<(), RabbitError> {
        self.ctl(&["stop_app"]).await.map(|_| ())
    }

    /// Starts the broker application again and waits until it has booted.
    pub async fn start_app(&self) -> Result<(), RabbitError> {
        self.ctl(&["start_app"]).await?;
        let timeout = BOOT_DEADLINE.as_secs().to_string();
        self.ctl(&["await_startup", "--timeout", &timeout])
            .await
            .map(|_| ())
    }

    /// Ends the node cleanly (waits for its process to exit); its data stays, so
    /// [`RabbitNode::restart`] brings it back with its queues.
    pub async fn stop(&self) -> Result<(), RabbitError> {
        let pid = self.dir.join("pid").display().to_string();
        self.ctl(&["stop", &pid]).await.map(|_| ())
    }

    /// SIGKILLs the node's Erlang VM (no clean shutdown).
    pub fn kill(&self) -> Result<(), RabbitError> {
        let pid = std::fs::read_to_string(self.dir.join("pid"))
            .map_err(|e| err(format!("no pid file for {}: {e}", self.name)))?;
        let pid = pid.trim();
        let status = std::process::Command::new("kill")
            .args(["-KILL", pid])
            .status()
            .map_err(|e| err(format!("cannot run kill: {e}")))?;
        if !status.success() {
            return Err(err(format!("kill -KILL {pid} failed ({status})")));
        }
        // Wait until the VM is gone, so a restart does not race its shutdown.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts the (stopped or killed) node again with the same name, port and data.
    pub async fn restart(&self) -> Result<(), RabbitError> {
        // A stop or kill may still be unregistering; wait until epmd forgets it.
        let needle = format!("name {} at port", self.short);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match run("epmd", &["-names"], CLI_DEADLINE).await {
                Ok(names) if names.contains(&needle) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => break,
            }
        }
        let _ = std::fs::remove_file(self.dir.join("pid"));
        self.launch().await
    }

    /// Sets the free-disk alarm threshold (`rabbitmqctl set_disk_free_limit`), e.g.
    /// `"1000GB"` to raise the alarm at once or `"50MB"` to clear it. Not persisted
    /// across a node restart.
    pub async fn set_disk_free_limit(&self, limit: &str) -> Result<(), RabbitError> {
        self.ctl(&["set_disk_free_limit", limit]).await.map(|_| ())
    }

    /// Whether the node's Erlang VM answers (`rabbitmqctl ping`; true also while
    /// the broker application is stopped).
    pub async fn is_running(&self) -> bool {
        self.ctl(&["ping"]).await.is_ok()
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        // Never the shared broker: only nodes this helper named.
        assert_ne!(self.short, "rabbit", "refusing to stop rabbit@localhost");
        let pid_file = self.dir.join("pid");
        let stopped = std::process::Command::new("timeout")
            .args(["30", "rabbitmqctl", "-n", &self.name, "stop"])
            .arg(&pid_file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        release_port(self.port);
    }
}

/// A cluster of nodes of the test's own, joined with `rabbitmqctl join_cluster`.
#[derive(Debug)]
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
}

impl RabbitCluster {
    /// Starts `n` nodes (in parallel), joins nodes 2..n to node 1 and checks that
    /// `cluster_status` lists all `n` running.
    pub async fn start(n: usize) -> Result<Self, RabbitError> {
        assert!(n >= 1);
        let suffix = super::random_id(6);
        let names: Vec<String> = (1..=n).map(|i| format!("pv{suffix}n{i}")).collect();
        let started =
            futures_util::future::join_all(names.iter().map(|name| RabbitNode::start_named(name)))
                .await;
        // Collect the ones that started, so Drop stops them whatever failed.
        let mut nodes = Vec::new();
        let mut errors = Vec::new();
        for result in started {
            match result {
                Ok(node) => nodes.push(node),
                Err(e) => errors.push(e.0),
            }
        }
        if !errors.is_empty() {
            return Err(err(errors.join("; ")));
        }
        let cluster = Self { nodes };
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            node.ctl(&["stop_app"]).await?;
            node.ctl(&["join_cluster", &first]).await?;
            node.start_app().await?;
        }
        let running = cluster.running_nodes().await?;
        for node in &cluster.nodes {
            if !running.iter().any(|r| r == &node.name) {
                return Err(err(format!(
                    "cluster_status does not list {} as running (running: {running:?})",
                    node.name
                )));
            }
        }
        Ok(cluster)
    }

    /// Node `i` (0-based).
    pub fn node(&self, i: usize) -> &RabbitNode {
        &self.nodes[i]
    }

    /// The nodes, in start order.
    pub fn nodes(&self) -> &[RabbitNode] {
        &self.nodes
    }

    /// Every node's AMQP URL, comma-joined (the form `AMQP_URL` accepts).
    pub fn amqp_urls(&self) -> String {
        self.nodes
            .iter()
            .map(RabbitNode::amqp_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A node whose broker application answers (to run CLI queries on).
    async fn any_running(&self) -> Result<&RabbitNode, RabbitError> {
        for node in &self.nodes {
            if node.is_running().await
                && node.ctl(&["await_startup", "--timeout", "1"]).await.is_ok()
            {
                return Ok(node);
            }
        }
        Err(err("no node of the cluster is running"))
    }

    /// The running nodes as `cluster_status` lists them.
    pub async fn running_nodes(&self) -> Result<Vec<String>, RabbitError> {
        let node = self.any_running().await?;
        let out = node.ctl(&["cluster_status", "--formatter", "json"]).await?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| err(format!("cluster_status is not JSON ({e}): {out}")))?;
        Ok(json["running_nodes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Index of the node that leads quorum queue `queue` in vhost `/`.
    pub async fn leader_of(&self, queue: &str) -> Result<usize, RabbitError> {
        self.leader_of_in(queue, "/").await
    }

    /// Index of the node that leads quorum queue `queue` in `vhost`.
    pub async fn leader_of_in(&self, queue: &str, vhost: &str) -> Result<usize, RabbitError> {
        let node = self.any_running().await?;
        let out = node
            .queues_cli(&[
                "quorum_status",
                queue,
                "--vhost",
                vhost,
                "--formatter",
                "json",
            ])
            .await?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| err(format!("quorum_status is not JSON ({e}): {out}")))?;
        let leader = json
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["Raft State"] == "leader")
            .and_then(|m| m["Node Name"].as_str())
            .ok_or_else(|| err(format!("quorum_status of {queue} names no leader: {out}")))?;
        self.nodes
            .iter()
            .position(|n| n.name == leader)
            .ok_or_else(|| {
                err(format!(
                    "leader {leader} of {queue} is not a node of this cluster"
                ))
            })
    }

    /// The members of quorum queue `queue` in vhost `/` (node names).
    pub async fn members_of(&self, queue: &str) -> Result<Vec<String>, RabbitError> {
        let node = self.any_running().await?;
        let out = node
            .queues_cli(&["quorum_status", queue, "--formatter", "json"])
            .await?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| err(format!("quorum_status is not JSON ({e}): {out}")))?;
        Ok(json
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["Node Name"].as_str().map(str::to_owned))
            .collect())
    }

    /// `stop_app` on node `i`.
    pub async fn stop_app(&self, i: usize) -> Result<(), RabbitError> {
        self.nodes[i].stop_app().await
    }

    /// `start_app` on node `i`, waiting until it has booted.
    pub async fn start_app(&self, i: usize) -> Result<(), RabbitError> {
        self.nodes[i].start_app().await
    }
}
