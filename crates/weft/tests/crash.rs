//! Guarantee: kill -9 at any moment loses no accepted event, no destination
//! receives one event under two different idempotency keys, and no
//! destination ever receives an older version of a record after a newer one
//! (the whole write sequence per key is checked, redeliveries included).
//!
//! Webhooks in on two sources (a CRM and an ERP, two flows writing the same
//! entity of one destination: their rows share each key's queue), 4 client
//! threads each owning a set of entity keys so the order per key is
//! defined, HTTP sink out to a real recording server that refuses some
//! records (they are dead-lettered, later ones of the key go on), `weft`
//! SIGKILLed several times mid-stream and restarted on the same store and
//! port, then a DLQ replay of everything beside the running hub and one more
//! SIGKILL: entries older than a delivered write of their key are refused,
//! the others delivered in their place. Clients retry on connection errors
//! and 503, like real senders.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "crash-test-secret";

fn config(recorder: &str) -> String {
    let flow = |name: &str, from: &str| {
        format!(
            r#"
  {name}:
    from: {from}
    key: .id | tostring
    mapping: '{{id, seq, name: "contact \(.id)", fail: (.seq % 53 == 7)}}'
    to: [api]
    delivery:
      concurrency: 8
      initial_backoff: 20ms
      max_backoff: 500ms
      max_attempts: 1000
"#
        )
    };
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
  erp:
    source:
      webhook:
        path: /hooks/erp
        secret: ${{HOOK_SECRET}}
  api:
    sink:
      http:
        url: {recorder}/contacts/{{id}}
        timeout: 5s
flows:{}{}"#,
        flow("crm_contacts", "crm"),
        flow("erp_contacts", "erp")
    )
}

/// Records the destination refuses (400) while the stream runs.
fn refused(seq: usize) -> bool {
    seq % 53 == 7
}

