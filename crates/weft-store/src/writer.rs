//! The writer thread: group commit of every state change.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::oneshot;

use crate::{Applied, FlowOutcome, IngestBatch, Op, StoreError, now_ms};

pub(crate) struct Job {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Applied, StoreError>>,
}

/// Jobs waiting beyond this block their senders: memory stays bounded.
const QUEUE: usize = 256;
/// Most jobs in one commit.
const GROUP: usize = 512;

/// How often the checkpointer copies committed WAL frames into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL pages at which the writer checkpoints by itself: a backstop for a
/// checkpointer that cannot keep up (SQLite's default is 1000).
const WRITER_CHECKPOINT_PAGES: i64 = 16_000;

/// Start the writer thread on `conn`, and a checkpointer thread on a second
/// connection to `path`. Checkpoints (copying WAL pages into the database
/// file) then run beside the writer instead of inside its commits; a page
/// written many times between two checkpoints (outbox rows come and go) is
/// copied once.
pub(crate) fn spawn(conn: Connection, path: &Path) -> Result<mpsc::SyncSender<Job>, StoreError> {
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
    let ckpt = Connection::open(path)?;
    ckpt.busy_timeout(Duration::from_secs(10))?;
    let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
    let (alive, gone) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("weft-store-writer".into())
        .spawn(move || {
            run(conn, rx);
            drop(alive);
        })
        .map_err(|e| StoreError::Invalid(format!("cannot start the writer thread: {e}")))?;
    std::thread::Builder::new()
        .name("weft-store-ckpt".into())
        .spawn(move || checkpointer(ckpt, gone))
        .map_err(|e| StoreError::Invalid(format!("cannot start the checkpoint thread: {e}")))?;
    Ok(tx)
}

/// PASSIVE checkpoints every [`CHECKPOINT_EVERY`] until the writer stops;
/// they never block the writer or readers.
fn checkpointer(conn: Connection, writer_gone: mpsc::Receiver<()>) {
    loop {
        let stop = matches!(
            writer_gone.recv_timeout(CHECKPOINT_EVERY),
            Err(mpsc::RecvTimeoutError::Disconnected)
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
struct Counts {
    received: i64,
    filtered: i64,
    rejected: i64,
    delivered: i64,
    dead_lettered: i64,
    discarded: i64,
}

type Deltas = HashMap<(String, String), Counts>;

fn bump(d: &mut Deltas, flow: &str, dest: &str, f: impl FnOnce(&mut Counts)) {
    f(d.entry((flow.to_owned(), dest.to_owned())).or_default());
}

fn run(mut conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let results = commit_group(&mut conn, &jobs);
        match results {
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
                        .send(Err(StoreError::Invalid(format!("commit failed: {msg}"))));
                }
            }
        }
    }
}

/// Apply `jobs` in one transaction. First all together; if one of them
/// fails, the transaction is rolled back and the group is applied again
/// with a savepoint per job, so that only the failing job is refused.
/// (A savepoint per job on the common path copied every page it touched
/// into the statement journal: about a tenth of the writer's time.)
fn commit_group(
    conn: &mut Connection,
    jobs: &[Job],
) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
    if let Some(results) = commit_all(conn, jobs)? {
        return Ok(results);
    }
    commit_each(conn, jobs)
}

/// `None` when a job failed (nothing was written).
fn commit_all(
    conn: &mut Connection,
    jobs: &[Job],
) -> Result<Option<Vec<Result<Applied, StoreError>>>, StoreError> {
    let tx = conn.transaction()?;
    let mut totals: Deltas = HashMap::new();
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        match apply(&tx, &job.op, &mut totals) {
            Ok(a) => results.push(Ok(a)),
            Err(_) => return Ok(None), // dropping `tx` rolls back
        }
    }
    write_counts(&tx, &totals)?;
    tx.commit()?;
    Ok(Some(results))
}

