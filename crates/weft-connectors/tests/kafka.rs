//! The `kafka` source and sink against a real Kafka-compatible broker: a
//! `tansu broker` each test starts on a free port with memory storage
//! (`common/tansu.rs`). Skipped with a message when `tansu` is not
//! installed, unless `CI=true`, where that is a failure.
#![cfg(feature = "kafka")]

#[path = "common/tansu.rs"]
mod tansu;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{Value as Json, json};
use tansu::{Msg, Tansu};
use tokio_util::sync::CancellationToken;
use weft_connectors::broker::kafka::{KafkaSink, KafkaSinkConfig, KafkaSource, KafkaSourceConfig};
use weft_connectors::sink::DeliveryContext;
use weft_connectors::{
    BadRecord, Batch, Delivery, Ingest, IngestError, Receipt, Record, Sink, Source,
};
use weft_core::ErrorKind;
use weft_core::Event;
use weft_core::config::raw::ConnectorSettings;

/// An [`Ingest`] that keeps what it is given, and fails while `failing`.
#[derive(Default)]
struct Mem {
    events: Mutex<Vec<Event>>,
    bad: Mutex<Vec<BadRecord>>,
    batches: AtomicUsize,
    failing: AtomicBool,
    attempts: AtomicUsize,
    /// The checkpoints saved, by key (the last one wins, as in the store).
    checkpoints: Mutex<std::collections::BTreeMap<String, String>>,
}

impl Ingest for Mem {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(IngestError::Store("disk on fire".into()));
            }
            self.batches.fetch_add(1, Ordering::SeqCst);
            let mut r = Receipt::default();
            if let Some(c) = batch.checkpoint {
                self.checkpoints.lock().unwrap().insert(c.key, c.value);
            }
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
    fn checkpoint(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
        let saved = self.checkpoints.lock().unwrap().get(key).cloned();
        Box::pin(async move { Ok(saved) })
    }
}

impl Mem {
    fn count(&self) -> usize {
        self.events.lock().unwrap().len() + self.bad.lock().unwrap().len()
    }
    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.id.clone())
            .collect();
        ids.sort();
        ids
    }
}

