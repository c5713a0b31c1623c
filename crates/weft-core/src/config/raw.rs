//! The config file as written: serde structs that reject unknown keys.
//!
//! Nothing here does I/O or checks references between sections; that is
//! [`super::validate`]'s job. Every field has a doc comment: it is the
//! reference documentation of the YAML format.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::Secret;

/// The whole config file.
#[derive(Debug, Deserialize)]
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
    /// Canonical entities, by name: their JSON Schema contracts (see [`RawEntity`]).
    #[serde(default)]
    pub entities: BTreeMap<String, RawEntity>,
    /// Value maps for enums, by name, used in mappings as `valuemap("name")`
    /// (see [`RawValueMap`]).
    #[serde(default)]
    pub value_maps: BTreeMap<String, Spanned<RawValueMap>>,
}

/// Store settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Path of the SQLite database file, relative to the config file's folder
    /// (default `weft-data/weft.db`).
    pub path: Option<String>,
    /// `full` (default): every commit is fsynced before a source is
    /// acknowledged, so an accepted event survives a power loss. `normal`:
    /// survives a crash of weft but may lose the last commits on power loss.
    pub synchronous: Option<Synchronous>,
}

/// SQLite's `synchronous` setting as exposed to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
}

/// HTTP server settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Address to listen on (default `127.0.0.1:8080`).
    pub listen: Option<String>,
    /// Bearer token required by the admin API; unset disables the admin API.
    pub admin_token: Option<Secret>,
}

/// Defaults applied to every flow.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    /// Default delivery policy.
    #[serde(default)]
    pub delivery: RawDelivery,
}

/// One business system.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSystem {
    /// Free text shown in `weft status`.
    pub description: Option<String>,
    /// How weft reads from this system (one connector).
    pub source: Option<RawSource>,
    /// How weft writes to this system (one connector).
    pub sink: Option<RawSink>,
}

/// A source connector, named by its single key.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSource {
    /// The system calls us: HTTP POSTs to a path of weft's server.
    Webhook(WebhookSourceConfig),
    /// The system drops files (CSV, JSON Lines) into a folder, or weft reads one file.
    File(FileSourceConfig),
    /// Synthetic records for demos and benchmarks.
    Generate(GenerateSourceConfig),
}

/// A sink connector, named by its single key.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSink {
    /// HTTP requests to the system's API.
    Http(HttpSinkConfig),
    /// Upserts into a SQLite table.
    Sqlite(SqliteSinkConfig),
    /// Upserts into a PostgreSQL table.
    Postgres(PostgresSinkConfig),
    /// Appends to a JSON Lines file.
    Jsonl(JsonlSinkConfig),
}

/// Webhook source settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSourceConfig {
    /// Path on weft's server, e.g. `/hooks/crm`.
    pub path: String,
    /// Shared secret for the HMAC-SHA256 signature; unset accepts unsigned requests.
    pub secret: Option<Secret>,
    /// Header that carries the hex HMAC-SHA256 of the raw body, optionally
    /// prefixed `sha256=` (default `x-signature-256`).
    pub signature_header: Option<String>,
    /// Largest accepted body in bytes (default 1 MiB); larger gets 413.
    pub max_body_bytes: Option<usize>,
    /// Header carrying the sender's event id, used to deduplicate retries
    /// (default `x-event-id`). Without it, `id_field` is tried, then the
    /// SHA-256 of the body.
    pub id_header: Option<String>,
    /// jq path into the body giving the event id, e.g. `.id`.
    pub id_field: Option<Spanned<String>>,
    /// CloudEvents `type` of the events (default `<system>.webhook`).
    pub event_type: Option<String>,
}

/// File source settings: exactly one of `dir` and `path`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Drop folder: files appearing here are read once, then moved to
    /// `processed/` (or `quarantine/` with an error report).
    pub dir: Option<String>,
    /// A single file read once in place (not moved); for batch loads.
    pub path: Option<String>,
    /// `csv` or `jsonl`; default from each file's extension.
    pub format: Option<FileFormat>,
    /// Only names matching this glob-like suffix are read (default: `.csv`, `.jsonl`, `.ndjson`).
    pub pattern: Option<String>,
    /// CSV delimiter (default `,`).
    pub delimiter: Option<char>,
    /// How often to look for new files (default `1s`).
    pub poll_interval: Option<Spanned<String>>,
    /// Records per store commit (default 1000).
    pub batch_size: Option<usize>,
    /// jq path giving each record's id; default: the file's content hash and line number.
    pub id_field: Option<Spanned<String>>,
    /// CloudEvents `type` of the events (default `<system>.file`).
    pub event_type: Option<String>,
}

/// File formats the file source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Csv,
    Jsonl,
}

