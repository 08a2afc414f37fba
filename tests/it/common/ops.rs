//! Helpers for the operator-command tests: declare a test's topology without an
//! app, inject messages the way the worker or RabbitMQ would, read queues in order,
//! and run the `provisioner` binary against a test's own names.

use std::path::PathBuf;
use std::process::Output;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use provisioner::broker::Topology;
use provisioner::config::Settings;

use super::worker::publish_each;
use super::{Isolation, TestOptions, base_amqp_url, broker_channel, random_id, test_settings};

/// Settings and declared topology (exchanges, work, dead and retry queues) for a
/// test that needs the broker but no application.
pub async fn broker_only(opts: &TestOptions) -> (Isolation, Settings) {
    let iso = Isolation::new();
    let settings = test_settings(&iso, opts);
    declare_topology(&settings).await;
    (iso, settings)
}

/// Declares the topology of `settings`, without the retry queues (the operator
/// commands never touch them, and every quorum queue costs the broker a Raft group).
pub async fn declare_topology(settings: &Settings) {
    let (conn, ch) = broker_channel().await;
    let mut topology = Topology::new(&settings.broker, &settings.worker);
    topology.retry_queues.clear();
    topology.declare(&ch).await.expect("topology declares");
    let _ = conn.close(200, "bye".into()).await;
}

/// A message to inject.
#[derive(Debug, Clone, Default)]
pub struct Inject {
    /// Body bytes.
    pub body: Vec<u8>,
    /// `message_id`.
    pub message_id: Option<String>,
    /// `type`.
    pub kind: Option<String>,
    /// Headers.
    pub headers: Option<FieldTable>,
    /// AMQP timestamp (s).
    pub timestamp: Option<u64>,
}

impl Inject {
    /// Its AMQP properties: persistent JSON with whichever of the rest it has.
    fn properties(&self) -> BasicProperties {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = &self.message_id {
            props = props.with_message_id(id.as_str().into());
        }
        if let Some(k) = &self.kind {
            props = props.with_type(k.as_str().into());
        }
        if let Some(h) = &self.headers {
            props = props.with_headers(h.clone());
        }
        if let Some(ts) = self.timestamp {
            props = props.with_timestamp(ts);
        }
        props
    }

    /// A Clerk-shaped event body of `kind` about workspace `org` (by the type's shape).
    pub fn event(kind: &str, org: &str, id: &str) -> Self {
        let data = if kind.starts_with("organizationMembership.") {
            serde_json::json!({"id": format!("orgmem_{}", random_id(8)), "organization": {"id": org}})
        } else if kind.starts_with("organization.") {
            serde_json::json!({"id": org, "name": "Acme"})
        } else {
            serde_json::json!({"id": format!("user_{}", random_id(8))})
        };
        Self {
            body: super::envelope(kind, data, 1_716_883_200_000),
            message_id: Some(id.to_owned()),
            kind: Some(kind.to_owned()),
            headers: None,
            timestamp: Some(1_716_883_200),
        }
    }

    /// Makes the body about `bytes` longer (a `padding` string in `data`), still
    /// the same event.
    pub fn padded(mut self, bytes: usize) -> Self {
        let mut body: serde_json::Value = serde_json::from_slice(&self.body).expect("JSON body");
        body["data"]["padding"] = serde_json::Value::from("x".repeat(bytes));
        self.body = serde_json::to_vec(&body).unwrap();
        self
    }

    /// Adds the headers the worker puts on a dead letter.
    pub fn worker_headers(
        mut self,
        class: &str,
        error: &str,
        attempts: i64,
        failed_at_ms: i64,
    ) -> Self {
        let mut t = FieldTable::default();
        t.insert("x-error".into(), AMQPValue::LongString(error.into()));
        t.insert("x-error-class".into(), AMQPValue::LongString(class.into()));
        t.insert("x-attempts".into(), AMQPValue::LongLongInt(attempts));
        t.insert("x-failed-at".into(), AMQPValue::LongLongInt(failed_at_ms));
        self.headers = Some(t);
        self
    }

