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

use std::collections::{BTreeMap, BTreeSet};
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

    /// Checks what the types alone cannot: positive sizes, URL schemes, non-empty
    /// names and lists, plans that define every quota, and no development secret in
    /// production. The first failure is returned, naming its setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("http.max_body_bytes", self.http.max_body_bytes == 0),
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms == 0,
            ),
            (
                "http.body_read_timeout_ms",
                self.http.body_read_timeout_ms == 0,
            ),
            ("http.idle_timeout_ms", self.http.idle_timeout_ms == 0),
            ("http.max_connections", self.http.max_connections == 0),
            (
                "http.max_inflight_webhooks",
                self.http.max_inflight_webhooks == 0,
            ),
            (
                "http.webhook_body_timeout_ms",
                self.http.webhook_body_timeout_ms == 0,
            ),
            (
                "broker.publish_timeout_ms",
                self.broker.publish_timeout_ms == 0,
            ),
            (
                "database.max_connections",
                self.database.max_connections == 0,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, zero)| *zero) {
            return Err(ConfigError::at(key, "must be positive"));
        }

        check_url_scheme(
            "database.url",
            &self.database.url,
            &["postgres", "postgresql"],
        )?;
        check_broker_urls(&self.broker.url)?;
        if self.broker.quorum_initial_group_size == Some(0) {
            return Err(ConfigError::at(
                "broker.quorum_initial_group_size",
                "must be positive",
            ));
        }
        let names = [
            ("broker.exchange", &self.broker.exchange),
            ("broker.queue", &self.broker.queue),
            (
                "broker.dead_letter_exchange",
                &self.broker.dead_letter_exchange,
            ),
            ("broker.dead_letter_queue", &self.broker.dead_letter_queue),
            ("broker.retry_queue_prefix", &self.broker.retry_queue_prefix),
        ];
        if let Some((key, _)) = names.iter().find(|(_, name)| name.trim().is_empty()) {
            return Err(ConfigError::at(key, "must not be empty"));
        }
        if self.broker.delivery_limit == 0 {
            return Err(ConfigError::at("broker.delivery_limit", "must be positive"));
        }
        if !(self.reconcile.requests_per_second.is_finite()
            && self.reconcile.requests_per_second >= 0.0)
        {
            return Err(ConfigError::at(
                "reconcile.requests_per_second",
                "must be a number of requests per second, 0 or more",
            ));
        }
        if !(1..=1024).contains(&self.broker.publish_channels) {
            return Err(ConfigError::at(
                "broker.publish_channels",
                "must be between 1 and 1024",
            ));
        }

        let secrets = &self.clerk.webhook_secrets;
        if secrets.is_empty() {
            return Err(ConfigError::at(
                "clerk.webhook_secrets",
                "at least one whsec_… secret is required",
            ));
        }
        for (i, secret) in secrets.iter().enumerate() {
            if !secret.expose().starts_with("whsec_")
                || svix::webhooks::Webhook::new(secret.expose()).is_err()
            {
                return Err(ConfigError::at(
                    "clerk.webhook_secrets",
                    format!("secret #{} is not a valid whsec_… secret", i + 1),
                ));
            }
        }
        guard::clerk_api_url(&self.clerk.api_url)?;
        if self.api.tokens.is_empty() {
            return Err(ConfigError::at(
                "api.tokens",
                "at least one token is required",
            ));
        }
        if self.ops.tokens.is_empty() {
            return Err(ConfigError::at(
                "ops.tokens",
                "at least one token is required",
            ));
        }
        // The two kinds of credentials stay apart: a token in both lists would let a
        // read-API client into the console.
        if self.ops.tokens.iter().any(|t| self.api.tokens.contains(t)) {
            return Err(ConfigError::at(
                "ops.tokens",
                "a token is also a read-API token (api.tokens); give the console its own",
            ));
        }
        if self.environment == Environment::Production {
            if secrets
                .iter()
                .any(|s| s.expose() == DEVELOPMENT_WEBHOOK_SECRET)
            {
                return Err(ConfigError::at(
                    "clerk.webhook_secrets",
                    "the development secret is refused when PROVISIONER_ENV=production",
                ));
            }
            if self
                .api
                .tokens
                .iter()
                .any(|t| t.expose() == DEVELOPMENT_API_TOKEN)
            {
                return Err(ConfigError::at(
                    "api.tokens",
                    "the development token is refused when PROVISIONER_ENV=production",
                ));
            }
            if self
                .ops
                .tokens
                .iter()
                .any(|t| t.expose() == DEVELOPMENT_OPS_TOKEN)
            {
                return Err(ConfigError::at(
                    "ops.tokens",
                    "the development token is refused when PROVISIONER_ENV=production",
                ));
            }
        }
        guard::production_tokens(self)?;
        guard::ops(self)?;

        if self.worker.concurrency == 0 {
            return Err(ConfigError::at("worker.concurrency", "must be positive"));
        }
        if self.worker.batch_size == 0 {
            return Err(ConfigError::at("worker.batch_size", "must be positive"));
        }
        if self.worker.retry_delays_ms.contains(&0) {
            return Err(ConfigError::at(
                "worker.retry_delays_ms",
                "delays must be positive",
            ));
        }

        self.provisioning.validate()
    }
}

