//! The little SQL the canonical-record logic needs, on either engine: the
//! logic (`super`) is written once against [`Sql`], with statements in the
//! dialect SQLite and PostgreSQL share (`$N` parameters, `ON CONFLICT`,
//! `RETURNING`, `CAST(.. AS TEXT)`), and each engine runs them inside its
//! own transaction. SQLite's adapter ([`Lite`]) is synchronous: its futures
//! are ready at once and [`ready`] runs them on the writer thread.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};

use crate::StoreError;

/// A statement parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum P<'a> {
    Null,
    Int(i64),
    Real(f64),
    /// Text, or JSON text where the column holds JSON (PostgreSQL: jsonb).
    Text(&'a str),
}

impl<'a> P<'a> {
    pub fn opt(s: Option<&'a str>) -> P<'a> {
        s.map_or(P::Null, P::Text)
    }
    pub fn opt_int(i: Option<i64>) -> P<'a> {
        i.map_or(P::Null, P::Int)
    }
}

impl<'a> From<&'a str> for P<'a> {
    fn from(s: &'a str) -> P<'a> {
        P::Text(s)
    }
}

impl<'a> From<&'a String> for P<'a> {
    fn from(s: &'a String) -> P<'a> {
        P::Text(s)
    }
}

impl From<i64> for P<'_> {
    fn from(i: i64) -> Self {
        P::Int(i)
    }
}

/// A column value read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

/// One result row.
#[derive(Debug, Clone)]
pub(crate) struct Rec(pub Vec<Val>);

impl Rec {
    fn at(&self, i: usize) -> Result<&Val, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Failed(format!("canonical records: no column {i}")))
    }
    fn wrong(&self, i: usize, what: &str) -> StoreError {
        StoreError::Failed(format!(
            "canonical records: column {i} is not {what}: {:?}",
            self.0.get(i)
        ))
    }
    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        match self.at(i)? {
            Val::Text(s) => Ok(s.clone()),
            _ => Err(self.wrong(i, "text")),
        }
    }
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.at(i)? {
            Val::Null => Ok(None),
            Val::Text(s) => Ok(Some(s.clone())),
            _ => Err(self.wrong(i, "text")),
        }
    }
    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.at(i)? {
            Val::Int(n) => Ok(*n),
            _ => Err(self.wrong(i, "an integer")),
        }
    }
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.at(i)? {
            Val::Null => Ok(None),
            Val::Int(n) => Ok(Some(*n)),
            _ => Err(self.wrong(i, "an integer")),
        }
    }
    pub fn real(&self, i: usize) -> Result<f64, StoreError> {
        match self.at(i)? {
            Val::Real(f) => Ok(*f),
            Val::Int(n) => Ok(*n as f64),
            _ => Err(self.wrong(i, "a number")),
        }
    }
}

/// Statements inside the caller's transaction.
#[allow(async_fn_in_trait)]
pub(crate) trait Sql {
    /// Run a statement; rows changed.
    async fn exec(&mut self, sql: &'static str, p: &[P<'_>]) -> Result<u64, StoreError>;
    /// Run a query; every row.
    async fn rows(&mut self, sql: &'static str, p: &[P<'_>]) -> Result<Vec<Rec>, StoreError>;
    /// Whether a row of `(destination, key)` waits in the outbox, not out
    /// for writing (it reads the record when it is written). PostgreSQL
    /// also locks it, so that no claim takes it before this transaction
    /// commits (the claim would read the record as it was).
    async fn waiting(&mut self, destination: &str, key: &str) -> Result<bool, StoreError>;
    /// Hold records `cids` of `entity` for the rest of the transaction
    /// (PostgreSQL: advisory locks, in one order everywhere; SQLite has one
    /// writer and does nothing).
    async fn lock_records(&mut self, entity: &str, cids: &[&str]) -> Result<(), StoreError>;

    /// The first row, if any.
    async fn row(&mut self, sql: &'static str, p: &[P<'_>]) -> Result<Option<Rec>, StoreError> {
        Ok(self.rows(sql, p).await?.into_iter().next())
    }
}

/// The SQLite transaction (the writer's, or a reader's connection).
pub(crate) struct Lite<'a>(pub &'a Connection);

impl rusqlite::ToSql for P<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            P::Null => ToSqlOutput::Owned(SqlValue::Null),
            P::Int(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            P::Real(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
            P::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// `$N` parameters as SQLite spells them (`?N`); no statement here has a
/// `$` anywhere else.
fn lite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

impl Sql for Lite<'_> {
    async fn exec(&mut self, sql: &'static str, p: &[P<'_>]) -> Result<u64, StoreError> {
        let n = self
            .0
            .prepare_cached(&lite_sql(sql))?
            .execute(rusqlite::params_from_iter(p.iter()))?;
        Ok(n as u64)
    }

    async fn rows(&mut self, sql: &'static str, p: &[P<'_>]) -> Result<Vec<Rec>, StoreError> {
        let mut st = self.0.prepare_cached(&lite_sql(sql))?;
        let n = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(p.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(match r.get_ref(i)? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(i) => Val::Int(i),
                    ValueRef::Real(f) => Val::Real(f),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Val::Text(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            out.push(Rec(v));
        }
        Ok(out)
    }

    async fn waiting(&mut self, destination: &str, key: &str) -> Result<bool, StoreError> {
        // state 2: leased (out for writing)
        Ok(self
            .0
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM outbox WHERE destination = ?1 AND entity_key = ?2 AND state <> 2)",
            )?
            .query_row(rusqlite::params![destination, key], |row| row.get(0))?)
    }

    async fn lock_records(&mut self, _entity: &str, _cids: &[&str]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Run a future of [`Lite`] statements: they never wait, so it is ready
/// at its first poll.
pub(crate) fn ready<T>(f: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(StoreError::Failed(
            "a SQLite step of canonical records waited, which it never does".into(),
        )),
    }
}
