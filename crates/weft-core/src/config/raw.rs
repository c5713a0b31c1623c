//! The config file as written: serde structs that reject unknown keys.
//!
//! Nothing here does I/O or checks references between sections; that is
//! [`super::validate`]'s job. Every field has a doc comment: it is the
//! reference documentation of the YAML format.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::Secret;

/// The whole config file.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The embedded store.
    #[serde(default)]
    pub store: RawStore,
    /// The HTTP server (health, metrics, webhooks, admin API).
    #[serde(default)]
    pub server: RawServer,
    /// Delivery policy used where a flow or destination sets none.
    #[serde(default)]
    pub defaults: RawDefaults,
    /// The business systems, by name: how to read each and how to write it.
    #[serde(default)]
    pub systems: BTreeMap<String, RawSystem>,
    /// The flows, by name: from one system's source to one or more systems' sinks.
    #[serde(default)]
    pub flows: BTreeMap<String, RawFlow>,
    /// Topics inside the hub, by name: a flow publishes to a topic by naming
    /// it in `to`; other flows subscribe by naming it in `from`, each with
    /// its own position, lanes and DLQ (see [`RawTopic`]).
    #[serde(default)]
    pub topics: BTreeMap<String, RawTopic>,
    /// Canonical entities, by name: their JSON Schema contracts (see [`RawEntity`]).
    #[serde(default)]
    pub entities: BTreeMap<String, RawEntity>,
    /// Value maps for enums, by name, used in mappings as `valuemap("name")`
    /// (see [`RawValueMap`]).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, RawValueMap>")]
    pub value_maps: BTreeMap<String, Spanned<RawValueMap>>,
    /// Identity rules per entity: canonical records shared by the flows that
    /// name the entity in `identity` (see `config/identity.rs`).
    #[serde(default)]
    pub identity: BTreeMap<String, super::identity::RawIdentity>,
    /// Where alerts go (a flow's `freshness` broken and recovered), for
    /// every flow without its own `alerts`.
    pub alerts: Option<RawAlerts>,
    /// OpenTelemetry traces (off unless `telemetry.otlp` is set).
    #[serde(default)]
    pub telemetry: RawTelemetry,
}

/// Telemetry beyond logs and `/metrics`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    /// Export traces (a span per ingested record, per mapping, per delivery
    /// attempt) over OTLP/HTTP with protobuf bodies. Unset: no spans.
    pub otlp: Option<RawOtlp>,
}

/// An OTLP/HTTP trace receiver (an OpenTelemetry Collector, Jaeger, Tempo...).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOtlp {
    /// Base URL of the receiver, e.g. `http://127.0.0.1:4318`; `/v1/traces`
    /// is appended.
    #[schemars(with = "String")]
    pub endpoint: Spanned<String>,
    /// Extra headers of every export request (an API key); values may use
    /// `${ENV}` secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// `service.name` of the spans (default `weft`).
    pub service_name: Option<String>,
    /// Share of new traces recorded, from 0 to 1 (default 1). A record that
    /// arrives with a `traceparent` follows its caller's sampled flag.
    #[schemars(with = "Option<f64>")]
    pub sample_ratio: Option<Spanned<f64>>,
}

/// An alert receiver: a JSON POST (a structured CloudEvent) to `webhook`
/// when a flow's freshness SLA is broken and once more when it recovers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// The URL that receives the alerts (`http://` or `https://`).
    #[schemars(with = "String")]
    pub webhook: Spanned<String>,
    /// Extra headers of the POST; values may use `${ENV}` secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
}

/// Store settings.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Path of the SQLite database file, relative to the config file's folder
    /// (default `weft-data/weft.db`).
    pub path: Option<String>,
    /// `full` (default): every commit is fsynced before a source is
    /// acknowledged, so an accepted event survives a power loss. `normal`:
    /// survives a crash of weft but may lose the last commits on power loss.
    pub synchronous: Option<Synchronous>,
    /// How long event ids are remembered for deduplication (default `7d`).
    #[schemars(with = "Option<String>")]
    pub dedupe_retention: Option<Spanned<String>>,
    /// How long a DLQ entry is kept after it was replayed or discarded
    /// (default `30d`); its payload is dropped (only its SHA-256 is kept)
    /// as soon as it is resolved. Dead entries are never deleted.
    #[schemars(with = "Option<String>")]
    pub dlq_retention: Option<Spanned<String>>,
    /// How long a drift event is kept after a record last showed it,
    /// accepted or not (default `90d`).
    #[schemars(with = "Option<String>")]
    pub drift_retention: Option<Spanned<String>>,
    /// How long the attempt trail keeps each write of a record to a
    /// destination (when, how long, the HTTP status, the error), shown by
    /// the record inspector and `weft trace` (default `7d`).
    #[schemars(with = "Option<String>")]
    pub attempt_retention: Option<Spanned<String>>,
    /// Keep the journal in PostgreSQL instead of the SQLite file (`path`
    /// and `synchronous` are then not used): a database several nodes can
    /// share.
    pub postgres: Option<RawPgStore>,
}

/// The PostgreSQL journal.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPgStore {
    /// Connection URL, e.g. `${WEFT_PG_URL}`
    /// (`postgresql://user:password@host:5432/database`).
    pub url: Secret,
    /// Schema of the journal's tables (default `weft`), created if missing:
    /// lower-case letters, digits and `_`.
    pub schema: Option<String>,
    /// This node's name (default `weft`): leases carry it; two hubs on one
    /// journal need different names.
    pub node: Option<String>,
    /// Connections at most (default 8).
    pub pool_size: Option<usize>,
    /// How long a node may go without a heartbeat before the other nodes
    /// take over its sources and the rows it had claimed (default `10s`,
    /// from `3s` to `10m`). Heartbeats and source lease renewals go every
    /// third of it; a shorter timeout fails over sooner, a longer one
    /// rides out longer pauses (GC, a frozen VM, a slow network).
    #[schemars(with = "Option<String>")]
    pub node_timeout: Option<Spanned<String>>,
    /// Allow canonical records (`identity`) on this journal (default
    /// `false`: refused). Experimental: every scenario but one passes on
    /// PostgreSQL; two systems editing the same records in bursts past
    /// about 60 webhooks a second can outrun the echo window and write
    /// values back and forth (ARCHITECTURE.md).
    pub experimental_identity: Option<bool>,
}

/// SQLite's `synchronous` setting as exposed to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
}

