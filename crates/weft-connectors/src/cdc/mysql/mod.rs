//! The `mysql_cdc` source: every insert, update and delete of the
//! configured tables, read from the MariaDB/MySQL binary log (row format)
//! through `mysql_async`'s binlog stream, after an initial snapshot
//! consistent with it.
//!
//! ## Setup
//! The control connection checks `log_bin`, `binlog_format = ROW` and
//! `binlog_row_image = FULL`, and that every configured table exists.
//! Then, by what weft saved (the checkpoint):
//!
//! | saved position | what happens |
//! |---|---|
//! | none, or an unfinished snapshot | (`snapshot: initial`) a consistent snapshot transaction; its binlog position (MariaDB: `binlog_snapshot_file`/`_position`, no lock; MySQL: read under `FLUSH TABLES WITH READ LOCK`, released at once); the tables copied in it (`op: r`); then the stream from that position: no gap, no overlap |
//! | none | (`snapshot: never`) the stream from the binlog's current end (`SHOW MASTER STATUS`) |
//! | streaming, at `file:pos` | resume: the stream from `file:pos`; of the transaction starting there, the changes up to the saved `ordinal` are skipped |
//! | streaming, with a GTID position (MariaDB), and `file:pos` is not that position here (`BINLOG_GTID_POS`: another server, a purged or reset binlog) | resume by GTID: the stream from the saved GTID position (`@slave_connect_state`); of the transaction `tx_gtid`, the changes up to `ordinal` are skipped |
//! | streaming, but `file` is no longer on the server (purged) or `pos` is past its end (the binlog was reset), and no GTID position; or a GTID position the server's binlogs do not hold | changes may be lost: the source stops with the reason and the way out, `weft cdc resnapshot` (`on_position_lost: fail`) or takes a new snapshot (`resnapshot`) |
//!
//! A crash during the snapshot copies it again from the start (its rows
//! come again, with the new snapshot's position in their ids).
//!
//! ## Position: binlog file and offset
//! The position kind is the binlog file and offset (`mysql-bin.000042`,
//! `1234`): where a transaction starts (its GTID or `BEGIN` event). Every
//! change has a position `(file, pos, tx_ordinal)`: its transaction's
//! start and its place in the transaction (1, 2, ...: every captured row
//! of every rows event, in binlog order). Transactions are in the binlog
//! whole and in commit order, so positions only grow. Changes are committed
//! to the journal in batches (up to `batch_size`, small transactions
//! grouped), each with the position after it as the checkpoint in the same
//! transaction ([`CHECKPOINT_KEY`]): the start of the next transaction
//! and how many changes of it are stored (0, unless a big transaction is
//! split over batches). Checkpoints fall only at transaction ends (an
//! `XID` event, a `COMMIT` query, a DDL statement), or inside a transaction
//! when it is split. A restart asks the server for the stream from there;
//! nothing before it comes again and the stored part of a split
//! transaction is skipped by ordinal. The journal dedupes nothing for this
//! source (`Dedupe::Position`).
//!
//! MariaDB GTIDs (`domain-server-seq`, from the GTID event, type `0xA2`,
//! which the server sends as it is because the session says
//! `@mariadb_slave_capability = 4`) and MySQL GTIDs (`uuid:n`) are carried
//! in each event (`source.gtid`) and in the checkpoint. On MariaDB the
//! checkpoint also keeps the GTID position of `file:pos` (`gtid_pos`, one
//! GTID per domain, as `@@gtid_binlog_pos` writes it) and, for a split
//! transaction, its GTID (`tx_gtid`). A start checks that the saved
//! `file:pos` is that GTID position on this server (`BINLOG_GTID_POS`);
//! when it is not (a failover to another server, a purged or reset
//! binlog) the stream starts from the GTID position instead
//! (`@slave_connect_state`), and a split transaction's stored part is
//! skipped by its GTID. MySQL GTIDs are not used to resume.
//!
//! The binlog is not held for weft (there is no slot): the server purges
//! it by its own retention (`expire_logs_days`,
//! `binlog_expire_logs_seconds`). While idle, a heartbeat (every
//! `heartbeat`, default 10 s; the server sends its own heartbeat events at
//! that period too) saves the position past transactions of other tables,
//! so a restart does not read them again. `weft_cdc_lag_seconds{source}`
//! is the age of the last transaction committed to the journal, when it
//! was (by the binlog event's time, seconds).
//!
//! ## Event shape (Debezium-like, the same as `postgres_cdc`'s)
//! ```json
//! {"op": "u",
//!  "before": {"id": 7, "status": "new", "total": "12.50"},
//!  "after": {"id": 7, "status": "paid", "total": "12.50"},
//!  "key": {"id": 7},
//!  "source": {"db": "shop", "table": "orders", "file": "mysql-bin.000042",
//!             "pos": 1234, "tx_ordinal": 2, "gtid": "0-1-381",
//!             "server_id": 1, "ts": "2026-12-01T10:00:00Z", "snapshot": false}}
//! ```
//! - `op`: `c` insert, `u` update, `d` delete, `t` truncate (`TRUNCATE
//!   TABLE`, from the statement), `r` a row of the initial snapshot.
//! - `before` (updates and deletes) and `after` (inserts, updates, snapshot
//!   rows): whole rows (`binlog_row_image = FULL`).
//! - `key`: the primary key's columns (else a unique key's with `NOT NULL`
//!   columns); `null` for a truncate or a table without one.
//! - `source.file` + `source.pos` (the transaction's start) + `tx_ordinal`
//!   identify the change; `ts` is the binlog event's time (the statement's,
//!   in seconds); `server_id` the id of the server that wrote it. Snapshot
//!   rows have the snapshot's position, their row number as `tx_ordinal`,
//!   no `gtid` and no `ts`.
//! - Column values by type: [`decode`]. Column names come from
//!   `information_schema` (the binlog has none unless
//!   `binlog_row_metadata = FULL`), matched to the binlog's columns by
//!   position and type.
//!
//! Differences from Debezium: no `schema` part (the shape is JSON), no
//! `ts_ms` (CloudEvents `time` is the binlog event's time; snapshot rows:
//! when read), `source.ts` as RFC 3339, `tx_ordinal` instead of `row` (it
//! counts across the transaction's rows events), and no transaction
//! metadata topic. Compared with `postgres_cdc`: `file`/`pos` instead of
//! `lsn`/`commit_lsn`, `gtid` instead of `xid`, `ts` instead of
//! `commit_time`, no `schema` (a MySQL schema is a database: `db`).
//!
//! CloudEvents: id `<file>:<pos>#<tx_ordinal>` (snapshot rows
//! `snapshot@<file>:<pos>#<n>`), type `<system>.change`, subject
//! `<db>.<table>:<key>`, the default entity key of a flow reading this
//! source, so the changes of one row are delivered in order.
//!
//! ## One event per transaction
//! With `events: per_transaction` each transaction with changes of the
//! captured tables is one event (or consecutive parts of at most
//! `max_transaction_changes` changes): `{"file", "pos", "gtid", "ts",
//! "part", "last", "changes": [<the per-row shape above>...]}`, id
//! `txn@<file>:<pos>#<part>`, type `<system>.transaction`, subject the
//! system's name (one queue: transactions delivered in commit order). A
//! row that cannot be read goes to the DLQ stored with its part. Snapshot
//! rows stay one event each. Parts and replays: [`super::txn`].
//!
//! ## Schema changes
//! A DDL statement in the stream (`ALTER TABLE` ...) drops the cached
//! column lists; the next rows event of a table reads its columns again,
//! and a changed shape is logged (and recorded as drift by the runtime).
//! A rows event whose table map does not match the table's current columns
//! (read while catching up over an `ALTER` made since) names the columns
//! that do not match by position (`@3`) and logs a warning once.
//!
//! ## Not (yet) here
//! MySQL GTID resume (`COM_BINLOG_DUMP_GTID`), XA transactions, compressed binlog
//! events (MariaDB `log_bin_compress`), TLS, tables added to `tables`
//! later are streamed but not snapshotted (`weft cdc resnapshot` copies
//! every table again: a request ([`super::RESNAPSHOT_KEY`]) read at each
//! start and idle heartbeat, served with the new snapshot's first
//! streaming position).

pub mod config;
pub mod decode;
mod setup;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use futures::future::BoxFuture;
use mysql_async::binlog::EventType;
use mysql_async::binlog::events::{Event as BinlogEvent, EventData, QueryEvent, RowsEventData};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Opts};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weft_core::Event;

