//! Ingest: a source's batch -> filter, key, mapping per flow -> one store
//! transaction (inbox + outbox + DLQ + checkpoint).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use serde_json::Value;
use weft_connectors::{Batch, Ingest, IngestError, Receipt, Record};
use weft_core::config::Flow;
use weft_core::event::idempotency_key;
use weft_store::{
    Dedupe, DriftBatch, FlowOutcome, IngestBatch, Journal, NewDelivery, NewEvent, Stage, now_ms,
};

use crate::delivery::LaneHandle;
use crate::metrics as m;

/// The [`Ingest`] of one source system.
pub struct Ingestor {
    pub(crate) system: String,
    pub(crate) flows: Vec<Arc<Flow>>,
    pub(crate) journal: Arc<dyn Journal>,
    /// How this source's events are deduplicated.
    pub(crate) dedupe: Dedupe,
    /// The delivery lanes of these flows: woken after each commit, and
    /// checked for backpressure before accepting.
    pub(crate) lanes: Vec<Arc<LaneHandle>>,
    pub(crate) accepting: Arc<AtomicBool>,
    /// The epoch of this node's lease of the source, carried by every
    /// batch (`IngestBatch::fence`) when the source runs under a lease
    /// (`crate::lease`); `None` for webhooks and a single hub's store.
    pub(crate) fence: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// Drift detection of this source's stream.
    pub(crate) drift: Option<Arc<crate::drift::Tracker>>,
    /// A span per record and per mapping when traces are on.
    pub(crate) tracer: crate::telemetry::Tracer,
}

/// Per record of a prepared batch, when timed (traces on): the times its
/// flows started, then the time the last one ended (`flows + 1` values).
/// Empty when not timed.
pub(crate) type Timings = Vec<Vec<std::time::SystemTime>>;

/// Run every flow of `system` over a batch (CPU work, no I/O).
pub fn prepare(system: &str, flows: &[Arc<Flow>], batch: Batch) -> IngestBatch {
    prepare_with(system, flows, batch, None)
}

/// Deepest JSON nesting a stored payload may have: the JSON parser reading
/// it back at delivery stops at 128 levels.
pub const MAX_DEPTH: usize = 127;

/// Whether `v` nests deeper than [`MAX_DEPTH`] (walked without recursion).
pub fn too_deep(v: &Value) -> bool {
    let mut stack: Vec<(&Value, usize)> = vec![(v, 1)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(m) => Box::new(m.values()),
            _ => continue,
        };
        if d > MAX_DEPTH {
            return true;
        }
        stack.extend(children.map(|c| (c, d + 1)));
    }
    false
}

/// [`prepare`], learning each record's shape with `drift` (records that
/// drift are quarantined by flows with `on_drift: quarantine`).
pub fn prepare_with(
    system: &str,
    flows: &[Arc<Flow>],
    batch: Batch,
    drift: Option<&crate::drift::Tracker>,
) -> IngestBatch {
    let drifted = observe(&batch, drift);
    prepare_observed(system, flows, batch, drifted, false).0
}

/// What `drift` makes of each record of `batch`, in the batch's order (one
/// thread: which record is the first to show a new shape, and so which
/// records are quarantined, never depends on thread timing; review P1-10).
/// Empty without a tracker.
fn observe(batch: &Batch, drift: Option<&crate::drift::Tracker>) -> Vec<Option<String>> {
    let Some(t) = drift else {
        return Vec::new();
    };
    batch
        .records
        .iter()
        .map(|r| match r {
            Record::Good(ev) => t.observe(&ev.data),
            Record::Bad(_) => None,
        })
        .collect()
}

