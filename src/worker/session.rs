//! One consumer session: a broker connection, its channel and consumer, from
//! connect to loss or graceful shutdown.
//!
//! Guarantee: deliveries are consumed with manual acks under a per-consumer
//! prefetch, so no more than `worker.concurrency` events are unacked; on shutdown
//! the consumer is cancelled and what was already prefetched is processed, not
//! requeued (a requeue would count against the delivery limit).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::Engine;
use super::lanes::Lanes;

/// Why a consumer session ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("cannot connect to the broker: {0}")]
    Connect(lapin::Error),
    #[error("cannot set up the consumer: {0}")]
    Setup(lapin::Error),
    #[error("consumer connection failed: {0}")]
    Lost(lapin::Error),
    #[error("the broker cancelled the consumer")]
    Cancelled,
}

/// First pause before reconnecting; doubled up to [`RECONNECT_MAX`].
pub(super) const RECONNECT_MIN: Duration = Duration::from_millis(200);
/// Longest pause between reconnects.
pub(super) const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// One consumer connection, from connect to loss or graceful shutdown.
pub(super) async fn session(
    engine: &Arc<Engine>,
    tasks: &TaskTracker,
    delay: &mut Duration,
    grace: Duration,
) -> Result<(), SessionError> {
    let conn = engine
        .endpoints
        .connect("provisioner-worker")
        .await
        .map_err(SessionError::Connect)?;
    tracing::info!(broker.url = %engine.endpoints.current(), "worker connected to broker");
    let result = consume(engine, tasks, &conn, delay, grace).await;
    if result.is_err() {
        // Reconnect to the other addresses (cluster nodes) first.
        engine.endpoints.lost();
    }
    // Closing requeues whatever is still unacked on this connection.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        conn.close(200, "worker stopping".into()),
    )
    .await;
    result
}

async fn consume(
    engine: &Arc<Engine>,
    tasks: &TaskTracker,
    conn: &Connection,
    delay: &mut Duration,
    grace: Duration,
) -> Result<(), SessionError> {
    engine
        .topology
        .declare_on(conn)
        .await
        .map_err(SessionError::Setup)?;
    let channel = conn.create_channel().await.map_err(SessionError::Setup)?;
    // Per-consumer prefetch (global: false). RabbitMQ 3.10 answers global QoS on a
    // quorum queue with a connection-level NOT_IMPLEMENTED that kills every channel.
    channel
        .basic_qos(engine.prefetch, BasicQosOptions { global: false })
        .await
        .map_err(SessionError::Setup)?;
    let tag = format!("provisioner-worker-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            engine.topology.queue.as_str().into(),
            tag.as_str().into(),
            // no_ack: false — manual acks, only after the commit.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(SessionError::Setup)?;
    tracing::info!(queue = %engine.topology.queue, prefetch = engine.prefetch, "worker consuming");
    *delay = RECONNECT_MIN;
    // 0 again when this session ends, however it ends.
    let _connected = super::metrics::Connected::consumer();

    let lanes = Lanes::start(engine, tasks);
    loop {
        let next = tokio::select! {
            biased;
            _ = engine.shutdown.cancelled() => break,
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(d)) => lanes.deal(engine.job(d).await),
            Some(Err(e)) => return Err(SessionError::Lost(e)),
            None => return Err(SessionError::Cancelled),
        }
    }

    // Graceful stop: cancel the consumer, then process what was already prefetched
    // (requeueing it would count as a failed delivery against the delivery limit).
    let deadline = Instant::now() + grace;
    let _ = tokio::time::timeout_at(
        deadline,
        channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    drain(engine, &lanes, &mut consumer, deadline).await;
    // The lanes finish what they hold once their senders are gone.
    drop(lanes);
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = tasks.len(),
            "worker grace period over; unacked events return to the queue"
        );
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        channel.close(200, "worker stopping".into()),
    )
    .await;
    Ok(())
}

/// Processes the deliveries still buffered after the consumer was cancelled.
async fn drain(engine: &Arc<Engine>, lanes: &Lanes, consumer: &mut Consumer, deadline: Instant) {
    while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, consumer.next()).await {
        match tokio::time::timeout_at(deadline, engine.job(d)).await {
            Ok(job) => lanes.deal(job),
            Err(_) => break,
        }
    }
}