/// HTTP server settings: two listeners. `listen` serves the webhooks (and
/// `/healthz`, `/readyz`); `admin_listen` serves the admin API, `/metrics`,
/// `/healthz` and `/readyz`, on loopback by default.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Address of the webhook listener (default `127.0.0.1:8080`).
    pub listen: Option<String>,
    /// Address of the admin listener: `/api/v1`, `/metrics`, `/healthz`,
    /// `/readyz` (default `127.0.0.1:9090`; keep it on loopback or a
    /// private network).
    pub admin_listen: Option<String>,
    /// Bearer token required by the admin API, at least 32 bytes (e.g.
    /// `openssl rand -hex 32`); unset disables the admin API.
    pub admin_token: Option<Secret>,
    /// Requests handled at once per listener; more get `503` with
    /// `Retry-After` (default 512).
    pub max_concurrent_requests: Option<usize>,
    /// Webhook body bytes held in memory at once, across all requests;
    /// a request that would exceed it gets `503` with `Retry-After`
    /// (default 16 MiB: a JSON body takes several times its size once parsed).
    pub max_inflight_bytes: Option<usize>,
}

/// Defaults applied to every flow.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    /// Default delivery policy.
    #[serde(default)]
    pub delivery: RawDelivery,
}

/// One business system.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSystem {
    /// Free text shown in `weft status`.
    pub description: Option<String>,
    /// How weft reads from this system (one connector).
    pub source: Option<RawSource>,
    /// How weft writes to this system (one connector).
    pub sink: Option<RawSink>,
    /// Circuit breaker shared by every flow writing to this system (on by
    /// default; `enabled: false` turns it off).
    pub circuit_breaker: Option<RawBreaker>,
    /// Client-side rate limit shared by every flow writing to this system.
    pub rate_limit: Option<RawRateLimit>,
}

/// Circuit breaker settings of a destination.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    /// Default true.
    pub enabled: Option<bool>,
    /// Open after this many retryable failures in a row (default 5).
    pub consecutive_failures: Option<u32>,
    /// Open when this share of requests failed within `window` (default 0.5) ...
    pub failure_rate: Option<f64>,
    /// ... counting only once at least this many requests were made in it (default 20).
    pub min_requests: Option<u32>,
    /// Length of the failure-rate window (default `60s`).
    #[schemars(with = "Option<String>")]
    pub window: Option<Spanned<String>>,
    /// How long the breaker stays open before probing (default `30s`).
    #[schemars(with = "Option<String>")]
    pub cooldown: Option<Spanned<String>>,
    /// Writes let through while half-open (default 1).
    pub half_open_probes: Option<u32>,
}

/// Rate limit of a destination: requests (or batches) per second or minute.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_second: Option<u32>,
    pub per_minute: Option<u32>,
    /// Requests allowed at once above the steady rate (default: the per-second rate, at least 1).
    pub burst: Option<u32>,
}

/// A source connector, named by its single key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSource {
    /// The system calls us: HTTP POSTs to a path of weft's server.
    Webhook(WebhookSourceConfig),
    /// The system drops files (CSV, JSON Lines, JSON arrays, XML) into a
    /// folder, or weft reads one file.
    File(Box<FileSourceConfig>),
    /// Synthetic records for demos and benchmarks.
    Generate(GenerateSourceConfig),
    /// weft polls the system's REST API (pagination, incremental cursor, auth, rate limit).
    Rest(Box<RestSourceConfig>),
    /// weft polls a PostgreSQL, MariaDB/MySQL or SQLite table (or query) by
    /// a cursor column and a tie-breaking key; read-only.
    SqlPoll(Box<SqlPollSourceConfig>),
    /// Change data capture from PostgreSQL logical replication (pgoutput):
    /// inserts, updates, deletes and truncates, after an initial snapshot.
    /// Its settings are the connector's own (weft-connectors
    /// `cdc/postgres/config.rs`).
    PostgresCdc(ConnectorSettings),
    /// Change data capture from the MariaDB/MySQL binlog (ROW format):
    /// inserts, updates and deletes, after an initial snapshot. Its
    /// settings are the connector's own (weft-connectors
    /// `cdc/mysql/config.rs`).
    MysqlCdc(ConnectorSettings),
    /// A NATS JetStream durable pull consumer: each message acknowledged
    /// once it is stored. Its settings are the connector's own
    /// (weft-connectors `broker/nats/config.rs`).
    Nats(ConnectorSettings),
    /// A RabbitMQ (AMQP 0.9.1) queue consumer: each message acknowledged
    /// once it is stored. Its settings are the connector's own
    /// (weft-connectors `broker/amqp/config.rs`).
    Amqp(ConnectorSettings),
    /// A Redis Streams consumer group: each entry acknowledged (XACK) once
    /// it is stored, pending entries of a crashed consumer taken back. Its
    /// settings are the connector's own (weft-connectors
    /// `broker/redis/config.rs`).
    Redis(ConnectorSettings),
    /// An MQTT 5 subscriber (QoS 1, persistent session): each message
    /// acknowledged (PUBACK) once it is stored. Its settings are the
    /// connector's own (weft-connectors `broker/mqtt/config.rs`).
    Mqtt(ConnectorSettings),
    /// A Kafka consumer group member: each partition's offset committed
    /// once the messages before it are stored. Its settings are the
    /// connector's own (weft-connectors `broker/kafka/config.rs`).
    Kafka(ConnectorSettings),
}

/// A sink connector, named by its single key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSink {
    /// HTTP requests to the system's API (boxed: the largest config).
    Http(Box<HttpSinkConfig>),
    /// Upserts into a SQLite table.
    Sqlite(SqliteSinkConfig),
    /// Upserts into a PostgreSQL table.
    Postgres(PostgresSinkConfig),
    /// Appends to a JSON Lines file, or writes rotating JSON Lines files into a folder.
    Jsonl(JsonlSinkConfig),
    /// Appends to a CSV file, or writes rotating CSV files into a folder (exports).
    Csv(CsvSinkConfig),
    /// Upserts into a MariaDB/MySQL table.
    Mysql(Box<MysqlSinkConfig>),
    /// Publishes to a NATS JetStream subject with `Nats-Msg-Id` = the
    /// idempotency key, waiting for the stream's ack. Its settings are the
    /// connector's own (weft-connectors `broker/nats/config.rs`).
    Nats(ConnectorSettings),
    /// Publishes to a RabbitMQ exchange (AMQP 0.9.1) with `message_id` =
    /// the idempotency key, waiting for the publisher confirm. Its settings
    /// are the connector's own (weft-connectors `broker/amqp/config.rs`).
    Amqp(ConnectorSettings),
    /// Appends to a Redis stream (XADD) once per idempotency key (a Lua
    /// script keeps a dedupe key beside the stream). Its settings are the
    /// connector's own (weft-connectors `broker/redis/config.rs`).
    Redis(ConnectorSettings),
    /// Publishes to an MQTT 5 topic at QoS 1 with the CloudEvents `id`
    /// user property = the idempotency key, waiting for the PUBACK. Its
    /// settings are the connector's own (weft-connectors
    /// `broker/mqtt/config.rs`).
    Mqtt(ConnectorSettings),
    /// Publishes to a Kafka topic with an idempotent producer (key = the
    /// entity key, `ce_id` header = the idempotency key), waiting for the
    /// brokers' acknowledgement. Its settings are the connector's own
    /// (weft-connectors `broker/kafka/config.rs`).
    Kafka(ConnectorSettings),
}

