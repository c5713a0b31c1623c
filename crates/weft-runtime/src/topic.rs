//! Topics inside the hub (`topics:` in the config; the log is the
//! journal's, `weft_store::topic`).
//!
//! Publishing is a destination: a flow that names a topic in `to` has a
//! lane to it like to any system, whose sink ([`TopicSink`]) appends each
//! delivery to the topic with the delivery's idempotency key as the
//! message id. The lane settles after the append committed; a lane that
//! died in between appends the same ids again and the journal keeps each
//! once. So a topic holds every routed record once, in each key's order
//! (the lane's key queues), with its entity key, correlation id and trace
//! context.
//!
//! Subscribing is a source: every flow that names a topic in `from` gets a
//! [`TopicSource`] of its own, named `<topic>/<flow>` (its checkpoint, its
//! lease on a shared journal, its DLQ entries' source), which reads the
//! messages after its position and ingests them with the position as the
//! batch's checkpoint: the next run starts exactly after the last batch
//! committed (no dedupe table needed: `Dedupe::Position`). Subscribers are
//! independent: each has its own position, lanes and DLQ, and adding or
//! removing one changes nothing for the others. A new subscriber starts at
//! the topic's head (`start: now`, the default; that position is saved at
//! once) or at its oldest message kept (`start: beginning`).

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weft_connectors::sink::{WriteResult, Written};
use weft_connectors::source::{BadRecord, Checkpoint, Source, SourceError};
use weft_connectors::{Batch, Delivery, Ingest, IngestError, Record, Sink, SinkError};
use weft_core::Event;
use weft_core::config::TopicStart;
use weft_store::{Journal, TopicEntry, TopicMessage};

/// A topic as the store holds it, with where each subscriber is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TopicState {
    pub topic: String,
    /// Messages kept.
    pub messages: i64,
    /// The newest message's sequence (0: none yet).
    pub head: i64,
    pub subscribers: Vec<SubscriberState>,
}

/// One subscriber's position in its topic.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriberState {
    pub flow: String,
    /// Its source's name, `<topic>/<flow>`.
    pub subscription: String,
    /// The sequence it has read up to (`None`: it has not run yet).
    pub position: Option<i64>,
    /// Messages after its position (not read yet).
    pub behind: i64,
}

/// Every topic of `config` with its subscribers' positions, from `read`.
pub fn states(
    read: &dyn weft_store::JournalRead,
    config: &weft_core::config::Config,
) -> Result<Vec<TopicState>, weft_store::StoreError> {
    states_from(
        config,
        &TopicReads {
            checkpoint: &|s, k| read.checkpoint(s, k),
            head: &|t| read.topic_head(t),
            behind: &|t, a| read.topic_behind(t, a),
        },
    )
}

/// A checkpoint of `(source, key)`.
pub type CheckpointRead<'a> =
    dyn Fn(&str, &str) -> Result<Option<String>, weft_store::StoreError> + 'a;

/// The three reads [`states_from`] needs, from whatever holds the store.
pub struct TopicReads<'a> {
    pub checkpoint: &'a CheckpointRead<'a>,
    pub head: &'a dyn Fn(&str) -> Result<i64, weft_store::StoreError>,
    pub behind: &'a dyn Fn(&str, i64) -> Result<i64, weft_store::StoreError>,
}

/// [`states`] through any reader (the CLI's read-only SQLite reader).
pub fn states_from(
    config: &weft_core::config::Config,
    read: &TopicReads<'_>,
) -> Result<Vec<TopicState>, weft_store::StoreError> {
    let mut out = Vec::new();
    for t in config.topics.values() {
        let mut subscribers = Vec::new();
        for f in config.flows.iter().filter(|f| f.from == t.name) {
            let subscription = subscription(&t.name, &f.name);
            let position =
                (read.checkpoint)(&subscription, POSITION)?.and_then(|v| v.parse::<i64>().ok());
            let behind = match (position, f.start) {
                (Some(p), _) => (read.behind)(&t.name, p)?,
                // not run yet: `beginning` reads every message kept
                (None, Some(TopicStart::Beginning)) => (read.behind)(&t.name, 0)?,
                (None, _) => 0,
            };
            subscribers.push(SubscriberState {
                flow: f.name.clone(),
                subscription,
                position,
                behind,
            });
        }
        out.push(TopicState {
            topic: t.name.clone(),
            messages: (read.behind)(&t.name, 0)?,
            head: (read.head)(&t.name)?,
            subscribers,
        });
    }
    Ok(out)
}

