//! The JSON Lines sink against real files.

use serde_json::{Value, json};
use weft_connectors::export::JsonlSink;
use weft_connectors::{Delivery, Sink};
use weft_core::config::ExportTarget;
use weft_core::config::raw::JsonlSinkConfig;

fn delivery(id: i64, payload: Value) -> Delivery {
    Delivery {
        id,
        idempotency_key: format!("k-{id}"),
        correlation_id: "c-1".into(),
        event_id: format!("e-{id}"),
        entity_key: None,
        attempt: 1,
        payload,
        context: Default::default(),
    }
}

fn cfg(envelope: bool) -> JsonlSinkConfig {
    JsonlSinkConfig {
        envelope,
        ..JsonlSinkConfig::default()
    }
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn appends_one_line_per_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/out.jsonl");
    let sink = JsonlSink::open(&cfg(false), &ExportTarget::File(path.clone())).unwrap();
    let r = sink
        .write(&[delivery(1, json!({"x": 1})), delivery(2, json!("two"))])
        .await;
    assert!(r.iter().all(|r| r.is_ok()));
    let r = sink.write(&[delivery(3, json!([3]))]).await;
    assert_eq!(r.len(), 1);
    drop(sink);
    // reopening appends
    let sink = JsonlSink::open(&cfg(false), &ExportTarget::File(path.clone())).unwrap();
    sink.write(&[delivery(4, json!(null))]).await;
    assert_eq!(
        lines(&path),
        vec![json!({"x": 1}), json!("two"), json!([3]), json!(null)]
    );
}

#[tokio::test]
async fn envelope_carries_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let sink = JsonlSink::open(&cfg(true), &ExportTarget::File(path.clone())).unwrap();
    sink.write(&[delivery(7, json!({"x": 1}))]).await;
    assert_eq!(
        lines(&path),
        vec![
            json!({"id": "e-7", "idempotency_key": "k-7", "correlation_id": "c-1", "data": {"x": 1}})
        ]
    );
}

#[tokio::test]
async fn partial_trailing_line_is_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    std::fs::write(&path, "{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
    let sink = JsonlSink::open(&cfg(false), &ExportTarget::File(path.clone())).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"a\":1}\n{\"b\":2}\n"
    );
    sink.write(&[delivery(1, json!({"d": 4}))]).await;
    assert_eq!(
        lines(&path),
        vec![json!({"a": 1}), json!({"b": 2}), json!({"d": 4})]
    );

    // a file that is one partial line becomes empty
    let path2 = dir.path().join("only.jsonl");
    std::fs::write(&path2, "{\"half\":").unwrap();
    JsonlSink::open(&cfg(false), &ExportTarget::File(path2.clone())).unwrap();
    assert_eq!(std::fs::read(&path2).unwrap(), b"");

    // a longer partial line than the read-back buffer
    let path3 = dir.path().join("long.jsonl");
    let long = format!("{{\"ok\":1}}\n{{\"s\":\"{}", "x".repeat(200_000));
    std::fs::write(&path3, long).unwrap();
    JsonlSink::open(&cfg(false), &ExportTarget::File(path3.clone())).unwrap();
    assert_eq!(std::fs::read_to_string(&path3).unwrap(), "{\"ok\":1}\n");
}