fn commit_each(
    conn: &mut Connection,
    jobs: &[Job],
) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
    let mut tx = conn.transaction()?;
    let mut totals: Deltas = HashMap::new();
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut deltas: Deltas = HashMap::new();
        let sp = tx.savepoint()?;
        let r = apply(&sp, &job.op, &mut deltas);
        match r {
            Ok(a) => {
                sp.commit()?;
                for (k, v) in deltas {
                    let t = totals.entry(k).or_default();
                    t.received += v.received;
                    t.filtered += v.filtered;
                    t.rejected += v.rejected;
                    t.delivered += v.delivered;
                    t.dead_lettered += v.dead_lettered;
                    t.discarded += v.discarded;
                }
                results.push(Ok(a));
            }
            Err(e) => {
                drop(sp); // rolls back this job only
                results.push(Err(e));
            }
        }
    }
    write_counts(&tx, &totals)?;
    tx.commit()?;
    Ok(results)
}

fn write_counts(tx: &Transaction<'_>, totals: &Deltas) -> Result<(), StoreError> {
    let mut st = tx.prepare_cached(
        "INSERT INTO flow_counts (flow, destination, received, filtered, rejected, delivered, dead_lettered, discarded)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (flow, destination) DO UPDATE SET
           received = received + excluded.received,
           filtered = filtered + excluded.filtered,
           rejected = rejected + excluded.rejected,
           delivered = delivered + excluded.delivered,
           dead_lettered = dead_lettered + excluded.dead_lettered,
           discarded = discarded + excluded.discarded",
    )?;
    for ((flow, dest), c) in totals {
        st.execute(params![
            flow,
            dest,
            c.received,
            c.filtered,
            c.rejected,
            c.delivered,
            c.dead_lettered,
            c.discarded
        ])?;
    }
    Ok(())
}