/// Messages a subscriber ingests per batch, at most.
const BATCH: usize = 2000;
/// How often a subscriber looks for messages another process published
/// (a publisher in this process wakes it at once).
const POLL: Duration = Duration::from_millis(200);
/// The checkpoint key of a subscriber's position.
const POSITION: &str = "seq";

/// The name of `flow`'s subscription to `topic`: its source name.
pub fn subscription(topic: &str, flow: &str) -> String {
    format!("{topic}/{flow}")
}

/// Appends a lane's deliveries to a topic.
pub struct TopicSink {
    pub(crate) topic: String,
    pub(crate) journal: Arc<dyn Journal>,
    /// Woken after each append: the topic's subscribers in this process.
    pub(crate) published: Arc<Notify>,
}

impl Sink for TopicSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(async move {
            let mut entries = Vec::with_capacity(batch.len());
            let mut results: Vec<Option<WriteResult>> = Vec::with_capacity(batch.len());
            for d in batch {
                match serde_json::to_string(&d.payload) {
                    Ok(payload) => {
                        entries.push(TopicEntry {
                            id: d.idempotency_key.clone(),
                            entity_key: d.entity_key.clone(),
                            payload,
                            correlation_id: d.correlation_id.clone(),
                            causation_id: d.event_id.clone(),
                            flow: d.context.flow.clone(),
                            event_time: d.context.event_time_ms,
                            traceparent: d.context.traceparent.clone(),
                            tracestate: d.context.tracestate.clone(),
                        });
                        results.push(None);
                    }
                    Err(e) => results.push(Some(Err(SinkError::permanent(format!(
                        "the record cannot be written as JSON: {e}"
                    ))))),
                }
            }
            let outcome = if entries.is_empty() {
                Ok(())
            } else {
                self.journal
                    .publish(self.topic.clone(), entries)
                    .await
                    .map(|_| ())
            };
            if outcome.is_ok() {
                self.published.notify_waiters();
            }
            results
                .into_iter()
                .map(|r| match (r, &outcome) {
                    (Some(r), _) => r,
                    (None, Ok(())) => Ok(Written::default()),
                    (None, Err(e)) => Err(SinkError::retryable(format!(
                        "cannot append to topic `{}`: {e}",
                        self.topic
                    ))),
                })
                .collect()
        })
    }

    /// A write learns no id or version: a replayable source's keyless rows
    /// may be appended before their ingest commits (the journal keeps each
    /// id once if they are appended again).
    fn learns_nothing(&self) -> bool {
        true
    }
}

/// One flow's subscription to a topic.
pub struct TopicSource {
    pub(crate) topic: String,
    /// `<topic>/<flow>`.
    pub(crate) name: String,
    pub(crate) start: TopicStart,
    pub(crate) journal: Arc<dyn Journal>,
    pub(crate) published: Arc<Notify>,
}

impl TopicSource {
    fn error(&self, message: String) -> SourceError {
        SourceError {
            system: self.name.clone(),
            message,
        }
    }

    async fn read(&self, after: i64) -> Result<Vec<TopicMessage>, SourceError> {
        let journal = self.journal.clone();
        let topic = self.topic.clone();
        match tokio::task::spawn_blocking(move || journal.read().topic_read(&topic, after, BATCH))
            .await
        {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(self.error(format!("cannot read topic `{}`: {e}", self.topic))),
            Err(e) => Err(self.error(format!("the topic read failed: {e}"))),
        }
    }

