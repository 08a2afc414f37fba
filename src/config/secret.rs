//! Values that must never be printed: secrets, and connection URLs that may carry a
//! password.
//!
//! Guarantee: `Debug` and `Display` of these types never show the secret or the
//! password, in any form the URL parser accepts; only `expose()` hands it out, at the
//! one place that uses it.

use std::fmt;

use serde::Deserialize;

/// A configuration value that must never be printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
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

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
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
///
/// Any string deserializes: whether it is the right kind of URL depends on the
/// setting, so [`Settings::validate`](super::Settings::validate) checks it and names
/// that setting.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
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

    /// The addresses of a comma-separated list of URLs (see `split_url_list`),
    /// each its own `ConnectionUrl`; one element when the value is a single URL.
    pub fn addresses(&self) -> Vec<ConnectionUrl> {
        split_url_list(self.0.expose())
            .into_iter()
            .map(ConnectionUrl::new)
            .collect()
    }

    /// The URL with its password replaced by `***`, safe for logs and errors.
    pub fn redacted(&self) -> String {
        redact_url(self.0.expose())
    }

    /// `text` (say, a driver's error) with every password this URL carries, as
    /// written or percent-decoded, replaced by `***`: belt and braces for messages
    /// that have no reason to quote the URL but must never leak it.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in url_secrets(self.0.expose()) {
            out = out.replace(&secret, "***");
        }
        out
    }
}

