//! The `postgres_cdc` source: every insert, update, delete and truncate of
//! the published tables, read from PostgreSQL's logical replication stream
//! (`pgoutput`, protocol 1, text values) through `pg_walstream`, after an
//! initial snapshot consistent with the slot.
//!
//! ## Setup
//! The control connection (plain `tokio-postgres`) checks `wal_level =
//! logical`, creates the publication `FOR TABLE <tables>` when it does not
//! exist, and looks at the slot. Then, by what weft saved (the checkpoint)
//! and what the slot says:
//!
//! | saved position | slot | what happens |
//! |---|---|---|
//! | none, or an unfinished snapshot | any | (`snapshot: initial`) the slot is dropped if there, created again exporting its snapshot, the published tables are copied in that snapshot (`op: r`), then the stream starts at the slot's consistent point: no gap, no overlap |
//! | none | there / absent | (`snapshot: never`) stream from the slot's position / from a new slot's |
//! | streaming, at `flush_lsn` | there, not ahead of it | resume: `START_REPLICATION` at `flush_lsn`; changes at or before the saved `(commit_lsn, tx_ordinal)` are skipped |
//! | streaming | gone, `lost`, or confirmed past `flush_lsn` (recreated, or used by another consumer) | changes may be lost: the source stops with the reason and the way out, `weft cdc resnapshot` (`on_slot_lost: fail`), or drops the slot and snapshots again (`resnapshot`) |
//! | any, with a whole `weft cdc resnapshot` request pending | any | the slot is dropped and the initial snapshot taken again |
//! | streaming, a published table not in the position's `tables` (added to the config or the publication), or named by a `--tables` request | there | that table alone is copied in the snapshot of a second slot (`<slot>_sync`, dropped after) and its streamed changes committing below that snapshot's LSN are skipped; then resume as above |
//!
//! A crash during the snapshot copies it again from the start, with a new
//! slot (its rows come again, as `op: r` with the new snapshot's LSN):
//! a snapshot cannot be resumed in another transaction without mixing two
//! points in time.
//!
//! ## Exactly once into the journal
//! Every change has a position `(commit_lsn, tx_ordinal)`: its
//! transaction's commit LSN and its place in the transaction (1, 2, ...;
//! a truncate of several tables counts once per table). Transactions arrive
//! whole and in commit order (no in-progress streaming), so positions only
//! grow. Changes are committed to the journal in batches (up to
//! `batch_size`, small transactions grouped), each with the position after
//! it as the checkpoint in the same transaction ([`CHECKPOINT_KEY`]): the
//! last committed transaction's end (`flush_lsn`) and, when a big
//! transaction is split over batches, how far into the next one. Only after
//! that commit is `flush_lsn` given to PostgreSQL as the confirmed flush
//! position, so the slot never lets go of WAL weft has not stored. A
//! restart asks for the stream from `flush_lsn`; PostgreSQL sends every
//! transaction committing after it again (and, when the confirmation did
//! not reach it, some before), and those at or before the saved position
//! are skipped by position, never by LSN alone: several changes share one
//! LSN (a multi-row statement, `BEGIN` and its first change) and none of
//! them is skipped unless stored. The journal dedupes nothing for this
//! source (`Dedupe::Position`).
//!
//! While idle, a heartbeat (every `heartbeat`, default 10 s) confirms the
//! server's send position when no transaction is open (WAL of other
//! databases or unpublished tables is not held back either), saves it as
//! the checkpoint, and measures the slot's lag
//! (`weft_cdc_slot_lag_bytes{source}`); `weft_cdc_lag_seconds{source}` is
//! the age of the last transaction committed to the journal, when it was.
//!
//! ## Event shape (Debezium-like)
//! ```json
//! {"op": "u",
//!  "before": {"id": 7, "status": "new"},
//!  "after": {"id": 7, "status": "paid", "total": "12.50"},
//!  "key": {"id": 7},
//!  "source": {"db": "shop", "schema": "public", "table": "orders",
//!             "lsn": "0/1A2B3C8", "commit_lsn": "0/1A2B400", "xid": 7391,
//!             "tx_ordinal": 2, "commit_time": "2026-12-01T10:00:00.123456Z",
//!             "snapshot": false},
//!  "unchanged_toast": ["notes"]}
//! ```
//! - `op`: `c` insert, `u` update, `d` delete, `t` truncate, `r` a row of
//!   the initial snapshot.
//! - `before`: updates and deletes, as the table's replica identity allows:
//!   with `REPLICA IDENTITY FULL` the whole old row; with the default (the
//!   primary key) only the key's columns (deletes always; updates only when
//!   the key changed, else `null`). Never columns PostgreSQL did not send.
//! - `after`: inserts, updates and snapshot rows. An unchanged TOASTed
//!   column of an update (a large value PostgreSQL did not send again) is
//!   left out of `after` and named in `unchanged_toast`, never written as
//!   null; under `REPLICA IDENTITY FULL` it is taken from the old row instead.
//! - `key`: the primary key's columns (the replica identity's when there is
//!   no primary key); `null` for a truncate.
//! - `source.lsn`: the change's own LSN (shared by several changes of one
//!   statement); `commit_lsn` + `tx_ordinal` identify the change. Snapshot
//!   rows have the snapshot's LSN as both, their row number as
//!   `tx_ordinal`, and no `xid` or `commit_time`.
//! - Column values by type: [`decode`].
//!
//! Differences from Debezium: no `schema` part (the shape is JSON), no
//! `ts_ms` (CloudEvents `time` is the commit time; snapshot rows: when
//! read), `commit_time` instead of `source.ts_ms`, `tx_ordinal` instead of
//! `sequence`, `unchanged_toast` instead of the
//! `__debezium_unavailable_value` placeholder, a truncate carries its table
//! in `source` and is one event per table, and there is no transaction
//! metadata topic.
//!
//! CloudEvents: id `<commit_lsn>#<tx_ordinal>` (snapshot rows
//! `snapshot@<lsn>#<n>`), type `<system>.change`, subject
//! `<schema>.<table>:<key>` (the key's value, or a JSON array of a
//! composite key's values), which is the default entity key of a flow
//! reading this source (`key:` in the flow replaces it), so changes of one
//! row are delivered in order.
//!
//! ## Schema changes
//! A table's new shape arrives as a `Relation` message before its first
//! change; the types of new columns are read from the catalog and decoding
//! follows. The new field is recorded as drift by the runtime.
//!
//! A table that joins the publication while weft streams (its `Relation`
//! arrives, it is not in `tables`) ends the session: the next one copies
//! it alone first. A `weft cdc resnapshot` request
//! ([`super::RESNAPSHOT_KEY`]) is read at each start and at idle
//! heartbeats; it is served when a position naming its id is committed
//! with the snapshot's last rows.
//!
//! ## One event per transaction
//! With `events: per_transaction` each committed transaction is one event
//! (or consecutive parts of at most `max_transaction_changes` changes):
//! ```json
//! {"db": "shop", "xid": 7391, "commit_lsn": "0/1A2B400",
//!  "commit_time": "2026-12-01T10:00:00.123456Z", "part": 1, "last": true,
//!  "changes": [{"op": "c", "before": null, "after": {...}, "key": {...},
//!               "source": {..., "tx_ordinal": 1}}, ...]}
//! ```
//! id `txn@<commit_lsn>#<part>`, type `<system>.transaction`, subject the
//! system's name (one queue: transactions delivered in commit order).
//! Snapshot rows stay one event each. How parts are cut and why their
//! ids survive a replay: [`super::txn`].
//!
//! ## Not (yet) here
//! A table that leaves the publication while weft streams and joins it
//! again is not copied again.

pub mod config;
pub mod decode;
mod setup;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::BoxFuture;
use pg_walstream::{
    ColumnValue, EventType, LogicalReplicationStream, ReplicaIdentity, ReplicationError,
    ReplicationStreamConfig, RowData, SharedLsnFeedback, SnapshotOutcome, StreamingMode,
    format_lsn,
};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use weft_core::Event;

pub use config::PgCdcConfig;
use config::{EventsMode, OnSlotLost, SnapshotMode};
use decode::{Kind, PgType};
use setup::SetupError;

use super::txn::{self, Shape, TxnGroup};
use super::{RESNAPSHOT_KEY, ResnapshotRequest};
use crate::source::{Batch, Checkpoint, Ingest, IngestError, Record, Source, SourceError};

/// Checkpoint key of the position.
pub const CHECKPOINT_KEY: &str = "postgres_cdc_position";

