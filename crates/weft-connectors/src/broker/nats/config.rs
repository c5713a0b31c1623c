//! The `nats` source's and sink's settings: the raw serde structs (what a
//! user writes under `source: {nats: ...}` and `sink: {nats: ...}`), their
//! pure validation into [`NatsSourceConfig`] and [`NatsSinkConfig`], and
//! nothing that connects.
//!
//! weft-core hands the settings over as written ([`ConnectorSettings`]);
//! `weft validate` and `weft run` both come here through
//! [`crate::check::check`], so a problem is reported with its document
//! path, line and column like any other config problem.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use weft_core::config::raw::ConnectorSettings;
use weft_core::config::{Issue, Secret};

pub use crate::broker::settings::describe;
use crate::broker::settings::{duration, issue, parse};
use crate::broker::{EventId, Format, Template};

/// The source's settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNatsSource {
    /// `nats://[user:password@]host:4222` (several servers: comma-separated;
    /// `tls://` for TLS). Use `${ENV}` for a password.
    pub url: Secret,
    /// An authentication token, when the server wants one.
    pub token: Option<Secret>,
    /// The JetStream stream to consume.
    pub stream: String,
    /// The subject the consumer takes from the stream (a filter, wildcards
    /// allowed), and the stream's subject when weft creates it.
    pub subject: Option<String>,
    /// Several subjects (instead of `subject`; a consumer filtering on more
    /// than one subject needs nats-server 2.10).
    pub subjects: Option<Vec<String>>,
    /// The durable consumer's name (default `weft-<system>`): its position
    /// in the stream survives restarts of weft and of the server.
    pub consumer: Option<String>,
    /// `true` (default): create the stream (file storage, `subjects`) and
    /// the durable consumer when they are missing. `false`: both must
    /// exist; a missing one stops the source with the reason.
    pub create: Option<bool>,
    /// Where a consumer weft creates starts: `all` (default: every message
    /// the stream holds) or `new` (messages stored from now on).
    pub start: Option<Start>,
    /// Messages per fetch and per store commit at most (default 256).
    pub batch: Option<usize>,
    /// How long an idle fetch waits for a message before asking again
    /// (default `5s`). Messages are handed over as they arrive, not after it.
    pub max_wait: Option<String>,
    /// How long the server waits for an ack before it delivers a message
    /// again (default `30s`): how soon messages held by a weft that died are
    /// redelivered. weft extends it while it retries a store commit.
    pub ack_wait: Option<String>,
    /// Deliveries of one message at most (default: unlimited). A message
    /// past it is not delivered again, so it can be lost if weft died with
    /// it every time; weft itself never gives up on a message (bad ones go
    /// to the DLQ).
    pub max_deliver: Option<i64>,
    /// Messages delivered and not yet acknowledged at most (default 1000,
    /// at least `batch`).
    pub max_ack_pending: Option<i64>,
    /// `json` (default): one JSON value per message; a CloudEvents
    /// structured-mode message is unwrapped.
    /// `{avro: {schema, confluent, schema_id}}` or `{protobuf: {schema:
    /// file.proto, message: pkg.Msg, confluent, schema_id,
    /// allow_unknown_fields}}` (`broker/format.rs`): a message that does
    /// not decode is dead-lettered with the reason.
    pub format: Option<Format>,
    /// Larger messages go to the DLQ (default 1 MiB, the server's default
    /// `max_payload`).
    pub max_message_bytes: Option<usize>,
    /// `auto` (default): the event id is `ce-id` (with `ce-source`), else
    /// `Nats-Msg-Id`, else `<stream>:<sequence>`. `position`: always
    /// `<stream>:<sequence>` (when publishers reuse `Nats-Msg-Id`s beyond
    /// the stream's duplicate window for different messages).
    pub event_id: Option<EventId>,
    /// CloudEvents `type` of messages without `ce-type` (default
    /// `<system>.message`).
    pub event_type: Option<String>,
    /// How long connecting may take (default `10s`).
    pub connect_timeout: Option<String>,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    #[default]
    All,
    New,
}