fn apply(tx: &Connection, op: &Op, d: &mut Deltas) -> Result<Applied, StoreError> {
    match op {
        Op::Ingest(b) => ingest(tx, b, d),
        Op::Drift(b) => crate::drift::apply(tx, b),
        Op::Delivered(ids) => {
            let mut sel =
                tx.prepare_cached("SELECT flow, destination FROM outbox WHERE id = ?1")?;
            let mut del = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            let mut n = 0;
            for id in ids {
                let row: Option<(String, String)> = sel
                    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                // already gone (delivered by an earlier run): nothing to count
                if let Some((flow, dest)) = row {
                    del.execute([id])?;
                    bump(d, &flow, &dest, |c| c.delivered += 1);
                    n += 1;
                }
            }
            Ok(Applied {
                changed: n,
                duplicates: 0,
            })
        }
        Op::Captured(rows) => {
            let mut sel = tx.prepare_cached(
                "SELECT destination, source, COALESCE(entity_key, event_id), flow, event_id FROM outbox WHERE id = ?1",
            )?;
            let mut up = tx.prepare_cached(
                "INSERT INTO crosswalk (system, source, source_key, external_id, flow, event_id, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
                 ON CONFLICT (system, source, source_key) DO UPDATE SET
                   external_id = excluded.external_id, flow = excluded.flow,
                   event_id = excluded.event_id, updated_at = excluded.updated_at",
            )?;
            let now = now_ms();
            let mut n = 0;
            for c in rows {
                type Src = (String, String, String, String, String);
                let row: Option<Src> = sel
                    .query_row([c.outbox_id], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()?;
                // gone already (delivered and recorded by an earlier run)
                if let Some((system, source, key, flow, event_id)) = row {
                    n += up.execute(params![
                        system,
                        source,
                        key,
                        c.external_id,
                        flow,
                        event_id,
                        now
                    ])?;
                }
            }
            Ok(Applied {
                changed: n,
                duplicates: 0,
            })
        }
        Op::Retry {
            id,
            attempts,
            next_at,
            error,
        } => {
            let n = tx
                .prepare_cached(
                    "UPDATE outbox SET attempts = ?2, next_at = ?3, last_error = ?4 WHERE id = ?1",
                )?
                .execute(params![id, attempts, next_at, error])?;
            Ok(Applied {
                changed: n,
                duplicates: 0,
            })
        }
        Op::DeadLetter {
            id,
            attempts,
            error,
        } => {
            let row: Option<(String, String)> = tx
                .prepare_cached("SELECT flow, destination FROM outbox WHERE id = ?1")?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((flow, dest)) = row else {
                return Ok(Applied::default());
            };
            let history = serde_json::json!([{"at": now_ms(), "action": "dead_lettered", "attempts": attempts, "error": error}]);
            tx.prepare_cached(
                "INSERT INTO dlq (stage, flow, destination, entity_key, idempotency_key, source, event_id,
                   correlation_id, created_at, failed_at, attempts, error, payload, history, order_seq)
                 SELECT 'deliver', flow, destination, entity_key, idempotency_key, source, event_id,
                   correlation_id, created_at, ?2, ?3, ?4, payload, ?5, COALESCE(order_seq, id)
                 FROM outbox WHERE id = ?1",
            )?
            .execute(params![id, now_ms(), attempts, error, history.to_string()])?;
            tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                .execute([id])?;
            bump(d, &flow, &dest, |c| c.dead_lettered += 1);
            Ok(Applied {
                changed: 1,
                duplicates: 0,
            })
        }
        Op::Replay {
            dlq_id,
            payload,
            note,
        } => {
            let e = dead_entry(tx, *dlq_id)?;
            if e.stage != "deliver" {
                return Err(StoreError::Invalid(format!(
                    "DLQ entry {dlq_id} failed at the {} stage; it is replayed through its flow's mapping",
                    e.stage
                )));
            }
            let payload = payload.clone().unwrap_or(e.payload);
            if serde_json::from_str::<serde_json::Value>(&payload).is_err() {
                return Err(StoreError::Invalid(
                    "the replacement payload is not valid JSON".into(),
                ));
            }
            tx.prepare_cached(
                "INSERT INTO outbox (flow, destination, entity_key, idempotency_key, source, event_id,
                   correlation_id, created_at, payload, order_seq)
                 SELECT flow, destination, entity_key, idempotency_key, source, event_id, correlation_id,
                   ?2, ?3, order_seq FROM dlq WHERE id = ?1",
            )?
            .execute(params![dlq_id, now_ms(), payload])?;
            mark(tx, *dlq_id, "replayed", note)?;
            bump(d, &e.flow, &e.destination, |c| c.dead_lettered -= 1);
            Ok(Applied {
                changed: 1,
                duplicates: 0,
            })
        }
        Op::ReplayMapped {
            dlq_id,
            outcome,
            note,
        } => {
            let e = dead_entry(tx, *dlq_id)?;
            if e.stage == "deliver" {
                return Err(StoreError::Invalid(format!(
                    "DLQ entry {dlq_id} failed at delivery; replay it as it is"
                )));
            }
            // the entry leaves the flow's rejected count and re-enters as the new outcome
            bump(d, &e.flow, "", |c| {
                c.rejected -= 1;
                c.received -= 1;
            });
            mark(tx, *dlq_id, "replayed", note)?;
            apply_outcome(
                tx,
                &e.source,
                &e.event_id,
                &e.correlation_id,
                e.created_at,
                &e.payload,
                outcome,
                d,
            )?;
            Ok(Applied {
                changed: 1,
                duplicates: 0,
            })
        }
        Op::PruneInbox { before, limit } => {
            let n = tx
                .prepare_cached(
                    "DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox ORDER BY seq LIMIT ?2) AND received_at < ?1",
                )?
                .execute(params![before, *limit as i64])?;
            Ok(Applied {
                changed: n,
                duplicates: 0,
            })
        }
        Op::Discard { dlq_id, note } => {
            let e = dead_entry(tx, *dlq_id)?;
            mark(tx, *dlq_id, "discarded", note)?;
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
                duplicates: 0,
            })
        }
    }
}

struct Dead {
    stage: String,
    flow: String,
    destination: String,
    source: String,
    event_id: String,
    correlation_id: String,
    created_at: i64,
    payload: String,
}

