//! Delivery lanes in process, over the in-memory journal, with a scripted
//! sink: each test asserts exactly what the destination received (in order)
//! and what the journal counts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use weft_core::config::{BreakerPolicy, OnDeadLetter};
use weft_runtime::guard::{Guard, State};
use weft_runtime::testing::{RunningLane, ScriptedSink, Step, enqueue, open_guard, policy};
use weft_store::{DlqFilter, FlowCounts, Journal, LaneId, MemoryJournal, Replay, StoreError};

const WITHIN: Duration = Duration::from_secs(10);

fn counts(j: &MemoryJournal, flow: &str, dest: &str) -> FlowCounts {
    let lane = LaneId::new(flow, dest);
    let all = j
        .read()
        .counts(std::slice::from_ref(&lane))
        .expect("counts");
    all.into_iter()
        .find(|c| c.flow == flow && c.destination == dest)
        .expect("the lane's counts")
}

fn rows(keys: &[&'static str]) -> Vec<(Option<&'static str>, serde_json::Value)> {
    keys.iter()
        .enumerate()
        .map(|(n, k)| (Some(*k), json!({"key": k, "n": n})))
        .collect()
}

fn breaker(consecutive: u32, cooldown_ms: u64) -> Arc<Guard> {
    Arc::new(Guard::new(
        "d",
        Some(&BreakerPolicy {
            consecutive_failures: consecutive,
            failure_rate: 1.0,
            min_requests: 1000,
            window: Duration::from_secs(60),
            cooldown: Duration::from_millis(cooldown_ms),
            half_open_probes: 1,
        }),
        None,
    ))
}

/// Start a lane of `f` to `d` over `j`.
fn lane(
    j: &Arc<MemoryJournal>,
    sink: &Arc<ScriptedSink>,
    guard: Arc<Guard>,
    p: weft_core::config::DeliveryPolicy,
) -> RunningLane {
    lane_of("f", j, sink, guard, p)
}

fn lane_of(
    flow: &str,
    j: &Arc<MemoryJournal>,
    sink: &Arc<ScriptedSink>,
    guard: Arc<Guard>,
    p: weft_core::config::DeliveryPolicy,
) -> RunningLane {
    let journal: Arc<dyn Journal> = j.clone();
    RunningLane::start(flow, "d", p, sink.clone(), guard, journal)
}

/// P1-7: a sink that panics fails its batch retryably; its keys are not
/// wedged and everything is delivered in the end, once each.
#[tokio::test]
async fn a_panicking_sink_is_retried_and_its_keys_are_not_wedged() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.then([Step::Panic]);
    enqueue(&*j, "f", "d", "e", &rows(&["a", "b", "c", "d", "e"]))
        .await
        .expect("enqueue");
    let l = lane(&j, &sink, open_guard("d"), policy(5, 1, 5));
    sink.wait_for_writes(5, WITHIN).await.expect("all written");
    l.stop(WITHIN).await.expect("stops");
    let calls = sink.calls();
    assert_eq!(calls[0], [1, 2, 3, 4, 5], "the panicked batch");
    // each row comes due after its own (jittered) backoff: maybe not together
    let mut again: Vec<i64> = calls[1..].concat();
    again.sort();
    assert_eq!(again, [1, 2, 3, 4, 5], "then each row once more: {calls:?}");
    let acc = sink.accepted();
    assert_eq!(acc.len(), 5);
    assert!(acc.iter().all(|a| a.attempt == 2), "second attempt each");
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.dead_lettered, c.pending), (5, 0, 0));
    assert!(c.balanced, "{c:?}");
}

