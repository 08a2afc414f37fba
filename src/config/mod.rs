//! Configuration: `config/default.toml` (compiled in), an optional file named by
//! `PROVISIONER_CONFIG` merged over it, then environment variables over both
//! (see `config/source.rs`); the merged table deserializes straight into [`Settings`], and
//! [`Settings::validate`] checks it.
//!
//! Guarantee: a [`Settings`] value is complete and validated — every bad or missing
//! setting fails [`Settings::load`] with one line naming the setting — and no secret
//! it holds can reach a log line through `Debug`, `Display` or a load error.

mod guard;
mod secret;
mod source;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Deserializer};

use crate::domain::Role;
pub use guard::{MIN_PRODUCTION_TOKEN_CHARS, SECRET_KEYS};
pub use secret::{ConnectionUrl, Secret, redact_url};

/// The committed defaults, compiled into the binary so it runs from any directory.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");

/// The development webhook secret of `config/default.toml`; refused in production.
pub const DEVELOPMENT_WEBHOOK_SECRET: &str = "whsec_Y2FsbG1pbmUtZGV2LXdlYmhvb2stc2VjcmV0LTAx";
/// The development read-API token of `config/default.toml`; refused in production.
pub const DEVELOPMENT_API_TOKEN: &str = "dev-token-callmine-provisioner";
/// The development ops-console token of `config/default.toml`; refused in production.
pub const DEVELOPMENT_OPS_TOKEN: &str = "dev-ops-token-callmine-provisioner";

/// Quota names every plan must define.
pub const REQUIRED_QUOTAS: [&str; 6] = [
    "seats",
    "analyses_per_month",
    "reports",
    "schedules",
    "retention_days",
    "gong_credentials",
];

/// Deployment environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Environment {
    /// Local development and tests: development secrets allowed.
    Development,
    /// Real deployments: development secrets refused.
    Production,
}

impl TryFrom<String> for Environment {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "development" => Ok(Self::Development),
            "production" => Ok(Self::Production),
            other => Err(format!(
                "must be `development` or `production`, got `{other}`"
            )),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("must be `text` or `json`, got `{other}`")),
        }
    }
}

/// The whole, validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Deployment environment.
    pub environment: Environment,
    /// HTTP listener and intake.
    pub http: HttpSettings,
    /// PostgreSQL.
    pub database: DatabaseSettings,
    /// RabbitMQ connection, topology names and publishing.
    pub broker: BrokerSettings,
    /// Clerk webhook verification and Backend API.
    pub clerk: ClerkSettings,
    /// Read API.
    pub api: ApiSettings,
    /// The ops console (`/ops`).
    pub ops: OpsSettings,
    /// Worker tuning.
    pub worker: WorkerSettings,
    /// Reconciliation with Clerk's Backend API.
    pub reconcile: ReconcileSettings,
    /// Clerk Billing (DESIGN §5b).
    pub billing: BillingSettings,
    /// Plans, quotas, roles and onboarding (`[provisioning]`, `[plans.*]`, `[roles]`).
    pub provisioning: ProvisioningSettings,
    /// Logging.
    pub log: LogSettings,
    /// Prometheus metrics: the broker and database poll, the worker's own listener.
    pub metrics: MetricsSettings,
    /// One line per deprecated setting the sources used. Loading happens before
    /// logging starts, so the caller logs these once tracing is up.
    #[serde(skip)]
    pub deprecations: Vec<String>,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Listener address.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Largest accepted webhook body.
    pub max_body_bytes: usize,
    /// `Retry-After` seconds on a 503.
    pub retry_after_secs: u64,
    /// Drain time on SIGTERM, for the whole process (HTTP, then the worker).
    pub shutdown_grace_ms: u64,
    /// Deadline of a request head: the first from the accept, later ones on a
    /// kept-alive HTTP/1.1 connection from the end of the previous response.
    pub header_read_timeout_ms: u64,
    /// Deadline of a request body, from its head (intake answers 408 after it).
    pub body_read_timeout_ms: u64,
    /// A connection with no request in flight and no byte moving this long is closed.
    pub idle_timeout_ms: u64,
    /// Connections served at once; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Webhooks verified and published at once (a slot is taken once the body is
    /// read); past it, intake answers 503 with `Retry-After`.
    pub max_inflight_webhooks: usize,
    /// Deadline of a webhook's body, from its head (the shorter of this and
    /// `body_read_timeout_ms` applies): Svix sends a few KB at once.
    pub webhook_body_timeout_ms: u64,
    /// A connection this old is told to close (then closed after
    /// `shutdown_grace_ms`); 0: no limit.
    pub max_connection_age_ms: u64,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection URL.
    pub url: ConnectionUrl,
    /// Pool size.
    pub max_connections: u32,
    /// Pool acquire timeout.
    pub acquire_timeout_ms: u64,
    /// `lock_timeout` of every session (ms; 0 leaves the server's): a row or lock
    /// held elsewhere fails the statement instead of stalling it for ever.
    pub lock_timeout_ms: u64,
    /// `statement_timeout` of every session (ms; 0 leaves the server's).
    pub statement_timeout_ms: u64,
    /// `idle_in_transaction_session_timeout` of every session (ms; 0 leaves the
    /// server's): a backstop that ends a session whose transaction waits longer
    /// than this between statements, so its locks and connection come back even
    /// if the code driving it stopped.
    pub idle_in_transaction_session_timeout_ms: u64,
}

