//! The periodic poll behind the queue-depth and database gauges.
//!
//! Guarantee: bounded cost whatever the load — one broker connection of its own
//! (named `provisioner-metrics`), one passive `queue.declare` per queue and one
//! `select 1` per interval; a failed poll never disturbs intake or the worker (it
//! drops its own connection and tries again at the next tick).

use std::time::Duration;

use lapin::{Channel, Connection};
use metrics::gauge;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::broker::Topology;
use crate::config::ConnectionUrl;

/// Ready messages in a queue, by `queue` (its configured name) and `role`
/// (`events`, `dead_letter`, `retry`).
pub const QUEUE_MESSAGES: &str = "broker_queue_messages";
/// 1 while PostgreSQL answers `select 1` within [`DATABASE_CHECK_TIMEOUT`], else 0.
pub const DATABASE_CONNECTED: &str = "database_connected";

/// How long the database check may take before the database counts as down.
pub const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Sets [`DATABASE_CONNECTED`] (also from `/readyz`'s own check).
pub fn database_connected(up: bool) {
    gauge!(DATABASE_CONNECTED).set(if up { 1.0 } else { 0.0 });
}

/// Polls every `interval` until `stop`; `interval` zero polls never.
pub fn spawn(
    url: ConnectionUrl,
    topology: Topology,
    db: PgPool,
    interval: Duration,
    stop: CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut broker: Option<(Connection, Channel)> = None;
        let mut warned = false;
        // The first poll after one interval: a process that lives shorter (a test
        // application) never opens the connection.
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            let up =
                tokio::time::timeout(DATABASE_CHECK_TIMEOUT, sqlx::query("select 1").execute(&db))
                    .await
                    .is_ok_and(|r| r.is_ok());
            database_connected(up);
            match depths(&url, &topology, &mut broker).await {
                Ok(()) => warned = false,
                Err(e) => {
                    // The gauges keep their last values; `broker_connected` says why.
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(error = %e, "cannot poll the queue depths; retrying at the next tick");
                    }
                    if let Some((conn, _)) = broker.take() {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            conn.close(200, "metrics poll failed".into()),
                        )
                        .await;
                    }
                }
            }
        }
        if let Some((conn, _)) = broker.take() {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
        }
    });
}

/// The queues of `topology` with their `role` label.
pub fn queues(topology: &Topology) -> Vec<(String, &'static str)> {
    let mut out = vec![
        (topology.queue.clone(), "events"),
        (topology.dead_letter_queue.clone(), "dead_letter"),
    ];
    out.extend(
        topology
            .retry_queues
            .iter()
            .map(|(name, _)| (name.clone(), "retry")),
    );
    out
}

async fn depths(
    url: &ConnectionUrl,
    topology: &Topology,
    broker: &mut Option<(Connection, Channel)>,
) -> Result<(), lapin::Error> {
    if broker
        .as_ref()
        .is_none_or(|(conn, ch)| !conn.status().connected() || !ch.status().connected())
    {
        let conn = crate::broker::connect(url, "provisioner-metrics").await?;
        let channel = conn.create_channel().await?;
        *broker = Some((conn, channel));
    }
    let (_, channel) = broker.as_ref().expect("connected above");
    for (queue, role) in queues(topology) {
        // Passive: reads the queue's counts, never creates or changes it (a missing
        // queue closes the channel; the next tick opens another).
        let declared = tokio::time::timeout(
            crate::broker::CONNECT_DEADLINE,
            crate::broker::inspect(channel, queue.as_str()),
        )
        .await
        .map_err(|_| {
            lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer to a passive queue declare",
            ))
        })??;
        gauge!(QUEUE_MESSAGES, "queue" => queue, "role" => role)
            .set(f64::from(declared.message_count()));
    }
    Ok(())
}