/// P1-7: a write that hangs is given up after `max_write_time` and retried,
/// while the other keys keep flowing.
#[tokio::test]
async fn a_hanging_write_is_retried_after_max_write_time_and_other_keys_flow() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new().max_write_time(Duration::from_millis(1000)));
    sink.then([Step::Hang]);
    enqueue(&*j, "f", "d", "e", &rows(&["stuck", "b", "c", "d"]))
        .await
        .expect("enqueue");
    let t = Instant::now();
    let l = lane(&j, &sink, open_guard("d"), policy(1, 2, 5));
    sink.wait_for_writes(3, WITHIN).await.expect("others flow");
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "the other keys did not wait for the hanging write: {:?}",
        t.elapsed()
    );
    sink.wait_for_writes(4, WITHIN).await.expect("retried");
    assert!(t.elapsed() >= Duration::from_millis(1000));
    l.stop(WITHIN).await.expect("stops");
    let acc = sink.accepted();
    let keys: Vec<_> = acc.iter().map(|a| a.entity_key.as_deref()).collect();
    assert_eq!(keys[3], Some("stuck"), "{keys:?}");
    assert_eq!(acc[3].attempt, 2);
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.pending), (4, 0));
    assert!(c.balanced, "{c:?}");
}

/// P1-7: a half-open probe whose write hangs does not keep the probe
/// reserved: it fails after `max_write_time`, the breaker reopens, the next
/// probe goes and closes it.
#[tokio::test]
async fn a_hanging_probe_does_not_keep_half_open_reserved() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new().max_write_time(Duration::from_millis(200)));
    sink.then([Step::Retryable("503".into()), Step::Hang]);
    enqueue(&*j, "f", "d", "e", &rows(&["a", "b"]))
        .await
        .expect("enqueue");
    let guard = breaker(1, 50);
    let l = lane(&j, &sink, guard.clone(), policy(1, 1, 10));
    sink.wait_for_writes(2, WITHIN)
        .await
        .expect("delivered in the end");
    l.stop(WITHIN).await.expect("stops");
    assert_eq!(guard.state(), State::Closed);
    let calls = sink.calls();
    assert_eq!(
        calls.len(),
        4,
        "fail, hanging probe, probe, next: {calls:?}"
    );
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.pending), (2, 0));
}

/// A claim that fails in half-open state gives the reserved probe back: the
/// lane does not wait for a probe that was never sent (it did before: the
/// probe stayed reserved and the destination was never written again).
#[tokio::test]
async fn a_claim_failure_while_half_open_gives_the_probe_back() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.then([Step::Retryable("503".into())]);
    enqueue(&*j, "f", "d", "e", &rows(&["a", "b"]))
        .await
        .expect("enqueue");
    let guard = breaker(1, 600);
    let l = lane(&j, &sink, guard.clone(), policy(1, 1, 10));
    sink.wait_for_calls(1, WITHIN).await.expect("first call");
    // the failed write's settle opens the breaker
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !matches!(guard.state(), State::Open { .. }) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(matches!(guard.state(), State::Open { .. }));
    // the breaker is open: the lane touches the journal again only for the
    // probe's claim, which fails
    j.fail_next(1, || StoreError::Invalid("injected claim failure".into()))
        .expect("inject");
    sink.wait_for_writes(2, WITHIN)
        .await
        .expect("probe given back");
    l.stop(WITHIN).await.expect("stops");
    assert_eq!(guard.state(), State::Closed);
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.pending), (2, 0));
}

/// P1-14: a failed write counts once for the breaker, however many rows it
/// carried.
#[tokio::test]
async fn a_failed_batch_counts_once_for_the_breaker() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.then([Step::Retryable("503".into())]);
    let keys: Vec<&'static str> = vec!["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    enqueue(&*j, "f", "d", "e", &rows(&keys))
        .await
        .expect("enqueue");
    let guard = breaker(3, 60_000);
    let l = lane(&j, &sink, guard.clone(), policy(10, 1, 5));
    sink.wait_for_writes(10, WITHIN).await.expect("retried");
    l.stop(WITHIN).await.expect("stops");
    assert_eq!(
        guard.state(),
        State::Closed,
        "1 failed write of 10 rows < 3"
    );
    assert_eq!(sink.calls()[0].len(), 10);
    assert_eq!(sink.accepted().len(), 10, "each row once");
}

