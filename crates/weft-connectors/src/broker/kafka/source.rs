//! The `kafka` source: one member of a Kafka consumer group.
//!
//! Contract (the broker contract of [`crate::broker`]): a batch is what
//! arrives without a 5 ms pause, up to `batch` messages; it is handed to
//! `ingest` whole, and only after `ingest` returned `Ok` is each
//! partition's next offset committed (`enable.auto.commit` is off; one
//! synchronous commit per batch). Until then the group's committed offset
//! is before the batch: a weft that dies, a lost connection or a
//! rebalance hands the messages out again from there. A batch the store
//! does not take (backpressure, a store error) is held and offered again
//! with backoff, and nothing is committed; on shutdown it is dropped
//! uncommitted and read again at the next start.
//!
//! Dedupe: event ids are positions (`<topic>/<partition>/<offset>`, the
//! same on every redelivery) unless the message names its own (`ce_id`,
//! with `ce_source`); the journal drops an id it already has
//! (`Dedupe::Id`). A commit that fails (a broker restarting, a rebalance
//! that took the partition) is logged and consumption goes on: the
//! messages are stored, and whatever the group hands out again is dropped
//! as a duplicate.
//!
//! librdkafka keeps the connections itself: a broker that goes away is
//! connected to again in the background, and the consumer goes on from
//! the committed offsets. Errors it reports are logged; a fatal one stops
//! the source (its supervisor starts it again). A batch held for longer
//! than `max.poll.interval.ms` (5 minutes, or the session timeout when that
//! is longer) makes librdkafka leave the group; it joins again at the next
//! read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::config::KafkaSourceConfig;
use crate::broker::{Attributes, Decoder, Incoming, KAFKA};
use crate::source::{Batch, Ingest, Record, Source, SourceError};

/// A running `kafka` source.
pub struct KafkaSource {
    system: String,
    cfg: KafkaSourceConfig,
}

/// How long a commit may take before weft goes on without waiting for it
/// (the messages are stored; a later commit covers them).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// At most one warning per this long about errors librdkafka reports
/// while it reconnects (a broker away reports one per attempt).
const WARN_EVERY: Duration = Duration::from_secs(5);

impl KafkaSource {
    pub fn new(system: &str, cfg: KafkaSourceConfig) -> Self {
        KafkaSource {
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

    /// The group member, subscribed to the topics.
    fn consumer(&self) -> Result<StreamConsumer, SourceError> {
        let c = &self.cfg;
        let session = c.session_timeout.as_millis() as u64;
        let mut cc = super::client_config(
            &c.brokers,
            &format!("weft-{}", self.system),
            c.connect_timeout,
        );
        cc.set("group.id", &c.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", c.start.reset())
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", session.to_string())
            .set("heartbeat.interval.ms", (session / 3).max(100).to_string())
            .set("max.poll.interval.ms", session.max(300_000).to_string());
        let consumer: StreamConsumer = cc
            .create()
            .map_err(|e| self.err(format!("cannot create the Kafka consumer: {e}")))?;
        let topics: Vec<&str> = c.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| self.err(format!("cannot subscribe to {topics:?}: {e}")))?;
        Ok(consumer)
    }

    async fn run(
        self,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let decoder = Decoder {
            format: self.cfg.format.clone(),
            max_bytes: self.cfg.max_message_bytes,
            event_id: self.cfg.event_id,
            default_source: format!("weft:{}/kafka", self.system),
            default_type: self.cfg.event_type.clone(),
        };
        let consumer = Arc::new(self.consumer()?);
        tracing::info!(
            source = %self.system, brokers = %self.cfg.brokers, topics = ?self.cfg.topics,
            group = %self.cfg.group, "consuming from Kafka"
        );
        let result = self.consume(&consumer, &decoder, &*ingest, &shutdown).await;
        // leaving the group (closing the consumer) waits for the brokers:
        // not on a runtime thread
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        result
    }

    async fn consume(
        &self,
        consumer: &Arc<StreamConsumer>,
        decoder: &Decoder,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Result<(), SourceError> {
        let mut warned: Option<Instant> = None;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = consumer.recv() => m.map(|m| m.detach()),
            };
            let mut batch: Vec<OwnedMessage> = Vec::new();
            match first {
                Ok(m) => batch.push(m),
                Err(e) => {
                    self.consume_error(consumer, &e, &mut warned)?;
                    continue;
                }
            }
            while batch.len() < self.cfg.batch {
                match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                    Ok(Ok(m)) => batch.push(m.detach()),
                    Ok(Err(e)) => {
                        self.consume_error(consumer, &e, &mut warned)?;
                        break;
                    }
                    Err(_) => break,
                }
            }
            warned = None;
            if !self.hand_over(decoder, &batch, ingest, shutdown).await {
                return Ok(());
            }
            self.commit(consumer, &batch).await;
        }
    }

