//! The SQLite journal: the default engine, embedded, one process.
//!
//! Leases live in the outbox rows (`state = 2`, `token`, `next_at` = the
//! deadline), like they will on PostgreSQL; a hub that starts ends every
//! lease a previous run left (that run is gone: the hub holds an exclusive
//! lock on `<store>.lock` while it runs). Tools (`weft dlq replay` while a
//! hub runs) are a second writer: every transaction is IMMEDIATE, the
//! journal keeps no state in memory that another writer could make stale
//! (order_seq comes from `journal_meta` in each transaction), and the hub's
//! lanes poll, so they see the tool's rows.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::future::BoxFuture;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};
use weft_core::config::Synchronous;

use crate::journal::{
    ClaimRequest, Claimed, Journal, JournalRead, LaneId, Replay, Settle, Settled,
};
use crate::writer::{self, Job, Op, Reply};
use crate::{
    Applied, CrosswalkRow, DlqEntry, DlqFilter, DriftBatch, FlowCounts, IngestBatch, OutboxRow,
    Reader, StoreError,
};

/// Who opens the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `weft run`: the only hub on this store (an exclusive lock); ends the
    /// leases of a previous run.
    Hub,
    /// A command changing state beside a running hub, or alone: touches no
    /// lease.
    Tool,
}

