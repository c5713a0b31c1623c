//! The PostgreSQL journal: the [`Journal`] contract on a PostgreSQL
//! database that several weft processes (nodes) may share.
//!
//! # Shape
//!
//! The tables (`schema.rs`, in their own schema, `weft` by default) are the
//! SQLite journal's, with the lease in three columns (`token`,
//! `lease_until`, `lease_node`) and the key-queue state in one flag,
//! `eligible`: a keyless row, or the head of its `(destination, key)` queue
//! that no earlier dead letter holds. Every operation is one transaction on
//! one connection of a small pool, made of a few statements over arrays
//! (`unnest`): the cost of a batch is a handful of round trips, not one per
//! row. `Ok` is answered after `COMMIT` returned (`synchronous_commit` is
//! the server's: on by default, so fsynced).
//!
//! # Several writers
//!
//! - **Key locks.** Every transaction that changes a key's queues, holds or
//!   dead entries (ingest, settle, replay, discard) first takes
//!   `pg_advisory_xact_lock` on each of its entity keys, in ascending
//!   order, once. So the changes of one key are serial, across processes;
//!   different keys go in parallel. Keyless rows take no lock.
//! - **Claims** take no key lock: `FOR UPDATE SKIP LOCKED` over the lane's
//!   eligible, due, unleased rows, lowest `order_seq` first, and a lease
//!   (a token from the `lease_token` sequence, a deadline, the node). A
//!   claim only ever changes the lease columns of rows it locked without
//!   waiting; eligibility is changed only under the key lock, by
//!   transactions that lock the rows they change (a claim in progress on
//!   the head is waited for, a claim that starts later skips the head).
//!   A replay checks for a later row in flight after locking the rows that
//!   can be leased (the head and rows with a token), so no claim slips in
//!   between the check and its commit.
//! - **order_seq** comes from a sequence, whose values are not in commit
//!   order: two transactions can take 10 and 11 and commit 11 first. That
//!   would break "the head is the lowest order_seq" if a key's rows could
//!   take values before that key's lock: the row with 11 could be claimed
//!   and delivered before the row with 10 commits behind... in front of it.
//!   So values are taken only after the transaction holds all its key
//!   locks, and the sequence has `CACHE 1` (values in time order across
//!   sessions): for one key, whoever holds its lock takes larger values
//!   than every transaction that held it before, and smaller ones than any
//!   that will. Per key, order_seq order is commit order. (Keyless rows
//!   have no order to keep.) `tests/postgres.rs` ingests one set of keys
//!   from two journals at once, with a claimer delivering all the while,
//!   and checks every key's writes arrive in order.
//! - **Counters** are appended, never updated in place: each transaction
//!   inserts its changes into `count_deltas`; `counts` sums `flow_counts`
//!   and the deltas in one snapshot, and a compaction (every few hundred
//!   writes of this process, one compactor at a time across nodes) moves
//!   deltas into `flow_counts` in one transaction. No row that every writer
//!   updates, yet every counter changes in the transaction of what it
//!   counts.
//! - **Deadlocks** cannot come from the key locks (ascending, once) or
//!   claims (never wait); rows that two transactions of different keys may
//!   both write (dedupe ids, crosswalk entries) are written in ascending
//!   key order. A deadlock or serialization failure PostgreSQL reports
//!   anyway rolls the transaction back, and it is tried again (5 times).
//! - **Restart.** A hub (`PgRole::Hub`) holds a session advisory lock on
//!   its node name while it runs (a second hub with the same name is
//!   refused) and, on start, ends the leases its node held before. Leases
//!   of other nodes are theirs until their deadline, or until a live
//!   node's heartbeat finds them dead (`nodes`, `ops::heartbeat`): then
//!   they end at once.
//!
//! # Membership
//!
//! Every hub beats into `nodes` (`ops::heartbeat`); a beat also deletes
//! the nodes whose beat ran out and ends the leases of the rows they had
//! claimed, in one transaction. Per-row tokens fence a former owner's
//! settle; there are no partition leases (see ARCHITECTURE.md, "No
//! partition leases").

mod canonical;
mod ops;
mod pool;
mod read;
mod schema;

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use tokio::runtime::{Handle, Runtime};

