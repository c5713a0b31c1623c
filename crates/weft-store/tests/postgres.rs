//! What only the PostgreSQL journal promises, beyond the conformance suite:
//! several writers (processes; here journals with pools of their own) on
//! one database, the hub's node lock, leases per node, counter compaction,
//! schema versions. Against the machine's PostgreSQL, a database per test
//! (`conformance/pg.rs`): skipped loudly when it does not answer, failed
//! under `CI=true`.
#![cfg(feature = "postgres")]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weft_store::*;

#[path = "conformance/pg.rs"]
mod pg;

const LEASE: Duration = Duration::from_secs(60);

fn event(id: &str, key: Option<&str>) -> NewEvent {
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
        attributes: "{}".into(),
        payload: format!("{{\"id\":\"{id}\"}}"),
        outcomes: vec![FlowOutcome::Routed {
            flow: "f".into(),
            deliveries: vec![NewDelivery {
                destination: "d".into(),
                entity_key: key.map(Into::into),
                idempotency_key: format!("ik-{id}"),
                payload: format!("{{\"id\":\"{id}\"}}"),
                delivered: false,
            }],
        }],
    }
}

fn batch(source: &str, events: Vec<NewEvent>) -> IngestBatch {
    IngestBatch {
        source: source.into(),
        dedupe: Dedupe::Id,
        events,
        checkpoint: None,
        fence: None,
    }
}

fn claim_req(max: usize, per_key: usize) -> ClaimRequest {
    ClaimRequest {
        lane: LaneId::new("f", "d"),
        max,
        per_key,
        lease: LEASE,
    }
}

fn deliver_all(c: &[Claimed]) -> Settle {
    Settle {
        items: c
            .iter()
            .map(|c| Settlement {
                id: c.row.id,
                token: c.token,
                attempt: None,
                outcome: Outcome::Delivered(WriteOutcome::default()),
            })
            .collect(),
        follow_ups: Vec::new(),
    }
}

/// What a destination received per key: `(order_seq, event id)` in write
/// order.
type Writes = BTreeMap<String, Vec<(i64, String)>>;

fn lane_counts(j: &PgJournal) -> FlowCounts {
    let all = j.read().counts(&[LaneId::new("f", "d")]).expect("counts");
    let c = all
        .into_iter()
        .find(|c| c.flow == "f" && c.destination == "d")
        .expect("the lane's counts");
    assert!(c.balanced, "{c:?}");
    c
}

