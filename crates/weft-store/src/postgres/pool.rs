//! A fixed set of connections (at most `size` open at once), each with its
//! own prepared statements, on the journal's runtime.
//!
//! Small on purpose: the journal needs no more than "take a connection,
//! run one transaction, give it back". A connection that broke, or that is
//! given back inside a transaction (its task ended midway), is dropped and
//! a new one opened on the next take.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::StoreError;

/// Query parameters.
pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// One connection and the statements prepared on it.
pub(crate) struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    in_tx: bool,
}

impl Conn {
    async fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    pub async fn query(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        let s = self.statement(sql).await?;
        Ok(self.client.query(&s, p).await?)
    }

    pub async fn query_one(&mut self, sql: &'static str, p: Params<'_>) -> Result<Row, StoreError> {
        let s = self.statement(sql).await?;
        Ok(self.client.query_one(&s, p).await?)
    }

    pub async fn query_opt(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        let s = self.statement(sql).await?;
        Ok(self.client.query_opt(&s, p).await?)
    }

    pub async fn execute(&mut self, sql: &'static str, p: Params<'_>) -> Result<u64, StoreError> {
        let s = self.statement(sql).await?;
        Ok(self.client.execute(&s, p).await?)
    }

    /// Statements without parameters (DDL, `BEGIN`), unprepared.
    pub async fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(self.client.batch_execute(sql).await?)
    }

    pub async fn begin(&mut self) -> Result<(), StoreError> {
        self.in_tx = true;
        self.batch("BEGIN").await
    }

    /// A snapshot for reads: every statement until [`Conn::finish`] sees
    /// the same committed state.
    pub async fn begin_snapshot(&mut self) -> Result<(), StoreError> {
        self.in_tx = true;
        self.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
    }

    /// Commit on `Ok`, roll back on `Err`; an `Ok` is answered only after
    /// the commit returned.
    pub async fn finish<T>(&mut self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match r {
            Ok(v) => {
                self.batch("COMMIT").await?;
                self.in_tx = false;
                Ok(v)
            }
            Err(e) => {
                if self.batch("ROLLBACK").await.is_ok() {
                    self.in_tx = false;
                }
                Err(e)
            }
        }
    }
}

/// The journal's connections.
pub(crate) struct Pool {
    config: tokio_postgres::Config,
    /// `SET search_path` of every connection: the journal's schema.
    setup: String,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

/// A connection taken from the pool; given back on drop.
pub(crate) struct Pooled<'a> {
    conn: Option<Conn>,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a pooled connection until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a pooled connection until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take()
            && !c.in_tx
            && !c.client.is_closed()
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push(c);
        }
    }
}

impl Pool {
    pub fn new(config: tokio_postgres::Config, schema: &str, size: usize) -> Pool {
        Pool {
            config,
            setup: format!("SET search_path TO {schema}"),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size.max(1)),
        }
    }

    /// A connection: an idle one, or a new one. Waits while `size` are out.
    pub async fn get(&self) -> Result<Pooled<'_>, StoreError> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let idle = loop {
            let c = self.idle.lock().ok().and_then(|mut i| i.pop());
            match c {
                Some(c) if c.client.is_closed() => continue,
                other => break other,
            }
        };
        let conn = match idle {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(Pooled {
            conn: Some(conn),
            pool: self,
            _permit: permit,
        })
    }

    /// A new connection with the journal's search path, outside the pool
    /// (the hub's session lock lives on one).
    pub async fn connect(&self) -> Result<Conn, StoreError> {
        let client = connect(&self.config).await?;
        client.batch_execute(&self.setup).await?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
            in_tx: false,
        })
    }

    /// Close every idle connection (the journal is closing).
    pub fn close(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
        self.permits.close();
    }
}

/// Connect, and drive the connection on the current runtime (the
/// journal's).
pub(crate) async fn connect(config: &tokio_postgres::Config) -> Result<Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL journal connection ended");
        }
    });
    Ok(client)
}
