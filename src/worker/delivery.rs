//! Reading an AMQP delivery as an event to apply, and building its copies for the
//! retry queues and the dead-letter exchange.
//!
//! Guarantee: a copy keeps the body byte for byte, the svix id, the type and the
//! original intake timestamp; only this service's bookkeeping headers change, and
//! headers the broker owns (`x-delivery-count`, `x-death`) are never forged.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::broker::headers;
use crate::clerk::EventType;
use crate::provision::payload::{self, Decoded, Undecodable};
use crate::provision::{Actor, Incoming};

/// What the worker knows about one delivery besides the event itself.
#[derive(Debug, Clone)]
pub struct DeliveredEvent {
    /// The event to apply; `svix_id` is empty when the message had no `message_id`.
    pub event: Incoming,
    /// The body, decoded once when the delivery is read; every later step (lane,
    /// screen, locks, apply, lag, processing log) reads this, never the body.
    pub decoded: Result<Decoded, Undecodable>,
    /// Whether the message carried a `message_id`.
    pub has_message_id: bool,
    /// Original AMQP timestamp (Unix seconds), kept on every copy.
    pub timestamp: Option<u64>,
    /// Original headers, copied onto retries and dead letters.
    pub headers: FieldTable,
    /// `x-attempts`: processing attempts before this delivery.
    pub attempts: i64,
    /// `x-delivery-count`: times the broker delivered it before without an ack.
    pub delivery_count: i64,
}

impl DeliveredEvent {
    /// Reads a delivery's properties and body; never fails (problems are screened
    /// afterwards by [`DeliveredEvent::screen`]).
    ///
    /// This is where the body of a delivery is parsed, the only time between the
    /// consumer and the commit: [`payload::read`] under the message's `type`.
    pub fn read(properties: &BasicProperties, body: Vec<u8>, now: DateTime<Utc>) -> Self {
        let headers = properties.headers().clone().unwrap_or_default();
        let prop_kind = properties
            .kind()
            .as_ref()
            .map(|k| k.as_str())
            .filter(|k| !k.is_empty());
        let decoded = payload::read(prop_kind.unwrap_or_default(), &body);
        // The message's `type` property wins over the body's.
        let kind = match prop_kind {
            Some(k) => Some(EventType::parse(k)),
            None => match &decoded {
                Ok(d) => Some(d.kind.clone()),
                Err(u) => u.kind.clone(),
            },
        };
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .filter(|m| !m.is_empty());
        let timestamp = *properties.timestamp();
        let received_at = timestamp
            .and_then(|s| i64::try_from(s).ok())
            .and_then(|s| DateTime::from_timestamp(s, 0))
            .unwrap_or(now);
        let actor = if headers.contains_key(headers::REPLAYED) {
            Actor::Replay
        } else {
            Actor::Clerk
        };
        let attempts = headers::int(&headers, headers::ATTEMPTS)
            .unwrap_or(0)
            .max(0);
        let delivery_count = headers::int(&headers, headers::DELIVERY_COUNT)
            .unwrap_or(0)
            .max(0);
        Self {
            has_message_id: message_id.is_some(),
            event: Incoming {
                svix_id: message_id.unwrap_or_default(),
                kind,
                body,
                received_at,
                actor,
                replayed_by: headers::text(&headers, headers::REPLAYED_BY)
                    .filter(|_| actor == Actor::Replay)
                    .map(str::to_owned),
            },
            decoded,
            timestamp,
            headers,
            attempts,
            delivery_count,
        }
    }

    /// The event type (the message's, else the body's); empty when neither says.
    pub fn type_name(&self) -> &str {
        self.event.kind_str()
    }