impl From<String> for ConnectionUrl {
    fn from(url: String) -> Self {
        Self::new(url)
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

/// Whether a URL query parameter carries a secret, by its (decoded) name: sqlx takes
/// a password as `password=`, libpq-style URLs add `sslpassword=`, and a parameter
/// neither driver reads (lapin reads none) may still hold one, so every name that
/// speaks of a password, secret, token or credential is hidden.
pub fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token", "credential"]
        .iter()
        .any(|word| name.contains(word))
}

/// Splits a comma-separated list of URLs (`amqp://h1/v,amqp://h2/v`) into its
/// URLs, trimmed. A comma splits only where the text after it (spaces aside) starts
/// with a scheme and `://`, so a comma inside one URL (a password, a libpq host
/// list such as `postgres://h1,h2/db`) never does. One element for a single URL.
pub fn split_url_list(raw: &str) -> Vec<&str> {
    fn starts_with_scheme(text: &str) -> bool {
        let text = text.trim_start();
        let Some((scheme, _)) = text.split_once("://") else {
            return false;
        };
        let mut chars = scheme.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    }
    let mut parts = Vec::new();
    let mut start = 0;
    for (at, _) in raw.match_indices(',') {
        if starts_with_scheme(&raw[at + 1..]) {
            parts.push(raw[start..at].trim());
            start = at + 1;
        }
    }
    parts.push(raw[start..].trim());
    parts
}

/// Every password `raw` carries (userinfo, secret query parameters), as written and
/// decoded, longest first; empty ones left out. A list of URLs gives those of each.
fn url_secrets(raw: &str) -> Vec<String> {
    let parts = split_url_list(raw);
    if parts.len() > 1 {
        let mut secrets: Vec<String> = parts.into_iter().flat_map(url_secrets).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        return secrets;
    }
    let Ok(url) = url::Url::parse(raw) else {
        return vec![raw.to_owned()];
    };
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    let mut secrets = Vec::new();
    if let Some(p) = url.password() {
        secrets.push(p.to_owned());
        secrets.extend(decode(p));
    }
    for pair in url.query().unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(name).is_some_and(|n| is_secret_parameter(&n)) {
            secrets.push(value.to_owned());
            secrets.extend(decode(value));
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

/// The URL with every password it carries replaced by `***`: the userinfo password
/// (sqlx, lapin), the value of every secret query parameter
/// (`is_secret_parameter`: sqlx's `password=`, `sslpassword=`, …) and the
/// fragment (no driver reads one; there it is only a password's stray `#…`). A URL
/// that does not parse, or has no `//` authority (`amqp:user:pw@host`, whose "path"
/// lapin would quote), is hidden whole but for its scheme. A comma-separated list
/// of URLs (`split_url_list`) is redacted URL by URL.
pub fn redact_url(raw: &str) -> String {
    let parts = split_url_list(raw);
    if parts.len() > 1 {
        return parts
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    let Ok(mut url) = url::Url::parse(raw) else {
        return "[unparsable url]".to_owned();
    };
    if url.cannot_be_a_base() {
        return format!("{}:[redacted]", url.scheme());
    }
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    if url.query_pairs().any(|(k, _)| is_secret_parameter(&k)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_parameter(&k) {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    if url.fragment().is_some() {
        url.set_fragment(Some("***"));
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_secret_and_the_password() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?} {secret}").contains("hunter2"));
        let url = ConnectionUrl::new("amqp://user:hunter2@rabbit:5672/%2f");
        let shown = format!("{url:?} {url}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("rabbit"), "{shown}");
        assert_eq!(redact_url("not a url with hunter2"), "[unparsable url]");
    }

    #[test]
    fn every_password_form_the_drivers_accept_is_hidden() {
        for (raw, shown) in [
            // sqlx: userinfo, `password=` (also beside `user=`), and libpq's
            // `sslpassword=` (which sqlx does not read, so would log).
            (
                "postgres://u:hunter2@db:5432/app",
                "postgres://u:***@db:5432/app",
            ),
            (
                "postgres://u@db/app?password=hunter2",
                "postgres://u@db/app?password=***",
            ),
            (
                "postgres://db/app?sslmode=require&user=u&password=hunter2&application_name=x",
                "postgres://db/app?sslmode=require&user=u&password=***&application_name=x",
            ),
            (
                "postgres://db/app?sslpassword=hunter2",
                "postgres://db/app?sslpassword=***",
            ),
            // Percent-encoded names and values, and both forms at once.
            (
                "postgres://u:hunter2@db/app?pass%77ord=hunter2",
                "postgres://u:***@db/app?password=***",
            ),
            (
                "postgres://u@db/app?password=hun%26ter2",
                "postgres://u@db/app?password=***",
            ),
            // lapin: userinfo; a `password=` it ignores is hidden all the same.
            (
                "amqp://guest:hunter2@rabbit:5672/%2f?heartbeat=10",
                "amqp://guest:***@rabbit:5672/%2f?heartbeat=10",
            ),
            (
                "amqp://guest@rabbit/%2f?password=hunter2&heartbeat=10",
                "amqp://guest@rabbit/%2f?password=***&heartbeat=10",
            ),
            (
                "amqps://rabbit/v?auth_token=hunter2",
                "amqps://rabbit/v?auth_token=***",
            ),
            // A `#` in an unencoded password starts a fragment.
            (
                "postgres://u@db/app?password=hun#ter2",
                "postgres://u@db/app?password=***#***",
            ),
            // No authority: lapin would quote the whole text in its error.
            ("amqp:guest:hunter2@rabbit", "amqp:[redacted]"),
            // A list of broker addresses: every one redacted.
            (
                "amqp://guest:hunter2@r1:5672/%2f, amqp://guest:hunter2@r2:5673/%2f,amqps://guest:hun%26ter2@r3/%2f",
                "amqp://guest:***@r1:5672/%2f,amqp://guest:***@r2:5673/%2f,amqps://guest:***@r3/%2f",
            ),
            // A comma inside a password does not split.
            (
                "amqp://guest:hun,ter2@rabbit/%2f",
                "amqp://guest:***@rabbit/%2f",
            ),
        ] {
            assert_eq!(redact_url(raw), shown, "{raw}");
            let error = format!("driver said: {raw} and {}", raw.replace("%26", "&"));
            let url = ConnectionUrl::new(raw);
            for printed in [format!("{url:?}"), url.to_string(), url.redacted()] {
                for part in ["hunter2", "hun", "ter2"] {
                    assert!(!printed.contains(part), "{raw} printed as {printed}");
                }
            }
            if !raw.contains('#') && !raw.starts_with("amqp:guest") {
                let scrubbed = url.scrub(&error);
                assert!(!scrubbed.contains("hunter2"), "{scrubbed}");
                assert!(!scrubbed.contains("hun&ter2"), "{scrubbed}");
            }
        }
    }

    #[test]
    fn a_url_list_splits_only_before_a_scheme() {
        assert_eq!(
            split_url_list("amqp://a/v, amqps://b/v ,amqp://c/v"),
            vec!["amqp://a/v", "amqps://b/v", "amqp://c/v"]
        );
        assert_eq!(split_url_list("amqp://u:p,q@a/v"), vec!["amqp://u:p,q@a/v"]);
        assert_eq!(
            split_url_list("postgres://h1,h2/db"),
            vec!["postgres://h1,h2/db"]
        );
        assert_eq!(split_url_list("amqp://a/v,"), vec!["amqp://a/v,"]);
        let url = ConnectionUrl::new("amqp://a/v,amqp://b/v");
        let addresses: Vec<String> = url
            .addresses()
            .iter()
            .map(|u| u.expose().to_owned())
            .collect();
        assert_eq!(addresses, vec!["amqp://a/v", "amqp://b/v"]);
    }
}
