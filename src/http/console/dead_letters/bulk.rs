//! `POST /ops/dead-letters/replay`: the bulk replay of the filtered set, bound to
//! the letters its confirm step showed.
//!
//! Guarantee: the confirm step lists the dead letters it will replay — those
//! matching the filters, head first, at most [`BULK_MAX`] — and carries their svix
//! ids in the form (`ids`, a JSON array, under the session's CSRF token). The
//! confirmed POST replays exactly those ids (each copy of each, like `dlq replay
//! --id`): one that left the queue meanwhile is reported as not found, and a letter
//! that arrived meanwhile is not replayed even when it matches the filters. A
//! confirmation without the ids is no confirmation: it gets the confirm step.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use super::super::Fields;
use super::super::session::{Flash, Operator};
use super::super::view::{self, Nav};
use super::{Filters, audit_replay, confirmed, detached, dlq_unavailable};
use crate::dead_letters::{self as dlq, DeadLetter, PageRequest, ReplayOptions, Selection};
use crate::http::AppState;
use crate::http::api::page::MAX_LIMIT;
use crate::progress::Silent;

/// The most dead letters one bulk replay takes (the list's largest page): its
/// confirm step lists each, and the form carries each id.
pub const BULK_MAX: usize = MAX_LIMIT as usize;

/// Fields of the bulk replay form: the list's filters, `csrf`, `confirm`, and the
/// ids the confirm step showed.
#[derive(Debug, Default, Deserialize)]
pub struct BulkForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    org: Option<String>,
    #[serde(default)]
    class: Option<String>,
    /// The svix ids of the confirm step, as a JSON array of strings.
    #[serde(default)]
    ids: Option<String>,
}

/// The ids a confirm step carried; `None` when absent, malformed or empty.
fn shown_ids(raw: &Option<String>) -> Option<Vec<String>> {
    let ids: Vec<String> = serde_json::from_str(raw.as_deref()?).ok()?;
    (!ids.is_empty()).then_some(ids)
}

/// `POST /ops/dead-letters/replay` (fields `type`, `org`, `class`, `csrf`, and
/// `confirm=yes` with `ids`): without the confirmation the confirm step (the
/// letters and their ids, like `dlq replay --dry-run`); with it the replay of those
/// ids, then 303 to the list with the summary.
pub async fn replay_filtered(
    operator: Operator,
    State(state): State<AppState>,
    Fields(form): Fields<BulkForm>,
) -> Response {
    if let Some(refused) = operator.csrf_refusal(form.csrf.as_deref()) {
        return refused;
    }
    let filters = Filters {
        kind: form.kind,
        org: form.org,
        class: form.class,
        ..Filters::default()
    };
    match shown_ids(&form.ids) {
        Some(ids) if confirmed(&form.confirm) => replay_shown(operator, state, filters, ids).await,
        _ => confirm_step(operator, state, filters).await,
    }
}

/// The confirm step: the first [`BULK_MAX`] letters matching the filters, listed,
/// their ids in the form.
async fn confirm_step(operator: Operator, state: AppState, filters: Filters) -> Response {
    let settings = state.settings.clone();
    let wanted = filters.clone();
    let read = detached(&state, async move {
        let matches = |l: &DeadLetter| wanted.matches(l);
        let filter: Option<dlq::view::Filter<'_>> = wanted.any().then_some(&matches);
        let first = PageRequest {
            page: 1,
            limit: BULK_MAX,
        };
        dlq::page(&settings, filter, first).await
    })
    .await;
    let page = match read {
        Ok(page) => page,
        Err(e) => return dlq_unavailable(&operator, &e),
    };
    let selected = &page.rows;
    let mut ids: Vec<&str> = Vec::new();
    for id in selected.iter().filter_map(|l| l.id.as_deref()) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let unreplayable = selected.iter().filter(|l| l.id.is_none()).count();
    if ids.is_empty() {
        let flash = Flash::failed(format!(
            "No dead letter with an id matches {}; nothing was replayed.",
            filters.describe()
        ));
        operator.set_flash(&state.db, flash).await;
        return super::super::see_other(&filters.url(None));
    }
    let carried = serde_json::to_string(&ids).unwrap_or_default();
    let body = html! {
        h1 { "Replay " (selected.len()) " dead letter" @if selected.len() != 1 { "s" } "?" }
        div.panel.warn {
            p {
                "Selection: " strong { (filters.describe()) } ". Exactly the dead letters listed below are "
                "republished to the events exchange and removed from the dead-letter queue once the broker "
                "confirmed them; the worker applies each svix id once. One whose cause is not fixed "
                "dead-letters again. Letters that arrive after this page are not included."
            }
            @if page.matching > selected.len() {
                p {
                    (page.matching) " match; this replays the first " (selected.len())
                    " (head of the queue first). Replay again for the rest."
                }
            }
            @if unreplayable > 0 {
                p { (unreplayable) " of them carry no svix id and cannot be replayed." }
            }
            form.inline method="post" action="/ops/dead-letters/replay" data-busy="Replaying — the page updates when every dead letter is done…" {
                (view::csrf(&operator))
                (filters.hidden())
                input type="hidden" name="ids" value=(carried);
                input type="hidden" name="confirm" value="yes";
                button.primary type="submit" { "Yes, replay " (ids.len()) }
            }
            " "
            a href=(filters.url(None)) { "Cancel" }
        }
        table.data {
            thead { tr { th { "ID" } th { "Type" } th { "Workspace" } th { "Error" } } }
            tbody {
                @for l in selected {
                    tr {
                        td { (view::dead_letter_link(l.id.as_deref())) }
                        td.mono { (view::text_opt(l.kind.as_deref())) }
                        td { (view::workspace_link(l.workspace_id.as_deref())) }
                        td.error { (view::text_opt(l.error.as_deref())) }
                    }
                }
            }
        }
    };
    view::page("Confirm replay", Some(&operator), Nav::DeadLetters, body).into_response()
}

/// The confirmed replay of the ids the confirm step showed; audited, detached.
async fn replay_shown(
    operator: Operator,
    state: AppState,
    filters: Filters,
    ids: Vec<String>,
) -> Response {
    let described = filters.describe();
    let (st, op) = (state.clone(), operator.clone());
    let done = detached(&state, async move {
        let opts = ReplayOptions {
            by: Some(op.label.clone()),
            skip_missing: true,
            ..ReplayOptions::new(Selection::Ids(ids))
        };
        let flash = match dlq::replay(&st.settings, &opts, &Silent).await {
            Ok(report) => audit_replay(&st, &op, &report, Some(&described)).await,
            Err(e) => {
                tracing::warn!(operator = %op.label, error = %e, "ops console: bulk replay failed");
                Flash::failed(format!("Nothing was replayed: {e}"))
            }
        };
        op.set_flash(&st.db, flash).await;
        Ok(())
    })
    .await;
    if let Err(e) = done {
        tracing::warn!(operator = %operator.label, error = %e, "ops console: bulk replay not started");
        let flash = Flash::failed(format!("Nothing was replayed: {e}"));
        operator.set_flash(&state.db, flash).await;
    }
    super::super::see_other(&filters.url(None))
}
