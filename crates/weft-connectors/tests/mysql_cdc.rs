#![cfg(feature = "cdc-mysql")]
//! The MariaDB/MySQL CDC source against the real MariaDB on 127.0.0.1:3306
//! (root, no password; `log_bin`, `binlog_format = ROW`, which
//! `.ci/services.sh` sets). Each test makes its own database (dropped at
//! the end) and registers with its own replica `server_id`. Skipped with a
//! message when MariaDB is not reachable or has no row binlog, unless
//! `CI=true`, where that is a failure.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use mysql_async::Conn;
use mysql_async::prelude::Queryable;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_connectors::cdc::mysql::CHECKPOINT_KEY;
use weft_connectors::{Batch, Ingest, IngestError, Receipt, Record, SourceHandle, build_source};
use weft_core::Event;

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

const ADMIN_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// An in-memory store that keeps every event it is given (no dedupe: a
/// duplicate would show), the checkpoint, and can fail from a given batch on.
#[derive(Default)]
struct Mem {
    events: Mutex<Vec<Event>>,
    bad: Mutex<Vec<String>>,
    checkpoint: Mutex<Option<String>>,
    batches: Mutex<Vec<usize>>,
    /// Fail every batch from this one (0-based count of batches accepted).
    fail_from: Mutex<Option<usize>>,
    /// Fail every batch holding an event whose id ends with this.
    fail_on: Mutex<Option<String>>,
}

impl Ingest for Mem {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            let mut batches = self.batches.lock().unwrap();
            if let Some(n) = *self.fail_from.lock().unwrap()
                && batches.len() >= n
            {
                return Err(IngestError::Store("disk on fire".into()));
            }
            if let Some(id) = self.fail_on.lock().unwrap().as_deref()
                && batch
                    .records
                    .iter()
                    .any(|r| matches!(r, Record::Good(e) if e.id.ends_with(id)))
            {
                return Err(IngestError::Store("disk on fire".into()));
            }
            batches.push(batch.records.len());
            let mut r = Receipt::default();
            for rec in batch.records {
                match rec {
                    Record::Good(e) => {
                        r.accepted += 1;
                        self.events.lock().unwrap().push(e);
                    }
                    Record::Bad(b) => self.bad.lock().unwrap().push(b.error),
                }
            }
            if let Some(c) = batch.checkpoint {
                assert_eq!(c.key, CHECKPOINT_KEY);
                *self.checkpoint.lock().unwrap() = Some(c.value);
            }
            Ok(r)
        })
    }
    fn checkpoint(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
        if key == weft_connectors::cdc::RESNAPSHOT_KEY {
            // no `weft cdc resnapshot` request here (crates/weft/tests/cdc.rs has them)
            return Box::pin(async { Ok(None) });
        }
        assert_eq!(key, CHECKPOINT_KEY);
        let v = self.checkpoint.lock().unwrap().clone();
        Box::pin(async move { Ok(v) })
    }
}

impl Mem {
    fn data(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.data.clone())
            .collect()
    }
    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }
    fn checkpoint(&self) -> Value {
        serde_json::from_str(self.checkpoint.lock().unwrap().as_deref().unwrap()).unwrap()
    }
    fn streaming(&self) -> bool {
        self.checkpoint
            .lock()
            .unwrap()
            .as_deref()
            .is_some_and(|c| c.contains("\"stream\""))
    }
}

/// Drops a test database when dropped, also when the test panics.
struct DropDb(String);