/// [`prepare_with`] with the drift already observed (`drifted[i]` for the
/// batch's record `i`; shorter, or empty: no drift); `timed`: with each
/// record's flow [`Timings`].
fn prepare_observed(
    system: &str,
    flows: &[Arc<Flow>],
    batch: Batch,
    drifted: Vec<Option<String>>,
    timed: bool,
) -> (IngestBatch, Timings) {
    let mut drifted = drifted.into_iter();
    let mut timings: Timings = Vec::new();
    let events = batch
        .records
        .into_iter()
        .map(|r| (r, drifted.next().flatten()))
        .map(|(r, drifted)| match r {
            Record::Good(ev) => {
                // `$event` is built only for a program that reads it, or a
                // rejection that stores it
                let attrs = std::cell::OnceCell::new();
                let mut times = Vec::new();
                let outcomes: Vec<FlowOutcome> = flows
                    .iter()
                    .map(|f| {
                        if timed {
                            times.push(std::time::SystemTime::now());
                        }
                        crate::drift::quarantine(f, drifted.as_deref()).unwrap_or_else(|| {
                            run_flow_with(f, &ev.source, &ev.id, &ev.data, &|| {
                                attrs.get_or_init(|| ev.attributes())
                            })
                        })
                    })
                    .collect();
                if timed {
                    times.push(std::time::SystemTime::now());
                    timings.push(times);
                }
                // the event's own payload and attributes are stored only with
                // a rejection (its DLQ entry); routed rows carry their mapped
                // payloads
                let rejected = outcomes
                    .iter()
                    .any(|o| matches!(o, FlowOutcome::Rejected { .. }));
                let (attributes, payload) = if rejected {
                    (
                        attrs.get_or_init(|| ev.attributes()).to_string(),
                        ev.data.to_string(),
                    )
                } else {
                    (String::new(), String::new())
                };
                NewEvent {
                    event_id: ev.id,
                    correlation_id: ev.correlationid,
                    received_at: now_ms(),
                    event_time: ev.time.timestamp_millis(),
                    source_version: None,
                    group_id: None,
                    traceparent: ev.traceparent,
                    tracestate: ev.tracestate,
                    attributes,
                    payload,
                    outcomes,
                }
            }
            Record::Bad(b) => {
                if timed {
                    // not mapped: no mapping spans
                    timings.push(Vec::new());
                }
                NewEvent {
                    outcomes: flows
                        .iter()
                        .map(|f| {
                            FlowOutcome::rejected(
                                f.name.clone(),
                                Stage::Parse,
                                // sources usually start the error with its location already
                                if b.error.starts_with(&b.location) {
                                    b.error.clone()
                                } else {
                                    format!("{}: {}", b.location, b.error)
                                },
                            )
                        })
                        .collect(),
                    event_id: b.id,
                    correlation_id: b.correlation_id,
                    received_at: now_ms(),
                    event_time: now_ms(),
                    source_version: None,
                    group_id: None,
                    traceparent: None,
                    tracestate: None,
                    attributes: serde_json::json!({"location": b.location}).to_string(),
                    payload: b.raw,
                }
            }
        })
        .collect();
    let prepared = IngestBatch {
        source: system.to_owned(),
        dedupe: Dedupe::Id,
        events,
        checkpoint: batch.checkpoint.map(|c| (c.key, c.value)),
        fence: None,
    };
    (prepared, timings)
}

/// What one flow makes of one event. Pure: also used by `weft dlq replay`
/// and dry runs.
pub fn run_flow(
    flow: &Flow,
    source: &str,
    event_id: &str,
    data: &Value,
    attrs: &Value,
) -> FlowOutcome {
    run_flow_with(flow, source, event_id, data, &|| attrs)
}

