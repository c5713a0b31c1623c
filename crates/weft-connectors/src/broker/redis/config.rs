//! The `redis` source's and sink's settings: the raw serde structs (what a
//! user writes under `source: {redis: ...}` and `sink: {redis: ...}`), their
//! pure validation into [`RedisSourceConfig`] and [`RedisSinkConfig`], and
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
use crate::broker::{EventId, Format};

/// The source's settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisSource {
    /// `redis://[user:password@]host:6379[/db]`. Use `${ENV}` for a
    /// password. TLS (`rediss://`) is not built in.
    pub url: Secret,
    /// The stream's key.
    pub stream: String,
    /// The consumer group (default `weft-<system>`): its position in the
    /// stream lives in Redis and survives restarts of weft.
    pub group: Option<String>,
    /// This weft's consumer name in the group (default `weft`). Keep it
    /// stable across restarts: a restarted consumer reads its own pending
    /// entries again first.
    pub consumer: Option<String>,
    /// `true` (default): create the group (and the stream, `MKSTREAM`) when
    /// missing. `false`: the group must exist; a missing one stops the
    /// source with the reason.
    pub create: Option<bool>,
    /// Where a group weft creates starts: `all` (default, id `0`: every
    /// entry the stream holds) or `new` (`$`: entries added from now on).
    pub start: Option<Start>,
    /// Entries per read (`COUNT`) and per store commit at most (default 256).
    pub batch: Option<usize>,
    /// How long one read blocks waiting for new entries (`BLOCK`, default
    /// `5s`). Entries are handed over as they arrive, not after it.
    pub block: Option<String>,
    /// Entries pending on another consumer of the group for longer than
    /// this are taken over (`XAUTOCLAIM`, default `30s`): how soon what a
    /// dead weft held is read again. weft keeps its own held entries fresh
    /// while it retries a store commit, so a live one is not robbed.
    pub claim_idle: Option<String>,
    /// The entry field that holds the payload (default `data`). The other
    /// fields are the CloudEvents attributes (`ce_id`, `ce_source`, ...)
    /// and weft's headers; fields weft does not know are ignored.
    pub field: Option<String>,
    /// `json` (default): the field holds one JSON value; a CloudEvents
    /// structured-mode entry (`content-type: application/cloudevents+json`)
    /// is unwrapped.
    /// `{avro: {schema, confluent, schema_id}}` or `{protobuf: {schema:
    /// file.proto, message: pkg.Msg, confluent, schema_id,
    /// allow_unknown_fields}}` (`broker/format.rs`): a message that does
    /// not decode is dead-lettered with the reason.
    pub format: Option<Format>,
    /// Entries whose payload field is larger go to the DLQ (default 1 MiB).
    pub max_message_bytes: Option<usize>,
    /// `auto` (default): the event id is `ce_id` (with `ce_source`), else
    /// `<stream>:<entry id>`. `position`: always `<stream>:<entry id>`.
    pub event_id: Option<EventId>,
    /// CloudEvents `type` of entries without `ce_type` (default
    /// `<system>.message`).
    pub event_type: Option<String>,
    /// How long connecting may take (default `10s`).
    pub connect_timeout: Option<String>,
}

/// Where a new group starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    #[default]
    All,
    New,
}

impl Start {
    /// The id `XGROUP CREATE` takes.
    pub fn id(self) -> &'static str {
        match self {
            Start::All => "0",
            Start::New => "$",
        }
    }
}

/// A validated `redis` source.
#[derive(Debug, Clone)]
pub struct RedisSourceConfig {
    pub url: Secret,
    pub stream: String,
    pub group: String,
    pub consumer: String,
    pub create: bool,
    pub start: Start,
    pub batch: usize,
    pub block: Duration,
    pub claim_idle: Duration,
    pub field: String,
    pub format: Format,
    pub max_message_bytes: usize,
    pub event_id: EventId,
    pub event_type: String,
    pub connect_timeout: Duration,
}