/// Webhook source settings.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSourceConfig {
    /// Path on weft's server, e.g. `/hooks/crm`.
    pub path: String,
    /// Shorthand for `signature: {scheme: hmac, secrets: [<secret>]}`: the
    /// shared secret of a hex HMAC-SHA256 of the raw body. Unset (and no
    /// `signature`) accepts unsigned requests.
    pub secret: Option<Secret>,
    /// With `secret`: the header carrying the hex HMAC-SHA256 of the raw
    /// body, optionally prefixed `sha256=` (default `x-signature-256`).
    pub signature_header: Option<String>,
    /// Signature scheme, secrets and replay tolerance; replaces `secret`.
    pub signature: Option<Box<WebhookSignatureConfig>>,
    /// Largest accepted body in bytes (default 1 MiB); larger gets 413.
    pub max_body_bytes: Option<usize>,
    /// Header carrying the sender's event id, used to deduplicate retries
    /// (default `x-event-id`). Without it, `id_field` is tried, then the
    /// SHA-256 of the body.
    pub id_header: Option<String>,
    /// jq path into the body giving the event id, e.g. `.id`.
    #[schemars(with = "Option<String>")]
    pub id_field: Option<Spanned<String>>,
    /// CloudEvents `type` of the events (default `<system>.webhook`).
    pub event_type: Option<String>,
}

/// How a webhook sender signs its requests.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSignatureConfig {
    /// `standard_webhooks`, `stripe`, `github` or `hmac` (generic).
    #[schemars(with = "SignatureScheme")]
    pub scheme: Spanned<SignatureScheme>,
    /// Accepted secrets; a request signed with any of them passes (rotation).
    /// `standard_webhooks`: `whsec_<base64>` (the key is the decoded base64).
    /// Others: the secret's text is the HMAC key.
    pub secrets: Vec<Secret>,
    /// Header carrying the signature. Defaults: `webhook-signature`,
    /// `stripe-signature`, `x-hub-signature-256`, `x-signature-256` (hmac).
    pub header: Option<String>,
    /// `hmac` only: `hex` (default) or `base64`.
    pub encoding: Option<SignatureEncoding>,
    /// `hmac` only: text before the signature, e.g. `sha256=` or `v0=`.
    pub prefix: Option<String>,
    /// `hmac` only: what is signed, with `{body}` and `{timestamp}`, e.g.
    /// `"v0:{timestamp}:{body}"` (default `{body}`).
    #[schemars(with = "Option<String>")]
    pub signed_content: Option<Spanned<String>>,
    /// `hmac` only: header carrying the Unix timestamp (seconds); required
    /// when `signed_content` uses `{timestamp}`, and checked against `tolerance`.
    pub timestamp_header: Option<String>,
    /// Largest accepted distance between a request's timestamp and now, in
    /// either direction (default `5m`); for schemes with a timestamp.
    #[schemars(with = "Option<String>")]
    pub tolerance: Option<Spanned<String>>,
}

/// Webhook signature schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SignatureScheme {
    /// standardwebhooks.com: `webhook-id`, `webhook-timestamp`,
    /// `webhook-signature: v1,<base64>`; signs `{id}.{timestamp}.{body}`.
    StandardWebhooks,
    /// `Stripe-Signature: t=<ts>,v1=<hex>`; signs `{t}.{body}`.
    Stripe,
    /// `X-Hub-Signature-256: sha256=<hex>` of the body.
    Github,
    /// Configurable HMAC-SHA256: header, encoding, prefix, signed content.
    Hmac,
}

/// How a signature's bytes are written in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    Hex,
    Base64,
}

/// File source settings: exactly one of `dir` and `path`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Drop folder: files appearing here are read once, then moved to
    /// `processed/` (or `quarantine/` with an error report).
    pub dir: Option<String>,
    /// A single file read once in place (not moved); for batch loads.
    pub path: Option<String>,
    /// `csv`, `jsonl`, `json_array` (a file holding one JSON array of
    /// records) or `xml`; default from each file's extension (`.csv`;
    /// `.jsonl`, `.ndjson`; `.json`; `.xml`).
    pub format: Option<FileFormat>,
    /// Only names matching this glob-like suffix are read (default: the
    /// extensions of `format`, or all five above when `format` is unset).
    pub pattern: Option<String>,
    /// CSV delimiter (default `,`).
    pub delimiter: Option<char>,
    /// Text encoding of CSV files: `utf-8` (default), `latin-1`
    /// (ISO-8859-1) or `windows-1252`. Values arrive as UTF-8 either way.
    /// JSON and XML files are read as UTF-8.
    #[schemars(with = "Option<String>")]
    pub encoding: Option<Spanned<String>>,
    /// XML only: the elements that become records, as a path of element
    /// names from the root, e.g. `/orders/order`; `*` matches any name
    /// (default `/*/*`: every child of the root element). Each element
    /// becomes an object: attributes as `@name`, child elements as keys
    /// (repeated ones as arrays), text as `#text` beside attributes or
    /// children, or the element's value when it holds only text.
    #[schemars(with = "Option<String>")]
    pub record_path: Option<Spanned<String>>,
    /// How often to look for new files (default `1s`).
    #[schemars(with = "Option<String>")]
    pub poll_interval: Option<Spanned<String>>,
    /// Drop folder: a file is read once its size and modification time
    /// held still this long (default `10s`; `0s`: two polls in a row), so
    /// an upload that pauses is not read half. Not used with `ready_marker`.
    #[schemars(with = "Option<String>")]
    pub settle: Option<Spanned<String>>,
    /// Drop folder: read a file only once a marker file of the same name
    /// plus this suffix exists (`ready_marker: .done`: `orders.csv` is read
    /// once `orders.csv.done` appears); the marker moves with the file.
    #[schemars(with = "Option<String>")]
    pub ready_marker: Option<Spanned<String>>,
    /// Records per store commit (default 1000).
    pub batch_size: Option<usize>,
    /// jq path giving each record's id; default: the file's content hash and line number.
    #[schemars(with = "Option<String>")]
    pub id_field: Option<Spanned<String>>,
    /// CloudEvents `type` of the events (default `<system>.file`).
    pub event_type: Option<String>,
}

