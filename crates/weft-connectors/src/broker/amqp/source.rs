//! The `amqp` source: a consumer on one RabbitMQ queue, manual acks.
//!
//! Contract (the broker contract of [`crate::broker`]): the messages that
//! arrive together (at least one, up to `batch`, until a 5 ms pause; the broker sends at most
//! `prefetch` unacknowledged) are handed to `ingest` as one batch, and
//! acknowledged (one `basic.ack` with `multiple`) only after `ingest`
//! returned `Ok`. A batch the store does not take (backpressure, a store
//! error) is held, unacknowledged, and offered again with backoff: it is
//! never nack'ed back into the queue to come round again. On shutdown a
//! held batch is nack'ed with `requeue` and comes back at the next start;
//! messages held by a weft that died are requeued by the broker when the
//! connection drops (`redelivered` set). RabbitMQ's `consumer_timeout`
//! (30 minutes by default) closes a channel that holds a message longer:
//! the source reconnects and the messages come again.
//!
//! Ids: AMQP has no stable position (a delivery tag is per channel and
//! starts again on every connection), so an event's id comes from the
//! message: `cloudEvents:id` (with `cloudEvents:source`; `cloudEvents_*`
//! and `ce-*` headers are read too), else the `message_id` property. A
//! message with neither goes to the DLQ with the reason (`event_id:
//! auto`), or is named by a hash of its exchange, routing key, timestamp
//! and body (`event_id: content`: identical messages without ids are then
//! one event). The journal drops an id it has (`Dedupe::Id`), so a
//! redelivered message is stored once.
//!
//! A lost connection or channel: the source connects again (backoff, up to
//! 30 s of failures in a row; then it stops and its supervisor reports it
//! down and starts it again). A queue that is missing with `declare:
//! false` stops it with the reason at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::config::{AmqpEventId, AmqpSourceConfig};
use crate::broker::{
    AMQP, AMQP_UNDERSCORE, Attributes, CORRELATION_HEADER, Decoder, EventId, Incoming, NATS,
};
use crate::source::{Batch, Ingest, Record, Source, SourceError};

/// A running `amqp` source.
pub struct AmqpSource {
    system: String,
    cfg: AmqpSourceConfig,
}

/// How long connecting may fail in a row before the source stops.
const FAILING_FOR: Duration = Duration::from_secs(30);

/// A batch is what arrives without a pause this long (or `batch`
/// messages): the broker streams deliveries, so a backlog fills batches
/// and a lone message waits no longer than this.
const GATHER: Duration = Duration::from_millis(5);

/// Why a consumer ended.
enum Ended {
    Shutdown,
    /// The connection or channel went away: connect again.
    Lost(String),
}

impl AmqpSource {
    pub fn new(system: &str, cfg: AmqpSourceConfig) -> Self {
        AmqpSource {
            system: system.to_owned(),
            cfg,
        }
    }

    fn err(&self, message: String) -> SourceError {
        SourceError {
            system: self.system.clone(),
            message,
        }
    }

    async fn run(
        self,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let decoder = Decoder {
            format: self.cfg.format.clone(),
            max_bytes: self.cfg.max_message_bytes,
            event_id: EventId::Auto,
            default_source: format!("weft:{}/amqp", self.system),
            default_type: self.cfg.event_type.clone(),
        };
        let at = super::config::where_(&self.cfg.url);
        let mut failing: Option<Instant> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            let setup = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                s = self.setup() => s,
            };
            let (conn, consumer) = match setup {
                Ok(x) => x,
                Err((fatal, why)) => {
                    if fatal {
                        return Err(self.err(why));
                    }
                    let since = *failing.get_or_insert_with(Instant::now);
                    if since.elapsed() > FAILING_FOR {
                        return Err(
                            self.err(format!("{why} (failing for {}s)", FAILING_FOR.as_secs()))
                        );
                    }
                    tracing::warn!(source = %self.system, error = %why, "RabbitMQ not ready; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            failing = None;
            pause = Duration::from_millis(100);
            tracing::info!(source = %self.system, queue = %self.cfg.queue, "consuming from RabbitMQ at {at}");
            let ended = self.consume(consumer, &decoder, &*ingest, &shutdown).await;
            match ended {
                Ended::Shutdown => {
                    // what is unacked goes back to the queue
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        conn.close(200, "weft stopping".into()),
                    )
                    .await;
                    return Ok(());
                }
                Ended::Lost(why) => {
                    tracing::warn!(source = %self.system, error = %why, "RabbitMQ connection lost; connecting again");
                    let _ = tokio::time::timeout(
                        Duration::from_millis(500),
                        conn.close(200, "reconnecting".into()),
                    )
                    .await;
                }
            }
        }
    }

