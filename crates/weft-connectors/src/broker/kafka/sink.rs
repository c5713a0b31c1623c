//! The `kafka` sink: an idempotent producer (`enable.idempotence`,
//! `acks=all`).
//!
//! Contract: every delivery of a batch is produced (key = the entity key,
//! value = the payload's JSON, the CloudEvents Kafka binding's headers),
//! then every delivery report is awaited; a delivery is `Ok` only once
//! the brokers acknowledged it (all in-sync replicas have it). librdkafka
//! retries a send itself until `timeout` (`message.timeout.ms`); the
//! idempotent producer makes those retries land once, in order, per
//! partition.
//!
//! The window: Kafka dedupes a producer's retries only within one producer
//! session. A weft killed after the brokers took a message and before its
//! commit sends it again at its next start from a new producer: a second
//! copy with the same `ce_id` (the idempotency key), which a consumer that
//! dedupes by `ce_id` (weft's `kafka` source does) sees once. Transactions
//! (exactly once across restarts) are not used.
//!
//! Errors: a value over `max_message_bytes` (or one the brokers call too
//! large), an unknown topic (brokers that do not create topics), a topic
//! the template cannot fill or that is not a topic name, a refused
//! authorization and an invalid record are permanent; timeouts, brokers
//! down, leaders moving and the rest are retryable. A fatal error of the
//! idempotent producer (a sequence the brokers lost), or messages that
//! timed out, make a new producer for the next batch (a broker that lost
//! its state may never answer the old producer id again: seen with tansu
//! restarted on memory storage); the batch is retried.
//!
//! Headers (see [`crate::broker::kafka`]): `ce_specversion`, `ce_id`,
//! `ce_source`, `ce_type`, `ce_time` (the event's own time), `ce_subject`
//! (the entity key), `content-type`, `x-correlation-id`, `x-causation-id`,
//! `traceparent`/`tracestate` when the event came with one, and the
//! configured `headers`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::config::{KafkaSinkConfig, topic_name};
use crate::broker::{KAFKA, outgoing_headers};
use crate::sink::{Delivery, Sink, SinkError, WriteResult, Written};

/// A connected (or connecting) `kafka` sink.
pub struct KafkaSink {
    system: String,
    cfg: KafkaSinkConfig,
    /// The producer; replaced after a fatal error.
    producer: Mutex<FutureProducer>,
}

/// One delivery on its way: refused before it was sent, or its report.
enum Sent {
    Done(WriteResult),
    Waiting(DeliveryFuture, String),
}

