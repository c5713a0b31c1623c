//! The journal's transactions on PostgreSQL. Each function runs one
//! transaction on one connection, in a few statements over arrays
//! (`unnest`), whatever the size of the batch.
//!
//! Lock order, everywhere: the key locks first (advisory, transaction
//! scoped, in ascending order, taken once at the start), then rows. Claims
//! take no key lock and never wait (`FOR UPDATE SKIP LOCKED`), so they never
//! hold anything another transaction waits for while they wait themselves.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::json;
use sha2::Digest;
use tokio_postgres::Row;

use super::pool::Conn;
use crate::journal::{ClaimRequest, Claimed, FollowUp, Outcome, Refusal, Replay, Settle, Settled};
use crate::{
    Applied, Dedupe, DriftBatch, FlowOutcome, IngestBatch, NewDelivery, OutboxRow, Stage,
    StoreError,
};

/// The advisory lock of an entity key: every transaction that changes a
/// key's queues (any destination), its holds or its dead entries holds it.
pub(crate) fn key_lock(schema: &str, key: &str) -> i64 {
    lock_id(schema, "key", key)
}

/// An advisory lock id in weft's space: 8 bytes of a SHA-256.
pub(crate) fn lock_id(schema: &str, kind: &str, name: &str) -> i64 {
    let mut h = sha2::Sha256::new();
    for part in ["weft", schema, kind, name] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

/// 16 bytes of the SHA-256 of an event id: the dedupe key (as SQLite).
fn id_hash(id: &str) -> Vec<u8> {
    sha2::Sha256::digest(id.as_bytes())[..16].to_vec()
}

/// What a transaction needs to know of its journal.
pub(crate) struct Ctx<'a> {
    pub schema: &'a str,
    pub node: &'a str,
}

impl Ctx<'_> {
    fn locks<'k>(&self, keys: impl IntoIterator<Item = &'k str>) -> Vec<i64> {
        let set: BTreeSet<i64> = keys.into_iter().map(|k| key_lock(self.schema, k)).collect();
        set.into_iter().collect()
    }
}

// ---------------------------------------------------------------------------
// counters

#[derive(Default, Clone, Copy)]
struct Counts {
    received: i64,
    filtered: i64,
    rejected: i64,
    delivered: i64,
    dead_lettered: i64,
    discarded: i64,
    /// A flow-level row: an ingest received a record (its time becomes
    /// `last_received_at`; a replay's recount does not).
    seen: bool,
}

type Deltas = BTreeMap<(String, String), Counts>;

fn bump(d: &mut Deltas, flow: &str, dest: &str, f: impl FnOnce(&mut Counts)) {
    f(d.entry((flow.to_owned(), dest.to_owned())).or_default());
}

/// The transaction's counter changes, appended (no row shared with other
/// writers).
async fn write_counts(c: &mut Conn, d: &Deltas) -> Result<(), StoreError> {
    if d.is_empty() {
        return Ok(());
    }
    let mut cols: [Vec<i64>; 6] = Default::default();
    let (mut flows, mut dests) = (Vec::new(), Vec::new());
    for ((f, dest), n) in d {
        flows.push(f.as_str());
        dests.push(dest.as_str());
        for (col, v) in cols.iter_mut().zip([
            n.received,
            n.filtered,
            n.rejected,
            n.delivered,
            n.dead_lettered,
            n.discarded,
        ]) {
            col.push(v);
        }
    }
    // a flow-level delta an ingest received records on carries the time
    let now = crate::now_ms();
    let seen: Vec<Option<i64>> = d
        .iter()
        .map(|((_, dest), n)| (dest.is_empty() && n.seen).then_some(now))
        .collect();
    c.execute(
        "INSERT INTO count_deltas (flow, destination, received, filtered, rejected, delivered, dead_lettered, discarded, last_received_at)
         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::int8[], $9::int8[])",
        &[&flows, &dests, &cols[0], &cols[1], &cols[2], &cols[3], &cols[4], &cols[5], &seen],
    )
    .await?;
    Ok(())
}

/// Fold up to `limit` counter deltas into `flow_counts`, in one
/// transaction (a snapshot sees them before or after, never both or
/// neither); one compactor at a time. Returns how many it folded.
pub(crate) async fn compact(c: &mut Conn, ctx: &Ctx<'_>, limit: i64) -> Result<u64, StoreError> {
    c.begin().await?;
    let r = compact_in(c, ctx, limit).await;
    c.finish(r).await
}

async fn compact_in(c: &mut Conn, ctx: &Ctx<'_>, limit: i64) -> Result<u64, StoreError> {
    let lock = lock_id(ctx.schema, "compact", "");
    let got: bool = c
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&lock])
        .await?
        .try_get(0)?;
    if !got {
        return Ok(0);
    }
    c.execute(
        "WITH moved AS (
           DELETE FROM count_deltas WHERE id IN (SELECT id FROM count_deltas ORDER BY id LIMIT $1)
           RETURNING flow, destination, received, filtered, rejected, delivered, dead_lettered, discarded, last_received_at)
         INSERT INTO flow_counts AS t (flow, destination, received, filtered, rejected, delivered, dead_lettered, discarded, last_received_at)
         SELECT flow, destination, sum(received)::int8, sum(filtered)::int8, sum(rejected)::int8,
                sum(delivered)::int8, sum(dead_lettered)::int8, sum(discarded)::int8, max(last_received_at)
         FROM moved GROUP BY flow, destination
         ON CONFLICT (flow, destination) DO UPDATE SET
           received = t.received + excluded.received, filtered = t.filtered + excluded.filtered,
           rejected = t.rejected + excluded.rejected, delivered = t.delivered + excluded.delivered,
           dead_lettered = t.dead_lettered + excluded.dead_lettered, discarded = t.discarded + excluded.discarded,
           last_received_at = GREATEST(t.last_received_at, excluded.last_received_at)",
        &[&limit],
    )
    .await
}

// ---------------------------------------------------------------------------
// shared steps

/// Take the key locks (sorted, deduplicated) for the rest of the transaction.
pub(super) async fn lock_keys(c: &mut Conn, locks: &[i64]) -> Result<(), StoreError> {
    if locks.is_empty() {
        return Ok(());
    }
    c.execute(
        "SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) AS k",
        &[&locks],
    )
    .await?;
    Ok(())
}

/// `n` fresh order_seqs and `m` fresh DLQ ids, ascending. Called only with
/// the transaction's key locks held (see mod.rs: why order per key holds).
async fn allocate(c: &mut Conn, n: usize, m: usize) -> Result<(Vec<i64>, Vec<i64>), StoreError> {
    if n == 0 && m == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let (n, m) = (n as i64, m as i64);
    let row = c
        .query_one(
            "SELECT (SELECT COALESCE(array_agg(nextval('order_seq')), '{}') FROM generate_series(1, $1::int8)),
                    (SELECT COALESCE(array_agg(nextval('dlq_id_seq')), '{}') FROM generate_series(1, $2::int8))",
            &[&n, &m],
        )
        .await?;
    let mut seqs: Vec<i64> = row.try_get(0)?;
    let mut ids: Vec<i64> = row.try_get(1)?;
    seqs.sort_unstable();
    ids.sort_unstable();
    Ok((seqs, ids))
}

/// Hands out fresh values in order.
struct Fresh(std::vec::IntoIter<i64>);

impl Fresh {
    fn next(&mut self) -> Result<i64, StoreError> {
        self.0.next().ok_or_else(|| {
            StoreError::Failed("the journal allocated too few sequence values".into())
        })
    }
}

/// Outbox rows to insert, column by column.
#[derive(Default)]
struct NewRows {
    flow: Vec<String>,
    destination: Vec<String>,
    entity_key: Vec<Option<String>>,
    idempotency_key: Vec<String>,
    source: Vec<String>,
    event_id: Vec<String>,
    correlation_id: Vec<String>,
    created_at: Vec<i64>,
    event_time: Vec<i64>,
    order_seq: Vec<i64>,
    eligible: Vec<bool>,
    source_version: Vec<Option<String>>,
    group_id: Vec<Option<String>>,
    traceparent: Vec<Option<String>>,
    tracestate: Vec<Option<String>>,
    payload: Vec<String>,
}

/// Event-level fields of new rows and entries.
#[derive(Clone, Copy)]
struct Origin<'a> {
    source: &'a str,
    event_id: &'a str,
    correlation_id: &'a str,
    created_at: i64,
    event_time: i64,
    source_version: Option<&'a str>,
    group_id: Option<&'a str>,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
    attributes: Option<&'a str>,
    payload: &'a str,
}

impl NewRows {
    fn push(&mut self, o: &Origin<'_>, flow: &str, d: &NewDelivery, order_seq: i64) {
        self.flow.push(flow.to_owned());
        self.destination.push(d.destination.clone());
        self.entity_key.push(d.entity_key.clone());
        self.idempotency_key.push(d.idempotency_key.clone());
        self.source.push(o.source.to_owned());
        self.event_id.push(o.event_id.to_owned());
        self.correlation_id.push(o.correlation_id.to_owned());
        self.created_at.push(o.created_at);
        self.event_time.push(o.event_time);
        self.order_seq.push(order_seq);
        // a keyless row is a queue of its own; keyed rows get theirs from
        // `refresh` once every row of the transaction is in
        self.eligible.push(d.entity_key.is_none());
        self.source_version
            .push(o.source_version.map(str::to_owned));
        self.group_id.push(o.group_id.map(str::to_owned));
        self.traceparent.push(o.traceparent.map(str::to_owned));
        self.tracestate.push(o.tracestate.map(str::to_owned));
        self.payload.push(d.payload.clone());
    }

