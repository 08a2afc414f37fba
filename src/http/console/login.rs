//! `GET /ops/login`, `POST /ops/login`, `POST /ops/logout`.
//!
//! Guarantee: a sign-in first takes a slot of the [`Throttle`]: past 10 failures a
//! minute from the client's address (or the overall limit) it answers 429 with
//! `Retry-After` and compares no token, not even a right one. A wrong token
//! answers 401 with the form again and sets no cookie; a right one creates a
//! session bound to that token and its cookie, and redirects (303) to `/ops`. The
//! login form is the one form without a CSRF token (there is no session yet; the
//! cookie is `SameSite=Strict`, so another site cannot post it with a victim's
//! session either way). Logging out deletes the session row.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::Fields;
use super::session::{self, Operator};
use super::throttle::{Client, PeerAddress, Throttle};
use super::view::{self, Nav};
use crate::http::AppState;

/// The login form's fields.
#[derive(Debug, Default, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    label: Option<String>,
}

/// The logout form's fields.
#[derive(Debug, Default, Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    csrf: Option<String>,
}

fn login_page(error: Option<&str>, label: Option<&str>) -> Markup {
    let body = html! {
        div.login {
            h1 { "Sign in to the ops console" }
            @if let Some(error) = error {
                div.flash.failed role="alert" { p { (error) } }
            }
            form method="post" action="/ops/login" {
                label for="token" { "Ops token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                label for="label" { "Your name " span.muted { "(optional; shown in the audit trail)" } }
                input #label type="text" name="label" maxlength="64" placeholder="e.g. alice" value=[label];
                button.primary type="submit" { "Sign in" }
            }
            p.muted {
                "Tokens are set with PROVISIONER_OPS_TOKENS (see docs/operations.md). "
                "A read-API token does not open the console."
            }
        }
    };
    view::page("Sign in", None, Nav::None, body)
}

/// The login form.
pub async fn form() -> Markup {
    login_page(None, None)
}

/// Checks the token, once the throttle allows it; on success a new session and
/// 303 to `/ops`.
pub async fn submit(
    throttle: Arc<Throttle>,
    PeerAddress(peer): PeerAddress,
    State(state): State<AppState>,
    Fields(form): Fields<LoginForm>,
) -> Response {
    let label = session::clean_label(form.label.as_deref());
    let attempt = match throttle.begin(Client::of(peer), Instant::now()) {
        Ok(attempt) => attempt,
        Err(wait) => {
            // Counted in the throttle's summary warning, not logged one by one.
            let seconds = wait.as_secs_f64().ceil() as u64;
            let message = format!("Too many failed sign-ins; try again in {seconds} seconds.");
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                login_page(Some(&message), label.as_deref()),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            return response;
        }
    };
    let Some(index) = session::match_token(&form.token, &state.settings.ops.tokens) else {
        throttle.failed(attempt);
        // The throttle sums refusals up in one warning per interval.
        tracing::debug!("ops console: sign-in refused (wrong token)");
        return (
            StatusCode::UNAUTHORIZED,
            login_page(
                Some("That token does not open the console."),
                label.as_deref(),
            ),
        )
            .into_response();
    };
    throttle.succeeded(attempt);
    let label = label.unwrap_or_else(|| format!("ops token {index}"));
    let ops = &state.settings.ops;
    let digest = session::token_digest(&ops.tokens[index - 1]);
    let live = session::Liveness::of(ops);
    match session::create(&state.db, &label, &digest, &live).await {
        Ok(id) => {
            tracing::info!(operator = %label, "ops console: signed in");
            let mut response = super::see_other("/ops");
            response.headers_mut().insert(
                header::SET_COOKIE,
                session::session_cookie(&id, state.settings.environment),
            );
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "ops console: could not create a session");
            view::unavailable("The session could not be stored (database); try again shortly.")
        }
    }
}

/// Ends the session for good and clears the cookie.
pub async fn logout(
    operator: Operator,
    State(state): State<AppState>,
    Fields(form): Fields<LogoutForm>,
) -> Response {
    if let Some(refused) = operator.csrf_refusal(form.csrf.as_deref()) {
        return refused;
    }
    if let Err(e) = session::delete(&state.db, &operator).await {
        tracing::error!(error = %e, "ops console: could not delete a session");
        return view::unavailable("The session could not be ended (database); try again.");
    }
    tracing::info!(operator = %operator.label, "ops console: signed out");
    session::to_login(true)
}
