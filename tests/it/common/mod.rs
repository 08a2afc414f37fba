//! Test harness shared by every integration test module.
//!
//! Each `spawn_app` gets its own PostgreSQL database and its own broker names
//! (random prefix, queues expiring after the test), so tests run in parallel
//! against the machine's real services and leave nothing behind: the database
//! goes with the test's last [`Isolation`], the broker names when its thread ends.

pub mod api_support;
pub mod children;
pub mod database;
pub mod history;
pub mod ops;
pub mod pg_cluster;
pub mod proxy;
pub mod rabbit;
pub mod rows;
pub mod story;
pub mod svix_sender;
pub mod worker;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeleteOptions};
use provisioner::config::Settings;
use provisioner::startup::{Application, ServeOptions};
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::oneshot;

/// Base URLs of the machine's services; override with TEST_DATABASE_URL / TEST_AMQP_URL.
pub fn base_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// Base AMQP URL of the machine's broker.
pub fn base_amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The development webhook secret the test apps verify with.
pub const SECRET: &str = provisioner::config::DEVELOPMENT_WEBHOOK_SECRET;
/// The development API token.
pub const TOKEN: &str = provisioner::config::DEVELOPMENT_API_TOKEN;

/// A random lowercase id.
pub fn random_id(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// How to start a test application.
#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    /// Run the worker in the same process.
    pub worker: bool,
    /// Extra TOML merged over the test config.
    pub extra_config: String,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Use this AMQP URL instead of the machine's (e.g. a proxy in front of it).
    pub amqp_url: Option<String>,
    /// Use this database URL (e.g. through a proxy); the database is still created.
    pub database_url: Option<String>,
}

impl TestOptions {
    /// An application that reads Clerk's Backend API from `fake` (its URL and key),
    /// unpaced (`[reconcile] requests_per_second = 0`).
    pub fn with_clerk(fake: &provisioner::clerk::fake::FakeClerk) -> Self {
        Self {
            env: vec![
                ("CLERK_SECRET_KEY".to_owned(), fake.key.clone()),
                ("CLERK_API_URL".to_owned(), fake.url.clone()),
            ],
            extra_config: "[reconcile]\nrequests_per_second = 0\n".to_owned(),
            ..Self::default()
        }
    }
}

/// Isolated names for one test: database and broker prefix. The database (when
/// anything created it) is dropped when the last clone of its `Isolation` is
/// dropped, also when the test panics.
#[derive(Debug, Clone)]
pub struct Isolation {
    /// Database name.
    pub database: String,
    /// Broker name prefix.
    pub prefix: String,
    _drop: std::sync::Arc<DropDatabase>,
}

/// Drops the database it names when dropped.
#[derive(Debug)]
struct DropDatabase(String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        database::drop_database_now(&self.0);
    }
}

/// The longest one test may run. A test still running after it aborts its test
/// binary with its name, so a hang fails the suite in minutes instead of holding CI
/// until its own deadline.
pub const TEST_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// One test's watchdog and broker clean-up, tied to the test's thread (libtest runs
/// each test on a thread of its own; with `--test-threads=1` tests run on the main
/// thread and neither applies).
///
/// A monitor thread aborts the process if the test outlives [`TEST_DEADLINE`].
/// When the test's thread ends (the test returned or panicked), it deletes the
/// queues and exchanges of every [`Isolation`] the test made: each quorum queue
/// costs the broker file handles, and RabbitMQ stops answering new connections
/// once they run out, so a suite that leaves hundreds of queues to expire on their
/// own starves itself and the next run.
#[derive(Debug)]
struct TestScope {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    prefixes: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

thread_local! {
    static SCOPE: Option<TestScope> = TestScope::start();
}

impl TestScope {
    fn start() -> Option<Self> {
        use std::sync::atomic::Ordering;
        let name = std::thread::current().name()?.to_owned();
        if name == "main" {
            return None;
        }
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let prefixes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let (flag, names) = (done.clone(), prefixes.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + TEST_DEADLINE;
            while !flag.load(Ordering::Acquire) {
                if std::time::Instant::now() > deadline {
                    eprintln!(
                        "{name} still running after {} s: aborting the test binary",
                        TEST_DEADLINE.as_secs()
                    );
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let names = std::mem::take(&mut *names.lock().unwrap());
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                for prefix in names {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        delete_broker_objects(&prefix),
                    )
                    .await;
                }
            });
        });
        Some(Self { done, prefixes })
    }

    /// Registers `prefix` for clean-up at the end of the current test.
    fn register(prefix: &str) {
        SCOPE.with(|scope| {
            if let Some(scope) = scope {
                scope.prefixes.lock().unwrap().push(prefix.to_owned());
            }
        });
    }
}

