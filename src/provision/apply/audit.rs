//! The audit buffer: what the events of one transaction leave for its end (audit
//! rows, `superseded` statuses, the writes a batch defers), and the context
//! through which an event adds to it.
//!
//! Guarantee: what waits here is written by [`Pending::flush`] on the same
//! transaction before it commits, so audit rows and statuses commit (or roll back)
//! together with the effects they describe, at one statement each per batch.

use serde_json::Value;
use sqlx::PgConnection;

use super::deferred::Deferred;
use super::plans::Plans;
use crate::config::ProvisioningSettings;
use crate::provision::event::Incoming;

/// One audit row waiting to be written with its event.
struct Audit {
    workspace_id: String,
    action: &'static str,
    actor: &'static str,
    subject: Option<String>,
    details: Value,
    event_id: String,
}

/// Writes that events of one transaction leave for its end: audit rows and
/// `superseded` statuses. They are flushed before the commit, so they still commit
/// (or roll back) together with the effects, at one statement each per batch.
#[derive(Default)]
pub(crate) struct Pending {
    audits: Vec<Audit>,
    pub(super) superseded: Vec<String>,
    /// The claims and inserts a prefetched batch defers ([`Pending::defer`]).
    pub(super) deferred: Deferred,
}

impl Pending {
    /// Defers the claims and inserts of the events applied with a prefetched state
    /// (see [`super::deferred`]) until the first other write or the flush.
    pub(crate) fn defer(&mut self) {
        self.deferred.start();
    }

    /// Writes the pending rows on `conn` (the transaction about to commit): the
    /// deferred claims and inserts first, then statuses and audit rows.
    pub(crate) async fn flush(
        &mut self,
        conn: &mut PgConnection,
        settings: &ProvisioningSettings,
        plans: &Plans,
    ) -> Result<(), sqlx::Error> {
        self.deferred.stop(conn, settings, plans).await?;
        if !self.superseded.is_empty() {
            sqlx::query("update events set status = 'superseded' where svix_id = any($1)")
                .bind(&self.superseded)
                .execute(&mut *conn)
                .await?;
            self.superseded.clear();
        }
        if !self.audits.is_empty() {
            let a = &self.audits;
            let workspace: Vec<&str> = a.iter().map(|a| a.workspace_id.as_str()).collect();
            let action: Vec<&str> = a.iter().map(|a| a.action).collect();
            let actor: Vec<&str> = a.iter().map(|a| a.actor).collect();
            let subject: Vec<Option<&str>> = a.iter().map(|a| a.subject.as_deref()).collect();
            let details: Vec<sqlx::types::Json<&Value>> =
                a.iter().map(|a| sqlx::types::Json(&a.details)).collect();
            let event: Vec<&str> = a.iter().map(|a| a.event_id.as_str()).collect();
            // `with ordinality` keeps the rows (and their ids) in the order they happened.
            sqlx::query(
                "insert into audit_log (workspace_id, action, actor, subject, details, event_id) \
                 select w, a, r, s, d, e \
                 from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[]) \
                   with ordinality as t(w, a, r, s, d, e, n) \
                 order by n",
            )
            .bind(workspace)
            .bind(action)
            .bind(actor)
            .bind(subject)
            .bind(details)
            .bind(event)
            .execute(&mut *conn)
            .await?;
            self.audits.clear();
        }
        Ok(())
    }
}

/// What one event is doing: settings, identity and the pending rows it adds to.
pub(super) struct Ctx<'a> {
    pub(super) settings: &'a ProvisioningSettings,
    pub(super) plans: &'a Plans,
    pub(super) incoming: &'a Incoming,
    pub(super) pending: &'a mut Pending,
}

impl Ctx<'_> {
    /// Before a write that is not a deferred insert: ends the batch's deferring.
    pub(super) async fn stop_deferring(
        &mut self,
        conn: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        self.pending
            .deferred
            .stop(conn, self.settings, self.plans)
            .await
    }

    pub(super) fn audit(
        &mut self,
        workspace_id: &str,
        action: &'static str,
        subject: Option<&str>,
        mut details: Value,
    ) {
        if let (Some(by), Value::Object(map)) = (&self.incoming.replayed_by, &mut details) {
            map.insert("replayed_by".to_owned(), Value::String(by.clone()));
        }
        self.pending.audits.push(Audit {
            workspace_id: workspace_id.to_owned(),
            action,
            actor: self.incoming.actor.as_str(),
            subject: subject.map(str::to_owned),
            details,
            event_id: self.incoming.svix_id.clone(),
        });
    }
}
