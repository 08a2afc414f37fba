//! Clerk's Backend API: the reads reconciliation needs (organizations, one
//! organization, memberships, the key's instance), paced and retried.
//!
//! Guarantee: every call of one process shares one token bucket
//! (`[reconcile] requests_per_second`), and a `429` pauses them all for its
//! `Retry-After`; 5xx answers and connection errors are retried with backoff, a
//! bounded number of times; `401`/`403` stops at once. The secret key is sent only
//! in the `Authorization` header: it is never part of an error, a log line or
//! `Debug`. When `CLERK_INSTANCE_ID` is set, [`ClerkApi::check_instance`] asks
//! once per process which instance the key belongs to and refuses a key of
//! another one (whose 404s would say every organization is gone).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Deserialize;
use serde_json::Value;
use url::Url;

use crate::config::{ClerkSettings, ReconcileSettings, Secret, redact_url};

mod bucket;

use bucket::TokenBucket;

/// The Backend API version every request asks for (`Clerk-API-Version`).
pub const API_VERSION: &str = "2026-05-12";

/// The largest page the list endpoints serve.
pub const PAGE_LIMIT: u32 = 500;

/// The most ids one filter of a list endpoint accepts (`user_id`,
/// `organization_id`: "Accepts up to 100").
pub const FILTER_LIMIT: usize = 100;

/// How many times a `429` is waited out for one call before it fails.
const MAX_RATE_LIMITED: u32 = 10;
/// The longest `Retry-After` honoured; a longer one is waited in this many seconds.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What went wrong talking to Clerk, in one line.
#[derive(Debug, thiserror::Error)]
pub enum ClerkError {
    /// No `CLERK_SECRET_KEY` is configured.
    #[error("CLERK_SECRET_KEY is not set: reconciling needs Clerk's Backend API")]
    NotConfigured,
    /// `401`/`403`: the key is wrong, revoked or of another instance.
    #[error("CLERK_SECRET_KEY was refused ({0})")]
    Refused(String),
    /// Clerk answered with an error that retrying does not fix.
    #[error("Clerk answered {status} to GET {path}: {detail}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Request path.
        path: String,
        /// Clerk's error codes and messages, and its trace id.
        detail: String,
    },
    /// Clerk could not be reached, or kept failing, within the retries.
    #[error("Clerk is unavailable at {base} (GET {path}): {reason}")]
    Unavailable {
        /// Base URL (no secret in it).
        base: String,
        /// Request path.
        path: String,
        /// The last failure.
        reason: String,
    },
    /// `CLERK_SECRET_KEY` belongs to another instance than `CLERK_INSTANCE_ID`.
    #[error(
        "CLERK_SECRET_KEY belongs to Clerk instance {actual}, not to CLERK_INSTANCE_ID {expected}: \
         refusing to reconcile (a key of another instance answers 404 for every organization)"
    )]
    WrongInstance {
        /// `CLERK_INSTANCE_ID`.
        expected: String,
        /// The key's instance, as `GET /v1/instance` answers it.
        actual: String,
    },
    /// The answer was not the documented shape.
    #[error("Clerk's answer to GET {path} could not be read: {reason}")]
    Decode {
        /// Request path.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// One page of a list endpoint: `{"data": [...], "total_count": N}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Page {
    /// The objects, in the webhook's schema.
    pub data: Vec<Value>,
    /// How many there are in all (may change during a scan).
    pub total_count: u64,
}

/// Which memberships to list.
#[derive(Debug, Clone, Copy)]
pub enum Memberships<'a> {
    /// Every membership of the instance (`GET /v1/organization_memberships`).
    All,
    /// One organization's (`GET /v1/organizations/{id}/memberships`).
    Of(&'a str),
}

/// A client of Clerk's Backend API. Cheap to clone; clones share the rate limit.
#[derive(Clone)]
pub struct ClerkApi {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    /// `base` as errors and `Debug` show it: no user-info, secret parameters
    /// redacted (the settings refuse such a URL; this is the second guard).
    shown: String,
    key: Secret,
    bucket: TokenBucket,
    backoff: ExponentialBuilder,
    /// `CLERK_INSTANCE_ID`, when set.
    instance_id: Option<String>,
    /// What `GET /v1/instance` answered, asked once per process.
    key_instance: tokio::sync::OnceCell<KeyInstance>,
}

