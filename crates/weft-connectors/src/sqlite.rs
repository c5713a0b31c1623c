//! The SQLite sink: upserts each delivery's payload (a JSON object) into a
//! table, one transaction per batch.
//!
//! With `columns`, the table is created if missing (the key columns form
//! its primary key) and each payload field is checked against its declared
//! type; fields not among `columns` are ignored. Without `columns`, the
//! table must exist and the payload's top-level fields are written as they
//! are into the columns of the same name.
//!
//! Only the fields present in a payload are written: on conflict those
//! columns are updated and the others keep their values.
//!
//! Every delivery is checked before the transaction, so a bad one fails
//! alone (`Permanent`, naming the column); a statement the database refuses
//! fails only its own delivery too. A busy or locked database fails the
//! whole batch as `Retryable`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, ErrorCode};
use serde_json::Value;

use crate::sink::{Delivery, Sink, SinkError, WriteResult, describe, kind_of};

/// A declared column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColType {
    Text,
    Integer,
    Real,
    Boolean,
    Json,
}

impl ColType {
    fn parse(s: &str) -> Option<ColType> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "text" => ColType::Text,
            "integer" => ColType::Integer,
            "real" => ColType::Real,
            "boolean" => ColType::Boolean,
            "json" => ColType::Json,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            ColType::Text => "text",
            ColType::Integer => "integer",
            ColType::Real => "real",
            ColType::Boolean => "boolean",
            ColType::Json => "json",
        }
    }
    /// The SQLite column type (affinity) used in `CREATE TABLE`.
    fn affinity(self) -> &'static str {
        match self {
            ColType::Text | ColType::Json => "TEXT",
            ColType::Integer | ColType::Boolean => "INTEGER",
            ColType::Real => "REAL",
        }
    }
}

/// What the sink knows of the table's columns.
enum Schema {
    /// From the config: name -> type.
    Declared(BTreeMap<String, ColType>),
    /// From the existing table: names only, values written as they come.
    Existing(BTreeSet<String>),
}

pub struct SqliteSink {
    conn: Arc<Mutex<Connection>>,
    table: String,
    key: Vec<String>,
    schema: Schema,
    /// Update an existing row only when this column's incoming value is newer.
    version: Option<String>,
}

/// One checked row: column names (sorted, as in the payload's map) and values.
struct Row {
    columns: Vec<String>,
    values: Vec<SqlValue>,
}

