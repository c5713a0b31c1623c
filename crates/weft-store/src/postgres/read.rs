//! Reads of the PostgreSQL journal. `counts` reads one REPEATABLE READ
//! snapshot (counters, their deltas and the pending rows of the same
//! commit); every other read is one statement, which PostgreSQL runs on one
//! snapshot anyway.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Row;

use super::ops::{outbox_row, with_row_columns};
use super::pool::Conn;
use crate::{
    Checkpoint, CrosswalkRow, DLQ_PAGE, DlqEntry, DlqFilter, DriftEvent, FlowCounts, LaneId,
    OutboxRow, RecordLookup, StoreError,
};

pub(crate) async fn counts(c: &mut Conn, lanes: &[LaneId]) -> Result<Vec<FlowCounts>, StoreError> {
    c.begin_snapshot().await?;
    let r = counts_in(c, lanes).await;
    c.finish(r).await
}

async fn counts_in(c: &mut Conn, lanes: &[LaneId]) -> Result<Vec<FlowCounts>, StoreError> {
    let mut raw: BTreeMap<(String, String), [i64; 6]> = BTreeMap::new();
    let mut received_at: BTreeMap<String, i64> = BTreeMap::new();
    for r in c
        .query(
            "SELECT flow, destination, sum(received)::int8, sum(filtered)::int8, sum(rejected)::int8,
                    sum(delivered)::int8, sum(dead_lettered)::int8, sum(discarded)::int8,
                    max(last_received_at)
             FROM (SELECT flow, destination, received, filtered, rejected, delivered, dead_lettered, discarded,
                          last_received_at
                     FROM flow_counts
                   UNION ALL
                   SELECT flow, destination, received, filtered, rejected, delivered, dead_lettered, discarded,
                          last_received_at
                     FROM count_deltas) t
             GROUP BY flow, destination",
            &[],
        )
        .await?
    {
        let mut v = [0i64; 6];
        for (i, x) in v.iter_mut().enumerate() {
            *x = r.try_get(i + 2)?;
        }
        let key: (String, String) = (r.try_get(0)?, r.try_get(1)?);
        if let (true, Some(at)) = (key.1.is_empty(), r.try_get::<_, Option<i64>>(8)?) {
            received_at.insert(key.0.clone(), at);
        }
        raw.insert(key, v);
    }
    let mut pending: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for r in c
        .query(
            "SELECT flow, destination, count(*), min(created_at) FROM outbox GROUP BY flow, destination",
            &[],
        )
        .await?
    {
        pending.insert((r.try_get(0)?, r.try_get(1)?), (r.try_get(2)?, r.try_get(3)?));
    }
    let mut all: Vec<(String, String)> = lanes
        .iter()
        .map(|l| (l.flow.clone(), l.destination.clone()))
        .collect();
    let mut seen: BTreeSet<(String, String)> = all.iter().cloned().collect();
    let extra: BTreeSet<&(String, String)> = raw
        .keys()
        .filter(|(_, d)| !d.is_empty())
        .chain(pending.keys())
        .collect();
    for l in extra {
        if seen.insert(l.clone()) {
            all.push(l.clone());
        }
    }
    let now = crate::now_ms();
    let mut out = Vec::with_capacity(all.len());
    for (flow, dest) in all {
        let fl = raw
            .get(&(flow.clone(), String::new()))
            .copied()
            .unwrap_or_default();
        let dl = raw
            .get(&(flow.clone(), dest.clone()))
            .copied()
            .unwrap_or_default();
        let (n, oldest) = pending
            .get(&(flow.clone(), dest.clone()))
            .copied()
            .map_or((0, None), |(n, t)| (n, Some((now - t).max(0))));
        // a follow-up enters one lane only: counted on the lane's own row
        let (received, filtered, rejected, fdisc) = (fl[0] + dl[0], fl[1], fl[2], fl[5]);
        let (delivered, dead, disc) = (dl[3], dl[4], dl[5]);
        out.push(FlowCounts {
            balanced: received == filtered + rejected + fdisc + delivered + dead + disc + n,
            destination: dest,
            received,
            filtered,
            rejected,
            delivered,
            dead_lettered: dead,
            discarded: fdisc + disc,
            pending: n,
            oldest_pending_ms: oldest,
            last_received_at: received_at.get(&flow).copied(),
            flow,
        });
    }
    Ok(out)
}

