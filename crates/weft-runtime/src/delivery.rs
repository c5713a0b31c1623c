//! Delivery lanes: one task per (flow, destination), moving outbox rows to
//! the sink with order per entity key, concurrency across keys, retries with
//! exponential backoff and full jitter, and the DLQ.
//!
//! A lane keeps a bounded window of outbox rows in memory (in id order). A
//! row may be sent when it is due and no earlier row with the same entity
//! key is still in the window: that is the whole ordering rule. Results are
//! committed to the store before the rows leave the window; a crash between
//! a successful write and that commit means the row is written again after
//! restart, with the same idempotency key.
//!
//! Before sending, a lane asks its destination's [`Guard`] (circuit breaker,
//! `Retry-After` pause, rate limit); while it says wait, nothing is sent and
//! nothing spends an attempt. With `on_dead_letter: hold_key`, a key with a
//! dead letter in the DLQ is held until the entry is replayed or discarded;
//! a replayed row keeps its original place in its key's order (`order_seq`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use weft_connectors::{Delivery, Sink, SinkError};
use weft_core::ErrorKind;
use weft_core::config::{DeliveryPolicy, OnDeadLetter};
use weft_store::{CapturedRow, Op, OutboxRow, Store, now_ms};

use crate::guard::Guard;
use crate::metrics as m;

/// What the rest of the runtime knows of a lane: how to wake it and how
/// much it has to do (for backpressure).
pub struct LaneHandle {
    pub flow: String,
    pub dest: String,
    pub wake: Notify,
    /// Pending rows, kept approximately in memory and re-read from the
    /// store every few seconds.
    pub backlog: AtomicI64,
    pub high_water: u64,
}

impl LaneHandle {
    pub fn over_high_water(&self) -> bool {
        self.backlog.load(Ordering::Relaxed) >= self.high_water as i64
    }
}

/// Rows held in memory per lane, at least: a lane holds enough for two
/// rounds of `concurrency` batches of `batch_size`.
const WINDOW: usize = 4096;
/// How often a lane looks at the store without being woken (rows written by
/// another process, such as `weft dlq replay`).
const POLL: Duration = Duration::from_millis(500);

pub(crate) struct Lane {
    pub flow: String,
    pub dest: String,
    pub policy: DeliveryPolicy,
    pub sink: Arc<dyn Sink>,
    pub guard: Arc<Guard>,
    pub store: Store,
    pub handle: Arc<LaneHandle>,
    pub shutdown: CancellationToken,
}

/// Window key: order within the entity key first (a replayed row keeps its
/// original place), then the outbox id.
type Pos = (i64, i64);

struct Entry {
    row: OutboxRow,
    in_flight: bool,
}

type Done = Vec<(i64, Result<(), SinkError>)>;

