//! The in-memory journal: the [`Journal`] contract over one mutex, for lane
//! and property tests (and as the reference the other engines are checked
//! against by `tests/conformance.rs`).
//!
//! Every operation takes the lock once. Operations that can fail (ingest,
//! replay, discard) validate everything first and then apply steps that
//! cannot fail, so an `Err` leaves the state exactly as it was. Nothing is
//! durable: [`MemoryJournal::restart`] stands for a crash and restart (every
//! lease is void, everything else stays).
//!
//! Decisions where the contract leaves room (the conformance suite pins each,
//! so every engine makes the same ones):
//! - rows with the same `order_seq` (a map-stage replay whose new outcome
//!   routes several deliveries keeps the entry's one for all of them) are
//!   ordered by id;
//! - lease tokens are journal-wide and never reused, restarts included, so a
//!   settlement from before a restart is stale;
//! - a replay's new outcome must belong to the entry's flow, and no flow
//!   outcome can be rejected at the deliver stage (`Invalid` otherwise);
//! - `counts` also lists lanes that only have pending rows;
//! - a parse/map-stage entry is superseded by a later delivered write of its
//!   key from its own flow (any destination) or at a destination the new
//!   outcome writes with that key (any flow: two flows may share a
//!   destination's key queue);
//! - a replayed parse/map-stage entry's new rows and entries take its
//!   `order_seq` only when they have its key; the others (and all of them
//!   when the entry had no key, so no place) go to the end of their queues.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use futures::future::BoxFuture;
use serde_json::json;

use crate::journal::{
    ClaimRequest, Claimed, Journal, JournalRead, LaneId, Outcome, Refusal, Replay, Settle, Settled,
};
use crate::{
    Applied, CrosswalkRow, DLQ_PAGE, Dedupe, DlqEntry, DlqFilter, DriftBatch, DriftEvent,
    FlowCounts, FlowOutcome, IngestBatch, NewDelivery, OutboxRow, Stage, StoreError, now_ms,
};

/// A [`Journal`] kept in memory. Cheap to create; share it as
/// `Arc<MemoryJournal>` (or `Arc<dyn Journal>`).
#[derive(Default)]
pub struct MemoryJournal {
    state: Mutex<State>,
    faults: Mutex<Option<Faults>>,
}

/// Injected failures: the next `left` writes fail with `error()`.
struct Faults {
    left: usize,
    error: Box<dyn Fn() -> StoreError + Send + Sync>,
}

impl MemoryJournal {
    pub fn new() -> Self {
        Self::default()
    }

    /// A crash and restart: every lease is void (claimed rows are claimable
    /// again at once, settlements with their tokens are stale); nothing else
    /// changes.
    pub fn restart(&self) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        for r in s.outbox.values_mut() {
            r.token = None;
            r.lease_until = 0;
        }
        Ok(())
    }

    /// The CloudEvents attributes (JSON text) kept with a parse/map-stage
    /// DLQ entry, for replaying it through its flow.
    pub fn dlq_attributes(&self, id: i64) -> Result<Option<String>, StoreError> {
        Ok(self.lock()?.dlq.get(&id).and_then(|e| e.attributes.clone()))
    }

    /// Recorded drift events, oldest first; `source` filters.
    pub fn drift_events(&self, source: Option<&str>) -> Result<Vec<DriftEvent>, StoreError> {
        Ok(self
            .lock()?
            .drift
            .iter()
            .filter(|e| source.is_none_or(|s| e.source == s))
            .cloned()
            .collect())
    }

    /// The saved shape of a source stream (JSON).
    pub fn stream_shape(&self, source: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock()?.shapes.get(source).cloned())
    }

    /// Fault injection: the next `writes` operations (ingest, claim, settle,
    /// replay, discard, prune, record_drift) fail with `error()` and change
    /// nothing, the way a store that cannot commit would. Reads still work.
    pub fn fail_next(
        &self,
        writes: usize,
        error: impl Fn() -> StoreError + Send + Sync + 'static,
    ) -> Result<(), StoreError> {
        *self.faults.lock().map_err(|_| poisoned())? = Some(Faults {
            left: writes,
            error: Box::new(error),
        });
        Ok(())
    }

    /// The state for a write, or the injected failure.
    fn write(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        let mut faults = self.faults.lock().map_err(|_| poisoned())?;
        if let Some(f) = faults.as_mut().filter(|f| f.left > 0) {
            f.left -= 1;
            return Err((f.error)());
        }
        drop(faults);
        self.lock()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        // apply steps never fail midway, but a panic inside one (a bug) may
        // have left the state half changed: refuse to go on with it
        self.state.lock().map_err(|_| poisoned())
    }
}

fn poisoned() -> StoreError {
    StoreError::Failed(
        "the in-memory journal is unusable: an operation panicked while holding it".into(),
    )
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    received: i64,
    filtered: i64,
    rejected: i64,
    delivered: i64,
    dead_lettered: i64,
    discarded: i64,
    /// Flow-level rows: when a record was last received.
    last_received_at: Option<i64>,
}

#[derive(Debug, Clone)]
struct Row {
    row: OutboxRow,
    token: Option<i64>,
    lease_until: i64,
}

impl Row {
    fn leased(&self, now: i64) -> bool {
        self.token.is_some() && self.lease_until > now
    }

    /// Not leased and not waiting for a retry.
    fn ready(&self, now: i64) -> bool {
        !self.leased(now) && self.row.next_at <= now
    }
}

/// Where an event's rows and entries come from: an ingested event, or a
/// parse/map-stage entry being replayed.
#[derive(Debug, Clone)]
struct Origin {
    source: String,
    event_id: String,
    correlation_id: String,
    received_at: i64,
    event_time: i64,
    source_version: Option<String>,
    group_id: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    attributes: String,
    payload: String,
}

#[derive(Debug, Clone)]
struct Entry {
    public: DlqEntry,
    order_seq: i64,
    /// Later writes of the same key that were delivered: one per lane, the
    /// last one.
    superseded: Vec<Superseder>,
    event_time: i64,
    source_version: Option<String>,
    group_id: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    /// The event's attributes (parse/map stage): a replay re-runs the flow.
    attributes: Option<String>,
}

