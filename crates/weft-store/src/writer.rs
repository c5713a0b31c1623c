//! The SQLite journal's writer thread: every state change, in group commits.
//!
//! One thread owns the write connection. It takes whatever jobs are waiting
//! (up to [`GROUP`]) and applies them in one IMMEDIATE transaction with one
//! fsync; if one job fails, the transaction is rolled back and the group is
//! applied again with a savepoint per job (and the job's counters inside its
//! savepoint), so only the failing job is refused. If SQLite rolled the
//! whole transaction back by itself (a full disk, an I/O error), every job
//! of the group fails: none is answered `Ok` for work that is not on disk.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::Digest;
use tokio::sync::{mpsc, oneshot};

use crate::journal::{
    ClaimRequest, Claimed, FollowUp, Outcome, Refusal, Replay, Settle, Settled, WriteOutcome,
};
use crate::{Applied, Dedupe, DriftBatch, FlowOutcome, IngestBatch, OutboxRow, StoreError};

/// Row states (see migration 4).
pub(crate) const QUEUED: i64 = 0;
pub(crate) const READY: i64 = 1;
pub(crate) const LEASED: i64 = 2;
pub(crate) const WAITING: i64 = 3;
pub(crate) const HELD: i64 = 4;

pub(crate) enum Op {
    Ingest(IngestBatch),
    Claim(ClaimRequest),
    Settle(Settle),
    Replay(Replay),
    Discard {
        dlq_id: i64,
        note: String,
    },
    /// One slice of a prune: at most `limit` rows of each table.
    Prune {
        cutoffs: crate::Prune,
        limit: usize,
    },
    Drift(DriftBatch),
    /// Drift events accepted by an operator.
    AcceptDrift(Vec<i64>),
    /// A manual conflict resolved.
    Resolve(crate::ResolveConflict),
    /// A held match decided.
    Match(crate::ResolveMatch),
    /// The crosswalk changed by hand.
    Xref(crate::XrefChange),
    /// Values an identity lane is about to write to a system.
    Intent {
        system: String,
        writes: Vec<crate::CanonicalWritten>,
    },
    /// Messages appended to a topic.
    Publish {
        topic: String,
        entries: Vec<crate::TopicEntry>,
    },
    /// One slice of a topic's prune.
    PruneTopic {
        topic: String,
        before: i64,
        limit: usize,
    },
    /// Tests only: a statement on the writer's connection (a PRAGMA).
    Exec(String),
}

pub(crate) enum Reply {
    Applied(Applied),
    Claimed(Vec<Claimed>),
    Settled(Settled),
    Pruned(crate::Pruned),
    Published(crate::Published),
    Count(usize),
}

pub(crate) struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// Jobs waiting beyond this make their senders wait: memory stays bounded.
pub(crate) const QUEUE: usize = 256;
/// Most jobs in one commit.
const GROUP: usize = 512;

/// How often the checkpointer copies committed WAL frames into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL pages at which the writer checkpoints by itself: a backstop for a
/// checkpointer that cannot keep up (SQLite's default is 1000).
const WRITER_CHECKPOINT_PAGES: i64 = 16_000;

/// 16 bytes of the SHA-256 of an event id: the dedupe key.
pub(crate) fn id_hash(id: &str) -> Vec<u8> {
    sha2::Sha256::digest(id.as_bytes())[..16].to_vec()
}

/// Start the writer thread on `conn`, and a checkpointer thread on a second
/// connection to `path`. Checkpoints run beside the writer instead of inside
/// its commits; a page written many times between two checkpoints (outbox
/// rows come and go) is copied once.
pub(crate) fn spawn(
    conn: Connection,
    path: &Path,
    synchronous: crate::Synchronous,
) -> Result<mpsc::Sender<Job>, StoreError> {
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
    // a claim's multi-row UPDATE keeps a statement journal: in memory, not in
    // a temporary file written (and page-faulted) on every claim
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    let ckpt = Connection::open(path)?;
    ckpt.busy_timeout(Duration::from_secs(10))?;
    // tokens never repeat, across restarts too (a settlement from before a
    // restart is stale): seeded from the clock, with 1000 claims per ms of
    // headroom, and above any token still in the table
    let max_token: i64 = conn.query_row("SELECT COALESCE(max(token), 0) FROM outbox", [], |r| {
        r.get(0)
    })?;
    let first_token = max_token.max(crate::now_ms().saturating_mul(1000));
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    let (alive, gone) = std_mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("weft-store-writer".into())
        .spawn(move || {
            Writer {
                conn,
                next_token: first_token + 1,
                full: synchronous == crate::Synchronous::Full,
                syncing: synchronous == crate::Synchronous::Full,
            }
            .run(rx);
            drop(alive);
        })
        .map_err(|e| StoreError::Failed(format!("cannot start the writer thread: {e}")))?;
    std::thread::Builder::new()
        .name("weft-store-ckpt".into())
        .spawn(move || checkpointer(ckpt, gone))
        .map_err(|e| StoreError::Failed(format!("cannot start the checkpoint thread: {e}")))?;
    Ok(tx)
}

/// PASSIVE checkpoints every [`CHECKPOINT_EVERY`] until the writer stops;
/// they never block the writer or readers.
fn checkpointer(conn: Connection, writer_gone: std_mpsc::Receiver<()>) {
    loop {
        let stop = matches!(
            writer_gone.recv_timeout(CHECKPOINT_EVERY),
            Err(std_mpsc::RecvTimeoutError::Disconnected)
        );
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "store checkpoint did not run; will try again");
        }
        if stop {
            return;
        }
    }
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Counts {
    pub received: i64,
    pub filtered: i64,
    pub rejected: i64,
    pub delivered: i64,
    pub dead_lettered: i64,
    pub discarded: i64,
    /// A flow-level row: an ingest received a record (its time becomes
    /// `last_received_at`; a replay's recount does not).
    pub seen: bool,
}

pub(crate) type Deltas = HashMap<(String, String), Counts>;

fn bump(d: &mut Deltas, flow: &str, dest: &str, f: impl FnOnce(&mut Counts)) {
    f(d.entry((flow.to_owned(), dest.to_owned())).or_default());
}

struct Writer {
    conn: Connection,
    next_token: i64,
    /// `store.synchronous: full`: a commit that acknowledges something
    /// outside the store is on disk (fsynced) before its reply.
    full: bool,
    /// The connection's `synchronous` is FULL now (else NORMAL).
    syncing: bool,
}

