//! weft's embedded durable store, on SQLite in WAL mode.
//!
//! One writer thread owns the write connection and applies every state
//! change ([`Op`]) in *group commits*: it takes whatever operations are
//! waiting (up to a limit), applies each inside its own savepoint, then
//! commits them all with one fsync. A caller's future resolves only after
//! that commit, so "Ok" always means "on disk". Readers use their own
//! connections ([`Reader`]) and never block the writer (WAL).
//!
//! Tables (see `schema.rs`): `inbox` (accepted events, dedupe on
//! `(source, event_id)`), `outbox` (one row per event, flow and destination,
//! deleted when delivered), `dlq`, `checkpoints`, `flow_counts`.
//! Every change to the outbox or DLQ updates `flow_counts` in the same
//! transaction, so the accounting identity holds after any crash:
//! `received = filtered + rejected + discarded(flow)`
//! ` + delivered + dead_lettered + discarded + pending` (per destination).

mod drift;
pub mod journal;
pub mod memory;
mod reader;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rusqlite::Connection;
pub use weft_core::config::Synchronous;

pub use drift::{DriftBatch, DriftEvent, NewDrift};
pub use journal::{
    ClaimRequest, Claimed, FollowUp, Journal, JournalRead, LaneId, Outcome, Refusal, Replay,
    Settle, Settled, Settlement, WriteOutcome,
};
pub use memory::MemoryJournal;
pub use reader::{CrosswalkRow, DlqEntry, DlqFilter, FlowCounts, OutboxRow, Reader};

/// DLQ list pages hold this many entries unless asked for fewer.
pub const DLQ_PAGE: usize = 1000;
pub use schema::latest_version;

/// Store failures. `Busy` is retryable; the rest are not expected in normal
/// operation and stop the caller.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("schema: {0}")]
    Schema(String),
    #[error("the store is closed")]
    Closed,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// A replay that would regress the destination, or that must wait.
    #[error("{}", refusal_text(.0))]
    Refused(Refusal),
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
    /// JSON text.
    pub payload: String,
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
    /// CloudEvents attributes, JSON text.
    pub attributes: String,
    /// The record as received: JSON text, or the raw text of a bad record.
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
}

/// A state change, applied atomically by the writer.
#[derive(Debug, Clone)]
pub enum Op {
    Ingest(IngestBatch),
    /// Delivered: delete from the outbox, count.
    Delivered(Vec<i64>),
    /// Ids destinations gave outbox rows (still in the outbox): upsert them
    /// into the crosswalk. Applied before the rows' [`Op::Delivered`].
    Captured(Vec<CapturedRow>),
    /// A failed attempt that will be retried at `next_at` (ms).
    Retry {
        id: i64,
        attempts: u32,
        next_at: i64,
        error: String,
    },
    /// Out of attempts or permanent: move from the outbox to the DLQ.
    DeadLetter {
        id: i64,
        attempts: u32,
        error: String,
    },
    /// Put a delivery-stage DLQ entry back in the outbox (optionally with an
    /// edited payload), keeping its idempotency key and correlation id.
    Replay {
        dlq_id: i64,
        payload: Option<String>,
        note: String,
    },
    /// Re-run a parse/map-stage DLQ entry: the caller re-ran the flow and
    /// gives the new outcome.
    ReplayMapped {
        dlq_id: i64,
        outcome: FlowOutcome,
        note: String,
    },
    /// Mark a DLQ entry discarded.
    Discard {
        dlq_id: i64,
        note: String,
    },
    /// Forget inbox entries (dedupe ids) accepted before `before` (ms),
    /// oldest first, at most `limit`.
    PruneInbox {
        before: i64,
        limit: usize,
    },
    /// Drift detection: new drift events, counts of records showing known
    /// ones, and the stream's shape when it changed.
    Drift(DriftBatch),
}

/// The id a destination gave the record of one outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedRow {
    pub outbox_id: i64,
    pub external_id: String,
}

/// What an [`Op`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events stored (ingest) or rows changed (other ops).
    pub changed: usize,
    /// Events already in the inbox (ingest only).
    pub duplicates: usize,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    tx: mpsc::SyncSender<writer::Job>,
}

impl Store {
    /// Open (creating and migrating if needed) and start the writer thread.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Invalid(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut conn = Connection::open(path)?;
        configure(&conn, synchronous)?;
        schema::migrate(&mut conn)?;
        let tx = writer::spawn(conn, path)?;
        Ok(Store {
            path: path.to_owned(),
            tx,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Apply one operation; resolves after it is committed.
    pub async fn apply(&self, op: Op) -> Result<Applied, StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = writer::Job { op, reply };
        // the channel is bounded: a full queue waits here (backpressure)
        let tx = self.tx.clone();
        let sent = tokio::task::spawn_blocking(move || tx.send(job).is_ok())
            .await
            .unwrap_or(false);
        if !sent {
            return Err(StoreError::Closed);
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Apply from synchronous code (CLI).
    pub fn apply_blocking(&self, op: Op) -> Result<Applied, StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(writer::Job { op, reply })
            .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// A new read connection.
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Reader::open(&self.path)
    }
}

fn configure(conn: &Connection, synchronous: Synchronous) -> Result<(), StoreError> {
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
    conn.pragma_update(None, "cache_size", -64_000)?;
    Ok(())
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
