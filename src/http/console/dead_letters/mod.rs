//! `/ops/dead-letters`: the list (filtered, paged), one dead letter whole, replay
//! one, replay the filtered set ([`bulk`]), purge one.
//!
//! Guarantees:
//! - Every read and change goes through `dead_letters` — the same sessions on the
//!   dead-letter queue as `provisioner dlq`: a view changes no letter and keeps no
//!   body but the one shown; a page reads the queue only down to the rows it shows
//!   (or every letter, summaries only, when a filter needs them).
//! - Each session runs detached from its request ([`detached`]): a client that goes
//!   away does not cancel it, so it always ends by giving the letters back (and an
//!   action by auditing what it did). This process runs one such session at a
//!   time on a queue; the others wait their turn while their client waits.
//! - A bulk replay or a purge happens only on a POST with `confirm=yes`; without it
//!   the answer is the confirm step (what would be done), never the action.

mod bulk;
mod detail;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

pub use bulk::replay_filtered;
pub use detail::show;

use super::Fields;
use super::audit::{self, Action, Actor};
use super::session::{Flash, Operator};
use super::view::{self, Nav};
use crate::dead_letters::{
    self as dlq, DEFAULT_LOCK_WAIT, DeadLetter, DlqError, PageRequest, ReplayOptions, ReplayReport,
    Selection,
};
use crate::http::AppState;
use crate::http::api::page::parse_limit;
use crate::progress::Silent;

/// The error classes the worker and RabbitMQ give (DESIGN §4).
const CLASSES: [&str; 3] = ["payload", "retries-exhausted", "delivery-limit"];

/// The list's filters and page (query string) — also the bulk replay's fields.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Filters {
    /// Event type.
    #[serde(rename = "type", default)]
    kind: Option<String>,
    /// Workspace (organization id).
    #[serde(default)]
    org: Option<String>,
    /// Error class.
    #[serde(default)]
    class: Option<String>,
    /// 1-based page.
    #[serde(default)]
    page: Option<String>,
    /// Rows per page.
    #[serde(default)]
    limit: Option<String>,
}

impl Filters {
    fn given(value: &Option<String>) -> Option<&str> {
        value.as_deref().map(str::trim).filter(|v| !v.is_empty())
    }

    fn matches(&self, letter: &DeadLetter) -> bool {
        let eq = |filter: &Option<String>, value: &Option<String>| {
            Self::given(filter).is_none_or(|f| value.as_deref() == Some(f))
        };
        eq(&self.kind, &letter.kind)
            && eq(&self.org, &letter.workspace_id)
            && eq(&self.class, &letter.error_class)
    }

    fn any(&self) -> bool {
        [&self.kind, &self.org, &self.class]
            .iter()
            .any(|f| Self::given(f).is_some())
    }

    /// The list's URL with these filters (and `page` when given).
    fn url(&self, page: Option<usize>) -> String {
        let page = page.filter(|p| *p > 1).map(|p| p.to_string());
        format!(
            "/ops/dead-letters{}",
            view::query(&[
                ("type", Self::given(&self.kind)),
                ("org", Self::given(&self.org)),
                ("class", Self::given(&self.class)),
                ("limit", Self::given(&self.limit)),
                ("page", page.as_deref()),
            ])
        )
    }

    /// The filters in words, for confirm steps and audit rows.
    fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("type", &self.kind),
            ("workspace", &self.org),
            ("class", &self.class),
        ]
        .iter()
        .filter_map(|(name, v)| Self::given(v).map(|v| format!("{name} = {v}")))
        .collect();
        if parts.is_empty() {
            "every dead letter".to_owned()
        } else {
            parts.join(", ")
        }
    }

    fn hidden(&self) -> Markup {
        html! {
            @for (name, value) in [("type", &self.kind), ("org", &self.org), ("class", &self.class)] {
                @if let Some(v) = Self::given(value) { input type="hidden" name=(name) value=(v); }
            }
        }
    }
}

