//! Delivery lanes: one task per (flow, destination), moving the rows the
//! journal hands out to the sink, with retries (exponential backoff, full
//! jitter) and the DLQ.
//!
//! A lane keeps no ordering state of its own: it asks the journal to
//! [`claim`](weft_store::Journal::claim) what may be written now (the heads
//! of their key queues, leased) and [`settle`](weft_store::Journal::settle)s
//! every result in one transaction per write. Order per key is the journal's
//! invariant, across flows, retries, replays and restarts. A crash between a
//! successful write and its settle means the row is written again after the
//! restart, with the same idempotency key.
//!
//! Every claimed row is settled: a write that panics or runs past
//! [`Sink::max_write_time`] counts as a retryable failure of its batch, so
//! neither its keys nor the breaker's half-open probe can be held for good.
//! Before sending, a lane asks its destination's [`Guard`] (circuit breaker,
//! `Retry-After` pause, rate limit); while it says wait, nothing is claimed
//! and nothing spends an attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use weft_connectors::{Delivery, Sink, SinkError, WriteResult};
use weft_core::ErrorKind;
use weft_core::config::{DeliveryPolicy, OnDeadLetter};
use weft_store::{
    Attempt, CanonicalWritten, ClaimRequest, Claimed, Journal, LaneId, Outcome, Settle, Settlement,
    WriteOutcome, now_ms,
};

use crate::guard::{Guard, Permit};
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
    /// Ingests of this lane's rows between their commit and their
    /// `backlog` update, and how many have finished: the gauge task
    /// replaces `backlog` with a count from the store only when no ingest
    /// ran while it read (else it would count a batch twice).
    pub ingesting: AtomicI64,
    pub ingested: AtomicI64,
    /// Totals since the start, for the dashboard's series: rows
    /// delivered, the sum of their latencies (accepted to settled, ms),
    /// and failed write attempts (retried or dead-lettered).
    pub delivered_rows: AtomicU64,
    pub delivered_latency_ms: AtomicU64,
    pub failed_attempts: AtomicU64,
}

impl LaneHandle {
    pub fn new(flow: &str, dest: &str, backlog: i64, high_water: u64) -> LaneHandle {
        LaneHandle {
            flow: flow.to_owned(),
            dest: dest.to_owned(),
            wake: Notify::new(),
            backlog: AtomicI64::new(backlog),
            high_water,
            ingesting: AtomicI64::new(0),
            ingested: AtomicI64::new(0),
            delivered_rows: AtomicU64::new(0),
            delivered_latency_ms: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
        }
    }

    pub fn over_high_water(&self) -> bool {
        self.backlog.load(Ordering::Relaxed) >= self.high_water as i64
    }
}

/// How often a lane looks at the journal without being woken (rows written
/// by another process, such as `weft dlq replay`, retries coming due).
const POLL: Duration = Duration::from_millis(200);
/// Extra lease beyond the longest write, so a lease never ends while the
/// lane can still settle it.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

pub struct Lane {
    pub flow: String,
    pub dest: String,
    pub policy: DeliveryPolicy,
    pub sink: Arc<dyn Sink>,
    pub guard: Arc<Guard>,
    pub journal: Arc<dyn Journal>,
    pub handle: Arc<LaneHandle>,
    pub shutdown: CancellationToken,
    /// The flow's entity has sensitive fields: every value of a failed
    /// row's payload is masked out of the destination's error before it is
    /// logged or stored (the destination's field names may differ from the
    /// entity's, after a destination mapping, so the values are what is
    /// matched).
    pub redact: bool,
    /// An identity flow's lane: rows name canonical records, mapped when
    /// they are written.
    pub identity: Option<Arc<crate::identity::LaneIdentity>>,
    /// Fields resolved to this destination's ids of canonical records when
    /// written (`references:`); rows wait until they can be.
    pub references: Option<Arc<crate::references::LaneRefs>>,
    /// A span per delivery attempt when traces are on.
    pub tracer: crate::telemetry::Tracer,
    /// This node's membership of a shared journal: no claim while it is
    /// not fresh (another node may be about to find this one dead).
    pub membership: Arc<crate::lease::Membership>,
}