/// Gauge: bytes of WAL between the server's current position and the
/// slot's confirmed one.
pub const SLOT_LAG_BYTES: &str = "weft_cdc_slot_lag_bytes";
/// Gauge: seconds between the last stored transaction's commit and its
/// store commit.
pub const LAG_SECONDS: &str = "weft_cdc_lag_seconds";

const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest slot name, in bytes (ASCII: validated).
const MAX_SLOT: usize = 63;
/// Messages between the replication reader and the batcher.
const CHANNEL: usize = 4096;

/// What weft saved: where the source is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Position {
    /// The initial snapshot of the slot created at `lsn`, `rows` rows in.
    Snapshot {
        slot: String,
        #[serde(with = "lsn_text")]
        lsn: u64,
        rows: u64,
    },
    /// Streaming: every transaction ending at or before `flush_lsn` is
    /// stored, and of the transaction committing at `commit_lsn` the changes
    /// up to `ordinal` (all of it when `commit_lsn` ends at or before
    /// `flush_lsn`).
    Stream {
        slot: String,
        #[serde(with = "lsn_text")]
        flush_lsn: u64,
        #[serde(with = "lsn_text")]
        commit_lsn: u64,
        ordinal: u64,
        /// The published tables whose rows weft has (snapshotted, or
        /// streamed from their start); a published table not in it is
        /// snapshotted alone at the next start. `None`: a position saved
        /// before weft kept it (every published table is taken as had).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tables: Option<BTreeSet<String>>,
        /// Tables snapshotted alone, with their snapshot's LSN: their
        /// streamed changes committing below it are in the snapshot and
        /// skipped. Dropped once `flush_lsn` passes it.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty", with = "lsn_map")]
        synced_at: BTreeMap<String, u64>,
        /// The last `weft cdc resnapshot` request acted on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        served: Option<String>,
    },
}

mod lsn_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, u64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k, pg_walstream::format_lsn(*v))))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, u64>, D::Error> {
        let m = BTreeMap::<String, String>::deserialize(d)?;
        m.into_iter()
            .map(|(k, v)| {
                pg_walstream::parse_lsn(&v)
                    .map(|l| (k, l))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

mod lsn_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&pg_walstream::format_lsn(*v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        pg_walstream::parse_lsn(&s).map_err(serde::de::Error::custom)
    }
}

/// A streaming position, for skipping what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamPos {
    flush: u64,
    commit: u64,
    ordinal: u64,
}

impl StreamPos {
    /// Whether the change `(commit, ordinal)` is stored already.
    fn covers(&self, commit: u64, ordinal: u64) -> bool {
        commit < self.commit || (commit == self.commit && ordinal <= self.ordinal)
    }
}

/// Why a session ended.
#[derive(Debug)]
enum Failure {
    /// Connect again after a pause and go on from the checkpoint.
    Retry(String),
    /// Stop the source.
    Fatal(String),
    Shutdown,
}

impl From<SetupError> for Failure {
    fn from(e: SetupError) -> Self {
        match e {
            SetupError::Retry(m) => Failure::Retry(m),
            SetupError::Fatal(m) => Failure::Fatal(m),
        }
    }
}

fn repl(what: &str) -> impl Fn(ReplicationError) -> Failure + '_ {
    move |e| match e {
        ReplicationError::Cancelled(_) => Failure::Shutdown,
        ReplicationError::Authentication(m) | ReplicationError::Config(m) => {
            Failure::Fatal(format!("{what}: {m}"))
        }
        other => Failure::Retry(format!("{what}: {other}")),
    }
}

/// The PostgreSQL CDC source.
pub struct PgCdcSource {
    system: String,
    cfg: PgCdcConfig,
}

impl PgCdcSource {
    pub fn new(system: &str, cfg: PgCdcConfig) -> Self {
        PgCdcSource {
            system: system.to_owned(),
            cfg,
        }
    }

    /// The saved position of this source's slot.
    async fn saved(&self, ingest: &dyn Ingest) -> Result<Option<Position>, Failure> {
        let text = ingest
            .checkpoint(CHECKPOINT_KEY)
            .await
            .map_err(|e| Failure::Fatal(format!("store error: {e}")))?;
        let Some(text) = text else { return Ok(None) };
        let pos: Position = serde_json::from_str(&text).map_err(|e| {
            Failure::Fatal(format!("the saved position `{text}` is not valid: {e}"))
        })?;
        let slot = match &pos {
            Position::Snapshot { slot, .. } | Position::Stream { slot, .. } => slot,
        };
        if slot != &self.cfg.slot {
            tracing::warn!(
                system = %self.system, saved = %slot, slot = %self.cfg.slot,
                "postgres_cdc: the saved position is of another slot; starting over with this one"
            );
            return Ok(None);
        }
        Ok(Some(pos))
    }

    /// A `weft cdc resnapshot` request not acted on yet.
    async fn request(
        &self,
        ingest: &dyn Ingest,
        saved: Option<&Position>,
    ) -> Result<Option<ResnapshotRequest>, Failure> {
        let text = ingest
            .checkpoint(RESNAPSHOT_KEY)
            .await
            .map_err(|e| Failure::Fatal(format!("store error: {e}")))?;
        let Some(text) = text else { return Ok(None) };
        let r: ResnapshotRequest = serde_json::from_str(&text).map_err(|e| {
            Failure::Fatal(format!("the resnapshot request `{text}` is not valid: {e}"))
        })?;
        let served = match saved {
            Some(Position::Stream { served, .. }) => served.as_deref(),
            _ => None,
        };
        Ok((served != Some(r.id.as_str())).then_some(r))
    }

    /// What to do with the slot, given what was saved.
    async fn plan(
        &self,
        control: &Client,
        db: &str,
        saved: Option<Position>,
        request: Option<&ResnapshotRequest>,
    ) -> Result<(Plan, Option<StreamPos>), Failure> {
        let name = &self.cfg.slot;
        let info = setup::slot(control, name).await?;
        if let Some(i) = &info
            && (i.plugin.as_deref() != Some("pgoutput") || i.database.as_deref() != Some(db))
        {
            return Err(Failure::Fatal(format!(
                "replication slot `{name}` exists but is not a `pgoutput` slot of database `{db}` \
                 (plugin {:?}, database {:?}); name another `slot`",
                i.plugin, i.database
            )));
        }
        if let Some(r) = request.filter(|r| r.tables.is_empty()) {
            tracing::warn!(system = %self.system, slot = %name, request = %r.id, "postgres_cdc: a new snapshot was requested (`weft cdc resnapshot`); dropping the slot and copying every table again");
            if info.is_some() {
                setup::drop_slot(control, &self.system, name).await?;
            }
            return Ok((Plan::Snapshot, None));
        }
        let stream_pos = match saved {
            Some(Position::Stream {
                flush_lsn,
                commit_lsn,
                ordinal,
                ..
            }) => Some(StreamPos {
                flush: flush_lsn,
                commit: commit_lsn,
                ordinal,
            }),
            _ => None,
        };
        if let Some(p) = stream_pos {
            let lost = match &info {
                None => Some("does not exist".to_owned()),
                Some(i) if i.wal_status.as_deref() == Some("lost") => Some(
                    "was invalidated (`wal_status = lost`: the WAL it needed is gone)".to_owned(),
                ),
                Some(i) if i.confirmed_flush.is_some_and(|c| c > p.flush) => Some(format!(
                    "is confirmed up to {} but weft stored changes only up to {} (it was created again, or another consumer used it)",
                    i.confirmed_flush.map(format_lsn).unwrap_or_default(),
                    format_lsn(p.flush)
                )),
                Some(_) => None,
            };
            let Some(why) = lost else {
                return Ok((Plan::Resume { from: p.flush }, Some(p)));
            };
            if self.cfg.on_slot_lost == OnSlotLost::Fail {
                return Err(Failure::Fatal(format!(
                    "replication slot `{name}` {why}: changes after {} may be lost. \
                     To start over with a new initial snapshot, run `weft cdc resnapshot -c <config> {}` \
                     (the hub need not be stopped), or set `on_slot_lost: resnapshot`",
                    format_lsn(p.flush),
                    self.system
                )));
            }
            tracing::warn!(system = %self.system, slot = %name, reason = %why, "postgres_cdc: slot lost; taking a new snapshot");
            setup::drop_slot(control, &self.system, name).await?;
            return Ok((Plan::Snapshot, None));
        }
        match self.cfg.snapshot {
            SnapshotMode::Initial => {
                if info.is_some() {
                    // no position of ours: a slot left by an unfinished snapshot
                    // (or made by hand); its snapshot is gone
                    tracing::info!(system = %self.system, slot = %name, "postgres_cdc: the slot has no saved position; creating it again for the initial snapshot");
                    setup::drop_slot(control, &self.system, name).await?;
                }
                Ok((Plan::Snapshot, None))
            }
            SnapshotMode::Never => match info.and_then(|i| i.confirmed_flush) {
                Some(from) => Ok((Plan::Resume { from }, None)),
                None => Ok((Plan::Fresh, None)),
            },
        }
    }