/// `[broker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    /// AMQP URL, or several comma-separated (the nodes of a cluster: same
    /// credentials and vhost); clients connect to the first that answers.
    pub url: ConnectionUrl,
    /// Topic exchange for Clerk events.
    pub exchange: String,
    /// Quorum work queue.
    pub queue: String,
    /// Dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Dead-letter queue.
    pub dead_letter_queue: String,
    /// Prefix of the delayed-retry queues.
    pub retry_queue_prefix: String,
    /// Quorum delivery limit of the work queue.
    pub delivery_limit: u32,
    /// Optional `x-expires` on every queue (tests only).
    pub queue_expires_ms: Option<u64>,
    /// `x-quorum-initial-group-size` of every quorum queue this service declares;
    /// unset: see [`BrokerSettings::initial_group_size`].
    #[serde(default)]
    pub quorum_initial_group_size: Option<u32>,
    /// Confirm channels of the intake publisher: publishes in flight at once.
    pub publish_channels: usize,
    /// Wait for a publisher confirm: intake answers 503 after it, and the worker's
    /// retry and dead-letter publishes and `dlq replay` give up after it.
    /// Formerly `[http] publish_timeout_ms`, still read with a deprecation note.
    pub publish_timeout_ms: u64,
}

impl BrokerSettings {
    /// The `x-quorum-initial-group-size` to declare quorum queues with: the
    /// configured one, else the number of addresses in `url` up to 3 when it lists
    /// several, else none (the broker then places a member on every cluster node:
    /// a client cannot count a cluster's nodes over AMQP, and one address is what a
    /// single node or a load balancer in front of a cluster looks like).
    pub fn initial_group_size(&self) -> Option<u32> {
        self.quorum_initial_group_size.or_else(|| {
            let n = self.url.addresses().len();
            (n > 1).then(|| n.min(3) as u32)
        })
    }
}

/// `[clerk]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClerkSettings {
    /// Accepted `whsec_` secrets; the first signs. One string in the sources,
    /// separated by commas or whitespace.
    #[serde(deserialize_with = "secret_list")]
    pub webhook_secrets: Vec<Secret>,
    /// Only this instance's events are accepted, when set.
    #[serde(default, deserialize_with = "non_empty")]
    pub instance_id: Option<String>,
    /// Backend API key for reconcile.
    #[serde(default, deserialize_with = "non_empty")]
    pub secret_key: Option<Secret>,
    /// Backend API base URL.
    pub api_url: String,
}

/// `[billing]`
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSettings {
    /// Days a past-due subscription keeps its plan before the workspace is
    /// `restricted` (0: at once).
    pub past_due_grace_days: u32,
}

/// `[reconcile]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSettings {
    /// Backend API requests per second, shared by every call of the process
    /// (0 = no limit, for benchmarks against a local fake).
    pub requests_per_second: f64,
    /// Members plus workspaces one run may remove without `--yes`.
    pub max_removals: u32,
    /// Seconds between scheduled full reconciles in `serve` and `worker` (0 = off).
    pub interval_s: u64,
}

/// `[api]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Accepted bearer tokens. One comma-separated string in the sources.
    #[serde(deserialize_with = "token_list")]
    pub tokens: Vec<Secret>,
}

