//! The MariaDB/MySQL sink: upserts each delivery's payload (a JSON object)
//! into a table, a batch at a time, with multi-row parameterised statements:
//!
//! ```sql
//! INSERT INTO `t` (`a`, `b`, `c`) VALUES (?, ?, ?), (?, ?, ?), ...
//!   ON DUPLICATE KEY UPDATE `b` = VALUES(`b`), `c` = VALUES(`c`)
//! ```
//!
//! It behaves like the PostgreSQL sink ([`crate::postgres`]):
//! - Every configured column is written: a field missing from the payload
//!   is written as NULL (the row is replaced, not merged).
//! - Values are checked against the column's type in Rust first, so a bad
//!   delivery fails alone with a `Permanent` error naming the column.
//!   `decimal` values travel as text (no float on the way), timestamps as
//!   UTC (the session's `time_zone` is `+00:00`).
//! - Deliveries with the same key in one batch are reduced to the last one;
//!   the earlier ones share its result.
//! - If the database refuses a statement (a CHECK, a foreign key, a value
//!   out of the column's range), its rows are written one by one to find
//!   the bad ones.
//! - Connection trouble, deadlocks (1213) and lock wait timeouts (1205) are
//!   `Retryable`; what the database refuses about the data is `Permanent`.
//!
//! Sessions run with `STRICT_ALL_TABLES` added to the server's `sql_mode`,
//! so a value that does not fit fails instead of being truncated. The key
//! must be exactly the columns of a primary or unique key of the table
//! (checked at start). `ON DUPLICATE KEY UPDATE` fires on *any* unique
//! index, so a table with another one (say on `email`) is refused at start,
//! naming the index: two records sharing an email would merge into one row.
//! `allow_other_unique: true` accepts it with a warning. Not counted: a
//! unique index over the key columns and more (it can only match the key's
//! own row), and one with an `AUTO_INCREMENT` column the sink does not
//! write (a surrogate primary key), which cannot match an insert. Connections are
//! plain TCP (no TLS).

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Timelike, Utc};
use futures::future::BoxFuture;
use mysql_async::prelude::Queryable;
use mysql_async::{Opts, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, Value as My};
use serde_json::Value;

use crate::sink::{Delivery, KeyedRows, Sink, SinkError, WriteResult, describe, kind_of};
use crate::sqlite::is_ident;

/// MySQL's limit of placeholders in one statement.
const MAX_PARAMS: usize = 65_535;
/// Largest number of rows in one statement (keeps packets small).
const MAX_ROWS: usize = 2_000;

/// How a column's values are checked and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Int(i64, i64),
    UInt(u64),
    Decimal,
    Float,
    Bool,
    DateTime,
    Date,
    Json,
    /// Any other type: sent as text, MySQL converts it.
    Other,
}

impl Kind {
    fn of(ty: &str) -> Kind {
        let t = ty.trim().to_ascii_lowercase();
        let words: Vec<&str> = t.split_whitespace().collect();
        let unsigned = words.contains(&"unsigned");
        let head = words.first().copied().unwrap_or("");
        let (base, args) = match head.find('(') {
            Some(p) => (&head[..p], head[p..].trim_matches(|c| c == '(' || c == ')')),
            None => (head, ""),
        };
        let int = |bits: u32| {
            if unsigned {
                Kind::UInt(if bits == 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                })
            } else {
                let hi = if bits == 64 {
                    i64::MAX
                } else {
                    (1i64 << (bits - 1)) - 1
                };
                Kind::Int(-hi - 1, hi)
            }
        };
        match base {
            "char" | "varchar" | "text" | "tinytext" | "mediumtext" | "longtext" | "enum"
            | "set" | "nchar" | "nvarchar" => Kind::Text,
            "bool" | "boolean" => Kind::Bool,
            "tinyint" if args == "1" && !unsigned => Kind::Bool,
            "tinyint" => int(8),
            "smallint" => int(16),
            "mediumint" => int(24),
            "int" | "integer" => int(32),
            "bigint" => int(64),
            "decimal" | "numeric" | "dec" | "fixed" => Kind::Decimal,
            "float" | "double" | "real" => Kind::Float,
            "datetime" | "timestamp" => Kind::DateTime,
            "date" => Kind::Date,
            "json" => Kind::Json,
            _ => Kind::Other,
        }
    }
}