/// The SQLite [`Journal`]; cheap to share behind an `Arc`.
pub struct SqliteJournal {
    path: PathBuf,
    tx: mpsc::Sender<Job>,
    pool: Mutex<Vec<Reader>>,
    _lock: Option<File>,
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl SqliteJournal {
    /// Open (creating and migrating if needed) and start the writer thread.
    pub fn open(
        path: &Path,
        synchronous: Synchronous,
        role: Role,
    ) -> Result<SqliteJournal, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Invalid(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let lock = match role {
            Role::Hub => {
                let lp = lock_path(path);
                let f = File::create(&lp).map_err(|e| {
                    StoreError::Invalid(format!("cannot create {}: {e}", lp.display()))
                })?;
                match f.try_lock() {
                    Ok(()) => Some(f),
                    Err(std::fs::TryLockError::WouldBlock) => {
                        return Err(StoreError::Invalid(format!(
                            "another `weft run` is using the store {} (it holds {})",
                            path.display(),
                            lp.display()
                        )));
                    }
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(StoreError::Invalid(format!(
                            "cannot lock {}: {e}",
                            lp.display()
                        )));
                    }
                }
            }
            Role::Tool => None,
        };
        let mut conn = Connection::open(path)?;
        crate::configure(&conn, synchronous)?;
        crate::schema::migrate(&mut conn)?;
        if role == Role::Hub {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = writer::expire_leases(&tx, i64::MAX)?;
            tx.commit()?;
            if n > 0 {
                tracing::info!(rows = n, "leases of the previous run ended");
            }
        }
        let tx = writer::spawn(conn, path, synchronous)?;
        Ok(SqliteJournal {
            path: path.to_owned(),
            tx,
            pool: Mutex::new(Vec::new()),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a `weft run` holds this store now.
    pub fn hub_running(path: &Path) -> bool {
        let Ok(f) = File::open(lock_path(path)) else {
            return false;
        };
        match f.try_lock() {
            Ok(()) => {
                let _ = f.unlock();
                false
            }
            Err(_) => true,
        }
    }

    /// A new read connection (SQLite-specific reads: drift, shapes).
    pub fn reader(&self) -> Result<Reader, StoreError> {
        Reader::open(&self.path)
    }

    /// Open a store read-only for inspection, never migrating it: refused
    /// when it does not exist or its schema is not this weft's.
    pub fn open_read_only(path: &Path) -> Result<Reader, StoreError> {
        if !path.exists() {
            return Err(StoreError::NotFound(format!(
                "no store at {} (has `weft run` used this config yet?)",
                path.display()
            )));
        }
        let r = Reader::open(path)?;
        let v = crate::schema::version(&r.conn)?;
        let latest = crate::latest_version() as i64;
        if v != latest {
            return Err(StoreError::Schema(format!(
                "the store {} has schema version {v}, this weft reads version {latest}; {}",
                path.display(),
                if v < latest {
                    "start `weft run` once to migrate it"
                } else {
                    "use a newer weft"
                }
            )));
        }
        Ok(r)
    }

    async fn call(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        // bounded: a full queue waits here (backpressure), without a thread
        self.tx
            .send(Job { op, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Tests only: run one statement on the writer's connection.
    #[doc(hidden)]
    pub async fn exec_on_writer(&self, sql: &str) -> Result<(), StoreError> {
        self.call(Op::Exec(sql.to_owned())).await.map(|_| ())
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = match self.pool.lock().map(|mut p| p.pop()) {
            Ok(Some(r)) => r,
            _ => Reader::open(&self.path)?,
        };
        let out = f(&r);
        // a reader left inside a transaction would read one old snapshot
        // forever: never pooled
        if !r.conn.is_autocommit() {
            tracing::error!("a store reader was left inside a transaction; closing it");
            return out;
        }
        if let Ok(mut p) = self.pool.lock()
            && p.len() < 8
        {
            p.push(r);
        }
        out
    }
}

fn unexpected() -> StoreError {
    StoreError::Failed("the store writer answered the wrong kind of reply".into())
}

impl Journal for SqliteJournal {
    fn ingest(&self, batch: IngestBatch) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Ingest(batch)).await? {
                Reply::Applied(a) => Ok(a),
                _ => Err(unexpected()),
            }
        })
    }

    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Vec<Claimed>, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Claim(req)).await? {
                Reply::Claimed(c) => Ok(c),
                _ => Err(unexpected()),
            }
        })
    }

    fn settle(&self, settle: Settle) -> BoxFuture<'_, Result<Settled, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Settle(settle)).await? {
                Reply::Settled(s) => Ok(s),
                _ => Err(unexpected()),
            }
        })
    }

    fn replay(&self, replay: Replay) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Replay(replay)).await? {
                Reply::Applied(a) => Ok(a),
                _ => Err(unexpected()),
            }
        })
    }

    fn discard(&self, dlq_id: i64, note: String) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Discard { dlq_id, note }).await? {
                Reply::Applied(a) => Ok(a),
                _ => Err(unexpected()),
            }
        })
    }

    fn prune(&self, cutoffs: crate::Prune) -> BoxFuture<'_, Result<crate::Pruned, StoreError>> {
        const LIMIT: usize = 10_000;
        Box::pin(async move {
            // in slices, so that the writer is never held for long, until a
            // slice finds fewer than its limit in every table: pruning keeps
            // up with any rate
            let mut total = crate::Pruned::default();
            loop {
                match self
                    .call(Op::Prune {
                        cutoffs,
                        limit: LIMIT,
                    })
                    .await?
                {
                    Reply::Pruned(n) => {
                        total.dedupe += n.dedupe;
                        total.dlq += n.dlq;
                        total.drift += n.drift;
                        total.attempts += n.attempts;
                        if n.dedupe < LIMIT
                            && n.dlq < LIMIT
                            && n.drift < LIMIT
                            && n.attempts < LIMIT
                        {
                            return Ok(total);
                        }
                    }
                    _ => return Err(unexpected()),
                }
            }
        })
    }

    fn publish(
        &self,
        topic: String,
        entries: Vec<crate::TopicEntry>,
    ) -> BoxFuture<'_, Result<crate::Published, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Publish { topic, entries }).await? {
                Reply::Published(p) => Ok(p),
                _ => Err(unexpected()),
            }
        })
    }

    fn prune_topic(&self, topic: String, before: i64) -> BoxFuture<'_, Result<usize, StoreError>> {
        const LIMIT: usize = 10_000;
        Box::pin(async move {
            let mut total = 0;
            loop {
                let op = Op::PruneTopic {
                    topic: topic.clone(),
                    before,
                    limit: LIMIT,
                };
                match self.call(op).await? {
                    Reply::Count(n) => {
                        total += n;
                        if n < LIMIT {
                            return Ok(total);
                        }
                    }
                    _ => return Err(unexpected()),
                }
            }
        })
    }

    fn record_drift(&self, batch: DriftBatch) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Drift(batch)).await? {
                Reply::Applied(a) => Ok(a),
                _ => Err(unexpected()),
            }
        })
    }

    fn accept_drift(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            match self.call(Op::AcceptDrift(ids)).await? {
                Reply::Applied(a) => Ok(a),
                _ => Err(unexpected()),
            }
        })
    }

    fn resolve_conflict(
        &self,
        resolve: crate::ResolveConflict,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Resolve(resolve)).await? {
                Reply::Applied(a) => Ok(a),
                _ => Err(unexpected()),
            }
        })
    }

    fn xref_change(&self, change: crate::XrefChange) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Xref(change)).await? {
                Reply::Applied(a) => Ok(a),
                _ => Err(unexpected()),
            }
        })
    }

    fn resolve_match(
        &self,
        resolve: crate::ResolveMatch,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        Box::pin(async move {
            match self.call(Op::Match(resolve)).await? {
                Reply::Applied(a) => Ok(a),
                _ => Err(unexpected()),
            }
        })
    }

    fn canonical_intent(
        &self,
        system: String,
        writes: Vec<crate::CanonicalWritten>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            match self.call(Op::Intent { system, writes }).await? {
                Reply::Applied(_) => Ok(()),
                _ => Err(unexpected()),
            }
        })
    }

    fn read(&self) -> &dyn JournalRead {
        self
    }
}

