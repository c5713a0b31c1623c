//! weft's durable store: the [`Journal`] contract (journal.rs) and its
//! engines. [`SqliteJournal`] is the default, embedded engine: SQLite in WAL
//! mode, one writer thread applying every state change in group commits (a
//! caller's future resolves only after the commit, so `Ok` means on disk),
//! readers on their own connections that never block the writer.
//! [`MemoryJournal`] is the reference, for tests. `PgJournal` (feature
//! `postgres`, on by default; `postgres/mod.rs`) is the same contract on a
//! PostgreSQL database that several nodes share.
//!
//! Tables (see `schema.rs`): `outbox` (one row per event, flow and
//! destination, with its key-queue state; deleted when delivered), `dlq`,
//! `holds`, `dedupe`, `checkpoints`, `flow_counts`, `crosswalk`, and the drift
//! tables. Every change to the outbox or DLQ updates `flow_counts` in the
//! same transaction, so the accounting identity holds after any crash:
//! `received = filtered + rejected + discarded(flow)`
//! ` + delivered + dead_lettered + discarded + pending` (per destination).

pub mod canonical;
mod drift;
pub mod journal;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
mod reader;
mod schema;
mod sqlite;
pub mod topic;
mod writer;

use rusqlite::Connection;
pub use weft_core::config::Synchronous;

pub use drift::{DriftBatch, DriftEvent, NewDrift};
pub use journal::{
    Attempt, CanonicalWritten, ClaimRequest, Claimed, FollowUp, Heartbeat, HistoryFilter, Journal,
    JournalRead, LaneId, NodeInfo, Outcome, Prune, Pruned, Refusal, Replay, ResolveConflict,
    ResolveMatch, Retention, Settle, Settled, Settlement, WriteOutcome, XrefChange, XrefOp,
};
pub use memory::MemoryJournal;
#[cfg(feature = "postgres")]
pub use postgres::{PgJournal, PgOptions, PgRole};
pub use reader::{
    AttemptRow, Checkpoint, CrosswalkRow, DlqEntry, DlqFilter, FlowCounts, OutboxRow, Reader,
    RecordLookup, SourceLease,
};

/// DLQ list pages hold this many entries unless asked for fewer.
pub const DLQ_PAGE: usize = 1000;
pub use schema::latest_version;
pub use sqlite::{Role, SqliteJournal};
pub use topic::{Published, TopicEntry, TopicMessage};

/// Store failures. `Busy` is retryable; the rest are not expected in normal
/// operation and stop the caller.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[cfg(feature = "postgres")]
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("schema: {0}")]
    Schema(String),
    #[error("the store is closed")]
    Closed,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// The store itself failed (a commit SQLite rolled back, a disk full,
    /// a thread that cannot start): not the caller's mistake; worth a
    /// retry later.
    #[error("{0}")]
    Failed(String),
    /// A replay that would regress the destination, or that must wait.
    #[error("{}", refusal_text(.0))]
    Refused(Refusal),
    /// An ingest of a leased source by a node that no longer holds the
    /// source's lease (another node took it over): nothing was written.
    #[error("{0}")]
    Fenced(String),
}

fn refusal_text(r: &Refusal) -> String {
    match r {
        Refusal::Superseded { by_event } => format!(
            "a later write of the same key (event {by_event}) was already delivered; replaying would put older data over newer (use --force to replay anyway)"
        ),
        Refusal::InFlight => {
            "a later write of the same key is being delivered now; try again shortly".into()
        }
    }
}

impl StoreError {
    /// Whether the caller made a mistake (bad id, wrong stage, a refused
    /// replay) rather than the store failing; a user error is a 4xx, never
    /// worth a retry.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            StoreError::NotFound(_) | StoreError::Invalid(_) | StoreError::Refused(_)
        )
    }
}

/// Where a record failed before delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The source could not parse it.
    Parse,
    /// The flow's filter, key or mapping failed on it.
    Map,
    /// The destination refused it or it ran out of attempts.
    Deliver,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Map => "map",
            Stage::Deliver => "deliver",
        }
    }
}

/// A mapped payload for one destination.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub destination: String,
    pub entity_key: Option<String>,
    pub idempotency_key: String,
    /// JSON text (empty when `delivered`).
    pub payload: String,
    /// Already written to the destination before the ingest (a keyless row
    /// of a source that replays from its checkpoint: the Ingestor's direct
    /// path): counted delivered in the ingest transaction, no outbox row. If
    /// that transaction fails, the checkpoint stays where it was and the
    /// source reads (and the Ingestor writes) the record again. Only for
    /// keyless rows (a key queue's order is the outbox's) and at ingest.
    pub delivered: bool,
}

/// What one flow made of one event.
#[derive(Debug, Clone)]
pub enum FlowOutcome {
    Routed {
        flow: String,
        deliveries: Vec<NewDelivery>,
    },
    Filtered {
        flow: String,
    },
    /// A report of a record to its entity's canonical record (an identity
    /// flow): merged in the ingest transaction, which decides the rows it
    /// causes (one per destination that lacks the new values).
    Canonical {
        flow: String,
        report: Box<CanonicalReport>,
    },
    /// Goes to the DLQ with the event's payload.
    Rejected {
        flow: String,
        stage: Stage,
        error: String,
        /// The flow's entity key, when it was computed before the failure:
        /// the entry keeps its place in the key's order.
        entity_key: Option<String>,
        /// Destinations whose policy is `hold_key`: later rows of the key
        /// wait there until the entry is replayed or discarded.
        hold: Vec<String>,
    },
}

impl FlowOutcome {
    /// A rejection without a key.
    pub fn rejected(flow: impl Into<String>, stage: Stage, error: impl Into<String>) -> Self {
        FlowOutcome::Rejected {
            flow: flow.into(),
            stage,
            error: error.into(),
            entity_key: None,
            hold: Vec::new(),
        }
    }

