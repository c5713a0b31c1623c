//! Topics inside the hub, through the real binary: one flow publishes a
//! source's records to a topic, flows subscribed to it each write their
//! own destination with their own position and DLQ; subscribers added
//! later start at the head or at the beginning; kill -9 while publishing
//! and consuming loses nothing and publishes nothing twice.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;

/// `n` records of 50 customers (id = seq % 50 + 1), in seq order.
fn contacts(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|seq| {
            format!(
                "{{\"id\": {}, \"seq\": {seq}, \"name\": \"customer {seq}\"}}\n",
                seq % 50 + 1
            )
        })
        .collect()
}

fn table(name: &str, key: &str) -> String {
    format!(
        r#"
    sink:
      sqlite:
        path: out/{name}.db
        table: {name}
        key: [{key}]
        columns:
          msg: text
          id: integer
          seq: integer
          name: text"#
    )
}

fn config(extra_systems: &str, extra_flows: &str) -> String {
    format!(
        r#"
store:
  path: data/weft.db
systems:
  crm:
    source:
      file:
        path: contacts.jsonl
        format: jsonl
        batch_size: 100
  erp:{erp}
  accounting:{accounting}
  audit:{audit}
  archive:{archive}
{extra_systems}
topics:
  customers:
    description: every change to a customer, once
    retention: 7d
flows:
  crm_to_customers:
    from: crm
    key: .id | tostring
    mapping: '{{id, seq, name}}'
    to: [customers]
  customers_to_erp:
    from: customers
    start: beginning
    mapping: '{{msg: $event.id, id, seq, name}}'
    to: [erp]
  customers_to_accounting:
    from: customers
    start: beginning
    # keyless: its rows take the direct path (written before the ingest commits)
    key: 'null'
    mapping: 'if .seq % 50 == 7 then error("accounting refuses customer \(.id)") else {{msg: $event.id, id, seq, name}} end'
    to: [accounting]
{extra_flows}
"#,
        erp = table("erp", "id"),
        accounting = table("accounting", "msg"),
        audit = table("audit", "msg"),
        archive = table("archive", "msg"),
    )
}

/// Another source publishing to the same topic (the first one's file is
/// read to its end already: a file rewritten is a new file to weft).
const SECOND_PUBLISHER: &str = r#"
  crm_eu:
    source:
      file:
        path: contacts-eu.jsonl
        format: jsonl
        batch_size: 100"#;

const LATE_SUBSCRIBERS: &str = r#"
  crm_eu_to_customers:
    from: crm_eu
    key: .id | tostring
    mapping: '{id, seq, name}'
    to: [customers]
  customers_to_audit:
    from: customers
    start: now
    mapping: '{msg: $event.id, id, seq, name}'
    to: [audit]
  customers_to_archive:
    from: customers
    start: beginning
    mapping: '{msg: $event.id, id, seq, name}'
    to: [archive]
"#;

