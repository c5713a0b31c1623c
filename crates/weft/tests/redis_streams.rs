//! Redis Streams in and out through the real `weft` binary.
//!
//! Guarantees: entries consumed from a stream reach the destination stream
//! once each (one `ce_id` per entry, none lost) whether weft is SIGKILLed
//! while consuming and publishing or Redis restarts under it; bad entries
//! (not JSON, oversized, no payload field) go to the DLQ with where they
//! were and consumption goes on; CloudEvents attributes, the correlation
//! id and the trace context travel from entry to entry.
//!
//! The machine's Redis on 127.0.0.1:6379 (`.ci/services.sh`), keys of each
//! test's own (deleted at the end); the restart test starts a
//! redis-server of its own on its own port and folder. Skipped with a
//! message when Redis is not there, unless `CI=true`, where that is a
//! failure.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const URL: &str = "redis://127.0.0.1:6379";
const LOG: &[(&str, &str)] = &[("WEFT_LOG", "info,weft_connectors::broker=debug")];

type Fields = Vec<(String, String)>;

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A connection to a Redis, and the keys (or `*` patterns) to delete at
/// the end.
struct Bus {
    url: String,
    conn: redis::Connection,
    keys: Vec<String>,
}

impl Bus {
    /// The machine's Redis, or `None` (skip) when it is not there.
    fn machine() -> Option<Bus> {
        match Bus::connect(URL) {
            Ok(b) => Some(b),
            Err(e) if ci() => panic!("Redis at {URL} is not reachable and CI=true: {e}"),
            Err(e) => {
                eprintln!("SKIPPED: Redis at {URL} is not reachable ({e}); run .ci/services.sh");
                None
            }
        }
    }

    fn connect(url: &str) -> Result<Bus, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(3))
            .map_err(|e| e.to_string())?;
        Ok(Bus {
            url: url.to_owned(),
            conn,
            keys: Vec::new(),
        })
    }

    /// Add entries (pipelined); each a list of fields.
    fn add(&mut self, stream: &str, entries: &[Vec<(&str, Vec<u8>)>]) {
        for chunk in entries.chunks(500) {
            let mut p = redis::pipe();
            for fields in chunk {
                let c = p.cmd("XADD").arg(stream).arg("*");
                for (k, v) in fields {
                    c.arg(*k).arg(v.as_slice());
                }
                p.ignore();
            }
            let () = p.query(&mut self.conn).unwrap();
        }
    }

    fn len(&mut self, stream: &str) -> u64 {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.conn)
            .unwrap_or(0)
    }

    fn entries(&mut self, stream: &str) -> Vec<(String, Fields)> {
        redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.conn)
            .unwrap()
    }

    /// Entries the group holds unacknowledged, and entries not yet read
    /// by it (`lag`, Redis 7).
    fn group(&mut self, stream: &str, group: &str) -> (i64, i64) {
        let groups: Vec<BTreeMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query(&mut self.conn)
            .unwrap();
        let g = groups
            .iter()
            .find(|g| {
                matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == group.as_bytes())
            })
            .unwrap_or_else(|| panic!("no group {group}: {groups:?}"));
        let int = |k: &str| match g.get(k) {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("{k}: {other:?}"),
        };
        (int("pending"), int("lag"))
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut self.keys);
        // a fresh connection (the server may have restarted)
        let Ok(mut c) = redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(3)))
        else {
            return;
        };
        for k in keys {
            let names: Vec<String> = if k.contains('*') {
                redis::cmd("KEYS").arg(&k).query(&mut c).unwrap_or_default()
            } else {
                vec![k]
            };
            for n in names {
                let _: Result<i64, _> = redis::cmd("DEL").arg(&n).query(&mut c);
            }
        }
    }
}

fn field<'a>(e: &'a Fields, name: &str) -> Option<&'a str> {
    e.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn data(e: &Fields) -> Value {
    serde_json::from_str(field(e, "data").expect("a data field")).unwrap()
}

fn write_config(dir: &Path, url: &str, source: &str, sink: &str, flow: &str) {
    std::fs::write(
        dir.join("weft.yaml"),
        format!(
            r#"
store:
  path: ./store.db
systems:
  bus_in:
    source:
      redis:
        url: {url}
{source}
  bus_out:
    circuit_breaker: {{cooldown: 1s}}
    sink:
      redis:
        url: {url}
{sink}
flows:
  customers:
    from: bus_in
{flow}
    to: [bus_out]
"#
        ),
    )
    .unwrap();
}

