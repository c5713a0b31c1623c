//! Pure validation: raw config in, ready-to-run [`Config`] or every problem out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::raw::*;
use super::{Issue, Secret, parse_duration};
use crate::mapping::Program;

/// A validated config: every reference resolved, every program compiled.
#[derive(Debug)]
pub struct Config {
    /// The config file.
    pub file: PathBuf,
    pub store: StoreConfig,
    pub server: ServerConfig,
    pub systems: BTreeMap<String, System>,
    /// Flows in name order.
    pub flows: Vec<Arc<Flow>>,
    /// Canonical entities, contracts and value maps.
    pub data: Arc<super::entities::DataModel>,
    /// Identity rules per entity, with their routes.
    pub identity: BTreeMap<String, Arc<crate::identity::Rules>>,
    /// The top-level alert receiver (`alerts`), if any.
    pub alerts: Option<Arc<AlertTarget>>,
    /// Where traces go (`telemetry.otlp`); `None`: no spans.
    pub otlp: Option<OtlpConfig>,
    /// Topics inside the hub (`topics`), by name.
    pub topics: BTreeMap<String, Topic>,
    /// What is allowed but probably not meant (replays accepted, updates
    /// deduplicated), each with its path, line and column: `weft validate`
    /// prints them, `weft run` logs them.
    pub warnings: Vec<Issue>,
}

/// A topic inside the hub, validated.
#[derive(Debug, Clone)]
pub struct Topic {
    pub name: String,
    pub description: Option<String>,
    /// Messages older than this are pruned (`topics.<name>.retention`).
    pub retention: Duration,
}

/// Where a flow reading a topic starts the first time it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TopicStart {
    /// With what is published from then on.
    #[default]
    Now,
    /// With the oldest message the topic keeps.
    Beginning,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    pub dedupe_retention: Duration,
    /// Resolved (replayed, discarded) DLQ entries are deleted this long
    /// after they were resolved (`store.dlq_retention`).
    pub dlq_retention: Duration,
    /// Drift events are deleted this long after a record last showed them
    /// (`store.drift_retention`).
    pub drift_retention: Duration,
    /// Attempt-trail entries are deleted this long after their write
    /// (`store.attempt_retention`).
    pub attempt_retention: Duration,
    /// The journal in PostgreSQL instead of `path` (`store.postgres`).
    pub postgres: Option<PgStore>,
}

/// `store.postgres`, validated.
#[derive(Debug, Clone)]
pub struct PgStore {
    pub url: Secret,
    pub schema: String,
    pub node: String,
    pub pool_size: usize,
    /// `store.postgres.node_timeout`: a node silent this long is dead.
    pub node_timeout: Duration,
    /// `store.postgres.experimental_identity`: canonical records allowed.
    pub experimental_identity: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The webhook listener.
    pub listen: SocketAddr,
    /// The admin listener (admin API, metrics).
    pub admin_listen: SocketAddr,
    pub admin_token: Option<Secret>,
    /// Requests in progress at once, per listener.
    pub max_concurrent_requests: usize,
    /// Webhook body bytes held at once, across all requests.
    pub max_inflight_bytes: usize,
}

/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 32;

#[derive(Debug)]
pub struct System {
    pub name: String,
    pub description: Option<String>,
    pub source: Option<SourceSpec>,
    pub sink: Option<SinkSpec>,
    pub breaker: Option<BreakerPolicy>,
    pub rate_limit: Option<RateLimitPolicy>,
}

/// Circuit breaker of one destination system.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub cooldown: Duration,
    pub half_open_probes: u32,
}

/// Rate limit of one destination system: `burst` requests, refilled one
/// every `period`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitPolicy {
    pub period: Duration,
    pub burst: u32,
    /// As written, for logs and metrics: `10/s`.
    pub label: String,
}

/// A source, with its programs compiled and paths resolved.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    Webhook {
        cfg: WebhookSourceConfig,
        id_field: Option<Arc<Program>>,
        event_type: String,
        max_body_bytes: usize,
        /// Header of the `secret` shorthand.
        signature_header: String,
        /// Header of the event id; its default depends on the signature
        /// scheme (`webhook-id` for Standard Webhooks, `x-github-delivery`
        /// for GitHub, else `x-event-id`). `None` for Stripe without an
        /// explicit `id_header`: the signed body's `id` is the event id, and
        /// no unsigned header may replace it.
        id_header: Option<String>,
        /// Replay window for signature schemes with a timestamp.
        signature_tolerance: Duration,
    },
    File {
        cfg: Box<FileSourceConfig>,
        target: FileTarget,
        id_field: Option<Arc<Program>>,
        event_type: String,
        poll_interval: Duration,
        batch_size: usize,
        /// Encoding of CSV files.
        encoding: TextEncoding,
        /// XML files: the element names from the root to a record
        /// element; `*` matches any name.
        record_path: Vec<String>,
        /// Drop folder: how long a file's size and modification time must
        /// hold still before it is read.
        settle: Duration,
        /// Drop folder: the suffix of the marker file that says a file is
        /// complete (`.done`); then `settle` is not used.
        ready_marker: Option<String>,
    },
    Generate {
        cfg: GenerateSourceConfig,
        template: Arc<Program>,
        event_type: String,
        batch_size: usize,
    },
    Rest {
        cfg: Box<RestSourceConfig>,
        /// `GET` or `POST`.
        method: String,
        /// Where the records are in a response body.
        records: Arc<Program>,
        id_field: Option<Arc<Program>>,
        event_type: String,
        /// Poll period; `None` when `cron` is set.
        interval: Option<Duration>,
        cron: Option<String>,
        timeout: Duration,
        max_backoff: Duration,
        /// The cursor (cursor pagination) or next URL (next_url pagination) program.
        next_page: Option<Arc<Program>>,
        /// Page cap per poll.
        max_pages: u64,
        /// The incremental cursor of a record.
        cursor_field: Option<Arc<Program>>,
    },
    SqlPoll {
        cfg: Box<SqlPollSourceConfig>,
        /// The SQLite file, resolved against the config's folder (`sqlite:` URLs only).
        sqlite_path: Option<PathBuf>,
        /// Prefix of event ids: the table's or the query's name.
        name: String,
        interval: Duration,
        batch_size: usize,
        event_type: String,
        /// Rows younger than this (by their cursor) are left for a later poll.
        settle: Duration,
        /// How far behind the saved cursor each poll re-reads.
        overlap: Duration,
    },
    /// PostgreSQL change data capture; the connector validates `settings`.
    PostgresCdc { settings: ConnectorSettings },
    /// MariaDB/MySQL binlog change data capture; the connector validates
    /// `settings`.
    MysqlCdc { settings: ConnectorSettings },
    /// A NATS JetStream consumer; the connector validates `settings`.
    Nats { settings: ConnectorSettings },
    /// A RabbitMQ queue consumer; the connector validates `settings`.
    Amqp { settings: ConnectorSettings },
    /// A Redis Streams consumer group; the connector validates `settings`.
    Redis { settings: ConnectorSettings },
    /// An MQTT subscriber; the connector validates `settings`.
    Mqtt { settings: ConnectorSettings },
    /// A Kafka consumer group member; the connector validates `settings`.
    Kafka { settings: ConnectorSettings },
}

impl SourceSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSpec::Webhook { .. } => "webhook",
            SourceSpec::File { .. } => "file",
            SourceSpec::Generate { .. } => "generate",
            SourceSpec::Rest { .. } => "rest",
            SourceSpec::SqlPoll { .. } => "sql_poll",
            SourceSpec::PostgresCdc { .. } => "postgres_cdc",
            SourceSpec::MysqlCdc { .. } => "mysql_cdc",
            SourceSpec::Nats { .. } => "nats",
            SourceSpec::Amqp { .. } => "amqp",
            SourceSpec::Redis { .. } => "redis",
            SourceSpec::Mqtt { .. } => "mqtt",
            SourceSpec::Kafka { .. } => "kafka",
        }
    }
}

/// What a file source reads.
#[derive(Debug, Clone)]
pub enum FileTarget {
    /// A drop folder.
    Dir(PathBuf),
    /// One file, read in place.
    Path(PathBuf),
}

/// Text encodings the file source decodes (CSV files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextEncoding {
    #[default]
    Utf8,
    /// ISO-8859-1: every byte is the code point of the same number.
    Latin1,
    /// Windows-1252 (as in the WHATWG Encoding Standard).
    Windows1252,
}

impl TextEncoding {
    /// The encoding named `s` (case-insensitive; common aliases accepted).
    pub fn from_label(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "utf-8" | "utf8" => Some(TextEncoding::Utf8),
            "latin-1" | "latin1" | "iso-8859-1" | "iso8859-1" => Some(TextEncoding::Latin1),
            "windows-1252" | "cp1252" => Some(TextEncoding::Windows1252),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            TextEncoding::Utf8 => "utf-8",
            TextEncoding::Latin1 => "latin-1",
            TextEncoding::Windows1252 => "windows-1252",
        }
    }
}

/// Where an export sink (JSON Lines, CSV) writes.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportTarget {
    /// One file, appended to.
    File(PathBuf),
    /// Rotating files in a folder.
    Dir {
        dir: PathBuf,
        /// Start of every file name.
        prefix: String,
        rotate: RotatePolicy,
    },
}

/// When a rotating export file is complete.
#[derive(Debug, Clone, PartialEq)]
pub struct RotatePolicy {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub idle: Duration,
}

/// A sink, with paths resolved and durations parsed.
#[derive(Debug, Clone)]
pub enum SinkSpec {
    Http {
        cfg: Box<HttpSinkConfig>,
        method: String,
        timeout: Duration,
        connect_timeout: Duration,
    },
    Sqlite {
        cfg: SqliteSinkConfig,
        path: PathBuf,
    },
    Postgres {
        cfg: PostgresSinkConfig,
    },
    Jsonl {
        cfg: JsonlSinkConfig,
        target: ExportTarget,
    },
    Csv {
        cfg: CsvSinkConfig,
        target: ExportTarget,
        /// Configured columns; `None`: the first record's keys, per file.
        columns: Option<Vec<String>>,
        delimiter: u8,
        header: bool,
    },
    Mysql {
        cfg: Box<MysqlSinkConfig>,
    },
    /// A NATS JetStream publisher; the connector validates `settings`.
    Nats {
        settings: ConnectorSettings,
    },
    /// A RabbitMQ publisher; the connector validates `settings`.
    Amqp {
        settings: ConnectorSettings,
    },
    /// A Redis Streams publisher; the connector validates `settings`.
    Redis {
        settings: ConnectorSettings,
    },
    /// An MQTT publisher; the connector validates `settings`.
    Mqtt {
        settings: ConnectorSettings,
    },
    /// A Kafka producer; the connector validates `settings`.
    Kafka {
        settings: ConnectorSettings,
    },
}

impl SinkSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkSpec::Http { .. } => "http",
            SinkSpec::Sqlite { .. } => "sqlite",
            SinkSpec::Postgres { .. } => "postgres",
            SinkSpec::Jsonl { .. } => "jsonl",
            SinkSpec::Csv { .. } => "csv",
            SinkSpec::Mysql { .. } => "mysql",
            SinkSpec::Nats { .. } => "nats",
            SinkSpec::Amqp { .. } => "amqp",
            SinkSpec::Redis { .. } => "redis",
            SinkSpec::Mqtt { .. } => "mqtt",
            SinkSpec::Kafka { .. } => "kafka",
        }
    }
}