impl Drop for TestScope {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Deletes what tests declare under `prefix` (missing ones are no-ops). Queues
/// that outlive a killed run still expire by `queue_expires_ms`.
async fn delete_broker_objects(prefix: &str) {
    use lapin::options::ExchangeDeleteOptions;
    let Ok(conn) =
        lapin::Connection::connect(&base_amqp_url(), lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    let mut queues = vec![
        format!("{prefix}.provisioner.events"),
        format!("{prefix}.provisioner.dead"),
        format!("{prefix}.provisioner.dead.lock"),
        format!("{prefix}.mixed.routed"),
    ];
    for ms in [200, 400, 1000, 10000, 60000] {
        queues.push(format!("{prefix}.provisioner.retry.{ms}ms"));
    }
    for queue in &queues {
        // One channel per delete: an error closes the channel.
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "bye".into()).await;
        }
    }
    for exchange in [
        format!("{prefix}.clerk.webhooks"),
        format!("{prefix}.provisioner.dlx"),
    ] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = ch.close(200, "bye".into()).await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

impl Isolation {
    /// Fresh names.
    pub fn new() -> Self {
        let id = random_id(10);
        TestScope::register(&format!("t{id}"));
        let database = format!("prov_test_{}_{}", now_secs(), id);
        Self {
            _drop: std::sync::Arc::new(DropDatabase(database.clone())),
            database,
            prefix: format!("t{id}"),
        }
    }

    /// Database URL of this test's database.
    pub fn database_url(&self) -> String {
        format!("{}/{}", base_database_url(), self.database)
    }