    /// The `type` label of the worker's metrics.
    pub fn metric_type(&self) -> &'static str {
        self.event
            .kind
            .as_ref()
            .map_or("other", EventType::metric_label)
    }

    /// The entity whose advisory lock the event takes first (the organization of
    /// an organization or membership event, the user of a user event), for the
    /// lanes; `None` when the body does not decode or names none.
    pub fn lane_key(&self) -> Option<String> {
        let decoded = self.decoded.as_ref().ok()?;
        crate::provision::lock_keys(decoded).into_iter().next()
    }

    /// The envelope `timestamp` (Unix ms, seconds normalised by the decoder), for
    /// the provisioning lag.
    pub fn envelope_ms(&self) -> Option<i64> {
        self.decoded.as_ref().ok()?.timestamp_ms
    }

    /// Why this delivery must be dead-lettered without being applied, if it must.
    pub fn screen(&self, delivery_limit: u32) -> Option<(DeadClass, String)> {
        if !self.has_message_id {
            return Some((DeadClass::Payload, "message has no message_id".to_owned()));
        }
        if self.event.kind.is_none() {
            return Some((
                DeadClass::Payload,
                "message has no type property and the body no `type`".to_owned(),
            ));
        }
        // The broker counts deliveries that ended without an ack (a crash, a stall
        // past the consumer timeout, a lost connection). With `x-delivery-limit` N it
        // dead-letters after N + 1 deliveries, so the one that arrives with count N
        // is the last chance to dead-letter it ourselves, with our headers.
        if self.delivery_count >= i64::from(delivery_limit) {
            return Some((
                DeadClass::DeliveryLimit,
                format!(
                    "delivered {} times without an acknowledgement (workers crashed, stalled or lost their connection while processing it); the delivery limit is {}",
                    self.delivery_count, delivery_limit
                ),
            ));
        }
        // A body that cannot be applied is dead-lettered here, with the decoder's
        // reason, without a database round trip.
        if let Err(u) = &self.decoded {
            return Some((DeadClass::Payload, u.error.0.clone()));
        }
        None
    }

    /// The routing key of its dead-lettered copy: the event type.
    pub fn routing_key(&self) -> &str {
        match &self.event.kind {
            Some(kind) if !kind.as_str().is_empty() => kind.as_str(),
            _ => "unknown",
        }
    }

    /// Headers of a copy sent to a retry queue, with `attempts` processing attempts.
    pub fn retry_headers(&self, attempts: i64) -> FieldTable {
        let mut table = self.copied_headers();
        table.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(attempts));
        table
    }

    /// Headers of a dead-lettered copy.
    pub fn dead_headers(
        &self,
        class: DeadClass,
        reason: &str,
        attempts: i64,
        failed_at_ms: i64,
    ) -> FieldTable {
        let mut table = self.copied_headers();
        table.insert(headers::ERROR.into(), AMQPValue::LongString(reason.into()));
        table.insert(
            headers::ERROR_CLASS.into(),
            AMQPValue::LongString(class.as_str().into()),
        );
        table.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(attempts));
        table.insert(
            headers::FAILED_AT.into(),
            AMQPValue::LongLongInt(failed_at_ms),
        );
        table
    }

    fn copied_headers(&self) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in &self.headers {
            if !headers::BROKER_OWNED.contains(&key.as_str()) {
                table.insert(ShortString::from(key.as_str()), value.clone());
            }
        }
        table
    }
}

/// Why an event was dead-lettered (`x-error-class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadClass {
    /// The payload cannot be applied as it is.
    Payload,
    /// Transient failures outlasted every retry queue.
    RetriesExhausted,
    /// It crashed or stalled workers up to the delivery limit.
    DeliveryLimit,
}

impl DeadClass {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadClass::Payload => "payload",
            DeadClass::RetriesExhausted => "retries-exhausted",
            DeadClass::DeliveryLimit => "delivery-limit",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(body: &[u8]) -> Option<String> {
        DeliveredEvent::read(&BasicProperties::default(), body.to_vec(), Utc::now()).lane_key()
    }