/// A validated `nats` source.
#[derive(Debug, Clone)]
pub struct NatsSourceConfig {
    pub url: Secret,
    pub token: Option<Secret>,
    pub stream: String,
    pub subjects: Vec<String>,
    pub consumer: String,
    pub create: bool,
    pub start: Start,
    pub batch: usize,
    pub max_wait: Duration,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
    pub format: Format,
    pub max_message_bytes: usize,
    pub event_id: EventId,
    pub event_type: String,
    pub connect_timeout: Duration,
}

/// The sink's settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNatsSink {
    /// `nats://[user:password@]host:4222` (several: comma-separated).
    pub url: Secret,
    /// An authentication token, when the server wants one.
    pub token: Option<Secret>,
    /// The subject to publish to; `{key}` is the entity key and `{field}` or
    /// `{a.b}` a string or number of the payload (`.`, `*`, `>`, `%` and
    /// white space in a value are percent-encoded, so a value is one token).
    pub subject: String,
    /// Headers added to every message (values may use `${ENV}`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `ce-type` of the messages (default `weft.<flow>`).
    pub event_type: Option<String>,
    /// `ce-source` of the messages (default `weft/<flow>`).
    pub event_source: Option<String>,
    /// How long to wait for the stream's ack of one publish (default `10s`);
    /// past it the write is retried with the same `Nats-Msg-Id`.
    pub timeout: Option<String>,
    /// How long connecting at start may take before the destination counts
    /// as down (default `5s`; weft keeps trying in the background).
    pub connect_timeout: Option<String>,
    /// `true` (default): at start, a reachable server must have a stream
    /// capturing `subject` (with its placeholders as `*`), else weft does
    /// not start. `false`: not checked (a publish nobody stores is a
    /// permanent failure, dead-lettered).
    pub check_stream: Option<bool>,
    /// How the payload is written: `json` (default), `{avro: {schema:
    /// ...}}` or `{protobuf: {schema: file.proto, message: pkg.Msg}}`
    /// (`broker/format.rs`; the file relative to the config file's
    /// folder); a record the schema does not fit is dead-lettered with
    /// the reason.
    pub format: Option<Format>,
}

/// A validated `nats` sink.
#[derive(Debug, Clone)]
pub struct NatsSinkConfig {
    pub url: Secret,
    pub token: Option<Secret>,
    pub subject: Template,
    pub headers: Vec<(String, String)>,
    pub event_type: Option<String>,
    pub event_source: Option<String>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub check_stream: bool,
    pub format: Format,
}