pub(crate) fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl SqliteSink {
    /// Open (or create) the database at `path`, creating its folder, and
    /// prepare the table.
    pub fn open(
        cfg: &weft_core::config::raw::SqliteSinkConfig,
        path: &Path,
    ) -> Result<Self, String> {
        if !is_ident(&cfg.table) {
            return Err(format!(
                "table `{}` is not a plain SQL identifier",
                cfg.table
            ));
        }
        if cfg.key.is_empty() {
            return Err("at least one key column is required".into());
        }
        for k in &cfg.key {
            if !is_ident(k) {
                return Err(format!("key column `{k}` is not a plain SQL identifier"));
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create folder {}: {e}", dir.display()))?;
        }
        let conn =
            Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| format!("cannot enable WAL on {}: {e}", path.display()))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| e.to_string())?;
        conn.set_prepared_statement_cache_capacity(64);

        let schema = match &cfg.columns {
            Some(cols) => {
                let mut declared = BTreeMap::new();
                for (name, ty) in cols {
                    if !is_ident(name) {
                        return Err(format!("column `{name}` is not a plain SQL identifier"));
                    }
                    let t = ColType::parse(ty).ok_or_else(|| {
                        format!("column `{name}`: type `{ty}`: expected text, integer, real, boolean or json")
                    })?;
                    declared.insert(name.clone(), t);
                }
                for k in &cfg.key {
                    if !declared.contains_key(k) {
                        return Err(format!("key column `{k}` is not among `columns`"));
                    }
                }
                let defs: Vec<String> = declared
                    .iter()
                    .map(|(n, t)| format!("{} {}", quote(n), t.affinity()))
                    .collect();
                let pk: Vec<String> = cfg.key.iter().map(|k| quote(k)).collect();
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))",
                    quote(&cfg.table),
                    defs.join(", "),
                    pk.join(", ")
                );
                conn.execute_batch(&sql)
                    .map_err(|e| format!("cannot create table `{}`: {e}", cfg.table))?;
                Schema::Declared(declared)
            }
            None => {
                let existing = table_columns(&conn, &cfg.table)?;
                if existing.is_empty() {
                    return Err(format!(
                        "table `{}` does not exist in {} and no `columns` are given to create it",
                        cfg.table,
                        path.display()
                    ));
                }
                for k in &cfg.key {
                    if !existing.contains(k) {
                        return Err(format!(
                            "key column `{k}` is not a column of table `{}`",
                            cfg.table
                        ));
                    }
                }
                Schema::Existing(existing)
            }
        };
        Ok(SqliteSink {
            conn: Arc::new(Mutex::new(conn)),
            table: cfg.table.clone(),
            key: cfg.key.clone(),
            version: cfg.version_column.clone(),
            schema,
        })
    }

    /// Check one payload and turn it into a row, or say why it cannot be written.
    fn row(&self, payload: &Value) -> Result<Row, SinkError> {
        let Value::Object(map) = payload else {
            return Err(SinkError::permanent(format!(
                "payload for table `{}` must be a JSON object, got {}",
                self.table,
                kind_of(payload)
            )));
        };
        for k in &self.key {
            match map.get(k) {
                None => {
                    return Err(SinkError::permanent(format!(
                        "key column `{k}` is missing from the payload"
                    )));
                }
                Some(Value::Null) => {
                    return Err(SinkError::permanent(format!("key column `{k}` is null")));
                }
                Some(_) => {}
            }
        }
        let mut columns = Vec::with_capacity(map.len());
        let mut values = Vec::with_capacity(map.len());
        for (name, v) in map {
            let value = match &self.schema {
                Schema::Declared(decl) => {
                    let Some(ty) = decl.get(name) else { continue };
                    convert(name, *ty, v)?
                }
                Schema::Existing(cols) => {
                    if !is_ident(name) {
                        return Err(SinkError::permanent(format!(
                            "field `{name}` is not a plain SQL identifier (letters, digits, `_`)"
                        )));
                    }
                    if !cols.contains(name) {
                        return Err(SinkError::permanent(format!(
                            "field `{name}` is not a column of table `{}`",
                            self.table
                        )));
                    }
                    natural(v)
                }
            };
            columns.push(name.clone());
            values.push(value);
        }
        Ok(Row { columns, values })
    }

    fn upsert_sql(&self, columns: &[String]) -> String {
        let cols: Vec<String> = columns.iter().map(|c| quote(c)).collect();
        let params: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
        let keys: Vec<String> = self.key.iter().map(|k| quote(k)).collect();
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !self.key.contains(c))
            .map(|c| format!("{0} = excluded.{0}", quote(c)))
            .collect();
        let action = match (updates.is_empty(), &self.version) {
            (true, _) => "NOTHING".to_owned(),
            (false, None) => format!("UPDATE SET {}", updates.join(", ")),
            (false, Some(v)) => {
                let (t, v) = (quote(&self.table), quote(v));
                format!(
                    "UPDATE SET {} WHERE {t}.{v} IS NULL OR {t}.{v} < excluded.{v}",
                    updates.join(", ")
                )
            }
        };
        format!(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO {}",
            quote(&self.table),
            cols.join(", "),
            params.join(", "),
            keys.join(", "),
            action
        )
    }
}

fn table_columns(conn: &Connection, table: &str) -> Result<BTreeSet<String>, String> {
    let sql = format!("PRAGMA table_info({})", quote(table));
    let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(1))
        .map_err(|e| e.to_string())?
        .collect::<Result<BTreeSet<String>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(names)
}

/// A value written into an existing table without a declared type.
fn natural(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => match n.as_f64() {
                Some(f) if n.is_f64() => SqlValue::Real(f),
                // a u64 above i64::MAX: keep every digit
                _ => SqlValue::Text(n.to_string()),
            },
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Array(_) | Value::Object(_) => SqlValue::Text(v.to_string()),
    }
}

