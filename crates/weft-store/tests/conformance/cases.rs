//! The conformance tests, one `pub async fn` per contract point, each run
//! on every engine by `conformance!`.

use std::sync::Arc;
use std::time::Duration;

use weft_store::*;

use crate::Harness;
use crate::testing::Recorder;

/// Long enough that no lease expires during a test unless it means to.
pub const LEASE: Duration = Duration::from_secs(60);

pub fn lane(flow: &str, destination: &str) -> LaneId {
    LaneId::new(flow, destination)
}

pub fn delivery(id: &str, destination: &str, key: Option<&str>) -> NewDelivery {
    NewDelivery {
        destination: destination.into(),
        entity_key: key.map(Into::into),
        idempotency_key: format!("ik-{id}-{destination}"),
        payload: format!("{{\"id\":\"{id}\"}}"),
        delivered: false,
    }
}

/// Flow `flow` routes event `id` to each `(destination, key)`.
pub fn routed(flow: &str, id: &str, to: &[(&str, Option<&str>)]) -> FlowOutcome {
    FlowOutcome::Routed {
        flow: flow.into(),
        deliveries: to.iter().map(|(d, k)| delivery(id, d, *k)).collect(),
    }
}

/// A map-stage rejection that keeps its key and holds it at `hold`.
pub fn rejected(flow: &str, key: Option<&str>, hold: &[&str]) -> FlowOutcome {
    FlowOutcome::Rejected {
        flow: flow.into(),
        stage: Stage::Map,
        error: "mapping failed: .x is null".into(),
        entity_key: key.map(Into::into),
        hold: hold.iter().map(|d| d.to_string()).collect(),
    }
}

pub fn event(id: &str, outcomes: Vec<FlowOutcome>) -> NewEvent {
    let now = now_ms();
    NewEvent {
        event_id: id.into(),
        correlation_id: format!("c-{id}"),
        received_at: now,
        event_time: now,
        source_version: None,
        group_id: None,
        traceparent: None,
        tracestate: None,
        attributes: format!("{{\"id\":\"{id}\",\"type\":\"t\"}}"),
        payload: format!("{{\"id\":\"{id}\"}}"),
        outcomes,
    }
}

/// Event `id` of flow `f` to destination `d` with `key`.
pub fn one(id: &str, key: Option<&str>) -> NewEvent {
    event(id, vec![routed("f", id, &[("d", key)])])
}

/// Event `id` of `flow` to destination `d` with `key`.
pub fn of(flow: &str, id: &str, key: Option<&str>) -> NewEvent {
    event(id, vec![routed(flow, id, &[("d", key)])])
}

pub fn batch(events: Vec<NewEvent>) -> IngestBatch {
    IngestBatch {
        source: "crm".into(),
        dedupe: Dedupe::Id,
        events,
        checkpoint: None,
        fence: None,
    }
}

pub fn delivered() -> Outcome {
    Outcome::Delivered(WriteOutcome::default())
}

pub fn dead(hold_key: bool) -> Outcome {
    Outcome::Dead {
        error: "422 unprocessable".into(),
        hold_key,
    }
}

pub fn retry_in(ms: i64) -> Outcome {
    Outcome::Retry {
        next_at: now_ms() + ms,
        error: "503".into(),
    }
}

pub fn replay(dlq_id: i64) -> Replay {
    Replay {
        dlq_id,
        payload: None,
        outcome: None,
        force: false,
        note: "test".into(),
    }
}

/// The event ids of claimed rows, in claim order.
pub fn evs(c: &[Claimed]) -> Vec<&str> {
    c.iter().map(|c| c.row.event_id.as_str()).collect()
}

/// `[received, filtered, rejected, delivered, dead_lettered, discarded,
/// pending]` of one lane.
pub type Nums = [i64; 7];

pub fn nums(c: &FlowCounts) -> Nums {
    [
        c.received,
        c.filtered,
        c.rejected,
        c.delivered,
        c.dead_lettered,
        c.discarded,
        c.pending,
    ]
}

/// A journal and the lanes to check after every step.
pub struct Rig {
    pub j: Arc<dyn Journal>,
    pub lanes: Vec<LaneId>,
}

impl Rig {
    pub fn new(h: &impl Harness, lanes: &[(&str, &str)]) -> Rig {
        let rig = Rig {
            j: h.journal(),
            lanes: lanes.iter().map(|(f, d)| lane(f, d)).collect(),
        };
        rig.check();
        rig
    }

    /// A crash and restart of the engine; then its new journal.
    pub fn restart(&mut self, h: &mut impl Harness) {
        crate::restart(h, &mut self.j);
        self.check();
    }

    /// Every lane's counts, each asserted balanced.
    pub fn check(&self) -> Vec<FlowCounts> {
        let all = self.j.read().counts(&self.lanes).expect("counts");
        for c in &all {
            assert!(c.balanced, "accounting identity broken: {c:?}");
        }
        for l in &self.lanes {
            assert!(
                all.iter()
                    .any(|c| c.flow == l.flow && c.destination == l.destination),
                "counts() left out the lane {l:?}: {all:?}"
            );
        }
        all
    }

    pub fn nums(&self, flow: &str, destination: &str) -> Nums {
        let all = self.check();
        let c = all
            .iter()
            .find(|c| c.flow == flow && c.destination == destination)
            .unwrap_or_else(|| panic!("no counts for {flow}/{destination}: {all:?}"));
        nums(c)
    }

    pub async fn ingest(&self, events: Vec<NewEvent>) -> Applied {
        self.ingest_batch(batch(events)).await
    }

    pub async fn ingest_batch(&self, b: IngestBatch) -> Applied {
        let a = self.j.ingest(b).await.expect("ingest");
        self.check();
        a
    }

    pub async fn claim(&self, flow: &str, destination: &str, max: usize) -> Vec<Claimed> {
        self.claim_with(flow, destination, max, 1, LEASE).await
    }

    pub async fn claim_with(
        &self,
        flow: &str,
        destination: &str,
        max: usize,
        per_key: usize,
        lease: Duration,
    ) -> Vec<Claimed> {
        let c = self
            .j
            .claim(ClaimRequest {
                lane: lane(flow, destination),
                max,
                per_key,
                lease,
            })
            .await
            .expect("claim");
        self.check();
        for x in &c {
            assert_eq!(
                (x.row.flow.as_str(), x.row.destination.as_str()),
                (flow, destination),
                "a claim handed out a row of another lane"
            );
        }
        c
    }

    pub async fn settle(&self, items: Vec<(&Claimed, Outcome)>) -> Settled {
        self.settle_all(Settle {
            items: items
                .into_iter()
                .map(|(c, outcome)| Settlement {
                    id: c.row.id,
                    token: c.token,
                    attempt: None,
                    outcome,
                })
                .collect(),
            follow_ups: Vec::new(),
        })
        .await
    }

    pub async fn settle_all(&self, s: Settle) -> Settled {
        let r = self.j.settle(s).await.expect("settle");
        self.check();
        r
    }

    /// Claims `flow`/`d` and delivers what it got; returns the event ids.
    pub async fn deliver(&self, flow: &str, max: usize) -> Vec<String> {
        self.deliver_to(flow, "d", max).await
    }

    /// Claims a lane and delivers what it got; returns the event ids.
    pub async fn deliver_to(&self, flow: &str, destination: &str, max: usize) -> Vec<String> {
        let c = self.claim(flow, destination, max).await;
        let s = self
            .settle(c.iter().map(|c| (c, delivered())).collect())
            .await;
        assert_eq!(s.delivered, c.len(), "{s:?}");
        c.iter().map(|c| c.row.event_id.clone()).collect()
    }

    pub async fn replay(&self, r: Replay) -> Result<Applied, StoreError> {
        let r = self.j.replay(r).await;
        self.check();
        r
    }

    pub async fn discard(&self, id: i64) -> Result<Applied, StoreError> {
        let r = self.j.discard(id, "not needed".into()).await;
        self.check();
        r
    }

    /// Dead entries, in id order.
    pub fn dead(&self) -> Vec<DlqEntry> {
        self.j
            .read()
            .dlq_list(&DlqFilter::default())
            .expect("dlq_list")
    }

    pub fn entry(&self, id: i64) -> DlqEntry {
        self.j
            .read()
            .dlq_get(id)
            .expect("dlq_get")
            .unwrap_or_else(|| panic!("no DLQ entry {id}"))
    }

    pub fn pending(&self, flow: &str, destination: &str) -> Vec<OutboxRow> {
        self.j
            .read()
            .pending(&lane(flow, destination), 10_000)
            .expect("pending")
    }
}

fn pending_evs(rows: &[OutboxRow]) -> Vec<&str> {
    rows.iter().map(|r| r.event_id.as_str()).collect()
}

