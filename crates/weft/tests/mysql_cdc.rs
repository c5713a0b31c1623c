//! Guarantee: MariaDB changes read from the binlog reach the destination
//! exactly once per change (one idempotency key per `(file, pos,
//! tx_ordinal)`, every change of every committed transaction, nothing of a
//! rolled-back one) and in order per key, while `weft` is SIGKILLed and
//! restarted several times mid-stream under concurrent writers.
//!
//! The real MariaDB on 127.0.0.1:3306 (root, no password; `log_bin`,
//! `binlog_format = ROW`, which `.ci/services.sh` sets), a database of the
//! test's own (dropped at the end), the real `weft` binary writing a JSON
//! Lines file with the envelope. Four writer tasks make transactions of 1
//! to 5 statements (single and multi-row inserts, updates, deletes; some
//! rolled back), each noting its GTID (`@@last_gtid`) and how many rows it
//! changed: that is the truth the file is checked against. Skipped with a
//! message when MariaDB is not reachable or has no row binlog, unless
//! `CI=true`, where that is a failure.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, TxOpts};
use serde_json::Value;

const ADMIN_URL: &str = "mysql://root@127.0.0.1:3306/test";
const WRITERS: i32 = 4;
const TXS_PER_WRITER: i32 = 230;
const SEEDED: i32 = 40;
const LOG: &[(&str, &str)] = &[("WEFT_LOG", "info,weft_connectors::cdc=debug")];

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// One writer: transactions over its own ids, each noted as `(gtid, rows
/// changed)` when committed.
async fn writer(url: String, w: i32, txs: i32, done: Arc<Mutex<Vec<(String, u64)>>>) {
    let mut c = Conn::from_url(url.as_str()).await.unwrap();
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
        let mut tx = c.start_transaction(TxOpts::default()).await.unwrap();
        let mut rows = 0u64;
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for _ in 0..=rand(4) {
            match rand(5) {
                0 | 1 => {
                    next_id += 1;
                    tx.exec_drop(
                        "INSERT INTO items (id, v, note) VALUES (?, 0, 'new')",
                        (next_id,),
                    )
                    .await
                    .unwrap();
                    added.push(next_id);
                }
                2 => {
                    // one statement, three rows: one rows event, three changes
                    let ids = [next_id + 1, next_id + 2, next_id + 3];
                    next_id += 3;
                    tx.exec_drop(
                        "INSERT INTO items (id, v, note) VALUES (?, 0, 'multi'), (?, 0, 'multi'), (?, 0, 'multi')",
                        (ids[0], ids[1], ids[2]),
                    )
                    .await
                    .unwrap();
                    added.extend(ids);
                }
                3 if !live.is_empty() => {
                    let id = live[rand(live.len() as u64) as usize];
                    tx.exec_drop("UPDATE items SET v = v + 1 WHERE id = ?", (id,))
                        .await
                        .unwrap();
                }
                4 if live.len() > 5 => {
                    let id = live.swap_remove(rand(live.len() as u64) as usize);
                    removed.push(id);
                    tx.exec_drop("DELETE FROM items WHERE id = ?", (id,))
                        .await
                        .unwrap();
                }
                _ => {
                    tx.exec_drop("UPDATE items SET v = v + 1 WHERE id = ?", (w + 1,))
                        .await
                        .unwrap();
                }
            }
            rows += tx.affected_rows();
        }
        if i % 17 == 5 {
            tx.rollback().await.unwrap();
            live.extend(removed);
        } else {
            tx.commit().await.unwrap();
            let gtid: String = c.query_first("SELECT @@last_gtid").await.unwrap().unwrap();
            live.extend(added);
            done.lock().unwrap().push((gtid, rows));
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// Drops the test database when dropped, also when the test panics.
struct DropDb(String);

impl Drop for DropDb {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                if let Ok(mut c) = Conn::from_url(ADMIN_URL).await
                    && let Err(e) = c
                        .query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                        .await
                {
                    eprintln!("cannot drop test database {name}: {e}");
                }
            });
        })
        .join();
    }
}

