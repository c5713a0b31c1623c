//! The sink contract and the sink registry.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use weft_core::ErrorKind;
use weft_core::config::SinkSpec;

/// One message to write to a destination.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Outbox id (unique, increasing in acceptance order).
    pub id: i64,
    /// The same on every attempt of this message to this destination, also
    /// across restarts: pass it to the destination so it can deduplicate.
    pub idempotency_key: String,
    pub correlation_id: String,
    /// The id of the event that caused this write (`x-causation-id`).
    pub event_id: String,
    /// Entity key, when the flow defines one.
    pub entity_key: Option<String>,
    /// 1 on the first attempt.
    pub attempt: u32,
    /// The mapped payload.
    pub payload: serde_json::Value,
    /// Where it came from, for sinks that pass it on (a broker's
    /// CloudEvents headers); empty in tests that do not need it.
    pub context: DeliveryContext,
}

/// Where a delivery came from.
#[derive(Debug, Clone, Default)]
pub struct DeliveryContext {
    /// The flow that routed it.
    pub flow: String,
    /// The source system it was read from.
    pub source: String,
    /// The event's own time, ms since the epoch (0: unknown).
    pub event_time_ms: i64,
    /// W3C trace context of the event, when it came with one.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Why one delivery failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// Retry or dead-letter.
    pub kind: ErrorKind,
    /// What happened, for the DLQ and logs; never the payload or a secret.
    pub message: String,
    /// When the destination said when to come back (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// The HTTP status the destination answered, for an HTTP failure
    /// (the delivery attempt's span carries it).
    pub status: Option<u16>,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SinkError {
    pub fn retryable(message: impl Into<String>) -> Self {
        SinkError {
            kind: ErrorKind::Retryable,
            message: message.into(),
            retry_after: None,
            status: None,
            source: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError {
            kind: ErrorKind::Permanent,
            message: message.into(),
            retry_after: None,
            status: None,
            source: None,
        }
    }
    /// An error of the same kind and message (for every delivery a shared
    /// failure touched).
    pub fn like(kind: ErrorKind, message: &str) -> Self {
        SinkError {
            kind,
            message: message.to_owned(),
            retry_after: None,
            status: None,
            source: None,
        }
    }
    pub fn with_source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(e));
        self
    }
}

/// What the destination did with one delivery, kept with its delivered
/// state in the same transaction (the crosswalk: identity, echo
/// suppression, sagas build on it). Empty when the sink learns nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// The id the destination gave the record (HTTP `capture_id`).
    pub external_id: Option<String>,
    /// The version the destination now holds (an ETag, a row version).
    pub version: Option<String>,
    /// A fingerprint of the fields written.
    pub fingerprint: Option<String>,
    /// The HTTP status the destination answered (the attempt trail keeps
    /// it; not part of what the sink learns: [`Sink::learns_nothing`]).
    pub status: Option<u16>,
}

impl Written {
    /// Nothing learned: no id, version or fingerprint to keep (a status
    /// does not count).
    pub fn is_empty(&self) -> bool {
        self.external_id.is_none() && self.version.is_none() && self.fingerprint.is_none()
    }
}

/// One delivery's result.
pub type WriteResult = Result<Written, SinkError>;

/// Results of a sink that learns nothing from a write.
pub fn nothing_learned(v: Vec<Result<(), SinkError>>) -> Vec<WriteResult> {
    v.into_iter()
        .map(|r| r.map(|()| Written::default()))
        .collect()
}

/// A destination weft writes to.
///
/// Contract:
/// - **At least once.** A delivery may be written again after a retry or a
///   crash, always with the same `idempotency_key`; the sink must make the
///   repeat harmless (upsert on a key, an idempotency header, ...).
/// - **Results.** `write` returns exactly one result per delivery, in the
///   batch's order. `Ok` means the destination has the data durably (a
///   committed transaction, a 2xx, a synced file); its [`Written`] (the id
///   the destination gave, a version) is committed with the delivered state,
///   so it is never lost once the row counts as delivered. Too few results
///   count as retryable failures for the rest; a panic or a write that runs
///   past [`Sink::max_write_time`] as a retryable failure of the whole batch.
/// - **Order and concurrency.** `write` may be called concurrently up to the
///   destination's configured concurrency. The journal never hands out two
///   rows of one (destination, entity key) at once, so two deliveries of one
///   key are never in flight in different calls. Within one batch, several
///   deliveries of one key appear only when [`Sink::folds_keys`] is true: in
///   order, and the sink writes them so that the last one wins, with one
///   shared result.
///
/// [`Sink::flush`] is called once on shutdown, after the last `write`
/// returned: a sink that stages its output (a `.part` file) makes it final
/// there. Nothing acknowledged may depend on it: data is durable when
/// `write` returns.
pub trait Sink: Send + Sync {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>>;

