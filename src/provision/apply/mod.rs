//! The effect of one decoded event on the workspace state, inside a transaction
//! the caller owns (DESIGN §5).
//!
//! Guarantee: run under the event's advisory locks (see [`lock_keys`]), an event
//! writes its processing-log row and its effect on the caller's transaction, and
//! leaves its audit rows and final status in [`audit::Pending`], which is flushed
//! into the same transaction before it commits: all commit or roll back together.
//!
//! Every stored field is a function of the set of events applied, not of their
//! order or repetition (docs/schema.md, "Versions and tombstones"):
//! - each group of fields that follows a snapshot (a workspace's data, its plan, a
//!   member's role, a member's display fields, a user) keeps the snapshot that
//!   [`rules::Source::beats`] every other: the newest version (`data.updated_at`),
//!   and on equal versions the smaller svix id;
//! - deletions keep the earliest time; a membership's end keeps the earliest cause,
//!   and on equal times the reason first in byte order ([`rules::earliest`]);
//! - tombstones are final: a deleted workspace or removed membership never becomes
//!   active again, though its fields still follow the snapshots that describe it.
//!
//! This module is the dispatcher: it reads an event's state and hands the event to
//! the part that decides on its rows. Below it, each part has one home: the rules
//! ([`rules`]), the lock order ([`locks`]), the state read ([`state`]), the audit
//! buffer ([`audit`]), a batch's deferred writes ([`deferred`]), workspaces,
//! memberships and their display fields, users, billing ([`billing`]), and the
//! removals reconcile infers ([`inferred`]).

mod audit;
mod billing;
mod deferred;
mod display;
mod inferred;
mod locks;
mod membership;
mod plans;
mod rules;
mod state;
mod user;
mod workspace;

use sqlx::PgConnection;

use self::audit::{Ctx, Pending};
use self::inferred::{infer_membership_gone, infer_workspace_gone};
use self::membership::{remove_membership, upsert_membership};
use self::state::{Begin, begin, state_keys};
use self::user::{delete_user, update_user};
use self::workspace::{delete_workspace, upsert_workspace};
use super::event::{Actor, Outcome, ReadyEvent};
use super::payload::{Event, Membership, Removal};
use crate::config::ProvisioningSettings;

pub use self::locks::lock_keys;
pub(super) use self::locks::order_keys;
pub(super) use self::plans::Plans;
pub(super) use self::workspace::refresh_quotas;

/// Applies `events` in order on `conn`, a transaction the caller commits: takes the
/// advisory locks of `keys` (in the order given), applies each event, and flushes
/// their audit rows and statuses. On an error the caller rolls back.
///
/// A batch reads the state of all its events in one statement and defers their
/// claims and inserts to one more (see [`deferred`]); a single event claims and
/// reads in one statement and writes at once.
pub(super) async fn apply_events(
    conn: &mut PgConnection,
    settings: &ProvisioningSettings,
    plans: &Plans,
    keys: &[String],
    events: &[ReadyEvent<'_>],
) -> Result<Vec<Outcome>, sqlx::Error> {
    locks::lock(conn, keys).await?;
    let mut pending = Pending::default();
    let mut prefetched = if events.len() > 1 {
        let keys: Vec<_> = events
            .iter()
            .map(|e| (e.incoming.svix_id.as_str(), state_keys(e.decoded).1))
            .collect();
        pending.defer();
        state::prefetch(conn, &keys).await?
    } else {
        Vec::new()
    }
    .into_iter();
    // No savepoints: any failed statement rolls the whole batch back and its
    // events are applied one per transaction, so a savepoint per event would only
    // cost a round trip and a subtransaction each.
    let mut outcomes = Vec::with_capacity(events.len());
    for event in events {
        let outcome = apply_event(Apply {
            tx: &mut *conn,
            settings,
            plans,
            event: *event,
            prefetched: prefetched.next(),
            pending: &mut pending,
        })
        .await?;
        outcomes.push(outcome);
    }
    pending.flush(conn, settings, plans).await?;
    Ok(outcomes)
}

/// One event to apply on the caller's transaction, and what it is applied with.
struct Apply<'a> {
    /// The transaction (the caller commits after [`Pending::flush`]).
    tx: &'a mut PgConnection,
    settings: &'a ProvisioningSettings,
    plans: &'a Plans,
    /// The message and its decoded body.
    event: ReadyEvent<'a>,
    /// The event's state as the batch's prefetch read it (`None`: read it now).
    prefetched: Option<Begin>,
    /// The transaction's pending writes, which the event adds to.
    pending: &'a mut Pending,
}