    /// Connection, channel, queue (declared or checked), binding, consumer.
    /// An error is `(fatal, why)`: fatal when trying again cannot help.
    async fn setup(&self) -> Result<(lapin::Connection, lapin::Consumer), (bool, String)> {
        let c = &self.cfg;
        let conn = super::connect(
            &c.url,
            &format!("weft source {}", self.system),
            c.connect_timeout,
        )
        .await
        .map_err(|e| (false, e))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| (false, format!("cannot open a channel: {e}")))?;
        ch.basic_qos(c.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| (false, format!("basic.qos: {e}")))?;
        let declared = ch
            .queue_declare(
                c.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: !c.declare,
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if let Err(e) = declared {
            let fatal = super::sink::soft(&e).is_some();
            return Err((
                fatal,
                if c.declare {
                    format!(
                        "cannot declare queue `{}` (an existing queue with other settings?): {e}",
                        c.queue
                    )
                } else {
                    format!(
                        "queue `{}` does not exist (and `declare: false`): declare it, or let weft: {e}",
                        c.queue
                    )
                },
            ));
        }
        if let Some(x) = &c.exchange {
            ch.exchange_declare(
                x.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                (
                    super::sink::soft(&e).is_some(),
                    format!("exchange `{x}` to bind queue `{}` to: {e}", c.queue),
                )
            })?;
            ch.queue_bind(
                c.queue.as_str().into(),
                x.as_str().into(),
                c.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                (
                    false,
                    format!("cannot bind queue `{}` to `{x}`: {e}", c.queue),
                )
            })?;
        }
        let consumer = ch
            .basic_consume(
                c.queue.as_str().into(),
                format!("weft-{}", self.system).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| (false, format!("cannot consume queue `{}`: {e}", c.queue)))?;
        Ok((conn, consumer))
    }

    /// Hand batches over until shutdown or a lost connection.
    async fn consume(
        &self,
        mut consumer: lapin::Consumer,
        decoder: &Decoder,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Ended {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                d = consumer.next() => d,
            };
            let mut batch = match first {
                Some(Ok(d)) => vec![d],
                Some(Err(e)) => return Ended::Lost(e.to_string()),
                None => return Ended::Lost("the broker cancelled the consumer".into()),
            };
            // what arrives with it: until `batch` or a pause of `GATHER`
            let mut lost = None;
            while batch.len() < self.cfg.batch {
                match tokio::time::timeout(GATHER, consumer.next()).await {
                    Ok(Some(Ok(d))) => batch.push(d),
                    Ok(Some(Err(e))) => {
                        lost = Some(e.to_string());
                        break;
                    }
                    Ok(None) => {
                        lost = Some("the broker cancelled the consumer".into());
                        break;
                    }
                    Err(_) => break,
                }
            }
            if !self.hand_over(decoder, &batch, ingest, shutdown).await {
                return Ended::Shutdown;
            }
            if let Some(why) = lost {
                return Ended::Lost(why);
            }
        }
    }

    /// Ingest `msgs` as one batch, then ack them; `false` when the source
    /// is stopping with the batch not stored (it is nack'ed and requeued).
    async fn hand_over(
        &self,
        decoder: &Decoder,
        msgs: &[Delivery],
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut pause = Duration::from_millis(100);
        loop {
            let batch = Batch {
                records: msgs.iter().map(|m| self.record(decoder, m)).collect(),
                checkpoint: None,
            };
            match ingest.ingest(batch).await {
                Ok(r) => {
                    tracing::debug!(
                        source = %self.system, accepted = r.accepted, duplicates = r.duplicates,
                        "AMQP batch stored"
                    );
                    break;
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        nack_all(msgs).await;
                        return false;
                    }
                    tracing::warn!(
                        source = %self.system, error = %e, messages = msgs.len(),
                        "the store did not take the batch; holding the messages and trying again"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            nack_all(msgs).await;
                            return false;
                        }
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        // one ack for the batch: the deliveries of a channel are acked in
        // order, so `multiple` up to the last is exactly this batch
        if let Some(last) = msgs.last()
            && let Err(e) = last.acker.ack(BasicAckOptions { multiple: true }).await
        {
            // a lost ack means a redelivery, which the journal's dedupe drops
            tracing::warn!(source = %self.system, error = %e, "AMQP ack not sent; the messages will be redelivered");
        }
        true
    }

    /// One message as a record.
    fn record(&self, decoder: &Decoder, m: &Delivery) -> Record {
        let p = &m.properties;
        let empty = FieldTable::default();
        let headers = p.headers().as_ref().unwrap_or(&empty);
        let get = |name: &str| -> Option<String> {
            if name == AMQP.content_type {
                return p.content_type().as_ref().map(|c| c.as_str().to_owned());
            }
            let h = super::header_text(headers, name);
            if h.is_none() && name == CORRELATION_HEADER {
                return p.correlation_id().as_ref().map(|c| c.as_str().to_owned());
            }
            h
        };
        let attributes = Attributes::from_headers(AMQP, get)
            .or(Attributes::from_headers(AMQP_UNDERSCORE, get))
            .or(Attributes::from_headers(NATS, get));
        let message_id = p
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .filter(|s| !s.is_empty());
        let exchange = if m.exchange.as_str().is_empty() {
            "(default)"
        } else {
            m.exchange.as_str()
        };
        let location = match &message_id {
            Some(id) => format!(
                "amqp queue {} (exchange {exchange}, routing key {}, message_id {id})",
                self.cfg.queue, m.routing_key
            ),
            None => format!(
                "amqp queue {} (exchange {exchange}, routing key {})",
                self.cfg.queue, m.routing_key
            ),
        };
        let timestamp = p.timestamp().unwrap_or(0);
        let mut h = Sha256::new();
        h.update(m.exchange.as_str().as_bytes());
        h.update([0]);
        h.update(m.routing_key.as_str().as_bytes());
        h.update([0]);
        h.update(timestamp.to_be_bytes());
        h.update(&m.data);
        let position_id = format!(
            "{}:sha256:{}",
            self.cfg.queue,
            hex::encode(&h.finalize()[..16])
        );
        let incoming = Incoming {
            position_id,
            message_id,
            location,
            subject: m.routing_key.as_str(),
            stored_at: p
                .timestamp()
                .and_then(|t| chrono::DateTime::from_timestamp(i64::try_from(t).ok()?, 0)),
            attributes,
        };
        let structured = incoming
            .attributes
            .content_type
            .as_deref()
            .is_some_and(|c| {
                c.to_ascii_lowercase()
                    .starts_with("application/cloudevents+json")
            });
        if self.cfg.event_id == AmqpEventId::Auto
            && !Decoder::names_an_id(&incoming)
            && !structured
            && m.data.len() <= self.cfg.max_message_bytes
        {
            return decoder.reject(
                &incoming,
                &m.data,
                "the message has no id (neither a `message_id` property nor a `cloudEvents:id` header): set one where it is published, or `event_id: content` to name such messages by a hash of their content",
            );
        }
        decoder.record(&incoming, &m.data)
    }
}

impl Source for AmqpSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).run(ingest, shutdown))
    }
}

/// Give a held batch back to the queue (on shutdown only).
async fn nack_all(msgs: &[Delivery]) {
    if let Some(last) = msgs.last() {
        let _ = last
            .acker
            .nack(BasicNackOptions {
                multiple: true,
                requeue: true,
            })
            .await;
    }
}