fn refused(r: Result<Applied, StoreError>) -> Refusal {
    match r {
        Err(StoreError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn invalid(r: Result<Applied, StoreError>) -> String {
    match r {
        Err(e @ StoreError::Invalid(_)) => {
            assert!(e.is_user_error());
            e.to_string()
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn not_found(r: Result<Applied, StoreError>) {
    match r {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------

/// Ported from `tests/store.rs`: ingest, dedupe counts once, deliver,
/// retry, dead letter, replay, discard, a map-stage replay through a new
/// outcome, and the history of each entry.
pub async fn lifecycle_keeps_every_record_accounted_for(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    let now = now_ms();
    let mut e1 = one("1", Some("k1"));
    e1.received_at = now;
    e1.event_time = now - 3_600_000;
    e1.source_version = Some("v7".into());
    e1.group_id = Some("tx-1".into());
    e1.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    e1.tracestate = Some("weft=1".into());
    let b = IngestBatch {
        source: "crm".into(),
        dedupe: Dedupe::Id,
        events: vec![
            e1,
            one("2", Some("k2")),
            event("3", vec![FlowOutcome::Filtered { flow: "f".into() }]),
            event("4", vec![FlowOutcome::rejected("f", Stage::Map, "bad")]),
        ],
        checkpoint: Some(("pos".into(), "4".into())),
        fence: None,
    };
    let a = rig.ingest_batch(b.clone()).await;
    assert_eq!((a.changed, a.duplicates), (4, 0));
    // the same batch again: all duplicates, nothing stored or counted twice
    let a = rig.ingest_batch(b).await;
    assert_eq!((a.changed, a.duplicates), (0, 4));
    let r = rig.j.read();
    assert_eq!(r.checkpoint("crm", "pos").unwrap().as_deref(), Some("4"));
    assert_eq!(r.checkpoint("crm", "other").unwrap(), None);
    assert_eq!(rig.nums("f", "d"), [4, 1, 1, 0, 0, 0, 2]);
    assert_eq!(r.outbox_len().unwrap(), 2);

    let rows = rig.pending("f", "d");
    assert_eq!(pending_evs(&rows), ["1", "2"]);
    let r1 = &rows[0];
    assert_eq!(
        (
            r1.idempotency_key.as_str(),
            r1.entity_key.as_deref(),
            r1.source.as_str(),
            r1.correlation_id.as_str(),
            r1.payload.as_str(),
            r1.attempts,
            r1.last_error.as_deref(),
        ),
        (
            "ik-1-d",
            Some("k1"),
            "crm",
            "c-1",
            "{\"id\":\"1\"}",
            0,
            None
        )
    );
    assert_eq!((r1.created_at, r1.event_time), (now, now - 3_600_000));
    assert_eq!(
        (
            r1.source_version.as_deref(),
            r1.group_id.as_deref(),
            r1.traceparent.as_deref(),
            r1.tracestate.as_deref()
        ),
        (
            Some("v7"),
            Some("tx-1"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("weft=1")
        )
    );
    assert!(rows[0].order_seq < rows[1].order_seq);
    let seq2 = rows[1].order_seq;
    let created2 = rows[1].created_at;

    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1", "2"]);
    assert_ne!(c[0].token, c[1].token);
    let s = rig
        .settle(vec![(&c[0], delivered()), (&c[1], retry_in(400))])
        .await;
    assert_eq!(
        s,
        Settled {
            delivered: 1,
            retried: 1,
            ..Default::default()
        }
    );
    // the same settlement again (a crash between write and settle): stale
    let s = rig.settle(vec![(&c[0], delivered())]).await;
    assert_eq!(
        s,
        Settled {
            stale: 1,
            ..Default::default()
        }
    );
    assert_eq!(rig.nums("f", "d"), [4, 1, 1, 1, 0, 0, 1]);
    let p = rig.pending("f", "d");
    assert_eq!(
        (p[0].attempts, p[0].last_error.as_deref()),
        (1, Some("503"))
    );
    assert!(rig.claim("f", "d", 10).await.is_empty(), "in backoff");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["2"]);
    assert_eq!(c[0].row.attempts, 1);
    let s = rig
        .settle(vec![(
            &c[0],
            Outcome::Dead {
                error: "gave up".into(),
                hold_key: false,
            },
        )])
        .await;
    assert_eq!(
        s,
        Settled {
            dead: 1,
            ..Default::default()
        }
    );
    assert_eq!(rig.nums("f", "d"), [4, 1, 1, 1, 1, 0, 0]);

    let dead = rig.dead();
    assert_eq!(dead.len(), 2);
    let map = dead.iter().find(|e| e.stage == "map").expect("map entry");
    assert_eq!(
        (
            map.status.as_str(),
            map.flow.as_str(),
            map.destination.as_str(),
            map.event_id.as_str(),
            map.error.as_str(),
            map.attempts,
            map.payload.as_str(),
            map.idempotency_key.as_deref(),
        ),
        ("dead", "f", "", "4", "bad", 0, "{\"id\":\"4\"}", None)
    );
    assert_eq!(map.history[0]["action"], "rejected");
    let dl = dead.iter().find(|e| e.stage == "deliver").expect("deliver");
    assert_eq!(
        (
            dl.flow.as_str(),
            dl.destination.as_str(),
            dl.entity_key.as_deref(),
            dl.idempotency_key.as_deref(),
            dl.event_id.as_str(),
            dl.correlation_id.as_str(),
            dl.source.as_str(),
            dl.attempts,
            dl.error.as_str(),
            dl.payload.as_str(),
            dl.created_at,
        ),
        (
            "f",
            "d",
            Some("k2"),
            Some("ik-2-d"),
            "2",
            "c-2",
            "crm",
            2,
            "gave up",
            "{\"id\":\"2\"}",
            created2
        )
    );
    let hist = dl.history.as_array().expect("history is an array");
    assert_eq!(hist.len(), 1);
    assert_eq!(
        (&hist[0]["action"], &hist[0]["attempts"], &hist[0]["error"]),
        (
            &serde_json::json!("dead_lettered"),
            &serde_json::json!(2),
            &serde_json::json!("gave up")
        )
    );
    let mut depths = r.dlq_depths().unwrap();
    depths.sort();
    assert_eq!(
        depths,
        [("f".into(), "".into(), 1), ("f".into(), "d".into(), 1)]
    );

    let a = rig
        .replay(Replay {
            payload: Some("{\"id\":\"2\",\"fixed\":true}".into()),
            ..replay(dl.id)
        })
        .await
        .expect("replay");
    assert_eq!(a.changed, 1);
    assert_eq!(rig.nums("f", "d"), [4, 1, 1, 1, 0, 0, 1]);
    let p = rig.pending("f", "d");
    assert_eq!(
        (
            p[0].event_id.as_str(),
            p[0].idempotency_key.as_str(),
            p[0].correlation_id.as_str(),
            p[0].entity_key.as_deref(),
            p[0].payload.as_str(),
            p[0].attempts,
            p[0].order_seq,
            p[0].created_at,
        ),
        (
            "2",
            "ik-2-d",
            "c-2",
            Some("k2"),
            "{\"id\":\"2\",\"fixed\":true}",
            0,
            seq2,
            created2
        )
    );
    // a replayed entry cannot be replayed again
    let msg = invalid(rig.replay(replay(dl.id)).await);
    assert!(msg.contains("already replayed"), "{msg}");
    assert_eq!(rig.nums("f", "d"), [4, 1, 1, 1, 0, 0, 1]);
    let e = rig.entry(dl.id);
    assert_eq!(e.status, "replayed");
    let hist = e.history.as_array().expect("history");
    assert_eq!(hist.len(), 2);
    assert_eq!(
        (&hist[1]["action"], &hist[1]["note"]),
        (&serde_json::json!("replayed"), &serde_json::json!("test"))
    );
    assert_eq!(rig.deliver("f", 10).await, ["2"]);

    rig.discard(map.id).await.expect("discard");
    assert_eq!(rig.nums("f", "d"), [4, 1, 0, 2, 0, 1, 0]);
    let e = rig.entry(map.id);
    assert_eq!(e.status, "discarded");
    let hist = e.history.as_array().expect("history");
    assert_eq!(hist.len(), 2);
    assert_eq!(
        (&hist[1]["action"], &hist[1]["note"]),
        (
            &serde_json::json!("discarded"),
            &serde_json::json!("not needed")
        )
    );
    assert!(rig.dead().is_empty());
    let all = r
        .dlq_list(&DlqFilter {
            status: Some("all".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.len(), 2);

    // a map-stage entry goes back through its flow's new outcome
    rig.ingest(vec![event("5", vec![rejected("f", Some("k5"), &[])])])
        .await;
    assert_eq!(rig.nums("f", "d"), [5, 1, 1, 2, 0, 1, 0]);
    let e = rig.dead().pop().expect("the new entry");
    assert_eq!(
        (
            e.stage.as_str(),
            e.entity_key.as_deref(),
            e.event_id.as_str()
        ),
        ("map", Some("k5"), "5")
    );
    rig.replay(Replay {
        outcome: Some(routed("f", "5", &[("d", Some("k5"))])),
        note: "mapping fixed".into(),
        ..replay(e.id)
    })
    .await
    .expect("map-stage replay");
    assert_eq!(rig.nums("f", "d"), [5, 1, 0, 2, 0, 1, 1]);
    let p = rig.pending("f", "d");
    assert_eq!(
        (
            p[0].event_id.as_str(),
            p[0].correlation_id.as_str(),
            p[0].source.as_str(),
            p[0].entity_key.as_deref(),
            p[0].created_at,
        ),
        ("5", "c-5", "crm", Some("k5"), e.created_at)
    );
    let hist = rig.entry(e.id).history;
    assert_eq!(hist[0]["action"], "rejected");
    assert_eq!(
        (&hist[1]["action"], &hist[1]["note"]),
        (
            &serde_json::json!("replayed"),
            &serde_json::json!("mapping fixed")
        )
    );
    assert_eq!(rig.deliver("f", 10).await, ["5"]);
    assert_eq!(rig.nums("f", "d"), [5, 1, 0, 3, 0, 1, 0]);
    assert_eq!(r.outbox_len().unwrap(), 0);
}

/// A batch that cannot be stored leaves nothing behind: no rows, no
/// counts, no checkpoint, no dedupe ids.
/// `NewDelivery::delivered` (the Ingestor's direct path): a keyless row
/// written before its ingest is counted delivered in the ingest, leaves no
/// row, and its checkpoint is saved with it; one with an entity key is
/// refused and the whole batch with it.
pub async fn delivered_at_ingest_counts_without_a_row(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    let mut written = delivery("1", "d", None);
    written.delivered = true;
    written.payload = String::new();
    let b = IngestBatch {
        source: "file".into(),
        dedupe: Dedupe::Position,
        events: vec![
            event(
                "1",
                vec![FlowOutcome::Routed {
                    flow: "f".into(),
                    deliveries: vec![written.clone()],
                }],
            ),
            one("2", None),
        ],
        checkpoint: Some(("pos".into(), "2".into())),
        fence: None,
    };
    rig.ingest_batch(b).await;
    assert_eq!(rig.nums("f", "d"), [2, 0, 0, 1, 0, 0, 1]);
    assert_eq!(rig.deliver("f", 10).await, vec!["2".to_string()]);
    assert_eq!(rig.nums("f", "d"), [2, 0, 0, 2, 0, 0, 0]);
    let r = rig.j.read();
    assert_eq!(r.checkpoint("file", "pos").unwrap().as_deref(), Some("2"));
    // keyed: refused, nothing of the batch applied
    let mut keyed = delivery("3", "d", Some("k"));
    keyed.delivered = true;
    let refused = rig
        .j
        .ingest(IngestBatch {
            source: "file".into(),
            dedupe: Dedupe::Position,
            events: vec![
                one("4", None),
                event(
                    "3",
                    vec![FlowOutcome::Routed {
                        flow: "f".into(),
                        deliveries: vec![keyed],
                    }],
                ),
            ],
            checkpoint: Some(("pos".into(), "4".into())),
            fence: None,
        })
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(rig.nums("f", "d"), [2, 0, 0, 2, 0, 0, 0]);
    assert_eq!(r.checkpoint("file", "pos").unwrap().as_deref(), Some("2"));
}

/// The attempt trail (issue 15): a settlement with its write is kept in
/// the same transaction, with the attempt's number, its status and the
/// outcome; a stale settlement, a release and a settlement without a write
/// leave none; the lookup finds them by event id, correlation id and key,
/// oldest first; the prune deletes those written before its cutoff.
pub async fn attempt_trail_keeps_each_write(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![one("1", Some("k")), one("2", None), one("3", None)])
        .await;
    let sent = |at: i64, status: Option<u16>| {
        Some(Attempt {
            at,
            latency_ms: 42,
            status,
        })
    };
    let settle = |c: &Claimed, outcome: Outcome, attempt: Option<Attempt>| Settlement {
        id: c.row.id,
        token: c.token,
        outcome,
        attempt,
    };
    let by_ev = |c: &[Claimed], ev: &str| {
        c.iter()
            .find(|c| c.row.event_id == ev)
            .cloned()
            .expect("claimed")
    };
    // first round: 1 fails (503), 2 is delivered (201), 3 is released
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(c.len(), 3, "{:?}", evs(&c));
    let s = rig
        .settle_all(Settle {
            items: vec![
                settle(&by_ev(&c, "1"), retry_in(-1), sent(1_000, Some(503))),
                settle(&by_ev(&c, "2"), delivered(), sent(1_000, Some(201))),
                settle(&by_ev(&c, "3"), Outcome::Release, sent(1_000, None)),
            ],
            follow_ups: Vec::new(),
        })
        .await;
    assert_eq!((s.retried, s.delivered, s.released), (1, 1, 1), "{s:?}");
    // second round: 1 dead-lettered (422), 3 delivered without a write
    // recorded; a stale settlement of 3 with a write adds nothing
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(c.len(), 2, "{:?}", evs(&c));
    let (one_, three) = (by_ev(&c, "1"), by_ev(&c, "3"));
    let mut stale = three.clone();
    stale.token += 1_000_000;
    let s = rig
        .settle_all(Settle {
            items: vec![
                settle(&stale, delivered(), sent(3_000, Some(200))),
                settle(&one_, dead(false), sent(2_000, Some(422))),
                settle(&three, delivered(), None),
            ],
            follow_ups: Vec::new(),
        })
        .await;
    assert_eq!((s.stale, s.dead, s.delivered), (1, 1, 1), "{s:?}");
    let r = rig.j.read();
    let trail = |id: &str| {
        r.lookup(id, 10)
            .expect("lookup")
            .attempts
            .into_iter()
            .map(|a| {
                (
                    a.event_id,
                    a.attempt,
                    a.at,
                    a.latency_ms,
                    a.status,
                    a.outcome,
                    a.error,
                )
            })
            .collect::<Vec<_>>()
    };
    let first = (
        "1".to_string(),
        1,
        1_000,
        42,
        Some(503),
        "retry".to_string(),
        Some("503".to_string()),
    );
    let second = (
        "1".to_string(),
        2,
        2_000,
        42,
        Some(422),
        "dead".to_string(),
        Some("422 unprocessable".to_string()),
    );
    assert_eq!(trail("1"), vec![first.clone(), second.clone()]);
    assert_eq!(trail("c-1"), vec![first.clone(), second.clone()]);
    assert_eq!(trail("k"), vec![first, second.clone()]);
    assert_eq!(
        trail("2"),
        vec![(
            "2".to_string(),
            1,
            1_000,
            42,
            Some(201),
            "delivered".to_string(),
            None
        )]
    );
    assert!(trail("3").is_empty(), "{:?}", trail("3"));
    let whole = r.lookup("1", 10).expect("lookup").attempts;
    assert_eq!(
        (whole[0].flow.as_str(), whole[0].destination.as_str()),
        ("f", "d")
    );
    assert_eq!(whole[0].entity_key.as_deref(), Some("k"));
    // the newest `limit`, oldest first
    assert_eq!(trail_limit(r, "1", 1), vec![2]);
    // the prune: before 2_000 goes, the rest stays; counts unchanged
    let counts = rig.nums("f", "d");
    let p = rig
        .j
        .prune(Prune {
            dedupe_before: i64::MIN,
            dlq_before: i64::MIN,
            drift_before: i64::MIN,
            attempts_before: 2_000,
        })
        .await
        .expect("prune");
    assert_eq!(p.attempts, 2, "{p:?}");
    assert_eq!(trail("1"), vec![second]);
    assert!(trail("2").is_empty());
    assert_eq!(rig.nums("f", "d"), counts);
}

fn trail_limit(r: &dyn JournalRead, id: &str, limit: usize) -> Vec<i64> {
    r.lookup(id, limit)
        .expect("lookup")
        .attempts
        .iter()
        .map(|a| a.attempt)
        .collect()
}

pub async fn ingest_is_all_or_nothing(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    let bad = FlowOutcome::Rejected {
        flow: "f".into(),
        stage: Stage::Deliver,
        error: "a flow never fails at deliver".into(),
        entity_key: None,
        hold: Vec::new(),
    };
    let r = rig
        .j
        .ingest(IngestBatch {
            checkpoint: Some(("pos".into(), "2".into())),
            fence: None,
            ..batch(vec![one("1", Some("k")), event("2", vec![bad])])
        })
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    assert_eq!(rig.nums("f", "d"), [0; 7]);
    assert_eq!(rig.j.read().outbox_len().unwrap(), 0);
    assert_eq!(rig.j.read().checkpoint("crm", "pos").unwrap(), None);
    assert!(rig.dead().is_empty());
    // event 1 was not remembered by the failed batch
    let a = rig.ingest(vec![one("1", Some("k"))]).await;
    assert_eq!((a.changed, a.duplicates), (1, 0));
    assert_eq!(rig.nums("f", "d"), [1, 0, 0, 0, 0, 0, 1]);
}

/// P3-7: a source that resumes from an exact position is not deduplicated;
/// prune forgets the ids accepted before its cutoff.
pub async fn position_dedupe_stores_repeats_and_prune_forgets_ids(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    for _ in 0..2 {
        let a = rig
            .ingest_batch(IngestBatch {
                source: "files".into(),
                dedupe: Dedupe::Position,
                events: vec![one("1", None)],
                checkpoint: None,
                fence: None,
            })
            .await;
        assert_eq!((a.changed, a.duplicates), (1, 0));
    }
    assert_eq!(pending_evs(&rig.pending("f", "d")), ["1", "1"]);

    let now = now_ms();
    let mut old = one("a", None);
    old.received_at = now - 10_000;
    let a = rig.ingest(vec![old, one("b", None)]).await;
    assert_eq!((a.changed, a.duplicates), (2, 0));
    let pruned = rig
        .j
        .prune(Prune::dedupe(now - 5_000))
        .await
        .expect("prune");
    assert_eq!(pruned.dedupe, 1);
    rig.check();
    // "a" is forgotten: stored again; "b" is remembered: a duplicate
    let a = rig.ingest(vec![one("a", None), one("b", None)]).await;
    assert_eq!((a.changed, a.duplicates), (1, 1));
    let pruned = rig
        .j
        .prune(Prune::dedupe(now - 5_000))
        .await
        .expect("prune");
    assert_eq!(pruned, Pruned::default());
    assert_eq!(rig.nums("f", "d"), [5, 0, 0, 0, 0, 0, 5]);
}

/// Only the head of a key queue goes out; a row in backoff blocks its key
/// until it is due; keyless rows go together.
pub async fn claim_hands_out_only_heads_of_key_queues(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![
        one("1", Some("k1")),
        one("2", Some("k1")),
        one("3", Some("k2")),
    ])
    .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1", "3"]);
    assert!(rig.claim("f", "d", 10).await.is_empty());
    rig.settle(vec![(&c[0], retry_in(400)), (&c[1], delivered())])
        .await;
    assert!(
        rig.claim("f", "d", 10).await.is_empty(),
        "1 is in backoff and 2 is behind it"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1"]);
    assert_eq!(c[0].row.attempts, 1);
    rig.settle(vec![(&c[0], delivered())]).await;
    assert_eq!(rig.deliver("f", 10).await, ["2"]);

    rig.ingest(vec![one("4", None), one("5", None), one("6", None)])
        .await;
    let c = rig.claim("f", "d", 2).await;
    assert_eq!(evs(&c), ["4", "5"]);
    assert_eq!(evs(&rig.claim("f", "d", 10).await), ["6"]);
    assert!(rig.claim("f", "d", 0).await.is_empty());
    assert_eq!(rig.nums("f", "d"), [6, 0, 0, 3, 0, 0, 3]);
}

/// A row that waits (for a referenced record's id) spends no attempt, keeps
/// its reason, blocks its key until it is due, and is handed out again then.
pub async fn wait_spends_no_attempt_and_keeps_the_key_head(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![one("1", Some("k")), one("2", Some("k"))])
        .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1"]);
    let wait = Outcome::Wait {
        next_at: now_ms() + 400,
        reason: "waiting for d's id of customer shop:7".into(),
    };
    rig.settle(vec![(&c[0], wait)]).await;
    assert!(
        rig.claim("f", "d", 10).await.is_empty(),
        "1 waits and 2 is behind it"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1"]);
    assert_eq!(c[0].row.attempts, 0, "waiting spends no attempt");
    assert_eq!(
        c[0].row.last_error.as_deref(),
        Some("waiting for d's id of customer shop:7")
    );
    rig.settle(vec![(&c[0], delivered())]).await;
    assert_eq!(rig.deliver("f", 10).await, ["2"]);
    assert_eq!(rig.nums("f", "d"), [2, 0, 0, 2, 0, 0, 0]);
}

/// P3-2: two flows writing one destination share the key's queue: never two
/// rows of the key out at once, delivered in acceptance order.
pub async fn p3_2_one_key_queue_across_flows(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("A", "d"), ("B", "d")]);
    rig.ingest(vec![
        of("A", "1", Some("k")),
        of("B", "2", Some("k")),
        of("A", "3", Some("k")),
        of("B", "4", Some("k")),
        of("B", "5", Some("other")),
    ])
    .await;
    let mut dest = Recorder::default();
    let a = rig.claim("A", "d", 10).await;
    assert_eq!(evs(&a), ["1"]);
    assert_eq!(rig.deliver("B", 10).await, ["5"], "2 waits for 1");
    assert!(rig.claim("B", "d", 10).await.is_empty());
    rig.settle(vec![(&a[0], delivered())]).await;
    dest.write(&a[0].row, false);
    assert!(rig.claim("A", "d", 10).await.is_empty(), "3 waits for 2");
    let b = rig.claim("B", "d", 10).await;
    assert_eq!(evs(&b), ["2"]);
    assert!(rig.claim("A", "d", 10).await.is_empty());
    rig.settle(vec![(&b[0], delivered())]).await;
    dest.write(&b[0].row, false);
    assert!(rig.claim("B", "d", 10).await.is_empty(), "4 waits for 3");
    let a = rig.claim("A", "d", 10).await;
    assert_eq!(evs(&a), ["3"]);
    rig.settle(vec![(&a[0], delivered())]).await;
    dest.write(&a[0].row, false);
    let b = rig.claim("B", "d", 10).await;
    assert_eq!(evs(&b), ["4"]);
    rig.settle(vec![(&b[0], delivered())]).await;
    dest.write(&b[0].row, false);
    assert_eq!(dest.events("d", "k"), ["1", "2", "3", "4"]);
    dest.assert_in_order();
    assert_eq!(rig.nums("A", "d"), [2, 0, 0, 2, 0, 0, 0]);
    assert_eq!(rig.nums("B", "d"), [3, 0, 0, 3, 0, 0, 0]);
}

/// A lease that passes makes the row claimable again under a new token; the
/// old token's settlements are stale and change nothing.
pub async fn lease_expires_and_stale_settlements_change_nothing(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![one("1", Some("k"))]).await;
    let c1 = rig
        .claim_with("f", "d", 10, 1, Duration::from_millis(50))
        .await;
    assert_eq!(evs(&c1), ["1"]);
    assert!(rig.claim("f", "d", 10).await.is_empty(), "leased");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let c2 = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c2), ["1"]);
    assert_eq!(c2[0].row.id, c1[0].row.id);
    assert_ne!(c2[0].token, c1[0].token);
    let old = &c1[0];
    let s = rig
        .settle(vec![
            (old, delivered()),
            (old, retry_in(10_000)),
            (old, dead(true)),
            (old, Outcome::Release),
        ])
        .await;
    assert_eq!(
        s,
        Settled {
            stale: 4,
            ..Default::default()
        }
    );
    assert_eq!(rig.nums("f", "d"), [1, 0, 0, 0, 0, 0, 1]);
    let p = rig.pending("f", "d");
    assert_eq!((p[0].attempts, p[0].last_error.as_deref()), (0, None));
    assert!(rig.dead().is_empty());
    assert!(
        rig.claim("f", "d", 10).await.is_empty(),
        "still leased by c2"
    );
    let s = rig.settle(vec![(&c2[0], delivered())]).await;
    assert_eq!(s.delivered, 1);
    assert_eq!(rig.nums("f", "d"), [1, 0, 0, 1, 0, 0, 0]);
}

/// A restart voids every lease; committed state stays; tokens are never
/// reused, so a settlement from before the restart is stale.
pub async fn restart_voids_leases(h: &mut impl Harness) {
    let mut rig = Rig::new(h, &[("f", "d")]);
    rig.ingest_batch(IngestBatch {
        checkpoint: Some(("pos".into(), "3".into())),
        ..batch(vec![
            one("1", Some("k")),
            one("2", None),
            event("3", vec![rejected("f", Some("k"), &[])]),
        ])
    })
    .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1", "2"]);
    rig.restart(h);
    assert_eq!(rig.nums("f", "d"), [3, 0, 1, 0, 0, 0, 2]);
    assert_eq!(
        rig.j.read().checkpoint("crm", "pos").unwrap().as_deref(),
        Some("3")
    );
    assert_eq!(rig.dead().len(), 1);
    let c2 = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c2), ["1", "2"]);
    for new in &c2 {
        assert!(
            c.iter().all(|old| old.token != new.token),
            "token {} was handed out before the restart",
            new.token
        );
    }
    let s = rig
        .settle(vec![(&c[0], delivered()), (&c[1], delivered())])
        .await;
    assert_eq!(s.stale, 2);
    assert_eq!(rig.nums("f", "d"), [3, 0, 1, 0, 0, 0, 2]);
    let s = rig
        .settle(vec![(&c2[0], Outcome::Release), (&c2[1], delivered())])
        .await;
    assert_eq!(
        s,
        Settled {
            delivered: 1,
            released: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        rig.deliver("f", 10).await,
        ["1"],
        "a release ends the lease"
    );
}

/// `per_key`: the head and the rows right behind it of the same lane, in
/// order; it stops at a row of another lane, at `per_key` and at `max`.
pub async fn per_key_takes_consecutive_rows_of_the_lane(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("A", "d"), ("B", "d")]);
    let evs_of = |ids: &[&str], flow: &str, key: &str| {
        ids.iter()
            .map(|id| of(flow, id, Some(key)))
            .collect::<Vec<_>>()
    };
    rig.ingest(evs_of(&["1", "2", "3", "4", "5"], "A", "k"))
        .await;
    let c = rig.claim_with("A", "d", 100, 10, LEASE).await;
    assert_eq!(evs(&c), ["1", "2", "3", "4", "5"]);
    assert!(
        c.windows(2)
            .all(|w| w[0].row.order_seq < w[1].row.order_seq)
    );
    let s = rig
        .settle(c.iter().map(|c| (c, delivered())).collect())
        .await;
    assert_eq!(s.delivered, 5);

    rig.ingest(vec![
        of("A", "6", Some("k")),
        of("A", "7", Some("k")),
        of("B", "8", Some("k")),
        of("A", "9", Some("k")),
        of("A", "10", Some("j")),
    ])
    .await;
    let c = rig.claim_with("A", "d", 100, 10, LEASE).await;
    assert_eq!(evs(&c), ["6", "7", "10"], "stops at B's row 8");
    rig.settle(c.iter().map(|c| (c, delivered())).collect())
        .await;
    assert!(rig.claim_with("A", "d", 100, 10, LEASE).await.is_empty());
    assert_eq!(rig.deliver("B", 10).await, ["8"]);
    assert_eq!(rig.deliver("A", 10).await, ["9"]);

    rig.ingest(evs_of(&["11", "12", "13"], "A", "k")).await;
    let c = rig.claim_with("A", "d", 2, 10, LEASE).await;
    assert_eq!(evs(&c), ["11", "12"], "max");
    rig.settle(c.iter().map(|c| (c, Outcome::Release)).collect())
        .await;
    let c = rig.claim_with("A", "d", 10, 2, LEASE).await;
    assert_eq!(evs(&c), ["11", "12"], "per_key");
    assert!(rig.claim_with("A", "d", 10, 10, LEASE).await.is_empty());
    rig.settle(c.iter().map(|c| (c, delivered())).collect())
        .await;
    assert_eq!(rig.deliver("A", 10).await, ["13"]);
    assert_eq!(rig.nums("A", "d"), [12, 0, 0, 12, 0, 0, 0]);
    assert_eq!(rig.nums("B", "d"), [1, 0, 0, 1, 0, 0, 0]);
}

/// `Dead{hold_key}` holds the rest of its key (other keys flow) until the
/// entry is discarded or replayed; the replayed row goes first.
pub async fn hold_key_holds_until_replay_or_discard(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![
        one("1", Some("k")),
        one("2", Some("k")),
        one("3", Some("j")),
    ])
    .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1", "3"]);
    rig.settle(vec![(&c[0], dead(true)), (&c[1], delivered())])
        .await;
    assert!(rig.claim("f", "d", 10).await.is_empty(), "k is held");
    rig.ingest(vec![one("4", Some("j"))]).await;
    assert_eq!(rig.deliver("f", 10).await, ["4"], "other keys flow");
    let e = rig.dead().pop().expect("entry");
    rig.discard(e.id).await.expect("discard");
    assert_eq!(rig.deliver("f", 10).await, ["2"]);

    rig.ingest(vec![one("5", Some("m")), one("6", Some("m"))])
        .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["5"]);
    rig.settle(vec![(&c[0], dead(true))]).await;
    assert!(rig.claim("f", "d", 10).await.is_empty(), "m is held");
    let e = rig.dead().pop().expect("entry");
    rig.replay(replay(e.id)).await.expect("replay");
    assert_eq!(rig.deliver("f", 10).await, ["5"]);
    assert_eq!(rig.deliver("f", 10).await, ["6"]);
    assert_eq!(rig.nums("f", "d"), [6, 0, 0, 5, 0, 1, 0]);
}

