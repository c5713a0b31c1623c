//! The store's state machine: ingest, dedupe, deliver, retry, DLQ, replay,
//! discard, with the accounting identity checked after every step.

use weft_store::*;

fn event(id: &str, outcomes: Vec<FlowOutcome>) -> NewEvent {
    NewEvent {
        event_id: id.into(),
        correlation_id: format!("c-{id}"),
        received_at: now_ms(),
        event_time: now_ms(),
        source_version: None,
        group_id: None,
        traceparent: None,
        tracestate: None,
        attributes: "{}".into(),
        payload: format!("{{\"id\":\"{id}\"}}"),
        outcomes,
    }
}

fn routed(id: &str) -> FlowOutcome {
    FlowOutcome::Routed {
        flow: "f".into(),
        deliveries: vec![NewDelivery {
            destination: "d".into(),
            entity_key: Some(format!("k{id}")),
            idempotency_key: format!("ik-{id}"),
            payload: format!("{{\"x\":\"{id}\"}}"),
        }],
    }
}

fn counts(s: &Store) -> FlowCounts {
    let lanes = vec![("f".to_string(), "d".to_string())];
    let c = s.reader().unwrap().counts(&lanes).unwrap();
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(c[0].balanced, "accounting identity broken: {:?}", c[0]);
    c[0].clone()
}

#[tokio::test]
async fn lifecycle_keeps_every_record_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("w.db"), Synchronous::Full).unwrap();
    let batch = IngestBatch {
        dedupe: Dedupe::Id,
        source: "crm".into(),
        events: vec![
            event("1", vec![routed("1")]),
            event("2", vec![routed("2")]),
            event("3", vec![FlowOutcome::Filtered { flow: "f".into() }]),
            event("4", vec![FlowOutcome::rejected("f", Stage::Map, "bad")]),
        ],
        checkpoint: Some(("pos".into(), "4".into())),
    };
    let a = s.apply(Op::Ingest(batch.clone())).await.unwrap();
    assert_eq!((a.changed, a.duplicates), (4, 0));
    // the same batch again: all duplicates, nothing stored twice
    let a = s.apply(Op::Ingest(batch)).await.unwrap();
    assert_eq!((a.changed, a.duplicates), (0, 4));
    let r = s.reader().unwrap();
    assert_eq!(r.checkpoint("crm", "pos").unwrap().as_deref(), Some("4"));
    let c = counts(&s);
    assert_eq!(
        (c.received, c.filtered, c.rejected, c.pending),
        (4, 1, 1, 2)
    );

    let rows = r.outbox_after("f", "d", 0, 10).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].idempotency_key, "ik-1");
    s.apply(Op::Delivered(vec![rows[0].id])).await.unwrap();
    // delivering twice (a crash between write and mark) counts once
    let again = s.apply(Op::Delivered(vec![rows[0].id])).await.unwrap();
    assert_eq!(again.changed, 0);
    s.apply(Op::Retry {
        id: rows[1].id,
        attempts: 1,
        next_at: now_ms() + 1000,
        error: "503".into(),
    })
    .await
    .unwrap();
    s.apply(Op::DeadLetter {
        id: rows[1].id,
        attempts: 2,
        error: "gave up".into(),
    })
    .await
    .unwrap();
    let c = counts(&s);
    assert_eq!((c.delivered, c.dead_lettered, c.pending), (1, 1, 0));

    let dead = r.dlq_list(&DlqFilter::default()).unwrap();
    assert_eq!(dead.len(), 2);
    let deliver = dead.iter().find(|e| e.stage == "deliver").unwrap();
    assert_eq!(deliver.idempotency_key.as_deref(), Some("ik-2"));
    assert_eq!(deliver.error, "gave up");
    s.apply(Op::Replay {
        dlq_id: deliver.id,
        payload: Some("{\"x\":\"fixed\"}".into()),
        note: "test".into(),
    })
    .await
    .unwrap();
    let c = counts(&s);
    assert_eq!((c.dead_lettered, c.pending), (0, 1));
    let rows = r.outbox_after("f", "d", 0, 10).unwrap();
    assert_eq!(
        rows[0].idempotency_key, "ik-2",
        "replay keeps the idempotency key"
    );
    assert_eq!(
        rows[0].correlation_id, "c-2",
        "replay keeps the correlation id"
    );
    assert_eq!(rows[0].payload, "{\"x\":\"fixed\"}");
    // a replayed entry cannot be replayed again
    assert!(
        s.apply(Op::Replay {
            dlq_id: deliver.id,
            payload: None,
            note: String::new()
        })
        .await
        .is_err()
    );

    let map = dead.iter().find(|e| e.stage == "map").unwrap();
    s.apply(Op::Discard {
        dlq_id: map.id,
        note: "not needed".into(),
    })
    .await
    .unwrap();
    let c = counts(&s);
    assert_eq!((c.rejected, c.discarded), (0, 1));
    let all = r
        .dlq_list(&DlqFilter {
            status: Some("all".into()),
            ..Default::default()
        })
        .unwrap();
    let h = &all.iter().find(|e| e.id == map.id).unwrap().history;
    assert_eq!(h.as_array().unwrap().len(), 2, "{h}");
}

#[tokio::test]
async fn reopen_keeps_data_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.db");
    {
        let s = Store::open(&p, Synchronous::Normal).unwrap();
        s.apply(Op::Ingest(IngestBatch {
            dedupe: Dedupe::Id,
            source: "s".into(),
            events: vec![event("1", vec![routed("1")])],
            checkpoint: None,
        }))
        .await
        .unwrap();
    }
    let s = Store::open(&p, Synchronous::Full).unwrap();
    assert_eq!(s.reader().unwrap().outbox_len().unwrap(), 1);
}