impl Lane {
    pub(crate) async fn run(self) {
        let reader = {
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.reader()).await {
                Ok(Ok(r)) => Arc::new(std::sync::Mutex::new(r)),
                Ok(Err(e)) => {
                    tracing::error!(flow = %self.flow, destination = %self.dest, error = %e, "cannot open a store reader; lane stopped");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reader task failed");
                    return;
                }
            }
        };
        let mut window: BTreeMap<Pos, Entry> = BTreeMap::new();
        let mut pos: HashMap<i64, Pos> = HashMap::new();
        let mut held: HashSet<String> = HashSet::new();
        let hold = self.policy.on_dead_letter == OnDeadLetter::HoldKey;
        let mut hw: i64 = 0;
        let (res_tx, mut res_rx) = mpsc::channel::<Done>(self.policy.concurrency * 2 + 2);
        let mut in_flight = 0usize;
        let mut stopping = false;
        let capacity = WINDOW.max(self.policy.batch_size * self.policy.concurrency * 2);
        loop {
            if !stopping && window.len() < capacity / 2 {
                let (flow, dest, want) = (
                    self.flow.clone(),
                    self.dest.clone(),
                    capacity - window.len(),
                );
                let r = reader.clone();
                // held keys are read before the rows: a replay that releases a
                // key commits its row in the same transaction, so it is seen too
                let fetched = tokio::task::spawn_blocking(move || {
                    let r = r.lock().map_err(|_| "reader lock poisoned".to_string())?;
                    let held = if hold {
                        Some(r.held_keys(&flow, &dest).map_err(|e| e.to_string())?)
                    } else {
                        None
                    };
                    let rows = r
                        .outbox_after(&flow, &dest, hw, want)
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((held, rows))
                })
                .await;
                match fetched {
                    Ok(Ok((h, rows))) => {
                        if let Some(h) = h {
                            held = h.into_iter().collect();
                        }
                        for row in rows {
                            hw = hw.max(row.id);
                            let p = (row.order_seq, row.id);
                            pos.insert(row.id, p);
                            window.insert(
                                p,
                                Entry {
                                    row,
                                    in_flight: false,
                                },
                            );
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(flow = %self.flow, destination = %self.dest, error = %e, "outbox read failed")
                    }
                    Err(e) => tracing::warn!(error = %e, "outbox read task failed"),
                }
            }
            let mut guard_wait = None;
            if !stopping {
                while in_flight < self.policy.concurrency {
                    let ids = pick(&window, &held, self.policy.batch_size, now_ms());
                    if ids.is_empty() {
                        break;
                    }
                    if let Err(d) = self.guard.check() {
                        guard_wait = Some(d);
                        break;
                    }
                    self.guard.acquire().await;
                    let mut batch = Vec::with_capacity(ids.len());
                    for p in &ids {
                        if let Some(e) = window.get_mut(p) {
                            e.in_flight = true;
                            batch.push(delivery(&e.row));
                        }
                    }
                    in_flight += 1;
                    let sink = self.sink.clone();
                    let tx = res_tx.clone();
                    tokio::spawn(async move {
                        let results = sink.write(&batch).await;
                        let mut done: Done = Vec::with_capacity(batch.len());
                        let mut results = results.into_iter();
                        for d in &batch {
                            let r = results.next().unwrap_or_else(|| {
                                Err(SinkError::retryable("the sink returned too few results"))
                            });
                            done.push((d.id, r));
                        }
                        let _ = tx.send(done).await;
                    });
                }
            }
            if stopping && in_flight == 0 {
                return;
            }
            let mut wait = next_due(&window)
                .map(|t| {
                    Duration::from_millis((t - now_ms()).clamp(1, POLL.as_millis() as i64) as u64)
                })
                .unwrap_or(POLL);
            if let Some(g) = guard_wait {
                wait = wait.min(g.max(Duration::from_millis(1)));
            }
            tokio::select! {
                Some(done) = res_rx.recv() => {
                    let mut all = vec![done];
                    while let Ok(more) = res_rx.try_recv() {
                        all.push(more);
                    }
                    in_flight -= all.len();
                    self.settle(&mut window, &mut pos, &mut held, all).await;
                }
                _ = self.handle.wake.notified(), if !stopping => {}
                _ = tokio::time::sleep(wait), if !stopping => {}
                _ = self.shutdown.cancelled(), if !stopping => {
                    stopping = true;
                }
            }
        }
    }

