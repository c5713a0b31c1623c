//! The `kafka` source's and sink's settings: the raw serde structs (what a
//! user writes under `source: {kafka: ...}` and `sink: {kafka: ...}`), their
//! pure validation into [`KafkaSourceConfig`] and [`KafkaSinkConfig`], and
//! nothing that connects.
//!
//! `weft validate` and `weft run` both come here through
//! [`crate::check::check`], so a problem is reported with its document
//! path, line and column like any other config problem.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use weft_core::config::Issue;
use weft_core::config::raw::ConnectorSettings;

pub use crate::broker::settings::describe;
use crate::broker::settings::{duration, issue, parse};
use crate::broker::{EventId, Format, Template};

/// The source's settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaSource {
    /// The bootstrap brokers, `host:port[,host:port...]` (plain TCP: TLS
    /// and SASL are not built in).
    pub brokers: String,
    /// The topics to consume (at least one).
    pub topics: Vec<String>,
    /// The consumer group (default `weft-<system>`). With `offsets:
    /// store` weft commits its offsets to the group as well (after they
    /// are stored, for lag tools, never read back but at a first start);
    /// with `offsets: group` the group's committed offsets are the
    /// position.
    pub group: Option<String>,
    /// Where the position lives. `store` (default): weft's store, in the
    /// transaction of the messages, every partition of the topics
    /// assigned to this weft (no group membership, no rebalances; on
    /// several nodes the source runs on one node at a time, by lease).
    /// `group`: a member of the consumer group, which spreads the
    /// partitions over its members; offsets committed to Kafka after
    /// each store commit.
    pub offsets: Option<Offsets>,
    /// Where a partition without a position starts: `earliest` (default:
    /// everything the topic holds) or `latest` (messages produced from
    /// now on). A partition created while weft runs starts at its
    /// earliest.
    pub start: Option<Start>,
    /// Messages per store commit at most (default 256): what arrives
    /// without a 5 ms pause, up to this many.
    pub batch: Option<usize>,
    /// Messages whose value is larger go to the DLQ (default 1 MiB).
    pub max_message_bytes: Option<usize>,
    /// `json` (default): the value is one JSON value; a CloudEvents
    /// structured-mode message (`content-type:
    /// application/cloudevents+json`) is unwrapped.
    /// `{avro: {schema, confluent, schema_id}}` or `{protobuf: {schema:
    /// file.proto, message: pkg.Msg, confluent, schema_id,
    /// allow_unknown_fields}}` (`broker/format.rs`): a message that does
    /// not decode is dead-lettered with the reason.
    pub format: Option<Format>,
    /// `auto` (default): the event id is `ce_id` (with `ce_source`), else
    /// `<topic>/<partition>/<offset>`. `position`: always the position.
    pub event_id: Option<EventId>,
    /// CloudEvents `type` of messages without `ce_type` (default
    /// `<system>.message`).
    pub event_type: Option<String>,
    /// How long connecting to a broker may take (default `10s`).
    pub connect_timeout: Option<String>,
    /// With `offsets: group`, the group session timeout (default `45s`,
    /// librdkafka's): how soon a weft that died without leaving the group
    /// loses its partitions to another member (or to itself, restarted).
    /// Heartbeats go every third of it.
    pub session_timeout: Option<String>,
}

/// Where the source's position lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Offsets {
    /// In weft's store, saved with the batch (the default).
    #[default]
    Store,
    /// The consumer group's committed offsets.
    Group,
}

/// Where a new group starts on a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    #[default]
    Earliest,
    Latest,
}

impl Start {
    /// librdkafka's `auto.offset.reset`.
    pub fn reset(self) -> &'static str {
        match self {
            Start::Earliest => "earliest",
            Start::Latest => "latest",
        }
    }
}

/// A validated `kafka` source.
#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group: String,
    pub offsets: Offsets,
    pub start: Start,
    pub batch: usize,
    pub max_message_bytes: usize,
    pub format: Format,
    pub event_id: EventId,
    pub event_type: String,
    pub connect_timeout: Duration,
    pub session_timeout: Duration,
}

