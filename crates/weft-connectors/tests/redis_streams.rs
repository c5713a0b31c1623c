//! The `redis` source and sink against the real Redis on 127.0.0.1:6379
//! (`.ci/services.sh` starts it). Every test uses keys of its own (unique
//! names) and deletes them at the end. Skipped with a message when the
//! server is not reachable, unless `CI=true`, where that is a failure.
#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Value};
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;
use weft_connectors::broker::redis::{RedisSink, RedisSinkConfig, RedisSource, RedisSourceConfig};
use weft_connectors::sink::DeliveryContext;
use weft_connectors::{
    BadRecord, Batch, Delivery, Ingest, IngestError, Receipt, Record, Sink, Source,
};
use weft_core::ErrorKind;
use weft_core::Event;
use weft_core::config::raw::ConnectorSettings;

const URL: &str = "redis://127.0.0.1:6379";

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A connection to the machine's Redis, or `None` (skip) when it is not
/// there.
async fn server() -> Option<MultiplexedConnection> {
    let c = redis::Client::open(URL).unwrap();
    match tokio::time::timeout(Duration::from_secs(3), c.get_multiplexed_async_connection()).await {
        Ok(Ok(c)) => Some(c),
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            if ci() {
                panic!("Redis at {URL} is not reachable and CI=true: {why}");
            }
            eprintln!("SKIPPED: Redis at {URL} is not reachable ({why}); run .ci/services.sh");
            None
        }
    }
}

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!(
        "weft-test:{prefix}:{:x}",
        t ^ ((std::process::id() as u64) << 40)
    )
}

/// Keys (and key patterns, `*`) deleted when the test ends, also when it
/// fails.
struct Keys(Vec<String>);

impl Drop for Keys {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut self.0);
        // a connection of its own: the test's runtime is blocked here
        let _ = std::thread::spawn(move || {
            let Ok(mut c) = redis::Client::open(URL).and_then(|c| c.get_connection()) else {
                return;
            };
            for k in keys {
                let names: Vec<String> = if k.contains('*') {
                    redis::cmd("KEYS").arg(&k).query(&mut c).unwrap_or_default()
                } else {
                    vec![k]
                };
                for n in names {
                    let _: Result<i64, _> = redis::cmd("DEL").arg(&n).query(&mut c);
                }
            }
        })
        .join();
    }
}

/// An [`Ingest`] that keeps what it is given, and fails while `failing`.
#[derive(Default)]
struct Mem {
    events: Mutex<Vec<Event>>,
    bad: Mutex<Vec<BadRecord>>,
    batches: Mutex<usize>,
    failing: AtomicBool,
    attempts: AtomicUsize,
}

impl Ingest for Mem {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(IngestError::Store("disk on fire".into()));
            }
            *self.batches.lock().unwrap() += 1;
            let mut r = Receipt::default();
            for rec in batch.records {
                r.accepted += 1;
                match rec {
                    Record::Good(e) => self.events.lock().unwrap().push(e),
                    Record::Bad(b) => self.bad.lock().unwrap().push(b),
                }
            }
            Ok(r)
        })
    }
    fn checkpoint(&self, _: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
        Box::pin(async { Ok(None) })
    }
}

impl Mem {
    fn count(&self) -> usize {
        self.events.lock().unwrap().len() + self.bad.lock().unwrap().len()
    }
    fn ids(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.id.clone())
            .collect()
    }
}

