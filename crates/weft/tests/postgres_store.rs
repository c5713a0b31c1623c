//! `store: {postgres: {url}}` through the real binary: webhooks accepted
//! into the PostgreSQL journal (a database of its own on the machine's
//! PostgreSQL, created and dropped here), delivered to a real HTTP server,
//! across a SIGKILL and a restart. Skipped loudly when PostgreSQL does not
//! answer, failed under `CI=true`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::pg::*;
use common::*;
use serde_json::json;

const SECRET: &str = "pgstore";

/// The record ids the destination received.
fn received_ids(rec: &Recorder) -> BTreeSet<u64> {
    rec.received
        .lock()
        .expect("received")
        .iter()
        .filter_map(|r| r.body["id"].as_u64())
        .collect()
}

/// Per record id, the idempotency keys it was written with.
fn keys_by_id(rec: &Recorder) -> BTreeMap<u64, BTreeSet<String>> {
    let mut keys: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for r in rec.received.lock().expect("received").iter() {
        keys.entry(r.body["id"].as_u64().expect("id"))
            .or_default()
            .insert(r.idempotency_key.clone().expect("an idempotency key"));
    }
    keys
}

fn post(hub: &Hub, id: u64, key: &str) -> u16 {
    let body = serde_json::json!({"id": id, "key": key}).to_string();
    reqwest::blocking::Client::new()
        .post(hub.url("/hooks/crm"))
        .header("x-event-id", format!("ev-{id}"))
        .header("x-signature-256", sign(SECRET, body.as_bytes()))
        .body(body)
        .send()
        .expect("post")
        .status()
        .as_u16()
}

