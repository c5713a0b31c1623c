//! The journal: the store contract every engine implements (SQLite, the
//! default; in-memory, for lane and property tests; PostgreSQL, for several
//! nodes). Its operations are the spine's transactions, each atomic: what an
//! operation changed is all committed when its future resolves `Ok`, and
//! nothing of it is when it resolves `Err`.
//!
//! # The queue model
//!
//! Every outbox row belongs to a *lane* (one flow writing to one destination)
//! and, when it has an entity key, to the *key queue* of
//! `(destination, entity key)`: one queue per destination and key, across
//! every flow that writes that destination. A row is ordered in its key queue
//! by `order_seq` (acceptance order; a replayed row keeps the one it had).
//!
//! Order per key is an invariant of the journal, not of the lanes:
//! - [`Journal::claim`] hands out only the **head** of a key queue (the row
//!   with the lowest `order_seq`), and only when that head is not leased,
//!   not waiting for a retry (`next_at` in the future) and its key is not
//!   held by a dead letter. So two rows of one key are never out at once,
//!   whichever lanes, flows, retries, replays or restarts they came from.
//!   With `per_key > 1`, a claim may also take the rows right behind the
//!   head *of the same lane* (consecutive in the key queue), for sinks that
//!   write one key's rows in one batch, in order.
//! - Keyless rows are each a queue of their own: they go in parallel.
//! - A claim is a **lease**: until it is settled or its deadline passes,
//!   nobody else gets the row. A settlement carrying a token that is no
//!   longer the row's (the lease expired and the row was claimed again) is
//!   ignored and counted as stale.
//!
//! # Accounting
//!
//! For every flow and destination, in every committed state:
//! `received = filtered + rejected + discarded(flow) + delivered +
//! dead_lettered + discarded + pending`, with `pending` counted from the
//! outbox rows, never derived. Every counter changes in the same transaction
//! as what it counts; duplicates are never counted.

use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

use crate::canonical::CanonicalView;
use crate::{
    Applied, CrosswalkRow, DlqEntry, DlqFilter, DriftBatch, FlowCounts, FlowOutcome, IngestBatch,
    OutboxRow, StoreError,
};

/// One flow writing to one destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct LaneId {
    pub flow: String,
    pub destination: String,
}

impl LaneId {
    pub fn new(flow: impl Into<String>, destination: impl Into<String>) -> Self {
        LaneId {
            flow: flow.into(),
            destination: destination.into(),
        }
    }
}

/// What a lane asks for.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub lane: LaneId,
    /// At most this many rows.
    pub max: usize,
    /// Rows of one key queue in one claim (1: heads only). More than one
    /// only for sinks that write a key's rows in one batch, in order.
    pub per_key: usize,
    /// How long the rows are leased. The lane must settle (or give up on)
    /// them before this passes; after it, the journal may hand them out again.
    pub lease: Duration,
}

/// A leased row.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub row: OutboxRow,
    /// The lease's token: settle with it. Tokens are never reused, across
    /// restarts too, so a settlement from before a restart is stale.
    pub token: i64,
}

/// What a destination did with one write; kept with the delivered state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WriteOutcome {
    /// The id the destination gave the record (an HTTP sink's `capture_id`).
    pub external_id: Option<String>,
    /// The version the destination now holds (an ETag, a row version).
    pub version: Option<String>,
    /// A fingerprint of the fields written (echo suppression).
    pub fingerprint: Option<String>,
    /// A canonical record's write (an identity lane): the destination now
    /// holds these values, recorded as its base with the link.
    pub canonical: Option<CanonicalWritten>,
}

/// What an identity lane wrote of a canonical record to its destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CanonicalWritten {
    pub entity: String,
    pub canonical_id: String,
    /// The canonical state written (JSON object text): the destination's new base.
    pub base: String,
    /// The SHA-256 of the payload sent: an identical later write is skipped.
    pub fingerprint: String,
}

impl WriteOutcome {
    pub fn is_empty(&self) -> bool {
        self.external_id.is_none()
            && self.version.is_none()
            && self.fingerprint.is_none()
            && self.canonical.is_none()
    }
}

