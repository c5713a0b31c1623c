//! The control connection (a plain `mysql_async` session beside the binlog
//! one): server settings checked, tables described from
//! `information_schema`, binlog files listed, the snapshot's position
//! taken.

use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Row};

use super::decode::{Column, Kind};
use crate::mysql::{is_retryable, my_message};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The server is unreachable or failed: connect again after a pause.
    #[error("{0}")]
    Retry(String),
    /// The server is not set up for CDC, or a table is missing: the source
    /// stops with the reason and what to do.
    #[error("{0}")]
    Fatal(String),
}

/// `what: message`, retryable or not by the error.
pub fn my_err(what: &str) -> impl Fn(mysql_async::Error) -> SetupError + '_ {
    move |e| {
        let m = format!("{what}: {}", my_message(&e));
        if is_retryable(&e) {
            SetupError::Retry(m)
        } else {
            SetupError::Fatal(m)
        }
    }
}

/// Transient trouble only (a query weft itself wrote failing is a retry:
/// the server may be restarting).
fn retry(what: &str) -> impl Fn(mysql_async::Error) -> SetupError + '_ {
    move |e| SetupError::Retry(format!("{what}: {}", my_message(&e)))
}

pub fn quote(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// The connection options from the URL, with what every session needs.
pub fn opts(url: &str) -> Result<Opts, SetupError> {
    let base = Opts::from_url(url)
        .map_err(|e| SetupError::Fatal(format!("not a MariaDB/MySQL URL: {e}")))?;
    Ok(OptsBuilder::from_opts(base)
        .prefer_socket(false)
        // timestamps in UTC; the snapshot reads them as the binlog has them
        .init(vec!["SET time_zone = '+00:00'".to_owned()])
        .into())
}

/// Connect a session.
pub async fn connect(opts: &Opts) -> Result<Conn, SetupError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(opts.clone())).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(my_err("cannot connect to MariaDB/MySQL")(e)),
        Err(_) => Err(SetupError::Retry(
            "cannot connect to MariaDB/MySQL: timed out".into(),
        )),
    }
}

/// What the server is.
#[derive(Debug, Clone)]
pub struct Server {
    pub mariadb: bool,
    pub version: String,
    pub server_id: u32,
}

/// The settings binlog CDC relies on: the binlog on, row format, full
/// row images.
pub async fn check_settings(conn: &mut Conn) -> Result<Server, SetupError> {
    type Settings = (String, i64, Option<String>, Option<String>, u32);
    let row: Option<Settings> = conn
        .query_first(
            "SELECT @@version, @@log_bin, @@binlog_format, @@binlog_row_image, @@server_id",
        )
        .await
        .map_err(retry("cannot read the server's settings"))?;
    let Some((version, log_bin, format, image, server_id)) = row else {
        return Err(SetupError::Retry("the server's settings are empty".into()));
    };
    if log_bin != 1 {
        return Err(SetupError::Fatal(
            "the server's binary log is off: set `log_bin`, `binlog_format = ROW` and a \
             `server_id` in its configuration and restart it"
                .into(),
        ));
    }
    let format = format.unwrap_or_default();
    if !format.eq_ignore_ascii_case("ROW") {
        return Err(SetupError::Fatal(format!(
            "the server writes `binlog_format = {format}`: CDC reads row events only; set \
             `binlog_format = ROW` (SET GLOBAL binlog_format = 'ROW' and in the configuration)"
        )));
    }
    let image = image.unwrap_or_default();
    if !image.eq_ignore_ascii_case("FULL") {
        return Err(SetupError::Fatal(format!(
            "the server writes `binlog_row_image = {image}`: before and after would miss \
             columns; set `binlog_row_image = FULL`"
        )));
    }
    Ok(Server {
        mariadb: version.to_ascii_lowercase().contains("mariadb"),
        version,
        server_id,
    })
}

/// A captured table, as `information_schema` describes it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub db: String,
    pub table: String,
    /// In ordinal order, as the binlog has them.
    pub columns: Vec<Column>,
    /// The primary key's columns (else the first unique key's whose
    /// columns are all `NOT NULL`); empty when there is none.
    pub key: Vec<String>,
}

/// Describe `db.table`; `None` when it does not exist.
pub async fn describe(
    conn: &mut Conn,
    db: &str,
    table: &str,
) -> Result<Option<TableInfo>, SetupError> {
    let rows: Vec<Row> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_SET_NAME, IS_NULLABLE \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await
        .map_err(retry("cannot read the table's columns"))?;
    if rows.is_empty() {
        return Ok(None);
    }
    // MariaDB's JSON is `longtext` with a `json_valid(col)` check (MySQL
    // 5.7 has no such view: no JSON-by-check columns there)
    let checks: Vec<String> = conn
        .exec(
            "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?",
            (db, table),
        )
        .await
        .unwrap_or_default();
    let mut columns = Vec::with_capacity(rows.len());
    let mut nullable = Vec::new();
    for r in rows {
        let name: String = text(&r, 0);
        let data_type: String = text(&r, 1);
        let column_type: String = text(&r, 2);
        let charset: Option<String> = r
            .get_opt::<Option<String>, _>(3)
            .and_then(|v| v.ok())
            .flatten();
        if text(&r, 4) == "YES" {
            nullable.push(name.clone());
        }
        let json = checks
            .iter()
            .any(|c| c.trim() == format!("json_valid({})", quote(&name)));
        columns.push(Column {
            kind: Kind::of(&data_type, &column_type, charset.as_deref(), json),
            name,
        });
    }
    let keys: Vec<(String, String)> = conn
        .exec(
            "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND NON_UNIQUE = 0 \
             ORDER BY INDEX_NAME <> 'PRIMARY', INDEX_NAME, SEQ_IN_INDEX",
            (db, table),
        )
        .await
        .map_err(retry("cannot read the table's keys"))?;
    let mut key: Vec<String> = Vec::new();
    let mut index: Option<&str> = None;
    let mut usable = true;
    for (i, c) in &keys {
        if index != Some(i.as_str()) {
            if index.is_some() && usable && !key.is_empty() {
                break;
            }
            index = Some(i);
            key.clear();
            usable = true;
        }
        usable &= !nullable.contains(c);
        key.push(c.clone());
    }
    if !usable {
        key.clear();
    }
    Ok(Some(TableInfo {
        db: db.to_owned(),
        table: table.to_owned(),
        columns,
        key,
    }))
}

