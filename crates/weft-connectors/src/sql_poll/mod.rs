//! The SQL polling source: weft reads a PostgreSQL, MariaDB/MySQL or SQLite
//! table (or a custom query) incrementally, by a cursor column and a
//! tie-breaking key, for databases without CDC.
//!
//! ## What one poll reads
//! The rows after the last one read, in `(cursor, key)` order, at most
//! `batch_size` of them:
//!
//! ```sql
//! -- PostgreSQL (a row comparison, typed like the columns)
//! SELECT * FROM t WHERE ("updated_at", "id") > ($1::text::timestamptz, $2::text::int8)
//!   ORDER BY "updated_at", "id" LIMIT 500
//! -- MariaDB/MySQL and SQLite (spelled out)
//! ... WHERE (`updated_at` > ? OR (`updated_at` = ? AND `id` > ?)) ...
//! ```
//!
//! The key breaks ties, so any number of rows sharing one cursor value are
//! read across batches and none is skipped. The very first poll reads from
//! the start (rows whose cursor or key is NULL are never read). A full
//! batch is followed at once by the next one; otherwise the next poll
//! comes after `interval`.
//!
//! A custom `query` is used as written with two placeholders filled in:
//! `{checkpoint}` (the condition above, or "cursor and key are not NULL"
//! on the first poll) and `{limit}` (the batch size). It must order its
//! rows by `cursor, key` (validated at load: it says `ORDER BY`).
//!
//! ## Checkpoint and ids
//! The position `{"cursor": ..., "key": ...}` of the last row of a batch is
//! the checkpoint (key [`CHECKPOINT_KEY`]) saved in the same `Batch` as the
//! rows, so a restart continues after the last stored row. Each row's event
//! id is `<name>:<key>@<cursor>#<hash8>`, `hash8` being the first 8 hex
//! digits of the SHA-256 of the row's canonical JSON: an update is a new
//! event (a new cursor, or new values under the same cursor); a row read
//! again unchanged is a duplicate in the inbox.
//!
//! ## Rows that commit out of cursor order: settle and overlap
//! A cursor is usually set when the row is written, but the row becomes
//! visible only when its transaction commits (PostgreSQL's `now()` is even
//! the transaction's *start*). A transaction that commits after a later row
//! was read has a cursor below the saved position; and a row changed twice
//! within one cursor value (MariaDB `DATETIME` has 1 s precision) keeps its
//! cursor. Plain "after the last row" polling loses both, silently. Two
//! guards, both on by default for timestamp and date cursors:
//! - **settle** (default `5s`): a poll reads only rows with
//!   `cursor < now() - settle` on the database's clock (PostgreSQL
//!   `clock_timestamp()`, MariaDB `NOW(6)`, in UTC; zone-less columns are
//!   taken as UTC as everywhere here, so a MariaDB `DATETIME` or PostgreSQL
//!   `timestamp` written in a local time ahead of UTC is also held back by
//!   that offset, and one behind UTC gets no settle: store UTC there, or
//!   rely on `overlap`, which compares cursors with cursors). A transaction
//!   shorter than `settle` is committed before its rows are due, and so is
//!   every change within one cursor value of a clock-set column.
//! - **overlap** (default `1m`): each poll first re-reads the rows from
//!   `saved cursor - overlap` up to and including the saved position (in
//!   batches, without moving the checkpoint), then goes on after it. A row
//!   that committed late, up to `overlap` behind, is found there; one that
//!   changed under the same cursor has a new hash, so a new event; the rest
//!   are duplicates. The cost is re-reading the rows of the last `overlap`
//!   on every poll; the ids of the current and the previous cycle are kept
//!   in memory (up to 200,000), so an unchanged re-read row is skipped
//!   before ingest instead of being mapped and dropped by the inbox (after
//!   a restart the first window goes to the inbox).
//!
//! A transaction longer than `settle + overlap` can still be missed: size
//! them for the longest writer. A row whose clock-set cursor changes more
//! often than every `settle` is read once it has been quiet for `settle`. Integer and text cursors get neither guard
//! (a sequence value is assigned inside the transaction too, so a long
//! transaction can commit below the saved position: prefer a timestamp set
//! by the database). SQLite has one writer at a time and gets neither
//! either; a cursor the application computed before its write transaction
//! began can still commit out of order there.
//!
//! ## Rows as JSON
//! Column name to value: integers and floats as numbers, `numeric`/`decimal`
//! as strings (no float on the way), booleans, text, timestamps as RFC 3339
//! UTC (`2024-05-01T10:00:00.123456Z`; zone-less timestamps are taken as
//! UTC), dates as `YYYY-MM-DD`, times as `HH:MM:SS[.ffffff]`, `json`/`jsonb`
//! as JSON, `bytea`/blobs as base64, NULL as null. A PostgreSQL type not in
//! this list makes the row a DLQ entry naming the column (cast it to `text`
//! in a custom query). MariaDB reports `JSON` columns as text: they arrive as
//! strings (`fromjson` in the mapping). MySQL `tinyint(1)`/`BOOLEAN` is a boolean.
//!
//! ## Read-only
//! PostgreSQL: `SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY`, and
//! each poll in a `READ ONLY` transaction. MariaDB/MySQL: `SET SESSION
//! TRANSACTION READ ONLY` and a read-only transaction per poll. SQLite: the
//! file is opened with `SQLITE_OPEN_READ_ONLY`. A query that writes fails.
//!
//! ## Failures
//! A connection that cannot be made or breaks, or a query that fails, is
//! logged; the source waits (1 s, doubling up to 60 s), connects again and
//! goes on from its checkpoint. Only a store failure stops it.