/// Two journals (two processes as far as PostgreSQL can tell) ingest rows
/// of the same few keys at once, while a third claims and delivers all the
/// time. order_seq comes from a sequence, whose values are not in commit
/// order; they are taken only under the keys' locks, so per key they are.
/// Without that, a row could commit in front of a row of its key that was
/// already delivered, and the destination would see an older version after
/// a newer one. Checked: every key's writes in increasing order_seq, each
/// ingester's events of a key in the order it ingested them, every event
/// delivered once, the ledger balanced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_ingesters_keep_each_keys_order() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let a = Arc::new(db.open("node-a", PgRole::Hub));
    let b = Arc::new(db.open("node-b", PgRole::Hub));
    let c = Arc::new(db.open("node-c", PgRole::Hub));
    const KEYS: usize = 4;
    const BATCHES: usize = 120;
    const PER_BATCH: usize = 4;
    let ingester = |j: Arc<PgJournal>, name: &'static str| {
        tokio::spawn(async move {
            for i in 0..BATCHES {
                let events = (0..PER_BATCH)
                    .map(|n| {
                        let key = format!("k{}", (i + n) % KEYS);
                        event(&format!("{name}-{i:04}-{n}"), Some(&key))
                    })
                    .collect();
                j.ingest(batch(name, events)).await.expect("ingest");
            }
        })
    };
    let ia = ingester(a.clone(), "a");
    let ib = ingester(b.clone(), "b");
    let total = 2 * BATCHES * PER_BATCH;
    let mut writes: Writes = BTreeMap::new();
    let mut delivered = 0;
    let mut ingesting = true;
    while delivered < total {
        let got = c.claim(claim_req(50, 1)).await.expect("claim");
        let mut keys = std::collections::HashSet::new();
        for x in &got {
            let k = x.row.entity_key.clone().expect("keyed");
            assert!(keys.insert(k.clone()), "two rows of {k} out at once");
            writes
                .entry(k)
                .or_default()
                .push((x.row.order_seq, x.row.event_id.clone()));
        }
        delivered += c.settle(deliver_all(&got)).await.expect("settle").delivered;
        if ingesting && ia.is_finished() && ib.is_finished() {
            ingesting = false;
        }
        if got.is_empty() {
            if !ingesting {
                assert_eq!(c.read().outbox_len().expect("outbox_len"), 0);
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    ia.await.expect("ingester a");
    ib.await.expect("ingester b");
    assert_eq!(delivered, total);
    for (k, w) in &writes {
        assert!(
            w.windows(2).all(|p| p[0].0 < p[1].0),
            "{k} received an older row after a newer one: {w:?}"
        );
        for name in ["a-", "b-"] {
            let mine: Vec<&str> = w
                .iter()
                .map(|(_, e)| e.as_str())
                .filter(|e| e.starts_with(name))
                .collect();
            let mut sorted = mine.clone();
            sorted.sort();
            assert_eq!(mine, sorted, "{k}: {name} events out of their ingest order");
        }
    }
    let n: usize = writes.values().map(Vec::len).sum();
    assert_eq!(n, total, "every event once");
    let counts = lane_counts(&c);
    assert_eq!(
        (counts.received, counts.delivered, counts.pending),
        (total as i64, total as i64, 0)
    );
}

/// The same race made to happen: ingest A stops on the lock of another key
/// of its batch (held by the test) before it locks key k; meanwhile B
/// ingests a row of k, which is delivered; then A goes on. Had A taken its
/// order_seq before waiting (as a sequence would hand it out), its row of k
/// would sort before B's delivered one and be written after it: an older
/// version after a newer. Taken under the locks, it sorts after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_seq_is_taken_under_the_key_locks() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let a = Arc::new(db.open("node-a", PgRole::Hub));
    let b = db.open("node-b", PgRole::Hub);
    let lock = |k: &str| weft_store::postgres::key_lock_id("weft", k);
    // a key whose lock A takes before k's (ascending order)
    let blocker = (0..)
        .map(|i| format!("blocker{i}"))
        .find(|name| lock(name) < lock("k"))
        .expect("some name sorts first");
    let holder = pg_client(&db).await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&lock(&blocker)])
        .await
        .expect("hold the blocker's lock");
    let ia = {
        let (a, blocker) = (a.clone(), blocker.clone());
        tokio::spawn(async move {
            let events = vec![event("a-blocker", Some(&blocker)), event("a-k", Some("k"))];
            a.ingest(batch("a", events)).await.expect("ingest a");
        })
    };
    // A waits on the blocker's lock
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pg_count(
        &db,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
    )
    .await
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "A never waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.ingest(batch("b", vec![event("b-k", Some("k"))]))
        .await
        .expect("ingest b");
    let got = b.claim(claim_req(10, 1)).await.expect("claim");
    assert_eq!(
        got.iter()
            .map(|c| c.row.event_id.as_str())
            .collect::<Vec<_>>(),
        ["b-k"]
    );
    b.settle(deliver_all(&got)).await.expect("settle");
    let b_seq = got[0].row.order_seq;
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&lock(&blocker)])
        .await
        .expect("release");
    ia.await.expect("ingester a");
    let rows = b
        .read()
        .pending(&LaneId::new("f", "d"), 10)
        .expect("pending");
    let ak = rows
        .iter()
        .find(|r| r.event_id == "a-k")
        .expect("A's row of k");
    assert!(
        ak.order_seq > b_seq,
        "A's row of k ({}) sorts before B's delivered row ({b_seq}): it would be written after a newer one",
        ak.order_seq
    );
}