/// A later write of a dead entry's key, delivered.
#[derive(Debug, Clone)]
struct Superseder {
    flow: String,
    destination: String,
    event_id: String,
}

#[derive(Debug, Clone)]
struct Crosswalk {
    row: CrosswalkRow,
    /// Bumped on every upsert: newest first is highest first.
    touched: u64,
}

#[derive(Default)]
struct State {
    next_order: i64,
    next_outbox: i64,
    next_dlq: i64,
    next_token: i64,
    next_touch: u64,
    next_drift: i64,
    /// `(source, event id)` -> received_at, for [`Dedupe::Id`] sources.
    inbox: HashMap<(String, String), i64>,
    outbox: HashMap<i64, Row>,
    /// `(order_seq, id)` of each lane's rows.
    by_lane: HashMap<LaneId, BTreeSet<(i64, i64)>>,
    /// `(order_seq, id)` of each `(destination, key)` queue.
    by_queue: HashMap<(String, String), BTreeSet<(i64, i64)>>,
    dlq: BTreeMap<i64, Entry>,
    /// Dead entries with a key, by key (for superseding).
    dead_keyed: HashMap<String, BTreeSet<i64>>,
    /// `(destination, key, dlq id)`: the key waits at that destination.
    holds: BTreeSet<(String, String, i64)>,
    counts: BTreeMap<(String, String), Counts>,
    /// `(source, key)` → (value, saved at ms).
    checkpoints: HashMap<(String, String), (String, i64)>,
    crosswalk: HashMap<(String, String, String), Crosswalk>,
    shapes: HashMap<String, String>,
    drift: Vec<DriftEvent>,
    /// The attempt trail, oldest first.
    attempts: Vec<crate::AttemptRow>,
    /// Topic messages by sequence; the last sequence given.
    topics: BTreeMap<i64, (String, crate::TopicMessage)>,
    topic_ids: HashSet<(String, String)>,
    next_topic_seq: i64,
}

fn invalid_stage(flow: &str, stage: Stage) -> Option<StoreError> {
    (stage == Stage::Deliver).then(|| {
        StoreError::Invalid(format!(
            "flow {flow}: a flow outcome is rejected at the parse or map stage, not at deliver"
        ))
    })
}

/// Where a replayed parse/map-stage entry stood in its key's order.
struct Place {
    order_seq: i64,
    key: String,
}

/// The delivered later write that makes replaying `e` regress a
/// destination: for a deliver-stage entry, any (they are all of its
/// destination); for a parse/map-stage one, one of its own flow, or one at a
/// destination the new outcome writes with the entry's key.
fn superseded_by<'a>(e: &'a Entry, outcome: Option<&FlowOutcome>) -> Option<&'a Superseder> {
    if !e.public.destination.is_empty() {
        return e.superseded.last();
    }
    let writes: Vec<&str> = match outcome {
        Some(FlowOutcome::Routed { deliveries, .. }) => deliveries
            .iter()
            .filter(|d| d.entity_key.is_some() && d.entity_key == e.public.entity_key)
            .map(|d| d.destination.as_str())
            .collect(),
        _ => Vec::new(),
    };
    e.superseded
        .iter()
        .rev()
        .find(|s| s.flow == e.public.flow || writes.contains(&s.destination.as_str()))
}