impl ProvisioningSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.plans.is_empty() {
            return Err(ConfigError::at(
                "plans",
                "at least one [plans.NAME] table is required",
            ));
        }
        for (plan, quotas) in &self.plans {
            if let Some(quota) = REQUIRED_QUOTAS.iter().find(|q| !quotas.contains_key(**q)) {
                return Err(ConfigError::at(
                    &format!("plans.{plan}.{quota}"),
                    "missing quota",
                ));
            }
            if let Some((name, _)) = quotas.iter().find(|(_, v)| **v < 0) {
                return Err(ConfigError::at(
                    &format!("plans.{plan}.{name}"),
                    "quota limits must not be negative",
                ));
            }
        }
        if !self.plans.contains_key(&self.default_plan) {
            return Err(ConfigError::at(
                "provisioning.default_plan",
                format!("`{}` is not one of the configured plans", self.default_plan),
            ));
        }
        if self.onboarding_steps.is_empty() {
            return Err(ConfigError::at(
                "provisioning.onboarding_steps",
                "at least one step is required",
            ));
        }
        let mut seen = BTreeSet::new();
        for step in &self.onboarding_steps {
            if step.name.trim().is_empty() || !seen.insert(step.name.as_str()) {
                return Err(ConfigError::at(
                    "provisioning.onboarding_steps",
                    format!("step names must be unique and non-empty (`{}`)", step.name),
                ));
            }
        }
        Ok(())
    }
}

fn check_url_scheme(key: &str, url: &ConnectionUrl, schemes: &[&str]) -> Result<(), ConfigError> {
    match url::Url::parse(url.expose()) {
        // `scheme:user:pw@host` parses, but has no authority: lapin would refuse it
        // with an error quoting the whole text.
        Ok(u) if schemes.contains(&u.scheme()) && !u.cannot_be_a_base() => Ok(()),
        _ => Err(ConfigError::at(
            key,
            format!("`{}` is not a {}:// URL", url.redacted(), schemes[0]),
        )),
    }
}