    /// One session: connect, plan, read and store until shutdown or a failure.
    async fn session(
        &self,
        ingest: &Arc<dyn Ingest>,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        let saved = self.saved(ingest.as_ref()).await?;
        let url = self.cfg.url.expose().trim().to_owned();
        let control = Arc::new(setup::connect(&url, &self.system).await?);
        setup::check_settings(&control).await?;
        setup::ensure_publication(
            &control,
            &self.system,
            &self.cfg.publication,
            &self.cfg.tables,
        )
        .await?;
        let db = setup::database(&control).await?;
        // a table sync's slot left by a crash would hold WAL forever
        setup::drop_slot(&control, &self.system, &sync_slot(&self.cfg.slot)).await?;
        let request = self.request(ingest.as_ref(), saved.as_ref()).await?;
        let (plan, skip) = self
            .plan(&control, &db, saved.clone(), request.as_ref())
            .await?;
        // per-table sync: published tables weft has no rows of, and those
        // a request names, are snapshotted alone before streaming resumes
        let published: BTreeSet<String> =
            setup::publication_tables(&control, &self.cfg.publication)
                .await?
                .into_iter()
                .collect();
        let (had, mut synced_at) = match &saved {
            Some(Position::Stream {
                tables, synced_at, ..
            }) => (tables.clone(), synced_at.clone()),
            _ => (None, BTreeMap::new()),
        };
        let mut sync: BTreeSet<String> = BTreeSet::new();
        let mut tables = None;
        if let Plan::Resume { .. } = plan {
            let initial = self.cfg.snapshot == SnapshotMode::Initial;
            let had: BTreeSet<String> = match had {
                Some(h) if initial => h.intersection(&published).cloned().collect(),
                // a position from before weft kept the set: every table is had
                None if initial => published.clone(),
                _ => BTreeSet::new(),
            };
            if initial {
                sync.extend(published.difference(&had).cloned());
                tables = Some(had);
            }
            if let Some(r) = &request {
                for t in &r.tables {
                    if published.contains(t) {
                        sync.insert(t.clone());
                    } else {
                        tracing::warn!(system = %self.system, table = %t, "postgres_cdc: a table to snapshot again is not in the publication; skipped");
                    }
                }
            }
            if let Some(t) = tables.as_mut() {
                for s in &sync {
                    t.remove(s);
                }
            }
            synced_at.retain(|t, _| !sync.contains(t));
        }
        let (tx, rx) = mpsc::channel(CHANNEL);
        let stop = shutdown.child_token();
        let reader = Reader {
            system: self.system.clone(),
            slot: self.cfg.slot.clone(),
            publication: self.cfg.publication.clone(),
            url: replication_url(&url),
            heartbeat: self.cfg.heartbeat,
            event_source: format!("weft:{}", self.system),
            event_type: self.cfg.event_type.clone(),
            db,
            control: control.clone(),
            types: HashMap::new(),
            rels: HashMap::new(),
            tx,
            skip,
            below: synced_at.clone().into_iter().collect(),
            sync: sync.iter().cloned().collect(),
            known: tables.as_ref().map(|t| t.union(&sync).cloned().collect()),
            txn: (self.cfg.events == EventsMode::PerTransaction).then(|| Shape {
                source: format!("weft:{}", self.system),
                ty: self.cfg.event_type.clone(),
                subject: self.system.clone(),
                max: self.cfg.max_transaction_changes,
            }),
        };
        let reading = tokio::spawn(reader.run(plan, stop.clone()));
        let served = match &saved {
            Some(Position::Stream { served, .. }) => served.clone(),
            _ => None,
        };
        let mut batcher = Batcher {
            system: self.system.clone(),
            slot: self.cfg.slot.clone(),
            batch_size: self.cfg.batch_size,
            saved: match plan {
                Plan::Resume { .. } => saved,
                _ => None,
            },
            feedback: None,
            tables,
            synced_at,
            served,
            pending: request.map(|r| r.id),
        };
        let stored = batcher.run(rx, ingest.as_ref(), shutdown).await;
        stop.cancel();
        let read = match reading.await {
            Ok(r) => r,
            Err(e) => Err(Failure::Retry(format!(
                "the replication reader failed: {e}"
            ))),
        };
        match (stored, read) {
            (Err(Failure::Fatal(m)), _) | (_, Err(Failure::Fatal(m))) => Err(Failure::Fatal(m)),
            _ if shutdown.is_cancelled() => Ok(()),
            (Err(e @ Failure::Retry(_)), _) | (_, Err(e @ Failure::Retry(_))) => Err(e),
            _ => Err(Failure::Retry("the replication stream ended".into())),
        }
    }
}

impl Source for PgCdcSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let fail = |message: String| SourceError {
                system: self.system.clone(),
                message,
            };
            // pg_walstream reads the socket on the caller's runtime only on a
            // multi-thread one; on a current-thread runtime it moves it to a
            // thread whose buffered data a heartbeat's cancellation would drop
            if tokio::runtime::Handle::current().runtime_flavor()
                != tokio::runtime::RuntimeFlavor::MultiThread
            {
                return Err(fail(
                    "the postgres_cdc source needs tokio's multi-thread runtime".into(),
                ));
            }
            let mut backoff = Duration::from_secs(1);
            loop {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                match self.session(&ingest, &shutdown).await {
                    Ok(()) | Err(Failure::Shutdown) => return Ok(()),
                    Err(Failure::Fatal(m)) => {
                        tracing::error!(system = %self.system, error = %m, "postgres_cdc: stopped");
                        return Err(fail(m));
                    }
                    Err(Failure::Retry(m)) => {
                        tracing::error!(
                            system = %self.system, error = %m, retry_in = ?backoff,
                            "postgres_cdc: replication failed; connecting again after a pause"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.cancelled() => return Ok(()),
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        })
    }
}

/// The slot of a per-table sync (created for its snapshot, then dropped).
fn sync_slot(slot: &str) -> String {
    let mut name: String = slot.chars().take(MAX_SLOT - 5).collect();
    name.push_str("_sync");
    name
}

/// `url` as a replication connection's.
fn replication_url(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}replication=database")
}

/// How the replication stream starts.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Create the slot exporting a snapshot, copy, then stream.
    Snapshot,
    /// Stream from this LSN of the existing slot.
    Resume { from: u64 },
    /// Create the slot without a snapshot and stream from its start.
    Fresh,
}

/// From the reader to the batcher, in stream order.
#[derive(Debug)]
enum Msg {
    /// Streaming started: the feedback the batcher confirms through.
    Started(Arc<SharedLsnFeedback>),
    /// A transaction begins (its changes follow).
    Begin,
    /// A change not stored yet (with `events: per_transaction`, a
    /// transaction's event, or a part of it: `ordinal` is its last
    /// change's).
    Change {
        records: Vec<Record>,
        /// How many changes (for the batch size).
        changes: usize,
        commit_lsn: u64,
        ordinal: u64,
    },
    /// The transaction is complete: `ordinal` changes, ending at `end_lsn`.
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        ordinal: u64,
        time: DateTime<Utc>,
    },
    /// The snapshot of the slot created at `lsn` begins.
    SnapshotStart { lsn: u64 },
    /// Row `n` of the snapshot.
    SnapshotRow { event: Box<Event>, lsn: u64, n: u64 },
    /// Every row of the snapshot (of `tables`) was sent; streaming follows
    /// from `lsn`.
    SnapshotDone { lsn: u64, tables: Vec<String> },
    /// A heartbeat with no transaction open: every transaction committing
    /// before `lsn` was sent.
    Idle { lsn: u64 },
    /// A snapshot of some tables alone begins (the position stays).
    SyncStart,
    /// A row of it.
    SyncRow { event: Box<Event> },
    /// Those tables are copied as of `lsn` (`None`: there were none):
    /// streaming resumes.
    Synced {
        lsn: Option<u64>,
        tables: Vec<String>,
    },
}

