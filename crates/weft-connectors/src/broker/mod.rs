//! What the broker connectors share: a message's payload decoded into an
//! [`Event`] or a [`BadRecord`], CloudEvents attributes read from and
//! written to a broker's headers, and subject/topic templates.
//!
//! Every broker source follows one contract (the webhook's, with a broker's
//! ack instead of a 2xx): read a batch, hand it to `ingest`, and acknowledge
//! each message only after `ingest` returned `Ok`, so a message is either
//! durable in the journal or still the broker's. A message that cannot be
//! decoded is a [`BadRecord`] in the same batch (a DLQ entry with the
//! reason and where it was: stream and sequence, topic and offset) and is
//! acknowledged with the others once that entry is committed. Event ids
//! come from the message (`ce-id`, a broker's message id) or from its
//! position in the broker, never from the clock, so a redelivered message
//! gets the id it had and the journal's dedupe drops the copy.
//!
//! Every broker sink publishes with the broker's deduplication id set to
//! the idempotency key and counts a delivery as written only once the
//! broker confirmed it (a JetStream publish ack, a publisher confirm).
//!
//! - [`nats`]: NATS JetStream (cargo feature `nats`, on by default).
//! - [`amqp`]: RabbitMQ, AMQP 0.9.1 (cargo feature `amqp`, on by default).
//! - [`redis`]: Redis Streams (cargo feature `redis`, on by default); Redis
//!   has no deduplication id, so its sink keeps one key per idempotency key
//!   beside the stream (a Lua script).
//! - [`mqtt`]: MQTT 5 (cargo feature `mqtt`, on by default).
//! - [`kafka`]: Kafka (cargo feature `kafka`, on by default): consumer
//!   groups with offsets committed after the commit, an idempotent
//!   producer.

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod format;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(
    feature = "nats",
    feature = "amqp",
    feature = "redis",
    feature = "mqtt",
    feature = "kafka"
))]
pub(crate) mod settings;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::Value;
use weft_core::Event;

pub use format::Format;

use crate::sink::Delivery;
use crate::source::BadRecord;