    /// Insert the rows. `appended`: every row goes to the end of its key
    /// queue and the transaction adds no hold (ingest, follow-ups), so a
    /// keyed row is a head exactly when it is the first of its queue here
    /// and its queue had no row and no hold before: decided in the insert,
    /// without a `refresh` rewriting the rows after it. Otherwise keyed rows
    /// go in not eligible and `refresh` decides.
    async fn insert(&self, c: &mut Conn, appended: bool) -> Result<(), StoreError> {
        if self.flow.is_empty() {
            return Ok(());
        }
        if appended {
            let mut seen: HashSet<(&str, &str)> = HashSet::new();
            let first: Vec<bool> = self
                .destination
                .iter()
                .zip(&self.entity_key)
                .map(|(d, k)| k.as_deref().is_some_and(|k| seen.insert((d, k))))
                .collect();
            c.execute(
                "INSERT INTO outbox (flow, destination, entity_key, idempotency_key, source, event_id, correlation_id,
                   created_at, event_time, order_seq, eligible, source_version, group_id, traceparent, tracestate,
                   payload)
                 SELECT flow, destination, entity_key, idempotency_key, source, event_id, correlation_id, created_at,
                   event_time, order_seq,
                   eligible OR (first
                     AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.destination = x.destination
                                       AND o.entity_key = x.entity_key)
                     AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.destination = x.destination
                                       AND h.entity_key = x.entity_key)),
                   source_version, group_id, traceparent, tracestate, payload
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                   $8::int8[], $9::int8[], $10::int8[], $11::bool[], $12::text[], $13::text[], $14::text[],
                   $15::text[], $16::text[], $17::bool[])
                   AS x(flow, destination, entity_key, idempotency_key, source, event_id, correlation_id, created_at,
                        event_time, order_seq, eligible, source_version, group_id, traceparent, tracestate, payload,
                        first)",
                &[
                    &self.flow,
                    &self.destination,
                    &self.entity_key,
                    &self.idempotency_key,
                    &self.source,
                    &self.event_id,
                    &self.correlation_id,
                    &self.created_at,
                    &self.event_time,
                    &self.order_seq,
                    &self.eligible,
                    &self.source_version,
                    &self.group_id,
                    &self.traceparent,
                    &self.tracestate,
                    &self.payload,
                    &first,
                ],
            )
            .await?;
            return Ok(());
        }
        c.execute(
            "INSERT INTO outbox (flow, destination, entity_key, idempotency_key, source, event_id, correlation_id,
               created_at, event_time, order_seq, eligible, source_version, group_id, traceparent, tracestate, payload)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
               $8::int8[], $9::int8[], $10::int8[], $11::bool[], $12::text[], $13::text[], $14::text[], $15::text[],
               $16::text[])",
            &[
                &self.flow,
                &self.destination,
                &self.entity_key,
                &self.idempotency_key,
                &self.source,
                &self.event_id,
                &self.correlation_id,
                &self.created_at,
                &self.event_time,
                &self.order_seq,
                &self.eligible,
                &self.source_version,
                &self.group_id,
                &self.traceparent,
                &self.tracestate,
                &self.payload,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Parse/map-stage DLQ entries to insert.
#[derive(Default)]
struct NewEntries {
    id: Vec<i64>,
    stage: Vec<&'static str>,
    flow: Vec<String>,
    entity_key: Vec<Option<String>>,
    source: Vec<String>,
    event_id: Vec<String>,
    correlation_id: Vec<String>,
    created_at: Vec<i64>,
    error: Vec<String>,
    payload: Vec<String>,
    history: Vec<String>,
    order_seq: Vec<i64>,
    attributes: Vec<Option<String>>,
    event_time: Vec<i64>,
    source_version: Vec<Option<String>>,
    group_id: Vec<Option<String>>,
    traceparent: Vec<Option<String>>,
    tracestate: Vec<Option<String>>,
}

impl NewEntries {
    async fn insert(&self, c: &mut Conn, now: i64) -> Result<(), StoreError> {
        if self.id.is_empty() {
            return Ok(());
        }
        c.execute(
            "INSERT INTO dlq (id, stage, flow, destination, entity_key, source, event_id, correlation_id, created_at,
               failed_at, attempts, error, payload, history, order_seq, attributes, event_time, source_version,
               group_id, traceparent, tracestate)
             SELECT id, stage, flow, '', entity_key, source, event_id, correlation_id, created_at, $1, 0, error,
               payload, history::jsonb, order_seq, attributes, event_time, source_version, group_id, traceparent,
               tracestate
             FROM unnest($2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
               $9::int8[], $10::text[], $11::text[], $12::text[], $13::int8[], $14::text[], $15::int8[],
               $16::text[], $17::text[], $18::text[], $19::text[])
               AS x(id, stage, flow, entity_key, source, event_id, correlation_id, created_at, error, payload,
                    history, order_seq, attributes, event_time, source_version, group_id, traceparent, tracestate)",
            &[
                &now,
                &self.id,
                &self.stage,
                &self.flow,
                &self.entity_key,
                &self.source,
                &self.event_id,
                &self.correlation_id,
                &self.created_at,
                &self.error,
                &self.payload,
                &self.history,
                &self.order_seq,
                &self.attributes,
                &self.event_time,
                &self.source_version,
                &self.group_id,
                &self.traceparent,
                &self.tracestate,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Key queues `(destination, key)` a transaction changed, and holds to add.
#[derive(Default)]
struct Touched {
    queues: BTreeSet<(String, String)>,
    holds: BTreeSet<(String, String, i64)>,
}

impl Touched {
    fn queue(&mut self, dest: &str, key: &str) {
        self.queues.insert((dest.to_owned(), key.to_owned()));
    }

    /// Insert the holds, then give every changed queue's rows the
    /// eligibility their queue implies.
    async fn apply(&self, c: &mut Conn) -> Result<(), StoreError> {
        if !self.holds.is_empty() {
            let mut cols: (Vec<&str>, Vec<&str>, Vec<i64>) = Default::default();
            for (d, k, id) in &self.holds {
                cols.0.push(d);
                cols.1.push(k);
                cols.2.push(*id);
            }
            c.execute(
                "INSERT INTO holds (destination, entity_key, dlq_id)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) ON CONFLICT DO NOTHING",
                &[&cols.0, &cols.1, &cols.2],
            )
            .await?;
        }
        let mut queues: BTreeSet<(&str, &str)> = self
            .queues
            .iter()
            .map(|(d, k)| (d.as_str(), k.as_str()))
            .collect();
        for (d, k, _) in &self.holds {
            queues.insert((d, k));
        }
        refresh(c, queues).await
    }
}

/// Recompute `eligible` for whole key queues: only the head (lowest
/// order_seq, then id) may be, and only when no dead letter earlier in the
/// key's order holds the key there. One statement for all of them; it
/// touches only rows whose flag changes.
async fn refresh<'a>(
    c: &mut Conn,
    queues: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), StoreError> {
    let (dests, keys): (Vec<&str>, Vec<&str>) = queues.into_iter().unzip();
    if dests.is_empty() {
        return Ok(());
    }
    c.execute(
        "WITH q AS (SELECT DISTINCT d, k FROM unnest($1::text[], $2::text[]) AS q(d, k)),
         h AS (SELECT q.d, q.k, o.id, o.order_seq FROM q CROSS JOIN LATERAL (
                 SELECT id, order_seq FROM outbox WHERE destination = q.d AND entity_key = q.k
                 ORDER BY order_seq, id LIMIT 1) o),
         want AS (SELECT h.id FROM h WHERE NOT EXISTS (
                 SELECT 1 FROM holds x JOIN dlq e ON e.id = x.dlq_id
                 WHERE x.destination = h.d AND x.entity_key = h.k
                   AND (e.order_seq IS NULL OR e.order_seq < h.order_seq))),
         off AS (UPDATE outbox o SET eligible = false FROM q
                 WHERE o.destination = q.d AND o.entity_key = q.k AND o.eligible
                   AND o.id NOT IN (SELECT id FROM want)
                 RETURNING o.id)
         UPDATE outbox o SET eligible = true FROM want WHERE o.id = want.id AND NOT o.eligible",
        &[&dests, &keys],
    )
    .await?;
    Ok(())
}

fn outcome_flow(o: &FlowOutcome) -> &str {
    match o {
        FlowOutcome::Routed { flow, .. }
        | FlowOutcome::Filtered { flow }
        | FlowOutcome::Canonical { flow, .. }
        | FlowOutcome::Rejected { flow, .. } => flow,
    }
}

/// Keys an outcome writes or holds.
fn outcome_keys(o: &FlowOutcome) -> Vec<&str> {
    match o {
        FlowOutcome::Routed { deliveries, .. } => deliveries
            .iter()
            .filter_map(|d| d.entity_key.as_deref())
            .collect(),
        FlowOutcome::Rejected {
            entity_key: Some(k),
            ..
        } => vec![k.as_str()],
        _ => Vec::new(),
    }
}

fn check_outcome(o: &FlowOutcome) -> Result<(), StoreError> {
    if let FlowOutcome::Routed { deliveries, .. } = o {
        deliveries
            .iter()
            .filter(|d| d.delivered)
            .try_for_each(crate::writer::check_delivered)?;
    }
    if let FlowOutcome::Rejected {
        flow,
        stage: Stage::Deliver,
        ..
    } = o
    {
        return Err(StoreError::Invalid(format!(
            "flow {flow}: a flow outcome is rejected at the parse or map stage, not at deliver"
        )));
    }
    Ok(())
}

/// Where a replayed parse/map-stage entry stood: rows and entries of its
/// key take `order_seq`.
struct Place<'a> {
    key: &'a str,
    order_seq: i64,
}

/// How many fresh order_seqs and DLQ ids an outcome needs.
fn needs(o: &FlowOutcome, place: Option<&Place<'_>>) -> (usize, usize) {
    let placed = |k: Option<&str>| place.is_some_and(|p| Some(p.key) == k);
    match o {
        FlowOutcome::Routed { deliveries, .. } => {
            let fresh = deliveries.iter().any(|d| !placed(d.entity_key.as_deref()));
            (usize::from(fresh), 0)
        }
        FlowOutcome::Filtered { .. } | FlowOutcome::Canonical { .. } => (0, 0),
        FlowOutcome::Rejected { entity_key, .. } => {
            (usize::from(!placed(entity_key.as_deref())), 1)
        }
    }
}

/// Staged changes of one transaction's outcomes.
#[derive(Default)]
struct Staged {
    rows: NewRows,
    entries: NewEntries,
    touched: Touched,
    deltas: Deltas,
}

impl Staged {
    /// One event's outcome for one flow (at ingest, or a replay's new one).
    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &mut self,
        o: &Origin<'_>,
        out: &FlowOutcome,
        place: Option<&Place<'_>>,
        seqs: &mut Fresh,
        ids: &mut Fresh,
        now: i64,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        let placed = |k: Option<&str>| match place {
            Some(p) if Some(p.key) == k => Some(p.order_seq),
            _ => None,
        };
        match out {
            FlowOutcome::Routed { flow, deliveries } => {
                bump(&mut self.deltas, flow, "", |c| c.received += 1);
                applied.count(flow, |c| c.received += 1);
                // one place in acceptance order for the event's rows
                let fresh = if deliveries
                    .iter()
                    .any(|d| placed(d.entity_key.as_deref()).is_none())
                {
                    Some(seqs.next()?)
                } else {
                    None
                };
                for d in deliveries {
                    // the lane's counts row exists from its first row on
                    bump(&mut self.deltas, flow, &d.destination, |_| {});
                    if d.delivered {
                        bump(&mut self.deltas, flow, &d.destination, |c| c.delivered += 1);
                        continue;
                    }
                    let seq = match (placed(d.entity_key.as_deref()), fresh) {
                        (Some(s), _) | (None, Some(s)) => s,
                        (None, None) => seqs.next()?,
                    };
                    if let Some(k) = &d.entity_key {
                        self.touched.queue(&d.destination, k);
                    }
                    self.rows.push(o, flow, d, seq);
                }
            }
            // merged before (`ingest_in`): its rows come with `Staged::canonical`
            FlowOutcome::Canonical { .. } => {}
            FlowOutcome::Filtered { flow } => {
                bump(&mut self.deltas, flow, "", |c| {
                    c.received += 1;
                    c.filtered += 1;
                });
                applied.count(flow, |c| {
                    c.received += 1;
                    c.filtered += 1;
                });
            }
            FlowOutcome::Rejected {
                flow,
                stage,
                error,
                entity_key,
                hold,
            } => {
                check_outcome(out)?;
                bump(&mut self.deltas, flow, "", |c| {
                    c.received += 1;
                    c.rejected += 1;
                });
                applied.count(flow, |c| {
                    c.received += 1;
                    c.rejected += 1;
                });
                let seq = match placed(entity_key.as_deref()) {
                    Some(s) => s,
                    None => seqs.next()?,
                };
                let id = ids.next()?;
                let history = json!([{
                    "at": now, "action": "rejected", "stage": stage.as_str(), "error": error
                }]);
                let e = &mut self.entries;
                e.id.push(id);
                e.stage.push(stage.as_str());
                e.flow.push(flow.clone());
                e.entity_key.push(entity_key.clone());
                e.source.push(o.source.to_owned());
                e.event_id.push(o.event_id.to_owned());
                e.correlation_id.push(o.correlation_id.to_owned());
                e.created_at.push(o.created_at);
                e.error.push(error.clone());
                e.payload.push(o.payload.to_owned());
                e.history.push(history.to_string());
                e.order_seq.push(seq);
                e.attributes.push(o.attributes.map(str::to_owned));
                e.event_time.push(o.event_time);
                e.source_version.push(o.source_version.map(str::to_owned));
                e.group_id.push(o.group_id.map(str::to_owned));
                e.traceparent.push(o.traceparent.map(str::to_owned));
                e.tracestate.push(o.tracestate.map(str::to_owned));
                if let Some(k) = entity_key {
                    for dest in hold {
                        self.touched.holds.insert((dest.clone(), k.clone(), id));
                    }
                }
            }
        }
        Ok(())
    }

    /// A report merged into its canonical record (counted as filtered at
    /// its flow: it ends there) and the rows the merge caused, which enter
    /// their routes' lanes counted there, as follow-ups do.
    fn canonical(
        &mut self,
        o: &Origin<'_>,
        flow: &str,
        rows: &[(String, NewDelivery)],
        seqs: &mut Fresh,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        bump(&mut self.deltas, flow, "", |c| {
            c.received += 1;
            c.filtered += 1;
        });
        applied.count(flow, |c| {
            c.received += 1;
            c.filtered += 1;
        });
        for (route_flow, d) in rows {
            bump(&mut self.deltas, route_flow, &d.destination, |c| {
                c.received += 1
            });
            if let Some(k) = &d.entity_key {
                self.touched.queue(&d.destination, k);
            }
            self.rows.push(o, route_flow, d, seqs.next()?);
        }
        Ok(())
    }

    /// `appended`: see [`NewRows::insert`]; ignored when holds are added.
    async fn write(&self, c: &mut Conn, now: i64, appended: bool) -> Result<(), StoreError> {
        let appended = appended && self.touched.holds.is_empty();
        self.rows.insert(c, appended).await?;
        self.entries.insert(c, now).await?;
        // appended rows decided their heads, and no queue lost its head
        if !appended {
            self.touched.apply(c).await?;
        }
        write_counts(c, &self.deltas).await
    }
}

// ---------------------------------------------------------------------------
// ingest

pub(crate) async fn ingest(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    b: &IngestBatch,
) -> Result<Applied, StoreError> {
    for e in &b.events {
        for o in &e.outcomes {
            check_outcome(o)?;
        }
    }
    c.begin().await?;
    let r = ingest_in(c, ctx, b).await;
    c.finish(r).await
}

/// The database's clock in ms (leases compare against one clock, not the
/// nodes'), spliced into statements.
macro_rules! db_now_ms {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::int8"
    };
}