/// Fields of the forms that act on one dead letter.
#[derive(Debug, Default, Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
    /// The list page (with its filters) to return to.
    #[serde(default)]
    back: Option<String>,
}

fn confirmed(confirm: &Option<String>) -> bool {
    confirm.as_deref() == Some("yes")
}

/// Where a form may send the operator back to: a console list page, nothing else.
fn back_to(back: &Option<String>) -> String {
    match back.as_deref() {
        Some(b)
            if b.starts_with("/ops/dead-letters")
                && !b.contains("//")
                && !b.contains('\\')
                && b.chars().all(|c| c.is_ascii_graphic()) =>
        {
            b.to_owned()
        }
        _ => "/ops/dead-letters".to_owned(),
    }
}

/// The dead-letter sessions this process runs at once on a dead-letter queue: one
/// (a deployment has one queue, so one per process). A session holds the queue's
/// lock (so another could only wait for it anyway) and runs detached, so without
/// this bound a client could pile up sessions by asking and leaving.
static SESSIONS: LazyLock<Mutex<HashMap<String, Arc<Semaphore>>>> = LazyLock::new(Mutex::default);

/// The turns of the sessions on `queue`.
fn turns(queue: &str) -> Arc<Semaphore> {
    let mut all = SESSIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    all.entry(queue.to_owned())
        .or_insert_with(|| Arc::new(Semaphore::new(1)))
        .clone()
}

/// Runs `work` (a dead-letter session, and for an action its audit rows and result
/// line) in a task of its own, after the sessions ahead of it, and waits for its
/// result. The caller going away (a client that disconnects drops its handler)
/// cancels only the wait: once started, `work` runs to its end. Waiting for a turn
/// is bounded like the queue's lock; a request that leaves while waiting gives up
/// its turn and starts nothing.
async fn detached<T: Send + 'static>(
    state: &AppState,
    work: impl Future<Output = Result<T, DlqError>> + Send + 'static,
) -> Result<T, DlqError> {
    let queue = &state.settings.broker.dead_letter_queue;
    let turn = tokio::time::timeout(DEFAULT_LOCK_WAIT, turns(queue).acquire_owned()).await;
    let Ok(Ok(permit)) = turn else {
        return Err(DlqError::Busy {
            queue: queue.clone(),
            waited: DEFAULT_LOCK_WAIT,
        });
    };
    let task = tokio::spawn(async move {
        let result = work.await;
        drop(permit);
        result
    });
    match task.await {
        Ok(result) => result,
        Err(e) => Err(DlqError::Broker(format!(
            "the dead-letter session ended abnormally ({e}); its letters went back to the queue"
        ))),
    }
}

/// The answer when the dead-letter queue cannot be used now.
fn dlq_unavailable(operator: &Operator, e: &DlqError) -> Response {
    tracing::warn!(error = %e, "ops console: dead-letter queue unavailable");
    view::error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Dead letters unavailable",
        Some(operator),
        html! { (e.to_string()) },
    )
}