#[test]
fn webhooks_through_the_postgres_journal_survive_a_kill() {
    let Some(db) = Db::create() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::start();
    let config = format!(
        r#"
store:
  postgres:
    url: ${{WEFT_PG_URL}}
    node: e2e
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
        secret: ${{HOOK_SECRET}}
  api:
    sink:
      http:
        url: {}/items/{{id}}
flows:
  items:
    from: crm
    key: .key
    mapping: 'if .id == 999 then error("id 999 is refused") else {{id, key}} end'
    to: [api]
"#,
        rec.url()
    );
    std::fs::write(dir.path().join("weft.yaml"), config).expect("config");
    let url = db.url();
    let env = [("HOOK_SECRET", SECRET), ("WEFT_PG_URL", url.as_str())];

    let hub = Hub::start(dir.path(), "weft.yaml", 0, &env);
    for id in 0..60 {
        assert_eq!(post(&hub, id, &format!("k{}", id % 5)), 202);
    }
    wait_for(Duration::from_secs(60), "60 deliveries", || {
        received_ids(&rec).len() == 60
    });
    hub.kill9();

    // the same node again: its leases end, nothing accepted is lost
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &env);
    for id in 60..120 {
        assert_eq!(post(&hub, id, &format!("k{}", id % 5)), 202);
    }
    for id in 0..10 {
        assert_eq!(post(&hub, id, &format!("k{}", id % 5)), 202, "a duplicate");
    }
    wait_for(Duration::from_secs(60), "120 deliveries", || {
        received_ids(&rec).len() == 120
    });
    wait_for(Duration::from_secs(30), "an empty outbox", || {
        count(&url, "SELECT count(*) FROM weft.outbox") == 0
    });

    // one idempotency key per event; per key, never an older one after a newer
    let got = rec.received.lock().expect("received").clone();
    let keys = keys_by_id(&rec);
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &got {
        let id = r.body["id"].as_u64().expect("id");
        per_key
            .entry(r.body["key"].as_str().expect("key").to_owned())
            .or_default()
            .push(id);
    }
    assert!(keys.values().all(|k| k.len() == 1), "{keys:?}");
    for (k, ids) in &per_key {
        assert!(ids.windows(2).all(|w| w[0] <= w[1]), "{k}: {ids:?}");
    }
    let delivered = count(
        &url,
        "SELECT COALESCE(sum(delivered), 0)::int8 FROM
           (SELECT delivered FROM weft.flow_counts WHERE flow = 'items' AND destination = 'api'
            UNION ALL SELECT delivered FROM weft.count_deltas WHERE flow = 'items' AND destination = 'api') t",
    );
    let accepted = count(
        &url,
        "SELECT COALESCE(sum(received), 0)::int8 FROM
           (SELECT received FROM weft.flow_counts WHERE flow = 'items'
            UNION ALL SELECT received FROM weft.count_deltas WHERE flow = 'items') t",
    );
    assert_eq!((accepted, delivered), (120, 120), "duplicates counted once");

    // the inspection commands read the PostgreSQL journal too, beside the hub
    let st = status(dir.path(), "weft.yaml", &env);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(st["lanes"][0]["received"], 120, "{st}");
    assert_eq!(st["lanes"][0]["delivered"], 120, "{st}");
    assert_eq!(st["dlq_depth"], 0, "{st}");
    assert_eq!(post(&hub, 999, "k9"), 202);
    wait_for(
        Duration::from_secs(30),
        "the refused record in the DLQ",
        || status(dir.path(), "weft.yaml", &env)["dlq_depth"] == 1,
    );
    let cmd = |args: &[&str]| {
        let mut all = vec![args[0], args[1], "-c", "weft.yaml"];
        all.extend_from_slice(&args[2..]);
        let out = weft_cmd_env(dir.path(), &all, &env);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let list: serde_json::Value =
        serde_json::from_slice(&cmd(&["dlq", "list", "--json"])).expect("dlq list json");
    let entries = list.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{list}");
    assert!(
        entries[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("id 999 is refused")),
        "{list}"
    );
    let id = entries[0]["id"].as_i64().expect("id").to_string();
    let shown: serde_json::Value =
        serde_json::from_slice(&cmd(&["dlq", "show", &id, "--json"])).expect("dlq show json");
    assert_eq!(shown["event_id"], "ev-999", "{shown}");
    // a change through the journal beside the running hub
    let out = String::from_utf8_lossy(&cmd(&["dlq", "discard", &id])).into_owned();
    assert!(out.contains("1 of 1 discarded"), "{out}");
    let st = status(dir.path(), "weft.yaml", &env);
    assert_eq!(st["dlq_depth"], 0, "{st}");
    assert_eq!(st["balanced"], true, "{st}");
    let cw = String::from_utf8_lossy(&cmd(&["crosswalk", "list"])).into_owned();
    assert!(cw.contains("no ids captured"), "{cw}");
    hub.stop();

    // a reader creates nothing: a schema without a journal is refused as such
    let main = std::fs::read_to_string(dir.path().join("weft.yaml")).expect("config");
    let other = main.replace("    node: e2e\n", "    node: e2e\n    schema: not_there\n");
    assert_ne!(main, other);
    std::fs::write(dir.path().join("other.yaml"), other).expect("config");
    let out = weft_cmd_env(dir.path(), &["status", "-c", "other.yaml"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no weft journal in schema not_there"),
        "{err}"
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'not_there'"
        ),
        0,
        "nothing created"
    );
}