use crate::journal::{
    ClaimRequest, Claimed, Journal, JournalRead, LaneId, Replay, Settle, Settled,
};
use crate::{
    Applied, CrosswalkRow, DlqEntry, DlqFilter, DriftBatch, DriftEvent, FlowCounts, IngestBatch,
    OutboxRow, StoreError,
};
use ops::Ctx;
use pool::{Conn, Pool};

pub use schema::latest_version as pg_latest_version;

/// The advisory lock id the journal in `schema` takes for entity key `key`
/// (tests hold it to stop a transaction at that point).
#[doc(hidden)]
pub fn key_lock_id(schema: &str, key: &str) -> i64 {
    ops::key_lock(schema, key)
}

/// Who opens the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgRole {
    /// `weft run` on node [`PgOptions::node`]: the only hub of that name
    /// (a session lock); ends that node's leases of a previous run.
    Hub,
    /// A command changing state beside running hubs: touches no lease.
    Tool,
    /// A command that only reads (`weft status`, `dlq list`): creates,
    /// migrates and compacts nothing; refuses a journal that is missing or
    /// at another schema version. Only its reads may be used.
    Reader,
}

/// How to reach the journal. `Debug` leaves the URL out (it may carry a
/// password).
#[derive(Clone)]
pub struct PgOptions {
    /// A libpq-style URL or key=value string (`postgresql://user@host/db`).
    pub url: String,
    /// The schema holding the journal's tables; created if missing.
    pub schema: String,
    /// This process's node name: leases carry it.
    pub node: String,
    /// Connections at most (the hub's session lock takes one more).
    pub pool_size: usize,
    pub role: PgRole,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &"***")
            .field("schema", &self.schema)
            .field("node", &self.node)
            .field("pool_size", &self.pool_size)
            .field("role", &self.role)
            .finish()
    }
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> PgOptions {
        PgOptions {
            url: url.into(),
            schema: "weft".into(),
            node: "weft".into(),
            pool_size: 8,
            role: PgRole::Hub,
        }
    }
}

/// How long (ms) the server lets a journal session sit idle inside a
/// transaction before it ends the session and rolls it back: a node that
/// is paused (SIGSTOP, a VM frozen) or cut off mid-transaction otherwise
/// holds its key locks, and every other node's writes of those keys wait.
/// The journal's transactions never wait on the client between statements
/// for long; a rolled-back one is an error to its caller, as for a lost
/// connection.
pub const IDLE_IN_TX_MS: u64 = 5_000;
/// Transactions retried after a deadlock or serialization failure.
const RETRIES: usize = 5;
/// Writes of this process between two compactions of the counters.
const COMPACT_EVERY: usize = 256;
/// Counter deltas folded per compaction transaction.
const COMPACT_LIMIT: i64 = 50_000;
/// Rows of each table per prune slice.
const PRUNE_SLICE: i64 = 10_000;

/// The PostgreSQL [`Journal`]; cheap to share behind an `Arc`.
///
/// It runs its connections on a runtime of its own (two threads), so that
/// it can be used from any runtime or thread, and so that the synchronous
/// reads ([`JournalRead`]) block only their caller.
pub struct PgJournal {
    inner: Arc<Inner>,
    handle: Handle,
    runtime: Option<Runtime>,
}

struct Inner {
    pool: Pool,
    schema: String,
    node: String,
    writes: AtomicUsize,
    /// The hub's session lock on its node name (its own connection).
    _hub: Option<Conn>,
}

impl Inner {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            schema: &self.schema,
            node: &self.node,
        }
    }

    /// A write happened: now and then, compact the counters (in the
    /// background; a failure is logged and tried again later).
    fn wrote(self: &Arc<Self>) {
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(COMPACT_EVERY) {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.compact().await {
                    tracing::warn!(error = %e, "compacting the journal's counters failed; will try again");
                }
            });
        }
    }

    async fn compact(&self) -> Result<u64, StoreError> {
        let mut c = self.pool.get().await?;
        ops::compact(&mut c, &self.ctx(), COMPACT_LIMIT).await
    }
}

/// Whether PostgreSQL rolled the transaction back by itself in a way that
/// makes trying it again right.
fn retryable(e: &StoreError) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(e, StoreError::Postgres(p) if p.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
        || p.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE))
}