mod lite;
#[cfg(feature = "mysql")]
mod my;
#[cfg(feature = "postgres")]
mod pg;
mod value;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use weft_core::Event;
use weft_core::config::SourceSpec;

use crate::source::{
    BadRecord, Batch, Checkpoint, Ingest, IngestError, Receipt, Record, Source, SourceError,
    canonical_json,
};

/// Checkpoint key of the position.
pub const CHECKPOINT_KEY: &str = "sql_poll_position";

const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The last row read: its cursor and key as they appear in the events.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub cursor: Value,
    pub key: Value,
}

/// A row read: its columns, or why one of them could not be read.
pub(crate) struct RawRow {
    pub values: Map<String, Value>,
    pub error: Option<String>,
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The database failed or refused; the connection is dropped and the
    /// source tries again after a pause.
    #[error("{0}")]
    Db(String),
    /// The store failed; the source stops.
    #[error("store error: {0}")]
    Store(String),
    #[error("stopped by shutdown")]
    Shutdown,
}

/// What the query looks like, before the placeholders are filled in.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    /// The SQL with `{checkpoint}` and `{limit}`.
    pub template: String,
    pub cursor: String,
    pub key: String,
    pub limit: usize,
    /// Leave rows younger than this (timestamp and date cursors).
    pub settle: Duration,
}

/// Which rows one batch reads, in `(cursor, key)` order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Query<'a> {
    /// The very first poll: every settled row.
    First,
    /// The settled rows after a position.
    After(&'a Position),
    /// The overlap window's first batch: rows with `cursor >= lower`, up to
    /// and including `upto` (the saved position).
    WindowFrom {
        lower: &'a Value,
        upto: &'a Position,
    },
    /// The overlap window's next batch: rows after `after`, up to and
    /// including `upto`.
    WindowAfter {
        after: &'a Position,
        upto: &'a Position,
    },
}

/// What one [`SqlPollSource::poll_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Polled {
    /// Rows read (new or not).
    pub rows: usize,
    /// More is to be read at once: a full batch, or the overlap re-read
    /// finished and the rows after the saved position come next.
    pub more: bool,
}

/// Where the current poll cycle is.
#[derive(Debug, Clone)]
enum Phase {
    /// Re-reading the overlap window behind the saved position, after
    /// `scan` (from the window's start when `None`).
    Window { scan: Option<Position> },
    /// Reading the rows after the saved position.
    Forward,
}