/// A flow ready to run.
#[derive(Debug)]
pub struct Flow {
    pub name: String,
    /// Name of the source system, or of the topic the flow subscribes to.
    pub from: String,
    /// `Some` when `from` is a topic: where the flow starts the first time.
    pub start: Option<TopicStart>,
    pub filter: Option<Arc<Program>>,
    pub key: Option<Arc<Program>>,
    pub mapping: Option<Arc<Program>>,
    pub destinations: Vec<Destination>,
    /// Entity contract, violation and drift policy.
    pub data: super::entities::FlowData,
    /// The identity rules of the entity whose canonical records this flow
    /// feeds (`flows.<name>.identity`; also in `Config::identity`).
    pub identity: Option<Arc<crate::identity::Rules>>,
    /// Expected freshness (`flows.<name>.freshness`): late when the newest
    /// record is older, or a pending record has waited longer.
    pub freshness: Option<Duration>,
    /// Where this flow's freshness alerts go (its own `alerts`, else the
    /// top-level one).
    pub alerts: Option<Arc<AlertTarget>>,
}

/// `telemetry.otlp`, validated.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The full traces URL (`endpoint` + `/v1/traces`).
    pub traces_url: String,
    pub headers: Vec<(String, Secret)>,
    pub service_name: String,
    /// In `[0, 1]`.
    pub sample_ratio: f64,
}

/// An alert receiver, validated.
#[derive(Debug)]
pub struct AlertTarget {
    pub url: String,
    pub headers: Vec<(String, Secret)>,
}

/// One destination of a flow.
#[derive(Debug)]
pub struct Destination {
    /// Name of the sink system.
    pub system: String,
    pub mapping: Option<Arc<Program>>,
    pub delivery: DeliveryPolicy,
    /// Contract the payload must satisfy before it is written.
    pub contract: Option<Arc<super::entities::Contract>>,
    /// Fields replaced by this destination's id of a canonical record when
    /// written (`references:`).
    pub references: Vec<super::references::Reference>,
}

/// Retry and concurrency policy of one destination of one flow.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    pub concurrency: usize,
    pub batch_size: usize,
    pub on_dead_letter: OnDeadLetter,
    pub backlog_high_water: u64,
}

struct Ctx {
    issues: Vec<Issue>,
    warnings: Vec<Issue>,
    /// jq definitions (the value maps) compiled with every program.
    prelude: String,
}

impl Ctx {
    /// A warning at `path`; the loader adds the line and column.
    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Issue {
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        });
    }
    fn at(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        });
    }
    fn at_span<T>(
        &mut self,
        path: impl Into<String>,
        span: &Spanned<T>,
        message: impl Into<String>,
    ) {
        let loc = span.referenced;
        self.issues.push(Issue {
            path: path.into(),
            line: Some(loc.line()).filter(|l| *l > 0),
            column: Some(loc.column()).filter(|c| *c > 0),
            message: message.into(),
        });
    }

    /// A warning: the config loads, but this deserves a look.
    fn warn_span<T>(
        &mut self,
        path: impl Into<String>,
        span: &Spanned<T>,
        message: impl Into<String>,
    ) {
        let loc = span.referenced;
        self.warnings.push(Issue {
            path: path.into(),
            line: Some(loc.line()).filter(|l| *l > 0),
            column: Some(loc.column()).filter(|c| *c > 0),
            message: message.into(),
        });
    }

    /// Compile a jq program; on error point at the line of the YAML value
    /// plus the line inside the program.
    fn program(
        &mut self,
        path: &str,
        code: &Spanned<String>,
        vars: &[&str],
    ) -> Option<Arc<Program>> {
        match Program::compile_with(&code.value, vars, &self.prelude) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                let loc = code.referenced;
                // the value's location is where its text starts, also for block scalars
                let line = loc.line() + e.line as u64 - 1;
                self.issues.push(Issue {
                    path: path.to_owned(),
                    line: Some(line).filter(|l| *l > 0),
                    column: None,
                    message: format!(
                        "invalid jq program: {} (line {}, column {} of the program)",
                        e.message, e.line, e.column
                    ),
                });
                None
            }
        }
    }

    fn duration(&mut self, path: &str, v: &Option<Spanned<String>>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(&s.value) {
                Ok(d) => d,
                Err(m) => {
                    self.at_span(path, s, m);
                    default
                }
            },
        }
    }
}