    /// Commit results: delivered rows leave the outbox; failures are
    /// scheduled for retry or moved to the DLQ.
    async fn settle(
        &self,
        window: &mut BTreeMap<Pos, Entry>,
        pos: &mut HashMap<i64, Pos>,
        held: &mut HashSet<String>,
        all: Vec<Done>,
    ) {
        let now = now_ms();
        let mut delivered = Vec::new();
        let mut latencies = Vec::new();
        for (id, result) in all.into_iter().flatten() {
            let Some(p) = pos.get(&id).copied() else {
                continue;
            };
            let Some(entry) = window.get_mut(&p) else {
                continue;
            };
            entry.in_flight = false;
            match &result {
                Ok(()) => self.guard.record(false, None),
                Err(e) => self
                    .guard
                    .record(e.kind == ErrorKind::Retryable, e.retry_after),
            }
            match result {
                Ok(()) => {
                    delivered.push(id);
                    latencies.push((now - entry.row.created_at).max(0) as f64 / 1000.0);
                }
                Err(e) => {
                    let attempts = entry.row.attempts + 1;
                    let retry =
                        e.kind == ErrorKind::Retryable && attempts < self.policy.max_attempts;
                    m::failed(&self.flow, &self.dest, retry);
                    if retry {
                        let delay = e
                            .retry_after
                            .unwrap_or_else(|| backoff(&self.policy, attempts));
                        let next_at = now + delay.as_millis() as i64;
                        tracing::warn!(flow = %self.flow, destination = %self.dest, correlation_id = %entry.row.correlation_id,
                            attempt = attempts, retry_in_ms = delay.as_millis() as u64, error = %e, "delivery failed; will retry");
                        entry.row.attempts = attempts;
                        entry.row.next_at = next_at;
                        let op = Op::Retry {
                            id,
                            attempts,
                            next_at,
                            error: e.to_string(),
                        };
                        if let Err(se) = self.store.apply(op).await {
                            tracing::error!(error = %se, "cannot record a retry");
                        }
                    } else {
                        tracing::warn!(flow = %self.flow, destination = %self.dest, correlation_id = %entry.row.correlation_id,
                            attempt = attempts, error = %e, "delivery failed; dead-lettered");
                        let key = entry.row.entity_key.clone();
                        match self
                            .store
                            .apply(Op::DeadLetter {
                                id,
                                attempts,
                                error: e.to_string(),
                            })
                            .await
                        {
                            Ok(_) => {
                                m::dead_lettered(&self.flow, &self.dest);
                                window.remove(&p);
                                pos.remove(&id);
                                self.handle.backlog.fetch_sub(1, Ordering::Relaxed);
                                if self.policy.on_dead_letter == OnDeadLetter::HoldKey
                                    && let Some(k) = key
                                {
                                    held.insert(k);
                                }
                            }
                            Err(se) => {
                                tracing::error!(error = %se, "cannot dead-letter; will retry")
                            }
                        }
                    }
                }
            }
        }
        // ids the destination gave (`capture_id`), while their rows are still
        // in the outbox; an upsert, so a redelivery rewrites the same entry
        let captured = self.sink.take_captured();
        if !captured.is_empty() {
            let rows = captured
                .into_iter()
                .map(|c| CapturedRow {
                    outbox_id: c.delivery_id,
                    external_id: c.external_id,
                })
                .collect();
            if let Err(e) = self.store.apply(Op::Captured(rows)).await {
                tracing::warn!(flow = %self.flow, destination = %self.dest, error = %e, "cannot record the destination's ids in the crosswalk");
            }
        }
        if !delivered.is_empty() {
            match self.store.apply(Op::Delivered(delivered.clone())).await {
                Ok(_) => {
                    m::delivered(&self.flow, &self.dest, delivered.len() as u64, &latencies);
                    self.handle
                        .backlog
                        .fetch_sub(delivered.len() as i64, Ordering::Relaxed);
                    for id in delivered {
                        if let Some(p) = pos.remove(&id) {
                            window.remove(&p);
                        }
                    }
                }
                // the rows stay in the window and are sent again (same keys)
                Err(e) => {
                    tracing::error!(error = %e, "cannot record deliveries; they will be retried")
                }
            }
        }
    }
}

fn delivery(row: &OutboxRow) -> Delivery {
    Delivery {
        id: row.id,
        idempotency_key: row.idempotency_key.clone(),
        correlation_id: row.correlation_id.clone(),
        event_id: row.event_id.clone(),
        entity_key: row.entity_key.clone(),
        attempt: row.attempts + 1,
        payload: serde_json::from_str(&row.payload).unwrap_or(serde_json::Value::Null),
    }
}

/// Up to `n` rows that may go now: due, not in flight, first of their
/// entity key in the window, and their key not held by a dead letter.
fn pick(window: &BTreeMap<Pos, Entry>, held: &HashSet<String>, n: usize, now: i64) -> Vec<Pos> {
    let mut blocked: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for (p, e) in window {
        if let Some(k) = e.row.entity_key.as_deref()
            && (!blocked.insert(k) || held.contains(k))
        {
            continue;
        }
        if !e.in_flight && e.row.next_at <= now {
            out.push(*p);
            if out.len() == n {
                break;
            }
        }
    }
    out
}

