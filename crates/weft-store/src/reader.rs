//! Read connections: outbox fetches for delivery workers, status, DLQ views.

use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use serde::Serialize;

use crate::{LaneId, StoreError};

/// One crosswalk entry: the id `system` gave the record `source_key` of
/// `source`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CrosswalkRow {
    pub system: String,
    pub source: String,
    pub source_key: String,
    pub external_id: String,
    pub flow: String,
    pub event_id: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A pending delivery as stored.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub flow: String,
    pub destination: String,
    pub entity_key: Option<String>,
    pub idempotency_key: String,
    pub source: String,
    pub event_id: String,
    pub correlation_id: String,
    pub created_at: i64,
    pub attempts: u32,
    pub next_at: i64,
    pub last_error: Option<String>,
    /// Position in its entity key's order (the id, or the original id of a replayed row).
    pub order_seq: i64,
    pub payload: String,
    /// The event's own time, ms (`created_at` is when weft accepted it).
    pub event_time: i64,
    /// The source's version of the record, for sinks that refuse stale writes.
    pub source_version: Option<String>,
    /// The source transaction it belongs to (CDC).
    pub group_id: Option<String>,
    /// W3C trace context of the event.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Counts of one flow and destination, with the accounting check.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FlowCounts {
    pub flow: String,
    pub destination: String,
    pub received: i64,
    pub filtered: i64,
    pub rejected: i64,
    pub delivered: i64,
    pub dead_lettered: i64,
    pub discarded: i64,
    /// Rows in the outbox, counted (not derived).
    pub pending: i64,
    /// Age in ms of the oldest pending row, if any.
    pub oldest_pending_ms: Option<i64>,
    /// When the flow last received a record (ms since 1970; duplicates do
    /// not count), if ever: the flow's freshness.
    #[serde(default)]
    pub last_received_at: Option<i64>,
    /// `received == filtered + rejected + discarded + delivered + dead_lettered + pending`.
    pub balanced: bool,
}

/// A DLQ entry. Once it is resolved (replayed, discarded) its payload is
/// dropped: `payload` is empty and `payload_sha256` holds what it was (the
/// outbox has the replayed copy; a discarded one is not wanted). Serialized
/// with `payload: null` and a `payload_dropped` sentence then.
#[derive(Debug, Clone)]
pub struct DlqEntry {
    pub id: i64,
    pub status: String,
    pub stage: String,
    pub flow: String,
    pub destination: String,
    pub entity_key: Option<String>,
    pub idempotency_key: Option<String>,
    pub source: String,
    pub event_id: String,
    pub correlation_id: String,
    pub created_at: i64,
    pub failed_at: i64,
    pub attempts: u32,
    pub error: String,
    pub payload: String,
    pub history: serde_json::Value,
    /// The event's CloudEvents attributes (parse/map stage), for replays.
    pub attributes: Option<String>,
    /// The event of a later write of the same key that was delivered after
    /// this entry failed: replaying it would put older data over newer.
    pub superseded_by: Option<String>,
    /// Its place in its key's order.
    pub order_seq: Option<i64>,
    /// When it was replayed or discarded (ms); `None` while dead.
    pub resolved_at: Option<i64>,
    /// The SHA-256 (hex) of the payload, dropped when the entry was resolved.
    pub payload_sha256: Option<String>,
}

impl DlqEntry {
    /// "payload dropped after resolve (sha256 …)" when the payload is gone.
    pub fn payload_dropped(&self) -> Option<String> {
        self.payload_sha256
            .as_ref()
            .map(|h| format!("payload dropped after resolve (sha256 {h})"))
    }
}

impl Serialize for DlqEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            id: i64,
            status: &'a str,
            stage: &'a str,
            flow: &'a str,
            destination: &'a str,
            entity_key: &'a Option<String>,
            idempotency_key: &'a Option<String>,
            source: &'a str,
            event_id: &'a str,
            correlation_id: &'a str,
            created_at: i64,
            failed_at: i64,
            attempts: u32,
            error: &'a str,
            /// `null` once dropped (never an empty or made-up payload)
            payload: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload_dropped: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            payload_sha256: &'a Option<String>,
            history: &'a serde_json::Value,
            attributes: &'a Option<String>,
            superseded_by: &'a Option<String>,
            order_seq: Option<i64>,
            resolved_at: Option<i64>,
        }
        Out {
            id: self.id,
            status: &self.status,
            stage: &self.stage,
            flow: &self.flow,
            destination: &self.destination,
            entity_key: &self.entity_key,
            idempotency_key: &self.idempotency_key,
            source: &self.source,
            event_id: &self.event_id,
            correlation_id: &self.correlation_id,
            created_at: self.created_at,
            failed_at: self.failed_at,
            attempts: self.attempts,
            error: &self.error,
            payload: self
                .payload_sha256
                .is_none()
                .then_some(self.payload.as_str()),
            payload_dropped: self.payload_dropped(),
            payload_sha256: &self.payload_sha256,
            history: &self.history,
            attributes: &self.attributes,
            superseded_by: &self.superseded_by,
            order_seq: self.order_seq,
            resolved_at: self.resolved_at,
        }
        .serialize(s)
    }
}