pub(super) fn validate(raw: RawConfig, file: &Path, base: &Path) -> Result<Config, Vec<Issue>> {
    let mut cx = Ctx {
        issues: Vec::new(),
        warnings: Vec::new(),
        prelude: String::new(),
    };
    let data = super::entities::model(&mut cx.issues, raw.entities, raw.value_maps, base);
    cx.prelude = data.prelude.clone();

    let postgres = raw.store.postgres.map(|pg| {
        let schema = pg.schema.unwrap_or_else(|| "weft".into());
        let plain = !schema.is_empty()
            && schema.len() <= 63
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !plain {
            cx.at(
                "store.postgres.schema",
                format!("`{schema}`: use lower-case letters, digits and _ (at most 63, not starting with a digit)"),
            );
        }
        let node = pg.node.unwrap_or_else(|| "weft".into());
        if node.trim().is_empty() {
            cx.at("store.postgres.node", "a node name must not be empty");
        }
        let pool_size = pg.pool_size.unwrap_or(8);
        if pool_size == 0 {
            cx.at("store.postgres.pool_size", "at least 1 connection");
        }
        let default_timeout = Duration::from_secs(10);
        let mut node_timeout = cx.duration(
            "store.postgres.node_timeout",
            &pg.node_timeout,
            default_timeout,
        );
        if let Some(span) = &pg.node_timeout
            && !(Duration::from_secs(3)..=Duration::from_secs(600)).contains(&node_timeout)
        {
            cx.at_span(
                "store.postgres.node_timeout",
                span,
                format!(
                    "`{}`: from 3s to 10m (heartbeats go every third of it)",
                    span.value
                ),
            );
            node_timeout = default_timeout;
        }
        PgStore {
            url: pg.url,
            schema,
            node,
            pool_size,
            node_timeout,
            experimental_identity: pg.experimental_identity.unwrap_or(false),
        }
    });
    let store = StoreConfig {
        postgres,
        path: base.join(raw.store.path.as_deref().unwrap_or("weft-data/weft.db")),
        synchronous: raw.store.synchronous.unwrap_or(Synchronous::Full),
        dedupe_retention: cx.duration(
            "store.dedupe_retention",
            &raw.store.dedupe_retention,
            Duration::from_secs(7 * 24 * 3600),
        ),
        dlq_retention: cx.duration(
            "store.dlq_retention",
            &raw.store.dlq_retention,
            Duration::from_secs(30 * 24 * 3600),
        ),
        drift_retention: cx.duration(
            "store.drift_retention",
            &raw.store.drift_retention,
            Duration::from_secs(90 * 24 * 3600),
        ),
        attempt_retention: cx.duration(
            "store.attempt_retention",
            &raw.store.attempt_retention,
            Duration::from_secs(7 * 24 * 3600),
        ),
    };
    let listen_s = raw.server.listen.as_deref().unwrap_or("127.0.0.1:8080");
    let listen = match listen_s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            cx.at(
                "server.listen",
                format!(
                    "`{listen_s}` is not an address; expected `host:port` such as `127.0.0.1:8080`"
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 8080))
        }
    };
    let admin_s = raw
        .server
        .admin_listen
        .as_deref()
        .unwrap_or("127.0.0.1:9090");
    let admin_listen = match admin_s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            cx.at(
                "server.admin_listen",
                format!(
                    "`{admin_s}` is not an address; expected `host:port` such as `127.0.0.1:9090`"
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 9090))
        }
    };
    if admin_listen == listen && listen.port() != 0 {
        cx.at(
            "server.admin_listen",
            format!("`{admin_listen}` is also `server.listen`: the admin API and metrics need their own address"),
        );
    }
    let admin_token = raw.server.admin_token.filter(|t| !t.expose().is_empty());
    if let Some(t) = &admin_token
        && t.expose().len() < MIN_ADMIN_TOKEN_BYTES
    {
        // never quote the token
        cx.at(
            "server.admin_token",
            format!(
                "is {} bytes; at least {MIN_ADMIN_TOKEN_BYTES} are required (e.g. `openssl rand -hex 32`)",
                t.expose().len()
            ),
        );
    }
    let max_concurrent_requests = raw.server.max_concurrent_requests.unwrap_or(512);
    if max_concurrent_requests == 0 {
        cx.at("server.max_concurrent_requests", "must be at least 1");
    }
    let max_inflight_bytes = raw.server.max_inflight_bytes.unwrap_or(16 << 20);
    if max_inflight_bytes == 0 {
        cx.at("server.max_inflight_bytes", "must be greater than 0");
    }
    let server = ServerConfig {
        listen,
        admin_listen,
        admin_token,
        max_concurrent_requests,
        max_inflight_bytes,
    };

    let mut systems = BTreeMap::new();
    let mut webhook_paths: BTreeMap<String, String> = BTreeMap::new();
    for (name, sys) in raw.systems {
        let p = format!("systems.{name}");
        if !valid_name(&name) {
            cx.at(&p, "system names use letters, digits, `_` and `-`");
        }
        if sys.source.is_none() && sys.sink.is_none() {
            cx.at(&p, "a system needs a `source`, a `sink` or both");
        }
        let source = sys.source.and_then(|s| {
            source_spec(
                &mut cx,
                &format!("{p}.source"),
                &name,
                s,
                base,
                &mut webhook_paths,
            )
        });
        if sys.sink.is_none() && (sys.circuit_breaker.is_some() || sys.rate_limit.is_some()) {
            cx.at(
                &p,
                "`circuit_breaker` and `rate_limit` apply to a `sink`; this system has none",
            );
        }
        let breaker = breaker_policy(
            &mut cx,
            &format!("{p}.circuit_breaker"),
            sys.circuit_breaker.unwrap_or_default(),
        );
        let rate_limit = sys
            .rate_limit
            .and_then(|r| rate_limit_policy(&mut cx, &format!("{p}.rate_limit"), r));
        let sink = sys
            .sink
            .and_then(|s| sink_spec(&mut cx, &format!("{p}.sink"), &name, s, base));
        systems.insert(
            name.clone(),
            System {
                name,
                description: sys.description,
                source,
                sink,
                breaker,
                rate_limit,
            },
        );
    }

    for (name, sys) in &systems {
        if let Some(SourceSpec::Webhook { max_body_bytes, .. }) = &sys.source
            && *max_body_bytes > server.max_inflight_bytes
        {
            cx.at(
                format!("systems.{name}.source.webhook.max_body_bytes"),
                format!(
                    "{max_body_bytes} is more than `server.max_inflight_bytes` ({}): such a body could never be accepted; raise `server.max_inflight_bytes`",
                    server.max_inflight_bytes
                ),
            );
        }
    }

    let mut topics = BTreeMap::new();
    for (name, t) in raw.topics {
        let p = format!("topics.{name}");
        if !valid_name(&name) {
            cx.at(&p, "topic names use letters, digits, `_` and `-`");
        }
        if systems.contains_key(&name) {
            cx.at(
                &p,
                format!("`{name}` is a system too: a topic needs a name of its own (flows name either in `from` and `to`)"),
            );
        }
        let retention = cx.duration(
            &format!("{p}.retention"),
            &t.retention,
            Duration::from_secs(7 * 24 * 3600),
        );
        if let Some(r) = &t.retention
            && retention < Duration::from_secs(1)
        {
            cx.at_span(
                format!("{p}.retention"),
                r,
                format!("`{}`: expected at least 1s (e.g. `7d`)", r.value),
            );
        }
        topics.insert(
            name.clone(),
            Topic {
                name,
                description: t.description,
                retention,
            },
        );
    }
    let known_names = |systems: &BTreeMap<String, System>| {
        if topics.is_empty() {
            known(systems)
        } else {
            format!(
                "{}; topics: {}",
                known(systems),
                topics
                    .keys()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    let mut identity =
        super::identity::rules(&mut cx.issues, raw.identity, &|s| systems.contains_key(s));
    match &store.postgres {
        Some(pg) if !identity.is_empty() && pg.experimental_identity => cx.warn(
            "identity",
            "canonical records on PostgreSQL are experimental: two systems editing the same records in bursts past about 60 webhooks a second can outrun the echo window (ARCHITECTURE.md, the PostgreSQL journal)",
        ),
        Some(_) if !identity.is_empty() => cx.at(
            "identity",
            "canonical records on PostgreSQL are experimental: set `store.postgres.experimental_identity: true` to use them, or use the SQLite store",
        ),
        _ => {}
    }
    let defaults = raw.defaults.delivery;
    let alerts = raw
        .alerts
        .map(|a| Arc::new(alert_target(&mut cx, "alerts", a)));
    let otlp = raw.telemetry.otlp.map(|o| otlp_config(&mut cx, o));
    let mut flows = Vec::new();
    for (name, mut f) in raw.flows {
        let p = format!("flows.{name}");
        let freshness = f
            .freshness
            .as_ref()
            .and_then(|s| match parse_duration(&s.value) {
                Ok(d) if d >= Duration::from_secs(1) => Some(d),
                Ok(_) => {
                    cx.at_span(
                        format!("{p}.freshness"),
                        s,
                        format!("`{}`: expected at least 1s (e.g. `15m`)", s.value),
                    );
                    None
                }
                Err(m) => {
                    cx.at_span(format!("{p}.freshness"), s, m);
                    None
                }
            });
        let flow_alerts = match f.alerts.take() {
            Some(a) => {
                if f.freshness.is_none() {
                    cx.warn_span(
                        format!("{p}.alerts"),
                        &a.webhook,
                        "the flow has `alerts` but no `freshness`: nothing will be alerted (set e.g. `freshness: 15m`)",
                    );
                }
                Some(Arc::new(alert_target(&mut cx, &format!("{p}.alerts"), a)))
            }
            None => alerts.clone(),
        };
        if !valid_name(&name) {
            cx.at(&p, "flow names use letters, digits, `_` and `-`");
        }
        let from_topic = topics.contains_key(&f.from.value);
        let start = match (&f.start, from_topic) {
            (None, true) => Some(TopicStart::Now),
            (None, false) => None,
            (Some(s), true) => match s.value.as_str() {
                "now" => Some(TopicStart::Now),
                "beginning" => Some(TopicStart::Beginning),
                other => {
                    cx.at_span(
                        format!("{p}.start"),
                        s,
                        format!("`{other}`: expected `now` or `beginning`"),
                    );
                    None
                }
            },
            (Some(s), false) => {
                cx.at_span(
                    format!("{p}.start"),
                    s,
                    format!(
                        "`start` is for a flow reading a topic; `{}` is not one of `topics`",
                        f.from.value
                    ),
                );
                None
            }
        };
        if from_topic && f.identity.is_some() {
            cx.at(
                format!("{p}.identity"),
                "a flow reading a topic cannot feed canonical records yet: read the system's own source",
            );
        }
        match systems.get(&f.from.value) {
            None if from_topic => {}
            None => cx.at_span(
                format!("{p}.from"),
                &f.from,
                format!(
                    "unknown system `{}`; known: {}",
                    f.from.value,
                    known_names(&systems)
                ),
            ),
            Some(s) if s.source.is_none() => cx.at_span(
                format!("{p}.from"),
                &f.from,
                format!("system `{}` has no `source` to read from", f.from.value),
            ),
            _ => {}
        }
        let source_kind = systems
            .get(&f.from.value)
            .and_then(|s| s.source.as_ref().map(SourceSpec::kind));
        let fdata = super::entities::flow(&mut cx.issues, &p, &f, source_kind, &data);
        let filter = f
            .filter
            .as_ref()
            .and_then(|c| cx.program(&format!("{p}.filter"), c, &[]));
        let key = match &f.key {
            Some(c) => cx.program(&format!("{p}.key"), c, &[]),
            // a change event's subject is its table and primary key
            None if matches!(source_kind, Some("postgres_cdc" | "mysql_cdc")) => {
                Program::compile("$event.subject", &[]).ok().map(Arc::new)
            }
            // a topic's message carries the entity key it was published with
            None if from_topic => Program::compile("$event.subject", &[]).ok().map(Arc::new),
            None => None,
        };
        let mapping = f
            .mapping
            .as_ref()
            .and_then(|c| cx.program(&format!("{p}.mapping"), c, &[]));
        if f.to.is_empty() {
            cx.at(format!("{p}.to"), "a flow needs at least one destination");
        }
        let mut destinations = Vec::new();
        for (i, d) in f.to.into_iter().enumerate() {
            let dp = format!("{p}.to[{i}]");
            let span = Spanned::new((), d.referenced, d.defined);
            let (system, dmap, ddel, dcontract, drefs) = match d.value {
                RawDestination::Name(n) => (n, None, None, None, BTreeMap::new()),
                RawDestination::Full(full) => (
                    full.system,
                    full.mapping,
                    full.delivery,
                    full.contract,
                    full.references,
                ),
            };
            let references = super::references::references(
                &mut cx.issues,
                &dp,
                drefs,
                &super::references::Known {
                    systems: &|s| systems.contains_key(s),
                    entities: &|e| identity.contains_key(e),
                    from: &f.from.value,
                    identity_flow: f.identity.is_some(),
                },
            );
            let contract = super::entities::destination_contract(
                &mut cx.issues,
                &dp,
                dcontract.as_ref(),
                base,
            );
            let system = Spanned::new(system, span.referenced, span.defined);
            let to_topic = topics.contains_key(&system.value);
            if to_topic {
                if system.value == f.from.value {
                    cx.at_span(
                        &dp,
                        &system,
                        format!(
                            "the flow reads topic `{}` and publishes to it: every message would come back forever",
                            system.value
                        ),
                    );
                }
                if f.identity.is_some() {
                    cx.at_span(
                        &dp,
                        &system,
                        "a flow feeding canonical records cannot publish to a topic yet: publish from another flow of the same source",
                    );
                }
                if !references.is_empty() {
                    cx.at_span(
                        &dp,
                        &system,
                        "`references` replace ids by a destination system's ids: a topic has none",
                    );
                }
            }
            let kind = match systems.get(&system.value) {
                None if to_topic => Some("topic"),
                None => {
                    cx.at_span(
                        &dp,
                        &system,
                        format!(
                            "unknown system `{}`; known: {}",
                            system.value,
                            known_names(&systems)
                        ),
                    );
                    None
                }
                Some(s) => match &s.sink {
                    None => {
                        cx.at_span(
                            &dp,
                            &system,
                            format!("system `{}` has no `sink` to write to", system.value),
                        );
                        None
                    }
                    Some(k) => Some(k.kind()),
                },
            };
            // P1-17: without a key nothing orders two writes of one record
            if f.key.is_none()
                && key.is_none()
                && matches!(kind, Some("http" | "postgres" | "mysql" | "sqlite"))
            {
                cx.warn_span(
                    &dp,
                    &system,
                    format!(
                        "the flow has no `key`: its writes to `{}` have no order, so two updates of one record can arrive in either order (set `key`, e.g. `key: .id | tostring`)",
                        system.value
                    ),
                );
            }
            if destinations
                .iter()
                .any(|x: &Destination| x.system == system.value)
            {
                cx.at_span(
                    &dp,
                    &system,
                    format!("system `{}` is listed twice", system.value),
                );
            }
            let mapping = dmap
                .as_ref()
                .and_then(|c| cx.program(&format!("{dp}.mapping"), c, &[]));
            let delivery = delivery_policy(
                &mut cx,
                [
                    (ddel.as_ref(), format!("{dp}.delivery")),
                    (f.delivery.as_ref(), format!("{p}.delivery")),
                    (Some(&defaults), "defaults.delivery".to_owned()),
                ],
                kind,
            );
            destinations.push(Destination {
                system: system.value,
                mapping,
                delivery,
                contract,
                references,
            });
        }
        let entity = match &f.identity {
            None => None,
            Some(e) => match identity.get_mut(&e.value) {
                None => {
                    cx.at_span(
                        format!("{p}.identity"),
                        e,
                        format!(
                            "unknown entity `{}`; declare it under `identity:`{}",
                            e.value,
                            if identity.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    " (known: {})",
                                    identity.keys().cloned().collect::<Vec<_>>().join(", ")
                                )
                            }
                        ),
                    );
                    None
                }
                Some(rules) => {
                    if key.is_none() {
                        cx.at_span(
                            format!("{p}.identity"),
                            e,
                            "a flow feeding canonical records needs `key`: the source system's id of the record (e.g. `key: .id | tostring`)",
                        );
                    }
                    for d in &destinations {
                        super::identity::add_route(rules, &name, &d.system);
                    }
                    Some(e.value.clone())
                }
            },
        };
        flows.push((
            Flow {
                name,
                from: f.from.value,
                start,
                filter,
                key,
                mapping,
                destinations,
                data: fdata,
                identity: None,
                freshness,
                alerts: flow_alerts,
            },
            entity,
        ));
    }

    // the rules are complete (every flow's routes) only now
    let identity: BTreeMap<String, Arc<crate::identity::Rules>> = identity
        .into_iter()
        .map(|(k, v)| (k, Arc::new(v)))
        .collect();
    let flows: Vec<Arc<Flow>> = flows
        .into_iter()
        .map(|(mut f, entity)| {
            f.identity = entity.and_then(|e| identity.get(&e).cloned());
            Arc::new(f)
        })
        .collect();
    topic_graph(&mut cx, &topics, &flows);
    if systems.is_empty() && flows.is_empty() {
        cx.at(
            "",
            "the config declares no systems and no flows: nothing to run (see `systems:` and `flows:` in the README)",
        );
    }
    // a value shared by several flows (a bad `defaults` setting) is one problem
    let mut seen = std::collections::HashSet::new();
    cx.issues
        .retain(|i| seen.insert((i.path.clone(), i.message.clone())));
    if cx.issues.is_empty() {
        Ok(Config {
            file: file.to_owned(),
            store,
            server,
            systems,
            flows,
            data: Arc::new(data),
            identity,
            alerts,
            otlp,
            topics,
            warnings: cx.warnings,
        })
    } else {
        Err(cx.issues)
    }
}