struct Column {
    name: String,
    ty: String,
    kind: Kind,
}

type Row = Vec<My>;

pub struct MysqlSink {
    pool: Pool,
    /// Quoted table name.
    table_sql: String,
    table: String,
    columns: Vec<Column>,
    /// Positions in `columns` of the key columns.
    key: Vec<usize>,
    /// Other unique indexes are accepted (with a warning).
    allow_other_unique: bool,
    /// `host:port`, for connection errors (never the password).
    endpoint: String,
    /// The table check passed (done at start, or before the first write
    /// when the database was down at start).
    checked: tokio::sync::OnceCell<()>,
}

fn quote(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// Connection options with weft's session settings.
pub(crate) fn opts(url: &str, init: Vec<String>) -> Result<Opts, String> {
    let opts = Opts::from_url(url).map_err(|e| format!("bad MySQL URL: {e}"))?;
    let constraints = PoolConstraints::new(0, 8).unwrap_or_default();
    Ok(OptsBuilder::from_opts(opts)
        .init(init)
        .pool_opts(PoolOpts::default().with_constraints(constraints))
        .into())
}

impl MysqlSink {
    /// Check the config, connect once (to fail early on a bad URL, a
    /// missing table or column, a key without a unique index).
    pub async fn connect(cfg: &weft_core::config::raw::MysqlSinkConfig) -> Result<Self, String> {
        match Self::connect_lazy(cfg).await? {
            (sink, None) => Ok(sink),
            (_, Some(down)) => Err(down),
        }
    }

    /// Like [`MysqlSink::connect`], but a database that cannot be reached
    /// is not an error: the sink comes back with the reason, and checks
    /// the table before its first write instead. A table that does not fit
    /// is an error either way.
    pub async fn connect_lazy(
        cfg: &weft_core::config::raw::MysqlSinkConfig,
    ) -> Result<(Self, Option<String>), String> {
        let parts: Vec<&str> = cfg.table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| is_ident(p)) {
            return Err(format!(
                "table `{}` is not a plain SQL identifier",
                cfg.table
            ));
        }
        if cfg.columns.is_empty() {
            return Err("at least one column is required".into());
        }
        let mut columns = Vec::with_capacity(cfg.columns.len());
        for (name, ty) in &cfg.columns {
            if !is_ident(name) {
                return Err(format!("column `{name}` is not a plain SQL identifier"));
            }
            columns.push(Column {
                name: name.clone(),
                ty: ty.trim().to_owned(),
                kind: Kind::of(ty),
            });
        }
        if cfg.key.is_empty() {
            return Err("at least one key column is required".into());
        }
        let mut key = Vec::with_capacity(cfg.key.len());
        for k in &cfg.key {
            let pos = columns
                .iter()
                .position(|c| &c.name == k)
                .ok_or_else(|| format!("key column `{k}` is not among `columns`"))?;
            key.push(pos);
        }
        let opts = opts(
            cfg.url.expose(),
            vec![
                "SET time_zone = '+00:00'".into(),
                "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), 'STRICT_ALL_TABLES')".into(),
            ],
        )?;
        let endpoint = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
        let sink = MysqlSink {
            pool: Pool::new(opts),
            table_sql: parts.iter().map(|p| quote(p)).collect::<Vec<_>>().join("."),
            table: cfg.table.clone(),
            columns,
            key,
            allow_other_unique: cfg.allow_other_unique,
            endpoint,
            checked: tokio::sync::OnceCell::new(),
        };
        match sink.ensure_checked().await {
            Ok(()) => Ok((sink, None)),
            Err(e) if e.kind == weft_core::ErrorKind::Retryable => Ok((sink, Some(e.message))),
            Err(e) => Err(e.message),
        }
    }

    /// The table check, once: retryable when the database cannot be
    /// reached, permanent when the table does not fit the config.
    async fn ensure_checked(&self) -> Result<(), SinkError> {
        self.checked
            .get_or_try_init(|| self.check_table())
            .await
            .map(|_| ())
    }

    async fn check_table(&self) -> Result<(), SinkError> {
        let parts: Vec<&str> = self.table.split('.').collect();
        let parts = &parts[..];
        let mut conn =
            self.pool.get_conn().await.map_err(|e| {
                classify(&format!("cannot connect to MySQL at {}", self.endpoint), e)
            })?;
        let fit = SinkError::permanent;
        let cols: Vec<String> = self.columns.iter().map(|c| quote(&c.name)).collect();
        conn.query_drop(format!(
            "SELECT {} FROM {} LIMIT 0",
            cols.join(", "),
            self.table_sql
        ))
        .await
        .map_err(|e| classify(&format!("table `{}`", self.table), e))?;
        let (schema, table) = match parts {
            [s, t] => (Some(s.to_string()), t.to_string()),
            _ => (
                None,
                parts.first().map(|s| s.to_string()).unwrap_or_default(),
            ),
        };
        // each unique index: its columns, and those of them that are AUTO_INCREMENT
        let indexes: Vec<(String, String, Option<String>)> = conn
            .exec(
                "SELECT s.INDEX_NAME, \
                        GROUP_CONCAT(s.COLUMN_NAME ORDER BY s.SEQ_IN_INDEX SEPARATOR ','), \
                        GROUP_CONCAT(IF(c.EXTRA LIKE '%auto_increment%', s.COLUMN_NAME, NULL) SEPARATOR ',') \
                 FROM information_schema.STATISTICS s \
                 LEFT JOIN information_schema.COLUMNS c \
                   ON c.TABLE_SCHEMA = s.TABLE_SCHEMA AND c.TABLE_NAME = s.TABLE_NAME \
                  AND c.COLUMN_NAME = s.COLUMN_NAME \
                 WHERE s.TABLE_SCHEMA = COALESCE(?, DATABASE()) AND s.TABLE_NAME = ? AND s.NON_UNIQUE = 0 \
                 GROUP BY s.INDEX_NAME ORDER BY s.INDEX_NAME",
                (schema, table),
            )
            .await
            .map_err(|e| classify(&format!("cannot read the indexes of `{}`", self.table), e))?;
        let mut want: Vec<String> = self
            .key
            .iter()
            .map(|&k| self.columns[k].name.to_ascii_lowercase())
            .collect();
        want.sort();
        let is_key = |cols: &str| {
            let mut have: Vec<String> = cols.split(',').map(|c| c.to_ascii_lowercase()).collect();
            have.sort();
            have == want
        };
        if !indexes.iter().any(|(_, cols, _)| is_key(cols)) {
            return Err(fit(format!(
                "table `{}` has no primary or unique key on exactly ({}); the upsert needs one",
                self.table,
                want.join(", ")
            )));
        }
        let written = |c: &str| self.columns.iter().any(|w| w.name.eq_ignore_ascii_case(c));
        // an index over the key and more can only match the key's own row
        let covers_key = |cols: &str| {
            let have: Vec<String> = cols.split(',').map(|c| c.to_ascii_lowercase()).collect();
            want.iter().all(|k| have.contains(k))
        };
        let others: Vec<String> = indexes
            .iter()
            .filter(|(_, cols, _)| !covers_key(cols))
            // an AUTO_INCREMENT column left to the database never collides
            .filter(|(_, _, auto)| {
                !auto
                    .as_deref()
                    .is_some_and(|a| a.split(',').any(|c| !c.is_empty() && !written(c)))
            })
            .map(|(name, cols, _)| format!("`{name}` on ({})", cols.replace(',', ", ")))
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let what = format!(
            "table `{}` has unique indexes besides the key ({}): {}; `ON DUPLICATE KEY UPDATE` \
             updates the row that matches any of them, so two records with different keys \
             could merge into one row",
            self.table,
            want.join(", "),
            others.join(", ")
        );
        if self.allow_other_unique {
            tracing::warn!(table = %self.table, "{what} (allowed by allow_other_unique)");
            return Ok(());
        }
        Err(fit(format!(
            "{what}; drop them, make one of them the key, or set `allow_other_unique: true`"
        )))
    }

    /// Check one payload: its values, one per column.
    fn row(&self, payload: &Value) -> Result<Row, SinkError> {
        let Value::Object(map) = payload else {
            return Err(SinkError::permanent(format!(
                "payload for table `{}` must be a JSON object, got {}",
                self.table,
                kind_of(payload)
            )));
        };
        let mut row = Vec::with_capacity(self.columns.len());
        for (i, col) in self.columns.iter().enumerate() {
            let v = map.get(&col.name).unwrap_or(&Value::Null);
            let cell = convert(col, v)?;
            if cell == My::NULL && self.key.contains(&i) {
                return Err(SinkError::permanent(format!(
                    "key column `{}` is missing or null",
                    col.name
                )));
            }
            row.push(cell);
        }
        Ok(row)
    }

    fn sql(&self, rows: usize) -> String {
        let names: Vec<String> = self.columns.iter().map(|c| quote(&c.name)).collect();
        let one = format!("({})", vec!["?"; names.len()].join(", "));
        let values = vec![one.as_str(); rows].join(", ");
        let updates: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.key.contains(i))
            .map(|(_, n)| format!("{n} = VALUES({n})"))
            .collect();
        let action = if updates.is_empty() {
            // nothing but the key: keep the row as it is
            let k = &names[self.key[0]];
            format!("{k} = {k}")
        } else {
            updates.join(", ")
        };
        format!(
            "INSERT INTO {} ({}) VALUES {values} ON DUPLICATE KEY UPDATE {action}",
            self.table_sql,
            names.join(", ")
        )
    }

    async fn execute(
        &self,
        conn: &mut mysql_async::Conn,
        rows: &[&Row],
    ) -> Result<(), mysql_async::Error> {
        let params: Vec<My> = rows.iter().flat_map(|r| r.iter().cloned()).collect();
        conn.exec_drop(self.sql(rows.len()), Params::Positional(params))
            .await
    }

    /// Write rows in statements of at most `MAX_ROWS`; a statement the
    /// database refuses is retried row by row.
    async fn write_rows(&self, rows: &[&Row]) -> Vec<Result<(), SinkError>> {
        let mut conn = match self.pool.get_conn().await {
            Ok(c) => c,
            Err(e) => {
                let err = classify(&format!("cannot connect to MySQL at {}", self.endpoint), e);
                let (kind, msg) = (err.kind, err.message);
                return rows
                    .iter()
                    .map(|_| Err(SinkError::like(kind, &msg)))
                    .collect();
            }
        };
        let per = (MAX_PARAMS / self.columns.len().max(1)).clamp(1, MAX_ROWS);
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(per) {
            match self.execute(&mut conn, chunk).await {
                Ok(()) => out.extend(chunk.iter().map(|_| Ok(()))),
                Err(e) => {
                    let err = classify("upsert failed", e);
                    if err.kind == weft_core::ErrorKind::Permanent && chunk.len() > 1 {
                        for row in chunk {
                            match self.execute(&mut conn, &[*row]).await {
                                Ok(()) => out.push(Ok(())),
                                Err(e) => out.push(Err(classify("upsert failed", e))),
                            }
                        }
                    } else {
                        let (kind, msg) = (err.kind, err.message);
                        out.extend(chunk.iter().map(|_| Err(SinkError::like(kind, &msg))));
                    }
                }
            }
        }
        out
    }
}