fn source_cfg(v: Json) -> KafkaSourceConfig {
    KafkaSourceConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

fn spawn(
    cfg: KafkaSourceConfig,
    ingest: Arc<Mem>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), weft_connectors::SourceError>>,
) {
    let stop = CancellationToken::new();
    let src: Box<dyn Source> = Box::new(KafkaSource::new("bus", cfg));
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

/// Wait until the group committed `want` on the topic's partitions.
async fn wait_committed(brokers: &str, group: &str, topic: &str, want: &[i64]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (b, g, t, n) = (
            brokers.to_owned(),
            group.to_owned(),
            topic.to_owned(),
            want.len() as i32,
        );
        let got = tokio::task::spawn_blocking(move || tansu::committed(&b, &g, &t, n))
            .await
            .unwrap();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "committed {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Blocking helper calls off the test's runtime threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_commits_after_ingest_and_sends_bad_messages_to_the_dlq() {
    let Some(broker) = blocking(Tansu::start).await else {
        return;
    };
    let brokers = broker.brokers();
    let b = brokers.clone();
    blocking(move || tansu::create_topic(&b, "orders", 2)).await;
    let mut msgs: Vec<Msg> = (0..30)
        .map(|i| Msg {
            key: Some(format!("k{}", i % 5).into_bytes()),
            partition: Some(i % 2),
            ..Msg::json(&json!({"n": i}))
        })
        .collect();
    let bad = |value: Option<&[u8]>, headers: Vec<(&str, &str)>| Msg {
        value: value.map(<[u8]>::to_vec),
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        partition: Some(0),
        key: None,
    };
    msgs.push(bad(Some(b"{\"n\": tru"), vec![]));
    msgs.push(bad(Some(&[b' '; 600]), vec![]));
    msgs.push(bad(None, vec![]));
    msgs.push(bad(
        Some(b"{\"id\": \"9\", \"source\": \"/erp\"}"),
        vec![("content-type", "application/cloudevents+json")],
    ));
    msgs.push(Msg {
        partition: Some(1),
        key: Some(b"cust-7".to_vec()),
        headers: [
            ("ce_id", "evt-1"),
            ("ce_source", "/crm"),
            ("ce_type", "crm.customer.created"),
            ("ce_time", "2026-03-01T10:00:00Z"),
            ("ce_specversion", "1.0"),
            ("x-correlation-id", "corr-7"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..Msg::json(&json!({"id": 7}))
    });
    let b = brokers.clone();
    blocking(move || tansu::produce(&b, "orders", &msgs)).await;

    let cfg = source_cfg(json!({
        "brokers": brokers, "topics": ["orders"], "batch": 16, "max_message_bytes": 512,
        "session_timeout": "6s"
    }));
    let group = cfg.group.clone();
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(cfg, mem.clone());
    wait_until("35 records", Duration::from_secs(30), || mem.count() >= 35).await;
    // offsets committed once stored, past the bad ones too: 15 + 4 on
    // partition 0, 15 + 1 on partition 1
    wait_committed(&brokers, &group, "orders", &[19, 16]).await;
    stop.cancel();
    h.await.unwrap().unwrap();

    let events = mem.events.lock().unwrap().clone();
    let bad = mem.bad.lock().unwrap().clone();
    assert_eq!(events.len(), 31, "{bad:?}");
    assert_eq!(bad.len(), 4, "{bad:?}");
    // ids are positions; the key is the subject
    for e in events.iter().filter(|e| e.data.get("n").is_some()) {
        let n = e.data["n"].as_i64().unwrap();
        let (p, o) = (n % 2, n / 2);
        assert_eq!(e.id, format!("orders/{p}/{o}"));
        assert_eq!(e.subject.as_deref(), Some(format!("k{}", n % 5).as_str()));
        assert_eq!(e.ty, "bus.message");
        assert_eq!(e.source, "weft:bus/kafka");
    }
    let mut bad = bad;
    bad.sort_by(|a, b| a.id.cmp(&b.id));
    let at = |o: i64| format!("kafka topic orders partition 0 offset {o}");
    assert_eq!(bad[0].id, "orders/0/15");
    assert_eq!(bad[0].location, at(15));
    assert!(bad[0].error.starts_with(&at(15)), "{}", bad[0].error);
    assert!(bad[0].error.contains("not JSON"), "{}", bad[0].error);
    assert_eq!(bad[0].raw, "{\"n\": tru");
    assert_eq!(bad[1].id, "orders/0/16");
    assert!(
        bad[1]
            .error
            .contains("600 bytes is over max_message_bytes (512)"),
        "{}",
        bad[1].error
    );
    assert_eq!(bad[2].id, "orders/0/17");
    assert!(bad[2].error.contains("tombstone"), "{}", bad[2].error);
    assert!(bad[3].error.contains("without data"), "{}", bad[3].error);
    // CloudEvents headers become the event's attributes
    let e = events.iter().find(|e| e.data == json!({"id": 7})).unwrap();
    assert_eq!(e.id, "/crm#evt-1");
    assert_eq!(e.source, "/crm");
    assert_eq!(e.ty, "crm.customer.created");
    assert_eq!(e.time.to_rfc3339(), "2026-03-01T10:00:00+00:00");
    assert_eq!(e.correlationid, "corr-7");
    assert_eq!(e.subject.as_deref(), Some("cust-7"));
    assert_eq!(
        e.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_batch_the_store_refuses_is_not_committed_and_comes_back_with_the_same_ids() {
    let Some(broker) = blocking(Tansu::start).await else {
        return;
    };
    let brokers = broker.brokers();
    let b = brokers.clone();
    blocking(move || {
        tansu::create_topic(&b, "held", 1);
        let msgs: Vec<Msg> = (0..5).map(|i| Msg::json(&json!({"n": i}))).collect();
        tansu::produce(&b, "held", &msgs);
    })
    .await;
    let settings = json!({
        "brokers": brokers, "topics": ["held"], "group": "g", "session_timeout": "6s",
        "offsets": "group"
    });
    // the store refuses: nothing is committed while the source retries
    let first = Arc::new(Mem::default());
    first.failing.store(true, Ordering::SeqCst);
    let (stop, h) = spawn(source_cfg(settings.clone()), first.clone());
    wait_until("three refused attempts", Duration::from_secs(30), || {
        first.attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    wait_committed(&brokers, "g", "held", &[-1]).await;
    // stopped while holding it: still nothing committed
    stop.cancel();
    h.await.unwrap().unwrap();
    wait_committed(&brokers, "g", "held", &[-1]).await;
    assert_eq!(first.count(), 0);

    // the next member of the group gets the same messages, same ids; the
    // store takes them after two more refusals, once, and the offset is
    // committed
    let second = Arc::new(Mem::default());
    second.failing.store(true, Ordering::SeqCst);
    let (stop, h) = spawn(source_cfg(settings), second.clone());
    wait_until("two refused attempts", Duration::from_secs(30), || {
        second.attempts.load(Ordering::SeqCst) >= 2
    })
    .await;
    second.failing.store(false, Ordering::SeqCst);
    wait_until("the held batch", Duration::from_secs(20), || {
        second.count() == 5
    })
    .await;
    wait_committed(&brokers, "g", "held", &[5]).await;
    assert_eq!(second.batches.load(Ordering::SeqCst), 1);
    assert_eq!(
        second.ids(),
        (0..5).map(|o| format!("held/0/{o}")).collect::<Vec<_>>()
    );
    // and new messages go on flowing
    let b = brokers.clone();
    blocking(move || tansu::produce(&b, "held", &[Msg::json(&json!({"n": 5}))])).await;
    wait_until("a new message", Duration::from_secs(20), || {
        second.count() == 6
    })
    .await;
    wait_committed(&brokers, "g", "held", &[6]).await;
    stop.cancel();
    h.await.unwrap().unwrap();
}

/// `offsets: store`: the position is saved with each batch; a batch the
/// store refuses moves nothing; a source started again on the same store
/// reads on after what was stored (nothing twice, nothing skipped); a
/// first start on a store without a position takes the group's committed
/// offsets; `start: latest` is resolved and saved before any message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_offsets_in_the_store_move_with_each_stored_batch_and_nothing_else() {
    let Some(broker) = blocking(Tansu::start).await else {
        return;
    };
    let brokers = broker.brokers();
    let b = brokers.clone();
    blocking(move || {
        tansu::create_topic(&b, "kept", 2);
        let msgs: Vec<Msg> = (0..6)
            .map(|i| Msg {
                partition: Some(i % 2),
                ..Msg::json(&json!({"n": i}))
            })
            .collect();
        tansu::produce(&b, "kept", &msgs);
    })
    .await;
    let settings = json!({"brokers": brokers, "topics": ["kept"], "group": "s"});
    let store = Arc::new(Mem::default());
    store.failing.store(true, Ordering::SeqCst);
    let (stop, h) = spawn(source_cfg(settings.clone()), store.clone());
    wait_until("refused attempts", Duration::from_secs(30), || {
        store.attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    // refused: no position saved, not even the start
    assert!(store.checkpoints.lock().unwrap().is_empty());
    store.failing.store(false, Ordering::SeqCst);
    wait_until("every message", Duration::from_secs(20), || {
        store.count() == 6
    })
    .await;
    let saved = || -> Json {
        let c = store.checkpoints.lock().unwrap();
        serde_json::from_str(c.get("kafka_offsets").map_or("null", String::as_str)).unwrap()
    };
    wait_until("the position after them", Duration::from_secs(20), || {
        saved() == json!({"kept": {"0": 3, "1": 3}})
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();

    // started again on the same store: the next messages only
    let b = brokers.clone();
    blocking(move || {
        let msgs: Vec<Msg> = (6..10)
            .map(|i| Msg {
                partition: Some(i % 2),
                ..Msg::json(&json!({"n": i}))
            })
            .collect();
        tansu::produce(&b, "kept", &msgs);
    })
    .await;
    let (stop, h) = spawn(source_cfg(settings.clone()), store.clone());
    wait_until("the new messages", Duration::from_secs(20), || {
        store.count() == 10
    })
    .await;
    wait_until("the position after them", Duration::from_secs(20), || {
        saved() == json!({"kept": {"0": 5, "1": 5}})
    })
    .await;
    let mut ids = store.ids();
    ids.dedup();
    assert_eq!(ids.len(), 10, "each message once: {ids:?}");
    // and the group has the offsets too, for lag tools
    wait_committed(&brokers, "s", "kept", &[5, 5]).await;
    stop.cancel();
    h.await.unwrap().unwrap();

    // a new store: the group's committed offsets are where it starts
    let fresh = Arc::new(Mem::default());
    let (stop, h) = spawn(source_cfg(settings.clone()), fresh.clone());
    wait_until("the start saved", Duration::from_secs(20), || {
        fresh
            .checkpoints
            .lock()
            .unwrap()
            .contains_key("kafka_offsets")
    })
    .await;
    let b = brokers.clone();
    blocking(move || {
        tansu::produce(
            &b,
            "kept",
            &[Msg {
                partition: Some(0),
                ..Msg::json(&json!({"n": 10}))
            }],
        )
    })
    .await;
    wait_until(
        "the message after the group's offsets",
        Duration::from_secs(20),
        || fresh.count() == 1,
    )
    .await;
    assert_eq!(fresh.ids(), ["kept/0/5"]);
    stop.cancel();
    h.await.unwrap().unwrap();

    // `start: latest` on a new group and store: saved before any message
    let mut latest = settings.clone();
    latest["group"] = json!("new-group");
    latest["start"] = json!("latest");
    let empty = Arc::new(Mem::default());
    let (stop, h) = spawn(source_cfg(latest), empty.clone());
    wait_until("the start saved", Duration::from_secs(20), || {
        empty
            .checkpoints
            .lock()
            .unwrap()
            .contains_key("kafka_offsets")
    })
    .await;
    let at: Json =
        serde_json::from_str(&empty.checkpoints.lock().unwrap()["kafka_offsets"]).unwrap();
    assert_eq!(at, json!({"kept": {"0": 6, "1": 5}}));
    assert_eq!(empty.count(), 0, "nothing from before the start");
    stop.cancel();
    h.await.unwrap().unwrap();
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

fn sink_cfg(v: Json) -> KafkaSinkConfig {
    KafkaSinkConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_writes_the_key_and_the_cloudevent_headers_once_acknowledged() {
    let Some(broker) = blocking(Tansu::start).await else {
        return;
    };
    let brokers = broker.brokers();
    let b = brokers.clone();
    blocking(move || tansu::create_topic(&b, "erp", 1)).await;
    let cfg = sink_cfg(json!({
        "brokers": brokers, "topic": "erp", "headers": {"x-origin": "weft"}, "timeout": "10s"
    }));
    let (sink, down) = KafkaSink::connect("bus", cfg).await.unwrap();
    assert!(down.is_none(), "{down:?}");
    let batch = vec![
        delivery(1, Some("42"), json!({"name": "Ada"})),
        delivery(2, Some("a b"), json!({"name": "Bob"})),
        delivery(3, None, json!({"name": "Cy"})),
    ];
    let r = sink.write(&batch).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    // Ok means acknowledged: the messages are there when write returns
    let b = brokers.clone();
    let got = blocking(move || tansu::read_all(&b, "erp", 1, 3, Duration::from_secs(20))).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let m = &got[0];
    assert_eq!(m.key.as_deref(), Some(b"42".as_slice()));
    assert_eq!(m.json(), json!({"name": "Ada"}));
    assert_eq!(m.header("ce_id"), Some("idem-1"));
    assert_eq!(m.header("ce_specversion"), Some("1.0"));
    assert_eq!(m.header("ce_source"), Some("weft/customers"));
    assert_eq!(m.header("ce_type"), Some("weft.customers"));
    assert_eq!(m.header("ce_time"), Some("2026-01-01T00:00:00.000Z"));
    assert_eq!(m.header("ce_subject"), Some("42"));
    assert_eq!(m.header("content-type"), Some("application/json"));
    assert_eq!(m.header("x-correlation-id"), Some("corr-1"));
    assert_eq!(m.header("x-causation-id"), Some("ev-1"));
    assert_eq!(
        m.header("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(m.header("x-origin"), Some("weft"));
    assert_eq!(got[1].key.as_deref(), Some(b"a b".as_slice()));
    assert_eq!(got[2].key, None);
    assert_eq!(got[2].header("ce_subject"), None);

    // what the sink wrote reads back as the same event through the source
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(
        source_cfg(json!({"brokers": brokers, "topics": ["erp"], "session_timeout": "6s"})),
        mem.clone(),
    );
    wait_until("the three messages", Duration::from_secs(30), || {
        mem.count() == 3
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();
    let ev = mem
        .events
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.data == json!({"name": "Ada"}))
        .cloned()
        .unwrap();
    assert_eq!(ev.id, "weft/customers#idem-1");
    assert_eq!(ev.ty, "weft.customers");
    assert_eq!(ev.correlationid, "corr-1");
    assert_eq!(ev.subject.as_deref(), Some("42"));
    assert_eq!(ev.time.timestamp_millis(), 1_767_225_600_000);
}

/// `format: {avro: ...}` both ways: the sink writes datums of its schema
/// (content type `application/avro`; a record the schema does not fit is
/// permanent), and a source with the same format reads them back as the
/// records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_avro_goes_out_and_comes_back_with_the_schema_of_the_config() {
    let Some(broker) = blocking(Tansu::start).await else {
        return;
    };
    let brokers = broker.brokers();
    let b = brokers.clone();
    blocking(move || tansu::create_topic(&b, "avro", 1)).await;
    let format = json!({"avro": {"schema": {"type": "record", "name": "Customer", "fields": [
        {"name": "name", "type": "string"}, {"name": "tier", "type": "long"}]}}});
    let cfg = sink_cfg(json!({
        "brokers": brokers, "topic": "avro", "timeout": "10s", "format": format
    }));
    let (sink, _) = KafkaSink::connect("bus", cfg).await.unwrap();
    let batch = vec![
        delivery(1, Some("1"), json!({"name": "Ada", "tier": 1})),
        delivery(2, Some("2"), json!({"name": "Bob"})),
        delivery(3, Some("3"), json!({"name": "Cy", "tier": 3})),
    ];
    let r = sink.write(&batch).await;
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    let e = r[1].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("does not fit the Avro schema"), "{e}");
    let b = brokers.clone();
    let got = blocking(move || tansu::read_all(&b, "avro", 1, 2, Duration::from_secs(20))).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .all(|m| m.header("content-type") == Some("application/avro"))
    );
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(
        source_cfg(json!({
            "brokers": brokers, "topics": ["avro"], "session_timeout": "6s", "format": format
        })),
        mem.clone(),
    );
    wait_until("the two messages", Duration::from_secs(30), || {
        mem.count() == 2
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();
    let mut data: Vec<Json> = mem
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.data.clone())
        .collect();
    data.sort_by_key(|d| d["tier"].as_i64());
    assert_eq!(
        data,
        vec![
            json!({"name": "Ada", "tier": 1}),
            json!({"name": "Cy", "tier": 3})
        ]
    );
}

/// `format: {protobuf: ...}` both ways, in the Confluent wire format Kafka
/// users have (magic byte, schema id, message indexes): the sink writes
/// messages of the `.proto`'s message (content type
/// `application/x-protobuf`; a record with a field the message lacks is
/// permanent), and a source with the same format reads them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_protobuf_goes_out_and_comes_back_with_the_proto_file_of_the_config() {
    let Some(broker) = blocking(Tansu::start).await else {
        return;
    };
    let brokers = broker.brokers();
    let b = brokers.clone();
    blocking(move || tansu::create_topic(&b, "proto", 1)).await;
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("crm.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\npackage crm;\nmessage Other { string x = 1; }\nmessage Customer { string name = 1; int64 tier = 2; }\n",
    )
    .unwrap();
    let format = json!({"protobuf": {"schema": proto, "message": "crm.Customer",
                                     "confluent": true, "schema_id": 12}});
    let cfg = sink_cfg(json!({
        "brokers": brokers, "topic": "proto", "timeout": "10s", "format": format
    }));
    let (sink, _) = KafkaSink::connect("bus", cfg).await.unwrap();
    let batch = vec![
        delivery(1, Some("1"), json!({"name": "Ada", "tier": 1})),
        delivery(2, Some("2"), json!({"name": "Bob", "rank": 2})),
        delivery(3, Some("3"), json!({"name": "Cy", "tier": "3"})),
    ];
    let r = sink.write(&batch).await;
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    let e = r[1].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(
        e.message
            .contains("does not fit Protobuf message crm.Customer"),
        "{e}"
    );
    let b = brokers.clone();
    let got = blocking(move || tansu::read_all(&b, "proto", 1, 2, Duration::from_secs(20))).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .all(|m| m.header("content-type") == Some("application/x-protobuf"))
    );
    // 0x00, schema id 12, message indexes [1] (count 1, index 1: zigzag)
    for m in &got {
        let v = m.value.as_deref().unwrap_or_default();
        assert_eq!(&v[..7], &[0, 0, 0, 0, 12, 2, 2], "{v:?}");
    }
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(
        source_cfg(json!({
            "brokers": brokers, "topics": ["proto"], "session_timeout": "6s", "format": format
        })),
        mem.clone(),
    );
    wait_until("the two messages", Duration::from_secs(30), || {
        mem.count() == 2
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();
    assert!(mem.bad.lock().unwrap().is_empty());
    let mut data: Vec<Json> = mem
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.data.clone())
        .collect();
    data.sort_by_key(|d| d["tier"].as_str().map(str::to_owned));
    assert_eq!(
        data,
        vec![
            json!({"name": "Ada", "tier": "1"}),
            json!({"name": "Cy", "tier": "3"})
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_errors_say_retryable_or_permanent() {
    let Some(broker) = blocking(Tansu::start).await else {
        return;
    };
    let brokers = broker.brokers();
    let b = brokers.clone();
    blocking(move || {
        tansu::create_topic(&b, "t-a", 1);
        tansu::create_topic(&b, "t-b", 1);
    })
    .await;
    let (sink, down) = KafkaSink::connect(
        "bus",
        sink_cfg(json!({
            "brokers": brokers, "topic": "t-{region}", "max_message_bytes": 100,
            "timeout": "5s"
        })),
    )
    .await
    .unwrap();
    assert!(down.is_none(), "{down:?}");
    let r = sink
        .write(&[
            delivery(1, None, json!({"region": "a"})),
            delivery(2, None, json!({"region": "b", "pad": "x".repeat(200)})),
            delivery(3, None, json!({"nothing": true})),
            delivery(4, None, json!({"region": "not a topic"})),
            delivery(5, None, json!({"region": "b"})),
        ])
        .await;
    assert!(r[0].is_ok(), "{r:?}");
    let e = r[1].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("over max_message_bytes (100)"), "{e}");
    let e = r[2].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("`{region}`"), "{e}");
    let e = r[3].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("not a Kafka topic name"), "{e}");
    assert!(r[4].is_ok(), "{r:?}");
    let b = brokers.clone();
    let counts = blocking(move || {
        let n = |t: &str| tansu::read_all(&b, t, 1, 1, Duration::from_secs(10)).len();
        (n("t-a"), n("t-b"))
    })
    .await;
    assert_eq!(counts, (1, 1));

    // nobody listening: the sink starts down, and a write is retryable
    let port = tansu::free_port();
    let (sink, down) = KafkaSink::connect(
        "bus",
        sink_cfg(json!({
            "brokers": format!("127.0.0.1:{port}"), "topic": "t",
            "timeout": "1s", "connect_timeout": "300ms"
        })),
    )
    .await
    .unwrap();
    let down = down.expect("down");
    assert!(down.contains(&format!("127.0.0.1:{port}")), "{down}");
    let r = sink.write(&[delivery(1, None, json!({}))]).await;
    let e = r[0].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable, "{e}");
}
