//! The `kafka` source: every partition of its topics, read from the
//! positions weft stores (`offsets: store`, the default), or one member of
//! a consumer group (`offsets: group`).
//!
//! Contract (the broker contract of [`crate::broker`]): a batch is what
//! arrives without a 5 ms pause, up to `batch` messages; it is handed to
//! `ingest` whole.
//!
//! - **`offsets: store`.** The source assigns itself every partition of
//!   its topics (no group membership, so no rebalance and no group
//!   coordinator in the way) and keeps each partition's next offset in
//!   weft's store, under the checkpoint key `kafka_offsets`, saved in the
//!   transaction of the batch: what is stored and the position after it
//!   are one commit, so a weft killed at any point reads on from exactly
//!   after what it stored. A partition it has no position for starts where
//!   the group's committed offset says (a group weft consumed as before,
//!   or another consumer's), else at `start` (`earliest`: the partition's
//!   low watermark, `latest`: its high one); that start is resolved to an
//!   offset and stored before the first message is read, so a restart
//!   before the first batch does not move it. The topics' partitions are
//!   looked at again every 30 s (every 2 s while a topic is missing): a
//!   new partition starts at its earliest. After each batch, the offsets
//!   are also committed to the group, without waiting, so that lag tools
//!   see them; weft never reads them back once it has its own. On several
//!   nodes the source runs on one node at a time (the source lease), and
//!   its position moves with the store.
//! - **`offsets: group`.** A member of the consumer group: only after
//!   `ingest` returned `Ok` is each partition's next offset committed
//!   (`enable.auto.commit` is off; one synchronous commit per batch).
//!   Until then the group's committed offset is before the batch: a weft
//!   that dies, a lost connection or a rebalance hands the messages out
//!   again from there. A commit that fails (a broker restarting, a
//!   rebalance that took the partition) is logged and consumption goes on.
//!   A batch held for longer than `max.poll.interval.ms` (5 minutes, or
//!   the session timeout when that is longer) makes librdkafka leave the
//!   group; it joins again at the next read.
//!
//! A batch the store does not take (backpressure, a store error) is held
//! and offered again with backoff; on shutdown it is dropped and read
//! again at the next start.
//!
//! Dedupe: event ids are positions (`<topic>/<partition>/<offset>`, the
//! same on every redelivery) unless the message names its own (`ce_id`,
//! with `ce_source`); the journal drops an id it already has
//! (`Dedupe::Id`), so a message handed out twice (group mode) is stored
//! once.
//!
//! librdkafka keeps the connections itself: a broker that goes away is
//! connected to again in the background, and fetching goes on from the
//! positions. Errors it reports are logged; a fatal one stops the source
//! (its supervisor starts it again, from the stored positions).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::config::{KafkaSourceConfig, Offsets, Start};
use crate::broker::{Attributes, Decoder, Incoming, KAFKA};
use crate::source::{Batch, Checkpoint, Ingest, Record, Source, SourceError};

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

/// The checkpoint key of the positions (`offsets: store`).
pub const CHECKPOINT_KEY: &str = "kafka_offsets";

/// How often the topics' partitions are looked at again.
const DISCOVER_EVERY: Duration = Duration::from_secs(30);

/// How often while a topic is missing (not created yet).
const DISCOVER_MISSING: Duration = Duration::from_secs(2);

/// Per topic, per partition, the next offset to read: the checkpoint's
/// value (`{"orders": {"0": 13, "1": 11}}`).
pub type Positions = BTreeMap<String, BTreeMap<i32, i64>>;

/// The positions after `batch`.
fn advanced(positions: &Positions, batch: &[OwnedMessage]) -> Positions {
    let mut next = positions.clone();
    for m in batch {
        let o = next
            .entry(m.topic().to_owned())
            .or_default()
            .entry(m.partition())
            .or_insert(0);
        *o = (*o).max(m.offset() + 1);
    }
    next
}

/// The positions as a partition list.
fn partition_list(positions: &Positions) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, parts) in positions {
        for (p, o) in parts {
            // only fails for a negative offset, which positions never hold
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
        }
    }
    tpl
}