/// P0-4 (map-stage entries keep their key and honour `hold_key`): a
/// rejection holds its key at the destinations it lists, only there.
pub async fn map_stage_rejection_holds_listed_destinations(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("g", "d"), ("g", "e")]);
    let both = |id: &str, key: &str| routed("g", id, &[("d", Some(key)), ("e", Some(key))]);
    rig.ingest(vec![
        event("1", vec![rejected("g", Some("q"), &["d"])]),
        event("2", vec![both("2", "q")]),
        event("3", vec![both("3", "r")]),
    ])
    .await;
    let held = rig.dead().pop().expect("entry");
    assert_eq!(
        (held.stage.as_str(), held.entity_key.as_deref()),
        ("map", Some("q"))
    );
    let cd = rig.claim("g", "d", 10).await;
    assert_eq!(evs(&cd), ["3"], "q is held at d");
    let ce = rig.claim("g", "e", 10).await;
    assert_eq!(evs(&ce), ["2", "3"], "q is not held at e");
    rig.settle(cd.iter().chain(&ce).map(|c| (c, delivered())).collect())
        .await;
    rig.discard(held.id).await.expect("discard");
    let c = rig.claim("g", "d", 10).await;
    assert_eq!(evs(&c), ["2"]);
    rig.settle(vec![(&c[0], delivered())]).await;
    assert_eq!(rig.nums("g", "d"), [3, 0, 0, 2, 0, 1, 0]);
    assert_eq!(rig.nums("g", "e"), [3, 0, 0, 2, 0, 1, 0]);

    // a replay releases the hold and its rows go first
    rig.ingest(vec![
        event("4", vec![rejected("g", Some("s"), &["d", "e"])]),
        event("5", vec![both("5", "s")]),
    ])
    .await;
    assert!(rig.claim("g", "d", 10).await.is_empty());
    assert!(rig.claim("g", "e", 10).await.is_empty());
    let e = rig.dead().pop().expect("entry");
    rig.replay(Replay {
        outcome: Some(both("4", "s")),
        ..replay(e.id)
    })
    .await
    .expect("replay");
    for dest in ["d", "e"] {
        let c = rig.claim("g", dest, 10).await;
        assert_eq!(evs(&c), ["4"], "{dest}");
        rig.settle(vec![(&c[0], delivered())]).await;
        let c = rig.claim("g", dest, 10).await;
        assert_eq!(evs(&c), ["5"], "{dest}");
        rig.settle(vec![(&c[0], delivered())]).await;
    }
    assert_eq!(rig.nums("g", "d"), [5, 0, 0, 4, 0, 1, 0]);

    // replayed into a new rejection: the new entry holds the key
    rig.ingest(vec![
        event("8", vec![rejected("g", Some("u"), &["d"])]),
        event("9", vec![both("9", "u")]),
    ])
    .await;
    let old = rig.dead().pop().expect("entry");
    rig.replay(Replay {
        outcome: Some(rejected("g", Some("u"), &["d"])),
        ..replay(old.id)
    })
    .await
    .expect("replay");
    assert_eq!(rig.entry(old.id).status, "replayed");
    let new = rig.dead().pop().expect("the new entry");
    assert_eq!((new.event_id.as_str(), new.stage.as_str()), ("8", "map"));
    assert!(new.id > old.id);
    assert!(rig.claim("g", "d", 10).await.is_empty(), "u is held again");
    assert_eq!(rig.deliver_to("g", "e", 10).await, ["9"]);
    rig.discard(new.id).await.expect("discard");
    assert_eq!(rig.deliver_to("g", "d", 10).await, ["9"]);
    assert_eq!(rig.nums("g", "d"), [7, 0, 0, 5, 0, 2, 0]);

    // without a key there is nothing to hold
    rig.ingest(vec![
        event("6", vec![rejected("g", None, &["d"])]),
        event("7", vec![both("7", "t")]),
    ])
    .await;
    assert_eq!(evs(&rig.claim("g", "d", 10).await), ["7"]);
}