    /// Adds only the `x-death` headers RabbitMQ writes when the delivery limit of
    /// `queue` dead-letters a message.
    pub fn x_death_only(mut self, queue: &str, time_secs: u64) -> Self {
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("exchange".into(), AMQPValue::LongString("".into()));
        death.insert("queue".into(), AMQPValue::LongString(queue.into()));
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert("time".into(), AMQPValue::Timestamp(time_secs));
        let mut arr = FieldArray::default();
        arr.push(AMQPValue::FieldTable(death));
        let mut t = FieldTable::default();
        t.insert("x-death".into(), AMQPValue::FieldArray(arr));
        t.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        t.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString(queue.into()),
        );
        t.insert(
            "x-first-death-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        self.headers = Some(t);
        self
    }
}

/// Publishes messages (in order, each confirmed) to `exchange` with `routing_key`
/// (`""` + a queue name = straight into that queue).
pub async fn inject(exchange: &str, routing_key: &str, messages: &[Inject]) {
    inject_each(exchange, messages, |_| routing_key.to_owned()).await;
}

/// Puts messages in the dead-letter queue of `settings` the way the worker does:
/// through the dead-letter exchange, routed by their type.
pub async fn inject_dead_routed(settings: &Settings, messages: &[Inject]) {
    inject_each(&settings.broker.dead_letter_exchange, messages, |m| {
        m.kind.clone().unwrap_or_default()
    })
    .await;
}

/// Publishes messages (in order, each confirmed) to `exchange`, each with the
/// routing key `key` gives it.
async fn inject_each(exchange: &str, messages: &[Inject], key: impl Fn(&Inject) -> String) {
    let keys: Vec<String> = messages.iter().map(key).collect();
    let each = messages
        .iter()
        .zip(&keys)
        .map(|(m, k)| (k.as_str(), m.body.as_slice(), m.properties()));
    publish_each(exchange, each).await;
}

/// Puts messages straight into the dead-letter queue of `settings`, in order.
pub async fn inject_dead(settings: &Settings, messages: &[Inject]) {
    inject("", &settings.broker.dead_letter_queue, messages).await;
}

/// The `message_id`s of a drained queue, in order.
pub fn message_ids(messages: &[lapin::message::BasicGetMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default()
        })
        .collect()
}

/// A header of a drained message.
pub fn header<'a>(m: &'a lapin::message::BasicGetMessage, name: &str) -> Option<&'a AMQPValue> {
    m.delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from(name)))
}

/// Writes a TOML config for the binary with the test's broker names; returns its path.
pub fn config_file(iso: &Isolation, extra: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("provisioner-test-{}.toml", random_id(12)));
    std::fs::write(&path, format!("{}\n{extra}", iso.broker_toml())).expect("write temp config");
    path
}