/// `GET /ops/dead-letters`.
pub async fn list(
    operator: Operator,
    State(state): State<AppState>,
    Query(filters): Query<Filters>,
) -> Response {
    let limit = match parse_limit(Filters::given(&filters.limit)) {
        Ok(n) => n as usize,
        Err(e) => return view::bad_request(&operator, &e.message),
    };
    let want = PageRequest {
        page: Filters::given(&filters.page)
            .and_then(|p| p.parse::<usize>().ok())
            .filter(|p| *p >= 1)
            .unwrap_or(1),
        limit,
    };
    let settings = state.settings.clone();
    let wanted = filters.clone();
    let read = detached(&state, async move {
        let matches = |l: &DeadLetter| wanted.matches(l);
        let filter: Option<dlq::view::Filter<'_>> = wanted.any().then_some(&matches);
        dlq::page(&settings, filter, want).await
    })
    .await;
    let page = match read {
        Ok(page) => page,
        Err(e) => return dlq_unavailable(&operator, &e),
    };
    let here = filters.url(Some(page.page));

    let body = html! {
        h1 { "Dead letters" span.count { (page.in_queue) } }
        p.lead {
            "Events the worker could not apply, with the reason. Replay one after fixing its cause, "
            "or purge it when it can never apply. Queue " code { (page.queue) } "."
        }
        form.filters method="get" action="/ops/dead-letters" {
            label { "Type" input name="type" list="kinds" value=[Filters::given(&filters.kind)] placeholder="any"; }
            datalist #kinds { @for k in &page.kinds { option value=(k) {} } }
            label { "Workspace" input name="org" list="orgs" value=[Filters::given(&filters.org)] placeholder="any"; }
            datalist #orgs { @for o in &page.orgs { option value=(o) {} } }
            label { "Class"
                select name="class" {
                    option value="" { "any" }
                    @for c in CLASSES {
                        option value=(c) selected[Filters::given(&filters.class) == Some(c)] { (c) }
                    }
                }
            }
            button type="submit" { "Filter" }
            @if filters.any() { a href="/ops/dead-letters" { "Clear" } }
        }
        @if page.matching == 0 {
            @if filters.any() {
                (view::empty("No dead letter matches these filters.", html! {
                    a href="/ops/dead-letters" { "Clear the filters" } " to see all " (page.in_queue) "."
                }))
            } @else {
                (view::empty("No dead letters.", html! {
                    "Nothing to do: every event the worker took was applied. When one cannot be applied "
                    "(a malformed payload, retries exhausted), it lands here with its reason."
                }))
            }
        } @else {
            div.bar {
                span {
                    @if filters.any() {
                        (page.matching) " of " (page.in_queue) " match " (filters.describe())
                    } @else {
                        (page.in_queue) " in the queue, head first"
                    }
                }
                form.inline method="post" action="/ops/dead-letters/replay" data-busy="Preparing the replay…" {
                    (view::csrf(&operator))
                    (filters.hidden())
                    button type="submit" {
                        @if filters.any() { "Replay these " (page.matching) "…" } @else { "Replay all " (page.matching) "…" }
                    }
                }
            }
            table.data {
                thead { tr {
                    th { "ID" } th { "Type" } th { "Workspace" } th { "Class" }
                    th.num { "Attempts" } th { "First failed" } th { "Error" } th { "Actions" }
                } }
                tbody {
                    @for l in &page.rows {
                        tr {
                            td { (view::dead_letter_link(l.id.as_deref())) }
                            td.mono { (view::text_opt(l.kind.as_deref())) }
                            td { (view::workspace_link(l.workspace_id.as_deref())) }
                            td { @match &l.error_class { Some(c) => (view::badge(c)), None => (view::dash()) } }
                            td.num { @match l.attempts { Some(a) => (a), None => (view::dash()) } }
                            td.nowrap { (view::time_opt(l.first_failed_at)) }
                            td.error { (view::text_opt(l.error.as_deref())) }
                            td.actions {
                                @if let Some(id) = &l.id {
                                    (row_actions(&operator, id, &here))
                                }
                            }
                        }
                    }
                }
            }
            @if page.pages > 1 {
                nav.pager {
                    @if page.page > 1 { a href=(filters.url(Some(page.page - 1))) rel="prev" { "← Newer" } }
                    span { "page " (page.page) " of " (page.pages) }
                    @if page.page < page.pages { a href=(filters.url(Some(page.page + 1))) rel="next" { "Older →" } }
                }
            }
        }
        @if page.arrived > 0 {
            p.muted { (page.arrived) " more arrived while listing; reload to see them." }
        }
    };
    view::page("Dead letters", Some(&operator), Nav::DeadLetters, body).into_response()
}

fn row_actions(operator: &Operator, id: &str, back: &str) -> Markup {
    let base = format!("/ops/dead-letters/{}", view::path_segment(id));
    html! {
        form.inline method="post" action=(format!("{base}/replay")) data-busy="Replaying…" {
            (view::csrf(operator))
            input type="hidden" name="back" value=(back);
            button.small type="submit" { "Replay" }
        }
        form.inline method="post" action=(format!("{base}/purge")) {
            (view::csrf(operator))
            input type="hidden" name="back" value=(back);
            button.small.danger type="submit" { "Purge…" }
        }
    }
}