/// File formats the file source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// A header row, then one record per row.
    Csv,
    /// One JSON value per line.
    Jsonl,
    /// One JSON array `[ {...}, {...} ]`; each element is a record.
    JsonArray,
    /// An XML document; the elements at `record_path` are records.
    Xml,
}

/// Generate source settings.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateSourceConfig {
    /// jq program producing each record; `$seq` is its sequence number (from 1).
    #[schemars(with = "String")]
    pub template: Spanned<String>,
    /// Records per second (default: as fast as the store takes them).
    pub rate: Option<f64>,
    /// Total records (default: unlimited).
    pub count: Option<u64>,
    /// Records per store commit (default 500).
    pub batch_size: Option<usize>,
    /// CloudEvents `type` (default `<system>.generated`).
    pub event_type: Option<String>,
}

/// HTTP sink settings.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// URL; `{field}` or `{a.b}` placeholders are filled (percent-encoded) from the payload.
    /// With `mode: upsert_lookup`, the URL records are created at.
    pub url: String,
    /// `POST` (default), `PUT` or `PATCH`. With `mode: upsert_lookup`, the
    /// method of an update (default `PUT`).
    pub method: Option<String>,
    /// Extra headers; values may use `${ENV}` secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Request timeout (default `10s`).
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Spanned<String>>,
    /// Connect timeout (default `5s`).
    #[schemars(with = "Option<String>")]
    pub connect_timeout: Option<Spanned<String>>,
    /// jq predicate over the response body of a 2xx (parsed JSON, or the
    /// text as a string when it is not JSON); false or null makes the
    /// write a failure, e.g. `.ok == true`.
    #[schemars(with = "Option<String>")]
    pub success_when: Option<Spanned<String>>,
    /// What a false `success_when` is: `retryable` (default) or `permanent`.
    pub success_when_failure: Option<HttpFailureKind>,
    /// Statuses to retry whatever the default classification (e.g. `409`).
    #[serde(default)]
    pub retry_on: Vec<u16>,
    /// Statuses to dead-letter at once whatever the default (e.g. `503`).
    #[serde(default)]
    pub permanent_on: Vec<u16>,
    /// `request` (default): one request per delivery. `upsert_lookup`:
    /// `GET lookup_url`; 404 creates (`method_create` to `url`), 2xx updates
    /// (`method` to `update_url`). `by_id`: the payload's `_id` decides
    /// between a create and an update (identity flows).
    pub mode: Option<HttpSinkMode>,
    /// `upsert_lookup`: URL template of the lookup `GET`.
    pub lookup_url: Option<String>,
    /// `upsert_lookup`: URL template of an update; may also use
    /// `{_found.<field>}` from the lookup's response (default `lookup_url`).
    pub update_url: Option<String>,
    /// `upsert_lookup`: method of a create (default `POST`).
    pub method_create: Option<String>,
    /// jq program over the write's response body giving the id the
    /// destination assigned, e.g. `.id`; kept for the crosswalk.
    #[schemars(with = "Option<String>")]
    pub capture_id: Option<Spanned<String>>,
    /// Send each write as a CloudEvent (default: the bare payload):
    /// `binary` (`ce-*` headers, the payload as the body) or `structured`
    /// (an `application/cloudevents+json` body with the payload in `data`).
    /// `id` is the write's idempotency key, `source` `weft/<flow>`, `type`
    /// `weft.<flow>`, `subject` the entity key, `time` the event's time.
    pub cloudevents: Option<CloudEventsMode>,
}

/// The CloudEvents content mode of an HTTP write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloudEventsMode {
    /// Attributes in `ce-*` headers; the body is the payload, its
    /// `Content-Type` the event's `datacontenttype`.
    Binary,
    /// The whole event as JSON (`application/cloudevents+json`).
    Structured,
}

/// How a failure is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HttpFailureKind {
    Retryable,
    Permanent,
}

/// How the HTTP sink writes a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HttpSinkMode {
    /// One request per delivery.
    #[default]
    Request,
    /// Look up, then create or update.
    UpsertLookup,
    /// By the payload's `_id` (an identity flow's destination id): null or
    /// absent creates (`method_create`, default `POST`, to `url`), else
    /// updates (`method`, default `PUT`, to `update_url`, e.g.
    /// `.../customers/{_id}`). `_id` is not sent in the body.
    ById,
}

/// SQLite sink settings.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqliteSinkConfig {
    /// Database file, relative to the config file's folder.
    pub path: String,
    /// Table to upsert into.
    pub table: String,
    /// Key columns of the upsert (the table's primary or unique key).
    pub key: Vec<String>,
    /// Columns and their types (`text`, `integer`, `real`, `boolean`, `json`);
    /// the table is created with them if missing. Without it the payload's
    /// top-level fields are written as they are into an existing table.
    pub columns: Option<BTreeMap<String, String>>,
    /// A column holding the record's version: an existing row is updated
    /// only when the incoming version is newer (stale writes refused).
    pub version_column: Option<String>,
}

/// PostgreSQL sink settings.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// Connection string, e.g. `postgresql://user@host/db` (use `${ENV}`).
    pub url: Secret,
    /// Table to upsert into, optionally schema-qualified.
    pub table: String,
    /// Key columns of the upsert (a unique constraint must exist).
    pub key: Vec<String>,
    /// Columns to write with their PostgreSQL types (`text`, `bigint`,
    /// `integer`, `numeric`, `boolean`, `timestamptz`, `jsonb`, ...).
    pub columns: BTreeMap<String, String>,
    /// A column holding the record's version (e.g. `updated_at`, a
    /// sequence): an existing row is updated only when the incoming version
    /// is newer (`WHERE target.v IS NULL OR target.v < EXCLUDED.v`), so a
    /// replay or a late duplicate never puts older data over newer.
    pub version_column: Option<String>,
}