impl NatsSourceConfig {
    /// Validate the settings of system `system`'s source; every problem,
    /// each with its document path.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.source.nats");
        let raw: RawNatsSource = parse(&base, settings)?;
        let mut issues = Vec::new();
        url_issues(&mut issues, &base, raw.url.expose());
        name_issues(&mut issues, &format!("{base}.stream"), &raw.stream);
        let consumer = raw
            .consumer
            .clone()
            .unwrap_or_else(|| default_consumer(system));
        if raw.consumer.is_some() {
            name_issues(&mut issues, &format!("{base}.consumer"), &consumer);
        }
        let subjects = match (raw.subject, raw.subjects) {
            (Some(_), Some(_)) => {
                issues.push(issue(
                    format!("{base}.subjects"),
                    "give `subject` or `subjects`, not both",
                ));
                Vec::new()
            }
            (Some(s), None) => {
                subject_issues(&mut issues, &format!("{base}.subject"), &s, true);
                vec![s]
            }
            (None, Some(list)) => {
                if list.is_empty() {
                    issues.push(issue(
                        format!("{base}.subjects"),
                        "list at least one subject",
                    ));
                }
                for (i, s) in list.iter().enumerate() {
                    subject_issues(&mut issues, &format!("{base}.subjects[{i}]"), s, true);
                }
                list
            }
            (None, None) => Vec::new(),
        };
        let create = raw.create.unwrap_or(true);
        if create && subjects.is_empty() {
            issues.push(issue(
                base.clone(),
                "with `create: true` (the default) give `subject` (or `subjects`): the stream is created with it when missing; or `create: false` to consume an existing stream whole",
            ));
        }
        let batch = raw.batch.unwrap_or(256);
        if batch == 0 || batch > 10_000 {
            issues.push(issue(
                format!("{base}.batch"),
                "must be between 1 and 10000",
            ));
        }
        let max_wait = duration(
            &mut issues,
            &format!("{base}.max_wait"),
            raw.max_wait.as_deref(),
            Duration::from_secs(5),
            (Duration::from_millis(100), Duration::from_secs(300)),
        );
        let ack_wait = duration(
            &mut issues,
            &format!("{base}.ack_wait"),
            raw.ack_wait.as_deref(),
            Duration::from_secs(30),
            (Duration::from_secs(1), Duration::from_secs(12 * 3600)),
        );
        let connect_timeout = duration(
            &mut issues,
            &format!("{base}.connect_timeout"),
            raw.connect_timeout.as_deref(),
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(300)),
        );
        let max_deliver = match raw.max_deliver {
            None | Some(-1) => -1,
            Some(n) if n >= 1 => n,
            Some(_) => {
                issues.push(issue(
                    format!("{base}.max_deliver"),
                    "must be at least 1 (or -1: unlimited)",
                ));
                -1
            }
        };
        let max_ack_pending = match raw.max_ack_pending {
            None => 1000.max(batch as i64),
            Some(n) if n >= batch as i64 => n,
            Some(_) => {
                issues.push(issue(
                    format!("{base}.max_ack_pending"),
                    format!("must be at least `batch` ({batch})"),
                ));
                0
            }
        };
        let max_message_bytes = raw.max_message_bytes.unwrap_or(1 << 20);
        if max_message_bytes == 0 {
            issues.push(issue(
                format!("{base}.max_message_bytes"),
                "must be greater than 0",
            ));
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(NatsSourceConfig {
            url: raw.url,
            token: raw.token,
            stream: raw.stream,
            subjects,
            consumer,
            create,
            start: raw.start.unwrap_or_default(),
            batch,
            max_wait,
            ack_wait,
            max_deliver,
            max_ack_pending,
            format: raw.format.unwrap_or_default(),
            max_message_bytes,
            event_id: raw.event_id.unwrap_or_default(),
            event_type: raw
                .event_type
                .unwrap_or_else(|| format!("{system}.message")),
            connect_timeout,
        })
    }
}

impl NatsSinkConfig {
    /// Validate the settings of system `system`'s sink.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.sink.nats");
        let raw: RawNatsSink = parse(&base, settings)?;
        let mut issues = Vec::new();
        url_issues(&mut issues, &base, raw.url.expose());
        let subject = match Template::parse(&raw.subject) {
            Ok(t) => {
                subject_issues(
                    &mut issues,
                    &format!("{base}.subject"),
                    &t.with_placeholders("x"),
                    false,
                );
                Some(t)
            }
            Err(e) => {
                issues.push(issue(format!("{base}.subject"), e));
                None
            }
        };
        let mut headers = Vec::new();
        for (k, v) in raw.headers {
            let reserved = k.eq_ignore_ascii_case("nats-msg-id")
                || k.to_ascii_lowercase().starts_with("ce-")
                || k.eq_ignore_ascii_case("nats-expected-stream");
            if k.is_empty() || k.contains([':', ' ', '\r', '\n']) || reserved {
                issues.push(issue(
                    format!("{base}.headers.{k}"),
                    if reserved {
                        "weft sets this header itself (Nats-Msg-Id, ce-*)"
                    } else {
                        "not a header name (no `:`, spaces or line breaks)"
                    },
                ));
            } else if v.contains(['\r', '\n']) {
                issues.push(issue(
                    format!("{base}.headers.{k}"),
                    "a header value cannot hold a line break",
                ));
            }
            headers.push((k, v));
        }
        let timeout = duration(
            &mut issues,
            &format!("{base}.timeout"),
            raw.timeout.as_deref(),
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(600)),
        );
        let connect_timeout = duration(
            &mut issues,
            &format!("{base}.connect_timeout"),
            raw.connect_timeout.as_deref(),
            Duration::from_secs(5),
            (Duration::from_millis(100), Duration::from_secs(300)),
        );
        let Some(subject) = subject.filter(|_| issues.is_empty()) else {
            return Err(issues);
        };
        Ok(NatsSinkConfig {
            url: raw.url,
            token: raw.token,
            subject,
            headers,
            event_type: raw.event_type,
            event_source: raw.event_source,
            timeout,
            connect_timeout,
            check_stream: raw.check_stream.unwrap_or(true),
            format: raw.format.unwrap_or_default(),
        })
    }
}