/// What became of one claimed row.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Written: the row leaves the outbox (`delivered` + 1) and the outcome,
    /// when not empty, goes to the crosswalk in the same transaction.
    Delivered(WriteOutcome),
    /// Failed, to be tried again at `next_at` (ms): `attempts` + 1.
    Retry { next_at: i64, error: String },
    /// Out of attempts or permanent: moved to the DLQ (`dead_lettered` + 1,
    /// `attempts` + 1). With `hold_key`, the rest of the key queue waits
    /// until the entry is replayed or discarded.
    Dead { error: String, hold_key: bool },
    /// Not sent (the hub is stopping, the destination paused): the lease
    /// ends, no attempt is spent.
    Release,
    /// Not sent yet: it waits for something else (the destination's id of
    /// a record it refers to) and is due again at `next_at` (ms), with the
    /// reason kept as its last error; no attempt is spent. It stays the head
    /// of its key queue.
    Wait { next_at: i64, reason: String },
}

impl Outcome {
    /// What the attempt trail keeps of it: `delivered`, `retry` or `dead`
    /// with the error; `None` for a release or a wait (no write decided it).
    pub fn trail(&self) -> Option<(&'static str, Option<&str>)> {
        match self {
            Outcome::Delivered(_) => Some(("delivered", None)),
            Outcome::Retry { error, .. } => Some(("retry", Some(error))),
            Outcome::Dead { error, .. } => Some(("dead", Some(error))),
            Outcome::Wait { .. } | Outcome::Release => None,
        }
    }
}

/// One row's settlement.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub id: i64,
    pub token: i64,
    pub outcome: Outcome,
    /// The write this outcome came from, when the row was sent: kept in
    /// the attempt trail (`attempts`) in the same transaction, for a
    /// delivered, retried or dead-lettered row (not for a release or a
    /// wait, and not when the settlement is stale).
    pub attempt: Option<Attempt>,
}

/// One write of a row to its destination, as the lane saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// When the write was sent, ms since the epoch.
    pub at: i64,
    /// How long the destination took to answer (the whole batch's write).
    pub latency_ms: i64,
    /// The HTTP status the destination answered, when it speaks HTTP.
    pub status: Option<u16>,
}

/// New work a settlement causes (a saga's next step, an identity link's
/// dependent write), enqueued in the same transaction as the settlement.
/// Counted as received and routed on its flow.
#[derive(Debug, Clone)]
pub struct FollowUp {
    pub flow: String,
    pub source: String,
    pub event_id: String,
    pub correlation_id: String,
    pub delivery: crate::NewDelivery,
}

/// A lane's results, applied in one transaction.
#[derive(Debug, Clone, Default)]
pub struct Settle {
    pub items: Vec<Settlement>,
    pub follow_ups: Vec<FollowUp>,
}

/// What a settle did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    pub delivered: usize,
    pub retried: usize,
    pub dead: usize,
    pub released: usize,
    /// Settlements ignored: the row is gone or leased again under another
    /// token (its lease had expired).
    pub stale: usize,
    pub follow_ups: usize,
}

/// Put a DLQ entry back.
#[derive(Debug, Clone)]
pub struct Replay {
    pub dlq_id: i64,
    /// Deliver stage: a replacement payload (JSON text); else the stored one.
    pub payload: Option<String>,
    /// Parse/map stage: the flow's new outcome for the entry (the caller
    /// re-ran the flow). Required for those stages, refused for deliver;
    /// of the entry's flow. Its rows and entries of the entry's key take the
    /// entry's place; the others (all of them when the entry had no key, so
    /// no place) go to the end of their queues.
    pub outcome: Option<FlowOutcome>,
    /// Replay even though a later write of the same key was delivered (the
    /// destination then ends on this older data) or is in flight. A forced
    /// row goes to the end of its key queue.
    pub force: bool,
    pub note: String,
}

/// Why a replay is refused: the typed reasons callers act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A later row of the same key was delivered: replaying would put older
    /// data over newer. `--force` overrides. For a parse/map-stage entry: a
    /// later row of its key from its own flow (any destination), or from any
    /// flow at a destination the new outcome writes with that key.
    Superseded { by_event: String },
    /// A later row of the same key is being written now; try again shortly.
    InFlight,
}

