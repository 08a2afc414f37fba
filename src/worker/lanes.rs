//! The lanes of a consumer session and the batches they run.
//!
//! Guarantee: events that take the same first advisory lock share a lane, and a
//! lane runs one batch at a time, so two lanes never wait for each other's
//! workspace locks; a batch that panics has its unsettled events run again one by
//! one, and an event that panics alone goes back to the queue.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{Engine, Job};

/// The batchers of one consumer session, one per lane.
pub(super) struct Lanes {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
}

impl Lanes {
    /// Two lanes per batch that fits in the prefetch window: enough to keep
    /// PostgreSQL busy while one lane commits, few enough to keep batches large.
    fn count(engine: &Engine) -> usize {
        let window = usize::from(engine.prefetch).max(1);
        (window.div_ceil(engine.batch_size.max(1)) * 2).clamp(1, 16)
    }

    pub(super) fn start(engine: &Arc<Engine>, tasks: &TaskTracker) -> Self {
        let senders = (0..Self::count(engine))
            .map(|_| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tasks.spawn(lane(engine.clone(), rx));
                tx
            })
            .collect();
        Self { senders }
    }

    /// Hands a job to the lane of the first lock it takes (events without one
    /// spread by id).
    pub(super) fn deal(&self, job: Job) {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        match job.env.lane_key() {
            Some(key) => key.hash(&mut h),
            None => job.env.event.svix_id.hash(&mut h),
        }
        let n = (h.finish() % self.senders.len() as u64) as usize;
        if self.senders[n].send(job).is_err() {
            // A lane ends only with its sender, or by a panic outside `run_batch`'s
            // guard. The unacked delivery returns to the queue with the channel.
            tracing::error!(
                lane = n,
                "worker lane is gone; the delivery will be redelivered"
            );
        }
    }
}

/// One lane: gathers a batch (the first job, then whatever arrives within
/// `batch_wait`, up to `batch_size`) and runs it to the end before the next.
async fn lane(engine: Arc<Engine>, mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = Vec::with_capacity(engine.batch_size);
        batch.push(first);
        let deadline = Instant::now() + engine.batch_wait;
        while batch.len() < engine.batch_size {
            // Jobs already waiting join even when the wait is zero.
            match tokio::time::timeout_at(deadline, jobs.recv()).await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        run_batch(engine.clone(), batch).await;
    }
}

/// Runs one batch; if it panics, its unsettled events run again one by one, and an
/// event that panics alone goes back to the queue (where the delivery limit stops
/// it from crashing workers forever).
async fn run_batch(engine: Arc<Engine>, jobs: Vec<Job>) {
    let backup = jobs.clone();
    if AssertUnwindSafe(engine.process(jobs))
        .catch_unwind()
        .await
        .is_ok()
    {
        return;
    }
    let unsettled: Vec<Job> = backup.into_iter().filter(|j| j.acker.usable()).collect();
    tracing::error!(
        events = unsettled.len(),
        "a batch panicked; retrying its events one by one"
    );
    for job in unsettled {
        let again = job.clone();
        if AssertUnwindSafe(engine.process(vec![job]))
            .catch_unwind()
            .await
            .is_err()
            && again.acker.usable()
        {
            again.span.in_scope(|| {
                tracing::error!(
                    delivery_count = again.env.delivery_count,
                    "processing the event panicked; returning it to the queue"
                )
            });
            engine.requeue(&again).instrument(again.span.clone()).await;
        }
    }
}