/// The sink's settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisSink {
    /// `redis://[user:password@]host:6379[/db]`.
    pub url: Secret,
    /// The stream's key (created by the first `XADD`).
    pub stream: String,
    /// Trim the stream to about this many entries on every add (`MAXLEN ~`;
    /// default: no trimming).
    pub maxlen: Option<u64>,
    /// The entry field that holds the payload (default `data`).
    pub field: Option<String>,
    /// Fields added to every entry (values may use `${ENV}`).
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// How the payload field is written: `json` (default, text),
    /// `{avro: {schema: ...}}` or `{protobuf: {schema: file.proto,
    /// message: pkg.Msg}}` (`broker/format.rs`; binary, with its
    /// `content-type`); a record the schema does not fit is dead-lettered
    /// with the reason.
    pub format: Option<Format>,
    /// `ce_type` of the entries (default `weft.<flow>`).
    pub event_type: Option<String>,
    /// `ce_source` of the entries (default `weft/<flow>`).
    pub event_source: Option<String>,
    /// How long the dedupe key of one idempotency key lives (default `1h`):
    /// a retry within it returns the entry added before instead of adding
    /// another; a retry later than it adds a second entry with the same
    /// `ce_id`.
    pub dedupe_ttl: Option<String>,
    /// The start of the dedupe keys (default `weft:dedupe:`); the key is
    /// `<prefix><stream>:<idempotency key>`.
    pub dedupe_prefix: Option<String>,
    /// How long one batch's round trip may take (default `10s`); past it
    /// the writes are retried with the same idempotency keys.
    pub timeout: Option<String>,
    /// How long connecting may take before the destination counts as down
    /// (default `5s`; weft tries again on the next write).
    pub connect_timeout: Option<String>,
}