/// Topics in a cycle (a flow reading one publishes, through flows, back
/// to it) are refused: a message would go round forever. Topics nothing
/// publishes to, or nothing reads, are warned about.
fn topic_graph(cx: &mut Ctx, topics: &BTreeMap<String, Topic>, flows: &[Arc<Flow>]) {
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for f in flows {
        if topics.contains_key(&f.from) {
            for d in &f.destinations {
                if topics.contains_key(&d.system) && d.system != f.from {
                    edges.entry(&f.from).or_default().insert(&d.system);
                }
            }
        }
    }
    // a cycle through `start`: a path from one of its successors back to it
    for start in topics.keys() {
        let mut stack: Vec<(&str, Vec<&str>)> = vec![(start.as_str(), vec![start.as_str()])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for &next in edges.get(at).into_iter().flatten() {
                if next == start {
                    let mut round = path.clone();
                    round.push(start);
                    cx.at(
                        format!("topics.{start}"),
                        format!(
                            "flows publish from this topic back into it ({}): every message would go round forever",
                            round.join(" → ")
                        ),
                    );
                    return;
                }
                if seen.insert(next) {
                    let mut p = path.clone();
                    p.push(next);
                    stack.push((next, p));
                }
            }
        }
    }
    for name in topics.keys() {
        let published = flows
            .iter()
            .any(|f| f.destinations.iter().any(|d| &d.system == name));
        let read = flows.iter().any(|f| &f.from == name);
        if !published {
            cx.warn(
                format!("topics.{name}"),
                "no flow publishes to this topic (name it in a flow's `to`)",
            );
        }
        if !read {
            cx.warn(
                format!("topics.{name}"),
                "no flow reads this topic (name it in a flow's `from`): what is published is only kept until its retention",
            );
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn known(systems: &BTreeMap<String, System>) -> String {
    if systems.is_empty() {
        "none".to_owned()
    } else {
        systems
            .keys()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn source_spec(
    cx: &mut Ctx,
    p: &str,
    system: &str,
    s: RawSource,
    base: &Path,
    webhook_paths: &mut BTreeMap<String, String>,
) -> Option<SourceSpec> {
    match s {
        RawSource::Webhook(cfg) => {
            let wp = format!("{p}.webhook");
            if !cfg.path.starts_with('/') {
                cx.at(
                    format!("{wp}.path"),
                    format!("`{}` must start with `/`", cfg.path),
                );
            }
            if ["/healthz", "/readyz", "/metrics"].contains(&cfg.path.as_str())
                || cfg.path.starts_with("/api/")
            {
                cx.at(
                    format!("{wp}.path"),
                    format!("`{}` is reserved by weft's server", cfg.path),
                );
            }
            if let Some(other) = webhook_paths.insert(cfg.path.clone(), system.to_owned()) {
                cx.at(
                    format!("{wp}.path"),
                    format!("`{}` is already used by system `{other}`", cfg.path),
                );
            }
            if cfg.max_body_bytes == Some(0) {
                cx.at(format!("{wp}.max_body_bytes"), "must be greater than 0");
            }
            let mut id_field = cfg
                .id_field
                .as_ref()
                .and_then(|c| cx.program(&format!("{wp}.id_field"), c, &[]));
            let mut id_header_default = Some("x-event-id");
            let mut signature_tolerance = Duration::from_secs(300);
            if let Some(sig) = &cfg.signature {
                let sp = format!("{wp}.signature");
                let scheme = sig.scheme.value;
                if cfg.secret.is_some() || cfg.signature_header.is_some() {
                    cx.at_span(
                        &sp,
                        &sig.scheme,
                        "`secret`/`signature_header` are a shorthand for `signature`; use one or the other",
                    );
                }
                if sig.secrets.is_empty() {
                    cx.at_span(
                        format!("{sp}.secrets"),
                        &sig.scheme,
                        "at least one secret is required",
                    );
                }
                for (i, secret) in sig.secrets.iter().enumerate() {
                    let text = secret.expose();
                    let bad = if text.is_empty() {
                        Some("is empty")
                    } else if scheme == SignatureScheme::StandardWebhooks {
                        // standard base64, padded; the connector decodes it
                        let b64 = text.strip_prefix("whsec_").unwrap_or(text);
                        let data = b64.trim_end_matches('=');
                        let ok = !data.is_empty()
                            && b64.len() % 4 == 0
                            && b64.len() - data.len() <= 2
                            && data
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
                        (!ok).then_some("must be `whsec_` followed by base64")
                    } else {
                        None
                    };
                    if let Some(why) = bad {
                        // never quote the secret itself
                        cx.at_span(
                            format!("{sp}.secrets[{i}]"),
                            &sig.scheme,
                            format!("the secret {why}"),
                        );
                    }
                }
                if let Some(h) = &sig.header
                    && (h.is_empty()
                        || !h
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)))
                {
                    cx.at(
                        format!("{sp}.header"),
                        format!("`{h}` is not a header name"),
                    );
                }
                if scheme == SignatureScheme::Hmac {
                    if let Some(h) = &sig.timestamp_header
                        && (h.is_empty()
                            || !h
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)))
                    {
                        cx.at(
                            format!("{sp}.timestamp_header"),
                            format!("`{h}` is not a header name"),
                        );
                    }
                    if let Some(t) = &sig.signed_content {
                        let rest = t.value.replace("{body}", "").replace("{timestamp}", "");
                        if !t.value.contains("{body}") {
                            cx.at_span(format!("{sp}.signed_content"), t, "must contain `{body}`");
                        } else if rest.contains(['{', '}']) {
                            cx.at_span(
                                format!("{sp}.signed_content"),
                                t,
                                "only `{body}` and `{timestamp}` can be filled in",
                            );
                        } else if t.value.contains("{timestamp}") && sig.timestamp_header.is_none()
                        {
                            cx.at_span(
                                format!("{sp}.signed_content"),
                                t,
                                "`{timestamp}` needs `timestamp_header`",
                            );
                        }
                    }
                } else {
                    let only_hmac = [
                        ("encoding", sig.encoding.is_some()),
                        ("prefix", sig.prefix.is_some()),
                        ("signed_content", sig.signed_content.is_some()),
                        ("timestamp_header", sig.timestamp_header.is_some()),
                    ];
                    for (k, set) in only_hmac {
                        if set {
                            cx.at_span(
                                format!("{sp}.{k}"),
                                &sig.scheme,
                                format!("`{k}` is for `scheme: hmac` only; this scheme fixes it"),
                            );
                        }
                    }
                }
                signature_tolerance = cx.duration(
                    &format!("{sp}.tolerance"),
                    &sig.tolerance,
                    signature_tolerance,
                );
                if signature_tolerance.is_zero()
                    && let Some(t) = &sig.tolerance
                {
                    cx.at_span(format!("{sp}.tolerance"), t, "must be greater than 0");
                }
                match scheme {
                    SignatureScheme::StandardWebhooks => id_header_default = Some("webhook-id"),
                    SignatureScheme::Github => id_header_default = Some("x-github-delivery"),
                    // a Stripe event's id is in the signed body; an unsigned
                    // header must not replace it (P2-2)
                    SignatureScheme::Stripe => {
                        id_header_default = None;
                        if id_field.is_none() && cfg.id_field.is_none() {
                            id_field = Program::compile(".id", &[]).ok().map(Arc::new);
                        }
                    }
                    SignatureScheme::Hmac => {}
                }
            }
            webhook_warnings(cx, &wp, &cfg);
            Some(SourceSpec::Webhook {
                id_field,
                event_type: cfg
                    .event_type
                    .clone()
                    .unwrap_or_else(|| format!("{system}.webhook")),
                max_body_bytes: cfg.max_body_bytes.unwrap_or(1 << 20),
                signature_header: cfg
                    .signature_header
                    .clone()
                    .unwrap_or_else(|| "x-signature-256".into())
                    .to_ascii_lowercase(),
                id_header: cfg
                    .id_header
                    .as_deref()
                    .or(id_header_default)
                    .map(str::to_ascii_lowercase),
                signature_tolerance,
                cfg,
            })
        }
        RawSource::File(cfg) => {
            let fp = format!("{p}.file");
            let target = match (&cfg.dir, &cfg.path) {
                (Some(d), None) => Some(FileTarget::Dir(base.join(d))),
                (None, Some(f)) => Some(FileTarget::Path(base.join(f))),
                _ => {
                    cx.at(
                        &fp,
                        "exactly one of `dir` (a drop folder) and `path` (one file) is required",
                    );
                    None
                }
            };
            if cfg.batch_size == Some(0) {
                cx.at(format!("{fp}.batch_size"), "must be greater than 0");
            }
            let poll_interval = cx.duration(
                &format!("{fp}.poll_interval"),
                &cfg.poll_interval,
                Duration::from_secs(1),
            );
            if poll_interval.is_zero()
                && let Some(i) = &cfg.poll_interval
            {
                cx.at_span(format!("{fp}.poll_interval"), i, "must be longer than 0s");
            }
            let id_field = cfg
                .id_field
                .as_ref()
                .and_then(|c| cx.program(&format!("{fp}.id_field"), c, &[]));
            let csv_possible = matches!(cfg.format, None | Some(FileFormat::Csv));
            let xml_possible = matches!(cfg.format, None | Some(FileFormat::Xml));
            if let Some(d) = cfg.delimiter {
                if let Err(m) = csv_delimiter(d) {
                    cx.at(format!("{fp}.delimiter"), m);
                }
                if !csv_possible {
                    cx.at(format!("{fp}.delimiter"), "is used only with CSV files");
                }
            }
            let encoding = match &cfg.encoding {
                None => TextEncoding::Utf8,
                Some(e) => match TextEncoding::from_label(&e.value) {
                    Some(enc) => {
                        if enc != TextEncoding::Utf8 && !csv_possible {
                            cx.at_span(
                                format!("{fp}.encoding"),
                                e,
                                format!(
                                    "`{}` applies to CSV files only; JSON and XML files are read as UTF-8",
                                    e.value
                                ),
                            );
                        }
                        enc
                    }
                    None => {
                        cx.at_span(
                            format!("{fp}.encoding"),
                            e,
                            format!(
                                "unknown encoding `{}`: expected `utf-8`, `latin-1` (ISO-8859-1) or `windows-1252`",
                                e.value
                            ),
                        );
                        TextEncoding::Utf8
                    }
                },
            };
            let record_path = match &cfg.record_path {
                None => vec!["*".to_owned(), "*".to_owned()],
                Some(rp) => {
                    if !xml_possible {
                        cx.at_span(
                            format!("{fp}.record_path"),
                            rp,
                            "is used only with XML files (`format: xml` or unset)",
                        );
                    }
                    match xml_record_path(&rp.value) {
                        Ok(segs) => segs,
                        Err(m) => {
                            cx.at_span(format!("{fp}.record_path"), rp, m);
                            Vec::new()
                        }
                    }
                }
            };
            let settle = cx.duration(
                &format!("{fp}.settle"),
                &cfg.settle,
                Duration::from_secs(10),
            );
            let ready_marker = cfg.ready_marker.as_ref().and_then(|m| {
                let v = m.value.trim();
                let bad = if v.is_empty() {
                    Some("must not be empty: a suffix such as `.done`")
                } else if v.contains(['/', '\\']) {
                    Some("is a suffix of the file name (such as `.done`), not a path")
                } else if cfg.settle.is_some() {
                    Some("and `settle` exclude each other: with a marker a file is read once its marker exists")
                } else if cfg.path.is_some() {
                    Some("is used only with `dir` (a drop folder)")
                } else {
                    None
                };
                match bad {
                    Some(why) => {
                        cx.at_span(format!("{fp}.ready_marker"), m, why);
                        None
                    }
                    None => Some(v.to_owned()),
                }
            });
            if let Some(s) = &cfg.settle
                && cfg.path.is_some()
            {
                cx.at_span(
                    format!("{fp}.settle"),
                    s,
                    "is used only with `dir` (a drop folder)",
                );
            }
            Some(SourceSpec::File {
                settle,
                ready_marker,
                target: target?,
                encoding,
                record_path,
                id_field,
                event_type: cfg
                    .event_type
                    .clone()
                    .unwrap_or_else(|| format!("{system}.file")),
                poll_interval,
                batch_size: cfg.batch_size.unwrap_or(1000),
                cfg,
            })
        }
        RawSource::Generate(cfg) => {
            let gp = format!("{p}.generate");
            if matches!(cfg.rate, Some(r) if !(r > 0.0 && r.is_finite())) {
                cx.at(
                    format!("{gp}.rate"),
                    "must be a positive number of records per second",
                );
            }
            if cfg.batch_size == Some(0) {
                cx.at(format!("{gp}.batch_size"), "must be greater than 0");
            }
            let template = cx.program(&format!("{gp}.template"), &cfg.template, &["seq"])?;
            Some(SourceSpec::Generate {
                template,
                event_type: cfg
                    .event_type
                    .clone()
                    .unwrap_or_else(|| format!("{system}.generated")),
                batch_size: cfg.batch_size.unwrap_or(500),
                cfg,
            })
        }
        RawSource::Rest(cfg) => rest_source_spec(cx, &format!("{p}.rest"), system, cfg),
        RawSource::SqlPoll(cfg) => {
            sql_poll_source_spec(cx, &format!("{p}.sql_poll"), system, cfg, base)
        }
        RawSource::PostgresCdc(settings) => Some(SourceSpec::PostgresCdc { settings }),
        RawSource::MysqlCdc(settings) => Some(SourceSpec::MysqlCdc { settings }),
        RawSource::Nats(settings) => Some(SourceSpec::Nats {
            settings: broker_settings(settings, base),
        }),
        RawSource::Amqp(settings) => Some(SourceSpec::Amqp {
            settings: broker_settings(settings, base),
        }),
        RawSource::Redis(settings) => Some(SourceSpec::Redis {
            settings: broker_settings(settings, base),
        }),
        RawSource::Mqtt(settings) => Some(SourceSpec::Mqtt {
            settings: broker_settings(settings, base),
        }),
        RawSource::Kafka(settings) => Some(SourceSpec::Kafka {
            settings: broker_settings(settings, base),
        }),
    }
}

/// What a webhook source accepts that its owner probably does not mean:
/// replays accepted forever, an unsigned id beside a signed one, updates
/// deduplicated by content (P0-5, P2-2).
fn webhook_warnings(cx: &mut Ctx, wp: &str, cfg: &WebhookSourceConfig) {
    let scheme = cfg.signature.as_ref().map(|s| s.scheme.value);
    let shorthand = cfg.signature.is_none() && cfg.secret.is_some();
    let timestamped = match &cfg.signature {
        Some(s) => match s.scheme.value {
            SignatureScheme::StandardWebhooks | SignatureScheme::Stripe => true,
            SignatureScheme::Github => false,
            SignatureScheme::Hmac => s.timestamp_header.is_some(),
        },
        None => false,
    };
    if (cfg.signature.is_some() || shorthand) && !timestamped {
        let (at, how) = match scheme {
            Some(SignatureScheme::Github) => (
                format!("{wp}.signature.scheme"),
                "GitHub signs the body only: `x-github-delivery` is not signed",
            ),
            Some(_) => (
                format!("{wp}.signature"),
                "sign a timestamp (`timestamp_header`, `{timestamp}` in `signed_content`) so that `tolerance` bounds replays",
            ),
            None => (
                format!("{wp}.secret"),
                "use `signature: {scheme: hmac, timestamp_header: ...}` with a signed timestamp so that `tolerance` bounds replays",
            ),
        };
        cx.warn(
            at,
            format!(
                "the signature has no timestamp: a captured request can be replayed at any time, and with a new event id it is accepted as a new event; {how}"
            ),
        );
    }
    let signs_id = matches!(
        scheme,
        Some(SignatureScheme::Stripe | SignatureScheme::StandardWebhooks)
    );
    if signs_id
        && let Some(h) = &cfg.id_header
        && !(scheme == Some(SignatureScheme::StandardWebhooks)
            && h.eq_ignore_ascii_case("webhook-id"))
    {
        cx.warn(
            format!("{wp}.id_header"),
            format!(
                "`{h}` is not signed: a captured request replayed within the tolerance with a fresh `{h}` is accepted as a new event; without `id_header` the scheme's signed id is used"
            ),
        );
    }
    let stable_id = cfg.id_header.is_some()
        || cfg.id_field.is_some()
        || matches!(
            scheme,
            Some(
                SignatureScheme::Stripe
                    | SignatureScheme::StandardWebhooks
                    | SignatureScheme::Github
            )
        );
    if !stable_id {
        cx.warn(
            wp,
            "no `id_field` or `id_header`: unless the sender sends `x-event-id`, an event's id is the SHA-256 of the body, so a record that changes A → B → A within `store.dedupe_retention` has its second A taken as a duplicate and dropped; set `id_field` (e.g. `.id + \"@\" + .updated_at`) or `id_header`",
        );
    }
}

fn sink_spec(cx: &mut Ctx, p: &str, system: &str, s: RawSink, base: &Path) -> Option<SinkSpec> {
    match s {
        RawSink::Http(cfg) => {
            let hp = format!("{p}.http");
            if !(cfg.url.starts_with("http://") || cfg.url.starts_with("https://")) {
                cx.at(
                    format!("{hp}.url"),
                    format!("`{}` must start with http:// or https://", cfg.url),
                );
            }
            let upsert = matches!(
                cfg.mode,
                Some(HttpSinkMode::UpsertLookup | HttpSinkMode::ById)
            );
            let method = cfg
                .method
                .clone()
                .unwrap_or_else(|| if upsert { "PUT" } else { "POST" }.into())
                .to_ascii_uppercase();
            if !["POST", "PUT", "PATCH"].contains(&method.as_str()) {
                cx.at(
                    format!("{hp}.method"),
                    format!("`{method}`: expected POST, PUT or PATCH"),
                );
            }
            if let Some(m) = &cfg.method_create
                && !["POST", "PUT", "PATCH"].contains(&m.to_ascii_uppercase().as_str())
            {
                cx.at(
                    format!("{hp}.method_create"),
                    format!("`{m}`: expected POST, PUT or PATCH"),
                );
            }
            let urls = [
                ("lookup_url", &cfg.lookup_url),
                ("update_url", &cfg.update_url),
            ];
            for (k, u) in urls {
                if let Some(u) = u
                    && !(u.starts_with("http://") || u.starts_with("https://"))
                {
                    cx.at(
                        format!("{hp}.{k}"),
                        format!("`{u}` must start with http:// or https://"),
                    );
                }
            }
            let by_id = cfg.mode == Some(HttpSinkMode::ById);
            if by_id && cfg.update_url.is_none() {
                cx.at(
                    format!("{hp}.update_url"),
                    "`mode: by_id` needs `update_url`, the URL of an update with `{_id}` (e.g. `https://erp.example.com/customers/{_id}`)",
                );
            }
            if by_id && cfg.lookup_url.is_some() {
                cx.at(
                    format!("{hp}.lookup_url"),
                    "`lookup_url` is used only with `mode: upsert_lookup`",
                );
            }
            if upsert && !by_id && cfg.lookup_url.is_none() {
                cx.at(
                    format!("{hp}.lookup_url"),
                    "`mode: upsert_lookup` needs `lookup_url` (the GET that finds the record)",
                );
            }
            if !upsert {
                let only_upsert = [
                    ("lookup_url", cfg.lookup_url.is_some()),
                    ("update_url", cfg.update_url.is_some()),
                    ("method_create", cfg.method_create.is_some()),
                ];
                for (k, set) in only_upsert {
                    if set {
                        cx.at(
                            format!("{hp}.{k}"),
                            format!("`{k}` is used only with `mode: upsert_lookup` or `by_id`"),
                        );
                    }
                }
            }
            for (k, list) in [
                ("retry_on", &cfg.retry_on),
                ("permanent_on", &cfg.permanent_on),
            ] {
                for (i, code) in list.iter().enumerate() {
                    if !(300..=599).contains(code) {
                        cx.at(
                            format!("{hp}.{k}[{i}]"),
                            format!(
                                "`{code}`: expected a non-2xx status from 300 to 599 \
                                 (a 2xx is a success; use `success_when` to check its body)"
                            ),
                        );
                    }
                }
            }
            for code in &cfg.retry_on {
                if cfg.permanent_on.contains(code) {
                    cx.at(
                        format!("{hp}.permanent_on"),
                        format!("`{code}` is also in `retry_on`"),
                    );
                }
            }
            if let Some(c) = &cfg.success_when {
                cx.program(&format!("{hp}.success_when"), c, &[]);
            } else if cfg.success_when_failure.is_some() {
                cx.at(
                    format!("{hp}.success_when_failure"),
                    "is used only with `success_when`",
                );
            }
            if let Some(c) = &cfg.capture_id {
                cx.program(&format!("{hp}.capture_id"), c, &[]);
            }
            // a configured Content-Type is sent as it is; one that says
            // "CloudEvent" must come with a body that is one
            if let Some(ct) = cfg
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.expose().trim().to_ascii_lowercase())
            {
                let ce_json = ct.starts_with("application/cloudevents+json");
                let batch = ct.starts_with("application/cloudevents-batch");
                match cfg.cloudevents {
                    None if ce_json || batch => cx.at(
                        format!("{hp}.headers"),
                        format!(
                            "Content-Type `{ct}` says the body is a CloudEvent, but the body is the bare payload: \
                             set `cloudevents: structured` (weft then sends that Content-Type itself) or remove the header"
                        ),
                    ),
                    Some(CloudEventsMode::Structured) if !ce_json => cx.at(
                        format!("{hp}.headers"),
                        format!(
                            "`cloudevents: structured` sends `application/cloudevents+json`; a configured Content-Type `{ct}` \
                             would contradict it: remove the header (or use `cloudevents: binary`, whose Content-Type is the payload's)"
                        ),
                    ),
                    Some(CloudEventsMode::Binary) if ce_json || batch => cx.at(
                        format!("{hp}.headers"),
                        format!(
                            "`cloudevents: binary` sends the payload as the body, so its Content-Type cannot be `{ct}`: \
                             use `cloudevents: structured`"
                        ),
                    ),
                    _ => {}
                }
            }
            if cfg.cloudevents.is_some()
                && let Some(k) = cfg
                    .headers
                    .keys()
                    .find(|k| k.to_ascii_lowercase().starts_with("ce-"))
            {
                cx.at(
                    format!("{hp}.headers.{k}"),
                    "with `cloudevents` weft sets the CloudEvents attributes itself; remove this header",
                );
            }
            let timeout = cx.duration(
                &format!("{hp}.timeout"),
                &cfg.timeout,
                Duration::from_secs(10),
            );
            let connect_timeout = cx.duration(
                &format!("{hp}.connect_timeout"),
                &cfg.connect_timeout,
                Duration::from_secs(5),
            );
            Some(SinkSpec::Http {
                cfg,
                method,
                timeout,
                connect_timeout,
            })
        }
        RawSink::Sqlite(cfg) => {
            let sp = format!("{p}.sqlite");
            check_ident(cx, &format!("{sp}.table"), &cfg.table);
            if cfg.key.is_empty() {
                cx.at(
                    format!("{sp}.key"),
                    "at least one key column is required for the upsert",
                );
            }
            for (i, k) in cfg.key.iter().enumerate() {
                check_ident(cx, &format!("{sp}.key[{i}]"), k);
            }
            if let Some(cols) = &cfg.columns {
                for (c, t) in cols {
                    check_ident(cx, &format!("{sp}.columns.{c}"), c);
                    if !["text", "integer", "real", "boolean", "json"].contains(&t.as_str()) {
                        cx.at(
                            format!("{sp}.columns.{c}"),
                            format!("type `{t}`: expected text, integer, real, boolean or json"),
                        );
                    }
                }
                for k in &cfg.key {
                    if !cols.contains_key(k) {
                        cx.at(
                            format!("{sp}.key"),
                            format!("key column `{k}` is not among `columns`"),
                        );
                    }
                }
                if let Some(v) = &cfg.version_column
                    && !cols.contains_key(v)
                {
                    cx.at(
                        format!("{sp}.version_column"),
                        format!("version column `{v}` is not among `columns`"),
                    );
                }
            }
            if let Some(v) = &cfg.version_column {
                check_ident(cx, &format!("{sp}.version_column"), v);
                if cfg.key.contains(v) {
                    cx.at(
                        format!("{sp}.version_column"),
                        format!("`{v}` is a key column; the version must be another column"),
                    );
                }
            }
            Some(SinkSpec::Sqlite {
                path: base.join(&cfg.path),
                cfg,
            })
        }
        RawSink::Postgres(cfg) => {
            let pp = format!("{p}.postgres");
            for part in cfg.table.split('.') {
                check_ident(cx, &format!("{pp}.table"), part);
            }
            if cfg.key.is_empty() {
                cx.at(
                    format!("{pp}.key"),
                    "at least one key column is required for the upsert",
                );
            }
            if cfg.columns.is_empty() {
                cx.at(format!("{pp}.columns"), "at least one column is required");
            }
            for (c, t) in &cfg.columns {
                check_ident(cx, &format!("{pp}.columns.{c}"), c);
                if !t
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || " _()[],".contains(ch))
                {
                    cx.at(
                        format!("{pp}.columns.{c}"),
                        format!("`{t}` is not a PostgreSQL type name"),
                    );
                }
            }
            for k in &cfg.key {
                if !cfg.columns.contains_key(k) {
                    cx.at(
                        format!("{pp}.key"),
                        format!("key column `{k}` is not among `columns`"),
                    );
                }
            }
            if let Some(v) = &cfg.version_column {
                if !cfg.columns.contains_key(v) {
                    cx.at(
                        format!("{pp}.version_column"),
                        format!("version column `{v}` is not among `columns`"),
                    );
                } else if cfg.key.contains(v) {
                    cx.at(
                        format!("{pp}.version_column"),
                        format!("`{v}` is a key column; the version must be another column"),
                    );
                }
            }
            Some(SinkSpec::Postgres { cfg })
        }
        RawSink::Jsonl(cfg) => {
            let jp = format!("{p}.jsonl");
            let target = export_target(
                cx,
                &jp,
                system,
                base,
                ExportPlace {
                    path: &cfg.path,
                    dir: &cfg.dir,
                    prefix: &cfg.prefix,
                    rotate: &cfg.rotate,
                },
            );
            Some(SinkSpec::Jsonl {
                target: target?,
                cfg,
            })
        }
        RawSink::Csv(cfg) => csv_sink_spec(cx, &format!("{p}.csv"), system, cfg, base),
        RawSink::Mysql(cfg) => mysql_sink_spec(cx, &format!("{p}.mysql"), cfg),
        RawSink::Nats(settings) => Some(SinkSpec::Nats {
            settings: broker_settings(settings, base),
        }),
        RawSink::Amqp(settings) => Some(SinkSpec::Amqp {
            settings: broker_settings(settings, base),
        }),
        RawSink::Redis(settings) => Some(SinkSpec::Redis {
            settings: broker_settings(settings, base),
        }),
        RawSink::Mqtt(settings) => Some(SinkSpec::Mqtt {
            settings: broker_settings(settings, base),
        }),
        RawSink::Kafka(settings) => Some(SinkSpec::Kafka {
            settings: broker_settings(settings, base),
        }),
    }
}

