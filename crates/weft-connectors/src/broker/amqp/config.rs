//! The `amqp` source's and sink's settings: the raw serde structs (what a
//! user writes under `source: {amqp: ...}` and `sink: {amqp: ...}`), their
//! pure validation into [`AmqpSourceConfig`] and [`AmqpSinkConfig`], and
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
pub struct RawAmqpSource {
    /// `amqp://user:password@host:5672/vhost` (`%2f` is the default vhost
    /// `/`). Use `${ENV}` for the password. TLS (`amqps://`) is not built in.
    pub url: Secret,
    /// The queue to consume.
    pub queue: String,
    /// An exchange to bind the queue to (it must exist; weft does not
    /// declare exchanges, their owner does).
    pub exchange: Option<String>,
    /// The binding key of that binding (default `#`: every message of a
    /// topic exchange; a fanout exchange ignores it).
    pub routing_key: Option<String>,
    /// `true` (default): declare the queue (durable) and the binding when
    /// missing. `false`: the queue must exist (a missing one stops the
    /// source with the reason) and no binding is made.
    pub declare: Option<bool>,
    /// Messages the broker hands over unacknowledged at most (default
    /// 512, at least `batch`).
    pub prefetch: Option<u16>,
    /// Messages per store commit at most (default 256): what has arrived
    /// is handed over at once, not after a wait.
    pub batch: Option<usize>,
    /// `json` (default): one JSON value per message; a CloudEvents
    /// structured-mode message is unwrapped.
    /// `{avro: {schema, confluent, schema_id}}` or `{protobuf: {schema:
    /// file.proto, message: pkg.Msg, confluent, schema_id,
    /// allow_unknown_fields}}` (`broker/format.rs`): a message that does
    /// not decode is dead-lettered with the reason.
    pub format: Option<Format>,
    /// Larger messages go to the DLQ (default 1 MiB).
    pub max_message_bytes: Option<usize>,
    /// `auto` (default): the event id is `cloudEvents:id` (with
    /// `cloudEvents:source`; `cloudEvents_` and `ce-` are read too), else
    /// the `message_id` property; a message with neither goes to the DLQ
    /// (AMQP has no stable position to name it by). `content`: such a
    /// message's id is a hash of its exchange, routing key, timestamp and
    /// body, so identical messages without ids are one event.
    pub event_id: Option<AmqpEventId>,
    /// CloudEvents `type` of messages without one (default
    /// `<system>.message`).
    pub event_type: Option<String>,
    /// How long connecting may take (default `10s`).
    pub connect_timeout: Option<String>,
}

/// How a message without an id of its own is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmqpEventId {
    /// Refused (DLQ): ids come from the message only.
    #[default]
    Auto,
    /// A hash of where it was sent and what it holds.
    Content,
}

/// A validated `amqp` source.
#[derive(Debug, Clone)]
pub struct AmqpSourceConfig {
    pub url: Secret,
    pub queue: String,
    pub exchange: Option<String>,
    pub routing_key: String,
    pub declare: bool,
    pub prefetch: u16,
    pub batch: usize,
    pub format: Format,
    pub max_message_bytes: usize,
    pub event_id: AmqpEventId,
    pub event_type: String,
    pub connect_timeout: Duration,
}

/// The sink's settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmqpSink {
    /// `amqp://user:password@host:5672/vhost`.
    pub url: Secret,
    /// The exchange to publish to (`""`: the default exchange, where the
    /// routing key is a queue name). It must exist.
    pub exchange: String,
    /// The routing key; `{key}` is the entity key and `{field}` or `{a.b}`
    /// a string or number of the payload (`.`, `*`, `#`, `%` and white
    /// space in a value are percent-encoded, so a value is one word of a
    /// topic exchange's key).
    pub routing_key: String,
    /// `true` (default): an unroutable message (no queue bound for its
    /// routing key) is returned by the broker and the delivery fails
    /// permanently (DLQ). `false`: the broker drops it and it counts as
    /// written.
    pub mandatory: Option<bool>,
    /// `true` (default): delivery mode 2, the broker writes the message
    /// to disk (on a durable queue) before it confirms.
    pub persistent: Option<bool>,
    /// Headers added to every message (values may use `${ENV}`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `cloudEvents:type` of the messages (default `weft.<flow>`).
    pub event_type: Option<String>,
    /// `cloudEvents:source` of the messages (default `weft/<flow>`).
    pub event_source: Option<String>,
    /// How long to wait for the broker's confirm of one batch (default
    /// `10s`); past it the writes are retried with the same `message_id`.
    pub timeout: Option<String>,
    /// How long connecting may take (default `5s`).
    pub connect_timeout: Option<String>,
    /// How the payload is written: `json` (default), `{avro: {schema:
    /// ...}}` or `{protobuf: {schema: file.proto, message: pkg.Msg}}`
    /// (`broker/format.rs`; the file relative to the config file's
    /// folder); a record the schema does not fit is dead-lettered with
    /// the reason.
    pub format: Option<Format>,
}

