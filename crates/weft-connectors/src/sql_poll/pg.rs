//! Reading rows from PostgreSQL.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};
use tokio_postgres::types::{FromSql, Kind, Type};
use tokio_postgres::{Client, Statement};

use super::value::{self, param_text};
use super::{Query, RawRow, Shape};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const PG_EPOCH: i64 = 946_684_800;

pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

pub struct PgReader {
    client: Client,
    first: Statement,
    after: Statement,
    window_from: Statement,
    window_after: Statement,
    time_cursor: bool,
}

fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The SQL name of a column's type, for a cast.
fn type_name(t: &Type) -> String {
    if t.schema() == "pg_catalog" {
        t.name().to_owned()
    } else {
        format!("{}.{}", quote(t.schema()), quote(t.name()))
    }
}

impl PgReader {
    pub async fn connect(url: &str, shape: Shape) -> Result<PgReader, String> {
        let tls = crate::pg_tls::connector(url)?;
        let connecting = tokio_postgres::connect(&tls.url, tls.connector);
        let (client, connection) = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("cannot connect to PostgreSQL: {}", pg_message(&e))),
            Err(_) => return Err("cannot connect to PostgreSQL: timed out".into()),
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "sql_poll: PostgreSQL connection closed");
            }
        });
        client
            .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            .await
            .map_err(|e| format!("cannot make the session read-only: {}", pg_message(&e)))?;
        let (c, k) = (quote(&shape.cursor), quote(&shape.key));
        let prepare = |sql: String, types: usize| {
            let client = &client;
            async move {
                client
                    .prepare_typed(&sql, &vec![Type::TEXT; types])
                    .await
                    .map_err(|e| format!("cannot prepare the query: {}", pg_message(&e)))
            }
        };
        // prepared once without the settle condition, to learn the types
        let probe = prepare(
            shape.sql(&format!("({c} IS NOT NULL AND {k} IS NOT NULL)")),
            0,
        )
        .await?;
        let col_type = |name: &str| {
            probe
                .columns()
                .iter()
                .find(|col| col.name() == name)
                .map(|col| col.type_().clone())
                .ok_or_else(|| format!("the query returns no column `{name}`"))
        };
        let (cty, kty) = (col_type(&shape.cursor)?, col_type(&shape.key)?);
        let (ct, kt) = (type_name(&cty), type_name(&kty));
        let time_cursor = matches!(cty, Type::TIMESTAMPTZ | Type::TIMESTAMP | Type::DATE);
        // rows younger than `settle` on the database's clock wait; zone-less
        // cursors are compared as UTC, as they are read
        let settled = if time_cursor && !shape.settle.is_zero() {
            let now = if cty == Type::TIMESTAMPTZ {
                "clock_timestamp()"
            } else {
                "(clock_timestamp() AT TIME ZONE 'UTC')"
            };
            format!(
                " AND {c} < {now} - interval '{} microseconds'",
                shape.settle.as_micros()
            )
        } else {
            String::new()
        };
        let p = |i: usize, t: &str| format!("${i}::text::{t}");
        let first = prepare(
            shape.sql(&format!("({c} IS NOT NULL AND {k} IS NOT NULL{settled})")),
            0,
        )
        .await?;
        let after = prepare(
            shape.sql(&format!(
                "(({c}, {k}) > ({}, {}){settled})",
                p(1, &ct),
                p(2, &kt)
            )),
            2,
        )
        .await?;
        let window_from = prepare(
            shape.sql(&format!(
                "({c} >= {} AND ({c}, {k}) <= ({}, {}))",
                p(1, &ct),
                p(2, &ct),
                p(3, &kt)
            )),
            3,
        )
        .await?;
        let window_after = prepare(
            shape.sql(&format!(
                "(({c}, {k}) > ({}, {}) AND ({c}, {k}) <= ({}, {}))",
                p(1, &ct),
                p(2, &kt),
                p(3, &ct),
                p(4, &kt)
            )),
            4,
        )
        .await?;
        Ok(PgReader {
            client,
            first,
            after,
            window_from,
            window_after,
            time_cursor,
        })
    }

    pub fn cursor_is_time(&self) -> bool {
        self.time_cursor
    }

    pub async fn fetch(&mut self, q: Query<'_>) -> Result<Vec<RawRow>, String> {
        let tx = self
            .client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| format!("cannot begin a read-only transaction: {}", pg_message(&e)))?;
        let t = param_text;
        let rows = match q {
            Query::First => tx.query(&self.first, &[]).await,
            Query::After(p) => {
                let (c, k) = (t(&p.cursor), t(&p.key));
                tx.query(&self.after, &[&c, &k]).await
            }
            Query::WindowFrom { lower, upto } => {
                let (l, c, k) = (t(lower), t(&upto.cursor), t(&upto.key));
                tx.query(&self.window_from, &[&l, &c, &k]).await
            }
            Query::WindowAfter { after, upto } => {
                let (ac, ak, c, k) = (
                    t(&after.cursor),
                    t(&after.key),
                    t(&upto.cursor),
                    t(&upto.key),
                );
                tx.query(&self.window_after, &[&ac, &ak, &c, &k]).await
            }
        }
        .map_err(|e| format!("query failed: {}", pg_message(&e)))?;
        tx.commit()
            .await
            .map_err(|e| format!("commit failed: {}", pg_message(&e)))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut values = Map::new();
            let mut error = None;
            for (i, col) in row.columns().iter().enumerate() {
                let v = match row.try_get::<_, RawValue>(i) {
                    Ok(RawValue(None)) => Ok(Value::Null),
                    Ok(RawValue(Some(raw))) => decode(col.type_(), raw),
                    Err(e) => Err(e.to_string()),
                };
                match v {
                    Ok(v) => {
                        values.insert(col.name().to_owned(), v);
                    }
                    Err(e) => {
                        values.insert(col.name().to_owned(), Value::Null);
                        error.get_or_insert(format!(
                            "column `{}` ({}): {e}",
                            col.name(),
                            col.type_().name()
                        ));
                    }
                }
            }
            out.push(RawRow { values, error });
        }
        Ok(out)
    }
}

