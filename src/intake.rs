//! `POST /webhooks/clerk`: verify, read the envelope, publish with confirm.
//!
//! Guarantee: nothing is read from a request before its Svix signature verifies;
//! 200 `queued` is answered only after the broker confirmed the unchanged body was
//! routed to a queue; every refusal queues nothing.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;
use svix::webhooks::{Webhook, WebhookError};

use crate::broker::PublishError;
use crate::clerk::is_handled;
use crate::config::Secret;
use crate::error::HttpError;
use crate::startup::AppState;

/// The intake routes.
pub fn router() -> Router<AppState> {
    Router::new().route(
        "/webhooks/clerk",
        post(receive).fallback(|| async {
            let mut r = HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use POST",
            )
            .into_response();
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            r
        }),
    )
}

/// Verifies Svix signatures against every configured secret (rotation).
pub struct Verifier {
    hooks: Vec<Webhook>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.hooks.len())
            .finish()
    }
}

/// Why a request failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A `svix-*`/`webhook-*` header is absent.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// Timestamp unparsable or outside ±5 minutes.
    #[error("timestamp missing, malformed or outside the 5-minute tolerance")]
    Timestamp,
    /// No signature matched any secret.
    #[error("no signature matches")]
    Signature,
    /// The body is not UTF-8, so it cannot be a signed Clerk event.
    #[error("body is not UTF-8")]
    NotUtf8,
}

const HEADER_PAIRS: [(&str, &str, &str); 3] = [
    ("svix-id", "webhook-id", "svix-id"),
    ("svix-timestamp", "webhook-timestamp", "svix-timestamp"),
    ("svix-signature", "webhook-signature", "svix-signature"),
];

impl Verifier {
    /// One verifier per configured secret; secrets were validated with the config.
    pub fn new(secrets: &[Secret]) -> Self {
        Self {
            hooks: secrets
                .iter()
                .filter_map(|s| Webhook::new(s.expose()).ok())
                .collect(),
        }
    }

    /// Ok when any secret verifies the body and headers within ±5 minutes.
    pub fn verify(&self, body: &[u8], headers: &HeaderMap) -> Result<(), VerifyError> {
        for (svix, unbranded, name) in HEADER_PAIRS {
            if !headers.contains_key(svix) && !headers.contains_key(unbranded) {
                return Err(VerifyError::MissingHeader(name));
            }
        }
        let mut worst = VerifyError::Signature;
        for hook in &self.hooks {
            match hook.verify(body, headers) {
                Ok(()) => return Ok(()),
                Err(WebhookError::InvalidPayload) => worst = VerifyError::NotUtf8,
                Err(
                    WebhookError::TimestampTooOldError
                    | WebhookError::FutureTimestampError
                    | WebhookError::InvalidTimestamp,
                ) => return Err(VerifyError::Timestamp),
                Err(WebhookError::MissingHeader(h)) => {
                    return Err(VerifyError::MissingHeader(h));
                }
                Err(_) => {}
            }
        }
        Err(worst)
    }

    /// Signs a body with the first secret (for `send` and tests).
    pub fn sign(&self, svix_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
        self.hooks.first()?.sign(svix_id, timestamp, body).ok()
    }
}

/// The only part of a Clerk event intake reads.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    /// Event type, e.g. `organization.created`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Clerk instance id.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Event data; intake only checks it is a JSON object.
    #[serde(borrow)]
    pub data: &'a RawValue,
}

impl<'a> Envelope<'a> {
    /// Parses the envelope; `data` must be an object.
    pub fn parse(body: &'a [u8]) -> Result<Self, String> {
        let env: Envelope<'a> = serde_json::from_slice(body).map_err(|e| {
            format!("body is not a Clerk event (JSON object with `type` and `data`): {e}")
        })?;
        if !env.data.get().trim_start().starts_with('{') {
            return Err("`data` must be a JSON object".to_owned());
        }
        Ok(env)
    }
}

