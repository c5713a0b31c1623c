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
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SinkError {
    pub fn retryable(message: impl Into<String>) -> Self {
        SinkError {
            kind: ErrorKind::Retryable,
            message: message.into(),
            retry_after: None,
            source: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError {
            kind: ErrorKind::Permanent,
            message: message.into(),
            retry_after: None,
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
            source: None,
        }
    }
    pub fn with_source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(e));
        self
    }
}

/// A destination weft writes to.
///
/// Contract:
/// - **At least once.** A delivery may be written again after a retry or a
///   crash, always with the same `idempotency_key`; the sink must make the
///   repeat harmless (upsert on a key, an idempotency header, ...).
/// - **Results.** `write` returns exactly one result per delivery, in the
///   batch's order. `Ok` means the destination has the data durably (a
///   committed transaction, a 2xx, a synced file).
/// - **Concurrency.** `write` may be called concurrently up to the
///   destination's configured concurrency; the runtime never puts two
///   deliveries with the same entity key in flight at once.
///
/// [`Sink::flush`] is called once on shutdown, after the last `write`
/// returned: a sink that stages its output (a `.part` file) makes it final
/// there. Nothing acknowledged may depend on it: data is durable when
/// `write` returns.
pub trait Sink: Send + Sync {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>>;

    /// Make staged output final (close a rotating file). Default: nothing.
    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    /// Ids the destination assigned to records written since the last call
    /// (the HTTP sink's `capture_id`), for the crosswalk. Default: none.
    fn take_captured(&self) -> Vec<crate::http::CapturedId> {
        Vec::new()
    }
}

/// A sink that could not be built (bad path, unreachable database at start).
#[derive(Debug, thiserror::Error)]
#[error("cannot start sink `{system}`: {message}")]
pub struct BuildError {
    pub system: String,
    pub message: String,
}

/// The sink registry: one arm per connector.
pub async fn build_sink(system: &str, spec: &SinkSpec) -> Result<Arc<dyn Sink>, BuildError> {
    let err = |message: String| BuildError {
        system: system.to_owned(),
        message,
    };
    Ok(match spec {
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
        SinkSpec::Postgres { cfg } => Arc::new(
            crate::postgres::PostgresSink::connect(cfg)
                .await
                .map_err(err)?,
        ),
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
        SinkSpec::Mysql { cfg } => {
            Arc::new(crate::mysql::MysqlSink::connect(cfg).await.map_err(err)?)
        }
    })
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
        let mut by_key: std::collections::HashMap<Vec<String>, usize> =
            std::collections::HashMap::with_capacity(batch.len());
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
