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
}

impl HttpError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
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

    /// A database error: 503 when PostgreSQL is unreachable, else 500.
    pub fn database(cause: sqlx::Error) -> Self {
        match cause {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::warn!(error = %cause, "database unavailable");
                Self::unavailable("database_unavailable", "database unavailable", 5)
            }
            other => Self::internal(other),
        }
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
        response
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Database(e) => HttpError::database(e),
            StoreError::Unknown(e) => HttpError::internal(e),
        }
    }
}