/// Two journals claim one lane at once (heads and per-key followers) and
/// settle with every outcome: never are rows of one key held by two claims
/// at once, every row is delivered once, each key in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_share_a_key() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let ingest = db.open("ingest", PgRole::Hub);
    const KEYS: usize = 6;
    const EVENTS: usize = 600;
    for chunk in 0..(EVENTS / 50) {
        let events = (0..50)
            .map(|n| {
                let i = chunk * 50 + n;
                let key = (i % 7 != 0).then(|| format!("k{}", i % KEYS));
                event(&format!("{i:05}"), key.as_deref())
            })
            .collect();
        ingest.ingest(batch("s", events)).await.expect("ingest");
    }
    // key -> the claim holding it now; (key -> writes) at the destination
    let holders: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let writes: Arc<Mutex<Writes>> = Arc::default();
    let claimer = |node: &'static str, seed: u64| {
        let j = db.open(node, PgRole::Hub);
        let (holders, writes) = (holders.clone(), writes.clone());
        tokio::spawn(async move {
            let mut rng = seed;
            let mut next = || {
                // xorshift: a fixed sequence per claimer
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut claims = 0u64;
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let got = j.claim(claim_req(8, 3)).await.expect("claim");
                if got.is_empty() {
                    // done when nothing is left; else rows are in backoff
                    // or with the other claimer: look again shortly
                    if j.read().outbox_len().expect("outbox_len") == 0 {
                        break;
                    }
                    assert!(std::time::Instant::now() < deadline, "not drained");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                claims += 1;
                let me = seed << 32 | claims;
                let keys: std::collections::BTreeSet<String> = got
                    .iter()
                    .filter_map(|c| c.row.entity_key.clone())
                    .collect();
                {
                    let mut h = holders.lock().expect("holders");
                    for k in &keys {
                        if let Some(other) = h.insert(k.clone(), me) {
                            panic!("{k} is held by claim {other} and {me} at once");
                        }
                    }
                }
                let mut items = Vec::new();
                let mut failed: std::collections::HashSet<String> = Default::default();
                for c in &got {
                    let k = c.row.entity_key.clone();
                    // a failed row fails the rows of its key behind it
                    let outcome = if k.as_ref().is_some_and(|k| failed.contains(k)) {
                        Outcome::Release
                    } else {
                        match next() % 6 {
                            0 => Outcome::Retry {
                                next_at: now_ms() + 20,
                                error: "503".into(),
                            },
                            1 => Outcome::Release,
                            _ => Outcome::Delivered(WriteOutcome::default()),
                        }
                    };
                    if !matches!(outcome, Outcome::Delivered(_)) {
                        if let Some(k) = &k {
                            failed.insert(k.clone());
                        }
                    } else if let Some(k) = &k {
                        writes
                            .lock()
                            .expect("writes")
                            .entry(k.clone())
                            .or_default()
                            .push((c.row.order_seq, c.row.event_id.clone()));
                    }
                    items.push(Settlement {
                        id: c.row.id,
                        token: c.token,
                        attempt: None,
                        outcome,
                    });
                }
                // let go of the keys before the settle commits: another
                // claim can have them only after it did
                {
                    let mut h = holders.lock().expect("holders");
                    for k in &keys {
                        h.remove(k);
                    }
                }
                let s = j
                    .settle(Settle {
                        items,
                        follow_ups: Vec::new(),
                    })
                    .await
                    .expect("settle");
                assert_eq!(s.stale, 0, "{s:?}");
            }
            j
        })
    };
    let x = claimer("claim-x", 0x9e37_79b9);
    let y = claimer("claim-y", 0x7f4a_7c15);
    let x = x.await.expect("claimer x");
    let _y = y.await.expect("claimer y");
    assert_eq!(x.read().outbox_len().expect("outbox_len"), 0);
    let writes = writes.lock().expect("writes");
    for (k, w) in writes.iter() {
        assert!(
            w.windows(2).all(|p| p[0].0 < p[1].0),
            "{k}: out of order or twice: {w:?}"
        );
    }
    let counts = lane_counts(&x);
    assert_eq!(
        (counts.received, counts.delivered, counts.pending),
        (EVENTS as i64, EVENTS as i64, 0)
    );
}