/// Groups the reader's messages into batches and stores them, each with
/// its position, then confirms the position to PostgreSQL.
struct Batcher {
    system: String,
    slot: String,
    batch_size: usize,
    /// The position stored last.
    saved: Option<Position>,
    feedback: Option<Arc<SharedLsnFeedback>>,
    /// Carried in every streaming position (see [`Position::Stream`]).
    tables: Option<BTreeSet<String>>,
    synced_at: BTreeMap<String, u64>,
    served: Option<String>,
    /// The request this session acts on: served once its snapshot is in.
    pending: Option<String>,
}

/// What is read and not stored yet.
#[derive(Default)]
struct Pending {
    records: Vec<Record>,
    /// Changes in them (a transaction event holds many).
    changes: usize,
    /// The position after the records.
    pos: Option<Position>,
    /// Within a transaction or the snapshot: not a point to stop at, unless
    /// the batch is full.
    open: bool,
    /// The commit time of the last transaction in the batch.
    commit_time: Option<DateTime<Utc>>,
}

impl Batcher {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Msg>,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        let mut p = Pending {
            pos: self.saved.clone(),
            ..Default::default()
        };
        loop {
            let msg = match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // nothing more at hand: store what is complete
                    if !p.open && p.pos != self.saved {
                        self.flush(&mut p, ingest, shutdown).await?;
                        continue;
                    }
                    tokio::select! {
                        m = rx.recv() => match m {
                            Some(m) => m,
                            None => return Ok(()),
                        },
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
            };
            if matches!(msg, Msg::Idle { .. }) {
                self.check_request(ingest).await?;
            }
            self.apply(&mut p, msg);
            if p.changes >= self.batch_size {
                self.flush(&mut p, ingest, shutdown).await?;
            }
        }
    }

    fn apply(&mut self, p: &mut Pending, msg: Msg) {
        let flush_lsn = match &p.pos {
            Some(Position::Stream { flush_lsn, .. }) => *flush_lsn,
            _ => 0,
        };
        match msg {
            Msg::Started(fb) => {
                if let Some(Position::Stream { flush_lsn, .. }) = &self.saved {
                    fb.update_flushed_lsn(*flush_lsn);
                    fb.update_applied_lsn(*flush_lsn);
                }
                self.feedback = Some(fb);
            }
            Msg::Begin => p.open = true,
            Msg::Change {
                records,
                changes,
                commit_lsn,
                ordinal,
            } => {
                p.records.extend(records);
                p.changes += changes;
                p.pos = Some(self.stream_pos(flush_lsn, commit_lsn, ordinal));
            }
            Msg::Commit {
                commit_lsn,
                end_lsn,
                ordinal,
                time,
            } => {
                p.open = false;
                p.commit_time = Some(time);
                let flush = end_lsn.max(flush_lsn);
                // a table's snapshot LSN passed: nothing below it comes again
                self.synced_at.retain(|_, at| *at > flush);
                p.pos = Some(self.stream_pos(flush, commit_lsn, ordinal));
            }
            Msg::SnapshotStart { lsn } => {
                p.open = true;
                p.pos = Some(Position::Snapshot {
                    slot: self.slot.clone(),
                    lsn,
                    rows: 0,
                });
            }
            Msg::SnapshotRow { event, lsn, n } => {
                p.records.push(Record::Good(*event));
                p.changes += 1;
                p.pos = Some(Position::Snapshot {
                    slot: self.slot.clone(),
                    lsn,
                    rows: n,
                });
            }
            Msg::SnapshotDone { lsn, tables } => {
                p.open = false;
                self.tables = Some(tables.into_iter().collect());
                self.synced_at.clear();
                self.served = self.pending.take().or(self.served.take());
                p.pos = Some(self.stream_pos(lsn, lsn, 0));
            }
            Msg::SyncStart => p.open = true,
            Msg::SyncRow { event } => {
                p.records.push(Record::Good(*event));
                p.changes += 1;
            }
            Msg::Synced { lsn, tables } => {
                p.open = false;
                if let Some(lsn) = lsn {
                    for t in tables {
                        if let Some(had) = self.tables.as_mut() {
                            had.insert(t.clone());
                        }
                        self.synced_at.insert(t, lsn);
                    }
                }
                self.served = self.pending.take().or(self.served.take());
                if let Some(Position::Stream {
                    flush_lsn,
                    commit_lsn,
                    ordinal,
                    ..
                }) = p.pos.clone()
                {
                    p.pos = Some(self.stream_pos(flush_lsn, commit_lsn, ordinal));
                }
            }
            Msg::Idle { lsn } => {
                if !p.open
                    && lsn > flush_lsn
                    && let Some(Position::Stream {
                        commit_lsn,
                        ordinal,
                        ..
                    }) = p.pos.clone()
                {
                    self.synced_at.retain(|_, at| *at > lsn);
                    p.pos = Some(self.stream_pos(lsn, commit_lsn, ordinal));
                }
            }
        }
    }

    fn stream_pos(&self, flush_lsn: u64, commit_lsn: u64, ordinal: u64) -> Position {
        Position::Stream {
            slot: self.slot.clone(),
            flush_lsn,
            commit_lsn,
            ordinal,
            tables: self.tables.clone(),
            synced_at: self.synced_at.clone(),
            served: self.served.clone(),
        }
    }

    /// A `weft cdc resnapshot` request made while streaming (looked at on
    /// idle heartbeats): the session ends so that the next one acts on it.
    async fn check_request(&self, ingest: &dyn Ingest) -> Result<(), Failure> {
        let text = match ingest.checkpoint(RESNAPSHOT_KEY).await {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::debug!(system = %self.system, error = %e, "postgres_cdc: the resnapshot request not read");
                return Ok(());
            }
        };
        let Ok(r) = serde_json::from_str::<ResnapshotRequest>(&text) else {
            return Ok(());
        };
        if self.served.as_deref() == Some(r.id.as_str())
            || self.pending.as_deref() == Some(r.id.as_str())
        {
            return Ok(());
        }
        tracing::info!(system = %self.system, request = %r.id, "postgres_cdc: a new snapshot was requested; starting over to take it");
        Err(Failure::Retry(
            "a new snapshot was requested (`weft cdc resnapshot`)".into(),
        ))
    }

    /// Store the pending records with their position; then confirm it.
    async fn flush(
        &mut self,
        p: &mut Pending,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        let Some(pos) = p.pos.clone() else {
            return Ok(());
        };
        let value = serde_json::to_string(&pos)
            .map_err(|e| Failure::Fatal(format!("cannot save the position: {e}")))?;
        let batch = Batch {
            records: {
                p.changes = 0;
                std::mem::take(&mut p.records)
            },
            checkpoint: Some(Checkpoint {
                key: CHECKPOINT_KEY.into(),
                value,
            }),
        };
        loop {
            match ingest.ingest(batch.clone()).await {
                Ok(_) => break,
                Err(IngestError::Unavailable(m)) => {
                    tracing::debug!(system = %self.system, reason = %m, "ingest unavailable; waiting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.cancelled() => return Err(Failure::Shutdown),
                    }
                }
                Err(IngestError::Store(m)) | Err(IngestError::Rejected(m)) => {
                    return Err(Failure::Fatal(format!("store error: {m}")));
                }
            }
        }
        tracing::debug!(system = %self.system, position = ?pos, "postgres_cdc: stored");
        // committed: now PostgreSQL may let go of it
        if let (Position::Stream { flush_lsn, .. }, Some(fb)) = (&pos, &self.feedback) {
            fb.update_flushed_lsn(*flush_lsn);
            fb.update_applied_lsn(*flush_lsn);
        }
        if let Some(t) = p.commit_time.take() {
            let lag = (Utc::now() - t).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::gauge!(LAG_SECONDS, "source" => self.system.clone()).set(lag.max(0.0));
        }
        self.saved = Some(pos);
        Ok(())
    }
}

/// A table as the stream describes it, with what decoding needs.
#[derive(Debug, Clone, PartialEq)]
struct Rel {
    schema: String,
    table: String,
    columns: Vec<(String, Kind)>,
    /// The primary key's columns (else the replica identity's).
    key: Vec<String>,
}

/// The transaction being read.
struct Tx {
    xid: u32,
    commit: u64,
    time: DateTime<Utc>,
    ordinal: u64,
    /// Stored whole already: nothing of it is sent.
    stored: bool,
    /// Its changes, with `events: per_transaction`.
    group: Option<TxnGroup>,
}

