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
//! id is `<name>:<key>@<cursor>`: an update (a new cursor) is a new event; a
//! row read again is a duplicate in the inbox.
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
mod my;
mod pg;
mod value;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use weft_core::Event;
use weft_core::config::SourceSpec;

use crate::source::{
    BadRecord, Batch, Checkpoint, Ingest, IngestError, Receipt, Record, Source, SourceError,
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
    Pg(pg::PgReader),
    My(my::MyReader),
    Lite(lite::LiteReader),
}

impl Db {
    async fn fetch(&mut self, after: Option<&Position>) -> Result<Vec<RawRow>, String> {
        match self {
            Db::Pg(r) => r.fetch(after).await,
            Db::My(r) => r.fetch(after).await,
            Db::Lite(r) => r.fetch(after).await,
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
    db: Option<Db>,
    /// `None` before the checkpoint was read; `Some(None)` at the start.
    pos: Option<Option<Position>>,
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
            db: None,
            pos: None,
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
        }
    }

    async fn connect(&self) -> Result<Db, String> {
        Ok(match &self.url {
            Url::Postgres(u) => Db::Pg(pg::PgReader::connect(u, self.shape(pg::quote)).await?),
            Url::Mysql(u) => Db::My(my::MyReader::connect(u, self.shape(my::quote)).await?),
            Url::Sqlite(p) => Db::Lite(lite::LiteReader::open(p, self.shape(lite::quote)).await?),
        })
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

    /// One batch: read the rows after the position, ingest them with the
    /// new position. Returns the number of rows read (a full batch means
    /// more may be waiting).
    pub async fn poll_once(
        &mut self,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Result<usize, PollError> {
        let after = self.position(ingest).await?;
        if self.db.is_none() {
            self.db = Some(self.connect().await.map_err(PollError::Db)?);
        }
        let Some(db) = self.db.as_mut() else {
            return Err(PollError::Db("not connected".into()));
        };
        let rows = match db.fetch(after.as_ref()).await {
            Ok(r) => r,
            Err(e) => {
                self.db = None;
                return Err(PollError::Db(e));
            }
        };
        let n = rows.len();
        if n == 0 {
            return Ok(0);
        }
        let mut records = Vec::with_capacity(n);
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
            let id = format!("{}:{}@{}", self.name, text(&key), text(&cursor));
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
            last = Some(Position { cursor, key });
        }
        let checkpoint = last.as_ref().map(|p| Checkpoint {
            key: CHECKPOINT_KEY.into(),
            value: serde_json::to_string(p).unwrap_or_default(),
        });
        self.ingest_batch(
            ingest,
            Batch {
                records,
                checkpoint,
            },
            shutdown,
        )
        .await?;
        self.pos = Some(last);
        Ok(n)
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
                    Ok(n) => {
                        backoff = Duration::from_secs(1);
                        if n > 0 {
                            tracing::debug!(system = %self.system, rows = n, "sql poll read rows");
                        }
                        // a full batch: more rows may be waiting
                        if n >= self.batch_size {
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