impl Op {
    /// Whether the commit holding this op must be on disk before the reply:
    /// everything that acknowledges to the outside (an ingest before its 2xx,
    /// ack or checkpoint; an operator's command). A claim (leases end with
    /// the process anyway) and a plain settle are bookkeeping: committed (a
    /// kill -9 keeps them: the WAL is in the OS's cache) and fsynced by the
    /// next acknowledging commit or checkpoint. After a power loss, settles
    /// since the last fsync roll back and those rows are delivered again
    /// under the same idempotency key, as after a crash mid-delivery. A
    /// settle that records what the destination gave back (an id, a
    /// version: the crosswalk) or enters follow-ups is synced.
    fn must_sync(&self) -> bool {
        match self {
            Op::Claim(_) | Op::Prune { .. } | Op::PruneTopic { .. } | Op::Drift(_) => false,
            Op::Settle(s) => {
                !s.follow_ups.is_empty()
                    || s.items.iter().any(
                        |i| matches!(&i.outcome, crate::Outcome::Delivered(w) if !w.is_empty()),
                    )
            }
            _ => true,
        }
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut jobs = vec![first];
            while jobs.len() < GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            match self.commit_group(&jobs) {
                Ok(results) => {
                    for (job, r) in jobs.into_iter().zip(results) {
                        let _ = job.reply.send(r);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "store commit failed");
                    let msg = e.to_string();
                    for job in jobs {
                        let _ = job
                            .reply
                            .send(Err(StoreError::Failed(format!("commit failed: {msg}"))));
                    }
                }
            }
        }
    }

    /// Apply `jobs` in one transaction: all together; if one fails, again
    /// with a savepoint per job so that only the failing one is refused. (A
    /// savepoint per job on the common path copied every page it touched into
    /// the statement journal: about a tenth of the writer's time.)
    fn commit_group(&mut self, jobs: &[Job]) -> Result<Vec<Result<Reply, StoreError>>, StoreError> {
        // fsync the commit only when one of its jobs needs it; in WAL mode
        // that fsync makes every earlier commit durable too
        let sync = self.full && jobs.iter().any(|j| j.op.must_sync());
        if sync != self.syncing {
            self.conn
                .pragma_update(None, "synchronous", if sync { "FULL" } else { "NORMAL" })?;
            self.syncing = sync;
        }
        if let Some(results) = self.commit_all(jobs)? {
            return Ok(results);
        }
        self.commit_each(jobs)
    }

    /// `None` when a job failed (nothing was written).
    fn commit_all(
        &mut self,
        jobs: &[Job],
    ) -> Result<Option<Vec<Result<Reply, StoreError>>>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut totals: Deltas = HashMap::new();
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs {
            match apply(&tx, &job.op, &mut totals, &mut self.next_token) {
                Ok(a) => results.push(Ok(a)),
                Err(_) => return Ok(None), // dropping `tx` rolls back
            }
        }
        write_counts(&tx, &totals)?;
        tx.commit()?;
        Ok(Some(results))
    }

    fn commit_each(&mut self, jobs: &[Job]) -> Result<Vec<Result<Reply, StoreError>>, StoreError> {
        let mut tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut deltas: Deltas = HashMap::new();
            let sp = tx.savepoint()?;
            let r = apply(&sp, &job.op, &mut deltas, &mut self.next_token)
                .and_then(|a| write_counts(&sp, &deltas).map(|()| a));
            match r {
                Ok(a) => {
                    sp.commit()?;
                    results.push(Ok(a));
                }
                Err(e) => {
                    drop(sp); // rolls back this job only
                    results.push(Err(e));
                }
            }
            // SQLite rolls the whole transaction back by itself after some
            // errors (SQLITE_FULL, IOERR, NOMEM); later savepoints would then
            // commit one by one outside the group. Fail the whole group.
            if tx.is_autocommit() {
                return Err(StoreError::Invalid(
                    "SQLite rolled the transaction back (disk full or I/O error)".into(),
                ));
            }
        }
        tx.commit()?;
        Ok(results)
    }
}

fn write_counts(tx: &Connection, totals: &Deltas) -> Result<(), StoreError> {
    // a flow-level row an ingest received records on sets its
    // `last_received_at` (freshness); other rows leave it
    let now = crate::now_ms();
    let mut st = tx.prepare_cached(
        "INSERT INTO flow_counts (flow, destination, received, filtered, rejected, delivered, dead_lettered, discarded, last_received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (flow, destination) DO UPDATE SET
           received = received + excluded.received,
           filtered = filtered + excluded.filtered,
           rejected = rejected + excluded.rejected,
           delivered = delivered + excluded.delivered,
           dead_lettered = dead_lettered + excluded.dead_lettered,
           discarded = discarded + excluded.discarded,
           last_received_at = coalesce(max(last_received_at, excluded.last_received_at), last_received_at, excluded.last_received_at)",
    )?;
    for ((flow, dest), c) in totals {
        let seen = (dest.is_empty() && c.seen).then_some(now);
        st.execute(params![
            flow,
            dest,
            c.received,
            c.filtered,
            c.rejected,
            c.delivered,
            c.dead_lettered,
            c.discarded,
            seen
        ])?;
    }
    Ok(())
}

fn apply(tx: &Connection, op: &Op, d: &mut Deltas, tokens: &mut i64) -> Result<Reply, StoreError> {
    let now = crate::now_ms();
    match op {
        Op::Ingest(b) => ingest(tx, b, d, now).map(Reply::Applied),
        Op::Claim(req) => {
            let token = *tokens;
            *tokens += 1;
            claim(tx, req, token, now).map(Reply::Claimed)
        }
        Op::Settle(s) => settle(tx, s, d, now).map(Reply::Settled),
        Op::Replay(r) => replay(tx, r, d, now).map(Reply::Applied),
        Op::Discard { dlq_id, note } => discard(tx, *dlq_id, note, d, now).map(Reply::Applied),
        Op::Prune { cutoffs, limit } => prune(tx, cutoffs, *limit as i64).map(Reply::Pruned),
        Op::Drift(b) => crate::drift::apply(tx, b).map(Reply::Applied),
        Op::AcceptDrift(ids) => crate::drift::accept(tx, ids).map(Reply::Applied),
        Op::Resolve(r) => {
            let (source, event_id, rows) = crate::canonical::sql::ready(
                crate::canonical::resolve_conflict(&mut crate::canonical::sql::Lite(tx), r, now),
            )?;
            enqueue_caused(tx, d, (&source, &event_id, &event_id), rows, now).map(Reply::Applied)
        }
        Op::Xref(c) => {
            let (source, event_id, rows) = crate::canonical::sql::ready(
                crate::canonical::xref_change(&mut crate::canonical::sql::Lite(tx), c, now),
            )?;
            enqueue_caused(tx, d, (&source, &event_id, &event_id), rows, now).map(Reply::Applied)
        }
        Op::Match(r) => {
            let (source, event_id, correlation_id, rows) = crate::canonical::sql::ready(
                crate::canonical::resolve_match(&mut crate::canonical::sql::Lite(tx), r, now),
            )?;
            let cause = (source.as_str(), event_id.as_str(), correlation_id.as_str());
            enqueue_caused(tx, d, cause, rows, now).map(Reply::Applied)
        }
        Op::Publish { topic, entries } => {
            crate::topic::publish(tx, topic, entries, now).map(Reply::Published)
        }
        Op::PruneTopic {
            topic,
            before,
            limit,
        } => crate::topic::prune(tx, topic, *before, *limit).map(Reply::Count),
        Op::Intent { system, writes } => {
            for w in writes {
                crate::canonical::sql::ready(crate::canonical::intend(
                    &mut crate::canonical::sql::Lite(tx),
                    system,
                    w,
                    now,
                ))?;
            }
            Ok(Reply::Applied(Applied::default()))
        }
        Op::Exec(sql) => {
            tx.query_row(sql, [], |_| Ok(()))
                .optional()
                .map_err(StoreError::from)?;
            Ok(Reply::Applied(Applied::default()))
        }
    }
}