impl Shape {
    /// The SQL with the placeholders filled in.
    pub fn sql(&self, condition: &str) -> String {
        self.template
            .replace("{checkpoint}", condition)
            .replace("{limit}", &self.limit.to_string())
    }
}

enum Url {
    Postgres(String),
    Mysql(String),
    Sqlite(PathBuf),
}

enum Db {
    #[cfg(feature = "postgres")]
    Pg(pg::PgReader),
    #[cfg(feature = "mysql")]
    My(my::MyReader),
    Lite(lite::LiteReader),
}

impl Db {
    async fn fetch(&mut self, q: Query<'_>) -> Result<Vec<RawRow>, String> {
        match self {
            #[cfg(feature = "postgres")]
            Db::Pg(r) => r.fetch(q).await,
            #[cfg(feature = "mysql")]
            Db::My(r) => r.fetch(q).await,
            Db::Lite(r) => r.fetch(q).await,
        }
    }

    /// Whether the cursor is a timestamp or a date, so that settle and
    /// overlap apply.
    fn cursor_is_time(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            Db::Pg(r) => r.cursor_is_time(),
            #[cfg(feature = "mysql")]
            Db::My(r) => r.cursor_is_time(),
            Db::Lite(_) => false,
        }
    }
}

/// The SQL polling source.
pub struct SqlPollSource {
    system: String,
    event_source: String,
    event_type: String,
    name: String,
    url: Url,
    /// `table` or `query`, with identifiers quoted for the database.
    table: Option<String>,
    query: Option<String>,
    cursor: String,
    key: String,
    batch_size: usize,
    interval: Duration,
    settle: Duration,
    overlap: Duration,
    db: Option<Db>,
    /// `None` before the checkpoint was read; `Some(None)` at the start.
    pos: Option<Option<Position>>,
    phase: Phase,
    /// Ids stored in this and the last cycle, not offered again when the
    /// overlap re-reads them.
    seen: Seen,
}

/// The ids of the rows read in the current and the previous poll cycle.
/// Everything the overlap window re-reads was read by one of the two (the
/// window lies behind a position the previous cycle reached), so a re-read
/// row that is unchanged is skipped here instead of being mapped and then
/// dropped by the inbox. Bounded: past [`Seen::CAP`] ids a cycle stops
/// remembering, and the inbox dedupes the rest. Empty after a restart.
#[derive(Default)]
struct Seen {
    current: std::collections::HashSet<String>,
    previous: std::collections::HashSet<String>,
}

impl Seen {
    const CAP: usize = 200_000;

    fn contains(&self, id: &str) -> bool {
        self.current.contains(id) || self.previous.contains(id)
    }

    fn extend(&mut self, ids: Vec<String>) {
        for id in ids {
            if self.current.len() >= Self::CAP {
                return;
            }
            self.current.insert(id);
        }
    }

    fn next_cycle(&mut self) {
        self.previous = std::mem::take(&mut self.current);
    }
}

impl SqlPollSource {
    pub fn new(system: &str, spec: &SourceSpec) -> Result<Self, SourceError> {
        let err = |m: String| SourceError {
            system: system.to_owned(),
            message: m,
        };
        let SourceSpec::SqlPoll {
            cfg,
            sqlite_path,
            name,
            interval,
            batch_size,
            event_type,
            settle,
            overlap,
        } = spec
        else {
            return Err(err("not a sql_poll source".into()));
        };
        let u = cfg.url.expose().trim();
        let url = if u.starts_with("postgresql://") || u.starts_with("postgres://") {
            Url::Postgres(u.to_owned())
        } else if u.starts_with("mysql://") {
            Url::Mysql(u.to_owned())
        } else if let Some(p) = sqlite_path {
            Url::Sqlite(p.clone())
        } else {
            return Err(err(
                "expected a `postgresql://`, `mysql://` or `sqlite:<path>` URL".into(),
            ));
        };
        Ok(SqlPollSource {
            system: system.to_owned(),
            event_source: format!("weft:{system}"),
            event_type: event_type.clone(),
            name: name.clone(),
            url,
            table: cfg.table.clone(),
            query: cfg.query.as_ref().map(|q| q.value.clone()),
            cursor: cfg.cursor.clone(),
            key: cfg.key.clone(),
            batch_size: (*batch_size).max(1),
            interval: *interval,
            settle: *settle,
            overlap: *overlap,
            db: None,
            pos: None,
            // a restart re-reads the window too
            phase: Phase::Window { scan: None },
            seen: Seen::default(),
        })
    }