/// Generate source settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateSourceConfig {
    /// jq program producing each record; `$seq` is its sequence number (from 1).
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// URL; `{field}` or `{a.b}` placeholders are filled (percent-encoded) from the payload.
    pub url: String,
    /// `POST` (default), `PUT` or `PATCH`.
    pub method: Option<String>,
    /// Extra headers; values may use `${ENV}` secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Request timeout (default `10s`).
    pub timeout: Option<Spanned<String>>,
    /// Connect timeout (default `5s`).
    pub connect_timeout: Option<Spanned<String>>,
}

/// SQLite sink settings.
#[derive(Debug, Clone, Deserialize)]
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
}

/// PostgreSQL sink settings.
#[derive(Debug, Clone, Deserialize)]
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
}

/// JSON Lines sink settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlSinkConfig {
    /// Output file, relative to the config file's folder.
    pub path: String,
    /// Write `{id, idempotency_key, correlation_id, data}` instead of the bare payload.
    #[serde(default)]
    pub envelope: bool,
}

/// One flow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlow {
    /// The system whose source feeds this flow.
    pub from: Spanned<String>,
    /// jq predicate; records for which it is false or null are counted as filtered.
    pub filter: Option<Spanned<String>>,
    /// jq program giving the entity key (deliveries with one key keep their
    /// order); default: no ordering constraint.
    pub key: Option<Spanned<String>>,
    /// jq program from the source payload to the destination payload (default `.`).
    pub mapping: Option<Spanned<String>>,
    /// Destinations: system names, or `{system, mapping, delivery}`.
    pub to: Vec<Spanned<RawDestination>>,
    /// Delivery policy for every destination of this flow.
    pub delivery: Option<RawDelivery>,
    /// The canonical entity (a key of `entities`) that the flow's mapping
    /// produces; its contract is checked after the mapping.
    pub entity: Option<Spanned<String>>,
    /// What a contract violation does: `dead_letter` (default), `reject`
    /// (webhook sources answer 422) or `warn` (delivered, logged, counted).
    pub on_violation: Option<OnViolation>,
    /// What a record whose shape drifted does: `record` (default: the drift
    /// is recorded, the record flows) or `quarantine` (dead-lettered).
    pub on_drift: Option<OnDrift>,
}

/// A destination of a flow: a system name or a map with options.
#[derive(Debug)]
// parsed once per destination at load: the size difference does not matter
#[allow(clippy::large_enum_variant)]
pub enum RawDestination {
    /// Just a system name.
    Name(String),
    /// A system with its own mapping or delivery policy.
    Full(RawDestinationFull),
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
                    .map(RawDestination::Full)
            }
        }
        d.deserialize_any(V)
    }
}

/// A destination with options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestinationFull {
    /// The system written to (it must have a `sink`).
    pub system: String,
    /// jq program applied after the flow's mapping, for this destination only.
    pub mapping: Option<Spanned<String>>,
    /// Delivery policy overriding the flow's.
    pub delivery: Option<RawDelivery>,
    /// JSON Schema file (relative to the config file) the payload for this
    /// destination must satisfy before it is written.
    pub contract: Option<Spanned<String>>,
}

/// Delivery policy; unset fields fall back to the flow, then the defaults.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    /// Attempts before a message goes to the DLQ (default 8).
    pub max_attempts: Option<u32>,
    /// First retry delay (default `200ms`).
    pub initial_backoff: Option<Spanned<String>>,
    /// Longest retry delay (default `60s`).
    pub max_backoff: Option<Spanned<String>>,
    /// Growth of the delay per attempt (default 2.0); full jitter is applied.
    pub multiplier: Option<f64>,
    /// Writes in flight at once, across entity keys (default 8 for HTTP, 1 for databases and files).
    pub concurrency: Option<usize>,
    /// Messages per write for sinks that batch (default 500; HTTP is always 1).
    pub batch_size: Option<usize>,
}

// ---- canonical entities, contracts and value maps ----

/// A canonical entity: the shape flows map into.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEntity {
    /// JSON Schema file of the current version (relative to the config file;
    /// draft 2020-12 unless the file's `$schema` says otherwise).
    pub contract: Spanned<String>,
    /// The contract's version number (shown in violations).
    pub version: Option<u32>,
    /// Older contract files still accepted: a record valid against any of
    /// them passes (a migration window).
    #[serde(default)]
    pub also_accept: Vec<Spanned<String>>,
    /// JSON pointers of sensitive fields (`/email`, `/tax_id`): their values
    /// are shown as `"***"` in violations, drift examples and logs.
    #[serde(default)]
    pub sensitive: Vec<Spanned<String>>,
}

/// What a contract violation does to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
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
#[derive(Debug, Deserialize)]
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawValueRule {
    /// jq predicate evaluated on the record given to `valuemap(name; value)`
    /// (or on the value itself with `valuemap(name)`).
    pub when: Spanned<String>,
    /// Target when `when` is true.
    pub then: serde_json::Value,
    /// Target otherwise (default: the map's `default`).
    #[serde(rename = "else")]
    pub otherwise: Option<serde_json::Value>,
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