/// The earliest future due time among waiting rows.
fn next_due(window: &BTreeMap<Pos, Entry>) -> Option<i64> {
    let now = now_ms();
    window
        .values()
        .filter(|e| !e.in_flight && e.row.next_at > now)
        .map(|e| e.row.next_at)
        .min()
}

/// Exponential backoff with full jitter: uniform in [0, min(max, initial * multiplier^(attempt-1))].
pub(crate) fn backoff(p: &DeliveryPolicy, attempt: u32) -> Duration {
    let exp = p.multiplier.powi(attempt.saturating_sub(1).min(64) as i32);
    let cap = (p.initial_backoff.as_secs_f64() * exp).min(p.max_backoff.as_secs_f64());
    let secs = rand::rng().random_range(0.0..=cap.max(0.0));
    Duration::from_secs_f64(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, key: Option<&str>, next_at: i64) -> Entry {
        Entry {
            row: OutboxRow {
                id,
                flow: "f".into(),
                destination: "d".into(),
                entity_key: key.map(str::to_owned),
                idempotency_key: format!("k{id}"),
                source: "s".into(),
                event_id: id.to_string(),
                correlation_id: "c".into(),
                created_at: 0,
                attempts: 0,
                next_at,
                last_error: None,
                order_seq: id,
                payload: "{}".into(),
                event_time: 0,
                source_version: None,
                group_id: None,
                traceparent: None,
                tracestate: None,
            },
            in_flight: false,
        }
    }

    #[test]
    fn pick_keeps_order_per_key_and_runs_keys_in_parallel() {
        let mut w = BTreeMap::new();
        for (id, k) in [(1, Some("a")), (2, Some("a")), (3, Some("b")), (4, None)] {
            w.insert((id, id), row(id, k, 0));
        }
        let none = HashSet::new();
        let ids = |v: Vec<Pos>| v.into_iter().map(|p| p.1).collect::<Vec<_>>();
        assert_eq!(ids(pick(&w, &none, 10, 10)), vec![1, 3, 4]);
        w.get_mut(&(1, 1)).unwrap().in_flight = true;
        assert_eq!(
            ids(pick(&w, &none, 10, 10)),
            vec![3, 4],
            "2 waits behind 1 in flight"
        );
        // a row in backoff holds its key too
        w.get_mut(&(1, 1)).unwrap().in_flight = false;
        w.get_mut(&(1, 1)).unwrap().row.next_at = 100;
        assert_eq!(ids(pick(&w, &none, 10, 10)), vec![3, 4]);
        assert_eq!(ids(pick(&w, &none, 1, 10)), vec![3]);
        // a held key sends nothing
        let held: HashSet<String> = ["b".to_string()].into();
        assert_eq!(ids(pick(&w, &held, 10, 10)), vec![4]);
    }

    #[test]
    fn a_replayed_row_goes_before_later_rows_of_its_key() {
        let mut w = BTreeMap::new();
        w.insert((5, 5), row(5, Some("a"), 0));
        // replayed: new id 9, original order 2
        let mut r = row(9, Some("a"), 0);
        r.row.order_seq = 2;
        w.insert((2, 9), r);
        let picked = pick(&w, &HashSet::new(), 10, 10);
        assert_eq!(picked, vec![(2, 9)]);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = DeliveryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            multiplier: 2.0,
            concurrency: 1,
            batch_size: 1,
            on_dead_letter: OnDeadLetter::Continue,
            backlog_high_water: 10,
        };
        for attempt in 1..20 {
            let d = backoff(&p, attempt);
            let cap = (100.0 * 2f64.powi(attempt as i32 - 1)).min(1000.0);
            assert!(
                d.as_secs_f64() * 1000.0 <= cap + 0.001,
                "attempt {attempt}: {d:?}"
            );
        }
        let samples: HashSet<u128> = (0..50).map(|_| backoff(&p, 5).as_micros()).collect();
        assert!(samples.len() > 10, "full jitter spreads delays");
    }
}