/// One hub per node name; another node, or a tool, beside it. A hub that
/// starts ends its own node's leases, not another node's.
#[tokio::test]
async fn hub_lock_per_node_and_leases_end_per_node() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let a = db.open("node-a", PgRole::Hub);
    let err = PgJournal::open(db.options("node-a", PgRole::Hub))
        .err()
        .expect("a second hub named node-a is refused");
    assert!(err.to_string().contains("node-a"), "{err}");
    let b = db.open("node-b", PgRole::Hub);
    let tool = db.open("node-a", PgRole::Tool);

    a.ingest(batch(
        "s",
        vec![event("1", Some("k1")), event("2", Some("k2"))],
    ))
    .await
    .expect("ingest");
    let ca = a.claim(claim_req(1, 1)).await.expect("claim a");
    let cb = b.claim(claim_req(1, 1)).await.expect("claim b");
    assert_eq!((ca.len(), cb.len()), (1, 1));
    assert!(
        tool.claim(claim_req(10, 1))
            .await
            .expect("claim")
            .is_empty()
    );
    drop(a);
    let a = db.open("node-a", PgRole::Hub);
    let again = a.claim(claim_req(10, 1)).await.expect("claim");
    assert_eq!(
        again.iter().map(|c| c.row.id).collect::<Vec<_>>(),
        [ca[0].row.id],
        "node-a's lease ended with its restart, node-b's did not"
    );
    let s = a.settle(deliver_all(&ca)).await.expect("settle");
    assert_eq!(s.stale, 1, "a token from before the restart is stale");
    let s = b.settle(deliver_all(&cb)).await.expect("settle");
    assert_eq!(s.delivered, 1, "node-b's lease went on");
    assert_eq!(
        a.settle(deliver_all(&again))
            .await
            .expect("settle")
            .delivered,
        1
    );
    let c = lane_counts(&tool);
    assert_eq!((c.delivered, c.pending), (2, 0));
}

/// Counters are appended and folded: thousands of writes leave the totals
/// exact, before and after compaction, and compaction empties the deltas.
#[tokio::test]
async fn counter_deltas_fold_without_changing_counts() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let j = db.open("n", PgRole::Hub);
    for i in 0..300 {
        let events = vec![event(&format!("{i}"), Some(&format!("k{}", i % 3)))];
        j.ingest(batch("s", events)).await.expect("ingest");
        let c = j.claim(claim_req(10, 1)).await.expect("claim");
        j.settle(deliver_all(&c)).await.expect("settle");
    }
    let before = lane_counts(&j);
    j.compact_counts().expect("compact");
    let after = lane_counts(&j);
    assert_eq!(
        before,
        FlowCounts {
            oldest_pending_ms: before.oldest_pending_ms,
            ..after.clone()
        }
    );
    assert_eq!(after.received, 300);
    assert_eq!(after.delivered + after.pending, 300);
    let left = pg_count(&db, "SELECT count(*) FROM weft.count_deltas").await;
    assert_eq!(left, 0, "compaction folded every delta");
    let folded = pg_count(&db, "SELECT count(*) FROM weft.flow_counts").await;
    assert!(folded >= 2, "flow and lane rows: {folded}");
}

/// Migrations are recorded; a journal newer than this weft is refused.
#[tokio::test]
async fn schema_versions_are_recorded_and_a_newer_store_refused() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let j = db.open("n", PgRole::Hub);
    assert_eq!(
        j.schema_version().expect("version"),
        weft_store::postgres::pg_latest_version() as i32
    );
    drop(j);
    let again = db.open("n", PgRole::Hub);
    assert_eq!(
        again.schema_version().expect("version"),
        weft_store::postgres::pg_latest_version() as i32,
        "a second open migrates nothing"
    );
    drop(again);
    pg_exec(
        &db,
        "INSERT INTO weft.weft_schema_version (version) VALUES (999)",
    )
    .await;
    let err = PgJournal::open(db.options("n", PgRole::Hub))
        .err()
        .expect("refused");
    assert!(
        matches!(err, StoreError::Schema(_)) && err.to_string().contains("999"),
        "{err}"
    );
    let bad = PgJournal::open(PgOptions {
        schema: "Weft; DROP".into(),
        ..db.options("n", PgRole::Hub)
    });
    assert!(matches!(bad, Err(StoreError::Invalid(_))));
}