    #[test]
    fn lane_is_the_entity_locked_first() {
        let org = br#"{"type":"organization.updated","timestamp":1,"data":{"id":"org_1","name":"A","created_at":1,"updated_at":1,"x":[1,{"y":2}]}}"#;
        assert_eq!(subject(org).as_deref(), Some("ws:org_1"));
        let mem = br#"{"type":"organizationMembership.created","data":{"id":"orgmem_1","role":"org:member","created_at":1,"updated_at":1,"organization":{"id":"org_2","name":"B","created_at":1,"updated_at":1},"public_user_data":{"user_id":"user_1"}}}"#;
        assert_eq!(subject(mem).as_deref(), Some("ws:org_2"));
        let user =
            br#"{"data":{"id":"user_9","email_addresses":[]},"type":"user.deleted","timestamp":1}"#;
        assert_eq!(subject(user).as_deref(), Some("user:user_9"));
        // A body that does not decode has no lane of its own, never an error.
        for body in [
            &br#"{"type":"organization.created","data":"broken"}"#[..],
            br#"{"type":"organizationMembership.created","data":{"id":"orgmem_1"}}"#,
            br#"{"type":"organization.created","data":{"id":7}}"#,
            br#"{"data":{"id":"org_1"}}"#,
            b"not json",
        ] {
            assert_eq!(subject(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    fn props() -> BasicProperties {
        BasicProperties::default()
            .with_message_id("msg_1".into())
            .with_type("organization.updated".into())
            .with_timestamp(1_700_000_000)
    }

    fn body() -> Vec<u8> {
        br#"{"data":{"id":"org_1","name":"A","created_at":1,"updated_at":2},"type":"organization.updated","timestamp":1700000000123}"#
            .to_vec()
    }

    fn with_headers(entries: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        props().with_headers(t)
    }

    #[test]
    fn reads_id_type_timestamp_and_actor() {
        let e = DeliveredEvent::read(&props(), body(), Utc::now());
        assert_eq!(e.event.svix_id, "msg_1");
        assert_eq!(e.event.received_at.timestamp(), 1_700_000_000);
        assert_eq!(e.event.actor, Actor::Clerk);
        assert_eq!(e.envelope_ms(), Some(1_700_000_000_123));
        assert_eq!((e.attempts, e.delivery_count), (0, 0));
        assert!(e.screen(10).is_none());
        // The message's `type` property wins over the body's (and, disagreeing
        // with it, makes the event a payload dead letter).
        let other = props().with_type("organization.created".into());
        let e = DeliveredEvent::read(&other, body(), Utc::now());
        assert_eq!(e.type_name(), "organization.created");
        assert_eq!(e.screen(10).unwrap().0, DeadClass::Payload);
    }

    #[test]
    fn falls_back_to_body_type_and_now() {
        let p = BasicProperties::default().with_message_id("msg_2".into());
        let now = Utc::now();
        let e = DeliveredEvent::read(&p, body(), now);
        assert_eq!(e.type_name(), "organization.updated");
        assert_eq!(e.event.received_at, now);
        assert_eq!(e.timestamp, None);
    }

    #[test]
    fn replayed_header_makes_the_actor_replay() {
        let p = with_headers(&[(headers::REPLAYED, AMQPValue::Boolean(true))]);
        assert_eq!(
            DeliveredEvent::read(&p, body(), Utc::now()).event.actor,
            Actor::Replay
        );
    }

    #[test]
    fn missing_message_id_is_a_payload_dead_letter() {
        let p = BasicProperties::default().with_type("organization.created".into());
        let (class, reason) = DeliveredEvent::read(&p, body(), Utc::now())
            .screen(10)
            .unwrap();
        assert_eq!(class, DeadClass::Payload);
        assert_eq!(reason, "message has no message_id");
    }

    #[test]
    fn a_body_that_does_not_decode_is_a_payload_dead_letter() {
        let e = DeliveredEvent::read(
            &props(),
            b"{\"type\":\"organization.updated\"}".to_vec(),
            Utc::now(),
        );
        let (class, reason) = e.screen(10).unwrap();
        assert_eq!(class, DeadClass::Payload);
        assert_eq!(reason, "data: missing");
        // A seconds timestamp is normalised once, for the lag as for the versions.
        let secs = br#"{"type":"user.deleted","timestamp":1716883200,"data":{"id":"user_1"}}"#;
        let p = props().with_type("user.deleted".into());
        assert_eq!(
            DeliveredEvent::read(&p, secs.to_vec(), Utc::now()).envelope_ms(),
            Some(1_716_883_200_000)
        );
    }

    #[test]
    fn missing_type_everywhere_is_a_payload_dead_letter() {
        let p = BasicProperties::default().with_message_id("m".into());
        let e = DeliveredEvent::read(&p, b"not json".to_vec(), Utc::now());
        assert_eq!(e.screen(10).unwrap().0, DeadClass::Payload);
        assert_eq!(e.routing_key(), "unknown");
    }

    #[test]
    fn last_allowed_delivery_is_dead_lettered_by_the_worker() {
        // 3.10.8 sets x-delivery-count 1, 2, … on redeliveries; limit 3 allows the
        // delivery with count 3 and dead-letters the next one itself.
        let below = with_headers(&[(headers::DELIVERY_COUNT, AMQPValue::LongLongInt(2))]);
        assert!(
            DeliveredEvent::read(&below, body(), Utc::now())
                .screen(3)
                .is_none()
        );
        let last = with_headers(&[(headers::DELIVERY_COUNT, AMQPValue::LongInt(3))]);
        let (class, reason) = DeliveredEvent::read(&last, body(), Utc::now())
            .screen(3)
            .unwrap();
        assert_eq!(class, DeadClass::DeliveryLimit);
        assert!(reason.contains("3 times"), "{reason}");
    }

    #[test]
    fn copies_keep_our_headers_and_drop_the_brokers() {
        let p = with_headers(&[
            (headers::REPLAYED, AMQPValue::Boolean(true)),
            (headers::ATTEMPTS, AMQPValue::LongLongInt(1)),
            (headers::DELIVERY_COUNT, AMQPValue::LongLongInt(4)),
            (headers::DEATH, AMQPValue::FieldArray(Default::default())),
        ]);
        let e = DeliveredEvent::read(&p, body(), Utc::now());
        assert_eq!(e.attempts, 1);
        let retry = e.retry_headers(2);
        assert_eq!(headers::int(&retry, headers::ATTEMPTS), Some(2));
        assert!(retry.contains_key(headers::REPLAYED));
        assert!(!retry.contains_key(headers::DELIVERY_COUNT));
        assert!(!retry.contains_key(headers::DEATH));
        let dead = e.dead_headers(DeadClass::Payload, "bad", 2, 5);
        assert_eq!(
            dead.inner().get(headers::ERROR_CLASS),
            Some(&AMQPValue::LongString("payload".into()))
        );
        assert_eq!(headers::int(&dead, headers::FAILED_AT), Some(5));
        assert_eq!(headers::int(&dead, headers::ATTEMPTS), Some(2));
    }
}
