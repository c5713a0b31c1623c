//! `store: {postgres: {url}}` through the real binary: webhooks accepted
//! into the PostgreSQL journal (a database of its own on the machine's
//! PostgreSQL, created and dropped here), delivered to a real HTTP server,
//! across a SIGKILL and a restart. Skipped loudly when PostgreSQL does not
//! answer, failed under `CI=true`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::json;

const SECRET: &str = "pgstore";

fn admin_url() -> String {
    std::env::var("WEFT_TEST_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into())
}

/// Run SQL on the server (its own runtime: the test is synchronous).
fn sql<T: Send + 'static>(
    url: &str,
    f: impl FnOnce(tokio_postgres::Client) -> futures_lite::BoxFut<T> + Send + 'static,
) -> Result<T, String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let task = tokio::spawn(conn);
            let out = f(client).await;
            task.abort();
            Ok(out)
        })
    })
    .join()
    .map_err(|_| "the SQL thread panicked".to_string())?
}

mod futures_lite {
    pub type BoxFut<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
}

fn exec(url: &str, statement: String) -> Result<(), String> {
    sql(url, move |c| {
        Box::pin(async move { c.batch_execute(&statement).await.map_err(|e| e.to_string()) })
    })?
}

fn count(url: &str, query: &'static str) -> i64 {
    sql(url, move |c| {
        Box::pin(async move { c.query_one(query, &[]).await.expect(query).get::<_, i64>(0) })
    })
    .expect("query")
}

/// A database of its own, dropped on drop.
struct Db {
    name: String,
}

impl Db {
    fn create() -> Option<Db> {
        if let Err(e) = exec(&admin_url(), "SELECT 1".into()) {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "PostgreSQL at {} is not reachable and CI=true: {e}",
                    admin_url()
                );
            }
            eprintln!(
                "!!!!!! SKIPPING PostgreSQL store test: {} is not reachable: {e} !!!!!!",
                admin_url()
            );
            return None;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("weft_e2e_{}_{nanos}", std::process::id());
        exec(&admin_url(), format!("CREATE DATABASE {name}")).expect("create database");
        Some(Db { name })
    }

    fn url(&self) -> String {
        let base = admin_url();
        let (server, _) = base
            .rsplit_once('/')
            .expect("an admin URL ending in /<database>");
        format!("{server}/{}", self.name)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = exec(
            &admin_url(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

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
    // rows the dead node had claimed wait for their lease (the write
    // timeout plus 30 s) before b writes them again, same keys
    wait_for(Duration::from_secs(120), "an empty outbox", || {
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

    // stopping gives the lease up: nobody holds it after
    b.stop();
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM weft.source_leases
             WHERE lease_until > (extract(epoch from clock_timestamp()) * 1000)::int8"
        ),
        0
    );
}