/// `weft_source_lease_held` for `source` on a hub's `/metrics`, if shown.
fn lease_held(hub: &Hub, source: &str) -> Option<f64> {
    let text = reqwest::blocking::get(hub.admin_url("/metrics"))
        .ok()?
        .text()
        .ok()?;
    let prefix = format!("weft_source_lease_held{{source=\"{source}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Two hubs on one PostgreSQL journal with a polling source: only the node
/// holding the source's lease polls; the other waits on standby (ready, not
/// down). SIGKILLed, the holder's lease runs out and the other node takes
/// the source over, resuming from the committed checkpoint: every row
/// delivered, each with one idempotency key, the ledger balanced; a hub
/// that stops gives its lease up.
#[test]
fn a_polling_source_runs_on_one_node_and_moves_when_that_node_dies() {
    let Some(db) = Db::create() else { return };
    let url = db.url();
    exec(
        &url,
        "CREATE TABLE items (id int PRIMARY KEY, k text NOT NULL, updated_at bigint NOT NULL)"
            .into(),
    )
    .expect("table");
    let insert = |from: i32, to: i32| {
        exec(
            &url,
            format!(
                "INSERT INTO items SELECT i, 'k' || (i % 7), i FROM generate_series({from}, {to}) i"
            ),
        )
        .expect("insert");
    };
    insert(1, 40);
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = Recorder::start();
    let config = format!(
        r#"
store:
  postgres:
    url: ${{WEFT_PG_URL}}
    node: ${{WEFT_NODE}}
systems:
  db:
    source:
      sql_poll:
        url: ${{WEFT_PG_URL}}
        table: items
        cursor: updated_at
        key: id
        interval: 200ms
        batch_size: 10
  api:
    sink:
      http:
        url: {}/items/{{id}}
flows:
  items:
    from: db
    key: .id
    mapping: '{{id, k}}'
    to: [api]
"#,
        rec.url()
    );
    std::fs::write(dir.path().join("weft.yaml"), config).expect("config");
    let ea = [("WEFT_PG_URL", url.as_str()), ("WEFT_NODE", "a")];
    let eb = [("WEFT_PG_URL", url.as_str()), ("WEFT_NODE", "b")];

    let a = Hub::start(dir.path(), "weft.yaml", 0, &ea);
    wait_for(Duration::from_secs(60), "the first 40 rows", || {
        received_ids(&rec).len() == 40
    });
    let b = Hub::start(dir.path(), "weft.yaml", 0, &eb);
    wait_for(Duration::from_secs(30), "b on standby, a holding", || {
        lease_held(&b, "db") == Some(0.0) && lease_held(&a, "db") == Some(1.0)
    });
    let st = status(dir.path(), "weft.yaml", &eb);
    let leases = st["source_leases"].as_array().expect("source_leases");
    assert_eq!(leases.len(), 1, "{st}");
    assert_eq!(
        (&leases[0]["source"], &leases[0]["node"], &leases[0]["live"]),
        (&json!("db"), &json!("a"), &json!(true)),
        "{st}"
    );
    let ready = reqwest::blocking::get(b.admin_url("/readyz")).expect("readyz");
    assert!(ready.status().is_success(), "a standby node is ready");
    insert(41, 80);
    wait_for(Duration::from_secs(60), "80 rows", || {
        received_ids(&rec).len() == 80
    });
    let ran_on_b = |b: &Hub| {
        b.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("this node holds the source's lease"))
    };
    assert!(!ran_on_b(&b), "only the lease holder polls");

    // the holder dies: its lease runs out and b takes the source over
    a.kill9();
    insert(81, 120);
    wait_for(Duration::from_secs(90), "120 rows, through b", || {
        received_ids(&rec).len() == 120
    });
    assert!(ran_on_b(&b));
    assert_eq!(lease_held(&b, "db"), Some(1.0));

    let keys = keys_by_id(&rec);
    assert_eq!(keys.len(), 120);
    assert!(keys.values().all(|k| k.len() == 1), "{keys:?}");
    // rows the dead node had claimed are released once its heartbeat ran
    // out (10 s), by b's next beat, and b writes them again, same keys
    wait_for(Duration::from_secs(30), "an empty outbox", || {
        count(&url, "SELECT count(*) FROM weft.outbox") == 0
    });
    let st = status(dir.path(), "weft.yaml", &eb);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(
        st["lanes"][0]["received"], 120,
        "each row accepted once: {st}"
    );
    let lease = &st["source_leases"][0];
    assert_eq!(
        (&lease["node"], &lease["live"]),
        (&json!("b"), &json!(true)),
        "{st}"
    );
    assert!(lease["epoch"].as_i64().expect("epoch") >= 2, "{st}");
    let nodes: Vec<(String, bool)> = st["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap_or("").to_owned(),
                n["alive"] == true,
            )
        })
        .collect();
    assert_eq!(nodes, [("b".to_owned(), true)], "a was found dead: {st}");

    // stopping gives the lease up: nobody holds it after; b leaves
    b.stop();
    assert_eq!(count(&url, "SELECT count(*) FROM weft.nodes"), 0);
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM weft.source_leases
             WHERE lease_until > (extract(epoch from clock_timestamp()) * 1000)::int8"
        ),
        0
    );
}