/// A value checked against its declared type.
fn convert(col: &str, ty: ColType, v: &Value) -> Result<SqlValue, SinkError> {
    let mismatch = || {
        SinkError::permanent(format!(
            "column `{col}`: expected {}, got {}",
            ty.name(),
            describe(v)
        ))
    };
    if v.is_null() {
        return Ok(SqlValue::Null);
    }
    Ok(match ty {
        ColType::Text => match v {
            Value::String(s) => SqlValue::Text(s.clone()),
            Value::Number(n) => SqlValue::Text(n.to_string()),
            Value::Bool(b) => SqlValue::Text(b.to_string()),
            _ => return Err(mismatch()),
        },
        ColType::Integer => match v {
            Value::Number(n) => match n.as_i64() {
                Some(i) => SqlValue::Integer(i),
                None => match n.as_f64() {
                    Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
                        SqlValue::Integer(f as i64)
                    }
                    _ => return Err(mismatch()),
                },
            },
            Value::String(s) => SqlValue::Integer(s.trim().parse::<i64>().map_err(|_| mismatch())?),
            _ => return Err(mismatch()),
        },
        ColType::Real => match v {
            Value::Number(n) => SqlValue::Real(n.as_f64().ok_or_else(mismatch)?),
            Value::String(s) => match s.trim().parse::<f64>() {
                Ok(f) if f.is_finite() => SqlValue::Real(f),
                _ => return Err(mismatch()),
            },
            _ => return Err(mismatch()),
        },
        ColType::Boolean => match v {
            Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
            Value::Number(n) => match n.as_i64() {
                Some(0) => SqlValue::Integer(0),
                Some(1) => SqlValue::Integer(1),
                _ => return Err(mismatch()),
            },
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => SqlValue::Integer(1),
                "false" | "0" => SqlValue::Integer(0),
                _ => return Err(mismatch()),
            },
            _ => return Err(mismatch()),
        },
        ColType::Json => SqlValue::Text(v.to_string()),
    })
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked)
    )
}

fn sql_error(context: &str, e: rusqlite::Error) -> SinkError {
    let msg = format!("{context}: {e}");
    if is_busy(&e) {
        SinkError::retryable(msg).with_source(e)
    } else {
        SinkError::permanent(msg).with_source(e)
    }
}

/// Run the checked rows in one transaction. Returns one result per row
/// (`None` rows were already failed by the caller), or an error for the
/// whole batch (busy, commit failure).
fn write_rows(
    conn: &mut Connection,
    work: &[(String, Row)],
) -> Result<Vec<Result<(), SinkError>>, SinkError> {
    let tx = conn
        .transaction()
        .map_err(|e| sql_error("cannot begin transaction", e))?;
    let mut results = Vec::with_capacity(work.len());
    for (sql, row) in work {
        let res = match tx.prepare_cached(sql) {
            Ok(mut stmt) => stmt.execute(rusqlite::params_from_iter(row.values.iter())),
            Err(e) => Err(e),
        };
        match res {
            Ok(_) => results.push(Ok(())),
            // a busy database fails the whole batch: roll back (by drop) and retry later
            Err(e) if is_busy(&e) => return Err(sql_error("database is busy", e)),
            // the failed statement was undone by SQLite; the transaction goes on
            Err(e) => results.push(Err(sql_error("upsert refused", e))),
        }
    }
    tx.commit().map_err(|e| sql_error("commit failed", e))?;
    Ok(results)
}

