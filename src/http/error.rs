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
use crate::intake::VerifyError;
use crate::store::StoreError;

macro_rules! error_codes {
    ($($(#[$meta:meta])* $variant:ident = $text:literal,)+) => {
        /// The stable, machine-readable `code` of every JSON error answer, and the
        /// name the OpenAPI document gives each (through [`ErrorCode::describe`]):
        /// one spelling for the wire and the document.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode {
            $($(#[$meta])* $variant,)+
        }

        impl ErrorCode {
            /// Every code, in the order declared.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The code as it appears in `{"error":{"code":…}}`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }
    };
}

error_codes! {
        /// `body_timeout`.
        BodyTimeout = "body_timeout",
        /// `broker_unavailable`.
        BrokerUnavailable = "broker_unavailable",
        /// `clerk_misconfigured`.
        ClerkMisconfigured = "clerk_misconfigured",
        /// `clerk_unavailable`.
        ClerkUnavailable = "clerk_unavailable",
        /// `database_unavailable`.
        DatabaseUnavailable = "database_unavailable",
        /// `forbidden`.
        Forbidden = "forbidden",
        /// `internal`.
        Internal = "internal",
        /// `invalid_acting_user`.
        InvalidActingUser = "invalid_acting_user",
        /// `invalid_cursor`.
        InvalidCursor = "invalid_cursor",
        /// `invalid_json`.
        InvalidJson = "invalid_json",
        /// `invalid_limit`.
        InvalidLimit = "invalid_limit",
        /// `invalid_payload`.
        InvalidPayload = "invalid_payload",
        /// `invalid_query`.
        InvalidQuery = "invalid_query",
        /// `invalid_signature`.
        InvalidSignature = "invalid_signature",
        /// `invalid_status`.
        InvalidStatus = "invalid_status",
        /// `invalid_timestamp`.
        InvalidTimestamp = "invalid_timestamp",
        /// `method_not_allowed`.
        MethodNotAllowed = "method_not_allowed",
        /// `missing_header`.
        MissingHeader = "missing_header",
        /// `not_found`.
        NotFound = "not_found",
        /// `overloaded`.
        Overloaded = "overloaded",
        /// `payload_too_large`.
        PayloadTooLarge = "payload_too_large",
        /// `reconcile_not_configured`.
        ReconcileNotConfigured = "reconcile_not_configured",
        /// `step_required`.
        StepRequired = "step_required",
        /// `unauthorized`.
        Unauthorized = "unauthorized",
        /// `unreadable_body`.
        UnreadableBody = "unreadable_body",
        /// `workspace_deleted`.
        WorkspaceDeleted = "workspace_deleted",
        /// `wrong_instance`.
        WrongInstance = "wrong_instance",
}

impl ErrorCode {
    /// An OpenAPI response description naming this code: `` `code` `` then `rest`
    /// (e.g. `": missing or invalid bearer token"`).
    pub fn describe(self, rest: &str) -> String {
        format!("`{}`{rest}", self.as_str())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An HTTP error answer.
#[derive(Debug)]
pub struct HttpError {
    /// Status code.
    pub status: StatusCode,
    /// Stable machine-readable code (`missing_header`, `not_found`, …).
    pub code: ErrorCode,
    /// Human-readable message, safe to show.
    pub message: String,
    /// `Retry-After` seconds, for 503.
    pub retry_after: Option<u64>,
    /// `WWW-Authenticate` challenge, for 401 of the read API.
    pub challenge: Option<&'static str>,
}

impl HttpError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            challenge: None,
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401 Unauthorized.
    pub fn unauthorized(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 404 Not Found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(code: ErrorCode, message: impl Into<String>, retry_after: u64) -> Self {
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
            ErrorCode::Internal,
            "internal error; see the service logs",
        )
    }

    /// A database error: 503 `database_unavailable` when PostgreSQL cannot answer
    /// now — unreachable, read-only, timed out ([`crate::db::is_unavailable`]) or a
    /// conflict ([`crate::db::is_transient`]) — so the caller retries; else 500.
    pub fn database(cause: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&cause) || crate::db::is_transient(&cause) {
            tracing::warn!(error = %cause, "database unavailable");
            Self::unavailable(ErrorCode::DatabaseUnavailable, "database unavailable", 5)
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
        Self::unavailable(ErrorCode::BrokerUnavailable, message, retry_after)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code.as_str(), "message": self.message}}));
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
                ErrorCode::MissingHeader,
                format!("missing {h} header (or its webhook-* equivalent)"),
            ),
            VerifyError::NotUtf8 => {
                Self::bad_request(ErrorCode::InvalidPayload, "body is not UTF-8 JSON")
            }
            VerifyError::Timestamp => Self::unauthorized(
                ErrorCode::InvalidTimestamp,
                "timestamp is outside the 5-minute tolerance",
            ),
            VerifyError::Signature => {
                Self::unauthorized(ErrorCode::InvalidSignature, "signature does not match")
            }
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
            assert_eq!((h.status.as_u16(), h.code.as_str()), (status, code));
        }
    }
}
