//! `GET /ops/workspaces/{id}` (state, members, audit trail, events) and
//! `POST /ops/workspaces/{id}/sync` (field `csrf`): the sync from Clerk.
//!
//! Guarantee: the page reads through the read API's store and `store::events`; the
//! sync is the reconcile issue's sync of one organization (actor `reconcile` on
//! its changes) and shows the drift it found and what it applied.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;

use super::Fields;
use super::audit::{self, Action, Actor};
use super::session::{Flash, Operator};
use super::view::{self, Nav};
use crate::http::AppState;
use crate::reconcile::{Found, SyncError};
use crate::store::events::{self, EventFilter};
use crate::store::{self, Keyset};

/// Rows of each list on the page.
const ROWS: i64 = 200;

/// The sync form's fields.
#[derive(Debug, Default, Deserialize)]
pub struct SyncForm {
    #[serde(default)]
    csrf: Option<String>,
}

fn sync_form(operator: &Operator, id: &str, configured: bool) -> Markup {
    html! {
        @if configured {
            form.inline method="post" action=(format!("/ops/workspaces/{}/sync", view::path_segment(id))) data-busy="Syncing from Clerk…" {
                (view::csrf(operator))
                button.primary type="submit" { "Sync from Clerk" }
            }
        } @else {
            span.muted { "Sync from Clerk is off: this process has no CLERK_SECRET_KEY." }
        }
    }
}

/// `GET /ops/workspaces/{id}`.
pub async fn show(
    operator: Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    let configured = state.sync.reconciler().is_some();
    let loaded = async {
        let workspace = store::workspace(&state.db, &id, None).await?;
        let members = store::members(
            &state.db,
            &id,
            None,
            Keyset {
                after: None,
                limit: ROWS,
            },
        )
        .await?;
        let audit = store::audit(&state.db, &id, None, ROWS).await?;
        Ok::<_, store::StoreError>((workspace, members, audit))
    }
    .await;
    let (workspace, members, audit) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::warn!(error = %e, workspace.id = %id, "ops console: workspace unavailable");
            return view::error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Workspace unavailable",
                Some(&operator),
                html! { "The database does not answer; try again shortly." },
            );
        }
    };
    let filter = EventFilter {
        workspace_id: Some(id.clone()),
        limit: Some(ROWS),
        ..EventFilter::default()
    };
    let events = events::list(&state.settings, &state.db, &filter)
        .await
        .unwrap_or_default();

    let Some((workspace, _)) = workspace else {
        let body = html! {
            h1.mono { (id) }
            (view::empty("This workspace is not provisioned here.", html! {
                "No organization.created for it has been applied. If Clerk has it, a sync provisions it now. "
                (sync_form(&operator, &id, configured))
            }))
            @if !events.is_empty() {
                h2 { "Events about it" }
                (super::events::table(&events, false))
            }
        };
        return (
            StatusCode::NOT_FOUND,
            view::page(&id, Some(&operator), Nav::Workspace, body),
        )
            .into_response();
    };

    let body = html! {
        p.crumbs { "Workspace" }
        h1 { (workspace.name.as_deref().unwrap_or("(no name)")) " " span.mono.muted { (workspace.id) } }
        div.actions-bar {
            (view::badge(workspace.status.as_str()))
            span { "plan " strong { (workspace.plan) } }
            span {
                (plural(workspace.member_count, "member", "members")) ", "
                (plural(workspace.admin_count, "admin", "admins"))
            }
            (sync_form(&operator, &id, configured))
        }
        div.grid {
            section.panel {
                h2 { "State" }
                dl.facts {
                    dt { "Slug" } dd.mono { (view::text_opt(workspace.slug.as_deref())) }
                    dt { "Created" } dd { (view::time(workspace.created_at)) }
                    dt { "Updated" } dd { (view::time(workspace.updated_at)) }
                    dt { "Deleted" } dd { (view::time_opt(workspace.deleted_at)) }
                }
                h3 { "Quotas" }
                table.data.compact {
                    tbody { @for (name, limit) in &workspace.quotas { tr { td.mono { (name) } td.num { (limit) } } } }
                }
            }
            section.panel {
                h2 { "Onboarding " (view::badge(match workspace.onboarding.status { crate::store::model::OnboardingStatus::Completed => "completed", crate::store::model::OnboardingStatus::Pending => "pending" })) }
                table.data.compact {
                    thead { tr { th { "Step" } th { "Required" } th { "Status" } } }
                    tbody {
                        @for s in &workspace.onboarding.steps {
                            tr { td.mono { (s.name) } td { @if s.required { "yes" } @else { "no" } } td { (view::badge(s.status.as_str())) } }
                        }
                    }
                }
            }
        }
        h2 { "Members " span.count { (members.len()) } }
        @if members.is_empty() {
            (view::empty("No active members.", html! { "Memberships arrive with organizationMembership.created; a sync from Clerk brings the current list." }))
        } @else {
            table.data {
                thead { tr { th { "User" } th { "Role" } th { "Clerk role" } th { "Email" } th { "Name" } th { "Joined" } } }
                tbody {
                    @for m in &members {
                        tr {
                            td.mono { (m.user_id) }
                            td { (view::badge(m.role.as_str())) }
                            td.mono { (m.clerk_role) }
                            td { (view::text_opt(m.email.as_deref())) }
                            td { (m.first_name.as_deref().unwrap_or("")) " " (m.last_name.as_deref().unwrap_or("")) }
                            td.nowrap { (view::time(m.joined_at)) }
                        }
                    }
                }
            }
            @if members.len() as i64 >= ROWS { p.muted { "The first " (ROWS) " by user id." } }
        }
        h2 { "Audit trail" }
        @if audit.is_empty() {
            (view::empty("No audit rows.", html! { "Every change to this workspace writes one." }))
        } @else {
            table.data {
                thead { tr { th { "At" } th { "Action" } th { "Actor" } th { "Subject" } th { "Event" } th { "Details" } } }
                tbody {
                    @for (_, row) in &audit {
                        tr {
                            td.nowrap { (view::time(row.at)) }
                            td.mono { (row.action) }
                            td { (view::badge(&row.actor)) }
                            td.mono { (view::text_opt(row.subject.as_deref())) }
                            td.mono { @match &row.event_id {
                                Some(e) => { a href=(format!("/ops/events{}", view::query(&[("id", Some(e.as_str()))]))) { (e) } }
                                None => { (view::dash()) }
                            } }
                            td { (view::json_block("details", &row.details, false)) }
                        }
                    }
                }
            }
        }
        h2 { "Events" }
        @if events.is_empty() {
            (view::empty("No event about this workspace was processed.", html! { "Events it names appear here, newest first." }))
        } @else {
            (super::events::table(&events, false))
        }
    };
    view::page(
        workspace.name.as_deref().unwrap_or(&id),
        Some(&operator),
        Nav::Workspace,
        body,
    )
    .into_response()
}