fn check_outcome(o: &FlowOutcome) -> Result<(), StoreError> {
    match o {
        FlowOutcome::Canonical { flow, .. } => Err(StoreError::Invalid(format!(
            "flow `{flow}` feeds canonical records, which only the SQLite store keeps for now"
        ))),
        FlowOutcome::Rejected { flow, stage, .. } => match invalid_stage(flow, *stage) {
            Some(e) => Err(e),
            None => Ok(()),
        },
        FlowOutcome::Routed { deliveries, .. } => deliveries
            .iter()
            .filter(|d| d.delivered)
            .try_for_each(crate::writer::check_delivered),
        _ => Ok(()),
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

impl State {
    fn bump(&mut self, flow: &str, dest: &str, f: impl FnOnce(&mut Counts)) {
        f(self
            .counts
            .entry((flow.to_owned(), dest.to_owned()))
            .or_default());
    }

    fn order(&mut self) -> i64 {
        self.next_order += 1;
        self.next_order
    }

    fn held(&self, dest: &str, key: &str) -> bool {
        let lo = (dest.to_owned(), key.to_owned(), i64::MIN);
        let hi = (dest.to_owned(), key.to_owned(), i64::MAX);
        self.holds.range(lo..=hi).next().is_some()
    }

    fn insert_row(&mut self, row: OutboxRow) {
        let at = (row.order_seq, row.id);
        self.by_lane
            .entry(LaneId::new(&row.flow, &row.destination))
            .or_default()
            .insert(at);
        if let Some(k) = &row.entity_key {
            self.by_queue
                .entry((row.destination.clone(), k.clone()))
                .or_default()
                .insert(at);
        }
        self.outbox.insert(
            row.id,
            Row {
                row,
                token: None,
                lease_until: 0,
            },
        );
    }

    fn remove_row(&mut self, id: i64) -> Option<Row> {
        let r = self.outbox.remove(&id)?;
        let at = (r.row.order_seq, r.row.id);
        let lane = LaneId::new(&r.row.flow, &r.row.destination);
        if let Some(set) = self.by_lane.get_mut(&lane) {
            set.remove(&at);
            if set.is_empty() {
                self.by_lane.remove(&lane);
            }
        }
        if let Some(k) = &r.row.entity_key {
            let q = (r.row.destination.clone(), k.clone());
            if let Some(set) = self.by_queue.get_mut(&q) {
                set.remove(&at);
                if set.is_empty() {
                    self.by_queue.remove(&q);
                }
            }
        }
        Some(r)
    }

    /// A new outbox row for `origin`, at the replayed entry's place when it
    /// is of the entry's key, else at the end.
    fn new_row(&mut self, flow: &str, d: &NewDelivery, o: &Origin, place: Option<&Place>) {
        let order_seq = self.place(place, d.entity_key.as_deref());
        self.next_outbox += 1;
        let row = OutboxRow {
            id: self.next_outbox,
            flow: flow.to_owned(),
            destination: d.destination.clone(),
            entity_key: d.entity_key.clone(),
            idempotency_key: d.idempotency_key.clone(),
            source: o.source.clone(),
            event_id: o.event_id.clone(),
            correlation_id: o.correlation_id.clone(),
            created_at: o.received_at,
            attempts: 0,
            next_at: 0,
            last_error: None,
            order_seq,
            payload: d.payload.clone(),
            event_time: o.event_time,
            source_version: o.source_version.clone(),
            group_id: o.group_id.clone(),
            traceparent: o.traceparent.clone(),
            tracestate: o.tracestate.clone(),
        };
        self.insert_row(row);
    }

    fn insert_entry(&mut self, e: Entry) {
        if let Some(k) = &e.public.entity_key {
            self.dead_keyed
                .entry(k.clone())
                .or_default()
                .insert(e.public.id);
        }
        self.dlq.insert(e.public.id, e);
    }

    /// The `order_seq` of a new row or entry of key `key`: the replayed
    /// entry's when the key is the entry's (it keeps its place in that key's
    /// order), else the next one (an entry without a key had no place).
    fn place(&mut self, place: Option<&Place>, key: Option<&str>) -> i64 {
        match (place, key) {
            (Some(p), Some(k)) if p.key == k => p.order_seq,
            _ => self.order(),
        }
    }

    /// An event's outcome for one flow, at ingest or through a replay.
    fn apply_outcome(&mut self, o: &Origin, out: &FlowOutcome, place: Option<&Place>, now: i64) {
        match out {
            FlowOutcome::Routed { flow, deliveries } => {
                self.bump(flow, "", |c| c.received += 1);
                for d in deliveries {
                    if d.delivered {
                        self.bump(flow, &d.destination, |c| c.delivered += 1);
                    } else {
                        self.new_row(flow, d, o, place);
                    }
                }
            }
            FlowOutcome::Filtered { flow } => self.bump(flow, "", |c| {
                c.received += 1;
                c.filtered += 1;
            }),
            // refused by `check_outcome` before anything is applied
            FlowOutcome::Canonical { .. } => {}
            FlowOutcome::Rejected {
                flow,
                stage,
                error,
                entity_key,
                hold,
            } => {
                self.bump(flow, "", |c| {
                    c.received += 1;
                    c.rejected += 1;
                });
                let order_seq = self.place(place, entity_key.as_deref());
                self.next_dlq += 1;
                let id = self.next_dlq;
                let history = json!([{
                    "at": now, "action": "rejected", "stage": stage.as_str(), "error": error
                }]);
                self.insert_entry(Entry {
                    public: DlqEntry {
                        id,
                        status: "dead".into(),
                        stage: stage.as_str().into(),
                        flow: flow.clone(),
                        destination: String::new(),
                        entity_key: entity_key.clone(),
                        idempotency_key: None,
                        source: o.source.clone(),
                        event_id: o.event_id.clone(),
                        correlation_id: o.correlation_id.clone(),
                        created_at: o.received_at,
                        failed_at: now,
                        attempts: 0,
                        error: error.clone(),
                        payload: o.payload.clone(),
                        history,
                        attributes: Some(o.attributes.clone()),
                        superseded_by: None,
                        order_seq: Some(order_seq),
                        resolved_at: None,
                        payload_sha256: None,
                    },
                    order_seq,
                    superseded: Vec::new(),
                    event_time: o.event_time,
                    source_version: o.source_version.clone(),
                    group_id: o.group_id.clone(),
                    traceparent: o.traceparent.clone(),
                    tracestate: o.tracestate.clone(),
                    attributes: Some(o.attributes.clone()),
                });
                if let Some(k) = entity_key {
                    for dest in hold {
                        self.holds.insert((dest.clone(), k.clone(), id));
                    }
                }
            }
        }
    }

    /// Ends a dead entry: its status, a history line, when, its holds; its
    /// payload is replaced by its hash.
    fn close_entry(&mut self, id: i64, status: &str, note: &str, now: i64) {
        if let Some(e) = self.dlq.get_mut(&id) {
            e.public.status = status.into();
            e.public.resolved_at = Some(now);
            e.public.payload_sha256 = Some(crate::payload_sha256(&e.public.payload));
            e.public.payload = String::new();
            if let Some(h) = e.public.history.as_array_mut() {
                h.push(json!({"at": now, "action": status, "note": note}));
            }
            if let Some(k) = &e.public.entity_key
                && let Some(set) = self.dead_keyed.get_mut(k)
            {
                set.remove(&id);
                if set.is_empty() {
                    self.dead_keyed.remove(k);
                }
            }
        }
        self.holds.retain(|(_, _, h)| *h != id);
    }

    /// The dead entry `id`, or why it cannot be acted on.
    fn dead(&self, id: i64) -> Result<&Entry, StoreError> {
        match self.dlq.get(&id) {
            None => Err(StoreError::NotFound(format!("no DLQ entry {id}"))),
            Some(e) if e.public.status != "dead" => Err(StoreError::Invalid(format!(
                "DLQ entry {id} is already {}",
                e.public.status
            ))),
            Some(e) => Ok(e),
        }
    }

    /// Whether a row of queue `(dest, key)` placed after `order_seq` is
    /// leased now.
    fn later_in_flight(&self, dest: &str, key: &str, order_seq: i64, now: i64) -> bool {
        self.by_queue
            .get(&(dest.to_owned(), key.to_owned()))
            .is_some_and(|q| {
                q.range((order_seq, i64::MAX)..)
                    .filter(|(s, _)| *s > order_seq)
                    .any(|(_, id)| self.outbox.get(id).is_some_and(|r| r.leased(now)))
            })
    }

    fn ingest(&mut self, b: IngestBatch) -> Result<Applied, StoreError> {
        for e in &b.events {
            for o in &e.outcomes {
                check_outcome(o)?;
            }
        }
        let now = now_ms();
        let mut applied = Applied::default();
        for e in b.events {
            if b.dedupe == Dedupe::Id {
                let k = (b.source.clone(), e.event_id.clone());
                if self.inbox.contains_key(&k) {
                    applied.duplicates += 1;
                    continue;
                }
                self.inbox.insert(k, e.received_at);
            }
            applied.changed += 1;
            let origin = Origin {
                source: b.source.clone(),
                event_id: e.event_id,
                correlation_id: e.correlation_id,
                received_at: e.received_at,
                event_time: e.event_time,
                source_version: e.source_version,
                group_id: e.group_id,
                traceparent: e.traceparent,
                tracestate: e.tracestate,
                attributes: e.attributes,
                payload: e.payload,
            };
            for o in &e.outcomes {
                self.apply_outcome(&origin, o, None, now);
                // what the metrics count: exactly the counter changes
                let flow = o.flow();
                match o {
                    FlowOutcome::Routed { .. } => applied.count(flow, |c| c.received += 1),
                    FlowOutcome::Filtered { .. } | FlowOutcome::Canonical { .. } => {
                        applied.count(flow, |c| {
                            c.received += 1;
                            c.filtered += 1;
                        })
                    }
                    FlowOutcome::Rejected { .. } => applied.count(flow, |c| {
                        c.received += 1;
                        c.rejected += 1;
                    }),
                }
                self.bump(flow, "", |c| c.last_received_at = Some(now));
            }
        }
        if let Some((key, value)) = b.checkpoint {
            self.checkpoints.insert((b.source, key), (value, now));
        }
        Ok(applied)
    }

    fn claim(&mut self, req: &ClaimRequest) -> Vec<Claimed> {
        let now = now_ms();
        let per_key = req.per_key.max(1);
        let mut picked: Vec<i64> = Vec::new();
        let mut taken: HashSet<i64> = HashSet::new();
        if let Some(lane) = self.by_lane.get(&req.lane) {
            for &(seq, id) in lane {
                if picked.len() >= req.max {
                    break;
                }
                if taken.contains(&id) {
                    continue;
                }
                let Some(r) = self.outbox.get(&id) else {
                    continue;
                };
                if !r.ready(now) {
                    continue;
                }
                let Some(key) = &r.row.entity_key else {
                    picked.push(id);
                    taken.insert(id);
                    continue;
                };
                let Some(q) = self.by_queue.get(&(r.row.destination.clone(), key.clone())) else {
                    continue;
                };
                if q.first() != Some(&(seq, id)) || self.held(&r.row.destination, key) {
                    continue;
                }
                picked.push(id);
                taken.insert(id);
                // the rows right behind the head, while they are this lane's
                let mut n = 1;
                for (_, next) in q.range((seq, id)..).skip(1) {
                    if n >= per_key || picked.len() >= req.max {
                        break;
                    }
                    match self.outbox.get(next) {
                        Some(r2) if r2.row.flow == req.lane.flow && r2.ready(now) => {
                            picked.push(*next);
                            taken.insert(*next);
                            n += 1;
                        }
                        _ => break,
                    }
                }
            }
        }
        let lease_ms = i64::try_from(req.lease.as_millis()).unwrap_or(i64::MAX);
        let until = now.saturating_add(lease_ms);
        let mut out = Vec::with_capacity(picked.len());
        for id in picked {
            self.next_token += 1;
            let token = self.next_token;
            if let Some(r) = self.outbox.get_mut(&id) {
                r.token = Some(token);
                r.lease_until = until;
                out.push(Claimed {
                    row: r.row.clone(),
                    token,
                });
            }
        }
        out.sort_by_key(|c| (c.row.order_seq, c.row.id));
        out
    }

    fn settle(&mut self, s: Settle) -> Settled {
        let now = now_ms();
        let mut done = Settled::default();
        for item in s.items {
            let current = self.outbox.get(&item.id).and_then(|r| r.token);
            if current != Some(item.token) {
                done.stale += 1;
                continue;
            }
            if let (Some(a), Some(r)) = (item.attempt, self.outbox.get(&item.id))
                && let Some((outcome, error)) = item.outcome.trail()
            {
                let error = error.map(str::to_owned);
                let r = &r.row;
                let id = self.attempts.last().map_or(1, |l| l.id + 1);
                self.attempts.push(crate::AttemptRow {
                    id,
                    flow: r.flow.clone(),
                    destination: r.destination.clone(),
                    event_id: r.event_id.clone(),
                    correlation_id: r.correlation_id.clone(),
                    entity_key: r.entity_key.clone(),
                    attempt: i64::from(r.attempts) + 1,
                    at: a.at,
                    latency_ms: a.latency_ms,
                    status: a.status,
                    outcome: outcome.into(),
                    error,
                });
            }
            match item.outcome {
                Outcome::Delivered(w) => {
                    let Some(r) = self.remove_row(item.id) else {
                        continue;
                    };
                    let row = r.row;
                    self.bump(&row.flow, &row.destination, |c| c.delivered += 1);
                    if let Some(k) = &row.entity_key {
                        self.supersede(&row, k);
                    }
                    if let Some(ext) = w.external_id {
                        let source_key = row.entity_key.clone().unwrap_or(row.event_id.clone());
                        let key = (row.destination.clone(), row.source.clone(), source_key);
                        self.next_touch += 1;
                        let touched = self.next_touch;
                        let created_at = self.crosswalk.get(&key).map_or(now, |c| c.row.created_at);
                        let cw = CrosswalkRow {
                            system: key.0.clone(),
                            source: key.1.clone(),
                            source_key: key.2.clone(),
                            external_id: ext,
                            flow: row.flow.clone(),
                            event_id: row.event_id.clone(),
                            created_at,
                            updated_at: now,
                        };
                        self.crosswalk.insert(key, Crosswalk { row: cw, touched });
                    }
                    done.delivered += 1;
                }
                Outcome::Retry { next_at, error } => {
                    if let Some(r) = self.outbox.get_mut(&item.id) {
                        r.row.attempts = r.row.attempts.saturating_add(1);
                        r.row.next_at = next_at;
                        r.row.last_error = Some(error);
                        r.token = None;
                        r.lease_until = 0;
                    }
                    done.retried += 1;
                }
                Outcome::Dead { error, hold_key } => {
                    let Some(r) = self.remove_row(item.id) else {
                        continue;
                    };
                    let row = r.row;
                    let attempts = row.attempts.saturating_add(1);
                    self.bump(&row.flow, &row.destination, |c| c.dead_lettered += 1);
                    self.next_dlq += 1;
                    let id = self.next_dlq;
                    let history = json!([{
                        "at": now, "action": "dead_lettered", "attempts": attempts, "error": error
                    }]);
                    if hold_key && let Some(k) = &row.entity_key {
                        self.holds.insert((row.destination.clone(), k.clone(), id));
                    }
                    self.insert_entry(Entry {
                        public: DlqEntry {
                            id,
                            status: "dead".into(),
                            stage: Stage::Deliver.as_str().into(),
                            flow: row.flow,
                            destination: row.destination,
                            entity_key: row.entity_key,
                            idempotency_key: Some(row.idempotency_key),
                            source: row.source,
                            event_id: row.event_id,
                            correlation_id: row.correlation_id,
                            created_at: row.created_at,
                            failed_at: now,
                            attempts,
                            error,
                            payload: row.payload,
                            history,
                            attributes: None,
                            superseded_by: None,
                            order_seq: Some(row.order_seq),
                            resolved_at: None,
                            payload_sha256: None,
                        },
                        order_seq: row.order_seq,
                        superseded: Vec::new(),
                        event_time: row.event_time,
                        source_version: row.source_version,
                        group_id: row.group_id,
                        traceparent: row.traceparent,
                        tracestate: row.tracestate,
                        attributes: None,
                    });
                    done.dead += 1;
                }
                Outcome::Wait { next_at, reason } => {
                    if let Some(r) = self.outbox.get_mut(&item.id) {
                        r.row.next_at = next_at;
                        r.row.last_error = Some(reason);
                        r.token = None;
                        r.lease_until = 0;
                    }
                    done.released += 1;
                }
                Outcome::Release => {
                    if let Some(r) = self.outbox.get_mut(&item.id) {
                        r.token = None;
                        r.lease_until = 0;
                    }
                    done.released += 1;
                }
            }
        }
        for f in s.follow_ups {
            let origin = Origin {
                source: f.source,
                event_id: f.event_id,
                correlation_id: f.correlation_id,
                received_at: now,
                event_time: now,
                source_version: None,
                group_id: None,
                traceparent: None,
                tracestate: None,
                attributes: String::new(),
                payload: String::new(),
            };
            // lane-level: a follow-up enters one lane only
            self.bump(&f.flow, &f.delivery.destination, |c| c.received += 1);
            self.new_row(&f.flow, &f.delivery, &origin, None);
            done.follow_ups += 1;
        }
        done
    }

    /// A keyed row was delivered: older dead entries of its key at its
    /// destination, and older parse/map-stage entries of its key (whatever
    /// their flow: which destinations the replay will write is known only
    /// then), remember it.
    fn supersede(&mut self, row: &OutboxRow, key: &str) {
        let Some(ids) = self.dead_keyed.get(key) else {
            return;
        };
        for id in ids {
            let Some(e) = self.dlq.get_mut(id) else {
                continue;
            };
            let here = e.public.destination == row.destination || e.public.destination.is_empty();
            if !here || e.order_seq >= row.order_seq {
                continue;
            }
            e.superseded
                .retain(|s| s.flow != row.flow || s.destination != row.destination);
            e.public.superseded_by = Some(row.event_id.clone());
            e.superseded.push(Superseder {
                flow: row.flow.clone(),
                destination: row.destination.clone(),
                event_id: row.event_id.clone(),
            });
        }
    }

    fn replay(&mut self, r: Replay) -> Result<Applied, StoreError> {
        let now = now_ms();
        let e = self.dead(r.dlq_id)?.clone();
        let id = r.dlq_id;
        let deliver = e.public.stage == Stage::Deliver.as_str();
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
                        e.public.stage
                    )));
                }
                Some(o) => {
                    check_outcome(o)?;
                    if outcome_flow(o) != e.public.flow {
                        return Err(StoreError::Invalid(format!(
                            "DLQ entry {id} belongs to flow {}; the new outcome is of flow {}",
                            e.public.flow,
                            outcome_flow(o)
                        )));
                    }
                }
            }
        }
        let payload = r.payload.unwrap_or_else(|| e.public.payload.clone());
        if deliver && let Err(err) = serde_json::from_str::<serde_json::Value>(&payload) {
            return Err(StoreError::Invalid(format!(
                "DLQ entry {id}: the payload to replay is not valid JSON: {err}"
            )));
        }
        if !r.force {
            if let Some(s) = superseded_by(&e, r.outcome.as_ref()) {
                return Err(StoreError::Refused(Refusal::Superseded {
                    by_event: s.event_id.clone(),
                }));
            }
            let in_flight = if deliver {
                e.public.entity_key.as_deref().is_some_and(|k| {
                    self.later_in_flight(&e.public.destination, k, e.order_seq, now)
                })
            } else {
                // only rows of the entry's key take its place
                match (&r.outcome, e.public.entity_key.as_deref()) {
                    (Some(FlowOutcome::Routed { deliveries, .. }), Some(k)) => {
                        deliveries.iter().any(|d| {
                            d.entity_key.as_deref() == Some(k)
                                && self.later_in_flight(&d.destination, k, e.order_seq, now)
                        })
                    }
                    _ => false,
                }
            };
            if in_flight {
                return Err(StoreError::Refused(Refusal::InFlight));
            }
        }
        // apply: nothing below fails
        let order_seq = if r.force { self.order() } else { e.order_seq };
        let place = e
            .public
            .entity_key
            .clone()
            .map(|key| Place { order_seq, key });
        // its holds go; a new rejection (below) makes its own
        self.close_entry(id, "replayed", &r.note, now);
        let p = &e.public;
        if deliver {
            self.next_outbox += 1;
            let row = OutboxRow {
                id: self.next_outbox,
                flow: p.flow.clone(),
                destination: p.destination.clone(),
                entity_key: p.entity_key.clone(),
                idempotency_key: p.idempotency_key.clone().unwrap_or_default(),
                source: p.source.clone(),
                event_id: p.event_id.clone(),
                correlation_id: p.correlation_id.clone(),
                created_at: p.created_at,
                attempts: 0,
                next_at: 0,
                last_error: None,
                order_seq,
                payload,
                event_time: e.event_time,
                source_version: e.source_version.clone(),
                group_id: e.group_id.clone(),
                traceparent: e.traceparent.clone(),
                tracestate: e.tracestate.clone(),
            };
            self.insert_row(row);
            self.bump(&p.flow, &p.destination, |c| c.dead_lettered -= 1);
        } else if let Some(outcome) = &r.outcome {
            self.bump(&p.flow, "", |c| {
                c.received -= 1;
                c.rejected -= 1;
            });
            let origin = Origin {
                source: p.source.clone(),
                event_id: p.event_id.clone(),
                correlation_id: p.correlation_id.clone(),
                received_at: p.created_at,
                event_time: e.event_time,
                source_version: e.source_version.clone(),
                group_id: e.group_id.clone(),
                traceparent: e.traceparent.clone(),
                tracestate: e.tracestate.clone(),
                attributes: e.attributes.clone().unwrap_or_default(),
                payload: p.payload.clone(),
            };
            self.apply_outcome(&origin, outcome, place.as_ref(), now);
        }
        Ok(Applied {
            changed: 1,
            ..Default::default()
        })
    }

    fn discard(&mut self, id: i64, note: &str) -> Result<Applied, StoreError> {
        let now = now_ms();
        let e = self.dead(id)?;
        let (flow, dest) = (e.public.flow.clone(), e.public.destination.clone());
        if e.public.stage == Stage::Deliver.as_str() {
            self.bump(&flow, &dest, |c| {
                c.dead_lettered -= 1;
                c.discarded += 1;
            });
        } else {
            self.bump(&flow, "", |c| {
                c.rejected -= 1;
                c.discarded += 1;
            });
        }
        self.close_entry(id, "discarded", note, now);
        Ok(Applied {
            changed: 1,
            ..Default::default()
        })
    }

    fn prune(&mut self, c: crate::Prune) -> crate::Pruned {
        let n = (self.inbox.len(), self.dlq.len(), self.drift.len());
        let trail = self.attempts.len();
        self.attempts.retain(|a| a.at >= c.attempts_before);
        self.inbox.retain(|_, at| *at >= c.dedupe_before);
        // only resolved entries have `resolved_at`; dead ones never go
        self.dlq.retain(|_, e| {
            e.public.status == "dead" || e.public.resolved_at.is_none_or(|at| at >= c.dlq_before)
        });
        self.drift.retain(|e| e.last_seen >= c.drift_before);
        crate::Pruned {
            dedupe: n.0 - self.inbox.len(),
            dlq: n.1 - self.dlq.len(),
            drift: n.2 - self.drift.len(),
            attempts: trail - self.attempts.len(),
        }
    }

    fn record_drift(&mut self, b: DriftBatch) -> Applied {
        let now = now_ms();
        let mut n = 0;
        if let Some(shape) = b.shape {
            self.shapes.insert(b.source.clone(), shape);
            n += 1;
        }
        for d in b.events {
            let known = self.drift.iter_mut().find(|e| {
                e.source == b.source && e.kind == d.kind && e.path == d.path && e.detail == d.detail
            });
            match known {
                Some(e) => {
                    e.count += d.count;
                    e.last_seen = now;
                }
                None => {
                    self.next_drift += 1;
                    self.drift.push(DriftEvent {
                        id: self.next_drift,
                        source: b.source.clone(),
                        kind: d.kind,
                        path: d.path,
                        detail: d.detail,
                        example: Some(d.example),
                        first_seen: now,
                        last_seen: now,
                        count: d.count,
                        accepted_at: None,
                    });
                }
            }
            n += 1;
        }
        Applied {
            changed: n,
            ..Default::default()
        }
    }

    fn lane_counts(&self, lane: &LaneId, now: i64) -> FlowCounts {
        let get = |d: &str| {
            self.counts
                .get(&(lane.flow.clone(), d.to_owned()))
                .copied()
                .unwrap_or_default()
        };
        let (fl, dl) = (get(""), get(&lane.destination));
        let rows = self.by_lane.get(lane);
        let pending = rows.map_or(0, |s| s.len() as i64);
        let oldest = rows.and_then(|s| {
            s.iter()
                .filter_map(|(_, id)| self.outbox.get(id).map(|r| r.row.created_at))
                .min()
        });
        let received = fl.received + dl.received;
        let discarded = fl.discarded + dl.discarded;
        FlowCounts {
            flow: lane.flow.clone(),
            destination: lane.destination.clone(),
            received,
            filtered: fl.filtered,
            rejected: fl.rejected,
            delivered: dl.delivered,
            dead_lettered: dl.dead_lettered,
            discarded,
            pending,
            oldest_pending_ms: oldest.map(|t| (now - t).max(0)),
            last_received_at: fl.last_received_at,
            balanced: received
                == fl.filtered
                    + fl.rejected
                    + discarded
                    + dl.delivered
                    + dl.dead_lettered
                    + pending,
        }
    }
}