/// Reads the replication stream (and the snapshot before it), turns
/// changes into events and sends them to the batcher.
struct Reader {
    system: String,
    slot: String,
    publication: String,
    url: String,
    heartbeat: Duration,
    event_source: String,
    event_type: String,
    db: String,
    control: Arc<Client>,
    types: HashMap<u32, PgType>,
    rels: HashMap<u32, Rel>,
    tx: mpsc::Sender<Msg>,
    /// What is stored already (a resumed stream).
    skip: Option<StreamPos>,
    /// `schema.table` snapshotted alone at this LSN: its changes committing
    /// below it are in the snapshot.
    below: HashMap<String, u64>,
    /// Tables to snapshot alone before streaming resumes.
    sync: Vec<String>,
    /// The published tables weft has rows of (`None`: not tracked); a
    /// table joining the publication mid-stream restarts the session so
    /// that it is snapshotted first.
    known: Option<HashSet<String>>,
    /// `Some` with `events: per_transaction`.
    txn: Option<Shape>,
}

/// A token cancelled after `d` (or with `stop`): wakes the reader for a
/// heartbeat. pg_walstream's read returns `Cancelled` without consuming a
/// frame (buffered data stays buffered).
struct Tick {
    token: CancellationToken,
    timer: tokio::task::JoinHandle<()>,
}

impl Tick {
    fn new(stop: &CancellationToken, d: Duration) -> Self {
        let token = stop.child_token();
        let t = token.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(d).await;
            t.cancel();
        });
        Tick { token, timer }
    }
}

impl Drop for Tick {
    fn drop(&mut self) {
        self.timer.abort();
    }
}

impl Reader {
    async fn send(&self, m: Msg) -> Result<(), Failure> {
        self.tx
            .send(m)
            .await
            .map_err(|_| Failure::Retry("the batcher stopped".into()))
    }

    fn stream_config(&self) -> ReplicationStreamConfig {
        ReplicationStreamConfig::builder(self.slot.clone(), self.publication.clone())
            .with_protocol_version(1)
            .with_streaming_mode(StreamingMode::Off)
            .with_feedback_interval(Duration::from_secs(1))
            .with_connection_timeout(Duration::from_secs(10))
    }

    async fn run(mut self, plan: Plan, stop: CancellationToken) -> Result<(), Failure> {
        let connecting = LogicalReplicationStream::new(&self.url, self.stream_config());
        let stream = tokio::select! {
            s = connecting => s.map_err(repl("cannot open the replication connection"))?,
            _ = stop.cancelled() => return Err(Failure::Shutdown),
        };
        let mut stream = match plan {
            Plan::Snapshot => self.snapshot(stream, &stop).await?,
            Plan::Resume { from } => {
                self.sync_tables(&stop).await?;
                let mut s = stream;
                s.start(Some(from))
                    .await
                    .map_err(repl("cannot start replication"))?;
                s
            }
            Plan::Fresh => {
                let mut s = stream;
                s.start(None)
                    .await
                    .map_err(repl("cannot start replication"))?;
                s
            }
        };
        tracing::info!(system = %self.system, slot = %self.slot, "postgres_cdc: streaming");
        self.send(Msg::Started(stream.shared_lsn_feedback.clone()))
            .await?;
        let result = self.stream(&mut stream, &stop).await;
        // the last confirmed position (the batcher's, committed) goes out
        if let Err(e) = stream.stop().await {
            tracing::debug!(system = %self.system, error = %e, "postgres_cdc: final feedback not sent");
        }
        result
    }

    async fn snapshot(
        &mut self,
        stream: LogicalReplicationStream,
        stop: &CancellationToken,
    ) -> Result<LogicalReplicationStream, Failure> {
        let outcome = stream
            .snapshot()
            .await
            .map_err(repl("cannot create the slot for the snapshot"))?;
        let snap = match outcome {
            SnapshotOutcome::Available(s) => s,
            SnapshotOutcome::Unavailable(_) => {
                return Err(Failure::Retry(format!(
                    "replication slot `{}` appeared before its snapshot could be taken",
                    self.slot
                )));
            }
        };
        let lsn = snap.consistent_point().value();
        let tables: Vec<String> = snap.tables().iter().map(|t| t.qualified_name()).collect();
        tracing::info!(
            system = %self.system, slot = %self.slot, lsn = %format_lsn(lsn),
            tables = snap.tables().len(), "postgres_cdc: initial snapshot"
        );
        self.send(Msg::SnapshotStart { lsn }).await?;
        let expected = setup::estimated_rows(&self.control, &tables).await;
        let mut progress = super::SnapshotProgress::new(&self.system, expected);
        let mut rows = snap.with_cancellation(stop.clone()).rows();
        let mut n = 0u64;
        while let Some(row) = rows.next_row().await.map_err(repl("the snapshot failed"))? {
            n += 1;
            progress.row();
            let rel = self.learn_info(&row.relation).await?;
            let after = row_json(&rel, &row.data);
            let event = self.event(
                &rel,
                "r",
                None,
                Some(after),
                Vec::new(),
                Meta {
                    id: format!("snapshot@{}#{n}", format_lsn(lsn)),
                    lsn,
                    commit: lsn,
                    ordinal: n,
                    xid: None,
                    time: None,
                    snapshot: true,
                },
            );
            self.send(Msg::SnapshotRow {
                event: Box::new(event),
                lsn,
                n,
            })
            .await?;
        }
        progress.done();
        self.known = Some(tables.iter().cloned().collect());
        self.send(Msg::SnapshotDone { lsn, tables }).await?;
        tracing::info!(system = %self.system, rows = n, "postgres_cdc: initial snapshot read");
        let mut stream = rows
            .finish()
            .await
            .map_err(repl("cannot finish the snapshot"))?;
        stream
            .start(Some(lsn))
            .await
            .map_err(repl("cannot start replication"))?;
        Ok(stream)
    }

