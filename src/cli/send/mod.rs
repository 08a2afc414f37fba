//! `provisioner send`: sign a Clerk-shaped event with the first configured secret and
//! POST it to a receiver (like `stripe trigger`), or play a canned scenario and show
//! the workspace it leaves behind.
//!
//! Guarantee: what is signed is exactly what is sent (a `--file` goes byte for byte),
//! and the command succeeds only on a 2xx answer — for a scenario, only once the read
//! API shows every event processed and the workspace in the expected state.

pub mod scenario;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::clerk::sample as payload;
use crate::config::{Settings, redact_url};
use crate::intake::Verifier;
pub use scenario::Scenario;

/// Arguments of `send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Event type, e.g. organization.created (optional with --file; not with --scenario).
    #[arg(
        value_name = "EVENT_TYPE",
        required_unless_present_any = ["scenario", "file"],
        conflicts_with = "scenario"
    )]
    pub event_type: Option<String>,
    /// Organization id (default: a fresh `org_…`).
    #[arg(long, value_name = "ID")]
    pub org: Option<String>,
    /// Organization name (default: derived from the organization id). Membership
    /// events embed the organization as of now only when this is given; otherwise
    /// with an old version, so they never rename a known workspace.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// User id of the member or creator (default: a fresh `user_…`).
    #[arg(long, value_name = "ID")]
    pub user: Option<String>,
    /// Clerk role of the membership (default: org:member).
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,
    /// Send this file's bytes unchanged as the body instead of building one.
    #[arg(long, value_name = "PAYLOAD.json", conflicts_with = "scenario")]
    pub file: Option<PathBuf>,
    /// Receiver (default: http://<http.listen>/webhooks/clerk).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Svix id (default: a fresh `msg_…`); resend one to see deduplication.
    #[arg(long = "id", value_name = "SVIX_ID", conflicts_with = "scenario")]
    pub id: Option<String>,
    /// Play a canned, signed sequence and print the resulting workspace.
    #[arg(long, value_enum, value_name = "NAME")]
    pub scenario: Option<Scenario>,
    /// How long a scenario waits for the worker (seconds).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

impl SendArgs {
    /// Arguments for sending one event of `kind` with defaults for the rest.
    pub fn event(kind: &str) -> Self {
        Self {
            event_type: Some(kind.to_owned()),
            org: None,
            name: None,
            user: None,
            role: None,
            file: None,
            url: None,
            id: None,
            scenario: None,
            timeout: 30,
            json: false,
        }
    }
}

/// Errors of `send`; each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No secret to sign with.
    #[error("no webhook secret to sign with (set CLERK_WEBHOOK_SECRET)")]
    NoSecret,
    /// The arguments do not make sense together.
    #[error("{0}")]
    Args(String),
    /// `--file` unreadable.
    #[error("cannot read {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The receiver or read API could not be reached.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// Redacted URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The receiver answered non-2xx.
    #[error("the receiver answered {status}: {body}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Response body (one line).
        body: String,
    },
    /// The read API failed.
    #[error("read API: {0}")]
    Api(String),
    /// The worker did not process every event in time.
    #[error(
        "timed out after {waited_secs} s waiting for the worker: {processed} of {total} events processed (is a worker running?)"
    )]
    Timeout {
        /// Seconds waited.
        waited_secs: u64,
        /// Events the read API knows.
        processed: usize,
        /// Events sent.
        total: usize,
    },
    /// The workspace is not in the state the scenario should leave.
    #[error("the {scenario} scenario left an unexpected workspace: {}", .differences.join("; "))]
    Mismatch {
        /// Scenario name.
        scenario: &'static str,
        /// What differs.
        differences: Vec<String>,
    },
}

/// The answer to one signed POST.
#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    /// Svix id.
    pub id: String,
    /// Event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Receiver URL.
    pub url: String,
    /// HTTP status.
    pub status: u16,
    /// Response body (JSON when it parses).
    pub response: Value,
}