async fn pg_client(db: &pg::Database) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

async fn pg_count(db: &pg::Database, sql: &str) -> i64 {
    pg_client(db)
        .await
        .query_one(sql, &[])
        .await
        .expect("query")
        .get(0)
}

async fn pg_exec(db: &pg::Database, sql: &str) {
    pg_client(db).await.batch_execute(sql).await.expect("exec");
}

/// Source leases: one node at a time holds a source; the lease passes to
/// another only once it ran out or was given up, and then a batch of the
/// former owner (a node paused past its lease, a SIGSTOP) is refused whole
/// (fencing), while the new owner's commits.
#[tokio::test]
async fn a_source_lease_passes_on_and_fences_the_former_owner() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let a = db.open("node-a", PgRole::Hub);
    let b = db.open("node-b", PgRole::Hub);
    assert!(a.shared() && b.shared());
    let fenced = |epoch: i64, id: &str| {
        let mut bt = batch("poll", vec![event(id, None)]);
        bt.fence = Some(epoch);
        bt.checkpoint = Some(("pos".into(), id.into()));
        bt
    };
    let ea = a.lease_source("poll".into(), 300).await.expect("lease");
    assert_eq!(ea, Some(1));
    assert_eq!(
        b.lease_source("poll".into(), 300).await.expect("lease"),
        None,
        "a holds it"
    );
    // renewing keeps the epoch; other sources are independent
    assert_eq!(
        a.lease_source("poll".into(), 300).await.expect("renew"),
        Some(1)
    );
    assert_eq!(
        b.lease_source("file".into(), 300).await.expect("lease"),
        Some(1)
    );
    a.ingest(fenced(1, "1")).await.expect("the owner commits");
    // b cannot commit with a's epoch: it is not b's lease
    let err = b.ingest(fenced(1, "x")).await.expect_err("not b's lease");
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");

    // a pauses past its lease; b takes it over, with a new epoch, once it ran out
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let taken = loop {
        if let Some(e) = b
            .lease_source("poll".into(), 60_000)
            .await
            .expect("takeover")
        {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a's lease never ran out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(taken, 2);
    let err = a.ingest(fenced(1, "2")).await.expect_err("fenced");
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert!(err.to_string().contains("node-a"), "{err}");
    assert_eq!(
        a.lease_source("poll".into(), 300).await.expect("lease"),
        None,
        "b's now"
    );
    b.ingest(fenced(2, "3"))
        .await
        .expect("the new owner commits");
    assert_eq!(
        a.read().checkpoint("poll", "pos").unwrap().as_deref(),
        Some("3")
    );
    let c = lane_counts(&a);
    assert_eq!(c.received, 2, "the fenced batches wrote nothing: {c:?}");

    // given up: the other node takes it at once, the epoch moves on
    b.release_source("poll".into()).await.expect("release");
    assert_eq!(
        a.lease_source("poll".into(), 300).await.expect("lease"),
        Some(3)
    );
    // a node that loses nothing keeps its epoch across an expired lease
    // (time passing is the point here: no condition to wait for)
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        a.lease_source("poll".into(), 300).await.expect("renew"),
        Some(3)
    );
}

