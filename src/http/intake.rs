//! `POST /webhooks/clerk`: verify, read the envelope, publish with confirm.
//!
//! Guarantee: nothing is read from a request before its Svix signature verifies;
//! 200 `queued` is answered only after the broker confirmed the unchanged body was
//! routed to a queue; every refusal queues nothing. A body that trickles holds no
//! `max_inflight_webhooks` slot (one is taken only once the body is in, for verify
//! and publish) and holds its connection no longer than the short webhook body
//! deadline, so clients without the secret cannot starve genuine deliveries. A
//! refused signature is logged at debug level only, and summed up in at most one
//! warning per [`REFUSAL_SUMMARY_INTERVAL`]: a flood of forged requests cannot
//! flood the log, nor write the ids it chose into it above debug.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use super::AppState;
use super::error::{ErrorCode, HttpError};
use super::server::{BodyTimeout, body_deadline};
use crate::broker::PublishError;
use crate::clerk::is_handled;
use crate::config::HttpSettings;
use crate::intake::{EventHead, VerifyError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// How often, at most, refused webhooks are summed up in one warning.
pub const REFUSAL_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Refused (unsigned, forged or stale) webhooks not yet summed up in a warning.
#[derive(Debug, Default)]
struct Refusals {
    unsigned: u64,
    signature: u64,
    timestamp: u64,
    /// A summary is due at the end of the current interval.
    scheduled: bool,
}

/// Counts refused webhooks and writes one warning per interval with their number;
/// one per application.
#[derive(Debug)]
pub struct RefusalLog {
    interval: Duration,
    pending: Mutex<Refusals>,
}

impl RefusalLog {
    /// A log that sums up every `interval`.
    pub fn new(interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            interval,
            pending: Mutex::new(Refusals::default()),
        })
    }

    fn count(self: &Arc<Self>, error: &VerifyError) {
        let schedule = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match error {
                VerifyError::MissingHeader(_) => p.unsigned += 1,
                VerifyError::Signature => p.signature += 1,
                VerifyError::Timestamp => p.timestamp += 1,
                VerifyError::NotUtf8 => return,
            }
            !std::mem::replace(&mut p.scheduled, true)
        };
        if schedule {
            // The first refusal of a quiet period opens an interval; its end writes
            // the one warning, with everything refused meanwhile.
            let log = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(log.interval).await;
                log.summarize();
            });
        }
    }

    fn summarize(&self) {
        let p = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let refused = p.unsigned + p.signature + p.timestamp;
        if refused > 0 {
            tracing::warn!(
                refused,
                unsigned = p.unsigned,
                bad_signature = p.signature,
                stale_timestamp = p.timestamp,
                interval_s = self.interval.as_secs(),
                "webhooks refused: not signed by a configured secret (see debug logs for each)"
            );
        }
    }
}

/// The `[http] max_inflight_webhooks` slots of one application: a webhook holds
/// one from the end of its body to its answer (verify and publish), never while
/// its body is still arriving, so clients that trickle bodies without the secret
/// cannot take them from genuine deliveries.
#[derive(Debug, Clone)]
struct Slots {
    free: Arc<Semaphore>,
    retry_after: u64,
}

impl Slots {
    /// A slot, or the 503 that Svix retries later.
    fn take(&self) -> Result<OwnedSemaphorePermit, HttpError> {
        self.free.clone().try_acquire_owned().map_err(|_| {
            outcome("overloaded");
            HttpError::unavailable(
                ErrorCode::Overloaded,
                "too many webhooks in flight; retry later",
                self.retry_after,
            )
        })
    }
}

/// The deadline of a webhook's body: `[http] webhook_body_timeout_ms`, or
/// `body_read_timeout_ms` when that is shorter (the application's deadline also
/// runs, and the earlier one would fire first).
pub fn webhook_body_timeout(http: &HttpSettings) -> Duration {
    Duration::from_millis(http.webhook_body_timeout_ms.min(http.body_read_timeout_ms))
}

/// The intake routes. A webhook's body must arrive within
/// [`webhook_body_timeout`] of its head (408 after it); at most `[http]
/// max_inflight_webhooks` webhooks are verified and published at once (`Slots`);
/// past it the answer is 503 with `Retry-After` at once, and Svix retries later.
pub fn router(http: &HttpSettings) -> Router<AppState> {
    // Every series at 0 from the start, so rate() and increase() see the first one.
    for o in OUTCOMES {
        outcome_by(o, 0);
    }
    for reason in PublishError::REASONS {
        metrics::counter!(PUBLISH_FAILURES_TOTAL, "reason" => reason).increment(0);
    }
    // Built once per application, so the count is its own.
    let refusals = RefusalLog::new(REFUSAL_SUMMARY_INTERVAL);
    let slots = Slots {
        free: Arc::new(Semaphore::new(http.max_inflight_webhooks)),
        retry_after: http.retry_after_secs,
    };
    let body_timeout = webhook_body_timeout(http);
    let deadline = middleware::from_fn(move |request: Request, next: Next| {
        body_deadline(body_timeout, request, next)
    });
    Router::new()
        .route(
            "/webhooks/clerk",
            post(receive).fallback(|| async {
                let mut r = HttpError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    ErrorCode::MethodNotAllowed,
                    "use POST",
                )
                .into_response();
                r.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
                r
            }),
        )
        .route_layer(deadline)
        .layer(Extension(refusals))
        .layer(Extension(slots))
}