/// Take or renew `ctx.node`'s lease of `source` (see `Journal::lease_source`):
/// taken when free, expired or this node's; the epoch moves on only when the
/// node changes. The row lock this takes waits for an ingest of the source
/// that is checking the old epoch (`FOR SHARE`), so a takeover and a fenced
/// commit never interleave.
pub(crate) async fn lease_source(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    source: &str,
    ttl_ms: i64,
) -> Result<Option<i64>, StoreError> {
    const SQL: &str = concat!(
        "INSERT INTO source_leases AS l (source, node, epoch, lease_until, acquired_at)
         VALUES ($1, $2, 1, ",
        db_now_ms!(),
        " + $3, ",
        db_now_ms!(),
        ")
         ON CONFLICT (source) DO UPDATE SET
           epoch = CASE WHEN l.node = EXCLUDED.node THEN l.epoch ELSE l.epoch + 1 END,
           acquired_at = CASE WHEN l.node = EXCLUDED.node THEN l.acquired_at ELSE EXCLUDED.acquired_at END,
           node = EXCLUDED.node,
           lease_until = EXCLUDED.lease_until
         WHERE l.node = EXCLUDED.node OR l.lease_until <= ",
        db_now_ms!(),
        " RETURNING l.epoch"
    );
    Ok(
        match c.query_opt(SQL, &[&source, &ctx.node, &ttl_ms]).await? {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        },
    )
}

/// Give up `ctx.node`'s lease of `source`: it ends now (the row stays, so
/// the next owner's epoch moves on).
pub(crate) async fn release_source(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    source: &str,
) -> Result<(), StoreError> {
    const SQL: &str = concat!(
        "UPDATE source_leases SET lease_until = ",
        db_now_ms!(),
        " WHERE source = $1 AND node = $2"
    );
    c.execute(SQL, &[&source, &ctx.node]).await?;
    Ok(())
}

async fn ingest_in(c: &mut Conn, ctx: &Ctx<'_>, b: &IngestBatch) -> Result<Applied, StoreError> {
    if let Some(epoch) = b.fence {
        // fencing: this node still holds the source's lease at this epoch
        // (held until commit, so a takeover waits for this transaction)
        let held = c
            .query_opt(
                "SELECT 1 FROM source_leases WHERE source = $1 AND node = $2 AND epoch = $3 FOR SHARE",
                &[&b.source, &ctx.node, &epoch],
            )
            .await?;
        if held.is_none() {
            return Err(StoreError::Fenced(format!(
                "node `{}` no longer holds the lease of source `{}` (epoch {epoch}): another node took it over; nothing was written",
                ctx.node, b.source
            )));
        }
    }
    let now = crate::now_ms();
    // the locks of the entities it reports to first, then the keys
    let mut entities: Vec<&str> = Vec::new();
    for o in b.events.iter().flat_map(|e| &e.outcomes) {
        if let FlowOutcome::Canonical { report, .. } = o {
            entities.push(&report.rules.entity);
        }
    }
    super::canonical::lock_entities(c, ctx, &entities).await?;
    let locks = ctx.locks(
        b.events
            .iter()
            .flat_map(|e| e.outcomes.iter().flat_map(outcome_keys)),
    );
    lock_keys(c, &locks).await?;

    // dedupe: one statement, hashes in ascending order (two batches
    // sharing ids insert them in the same order: no deadlock)
    let fresh: Vec<bool> = if b.dedupe == Dedupe::Id && !b.events.is_empty() {
        let hashes: Vec<Vec<u8>> = b.events.iter().map(|e| id_hash(&e.event_id)).collect();
        let mut first: BTreeMap<&[u8], i64> = BTreeMap::new();
        for (h, e) in hashes.iter().zip(&b.events) {
            first.entry(h.as_slice()).or_insert(e.received_at);
        }
        let (hs, ats): (Vec<&[u8]>, Vec<i64>) = first.into_iter().unzip();
        let rows = c
            .query(
                "INSERT INTO dedupe (source, id_hash, accepted_at)
                 SELECT $1, h, a FROM unnest($2::bytea[], $3::int8[]) AS x(h, a)
                 ON CONFLICT (source, id_hash) DO NOTHING RETURNING id_hash",
                &[&b.source, &hs, &ats],
            )
            .await?;
        let mut new: HashSet<Vec<u8>> = HashSet::with_capacity(rows.len());
        for r in rows {
            new.insert(r.try_get(0)?);
        }
        // the first event with a new id is stored, the rest are duplicates
        hashes.iter().map(|h| new.remove(h)).collect()
    } else {
        vec![true; b.events.len()]
    };

    let (mut n, mut m) = (0, 0);
    for (e, _) in b.events.iter().zip(&fresh).filter(|(_, f)| **f) {
        for o in &e.outcomes {
            let (a, b) = needs(o, None);
            n += a;
            m += b;
        }
    }
    // reports merged into their canonical records, in event order; the
    // rows they cause are keyed by canonical id: those keys are locked
    // before any order_seq is taken
    let mut merged: HashMap<(usize, usize), crate::canonical::Routed> = HashMap::new();
    let mut queued: HashSet<(String, String)> = HashSet::new();
    for (i, (e, _)) in b
        .events
        .iter()
        .zip(&fresh)
        .enumerate()
        .filter(|(_, (_, f))| **f)
    {
        for (j, o) in e.outcomes.iter().enumerate() {
            let FlowOutcome::Canonical { report, .. } = o else {
                continue;
            };
            let ev = crate::canonical::Ev {
                system: &b.source,
                event_id: &e.event_id,
                correlation_id: &e.correlation_id,
                event_time: e.event_time,
            };
            let mut rows =
                crate::canonical::apply(&mut super::canonical::pg(c, ctx), report, &ev, now)
                    .await?;
            // a row this batch queued already reads the record when written
            rows.retain(|(_, d)| {
                d.entity_key
                    .as_ref()
                    .is_none_or(|k| queued.insert((d.destination.clone(), k.clone())))
            });
            n += rows.len();
            merged.insert((i, j), rows);
        }
    }
    if !queued.is_empty() {
        let locks = ctx.locks(queued.iter().map(|(_, k)| k.as_str()));
        lock_keys(c, &locks).await?;
    }
    let (seqs, ids) = allocate(c, n, m).await?;
    let (mut seqs, mut ids) = (Fresh(seqs.into_iter()), Fresh(ids.into_iter()));
    let mut applied = Applied::default();
    let mut staged = Staged::default();
    for (i, (e, is_new)) in b.events.iter().zip(&fresh).enumerate() {
        if !is_new {
            applied.duplicates += 1;
            continue;
        }
        applied.changed += 1;
        let o = Origin {
            source: &b.source,
            event_id: &e.event_id,
            correlation_id: &e.correlation_id,
            created_at: e.received_at,
            event_time: e.event_time,
            source_version: e.source_version.as_deref(),
            group_id: e.group_id.as_deref(),
            traceparent: e.traceparent.as_deref(),
            tracestate: e.tracestate.as_deref(),
            attributes: Some(&e.attributes),
            payload: &e.payload,
        };
        for (j, out) in e.outcomes.iter().enumerate() {
            if let FlowOutcome::Canonical { flow, .. } = out {
                let rows = merged.get(&(i, j)).map_or(&[][..], Vec::as_slice);
                staged.canonical(&o, flow, rows, &mut seqs, &mut applied)?;
            } else {
                staged.outcome(&o, out, None, &mut seqs, &mut ids, now, &mut applied)?;
            }
        }
    }
    for f in &applied.flows {
        if f.received > 0 {
            bump(&mut staged.deltas, &f.flow, "", |c| c.seen = true);
        }
    }
    staged.write(c, now, true).await?;
    if let Some((key, value)) = &b.checkpoint {
        c.execute(
            "INSERT INTO checkpoints (source, key, value, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (source, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            &[&b.source, key, value, &now],
        )
        .await?;
    }
    Ok(applied)
}

// ---------------------------------------------------------------------------
// claim

/// An outbox row from the columns of [`with_row_columns!`].
pub(crate) fn outbox_row(r: &Row) -> Result<OutboxRow, StoreError> {
    let attempts: i32 = r.try_get(9)?;
    Ok(OutboxRow {
        id: r.try_get(0)?,
        flow: r.try_get(1)?,
        destination: r.try_get(2)?,
        entity_key: r.try_get(3)?,
        idempotency_key: r.try_get(4)?,
        source: r.try_get(5)?,
        event_id: r.try_get(6)?,
        correlation_id: r.try_get(7)?,
        created_at: r.try_get(8)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_at: r.try_get(10)?,
        last_error: r.try_get(11)?,
        payload: r.try_get(12)?,
        order_seq: r.try_get(13)?,
        event_time: r.try_get(14)?,
        source_version: r.try_get(15)?,
        group_id: r.try_get(16)?,
        traceparent: r.try_get(17)?,
        tracestate: r.try_get(18)?,
    })
}

/// A statement with the outbox columns `OutboxRow` reads (alias `o`)
/// between its two parts.
macro_rules! with_row_columns {
    ($($pre:literal)+ ; $($post:literal)+) => {
        concat!($($pre,)+ "o.id, o.flow, o.destination, o.entity_key, o.idempotency_key, o.source,
            o.event_id, o.correlation_id, o.created_at, o.attempts, o.next_at, o.last_error, o.payload,
            o.order_seq, o.event_time, o.source_version, o.group_id, o.traceparent, o.tracestate", $($post,)+)
    };
}
pub(crate) use with_row_columns;

pub(crate) async fn claim(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    req: &ClaimRequest,
) -> Result<Vec<Claimed>, StoreError> {
    if req.max == 0 {
        return Ok(Vec::new());
    }
    let now = crate::now_ms();
    let lease_ms = i64::try_from(req.lease.as_millis()).unwrap_or(i64::MAX);
    let until = now.saturating_add(lease_ms);
    let max = i64::try_from(req.max).unwrap_or(i64::MAX);
    let per_key = req.per_key.max(1);
    if per_key == 1 {
        // one statement: autocommit
        return claim_heads(c, ctx, req, now, until, max).await;
    }
    c.begin().await?;
    let r = claim_in(c, ctx, req, now, until, max, per_key).await;
    c.finish(r).await
}

/// Lease the lane's claimable heads (and keyless rows), lowest order_seq
/// first, skipping rows another transaction holds.
async fn claim_heads(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    req: &ClaimRequest,
    now: i64,
    until: i64,
    max: i64,
) -> Result<Vec<Claimed>, StoreError> {
    let rows = c
        .query(
            with_row_columns!(
                "WITH h AS (
                   SELECT id FROM outbox
                   WHERE flow = $1 AND destination = $2 AND eligible AND next_at <= $3 AND lease_until <= $3
                   ORDER BY order_seq, id LIMIT $4
                   FOR UPDATE SKIP LOCKED)
                 UPDATE outbox o SET token = nextval('lease_token'), lease_until = $5, lease_node = $6
                 FROM h WHERE o.id = h.id
                 RETURNING ";
                ", o.token"
            ),
            &[
                &req.lane.flow,
                &req.lane.destination,
                &now,
                &max,
                &until,
                &ctx.node,
            ],
        )
        .await?;
    let mut out = rows
        .iter()
        .map(|r| {
            Ok(Claimed {
                row: outbox_row(r)?,
                token: r.try_get(19)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    out.sort_by_key(|c| (c.row.order_seq, c.row.id));
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn claim_in(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    req: &ClaimRequest,
    now: i64,
    until: i64,
    max: i64,
    per_key: usize,
) -> Result<Vec<Claimed>, StoreError> {
    let mut out = claim_heads(c, ctx, req, now, until, max).await?;
    let room = req.max.saturating_sub(out.len());
    let heads: Vec<(&str, i64, i64)> = out
        .iter()
        .filter_map(|h| {
            h.row
                .entity_key
                .as_deref()
                .map(|k| (k, h.row.order_seq, h.row.id))
        })
        .collect();
    if room == 0 || heads.is_empty() {
        return Ok(out);
    }
    // the rows right behind each keyed head (read, not locked yet)
    let behind = i64::try_from(per_key - 1).unwrap_or(i64::MAX);
    let keys: Vec<&str> = heads.iter().map(|h| h.0).collect();
    let seqs: Vec<i64> = heads.iter().map(|h| h.1).collect();
    let hids: Vec<i64> = heads.iter().map(|h| h.2).collect();
    let rows = c
        .query(
            "SELECT h.n, f.id, f.flow, f.next_at, f.lease_until
             FROM unnest($2::text[], $3::int8[], $4::int8[]) WITH ORDINALITY AS h(k, s, hid, n)
             CROSS JOIN LATERAL (
               SELECT id, flow, next_at, lease_until, order_seq FROM outbox
               WHERE destination = $1 AND entity_key = h.k AND (order_seq, id) > (h.s, h.hid)
               ORDER BY order_seq, id LIMIT $5) f
             ORDER BY h.n, f.order_seq, f.id",
            &[&req.lane.destination, &keys, &seqs, &hids, &behind],
        )
        .await?;
    // candidates: consecutive rows of this lane, due and not leased
    let mut chains: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut broken: HashSet<i64> = HashSet::new();
    for r in &rows {
        let n: i64 = r.try_get(0)?;
        if broken.contains(&n) {
            continue;
        }
        let (id, flow, next_at, lease_until): (i64, String, i64, i64) =
            (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?);
        if flow != req.lane.flow || next_at > now || lease_until > now {
            broken.insert(n);
            continue;
        }
        chains.entry(n).or_default().push(id);
    }
    let wanted: Vec<i64> = chains.values().flatten().copied().collect();
    if wanted.is_empty() {
        return Ok(out);
    }
    let locked: HashSet<i64> = c
        .query(
            "SELECT id FROM outbox WHERE id = ANY($1) AND next_at <= $2 AND lease_until <= $2
             FOR UPDATE SKIP LOCKED",
            &[&wanted, &now],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    // each chain stops at its first row someone else holds; the claim stops
    // at `max`, heads first, then chains in the heads' order
    let mut take = Vec::new();
    let mut left = room;
    for chain in chains.values() {
        for id in chain {
            if left == 0 || !locked.contains(id) {
                break;
            }
            take.push(*id);
            left -= 1;
        }
    }
    if take.is_empty() {
        return Ok(out);
    }
    let rows = c
        .query(
            with_row_columns!(
                "UPDATE outbox o SET token = nextval('lease_token'), lease_until = $2, lease_node = $3
                 WHERE o.id = ANY($1)
                 RETURNING ";
                ", o.token"
            ),
            &[&take, &until, &ctx.node],
        )
        .await?;
    for r in &rows {
        out.push(Claimed {
            row: outbox_row(r)?,
            token: r.try_get(19)?,
        });
    }
    out.sort_by_key(|c| (c.row.order_seq, c.row.id));
    Ok(out)
}

// ---------------------------------------------------------------------------
// settle

/// A leased row as settle reads it.
struct Leased {
    token: i64,
    flow: String,
    destination: String,
    entity_key: Option<String>,
    order_seq: i64,
    source: String,
    event_id: String,
}

pub(crate) async fn settle(c: &mut Conn, ctx: &Ctx<'_>, s: &Settle) -> Result<Settled, StoreError> {
    if s.items.is_empty() && s.follow_ups.is_empty() {
        return Ok(Settled::default());
    }
    c.begin().await?;
    let r = settle_in(c, ctx, s).await;
    c.finish(r).await
}

async fn settle_in(c: &mut Conn, ctx: &Ctx<'_>, s: &Settle) -> Result<Settled, StoreError> {
    let now = crate::now_ms();
    let mut ids: Vec<i64> = s.items.iter().map(|i| i.id).collect();
    ids.sort_unstable();
    ids.dedup();
    // the keys of the rows this settle may change (a row's key never
    // changes), then the locks, then the rows as they are now
    let mut keys: Vec<String> = Vec::new();
    if !ids.is_empty() {
        for r in c
            .query(
                "SELECT entity_key FROM outbox WHERE id = ANY($1) AND token <> 0 AND entity_key IS NOT NULL",
                &[&ids],
            )
            .await?
        {
            keys.push(r.try_get(0)?);
        }
    }
    // canonical writes: their entities' locks before the key locks
    // canonical writes: their records' locks before the key locks, and
    // the entity's before those when a write links an id the record's
    // link does not hold yet (a merge could be linking it elsewhere)
    let mut records: Vec<(&str, &str)> = Vec::new();
    let mut linking: Vec<&str> = Vec::new();
    for i in &s.items {
        if let Outcome::Delivered(w) = &i.outcome
            && let Some(cw) = &w.canonical
        {
            records.push((&cw.entity, &cw.canonical_id));
            if let Some(x) = &w.external_id
                && !super::canonical::links_id(c, i.id, cw, x).await?
            {
                linking.push(&cw.entity);
            }
        }
    }
    super::canonical::lock_entities(c, ctx, &linking).await?;
    super::canonical::lock_records(c, ctx, &records).await?;
    let locks = ctx.locks(
        keys.iter().map(String::as_str).chain(
            s.follow_ups
                .iter()
                .filter_map(|f| f.delivery.entity_key.as_deref()),
        ),
    );
    lock_keys(c, &locks).await?;
    let mut rows: HashMap<i64, Leased> = HashMap::new();
    if !ids.is_empty() {
        for r in c
            .query(
                "SELECT id, token, flow, destination, entity_key, order_seq, source, event_id FROM outbox
                 WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&ids],
            )
            .await?
        {
            rows.insert(
                r.try_get(0)?,
                Leased {
                    token: r.try_get(1)?,
                    flow: r.try_get(2)?,
                    destination: r.try_get(3)?,
                    entity_key: r.try_get(4)?,
                    order_seq: r.try_get(5)?,
                    source: r.try_get(6)?,
                    event_id: r.try_get(7)?,
                },
            );
        }
    }

    let mut done = Settled::default();
    let mut deltas = Deltas::new();
    let mut touched = Touched::default();
    let mut settled: HashSet<i64> = HashSet::new();
    // items applied as delivered, by index
    let mut delivered_items: HashSet<usize> = HashSet::new();
    // delivered keyed rows, in item order: (key, order_seq, flow, dest, event)
    let mut delivered_keyed: Vec<(&str, i64, &str, &str, &str)> = Vec::new();
    let mut gone: Vec<i64> = Vec::new();
    let mut retry: (Vec<i64>, Vec<i64>, Vec<&str>, Vec<i32>) = Default::default();
    let mut release: Vec<i64> = Vec::new();
    // dead: (outbox id, error, hold, item index)
    let mut dead: Vec<(i64, &str, bool, usize)> = Vec::new();
    let mut crosswalk: BTreeMap<(String, String, String), CrosswalkUpsert> = BTreeMap::new();
    // canonical records written: (destination, the id it gave, what, event)
    let mut canonical_written: Vec<(&str, Option<&str>, &crate::CanonicalWritten, &str)> =
        Vec::new();
    // the attempt trail: (outbox id, at, latency, status, outcome, error)
    #[allow(clippy::type_complexity)]
    let mut trail: (
        Vec<i64>,
        Vec<i64>,
        Vec<i64>,
        Vec<Option<i32>>,
        Vec<&str>,
        Vec<Option<&str>>,
    ) = Default::default();
    for (n, item) in s.items.iter().enumerate() {
        let Some(row) = rows.get(&item.id) else {
            done.stale += 1;
            continue;
        };
        // a second settlement of one row in one settle finds it settled
        if row.token == 0 || row.token != item.token || !settled.insert(item.id) {
            done.stale += 1;
            continue;
        }
        let (flow, dest) = (row.flow.as_str(), row.destination.as_str());
        if let Some(a) = &item.attempt
            && let Some((outcome, error)) = item.outcome.trail()
        {
            trail.0.push(item.id);
            trail.1.push(a.at);
            trail.2.push(a.latency_ms);
            trail.3.push(a.status.map(i32::from));
            trail.4.push(outcome);
            trail.5.push(error);
        }
        match &item.outcome {
            Outcome::Delivered(w) => {
                gone.push(item.id);
                delivered_items.insert(n);
                bump(&mut deltas, flow, dest, |c| c.delivered += 1);
                if let Some(k) = &row.entity_key {
                    touched.queue(dest, k);
                    delivered_keyed.push((k, row.order_seq, flow, dest, &row.event_id));
                }
                if let Some(cw) = &w.canonical {
                    canonical_written.push((dest, w.external_id.as_deref(), cw, &row.event_id));
                } else if !w.is_empty() {
                    let source_key = row.entity_key.clone().unwrap_or(row.event_id.clone());
                    let e = crosswalk
                        .entry((dest.to_owned(), row.source.clone(), source_key))
                        .or_default();
                    // as if applied one after the other
                    e.external_id = w.external_id.clone().or(e.external_id.take());
                    e.version = w.version.clone().or(e.version.take());
                    e.fingerprint = w.fingerprint.clone().or(e.fingerprint.take());
                    e.flow = flow.to_owned();
                    e.event_id = row.event_id.clone();
                }
                done.delivered += 1;
            }
            Outcome::Retry { next_at, error } => {
                retry.0.push(item.id);
                retry.1.push(*next_at);
                retry.2.push(error);
                retry.3.push(1);
                done.retried += 1;
            }
            Outcome::Wait { next_at, reason } => {
                retry.0.push(item.id);
                retry.1.push(*next_at);
                retry.2.push(reason);
                retry.3.push(0);
                done.released += 1;
            }
            Outcome::Dead { error, hold_key } => {
                gone.push(item.id);
                bump(&mut deltas, flow, dest, |c| c.dead_lettered += 1);
                if let Some(k) = &row.entity_key {
                    touched.queue(dest, k);
                }
                dead.push((item.id, error, *hold_key, n));
                done.dead += 1;
            }
            Outcome::Release => {
                release.push(item.id);
                done.released += 1;
            }
        }
    }

    // before the rows change: each entry counts the attempt it records
    if !trail.0.is_empty() {
        c.execute(
            "INSERT INTO attempts (flow, destination, event_id, correlation_id, entity_key, attempt,
               at, latency_ms, status, outcome, error)
             SELECT o.flow, o.destination, o.event_id, o.correlation_id, o.entity_key, o.attempts + 1,
               x.at, x.lat, x.st, x.oc, x.err
             FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int4[], $5::text[], $6::text[])
               WITH ORDINALITY AS x(id, at, lat, st, oc, err, n)
             JOIN outbox o ON o.id = x.id ORDER BY x.n",
            &[&trail.0, &trail.1, &trail.2, &trail.3, &trail.4, &trail.5],
        )
        .await?;
    }
    let (seqs, qids) = allocate(c, s.follow_ups.len(), dead.len()).await?;
    // entries that were dead before this settle, superseded by its deliveries
    if !delivered_keyed.is_empty() {
        supersede(c, &delivered_keyed).await?;
    }
    if !dead.is_empty() {
        let oids: Vec<i64> = dead.iter().map(|d| d.0).collect();
        let errs: Vec<&str> = dead.iter().map(|d| d.1).collect();
        c.execute(
            "INSERT INTO dlq (id, stage, flow, destination, entity_key, idempotency_key, source, event_id,
               correlation_id, created_at, failed_at, attempts, error, payload, history, order_seq, event_time,
               source_version, group_id, traceparent, tracestate)
             SELECT x.qid, 'deliver', o.flow, o.destination, o.entity_key, o.idempotency_key, o.source, o.event_id,
               o.correlation_id, o.created_at, $1, o.attempts + 1, x.err, o.payload,
               jsonb_build_array(jsonb_build_object('at', $1::int8, 'action', 'dead_lettered',
                 'attempts', o.attempts + 1, 'error', x.err)),
               o.order_seq, o.event_time, o.source_version, o.group_id, o.traceparent, o.tracestate
             FROM unnest($2::int8[], $3::int8[], $4::text[]) AS x(id, qid, err) JOIN outbox o ON o.id = x.id",
            &[&now, &oids, &qids, &errs],
        )
        .await?;
        // a dead row superseded by a later delivered row of the same settle
        let mut pairs: (Vec<i64>, Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
        for ((oid, _, hold, n), qid) in dead.iter().zip(&qids) {
            let Some(row) = rows.get(oid) else { continue };
            let Some(k) = &row.entity_key else { continue };
            if *hold {
                touched
                    .holds
                    .insert((row.destination.clone(), k.clone(), *qid));
            }
            for (m, later) in s.items.iter().enumerate().skip(n + 1) {
                if delivered_items.contains(&m)
                    && let Some(l) = rows.get(&later.id)
                    && l.entity_key.as_deref() == Some(k)
                    && l.destination == row.destination
                    && l.order_seq > row.order_seq
                {
                    pairs.0.push(*qid);
                    pairs.1.push(&l.flow);
                    pairs.2.push(&l.destination);
                    pairs.3.push(&l.event_id);
                }
            }
        }
        if !pairs.0.is_empty() {
            c.execute(
                "WITH x AS (SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[])
                              WITH ORDINALITY AS x(q, f, d, ev, n)),
                 s AS (INSERT INTO superseded AS t (dlq_id, flow, destination, event_id, touch)
                       SELECT q, f, d, ev, nextval('touch_seq') FROM
                         (SELECT DISTINCT ON (q, f, d) q, f, d, ev FROM x ORDER BY q, f, d, n DESC) y
                       ON CONFLICT (dlq_id, flow, destination) DO UPDATE
                         SET event_id = excluded.event_id, touch = excluded.touch)
                 UPDATE dlq SET superseded_by = l.ev
                 FROM (SELECT DISTINCT ON (q) q, ev FROM x ORDER BY q, n DESC) l WHERE dlq.id = l.q",
                &[&pairs.0, &pairs.1, &pairs.2, &pairs.3],
            )
            .await?;
        }
    }
    if !gone.is_empty() {
        c.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&gone])
            .await?;
    }
    if !retry.0.is_empty() {
        c.execute(
            "UPDATE outbox o SET attempts = o.attempts + x.a, next_at = x.n, last_error = x.e,
               token = 0, lease_until = 0, lease_node = NULL
             FROM unnest($1::int8[], $2::int8[], $3::text[], $4::int4[]) AS x(id, n, e, a) WHERE o.id = x.id",
            &[&retry.0, &retry.1, &retry.2, &retry.3],
        )
        .await?;
    }
    if !release.is_empty() {
        c.execute(
            "UPDATE outbox SET token = 0, lease_until = 0, lease_node = NULL WHERE id = ANY($1)",
            &[&release],
        )
        .await?;
    }
    if !crosswalk.is_empty() {
        upsert_crosswalk(c, &crosswalk, now).await?;
    }
    for (dest, external_id, cw, event_id) in canonical_written {
        let ev = crate::canonical::Ev {
            system: dest,
            event_id,
            correlation_id: "",
            event_time: now,
        };
        crate::canonical::written(
            &mut super::canonical::pg(c, ctx),
            dest,
            external_id,
            cw,
            &ev,
            now,
        )
        .await?;
    }
    let mut rows_new = NewRows::default();
    let mut seqs = Fresh(seqs.into_iter());
    for f in &s.follow_ups {
        follow_up(
            &mut rows_new,
            &mut touched,
            &mut deltas,
            f,
            seqs.next()?,
            now,
        );
        done.follow_ups += 1;
    }
    rows_new.insert(c, false).await?;
    touched.apply(c).await?;
    write_counts(c, &deltas).await?;
    Ok(done)
}

/// Enqueue follow-ups in the caller's transaction (which holds no key
/// lock yet): their key locks, their order_seqs, the rows, their lanes'
/// counts.
pub(super) async fn enqueue_follow_ups(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    follow_ups: &[FollowUp],
) -> Result<(), StoreError> {
    if follow_ups.is_empty() {
        return Ok(());
    }
    let locks = ctx.locks(
        follow_ups
            .iter()
            .filter_map(|f| f.delivery.entity_key.as_deref()),
    );
    lock_keys(c, &locks).await?;
    let (seqs, _) = allocate(c, follow_ups.len(), 0).await?;
    let mut seqs = Fresh(seqs.into_iter());
    let now = crate::now_ms();
    let (mut rows, mut touched, mut deltas) =
        (NewRows::default(), Touched::default(), Deltas::new());
    for f in follow_ups {
        follow_up(&mut rows, &mut touched, &mut deltas, f, seqs.next()?, now);
    }
    rows.insert(c, false).await?;
    touched.apply(c).await?;
    write_counts(c, &deltas).await
}

fn follow_up(
    rows: &mut NewRows,
    touched: &mut Touched,
    d: &mut Deltas,
    f: &FollowUp,
    order_seq: i64,
    now: i64,
) {
    let o = Origin {
        source: &f.source,
        event_id: &f.event_id,
        correlation_id: &f.correlation_id,
        created_at: now,
        event_time: now,
        source_version: None,
        group_id: None,
        traceparent: None,
        tracestate: None,
        attributes: None,
        payload: &f.delivery.payload,
    };
    // lane-level: a follow-up enters one lane only
    bump(d, &f.flow, &f.delivery.destination, |c| c.received += 1);
    if let Some(k) = &f.delivery.entity_key {
        touched.queue(&f.delivery.destination, k);
    }
    rows.push(&o, &f.flow, &f.delivery, order_seq);
}

/// Older dead entries of each delivered row's key, at its destination (and
/// parse/map-stage ones of the key, whatever their flow: which
/// destinations their replay writes is known only then), remember it: the
/// last delivery per (entry, flow, destination) in `superseded`, the last
/// of all in `superseded_by`.
async fn supersede(c: &mut Conn, rows: &[(&str, i64, &str, &str, &str)]) -> Result<(), StoreError> {
    let keys: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let flows: Vec<&str> = rows.iter().map(|r| r.2).collect();
    let dests: Vec<&str> = rows.iter().map(|r| r.3).collect();
    let events: Vec<&str> = rows.iter().map(|r| r.4).collect();
    c.execute(
        "WITH x AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[])
                      WITH ORDINALITY AS x(k, s, f, d, ev, n)),
         m AS (SELECT q.id AS q, x.f, x.d, x.ev, x.n FROM x JOIN dlq q
                 ON q.entity_key = x.k AND q.status = 'dead' AND q.order_seq < x.s
                AND (q.destination = x.d OR q.destination = '')),
         s AS (INSERT INTO superseded AS t (dlq_id, flow, destination, event_id, touch)
               SELECT q, f, d, ev, nextval('touch_seq') FROM
                 (SELECT DISTINCT ON (q, f, d) q, f, d, ev FROM m ORDER BY q, f, d, n DESC) y
               ON CONFLICT (dlq_id, flow, destination) DO UPDATE
                 SET event_id = excluded.event_id, touch = excluded.touch)
         UPDATE dlq SET superseded_by = l.ev
         FROM (SELECT DISTINCT ON (q) q, ev FROM m ORDER BY q, n DESC) l WHERE dlq.id = l.q",
        &[&keys, &seqs, &flows, &dests, &events],
    )
    .await?;
    Ok(())
}