/// Too few results: the rows without one are retried, the others are not
/// written again.
#[tokio::test]
async fn too_few_results_retry_the_rest() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.then([Step::TooFew(2)]);
    enqueue(&*j, "f", "d", "e", &rows(&["a", "b", "c", "d", "e"]))
        .await
        .expect("enqueue");
    let l = lane(&j, &sink, open_guard("d"), policy(5, 1, 5));
    sink.wait_for_writes(5, WITHIN).await.expect("all written");
    l.stop(WITHIN).await.expect("stops");
    let acc = sink.accepted();
    let ids: Vec<i64> = acc.iter().map(|a| a.id).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "each once: {ids:?}");
    assert_eq!(acc.iter().filter(|a| a.attempt == 1).count(), 2);
    assert_eq!(acc.iter().filter(|a| a.attempt == 2).count(), 3);
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.pending), (5, 0));
    assert!(c.balanced);
}

/// P3-2: two flows writing the same keys of one destination, interleaved,
/// with delays and retries: the destination sees every key's writes in
/// acceptance order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_flows_one_destination_keep_each_keys_acceptance_order() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.then((0..20).map(|i| {
        if i % 3 == 0 {
            Step::Delay(Duration::from_millis(5))
        } else {
            Step::Ok
        }
    }));
    sink.fail_key("k1", 3, false);
    let keys = ["k0", "k1", "k2", "k3", "k4"];
    for round in 0..10 {
        let flow = if round % 2 == 0 { "f1" } else { "f2" };
        let r: Vec<_> = keys
            .iter()
            .map(|k| (Some(*k), json!({"key": k, "round": round})))
            .collect();
        enqueue(&*j, flow, "d", &format!("r{round}"), &r)
            .await
            .expect("enqueue");
    }
    let guard = open_guard("d");
    let a = lane_of("f1", &j, &sink, guard.clone(), policy(3, 4, 10));
    let b = lane_of("f2", &j, &sink, guard, policy(3, 4, 10));
    sink.wait_for_writes(50, WITHIN).await.expect("all written");
    a.stop(WITHIN).await.expect("stops");
    b.stop(WITHIN).await.expect("stops");
    let acc = sink.accepted();
    assert_eq!(acc.len(), 50, "each once");
    for k in keys {
        let rounds: Vec<i64> = acc
            .iter()
            .filter(|a| a.entity_key.as_deref() == Some(k))
            .filter_map(|a| a.payload["round"].as_i64())
            .collect();
        assert_eq!(rounds, (0..10).collect::<Vec<_>>(), "key {k}");
    }
    for f in ["f1", "f2"] {
        let c = counts(&j, f, "d");
        assert_eq!((c.delivered, c.pending), (25, 0), "{f}");
        assert!(c.balanced);
    }
}

/// P1-8: 2,000 rows of one hot key to a sink that folds keys go in a few
/// batches, in order; the last write is the last row.
#[tokio::test]
async fn a_hot_key_drains_in_a_few_batches_in_order() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new().folds_keys(true));
    let r: Vec<_> = (0..2000)
        .map(|n| (Some("hot"), json!({"key": "hot", "n": n})))
        .collect();
    enqueue(&*j, "f", "d", "e", &r).await.expect("enqueue");
    let t = Instant::now();
    let l = lane(&j, &sink, open_guard("d"), policy(500, 1, 5));
    sink.wait_for_writes(2000, WITHIN)
        .await
        .expect("all written");
    let took = t.elapsed();
    l.stop(WITHIN).await.expect("stops");
    let calls = sink.calls();
    assert!(calls.len() <= 5, "{} batches", calls.len());
    let ns: Vec<i64> = sink
        .accepted()
        .iter()
        .filter_map(|a| a.payload["n"].as_i64())
        .collect();
    assert_eq!(ns, (0..2000).collect::<Vec<_>>(), "in order, each once");
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.pending), (2000, 0));
    eprintln!("2,000 rows of one key: {} batches, {took:?}", calls.len());
}