impl Journal for MemoryJournal {
    fn ingest(&self, batch: IngestBatch) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move { self.write()?.ingest(batch) })
    }

    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Vec<Claimed>, StoreError>> {
        Box::pin(async move { Ok(self.write()?.claim(&req)) })
    }

    fn settle(&self, settle: Settle) -> BoxFuture<'_, Result<Settled, StoreError>> {
        Box::pin(async move { Ok(self.write()?.settle(settle)) })
    }

    fn replay(&self, replay: Replay) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move { self.write()?.replay(replay) })
    }

    fn discard(&self, dlq_id: i64, note: String) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move { self.write()?.discard(dlq_id, &note) })
    }

    fn prune(&self, cutoffs: crate::Prune) -> BoxFuture<'_, Result<crate::Pruned, StoreError>> {
        Box::pin(async move { Ok(self.write()?.prune(cutoffs)) })
    }

    fn record_drift(&self, batch: DriftBatch) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move { Ok(self.write()?.record_drift(batch)) })
    }

    fn accept_drift(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            let mut st = self.write()?;
            let now = now_ms();
            let mut n = 0;
            for e in st.drift.iter_mut() {
                if ids.contains(&e.id) && e.accepted_at.is_none() {
                    e.accepted_at = Some(now);
                    n += 1;
                }
            }
            Ok(Applied {
                changed: n,
                ..Default::default()
            })
        })
    }

    fn publish(
        &self,
        topic: String,
        entries: Vec<crate::TopicEntry>,
    ) -> BoxFuture<'_, Result<crate::Published, StoreError>> {
        Box::pin(async move {
            let mut st = self.write()?;
            let now = now_ms();
            let mut out = crate::Published::default();
            for entry in entries {
                if !st.topic_ids.insert((topic.clone(), entry.id.clone())) {
                    out.duplicates += 1;
                    continue;
                }
                st.next_topic_seq += 1;
                let seq = st.next_topic_seq;
                st.topics.insert(
                    seq,
                    (
                        topic.clone(),
                        crate::TopicMessage {
                            seq,
                            published_at: now,
                            entry,
                        },
                    ),
                );
                out.appended += 1;
            }
            Ok(out)
        })
    }

    fn prune_topic(&self, topic: String, before: i64) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let mut st = self.write()?;
            let old: Vec<(i64, String)> = st
                .topics
                .iter()
                .filter(|(_, (t, m))| *t == topic && m.published_at < before)
                .map(|(seq, (_, m))| (*seq, m.entry.id.clone()))
                .collect();
            for (seq, id) in &old {
                st.topics.remove(seq);
                st.topic_ids.remove(&(topic.clone(), id.clone()));
            }
            Ok(old.len())
        })
    }

    fn read(&self) -> &dyn JournalRead {
        self
    }
}