/// A column's bytes as PostgreSQL sent them (binary format).
struct RawValue<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for RawValue<'a> {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(Some(raw)))
    }
    fn from_sql_null(_ty: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(None))
    }
    fn accepts(_ty: &Type) -> bool {
        true
    }
}

fn fixed<const N: usize>(raw: &[u8]) -> Result<[u8; N], String> {
    raw.try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", raw.len()))
}

fn utf8(raw: &[u8]) -> Result<Value, String> {
    std::str::from_utf8(raw)
        .map(|s| Value::String(s.to_owned()))
        .map_err(|e| e.to_string())
}

fn decode(ty: &Type, raw: &[u8]) -> Result<Value, String> {
    Ok(match *ty {
        Type::BOOL => Value::Bool(raw.first().is_some_and(|b| *b != 0)),
        Type::INT2 => i16::from_be_bytes(fixed(raw)?).into(),
        Type::INT4 => i32::from_be_bytes(fixed(raw)?).into(),
        Type::INT8 => i64::from_be_bytes(fixed(raw)?).into(),
        Type::OID => u32::from_be_bytes(fixed(raw)?).into(),
        Type::FLOAT4 => {
            // via its shortest text, so 0.1::real is 0.1, not 0.10000000149
            let f = f32::from_be_bytes(fixed(raw)?);
            value::float(f.to_string().parse::<f64>().unwrap_or(f64::from(f)))
        }
        Type::FLOAT8 => value::float(f64::from_be_bytes(fixed(raw)?)),
        Type::NUMERIC => Value::String(value::pg_numeric(raw)?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::XML => {
            utf8(raw)?
        }
        Type::JSON => serde_json::from_slice(raw).map_err(|e| e.to_string())?,
        Type::JSONB => match raw.split_first() {
            Some((1, rest)) => serde_json::from_slice(rest).map_err(|e| e.to_string())?,
            _ => return Err("unknown jsonb version".into()),
        },
        Type::TIMESTAMPTZ | Type::TIMESTAMP => {
            let us = i64::from_be_bytes(fixed(raw)?);
            match us {
                i64::MAX => Value::String("infinity".into()),
                i64::MIN => Value::String("-infinity".into()),
                _ => {
                    let t = DateTime::<Utc>::from_timestamp(
                        PG_EPOCH + us.div_euclid(1_000_000),
                        (us.rem_euclid(1_000_000) * 1000) as u32,
                    )
                    .ok_or("timestamp out of range")?;
                    value::timestamp(t.naive_utc())
                }
            }
        }
        Type::DATE => {
            let days = i32::from_be_bytes(fixed(raw)?);
            match days {
                i32::MAX => Value::String("infinity".into()),
                i32::MIN => Value::String("-infinity".into()),
                _ => {
                    let d = NaiveDate::from_ymd_opt(2000, 1, 1)
                        .and_then(|d| d.checked_add_signed(chrono::Duration::days(days.into())))
                        .ok_or("date out of range")?;
                    Value::String(d.format("%Y-%m-%d").to_string())
                }
            }
        }
        Type::TIME => {
            let us = i64::from_be_bytes(fixed(raw)?);
            let secs = us / 1_000_000;
            value::time(
                false,
                (secs / 3600) as u32,
                (secs / 60 % 60) as u32,
                (secs % 60) as u32,
                (us % 1_000_000) as u32,
            )
        }
        Type::UUID => Value::String(uuid::Uuid::from_bytes(fixed(raw)?).to_string()),
        Type::BYTEA => value::bytes(raw),
        _ => match ty.kind() {
            Kind::Enum(_) => utf8(raw)?,
            Kind::Domain(inner) => decode(inner, raw)?,
            _ if ty.name() == "citext" => utf8(raw)?,
            _ => {
                return Err(
                    "this type cannot be read yet; cast it to text in a custom query".into(),
                );
            }
        },
    })
}