/// P1-8: rows in backoff do not starve the other keys.
#[tokio::test]
async fn rows_in_backoff_do_not_starve_other_keys() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    let bad: Vec<String> = (0..50).map(|i| format!("bad{i}")).collect();
    for k in &bad {
        sink.fail_key(k, usize::MAX, false);
    }
    let mut r: Vec<(Option<&str>, serde_json::Value)> = bad
        .iter()
        .map(|k| (Some(k.as_str()), json!({"key": k})))
        .collect();
    let good: Vec<String> = (0..200).map(|i| format!("good{i}")).collect();
    r.extend(good.iter().map(|k| (Some(k.as_str()), json!({"key": k}))));
    enqueue(&*j, "f", "d", "e", &r).await.expect("enqueue");
    let mut p = policy(10, 2, 100);
    p.initial_backoff = Duration::from_secs(30);
    p.max_backoff = Duration::from_secs(30);
    p.multiplier = 1.0;
    let l = lane(&j, &sink, open_guard("d"), p);
    sink.wait_for_writes(200, WITHIN)
        .await
        .expect("good keys flow");
    l.stop(WITHIN).await.expect("stops");
    let acc = sink.accepted();
    assert_eq!(acc.len(), 200);
    assert!(acc.iter().all(|a| {
        a.entity_key
            .as_deref()
            .is_some_and(|k| k.starts_with("good"))
    }));
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.dead_lettered, c.pending), (200, 0, 50));
    assert!(c.balanced);
}

/// `hold_key`: a dead letter holds the later rows of its key (the others
/// flow) until it is discarded; then they go, in order.
#[tokio::test]
async fn hold_key_holds_later_rows_until_discard() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.fail_key("k", 1, true);
    enqueue(&*j, "f", "d", "e", &rows(&["k", "o", "k", "o", "k"]))
        .await
        .expect("enqueue");
    let mut p = policy(1, 1, 5);
    p.on_dead_letter = OnDeadLetter::HoldKey;
    let l = lane(&j, &sink, open_guard("d"), p);
    sink.wait_for_writes(2, WITHIN).await.expect("o flows");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sink.accepted().len(), 2, "k is held: {:?}", sink.by_key());
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.dead_lettered, c.pending), (2, 1, 2));
    let dlq = j.read().dlq_list(&DlqFilter::default()).expect("dlq");
    assert_eq!(dlq.len(), 1);
    j.discard(dlq[0].id, "not needed".into())
        .await
        .expect("discard");
    l.wake();
    sink.wait_for_writes(4, WITHIN).await.expect("released");
    l.stop(WITHIN).await.expect("stops");
    let k = sink.by_key().remove(&Some("k".into())).unwrap_or_default();
    assert_eq!(k, ["e-2", "e-4"], "in order");
    let c = counts(&j, "f", "d");
    assert_eq!(
        (c.delivered, c.dead_lettered, c.discarded, c.pending),
        (4, 0, 1, 0)
    );
    assert!(c.balanced, "{c:?}");
}

/// `hold_key`: a replay puts the dead row back at the head of its key; the
/// held rows follow it.
#[tokio::test]
async fn hold_key_holds_later_rows_until_replay_then_all_in_order() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.fail_key("k", 1, true);
    enqueue(&*j, "f", "d", "e", &rows(&["k", "k", "k"]))
        .await
        .expect("enqueue");
    let mut p = policy(1, 1, 5);
    p.on_dead_letter = OnDeadLetter::HoldKey;
    let l = lane(&j, &sink, open_guard("d"), p);
    sink.wait_for_calls(1, WITHIN).await.expect("first call");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.accepted().len(), 0, "held");
    let dlq = j.read().dlq_list(&DlqFilter::default()).expect("dlq");
    assert_eq!(dlq.len(), 1);
    j.replay(Replay {
        dlq_id: dlq[0].id,
        payload: None,
        outcome: None,
        force: false,
        note: "fixed".into(),
    })
    .await
    .expect("replay");
    l.wake();
    sink.wait_for_writes(3, WITHIN).await.expect("all");
    l.stop(WITHIN).await.expect("stops");
    let k = sink.by_key().remove(&Some("k".into())).unwrap_or_default();
    assert_eq!(k, ["e-0", "e-1", "e-2"]);
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.dead_lettered, c.pending), (3, 0, 0));
    assert!(c.balanced, "{c:?}");
}

