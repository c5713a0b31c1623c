//! The `mqtt` source's and sink's settings: the raw serde structs (what a
//! user writes under `source: {mqtt: ...}` and `sink: {mqtt: ...}`), their
//! pure validation into [`MqttSourceConfig`] and [`MqttSinkConfig`], and
//! nothing that connects.
//!
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
use crate::broker::{Format, Template};

/// The source's settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqttSource {
    /// `mqtt://host:1883` or `mqtt://user:password@host:1883` (use
    /// `${ENV}` for the password). TLS (`mqtts://`) is not built in.
    pub url: Secret,
    /// Topic filters to subscribe to, wildcards allowed (`shop/+/orders`,
    /// `crm/#`).
    pub topics: Vec<String>,
    /// Only 1 (at least once): the broker keeps a message until weft acks
    /// it, and weft acks it once it is stored.
    pub qos: Option<u8>,
    /// The client id, which names the persistent session on the broker
    /// (default `weft-<system>`). Two clients with one id take the session
    /// from each other: one per source.
    pub client_id: Option<String>,
    /// How long the broker keeps the session (subscriptions and the QoS 1
    /// messages that arrive) while weft is away (default `7d`).
    pub session_expiry: Option<String>,
    /// Messages per store commit at most (default 256): what has arrived
    /// is handed over at once, not after a wait.
    pub batch: Option<usize>,
    /// Unacknowledged messages the broker may send at most (MQTT 5 receive
    /// maximum; default 512, at least `batch`). The broker's own limit
    /// (Mosquitto's `max_inflight_messages`, 20 by default) may be lower.
    pub receive_maximum: Option<u16>,
    /// `json` (default): one JSON value per message; a CloudEvents
    /// structured-mode message is unwrapped.
    /// `{avro: {schema, confluent, schema_id}}` or `{protobuf: {schema:
    /// file.proto, message: pkg.Msg, confluent, schema_id,
    /// allow_unknown_fields}}` (`broker/format.rs`): a message that does
    /// not decode is dead-lettered with the reason.
    pub format: Option<Format>,
    /// Larger messages go to the DLQ (default 1 MiB).
    pub max_message_bytes: Option<usize>,
    /// `auto` (default): the event id is the CloudEvents `id` user property
    /// (with `source`); a message without one goes to the DLQ (MQTT has no
    /// stable message id). `{field: .id}`: else a string or number of the
    /// payload. `content`: else a hash of the topic and the payload, so
    /// identical messages on one topic are one event.
    pub event_id: Option<RawEventId>,
    /// CloudEvents `type` of messages without one (default
    /// `<system>.message`).
    pub event_type: Option<String>,
    /// How long connecting may take (default `10s`).
    pub connect_timeout: Option<String>,
    /// How often to ping an idle broker (default `30s`).
    pub keep_alive: Option<String>,
}

/// How a message without a CloudEvents id is named, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawEventId {
    Auto,
    Content,
    Field(String),
}

/// How a message without a CloudEvents id is named.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MqttEventId {
    /// Refused (DLQ): the id comes from the message's `id` user property.
    #[default]
    Auto,
    /// A hash of the topic and the payload.
    Content,
    /// A value of the payload: the path's segments (`.order.id`).
    Field(Vec<String>),
}

/// A validated `mqtt` source.
#[derive(Debug, Clone)]
pub struct MqttSourceConfig {
    pub url: Secret,
    pub broker: Broker,
    pub topics: Vec<String>,
    pub client_id: String,
    pub session_expiry: Duration,
    pub batch: usize,
    pub receive_maximum: u16,
    pub format: Format,
    pub max_message_bytes: usize,
    pub event_id: MqttEventId,
    pub event_type: String,
    pub connect_timeout: Duration,
    pub keep_alive: Duration,
}