pub(crate) async fn outbox_len(c: &mut Conn) -> Result<i64, StoreError> {
    Ok(c.query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .try_get(0)?)
}

pub(crate) async fn checkpoint(
    c: &mut Conn,
    source: &str,
    key: &str,
) -> Result<Option<String>, StoreError> {
    match c
        .query_opt(
            "SELECT value FROM checkpoints WHERE source = $1 AND key = $2",
            &[&source, &key],
        )
        .await?
    {
        Some(r) => Ok(Some(r.try_get(0)?)),
        None => Ok(None),
    }
}

fn dlq_row(r: &Row) -> Result<DlqEntry, StoreError> {
    let history: String = r.try_get(15)?;
    let attempts: i32 = r.try_get(12)?;
    Ok(DlqEntry {
        id: r.try_get(0)?,
        status: r.try_get(1)?,
        stage: r.try_get(2)?,
        flow: r.try_get(3)?,
        destination: r.try_get(4)?,
        entity_key: r.try_get(5)?,
        idempotency_key: r.try_get(6)?,
        source: r.try_get(7)?,
        event_id: r.try_get(8)?,
        correlation_id: r.try_get(9)?,
        created_at: r.try_get(10)?,
        failed_at: r.try_get(11)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        error: r.try_get(13)?,
        payload: r.try_get(14)?,
        history: serde_json::from_str(&history).unwrap_or(serde_json::Value::Null),
        attributes: r.try_get(16)?,
        superseded_by: r.try_get(17)?,
        order_seq: r.try_get(18)?,
        resolved_at: r.try_get(19)?,
        payload_sha256: r.try_get(20)?,
    })
}

macro_rules! dlq_select {
    ($rest:literal) => {
        concat!(
            "SELECT id, status, stage, flow, destination, entity_key, idempotency_key, source, event_id,
                    correlation_id, created_at, failed_at, attempts, error, payload, history::text, attributes,
                    superseded_by, order_seq, resolved_at, payload_sha256 FROM dlq ",
            $rest
        )
    };
}

pub(crate) async fn dlq_list(c: &mut Conn, f: &DlqFilter) -> Result<Vec<DlqEntry>, StoreError> {
    // `dead` unless asked; `all` matches every status (NULL)
    let status: Option<&str> = match f.status.as_deref() {
        Some("all") => None,
        Some(s) => Some(s),
        None => Some("dead"),
    };
    let limit = i64::try_from(f.limit.unwrap_or(DLQ_PAGE)).unwrap_or(i64::MAX);
    let rows = c
        .query(
            dlq_select!(
                "WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR flow = $2)
                   AND ($3::text IS NULL OR destination = $3) AND ($4::text IS NULL OR strpos(error, $4) > 0)
                   AND ($5::int8 IS NULL OR failed_at >= $5) AND ($6::int8 IS NULL OR id > $6)
                 ORDER BY id LIMIT $7"
            ),
            &[
                &status,
                &f.flow,
                &f.destination,
                &f.error_contains,
                &f.since,
                &f.after_id,
                &limit,
            ],
        )
        .await?;
    rows.iter().map(dlq_row).collect()
}

pub(crate) async fn dlq_get(c: &mut Conn, id: i64) -> Result<Option<DlqEntry>, StoreError> {
    c.query_opt(dlq_select!("WHERE id = $1"), &[&id])
        .await?
        .as_ref()
        .map(dlq_row)
        .transpose()
}

pub(crate) async fn dlq_depths(c: &mut Conn) -> Result<Vec<(String, String, i64)>, StoreError> {
    c.query(
        "SELECT flow, destination, count(*) FROM dlq WHERE status = 'dead'
         GROUP BY flow, destination ORDER BY flow, destination",
        &[],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
    .collect()
}

pub(crate) async fn crosswalk(
    c: &mut Conn,
    system: Option<&str>,
    limit: usize,
) -> Result<Vec<CrosswalkRow>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    c.query(
        "SELECT system, source, source_key, COALESCE(external_id, ''), flow, event_id, created_at, updated_at
         FROM crosswalk WHERE $1::text IS NULL OR system = $1 ORDER BY touch DESC LIMIT $2",
        &[&system, &limit],
    )
    .await?
    .iter()
    .map(crosswalk_row)
    .collect()
}