/// A crash after the destination took a write and before it was settled:
/// after the restart the row is written again with the same idempotency
/// key, before the later rows of its key.
#[tokio::test]
async fn a_crash_between_write_and_settle_rewrites_with_the_same_key_in_order() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.then([Step::AcceptThenHang]);
    enqueue(&*j, "f", "d", "e", &rows(&["k", "k", "k"]))
        .await
        .expect("enqueue");
    let l = lane(&j, &sink, open_guard("d"), policy(1, 1, 5));
    sink.wait_for_writes(1, WITHIN).await.expect("written");
    l.crash().await;
    j.restart().expect("restart");
    let l = lane(&j, &sink, open_guard("d"), policy(1, 1, 5));
    sink.wait_for_writes(4, WITHIN).await.expect("rewritten");
    l.stop(WITHIN).await.expect("stops");
    let acc = sink.accepted();
    let events: Vec<&str> = acc.iter().map(|a| a.event_id.as_str()).collect();
    assert_eq!(events, ["e-0", "e-0", "e-1", "e-2"]);
    assert_eq!(acc[0].idempotency_key, acc[1].idempotency_key);
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.pending), (3, 0));
    assert!(c.balanced, "{c:?}");
}

/// The journal cannot commit a settle (every try fails): the rows stay
/// leased, are written again once the lease is gone, and nothing is lost or
/// counted twice.
#[tokio::test]
async fn a_failing_settle_resends_after_the_lease_and_loses_nothing() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.then([Step::Delay(Duration::from_millis(600))]);
    enqueue(&*j, "f", "d", "e", &rows(&["a", "b", "c"]))
        .await
        .expect("enqueue");
    let l = lane(&j, &sink, open_guard("d"), policy(3, 1, 5));
    sink.wait_for_calls(1, WITHIN)
        .await
        .expect("the write goes");
    // the write is in flight (concurrency 1: no other journal call now);
    // its settle and the lane's 3 retries of it fail
    j.fail_next(4, || StoreError::Invalid("injected: disk full".into()))
        .expect("inject");
    sink.wait_for_writes(3, WITHIN).await.expect("first write");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.pending), (0, 3), "nothing settled: {c:?}");
    assert!(c.balanced);
    // the lease ends (as at a restart): the rows go again
    j.restart().expect("restart");
    l.wake();
    sink.wait_for_writes(6, WITHIN).await.expect("resent");
    l.stop(WITHIN).await.expect("stops");
    let acc = sink.accepted();
    for k in ["a", "b", "c"] {
        let idem: Vec<&str> = acc
            .iter()
            .filter(|a| a.entity_key.as_deref() == Some(k))
            .map(|a| a.idempotency_key.as_str())
            .collect();
        assert_eq!(idem.len(), 2, "{k}");
        assert_eq!(idem[0], idem[1], "{k}: same idempotency key");
    }
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.dead_lettered, c.pending), (3, 0, 0));
    assert!(c.balanced, "{c:?}");
}

/// P4-7: a `hold_key` lane with far more held rows than a batch (the old
/// in-memory window filled up with them): the other keys keep flowing.
#[tokio::test]
async fn many_held_rows_do_not_block_other_keys() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.fail_key("held", 1, true);
    let mut r: Vec<(Option<&str>, serde_json::Value)> =
        (0..501).map(|n| (Some("held"), json!({"n": n}))).collect();
    let others: Vec<String> = (0..100).map(|i| format!("o{i}")).collect();
    r.extend(others.iter().map(|k| (Some(k.as_str()), json!({"key": k}))));
    enqueue(&*j, "f", "d", "e", &r).await.expect("enqueue");
    let mut p = policy(10, 2, 5);
    p.on_dead_letter = OnDeadLetter::HoldKey;
    let l = lane(&j, &sink, open_guard("d"), p);
    sink.wait_for_writes(100, WITHIN)
        .await
        .expect("others flow");
    l.stop(WITHIN).await.expect("stops");
    let acc = sink.accepted();
    assert_eq!(acc.len(), 100);
    assert!(acc.iter().all(|a| a.entity_key.as_deref() != Some("held")));
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.dead_lettered, c.pending), (100, 1, 500));
    assert!(c.balanced, "{c:?}");
}