/// The sink's settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqttSink {
    /// `mqtt://host:1883` or `mqtt://user:password@host:1883`.
    pub url: Secret,
    /// The topic; `{key}` is the entity key and `{field}` or `{a.b}` a
    /// string or number of the payload (`/`, `+`, `#`, `%`, NUL and white
    /// space in a value are percent-encoded, so a value is one topic
    /// level). No wildcards.
    pub topic: String,
    /// Only 1: a delivery counts as written once the broker's PUBACK came.
    pub qos: Option<u8>,
    /// `false` (default): plain messages. `true`: the broker keeps the
    /// last message of each topic for new subscribers.
    pub retain: Option<bool>,
    /// The client id (default `weft-<system>-<random>`; the sink's session
    /// is a clean one).
    pub client_id: Option<String>,
    /// User properties added to every message (values may use `${ENV}`).
    #[serde(default)]
    pub user_properties: BTreeMap<String, String>,
    /// CloudEvents `type` of the messages (default `weft.<flow>`).
    pub event_type: Option<String>,
    /// CloudEvents `source` of the messages (default `weft/<flow>`).
    pub event_source: Option<String>,
    /// How long to wait for the PUBACKs of one batch (default `10s`); past
    /// it the writes are retried with the same CloudEvents id.
    pub timeout: Option<String>,
    /// How long connecting may take (default `5s`).
    pub connect_timeout: Option<String>,
    /// How often to ping an idle broker (default `30s`).
    pub keep_alive: Option<String>,
    /// How the payload is written: `json` (default), `{avro: {schema:
    /// ...}}` or `{protobuf: {schema: file.proto, message: pkg.Msg}}`
    /// (`broker/format.rs`; the file relative to the config file's
    /// folder); a record the schema does not fit is dead-lettered with
    /// the reason.
    pub format: Option<Format>,
}

/// A validated `mqtt` sink.
#[derive(Debug, Clone)]
pub struct MqttSinkConfig {
    pub url: Secret,
    pub broker: Broker,
    pub topic: Template,
    pub retain: bool,
    pub client_id: Option<String>,
    pub user_properties: Vec<(String, String)>,
    pub event_type: Option<String>,
    pub event_source: Option<String>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub keep_alive: Duration,
    pub format: Format,
}

/// Where the broker is, from the URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the password
        f.debug_struct("Broker")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// `host:port` (never the user or password), for messages.
    pub fn at(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl MqttSourceConfig {
    /// Validate the settings of system `system`'s source; every problem,
    /// each with its document path.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.source.mqtt");
        let raw: RawMqttSource = parse(&base, settings)?;
        let mut issues = Vec::new();
        let broker = url_issues(&mut issues, &base, raw.url.expose());
        if raw.topics.is_empty() {
            issues.push(issue(
                format!("{base}.topics"),
                "name at least one topic filter (`orders/#`)",
            ));
        }
        for (i, t) in raw.topics.iter().enumerate() {
            if let Err(e) = filter_ok(t) {
                issues.push(issue(format!("{base}.topics[{i}]"), e));
            }
        }
        qos_issues(&mut issues, &base, raw.qos);
        let client_id = raw
            .client_id
            .clone()
            .unwrap_or_else(|| format!("weft-{system}"));
        client_id_issues(&mut issues, &base, &client_id);
        let batch = raw.batch.unwrap_or(256);
        if batch == 0 || batch > 10_000 {
            issues.push(issue(
                format!("{base}.batch"),
                "must be between 1 and 10000",
            ));
        }
        let receive_maximum = match raw.receive_maximum {
            None => 512.max(batch.min(u16::MAX as usize) as u16),
            Some(n) if n as usize >= batch && n > 0 => n,
            Some(_) => {
                issues.push(issue(
                    format!("{base}.receive_maximum"),
                    format!("must be at least `batch` ({batch})"),
                ));
                1
            }
        };
        let max_message_bytes = raw.max_message_bytes.unwrap_or(1 << 20);
        if max_message_bytes == 0 {
            issues.push(issue(
                format!("{base}.max_message_bytes"),
                "must be greater than 0",
            ));
        }
        let event_id = match raw.event_id.clone().unwrap_or(RawEventId::Auto) {
            RawEventId::Auto => MqttEventId::Auto,
            RawEventId::Content => MqttEventId::Content,
            RawEventId::Field(f) => match field_path(&f) {
                Ok(p) => MqttEventId::Field(p),
                Err(e) => {
                    issues.push(issue(format!("{base}.event_id.field"), e));
                    MqttEventId::Auto
                }
            },
        };
        let session_expiry = duration(
            &mut issues,
            &format!("{base}.session_expiry"),
            raw.session_expiry.as_deref(),
            Duration::from_secs(7 * 24 * 3600),
            (
                Duration::from_secs(60),
                Duration::from_secs(u64::from(u32::MAX - 1)),
            ),
        );
        let connect_timeout = duration(
            &mut issues,
            &format!("{base}.connect_timeout"),
            raw.connect_timeout.as_deref(),
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(300)),
        );
        let keep_alive = keep_alive(&mut issues, &base, raw.keep_alive.as_deref());
        let Some(broker) = broker.filter(|_| issues.is_empty()) else {
            return Err(issues);
        };
        Ok(MqttSourceConfig {
            url: raw.url,
            broker,
            topics: raw.topics,
            client_id,
            session_expiry,
            batch,
            receive_maximum,
            format: raw.format.unwrap_or_default(),
            max_message_bytes,
            event_id,
            event_type: raw
                .event_type
                .unwrap_or_else(|| format!("{system}.message")),
            connect_timeout,
            keep_alive,
        })
    }
}