/// What a look at the topics found: the partitions to start, each with
/// its first offset, and the topics that do not exist (yet).
#[derive(Debug, Default)]
struct Found {
    start: Positions,
    missing: Vec<String>,
}

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

    /// The consumer: a group member subscribed to the topics (`offsets:
    /// group`), or one with nothing assigned yet (`offsets: store`).
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
            .set("enable.partition.eof", "false");
        match c.offsets {
            Offsets::Group => {
                cc.set("auto.offset.reset", c.start.reset())
                    .set("session.timeout.ms", session.to_string())
                    .set("heartbeat.interval.ms", (session / 3).max(100).to_string())
                    .set("max.poll.interval.ms", session.max(300_000).to_string());
            }
            // a stored offset the partition no longer holds (retention
            // deleted it): from the earliest one it holds, never skipping
            Offsets::Store => {
                cc.set("auto.offset.reset", "earliest");
            }
        }
        let consumer: StreamConsumer = cc
            .create()
            .map_err(|e| self.err(format!("cannot create the Kafka consumer: {e}")))?;
        if c.offsets == Offsets::Group {
            let topics: Vec<&str> = c.topics.iter().map(String::as_str).collect();
            consumer
                .subscribe(&topics)
                .map_err(|e| self.err(format!("cannot subscribe to {topics:?}: {e}")))?;
        }
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
            group = %self.cfg.group, offsets = ?self.cfg.offsets, "consuming from Kafka"
        );
        let result = match self.cfg.offsets {
            Offsets::Group => {
                self.consume(&consumer, &decoder, &*ingest, &shutdown, None)
                    .await
            }
            Offsets::Store => match self.stored(&*ingest).await {
                Ok(positions) => {
                    self.consume(&consumer, &decoder, &*ingest, &shutdown, Some(positions))
                        .await
                }
                Err(e) => Err(e),
            },
        };
        // leaving the group (closing the consumer) waits for the brokers:
        // not on a runtime thread
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        result
    }

    /// The positions saved with the last batch (none at a first start).
    async fn stored(&self, ingest: &dyn Ingest) -> Result<Positions, SourceError> {
        let saved = ingest
            .checkpoint(CHECKPOINT_KEY)
            .await
            .map_err(|e| self.err(format!("cannot read the stored Kafka offsets: {e}")))?;
        match saved {
            None => Ok(Positions::new()),
            Some(text) => serde_json::from_str(&text).map_err(|e| {
                self.err(format!(
                    "the stored Kafka offsets ({CHECKPOINT_KEY}) are not readable ({e}): {text}"
                ))
            }),
        }
    }

    /// Look at the topics' partitions: every one not in `positions`, with
    /// where it starts (the group's committed offset, else `start`, else,
    /// for a partition created after the first look, its earliest).
    async fn discover(
        &self,
        consumer: &Arc<StreamConsumer>,
        positions: &Positions,
        first: bool,
    ) -> Result<Found, String> {
        let c = consumer.clone();
        let topics = self.cfg.topics.clone();
        let known = positions.clone();
        let wait = self.cfg.connect_timeout;
        let start = if first {
            self.cfg.start
        } else {
            Start::Earliest
        };
        tokio::task::spawn_blocking(move || -> Result<Found, String> {
            let mut found = Found::default();
            let mut new = TopicPartitionList::new();
            for topic in &topics {
                let md = c
                    .fetch_metadata(Some(topic), wait)
                    .map_err(|e| format!("cannot read the metadata of topic {topic}: {e}"))?;
                let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                    found.missing.push(topic.clone());
                    continue;
                };
                if t.error().is_some() || t.partitions().is_empty() {
                    found.missing.push(topic.clone());
                    continue;
                }
                for p in t.partitions() {
                    if !known.get(topic).is_some_and(|ps| ps.contains_key(&p.id())) {
                        new.add_partition(topic, p.id());
                    }
                }
            }
            if new.count() == 0 {
                return Ok(found);
            }
            let committed = c
                .committed_offsets(new, wait)
                .map_err(|e| format!("cannot read the group's committed offsets: {e}"))?;
            for e in committed.elements() {
                let at = match e.offset() {
                    Offset::Offset(o) if o >= 0 => o,
                    _ => {
                        let (low, high) = c
                            .fetch_watermarks(e.topic(), e.partition(), wait)
                            .map_err(|x| {
                                format!(
                                    "cannot read the offsets of topic {} partition {}: {x}",
                                    e.topic(),
                                    e.partition()
                                )
                            })?;
                        match start {
                            Start::Earliest => low,
                            Start::Latest => high,
                        }
                    }
                };
                found
                    .start
                    .entry(e.topic().to_owned())
                    .or_default()
                    .insert(e.partition(), at.max(0));
            }
            Ok(found)
        })
        .await
        .map_err(|e| format!("the metadata lookup failed: {e}"))?
    }

    /// Take on the partitions `found` starts: their positions stored
    /// first (an empty batch with the checkpoint), then assigned. `false`
    /// when shutdown came first.
    async fn take_on(
        &self,
        consumer: &StreamConsumer,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
        positions: &mut Positions,
        found: Positions,
    ) -> Result<bool, SourceError> {
        let mut next = positions.clone();
        for (topic, parts) in &found {
            next.entry(topic.clone()).or_default().extend(parts);
        }
        if !self
            .hand_over(Vec::new, Some(&next), ingest, shutdown)
            .await?
        {
            return Ok(false);
        }
        consumer
            .incremental_assign(&partition_list(&found))
            .map_err(|e| self.err(format!("cannot assign the partitions {found:?}: {e}")))?;
        tracing::info!(source = %self.system, partitions = ?found, "Kafka partitions assigned");
        *positions = next;
        Ok(true)
    }

    async fn consume(
        &self,
        consumer: &Arc<StreamConsumer>,
        decoder: &Decoder,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
        mut positions: Option<Positions>,
    ) -> Result<(), SourceError> {
        let mut warned: Option<Instant> = None;
        let mut next_look = Instant::now();
        if let Some(p) = positions.as_mut() {
            // the partitions with a stored position first, then the others
            let stored = p.clone();
            if !stored.is_empty() {
                consumer
                    .assign(&partition_list(&stored))
                    .map_err(|e| self.err(format!("cannot assign the partitions: {e}")))?;
            }
            let found = self
                .discover(consumer, p, true)
                .await
                .map_err(|e| self.err(e))?;
            next_look = self.next_look(&found);
            if !found.start.is_empty()
                && !self
                    .take_on(consumer, ingest, shutdown, p, found.start)
                    .await?
            {
                return Ok(());
            }
        }
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = consumer.recv() => Some(m.map(|m| m.detach())),
                _ = tokio::time::sleep_until(next_look.into()), if positions.is_some() => None,
            };
            let Some(first) = first else {
                let Some(p) = positions.as_mut() else {
                    continue;
                };
                match self.discover(consumer, p, false).await {
                    Ok(found) => {
                        next_look = self.next_look(&found);
                        if !found.start.is_empty()
                            && !self
                                .take_on(consumer, ingest, shutdown, p, found.start)
                                .await?
                        {
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(source = %self.system, error = %e, "cannot look at the Kafka topics' partitions; trying again");
                        next_look = Instant::now() + DISCOVER_MISSING;
                    }
                }
                continue;
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
            let records = || batch.iter().map(|m| self.record(decoder, m)).collect();
            match positions.as_mut() {
                Some(p) => {
                    let next = advanced(p, &batch);
                    if !self
                        .hand_over(records, Some(&next), ingest, shutdown)
                        .await?
                    {
                        return Ok(());
                    }
                    *p = next;
                    // for lag tools only: not waited for, not read back
                    if let Err(e) = consumer.commit(&partition_list(p), CommitMode::Async) {
                        tracing::debug!(source = %self.system, error = %e, "committing the offsets to the group failed");
                    }
                }
                None => {
                    if !self.hand_over(records, None, ingest, shutdown).await? {
                        return Ok(());
                    }
                    self.commit(consumer, &batch).await;
                }
            }
        }
    }

    /// When to look at the partitions again after `found`.
    fn next_look(&self, found: &Found) -> Instant {
        if found.missing.is_empty() {
            Instant::now() + DISCOVER_EVERY
        } else {
            tracing::warn!(
                source = %self.system, topics = ?found.missing,
                "Kafka topics not found (not created yet?); looking again in {}s",
                DISCOVER_MISSING.as_secs()
            );
            Instant::now() + DISCOVER_MISSING
        }
    }

    /// Ingest the records `records` makes, with the positions `next` as
    /// the checkpoint (`offsets: store`), until the store takes them;
    /// `false` when shutdown came first (nothing stored: read again at the
    /// next start).
    async fn hand_over(
        &self,
        records: impl Fn() -> Vec<Record>,
        next: Option<&Positions>,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Result<bool, SourceError> {
        let checkpoint = match next {
            Some(p) => Some(Checkpoint {
                key: CHECKPOINT_KEY.into(),
                value: serde_json::to_string(p)
                    .map_err(|e| self.err(format!("cannot write the Kafka offsets: {e}")))?,
            }),
            None => None,
        };
        let mut pause = Duration::from_millis(100);
        loop {
            let records = records();
            let n = records.len();
            match ingest
                .ingest(Batch {
                    records,
                    checkpoint: checkpoint.clone(),
                })
                .await
            {
                Ok(r) => {
                    tracing::debug!(
                        source = %self.system, accepted = r.accepted, duplicates = r.duplicates,
                        "Kafka batch stored"
                    );
                    return Ok(true);
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        return Ok(false);
                    }
                    tracing::warn!(
                        source = %self.system, error = %e, messages = n,
                        "the store did not take the batch; holding it and trying again"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    fn msg(topic: &str, partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            topic.to_owned(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn positions_move_past_each_partitions_last_message_and_read_back() {
        let mut start = Positions::new();
        start.entry("a".into()).or_default().insert(0, 5);
        start.entry("a".into()).or_default().insert(1, 9);
        // out of order within a batch, and one partition not in it
        let batch = [
            msg("a", 0, 7),
            msg("a", 0, 5),
            msg("b", 2, 0),
            msg("a", 0, 6),
        ];
        let next = advanced(&start, &batch);
        assert_eq!(next["a"][&0], 8);
        assert_eq!(
            next["a"][&1], 9,
            "a partition without messages keeps its position"
        );
        assert_eq!(next["b"][&2], 1);
        let text = serde_json::to_string(&next).unwrap();
        assert_eq!(text, r#"{"a":{"0":8,"1":9},"b":{"2":1}}"#);
        let back: Positions = serde_json::from_str(&text).unwrap();
        assert_eq!(back, next);
        let tpl = partition_list(&next);
        assert_eq!(tpl.count(), 3);
        assert_eq!(
            tpl.find_partition("a", 0).map(|e| e.offset()),
            Some(Offset::Offset(8))
        );
    }
}
