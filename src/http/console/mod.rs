//! The ops console (`/ops`): dead letters, the processing log, workspaces, replay,
//! purge and sync, server-rendered for a browser (issue 13, DESIGN §1).
//!
//! Guarantees:
//! - Its own credentials: an ops token (`[ops] tokens`, `PROVISIONER_OPS_TOKENS`)
//!   opens a server-side session ([`session`]) that ends with the token, after
//!   `[ops] session_max_age_h` and when idle; without a live session every page
//!   and form answers 303 to `/ops/login`. Failed sign-ins are throttled per
//!   client address and overall ([`throttle`]). A read-API token opens nothing here and
//!   the session cookie (path `/ops`) nothing under `/v1`.
//! - Every state change is a POST carrying the session's CSRF token (403 and no
//!   change otherwise); destructive ones also carry `confirm=yes` from a confirm
//!   step, and no GET changes anything.
//! - It does what the CLI does through the same library functions
//!   (`dead_letters`, `store::events`, `store`, `reconcile`): no second replay or purge.
//! - Every action is audited and logged ([`audit`]).
//! - Every response carries a Content-Security-Policy without inline scripts,
//!   `nosniff`, `Referrer-Policy: same-origin` and `Cache-Control: no-store`;
//!   every value is escaped ([`view`]); the CSS and JS are served by the binary.

pub mod audit;
mod dead_letters;
mod events;
mod login;
pub mod operator;
mod overview;
pub mod session;
pub mod throttle;
pub mod view;
mod workspaces;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maud::html;

use crate::http::AppState;
use session::Operator;

/// The Content-Security-Policy of every console response: nothing from elsewhere,
/// no inline script or style, no framing, forms only to the console itself.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";

const CSS: &str = include_str!("static/ops.css");
const JS: &str = include_str!("static/ops.js");

/// The `/ops` routes.
pub fn router() -> Router<AppState> {
    // Built once per application: the overview's own samples of the metrics.
    let recent = Arc::new(overview::Recent::default());
    // Likewise the sign-in throttle: failures are counted per application.
    let throttle = throttle::Throttle::new(throttle::Limits::default(), throttle::SUMMARY_INTERVAL);
    Router::new()
        .route(
            "/ops",
            get(move |operator: Operator, state: State<AppState>| {
                overview::page(operator, state, recent.clone())
            }),
        )
        .route(
            "/ops/login",
            get(login::form).post(
                move |peer: throttle::PeerAddress,
                      state: State<AppState>,
                      form: Fields<login::LoginForm>| {
                    login::submit(throttle.clone(), peer, state, form)
                },
            ),
        )
        .route("/ops/logout", post(login::logout))
        .route("/ops/dead-letters", get(dead_letters::list))
        .route(
            "/ops/dead-letters/replay",
            post(dead_letters::replay_filtered),
        )
        .route("/ops/dead-letters/{id}", get(dead_letters::show))
        .route(
            "/ops/dead-letters/{id}/replay",
            post(dead_letters::replay_one),
        )
        .route(
            "/ops/dead-letters/{id}/purge",
            post(dead_letters::purge_one),
        )
        .route("/ops/events", get(events::list))
        .route("/ops/workspaces/{id}", get(workspaces::show))
        .route("/ops/workspaces/{id}/sync", post(workspaces::sync))
        .route("/ops/static/ops.css", get(css))
        .route("/ops/static/ops.js", get(js))
        .route("/ops/{*rest}", get(unknown).post(unknown))
        .layer(axum::middleware::from_fn(security_headers))
}

/// Adds the console's security headers to every response.
async fn security_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS)
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        JS,
    )
}

/// Any other `/ops/…` path: the login first, then a 404 page.
async fn unknown(operator: Operator) -> Response {
    view::not_found(
        &operator,
        html! { "The console has no such page. Start from the overview." },
    )
}

/// A console form's fields. A body that is no form at all (no or another content
/// type, not URL-encoded) reads as an empty form, so that the form's own check
/// answers it: 403 without the CSRF token, 401 on the login, never an
/// extractor's 415 or 422 that would tell a missing token from a wrong one.
#[derive(Debug)]
pub struct Fields<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Fields<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Default,
{
    type Rejection = std::convert::Infallible;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let form = axum::Form::<T>::from_request(request, state).await;
        Ok(Self(form.map(|axum::Form(t)| t).unwrap_or_default()))
    }
}

/// 303 to `location` (a POST's answer; `Redirect::to` is a 303 See Other).
fn see_other(location: &str) -> Response {
    axum::response::Redirect::to(location).into_response()
}