impl JournalRead for SqliteJournal {
    fn counts(&self, lanes: &[LaneId]) -> Result<Vec<FlowCounts>, StoreError> {
        self.with_reader(|r| r.counts(lanes))
    }
    fn outbox_len(&self) -> Result<i64, StoreError> {
        self.with_reader(|r| r.outbox_len())
    }
    fn topic_read(
        &self,
        topic: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<crate::TopicMessage>, StoreError> {
        self.with_reader(|r| crate::topic::read(&r.conn, topic, after, limit))
    }
    fn topic_head(&self, topic: &str) -> Result<i64, StoreError> {
        self.with_reader(|r| crate::topic::head(&r.conn, topic))
    }
    fn topic_behind(&self, topic: &str, after: i64) -> Result<i64, StoreError> {
        self.with_reader(|r| crate::topic::behind(&r.conn, topic, after))
    }
    fn checkpoint(&self, source: &str, key: &str) -> Result<Option<String>, StoreError> {
        self.with_reader(|r| r.checkpoint(source, key))
    }
    fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DlqEntry>, StoreError> {
        self.with_reader(|r| r.dlq_list(filter))
    }
    fn dlq_get(&self, id: i64) -> Result<Option<DlqEntry>, StoreError> {
        self.with_reader(|r| r.dlq_get(id))
    }
    fn dlq_depths(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        self.with_reader(|r| r.dlq_depths())
    }
    fn crosswalk(
        &self,
        system: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CrosswalkRow>, StoreError> {
        self.with_reader(|r| r.crosswalk(system, limit))
    }
    fn pending(&self, lane: &LaneId, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.with_reader(|r| r.pending(lane, limit))
    }
    fn checkpoints(&self) -> Result<Vec<crate::Checkpoint>, StoreError> {
        self.with_reader(|r| r.checkpoints())
    }
    fn lookup(&self, id: &str, limit: usize) -> Result<crate::RecordLookup, StoreError> {
        self.with_reader(|r| r.lookup(id, limit))
    }
    fn stream_shape(&self, source: &str) -> Result<Option<String>, StoreError> {
        self.with_reader(|r| r.stream_shape(source))
    }
    fn drift_events(&self, source: Option<&str>) -> Result<Vec<crate::DriftEvent>, StoreError> {
        self.with_reader(|r| r.drift_events(source))
    }
    fn canonical(
        &self,
        entity: &str,
        id: &str,
    ) -> Result<Option<crate::canonical::CanonicalView>, StoreError> {
        self.with_reader(|r| r.canonical(entity, id))
    }
    fn canonical_list(
        &self,
        entity: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.with_reader(|r| r.canonical_list(entity, limit))
    }
    fn canonical_by_external(
        &self,
        entity: &str,
        system: &str,
        external_id: &str,
    ) -> Result<Option<String>, StoreError> {
        self.with_reader(|r| r.canonical_by_external(entity, system, external_id))
    }
    fn canonical_history(
        &self,
        filter: &crate::HistoryFilter,
    ) -> Result<Vec<crate::canonical::HistoryEntry>, StoreError> {
        self.with_reader(|r| r.canonical_history(filter))
    }
    fn conflicts(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::canonical::ConflictEntry>, StoreError> {
        self.with_reader(|r| r.conflicts(status, limit))
    }
    fn matches(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::canonical::MatchEntry>, StoreError> {
        self.with_reader(|r| r.matches(status, limit))
    }
    fn identity_summary(&self) -> Result<Vec<crate::canonical::IdentitySummary>, StoreError> {
        self.with_reader(|r| r.identity_summary())
    }
}

impl Reader {
    pub(crate) fn open(path: &Path) -> Result<Reader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Reader { conn })
    }
}