/// A validated `amqp` sink.
#[derive(Debug, Clone)]
pub struct AmqpSinkConfig {
    pub url: Secret,
    pub exchange: String,
    pub routing_key: Template,
    pub mandatory: bool,
    pub persistent: bool,
    pub headers: Vec<(String, String)>,
    pub event_type: Option<String>,
    pub event_source: Option<String>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub format: Format,
}

impl AmqpSourceConfig {
    /// Validate the settings of system `system`'s source; every problem,
    /// each with its document path.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.source.amqp");
        let raw: RawAmqpSource = parse(&base, settings)?;
        let mut issues = Vec::new();
        url_issues(&mut issues, &base, raw.url.expose());
        name_issues(&mut issues, &format!("{base}.queue"), &raw.queue, false);
        if let Some(x) = &raw.exchange {
            name_issues(&mut issues, &format!("{base}.exchange"), x, false);
        }
        let declare = raw.declare.unwrap_or(true);
        if raw.routing_key.is_some() && raw.exchange.is_none() {
            issues.push(issue(
                format!("{base}.routing_key"),
                "a binding key needs the `exchange` to bind the queue to",
            ));
        }
        if raw.exchange.is_some() && !declare {
            issues.push(issue(
                format!("{base}.exchange"),
                "with `declare: false` weft makes no binding: bind the queue yourself, or drop `declare: false`",
            ));
        }
        let routing_key = raw.routing_key.unwrap_or_else(|| "#".to_owned());
        if routing_key.len() > 255 {
            issues.push(issue(format!("{base}.routing_key"), "at most 255 bytes"));
        }
        let batch = raw.batch.unwrap_or(256);
        if batch == 0 || batch > 10_000 {
            issues.push(issue(
                format!("{base}.batch"),
                "must be between 1 and 10000",
            ));
        }
        let prefetch = match raw.prefetch {
            None => 512.max(batch.min(u16::MAX as usize) as u16),
            Some(n) if n as usize >= batch => n,
            Some(_) => {
                issues.push(issue(
                    format!("{base}.prefetch"),
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
        let connect_timeout = duration(
            &mut issues,
            &format!("{base}.connect_timeout"),
            raw.connect_timeout.as_deref(),
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(300)),
        );
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(AmqpSourceConfig {
            url: raw.url,
            queue: raw.queue,
            exchange: raw.exchange,
            routing_key,
            declare,
            prefetch,
            batch,
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

impl AmqpSinkConfig {
    /// Validate the settings of system `system`'s sink.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.sink.amqp");
        let raw: RawAmqpSink = parse(&base, settings)?;
        let mut issues = Vec::new();
        url_issues(&mut issues, &base, raw.url.expose());
        name_issues(
            &mut issues,
            &format!("{base}.exchange"),
            &raw.exchange,
            true,
        );
        let routing_key = match Template::parse(&raw.routing_key) {
            Ok(t) => Some(t),
            Err(e) => {
                issues.push(issue(format!("{base}.routing_key"), e));
                None
            }
        };
        let mut headers = Vec::new();
        for (k, v) in raw.headers {
            let lower = k.to_ascii_lowercase();
            let reserved = lower.starts_with("cloudevents:")
                || lower.starts_with("cloudevents_")
                || lower.starts_with("ce-");
            if k.is_empty() || k.len() > 128 || k.chars().any(char::is_control) || reserved {
                issues.push(issue(
                    format!("{base}.headers.{k}"),
                    if reserved {
                        "weft sets the CloudEvents headers itself (cloudEvents:*)"
                    } else {
                        "not a header name (1 to 128 characters, no control characters)"
                    },
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
        let Some(routing_key) = routing_key.filter(|_| issues.is_empty()) else {
            return Err(issues);
        };
        Ok(AmqpSinkConfig {
            url: raw.url,
            exchange: raw.exchange,
            routing_key,
            mandatory: raw.mandatory.unwrap_or(true),
            persistent: raw.persistent.unwrap_or(true),
            headers,
            event_type: raw.event_type,
            event_source: raw.event_source,
            timeout,
            connect_timeout,
            format: raw.format.unwrap_or_default(),
        })
    }
}

/// The broker of a validated URL, as `host:port/vhost` (never the user or
/// password), for messages.
pub fn where_(url: &Secret) -> String {
    match url.expose().trim().parse::<lapin::uri::AMQPUri>() {
        Ok(u) => format!("{}:{}/{}", u.authority.host, u.authority.port, u.vhost),
        Err(_) => "the configured broker".to_owned(),
    }
}

fn url_issues(issues: &mut Vec<Issue>, base: &str, url: &str) {
    let url = url.trim();
    let path = format!("{base}.url");
    if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
        issues.push(issue(
            path,
            "expected an `amqp://user:password@host:5672/vhost` URL",
        ));
        return;
    }
    if url.starts_with("amqps://") {
        issues.push(issue(
            path,
            "`amqps://` (TLS) is not built into this weft: use `amqp://` (on a trusted network or through a TLS tunnel)",
        ));
        return;
    }
    // the client's own parser; the message never quotes the URL (it may
    // hold a password)
    if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
        let why = if e.contains(url) {
            String::new()
        } else {
            format!(": {e}")
        };
        issues.push(issue(path, format!("not an AMQP URL{why}")));
    }
}

/// A queue or exchange name: at most 255 bytes, no control characters;
/// empty only for the default exchange; `amq.` names are the broker's.
fn name_issues(issues: &mut Vec<Issue>, path: &str, name: &str, exchange: bool) {
    let bad =
        (name.is_empty() && !exchange) || name.len() > 255 || name.chars().any(char::is_control);
    if bad {
        issues.push(issue(
            path.to_owned(),
            format!("`{name}` is not an AMQP name (1 to 255 bytes, no control characters)"),
        ));
    } else if !exchange && name.starts_with("amq.") {
        issues.push(issue(
            path.to_owned(),
            format!("`{name}`: names starting with `amq.` are the broker's own"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(v: serde_json::Value) -> Result<AmqpSourceConfig, Vec<Issue>> {
        AmqpSourceConfig::from_settings("orders", &ConnectorSettings(v))
    }
    fn sink(v: serde_json::Value) -> Result<AmqpSinkConfig, Vec<Issue>> {
        AmqpSinkConfig::from_settings("bus", &ConnectorSettings(v))
    }

    #[test]
    fn source_defaults() {
        let c =
            source(json!({"url": "amqp://guest:guest@127.0.0.1:5672/%2f", "queue": "q"})).unwrap();
        assert!(c.declare);
        assert_eq!(c.exchange, None);
        assert_eq!(c.routing_key, "#");
        assert_eq!(c.batch, 256);
        assert_eq!(c.prefetch, 512);
        assert_eq!(c.max_message_bytes, 1 << 20);
        assert_eq!(c.event_id, AmqpEventId::Auto);
        assert_eq!(c.event_type, "orders.message");
        assert_eq!(where_(&c.url), "127.0.0.1:5672//");
    }

    #[test]
    fn every_source_problem_is_reported_with_its_path() {
        let e = source(json!({
            "url": "amqps://u:secret@h", "queue": "", "routing_key": "a.#",
            "batch": 100, "prefetch": 10, "connect_timeout": "soon"
        }))
        .unwrap_err();
        let b = "systems.orders.source.amqp";
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                format!("{b}.url"),
                format!("{b}.queue"),
                format!("{b}.routing_key"),
                format!("{b}.prefetch"),
                format!("{b}.connect_timeout"),
            ],
            "{e:?}"
        );
        assert!(!format!("{e:?}").contains("secret"));
        let e = source(json!({"url": "http://h", "queue": "q", "exchange": "x", "declare": false}))
            .unwrap_err();
        assert!(e[0].message.contains("amqp://"), "{e:?}");
        assert!(e[1].message.contains("declare: false"), "{e:?}");
        let e = source(json!({"url": "amqp://h", "queue": "q", "durable": true})).unwrap_err();
        assert!(e[0].message.contains("unknown field `durable`"), "{e:?}");
        let e =
            source(json!({"url": "amqp://h", "queue": "q", "event_id": "position"})).unwrap_err();
        assert_eq!(e[0].path, "systems.orders.source.amqp.event_id");
        let e = source(json!({"url": "amqp://h", "queue": "amq.x"})).unwrap_err();
        assert!(e[0].message.contains("broker's own"), "{e:?}");
    }

    #[test]
    fn sink_settings() {
        let c = sink(
            json!({"url": "amqp://h", "exchange": "crm", "routing_key": "customer.{key}",
                            "headers": {"x-team": "crm"}}),
        )
        .unwrap();
        assert!(c.mandatory && c.persistent);
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.headers, [("x-team".to_owned(), "crm".to_owned())]);
        // the default exchange
        assert!(sink(json!({"url": "amqp://h", "exchange": "", "routing_key": "q"})).is_ok());
        let e = sink(
            json!({"url": "amqp://h", "exchange": "x", "routing_key": "a.{key",
                            "headers": {"cloudEvents:id": "y", "ce-id": "z"}, "timeout": "1h"}),
        )
        .unwrap_err();
        let b = "systems.bus.sink.amqp";
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                format!("{b}.routing_key"),
                format!("{b}.headers.ce-id"),
                format!("{b}.headers.cloudEvents:id"),
                format!("{b}.timeout"),
            ],
            "{e:?}"
        );
        let e = sink(json!({"url": "amqp://h", "routing_key": "q"})).unwrap_err();
        assert!(e[0].message.contains("missing field `exchange`"), "{e:?}");
    }
}