/// The durable consumer's name when none is given: `weft-<system>`, with
/// what a name may not hold replaced by `_`.
pub fn default_consumer(system: &str) -> String {
    let clean: String = system
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("weft-{clean}")
}

fn url_issues(issues: &mut Vec<Issue>, base: &str, url: &str) {
    let url = url.trim();
    if url.is_empty() {
        issues.push(issue(
            format!("{base}.url"),
            "expected a `nats://host:port` URL",
        ));
        return;
    }
    for part in url.split(',') {
        let part = part.trim();
        let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .any(|s| part.starts_with(s))
            || !part.contains("://");
        // the client's own parser; the message never quotes the URL (it may hold a password)
        let parsed = part.parse::<async_nats::ServerAddr>();
        if !scheme_ok || parsed.is_err() {
            let why = match parsed {
                Err(e) if scheme_ok => format!(": {e}"),
                _ => String::new(),
            };
            issues.push(issue(
                format!("{base}.url"),
                format!("not a NATS server address (`nats://host:4222`, `tls://...`){why}"),
            ));
            return;
        }
    }
}

/// A stream or consumer name: no white space, `.`, `*`, `>`, path separators.
fn name_issues(issues: &mut Vec<Issue>, path: &str, name: &str) {
    if name.is_empty()
        || name.len() > 255
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
    {
        issues.push(issue(
            path.to_owned(),
            format!("`{name}` is not a JetStream name (no spaces, `.`, `*`, `>`, `/` or `\\`)"),
        ));
    }
}