/// A write's claimed rows, what became of them, the guard's permit it was
/// sent under, and the attempt spans of the rows it sent (by row id, in
/// claim order; none with traces off).
type Done = (
    Vec<Claimed>,
    Vec<WriteResult>,
    Vec<Option<CanonicalWritten>>,
    Permit,
    Vec<(i64, crate::telemetry::AttemptSpan)>,
    Sent,
);

/// The write a batch went out in, for the attempt trail: when, how long,
/// and which rows were in it (in claim order; rows decided before the
/// write were not sent).
#[derive(Debug, Default)]
struct Sent {
    at: i64,
    latency_ms: i64,
    ids: Vec<i64>,
}

impl Lane {
    pub async fn run(self) {
        let lane = LaneId::new(&self.flow, &self.dest);
        // rows of one key in one batch only where the sink folds them and a
        // dead letter does not hold the key (it could not hold rows written
        // in the same batch behind it)
        let per_key =
            if self.sink.folds_keys() && self.policy.on_dead_letter == OnDeadLetter::Continue {
                self.policy.batch_size
            } else {
                1
            };
        let write_time = self.sink.max_write_time(self.policy.batch_size);
        let mut writes: JoinSet<Done> = JoinSet::new();
        let mut stopping = false;
        let mut idle_until_woken = false;
        loop {
            let mut guard_wait = None;
            while !stopping && !idle_until_woken && writes.len() < self.policy.concurrency {
                if !self.membership.fresh() {
                    // paused, cut off or not yet beaten: claim nothing
                    // until the journal acknowledged a heartbeat again
                    break;
                }
                let permit = match self.guard.check() {
                    Ok(p) => p,
                    Err(d) => {
                        guard_wait = Some(d);
                        break;
                    }
                };
                let req = ClaimRequest {
                    lane: lane.clone(),
                    max: self.policy.batch_size,
                    per_key,
                    lease: write_time + LEASE_MARGIN,
                };
                let claimed = match self.journal.claim(req).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(flow = %self.flow, destination = %self.dest, error = %e, "cannot claim rows; will try again");
                        break;
                    }
                };
                if claimed.is_empty() {
                    // nothing due: sleep until woken, a poll, or a result
                    idle_until_woken = true;
                    break;
                }
                self.guard.acquire().await;
                // the destination may have asked for a pause while we waited
                if let Err(d) = self.guard.check_after_wait() {
                    self.release(claimed).await;
                    guard_wait = Some(d);
                    break;
                }
                // and the wait may have outlasted this node's membership
                if !self.membership.fresh() {
                    self.release(claimed).await;
                    break;
                }
                self.spawn_write(&mut writes, claimed, write_time, permit);
            }
            if stopping && writes.is_empty() {
                return;
            }
            let wait = guard_wait.map_or(POLL, |g| g.clamp(Duration::from_millis(1), POLL));
            tokio::select! {
                Some(done) = writes.join_next() => {
                    idle_until_woken = false;
                    match done {
                        Ok((claimed, results, canonical, permit, spans, sent)) => self.settle(claimed, results, canonical, permit, spans, sent).await,
                        // the write task itself never panics (the sink's panic
                        // is caught inside it); a cancelled task cannot happen
                        Err(e) => tracing::error!(flow = %self.flow, destination = %self.dest, error = %e, "write task failed; its rows return after their lease"),
                    }
                }
                _ = self.handle.wake.notified(), if !stopping => { idle_until_woken = false; }
                _ = tokio::time::sleep(wait), if !stopping => { idle_until_woken = false; }
                _ = self.shutdown.cancelled(), if !stopping => { stopping = true; }
            }
        }
    }

    /// Write one batch on its own task. A panic in the sink and a write past
    /// `write_time` become retryable failures of every delivery in it.
    fn spawn_write(
        &self,
        writes: &mut JoinSet<Done>,
        claimed: Vec<Claimed>,
        write_time: Duration,
        permit: Permit,
    ) {
        let sink = self.sink.clone();
        let (flow, dest) = (self.flow.clone(), self.dest.clone());
        let (identity, journal) = (self.identity.clone(), self.journal.clone());
        let references = self.references.clone();
        let journal2 = self.journal.clone();
        let tracer = self.tracer.clone();
        writes.spawn(async move {
            let mut batch = Vec::with_capacity(claimed.len());
            // rows decided before the write (unreadable, or nothing to write)
            let mut decided: Vec<(usize, WriteResult)> = Vec::new();
            let mut canonical: Vec<Option<CanonicalWritten>> = vec![None; claimed.len()];
            let claimed = match identity {
                None => {
                    let mut ready = Vec::with_capacity(claimed.len());
                    for (i, c) in claimed.iter().enumerate() {
                        match delivery(c) {
                            Ok(d) => ready.push((i, d)),
                            Err(e) => decided.push((i, Err(e))),
                        }
                    }
                    match references {
                        None => batch.extend(ready.into_iter().map(|(_, d)| d)),
                        Some(lr) => match crate::references::resolve_all(journal, lr, ready).await
                        {
                            Ok(resolved) => {
                                for (i, r) in resolved {
                                    match r {
                                        Ok(crate::references::Resolved::Ready(d)) => batch.push(*d),
                                        Ok(crate::references::Resolved::Waiting(why)) => {
                                            decided.push((i, Err(crate::references::waiting(why))))
                                        }
                                        Err(e) => decided.push((i, Err(e))),
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::error!(flow = %flow, destination = %dest, error = %e, "cannot resolve references; the rows return after their lease");
                                return (Vec::new(), Vec::new(), Vec::new(), permit, Vec::new(), Sent::default());
                            }
                        },
                    }
                    claimed
                }
                Some(id) => {
                    // reads of the store: off the async workers
                    let prepared = tokio::task::spawn_blocking(move || {
                        let p: Vec<_> = claimed
                            .iter()
                            .map(|c| crate::identity::prepare(journal.as_ref(), &id, c))
                            .collect();
                        (claimed, p)
                    })
                    .await;
                    let (claimed, prepared) = match prepared {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::error!(flow = %flow, destination = %dest, error = %e, "cannot prepare canonical writes; the rows return after their lease");
                            return (Vec::new(), Vec::new(), Vec::new(), permit, Vec::new(), Sent::default());
                        }
                    };
                    let intents: Vec<CanonicalWritten> = prepared
                        .iter()
                        .filter_map(|p| match p {
                            crate::identity::Prepared::Write(_, Some(w)) => Some(w.clone()),
                            _ => None,
                        })
                        .collect();
                    // what is about to be written is recorded first: its echo
                    // must be recognised even if weft dies before the settle
                    let intent = if intents.is_empty() {
                        Ok(())
                    } else {
                        journal2.canonical_intent(dest.clone(), intents).await
                    };
                    for (i, p) in prepared.into_iter().enumerate() {
                        match (p, &intent) {
                            (crate::identity::Prepared::Write(d, w), Ok(())) => {
                                batch.push(d);
                                canonical[i] = w;
                            }
                            (crate::identity::Prepared::Write(..), Err(e)) => {
                                decided.push((
                                    i,
                                    Err(SinkError::retryable(format!(
                                        "cannot record what is about to be written: {e}"
                                    ))),
                                ));
                            }
                            (crate::identity::Prepared::Done(r, w), _) => {
                                decided.push((i, r));
                                canonical[i] = w;
                            }
                        }
                    }
                    claimed
                }
            };
            let n = batch.len();
            // each delivery's trace context becomes its attempt span's
            let mut spans = tracer.send(&flow, &dest, &mut batch);
            let mut sent = Sent {
                at: now_ms(),
                latency_ms: 0,
                ids: batch.iter().map(|d| d.id).collect(),
            };
            let started = std::time::Instant::now();
            let inner = tokio::spawn(async move {
                let r = sink.write(&batch).await;
                drop(batch);
                r
            });
            let abort = inner.abort_handle();
            let mut results: Vec<WriteResult> = match tokio::time::timeout(write_time, inner).await
            {
                Ok(Ok(mut r)) => {
                    r.truncate(n);
                    while r.len() < n {
                        r.push(Err(SinkError::retryable("the sink returned too few results")));
                    }
                    r
                }
                Ok(Err(e)) => {
                    let why = if e.is_panic() {
                        "the sink panicked"
                    } else {
                        "the write task was cancelled"
                    };
                    tracing::error!(flow = %flow, destination = %dest, "{why}; the batch will be retried");
                    (0..n).map(|_| Err(SinkError::retryable(why))).collect()
                }
                Err(_) => {
                    abort.abort();
                    let why = format!("the write did not finish within {write_time:?}");
                    tracing::warn!(flow = %flow, destination = %dest, "{why}; the batch will be retried");
                    (0..n).map(|_| Err(SinkError::retryable(why.clone()))).collect()
                }
            };
            sent.latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
            spans.iter_mut().for_each(|(_, s)| s.wrote());
            decided.sort_by_key(|(i, _)| *i);
            for (i, r) in decided {
                results.insert(i, r);
            }
            (claimed, results, canonical, permit, spans, sent)
        });
    }

    /// Give rows back unsent (no attempt spent).
    async fn release(&self, claimed: Vec<Claimed>) {
        let items = claimed
            .iter()
            .map(|c| Settlement {
                id: c.row.id,
                token: c.token,
                attempt: None,
                outcome: Outcome::Release,
            })
            .collect();
        if let Err(e) = self
            .journal
            .settle(Settle {
                items,
                follow_ups: vec![],
            })
            .await
        {
            tracing::warn!(flow = %self.flow, destination = %self.dest, error = %e, "cannot release rows; they return when their lease ends");
        }
    }

    /// Commit a write's results in one transaction: delivered rows leave the
    /// outbox with what the destination said; failures are scheduled for a
    /// retry or moved to the DLQ.
    async fn settle(
        &self,
        claimed: Vec<Claimed>,
        results: Vec<WriteResult>,
        mut canonical: Vec<Option<CanonicalWritten>>,
        permit: Permit,
        spans: Vec<(i64, crate::telemetry::AttemptSpan)>,
        sent: Sent,
    ) {
        let now = now_ms();
        let mut spans = spans.into_iter().peekable();
        let mut sent_ids = sent.ids.iter().peekable();
        let results = in_key_order(&claimed, results);
        // the breaker counts writes, not rows
        let failed = results.iter().any(|r| {
            matches!(r, Err(e) if e.kind == ErrorKind::Retryable && !crate::references::is_waiting(e))
        });
        let retry_after = results
            .iter()
            .filter_map(|r| r.as_ref().err().and_then(|e| e.retry_after))
            .max();
        self.guard.record(permit, failed, retry_after);
        // a crash here: written, not settled (tests only; compiled out)
        fail::fail_point!("lane-before-settle", |_| {});
        let hold_key = self.policy.on_dead_letter == OnDeadLetter::HoldKey;
        let mut items = Vec::with_capacity(claimed.len());
        let mut latencies = Vec::new();
        let (mut delivered, mut dead, mut failures) = (0u64, 0u64, 0u64);
        canonical.resize(claimed.len(), None);
        for ((c, r), cw) in claimed.iter().zip(results).zip(canonical) {
            // the spans are in claim order, for the rows that were sent
            let span = spans
                .next_if(|(id, _)| *id == c.row.id)
                .map(|(_, s)| (s, r.as_ref().err().map(|e| (e.kind, e.status))));
            // so are the ids of the rows that were sent
            let attempt = sent_ids.next_if(|id| **id == c.row.id).map(|_| Attempt {
                at: sent.at,
                latency_ms: sent.latency_ms,
                status: match &r {
                    Ok(w) => w.status,
                    Err(e) => e.status,
                },
            });
            let outcome = match r {
                Ok(w) => {
                    delivered += 1;
                    latencies.push((now - c.row.created_at).max(0) as f64 / 1000.0);
                    Outcome::Delivered(WriteOutcome {
                        external_id: w.external_id,
                        version: w.version,
                        fingerprint: w.fingerprint,
                        canonical: cw,
                    })
                }
                Err(e) if crate::references::is_waiting(&e) => {
                    let age = Duration::from_millis((now - c.row.created_at).max(0) as u64);
                    let limit = self
                        .references
                        .as_ref()
                        .map_or(Duration::ZERO, |r| r.wait());
                    if age > limit {
                        tracing::warn!(flow = %self.flow, destination = %self.dest, correlation_id = %c.row.correlation_id,
                            error = %e, "a reference did not resolve in time; dead-lettered");
                        dead += 1;
                        Outcome::Dead {
                            error: format!(
                                "{e}, for longer than {}",
                                crate::references::span(limit)
                            ),
                            hold_key,
                        }
                    } else {
                        Outcome::Wait {
                            next_at: now + crate::references::next_look(age).as_millis() as i64,
                            reason: e.to_string(),
                        }
                    }
                }
                Err(mut e) => {
                    if self.redact {
                        e.message = redact_payload(&c.row.payload, &e.message);
                    }
                    failures += 1;
                    let attempts = c.row.attempts + 1;
                    let retry =
                        e.kind == ErrorKind::Retryable && attempts < self.policy.max_attempts;
                    m::failed(&self.flow, &self.dest, retry);
                    if retry {
                        let delay = e
                            .retry_after
                            .unwrap_or_else(|| backoff(&self.policy, attempts));
                        tracing::warn!(flow = %self.flow, destination = %self.dest, correlation_id = %c.row.correlation_id,
                            attempt = attempts, retry_in_ms = delay.as_millis() as u64, error = %e, "delivery failed; will retry");
                        Outcome::Retry {
                            next_at: now + delay.as_millis() as i64,
                            error: e.to_string(),
                        }
                    } else {
                        tracing::warn!(flow = %self.flow, destination = %self.dest, correlation_id = %c.row.correlation_id,
                            attempt = attempts, error = %e, "delivery failed; dead-lettered");
                        dead += 1;
                        Outcome::Dead {
                            error: e.to_string(),
                            hold_key,
                        }
                    }
                }
            };
            if let Some((s, err)) = span {
                s.settled(crate::telemetry::AttemptOutcome::of(&outcome), err);
            }
            items.push(Settlement {
                id: c.row.id,
                token: c.token,
                attempt,
                outcome,
            });
        }
        let settle = Settle {
            items,
            follow_ups: vec![],
        };
        // a failed settle leaves the rows leased: they are written again
        // (same idempotency keys) once the lease ends; try a few times first
        let mut tries = 0;
        loop {
            match self.journal.settle(settle.clone()).await {
                Ok(s) => {
                    // a crash here: settled, the lane not told (tests only)
                    fail::fail_point!("lane-after-settle", |_| {});
                    if s.stale > 0 {
                        tracing::warn!(flow = %self.flow, destination = %self.dest, stale = s.stale, "results for rows whose lease had ended were ignored");
                    }
                    m::delivered(&self.flow, &self.dest, delivered, &latencies);
                    let h = &self.handle;
                    h.delivered_rows.fetch_add(delivered, Ordering::Relaxed);
                    h.delivered_latency_ms.fetch_add(
                        latencies.iter().map(|s| (s * 1000.0) as u64).sum(),
                        Ordering::Relaxed,
                    );
                    h.failed_attempts.fetch_add(failures, Ordering::Relaxed);
                    for _ in 0..dead {
                        m::dead_lettered(&self.flow, &self.dest);
                    }
                    self.handle
                        .backlog
                        .fetch_sub((delivered + dead) as i64, Ordering::Relaxed);
                    return;
                }
                Err(e) if tries < 3 => {
                    tries += 1;
                    tracing::warn!(flow = %self.flow, destination = %self.dest, error = %e, "cannot record results; trying again");
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(e) => {
                    tracing::error!(flow = %self.flow, destination = %self.dest, error = %e, "cannot record results; the rows will be written again after their lease");
                    return;
                }
            }
        }
    }
}

/// Rows of one key in one batch are written in order; once one of them is
/// not delivered, the later ones of that key must not count as delivered
/// either (the earlier one is written again after them otherwise): they are
/// retried behind it.
fn in_key_order(claimed: &[Claimed], results: Vec<WriteResult>) -> Vec<WriteResult> {
    let mut failed_keys: Vec<(&str, bool)> = Vec::new();
    claimed
        .iter()
        .zip(results)
        .map(|(c, r)| {
            let Some(k) = c.row.entity_key.as_deref() else {
                return r;
            };
            if let Some((_, waits)) = failed_keys.iter().find(|(f, _)| *f == k) {
                return Err(if *waits {
                    crate::references::waiting(
                        "behind an earlier row of the same key that waits".into(),
                    )
                } else {
                    SinkError::retryable(
                        "not counted: an earlier delivery of the same key in this batch failed",
                    )
                });
            }
            if let Err(e) = &r {
                failed_keys.push((k, crate::references::is_waiting(e)));
            }
            r
        })
        .collect()
}

/// `message` with every value of the stored `payload` masked.
fn redact_payload(payload: &str, message: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
        return message.to_owned();
    };
    let mut values = Vec::new();
    weft_core::config::entities::scalar_texts(&v, &mut values);
    weft_core::config::entities::redact(message, &values)
}