/// One dead letter whole, read in a detached session.
async fn show_detached(state: &AppState, id: &str) -> Result<dlq::DeadMessage, DlqError> {
    let settings = state.settings.clone();
    let id = id.to_owned();
    detached(state, async move { dlq::show(&settings, &id).await }).await
}

fn gone(operator: &Operator, id: &str) -> Response {
    view::not_found(
        operator,
        html! {
            "No dead letter with id " code { (id) } " is in the queue: it was replayed or purged, or "
            "never died. " a href=(format!("/ops/events{}", view::query(&[("id", Some(id))]))) { "See what the processing log says about it" } "."
        },
    )
}

/// The audit row of an action on one dead letter; `selection` names the filters
/// of a bulk replay. A failed write is logged by [`audit::record`]; the action
/// itself is done.
async fn audit_letter(
    state: &AppState,
    operator: &Operator,
    letter: &DeadLetter,
    action: &'static str,
    actor: Actor,
    selection: Option<&str>,
) {
    let mut details = json!({
        "type": letter.kind,
        "error_class": letter.error_class,
        "error": letter.error,
    });
    if let Some(selection) = selection {
        details["selection"] = json!(selection);
    }
    let _ = audit::record(
        &state.db,
        Action {
            action,
            actor,
            workspace_id: letter.workspace_id.as_deref(),
            event_id: letter.id.as_deref(),
            operator: &operator.label,
            details,
        },
    )
    .await;
}