/// A metric without labels on a hub's `/metrics`, if shown (and the hub
/// answers).
fn plain_metric(hub: &Hub, name: &str) -> Option<f64> {
    let text = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?
        .get(hub.admin_url("/metrics"))
        .send()
        .ok()?
        .text()
        .ok()?;
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Post webhook `id` to the first of `hubs` (from `start`, round robin)
/// that accepts it; a hub that is dead or does not answer in time is
/// passed over (the event id makes a late acceptance a duplicate).
fn post_somewhere(hubs: &[&Hub], start: usize, id: u64, key: &str) {
    let body = json!({"id": id, "key": key}).to_string();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    for round in 0..50 {
        let hub = hubs[(start + round) % hubs.len()];
        let sent = client
            .post(hub.url("/hooks/crm"))
            .header("x-event-id", format!("ev-{id}"))
            .header("x-signature-256", sign(SECRET, body.as_bytes()))
            .body(body.clone())
            .send();
        if sent.is_ok_and(|r| r.status().as_u16() == 202) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no hub accepted webhook {id}");
}

/// Three hubs on one PostgreSQL journal, fed at once by webhooks (to every
/// node), a polled table and a drop folder (one node at a time each). The
/// holder of both sources is SIGKILLed; then the node that took the polled
/// table over is SIGSTOPped until the third holds both sources and sees
/// itself as the only node alive, and then resumed. Every record is
/// delivered, each with one idempotency key, in order per key for the
/// first delivery of each; the ledger balances; each record is received
/// once; the dead node's claims were released by a heartbeat (not after
/// their lease), and the nodes leave the membership when they stop.
#[test]
fn three_nodes_lose_nothing_when_one_dies_and_another_pauses() {
    let Some(db) = Db::create() else { return };
    let url = db.url();
    exec(
        &url,
        "CREATE TABLE items (id int PRIMARY KEY, k text NOT NULL, updated_at bigint NOT NULL)"
            .into(),
    )
    .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let drop_dir = dir.path().join("drop");
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&drop_dir).expect("drop dir");
    std::fs::create_dir_all(&staging).expect("staging dir");
    let rec = Recorder::start();
    let config = format!(
        r#"
store:
  postgres:
    url: ${{WEFT_PG_URL}}
    node: ${{WEFT_NODE}}
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
        secret: ${{HOOK_SECRET}}
  db:
    source:
      sql_poll:
        url: ${{WEFT_PG_URL}}
        table: items
        cursor: updated_at
        key: id
        interval: 200ms
        batch_size: 10
  files:
    source:
      file:
        dir: drop
        format: jsonl
        poll_interval: 200ms
        settle: 200ms
        id_field: .id
  api:
    sink:
      http:
        url: {}/items/{{id}}
flows:
  hooks:
    from: crm
    key: .key
    mapping: '{{id, key}}'
    to: [api]
  rows:
    from: db
    key: .k
    mapping: '{{id: (.id + 100000), key: .k}}'
    to: [api]
  lines:
    from: files
    key: .key
    mapping: '{{id: (.id + 200000), key}}'
    to: [api]
"#,
        rec.url()
    );
    std::fs::write(dir.path().join("weft.yaml"), config).expect("config");
    let start = |node: &str| {
        let env = [
            ("WEFT_PG_URL", url.as_str()),
            ("WEFT_NODE", node),
            ("HOOK_SECRET", SECRET),
        ];
        Hub::start(dir.path(), "weft.yaml", 0, &env)
    };
    let eb = [
        ("WEFT_PG_URL", url.as_str()),
        ("WEFT_NODE", "b"),
        ("HOOK_SECRET", SECRET),
    ];

    // the feeder: 10 rows and one file of 10 lines every 300 ms, until told
    let stop_feeding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let feeder = {
        let (url, stop, fed) = (url.clone(), stop_feeding.clone(), fed.clone());
        let (drop_dir, staging) = (drop_dir.clone(), staging.clone());
        std::thread::spawn(move || {
            let mut n: u64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let (from, to) = (n * 10 + 1, n * 10 + 10);
                exec(
                    &url,
                    format!(
                        "INSERT INTO items SELECT i, 'k' || (i % 7), i FROM generate_series({from}, {to}) i"
                    ),
                )
                .expect("insert");
                let lines: String = (from..=to)
                    .map(|i| format!("{}\n", json!({"id": i, "key": format!("f{}", i % 5)})))
                    .collect();
                let name = format!("batch-{n:05}.jsonl");
                std::fs::write(staging.join(&name), lines).expect("write file");
                std::fs::rename(staging.join(&name), drop_dir.join(&name)).expect("move file");
                n += 1;
                fed.store(n, std::sync::atomic::Ordering::Release);
                std::thread::sleep(Duration::from_millis(300));
            }
            n
        })
    };

    let a = start("a");
    wait_for(Duration::from_secs(30), "a holding both sources", || {
        lease_held(&a, "db") == Some(1.0) && lease_held(&a, "files") == Some(1.0)
    });
    let b = start("b");
    let c = start("c");
    let mut next_id = 0u64;
    let mut post_n = |hubs: &[&Hub], n: u64| {
        for _ in 0..n {
            post_somewhere(
                hubs,
                next_id as usize,
                next_id,
                &format!("h{}", next_id % 7),
            );
            next_id += 1;
        }
    };
    post_n(&[&a, &b, &c], 300);

    // a, holding both sources and claims, dies
    a.kill9();
    post_n(&[&b, &c], 300);
    wait_for(
        Duration::from_secs(30),
        "b or c took the polled table",
        || lease_held(&b, "db") == Some(1.0) || lease_held(&c, "db") == Some(1.0),
    );
    let (paused, other) = if lease_held(&b, "db") == Some(1.0) {
        (&b, &c)
    } else {
        (&c, &b)
    };

    // the new holder pauses (SIGSTOP): the other takes over everything
    paused.signal(19);
    post_n(&[other], 300);
    wait_for(
        Duration::from_secs(40),
        "the other node holding both sources, alone alive",
        || {
            lease_held(other, "db") == Some(1.0)
                && lease_held(other, "files") == Some(1.0)
                && plain_metric(other, "weft_nodes_alive") == Some(1.0)
        },
    );
    paused.signal(18);
    stop_feeding.store(true, std::sync::atomic::Ordering::Release);
    let batches = feeder.join().expect("feeder");
    assert!(batches > 10, "fed only {batches} batches");

    let mut expected: BTreeSet<u64> = (0..900).collect();
    for i in 1..=batches * 10 {
        expected.insert(100_000 + i);
        expected.insert(200_000 + i);
    }
    wait_for(Duration::from_secs(90), "every record delivered", || {
        received_ids(&rec) == expected
    });
    wait_for(Duration::from_secs(30), "an empty outbox", || {
        count(&url, "SELECT count(*) FROM weft.outbox") == 0
    });
    let keys = keys_by_id(&rec);
    assert!(
        keys.values().all(|k| k.len() == 1),
        "one idempotency key per record"
    );
    // per key, the first deliveries of records come in order
    let mut seen = BTreeSet::new();
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in rec.received.lock().expect("received").iter() {
        let id = r.body["id"].as_u64().expect("id");
        if seen.insert(id) {
            let key = format!("{}:{}", id / 100_000, r.body["key"].as_str().expect("key"));
            per_key.entry(key).or_default().push(id);
        }
    }
    for (k, ids) in &per_key {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{k}: {ids:?}");
    }
    let st = status(dir.path(), "weft.yaml", &eb);
    assert_eq!(st["balanced"], true, "{st}");
    let received = |flow: &str| {
        st["lanes"]
            .as_array()
            .expect("lanes")
            .iter()
            .find(|l| l["flow"] == flow)
            .map(|l| l["received"].as_u64().unwrap_or(0))
    };
    assert_eq!(
        received("hooks"),
        Some(900),
        "each webhook accepted once: {st}"
    );
    assert_eq!(received("rows"), Some(batches * 10), "{st}");
    assert_eq!(received("lines"), Some(batches * 10), "{st}");
    let db_lease = st["source_leases"]
        .as_array()
        .expect("leases")
        .iter()
        .find(|l| l["source"] == "db")
        .cloned()
        .expect("db lease");
    assert!(
        db_lease["epoch"].as_i64().expect("epoch") >= 3,
        "a, then two others: {st}"
    );
    // the paused node beats again once resumed
    wait_for(Duration::from_secs(20), "b and c alive", || {
        let st = status(dir.path(), "weft.yaml", &eb);
        let nodes: Vec<(String, bool)> = st["nodes"]
            .as_array()
            .map(|ns| {
                ns.iter()
                    .map(|n| {
                        (
                            n["node"].as_str().unwrap_or("").to_owned(),
                            n["alive"] == true,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        nodes == [("b".to_owned(), true), ("c".to_owned(), true)]
    });
    let logs = format!("{}\n{}", b.log_text(), c.log_text());
    assert!(
        logs.contains("a node's heartbeat ran out"),
        "a dead node's claims released by a heartbeat"
    );
    assert!(b.stop().success());
    assert!(c.stop().success());
    assert_eq!(
        count(&url, "SELECT count(*) FROM weft.nodes"),
        0,
        "both left"
    );
}
