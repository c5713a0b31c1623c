//! Reading rows from SQLite, opened read-only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde_json::{Map, Value};

use super::value;
use super::{Query, RawRow, Shape};

pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

pub struct LiteReader {
    conn: Arc<Mutex<Connection>>,
    first: String,
    after: String,
}

impl LiteReader {
    pub async fn open(path: &Path, shape: Shape) -> Result<LiteReader, String> {
        let path: PathBuf = path.to_owned();
        let (c, k) = (quote(&shape.cursor), quote(&shape.key));
        let first = shape.sql(&format!("({c} IS NOT NULL AND {k} IS NOT NULL)"));
        let after = shape.sql(&format!("({c} > ?1 OR ({c} = ?1 AND {k} > ?2))"));
        let (f, a) = (first.clone(), after.clone());
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, String> {
            let conn = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )
            .map_err(|e| format!("cannot open {} read-only: {e}", path.display()))?;
            conn.busy_timeout(Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            for sql in [&f, &a] {
                conn.prepare_cached(sql)
                    .map_err(|e| format!("cannot prepare the query: {e}"))?;
            }
            Ok(conn)
        })
        .await
        .map_err(|e| format!("sqlite task failed: {e}"))??;
        Ok(LiteReader {
            conn: Arc::new(Mutex::new(conn)),
            first,
            after,
        })
    }

    pub async fn fetch(&mut self, q: Query<'_>) -> Result<Vec<RawRow>, String> {
        let conn = self.conn.clone();
        let (sql, params) = match q {
            Query::First => (self.first.clone(), Vec::new()),
            Query::After(p) => (self.after.clone(), vec![param(&p.cursor), param(&p.key)]),
            // never asked for: SQLite cursors get no overlap window
            Query::WindowFrom { .. } | Query::WindowAfter { .. } => {
                return Err("sqlite: no overlap window".into());
            }
        };
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let mut stmt = conn
                .prepare_cached(&sql)
                .map_err(|e| format!("cannot prepare the query: {e}"))?;
            let cols: Vec<(String, String)> = stmt
                .columns()
                .map(|c| {
                    (
                        c.name().to_owned(),
                        c.decl_type().unwrap_or("").to_ascii_lowercase(),
                    )
                })
                .collect();
            let mut rows = stmt
                .query(rusqlite::params_from_iter(params.iter()))
                .map_err(|e| format!("query failed: {e}"))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(|e| format!("query failed: {e}"))? {
                let mut values = Map::new();
                let mut error = None;
                for (i, (name, decl)) in cols.iter().enumerate() {
                    let v = match row.get_ref(i) {
                        Ok(v) => decode(decl, v),
                        Err(e) => Err(e.to_string()),
                    };
                    match v {
                        Ok(v) => {
                            values.insert(name.clone(), v);
                        }
                        Err(e) => {
                            values.insert(name.clone(), Value::Null);
                            error.get_or_insert(format!("column `{name}`: {e}"));
                        }
                    }
                }
                out.push(RawRow { values, error });
            }
            Ok(out)
        })
        .await
        .map_err(|e| format!("sqlite task failed: {e}"))?
    }
}

fn param(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as S;
    match v {
        Value::Null => S::Null,
        Value::Bool(b) => S::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => S::Integer(i),
            None => S::Real(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => S::Text(s.clone()),
        other => S::Text(other.to_string()),
    }
}

/// A value by its storage class, with the declared type as a hint for
/// booleans and JSON.
fn decode(decl: &str, v: ValueRef<'_>) -> Result<Value, String> {
    Ok(match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) if decl.starts_with("bool") => Value::Bool(i != 0),
        ValueRef::Integer(i) => i.into(),
        ValueRef::Real(f) => value::float(f),
        ValueRef::Text(t) => {
            let s = std::str::from_utf8(t).map_err(|e| e.to_string())?;
            if decl.contains("json") {
                serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.to_owned()))
            } else {
                Value::String(s.to_owned())
            }
        }
        ValueRef::Blob(b) => value::bytes(b),
    })
}