/// The sink's settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaSink {
    /// The bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// The topic, with `{key}` (the entity key) and `{field}` / `{a.b}`
    /// (a string or number of the payload) placeholders; a filled-in name
    /// must be a Kafka topic name (`[a-zA-Z0-9._-]`, at most 249 bytes).
    pub topic: String,
    /// Headers added to every message (values may use `${ENV}`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `ce_type` of the messages (default `weft.<flow>`).
    pub event_type: Option<String>,
    /// `ce_source` of the messages (default `weft/<flow>`).
    pub event_source: Option<String>,
    /// Messages whose value is larger are refused (permanent, DLQ) before
    /// they are sent (default 1,000,000 bytes: the brokers' default
    /// `message.max.bytes`).
    pub max_message_bytes: Option<usize>,
    /// How long a batch may wait for the brokers' acknowledgements
    /// (default `30s`, librdkafka's `message.timeout.ms`); past it the
    /// writes are retried with the same idempotency keys.
    pub timeout: Option<String>,
    /// How long connecting may take before the destination counts as down
    /// (default `5s`; the producer keeps trying in the background).
    pub connect_timeout: Option<String>,
    /// How the payload is written: `json` (default), `{avro: {schema:
    /// ...}}` or `{protobuf: {schema: file.proto, message: pkg.Msg}}`
    /// (`broker/format.rs`; the file relative to the config file's
    /// folder); a record the schema does not fit is dead-lettered with
    /// the reason.
    pub format: Option<Format>,
}

/// A validated `kafka` sink.
#[derive(Debug, Clone)]
pub struct KafkaSinkConfig {
    pub brokers: String,
    pub topic: Template,
    /// The topic as written (for messages).
    pub topic_text: String,
    pub headers: Vec<(String, String)>,
    pub event_type: Option<String>,
    pub event_source: Option<String>,
    pub max_message_bytes: usize,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub format: Format,
}

/// The headers weft writes itself (besides `ce_*`): a configured `headers`
/// entry may not name one.
pub const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "x-correlation-id",
    "x-causation-id",
    "traceparent",
    "tracestate",
];

impl KafkaSourceConfig {
    /// Validate the settings of system `system`'s source; every problem,
    /// each with its document path.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.source.kafka");
        let raw: RawKafkaSource = parse(&base, settings)?;
        let mut issues = Vec::new();
        brokers_issues(&mut issues, &format!("{base}.brokers"), &raw.brokers);
        if raw.topics.is_empty() {
            issues.push(issue(format!("{base}.topics"), "name at least one topic"));
        }
        for (i, t) in raw.topics.iter().enumerate() {
            if let Err(m) = topic_name(t) {
                issues.push(issue(format!("{base}.topics[{i}]"), m));
            }
        }
        let group = raw.group.clone().unwrap_or_else(|| default_group(system));
        if group.is_empty() || group.len() > 255 || group.chars().any(char::is_control) {
            issues.push(issue(
                format!("{base}.group"),
                format!("`{group}` is not a group id (1 to 255 bytes, no control characters)"),
            ));
        }
        let batch = raw.batch.unwrap_or(256);
        if batch == 0 || batch > 10_000 {
            issues.push(issue(
                format!("{base}.batch"),
                "must be between 1 and 10000",
            ));
        }
        let max_message_bytes = raw.max_message_bytes.unwrap_or(1 << 20);
        if max_message_bytes == 0 {
            issues.push(issue(
                format!("{base}.max_message_bytes"),
                "must be greater than 0",
            ));
        }
        let connect_timeout = duration(
            &mut issues,
            &format!("{base}.connect_timeout"),
            raw.connect_timeout.as_deref(),
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(300)),
        );
        let session_timeout = duration(
            &mut issues,
            &format!("{base}.session_timeout"),
            raw.session_timeout.as_deref(),
            Duration::from_secs(45),
            (Duration::from_secs(1), Duration::from_secs(3600)),
        );
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(KafkaSourceConfig {
            brokers: raw.brokers.trim().to_owned(),
            topics: raw.topics,
            group,
            offsets: raw.offsets.unwrap_or_default(),
            start: raw.start.unwrap_or_default(),
            batch,
            max_message_bytes,
            format: raw.format.unwrap_or_default(),
            event_id: raw.event_id.unwrap_or_default(),
            event_type: raw
                .event_type
                .unwrap_or_else(|| format!("{system}.message")),
            connect_timeout,
            session_timeout,
        })
    }
}