/// The same lane over the SQLite journal (the hub's): two flows, the same
/// keys, a panic and retries: every key's writes in acceptance order, each
/// once, and the accounting balanced on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_two_flows_a_panic_and_retries_keep_each_keys_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Arc::new(
        weft_store::SqliteJournal::open(
            &dir.path().join("weft.db"),
            weft_core::config::Synchronous::Normal,
            weft_store::Role::Hub,
        )
        .expect("open"),
    );
    let j: Arc<dyn Journal> = sqlite.clone();
    let sink = Arc::new(ScriptedSink::new());
    sink.then([
        Step::Ok,
        Step::Panic,
        Step::Ok,
        Step::Retryable("503".into()),
    ]);
    sink.fail_key("k2", 2, false);
    let keys = ["k0", "k1", "k2", "k3"];
    for round in 0..6 {
        let flow = if round % 2 == 0 { "f1" } else { "f2" };
        let r: Vec<_> = keys
            .iter()
            .map(|k| (Some(*k), json!({"key": k, "round": round})))
            .collect();
        enqueue(&*j, flow, "d", &format!("r{round}"), &r)
            .await
            .expect("enqueue");
    }
    let guard = open_guard("d");
    let a = RunningLane::start(
        "f1",
        "d",
        policy(3, 2, 10),
        sink.clone(),
        guard.clone(),
        j.clone(),
    );
    let b = RunningLane::start("f2", "d", policy(3, 2, 10), sink.clone(), guard, j.clone());
    sink.wait_for_writes(24, WITHIN).await.expect("all written");
    a.stop(WITHIN).await.expect("stops");
    b.stop(WITHIN).await.expect("stops");
    let acc = sink.accepted();
    assert_eq!(acc.len(), 24, "each once");
    for k in keys {
        let rounds: Vec<i64> = acc
            .iter()
            .filter(|a| a.entity_key.as_deref() == Some(k))
            .filter_map(|a| a.payload["round"].as_i64())
            .collect();
        assert_eq!(rounds, (0..6).collect::<Vec<_>>(), "key {k}");
    }
    let lanes = [LaneId::new("f1", "d"), LaneId::new("f2", "d")];
    for c in j.read().counts(&lanes).expect("counts") {
        assert_eq!((c.delivered, c.pending), (12, 0), "{c:?}");
        assert!(c.balanced, "{c:?}");
    }
}

/// `Retry-After` pauses the whole destination: no key is written until it
/// has passed, and the failed row goes again after it.
#[tokio::test]
async fn retry_after_pauses_every_key_of_the_destination() {
    let j = Arc::new(MemoryJournal::new());
    let sink = Arc::new(ScriptedSink::new());
    sink.then([Step::RetryAfter(Duration::from_millis(600))]);
    enqueue(&*j, "f", "d", "e", &rows(&["a", "b", "c"]))
        .await
        .expect("enqueue");
    let l = lane(&j, &sink, breaker(5, 60_000), policy(1, 1, 5));
    sink.wait_for_calls(1, WITHIN).await.expect("first call");
    let t = Instant::now();
    sink.wait_for_writes(1, WITHIN)
        .await
        .expect("after the pause");
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "nothing written during the pause: {:?}",
        t.elapsed()
    );
    sink.wait_for_writes(3, WITHIN).await.expect("all");
    l.stop(WITHIN).await.expect("stops");
    assert_eq!(sink.calls().len(), 4, "one refused call, then three");
    let c = counts(&j, "f", "d");
    assert_eq!((c.delivered, c.pending), (3, 0));
}

