//! The PostgreSQL sink: upserts each delivery's payload (a JSON object)
//! into a table, one statement per batch.
//!
//! The batch goes as one array parameter per column:
//!
//! ```sql
//! INSERT INTO t (a, b, c) SELECT a::integer, b::text, c::numeric
//!   FROM UNNEST($1::bigint[], $2::text[], $3::text[]) AS u(a, b, c)
//!   ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b, c = EXCLUDED.c
//! ```
//!
//! Integers, floats, booleans and `timestamptz` travel in binary (checked
//! and parsed in Rust, so the database does not parse them again); every
//! other type travels as text and is cast by PostgreSQL (`numeric` thus
//! loses no digits).
//!
//! Every configured column is written: a field missing from the payload is
//! written as NULL (the row is replaced, not merged). Values are checked
//! against the column's type in Rust first, so a bad delivery fails alone
//! with a `Permanent` error naming the column. Deliveries with the same key
//! in one batch are reduced to the last one (PostgreSQL refuses to touch a
//! row twice in one statement); the earlier ones share its result. If the database still
//! rejects the batch, the rows are written one by one to find the bad ones.
//!
//! Connections are kept in a small pool that grows with concurrent writes.
//! A broken connection makes the batch `Retryable` and is dropped; the next
//! write connects again.

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Statement};

use crate::sink::{Delivery, KeyedRows, Sink, SinkError, WriteResult, describe, kind_of};
use crate::sqlite::is_ident;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a column's values are checked and normalised before the cast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Int(i64, i64),
    Numeric,
    Float,
    Bool,
    TimestampTz,
    Timestamp,
    Date,
    Json,
    Uuid,
    /// Any other type: sent as text, PostgreSQL casts it.
    Other,
}

impl Kind {
    fn of(ty: &str) -> Kind {
        let t = ty.trim().to_ascii_lowercase();
        if t.ends_with("[]") {
            return Kind::Other;
        }
        // drop modifiers: `varchar(20)`, `timestamp(3) with time zone`
        let mut bare = String::with_capacity(t.len());
        let mut depth = 0u32;
        for c in t.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ if depth == 0 => bare.push(c),
                _ => {}
            }
        }
        let base = bare.split_whitespace().collect::<Vec<_>>().join(" ");
        match base.as_str() {
            "text" | "varchar" | "character varying" | "char" | "character" | "citext" | "name" => {
                Kind::Text
            }
            "bigint" | "int8" | "bigserial" => Kind::Int(i64::MIN, i64::MAX),
            "integer" | "int" | "int4" | "serial" => Kind::Int(i32::MIN.into(), i32::MAX.into()),
            "smallint" | "int2" => Kind::Int(i16::MIN.into(), i16::MAX.into()),
            "numeric" | "decimal" => Kind::Numeric,
            "real" | "float4" | "double precision" | "float8" | "float" => Kind::Float,
            "boolean" | "bool" => Kind::Bool,
            "timestamptz" | "timestamp with time zone" => Kind::TimestampTz,
            "timestamp" | "timestamp without time zone" => Kind::Timestamp,
            "date" => Kind::Date,
            "jsonb" | "json" => Kind::Json,
            "uuid" => Kind::Uuid,
            _ => Kind::Other,
        }
    }
}

struct Column {
    name: String,
    ty: String,
    kind: Kind,
}

/// One checked value, in the form it travels in.
#[derive(Debug, Clone, PartialEq)]
enum Cell<'a> {
    Null,
    /// Sent as text, cast by PostgreSQL.
    Text(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Microseconds since 2000-01-01 UTC (PostgreSQL's own form).
    Ts(i64),
}

impl Cell<'_> {
    /// The value as text, to compare keys.
    fn key_text(&self) -> String {
        match self {
            Cell::Null => String::new(),
            Cell::Text(s) => s.to_string(),
            Cell::Int(i) | Cell::Ts(i) => i.to_string(),
            Cell::Float(f) => f.to_string(),
            Cell::Bool(b) => b.to_string(),
        }
    }
}

type Row<'a> = Vec<Cell<'a>>;

/// A `timestamptz` in PostgreSQL's binary form.
#[derive(Debug)]
struct PgTimestamp(i64);