impl KafkaSinkConfig {
    /// Validate the settings of system `system`'s sink.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.sink.kafka");
        let raw: RawKafkaSink = parse(&base, settings)?;
        let mut issues = Vec::new();
        brokers_issues(&mut issues, &format!("{base}.brokers"), &raw.brokers);
        let topic = match Template::parse(&raw.topic) {
            Ok(t) => {
                // the static part must be a topic name (`x` stands in for
                // each placeholder)
                if let Err(m) = topic_name(&t.with_placeholders("x")) {
                    issues.push(issue(format!("{base}.topic"), m));
                }
                Some(t)
            }
            Err(m) => {
                issues.push(issue(format!("{base}.topic"), m));
                None
            }
        };
        let mut headers = Vec::new();
        for (k, v) in raw.headers {
            let lower = k.to_ascii_lowercase();
            let reserved = lower.starts_with("ce_") || RESERVED_HEADERS.contains(&lower.as_str());
            if k.is_empty() || reserved {
                issues.push(issue(
                    format!("{base}.headers.{k}"),
                    if reserved {
                        "weft writes this header itself (ce_*, content-type, x-correlation-id, x-causation-id, traceparent, tracestate)"
                    } else {
                        "a header name cannot be empty"
                    },
                ));
            }
            headers.push((k, v));
        }
        let max_message_bytes = raw.max_message_bytes.unwrap_or(1_000_000);
        if max_message_bytes == 0 || max_message_bytes > 1_000_000_000 {
            issues.push(issue(
                format!("{base}.max_message_bytes"),
                "must be between 1 and 1000000000",
            ));
        }
        let timeout = duration(
            &mut issues,
            &format!("{base}.timeout"),
            raw.timeout.as_deref(),
            Duration::from_secs(30),
            (Duration::from_millis(100), Duration::from_secs(600)),
        );
        let connect_timeout = duration(
            &mut issues,
            &format!("{base}.connect_timeout"),
            raw.connect_timeout.as_deref(),
            Duration::from_secs(5),
            (Duration::from_millis(100), Duration::from_secs(300)),
        );
        let Some(topic) = topic else {
            return Err(issues);
        };
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(KafkaSinkConfig {
            brokers: raw.brokers.trim().to_owned(),
            topic,
            topic_text: raw.topic,
            headers,
            event_type: raw.event_type,
            event_source: raw.event_source,
            max_message_bytes,
            timeout,
            connect_timeout,
            format: raw.format.unwrap_or_default(),
        })
    }
}

/// The consumer group's id when none is given: `weft-<system>`.
pub fn default_group(system: &str) -> String {
    let clean: String = system
        .chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("weft-{clean}")
}

/// `host:port[,host:port...]`: each with a host and a port number. TLS and
/// SASL are not built in, so a `SSL://` or `SASL_SSL://` listener is
/// refused here rather than failing to connect later.
fn brokers_issues(issues: &mut Vec<Issue>, path: &str, brokers: &str) {
    let list: Vec<&str> = brokers.split(',').map(str::trim).collect();
    if brokers.trim().is_empty() {
        issues.push(issue(
            path.to_owned(),
            "name at least one broker, `host:port`",
        ));
        return;
    }
    for b in list {
        let lower = b.to_ascii_lowercase();
        if lower.starts_with("ssl://") || lower.starts_with("sasl_") {
            issues.push(issue(
                path.to_owned(),
                format!(
                    "`{b}`: TLS and SASL are not built into this weft: use a PLAINTEXT listener (on a trusted network or through a TLS tunnel)"
                ),
            ));
            continue;
        }
        let hp = b.strip_prefix("PLAINTEXT://").unwrap_or(b);
        let ok = hp.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty()
                && !h.contains('/')
                && !h.chars().any(char::is_whitespace)
                && p.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            issues.push(issue(
                path.to_owned(),
                format!("`{b}` is not `host:port` (a comma-separated list of brokers)"),
            ));
        }
    }
}