/// Run one transaction function on a pooled connection, again after a
/// deadlock or serialization failure.
macro_rules! retrying {
    ($inner:expr, |$c:ident, $ctx:ident| $body:expr) => {{
        let inner = &$inner;
        let mut tries = 0;
        loop {
            let mut conn = inner.pool.get().await?;
            let $c: &mut Conn = &mut conn;
            let $ctx = inner.ctx();
            match $body.await {
                Err(e) if retryable(&e) && tries < RETRIES => {
                    tries += 1;
                    tracing::debug!(error = %e, tries, "journal transaction rolled back; trying again");
                }
                r => break r,
            }
        }
    }};
}

impl PgJournal {
    /// Connect, create or migrate the schema, and (as a hub) take the
    /// node's lock and end its previous leases. Blocks the calling thread
    /// (any thread, inside a runtime or not) until then.
    pub fn open(opts: PgOptions) -> Result<PgJournal, StoreError> {
        schema::check_schema_name(&opts.schema)?;
        if opts.node.is_empty() {
            return Err(StoreError::Invalid(
                "the PostgreSQL journal needs a node name".into(),
            ));
        }
        let mut config = tokio_postgres::Config::from_str(&opts.url).map_err(|e| {
            StoreError::Invalid(format!("the PostgreSQL journal's URL does not parse: {e}"))
        })?;
        if config.get_application_name().is_none() {
            config.application_name(format!("weft journal ({})", opts.node));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        // a node paused or cut off inside a transaction holds its key and
        // row locks until the server ends that session: after this long
        let options = match config.get_options() {
            Some(o) if !o.trim().is_empty() => {
                format!("{o} -c idle_in_transaction_session_timeout={IDLE_IN_TX_MS}")
            }
            _ => format!("-c idle_in_transaction_session_timeout={IDLE_IN_TX_MS}"),
        };
        config.options(&options);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("weft-pg-journal")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Failed(format!("cannot start the journal's runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let started = block(&handle, async move {
            let pool = Pool::new(config, &opts.schema, opts.pool_size);
            let hub = match opts.role {
                PgRole::Hub => {
                    let mut c = pool.connect().await?;
                    let lock = ops::lock_id(&opts.schema, "node", &opts.node);
                    let got: bool = c
                        .query_one("SELECT pg_try_advisory_lock($1)", &[&lock])
                        .await?
                        .try_get(0)?;
                    if !got {
                        return Err(StoreError::Invalid(format!(
                            "another `weft run` with node name `{}` is using this PostgreSQL journal (schema {})",
                            opts.node, opts.schema
                        )));
                    }
                    Some(c)
                }
                PgRole::Tool | PgRole::Reader => None,
            };
            if opts.role == PgRole::Reader {
                let mut c = pool.get().await?;
                schema::check_readable(&mut c, &opts.schema).await?;
            } else {
                let mut c = pool.get().await?;
                let lock = ops::lock_id(&opts.schema, "migrate", "");
                schema::migrate(&mut c, &opts.schema, lock).await?;
                if opts.role == PgRole::Hub {
                    let n = ops::end_leases(&mut c, &opts.node).await?;
                    if n > 0 {
                        tracing::info!(rows = n, node = %opts.node, "leases of the previous run ended");
                    }
                }
            }
            let inner = Arc::new(Inner {
                pool,
                schema: opts.schema,
                node: opts.node,
                writes: AtomicUsize::new(0),
                _hub: hub,
            });
            if opts.role != PgRole::Reader {
                inner.compact().await?;
            }
            Ok(inner)
        });
        match started {
            Ok(inner) => Ok(PgJournal {
                inner,
                handle,
                runtime: Some(runtime),
            }),
            Err(e) => {
                runtime.shutdown_background();
                Err(e)
            }
        }
    }

    /// The node name leases carry.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        let inner = self.inner.clone();
        block(&self.handle, async move {
            let mut c = inner.pool.get().await?;
            schema::version(&mut c).await
        })
    }

    /// Fold every pending counter delta into the totals now (normally done
    /// every few hundred writes).
    pub fn compact_counts(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        block(&self.handle, async move {
            while inner.compact().await? > 0 {}
            Ok(())
        })
    }

    /// Run `f` on the journal's runtime; the returned future can be awaited
    /// on any executor.
    fn spawn<T, F>(
        &self,
        f: impl FnOnce(Arc<Inner>) -> F,
    ) -> BoxFuture<'static, Result<T, StoreError>>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let task = self.handle.spawn(f(self.inner.clone()));
        Box::pin(async move {
            task.await
                .map_err(|e| StoreError::Failed(format!("a journal task failed: {e}")))?
        })
    }

    fn read_with<T, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        block(&self.handle, f(self.inner.clone()))
    }
}