impl JournalRead for MemoryJournal {
    fn topic_read(
        &self,
        topic: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<crate::TopicMessage>, StoreError> {
        let s = self.lock()?;
        Ok(s.topics
            .range(after.saturating_add(1)..)
            .filter(|(_, (t, _))| t == topic)
            .take(limit)
            .map(|(_, (_, m))| m.clone())
            .collect())
    }

    fn topic_behind(&self, topic: &str, after: i64) -> Result<i64, StoreError> {
        let s = self.lock()?;
        Ok(s.topics
            .range(after.saturating_add(1)..)
            .filter(|(_, (t, _))| t == topic)
            .count() as i64)
    }

    fn topic_head(&self, topic: &str) -> Result<i64, StoreError> {
        let s = self.lock()?;
        Ok(s.topics
            .iter()
            .rev()
            .find(|(_, (t, _))| t == topic)
            .map_or(0, |(seq, _)| *seq))
    }

    fn stream_shape(&self, source: &str) -> Result<Option<String>, StoreError> {
        MemoryJournal::stream_shape(self, source)
    }

    fn drift_events(&self, source: Option<&str>) -> Result<Vec<DriftEvent>, StoreError> {
        MemoryJournal::drift_events(self, source)
    }

    fn counts(&self, lanes: &[LaneId]) -> Result<Vec<FlowCounts>, StoreError> {
        let s = self.lock()?;
        let mut all: Vec<LaneId> = lanes.to_vec();
        let mut seen: HashSet<LaneId> = all.iter().cloned().collect();
        let extra: BTreeSet<LaneId> = s
            .counts
            .keys()
            .filter(|(_, d)| !d.is_empty())
            .map(|(f, d)| LaneId::new(f, d))
            .chain(s.by_lane.keys().cloned())
            .collect();
        for l in extra {
            if seen.insert(l.clone()) {
                all.push(l);
            }
        }
        let now = now_ms();
        Ok(all.iter().map(|l| s.lane_counts(l, now)).collect())
    }

    fn outbox_len(&self) -> Result<i64, StoreError> {
        Ok(self.lock()?.outbox.len() as i64)
    }

    fn checkpoint(&self, source: &str, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .lock()?
            .checkpoints
            .get(&(source.to_owned(), key.to_owned()))
            .map(|(v, _)| v.clone()))
    }

