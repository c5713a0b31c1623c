//! Reading rows from MariaDB/MySQL.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::prelude::Queryable;
use mysql_async::{Column, Conn, Params, Statement, TxOpts, Value as My};
use serde_json::{Map, Value};

use super::value;
use super::{Query, RawRow, Shape};
use crate::mysql::my_message;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The character set number of binary strings.
const BINARY: u16 = 63;

pub fn quote(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

pub struct MyReader {
    conn: Conn,
    first: Statement,
    after: Statement,
    window_from: Statement,
    window_after: Statement,
    cursor_col: Option<Column>,
    key_col: Option<Column>,
}

impl MyReader {
    pub async fn connect(url: &str, shape: Shape) -> Result<MyReader, String> {
        let opts = crate::mysql::opts(
            url,
            vec![
                "SET time_zone = '+00:00'".into(),
                "SET SESSION TRANSACTION READ ONLY".into(),
            ],
        )?;
        let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(opts)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("cannot connect to MySQL: {}", my_message(&e))),
            Err(_) => return Err("cannot connect to MySQL: timed out".into()),
        };
        let (c, k) = (quote(&shape.cursor), quote(&shape.key));
        // prepared once without the settle condition, to learn the types
        let probe = prep(
            &mut conn,
            shape.sql(&format!("({c} IS NOT NULL AND {k} IS NOT NULL)")),
        )
        .await?;
        let cols: Arc<[Column]> = probe.columns();
        let find = |name: &str| cols.iter().find(|col| col.name_str() == name).cloned();
        let (cursor_col, key_col) = (find(&shape.cursor), find(&shape.key));
        let cursor_type = match (&cursor_col, &key_col) {
            (Some(cc), Some(_)) => cc.column_type(),
            _ => {
                return Err(format!(
                    "the query returns no column `{}`",
                    if cursor_col.is_none() {
                        &shape.cursor
                    } else {
                        &shape.key
                    }
                ));
            }
        };
        // rows younger than `settle` on the database's clock wait (the
        // session's time zone is UTC)
        let settled =
            if (is_datetime(cursor_type) || is_date(cursor_type)) && !shape.settle.is_zero() {
                format!(
                    " AND {c} < NOW(6) - INTERVAL {} MICROSECOND",
                    shape.settle.as_micros()
                )
            } else {
                String::new()
            };
        let after_cond = format!("({c} > ? OR ({c} = ? AND {k} > ?))");
        let upto_cond = format!("({c} < ? OR ({c} = ? AND {k} <= ?))");
        let first = prep(
            &mut conn,
            shape.sql(&format!("({c} IS NOT NULL AND {k} IS NOT NULL{settled})")),
        )
        .await?;
        let after = prep(&mut conn, shape.sql(&format!("({after_cond}{settled})"))).await?;
        let window_from =
            prep(&mut conn, shape.sql(&format!("({c} >= ? AND {upto_cond})"))).await?;
        let window_after = prep(
            &mut conn,
            shape.sql(&format!("({after_cond} AND {upto_cond})")),
        )
        .await?;
        Ok(MyReader {
            conn,
            first,
            after,
            window_from,
            window_after,
            cursor_col,
            key_col,
        })
    }

    pub fn cursor_is_time(&self) -> bool {
        self.cursor_col
            .as_ref()
            .is_some_and(|c| is_datetime(c.column_type()) || is_date(c.column_type()))
    }

    pub async fn fetch(&mut self, q: Query<'_>) -> Result<Vec<RawRow>, String> {
        let c = |v: &Value| param(v, self.cursor_col.as_ref());
        let k = |v: &Value| param(v, self.key_col.as_ref());
        let (stmt, params) = match q {
            Query::First => (self.first.clone(), Params::Empty),
            Query::After(p) => (
                self.after.clone(),
                Params::Positional(vec![c(&p.cursor), c(&p.cursor), k(&p.key)]),
            ),
            Query::WindowFrom { lower, upto } => (
                self.window_from.clone(),
                Params::Positional(vec![
                    c(lower),
                    c(&upto.cursor),
                    c(&upto.cursor),
                    k(&upto.key),
                ]),
            ),
            Query::WindowAfter { after, upto } => (
                self.window_after.clone(),
                Params::Positional(vec![
                    c(&after.cursor),
                    c(&after.cursor),
                    k(&after.key),
                    c(&upto.cursor),
                    c(&upto.cursor),
                    k(&upto.key),
                ]),
            ),
        };
        let mut tx = self
            .conn
            .start_transaction(TxOpts::default().with_readonly(Some(true)).clone())
            .await
            .map_err(|e| format!("cannot begin a read-only transaction: {}", my_message(&e)))?;
        let rows: Vec<mysql_async::Row> = tx
            .exec(stmt, params)
            .await
            .map_err(|e| format!("query failed: {}", my_message(&e)))?;
        tx.commit()
            .await
            .map_err(|e| format!("commit failed: {}", my_message(&e)))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut values = Map::new();
            let mut error = None;
            for (i, col) in row.columns_ref().iter().enumerate() {
                let v = row.as_ref(i).unwrap_or(&My::NULL);
                match decode(col, v) {
                    Ok(v) => {
                        values.insert(col.name_str().into_owned(), v);
                    }
                    Err(e) => {
                        values.insert(col.name_str().into_owned(), Value::Null);
                        error.get_or_insert(format!("column `{}`: {e}", col.name_str()));
                    }
                }
            }
            out.push(RawRow { values, error });
        }
        Ok(out)
    }
}

