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

/// A W3C Trace Context `traceparent` weft passes on: version `00`,
/// 32 lowercase hex (not all zero) trace id, 16 (not all zero) parent id,
/// 2 flags. Anything else is dropped, never forwarded.
pub fn valid_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// A `tracestate` weft passes on beside a valid `traceparent`: printable
/// ASCII, at most 512 characters (the W3C limit).
pub fn valid_tracestate(s: &str) -> bool {
    s.len() <= 512 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
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

/// The CloudEvents attributes of one write weft makes (the HTTP sink's
/// `cloudevents` modes, the JSON Lines envelope).
///
/// - `id`: the write's idempotency key. It is the same on every retry,
///   after a restart and after a DLQ replay, and differs per flow,
///   destination and event, so a consumer deduplicating on `source` + `id`
///   (as the spec says it may) drops exactly the repeats.
/// - `source`: `weft/<flow>`, the context the write comes from (a URI
///   reference); the system the record came from is in the flow's config.
/// - `type`: `weft.<flow>`.
/// - `subject`: the entity key, when the flow has one.
/// - `time`: the event's own time (as the source gave it, else when weft
///   accepted it).
/// - extensions `correlationid` and `causationid` (the source's event id),
///   as on the inbound envelope.
#[derive(Debug, Clone, Copy)]
pub struct Outbound<'a> {
    pub idempotency_key: &'a str,
    pub flow: &'a str,
    pub entity_key: Option<&'a str>,
    /// ms since 1970; 0: unknown (no `time`).
    pub time_ms: i64,
    pub correlation_id: &'a str,
    pub event_id: &'a str,
}

/// CloudEvents `specversion` weft writes.
pub const SPECVERSION: &str = "1.0";

impl Outbound<'_> {
    pub fn source(&self) -> String {
        format!("weft/{}", self.flow)
    }

    pub fn ty(&self) -> String {
        format!("weft.{}", self.flow)
    }

    /// RFC 3339, UTC, milliseconds.
    pub fn time(&self) -> String {
        DateTime::<Utc>::from_timestamp_millis(self.time_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// Every attribute but `datacontenttype`, as `(name, value)`: the
    /// binary mode's `ce-<name>` headers.
    pub fn attributes(&self) -> Vec<(&'static str, String)> {
        let mut a = vec![
            ("specversion", SPECVERSION.to_owned()),
            ("id", self.idempotency_key.to_owned()),
            ("source", self.source()),
            ("type", self.ty()),
        ];
        if self.time_ms != 0 {
            a.push(("time", self.time()));
        }
        if let Some(k) = self.entity_key.filter(|k| !k.is_empty()) {
            a.push(("subject", k.to_owned()));
        }
        a.push(("correlationid", self.correlation_id.to_owned()));
        a.push(("causationid", self.event_id.to_owned()));
        a
    }

    /// The structured-mode event (JSON format): the attributes,
    /// `datacontenttype: application/json` and `data`.
    pub fn structured(&self, data: &serde_json::Value) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in self.attributes() {
            m.insert(k.to_owned(), v.into());
        }
        m.insert("datacontenttype".into(), "application/json".into());
        m.insert("data".into(), data.clone());
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
    fn outbound_event_has_the_required_attributes() {
        let o = Outbound {
            idempotency_key: "k-1",
            flow: "crm_to_erp",
            entity_key: Some("c 1"),
            time_ms: 1_700_000_000_123,
            correlation_id: "corr",
            event_id: "e-1",
        };
        let v = o.structured(&serde_json::json!({"a": 1}));
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "k-1");
        assert_eq!(v["source"], "weft/crm_to_erp");
        assert_eq!(v["type"], "weft.crm_to_erp");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["subject"], "c 1");
        assert_eq!(v["data"]["a"], 1);
        let keyless = Outbound {
            entity_key: None,
            ..o
        };
        assert!(keyless.structured(&1.into()).get("subject").is_none());
        let timeless = Outbound { time_ms: 0, ..o };
        assert!(timeless.structured(&1.into()).get("time").is_none());
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

    #[test]
    fn only_well_formed_trace_context_is_passed_on() {
        assert!(valid_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
        assert!(valid_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert!(!valid_tracestate("a=\u{7f}"));
    }
}
