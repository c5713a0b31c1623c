//! The source contract, the ingest interface sources call, and the source
//! registry.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use weft_core::Event;
use weft_core::config::SourceSpec;

/// A record that could not be parsed; it is stored in the DLQ with the
/// reason and where it came from, never dropped.
#[derive(Debug, Clone)]
pub struct BadRecord {
    /// Stable id, like a good record's (e.g. file hash and line).
    pub id: String,
    /// Where: `file orders.csv line 17`, `POST /hooks/crm`.
    pub location: String,
    /// The raw text as received (lossy UTF-8).
    pub raw: String,
    /// Why it could not be read.
    pub error: String,
    pub correlation_id: String,
}

/// One record from a source.
#[derive(Debug, Clone)]
pub enum Record {
    Good(Event),
    Bad(BadRecord),
}

/// Source position saved in the same transaction as a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub key: String,
    pub value: String,
}

/// Records plus the position after them.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    pub checkpoint: Option<Checkpoint>,
}

/// What `ingest` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Receipt {
    /// Records stored for the first time.
    pub accepted: usize,
    /// Records whose id was already in the inbox (acknowledged, not stored again).
    pub duplicates: usize,
}

/// Why a batch was not accepted; nothing of it was stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The backlog is over its high-water mark, or the hub is stopping: try later.
    #[error("not accepting now: {0}")]
    Unavailable(String),
    /// The store failed.
    #[error("store error: {0}")]
    Store(String),
    /// The records break a contract whose flow says `on_violation: reject`.
    #[error("rejected: {0}")]
    Rejected(String),
}

/// The runtime's door for sources.
///
/// Contract: when `ingest` returns `Ok`, every record of the batch is durably
/// in the store (its flows' outbox rows and DLQ entries too) and the
/// checkpoint is saved in the same transaction; when it returns `Err`,
/// nothing of the batch is stored. Records whose `(source, id)` is already
/// in the inbox are counted as duplicates and not stored twice. Safe to call
/// concurrently.
///
/// `ingest` is `prepare` then `commit`. A source that keeps one batch ahead
/// (the file source) prepares its next batch while the one before it
/// commits, and commits strictly in order, each only after the commit
/// before it returned `Ok` (a failed commit drops what was prepared after
/// it): `prepare` writes nothing, so the order of what is stored, and of
/// checkpoints, is the order of the commits.
pub trait Ingest: Send + Sync {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>>;
    /// Read back a checkpoint saved with an earlier batch.
    fn checkpoint(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>>;

    /// What `ingest` does before anything is written (parsing, mapping,
    /// checks), for [`Ingest::commit`]. Default: nothing, the batch as it is.
    fn prepare(&self, batch: Batch) -> BoxFuture<'_, Result<Staged, IngestError>> {
        Box::pin(async move { Ok(Staged::new(batch)) })
    }

    /// The rest of `ingest` for a prepared batch: the same contract as
    /// `ingest`. Default: `ingest` of a batch `prepare` left as it was.
    fn commit(&self, staged: Staged) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            match staged.take::<Batch>() {
                Ok(b) => self.ingest(b).await,
                Err(_) => Err(IngestError::Store(
                    "a batch prepared by another kind of ingest".into(),
                )),
            }
        })
    }
}

/// A batch [`Ingest::prepare`] made ready for [`Ingest::commit`] on the
/// same `Ingest`: whatever that implementation keeps between the two.
pub struct Staged(Box<dyn std::any::Any + Send>);

impl Staged {
    pub fn new<T: std::any::Any + Send>(t: T) -> Self {
        Staged(Box::new(t))
    }

    /// What was kept, when it is a `T`; else the staged batch back.
    pub fn take<T: std::any::Any>(self) -> Result<T, Staged> {
        match self.0.downcast::<T>() {
            Ok(t) => Ok(*t),
            Err(other) => Err(Staged(other)),
        }
    }
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Staged(..)")
    }
}

/// A source that failed in a way it cannot recover from by itself.
#[derive(Debug, thiserror::Error)]
#[error("source `{system}`: {message}")]
pub struct SourceError {
    pub system: String,
    pub message: String,
}