/// JSON Lines sink settings: exactly one of `path` and `dir`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonlSinkConfig {
    /// One output file, appended to; relative to the config file's folder.
    pub path: Option<String>,
    /// Output folder of rotating files `<prefix>-<UTC time>-<seq>.jsonl`:
    /// each is written as `<name>.jsonl.part` and renamed to its final
    /// name once complete (see `rotate`), so a reader of the folder never
    /// sees a file being written.
    pub dir: Option<String>,
    /// With `dir`: the start of each file's name (default: the system's name).
    pub prefix: Option<String>,
    /// With `dir`: when a file is complete.
    pub rotate: Option<RawRotate>,
    /// Write each line as a CloudEvent (JSON format: `specversion`, `id`
    /// = the idempotency key, `source`, `type`, `time`, `subject`,
    /// `correlationid`, `causationid`, `data` = the payload) instead of the
    /// bare payload.
    #[serde(default)]
    pub envelope: bool,
}

/// CSV sink settings: exactly one of `path` and `dir`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CsvSinkConfig {
    /// One output file, appended to; relative to the config file's folder.
    pub path: Option<String>,
    /// Output folder of rotating files `<prefix>-<UTC time>-<seq>.csv`:
    /// each is written as `<name>.csv.part` and renamed to its final name
    /// once complete (see `rotate`), so a reader of the folder never sees a
    /// file being written.
    pub dir: Option<String>,
    /// With `dir`: the start of each file's name (default: the system's name).
    pub prefix: Option<String>,
    /// With `dir`: when a file is complete.
    pub rotate: Option<RawRotate>,
    /// Columns, in order: top-level fields of each record. Default: the
    /// keys of the first record written to each file. Missing fields and
    /// null are written as empty cells; strings as they are; numbers and
    /// booleans as JSON text; arrays and objects JSON-encoded in the cell.
    /// Fields not among the columns are not written.
    #[schemars(with = "Option<Vec<String>>")]
    pub columns: Option<Vec<Spanned<String>>>,
    /// Write a header row at the start of each file (default true).
    pub header: Option<bool>,
    /// Field delimiter, one ASCII character (default `,`).
    #[schemars(with = "Option<char>")]
    pub delimiter: Option<Spanned<char>>,
}

/// When a rotating export file is complete: renamed from `.part` to its
/// final name. Also on shutdown. Whichever limit comes first.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRotate {
    /// Size limit in bytes (default 67108864, 64 MiB): a batch that would
    /// take a non-empty file over it goes to a new file.
    pub max_bytes: Option<u64>,
    /// Age limit, counted from the file's first write (default `1h`).
    #[schemars(with = "Option<String>")]
    pub max_age: Option<Spanned<String>>,
    /// Close a file when nothing was written to it for this long (default `1m`).
    #[schemars(with = "Option<String>")]
    pub idle: Option<Spanned<String>>,
}

/// One flow.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFlow {
    /// The system whose source feeds this flow, or a topic (of `topics`)
    /// this flow subscribes to.
    #[schemars(with = "String")]
    pub from: Spanned<String>,
    /// For a flow reading a topic: where it starts the first time it runs,
    /// `now` (default: messages published from then on) or `beginning`
    /// (every message the topic still keeps). Later runs resume where the
    /// flow stopped.
    #[schemars(with = "Option<String>")]
    pub start: Option<Spanned<String>>,
    /// jq predicate; records for which it is false or null are counted as filtered.
    #[schemars(with = "Option<String>")]
    pub filter: Option<Spanned<String>>,
    /// jq program giving the entity key (deliveries with one key keep their
    /// order); default: no ordering constraint.
    #[schemars(with = "Option<String>")]
    pub key: Option<Spanned<String>>,
    /// jq program from the source payload to the destination payload (default `.`).
    #[schemars(with = "Option<String>")]
    pub mapping: Option<Spanned<String>>,
    /// Destinations: system names, or `{system, mapping, delivery}`.
    #[schemars(with = "Vec<RawDestination>")]
    pub to: Vec<Spanned<RawDestination>>,
    /// Delivery policy for every destination of this flow.
    pub delivery: Option<RawDelivery>,
    /// The canonical entity (a key of `entities`) that the flow's mapping
    /// produces; its contract is checked after the mapping.
    #[schemars(with = "Option<String>")]
    pub entity: Option<Spanned<String>>,
    /// What a contract violation does: `dead_letter` (default), `reject`
    /// (webhook sources answer 422) or `warn` (delivered, logged, counted).
    pub on_violation: Option<OnViolation>,
    /// What a record whose shape drifted does: `record` (default: the drift
    /// is recorded, the record flows) or `quarantine` (dead-lettered).
    pub on_drift: Option<OnDrift>,
    /// The entity (a key of `identity`) whose canonical records this flow
    /// feeds: `key` is then the source system's id of the record and the
    /// mapping gives its canonical fields; a change is written to every
    /// destination of every flow of the entity, except where it came from.
    #[schemars(with = "Option<String>")]
    pub identity: Option<Spanned<String>>,
    /// The expected freshness, e.g. `15m`: the flow is late when its newest
    /// record was received longer ago, or a record has waited longer to be
    /// delivered (shown by `weft status`, exported as metrics, alerted).
    #[schemars(with = "Option<String>")]
    pub freshness: Option<Spanned<String>>,
    /// This flow's alert receiver (default: the top-level `alerts`).
    pub alerts: Option<RawAlerts>,
}

/// A topic inside the hub.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTopic {
    /// What the topic carries, for people.
    pub description: Option<String>,
    /// How long a published message is kept (default `7d`): a subscriber
    /// that starts at the `beginning` sees what is younger; one that was
    /// stopped longer misses what was pruned.
    #[schemars(with = "Option<String>")]
    pub retention: Option<Spanned<String>>,
}

/// A destination of a flow: a system name or a map with options.
// a few hundred bytes per destination of a parsed file: not worth a Box
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RawDestination {
    /// Just a system name.
    Name(String),
    /// A system with its own mapping or delivery policy.
    Full(Box<RawDestinationFull>),
}

impl JsonSchema for RawDestination {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RawDestination".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let full = g.subschema_for::<RawDestinationFull>();
        schemars::json_schema!({
            "anyOf": [{"type": "string", "description": "The name of a system with a `sink`."}, full]
        })
    }
}

// Hand-written instead of `#[serde(untagged)]`: untagged enums buffer their
// input and lose the line numbers that error messages need.
impl<'de> Deserialize<'de> for RawDestination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawDestination;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a system name or a map with `system` and optional `mapping`, `delivery`",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawDestination::Name(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RawDestinationFull::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|f| RawDestination::Full(Box::new(f)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A destination with options.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDestinationFull {
    /// The system written to (it must have a `sink`).
    pub system: String,
    /// jq program applied after the flow's mapping, for this destination only.
    #[schemars(with = "Option<String>")]
    pub mapping: Option<Spanned<String>>,
    /// Delivery policy overriding the flow's.
    pub delivery: Option<RawDelivery>,
    /// JSON Schema file (relative to the config file) the payload for this
    /// destination must satisfy before it is written.
    #[schemars(with = "Option<String>")]
    pub contract: Option<Spanned<String>>,
    /// Payload fields holding one system's id of a canonical record,
    /// replaced by this destination's id of it when written; the write
    /// waits until the destination has one (`identity:` records).
    #[serde(default)]
    pub references: BTreeMap<String, super::references::RawReference>,
}

