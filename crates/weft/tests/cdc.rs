//! Guarantee: PostgreSQL changes read by CDC reach the destination exactly
//! once per change (one idempotency key per `(commit_lsn, tx_ordinal)`,
//! every change of every committed transaction, nothing of a rolled-back
//! one) and in order per key, while `weft` is SIGKILLed and restarted
//! several times mid-stream under concurrent writers.
//!
//! The real PostgreSQL on 127.0.0.1:5432 (`wal_level = logical`, which
//! `.ci/services.sh` sets), a database, publication and slot of the test's
//! own (dropped at the end), the real `weft` binary writing a JSON Lines file
//! with the envelope (the idempotency key beside each payload). Four writer
//! tasks make transactions of 1 to 5 statements (single and multi-row
//! inserts, updates, deletes; some rolled back), each noting its
//! transaction id and how many rows it changed: that is the truth the file
//! is checked against. Skipped with a message when PostgreSQL is not
//! reachable or not logical, unless `CI=true`, where that is a failure.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio_postgres::NoTls;

const ADMIN_URL: &str = "postgresql://postgres@127.0.0.1:5432/postgres";
const WRITERS: i32 = 4;
const TXS_PER_WRITER: i32 = 230;
const SEEDED: i32 = 40;
const LOG: &[(&str, &str)] = &[(
    "WEFT_LOG",
    "info,pg_walstream=warn,weft_connectors::cdc=debug",
)];

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