fn seq_entries(r: std::ops::Range<u64>, keys: u64) -> Vec<Vec<(&'static str, Vec<u8>)>> {
    r.map(|s| {
        vec![(
            "data",
            json!({"seq": s, "id": s % keys}).to_string().into_bytes(),
        )]
    })
    .collect()
}

#[test]
fn entries_flow_through_with_their_cloudevent_and_bad_ones_go_to_the_dlq() {
    let Some(mut bus) = Bus::machine() else {
        return;
    };
    let id = unique_suffix();
    let (inn, out) = (
        format!("weft-test:e2e-in:{id}"),
        format!("weft-test:e2e-out:{id}"),
    );
    let dedupe = format!("weft-test:e2e-dedupe:{id}:");
    bus.keys = vec![inn.clone(), out.clone(), format!("{dedupe}*")];
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        URL,
        &format!(
            "        stream: '{inn}'\n        batch: 8\n        max_message_bytes: 2048\n        block: 300ms\n"
        ),
        &format!(
            "        stream: '{out}'\n        dedupe_prefix: '{dedupe}'\n        fields: {{x-origin: weft}}\n"
        ),
        "    key: .id\n    mapping: '{id, name: (.name | ascii_upcase)}'\n",
    );
    let checked = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(10), "weft to create the stream", || {
        redis::cmd("TYPE")
            .arg(&inn)
            .query::<String>(&mut bus.conn)
            .is_ok_and(|t| t == "stream")
    });
    let mut entries: Vec<Vec<(&str, Vec<u8>)>> = (0..20)
        .map(|i| {
            vec![(
                "data",
                json!({"id": i, "name": format!("n{i}")})
                    .to_string()
                    .into_bytes(),
            )]
        })
        .collect();
    entries.push(vec![("data", b"{\"id\": 99, ".to_vec())]);
    entries.push(vec![(
        "data",
        json!({"id": 98, "pad": "x".repeat(3000)})
            .to_string()
            .into_bytes(),
    )]);
    entries.push(vec![("body", b"{\"id\": 97}".to_vec())]);
    entries.push(vec![
        (
            "data",
            json!({"id": 77, "name": "ce"}).to_string().into_bytes(),
        ),
        ("ce_id", b"crm-77".to_vec()),
        ("ce_source", b"/crm".to_vec()),
        ("ce_type", b"crm.customer.updated".to_vec()),
        ("ce_specversion", b"1.0".to_vec()),
        ("x-correlation-id", b"corr-77".to_vec()),
        (
            "traceparent",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec(),
        ),
    ]);
    bus.add(&inn, &entries);
    let in_ids: Vec<String> = bus.entries(&inn).into_iter().map(|(id, _)| id).collect();
    wait_for(Duration::from_secs(20), "21 entries out", || {
        bus.len(&out) >= 21
    });
    wait_for(Duration::from_secs(10), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["delivered"] == 21 && st["lanes"][0]["pending"] == 0
    });
    // every entry acked after its commit, the bad ones too
    wait_for(Duration::from_secs(10), "every entry acked", || {
        bus.group(&inn, "weft-bus_in") == (0, 0)
    });
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");

    let got = bus.entries(&out);
    assert_eq!(got.len(), 21);
    let ids: HashSet<&str> = got.iter().filter_map(|(_, e)| field(e, "ce_id")).collect();
    assert_eq!(ids.len(), 21, "one ce_id per entry");
    let first = &got[0].1;
    assert_eq!(data(first), json!({"id": 0, "name": "N0"}));
    assert_eq!(field(first, "ce_type"), Some("weft.customers"));
    assert_eq!(field(first, "ce_subject"), Some("0"));
    assert_eq!(
        field(first, "x-causation-id"),
        Some(format!("{inn}:{}", in_ids[0]).as_str())
    );
    assert_eq!(field(first, "x-origin"), Some("weft"));
    let ce = &got
        .iter()
        .find(|(_, e)| field(e, "ce_subject") == Some("77"))
        .unwrap()
        .1;
    assert_eq!(field(ce, "x-correlation-id"), Some("corr-77"));
    assert_eq!(field(ce, "x-causation-id"), Some("/crm#crm-77"));
    assert_eq!(
        field(ce, "traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );

    // the three bad entries, in the DLQ with where they were
    let out = weft_cmd(dir.path(), &["dlq", "list", "-c", "weft.yaml", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dlq: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dlq.len(), 3, "{dlq:?}");
    let errors: BTreeMap<String, String> = dlq
        .iter()
        .map(|e| {
            assert_eq!(e["stage"], "parse", "{e}");
            (
                e["event_id"].as_str().unwrap().to_owned(),
                e["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let e = &errors[&format!("{inn}:{}", in_ids[20])];
    assert!(
        e.contains(&format!("redis stream {inn} entry {}", in_ids[20])),
        "{e}"
    );
    assert!(e.contains("not JSON"), "{e}");
    let e = &errors[&format!("{inn}:{}", in_ids[21])];
    assert!(e.contains("over max_message_bytes (2048)"), "{e}");
    let e = &errors[&format!("{inn}:{}", in_ids[22])];
    assert!(e.contains("no `data` field"), "{e}");
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    let flow = st["lanes"][0].clone();
    assert_eq!(flow["received"], 24, "{st}");
    assert_eq!(flow["rejected"], 3, "{st}");
}

/// Checks of the destination stream: one entry and one `ce_id` per input
/// `seq`, every seq of `0..total`.
fn check_out(bus: &mut Bus, stream: &str, total: u64) {
    let got = bus.entries(stream);
    let mut by_seq: BTreeMap<u64, HashSet<String>> = BTreeMap::new();
    let mut ids = HashSet::new();
    for (_, e) in &got {
        let v = data(e);
        let id = field(e, "ce_id").expect("ce_id").to_owned();
        assert!(ids.insert(id.clone()), "ce_id {id} added twice");
        by_seq
            .entry(v["seq"].as_u64().unwrap())
            .or_default()
            .insert(id);
    }
    let missing: Vec<u64> = (0..total).filter(|s| !by_seq.contains_key(s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let twice: Vec<_> = by_seq.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "published under two ids: {twice:?}");
    assert_eq!(got.len() as u64, total, "one entry per input entry");
}

#[test]
fn sigkill_while_consuming_and_publishing_loses_and_duplicates_nothing() {
    let Some(mut bus) = Bus::machine() else {
        return;
    };
    const PRELOADED: u64 = 3000;
    const LATER: u64 = 1500;
    let id = unique_suffix();
    let (inn, out) = (
        format!("weft-test:kill-in:{id}"),
        format!("weft-test:kill-out:{id}"),
    );
    let dedupe = format!("weft-test:kill-dedupe:{id}:");
    bus.keys = vec![inn.clone(), out.clone(), format!("{dedupe}*")];
    bus.add(&inn, &seq_entries(0..PRELOADED, 97));
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        URL,
        &format!("        stream: '{inn}'\n        batch: 16\n        block: 300ms\n"),
        &format!("        stream: '{out}'\n        dedupe_prefix: '{dedupe}'\n"),
        // small batches: more commits, so the kills come mid-stream
        "    key: .id\n    delivery: {batch_size: 25}\n",
    );
    // a publisher adds entries while weft is killed and started again
    let publisher = {
        let inn = inn.clone();
        std::thread::spawn(move || {
            let mut b = Bus::connect(URL).unwrap();
            for start in (PRELOADED..PRELOADED + LATER).step_by(50) {
                b.add(&inn, &seq_entries(start..start + 50, 97));
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    let started = Instant::now();
    let kills = AtomicUsize::new(0);
    // how much was out after each kill
    let seen = std::sync::Mutex::new(Vec::new());
    let (n, logs) = kill_while(dir.path(), "weft.yaml", LOG, || {
        let k = kills.fetch_add(1, Ordering::SeqCst);
        let mut b = Bus::connect(URL).unwrap();
        let now = b.len(&out);
        if k > 0 {
            seen.lock().unwrap().push(now);
        }
        // at least four kills, and more while entries are still on their way
        k < 4 || ((!publisher.is_finished() || now < PRELOADED + LATER) && k < 12)
    });
    assert!(n >= 4);
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter()
            .filter(|c| **c > 0 && **c < PRELOADED + LATER)
            .count()
            >= 1,
        "the kills did not come mid-stream ({seen:?} out after each); make the run longer"
    );
    publisher.join().unwrap();
    let total = PRELOADED + LATER;
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    let deadline = Instant::now() + Duration::from_secs(40);
    while bus.len(&out) < total {
        if Instant::now() > deadline {
            panic!(
                "{} of {total} out after {n} kills; logs:\n{}\n=====\n{}",
                bus.len(&out),
                logs.join("\n=====\n"),
                hub.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(Duration::from_secs(20), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == total
    });
    // what the killed wefts held was read again at their restarts (the
    // same consumer name): nothing is left pending
    wait_for(Duration::from_secs(20), "every entry acked", || {
        bus.group(&inn, "weft-bus_in") == (0, 0)
    });
    assert!(hub.stop().success());
    check_out(&mut bus, &out, total);
    // redeliveries of what a killed weft held were recognised: each entry
    // received once
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(st["lanes"][0]["received"], total, "{st}");
    let reread = logs
        .iter()
        .filter(|l| l.contains("reading pending entries again"))
        .count();
    eprintln!(
        "{total} entries through {n} SIGKILLs in {:.1}s (out after each kill: {seen:?}; {reread} starts read pending entries again)",
        started.elapsed().as_secs_f64()
    );
}

/// A redis-server of the test's own, on its own port and folder, with an
/// append-only file (what it acknowledged survives a restart).
struct OwnServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnServer {
    fn start() -> Option<OwnServer> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            if ci() {
                panic!("redis-server is missing and CI=true");
            }
            eprintln!("SKIPPED: redis-server is not installed");
            return None;
        }
        let mut s = OwnServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        s.up();
        Some(s)
    }

    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for(Duration::from_secs(10), "redis-server to answer", || {
            Bus::connect(&self.url())
                .ok()
                .and_then(|mut b| redis::cmd("PING").query::<String>(&mut b.conn).ok())
                .is_some()
        });
    }

    /// SIGTERM (a clean stop: the append-only file is flushed) and wait
    /// for the exit.
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_redis_restart_while_weft_runs_loses_and_duplicates_nothing() {
    let Some(mut server) = OwnServer::start() else {
        return;
    };
    let url = server.url();
    let (inn, out) = ("restart-in", "restart-out");
    let mut bus = Bus::connect(&url).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &url,
        &format!("        stream: {inn}\n        batch: 32\n        block: 300ms\n"),
        &format!("        stream: {out}\n        timeout: 1s\n        connect_timeout: 500ms\n"),
        "    key: .id\n    delivery: {batch_size: 50, max_backoff: 1s}\n",
    );
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(10), "weft to create the stream", || {
        redis::cmd("TYPE")
            .arg(inn)
            .query::<String>(&mut bus.conn)
            .is_ok_and(|t| t == "stream")
    });
    bus.add(inn, &seq_entries(0..600, 13));
    wait_for(Duration::from_secs(20), "some entries through", || {
        bus.len(out) >= 50
    });
    // the server goes away mid-stream and comes back with its data
    server.down();
    std::thread::sleep(Duration::from_millis(500));
    server.up();
    let mut bus = Bus::connect(&url).unwrap();
    bus.add(inn, &seq_entries(600..800, 13));
    let deadline = Instant::now() + Duration::from_secs(40);
    while bus.len(out) < 800 {
        assert!(
            Instant::now() < deadline,
            "{} of 800 out after the restart; log:\n{}",
            bus.len(out),
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(Duration::from_secs(20), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == 800
    });
    wait_for(Duration::from_secs(20), "every entry acked", || {
        bus.group(inn, "weft-bus_in") == (0, 0)
    });
    let log = hub.log_text();
    assert!(hub.stop().success());
    check_out(&mut bus, out, 800);
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["lanes"][0]["received"], 800, "{st}");
    assert!(
        log.contains("connecting again"),
        "the source saw the restart: {log}"
    );
}

#[test]
fn bad_redis_settings_fail_validate_with_their_lines() {
    // nothing connects: no server needed
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        r#"store:
  path: ./store.db
systems:
  bus:
    source:
      redis:
        url: redis://127.0.0.1:6379
        stream: orders
        subject: x
  out:
    sink:
      redis:
        stream: erp
  out2:
    sink:
      redis:
        url: rediss://127.0.0.1:6380
        stream: ''
        maxlen: 0
flows:
  f:
    from: bus
    to: [out, out2]
"#,
    )
    .unwrap();
    let out = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("weft.yaml:9:") && text.contains("unknown field `subject`"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:12:") && text.contains("missing field `url`"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:17:") && text.contains("`rediss://` (TLS) is not built in"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:18:") && text.contains("systems.out2.sink.redis.stream"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:19:") && text.contains("systems.out2.sink.redis.maxlen"),
        "{text}"
    );
}