impl ToSql for PgTimestamp {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        bytes::BufMut::put_i64(out, self.0);
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
    to_sql_checked!();
}

/// Seconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH: i64 = 946_684_800;

fn pg_micros(t: DateTime<Utc>) -> i64 {
    (t.timestamp() - PG_EPOCH) * 1_000_000
        + i64::from(t.timestamp_subsec_nanos().saturating_add(500) / 1000)
}

/// One column's values for the statement.
enum Array<'a> {
    Text(Vec<Option<&'a str>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Ts(Vec<Option<PgTimestamp>>),
}

impl Kind {
    /// The parameter's array type, and its SQL name.
    fn param(self) -> (Type, &'static str) {
        match self {
            Kind::Int(..) => (Type::INT8_ARRAY, "bigint[]"),
            Kind::Float => (Type::FLOAT8_ARRAY, "float8[]"),
            Kind::Bool => (Type::BOOL_ARRAY, "boolean[]"),
            Kind::TimestampTz => (Type::TIMESTAMPTZ_ARRAY, "timestamptz[]"),
            _ => (Type::TEXT_ARRAY, "text[]"),
        }
    }
}

/// One connection with the batch statement prepared on it.
struct Conn {
    client: Client,
    upsert: Statement,
}

pub struct PostgresSink {
    /// The URL as tokio-postgres reads it (see [`crate::pg_tls`]).
    url: String,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// `host:port` for connection errors (never the password).
    endpoint: String,
    table: String,
    columns: Vec<Column>,
    /// Positions in `columns` of the key columns.
    key: Vec<usize>,
    sql: String,
    idle: Mutex<Vec<Conn>>,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl PostgresSink {
    /// Connect once (to fail early on a bad URL, a missing table or a key
    /// without a unique constraint) and keep that connection.
    pub async fn connect(cfg: &weft_core::config::raw::PostgresSinkConfig) -> Result<Self, String> {
        match Self::connect_lazy(cfg).await? {
            (sink, None) => Ok(sink),
            (_, Some(down)) => Err(down),
        }
    }

    /// Like [`PostgresSink::connect`], but a database that cannot be
    /// reached is not an error: the sink comes back with the reason, and
    /// every connection it opens later checks the table again (the upsert
    /// is prepared on it). A table that does not fit is an error either way.
    pub async fn connect_lazy(
        cfg: &weft_core::config::raw::PostgresSinkConfig,
    ) -> Result<(Self, Option<String>), String> {
        for part in cfg.table.split('.') {
            if !is_ident(part) {
                return Err(format!(
                    "table `{}` is not a plain SQL identifier",
                    cfg.table
                ));
            }
        }
        if cfg.columns.is_empty() {
            return Err("at least one column is required".into());
        }
        let mut columns = Vec::with_capacity(cfg.columns.len());
        for (name, ty) in &cfg.columns {
            if !is_ident(name) {
                return Err(format!("column `{name}` is not a plain SQL identifier"));
            }
            if ty.trim().is_empty()
                || !ty
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || " _()[],".contains(c))
            {
                return Err(format!(
                    "column `{name}`: `{ty}` is not a PostgreSQL type name"
                ));
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
        let table = cfg
            .table
            .split('.')
            .map(quote)
            .collect::<Vec<_>>()
            .join(".");
        let sql = upsert_sql(&table, &columns, &key, cfg.version_column.as_deref());
        let tls = crate::pg_tls::connector(cfg.url.expose())?;
        let url = tls.url.as_str();
        let parsed: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("bad PostgreSQL URL: {e}"))?;
        let sink = PostgresSink {
            endpoint: endpoint(&parsed),
            url: url.to_owned(),
            tls: tls.connector.clone(),
            table: cfg.table.clone(),
            columns,
            key,
            sql,
            idle: Mutex::new(Vec::new()),
        };
        match sink.open().await {
            Ok(conn) => {
                sink.put_back(conn);
                Ok((sink, None))
            }
            Err(e) if e.kind == weft_core::ErrorKind::Retryable => Ok((sink, Some(e.message))),
            Err(e) => Err(e.message),
        }
    }

    async fn open(&self) -> Result<Conn, SinkError> {
        let connecting = tokio_postgres::connect(&self.url, self.tls.clone());
        let (client, connection) = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(SinkError::retryable(format!(
                    "cannot connect to PostgreSQL at {}: {}",
                    self.endpoint,
                    pg_message(&e)
                ))
                .with_source(e));
            }
            Err(_) => {
                return Err(SinkError::retryable(format!(
                    "cannot connect to PostgreSQL at {}: timed out after {}s",
                    self.endpoint,
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "postgres sink: connection closed");
            }
        });
        let types: Vec<Type> = self.columns.iter().map(|c| c.kind.param().0).collect();
        let upsert = client.prepare_typed(&self.sql, &types).await.map_err(|e| {
            classify(
                &format!("cannot prepare the upsert into `{}`", self.table),
                e,
            )
        })?;
        self.check_unique_key(&client).await?;
        Ok(Conn { client, upsert })
    }