/// `broker.url`: one AMQP URL or several, comma-separated, that differ only in
/// host, port, scheme and query (the nodes of one cluster): same user, password and
/// vhost. Errors show URLs redacted and never say what a password is.
fn check_broker_urls(url: &ConnectionUrl) -> Result<(), ConfigError> {
    const KEY: &str = "broker.url";
    let addresses = url.addresses();
    let mut parsed = Vec::with_capacity(addresses.len());
    for (i, address) in addresses.iter().enumerate() {
        if address.expose().is_empty() {
            return Err(ConfigError::at(
                KEY,
                format!("address {} of `{}` is empty", i + 1, url.redacted()),
            ));
        }
        check_url_scheme(KEY, address, &["amqp", "amqps"])?;
        parsed.push(url::Url::parse(address.expose()).expect("checked above"));
    }
    let first = &parsed[0];
    for (i, other) in parsed.iter().enumerate().skip(1) {
        let differs = if other.username() != first.username() {
            Some("user")
        } else if other.password() != first.password() {
            Some("password")
        } else if other.path() != first.path() {
            Some("vhost")
        } else {
            None
        };
        if let Some(what) = differs {
            return Err(ConfigError::at(
                KEY,
                format!(
                    "address {} (`{}`) has another {what} than the first (`{}`): the addresses of `{KEY}` are the nodes of one cluster and must use the same user, password and vhost",
                    i + 1,
                    addresses[i].redacted(),
                    addresses[0].redacted()
                ),
            ));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::from_sources(file, |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn defaults_load_and_match_the_design() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.broker.exchange, "clerk.webhooks");
        assert_eq!(s.broker.queue, "provisioner.events");
        assert_eq!(s.broker.dead_letter_exchange, "provisioner.dlx");
        assert_eq!(s.broker.dead_letter_queue, "provisioner.dead");
        assert_eq!(
            s.database.url.expose(),
            "postgres://postgres@127.0.0.1:5432/provisioner"
        );
        assert_eq!(s.environment, Environment::Development);
        assert!(
            s.provisioning
                .plans
                .contains_key(&s.provisioning.default_plan)
        );
    }

    #[test]
    fn amqp_url_takes_the_nodes_of_one_cluster() {
        let urls = "amqp://u:hunter2@r1:5672/prod, amqp://u:hunter2@r2:5672/prod,amqps://u:hunter2@r3:5671/prod?heartbeat=5";
        let s = load(None, &[("AMQP_URL", urls)]).unwrap();
        assert_eq!(s.broker.url.addresses().len(), 3);
        assert_eq!(s.broker.initial_group_size(), Some(3));
        assert!(!format!("{:?} {}", s.broker, s.broker.url).contains("hunter2"));
        let s = load(
            None,
            &[
                ("AMQP_URL", urls),
                ("PROVISIONER_BROKER_QUORUM_INITIAL_GROUP_SIZE", "2"),
            ],
        )
        .unwrap();
        assert_eq!(s.broker.initial_group_size(), Some(2), "the setting wins");
        let four = "amqp://r1/v,amqp://r2/v,amqp://r3/v,amqp://r4/v";
        let s = load(None, &[("AMQP_URL", four)]).unwrap();
        assert_eq!(s.broker.initial_group_size(), Some(3), "up to 3");
        let s = load(None, &[("AMQP_URL", "amqp://u:p@r1/v")]).unwrap();
        assert_eq!(
            s.broker.initial_group_size(),
            None,
            "one address: the broker's default"
        );

        for (other, what) in [
            ("amqp://u:hunter2@r2/staging", "vhost"),
            ("amqp://v:hunter2@r2/prod", "user"),
            ("amqp://u:swordfish@r2/prod", "password"),
            ("http://u:hunter2@r2/prod", "amqp://"),
        ] {
            let value = format!("amqp://u:hunter2@r1/prod,{other}");
            let err = load(None, &[("AMQP_URL", &value)]).unwrap_err();
            let shown = err.to_string();
            assert!(err.setting.contains("broker.url (AMQP_URL)"), "{shown}");
            assert!(shown.contains(what), "{what}: {shown}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("swordfish"),
                "{shown}"
            );
        }
        let err = load(
            None,
            &[("PROVISIONER_BROKER_QUORUM_INITIAL_GROUP_SIZE", "0")],
        )
        .unwrap_err();
        assert!(
            err.setting.contains("broker.quorum_initial_group_size"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let s = load(
            None,
            &[
                ("PROVISIONER_LISTEN", "0.0.0.0:9999"),
                ("CLERK_WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"),
                ("PROVISIONER_API_TOKENS", "a,b"),
                ("CLERK_INSTANCE_ID", "ins_1"),
            ],
        )
        .unwrap();
        assert_eq!(s.http.listen.to_string(), "0.0.0.0:9999");
        assert_eq!(s.clerk.webhook_secrets.len(), 2);
        assert_eq!(s.api.tokens.len(), 2);
        assert_eq!(s.clerk.instance_id.as_deref(), Some("ins_1"));
    }

    #[test]
    fn production_refuses_development_secret_and_token() {
        let err = load(None, &[("PROVISIONER_ENV", "production")]).unwrap_err();
        assert!(err.setting.contains("CLERK_WEBHOOK_SECRET"), "{err}");
        let err = load(
            None,
            &[
                ("PROVISIONER_ENV", "production"),
                (
                    "CLERK_WEBHOOK_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
            ],
        )
        .unwrap_err();
        assert!(err.setting.contains("PROVISIONER_API_TOKENS"), "{err}");
        load(
            None,
            &[
                ("PROVISIONER_ENV", "production"),
                (
                    "CLERK_WEBHOOK_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
                // Production tokens are 32 characters or more (guard.rs).
                (
                    "PROVISIONER_API_TOKENS",
                    "prod-token-0123456789abcdefghijklm",
                ),
                (
                    "PROVISIONER_OPS_TOKENS",
                    "prod-ops-token-0123456789abcdefghijklm",
                ),
            ],
        )
        .unwrap();
    }

    #[test]
    fn production_refuses_the_development_ops_token() {
        let production = [
            ("PROVISIONER_ENV", "production"),
            (
                "CLERK_WEBHOOK_SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
            ("PROVISIONER_API_TOKENS", "prod-token"),
        ];
        let err = load(None, &production).unwrap_err();
        assert_eq!(err.setting, "ops.tokens (PROVISIONER_OPS_TOKENS)", "{err}");
        assert!(!format!("{err} {err:?}").contains(DEVELOPMENT_OPS_TOKEN));
        // Also among others: rotation must not smuggle it in.
        let mut env = production.to_vec();
        env.push((
            "PROVISIONER_OPS_TOKENS",
            "prod-ops-token, dev-ops-token-callmine-provisioner",
        ));
        let err = load(None, &env).unwrap_err();
        assert_eq!(err.setting, "ops.tokens (PROVISIONER_OPS_TOKENS)", "{err}");
        // Development keeps the default, so the console opens out of the box.
        let s = load(None, &[]).unwrap();
        let tokens: Vec<_> = s.ops.tokens.iter().map(Secret::expose).collect();
        assert_eq!(tokens, [DEVELOPMENT_OPS_TOKEN]);
    }

    #[test]
    fn an_ops_token_may_not_also_be_a_read_api_token() {
        let err = load(
            None,
            &[
                ("PROVISIONER_API_TOKENS", "shared-token, api-only"),
                ("PROVISIONER_OPS_TOKENS", "ops-only,shared-token"),
            ],
        )
        .unwrap_err();
        assert_eq!(err.setting, "ops.tokens (PROVISIONER_OPS_TOKENS)", "{err}");
        assert!(!format!("{err} {err:?}").contains("shared-token"), "{err}");
    }

    #[test]
    fn bad_settings_fail_with_one_line_naming_the_setting() {
        let cases: [(&str, &str, &str); 5] = [
            ("PROVISIONER_LISTEN", "nonsense", "http.listen"),
            ("DATABASE_URL", "mysql://x", "database.url"),
            ("AMQP_URL", "http://x", "broker.url"),
            (
                "CLERK_WEBHOOK_SECRET",
                "not-a-secret",
                "clerk.webhook_secrets",
            ),
            ("LOG_FORMAT", "xml", "log.format"),
        ];
        for (var, value, setting) in cases {
            let err = load(None, &[(var, value)]).unwrap_err();
            assert!(err.setting.starts_with(setting), "{var}: {err}");
            assert!(!err.to_string().contains('\n'));
        }
        let err = load(Some("[provisioning]\ndefault_plan = \"gold\"\n"), &[]).unwrap_err();
        assert_eq!(err.setting, "provisioning.default_plan");
        let err = load(Some("[plans.solo]\nseats = 1\n"), &[]).unwrap_err();
        assert!(err.setting.starts_with("plans.solo."), "{err}");
    }

    #[test]
    fn a_file_merges_over_defaults_and_plans_replace_whole() {
        let file = r#"
[worker]
concurrency = 3
[provisioning]
default_plan = "solo"
[plans.solo]
seats = 1
analyses_per_month = 2
reports = 3
schedules = 4
retention_days = 5
gong_credentials = 6
"#;
        let s = load(Some(file), &[]).unwrap();
        assert_eq!(s.worker.concurrency, 3);
        assert_eq!(s.worker.batch_size, 64);
        assert_eq!(s.provisioning.plans.len(), 1);
        assert_eq!(s.provisioning.plans["solo"]["gong_credentials"], 6);
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let s = load(
            None,
            &[
                ("AMQP_URL", "amqp://user:hunter2@rabbit:5672/%2f"),
                ("DATABASE_URL", "postgres://u:pgpass@db/x"),
            ],
        )
        .unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"));
        assert!(!debug.contains("pgpass"));
        assert!(!debug.contains(DEVELOPMENT_WEBHOOK_SECRET));
        assert!(!debug.contains(DEVELOPMENT_API_TOKEN));
        assert!(debug.contains("rabbit"));
    }

    #[test]
    fn roles_map_with_org_admin_always_admin() {
        let file = "[roles]\n\"org:billing\" = \"admin\"\n\"org:admin\" = \"member\"\n";
        let s = load(Some(file), &[]).unwrap();
        assert_eq!(s.provisioning.role_for("org:admin"), Role::Admin);
        assert_eq!(s.provisioning.role_for("org:billing"), Role::Admin);
        assert_eq!(s.provisioning.role_for("org:member"), Role::Member);
        assert_eq!(s.provisioning.role_for("org:whatever"), Role::Member);
    }

    #[test]
    fn every_validation_error_names_its_setting() {
        let cases: &[(&str, &str)] = &[
            ("[http]\nmax_body_bytes = 0", "http.max_body_bytes"),
            (
                "[broker]\npublish_timeout_ms = 0",
                "broker.publish_timeout_ms",
            ),
            (
                "[database]\nmax_connections = 0",
                "database.max_connections",
            ),
            (
                "[database]\nurl = \"mysql://u:pw@db/x\"",
                "database.url (DATABASE_URL)",
            ),
            ("[broker]\nurl = \"http://u:pw@x\"", "broker.url (AMQP_URL)"),
            ("[broker]\nexchange = \" \"", "broker.exchange"),
            ("[broker]\nqueue = \"\"", "broker.queue"),
            (
                "[broker]\ndead_letter_exchange = \"\"",
                "broker.dead_letter_exchange",
            ),
            (
                "[broker]\ndead_letter_queue = \"\"",
                "broker.dead_letter_queue",
            ),
            (
                "[broker]\nretry_queue_prefix = \"\"",
                "broker.retry_queue_prefix",
            ),
            ("[broker]\ndelivery_limit = 0", "broker.delivery_limit"),
            ("[broker]\npublish_channels = 0", "broker.publish_channels"),
            (
                "[broker]\npublish_channels = 1025",
                "broker.publish_channels",
            ),
            (
                "[clerk]\nwebhook_secrets = \" , \"",
                "clerk.webhook_secrets (CLERK_WEBHOOK_SECRET)",
            ),
            (
                "[clerk]\nwebhook_secrets = \"whsec_!!\"",
                "clerk.webhook_secrets (CLERK_WEBHOOK_SECRET)",
            ),
            (
                "[clerk]\napi_url = \"not a url\"",
                "clerk.api_url (CLERK_API_URL)",
            ),
            (
                "[api]\ntokens = \" , \"",
                "api.tokens (PROVISIONER_API_TOKENS)",
            ),
            ("[worker]\nconcurrency = 0", "worker.concurrency"),
            ("[worker]\nbatch_size = 0", "worker.batch_size"),
            (
                "[worker]\nretry_delays_ms = [10, 0]",
                "worker.retry_delays_ms",
            ),
            ("[plans]\n", "plans"),
            ("[plans.free]\nseats = 1", "plans.free.analyses_per_month"),
            (NEGATIVE_QUOTA, "plans.free.seats"),
            (
                "[provisioning]\ndefault_plan = \"gold\"",
                "provisioning.default_plan",
            ),
            (
                "[provisioning]\nonboarding_steps = []",
                "provisioning.onboarding_steps",
            ),
            (
                "[provisioning]\nonboarding_steps = [{ name = \"a\", required = true }, { name = \"a\", required = false }]",
                "provisioning.onboarding_steps",
            ),
            // Rejected while deserializing: named all the same.
            ("environment = \"staging\"", "environment (PROVISIONER_ENV)"),
            (
                "[http]\nlisten = \"nonsense\"",
                "http.listen (PROVISIONER_LISTEN)",
            ),
            ("[log]\nformat = \"xml\"", "log.format (LOG_FORMAT)"),
            ("[worker]\nbatch_size = \"many\"", "worker.batch_size"),
            ("[plans.free]\nseats = \"five\"", "plans.free.seats"),
            ("[roles]\n\"org:x\" = \"owner\"", "roles.org:x"),
        ];
        for (file, setting) in cases {
            let err = load(Some(file), &[]).unwrap_err();
            assert_eq!(err.setting, *setting, "{file}: {err}");
            assert!(!err.to_string().contains('\n'), "{err}");
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
    }

    const NEGATIVE_QUOTA: &str = "[plans.free]\nseats = -1\nanalyses_per_month = 1\nreports = 1\nschedules = 1\nretention_days = 1\ngong_credentials = 1\n";

    #[test]
    fn unknown_keys_are_named_and_broken_files_are_quoted_by_line_only() {
        let err = load(Some("colour = \"blue\""), &[]).unwrap_err();
        assert_eq!(err.setting, "colour", "{err}");
        let err = load(Some("[http]\nlisten_on = \"x\""), &[]).unwrap_err();
        assert_eq!(err.setting, "http.listen_on", "{err}");
        // A broken file: one line, the line, column and setting, never the text
        // around it.
        let err = load(Some("[clerk]\nwebhook_secrets = \"whsec_hunter2"), &[]).unwrap_err();
        assert_eq!(err.setting, "PROVISIONER_CONFIG");
        assert!(
            err.message.starts_with(
                "line 2, column 33 (setting clerk.webhook_secrets (CLERK_WEBHOOK_SECRET)): "
            ),
            "{err}"
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn a_broken_string_is_never_taken_for_a_setting_name() {
        // The error is on the line `hunter2 = x`, inside an unterminated string.
        let text = "[database]\nurl = \"\"\"postgres://u:p@h/db\nhunter2 = \"x";
        let err = load(Some(text), &[]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.message.starts_with("line "), "{err}");
    }

    #[test]
    fn environment_beats_file_beats_defaults() {
        let file =
            "[http]\nlisten = \"127.0.0.2:1\"\n[log]\nfilter = \"debug\"\nformat = \"json\"\n";
        let s = load(
            Some(file),
            &[
                ("PROVISIONER_LISTEN", "127.0.0.3:2"),
                ("LOG_FORMAT", "text"),
            ],
        )
        .unwrap();
        assert_eq!(s.http.listen.to_string(), "127.0.0.3:2", "env over file");
        assert_eq!(s.log.format, LogFormat::Text, "env over file");
        assert_eq!(s.log.filter, "debug", "file over default");
        assert_eq!(s.http.max_body_bytes, 1_048_576, "default");
        // A blank variable is no override.
        let s = load(Some(file), &[("PROVISIONER_LISTEN", " ")]).unwrap();
        assert_eq!(s.http.listen.to_string(), "127.0.0.2:1");
        // A bad value names its variable even when the file set it.
        let err = load(Some("[log]\nformat = \"xml\""), &[]).unwrap_err();
        assert!(err.setting.contains("LOG_FORMAT"), "{err}");
    }

    #[test]
    fn every_variable_overrides_its_setting() {
        let s = load(
            None,
            &[
                ("PROVISIONER_ENV", "production"),
                ("PROVISIONER_LISTEN", "0.0.0.0:1"),
                ("DATABASE_URL", "postgres://db/x"),
                ("AMQP_URL", "amqps://rabbit/v"),
                (
                    "CLERK_WEBHOOK_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
                ("CLERK_INSTANCE_ID", "ins_2"),
                ("CLERK_SECRET_KEY", "sk_test"),
                ("CLERK_API_URL", "http://clerk.local"),
                // Production: tokens of 32 characters or more.
                (
                    "PROVISIONER_API_TOKENS",
                    "t1-0123456789abcdefghijklmnopqrstu, t2-0123456789abcdefghijklmnopqrstu",
                ),
                (
                    "PROVISIONER_OPS_TOKENS",
                    "o1-0123456789abcdefghijklmnopqrstu,o2-0123456789abcdefghijklmnopqrstu ,o3-0123456789abcdefghijklmnopqrstu",
                ),
                ("RUST_LOG", "warn"),
                ("LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(s.environment, Environment::Production);
        assert_eq!(s.http.listen.to_string(), "0.0.0.0:1");
        assert_eq!(s.database.url.expose(), "postgres://db/x");
        assert_eq!(s.broker.url.expose(), "amqps://rabbit/v");
        assert_eq!(s.clerk.webhook_secrets.len(), 1);
        assert_eq!(s.clerk.instance_id.as_deref(), Some("ins_2"));
        assert_eq!(
            s.clerk.secret_key.as_ref().map(Secret::expose),
            Some("sk_test")
        );
        assert_eq!(s.clerk.api_url, "http://clerk.local");
        let tokens: Vec<_> = s.api.tokens.iter().map(Secret::expose).collect();
        let long = |t: &str| format!("{t}-0123456789abcdefghijklmnopqrstu");
        assert_eq!(tokens, [long("t1"), long("t2")], "split and trimmed");
        let tokens: Vec<_> = s.ops.tokens.iter().map(Secret::expose).collect();
        assert_eq!(tokens, [long("o1"), long("o2"), long("o3")]);
        assert_eq!(s.log.filter, "warn");
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn http_limits_come_from_the_file_and_the_environment() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.http.header_read_timeout_ms, 10_000);
        assert_eq!(s.http.body_read_timeout_ms, 30_000);
        assert_eq!(s.http.idle_timeout_ms, 60_000);
        assert_eq!(s.http.max_connections, 1024);
        assert_eq!(s.http.max_inflight_webhooks, 256);
        let s = load(
            Some("[http]\nmax_connections = 7\nidle_timeout_ms = 9\n"),
            &[
                ("PROVISIONER_HTTP_HEADER_READ_TIMEOUT_MS", "1"),
                ("PROVISIONER_HTTP_BODY_READ_TIMEOUT_MS", "2"),
                ("PROVISIONER_HTTP_IDLE_TIMEOUT_MS", "3"),
                ("PROVISIONER_HTTP_MAX_INFLIGHT_WEBHOOKS", " 5 "),
            ],
        )
        .unwrap();
        assert_eq!(
            (
                s.http.header_read_timeout_ms,
                s.http.body_read_timeout_ms,
                s.http.idle_timeout_ms,
                s.http.max_connections,
                s.http.max_inflight_webhooks
            ),
            (1, 2, 3, 7, 5)
        );
        let err = load(None, &[("PROVISIONER_HTTP_MAX_CONNECTIONS", "many")]).unwrap_err();
        assert_eq!(
            err.setting, "http.max_connections (PROVISIONER_HTTP_MAX_CONNECTIONS)",
            "{err}"
        );
        let err = load(None, &[("PROVISIONER_HTTP_IDLE_TIMEOUT_MS", "0")]).unwrap_err();
        assert_eq!(
            err.setting, "http.idle_timeout_ms (PROVISIONER_HTTP_IDLE_TIMEOUT_MS)",
            "{err}"
        );
    }

    /// The webhook body deadline and the connection age default to 5 s and 5 min,
    /// come from the file and from their variables, and only the age may be 0.
    #[test]
    fn webhook_body_timeout_and_connection_age_come_from_file_and_environment() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.http.webhook_body_timeout_ms, 5_000);
        assert_eq!(s.http.max_connection_age_ms, 300_000);
        let s = load(
            Some("[http]\nwebhook_body_timeout_ms = 7\nmax_connection_age_ms = 8\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            (s.http.webhook_body_timeout_ms, s.http.max_connection_age_ms),
            (7, 8)
        );
        let s = load(
            None,
            &[
                ("PROVISIONER_HTTP_WEBHOOK_BODY_TIMEOUT_MS", "9"),
                ("PROVISIONER_HTTP_MAX_CONNECTION_AGE_MS", "0"),
            ],
        )
        .unwrap();
        assert_eq!(
            (s.http.webhook_body_timeout_ms, s.http.max_connection_age_ms),
            (9, 0),
            "an age of 0 turns the limit off"
        );
        let err = load(None, &[("PROVISIONER_HTTP_WEBHOOK_BODY_TIMEOUT_MS", "0")]).unwrap_err();
        assert_eq!(
            err.setting, "http.webhook_body_timeout_ms (PROVISIONER_HTTP_WEBHOOK_BODY_TIMEOUT_MS)",
            "{err}"
        );
        let err = load(None, &[("PROVISIONER_HTTP_MAX_CONNECTION_AGE_MS", "soon")]).unwrap_err();
        assert_eq!(
            err.setting, "http.max_connection_age_ms (PROVISIONER_HTTP_MAX_CONNECTION_AGE_MS)",
            "{err}"
        );
    }

    #[test]
    fn the_deprecated_publish_timeout_name_still_works_and_leaves_a_note() {
        let s = load(None, &[]).unwrap();
        assert_eq!(s.broker.publish_timeout_ms, 5000);
        assert!(s.deprecations.is_empty(), "{:?}", s.deprecations);

        let s = load(Some("[http]\npublish_timeout_ms = 1000\n"), &[]).unwrap();
        assert_eq!(s.broker.publish_timeout_ms, 1000);
        assert_eq!(s.deprecations.len(), 1);
        assert!(s.deprecations[0].contains("http.publish_timeout_ms"));
        assert!(s.deprecations[0].contains("broker.publish_timeout_ms"));

        let both = "[http]\npublish_timeout_ms = 1000\n[broker]\npublish_timeout_ms = 2000\n";
        let s = load(Some(both), &[]).unwrap();
        assert_eq!(s.broker.publish_timeout_ms, 2000, "the new name wins");
        assert_eq!(s.deprecations.len(), 1);

        let err = load(Some("[http]\npublish_timeout_ms = 0\n"), &[]).unwrap_err();
        assert_eq!(err.setting, "broker.publish_timeout_ms");
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let s = load(
            None,
            &[
                ("CLERK_SECRET_KEY", "sk_live_hunter3"),
                ("PROVISIONER_API_TOKENS", "tok_hunter4"),
                ("PROVISIONER_OPS_TOKENS", "tok_hunter6"),
            ],
        )
        .unwrap();
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("hunter3") && !debug.contains("hunter4") && !debug.contains("hunter6"),
            "{debug}"
        );
        for (var, value) in [
            ("DATABASE_URL", "mysql://u:hunter5@db/x"),
            ("AMQP_URL", "http://u:hunter5@rabbit"),
            ("CLERK_WEBHOOK_SECRET", "whsec_hunter5!"),
        ] {
            let err = load(None, &[(var, value)]).unwrap_err();
            assert!(
                !format!("{err} {err:?}").contains("hunter5"),
                "{var}: {err}"
            );
        }
    }
}