    async fn stream(
        &mut self,
        stream: &mut LogicalReplicationStream,
        stop: &CancellationToken,
    ) -> Result<(), Failure> {
        let mut tick = Tick::new(stop, self.heartbeat);
        let mut tx: Option<Tx> = None;
        loop {
            let ev = match stream.next_event(&tick.token).await {
                Ok(ev) => ev,
                Err(ReplicationError::Cancelled(_)) => {
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    self.heartbeat(stream, tx.is_none()).await?;
                    tick = Tick::new(stop, self.heartbeat);
                    continue;
                }
                Err(e) => return Err(repl("replication failed")(e)),
            };
            match ev.event_type {
                EventType::Begin {
                    transaction_id,
                    final_lsn,
                    commit_timestamp,
                } => {
                    let commit = final_lsn.value();
                    let stored = self.skip.is_some_and(|s| commit < s.commit);
                    if !stored {
                        self.send(Msg::Begin).await?;
                    }
                    let group = match (&self.txn, stored) {
                        (Some(_), false) => {
                            let mut meta = Map::new();
                            meta.insert("db".into(), Value::String(self.db.clone()));
                            meta.insert("xid".into(), Value::from(transaction_id));
                            meta.insert("commit_lsn".into(), Value::String(format_lsn(commit)));
                            meta.insert("commit_time".into(), txn::time_text(commit_timestamp));
                            Some(TxnGroup::new(
                                format_lsn(commit),
                                meta,
                                Some(commit_timestamp),
                            ))
                        }
                        _ => None,
                    };
                    tx = Some(Tx {
                        xid: transaction_id,
                        commit,
                        time: commit_timestamp,
                        ordinal: 0,
                        stored,
                        group,
                    });
                }
                EventType::Commit {
                    commit_lsn,
                    end_lsn,
                    commit_timestamp,
                } => {
                    let Some(mut t) = tx.take() else {
                        return Err(Failure::Retry("a commit without its begin".into()));
                    };
                    if let (Some(g), Some(shape)) = (t.group.take(), &self.txn)
                        && let Some(part) = g.finish(shape)
                    {
                        self.send_part(part, t.commit).await?;
                    }
                    if !t.stored {
                        self.send(Msg::Commit {
                            commit_lsn: commit_lsn.value(),
                            end_lsn: end_lsn.value(),
                            ordinal: t.ordinal,
                            time: commit_timestamp,
                        })
                        .await?;
                    }
                }
                EventType::Relation {
                    relation_id,
                    namespace,
                    relation_name,
                    columns,
                    ..
                } => {
                    let name = format!("{namespace}.{relation_name}");
                    if let Some(known) = &self.known
                        && !known.contains(&name)
                    {
                        // its rows before now are not in weft: snapshot it
                        // alone (the next session), then stream it
                        return Err(Failure::Retry(format!(
                            "table `{name}` joined the publication; snapshotting it before streaming on"
                        )));
                    }
                    let cols: Vec<(String, u32, bool)> = columns
                        .iter()
                        .map(|c| (c.name.to_string(), c.type_id, c.is_key))
                        .collect();
                    self.learn(relation_id, &namespace, &relation_name, &cols)
                        .await?;
                }
                EventType::Insert {
                    relation_oid, data, ..
                } => {
                    let Some((t, ordinal)) = self.next_ordinal(&mut tx)? else {
                        continue;
                    };
                    let rel = self.rel(relation_oid)?;
                    if self.in_sync(&rel, t.commit) {
                        continue;
                    }
                    let after = row_json(&rel, &data);
                    let event = self.event(
                        &rel,
                        "c",
                        None,
                        Some(after),
                        Vec::new(),
                        t.meta(ev.lsn.value(), ordinal),
                    );
                    self.send_change(&mut tx, event, t.commit, ordinal).await?;
                }
                EventType::Update {
                    relation_oid,
                    old_data,
                    new_data,
                    replica_identity,
                    key_columns,
                    ..
                } => {
                    let Some((t, ordinal)) = self.next_ordinal(&mut tx)? else {
                        continue;
                    };
                    let rel = self.rel(relation_oid)?;
                    if self.in_sync(&rel, t.commit) {
                        continue;
                    }
                    let full = replica_identity == ReplicaIdentity::Full;
                    let before = old_data.as_ref().map(|o| {
                        let mut m = row_json(&rel, o);
                        if !full {
                            m.retain(|k, _| key_columns.iter().any(|c| c.as_ref() == k));
                        }
                        m
                    });
                    let mut after = row_json(&rel, &new_data);
                    let mut unchanged = Vec::new();
                    for (name, _) in &rel.columns {
                        if after.contains_key(name) {
                            continue;
                        }
                        match before.as_ref().and_then(|b| b.get(name)).filter(|_| full) {
                            Some(v) => {
                                after.insert(name.clone(), v.clone());
                            }
                            None => unchanged.push(name.clone()),
                        }
                    }
                    let event = self.event(
                        &rel,
                        "u",
                        before,
                        Some(after),
                        unchanged,
                        t.meta(ev.lsn.value(), ordinal),
                    );
                    self.send_change(&mut tx, event, t.commit, ordinal).await?;
                }
                EventType::Delete {
                    relation_oid,
                    old_data,
                    replica_identity,
                    key_columns,
                    ..
                } => {
                    let Some((t, ordinal)) = self.next_ordinal(&mut tx)? else {
                        continue;
                    };
                    let rel = self.rel(relation_oid)?;
                    if self.in_sync(&rel, t.commit) {
                        continue;
                    }
                    let mut before = row_json(&rel, &old_data);
                    if replica_identity != ReplicaIdentity::Full {
                        before.retain(|k, _| key_columns.iter().any(|c| c.as_ref() == k));
                    }
                    let event = self.event(
                        &rel,
                        "d",
                        Some(before),
                        None,
                        Vec::new(),
                        t.meta(ev.lsn.value(), ordinal),
                    );
                    self.send_change(&mut tx, event, t.commit, ordinal).await?;
                }
                EventType::Truncate { tables, .. } => {
                    for full_name in tables {
                        let Some((t, ordinal)) = self.next_ordinal(&mut tx)? else {
                            continue;
                        };
                        let rel = self
                            .rels
                            .values()
                            .find(|r| format!("{}.{}", r.schema, r.table) == *full_name)
                            .cloned()
                            .unwrap_or_else(|| {
                                let (s, n) = full_name.split_once('.').unwrap_or(("", &full_name));
                                Rel {
                                    schema: s.to_owned(),
                                    table: n.to_owned(),
                                    columns: Vec::new(),
                                    key: Vec::new(),
                                }
                            });
                        if self.in_sync(&rel, t.commit) {
                            continue;
                        }
                        let event = self.event(
                            &rel,
                            "t",
                            None,
                            None,
                            Vec::new(),
                            t.meta(ev.lsn.value(), ordinal),
                        );
                        self.send_change(&mut tx, event, t.commit, ordinal).await?;
                    }
                }
                // protocol 1 without streaming or two-phase: nothing else carries changes
                _ => {}
            }
        }
    }

    /// Whether a change of `rel` committing at `commit` is in the table's
    /// own snapshot (taken after it committed).
    fn in_sync(&self, rel: &Rel, commit: u64) -> bool {
        self.below
            .get(&format!("{}.{}", rel.schema, rel.table))
            .is_some_and(|at| commit < *at)
    }

    /// Copy the tables of `sync` alone, in the exported snapshot of a
    /// second slot (`<slot>_sync`, dropped after): consistent with the main
    /// slot's stream by LSN (their changes committing below its consistent point are
    /// in the copy and skipped when streamed; those at or after it are
    /// not in it). The supabase/etl way, without a slot per table.
    async fn sync_tables(&mut self, stop: &CancellationToken) -> Result<(), Failure> {
        if self.sync.is_empty() {
            return self
                .send(Msg::Synced {
                    lsn: None,
                    tables: Vec::new(),
                })
                .await;
        }
        let name = sync_slot(&self.slot);
        // a slot of its own, only for its exported snapshot (pg_walstream
        // refuses a temporary one there); one left by a crash is dropped
        // at every session start
        let cfg = ReplicationStreamConfig::builder(name.clone(), self.publication.clone())
            .with_protocol_version(1)
            .with_streaming_mode(StreamingMode::Off)
            .with_connection_timeout(Duration::from_secs(10));
        let connecting = LogicalReplicationStream::new(&self.url, cfg);
        let stream = tokio::select! {
            s = connecting => s.map_err(repl("cannot open a replication connection for a table snapshot"))?,
            _ = stop.cancelled() => return Err(Failure::Shutdown),
        };
        let mut snap = match stream
            .snapshot()
            .await
            .map_err(repl("cannot create the slot for a table snapshot"))?
        {
            SnapshotOutcome::Available(s) => s,
            SnapshotOutcome::Unavailable(_) => {
                return Err(Failure::Retry(format!(
                    "replication slot `{name}` appeared before its snapshot could be taken"
                )));
            }
        };
        let want: HashSet<String> = self.sync.iter().cloned().collect();
        snap.retain_tables(|t| want.contains(&t.qualified_name()));
        let tables: Vec<String> = snap.tables().iter().map(|t| t.qualified_name()).collect();
        let lsn = snap.consistent_point().value();
        tracing::info!(
            system = %self.system, lsn = %format_lsn(lsn), tables = %tables.join(", "),
            "postgres_cdc: snapshot of tables new to weft"
        );
        self.send(Msg::SyncStart).await?;
        let expected = setup::estimated_rows(&self.control, &tables).await;
        let mut progress = super::SnapshotProgress::new(&self.system, expected);
        let mut rows = snap.with_cancellation(stop.clone()).rows();
        let mut n = 0u64;
        while let Some(row) = rows
            .next_row()
            .await
            .map_err(repl("the table snapshot failed"))?
        {
            n += 1;
            progress.row();
            let rel = self.learn_info(&row.relation).await?;
            let after = row_json(&rel, &row.data);
            let event = self.event(
                &rel,
                "r",
                None,
                Some(after),
                Vec::new(),
                Meta {
                    id: format!("snapshot@{}#{n}", format_lsn(lsn)),
                    lsn,
                    commit: lsn,
                    ordinal: n,
                    xid: None,
                    time: None,
                    snapshot: true,
                },
            );
            self.send(Msg::SyncRow {
                event: Box::new(event),
            })
            .await?;
        }
        drop(
            rows.finish()
                .await
                .map_err(repl("cannot finish the table snapshot"))?,
        );
        setup::drop_slot(&self.control, &self.system, &name).await?;
        // relations learned from the catalog: the stream describes them again
        self.rels.clear();
        for t in &tables {
            self.below.insert(t.clone(), lsn);
        }
        progress.done();
        tracing::info!(system = %self.system, rows = n, "postgres_cdc: table snapshot read");
        self.send(Msg::Synced {
            lsn: Some(lsn),
            tables,
        })
        .await
    }

    /// The next change's ordinal in the open transaction, or `None` when
    /// it is stored already.
    fn next_ordinal(&self, tx: &mut Option<Tx>) -> Result<Option<(TxMeta, u64)>, Failure> {
        let Some(t) = tx.as_mut() else {
            return Err(Failure::Retry("a change outside a transaction".into()));
        };
        t.ordinal += 1;
        if t.stored || self.skip.is_some_and(|s| s.covers(t.commit, t.ordinal)) {
            return Ok(None);
        }
        Ok(Some((
            TxMeta {
                xid: t.xid,
                commit: t.commit,
                time: t.time,
            },
            t.ordinal,
        )))
    }