    /// `ON CONFLICT (key)` needs a unique index on exactly the key columns
    /// (not partial, not deferrable). PostgreSQL looks for it only when the
    /// statement is planned, at the first write, so preparing the upsert
    /// does not tell: ask the catalog.
    async fn check_unique_key(&self, client: &Client) -> Result<(), SinkError> {
        let quoted = self
            .table
            .split('.')
            .map(quote)
            .collect::<Vec<_>>()
            .join(".");
        let mut key: Vec<String> = self
            .key
            .iter()
            .map(|&k| self.columns[k].name.clone())
            .collect();
        key.sort();
        let found = client
            .query_one(
                "SELECT EXISTS (
                   SELECT 1 FROM pg_index i
                   WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indimmediate
                     AND i.indpred IS NULL AND i.indexprs IS NULL
                     AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text)
                          FROM unnest(i.indkey::int2[]) k
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k) = $2::text[])",
                &[&quoted, &key],
            )
            .await
            .map_err(|e| classify(&format!("cannot read the indexes of `{}`", self.table), e))?;
        if found.get::<_, bool>(0) {
            Ok(())
        } else {
            Err(SinkError::permanent(format!(
                "table `{}` has no primary key or unique index on exactly ({}) (one that is not partial or deferrable); the upsert needs one",
                self.table,
                key.join(", ")
            )))
        }
    }

    async fn take(&self) -> Result<Conn, SinkError> {
        loop {
            let c = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match c {
                Some(c) if c.client.is_closed() => continue,
                Some(c) => return Ok(c),
                None => return self.open().await,
            }
        }
    }

    fn put_back(&self, c: Conn) {
        if !c.client.is_closed() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
    }

    /// Check one payload: its values, one per column.
    fn row<'a>(&self, payload: &'a Value) -> Result<Row<'a>, SinkError> {
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
            if cell == Cell::Null && self.key.contains(&i) {
                return Err(SinkError::permanent(format!(
                    "key column `{}` is missing or null",
                    col.name
                )));
            }
            row.push(cell);
        }
        Ok(row)
    }

    /// Run the statement for these rows on one connection.
    async fn execute(&self, conn: &Conn, rows: &[&Row<'_>]) -> Result<u64, tokio_postgres::Error> {
        let n = rows.len();
        let mut arrays: Vec<Array> = self
            .columns
            .iter()
            .map(|c| match c.kind {
                Kind::Int(..) => Array::Int(Vec::with_capacity(n)),
                Kind::Float => Array::Float(Vec::with_capacity(n)),
                Kind::Bool => Array::Bool(Vec::with_capacity(n)),
                Kind::TimestampTz => Array::Ts(Vec::with_capacity(n)),
                _ => Array::Text(Vec::with_capacity(n)),
            })
            .collect();
        for row in rows {
            for (a, cell) in arrays.iter_mut().zip(row.iter()) {
                match (a, cell) {
                    (Array::Text(v), Cell::Text(s)) => v.push(Some(s.as_ref())),
                    (Array::Int(v), Cell::Int(i)) => v.push(Some(*i)),
                    (Array::Float(v), Cell::Float(f)) => v.push(Some(*f)),
                    (Array::Bool(v), Cell::Bool(b)) => v.push(Some(*b)),
                    (Array::Ts(v), Cell::Ts(t)) => v.push(Some(PgTimestamp(*t))),
                    (Array::Text(v), _) => v.push(None),
                    (Array::Int(v), _) => v.push(None),
                    (Array::Float(v), _) => v.push(None),
                    (Array::Bool(v), _) => v.push(None),
                    (Array::Ts(v), _) => v.push(None),
                }
            }
        }
        let params: Vec<&(dyn ToSql + Sync)> = arrays
            .iter()
            .map(|a| match a {
                Array::Text(v) => v as &(dyn ToSql + Sync),
                Array::Int(v) => v as &(dyn ToSql + Sync),
                Array::Float(v) => v as &(dyn ToSql + Sync),
                Array::Bool(v) => v as &(dyn ToSql + Sync),
                Array::Ts(v) => v as &(dyn ToSql + Sync),
            })
            .collect();
        conn.client.execute(&conn.upsert, &params).await
    }

    async fn write_rows(&self, rows: &[&Row<'_>]) -> Vec<Result<(), SinkError>> {
        let conn = match self.take().await {
            Ok(c) => c,
            Err(e) => {
                let (kind, msg) = (e.kind, e.message);
                return rows
                    .iter()
                    .map(|_| Err(SinkError::like(kind, &msg)))
                    .collect();
            }
        };
        let res = self.execute(&conn, rows).await;
        // after a retryable error (a broken connection, a server going
        // down) the connection is not reused: the next write connects anew
        let mut keep = true;
        let out: Vec<Result<(), SinkError>> = match res {
            Ok(_) => rows.iter().map(|_| Ok(())).collect(),
            Err(e) => {
                let err = classify("upsert failed", e);
                if err.kind == weft_core::ErrorKind::Permanent && rows.len() > 1 {
                    // find the rows the database refuses: one statement each
                    let mut out = Vec::with_capacity(rows.len());
                    for row in rows {
                        match self.execute(&conn, &[*row]).await {
                            Ok(_) => out.push(Ok(())),
                            Err(e) => {
                                let err = classify("upsert failed", e);
                                keep &= err.kind == weft_core::ErrorKind::Permanent;
                                out.push(Err(err));
                            }
                        }
                    }
                    out
                } else {
                    keep &= err.kind == weft_core::ErrorKind::Permanent;
                    let (kind, msg) = (err.kind, err.message);
                    rows.iter()
                        .map(|_| Err(SinkError::like(kind, &msg)))
                        .collect()
                }
            }
        };
        if keep {
            self.put_back(conn);
        }
        out
    }
}

/// `version`: update an existing row only when the incoming version is
/// newer (a stale write leaves the row as it is and still counts as done).
fn upsert_sql(table: &str, columns: &[Column], key: &[usize], version: Option<&str>) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
    let casts: Vec<String> = columns
        .iter()
        .map(|c| format!("{}::{}", quote(&c.name), c.ty))
        .collect();
    let params: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}", i + 1, c.kind.param().1))
        .collect();
    let keys: Vec<String> = key.iter().map(|&k| names[k].clone()).collect();
    let updates: Vec<String> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| !key.contains(i))
        .map(|(_, n)| format!("{n} = EXCLUDED.{n}"))
        .collect();
    let action = match (updates.is_empty(), version) {
        (true, _) => "NOTHING".to_owned(),
        (false, None) => format!("UPDATE SET {}", updates.join(", ")),
        (false, Some(v)) => {
            let v = quote(v);
            format!(
                "UPDATE SET {} WHERE {table}.{v} IS NULL OR {table}.{v} < EXCLUDED.{v}",
                updates.join(", ")
            )
        }
    };
    format!(
        "INSERT INTO {table} ({cols}) SELECT {casts} FROM UNNEST({params}) AS u({cols}) ON CONFLICT ({keys}) DO {action}",
        cols = names.join(", "),
        casts = casts.join(", "),
        params = params.join(", "),
        keys = keys.join(", "),
    )
}