async fn prep(conn: &mut Conn, sql: String) -> Result<Statement, String> {
    conn.prep(sql)
        .await
        .map_err(|e| format!("cannot prepare the query: {}", my_message(&e)))
}

fn is_datetime(t: ColumnType) -> bool {
    matches!(
        t,
        ColumnType::MYSQL_TYPE_DATETIME
            | ColumnType::MYSQL_TYPE_DATETIME2
            | ColumnType::MYSQL_TYPE_TIMESTAMP
            | ColumnType::MYSQL_TYPE_TIMESTAMP2
    )
}

fn is_date(t: ColumnType) -> bool {
    matches!(
        t,
        ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE
    )
}

/// A saved cursor or key as a parameter of the column's type.
fn param(v: &Value, col: Option<&Column>) -> My {
    let t = col.map(|c| c.column_type());
    match v {
        Value::Null => My::NULL,
        Value::Bool(b) => My::Int(i64::from(*b)),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => My::Int(i),
            (None, Some(u)) => My::UInt(u),
            _ => My::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => {
            if let Some(t) = t
                && (is_datetime(t) || is_date(t))
                && let Ok(d) = DateTime::parse_from_rfc3339(s)
            {
                return date(d.with_timezone(&Utc).naive_utc());
            }
            if let Some(t) = t
                && is_date(t)
                && let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d")
            {
                return date(d.and_hms_opt(0, 0, 0).unwrap_or_default());
            }
            My::Bytes(s.as_bytes().to_vec())
        }
        other => My::Bytes(other.to_string().into_bytes()),
    }
}

fn date(t: NaiveDateTime) -> My {
    use chrono::{Datelike, Timelike};
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

fn decode(col: &Column, v: &My) -> Result<Value, String> {
    let t = col.column_type();
    let unsigned = col.flags().contains(ColumnFlags::UNSIGNED_FLAG);
    let boolean = t == ColumnType::MYSQL_TYPE_TINY && col.column_length() == 1 && !unsigned;
    Ok(match v {
        My::NULL => Value::Null,
        My::Int(i) if boolean => Value::Bool(*i != 0),
        My::Int(i) => (*i).into(),
        My::UInt(u) => (*u).into(),
        My::Float(f) => value::float(f.to_string().parse::<f64>().unwrap_or(f64::from(*f))),
        My::Double(d) => value::float(*d),
        My::Date(y, m, d, h, mi, s, us) => {
            let day = NaiveDate::from_ymd_opt((*y).into(), (*m).into(), (*d).into());
            match day {
                // MySQL's zero date
                None => Value::Null,
                Some(day) if is_date(t) => Value::String(day.format("%Y-%m-%d").to_string()),
                Some(day) => {
                    let ts = day
                        .and_hms_micro_opt((*h).into(), (*mi).into(), (*s).into(), *us)
                        .ok_or("invalid time of day")?;
                    value::timestamp(ts)
                }
            }
        }
        My::Time(neg, days, h, m, s, us) => value::time(
            *neg,
            days * 24 + u32::from(*h),
            (*m).into(),
            (*s).into(),
            *us,
        ),
        My::Bytes(b) => match t {
            ColumnType::MYSQL_TYPE_DECIMAL | ColumnType::MYSQL_TYPE_NEWDECIMAL => {
                Value::String(String::from_utf8_lossy(b).into_owned())
            }
            ColumnType::MYSQL_TYPE_JSON => serde_json::from_slice(b).map_err(|e| e.to_string())?,
            ColumnType::MYSQL_TYPE_BIT => {
                let mut n: u64 = 0;
                for byte in b.iter().take(8) {
                    n = (n << 8) | u64::from(*byte);
                }
                n.into()
            }
            ColumnType::MYSQL_TYPE_GEOMETRY => value::bytes(b),
            _ if col.character_set() == BINARY => value::bytes(b),
            _ => Value::String(String::from_utf8_lossy(b).into_owned()),
        },
    })
}