/// `weft check` for a broker source of `kind`: its config as the connector
/// reads it, then the broker's own probe.
pub(crate) async fn probe_source(
    system: &str,
    kind: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> crate::probe::Finding {
    use crate::probe::Finding;
    let _ = (system, settings);
    match kind {
        #[cfg(feature = "nats")]
        "nats" => match nats::NatsSourceConfig::from_settings(system, settings) {
            Ok(c) => nats::probe_source(system, &c).await,
            Err(issues) => Finding::fail(nats::config::describe(&issues)),
        },
        #[cfg(feature = "amqp")]
        "amqp" => match amqp::AmqpSourceConfig::from_settings(system, settings) {
            Ok(c) => amqp::probe_source(system, &c).await,
            Err(issues) => Finding::fail(amqp::config::describe(&issues)),
        },
        #[cfg(feature = "redis")]
        "redis" => match redis::RedisSourceConfig::from_settings(system, settings) {
            Ok(c) => redis::probe_source(&c).await,
            Err(issues) => Finding::fail(redis::config::describe(&issues)),
        },
        #[cfg(feature = "mqtt")]
        "mqtt" => match mqtt::MqttSourceConfig::from_settings(system, settings) {
            Ok(c) => mqtt::probe(&c.broker, c.keep_alive, c.connect_timeout).await,
            Err(issues) => Finding::fail(mqtt::config::describe(&issues)),
        },
        #[cfg(feature = "kafka")]
        "kafka" => match kafka::KafkaSourceConfig::from_settings(system, settings) {
            Ok(c) => kafka::probe_source(&c).await,
            Err(issues) => Finding::fail(kafka::config::describe(&issues)),
        },
        other => Finding::fail(crate::without_feature(other, other)),
    }
}

/// `weft check` for an MQTT sink: a connection of its own (the sink's
/// client id would take the running hub's session over).
pub(crate) async fn probe_mqtt_sink(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> crate::probe::Finding {
    #[cfg(feature = "mqtt")]
    {
        match mqtt::MqttSinkConfig::from_settings(system, settings) {
            Ok(c) => mqtt::probe(&c.broker, c.keep_alive, c.connect_timeout).await,
            Err(issues) => crate::probe::Finding::fail(mqtt::config::describe(&issues)),
        }
    }
    #[cfg(not(feature = "mqtt"))]
    {
        let _ = (system, settings);
        crate::probe::Finding::fail(crate::without_feature("mqtt", "MQTT"))
    }
}

/// The CloudEvents attributes a message carries in its headers (binary
/// content mode) or in its body (structured mode), with weft's correlation
/// id and the W3C trace context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub id: Option<String>,
    pub source: Option<String>,
    pub ty: Option<String>,
    pub time: Option<String>,
    pub subject: Option<String>,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// How one broker binding names the CloudEvents attributes in its headers:
/// NATS and HTTP `ce-id`, Kafka `ce_id`, AMQP `cloudEvents:id`.
#[derive(Debug, Clone, Copy)]
pub struct Binding {
    pub prefix: &'static str,
    /// The header of `datacontenttype` (`Content-Type`, Kafka `content-type`).
    pub content_type: &'static str,
}

/// The NATS protocol binding (CloudEvents NATS binding 1.0.2, binary mode).
pub const NATS: Binding = Binding {
    prefix: "ce-",
    content_type: "Content-Type",
};

/// The AMQP protocol binding (CloudEvents AMQP binding 1.0.2): the
/// attributes are application properties (RabbitMQ message headers)
/// `cloudEvents:id`, ...; `datacontenttype` is the message's
/// `content_type` property, which the AMQP connector hands over under
/// `content-type`.
pub const AMQP: Binding = Binding {
    prefix: "cloudEvents:",
    content_type: "content-type",
};

/// The binding's other prefix (`cloudEvents_`, for JMS and the like): a
/// receiver accepts both.
pub const AMQP_UNDERSCORE: Binding = Binding {
    prefix: "cloudEvents_",
    content_type: "content-type",
};

/// The Redis Streams binding (weft's own: CloudEvents defines none for
/// Redis): the attributes are entry fields named as in the Kafka binding,
/// `ce_id`, `ce_source`, ...; `datacontenttype` is the field `content-type`.
pub const REDIS: Binding = Binding {
    prefix: "ce_",
    content_type: "content-type",
};

/// The Kafka protocol binding (CloudEvents Kafka binding 1.0.2, binary
/// mode): the attributes are record headers `ce_id`, `ce_source`, ...;
/// `datacontenttype` is the header `content-type`.
pub const KAFKA: Binding = Binding {
    prefix: "ce_",
    content_type: "content-type",
};

/// The MQTT protocol binding (CloudEvents MQTT binding 1.0.2, MQTT 5
/// binary mode): each attribute is a user property named as the attribute
/// (`id`, `source`, ...); `datacontenttype` is the message's Content Type
/// property, which the MQTT connector hands over under `content-type`.
pub const MQTT: Binding = Binding {
    prefix: "",
    content_type: "content-type",
};

/// The correlation id header weft reads and writes beside `ce-correlationid`
/// (the same as its HTTP sink's).
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// The causation id header: the id of the event that caused a write.
pub const CAUSATION_HEADER: &str = "x-causation-id";

impl Attributes {
    /// The attributes in a message's headers; `get` looks a header up by
    /// name (case as the binding writes it; brokers that fold case look up
    /// case-insensitively themselves).
    pub fn from_headers(b: Binding, get: impl Fn(&str) -> Option<String>) -> Self {
        let ce = |name: &str| get(&format!("{}{name}", b.prefix)).filter(|v| !v.is_empty());
        Attributes {
            id: ce("id"),
            source: ce("source"),
            ty: ce("type"),
            time: ce("time"),
            subject: ce("subject"),
            content_type: get(b.content_type)
                .or_else(|| get(&b.content_type.to_ascii_lowercase()))
                .filter(|v| !v.is_empty()),
            correlation_id: ce("correlationid")
                .or_else(|| get(CORRELATION_HEADER).filter(|v| !v.is_empty())),
            traceparent: get("traceparent").filter(|v| weft_core::event::valid_traceparent(v)),
            tracestate: get("tracestate").filter(|v| !v.is_empty()),
        }
    }

    /// Each attribute from `self`, or else from `other` (a message read by
    /// several bindings: AMQP's two prefixes and the `ce-` headers some
    /// publishers set).
    pub fn or(self, other: Attributes) -> Attributes {
        Attributes {
            id: self.id.or(other.id),
            source: self.source.or(other.source),
            ty: self.ty.or(other.ty),
            time: self.time.or(other.time),
            subject: self.subject.or(other.subject),
            content_type: self.content_type.or(other.content_type),
            correlation_id: self.correlation_id.or(other.correlation_id),
            traceparent: self.traceparent.or(other.traceparent),
            tracestate: self.tracestate.or(other.tracestate),
        }
    }

    /// Whether the message is a CloudEvent in structured mode.
    fn structured(&self) -> bool {
        self.content_type.as_deref().is_some_and(|c| {
            c.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/cloudevents+json")
            })
        })
    }
}