/// `[ops]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsSettings {
    /// Tokens that open the ops console. One comma-separated string in the sources.
    #[serde(deserialize_with = "token_list")]
    pub tokens: Vec<Secret>,
    /// Hours a console session lasts from its sign-in, however active it is.
    pub session_max_age_h: u64,
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Events in flight per worker process (and AMQP prefetch).
    pub concurrency: u16,
    /// Events per commit.
    pub batch_size: usize,
    /// Wait for a batch to fill.
    pub batch_wait_ms: u64,
    /// Delayed-retry queue delays.
    pub retry_delays_ms: Vec<u64>,
    /// In-process retry budget for a transient database error.
    pub db_retry_max_ms: u64,
}

/// One onboarding step of a new workspace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnboardingStep {
    /// Step name (`gong`, `hubspot`, …).
    pub name: String,
    /// Whether the step must be completed (it cannot be skipped).
    pub required: bool,
}

/// `[provisioning]`, with the top-level `[plans.*]` and `[roles]` tables of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningSettings {
    /// Plan of a new workspace unless its metadata names another.
    pub default_plan: String,
    /// Plan name -> quota name -> limit.
    pub plans: BTreeMap<String, BTreeMap<String, i64>>,
    /// Clerk role key -> Callmine role.
    #[serde(default)]
    pub roles: BTreeMap<String, Role>,
    /// Onboarding steps of a new workspace, in order.
    pub onboarding_steps: Vec<OnboardingStep>,
}

impl ProvisioningSettings {
    /// The Callmine role for a Clerk role: `org:admin` is always admin, a mapped
    /// role follows the map, anything else is member.
    pub fn role_for(&self, clerk_role: &str) -> Role {
        if clerk_role == "org:admin" {
            return Role::Admin;
        }
        self.roles.get(clerk_role).copied().unwrap_or(Role::Member)
    }

    /// The plan a workspace with this `public_metadata.plan` gets.
    pub fn plan_for<'a>(&'a self, requested: Option<&'a str>) -> &'a str {
        match requested {
            Some(plan) if self.plans.contains_key(plan) => plan,
            _ => &self.default_plan,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `RUST_LOG`-style filter.
    pub filter: String,
    /// Output format.
    pub format: LogFormat,
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// How often `serve` and `worker` poll the queue depths (passive declares) and
    /// the database connection for their gauges (ms; 0 = never).
    pub poll_interval_ms: u64,
    /// Address of `provisioner worker`'s own `/metrics` and `/healthz` listener;
    /// none when unset (`serve` answers `/metrics` on its HTTP listener).
    #[serde(default, deserialize_with = "optional_socket_addr")]
    pub worker_listen: Option<SocketAddr>,
}

/// A setting that is missing or invalid; displays as one line naming it.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{setting}`: {message}")]
pub struct ConfigError {
    /// Dotted name of the setting, with its environment variable when it has one.
    pub setting: String,
    /// What is wrong with it (never the secret itself).
    pub message: String,
}

impl ConfigError {
    fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            message: message.into(),
        }
    }

    /// An error about the setting at dotted `key`, named as operators know it.
    fn at(key: &str, message: impl Into<String>) -> Self {
        Self::new(source::setting_name(key), message)
    }
}

// ---- deserializing the source strings -----------------------------------------------

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let raw = String::deserialize(d)?;
    raw.parse().map_err(|_| {
        serde::de::Error::custom(format!("`{raw}` is not an address like 127.0.0.1:8080"))
    })
}

/// An optional address; an empty string is none.
fn optional_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let raw = String::deserialize(d)?;
    if raw.trim().is_empty() {
        return Ok(None);
    }
    raw.trim().parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!("`{raw}` is not an address like 127.0.0.1:9090"))
    })
}

/// Webhook secrets: separated by commas or whitespace (a rotation pastes two).
fn secret_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    let raw = String::deserialize(d)?;
    Ok(raw
        .split([',', ' ', '\n', '\t'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .collect())
}

/// API tokens: separated by commas only.
fn token_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    let raw = String::deserialize(d)?;
    Ok(raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .collect())
}

/// An optional string where blank means unset.
fn non_empty<'de, D: Deserializer<'de>, T: From<String>>(d: D) -> Result<Option<T>, D::Error> {
    let raw = Option::<String>::deserialize(d)?;
    Ok(raw.filter(|v| !v.trim().is_empty()).map(T::from))
}