    fn shape(&self, quote: fn(&str) -> String) -> Shape {
        let template = match (&self.query, &self.table) {
            (Some(q), _) => q.clone(),
            (None, Some(t)) => format!(
                "SELECT * FROM {} WHERE {{checkpoint}} ORDER BY {}, {} LIMIT {{limit}}",
                t.split('.').map(quote).collect::<Vec<_>>().join("."),
                quote(&self.cursor),
                quote(&self.key)
            ),
            (None, None) => String::new(),
        };
        Shape {
            template,
            cursor: self.cursor.clone(),
            key: self.key.clone(),
            limit: self.batch_size,
            settle: self.settle,
        }
    }

    /// `weft check`: connect, check the table or query and its cursor and
    /// key columns as at start, and read the first batch (nothing is
    /// ingested or saved).
    pub async fn probe(&mut self) -> Result<String, String> {
        let mut db = self.connect().await?;
        let rows = db.fetch(Query::First).await?;
        Ok(format!(
            "connected; `{}` answers with cursor `{}` and key `{}` ({} rows in the first batch of {})",
            self.name,
            self.cursor,
            self.key,
            rows.len(),
            self.batch_size
        ))
    }

    async fn connect(&self) -> Result<Db, String> {
        let db = match &self.url {
            #[cfg(feature = "postgres")]
            Url::Postgres(u) => Db::Pg(pg::PgReader::connect(u, self.shape(pg::quote)).await?),
            #[cfg(not(feature = "postgres"))]
            Url::Postgres(_) => return Err(crate::without_feature("postgres", "PostgreSQL")),
            #[cfg(feature = "mysql")]
            Url::Mysql(u) => Db::My(my::MyReader::connect(u, self.shape(my::quote)).await?),
            #[cfg(not(feature = "mysql"))]
            Url::Mysql(_) => return Err(crate::without_feature("mysql", "MariaDB/MySQL")),
            Url::Sqlite(p) => Db::Lite(lite::LiteReader::open(p, self.shape(lite::quote)).await?),
        };
        let guarded = !self.settle.is_zero() || !self.overlap.is_zero();
        if guarded && !db.cursor_is_time() {
            tracing::info!(
                system = %self.system,
                cursor = %self.cursor,
                "settle and overlap apply to timestamp and date cursors of PostgreSQL and MariaDB/MySQL only; \
                 this cursor is read strictly after the saved position"
            );
        }
        Ok(db)
    }

