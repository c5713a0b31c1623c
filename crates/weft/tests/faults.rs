//! Fault injection against a real HTTP destination: down, failing, hanging,
//! 429 with Retry-After, rate limits, poison messages and backpressure.
//! Every test asserts what was sent, when, and what the DLQ and the
//! accounting say; synchronisation is by polling observable state, never by
//! fixed sleeps.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "faults";
const ENV: [(&str, &str); 1] = [("HOOK_SECRET", SECRET)];

fn config(recorder: &str, system_extra: &str, delivery: &str, sink_extra: &str) -> String {
    format!(
        r#"
store:
  path: data/weft.db
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
        secret: ${{HOOK_SECRET}}
  api:
    sink:
      http:
        url: {recorder}/items/{{id}}
{sink_extra}
{system_extra}
flows:
  items:
    from: crm
    key: .key
    mapping: '{{id, key, fail}}'
    to: [api]
    delivery:
{delivery}
"#
    )
}

struct T {
    dir: tempfile::TempDir,
    rec: Recorder,
    hub: Hub,
}

fn start(system_extra: &str, delivery: &str, sink_extra: &str) -> T {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::start();
    std::fs::write(
        dir.path().join("weft.yaml"),
        config(&rec.url(), system_extra, delivery, sink_extra),
    )
    .unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &ENV);
    T { dir, rec, hub }
}