/// The delivery a claimed row becomes. A payload that cannot be read back
/// (nested deeper than the JSON parser allows) is a permanent failure with
/// its reason, never a `null`.
fn delivery(c: &Claimed) -> Result<Delivery, SinkError> {
    let payload = serde_json::from_str(&c.row.payload)
        .map_err(|e| SinkError::permanent(format!("the stored payload cannot be read: {e}")))?;
    Ok(Delivery {
        id: c.row.id,
        idempotency_key: c.row.idempotency_key.clone(),
        correlation_id: c.row.correlation_id.clone(),
        event_id: c.row.event_id.clone(),
        entity_key: c.row.entity_key.clone(),
        attempt: c.row.attempts + 1,
        payload,
        context: weft_connectors::sink::DeliveryContext {
            flow: c.row.flow.clone(),
            source: c.row.source.clone(),
            event_time_ms: c.row.event_time,
            traceparent: c.row.traceparent.clone(),
            tracestate: c.row.tracestate.clone(),
        },
    })
}

/// Exponential backoff with full jitter: uniform in [0, min(max, initial * multiplier^(attempt-1))].
pub(crate) fn backoff(p: &DeliveryPolicy, attempt: u32) -> Duration {
    let exp = p.multiplier.powi(attempt.saturating_sub(1).min(64) as i32);
    let cap = (p.initial_backoff.as_secs_f64() * exp).min(p.max_backoff.as_secs_f64());
    let secs = rand::rng().random_range(0.0..=cap.max(0.0));
    Duration::from_secs_f64(secs)
}