fn rows(dir: &std::path::Path, name: &str) -> Vec<(String, i64, i64)> {
    let db = dir.join(format!("out/{name}.db"));
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.prepare(&format!("SELECT msg, id, seq FROM {name} ORDER BY seq"))
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// `(messages, distinct ids, distinct causing events)` of the topic.
fn topic_counts(dir: &std::path::Path) -> (i64, i64, i64) {
    let conn = rusqlite::Connection::open(dir.join("data/weft.db")).unwrap();
    conn.query_row(
        "SELECT count(*), count(DISTINCT id), count(DISTINCT causation_id) FROM topic_messages
         WHERE topic = 'customers'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap()
}

fn run_until_idle(dir: &std::path::Path) {
    let out = weft_cmd(
        dir,
        &[
            "run",
            "weft.yaml",
            "--until-idle",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    assert!(
        out.status.success(),
        "weft run --until-idle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lane<'a>(st: &'a serde_json::Value, flow: &str) -> &'a serde_json::Value {
    st["lanes"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["flow"] == flow))
        .unwrap_or_else(|| panic!("no lane of {flow}: {st}"))
}

#[test]
fn subscribers_of_a_topic_each_get_every_message_with_their_own_position_and_dlq() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let n = 1_000;
    std::fs::write(dir.path().join("contacts.jsonl"), contacts(0, n)).unwrap();
    std::fs::write(dir.path().join("weft.yaml"), config("", "")).unwrap();
    let out = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("1 topic"), "{said}");
    assert!(
        said.contains(
            "topic customers: kept 7d, read by customers_to_accounting, customers_to_erp"
        ),
        "{said}"
    );
    run_until_idle(dir.path());

    // the topic holds each record once
    assert_eq!(topic_counts(dir.path()), (n as i64, n as i64, n as i64));
    // erp upserts by customer: the last change of each, so the key's order
    // held from the source through the topic to the destination
    let erp = rows(dir.path(), "erp");
    assert_eq!(erp.len(), 50);
    for (_, id, seq) in &erp {
        let last = (0..n as i64).filter(|s| s % 50 + 1 == *id).max().unwrap();
        assert_eq!(*seq, last, "customer {id}");
    }
    // accounting keeps each message: all but the ones its mapping refused,
    // and those are in ITS dead letters only
    let refused = (0..n).filter(|s| s % 50 == 7).count();
    let accounting = rows(dir.path(), "accounting");
    assert_eq!(accounting.len(), n - refused);
    assert!(accounting.iter().all(|(_, _, seq)| seq % 50 != 7));
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    let acc = lane(&st, "customers_to_accounting");
    assert_eq!(acc["received"], n as u64, "{st}");
    assert_eq!(acc["delivered"], (n - refused) as u64, "{st}");
    assert_eq!(acc["rejected"], refused as u64, "{st}");
    let erp_lane = lane(&st, "customers_to_erp");
    assert_eq!(erp_lane["received"], n as u64, "{st}");
    assert_eq!(erp_lane["rejected"], 0, "{st}");
    assert_eq!(lane(&st, "crm_to_customers")["delivered"], n as u64, "{st}");
    let dlq = weft_cmd(dir.path(), &["dlq", "list", "-c", "weft.yaml", "--json"]);
    let dlq: serde_json::Value = serde_json::from_slice(&dlq.stdout).unwrap();
    let entries = dlq.as_array().expect("dlq list");
    assert_eq!(entries.len(), refused, "{dlq}");
    assert!(
        entries
            .iter()
            .all(|e| e["flow"] == "customers_to_accounting"
                && e["source"] == "customers/customers_to_accounting"
                && e["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("accounting refuses")),
        "{dlq}"
    );

    // two subscribers join: one from now, one from the beginning; a run
    // with nothing new fixes where `now` is
    std::fs::write(dir.path().join("contacts-eu.jsonl"), "").unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        config(SECOND_PUBLISHER, LATE_SUBSCRIBERS),
    )
    .unwrap();
    run_until_idle(dir.path());
    assert!(rows(dir.path(), "audit").is_empty());
    assert_eq!(rows(dir.path(), "archive").len(), n);
    // more records: every subscriber reads on from its own position
    let m = 200;
    std::fs::write(dir.path().join("contacts-eu.jsonl"), contacts(n, m)).unwrap();
    run_until_idle(dir.path());
    assert_eq!(topic_counts(dir.path()).0, (n + m) as i64);
    let audit = rows(dir.path(), "audit");
    assert_eq!(audit.len(), m, "only what was published after it joined");
    assert!(audit.iter().all(|(_, _, seq)| *seq >= n as i64));
    let archive = rows(dir.path(), "archive");
    assert_eq!(archive.len(), n + m);
    // the same message ids in every subscriber that has the message
    let accounting = rows(dir.path(), "accounting");
    let refused = (0..n + m).filter(|s| s % 50 == 7).count();
    assert_eq!(accounting.len(), n + m - refused);
    for (msg, _, seq) in &accounting {
        assert_eq!(&archive[*seq as usize].0, msg, "seq {seq}");
    }
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    // where each subscriber is: at the head, nothing behind
    let topic = &st["topics"][0];
    assert_eq!(topic["topic"], "customers", "{st}");
    assert_eq!(topic["messages"], (n + m) as u64, "{st}");
    let subs = topic["subscribers"].as_array().expect("subscribers");
    assert_eq!(subs.len(), 4, "{st}");
    assert!(
        subs.iter()
            .all(|s| s["behind"] == 0 && s["position"] == topic["head"]),
        "{st}"
    );
    for (flow, received) in [
        ("customers_to_erp", n + m),
        ("customers_to_accounting", n + m),
        ("customers_to_archive", n + m),
        ("customers_to_audit", m),
    ] {
        assert_eq!(
            lane(&st, flow)["received"],
            received as u64,
            "{flow} read each message once: {st}"
        );
    }
}

#[test]
fn sigkills_while_publishing_and_consuming_lose_nothing_and_publish_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let n = 20_000;
    std::fs::write(dir.path().join("contacts.jsonl"), contacts(0, n)).unwrap();
    let config = config("", "").replace("batch_size: 100", "batch_size: 500");
    std::fs::write(dir.path().join("weft.yaml"), config).unwrap();
    let archived = || -> usize {
        let db = dir.path().join("out/accounting.db");
        if !db.exists() {
            return 0;
        }
        rusqlite::Connection::open(&db)
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM accounting", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .map(|c| c as usize)
            .unwrap_or(0)
    };
    let rounds = AtomicUsize::new(0);
    let (kills, _) = kill_while(dir.path(), "weft.yaml", &[], || {
        rounds.fetch_add(1, Ordering::SeqCst) < 30 && archived() < n * 8 / 10
    });
    assert!(
        kills >= 2,
        "the kills landed before the load ended: {kills}"
    );
    run_until_idle(dir.path());
    let (messages, ids, events) = topic_counts(dir.path());
    assert_eq!(
        (messages, ids, events),
        (n as i64, n as i64, n as i64),
        "each record published once"
    );
    let refused = (0..n).filter(|s| s % 50 == 7).count();
    let accounting = rows(dir.path(), "accounting");
    assert_eq!(accounting.len(), n - refused, "each message written once");
    let erp = rows(dir.path(), "erp");
    assert_eq!(erp.len(), 50);
    for (_, id, seq) in &erp {
        let last = (0..n as i64).filter(|s| s % 50 + 1 == *id).max().unwrap();
        assert_eq!(*seq, last, "customer {id}: its last change, in order");
    }
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(lane(&st, "crm_to_customers")["delivered"], n as u64, "{st}");
    let acc = lane(&st, "customers_to_accounting");
    assert_eq!(acc["received"], n as u64, "each message counted once: {st}");
    assert_eq!(acc["delivered"], (n - refused) as u64, "{st}");
    assert_eq!(acc["pending"], 0, "{st}");
    eprintln!("topics under kill -9: {n} records, {kills} SIGKILLs, published once each");
}

#[test]
fn topic_config_mistakes_are_refused_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let bad = r#"
systems:
  crm:
    source:
      file:
        path: contacts.jsonl
        format: jsonl
  customers:
    sink:
      jsonl:
        path: out/c.jsonl
topics:
  customers: {}
  loop_a: {}
  loop_b: {}
flows:
  publish:
    from: crm
    start: beginning
    to: [customers]
  subscribe:
    from: loop_a
    start: yesterday
    to: [loop_b]
  back:
    from: loop_b
    to: [loop_a]
"#;
    std::fs::write(dir.path().join("weft.yaml"), bad).unwrap();
    let out = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "topics.customers",
        "is a system too",
        "flows.publish.start",
        "`start` is for a flow reading a topic",
        "flows.subscribe.start",
        "`yesterday`: expected `now` or `beginning`",
        "go round forever",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    // file:line:col on the values that have a place
    assert!(err.contains("weft.yaml:23:"), "{err}");
}