/// A crosswalk change, several deliveries of one record folded in order.
#[derive(Default)]
struct CrosswalkUpsert {
    external_id: Option<String>,
    version: Option<String>,
    fingerprint: Option<String>,
    flow: String,
    event_id: String,
}

/// The write outcomes of delivered rows, in the crosswalk (keys in
/// ascending order: two settles upserting the same records take their
/// locks in the same order).
async fn upsert_crosswalk(
    c: &mut Conn,
    rows: &BTreeMap<(String, String, String), CrosswalkUpsert>,
    now: i64,
) -> Result<(), StoreError> {
    let mut cols: [Vec<Option<&str>>; 8] = Default::default();
    for ((system, source, key), u) in rows {
        let vals = [
            Some(system.as_str()),
            Some(source.as_str()),
            Some(key.as_str()),
            u.external_id.as_deref(),
            Some(u.flow.as_str()),
            Some(u.event_id.as_str()),
            u.version.as_deref(),
            u.fingerprint.as_deref(),
        ];
        for (col, v) in cols.iter_mut().zip(vals) {
            col.push(v);
        }
    }
    c.execute(
        "INSERT INTO crosswalk AS t (system, source, source_key, external_id, flow, event_id, created_at,
           updated_at, version, fingerprint, touch)
         SELECT s, src, k, x, f, ev, $1, $1, v, fp, nextval('touch_seq')
         FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
           $9::text[]) AS u(s, src, k, x, f, ev, v, fp)
         ON CONFLICT (system, source, source_key) DO UPDATE SET
           external_id = COALESCE(excluded.external_id, t.external_id), flow = excluded.flow,
           event_id = excluded.event_id, updated_at = excluded.updated_at,
           version = COALESCE(excluded.version, t.version),
           fingerprint = COALESCE(excluded.fingerprint, t.fingerprint), touch = excluded.touch",
        &[
            &now, &cols[0], &cols[1], &cols[2], &cols[3], &cols[4], &cols[5], &cols[6], &cols[7],
        ],
    )
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// replay, discard