/// A broker's settings with the file they name made absolute: `format:
/// {protobuf: {schema: FILE}}` is relative to the config file's folder
/// like every other path of the config, and only the loader knows that
/// folder (the connector reads the file when it checks its settings).
fn broker_settings(mut settings: ConnectorSettings, base: &Path) -> ConnectorSettings {
    if let Some(schema) = settings.0.pointer_mut("/format/protobuf/schema")
        && let Some(path) = schema.as_str()
        && Path::new(path).is_relative()
    {
        *schema = serde_json::Value::String(base.join(path).to_string_lossy().into_owned());
    }
    settings
}

/// Where an export sink writes, as configured.
struct ExportPlace<'a> {
    path: &'a Option<String>,
    dir: &'a Option<String>,
    prefix: &'a Option<String>,
    rotate: &'a Option<RawRotate>,
}

fn export_target(
    cx: &mut Ctx,
    p: &str,
    system: &str,
    base: &Path,
    place: ExportPlace<'_>,
) -> Option<ExportTarget> {
    match (place.path, place.dir) {
        (Some(path), None) => {
            for (k, set) in [
                ("prefix", place.prefix.is_some()),
                ("rotate", place.rotate.is_some()),
            ] {
                if set {
                    cx.at(
                        format!("{p}.{k}"),
                        format!("`{k}` is used only with `dir` (rotating files), not with `path`"),
                    );
                }
            }
            if path.trim().is_empty() {
                cx.at(format!("{p}.path"), "must not be empty");
                return None;
            }
            Some(ExportTarget::File(base.join(path)))
        }
        (None, Some(dir)) => {
            let prefix = place.prefix.clone().unwrap_or_else(|| system.to_owned());
            let prefix_ok = !prefix.is_empty()
                && !prefix.starts_with('.')
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !prefix_ok {
                cx.at(
                    format!("{p}.prefix"),
                    format!(
                        "`{prefix}`: expected a file name start of letters, digits, `-`, `_` \
                         and `.` (not first)"
                    ),
                );
            }
            let r = place.rotate.clone().unwrap_or_default();
            let rp = format!("{p}.rotate");
            if r.max_bytes == Some(0) {
                cx.at(
                    format!("{rp}.max_bytes"),
                    "must be greater than 0 (a size in bytes, e.g. 10485760 for 10 MiB)",
                );
            }
            let max_age = cx.duration(
                &format!("{rp}.max_age"),
                &r.max_age,
                Duration::from_secs(3600),
            );
            let idle = cx.duration(&format!("{rp}.idle"), &r.idle, Duration::from_secs(60));
            for (k, d, v) in [("max_age", max_age, &r.max_age), ("idle", idle, &r.idle)] {
                if d.is_zero()
                    && let Some(v) = v
                {
                    cx.at_span(format!("{rp}.{k}"), v, "must be longer than 0s");
                }
            }
            Some(ExportTarget::Dir {
                dir: base.join(dir),
                prefix,
                rotate: RotatePolicy {
                    max_bytes: r.max_bytes.unwrap_or(64 << 20),
                    max_age,
                    idle,
                },
            })
        }
        _ => {
            cx.at(
                p,
                "exactly one of `path` (one file, appended to) and `dir` (rotating files) is required",
            );
            None
        }
    }
}