/// `host:port` (or the socket directory) of a parsed URL, for messages.
pub(crate) fn endpoint(cfg: &tokio_postgres::Config) -> String {
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => format!("{h}:{port}"),
        Some(tokio_postgres::config::Host::Unix(p)) => format!("{}:{port}", p.display()),
        None => format!("localhost:{port}"),
    }
}

fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            // with its causes: "error performing TLS handshake: invalid
            // peer certificate: UnknownIssuer"
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(e);
            while let Some(c) = cur {
                let m = c.to_string();
                if !s.contains(&m) {
                    s.push_str(": ");
                    s.push_str(&m);
                }
                cur = c.source();
            }
            s
        }
    }
}

/// Connection trouble, contention and resource limits are worth a retry;
/// what the database refuses about the data or the schema is not.
fn classify(context: &str, e: tokio_postgres::Error) -> SinkError {
    let msg = format!("{context}: {}", pg_message(&e));
    let retry = match e.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57")
                || code.starts_with("58")
                || code == "40001"
                || code == "40P01"
                || code == "55P03"
        }
    };
    if retry || e.is_closed() {
        SinkError::retryable(msg).with_source(e)
    } else {
        SinkError::permanent(msg).with_source(e)
    }
}

fn is_numeric_text(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    if s.eq_ignore_ascii_case("nan")
        || s.eq_ignore_ascii_case("infinity")
        || s.eq_ignore_ascii_case("inf")
    {
        return true;
    }
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(p) => (&s[..p], Some(&s[p + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((a, b)) => (a, b),
        None => (mantissa, ""),
    };
    let digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = (!int.is_empty() || !frac.is_empty()) && digits(int) && digits(frac);
    let exp_ok = match exp {
        None => true,
        Some(e) => {
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && digits(e)
        }
    };
    mantissa_ok && exp_ok
}

fn parse_timestamptz(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Some(t.with_timezone(&Utc));
        }
    }
    None
}

