//! The message envelope: CloudEvents 1.0 attributes plus weft's tracing and
//! ordering attributes.
//!
//! Every record that enters weft becomes an [`Event`]. Its `id` is unique per
//! `source`; the pair is the inbox's deduplication key, so a source must give
//! the same id to the same record when it sees it twice (a webhook retried by
//! its sender, a file line re-read after a crash).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// HTTP header carrying the correlation id in and out of weft.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// HTTP header carrying the idempotency key on every outbound write.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// HTTP header carrying the causation id (the event that caused a write).
pub const CAUSATION_HEADER: &str = "x-causation-id";

/// One accepted record with its CloudEvents attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// CloudEvents `id`: unique within `source`.
    pub id: String,
    /// CloudEvents `source`, e.g. `weft:crm/webhook`.
    pub source: String,
    /// CloudEvents `type`, e.g. `crm.contact`.
    #[serde(rename = "type")]
    pub ty: String,
    /// CloudEvents `time`: when the record was accepted (or its own time).
    pub time: DateTime<Utc>,
    /// CloudEvents `subject`, when the source knows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// CloudEvents `datacontenttype`.
    pub datacontenttype: String,
    /// Correlation id: kept from the inbound request or created here, then
    /// passed on every write this event causes.
    pub correlationid: String,
    /// Id of the event that caused this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    /// The payload, as parsed JSON.
    pub data: serde_json::Value,
    /// W3C trace context the record arrived with (a broker message's
    /// `traceparent` header), passed on to every write it causes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl Event {
    /// A new event with `time` now, JSON content and a fresh correlation id
    /// unless one is given.
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        ty: impl Into<String>,
        correlation_id: Option<String>,
        data: serde_json::Value,
    ) -> Self {
        Event {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            time: Utc::now(),
            subject: None,
            datacontenttype: "application/json".to_owned(),
            correlationid: correlation_id.unwrap_or_else(new_correlation_id),
            causationid: None,
            data,
            traceparent: None,
            tracestate: None,
        }
    }

    /// The CloudEvents attributes without the data, as JSON (stored beside
    /// the payload and passed to mappings as `$event`).
    pub fn attributes(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("specversion".into(), "1.0".into());
        m.insert("id".into(), self.id.clone().into());
        m.insert("source".into(), self.source.clone().into());
        m.insert("type".into(), self.ty.clone().into());
        m.insert(
            "time".into(),
            self.time
                .to_rfc3339_opts(SecondsFormat::Millis, true)
                .into(),
        );
        if let Some(s) = &self.subject {
            m.insert("subject".into(), s.clone().into());
        }
        m.insert(
            "datacontenttype".into(),
            self.datacontenttype.clone().into(),
        );
        m.insert("correlationid".into(), self.correlationid.clone().into());
        if let Some(c) = &self.causationid {
            m.insert("causationid".into(), c.clone().into());
        }
        serde_json::Value::Object(m)
    }
}

/// A fresh correlation id (UUID v7: sortable by creation time).
pub fn new_correlation_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The idempotency key of one event's write to one destination of one flow.
///
/// Derived, not random: the same event through the same flow to the same
/// destination always gets the same key, whether it is the first attempt, a
/// retry, or a redelivery after a crash.
pub fn idempotency_key(flow: &str, destination: &str, source: &str, event_id: &str) -> String {
    let name = format!("{flow}\u{1f}{destination}\u{1f}{source}\u{1f}{event_id}");
    uuid::Uuid::new_v5(&WEFT_NAMESPACE, name.as_bytes()).to_string()
}

/// Namespace for weft's derived UUIDs.
const WEFT_NAMESPACE: uuid::Uuid = uuid::Uuid::from_bytes([
    0x8e, 0x2b, 0x1f, 0x4c, 0x7a, 0x35, 0x4d, 0x0e, 0x9b, 0x61, 0x2c, 0x55, 0x10, 0x9f, 0x3a, 0x77,
]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_key_is_stable_and_distinct() {
        let a = idempotency_key("f", "d", "s", "1");
        assert_eq!(a, idempotency_key("f", "d", "s", "1"));
        assert_ne!(a, idempotency_key("f", "d2", "s", "1"));
        assert_ne!(a, idempotency_key("f", "d", "s", "2"));
        // separators matter: ("ab","c") and ("a","bc") must differ
        assert_ne!(
            idempotency_key("ab", "c", "s", "1"),
            idempotency_key("a", "bc", "s", "1")
        );
    }

    #[test]
    fn attributes_carry_cloudevents_fields() {
        let e = Event::new("7", "weft:crm", "crm.contact", Some("c-1".into()), 1.into());
        let a = e.attributes();
        assert_eq!(a["specversion"], "1.0");
        assert_eq!(a["id"], "7");
        assert_eq!(a["correlationid"], "c-1");
        assert!(a.get("data").is_none());
    }
}