pub(crate) fn my_message(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => {
            format!("{} ({}, SQLSTATE {})", s.message, s.code, s.state)
        }
        other => other.to_string(),
    }
}

/// Server error codes worth a retry: lock wait timeout, deadlock, too many
/// connections, shutdown, killed or interrupted, network trouble, read-only.
const RETRYABLE_CODES: &[u16] = &[
    1205, 1213, 1040, 1053, 1077, 1079, 1080, 1152, 1153, 1154, 1155, 1156, 1157, 1158, 1159, 1160,
    1161, 1184, 1189, 1190, 1203, 1290, 1317, 1836, 1927, 2002, 2003, 2006, 2013,
];

/// Connection trouble, contention and resource limits are worth a retry;
/// what the database refuses about the data or the schema is not.
pub(crate) fn is_retryable(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Server(s) => RETRYABLE_CODES.contains(&s.code),
        mysql_async::Error::Url(_) => false,
        _ => true,
    }
}

fn classify(context: &str, e: mysql_async::Error) -> SinkError {
    let msg = format!("{context}: {}", my_message(&e));
    if is_retryable(&e) {
        SinkError::retryable(msg).with_source(e)
    } else {
        SinkError::permanent(msg).with_source(e)
    }
}

/// A decimal number as text: digits, one optional point, an optional sign
/// and exponent (MySQL's DECIMAL has no NaN or infinity).
fn is_decimal_text(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(p) => (&s[..p], Some(&s[p + 1..])),
        None => (s, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    (!int.is_empty() || !frac.is_empty()) && digits(int) && digits(frac) && exp_ok
}

fn date_value(t: NaiveDateTime) -> My {
    My::Date(
        u16::try_from(t.year()).unwrap_or(0),
        t.month() as u8,
        t.day() as u8,
        t.hour() as u8,
        t.minute() as u8,
        t.second() as u8,
        t.nanosecond().min(999_999_999) / 1000,
    )
}

/// A timestamp: RFC 3339 with a zone (converted to UTC), a zone-less
/// `YYYY-MM-DD[T ]HH:MM:SS[.f]` (taken as it is), or Unix seconds.
fn parse_datetime(v: &Value) -> Option<NaiveDateTime> {
    match v {
        Value::String(s) => {
            let s = s.trim();
            if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                return Some(t.with_timezone(&Utc).naive_utc());
            }
            for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
                if let Ok(t) = DateTime::parse_from_str(s, f) {
                    return Some(t.with_timezone(&Utc).naive_utc());
                }
            }
            for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
                if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
                    return Some(t);
                }
            }
            None
        }
        Value::Number(n) => n
            .as_i64()
            .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
            .map(|t| t.naive_utc()),
        _ => None,
    }
}

