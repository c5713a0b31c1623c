//! Freshness SLAs through the real binary, with a real HTTP server
//! receiving the alerts: a flow whose record waits too long to be
//! delivered turns late (one alert), recovers when a new record is
//! delivered (one alert), and turns late again when nothing new arrives
//! (one alert); never an alert per tick. `weft status` says ok or LATE per
//! flow, also after the hub stopped (the newest record's time is stored).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const SLA_S: f64 = 3.0;

fn config(api: &str, alerts: &str) -> String {
    format!(
        r#"
store:
  path: data/weft.db
alerts:
  webhook: {alerts}/alerts
  headers: {{X-Token: "${{ALERT_TOKEN}}"}}
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
        id_field: .id | tostring
  api:
    circuit_breaker: {{cooldown: 200ms}}
    sink:
      http:
        url: {api}/customers/{{id}}
        method: PUT
        timeout: 2s
flows:
  crm_to_api:
    from: crm
    key: .id | tostring
    freshness: 3s
    to: [api]
    delivery:
      max_attempts: 1000
      initial_backoff: 50ms
      max_backoff: 100ms
  quiet:
    from: crm
    filter: "false"
    to: [api]
"#
    )
}

fn post(hub: &Hub, id: u32) {
    let resp = reqwest::blocking::Client::new()
        .post(hub.url("/hooks/crm"))
        .json(&json!({"id": id}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
}

fn alerts(rec: &Recorder) -> Vec<Value> {
    rec.received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.body.clone())
        .collect()
}

fn status_text(dir: &std::path::Path) -> String {
    let out = weft_cmd_env(dir, &["status", "-c", "weft.yaml"], &[("ALERT_TOKEN", "t")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn freshness_line<'a>(text: &'a str, flow: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with("freshness ") && l.split_whitespace().nth(1) == Some(flow))
        .unwrap_or_else(|| panic!("no freshness line for {flow}:\n{text}"))
}

#[test]
fn late_and_recovered_are_each_alerted_once() {
    let dir = tempfile::tempdir().unwrap();
    let api = Recorder::start();
    let sink = Recorder::start();
    std::fs::write(
        dir.path().join("weft.yaml"),
        config(&api.url(), &sink.url()),
    )
    .unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &[("ALERT_TOKEN", "t")]);

    // a record the destination refuses (503s): received now, but waiting
    api.set(FAIL_500);
    let t0 = Instant::now();
    post(&hub, 1);
    wait_for(Duration::from_secs(15), "the late alert", || {
        !alerts(&sink).is_empty()
    });
    assert!(
        t0.elapsed().as_secs_f64() >= SLA_S,
        "late before the SLA passed"
    );
    let a = &alerts(&sink)[0];
    let first = sink.received.lock().unwrap()[0].clone();
    let header = |n: &str| {
        first
            .headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("x-token").as_deref(),
        Some("t"),
        "the configured header, from the env"
    );
    assert!(
        header("content-type")
            .unwrap_or_default()
            .starts_with("application/cloudevents+json")
    );
    assert_eq!(a["specversion"], "1.0");
    assert_eq!(a["type"], "weft.freshness.late", "{a}");
    assert_eq!(a["source"], "weft/crm_to_api");
    assert_eq!(a["data"]["flow"], "crm_to_api");
    assert_eq!(a["data"]["status"], "late");
    assert_eq!(a["data"]["freshness_seconds"], SLA_S);
    assert!(
        a["data"]["reason"].as_str().unwrap().contains("waited"),
        "{a}"
    );
    assert!(a["data"]["oldest_pending_age_seconds"].as_f64().unwrap() > SLA_S);
    // the offline status says it too, and names the other flow (no SLA) not at all
    let text = status_text(dir.path());
    assert!(
        freshness_line(&text, "crm_to_api").contains(" LATE "),
        "{text}"
    );
    assert!(!text.contains("freshness quiet"), "{text}");
    // still late a tick later: no second alert
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(alerts(&sink).len(), 1, "{:?}", alerts(&sink));

    // the destination is back and a new record arrives: recovered, once
    api.set(OK);
    post(&hub, 2);
    wait_for(Duration::from_secs(10), "the recovery alert", || {
        alerts(&sink).len() >= 2
    });
    let a = &alerts(&sink)[1];
    assert_eq!(a["type"], "weft.freshness.ok", "{a}");
    assert_eq!(a["data"]["status"], "ok");
    assert!(a["data"]["oldest_pending_age_seconds"].is_null(), "{a}");
    assert_eq!(api.count(), 2);
    let text = status_text(dir.path());
    assert!(
        freshness_line(&text, "crm_to_api").contains(" ok "),
        "{text}"
    );

    // nothing new for longer than the SLA: late again, once
    wait_for(Duration::from_secs(10), "the second late alert", || {
        alerts(&sink).len() >= 3
    });
    let a = &alerts(&sink)[2];
    assert_eq!(a["type"], "weft.freshness.late", "{a}");
    assert!(
        a["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("newest record received"),
        "{a}"
    );
    let m = scrape(&hub);
    assert_eq!(
        metric(&m, "weft_freshness_late{flow=\"crm_to_api\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "weft_freshness_alerts_total{flow=\"crm_to_api\",status=\"late\"}"
        ),
        Some(2.0)
    );
    assert!(metric(&m, "weft_freshness_late{flow=\"quiet\"}").is_none());
    assert_eq!(hub.stop().code(), Some(0));
    assert_eq!(alerts(&sink).len(), 3, "{:?}", alerts(&sink));

    // stopped: the store still knows when the newest record came
    let st = status(dir.path(), "weft.yaml", &[("ALERT_TOKEN", "t")]);
    let f = st["freshness"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["flow"] == "crm_to_api")
        .cloned()
        .unwrap();
    assert_eq!(f["late"], true, "{f}");
    assert!(f["newest_received_at"].as_i64().is_some(), "{f}");
    assert!(f["newest_received_age_seconds"].as_f64().unwrap() > SLA_S);
}

#[test]
fn freshness_and_alerts_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
alerts: {webhook: "ftp://nope"}
systems:
  crm: {source: {webhook: {path: /h}}}
  api: {sink: {http: {url: "http://127.0.0.1:9/x"}}}
flows:
  f:
    from: crm
    to: [api]
    freshness: soon
  g:
    from: crm
    to: [api]
    freshness: 0s
"#;
    std::fs::write(dir.path().join("w.yaml"), yaml).unwrap();
    let out = weft_cmd(dir.path(), &["validate", "w.yaml"]);
    assert!(!out.status.success());
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    for (path, line) in [
        ("alerts.webhook", ":2:"),
        ("flows.f.freshness", ":10:"),
        ("flows.g.freshness", ":14:"),
    ] {
        let l = err
            .lines()
            .find(|l| l.contains(&format!("`{path}`")))
            .unwrap_or_else(|| panic!("no problem at {path}:\n{err}"));
        assert!(l.contains(line), "{l}");
    }
}
