//! What to do with an event whose processing failed.
//!
//! Guarantee: PostgreSQL being unavailable ([`db::is_unavailable`]: unreachable,
//! read-only, a statement or lock timeout) or a conflict that outlived provisioning's
//! in-process retries ([`db::is_transient`]) is never a reason to dead-letter: the
//! event is held with backoff, then parked in the longest retry queue, as for an
//! outage. A payload PostgreSQL refuses to store is dead-lettered at once (class
//! `payload`, decided by provisioning); other database errors go through the
//! retry queues in order and only then are dead-lettered (`retries-exhausted`).

use crate::broker::Topology;
use crate::db;
use crate::provision::ProcessError;

use super::delivery::DeadClass;

/// The next step for a failed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Dead-letter it with this class and reason; `attempts` for `x-attempts`.
    DeadLetter {
        /// `x-error-class`.
        class: DeadClass,
        /// `x-error`.
        reason: String,
        /// `x-attempts`.
        attempts: i64,
    },
    /// Publish it to this retry queue with `x-attempts = attempts`.
    Retry {
        /// Retry queue name.
        queue: String,
        /// `x-attempts`.
        attempts: i64,
    },
    /// The database cannot take it now: keep the delivery and try again in process.
    Hold,
}

/// Decides the next step after `error`, for an event tried `previous` times before.
pub fn after_failure(error: &ProcessError, previous: i64, topology: &Topology) -> Next {
    let attempts = previous + 1;
    match error {
        ProcessError::Payload(reason) => Next::DeadLetter {
            class: DeadClass::Payload,
            reason: reason.clone(),
            attempts,
        },
        ProcessError::Database(e) if db::is_unavailable(e) || db::is_transient(e) => Next::Hold,
        ProcessError::Database(e) => {
            match usize::try_from(previous)
                .ok()
                .and_then(|n| topology.retry_queue(n))
            {
                Some(queue) => Next::Retry {
                    queue: queue.to_owned(),
                    attempts,
                },
                None => Next::DeadLetter {
                    class: DeadClass::RetriesExhausted,
                    reason: format!("gave up after {attempts} attempts; last error: {e}"),
                    attempts,
                },
            }
        }
    }
}

/// The retry queue with the longest delay, where events wait out a database outage.
pub fn longest_retry_queue(topology: &Topology) -> Option<&str> {
    topology
        .retry_queues
        .iter()
        .max_by_key(|(_, delay)| *delay)
        .map(|(name, _)| name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BrokerSettings, ConnectionUrl, WorkerSettings};

    fn topology(delays: &[u64]) -> Topology {
        let broker = BrokerSettings {
            url: ConnectionUrl::new("amqp://localhost/%2f".to_owned()),
            exchange: "x".into(),
            queue: "q".into(),
            dead_letter_exchange: "dlx".into(),
            dead_letter_queue: "dead".into(),
            retry_queue_prefix: "retry".into(),
            delivery_limit: 5,
            queue_expires_ms: None,
            quorum_initial_group_size: None,
            publish_channels: 1,
            publish_timeout_ms: 1,
        };
        let worker = WorkerSettings {
            concurrency: 1,
            batch_size: 1,
            batch_wait_ms: 0,
            retry_delays_ms: delays.to_vec(),
            db_retry_max_ms: 1,
        };
        Topology::new(&broker, &worker)
    }

    fn io_error() -> ProcessError {
        ProcessError::Database(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )))
    }

    #[test]
    fn payload_errors_are_dead_lettered_at_once() {
        let next = after_failure(&ProcessError::Payload("bad".into()), 0, &topology(&[10]));
        assert_eq!(
            next,
            Next::DeadLetter {
                class: DeadClass::Payload,
                reason: "bad".into(),
                attempts: 1
            }
        );
    }

    #[test]
    fn unreachable_database_is_held_never_dead_lettered() {
        for previous in [0, 5, 100] {
            assert_eq!(
                after_failure(&io_error(), previous, &topology(&[])),
                Next::Hold
            );
        }
        let timed_out = ProcessError::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(after_failure(&timed_out, 9, &topology(&[10])), Next::Hold);
    }

    /// A database error with this SQLSTATE, as PostgreSQL sends it.
    fn pg_error(code: &str) -> ProcessError {
        #[derive(Debug)]
        struct Pg(String);
        impl std::fmt::Display for Pg {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "error {}", self.0)
            }
        }
        impl std::error::Error for Pg {}
        impl sqlx::error::DatabaseError for Pg {
            fn message(&self) -> &str {
                "error"
            }
            fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
                Some(self.0.as_str().into())
            }
            fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
                self
            }
            fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
                self
            }
            fn kind(&self) -> sqlx::error::ErrorKind {
                sqlx::error::ErrorKind::Other
            }
        }
        ProcessError::Database(sqlx::Error::Database(Box::new(Pg(code.to_owned()))))
    }

    #[test]
    fn read_only_timeouts_conflicts_and_refused_logins_are_held_never_dead_lettered() {
        // After every retry queue is spent, still held.
        let t = topology(&[10]);
        for code in [
            "25006", "57014", "55P03", "57P04", "57P05", "28P01", "3D000", "53300", "40001",
            "40P01", "08006",
        ] {
            for previous in [0, 1, 50] {
                assert_eq!(
                    after_failure(&pg_error(code), previous, &t),
                    Next::Hold,
                    "{code}"
                );
            }
        }
    }

    #[test]
    fn other_database_errors_walk_the_retry_queues_then_dead_letter() {
        let t = topology(&[10, 20]);
        let err = || ProcessError::Database(sqlx::Error::RowNotFound);
        assert_eq!(
            after_failure(&err(), 0, &t),
            Next::Retry {
                queue: "retry.10ms".into(),
                attempts: 1
            }
        );
        assert_eq!(
            after_failure(&err(), 1, &t),
            Next::Retry {
                queue: "retry.20ms".into(),
                attempts: 2
            }
        );
        match after_failure(&err(), 2, &t) {
            Next::DeadLetter {
                class, attempts, ..
            } => {
                assert_eq!((class, attempts), (DeadClass::RetriesExhausted, 3));
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn longest_retry_queue_is_by_delay() {
        assert_eq!(
            longest_retry_queue(&topology(&[50, 900, 200])),
            Some("retry.900ms")
        );
        assert_eq!(longest_retry_queue(&topology(&[])), None);
    }
}
