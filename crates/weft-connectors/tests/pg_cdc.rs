#![cfg(feature = "cdc-postgres")]
//! The PostgreSQL CDC source against the real PostgreSQL on 127.0.0.1:5432
//! (user postgres, trust; `wal_level = logical`, which `.ci/services.sh`
//! sets). Each test makes its own database, publication and slot and drops
//! them at the end. Skipped with a message when PostgreSQL is not reachable
//! or not logical, unless `CI=true`, where that is a failure.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use weft_connectors::cdc::postgres::CHECKPOINT_KEY;
use weft_connectors::{Batch, Ingest, IngestError, Receipt, Record, SourceHandle, build_source};
use weft_core::Event;

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

const ADMIN_URL: &str = "postgresql://postgres@127.0.0.1:5432/postgres";

/// An in-memory store that keeps every event it is given (no dedupe: a
/// duplicate would show), the checkpoint, and can fail from a given batch on.
#[derive(Default)]
struct Mem {
    events: Mutex<Vec<Event>>,
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
                    Record::Bad(b) => panic!("a bad record: {}", b.error),
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
}

async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

/// Drops a test database and its slots when dropped, also when the test
/// panics (a slot left behind would hold the shared server's WAL forever).
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
                let Ok((c, conn)) = tokio_postgres::connect(ADMIN_URL, NoTls).await else {
                    return;
                };
                tokio::spawn(conn);
                let deadline = Instant::now() + Duration::from_secs(15);
                loop {
                    let _ = c
                        .query(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                             WHERE database = $1 AND active_pid IS NOT NULL",
                            &[&name],
                        )
                        .await;
                    let _ = c
                        .query(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                             WHERE database = $1 AND NOT active",
                            &[&name],
                        )
                        .await;
                    let left = c
                        .query_one(
                            "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                            &[&name],
                        )
                        .await
                        .map(|r| r.get::<_, i64>(0))
                        .unwrap_or(0);
                    if left == 0 || Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Err(e) = c
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                {
                    eprintln!("cannot drop test database {name}: {e}");
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A database of its own, dropped with its slots at the end (or on a panic).
struct TestDb {
    name: String,
    url: String,
    admin: Client,
    client: Client,
    _drop: DropDb,
}

impl TestDb {
    async fn new() -> Option<TestDb> {
        // the source's log in the test's output (shown when it fails)
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,pg_walstream=warn")
            .with_test_writer()
            .try_init();
        let admin = match tokio_postgres::connect(ADMIN_URL, NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                c
            }
            Err(e) => {
                if ci() {
                    panic!("PostgreSQL at {ADMIN_URL} is not reachable and CI=true: {e}");
                }
                eprintln!(
                    "!!!!!! SKIPPING PostgreSQL CDC test: {ADMIN_URL} is not reachable: {e} !!!!!!"
                );
                return None;
            }
        };
        let level: String = admin.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
        if level != "logical" {
            if ci() {
                panic!("PostgreSQL has wal_level={level} and CI=true: run .ci/services.sh");
            }
            eprintln!(
                "!!!!!! SKIPPING PostgreSQL CDC test: wal_level={level}, not logical (run .ci/services.sh) !!!!!!"
            );
            return None;
        }
        let name = format!("weft_cdc_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = format!("postgresql://postgres@127.0.0.1:5432/{name}");
        let client = connect(&url).await;
        Some(TestDb {
            _drop: DropDb(name.clone()),
            name,
            url,
            admin,
            client,
        })
    }

    /// Drop the database and its slots.
    async fn drop_all(self) {
        drop(self.client);
        let TestDb { _drop, .. } = self;
        tokio::task::spawn_blocking(move || drop(_drop))
            .await
            .unwrap();
    }

    /// A `postgres_cdc` source on this database, through the real config
    /// loader and registry.
    /// (Slot names are the cluster's: each test's default is its database's.)
    fn source(&self, extra: &str) -> Box<dyn weft_connectors::Source> {
        let slot = if extra.contains("slot:") {
            String::new()
        } else {
            format!("        slot: {}\n", self.name)
        };
        let yaml = format!(
            "systems:\n  legacy:\n    source:\n      postgres_cdc:\n        url: {}\n{slot}{extra}",
            self.url
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

    async fn slot_flush(&self, slot: &str) -> Option<String> {
        self.admin
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .and_then(|r| r.get(0))
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

/// Random hex text that does not compress: stored out of line (TOAST).
const BIG: &str = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 300))";

fn lsn(v: &Value) -> u64 {
    let s = v.as_str().unwrap();
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn pos(e: &Value) -> (u64, u64) {
    (
        lsn(&e["source"]["commit_lsn"]),
        e["source"]["tx_ordinal"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_every_operation_and_column_type() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    db.client
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE DOMAIN amount AS numeric(12,2);
             CREATE TABLE kinds (id bigint PRIMARY KEY, n numeric(40,20), f float8, amt amount,
               ok boolean, t text, tz timestamptz, ts timestamp, d date, ia int[], ta text[],
               ma mood[], j json, jb jsonb, u uuid, b bytea, m mood, big text);
             CREATE TABLE full_rows (id int PRIMARY KEY, v text, big text);
             ALTER TABLE full_rows REPLICA IDENTITY FULL;
             INSERT INTO kinds (id, t) VALUES (1, 'before the snapshot');",
        )
        .await
        .unwrap();
    let mem = Arc::new(Mem::default());
    let run = start(
        db.source("        tables: [kinds, public.full_rows]\n        batch_size: 64\n        heartbeat: 200ms\n"),
        &mem,
    );
    wait_for("the snapshot", 20, || mem.len() == 1).await;
    let snap = &mem.data()[0];
    assert_eq!(snap["op"], "r");
    assert_eq!(snap["after"]["t"], "before the snapshot");
    assert_eq!(snap["source"]["snapshot"], true);
    assert_eq!(snap["key"], json!({"id": 1}));

    let insert = format!(
        r#"INSERT INTO kinds VALUES (2, '12345678901234567890.12345678901234567890', 1.5, 10.25,
             true, 'héllo "q"', '2024-05-01 12:00:00.123456+02', '2024-05-01 12:00:00.5',
             '2024-05-01', '{{1,NULL,3}}', '{{"a b","c\"d"}}', '{{sad,happy}}', '{{"x": 1}}',
             '{{"y": [true, null]}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x00ff10', 'happy',
             {BIG})"#
    );
    let full = format!("INSERT INTO full_rows VALUES (1, 'v1', {BIG})");
    // each its own transaction (one simple query with several statements is one)
    for sql in [
        insert.as_str(),
        "INSERT INTO kinds (id, t) VALUES (3, 'a'), (4, 'b'), (5, 'c')",
        "UPDATE kinds SET t = 'changed' WHERE id = 2",
        "UPDATE kinds SET id = 30 WHERE id = 3",
        "DELETE FROM kinds WHERE id = 4",
        full.as_str(),
        "UPDATE full_rows SET v = 'v2' WHERE id = 1",
        "DELETE FROM full_rows WHERE id = 1",
        "BEGIN; INSERT INTO kinds (id, t) SELECT g, 'bulk' FROM generate_series(100, 599) g; COMMIT",
        "ALTER TABLE kinds ADD COLUMN extra int",
        "INSERT INTO kinds (id, extra) VALUES (1000, 7)",
        "TRUNCATE kinds",
    ] {
        db.client.batch_execute(sql).await.unwrap();
    }
    wait_for("every change", 20, || {
        mem.data().last().is_some_and(|e| e["op"] == "t")
    })
    .await;
    let all = mem.data();
    // 1 snapshot row, 1 + 3 inserts, 2 updates, 1 delete, 3 of full_rows, 500, 1, truncate
    assert_eq!(
        all.len(),
        1 + 4 + 2 + 1 + 3 + 500 + 1 + 1,
        "{:#?}",
        &all[..12.min(all.len())]
    );
    let e = &all[1..];

    let row = &e[0];
    assert_eq!(row["op"], "c");
    assert_eq!(row["before"], Value::Null);
    let a = &row["after"];
    assert_eq!(a["id"], 2);
    assert_eq!(a["n"], "12345678901234567890.12345678901234567890");
    assert_eq!(a["f"], 1.5);
    assert_eq!(a["amt"], "10.25");
    assert_eq!(a["ok"], true);
    assert_eq!(a["t"], "héllo \"q\"");
    assert_eq!(a["tz"], "2024-05-01T10:00:00.123456Z");
    assert_eq!(a["ts"], "2024-05-01T12:00:00.500");
    assert_eq!(a["d"], "2024-05-01");
    assert_eq!(a["ia"], json!([1, null, 3]));
    assert_eq!(a["ta"], json!(["a b", "c\"d"]));
    assert_eq!(a["ma"], json!(["sad", "happy"]));
    assert_eq!(a["j"], json!({"x": 1}));
    assert_eq!(a["jb"], json!({"y": [true, null]}));
    assert_eq!(a["u"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(a["b"], "AP8Q");
    assert_eq!(a["m"], "happy");
    assert_eq!(a["big"].as_str().unwrap().len(), 9600);
    let src = &row["source"];
    assert_eq!(src["table"], "kinds");
    assert_eq!(src["schema"], "public");
    assert_eq!(src["db"], db.name.as_str());
    assert_eq!(src["snapshot"], false);
    assert_eq!(src["tx_ordinal"], 1);
    assert!(src["xid"].as_u64().unwrap() > 0);
    assert!(src["commit_time"].as_str().unwrap().ends_with('Z'));

    // one multi-row statement: one transaction, three positions
    let multi: Vec<(u64, u64)> = e[1..4].iter().map(pos).collect();
    assert!(multi.iter().all(|p| p.0 == multi[0].0));
    assert_eq!(multi.iter().map(|p| p.1).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(e[1]["after"]["id"], 3);

    // an update leaves the untouched TOASTed column out and says so
    let up = &e[4];
    assert_eq!(up["op"], "u");
    assert_eq!(up["after"]["t"], "changed");
    assert!(up["after"].get("big").is_none(), "{up}");
    assert_eq!(up["unchanged_toast"], json!(["big"]));
    assert_eq!(up["before"], Value::Null);
    // a key change shows the old key (only what the replica identity has)
    let rekey = &e[5];
    assert_eq!(rekey["before"], json!({"id": 3}));
    assert_eq!(rekey["after"]["id"], 30);
    assert_eq!(rekey["key"], json!({"id": 30}));
    let del = &e[6];
    assert_eq!(del["op"], "d");
    assert_eq!(del["before"], json!({"id": 4}));
    assert_eq!(del["after"], Value::Null);
    assert_eq!(del["key"], json!({"id": 4}));

    // REPLICA IDENTITY FULL: whole old rows, and TOAST taken from them
    let (fi, fu, fd) = (&e[7], &e[8], &e[9]);
    assert_eq!(fi["source"]["table"], "full_rows");
    let big = fi["after"]["big"].as_str().unwrap();
    assert_eq!(fu["before"]["v"], "v1");
    assert_eq!(fu["before"]["big"], big);
    assert_eq!(fu["after"]["v"], "v2");
    assert_eq!(fu["after"]["big"], big);
    assert!(fu.get("unchanged_toast").is_none(), "{fu}");
    assert_eq!(fd["before"]["v"], "v2");
    assert_eq!(fd["before"]["big"], big);

    // a 500-row transaction: one commit LSN, ordinals 1..=500, over several batches
    let bulk = &e[10..510];
    assert!(bulk.iter().all(|x| x["after"]["t"] == "bulk"));
    assert!(bulk.iter().all(|x| pos(x).0 == pos(&bulk[0]).0));
    assert_eq!(
        bulk.iter().map(|x| pos(x).1).collect::<Vec<_>>(),
        (1..=500).collect::<Vec<u64>>()
    );
    assert!(mem.batches.lock().unwrap().iter().all(|n| *n <= 64));

    // DDL mid-stream: the new column is decoded
    let ddl = &e[510];
    assert_eq!(ddl["after"]["id"], 1000);
    assert_eq!(ddl["after"]["extra"], 7);
    let tr = &e[511];
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
    assert_eq!(evs[1].subject.as_deref(), Some("public.kinds:2"));
    assert_eq!(
        evs[1].id,
        format!("{}#1", e[0]["source"]["commit_lsn"].as_str().unwrap())
    );
    assert_eq!(evs[1].ty, "legacy.change");
    assert!(evs[0].id.starts_with("snapshot@"));

    // the checkpoint is the last transaction's end, and the slot confirms it
    let cp = mem.checkpoint();
    assert_eq!(cp["phase"], "stream");
    assert_eq!(cp["slot"], db.name.as_str());
    let flush = cp["flush_lsn"].clone();
    assert!(lsn(&flush) > pos(&e[511]).0);
    run.stop().await.unwrap();
    // the walsender takes the last confirmation in a moment
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let confirmed = db.slot_flush(&db.name).await.unwrap();
        if lsn(&json!(confirmed)) >= lsn(&flush) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot confirms {confirmed}, weft stored up to {flush}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_exactly_where_the_store_left_off() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    db.client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, v int)")
        .await
        .unwrap();
    let settings = "        tables: [items]\n        batch_size: 30\n        heartbeat: 200ms\n";
    let mem = Arc::new(Mem::default());
    // the store fails after two batches: the 100-row transaction is split
    // 30 + 30 stored, the rest not
    let run = start(db.source(settings), &mem);
    wait_for("the (empty) snapshot", 20, || {
        mem.checkpoint
            .lock()
            .unwrap()
            .as_deref()
            .is_some_and(|c| c.contains("stream"))
    })
    .await;
    let first = mem.batches.lock().unwrap().len();
    *mem.fail_from.lock().unwrap() = Some(first + 2);
    db.client
        .batch_execute("INSERT INTO items SELECT g, 0 FROM generate_series(1, 100) g")
        .await
        .unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(20), run.task)
        .await
        .expect("the source stops on a store failure")
        .unwrap();
    assert!(failed.unwrap_err().message.contains("disk on fire"));
    assert_eq!(mem.len(), 60);
    let cp = mem.checkpoint();
    assert_eq!(cp["ordinal"], 60, "{cp}");

    // meanwhile more changes: one statement updating three rows, a delete
    db.client
        .batch_execute("UPDATE items SET v = 1 WHERE id <= 3")
        .await
        .unwrap();
    db.client
        .batch_execute("DELETE FROM items WHERE id = 100")
        .await
        .unwrap();
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
    let up: Vec<(u64, u64)> = all[100..103].iter().map(pos).collect();
    assert!(
        all[100..103]
            .iter()
            .all(|e| e["op"] == "u" && e["after"]["v"] == 1)
    );
    assert_eq!(up.iter().map(|p| p.1).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(all[103]["op"], "d");
    assert_eq!(all[103]["before"], json!({"id": 100}));

    // a clean stop and changes while stopped: exactly those after a restart
    run.stop().await.unwrap();
    db.client
        .batch_execute("INSERT INTO items VALUES (500, 5), (501, 5)")
        .await
        .unwrap();
    let run = start(db.source(settings), &mem);
    wait_for("the changes made while stopped", 20, || mem.len() == 106).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mem.len(), 106);
    let mut seen = HashMap::new();
    for e in mem.data() {
        *seen.entry(pos(&e)).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "a position delivered twice");
    run.stop().await.unwrap();
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_stops_the_source_unless_it_may_snapshot_again() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    db.client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v int); INSERT INTO items VALUES (1, 1)",
        )
        .await
        .unwrap();
    let slot = format!("{}_lost", db.name);
    let settings =
        format!("        tables: [items]\n        slot: {slot}\n        heartbeat: 200ms\n");
    let settings = settings.as_str();
    let mem = Arc::new(Mem::default());
    let run = start(db.source(settings), &mem);
    wait_for("the snapshot", 20, || mem.len() == 1).await;
    db.client
        .batch_execute("INSERT INTO items VALUES (2, 2)")
        .await
        .unwrap();
    wait_for("the insert", 20, || mem.len() == 2).await;
    run.stop().await.unwrap();
    // the slot goes away behind weft's back
    // (once the stopped session's walsender let go of it)
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = db
        .admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
    {
        assert!(Instant::now() < deadline, "cannot drop the slot: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = start(db.source(settings), &mem);
    let err = tokio::time::timeout(Duration::from_secs(20), run.task)
        .await
        .expect("the source stops")
        .unwrap()
        .unwrap_err();
    assert!(
        err.message.contains(&format!("`{slot}` does not exist"))
            && err.message.contains("on_slot_lost: resnapshot"),
        "{}",
        err.message
    );
    assert_eq!(mem.len(), 2, "nothing read from a new slot silently");

    let run = start(
        db.source(&format!("{settings}        on_slot_lost: resnapshot\n")),
        &mem,
    );
    wait_for("a new snapshot", 20, || mem.len() == 4).await;
    let snap: BTreeMap<i64, Value> = mem.data()[2..]
        .iter()
        .map(|e| (e["after"]["id"].as_i64().unwrap(), e["op"].clone()))
        .collect();
    assert_eq!(snap, BTreeMap::from([(1, json!("r")), (2, json!("r"))]));
    db.client
        .batch_execute("INSERT INTO items VALUES (3, 3)")
        .await
        .unwrap();
    wait_for("streaming after it", 20, || mem.len() == 5).await;
    run.stop().await.unwrap();
    db.drop_all().await;
}

#[tokio::test]
async fn bad_settings_are_reported_with_their_lines() {
    let yaml = "systems:\n  legacy:\n    source:\n      postgres_cdc:\n        url: mysql://x\n        slot: Bad\n        tabels: [x]\n";
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
    let yaml = "systems:\n  legacy:\n    source:\n      postgres_cdc:\n        url: mysql://x\n        slot: Bad\n";
    let text = weft_core::config::load_str_checked(
        Path::new("/tmp/weft-test/weft.yaml"),
        yaml,
        &|_| None,
        &weft_connectors::check::check,
    )
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("weft.yaml:5") && text.contains("expected a `postgresql://` URL"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:6") && text.contains("`Bad`"),
        "{text}"
    );
}

impl Mem {
    fn ids(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.id.clone())
            .collect()
    }
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

/// Issue 12: `events: per_transaction`. A transaction of four statements
/// over two tables is one event with its changes in commit order and its
/// metadata; the next transaction is the next event; snapshot rows stay
/// one event each; a transaction of `max_transaction_changes` + 1 rows is
/// two parts; a store failure between two parts of a bigger one resumes
/// at the next part with the ids it would have had, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_transaction_events_hold_a_transaction_in_commit_order_and_split_at_the_limit() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    db.client
        .batch_execute(
            "CREATE TABLE parent (id int PRIMARY KEY, name text);
             CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent, qty int);
             INSERT INTO parent VALUES (2, 'old');",
        )
        .await
        .unwrap();
    let settings = "        tables: [parent, child]\n        events: per_transaction\n        \
                    max_transaction_changes: 5\n        batch_size: 3\n        heartbeat: 200ms\n";
    let mem = Arc::new(Mem::default());
    let run = start(db.source(settings), &mem);
    wait_for("the snapshot", 20, || mem.len() == 1).await;
    {
        let evs = mem.events.lock().unwrap();
        assert_eq!(evs[0].data["op"], "r", "a snapshot row is its own event");
        assert!(evs[0].id.starts_with("snapshot@"), "{}", evs[0].id);
    }
    let mut c = connect(&db.url).await;
    let t = c.transaction().await.unwrap();
    let xid: i64 = t
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .unwrap()
        .get(0);
    t.batch_execute(
        "INSERT INTO parent VALUES (1, 'a');
         INSERT INTO child VALUES (10, 1, 1);
         UPDATE child SET qty = 2 WHERE id = 10;
         DELETE FROM parent WHERE id = 2;",
    )
    .await
    .unwrap();
    t.commit().await.unwrap();
    c.batch_execute("UPDATE parent SET name = 'b' WHERE id = 1")
        .await
        .unwrap();
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
    assert_eq!(d["xid"], xid % (1 << 32));
    assert_eq!(d["db"], db.name.as_str());
    assert_eq!(
        (d["part"].clone(), d["last"].clone()),
        (json!(1), json!(true))
    );
    assert_eq!(a.id, format!("txn@{}#1", d["commit_lsn"].as_str().unwrap()));
    let time = chrono::DateTime::parse_from_rfc3339(d["commit_time"].as_str().unwrap()).unwrap();
    assert_eq!(a.time, time);
    for (i, ch) in d["changes"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ch["source"]["tx_ordinal"], i as u64 + 1);
        assert_eq!(ch["source"]["commit_lsn"], d["commit_lsn"]);
        assert_eq!(ch["source"]["xid"], d["xid"]);
        assert_eq!(ch["source"]["schema"], "public");
    }
    assert_eq!(d["changes"][2]["before"], Value::Null);
    assert_eq!(d["changes"][2]["after"]["qty"], 2);
    let b = &evs[2].data;
    assert_eq!(changes(b), [("u".to_owned(), "parent".to_owned(), 1)]);
    assert!(lsn(&b["commit_lsn"]) > lsn(&d["commit_lsn"]));

    // the limit + 1: two parts of one transaction
    c.batch_execute("INSERT INTO child SELECT g, 1, 0 FROM generate_series(100, 105) g")
        .await
        .unwrap();
    wait_for("two parts", 20, || mem.len() == 5).await;
    let evs: Vec<Event> = mem.events.lock().unwrap().clone();
    let (p1, p2) = (&evs[3].data, &evs[4].data);
    assert_eq!(p1["commit_lsn"], p2["commit_lsn"]);
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
    let lsn_text = p1["commit_lsn"].as_str().unwrap();
    assert_eq!(evs[3].id, format!("txn@{lsn_text}#1"));
    assert_eq!(evs[4].id, format!("txn@{lsn_text}#2"));
    assert_eq!(p2["changes"][0]["source"]["tx_ordinal"], 6);

    // 11 rows: parts 1, 2, 3; the store fails at part 2
    let before = mem.len();
    *mem.fail_on.lock().unwrap() = Some("#2".into());
    c.batch_execute("INSERT INTO child SELECT g, 1, 0 FROM generate_series(200, 210) g")
        .await
        .unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(20), run.task)
        .await
        .expect("the source stops on a store failure")
        .unwrap();
    assert!(failed.unwrap_err().message.contains("disk on fire"));
    assert_eq!(mem.len(), before + 1, "part 1 stored, part 2 not");
    let big = mem.events.lock().unwrap()[before].data["commit_lsn"]
        .as_str()
        .unwrap()
        .to_owned();
    let cp = mem.checkpoint();
    assert_eq!(cp["ordinal"], 5, "{cp}");
    *mem.fail_on.lock().unwrap() = None;
    let run = start(db.source(settings), &mem);
    wait_for("parts 2 and 3", 20, || mem.len() == before + 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mem.len(), before + 3, "nothing more");
    let evs: Vec<Event> = mem.events.lock().unwrap().clone();
    let ids: Vec<&str> = evs[before..].iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            format!("txn@{big}#1"),
            format!("txn@{big}#2"),
            format!("txn@{big}#3")
        ]
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
    let all = mem.ids();
    let unique: std::collections::HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "an event id twice: {all:?}");
    run.stop().await.unwrap();
    db.drop_all().await;
}

/// `events` and `max_transaction_changes` are checked at load, with the
/// file, line and column of the value (what `weft validate` prints).
#[test]
fn bad_event_modes_and_limits_are_reported_with_their_lines() {
    let load = |body: &str| {
        let yaml = format!(
            "systems:\n  legacy:\n    source:\n      postgres_cdc:\n        url: postgresql://u@127.0.0.1/db\n{body}"
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
    assert!(text.contains("weft.yaml:6:"), "{text}");
    assert!(text.contains("source.postgres_cdc.events"), "{text}");
    assert!(text.contains("per_transaction"), "{text}");
    let text = load("        events: per_transaction\n        max_transaction_changes: 0\n");
    assert!(text.contains("weft.yaml:7:"), "{text}");
    assert!(text.contains("max_transaction_changes"), "{text}");
    assert!(text.contains("greater than 0"), "{text}");
}