/// DLQ query; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    pub flow: Option<String>,
    pub destination: Option<String>,
    /// Substring of the error.
    pub error_contains: Option<String>,
    /// `dead` unless set; `all` for every status.
    pub status: Option<String>,
    /// Failed at or after (ms).
    pub since: Option<i64>,
    /// Entries with an id above this (the cursor of the previous page).
    pub after_id: Option<i64>,
    pub limit: Option<usize>,
}

/// Which node runs a source (several hubs on one journal: see
/// `Journal::lease_source`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SourceLease {
    pub source: String,
    pub node: String,
    /// Moves on each time the lease passes to another node.
    pub epoch: i64,
    /// When it runs out unless renewed (ms since 1970, the database's clock).
    pub lease_until: i64,
    /// Since when this node holds it (ms).
    pub acquired_at: i64,
    /// Whether it still runs (`lease_until` is ahead of the database's
    /// clock at the read).
    pub live: bool,
}

/// A source's saved position under one key (`weft` keeps one or a few
/// keys per source: a file's offset, a cursor, an LSN).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub source: String,
    pub key: String,
    /// As the source saved it (JSON or text).
    pub value: String,
    /// ms since 1970.
    pub updated_at: i64,
}

/// What the store keeps of the records one id names: an event id, a
/// correlation id or an entity key (the crosswalk's source key).
#[derive(Debug, Clone, Default)]
pub struct RecordLookup {
    /// Rows waiting to be written (attempts so far, last error, next try).
    pub pending: Vec<OutboxRow>,
    /// DLQ entries of any status, with their history.
    pub dead: Vec<DlqEntry>,
    /// What destinations said of records weft wrote (their ids).
    pub written: Vec<CrosswalkRow>,
    /// Every write of these records to a destination, oldest first: when,
    /// how long, what the destination answered, what became of the row.
    pub attempts: Vec<AttemptRow>,
}

/// One entry of the attempt trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRow {
    pub id: i64,
    pub flow: String,
    pub destination: String,
    pub event_id: String,
    pub correlation_id: String,
    pub entity_key: Option<String>,
    /// 1 for the first write of the row.
    pub attempt: i64,
    /// When it was sent, ms since 1970.
    pub at: i64,
    pub latency_ms: i64,
    /// The destination's HTTP status, when it speaks HTTP.
    pub status: Option<u16>,
    /// `delivered`, `retry` or `dead`.
    pub outcome: String,
    /// Why it failed (none when delivered).
    pub error: Option<String>,
}

/// A read-only connection.
pub struct Reader {
    pub(crate) conn: Connection,
}