fn svix_id(headers: &HeaderMap) -> String {
    headers
        .get("svix-id")
        .or_else(|| headers.get("webhook-id"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Webhooks by what intake did with them (`outcome`, one of [`OUTCOMES`]).
pub use crate::telemetry::series::RECEIVED_TOTAL;
/// Intake's publish to the broker's confirm or failure.
pub const PUBLISH_SECONDS: &str = "webhook_publish_seconds";
/// Intake publishes without a positive confirm, by `reason`.
pub const PUBLISH_FAILURES_TOTAL: &str = "amqp_publish_failures_total";

/// Every `outcome` of [`RECEIVED_TOTAL`].
pub const OUTCOMES: [&str; 10] = [
    "queued",
    "ignored",
    "missing_header",
    "unauthorized",
    "invalid_payload",
    "wrong_instance",
    "too_large",
    "body_timeout",
    "overloaded",
    "unavailable",
];

fn outcome(outcome: &'static str) {
    outcome_by(outcome, 1);
}

fn outcome_by(outcome: &'static str, n: u64) {
    metrics::counter!(RECEIVED_TOTAL, "outcome" => outcome).increment(n);
}

/// 408: the body did not arrive within [`webhook_body_timeout`] of the head.
fn body_timeout(timeout: Duration) -> HttpError {
    // hyper closes the connection after this answer: the body was not read to its end.
    HttpError::new(
        StatusCode::REQUEST_TIMEOUT,
        ErrorCode::BodyTimeout,
        format!(
            "request body not received within {} ms",
            timeout.as_millis()
        ),
    )
}

async fn read_body(
    body: Body,
    limit: usize,
    timeout: Duration,
    headers: &HeaderMap,
) -> Result<Bytes, HttpError> {
    let too_large = || {
        HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
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
        } else if BodyTimeout::caused(&e) {
            body_timeout(timeout)
        } else {
            HttpError::bad_request(ErrorCode::UnreadableBody, "could not read the request body")
        }
    })
}

/// A client-chosen header value as it may appear in a log line: cut short.
fn loggable(value: &str) -> &str {
    match value.char_indices().nth(64) {
        Some((end, _)) => &value[..end],
        None => value,
    }
}

async fn receive(
    State(state): State<AppState>,
    Extension(refusals): Extension<Arc<RefusalLog>>,
    Extension(slots): Extension<Slots>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let settings = &state.settings;
    let body = read_body(
        body,
        settings.http.max_body_bytes,
        webhook_body_timeout(&settings.http),
        &headers,
    )
    .await
    .inspect_err(|e| {
        outcome(if e.code == ErrorCode::BodyTimeout {
            "body_timeout"
        } else {
            "too_large"
        })
    })?;
    // Only now, with the whole body here: the slot bounds verify and publish.
    let _slot = slots.take()?;

    // Verify before anything in the body is looked at.
    state.verifier.verify(&body, &headers).map_err(|e| {
        // Anyone can send these, with any id: debug only, and counted for the
        // summary warning.
        let id = svix_id(&headers);
        match e {
            VerifyError::MissingHeader(_) => {
                outcome("missing_header");
                tracing::debug!(svix.id = %loggable(&id), "webhook refused: not signed");
            }
            VerifyError::NotUtf8 => outcome("invalid_payload"),
            VerifyError::Timestamp => {
                outcome("unauthorized");
                tracing::debug!(svix.id = %loggable(&id), "webhook refused: timestamp outside tolerance");
            }
            VerifyError::Signature => {
                outcome("unauthorized");
                tracing::debug!(svix.id = %loggable(&id), "webhook refused: no signature matches");
            }
        }
        refusals.count(&e);
        HttpError::from(e)
    })?;
    let id = svix_id(&headers);
    // From here on the request is an event's: every line carries its ids.
    let span = crate::event_span!(id);
    receive_verified(&state, &id, body).instrument(span).await
}

/// The rest of intake, once the signature verified: envelope, instance, publish.
async fn receive_verified(state: &AppState, id: &str, body: Bytes) -> Result<Response, HttpError> {
    let settings = &state.settings;
    let envelope = EventHead::parse(&body).map_err(|message| {
        outcome("invalid_payload");
        HttpError::bad_request(ErrorCode::InvalidPayload, message)
    })?;

    tracing::Span::current().record(crate::telemetry::EVENT_TYPE, envelope.kind.as_str());
    if let (Some(expected), Some(actual)) = (&settings.clerk.instance_id, &envelope.instance_id)
        && expected != actual
    {
        outcome("wrong_instance");
        tracing::warn!(clerk.instance_id = %actual, "webhook refused: event of another Clerk instance");
        return Err(HttpError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::WrongInstance,
            format!("event of instance {actual} refused; this service accepts {expected}"),
        ));
    }
    if settings.clerk.instance_id.is_some() && envelope.instance_id.is_none() {
        outcome("wrong_instance");
        return Err(HttpError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::WrongInstance,
            "event has no instance_id; this service accepts one instance only",
        ));
    }

    if !is_handled(&envelope.kind) {
        outcome("ignored");
        tracing::debug!("webhook ignored: type not handled");
        return Ok(Json(serde_json::json!({"status": "ignored", "id": id})).into_response());
    }

    let started = Instant::now();
    let result = state
        .publisher
        .publish_event(&body, id, &envelope.kind)
        .await;
    metrics::histogram!(PUBLISH_SECONDS).record(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            outcome("queued");
            tracing::debug!(
                publish_ms = started.elapsed().as_millis() as u64,
                "webhook queued"
            );
            Ok(Json(serde_json::json!({"status": "queued", "id": id})).into_response())
        }
        Err(e) => {
            metrics::counter!(PUBLISH_FAILURES_TOTAL, "reason" => e.reason()).increment(1);
            outcome("unavailable");
            tracing::warn!(error = %e, "webhook not queued; answering 503");
            Err(HttpError::not_queued(&e, settings.http.retry_after_secs))
        }
    }
}