/// One writer: transactions over its own ids, each noted as
/// `(xid mod 2^32, rows changed)` when committed.
async fn writer(url: String, w: i32, txs: i32, done: Arc<Mutex<Vec<(u32, u64)>>>) {
    let mut c = client(&url).await;
    let mut next_id = 1000 * (w + 1);
    let mut live: Vec<i32> = Vec::new();
    let mut seed = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for i in 0..txs {
        let tx = c.transaction().await.unwrap();
        let xid: i64 = tx
            .query_one(
                "SELECT (pg_current_xact_id()::text::int8 % 4294967296)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let mut rows = 0u64;
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for _ in 0..=rand(4) {
            match rand(5) {
                0 | 1 => {
                    next_id += 1;
                    rows += tx
                        .execute(
                            "INSERT INTO items (id, v, note) VALUES ($1, 0, 'new')",
                            &[&next_id],
                        )
                        .await
                        .unwrap();
                    added.push(next_id);
                }
                2 => {
                    // one statement, three rows: three changes sharing a statement
                    let ids = [next_id + 1, next_id + 2, next_id + 3];
                    next_id += 3;
                    rows += tx
                        .execute(
                            "INSERT INTO items (id, v, note) VALUES ($1, 0, 'multi'), ($2, 0, 'multi'), ($3, 0, 'multi')",
                            &[&ids[0], &ids[1], &ids[2]],
                        )
                        .await
                        .unwrap();
                    added.extend(ids);
                }
                3 if !live.is_empty() => {
                    let id = live[rand(live.len() as u64) as usize];
                    rows += tx
                        .execute("UPDATE items SET v = v + 1 WHERE id = $1", &[&id])
                        .await
                        .unwrap();
                }
                4 if live.len() > 5 => {
                    let id = live.swap_remove(rand(live.len() as u64) as usize);
                    removed.push(id);
                    rows += tx
                        .execute("DELETE FROM items WHERE id = $1", &[&id])
                        .await
                        .unwrap();
                }
                _ => {
                    rows += tx
                        .execute("UPDATE items SET v = v + 1 WHERE id = $1", &[&(w + 1)])
                        .await
                        .unwrap();
                }
            }
        }
        if i % 17 == 5 {
            tx.rollback().await.unwrap();
            live.extend(removed);
        } else {
            tx.commit().await.unwrap();
            live.extend(added);
            done.lock().unwrap().push((xid as u32, rows));
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
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

fn lsn(v: &Value) -> u64 {
    let s = v.as_str().unwrap();
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[test]
fn cdc_exactly_once_and_in_order_per_key_across_sigkills() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin = match rt.block_on(tokio_postgres::connect(ADMIN_URL, NoTls)) {
        Ok((c, conn)) => {
            rt.spawn(conn);
            c
        }
        Err(e) => {
            if ci() {
                panic!("PostgreSQL at {ADMIN_URL} is not reachable and CI=true: {e}");
            }
            eprintln!("!!!!!! SKIPPING CDC crash test: {ADMIN_URL} is not reachable: {e} !!!!!!");
            return;
        }
    };
    let level: String = rt
        .block_on(admin.query_one("SHOW wal_level", &[]))
        .unwrap()
        .get(0);
    if level != "logical" {
        if ci() {
            panic!("PostgreSQL has wal_level={level} and CI=true: run .ci/services.sh");
        }
        eprintln!("!!!!!! SKIPPING CDC crash test: wal_level={level} (run .ci/services.sh) !!!!!!");
        return;
    }
    let started = Instant::now();
    let db = format!("weft_cdc_e2e_{}", &unique_suffix());
    rt.block_on(admin.batch_execute(&format!("CREATE DATABASE {db}")))
        .unwrap();
    let cleanup = DropDb(db.clone());
    let url = format!("postgresql://postgres@127.0.0.1:5432/{db}");
    let c = rt.block_on(client(&url));
    rt.block_on(c.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, note text);
         INSERT INTO items SELECT g, 0, 'seed' FROM generate_series(1, {SEEDED}) g;"
    )))
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        format!(
            r#"
store:
  path: ./store.db
systems:
  legacy:
    source:
      postgres_cdc:
        url: {url}
        slot: {db}
        publication: {db}
        tables: [items]
        # small: transactions are often split over two store commits
        batch_size: 16
        heartbeat: 300ms
  out:
    sink:
      jsonl:
        path: ./out.jsonl
        envelope: true
flows:
  changes:
    from: legacy
    to: [out]
    delivery:
      batch_size: 200
"#
        ),
    )
    .unwrap();

    // the initial snapshot first: rows written during it would be read by
    // it (as `op: r`), not streamed
    let out = dir.path().join("out.jsonl");
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    let deadline = Instant::now() + Duration::from_secs(20);
    while jsonl_lines(&out).len() < SEEDED as usize {
        assert!(
            Instant::now() < deadline,
            "no snapshot; log:\n{}",
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut logs = vec![hub.log_text()];
    hub.kill9();
    // writers run while weft is killed and started again
    let done = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| rt.spawn(writer(url.clone(), w, TXS_PER_WRITER, done.clone())))
        .collect();
    let (kills, more) = kill_while(dir.path(), "weft.yaml", LOG, || {
        writers.iter().any(|w| !w.is_finished())
    });
    let kills = kills + 1;
    logs.extend(more);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    let committed = done.lock().unwrap().clone();
    let expected: u64 = committed.iter().map(|(_, n)| n).sum();

    // a last run delivers the rest
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = jsonl_lines(&out)
            .iter()
            .filter(|l| l["data"]["op"] != "r")
            .map(|l| l["id"].as_str().unwrap().to_owned())
            .collect::<HashSet<_>>()
            .len() as u64;
        if n >= expected {
            break;
        }
        if Instant::now() > deadline {
            let keep = std::path::Path::new("/tmp/weft-cdc-failed");
            let _ = std::fs::create_dir_all(keep);
            let _ = std::fs::copy(&out, keep.join("out.jsonl"));
            let _ = std::fs::write(keep.join("committed.json"), format!("{committed:?}"));
            logs.push(hub.log_text());
            let _ = std::fs::write(keep.join("logs.txt"), logs.join("\n=====\n"));
            panic!(
                "{n} of {expected} changes delivered (kept in {})",
                keep.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // nothing more than that comes
    std::thread::sleep(Duration::from_millis(700));
    assert!(hub.stop().success());
    let all = jsonl_lines(&out);

    // one idempotency key and one payload per position, and the reverse;
    // in order per key
    let by_pos = check_cdc_lines(&all, |d| {
        (
            lsn(&d["source"]["commit_lsn"]),
            d["source"]["tx_ordinal"].as_u64().unwrap(),
        )
    });
    let snapshot_ids: HashSet<i64> = all
        .iter()
        .filter(|l| l["data"]["op"] == "r")
        .map(|l| l["data"]["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        snapshot_ids,
        (1..=SEEDED as i64).collect::<HashSet<_>>(),
        "the initial snapshot"
    );
    // every committed change, nothing of the rolled-back transactions
    let mut per_xid: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (p, d) in &by_pos {
        per_xid
            .entry(d["source"]["xid"].as_u64().unwrap())
            .or_default()
            .push(p.1);
    }
    assert_eq!(by_pos.len() as u64, expected);
    assert_eq!(per_xid.len(), committed.len(), "transactions");
    for (xid, n) in &committed {
        let mut ords = per_xid.remove(&(*xid as u64)).unwrap_or_default();
        ords.sort_unstable();
        assert_eq!(ords, (1..=*n).collect::<Vec<_>>(), "transaction {xid}");
    }
    // the final state matches the database's
    let rows = rt
        .block_on(c.query("SELECT id, v FROM items ORDER BY id", &[]))
        .unwrap();
    let mut state: BTreeMap<i64, i64> = BTreeMap::new();
    let mut ordered: Vec<&Value> = all.iter().map(|l| &l["data"]).collect();
    ordered.sort_by_key(|d| {
        (
            lsn(&d["source"]["commit_lsn"]),
            d["source"]["tx_ordinal"].as_u64().unwrap(),
        )
    });
    for d in ordered {
        match d["op"].as_str().unwrap() {
            "d" => {
                state.remove(&d["before"]["id"].as_i64().unwrap());
            }
            _ => {
                state.insert(
                    d["after"]["id"].as_i64().unwrap(),
                    d["after"]["v"].as_i64().unwrap(),
                );
            }
        }
    }
    let db_state: BTreeMap<i64, i64> = rows
        .iter()
        .map(|r| (r.get::<_, i32>(0) as i64, r.get::<_, i32>(1) as i64))
        .collect();
    assert_eq!(state, db_state, "replaying the changes gives the table");
    eprintln!(
        "cdc crash test: {expected} changes in {} transactions, {kills} SIGKILLs, {} lines written, {:.1}s",
        committed.len(),
        all.len(),
        started.elapsed().as_secs_f64()
    );

    drop(c);
    drop(cleanup);
}

/// The machine's PostgreSQL, or `None` (skipped loudly; a failure in CI).
fn pg_admin(rt: &tokio::runtime::Runtime, what: &str) -> Option<tokio_postgres::Client> {
    let admin = match rt.block_on(tokio_postgres::connect(ADMIN_URL, NoTls)) {
        Ok((c, conn)) => {
            rt.spawn(conn);
            c
        }
        Err(e) => {
            if ci() {
                panic!("PostgreSQL at {ADMIN_URL} is not reachable and CI=true: {e}");
            }
            eprintln!("!!!!!! SKIPPING {what}: {ADMIN_URL} is not reachable: {e} !!!!!!");
            return None;
        }
    };
    let level: String = rt
        .block_on(admin.query_one("SHOW wal_level", &[]))
        .unwrap()
        .get(0);
    if level != "logical" {
        if ci() {
            panic!("PostgreSQL has wal_level={level} and CI=true: run .ci/services.sh");
        }
        eprintln!("!!!!!! SKIPPING {what}: wal_level={level} (run .ci/services.sh) !!!!!!");
        return None;
    }
    Some(admin)
}

fn cdc_config(url: &str, db: &str, tables: &str) -> String {
    format!(
        r#"
store:
  path: ./store.db
systems:
  legacy:
    source:
      postgres_cdc:
        url: {url}
        slot: {db}
        publication: {db}
        tables: [{tables}]
        heartbeat: 200ms
  out:
    sink:
      jsonl:
        path: ./out.jsonl
        envelope: true
flows:
  changes:
    from: legacy
    to: [out]
"#
    )
}

/// [`wait_for`], failing with the hub's log.
fn wait_hub(hub: &Hub, timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; log:\n{}",
                hub.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `(op, table, id)` of every line, in file order.
fn ops(out: &std::path::Path) -> Vec<(String, String, i64)> {
    jsonl_lines(out)
        .iter()
        .map(|l| {
            let d = &l["data"];
            let row = if d["after"].is_null() {
                &d["before"]
            } else {
                &d["after"]
            };
            (
                d["op"].as_str().unwrap_or("").to_owned(),
                d["source"]["table"].as_str().unwrap_or("").to_owned(),
                row["id"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

fn count(out: &std::path::Path, op: &str, table: &str) -> usize {
    ops(out)
        .iter()
        .filter(|(o, t, _)| o == op && t == table)
        .count()
}

/// Regression for the way out of a lost slot: the slot dropped while weft
/// is down (changes made then are gone with it) stops the source with an
/// error naming `weft cdc resnapshot`; the command, run beside the running
/// hub, makes the restarted source take a new snapshot (every current row
/// delivered, the lost insert included), streaming resumes, and a later
/// restart does not snapshot again.
#[test]
fn a_dropped_slot_stops_the_source_and_cdc_resnapshot_recovers_every_row() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(admin) = pg_admin(&rt, "CDC resnapshot test") else {
        return;
    };
    let db = format!("weft_cdc_resnap_{}", &unique_suffix());
    rt.block_on(admin.batch_execute(&format!("CREATE DATABASE {db}")))
        .unwrap();
    let cleanup = DropDb(db.clone());
    let url = format!("postgresql://postgres@127.0.0.1:5432/{db}");
    let c = rt.block_on(client(&url));
    rt.block_on(c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 20) g;",
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("weft.yaml"), cdc_config(&url, &db, "items")).unwrap();
    let out = dir.path().join("out.jsonl");

    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_hub(
        &hub,
        Duration::from_secs(20),
        "the initial snapshot",
        || count(&out, "r", "items") == 20,
    );
    rt.block_on(c.batch_execute("INSERT INTO items VALUES (21, 0)"))
        .unwrap();
    wait_hub(&hub, Duration::from_secs(10), "a streamed insert", || {
        count(&out, "c", "items") == 1
    });
    assert!(hub.stop().success());

    // while weft is down: a change, then the slot is gone (and the change
    // with it, as far as the stream goes)
    rt.block_on(
        c.batch_execute("INSERT INTO items VALUES (22, 0); UPDATE items SET v = 5 WHERE id = 1"),
    )
    .unwrap();
    rt.block_on(c.execute("SELECT pg_drop_replication_slot($1)", &[&db]))
        .unwrap();

    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_hub(&hub, Duration::from_secs(10), "the loud error", || {
        hub.log_text().contains("weft cdc resnapshot")
    });
    assert!(
        hub.log_text().contains("does not exist"),
        "{}",
        hub.log_text()
    );
    assert_eq!(
        count(&out, "r", "items"),
        20,
        "nothing snapshotted silently"
    );
    let cmd = weft_cmd(
        dir.path(),
        &["cdc", "resnapshot", "-c", "weft.yaml", "legacy"],
    );
    assert!(
        cmd.status.success(),
        "{}",
        String::from_utf8_lossy(&cmd.stderr)
    );
    // the supervisor restarts the stopped source; it takes the snapshot
    wait_hub(&hub, Duration::from_secs(30), "the new snapshot", || {
        count(&out, "r", "items") == 20 + 22
    });
    let second: BTreeMap<i64, i64> = jsonl_lines(&out)
        .iter()
        .filter(|l| l["data"]["op"] == "r")
        .skip(20)
        .map(|l| {
            (
                l["data"]["after"]["id"].as_i64().unwrap(),
                l["data"]["after"]["v"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(second.len(), 22, "every current row once");
    assert_eq!(
        second.get(&22),
        Some(&0),
        "the insert made while the slot was gone"
    );
    assert_eq!(
        second.get(&1),
        Some(&5),
        "the update made while the slot was gone"
    );
    // streaming goes on from the new slot
    rt.block_on(c.batch_execute("INSERT INTO items VALUES (23, 0)"))
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "streaming after the resnapshot",
        || ops(&out).contains(&("c".into(), "items".into(), 23)),
    );
    assert!(hub.stop().success());
    // the request was served: a restart streams on, no third snapshot
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    rt.block_on(c.batch_execute("UPDATE items SET v = 9 WHERE id = 23"))
        .unwrap();
    wait_hub(
        &hub,
        Duration::from_secs(10),
        "streaming after a restart",
        || ops(&out).contains(&("u".into(), "items".into(), 23)),
    );
    assert_eq!(count(&out, "r", "items"), 42, "no snapshot at the restart");
    assert!(hub.stop().success());
    drop(c);
    drop(cleanup);
}

/// A table added to `tables` (and so to the publication) is snapshotted
/// alone at the next start, consistent with the stream: its rows as of
/// the snapshot, none of its changes below the snapshot's LSN streamed,
/// every one after it; the other table is not copied again. A table added
/// to the publication while weft streams is snapshotted too, and
/// `weft cdc resnapshot --tables` beside the running hub copies one table
/// again.
#[test]
fn tables_added_later_are_snapshotted_alone_and_streamed_from_their_snapshot() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(admin) = pg_admin(&rt, "CDC added-tables test") else {
        return;
    };
    let db = format!("weft_cdc_added_{}", &unique_suffix());
    rt.block_on(admin.batch_execute(&format!("CREATE DATABASE {db}")))
        .unwrap();
    let cleanup = DropDb(db.clone());
    let url = format!("postgresql://postgres@127.0.0.1:5432/{db}");
    let c = rt.block_on(client(&url));
    rt.block_on(c.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE b (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE c (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO a SELECT g, 0 FROM generate_series(1, 10) g;
         INSERT INTO b SELECT g, 0 FROM generate_series(1, 7) g;
         INSERT INTO c SELECT g, 0 FROM generate_series(1, 4) g;",
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("weft.yaml"), cdc_config(&url, &db, "a")).unwrap();
    let out = dir.path().join("out.jsonl");
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_hub(
        &hub,
        Duration::from_secs(20),
        "the initial snapshot",
        || count(&out, "r", "a") == 10,
    );
    // the backfill's progress: rows read, and the catalog's estimate
    let series = "weft_cdc_snapshot_rows{source=\"legacy\"}";
    assert_eq!(metric(&scrape(&hub), series), Some(10.0));
    assert!(
        metric(
            &scrape(&hub),
            "weft_cdc_snapshot_rows_expected{source=\"legacy\"}"
        )
        .is_some_and(|n| n >= 0.0)
    );
    assert!(hub.stop().success());
    assert_eq!(count(&out, "r", "b"), 0);

    // while weft is down: b changes, and b joins `tables`; a writer keeps
    // changing b while weft starts and snapshots it
    rt.block_on(c.batch_execute(
        "INSERT INTO b VALUES (8, 0); UPDATE b SET v = 1 WHERE id = 1; UPDATE a SET v = 1 WHERE id = 1",
    ))
    .unwrap();
    std::fs::write(dir.path().join("weft.yaml"), cdc_config(&url, &db, "a, b")).unwrap();
    let writing = {
        let url = url.clone();
        rt.spawn(async move {
            let w = client(&url).await;
            for i in 0..40 {
                w.execute("UPDATE b SET v = v + 1 WHERE id = $1", &[&(i % 8 + 1)])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_hub(&hub, Duration::from_secs(20), "b's snapshot", || {
        count(&out, "r", "b") == 8
    });
    // the table snapshot's own progress: b's 8 rows
    assert_eq!(metric(&scrape(&hub), series), Some(8.0));
    rt.block_on(writing).unwrap();
    rt.block_on(c.batch_execute("INSERT INTO a VALUES (11, 0); INSERT INTO b VALUES (9, 0)"))
        .unwrap();
    wait_hub(
        &hub,
        Duration::from_secs(10),
        "streaming of both tables",
        || {
            let o = ops(&out);
            o.contains(&("c".into(), "a".into(), 11)) && o.contains(&("c".into(), "b".into(), 9))
        },
    );
    assert_eq!(count(&out, "r", "a"), 10, "a is not copied again");
    // b as weft has it (its snapshot, then its streamed changes in order)
    // is b as the database has it
    let rebuild = |table: &str| -> BTreeMap<i64, i64> {
        let mut state = BTreeMap::new();
        for l in jsonl_lines(&out) {
            let d = &l["data"];
            if d["source"]["table"] != table {
                continue;
            }
            match d["op"].as_str().unwrap() {
                "d" => {
                    state.remove(&d["before"]["id"].as_i64().unwrap());
                }
                _ => {
                    state.insert(
                        d["after"]["id"].as_i64().unwrap(),
                        d["after"]["v"].as_i64().unwrap(),
                    );
                }
            }
        }
        state
    };
    let table = |t: &str| -> BTreeMap<i64, i64> {
        rt.block_on(c.query(&format!("SELECT id, v FROM {t}"), &[]))
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0) as i64, r.get::<_, i32>(1) as i64))
            .collect()
    };
    assert_eq!(rebuild("b"), table("b"), "b rebuilt from weft's events");
    // no streamed change of b at or below its snapshot's LSN, and the 40
    // updates each once: in the snapshot or streamed
    let lines = jsonl_lines(&out);
    let snap_lsn = lines
        .iter()
        .find(|l| l["data"]["op"] == "r" && l["data"]["source"]["table"] == "b")
        .map(|l| lsn(&l["data"]["source"]["lsn"]))
        .unwrap();
    for l in &lines {
        let d = &l["data"];
        if d["source"]["table"] == "b" && d["op"] != "r" {
            assert!(
                lsn(&d["source"]["commit_lsn"]) >= snap_lsn,
                "a change of b below its snapshot was streamed: {d}"
            );
        }
    }
    let sum_db: i64 = table("b").values().sum();
    assert_eq!(sum_db, 1 + 40, "the writer's updates");

    // c joins the publication while weft streams: snapshotted, then streamed
    rt.block_on(c.batch_execute(&format!(
        "ALTER PUBLICATION {db} ADD TABLE c; UPDATE c SET v = 3 WHERE id = 2"
    )))
    .unwrap();
    wait_hub(&hub, Duration::from_secs(20), "c's snapshot", || {
        count(&out, "r", "c") == 4
    });
    rt.block_on(c.batch_execute("UPDATE c SET v = 4 WHERE id = 3"))
        .unwrap();
    wait_hub(&hub, Duration::from_secs(10), "c streamed", || {
        ops(&out).contains(&("u".into(), "c".into(), 3))
    });
    assert_eq!(rebuild("c"), table("c"), "c rebuilt from weft's events");

    // one table again, beside the running hub
    let cmd = weft_cmd(
        dir.path(),
        &[
            "cdc",
            "resnapshot",
            "-c",
            "weft.yaml",
            "legacy",
            "--tables",
            "b",
        ],
    );
    assert!(
        cmd.status.success(),
        "{}",
        String::from_utf8_lossy(&cmd.stderr)
    );
    wait_hub(&hub, Duration::from_secs(20), "b's second snapshot", || {
        count(&out, "r", "b") == 8 + 9
    });
    assert_eq!(count(&out, "r", "a"), 10, "a is not copied again");
    assert_eq!(count(&out, "r", "c"), 4, "c is not copied again");
    let refused = weft_cmd(
        dir.path(),
        &[
            "cdc",
            "resnapshot",
            "-c",
            "weft.yaml",
            "legacy",
            "--tables",
            "nope",
        ],
    );
    assert!(!refused.status.success(), "an unknown table is refused");
    rt.block_on(c.batch_execute("INSERT INTO b VALUES (10, 0)"))
        .unwrap();
    wait_hub(&hub, Duration::from_secs(10), "b streamed after it", || {
        ops(&out).contains(&("c".into(), "b".into(), 10))
    });
    assert!(hub.stop().success());
    drop(c);
    drop(cleanup);
}

/// A PostgreSQL cluster of the test's own (never the shared one on 5432):
/// `initdb` into a temporary directory, `wal_level = logical`, its own
/// port; run as `postgres` through `runuser` when the test runs as root
/// (initdb refuses root). Stopped `immediate` when dropped.
struct OwnPg {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl OwnPg {
    /// `None` when no PostgreSQL server binaries are installed (the caller
    /// skips loudly, or fails under CI).
    fn start() -> Option<OwnPg> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
            .max()?;
        let dir = tempfile::tempdir().unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            let ok = std::process::Command::new("chown")
                .args(["postgres:", dir.path().to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster's directory to postgres");
        }
        let pg = OwnPg {
            dir,
            bin,
            port: free_port(),
        };
        pg.run(
            "initdb",
            &[
                "-D",
                "data",
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             fsync = off\nshared_buffers = 16MB\n",
            pg.port,
            pg.dir.path().display()
        );
        let path = pg.dir.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        std::fs::write(&path, text).unwrap();
        pg.ctl_start();
        Some(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ctl_start(&self) {
        self.run(
            "pg_ctl",
            &["start", "-w", "-D", "data", "-l", "log", "-t", "30"],
        );
    }

    fn ctl_stop(&self, mode: &str) {
        self.run("pg_ctl", &["stop", "-w", "-D", "data", "-m", mode]);
    }

    fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPg {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let _ = cmd
            .args(["stop", "-D", "data", "-m", "immediate"])
            .current_dir(self.dir.path())
            .output();
    }
}

/// One writer against a server that restarts: each transaction bumps `v`
/// of 1 to 3 of its own rows or inserts one; a lost connection is made
/// again (its transaction's outcome is then unknown: the truth is the
/// table at the end). Returns how many transactions it saw committed.
async fn restarting_writer(url: String, w: i32, stop: Arc<std::sync::atomic::AtomicBool>) -> u64 {
    let mut committed = 0;
    let mut next = 1000 * (w + 1);
    let mut ids: Vec<i32> = (1..=5).map(|i| w * 5 + i).collect();
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Ok((mut c, conn)) = tokio_postgres::connect(&url, NoTls).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let step = async {
                let tx = c.transaction().await?;
                if n.is_multiple_of(4) {
                    next += 1;
                    tx.execute("INSERT INTO items VALUES ($1, 0)", &[&next])
                        .await?;
                } else {
                    for k in 0..=(n % 3) {
                        let id = ids[((n + k) % ids.len() as u64) as usize];
                        tx.execute("UPDATE items SET v = v + 1 WHERE id = $1", &[&id])
                            .await?;
                    }
                }
                tx.commit().await
            };
            match step.await {
                Ok(()) => {
                    committed += 1;
                    if n.is_multiple_of(4) {
                        ids.push(next);
                    }
                }
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    committed
}

/// Guarantee: a restart of PostgreSQL itself mid-stream (twice: `fast`,
/// then `immediate`, after which the slot's position is what its last
/// checkpoint saved, possibly behind what weft confirmed) under concurrent writers loses and repeats nothing:
/// one idempotency key per `(commit_lsn, tx_ordinal)`, never an older
/// change of a key after a newer, each row's `v` seen 0, 1, 2, ... with
/// no gap or repeat, and the table rebuilt from the changes equals the
/// database's. The test's own cluster: skipped loudly without PostgreSQL's
/// server binaries, a failure under `CI=true`.
#[test]
fn a_postgres_restart_mid_stream_loses_and_repeats_nothing() {
    let started = Instant::now();
    let Some(pg) = OwnPg::start() else {
        if ci() {
            panic!(
                "no /usr/lib/postgresql/*/bin/initdb and CI=true: install the PostgreSQL server"
            );
        }
        eprintln!(
            "!!!!!! SKIPPING the PostgreSQL restart test: no /usr/lib/postgresql/*/bin/initdb !!!!!!"
        );
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = pg.url();
    let c = rt.block_on(client(&url));
    rt.block_on(c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 20) g;",
    ))
    .unwrap();
    drop(c);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        cdc_config(&url, "weft_restart", "items"),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_hub(
        &hub,
        Duration::from_secs(20),
        "the initial snapshot",
        || count(&out, "r", "items") == 20,
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| rt.spawn(restarting_writer(url.clone(), w, stop.clone())))
        .collect();
    let streamed = |n: usize| {
        move || {
            jsonl_lines(&out)
                .iter()
                .filter(|l| l["data"]["op"] != "r")
                .count()
                >= n
        }
    };
    wait_hub(
        &hub,
        Duration::from_secs(10),
        "changes before the first restart",
        streamed(100),
    );
    pg.ctl_stop("fast");
    std::thread::sleep(Duration::from_millis(300));
    pg.ctl_start();
    let before = jsonl_lines(&dir.path().join("out.jsonl")).len();
    wait_hub(
        &hub,
        Duration::from_secs(15),
        "changes after the first restart",
        || jsonl_lines(&dir.path().join("out.jsonl")).len() >= before + 100,
    );
    pg.ctl_stop("immediate");
    std::thread::sleep(Duration::from_millis(300));
    pg.ctl_start();
    let before = jsonl_lines(&dir.path().join("out.jsonl")).len();
    wait_hub(
        &hub,
        Duration::from_secs(15),
        "changes after the second restart",
        || jsonl_lines(&dir.path().join("out.jsonl")).len() >= before + 100,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let committed: u64 = writers.into_iter().map(|w| rt.block_on(w).unwrap()).sum();

    // the truth: the table at the end; wait until the changes rebuild it
    let c = rt.block_on(client(&url));
    let db_state: BTreeMap<i64, i64> = rt
        .block_on(c.query("SELECT id, v FROM items", &[]))
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0) as i64, r.get::<_, i32>(1) as i64))
        .collect();
    let rebuild = || {
        let mut state: BTreeMap<i64, i64> = BTreeMap::new();
        for l in jsonl_lines(&dir.path().join("out.jsonl")) {
            let d = &l["data"];
            state.insert(
                d["after"]["id"].as_i64().unwrap(),
                d["after"]["v"].as_i64().unwrap(),
            );
        }
        state
    };
    wait_hub(
        &hub,
        Duration::from_secs(15),
        "every change delivered",
        || rebuild() == db_state,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(hub.stop().success());
    let all = jsonl_lines(&dir.path().join("out.jsonl"));
    let by_pos = check_cdc_lines(&all, |d| {
        (
            lsn(&d["source"]["commit_lsn"]),
            d["source"]["tx_ordinal"].as_u64().unwrap(),
        )
    });
    // per row, in position order: v goes 0, 1, 2, ... (nothing lost, nothing twice)
    let mut ordered: Vec<_> = by_pos.iter().collect();
    ordered.sort_by_key(|(p, _)| **p);
    let mut seen: BTreeMap<i64, i64> = (1..=20).map(|i| (i, 0)).collect();
    for (p, d) in ordered {
        let id = d["after"]["id"].as_i64().unwrap();
        let v = d["after"]["v"].as_i64().unwrap();
        match d["op"].as_str().unwrap() {
            "c" => assert!(
                seen.insert(id, v).is_none() && v == 0,
                "insert of {id} at {p:?}"
            ),
            "u" => {
                let prev = seen.insert(id, v);
                assert_eq!(prev, Some(v - 1), "row {id}: v {v} after {prev:?} at {p:?}");
            }
            op => panic!("unexpected op {op}"),
        }
    }
    assert_eq!(seen, db_state);
    let again = redelivered(&all);
    eprintln!(
        "postgres restart test: {} changes, {committed} transactions seen committed, {} lines ({again} written again), {:.1}s",
        by_pos.len(),
        all.len(),
        started.elapsed().as_secs_f64()
    );
    drop(pg);
}

/// How many lines were written more than once (at-least-once delivery).
fn redelivered(all: &[Value]) -> usize {
    let ids: HashSet<&str> = all.iter().filter_map(|l| l["id"].as_str()).collect();
    all.len() - ids.len()
}

/// Issue 12 through the binary: `events: per_transaction` (at most 4
/// changes an event, so the bigger transactions come in parts) while weft
/// is SIGKILLed and restarted under 3 concurrent writers. Every committed
/// transaction arrives, each part under one idempotency key and one
/// payload however often it is redelivered, the parts of a transaction
/// together hold each of its changes once in commit order (`tx_ordinal`
/// 1..n), the last part says `last: true`, nothing of a rolled-back
/// transaction; transactions reach the destination in commit order (the
/// first time each is written); and a mapping iterating `.changes[]`
/// sees the same rows.
#[test]
fn per_transaction_events_across_sigkills_one_event_per_part_none_lost_in_commit_order() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(admin) = pg_admin(&rt, "per-transaction CDC crash test") else {
        return;
    };
    let started = Instant::now();
    let db = format!("weft_cdc_txn_{}", &unique_suffix());
    rt.block_on(admin.batch_execute(&format!("CREATE DATABASE {db}")))
        .unwrap();
    let cleanup = DropDb(db.clone());
    let url = format!("postgresql://postgres@127.0.0.1:5432/{db}");
    let c = rt.block_on(client(&url));
    rt.block_on(c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, note text);
         INSERT INTO items SELECT g, 0, 'seed' FROM generate_series(1, 3) g;",
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        format!(
            r#"
store:
  path: ./store.db
systems:
  legacy:
    source:
      postgres_cdc:
        url: {url}
        slot: {db}
        publication: {db}
        tables: [items]
        events: per_transaction
        max_transaction_changes: 4
        batch_size: 6
        heartbeat: 300ms
  out:
    sink:
      jsonl:
        path: ./out.jsonl
        envelope: true
  rows:
    sink:
      jsonl:
        path: ./rows.jsonl
flows:
  changes:
    from: legacy
    to: [out]
  mapped:
    from: legacy
    filter: .changes != null
    mapping: '{{commit_lsn, part, ids: [.changes[] | (.after // .before).id]}}'
    to: [rows]
"#
        ),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_hub(&hub, Duration::from_secs(20), "the snapshot", || {
        jsonl_lines(&out).len() >= 3
    });
    let mut logs = vec![hub.log_text()];
    hub.kill9();
    let done = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..3)
        .map(|w| rt.spawn(writer(url.clone(), w, 120, done.clone())))
        .collect();
    let (kills, more) = kill_while(dir.path(), "weft.yaml", LOG, || {
        writers.iter().any(|w| !w.is_finished())
    });
    logs.extend(more);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    let committed = done.lock().unwrap().clone();
    let expected: u64 = committed.iter().map(|(_, n)| n).sum();
    let txn_lines = |all: &[Value]| -> Vec<Value> {
        all.iter()
            .filter(|l| !l["data"]["changes"].is_null())
            .cloned()
            .collect()
    };
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let lines = txn_lines(&jsonl_lines(&out));
        let mut seen = HashSet::new();
        let mut n = 0u64;
        for l in &lines {
            if seen.insert(l["causationid"].as_str().unwrap().to_owned()) {
                n += l["data"]["changes"].as_array().unwrap().len() as u64;
            }
        }
        if n >= expected {
            break;
        }
        if Instant::now() > deadline {
            logs.push(hub.log_text());
            panic!(
                "{n} of {expected} changes delivered; logs:\n{}",
                logs.join("\n=====\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(700));
    assert!(hub.stop().success());
    let all = txn_lines(&jsonl_lines(&out));

    // one idempotency key and one payload per event id, and the reverse
    let mut by_id: BTreeMap<String, (String, Value)> = BTreeMap::new();
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut first_order: Vec<(u64, u64)> = Vec::new();
    for l in &all {
        let id = l["causationid"].as_str().unwrap().to_owned();
        let key = l["id"].as_str().unwrap().to_owned();
        let d = &l["data"];
        if !by_id.contains_key(&id) {
            first_order.push((lsn(&d["commit_lsn"]), d["part"].as_u64().unwrap()));
        }
        let prev = by_id
            .entry(id.clone())
            .or_insert_with(|| (key.clone(), d.clone()));
        assert_eq!(prev.0, key, "one event id, two idempotency keys");
        assert_eq!(&prev.1, d, "one event id, two payloads");
        assert_eq!(
            *keys.entry(key).or_insert(id.clone()),
            id,
            "one key, two ids"
        );
        assert_eq!(
            id,
            format!("txn@{}#{}", d["commit_lsn"].as_str().unwrap(), d["part"]),
            "the id is the commit position"
        );
    }
    let mut sorted = first_order.clone();
    sorted.sort_unstable();
    assert_eq!(first_order, sorted, "transactions written in commit order");
    // per transaction: its parts hold ordinals 1..n once each, in order
    let mut per_xid: BTreeMap<u64, Vec<(u64, Value)>> = BTreeMap::new();
    for (_, d) in by_id.values() {
        per_xid
            .entry(d["xid"].as_u64().unwrap())
            .or_default()
            .push((d["part"].as_u64().unwrap(), d.clone()));
    }
    assert_eq!(per_xid.len(), committed.len(), "transactions");
    for (xid, n) in &committed {
        let mut parts = per_xid.remove(&(*xid as u64)).unwrap_or_default();
        parts.sort_by_key(|p| p.0);
        let nums: Vec<u64> = parts.iter().map(|p| p.0).collect();
        assert_eq!(
            nums,
            (1..=n.div_ceil(4)).collect::<Vec<_>>(),
            "parts of {xid}"
        );
        let ords: Vec<u64> = parts
            .iter()
            .flat_map(|p| p.1["changes"].as_array().unwrap().clone())
            .map(|c| c["source"]["tx_ordinal"].as_u64().unwrap())
            .collect();
        assert_eq!(ords, (1..=*n).collect::<Vec<_>>(), "transaction {xid}");
        let lasts: Vec<bool> = parts.iter().map(|p| p.1["last"] == true).collect();
        assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
        assert_eq!(lasts.last(), Some(&true), "transaction {xid}");
    }
    // the mapping saw every part, its rows as `.changes[]` gives them
    let mapped = jsonl_lines(&dir.path().join("rows.jsonl"));
    let mut mapped_ids: BTreeMap<(u64, u64), Value> = BTreeMap::new();
    for m in &mapped {
        mapped_ids.insert(
            (lsn(&m["commit_lsn"]), m["part"].as_u64().unwrap()),
            m["ids"].clone(),
        );
    }
    assert_eq!(mapped_ids.len(), by_id.len(), "one mapped line per part");
    for (_, d) in by_id.values() {
        let ids: Vec<Value> = d["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                if c["after"].is_null() {
                    c["before"]["id"].clone()
                } else {
                    c["after"]["id"].clone()
                }
            })
            .collect();
        assert_eq!(
            mapped_ids[&(lsn(&d["commit_lsn"]), d["part"].as_u64().unwrap())],
            Value::Array(ids)
        );
    }
    eprintln!(
        "per-transaction crash test: {expected} changes in {} transactions, {} parts, {kills} SIGKILLs, {} lines, {:.1}s",
        committed.len(),
        by_id.len(),
        all.len(),
        started.elapsed().as_secs_f64()
    );
    drop(c);
    drop(cleanup);
}
