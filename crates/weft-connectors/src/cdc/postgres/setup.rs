//! The control connection (a plain `tokio-postgres` session beside the
//! replication one): settings checked, the publication created or reused,
//! the slot inspected or dropped, column types and primary keys read from
//! the catalog, the slot's lag measured.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::decode::PgType;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The database is unreachable or failed: connect again after a pause.
    #[error("{0}")]
    Retry(String),
    /// The database is not set up for CDC, or the slot cannot be used as it
    /// is: the source stops with the reason and what to do.
    #[error("{0}")]
    Fatal(String),
}

pub fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

fn retry(what: &str) -> impl Fn(tokio_postgres::Error) -> SetupError + '_ {
    move |e| SetupError::Retry(format!("{what}: {}", pg_message(&e)))
}

pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Connect the control session.
pub async fn connect(url: &str, system: &str) -> Result<Client, SetupError> {
    let connecting = tokio_postgres::connect(url, NoTls);
    let (client, connection) = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(SetupError::Retry(format!(
                "cannot connect to PostgreSQL: {}",
                pg_message(&e)
            )));
        }
        Err(_) => {
            return Err(SetupError::Retry(
                "cannot connect to PostgreSQL: timed out".into(),
            ));
        }
    };
    let system = system.to_owned();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(system = %system, error = %e, "postgres_cdc: control connection closed");
        }
    });
    Ok(client)
}

/// The server settings CDC and the decoder rely on.
pub async fn check_settings(client: &Client) -> Result<(), SetupError> {
    let show = |name: &'static str| async move {
        client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .map_err(retry("cannot read the server settings"))
    };
    let wal_level = show("wal_level").await?;
    if wal_level != "logical" {
        return Err(SetupError::Fatal(format!(
            "PostgreSQL has `wal_level = {wal_level}`; change data capture needs `logical` \
             (`ALTER SYSTEM SET wal_level = logical;` then restart PostgreSQL)"
        )));
    }
    let datestyle = show("DateStyle").await?;
    if !datestyle.starts_with("ISO") {
        return Err(SetupError::Fatal(format!(
            "`DateStyle` is `{datestyle}`; timestamps are read in ISO style only \
             (`ALTER ROLE <user> SET DateStyle = 'ISO, MDY'`)"
        )));
    }
    let bytea = show("bytea_output").await?;
    if bytea != "hex" {
        return Err(SetupError::Fatal(format!(
            "`bytea_output` is `{bytea}`; bytea values are read in hex only \
             (`ALTER ROLE <user> SET bytea_output = 'hex'`)"
        )));
    }
    Ok(())
}

/// Create the publication `FOR TABLE tables` when it does not exist; use an
/// existing one as it is (a configured table it lacks is logged).
pub async fn ensure_publication(
    client: &Client,
    system: &str,
    name: &str,
    tables: &[(String, String)],
) -> Result<(), SetupError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(retry("cannot read the publications"))?
        .is_some();
    if !exists {
        if tables.is_empty() {
            return Err(SetupError::Fatal(format!(
                "publication `{name}` does not exist and no `tables` are configured to create it with"
            )));
        }
        let list: Vec<String> = tables
            .iter()
            .map(|(s, t)| format!("{}.{}", quote(s), quote(t)))
            .collect();
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote(name),
            list.join(", ")
        );
        return match client.batch_execute(&sql).await {
            Ok(()) => {
                tracing::info!(system = %system, publication = %name, tables = %list.join(", "), "postgres_cdc: publication created");
                Ok(())
            }
            // a concurrent start created it
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {
                Ok(())
            }
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("42")) => {
                Err(SetupError::Fatal(format!(
                    "cannot create publication `{name}`: {}",
                    pg_message(&e)
                )))
            }
            Err(e) => Err(SetupError::Retry(format!(
                "cannot create publication `{name}`: {}",
                pg_message(&e)
            ))),
        };
    }
    for (s, t) in tables {
        let found = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&name, s, t],
            )
            .await
            .map_err(retry("cannot read the publication's tables"))?
            .is_some();
        if !found {
            // a table added to `tables`: added to the publication, and
            // snapshotted alone at this start (the source's per-table sync)
            let sql = format!(
                "ALTER PUBLICATION {} ADD TABLE {}.{}",
                quote(name),
                quote(s),
                quote(t)
            );
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    tracing::info!(system = %system, publication = %name, table = %format!("{s}.{t}"), "postgres_cdc: table added to the publication");
                }
                Err(e) => tracing::warn!(
                    system = %system, publication = %name, table = %format!("{s}.{t}"), error = %pg_message(&e),
                    "postgres_cdc: the publication exists without this configured table and it cannot be added; \
                     its changes are not read (ALTER PUBLICATION ... ADD TABLE as the tables' owner)"
                ),
            }
        }
    }
    Ok(())
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<u64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

