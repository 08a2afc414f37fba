//! Header names this service reads and writes on AMQP messages, and the one reader
//! of integer headers.
//!
//! Guarantee: every component (worker, `dlq`, tests) spells a header through these
//! constants, and reads an integer header with [`int`], whatever integer width (or
//! numeric string) the sender chose, so a header written by one is read by all.

use lapin::types::{AMQPValue, FieldTable};

/// Why the event was dead-lettered (text).
pub const ERROR: &str = "x-error";
/// `payload`, `retries-exhausted` or `delivery-limit`.
pub const ERROR_CLASS: &str = "x-error-class";
/// Processing attempts so far.
pub const ATTEMPTS: &str = "x-attempts";
/// When the event was first dead-lettered (Unix ms).
pub const FAILED_AT: &str = "x-failed-at";
/// Set by RabbitMQ on redelivered messages of a quorum queue.
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// Set by `dlq replay` on a republished dead letter: the worker audits its changes
/// with actor `replay`.
pub const REPLAYED: &str = "x-replayed";
/// Set by the ops console on a replay: the operator's session label (text), which
/// the worker adds to the details of every audit row of the replayed event.
pub const REPLAYED_BY: &str = "x-replayed-by";
/// RabbitMQ's record of each time it dead-lettered the message.
pub const DEATH: &str = "x-death";

/// Headers the broker sets itself; a copy this service publishes must not carry
/// stale ones, or the broker's counts and death records would be forged.
pub const BROKER_OWNED: [&str; 7] = [
    DELIVERY_COUNT,
    DEATH,
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
];

/// An integer header of `table`, whatever integer type the sender used.
pub fn int(table: &FieldTable, key: &str) -> Option<i64> {
    int_value(table.inner().get(key)?)
}

/// A text header of `table` (a long or short string that is UTF-8).
pub fn text<'a>(table: &'a FieldTable, key: &str) -> Option<&'a str> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// An AMQP value of any integer width, a timestamp, or a numeric string, as `i64`.
pub fn int_value(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_reads_every_width_and_numeric_text() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::ShortShortUInt(7));
        t.insert("b".into(), AMQPValue::LongInt(-3));
        t.insert("c".into(), AMQPValue::LongString(" 42 ".into()));
        t.insert("d".into(), AMQPValue::Boolean(true));
        assert_eq!(int(&t, "a"), Some(7));
        assert_eq!(int(&t, "b"), Some(-3));
        assert_eq!(int(&t, "c"), Some(42));
        assert_eq!(int(&t, "d"), None);
        assert_eq!(int(&t, "missing"), None);
    }
}