fn text(r: &Row, i: usize) -> String {
    r.get_opt::<String, _>(i)
        .and_then(|v| v.ok())
        .unwrap_or_default()
}

/// The binlog files the server has, with their sizes, oldest first.
pub async fn binary_logs(conn: &mut Conn) -> Result<Vec<(String, u64)>, SetupError> {
    let rows: Vec<Row> = conn
        .query("SHOW BINARY LOGS")
        .await
        .map_err(my_err("cannot list the binary logs (SHOW BINARY LOGS)"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let size = r
                .get_opt::<u64, _>(1)
                .and_then(|v| v.ok())
                .unwrap_or_default();
            (text(r, 0), size)
        })
        .collect())
}

/// The binlog's current end (`SHOW MASTER STATUS`; `SHOW BINARY LOG
/// STATUS` on MySQL 8.4).
pub async fn binlog_end(conn: &mut Conn) -> Result<(String, u64), SetupError> {
    let row: Option<Row> = match conn.query_first("SHOW MASTER STATUS").await {
        Ok(r) => r,
        Err(_) => conn
            .query_first("SHOW BINARY LOG STATUS")
            .await
            .map_err(my_err(
                "cannot read the binlog position (SHOW MASTER STATUS)",
            ))?,
    };
    let Some(r) = row else {
        return Err(SetupError::Fatal(
            "SHOW MASTER STATUS is empty: the binary log is off".into(),
        ));
    };
    let pos = r
        .get_opt::<u64, _>(1)
        .and_then(|v| v.ok())
        .unwrap_or_default();
    Ok((text(&r, 0), pos))
}

/// Start the snapshot's transaction on `conn` and return the binlog
/// position it is consistent with: MariaDB reports it for a consistent
/// snapshot (`binlog_snapshot_file`/`_position`, no lock); elsewhere a
/// global read lock is held while the transaction starts and the position
/// is read.
pub async fn start_snapshot(conn: &mut Conn, server: &Server) -> Result<(String, u64), SetupError> {
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(retry("cannot start the snapshot"))?;
    if server.mariadb {
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .await
            .map_err(retry("cannot start the snapshot"))?;
        let rows: Vec<(String, String)> = conn
            .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
            .await
            .map_err(retry("cannot read the snapshot's binlog position"))?;
        let get = |n: &str| {
            rows.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        if let (Some(file), Some(pos)) = (
            get("Binlog_snapshot_file"),
            get("Binlog_snapshot_position").and_then(|p| p.parse::<u64>().ok()),
        ) && !file.is_empty()
        {
            return Ok((file, pos));
        }
        conn.query_drop("ROLLBACK")
            .await
            .map_err(retry("cannot start the snapshot"))?;
    }
    conn.query_drop("FLUSH TABLES WITH READ LOCK")
        .await
        .map_err(my_err(
            "cannot take the snapshot's read lock (FLUSH TABLES WITH READ LOCK needs RELOAD)",
        ))?;
    let started = async {
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .await
            .map_err(retry("cannot start the snapshot"))?;
        binlog_end(conn).await
    }
    .await;
    let unlocked = conn
        .query_drop("UNLOCK TABLES")
        .await
        .map_err(retry("cannot release the snapshot's read lock"));
    let pos = started?;
    unlocked?;
    Ok(pos)
}

/// A MariaDB GTID position as weft saves it: `domain-server-seq` GTIDs,
/// comma-separated (empty: no transaction yet). Checked before it is put
/// in a statement.
pub fn valid_gtid_pos(pos: &str) -> bool {
    pos.split(',').all(|g| {
        let g = g.trim();
        let parts: Vec<&str> = g.split('-').collect();
        g.is_empty()
            || (parts.len() == 3
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
    })
}

/// MariaDB: the GTID position of `file:pos` on this server
/// (`BINLOG_GTID_POS`, which reads the binlog up to there); `None` when
/// the server has no such place (another server, a purged or reset
/// binlog).
pub async fn binlog_gtid_pos(
    conn: &mut Conn,
    file: &str,
    pos: u64,
) -> Result<Option<String>, SetupError> {
    let row: Option<Option<String>> = conn
        .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (file, pos))
        .await
        .map_err(retry("cannot read the GTID position (BINLOG_GTID_POS)"))?;
    Ok(row.flatten())
}

/// The catalog's estimate of the rows in `tables`
/// (`information_schema.TABLES.TABLE_ROWS`: exact for MyISAM, an estimate
/// for InnoDB); `None` when it cannot say.
pub async fn estimated_rows(conn: &mut Conn, tables: &[TableInfo]) -> Option<u64> {
    let mut total = 0u64;
    for t in tables {
        let n: Option<Option<u64>> = conn
            .exec_first(
                "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&t.db, &t.table),
            )
            .await
            .ok()?;
        total += n.flatten().unwrap_or(0);
    }
    (total > 0).then_some(total)
}