fn dead_entry(tx: &Connection, id: i64) -> Result<Dead, StoreError> {
    let row = tx
        .prepare_cached(
            "SELECT stage, flow, destination, source, event_id, correlation_id, created_at, payload, status
             FROM dlq WHERE id = ?1",
        )?
        .query_row([id], |r| {
            Ok((
                Dead {
                    stage: r.get(0)?,
                    flow: r.get(1)?,
                    destination: r.get(2)?,
                    source: r.get(3)?,
                    event_id: r.get(4)?,
                    correlation_id: r.get(5)?,
                    created_at: r.get(6)?,
                    payload: r.get(7)?,
                },
                r.get::<_, String>(8)?,
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

fn mark(tx: &Connection, id: i64, status: &str, note: &str) -> Result<(), StoreError> {
    let entry = serde_json::json!({"at": now_ms(), "action": status, "note": note}).to_string();
    tx.prepare_cached("UPDATE dlq SET status = ?2, history = json_insert(history, '$[#]', json(?3)) WHERE id = ?1")?
        .execute(params![id, status, entry])?;
    Ok(())
}

fn ingest(tx: &Connection, b: &IngestBatch, d: &mut Deltas) -> Result<Applied, StoreError> {
    let mut inbox = tx.prepare_cached(
        "INSERT INTO inbox (source, event_id, received_at, correlation_id, attributes, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (source, event_id) DO NOTHING",
    )?;
    let mut applied = Applied::default();
    for e in &b.events {
        let n = inbox.execute(params![
            b.source,
            e.event_id,
            e.received_at,
            e.correlation_id,
            e.attributes,
            e.payload
        ])?;
        if n == 0 {
            applied.duplicates += 1;
            continue;
        }
        applied.changed += 1;
        for o in &e.outcomes {
            apply_outcome(
                tx,
                &b.source,
                &e.event_id,
                &e.correlation_id,
                e.received_at,
                &e.payload,
                o,
                d,
            )?;
        }
    }
    if let Some((key, value)) = &b.checkpoint {
        tx.prepare_cached(
            "INSERT INTO checkpoints (source, key, value, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (source, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )?
        .execute(params![b.source, key, value, now_ms()])?;
    }
    Ok(applied)
}

#[allow(clippy::too_many_arguments)]
fn apply_outcome(
    tx: &Connection,
    source: &str,
    event_id: &str,
    correlation_id: &str,
    received_at: i64,
    payload: &str,
    o: &FlowOutcome,
    d: &mut Deltas,
) -> Result<(), StoreError> {
    match o {
        FlowOutcome::Routed { flow, deliveries } => {
            bump(d, flow, "", |c| c.received += 1);
            let mut ins = tx.prepare_cached(
                "INSERT INTO outbox (flow, destination, entity_key, idempotency_key, source, event_id,
                   correlation_id, created_at, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for dl in deliveries {
                ins.execute(params![
                    flow,
                    dl.destination,
                    dl.entity_key,
                    dl.idempotency_key,
                    source,
                    event_id,
                    correlation_id,
                    received_at,
                    dl.payload
                ])?;
            }
        }
        FlowOutcome::Filtered { flow } => bump(d, flow, "", |c| {
            c.received += 1;
            c.filtered += 1;
        }),
        FlowOutcome::Rejected {
            flow, stage, error, ..
        } => {
            bump(d, flow, "", |c| {
                c.received += 1;
                c.rejected += 1;
            });
            let history = serde_json::json!([{"at": now_ms(), "action": "rejected", "stage": stage.as_str(), "error": error}]);
            tx.prepare_cached(
                "INSERT INTO dlq (stage, flow, destination, source, event_id, correlation_id, created_at,
                   failed_at, attempts, error, payload, history)
                 VALUES (?1, ?2, '', ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9, ?10)",
            )?
            .execute(params![
                stage.as_str(),
                flow,
                source,
                event_id,
                correlation_id,
                received_at,
                now_ms(),
                error,
                payload,
                history.to_string()
            ])?;
        }
    }
    Ok(())
}