/// Delivery policy; unset fields fall back to the flow, then the defaults.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    /// Attempts before a message goes to the DLQ (default 8).
    pub max_attempts: Option<u32>,
    /// First retry delay (default `200ms`).
    #[schemars(with = "Option<String>")]
    pub initial_backoff: Option<Spanned<String>>,
    /// Longest retry delay (default `60s`).
    #[schemars(with = "Option<String>")]
    pub max_backoff: Option<Spanned<String>>,
    /// Growth of the delay per attempt (default 2.0); full jitter is applied.
    pub multiplier: Option<f64>,
    /// Writes in flight at once, across entity keys (default 8 for HTTP, 1 for databases and files).
    pub concurrency: Option<usize>,
    /// Messages per write for sinks that batch (default 500; HTTP is always 1).
    pub batch_size: Option<usize>,
    /// When a message is dead-lettered: `continue` (default) lets later
    /// messages with the same entity key go on; `hold_key` makes them wait
    /// until the dead letter is replayed or discarded.
    pub on_dead_letter: Option<OnDeadLetter>,
    /// Pending messages above which the flow's sources pause and webhooks
    /// answer 503 (default 500000).
    pub backlog_high_water: Option<u64>,
}

/// What a dead letter does to its entity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadLetter {
    Continue,
    HoldKey,
}

/// REST polling source settings.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestSourceConfig {
    /// Base URL and path of the collection, e.g. `https://api.example.com/v1/contacts`
    /// (`${ENV}` allowed; a query string here is kept on every request).
    #[schemars(with = "String")]
    pub url: Spanned<String>,
    /// `GET` (default) or `POST`.
    #[schemars(with = "Option<String>")]
    pub method: Option<Spanned<String>>,
    /// JSON body sent with `POST`.
    pub body: Option<serde_json::Value>,
    /// Query parameters added to every request.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Extra request headers; values may use `${ENV}` secrets and are never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// jq path to the records in the response body (default `.`): an array,
    /// `null` (no records), or a program with one output per record such as `.data[]`.
    #[schemars(with = "Option<String>")]
    pub records: Option<Spanned<String>>,
    /// jq program giving each record's id (the inbox's dedupe key); default:
    /// the SHA-256 of the record's canonical JSON. With `incremental`, include
    /// the cursor so that an update is a new event: `"\(.id)@\(.updated_at)"`.
    #[schemars(with = "Option<String>")]
    pub id_field: Option<Spanned<String>>,
    /// CloudEvents `type` of the events (default `<system>.rest`).
    pub event_type: Option<String>,
    /// Time between the starts of two polls (default `60s`); not with `cron`.
    #[schemars(with = "Option<String>")]
    pub interval: Option<Spanned<String>>,
    /// Cron expression (UTC; 5 fields, or 6 with seconds first) for the poll
    /// times; not with `interval`.
    #[schemars(with = "Option<String>")]
    pub cron: Option<Spanned<String>>,
    /// Timeout of one HTTP request (default `30s`).
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Spanned<String>>,
    /// Longest wait between retries of a failing page (default `60s`).
    #[schemars(with = "Option<String>")]
    pub max_backoff: Option<Spanned<String>>,
    /// How to get the next page (default: one request per poll).
    pub pagination: Option<RestPagination>,
    /// Fetch only records changed since the last poll.
    pub incremental: Option<RestIncremental>,
    /// Ignore the saved incremental cursor at start and fetch everything
    /// from `incremental.initial` again (then keep going incrementally).
    /// Remove it after the re-sync, or every restart re-syncs.
    #[serde(default)]
    pub full_resync_on_start: bool,
    /// How to authenticate.
    pub auth: Option<RestAuth>,
    /// Client-side request rate limit.
    pub rate_limit: Option<RestRateLimit>,
}

/// Pagination styles, named by their single key.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RestPagination {
    /// `?page=N&per_page=M`.
    Page(RestPagePagination),
    /// `?offset=N&limit=M`; the offset grows by the records received.
    Offset(RestOffsetPagination),
    /// The body carries the next cursor, sent back in a query parameter.
    Cursor(RestCursorPagination),
    /// The `Link: <url>; rel="next"` response header (write `link_header: {}`).
    LinkHeader(RestLinkPagination),
    /// The body carries the next page's URL.
    NextUrl(RestNextUrlPagination),
}

/// Page-number pagination.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestPagePagination {
    /// Page number parameter (default `page`).
    pub param: Option<String>,
    /// First page number (default 1).
    pub start: Option<u64>,
    /// Page size parameter (default `per_page`); sent only with `size`.
    pub size_param: Option<String>,
    /// Page size to ask for.
    pub size: Option<u64>,
    /// Safety cap on pages per poll (default 1000).
    pub max_pages: Option<u64>,
}

/// Offset/limit pagination.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestOffsetPagination {
    /// Offset parameter (default `offset`).
    pub offset_param: Option<String>,
    /// Limit parameter (default `limit`).
    pub limit_param: Option<String>,
    /// Records per page (default 100).
    pub limit: Option<u64>,
    /// Safety cap on pages per poll (default 1000).
    pub max_pages: Option<u64>,
}

/// Cursor pagination.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestCursorPagination {
    /// jq path to the next cursor in the body, e.g. `.meta.next_cursor`;
    /// null, `""` or missing ends the poll.
    #[schemars(with = "String")]
    pub cursor_path: Spanned<String>,
    /// Query parameter carrying the cursor (default `cursor`).
    pub param: Option<String>,
    /// Safety cap on pages per poll (default 1000).
    pub max_pages: Option<u64>,
}

/// `Link` header pagination.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestLinkPagination {
    /// Safety cap on pages per poll (default 1000).
    pub max_pages: Option<u64>,
}

/// Next-URL-in-body pagination.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestNextUrlPagination {
    /// jq path to the next page's URL (absolute or relative), e.g. `.next`.
    #[schemars(with = "String")]
    pub path: Spanned<String>,
    /// Safety cap on pages per poll (default 1000).
    pub max_pages: Option<u64>,
}