pub async fn slot(client: &Client, name: &str) -> Result<Option<SlotInfo>, SetupError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(retry("cannot read the replication slots"))?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active_pid: r.get(2),
        confirmed_flush: r
            .get::<_, Option<String>>(3)
            .and_then(|s| pg_walstream::parse_lsn(&s).ok()),
        wal_status: r.get(4),
    }))
}

/// Drop slot `name`, ending the session still holding it (a weft killed a
/// moment ago leaves its walsender behind until PostgreSQL notices).
pub async fn drop_slot(client: &Client, system: &str, name: &str) -> Result<(), SetupError> {
    for attempt in 0..50 {
        let Some(info) = slot(client, name).await? else {
            return Ok(());
        };
        if let Some(pid) = info.active_pid {
            if attempt == 10 {
                tracing::info!(system = %system, slot = %name, pid, "postgres_cdc: ending the session that still holds the slot");
                let _ = client
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&name])
            .await
        {
            Ok(_) => {
                tracing::info!(system = %system, slot = %name, "postgres_cdc: replication slot dropped");
                return Ok(());
            }
            // taken again in between, or already gone: look again
            Err(e) => {
                tracing::debug!(system = %system, slot = %name, error = %pg_message(&e), "postgres_cdc: cannot drop the slot yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Err(SetupError::Retry(format!(
        "replication slot `{name}` is still in use; cannot drop it"
    )))
}

/// `pg_type` rows of `oids` and of every type they refer to.
pub async fn types(
    client: &Client,
    known: &mut HashMap<u32, PgType>,
    oids: &[u32],
) -> Result<(), SetupError> {
    let mut want: Vec<u32> = oids
        .iter()
        .copied()
        .filter(|o| !known.contains_key(o))
        .collect();
    want.sort_unstable();
    want.dedup();
    for _ in 0..8 {
        if want.is_empty() {
            return Ok(());
        }
        let rows = client
            .query(
                "SELECT t.oid, t.typname::text, n.nspname = 'pg_catalog', t.typtype, t.typcategory, \
                 t.typelem, t.typbasetype, t.typdelim \
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = ANY($1)",
                &[&want],
            )
            .await
            .map_err(retry("cannot read the column types"))?;
        for r in rows {
            let byte = |i: usize| r.get::<_, i8>(i) as u8;
            known.insert(
                r.get(0),
                PgType {
                    name: r.get(1),
                    builtin: r.get(2),
                    typtype: byte(3),
                    category: byte(4),
                    elem: r.get(5),
                    base: r.get(6),
                    delim: byte(7),
                },
            );
        }
        // types no longer in the catalog stay unknown (read as text)
        for o in &want {
            known.entry(*o).or_insert_with(|| PgType {
                name: String::new(),
                builtin: false,
                typtype: b'b',
                category: b'U',
                elem: 0,
                base: 0,
                delim: b',',
            });
        }
        want = super::decode::missing_refs(known);
    }
    Ok(())
}

/// The primary key's columns of relation `oid`, in key order (empty
/// without one).
pub async fn primary_key(client: &Client, oid: u32) -> Result<Vec<String>, SetupError> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await
        .map_err(retry("cannot read the primary key"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Bytes of WAL the slot holds back: from its confirmed position to now.
pub async fn slot_lag_bytes(client: &Client, slot: &str) -> Result<Option<i64>, SetupError> {
    let row = client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(retry("cannot read the slot's lag"))?;
    Ok(row.and_then(|r| r.get(0)))
}

/// The database the URL names (for the events' `source.db`).
pub async fn database(client: &Client) -> Result<String, SetupError> {
    client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map(|r| r.get(0))
        .map_err(retry("cannot read the database name"))
}

/// The publication's tables, `schema.table`.
pub async fn publication_tables(client: &Client, name: &str) -> Result<Vec<String>, SetupError> {
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(retry("cannot read the publication's tables"))?;
    Ok(rows
        .iter()
        .map(|r| format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// The catalog's estimate of the rows in `tables` (`schema.table` names):
/// the sum of `pg_class.reltuples` (maintained by `ANALYZE` and autovacuum;
/// -1 for a table never analyzed counts 0); `None` when it cannot say.
pub async fn estimated_rows(client: &Client, tables: &[String]) -> Option<u64> {
    let row = client
        .query_one(
            "SELECT COALESCE(sum(GREATEST(c.reltuples, 0)), 0)::int8 FROM pg_class c
             WHERE c.oid IN (SELECT to_regclass(t) FROM unnest($1::text[]) AS t)",
            &[&tables],
        )
        .await
        .ok()?;
    let n: i64 = row.try_get(0).ok()?;
    u64::try_from(n).ok().filter(|n| *n > 0)
}