/// A source that runs as its own task (file, generate, polling, CDC).
///
/// Contract: `run` reads, calls `ingest`, and advances its position only
/// after `ingest` returned `Ok`. It returns `Ok(())` when it has no more to
/// read (a finite source: one file, a counted generator) or when `shutdown`
/// is cancelled; it must stop promptly on cancellation without losing
/// anything (whatever was not ingested is read again next start).
pub trait Source: Send {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// How a source attaches to the runtime.
pub enum SourceHandle {
    /// A task the runtime spawns.
    Task(Box<dyn Source>),
    /// Routes the runtime mounts on its HTTP server (webhooks).
    Routes(crate::webhook::WebhookRoute),
}

/// The source registry: one arm per connector.
pub fn build_source(system: &str, spec: &SourceSpec) -> Result<SourceHandle, SourceError> {
    Ok(match spec {
        SourceSpec::Webhook { .. } => {
            SourceHandle::Routes(crate::webhook::WebhookRoute::new(system, spec)?)
        }
        SourceSpec::File { .. } => {
            SourceHandle::Task(Box::new(crate::file::FileSource::new(system, spec)?))
        }
        SourceSpec::Generate { .. } => SourceHandle::Task(Box::new(
            crate::generate::GenerateSource::new(system, spec)?,
        )),
        SourceSpec::Rest { .. } => {
            SourceHandle::Task(Box::new(crate::rest::RestSource::new(system, spec)?))
        }
        SourceSpec::SqlPoll { .. } => {
            SourceHandle::Task(Box::new(crate::sql_poll::SqlPollSource::new(system, spec)?))
        }
        SourceSpec::PostgresCdc { settings } => postgres_cdc(system, settings)?,
        SourceSpec::MysqlCdc { settings } => mysql_cdc(system, settings)?,
        SourceSpec::Nats { settings } => nats(system, settings)?,
        SourceSpec::Amqp { settings } => amqp(system, settings)?,
        SourceSpec::Redis { settings } => redis(system, settings)?,
        SourceSpec::Mqtt { settings } => mqtt(system, settings)?,
        SourceSpec::Kafka { settings } => kafka(system, settings)?,
    })
}

#[cfg(feature = "cdc-postgres")]
fn postgres_cdc(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    let cfg =
        crate::cdc::postgres::PgCdcConfig::from_settings(system, settings).map_err(|issues| {
            SourceError {
                system: system.to_owned(),
                message: crate::cdc::postgres::config::describe(&issues),
            }
        })?;
    Ok(SourceHandle::Task(Box::new(
        crate::cdc::postgres::PgCdcSource::new(system, cfg),
    )))
}

#[cfg(not(feature = "cdc-postgres"))]
fn postgres_cdc(
    system: &str,
    _: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    Err(SourceError {
        system: system.to_owned(),
        message: crate::without_feature("cdc-postgres", "PostgreSQL change data capture"),
    })
}

#[cfg(feature = "cdc-mysql")]
fn mysql_cdc(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    let cfg =
        crate::cdc::mysql::MyCdcConfig::from_settings(system, settings).map_err(|issues| {
            SourceError {
                system: system.to_owned(),
                message: crate::cdc::mysql::config::describe(&issues),
            }
        })?;
    Ok(SourceHandle::Task(Box::new(
        crate::cdc::mysql::MyCdcSource::new(system, cfg),
    )))
}

#[cfg(not(feature = "cdc-mysql"))]
fn mysql_cdc(
    system: &str,
    _: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    Err(SourceError {
        system: system.to_owned(),
        message: crate::without_feature("cdc-mysql", "MariaDB/MySQL change data capture"),
    })
}

#[cfg(feature = "nats")]
fn nats(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    use crate::broker::nats;
    let cfg =
        nats::NatsSourceConfig::from_settings(system, settings).map_err(|issues| SourceError {
            system: system.to_owned(),
            message: nats::config::describe(&issues),
        })?;
    Ok(SourceHandle::Task(Box::new(nats::NatsSource::new(
        system, cfg,
    ))))
}

#[cfg(not(feature = "nats"))]
fn nats(
    system: &str,
    _: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    Err(SourceError {
        system: system.to_owned(),
        message: crate::without_feature("nats", "NATS JetStream"),
    })
}

#[cfg(feature = "amqp")]
fn amqp(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    use crate::broker::amqp;
    let cfg =
        amqp::AmqpSourceConfig::from_settings(system, settings).map_err(|issues| SourceError {
            system: system.to_owned(),
            message: amqp::config::describe(&issues),
        })?;
    Ok(SourceHandle::Task(Box::new(amqp::AmqpSource::new(
        system, cfg,
    ))))
}

#[cfg(not(feature = "amqp"))]
fn amqp(
    system: &str,
    _: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    Err(SourceError {
        system: system.to_owned(),
        message: crate::without_feature("amqp", "RabbitMQ (AMQP)"),
    })
}

#[cfg(feature = "redis")]
fn redis(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    use crate::broker::redis;
    let cfg = redis::RedisSourceConfig::from_settings(system, settings).map_err(|issues| {
        SourceError {
            system: system.to_owned(),
            message: redis::config::describe(&issues),
        }
    })?;
    Ok(SourceHandle::Task(Box::new(redis::RedisSource::new(
        system, cfg,
    ))))
}

#[cfg(not(feature = "redis"))]
fn redis(
    system: &str,
    _settings: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    Err(SourceError {
        system: system.to_owned(),
        message: crate::without_feature("redis", "Redis Streams"),
    })
}

#[cfg(feature = "mqtt")]
fn mqtt(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    use crate::broker::mqtt;
    let cfg =
        mqtt::MqttSourceConfig::from_settings(system, settings).map_err(|issues| SourceError {
            system: system.to_owned(),
            message: mqtt::config::describe(&issues),
        })?;
    Ok(SourceHandle::Task(Box::new(mqtt::MqttSource::new(
        system, cfg,
    ))))
}

#[cfg(not(feature = "mqtt"))]
fn mqtt(
    system: &str,
    _: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    Err(SourceError {
        system: system.to_owned(),
        message: crate::without_feature("mqtt", "MQTT"),
    })
}

#[cfg(feature = "kafka")]
fn kafka(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    use crate::broker::kafka;
    let cfg = kafka::KafkaSourceConfig::from_settings(system, settings).map_err(|issues| {
        SourceError {
            system: system.to_owned(),
            message: kafka::config::describe(&issues),
        }
    })?;
    Ok(SourceHandle::Task(Box::new(kafka::KafkaSource::new(
        system, cfg,
    ))))
}

#[cfg(not(feature = "kafka"))]
fn kafka(
    system: &str,
    _: &weft_core::config::raw::ConnectorSettings,
) -> Result<SourceHandle, SourceError> {
    Err(SourceError {
        system: system.to_owned(),
        message: crate::without_feature("kafka", "Kafka"),
    })
}

/// JSON text with object keys sorted and no whitespace, independent of how
/// the sender formatted it or of serde_json's map ordering: what the webhook
/// and REST sources hash into an event id when the record has none.
pub(crate) fn canonical_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<(&String, &serde_json::Value)> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(v, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}
