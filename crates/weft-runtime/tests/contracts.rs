//! Contract checks and drift in the ingest path, without a store or server;
//! plus a timing of their per-record cost (`--ignored`, best with `--release`).

use std::path::Path;

use serde_json::{Value, json};
use weft_connectors::{Batch, Record};
use weft_core::config::{self, Config};
use weft_core::event::Event;
use weft_runtime::contracts::refusal;
use weft_runtime::drift::Tracker;
use weft_runtime::{prepare_with, run_flow};
use weft_store::FlowOutcome;

fn config(dir: &Path, on_violation: &str, on_drift: &str) -> Config {
    std::fs::write(
        dir.join("c.json"),
        r#"{"type": "object", "required": ["id", "email"], "additionalProperties": false,
            "properties": {"id": {"type": "integer"}, "email": {"type": "string", "format": "email"},
                           "tier": {"enum": ["A", "B"]}, "tags": {}, "first_name": {"type": "string"},
                           "last_name": {"type": "string"}, "company": {"type": "string"},
                           "updated_at": {"type": "string", "format": "date-time"},
                           "address": {"type": "object", "properties": {"street": {"type": "string"},
                               "city": {"type": "string"}, "postal_code": {"type": "string"}, "country": {"type": "string"}}}}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("dest.json"),
        r#"{"type": "object", "required": ["ref"], "properties": {"ref": {"type": "string", "maxLength": 8}}}"#,
    )
    .unwrap();
    let text = format!(
        r#"entities:
  contact:
    contract: c.json
    sensitive: [/email]
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
  out:
    sink:
      jsonl:
        path: out.jsonl
flows:
  f:
    from: crm
    entity: contact
    on_violation: {on_violation}
    on_drift: {on_drift}
    to:
      - system: out
        contract: dest.json
        mapping: '{{ref: (.id | tostring)}}'
"#
    );
    config::load_str(&dir.join("weft.yaml"), &text, &|_| None).unwrap()
}

fn run(cfg: &Config, data: Value) -> FlowOutcome {
    run_flow(&cfg.flows[0], "crm", "e1", &data, &json!({}))
}

fn rec(id: String, data: Value) -> Record {
    Record::Good(Event::new(id, "crm", "crm.webhook", None, data))
}

#[test]
fn violation_modes() {
    let dir = tempfile::tempdir().unwrap();
    let good = json!({"id": 1, "email": "a@b.example", "tier": "A"});
    let bad = json!({"id": "1", "email": "secret@@nope", "tier": "Z"});

    let cfg = config(dir.path(), "dead_letter", "record");
    assert!(matches!(
        run(&cfg, good.clone()),
        FlowOutcome::Routed { .. }
    ));
    match run(&cfg, bad.clone()) {
        FlowOutcome::Rejected { error, stage, .. } => {
            assert_eq!(stage.as_str(), "map");
            assert!(
                error.starts_with("contract violation: entity contact:"),
                "{error}"
            );
            assert!(
                error.contains("/id")
                    && error.contains("[type]")
                    && error.contains("(value: \"1\")"),
                "{error}"
            );
            assert!(
                error.contains("/tier") && error.contains("[enum]"),
                "{error}"
            );
            assert!(
                error.contains("/email") && !error.contains("secret"),
                "{error}"
            );
        }
        o => panic!("{o:?}"),
    }

    let cfg = config(dir.path(), "warn", "record");
    assert!(matches!(run(&cfg, bad.clone()), FlowOutcome::Routed { .. }));

    let cfg = config(dir.path(), "reject", "record");
    let batch = Batch {
        records: vec![rec("e1".into(), bad)],
        checkpoint: None,
    };
    let prepared = prepare_with("crm", &cfg.flows, batch, None);
    let why = refusal(&prepared).expect("refused");
    assert!(why.contains("/id"), "{why}");
    let batch = Batch {
        records: vec![rec("e2".into(), good)],
        checkpoint: None,
    };
    assert!(refusal(&prepare_with("crm", &cfg.flows, batch, None)).is_none());
}

#[test]
fn destination_contract_is_checked_before_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "dead_letter", "record");
    assert!(matches!(
        run(&cfg, json!({"id": 1, "email": "a@b.example"})),
        FlowOutcome::Routed { .. }
    ));
    // the entity passes; the destination's `ref` is longer than its contract allows
    match run(&cfg, json!({"id": 123456789, "email": "a@b.example"})) {
        FlowOutcome::Rejected { error, .. } => {
            assert!(error.contains("contract of `out`"), "{error}");
            assert!(
                error.contains("/ref") && error.contains("[maxLength]"),
                "{error}"
            );
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn drift_quarantine_in_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "dead_letter", "quarantine");
    let tracker = Tracker::new("crm", vec!["/email".into()]);
    let ev = |i: u64, tags: Value| {
        rec(
            format!("e{i}"),
            json!({"id": i, "email": "a@b.example", "tags": tags}),
        )
    };
    let batch = Batch {
        records: (0..5)
            .map(|i| ev(i, json!("x")))
            .chain([ev(9, json!(["x"]))])
            .collect(),
        checkpoint: None,
    };
    let out = prepare_with("crm", &cfg.flows, batch, Some(&tracker));
    match &out.events[5].outcomes[0] {
        FlowOutcome::Rejected { error, .. } => {
            assert!(error.starts_with("drift: type_changed /tags"), "{error}")
        }
        o => panic!("{o:?}"),
    }
    assert!(matches!(
        out.events[0].outcomes[0],
        FlowOutcome::Routed { .. }
    ));
    let b = tracker.take().unwrap();
    assert_eq!(
        b.events.iter().filter(|e| e.kind == "type_changed").count(),
        1
    );
}