/// Incremental sync by a cursor field of the records.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestIncremental {
    /// jq program over a record giving its cursor, e.g. `.updated_at`
    /// (strings compare as text, so use one timestamp format; numbers as numbers).
    #[schemars(with = "String")]
    pub cursor_field: Spanned<String>,
    /// Query parameter carrying the highest cursor seen, e.g. `updated_since`.
    pub param: String,
    /// Cursor of the very first poll (default: the parameter is not sent).
    pub initial: Option<String>,
    /// `ascending` (default): the API returns records sorted by the cursor,
    /// and the checkpoint advances with every page. `unordered`: it advances
    /// only with the last page of a poll.
    pub order: Option<RestOrder>,
    /// Whether the API's `param` is inclusive (`>=`, default `true`): records
    /// at the saved cursor are fetched again and deduplicated. `false` for an
    /// exclusive parameter (`>`): the saved cursor is sent one unit earlier
    /// (an integer minus 1, an RFC 3339 timestamp minus one unit of its last
    /// digit, a date minus a day) so that records tying with it are not lost.
    pub since_inclusive: Option<bool>,
}

/// Order of the records by their incremental cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestOrder {
    Ascending,
    Unordered,
}

/// Authentication, named by its single key.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RestAuth {
    /// An API key in a header or a query parameter.
    ApiKey(RestApiKey),
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// HTTP basic authentication.
    Basic(RestBasic),
    /// OAuth2 client credentials; the token is cached until it expires and
    /// refreshed once on a 401.
    Oauth2ClientCredentials(RestOauth2),
}

/// API key placement: exactly one of `header` and `query`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestApiKey {
    /// Header name, e.g. `X-Api-Key`.
    pub header: Option<String>,
    /// Query parameter name, e.g. `api_key`.
    pub query: Option<String>,
    /// The key.
    pub value: Secret,
}

/// HTTP basic credentials.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestBasic {
    pub username: String,
    pub password: Secret,
}

/// OAuth2 client credentials grant.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestOauth2 {
    /// Token endpoint.
    #[schemars(with = "String")]
    pub token_url: Spanned<String>,
    pub client_id: String,
    pub client_secret: Secret,
    /// Space-separated scopes.
    pub scope: Option<String>,
    /// `basic` (default): client id and secret in HTTP basic auth; `body`:
    /// as `client_id`/`client_secret` form fields.
    pub client_auth: Option<RestClientAuth>,
}

/// How the OAuth2 client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestClientAuth {
    Basic,
    Body,
}

/// Client-side rate limit: exactly one of `per_second` and `per_minute`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestRateLimit {
    pub per_second: Option<u32>,
    pub per_minute: Option<u32>,
    /// Requests allowed at once after a quiet time (default 1).
    pub burst: Option<u32>,
}

// ---- canonical entities, contracts and value maps ----

/// A canonical entity: the shape flows map into.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEntity {
    /// JSON Schema file of the current version (relative to the config file;
    /// draft 2020-12 unless the file's `$schema` says otherwise).
    #[schemars(with = "String")]
    pub contract: Spanned<String>,
    /// The contract's version number (shown in violations).
    pub version: Option<u32>,
    /// Older contract files still accepted: a record valid against any of
    /// them passes (a migration window).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub also_accept: Vec<Spanned<String>>,
    /// JSON pointers of sensitive fields (`/email`, `/tax_id`): their values
    /// are shown as `"***"` in violations, drift examples and logs.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub sensitive: Vec<Spanned<String>>,
}

/// What a contract violation does to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnViolation {
    /// The flow's outcome is rejected (DLQ, stage `map`) with the violations.
    #[default]
    DeadLetter,
    /// Webhook sources refuse the request with 422 and the violations.
    Reject,
    /// Delivered anyway; the violation is logged and counted.
    Warn,
}

/// What drift in a record's shape does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnDrift {
    /// Record the drift event (once), let the record through.
    #[default]
    Record,
    /// Dead-letter records showing drift (stage `map`, error `drift: ...`).
    Quarantine,
}

/// A value map: `map` from source values (as text) to target values, and a
/// `default` for values with no entry. Without `default` an unmapped value is
/// an error (the record is dead-lettered). Null input gives null.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawValueMap {
    /// Source value -> target value, or a context rule
    /// `{when: <jq predicate on the record>, then: <value>, else: <value>}`.
    pub map: BTreeMap<String, RawValueTarget>,
    /// Value for inputs with no entry.
    pub default: Option<serde_json::Value>,
}

/// One entry of a value map.
#[derive(Debug)]
pub enum RawValueTarget {
    /// A plain target value.
    Value(serde_json::Value),
    /// One source value to two targets, chosen by a jq predicate.
    Rule(RawValueRule),
}

/// A context rule of a value map.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawValueRule {
    /// jq predicate evaluated on the record given to `valuemap(name; value)`
    /// (or on the value itself with `valuemap(name)`).
    #[schemars(with = "String")]
    pub when: Spanned<String>,
    /// Target when `when` is true.
    pub then: serde_json::Value,
    /// Target otherwise (default: the map's `default`).
    #[serde(rename = "else")]
    pub otherwise: Option<serde_json::Value>,
}

impl JsonSchema for RawValueTarget {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RawValueTarget".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let rule = g.subschema_for::<RawValueRule>();
        schemars::json_schema!({
            "anyOf": [{"type": ["string", "number", "boolean", "null"]}, rule]
        })
    }
}