/// The user properties weft sets itself (CloudEvents MQTT binding, weft's
/// correlation and trace context): not configurable.
const RESERVED: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "x-correlation-id",
    "x-causation-id",
    "traceparent",
    "tracestate",
];

impl MqttSinkConfig {
    /// Validate the settings of system `system`'s sink.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.sink.mqtt");
        let raw: RawMqttSink = parse(&base, settings)?;
        let mut issues = Vec::new();
        let broker = url_issues(&mut issues, &base, raw.url.expose());
        qos_issues(&mut issues, &base, raw.qos);
        let topic = match Template::parse(&raw.topic) {
            Ok(t) => {
                let fixed = t.with_placeholders("x");
                if raw.topic.trim().is_empty() {
                    issues.push(issue(format!("{base}.topic"), "a topic cannot be empty"));
                } else if fixed.contains(['+', '#']) {
                    issues.push(issue(
                        format!("{base}.topic"),
                        format!(
                            "`{}`: a topic to publish to has no wildcards (`+`, `#`)",
                            raw.topic
                        ),
                    ));
                } else if fixed.starts_with('$') {
                    issues.push(issue(
                        format!("{base}.topic"),
                        format!("`{}`: topics starting with `$` are the broker's", raw.topic),
                    ));
                } else if fixed.contains('\0') || fixed.len() > 65_535 {
                    issues.push(issue(
                        format!("{base}.topic"),
                        "not an MQTT topic (at most 65535 bytes, no NUL)",
                    ));
                }
                Some(t)
            }
            Err(e) => {
                issues.push(issue(format!("{base}.topic"), e));
                None
            }
        };
        if let Some(id) = &raw.client_id {
            client_id_issues(&mut issues, &base, id);
        }
        let mut user_properties = Vec::new();
        for (k, v) in raw.user_properties {
            let lower = k.to_ascii_lowercase();
            let reserved = RESERVED.contains(&lower.as_str()) || lower.starts_with("ce-");
            if k.is_empty() || k.len() > 128 || k.chars().any(char::is_control) || reserved {
                issues.push(issue(
                    format!("{base}.user_properties.{k}"),
                    if reserved {
                        "weft sets the CloudEvents attributes and the trace context itself"
                    } else {
                        "not a property name (1 to 128 characters, no control characters)"
                    },
                ));
            }
            user_properties.push((k, v));
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
        let keep_alive = keep_alive(&mut issues, &base, raw.keep_alive.as_deref());
        let (Some(topic), Some(broker)) = (topic, broker) else {
            return Err(issues);
        };
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(MqttSinkConfig {
            url: raw.url,
            broker,
            topic,
            retain: raw.retain.unwrap_or(false),
            client_id: raw.client_id,
            user_properties,
            event_type: raw.event_type,
            event_source: raw.event_source,
            timeout,
            connect_timeout,
            keep_alive,
            format: raw.format.unwrap_or_default(),
        })
    }
}

fn keep_alive(issues: &mut Vec<Issue>, base: &str, v: Option<&str>) -> Duration {
    duration(
        issues,
        &format!("{base}.keep_alive"),
        v,
        Duration::from_secs(30),
        (Duration::from_secs(5), Duration::from_secs(3600)),
    )
}

fn qos_issues(issues: &mut Vec<Issue>, base: &str, qos: Option<u8>) {
    match qos {
        None | Some(1) => {}
        Some(0) => issues.push(issue(
            format!("{base}.qos"),
            "QoS 0 has no acknowledgement, so a message could be lost: weft uses QoS 1 only",
        )),
        Some(_) => issues.push(issue(
            format!("{base}.qos"),
            "weft uses QoS 1 (at least once, with the journal dropping duplicates): write `qos: 1` or leave it out",
        )),
    }
}