    /// A change to the batcher, or (`events: per_transaction`) into its
    /// transaction's event, sending the part it completes.
    async fn send_change(
        &self,
        tx: &mut Option<Tx>,
        event: Event,
        commit_lsn: u64,
        ordinal: u64,
    ) -> Result<(), Failure> {
        if let (Some(shape), Some(g)) = (&self.txn, tx.as_mut().and_then(|t| t.group.as_mut())) {
            return match g.push(shape, ordinal, Record::Good(event)) {
                Some(part) => self.send_part(part, commit_lsn).await,
                None => Ok(()),
            };
        }
        self.send(Msg::Change {
            records: vec![Record::Good(event)],
            changes: 1,
            commit_lsn,
            ordinal,
        })
        .await
    }

    async fn send_part(&self, part: txn::Part, commit_lsn: u64) -> Result<(), Failure> {
        self.send(Msg::Change {
            records: part.records,
            changes: part.changes,
            commit_lsn,
            ordinal: part.ordinal,
        })
        .await
    }

    /// Confirm what is stored, offer the send position when no transaction
    /// is open, measure the slot's lag.
    async fn heartbeat(
        &self,
        stream: &mut LogicalReplicationStream,
        idle: bool,
    ) -> Result<(), Failure> {
        stream
            .send_feedback()
            .await
            .map_err(repl("cannot confirm the position"))?;
        if idle {
            self.send(Msg::Idle {
                lsn: stream.current_lsn(),
            })
            .await?;
        }
        match setup::slot_lag_bytes(&self.control, &self.slot).await {
            Ok(Some(lag)) => {
                metrics::gauge!(SLOT_LAG_BYTES, "source" => self.system.clone()).set(lag as f64)
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(system = %self.system, error = %e, "postgres_cdc: slot lag not measured")
            }
        }
        Ok(())
    }

    fn rel(&self, oid: u32) -> Result<Rel, Failure> {
        self.rels.get(&oid).cloned().ok_or_else(|| {
            Failure::Retry(format!("a change of relation {oid} before its description"))
        })
    }

    /// A relation from the snapshot's catalog read.
    async fn learn_info(&mut self, info: &pg_walstream::RelationInfo) -> Result<Rel, Failure> {
        if let Some(r) = self.rels.get(&info.relation_id) {
            return Ok(r.clone());
        }
        let cols: Vec<(String, u32, bool)> = info
            .columns
            .iter()
            .map(|c| (c.name.to_string(), c.type_id, c.is_key()))
            .collect();
        self.learn(
            info.relation_id,
            &info.namespace,
            &info.relation_name,
            &cols,
        )
        .await
    }

    /// Describe relation `oid` (a `Relation` message: its first use on this
    /// connection, or a new shape).
    async fn learn(
        &mut self,
        oid: u32,
        schema: &str,
        table: &str,
        cols: &[(String, u32, bool)],
    ) -> Result<Rel, Failure> {
        let oids: Vec<u32> = cols.iter().map(|c| c.1).collect();
        setup::types(&self.control, &mut self.types, &oids).await?;
        let mut key = setup::primary_key(&self.control, oid).await?;
        if key.is_empty() {
            key = cols.iter().filter(|c| c.2).map(|c| c.0.clone()).collect();
        }
        let rel = Rel {
            schema: schema.to_owned(),
            table: table.to_owned(),
            columns: cols
                .iter()
                .map(|(n, t, _)| (n.clone(), decode::kind_of(*t, &self.types)))
                .collect(),
            key,
        };
        if let Some(old) = self.rels.get(&oid)
            && old != &rel
        {
            tracing::info!(
                system = %self.system, table = %format!("{schema}.{table}"),
                columns = %rel.columns.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(", "),
                "postgres_cdc: the table's shape changed"
            );
        }
        self.rels.insert(oid, rel.clone());
        Ok(rel)
    }

    fn event(
        &self,
        rel: &Rel,
        op: &str,
        before: Option<Map<String, Value>>,
        after: Option<Map<String, Value>>,
        unchanged: Vec<String>,
        meta: Meta,
    ) -> Event {
        let row = after.as_ref().or(before.as_ref());
        let key = match row {
            Some(r) if op != "t" && !rel.key.is_empty() => {
                let mut k = Map::new();
                for c in &rel.key {
                    k.insert(c.clone(), r.get(c).cloned().unwrap_or(Value::Null));
                }
                Some(k)
            }
            _ => None,
        };
        let subject = match &key {
            Some(k) if k.values().all(|v| !v.is_null()) => {
                let text = if k.len() == 1 {
                    match k.values().next() {
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => v.to_string(),
                        None => String::new(),
                    }
                } else {
                    Value::Array(rel.key.iter().filter_map(|c| k.get(c).cloned()).collect())
                        .to_string()
                };
                format!("{}.{}:{text}", rel.schema, rel.table)
            }
            _ => format!("{}.{}", rel.schema, rel.table),
        };
        let mut source = Map::new();
        source.insert("db".into(), Value::String(self.db.clone()));
        source.insert("schema".into(), Value::String(rel.schema.clone()));
        source.insert("table".into(), Value::String(rel.table.clone()));
        source.insert("lsn".into(), Value::String(format_lsn(meta.lsn)));
        source.insert("commit_lsn".into(), Value::String(format_lsn(meta.commit)));
        source.insert("xid".into(), meta.xid.map_or(Value::Null, Value::from));
        source.insert("tx_ordinal".into(), Value::from(meta.ordinal));
        source.insert(
            "commit_time".into(),
            meta.time.map_or(Value::Null, |t| {
                Value::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
            }),
        );
        source.insert("snapshot".into(), Value::Bool(meta.snapshot));
        let mut data = Map::new();
        data.insert("op".into(), Value::String(op.to_owned()));
        data.insert("before".into(), before.map_or(Value::Null, Value::Object));
        data.insert("after".into(), after.map_or(Value::Null, Value::Object));
        data.insert("key".into(), key.map_or(Value::Null, Value::Object));
        data.insert("source".into(), Value::Object(source));
        if !unchanged.is_empty() {
            data.insert(
                "unchanged_toast".into(),
                Value::Array(unchanged.into_iter().map(Value::String).collect()),
            );
        }
        let mut ev = Event::new(
            meta.id,
            self.event_source.clone(),
            self.event_type.clone(),
            None,
            Value::Object(data),
        );
        if let Some(t) = meta.time {
            ev.time = t;
        }
        ev.subject = Some(subject);
        ev
    }
}

/// The open transaction, as its changes need it.
#[derive(Debug, Clone, Copy)]
struct TxMeta {
    xid: u32,
    commit: u64,
    time: DateTime<Utc>,
}

impl TxMeta {
    fn meta(&self, lsn: u64, ordinal: u64) -> Meta {
        Meta {
            id: format!("{}#{ordinal}", format_lsn(self.commit)),
            lsn,
            commit: self.commit,
            ordinal,
            xid: Some(self.xid),
            time: Some(self.time),
            snapshot: false,
        }
    }
}

/// Where a change is.
struct Meta {
    id: String,
    lsn: u64,
    commit: u64,
    ordinal: u64,
    xid: Option<u32>,
    time: Option<DateTime<Utc>>,
    snapshot: bool,
}

/// The columns a row carries, as JSON by their kinds (columns it does not
/// carry, unchanged TOAST values, are absent).
fn row_json(rel: &Rel, data: &RowData) -> Map<String, Value> {
    let mut m = Map::new();
    for (i, (name, value)) in data.iter().enumerate() {
        let kind = match rel.columns.get(i) {
            Some((n, k)) if n.as_str() == name.as_ref() => k,
            _ => match rel
                .columns
                .iter()
                .find(|(n, _)| n.as_str() == name.as_ref())
            {
                Some((_, k)) => k,
                None => &Kind::Text,
            },
        };
        let v = match value {
            ColumnValue::Null => Value::Null,
            ColumnValue::Text(b) => decode::to_json(kind, &String::from_utf8_lossy(b)),
            ColumnValue::Binary(b) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
        };
        m.insert(name.to_string(), v);
    }
    m
}

