//! Guarantee: kill -9 at any moment loses no accepted event, and no
//! destination receives one event under two different idempotency keys.
//!
//! Webhooks in (4 client threads, each owning a set of entity keys so the
//! order per key is defined), HTTP sink out to a real recording server,
//! `weft` SIGKILLed several times mid-stream and restarted on the same store
//! and port. Clients retry on connection errors and 503, like real senders.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "crash-test-secret";

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
        secret: ${{HOOK_SECRET}}
  api:
    sink:
      http:
        url: {recorder}/contacts/{{id}}
        timeout: 5s
flows:
  contacts:
    from: crm
    key: .id | tostring
    mapping: '{{id, seq, name: "contact \(.id)"}}'
    to: [api]
    delivery:
      concurrency: 8
      initial_backoff: 20ms
      max_backoff: 500ms
      max_attempts: 1000
"#
    )
}

fn run_crash_test(events: usize, kill_points: Vec<usize>) {
    let kills = kill_points.len();
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    std::fs::write(dir.path().join("weft.yaml"), config(&recorder.url())).unwrap();
    let port = free_port();
    let env = [("HOOK_SECRET", SECRET)];
    let mut hub = Some(Hub::start(dir.path(), "weft.yaml", port, &env));
    let url = format!("http://127.0.0.1:{port}/hooks/crm");

    let accepted = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let threads = 4;
    let mut clients = Vec::new();
    for t in 0..threads {
        let url = url.clone();
        let accepted = accepted.clone();
        clients.push(std::thread::spawn(move || {
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut mine = Vec::new();
            for seq in (t..events).step_by(threads) {
                // keys 0..200, each owned by one thread: order per key is this thread's order
                let id = (seq / threads) % 50 * threads + t;
                let body = serde_json::json!({"id": id, "seq": seq}).to_string();
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-event-id", format!("evt-{seq}"))
                        .header("x-signature-256", sign(SECRET, body.as_bytes()))
                        .body(body.clone())
                        .send();
                    match r {
                        Ok(resp) if resp.status().as_u16() == 202 => break,
                        Ok(resp) if resp.status().as_u16() == 503 => {}
                        Ok(resp) => panic!("unexpected status {} for seq {seq}", resp.status()),
                        Err(_) => {} // weft is down or was killed mid-request: retry, as senders do
                    }
                    assert!(Instant::now() < deadline, "seq {seq} never accepted");
                    std::thread::sleep(Duration::from_millis(20));
                }
                mine.push((seq, id));
                accepted.fetch_add(1, Ordering::SeqCst);
            }
            mine
        }));
    }

    for at in kill_points {
        wait_for(Duration::from_secs(120), "clients to make progress", || {
            accepted.load(Ordering::SeqCst) >= at
        });
        hub.take().unwrap().kill9();
        hub = Some(Hub::start(dir.path(), "weft.yaml", port, &env));
    }
    let mut sent: Vec<(usize, usize)> = Vec::new();
    for c in clients {
        sent.extend(c.join().unwrap());
    }
    done.store(true, Ordering::SeqCst);
    assert_eq!(sent.len(), events);

    // everything accepted is delivered
    wait_for(
        Duration::from_secs(120),
        "every accepted event to be delivered",
        || {
            let got: HashSet<u64> = recorder
                .received
                .lock()
                .unwrap()
                .iter()
                .filter_map(|r| r.body["seq"].as_u64())
                .collect();
            got.len() == events
        },
    );
    let received = recorder.received.lock().unwrap().clone();
    let mut keys: HashMap<u64, HashSet<String>> = HashMap::new();
    let mut order: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for r in &received {
        let seq = r.body["seq"].as_u64().unwrap();
        let id = r.body["id"].as_u64().unwrap();
        assert_eq!(r.path, format!("/contacts/{id}"));
        let key = r
            .idempotency_key
            .clone()
            .expect("every write carries an idempotency key");
        keys.entry(seq).or_default().insert(key);
        assert!(
            r.correlation_id.is_some(),
            "every write carries a correlation id"
        );
        let o = order.entry(id).or_default();
        if !o.contains(&seq) {
            o.push(seq);
        }
    }
    let split: Vec<_> = keys.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(
        split.is_empty(),
        "events delivered under several idempotency keys: {split:?}"
    );
    for (id, seqs) in &order {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {id} delivered out of order: {seqs:?}"
        );
    }
    let redelivered = received.len() - events;

    // the store's accounting agrees
    let hub = hub.take().unwrap();
    let st = status(dir.path(), "weft.yaml", &env);
    let lane = &st["lanes"][0];
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(lane["received"], events as u64, "{st}");
    assert_eq!(lane["delivered"], events as u64, "{st}");
    assert_eq!(lane["pending"], 0, "{st}");
    assert!(hub.stop().success());
    eprintln!(
        "crash test: {events} events, {kills} SIGKILLs, 0 lost, 0 under two keys, {redelivered} redelivered with the same key"
    );
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_keeps_idempotency_keys() {
    run_crash_test(3000, vec![750, 1500, 2250]);
}

/// The torture version: 20,000 events, SIGKILL at 10 random moments.
#[test]
fn torture_twenty_thousand_events_ten_random_sigkills() {
    let events = 20_000;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(42);
    eprintln!("torture seed {seed}");
    // a small LCG is enough to scatter the kill points
    let mut x = seed | 1;
    let mut points: Vec<usize> = (0..10)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            500 + (x >> 33) as usize % (events - 1000)
        })
        .collect();
    points.sort();
    run_crash_test(events, points);
}
