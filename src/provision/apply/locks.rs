//! The lock order: the advisory-lock keys of an event and the one global order
//! every transaction takes them in.
//!
//! Guarantee: every transaction takes its keys in [`order_keys`]'s order
//! (workspaces, then users, each by id), transaction-scoped, in exactly that order,
//! so concurrent workers serialize on shared entities without deadlocking on
//! these locks.

use sqlx::PgConnection;

use crate::provision::payload::Decoded;

/// Advisory-lock keys of an event, in the global lock order (workspaces before
/// users, each by id). Every transaction takes its keys in this order, so
/// concurrent workers serialize on shared entities without deadlocking; the
/// worker deals events into lanes by the first key, so events that would wait for
/// each other's locks share a lane.
pub fn lock_keys(decoded: &Decoded) -> Vec<String> {
    let workspace = decoded.workspace_id().map(ws_key);
    let user = decoded.user_id().map(user_key);
    workspace.into_iter().chain(user).collect()
}

pub(super) fn ws_key(id: &str) -> String {
    format!("ws:{id}")
}

fn user_key(id: &str) -> String {
    format!("user:{id}")
}

/// Sorts and deduplicates keys into the global lock order.
pub(crate) fn order_keys(keys: &mut Vec<String>) {
    // "ws:" keys sort before "user:" keys, then by id.
    keys.sort_by(|a, b| {
        let rank = |k: &str| if k.starts_with("ws:") { 0 } else { 1 };
        rank(a).cmp(&rank(b)).then_with(|| a.cmp(b))
    });
    keys.dedup();
}

/// Takes the transaction-scoped advisory locks of `keys`, in the given order.
pub(crate) async fn lock(conn: &mut PgConnection, keys: &[String]) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    // With `order by`, PostgreSQL evaluates the volatile lock calls after sorting,
    // so they are taken in exactly the array's order.
    sqlx::query(
        "select pg_advisory_xact_lock(hashtextextended(k, 0)) \
         from unnest($1::text[]) with ordinality as t(k, n) order by n",
    )
    .bind(keys)
    .execute(conn)
    .await?;
    Ok(())
}