impl KafkaSink {
    /// Make the producer and ask the brokers for the topic's metadata. An
    /// unreachable cluster is not an error: the second value says why the
    /// destination is down (naming the brokers), and librdkafka connects in
    /// the background. A literal topic that the brokers say does not exist
    /// (and do not create) is an error, like a missing table.
    pub async fn connect(
        system: &str,
        cfg: KafkaSinkConfig,
    ) -> Result<(KafkaSink, Option<String>), String> {
        let producer = producer(system, &cfg)?;
        let probe = producer.clone();
        let topic = cfg.topic.literal().map(str::to_owned);
        let wait = cfg.connect_timeout;
        let md = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(topic.as_deref(), wait)
                .map(|md| {
                    md.topics()
                        .first()
                        .and_then(|t| t.error())
                        .map(|e| format!("{:?}", rdkafka::error::RDKafkaErrorCode::from(e)))
                })
        })
        .await
        .map_err(|e| format!("the metadata request failed: {e}"))?;
        let sink = KafkaSink {
            system: system.to_owned(),
            producer: Mutex::new(producer),
            cfg,
        };
        match md {
            Ok(None) => Ok((sink, None)),
            Ok(Some(code)) => Err(format!(
                "topic `{}` on Kafka at {}: {code} (create the topic, or let the brokers create topics)",
                sink.cfg.topic_text, sink.cfg.brokers
            )),
            Err(e) => {
                let why = format!("cannot reach Kafka at {}: {e}", sink.cfg.brokers);
                Ok((sink, Some(why)))
            }
        }
    }

    fn current(&self) -> FutureProducer {
        match self.producer.lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// After a fatal error of the idempotent producer: a new one for the
    /// next batch.
    fn renew(&self, why: &str) {
        match producer(&self.system, &self.cfg) {
            Ok(p) => {
                tracing::warn!(sink = %self.system, error = %why, "the Kafka producer failed; a new one takes over");
                match self.producer.lock() {
                    Ok(mut held) => *held = p,
                    Err(poisoned) => *poisoned.into_inner() = p,
                }
            }
            Err(e) => {
                tracing::warn!(sink = %self.system, error = %e, "cannot make a new Kafka producer");
            }
        }
    }

    /// The message of one delivery: topic, key, value and headers.
    fn message(&self, d: &Delivery) -> Result<(String, Vec<u8>, OwnedHeaders), SinkError> {
        let topic = self
            .cfg
            .topic
            .render(d, str::to_owned)
            .map_err(SinkError::permanent)?;
        topic_name(&topic).map_err(SinkError::permanent)?;
        let body = self
            .cfg
            .format
            .encode(&d.payload)
            .map_err(|e| SinkError::permanent(format!("payload: {e}")))?;
        if body.len() > self.cfg.max_message_bytes {
            return Err(SinkError::permanent(format!(
                "a message of {} bytes is over max_message_bytes ({})",
                body.len(),
                self.cfg.max_message_bytes
            )));
        }
        let source = self
            .cfg
            .event_source
            .clone()
            .unwrap_or_else(|| format!("weft/{}", d.context.flow));
        let ty = self
            .cfg
            .event_type
            .clone()
            .unwrap_or_else(|| format!("weft.{}", d.context.flow));
        let mut headers = OwnedHeaders::new_with_capacity(12);
        for (k, v) in outgoing_headers(KAFKA, d, &source, &ty)
            .iter()
            .chain(self.cfg.headers.iter())
        {
            let value = if k == KAFKA.content_type {
                self.cfg.format.content_type()
            } else {
                v.as_str()
            };
            headers = headers.insert(Header {
                key: k.as_str(),
                value: Some(value),
            });
        }
        Ok((topic, body, headers))
    }

    /// Hand one message to librdkafka, waiting while its queue is full (up
    /// to `deadline`).
    async fn send(
        &self,
        producer: &FutureProducer,
        d: &Delivery,
        deadline: Instant,
    ) -> Result<(DeliveryFuture, String), SinkError> {
        let (topic, body, headers) = self.message(d)?;
        let mut record = FutureRecord::to(&topic).payload(&body).headers(headers);
        if let Some(k) = &d.entity_key {
            record = record.key(k.as_bytes());
        }
        loop {
            match producer.send_result(record) {
                Ok(f) => return Ok((f, topic.clone())),
                Err((KafkaError::MessageProduction(code), back))
                    if code == rdkafka::error::RDKafkaErrorCode::QueueFull
                        && Instant::now() < deadline =>
                {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((e, _)) => return Err(self.classify(&e, &topic)),
            }
        }
    }

    fn classify(&self, e: &KafkaError, topic: &str) -> SinkError {
        let msg = format!("Kafka at {}, topic `{topic}`: {e}", self.cfg.brokers);
        match super::code_of(e) {
            Some(c) if super::permanent_code(c) => SinkError::permanent(msg),
            _ => SinkError::retryable(msg),
        }
    }

    async fn write_batch(&self, batch: &[Delivery]) -> Vec<WriteResult> {
        let producer = self.current();
        let deadline = Instant::now() + self.cfg.timeout;
        let mut sent = Vec::with_capacity(batch.len());
        for d in batch {
            sent.push(match self.send(&producer, d, deadline).await {
                Ok((f, topic)) => Sent::Waiting(f, topic),
                Err(e) => Sent::Done(Err(e)),
            });
        }
        // every report: librdkafka times a message out itself after
        // `timeout`; the margin covers a report on its way
        let wait = self.cfg.timeout + Duration::from_secs(5);
        let reports = futures::future::join_all(sent.into_iter().map(|s| async move {
            match s {
                Sent::Done(r) => (r, false),
                Sent::Waiting(f, topic) => match tokio::time::timeout_at(
                    tokio::time::Instant::from_std(deadline + Duration::from_secs(5)),
                    f,
                )
                .await
                {
                    Ok(Ok(Ok(_))) => (Ok(Written::default()), false),
                    Ok(Ok(Err((e, _)))) => {
                        // a fatal error, or a message librdkafka gave up
                        // on: a new producer for the next try (a broker
                        // that lost its state may never answer the old
                        // producer id's sequence again)
                        let renew = matches!(
                            super::code_of(&e),
                            Some(
                                rdkafka::error::RDKafkaErrorCode::Fatal
                                    | rdkafka::error::RDKafkaErrorCode::MessageTimedOut
                            )
                        );
                        (Err(self.classify(&e, &topic)), renew)
                    }
                    Ok(Err(_)) => (
                        Err(SinkError::retryable(
                            "the Kafka producer dropped the message before its delivery report",
                        )),
                        false,
                    ),
                    Err(_) => (
                        Err(SinkError::retryable(format!(
                            "no delivery report from Kafka at {} within {wait:?}",
                            self.cfg.brokers
                        ))),
                        false,
                    ),
                },
            }
        }))
        .await;
        let renew = reports.iter().any(|(_, f)| *f) || producer.client().fatal_error().is_some();
        if renew {
            let why = producer
                .client()
                .fatal_error()
                .map(|(c, m)| format!("{c:?}: {m}"))
                .unwrap_or_else(|| "messages timed out".to_owned());
            self.renew(&why);
        }
        reports
            .into_iter()
            .map(|(r, renew_here)| match r {
                // nothing of the old producer's is final: retried on the
                // new one
                Err(e) if renew_here => Err(SinkError::retryable(e.message)),
                r => r,
            })
            .collect()
    }
}

/// The idempotent producer of a sink.
fn producer(system: &str, cfg: &KafkaSinkConfig) -> Result<FutureProducer, String> {
    let mut cc = super::client_config(&cfg.brokers, &format!("weft-{system}"), cfg.connect_timeout);
    cc.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", cfg.timeout.as_millis().to_string())
        // the largest value weft sends, with room for the key and headers
        .set(
            "message.max.bytes",
            (cfg.max_message_bytes + 64 * 1024)
                .min(1_000_000_000)
                .to_string(),
        )
        .set("linger.ms", "5");
    cc.create()
        .map_err(|e| format!("cannot create the Kafka producer: {e}"))
}

impl Sink for KafkaSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(self.write_batch(batch))
    }

    fn max_write_time(&self, batch_len: usize) -> Duration {
        // the queue and the reports within `timeout`, plus the margin
        self.cfg.timeout + Duration::from_secs(10) + Duration::from_millis(1) * batch_len as u32
    }
}