/// P1-14: a write sent while the breaker was closed that succeeds while it
/// is half-open (its probe still out) does not close it; the probe decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_of_a_write_sent_before_opening_does_not_close_half_open() {
    let j = Arc::new(MemoryJournal::new());
    let guard = breaker(1, 100);
    let slow = Arc::new(ScriptedSink::new());
    slow.then([Step::Delay(Duration::from_millis(600))]);
    let failing = Arc::new(ScriptedSink::new().max_write_time(Duration::from_millis(1200)));
    failing.then([Step::Retryable("503".into()), Step::Hang]);
    enqueue(&*j, "slow", "d", "s", &rows(&["s"]))
        .await
        .expect("enqueue");
    enqueue(&*j, "fails", "d", "x", &rows(&["x"]))
        .await
        .expect("enqueue");
    let a = lane_of("slow", &j, &slow, guard.clone(), policy(1, 1, 10));
    // its write goes while the breaker is closed
    slow.wait_for_calls(1, WITHIN)
        .await
        .expect("slow write sent");
    let b = lane_of("fails", &j, &failing, guard.clone(), policy(1, 1, 10));
    // the failure opens it; after 100 ms the hanging probe goes
    failing.wait_for_calls(2, WITHIN).await.expect("probe sent");
    assert!(matches!(guard.state(), State::HalfOpen { .. }));
    slow.wait_for_writes(1, WITHIN).await.expect("late success");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        matches!(guard.state(), State::HalfOpen { probes_sent: 1 }),
        "the late success did not decide: {:?}",
        guard.state()
    );
    // the probe times out (reopens), the next probe closes it
    failing.wait_for_writes(1, WITHIN).await.expect("delivered");
    a.stop(WITHIN).await.expect("stops");
    b.stop(WITHIN).await.expect("stops");
    assert_eq!(guard.state(), State::Closed);
    assert_eq!(failing.calls().len(), 3);
}

/// Three flows writing 12 keys of one destination through a sink that
/// fails at random (retryable, too few results, panics, hangs, delays, a
/// key at a time): every row is accepted exactly once, and per key in
/// acceptance order. Seeded, so a failure is reproducible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_failures_across_three_flows_keep_each_keys_order() {
    use rand::{Rng, SeedableRng};
    for seed in [7u64, 42] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let j = Arc::new(MemoryJournal::new());
        let sink = Arc::new(ScriptedSink::new().max_write_time(Duration::from_millis(150)));
        sink.then((0..150).map(|_| match rng.random_range(0..20) {
            0..=2 => Step::Retryable("503".into()),
            3..=4 => Step::TooFew(rng.random_range(0..3)),
            5 => Step::Panic,
            6 => Step::Hang,
            7..=8 => Step::Delay(Duration::from_millis(rng.random_range(1..10))),
            _ => Step::Ok,
        }));
        let keys: Vec<String> = (0..12).map(|k| format!("k{k}")).collect();
        for k in keys.iter().step_by(4) {
            sink.fail_key(k, 3, false);
        }
        let flows = ["f1", "f2", "f3"];
        let mut expected: std::collections::HashMap<String, Vec<String>> = Default::default();
        for round in 0..10 {
            let flow = flows[rng.random_range(0..3)];
            let picked: Vec<&String> = keys.iter().filter(|_| rng.random_bool(0.7)).collect();
            let r: Vec<_> = picked
                .iter()
                .map(|k| (Some(k.as_str()), json!({"key": k, "round": round})))
                .collect();
            let prefix = format!("r{round}");
            enqueue(&*j, flow, "d", &prefix, &r).await.expect("enqueue");
            for (n, k) in picked.iter().enumerate() {
                expected
                    .entry((*k).clone())
                    .or_default()
                    .push(format!("{prefix}-{n}"));
            }
        }
        let total: usize = expected.values().map(Vec::len).sum();
        let guard = open_guard("d");
        let lanes: Vec<_> = flows
            .iter()
            .map(|f| lane_of(f, &j, &sink, guard.clone(), policy(4, 3, 50)))
            .collect();
        sink.wait_for_writes(total, WITHIN)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        for l in lanes {
            l.stop(WITHIN).await.expect("stops");
        }
        let mut seen = sink.by_key();
        for (k, want) in &expected {
            let got = seen.remove(&Some(k.clone())).unwrap_or_default();
            assert_eq!(&got, want, "seed {seed}, key {k}");
        }
        assert!(seen.is_empty(), "seed {seed}: unexpected {seen:?}");
        for f in flows {
            let c = counts(&j, f, "d");
            assert_eq!((c.dead_lettered, c.pending), (0, 0), "seed {seed} {c:?}");
            assert!(c.balanced, "seed {seed} {c:?}");
        }
    }
}