/// [`run_flow`] with the event's attributes made only when a program reads
/// `$event` (a mapping taken by the fast path does not).
fn run_flow_with<'v>(
    flow: &Flow,
    source: &str,
    event_id: &str,
    data: &Value,
    attrs: &dyn Fn() -> &'v Value,
) -> FlowOutcome {
    let reject = |what: &str, e: &dyn std::fmt::Display| {
        FlowOutcome::rejected(flow.name.clone(), Stage::Map, format!("{what}: {e}"))
    };
    if let Some(filter) = &flow.filter {
        match filter.test(data.clone(), attrs().clone()) {
            Ok(true) => {}
            Ok(false) => {
                return FlowOutcome::Filtered {
                    flow: flow.name.clone(),
                };
            }
            Err(e) => return reject("filter failed", &e),
        }
    }
    let entity_key = match &flow.key {
        None => None,
        Some(p) => match p.eval_with(data, || attrs().clone(), &[]) {
            Ok(Value::String(s)) => Some(s),
            Ok(Value::Null) => None,
            Ok(v) => Some(v.to_string()),
            Err(e) => return reject("key failed", &e),
        },
    };
    let keyed_reject = |what: String| FlowOutcome::Rejected {
        flow: flow.name.clone(),
        stage: Stage::Map,
        error: what,
        entity_key: entity_key.clone(),
        hold: flow
            .destinations
            .iter()
            .filter(|d| d.delivery.on_dead_letter == weft_core::config::OnDeadLetter::HoldKey)
            .map(|d| d.system.clone())
            .collect(),
    };
    let mapped = match &flow.mapping {
        None => data.clone(),
        Some(p) => match p.eval_with(data, || attrs().clone(), &[]) {
            Ok(v) => v,
            Err(e) => return keyed_reject(format!("mapping failed: {e}")),
        },
    };
    if let Err(o) = crate::contracts::check_entity(flow, &mapped) {
        return o;
    }
    if let Some(rules) = &flow.identity {
        // the destinations' mappings run at delivery, on the canonical record
        let Some(external_id) = entity_key.clone() else {
            return keyed_reject(
                "the flow's key gave null: a record without an id cannot be linked to its canonical record"
                    .into(),
            );
        };
        let Value::Object(fields) = mapped else {
            return keyed_reject(format!(
                "the mapping gave {}, not an object of the record's canonical fields",
                kind_of(&mapped)
            ));
        };
        let changed_at = match fields.get("_time") {
            None | Some(Value::Null) => None,
            Some(t) => match change_time(t) {
                Some(ms) => Some(ms),
                None => {
                    return keyed_reject(format!(
                        "`_time` is {t}: expected an RFC 3339 time or milliseconds since 1970"
                    ));
                }
            },
        };
        return FlowOutcome::Canonical {
            flow: flow.name.clone(),
            report: Box::new(weft_store::CanonicalReport {
                rules: rules.clone(),
                external_id,
                fields,
                changed_at,
            }),
        };
    }
    let mut deliveries = Vec::with_capacity(flow.destinations.len());
    for d in &flow.destinations {
        let payload = match &d.mapping {
            None => mapped.clone(),
            Some(p) => match p.eval_with(&mapped, || attrs().clone(), &[]) {
                Ok(v) => v,
                Err(e) => {
                    return keyed_reject(format!("mapping for `{}` failed: {e}", d.system));
                }
            },
        };
        if too_deep(&payload) {
            return keyed_reject(format!(
                "the payload for `{}` nests deeper than {MAX_DEPTH} levels, more than can be stored and read back",
                d.system
            ));
        }
        if let Err(o) = crate::contracts::check_destination(flow, d, &payload) {
            return o;
        }
        deliveries.push(NewDelivery {
            destination: d.system.clone(),
            entity_key: entity_key.clone(),
            idempotency_key: idempotency_key(&flow.name, &d.system, source, event_id),
            payload: payload.to_string(),
        });
    }
    FlowOutcome::Routed {
        flow: flow.name.clone(),
        deliveries,
    }
}

/// A change time: RFC 3339 text, or milliseconds since 1970.
fn change_time(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis()),
        _ => None,
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Batches at least this big are mapped in two halves on two threads.
const SPLIT_AT: usize = 512;

impl Ingestor {
    /// [`prepare_with`] off the async workers (filters and mappings are CPU
    /// work); a big batch in two halves at once. The events keep their order
    /// and the checkpoint stays with the batch.
    async fn prepare_parallel(
        &self,
        batch: Batch,
        timed: bool,
    ) -> Result<(IngestBatch, Timings), IngestError> {
        let (mut b, t) = self.prepare_halves(batch, timed).await?;
        b.dedupe = self.dedupe;
        Ok((b, t))
    }

    async fn prepare_halves(
        &self,
        batch: Batch,
        timed: bool,
    ) -> Result<(IngestBatch, Timings), IngestError> {
        prepare_split(
            self.system.clone(),
            self.flows.clone(),
            self.drift.clone(),
            batch,
            timed,
        )
        .await
        .map_err(|e| IngestError::Store(format!("mapping task failed: {e}")))
    }
}