/// The cutoffs of one prune, ms since the epoch (the caller's "now" minus
/// each retention: tests pass a "now" of their own). `i64::MIN` keeps all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    /// Dedupe ids accepted before this are forgotten.
    pub dedupe_before: i64,
    /// DLQ entries resolved (replayed, discarded) before this are deleted.
    pub dlq_before: i64,
    /// Drift events last seen before this are deleted, accepted or not.
    pub drift_before: i64,
    /// Attempt-trail entries written before this are deleted.
    pub attempts_before: i64,
}

impl Prune {
    /// Only dedupe ids accepted before `before`.
    pub fn dedupe(before: i64) -> Prune {
        Prune {
            dedupe_before: before,
            dlq_before: i64::MIN,
            drift_before: i64::MIN,
            attempts_before: i64::MIN,
        }
    }

    /// Everything up to `now` minus each retention.
    pub fn at(now: i64, r: Retention) -> Prune {
        let back =
            |d: Duration| now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Prune {
            dedupe_before: back(r.dedupe),
            dlq_before: back(r.dlq),
            drift_before: back(r.drift),
            attempts_before: back(r.attempts),
        }
    }
}

/// How long each kind of history is kept (`store.*_retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub dedupe: Duration,
    pub dlq: Duration,
    pub drift: Duration,
    pub attempts: Duration,
}

/// What one prune deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub dedupe: usize,
    pub dlq: usize,
    pub drift: usize,
    pub attempts: usize,
}

impl Pruned {
    pub fn total(&self) -> usize {
        self.dedupe + self.dlq + self.drift + self.attempts
    }
}

/// Where sources resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointKey {
    pub source: String,
    pub key: String,
}