/// What a source knows of one message besides its payload.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    /// The message's id when it carries none (`ORDERS:17`): its position.
    pub position_id: String,
    /// The broker's own message id (`Nats-Msg-Id`), if any.
    pub message_id: Option<String>,
    /// Where it was, for a DLQ entry: `nats stream ORDERS seq 17 (subject orders.new)`.
    pub location: String,
    /// The broker's subject/topic: the event's subject when it names none.
    pub subject: &'a str,
    /// When the broker stored it: the event's time when it names none.
    pub stored_at: Option<DateTime<Utc>>,
    pub attributes: Attributes,
}

/// Which id an event gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventId {
    /// `ce-id` (with `ce-source`: CloudEvents ids are unique per source),
    /// else the broker's message id, else the position.
    #[default]
    Auto,
    /// Always the position (`stream:seq`): every stored message is an
    /// event, whatever ids its publisher gave.
    Position,
}

/// How a source turns messages into records.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub format: Format,
    pub max_bytes: usize,
    pub event_id: EventId,
    /// CloudEvents `source` of events whose message names none.
    pub default_source: String,
    /// CloudEvents `type` of events whose message names none.
    pub default_type: String,
}

/// DLQ entries keep at most this much of a message's text.
const MAX_RAW: usize = 64 * 1024;

impl Decoder {
    /// The record of one message: an event, or a bad record with the reason
    /// (too large, not JSON, a structured CloudEvent without `data`).
    pub fn record(&self, m: &Incoming<'_>, payload: &[u8]) -> crate::Record {
        let a = &m.attributes;
        let id = self.id(m, a);
        let correlation_id = a
            .correlation_id
            .clone()
            .unwrap_or_else(weft_core::event::new_correlation_id);
        let bad = |error: String| {
            crate::Record::Bad(BadRecord {
                id: id.clone(),
                location: m.location.clone(),
                raw: truncate(String::from_utf8_lossy(
                    &payload[..payload.len().min(MAX_RAW + 4)],
                )),
                error: format!("{}: {error}", m.location),
                correlation_id: correlation_id.clone(),
            })
        };
        if payload.len() > self.max_bytes {
            return bad(format!(
                "a message of {} bytes is over max_message_bytes ({})",
                payload.len(),
                self.max_bytes
            ));
        }
        let data: Value = match self.format.decode(payload) {
            Ok(v) => v,
            Err(e) => return bad(e),
        };
        let (data, a) = if a.structured() && self.format.is_json() {
            match unwrap_structured(data, a) {
                Ok(x) => x,
                Err(e) => return bad(e),
            }
        } else {
            (data, a.clone())
        };
        let id = self.id(m, &a);
        let mut ev = Event::new(
            id,
            a.source
                .clone()
                .unwrap_or_else(|| self.default_source.clone()),
            a.ty.clone().unwrap_or_else(|| self.default_type.clone()),
            Some(correlation_id),
            data,
        );
        ev.time = a
            .time
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .or(m.stored_at)
            .unwrap_or(ev.time);
        ev.subject = Some(a.subject.clone().unwrap_or_else(|| m.subject.to_owned()));
        ev.traceparent = a.traceparent;
        ev.tracestate = a.tracestate;
        crate::Record::Good(ev)
    }