/// The time a delivery that keeps failing spends waiting between its
/// `max_attempts` tries before it is dead-lettered: `(mean, longest)`
/// (full jitter: each wait is uniform up to its cap, so the mean is half
/// the sum of the caps). The write time and the lane's 200 ms poll come on
/// top; an open breaker or a `Retry-After` pause spends no attempts.
pub fn retry_window(p: &DeliveryPolicy) -> (Duration, Duration) {
    let caps: f64 = (1..p.max_attempts)
        .map(|attempt| {
            let exp = p.multiplier.powi(attempt.saturating_sub(1).min(64) as i32);
            (p.initial_backoff.as_secs_f64() * exp).min(p.max_backoff.as_secs_f64())
        })
        .sum();
    (
        Duration::from_secs_f64(caps / 2.0),
        Duration::from_secs_f64(caps),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// ARCHITECTURE.md's figure for the defaults: 8 attempts, 7 waits
    /// capped at 0.2, 0.4, ... 12.8 s: 25.4 s at most, 12.7 s on average.
    #[test]
    fn default_retry_window_is_what_the_docs_say() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.yaml");
        std::fs::write(
            &file,
            "systems:\n  a: {source: {webhook: {path: /h}}}\n  b: {sink: {http: {url: 'http://127.0.0.1:9/x'}}}\nflows:\n  f: {from: a, to: [b]}\n",
        )
        .unwrap();
        let cfg = weft_core::config::load(&file).unwrap();
        let p = &cfg.flows[0].destinations[0].delivery;
        assert_eq!(p.max_attempts, 8);
        let (mean, max) = retry_window(p);
        assert!((max.as_secs_f64() - 25.4).abs() < 1e-9, "{max:?}");
        assert!((mean.as_secs_f64() - 12.7).abs() < 1e-9, "{mean:?}");
        // and the backoff never waits past its cap
        for attempt in 1..8 {
            assert!(
                backoff(p, attempt) <= Duration::from_secs_f64(0.2 * 2f64.powi(attempt as i32 - 1))
            );
        }
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