fn csv_sink_spec(
    cx: &mut Ctx,
    cp: &str,
    system: &str,
    cfg: CsvSinkConfig,
    base: &Path,
) -> Option<SinkSpec> {
    let target = export_target(
        cx,
        cp,
        system,
        base,
        ExportPlace {
            path: &cfg.path,
            dir: &cfg.dir,
            prefix: &cfg.prefix,
            rotate: &cfg.rotate,
        },
    );
    let delimiter = match &cfg.delimiter {
        None => b',',
        Some(d) => match csv_delimiter(d.value) {
            Ok(b) => b,
            Err(m) => {
                cx.at_span(format!("{cp}.delimiter"), d, m);
                b','
            }
        },
    };
    let columns = cfg.columns.as_ref().map(|cols| {
        if cols.is_empty() {
            cx.at(
                format!("{cp}.columns"),
                "must name at least one column (or leave it out to take the first record's keys)",
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in cols.iter().enumerate() {
            if c.value.trim().is_empty() {
                cx.at_span(
                    format!("{cp}.columns[{i}]"),
                    c,
                    "a column name must not be empty",
                );
            } else if !seen.insert(c.value.as_str()) {
                cx.at_span(
                    format!("{cp}.columns[{i}]"),
                    c,
                    format!("column `{}` appears twice", c.value),
                );
            }
        }
        cols.iter().map(|c| c.value.clone()).collect::<Vec<_>>()
    });
    if cfg.header == Some(false) && columns.is_none() {
        cx.at(
            format!("{cp}.header"),
            "`header: false` needs `columns` (without a header row the columns must be fixed)",
        );
    }
    Some(SinkSpec::Csv {
        target: target?,
        columns,
        delimiter,
        header: cfg.header.unwrap_or(true),
        cfg,
    })
}

/// A CSV delimiter: one ASCII character that is not a quote or a line break.
fn csv_delimiter(c: char) -> Result<u8, String> {
    if !c.is_ascii() {
        return Err(format!(
            "`{c}`: expected a single ASCII character such as `,`, `;`, `|` or a tab"
        ));
    }
    if matches!(c, '"' | '\n' | '\r') {
        return Err(format!(
            "{c:?} cannot be a delimiter (it is a quote or a line break)"
        ));
    }
    Ok(c as u8)
}

/// An XML record path: `/a/b/c`, names or `*`.
fn xml_record_path(s: &str) -> Result<Vec<String>, String> {
    let expected = "expected a path of element names from the root such as `/orders/order` \
                    (`*` matches any name)";
    let Some(rest) = s.trim().strip_prefix('/') else {
        return Err(format!("`{s}` must start with `/`; {expected}"));
    };
    let segs: Vec<String> = rest.split('/').map(str::to_owned).collect();
    for seg in &segs {
        let name_ok = seg == "*"
            || (!seg.is_empty()
                && !seg.starts_with(|c: char| c.is_ascii_digit() || "-.".contains(c))
                && seg
                    .chars()
                    .all(|c| c.is_alphanumeric() || "-_.:".contains(c)));
        if !name_ok {
            return Err(format!("`{s}`: `{seg}` is not an element name; {expected}"));
        }
    }
    Ok(segs)
}

fn check_ident(cx: &mut Ctx, path: &str, s: &str) {
    let ok = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        cx.at(
            path,
            format!("`{s}` is not a plain SQL identifier (letters, digits, `_`)"),
        );
    }
}

/// The policy of one destination from its layers (the destination's own
/// `delivery`, the flow's, `defaults`), each with its document path: a bad
/// value is reported where it is written.
fn delivery_policy(
    cx: &mut Ctx,
    layers: [(Option<&RawDelivery>, String); 3],
    sink_kind: Option<&str>,
) -> DeliveryPolicy {
    // the value of the first layer setting it, with that setting's path
    fn pick<T: Clone>(
        layers: &[(Option<&RawDelivery>, String); 3],
        key: &str,
        f: impl Fn(&RawDelivery) -> Option<T>,
    ) -> (Option<T>, String) {
        layers
            .iter()
            .find_map(|(l, p)| l.and_then(&f).map(|v| (Some(v), format!("{p}.{key}"))))
            .unwrap_or_else(|| (None, format!("{}.{key}", layers[0].1)))
    }
    let http = sink_kind == Some("http");
    let (max_attempts, p) = pick(&layers, "max_attempts", |l| l.max_attempts);
    let max_attempts = max_attempts.unwrap_or(8);
    if max_attempts == 0 {
        cx.at(p, "must be at least 1");
    }
    let (v, p) = pick(&layers, "initial_backoff", |l| l.initial_backoff.clone());
    let initial_backoff = cx.duration(&p, &v, Duration::from_millis(200));
    let (v, p) = pick(&layers, "max_backoff", |l| l.max_backoff.clone());
    let max_backoff = cx.duration(&p, &v, Duration::from_secs(60));
    let (multiplier, p) = pick(&layers, "multiplier", |l| l.multiplier);
    let multiplier = multiplier.unwrap_or(2.0);
    if !(multiplier >= 1.0 && multiplier.is_finite()) {
        cx.at(p, "must be a number >= 1");
    }
    let (concurrency, p) = pick(&layers, "concurrency", |l| l.concurrency);
    let concurrency = concurrency.unwrap_or(if http { 8 } else { 1 });
    if concurrency == 0 {
        cx.at(p, "must be at least 1");
    }
    let (batch_size, p) = pick(&layers, "batch_size", |l| l.batch_size);
    let batch_size = if http { 1 } else { batch_size.unwrap_or(500) };
    if batch_size == 0 {
        cx.at(p, "must be at least 1");
    }
    let (backlog_high_water, p) = pick(&layers, "backlog_high_water", |l| l.backlog_high_water);
    let backlog_high_water = backlog_high_water.unwrap_or(500_000);
    if backlog_high_water == 0 {
        cx.at(p, "must be at least 1");
    }
    DeliveryPolicy {
        max_attempts,
        initial_backoff,
        max_backoff,
        multiplier,
        concurrency,
        batch_size,
        on_dead_letter: pick(&layers, "on_dead_letter", |l| l.on_dead_letter)
            .0
            .unwrap_or(OnDeadLetter::Continue),
        backlog_high_water,
    }
}

fn breaker_policy(cx: &mut Ctx, p: &str, b: RawBreaker) -> Option<BreakerPolicy> {
    if b.enabled == Some(false) {
        return None;
    }
    let failure_rate = b.failure_rate.unwrap_or(0.5);
    if !(failure_rate > 0.0 && failure_rate <= 1.0) {
        cx.at(
            format!("{p}.failure_rate"),
            "must be a share in (0, 1], e.g. 0.5",
        );
    }
    let consecutive_failures = b.consecutive_failures.unwrap_or(5);
    if consecutive_failures == 0 {
        cx.at(format!("{p}.consecutive_failures"), "must be at least 1");
    }
    let half_open_probes = b.half_open_probes.unwrap_or(1);
    if half_open_probes == 0 {
        cx.at(format!("{p}.half_open_probes"), "must be at least 1");
    }
    Some(BreakerPolicy {
        consecutive_failures,
        failure_rate,
        min_requests: b.min_requests.unwrap_or(20).max(1),
        window: cx.duration(&format!("{p}.window"), &b.window, Duration::from_secs(60)),
        cooldown: cx.duration(
            &format!("{p}.cooldown"),
            &b.cooldown,
            Duration::from_secs(30),
        ),
        half_open_probes,
    })
}

fn rate_limit_policy(cx: &mut Ctx, p: &str, r: RawRateLimit) -> Option<RateLimitPolicy> {
    let (per, n, unit) = match (r.per_second, r.per_minute) {
        (Some(n), None) => (Duration::from_secs(1), n, "s"),
        (None, Some(n)) => (Duration::from_secs(60), n, "min"),
        _ => {
            cx.at(
                p,
                "exactly one of `per_second` and `per_minute` is required",
            );
            return None;
        }
    };
    if n == 0 {
        cx.at(p, "the rate must be at least 1");
        return None;
    }
    let burst = r.burst.unwrap_or(if unit == "s" { n } else { 1 }).max(1);
    Some(RateLimitPolicy {
        period: per / n,
        burst,
        label: format!("{n}/{unit}"),
    })
}

fn rest_source_spec(
    cx: &mut Ctx,
    rp: &str,
    system: &str,
    cfg: Box<RestSourceConfig>,
) -> Option<SourceSpec> {
    let n = cx.issues.len();
    check_http_url(cx, &format!("{rp}.url"), &cfg.url);
    let method = cfg
        .method
        .as_ref()
        .map(|m| m.value.to_ascii_uppercase())
        .unwrap_or_else(|| "GET".into());
    if let Some(m) = &cfg.method
        && !["GET", "POST"].contains(&method.as_str())
    {
        cx.at_span(
            format!("{rp}.method"),
            m,
            format!("`{}`: expected GET or POST", m.value),
        );
    }
    if cfg.body.is_some() && method != "POST" {
        cx.at(
            format!("{rp}.body"),
            "a body is sent only with `method: POST`",
        );
    }
    let records = match &cfg.records {
        Some(c) => cx.program(&format!("{rp}.records"), c, &[]),
        None => Program::compile(".", &[]).ok().map(Arc::new),
    };
    let id_field = cfg
        .id_field
        .as_ref()
        .and_then(|c| cx.program(&format!("{rp}.id_field"), c, &[]));
    let interval = match (&cfg.interval, &cfg.cron) {
        (Some(i), Some(_)) => {
            cx.at_span(
                format!("{rp}.interval"),
                i,
                "set either `interval` or `cron`, not both",
            );
            None
        }
        (_, Some(c)) => {
            check_cron(cx, &format!("{rp}.cron"), c);
            None
        }
        (i, None) => {
            let d = cx.duration(&format!("{rp}.interval"), i, Duration::from_secs(60));
            if d.is_zero()
                && let Some(i) = i
            {
                cx.at_span(format!("{rp}.interval"), i, "must be longer than 0s");
            }
            Some(d)
        }
    };
    let timeout = cx.duration(
        &format!("{rp}.timeout"),
        &cfg.timeout,
        Duration::from_secs(30),
    );
    let max_backoff = cx.duration(
        &format!("{rp}.max_backoff"),
        &cfg.max_backoff,
        Duration::from_secs(60),
    );
    let pp = format!("{rp}.pagination");
    let (next_page, max_pages) = match &cfg.pagination {
        None => (None, None),
        Some(RestPagination::Page(pg)) => {
            check_param(cx, &format!("{pp}.page.param"), pg.param.as_deref());
            check_param(
                cx,
                &format!("{pp}.page.size_param"),
                pg.size_param.as_deref(),
            );
            if pg.size == Some(0) {
                cx.at(format!("{pp}.page.size"), "must be greater than 0");
            }
            (None, pg.max_pages.map(|m| (m, "page")))
        }
        Some(RestPagination::Offset(o)) => {
            check_param(
                cx,
                &format!("{pp}.offset.offset_param"),
                o.offset_param.as_deref(),
            );
            check_param(
                cx,
                &format!("{pp}.offset.limit_param"),
                o.limit_param.as_deref(),
            );
            if o.limit == Some(0) {
                cx.at(format!("{pp}.offset.limit"), "must be greater than 0");
            }
            (None, o.max_pages.map(|m| (m, "offset")))
        }
        Some(RestPagination::Cursor(c)) => {
            check_param(cx, &format!("{pp}.cursor.param"), c.param.as_deref());
            (
                cx.program(&format!("{pp}.cursor.cursor_path"), &c.cursor_path, &[]),
                c.max_pages.map(|m| (m, "cursor")),
            )
        }
        Some(RestPagination::LinkHeader(l)) => (None, l.max_pages.map(|m| (m, "link_header"))),
        Some(RestPagination::NextUrl(u)) => (
            cx.program(&format!("{pp}.next_url.path"), &u.path, &[]),
            u.max_pages.map(|m| (m, "next_url")),
        ),
    };
    if let Some((0, style)) = max_pages {
        cx.at(format!("{pp}.{style}.max_pages"), "must be at least 1");
    }
    let cursor_field = match &cfg.incremental {
        None => {
            if cfg.full_resync_on_start {
                cx.at(
                    format!("{rp}.full_resync_on_start"),
                    "applies only with `incremental` (without it every poll is a full sync)",
                );
            }
            None
        }
        Some(inc) => {
            let ip = format!("{rp}.incremental");
            check_param(cx, &format!("{ip}.param"), Some(&inc.param));
            cx.program(&format!("{ip}.cursor_field"), &inc.cursor_field, &[])
        }
    };
    if let Some(auth) = &cfg.auth {
        let ap = format!("{rp}.auth");
        match auth {
            RestAuth::ApiKey(k) => match (&k.header, &k.query) {
                (Some(h), None) => check_param(cx, &format!("{ap}.api_key.header"), Some(h)),
                (None, Some(q)) => check_param(cx, &format!("{ap}.api_key.query"), Some(q)),
                _ => cx.at(
                    format!("{ap}.api_key"),
                    "exactly one of `header` and `query` is required",
                ),
            },
            RestAuth::Bearer(t) if t.expose().is_empty() => {
                cx.at(format!("{ap}.bearer"), "the token is empty")
            }
            RestAuth::Bearer(_) | RestAuth::Basic(_) => {}
            RestAuth::Oauth2ClientCredentials(o) => check_http_url(
                cx,
                &format!("{ap}.oauth2_client_credentials.token_url"),
                &o.token_url,
            ),
        }
    }
    if let Some(rl) = &cfg.rate_limit {
        let lp = format!("{rp}.rate_limit");
        match (rl.per_second, rl.per_minute) {
            (Some(n), None) | (None, Some(n)) if n > 0 => {}
            (Some(_), None) | (None, Some(_)) => cx.at(&lp, "the rate must be at least 1 request"),
            _ => cx.at(
                &lp,
                "exactly one of `per_second` and `per_minute` is required",
            ),
        }
        if rl.burst == Some(0) {
            cx.at(format!("{lp}.burst"), "must be at least 1");
        }
    }
    rest_warnings(cx, rp, &cfg);
    if cx.issues.len() > n {
        return None;
    }
    Some(SourceSpec::Rest {
        method,
        records: records?,
        id_field,
        event_type: cfg
            .event_type
            .clone()
            .unwrap_or_else(|| format!("{system}.rest")),
        interval,
        cron: cfg.cron.as_ref().map(|c| c.value.trim().to_owned()),
        timeout,
        max_backoff,
        next_page,
        max_pages: max_pages.map_or(1000, |m| m.0),
        cursor_field,
        cfg,
    })
}

/// `telemetry.otlp`: the URL, the headers, the ratio checked.
fn otlp_config(cx: &mut Ctx, o: super::raw::RawOtlp) -> OtlpConfig {
    const P: &str = "telemetry.otlp";
    check_http_url(cx, &format!("{P}.endpoint"), &o.endpoint);
    let headers = checked_headers(cx, &format!("{P}.headers"), o.headers);
    let service_name = o.service_name.unwrap_or_else(|| "weft".to_owned());
    if service_name.trim().is_empty() {
        cx.at(format!("{P}.service_name"), "must not be empty");
    }
    let sample_ratio = match o.sample_ratio {
        None => 1.0,
        Some(r) if (0.0..=1.0).contains(&r.value) => r.value,
        Some(r) => {
            cx.at_span(
                format!("{P}.sample_ratio"),
                &r,
                format!("{}: expected a share from 0 to 1 (e.g. `0.1`)", r.value),
            );
            1.0
        }
    };
    OtlpConfig {
        traces_url: format!(
            "{}/v1/traces",
            o.endpoint.value.trim().trim_end_matches('/')
        ),
        headers,
        service_name,
        sample_ratio,
    }
}

/// `alerts` (top-level or a flow's): the URL and header names checked.
fn alert_target(cx: &mut Ctx, path: &str, a: RawAlerts) -> AlertTarget {
    check_http_url(cx, &format!("{path}.webhook"), &a.webhook);
    let headers = checked_headers(cx, &format!("{path}.headers"), a.headers);
    AlertTarget {
        url: a.webhook.value.trim().to_owned(),
        headers,
    }
}

/// Extra HTTP headers: valid names, values without line breaks.
fn checked_headers(
    cx: &mut Ctx,
    path: &str,
    given: BTreeMap<String, Secret>,
) -> Vec<(String, Secret)> {
    let mut headers = Vec::new();
    for (name, value) in given {
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            cx.at(format!("{path}.{name}"), "not a valid HTTP header name");
        } else if value.expose().contains(['\r', '\n']) {
            cx.at(
                format!("{path}.{name}"),
                "a header value must not contain a line break",
            );
        }
        headers.push((name, value));
    }
    headers
}