    fn checkpoints(&self) -> Result<Vec<crate::Checkpoint>, StoreError> {
        let s = self.lock()?;
        let mut out: Vec<crate::Checkpoint> = s
            .checkpoints
            .iter()
            .map(|((source, key), (value, at))| crate::Checkpoint {
                source: source.clone(),
                key: key.clone(),
                value: value.clone(),
                updated_at: *at,
            })
            .collect();
        out.sort_by(|a, b| (&a.source, &a.key).cmp(&(&b.source, &b.key)));
        Ok(out)
    }

    fn lookup(&self, id: &str, limit: usize) -> Result<crate::RecordLookup, StoreError> {
        let s = self.lock()?;
        let mut pending: Vec<OutboxRow> = s
            .outbox
            .values()
            .map(|r| &r.row)
            .filter(|r| {
                r.event_id == id || r.correlation_id == id || r.entity_key.as_deref() == Some(id)
            })
            .cloned()
            .collect();
        pending.sort_by_key(|r| (r.order_seq, r.id));
        pending.truncate(limit);
        let dead = s
            .dlq
            .values()
            .map(|e| &e.public)
            .filter(|e| {
                e.event_id == id || e.correlation_id == id || e.entity_key.as_deref() == Some(id)
            })
            .take(limit)
            .cloned()
            .collect();
        let mut written: Vec<&Crosswalk> = s
            .crosswalk
            .values()
            .filter(|c| c.row.event_id == id || c.row.source_key == id || c.row.external_id == id)
            .collect();
        written.sort_by_key(|c| std::cmp::Reverse(c.touched));
        let mut attempts: Vec<crate::AttemptRow> = s
            .attempts
            .iter()
            .rev()
            .filter(|a| {
                a.event_id == id || a.correlation_id == id || a.entity_key.as_deref() == Some(id)
            })
            .take(limit)
            .cloned()
            .collect();
        attempts.reverse();
        Ok(crate::RecordLookup {
            pending,
            dead,
            attempts,
            written: written
                .into_iter()
                .take(limit)
                .map(|c| c.row.clone())
                .collect(),
        })
    }

