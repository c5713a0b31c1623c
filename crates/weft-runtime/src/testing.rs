//! A test kit for delivery lanes, in process: a [`ScriptedSink`] whose
//! behaviour per write is scripted and that records every delivery it
//! accepted, helpers to enqueue rows in a journal and to run a [`Lane`] over
//! it, and the names of the lane's failpoints.
//!
//! Failpoints (the `fail` crate) sit at [`FP_BEFORE_SETTLE`] (the sink
//! returned, nothing settled yet) and [`FP_AFTER_SETTLE`] (the settle
//! committed, the lane not yet told). They are compiled in only when the
//! `fail/failpoints` feature is on, which only weft-runtime's own
//! dev-dependencies turn on; in the hub `fail_point!` expands to nothing.
//! Failpoints are process-wide: tests that configure them live in a test
//! binary of their own (`tests/failpoints.rs`) and hold a
//! `fail::FailScenario`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weft_connectors::{Delivery, Sink, SinkError, WriteResult, Written};
use weft_core::config::{DeliveryPolicy, OnDeadLetter};
use weft_store::{
    Applied, Dedupe, FlowOutcome, IngestBatch, Journal, NewDelivery, NewEvent, StoreError, now_ms,
};

use crate::delivery::{Lane, LaneHandle};
use crate::guard::Guard;

/// Failpoint: the sink returned, its results are not settled yet.
pub const FP_BEFORE_SETTLE: &str = "lane-before-settle";
/// Failpoint: the settle committed, the lane has not moved on.
pub const FP_AFTER_SETTLE: &str = "lane-after-settle";

/// What one `write` call does.
#[derive(Debug, Clone)]
pub enum Step {
    /// Every delivery written.
    Ok,
    /// Every delivery written; the destination gave it `external_id`
    /// followed by `-` and the delivery's outbox id.
    Written { external_id: String },
    /// Every delivery fails, retryably.
    Retryable(String),
    /// Every delivery fails, retryably, and the destination asks to wait.
    RetryAfter(Duration),
    /// Every delivery fails for good.
    Permanent(String),
    /// Only the first `n` deliveries written, and only `n` results returned.
    TooFew(usize),
    /// The call panics.
    Panic,
    /// The call never returns.
    Hang,
    /// Every delivery written, after a delay (a late confirmation).
    Delay(Duration),
    /// Every delivery written (recorded as accepted), and then the call
    /// never returns: the destination has the data, weft never hears it.
    AcceptThenHang,
}

/// One delivery the sink accepted (its result was `Ok`).
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Which `write` call (0-based).
    pub call: usize,
    pub id: i64,
    pub entity_key: Option<String>,
    pub event_id: String,
    pub idempotency_key: String,
    pub attempt: u32,
    pub payload: serde_json::Value,
}

#[derive(Default)]
struct Inner {
    script: VecDeque<Step>,
    /// Failures left per entity key (retryable unless `permanent`).
    key_faults: HashMap<String, (usize, bool)>,
    calls: Vec<Vec<i64>>,
    accepted: Vec<Accepted>,
}

/// A sink scripted per call (see [`Step`]; once the script is used up,
/// every call is [`Step::Ok`]) that records what it accepted, in order.
#[derive(Default)]
pub struct ScriptedSink {
    inner: Mutex<Inner>,
    changed: Notify,
    folds_keys: bool,
    max_write_time: Option<Duration>,
}