fn check_http_url(cx: &mut Ctx, path: &str, url: &Spanned<String>) {
    let u = url.value.trim();
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !u.contains(char::is_whitespace) => {}
        _ => cx.at_span(
            path,
            url,
            format!(
                "`{}` is not an http:// or https:// URL with a host",
                url.value
            ),
        ),
    }
}

/// What a REST source's config leaves to chance: ids that drop real
/// updates (P0-5), and the `since` parameter's semantics (P1-19).
fn rest_warnings(cx: &mut Ctx, rp: &str, cfg: &RestSourceConfig) {
    match (&cfg.id_field, &cfg.incremental) {
        (None, None) => cx.warn_span(
            format!("{rp}.id_field"),
            &cfg.url,
            "no `id_field`: a record's id is the hash of its content, so a record that changes back \
             to an earlier version (A → B → A) within `store.dedupe_retention` is dropped as a \
             duplicate; set `id_field` to an id with a version, e.g. `\"\\(.id)@\\(.version)\"`",
        ),
        (Some(id), Some(inc)) => {
            // a plain path such as `.updated_at` or `.meta.updated`: its text
            // should appear in `id_field`
            let cursor = inc.cursor_field.value.trim();
            let plain = cursor.starts_with('.')
                && cursor.len() > 1
                && cursor[1..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
            if plain && !id.value.contains(cursor) {
                cx.warn_span(
                    format!("{rp}.id_field"),
                    id,
                    format!(
                        "`id_field` does not include the cursor `{cursor}`: every update of a record \
                         gets the same id and is dropped as a duplicate; include it, e.g. \
                         `\"\\(.id)@\\({cursor})\"`"
                    ),
                );
            }
        }
        // the content hash includes the cursor field
        (None, Some(_)) | (Some(_), None) => {}
    }
    if let Some(inc) = &cfg.incremental
        && inc.since_inclusive.is_none()
    {
        cx.warn_span(
            format!("{rp}.incremental"),
            &inc.cursor_field,
            format!(
                "`{}` is taken as inclusive (`>=`: records at the saved cursor are fetched again and \
                 deduplicated); if the API's parameter is exclusive (`>`), set `since_inclusive: false` \
                 or records that tie with the saved cursor are lost (say `since_inclusive: true` to \
                 silence this note)",
                inc.param
            ),
        );
    }
}

fn check_param(cx: &mut Ctx, path: &str, name: Option<&str>) {
    if let Some(n) = name
        && (n.trim().is_empty() || n.contains(char::is_whitespace))
    {
        cx.at(path, format!("`{n}` is not a parameter name"));
    }
}

/// A light check of a cron expression's shape (5 fields, or 6 with seconds,
/// or an `@alias`); the connector parses it fully when it starts.
fn check_cron(cx: &mut Ctx, path: &str, c: &Spanned<String>) {
    let v = c.value.trim();
    let aliases = [
        "@yearly",
        "@annually",
        "@monthly",
        "@weekly",
        "@daily",
        "@midnight",
        "@hourly",
    ];
    let fields = v.split_whitespace().count();
    let chars_ok = v
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || " \t*/,-?#LW".contains(ch));
    if !(aliases.contains(&v) || ((5..=7).contains(&fields) && chars_ok)) {
        cx.at_span(
            path,
            c,
            format!(
                "`{}` is not a cron expression; expected 5 fields (`*/5 * * * *`), 6 with seconds first, or an alias such as `@hourly`",
                c.value
            ),
        );
    }
}