impl Sink for SqliteSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(async move {
            let out: Vec<Result<(), SinkError>> = async {
                let mut results: Vec<Option<Result<(), SinkError>>> =
                    Vec::with_capacity(batch.len());
                let mut work = Vec::new();
                let mut positions = Vec::new();
                for (i, d) in batch.iter().enumerate() {
                    match self.row(&d.payload) {
                        Ok(row) => {
                            let sql = self.upsert_sql(&row.columns);
                            work.push((sql, row));
                            positions.push(i);
                            results.push(None);
                        }
                        Err(e) => results.push(Some(Err(e))),
                    }
                }
                if !work.is_empty() {
                    let conn = self.conn.clone();
                    let n = work.len();
                    let outcome = tokio::task::spawn_blocking(move || {
                        let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
                        write_rows(&mut guard, &work)
                    })
                    .await;
                    let written: Vec<Result<(), SinkError>> = match outcome {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            let kind = e.kind;
                            let msg = e.message;
                            (0..n)
                                .map(|_| {
                                    Err(SinkError {
                                        kind,
                                        message: msg.clone(),
                                        retry_after: None,
                                        status: None,
                                        source: None,
                                    })
                                })
                                .collect()
                        }
                        Err(e) => crate::sink::all_failed(n, || {
                            SinkError::retryable(format!("sqlite writer task failed: {e}"))
                        }),
                    };
                    for (pos, r) in positions.into_iter().zip(written) {
                        results[pos] = Some(r);
                    }
                }
                results
                    .into_iter()
                    .map(|r| {
                        r.unwrap_or_else(|| Err(SinkError::retryable("delivery was not written")))
                    })
                    .collect()
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

/// `weft check` for a SQLite sink: read-only. The file and table may not
/// exist yet when `columns` are given (weft creates them); an existing
/// table needs the key columns and a primary key or unique index on exactly
/// them (the upsert's `ON CONFLICT`).
pub fn probe(cfg: &weft_core::config::raw::SqliteSinkConfig, path: &Path) -> crate::probe::Finding {
    use crate::probe::Finding;
    use rusqlite::OpenFlags;
    if !path.exists() {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if cfg.columns.is_none() {
            return Finding::fail(format!(
                "{} does not exist and no `columns` are given to create table `{}`",
                path.display(),
                cfg.table
            ));
        }
        return match crate::probe::writable(dir) {
            Ok(()) => Finding::ok(format!(
                "{} will be created with table `{}`",
                path.display(),
                cfg.table
            )),
            Err(e) => Finding::fail(format!(
                "{} does not exist and {} is not writable: {e}",
                path.display(),
                dir.display()
            )),
        };
    }
    let conn = match Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) {
        Ok(c) => c,
        Err(e) => return Finding::fail(format!("cannot open {}: {e}", path.display())),
    };
    let existing = match table_columns(&conn, &cfg.table) {
        Ok(c) => c,
        Err(e) => return Finding::fail(e),
    };
    if existing.is_empty() {
        return if cfg.columns.is_some() {
            Finding::ok(format!(
                "table `{}` will be created in {}",
                cfg.table,
                path.display()
            ))
        } else {
            Finding::fail(format!(
                "table `{}` does not exist in {} and no `columns` are given to create it",
                cfg.table,
                path.display()
            ))
        };
    }
    if let Some(k) = cfg.key.iter().find(|k| !existing.contains(*k)) {
        return Finding::fail(format!(
            "key column `{k}` is not a column of table `{}`",
            cfg.table
        ));
    }
    match unique_over(&conn, &cfg.table, &cfg.key) {
        Ok(true) => Finding::ok(format!(
            "table `{}` has {} columns and a unique key on ({})",
            cfg.table,
            existing.len(),
            cfg.key.join(", ")
        )),
        Ok(false) => Finding::fail(format!(
            "table `{}` has no primary key or unique index on exactly ({}); the upsert needs one",
            cfg.table,
            cfg.key.join(", ")
        )),
        Err(e) => Finding::fail(format!("cannot read the indexes of `{}`: {e}", cfg.table)),
    }
}

/// Whether `table` has a primary key or unique index whose columns are
/// exactly `key` (in any order).
fn unique_over(conn: &Connection, table: &str, key: &[String]) -> rusqlite::Result<bool> {
    let want: std::collections::BTreeSet<&str> = key.iter().map(String::as_str).collect();
    let mut list = conn.prepare("SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1")?;
    let names: Vec<String> = list
        .query_map([table], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for name in names {
        let mut info = conn.prepare("SELECT name FROM pragma_index_info(?1)")?;
        let cols: Vec<Option<String>> = info
            .query_map([&name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let cols: std::collections::BTreeSet<&str> =
            cols.iter().flatten().map(String::as_str).collect();
        if cols == want {
            return Ok(true);
        }
    }
    // a rowid table's `INTEGER PRIMARY KEY` has no index of its own
    let mut pk = conn.prepare("SELECT name FROM pragma_table_info(?1) WHERE pk > 0")?;
    let cols: Vec<String> = pk
        .query_map([table], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let cols: std::collections::BTreeSet<&str> = cols.iter().map(String::as_str).collect();
    Ok(cols == want)
}
