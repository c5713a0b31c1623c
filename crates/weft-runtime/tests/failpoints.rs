//! Crashes at the lane's failpoints (the `fail` crate, on in this crate's
//! tests only). Failpoints are process-wide, so they live in this test
//! binary of their own and each test holds a `FailScenario` (which also
//! serializes them).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use weft_runtime::testing::{
    FP_AFTER_SETTLE, FP_BEFORE_SETTLE, RunningLane, ScriptedSink, enqueue, open_guard, policy,
};
use weft_store::{FlowCounts, Journal, LaneId, MemoryJournal};

const WITHIN: Duration = Duration::from_secs(10);

fn counts(j: &MemoryJournal) -> FlowCounts {
    let lane = LaneId::new("f", "d");
    j.read()
        .counts(std::slice::from_ref(&lane))
        .expect("counts")
        .into_iter()
        .find(|c| c.flow == "f" && c.destination == "d")
        .expect("the lane's counts")
}

fn start(j: &Arc<MemoryJournal>, sink: &Arc<ScriptedSink>) -> RunningLane {
    let journal: Arc<dyn Journal> = j.clone();
    RunningLane::start(
        "f",
        "d",
        policy(1, 1, 5),
        sink.clone(),
        open_guard("d"),
        journal,
    )
}

async fn three_rows_of_k(j: &MemoryJournal) {
    let rows: Vec<_> = (0..3).map(|n| (Some("k"), json!({"n": n}))).collect();
    enqueue(j, "f", "d", "e", &rows).await.expect("enqueue");
}

#[test]
fn failpoints_are_compiled_in_for_these_tests() {
    assert!(fail::has_failpoints());
}

/// Written, then a crash before the settle: after the restart the row is
/// written again with the same idempotency key, before the later rows.
#[tokio::test]
async fn a_crash_after_the_sink_before_settle_rewrites_in_order() {
    let scenario = fail::FailScenario::setup();
    fail::cfg(FP_BEFORE_SETTLE, "1*return").expect("failpoint");
    let j = Arc::new(MemoryJournal::new());
    three_rows_of_k(&j).await;
    let sink = Arc::new(ScriptedSink::new());
    let l = start(&j, &sink);
    sink.wait_for_writes(1, WITHIN).await.expect("written");
    // the settle was skipped: the row stays leased, the key blocked
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.accepted().len(), 1);
    assert_eq!(counts(&j).delivered, 0);
    l.crash().await;
    j.restart().expect("restart");
    let l = start(&j, &sink);
    sink.wait_for_writes(4, WITHIN).await.expect("rewritten");
    l.stop(WITHIN).await.expect("stops");
    let acc = sink.accepted();
    let events: Vec<&str> = acc.iter().map(|a| a.event_id.as_str()).collect();
    assert_eq!(events, ["e-0", "e-0", "e-1", "e-2"]);
    assert_eq!(acc[0].idempotency_key, acc[1].idempotency_key);
    let c = counts(&j);
    assert_eq!((c.delivered, c.pending), (3, 0));
    assert!(c.balanced, "{c:?}");
    scenario.teardown();
}

/// Settled, then a crash before the lane moves on: nothing is written
/// twice and the rest follows after the restart.
#[tokio::test]
async fn a_crash_after_the_settle_commit_writes_nothing_twice() {
    let scenario = fail::FailScenario::setup();
    fail::cfg(FP_AFTER_SETTLE, "1*panic(crash after settle)").expect("failpoint");
    let j = Arc::new(MemoryJournal::new());
    three_rows_of_k(&j).await;
    let sink = Arc::new(ScriptedSink::new());
    let l = start(&j, &sink);
    sink.wait_for_writes(1, WITHIN).await.expect("written");
    // the lane task died right after its first settle committed
    let died = tokio::time::timeout(WITHIN, l.task).await.expect("ends");
    assert!(
        died.is_err_and(|e| e.is_panic()),
        "the failpoint crashed it"
    );
    assert_eq!(counts(&j).delivered, 1, "the settle was committed");
    j.restart().expect("restart");
    let l = start(&j, &sink);
    sink.wait_for_writes(3, WITHIN).await.expect("the rest");
    l.stop(WITHIN).await.expect("stops");
    let events: Vec<String> = sink.accepted().into_iter().map(|a| a.event_id).collect();
    assert_eq!(events, ["e-0", "e-1", "e-2"], "each once, in order");
    let c = counts(&j);
    assert_eq!((c.delivered, c.pending), (3, 0));
    assert!(c.balanced, "{c:?}");
    scenario.teardown();
}