    /// Make staged output final (close a rotating file). Default: nothing.
    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether a batch may hold several deliveries of one key, written so
    /// that the last wins with one result for all (an upsert folding rows
    /// by key). Default: no, one delivery per key per batch.
    fn folds_keys(&self) -> bool {
        false
    }

    /// Whether every [`Written`] this sink returns is empty (no id, version
    /// or fingerprint): a write needs nothing recorded but its count, so a
    /// replayable source's keyless rows may be written before their ingest
    /// commits (the Ingestor's direct path). Default: no.
    fn learns_nothing(&self) -> bool {
        false
    }

    /// The longest one `write` of `batch_len` deliveries may take; past it
    /// the runtime gives up on it (retryable), so a hanging destination
    /// cannot hold its keys or the breaker's half-open probe.
    fn max_write_time(&self, batch_len: usize) -> Duration {
        let _ = batch_len;
        Duration::from_secs(120)
    }
}

/// A sink that could not be built (bad path, unreachable database at start).
#[derive(Debug, thiserror::Error)]
#[error("cannot start sink `{system}`: {message}")]
pub struct BuildError {
    pub system: String,
    pub message: String,
}

/// A sink as built at start.
pub struct BuiltSink {
    pub sink: Arc<dyn Sink>,
    /// The destination could not be reached at start (why, naming host and
    /// port): the sink connects when it writes; the runtime starts its
    /// lanes with the breaker open.
    pub down: Option<String>,
}

/// The sink registry: one arm per connector. A destination that cannot be
/// reached is not a build error (see [`BuiltSink::down`]); a config the
/// destination refuses (a missing table, a key without a unique index) is.
pub async fn build_sink(system: &str, spec: &SinkSpec) -> Result<BuiltSink, BuildError> {
    let err = |message: String| BuildError {
        system: system.to_owned(),
        message,
    };
    let mut down = None;
    let sink: Arc<dyn Sink> = match spec {
        SinkSpec::Http {
            cfg,
            method,
            timeout,
            connect_timeout,
        } => Arc::new(
            crate::http::HttpSink::new(cfg, method, *timeout, *connect_timeout).map_err(err)?,
        ),
        SinkSpec::Sqlite { cfg, path } => {
            Arc::new(crate::sqlite::SqliteSink::open(cfg, path).map_err(err)?)
        }
        #[cfg(feature = "postgres")]
        SinkSpec::Postgres { cfg } => {
            let (sink, why) = crate::postgres::PostgresSink::connect_lazy(cfg)
                .await
                .map_err(err)?;
            down = why;
            Arc::new(sink)
        }
        SinkSpec::Jsonl { cfg, target } => {
            Arc::new(crate::export::JsonlSink::open(cfg, target).map_err(err)?)
        }
        SinkSpec::Csv {
            columns,
            delimiter,
            header,
            target,
            ..
        } => Arc::new(
            crate::export::CsvSink::open(columns.clone(), *delimiter, *header, target)
                .map_err(err)?,
        ),
        #[cfg(not(feature = "postgres"))]
        SinkSpec::Postgres { .. } => {
            return Err(err(crate::without_feature("postgres", "PostgreSQL")));
        }
        #[cfg(not(feature = "mysql"))]
        SinkSpec::Mysql { .. } => {
            return Err(err(crate::without_feature("mysql", "MariaDB/MySQL")));
        }
        #[cfg(feature = "mysql")]
        SinkSpec::Mysql { cfg } => {
            let (sink, why) = crate::mysql::MysqlSink::connect_lazy(cfg)
                .await
                .map_err(err)?;
            down = why;
            Arc::new(sink)
        }
        #[cfg(feature = "nats")]
        SinkSpec::Nats { settings } => {
            use crate::broker::nats;
            let cfg = nats::NatsSinkConfig::from_settings(system, settings)
                .map_err(|issues| err(nats::config::describe(&issues)))?;
            let (sink, why) = nats::NatsSink::connect(system, cfg).await.map_err(err)?;
            down = why;
            Arc::new(sink)
        }
        #[cfg(not(feature = "nats"))]
        SinkSpec::Nats { .. } => {
            return Err(err(crate::without_feature("nats", "NATS JetStream")));
        }
        #[cfg(feature = "amqp")]
        SinkSpec::Amqp { settings } => {
            use crate::broker::amqp;
            let cfg = amqp::AmqpSinkConfig::from_settings(system, settings)
                .map_err(|issues| err(amqp::config::describe(&issues)))?;
            let (sink, why) = amqp::AmqpSink::connect(system, cfg).await.map_err(err)?;
            down = why;
            Arc::new(sink)
        }
        #[cfg(not(feature = "amqp"))]
        SinkSpec::Amqp { .. } => {
            return Err(err(crate::without_feature("amqp", "RabbitMQ (AMQP)")));
        }
        #[cfg(feature = "redis")]
        SinkSpec::Redis { settings } => {
            use crate::broker::redis;
            let cfg = redis::RedisSinkConfig::from_settings(system, settings)
                .map_err(|issues| err(redis::config::describe(&issues)))?;
            let (sink, why) = redis::RedisSink::connect(system, cfg).await.map_err(err)?;
            down = why;
            Arc::new(sink)
        }
        #[cfg(not(feature = "redis"))]
        SinkSpec::Redis { .. } => {
            return Err(err(crate::without_feature("redis", "Redis Streams")));
        }
        #[cfg(feature = "mqtt")]
        SinkSpec::Mqtt { settings } => {
            use crate::broker::mqtt;
            let cfg = mqtt::MqttSinkConfig::from_settings(system, settings)
                .map_err(|issues| err(mqtt::config::describe(&issues)))?;
            let (sink, why) = mqtt::MqttSink::connect(system, cfg).await.map_err(err)?;
            down = why;
            Arc::new(sink)
        }
        #[cfg(not(feature = "mqtt"))]
        SinkSpec::Mqtt { .. } => {
            return Err(err(crate::without_feature("mqtt", "MQTT")));
        }
        #[cfg(feature = "kafka")]
        SinkSpec::Kafka { settings } => {
            use crate::broker::kafka;
            let cfg = kafka::KafkaSinkConfig::from_settings(system, settings)
                .map_err(|issues| err(kafka::config::describe(&issues)))?;
            let (sink, why) = kafka::KafkaSink::connect(system, cfg).await.map_err(err)?;
            down = why;
            Arc::new(sink)
        }
        #[cfg(not(feature = "kafka"))]
        SinkSpec::Kafka { .. } => {
            return Err(err(crate::without_feature("kafka", "Kafka")));
        }
    };
    Ok(BuiltSink { sink, down })
}