fn client_id_issues(issues: &mut Vec<Issue>, base: &str, id: &str) {
    if id.is_empty() || id.len() > 65_535 || id.chars().any(|c| c.is_control()) {
        issues.push(issue(
            format!("{base}.client_id"),
            format!("`{id}` is not an MQTT client id (1 to 65535 bytes, no control characters)"),
        ));
    }
}

/// A topic filter: not empty, no NUL, `+` a whole level, `#` the whole
/// last level.
pub fn filter_ok(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("a topic filter cannot be empty".into());
    }
    if f.len() > 65_535 || f.contains('\0') {
        return Err(format!("`{f}`: at most 65535 bytes, no NUL"));
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "`{f}`: `#` must be the whole last level (`orders/#`)"
            ));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!(
                "`{f}`: `+` must be a whole level (`shop/+/orders`)"
            ));
        }
    }
    Ok(())
}

/// `.a.b` or `a.b` as its segments.
fn field_path(f: &str) -> Result<Vec<String>, String> {
    let t = f.trim();
    let t = t.strip_prefix('.').unwrap_or(t);
    let segs: Vec<String> = t.split('.').map(str::to_owned).collect();
    if t.is_empty()
        || segs
            .iter()
            .any(|s| s.is_empty() || s.contains(char::is_whitespace))
    {
        return Err(format!(
            "`{f}` is not a field path: write `.id` or `.order.id`"
        ));
    }
    Ok(segs)
}

/// The broker of `mqtt://[user[:password]@]host[:port]`, or the problem
/// (never quoting the URL: it may hold a password).
fn url_issues(issues: &mut Vec<Issue>, base: &str, url: &str) -> Option<Broker> {
    let path = format!("{base}.url");
    match parse_url(url.trim()) {
        Ok(b) => Some(b),
        Err(e) => {
            issues.push(issue(path, e));
            None
        }
    }
}