    /// The flow this outcome belongs to.
    pub fn flow(&self) -> &str {
        match self {
            FlowOutcome::Routed { flow, .. }
            | FlowOutcome::Filtered { flow }
            | FlowOutcome::Rejected { flow, .. }
            | FlowOutcome::Canonical { flow, .. } => flow,
        }
    }
}

/// One system's report of a record, for [`FlowOutcome::Canonical`]. The
/// reporting system is the batch's source; the time is the event's.
#[derive(Debug, Clone)]
pub struct CanonicalReport {
    pub rules: std::sync::Arc<weft_core::identity::Rules>,
    /// The source system's id of the record (the flow's key).
    pub external_id: String,
    /// The record's canonical fields (the flow's mapping).
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// When the system changed the record (ms; the mapping's `_time`), for
    /// last-write-wins; `None`: the event's time.
    pub changed_at: Option<i64>,
}

/// How a source's events are deduplicated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dedupe {
    /// By `(source, event id)` within the retention: for sources that cannot
    /// replay exactly (webhooks, REST polling, overlapping SQL polls).
    #[default]
    Id,
    /// Not at all: the source resumes from an exact position saved with each
    /// batch (files, CDC, broker offsets), so it never hands an event twice.
    Position,
}

/// One accepted event and its outcomes.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: String,
    pub correlation_id: String,
    /// When weft accepted it, ms since the epoch: dedupe retention, latency
    /// and the age of pending rows count from here.
    pub received_at: i64,
    /// The event's own time (CloudEvents `time`), ms; may be long ago.
    pub event_time: i64,
    /// The source's version of the record (an LSN, an `updated_at`, a
    /// sequence), compared by sinks that refuse stale writes.
    pub source_version: Option<String>,
    /// The source transaction it belongs to (CDC), if any.
    pub group_id: Option<String>,
    /// W3C trace context, carried across the queue.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// CloudEvents attributes, JSON text. Only a rejection stores them (its
    /// DLQ entry): the Ingestor leaves them empty when no outcome is one.
    pub attributes: String,
    /// The record as received: JSON text, or the raw text of a bad record.
    /// Like `attributes`, needed (and filled by the Ingestor) only when an
    /// outcome is a rejection; routed rows carry their own payloads.
    pub payload: String,
    pub outcomes: Vec<FlowOutcome>,
}

/// A source's batch: stored whole or not at all, with its checkpoint.
#[derive(Debug, Clone, Default)]
pub struct IngestBatch {
    pub source: String,
    pub dedupe: Dedupe,
    pub events: Vec<NewEvent>,
    /// `(key, value)` saved under `source`.
    pub checkpoint: Option<(String, String)>,
    /// The epoch of this node's lease of `source` ([`Journal::lease_source`])
    /// when the source runs on one node at a time: the batch commits only
    /// while that lease is still this node's, else `StoreError::Fenced`.
    /// `None`: not leased (webhooks, a single hub's store).
    pub fence: Option<i64>,
}

/// What an ingest, replay or discard did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events stored (ingest) or entries changed (replay, discard).
    pub changed: usize,
    /// Events already accepted before (ingest only): not stored, not counted.
    pub duplicates: usize,
    /// What was counted per flow (received, filtered, rejected): exactly the
    /// store's counter changes, duplicates excluded, for the metrics.
    pub flows: Vec<FlowCounted>,
}

/// Flow-level counter changes of one operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowCounted {
    pub flow: String,
    pub received: u64,
    pub filtered: u64,
    pub rejected: u64,
}

impl Applied {
    pub(crate) fn count(&mut self, flow: &str, f: impl FnOnce(&mut FlowCounted)) {
        let i = match self.flows.iter().position(|c| c.flow == flow) {
            Some(i) => i,
            None => {
                self.flows.push(FlowCounted {
                    flow: flow.to_owned(),
                    ..Default::default()
                });
                self.flows.len() - 1
            }
        };
        f(&mut self.flows[i]);
    }
}

/// Helpers for tests of this crate and others (not a stable interface).
#[doc(hidden)]
pub mod testing {
    use std::path::Path;

    use crate::{SqliteJournal, StoreError};

    /// Create an SQLite store at schema `version` (an older release's).
    pub fn create_at_version(path: &Path, version: usize) -> Result<(), StoreError> {
        let mut conn = rusqlite::Connection::open(path)?;
        crate::schema::migrate_to(&mut conn, version)
    }

    /// The schema version of the store at `path`.
    pub fn version(path: &Path) -> Result<i64, StoreError> {
        crate::schema::version(&rusqlite::Connection::open(path)?)
    }

    /// Cap the store file at `pages` pages (at least its size now): later
    /// growth fails as on a full disk.
    pub async fn limit_pages(j: &SqliteJournal, pages: u64) -> Result<(), StoreError> {
        j.exec_on_writer(&format!("PRAGMA max_page_count = {pages}"))
            .await
    }
}

pub(crate) fn configure(conn: &Connection, synchronous: Synchronous) -> Result<(), StoreError> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // bigger pages of cache help the 1M-row backfills; WAL checkpoints run
    // on their own thread (writer.rs)
    // 16 MB per connection: the writer's working set is the outbox's ends
    // (a claim or an ingest touches a few MB); more only grew the process
    conn.pragma_update(None, "cache_size", -16_000)?;
    Ok(())
}

/// The SHA-256 of a DLQ entry's payload, hex: what is kept of it once the
/// entry is resolved (the same on every engine; PostgreSQL's migration 4
/// computes it in SQL, `encode(sha256(convert_to(payload, 'UTF8')), 'hex')`).
pub fn payload_sha256(payload: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(payload.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
