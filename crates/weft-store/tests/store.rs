//! SQLite-specific behaviour of the journal: migration of a version-3 store,
//! read-only opening, one hub per store, a tool as second writer. The
//! engine-independent contract is `tests/conformance.rs`.

use std::sync::Arc;
use std::time::Duration;

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

fn routed(id: &str, key: &str) -> FlowOutcome {
    FlowOutcome::Routed {
        flow: "f".into(),
        deliveries: vec![NewDelivery {
            destination: "d".into(),
            entity_key: Some(key.into()),
            idempotency_key: format!("ik-{id}"),
            payload: format!("{{\"x\":\"{id}\"}}"),
            delivered: false,
        }],
    }
}

fn batch(events: Vec<NewEvent>) -> IngestBatch {
    IngestBatch {
        source: "crm".into(),
        dedupe: Dedupe::Id,
        events,
        checkpoint: None,
        fence: None,
    }
}

fn claim(n: usize) -> ClaimRequest {
    ClaimRequest {
        lane: LaneId::new("f", "d"),
        max: n,
        per_key: 1,
        lease: Duration::from_secs(30),
    }
}

fn balanced(j: &dyn Journal) -> FlowCounts {
    let c = j.read().counts(&[LaneId::new("f", "d")]).unwrap();
    assert!(c[0].balanced, "accounting identity broken: {:?}", c[0]);
    c[0].clone()
}

#[tokio::test]
async fn a_hub_restart_ends_the_leases_of_the_previous_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.db");
    {
        let j = SqliteJournal::open(&p, Synchronous::Full, Role::Hub).unwrap();
        j.ingest(batch(vec![
            event("1", vec![routed("1", "a")]),
            event("2", vec![routed("2", "a")]),
        ]))
        .await
        .unwrap();
        let c = j.claim(claim(10)).await.unwrap();
        assert_eq!(c.len(), 1, "only the head of key a");
        // the run dies with the row leased
    }
    let j = SqliteJournal::open(&p, Synchronous::Full, Role::Hub).unwrap();
    let c = j.claim(claim(10)).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(
        c[0].row.idempotency_key, "ik-1",
        "the head is claimable again"
    );
    balanced(&j);
}

#[tokio::test]
async fn two_hubs_cannot_share_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.db");
    let _a = SqliteJournal::open(&p, Synchronous::Full, Role::Hub).unwrap();
    assert!(SqliteJournal::hub_running(&p));
    let err = SqliteJournal::open(&p, Synchronous::Full, Role::Hub)
        .err()
        .expect("a second hub is refused");
    assert!(err.to_string().contains("another `weft run`"), "{err}");
    // a tool may open it beside the hub
    SqliteJournal::open(&p, Synchronous::Full, Role::Tool).unwrap();
}

#[tokio::test]
async fn a_tool_replays_beside_a_running_hub_and_the_hub_sees_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.db");
    let hub = SqliteJournal::open(&p, Synchronous::Full, Role::Hub).unwrap();
    hub.ingest(batch(vec![event("1", vec![routed("1", "a")])]))
        .await
        .unwrap();
    let c = hub.claim(claim(10)).await.unwrap();
    hub.settle(Settle {
        items: vec![Settlement {
            id: c[0].row.id,
            token: c[0].token,
            attempt: None,
            outcome: Outcome::Dead {
                error: "bad".into(),
                hold_key: false,
            },
        }],
        follow_ups: vec![],
    })
    .await
    .unwrap();
    let dead = hub.read().dlq_list(&DlqFilter::default()).unwrap();
    assert_eq!(dead.len(), 1);
    let tool = SqliteJournal::open(&p, Synchronous::Full, Role::Tool).unwrap();
    tool.replay(Replay {
        dlq_id: dead[0].id,
        payload: None,
        outcome: None,
        force: false,
        note: "replayed".into(),
    })
    .await
    .unwrap();
    drop(tool);
    let c = hub.claim(claim(10)).await.unwrap();
    assert_eq!(c.len(), 1, "the hub claims the row the tool replayed");
    assert_eq!(c[0].row.idempotency_key, "ik-1");
    balanced(&hub);
}