fn parse_timestamp(s: &str) -> bool {
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .any(|f| NaiveDateTime::parse_from_str(s, f).is_ok())
}

/// A payload value as the text PostgreSQL casts to the column's type.
fn convert<'a>(col: &Column, v: &'a Value) -> Result<Cell<'a>, SinkError> {
    let mismatch = || {
        SinkError::permanent(format!(
            "column `{}`: expected {}, got {}",
            col.name,
            col.ty,
            describe(v)
        ))
    };
    if v.is_null() {
        return Ok(Cell::Null);
    }
    let text = match col.kind {
        Kind::Text => match v {
            Value::String(s) => Cow::Borrowed(s.as_str()),
            Value::Number(n) => Cow::Owned(n.to_string()),
            Value::Bool(b) => Cow::Owned(b.to_string()),
            _ => return Err(mismatch()),
        },
        Kind::Int(lo, hi) => {
            let i = match v {
                Value::Number(n) => match n.as_i64() {
                    Some(i) => i,
                    None => match n.as_f64() {
                        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
                        _ => return Err(mismatch()),
                    },
                },
                Value::String(s) => s.trim().parse::<i64>().map_err(|_| mismatch())?,
                _ => return Err(mismatch()),
            };
            if i < lo || i > hi {
                return Err(mismatch());
            }
            return Ok(Cell::Int(i));
        }
        Kind::Numeric => match v {
            Value::Number(n) => Cow::Owned(n.to_string()),
            Value::String(s) if is_numeric_text(s.trim()) => Cow::Borrowed(s.trim()),
            _ => return Err(mismatch()),
        },
        Kind::Float => {
            let f = match v {
                Value::Number(n) => n.as_f64().ok_or_else(mismatch)?,
                Value::String(s) => s.trim().parse::<f64>().map_err(|_| mismatch())?,
                _ => return Err(mismatch()),
            };
            return Ok(Cell::Float(f));
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
            return Ok(Cell::Bool(b));
        }
        Kind::TimestampTz => {
            let t = match v {
                Value::String(s) => parse_timestamptz(s.trim()).ok_or_else(mismatch)?,
                Value::Number(n) => n
                    .as_i64()
                    .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
                    .ok_or_else(mismatch)?,
                _ => return Err(mismatch()),
            };
            return Ok(Cell::Ts(pg_micros(t)));
        }
        Kind::Timestamp => match v {
            Value::String(s)
                if parse_timestamp(s.trim()) || parse_timestamptz(s.trim()).is_some() =>
            {
                Cow::Borrowed(s.trim())
            }
            _ => return Err(mismatch()),
        },
        Kind::Date => match v {
            Value::String(s) if NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").is_ok() => {
                Cow::Borrowed(s.trim())
            }
            _ => return Err(mismatch()),
        },
        Kind::Json => Cow::Owned(v.to_string()),
        Kind::Uuid => match v {
            Value::String(s) if uuid::Uuid::parse_str(s.trim()).is_ok() => Cow::Borrowed(s.trim()),
            _ => return Err(mismatch()),
        },
        Kind::Other => match v {
            Value::String(s) => Cow::Borrowed(s.as_str()),
            _ => Cow::Owned(v.to_string()),
        },
    };
    Ok(Cell::Text(text))
}