/// Which instance the secret key belongs to.
#[derive(Debug, Clone)]
enum KeyInstance {
    /// The configured one.
    Configured,
    /// Another one.
    Other(String),
    /// Clerk does not say (`GET /v1/instance` answered 404).
    Unknown,
}

impl fmt::Debug for ClerkApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClerkApi")
            .field("base", &self.inner.shown)
            .field("key", &self.inner.key)
            .field("requests_per_second", &self.inner.bucket.rate)
            .finish()
    }
}

impl ClerkApi {
    /// A client for the configured instance; [`ClerkError::NotConfigured`] without
    /// a secret key.
    pub fn new(clerk: &ClerkSettings, reconcile: &ReconcileSettings) -> Result<Self, ClerkError> {
        let key = clerk.secret_key.clone().ok_or(ClerkError::NotConfigured)?;
        let base = Url::parse(clerk.api_url.trim_end_matches('/')).map_err(|e| {
            ClerkError::Unavailable {
                base: redact_url(&clerk.api_url),
                path: String::new(),
                reason: format!("CLERK_API_URL is not a URL: {e}"),
            }
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("callmine-provisioner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClerkError::Unavailable {
                base: shown(&base),
                path: String::new(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                shown: shown(&base),
                base,
                key,
                bucket: TokenBucket::new(reconcile.requests_per_second),
                backoff: ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(500))
                    .with_factor(1.5)
                    .with_max_delay(Duration::from_secs(30))
                    .with_max_times(5)
                    .with_jitter(),
                instance_id: clerk.instance_id.clone(),
                key_instance: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// When `CLERK_INSTANCE_ID` is set, checks that the secret key belongs to that
    /// instance (`GET /v1/instance`, asked once per process; the answer is kept,
    /// a failure to ask is not): [`ClerkError::WrongInstance`] otherwise. Every
    /// repair path calls it first, since a key of another instance (staging's,
    /// deployed with production's instance id) answers 404 for every
    /// organization. A Backend API that does not know `/v1/instance` (404) cannot
    /// tell: that is logged once and not held against the key.
    pub async fn check_instance(&self) -> Result<(), ClerkError> {
        let Some(expected) = &self.inner.instance_id else {
            return Ok(());
        };
        let answer = self
            .inner
            .key_instance
            .get_or_try_init(|| async {
                let path = ["instance"];
                let Some(value) = self.get(&path, &[]).await? else {
                    tracing::warn!(
                        instance_id = %expected,
                        "Clerk's Backend API has no GET /v1/instance: the instance of CLERK_SECRET_KEY cannot be checked against CLERK_INSTANCE_ID"
                    );
                    return Ok(KeyInstance::Unknown);
                };
                match value["id"].as_str() {
                    Some(id) if id == expected => Ok(KeyInstance::Configured),
                    Some(id) => Ok(KeyInstance::Other(id.to_owned())),
                    None => Err(ClerkError::Decode {
                        path: "/v1/instance".into(),
                        reason: "expected {\"id\": \"ins_…\"}".into(),
                    }),
                }
            })
            .await?;
        match answer {
            KeyInstance::Other(actual) => Err(ClerkError::WrongInstance {
                expected: expected.clone(),
                actual: actual.clone(),
            }),
            KeyInstance::Configured | KeyInstance::Unknown => Ok(()),
        }
    }

    /// One page of organizations, oldest first (`order_by=+created_at`, so an
    /// organization created during a scan lands at the end, not in a page read).
    pub async fn organizations(&self, offset: u64, limit: u32) -> Result<Page, ClerkError> {
        let path = ["organizations"];
        let page = self.get(&path, &list_query(offset, limit)).await?;
        let value = page.ok_or_else(|| not_found(&path))?;
        decode(&path, value)
    }

    /// One organization; `None` when Clerk answers 404 (it does not exist, or no
    /// longer does).
    pub async fn organization(&self, id: &str) -> Result<Option<Value>, ClerkError> {
        self.get(&["organizations", id], &[]).await
    }

    /// One page of memberships, oldest first. `None` when the organization of
    /// [`Memberships::Of`] does not exist.
    pub async fn memberships(
        &self,
        which: Memberships<'_>,
        offset: u64,
        limit: u32,
    ) -> Result<Option<Page>, ClerkError> {
        let query = list_query(offset, limit);
        match which {
            Memberships::All => {
                let path = ["organization_memberships"];
                let value = self.get(&path, &query).await?;
                decode(&path, value.ok_or_else(|| not_found(&path))?).map(Some)
            }
            Memberships::Of(org) => {
                let path = ["organizations", org, "memberships"];
                match self.get(&path, &query).await? {
                    Some(value) => decode(&path, value).map(Some),
                    None => Ok(None),
                }
            }
        }
    }

    /// The organizations among `ids` that Clerk lists (`GET /v1/organizations`
    /// filtered by `organization_id`, [`FILTER_LIMIT`] ids a call): a complete
    /// listing of those ids, to tell an organization that is gone from one a GET
    /// could not find.
    pub async fn organizations_with_ids(&self, ids: &[&str]) -> Result<Vec<Value>, ClerkError> {
        let path = ["organizations"];
        let mut found = Vec::new();
        for chunk in ids.chunks(FILTER_LIMIT) {
            let mut query: Vec<(&str, String)> = list_query(0, PAGE_LIMIT).into();
            query.extend(chunk.iter().map(|id| ("organization_id", (*id).to_owned())));
            let value = self.get(&path, &query).await?;
            let page = decode(&path, value.ok_or_else(|| not_found(&path))?)?;
            found.extend(page.data);
        }
        Ok(found)
    }

    /// The memberships of `organization` held by any of `user_ids` (`GET
    /// /v1/organizations/{id}/memberships` filtered by `user_id`, [`FILTER_LIMIT`]
    /// users a call): asked of each membership a listing by offset did not show,
    /// before it is taken as gone. `None` when the organization does not exist.
    pub async fn memberships_of_users(
        &self,
        organization: &str,
        user_ids: &[&str],
    ) -> Result<Option<Vec<Value>>, ClerkError> {
        let path = ["organizations", organization, "memberships"];
        let mut found = Vec::new();
        for chunk in user_ids.chunks(FILTER_LIMIT) {
            // A user holds at most one membership of an organization, so one page
            // holds the answer; more pages are read if Clerk says otherwise.
            let mut offset = 0u64;
            loop {
                let mut query: Vec<(&str, String)> = list_query(offset, PAGE_LIMIT).into();
                query.extend(chunk.iter().map(|id| ("user_id", (*id).to_owned())));
                let Some(value) = self.get(&path, &query).await? else {
                    return Ok(None);
                };
                let page = decode(&path, value)?;
                offset += page.data.len() as u64;
                let done = page.data.is_empty() || offset >= page.total_count;
                found.extend(page.data);
                if done {
                    break;
                }
            }
        }
        Ok(Some(found))
    }

    /// GET `/v1/<segments>?<query>`: the JSON answer, `None` on 404.
    async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Option<Value>, ClerkError> {
        let inner = &*self.inner;
        let mut url = inner.base.clone();
        url.path_segments_mut()
            .map_err(|()| ClerkError::Unavailable {
                base: inner.shown.clone(),
                path: String::new(),
                reason: "CLERK_API_URL cannot carry a path".into(),
            })?
            .pop_if_empty()
            .push("v1")
            .extend(segments);
        let path = url.path().to_owned();
        let mut backoff = inner.backoff.build();
        let mut rate_limited = 0;
        loop {
            inner.bucket.acquire().await;
            let sent = inner
                .http
                .get(url.clone())
                .query(query)
                .bearer_auth(inner.key.expose())
                .header("Clerk-API-Version", API_VERSION)
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await;
            let failure = match sent {
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() {
                        let body = response
                            .bytes()
                            .await
                            .map_err(|e| ClerkError::Unavailable {
                                base: inner.shown.clone(),
                                path: path.clone(),
                                reason: format!("reading the answer: {}", without_url(&e)),
                            })?;
                        return serde_json::from_slice(&body).map(Some).map_err(|e| {
                            ClerkError::Decode {
                                path: path.clone(),
                                reason: e.to_string(),
                            }
                        });
                    }
                    let retry_after = retry_after(response.headers());
                    let body = response.bytes().await.unwrap_or_default();
                    let detail = describe(&body);
                    match status.as_u16() {
                        404 => return Ok(None),
                        401 | 403 => {
                            return Err(ClerkError::Refused(format!("{status}: {detail}")));
                        }
                        429 if rate_limited < MAX_RATE_LIMITED => {
                            rate_limited += 1;
                            let wait = retry_after.unwrap_or(Duration::from_secs(1));
                            tracing::warn!(path = %path, wait_s = wait.as_secs_f64(), "Clerk rate limit hit; pausing every Backend API call");
                            inner.bucket.pause(wait).await;
                            continue;
                        }
                        s if s >= 500 || s == 429 => format!("{status}: {detail}"),
                        s => {
                            return Err(ClerkError::Api {
                                status: s,
                                path,
                                detail,
                            });
                        }
                    }
                }
                Err(e) => without_url(&e),
            };
            match backoff.next() {
                Some(delay) => {
                    tracing::warn!(path = %path, error = %failure, retry_in_ms = delay.as_millis() as u64, "Clerk request failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(ClerkError::Unavailable {
                        base: inner.shown.clone(),
                        path,
                        reason: failure,
                    });
                }
            }
        }
    }
}

/// A base URL as errors and `Debug` may show it: without user-info (a user name
/// alone may be a token) and redacted by [`redact_url`].
fn shown(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    redact_url(url.as_str())
}

fn list_query(offset: u64, limit: u32) -> [(&'static str, String); 3] {
    [
        ("limit", limit.clamp(1, PAGE_LIMIT).to_string()),
        ("offset", offset.to_string()),
        ("order_by", "+created_at".to_owned()),
    ]
}

fn not_found(path: &[&str]) -> ClerkError {
    ClerkError::Api {
        status: 404,
        path: format!("/v1/{}", path.join("/")),
        detail: "not found".into(),
    }
}

fn decode(path: &[&str], value: Value) -> Result<Page, ClerkError> {
    serde_json::from_value(value).map_err(|e| ClerkError::Decode {
        path: format!("/v1/{}", path.join("/")),
        reason: format!("expected {{\"data\": [...], \"total_count\": N}}: {e}"),
    })
}

/// A reqwest error without its URL (the URL holds no secret, but the path is
/// already in the message).
fn without_url(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(error);
    let mut causes = Vec::new();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    if causes.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {}", causes.join(": "))
    }
}

/// `Retry-After` in seconds (the form Clerk sends).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: f64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs).min(MAX_RETRY_AFTER))
}

/// Clerk's error body (`errors[].code`, `long_message`, `clerk_trace_id`) in one line.
pub fn describe(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<Error>,
        clerk_trace_id: Option<String>,
    }
    #[derive(Deserialize)]
    struct Error {
        code: Option<String>,
        message: Option<String>,
        long_message: Option<String>,
    }
    let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    match serde_json::from_slice::<Errors>(body) {
        Ok(parsed) if !parsed.errors.is_empty() => {
            let mut line = parsed
                .errors
                .iter()
                .map(|e| {
                    let text = e
                        .long_message
                        .as_deref()
                        .or(e.message.as_deref())
                        .unwrap_or("");
                    match &e.code {
                        Some(code) => format!("{code}: {}", one_line(text)),
                        None => one_line(text),
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            if let Some(trace) = parsed.clerk_trace_id {
                line.push_str(&format!(" (clerk_trace_id {trace})"));
            }
            line
        }
        _ => {
            let text = one_line(&String::from_utf8_lossy(body));
            if text.is_empty() {
                "no error body".to_owned()
            } else {
                text.chars().take(200).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests;