/// The store contract. See the module docs for the invariants; every
/// implementation runs `tests/conformance.rs`.
pub trait Journal: Send + Sync + 'static {
    /// Store a source's batch whole or not at all: dedupe (by event id for
    /// [`crate::Dedupe::Id`] sources, none for sources that resume from an
    /// exact position), the outbox rows, the DLQ rows (parse/map failures),
    /// the checkpoint and the counters. A duplicate event is acknowledged and
    /// neither stored nor counted. A `Rejected` outcome at the deliver stage
    /// is `Invalid` (flows fail at parse or map).
    fn ingest(&self, batch: IngestBatch) -> BoxFuture<'_, Result<Applied, StoreError>>;

    /// Lease up to `max` rows of a lane that may be written now (module docs).
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Vec<Claimed>, StoreError>>;

    /// Apply a batch of results and their follow-ups in one transaction.
    fn settle(&self, settle: Settle) -> BoxFuture<'_, Result<Settled, StoreError>>;

    /// Put a dead entry back in the outbox in its key's place; refused (as
    /// [`StoreError::Refused`]) when that would regress the destination.
    fn replay(&self, replay: Replay) -> BoxFuture<'_, Result<Applied, StoreError>>;

    /// Mark a dead entry discarded (counted), releasing its key if held.
    fn discard(&self, dlq_id: i64, note: String) -> BoxFuture<'_, Result<Applied, StoreError>>;

    /// Delete what is past its retention ([`Prune`]): dedupe ids, resolved
    /// (replayed, discarded) DLQ entries, drift events no record showed
    /// since the cutoff. Never a `dead` entry. In slices of bounded size,
    /// each its own transaction, until a slice finds fewer than its limit.
    /// Changes no counter: the counters count what happened to records, not
    /// the DLQ rows kept about them.
    fn prune(&self, cutoffs: Prune) -> BoxFuture<'_, Result<Pruned, StoreError>>;

    /// Drift observations (not part of the accounting).
    fn record_drift(&self, batch: DriftBatch) -> BoxFuture<'_, Result<Applied, StoreError>>;

    /// An operator accepts drift events by id: records showing only
    /// accepted drift are no longer quarantined. `changed`: how many were
    /// not accepted before (an unknown id changes nothing).
    fn accept_drift(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<Applied, StoreError>>;

    /// Resolve a manual conflict: the field takes `value` (`None`: it keeps
    /// the canonical value), the conflict is marked resolved, and every
    /// route of `rules` whose system lacks the record's state gets a row,
    /// in one transaction. Default: refused (engines without identity).
    fn resolve_conflict(
        &self,
        resolve: ResolveConflict,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        let _ = resolve;
        Box::pin(async {
            Err(StoreError::Invalid(
                "this store keeps no canonical records".into(),
            ))
        })
    }

    /// Change the crosswalk by hand (`weft xref link|unlink|split|merge`),
    /// with the rows it causes, in one transaction. Default: refused
    /// (engines without identity).
    fn xref_change(&self, change: XrefChange) -> BoxFuture<'_, Result<Applied, StoreError>> {
        let _ = change;
        Box::pin(async {
            Err(StoreError::Invalid(
                "this store keeps no canonical records".into(),
            ))
        })
    }

    /// Decide a report held for review (fuzzy matching): accepted, its id is
    /// linked to the candidate and the report merged; rejected, it makes a
    /// new record; the rows this causes are enqueued, in one transaction.
    /// Default: refused (engines without identity).
    fn resolve_match(&self, resolve: ResolveMatch) -> BoxFuture<'_, Result<Applied, StoreError>> {
        let _ = resolve;
        Box::pin(async {
            Err(StoreError::Invalid(
                "this store keeps no canonical records".into(),
            ))
        })
    }

    /// Before an identity lane writes canonical records to `system`: the
    /// values about to be written become outstanding (the system's report
    /// of them is an echo), committed before the write so that a crash
    /// between the write and its settle cannot turn the echo into a change.
    /// Default: refused (engines without identity).
    fn canonical_intent(
        &self,
        system: String,
        writes: Vec<CanonicalWritten>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let _ = (system, writes);
        Box::pin(async {
            Err(StoreError::Invalid(
                "this store keeps no canonical records".into(),
            ))
        })
    }

    /// Whether several hubs may share this journal, so that a source that
    /// must run on one node at a time (every source but webhooks) runs
    /// only under [`Journal::lease_source`]. Default: no (one hub per store:
    /// SQLite's lock file, the memory journal's process).
    fn shared(&self) -> bool {
        false
    }

    /// Take or renew this node's lease of `source` for `ttl_ms` (the
    /// database's clock): the lease's epoch while this node holds it,
    /// `None` while another node's lease runs. The epoch changes only when
    /// the lease passes to another node; an ingest carrying an older epoch
    /// (`IngestBatch::fence`) is refused. Default: always held, epoch 0.
    fn lease_source(
        &self,
        source: String,
        ttl_ms: i64,
    ) -> BoxFuture<'_, Result<Option<i64>, StoreError>> {
        let _ = (source, ttl_ms);
        Box::pin(async { Ok(Some(0)) })
    }

    /// Give up this node's lease of `source` (a hub stopping), so another
    /// node takes it at once. Default: nothing to give up.
    fn release_source(&self, source: String) -> BoxFuture<'_, Result<(), StoreError>> {
        let _ = source;
        Box::pin(async { Ok(()) })
    }

    /// This node's heartbeat on a shared journal: it is a member, alive for
    /// `ttl_ms` more (the database's clock); in the same transaction every
    /// other node whose last beat ran out is dropped and the rows it had
    /// claimed are released (another node claims them at once; a settle
    /// of the dead node is stale). Default (one hub per store): nothing to
    /// say, always alive.
    fn heartbeat(&self, ttl_ms: i64) -> BoxFuture<'_, Result<Heartbeat, StoreError>> {
        let _ = ttl_ms;
        Box::pin(async {
            Ok(Heartbeat {
                was_alive: true,
                reaped: Vec::new(),
            })
        })
    }

    /// This node leaves (a hub stopping after its lanes did): its
    /// membership ends now. Default: nothing to leave.
    fn leave(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// Append messages to `topic` in one transaction, each once: an entry
    /// whose id the topic holds already is counted as a duplicate and not
    /// appended again (`topic.rs`).
    fn publish(
        &self,
        topic: String,
        entries: Vec<crate::TopicEntry>,
    ) -> BoxFuture<'_, Result<crate::Published, StoreError>>;

    /// Delete the messages of `topic` appended before `before` (ms since
    /// the epoch), oldest first, in slices of at most 10,000 rows, each a
    /// transaction; how many were deleted.
    fn prune_topic(&self, topic: String, before: i64) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// Consistent reads.
    fn read(&self) -> &dyn JournalRead;
}