fn source_cfg(v: Json) -> RedisSourceConfig {
    RedisSourceConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

/// Run a source until the returned token is cancelled; the handle gives
/// its result.
fn spawn(
    cfg: RedisSourceConfig,
    ingest: Arc<Mem>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), weft_connectors::SourceError>>,
) {
    let stop = CancellationToken::new();
    let src: Box<dyn Source> = Box::new(RedisSource::new("bus", cfg));
    let h = tokio::spawn(src.run(ingest, stop.clone()));
    (stop, h)
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Add an entry with `fields`; its id.
async fn xadd(c: &mut MultiplexedConnection, stream: &str, fields: &[(&str, &[u8])]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(c).await.unwrap()
}

/// How many entries the group's consumers hold unacknowledged.
async fn pending(c: &mut MultiplexedConnection, stream: &str, group: &str) -> i64 {
    let v: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(c)
        .await
        .unwrap();
    match v {
        Value::Array(a) => match a.first() {
            Some(Value::Int(n)) => *n,
            _ => panic!("{a:?}"),
        },
        other => panic!("{other:?}"),
    }
}

/// `(entry id, consumer, idle ms)` of every pending entry.
async fn pending_detail(
    c: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Vec<(String, String, i64)> {
    let v: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(1000)
        .query_async(c)
        .await
        .unwrap();
    v.into_iter()
        .map(|(id, c, idle, _)| (id, c, idle))
        .collect()
}

async fn wait_pending(c: &mut MultiplexedConnection, stream: &str, group: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = pending(c, stream, group).await;
        if p == n {
            return;
        }
        assert!(Instant::now() < deadline, "{p} pending, not {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn source_reads_acks_after_ingest_and_sends_bad_entries_to_the_dlq() {
    let Some(mut c) = server().await else { return };
    let stream = unique("src");
    let _keys = Keys(vec![stream.clone()]);
    // the source creates the group and the stream itself
    let cfg = source_cfg(json!({
        "url": URL, "stream": stream, "batch": 16, "max_message_bytes": 512, "block": "200ms"
    }));
    let group = cfg.group.clone();
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(cfg, mem.clone());
    let created = Instant::now();
    loop {
        let ty: String = redis::cmd("TYPE")
            .arg(&stream)
            .query_async(&mut c)
            .await
            .unwrap();
        if ty == "stream" {
            break;
        }
        assert!(
            created.elapsed() < Duration::from_secs(10),
            "stream not created"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ids = Vec::new();
    for i in 0..40 {
        let body = json!({"n": i}).to_string();
        ids.push(xadd(&mut c, &stream, &[("data", body.as_bytes())]).await);
    }
    let not_json = xadd(&mut c, &stream, &[("data", b"{\"n\": tru")]).await;
    let big = xadd(&mut c, &stream, &[("data", &[b' '; 600])]).await;
    let no_field = xadd(&mut c, &stream, &[("payload", b"{}"), ("x", b"1")]).await;
    let ce = xadd(
        &mut c,
        &stream,
        &[
            ("data", b"{\"id\": 7}"),
            ("ce_id", b"evt-1"),
            ("ce_source", b"/crm"),
            ("ce_type", b"crm.customer.created"),
            ("ce_time", b"2026-03-01T10:00:00Z"),
            ("x-correlation-id", b"corr-7"),
            (
                "traceparent",
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
    )
    .await;
    wait_until("44 records", Duration::from_secs(10), || mem.count() >= 44).await;
    // every entry acked once stored, the bad ones too
    wait_pending(&mut c, &stream, &group, 0).await;
    stop.cancel();
    h.await.unwrap().unwrap();

    let events = mem.events.lock().unwrap().clone();
    let bad = mem.bad.lock().unwrap().clone();
    assert_eq!(events.len(), 41, "{bad:?}");
    assert_eq!(bad.len(), 3);
    // ids are stream positions, in order
    for (i, e) in events.iter().take(40).enumerate() {
        assert_eq!(e.id, format!("{stream}:{}", ids[i]));
        assert_eq!(e.data, json!({"n": i}));
        assert_eq!(e.subject.as_deref(), Some(stream.as_str()));
        assert_eq!(e.ty, "bus.message");
        assert_eq!(e.source, "weft:bus/redis");
    }
    let where_ = |id: &str| format!("redis stream {stream} entry {id}");
    assert_eq!(bad[0].id, format!("{stream}:{not_json}"));
    assert_eq!(bad[0].location, where_(&not_json));
    assert!(
        bad[0].error.starts_with(&where_(&not_json)),
        "{}",
        bad[0].error
    );
    assert!(bad[0].error.contains("not JSON"), "{}", bad[0].error);
    assert_eq!(bad[0].raw, "{\"n\": tru");
    assert_eq!(bad[1].id, format!("{stream}:{big}"));
    assert!(
        bad[1]
            .error
            .contains("600 bytes is over max_message_bytes (512)"),
        "{}",
        bad[1].error
    );
    assert_eq!(bad[2].id, format!("{stream}:{no_field}"));
    assert!(
        bad[2].error.contains("no `data` field") && bad[2].error.contains("payload"),
        "{}",
        bad[2].error
    );
    assert_eq!(
        serde_json::from_str::<Json>(&bad[2].raw).unwrap(),
        json!({"payload": "{}", "x": "1"})
    );
    // CloudEvents attributes in the fields become the event's
    let e = &events[40];
    assert_eq!(e.id, "/crm#evt-1");
    assert_eq!(e.source, "/crm");
    assert_eq!(e.ty, "crm.customer.created");
    assert_eq!(e.time.to_rfc3339(), "2026-03-01T10:00:00+00:00");
    assert_eq!(e.correlationid, "corr-7");
    assert_eq!(
        e.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert!(!ce.is_empty());
}

#[tokio::test]
async fn a_batch_the_store_refuses_is_held_pending_and_kept_fresh_then_stored_once() {
    let Some(mut c) = server().await else { return };
    let stream = unique("hold");
    let _keys = Keys(vec![stream.clone()]);
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({"n": i}).to_string();
        ids.push(xadd(&mut c, &stream, &[("data", body.as_bytes())]).await);
    }
    let mem = Arc::new(Mem::default());
    mem.failing.store(true, Ordering::SeqCst);
    // claim_idle 1 s: without the refreshes the entries would be idle
    // for longer than that during the 2.5 s the store refuses
    let cfg = source_cfg(json!({
        "url": URL, "stream": stream, "group": "held", "claim_idle": "1s", "block": "200ms"
    }));
    let (stop, h) = spawn(cfg, mem.clone());
    wait_until("three refused attempts", Duration::from_secs(10), || {
        mem.attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let held = pending_detail(&mut c, &stream, "held").await;
        assert_eq!(held.len(), 5, "held, not acked: {held:?}");
        assert!(
            held.iter()
                .all(|(_, who, idle)| who == "weft" && *idle < 1000),
            "kept fresh: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mem.count(), 0);
    mem.failing.store(false, Ordering::SeqCst);
    wait_until("the held batch", Duration::from_secs(10), || {
        mem.count() == 5
    })
    .await;
    wait_pending(&mut c, &stream, "held", 0).await;
    assert_eq!(*mem.batches.lock().unwrap(), 1);
    assert_eq!(
        mem.ids(),
        ids.iter()
            .map(|i| format!("{stream}:{i}"))
            .collect::<Vec<_>>()
    );
    stop.cancel();
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn entries_a_source_read_before_it_died_are_read_again_with_the_same_ids() {
    let Some(mut c) = server().await else { return };
    let stream = unique("redel");
    let _keys = Keys(vec![stream.clone()]);
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = json!({"n": i}).to_string();
        ids.push(xadd(&mut c, &stream, &[("data", body.as_bytes())]).await);
    }
    let settings = json!({"url": URL, "stream": stream, "group": "g", "block": "200ms"});
    // the first source's store never takes the batch; the source is then
    // dropped without a shutdown (as if the process died)
    let first = Arc::new(Mem::default());
    first.failing.store(true, Ordering::SeqCst);
    let (_stop, h) = spawn(source_cfg(settings.clone()), first.clone());
    wait_until("a refused attempt", Duration::from_secs(10), || {
        first.attempts.load(Ordering::SeqCst) >= 1
    })
    .await;
    h.abort();
    let _ = h.await;
    assert_eq!(pending(&mut c, &stream, "g").await, 3);
    // a later entry: read after the pending ones
    let later = xadd(&mut c, &stream, &[("data", b"{\"n\": 3}")]).await;
    let second = Arc::new(Mem::default());
    let (stop, h) = spawn(source_cfg(settings), second.clone());
    wait_until(
        "the pending entries and the new one",
        Duration::from_secs(10),
        || second.count() == 4,
    )
    .await;
    let mut want: Vec<String> = ids.iter().map(|i| format!("{stream}:{i}")).collect();
    want.push(format!("{stream}:{later}"));
    assert_eq!(second.ids(), want);
    wait_pending(&mut c, &stream, "g", 0).await;
    stop.cancel();
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn entries_a_dead_consumer_held_are_claimed_after_claim_idle() {
    let Some(mut c) = server().await else { return };
    let stream = unique("claim");
    let _keys = Keys(vec![stream.clone()]);
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        let body = json!({"n": i}).to_string();
        ids.push(xadd(&mut c, &stream, &[("data", body.as_bytes())]).await);
    }
    // another weft (consumer `dead`) reads all four and dies holding them
    let v: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("dead")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(matches!(v, Value::Array(_)), "{v:?}");
    let held = pending_detail(&mut c, &stream, "g").await;
    assert!(held.iter().all(|(_, who, _)| who == "dead"), "{held:?}");
    let mem = Arc::new(Mem::default());
    let cfg = source_cfg(json!({
        "url": URL, "stream": stream, "group": "g", "consumer": "live",
        "claim_idle": "1s", "block": "200ms"
    }));
    let started = Instant::now();
    let (stop, h) = spawn(cfg, mem.clone());
    wait_until("the claimed entries", Duration::from_secs(10), || {
        mem.count() == 4
    })
    .await;
    // not before they were idle for claim_idle
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        mem.ids(),
        ids.iter()
            .map(|i| format!("{stream}:{i}"))
            .collect::<Vec<_>>()
    );
    wait_pending(&mut c, &stream, "g", 0).await;
    // and new entries go on flowing to the live consumer
    xadd(&mut c, &stream, &[("data", b"{\"n\": 4}")]).await;
    wait_until("a new entry", Duration::from_secs(10), || mem.count() == 5).await;
    stop.cancel();
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_missing_group_without_create_or_a_key_of_another_type_stops_the_source() {
    let Some(mut c) = server().await else { return };
    let stream = unique("missing");
    let other = unique("string");
    let _keys = Keys(vec![stream.clone(), other.clone()]);
    let run = |v: Json| async move {
        let (_stop, h) = spawn(source_cfg(v), Arc::new(Mem::default()));
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err()
    };
    let e = run(json!({"url": URL, "stream": stream, "create": false})).await;
    assert!(
        e.message
            .contains(&format!("stream `{stream}` does not exist")),
        "{e}"
    );
    xadd(&mut c, &stream, &[("data", b"{}")]).await;
    let e = run(json!({"url": URL, "stream": stream, "create": false, "group": "nope"})).await;
    assert!(
        e.message.contains("consumer group `nope` does not exist"),
        "{e}"
    );
    let _: () = c.set(&other, "x").await.unwrap();
    let e = run(json!({"url": URL, "stream": other})).await;
    assert!(e.message.contains("holds a string, not a stream"), "{e}");
}

fn delivery(id: i64, key: Option<&str>, payload: Json) -> Delivery {
    Delivery {
        id,
        idempotency_key: format!("idem-{id}"),
        correlation_id: format!("corr-{id}"),
        event_id: format!("ev-{id}"),
        entity_key: key.map(str::to_owned),
        attempt: 1,
        payload,
        context: DeliveryContext {
            flow: "customers".into(),
            source: "crm".into(),
            event_time_ms: 1_767_225_600_000,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: None,
        },
    }
}

fn sink_cfg(v: Json) -> RedisSinkConfig {
    RedisSinkConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

/// Every entry of a stream: id and fields.
async fn entries(
    c: &mut MultiplexedConnection,
    stream: &str,
) -> Vec<(String, Vec<(String, String)>)> {
    let v: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(c)
        .await
        .unwrap();
    v
}

fn field<'a>(e: &'a [(String, String)], name: &str) -> Option<&'a str> {
    e.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn sink_adds_one_entry_per_idempotency_key_with_the_cloudevent_in_its_fields() {
    let Some(mut c) = server().await else { return };
    let stream = unique("sink");
    let prefix = format!("{stream}:dedupe:");
    let _keys = Keys(vec![stream.clone(), format!("{prefix}*")]);
    let cfg = sink_cfg(json!({
        "url": URL, "stream": stream, "fields": {"origin": "weft"},
        "dedupe_prefix": prefix, "dedupe_ttl": "10m"
    }));
    let (sink, down) = RedisSink::connect("bus", cfg).await.unwrap();
    assert!(down.is_none());
    let batch = vec![
        delivery(1, Some("42"), json!({"name": "Ada"})),
        delivery(2, Some("a b"), json!({"name": "Bob"})),
        delivery(3, None, json!({"name": "Cy"})),
    ];
    let r = sink.write(&batch).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    // a retry of the same deliveries (a crash before the commit) adds
    // nothing and still counts as written
    let r = sink.write(&batch[1..]).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    let got = entries(&mut c, &stream).await;
    assert_eq!(got.len(), 3, "one entry per idempotency key: {got:?}");
    let (id, e) = &got[0];
    assert_eq!(
        serde_json::from_str::<Json>(field(e, "data").unwrap()).unwrap(),
        json!({"name": "Ada"})
    );
    assert_eq!(field(e, "ce_id"), Some("idem-1"));
    assert_eq!(field(e, "ce_specversion"), Some("1.0"));
    assert_eq!(field(e, "ce_source"), Some("weft/customers"));
    assert_eq!(field(e, "ce_type"), Some("weft.customers"));
    assert_eq!(field(e, "ce_time"), Some("2026-01-01T00:00:00.000Z"));
    assert_eq!(field(e, "ce_subject"), Some("42"));
    assert_eq!(field(e, "content-type"), Some("application/json"));
    assert_eq!(field(e, "x-correlation-id"), Some("corr-1"));
    assert_eq!(field(e, "x-causation-id"), Some("ev-1"));
    assert_eq!(
        field(e, "traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(field(e, "origin"), Some("weft"));
    assert_eq!(field(&got[2].1, "ce_subject"), None);
    // the dedupe key names the entry and expires within the window
    let dk = format!("{prefix}{stream}:idem-1");
    let held: String = c.get(&dk).await.unwrap();
    assert_eq!(&held, id);
    let ttl: i64 = c.ttl(&dk).await.unwrap();
    assert!(ttl > 500 && ttl <= 600, "{ttl}");

    // what the sink wrote reads back as the same event through the source
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(
        source_cfg(json!({"url": URL, "stream": stream, "block": "200ms"})),
        mem.clone(),
    );
    wait_until("the three entries", Duration::from_secs(10), || {
        mem.count() == 3
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();
    let ev = mem.events.lock().unwrap()[0].clone();
    assert_eq!(ev.id, "weft/customers#idem-1");
    assert_eq!(ev.ty, "weft.customers");
    assert_eq!(ev.correlationid, "corr-1");
    assert_eq!(ev.subject.as_deref(), Some("42"));
    assert_eq!(ev.data, json!({"name": "Ada"}));
}

/// An entry's fields with their values as bytes.
type BinaryFields = Vec<(String, Vec<u8>)>;

/// Avro and Protobuf bodies: the payload field holds the binary datum or
/// message (not JSON text) with the format's `content-type`, a record the
/// schema does not fit is a permanent failure of its delivery only, and a
/// source with the same format reads the entries back as the records.
#[tokio::test]
async fn sink_writes_avro_and_protobuf_as_binary_fields_the_source_reads_back() {
    let Some(mut c) = server().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("reading.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\npackage iot.v1;\nmessage Reading {\n  string sensor = 1;\n  double value = 2;\n  int64 at_ms = 3;\n}\n",
    )
    .unwrap();
    let avro = json!({"avro": {"schema": {"type": "record", "name": "Reading", "fields": [
        {"name": "sensor", "type": "string"}, {"name": "value", "type": "double"},
        {"name": "at_ms", "type": "long"}]}}});
    let protobuf = json!({"protobuf": {"schema": proto, "message": "iot.v1.Reading"}});
    let cases = [
        (
            "avro",
            avro,
            "application/avro",
            "does not fit the Avro schema",
            json!({"sensor": "a", "value": 1.5, "at_ms": 1767225600000_i64}),
        ),
        (
            "protobuf",
            protobuf,
            "application/x-protobuf",
            "does not fit Protobuf message iot.v1.Reading",
            // proto3 JSON: lowerCamelCase names, int64 as a string
            json!({"sensor": "a", "value": 1.5, "atMs": "1767225600000"}),
        ),
    ];
    for (name, format, content_type, misfit, read_back) in cases {
        let stream = unique(name);
        let prefix = format!("{stream}:dedupe:");
        let _keys = Keys(vec![stream.clone(), format!("{prefix}*")]);
        let cfg = sink_cfg(json!({
            "url": URL, "stream": stream, "dedupe_prefix": prefix, "format": format
        }));
        let (sink, down) = RedisSink::connect("bus", cfg).await.unwrap();
        assert!(down.is_none());
        let batch = vec![
            delivery(
                1,
                Some("a"),
                json!({"sensor": "a", "value": 1.5, "at_ms": 1767225600000_i64}),
            ),
            delivery(
                2,
                Some("b"),
                json!({"sensor": "b", "value": "high", "at_ms": 1}),
            ),
            delivery(
                3,
                Some("c"),
                json!({"sensor": "c", "value": -2.0, "at_ms": 7}),
            ),
        ];
        let r = sink.write(&batch).await;
        assert!(r[0].is_ok() && r[2].is_ok(), "{name}: {r:?}");
        let e = r[1].as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent, "{name}");
        assert!(e.message.contains(misfit), "{name}: {e}");

        let got: Vec<(String, BinaryFields)> = redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(got.len(), 2, "{name}: {got:?}");
        let reader: weft_connectors::broker::Format =
            serde_json::from_value(format.clone()).unwrap();
        let raw = |e: &[(String, Vec<u8>)], k: &str| -> Vec<u8> {
            e.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let first = &got[0].1;
        assert_eq!(
            raw(first, "content-type"),
            content_type.as_bytes(),
            "{name}"
        );
        assert_eq!(raw(first, "ce_id"), b"idem-1", "{name}");
        let body = raw(first, "data");
        assert!(
            serde_json::from_slice::<Json>(&body).is_err(),
            "{name}: a binary body, not JSON"
        );
        assert_eq!(reader.decode(&body).unwrap(), read_back, "{name}");

        // the source with the same format reads them back
        let mem = Arc::new(Mem::default());
        let (stop, h) = spawn(
            source_cfg(json!({"url": URL, "stream": stream, "block": "200ms", "format": format})),
            mem.clone(),
        );
        wait_until("the two entries", Duration::from_secs(10), || {
            mem.count() == 2
        })
        .await;
        stop.cancel();
        h.await.unwrap().unwrap();
        assert!(mem.bad.lock().unwrap().is_empty(), "{name}");
        let events = mem.events.lock().unwrap().clone();
        assert_eq!(events[0].data, read_back, "{name}");
        assert_eq!(events[0].id, "weft/customers#idem-1", "{name}");
        assert_eq!(events[1].data["sensor"], "c", "{name}");
    }
}

#[tokio::test]
async fn sink_trims_with_maxlen() {
    let Some(mut c) = server().await else { return };
    let stream = unique("trim");
    let prefix = format!("{stream}:dedupe:");
    let _keys = Keys(vec![stream.clone(), format!("{prefix}*")]);
    let (sink, _) = RedisSink::connect(
        "bus",
        sink_cfg(json!({"url": URL, "stream": stream, "maxlen": 10, "dedupe_prefix": prefix})),
    )
    .await
    .unwrap();
    for chunk in (1..=500).collect::<Vec<i64>>().chunks(100) {
        let batch: Vec<Delivery> = chunk
            .iter()
            .map(|i| delivery(*i, None, json!({"i": i})))
            .collect();
        let r = sink.write(&batch).await;
        assert!(r.iter().all(Result::is_ok));
    }
    let len: i64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut c)
        .await
        .unwrap();
    // `~`: trimmed by whole nodes (100 entries by default), never below 10
    assert!((10..=200).contains(&len), "{len}");
}

#[tokio::test]
async fn sink_errors_say_retryable_or_permanent() {
    let Some(mut c) = server().await else { return };
    let stream = unique("sinkerr");
    let prefix = format!("{stream}:dedupe:");
    let _keys = Keys(vec![stream.clone(), format!("{prefix}*")]);
    let _: () = c.set(&stream, "not a stream").await.unwrap();
    let cfg = json!({"url": URL, "stream": stream, "dedupe_prefix": prefix});
    // a key of another type: refused at start...
    let e = RedisSink::connect("bus", sink_cfg(cfg.clone()))
        .await
        .err()
        .unwrap();
    assert!(e.contains("holds a string, not a stream"), "{e}");
    // ...and a permanent failure of the write when it turns so later
    let _: () = c.del(&stream).await.unwrap();
    let (sink, _) = RedisSink::connect("bus", sink_cfg(cfg)).await.unwrap();
    let _: () = c.set(&stream, "not a stream").await.unwrap();
    let r = sink.write(&[delivery(1, None, json!({}))]).await;
    let e = r[0].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("WRONGTYPE"), "{e}");
    // nothing was kept for the key: once the stream is there, it is added
    let _: () = c.del(&stream).await.unwrap();
    let r = sink.write(&[delivery(1, None, json!({}))]).await;
    assert!(r[0].is_ok(), "{r:?}");
    assert_eq!(entries(&mut c, &stream).await.len(), 1);

    // nobody listening: the sink starts down, and a write is retryable
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (sink, down) = RedisSink::connect(
        "bus",
        sink_cfg(json!({
            "url": format!("redis://u:secret@127.0.0.1:{port}"), "stream": "s",
            "timeout": "300ms", "connect_timeout": "300ms"
        })),
    )
    .await
    .unwrap();
    let down = down.expect("down");
    assert!(down.contains(&format!("127.0.0.1:{port}")), "{down}");
    assert!(!down.contains("secret"), "{down}");
    let r = sink.write(&[delivery(1, None, json!({}))]).await;
    let e = r[0].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable, "{e}");
    assert!(!e.message.contains("secret"), "{e}");
}