    /// The TOML that gives this test its own broker names.
    pub fn broker_toml(&self) -> String {
        let p = &self.prefix;
        format!(
            r#"
[broker]
exchange = "{p}.clerk.webhooks"
queue = "{p}.provisioner.events"
dead_letter_exchange = "{p}.provisioner.dlx"
dead_letter_queue = "{p}.provisioner.dead"
retry_queue_prefix = "{p}.provisioner.retry"
queue_expires_ms = 300000
"#
        )
    }
}

impl Default for Isolation {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds settings for a test: its own database and broker names, port 0.
pub fn test_settings(iso: &Isolation, opts: &TestOptions) -> Settings {
    let file = format!(
        "{}\n[worker]\nretry_delays_ms = [200, 400]\ndb_retry_max_ms = 2000\nbatch_wait_ms = 2\n{}",
        iso.broker_toml(),
        opts.extra_config
    );
    // Later TOML keys would be duplicates; merge [worker] overrides by hand when given.
    let file = merge_toml(&file);
    let mut env: Vec<(String, String)> = vec![
        (
            "DATABASE_URL".into(),
            opts.database_url
                .clone()
                .unwrap_or_else(|| iso.database_url()),
        ),
        (
            "AMQP_URL".into(),
            opts.amqp_url.clone().unwrap_or_else(base_amqp_url),
        ),
        ("PROVISIONER_LISTEN".into(), "127.0.0.1:0".into()),
        ("PROVISIONER_ENV".into(), "development".into()),
    ];
    env.extend(opts.env.iter().cloned());
    // Only these variables: never inherit the developer's real secrets or URLs.
    Settings::from_sources(Some(&file), |name| {
        // Only these variables: never inherit the developer's real secrets or URLs.
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    })
    .expect("test settings are valid")
}

/// Merges TOML text whose tables may repeat (later keys win).
fn merge_toml(text: &str) -> String {
    let mut merged = toml::Table::new();
    let mut current = String::new();
    let mut chunks: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with('[') && !current.trim().is_empty() {
            chunks.push(std::mem::take(&mut current));
        }
        current.push_str(line);
        current.push('\n');
    }
    chunks.push(current);
    for chunk in chunks {
        let t: toml::Table = toml::from_str(&chunk).expect("valid test TOML");
        deep_merge(&mut merged, t);
    }
    toml::to_string(&merged).unwrap()
}

fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A running application under test.
#[derive(Debug)]
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// Bound port.
    pub port: u16,
    /// Its settings.
    pub settings: Settings,
    /// Pool on its database.
    pub db: PgPool,
    /// Isolation names.
    pub iso: Isolation,
    /// HTTP client.
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Starts an app with the default options (no worker).
pub async fn spawn_app() -> TestApp {
    spawn_app_with(TestOptions::default()).await
}

/// Starts an app with the given options.
pub async fn spawn_app_with(opts: TestOptions) -> TestApp {
    spawn_app_isolated(Isolation::new(), opts).await
}

/// Starts an app on existing isolation names (e.g. a second app on the same queues).
pub async fn spawn_app_isolated(iso: Isolation, opts: TestOptions) -> TestApp {
    sweep_old_databases().await;
    let settings = test_settings(&iso, &opts);
    let app = Application::build(
        settings.clone(),
        ServeOptions {
            worker: opts.worker,
        },
    )
    .await
    .expect("application builds");
    let port = app.port();
    let db = app.state().db.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        settings,
        db,
        iso,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        stop: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    /// Stops the app gracefully and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => h.await.expect("app task"),
            None => Ok(()),
        }
    }

    /// Signs `body` as Svix would, with the development secret.
    pub fn sign(&self, svix_id: &str, timestamp: i64, body: &[u8]) -> String {
        sign(SECRET, svix_id, timestamp, body)
    }

    /// POSTs a body to the webhook route with correct Svix headers.
    pub async fn post_signed(&self, svix_id: &str, body: &[u8]) -> reqwest::Response {
        let ts = now_secs();
        let sig = self.sign(svix_id, ts, body);
        self.client
            .post(format!("{}/webhooks/clerk", self.address))
            .header("svix-id", svix_id)
            .header("svix-timestamp", ts.to_string())
            .header("svix-signature", sig)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .expect("request sent")
    }

    /// GET with the development bearer token.
    pub async fn get_api(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{}", self.address, path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request sent")
    }

    /// Messages currently ready in a queue of this test (by full name).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        queue_depth(queue).await
    }

    /// Takes every ready message off a queue (acking them) and returns them.
    pub async fn drain_queue(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        drain_queue(queue).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Svix signature of `body`.
pub fn sign(secret: &str, svix_id: &str, timestamp: i64, body: &[u8]) -> String {
    svix::webhooks::Webhook::new(secret)
        .unwrap()
        .sign(svix_id, timestamp, body)
        .unwrap()
}

/// A channel on the machine's broker, for inspecting queues.
pub async fn broker_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&base_amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("broker reachable");
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Ready messages in a queue (passive declare).
pub async fn queue_depth(queue: &str) -> u32 {
    let (conn, ch) = broker_channel().await;
    let q = provisioner::broker::inspect(&ch, queue)
        .await
        .expect("queue exists");
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

/// Takes every ready message off a queue.
pub async fn drain_queue(queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let (conn, ch) = broker_channel().await;
    let mut out = Vec::new();
    while let Some(msg) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic_get")
    {
        msg.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
        out.push(msg);
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

/// Deletes a test's queues now (they would also expire by themselves).
pub async fn delete_queues(names: &[String]) {
    let (conn, ch) = broker_channel().await;
    for n in names {
        let _ = ch
            .queue_delete(n.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Polls `check` until it returns Some or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drops test databases older than an hour (left by failed or killed runs).
async fn sweep_old_databases() {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&format!("{}/postgres", base_database_url()))
                .await
            else {
                return;
            };
            let names: Vec<String> = sqlx::query_scalar(
                "select datname from pg_database where datname like 'prov\\_test\\_%'",
            )
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            let cutoff = now_secs() - 3600;
            for name in names {
                let ts = name
                    .strip_prefix("prov_test_")
                    .and_then(|r| r.split('_').next())
                    .and_then(|t| t.parse::<i64>().ok());
                if matches!(ts, Some(t) if t < cutoff) {
                    let sql = format!("drop database if exists \"{name}\" with (force)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                }
            }
        })
        .await;
}

/// A Clerk-shaped envelope around `data`.
pub fn envelope(kind: &str, data: serde_json::Value, timestamp_ms: i64) -> Vec<u8> {
    let event = provisioner::clerk::sample::envelope(kind, data, timestamp_ms, "ins_test");
    serde_json::to_vec(&event).unwrap()
}

/// A fixture from `tests/fixtures/NAME.json`.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture exists")).unwrap()
}

/// A file under the temp dir, removed when dropped (a binary's config).
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!("provisioner-{}-{name}", random_id(10)));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