fn post(hub: &Hub, id: u64, key: &str, fail: bool) -> u16 {
    let body = serde_json::json!({"id": id, "key": key, "fail": fail}).to_string();
    reqwest::blocking::Client::new()
        .post(hub.url("/hooks/crm"))
        .header("x-event-id", format!("ev-{id}"))
        .header("x-signature-256", sign(SECRET, body.as_bytes()))
        .body(body)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

fn lane(t: &T) -> serde_json::Value {
    let st = status(t.dir.path(), "weft.yaml", &ENV);
    assert_eq!(st["balanced"], true, "{st}");
    st["lanes"][0].clone()
}

fn dlq(t: &T) -> Vec<serde_json::Value> {
    let out = weft_cmd_env(
        t.dir.path(),
        &["dlq", "list", "-c", "weft.yaml", "--json"],
        &ENV,
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const FAST_RETRY: &str =
    "      initial_backoff: 20ms\n      max_backoff: 100ms\n      max_attempts: 1000";

#[test]
fn breaker_opens_on_failures_holds_messages_on_disk_then_drains_in_order() {
    let t = start(
        "    circuit_breaker: {consecutive_failures: 3, cooldown: 300ms}",
        &format!("{FAST_RETRY}\n      concurrency: 4"),
        "",
    );
    t.rec.set(FAIL_500);
    for i in 0..40 {
        assert_eq!(post(&t.hub, i, &format!("k{}", i % 5), false), 202);
    }
    wait_for(Duration::from_secs(20), "the breaker to open", || {
        metric(&scrape(&t.hub), r#"weft_circuit_state{destination="api"}"#) == Some(1.0)
    });
    // while open nothing goes; after the 300ms cooldown one probe does
    let hits_when_open = t.rec.hit_count();
    wait_for(
        Duration::from_secs(10),
        "a probe after the cooldown",
        || t.rec.hit_count() > hits_when_open,
    );
    let hits = t.rec.hits.lock().unwrap().clone();
    // 3 failures trip it, up to 4 were in flight, then the probe
    assert!(
        hits.len() <= 3 + 4 + 1,
        "{} requests reached a destination whose breaker is open",
        hits.len()
    );
    let gap = hits.windows(2).map(|w| w[1].at - w[0].at).max().unwrap();
    assert!(
        gap >= Duration::from_millis(250),
        "no cooldown-long silence between requests: {gap:?}"
    );
    assert_eq!(lane(&t)["pending"], 40, "everything waits on disk");
    assert!(
        dlq(&t).is_empty(),
        "an open breaker spends no attempts into the DLQ"
    );

    t.rec.set(OK);
    wait_for(Duration::from_secs(30), "the backlog to drain", || {
        t.rec.count() == 40
    });
    wait_for(Duration::from_secs(10), "the breaker to close", || {
        metric(&scrape(&t.hub), r#"weft_circuit_state{destination="api"}"#) == Some(0.0)
    });
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in t.rec.received.lock().unwrap().iter() {
        per_key
            .entry(r.body["key"].as_str().unwrap().to_owned())
            .or_default()
            .push(r.body["id"].as_u64().unwrap());
    }
    for (k, ids) in &per_key {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of order: {ids:?}"
        );
    }
    wait_for(Duration::from_secs(10), "accounting to settle", || {
        lane(&t)["delivered"] == 40
    });
}

#[test]
fn retry_after_pauses_the_destination_for_the_time_given() {
    let t = start("    circuit_breaker: {enabled: false}", FAST_RETRY, "");
    t.rec.set(TOO_MANY);
    assert_eq!(post(&t.hub, 1, "a", false), 202);
    wait_for(Duration::from_secs(10), "the 429", || {
        t.rec.hit_count() == 1
    });
    t.rec.set(OK);
    wait_for(Duration::from_secs(10), "the retry", || t.rec.count() == 1);
    let hits = t.rec.hits.lock().unwrap().clone();
    let waited = hits[1].at - hits[0].at;
    // the normal backoff here is at most 100ms; Retry-After: 1 must win
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}, before Retry-After"
    );
    assert!(
        waited < Duration::from_secs(3),
        "waited far too long: {waited:?}"
    );
}

#[test]
fn a_hanging_destination_times_out_and_is_retried() {
    let t = start(
        "    circuit_breaker: {enabled: false}",
        FAST_RETRY,
        "        timeout: 300ms",
    );
    t.rec.set(HANG);
    let t0 = Instant::now();
    assert_eq!(post(&t.hub, 1, "a", false), 202);
    wait_for(Duration::from_secs(10), "two attempts", || {
        t.rec.hit_count() >= 2
    });
    t.rec.set(OK);
    wait_for(Duration::from_secs(10), "the delivery", || {
        t.rec.count() == 1
    });
    assert!(
        t0.elapsed() >= Duration::from_millis(600),
        "two timeouts of 300ms took {:?}",
        t0.elapsed()
    );
    let metrics = scrape(&t.hub);
    let retried = metric(
        &metrics,
        r#"weft_deliveries_retried_total{flow="items",destination="api"}"#,
    )
    .unwrap();
    assert!(retried >= 2.0, "{retried}");
    assert!(dlq(&t).is_empty());
}

#[test]
fn rate_limit_spaces_requests_across_the_destination() {
    let t = start(
        "    rate_limit: {per_second: 20, burst: 1}",
        &format!("{FAST_RETRY}\n      concurrency: 8"),
        "",
    );
    for i in 0..21 {
        assert_eq!(post(&t.hub, i, &format!("k{i}"), false), 202);
    }
    wait_for(Duration::from_secs(20), "all deliveries", || {
        t.rec.count() == 21
    });
    let hits = t.rec.hits.lock().unwrap().clone();
    let span = hits.last().unwrap().at - hits[0].at;
    // 21 requests at 20/s with no burst: at least ~1s between first and last
    assert!(
        span >= Duration::from_millis(900),
        "21 requests in {span:?} exceed 20/s"
    );
    let waits = metric(
        &scrape(&t.hub),
        r#"weft_rate_limit_waits_total{destination="api"}"#,
    )
    .unwrap_or(0.0);
    assert!(waits >= 1.0, "rate-limit waits are counted");
}

#[test]
fn poison_message_with_hold_key_holds_its_key_until_replayed() {
    let t = start(
        "    circuit_breaker: {enabled: false}",
        "      max_attempts: 2\n      initial_backoff: 10ms\n      on_dead_letter: hold_key",
        "",
    );
    t.rec.set(FAIL_MARKED);
    assert_eq!(post(&t.hub, 1, "a", true), 202); // poison
    wait_for(Duration::from_secs(10), "the dead letter", || {
        dlq(&t).len() == 1
    });
    assert_eq!(post(&t.hub, 2, "a", false), 202); // same key: must wait
    assert_eq!(post(&t.hub, 3, "b", false), 202); // other key: goes
    wait_for(Duration::from_secs(10), "key b", || t.rec.count() == 1);
    assert_eq!(t.rec.received.lock().unwrap()[0].body["id"], 3);
    assert_eq!(lane(&t)["pending"], 1, "a's second message is held");
    assert_eq!(dlq(&t)[0]["attempts"], 1, "a 400 is permanent: not retried");

    // fix and replay the poison message: it goes first, then the held one
    let fixed = t.dir.path().join("fixed.json");
    std::fs::write(&fixed, r#"{"id": 1, "key": "a", "fail": false}"#).unwrap();
    let id = dlq(&t)[0]["id"].to_string();
    let out = weft_cmd_env(
        t.dir.path(),
        &[
            "dlq",
            "replay",
            "-c",
            "weft.yaml",
            &id,
            "--payload",
            "fixed.json",
        ],
        &ENV,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(10), "key a", || t.rec.count() == 3);
    let ids: Vec<u64> = t
        .rec
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.body["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![3, 1, 2],
        "the replayed message keeps its place before the held one"
    );
}

#[test]
fn poison_message_with_continue_lets_its_key_go_on() {
    let t = start(
        "    circuit_breaker: {enabled: false}",
        "      max_attempts: 1",
        "",
    );
    t.rec.set(FAIL_MARKED);
    assert_eq!(post(&t.hub, 1, "a", true), 202);
    wait_for(Duration::from_secs(10), "the dead letter", || {
        dlq(&t).len() == 1
    });
    assert_eq!(post(&t.hub, 2, "a", false), 202);
    wait_for(Duration::from_secs(10), "the next message of key a", || {
        t.rec.count() == 1
    });
    let e = &dlq(&t)[0];
    assert_eq!(e["attempts"], 1);
    assert!(e["error"].as_str().unwrap().contains("400"), "{e}");
}

#[test]
fn backlog_over_high_water_makes_the_webhook_answer_503() {
    let t = start(
        "    circuit_breaker: {consecutive_failures: 1, cooldown: 60s}",
        &format!("{FAST_RETRY}\n      backlog_high_water: 5"),
        "",
    );
    t.rec.set(FAIL_500);
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(post(&t.hub, i, &format!("k{i}"), false));
    }
    assert_eq!(
        &statuses[..5],
        &[202; 5],
        "{statuses:?}\nlog:\n{}",
        t.hub.log_text()
    );
    assert!(
        statuses[5..].iter().all(|s| *s == 503),
        "over the high-water mark: {statuses:?}"
    );
    let l = lane(&t);
    assert_eq!(l["received"], 5, "refused requests were not stored: {l}");
    let m = scrape(&t.hub);
    assert!(
        metric(&m, r#"weft_backpressure_rejections_total{source="crm"}"#).unwrap_or(0.0) >= 5.0
    );
}
