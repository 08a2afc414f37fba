//! What a dead letter says about itself: its svix id, type, workspace, why and when
//! it died — read from the message properties, its headers and its body.
//!
//! Guarantee: decoding never fails. A message placed in the dead-letter queue by
//! hand (no `x-error*` headers, maybe not even JSON) still yields a summary, with
//! `null` for what it does not carry.

use chrono::{DateTime, TimeZone, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::broker::headers;

/// One dead letter as `dlq list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// 1-based position in the dead-letter queue (head = 1).
    pub position: usize,
    /// Svix id (`message_id`); `null` when the message has none.
    pub id: Option<String>,
    /// Event type (`type` property, else the body's `type`).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// `data.id` of `organization.*`, `data.organization.id` of memberships.
    pub workspace_id: Option<String>,
    /// `payload`, `retries-exhausted`, `delivery-limit` (or RabbitMQ's own reason).
    pub error_class: Option<String>,
    /// Why it was dead-lettered.
    pub error: Option<String>,
    /// Processing attempts before it was dead-lettered.
    pub attempts: Option<i64>,
    /// When it was first dead-lettered (`x-failed-at`, else the earliest `x-death`).
    pub first_failed_at: Option<DateTime<Utc>>,
    /// When intake queued it (AMQP `timestamp`).
    pub received_at: Option<DateTime<Utc>>,
    /// Body size in bytes.
    pub size: usize,
}

impl DeadLetter {
    /// Reads the summary of one message at `position`.
    pub fn from_message(position: usize, props: &BasicProperties, body: &[u8]) -> Self {
        let headers = props.headers().as_ref();
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let kind = props
            .kind()
            .as_ref()
            .map(|k| k.as_str().to_owned())
            .filter(|k| !k.is_empty())
            .or_else(|| {
                parsed
                    .as_ref()
                    .and_then(|v| v.get("type"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        let workspace_id = parsed
            .as_ref()
            .and_then(|body| workspace_of(kind.as_deref()?, body));
        let death = headers.and_then(first_death);

        let error_class = header_text(headers, headers::ERROR_CLASS).or_else(|| {
            death.as_ref().map(|d| match d.reason.as_str() {
                // RabbitMQ's own name for the quorum delivery limit.
                "delivery_limit" => "delivery-limit".to_owned(),
                other => other.to_owned(),
            })
        });
        let error = header_text(headers, headers::ERROR).or_else(|| {
            death.as_ref().map(|d| match d.reason.as_str() {
                "delivery_limit" => format!(
                    "delivered more often than the delivery limit of queue {}; RabbitMQ dead-lettered it",
                    d.queue
                ),
                reason => format!("RabbitMQ dead-lettered it from queue {} ({reason})", d.queue),
            })
        });
        let attempts = headers
            .and_then(|h| h.inner().get(headers::ATTEMPTS))
            .and_then(headers::int_value);
        let first_failed_at = headers
            .and_then(|h| h.inner().get(headers::FAILED_AT))
            .and_then(headers::int_value)
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .or_else(|| death.as_ref().and_then(|d| d.time));
        let received_at = props
            .timestamp()
            .and_then(|secs| Utc.timestamp_opt(secs as i64, 0).single());

        DeadLetter {
            position,
            id: props
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .filter(|m| !m.is_empty()),
            kind,
            workspace_id,
            error_class,
            error,
            attempts,
            first_failed_at,
            received_at,
            size: body.len(),
        }
    }
}

/// The workspace an event is about: `data.id` for `organization.*`,
/// `data.organization.id` for `organizationMembership.*`, none otherwise.
pub fn workspace_of(kind: &str, body: &Value) -> Option<String> {
    let data = body.get("data")?;
    let id = if kind.starts_with("organization.") {
        data.get("id")
    } else if kind.starts_with("organizationMembership.") {
        data.get("organization").and_then(|o| o.get("id"))
    } else {
        None
    };
    id.and_then(Value::as_str).map(str::to_owned)
}

/// The first (oldest) death RabbitMQ recorded in `x-death`.
#[derive(Debug)]
struct Death {
    reason: String,
    queue: String,
    time: Option<DateTime<Utc>>,
}

fn first_death(headers: &FieldTable) -> Option<Death> {
    let AMQPValue::FieldArray(entries) = headers.inner().get(headers::DEATH)? else {
        return None;
    };
    let entries: Vec<&FieldTable> = entries
        .as_slice()
        .iter()
        .filter_map(|e| match e {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        })
        .collect();
    // RabbitMQ keeps the most recent death first; `x-first-death-*` names the
    // first one, and each entry's `time` is its latest occurrence, so the earliest
    // time over all entries is the best "first failed" it offers.
    let reason = header_text(Some(headers), "x-first-death-reason")
        .or_else(|| entries.last().and_then(|e| header_text(Some(e), "reason")))?;
    let queue = header_text(Some(headers), "x-first-death-queue")
        .or_else(|| entries.last().and_then(|e| header_text(Some(e), "queue")))
        .unwrap_or_default();
    let time = entries
        .iter()
        .filter_map(|e| match e.inner().get("time") {
            Some(AMQPValue::Timestamp(secs)) => Utc.timestamp_opt(*secs as i64, 0).single(),
            Some(v) => headers::int_value(v).and_then(|s| Utc.timestamp_opt(s, 0).single()),
            None => None,
        })
        .min();
    Some(Death {
        reason,
        queue,
        time,
    })
}

/// A text header (long or short string, or raw bytes that are UTF-8).
pub fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok().map(str::to_owned),
        _ => None,
    }
}

/// An AMQP value as JSON: strings as text (lossy UTF-8), numbers as numbers,
/// tables as objects, byte arrays as text when UTF-8.
pub fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_)
        | AMQPValue::Timestamp(_) => headers::int_value(value)
            .map(Value::from)
            .unwrap_or(Value::Null),
        AMQPValue::Float(f) => serde_json::Number::from_f64(f64::from(*f))
            .map(Value::Number)
            .unwrap_or(Value::Null),
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        AMQPValue::DecimalValue(d) => Value::String(format!("{}e-{}", d.value, d.scale)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::Void => Value::Null,
    }
}