/// What one [`Journal::heartbeat`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// This node's previous beat was still good. False on a node's first
    /// beat, and when another node found it dead (its claims were released).
    pub was_alive: bool,
    /// The nodes found dead by this beat, each with the rows whose claims
    /// were released.
    pub reaped: Vec<(String, u64)>,
}

/// A hub on a shared journal (`weft status`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: String,
    /// Its first beat of this run (ms since 1970, the database's clock).
    pub started_at: i64,
    /// Its last beat (ms).
    pub beat_at: i64,
    /// When it is dead unless it beats again (ms).
    pub alive_until: i64,
    /// `alive_until` is ahead of the database's clock at the read.
    pub alive: bool,
    /// Outbox rows it holds claimed now.
    pub claimed: i64,
}

/// Reads. Each call sees one committed state (a snapshot).
pub trait JournalRead: Send + Sync {
    /// Counts of every lane in `lanes` and every lane with counts or pending
    /// rows, from one snapshot, with `pending` counted from the outbox.
    fn counts(&self, lanes: &[LaneId]) -> Result<Vec<FlowCounts>, StoreError>;
    /// Pending rows of the whole outbox.
    fn outbox_len(&self) -> Result<i64, StoreError>;
    /// Up to `limit` messages of `topic` after the sequence `after`, in
    /// order. A message committed later never has a smaller sequence than
    /// one read before it.
    fn topic_read(
        &self,
        topic: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<crate::TopicMessage>, StoreError>;
    /// The sequence of the newest message of `topic` (0: none yet).
    fn topic_head(&self, topic: &str) -> Result<i64, StoreError>;
    /// How many messages of `topic` come after the sequence `after`: a
    /// subscriber's lag.
    fn topic_behind(&self, topic: &str, after: i64) -> Result<i64, StoreError>;
    /// A source's saved position.
    fn checkpoint(&self, source: &str, key: &str) -> Result<Option<String>, StoreError>;
    /// A page of DLQ entries in id order after `filter.after_id`, at most
    /// `filter.limit` (default [`crate::DLQ_PAGE`]).
    fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DlqEntry>, StoreError>;
    fn dlq_get(&self, id: i64) -> Result<Option<DlqEntry>, StoreError>;
    /// Dead entries per (flow, destination).
    fn dlq_depths(&self) -> Result<Vec<(String, String, i64)>, StoreError>;
    /// Crosswalk entries, newest first.
    fn crosswalk(
        &self,
        system: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CrosswalkRow>, StoreError>;
    /// Pending rows of a lane, in key order (for inspection and tests).
    fn pending(&self, lane: &LaneId, limit: usize) -> Result<Vec<OutboxRow>, StoreError>;
    /// Every saved source position, by source and key. Default: none
    /// listed (every engine here lists them).
    fn checkpoints(&self) -> Result<Vec<crate::Checkpoint>, StoreError> {
        Ok(Vec::new())
    }
    /// What the store keeps of the records an event id, correlation id or
    /// entity key names (the dashboard's record inspector), at most `limit`
    /// of each kind. Default: this store cannot search (every engine here
    /// can).
    fn lookup(&self, id: &str, limit: usize) -> Result<crate::RecordLookup, StoreError> {
        let _ = (id, limit);
        Err(StoreError::Invalid(
            "this store cannot search records yet (the SQLite store can)".into(),
        ))
    }
    /// The saved shape of a source stream (JSON). Default: none kept.
    fn stream_shape(&self, source: &str) -> Result<Option<String>, StoreError> {
        let _ = source;
        Ok(None)
    }
    /// The sources' leases, by source (several hubs on one journal).
    /// Default: none (one hub per store runs every source).
    fn source_leases(&self) -> Result<Vec<crate::SourceLease>, StoreError> {
        Ok(Vec::new())
    }
    /// The hubs on a shared journal, by node. Default: none kept.
    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        Ok(Vec::new())
    }
    /// Drift events, oldest first; `source` filters. Default: none kept.
    fn drift_events(&self, source: Option<&str>) -> Result<Vec<crate::DriftEvent>, StoreError> {
        let _ = source;
        Ok(Vec::new())
    }
    /// A canonical record with its links. Default: none kept (engines
    /// without identity refuse identity flows at ingest).
    fn canonical(&self, entity: &str, id: &str) -> Result<Option<CanonicalView>, StoreError> {
        let _ = (entity, id);
        Ok(None)
    }
    /// `(entity, canonical id)`, newest change first.
    fn canonical_list(
        &self,
        entity: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let _ = (entity, limit);
        Ok(Vec::new())
    }
    /// The canonical id a system's id is linked to.
    fn canonical_by_external(
        &self,
        entity: &str,
        system: &str,
        external_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let _ = (entity, system, external_id);
        Ok(None)
    }
    /// History entries, oldest first: of one record, or of one correlation id.
    fn canonical_history(
        &self,
        filter: &HistoryFilter,
    ) -> Result<Vec<crate::canonical::HistoryEntry>, StoreError> {
        let _ = filter;
        Ok(Vec::new())
    }
    /// Manual conflicts (`status`: `open`, `resolved`; `None`: all).
    fn conflicts(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::canonical::ConflictEntry>, StoreError> {
        let _ = (status, limit);
        Ok(Vec::new())
    }
    /// Per entity: records, open conflicts, reports held for review and
    /// history entries per action (`weft status`). Default: none.
    fn identity_summary(&self) -> Result<Vec<crate::canonical::IdentitySummary>, StoreError> {
        Ok(Vec::new())
    }
    /// Reports held for review (`status`: `open`, `accepted`, `rejected`;
    /// `None`: all).
    fn matches(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::canonical::MatchEntry>, StoreError> {
        let _ = (status, limit);
        Ok(Vec::new())
    }
}

/// A manual conflict's resolution.
#[derive(Debug, Clone)]
pub struct ResolveConflict {
    pub id: i64,
    /// The field's new value; `None` keeps the canonical one.
    pub value: Option<serde_json::Value>,
    /// The entity's rules (their routes decide where it is written).
    pub rules: std::sync::Arc<weft_core::identity::Rules>,
    pub note: String,
}

/// A change of the crosswalk by hand.
#[derive(Debug, Clone)]
pub struct XrefChange {
    pub op: XrefOp,
    /// The entity's rules (their routes decide where records are written).
    pub rules: std::sync::Arc<weft_core::identity::Rules>,
    pub note: String,
}

/// What `weft xref` changes.
#[derive(Debug, Clone)]
pub enum XrefOp {
    /// Link a system's id to a record (the record is then written there).
    Link {
        canonical_id: String,
        system: String,
        external_id: String,
    },
    /// Forget a system's id (its next report is matched again).
    Unlink { system: String, external_id: String },
    /// Move a system's id off its record into a new record holding what
    /// that system reported last (written to the other systems).
    Split { system: String, external_id: String },
    /// Fold record `gone` into `keep`: its links move, the fields `keep`
    /// lacks are taken, `gone` stays as a tombstone.
    Merge { keep: String, gone: String },
}

/// A held match's decision.
#[derive(Debug, Clone)]
pub struct ResolveMatch {
    pub id: i64,
    /// Link to the candidate (or `candidate`), else make a new record.
    pub accept: bool,
    /// Another canonical record to link to instead of the candidate.
    pub candidate: Option<String>,
    /// The entity's rules (their routes decide where it is written).
    pub rules: std::sync::Arc<weft_core::identity::Rules>,
    pub note: String,
}

/// Which history entries to read.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub entity: Option<String>,
    pub canonical_id: Option<String>,
    pub correlation_id: Option<String>,
    pub limit: usize,
}
