//! Kafka in and out through the real `weft` binary, against a real
//! Kafka-compatible broker: a `tansu broker` each test starts on a free
//! port (`weft-connectors/tests/common/tansu.rs`).
//!
//! Guarantees: messages consumed from a topic reach the destination topic,
//! none lost and none published under two ids; bad messages (not JSON, oversized,
//! tombstones) go to the DLQ with their topic, partition and offset and
//! consumption goes on; CloudEvents headers, the key, the correlation id
//! and the trace context travel from message to message.
//!
//! Also: weft SIGKILLed again and again while it consumes and publishes
//! (nothing lost, each message received once: the offsets are stored with
//! the messages, and none published under two ids), and the broker
//! restarted under a running weft (tansu 0.6.0 keeps nothing across a
//! restart: the test puts the input topic back as it was, and weft
//! connects again and goes on from its positions). Skipped with a message when `tansu` is not installed,
//! unless `CI=true`, where that is a failure.
#![cfg(feature = "kafka")]

mod common;
#[path = "../../weft-connectors/tests/common/tansu.rs"]
mod tansu;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tansu::{Msg, Tansu};

const LOG: &[(&str, &str)] = &[("WEFT_LOG", "info,weft_connectors::broker=debug")];

fn write_config(dir: &Path, brokers: &str, source: &str, sink: &str, flow: &str) {
    std::fs::write(
        dir.join("weft.yaml"),
        format!(
            r#"
store:
  path: ./store.db
systems:
  bus_in:
    source:
      kafka:
        brokers: '{brokers}'
        session_timeout: 6s
{source}
  bus_out:
    circuit_breaker: {{cooldown: 1s}}
    sink:
      kafka:
        brokers: '{brokers}'
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

#[test]
fn kafka_messages_flow_through_with_their_cloudevent_and_bad_ones_go_to_the_dlq() {
    let Some(broker) = Tansu::start() else {
        return;
    };
    let brokers = broker.brokers();
    tansu::create_topic(&brokers, "e2e-in", 2);
    tansu::create_topic(&brokers, "e2e-out", 1);
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &brokers,
        "        topics: [e2e-in]\n        batch: 8\n        max_message_bytes: 2048\n",
        "        topic: e2e-out\n        headers: {x-origin: weft}\n",
        "    key: .id\n    mapping: '{id, name: (.name | ascii_upcase)}'\n",
    );
    let checked = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let mut msgs: Vec<Msg> = (0..20)
        .map(|i| Msg {
            partition: Some(i % 2),
            ..Msg::json(&json!({"id": i, "name": format!("n{i}")}))
        })
        .collect();
    let on0 = |value: Option<Vec<u8>>| Msg {
        value,
        partition: Some(0),
        ..Msg::default()
    };
    msgs.push(on0(Some(b"{\"id\": 99, ".to_vec())));
    msgs.push(on0(Some(
        json!({"id": 98, "pad": "x".repeat(3000)})
            .to_string()
            .into_bytes(),
    )));
    msgs.push(on0(None));
    msgs.push(Msg {
        partition: Some(1),
        headers: [
            ("ce_id", "crm-77"),
            ("ce_source", "/crm"),
            ("ce_type", "crm.customer.updated"),
            ("ce_specversion", "1.0"),
            ("x-correlation-id", "corr-77"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..Msg::json(&json!({"id": 77, "name": "ce"}))
    });
    tansu::produce(&brokers, "e2e-in", &msgs);
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(dir.path(), "weft.yaml", &[]);
        if st["lanes"][0]["delivered"] == 21 && st["lanes"][0]["pending"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: {st}; log:\n{}\ntansu:\n{}",
            hub.log_text(),
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // every message's offset committed after its commit, the bad ones too
    wait_for(Duration::from_secs(20), "the offsets committed", || {
        tansu::committed(&brokers, "weft-bus_in", "e2e-in", 2) == [13, 11]
    });
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");

    let got = tansu::read_all(&brokers, "e2e-out", 1, 21, Duration::from_secs(20));
    assert_eq!(got.len(), 21);
    let ids: HashSet<&str> = got.iter().filter_map(|m| m.header("ce_id")).collect();
    assert_eq!(ids.len(), 21, "one ce_id per message");
    let first = got
        .iter()
        .find(|m| m.header("ce_subject") == Some("0"))
        .unwrap();
    assert_eq!(first.json(), json!({"id": 0, "name": "N0"}));
    assert_eq!(first.key.as_deref(), Some(b"0".as_slice()));
    assert_eq!(first.header("ce_type"), Some("weft.customers"));
    assert_eq!(first.header("x-causation-id"), Some("e2e-in/0/0"));
    assert_eq!(first.header("x-origin"), Some("weft"));
    let ce = got
        .iter()
        .find(|m| m.header("ce_subject") == Some("77"))
        .unwrap();
    assert_eq!(ce.header("x-correlation-id"), Some("corr-77"));
    assert_eq!(ce.header("x-causation-id"), Some("/crm#crm-77"));
    assert_eq!(
        ce.header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );

    // the three bad messages, in the DLQ with where they were
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
    let e = &errors["e2e-in/0/10"];
    assert!(
        e.contains("kafka topic e2e-in partition 0 offset 10"),
        "{e}"
    );
    assert!(e.contains("not JSON"), "{e}");
    assert!(errors["e2e-in/0/11"].contains("over max_message_bytes (2048)"));
    assert!(errors["e2e-in/0/12"].contains("tombstone"));
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(st["lanes"][0]["received"], 24, "{st}");
    assert_eq!(st["lanes"][0]["rejected"], 3, "{st}");
}

#[test]
fn bad_kafka_settings_fail_validate_with_their_lines() {
    // nothing connects: no broker needed
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        r#"store:
  path: ./store.db
systems:
  bus:
    source:
      kafka:
        brokers: 127.0.0.1:9092
        topics: [orders]
        stream: x
  out:
    sink:
      kafka:
        topic: erp
  out2:
    sink:
      kafka:
        brokers: SSL://127.0.0.1:9093
        topic: 'not a topic'
        max_message_bytes: 0
  bus2:
    source:
      kafka:
        brokers: 127.0.0.1:9092
        topics: [orders]
        offsets: committed
flows:
  f:
    from: bus
    to: [out, out2]
  g:
    from: bus2
    to: [out]
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
        text.contains("weft.yaml:9:") && text.contains("unknown field `stream`"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:12:") && text.contains("missing field `brokers`"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:17:") && text.contains("TLS and SASL are not built in"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:18:") && text.contains("systems.out2.sink.kafka.topic"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:19:")
            && text.contains("systems.out2.sink.kafka.max_message_bytes"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:25:") && text.contains("unknown variant `committed`"),
        "{text}"
    );
}

/// The messages `seq` `0..total` of `{"seq", "id"}` bodies, round robin
/// over `partitions`.
fn seq_msgs(r: std::ops::Range<u64>, partitions: u64) -> Vec<Msg> {
    r.map(|s| Msg {
        partition: Some((s % partitions) as i32),
        ..Msg::json(&json!({"seq": s, "id": s % 97}))
    })
    .collect()
}

/// Checks of the destination topic: every seq of `0..total` there, and
/// each under one `ce_id` (a message published again after a kill carries
/// the id it had). Returns how many messages the topic holds.
fn check_out(brokers: &str, topic: &str, total: u64) -> usize {
    let got = tansu::read_all(brokers, topic, 1, total as usize, Duration::from_secs(30));
    let mut by_seq: BTreeMap<u64, HashSet<String>> = BTreeMap::new();
    for m in &got {
        let seq = m.json()["seq"].as_u64().expect("a seq");
        let id = m.header("ce_id").expect("ce_id").to_owned();
        by_seq.entry(seq).or_default().insert(id);
    }
    let missing: Vec<u64> = (0..total).filter(|s| !by_seq.contains_key(s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let twice: Vec<_> = by_seq.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "published under two ids: {twice:?}");
    got.len()
}

#[test]
fn sigkill_while_consuming_and_publishing_loses_and_duplicates_nothing() {
    let Some(broker) = Tansu::start() else {
        return;
    };
    const PRELOADED: u64 = 3000;
    const LATER: u64 = 1500;
    let brokers = broker.brokers();
    tansu::create_topic(&brokers, "kill-in", 3);
    tansu::create_topic(&brokers, "kill-out", 1);
    tansu::produce(&brokers, "kill-in", &seq_msgs(0..PRELOADED, 3));
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &brokers,
        "        topics: [kill-in]\n        batch: 16\n",
        "        topic: kill-out\n",
        // small batches: more commits, so the kills come mid-stream
        "    key: .id\n    delivery: {batch_size: 25}\n",
    );
    // a producer adds messages while weft is killed and started again
    let producer = {
        let brokers = brokers.clone();
        std::thread::spawn(move || {
            for chunk in seq_msgs(PRELOADED..PRELOADED + LATER, 3).chunks(50) {
                tansu::produce(&brokers, "kill-in", chunk);
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    let total = PRELOADED + LATER;
    // what weft has delivered (tansu's high watermarks lag behind batches)
    let out = || {
        status(dir.path(), "weft.yaml", &[])["lanes"][0]["delivered"]
            .as_u64()
            .unwrap_or(0)
    };
    let started = Instant::now();
    let kills = AtomicUsize::new(0);
    let seen = std::sync::Mutex::new(Vec::new());
    let (n, logs) = kill_while(dir.path(), "weft.yaml", LOG, || {
        let k = kills.fetch_add(1, Ordering::SeqCst);
        if k > 0 {
            seen.lock().unwrap().push(out());
        }
        k < 4 || ((!producer.is_finished() || out() < total) && k < 12)
    });
    assert!(n >= 4);
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter().filter(|c| **c > 0 && **c < total).count() >= 1,
        "the kills did not come mid-stream ({seen:?} out after each); make the run longer"
    );
    producer.join().unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(dir.path(), "weft.yaml", &[]);
        if st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled after {n} kills: {st}; logs:\n{}\n=====\n{}\ntansu:\n{}",
            logs.join("\n=====\n"),
            hub.log_text(),
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // the offsets reach the group too, for lag tools
    wait_for(
        Duration::from_secs(20),
        "the offsets committed to the group",
        || tansu::committed(&brokers, "weft-bus_in", "kill-in", 3) == [1500, 1500, 1500],
    );
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");
    let published = check_out(&brokers, "kill-out", total);
    // each message received once: the positions were stored with the
    // messages, so a killed weft went on after what it had stored
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(st["lanes"][0]["received"], total, "{st}");
    eprintln!(
        "{total} messages through {n} SIGKILLs in {:.1}s, {published} published (out after each kill: {seen:?})",
        started.elapsed().as_secs_f64()
    );
}

/// Messages with their own `ce_id`: a broker that comes back empty hands
/// out offsets from 0 again, so ids by position would repeat.
fn ce_msgs(r: std::ops::Range<u64>, partitions: u64) -> Vec<Msg> {
    r.map(|s| Msg {
        partition: Some((s % partitions) as i32),
        headers: vec![
            ("ce_id".into(), format!("m-{s}")),
            ("ce_source".into(), "/restart-test".into()),
            ("ce_specversion".into(), "1.0".into()),
            ("ce_type".into(), "test.message".into()),
        ],
        ..Msg::json(&json!({"seq": s, "id": s % 97}))
    })
    .collect()
}

#[test]
fn a_broker_restart_while_weft_runs_loses_and_duplicates_nothing() {
    let Some(mut broker) = Tansu::start() else {
        return;
    };
    let brokers = broker.brokers();
    let topics = || {
        tansu::create_topic(&brokers, "restart-in", 2);
        tansu::create_topic(&brokers, "restart-out", 1);
    };
    topics();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &brokers,
        "        topics: [restart-in]\n        batch: 32\n",
        "        topic: restart-out\n        timeout: 2s\n",
        "    key: .id\n    delivery: {batch_size: 50, max_backoff: 1s}\n",
    );
    let delivered = || {
        status(dir.path(), "weft.yaml", &[])["lanes"][0]["delivered"]
            .as_u64()
            .unwrap_or(0)
    };
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    tansu::produce(&brokers, "restart-in", &ce_msgs(0..600, 2));
    wait_for(Duration::from_secs(30), "every message through", || {
        delivered() == 600
    });
    // the broker goes away and comes back. tansu keeps nothing across a
    // restart, so the test puts the input topic back as a broker keeping
    // its data would hold it (the same messages at the same offsets, one
    // per record batch), then adds new ones: weft's consumer goes on from
    // its stored positions, its producer writes to the new output topic
    broker.down();
    std::thread::sleep(Duration::from_millis(500));
    broker.up();
    topics();
    tansu::produce(&brokers, "restart-in", &ce_msgs(0..600, 2));
    tansu::produce(&brokers, "restart-in", &ce_msgs(600..800, 2));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(dir.path(), "weft.yaml", &[]);
        if st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == 800 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled after the restart: {st}; log:\n{}\ntansu:\n{}",
            hub.log_text(),
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");
    // what came after the restart, on the new topic
    let got = tansu::read_all(&brokers, "restart-out", 1, 200, Duration::from_secs(30));
    let seqs: HashSet<u64> = got
        .iter()
        .map(|m| m.json()["seq"].as_u64().expect("a seq"))
        .collect();
    assert_eq!(seqs, (600..800).collect::<HashSet<u64>>());
    let ids: HashSet<&str> = got.iter().filter_map(|m| m.header("ce_id")).collect();
    assert_eq!(ids.len(), 200, "one ce_id per message");
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["lanes"][0]["received"], 800, "{st}");
    assert_eq!(st["balanced"], true, "{st}");
}