/// The rows a decision on canonical records causes (a resolved conflict or
/// match), entered as follow-ups of `cause` = (source, event id,
/// correlation id) and counted as received by their lanes.
fn enqueue_caused(
    tx: &Connection,
    d: &mut Deltas,
    cause: (&str, &str, &str),
    rows: crate::canonical::Routed,
    now: i64,
) -> Result<Applied, StoreError> {
    let mut applied = Applied::default();
    let mut seq = Seq::Range { next: 0, end: 0 };
    for (flow, dl) in rows {
        let f = FollowUp {
            flow: flow.clone(),
            source: cause.0.to_owned(),
            event_id: cause.1.to_owned(),
            correlation_id: cause.2.to_owned(),
            delivery: dl,
        };
        follow_up(tx, &f, &mut seq, now)?;
        bump(d, &flow, &f.delivery.destination, |c| c.received += 1);
        applied.changed += 1;
    }
    Ok(applied)
}

/// Reserve `n` consecutive order_seqs; returns the first.
fn reserve_seq(tx: &Connection, n: usize) -> Result<i64, StoreError> {
    let last: i64 = tx
        .prepare_cached(
            "UPDATE journal_meta SET value = value + ?1 WHERE name = 'order_seq' RETURNING value",
        )?
        .query_row([n as i64], |r| r.get(0))?;
    Ok(last - n as i64 + 1)
}

/// Hands out order_seqs: fresh ones from a reserved range, or, for rows of
/// a replayed entry's key, the entry's place.
enum Seq {
    Range {
        next: i64,
        end: i64,
    },
    Keyed {
        key: String,
        place: i64,
        next: i64,
        end: i64,
    },
}

impl Seq {
    /// The order_seq of a row (or DLQ entry) of `key`.
    fn take(&mut self, tx: &Connection, key: Option<&str>) -> Result<i64, StoreError> {
        let (next, end) = match self {
            Seq::Keyed { key: k, place, .. } if key == Some(k.as_str()) => return Ok(*place),
            Seq::Keyed { next, end, .. } | Seq::Range { next, end } => (next, end),
        };
        if *next >= *end {
            *next = reserve_seq(tx, 64)?;
            *end = *next + 64;
        }
        let o = *next;
        *next += 1;
        Ok(o)
    }

    /// Whether a row of `key` takes a replayed entry's place.
    fn replacing(&self, key: Option<&str>) -> bool {
        matches!(self, Seq::Keyed { key: k, .. } if key == Some(k.as_str()))
    }
}

fn outcome_flow(o: &FlowOutcome) -> &str {
    match o {
        FlowOutcome::Routed { flow, .. }
        | FlowOutcome::Filtered { flow }
        | FlowOutcome::Canonical { flow, .. }
        | FlowOutcome::Rejected { flow, .. } => flow,
    }
}

/// What an outbox row is made of, wherever it comes from: its event's
/// fields and its own.
struct NewRow<'a> {
    ev: &'a EventCtx<'a>,
    flow: &'a str,
    destination: &'a str,
    entity_key: Option<&'a str>,
    idempotency_key: &'a str,
    payload: &'a str,
}

/// Event-level fields an outcome needs.
struct EventCtx<'a> {
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

impl<'a> EventCtx<'a> {
    /// An event known only by its ids (a replayed entry, a follow-up):
    /// no source version, group or trace context.
    fn bare(
        source: &'a str,
        event_id: &'a str,
        correlation_id: &'a str,
        created_at: i64,
        attributes: Option<&'a str>,
        payload: &'a str,
    ) -> Self {
        EventCtx {
            source,
            event_id,
            correlation_id,
            created_at,
            event_time: created_at,
            source_version: None,
            group_id: None,
            traceparent: None,
            tracestate: None,
            attributes,
            payload,
        }
    }
}

/// Is (destination, key) held for a row at `order_seq`: a dead letter of
/// that key, earlier in its order, holds it.
fn held(tx: &Connection, dest: &str, key: &str, order_seq: i64) -> Result<bool, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM holds h JOIN dlq q ON q.id = h.dlq_id
               WHERE h.destination = ?1 AND h.entity_key = ?2 AND (q.order_seq IS NULL OR q.order_seq < ?3))",
        )?
        .query_row(params![dest, key, order_seq], |r| r.get(0))?)
}

/// The state a row should have given its key queue.
fn state_for(
    tx: &Connection,
    dest: &str,
    key: Option<&str>,
    order_seq: i64,
    next_at: i64,
    now: i64,
) -> Result<i64, StoreError> {
    let due = if next_at > now { WAITING } else { READY };
    let Some(key) = key else { return Ok(due) };
    let earlier: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE destination = ?1 AND entity_key = ?2 AND order_seq < ?3)",
        )?
        .query_row(params![dest, key, order_seq], |r| r.get(0))?;
    if earlier {
        return Ok(QUEUED);
    }
    if held(tx, dest, key, order_seq)? {
        return Ok(HELD);
    }
    Ok(due)
}

