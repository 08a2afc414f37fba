//! The Backend API client's pacing: one token bucket per client (and so per
//! process), shared by every call.
//!
//! Guarantee: calls go out at most at `rate` a second after a burst of one
//! second's worth, and a `pause` (a `429`'s `Retry-After`) holds every caller.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A token bucket shared by every call of the client: `rate` tokens a second, a
/// burst of at most one second's worth; `pause` stops everyone until a time.
pub(super) struct TokenBucket {
    pub(super) rate: f64,
    state: Mutex<BucketState>,
}

struct BucketState {
    tokens: f64,
    last: Instant,
    paused_until: Option<Instant>,
}

impl TokenBucket {
    pub(super) fn new(rate: f64) -> Self {
        Self {
            rate,
            state: Mutex::new(BucketState {
                tokens: rate.max(1.0),
                last: Instant::now(),
                paused_until: None,
            }),
        }
    }

    pub(super) async fn acquire(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                match s.paused_until {
                    Some(until) if until > now => until - now,
                    _ if self.rate <= 0.0 => return,
                    _ => {
                        let burst = self.rate.max(1.0);
                        s.tokens = (s.tokens + (now - s.last).as_secs_f64() * self.rate).min(burst);
                        s.last = now;
                        if s.tokens >= 1.0 {
                            s.tokens -= 1.0;
                            return;
                        }
                        Duration::from_secs_f64((1.0 - s.tokens) / self.rate)
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    pub(super) async fn pause(&self, wait: Duration) {
        let mut s = self.state.lock().await;
        let until = Instant::now() + wait;
        if s.paused_until.is_none_or(|current| current < until) {
            s.paused_until = Some(until);
        }
        s.tokens = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_paces_calls_at_its_rate() {
        let bucket = TokenBucket::new(5.0);
        let start = Instant::now();
        for _ in 0..15 {
            bucket.acquire().await;
        }
        // A burst of 5, then 10 more at 5 a second.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(1990), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(2100), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_caller() {
        let bucket = TokenBucket::new(0.0);
        bucket.pause(Duration::from_secs(3)).await;
        let start = Instant::now();
        bucket.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(3));
    }
}