pub use config::MyCdcConfig;
use config::{EventsMode, OnPositionLost, SnapshotMode};
use decode::Kind;
use setup::{Server, SetupError, TableInfo};

use super::txn::{self, Shape, TxnGroup};
use super::{RESNAPSHOT_KEY, ResnapshotRequest};
use crate::source::{
    BadRecord, Batch, Checkpoint, Ingest, IngestError, Record, Source, SourceError,
};

/// Checkpoint key of the position.
pub const CHECKPOINT_KEY: &str = "mysql_cdc_position";
/// Gauge: seconds between the last stored transaction's binlog time and
/// its store commit.
pub const LAG_SECONDS: &str = "weft_cdc_lag_seconds";

const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Messages between the binlog reader and the batcher.
const CHANNEL: usize = 4096;
/// MariaDB's GTID event.
const MARIADB_GTID_EVENT: u8 = 0xa2;
/// The server's error for a binlog it cannot send from.
const ER_MASTER_FATAL_ERROR_READING_BINLOG: u16 = 1236;

/// What weft saved: where the source is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Position {
    /// The initial snapshot consistent with `file:pos`, `rows` rows in.
    Snapshot { file: String, pos: u64, rows: u64 },
    /// Streaming: every transaction starting before `file:pos` is stored,
    /// and of the transaction starting there the first `ordinal` changes.
    /// `gtid`: the last stored transaction's (for people). MariaDB:
    /// `gtid_pos`, the GTID position of everything before `file:pos` (the
    /// form of `@@gtid_binlog_pos`, one GTID per replication domain), and
    /// `tx_gtid`, the GTID of the transaction starting there when
    /// `ordinal > 0`: a resume where `file:pos` is not this place (another
    /// server after a failover, a purged or reset binlog) starts from them.
    Stream {
        file: String,
        pos: u64,
        ordinal: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gtid: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gtid_pos: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tx_gtid: Option<String>,
        /// The last `weft cdc resnapshot` request acted on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        served: Option<String>,
    },
}

/// `mysql-bin.000042` -> (`mysql-bin`, 42): binlog files sort by their
/// number (the name, when there is none).
fn file_order(file: &str) -> (&str, u64, &str) {
    match file.rsplit_once('.') {
        Some((base, n)) => match n.parse::<u64>() {
            Ok(n) => (base, n, ""),
            Err(_) => (file, 0, file),
        },
        None => (file, 0, file),
    }
}