/// Parse `mqtt://[user[:password]@]host[:port][/]` (`tcp://` too).
pub fn parse_url(url: &str) -> Result<Broker, String> {
    let expected =
        "expected an `mqtt://host:1883` URL (`mqtt://user:password@host:1883` with a login)";
    let lower = url.to_ascii_lowercase();
    if ["mqtts://", "ssl://", "tls://", "wss://", "ws://"]
        .iter()
        .any(|s| lower.starts_with(s))
    {
        return Err(
            "TLS and WebSocket transports (`mqtts://`, `ws://`) are not built into this weft: use `mqtt://` (on a trusted network or through a TLS tunnel)".into(),
        );
    }
    let Some(rest) = ["mqtt://", "tcp://"]
        .iter()
        .find_map(|s| lower.starts_with(s).then(|| &url[s.len()..]))
    else {
        return Err(expected.into());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err(format!(
            "{expected}: no path, query or fragment (topics are set with `topics`/`topic`)"
        ));
    }
    let (login, hostport) = match rest.rsplit_once('@') {
        Some((l, h)) => (Some(l), h),
        None => (None, rest),
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| "the login in the URL is not UTF-8 once percent-decoded".to_owned())
    };
    let (username, password) = match login {
        None => (None, None),
        Some(l) => match l.split_once(':') {
            Some((u, p)) => (Some(decode(u)?), Some(decode(p)?)),
            None => (Some(decode(l)?), None),
        },
    };
    if username.as_deref() == Some("") {
        return Err(format!("{expected}: an empty user name"));
    }
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let Some((h, after)) = h.split_once(']') else {
            return Err(format!("{expected}: an IPv6 address without its `]`"));
        };
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{expected}: after `]` comes `:port`"))?,
            ),
        };
        (h, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{expected}: no host"));
    }
    let port = match port {
        None => 1883,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "{expected}: the port is not a number from 1 to 65535"
                ));
            }
        },
    };
    Ok(Broker {
        host: host.to_owned(),
        port,
        username,
        password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(v: serde_json::Value) -> Result<MqttSourceConfig, Vec<Issue>> {
        MqttSourceConfig::from_settings("orders", &ConnectorSettings(v))
    }
    fn sink(v: serde_json::Value) -> Result<MqttSinkConfig, Vec<Issue>> {
        MqttSinkConfig::from_settings("bus", &ConnectorSettings(v))
    }

    #[test]
    fn urls() {
        let b = parse_url("mqtt://127.0.0.1:1883").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.username),
            ("127.0.0.1", 1883, None)
        );
        let b = parse_url("mqtt://u%40x:p%3Aw@broker/").unwrap();
        assert_eq!(b.port, 1883);
        assert_eq!(b.username.as_deref(), Some("u@x"));
        assert_eq!(b.password.as_deref(), Some("p:w"));
        assert!(!format!("{b:?}").contains("p:w"));
        let b = parse_url("tcp://[::1]:1884").unwrap();
        assert_eq!(b.at(), "[::1]:1884");
        for bad in [
            "http://h",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://h/topic",
            "mqtt://:secret@h",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(
            parse_url("mqtts://h:8883")
                .unwrap_err()
                .contains("not built")
        );
    }

    #[test]
    fn source_defaults() {
        let c =
            source(json!({"url": "mqtt://127.0.0.1:1883", "topics": ["shop/+/orders", "crm/#"]}))
                .unwrap();
        assert_eq!(c.client_id, "weft-orders");
        assert_eq!(c.session_expiry, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.batch, 256);
        assert_eq!(c.receive_maximum, 512);
        assert_eq!(c.max_message_bytes, 1 << 20);
        assert_eq!(c.event_id, MqttEventId::Auto);
        assert_eq!(c.event_type, "orders.message");
        assert_eq!(c.broker.at(), "127.0.0.1:1883");
        let c =
            source(json!({"url": "mqtt://h", "topics": ["a"], "event_id": {"field": ".order.id"}}))
                .unwrap();
        assert_eq!(
            c.event_id,
            MqttEventId::Field(vec!["order".into(), "id".into()])
        );
        let c =
            source(json!({"url": "mqtt://h", "topics": ["a"], "event_id": "content", "qos": 1}))
                .unwrap();
        assert_eq!(c.event_id, MqttEventId::Content);
    }

    #[test]
    fn every_source_problem_is_reported_with_its_path() {
        let e = source(json!({
            "url": "mqtts://u:secret@h", "topics": ["a/#/b", "", "x+"], "qos": 2,
            "batch": 100, "receive_maximum": 10, "session_expiry": "1s",
            "event_id": {"field": ". x"}
        }))
        .unwrap_err();
        let b = "systems.orders.source.mqtt";
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                format!("{b}.url"),
                format!("{b}.topics[0]"),
                format!("{b}.topics[1]"),
                format!("{b}.topics[2]"),
                format!("{b}.qos"),
                format!("{b}.receive_maximum"),
                format!("{b}.event_id.field"),
                format!("{b}.session_expiry"),
            ],
            "{e:?}"
        );
        assert!(!format!("{e:?}").contains("secret"));
        let e = source(json!({"url": "mqtt://h", "topics": []})).unwrap_err();
        assert!(e[0].message.contains("at least one"), "{e:?}");
        let e = source(json!({"url": "mqtt://h", "topics": ["a"], "clean": true})).unwrap_err();
        assert!(e[0].message.contains("unknown field `clean`"), "{e:?}");
        let e = source(json!({"url": "mqtt://h", "topics": ["a"], "qos": 0})).unwrap_err();
        assert!(e[0].message.contains("QoS 0"), "{e:?}");
        let e = source(json!({"url": "mqtt://h", "topics": ["a"], "event_id": "position"}))
            .unwrap_err();
        assert_eq!(e[0].path, "systems.orders.source.mqtt.event_id");
    }

    #[test]
    fn sink_settings() {
        let c = sink(json!({"url": "mqtt://h", "topic": "crm/customers/{key}",
                            "user_properties": {"x-team": "crm"}}))
        .unwrap();
        assert!(!c.retain);
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.user_properties, [("x-team".to_owned(), "crm".to_owned())]);
        let e = sink(json!({"url": "ftp://h", "topic": "a/+/{key}", "qos": 0,
                            "user_properties": {"id": "y", "ce-id": "z"}, "timeout": "1h"}))
        .unwrap_err();
        let b = "systems.bus.sink.mqtt";
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                format!("{b}.url"),
                format!("{b}.qos"),
                format!("{b}.topic"),
                format!("{b}.user_properties.ce-id"),
                format!("{b}.user_properties.id"),
                format!("{b}.timeout"),
            ],
            "{e:?}"
        );
        for bad in ["", "$SYS/x", "a/{key", "a/#"] {
            let e = sink(json!({"url": "mqtt://h", "topic": bad})).unwrap_err();
            assert_eq!(e[0].path, format!("{b}.topic"), "{bad}: {e:?}");
        }
        let e = sink(json!({"url": "mqtt://h"})).unwrap_err();
        assert!(e[0].message.contains("missing field `topic`"), "{e:?}");
    }
}