/// Runs the `provisioner` binary with `PROVISIONER_CONFIG` and env; waits for it.
pub async fn run_binary(config: &PathBuf, env: &[(&str, String)], args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_provisioner"));
    cmd.args(args)
        .env("PROVISIONER_CONFIG", config)
        .env("AMQP_URL", base_amqp_url())
        .env("PROVISIONER_ENV", "development")
        .env("RUST_LOG", "warn")
        .env_remove("CLERK_WEBHOOK_SECRET")
        .env_remove("CLERK_INSTANCE_ID")
        .env_remove("PROVISIONER_API_TOKENS")
        .env_remove("PROVISIONER_LISTEN")
        .env_remove("DATABASE_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A hung command fails its test instead of holding the whole suite up.
    cmd.kill_on_drop(true);
    match tokio::time::timeout(BINARY_DEADLINE, cmd.output()).await {
        Ok(out) => out.expect("binary runs"),
        Err(_) => panic!(
            "provisioner {args:?} did not finish within {} s",
            BINARY_DEADLINE.as_secs()
        ),
    }
}

/// A failed run whose last error line names `redacted_url` and whose output never
/// shows `password`.
pub fn assert_failed_naming(out: &Output, redacted_url: &str, password: &str, context: &str) {
    assert!(!out.status.success(), "{context}: exits non-zero");
    let line = error_line(out);
    assert!(line.contains(redacted_url), "{context}: {line}");
    assert!(
        !stderr(out).contains(password),
        "{context}: password leaked"
    );
    assert!(
        !stdout(out).contains(password),
        "{context}: password leaked"
    );
}

/// The longest one run of the binary may take in a test.
pub const BINARY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// stdout of a finished binary.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr of a finished binary.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The last non-empty line of stderr (the one-line error `main` prints).
pub fn error_line(out: &Output) -> String {
    stderr(out)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_owned()
}

/// Headers without the broker's own delivery count (the one thing a session that
/// read a letter and gave it back changes).
pub fn headers_but_delivery_count(headers: Option<&FieldTable>) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in headers.map(|h| h.inner().iter()).into_iter().flatten() {
        if k.as_str() != "x-delivery-count" {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Asserts that `left` (a drained dead-letter queue) holds exactly the letters
/// `injected` put there through `exchange`: each once, with its body, properties,
/// headers (but the broker's delivery count), exchange and routing key.
pub fn assert_intact(
    left: &[lapin::message::BasicGetMessage],
    injected: &[Inject],
    exchange: &str,
) {
    let mut ids = message_ids(left);
    ids.sort();
    let mut expected: Vec<String> = injected
        .iter()
        .map(|m| m.message_id.clone().unwrap_or_default())
        .collect();
    expected.sort();
    assert_eq!(
        ids.len(),
        expected.len(),
        "as many letters as were put there"
    );
    assert_eq!(ids, expected, "every letter exactly once");
    for m in left {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str();
        let original = injected
            .iter()
            .find(|i| i.message_id.as_deref() == Some(id))
            .unwrap();
        let p = &m.delivery.properties;
        assert!(m.delivery.data == original.body, "{id}: body unchanged");
        assert_eq!(
            headers_but_delivery_count(p.headers().as_ref()),
            headers_but_delivery_count(original.headers.as_ref()),
            "{id}: headers unchanged"
        );
        assert_eq!(m.delivery.exchange.as_str(), exchange, "{id}: exchange");
        assert_eq!(
            Some(m.delivery.routing_key.as_str()),
            original.kind.as_deref(),
            "{id}: routing key"
        );
        assert_eq!(
            p.kind().as_ref().map(|k| k.as_str()),
            original.kind.as_deref()
        );
        assert_eq!(p.timestamp(), &original.timestamp, "{id}: timestamp");
    }
}

/// Dead letters of every kind a session meets — worker-made, made by RabbitMQ's
/// delivery limit (`x-death`), put there by hand — `bytes` long each, ids
/// `{prefix}_000`…
pub fn many_letters(prefix: &str, n: usize, bytes: usize) -> Vec<Inject> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}_{i:03}");
            let letter = match i % 3 {
                0 => Inject::event("organization.updated", &format!("org_{i}"), &id)
                    .worker_headers("payload", "data.name is missing", 1, 1_716_883_201_500),
                1 => Inject::event("organizationMembership.created", "org_m", &id)
                    .x_death_only("provisioner.events", 1_716_883_203),
                _ => Inject::event("user.deleted", "-", &id),
            };
            letter.padded(bytes)
        })
        .collect()
}

/// `provisioner serve` as a child process on a test's own database and broker
/// names, answering on `base`.
pub struct Served {
    /// The process.
    pub process: super::children::Process,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    config: PathBuf,
}

impl Served {
    /// Starts `serve` and waits until it is healthy.
    pub async fn start(iso: &Isolation) -> Self {
        Self::start_with(iso, &["serve"]).await
    }

    /// Starts the binary with `args` (a `serve` of some kind) and waits until it
    /// is healthy.
    pub async fn start_with(iso: &Isolation, args: &[&str]) -> Self {
        let config = config_file(iso, "");
        let port = super::children::free_port();
        let base = format!("http://127.0.0.1:{port}");
        let env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), iso.database_url()),
            ("AMQP_URL".into(), base_amqp_url()),
            ("PROVISIONER_LISTEN".into(), format!("127.0.0.1:{port}")),
            ("PROVISIONER_CONFIG".into(), config.display().to_string()),
            ("PROVISIONER_ENV".into(), "development".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        let mut process = super::children::Process::start("serve", args, &env);
        process.wait_healthy(&base).await;
        Self {
            process,
            base,
            config,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

/// A process's resident memory now and its peak (`VmRSS`, `VmHWM`), in bytes.
pub fn resident(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("{name} in {status}"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets a process's peak resident memory (`VmHWM`) to what it uses now.
pub fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs");
}