/// [`prepare_with`] on the blocking pool; a batch of [`SPLIT_AT`] records
/// or more is mapped in two halves at once, after its drift was observed in
/// its order.
async fn prepare_split(
    system: String,
    flows: Vec<Arc<Flow>>,
    drift: Option<Arc<crate::drift::Tracker>>,
    batch: Batch,
    timed: bool,
) -> Result<(IngestBatch, Timings), tokio::task::JoinError> {
    if batch.records.len() < SPLIT_AT {
        return tokio::task::spawn_blocking(move || {
            let drifted = observe(&batch, drift.as_deref());
            prepare_observed(&system, &flows, batch, drifted, timed)
        })
        .await;
    }
    // the drift of the whole batch first, in its order; then the mappings
    // in two halves at once
    let (mut batch, mut drifted) = tokio::task::spawn_blocking(move || {
        let d = observe(&batch, drift.as_deref());
        (batch, d)
    })
    .await?;
    let mid = batch.records.len() / 2;
    let tail = Batch {
        records: batch.records.split_off(mid),
        checkpoint: batch.checkpoint.take(),
    };
    let tail_drift = if drifted.len() > mid {
        drifted.split_off(mid)
    } else {
        Vec::new()
    };
    let run = |b: Batch, d: Vec<Option<String>>| {
        let (system, flows) = (system.clone(), flows.clone());
        tokio::task::spawn_blocking(move || prepare_observed(&system, &flows, b, d, timed))
    };
    let (head, tail) = tokio::join!(run(batch, drifted), run(tail, tail_drift));
    let ((mut head, mut times), (tail, tail_times)) = (head?, tail?);
    head.events.extend(tail.events);
    head.checkpoint = tail.checkpoint;
    times.extend(tail_times);
    Ok((head, times))
}

impl Ingest for Ingestor {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            if !self.accepting.load(Ordering::Acquire) {
                return Err(IngestError::Unavailable("weft is shutting down".into()));
            }
            if let Some(l) = self.lanes.iter().find(|l| l.over_high_water()) {
                m::backpressure(&self.system);
                return Err(IngestError::Unavailable(format!(
                    "backlog of flow `{}` to `{}` is over its high-water mark ({} pending)",
                    l.flow, l.dest, l.high_water
                )));
            }
            // a span per record (none with traces off); the rows store
            // their contexts
            let spans = self.tracer.receive(&self.system, &batch);
            let (mut prepared, timings) = self.prepare_parallel(batch, !spans.is_empty()).await?;
            prepared.fence = self.fence.as_ref().map(|f| f.load(Ordering::Acquire));
            crate::telemetry::stamp(&spans, &mut prepared.events, &timings);
            if let Some(why) = crate::contracts::refusal(&prepared) {
                spans.into_iter().for_each(|s| s.end(Err("refused")));
                return Err(IngestError::Rejected(why));
            }
            let routed = routed_counts(&prepared);
            // marks the lanes as being ingested into until dropped (also when
            // this future is dropped mid-way)
            let _marks: Vec<IngestMark<'_>> =
                self.lanes.iter().map(|l| IngestMark::new(l)).collect();
            let applied = self.journal.ingest(prepared).await;
            for l in &self.lanes {
                if let Ok(a) = &applied
                    && a.changed > 0
                {
                    // approximate (duplicates included); the gauge task re-reads it from the store
                    let n = routed
                        .get(&(l.flow.clone(), l.dest.clone()))
                        .copied()
                        .unwrap_or(0);
                    l.backlog.fetch_add(n, Ordering::SeqCst);
                    l.wake.notify_one();
                }
            }
            drop(_marks);
            let committed = applied.as_ref().map(|_| ()).map_err(|_| "store_error");
            spans.into_iter().for_each(|s| s.end(committed));
            let applied = applied.map_err(|e| IngestError::Store(e.to_string()))?;
            // exactly what the store counted (duplicates excluded)
            for c in &applied.flows {
                m::flow_ingested(&c.flow, c.received, c.filtered, c.rejected);
            }
            if applied.duplicates > 0 {
                m::duplicates(&self.system, applied.duplicates as u64);
            }
            if let Some(b) = self.drift.as_ref().and_then(|t| t.take()) {
                let counted = DriftBatch {
                    source: b.source.clone(),
                    shape: None,
                    events: b.events.clone(),
                };
                match self.journal.record_drift(b).await {
                    Ok(_) => crate::drift::count_saved(&counted),
                    Err(e) => {
                        tracing::warn!(source = %self.system, error = %e, "cannot save drift events")
                    }
                }
            }
            Ok(Receipt {
                accepted: applied.changed,
                duplicates: applied.duplicates,
            })
        })
    }

    fn checkpoint(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
        let key = key.to_owned();
        Box::pin(async move {
            let journal = self.journal.clone();
            let system = self.system.clone();
            tokio::task::spawn_blocking(move || journal.read().checkpoint(&system, &key))
                .await
                .map_err(|e| IngestError::Store(e.to_string()))?
                .map_err(|e| IngestError::Store(e.to_string()))
        })
    }
}

