//! The authenticated read API of DESIGN §6 for the main app.
//!
//! Guarantee: every `/v1` request — known route, unknown path or wrong method —
//! is authenticated first (401 `unauthorized` without a valid bearer token), and
//! with `X-Acting-User` there is no path from one workspace to another: a
//! workspace answers only to its active members while it is active, everything
//! else being the same 404 as an id that never existed (so existence does not
//! leak), and onboarding writes need the `admin` role (403 for a member).
//!
//! The OpenAPI 3 document is generated from the handlers' annotations and served
//! at `GET /v1/openapi.json`; like every `/v1` route it needs the bearer token.

pub mod access;
pub mod audit;
pub mod auth;
pub mod events;
pub mod extract;
pub mod model;
pub mod onboarding;
pub mod page;
pub mod workspaces;

use std::sync::LazyLock;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::AppState;
use crate::http::error::HttpError;
use auth::Caller;
use model::ErrorBody;

/// The `/v1` routes.
pub fn router() -> Router<AppState> {
    let v1 = Router::new()
        .route("/workspaces/{id}", get(workspaces::get_workspace))
        .route("/workspaces/{id}/members", get(workspaces::list_members))
        .route(
            "/workspaces/{id}/members/{user_id}",
            get(workspaces::get_member),
        )
        .route("/workspaces/{id}/audit", get(audit::list_audit))
        .route(
            "/workspaces/{id}/onboarding/{step}",
            post(onboarding::update_step),
        )
        .route(
            "/users/{user_id}/workspaces",
            get(workspaces::list_user_workspaces),
        )
        .route("/events/{svix_id}", get(events::get_event))
        .route("/openapi.json", get(openapi_json))
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method);
    Router::new().nest("/v1", v1)
}

/// The OpenAPI document of the read API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Callmine provisioner read API",
        description = "Provisioned workspaces, members, onboarding, audit and the webhook \
            processing log, for Callmine's main app. Every route needs `Authorization: Bearer`. \
            With `X-Acting-User: user_…` a workspace route answers 404 unless that user is an \
            active member of that active workspace, and onboarding writes need the admin role (403)."
    ),
    paths(
        workspaces::get_workspace,
        workspaces::list_members,
        workspaces::get_member,
        audit::list_audit,
        onboarding::update_step,
        workspaces::list_user_workspaces,
        events::get_event,
        openapi_json,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "workspaces", description = "One workspace and what belongs to it"),
        (name = "users", description = "A user's workspaces"),
        (name = "events", description = "The webhook processing log"),
        (name = "meta", description = "This document"),
    )
)]
pub struct ApiDoc;

/// Adds the bearer security scheme the document's `security` refers to.
#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A token of PROVISIONER_API_TOKENS"))
                    .build(),
            ),
        );
    }
}

/// Rendered once: the document is fixed at build time.
static OPENAPI_JSON: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!(r#"{{"error":"openapi rendering failed: {e}"}}"#))
});

/// This OpenAPI 3 document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI 3 document of the read API", content_type = "application/json"),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
    ),
)]
pub async fn openapi_json(_caller: Caller) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI_JSON.as_str(),
    )
}

async fn unknown_path(_caller: Caller) -> HttpError {
    HttpError::not_found("not found")
}

async fn wrong_method(_caller: Caller) -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// The 404 of a `what` (`workspace`, `member`, …): the same answer whether it does
/// not exist or the acting user may not see it.
pub(crate) fn not_found(what: &str) -> HttpError {
    HttpError::not_found(format!("{what} not found"))
}