#[tokio::test]
async fn read_only_opening_never_creates_or_migrates() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("none.db");
    let err = SqliteJournal::open_read_only(&p).err().unwrap();
    assert!(err.to_string().contains("no store at"), "{err}");
    assert!(!p.exists(), "nothing was created");
    let old = dir.path().join("old.db");
    weft_store::testing::create_at_version(&old, 3).unwrap();
    let err = SqliteJournal::open_read_only(&old).err().unwrap();
    assert!(err.to_string().contains("schema version 3"), "{err}");
    assert_eq!(
        weft_store::testing::version(&old).unwrap(),
        3,
        "not migrated"
    );
}

/// A store written by the previous release (schema 3: the inbox, outbox
/// without states) keeps its pending rows, their order per key, the DLQ
/// (with the attributes a map-stage replay needs) and its dedupe ids.
#[tokio::test]
async fn a_version_3_store_is_carried_over() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v3.db");
    weft_store::testing::create_at_version(&p, 3).unwrap();
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(
            r#"
            INSERT INTO inbox (source, event_id, received_at, correlation_id, attributes, payload) VALUES
              ('crm', 'e1', 1, 'c1', '{"id":"e1","type":"t"}', '{}'),
              ('crm', 'e2', 2, 'c2', '{"id":"e2"}', '{}'),
              ('crm', 'e3', 3, 'c3', '{"id":"e3","type":"map"}', '{}');
            INSERT INTO outbox (flow, destination, entity_key, idempotency_key, source, event_id,
              correlation_id, created_at, payload) VALUES
              ('f', 'd', 'a', 'ik-e1', 'crm', 'e1', 'c1', 1, '{"v":1}'),
              ('f', 'd', 'a', 'ik-e2', 'crm', 'e2', 'c2', 2, '{"v":2}');
            INSERT INTO dlq (stage, flow, destination, source, event_id, correlation_id, created_at,
              failed_at, attempts, error, payload) VALUES
              ('map', 'f', '', 'crm', 'e3', 'c3', 3, 3, 0, 'mapping failed', '{}');
            INSERT INTO flow_counts (flow, destination, received, rejected) VALUES ('f', '', 3, 1);
            "#,
        )
        .unwrap();
    }
    let j = SqliteJournal::open(&p, Synchronous::Full, Role::Hub).unwrap();
    assert_eq!(
        weft_store::testing::version(&p).unwrap(),
        latest_version() as i64
    );
    let c = balanced(&j);
    assert_eq!((c.received, c.pending, c.rejected), (3, 2, 1));
    let got = j.claim(claim(10)).await.unwrap();
    assert_eq!(got.len(), 1, "key a's second row waits behind its first");
    assert_eq!(got[0].row.event_id, "e1");
    let dead = j.read().dlq_list(&DlqFilter::default()).unwrap();
    assert_eq!(
        dead[0].attributes.as_deref(),
        Some(r#"{"id":"e3","type":"map"}"#)
    );
    // e1 was accepted before: still a duplicate
    let a = j
        .ingest(batch(vec![event("e1", vec![routed("e1", "a")])]))
        .await
        .unwrap();
    assert_eq!((a.changed, a.duplicates), (0, 1));
}

/// P1-5: a group whose transaction SQLite rolled back by itself must not be
/// answered `Ok` in part. Driven here by a full disk: `max_page_count`.
#[tokio::test]
async fn a_full_disk_fails_the_batch_and_loses_nothing_already_committed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.db");
    let j = Arc::new(SqliteJournal::open(&p, Synchronous::Full, Role::Hub).unwrap());
    j.ingest(batch(vec![event("1", vec![routed("1", "a")])]))
        .await
        .unwrap();
    weft_store::testing::limit_pages(&j, 1).await.unwrap();
    let big: Vec<NewEvent> = (0..2000)
        .map(|i| {
            let mut e = event(&format!("big{i}"), vec![routed(&format!("big{i}"), "b")]);
            e.payload = "x".repeat(2000);
            e
        })
        .collect();
    let r = j.ingest(batch(big)).await;
    let e = r.expect_err("a batch that does not fit is refused");
    // P1-22: the store failing is not the caller's mistake (the admin API
    // answered 409 Conflict for it)
    assert!(
        !e.is_user_error(),
        "a full disk is an infrastructure error: {e}"
    );
    assert!(e.to_string().contains("commit failed"), "{e}");
    weft_store::testing::limit_pages(&j, 1_000_000_000)
        .await
        .unwrap();
    let c = balanced(&*j);
    assert_eq!(
        c.pending, 1,
        "the earlier commit is whole, the refused batch absent"
    );
}