/// Applies one decoded event on its transaction (possibly with other events; the
/// caller commits after [`Pending::flush`]), processing-log row included; its audit
/// rows and final status wait in `pending`.
///
/// `prefetched` is the event's state as [`state::prefetch`] read it for
/// the whole batch: while the batch defers, the event claims its svix id and
/// decides on that state (with the batch's waiting inserts laid over it) without a
/// round trip of its own; otherwise it claims and reads in one statement.
async fn apply_event(apply: Apply<'_>) -> Result<Outcome, sqlx::Error> {
    let Apply {
        tx: conn,
        settings,
        plans,
        event: ReadyEvent { incoming, decoded },
        prefetched,
        pending,
    } = apply;
    let (initial, (ws_id, membership_id, user_id)) = state_keys(decoded);
    let state = match prefetched {
        Some(state) if pending.deferred.active() => {
            let fresh = state.fresh
                && pending.deferred.claim(
                    &incoming.svix_id,
                    decoded.kind.as_str(),
                    decoded.workspace_id(),
                    initial.as_str(),
                    incoming.received_at,
                );
            Begin {
                fresh,
                ..pending.deferred.overlay(state, ws_id, membership_id)
            }
        }
        _ => {
            begin(
                conn,
                incoming,
                decoded,
                initial.as_str(),
                ws_id,
                membership_id,
                user_id,
            )
            .await?
        }
    };
    if !state.fresh {
        return Ok(Outcome::Duplicate);
    }
    let mut cx = Ctx {
        settings,
        plans,
        incoming,
        pending,
    };
    // A deletion reconcile applies is an inference, not Clerk's word: it is stored
    // apart from a tombstone (see `inferred`).
    let inference = incoming.actor == Actor::Reconcile;
    // Only snapshots of organizations and memberships know how to defer their
    // inserts; every other event writes at once. Billing writes at once too, but
    // only its own tables, which no prefetched state reads and no waiting insert
    // touches: it need not end the deferring.
    let defers = matches!(
        &decoded.event,
        Event::Unhandled
            | Event::Billing(_)
            | Event::OrganizationUpsert(_)
            | Event::MembershipUpsert(_)
            | Event::MembershipDeleted {
                removal: Removal {
                    snapshot: Some(_),
                    ..
                },
                ..
            }
    ) && !(inference && matches!(&decoded.event, Event::MembershipDeleted { .. }));
    if !defers {
        cx.stop_deferring(conn).await?;
    }
    let changed = match &decoded.event {
        Event::Unhandled => return Ok(Outcome::Ignored),
        Event::OrganizationUpsert(org) => {
            upsert_workspace(conn, &mut cx, org, state.workspace())
                .await?
                .changed
        }
        Event::OrganizationDeleted { id, at_ms } if inference => {
            infer_workspace_gone(conn, &mut cx, id, *at_ms, state.workspace()).await?
        }
        Event::OrganizationDeleted { id, at_ms } => {
            delete_workspace(conn, &mut cx, id, *at_ms, state.workspace()).await?
        }
        Event::MembershipUpsert(m) => membership_snapshot(conn, &mut cx, m, None, &state).await?,
        Event::MembershipDeleted { removal, at_ms } if inference => {
            infer_membership_gone(conn, &mut cx, removal, *at_ms, &state).await?
        }
        Event::MembershipDeleted { removal, at_ms } => match &removal.snapshot {
            Some(m) => membership_snapshot(conn, &mut cx, m, Some(*at_ms), &state).await?,
            None => remove_membership(conn, &mut cx, removal, *at_ms, &state).await?,
        },
        Event::UserUpdated(u) => update_user(conn, &mut cx, u, &state).await?,
        Event::UserDeleted { id, at_ms } => delete_user(conn, &mut cx, id, *at_ms).await?,
        Event::Billing(b) => billing::store_billing(conn, &mut cx, b).await?,
    };
    if changed {
        Ok(Outcome::Processed)
    } else {
        cx.pending.superseded.push(incoming.svix_id.clone());
        Ok(Outcome::Superseded)
    }
}

/// A membership snapshot (`organizationMembership.created/updated`, or `.deleted`
/// with its snapshot): it carries its organization's, so the workspace is upserted
/// first and the membership decides on the workspace as it then is.
async fn membership_snapshot(
    conn: &mut PgConnection,
    cx: &mut Ctx<'_>,
    m: &Membership,
    deleted_at_ms: Option<i64>,
    st: &Begin,
) -> Result<bool, sqlx::Error> {
    let ws = upsert_workspace(conn, cx, &m.organization, st.workspace()).await?;
    upsert_membership(conn, cx, m, deleted_at_ms, st, ws).await
}