    fn dlq_list(&self, f: &DlqFilter) -> Result<Vec<DlqEntry>, StoreError> {
        let s = self.lock()?;
        let start = f.after_id.map_or(i64::MIN, |a| a.saturating_add(1));
        Ok(s.dlq
            .range(start..)
            .map(|(_, e)| &e.public)
            .filter(|e| match f.status.as_deref() {
                Some("all") => true,
                Some(st) => e.status == st,
                None => e.status == "dead",
            })
            .filter(|e| f.flow.as_ref().is_none_or(|v| &e.flow == v))
            .filter(|e| f.destination.as_ref().is_none_or(|v| &e.destination == v))
            .filter(|e| {
                f.error_contains
                    .as_ref()
                    .is_none_or(|v| e.error.contains(v.as_str()))
            })
            .filter(|e| f.since.is_none_or(|v| e.failed_at >= v))
            .take(f.limit.unwrap_or(DLQ_PAGE))
            .cloned()
            .collect())
    }

    fn dlq_get(&self, id: i64) -> Result<Option<DlqEntry>, StoreError> {
        Ok(self.lock()?.dlq.get(&id).map(|e| e.public.clone()))
    }

    fn dlq_depths(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let s = self.lock()?;
        let mut depths: BTreeMap<(String, String), i64> = BTreeMap::new();
        for e in s.dlq.values().filter(|e| e.public.status == "dead") {
            *depths
                .entry((e.public.flow.clone(), e.public.destination.clone()))
                .or_default() += 1;
        }
        Ok(depths.into_iter().map(|((f, d), n)| (f, d, n)).collect())
    }