/// A payload value checked against its column's type, as it is sent.
fn convert(col: &Column, v: &Value) -> Result<My, SinkError> {
    let mismatch = || {
        SinkError::permanent(format!(
            "column `{}`: expected {}, got {}",
            col.name,
            col.ty,
            describe(v)
        ))
    };
    if v.is_null() {
        return Ok(My::NULL);
    }
    let int = |v: &Value| -> Option<i128> {
        match v {
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Some(i128::from(i)),
                (None, Some(u)) => Some(i128::from(u)),
                _ => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i128),
                    _ => None,
                },
            },
            Value::String(s) => s.trim().parse::<i128>().ok(),
            _ => None,
        }
    };
    Ok(match col.kind {
        Kind::Text => match v {
            Value::String(s) => My::Bytes(s.as_bytes().to_vec()),
            Value::Number(n) => My::Bytes(n.to_string().into_bytes()),
            Value::Bool(b) => My::Bytes(b.to_string().into_bytes()),
            _ => return Err(mismatch()),
        },
        Kind::Int(lo, hi) => {
            let i = int(v).ok_or_else(mismatch)?;
            if i < i128::from(lo) || i > i128::from(hi) {
                return Err(mismatch());
            }
            My::Int(i as i64)
        }
        Kind::UInt(hi) => {
            let i = int(v).ok_or_else(mismatch)?;
            if i < 0 || i > i128::from(hi) {
                return Err(mismatch());
            }
            My::UInt(i as u64)
        }
        Kind::Decimal => match v {
            Value::Number(n) => My::Bytes(n.to_string().into_bytes()),
            Value::String(s) if is_decimal_text(s.trim()) => {
                My::Bytes(s.trim().as_bytes().to_vec())
            }
            _ => return Err(mismatch()),
        },
        Kind::Float => {
            let f = match v {
                Value::Number(n) => n.as_f64().ok_or_else(mismatch)?,
                Value::String(s) => s.trim().parse::<f64>().map_err(|_| mismatch())?,
                _ => return Err(mismatch()),
            };
            if !f.is_finite() {
                return Err(mismatch());
            }
            My::Double(f)
        }
        Kind::Bool => {
            let b = match v {
                Value::Bool(b) => *b,
                Value::Number(n) => match n.as_i64() {
                    Some(0) => false,
                    Some(1) => true,
                    _ => return Err(mismatch()),
                },
                Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "t" | "yes" | "y" | "on" | "1" => true,
                    "false" | "f" | "no" | "n" | "off" | "0" => false,
                    _ => return Err(mismatch()),
                },
                _ => return Err(mismatch()),
            };
            My::Int(i64::from(b))
        }
        Kind::DateTime => date_value(parse_datetime(v).ok_or_else(mismatch)?),
        Kind::Date => match v {
            Value::String(s) => {
                let d = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").map_err(|_| mismatch())?;
                My::Date(
                    u16::try_from(d.year()).map_err(|_| mismatch())?,
                    d.month() as u8,
                    d.day() as u8,
                    0,
                    0,
                    0,
                    0,
                )
            }
            _ => return Err(mismatch()),
        },
        Kind::Json => My::Bytes(v.to_string().into_bytes()),
        Kind::Other => match v {
            Value::String(s) => My::Bytes(s.as_bytes().to_vec()),
            Value::Bool(b) => My::Int(i64::from(*b)),
            _ => My::Bytes(v.to_string().into_bytes()),
        },
    })
}