    /// An error librdkafka reported: fatal ones stop the source, the others
    /// are logged (at most every [`WARN_EVERY`]) while it reconnects.
    fn consume_error(
        &self,
        consumer: &StreamConsumer,
        e: &KafkaError,
        warned: &mut Option<Instant>,
    ) -> Result<(), SourceError> {
        if let Some((code, why)) = consumer.client().fatal_error() {
            return Err(self.err(format!("the Kafka consumer failed ({code:?}): {why}")));
        }
        if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            tracing::warn!(source = %self.system, error = %e, "Kafka consumer error; librdkafka goes on (connecting again)");
            *warned = Some(Instant::now());
        } else {
            tracing::debug!(source = %self.system, error = %e, "Kafka consumer error");
        }
        Ok(())
    }

    /// Ingest `batch` until the store takes it; `false` when shutdown came
    /// first (nothing committed: the batch is read again at the next start).
    async fn hand_over(
        &self,
        decoder: &Decoder,
        batch: &[OwnedMessage],
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut pause = Duration::from_millis(100);
        loop {
            let records = batch.iter().map(|m| self.record(decoder, m)).collect();
            match ingest
                .ingest(Batch {
                    records,
                    checkpoint: None,
                })
                .await
            {
                Ok(r) => {
                    tracing::debug!(
                        source = %self.system, accepted = r.accepted, duplicates = r.duplicates,
                        "Kafka batch stored"
                    );
                    return true;
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        return false;
                    }
                    tracing::warn!(
                        source = %self.system, error = %e, messages = batch.len(),
                        "the store did not take the batch; holding it uncommitted and trying again"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Commit each partition's offset after the batch (synchronously, off
    /// the runtime's threads). A failure is logged: the messages are stored,
    /// and a redelivery is dropped by the journal.
    async fn commit(&self, consumer: &Arc<StreamConsumer>, batch: &[OwnedMessage]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for m in batch {
            let o = next.entry((m.topic(), m.partition())).or_insert(0);
            *o = (*o).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::with_capacity(next.len());
        for ((topic, partition), offset) in &next {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
                tracing::warn!(source = %self.system, topic, partition, error = %e, "cannot commit this offset");
            }
        }
        let c = consumer.clone();
        let committed = tokio::time::timeout(
            COMMIT_TIMEOUT,
            tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)),
        )
        .await;
        let why = match committed {
            Ok(Ok(Ok(()))) => {
                tracing::debug!(source = %self.system, partitions = next.len(), "offsets committed");
                return;
            }
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {}s", COMMIT_TIMEOUT.as_secs()),
        };
        tracing::warn!(
            source = %self.system, error = %why,
            "committing the offsets failed; the messages are stored, and what the group hands out again is dropped as a duplicate"
        );
    }

    /// One message as a record.
    fn record(&self, decoder: &Decoder, m: &OwnedMessage) -> Record {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        let headers = m.headers();
        let get = |name: &str| -> Option<String> {
            let h = headers?;
            let found = h
                .iter()
                .find(|h| h.key == name)
                .or_else(|| h.iter().find(|h| h.key.eq_ignore_ascii_case(name)))?;
            found.value.map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let key = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .filter(|k| !k.is_empty());
        let incoming = Incoming {
            position_id: format!("{topic}/{partition}/{offset}"),
            message_id: None,
            location: format!("kafka topic {topic} partition {partition} offset {offset}"),
            subject: key.unwrap_or(topic),
            stored_at: m
                .timestamp()
                .to_millis()
                .filter(|ms| *ms > 0)
                .and_then(chrono::DateTime::from_timestamp_millis),
            attributes: Attributes::from_headers(KAFKA, get),
        };
        match m.payload() {
            Some(v) => decoder.record(&incoming, v),
            None => decoder.reject(
                &incoming,
                b"",
                "a message without a value (a tombstone): nothing to read",
            ),
        }
    }
}

impl Source for KafkaSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).run(ingest, shutdown))
    }
}