/// `(file number, pos, tx_ordinal)` of a change.
fn pos(d: &Value) -> (u64, u64, u64) {
    let file = d["source"]["file"].as_str().unwrap();
    let n = file.rsplit_once('.').unwrap().1.parse().unwrap();
    (
        n,
        d["source"]["pos"].as_u64().unwrap(),
        d["source"]["tx_ordinal"].as_u64().unwrap(),
    )
}

#[test]
fn mysql_cdc_exactly_once_and_in_order_per_key_across_sigkills() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut admin = match rt.block_on(Conn::from_url(ADMIN_URL)) {
        Ok(c) => c,
        Err(e) => {
            if ci() {
                panic!("MariaDB at {ADMIN_URL} is not reachable and CI=true: {e}");
            }
            eprintln!(
                "!!!!!! SKIPPING MariaDB CDC crash test: {ADMIN_URL} is not reachable: {e} !!!!!!"
            );
            return;
        }
    };
    let (log_bin, format): (i64, String) = rt
        .block_on(admin.query_first("SELECT @@log_bin, @@binlog_format"))
        .unwrap()
        .unwrap();
    if log_bin != 1 || format != "ROW" {
        if ci() {
            panic!(
                "MariaDB has log_bin={log_bin} binlog_format={format} and CI=true: run .ci/services.sh"
            );
        }
        eprintln!(
            "!!!!!! SKIPPING MariaDB CDC crash test: log_bin={log_bin} binlog_format={format} (run .ci/services.sh) !!!!!!"
        );
        return;
    }
    let started = Instant::now();
    let suffix = unique_suffix();
    let db = format!("weft_cdc_e2e_{suffix}");
    rt.block_on(admin.query_drop(format!("CREATE DATABASE `{db}`")))
        .unwrap();
    let cleanup = DropDb(db.clone());
    let url = format!("mysql://root@127.0.0.1:3306/{db}");
    let mut c = rt.block_on(Conn::from_url(url.as_str())).unwrap();
    rt.block_on(c.query_drop(
        "CREATE TABLE items (id INT PRIMARY KEY, v INT NOT NULL, note TEXT) ENGINE=InnoDB",
    ))
    .unwrap();
    rt.block_on(c.query_drop(format!(
        "INSERT INTO items SELECT seq, 0, 'seed' FROM seq_1_to_{SEEDED}"
    )))
    .unwrap();
    // a replica id of this run's own
    let server_id = 1_000_000 + (u64::from_str_radix(&suffix[8..], 16).unwrap() % 1_000_000_000);

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
      mysql_cdc:
        url: {url}
        tables: [items]
        server_id: {server_id}
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

    // the initial snapshot first
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
            let keep = std::path::Path::new("/tmp/weft-mysql-cdc-failed");
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

    let by_pos = check_cdc_lines(&all, pos);
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
    let mut per_gtid: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (p, d) in &by_pos {
        per_gtid
            .entry(d["source"]["gtid"].as_str().unwrap().to_owned())
            .or_default()
            .push(p.2);
    }
    assert_eq!(by_pos.len() as u64, expected);
    assert_eq!(per_gtid.len(), committed.len(), "transactions");
    for (gtid, n) in &committed {
        let mut ords = per_gtid.remove(gtid).unwrap_or_default();
        ords.sort_unstable();
        assert_eq!(ords, (1..=*n).collect::<Vec<_>>(), "transaction {gtid}");
    }
    // the final state matches the database's
    let rows: Vec<(i64, i64)> = rt
        .block_on(c.query("SELECT id, v FROM items ORDER BY id"))
        .unwrap();
    let mut state: BTreeMap<i64, i64> = BTreeMap::new();
    let mut ordered: Vec<&Value> = all.iter().map(|l| &l["data"]).collect();
    // the snapshot first (its rows share the snapshot's position)
    ordered.sort_by_key(|d| (d["op"] != "r", pos(d)));
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
    let db_state: BTreeMap<i64, i64> = rows.into_iter().collect();
    assert_eq!(state, db_state, "replaying the changes gives the table");
    eprintln!(
        "mysql cdc crash test: {expected} changes in {} transactions, {kills} SIGKILLs, {} lines written, {:.1}s",
        committed.len(),
        all.len(),
        started.elapsed().as_secs_f64()
    );

    drop(c);
    drop(cleanup);
}