/// Run `fut` on `handle`'s runtime and wait for it on this thread (which
/// may be a thread of another runtime: it only waits on a channel).
fn block<T: Send + 'static>(
    handle: &Handle,
    fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| StoreError::Closed)?
}

impl Drop for PgJournal {
    fn drop(&mut self) {
        self.inner.pool.close();
        if let Some(rt) = self.runtime.take() {
            // from inside another runtime too: nothing waits here; the
            // connections close as their tasks are dropped
            rt.shutdown_background();
        }
    }
}

impl Journal for PgJournal {
    fn ingest(&self, batch: IngestBatch) -> BoxFuture<'_, Result<Applied, StoreError>> {
        self.spawn(|inner| async move {
            let r = retrying!(inner, |c, ctx| ops::ingest(c, &ctx, &batch));
            inner.wrote();
            r
        })
    }

    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, Result<Vec<Claimed>, StoreError>> {
        self.spawn(|inner| async move { retrying!(inner, |c, ctx| ops::claim(c, &ctx, &req)) })
    }

    fn settle(&self, settle: Settle) -> BoxFuture<'_, Result<Settled, StoreError>> {
        self.spawn(|inner| async move {
            let r = retrying!(inner, |c, ctx| ops::settle(c, &ctx, &settle));
            inner.wrote();
            r
        })
    }

    fn replay(&self, replay: Replay) -> BoxFuture<'_, Result<Applied, StoreError>> {
        self.spawn(|inner| async move {
            let r = retrying!(inner, |c, ctx| ops::replay(c, &ctx, &replay));
            inner.wrote();
            r
        })
    }

    fn discard(&self, dlq_id: i64, note: String) -> BoxFuture<'_, Result<Applied, StoreError>> {
        self.spawn(move |inner| async move {
            let r = retrying!(inner, |c, ctx| ops::discard(c, &ctx, dlq_id, &note));
            inner.wrote();
            r
        })
    }

    fn prune(&self, cutoffs: crate::Prune) -> BoxFuture<'_, Result<crate::Pruned, StoreError>> {
        self.spawn(move |inner| async move {
            // in slices until a slice finds fewer than its limit everywhere
            let mut total = crate::Pruned::default();
            let full = PRUNE_SLICE as usize;
            loop {
                let n = retrying!(inner, |c, _ctx| ops::prune(c, &cutoffs, PRUNE_SLICE))?;
                total.dedupe += n.dedupe;
                total.dlq += n.dlq;
                total.drift += n.drift;
                total.attempts += n.attempts;
                if n.dedupe < full && n.dlq < full && n.drift < full && n.attempts < full {
                    return Ok(total);
                }
            }
        })
    }

    fn record_drift(&self, batch: DriftBatch) -> BoxFuture<'_, Result<Applied, StoreError>> {
        self.spawn(|inner| async move { retrying!(inner, |c, _ctx| ops::record_drift(c, &batch)) })
    }

    fn accept_drift(&self, ids: Vec<i64>) -> BoxFuture<'_, Result<Applied, StoreError>> {
        self.spawn(|inner| async move { retrying!(inner, |c, _ctx| ops::accept_drift(c, &ids)) })
    }

    fn publish(
        &self,
        topic: String,
        entries: Vec<crate::TopicEntry>,
    ) -> BoxFuture<'_, Result<crate::Published, StoreError>> {
        self.spawn(
            |inner| async move { retrying!(inner, |c, _ctx| ops::publish(c, &topic, &entries)) },
        )
    }

    fn prune_topic(&self, topic: String, before: i64) -> BoxFuture<'_, Result<usize, StoreError>> {
        self.spawn(move |inner| async move {
            let mut total = 0;
            loop {
                let n = retrying!(inner, |c, _ctx| ops::prune_topic(
                    c,
                    &topic,
                    before,
                    PRUNE_SLICE
                ))?;
                total += n;
                if n < PRUNE_SLICE as usize {
                    return Ok(total);
                }
            }
        })
    }

    fn resolve_conflict(
        &self,
        resolve: crate::ResolveConflict,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        self.spawn(|inner| async move {
            let r = retrying!(inner, |c, ctx| canonical::resolve_conflict(
                c, &ctx, &resolve
            ));
            inner.wrote();
            r
        })
    }

    fn xref_change(&self, change: crate::XrefChange) -> BoxFuture<'_, Result<Applied, StoreError>> {
        self.spawn(|inner| async move {
            let r = retrying!(inner, |c, ctx| canonical::xref_change(c, &ctx, &change));
            inner.wrote();
            r
        })
    }

    fn resolve_match(
        &self,
        resolve: crate::ResolveMatch,
    ) -> BoxFuture<'_, Result<Applied, StoreError>> {
        self.spawn(|inner| async move {
            let r = retrying!(inner, |c, ctx| canonical::resolve_match(c, &ctx, &resolve));
            inner.wrote();
            r
        })
    }

    fn canonical_intent(
        &self,
        system: String,
        writes: Vec<crate::CanonicalWritten>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.spawn(|inner| async move {
            retrying!(inner, |c, ctx| canonical::intent(c, &ctx, &system, &writes))
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn lease_source(
        &self,
        source: String,
        ttl_ms: i64,
    ) -> BoxFuture<'_, Result<Option<i64>, StoreError>> {
        self.spawn(|inner| async move {
            retrying!(inner, |c, ctx| ops::lease_source(c, &ctx, &source, ttl_ms))
        })
    }

    fn release_source(&self, source: String) -> BoxFuture<'_, Result<(), StoreError>> {
        self.spawn(|inner| async move {
            retrying!(inner, |c, ctx| ops::release_source(c, &ctx, &source))
        })
    }

    fn heartbeat(&self, ttl_ms: i64) -> BoxFuture<'_, Result<crate::Heartbeat, StoreError>> {
        self.spawn(
            |inner| async move { retrying!(inner, |c, ctx| ops::heartbeat(c, &ctx, ttl_ms)) },
        )
    }

    fn leave(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.spawn(|inner| async move { retrying!(inner, |c, ctx| ops::leave(c, &ctx)) })
    }

    fn read(&self) -> &dyn JournalRead {
        self
    }
}

