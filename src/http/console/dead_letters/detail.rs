//! `GET /ops/dead-letters/{id}`: one dead letter whole (properties, headers, body),
//! read in a detached session like the list; changes nothing.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maud::html;

use super::super::session::Operator;
use super::super::view::{self, Nav};
use super::{dlq_unavailable, gone, show_detached};
use crate::dead_letters::DlqError;
use crate::http::AppState;

/// `GET /ops/dead-letters/{id}`.
pub async fn show(
    operator: Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    let message = match show_detached(&state, &id).await {
        Ok(m) => m,
        Err(DlqError::NotFound { .. }) => return gone(&operator, &id),
        Err(e) => return dlq_unavailable(&operator, &e),
    };
    let l = &message.letter;
    let body = html! {
        p.crumbs { a href="/ops/dead-letters" { "Dead letters" } " / " }
        h1.mono { (id) }
        div.actions-bar {
            form.inline method="post" action=(format!("/ops/dead-letters/{}/replay", view::path_segment(&id))) data-busy="Replaying…" {
                (view::csrf(&operator))
                button.primary type="submit" { "Replay" }
            }
            form.inline method="post" action=(format!("/ops/dead-letters/{}/purge", view::path_segment(&id))) {
                (view::csrf(&operator))
                button.danger type="submit" { "Purge…" }
            }
            a href=(format!("/ops/events{}", view::query(&[("id", Some(id.as_str()))]))) { "Processing log" }
        }
        div.panel {
            h2 { "Why it died" }
            p.error-full { (view::text_opt(l.error.as_deref())) }
        }
        dl.facts {
            dt { "Type" } dd.mono { (view::text_opt(l.kind.as_deref())) }
            dt { "Workspace" } dd { (view::workspace_link(l.workspace_id.as_deref())) }
            dt { "Error class" } dd { @match &l.error_class { Some(c) => (view::badge(c)), None => (view::dash()) } }
            dt { "Attempts" } dd { @match l.attempts { Some(a) => (a), None => (view::dash()) } }
            dt { "First failed" } dd { (view::time_opt(l.first_failed_at)) }
            dt { "Received" } dd { (view::time_opt(l.received_at)) }
            dt { "Position" } dd { (l.position) " in the queue" @if message.copies > 1 { " · " (message.copies) " copies with this id (replay takes each; purge removes every copy)" } }
            dt { "Size" } dd { (l.size) " bytes" }
            dt { "Last published to" } dd.mono { (if message.exchange.is_empty() { "(default exchange)" } else { message.exchange.as_str() }) " · " (message.routing_key) }
        }
        (view::json_block("Body", &message.body, true))
        (view::json_block("Headers", &message.headers, false))
        (view::json_block("Properties", &message.properties, false))
    };
    view::page(&id, Some(&operator), Nav::DeadLetters, body).into_response()
}