/// A dead entry as replay and discard read it.
struct Dead {
    status: String,
    stage: String,
    flow: String,
    destination: String,
    entity_key: Option<String>,
    idempotency_key: Option<String>,
    source: String,
    event_id: String,
    correlation_id: String,
    created_at: i64,
    payload: String,
    attributes: Option<String>,
    order_seq: Option<i64>,
    event_time: Option<i64>,
    source_version: Option<String>,
    group_id: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

/// The entry's key (immutable), read before any lock is taken.
async fn entry_key(c: &mut Conn, id: i64) -> Result<Option<String>, StoreError> {
    match c
        .query_opt("SELECT entity_key FROM dlq WHERE id = $1", &[&id])
        .await?
    {
        None => Err(StoreError::NotFound(format!("no DLQ entry {id}"))),
        Some(r) => Ok(r.try_get(0)?),
    }
}

/// The dead entry `id`, locked, or why it cannot be acted on.
async fn dead_entry(c: &mut Conn, id: i64) -> Result<Dead, StoreError> {
    let Some(r) = c
        .query_opt(
            "SELECT status, stage, flow, destination, entity_key, idempotency_key, source, event_id,
               correlation_id, created_at, payload, attributes, order_seq, event_time, source_version,
               group_id, traceparent, tracestate
             FROM dlq WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
    else {
        return Err(StoreError::NotFound(format!("no DLQ entry {id}")));
    };
    let d = Dead {
        status: r.try_get(0)?,
        stage: r.try_get(1)?,
        flow: r.try_get(2)?,
        destination: r.try_get(3)?,
        entity_key: r.try_get(4)?,
        idempotency_key: r.try_get(5)?,
        source: r.try_get(6)?,
        event_id: r.try_get(7)?,
        correlation_id: r.try_get(8)?,
        created_at: r.try_get(9)?,
        payload: r.try_get(10)?,
        attributes: r.try_get(11)?,
        order_seq: r.try_get(12)?,
        event_time: r.try_get(13)?,
        source_version: r.try_get(14)?,
        group_id: r.try_get(15)?,
        traceparent: r.try_get(16)?,
        tracestate: r.try_get(17)?,
    };
    if d.status != "dead" {
        return Err(StoreError::Invalid(format!(
            "DLQ entry {id} is already {}",
            d.status
        )));
    }
    Ok(d)
}

/// Resolve the entry: its status, a history line, `resolved_at`, and its
/// payload replaced by its hash (ARCHITECTURE.md, "Retention").
async fn mark(
    c: &mut Conn,
    id: i64,
    status: &str,
    note: &str,
    payload: &str,
    now: i64,
) -> Result<(), StoreError> {
    let hash = crate::payload_sha256(payload);
    c.execute(
        "UPDATE dlq SET status = $2,
           history = history || jsonb_build_array(jsonb_build_object('at', $3::int8, 'action', $2::text, 'note', $4::text)),
           resolved_at = $3, payload = '', payload_sha256 = $5
         WHERE id = $1",
        &[&id, &status, &now, &note, &hash],
    )
    .await?;
    Ok(())
}

/// Lift the entry's holds; their queues are refreshed with the others.
async fn release_holds(c: &mut Conn, id: i64, touched: &mut Touched) -> Result<(), StoreError> {
    for r in c
        .query(
            "DELETE FROM holds WHERE dlq_id = $1 RETURNING destination, entity_key",
            &[&id],
        )
        .await?
    {
        let (d, k): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        touched.queues.insert((d, k));
    }
    Ok(())
}

/// Is a row of queue (dest, key) placed after `order_seq` leased now? The
/// rows that can be (the head, rows with a token) are locked first, so a
/// claim in progress is waited for and none can start until commit.
async fn later_in_flight(
    c: &mut Conn,
    dest: &str,
    key: &str,
    order_seq: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let rows = c
        .query(
            "SELECT order_seq, token, lease_until FROM outbox
             WHERE destination = $1 AND entity_key = $2 AND (eligible OR token <> 0)
             ORDER BY order_seq, id FOR UPDATE",
            &[&dest, &key],
        )
        .await?;
    for r in rows {
        let (s, token, until): (i64, i64, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        if s > order_seq && token != 0 && until > now {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The delivered later write that makes replaying `e` regress a
/// destination: for a deliver-stage entry any (they are all of its
/// destination); for a parse/map-stage one, one of its own flow, or one at a
/// destination the new outcome writes with the entry's key. The last first.
async fn superseder(
    c: &mut Conn,
    id: i64,
    e: &Dead,
    outcome: Option<&FlowOutcome>,
) -> Result<Option<String>, StoreError> {
    let rows = c
        .query(
            "SELECT flow, destination, event_id FROM superseded WHERE dlq_id = $1 ORDER BY touch DESC",
            &[&id],
        )
        .await?;
    let writes: Vec<&str> = match outcome {
        Some(FlowOutcome::Routed { deliveries, .. }) => deliveries
            .iter()
            .filter(|d| d.entity_key.is_some() && d.entity_key == e.entity_key)
            .map(|d| d.destination.as_str())
            .collect(),
        _ => Vec::new(),
    };
    for r in rows {
        let (f, d, ev): (String, String, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        if e.stage == Stage::Deliver.as_str() || f == e.flow || writes.contains(&d.as_str()) {
            return Ok(Some(ev));
        }
    }
    Ok(None)
}

pub(crate) async fn replay(c: &mut Conn, ctx: &Ctx<'_>, r: &Replay) -> Result<Applied, StoreError> {
    let key = entry_key(c, r.dlq_id).await?;
    c.begin().await?;
    let res = replay_in(c, ctx, r, key.as_deref()).await;
    c.finish(res).await
}

async fn replay_in(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    r: &Replay,
    key: Option<&str>,
) -> Result<Applied, StoreError> {
    let now = crate::now_ms();
    let id = r.dlq_id;
    let locks = ctx.locks(
        key.into_iter()
            .chain(r.outcome.iter().flat_map(outcome_keys)),
    );
    lock_keys(c, &locks).await?;
    let e = dead_entry(c, id).await?;
    let deliver = e.stage == Stage::Deliver.as_str();
    // validate everything before changing anything
    if deliver {
        if r.outcome.is_some() {
            return Err(StoreError::Invalid(format!(
                "DLQ entry {id} failed at delivery; it is replayed as it is (with an optional payload), not through a new flow outcome"
            )));
        }
    } else {
        match &r.outcome {
            None => {
                return Err(StoreError::Invalid(format!(
                    "DLQ entry {id} failed at the {} stage; it is replayed through its flow's mapping (give the new outcome)",
                    e.stage
                )));
            }
            Some(o) => {
                check_outcome(o)?;
                if let FlowOutcome::Canonical { flow, .. } = o {
                    return Err(StoreError::Invalid(format!(
                        "DLQ entry {id}: replaying into canonical records (flow `{flow}`) is not supported on the PostgreSQL journal yet"
                    )));
                }
                if outcome_flow(o) != e.flow {
                    return Err(StoreError::Invalid(format!(
                        "DLQ entry {id} belongs to flow {}; the new outcome is of flow {}",
                        e.flow,
                        outcome_flow(o)
                    )));
                }
            }
        }
    }
    let payload = r.payload.clone().unwrap_or_else(|| e.payload.clone());
    if deliver && let Err(err) = serde_json::from_str::<serde_json::Value>(&payload) {
        return Err(StoreError::Invalid(format!(
            "DLQ entry {id}: the payload to replay is not valid JSON: {err}"
        )));
    }
    let place = e.order_seq.unwrap_or(0);
    if !r.force {
        if let Some(by) = superseder(c, id, &e, r.outcome.as_ref()).await? {
            return Err(StoreError::Refused(Refusal::Superseded { by_event: by }));
        }
        let in_flight = match (&e.entity_key, deliver, &r.outcome) {
            (Some(k), true, _) => later_in_flight(c, &e.destination, k, place, now).await?,
            (Some(k), false, Some(FlowOutcome::Routed { deliveries, .. })) => {
                let mut any = false;
                // only rows of the entry's key take its place
                for d in deliveries
                    .iter()
                    .filter(|d| d.entity_key.as_deref() == Some(k))
                {
                    if later_in_flight(c, &d.destination, k, place, now).await? {
                        any = true;
                        break;
                    }
                }
                any
            }
            _ => false,
        };
        if in_flight {
            return Err(StoreError::Refused(Refusal::InFlight));
        }
    }

    // apply
    let mut staged = Staged::default();
    release_holds(c, id, &mut staged.touched).await?;
    let mut applied = Applied {
        changed: 1,
        ..Default::default()
    };
    let o = Origin {
        source: &e.source,
        event_id: &e.event_id,
        correlation_id: &e.correlation_id,
        created_at: e.created_at,
        event_time: e.event_time.unwrap_or(e.created_at),
        source_version: e.source_version.as_deref(),
        group_id: e.group_id.as_deref(),
        traceparent: e.traceparent.as_deref(),
        tracestate: e.tracestate.as_deref(),
        attributes: e.attributes.as_deref(),
        payload: r.payload.as_deref().unwrap_or(&e.payload),
    };
    if deliver {
        let (seqs, _) = allocate(c, usize::from(r.force), 0).await?;
        let order_seq = if r.force {
            Fresh(seqs.into_iter()).next()?
        } else {
            place
        };
        let d = NewDelivery {
            destination: e.destination.clone(),
            entity_key: e.entity_key.clone(),
            idempotency_key: e.idempotency_key.clone().unwrap_or_default(),
            payload,
            delivered: false,
        };
        if let Some(k) = &e.entity_key {
            staged.touched.queue(&e.destination, k);
        }
        staged.rows.push(&o, &e.flow, &d, order_seq);
        bump(&mut staged.deltas, &e.flow, &e.destination, |c| {
            c.dead_lettered -= 1
        });
    } else if let Some(outcome) = &r.outcome {
        // the entry leaves the flow's rejected count and re-enters as its
        // new outcome; rows of its key take its place unless forced
        bump(&mut staged.deltas, &e.flow, "", |c| {
            c.received -= 1;
            c.rejected -= 1;
        });
        let placed = match (&e.entity_key, e.order_seq) {
            (Some(k), Some(s)) if !r.force => Some(Place {
                key: k,
                order_seq: s,
            }),
            _ => None,
        };
        let (n, m) = needs(outcome, placed.as_ref());
        let (seqs, ids) = allocate(c, n, m).await?;
        let mut counted = Applied::default();
        staged.outcome(
            &o,
            outcome,
            placed.as_ref(),
            &mut Fresh(seqs.into_iter()),
            &mut Fresh(ids.into_iter()),
            now,
            &mut counted,
        )?;
        applied.flows = counted.flows;
    }
    mark(c, id, "replayed", &r.note, &e.payload, now).await?;
    staged.write(c, now, false).await?;
    Ok(applied)
}

pub(crate) async fn discard(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    id: i64,
    note: &str,
) -> Result<Applied, StoreError> {
    let key = entry_key(c, id).await?;
    c.begin().await?;
    let r = discard_in(c, ctx, id, note, key.as_deref()).await;
    c.finish(r).await
}

async fn discard_in(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    id: i64,
    note: &str,
    key: Option<&str>,
) -> Result<Applied, StoreError> {
    let now = crate::now_ms();
    lock_keys(c, &ctx.locks(key)).await?;
    let e = dead_entry(c, id).await?;
    let mut staged = Staged::default();
    mark(c, id, "discarded", note, &e.payload, now).await?;
    release_holds(c, id, &mut staged.touched).await?;
    if e.stage == Stage::Deliver.as_str() {
        bump(&mut staged.deltas, &e.flow, &e.destination, |c| {
            c.dead_lettered -= 1;
            c.discarded += 1;
        });
    } else {
        bump(&mut staged.deltas, &e.flow, "", |c| {
            c.rejected -= 1;
            c.discarded += 1;
        });
    }
    staged.write(c, now, false).await?;
    Ok(Applied {
        changed: 1,
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------
// prune, drift, restart

/// One slice of a prune, in one transaction: among the oldest `limit`
/// dedupe ids, those accepted before the cutoff; the oldest `limit`
/// resolved DLQ entries past theirs (with what superseded them); the
/// `limit` drift events seen longest ago, past theirs. The outer
/// conditions repeat the inner ones: a row changed meanwhile is checked
/// again (a drift seen again is kept).
pub(crate) async fn prune(
    c: &mut Conn,
    cutoffs: &crate::Prune,
    limit: i64,
) -> Result<crate::Pruned, StoreError> {
    c.begin().await?;
    let r = prune_in(c, cutoffs, limit).await;
    c.finish(r).await
}

async fn prune_in(
    c: &mut Conn,
    cut: &crate::Prune,
    limit: i64,
) -> Result<crate::Pruned, StoreError> {
    let dedupe = c
        .execute(
            "DELETE FROM dedupe WHERE seq IN (SELECT seq FROM dedupe ORDER BY seq LIMIT $2) AND accepted_at < $1",
            &[&cut.dedupe_before, &limit],
        )
        .await?;
    let dlq: i64 = c
        .query_one(
            "WITH gone AS (
               DELETE FROM dlq WHERE id IN (SELECT id FROM dlq WHERE status <> 'dead' AND resolved_at < $1
                   ORDER BY resolved_at, id LIMIT $2)
                 AND status <> 'dead' AND resolved_at < $1
               RETURNING id),
             s AS (DELETE FROM superseded WHERE dlq_id IN (SELECT id FROM gone))
             SELECT count(*) FROM gone",
            &[&cut.dlq_before, &limit],
        )
        .await?
        .try_get(0)?;
    let drift = c
        .execute(
            "DELETE FROM drift_events WHERE id IN
               (SELECT id FROM drift_events WHERE last_seen < $1 ORDER BY last_seen LIMIT $2)
               AND last_seen < $1",
            &[&cut.drift_before, &limit],
        )
        .await?;
    let attempts = c
        .execute(
            // the oldest slice by id, those of it past the cutoff
            "DELETE FROM attempts WHERE id IN (SELECT id FROM attempts ORDER BY id LIMIT $2)
               AND at < $1",
            &[&cut.attempts_before, &limit],
        )
        .await?;
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    Ok(crate::Pruned {
        dedupe: n(dedupe),
        dlq: n(u64::try_from(dlq).unwrap_or(0)),
        drift: n(drift),
        attempts: n(attempts),
    })
}

pub(crate) async fn record_drift(c: &mut Conn, b: &DriftBatch) -> Result<Applied, StoreError> {
    c.begin().await?;
    let r = drift_in(c, b).await;
    c.finish(r).await
}

async fn drift_in(c: &mut Conn, b: &DriftBatch) -> Result<Applied, StoreError> {
    let now = crate::now_ms();
    let mut n = 0;
    if let Some(shape) = &b.shape {
        c.execute(
            "INSERT INTO stream_shapes (source, shape, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (source) DO UPDATE SET shape = excluded.shape, updated_at = excluded.updated_at",
            &[&b.source, shape, &now],
        )
        .await?;
        n += 1;
    }
    for e in &b.events {
        n += c
            .execute(
                "INSERT INTO drift_events AS t (source, kind, path, detail, example, first_seen, last_seen, count)
                 VALUES ($1, $2, $3, $4, $5, $6, $6, $7)
                 ON CONFLICT (source, kind, path, detail) DO UPDATE SET
                   count = t.count + excluded.count, last_seen = excluded.last_seen",
                &[&b.source, &e.kind, &e.path, &e.detail, &e.example, &now, &e.count],
            )
            .await? as usize;
    }
    Ok(Applied {
        changed: n,
        ..Default::default()
    })
}

/// Mark drift events accepted (those not yet accepted).
pub(crate) async fn accept_drift(c: &mut Conn, ids: &[i64]) -> Result<Applied, StoreError> {
    let now = crate::now_ms();
    let n = c
        .execute(
            "UPDATE drift_events SET accepted_at = $2 WHERE id = ANY($1) AND accepted_at IS NULL",
            &[&ids, &now],
        )
        .await?;
    Ok(Applied {
        changed: n as usize,
        ..Default::default()
    })
}

/// A hub starting: the leases its node held before end (that run is gone;
/// other nodes' leases run out by their deadline, or end when a live
/// node's heartbeat finds them dead), and so does its membership row.
pub(crate) async fn end_leases(c: &mut Conn, node: &str) -> Result<u64, StoreError> {
    c.execute("DELETE FROM nodes WHERE node = $1", &[&node])
        .await?;
    release_claims_of(c, node).await
}

/// End the row leases (claims) `node` holds.
async fn release_claims_of(c: &mut Conn, node: &str) -> Result<u64, StoreError> {
    c.execute(
        "UPDATE outbox SET token = 0, lease_until = 0, lease_node = NULL WHERE token <> 0 AND lease_node = $1",
        &[&node],
    )
    .await
}

/// `ctx.node`'s heartbeat (see `Journal::heartbeat`): its row says it is
/// alive for `ttl_ms` more; every node whose row ran out is deleted, and
/// the claims it held end, in the same transaction. Two nodes beating at
/// once never reap the same node (`SKIP LOCKED`).
pub(crate) async fn heartbeat(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    ttl_ms: i64,
) -> Result<crate::Heartbeat, StoreError> {
    c.begin().await?;
    let r = heartbeat_in(c, ctx, ttl_ms).await;
    c.finish(r).await
}

async fn heartbeat_in(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    ttl_ms: i64,
) -> Result<crate::Heartbeat, StoreError> {
    const MINE: &str = concat!(
        "SELECT alive_until > ",
        db_now_ms!(),
        " FROM nodes WHERE node = $1 FOR UPDATE"
    );
    let was_alive = match c.query_opt(MINE, &[&ctx.node]).await? {
        Some(r) => r.try_get::<_, bool>(0)?,
        None => false,
    };
    const BEAT: &str = concat!(
        "INSERT INTO nodes AS n (node, started_at, beat_at, alive_until) VALUES ($1, ",
        db_now_ms!(),
        ", ",
        db_now_ms!(),
        ", ",
        db_now_ms!(),
        " + $2)
         ON CONFLICT (node) DO UPDATE SET beat_at = EXCLUDED.beat_at, alive_until = EXCLUDED.alive_until"
    );
    c.execute(BEAT, &[&ctx.node, &ttl_ms]).await?;
    const REAP: &str = concat!(
        "DELETE FROM nodes WHERE node IN (SELECT node FROM nodes WHERE node <> $1 AND alive_until <= ",
        db_now_ms!(),
        " ORDER BY node FOR UPDATE SKIP LOCKED) RETURNING node"
    );
    let mut dead: Vec<String> = c
        .query(REAP, &[&ctx.node])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    dead.sort();
    let mut reaped = Vec::with_capacity(dead.len());
    for node in dead {
        let rows = release_claims_of(c, &node).await?;
        reaped.push((node, rows));
    }
    Ok(crate::Heartbeat { was_alive, reaped })
}

/// `ctx.node` leaves (a hub stopping): its membership row goes.
pub(crate) async fn leave(c: &mut Conn, ctx: &Ctx<'_>) -> Result<(), StoreError> {
    c.execute("DELETE FROM nodes WHERE node = $1", &[&ctx.node])
        .await?;
    Ok(())
}

/// Append to a topic (`Journal::publish`): under the topic's advisory lock,
/// so its sequences follow commit order (schema migration 8).
pub(crate) async fn publish(
    c: &mut Conn,
    topic: &str,
    entries: &[crate::TopicEntry],
) -> Result<crate::Published, StoreError> {
    c.begin().await?;
    let r = publish_in(c, topic, entries).await;
    c.finish(r).await
}

async fn publish_in(
    c: &mut Conn,
    topic: &str,
    entries: &[crate::TopicEntry],
) -> Result<crate::Published, StoreError> {
    let now = crate::now_ms();
    c.execute(
        "SELECT pg_advisory_xact_lock(hashtext('weft.topic.' || $1))",
        &[&topic],
    )
    .await?;
    let mut out = crate::Published::default();
    for e in entries {
        let n = c
            .execute(
                "INSERT INTO topic_messages (topic, id, entity_key, payload, correlation_id,
                   causation_id, flow, event_time, traceparent, tracestate, published_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (topic, id) DO NOTHING",
                &[
                    &topic,
                    &e.id,
                    &e.entity_key,
                    &e.payload,
                    &e.correlation_id,
                    &e.causation_id,
                    &e.flow,
                    &e.event_time,
                    &e.traceparent,
                    &e.tracestate,
                    &now,
                ],
            )
            .await?;
        if n == 1 {
            out.appended += 1;
        } else {
            out.duplicates += 1;
        }
    }
    Ok(out)
}

/// One slice of a topic's prune: the oldest `limit` messages, those of
/// them appended before `before`.
pub(crate) async fn prune_topic(
    c: &mut Conn,
    topic: &str,
    before: i64,
    limit: i64,
) -> Result<usize, StoreError> {
    Ok(c.execute(
        "DELETE FROM topic_messages WHERE seq IN
           (SELECT seq FROM topic_messages WHERE topic = $1 ORDER BY seq LIMIT $3)
           AND published_at < $2",
        &[&topic, &before, &limit],
    )
    .await? as usize)
}