/// `weft check` for a PostgreSQL CDC source: connect, the server settings
/// CDC needs, the REPLICATION attribute, each table (there, readable, with
/// a primary key or replica identity), the publication, and the slot:
/// when it exists, that it is weft's kind and not lost; when not, that one
/// can be created (a temporary slot, created and dropped at once).
pub async fn probe(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> crate::probe::Finding {
    use crate::probe::Finding;
    let cfg = match config::PgCdcConfig::from_settings(system, settings) {
        Ok(c) => c,
        Err(issues) => return Finding::fail(config::describe(&issues)),
    };
    match probe_pg(system, &cfg).await {
        Ok((notes, warn)) if warn => Finding::warn(notes.join("; ")),
        Ok((notes, _)) => Finding::ok(notes.join("; ")),
        Err(e) => Finding::fail(e.to_string()),
    }
}

async fn probe_pg(
    system: &str,
    cfg: &config::PgCdcConfig,
) -> Result<(Vec<String>, bool), SetupError> {
    let fail = |what: &'static str| {
        move |e: tokio_postgres::Error| {
            SetupError::Fatal(format!("{what}: {}", setup::pg_message(&e)))
        }
    };
    let control = setup::connect(cfg.url.expose().trim(), system).await?;
    setup::check_settings(&control).await?;
    let mut notes = vec!["wal_level logical".to_owned()];
    let mut warn = false;
    let role = control
        .query_one(
            "SELECT current_user::text, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(fail("cannot read the role"))?;
    let (user, replication): (String, bool) = (role.get(0), role.get(1));
    if !replication {
        return Err(SetupError::Fatal(format!(
            "role `{user}` may not replicate: `ALTER ROLE {user} REPLICATION`"
        )));
    }
    for (schema, table) in &cfg.tables {
        let row = control
            .query_opt(
                "SELECT c.relreplident::text, \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                        has_table_privilege(c.oid, 'SELECT') \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[schema, table],
            )
            .await
            .map_err(fail("cannot read the tables"))?;
        let Some(row) = row else {
            return Err(SetupError::Fatal(format!(
                "table `{schema}.{table}` does not exist (or `{user}` cannot see it)"
            )));
        };
        let (ident, pk, select): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
        if !select {
            return Err(SetupError::Fatal(format!(
                "`{user}` may not read `{schema}.{table}` (the snapshot selects it): GRANT SELECT"
            )));
        }
        if !pk && ident != "f" && ident != "i" {
            warn = true;
            notes.push(format!(
                "`{schema}.{table}` has no primary key or replica identity: its updates and deletes carry no key"
            ));
        }
    }
    notes.push(format!("{} tables readable", cfg.tables.len()));
    let published = control
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await
        .map_err(fail("cannot read the publications"))?;
    notes.push(match published {
        Some(_) => format!(
            "publication `{}` has {} tables",
            cfg.publication,
            setup::publication_tables(&control, &cfg.publication)
                .await?
                .len()
        ),
        None => format!("publication `{}` will be created", cfg.publication),
    });
    let db = setup::database(&control).await?;
    match setup::slot(&control, &cfg.slot).await? {
        Some(i) => {
            if i.plugin.as_deref() != Some("pgoutput") || i.database.as_deref() != Some(db.as_str())
            {
                return Err(SetupError::Fatal(format!(
                    "replication slot `{}` exists but is not a `pgoutput` slot of database `{db}`",
                    cfg.slot
                )));
            }
            if i.wal_status.as_deref() == Some("lost") {
                return Err(SetupError::Fatal(format!(
                    "replication slot `{}` was invalidated (`wal_status = lost`)",
                    cfg.slot
                )));
            }
            notes.push(format!(
                "slot `{}` confirmed up to {}{}",
                cfg.slot,
                i.confirmed_flush
                    .map(format_lsn)
                    .unwrap_or_else(|| "nothing".into()),
                if i.active_pid.is_some() {
                    " (in use now)"
                } else {
                    ""
                }
            ));
        }
        None => {
            let name = format!("weft_check_{}", std::process::id());
            control
                .query_one(
                    "SELECT 1 FROM pg_create_logical_replication_slot($1, 'pgoutput', true)",
                    &[&name],
                )
                .await
                .map_err(fail("a replication slot cannot be created"))?;
            control
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await
                .map_err(fail("cannot drop the test slot"))?;
            notes.push(format!(
                "slot `{}` will be created (a test slot was created and dropped)",
                cfg.slot
            ));
        }
    }
    Ok((notes, warn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_cover_what_is_stored_and_nothing_after() {
        let p = StreamPos {
            flush: 100,
            commit: 200,
            ordinal: 3,
        };
        assert!(p.covers(150, 99));
        assert!(p.covers(200, 1) && p.covers(200, 3));
        assert!(
            !p.covers(200, 4),
            "changes after the saved one in the same transaction"
        );
        assert!(!p.covers(201, 1));
    }

    #[test]
    fn the_checkpoint_round_trips_with_lsns_as_postgres_writes_them() {
        let p = Position::Stream {
            slot: "weft_a".into(),
            flush_lsn: 0x16_B374_D848,
            commit_lsn: 0x16_B374_D800,
            ordinal: 2,
            tables: None,
            synced_at: BTreeMap::new(),
            served: None,
        };
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(
            text,
            r#"{"phase":"stream","slot":"weft_a","flush_lsn":"16/B374D848","commit_lsn":"16/B374D800","ordinal":2}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&text).unwrap(), p);
        let q = Position::Stream {
            slot: "weft_a".into(),
            flush_lsn: 0x20,
            commit_lsn: 0x10,
            ordinal: 0,
            tables: Some(["public.a".to_owned(), "public.b".to_owned()].into()),
            synced_at: [("public.b".to_owned(), 0x1_0000_0010)].into(),
            served: Some("r1".into()),
        };
        let text = serde_json::to_string(&q).unwrap();
        assert!(
            text.contains(r#""synced_at":{"public.b":"1/10"}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Position>(&text).unwrap(), q);
    }

    #[test]
    fn a_table_sync_is_saved_with_its_lsn_until_the_stream_passes_it() {
        let saved = Position::Stream {
            slot: "s".into(),
            flush_lsn: 100,
            commit_lsn: 90,
            ordinal: 2,
            tables: Some(["public.a".to_owned()].into()),
            synced_at: BTreeMap::new(),
            served: None,
        };
        let mut b = Batcher {
            system: "x".into(),
            slot: "s".into(),
            batch_size: 10,
            saved: Some(saved.clone()),
            feedback: None,
            tables: Some(["public.a".to_owned()].into()),
            synced_at: BTreeMap::new(),
            served: None,
            pending: Some("r1".into()),
        };
        let mut p = Pending {
            pos: Some(saved),
            ..Default::default()
        };
        b.apply(&mut p, Msg::SyncStart);
        assert!(p.open, "not a point to stop at during the copy");
        b.apply(
            &mut p,
            Msg::Synced {
                lsn: Some(500),
                tables: vec!["public.b".into()],
            },
        );
        let Some(Position::Stream {
            flush_lsn,
            tables,
            synced_at,
            served,
            ..
        }) = p.pos.clone()
        else {
            panic!("a streaming position");
        };
        assert_eq!(flush_lsn, 100, "the stream resumes where it was");
        assert_eq!(
            tables,
            Some(["public.a".to_owned(), "public.b".to_owned()].into())
        );
        assert_eq!(synced_at, BTreeMap::from([("public.b".to_owned(), 500)]));
        assert_eq!(
            served.as_deref(),
            Some("r1"),
            "the request is served with it"
        );
        let commit = |b: &mut Batcher, p: &mut Pending, at: u64| {
            b.apply(p, Msg::Begin);
            b.apply(
                p,
                Msg::Commit {
                    commit_lsn: at,
                    end_lsn: at + 8,
                    ordinal: 1,
                    time: Utc::now(),
                },
            );
        };
        commit(&mut b, &mut p, 300);
        assert!(
            matches!(&p.pos, Some(Position::Stream { synced_at, .. }) if synced_at.len() == 1),
            "below the copy's LSN: kept"
        );
        commit(&mut b, &mut p, 600);
        assert!(
            matches!(&p.pos, Some(Position::Stream { synced_at, served, .. })
                if synced_at.is_empty() && served.as_deref() == Some("r1")),
            "past it: gone; the served request stays"
        );
    }

    #[test]
    fn the_replication_url_asks_for_a_database_replication_session() {
        assert_eq!(
            replication_url("postgresql://u@h/db"),
            "postgresql://u@h/db?replication=database"
        );
        assert_eq!(
            replication_url("postgresql://u@h/db?sslmode=disable"),
            "postgresql://u@h/db?sslmode=disable&replication=database"
        );
    }
}