fn routed_counts(b: &IngestBatch) -> std::collections::HashMap<(String, String), i64> {
    let mut m: std::collections::HashMap<(String, String), i64> = Default::default();
    for e in &b.events {
        for o in &e.outcomes {
            if let FlowOutcome::Routed { flow, deliveries } = o {
                for d in deliveries {
                    *m.entry((flow.clone(), d.destination.clone())).or_default() += 1;
                }
            }
        }
    }
    m
}

/// A lane being ingested into: counted in `ingesting` while alive, then in
/// `ingested` (see [`LaneHandle`]).
struct IngestMark<'a>(&'a LaneHandle);

impl<'a> IngestMark<'a> {
    fn new(l: &'a LaneHandle) -> Self {
        l.ingesting.fetch_add(1, Ordering::SeqCst);
        IngestMark(l)
    }
}

impl Drop for IngestMark<'_> {
    fn drop(&mut self) {
        self.0.ingested.fetch_add(1, Ordering::SeqCst);
        self.0.ingesting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use weft_core::event::Event;

    fn flows() -> Vec<Arc<Flow>> {
        let text = r#"systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
  out:
    sink:
      jsonl:
        path: out.jsonl
flows:
  f:
    from: crm
    on_drift: quarantine
    to: [out]
"#;
        let cfg = weft_core::config::load_str(std::path::Path::new("weft.yaml"), text, &|_| None)
            .unwrap();
        cfg.flows
    }

    /// Review P1-10: the two halves of a big batch used to observe drift at
    /// once, so which shape a new source learned first (and so which half
    /// was quarantined) depended on thread timing. Observed in the batch's
    /// order, the first half's shape is learned and only the second half,
    /// whose `a` became an array, is quarantined, on every run.
    #[test]
    fn a_split_batch_quarantines_the_same_records_every_time() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let flows = flows();
        let n = 2 * SPLIT_AT;
        for run in 0..40 {
            let records = (0..n)
                .map(|i| {
                    let a = if i < n / 2 { json!("x") } else { json!(["x"]) };
                    let data = json!({"id": i, "a": a});
                    Record::Good(Event::new(
                        format!("e{i}"),
                        "crm",
                        "crm.webhook",
                        None,
                        data,
                    ))
                })
                .collect();
            let batch = Batch {
                records,
                checkpoint: None,
            };
            let tracker = Arc::new(crate::drift::Tracker::new("crm", vec![]));
            let b = rt
                .block_on(prepare_split(
                    "crm".into(),
                    flows.clone(),
                    Some(tracker),
                    batch,
                    false,
                ))
                .unwrap()
                .0;
            let quarantined: Vec<usize> = b
                .events
                .iter()
                .enumerate()
                .filter(|(_, e)| {
                    matches!(&e.outcomes[0], FlowOutcome::Rejected { error, .. } if error.starts_with("drift:"))
                })
                .map(|(i, _)| i)
                .collect();
            assert_eq!(
                quarantined,
                (n / 2..n).collect::<Vec<_>>(),
                "run {run}: the second half, and only it, is quarantined"
            );
        }
    }
}