/// A header table as a JSON object.
pub fn table_to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), amqp_to_json(v)))
            .collect::<Map<String, Value>>(),
    )
}

/// The AMQP properties of a message as JSON (headers separately).
pub fn properties_to_json(props: &BasicProperties) -> Value {
    let mut out = Map::new();
    let mut put = |name: &str, value: Option<Value>| {
        if let Some(v) = value {
            out.insert(name.to_owned(), v);
        }
    };
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| Value::from(s.as_str()));
    put("message_id", text(props.message_id()));
    put("type", text(props.kind()));
    put("content_type", text(props.content_type()));
    put("content_encoding", text(props.content_encoding()));
    put("delivery_mode", props.delivery_mode().map(Value::from));
    put("priority", props.priority().map(Value::from));
    put("correlation_id", text(props.correlation_id()));
    put("reply_to", text(props.reply_to()));
    put("expiration", text(props.expiration()));
    put("timestamp", props.timestamp().map(Value::from));
    put("user_id", text(props.user_id()));
    put("app_id", text(props.app_id()));
    put("cluster_id", text(props.cluster_id()));
    Value::Object(out)
}

/// The body as JSON when it parses, else as (lossy) text.
pub fn body_to_json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};

    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(k), v);
        }
        t
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn worker_headers_are_read() {
        let body =
            br#"{"type":"organizationMembership.created","data":{"organization":{"id":"org_1"}}}"#;
        let props = BasicProperties::default()
            .with_message_id("msg_1".into())
            .with_type("organizationMembership.created".into())
            .with_timestamp(1_700_000_000)
            .with_headers(table(vec![
                ("x-error", text("data.public_user_data is missing")),
                ("x-error-class", text("payload")),
                ("x-attempts", AMQPValue::LongLongInt(1)),
                ("x-failed-at", AMQPValue::LongLongInt(1_700_000_001_234)),
            ]));
        let l = DeadLetter::from_message(1, &props, body);
        assert_eq!(l.id.as_deref(), Some("msg_1"));
        assert_eq!(l.workspace_id.as_deref(), Some("org_1"));
        assert_eq!(l.error_class.as_deref(), Some("payload"));
        assert_eq!(l.error.as_deref(), Some("data.public_user_data is missing"));
        assert_eq!(l.attempts, Some(1));
        assert_eq!(
            l.first_failed_at.unwrap().timestamp_millis(),
            1_700_000_001_234
        );
        assert_eq!(l.received_at.unwrap().timestamp(), 1_700_000_000);
    }

    #[test]
    fn x_death_only_is_delivery_limit_with_the_earliest_time() {
        let death = |reason: &str, time: u64| {
            AMQPValue::FieldTable(table(vec![
                ("reason", text(reason)),
                ("queue", text("provisioner.events")),
                ("count", AMQPValue::LongLongInt(1)),
                ("time", AMQPValue::Timestamp(time)),
            ]))
        };
        let mut arr = FieldArray::default();
        arr.push(death("rejected", 1_700_000_100));
        arr.push(death("delivery_limit", 1_700_000_050));
        let props = BasicProperties::default()
            .with_message_id("msg_2".into())
            .with_headers(table(vec![
                ("x-death", AMQPValue::FieldArray(arr)),
                ("x-first-death-reason", text("delivery_limit")),
                ("x-first-death-queue", text("provisioner.events")),
            ]));
        let body = br#"{"type":"organization.created","data":{"id":"org_9"}}"#;
        let l = DeadLetter::from_message(3, &props, body);
        assert_eq!(
            l.kind.as_deref(),
            Some("organization.created"),
            "type from the body"
        );
        assert_eq!(l.workspace_id.as_deref(), Some("org_9"));
        assert_eq!(l.error_class.as_deref(), Some("delivery-limit"));
        assert!(l.error.unwrap().contains("delivery limit"));
        assert_eq!(l.first_failed_at.unwrap().timestamp(), 1_700_000_050);
        assert_eq!(l.attempts, None);
    }

    #[test]
    fn a_hand_made_message_decodes_with_nulls() {
        let props = BasicProperties::default().with_message_id("msg_3".into());
        let l = DeadLetter::from_message(1, &props, b"not json");
        assert_eq!(l.id.as_deref(), Some("msg_3"));
        assert_eq!(l.kind, None);
        assert_eq!(l.workspace_id, None);
        assert_eq!(l.error_class, None);
        assert_eq!(l.first_failed_at, None);
        assert_eq!(body_to_json(b"not json"), Value::from("not json"));
    }

    #[test]
    fn workspace_only_for_organization_and_membership_events() {
        let b = serde_json::json!({"data": {"id": "user_1", "organization": {"id": "org_x"}}});
        assert_eq!(workspace_of("user.updated", &b), None);
        assert_eq!(
            workspace_of("organization.deleted", &b).as_deref(),
            Some("user_1")
        );
        assert_eq!(
            workspace_of("organizationMembership.deleted", &b).as_deref(),
            Some("org_x")
        );
    }
}