/// A subject: tokens separated by `.`, none empty, no white space; `*` and
/// `>` (last token only) as whole tokens when `wildcards` are allowed.
fn subject_issues(issues: &mut Vec<Issue>, path: &str, s: &str, wildcards: bool) {
    let tokens: Vec<&str> = s.split('.').collect();
    let bad = s.is_empty()
        || tokens.iter().enumerate().any(|(i, t)| {
            t.is_empty()
                || t.chars().any(|c| c.is_whitespace() || c.is_control())
                || (t.contains(['*', '>'])
                    && !(wildcards && (*t == "*" || (*t == ">" && i + 1 == tokens.len()))))
        });
    if bad {
        issues.push(issue(
            path.to_owned(),
            if wildcards {
                format!(
                    "`{s}` is not a NATS subject (tokens separated by `.`, no spaces; `*` and a last `>` as wildcards)"
                )
            } else {
                format!(
                    "`{s}` is not a NATS subject to publish to (tokens separated by `.`, no spaces, no wildcards)"
                )
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(v: serde_json::Value) -> Result<NatsSourceConfig, Vec<Issue>> {
        NatsSourceConfig::from_settings("Orders Bus", &ConnectorSettings(v))
    }
    fn sink(v: serde_json::Value) -> Result<NatsSinkConfig, Vec<Issue>> {
        NatsSinkConfig::from_settings("bus", &ConnectorSettings(v))
    }

    #[test]
    fn source_defaults() {
        let c = source(
            json!({"url": "nats://127.0.0.1:4222", "stream": "ORDERS", "subject": "orders.>"}),
        )
        .unwrap();
        assert_eq!(c.consumer, "weft-Orders_Bus");
        assert_eq!(c.subjects, ["orders.>"]);
        assert!(c.create);
        assert_eq!(c.start, Start::All);
        assert_eq!(c.batch, 256);
        assert_eq!(c.max_wait, Duration::from_secs(5));
        assert_eq!(c.ack_wait, Duration::from_secs(30));
        assert_eq!(c.max_deliver, -1);
        assert_eq!(c.max_ack_pending, 1000);
        assert_eq!(c.max_message_bytes, 1 << 20);
        assert_eq!(c.event_id, EventId::Auto);
        assert_eq!(c.event_type, "Orders Bus.message");
        // an existing stream consumed whole
        let c = source(json!({"url": "nats://h", "stream": "S", "create": false})).unwrap();
        assert!(c.subjects.is_empty());
    }

    #[test]
    fn every_source_problem_is_reported_with_its_path() {
        let e = source(json!({
            "url": "http://x", "stream": "a.b", "subjects": ["ok", "bad subject", "a.>.b"],
            "consumer": "c*", "batch": 0, "ack_wait": "soon", "max_deliver": 0,
            "max_wait": "1ms"
        }))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        let b = "systems.Orders Bus.source.nats";
        assert_eq!(
            paths,
            [
                format!("{b}.url"),
                format!("{b}.stream"),
                format!("{b}.consumer"),
                format!("{b}.subjects[1]"),
                format!("{b}.subjects[2]"),
                format!("{b}.batch"),
                format!("{b}.max_wait"),
                format!("{b}.ack_wait"),
                format!("{b}.max_deliver"),
            ],
            "{e:?}"
        );
        let e = source(json!({"url": "nats://h", "stream": "S"})).unwrap_err();
        assert!(e[0].message.contains("create: false"), "{e:?}");
        let e =
            source(json!({"url": "nats://h", "stream": "S", "subject": "a", "subjects": ["b"]}))
                .unwrap_err();
        assert!(e[0].message.contains("not both"), "{e:?}");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused_at_their_path() {
        let e = source(json!({"url": "nats://h", "stream": "S", "subject": "a", "durable": "x"}))
            .unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("unknown field `durable`"), "{e:?}");
        let e = source(json!({"url": "nats://h", "stream": "S", "subject": "a", "batch": "many"}))
            .unwrap_err();
        assert_eq!(e[0].path, "systems.Orders Bus.source.nats.batch");
        let e = source(json!({"stream": "S", "subject": "a"})).unwrap_err();
        assert!(e[0].message.contains("missing field `url`"), "{e:?}");
        let e = source(json!({"url": "nats://h", "stream": "S", "subject": "a", "format": "xml"}))
            .unwrap_err();
        assert_eq!(e[0].path, "systems.Orders Bus.source.nats.format");
    }

    #[test]
    fn sink_settings() {
        let c = sink(
            json!({"url": "nats://h:4222", "subject": "crm.customers.{key}",
                            "headers": {"x-team": "crm"}}),
        )
        .unwrap();
        assert_eq!(c.subject.with_placeholders("*"), "crm.customers.*");
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert!(c.check_stream);
        let e = sink(json!({"url": "nats://h", "subject": "a.*",
                            "headers": {"Nats-Msg-Id": "x", "ce-id": "y", "bad name": "z"},
                            "timeout": "forever"}))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        let b = "systems.bus.sink.nats";
        assert_eq!(
            paths,
            [
                format!("{b}.subject"),
                format!("{b}.headers.Nats-Msg-Id"),
                format!("{b}.headers.bad name"),
                format!("{b}.headers.ce-id"),
                format!("{b}.timeout"),
            ],
            "{e:?}"
        );
        let e = sink(json!({"url": "nats://h", "subject": "a.{key"})).unwrap_err();
        assert!(e[0].message.contains("without its"), "{e:?}");
        let e = sink(json!({"url": "nats://h", "subject": "a", "stream": "S"})).unwrap_err();
        assert!(e[0].message.contains("unknown field `stream`"), "{e:?}");
    }
}