impl Sent {
    /// Whether the receiver accepted it (2xx).
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The default receiver: `http://<http.listen>/webhooks/clerk` (an unspecified
/// listen address is reached on loopback).
pub fn default_url(settings: &Settings) -> String {
    let mut addr = settings.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}/webhooks/clerk")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn one_line(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 300 {
        format!("{}…", flat.chars().take(300).collect::<String>())
    } else {
        flat
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default()
}

/// Signs `body` with the first configured secret and POSTs it to `url`.
pub async fn post_signed(
    settings: &Settings,
    client: &reqwest::Client,
    url: &str,
    svix_id: &str,
    kind: &str,
    body: &[u8],
) -> Result<Sent, SendError> {
    let timestamp = chrono::Utc::now().timestamp();
    let signature = Verifier::new(&settings.clerk.webhook_secrets)
        .sign(svix_id, timestamp, body)
        .ok_or(SendError::NoSecret)?;
    let res = client
        .post(url)
        .header("svix-id", svix_id)
        .header("svix-timestamp", timestamp.to_string())
        .header("svix-signature", signature)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("provisioner-send/", env!("CARGO_PKG_VERSION")),
        )
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| SendError::Unreachable {
            url: redact_url(url),
            reason: error_chain(&e),
        })?;
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    Ok(Sent {
        id: svix_id.to_owned(),
        kind: kind.to_owned(),
        url: redact_url(url),
        status,
        response: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    })
}

/// Builds (or reads) the body of a single `send` and returns (type, body).
pub fn build_body(settings: &Settings, args: &SendArgs) -> Result<(String, Vec<u8>), SendError> {
    if let Some(path) = &args.file {
        let body = std::fs::read(path).map_err(|e| SendError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let in_file = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned));
        let kind = match (&args.event_type, in_file) {
            (Some(arg), Some(file)) if arg != &file => {
                return Err(SendError::Args(format!(
                    "{} is a {file} event but EVENT_TYPE says {arg}",
                    path.display()
                )));
            }
            (Some(arg), _) => arg.clone(),
            (None, Some(file)) => file,
            // Sent anyway: a body without a type is a good test of intake's 400.
            (None, None) => "unknown".to_owned(),
        };
        return Ok((kind, body));
    }
    let kind = args
        .event_type
        .clone()
        .ok_or_else(|| SendError::Args("give an EVENT_TYPE, --file or --scenario".into()))?;
    let org_id = args.org.clone().unwrap_or_else(|| payload::fresh_id("org"));
    let now = now_ms();
    let spec = payload::EventSpec {
        kind: kind.clone(),
        org_name: args
            .name
            .clone()
            .unwrap_or_else(|| payload::default_org_name(&org_id)),
        org_id,
        user_id: args
            .user
            .clone()
            .unwrap_or_else(|| payload::fresh_id("user")),
        role: args.role.clone().unwrap_or_else(|| "org:member".to_owned()),
        embedded_org_version: if args.name.is_some() {
            now
        } else {
            payload::UNKNOWN_ORG_VERSION
        },
        now_ms: now,
        instance_id: instance_id(settings),
    };
    let body = serde_json::to_vec(&payload::event(&spec)).unwrap_or_default();
    Ok((kind, body))
}

fn instance_id(settings: &Settings) -> String {
    settings
        .clerk
        .instance_id
        .clone()
        .unwrap_or_else(|| payload::DEVELOPMENT_INSTANCE_ID.to_owned())
}

/// Sends one event as `args` describe; returns the receiver's answer (any status).
pub async fn send(settings: &Settings, args: &SendArgs) -> Result<Sent, SendError> {
    let (kind, body) = build_body(settings, args)?;
    let url = args.url.clone().unwrap_or_else(|| default_url(settings));
    let id = args.id.clone().unwrap_or_else(|| payload::fresh_id("msg"));
    post_signed(settings, &client(), &url, &id, &kind, &body).await
}

/// What a scenario did and found.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// Scenario name.
    pub scenario: Scenario,
    /// The workspace.
    pub org_id: String,
    /// Every delivery, in order.
    pub sent: Vec<Sent>,
    /// `GET /v1/workspaces/{id}` (null when 404).
    pub workspace: Value,
    /// `GET /v1/workspaces/{id}/members`.
    pub members: Value,
    /// What the scenario should leave.
    pub expected: scenario::Expected,
    /// What differs from it (empty when it matches).
    pub differences: Vec<String>,
}

async fn api_get(
    client: &reqwest::Client,
    token: &str,
    url: &str,
) -> Result<(u16, Value), SendError> {
    let res = client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| SendError::Unreachable {
            url: redact_url(url),
            reason: error_chain(&e),
        })?;
    let status = res.status().as_u16();
    if status == 401 || status == 403 {
        return Err(SendError::Api(format!(
            "{} answered {status}: check PROVISIONER_API_TOKENS",
            redact_url(url)
        )));
    }
    let body = res.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// Plays a scenario against the receiver at `url`, waits (up to `timeout`) until the