/// P1-1: a replayed row sorts before a later row of its key; while that row
/// is in flight the replay is refused (`InFlight`), so two rows of one key
/// are never out together. `force` puts the row at the end instead.
pub async fn p1_1_replay_refused_while_a_later_row_is_in_flight(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![one("1", Some("k")), one("2", Some("k"))])
        .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1"]);
    rig.settle(vec![(&c[0], dead(false))]).await;
    let c2 = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c2), ["2"]);
    let e = rig.dead().pop().expect("entry");
    let before = rig.nums("f", "d");
    assert_eq!(refused(rig.replay(replay(e.id)).await), Refusal::InFlight);
    assert_eq!(
        rig.nums("f", "d"),
        before,
        "a refused replay changes nothing"
    );
    assert_eq!(rig.entry(e.id).status, "dead");
    assert!(rig.claim("f", "d", 10).await.is_empty());

    rig.replay(Replay {
        force: true,
        ..replay(e.id)
    })
    .await
    .expect("forced replay");
    let p = rig.pending("f", "d");
    assert_eq!(pending_evs(&p), ["2", "1"], "a forced row goes to the end");
    assert!(p[1].order_seq > c2[0].row.order_seq);
    assert!(
        rig.claim("f", "d", 10).await.is_empty(),
        "never two rows of k out"
    );
    rig.settle(vec![(&c2[0], delivered())]).await;
    assert_eq!(rig.deliver("f", 10).await, ["1"]);

    // a later row that is pending but not leased does not refuse it
    rig.ingest(vec![one("3", Some("m")), one("4", Some("m"))])
        .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["3"]);
    rig.settle(vec![(&c[0], dead(false))]).await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["4"]);
    rig.settle(vec![(&c[0], Outcome::Release)]).await;
    let e = rig.dead().pop().expect("entry");
    rig.replay(replay(e.id)).await.expect("replay");
    assert_eq!(rig.deliver("f", 10).await, ["3"], "it kept its place");
    assert_eq!(rig.deliver("f", 10).await, ["4"]);
    assert_eq!(rig.nums("f", "d"), [4, 0, 0, 4, 0, 0, 0]);

    // a map-stage entry: its new rows would go before the leased one
    rig.ingest(vec![
        event("5", vec![rejected("f", Some("q"), &[])]),
        one("6", Some("q")),
    ])
    .await;
    let c6 = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c6), ["6"]);
    let e = rig.dead().pop().expect("entry");
    let fixed = || Replay {
        outcome: Some(routed("f", "5", &[("d", Some("q"))])),
        ..replay(e.id)
    };
    assert_eq!(refused(rig.replay(fixed()).await), Refusal::InFlight);
    assert_eq!(rig.nums("f", "d"), [6, 0, 1, 4, 0, 0, 1]);
    rig.settle(vec![(&c6[0], Outcome::Release)]).await;
    rig.replay(fixed()).await.expect("replay");
    assert_eq!(rig.deliver("f", 10).await, ["5"]);
    assert_eq!(rig.deliver("f", 10).await, ["6"]);
    assert_eq!(rig.nums("f", "d"), [6, 0, 0, 6, 0, 0, 0]);
}

