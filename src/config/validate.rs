//! Validation of loaded settings: what the types alone cannot check.
//!
//! Guarantee: [`Settings::validate`] returns the first bad setting as one
//! [`ConfigError`] naming it, never quoting a secret (URLs are shown redacted),
//! and refuses development secrets and tokens in production.

use std::collections::BTreeSet;

use super::{
    ConfigError, ConnectionUrl, DEVELOPMENT_API_TOKEN, DEVELOPMENT_OPS_TOKEN,
    DEVELOPMENT_WEBHOOK_SECRET, Environment, ProvisioningSettings, REQUIRED_QUOTAS, Settings,
    guard,
};

impl Settings {
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