/// `(op, id)` of every line, in file order.
fn ops(out: &std::path::Path) -> Vec<(String, i64)> {
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
                row["id"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

/// A database of the test's own on the machine's MariaDB with `items` (ids
/// 1 to 10), and a weft config in a new folder streaming it (`legacy`,
/// heartbeat 200 ms) into `out.jsonl` with the envelope; `None` (skipped
/// with a message) when MariaDB is not there, a failure when `CI=true`.
struct Items {
    c: Conn,
    dir: tempfile::TempDir,
    out: std::path::PathBuf,
    _cleanup: DropDb,
}

fn items_db(rt: &tokio::runtime::Runtime, prefix: &str, what: &str) -> Option<Items> {
    let mut admin = match rt.block_on(Conn::from_url(ADMIN_URL)) {
        Ok(c) => c,
        Err(e) => {
            if ci() {
                panic!("MariaDB at {ADMIN_URL} is not reachable and CI=true: {e}");
            }
            eprintln!(
                "!!!!!! SKIPPING MariaDB {what} test: {ADMIN_URL} is not reachable: {e} !!!!!!"
            );
            return None;
        }
    };
    let suffix = unique_suffix();
    let db = format!("{prefix}_{suffix}");
    rt.block_on(admin.query_drop(format!("CREATE DATABASE `{db}`")))
        .unwrap();
    let cleanup = DropDb(db.clone());
    let url = format!("mysql://root@127.0.0.1:3306/{db}");
    let mut c = rt.block_on(Conn::from_url(url.as_str())).unwrap();
    rt.block_on(c.query_drop(
        "CREATE TABLE items (id INT PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB;
         INSERT INTO items SELECT seq, 0 FROM seq_1_to_10",
    ))
    .unwrap();
    let server_id = 1_000_000 + (u64::from_str_radix(&suffix[8..], 16).unwrap() % 1_000_000_000);
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
      mysql_cdc:
        url: {url}
        tables: [items]
        server_id: {server_id}
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
        ),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    Some(Items {
        c,
        dir,
        out,
        _cleanup: cleanup,
    })
}

/// Regression for the way out of a purged binlog: a saved position in a
/// binlog the server no longer has stops the source with an error naming
/// `weft cdc resnapshot`; the command, beside the running hub, makes the
/// restarted source copy every table again (the change made meanwhile
/// included) and stream from there; a later restart does not copy again.
/// (The shared server's binlogs are not purged by a test: the store's
/// position is moved to a file older than every file it has, which is what
/// a purge leaves.)
#[test]
fn a_purged_binlog_stops_the_source_and_cdc_resnapshot_recovers_every_row() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(Items {
        c,
        dir,
        out,
        _cleanup: cleanup,
    }) = items_db(&rt, "weft_cdc_resnap", "resnapshot")
    else {
        return;
    };
    let mut c = c;
    let snapshots = || ops(&out).iter().filter(|(o, _)| o == "r").count();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(20), "the initial snapshot", || {
        snapshots() == 10
    });
    rt.block_on(c.query_drop("INSERT INTO items VALUES (11, 0)"))
        .unwrap();
    wait_for(Duration::from_secs(10), "a streamed insert", || {
        ops(&out).contains(&("c".into(), 11))
    });
    assert!(hub.stop().success());

    rt.block_on(c.query_drop("INSERT INTO items VALUES (12, 0)"))
        .unwrap();
    {
        let store = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
        let text: String = store
            .query_row(
                "SELECT value FROM checkpoints WHERE source = 'legacy' AND key = 'mysql_cdc_position'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let mut cp: Value = serde_json::from_str(&text).unwrap();
        let file = cp["file"].as_str().unwrap().to_owned();
        cp["file"] = Value::String(format!("{}.000000", file.rsplit_once('.').unwrap().0));
        // as saved before GTID positions were kept (or by MySQL): only
        // the file and offset to go on (with its GTID position the source
        // resumes by GTID instead: the next test)
        assert!(
            cp["gtid_pos"].is_string(),
            "MariaDB keeps the GTID position: {cp}"
        );
        cp.as_object_mut().unwrap().remove("gtid_pos");
        store
            .execute(
                "UPDATE checkpoints SET value = ?1 WHERE source = 'legacy' AND key = 'mysql_cdc_position'",
                [cp.to_string()],
            )
            .unwrap();
    }
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(10), "the loud error", || {
        hub.log_text().contains("weft cdc resnapshot")
    });
    assert!(hub.log_text().contains("purged"), "{}", hub.log_text());
    assert_eq!(snapshots(), 10, "nothing snapshotted silently");
    let cmd = weft_cmd(
        dir.path(),
        &["cdc", "resnapshot", "-c", "weft.yaml", "legacy"],
    );
    assert!(
        cmd.status.success(),
        "{}",
        String::from_utf8_lossy(&cmd.stderr)
    );
    let tables = weft_cmd(
        dir.path(),
        &[
            "cdc",
            "resnapshot",
            "-c",
            "weft.yaml",
            "legacy",
            "--tables",
            "items",
        ],
    );
    assert!(
        !tables.status.success(),
        "--tables is refused for mysql_cdc"
    );
    wait_for(Duration::from_secs(30), "the new snapshot", || {
        snapshots() == 10 + 12
    });
    let second: Vec<i64> = ops(&out)
        .iter()
        .filter(|(o, _)| o == "r")
        .skip(10)
        .map(|(_, id)| *id)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        second,
        (1..=12).collect::<Vec<_>>(),
        "every current row once"
    );
    rt.block_on(c.query_drop("INSERT INTO items VALUES (13, 0)"))
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "streaming after the resnapshot",
        || ops(&out).contains(&("c".into(), 13)),
    );
    assert!(hub.stop().success());
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    rt.block_on(c.query_drop("UPDATE items SET v = 1 WHERE id = 13"))
        .unwrap();
    wait_for(Duration::from_secs(10), "streaming after a restart", || {
        ops(&out).contains(&("u".into(), 13))
    });
    assert_eq!(snapshots(), 22, "no snapshot at the restart");
    assert!(hub.stop().success());
    drop(c);
    drop(cleanup);
}