    /// The start of the overlap window behind `pos`, when there is one.
    fn window_start(&self, pos: &Position) -> Option<Value> {
        if self.overlap.is_zero() || !self.db.as_ref().is_some_and(Db::cursor_is_time) {
            return None;
        }
        let back = chrono::Duration::from_std(self.overlap).ok()?;
        let Value::String(s) = &pos.cursor else {
            return None;
        };
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            let t = t.with_timezone(&Utc).naive_utc().checked_sub_signed(back)?;
            return Some(value::timestamp(t));
        }
        let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
        let t = d.and_hms_opt(0, 0, 0)?.checked_sub_signed(back)?;
        Some(Value::String(t.date().format("%Y-%m-%d").to_string()))
    }

    /// The position to read after (the saved checkpoint the first time).
    async fn position(&mut self, ingest: &dyn Ingest) -> Result<Option<Position>, PollError> {
        if let Some(p) = &self.pos {
            return Ok(p.clone());
        }
        let saved = ingest
            .checkpoint(CHECKPOINT_KEY)
            .await
            .map_err(|e| PollError::Store(e.to_string()))?;
        let pos = match saved {
            None => None,
            Some(text) => Some(serde_json::from_str::<Position>(&text).map_err(|e| {
                PollError::Store(format!("the saved position `{text}` is not valid: {e}"))
            })?),
        };
        self.pos = Some(pos.clone());
        Ok(pos)
    }

    /// One batch of the current cycle: first the overlap window behind the
    /// saved position (its batches leave the checkpoint alone), then the
    /// settled rows after it (each batch saved with its last position).
    /// [`Polled::more`] says whether the next batch is due at once.
    pub async fn poll_once(
        &mut self,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Result<Polled, PollError> {
        let saved = self.position(ingest).await?;
        if self.db.is_none() {
            self.db = Some(self.connect().await.map_err(PollError::Db)?);
        }
        let lower = match (&self.phase, &saved) {
            (Phase::Window { scan: None }, Some(p)) => self.window_start(p),
            _ => None,
        };
        let query = match (&self.phase, &saved) {
            (_, None) => Query::First,
            (Phase::Window { scan: None }, Some(p)) => match &lower {
                Some(l) => Query::WindowFrom { lower: l, upto: p },
                None => Query::After(p),
            },
            (Phase::Window { scan: Some(s) }, Some(p)) => Query::WindowAfter { after: s, upto: p },
            (Phase::Forward, Some(p)) => Query::After(p),
        };
        let in_window = matches!(query, Query::WindowFrom { .. } | Query::WindowAfter { .. });
        let Some(db) = self.db.as_mut() else {
            return Err(PollError::Db("not connected".into()));
        };
        let rows = match db.fetch(query).await {
            Ok(r) => r,
            Err(e) => {
                self.db = None;
                return Err(PollError::Db(e));
            }
        };
        let n = rows.len();
        let full = n >= self.batch_size;
        let mut records = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut last = None;
        for row in rows {
            let (cursor, key) = match (row.values.get(&self.cursor), row.values.get(&self.key)) {
                (Some(c), Some(k)) if !c.is_null() && !k.is_null() => (c.clone(), k.clone()),
                _ => {
                    self.db = None;
                    return Err(PollError::Db(format!(
                        "the rows have no (non-null) `{}` or `{}` column; the query must return both",
                        self.cursor, self.key
                    )));
                }
            };
            let id = event_id(&self.name, &key, &cursor, &row.values);
            last = Some(Position {
                cursor: cursor.clone(),
                key: key.clone(),
            });
            if self.seen.contains(&id) {
                // stored by this source in this or the last cycle: a
                // duplicate the inbox would drop, after mapping it
                ids.push(id);
                continue;
            }
            ids.push(id.clone());
            records.push(match row.error {
                None => Record::Good(Event::new(
                    id,
                    self.event_source.clone(),
                    self.event_type.clone(),
                    None,
                    Value::Object(row.values),
                )),
                Some(error) => Record::Bad(BadRecord {
                    location: format!("{} row {}", self.name, id),
                    id,
                    raw: Value::Object(row.values).to_string(),
                    error,
                    correlation_id: weft_core::event::new_correlation_id(),
                }),
            });
        }
        // the window lies behind the saved position: it never moves it
        let checkpoint = match (&last, in_window) {
            (Some(p), false) => Some(Checkpoint {
                key: CHECKPOINT_KEY.into(),
                value: serde_json::to_string(p)
                    .map_err(|e| PollError::Db(format!("cannot save the position: {e}")))?,
            }),
            _ => None,
        };
        if !records.is_empty() || checkpoint.is_some() {
            self.ingest_batch(
                ingest,
                Batch {
                    records,
                    checkpoint,
                },
                shutdown,
            )
            .await?;
        }
        self.seen.extend(ids);
        let more = if in_window {
            self.phase = match (full, last) {
                (true, Some(l)) => Phase::Window { scan: Some(l) },
                _ => Phase::Forward,
            };
            true
        } else {
            if last.is_some() {
                self.pos = Some(last);
            }
            if full {
                self.phase = Phase::Forward;
            } else {
                // caught up: the next cycle starts with the window again
                self.phase = Phase::Window { scan: None };
                self.seen.next_cycle();
            }
            full
        };
        Ok(Polled { rows: n, more })
    }

    /// Ingest one batch; while the hub is busy, wait and offer it again.
    async fn ingest_batch(
        &self,
        ingest: &dyn Ingest,
        batch: Batch,
        shutdown: &CancellationToken,
    ) -> Result<Receipt, PollError> {
        loop {
            match ingest.ingest(batch.clone()).await {
                Ok(r) => return Ok(r),
                Err(IngestError::Unavailable(m)) => {
                    tracing::debug!(system = %self.system, reason = %m, "ingest unavailable; waiting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.cancelled() => return Err(PollError::Shutdown),
                    }
                }
                Err(IngestError::Store(m)) => return Err(PollError::Store(m)),
                // `reject` is refused at validate for non-webhook sources
                Err(IngestError::Rejected(m)) => return Err(PollError::Store(m)),
            }
        }
    }
}