    /// A bad record for a message refused before decoding (an AMQP message
    /// without any id, when ids are required): `error` is the reason.
    pub fn reject(&self, m: &Incoming<'_>, payload: &[u8], error: &str) -> crate::Record {
        crate::Record::Bad(BadRecord {
            id: m.position_id.clone(),
            location: m.location.clone(),
            raw: truncate(String::from_utf8_lossy(
                &payload[..payload.len().min(MAX_RAW + 4)],
            )),
            error: format!("{}: {error}", m.location),
            correlation_id: m
                .attributes
                .correlation_id
                .clone()
                .unwrap_or_else(weft_core::event::new_correlation_id),
        })
    }

    /// Whether a message names its own id (a CloudEvents id or the
    /// broker's message id), in its headers or, structured, in its body.
    pub fn names_an_id(m: &Incoming<'_>) -> bool {
        m.attributes.id.is_some() || m.message_id.is_some()
    }

    fn id(&self, m: &Incoming<'_>, a: &Attributes) -> String {
        match self.event_id {
            EventId::Position => m.position_id.clone(),
            EventId::Auto => match (&a.id, &a.source) {
                (Some(id), Some(src)) => format!("{src}#{id}"),
                (Some(id), None) => id.clone(),
                _ => m
                    .message_id
                    .clone()
                    .unwrap_or_else(|| m.position_id.clone()),
            },
        }
    }
}

/// A structured-mode CloudEvent: its `data` and its attributes (the body's
/// win over the headers').
fn unwrap_structured(v: Value, headers: &Attributes) -> Result<(Value, Attributes), String> {
    let Value::Object(mut m) = v else {
        return Err(
            "a structured CloudEvent (application/cloudevents+json) that is not an object".into(),
        );
    };
    let data = if let Some(d) = m.remove("data") {
        d
    } else if m.contains_key("data_base64") {
        return Err("a CloudEvent with binary data (data_base64) in a JSON source".into());
    } else {
        return Err("a structured CloudEvent without data".into());
    };
    let s = |m: &serde_json::Map<String, Value>, k: &str| {
        m.get(k).and_then(Value::as_str).map(str::to_owned)
    };
    let a = Attributes {
        id: s(&m, "id").or_else(|| headers.id.clone()),
        source: s(&m, "source").or_else(|| headers.source.clone()),
        ty: s(&m, "type").or_else(|| headers.ty.clone()),
        time: s(&m, "time").or_else(|| headers.time.clone()),
        subject: s(&m, "subject").or_else(|| headers.subject.clone()),
        content_type: s(&m, "datacontenttype"),
        correlation_id: s(&m, "correlationid").or_else(|| headers.correlation_id.clone()),
        traceparent: s(&m, "traceparent")
            .filter(|t| weft_core::event::valid_traceparent(t))
            .or_else(|| headers.traceparent.clone()),
        tracestate: s(&m, "tracestate").or_else(|| headers.tracestate.clone()),
    };
    Ok((data, a))
}