fn run_crash_test(events: usize, kill_points: Vec<usize>) {
    let kills = kill_points.len() + 1;
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    recorder.set(FAIL_MARKED);
    std::fs::write(dir.path().join("weft.yaml"), config(&recorder.url())).unwrap();
    let port = free_port();
    let env = [("HOOK_SECRET", SECRET)];
    let mut hub = Some(Hub::start(dir.path(), "weft.yaml", port, &env));
    let base = format!("http://127.0.0.1:{port}/hooks");

    let accepted = Arc::new(AtomicUsize::new(0));
    let threads = 4;
    let mut clients = Vec::new();
    for t in 0..threads {
        let base = base.clone();
        let accepted = accepted.clone();
        clients.push(std::thread::spawn(move || {
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut mine = Vec::new();
            for seq in (t..events).step_by(threads) {
                // keys 0..200, each owned by one thread: order per key is this
                // thread's order, whichever source an event goes through
                let id = (seq / threads) % 50 * threads + t;
                let source = if (seq / threads) % 3 == 0 {
                    "erp"
                } else {
                    "crm"
                };
                let url = format!("{base}/{source}");
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
    assert_eq!(sent.len(), events);
    let key_of: HashMap<usize, usize> = sent.iter().copied().collect();

    // every accepted event the destination takes is delivered
    let delivered_seqs = |r: &Recorder| -> HashSet<u64> {
        r.received
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| r.body["seq"].as_u64())
            .collect()
    };
    let taken = (0..events).filter(|s| !refused(*s)).count();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let got = delivered_seqs(&recorder);
        if got.len() == taken {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<usize> = (0..events)
                .filter(|s| !refused(*s) && !got.contains(&(*s as u64)))
                .take(20)
                .collect();
            let st = status(dir.path(), "weft.yaml", &env);
            let log = hub.as_ref().map(|h| h.log_text()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{} of {taken} delivered after 300s; missing e.g. {missing:?}\nstatus: {st}\nlog (newest first):\n{}",
                got.len(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // the refused ones are dead letters; the destination takes them now
    let dead = (0..events).filter(|s| refused(*s)).count();
    wait_for(Duration::from_secs(60), "the dead letters", || {
        let st = status(dir.path(), "weft.yaml", &env);
        st["dlq_depth"].as_u64() == Some(dead as u64)
    });
    recorder.set(OK);
    // a refused record is replayable only when no later write of its key was
    // delivered: the ones after the last accepted record of their key
    let last_taken: HashMap<usize, usize> =
        sent.iter()
            .filter(|(s, _)| !refused(*s))
            .fold(HashMap::new(), |mut m, (s, id)| {
                let e = m.entry(*id).or_insert(*s);
                *e = (*e).max(*s);
                m
            });
    let replayable: HashSet<usize> = sent
        .iter()
        .filter(|(s, id)| refused(*s) && last_taken.get(id).is_none_or(|l| s > l))
        .map(|(s, _)| *s)
        .collect();
    let out = weft_cmd_env(
        dir.path(),
        &["dlq", "replay", "-c", "weft.yaml", "--all"],
        &env,
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!("{} of {dead} replayed", replayable.len())),
        "replay: {text}"
    );
    assert_eq!(
        text.matches("already delivered").count(),
        dead - replayable.len(),
        "every other entry is refused as superseded: {text}"
    );
    // and one more crash while the replayed rows go out
    hub.take().unwrap().kill9();
    let hub = Hub::start(dir.path(), "weft.yaml", port, &env);
    wait_for(Duration::from_secs(60), "the replayed rows", || {
        let got = delivered_seqs(&recorder);
        replayable.iter().all(|s| got.contains(&(*s as u64)))
    });
    // the destination has them; the hub settles them a moment later (or,
    // after a crash between write and settle, writes them again first):
    // wait for the store to say so before comparing
    wait_for(Duration::from_secs(60), "the replayed rows settled", || {
        let st = status(dir.path(), "weft.yaml", &env);
        st["lanes"].as_array().is_some_and(|ls| {
            ls.iter().all(|l| l["pending"].as_u64() == Some(0))
                && ls
                    .iter()
                    .filter_map(|l| l["delivered"].as_u64())
                    .sum::<u64>()
                    == (taken + replayable.len()) as u64
        })
    });

    let received = recorder.received.lock().unwrap().clone();
    let mut keys: HashMap<u64, HashSet<String>> = HashMap::new();
    let mut writes: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for r in &received {
        let seq = r.body["seq"].as_u64().unwrap();
        let id = r.body["id"].as_u64().unwrap();
        assert_eq!(r.path, format!("/contacts/{id}"));
        assert_eq!(key_of[&(seq as usize)] as u64, id);
        let key = r
            .idempotency_key
            .clone()
            .expect("every write carries an idempotency key");
        keys.entry(seq).or_default().insert(key);
        assert!(
            r.correlation_id.is_some(),
            "every write carries a correlation id"
        );
        writes.entry(id).or_default().push(seq);
    }
    let split: Vec<_> = keys.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(
        split.is_empty(),
        "events delivered under several idempotency keys: {split:?}"
    );
    // the whole write sequence per key, redeliveries included: a redelivery
    // repeats the last write, it never comes after a newer one
    for (id, seqs) in &writes {
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "key {id} received an older version after a newer one: {seqs:?}"
        );
    }
    let redelivered = received.len() - taken - replayable.len();

    // the store's accounting agrees
    let st = status(dir.path(), "weft.yaml", &env);
    assert_eq!(st["balanced"], true, "{st}");
    let lanes = st["lanes"].as_array().unwrap();
    let sum = |k: &str| lanes.iter().map(|l| l[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("received"), events as u64, "{st}");
    assert_eq!(sum("delivered"), (taken + replayable.len()) as u64, "{st}");
    assert_eq!(
        sum("dead_lettered"),
        (dead - replayable.len()) as u64,
        "{st}"
    );
    assert_eq!(sum("pending"), 0, "{st}");
    assert!(hub.stop().success());
    eprintln!(
        "crash test: {events} events through 2 flows, {kills} SIGKILLs, 0 lost, 0 under two keys, 0 out of order, {redelivered} redelivered with the same key, {} replayed, {} replays refused over newer writes",
        replayable.len(),
        dead - replayable.len()
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

/// The direct path (`ingest::DirectLane`): a file source's keyless rows to a
/// SQL upsert are written before their ingest commits and counted delivered
/// by it, without an outbox row. SIGKILLed again and again mid-load, then
/// run to the end: every record is in the table with its values, none
/// counted twice (received = the file's lines = delivered + dead-lettered,
/// nothing pending), the ledger balanced, and the rows the destination
/// refuses (a text in an integer column) reach the DLQ through the outbox.
#[test]
fn a_direct_file_load_survives_sigkills_and_counts_each_record_once() {
    let n: usize = 60_000;
    let bad = |seq: usize| seq % 997 == 5;
    let dir = tempfile::tempdir().unwrap();
    let mut input = String::with_capacity(n * 40);
    for seq in 0..n {
        input.push_str(&format!(
            "{{\"id\": {}, \"seq\": {seq}, \"name\": \"contact {seq}\"}}\n",
            (seq * 7919) % n + 1
        ));
    }
    std::fs::write(dir.path().join("contacts.jsonl"), input).unwrap();
    let config = r#"
store:
  path: data/weft.db
systems:
  crm:
    source:
      file:
        path: contacts.jsonl
        format: jsonl
        batch_size: 500
        id_field: .id
  warehouse:
    sink:
      sqlite:
        path: out/warehouse.db
        table: contacts
        key: [id]
        columns:
          id: integer
          seq: integer
          name: text
flows:
  contacts:
    from: crm
    mapping: '{id, seq: (if .seq % 997 == 5 then "bad" else .seq end), name}'
    to: [warehouse]
    delivery:
      batch_size: 200
      concurrency: 2
      initial_backoff: 10ms
      max_backoff: 20ms
      max_attempts: 2
"#;
    std::fs::write(dir.path().join("weft.yaml"), config).unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let db = dir.path().join("out/warehouse.db");
    let loaded = || -> usize {
        if !db.exists() {
            return 0;
        }
        rusqlite::Connection::open(&db)
            .and_then(|c| c.query_row("SELECT count(*) FROM contacts", [], |r| r.get::<_, i64>(0)))
            .map(|c| c as usize)
            .unwrap_or(0)
    };
    let good = (0..n).filter(|s| !bad(*s)).count();
    // kill while less than 80% is in (the kills land mid-load), 40 times at most
    let rounds = AtomicUsize::new(0);
    let (kills, _) = kill_while(dir.path(), "weft.yaml", &[], || {
        rounds.fetch_add(1, Ordering::SeqCst) < 40 && loaded() < good * 4 / 5
    });
    assert!(kills >= 1, "the load was killed at least once");
    let out = weft_cmd(dir.path(), &["run", "weft.yaml", "--until-idle"]);
    assert!(
        out.status.success(),
        "the last run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows: Vec<(i64, i64, String)> = conn
        .prepare("SELECT id, seq, name FROM contacts ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows.len(),
        good,
        "every record the table accepts is in it once"
    );
    for (id, seq, name) in &rows {
        let seq = *seq as usize;
        assert_eq!(((seq * 7919) % n + 1) as i64, *id, "record {seq}");
        assert_eq!(name, &format!("contact {seq}"));
        assert!(!bad(seq));
    }
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    let lane = &st["lanes"][0];
    assert_eq!(lane["received"], n as u64, "each line counted once: {st}");
    assert_eq!(lane["delivered"], good as u64, "{st}");
    assert_eq!(lane["dead_lettered"], (n - good) as u64, "{st}");
    assert_eq!(lane["pending"], 0, "{st}");
    eprintln!(
        "direct file load: {n} records, {kills} SIGKILLs, {good} in the table once each, {} dead-lettered",
        n - good
    );
}