/// The saved checkpoint of `legacy`, and a way to rewrite it.
fn checkpoint(dir: &std::path::Path) -> Value {
    let store = rusqlite::Connection::open(dir.join("store.db")).unwrap();
    let text: String = store
        .query_row(
            "SELECT value FROM checkpoints WHERE source = 'legacy' AND key = 'mysql_cdc_position'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn set_checkpoint(dir: &std::path::Path, cp: &Value) {
    let store = rusqlite::Connection::open(dir.join("store.db")).unwrap();
    store
        .execute(
            "UPDATE checkpoints SET value = ?1 WHERE source = 'legacy' AND key = 'mysql_cdc_position'",
            [cp.to_string()],
        )
        .unwrap();
}

/// Issue 12, GTID resume: the checkpoint keeps MariaDB's GTID position
/// with the binlog file and offset, and a resume goes by GTID whenever the
/// file and offset are not that place on the server (a failover to a
/// server whose binlogs have other names or offsets, a purged or reset
/// binlog): (1) a file this server does not have, changes made while weft
/// was stopped: each delivered once, nothing again, no snapshot; (2) the
/// right file at an earlier offset (what another server's offsets look
/// like): nothing before the GTID position comes again, where a resume by
/// offset would repeat a transaction; (3) a GTID position the server's
/// binlogs do not reach stops the source with the way out.
#[test]
fn a_lost_binlog_position_resumes_by_gtid_and_repeats_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(Items {
        c,
        dir,
        out,
        _cleanup: cleanup,
    }) = items_db(&rt, "weft_cdc_gtid", "GTID")
    else {
        return;
    };
    let mut c = c;
    let count = |op: &str, id: i64| {
        ops(&out)
            .iter()
            .filter(|(o, i)| o == op && *i == id)
            .count()
    };
    let snapshots = || ops(&out).iter().filter(|(o, _)| o == "r").count();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(20), "the initial snapshot", || {
        snapshots() == 10
    });
    // the backfill's progress: 10 rows read
    assert_eq!(
        metric(&scrape(&hub), "weft_cdc_snapshot_rows{source=\"legacy\"}"),
        Some(10.0)
    );
    rt.block_on(c.query_drop("INSERT INTO items VALUES (11, 0)"))
        .unwrap();
    wait_for(Duration::from_secs(10), "a streamed insert", || {
        count("c", 11) == 1
    });
    assert!(hub.stop().success());
    let saved = checkpoint(dir.path());
    let gtid_pos = saved["gtid_pos"].as_str().unwrap_or_default().to_owned();
    assert!(!gtid_pos.is_empty(), "a GTID position is saved: {saved}");
    let server_pos: String = rt
        .block_on(c.query_first("SELECT @@gtid_binlog_pos"))
        .unwrap()
        .unwrap();
    // (the shared server has other writers: the saved position is at most
    // the server's, domain by domain)
    assert!(
        gtid_pos.split(',').all(|g| {
            let (d, n) = (g.split('-').next().unwrap(), g.rsplit('-').next().unwrap());
            server_pos.split(',').any(|s| {
                s.split('-').next() == Some(d)
                    && s.rsplit('-').next().unwrap().parse::<u64>().unwrap()
                        >= n.parse::<u64>().unwrap()
            })
        }),
        "saved {gtid_pos}, server {server_pos}"
    );

    // (1) a binlog this server does not have, changes made meanwhile
    rt.block_on(c.query_drop(
        "INSERT INTO items VALUES (12, 0); INSERT INTO items VALUES (13, 0);
         UPDATE items SET v = 5 WHERE id = 5",
    ))
    .unwrap();
    let mut moved = saved.clone();
    moved["file"] = Value::String("failed-over-bin.000042".into());
    moved["pos"] = Value::from(4);
    set_checkpoint(dir.path(), &moved);
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(
        Duration::from_secs(20),
        "the changes made meanwhile",
        || count("c", 12) == 1 && count("c", 13) == 1 && count("u", 5) == 1,
    );
    assert!(
        hub.log_text().contains("resuming by GTID"),
        "{}",
        hub.log_text()
    );
    rt.block_on(c.query_drop("INSERT INTO items VALUES (14, 0)"))
        .unwrap();
    wait_for(Duration::from_secs(10), "streaming on", || {
        count("c", 14) == 1
    });
    assert!(hub.stop().success());
    assert_eq!(snapshots(), 10, "no new snapshot");
    for (op, id) in [("c", 11), ("c", 12), ("c", 13), ("u", 5), ("c", 14)] {
        assert_eq!(count(op, id), 1, "{op} {id} once: {:?}", ops(&out));
    }
    let after = checkpoint(dir.path());
    assert_eq!(
        after["file"], saved["file"],
        "the position is this server's again: {after}"
    );

    // (2) the right file at an earlier offset: the start of insert 12
    let lines = jsonl_lines(&out);
    let start_12 = lines
        .iter()
        .find(|l| l["data"]["op"] == "c" && l["data"]["after"]["id"] == 12)
        .map(|l| l["data"]["source"]["pos"].clone())
        .unwrap();
    let id_12 = lines
        .iter()
        .find(|l| l["data"]["op"] == "c" && l["data"]["after"]["id"] == 12)
        .map(|l| l["data"]["source"]["file"].clone())
        .unwrap();
    // a transaction's start as the binlog has it (a resume by GTID takes
    // it from the event's size: the server skipped what came before)
    let boundary: Option<Option<String>> = rt
        .block_on(c.exec_first(
            "SELECT BINLOG_GTID_POS(?, ?)",
            (saved["file"].as_str().unwrap(), start_12.as_u64().unwrap()),
        ))
        .unwrap();
    assert!(
        boundary.flatten().is_some(),
        "insert 12 starts at an event boundary: {start_12}"
    );
    let mut earlier = after.clone();
    earlier["pos"] = start_12;
    set_checkpoint(dir.path(), &earlier);
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    rt.block_on(c.query_drop("INSERT INTO items VALUES (15, 0)"))
        .unwrap();
    wait_for(Duration::from_secs(20), "streaming after (2)", || {
        count("c", 15) == 1
    });
    assert!(hub.stop().success());
    for (op, id) in [("c", 12), ("c", 13), ("u", 5), ("c", 14), ("c", 15)] {
        assert_eq!(count(op, id), 1, "{op} {id} once: {:?}", ops(&out));
    }
    // a resume by GTID names this server's binlog (from the dump's first
    // event), as a resume by offset does
    assert!(id_12 == saved["file"], "{id_12}");

    // (2b) a transaction split over batches, its first 2 of 5 changes
    // stored, resumed by GTID (another server's offsets): changes 3 to 5
    // come, 1 and 2 do not (the skip goes by the transaction's GTID)
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    rt.block_on(c.query_drop("INSERT INTO items SELECT seq, 1 FROM seq_100_to_104"))
        .unwrap();
    wait_for(Duration::from_secs(20), "a 5-row transaction", || {
        count("c", 104) == 1
    });
    assert!(hub.stop().success());
    let first = jsonl_lines(&out)
        .into_iter()
        .find(|l| l["data"]["op"] == "c" && l["data"]["after"]["id"] == 100)
        .unwrap();
    let src = &first["data"]["source"];
    assert_eq!(src["tx_ordinal"], 1, "{src}");
    let before_t: Option<Option<String>> = rt
        .block_on(c.exec_first(
            "SELECT BINLOG_GTID_POS(?, ?)",
            (src["file"].as_str().unwrap(), src["pos"].as_u64().unwrap()),
        ))
        .unwrap();
    let mut split = checkpoint(dir.path());
    split["file"] = Value::String("failed-over-bin.000042".into());
    split["pos"] = Value::from(4);
    split["ordinal"] = Value::from(2);
    split["gtid_pos"] = Value::String(before_t.flatten().unwrap());
    split["tx_gtid"] = src["gtid"].clone();
    set_checkpoint(dir.path(), &split);
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(
        Duration::from_secs(20),
        "the rest of the transaction",
        || count("c", 104) == 2,
    );
    rt.block_on(c.query_drop("INSERT INTO items VALUES (16, 0)"))
        .unwrap();
    wait_for(Duration::from_secs(10), "streaming after (2b)", || {
        count("c", 16) == 1
    });
    assert!(hub.stop().success());
    for (id, n) in [
        (100, 1),
        (101, 1),
        (102, 2),
        (103, 2),
        (104, 2),
        (15, 1),
        (16, 1),
    ] {
        assert_eq!(count("c", id), n, "c {id} {n} time(s): {:?}", ops(&out));
    }

    // (3) a GTID position this server's binlogs do not reach
    let mut ahead = checkpoint(dir.path());
    ahead["file"] = Value::String("failed-over-bin.000042".into());
    ahead["gtid_pos"] = Value::String("0-1-999999999".into());
    set_checkpoint(dir.path(), &ahead);
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(10), "the loud error", || {
        hub.log_text().contains("weft cdc resnapshot")
    });
    assert!(
        hub.log_text().contains("GTID position 0-1-999999999"),
        "{}",
        hub.log_text()
    );
    drop(hub);
    drop(c);
    drop(cleanup);
}