/// read API at the same origin knows every event, and reads the workspace back.
pub async fn run_scenario(
    settings: &Settings,
    which: Scenario,
    org: Option<String>,
    url: &str,
    timeout: Duration,
) -> Result<ScenarioReport, SendError> {
    let org_id = org.unwrap_or_else(|| payload::fresh_id("org"));
    let plan = scenario::plan(
        which,
        &org_id,
        &instance_id(settings),
        now_ms(),
        &settings.provisioning,
    );
    let client = client();
    let mut sent = Vec::with_capacity(plan.steps.len());
    for step in &plan.steps {
        let answer = post_signed(
            settings,
            &client,
            url,
            &step.svix_id,
            &step.kind,
            &step.body,
        )
        .await?;
        if !answer.accepted() {
            return Err(SendError::Rejected {
                status: answer.status,
                body: one_line(&answer.response.to_string()),
            });
        }
        sent.push(answer);
    }

    let origin = url::Url::parse(url)
        .map(|u| u.origin().ascii_serialization())
        .map_err(|e| SendError::Args(format!("--url: {e}")))?;
    let token = settings
        .api
        .tokens
        .first()
        .ok_or_else(|| SendError::Api("no API token configured (PROVISIONER_API_TOKENS)".into()))?
        .expose()
        .to_owned();

    // Done when the processing log (GET /v1/events/{id}) has every svix id.
    let mut pending: Vec<&str> = plan.steps.iter().map(|s| s.svix_id.as_str()).collect();
    pending.sort_unstable();
    pending.dedup();
    let total = pending.len();
    let started = tokio::time::Instant::now();
    loop {
        let mut still = Vec::new();
        for id in pending {
            let (status, _) = api_get(&client, &token, &format!("{origin}/v1/events/{id}")).await?;
            if status != 200 {
                still.push(id);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if started.elapsed() >= timeout {
            return Err(SendError::Timeout {
                waited_secs: timeout.as_secs(),
                processed: total - pending.len(),
                total,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (status, workspace) =
        api_get(&client, &token, &format!("{origin}/v1/workspaces/{org_id}")).await?;
    let workspace = if status == 200 {
        workspace
    } else {
        Value::Null
    };
    let (status, members) = api_get(
        &client,
        &token,
        &format!("{origin}/v1/workspaces/{org_id}/members"),
    )
    .await?;
    let members = if status == 200 { members } else { Value::Null };
    let differences = scenario::differences(&plan.expected, &workspace, &members);
    Ok(ScenarioReport {
        scenario: which,
        org_id,
        sent,
        workspace,
        members,
        expected: plan.expected,
        differences,
    })
}

fn print_sent(sent: &Sent) {
    println!("{} {} -> {}", sent.kind, sent.id, sent.url);
    let reason = reqwest::StatusCode::from_u16(sent.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    println!("HTTP {} {reason}", sent.status);
    match &sent.response {
        Value::String(s) => println!("{s}"),
        other => println!("{other}"),
    }
}

/// Runs `send`.
pub async fn run(settings: &Settings, args: SendArgs) -> anyhow::Result<()> {
    let url = args.url.clone().unwrap_or_else(|| default_url(settings));
    if let Some(which) = args.scenario {
        let report = run_scenario(
            settings,
            which,
            args.org.clone(),
            &url,
            Duration::from_secs(args.timeout),
        )
        .await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            for s in &report.sent {
                println!("sent {:<32} {}  HTTP {}", s.kind, s.id, s.status);
            }
            println!("workspace {}:", report.org_id);
            println!("{}", serde_json::to_string_pretty(&report.workspace)?);
            println!("members:");
            println!("{}", serde_json::to_string_pretty(&report.members)?);
            if report.differences.is_empty() {
                println!(
                    "ok: the {} scenario converged to the expected state",
                    which.name()
                );
            }
        }
        if !report.differences.is_empty() {
            return Err(SendError::Mismatch {
                scenario: which.name(),
                differences: report.differences,
            }
            .into());
        }
        return Ok(());
    }

    let sent = send(settings, &args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&sent)?);
    } else {
        print_sent(&sent);
    }
    if !sent.accepted() {
        return Err(SendError::Rejected {
            status: sent.status,
            body: one_line(&match &sent.response {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
        }
        .into());
    }
    Ok(())
}
