//! `GET /ops/events?id=&org=&type=&status=`: the processing log, newest first.
//!
//! Guarantee: read-only, through `store::events` (the same queries as `provisioner
//! events`, filters bound, never spliced); `?id=` shows that svix id alone.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::session::Operator;
use super::view::{self, Nav};
use crate::http::AppState;
use crate::http::api::page::parse_limit;
use crate::store::events::{self, EventFilter, EventRecord, EventsError};
use crate::store::model::EventStatus;

/// The page's filters.
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    org: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<String>,
}

fn given(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// `GET /ops/events`.
pub async fn list(
    operator: Operator,
    State(state): State<AppState>,
    Query(filters): Query<Filters>,
) -> Response {
    let limit = match parse_limit(given(&filters.limit).as_deref()) {
        Ok(n) => n,
        Err(e) => return view::bad_request(&operator, &e.message),
    };
    let status = given(&filters.status).and_then(|s| EventStatus::parse(&s).ok());
    let id = given(&filters.id);
    let rows: Result<Vec<EventRecord>, EventsError> = match &id {
        Some(id) => match events::show(&state.settings, &state.db, id).await {
            Ok(row) => Ok(vec![row]),
            Err(EventsError::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e),
        },
        None => {
            let filter = EventFilter {
                status,
                workspace_id: given(&filters.org),
                kind: given(&filters.kind),
                since: None,
                limit: Some(limit),
            };
            events::list(&state.settings, &state.db, &filter).await
        }
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "ops console: processing log unavailable");
            return view::error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Processing log unavailable",
                Some(&operator),
                html! { "The database does not answer; try again shortly." },
            );
        }
    };
    let any = id.is_some()
        || status.is_some()
        || given(&filters.org).is_some()
        || given(&filters.kind).is_some();
    let body = html! {
        h1 { "Events" }
        p.lead { "What the worker did with each svix id it took up (the processing log), newest first." }
        form.filters method="get" action="/ops/events" {
            label { "Svix id" input name="id" value=[id.as_deref()] placeholder="msg_…"; }
            label { "Workspace" input name="org" value=[given(&filters.org)] placeholder="org_…"; }
            label { "Type" input name="type" value=[given(&filters.kind)] placeholder="any"; }
            label { "Status"
                select name="status" {
                    option value="" { "any" }
                    @for s in EventStatus::ALL { option value=(s.as_str()) selected[status == Some(*s)] { (s.as_str()) } }
                }
            }
            button type="submit" { "Search" }
            @if any { a href="/ops/events" { "Clear" } }
        }
        @if rows.is_empty() {
            @if let Some(id) = &id {
                (view::empty("No worker has seen this svix id.", html! {
                    "Intake may still have it queued, or it never arrived. Check the "
                    a href=(format!("/ops/dead-letters/{}", view::path_segment(id))) { "dead letters" }
                    ", or search without the id."
                }))
            } @else if any {
                (view::empty("No event matches these filters.", html! { a href="/ops/events" { "Clear the filters" } "." }))
            } @else {
                (view::empty("The processing log is empty.", html! {
                    "No event has been processed yet. Send one with " code { "provisioner send organization.created" } "."
                }))
            }
        } @else {
            (table(&rows, true))
            @if id.is_none() && rows.len() as i64 >= limit {
                p.muted { "Showing the newest " (limit) ". Narrow the filters to see older ones." }
            }
        }
    };
    view::page("Events", Some(&operator), Nav::Events, body).into_response()
}

/// The processing-log table (also on a workspace page, without its column).
pub fn table(rows: &[EventRecord], with_workspace: bool) -> Markup {
    html! {
        table.data {
            thead { tr {
                th { "Processed" } th { "Svix id" } th { "Type" }
                @if with_workspace { th { "Workspace" } }
                th { "Status" } th.num { "Attempts" } th { "Error" }
            } }
            tbody {
                @for e in rows {
                    tr {
                        td.nowrap { (view::time(e.processed_at)) }
                        td.mono { (e.id) }
                        td.mono { (e.kind) }
                        @if with_workspace { td { (view::workspace_link(e.workspace_id.as_deref())) } }
                        td {
                            (view::badge(e.status.as_str()))
                            @if e.status == EventStatus::Dead {
                                " " a href=(format!("/ops/dead-letters/{}", view::path_segment(&e.id))) { "dead letter →" }
                            }
                        }
                        td.num { (e.attempts) }
                        td.error { (view::text_opt(e.error.as_deref())) }
                    }
                }
            }
        }
    }
}