/// Membership: a node whose heartbeat ran out is found dead by the next
/// beat of a live node, which releases the rows it had claimed (another
/// node claims them at once; the dead node's settle is stale) and drops
/// its row; a node that beats again after being found dead learns it, and
/// one that leaves is gone from `nodes`.
#[tokio::test]
async fn a_dead_nodes_claims_are_released_by_the_next_heartbeat() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let a = db.open("node-a", PgRole::Hub);
    let b = db.open("node-b", PgRole::Hub);
    let first = a.heartbeat(300).await.expect("beat a");
    assert!(!first.was_alive, "a first beat finds no row of its own");
    assert!(first.reaped.is_empty());
    let hb = b.heartbeat(60_000).await.expect("beat b");
    assert!(hb.reaped.is_empty(), "a is alive: {hb:?}");
    assert!(a.heartbeat(300).await.expect("beat a").was_alive);

    a.ingest(batch(
        "s",
        vec![
            event("1", Some("k1")),
            event("2", Some("k2")),
            event("3", Some("k3")),
        ],
    ))
    .await
    .expect("ingest");
    let ca = a.claim(claim_req(2, 1)).await.expect("claim a");
    assert_eq!(ca.len(), 2);
    let nodes = b.read().nodes().expect("nodes");
    let claimed: Vec<(&str, bool, i64)> = nodes
        .iter()
        .map(|n| (n.node.as_str(), n.alive, n.claimed))
        .collect();
    assert_eq!(claimed, [("node-a", true, 2), ("node-b", true, 0)]);
    // while a is alive, its rows are its own
    assert_eq!(b.claim(claim_req(10, 1)).await.expect("claim b").len(), 1);

    // a stops beating (paused, dead); once its beat ran out, b's next beat reaps it
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let hb = loop {
        let hb = b.heartbeat(60_000).await.expect("beat b");
        if !hb.reaped.is_empty() {
            break hb;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a's heartbeat never ran out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(hb.reaped, [("node-a".to_owned(), 2)]);
    assert!(
        b.heartbeat(60_000).await.expect("beat b").reaped.is_empty(),
        "reaped once"
    );
    let nodes = b.read().nodes().expect("nodes");
    assert_eq!(
        nodes.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(),
        ["node-b"]
    );
    let cb = b.claim(claim_req(10, 1)).await.expect("claim b");
    let mut got: Vec<i64> = cb.iter().map(|c| c.row.id).collect();
    got.sort();
    let mut want: Vec<i64> = ca.iter().map(|c| c.row.id).collect();
    want.sort();
    assert_eq!(got, want, "a's claimed rows went to b at once");
    let s = a.settle(deliver_all(&ca)).await.expect("settle a");
    assert_eq!(
        (s.stale, s.delivered),
        (2, 0),
        "the dead node's settle is stale"
    );
    let s = b.settle(deliver_all(&cb)).await.expect("settle b");
    assert_eq!(s.delivered, 2);

    // a comes back: its beat says it was found dead, and it is a member again
    let back = a.heartbeat(60_000).await.expect("beat a");
    assert!(!back.was_alive, "a learns it was found dead");
    assert_eq!(b.read().nodes().expect("nodes").len(), 2);
    a.leave().await.expect("leave");
    let nodes = b.read().nodes().expect("nodes");
    assert_eq!(
        nodes.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(),
        ["node-b"]
    );
    drop(b);
    // a hub starting drops its own stale row
    let b = db.open("node-b", PgRole::Hub);
    assert!(b.read().nodes().expect("nodes").is_empty());
}

fn topic_entry(id: String) -> TopicEntry {
    TopicEntry {
        payload: format!("{{\"id\":\"{id}\"}}"),
        correlation_id: format!("c-{id}"),
        causation_id: id.clone(),
        id,
        entity_key: None,
        flow: "publisher".into(),
        event_time: now_ms(),
        traceparent: None,
        tracestate: None,
    }
}

/// Two nodes publish to one topic at once while a third reads after its
/// position as a subscriber does: the reader never finds a message below a
/// sequence it has passed (sequences are taken under the topic's advisory
/// lock, after the appends before them committed), so it reads every
/// message, each once and in each publisher's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_never_commit_behind_a_reader() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let a = Arc::new(db.open("node-a", PgRole::Hub));
    let b = Arc::new(db.open("node-b", PgRole::Hub));
    let c = Arc::new(db.open("node-c", PgRole::Hub));
    const BATCHES: usize = 150;
    const PER_BATCH: usize = 3;
    let publisher = |j: Arc<PgJournal>, name: &'static str| {
        tokio::spawn(async move {
            for i in 0..BATCHES {
                let entries = (0..PER_BATCH)
                    .map(|n| topic_entry(format!("{name}-{i:04}-{n}")))
                    .collect();
                let p = j.publish("t".into(), entries).await.expect("publish");
                assert_eq!(p.appended, PER_BATCH);
            }
        })
    };
    let pa = publisher(a.clone(), "a");
    let pb = publisher(b.clone(), "b");
    let total = 2 * BATCHES * PER_BATCH;
    let mut read: Vec<String> = Vec::new();
    let mut after = 0;
    loop {
        let done = pa.is_finished() && pb.is_finished();
        let page = {
            let c = c.clone();
            tokio::task::spawn_blocking(move || c.read().topic_read("t", after, 7))
                .await
                .expect("reader")
                .expect("topic_read")
        };
        if let Some(last) = page.last() {
            after = last.seq;
        } else if done {
            break;
        } else {
            tokio::task::yield_now().await;
        }
        read.extend(page.into_iter().map(|m| m.entry.id));
    }
    pa.await.expect("publisher a");
    pb.await.expect("publisher b");
    assert_eq!(read.len(), total, "every message read once");
    let distinct: std::collections::HashSet<&String> = read.iter().collect();
    assert_eq!(distinct.len(), total);
    for name in ["a-", "b-"] {
        let mine: Vec<&String> = read.iter().filter(|id| id.starts_with(name)).collect();
        let mut sorted = mine.clone();
        sorted.sort();
        assert_eq!(mine, sorted, "{name} messages out of their publish order");
    }
}