    async fn head(&self) -> Result<i64, SourceError> {
        let journal = self.journal.clone();
        let topic = self.topic.clone();
        match tokio::task::spawn_blocking(move || journal.read().topic_head(&topic)).await {
            Ok(Ok(h)) => Ok(h),
            Ok(Err(e)) => Err(self.error(format!("cannot read topic `{}`: {e}", self.topic))),
            Err(e) => Err(self.error(format!("the topic read failed: {e}"))),
        }
    }

    /// Where this subscription resumes: its checkpoint, or (first run) the
    /// start it was given, saved at once for `now`.
    async fn position(
        &self,
        ingest: &Arc<dyn Ingest>,
        shutdown: &CancellationToken,
    ) -> Result<Option<i64>, SourceError> {
        match ingest.checkpoint(POSITION).await {
            Ok(Some(v)) => v.parse::<i64>().map(Some).map_err(|_| {
                self.error(format!(
                    "its checkpoint `{v}` is not a topic position (a number)"
                ))
            }),
            Ok(None) if self.start == TopicStart::Beginning => Ok(Some(0)),
            Ok(None) => {
                let head = self.head().await?;
                let saved = Batch {
                    records: Vec::new(),
                    checkpoint: Some(position(head)),
                };
                match self.ingest(ingest, saved, shutdown).await? {
                    true => Ok(Some(head)),
                    false => Ok(None),
                }
            }
            Err(e) => Err(self.error(format!("cannot read its checkpoint: {e}"))),
        }
    }

    /// Ingest `batch`, waiting while the hub does not accept; false when
    /// the hub stops first.
    async fn ingest(
        &self,
        ingest: &Arc<dyn Ingest>,
        batch: Batch,
        shutdown: &CancellationToken,
    ) -> Result<bool, SourceError> {
        loop {
            match ingest.ingest(batch.clone()).await {
                Ok(_) => return Ok(true),
                Err(IngestError::Unavailable(_)) => {
                    tokio::select! {
                        _ = tokio::time::sleep(POLL) => {}
                        _ = shutdown.cancelled() => return Ok(false),
                    }
                }
                Err(e) => return Err(self.error(e.to_string())),
            }
        }
    }

    fn record(&self, m: TopicMessage) -> Record {
        let where_ = || format!("topic {} message {}", self.topic, m.seq);
        match serde_json::from_str::<serde_json::Value>(&m.entry.payload) {
            Ok(data) => Record::Good(Event {
                id: m.entry.id,
                source: format!("weft:topic/{}", self.topic),
                ty: format!("weft.topic.{}", self.topic),
                time: Utc
                    .timestamp_millis_opt(m.entry.event_time)
                    .single()
                    .unwrap_or_else(Utc::now),
                subject: m.entry.entity_key,
                datacontenttype: "application/json".into(),
                correlationid: m.entry.correlation_id,
                causationid: Some(m.entry.causation_id),
                data,
                traceparent: m.entry.traceparent,
                tracestate: m.entry.tracestate,
            }),
            Err(e) => Record::Bad(BadRecord {
                location: where_(),
                id: m.entry.id,
                raw: m.entry.payload,
                error: format!("the message is not JSON: {e}"),
                correlation_id: m.entry.correlation_id,
            }),
        }
    }
}

fn position(seq: i64) -> Checkpoint {
    Checkpoint {
        key: POSITION.into(),
        value: seq.to_string(),
    }
}

impl Source for TopicSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let Some(mut after) = self.position(&ingest, &shutdown).await? else {
                return Ok(());
            };
            tracing::info!(subscription = %self.name, after, "reading topic");
            loop {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                // armed before the read: a publication after it wakes us
                let published = self.published.notified();
                tokio::pin!(published);
                published.as_mut().enable();
                let messages = self.read(after).await?;
                let Some(last) = messages.last().map(|m| m.seq) else {
                    tokio::select! {
                        _ = &mut published => {}
                        _ = tokio::time::sleep(POLL) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    continue;
                };
                let batch = Batch {
                    records: messages.into_iter().map(|m| self.record(m)).collect(),
                    checkpoint: Some(position(last)),
                };
                if !self.ingest(&ingest, batch, &shutdown).await? {
                    return Ok(());
                }
                after = last;
            }
        })
    }
}
