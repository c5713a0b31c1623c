//! End-to-end behaviour of the real binary: bad input at the door, failures
//! at the destination, the DLQ and its replay, metrics, config errors.

mod common;

use std::time::Duration;

use common::*;

const SECRET: &str = "e2e-secret";

fn config(recorder: &str, extra_flow: &str) -> String {
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
        max_body_bytes: 1024
  api:
    sink:
      http:
        url: {recorder}/customers/{{customer_id}}
        method: PUT
        timeout: 2s
flows:
  crm_to_api:
    from: crm
    key: .id | tostring
    filter: .kind != "internal"
    mapping: '{{customer_id: "C-\(.id)", name, total: (.amount + 1)}}'
    to: [api]
    delivery:
      max_attempts: 3
      initial_backoff: 10ms
      max_backoff: 50ms
{extra_flow}
"#
    )
}

struct Env {
    dir: tempfile::TempDir,
    recorder: Recorder,
    hub: Hub,
}

const ENV: [(&str, &str); 1] = [("HOOK_SECRET", SECRET)];

fn start() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    std::fs::write(dir.path().join("weft.yaml"), config(&recorder.url(), "")).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &ENV);
    Env { dir, recorder, hub }
}

fn post(
    hub: &Hub,
    body: &str,
    event_id: &str,
    signature: Option<String>,
) -> (u16, serde_json::Value) {
    let client = reqwest::blocking::Client::new();
    let mut req = client
        .post(hub.url("/hooks/crm"))
        .header("content-type", "application/json")
        .header("x-event-id", event_id)
        .header("x-correlation-id", format!("corr-{event_id}"))
        .body(body.to_owned());
    if let Some(s) = signature {
        req = req.header("x-signature-256", s);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(serde_json::Value::Null))
}

fn signed(hub: &Hub, body: &str, event_id: &str) -> (u16, serde_json::Value) {
    post(hub, body, event_id, Some(sign(SECRET, body.as_bytes())))
}