impl Drop for DropDb {
    fn drop(&mut self) {
        let name = self.0.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let Ok(mut c) = Conn::from_url(ADMIN_URL).await else {
                    return;
                };
                if let Err(e) = c
                    .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                    .await
                {
                    eprintln!("cannot drop test database {name}: {e}");
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A database of its own, dropped at the end (or on a panic).
struct TestDb {
    name: String,
    url: String,
    server_id: u32,
    conn: Conn,
    _drop: DropDb,
}

impl TestDb {
    async fn new() -> Option<TestDb> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_test_writer()
            .try_init();
        let mut admin = match Conn::from_url(ADMIN_URL).await {
            Ok(c) => c,
            Err(e) => {
                if ci() {
                    panic!("MariaDB at {ADMIN_URL} is not reachable and CI=true: {e}");
                }
                eprintln!(
                    "!!!!!! SKIPPING MariaDB CDC test: {ADMIN_URL} is not reachable: {e} !!!!!!"
                );
                return None;
            }
        };
        let (log_bin, format): (i64, String) = admin
            .query_first("SELECT @@log_bin, @@binlog_format")
            .await
            .unwrap()
            .unwrap();
        if log_bin != 1 || format != "ROW" {
            if ci() {
                panic!(
                    "MariaDB has log_bin={log_bin} binlog_format={format} and CI=true: run .ci/services.sh"
                );
            }
            eprintln!(
                "!!!!!! SKIPPING MariaDB CDC test: log_bin={log_bin} binlog_format={format}, not a row binlog (run .ci/services.sh) !!!!!!"
            );
            return None;
        }
        let id = uuid::Uuid::new_v4();
        let name = format!("weft_cdc_{}", id.simple());
        admin
            .query_drop(format!("CREATE DATABASE `{name}`"))
            .await
            .unwrap();
        let url = format!("mysql://root@127.0.0.1:3306/{name}");
        let mut conn = Conn::from_url(url.as_str()).await.unwrap();
        conn.query_drop("SET time_zone = '+00:00'").await.unwrap();
        // a replica id of its own: the server drops an older connection
        // with the same id
        let server_id = 1_000_000 + (id.as_u128() % 1_000_000_000) as u32;
        Some(TestDb {
            _drop: DropDb(name.clone()),
            name,
            url,
            server_id,
            conn,
        })
    }

    async fn exec(&mut self, sql: &str) {
        self.conn
            .query_drop(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A `mysql_cdc` source on this database, through the real config
    /// loader and registry.
    fn source(&self, extra: &str) -> Box<dyn weft_connectors::Source> {
        let yaml = format!(
            "systems:\n  legacy:\n    source:\n      mysql_cdc:\n        url: {}\n        server_id: {}\n{extra}",
            self.url, self.server_id
        );
        let cfg = weft_core::config::load_str_checked(
            Path::new("/tmp/weft-test/weft.yaml"),
            &yaml,
            &|_| None,
            &weft_connectors::check::check,
        )
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let spec = cfg.systems["legacy"].source.clone().unwrap();
        match build_source("legacy", &spec).unwrap() {
            SourceHandle::Task(t) => t,
            SourceHandle::Routes(_) => panic!("not a task"),
        }
    }
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), weft_connectors::SourceError>>,
}

fn start(src: Box<dyn weft_connectors::Source>, mem: &Arc<Mem>) -> Running {
    let stop = CancellationToken::new();
    let task = tokio::spawn(src.run(mem.clone(), stop.clone()));
    Running { stop, task }
}

impl Running {
    async fn stop(self) -> Result<(), weft_connectors::SourceError> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the source stops")
            .unwrap()
    }
}

async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `(file number, pos, tx_ordinal)` of a change.
fn pos(e: &Value) -> (u64, u64, u64) {
    let file = e["source"]["file"].as_str().unwrap();
    let n = file.rsplit_once('.').unwrap().1.parse().unwrap();
    (
        n,
        e["source"]["pos"].as_u64().unwrap(),
        e["source"]["tx_ordinal"].as_u64().unwrap(),
    )
}

const KINDS: &str = "CREATE TABLE kinds (
    id BIGINT PRIMARY KEY,
    ti TINYINT, tu TINYINT UNSIGNED, si SMALLINT, mi MEDIUMINT, mu MEDIUMINT UNSIGNED,
    i INT, iu INT UNSIGNED, bu BIGINT UNSIGNED,
    dec1 DECIMAL(40,20), dec2 DECIMAL(10,2), f FLOAT, d DOUBLE, b BIT(10), y YEAR,
    dt DATE, dtm DATETIME(6), dts DATETIME, ts TIMESTAMP(6) NULL, tm TIME(3),
    c CHAR(5), vc VARCHAR(50), l1 VARCHAR(20) CHARACTER SET latin1, tx TEXT,
    e ENUM('small','medium','large'), st SET('a','b','c'),
    j JSON, bin VARBINARY(10), bl BLOB, n INT NULL
) ENGINE=InnoDB";

fn full_row(id: i64) -> String {
    format!(
        "INSERT INTO kinds VALUES ({id}, -128, 255, -32768, -8388608, 16777215, -2147483648,
           4294967295, 18446744073709551615, '12345678901234567890.12345678901234567890', 10.50,
           1.5, 2.25, b'1000000001', 2024, '2024-05-01', '2024-05-01 12:00:00.123456',
           '2024-05-01 12:00:00', '2024-05-01 10:00:00.5', '123:45:06.789', 'ab',
           'héllo \"q\"', 'café', 'long text', 'medium', 'c,a', '{{\"x\": [1, null]}}',
           X'00FF10', X'DEADBEEF', NULL)"
    )
}

