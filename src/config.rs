//! Configuration: `config/default.toml` (compiled in), an optional file named by
//! `PROVISIONER_CONFIG` merged over it, then environment variables.
//!
//! Guarantee: a [`Settings`] value is complete and validated — every bad or missing
//! setting fails [`Settings::load`] with one line naming the setting — and no secret
//! it holds can reach a log line through `Debug` or `Display`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

use crate::domain::Role;

/// The committed defaults, compiled into the binary so it runs from any directory.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// The development webhook secret of `config/default.toml`; refused in production.
pub const DEVELOPMENT_WEBHOOK_SECRET: &str = "whsec_Y2FsbG1pbmUtZGV2LXdlYmhvb2stc2VjcmV0LTAx";
/// The development read-API token of `config/default.toml`; refused in production.
pub const DEVELOPMENT_API_TOKEN: &str = "dev-token-callmine-provisioner";

/// Quota names every plan must define.
pub const REQUIRED_QUOTAS: [&str; 6] = [
    "seats",
    "analyses_per_month",
    "reports",
    "schedules",
    "retention_days",
    "gong_credentials",
];

/// A configuration value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A connection URL whose password is hidden from `Debug`/`Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionUrl(Secret);

impl ConnectionUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(Secret::new(url))
    }

    /// The full URL, password included; only for connecting.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with its password replaced by `***`, safe for logs and errors.
    pub fn redacted(&self) -> String {
        redact_url(self.0.expose())
    }
}

impl fmt::Debug for ConnectionUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for ConnectionUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of a URL with `***`; an unparsable URL is hidden whole.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "[unparsable url]".to_owned(),
    }
}

/// Deployment environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Local development and tests: development secrets allowed.
    Development,
    /// Real deployments: development secrets refused.
    Production,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Deployment environment.
    pub environment: Environment,
    /// HTTP listener and intake.
    pub http: HttpSettings,
    /// PostgreSQL.
    pub database: DatabaseSettings,
    /// RabbitMQ connection and topology names.
    pub broker: BrokerSettings,
    /// Clerk webhook verification and Backend API.
    pub clerk: ClerkSettings,
    /// Read API.
    pub api: ApiSettings,
    /// Worker tuning.
    pub worker: WorkerSettings,
    /// Plans, quotas, roles and onboarding.
    pub provisioning: ProvisioningSettings,
    /// Logging.
    pub log: LogSettings,
}

/// `[http]`
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Listener address.
    pub listen: SocketAddr,
    /// Largest accepted webhook body.
    pub max_body_bytes: usize,
    /// Wait for a publisher confirm before answering 503.
    pub publish_timeout_ms: u64,
    /// `Retry-After` seconds on a 503.
    pub retry_after_secs: u64,
    /// Drain time on SIGTERM.
    pub shutdown_grace_ms: u64,
}

/// `[database]`
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// Connection URL.
    pub url: ConnectionUrl,
    /// Pool size.
    pub max_connections: u32,
    /// Pool acquire timeout.
    pub acquire_timeout_ms: u64,
}

/// `[broker]`
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// AMQP URL.
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
    /// Confirm channels of the intake publisher: publishes in flight at once.
    pub publish_channels: usize,
}

/// `[clerk]`
#[derive(Debug, Clone)]
pub struct ClerkSettings {
    /// Accepted `whsec_` secrets; the first signs.
    pub webhook_secrets: Vec<Secret>,
    /// Only this instance's events are accepted, when set.
    pub instance_id: Option<String>,
    /// Backend API key for reconcile.
    pub secret_key: Option<Secret>,
    /// Backend API base URL.
    pub api_url: String,
}

/// `[api]`
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Accepted bearer tokens.
    pub tokens: Vec<Secret>,
}

/// `[worker]`
#[derive(Debug, Clone)]
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

/// `[provisioning]`, `[plans.*]`, `[roles]`
#[derive(Debug, Clone)]
pub struct ProvisioningSettings {
    /// Plan of a new workspace unless its metadata names another.
    pub default_plan: String,
    /// Plan name -> quota name -> limit.
    pub plans: BTreeMap<String, BTreeMap<String, i64>>,
    /// Clerk role key -> Callmine role.
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
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// `RUST_LOG`-style filter.
    pub filter: String,
    /// Output format.
    pub format: LogFormat,
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
}