impl Settings {
    /// Loads from the process environment and `PROVISIONER_CONFIG`.
    pub fn load() -> Result<Self, ConfigError> {
        let file = match std::env::var("PROVISIONER_CONFIG")
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new(
                    "PROVISIONER_CONFIG",
                    format!("cannot read config file {path}: {e}"),
                )
            })?),
            None => None,
        };
        Self::from_sources(file.as_deref(), |name| std::env::var(name).ok())
    }

    /// Builds settings from an optional file (merged over the defaults) and an
    /// environment lookup; tests pass their own lookup.
    pub fn from_sources(
        file: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut deprecations = Vec::new();
        let mut table = parse_toml(DEFAULT_CONFIG, "config/default.toml")?;
        if let Some(text) = file {
            let mut layer = parse_toml(text, "PROVISIONER_CONFIG")?;
            source::rename_deprecated(&mut layer, &mut deprecations);
            source::merge(&mut table, layer);
        }
        source::merge(&mut table, source::env_layer(env));
        // `[plans]` and `[roles]` are top-level tables in the file (DESIGN §2) but
        // belong to `provisioning`; moved after merging, so each still replaces whole.
        let moved: Vec<_> = ["plans", "roles"]
            .into_iter()
            .filter_map(|key| table.remove(key).map(|value| (key.to_owned(), value)))
            .collect();
        if let toml::Value::Table(provisioning) = table
            .entry("provisioning")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            provisioning.extend(moved);
        }
        let mut settings: Settings =
            serde_path_to_error::deserialize(table).map_err(deserialize_error)?;
        settings.deprecations = deprecations;
        settings.validate()?;
        Ok(settings)
    }
}

/// Parses one TOML source. The error keeps to one line and never quotes the
/// source, which may hold a secret: the parser's message, the line and column, and
/// the setting being written there when that line starts with a known setting's
/// name (only names the defaults or the environment define are ever printed).
fn parse_toml(text: &str, setting: &str) -> Result<toml::Table, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let message = e.message().replace('\n', " ");
        let message = match e.span() {
            Some(span) => {
                let before = &text[..floor_char_boundary(text, span.start)];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
                match setting_on_line(text, line) {
                    Some(key) => format!("line {line}, column {column} (setting {key}): {message}"),
                    None => format!("line {line}, column {column}: {message}"),
                }
            }
            None => message,
        };
        ConfigError::new(setting, message)
    })
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The dotted name of the setting whose `key = …` starts line `line` (1-based), if
/// it is one this service knows: the table header above it plus the key, checked
/// against the defaults and the environment's keys so that a line inside a broken
/// string (which may be a secret) is never taken for a name.
fn setting_on_line(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    for l in text.lines().take(line - 1) {
        let t = l.trim();
        if t.starts_with('[') && t.ends_with(']') && !t.starts_with("[[") {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
        }
    }
    let (key, _) = text.lines().nth(line - 1)?.split_once('=')?;
    let key = key.trim();
    let name = if table.is_empty() {
        key.to_owned()
    } else {
        format!("{table}.{key}")
    };
    let defaults: toml::Table = toml::from_str(DEFAULT_CONFIG).ok()?;
    let mut known = source::ENV_KEYS.iter().any(|(_, k)| *k == name);
    if !known {
        let mut node = Some(&defaults);
        let parts: Vec<&str> = name.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            match node.and_then(|t| t.get(*part)) {
                Some(toml::Value::Table(t)) if i + 1 < parts.len() => node = Some(t),
                Some(_) if i + 1 == parts.len() => known = true,
                _ => break,
            }
        }
    }
    known.then(|| source::setting_name(&name))
}

/// Names the setting a deserialization error is about (`worker.batch_size`,
/// `http.listen (PROVISIONER_LISTEN)`, or an unknown key itself); an error without a
/// path names `PROVISIONER_CONFIG`, as the file is the only source that adds keys.
fn deserialize_error(e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = e.path().to_string();
    let message = e.inner().message().replace('\n', " ");
    // `plans` and `roles` were moved under `provisioning` only to deserialize.
    let key = match path.strip_prefix("provisioning.") {
        Some(rest) if rest.starts_with("plans") || rest.starts_with("roles") => rest,
        _ => path.as_str(),
    };
    if key == "." || key.is_empty() {
        ConfigError::new("PROVISIONER_CONFIG", message)
    } else {
        ConfigError::at(key, guard::deserialize_message(key, message))
    }
}