/// P0-4: once a later row of the key was delivered, a replay would put
/// older data over newer: refused as `Superseded` (whichever flow wrote
/// it), unless forced, and then it goes to the end.
pub async fn p0_4_replay_refused_when_superseded(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("A", "d"), ("B", "d")]);
    rig.ingest(vec![of("A", "1", Some("k")), of("A", "2", Some("k"))])
        .await;
    let c = rig.claim("A", "d", 10).await;
    rig.settle(vec![(&c[0], dead(false))]).await;
    let c2 = rig.claim("A", "d", 10).await;
    assert_eq!(evs(&c2), ["2"]);
    rig.settle(vec![(&c2[0], delivered())]).await;
    let e = rig.dead().pop().expect("entry");
    let before = rig.nums("A", "d");
    let r = rig.replay(replay(e.id)).await;
    assert!(r.as_ref().is_err_and(|e| e.is_user_error()), "{r:?}");
    assert_eq!(
        refused(r),
        Refusal::Superseded {
            by_event: "2".into()
        }
    );
    assert_eq!(rig.nums("A", "d"), before);
    assert_eq!(rig.entry(e.id).status, "dead");
    rig.replay(Replay {
        force: true,
        ..replay(e.id)
    })
    .await
    .expect("forced replay");
    let p = rig.pending("A", "d");
    assert_eq!(pending_evs(&p), ["1"]);
    assert!(p[0].order_seq > c2[0].row.order_seq, "forced: at the end");
    assert_eq!(rig.deliver("A", 10).await, ["1"]);

    // another flow's later write to the same destination and key
    rig.ingest(vec![of("B", "3", Some("k")), of("B", "5", Some("z"))])
        .await;
    let c = rig.claim("B", "d", 10).await;
    assert_eq!(evs(&c), ["3", "5"]);
    rig.settle(vec![(&c[0], dead(false)), (&c[1], dead(false))])
        .await;
    rig.ingest(vec![of("A", "4", Some("k")), of("A", "6", Some("y"))])
        .await;
    assert_eq!(rig.deliver("A", 10).await, ["4", "6"]);
    let dead = rig.dead();
    let e3 = dead.iter().find(|e| e.event_id == "3").expect("entry 3");
    assert_eq!(
        refused(rig.replay(replay(e3.id)).await),
        Refusal::Superseded {
            by_event: "4".into()
        }
    );
    // key z saw no later write: replayed as usual
    let e5 = dead.iter().find(|e| e.event_id == "5").expect("entry 5");
    rig.replay(replay(e5.id)).await.expect("replay");
    assert_eq!(rig.deliver("B", 10).await, ["5"]);
    assert_eq!(rig.nums("A", "d"), [4, 0, 0, 4, 0, 0, 0]);
    assert_eq!(rig.nums("B", "d"), [2, 0, 0, 1, 1, 0, 0]);
}

/// P0-4: a map-stage entry keeps its key and its place; a later delivered
/// row of the key supersedes it the same way, also one of another flow at a
/// destination the replay writes. An entry without a key had no place: its
/// replay goes to the end.
pub async fn p0_4_map_stage_entry_superseded(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d"), ("B", "d")]);
    rig.ingest(vec![
        event("1", vec![rejected("f", Some("k"), &[])]),
        one("2", Some("k")),
    ])
    .await;
    let c2 = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c2), ["2"], "not held: continue");
    rig.settle(vec![(&c2[0], delivered())]).await;
    let e = rig.dead().pop().expect("entry");
    let fixed = || Replay {
        outcome: Some(routed("f", "1", &[("d", Some("k"))])),
        ..replay(e.id)
    };
    let before = rig.nums("f", "d");
    assert_eq!(
        refused(rig.replay(fixed()).await),
        Refusal::Superseded {
            by_event: "2".into()
        }
    );
    assert_eq!(rig.nums("f", "d"), before);
    assert_eq!(rig.entry(e.id).status, "dead");
    rig.replay(Replay {
        force: true,
        ..fixed()
    })
    .await
    .expect("forced");
    let p = rig.pending("f", "d");
    assert!(p[0].order_seq > c2[0].row.order_seq);
    assert_eq!(rig.deliver("f", 10).await, ["1"]);

    // an earlier delivered row does not supersede; the replay keeps its place
    rig.ingest(vec![
        one("3", Some("m")),
        event("4", vec![rejected("f", Some("m"), &[])]),
        one("5", Some("m")),
    ])
    .await;
    assert_eq!(rig.deliver("f", 10).await, ["3"]);
    let e = rig.dead().pop().expect("entry");
    rig.replay(Replay {
        outcome: Some(routed("f", "4", &[("d", Some("m"))])),
        ..replay(e.id)
    })
    .await
    .expect("replay");
    assert_eq!(pending_evs(&rig.pending("f", "d")), ["4", "5"]);
    assert_eq!(rig.deliver("f", 10).await, ["4"]);
    assert_eq!(rig.deliver("f", 10).await, ["5"]);
    assert_eq!(rig.nums("f", "d"), [5, 0, 0, 5, 0, 0, 0]);

    // another flow wrote the key at the destination the replay writes
    rig.ingest(vec![
        event("6", vec![rejected("f", Some("c"), &[])]),
        of("B", "7", Some("c")),
    ])
    .await;
    assert_eq!(rig.deliver("B", 10).await, ["7"]);
    let e = rig.dead().pop().expect("entry");
    assert_eq!(
        refused(
            rig.replay(Replay {
                outcome: Some(routed("f", "6", &[("d", Some("c"))])),
                ..replay(e.id)
            })
            .await
        ),
        Refusal::Superseded {
            by_event: "7".into()
        }
    );
    rig.discard(e.id).await.expect("discard");

    // rejected before its key was known: no place, so the end of the queue
    rig.ingest(vec![
        event("8", vec![rejected("f", None, &[])]),
        one("9", Some("n")),
    ])
    .await;
    let c9 = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c9), ["9"]);
    rig.settle(vec![(&c9[0], delivered())]).await;
    let e = rig.dead().pop().expect("entry");
    rig.replay(Replay {
        outcome: Some(routed("f", "8", &[("d", Some("n"))])),
        ..replay(e.id)
    })
    .await
    .expect("a keyless entry is superseded by nothing");
    let p = rig.pending("f", "d");
    assert_eq!(pending_evs(&p), ["8"]);
    assert!(p[0].order_seq > c9[0].row.order_seq, "at the end");
    assert_eq!(rig.deliver("f", 10).await, ["8"]);
    assert_eq!(rig.nums("f", "d"), [8, 0, 0, 7, 0, 1, 0]);
    assert_eq!(rig.nums("B", "d"), [1, 0, 0, 1, 0, 0, 0]);
}

/// A replayed dead entry goes before the later pending rows of its key, and
/// keeps its idempotency key, correlation id and acceptance time.
pub async fn replay_keeps_its_place_in_the_key_queue(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![
        one("1", Some("k")),
        one("2", Some("k")),
        one("3", Some("k")),
    ])
    .await;
    let c1 = rig.claim("f", "d", 10).await;
    rig.settle(vec![(&c1[0], dead(false))]).await;
    let e = rig.dead().pop().expect("entry");
    rig.replay(replay(e.id)).await.expect("replay");
    let p = rig.pending("f", "d");
    assert_eq!(pending_evs(&p), ["1", "2", "3"]);
    let r = &c1[0].row;
    assert_eq!(
        (
            p[0].order_seq,
            p[0].idempotency_key.as_str(),
            p[0].correlation_id.as_str(),
            p[0].created_at,
            p[0].attempts,
        ),
        (
            r.order_seq,
            r.idempotency_key.as_str(),
            r.correlation_id.as_str(),
            r.created_at,
            0
        )
    );
    assert_eq!(rig.deliver("f", 10).await, ["1"]);
    assert_eq!(rig.deliver("f", 10).await, ["2"]);
    assert_eq!(rig.deliver("f", 10).await, ["3"]);
}

/// Bad replay and discard requests are refused with a clear error and
/// change nothing.
pub async fn replay_and_discard_refuse_bad_requests(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![
        one("1", Some("k")),
        event("2", vec![rejected("f", Some("j"), &[])]),
    ])
    .await;
    let c = rig.claim("f", "d", 10).await;
    rig.settle(vec![(&c[0], dead(false))]).await;
    let dead = rig.dead();
    let dl = dead.iter().find(|e| e.stage == "deliver").expect("deliver");
    let map = dead.iter().find(|e| e.stage == "map").expect("map");
    let before = rig.nums("f", "d");

    not_found(rig.replay(replay(999_999)).await);
    not_found(rig.discard(999_999).await);
    invalid(
        rig.replay(Replay {
            outcome: Some(routed("f", "1", &[("d", Some("k"))])),
            ..replay(dl.id)
        })
        .await,
    );
    let msg = invalid(
        rig.replay(Replay {
            payload: Some("{not json".into()),
            ..replay(dl.id)
        })
        .await,
    );
    assert!(msg.contains("JSON"), "{msg}");
    let msg = invalid(rig.replay(replay(map.id)).await);
    assert!(msg.contains("mapping"), "{msg}");
    invalid(
        rig.replay(Replay {
            outcome: Some(routed("other", "2", &[("d", Some("j"))])),
            ..replay(map.id)
        })
        .await,
    );
    assert_eq!(rig.nums("f", "d"), before);
    assert_eq!(rig.dead().len(), 2);
    assert_eq!(rig.j.read().outbox_len().unwrap(), 0);

    rig.discard(dl.id).await.expect("discard");
    let msg = invalid(rig.discard(dl.id).await);
    assert!(msg.contains("already discarded"), "{msg}");
    invalid(rig.replay(replay(dl.id)).await);
    assert_eq!(rig.nums("f", "d"), [2, 0, 1, 0, 0, 1, 0]);
}

