//! Topics inside the hub: a flow publishes its records to a named topic
//! (`topics:` in the config); other flows subscribe to it, each with its own
//! position, lane and DLQ.
//!
//! A topic is an append-only log in the journal (`topic_messages`), one
//! sequence for every topic, increasing in commit order. Publishing is a
//! destination like any other: its lane writes a batch with
//! [`crate::Journal::publish`] and settles it afterwards; a message whose
//! `(topic, id)` is already there (the lane wrote it, then died before it
//! settled) is not appended twice, so a topic holds each publication once.
//! A subscriber reads messages after its position
//! ([`crate::JournalRead::topic_read`]) and saves the position with the batch
//! it ingests, so it neither skips nor repeats one. Messages are deleted once
//! older than the topic's retention ([`crate::Journal::prune_topic`]); a
//! subscriber that was behind them resumes at the oldest message kept.

use rusqlite::{Connection, OptionalExtension, params};

use crate::StoreError;

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicEntry {
    /// Unique within the topic: the publishing write's idempotency key, so
    /// a publication retried after a crash is the same message.
    pub id: String,
    /// The entity key of the record, when its flow has one.
    pub entity_key: Option<String>,
    /// The record, as JSON text.
    pub payload: String,
    pub correlation_id: String,
    /// The id of the event the record came from.
    pub causation_id: String,
    /// The flow that published it.
    pub flow: String,
    /// The event's own time, ms since the epoch.
    pub event_time: i64,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// A message of a topic, as a subscriber reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMessage {
    /// Its place in the log (increasing in commit order; shared by every
    /// topic, so a topic's sequence has gaps).
    pub seq: i64,
    /// When it was appended, ms since the epoch.
    pub published_at: i64,
    pub entry: TopicEntry,
}

/// What one publish did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Messages appended.
    pub appended: usize,
    /// Messages whose id the topic already held (not appended again).
    pub duplicates: usize,
}

pub(crate) fn publish(
    tx: &Connection,
    topic: &str,
    entries: &[TopicEntry],
    now: i64,
) -> Result<Published, StoreError> {
    let mut st = tx.prepare_cached(
        "INSERT OR IGNORE INTO topic_messages (topic, id, entity_key, payload, correlation_id,
           causation_id, flow, event_time, traceparent, tracestate, published_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    let mut out = Published::default();
    for e in entries {
        let n = st.execute(params![
            topic,
            e.id,
            e.entity_key,
            e.payload,
            e.correlation_id,
            e.causation_id,
            e.flow,
            e.event_time,
            e.traceparent,
            e.tracestate,
            now
        ])?;
        if n == 1 {
            out.appended += 1;
        } else {
            out.duplicates += 1;
        }
    }
    Ok(out)
}

pub(crate) fn read(
    conn: &Connection,
    topic: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<TopicMessage>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT seq, published_at, id, entity_key, payload, correlation_id, causation_id, flow,
           event_time, traceparent, tracestate
         FROM topic_messages WHERE topic = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = st.query_map(
        params![topic, after, i64::try_from(limit).unwrap_or(i64::MAX)],
        |r| {
            Ok(TopicMessage {
                seq: r.get(0)?,
                published_at: r.get(1)?,
                entry: TopicEntry {
                    id: r.get(2)?,
                    entity_key: r.get(3)?,
                    payload: r.get(4)?,
                    correlation_id: r.get(5)?,
                    causation_id: r.get(6)?,
                    flow: r.get(7)?,
                    event_time: r.get(8)?,
                    traceparent: r.get(9)?,
                    tracestate: r.get(10)?,
                },
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(crate) fn head(conn: &Connection, topic: &str) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT MAX(seq) FROM topic_messages WHERE topic = ?1")?
        .query_row([topic], |r| r.get::<_, Option<i64>>(0))
        .optional()?
        .flatten()
        .unwrap_or(0))
}

pub(crate) fn behind(conn: &Connection, topic: &str, after: i64) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT count(*) FROM topic_messages WHERE topic = ?1 AND seq > ?2")?
        .query_row(params![topic, after], |r| r.get(0))?)
}

/// One slice: the oldest `limit` messages of `topic`, those of them
/// appended before `before`.
pub(crate) fn prune(
    tx: &Connection,
    topic: &str,
    before: i64,
    limit: usize,
) -> Result<usize, StoreError> {
    Ok(tx
        .prepare_cached(
            "DELETE FROM topic_messages WHERE seq IN
               (SELECT seq FROM topic_messages WHERE topic = ?1 ORDER BY seq LIMIT ?3)
               AND published_at < ?2",
        )?
        .execute(params![
            topic,
            before,
            i64::try_from(limit).unwrap_or(i64::MAX)
        ])?)
}