impl JournalRead for PgJournal {
    fn counts(&self, lanes: &[LaneId]) -> Result<Vec<FlowCounts>, StoreError> {
        let lanes = lanes.to_vec();
        self.read_with(|inner| async move { retrying!(inner, |c, _ctx| read::counts(c, &lanes)) })
    }

    fn outbox_len(&self) -> Result<i64, StoreError> {
        self.read_with(|inner| async move { read::outbox_len(&mut *inner.pool.get().await?).await })
    }

    fn topic_read(
        &self,
        topic: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<crate::TopicMessage>, StoreError> {
        let topic = topic.to_owned();
        self.read_with(|inner| async move {
            read::topic_read(&mut *inner.pool.get().await?, &topic, after, limit).await
        })
    }

    fn topic_behind(&self, topic: &str, after: i64) -> Result<i64, StoreError> {
        let topic = topic.to_owned();
        self.read_with(|inner| async move {
            read::topic_behind(&mut *inner.pool.get().await?, &topic, after).await
        })
    }

    fn topic_head(&self, topic: &str) -> Result<i64, StoreError> {
        let topic = topic.to_owned();
        self.read_with(|inner| async move {
            read::topic_head(&mut *inner.pool.get().await?, &topic).await
        })
    }

    fn checkpoint(&self, source: &str, key: &str) -> Result<Option<String>, StoreError> {
        let (source, key) = (source.to_owned(), key.to_owned());
        self.read_with(|inner| async move {
            read::checkpoint(&mut *inner.pool.get().await?, &source, &key).await
        })
    }

    fn dlq_list(&self, filter: &DlqFilter) -> Result<Vec<DlqEntry>, StoreError> {
        let filter = filter.clone();
        self.read_with(|inner| async move {
            read::dlq_list(&mut *inner.pool.get().await?, &filter).await
        })
    }

    fn dlq_get(&self, id: i64) -> Result<Option<DlqEntry>, StoreError> {
        self.read_with(
            |inner| async move { read::dlq_get(&mut *inner.pool.get().await?, id).await },
        )
    }

    fn dlq_depths(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        self.read_with(|inner| async move { read::dlq_depths(&mut *inner.pool.get().await?).await })
    }

    fn crosswalk(
        &self,
        system: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CrosswalkRow>, StoreError> {
        let system = system.map(str::to_owned);
        self.read_with(|inner| async move {
            read::crosswalk(&mut *inner.pool.get().await?, system.as_deref(), limit).await
        })
    }

    fn pending(&self, lane: &LaneId, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let lane = lane.clone();
        self.read_with(|inner| async move {
            read::pending(&mut *inner.pool.get().await?, &lane, limit).await
        })
    }

    fn source_leases(&self) -> Result<Vec<crate::SourceLease>, StoreError> {
        self.read_with(
            |inner| async move { read::source_leases(&mut *inner.pool.get().await?).await },
        )
    }

    fn nodes(&self) -> Result<Vec<crate::NodeInfo>, StoreError> {
        self.read_with(|inner| async move { read::nodes(&mut *inner.pool.get().await?).await })
    }

    fn checkpoints(&self) -> Result<Vec<crate::Checkpoint>, StoreError> {
        self.read_with(
            |inner| async move { read::checkpoints(&mut *inner.pool.get().await?).await },
        )
    }

    fn lookup(&self, id: &str, limit: usize) -> Result<crate::RecordLookup, StoreError> {
        let id = id.to_owned();
        self.read_with(|inner| async move {
            read::lookup(&mut *inner.pool.get().await?, &id, limit).await
        })
    }

    fn stream_shape(&self, source: &str) -> Result<Option<String>, StoreError> {
        let source = source.to_owned();
        self.read_with(|inner| async move {
            read::stream_shape(&mut *inner.pool.get().await?, &source).await
        })
    }

    fn drift_events(&self, source: Option<&str>) -> Result<Vec<DriftEvent>, StoreError> {
        let source = source.map(str::to_owned);
        self.read_with(|inner| async move {
            read::drift_events(&mut *inner.pool.get().await?, source.as_deref()).await
        })
    }

    fn canonical(
        &self,
        entity: &str,
        id: &str,
    ) -> Result<Option<crate::canonical::CanonicalView>, StoreError> {
        let (entity, id) = (entity.to_owned(), id.to_owned());
        self.read_with(|inner| async move {
            // the record and its links of one commit
            let mut c = inner.pool.get().await?;
            c.begin_snapshot().await?;
            let r =
                crate::canonical::view(&mut canonical::reader(&mut c, &inner.schema), &entity, &id)
                    .await;
            c.finish(r).await
        })
    }

    fn canonical_list(
        &self,
        entity: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let entity = entity.map(str::to_owned);
        self.read_with(|inner| async move {
            crate::canonical::list(
                &mut canonical::reader(&mut *inner.pool.get().await?, &inner.schema),
                entity.as_deref(),
                limit,
            )
            .await
        })
    }

    fn canonical_by_external(
        &self,
        entity: &str,
        system: &str,
        external_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let (entity, system, external_id) =
            (entity.to_owned(), system.to_owned(), external_id.to_owned());
        self.read_with(|inner| async move {
            crate::canonical::by_external(
                &mut canonical::reader(&mut *inner.pool.get().await?, &inner.schema),
                &entity,
                &system,
                &external_id,
            )
            .await
        })
    }

    fn canonical_history(
        &self,
        filter: &crate::HistoryFilter,
    ) -> Result<Vec<crate::canonical::HistoryEntry>, StoreError> {
        let filter = filter.clone();
        self.read_with(|inner| async move {
            crate::canonical::history_of(
                &mut canonical::reader(&mut *inner.pool.get().await?, &inner.schema),
                &filter,
            )
            .await
        })
    }

    fn conflicts(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::canonical::ConflictEntry>, StoreError> {
        let status = status.map(str::to_owned);
        self.read_with(|inner| async move {
            crate::canonical::conflicts(
                &mut canonical::reader(&mut *inner.pool.get().await?, &inner.schema),
                status.as_deref(),
                limit,
            )
            .await
        })
    }

    fn matches(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::canonical::MatchEntry>, StoreError> {
        let status = status.map(str::to_owned);
        self.read_with(|inner| async move {
            crate::canonical::matches(
                &mut canonical::reader(&mut *inner.pool.get().await?, &inner.schema),
                status.as_deref(),
                limit,
            )
            .await
        })
    }

    fn identity_summary(&self) -> Result<Vec<crate::canonical::IdentitySummary>, StoreError> {
        self.read_with(|inner| async move {
            let mut c = inner.pool.get().await?;
            c.begin_snapshot().await?;
            let r = crate::canonical::summary(&mut canonical::reader(&mut c, &inner.schema)).await;
            c.finish(r).await
        })
    }
}