/// P1-13: one settle applies deliveries, retries, dead letters, releases
/// and follow-ups together, each counted.
pub async fn settle_applies_everything_in_one_call(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d"), ("saga", "d2")]);
    rig.ingest(vec![
        one("1", Some("a")),
        one("2", Some("b")),
        one("3", Some("c")),
        one("4", Some("e")),
    ])
    .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1", "2", "3", "4"]);
    let s = rig
        .settle_all(Settle {
            items: vec![
                Settlement {
                    id: c[0].row.id,
                    token: c[0].token,
                    attempt: None,
                    outcome: Outcome::Delivered(WriteOutcome {
                        external_id: Some("X-1".into()),
                        ..Default::default()
                    }),
                },
                Settlement {
                    id: c[1].row.id,
                    token: c[1].token,
                    attempt: None,
                    outcome: Outcome::Retry {
                        next_at: now_ms() - 1,
                        error: "429".into(),
                    },
                },
                Settlement {
                    id: c[2].row.id,
                    token: c[2].token,
                    attempt: None,
                    outcome: dead(false),
                },
                Settlement {
                    id: c[3].row.id,
                    token: c[3].token,
                    attempt: None,
                    outcome: Outcome::Release,
                },
            ],
            follow_ups: vec![FollowUp {
                flow: "saga".into(),
                source: "crm".into(),
                event_id: "1".into(),
                correlation_id: "c-1".into(),
                delivery: delivery("1-next", "d2", Some("a")),
            }],
        })
        .await;
    assert_eq!(
        s,
        Settled {
            delivered: 1,
            retried: 1,
            dead: 1,
            released: 1,
            stale: 0,
            follow_ups: 1
        }
    );
    assert_eq!(rig.nums("f", "d"), [4, 0, 0, 1, 1, 0, 2]);
    assert_eq!(rig.nums("saga", "d2"), [1, 0, 0, 0, 0, 0, 1]);
    let p = rig.pending("saga", "d2");
    assert_eq!(
        (
            p[0].event_id.as_str(),
            p[0].correlation_id.as_str(),
            p[0].source.as_str(),
            p[0].entity_key.as_deref(),
            p[0].idempotency_key.as_str()
        ),
        ("1", "c-1", "crm", Some("a"), "ik-1-next-d2")
    );
    let cw = rig.j.read().crosswalk(Some("d"), 10).unwrap();
    assert_eq!(cw.len(), 1);
    assert_eq!(
        (
            cw[0].source.as_str(),
            cw[0].source_key.as_str(),
            cw[0].external_id.as_str(),
            cw[0].flow.as_str(),
            cw[0].event_id.as_str()
        ),
        ("crm", "a", "X-1", "f", "1")
    );
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["2", "4"]);
    assert_eq!(
        (c[0].row.attempts, c[0].row.last_error.as_deref()),
        (1, Some("429"))
    );
    assert_eq!(c[1].row.attempts, 0, "a release spends no attempt");
    let c = rig.claim("saga", "d2", 10).await;
    assert_eq!(evs(&c), ["1"]);
    rig.settle(vec![(&c[0], delivered())]).await;
    assert_eq!(rig.nums("saga", "d2"), [1, 0, 0, 1, 0, 0, 0]);

    // a follow-up enters one lane of a flow that writes two: it counts on
    // that lane only
    let mut rig = rig;
    rig.lanes = vec![lane("g", "d"), lane("g", "d2")];
    rig.ingest(vec![event(
        "5",
        vec![routed("g", "5", &[("d", Some("p")), ("d2", Some("p"))])],
    )])
    .await;
    let c = rig.claim("g", "d", 10).await;
    let s = rig
        .settle_all(Settle {
            items: vec![Settlement {
                id: c[0].row.id,
                token: c[0].token,
                attempt: None,
                outcome: delivered(),
            }],
            follow_ups: vec![FollowUp {
                flow: "g".into(),
                source: "crm".into(),
                event_id: "5".into(),
                correlation_id: "c-5".into(),
                delivery: delivery("5-next", "d2", Some("p")),
            }],
        })
        .await;
    assert_eq!((s.delivered, s.follow_ups), (1, 1));
    assert_eq!(rig.nums("g", "d"), [1, 0, 0, 1, 0, 0, 0]);
    assert_eq!(rig.nums("g", "d2"), [2, 0, 0, 0, 0, 0, 2]);
    assert_eq!(pending_evs(&rig.pending("g", "d2")), ["5", "5"]);
}

/// P0-3: the id a destination gave a record is committed with the
/// delivered state, by the settlement that carries it, and only then.
pub async fn p0_3_external_id_committed_with_delivered(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![one("1", Some("k")), one("2", None)]).await;
    let c = rig.claim("f", "d", 10).await;
    let ext = |id: &str| {
        Outcome::Delivered(WriteOutcome {
            external_id: Some(id.into()),
            version: Some("v1".into()),
            fingerprint: None,
            canonical: None,
        })
    };
    // a stale settlement's id goes nowhere
    let s = rig
        .settle_all(Settle {
            items: vec![Settlement {
                id: c[0].row.id,
                token: c[0].token + 1_000_000,
                attempt: None,
                outcome: ext("NOPE"),
            }],
            follow_ups: Vec::new(),
        })
        .await;
    assert_eq!(s.stale, 1);
    assert!(rig.j.read().crosswalk(None, 10).unwrap().is_empty());
    rig.settle(vec![(&c[0], ext("X-1")), (&c[1], ext("X-2"))])
        .await;
    let mut cw = rig.j.read().crosswalk(Some("d"), 10).unwrap();
    cw.sort_by(|a, b| a.source_key.cmp(&b.source_key));
    assert_eq!(cw.len(), 2);
    assert_eq!(
        (
            cw[0].source_key.as_str(),
            cw[0].external_id.as_str(),
            cw[0].event_id.as_str()
        ),
        ("2", "X-2", "2"),
        "keyless: keyed by the event id"
    );
    assert_eq!(
        (
            cw[1].system.as_str(),
            cw[1].source.as_str(),
            cw[1].source_key.as_str(),
            cw[1].external_id.as_str(),
            cw[1].event_id.as_str()
        ),
        ("d", "crm", "k", "X-1", "1")
    );
    let first = cw[1].clone();

    tokio::time::sleep(Duration::from_millis(5)).await;
    rig.ingest(vec![one("3", Some("k"))]).await;
    let c = rig.claim("f", "d", 10).await;
    rig.settle(vec![(&c[0], ext("X-3"))]).await;
    let cw = rig.j.read().crosswalk(Some("d"), 10).unwrap();
    assert_eq!(cw.len(), 2, "upserted, not added");
    assert_eq!(
        (
            cw[0].source_key.as_str(),
            cw[0].external_id.as_str(),
            cw[0].event_id.as_str()
        ),
        ("k", "X-3", "3"),
        "newest first"
    );
    assert_eq!(cw[0].created_at, first.created_at);
    assert!(cw[0].updated_at > first.updated_at);
    assert_eq!(rig.j.read().crosswalk(None, 1).unwrap().len(), 1);
    assert!(
        rig.j
            .read()
            .crosswalk(Some("other"), 10)
            .unwrap()
            .is_empty()
    );

    // a delivery without an id leaves the link as it is
    rig.ingest(vec![one("4", Some("k"))]).await;
    assert_eq!(rig.deliver("f", 10).await, ["4"]);
    let cw = rig.j.read().crosswalk(Some("d"), 10).unwrap();
    assert_eq!(
        (cw[0].source_key.as_str(), cw[0].external_id.as_str()),
        ("k", "X-3")
    );
    assert_eq!(rig.nums("f", "d"), [4, 0, 0, 4, 0, 0, 0]);
}

/// P1-16: DLQ lists come in pages (1,000 by default) walked with
/// `after_id`, and filter by status, flow, destination, error and time.
pub async fn dlq_list_pages_and_filters(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d"), ("g", "d")]);
    let start = now_ms();
    let events: Vec<NewEvent> = (1..=2500)
        .map(|i| {
            let flow = if i % 2 == 0 { "f" } else { "g" };
            let error = if i % 10 == 0 {
                format!("boom {i}")
            } else {
                format!("bad {i}")
            };
            event(
                &i.to_string(),
                vec![FlowOutcome::rejected(flow, Stage::Map, error)],
            )
        })
        .collect();
    let a = rig.ingest(events).await;
    assert_eq!(a.changed, 2500);
    let r = rig.j.read();
    let list = |f: DlqFilter| r.dlq_list(&f).expect("dlq_list");

    let page = list(DlqFilter::default());
    assert_eq!(page.len(), DLQ_PAGE);
    assert!(page.windows(2).all(|w| w[0].id < w[1].id));
    let mut seen = std::collections::BTreeSet::new();
    let mut after = None;
    loop {
        let page = list(DlqFilter {
            after_id: after,
            ..Default::default()
        });
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= DLQ_PAGE);
        for e in &page {
            assert!(after.is_none_or(|a| e.id > a));
            assert!(seen.insert(e.event_id.clone()), "{} twice", e.event_id);
        }
        after = page.last().map(|e| e.id);
    }
    assert_eq!(seen.len(), 2500);
    let big = Some(10_000);
    assert_eq!(
        list(DlqFilter {
            limit: Some(10),
            ..Default::default()
        })
        .len(),
        10
    );
    let f = list(DlqFilter {
        flow: Some("f".into()),
        limit: big,
        ..Default::default()
    });
    assert_eq!(f.len(), 1250);
    assert!(f.iter().all(|e| e.flow == "f"));
    let boom = list(DlqFilter {
        error_contains: Some("boom".into()),
        limit: big,
        ..Default::default()
    });
    assert_eq!(boom.len(), 250);
    assert_eq!(
        list(DlqFilter {
            flow: Some("g".into()),
            error_contains: Some("boom".into()),
            limit: big,
            ..Default::default()
        })
        .len(),
        0
    );
    assert_eq!(
        list(DlqFilter {
            destination: Some("d".into()),
            limit: big,
            ..Default::default()
        })
        .len(),
        0,
        "map-stage entries have no destination"
    );
    assert_eq!(
        list(DlqFilter {
            since: Some(start),
            limit: big,
            ..Default::default()
        })
        .len(),
        2500
    );
    assert_eq!(
        list(DlqFilter {
            since: Some(now_ms() + 60_000),
            ..Default::default()
        })
        .len(),
        0
    );

    for e in &page[..3] {
        rig.discard(e.id).await.expect("discard");
    }
    let discarded = list(DlqFilter {
        status: Some("discarded".into()),
        ..Default::default()
    });
    assert_eq!(
        discarded.iter().map(|e| e.id).collect::<Vec<_>>(),
        page[..3].iter().map(|e| e.id).collect::<Vec<_>>()
    );
    assert_eq!(list(DlqFilter::default())[0].id, page[3].id);
    assert_eq!(
        list(DlqFilter {
            status: Some("all".into()),
            limit: big,
            ..Default::default()
        })
        .len(),
        2500
    );
    // events 1 and 3 were of g, 2 of f
    let mut depths = r.dlq_depths().unwrap();
    depths.sort();
    assert_eq!(
        depths,
        [("f".into(), "".into(), 1249), ("g".into(), "".into(), 1248)]
    );
    assert_eq!(rig.nums("f", "d"), [1250, 0, 1249, 0, 0, 1, 0]);
    assert_eq!(rig.nums("g", "d"), [1250, 0, 1248, 0, 0, 2, 0]);
}