fn customer_rules() -> Arc<weft_core::identity::Rules> {
    use weft_core::identity::{ConflictPolicy, NonOwnerPolicy, Route, Rules};
    Arc::new(Rules {
        entity: "customer".into(),
        create: Some(vec!["crm".into(), "erp".into()]),
        owners: BTreeMap::from([("*".into(), vec!["crm".into(), "erp".into()])]),
        conflict: ConflictPolicy::LastWriteWins,
        non_owner: NonOwnerPolicy::Drop,
        match_keys: vec!["email".into()],
        fuzzy: None,
        routes: vec![Route {
            flow: "crm_customers".into(),
            destination: "wh".into(),
        }],
    })
}

/// A report of system `system`'s customer `id` with `email`.
fn report(system: &str, id: &str, email: &str) -> IngestBatch {
    let rules = customer_rules();
    let mut e = event(&format!("{system}-{id}"), None);
    let fields = serde_json::json!({"name": format!("Customer {id}"), "email": email});
    e.outcomes = vec![FlowOutcome::Canonical {
        flow: format!("{system}_customers"),
        report: Box::new(CanonicalReport {
            rules,
            external_id: id.into(),
            fields: fields.as_object().cloned().unwrap_or_default(),
            changed_at: None,
        }),
    }];
    batch(system, vec![e])
}