impl ScriptedSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether batches may hold several rows of one key (an upsert sink).
    pub fn folds_keys(mut self, yes: bool) -> Self {
        self.folds_keys = yes;
        self
    }

    /// What [`Sink::max_write_time`] returns.
    pub fn max_write_time(mut self, d: Duration) -> Self {
        self.max_write_time = Some(d);
        self
    }

    /// Append steps to the script.
    pub fn then(&self, steps: impl IntoIterator<Item = Step>) -> &Self {
        self.lock().script.extend(steps);
        self
    }

    /// Append `step` `n` times.
    pub fn times(&self, n: usize, step: Step) -> &Self {
        self.then(std::iter::repeat_n(step, n))
    }

    /// The next `n` deliveries of `key` fail (retryable, or for good), the
    /// other deliveries of the same calls are written.
    pub fn fail_key(&self, key: &str, n: usize, permanent: bool) -> &Self {
        self.lock()
            .key_faults
            .insert(key.to_owned(), (n, permanent));
        self
    }

    /// Every delivery accepted so far, in acceptance order.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.lock().accepted.clone()
    }

    /// The outbox ids of each `write` call so far.
    pub fn calls(&self) -> Vec<Vec<i64>> {
        self.lock().calls.clone()
    }

    /// Per key, the event ids accepted, in acceptance order.
    pub fn by_key(&self) -> HashMap<Option<String>, Vec<String>> {
        let mut out: HashMap<Option<String>, Vec<String>> = HashMap::new();
        for a in self.lock().accepted.iter() {
            out.entry(a.entity_key.clone())
                .or_default()
                .push(a.event_id.clone());
        }
        out
    }

    /// Wait (woken by each write, no polling) until at least `n` deliveries
    /// were accepted; `Err` with what was seen when `within` passes first.
    pub async fn wait_for_writes(&self, n: usize, within: Duration) -> Result<(), String> {
        self.wait(within, |i| i.accepted.len() >= n)
            .await
            .map_err(|(acc, calls)| {
                format!("{acc} of {n} deliveries accepted in {calls} calls within {within:?}")
            })
    }

    /// Wait until at least `n` write calls started (a call counts when it
    /// starts, before any scripted delay, hang or panic).
    pub async fn wait_for_calls(&self, n: usize, within: Duration) -> Result<(), String> {
        self.wait(within, |i| i.calls.len() >= n)
            .await
            .map_err(|(acc, calls)| {
                format!("{calls} of {n} calls ({acc} deliveries accepted) within {within:?}")
            })
    }

    async fn wait(
        &self,
        within: Duration,
        done: impl Fn(&Inner) -> bool,
    ) -> Result<(), (usize, usize)> {
        let deadline = Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let i = self.lock();
                if done(&i) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err((i.accepted.len(), i.calls.len()));
                }
            }
            let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a test sink: a panic while holding it (never, the lock is not held
        // across the scripted panic) leaves plain data; keep going
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record that call number `call` started.
    fn start(&self, batch: &[Delivery]) -> usize {
        let mut i = self.lock();
        i.calls.push(batch.iter().map(|d| d.id).collect());
        let call = i.calls.len() - 1;
        drop(i);
        self.changed.notify_waiters();
        call
    }

    /// Decide the results of call `call` and record what was accepted.
    fn run(&self, call: usize, batch: &[Delivery], step: &Step) -> Vec<WriteResult> {
        let mut i = self.lock();
        let mut out = Vec::with_capacity(batch.len());
        for (n, d) in batch.iter().enumerate() {
            let r = match step {
                Step::Ok | Step::Delay(_) | Step::AcceptThenHang => Ok(Written::default()),
                Step::Written { external_id } => Ok(Written {
                    external_id: Some(format!("{external_id}-{}", d.id)),
                    ..Written::default()
                }),
                Step::Retryable(m) => Err(SinkError::retryable(m.clone())),
                Step::RetryAfter(after) => Err(SinkError {
                    retry_after: Some(*after),
                    ..SinkError::retryable("429 slow down")
                }),
                Step::Permanent(m) => Err(SinkError::permanent(m.clone())),
                Step::TooFew(k) if n >= *k => break,
                Step::TooFew(_) => Ok(Written::default()),
                // handled in `write` before they get here
                Step::Panic | Step::Hang => Ok(Written::default()),
            };
            let r = match (r, d.entity_key.as_ref()) {
                (Ok(w), Some(k)) => match i.key_faults.get_mut(k) {
                    Some((left, permanent)) if *left > 0 => {
                        *left -= 1;
                        if *permanent {
                            Err(SinkError::permanent(format!("scripted failure of key {k}")))
                        } else {
                            Err(SinkError::retryable(format!("scripted failure of key {k}")))
                        }
                    }
                    _ => Ok(w),
                },
                (r, _) => r,
            };
            if r.is_ok() {
                i.accepted.push(Accepted {
                    call,
                    id: d.id,
                    entity_key: d.entity_key.clone(),
                    event_id: d.event_id.clone(),
                    idempotency_key: d.idempotency_key.clone(),
                    attempt: d.attempt,
                    payload: d.payload.clone(),
                });
            }
            out.push(r);
        }
        out
    }
}