/// A lane with nothing yet shows zeros, balanced; lanes with counts or
/// rows that were not asked for are listed too.
pub async fn counts_list_empty_lanes_balanced(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("x", "y")]);
    let c = rig.check();
    assert_eq!(
        c,
        [FlowCounts {
            flow: "x".into(),
            destination: "y".into(),
            received: 0,
            filtered: 0,
            rejected: 0,
            delivered: 0,
            dead_lettered: 0,
            discarded: 0,
            pending: 0,
            oldest_pending_ms: None,
            last_received_at: None,
            balanced: true,
        }]
    );
    let mut old = one("1", Some("k"));
    old.received_at = now_ms() - 5_000;
    rig.ingest(vec![old, one("2", Some("j"))]).await;
    let c = rig.check();
    let fd = c
        .iter()
        .find(|c| c.flow == "f" && c.destination == "d")
        .expect("a lane with pending rows is listed");
    assert_eq!(nums(fd), [2, 0, 0, 0, 0, 0, 2]);
    let age = fd.oldest_pending_ms.expect("an oldest pending row");
    assert!((5_000..60_000).contains(&age), "{age}");
    assert_eq!(rig.deliver("f", 10).await, ["1", "2"]);
    let c = rig.check();
    let fd = c
        .iter()
        .find(|c| c.flow == "f" && c.destination == "d")
        .expect("a lane with counts is listed");
    assert_eq!(nums(fd), [2, 0, 0, 2, 0, 0, 0]);
    assert_eq!(fd.oldest_pending_ms, None);
    assert_eq!(c.len(), 2);
}

/// Drift observations are kept (outside the accounting).
pub async fn drift_is_recorded(h: &mut impl Harness) {
    let mut rig = Rig::new(h, &[("f", "d")]);
    let ev = |count| NewDrift {
        kind: "type_changed".into(),
        path: "/tags".into(),
        detail: "string -> array".into(),
        example: "[\"a\"]".into(),
        count,
    };
    let a = rig
        .j
        .record_drift(DriftBatch {
            source: "crm".into(),
            shape: Some("{\"v\":1}".into()),
            events: vec![ev(1)],
        })
        .await
        .expect("drift");
    assert_eq!(a.changed, 2);
    let a = rig
        .j
        .record_drift(DriftBatch {
            source: "crm".into(),
            shape: None,
            events: vec![ev(4)],
        })
        .await
        .expect("drift");
    assert_eq!(a.changed, 1);
    assert_eq!(rig.nums("f", "d"), [0; 7]);
    // accepted once: a second accept and an unknown id change nothing, the
    // count still grows, and the acceptance survives a restart
    let id = rig.j.read().drift_events(Some("crm")).expect("read")[0].id;
    assert_eq!(
        rig.j.read().drift_events(None).expect("read")[0].accepted_at,
        None
    );
    let a = rig
        .j
        .accept_drift(vec![id, id + 1000])
        .await
        .expect("accept");
    assert_eq!(a.changed, 1);
    let a = rig.j.accept_drift(vec![id]).await.expect("accept");
    assert_eq!(a.changed, 0);
    rig.j
        .record_drift(DriftBatch {
            source: "crm".into(),
            shape: None,
            events: vec![ev(2)],
        })
        .await
        .expect("drift");
    rig.restart(h);
    let e = &rig.j.read().drift_events(Some("crm")).expect("read")[0];
    assert!(e.accepted_at.is_some());
    assert_eq!(e.count, 7);
    assert_eq!(rig.nums("f", "d"), [0; 7]);
}

/// P1-2 / P1-8: rows behind a held key or a retry in backoff do not starve
/// other keys, however many there are, and a release is visible to the
/// very next claim.
pub async fn p1_2_p1_8_blocked_keys_do_not_starve_the_lane(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    let mut events = Vec::new();
    for i in 0..2000 {
        events.push(one(&format!("h{i}"), Some("held")));
        events.push(one(&format!("b{i}"), Some("backoff")));
    }
    rig.ingest(events).await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["h0", "b0"]);
    rig.settle(vec![(&c[0], dead(true)), (&c[1], retry_in(60_000))])
        .await;
    rig.ingest(
        (0..5)
            .map(|i| one(&format!("o{i}"), Some(&format!("other{i}"))))
            .collect(),
    )
    .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["o0", "o1", "o2", "o3", "o4"]);
    rig.settle(c.iter().map(|c| (c, delivered())).collect())
        .await;
    assert!(rig.claim("f", "d", 10).await.is_empty());
    let e = rig.dead().pop().expect("entry");
    rig.discard(e.id).await.expect("discard");
    assert_eq!(rig.deliver("f", 10).await, ["h1"], "released at once");
    assert_eq!(rig.nums("f", "d"), [4005, 0, 0, 6, 0, 1, 3998]);
}

/// P1-4: `counts` reads one snapshot: while another thread ingests,
/// claims and settles, every read balances.
pub async fn p1_4_counts_balance_under_concurrent_writes(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    let j = rig.j.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (j, stop) = (j.clone(), stop.clone());
        std::thread::spawn(move || {
            let lanes = [lane("f", "d")];
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads < 10 {
                for c in j.read().counts(&lanes).expect("counts") {
                    assert!(c.balanced, "a read saw two states: {c:?}");
                }
                reads += 1;
            }
            reads
        })
    };
    for round in 0..100 {
        let events = (0..10)
            .map(|i| one(&format!("{round}-{i}"), Some(&format!("k{i}"))))
            .collect();
        j.ingest(batch(events)).await.expect("ingest");
        let c = j
            .claim(ClaimRequest {
                lane: lane("f", "d"),
                max: 10,
                per_key: 1,
                lease: LEASE,
            })
            .await
            .expect("claim");
        let items = c
            .iter()
            .enumerate()
            .map(|(i, c)| Settlement {
                id: c.row.id,
                token: c.token,
                attempt: None,
                outcome: if i % 5 == 0 { dead(false) } else { delivered() },
            })
            .collect();
        j.settle(Settle {
            items,
            follow_ups: Vec::new(),
        })
        .await
        .expect("settle");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("the reader thread");
    assert!(reads >= 10, "{reads}");
    let n = rig.nums("f", "d");
    assert_eq!((n[0], n[3] + n[4] + n[6]), (1000, 1000));
}

/// P1-9: what an ingest says it counted per flow (for the metrics) is
/// exactly its counter changes, also for a batch holding a duplicate; and
/// the flow's `last_received_at` (freshness) is set by a committed ingest
/// that received something, never by one of duplicates only.
pub async fn p1_9_applied_counts_and_last_received(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d"), ("g", "d")]);
    let before = now_ms();
    let filtered = |id: &str| {
        event(
            id,
            vec![
                routed("f", id, &[("d", None)]),
                FlowOutcome::Filtered { flow: "g".into() },
            ],
        )
    };
    let a = rig.ingest(vec![filtered("1"), filtered("2")]).await;
    assert_eq!((a.changed, a.duplicates), (2, 0));
    // a batch of one duplicate and one new event: the new one is counted
    let a = rig.ingest(vec![filtered("2"), filtered("3")]).await;
    assert_eq!((a.changed, a.duplicates), (1, 1));
    let mut flows = a.flows.clone();
    flows.sort_by(|x, y| x.flow.cmp(&y.flow));
    assert_eq!(
        flows,
        [
            FlowCounted {
                flow: "f".into(),
                received: 1,
                filtered: 0,
                rejected: 0
            },
            FlowCounted {
                flow: "g".into(),
                received: 1,
                filtered: 1,
                rejected: 0
            }
        ],
        "the new event of a batch with a duplicate is counted for the metrics"
    );
    let c = rig.check();
    let f = c.iter().find(|c| c.flow == "f").expect("lane f");
    assert_eq!(f.received, 3);
    let seen = f.last_received_at.expect("f received records");
    assert!(seen >= before && seen <= now_ms(), "{seen} vs {before}");
    let g = c.iter().find(|c| c.flow == "g").expect("lane g");
    assert_eq!(
        g.last_received_at,
        Some(seen),
        "filtered records are received too"
    );
    // duplicates only: nothing received, the time stays
    std::thread::sleep(Duration::from_millis(5));
    let a = rig.ingest(vec![filtered("3")]).await;
    assert_eq!((a.changed, a.duplicates, a.flows.len()), (0, 1, 0));
    let c = rig.check();
    let f = c.iter().find(|c| c.flow == "f").expect("lane f");
    assert_eq!(f.last_received_at, Some(seen));
}

/// The record inspector's search (`lookup`: by event id, correlation id,
/// entity key or a destination's id) and the list of source positions
/// (`checkpoints`) read what the store keeps, on every engine.
pub async fn lookup_and_checkpoints_list_what_the_store_keeps(h: &mut impl Harness) {
    let rig = Rig::new(h, &[("f", "d")]);
    let start = now_ms();
    let mut b = batch(vec![
        one("1", Some("k")),
        one("2", Some("k2")),
        one("3", Some("k")),
    ]);
    b.checkpoint = Some(("pos".into(), "{\"lsn\":1}".into()));
    rig.ingest_batch(b).await;
    let read = rig.j.read();
    let events = |l: &RecordLookup| -> Vec<String> {
        l.pending.iter().map(|r| r.event_id.clone()).collect()
    };
    let l = read.lookup("1", 10).unwrap();
    assert_eq!(events(&l), ["1"]);
    assert!(l.dead.is_empty() && l.written.is_empty());
    assert_eq!(
        events(&read.lookup("c-2", 10).unwrap()),
        ["2"],
        "by correlation id"
    );
    assert_eq!(
        events(&read.lookup("k", 10).unwrap()),
        ["1", "3"],
        "by key, in order"
    );
    assert_eq!(events(&read.lookup("k", 1).unwrap()), ["1"], "limited");

    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1", "2"]);
    let with_id = Outcome::Delivered(WriteOutcome {
        external_id: Some("X-1".into()),
        version: None,
        fingerprint: None,
        canonical: None,
    });
    rig.settle(vec![(&c[0], with_id), (&c[1], dead(false))])
        .await;
    let read = rig.j.read();
    let l = read.lookup("2", 10).unwrap();
    assert!(l.pending.is_empty());
    assert_eq!(
        l.dead
            .iter()
            .map(|e| (e.event_id.as_str(), e.status.as_str()))
            .collect::<Vec<_>>(),
        [("2", "dead")]
    );
    let l = read.lookup("k", 10).unwrap();
    assert_eq!(
        events(&l),
        ["3"],
        "the delivered row is gone, the next waits"
    );
    assert_eq!(
        l.written
            .iter()
            .map(|w| (
                w.source_key.as_str(),
                w.external_id.as_str(),
                w.event_id.as_str()
            ))
            .collect::<Vec<_>>(),
        [("k", "X-1", "1")]
    );
    assert_eq!(
        read.lookup("X-1", 10).unwrap().written.len(),
        1,
        "by the destination's id"
    );
    let none = read.lookup("nothing", 10).unwrap();
    assert!(none.pending.is_empty() && none.dead.is_empty() && none.written.is_empty());

    let cps = read.checkpoints().unwrap();
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert_eq!(
        (
            cps[0].source.as_str(),
            cps[0].key.as_str(),
            cps[0].value.as_str()
        ),
        ("crm", "pos", "{\"lsn\":1}")
    );
    assert!(cps[0].updated_at >= start, "{cps:?}");
    let mut b = batch(vec![one("4", None)]);
    b.checkpoint = Some(("pos".into(), "{\"lsn\":2}".into()));
    rig.ingest_batch(b).await;
    let mut b = batch(vec![one("5", None)]);
    b.source = "erp".into();
    b.checkpoint = Some(("file".into(), "7".into()));
    rig.ingest_batch(b).await;
    let cps: Vec<(String, String, String)> = rig
        .j
        .read()
        .checkpoints()
        .unwrap()
        .into_iter()
        .map(|c| (c.source, c.key, c.value))
        .collect();
    assert_eq!(
        cps,
        [
            ("crm".into(), "pos".into(), "{\"lsn\":2}".into()),
            ("erp".into(), "file".into(), "7".into())
        ]
    );
}