/// Two journals (nodes) merge reports of the same customers at the same
/// instant: the CRM's report of customer i on one, the ERP's on the other.
/// The entity lock makes the second merge see the first's record (by its
/// match key): one record per customer, holding both ids, one row for the
/// warehouse each. Then the warehouse's writes settle (intent first, as a
/// lane does): each record links the id the warehouse gave, on either node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_journals_merging_one_customers_reports_make_one_record() {
    if !pg::available() {
        return;
    }
    let db = pg::Database::create();
    let a = Arc::new(db.open("node-a", PgRole::Hub));
    let b = Arc::new(db.open("node-b", PgRole::Hub));
    const N: usize = 40;
    let gate = Arc::new(tokio::sync::Barrier::new(2));
    let merger = |j: Arc<PgJournal>, system: &'static str, gate: Arc<tokio::sync::Barrier>| {
        tokio::spawn(async move {
            for i in 0..N {
                gate.wait().await;
                let id = format!("{}{i}", &system[..1].to_uppercase());
                j.ingest(report(system, &id, &format!("c{i}@example.com")))
                    .await
                    .expect("ingest");
            }
        })
    };
    let ta = merger(a.clone(), "crm", gate.clone());
    let tb = merger(b.clone(), "erp", gate);
    ta.await.expect("crm reports");
    tb.await.expect("erp reports");

    let r = a.read();
    let ids = r.canonical_list(Some("customer"), 10_000).expect("list");
    assert_eq!(ids.len(), N, "one record per customer: {ids:?}");
    for (entity, id) in &ids {
        let v = r.canonical(entity, id).expect("view").expect("the record");
        let email = v.state["email"].as_str().expect("email").to_owned();
        let i = email
            .trim_start_matches('c')
            .trim_end_matches("@example.com");
        let links: BTreeMap<&str, Option<&str>> = v
            .links
            .iter()
            .map(|l| (l.system.as_str(), l.external_id.as_deref()))
            .collect();
        assert_eq!(
            links.get("crm"),
            Some(&Some(format!("C{i}").as_str())),
            "{v:?}"
        );
        assert_eq!(
            links.get("erp"),
            Some(&Some(format!("E{i}").as_str())),
            "{v:?}"
        );
        assert_eq!(
            r.canonical_by_external("customer", "erp", &format!("E{i}"))
                .expect("by external")
                .as_deref(),
            Some(id.as_str())
        );
    }
    let summary = r.identity_summary().expect("summary");
    assert_eq!(summary.len(), 1, "{summary:?}");
    assert_eq!(summary[0].records, N as i64);
    assert_eq!(summary[0].actions.get("created"), Some(&(N as i64)));
    assert_eq!(summary[0].actions.get("linked"), Some(&(N as i64)));

    // the warehouse's lane: one row per record (the second report changed
    // nothing); written, with the id the warehouse gave
    let lane = LaneId::new("crm_customers", "wh");
    let claimed = b
        .claim(ClaimRequest {
            lane: lane.clone(),
            max: 1000,
            per_key: 1,
            lease: LEASE,
        })
        .await
        .expect("claim");
    assert_eq!(claimed.len(), N, "one row per record");
    let writes: Vec<CanonicalWritten> = claimed
        .iter()
        .map(|c| {
            let p: serde_json::Value = serde_json::from_str(&c.row.payload).expect("payload");
            let cid = p["canonical_id"].as_str().expect("canonical id").to_owned();
            let state = r
                .canonical("customer", &cid)
                .expect("view")
                .expect("record")
                .state;
            CanonicalWritten {
                entity: "customer".into(),
                canonical_id: cid,
                base: serde_json::Value::Object(state).to_string(),
                fingerprint: "f".into(),
            }
        })
        .collect();
    b.canonical_intent("wh".into(), writes.clone())
        .await
        .expect("intent");
    let settle = Settle {
        items: claimed
            .iter()
            .zip(&writes)
            .map(|(c, w)| Settlement {
                id: c.row.id,
                token: c.token,
                attempt: None,
                outcome: Outcome::Delivered(WriteOutcome {
                    external_id: Some(format!("W-{}", w.canonical_id)),
                    canonical: Some(w.clone()),
                    ..WriteOutcome::default()
                }),
            })
            .collect(),
        follow_ups: Vec::new(),
    };
    assert_eq!(b.settle(settle).await.expect("settle").delivered, N);
    for w in &writes {
        let v = a
            .read()
            .canonical("customer", &w.canonical_id)
            .expect("view")
            .expect("record");
        let wh = v.links.iter().find(|l| l.system == "wh").expect("wh link");
        assert_eq!(wh.external_id, Some(format!("W-{}", w.canonical_id)));
        assert_eq!(wh.fingerprint.as_deref(), Some("f"));
        assert!(wh.written.is_some(), "the intent is outstanding: {wh:?}");
    }
    let counts = a.read().counts(&[lane]).expect("counts");
    let c = counts
        .iter()
        .find(|c| c.destination == "wh")
        .expect("lane counts");
    // the flow's counts (its reports, filtered: they end in the records)
    // and the lane's (the rows they caused, delivered)
    assert_eq!(
        (c.received, c.filtered, c.delivered, c.pending),
        (2 * N as i64, N as i64, N as i64, 0)
    );
    assert!(counts.iter().all(|c| c.balanced), "{counts:?}");
}