/// Same result for every delivery of a batch (a batch that failed as a whole).
pub fn all_failed(n: usize, f: impl Fn() -> SinkError) -> Vec<Result<(), SinkError>> {
    (0..n).map(|_| Err(f())).collect()
}

/// A batch of deliveries as table rows for an upsert sink: each payload
/// checked into a row (a bad one fails alone), and deliveries with the same
/// key folded into one row, the later payload winning (one statement cannot
/// upsert a key twice).
pub(crate) struct KeyedRows<R> {
    pub rows: Vec<R>,
    /// For each delivery, the row that carries it.
    owner: Vec<Option<usize>>,
    results: Vec<Option<Result<(), SinkError>>>,
}

impl<R> KeyedRows<R> {
    pub fn new<'a>(
        batch: &'a [Delivery],
        mut row: impl FnMut(&'a serde_json::Value) -> Result<R, SinkError>,
        key: impl Fn(&R) -> Vec<String>,
    ) -> Self {
        let mut out = KeyedRows {
            rows: Vec::with_capacity(batch.len()),
            owner: vec![None; batch.len()],
            results: (0..batch.len()).map(|_| None).collect(),
        };
        // foldhash: seeded per process like std's, several times faster on
        // short keys
        let mut by_key: foldhash::HashMap<Vec<String>, usize> =
            foldhash::HashMap::with_capacity_and_hasher(batch.len(), Default::default());
        for (i, d) in batch.iter().enumerate() {
            match row(&d.payload) {
                Ok(r) => match by_key.entry(key(&r)) {
                    std::collections::hash_map::Entry::Occupied(e) => {
                        out.rows[*e.get()] = r;
                        out.owner[i] = Some(*e.get());
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(out.rows.len());
                        out.owner[i] = Some(out.rows.len());
                        out.rows.push(r);
                    }
                },
                Err(e) => out.results[i] = Some(Err(e)),
            }
        }
        out
    }

    /// One result per delivery, given one result per row.
    pub fn results(mut self, written: &[Result<(), SinkError>]) -> Vec<Result<(), SinkError>> {
        for (i, o) in self.owner.iter().enumerate() {
            if let Some(r) = o {
                self.results[i] = Some(match written.get(*r) {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(SinkError::like(e.kind, &e.message)),
                    None => Err(SinkError::retryable("delivery was not written")),
                });
            }
        }
        self.results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(SinkError::retryable("delivery was not written"))))
            .collect()
    }
}

/// What kind of JSON value `v` is, for error messages ("a string").
pub(crate) fn kind_of(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A short description of a value for error messages: its kind, and for a
/// short scalar the value itself (never a whole object).
pub(crate) fn describe(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::String(s) if s.chars().count() <= 40 => format!("the string {v}"),
        Value::Number(_) | Value::Bool(_) => format!("{} ({v})", kind_of(v)),
        _ => kind_of(v).to_owned(),
    }
}