/// `<name>:<key>@<cursor>#<hash8>`: the row's place and the first 8 hex
/// digits of the SHA-256 of its canonical JSON, so that new values under
/// the same cursor are a new event and an unchanged row read again is not.
fn event_id(name: &str, key: &Value, cursor: &Value, values: &Map<String, Value>) -> String {
    let mut entries: Vec<(&String, &Value)> = values.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut canon = String::from("{");
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            canon.push(',');
        }
        canon.push_str(&Value::String(k.clone()).to_string());
        canon.push(':');
        canonical_json(v, &mut canon);
    }
    canon.push('}');
    let hash = Sha256::digest(canon.as_bytes());
    format!(
        "{name}:{}@{}#{}",
        text(key),
        text(cursor),
        hex::encode(&hash[..4])
    )
}

/// A cursor or key value as it appears in an event id.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Source for SqlPollSource {
    fn run(
        mut self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                let wait = match self.poll_once(ingest.as_ref(), &shutdown).await {
                    Ok(p) => {
                        backoff = Duration::from_secs(1);
                        if p.rows > 0 {
                            tracing::debug!(system = %self.system, rows = p.rows, "sql poll read rows");
                        }
                        // a full batch, or the window done: go on at once
                        if p.more {
                            continue;
                        }
                        self.interval
                    }
                    Err(PollError::Shutdown) => return Ok(()),
                    Err(PollError::Store(m)) => {
                        return Err(SourceError {
                            system: self.system.clone(),
                            message: format!("store error: {m}"),
                        });
                    }
                    Err(PollError::Db(m)) => {
                        tracing::error!(
                            system = %self.system,
                            error = %m,
                            retry_in = ?backoff,
                            "sql poll failed; connecting again after a pause"
                        );
                        let w = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        w
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn event_ids_carry_a_hash_of_the_values_not_of_their_order() {
        let a = map(json!({"id": 1, "status": "new", "at": "2024-05-01T10:00:00Z"}));
        let b = map(json!({"at": "2024-05-01T10:00:00Z", "status": "new", "id": 1}));
        let c = map(json!({"id": 1, "status": "paid", "at": "2024-05-01T10:00:00Z"}));
        let (k, t) = (json!(1), json!("2024-05-01T10:00:00Z"));
        let ia = event_id("orders", &k, &t, &a);
        assert!(ia.starts_with("orders:1@2024-05-01T10:00:00Z#"), "{ia}");
        assert_eq!(ia.len(), "orders:1@2024-05-01T10:00:00Z#".len() + 8);
        assert_eq!(ia, event_id("orders", &k, &t, &b));
        assert_ne!(ia, event_id("orders", &k, &t, &c));
    }

    #[test]
    fn seen_keeps_two_cycles_and_is_bounded() {
        let mut s = Seen::default();
        s.extend(vec!["a".into()]);
        s.next_cycle();
        s.extend(vec!["b".into()]);
        assert!(s.contains("a") && s.contains("b"));
        s.next_cycle();
        assert!(!s.contains("a") && s.contains("b"));
        let many: Vec<String> = (0..Seen::CAP + 10).map(|i| i.to_string()).collect();
        s.extend(many);
        assert_eq!(s.current.len(), Seen::CAP);
    }
}