impl Reader {
    /// A canonical record with its links.
    pub fn canonical(
        &self,
        entity: &str,
        id: &str,
    ) -> Result<Option<crate::canonical::CanonicalView>, StoreError> {
        crate::canonical::sql::ready(crate::canonical::view(
            &mut crate::canonical::sql::Lite(&self.conn),
            entity,
            id,
        ))
    }
    /// `(entity, canonical id)`, newest change first.
    pub fn canonical_list(
        &self,
        entity: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        crate::canonical::sql::ready(crate::canonical::list(
            &mut crate::canonical::sql::Lite(&self.conn),
            entity,
            limit,
        ))
    }
    /// The canonical id a system's id is linked to.
    pub fn canonical_by_external(
        &self,
        entity: &str,
        system: &str,
        external_id: &str,
    ) -> Result<Option<String>, StoreError> {
        crate::canonical::sql::ready(crate::canonical::by_external(
            &mut crate::canonical::sql::Lite(&self.conn),
            entity,
            system,
            external_id,
        ))
    }
    /// History entries, oldest first.
    pub fn canonical_history(
        &self,
        f: &crate::HistoryFilter,
    ) -> Result<Vec<crate::canonical::HistoryEntry>, StoreError> {
        crate::canonical::sql::ready(crate::canonical::history_of(
            &mut crate::canonical::sql::Lite(&self.conn),
            f,
        ))
    }
    /// Manual conflicts.
    pub fn conflicts(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::canonical::ConflictEntry>, StoreError> {
        crate::canonical::sql::ready(crate::canonical::conflicts(
            &mut crate::canonical::sql::Lite(&self.conn),
            status,
            limit,
        ))
    }
    /// Per entity: live records, open conflicts, held matches and the
    /// history's actions counted.
    pub fn identity_summary(&self) -> Result<Vec<crate::canonical::IdentitySummary>, StoreError> {
        // a store older than these tables (read-only: never migrated here)
        if crate::schema::version(&self.conn)? < 6 {
            return Ok(Vec::new());
        }
        crate::canonical::sql::ready(crate::canonical::summary(&mut crate::canonical::sql::Lite(
            &self.conn,
        )))
    }
    /// Reports held for review.
    pub fn matches(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::canonical::MatchEntry>, StoreError> {
        crate::canonical::sql::ready(crate::canonical::matches(
            &mut crate::canonical::sql::Lite(&self.conn),
            status,
            limit,
        ))
    }

    /// Pending rows of a lane in key order.
    pub fn pending(&self, lane: &LaneId, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM outbox WHERE flow = ?1 AND destination = ?2 ORDER BY order_seq, id LIMIT ?3",
            crate::writer::ROW_COLUMNS
        );
        let mut st = self.conn.prepare_cached(&sql)?;
        let rows = st.query_map(
            params![lane.flow, lane.destination, limit as i64],
            crate::writer::outbox_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every flow and destination's counts, with pending rows counted.
    /// `lanes` lists the (flow, destination) pairs of the config so that
    /// lanes with nothing yet still show.
    pub fn counts(&self, lanes: &[LaneId]) -> Result<Vec<FlowCounts>, StoreError> {
        // one snapshot: counters and pending rows of the same commit
        self.conn.execute_batch("BEGIN")?;
        let out = self.counts_in_snapshot(lanes);
        let end = self.conn.execute_batch("COMMIT");
        let out = out?;
        end?;
        Ok(out)
    }

    fn counts_in_snapshot(&self, lanes: &[LaneId]) -> Result<Vec<FlowCounts>, StoreError> {
        let mut raw: std::collections::BTreeMap<(String, String), [i64; 6]> = Default::default();
        let mut seen: std::collections::BTreeMap<String, i64> = Default::default();
        let mut st = self.conn.prepare_cached(
            "SELECT flow, destination, received, filtered, rejected, delivered, dead_lettered, discarded,
                    last_received_at FROM flow_counts",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                [
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ],
                r.get::<_, Option<i64>>(8)?,
            ))
        })?;
        for row in rows {
            let (k, v, at) = row?;
            if let (true, Some(at)) = (k.1.is_empty(), at) {
                seen.insert(k.0.clone(), at);
            }
            raw.insert(k, v);
        }
        let mut all: Vec<(String, String)> = lanes
            .iter()
            .map(|l| (l.flow.clone(), l.destination.clone()))
            .collect();
        for (f, d) in raw.keys() {
            if !d.is_empty() && !all.contains(&(f.clone(), d.clone())) {
                all.push((f.clone(), d.clone()));
            }
        }
        let mut out = Vec::new();
        for (flow, dest) in all {
            let fl = raw
                .get(&(flow.clone(), String::new()))
                .copied()
                .unwrap_or_default();
            let dl = raw
                .get(&(flow.clone(), dest.clone()))
                .copied()
                .unwrap_or_default();
            let (pending, oldest) = self.lane_depth(&flow, &dest)?;
            // a follow-up enters one lane only: counted on the lane's own row
            let (received, filtered, rejected, fdisc) = (fl[0] + dl[0], fl[1], fl[2], fl[5]);
            let (delivered, dead, disc) = (dl[3], dl[4], dl[5]);
            out.push(FlowCounts {
                balanced: received
                    == filtered + rejected + fdisc + delivered + dead + disc + pending,
                destination: dest,
                received,
                filtered,
                rejected,
                delivered,
                dead_lettered: dead,
                discarded: fdisc + disc,
                pending,
                oldest_pending_ms: oldest,
                last_received_at: seen.get(&flow).copied(),
                flow,
            });
        }
        Ok(out)
    }

    /// Pending rows and oldest age (ms) of one lane; cheap (index).
    pub fn lane_depth(
        &self,
        flow: &str,
        destination: &str,
    ) -> Result<(i64, Option<i64>), StoreError> {
        let (pending, oldest): (i64, Option<i64>) = self.conn.query_row(
            "SELECT count(*), min(created_at) FROM outbox WHERE flow = ?1 AND destination = ?2",
            params![flow, destination],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((pending, oldest.map(|t| (crate::now_ms() - t).max(0))))
    }

    /// Crosswalk entries, newest first, of one destination system or all.
    pub fn crosswalk(
        &self,
        system: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CrosswalkRow>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT system, source, source_key, external_id, flow, event_id, created_at, updated_at
             FROM crosswalk WHERE ?1 IS NULL OR system = ?1 ORDER BY updated_at DESC, rowid DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![system, limit as i64], |r| {
            Ok(CrosswalkRow {
                system: r.get(0)?,
                source: r.get(1)?,
                source_key: r.get(2)?,
                external_id: r.get(3)?,
                flow: r.get(4)?,
                event_id: r.get(5)?,
                created_at: r.get(6)?,
                updated_at: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The id `system` gave the record `source_key` of `source`, if known.
    pub fn external_id(
        &self,
        system: &str,
        source: &str,
        source_key: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT external_id FROM crosswalk WHERE system = ?1 AND source = ?2 AND source_key = ?3",
                params![system, source, source_key],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Rows in the whole outbox.
    pub fn outbox_len(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?)
    }

    /// DLQ entries with status `dead`, per flow and destination.
    pub fn dlq_depths(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT flow, destination, count(*) FROM dlq WHERE status = 'dead' GROUP BY flow, destination",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn dlq_list(&self, f: &DlqFilter) -> Result<Vec<DlqEntry>, StoreError> {
        let mut sql = String::from(
            "SELECT id, status, stage, flow, destination, entity_key, idempotency_key, source, event_id,
                    correlation_id, created_at, failed_at, attempts, error, payload, history, attributes,
                    superseded_by, order_seq, resolved_at, payload_sha256 FROM dlq WHERE 1=1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        match f.status.as_deref() {
            Some("all") => {}
            Some(s) => {
                sql.push_str(" AND status = ?");
                args.push(s.to_owned().into());
            }
            None => sql.push_str(" AND status = 'dead'"),
        }
        if let Some(v) = &f.flow {
            sql.push_str(" AND flow = ?");
            args.push(v.clone().into());
        }
        if let Some(v) = &f.destination {
            sql.push_str(" AND destination = ?");
            args.push(v.clone().into());
        }
        if let Some(v) = &f.error_contains {
            sql.push_str(" AND instr(error, ?) > 0");
            args.push(v.clone().into());
        }
        if let Some(v) = f.since {
            sql.push_str(" AND failed_at >= ?");
            args.push(v.into());
        }
        if let Some(v) = f.after_id {
            sql.push_str(" AND id > ?");
            args.push(v.into());
        }
        sql.push_str(" ORDER BY id LIMIT ?");
        args.push((f.limit.unwrap_or(crate::DLQ_PAGE) as i64).into());
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map(params_from_iter(args), dlq_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn dlq_get(&self, id: i64) -> Result<Option<DlqEntry>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, status, stage, flow, destination, entity_key, idempotency_key, source, event_id,
                        correlation_id, created_at, failed_at, attempts, error, payload, history, attributes,
                    superseded_by, order_seq, resolved_at, payload_sha256 FROM dlq WHERE id = ?1",
                [id],
                dlq_row,
            )
            .optional()?)
    }

    /// Every saved source position, by source and key.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT source, key, value, updated_at FROM checkpoints ORDER BY source, key",
        )?;
        let rows = st.query_map([], |r| {
            Ok(Checkpoint {
                source: r.get(0)?,
                key: r.get(1)?,
                value: r.get(2)?,
                updated_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Outbox rows, DLQ entries and crosswalk entries whose event id,
    /// correlation id or entity key is `id`, at most `limit` of each. The
    /// outbox and the DLQ have no index on these columns: a scan, fine for
    /// an operator's search, not for a hot path.
    pub fn lookup(&self, id: &str, limit: usize) -> Result<RecordLookup, StoreError> {
        let sql = format!(
            "SELECT {} FROM outbox WHERE event_id = ?1 OR correlation_id = ?1 OR entity_key = ?1
             ORDER BY order_seq, id LIMIT ?2",
            crate::writer::ROW_COLUMNS
        );
        let mut st = self.conn.prepare_cached(&sql)?;
        let pending = st
            .query_map(params![id, limit as i64], crate::writer::outbox_row)?
            .collect::<Result<_, _>>()?;
        let mut st = self.conn.prepare_cached(
            "SELECT id, status, stage, flow, destination, entity_key, idempotency_key, source, event_id,
                    correlation_id, created_at, failed_at, attempts, error, payload, history, attributes,
                    superseded_by, order_seq, resolved_at, payload_sha256 FROM dlq
             WHERE event_id = ?1 OR correlation_id = ?1 OR entity_key = ?1 ORDER BY id LIMIT ?2",
        )?;
        let dead = st
            .query_map(params![id, limit as i64], dlq_row)?
            .collect::<Result<_, _>>()?;
        let mut st = self.conn.prepare_cached(
            "SELECT system, source, source_key, external_id, flow, event_id, created_at, updated_at
             FROM crosswalk WHERE event_id = ?1 OR source_key = ?1 OR external_id = ?1
             ORDER BY updated_at DESC LIMIT ?2",
        )?;
        let written = st
            .query_map(params![id, limit as i64], |r| {
                Ok(CrosswalkRow {
                    system: r.get(0)?,
                    source: r.get(1)?,
                    source_key: r.get(2)?,
                    external_id: r.get(3)?,
                    flow: r.get(4)?,
                    event_id: r.get(5)?,
                    created_at: r.get(6)?,
                    updated_at: r.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut st = self.conn.prepare_cached(
            "SELECT id, flow, destination, event_id, correlation_id, entity_key, attempt, at,
                    latency_ms, status, outcome, error FROM attempts
             WHERE id IN (SELECT id FROM attempts WHERE event_id = ?1
                          UNION SELECT id FROM attempts WHERE correlation_id = ?1
                          UNION SELECT id FROM attempts WHERE entity_key = ?1)
             ORDER BY id DESC LIMIT ?2",
        )?;
        let mut attempts: Vec<AttemptRow> = st
            .query_map(params![id, limit as i64], |r| {
                Ok(AttemptRow {
                    id: r.get(0)?,
                    flow: r.get(1)?,
                    destination: r.get(2)?,
                    event_id: r.get(3)?,
                    correlation_id: r.get(4)?,
                    entity_key: r.get(5)?,
                    attempt: r.get(6)?,
                    at: r.get(7)?,
                    latency_ms: r.get(8)?,
                    status: r.get(9)?,
                    outcome: r.get(10)?,
                    error: r.get(11)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        // the newest `limit`, shown oldest first
        attempts.reverse();
        Ok(RecordLookup {
            pending,
            dead,
            written,
            attempts,
        })
    }

    /// See [`crate::JournalRead::topic_head`].
    pub fn topic_head(&self, topic: &str) -> Result<i64, StoreError> {
        crate::topic::head(&self.conn, topic)
    }

    /// See [`crate::JournalRead::topic_behind`].
    pub fn topic_behind(&self, topic: &str, after: i64) -> Result<i64, StoreError> {
        crate::topic::behind(&self.conn, topic, after)
    }

    pub fn checkpoint(&self, source: &str, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM checkpoints WHERE source = ?1 AND key = ?2",
                params![source, key],
                |r| r.get(0),
            )
            .optional()?)
    }
}

fn dlq_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DlqEntry> {
    let history: String = r.get(15)?;
    Ok(DlqEntry {
        id: r.get(0)?,
        status: r.get(1)?,
        stage: r.get(2)?,
        flow: r.get(3)?,
        destination: r.get(4)?,
        entity_key: r.get(5)?,
        idempotency_key: r.get(6)?,
        source: r.get(7)?,
        event_id: r.get(8)?,
        correlation_id: r.get(9)?,
        created_at: r.get(10)?,
        failed_at: r.get(11)?,
        attempts: r.get(12)?,
        error: r.get(13)?,
        payload: r.get(14)?,
        history: serde_json::from_str(&history).unwrap_or(serde_json::Value::Null),
        attributes: r.get(16)?,
        superseded_by: r.get(17)?,
        order_seq: r.get(18)?,
        resolved_at: r.get(19)?,
        payload_sha256: r.get(20)?,
    })
}