/// A key value as text for folding a batch by key: the whole value as a SQL
/// literal (never `Debug`, which shows only the first 8 bytes of a string,
/// so `customer-1` and `customer-2` once folded into one row).
fn key_text(v: &My) -> String {
    v.as_sql(true)
}

impl Sink for MysqlSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(async move {
            let out: Vec<Result<(), SinkError>> = async {
                let keyed = KeyedRows::new(
                    batch,
                    |payload| self.row(payload),
                    |row| self.key.iter().map(|&p| key_text(&row[p])).collect(),
                );
                if keyed.rows.is_empty() {
                    return keyed.results(&[]);
                }
                // down at start: the table is checked before the first
                // write; a table that does not fit holds the rows (retried,
                // the breaker opens) rather than writing them wrongly
                if let Err(e) = self.ensure_checked().await {
                    let msg = if e.kind == weft_core::ErrorKind::Retryable {
                        e.message
                    } else {
                        format!("the table check failed: {}", e.message)
                    };
                    let failed: Vec<Result<(), SinkError>> = keyed
                        .rows
                        .iter()
                        .map(|_| Err(SinkError::retryable(msg.clone())))
                        .collect();
                    return keyed.results(&failed);
                }
                let refs: Vec<&Row> = keyed.rows.iter().collect();
                let written = self.write_rows(&refs).await;
                keyed.results(&written)
            }
            .await;
            crate::sink::nothing_learned(out)
        })
    }

    /// Rows of one key in a batch are folded (the last wins) or written
    /// in order in one transaction: one result for all.
    fn folds_keys(&self) -> bool {
        true
    }

    /// Nothing but the rows: the results are always empty.
    fn learns_nothing(&self) -> bool {
        true
    }
}