    fn crosswalk(
        &self,
        system: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CrosswalkRow>, StoreError> {
        let s = self.lock()?;
        let mut rows: Vec<&Crosswalk> = s
            .crosswalk
            .values()
            .filter(|c| system.is_none_or(|v| c.row.system == v))
            .collect();
        rows.sort_by_key(|c| std::cmp::Reverse(c.touched));
        Ok(rows
            .into_iter()
            .take(limit)
            .map(|c| c.row.clone())
            .collect())
    }

    fn pending(&self, lane: &LaneId, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let s = self.lock()?;
        Ok(s.by_lane.get(lane).map_or_else(Vec::new, |set| {
            set.iter()
                .filter_map(|(_, id)| s.outbox.get(id).map(|r| r.row.clone()))
                .take(limit)
                .collect()
        }))
    }
}

#[cfg(test)]
mod tests {
    //! The contract is checked by `tests/conformance.rs`; these cover what
    //! only the memory engine exposes.

    use super::*;
    use crate::{NewDrift, NewEvent};

    fn block<T>(f: BoxFuture<'_, T>) -> T {
        futures::executor::block_on(f)
    }

    #[test]
    fn drift_is_upserted_per_source_kind_path_and_detail() {
        let j = MemoryJournal::new();
        let ev = |detail: &str, count| NewDrift {
            kind: "type_changed".into(),
            path: "/tags".into(),
            detail: detail.into(),
            example: "[\"a\"]".into(),
            count,
        };
        let batch = |events, shape: Option<&str>| DriftBatch {
            source: "crm".into(),
            shape: shape.map(str::to_owned),
            events,
        };
        block(j.record_drift(batch(vec![ev("string -> array", 1)], Some("{\"v\":1}")))).unwrap();
        block(j.record_drift(batch(
            vec![ev("string -> array", 4), ev("string -> number", 2)],
            None,
        )))
        .unwrap();
        let evs = j.drift_events(None).unwrap();
        let got: Vec<(&str, i64)> = evs.iter().map(|e| (e.detail.as_str(), e.count)).collect();
        assert_eq!(got, [("string -> array", 5), ("string -> number", 2)]);
        assert!(j.drift_events(Some("erp")).unwrap().is_empty());
        assert_eq!(j.stream_shape("crm").unwrap().as_deref(), Some("{\"v\":1}"));
    }

    #[test]
    fn injected_failures_change_nothing_and_run_out() {
        let j = MemoryJournal::new();
        j.fail_next(2, || StoreError::Closed).unwrap();
        let batch = || IngestBatch {
            source: "crm".into(),
            checkpoint: Some(("pos".into(), "1".into())),
            fence: None,
            ..Default::default()
        };
        assert!(matches!(block(j.ingest(batch())), Err(StoreError::Closed)));
        assert!(matches!(
            block(j.prune(crate::Prune::dedupe(0))),
            Err(StoreError::Closed)
        ));
        assert_eq!(j.checkpoint("crm", "pos").unwrap(), None, "reads work");
        block(j.ingest(batch())).unwrap();
        assert_eq!(j.checkpoint("crm", "pos").unwrap().as_deref(), Some("1"));
    }

    #[test]
    fn map_stage_entries_keep_the_event_attributes() {
        let j = MemoryJournal::new();
        let now = now_ms();
        block(j.ingest(IngestBatch {
            source: "crm".into(),
            events: vec![NewEvent {
                event_id: "1".into(),
                correlation_id: "c".into(),
                received_at: now,
                event_time: now,
                source_version: None,
                group_id: None,
                traceparent: None,
                tracestate: None,
                attributes: "{\"type\":\"contact.updated\"}".into(),
                payload: "not json".into(),
                outcomes: vec![FlowOutcome::rejected("f", Stage::Parse, "bad JSON")],
            }],
            ..Default::default()
        }))
        .unwrap();
        let e = j.dlq_list(&DlqFilter::default()).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].payload, "not json");
        assert_eq!(
            j.dlq_attributes(e[0].id).unwrap().as_deref(),
            Some("{\"type\":\"contact.updated\"}")
        );
        assert_eq!(j.dlq_attributes(e[0].id + 1).unwrap(), None);
    }
}