fn svix_id(headers: &HeaderMap) -> String {
    headers
        .get("svix-id")
        .or_else(|| headers.get("webhook-id"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn outcome(outcome: &'static str) {
    metrics::counter!("webhooks_received_total", "outcome" => outcome).increment(1);
}

async fn read_body(body: Body, limit: usize, headers: &HeaderMap) -> Result<Bytes, HttpError> {
    let too_large = || {
        HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("body exceeds {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let is_limit = std::error::Error::source(&e)
            .map(|s| s.is::<http_body_util::LengthLimitError>())
            .unwrap_or(false)
            || e.to_string().contains("length limit");
        if is_limit {
            too_large()
        } else {
            HttpError::bad_request("unreadable_body", "could not read the request body")
        }
    })
}

async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let settings = &state.settings;
    let body = read_body(body, settings.http.max_body_bytes, &headers)
        .await
        .inspect_err(|_| outcome("too_large"))?;

    // Verify before anything in the body is looked at.
    state.verifier.verify(&body, &headers).map_err(|e| {
        match e {
            VerifyError::MissingHeader(h) => {
                outcome("missing_header");
                HttpError::bad_request("missing_header", format!("missing {h} header"))
            }
            VerifyError::NotUtf8 => {
                outcome("invalid_payload");
                HttpError::bad_request("invalid_payload", "body is not UTF-8 JSON")
            }
            VerifyError::Timestamp => {
                outcome("unauthorized");
                tracing::info!(svix.id = %svix_id(&headers), "webhook refused: timestamp outside tolerance");
                HttpError::unauthorized("invalid_timestamp", "timestamp is outside the 5-minute tolerance")
            }
            VerifyError::Signature => {
                outcome("unauthorized");
                tracing::info!(svix.id = %svix_id(&headers), "webhook refused: no signature matches");
                HttpError::unauthorized("invalid_signature", "signature does not match")
            }
        }
    })?;
    let id = svix_id(&headers);

    let envelope = Envelope::parse(&body).map_err(|message| {
        outcome("invalid_payload");
        HttpError::bad_request("invalid_payload", message)
    })?;

    if let (Some(expected), Some(actual)) = (&settings.clerk.instance_id, &envelope.instance_id)
        && expected != actual
    {
        outcome("wrong_instance");
        tracing::warn!(svix.id = %id, clerk.instance_id = %actual, "webhook refused: event of another Clerk instance");
        return Err(HttpError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong_instance",
            format!("event of instance {actual} refused; this service accepts {expected}"),
        ));
    }
    if settings.clerk.instance_id.is_some() && envelope.instance_id.is_none() {
        outcome("wrong_instance");
        return Err(HttpError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong_instance",
            "event has no instance_id; this service accepts one instance only",
        ));
    }

    if !is_handled(&envelope.kind) {
        outcome("ignored");
        tracing::debug!(svix.id = %id, event.type = %envelope.kind, "webhook ignored: type not handled");
        return Ok(Json(serde_json::json!({"status": "ignored", "id": id})).into_response());
    }

    let started = Instant::now();
    let result = state
        .publisher
        .publish_event(&body, &id, &envelope.kind)
        .await;
    metrics::histogram!("webhook_publish_seconds").record(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            outcome("queued");
            tracing::debug!(svix.id = %id, event.type = %envelope.kind, "webhook queued");
            Ok(Json(serde_json::json!({"status": "queued", "id": id})).into_response())
        }
        Err(e) => {
            metrics::counter!("amqp_publish_failures_total", "reason" => e.reason()).increment(1);
            outcome("unavailable");
            tracing::warn!(svix.id = %id, event.type = %envelope.kind, error = %e, "webhook not queued; answering 503");
            let message = match e {
                PublishError::Unavailable => "broker unavailable; retry later".to_owned(),
                other => format!("event not queued ({}); retry later", other.reason()),
            };
            Err(HttpError::unavailable(
                "broker_unavailable",
                message,
                settings.http.retry_after_secs,
            ))
        }
    }
}

/// Shared handle to the verifier.
pub type SharedVerifier = Arc<Verifier>;