impl Sink for PostgresSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(async move {
            let out: Vec<Result<(), SinkError>> = async {
                let keyed = KeyedRows::new(
                    batch,
                    |payload| self.row(payload),
                    |row| self.key.iter().map(|&p| row[p].key_text()).collect(),
                );
                if keyed.rows.is_empty() {
                    return keyed.results(&[]);
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

/// `weft check` for a PostgreSQL sink: connect, prepare the upsert (the
/// table, its columns and a unique key on exactly `key`, as at start), and
/// ask whether the user may insert and update the table.
pub async fn probe(cfg: &weft_core::config::raw::PostgresSinkConfig) -> crate::probe::Finding {
    use crate::probe::Finding;
    let sink = match PostgresSink::connect(cfg).await {
        Ok(s) => s,
        Err(e) => return Finding::fail(e),
    };
    let conn = match sink.take().await {
        Ok(c) => c,
        Err(e) => return Finding::fail(e.message),
    };
    let row = conn
        .client
        .query_one(
            "SELECT has_table_privilege($1, 'INSERT'), has_table_privilege($1, 'UPDATE'), current_user::text",
            &[&cfg.table],
        )
        .await;
    match row {
        Ok(r) => {
            let (insert, update, user): (bool, bool, String) = (r.get(0), r.get(1), r.get(2));
            let missing: Vec<&str> = [(insert, "INSERT"), (update, "UPDATE")]
                .into_iter()
                .filter(|(has, _)| !has)
                .map(|(_, p)| p)
                .collect();
            if missing.is_empty() {
                Finding::ok(format!(
                    "connected to {} as `{user}`; table `{}` has a unique key on ({}); INSERT and UPDATE granted",
                    sink.endpoint,
                    cfg.table,
                    cfg.key.join(", ")
                ))
            } else {
                Finding::fail(format!(
                    "user `{user}` lacks {} on table `{}` (GRANT {} ON {} TO {user})",
                    missing.join(" and "),
                    cfg.table,
                    missing.join(", "),
                    cfg.table
                ))
            }
        }
        Err(e) => Finding::fail(format!(
            "cannot read the privileges on `{}`: {}",
            cfg.table,
            pg_message(&e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{Kind, is_numeric_text, pg_micros};

    #[test]
    fn kinds_ignore_modifiers() {
        assert_eq!(Kind::of("timestamp(3) with time zone"), Kind::TimestampTz);
        assert_eq!(Kind::of("TIMESTAMPTZ"), Kind::TimestampTz);
        assert_eq!(Kind::of("varchar(20)"), Kind::Text);
        assert_eq!(Kind::of("numeric(12, 2)"), Kind::Numeric);
        assert_eq!(Kind::of("double  precision"), Kind::Float);
        assert_eq!(
            Kind::of("int4"),
            Kind::Int(i32::MIN.into(), i32::MAX.into())
        );
        assert_eq!(Kind::of("text[]"), Kind::Other);
        assert_eq!(Kind::of("inet"), Kind::Other);
    }

    #[test]
    fn numeric_text() {
        for ok in [
            "1",
            "-1.5",
            "+.5",
            "1e10",
            "1.2E-3",
            "NaN",
            "12345678901234567890.123",
        ] {
            assert!(is_numeric_text(ok), "{ok}");
        }
        for bad in ["", "1,5", "1.2.3", "e5", "1e", "abc", "--1"] {
            assert!(!is_numeric_text(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps_in_postgres_form() {
        let t = chrono::DateTime::parse_from_rfc3339("2000-01-01T00:00:01.5Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(pg_micros(t), 1_500_000);
        let t = chrono::DateTime::parse_from_rfc3339("1999-12-31T23:59:59Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(pg_micros(t), -1_000_000);
    }
}