impl Sink for ScriptedSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(async move {
            let step = self.lock().script.pop_front().unwrap_or(Step::Ok);
            let call = self.start(batch);
            match step {
                Step::Panic => panic!("scripted sink panic"),
                Step::Hang => {
                    std::future::pending::<()>().await;
                    Vec::new()
                }
                Step::AcceptThenHang => {
                    self.run(call, batch, &step);
                    self.changed.notify_waiters();
                    std::future::pending::<()>().await;
                    Vec::new()
                }
                Step::Delay(d) => {
                    tokio::time::sleep(d).await;
                    let r = self.run(call, batch, &step);
                    self.changed.notify_waiters();
                    r
                }
                step => {
                    let r = self.run(call, batch, &step);
                    self.changed.notify_waiters();
                    r
                }
            }
        })
    }

    fn folds_keys(&self) -> bool {
        self.folds_keys
    }

    fn max_write_time(&self, batch_len: usize) -> Duration {
        let _ = batch_len;
        self.max_write_time.unwrap_or(Duration::from_secs(120))
    }
}

/// A delivery policy for tests: short backoffs, `max_attempts` tries.
pub fn policy(batch_size: usize, concurrency: usize, max_attempts: u32) -> DeliveryPolicy {
    DeliveryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        multiplier: 2.0,
        concurrency,
        batch_size,
        on_dead_letter: OnDeadLetter::Continue,
        backlog_high_water: 1_000_000,
    }
}

/// Enqueue one event per row of `flow` to `dest`, each with its entity key
/// and payload; event ids are `{prefix}-{n}` (n from 0). One transaction.
pub async fn enqueue(
    journal: &dyn Journal,
    flow: &str,
    dest: &str,
    prefix: &str,
    rows: &[(Option<&str>, serde_json::Value)],
) -> Result<Applied, StoreError> {
    let now = now_ms();
    let events = rows
        .iter()
        .enumerate()
        .map(|(n, (key, payload))| {
            let id = format!("{prefix}-{n}");
            NewEvent {
                event_id: id.clone(),
                correlation_id: format!("c-{id}"),
                received_at: now,
                event_time: now,
                source_version: None,
                group_id: None,
                traceparent: None,
                tracestate: None,
                attributes: format!("{{\"id\":\"{id}\",\"type\":\"t\"}}"),
                payload: payload.to_string(),
                outcomes: vec![FlowOutcome::Routed {
                    flow: flow.to_owned(),
                    deliveries: vec![NewDelivery {
                        destination: dest.to_owned(),
                        entity_key: key.map(str::to_owned),
                        idempotency_key: format!("{flow}:{dest}:{id}"),
                        payload: payload.to_string(),
                        delivered: false,
                    }],
                }],
            }
        })
        .collect();
    journal
        .ingest(IngestBatch {
            source: format!("src-{flow}"),
            dedupe: Dedupe::Position,
            events,
            checkpoint: None,
            fence: None,
        })
        .await
}

/// A lane running on its own task.
pub struct RunningLane {
    pub handle: Arc<LaneHandle>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl RunningLane {
    /// Start a lane of `flow` to `dest`.
    pub fn start(
        flow: &str,
        dest: &str,
        policy: DeliveryPolicy,
        sink: Arc<dyn Sink>,
        guard: Arc<Guard>,
        journal: Arc<dyn Journal>,
    ) -> RunningLane {
        let handle = Arc::new(LaneHandle::new(flow, dest, 0, policy.backlog_high_water));
        let shutdown = CancellationToken::new();
        let lane = Lane {
            flow: flow.to_owned(),
            dest: dest.to_owned(),
            policy,
            sink,
            guard,
            journal,
            handle: handle.clone(),
            shutdown: shutdown.clone(),
            redact: false,
            identity: None,
            references: None,
            tracer: crate::telemetry::Tracer::off(),
            membership: crate::lease::Membership::single(),
        };
        RunningLane {
            handle,
            shutdown,
            task: tokio::spawn(lane.run()),
        }
    }

    /// Wake the lane (new rows).
    pub fn wake(&self) {
        self.handle.wake.notify_one();
    }

    /// Stop it the way the hub does (finish writes in flight); `Err` when
    /// it does not end within `within`.
    pub async fn stop(self, within: Duration) -> Result<(), String> {
        self.shutdown.cancel();
        match tokio::time::timeout(within, self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("the lane task failed: {e}")),
            Err(_) => Err(format!("the lane did not stop within {within:?}")),
        }
    }

    /// A crash: the lane and its writes in flight vanish, nothing settled.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A guard without breaker or rate limit.
pub fn open_guard(dest: &str) -> Arc<Guard> {
    Arc::new(Guard::new(dest, None, None))
}
