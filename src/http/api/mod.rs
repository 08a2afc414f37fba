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
use crate::http::error::{ErrorCode, HttpError};
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
        .route("/workspaces/{id}/sync", post(workspaces::sync_workspace))
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
        workspaces::sync_workspace,
        audit::list_audit,
        onboarding::update_step,
        workspaces::list_user_workspaces,
        events::get_event,
        openapi_json,
    ),
    modifiers(&BearerAuth, &CallerContract),
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

/// What every `/v1` route shares, declared once so no route can leave it out:
/// the optional `X-Acting-User` header (printable ASCII, 1–255 bytes, as
/// [`auth`] reads it) and the `400 invalid_acting_user` it answers otherwise.
#[derive(Debug)]
struct CallerContract;

impl Modify for CallerContract {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::{
            ContentBuilder, ObjectBuilder, Ref, RefOr, Required, ResponseBuilder, Type,
        };
        const ACTING: &str = "`invalid_acting_user` (X-Acting-User is empty, repeated, longer than \
            255 bytes or not printable ASCII)";
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                let header = ParameterBuilder::new()
                    .name("X-Acting-User")
                    .parameter_in(ParameterIn::Header)
                    .required(Required::False)
                    .description(Some(
                        "The end user the main app acts for (`user_…`): workspace routes answer \
                         404 unless they are an active member, writes need the admin role",
                    ))
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .pattern(Some("^[!-~]{1,255}$"))
                            .min_length(Some(1))
                            .max_length(Some(255)),
                    ))
                    .build();
                operation
                    .parameters
                    .get_or_insert_with(Vec::new)
                    .push(header);
                let responses = &mut operation.responses.responses;
                match responses.get_mut("400") {
                    Some(RefOr::T(response)) => {
                        response.description = format!("{}; {ACTING}", response.description);
                    }
                    _ => {
                        let response = ResponseBuilder::new()
                            .description(ACTING)
                            .content(
                                "application/json",
                                ContentBuilder::new()
                                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                                    .build(),
                            )
                            .build();
                        responses.insert("400".to_owned(), RefOr::T(response));
                    }
                }
            }
        }
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
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}

/// The 404 of a `what` (`workspace`, `member`, …): the same answer whether it does
/// not exist or the acting user may not see it.
pub(crate) fn not_found(what: &str) -> HttpError {
    HttpError::not_found(format!("{what} not found"))
}