/// Audits each replayed dead letter (actor `replay`, with the operator) and
/// words the result.
async fn audit_replay(
    state: &AppState,
    operator: &Operator,
    report: &ReplayReport,
    bulk: Option<&str>,
) -> Flash {
    for l in &report.replayed {
        audit_letter(
            state,
            operator,
            l,
            "dead_letter.replayed",
            Actor::Replay,
            bulk,
        )
        .await;
    }
    for f in &report.failed {
        tracing::warn!(
            svix.id = f.letter.id.as_deref().unwrap_or("-"),
            workspace.id = f.letter.workspace_id.as_deref().unwrap_or("-"),
            operator = %operator.label,
            reason = %f.reason,
            "ops console: dead letter not replayed; it stays dead"
        );
    }
    let lines = report
        .failed
        .iter()
        .map(|f| {
            format!(
                "{} stays dead: {}",
                f.letter.id.as_deref().unwrap_or("(no id)"),
                f.reason
            )
        })
        .chain(report.not_found.iter().map(|id| {
            format!("{id} was no longer in the queue (replayed or purged meanwhile): not replayed")
        }))
        .collect();
    let alone = report.failed.is_empty() && report.not_found.is_empty();
    let text = match (report.replayed.as_slice(), alone) {
        ([one], true) => format!(
            "Replayed {} ({}). It is back in the work queue; the processing log shows how it ends.",
            one.id.as_deref().unwrap_or("-"),
            one.kind.as_deref().unwrap_or("-")
        ),
        _ => format!(
            "{}. Replayed ones are back in the work queue.",
            capitalise(&report.summary())
        ),
    };
    Flash {
        ok: report.failed.is_empty(),
        text,
        lines,
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The result line of a replay or purge of `id` that did not happen.
fn not_done(verb: &str, id: &str, operator: &Operator, e: DlqError) -> Flash {
    match e {
        DlqError::NotFound { .. } => Flash::failed(format!("{e} (already replayed or purged?)")),
        e => {
            tracing::warn!(svix.id = %id, operator = %operator.label, error = %e, "ops console: dead letter not {verb}");
            Flash::failed(format!("Not {verb}: {e}"))
        }
    }
}

/// `POST /ops/dead-letters/{id}/replay` (field `csrf`): republish it, then 303 to
/// the list (the dead letter has left the queue).
pub async fn replay_one(
    operator: Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Fields(form): Fields<ActionForm>,
) -> Response {
    if let Some(refused) = operator.csrf_refusal(form.csrf.as_deref()) {
        return refused;
    }
    let (st, op, one) = (state.clone(), operator.clone(), id.clone());
    let done = detached(&state, async move {
        let opts = ReplayOptions {
            by: Some(op.label.clone()),
            ..ReplayOptions::new(Selection::Ids(vec![one.clone()]))
        };
        let flash = match dlq::replay(&st.settings, &opts, &Silent).await {
            Ok(report) => audit_replay(&st, &op, &report, None).await,
            Err(e) => not_done("replayed", &one, &op, e),
        };
        op.set_flash(&st.db, flash).await;
        Ok(())
    })
    .await;
    if let Err(e) = done {
        let flash = not_done("replayed", &id, &operator, e);
        operator.set_flash(&state.db, flash).await;
    }
    super::see_other(&back_to(&form.back))
}

/// `POST /ops/dead-letters/{id}/purge` (fields `csrf`, `confirm=yes`): without
/// the confirmation the confirm step; with it, the dead letter is deleted for good
/// and the answer is 303 to the list.
pub async fn purge_one(
    operator: Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Fields(form): Fields<ActionForm>,
) -> Response {
    if let Some(refused) = operator.csrf_refusal(form.csrf.as_deref()) {
        return refused;
    }
    if !confirmed(&form.confirm) {
        return confirm_purge(&operator, &state, &id, &back_to(&form.back)).await;
    }
    let (st, op, one) = (state.clone(), operator.clone(), id.clone());
    let done = detached(&state, async move {
        let flash = match dlq::purge(&st.settings, &Selection::Ids(vec![one.clone()])).await {
            Ok(report) => {
                for l in &report.removed {
                    audit_letter(&st, &op, l, "dead_letter.purged", Actor::Ops, None).await;
                }
                Flash::ok(format!(
                    "Purged {one}: {} dead letter(s) deleted for good.",
                    report.count
                ))
            }
            Err(e) => not_done("purged", &one, &op, e),
        };
        op.set_flash(&st.db, flash).await;
        Ok(())
    })
    .await;
    if let Err(e) = done {
        let flash = not_done("purged", &id, &operator, e);
        operator.set_flash(&state.db, flash).await;
    }
    super::see_other(&back_to(&form.back))
}

async fn confirm_purge(operator: &Operator, state: &AppState, id: &str, back: &str) -> Response {
    let message = match show_detached(state, id).await {
        Ok(m) => m,
        Err(DlqError::NotFound { .. }) => return gone(operator, id),
        Err(e) => return dlq_unavailable(operator, &e),
    };
    let l = &message.letter;
    let body = html! {
        h1 { "Purge this dead letter?" }
        div.panel.warn {
            p {
                "Purging deletes " strong { (message.copies) " dead letter" @if message.copies != 1 { "s" } }
                " with id " code { (id) } " for good. The event will not be applied unless Clerk or Svix sends it again."
            }
            dl.facts {
                dt { "Type" } dd.mono { (view::text_opt(l.kind.as_deref())) }
                dt { "Workspace" } dd { (view::workspace_link(l.workspace_id.as_deref())) }
                dt { "Error" } dd.error { (view::text_opt(l.error.as_deref())) }
            }
            form.inline method="post" action=(format!("/ops/dead-letters/{}/purge", view::path_segment(id))) {
                (view::csrf(operator))
                input type="hidden" name="confirm" value="yes";
                input type="hidden" name="back" value=(back);
                button.danger type="submit" { "Yes, purge " (message.copies) }
            }
            " "
            a href=(format!("/ops/dead-letters/{}", view::path_segment(id))) { "Cancel" }
        }
    };
    view::page("Confirm purge", Some(operator), Nav::DeadLetters, body).into_response()
}

#[cfg(test)]
mod tests;