/// Issue 12 through the binary on MariaDB: `events: per_transaction` (at
/// most 4 changes an event) while weft is SIGKILLed and restarted under 3
/// concurrent writers. Every committed transaction (by GTID) arrives,
/// each part under one idempotency key and one payload however often it
/// is redelivered, its parts holding each of its changes once in binlog
/// order (`tx_ordinal` 1..n) with one `last: true`, nothing of a
/// rolled-back transaction, and transactions first written in commit
/// order.
#[test]
fn per_transaction_events_across_sigkills_one_event_per_part_none_lost_in_commit_order() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut admin = match rt.block_on(Conn::from_url(ADMIN_URL)) {
        Ok(c) => c,
        Err(e) => {
            if ci() {
                panic!("MariaDB at {ADMIN_URL} is not reachable and CI=true: {e}");
            }
            eprintln!(
                "!!!!!! SKIPPING MariaDB per-transaction crash test: {ADMIN_URL} is not reachable: {e} !!!!!!"
            );
            return;
        }
    };
    let (log_bin, format): (i64, String) = rt
        .block_on(admin.query_first("SELECT @@log_bin, @@binlog_format"))
        .unwrap()
        .unwrap();
    if log_bin != 1 || format != "ROW" {
        if ci() {
            panic!("MariaDB has log_bin={log_bin} binlog_format={format} and CI=true");
        }
        eprintln!(
            "!!!!!! SKIPPING MariaDB per-transaction crash test: log_bin={log_bin} binlog_format={format} !!!!!!"
        );
        return;
    }
    let started = Instant::now();
    let suffix = unique_suffix();
    let db = format!("weft_cdc_txn_{suffix}");
    rt.block_on(admin.query_drop(format!("CREATE DATABASE `{db}`")))
        .unwrap();
    let cleanup = DropDb(db.clone());
    let url = format!("mysql://root@127.0.0.1:3306/{db}");
    let mut c = rt.block_on(Conn::from_url(url.as_str())).unwrap();
    rt.block_on(c.query_drop(
        "CREATE TABLE items (id INT PRIMARY KEY, v INT NOT NULL, note TEXT) ENGINE=InnoDB",
    ))
    .unwrap();
    rt.block_on(c.query_drop("INSERT INTO items SELECT seq, 0, 'seed' FROM seq_1_to_3"))
        .unwrap();
    let server_id = 1_000_000 + (u64::from_str_radix(&suffix[8..], 16).unwrap() % 1_000_000_000);
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
      mysql_cdc:
        url: {url}
        tables: [items]
        server_id: {server_id}
        events: per_transaction
        max_transaction_changes: 4
        batch_size: 6
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
"#
        ),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    let deadline = Instant::now() + Duration::from_secs(20);
    while jsonl_lines(&out).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "no snapshot; log:\n{}",
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
        let mut seen = HashSet::new();
        let mut n = 0u64;
        for l in &txn_lines(&jsonl_lines(&out)) {
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

    let file_pos = |d: &Value| {
        let file = d["file"].as_str().unwrap();
        let n: u64 = file.rsplit_once('.').unwrap().1.parse().unwrap();
        (n, d["pos"].as_u64().unwrap())
    };
    let mut by_id: BTreeMap<String, (String, Value)> = BTreeMap::new();
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut first_order = Vec::new();
    for l in &all {
        let id = l["causationid"].as_str().unwrap().to_owned();
        let key = l["id"].as_str().unwrap().to_owned();
        let d = &l["data"];
        if !by_id.contains_key(&id) {
            first_order.push((file_pos(d), d["part"].as_u64().unwrap()));
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
            format!(
                "txn@{}:{}#{}",
                d["file"].as_str().unwrap(),
                d["pos"],
                d["part"]
            ),
            "the id is the transaction's binlog position"
        );
    }
    let mut sorted = first_order.clone();
    sorted.sort_unstable();
    assert_eq!(first_order, sorted, "transactions written in commit order");
    let mut per_gtid: BTreeMap<String, Vec<(u64, Value)>> = BTreeMap::new();
    for (_, d) in by_id.values() {
        per_gtid
            .entry(d["gtid"].as_str().unwrap().to_owned())
            .or_default()
            .push((d["part"].as_u64().unwrap(), d.clone()));
    }
    assert_eq!(per_gtid.len(), committed.len(), "transactions");
    for (gtid, n) in &committed {
        let mut parts = per_gtid.remove(gtid).unwrap_or_default();
        parts.sort_by_key(|p| p.0);
        let nums: Vec<u64> = parts.iter().map(|p| p.0).collect();
        assert_eq!(
            nums,
            (1..=n.div_ceil(4)).collect::<Vec<_>>(),
            "parts of {gtid}"
        );
        let ords: Vec<u64> = parts
            .iter()
            .flat_map(|p| p.1["changes"].as_array().unwrap().clone())
            .map(|c| c["source"]["tx_ordinal"].as_u64().unwrap())
            .collect();
        assert_eq!(ords, (1..=*n).collect::<Vec<_>>(), "transaction {gtid}");
        let lasts: Vec<bool> = parts.iter().map(|p| p.1["last"] == true).collect();
        assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
        assert_eq!(lasts.last(), Some(&true), "transaction {gtid}");
    }
    eprintln!(
        "MariaDB per-transaction crash test: {expected} changes in {} transactions, {} parts, {kills} SIGKILLs, {} lines, {:.1}s",
        committed.len(),
        by_id.len(),
        all.len(),
        started.elapsed().as_secs_f64()
    );
    drop(c);
    drop(cleanup);
}