fn expected_full(id: i64) -> Value {
    json!({
        "id": id, "ti": -128, "tu": 255, "si": -32768, "mi": -8388608, "mu": 16777215,
        "i": -2147483648i64, "iu": 4294967295u64, "bu": u64::MAX,
        "dec1": "12345678901234567890.12345678901234567890", "dec2": "10.50",
        "f": 1.5, "d": 2.25, "b": 513, "y": 2024, "dt": "2024-05-01",
        "dtm": "2024-05-01T12:00:00.123456", "dts": "2024-05-01T12:00:00",
        "ts": "2024-05-01T10:00:00.500Z", "tm": "123:45:06.789", "c": "ab",
        "vc": "héllo \"q\"", "l1": "café", "tx": "long text", "e": "medium", "st": "a,c",
        "j": {"x": [1, null]}, "bin": "AP8Q", "bl": "3q2+7w==", "n": null
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_every_operation_and_column_type() {
    let Some(mut db) = TestDb::new().await else {
        return;
    };
    db.exec(KINDS).await;
    db.exec("CREATE TABLE other (id INT PRIMARY KEY, v TEXT)")
        .await;
    db.exec(&full_row(1)).await;
    let mem = Arc::new(Mem::default());
    let run = start(
        db.source("        tables: [kinds]\n        batch_size: 64\n        heartbeat: 200ms\n"),
        &mem,
    );
    wait_for("the snapshot", 20, || mem.len() == 1 && mem.streaming()).await;
    let snap = &mem.data()[0];
    assert_eq!(snap["op"], "r");
    assert_eq!(snap["source"]["snapshot"], true);
    assert_eq!(snap["key"], json!({"id": 1}));
    assert_eq!(snap["after"], expected_full(1), "the snapshot's row");

    for sql in [
        full_row(2),
        "INSERT INTO other VALUES (1, 'not captured')".into(),
        "INSERT INTO kinds (id, vc) VALUES (3, 'a'), (4, 'b'), (5, 'c')".into(),
        "UPDATE kinds SET vc = 'changed', n = 7 WHERE id = 2".into(),
        "UPDATE kinds SET id = 30 WHERE id = 3".into(),
        "DELETE FROM kinds WHERE id = 4".into(),
        "BEGIN".into(),
        "INSERT INTO kinds (id, vc) SELECT seq, 'bulk' FROM seq_100_to_599".into(),
        "UPDATE other SET v = 'in the same transaction'".into(),
        "COMMIT".into(),
        "ALTER TABLE kinds ADD COLUMN extra INT, DROP COLUMN tx".into(),
        "INSERT INTO kinds (id, extra) VALUES (1000, 7)".into(),
        "TRUNCATE TABLE kinds".into(),
    ] {
        db.exec(&sql).await;
    }
    wait_for("every change", 20, || {
        mem.data().last().is_some_and(|e| e["op"] == "t")
    })
    .await;
    let all = mem.data();
    // 1 snapshot row, 1 + 3 inserts, 2 updates, 1 delete, 500, 1, truncate
    assert_eq!(
        all.len(),
        1 + 4 + 2 + 1 + 500 + 1 + 1,
        "{:#?}",
        &all[..12.min(all.len())]
    );
    assert!(mem.bad.lock().unwrap().is_empty());
    let e = &all[1..];

    let row = &e[0];
    assert_eq!(row["op"], "c");
    assert_eq!(row["before"], Value::Null);
    assert_eq!(row["after"], expected_full(2), "the binlog's row");
    let src = &row["source"];
    assert_eq!(src["table"], "kinds");
    assert_eq!(src["db"], db.name.as_str());
    assert_eq!(src["snapshot"], false);
    assert_eq!(src["tx_ordinal"], 1);
    assert_eq!(src["server_id"], 1);
    assert!(src["file"].as_str().unwrap().starts_with("mysql-bin."));
    let gtid = src["gtid"].as_str().unwrap();
    assert_eq!(gtid.split('-').count(), 3, "a MariaDB GTID: {gtid}");
    assert!(src["ts"].as_str().unwrap().ends_with('Z'));

    // one multi-row statement: one transaction, three positions
    let multi: Vec<_> = e[1..4].iter().map(pos).collect();
    assert!(multi.iter().all(|p| (p.0, p.1) == (multi[0].0, multi[0].1)));
    assert_eq!(multi.iter().map(|p| p.2).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(e[1]["after"]["id"], 3);

    // updates carry the whole old and new rows
    let up = &e[4];
    assert_eq!(up["op"], "u");
    assert_eq!(up["before"], expected_full(2));
    let mut after = expected_full(2);
    after["vc"] = json!("changed");
    after["n"] = json!(7);
    assert_eq!(up["after"], after);
    let rekey = &e[5];
    assert_eq!(rekey["before"]["id"], 3);
    assert_eq!(rekey["after"]["id"], 30);
    assert_eq!(rekey["key"], json!({"id": 30}));
    let del = &e[6];
    assert_eq!(del["op"], "d");
    assert_eq!(del["before"]["id"], 4);
    assert_eq!(del["before"]["vc"], "b");
    assert_eq!(del["after"], Value::Null);
    assert_eq!(del["key"], json!({"id": 4}));

    // a 500-row transaction: one start, ordinals 1..=500, over several batches
    let bulk = &e[7..507];
    assert!(bulk.iter().all(|x| x["after"]["vc"] == "bulk"));
    assert!(
        bulk.iter()
            .all(|x| (pos(x).0, pos(x).1) == (pos(&bulk[0]).0, pos(&bulk[0]).1))
    );
    assert_eq!(
        bulk.iter().map(|x| pos(x).2).collect::<Vec<_>>(),
        (1..=500).collect::<Vec<u64>>()
    );
    assert!(mem.batches.lock().unwrap().iter().all(|n| *n <= 64));

    // DDL mid-stream: the new column is decoded, the dropped one gone
    let ddl = &e[507];
    assert_eq!(ddl["after"]["id"], 1000);
    assert_eq!(ddl["after"]["extra"], 7);
    assert!(ddl["after"].get("tx").is_none(), "{ddl}");
    let tr = &e[508];
    assert_eq!(tr["op"], "t");
    assert_eq!(tr["source"]["table"], "kinds");
    assert_eq!(tr["key"], Value::Null);

    // positions grow strictly across the whole stream
    for w in e.windows(2) {
        assert!(
            pos(&w[0]) < pos(&w[1]),
            "{} then {}",
            w[0]["source"],
            w[1]["source"]
        );
    }
    // the CloudEvents attributes: id by position, subject by key
    let evs = mem.events.lock().unwrap().clone();
    assert_eq!(
        evs[1].subject.as_deref(),
        Some(format!("{}.kinds:2", db.name).as_str())
    );
    assert_eq!(
        evs[1].id,
        format!(
            "{}:{}#1",
            e[0]["source"]["file"].as_str().unwrap(),
            e[0]["source"]["pos"]
        )
    );
    assert_eq!(evs[1].ty, "legacy.change");
    assert!(evs[0].id.starts_with("snapshot@mysql-bin."));

    // the checkpoint is past the last transaction
    let cp = mem.checkpoint();
    assert_eq!(cp["phase"], "stream");
    assert_eq!(cp["ordinal"], 0);
    assert!(
        (
            cp["file"].as_str().unwrap().to_owned(),
            cp["pos"].as_u64().unwrap()
        ) > (
            e[508]["source"]["file"].as_str().unwrap().to_owned(),
            e[508]["source"]["pos"].as_u64().unwrap()
        )
    );
    run.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_exactly_where_the_store_left_off() {
    let Some(mut db) = TestDb::new().await else {
        return;
    };
    db.exec("CREATE TABLE items (id INT PRIMARY KEY, v INT)")
        .await;
    let settings = "        tables: [items]\n        batch_size: 30\n        heartbeat: 200ms\n";
    let mem = Arc::new(Mem::default());
    // the store fails after two batches: the 100-row transaction is split
    // 30 + 30 stored, the rest not
    let run = start(db.source(settings), &mem);
    wait_for("the (empty) snapshot", 20, || mem.streaming()).await;
    let first = mem.batches.lock().unwrap().len();
    *mem.fail_from.lock().unwrap() = Some(first + 2);
    db.exec("INSERT INTO items SELECT seq, 0 FROM seq_1_to_100")
        .await;
    let failed = tokio::time::timeout(Duration::from_secs(20), run.task)
        .await
        .expect("the source stops on a store failure")
        .unwrap();
    assert!(failed.unwrap_err().message.contains("disk on fire"));
    assert_eq!(mem.len(), 60);
    let cp = mem.checkpoint();
    assert_eq!(cp["ordinal"], 60, "{cp}");

    // meanwhile more changes: one statement updating three rows, a delete
    db.exec("UPDATE items SET v = 1 WHERE id <= 3").await;
    db.exec("DELETE FROM items WHERE id = 100").await;
    *mem.fail_from.lock().unwrap() = None;
    let run = start(db.source(settings), &mem);
    wait_for("the rest", 20, || mem.len() == 100 + 4).await;
    // nothing more comes
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = mem.data();
    assert_eq!(all.len(), 104);
    let ids: Vec<i64> = all[..100]
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=100).collect::<Vec<i64>>(),
        "each row once, in order"
    );
    let up: Vec<_> = all[100..103].iter().map(pos).collect();
    assert!(
        all[100..103]
            .iter()
            .all(|e| e["op"] == "u" && e["after"]["v"] == 1 && e["before"]["v"] == 0)
    );
    assert_eq!(up.iter().map(|p| p.2).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(all[103]["op"], "d");
    assert_eq!(all[103]["before"], json!({"id": 100, "v": 0}));

    // a clean stop, changes while stopped, and a column added after them:
    // exactly those after a restart, named by the table map's positions
    run.stop().await.unwrap();
    db.exec("INSERT INTO items VALUES (500, 5), (501, 5)").await;
    db.exec("ALTER TABLE items ADD COLUMN w INT").await;
    db.exec("INSERT INTO items VALUES (502, 5, 9)").await;
    let run = start(db.source(settings), &mem);
    wait_for("the changes made while stopped", 20, || mem.len() == 107).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mem.len(), 107);
    let all = mem.data();
    assert_eq!(all[104]["after"], json!({"id": 500, "v": 5}));
    assert_eq!(all[106]["after"], json!({"id": 502, "v": 5, "w": 9}));
    let mut seen = HashMap::new();
    for e in &all {
        *seen.entry(pos(e)).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "a position delivered twice");
    run.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_binlog_stops_the_source_unless_it_may_snapshot_again() {
    let Some(mut db) = TestDb::new().await else {
        return;
    };
    db.exec("CREATE TABLE items (id INT PRIMARY KEY, v INT)")
        .await;
    db.exec("INSERT INTO items VALUES (1, 1)").await;
    let settings = "        tables: [items]\n        heartbeat: 200ms\n";
    let mem = Arc::new(Mem::default());
    let run = start(db.source(settings), &mem);
    wait_for("the snapshot", 20, || mem.len() == 1 && mem.streaming()).await;
    db.exec("INSERT INTO items VALUES (2, 2)").await;
    wait_for("the insert", 20, || mem.len() == 2).await;
    run.stop().await.unwrap();
    // the binlog file weft would resume from is gone: what a purge leaves
    // (the shared server's own binlogs are not purged by a test: a saved
    // position in a file older than every file it has)
    let cp = mem.checkpoint();
    let file = cp["file"].as_str().unwrap();
    let gone = format!("{}.000000", file.rsplit_once('.').unwrap().0);
    *mem.checkpoint.lock().unwrap() =
        Some(json!({"phase": "stream", "file": gone, "pos": 4, "ordinal": 0}).to_string());
    let run = start(db.source(settings), &mem);
    let err = tokio::time::timeout(Duration::from_secs(20), run.task)
        .await
        .expect("the source stops")
        .unwrap()
        .unwrap_err();
    assert!(
        err.message
            .contains(&format!("`{gone}` is no longer on the server (purged"))
            && err.message.contains("on_position_lost: resnapshot"),
        "{}",
        err.message
    );
    assert_eq!(mem.len(), 2, "nothing read from elsewhere silently");

    let run = start(
        db.source(&format!("{settings}        on_position_lost: resnapshot\n")),
        &mem,
    );
    wait_for("a new snapshot", 20, || mem.len() == 4).await;
    let snap: BTreeMap<i64, Value> = mem.data()[2..]
        .iter()
        .map(|e| (e["after"]["id"].as_i64().unwrap(), e["op"].clone()))
        .collect();
    assert_eq!(snap, BTreeMap::from([(1, json!("r")), (2, json!("r"))]));
    db.exec("INSERT INTO items VALUES (3, 3)").await;
    wait_for("streaming after it", 20, || mem.len() == 5).await;
    assert_eq!(mem.data()[4]["op"], "c");
    run.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_snapshot_the_stream_starts_at_the_binlog_end() {
    let Some(mut db) = TestDb::new().await else {
        return;
    };
    db.exec("CREATE TABLE items (id INT PRIMARY KEY, v INT)")
        .await;
    db.exec("INSERT INTO items VALUES (1, 1)").await;
    let settings = "        tables: [items]\n        snapshot: never\n        heartbeat: 200ms\n";
    let mem = Arc::new(Mem::default());
    let run = start(db.source(settings), &mem);
    // the start position is saved before anything happens
    wait_for("the start position", 20, || mem.streaming()).await;
    db.exec("UPDATE items SET v = 2 WHERE id = 1").await;
    wait_for("the update", 20, || mem.len() == 1).await;
    let e = &mem.data()[0];
    assert_eq!(e["op"], "u");
    assert_eq!(e["before"], json!({"id": 1, "v": 1}));
    assert_eq!(e["after"], json!({"id": 1, "v": 2}));
    // idle heartbeats move the saved position past other tables' changes
    let before = mem.checkpoint();
    db.exec("CREATE TABLE other (id INT PRIMARY KEY)").await;
    db.exec("INSERT INTO other VALUES (1)").await;
    wait_for("the position past them", 20, || mem.checkpoint() != before).await;
    run.stop().await.unwrap();
    assert_eq!(mem.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_a_clear_error() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let mem = Arc::new(Mem::default());
    let run = start(db.source("        tables: [nope]\n"), &mem);
    let err = tokio::time::timeout(Duration::from_secs(20), run.task)
        .await
        .expect("the source stops")
        .unwrap()
        .unwrap_err();
    assert!(
        err.message
            .contains(&format!("table `{}.nope` does not exist", db.name)),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn bad_settings_are_reported_with_their_lines() {
    let yaml = "systems:\n  legacy:\n    source:\n      mysql_cdc:\n        url: postgresql://x\n        tables: [a.b.c]\n        tabels: [x]\n";
    let e = weft_core::config::load_str_checked(
        Path::new("/tmp/weft-test/weft.yaml"),
        yaml,
        &|_| None,
        &weft_connectors::check::check,
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("weft.yaml:7"), "{text}");
    assert!(text.contains("unknown field `tabels`"), "{text}");
    let yaml = "systems:\n  legacy:\n    source:\n      mysql_cdc:\n        url: postgresql://x\n        tables: [a.b.c]\n";
    let text = weft_core::config::load_str_checked(
        Path::new("/tmp/weft-test/weft.yaml"),
        yaml,
        &|_| None,
        &weft_connectors::check::check,
    )
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("weft.yaml:5") && text.contains("expected a `mysql://` URL"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:6") && text.contains("`a.b.c`"),
        "{text}"
    );
}

#[test]
fn the_mariadb_example_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cdc");
    let path = dir.join("mariadb.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    weft_core::config::load_str_checked(&path, &text, &|_| None, &weft_connectors::check::check)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// `(op, table, id)` of a transaction event's changes, in its order.
fn changes(e: &Value) -> Vec<(String, String, i64)> {
    e["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let row = if c["after"].is_null() {
                &c["before"]
            } else {
                &c["after"]
            };
            (
                c["op"].as_str().unwrap().to_owned(),
                c["source"]["table"].as_str().unwrap().to_owned(),
                row["id"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Issue 12: `events: per_transaction` on MariaDB. A transaction of four
/// statements over two tables is one event with its changes in binlog
/// (commit) order, its GTID, `file:pos` and time; the next transaction is
/// the next event; snapshot rows stay one event each; a transaction of
/// `max_transaction_changes` + 1 rows is two parts; a store failure between
/// two parts of a bigger one resumes at the next part with the ids it would
/// have had, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_transaction_events_hold_a_transaction_in_commit_order_and_split_at_the_limit() {
    let Some(mut db) = TestDb::new().await else {
        return;
    };
    db.exec("CREATE TABLE parent (id INT PRIMARY KEY, name TEXT) ENGINE=InnoDB")
        .await;
    db.exec(
        "CREATE TABLE child (id INT PRIMARY KEY, parent_id INT, qty INT, \
         FOREIGN KEY (parent_id) REFERENCES parent (id)) ENGINE=InnoDB",
    )
    .await;
    db.exec("INSERT INTO parent VALUES (2, 'old')").await;
    let settings = "        tables: [parent, child]\n        events: per_transaction\n        \
                    max_transaction_changes: 5\n        batch_size: 3\n        heartbeat: 200ms\n";
    let mem = Arc::new(Mem::default());
    let run = start(db.source(settings), &mem);
    wait_for("the snapshot", 20, || mem.len() == 1 && mem.streaming()).await;
    {
        let evs = mem.events.lock().unwrap();
        assert_eq!(evs[0].data["op"], "r", "a snapshot row is its own event");
        assert!(evs[0].id.starts_with("snapshot@"), "{}", evs[0].id);
    }
    for sql in [
        "BEGIN",
        "INSERT INTO parent VALUES (1, 'a')",
        "INSERT INTO child VALUES (10, 1, 1)",
        "UPDATE child SET qty = 2 WHERE id = 10",
        "DELETE FROM parent WHERE id = 2",
        "COMMIT",
    ] {
        db.exec(sql).await;
    }
    db.exec("UPDATE parent SET name = 'b' WHERE id = 1").await;
    wait_for("two transaction events", 20, || mem.len() == 3).await;
    let evs: Vec<Event> = mem.events.lock().unwrap().clone();
    let a = &evs[1];
    assert_eq!(a.ty, "legacy.transaction");
    assert_eq!(a.subject.as_deref(), Some("legacy"));
    let d = &a.data;
    assert_eq!(
        changes(d),
        [
            ("c".to_owned(), "parent".to_owned(), 1),
            ("c".to_owned(), "child".to_owned(), 10),
            ("u".to_owned(), "child".to_owned(), 10),
            ("d".to_owned(), "parent".to_owned(), 2),
        ],
        "{d}"
    );
    assert_eq!(
        (d["part"].clone(), d["last"].clone()),
        (json!(1), json!(true))
    );
    let at = format!("{}:{}", d["file"].as_str().unwrap(), d["pos"]);
    assert_eq!(a.id, format!("txn@{at}#1"));
    assert!(
        d["gtid"]
            .as_str()
            .is_some_and(|g| g.split('-').count() == 3),
        "{d}"
    );
    assert!(d["ts"].is_string(), "{d}");
    for (i, ch) in d["changes"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ch["source"]["tx_ordinal"], i as u64 + 1);
        assert_eq!(ch["source"]["file"], d["file"]);
        assert_eq!(ch["source"]["pos"], d["pos"]);
        assert_eq!(ch["source"]["gtid"], d["gtid"]);
        assert_eq!(ch["source"]["db"], db.name.as_str());
    }
    assert_eq!(d["changes"][2]["before"]["qty"], 1);
    assert_eq!(d["changes"][2]["after"]["qty"], 2);
    let b = &evs[2].data;
    assert_eq!(changes(b), [("u".to_owned(), "parent".to_owned(), 1)]);
    assert_ne!(b["gtid"], d["gtid"]);

    // the limit + 1: two parts of one transaction
    db.exec("INSERT INTO child SELECT seq, 1, 0 FROM seq_100_to_105")
        .await;
    wait_for("two parts", 20, || mem.len() == 5).await;
    let evs: Vec<Event> = mem.events.lock().unwrap().clone();
    let (p1, p2) = (&evs[3].data, &evs[4].data);
    assert_eq!((&p1["file"], &p1["pos"]), (&p2["file"], &p2["pos"]));
    assert_eq!(
        (p1["part"].clone(), p1["last"].clone()),
        (json!(1), json!(false))
    );
    assert_eq!(
        (p2["part"].clone(), p2["last"].clone()),
        (json!(2), json!(true))
    );
    let ids: Vec<i64> = changes(p1)
        .iter()
        .chain(&changes(p2))
        .map(|c| c.2)
        .collect();
    assert_eq!(ids, (100..=105).collect::<Vec<_>>());
    let at = format!("{}:{}", p1["file"].as_str().unwrap(), p1["pos"]);
    assert_eq!(evs[3].id, format!("txn@{at}#1"));
    assert_eq!(evs[4].id, format!("txn@{at}#2"));
    assert_eq!(p2["changes"][0]["source"]["tx_ordinal"], 6);

    // 11 rows: parts 1, 2, 3; the store fails at part 2
    let before = mem.len();
    *mem.fail_on.lock().unwrap() = Some("#2".into());
    db.exec("INSERT INTO child SELECT seq, 1, 0 FROM seq_200_to_210")
        .await;
    let failed = tokio::time::timeout(Duration::from_secs(20), run.task)
        .await
        .expect("the source stops on a store failure")
        .unwrap();
    assert!(failed.unwrap_err().message.contains("disk on fire"));
    assert_eq!(mem.len(), before + 1, "part 1 stored, part 2 not");
    let cp = mem.checkpoint();
    assert_eq!(cp["ordinal"], 5, "{cp}");
    let big = mem.events.lock().unwrap()[before].id.clone();
    let big = big.trim_end_matches("#1").to_owned();
    *mem.fail_on.lock().unwrap() = None;
    let run = start(db.source(settings), &mem);
    wait_for("parts 2 and 3", 20, || mem.len() == before + 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mem.len(), before + 3, "nothing more");
    let evs: Vec<Event> = mem.events.lock().unwrap().clone();
    let ids: Vec<&str> = evs[before..].iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        [format!("{big}#1"), format!("{big}#2"), format!("{big}#3")]
    );
    let rows: Vec<i64> = evs[before..]
        .iter()
        .flat_map(|e| changes(&e.data))
        .map(|c| c.2)
        .collect();
    assert_eq!(
        rows,
        (200..=210).collect::<Vec<_>>(),
        "each row once, in order"
    );
    assert_eq!(evs[before + 2].data["last"], true);
    let all: Vec<String> = evs.iter().map(|e| e.id.clone()).collect();
    let unique: std::collections::HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "an event id twice: {all:?}");
    run.stop().await.unwrap();
}

/// `events` and `max_transaction_changes` are checked at load, with the
/// file, line and column of the value (what `weft validate` prints).
#[test]
fn bad_event_modes_and_limits_are_reported_with_their_lines() {
    let load = |body: &str| {
        let yaml = format!(
            "systems:\n  legacy:\n    source:\n      mysql_cdc:\n        url: mysql://u@127.0.0.1/db\n        tables: [t]\n{body}"
        );
        weft_core::config::load_str_checked(
            Path::new("/tmp/weft-test/weft.yaml"),
            &yaml,
            &|_| None,
            &weft_connectors::check::check,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let text = load("        events: per_statement\n");
    assert!(text.contains("weft.yaml:7:"), "{text}");
    assert!(text.contains("source.mysql_cdc.events"), "{text}");
    assert!(text.contains("per_transaction"), "{text}");
    let text = load("        events: per_transaction\n        max_transaction_changes: 0\n");
    assert!(text.contains("weft.yaml:8:"), "{text}");
    assert!(text.contains("max_transaction_changes"), "{text}");
    assert!(text.contains("greater than 0"), "{text}");
}