fn crosswalk_row(r: &Row) -> Result<CrosswalkRow, StoreError> {
    Ok(CrosswalkRow {
        system: r.try_get(0)?,
        source: r.try_get(1)?,
        source_key: r.try_get(2)?,
        external_id: r.try_get(3)?,
        flow: r.try_get(4)?,
        event_id: r.try_get(5)?,
        created_at: r.try_get(6)?,
        updated_at: r.try_get(7)?,
    })
}

/// Every saved source position, by source and key.
pub(crate) async fn checkpoints(c: &mut Conn) -> Result<Vec<Checkpoint>, StoreError> {
    c.query(
        "SELECT source, key, value, updated_at FROM checkpoints ORDER BY source, key",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Checkpoint {
            source: r.try_get(0)?,
            key: r.try_get(1)?,
            value: r.try_get(2)?,
            updated_at: r.try_get(3)?,
        })
    })
    .collect()
}

/// Outbox rows, DLQ entries and crosswalk entries whose event id,
/// correlation id or entity key is `id`, at most `limit` of each, read on
/// one snapshot. As on SQLite, the outbox and the DLQ have no index on
/// these columns: a scan, for an operator's search, not a hot path.
pub(crate) async fn lookup(
    c: &mut Conn,
    id: &str,
    limit: usize,
) -> Result<RecordLookup, StoreError> {
    c.begin_snapshot().await?;
    let r = lookup_in(c, id, limit).await;
    c.finish(r).await
}

async fn lookup_in(c: &mut Conn, id: &str, limit: usize) -> Result<RecordLookup, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let pending = c
        .query(
            with_row_columns!(
                "SELECT ";
                " FROM outbox o WHERE o.event_id = $1 OR o.correlation_id = $1 OR o.entity_key = $1
                   ORDER BY o.order_seq, o.id LIMIT $2"
            ),
            &[&id, &limit],
        )
        .await?
        .iter()
        .map(outbox_row)
        .collect::<Result<_, _>>()?;
    let dead = c
        .query(
            dlq_select!(
                "WHERE event_id = $1 OR correlation_id = $1 OR entity_key = $1 ORDER BY id LIMIT $2"
            ),
            &[&id, &limit],
        )
        .await?
        .iter()
        .map(dlq_row)
        .collect::<Result<_, _>>()?;
    let written = c
        .query(
            "SELECT system, source, source_key, COALESCE(external_id, ''), flow, event_id, created_at, updated_at
             FROM crosswalk WHERE event_id = $1 OR source_key = $1 OR external_id = $1
             ORDER BY touch DESC LIMIT $2",
            &[&id, &limit],
        )
        .await?
        .iter()
        .map(crosswalk_row)
        .collect::<Result<_, _>>()?;
    // the trail is indexed on each: the newest `limit`, oldest first
    let mut attempts = Vec::new();
    for r in c
        .query(
            "SELECT id, flow, destination, event_id, correlation_id, entity_key, attempt, at,
                    latency_ms, status, outcome, error FROM attempts
             WHERE id IN (SELECT id FROM attempts WHERE event_id = $1
                          UNION SELECT id FROM attempts WHERE correlation_id = $1
                          UNION SELECT id FROM attempts WHERE entity_key = $1)
             ORDER BY id DESC LIMIT $2",
            &[&id, &limit],
        )
        .await?
    {
        let status: Option<i32> = r.try_get(9)?;
        attempts.push(crate::AttemptRow {
            id: r.try_get(0)?,
            flow: r.try_get(1)?,
            destination: r.try_get(2)?,
            event_id: r.try_get(3)?,
            correlation_id: r.try_get(4)?,
            entity_key: r.try_get(5)?,
            attempt: r.try_get(6)?,
            at: r.try_get(7)?,
            latency_ms: r.try_get(8)?,
            status: status.and_then(|s| u16::try_from(s).ok()),
            outcome: r.try_get(10)?,
            error: r.try_get(11)?,
        });
    }
    attempts.reverse();
    Ok(RecordLookup {
        pending,
        dead,
        written,
        attempts,
    })
}

pub(crate) async fn pending(
    c: &mut Conn,
    lane: &LaneId,
    limit: usize,
) -> Result<Vec<OutboxRow>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    c.query(
        with_row_columns!(
            "SELECT ";
            " FROM outbox o WHERE o.flow = $1 AND o.destination = $2 ORDER BY o.order_seq, o.id LIMIT $3"
        ),
        &[&lane.flow, &lane.destination, &limit],
    )
    .await?
    .iter()
    .map(outbox_row)
    .collect()
}

