//! `/metrics` of the real binary, read by the Python `prometheus_client`
//! parser: `# HELP` and `# TYPE` on every family (each one listed in
//! `weft_runtime::metrics::FAMILIES` with that type), the counters after a
//! known workload (a batch holding a duplicate counted: review P1-9), and
//! gauges current at the moment of the scrape (a DLQ emptied by the CLI
//! reads 0 at once, a new pending row counts at once).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Parse Prometheus text from stdin; print every family with its type,
/// help and samples, or fail naming a family without HELP or TYPE.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
text = sys.stdin.read()
out = {}
for fam in text_string_to_metric_families(text):
    if not fam.documentation:
        sys.exit("no # HELP for " + fam.name)
    if fam.type in ("unknown", "untyped"):
        sys.exit("no # TYPE for " + fam.name)
    out[fam.name] = {
        "type": fam.type,
        "help": fam.documentation,
        "samples": [[s.name, s.labels, s.value] for s in fam.samples],
    }
print(json.dumps(out))
"#;

fn config(recorder: &str) -> String {
    format!(
        r#"
store:
  path: data/weft.db
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
        id_field: .id | tostring
  api:
    # a scrape under load may take a while: retries must outlast it
    circuit_breaker: {{cooldown: 100ms}}
    sink:
      http:
        url: {recorder}/customers/{{id}}
        method: PUT
        timeout: 2s
flows:
  crm_to_api:
    from: crm
    key: .id | tostring
    filter: .kind != "internal"
    mapping: '{{id, total: (.amount + 1)}}'
    freshness: 1h
    to: [api]
    delivery:
      max_attempts: 100000
      initial_backoff: 10ms
      max_backoff: 20ms
"#
    )
}

fn post(hub: &Hub, body: Value) -> Value {
    let resp = reqwest::blocking::Client::new()
        .post(hub.url("/hooks/crm"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    resp.json().unwrap()
}

/// Families parsed by prometheus_client, by name.
fn parsed(hub: &Hub) -> HashMap<String, Value> {
    let text = scrape(hub);
    let v = python_json(PARSE, text.as_bytes());
    serde_json::from_value(v).unwrap()
}

/// The value of the sample `name` with exactly `labels`.
fn value(fams: &HashMap<String, Value>, name: &str, labels: Value) -> Option<f64> {
    fams.values()
        .flat_map(|f| f["samples"].as_array().cloned().unwrap_or_default())
        .find(|s| s[0] == name && s[1] == labels)
        .and_then(|s| s[2].as_f64())
}

#[test]
fn every_family_has_help_and_type_and_counts_match_a_known_workload() {
    if python_with(&["prometheus_client"], &["prometheus_client"]).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::start();
    std::fs::write(dir.path().join("weft.yaml"), config(&rec.url())).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &[]);

    // two events; then a batch holding one of them again (a duplicate), a
    // filtered one and one whose mapping fails
    assert_eq!(
        post(
            &hub,
            json!([{"id": 1, "amount": 1}, {"id": 2, "amount": 2}])
        )["accepted"],
        2
    );
    let r = post(
        &hub,
        json!([
            {"id": 2, "amount": 2},
            {"id": 3, "amount": 3, "kind": "internal"},
            {"id": 4, "amount": "x"}
        ]),
    );
    assert_eq!(
        (r["accepted"].clone(), r["duplicates"].clone()),
        (json!(2), json!(1))
    );
    let lane = json!({"flow": "crm_to_api", "destination": "api"});
    // settled after the destination answered: wait for the count
    wait_for(Duration::from_secs(20), "two deliveries counted", || {
        rec.count() == 2
            && value(
                &parsed(&hub),
                "weft_deliveries_delivered_total",
                lane.clone(),
            ) == Some(2.0)
    });

    let fams = parsed(&hub);
    // every family is one weft documents, with its type
    for (name, f) in &fams {
        let known = weft_runtime::metrics::FAMILIES.iter().find(|k| {
            k.name == name.as_str() || k.name.strip_suffix("_total") == Some(name.as_str())
        });
        let known =
            known.unwrap_or_else(|| panic!("`{name}` is not in FAMILIES / docs/metrics.md"));
        assert_eq!(f["type"], known.kind.name(), "{name}");
        assert_eq!(f["help"], known.help, "{name}");
    }
    for expected in [
        "weft_events_received",
        "weft_deliveries_delivered",
        "weft_queue_depth",
        "weft_end_to_end_latency_seconds",
        "weft_circuit_state",
        "weft_freshness_late",
    ] {
        assert!(
            fams.contains_key(expected),
            "{expected} missing: {:?}",
            fams.keys()
        );
    }
    let flow = json!({"flow": "crm_to_api"});
    // the batch with a duplicate counted its two new records (P1-9)
    assert_eq!(
        value(&fams, "weft_events_received_total", flow.clone()),
        Some(4.0)
    );
    assert_eq!(
        value(&fams, "weft_events_filtered_total", flow.clone()),
        Some(1.0)
    );
    assert_eq!(
        value(&fams, "weft_events_rejected_total", flow.clone()),
        Some(1.0)
    );
    assert_eq!(
        value(
            &fams,
            "weft_events_duplicate_total",
            json!({"source": "crm"})
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&fams, "weft_deliveries_delivered_total", lane.clone()),
        Some(2.0)
    );
    assert_eq!(
        value(&fams, "weft_end_to_end_latency_seconds_count", lane.clone()),
        Some(2.0)
    );
    assert_eq!(value(&fams, "weft_queue_depth", lane.clone()), Some(0.0));
    assert_eq!(
        value(&fams, "weft_circuit_state", json!({"destination": "api"})),
        Some(0.0)
    );
    assert_eq!(
        value(&fams, "weft_freshness_sla_seconds", flow.clone()),
        Some(3600.0)
    );
    assert_eq!(value(&fams, "weft_freshness_late", flow.clone()), Some(0.0));
    let age = value(&fams, "weft_flow_last_received_age_seconds", flow.clone()).unwrap();
    assert!((0.0..30.0).contains(&age), "{age}");
    let rejects = json!({"flow": "crm_to_api", "destination": ""});
    assert_eq!(value(&fams, "weft_dlq_depth", rejects.clone()), Some(1.0));

    // gauges are read at the scrape: the DLQ emptied by the CLI (a second
    // writer beside the hub) reads 0 in the very next scrape, and a row
    // waiting behind a failing destination counts at once
    let out = weft_cmd(dir.path(), &["dlq", "discard", "-c", "weft.yaml", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rec.set(FAIL_500);
    post(&hub, json!([{"id": 5, "amount": 5}]));
    let fams = parsed(&hub);
    assert_eq!(value(&fams, "weft_dlq_depth", rejects), Some(0.0));
    assert_eq!(value(&fams, "weft_queue_depth", lane.clone()), Some(1.0));
    assert_eq!(
        value(&fams, "weft_events_received_total", flow.clone()),
        Some(5.0)
    );
    rec.set(OK);
    wait_for(Duration::from_secs(20), "the retry", || rec.count() == 3);
    wait_for(
        Duration::from_secs(5),
        "queue depth 0 at the scrape",
        || value(&parsed(&hub), "weft_queue_depth", lane.clone()) == Some(0.0),
    );
}