fn plural(n: i64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `POST /ops/workspaces/{id}/sync`: fetch the organization and its memberships
/// from Clerk now, provision them, then 303 back to the workspace with the drift
/// found and what changed.
pub async fn sync(
    operator: Operator,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Fields(form): Fields<SyncForm>,
) -> Response {
    if let Some(refused) = operator.csrf_refusal(form.csrf.as_deref()) {
        return refused;
    }
    let flash = match state.sync.sync_report(&id).await {
        Ok((report, found)) => {
            let drift: Vec<String> = report
                .drift
                .iter()
                .map(|d| {
                    format!(
                        "{} {}{}: {}",
                        d.kind,
                        d.workspace_id,
                        d.user_id
                            .as_deref()
                            .map(|u| format!(" {u}"))
                            .unwrap_or_default(),
                        d.detail
                    )
                })
                .collect();
            let _ = audit::record(
                &state.db,
                Action {
                    action: "workspace.synced",
                    actor: Actor::Ops,
                    workspace_id: Some(&id),
                    event_id: None,
                    operator: &operator.label,
                    details: json!({
                        "found": matches!(found, Found::Present),
                        "summary": report.summary(),
                        "drift": drift,
                        "applied": report.applied,
                        "refused": report.refused,
                    }),
                },
            )
            .await;
            let head = match found {
                Found::Present => format!("Synced {id} from Clerk: {}.", report.summary()),
                Found::Gone => format!("Clerk has no organization {id}: {}.", report.summary()),
            };
            let mut lines = if drift.is_empty() {
                vec!["No drift: this service already matched Clerk.".to_owned()]
            } else {
                drift
            };
            if let Some(refused) = report.refused {
                lines.push(refused);
            }
            Flash::ok(head).with_lines(lines)
        }
        Err(e) => {
            tracing::warn!(workspace.id = %id, operator = %operator.label, error = %e, "ops console: sync failed");
            let text = match e {
                SyncError::NotConfigured => {
                    "Sync is off: this process has no CLERK_SECRET_KEY.".to_owned()
                }
                SyncError::Clerk(reason) => {
                    format!("Clerk could not be asked: {reason}. Nothing changed.")
                }
                SyncError::Misconfigured(reason) => format!("{reason}. Nothing changed."),
                SyncError::Database { .. } => {
                    "The database failed during the sync; try again.".to_owned()
                }
            };
            Flash::failed(text)
        }
    };
    operator.set_flash(&state.db, flash).await;
    super::see_other(&format!("/ops/workspaces/{}", view::path_segment(&id)))
}