/// The database kinds a SQL URL may name, by its scheme: `postgresql://`
/// (or `postgres://`), `mysql://`, or `sqlite:<path>`.
fn sql_url_kind(url: &str) -> Option<&'static str> {
    let u = url.trim();
    if u.starts_with("postgresql://") || u.starts_with("postgres://") {
        Some("postgres")
    } else if u.starts_with("mysql://") {
        Some("mysql")
    } else if u.starts_with("sqlite:") {
        Some("sqlite")
    } else {
        None
    }
}

fn sql_poll_source_spec(
    cx: &mut Ctx,
    sp: &str,
    system: &str,
    cfg: Box<SqlPollSourceConfig>,
    base: &Path,
) -> Option<SourceSpec> {
    let n = cx.issues.len();
    let url = cfg.url.expose().trim();
    let mut sqlite_path = None;
    match sql_url_kind(url) {
        // never quote the URL: it may hold a password
        None => cx.at(
            format!("{sp}.url"),
            "expected a `postgresql://`, `mysql://` or `sqlite:<path>` URL",
        ),
        Some("sqlite") => {
            let path = url
                .trim_start_matches("sqlite:")
                .trim_start_matches("//")
                .trim();
            if path.is_empty() {
                cx.at(
                    format!("{sp}.url"),
                    "`sqlite:` needs a file path, e.g. `sqlite:data/legacy.db`",
                );
            } else {
                sqlite_path = Some(base.join(path));
            }
        }
        Some(_) => {}
    }
    let name = match (&cfg.table, &cfg.query) {
        (Some(t), None) => {
            for part in t.split('.') {
                check_ident(cx, &format!("{sp}.table"), part);
            }
            cfg.name
                .clone()
                .unwrap_or_else(|| t.rsplit('.').next().unwrap_or(t).to_owned())
        }
        (None, Some(q)) => {
            let lower = q.value.to_ascii_lowercase();
            let mut missing = Vec::new();
            for ph in ["{checkpoint}", "{limit}"] {
                if !q.value.contains(ph) {
                    missing.push(format!("`{ph}`"));
                }
            }
            if !missing.is_empty() {
                cx.at_span(
                    format!("{sp}.query"),
                    q,
                    format!(
                        "the query must contain {}: `{{checkpoint}}` in its WHERE (the rows after the last one read) and `LIMIT {{limit}}` (the batch size)",
                        missing.join(" and ")
                    ),
                );
            }
            let rest = q.value.replace("{checkpoint}", "").replace("{limit}", "");
            if let Some(i) = rest.find('{')
                && rest[i..].contains('}')
            {
                cx.at_span(
                    format!("{sp}.query"),
                    q,
                    "only `{checkpoint}` and `{limit}` can be filled in",
                );
            }
            if !lower.contains("order by") {
                cx.at_span(
                    format!("{sp}.query"),
                    q,
                    format!(
                        "the query must `ORDER BY {}, {}` so that no row is skipped",
                        cfg.cursor, cfg.key
                    ),
                );
            }
            match &cfg.name {
                Some(nm) => nm.clone(),
                None => {
                    cx.at(
                        format!("{sp}.name"),
                        "a `query` needs a `name` (used in event ids: `<name>:<key>@<cursor>#<hash8>`)",
                    );
                    String::new()
                }
            }
        }
        _ => {
            cx.at(sp, "exactly one of `table` and `query` is required");
            String::new()
        }
    };
    if let Some(nm) = &cfg.name
        && !valid_name(nm)
    {
        cx.at(
            format!("{sp}.name"),
            "names use letters, digits, `_` and `-`",
        );
    }
    check_ident(cx, &format!("{sp}.cursor"), &cfg.cursor);
    check_ident(cx, &format!("{sp}.key"), &cfg.key);
    if cfg.cursor == cfg.key {
        cx.at(
            format!("{sp}.key"),
            "the key must be another column than the cursor (it breaks ties between rows with one cursor value)",
        );
    }
    let interval = cx.duration(
        &format!("{sp}.interval"),
        &cfg.interval,
        Duration::from_secs(5),
    );
    if interval.is_zero()
        && let Some(i) = &cfg.interval
    {
        cx.at_span(format!("{sp}.interval"), i, "must be longer than 0s");
    }
    if cfg.batch_size == Some(0) {
        cx.at(format!("{sp}.batch_size"), "must be greater than 0");
    }
    let settle = cx.duration(&format!("{sp}.settle"), &cfg.settle, Duration::from_secs(5));
    let overlap = cx.duration(
        &format!("{sp}.overlap"),
        &cfg.overlap,
        Duration::from_secs(60),
    );
    if cx.issues.len() > n {
        return None;
    }
    Some(SourceSpec::SqlPoll {
        settle,
        overlap,
        sqlite_path,
        name,
        interval,
        batch_size: cfg.batch_size.unwrap_or(500),
        event_type: cfg
            .event_type
            .clone()
            .unwrap_or_else(|| format!("{system}.row")),
        cfg,
    })
}

fn mysql_sink_spec(cx: &mut Ctx, mp: &str, cfg: Box<MysqlSinkConfig>) -> Option<SinkSpec> {
    if sql_url_kind(cfg.url.expose()) != Some("mysql") {
        cx.at(
            format!("{mp}.url"),
            "expected a `mysql://user:password@host:3306/database` URL",
        );
    }
    let parts: Vec<&str> = cfg.table.split('.').collect();
    if parts.len() > 2 {
        cx.at(
            format!("{mp}.table"),
            "expected `table` or `database.table`",
        );
    }
    for part in parts {
        check_ident(cx, &format!("{mp}.table"), part);
    }
    if cfg.key.is_empty() {
        cx.at(
            format!("{mp}.key"),
            "at least one key column is required for the upsert",
        );
    }
    if cfg.columns.is_empty() {
        cx.at(format!("{mp}.columns"), "at least one column is required");
    }
    for (c, t) in &cfg.columns {
        check_ident(cx, &format!("{mp}.columns.{c}"), c);
        if t.trim().is_empty()
            || !t
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || " _(),".contains(ch))
        {
            cx.at(
                format!("{mp}.columns.{c}"),
                format!("`{t}` is not a MySQL type name"),
            );
        }
    }
    for k in &cfg.key {
        if !cfg.columns.contains_key(k) {
            cx.at(
                format!("{mp}.key"),
                format!("key column `{k}` is not among `columns`"),
            );
        }
    }
    Some(SinkSpec::Mysql { cfg })
}

#[cfg(test)]
mod broker_settings_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_protobuf_schema_path_is_made_relative_to_the_config_folder() {
        let base = Path::new("/etc/weft");
        let s = broker_settings(
            ConnectorSettings(json!({"format": {"protobuf": {"schema": "proto/a.proto"}}})),
            base,
        );
        assert_eq!(
            s.0["format"]["protobuf"]["schema"],
            "/etc/weft/proto/a.proto"
        );
        // an absolute path and other formats are left as written
        let s = broker_settings(
            ConnectorSettings(json!({"format": {"protobuf": {"schema": "/srv/a.proto"}}})),
            base,
        );
        assert_eq!(s.0["format"]["protobuf"]["schema"], "/srv/a.proto");
        let avro = json!({"format": {"avro": {"schema": "\"long\""}}, "url": "x"});
        assert_eq!(
            broker_settings(ConnectorSettings(avro.clone()), base).0,
            avro
        );
        let odd = json!({"format": {"protobuf": {"schema": 5}}});
        assert_eq!(broker_settings(ConnectorSettings(odd.clone()), base).0, odd);
    }
}