fn dlq(env: &Env) -> Vec<serde_json::Value> {
    let out = weft_cmd_env(
        env.dir.path(),
        &["dlq", "list", "-c", "weft.yaml", "--json"],
        &ENV,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn lane(env: &Env) -> serde_json::Value {
    let st = status(env.dir.path(), "weft.yaml", &ENV);
    assert_eq!(st["balanced"], true, "accounting must balance: {st}");
    st["lanes"][0].clone()
}

#[test]
fn bad_input_at_the_door_is_refused_and_good_input_is_delivered_once() {
    let env = start();
    let good = r#"{"id": 7, "name": "Ada", "amount": 41, "kind": "customer"}"#;
    let (s, body) = signed(&env.hub, good, "e-1");
    assert_eq!(s, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    // the sender retries the same event: acknowledged, not stored twice
    let (s, body) = signed(&env.hub, good, "e-1");
    assert_eq!(
        (s, body["accepted"].clone(), body["duplicates"].clone()),
        (202, 0.into(), 1.into())
    );
    // forged, unsigned, malformed, oversized
    assert_eq!(post(&env.hub, good, "e-2", Some("sha256=00".into())).0, 401);
    assert_eq!(post(&env.hub, good, "e-3", None).0, 401);
    let (s, body) = signed(&env.hub, "{\"id\": 8,", "e-4");
    assert_eq!(s, 400);
    assert!(body["error"].as_str().is_some(), "{body}");
    let big = format!(r#"{{"id": 9, "pad": "{}"}}"#, "x".repeat(2000));
    assert_eq!(signed(&env.hub, &big, "e-5").0, 413);
    // filtered, not delivered
    let internal = r#"{"id": 10, "name": "Ops", "amount": 1, "kind": "internal"}"#;
    assert_eq!(signed(&env.hub, internal, "e-6").0, 202);

    wait_for(Duration::from_secs(20), "the delivery", || {
        env.recorder.count() >= 1
    });
    wait_for(Duration::from_secs(20), "nothing pending", || {
        lane(&env)["pending"] == 0
    });
    let got = env.recorder.received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].method, "PUT");
    assert_eq!(got[0].path, "/customers/C-7");
    assert_eq!(
        got[0].body,
        serde_json::json!({"customer_id": "C-7", "name": "Ada", "total": 42})
    );
    assert_eq!(
        got[0].correlation_id.as_deref(),
        Some("corr-e-1"),
        "the inbound correlation id is passed on"
    );
    let l = lane(&env);
    assert_eq!(
        (
            l["received"].clone(),
            l["delivered"].clone(),
            l["filtered"].clone()
        ),
        (2.into(), 1.into(), 1.into())
    );
}

#[test]
fn permanent_failure_is_dead_lettered_and_replay_keeps_the_idempotency_key() {
    let env = start();
    env.recorder
        .fail_mode
        .store(2, std::sync::atomic::Ordering::SeqCst); // 400
    let (s, _) = signed(&env.hub, r#"{"id": 1, "name": "Bo", "amount": 1}"#, "p-1");
    assert_eq!(s, 202);
    wait_for(Duration::from_secs(20), "a dead letter", || {
        !dlq(&env).is_empty()
    });
    let entries = dlq(&env);
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e["stage"], "deliver");
    assert_eq!(e["attempts"], 1, "a 400 is not retried: {e}");
    assert!(e["error"].as_str().unwrap().contains("400"), "{e}");
    assert_eq!(e["correlation_id"], "corr-p-1");
    let key = e["idempotency_key"].as_str().unwrap().to_owned();
    assert_eq!(lane(&env)["dead_lettered"], 1);

    // the destination is fixed; replay
    env.recorder
        .fail_mode
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let id = e["id"].to_string();
    let out = weft_cmd_env(
        env.dir.path(),
        &["dlq", "replay", "-c", "weft.yaml", &id],
        &ENV,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(20), "the replayed delivery", || {
        env.recorder.count() == 1
    });
    let got = env.recorder.received.lock().unwrap()[0].clone();
    assert_eq!(
        got.idempotency_key.as_deref(),
        Some(key.as_str()),
        "replay keeps the idempotency key"
    );
    assert_eq!(
        got.correlation_id.as_deref(),
        Some("corr-p-1"),
        "replay keeps the correlation id"
    );
    wait_for(Duration::from_secs(20), "the lane to settle", || {
        lane(&env)["delivered"] == 1
    });
    assert!(dlq(&env).is_empty());
    let out = weft_cmd_env(
        env.dir.path(),
        &["dlq", "show", "-c", "weft.yaml", &id, "--json"],
        &ENV,
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["status"], "replayed");
    assert_eq!(shown["history"].as_array().unwrap().len(), 2, "{shown}");
    // P1-20: the replayed copy is in the outbox (delivered); the entry
    // keeps the payload's hash and says so, never an empty payload
    assert_eq!(shown["payload"], serde_json::Value::Null, "{shown}");
    let sha = shown["payload_sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64, "{shown}");
    assert_eq!(
        shown["payload_dropped"].as_str(),
        Some(format!("payload dropped after resolve (sha256 {sha})").as_str()),
        "{shown}"
    );
    let out = weft_cmd_env(
        env.dir.path(),
        &["dlq", "show", "-c", "weft.yaml", &id],
        &ENV,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "payload:        payload dropped after resolve (sha256 {sha})"
        )),
        "{text}"
    );
    assert!(text.contains("resolved at:"), "{text}");
}

#[test]
fn retryable_failure_is_retried_then_dead_lettered_with_attempts() {
    let env = start();
    env.recorder
        .fail_mode
        .store(1, std::sync::atomic::Ordering::SeqCst); // 500
    assert_eq!(
        signed(&env.hub, r#"{"id": 2, "name": "Cy", "amount": 1}"#, "r-1").0,
        202
    );
    wait_for(Duration::from_secs(20), "a dead letter", || {
        !dlq(&env).is_empty()
    });
    let e = &dlq(&env)[0];
    assert_eq!(e["attempts"], 3, "max_attempts is 3: {e}");
    assert!(e["error"].as_str().unwrap().contains("500"), "{e}");
    let metrics = reqwest::blocking::get(env.hub.admin_url("/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let retried = metrics
        .lines()
        .find(|l| l.starts_with("weft_deliveries_retried_total{"))
        .unwrap_or_else(|| panic!("no retry metric in\n{metrics}"));
    assert!(
        retried.ends_with(" 2"),
        "two retries after the first attempt: {retried}"
    );
}

/// Issue 15: every write of a record is kept with its status, latency and
/// outcome, in the same transaction as its settlement: `weft record` finds
/// them by correlation id, event id and entity key, oldest first, one per
/// request the destination saw.
#[test]
fn every_write_attempt_is_kept_with_its_status_and_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    let cfg = config(&recorder.url(), "")
        .replace("max_attempts: 3", "max_attempts: 10")
        .replace("initial_backoff: 10ms", "initial_backoff: 300ms")
        .replace("max_backoff: 50ms", "max_backoff: 300ms");
    std::fs::write(dir.path().join("weft.yaml"), cfg).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &ENV);
    recorder.set(FAIL_500);
    assert_eq!(
        signed(&hub, r#"{"id": 41, "name": "Ada", "amount": 1}"#, "att-1").0,
        202
    );
    wait_for(Duration::from_secs(20), "two failed writes", || {
        recorder.hit_count() >= 2
    });
    recorder.set(OK);
    wait_for(Duration::from_secs(20), "the delivery", || {
        recorder.count() == 1
    });
    let record = |id: &str| {
        let out = weft_cmd_env(
            dir.path(),
            &["record", "-c", "weft.yaml", id, "--json"],
            &ENV,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // the settle of the delivery may trail the destination's answer
    wait_for(Duration::from_secs(10), "the delivered attempt", || {
        record("corr-att-1")["attempts"]
            .as_array()
            .is_some_and(|a| a.last().is_some_and(|l| l["outcome"] == "delivered"))
    });
    let found = record("corr-att-1");
    let attempts = found["attempts"].as_array().unwrap().clone();
    let hits = recorder.hit_count();
    assert_eq!(attempts.len(), hits, "one per request: {found}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt"], i as i64 + 1, "{a}");
        assert_eq!(a["flow"], "crm_to_api", "{a}");
        assert_eq!(a["destination"], "api", "{a}");
        assert_eq!(a["event_id"], "att-1", "{a}");
        assert_eq!(a["entity_key"], "41", "{a}");
        assert!(a["latency_ms"].as_i64().is_some_and(|l| l >= 0), "{a}");
        if i + 1 < attempts.len() {
            assert_eq!(a["outcome"], "retry", "{a}");
            assert_eq!(a["status"], 500, "{a}");
            assert!(a["error"].as_str().unwrap().contains("500"), "{a}");
        } else {
            assert_eq!(a["outcome"], "delivered", "{a}");
            assert_eq!(a["status"], 200, "{a}");
            assert!(a["error"].is_null(), "{a}");
        }
    }
    let times: Vec<i64> = attempts.iter().map(|a| a["at"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    // the same trail by event id and by entity key
    assert_eq!(record("att-1")["attempts"], found["attempts"]);
    assert_eq!(record("41")["attempts"], found["attempts"]);
    assert!(found["pending"].as_array().unwrap().is_empty(), "{found}");
    // and in words
    let out = weft_cmd_env(dir.path(), &["record", "-c", "weft.yaml", "att-1"], &ENV);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("crm_to_api -> api event att-1 attempt 1: retry")
            && text.contains("status 500")
            && text.contains(": delivered in ")
            && text.contains("status 200"),
        "{text}"
    );
    let none = weft_cmd_env(dir.path(), &["record", "-c", "weft.yaml", "no-such"], &ENV);
    assert!(
        String::from_utf8_lossy(&none.stdout).contains("nothing in the store names no-such"),
        "{}",
        String::from_utf8_lossy(&none.stdout)
    );
}

#[test]
fn mapping_error_is_dead_lettered_and_replay_with_an_edited_payload_delivers() {
    let env = start();
    // amount is a string: `.amount + 1` fails in the mapping
    assert_eq!(
        signed(
            &env.hub,
            r#"{"id": 3, "name": "Di", "amount": "ten"}"#,
            "m-1"
        )
        .0,
        202
    );
    wait_for(Duration::from_secs(20), "a dead letter", || {
        !dlq(&env).is_empty()
    });
    let e = &dlq(&env)[0];
    assert_eq!(e["stage"], "map");
    assert!(
        e["error"].as_str().unwrap().contains("mapping failed"),
        "{e}"
    );
    assert_eq!(lane(&env)["rejected"], 1);
    let fixed = env.dir.path().join("fixed.json");
    std::fs::write(&fixed, r#"{"id": 3, "name": "Di", "amount": 10}"#).unwrap();
    let id = e["id"].to_string();
    let out = weft_cmd_env(
        env.dir.path(),
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
    wait_for(Duration::from_secs(20), "the replayed delivery", || {
        env.recorder.count() == 1
    });
    assert_eq!(env.recorder.received.lock().unwrap()[0].body["total"], 11);
    wait_for(Duration::from_secs(20), "the lane to settle", || {
        lane(&env)["delivered"] == 1
    });
    let l = lane(&env);
    assert_eq!(
        (l["received"].clone(), l["rejected"].clone()),
        (1.into(), 0.into()),
        "{l}"
    );
}

#[test]
fn metrics_report_per_flow_and_destination() {
    let env = start();
    assert_eq!(
        signed(&env.hub, r#"{"id": 4, "name": "Ed", "amount": 1}"#, "x-1").0,
        202
    );
    wait_for(Duration::from_secs(20), "the delivery", || {
        env.recorder.count() == 1
    });
    wait_for(Duration::from_secs(20), "the metrics", || {
        let m = reqwest::blocking::get(env.hub.admin_url("/metrics"))
            .unwrap()
            .text()
            .unwrap();
        m.contains(r#"weft_deliveries_delivered_total{flow="crm_to_api",destination="api"} 1"#)
            && m.contains(r#"weft_events_received_total{flow="crm_to_api"} 1"#)
            && m.contains("weft_end_to_end_latency_seconds_bucket")
            && m.contains(r#"weft_queue_depth{flow="crm_to_api",destination="api"} 0"#)
    });
    let health = reqwest::blocking::get(env.hub.url("/healthz")).unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let ready = reqwest::blocking::get(env.hub.url("/readyz")).unwrap();
    assert_eq!(ready.status().as_u16(), 200);
}

#[test]
fn validate_reports_every_problem_with_file_line_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = config("http://127.0.0.1:1", "")
        .replace("to: [api]", "to: [api, nowhere]")
        .replace("timeout: 2s", "timeout: soon");
    std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();
    let out = weft_cmd_env(dir.path(), &["validate", "bad.yaml"], &ENV);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml has 2 problems"), "{err}");
    assert!(err.contains("unknown system `nowhere`"), "{err}");
    assert!(err.contains("`soon` is not a duration"), "{err}");
    assert!(err.contains("flows.crm_to_api.to[1]"), "{err}");
    assert!(
        err.contains("bad.yaml:23:"),
        "line of the bad destination: {err}"
    );
    assert!(
        err.contains("bad.yaml:16:"),
        "line of the bad duration: {err}"
    );
    // a missing secret is a load error too, with its line
    std::fs::write(dir.path().join("ok.yaml"), config("http://127.0.0.1:1", "")).unwrap();
    let out = weft_cmd(dir.path(), &["validate", "ok.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HOOK_SECRET") && err.contains("ok.yaml:9"),
        "{err}"
    );
    let out = weft_cmd_env(dir.path(), &["validate", "ok.yaml"], &ENV);
    assert!(out.status.success());
}

/// An HTTP sink's `capture_id` fills the crosswalk: one entry per (destination,
/// source, entity key), updated by a later write of the same key.
#[test]
fn captured_destination_ids_land_in_the_crosswalk() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    recorder.set(ECHO_ID);
    let cfg = config(&recorder.url(), "").replace(
        "        timeout: 2s\n",
        "        timeout: 2s\n        capture_id: .data.id\n",
    );
    assert!(cfg.contains("capture_id"), "{cfg}");
    std::fs::write(dir.path().join("weft.yaml"), cfg).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &ENV);
    for (n, (id, event)) in [(1, "x-1"), (2, "x-2"), (1, "x-3")].iter().enumerate() {
        let body = format!(r#"{{"id": {id}, "name": "N{n}", "amount": {n}}}"#);
        assert_eq!(signed(&hub, &body, event).0, 202);
    }
    let list = || {
        let out = weft_cmd_env(
            dir.path(),
            &["crosswalk", "list", "-c", "weft.yaml", "--json"],
            &ENV,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    };
    wait_for(Duration::from_secs(20), "three writes", || {
        recorder.count() >= 3
    });
    wait_for(Duration::from_secs(20), "two crosswalk entries", || {
        list().len() == 2
    });
    let rows = list();
    let key2 = rows.iter().find(|r| r["source_key"] == "2").expect("key 2");
    assert_eq!(key2["system"], "api");
    assert_eq!(key2["source"], "crm");
    assert_eq!(key2["external_id"], "ext-C-2");
    assert_eq!(key2["event_id"], "x-2");
    // key 1 was written twice; the entry follows the last write
    wait_for(Duration::from_secs(20), "key 1 updated by x-3", || {
        list().iter().any(|r| {
            r["source_key"] == "1" && r["event_id"] == "x-3" && r["external_id"] == "ext-C-1"
        })
    });
    hub.stop();
}

/// `weft status` and `weft dlq` need the store and the flows, not the run's
/// secrets: they work without the environment `weft run` had, while
/// `weft validate` still says the variable is missing.
#[test]
fn status_and_dlq_work_without_the_runs_environment() {
    let env = start();
    let (code, _) = signed(&env.hub, r#"{"id": 1, "name": "Ada"}"#, "e-1");
    assert_eq!(code, 202);
    wait_for(Duration::from_secs(10), "the delivery", || {
        env.recorder.count() == 1
    });
    for args in [
        vec!["status", "-c", "weft.yaml", "--json"],
        vec!["dlq", "list", "-c", "weft.yaml", "--json"],
    ] {
        let out = weft_cmd(env.dir.path(), &args);
        assert!(
            out.status.success(),
            "{args:?} without HOOK_SECRET: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let st: serde_json::Value = serde_json::from_slice(
        &weft_cmd(env.dir.path(), &["status", "-c", "weft.yaml", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(st["lanes"][0]["delivered"], 1, "{st}");
    let v = weft_cmd(env.dir.path(), &["validate", "weft.yaml"]);
    assert_eq!(
        v.status.code(),
        Some(2),
        "validate still refuses an unset secret"
    );
    assert!(String::from_utf8_lossy(&v.stderr).contains("HOOK_SECRET"));
}