/// `weft check` for a MariaDB/MySQL sink: connect and check the table as
/// at start (its columns, a primary or unique key on exactly `key`, no
/// other unique index unless allowed). Privileges are not read here: the
/// server checks them on the first write.
pub async fn probe(cfg: &weft_core::config::raw::MysqlSinkConfig) -> crate::probe::Finding {
    match MysqlSink::connect(cfg).await {
        Ok(_) => crate::probe::Finding::ok(format!(
            "connected; table `{}` has the columns and a unique key on ({})",
            cfg.table,
            cfg.key.join(", ")
        )),
        Err(e) => crate::probe::Finding::fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(Kind::of("varchar(20)"), Kind::Text);
        assert_eq!(Kind::of("tinyint(1)"), Kind::Bool);
        assert_eq!(Kind::of("tinyint"), Kind::Int(-128, 127));
        assert_eq!(Kind::of("int unsigned"), Kind::UInt(u32::MAX.into()));
        assert_eq!(Kind::of("bigint unsigned"), Kind::UInt(u64::MAX));
        assert_eq!(Kind::of("decimal(12,2)"), Kind::Decimal);
        assert_eq!(Kind::of("DATETIME(6)"), Kind::DateTime);
        assert_eq!(Kind::of("geometry"), Kind::Other);
        assert!(is_decimal_text("-12.50") && is_decimal_text("1e5") && !is_decimal_text("12,5"));
    }

    #[test]
    fn key_text_keeps_the_whole_value() {
        let a = key_text(&My::Bytes(b"customer-1".to_vec()));
        let b = key_text(&My::Bytes(b"customer-2".to_vec()));
        assert_ne!(a, b);
        assert_ne!(key_text(&My::Int(1)), key_text(&My::Bytes(b"1".to_vec())));
        assert_ne!(
            key_text(&My::Bytes(b"a'b".to_vec())),
            key_text(&My::Bytes(b"a\\'b".to_vec()))
        );
    }
}