// ---- raw file shape ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    environment: Environment,
    http: RawHttp,
    database: RawDatabase,
    broker: RawBroker,
    clerk: RawClerk,
    api: RawApi,
    worker: RawWorker,
    provisioning: RawProvisioning,
    plans: BTreeMap<String, BTreeMap<String, i64>>,
    #[serde(default)]
    roles: BTreeMap<String, Role>,
    log: RawLog,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: String,
    max_body_bytes: usize,
    publish_timeout_ms: u64,
    retry_after_secs: u64,
    shutdown_grace_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: String,
    max_connections: u32,
    acquire_timeout_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: String,
    exchange: String,
    queue: String,
    dead_letter_exchange: String,
    dead_letter_queue: String,
    retry_queue_prefix: String,
    delivery_limit: u32,
    queue_expires_ms: Option<u64>,
    publish_channels: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClerk {
    webhook_secrets: String,
    instance_id: Option<String>,
    secret_key: Option<String>,
    api_url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    tokens: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    concurrency: u16,
    batch_size: usize,
    batch_wait_ms: u64,
    retry_delays_ms: Vec<u64>,
    db_retry_max_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvisioning {
    default_plan: String,
    onboarding_steps: Vec<OnboardingStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    filter: String,
    format: LogFormat,
}

/// Merges `over` into `base`: tables recurse, except the `plans` and `roles` tables,
/// which `over` replaces whole so a deployment can drop a default plan.
fn merge(base: &mut toml::Table, over: toml::Table, depth: usize) {
    for (key, value) in over {
        let replace_whole = depth == 0 && (key == "plans" || key == "roles");
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) if !replace_whole => {
                merge(b, o, depth + 1)
            }
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

fn split_list(raw: &str) -> Vec<String> {
    raw.split([',', ' ', '\n', '\t'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

impl Settings {
    /// Loads from the process environment and `PROVISIONER_CONFIG`.
    pub fn load() -> Result<Self, ConfigError> {
        let file = match non_empty(std::env::var("PROVISIONER_CONFIG").ok()) {
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
        let mut table: toml::Table = toml::from_str(DEFAULT_CONFIG)
            .map_err(|e| ConfigError::new("config/default.toml", e.message().to_owned()))?;
        if let Some(text) = file {
            let over: toml::Table = toml::from_str(text)
                .map_err(|e| ConfigError::new("PROVISIONER_CONFIG", e.to_string()))?;
            merge(&mut table, over, 0);
        }
        let raw: RawSettings = RawSettings::deserialize(table)
            .map_err(|e| ConfigError::new("PROVISIONER_CONFIG", e.message().to_owned()))?;
        let env = |name: &str| non_empty(env(name));

        let environment = match env("PROVISIONER_ENV") {
            Some(v) => match v.as_str() {
                "development" => Environment::Development,
                "production" => Environment::Production,
                other => {
                    return Err(ConfigError::new(
                        "environment (PROVISIONER_ENV)",
                        format!("must be `development` or `production`, got `{other}`"),
                    ));
                }
            },
            None => raw.environment,
        };

        let listen_raw = env("PROVISIONER_LISTEN").unwrap_or(raw.http.listen);
        let listen = listen_raw.parse::<SocketAddr>().map_err(|_| {
            ConfigError::new(
                "http.listen (PROVISIONER_LISTEN)",
                format!("`{listen_raw}` is not an address like 127.0.0.1:8080"),
            )
        })?;
        if raw.http.max_body_bytes == 0 {
            return Err(ConfigError::new("http.max_body_bytes", "must be positive"));
        }
        if raw.http.publish_timeout_ms == 0 {
            return Err(ConfigError::new(
                "http.publish_timeout_ms",
                "must be positive",
            ));
        }

        let database_url = env("DATABASE_URL").unwrap_or(raw.database.url);
        match url::Url::parse(&database_url) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {}
            _ => {
                return Err(ConfigError::new(
                    "database.url (DATABASE_URL)",
                    format!("`{}` is not a postgres:// URL", redact_url(&database_url)),
                ));
            }
        }
        if raw.database.max_connections == 0 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be positive",
            ));
        }

        let amqp_url = env("AMQP_URL").unwrap_or(raw.broker.url);
        match url::Url::parse(&amqp_url) {
            Ok(u) if matches!(u.scheme(), "amqp" | "amqps") => {}
            _ => {
                return Err(ConfigError::new(
                    "broker.url (AMQP_URL)",
                    format!("`{}` is not an amqp:// URL", redact_url(&amqp_url)),
                ));
            }
        }
        for (name, value) in [
            ("broker.exchange", &raw.broker.exchange),
            ("broker.queue", &raw.broker.queue),
            (
                "broker.dead_letter_exchange",
                &raw.broker.dead_letter_exchange,
            ),
            ("broker.dead_letter_queue", &raw.broker.dead_letter_queue),
            ("broker.retry_queue_prefix", &raw.broker.retry_queue_prefix),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::new(name, "must not be empty"));
            }
        }
        if raw.broker.delivery_limit == 0 {
            return Err(ConfigError::new(
                "broker.delivery_limit",
                "must be positive",
            ));
        }
        if !(1..=1024).contains(&raw.broker.publish_channels) {
            return Err(ConfigError::new(
                "broker.publish_channels",
                "must be between 1 and 1024",
            ));
        }

        let secrets_raw = env("CLERK_WEBHOOK_SECRET").unwrap_or(raw.clerk.webhook_secrets);
        let webhook_secrets: Vec<Secret> = split_list(&secrets_raw)
            .into_iter()
            .map(Secret::new)
            .collect();
        if webhook_secrets.is_empty() {
            return Err(ConfigError::new(
                "clerk.webhook_secrets (CLERK_WEBHOOK_SECRET)",
                "at least one whsec_… secret is required",
            ));
        }
        for (i, secret) in webhook_secrets.iter().enumerate() {
            if !secret.expose().starts_with("whsec_")
                || svix::webhooks::Webhook::new(secret.expose()).is_err()
            {
                return Err(ConfigError::new(
                    "clerk.webhook_secrets (CLERK_WEBHOOK_SECRET)",
                    format!("secret #{} is not a valid whsec_… secret", i + 1),
                ));
            }
        }
        let instance_id = env("CLERK_INSTANCE_ID").or(non_empty(raw.clerk.instance_id));
        let secret_key = env("CLERK_SECRET_KEY")
            .or(non_empty(raw.clerk.secret_key))
            .map(Secret::new);
        let api_url = env("CLERK_API_URL").unwrap_or(raw.clerk.api_url);
        if url::Url::parse(&api_url).is_err() {
            return Err(ConfigError::new(
                "clerk.api_url (CLERK_API_URL)",
                format!("`{api_url}` is not a URL"),
            ));
        }

        let tokens_raw = env("PROVISIONER_API_TOKENS").unwrap_or(raw.api.tokens);
        let tokens: Vec<Secret> = tokens_raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .collect();
        if tokens.is_empty() {
            return Err(ConfigError::new(
                "api.tokens (PROVISIONER_API_TOKENS)",
                "at least one token is required",
            ));
        }

        if environment == Environment::Production {
            if webhook_secrets
                .iter()
                .any(|s| s.expose() == DEVELOPMENT_WEBHOOK_SECRET)
            {
                return Err(ConfigError::new(
                    "clerk.webhook_secrets (CLERK_WEBHOOK_SECRET)",
                    "the development secret is refused when PROVISIONER_ENV=production",
                ));
            }
            if tokens.iter().any(|t| t.expose() == DEVELOPMENT_API_TOKEN) {
                return Err(ConfigError::new(
                    "api.tokens (PROVISIONER_API_TOKENS)",
                    "the development token is refused when PROVISIONER_ENV=production",
                ));
            }
        }

        if raw.worker.concurrency == 0 {
            return Err(ConfigError::new("worker.concurrency", "must be positive"));
        }
        if raw.worker.batch_size == 0 {
            return Err(ConfigError::new("worker.batch_size", "must be positive"));
        }
        if raw.worker.retry_delays_ms.contains(&0) {
            return Err(ConfigError::new(
                "worker.retry_delays_ms",
                "delays must be positive",
            ));
        }

        if raw.plans.is_empty() {
            return Err(ConfigError::new(
                "plans",
                "at least one [plans.NAME] table is required",
            ));
        }
        for (plan, quotas) in &raw.plans {
            for quota in REQUIRED_QUOTAS {
                if !quotas.contains_key(quota) {
                    return Err(ConfigError::new(
                        format!("plans.{plan}.{quota}"),
                        "missing quota",
                    ));
                }
            }
            if let Some((name, _)) = quotas.iter().find(|(_, v)| **v < 0) {
                return Err(ConfigError::new(
                    format!("plans.{plan}.{name}"),
                    "quota limits must not be negative",
                ));
            }
        }
        if !raw.plans.contains_key(&raw.provisioning.default_plan) {
            return Err(ConfigError::new(
                "provisioning.default_plan",
                format!(
                    "`{}` is not one of the configured plans",
                    raw.provisioning.default_plan
                ),
            ));
        }
        if raw.provisioning.onboarding_steps.is_empty() {
            return Err(ConfigError::new(
                "provisioning.onboarding_steps",
                "at least one step is required",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for step in &raw.provisioning.onboarding_steps {
            if step.name.trim().is_empty() || !seen.insert(step.name.clone()) {
                return Err(ConfigError::new(
                    "provisioning.onboarding_steps",
                    format!("step names must be unique and non-empty (`{}`)", step.name),
                ));
            }
        }

        let filter = env("RUST_LOG").unwrap_or(raw.log.filter);
        let format = match env("LOG_FORMAT") {
            Some(v) => match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError::new(
                        "log.format (LOG_FORMAT)",
                        format!("must be `text` or `json`, got `{other}`"),
                    ));
                }
            },
            None => raw.log.format,
        };

        Ok(Settings {
            environment,
            http: HttpSettings {
                listen,
                max_body_bytes: raw.http.max_body_bytes,
                publish_timeout_ms: raw.http.publish_timeout_ms,
                retry_after_secs: raw.http.retry_after_secs,
                shutdown_grace_ms: raw.http.shutdown_grace_ms,
            },
            database: DatabaseSettings {
                url: ConnectionUrl::new(database_url),
                max_connections: raw.database.max_connections,
                acquire_timeout_ms: raw.database.acquire_timeout_ms,
            },
            broker: BrokerSettings {
                url: ConnectionUrl::new(amqp_url),
                exchange: raw.broker.exchange,
                queue: raw.broker.queue,
                dead_letter_exchange: raw.broker.dead_letter_exchange,
                dead_letter_queue: raw.broker.dead_letter_queue,
                retry_queue_prefix: raw.broker.retry_queue_prefix,
                delivery_limit: raw.broker.delivery_limit,
                queue_expires_ms: raw.broker.queue_expires_ms,
                publish_channels: raw.broker.publish_channels,
            },
            clerk: ClerkSettings {
                webhook_secrets,
                instance_id,
                secret_key,
                api_url,
            },
            api: ApiSettings { tokens },
            worker: WorkerSettings {
                concurrency: raw.worker.concurrency,
                batch_size: raw.worker.batch_size,
                batch_wait_ms: raw.worker.batch_wait_ms,
                retry_delays_ms: raw.worker.retry_delays_ms,
                db_retry_max_ms: raw.worker.db_retry_max_ms,
            },
            provisioning: ProvisioningSettings {
                default_plan: raw.provisioning.default_plan,
                plans: raw.plans,
                roles: raw.roles,
                onboarding_steps: raw.provisioning.onboarding_steps,
            },
            log: LogSettings { filter, format },
        })
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
                ("PROVISIONER_API_TOKENS", "prod-token"),
            ],
        )
        .unwrap();
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
        assert_eq!(s.worker.batch_size, 32);
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
}