/// Whether `a` comes after `b` in the binlog.
fn later(a: (&str, u64), b: (&str, u64)) -> bool {
    (file_order(a.0), a.1) > (file_order(b.0), b.1)
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

/// The MariaDB/MySQL CDC source.
pub struct MyCdcSource {
    system: String,
    cfg: MyCdcConfig,
}

/// How the stream starts.
#[derive(Debug, Clone)]
enum Plan {
    /// Take a snapshot, then stream from its position.
    Snapshot,
    /// Stream from `file:pos`, skipping the first `ordinal` changes of the
    /// transaction starting there.
    Resume {
        file: String,
        pos: u64,
        ordinal: u64,
        /// The saved GTID position of `file:pos` (MariaDB), when there is one.
        gtid_pos: Option<String>,
    },
    /// MariaDB: stream from the GTID position `gtid_pos`
    /// (`@slave_connect_state`), skipping the first `ordinal` changes of
    /// the transaction `tx_gtid`.
    ResumeGtid {
        gtid_pos: String,
        tx_gtid: Option<String>,
        ordinal: u64,
    },
    /// Stream from `file:pos` (the binlog's end) and save it.
    Fresh { file: String, pos: u64 },
}

impl MyCdcSource {
    pub fn new(system: &str, cfg: MyCdcConfig) -> Self {
        MyCdcSource {
            system: system.to_owned(),
            cfg,
        }
    }

    async fn saved(&self, ingest: &dyn Ingest) -> Result<Option<Position>, Failure> {
        let text = ingest
            .checkpoint(CHECKPOINT_KEY)
            .await
            .map_err(|e| Failure::Fatal(format!("store error: {e}")))?;
        let Some(text) = text else { return Ok(None) };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Failure::Fatal(format!("the saved position `{text}` is not valid: {e}")))
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

    /// Where to start, given what was saved and what the server has.
    async fn plan(
        &self,
        control: &mut Conn,
        server: &Server,
        saved: Option<&Position>,
    ) -> Result<Plan, Failure> {
        if let Some(Position::Stream {
            file,
            pos,
            ordinal,
            gtid_pos,
            tx_gtid,
            ..
        }) = saved
        {
            // MariaDB with a saved GTID position: it decides where the
            // stream goes on (failover-proof); `file:pos` only if it is the
            // same place on this server
            let by_gtid = match gtid_pos.as_deref() {
                Some(g) if server.mariadb && setup::valid_gtid_pos(g) => Some(g),
                _ => None,
            };
            if let Some(g) = by_gtid {
                let here = setup::binlog_gtid_pos(control, file, *pos).await?;
                if here.as_deref() == Some(g) {
                    return Ok(Plan::Resume {
                        file: file.clone(),
                        pos: *pos,
                        ordinal: *ordinal,
                        gtid_pos: Some(g.to_owned()),
                    });
                }
                tracing::warn!(
                    system = %self.system, file = %file, pos, gtid_pos = %g,
                    found = ?here,
                    "mysql_cdc: the saved binlog position is not the saved GTID position on this \
                     server (another server after a failover, or a purged or reset binlog); \
                     resuming by GTID"
                );
                return Ok(Plan::ResumeGtid {
                    gtid_pos: g.to_owned(),
                    tx_gtid: tx_gtid.clone().filter(|_| *ordinal > 0),
                    ordinal: *ordinal,
                });
            }
            let logs = setup::binary_logs(control).await?;
            let lost = match logs.iter().find(|(f, _)| f == file) {
                Some((_, size)) if *pos <= *size => None,
                Some((_, size)) => Some(format!(
                    "is {size} bytes long, short of the saved position {pos} (the server's binlog \
                     was reset, or this is another server)"
                )),
                None => match logs.first() {
                    Some((first, _)) if later((first, 0), (file, 0)) => Some(format!(
                        "is no longer on the server (purged; the oldest binlog there is `{first}`)"
                    )),
                    _ => Some(
                        "is not on the server (its binlog was reset, or this is another server)"
                            .to_owned(),
                    ),
                },
            };
            let Some(why) = lost else {
                return Ok(Plan::Resume {
                    file: file.clone(),
                    pos: *pos,
                    ordinal: *ordinal,
                    gtid_pos: None,
                });
            };
            return self.position_lost(&format!("the binlog `{file}` {why}"), file, *pos);
        }
        match self.cfg.snapshot {
            SnapshotMode::Initial => Ok(Plan::Snapshot),
            SnapshotMode::Never => {
                let (file, pos) = setup::binlog_end(control).await?;
                Ok(Plan::Fresh { file, pos })
            }
        }
    }

    fn position_lost(&self, why: &str, file: &str, pos: u64) -> Result<Plan, Failure> {
        if self.cfg.on_position_lost == OnPositionLost::Fail {
            return Err(Failure::Fatal(format!(
                "{why}: the changes after {file}:{pos} may be lost. To start over with a new \
                 initial snapshot, run `weft cdc resnapshot -c <config> {}` (the hub need not be \
                 stopped), or set `on_position_lost: resnapshot`",
                self.system
            )));
        }
        tracing::warn!(system = %self.system, reason = %why, "mysql_cdc: position lost; taking a new snapshot");
        Ok(Plan::Snapshot)
    }

    /// One session: connect, plan, read and store until shutdown or a failure.
    async fn session(
        &self,
        ingest: &Arc<dyn Ingest>,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        let saved = self.saved(ingest.as_ref()).await?;
        let opts = setup::opts(self.cfg.url.expose().trim())?;
        let mut control = setup::connect(&opts).await?;
        let server = setup::check_settings(&mut control).await?;
        let mut tables = HashMap::new();
        for (db, t) in &self.cfg.tables {
            match setup::describe(&mut control, db, t).await? {
                Some(info) => {
                    tables.insert((db.clone(), t.clone()), info);
                }
                None => {
                    return Err(Failure::Fatal(format!(
                        "table `{db}.{t}` does not exist (or the user cannot see it)"
                    )));
                }
            }
        }
        let request = self.request(ingest.as_ref(), saved.as_ref()).await?;
        let plan = match &request {
            Some(r) => {
                tracing::warn!(system = %self.system, request = %r.id, "mysql_cdc: a new snapshot was requested (`weft cdc resnapshot`); copying every table again");
                Plan::Snapshot
            }
            None => self.plan(&mut control, &server, saved.as_ref()).await?,
        };
        let resumed = matches!(plan, Plan::Resume { .. } | Plan::ResumeGtid { .. });
        let (tx, rx) = mpsc::channel(CHANNEL);
        let stop = shutdown.child_token();
        let reader = Reader {
            system: self.system.clone(),
            opts,
            server,
            server_id: self.cfg.server_id,
            heartbeat: self.cfg.heartbeat,
            event_source: format!("weft:{}", self.system),
            event_type: self.cfg.event_type.clone(),
            control,
            schema: tables,
            rels: HashMap::new(),
            warned: HashMap::new(),
            tx,
            cur: (String::new(), 0),
            skip: None,
            gtid_state: None,
            gtid_dump: None,
            fde_seen: false,
            txn: (self.cfg.events == EventsMode::PerTransaction).then(|| Shape {
                source: format!("weft:{}", self.system),
                ty: self.cfg.event_type.clone(),
                subject: self.system.clone(),
                max: self.cfg.max_transaction_changes,
            }),
            group: None,
        };
        let reading = tokio::spawn(reader.run(plan, stop.clone(), self.cfg.on_position_lost));
        let mut batcher = Batcher {
            system: self.system.clone(),
            batch_size: self.cfg.batch_size,
            served: match &saved {
                Some(Position::Stream { served, .. }) => served.clone(),
                _ => None,
            },
            pending: request.map(|r| r.id),
            saved: if resumed { saved } else { None },
        };
        let stored = batcher.run(rx, ingest.as_ref(), shutdown).await;
        stop.cancel();
        let read = match reading.await {
            Ok(r) => r,
            Err(e) => Err(Failure::Retry(format!("the binlog reader failed: {e}"))),
        };
        match (stored, read) {
            (Err(Failure::Fatal(m)), _) | (_, Err(Failure::Fatal(m))) => Err(Failure::Fatal(m)),
            _ if shutdown.is_cancelled() => Ok(()),
            (Err(e @ Failure::Retry(_)), _) | (_, Err(e @ Failure::Retry(_))) => Err(e),
            _ => Err(Failure::Retry("the binlog stream ended".into())),
        }
    }
}

impl Source for MyCdcSource {
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
            let mut backoff = Duration::from_secs(1);
            loop {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                match self.session(&ingest, &shutdown).await {
                    Ok(()) | Err(Failure::Shutdown) => return Ok(()),
                    Err(Failure::Fatal(m)) => {
                        tracing::error!(system = %self.system, error = %m, "mysql_cdc: stopped");
                        return Err(fail(m));
                    }
                    Err(Failure::Retry(m)) => {
                        tracing::error!(
                            system = %self.system, error = %m, retry_in = ?backoff,
                            "mysql_cdc: the binlog stream failed; connecting again after a pause"
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

/// From the reader to the batcher, in stream order.
#[derive(Debug)]
enum Msg {
    /// A transaction's first change not stored yet follows.
    Begin,
    /// A change (or a row that could not be read) not stored yet; with
    /// `events: per_transaction`, a transaction's event or a part of it
    /// (with its unreadable rows), `ordinal` its last change's.
    Change {
        records: Vec<Record>,
        /// How many changes (for the batch size).
        changes: usize,
        file: String,
        pos: u64,
        ordinal: u64,
        /// The GTID position before the transaction, and its GTID.
        gtid_pos: Option<String>,
        tx_gtid: Option<String>,
    },
    /// The transaction with changes of captured tables is complete; the
    /// next one starts at `file:pos`.
    Commit {
        file: String,
        pos: u64,
        gtid: Option<String>,
        ts: Option<DateTime<Utc>>,
        /// The GTID position after it.
        gtid_pos: Option<String>,
    },
    /// The snapshot consistent with `file:pos` begins.
    SnapshotStart { file: String, pos: u64 },
    /// Row `n` of the snapshot.
    SnapshotRow {
        event: Box<Event>,
        file: String,
        pos: u64,
        n: u64,
    },
    /// Every row of the snapshot was sent; streaming follows from `file:pos`
    /// (GTID position `gtid_pos`).
    SnapshotDone {
        file: String,
        pos: u64,
        gtid_pos: Option<String>,
    },
    /// No transaction is open: everything before `file:pos` (GTID position
    /// `gtid_pos`) was read.
    Idle {
        file: String,
        pos: u64,
        gtid_pos: Option<String>,
    },
}

/// Groups the reader's messages into batches and stores them, each with
/// its position.
struct Batcher {
    system: String,
    batch_size: usize,
    /// The position stored last.
    saved: Option<Position>,
    served: Option<String>,
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
    /// The binlog time of the last transaction in the batch.
    ts: Option<DateTime<Utc>>,
    /// The last transaction's GTID.
    gtid: Option<String>,
    /// The request acted on last (carried in every streaming position).
    served: Option<String>,
    /// The request this session acts on: served once its snapshot is in.
    pending: Option<String>,
}

impl Batcher {
    /// A `weft cdc resnapshot` request made while streaming (looked at on
    /// idle heartbeats): the session ends so that the next one acts on it.
    async fn check_request(&self, ingest: &dyn Ingest) -> Result<(), Failure> {
        let text = match ingest.checkpoint(RESNAPSHOT_KEY).await {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::debug!(system = %self.system, error = %e, "mysql_cdc: the resnapshot request not read");
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
        tracing::info!(system = %self.system, request = %r.id, "mysql_cdc: a new snapshot was requested; starting over to take it");
        Err(Failure::Retry(
            "a new snapshot was requested (`weft cdc resnapshot`)".into(),
        ))
    }

    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Msg>,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        let mut p = Pending {
            pos: self.saved.clone(),
            gtid: match &self.saved {
                Some(Position::Stream { gtid, .. }) => gtid.clone(),
                _ => None,
            },
            served: self.served.clone(),
            pending: self.pending.clone(),
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
            apply(&mut p, msg);
            if p.changes >= self.batch_size {
                self.flush(&mut p, ingest, shutdown).await?;
            }
        }
    }

    /// Store the pending records with their position.
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
        tracing::debug!(system = %self.system, position = ?pos, "mysql_cdc: stored");
        if let Some(t) = p.ts.take() {
            let lag = (Utc::now() - t).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::gauge!(LAG_SECONDS, "source" => self.system.clone()).set(lag.max(0.0));
        }
        self.saved = Some(pos);
        Ok(())
    }
}

/// One message into the pending batch.
fn apply(p: &mut Pending, msg: Msg) {
    match msg {
        Msg::Begin => p.open = true,
        Msg::Change {
            records,
            changes,
            file,
            pos,
            ordinal,
            gtid_pos,
            tx_gtid,
        } => {
            p.records.extend(records);
            p.changes += changes;
            p.pos = Some(Position::Stream {
                file,
                pos,
                ordinal,
                gtid: p.gtid.clone(),
                gtid_pos,
                tx_gtid,
                served: p.served.clone(),
            });
        }
        Msg::Commit {
            file,
            pos,
            gtid,
            ts,
            gtid_pos,
        } => {
            p.open = false;
            if ts.is_some() {
                p.ts = ts;
            }
            if gtid.is_some() {
                p.gtid = gtid;
            }
            p.pos = Some(Position::Stream {
                file,
                pos,
                ordinal: 0,
                gtid: p.gtid.clone(),
                gtid_pos,
                tx_gtid: None,
                served: p.served.clone(),
            });
        }
        Msg::SnapshotStart { file, pos } => {
            p.open = true;
            p.pos = Some(Position::Snapshot { file, pos, rows: 0 });
        }
        Msg::SnapshotRow {
            event,
            file,
            pos,
            n,
        } => {
            p.records.push(Record::Good(*event));
            p.changes += 1;
            p.pos = Some(Position::Snapshot { file, pos, rows: n });
        }
        Msg::SnapshotDone {
            file,
            pos,
            gtid_pos,
        } => {
            p.open = false;
            if let Some(id) = p.pending.take() {
                p.served = Some(id);
            }
            p.pos = Some(Position::Stream {
                file,
                pos,
                ordinal: 0,
                gtid: None,
                gtid_pos,
                tx_gtid: None,
                served: p.served.clone(),
            });
        }
        Msg::Idle {
            file,
            pos,
            gtid_pos,
        } => {
            if p.open {
                return;
            }
            let ahead = match &p.pos {
                Some(Position::Stream {
                    file: f, pos: at, ..
                }) => later((&file, pos), (f, *at)),
                Some(Position::Snapshot { .. }) => false,
                None => true,
            };
            if ahead {
                p.pos = Some(Position::Stream {
                    file,
                    pos,
                    ordinal: 0,
                    gtid: p.gtid.clone(),
                    gtid_pos,
                    tx_gtid: None,
                    served: p.served.clone(),
                });
            }
        }
    }
}

/// A captured table as a table map describes it, with what decoding needs.
#[derive(Debug, Clone)]
struct Rel {
    db: String,
    table: String,
    /// Name and kind by binlog column index.
    columns: Vec<(String, Kind)>,
    key: Vec<String>,
    /// The table map's column types this was matched against.
    types: Vec<u8>,
}

/// The transaction being read.
#[derive(Debug, Clone)]
struct Tx {
    file: String,
    pos: u64,
    gtid: Option<String>,
    ts: Option<DateTime<Utc>>,
    ordinal: u64,
    /// A `BEGIN` was read: statements until the `COMMIT`/`XID` belong to it.
    begun: bool,
    /// `Msg::Begin` went to the batcher.
    sent_begin: bool,
}

/// Reads the binlog (and the snapshot before it), turns changes into
/// events and sends them to the batcher.
struct Reader {
    system: String,
    opts: Opts,
    server: Server,
    server_id: u32,
    heartbeat: Duration,
    event_source: String,
    event_type: String,
    control: Conn,
    /// The captured tables, as `information_schema` last described them.
    schema: HashMap<(String, String), TableInfo>,
    /// By binlog table id, resolved against its table map.
    rels: HashMap<u64, Rel>,
    /// Tables whose binlog shape did not match (warned once).
    warned: HashMap<(String, String), Vec<u8>>,
    tx: mpsc::Sender<Msg>,
    /// The start of the next event.
    cur: (String, u64),
    /// Of one transaction, the first changes are stored already.
    skip: Option<Skip>,
    /// MariaDB: the GTID position of what was read, one GTID per
    /// replication domain (updated at each transaction's end); `None`
    /// elsewhere or when the server could not say.
    gtid_state: Option<std::collections::BTreeMap<u32, String>>,
    /// The GTID position this stream was asked from (a dump by GTID).
    gtid_dump: Option<String>,
    /// A format description event was read on this stream.
    fde_seen: bool,
    /// `Some` with `events: per_transaction`.
    txn: Option<Shape>,
    /// The open transaction's changes not sent yet (`events:
    /// per_transaction`).
    group: Option<TxnGroup>,
}

impl Reader {
    async fn send(&self, m: Msg) -> Result<(), Failure> {
        self.tx
            .send(m)
            .await
            .map_err(|_| Failure::Retry("the batcher stopped".into()))
    }

    async fn run(
        mut self,
        plan: Plan,
        stop: CancellationToken,
        on_lost: OnPositionLost,
    ) -> Result<(), Failure> {
        let (file, pos) = match plan {
            Plan::Snapshot => {
                let snap = tokio::select! {
                    r = self.snapshot() => r?,
                    _ = stop.cancelled() => return Err(Failure::Shutdown),
                };
                snap
            }
            Plan::Resume {
                file,
                pos,
                ordinal,
                gtid_pos,
            } => {
                if ordinal > 0 {
                    self.skip = Some(Skip::At(file.clone(), pos, ordinal));
                }
                match gtid_pos {
                    Some(g) => self.gtid_state = Some(parse_gtid_pos(&g)),
                    None => self.gtid_state_at(&file, pos).await?,
                }
                (file, pos)
            }
            Plan::ResumeGtid {
                gtid_pos,
                tx_gtid,
                ordinal,
            } => {
                if let Some(g) = tx_gtid {
                    self.skip = Some(Skip::Gtid(g, ordinal));
                }
                self.gtid_state = Some(parse_gtid_pos(&gtid_pos));
                // the server's first event (a rotate) names the file
                self.cur = (String::new(), 4);
                let result = match self.open_gtid(&gtid_pos).await {
                    Ok(mut stream) => {
                        tracing::info!(system = %self.system, server = %self.server.version, gtid_pos = %gtid_pos, "mysql_cdc: streaming from a GTID position");
                        // a position the server does not have is fatal here
                        let r = self.stream(&mut stream, &stop, OnPositionLost::Fail).await;
                        drop(stream);
                        r
                    }
                    Err(e) => Err(e),
                };
                match result {
                    // refused before anything was read: the GTID is not in
                    // this server's binlogs
                    Err(Failure::Fatal(m))
                        if self.cur.0.is_empty() && on_lost == OnPositionLost::Resnapshot =>
                    {
                        tracing::warn!(system = %self.system, reason = %m, "mysql_cdc: position lost; taking a new snapshot");
                        self.skip = None;
                        tokio::select! {
                            r = self.snapshot() => r?,
                            _ = stop.cancelled() => return Err(Failure::Shutdown),
                        }
                    }
                    other => return other,
                }
            }
            Plan::Fresh { file, pos } => {
                self.gtid_state_at(&file, pos).await?;
                self.send(Msg::Idle {
                    file: file.clone(),
                    pos,
                    gtid_pos: self.gtid_pos(),
                })
                .await?;
                (file, pos)
            }
        };
        let mut stream = self.open(&file, pos).await?;
        tracing::info!(system = %self.system, server = %self.server.version, file = %file, pos, "mysql_cdc: streaming");
        self.cur = (file, pos);
        let result = self.stream(&mut stream, &stop, on_lost).await;
        drop(stream);
        result
    }

    /// The GTID position of `file:pos` on this server (MariaDB), kept as
    /// the state the stream's transactions advance.
    async fn gtid_state_at(&mut self, file: &str, pos: u64) -> Result<(), Failure> {
        if self.server.mariadb {
            self.gtid_state = setup::binlog_gtid_pos(&mut self.control, file, pos)
                .await?
                .filter(|g| setup::valid_gtid_pos(g))
                .map(|g| parse_gtid_pos(&g));
        }
        Ok(())
    }

    /// The GTID position as saved: `domain-server-seq` per domain, by
    /// domain, comma-separated.
    fn gtid_pos(&self) -> Option<String> {
        self.gtid_state
            .as_ref()
            .map(|m| m.values().cloned().collect::<Vec<_>>().join(","))
    }

    /// MariaDB: the binlog stream from the GTID position `gtid_pos`
    /// (`@slave_connect_state`, as a MariaDB replica asks; the server
    /// finds the file and ignores the request's file and offset).
    async fn open_gtid(&mut self, gtid_pos: &str) -> Result<BinlogStream, Failure> {
        if !setup::valid_gtid_pos(gtid_pos) {
            return Err(Failure::Fatal(format!(
                "the saved GTID position `{gtid_pos}` is not valid"
            )));
        }
        let mut conn = self.session_conn().await?;
        self.gtid_dump = Some(gtid_pos.to_owned());
        conn.query_drop(format!("SET @slave_connect_state = '{gtid_pos}'"))
            .await
            .map_err(setup::my_err("cannot set up the binlog session"))?;
        let request = BinlogStreamRequest::new(self.server_id)
            .with_filename(&b""[..])
            .with_pos(4u64);
        conn.get_binlog_stream(request)
            .await
            .map_err(|e| stream_error(e, &format!("the GTID position {gtid_pos}")))
    }

    /// A connection set up for a binlog dump.
    async fn session_conn(&mut self) -> Result<Conn, Failure> {
        let mut conn = setup::connect(&self.opts).await?;
        if self.server.mariadb {
            // GTID events as they are (0xA2), not rewritten as BEGIN
            conn.query_drop("SET @mariadb_slave_capability = 4")
                .await
                .map_err(setup::my_err("cannot set up the binlog session"))?;
        }
        let period = self.heartbeat.as_nanos().min(u128::from(u64::MAX));
        conn.query_drop(format!("SET @master_heartbeat_period = {period}"))
            .await
            .map_err(setup::my_err("cannot set up the binlog session"))?;
        Ok(conn)
    }

    /// The binlog stream from `file:pos`.
    async fn open(&mut self, file: &str, pos: u64) -> Result<BinlogStream, Failure> {
        let conn = self.session_conn().await?;
        let request = BinlogStreamRequest::new(self.server_id)
            .with_filename(file.as_bytes())
            .with_pos(pos);
        conn.get_binlog_stream(request)
            .await
            .map_err(|e| stream_error(e, &format!("{file}:{pos}")))
    }

    /// A consistent copy of the tables; returns its binlog position.
    async fn snapshot(&mut self) -> Result<(String, u64), Failure> {
        let mut conn = setup::connect(&self.opts).await?;
        let (file, pos) = setup::start_snapshot(&mut conn, &self.server).await?;
        self.gtid_state_at(&file, pos).await?;
        tracing::info!(
            system = %self.system, file = %file, pos, tables = self.schema.len(),
            "mysql_cdc: initial snapshot"
        );
        self.send(Msg::SnapshotStart {
            file: file.clone(),
            pos,
        })
        .await?;
        let mut tables: Vec<TableInfo> = self.schema.values().cloned().collect();
        tables.sort_by(|a, b| (&a.db, &a.table).cmp(&(&b.db, &b.table)));
        let expected = setup::estimated_rows(&mut conn, &tables).await;
        let mut progress = super::SnapshotProgress::new(&self.system, expected);
        let mut n = 0u64;
        for info in tables {
            let cols = info
                .columns
                .iter()
                .map(|c| setup::quote(&c.name))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT {cols} FROM {}.{}",
                setup::quote(&info.db),
                setup::quote(&info.table)
            );
            let rel = Rel {
                db: info.db.clone(),
                table: info.table.clone(),
                columns: info
                    .columns
                    .iter()
                    .map(|c| (c.name.clone(), c.kind.clone()))
                    .collect(),
                key: info.key.clone(),
                types: Vec::new(),
            };
            let mut result = conn
                .exec_iter(sql.as_str(), ())
                .await
                .map_err(setup::my_err("the snapshot failed"))
                .map_err(Failure::from)?;
            while let Some(row) = result
                .next()
                .await
                .map_err(|e| Failure::Retry(format!("the snapshot failed: {e}")))?
            {
                n += 1;
                progress.row();
                let mut after = Map::new();
                for (i, (name, kind)) in rel.columns.iter().enumerate() {
                    let v = row
                        .as_ref(i)
                        .map_or(Value::Null, |v| decode::to_json(kind, v, false));
                    after.insert(name.clone(), v);
                }
                let event = self.event(
                    &rel,
                    "r",
                    None,
                    Some(after),
                    Meta {
                        id: format!("snapshot@{file}:{pos}#{n}"),
                        file: file.clone(),
                        pos,
                        ordinal: n,
                        gtid: None,
                        server_id: None,
                        ts: None,
                        snapshot: true,
                    },
                );
                self.send(Msg::SnapshotRow {
                    event: Box::new(event),
                    file: file.clone(),
                    pos,
                    n,
                })
                .await?;
            }
        }
        progress.done();
        conn.query_drop("COMMIT")
            .await
            .map_err(|e| Failure::Retry(format!("cannot end the snapshot: {e}")))?;
        self.send(Msg::SnapshotDone {
            file: file.clone(),
            pos,
            gtid_pos: self.gtid_pos(),
        })
        .await?;
        tracing::info!(system = %self.system, rows = n, "mysql_cdc: initial snapshot read");
        Ok((file, pos))
    }

    async fn stream(
        &mut self,
        stream: &mut BinlogStream,
        stop: &CancellationToken,
        on_lost: OnPositionLost,
    ) -> Result<(), Failure> {
        let mut tx: Option<Tx> = None;
        let mut next_tick = tokio::time::Instant::now() + self.heartbeat;
        let mut last_heard = Instant::now();
        let silence = (self.heartbeat * 3).max(Duration::from_secs(30));
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = tokio::time::sleep_until(next_tick) => {
                    next_tick = tokio::time::Instant::now() + self.heartbeat;
                    if tx.is_none() {
                        self.send(Msg::Idle { file: self.cur.0.clone(), pos: self.cur.1, gtid_pos: self.gtid_pos() }).await?;
                    }
                    if last_heard.elapsed() > silence {
                        return Err(Failure::Retry(format!(
                            "nothing from the server for {silence:?} (not even a heartbeat)"
                        )));
                    }
                    continue;
                }
                _ = stop.cancelled() => return Ok(()),
            };
            last_heard = Instant::now();
            let ev = match ev {
                None => return Err(Failure::Retry("the server ended the binlog stream".into())),
                Some(Err(e)) => {
                    let from = match &self.gtid_dump {
                        // refused before its first event: by GTID
                        Some(g) if self.cur.0.is_empty() => format!("the GTID position {g}"),
                        _ => format!("{}:{}", self.cur.0, self.cur.1),
                    };
                    let f = stream_error(e, &from);
                    if matches!(f, Failure::Fatal(_)) && on_lost == OnPositionLost::Resnapshot {
                        // the next session's plan sees the binlog gone
                        if let Failure::Fatal(m) = f {
                            return Err(Failure::Retry(m));
                        }
                    }
                    return Err(f);
                }
                Some(Ok(ev)) => ev,
            };
            self.event_in(ev, stream, &mut tx).await?;
        }
    }

    /// One binlog event.
    async fn event_in(
        &mut self,
        ev: BinlogEvent,
        stream: &BinlogStream,
        tx: &mut Option<Tx>,
    ) -> Result<(), Failure> {
        let h = ev.header();
        let mut start = self.cur.clone();
        let ty = h.event_type_raw();
        // a real event starts `event_size` before the next one: exact also
        // after a gap (a dump by GTID skips to its first transaction)
        if ty == MARIADB_GTID_EVENT
            && let Some(at) = u64::from(h.log_pos()).checked_sub(u64::from(h.event_size()))
            && at >= 4
        {
            start.1 = at;
        }
        let ts = (h.timestamp() > 0)
            .then(|| DateTime::from_timestamp(i64::from(h.timestamp()), 0))
            .flatten();
        // the next event's start (artificial events have 0 or an earlier
        // offset: a dump from the middle of a file gets its format
        // description again)
        if u64::from(h.log_pos()) > self.cur.1
            && ty != EventType::ROTATE_EVENT as u8
            && ty != EventType::HEARTBEAT_EVENT as u8
        {
            self.cur.1 = u64::from(h.log_pos());
        }
        if ty == MARIADB_GTID_EVENT {
            let d = ev.data();
            if d.len() >= 13 {
                let seq = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
                let domain = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
                let gtid = format!("{domain}-{}-{seq}", h.server_id());
                // FL_STANDALONE: a DDL statement, no BEGIN/COMMIT; else a
                // transaction ending at its XID or COMMIT
                let standalone = d[12] & 1 != 0;
                self.gtid_begin(tx, start, Some(gtid), ts, !standalone)
                    .await?;
            }
            return Ok(());
        }
        let data = match ev.read_data() {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(Failure::Retry(format!(
                    "cannot read a binlog event at {}:{}: {e}",
                    start.0, start.1
                )));
            }
        };
        match data {
            EventData::RotateEvent(r) => {
                let name = r.name();
                // the artificial rotate opening a dump comes before the
                // format description, so its checksum (4 bytes) is still
                // on the name: it names the file asked for
                let name = if !self.fde_seen && self.cur.0.is_empty() {
                    // a dump by GTID: the server chose the file; the
                    // longest of its binlogs the name starts with
                    let logs = setup::binary_logs(&mut self.control).await?;
                    let raw = name.to_string();
                    logs.into_iter()
                        .map(|(f, _)| f)
                        .filter(|f| raw.starts_with(f.as_str()))
                        .max_by_key(String::len)
                        .ok_or_else(|| {
                            Failure::Retry(format!(
                                "the binlog `{}` the server streams from is not in SHOW BINARY LOGS",
                                raw.escape_debug()
                            ))
                        })?
                } else if !self.fde_seen && name.starts_with(self.cur.0.as_str()) {
                    self.cur.0.clone()
                } else {
                    name.trim_end_matches(|c: char| c.is_control() || c == '\u{fffd}')
                        .to_owned()
                };
                self.cur = (name, r.position());
            }
            EventData::FormatDescriptionEvent(_) => self.fde_seen = true,
            EventData::GtidEvent(g) => {
                let gtid = format!("{}:{}", uuid::Uuid::from_bytes(g.sid()), g.gno());
                self.gtid_begin(tx, start, Some(gtid), ts, false).await?;
            }
            EventData::AnonymousGtidEvent(_) => {
                self.gtid_begin(tx, start, None, ts, false).await?;
            }
            EventData::QueryEvent(q) => self.query(q, tx, start, ts).await?,
            EventData::XidEvent(_) => self.commit(tx, self.cur.clone()).await?,
            EventData::RowsEvent(rows) => {
                self.rows(&rows, stream, tx, h.server_id()).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A GTID event: a new event group starts at `start`. One still open
    /// ended without an event weft knows as an end (an XA prepare, say):
    /// it ends here.
    async fn gtid_begin(
        &mut self,
        tx: &mut Option<Tx>,
        start: (String, u64),
        gtid: Option<String>,
        ts: Option<DateTime<Utc>>,
        begun: bool,
    ) -> Result<(), Failure> {
        if tx.is_some() {
            tracing::debug!(system = %self.system, at = ?start, "mysql_cdc: an event group ended without XID or COMMIT");
            self.commit(tx, start.clone()).await?;
        }
        self.begin(tx, start, gtid, ts, begun);
        Ok(())
    }

    /// A transaction starts at `start` (a GTID event, or a `BEGIN` without
    /// one before it).
    fn begin(
        &mut self,
        tx: &mut Option<Tx>,
        start: (String, u64),
        gtid: Option<String>,
        ts: Option<DateTime<Utc>>,
        begun: bool,
    ) {
        if let Some(t) = tx.as_mut() {
            // the BEGIN after a GTID event
            t.begun |= begun;
            return;
        }
        *tx = Some(Tx {
            file: start.0,
            pos: start.1,
            gtid,
            ts,
            ordinal: 0,
            begun,
            sent_begin: false,
        });
    }

    /// The open transaction is complete (`XID`, `COMMIT`, a DDL statement);
    /// the next one starts at `end`.
    async fn commit(&mut self, tx: &mut Option<Tx>, end: (String, u64)) -> Result<(), Failure> {
        let Some(t) = tx.take() else {
            return Ok(());
        };
        if self.skip.as_ref().is_some_and(|s| s.is(&t)) {
            self.skip = None;
        }
        // the transaction is read: the GTID position moves past it
        if let (Some(state), Some(g)) = (self.gtid_state.as_mut(), t.gtid.as_deref())
            && let Some(domain) = mariadb_domain(g)
        {
            state.insert(domain, g.to_owned());
        }
        if let (Some(g), Some(shape)) = (self.group.take(), &self.txn)
            && let Some(part) = g.finish(shape)
        {
            self.send_part(part, &t).await?;
        }
        if t.ordinal > 0 {
            self.send(Msg::Commit {
                file: end.0,
                pos: end.1,
                gtid: t.gtid,
                ts: t.ts,
                gtid_pos: self.gtid_pos(),
            })
            .await?;
        }
        Ok(())
    }

    async fn query(
        &mut self,
        q: QueryEvent<'_>,
        tx: &mut Option<Tx>,
        start: (String, u64),
        ts: Option<DateTime<Utc>>,
    ) -> Result<(), Failure> {
        let text = q.query();
        let sql = text.trim();
        let head = sql
            .split(|c: char| c.is_whitespace() || c == ';')
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match head.as_str() {
            "BEGIN" => {
                self.begin(tx, start, None, ts, true);
                return Ok(());
            }
            "COMMIT" => return self.commit(tx, self.cur.clone()).await,
            // non-transactional changes stay; the transaction ends
            "ROLLBACK" if !sql.to_ascii_uppercase().contains(" TO ") => {
                return self.commit(tx, self.cur.clone()).await;
            }
            "SAVEPOINT" | "ROLLBACK" | "XA" => return Ok(()),
            _ => {}
        }
        // DDL (or a statement logged as one): a transaction of its own
        // unless a BEGIN opened one
        let standalone = tx.as_ref().is_none_or(|t| !t.begun);
        self.begin(tx, start, None, ts, false);
        let schema = q.schema().into_owned();
        self.ddl(&schema, sql, tx).await?;
        if standalone {
            self.commit(tx, self.cur.clone()).await?;
        }
        Ok(())
    }

    /// A DDL statement: column lists read again; `TRUNCATE` of a captured
    /// table is an event.
    async fn ddl(&mut self, schema: &str, sql: &str, tx: &mut Option<Tx>) -> Result<(), Failure> {
        let lower = sql.to_ascii_lowercase();
        let touched: Vec<(String, String)> = self
            .schema
            .keys()
            .filter(|(_, t)| lower.contains(&t.to_ascii_lowercase()))
            .cloned()
            .collect();
        if touched.is_empty() {
            return Ok(());
        }
        let short: String = sql.chars().take(200).collect();
        tracing::info!(system = %self.system, statement = %short, "mysql_cdc: schema change; reading the columns again");
        self.rels.clear();
        for (db, t) in &touched {
            match setup::describe(&mut self.control, db, t).await? {
                Some(info) => {
                    let old = self.schema.insert((db.clone(), t.clone()), info.clone());
                    if old.as_ref().is_some_and(|o| o.columns != info.columns) {
                        tracing::info!(
                            system = %self.system, table = %format!("{db}.{t}"),
                            columns = %info.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
                            "mysql_cdc: the table's shape changed"
                        );
                    }
                }
                None => tracing::warn!(
                    system = %self.system, table = %format!("{db}.{t}"),
                    "mysql_cdc: a captured table is gone (dropped or renamed)"
                ),
            }
        }
        if let Some((db, table)) = truncated(schema, sql)
            && let Some(info) = self.schema.get(&(db.clone(), table.clone())).cloned()
        {
            let rel = Rel {
                db,
                table,
                columns: Vec::new(),
                key: info.key,
                types: Vec::new(),
            };
            self.change(tx, &rel, "t", None, None, None).await?;
        }
        Ok(())
    }

    /// The decoding of table `table_id`, resolved against its table map.
    async fn rel(&mut self, table_id: u64, stream: &BinlogStream) -> Result<Option<Rel>, Failure> {
        let Some(tme) = stream.get_tme(table_id) else {
            return Err(Failure::Retry(format!(
                "a rows event of table id {table_id} without its table map"
            )));
        };
        let key = (
            tme.database_name().into_owned(),
            tme.table_name().into_owned(),
        );
        if !self.schema.contains_key(&key) {
            return Ok(None);
        }
        let count = usize::try_from(tme.columns_count()).unwrap_or(0);
        let mut types = Vec::with_capacity(count);
        let mut ctypes = Vec::with_capacity(count);
        for i in 0..count {
            match tme.get_column_type(i) {
                Ok(Some(t)) => {
                    types.push(t as u8);
                    ctypes.push(t);
                }
                _ => {
                    return Err(Failure::Retry(format!(
                        "table {}.{}: column {i} of the table map has an unknown type",
                        key.0, key.1
                    )));
                }
            }
        }
        if let Some(r) = self.rels.get(&table_id)
            && r.types == types
            && r.db == key.0
            && r.table == key.1
        {
            return Ok(Some(r.clone()));
        }
        let resolve = |info: &TableInfo| -> (Vec<(String, Kind)>, bool) {
            let mut ok = info.columns.len() == ctypes.len();
            let cols = ctypes
                .iter()
                .enumerate()
                .map(|(i, t)| match info.columns.get(i) {
                    Some(c) if c.kind.fits(*t) => (c.name.clone(), c.kind.clone()),
                    _ => {
                        ok = false;
                        (format!("@{i}"), Kind::of_binlog(*t, false))
                    }
                })
                .collect();
            (cols, ok)
        };
        let info = self.schema.get(&key).cloned();
        let (mut columns, mut ok) = info.as_ref().map_or((Vec::new(), false), &resolve);
        if !ok {
            // the cached description may be older than the table
            if let Some(fresh) = setup::describe(&mut self.control, &key.0, &key.1).await? {
                (columns, ok) = resolve(&fresh);
                self.schema.insert(key.clone(), fresh);
            }
        }
        if !ok && self.warned.get(&key) != Some(&types) {
            tracing::warn!(
                system = %self.system, table = %format!("{}.{}", key.0, key.1),
                "mysql_cdc: the binlog's columns of this table do not match its current columns \
                 (an ALTER TABLE since this change was written): the columns that differ are named \
                 by position (@n)"
            );
            self.warned.insert(key.clone(), types.clone());
        }
        let info_key = self
            .schema
            .get(&key)
            .map(|i| i.key.clone())
            .unwrap_or_default();
        let rel = Rel {
            db: key.0,
            table: key.1,
            columns,
            key: info_key,
            types,
        };
        self.rels.insert(table_id, rel.clone());
        Ok(Some(rel))
    }

    async fn rows(
        &mut self,
        rows: &RowsEventData<'_>,
        stream: &BinlogStream,
        tx: &mut Option<Tx>,
        server_id: u32,
    ) -> Result<(), Failure> {
        let Some(rel) = self.rel(rows.table_id(), stream).await? else {
            return Ok(());
        };
        let Some(tme) = stream.get_tme(rows.table_id()) else {
            return Ok(());
        };
        let op = match rows {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => "c",
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => "d",
            _ => "u",
        };
        let before_cols: Option<Vec<usize>> =
            rows.columns_before_image().map(|b| b.iter_ones().collect());
        let after_cols: Option<Vec<usize>> =
            rows.columns_after_image().map(|b| b.iter_ones().collect());
        let mut decoded = Vec::new();
        for row in rows.rows(tme) {
            let item = match row {
                Ok((before, after)) => {
                    let b = before
                        .map(|r| image(&rel, &r, before_cols.as_deref()))
                        .transpose();
                    let a = after
                        .map(|r| image(&rel, &r, after_cols.as_deref()))
                        .transpose();
                    match (b, a) {
                        (Ok(b), Ok(a)) => Ok((b, a)),
                        (Err(e), _) | (_, Err(e)) => Err(e),
                    }
                }
                Err(e) => Err(format!("cannot read a row: {e}")),
            };
            decoded.push(item);
        }
        for item in decoded {
            match item {
                Ok((before, after)) => {
                    self.change(tx, &rel, op, before, after, Some(server_id))
                        .await?;
                }
                Err(e) => self.bad(tx, &rel, &e).await?,
            }
        }
        Ok(())
    }

    /// The next ordinal of the open transaction, and whether the change is
    /// not stored yet.
    fn next_ordinal(&self, tx: &mut Option<Tx>) -> Result<(Tx, bool), Failure> {
        let Some(t) = tx.as_mut() else {
            return Err(Failure::Retry(
                "a change outside a transaction (no GTID or BEGIN before it)".into(),
            ));
        };
        t.ordinal += 1;
        let stored = self
            .skip
            .as_ref()
            .is_some_and(|s| s.is(t) && t.ordinal <= s.ordinal());
        Ok((t.clone(), !stored))
    }

    async fn begin_sent(&mut self, tx: &mut Option<Tx>) -> Result<(), Failure> {
        if let Some(t) = tx.as_mut()
            && !t.sent_begin
        {
            t.sent_begin = true;
            if self.txn.is_some() {
                let mut meta = Map::new();
                meta.insert("file".into(), Value::String(t.file.clone()));
                meta.insert("pos".into(), Value::from(t.pos));
                meta.insert(
                    "gtid".into(),
                    t.gtid.clone().map_or(Value::Null, Value::String),
                );
                meta.insert("ts".into(), t.ts.map_or(Value::Null, txn::time_text));
                self.group = Some(TxnGroup::new(format!("{}:{}", t.file, t.pos), meta, t.ts));
            }
            self.send(Msg::Begin).await?;
        }
        Ok(())
    }

    /// A change (or an unreadable row) to the batcher, or (`events:
    /// per_transaction`) into its transaction's event, sending the part it
    /// completes.
    async fn send_record(&mut self, t: &Tx, record: Record) -> Result<(), Failure> {
        if let (Some(shape), Some(g)) = (&self.txn, self.group.as_mut()) {
            return match g.push(shape, t.ordinal, record) {
                Some(part) => self.send_part(part, t).await,
                None => Ok(()),
            };
        }
        self.send(Msg::Change {
            records: vec![record],
            changes: 1,
            file: t.file.clone(),
            pos: t.pos,
            ordinal: t.ordinal,
            gtid_pos: self.gtid_pos(),
            tx_gtid: t.gtid.clone(),
        })
        .await
    }

    async fn send_part(&self, part: txn::Part, t: &Tx) -> Result<(), Failure> {
        self.send(Msg::Change {
            records: part.records,
            changes: part.changes,
            file: t.file.clone(),
            pos: t.pos,
            ordinal: part.ordinal,
            gtid_pos: self.gtid_pos(),
            tx_gtid: t.gtid.clone(),
        })
        .await
    }

    async fn change(
        &mut self,
        tx: &mut Option<Tx>,
        rel: &Rel,
        op: &str,
        before: Option<Map<String, Value>>,
        after: Option<Map<String, Value>>,
        server_id: Option<u32>,
    ) -> Result<(), Failure> {
        let (t, new) = self.next_ordinal(tx)?;
        if !new {
            return Ok(());
        }
        self.begin_sent(tx).await?;
        let event = self.event(
            rel,
            op,
            before,
            after,
            Meta {
                id: format!("{}:{}#{}", t.file, t.pos, t.ordinal),
                file: t.file.clone(),
                pos: t.pos,
                ordinal: t.ordinal,
                gtid: t.gtid.clone(),
                server_id: server_id.or(Some(self.server.server_id)),
                ts: t.ts,
                snapshot: false,
            },
        );
        self.send_record(&t, Record::Good(event)).await
    }

    /// A row that cannot be read: to the DLQ with the reason, in its place.
    async fn bad(&mut self, tx: &mut Option<Tx>, rel: &Rel, error: &str) -> Result<(), Failure> {
        let (t, new) = self.next_ordinal(tx)?;
        if !new {
            return Ok(());
        }
        self.begin_sent(tx).await?;
        let id = format!("{}:{}#{}", t.file, t.pos, t.ordinal);
        tracing::warn!(system = %self.system, id = %id, error = %error, "mysql_cdc: a row that cannot be read goes to the DLQ");
        let record = Record::Bad(BadRecord {
            location: format!("binlog {}:{} table {}.{}", t.file, t.pos, rel.db, rel.table),
            raw: String::new(),
            error: error.to_owned(),
            correlation_id: weft_core::event::new_correlation_id(),
            id,
        });
        self.send_record(&t, record).await
    }

    fn event(
        &self,
        rel: &Rel,
        op: &str,
        before: Option<Map<String, Value>>,
        after: Option<Map<String, Value>>,
        meta: Meta,
    ) -> Event {
        let row = after.as_ref().or(before.as_ref());
        let key = match row {
            Some(r) if !rel.key.is_empty() => {
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
                format!("{}.{}:{text}", rel.db, rel.table)
            }
            _ => format!("{}.{}", rel.db, rel.table),
        };
        let mut source = Map::new();
        source.insert("db".into(), Value::String(rel.db.clone()));
        source.insert("table".into(), Value::String(rel.table.clone()));
        source.insert("file".into(), Value::String(meta.file));
        source.insert("pos".into(), Value::from(meta.pos));
        source.insert("tx_ordinal".into(), Value::from(meta.ordinal));
        source.insert("gtid".into(), meta.gtid.map_or(Value::Null, Value::String));
        source.insert(
            "server_id".into(),
            meta.server_id.map_or(Value::Null, Value::from),
        );
        source.insert(
            "ts".into(),
            meta.ts.map_or(Value::Null, |t| {
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
        let mut ev = Event::new(
            meta.id,
            self.event_source.clone(),
            self.event_type.clone(),
            None,
            Value::Object(data),
        );
        if let Some(t) = meta.ts {
            ev.time = t;
        }
        ev.subject = Some(subject);
        ev
    }
}

/// Where a change is.
struct Meta {
    id: String,
    file: String,
    pos: u64,
    ordinal: u64,
    gtid: Option<String>,
    server_id: Option<u32>,
    ts: Option<DateTime<Utc>>,
    snapshot: bool,
}

/// A row image as JSON: the k-th value is the column of the k-th set bit.
fn image(
    rel: &Rel,
    row: &BinlogRow,
    present: Option<&[usize]>,
) -> Result<Map<String, Value>, String> {
    let mut m = Map::new();
    let all: Vec<usize>;
    let indexes = match present {
        Some(bits) => bits,
        None => {
            all = (0..row.len()).collect();
            &all
        }
    };
    for (k, &i) in indexes.iter().enumerate() {
        let Some((name, kind)) = rel.columns.get(i) else {
            continue;
        };
        let v = match row.as_ref(k) {
            None => Value::Null,
            Some(v) => {
                decode::binlog_to_json(kind, v).map_err(|e| format!("column `{name}`: {e}"))?
            }
        };
        m.insert(name.clone(), v);
    }
    Ok(m)
}

/// The table a `TRUNCATE [TABLE] [db.]t` statement empties.
fn truncated(schema: &str, sql: &str) -> Option<(String, String)> {
    let mut words = sql.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("truncate") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("table") {
        name = words.next()?;
    }
    let name = name.trim_end_matches(';');
    let parts: Vec<String> = split_name(name);
    match parts.as_slice() {
        [t] if !schema.is_empty() => Some((schema.to_owned(), t.clone())),
        [d, t] => Some((d.clone(), t.clone())),
        _ => None,
    }
}

/// `` `a`.`b` `` or `a.b` -> [a, b].
fn split_name(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '`') => quoted = true,
            (true, '`') if chars.peek() == Some(&'`') => {
                chars.next();
                cur.push('`');
            }
            (true, '`') => quoted = false,
            (false, '.') => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// The transaction whose first `ordinal` changes are stored: by where it
/// starts, or (a resume by GTID, where offsets are this server's) by its
/// GTID.
#[derive(Debug, Clone)]
enum Skip {
    At(String, u64, u64),
    Gtid(String, u64),
}

impl Skip {
    fn is(&self, t: &Tx) -> bool {
        match self {
            Skip::At(file, pos, _) => *file == t.file && *pos == t.pos,
            Skip::Gtid(g, _) => t.gtid.as_deref() == Some(g.as_str()),
        }
    }
    fn ordinal(&self) -> u64 {
        match self {
            Skip::At(_, _, n) | Skip::Gtid(_, n) => *n,
        }
    }
}

/// The domain of a MariaDB GTID (`domain-server-seq`); `None` for a MySQL
/// one (`uuid:n`).
fn mariadb_domain(gtid: &str) -> Option<u32> {
    let mut parts = gtid.split('-');
    let (d, s, n) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || s.parse::<u32>().is_err() || n.parse::<u64>().is_err() {
        return None;
    }
    d.parse().ok()
}

/// A GTID position (`0-1-100,1-2-7`) by domain; empty for `""`.
fn parse_gtid_pos(pos: &str) -> std::collections::BTreeMap<u32, String> {
    pos.split(',')
        .map(str::trim)
        .filter_map(|g| mariadb_domain(g).map(|d| (d, g.to_owned())))
        .collect()
}

/// A binlog stream error: a binlog the server cannot send from is fatal
/// (with the way out); the rest is worth a retry.
fn stream_error(e: mysql_async::Error, from: &str) -> Failure {
    let message = crate::mysql::my_message(&e);
    match &e {
        mysql_async::Error::Server(s) if s.code == ER_MASTER_FATAL_ERROR_READING_BINLOG => {
            Failure::Fatal(format!(
                "the server cannot send the binlog from {from}: {message}. The binlog may \
                 have been purged: the changes after it may be lost. To start over with a new \
                 initial snapshot, run `weft cdc resnapshot -c <config> <system>` (the hub need \
                 not be stopped), or set `on_position_lost: resnapshot`"
            ))
        }
        mysql_async::Error::Server(s) if matches!(s.code, 1045 | 1227 | 1142) => Failure::Fatal(
            format!("cannot read the binlog: {message} (the user needs REPLICATION SLAVE)"),
        ),
        _ => Failure::Retry(format!("the binlog stream failed: {message}")),
    }
}

/// `weft check` for a MariaDB/MySQL CDC source: connect, the binlog
/// settings CDC needs, each table (there, with a key), that the binary
/// logs can be listed, and the replication grant.
pub async fn probe(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
) -> crate::probe::Finding {
    use crate::probe::Finding;
    let cfg = match config::MyCdcConfig::from_settings(system, settings) {
        Ok(c) => c,
        Err(issues) => return Finding::fail(config::describe(&issues)),
    };
    match probe_my(&cfg).await {
        Ok((notes, warn)) if warn => Finding::warn(notes.join("; ")),
        Ok((notes, _)) => Finding::ok(notes.join("; ")),
        Err(e) => Finding::fail(e.to_string()),
    }
}

async fn probe_my(cfg: &config::MyCdcConfig) -> Result<(Vec<String>, bool), SetupError> {
    let opts = setup::opts(cfg.url.expose().trim())?;
    let mut conn = setup::connect(&opts).await?;
    let server = setup::check_settings(&mut conn).await?;
    let mut notes = vec![format!(
        "{} with the binlog in ROW format, full images",
        server.version
    )];
    let mut warn = false;
    for (db, t) in &cfg.tables {
        match setup::describe(&mut conn, db, t).await? {
            Some(info) if info.key.is_empty() => {
                warn = true;
                notes.push(format!(
                    "`{db}.{t}` has no primary or NOT NULL unique key: its updates and deletes carry no key"
                ));
            }
            Some(_) => {}
            None => {
                return Err(SetupError::Fatal(format!(
                    "table `{db}.{t}` does not exist (or the user cannot see it)"
                )));
            }
        }
    }
    notes.push(format!("{} tables found", cfg.tables.len()));
    let logs = setup::binary_logs(&mut conn).await?;
    notes.push(format!("{} binary logs", logs.len()));
    let grants: Vec<String> = conn
        .query("SHOW GRANTS")
        .await
        .map_err(setup::my_err("cannot read the grants"))?;
    let replicates = grants.iter().any(|g| {
        let g = g.to_ascii_uppercase();
        g.contains("ALL PRIVILEGES ON *.*")
            || g.contains("REPLICATION SLAVE")
            || g.contains("REPLICATION REPLICA")
    });
    if !replicates {
        warn = true;
        notes.push(
            "no REPLICATION SLAVE grant seen in SHOW GRANTS (reading the binlog needs it; a role may grant it)".into(),
        );
    }
    Ok((notes, warn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binlog_files_sort_by_number() {
        assert!(later(("mysql-bin.000010", 4), ("mysql-bin.000009", 900)));
        assert!(later(("mysql-bin.000009", 901), ("mysql-bin.000009", 900)));
        assert!(!later(("mysql-bin.000009", 900), ("mysql-bin.000009", 900)));
        assert!(later(("mysql-bin.1000000", 4), ("mysql-bin.999999", 4)));
    }

    #[test]
    fn the_checkpoint_round_trips() {
        let p = Position::Stream {
            file: "mysql-bin.000003".into(),
            pos: 1234,
            ordinal: 2,
            gtid: Some("0-1-57".into()),
            gtid_pos: Some("0-1-57,1-2-9".into()),
            tx_gtid: Some("0-1-58".into()),
            served: None,
        };
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(
            text,
            r#"{"phase":"stream","file":"mysql-bin.000003","pos":1234,"ordinal":2,"gtid":"0-1-57","gtid_pos":"0-1-57,1-2-9","tx_gtid":"0-1-58"}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&text).unwrap(), p);
        // saved before GTID positions were kept: still read
        let old = r#"{"phase":"stream","file":"mysql-bin.000003","pos":1234,"ordinal":0}"#;
        assert!(matches!(
            serde_json::from_str::<Position>(old).unwrap(),
            Position::Stream { gtid_pos: None, .. }
        ));
    }

    #[test]
    fn gtid_positions_parse_by_domain_and_refuse_anything_else() {
        let m = parse_gtid_pos("0-1-100, 2-5-7");
        assert_eq!(m.get(&0).map(String::as_str), Some("0-1-100"));
        assert_eq!(m.get(&2).map(String::as_str), Some("2-5-7"));
        assert!(parse_gtid_pos("").is_empty());
        assert_eq!(mariadb_domain("3-1-9"), Some(3));
        assert_eq!(mariadb_domain("3e4f:9"), None);
        assert!(setup::valid_gtid_pos("0-1-100,2-5-7"));
        assert!(setup::valid_gtid_pos(""));
        assert!(!setup::valid_gtid_pos("0-1-1'; DROP TABLE t; --"));
        assert!(!setup::valid_gtid_pos("0-1"));
    }

    #[test]
    fn truncate_statements_name_their_table() {
        assert_eq!(
            truncated("shop", "TRUNCATE TABLE `orders`"),
            Some(("shop".into(), "orders".into()))
        );
        assert_eq!(
            truncated("x", "truncate `a``b`.t;"),
            Some(("a`b".into(), "t".into()))
        );
        assert_eq!(truncated("x", "ALTER TABLE t ADD c int"), None);
    }
}