// Hand-written for the same reason as `RawDestination`: keep line numbers.
impl<'de> Deserialize<'de> for RawValueTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde_json::Value;
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawValueTarget;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a target value or a rule `{when, then, else}`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawValueTarget::Value(Value::String(v.to_owned())))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(RawValueTarget::Value(Value::Bool(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(RawValueTarget::Value(Value::from(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(RawValueTarget::Value(Value::from(v)))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(RawValueTarget::Value(Value::from(v)))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(RawValueTarget::Value(Value::Null))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RawValueRule::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawValueTarget::Rule)
            }
        }
        d.deserialize_any(V)
    }
}

/// SQL polling source settings: exactly one of `table` and `query`.
///
/// Each poll reads the rows after the last checkpoint in `(cursor, key)`
/// order, at most `batch_size` of them; a full batch is followed at once by
/// the next one, otherwise the next poll comes after `interval`. Rows whose
/// cursor or key is NULL are never read.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlPollSourceConfig {
    /// `postgresql://user@host:5432/db`, `mysql://user:password@host:3306/db`
    /// (MariaDB too), or `sqlite:path/to/file.db` (relative to the config
    /// file's folder). Use `${ENV}` for credentials.
    pub url: Secret,
    /// Table (or view) to read, optionally schema-qualified: every column.
    pub table: Option<String>,
    /// Custom `SELECT` instead of `table`. It must contain `{checkpoint}`
    /// where the condition "after the last row read" goes (in a `WHERE`),
    /// and `{limit}` (the batch size), and must `ORDER BY <cursor>, <key>`.
    /// `cursor` and `key` must be plain columns of its output and usable
    /// unqualified in the `WHERE` (wrap a join in a subquery or CTE), e.g.
    /// `SELECT * FROM (SELECT o.id, o.updated_at, c.name FROM orders o JOIN
    /// customers c ON c.id = o.customer_id) q WHERE {checkpoint}
    /// ORDER BY updated_at, id LIMIT {limit}`.
    #[schemars(with = "Option<String>")]
    pub query: Option<Spanned<String>>,
    /// Name used in event ids (`<name>:<key>@<cursor>#<hash8>`); default the
    /// table's name; required with `query`.
    pub name: Option<String>,
    /// Column that grows when a row is inserted or changed, e.g.
    /// `updated_at` or a sequence.
    pub cursor: String,
    /// Unique column that orders rows sharing one cursor value, e.g. `id`.
    pub key: String,
    /// Time between polls when the last one was not full (default `5s`).
    #[schemars(with = "Option<String>")]
    pub interval: Option<Spanned<String>>,
    /// Rows per query and per store commit (default 500).
    pub batch_size: Option<usize>,
    /// CloudEvents `type` of the events (default `<system>.row`).
    pub event_type: Option<String>,
    /// Read only rows whose cursor is older than this on the database's
    /// clock (default `5s`), so a transaction that commits within it is not
    /// overtaken by later rows. Timestamp and date cursors only
    /// (PostgreSQL, MariaDB/MySQL); `0s` turns it off.
    #[schemars(with = "Option<String>")]
    pub settle: Option<Spanned<String>>,
    /// Each poll first re-reads the rows up to this far behind the saved
    /// cursor (default `1m`): rows that committed late and rows changed
    /// within one cursor value come back as new events, unchanged ones are
    /// duplicates. Timestamp and date cursors only (PostgreSQL,
    /// MariaDB/MySQL); `0s` turns it off.
    #[schemars(with = "Option<String>")]
    pub overlap: Option<Spanned<String>>,
}

/// MariaDB/MySQL sink settings.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MysqlSinkConfig {
    /// Connection string, e.g. `mysql://user:password@host:3306/db` (use `${ENV}`).
    pub url: Secret,
    /// Table to upsert into, optionally `database.table`.
    pub table: String,
    /// Key columns of the upsert (a primary or unique key on exactly them must exist).
    pub key: Vec<String>,
    /// Columns to write with their types (`varchar(100)`, `text`, `bigint`,
    /// `int`, `decimal(12,2)`, `double`, `boolean`, `datetime`, `timestamp`,
    /// `date`, `json`, ...).
    pub columns: BTreeMap<String, String>,
    /// `ON DUPLICATE KEY UPDATE` updates the row matching *any* unique index,
    /// so a table with unique indexes other than the key (an `email`) is
    /// refused at start: two records would merge into one row. `true`
    /// accepts it (with a warning). An unwritten `AUTO_INCREMENT` primary
    /// key does not count.
    #[serde(default)]
    pub allow_other_unique: bool,
}

// ---------------------------------------------------------------------------
// Connectors that own their config
// ---------------------------------------------------------------------------

/// The settings of a connector that parses and validates its own config in
/// weft-connectors (which weft-core cannot depend on): the YAML as written,
/// `${ENV}` interpolated, as JSON. `weft validate` and `weft run` have the
/// connector check it (`weft_connectors::check`), so its problems are
/// reported with line and column like every other. Never printed: it may
/// hold credentials.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct ConnectorSettings(pub serde_json::Value);

impl JsonSchema for ConnectorSettings {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ConnectorSettings".into()
    }
    // the connector checks the fields (with lines) at `weft validate`
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "description": "The connector's own settings, checked by the connector at `weft validate`. postgres_cdc: url, tables, publication, slot, snapshot (initial|never), on_slot_lost (fail|resnapshot), batch_size, heartbeat, event_type, events (per_row|per_transaction), max_transaction_changes (1..1000000, default 10000). mysql_cdc: url, tables, server_id, snapshot (initial|never), on_position_lost (fail|resnapshot), batch_size, heartbeat, event_type, events (per_row|per_transaction), max_transaction_changes (1..1000000, default 10000). nats source: url, stream, subject|subjects, consumer, create, start (all|new), batch, max_wait, ack_wait, max_deliver, max_ack_pending, format (json | avro | protobuf), max_message_bytes, event_id (auto|position), event_type, token, connect_timeout. nats sink: url, subject (with {key} and {field} placeholders), headers, event_type, event_source, timeout, connect_timeout, token, check_stream, format (json | avro | protobuf). amqp source: url, queue, exchange, routing_key, declare, prefetch, batch, format (json | avro | protobuf), max_message_bytes, event_id (auto|content), event_type, connect_timeout. amqp sink: url, exchange, routing_key (with {key} and {field} placeholders), mandatory, persistent, headers, event_type, event_source, timeout, connect_timeout, format. redis source: url, stream, group, consumer, create, start (all|new), batch, block, claim_idle, field, format (json | avro | protobuf), max_message_bytes, event_id (auto|position), event_type, connect_timeout. redis sink: url, stream, maxlen, field, fields, event_type, event_source, dedupe_ttl, dedupe_prefix, timeout, connect_timeout, format. mqtt source: url (mqtt://user:password@host:port), topics, qos (1), client_id, session_expiry, batch, receive_maximum, format (json | avro | protobuf), max_message_bytes, event_id (auto|content|{field: .path}), event_type, connect_timeout, keep_alive. mqtt sink: url, topic (with {key} and {field} placeholders), qos (1), retain, client_id, user_properties, event_type, event_source, timeout, connect_timeout, keep_alive, format. kafka source: brokers (host:port,...), topics, group, offsets (store|group), start (earliest|latest), batch, max_message_bytes, format (json | avro | protobuf), event_id (auto|position), event_type, connect_timeout, session_timeout. kafka sink: brokers, topic (with {key} and {field} placeholders), headers, event_type, event_source, max_message_bytes, timeout, connect_timeout, format. Every broker source and sink takes format: json | {avro: {schema, confluent, schema_id}} | {protobuf: {schema (a .proto file, relative to the config file), message (fully qualified), confluent, schema_id, allow_unknown_fields}}."
        })
    }
}

impl std::fmt::Debug for ConnectorSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectorSettings(***)")
    }
}