/// Whether `t` is a Kafka topic name: 1 to 249 bytes of `[a-zA-Z0-9._-]`,
/// not `.` or `..`.
pub fn topic_name(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{t}` is not a Kafka topic name (1 to 249 bytes of letters, digits, `.`, `_` and `-`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(v: serde_json::Value) -> Result<KafkaSourceConfig, Vec<Issue>> {
        KafkaSourceConfig::from_settings("Orders Bus", &ConnectorSettings(v))
    }
    fn sink(v: serde_json::Value) -> Result<KafkaSinkConfig, Vec<Issue>> {
        KafkaSinkConfig::from_settings("bus", &ConnectorSettings(v))
    }

    #[test]
    fn source_defaults() {
        let c = source(json!({"brokers": "127.0.0.1:9092", "topics": ["orders"]})).unwrap();
        assert_eq!(c.group, "weft-Orders_Bus");
        assert_eq!(c.start, Start::Earliest);
        assert_eq!(c.start.reset(), "earliest");
        assert_eq!(c.batch, 256);
        assert_eq!(c.max_message_bytes, 1 << 20);
        assert_eq!(c.event_id, EventId::Auto);
        assert_eq!(c.event_type, "Orders Bus.message");
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.session_timeout, Duration::from_secs(45));
        let c = source(json!({"brokers": "a:1, b:2", "topics": ["x"], "start": "latest"})).unwrap();
        assert_eq!(c.start.reset(), "latest");
    }

    #[test]
    fn every_source_problem_is_reported_with_its_path() {
        let e = source(json!({
            "brokers": "host-without-port", "topics": ["ok", "not ok"], "group": "",
            "batch": 0, "max_message_bytes": 0, "connect_timeout": "1ms",
            "session_timeout": "soon"
        }))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        let b = "systems.Orders Bus.source.kafka";
        assert_eq!(
            paths,
            [
                format!("{b}.brokers"),
                format!("{b}.topics[1]"),
                format!("{b}.group"),
                format!("{b}.batch"),
                format!("{b}.max_message_bytes"),
                format!("{b}.connect_timeout"),
                format!("{b}.session_timeout"),
            ],
            "{e:?}"
        );
        let e = source(json!({"brokers": "SSL://h:9093", "topics": ["t"]})).unwrap_err();
        assert!(e[0].message.contains("TLS and SASL"), "{e:?}");
        let e = source(json!({"brokers": "h:9092", "topics": []})).unwrap_err();
        assert!(e[0].message.contains("at least one topic"), "{e:?}");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused_at_their_path() {
        let e = source(json!({"brokers": "h:1", "topics": ["t"], "stream": "x"})).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("unknown field `stream`"), "{e:?}");
        let e = source(json!({"brokers": "h:1", "topics": ["t"], "batch": "many"})).unwrap_err();
        assert_eq!(e[0].path, "systems.Orders Bus.source.kafka.batch");
        let e = source(json!({"topics": ["t"]})).unwrap_err();
        assert!(e[0].message.contains("missing field `brokers`"), "{e:?}");
    }

    #[test]
    fn sink_settings() {
        let c = sink(json!({"brokers": "h:9092", "topic": "erp.{region}-{key}",
                            "headers": {"x-origin": "weft"}}))
        .unwrap();
        assert_eq!(c.topic_text, "erp.{region}-{key}");
        assert_eq!(c.headers, [("x-origin".to_owned(), "weft".to_owned())]);
        assert_eq!(c.max_message_bytes, 1_000_000);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        let e = sink(json!({"brokers": "h", "topic": "a b{key}",
                            "headers": {"ce_id": "x", "traceparent": "z", "": "e"},
                            "max_message_bytes": 0, "timeout": "forever"}))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        let b = "systems.bus.sink.kafka";
        assert_eq!(
            paths,
            [
                format!("{b}.brokers"),
                format!("{b}.topic"),
                format!("{b}.headers."),
                format!("{b}.headers.ce_id"),
                format!("{b}.headers.traceparent"),
                format!("{b}.max_message_bytes"),
                format!("{b}.timeout"),
            ],
            "{e:?}"
        );
        let e = sink(json!({"brokers": "h:1", "topic": "t.{key"})).unwrap_err();
        assert!(e[0].message.contains("without its"), "{e:?}");
        let e = sink(json!({"brokers": "h:1", "topic": "t", "group": "g"})).unwrap_err();
        assert!(e[0].message.contains("unknown field `group`"), "{e:?}");
    }

    #[test]
    fn topic_names() {
        assert!(topic_name("orders.v1_x-y").is_ok());
        for bad in ["", ".", "..", "a b", "a/b", "ü", &"x".repeat(250)] {
            assert!(topic_name(bad).is_err(), "{bad}");
        }
    }
}