/// P1-20: a DLQ entry that was replayed or discarded is not kept with its
/// payload (PII) forever. Resolving it drops the payload (its SHA-256 is
/// kept; a replayed row's copy is in the outbox); the prune deletes it once
/// resolved before `dlq_before`, and drift events last seen before
/// `drift_before`, accepted or not. A dead entry is never pruned, the
/// counters do not move and the ledger stays balanced. The cutoffs are the
/// test's "now": exact, no waiting.
pub async fn p1_20_resolved_dlq_entries_and_old_drift_are_pruned(h: &mut impl Harness) {
    let mut rig = Rig::new(h, &[("f", "d")]);
    rig.ingest(vec![
        one("1", Some("k1")),
        one("2", Some("k2")),
        one("3", Some("k3")),
        event("4", vec![rejected("f", Some("k4"), &[])]),
    ])
    .await;
    let c = rig.claim("f", "d", 10).await;
    assert_eq!(evs(&c), ["1", "2", "3"]);
    rig.settle(c.iter().map(|c| (c, dead(false))).collect())
        .await;
    let dead = rig.dead();
    let id = |ev: &str| {
        dead.iter()
            .find(|e| e.event_id == ev)
            .unwrap_or_else(|| panic!("no entry of {ev}: {dead:?}"))
            .id
    };
    for e in &dead {
        assert_eq!((e.resolved_at, e.payload_sha256.as_deref()), (None, None));
        assert_eq!(e.payload, format!("{{\"id\":\"{}\"}}", e.event_id));
    }
    let before = now_ms();
    rig.replay(replay(id("1"))).await.expect("replay");
    rig.discard(id("2")).await.expect("discard");
    rig.discard(id("4")).await.expect("discard");

    // resolved: the payload is gone, its hash and when are kept
    let mut resolved_at = Vec::new();
    for ev in ["1", "2", "4"] {
        let e = rig.entry(id(ev));
        let sha = payload_sha256(&format!("{{\"id\":\"{ev}\"}}"));
        assert_eq!(e.payload, "", "{e:?}");
        assert_eq!(e.payload_sha256.as_deref(), Some(sha.as_str()));
        assert_eq!(
            e.payload_dropped(),
            Some(format!("payload dropped after resolve (sha256 {sha})"))
        );
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["payload"], serde_json::Value::Null, "{json}");
        assert_eq!(
            json["payload_dropped"].as_str(),
            e.payload_dropped().as_deref()
        );
        let at = e.resolved_at.expect("resolved_at");
        assert!(at >= before, "{at} < {before}");
        resolved_at.push(at);
    }
    assert_eq!(pending_evs(&rig.pending("f", "d")), ["1"]);
    assert_eq!(rig.pending("f", "d")[0].payload, "{\"id\":\"1\"}");
    let kept = rig.entry(id("3"));
    assert_eq!(
        (kept.status.as_str(), kept.payload.as_str()),
        ("dead", "{\"id\":\"3\"}")
    );
    assert_eq!(
        serde_json::to_value(&kept).expect("json")["payload"],
        "{\"id\":\"3\"}"
    );

    let ev = |path: &str| NewDrift {
        kind: "new_field".into(),
        path: path.into(),
        detail: "string".into(),
        example: "\"x\"".into(),
        count: 1,
    };
    rig.j
        .record_drift(DriftBatch {
            source: "crm".into(),
            shape: None,
            events: vec![ev("/a"), ev("/b")],
        })
        .await
        .expect("drift");
    let drift = rig.j.read().drift_events(None).expect("drift");
    assert_eq!(drift.len(), 2);
    rig.j.accept_drift(vec![drift[0].id]).await.expect("accept");
    let seen = drift.iter().map(|e| e.last_seen).max().expect("seen");

    let counts = rig.nums("f", "d");
    let depths = rig.j.read().dlq_depths().expect("depths");
    let dlq_min = resolved_at.iter().copied().min().expect("min");
    let dlq_max = resolved_at.iter().copied().max().expect("max");
    // cutoffs at the resolves and the last sighting: nothing is older
    let at = |dlq_before, drift_before| Prune {
        dedupe_before: i64::MIN,
        dlq_before,
        drift_before,
        attempts_before: i64::MIN,
    };
    let p = rig.j.prune(at(dlq_min, seen - 1)).await.expect("prune");
    assert_eq!(p, Pruned::default());
    assert_eq!(rig.j.read().drift_events(None).expect("drift").len(), 2);
    // past them: the resolved entries and both drift events go, the dead
    // entry stays, the counts do not move
    let p = rig.j.prune(at(dlq_max + 1, seen + 1)).await.expect("prune");
    assert_eq!(
        p,
        Pruned {
            dedupe: 0,
            dlq: 3,
            drift: 2,
            attempts: 0,
        }
    );
    assert_eq!(rig.nums("f", "d"), counts);
    assert_eq!(rig.j.read().dlq_depths().expect("depths"), depths);
    for ev in ["1", "2", "4"] {
        let gone = rig.j.read().dlq_get(id(ev)).expect("dlq_get");
        assert!(gone.is_none(), "resolved entry kept: {gone:?}");
    }
    let all = rig
        .j
        .read()
        .dlq_list(&DlqFilter {
            status: Some("all".into()),
            ..Default::default()
        })
        .expect("list");
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [id("3")]);
    assert_eq!(rig.entry(id("3")).payload, "{\"id\":\"3\"}");
    assert!(rig.j.read().drift_events(None).expect("drift").is_empty());

    rig.restart(h);
    assert_eq!(rig.nums("f", "d"), counts);
    let p = rig.j.prune(at(i64::MAX, i64::MAX)).await.expect("prune");
    assert_eq!(p, Pruned::default(), "a dead entry is never pruned");
    assert_eq!(rig.dead().len(), 1);
    // the replayed row is delivered as before; the ledger stays balanced
    assert_eq!(rig.deliver("f", 10).await, ["1"]);
    let mut after = counts;
    after[3] += 1;
    after[6] -= 1;
    assert_eq!(rig.nums("f", "d"), after);
}

fn topic_entry(id: &str, key: Option<&str>) -> TopicEntry {
    TopicEntry {
        id: id.into(),
        entity_key: key.map(Into::into),
        payload: format!("{{\"id\":\"{id}\"}}"),
        correlation_id: format!("corr-{id}"),
        causation_id: format!("ev-{id}"),
        flow: "publisher".into(),
        event_time: 1_000,
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        tracestate: None,
    }
}

/// Topics inside the hub: a publication is appended once per id (a lane
/// that publishes again after a crash adds nothing), in order, apart per
/// topic; reads page after a sequence; the head is the newest; a restart
/// keeps everything; the prune deletes only what is older than its cutoff.
pub async fn topics_keep_each_publication_once_in_order(h: &mut impl Harness) {
    let mut j = h.journal();
    assert_eq!(j.read().topic_head("customers").expect("head"), 0);
    assert!(
        j.read()
            .topic_read("customers", 0, 10)
            .expect("read")
            .is_empty()
    );
    let p = j
        .publish(
            "customers".into(),
            vec![topic_entry("a", Some("1")), topic_entry("b", None)],
        )
        .await
        .expect("publish");
    assert_eq!((p.appended, p.duplicates), (2, 0));
    // another topic: its own messages
    let p = j
        .publish("orders".into(), vec![topic_entry("a", Some("1"))])
        .await
        .expect("publish orders");
    assert_eq!((p.appended, p.duplicates), (1, 0));
    // the same ids again (a retried write) with one new
    let p = j
        .publish(
            "customers".into(),
            vec![topic_entry("b", None), topic_entry("c", Some("1"))],
        )
        .await
        .expect("publish again");
    assert_eq!((p.appended, p.duplicates), (1, 1));
    crate::restart(h, &mut j);
    let all = j.read().topic_read("customers", 0, 10).expect("read");
    let ids: Vec<&str> = all.iter().map(|m| m.entry.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "{all:?}");
    assert_eq!(all[0].entry, topic_entry("a", Some("1")));
    assert_eq!(j.read().topic_head("customers").expect("head"), all[2].seq);
    let orders = j.read().topic_read("orders", 0, 10).expect("orders");
    assert_eq!(orders.len(), 1);
    assert!(orders[0].seq > all[1].seq && orders[0].seq < all[2].seq);
    // what a subscriber at a position has still to read
    assert_eq!(j.read().topic_behind("customers", 0).expect("behind"), 3);
    assert_eq!(
        j.read()
            .topic_behind("customers", all[0].seq)
            .expect("behind"),
        2
    );
    assert_eq!(
        j.read()
            .topic_behind("customers", all[2].seq)
            .expect("behind"),
        0
    );
    // paging: after a sequence, at most `limit`
    let page = j
        .read()
        .topic_read("customers", all[0].seq, 1)
        .expect("page");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].entry.id, "b");
    assert!(
        j.read()
            .topic_read("customers", all[2].seq, 10)
            .expect("after the head")
            .is_empty()
    );
    // prune: nothing is older than a cutoff before the publications
    let first = all[0].published_at;
    assert_eq!(
        j.prune_topic("customers".into(), first)
            .await
            .expect("prune"),
        0
    );
    // everything is older than a cutoff after them, in this topic only
    let n = j
        .prune_topic("customers".into(), all[2].published_at + 1)
        .await
        .expect("prune all");
    assert_eq!(n, 3);
    assert!(
        j.read()
            .topic_read("customers", 0, 10)
            .expect("read")
            .is_empty()
    );
    assert_eq!(
        j.read().topic_read("orders", 0, 10).expect("orders").len(),
        1
    );
}