pub(crate) async fn stream_shape(c: &mut Conn, source: &str) -> Result<Option<String>, StoreError> {
    match c
        .query_opt(
            "SELECT shape FROM stream_shapes WHERE source = $1",
            &[&source],
        )
        .await?
    {
        Some(r) => Ok(Some(r.try_get(0)?)),
        None => Ok(None),
    }
}

pub(crate) async fn drift_events(
    c: &mut Conn,
    source: Option<&str>,
) -> Result<Vec<DriftEvent>, StoreError> {
    c.query(
        "SELECT id, source, kind, path, detail, example, first_seen, last_seen, count, accepted_at
         FROM drift_events WHERE $1::text IS NULL OR source = $1 ORDER BY id",
        &[&source],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(DriftEvent {
            id: r.try_get(0)?,
            source: r.try_get(1)?,
            kind: r.try_get(2)?,
            path: r.try_get(3)?,
            detail: r.try_get(4)?,
            example: r.try_get(5)?,
            first_seen: r.try_get(6)?,
            last_seen: r.try_get(7)?,
            count: r.try_get(8)?,
            accepted_at: r.try_get(9)?,
        })
    })
    .collect()
}

/// The sources' leases, by source, with whether each still runs.
pub(crate) async fn source_leases(c: &mut Conn) -> Result<Vec<crate::SourceLease>, StoreError> {
    c.query(
        "SELECT source, node, epoch, lease_until, acquired_at,
                lease_until > (extract(epoch from clock_timestamp()) * 1000)::int8
         FROM source_leases ORDER BY source",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(crate::SourceLease {
            source: r.try_get(0)?,
            node: r.try_get(1)?,
            epoch: r.try_get(2)?,
            lease_until: r.try_get(3)?,
            acquired_at: r.try_get(4)?,
            live: r.try_get(5)?,
        })
    })
    .collect()
}

/// The hubs on the journal (its `nodes` rows) and the rows each holds
/// claimed; one snapshot (one statement).
pub(crate) async fn nodes(c: &mut Conn) -> Result<Vec<crate::NodeInfo>, StoreError> {
    c.query(
        "WITH claims AS (SELECT lease_node, count(*)::int8 AS n FROM outbox
                          WHERE token <> 0 AND lease_node IS NOT NULL GROUP BY lease_node)
         SELECT n.node, n.started_at, n.beat_at, n.alive_until,
                n.alive_until > (extract(epoch from clock_timestamp()) * 1000)::int8,
                coalesce(c.n, 0)
         FROM nodes n LEFT JOIN claims c ON c.lease_node = n.node ORDER BY n.node",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(crate::NodeInfo {
            node: r.try_get(0)?,
            started_at: r.try_get(1)?,
            beat_at: r.try_get(2)?,
            alive_until: r.try_get(3)?,
            alive: r.try_get(4)?,
            claimed: r.try_get(5)?,
        })
    })
    .collect()
}

pub(crate) async fn topic_read(
    c: &mut Conn,
    topic: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<crate::TopicMessage>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = c
        .query(
            "SELECT seq, published_at, id, entity_key, payload, correlation_id, causation_id, flow,
               event_time, traceparent, tracestate
             FROM topic_messages WHERE topic = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            &[&topic, &after, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(crate::TopicMessage {
                seq: r.try_get(0)?,
                published_at: r.try_get(1)?,
                entry: crate::TopicEntry {
                    id: r.try_get(2)?,
                    entity_key: r.try_get(3)?,
                    payload: r.try_get(4)?,
                    correlation_id: r.try_get(5)?,
                    causation_id: r.try_get(6)?,
                    flow: r.try_get(7)?,
                    event_time: r.try_get(8)?,
                    traceparent: r.try_get(9)?,
                    tracestate: r.try_get(10)?,
                },
            })
        })
        .collect()
}

pub(crate) async fn topic_behind(c: &mut Conn, topic: &str, after: i64) -> Result<i64, StoreError> {
    Ok(c.query_one(
        "SELECT count(*)::int8 FROM topic_messages WHERE topic = $1 AND seq > $2",
        &[&topic, &after],
    )
    .await?
    .try_get(0)?)
}

pub(crate) async fn topic_head(c: &mut Conn, topic: &str) -> Result<i64, StoreError> {
    Ok(c.query_one(
        "SELECT COALESCE(max(seq), 0)::int8 FROM topic_messages WHERE topic = $1",
        &[&topic],
    )
    .await?
    .try_get(0)?)
}