/// A validated `redis` sink.
#[derive(Debug, Clone)]
pub struct RedisSinkConfig {
    pub url: Secret,
    pub stream: String,
    pub maxlen: Option<u64>,
    pub field: String,
    pub fields: Vec<(String, String)>,
    pub format: Format,
    pub event_type: Option<String>,
    pub event_source: Option<String>,
    pub dedupe_ttl: Duration,
    pub dedupe_prefix: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

/// The fields weft writes itself (besides the payload field): a configured
/// `fields` entry may not name one.
pub const RESERVED_FIELDS: &[&str] = &[
    "content-type",
    "x-correlation-id",
    "x-causation-id",
    "traceparent",
    "tracestate",
];

impl RedisSourceConfig {
    /// Validate the settings of system `system`'s source; every problem,
    /// each with its document path.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.source.redis");
        let raw: RawRedisSource = parse(&base, settings)?;
        let mut issues = Vec::new();
        url_issues(&mut issues, &base, raw.url.expose());
        key_issues(&mut issues, &format!("{base}.stream"), &raw.stream);
        let group = raw.group.clone().unwrap_or_else(|| default_group(system));
        name_issues(&mut issues, &format!("{base}.group"), &group);
        let consumer = raw.consumer.clone().unwrap_or_else(|| "weft".to_owned());
        name_issues(&mut issues, &format!("{base}.consumer"), &consumer);
        let batch = raw.batch.unwrap_or(256);
        if batch == 0 || batch > 10_000 {
            issues.push(issue(
                format!("{base}.batch"),
                "must be between 1 and 10000",
            ));
        }
        let block = duration(
            &mut issues,
            &format!("{base}.block"),
            raw.block.as_deref(),
            Duration::from_secs(5),
            (Duration::from_millis(10), Duration::from_secs(300)),
        );
        let claim_idle = duration(
            &mut issues,
            &format!("{base}.claim_idle"),
            raw.claim_idle.as_deref(),
            Duration::from_secs(30),
            (Duration::from_secs(1), Duration::from_secs(7 * 24 * 3600)),
        );
        let connect_timeout = duration(
            &mut issues,
            &format!("{base}.connect_timeout"),
            raw.connect_timeout.as_deref(),
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(300)),
        );
        let field = raw.field.unwrap_or_else(|| "data".to_owned());
        field_issues(&mut issues, &format!("{base}.field"), &field);
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
        Ok(RedisSourceConfig {
            url: raw.url,
            stream: raw.stream,
            group,
            consumer,
            create: raw.create.unwrap_or(true),
            start: raw.start.unwrap_or_default(),
            batch,
            block,
            claim_idle,
            field,
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

impl RedisSinkConfig {
    /// Validate the settings of system `system`'s sink.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.sink.redis");
        let raw: RawRedisSink = parse(&base, settings)?;
        let mut issues = Vec::new();
        url_issues(&mut issues, &base, raw.url.expose());
        key_issues(&mut issues, &format!("{base}.stream"), &raw.stream);
        if raw.maxlen == Some(0) {
            issues.push(issue(
                format!("{base}.maxlen"),
                "must be greater than 0 (leave it out to keep every entry)",
            ));
        }
        let field = raw.field.unwrap_or_else(|| "data".to_owned());
        field_issues(&mut issues, &format!("{base}.field"), &field);
        let mut fields = Vec::new();
        for (k, v) in raw.fields {
            let lower = k.to_ascii_lowercase();
            let reserved =
                lower.starts_with("ce_") || RESERVED_FIELDS.contains(&lower.as_str()) || k == field;
            if k.is_empty() || reserved {
                issues.push(issue(
                    format!("{base}.fields.{k}"),
                    if reserved {
                        "weft writes this field itself (the payload field, ce_*, content-type, x-correlation-id, x-causation-id, traceparent, tracestate)"
                    } else {
                        "a field name cannot be empty"
                    },
                ));
            }
            fields.push((k, v));
        }
        let dedupe_ttl = duration(
            &mut issues,
            &format!("{base}.dedupe_ttl"),
            raw.dedupe_ttl.as_deref(),
            Duration::from_secs(3600),
            (Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600)),
        );
        let dedupe_prefix = raw
            .dedupe_prefix
            .unwrap_or_else(|| "weft:dedupe:".to_owned());
        if dedupe_prefix.is_empty() {
            issues.push(issue(
                format!("{base}.dedupe_prefix"),
                "cannot be empty: the dedupe keys would mix with other keys",
            ));
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
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(RedisSinkConfig {
            url: raw.url,
            stream: raw.stream,
            maxlen: raw.maxlen,
            field,
            fields,
            format: raw.format.unwrap_or_default(),
            event_type: raw.event_type,
            event_source: raw.event_source,
            dedupe_ttl,
            dedupe_prefix,
            timeout,
            connect_timeout,
        })
    }
}

/// The consumer group's name when none is given: `weft-<system>`.
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

fn url_issues(issues: &mut Vec<Issue>, base: &str, url: &str) {
    let url = url.trim();
    let path = format!("{base}.url");
    if url.starts_with("rediss://") {
        issues.push(issue(
            path,
            "`rediss://` (TLS) is not built into this weft: use `redis://` (on a trusted network or through a TLS tunnel)",
        ));
        return;
    }
    if !url.starts_with("redis://") {
        issues.push(issue(
            path,
            "expected a `redis://[user:password@]host:6379[/db]` URL",
        ));
        return;
    }
    // the client's own parser; the message never quotes the URL (it may
    // hold a password)
    if let Err(e) = ::redis::Client::open(url) {
        let why = e.detail().filter(|d| !d.contains(url)).unwrap_or_default();
        let sep = if why.is_empty() { "" } else { ": " };
        issues.push(issue(path, format!("not a Redis URL{sep}{why}")));
    }
}

/// A stream key: 1 to 4096 bytes (Redis allows more; a longer key is a
/// mistake), no control characters.
fn key_issues(issues: &mut Vec<Issue>, path: &str, key: &str) {
    if key.is_empty() || key.len() > 4096 || key.chars().any(char::is_control) {
        issues.push(issue(
            path.to_owned(),
            format!("`{key}` is not a stream key (1 to 4096 bytes, no control characters)"),
        ));
    }
}

/// A group or consumer name: 1 to 255 bytes, no white space or control
/// characters.
fn name_issues(issues: &mut Vec<Issue>, path: &str, name: &str) {
    if name.is_empty()
        || name.len() > 255
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        issues.push(issue(
            path.to_owned(),
            format!("`{name}` is not a group or consumer name (1 to 255 bytes, no spaces)"),
        ));
    }
}

/// The payload field: not empty, and not one of the fields weft reads or
/// writes beside it.
fn field_issues(issues: &mut Vec<Issue>, path: &str, field: &str) {
    let lower = field.to_ascii_lowercase();
    if field.is_empty() || lower.starts_with("ce_") || RESERVED_FIELDS.contains(&lower.as_str()) {
        issues.push(issue(
            path.to_owned(),
            format!(
                "`{field}` cannot hold the payload: give a field name that is not empty, `ce_*` or one of {RESERVED_FIELDS:?}"
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(v: serde_json::Value) -> Result<RedisSourceConfig, Vec<Issue>> {
        RedisSourceConfig::from_settings("Orders Bus", &ConnectorSettings(v))
    }
    fn sink(v: serde_json::Value) -> Result<RedisSinkConfig, Vec<Issue>> {
        RedisSinkConfig::from_settings("bus", &ConnectorSettings(v))
    }

    #[test]
    fn source_defaults() {
        let c = source(json!({"url": "redis://127.0.0.1:6379", "stream": "orders"})).unwrap();
        assert_eq!(c.group, "weft-Orders_Bus");
        assert_eq!(c.consumer, "weft");
        assert!(c.create);
        assert_eq!(c.start, Start::All);
        assert_eq!(c.start.id(), "0");
        assert_eq!(c.batch, 256);
        assert_eq!(c.block, Duration::from_secs(5));
        assert_eq!(c.claim_idle, Duration::from_secs(30));
        assert_eq!(c.field, "data");
        assert_eq!(c.max_message_bytes, 1 << 20);
        assert_eq!(c.event_id, EventId::Auto);
        assert_eq!(c.event_type, "Orders Bus.message");
        let c = source(json!({"url": "redis://h/2", "stream": "s", "start": "new"})).unwrap();
        assert_eq!(c.start.id(), "$");
    }

    #[test]
    fn every_source_problem_is_reported_with_its_path() {
        let e = source(json!({
            "url": "http://x", "stream": "", "group": "a b", "consumer": "",
            "batch": 0, "block": "1ms", "claim_idle": "soon", "field": "ce_id",
            "max_message_bytes": 0
        }))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        let b = "systems.Orders Bus.source.redis";
        assert_eq!(
            paths,
            [
                format!("{b}.url"),
                format!("{b}.stream"),
                format!("{b}.group"),
                format!("{b}.consumer"),
                format!("{b}.batch"),
                format!("{b}.block"),
                format!("{b}.claim_idle"),
                format!("{b}.field"),
                format!("{b}.max_message_bytes"),
            ],
            "{e:?}"
        );
        let e = source(json!({"url": "rediss://h:6380", "stream": "s"})).unwrap_err();
        assert!(e[0].message.contains("TLS"), "{e:?}");
        let e = source(json!({"url": "redis://u:pw@h:notaport", "stream": "s"})).unwrap_err();
        assert!(e[0].message.contains("not a Redis URL"), "{e:?}");
        assert!(!e[0].message.contains("pw"), "{e:?}");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused_at_their_path() {
        let e = source(json!({"url": "redis://h", "stream": "s", "subject": "x"})).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("unknown field `subject`"), "{e:?}");
        let e = source(json!({"url": "redis://h", "stream": "s", "batch": "many"})).unwrap_err();
        assert_eq!(e[0].path, "systems.Orders Bus.source.redis.batch");
        let e = source(json!({"stream": "s"})).unwrap_err();
        assert!(e[0].message.contains("missing field `url`"), "{e:?}");
    }

    #[test]
    fn sink_settings() {
        let c = sink(
            json!({"url": "redis://h:6379", "stream": "erp", "maxlen": 1000,
                            "fields": {"origin": "weft"}}),
        )
        .unwrap();
        assert_eq!(c.maxlen, Some(1000));
        assert_eq!(c.field, "data");
        assert_eq!(c.fields, [("origin".to_owned(), "weft".to_owned())]);
        assert_eq!(c.dedupe_ttl, Duration::from_secs(3600));
        assert_eq!(c.dedupe_prefix, "weft:dedupe:");
        assert_eq!(c.timeout, Duration::from_secs(10));
        let e = sink(json!({"url": "redis://h", "stream": "", "maxlen": 0,
                            "fields": {"ce_id": "x", "data": "y", "traceparent": "z"},
                            "dedupe_ttl": "0s", "dedupe_prefix": "", "timeout": "forever"}))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        let b = "systems.bus.sink.redis";
        assert_eq!(
            paths,
            [
                format!("{b}.stream"),
                format!("{b}.maxlen"),
                format!("{b}.fields.ce_id"),
                format!("{b}.fields.data"),
                format!("{b}.fields.traceparent"),
                format!("{b}.dedupe_ttl"),
                format!("{b}.dedupe_prefix"),
                format!("{b}.timeout"),
            ],
            "{e:?}"
        );
        let e = sink(json!({"url": "redis://h", "stream": "s", "group": "g"})).unwrap_err();
        assert!(e[0].message.contains("unknown field `group`"), "{e:?}");
    }
}