/// Give the head of (dest, key) the state it should have, when it is not
/// leased (a row that became head, or whose hold was lifted).
fn refresh_head(tx: &Connection, dest: &str, key: &str, now: i64) -> Result<(), StoreError> {
    let head: Option<(i64, i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT id, order_seq, next_at, state FROM outbox WHERE destination = ?1 AND entity_key = ?2
             ORDER BY order_seq LIMIT 1",
        )?
        .query_row(params![dest, key], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    if let Some((id, order_seq, next_at, state)) = head
        && state != LEASED
    {
        let want = state_for(tx, dest, Some(key), order_seq, next_at, now)?;
        if want != state {
            tx.prepare_cached("UPDATE outbox SET state = ?2 WHERE id = ?1")?
                .execute(params![id, want])?;
        }
    }
    Ok(())
}

/// Insert an outbox row in its key queue. `replacing`: the row may sort
/// before rows already queued (a replay keeping its place), which then stop
/// being heads.
fn insert_row(
    tx: &Connection,
    r: &NewRow<'_>,
    order_seq: i64,
    replacing: bool,
    now: i64,
) -> Result<(), StoreError> {
    let state = state_for(tx, r.destination, r.entity_key, order_seq, 0, now)?;
    if replacing && state != QUEUED && r.entity_key.is_some() {
        tx.prepare_cached(
            "UPDATE outbox SET state = 0 WHERE destination = ?1 AND entity_key = ?2 AND order_seq > ?3
             AND state IN (1, 3, 4)",
        )?
        .execute(params![r.destination, r.entity_key, order_seq])?;
    }
    tx.prepare_cached(
        "INSERT INTO outbox (flow, destination, entity_key, idempotency_key, source, event_id,
           correlation_id, created_at, event_time, order_seq, state, source_version, group_id,
           traceparent, tracestate, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
    )?
    .execute(params![
        r.flow,
        r.destination,
        r.entity_key,
        r.idempotency_key,
        r.ev.source,
        r.ev.event_id,
        r.ev.correlation_id,
        r.ev.created_at,
        r.ev.event_time,
        order_seq,
        state,
        r.ev.source_version,
        r.ev.group_id,
        r.ev.traceparent,
        r.ev.tracestate,
        r.payload
    ])?;
    Ok(())
}

fn ingest(
    tx: &Connection,
    b: &IngestBatch,
    d: &mut Deltas,
    now: i64,
) -> Result<Applied, StoreError> {
    let mut dedupe = tx.prepare_cached(
        "INSERT INTO dedupe (source, id_hash, accepted_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (source, id_hash) DO NOTHING",
    )?;
    let mut applied = Applied::default();
    let mut seq = Seq::Range { next: 0, end: 0 };
    for e in &b.events {
        if b.dedupe == Dedupe::Id {
            let n = dedupe.execute(params![b.source, id_hash(&e.event_id), e.received_at])?;
            if n == 0 {
                applied.duplicates += 1;
                continue;
            }
        }
        applied.changed += 1;
        let ctx = EventCtx {
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
        for o in &e.outcomes {
            if matches!(
                o,
                FlowOutcome::Routed { .. }
                    | FlowOutcome::Rejected { .. }
                    | FlowOutcome::Canonical { .. }
            ) && let Seq::Range { next, end } = &mut seq
                && *next >= *end
            {
                // one reservation for the rest of the batch
                let want = (b.events.len() * e.outcomes.len()).max(1) * 2;
                *next = reserve_seq(tx, want)?;
                *end = *next + want as i64;
            }
            apply_outcome(tx, &ctx, o, d, &mut seq, now, &mut applied)?;
        }
    }
    for c in &applied.flows {
        if c.received > 0 {
            bump(d, &c.flow, "", |c| c.seen = true);
        }
    }
    if let Some((key, value)) = &b.checkpoint {
        tx.prepare_cached(
            "INSERT INTO checkpoints (source, key, value, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (source, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )?
        .execute(params![b.source, key, value, now])?;
    }
    Ok(applied)
}

/// A delivery written before its ingest must be keyless: a keyed row's
/// place in its key queue is the outbox's to keep.
pub(crate) fn check_delivered(dl: &crate::NewDelivery) -> Result<(), StoreError> {
    if dl.entity_key.is_some() {
        return Err(StoreError::Invalid(format!(
            "a delivery to `{}` with an entity key cannot be ingested as already delivered",
            dl.destination
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn apply_outcome(
    tx: &Connection,
    e: &EventCtx<'_>,
    o: &FlowOutcome,
    d: &mut Deltas,
    seq: &mut Seq,
    now: i64,
    applied: &mut Applied,
) -> Result<(), StoreError> {
    match o {
        FlowOutcome::Routed { flow, deliveries } => {
            bump(d, flow, "", |c| c.received += 1);
            applied.count(flow, |c| c.received += 1);
            let fresh = seq.take(tx, None)?;
            for dl in deliveries {
                // the lane's counts row exists from its first row on
                bump(d, flow, &dl.destination, |_| {});
                if dl.delivered {
                    check_delivered(dl)?;
                    bump(d, flow, &dl.destination, |c| c.delivered += 1);
                    continue;
                }
                let key = dl.entity_key.as_deref();
                let (order_seq, replacing) = if seq.replacing(key) {
                    (seq.take(tx, key)?, true)
                } else {
                    (fresh, false)
                };
                let row = NewRow {
                    ev: e,
                    flow,
                    destination: &dl.destination,
                    entity_key: dl.entity_key.as_deref(),
                    idempotency_key: &dl.idempotency_key,
                    payload: &dl.payload,
                };
                insert_row(tx, &row, order_seq, replacing, now)?;
            }
        }
        FlowOutcome::Canonical { flow, report } => {
            // the event ends in the canonical record (counted as filtered at
            // the flow); the rows it causes enter their lanes as follow-ups do
            bump(d, flow, "", |c| {
                c.received += 1;
                c.filtered += 1;
            });
            applied.count(flow, |c| {
                c.received += 1;
                c.filtered += 1;
            });
            let ev = crate::canonical::Ev {
                system: e.source,
                event_id: e.event_id,
                correlation_id: e.correlation_id,
                event_time: e.event_time,
            };
            for (route_flow, dl) in crate::canonical::sql::ready(crate::canonical::apply(
                &mut crate::canonical::sql::Lite(tx),
                report,
                &ev,
                now,
            ))? {
                bump(d, &route_flow, &dl.destination, |c| c.received += 1);
                let order_seq = seq.take(tx, None)?;
                let row = NewRow {
                    ev: e,
                    flow: &route_flow,
                    destination: &dl.destination,
                    entity_key: dl.entity_key.as_deref(),
                    idempotency_key: &dl.idempotency_key,
                    payload: &dl.payload,
                };
                insert_row(tx, &row, order_seq, false, now)?;
            }
        }
        FlowOutcome::Filtered { flow } => {
            bump(d, flow, "", |c| {
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
            bump(d, flow, "", |c| {
                c.received += 1;
                c.rejected += 1;
            });
            applied.count(flow, |c| {
                c.received += 1;
                c.rejected += 1;
            });
            if *stage == crate::Stage::Deliver {
                return Err(StoreError::Invalid(
                    "a delivery failure cannot be ingested as a rejection".into(),
                ));
            }
            let order_seq = seq.take(tx, entity_key.as_deref())?;
            let history = serde_json::json!([{"at": now, "action": "rejected", "stage": stage.as_str(), "error": error}]);
            tx.prepare_cached(
                "INSERT INTO dlq (stage, flow, destination, entity_key, source, event_id, correlation_id,
                   created_at, failed_at, attempts, error, payload, history, order_seq, attributes)
                 VALUES (?1, ?2, '', ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                stage.as_str(),
                flow,
                entity_key,
                e.source,
                e.event_id,
                e.correlation_id,
                e.created_at,
                now,
                error,
                e.payload,
                history.to_string(),
                order_seq,
                e.attributes
            ])?;
            if let Some(k) = entity_key {
                let dlq_id = tx.last_insert_rowid();
                for dest in hold {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO holds (destination, entity_key, dlq_id) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![dest, k, dlq_id])?;
                    refresh_head(tx, dest, k, now)?;
                }
            }
        }
    }
    Ok(())
}

pub(crate) const ROW_COLUMNS: &str = "id, flow, destination, entity_key, idempotency_key, source, event_id, correlation_id,
    created_at, attempts, next_at, last_error, payload, order_seq, event_time, source_version, group_id,
    traceparent, tracestate";

pub(crate) fn outbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxRow> {
    Ok(OutboxRow {
        id: r.get(0)?,
        flow: r.get(1)?,
        destination: r.get(2)?,
        entity_key: r.get(3)?,
        idempotency_key: r.get(4)?,
        source: r.get(5)?,
        event_id: r.get(6)?,
        correlation_id: r.get(7)?,
        created_at: r.get(8)?,
        attempts: r.get(9)?,
        next_at: r.get(10)?,
        last_error: r.get(11)?,
        payload: r.get(12)?,
        order_seq: r.get(13)?,
        event_time: r.get(14)?,
        source_version: r.get(15)?,
        group_id: r.get(16)?,
        traceparent: r.get(17)?,
        tracestate: r.get(18)?,
    })
}

// The timer queries of every claim spell out `state IN (2, 3)`: SQLite uses
// the partial index `outbox_timer` only when a query repeats its condition
// (`state = 2` alone does not imply it for the planner), and without it each
// claim scanned the whole outbox, so claims slowed down as the backlog grew.
const LEASES_ENDED: &str = "SELECT id, destination, entity_key, order_seq FROM outbox
    WHERE state IN (2, 3) AND state = 2 AND next_at <= ?1";
const BACKOFF_OVER: &str =
    "UPDATE outbox SET state = 1 WHERE state IN (2, 3) AND state = 3 AND next_at <= ?1";

/// Leases that passed their deadline (a lane that died without settling),
/// or every lease (`now = i64::MAX`: a restart), end: their rows go back to
/// the state their queue gives them.
pub(crate) fn expire_leases(tx: &Connection, now: i64) -> Result<usize, StoreError> {
    let rows: Vec<(i64, String, Option<String>, i64)> = {
        let mut st = tx.prepare_cached(LEASES_ENDED)?;
        st.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?
    };
    // first all back to queued, so that heads are computed over settled states
    for (id, ..) in &rows {
        tx.prepare_cached("UPDATE outbox SET state = 0, token = 0, next_at = 0 WHERE id = ?1")?
            .execute([id])?;
    }
    let now = now.min(crate::now_ms());
    for (id, dest, key, order_seq) in &rows {
        let st = state_for(tx, dest, key.as_deref(), *order_seq, 0, now)?;
        tx.prepare_cached("UPDATE outbox SET state = ?2 WHERE id = ?1")?
            .execute(params![id, st])?;
    }
    Ok(rows.len())
}

fn claim(
    tx: &Connection,
    req: &ClaimRequest,
    token: i64,
    now: i64,
) -> Result<Vec<Claimed>, StoreError> {
    // heads whose backoff is over are ready again
    tx.prepare_cached(BACKOFF_OVER)?.execute([now])?;
    expire_leases(tx, now)?;
    let deadline = now.saturating_add(req.lease.as_millis().min(i64::MAX as u128) as i64);
    let mut rows: Vec<OutboxRow> = {
        let sql = format!(
            "UPDATE outbox SET state = 2, token = ?4 + id, next_at = ?5 WHERE id IN
               (SELECT id FROM outbox WHERE flow = ?1 AND destination = ?2 AND state = 1
                ORDER BY order_seq LIMIT ?3)
             RETURNING {ROW_COLUMNS}"
        );
        let mut st = tx.prepare_cached(&sql)?;
        st.query_map(
            params![
                req.lane.flow,
                req.lane.destination,
                req.max as i64,
                token,
                deadline
            ],
            outbox_row,
        )?
        .collect::<Result<_, _>>()?
    };
    rows.sort_by_key(|r| (r.order_seq, r.id));
    if req.per_key > 1 {
        rows = with_followers(tx, req, rows, token, deadline)?;
    }
    // a row's token is the claim's base plus its id: unique per row of a
    // claim, and never a token the same row had before
    Ok(rows
        .into_iter()
        .map(|row| Claimed {
            token: token + row.id,
            row,
        })
        .collect())
}

/// For each keyed head, the rows right behind it in its key queue that
/// belong to the same lane, up to `per_key` of the key in all.
fn with_followers(
    tx: &Connection,
    req: &ClaimRequest,
    heads: Vec<OutboxRow>,
    token: i64,
    deadline: i64,
) -> Result<Vec<OutboxRow>, StoreError> {
    let mut total = heads.len();
    let mut out = Vec::with_capacity(heads.len());
    let sql = format!(
        "SELECT {ROW_COLUMNS}, state FROM outbox WHERE destination = ?1 AND entity_key = ?2 AND order_seq > ?3
         ORDER BY order_seq LIMIT ?4"
    );
    for head in heads {
        let key = head.entity_key.clone();
        let order_seq = head.order_seq;
        out.push(head);
        let Some(key) = key else { continue };
        if total >= req.max {
            continue;
        }
        let behind: Vec<(OutboxRow, i64)> = {
            let mut st = tx.prepare_cached(&sql)?;
            st.query_map(
                params![
                    req.lane.destination,
                    key,
                    order_seq,
                    (req.per_key - 1) as i64
                ],
                |r| Ok((outbox_row(r)?, r.get::<_, i64>(19)?)),
            )?
            .collect::<Result<_, _>>()?
        };
        for (row, state) in behind {
            if row.flow != req.lane.flow || state != QUEUED || total >= req.max {
                break;
            }
            tx.prepare_cached(
                "UPDATE outbox SET state = 2, token = ?2 + id, next_at = ?3 WHERE id = ?1",
            )?
            .execute(params![row.id, token, deadline])?;
            total += 1;
            out.push(row);
        }
    }
    Ok(out)
}

fn settle(tx: &Connection, s: &Settle, d: &mut Deltas, now: i64) -> Result<Settled, StoreError> {
    let mut done = Settled::default();
    for item in &s.items {
        type Leased = (
            String,
            String,
            Option<String>,
            i64,
            String,
            String,
            i64,
            String,
        );
        let row: Option<Leased> = tx
            .prepare_cached(
                "SELECT flow, destination, entity_key, order_seq, source, event_id, attempts,
                        correlation_id FROM outbox
                 WHERE id = ?1 AND token = ?2 AND state = 2",
            )?
            .query_row(params![item.id, item.token], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .optional()?;
        let Some((flow, dest, key, order_seq, source, event_id, attempts, correlation_id)) = row
        else {
            done.stale += 1;
            continue;
        };
        if let Some(a) = &item.attempt
            && let Some((outcome, error)) = item.outcome.trail()
        {
            tx.prepare_cached(
                "INSERT INTO attempts (flow, destination, event_id, correlation_id, entity_key,
                       attempt, at, latency_ms, status, outcome, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                flow,
                dest,
                event_id,
                correlation_id,
                key,
                attempts + 1,
                a.at,
                a.latency_ms,
                a.status,
                outcome,
                error
            ])?;
        }
        match &item.outcome {
            Outcome::Delivered(w) => {
                tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                    .execute([item.id])?;
                bump(d, &flow, &dest, |c| c.delivered += 1);
                if let Some(k) = &key {
                    refresh_head(tx, &dest, k, now)?;
                    supersede(tx, k, order_seq, &flow, &dest, &event_id)?;
                }
                if let Some(cw) = &w.canonical {
                    let ev = crate::canonical::Ev {
                        system: &dest,
                        event_id: &event_id,
                        correlation_id: "",
                        event_time: now,
                    };
                    crate::canonical::sql::ready(crate::canonical::written(
                        &mut crate::canonical::sql::Lite(tx),
                        &dest,
                        w.external_id.as_deref(),
                        cw,
                        &ev,
                        now,
                    ))?;
                } else if !w.is_empty() {
                    record_outcome(tx, &dest, &source, key.as_deref(), &flow, &event_id, w, now)?;
                }
                done.delivered += 1;
            }
            Outcome::Retry { next_at, error } => {
                // back to queued first, so its own lease does not count
                tx.prepare_cached("UPDATE outbox SET state = 0 WHERE id = ?1")?
                    .execute([item.id])?;
                let st = state_for(tx, &dest, key.as_deref(), order_seq, *next_at, now)?;
                tx.prepare_cached(
                    "UPDATE outbox SET attempts = ?2, next_at = ?3, last_error = ?4, state = ?5, token = 0
                     WHERE id = ?1",
                )?
                .execute(params![item.id, attempts + 1, next_at, error, st])?;
                done.retried += 1;
            }
            Outcome::Dead { error, hold_key } => {
                let history = serde_json::json!([{"at": now, "action": "dead_lettered", "attempts": attempts + 1, "error": error}]);
                tx.prepare_cached(
                    "INSERT INTO dlq (stage, flow, destination, entity_key, idempotency_key, source, event_id,
                       correlation_id, created_at, failed_at, attempts, error, payload, history, order_seq)
                     SELECT 'deliver', flow, destination, entity_key, idempotency_key, source, event_id,
                       correlation_id, created_at, ?2, ?3, ?4, payload, ?5, order_seq
                     FROM outbox WHERE id = ?1",
                )?
                .execute(params![item.id, now, attempts + 1, error, history.to_string()])?;
                let dlq_id = tx.last_insert_rowid();
                tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                    .execute([item.id])?;
                bump(d, &flow, &dest, |c| c.dead_lettered += 1);
                if let Some(k) = &key {
                    if *hold_key {
                        tx.prepare_cached(
                            "INSERT OR IGNORE INTO holds (destination, entity_key, dlq_id) VALUES (?1, ?2, ?3)",
                        )?
                        .execute(params![dest, k, dlq_id])?;
                    }
                    refresh_head(tx, &dest, k, now)?;
                }
                done.dead += 1;
            }
            Outcome::Wait { next_at, reason } => {
                tx.prepare_cached("UPDATE outbox SET state = 0 WHERE id = ?1")?
                    .execute([item.id])?;
                let st = state_for(tx, &dest, key.as_deref(), order_seq, *next_at, now)?;
                tx.prepare_cached(
                    "UPDATE outbox SET next_at = ?2, last_error = ?3, state = ?4, token = 0 WHERE id = ?1",
                )?
                .execute(params![item.id, next_at, reason, st])?;
                done.released += 1;
            }
            Outcome::Release => {
                tx.prepare_cached(
                    "UPDATE outbox SET state = 0, token = 0, next_at = 0 WHERE id = ?1",
                )?
                .execute([item.id])?;
                let st = state_for(tx, &dest, key.as_deref(), order_seq, 0, now)?;
                tx.prepare_cached("UPDATE outbox SET state = ?2 WHERE id = ?1")?
                    .execute(params![item.id, st])?;
                done.released += 1;
            }
        }
    }
    if !s.follow_ups.is_empty() {
        let mut seq = Seq::Range { next: 0, end: 0 };
        for f in &s.follow_ups {
            follow_up(tx, f, &mut seq, now)?;
            bump(d, &f.flow, &f.delivery.destination, |c| c.received += 1);
            done.follow_ups += 1;
        }
    }
    Ok(done)
}

fn follow_up(tx: &Connection, f: &FollowUp, seq: &mut Seq, now: i64) -> Result<(), StoreError> {
    let order_seq = seq.take(tx, None)?;
    let ev = EventCtx::bare(
        &f.source,
        &f.event_id,
        &f.correlation_id,
        now,
        None,
        &f.delivery.payload,
    );
    let row = NewRow {
        ev: &ev,
        flow: &f.flow,
        destination: &f.delivery.destination,
        entity_key: f.delivery.entity_key.as_deref(),
        idempotency_key: &f.delivery.idempotency_key,
        payload: &f.delivery.payload,
    };
    insert_row(tx, &row, order_seq, false, now)
}

/// A delivered write of (dest, key) at `order_seq`: older dead entries of
/// that key there (and older parse/map-stage entries of the key, whatever
/// their flow: which destinations their replay writes is known only then)
/// would regress it if replayed. Remember it for them.
fn supersede(
    tx: &Connection,
    key: &str,
    order_seq: i64,
    flow: &str,
    dest: &str,
    event_id: &str,
) -> Result<(), StoreError> {
    let ids: Vec<i64> = {
        let mut st = tx.prepare_cached(
            "SELECT id FROM dlq WHERE entity_key = ?1 AND status = 'dead' AND order_seq < ?2
             AND (destination = ?3 OR destination = '')",
        )?;
        st.query_map(params![key, order_seq, dest], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    for id in ids {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO superseded (dlq_id, flow, destination, event_id) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![id, flow, dest, event_id])?;
        tx.prepare_cached("UPDATE dlq SET superseded_by = ?2 WHERE id = ?1")?
            .execute(params![id, event_id])?;
    }
    Ok(())
}

/// The delivered later write that makes replaying entry `e` regress a
/// destination: for a deliver-stage entry any (they are all of its
/// destination); for a parse/map-stage one, one of its own flow or one at a
/// destination the new outcome writes with the entry's key.
fn superseder(
    tx: &Connection,
    id: i64,
    e: &Dead,
    outcome: Option<&FlowOutcome>,
) -> Result<Option<String>, StoreError> {
    let rows: Vec<(String, String, String)> = {
        let mut st = tx.prepare_cached(
            "SELECT flow, destination, event_id FROM superseded WHERE dlq_id = ?1",
        )?;
        st.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?
    };
    if e.stage == "deliver" {
        return Ok(rows.into_iter().next().map(|r| r.2));
    }
    let writes: Vec<&str> = match outcome {
        Some(FlowOutcome::Routed { deliveries, .. }) => deliveries
            .iter()
            .filter(|d| d.entity_key.is_some() && d.entity_key == e.entity_key)
            .map(|d| d.destination.as_str())
            .collect(),
        _ => Vec::new(),
    };
    Ok(rows
        .into_iter()
        .find(|(f, d, _)| f == &e.flow || writes.contains(&d.as_str()))
        .map(|r| r.2))
}

/// The write outcome of a delivered row, in the crosswalk: keyed by
/// destination system, source system and entity key (else the event id).
#[allow(clippy::too_many_arguments)]
fn record_outcome(
    tx: &Connection,
    system: &str,
    source: &str,
    key: Option<&str>,
    flow: &str,
    event_id: &str,
    w: &WriteOutcome,
    now: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO crosswalk (system, source, source_key, external_id, flow, event_id, created_at, updated_at,
           version, fingerprint)
         VALUES (?1, ?2, ?3, COALESCE(?4, ''), ?5, ?6, ?7, ?7, ?8, ?9)
         ON CONFLICT (system, source, source_key) DO UPDATE SET
           external_id = COALESCE(?4, external_id), flow = excluded.flow, event_id = excluded.event_id,
           updated_at = excluded.updated_at, version = COALESCE(?8, version),
           fingerprint = COALESCE(?9, fingerprint)",
    )?
    .execute(params![
        system,
        source,
        key.unwrap_or(event_id),
        w.external_id,
        flow,
        event_id,
        now,
        w.version,
        w.fingerprint
    ])?;
    Ok(())
}

struct Dead {
    stage: String,
    flow: String,
    destination: String,
    entity_key: Option<String>,
    source: String,
    event_id: String,
    correlation_id: String,
    idempotency_key: Option<String>,
    created_at: i64,
    payload: String,
    attributes: Option<String>,
    order_seq: Option<i64>,
}

fn dead_entry(tx: &Connection, id: i64) -> Result<Dead, StoreError> {
    let row = tx
        .prepare_cached(
            "SELECT stage, flow, destination, entity_key, source, event_id, correlation_id, idempotency_key,
                    created_at, payload, attributes, order_seq, status
             FROM dlq WHERE id = ?1",
        )?
        .query_row([id], |r| {
            Ok((
                Dead {
                    stage: r.get(0)?,
                    flow: r.get(1)?,
                    destination: r.get(2)?,
                    entity_key: r.get(3)?,
                    source: r.get(4)?,
                    event_id: r.get(5)?,
                    correlation_id: r.get(6)?,
                    idempotency_key: r.get(7)?,
                    created_at: r.get(8)?,
                    payload: r.get(9)?,
                    attributes: r.get(10)?,
                    order_seq: r.get(11)?,
                },
                r.get::<_, String>(12)?,
            ))
        })
        .optional()?;
    match row {
        None => Err(StoreError::NotFound(format!("no DLQ entry {id}"))),
        Some((_, status)) if status != "dead" => Err(StoreError::Invalid(format!(
            "DLQ entry {id} is already {status}"
        ))),
        Some((d, _)) => Ok(d),
    }
}

/// Resolve entry `id` (status `replayed` or `discarded`): a history line,
/// `resolved_at`, and its payload replaced by its hash (ARCHITECTURE.md,
/// "Retention").
fn mark(
    tx: &Connection,
    id: i64,
    status: &str,
    note: &str,
    payload: &str,
    now: i64,
) -> Result<(), StoreError> {
    let entry = serde_json::json!({"at": now, "action": status, "note": note}).to_string();
    tx.prepare_cached(
        "UPDATE dlq SET status = ?2, history = json_insert(history, '$[#]', json(?3)),
           resolved_at = ?4, payload = '', payload_sha256 = ?5 WHERE id = ?1",
    )?
    .execute(params![
        id,
        status,
        entry,
        now,
        crate::payload_sha256(payload)
    ])?;
    Ok(())
}

/// One slice of a prune, in the caller's transaction: the oldest `limit`
/// dedupe ids, resolved DLQ entries (with what superseded them) and drift
/// events past their cutoffs.
fn prune(tx: &Connection, c: &crate::Prune, limit: i64) -> Result<crate::Pruned, StoreError> {
    let dedupe = tx
        .prepare_cached(
            "DELETE FROM dedupe WHERE seq IN (SELECT seq FROM dedupe ORDER BY seq LIMIT ?2) AND accepted_at < ?1",
        )?
        .execute(params![c.dedupe_before, limit])?;
    // the same slice twice (the order is total): its superseded rows, then it
    const RESOLVED: &str = "SELECT id FROM dlq WHERE status <> 'dead' AND resolved_at < ?1
        ORDER BY resolved_at, id LIMIT ?2";
    tx.prepare_cached(&format!(
        "DELETE FROM superseded WHERE dlq_id IN ({RESOLVED})"
    ))?
    .execute(params![c.dlq_before, limit])?;
    let dlq = tx
        .prepare_cached(&format!("DELETE FROM dlq WHERE id IN ({RESOLVED})"))?
        .execute(params![c.dlq_before, limit])?;
    let drift = tx
        .prepare_cached(
            "DELETE FROM drift_events WHERE id IN
               (SELECT id FROM drift_events WHERE last_seen < ?1 ORDER BY last_seen LIMIT ?2)",
        )?
        .execute(params![c.drift_before, limit])?;
    let attempts = tx
        .prepare_cached(
            // the oldest slice by id, those of it past the cutoff: ids
            // follow `at` (an entry written late with an early `at` goes
            // with a later slice)
            "DELETE FROM attempts WHERE id IN (SELECT id FROM attempts ORDER BY id LIMIT ?2)
               AND at < ?1",
        )?
        .execute(params![c.attempts_before, limit])?;
    Ok(crate::Pruned {
        dedupe,
        dlq,
        drift,
        attempts,
    })
}

/// Lift the holds of a DLQ entry; the heads they held get their state back.
fn release_holds(tx: &Connection, dlq_id: i64, now: i64) -> Result<(), StoreError> {
    let held: Vec<(String, String)> = {
        let mut st =
            tx.prepare_cached("SELECT destination, entity_key FROM holds WHERE dlq_id = ?1")?;
        st.query_map([dlq_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    tx.prepare_cached("DELETE FROM holds WHERE dlq_id = ?1")?
        .execute([dlq_id])?;
    for (dest, key) in held {
        refresh_head(tx, &dest, &key, now)?;
    }
    Ok(())
}

/// Is a later row of (dest, key) than `order_seq` out for writing now?
fn later_in_flight(
    tx: &Connection,
    dest: &str,
    key: &str,
    order_seq: i64,
) -> Result<bool, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE destination = ?1 AND entity_key = ?2 AND state = 2
               AND order_seq > ?3)",
        )?
        .query_row(params![dest, key, order_seq], |r| r.get(0))?)
}

fn replay(tx: &Connection, r: &Replay, d: &mut Deltas, now: i64) -> Result<Applied, StoreError> {
    let e = dead_entry(tx, r.dlq_id)?;
    let place = e.order_seq.unwrap_or(0);
    if let Some(FlowOutcome::Rejected {
        stage: crate::Stage::Deliver,
        ..
    }) = &r.outcome
    {
        return Err(StoreError::Invalid(
            "a replay's new outcome cannot be a delivery failure".into(),
        ));
    }
    if let Some(o) = &r.outcome
        && outcome_flow(o) != e.flow
    {
        return Err(StoreError::Invalid(format!(
            "DLQ entry {} belongs to flow `{}`; the new outcome is of flow `{}`",
            r.dlq_id,
            e.flow,
            outcome_flow(o)
        )));
    }
    if !r.force
        && let Some(by) = superseder(tx, r.dlq_id, &e, r.outcome.as_ref())?
    {
        return Err(StoreError::Refused(Refusal::Superseded { by_event: by }));
    }
    let mut applied = Applied {
        changed: 1,
        ..Default::default()
    };
    if e.stage == "deliver" {
        if r.outcome.is_some() {
            return Err(StoreError::Invalid(format!(
                "DLQ entry {} failed at delivery; replay it as it is",
                r.dlq_id
            )));
        }
        let payload = r.payload.clone().unwrap_or_else(|| e.payload.clone());
        if serde_json::from_str::<serde_json::Value>(&payload).is_err() {
            return Err(StoreError::Invalid(
                "the replacement payload is not valid JSON".into(),
            ));
        }
        if !r.force
            && let Some(k) = &e.entity_key
            && later_in_flight(tx, &e.destination, k, place)?
        {
            return Err(StoreError::Refused(Refusal::InFlight));
        }
        release_holds(tx, r.dlq_id, now)?;
        let order_seq = if r.force { reserve_seq(tx, 1)? } else { place };
        let ikey = e.idempotency_key.clone().unwrap_or_default();
        let ev = EventCtx::bare(
            &e.source,
            &e.event_id,
            &e.correlation_id,
            e.created_at,
            None,
            &payload,
        );
        let row = NewRow {
            ev: &ev,
            flow: &e.flow,
            destination: &e.destination,
            entity_key: e.entity_key.as_deref(),
            idempotency_key: &ikey,
            payload: &payload,
        };
        insert_row(tx, &row, order_seq, !r.force, now)?;
        if let Some(k) = &e.entity_key {
            refresh_head(tx, &e.destination, k, now)?;
        }
        bump(d, &e.flow, &e.destination, |c| c.dead_lettered -= 1);
    } else {
        let Some(outcome) = &r.outcome else {
            return Err(StoreError::Invalid(format!(
                "DLQ entry {} failed at the {} stage; it is replayed through its flow's mapping",
                r.dlq_id, e.stage
            )));
        };
        if !r.force
            && let FlowOutcome::Routed { deliveries, .. } = outcome
        {
            for dl in deliveries {
                if let Some(k) = &dl.entity_key
                    && later_in_flight(tx, &dl.destination, k, place)?
                {
                    return Err(StoreError::Refused(Refusal::InFlight));
                }
            }
        }
        release_holds(tx, r.dlq_id, now)?;
        // the entry leaves the flow's rejected count and re-enters as the new outcome
        bump(d, &e.flow, "", |c| {
            c.rejected -= 1;
            c.received -= 1;
        });
        // rows of the entry's key take its place; others go to the end
        let mut seq = match &e.entity_key {
            Some(k) if !r.force && e.order_seq.is_some() => Seq::Keyed {
                key: k.clone(),
                place,
                next: 0,
                end: 0,
            },
            _ => Seq::Range { next: 0, end: 0 },
        };
        let ctx = EventCtx::bare(
            &e.source,
            &e.event_id,
            &e.correlation_id,
            e.created_at,
            e.attributes.as_deref(),
            r.payload.as_deref().unwrap_or(&e.payload),
        );
        let mut ignore = Applied::default();
        apply_outcome(tx, &ctx, outcome, d, &mut seq, now, &mut ignore)?;
        if let FlowOutcome::Routed { deliveries, .. } = outcome {
            for dl in deliveries {
                if let Some(k) = &dl.entity_key {
                    refresh_head(tx, &dl.destination, k, now)?;
                }
            }
        }
        applied.flows = ignore.flows;
    }
    mark(tx, r.dlq_id, "replayed", &r.note, &e.payload, now)?;
    Ok(applied)
}

fn discard(
    tx: &Connection,
    id: i64,
    note: &str,
    d: &mut Deltas,
    now: i64,
) -> Result<Applied, StoreError> {
    let e = dead_entry(tx, id)?;
    mark(tx, id, "discarded", note, &e.payload, now)?;
    release_holds(tx, id, now)?;
    if e.stage == "deliver" {
        bump(d, &e.flow, &e.destination, |c| {
            c.dead_lettered -= 1;
            c.discarded += 1;
        });
    } else {
        bump(d, &e.flow, "", |c| {
            c.rejected -= 1;
            c.discarded += 1;
        });
    }
    Ok(Applied {
        changed: 1,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synchronous(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    fn job(op: Op) -> Job {
        Job {
            op,
            reply: oneshot::channel().0,
        }
    }

    /// With `synchronous: full`, a commit that acknowledges something is
    /// fsynced (FULL, 2) and a claim or a plain settle is not (NORMAL, 1);
    /// with `normal`, nothing switches to FULL.
    #[test]
    fn only_commits_that_acknowledge_are_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("w.db")).unwrap();
        crate::configure(&conn, crate::Synchronous::Full).unwrap();
        crate::schema::migrate_to(&mut conn, crate::schema::latest_version()).unwrap();
        let mut w = Writer {
            conn,
            next_token: 1,
            full: true,
            syncing: true,
        };
        let claim = || {
            job(Op::Claim(ClaimRequest {
                lane: crate::LaneId {
                    flow: "f".into(),
                    destination: "d".into(),
                },
                max: 10,
                per_key: 1,
                lease: Duration::from_secs(30),
            }))
        };
        let ingest = || {
            job(Op::Ingest(IngestBatch {
                source: "s".into(),
                dedupe: crate::Dedupe::Id,
                events: vec![],
                checkpoint: Some(("k".into(), "1".into())),
                fence: None,
            }))
        };
        let settle = |outcome: crate::Outcome| {
            job(Op::Settle(crate::Settle {
                items: vec![crate::Settlement {
                    id: 1,
                    token: 1,
                    attempt: None,
                    outcome,
                }],
                follow_ups: vec![],
            }))
        };
        w.commit_group(&[claim()]).unwrap();
        assert_eq!(synchronous(&w.conn), 1, "a claim alone: NORMAL");
        w.commit_group(&[claim(), ingest()]).unwrap();
        assert_eq!(synchronous(&w.conn), 2, "with an ingest: FULL");
        w.commit_group(&[settle(crate::Outcome::Delivered(Default::default()))])
            .unwrap();
        assert_eq!(synchronous(&w.conn), 1, "a plain settle: NORMAL");
        let with_id = crate::WriteOutcome {
            external_id: Some("X-1".into()),
            ..Default::default()
        };
        w.commit_group(&[settle(crate::Outcome::Delivered(with_id))])
            .unwrap();
        assert_eq!(synchronous(&w.conn), 2, "a settle keeping an id: FULL");
        // `synchronous: normal` never fsyncs a commit
        w.full = false;
        w.commit_group(&[ingest()]).unwrap();
        assert_eq!(synchronous(&w.conn), 1);
    }

    /// Pins the claim slowing down with the backlog: the timer queries of
    /// every claim must search the partial index, never scan the outbox.
    #[test]
    fn claim_timer_queries_do_not_scan_the_outbox() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::schema::migrate_to(&mut conn, crate::schema::latest_version()).unwrap();
        for sql in [LEASES_ENDED, BACKOFF_OVER] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([0i64], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().any(|p| p.contains("outbox_timer"))
                    && !plan.iter().any(|p| p.starts_with("SCAN")),
                "{sql}: {plan:?}"
            );
        }
    }
}
