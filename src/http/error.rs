//! The one HTTP error type.
//!
//! Policy: every failed request answers `{"error":{"code","message"}}` with a status
//! that tells the caller what to do (4xx: fix the request; 503: retry later). The
//! message is written for the caller and never carries internals or secrets; the
//! cause of a 5xx is logged once, here, where it is turned into a response.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::broker::PublishError;
use crate::http::api::auth::AuthError;
use crate::intake::VerifyError;
use crate::store::StoreError;

/// An HTTP error answer.
#[derive(Debug)]
pub struct HttpError {
    /// Status code.
    pub status: StatusCode,
    /// Stable machine-readable code (`missing_header`, `not_found`, …).
    pub code: &'static str,
    /// Human-readable message, safe to show.
    pub message: String,
    /// `Retry-After` seconds, for 503.
    pub retry_after: Option<u64>,
    /// `WWW-Authenticate` challenge, for 401 of the read API.
    pub challenge: Option<&'static str>,
}

impl HttpError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            challenge: None,
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 Unauthorized.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 404 Not Found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// 500; logs the cause once and answers without it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the service logs",
        )
    }

    /// A database error: 503 `database_unavailable` when PostgreSQL cannot answer
    /// now — unreachable, read-only, timed out ([`crate::db::is_unavailable`]) or a
    /// conflict ([`crate::db::is_transient`]) — so the caller retries; else 500.
    pub fn database(cause: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&cause) || crate::db::is_transient(&cause) {
            tracing::warn!(error = %cause, "database unavailable");
            Self::unavailable("database_unavailable", "database unavailable", 5)
        } else {
            Self::internal(cause)
        }
    }

    /// 503 for an event the broker did not take: the caller retries later.
    pub fn not_queued(e: &PublishError, retry_after: u64) -> Self {
        let message = match e {
            PublishError::Unavailable => "broker unavailable; retry later".to_owned(),
            PublishError::Blocked => {
                "broker blocks publishers (resource alarm); retry later".to_owned()
            }
            other => format!("event not queued ({}); retry later", other.reason()),
        };
        Self::unavailable("broker_unavailable", message, retry_after)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        let mut response = (self.status, body).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// A webhook that failed verification: 400 when the request is malformed, 401 when
/// it is not signed by a configured secret.
impl From<VerifyError> for HttpError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::MissingHeader(h) => Self::bad_request(
                "missing_header",
                format!("missing {h} header (or its webhook-* equivalent)"),
            ),
            VerifyError::NotUtf8 => Self::bad_request("invalid_payload", "body is not UTF-8 JSON"),
            VerifyError::Timestamp => Self::unauthorized(
                "invalid_timestamp",
                "timestamp is outside the 5-minute tolerance",
            ),
            VerifyError::Signature => {
                Self::unauthorized("invalid_signature", "signature does not match")
            }
        }
    }
}

/// A read API caller refused before its handler: 401 with a `Bearer` challenge,
/// or 400 for an unusable `X-Acting-User`.
impl From<AuthError> for HttpError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized => Self {
                challenge: Some("Bearer"),
                ..Self::unauthorized("unauthorized", e.to_string())
            },
            AuthError::BadActingUser => Self::bad_request("invalid_acting_user", e.to_string()),
        }
    }
}

/// A read or write of the store: 503 when PostgreSQL cannot answer now, else 500.
impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Database(e) => HttpError::database(e),
            StoreError::Unknown(e) => HttpError::internal(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_failures_are_400_when_malformed_and_401_when_unsigned() {
        let cases = [
            (VerifyError::MissingHeader("svix-id"), 400, "missing_header"),
            (VerifyError::NotUtf8, 400, "invalid_payload"),
            (VerifyError::Timestamp, 401, "invalid_timestamp"),
            (VerifyError::Signature, 401, "invalid_signature"),
        ];
        for (e, status, code) in cases {
            let h = HttpError::from(e);
            assert_eq!((h.status.as_u16(), h.code), (status, code));
        }
    }

    #[test]
    fn an_unauthenticated_caller_gets_a_bearer_challenge() {
        let r = HttpError::from(AuthError::Unauthorized).into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let r = HttpError::from(AuthError::BadActingUser).into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