/// Keep DLQ entries bounded: at most 64 KiB of a message's text.
fn truncate(s: std::borrow::Cow<'_, str>) -> String {
    let mut s = s.into_owned();
    if s.len() > MAX_RAW {
        let mut cut = MAX_RAW;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The CloudEvents attributes of an outgoing message (binary mode), plus
/// the correlation and causation ids and the trace context: `(header,
/// value)` in the binding's names. `ce-id` is the idempotency key (the same
/// on every retry: a consumer can dedupe by it), `ce-time` the event's own
/// time, `ce-subject` the entity key.
pub fn outgoing_headers(b: Binding, d: &Delivery, source: &str, ty: &str) -> Vec<(String, String)> {
    let ce = |n: &str| format!("{}{n}", b.prefix);
    let mut h = vec![
        (ce("specversion"), "1.0".to_owned()),
        (ce("id"), d.idempotency_key.clone()),
        (ce("source"), source.to_owned()),
        (ce("type"), ty.to_owned()),
    ];
    if let Some(t) = DateTime::<Utc>::from_timestamp_millis(d.context.event_time_ms)
        .filter(|_| d.context.event_time_ms > 0)
    {
        h.push((ce("time"), t.to_rfc3339_opts(SecondsFormat::Millis, true)));
    }
    if let Some(k) = &d.entity_key {
        h.push((ce("subject"), k.clone()));
    }
    h.push((b.content_type.to_owned(), "application/json".to_owned()));
    h.push((CORRELATION_HEADER.to_owned(), d.correlation_id.clone()));
    h.push((CAUSATION_HEADER.to_owned(), d.event_id.clone()));
    if let Some(t) = &d.context.traceparent {
        h.push(("traceparent".to_owned(), t.clone()));
        if let Some(s) = &d.context.tracestate {
            h.push(("tracestate".to_owned(), s.clone()));
        }
    }
    h
}

/// A subject or topic with placeholders: `{key}` (the entity key) and
/// `{field}` / `{a.b}` (a string or number of the payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Key,
    Field(Vec<String>),
}

impl Template {
    /// Parse `s`; an unclosed or empty placeholder is an error.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find('{') {
            if i > 0 {
                parts.push(Part::Text(rest[..i].to_owned()));
            }
            let Some(j) = rest[i..].find('}') else {
                return Err(format!("`{s}`: a `{{` without its `}}`"));
            };
            let name = rest[i + 1..i + j].trim();
            if name.is_empty() {
                return Err(format!("`{s}`: an empty placeholder `{{}}`"));
            }
            parts.push(if name == "key" {
                Part::Key
            } else {
                Part::Field(name.split('.').map(str::to_owned).collect())
            });
            rest = &rest[i + j + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if parts
            .iter()
            .any(|p| matches!(p, Part::Text(t) if t.contains('}')))
        {
            return Err(format!("`{s}`: a `}}` without its `{{`"));
        }
        Ok(Template { parts })
    }

    /// Whether it has no placeholder.
    pub fn literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Text(t)] => Some(t),
            _ => None,
        }
    }

    /// The text with every placeholder replaced by `with` (a check of the
    /// template's static part: `*` for a NATS subject token).
    pub fn with_placeholders(&self, with: &str) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                _ => with,
            })
            .collect()
    }

    /// Whether every placeholder fills a whole `sep`-separated token (a
    /// NATS subject's `.`), so the template names a wildcard pattern.
    pub fn placeholders_are_tokens(&self, sep: char) -> bool {
        self.parts.iter().enumerate().all(|(i, p)| {
            if matches!(p, Part::Text(_)) {
                return true;
            }
            let before = i == 0 || matches!(&self.parts[i - 1], Part::Text(t) if t.ends_with(sep));
            let after = i + 1 == self.parts.len()
                || matches!(&self.parts[i + 1], Part::Text(t) if t.starts_with(sep));
            before && after
        })
    }

    /// The text for one delivery; each value passed through `escape`. A
    /// missing key or field, or a value that is not a string or number, is
    /// an error naming it.
    pub fn render(&self, d: &Delivery, escape: impl Fn(&str) -> String) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Key => match &d.entity_key {
                    Some(k) => out.push_str(&escape(k)),
                    None => {
                        return Err("`{key}`: the flow gives this record no entity key".into());
                    }
                },
                Part::Field(path) => {
                    let mut v = &d.payload;
                    for seg in path {
                        v = v.get(seg).unwrap_or(&Value::Null);
                    }
                    let s = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        other => {
                            return Err(format!(
                                "`{{{}}}`: the payload has {} there, not a string or number",
                                path.join("."),
                                crate::sink::kind_of(other)
                            ));
                        }
                    };
                    out.push_str(&escape(&s));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn incoming(attrs: Attributes) -> Incoming<'static> {
        Incoming {
            position_id: "S:7".into(),
            message_id: None,
            location: "nats stream S seq 7 (subject a.b)".into(),
            subject: "a.b",
            stored_at: None,
            attributes: attrs,
        }
    }

    fn decoder(event_id: EventId) -> Decoder {
        Decoder {
            format: Format::Json,
            max_bytes: 200,
            event_id,
            default_source: "weft:crm/nats".into(),
            default_type: "crm.message".into(),
        }
    }

    #[test]
    fn ids_come_from_the_message_then_the_position() {
        let d = decoder(EventId::Auto);
        let good = |r: crate::Record| match r {
            crate::Record::Good(e) => e,
            crate::Record::Bad(b) => panic!("{b:?}"),
        };
        let e = good(d.record(&incoming(Attributes::default()), b"{}"));
        assert_eq!(e.id, "S:7");
        assert_eq!(e.subject.as_deref(), Some("a.b"));
        assert_eq!(e.source, "weft:crm/nats");
        let mut m = incoming(Attributes::default());
        m.message_id = Some("m-1".into());
        assert_eq!(good(d.record(&m, b"{}")).id, "m-1");
        let a = Attributes {
            id: Some("42".into()),
            source: Some("/crm".into()),
            ty: Some("crm.created".into()),
            time: Some("2026-01-02T03:04:05Z".into()),
            correlation_id: Some("c-1".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            ..Default::default()
        };
        let e = good(d.record(&incoming(a.clone()), b"{\"x\":1}"));
        assert_eq!(e.id, "/crm#42");
        assert_eq!(e.ty, "crm.created");
        assert_eq!(e.correlationid, "c-1");
        assert_eq!(e.time.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        assert!(e.traceparent.is_some());
        // position ids ignore what the publisher said
        let e = good(decoder(EventId::Position).record(&incoming(a), b"{}"));
        assert_eq!(e.id, "S:7");
    }

    #[test]
    fn bad_messages_say_why_and_where() {
        let d = decoder(EventId::Auto);
        let bad = |r: crate::Record| match r {
            crate::Record::Bad(b) => b,
            crate::Record::Good(e) => panic!("{e:?}"),
        };
        let b = bad(d.record(&incoming(Attributes::default()), b"not json"));
        assert_eq!(b.id, "S:7");
        assert!(b.error.starts_with("nats stream S seq 7"), "{}", b.error);
        assert!(b.error.contains("not JSON"), "{}", b.error);
        assert_eq!(b.raw, "not json");
        let big = vec![b'1'; 201];
        let b = bad(d.record(&incoming(Attributes::default()), &big));
        assert!(
            b.error
                .contains("201 bytes is over max_message_bytes (200)"),
            "{}",
            b.error
        );
    }

    #[test]
    fn structured_cloudevents_are_unwrapped() {
        let d = decoder(EventId::Auto);
        let a = Attributes {
            content_type: Some("application/cloudevents+json; charset=utf-8".into()),
            ..Default::default()
        };
        let body = json!({"specversion": "1.0", "id": "9", "source": "/erp", "type": "erp.x",
                          "datacontenttype": "application/json", "data": {"n": 1}});
        let r = d.record(&incoming(a.clone()), body.to_string().as_bytes());
        let crate::Record::Good(e) = r else {
            panic!("{r:?}")
        };
        assert_eq!(e.data, json!({"n": 1}));
        assert_eq!(e.id, "/erp#9");
        assert_eq!(e.ty, "erp.x");
        let r = d.record(&incoming(a), b"{\"id\": \"9\"}");
        assert!(matches!(r, crate::Record::Bad(b) if b.error.contains("without data")));
    }

    #[test]
    fn headers_are_read_by_the_binding() {
        let h: std::collections::HashMap<&str, &str> = [
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("Content-Type", "application/json"),
            ("x-correlation-id", "c"),
        ]
        .into();
        let a = Attributes::from_headers(NATS, |n| h.get(n).map(|v| v.to_string()));
        assert_eq!(a.id.as_deref(), Some("1"));
        assert_eq!(a.source.as_deref(), Some("/s"));
        assert_eq!(a.content_type.as_deref(), Some("application/json"));
        assert_eq!(a.correlation_id.as_deref(), Some("c"));
    }

    #[test]
    fn templates_fill_keys_and_fields() {
        let d = Delivery {
            id: 1,
            idempotency_key: "k".into(),
            correlation_id: "c".into(),
            event_id: "e".into(),
            entity_key: Some("a.b".into()),
            attempt: 1,
            payload: json!({"region": "eu", "n": 3, "o": {}}),
            context: Default::default(),
        };
        let t = Template::parse("orders.{region}.{key}").unwrap();
        assert!(t.placeholders_are_tokens('.'));
        assert_eq!(t.with_placeholders("*"), "orders.*.*");
        assert_eq!(
            t.render(&d, |s| s.replace('.', "_")).unwrap(),
            "orders.eu.a_b"
        );
        assert_eq!(
            Template::parse("x.{n}")
                .unwrap()
                .render(&d, str::to_owned)
                .unwrap(),
            "x.3"
        );
        assert!(
            Template::parse("x.{o}")
                .unwrap()
                .render(&d, str::to_owned)
                .unwrap_err()
                .contains("an object")
        );
        assert!(
            !Template::parse("x-{key}")
                .unwrap()
                .placeholders_are_tokens('.')
        );
        assert!(Template::parse("x.{key").is_err());
        assert!(Template::parse("x.{}").is_err());
        assert!(Template::parse("x}").is_err());
        assert_eq!(Template::parse("a.b").unwrap().literal(), Some("a.b"));
    }

    #[test]
    fn outgoing_headers_carry_the_cloudevent() {
        let d = Delivery {
            id: 1,
            idempotency_key: "k-1".into(),
            correlation_id: "c-1".into(),
            event_id: "e-1".into(),
            entity_key: Some("42".into()),
            attempt: 1,
            payload: json!({}),
            context: crate::sink::DeliveryContext {
                event_time_ms: 1_767_225_600_000,
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                ..Default::default()
            },
        };
        let h: std::collections::HashMap<String, String> =
            outgoing_headers(NATS, &d, "weft/f", "weft.f")
                .into_iter()
                .collect();
        assert_eq!(h["ce-id"], "k-1");
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-source"], "weft/f");
        assert_eq!(h["ce-type"], "weft.f");
        assert_eq!(h["ce-time"], "2026-01-01T00:00:00.000Z");
        assert_eq!(h["ce-subject"], "42");
        assert_eq!(h["x-correlation-id"], "c-1");
        assert_eq!(h["x-causation-id"], "e-1");
        assert!(h.contains_key("traceparent"));
        assert!(!h.contains_key("tracestate"));
    }
}
