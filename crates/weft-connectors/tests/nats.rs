//! The `nats` source and sink against the real NATS JetStream server on
//! 127.0.0.1:4222 (`.ci/services.sh` starts it). Every test makes streams
//! of its own (unique names) and deletes them at the end. Skipped with a
//! message when the server is not reachable, unless `CI=true`, where that
//! is a failure.
#![cfg(feature = "nats")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_connectors::broker::nats::{NatsSink, NatsSinkConfig, NatsSource, NatsSourceConfig};
use weft_connectors::sink::DeliveryContext;
use weft_connectors::{
    BadRecord, Batch, Delivery, Ingest, IngestError, Receipt, Record, Sink, Source,
};
use weft_core::ErrorKind;
use weft_core::Event;
use weft_core::config::raw::ConnectorSettings;

const URL: &str = "nats://127.0.0.1:4222";

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A JetStream context on the machine's server, or `None` (skip) when it
/// is not there.
async fn server() -> Option<jetstream::Context> {
    match tokio::time::timeout(Duration::from_secs(3), async_nats::connect(URL)).await {
        Ok(Ok(c)) => Some(jetstream::new(c)),
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            if ci() {
                panic!("NATS at {URL} is not reachable and CI=true: {why}");
            }
            eprintln!("SKIPPED: NATS at {URL} is not reachable ({why}); run .ci/services.sh");
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
    format!("{prefix}_{:x}", t ^ ((std::process::id() as u64) << 40))
}

/// Streams deleted when the test ends, also when it fails.
struct Streams {
    names: Vec<String>,
}

impl Drop for Streams {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.names);
        // a runtime and a connection of their own: the test's runtime is
        // blocked while this waits
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(c) = async_nats::connect(URL).await else {
                    return;
                };
                let js = jetstream::new(c);
                for n in names {
                    if let Err(e) = js.delete_stream(&n).await {
                        eprintln!("cannot delete test stream {n}: {e}");
                    }
                }
            });
        })
        .join();
    }
}

async fn stream(js: &jetstream::Context, name: &str, subjects: &[&str], max_msg_size: i32) {
    js.create_stream(jetstream::stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        max_message_size: max_msg_size,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// An [`Ingest`] that keeps what it is given, and fails while `failing`.
#[derive(Default)]
struct Mem {
    events: Mutex<Vec<Event>>,
    bad: Mutex<Vec<BadRecord>>,
    batches: Mutex<usize>,
    failing: std::sync::atomic::AtomicBool,
    attempts: std::sync::atomic::AtomicUsize,
}

impl Ingest for Mem {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
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
}

fn source_cfg(v: Value) -> NatsSourceConfig {
    NatsSourceConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

/// Run a source until the returned token is cancelled; the handle gives
/// its result.
fn spawn(
    cfg: NatsSourceConfig,
    ingest: Arc<Mem>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), weft_connectors::SourceError>>,
) {
    let stop = CancellationToken::new();
    let src: Box<dyn Source> = Box::new(NatsSource::new("bus", cfg));
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

async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> jetstream::consumer::Info {
    let s = js.get_stream(stream).await.unwrap();
    let mut c: jetstream::consumer::PullConsumer = s.get_consumer(consumer).await.unwrap();
    c.info().await.unwrap().clone()
}

#[tokio::test]
async fn source_reads_acks_after_ingest_and_sends_bad_messages_to_the_dlq() {
    let Some(js) = server().await else { return };
    let name = unique("SRC");
    let subj = format!("{}.orders", name.to_lowercase());
    let _guard = Streams {
        names: vec![name.clone()],
    };
    // the source creates the stream itself
    let cfg = source_cfg(json!({
        "url": URL, "stream": name, "subject": format!("{subj}.>"), "batch": 16,
        "max_message_bytes": 512, "max_wait": "200ms"
    }));
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(cfg, mem.clone());
    let created = Instant::now();
    while js.get_stream(&name).await.is_err() {
        assert!(
            created.elapsed() < Duration::from_secs(10),
            "stream not created"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..40 {
        js.publish(format!("{subj}.new"), json!({"n": i}).to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    js.publish(format!("{subj}.new"), "{\"n\": tru".into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish(format!("{subj}.new"), vec![b' '; 600].into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut h2 = async_nats::HeaderMap::new();
    h2.insert("ce-id", "evt-1");
    h2.insert("ce-source", "/crm");
    h2.insert("ce-type", "crm.customer.created");
    h2.insert("ce-time", "2026-03-01T10:00:00Z");
    h2.insert("x-correlation-id", "corr-7");
    h2.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    js.publish_with_headers(
        format!("{subj}.ce"),
        h2,
        json!({"id": 7}).to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mut h3 = async_nats::HeaderMap::new();
    h3.insert("Nats-Msg-Id", "pub-9");
    js.publish_with_headers(
        format!("{subj}.new"),
        h3,
        json!({"n": 99}).to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_until("44 records", Duration::from_secs(10), || mem.count() >= 44).await;
    // every message acked once stored: nothing pending, nothing redelivered
    let consumer = weft_connectors::broker::nats::config::default_consumer("bus");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = consumer_info(&js, &name, &consumer).await;
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            assert_eq!(info.num_redelivered, 0);
            break;
        }
        assert!(Instant::now() < deadline, "not all acked: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    h.await.unwrap().unwrap();

    let events = mem.events.lock().unwrap().clone();
    let bad = mem.bad.lock().unwrap().clone();
    assert_eq!(events.len(), 42, "{:?}", bad);
    assert_eq!(bad.len(), 2);
    // ids are stream positions, in order
    for (i, e) in events.iter().take(40).enumerate() {
        assert_eq!(e.id, format!("{name}:{}", i + 1));
        assert_eq!(e.data, json!({"n": i}));
        assert_eq!(e.subject.as_deref(), Some(format!("{subj}.new").as_str()));
        assert_eq!(e.ty, "bus.message");
    }
    assert_eq!(bad[0].id, format!("{name}:41"));
    assert_eq!(
        bad[0].location,
        format!("nats stream {name} seq 41 (subject {subj}.new)")
    );
    assert!(bad[0].error.contains("not JSON"), "{}", bad[0].error);
    assert_eq!(bad[0].raw, "{\"n\": tru");
    assert_eq!(bad[1].id, format!("{name}:42"));
    assert!(
        bad[1]
            .error
            .contains("600 bytes is over max_message_bytes (512)"),
        "{}",
        bad[1].error
    );
    // CloudEvents binary mode: the attributes become the event's
    let ce = &events[40];
    assert_eq!(ce.id, "/crm#evt-1");
    assert_eq!(ce.source, "/crm");
    assert_eq!(ce.ty, "crm.customer.created");
    assert_eq!(ce.time.to_rfc3339(), "2026-03-01T10:00:00+00:00");
    assert_eq!(ce.correlationid, "corr-7");
    assert_eq!(
        ce.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    // the publisher's message id
    assert_eq!(events[41].id, "pub-9");
}

#[tokio::test]
async fn a_batch_the_store_refuses_is_held_unacked_and_stored_once_when_it_recovers() {
    let Some(js) = server().await else { return };
    let name = unique("HOLD");
    let subj = name.to_lowercase();
    let _guard = Streams {
        names: vec![name.clone()],
    };
    stream(&js, &name, &[&subj], -1).await;
    for i in 0..5 {
        js.publish(subj.clone(), json!({"n": i}).to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mem = Arc::new(Mem::default());
    mem.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    // ack_wait 1 s: without the progress acks the server would redeliver
    // during the 2.5 s the store refuses
    let cfg = source_cfg(json!({
        "url": URL, "stream": name, "subject": subj, "consumer": "held",
        "ack_wait": "1s", "max_wait": "200ms", "max_deliver": 2
    }));
    let (stop, h) = spawn(cfg, mem.clone());
    wait_until("three refused attempts", Duration::from_secs(10), || {
        mem.attempts.load(std::sync::atomic::Ordering::SeqCst) >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let info = consumer_info(&js, &name, "held").await;
    assert_eq!(info.num_ack_pending, 5, "held, not acked: {info:?}");
    assert_eq!(info.num_redelivered, 0, "ack_wait never ran out: {info:?}");
    assert_eq!(mem.count(), 0);
    mem.failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    wait_until("the held batch", Duration::from_secs(10), || {
        mem.count() == 5
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while consumer_info(&js, &name, "held").await.num_ack_pending != 0 {
        assert!(
            Instant::now() < deadline,
            "not acked after the store took it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // still within max_deliver 2: the five were delivered once and stored once
    assert_eq!(*mem.batches.lock().unwrap(), 1);
    let ids: Vec<String> = mem
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(
        ids,
        (1..=5).map(|i| format!("{name}:{i}")).collect::<Vec<_>>()
    );
    stop.cancel();
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_message_taken_by_a_source_that_died_is_redelivered_with_the_same_id() {
    let Some(js) = server().await else { return };
    let name = unique("REDEL");
    let subj = name.to_lowercase();
    let _guard = Streams {
        names: vec![name.clone()],
    };
    stream(&js, &name, &[&subj], -1).await;
    for i in 0..3 {
        js.publish(subj.clone(), json!({"n": i}).to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let settings = json!({
        "url": URL, "stream": name, "subject": subj, "consumer": "redel",
        "ack_wait": "1s", "max_wait": "200ms"
    });
    // the first source's store never takes the batch; the source is then
    // dropped without a shutdown (as if the process died): no nak
    let first = Arc::new(Mem::default());
    first
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (_stop, h) = spawn(source_cfg(settings.clone()), first.clone());
    wait_until("a refused attempt", Duration::from_secs(10), || {
        first.attempts.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    h.abort();
    let _ = h.await;
    let second = Arc::new(Mem::default());
    let (stop, h) = spawn(source_cfg(settings), second.clone());
    wait_until("the redelivery", Duration::from_secs(10), || {
        second.count() == 3
    })
    .await;
    let events = second.events.lock().unwrap().clone();
    assert_eq!(
        events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        [
            format!("{name}:1"),
            format!("{name}:2"),
            format!("{name}:3")
        ]
    );
    stop.cancel();
    h.await.unwrap().unwrap();
    let info = consumer_info(&js, &name, "redel").await;
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
}

#[tokio::test]
async fn a_missing_stream_without_create_stops_the_source_with_the_reason() {
    let Some(_js) = server().await else { return };
    let name = unique("MISSING");
    let cfg = source_cfg(json!({"url": URL, "stream": name, "create": false}));
    let (_stop, h) = spawn(cfg, Arc::new(Mem::default()));
    let e = tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        e.message
            .contains(&format!("stream `{name}` does not exist")),
        "{e}"
    );
    assert!(e.message.contains("create: false"), "{e}");
}

fn delivery(id: i64, key: Option<&str>, payload: Value) -> Delivery {
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

fn sink_cfg(v: Value) -> NatsSinkConfig {
    NatsSinkConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

async fn stored(js: &jetstream::Context, stream: &str) -> Vec<jetstream::message::StreamMessage> {
    let mut s = js.get_stream(stream).await.unwrap();
    let last = s.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

#[tokio::test]
async fn sink_publishes_with_the_idempotency_key_and_cloudevents_headers() {
    let Some(js) = server().await else { return };
    let name = unique("SINK");
    let subj = name.to_lowercase();
    let _guard = Streams {
        names: vec![name.clone()],
    };
    stream(&js, &name, &[&format!("{subj}.>")], -1).await;
    let cfg = sink_cfg(json!({
        "url": URL, "subject": format!("{subj}.customers.{{key}}"),
        "headers": {"x-team": "crm"}
    }));
    let (sink, down) = NatsSink::connect("bus", cfg).await.unwrap();
    assert!(down.is_none());
    let batch = vec![
        delivery(1, Some("42"), json!({"name": "Ada"})),
        delivery(2, Some("a.b c"), json!({"name": "Bob"})),
        delivery(3, Some("7"), json!({"name": "Cy"})),
    ];
    let r = sink.write(&batch).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    // a retry of the same deliveries (a crash before the settle) is dropped
    // by the stream's duplicate window and still counts as written
    let r = sink.write(&batch).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    let msgs = stored(&js, &name).await;
    assert_eq!(msgs.len(), 3, "one message per idempotency key");
    let m = &msgs[0];
    assert_eq!(m.subject.as_str(), format!("{subj}.customers.42"));
    assert_eq!(
        msgs[1].subject.as_str(),
        format!("{subj}.customers.a%2Eb%20c")
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&m.payload).unwrap(),
        json!({"name": "Ada"})
    );
    let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned());
    assert_eq!(h("Nats-Msg-Id").as_deref(), Some("idem-1"));
    assert_eq!(h("ce-id").as_deref(), Some("idem-1"));
    assert_eq!(h("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(h("ce-source").as_deref(), Some("weft/customers"));
    assert_eq!(h("ce-type").as_deref(), Some("weft.customers"));
    assert_eq!(h("ce-time").as_deref(), Some("2026-01-01T00:00:00.000Z"));
    assert_eq!(h("ce-subject").as_deref(), Some("42"));
    assert_eq!(h("Content-Type").as_deref(), Some("application/json"));
    assert_eq!(h("x-correlation-id").as_deref(), Some("corr-1"));
    assert_eq!(h("x-causation-id").as_deref(), Some("ev-1"));
    assert_eq!(
        h("traceparent").as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(h("x-team").as_deref(), Some("crm"));
}

#[tokio::test]
async fn sink_errors_say_retryable_or_permanent() {
    let Some(js) = server().await else { return };
    let name = unique("SINKERR");
    let subj = name.to_lowercase();
    let _guard = Streams {
        names: vec![name.clone()],
    };
    // headers count: weft's are about 400 bytes
    stream(&js, &name, &[&format!("{subj}.>")], 1500).await;

    // no stream captures the subject: refused at start...
    let e = NatsSink::connect(
        "bus",
        sink_cfg(json!({"url": URL, "subject": format!("{subj}x.none")})),
    )
    .await
    .err()
    .unwrap();
    assert!(e.contains("no JetStream stream captures subject"), "{e}");
    // ...and a permanent failure of the write when not checked
    let (sink, _) = NatsSink::connect(
        "bus",
        sink_cfg(json!({"url": URL, "subject": format!("{subj}x.none"), "check_stream": false})),
    )
    .await
    .unwrap();
    let r = sink.write(&[delivery(1, None, json!({}))]).await;
    let e = r[0].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");

    let (sink, _) = NatsSink::connect(
        "bus",
        sink_cfg(json!({"url": URL, "subject": format!("{subj}.{{key}}")})),
    )
    .await
    .unwrap();
    let r = sink
        .write(&[
            // over the stream's max_msg_size (1500)
            delivery(1, Some("1"), json!({"text": "x".repeat(2000)})),
            // no entity key for `{key}`
            delivery(2, None, json!({})),
            delivery(3, Some("3"), json!({"ok": true})),
        ])
        .await;
    assert_eq!(
        r[0].as_ref().unwrap_err().kind,
        ErrorKind::Permanent,
        "{r:?}"
    );
    assert!(
        r[1].as_ref().unwrap_err().message.contains("no entity key"),
        "{r:?}"
    );
    assert_eq!(r[1].as_ref().unwrap_err().kind, ErrorKind::Permanent);
    assert!(r[2].is_ok(), "{r:?}");

    // nobody listening: the sink starts down, and a write is retryable
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (sink, down) = NatsSink::connect(
        "bus",
        sink_cfg(json!({
            "url": format!("nats://u:secret@127.0.0.1:{port}"), "subject": "a.b",
            "timeout": "300ms", "connect_timeout": "300ms"
        })),
    )
    .await
    .unwrap();
    let down = down.expect("down");
    assert!(down.contains(&format!("127.0.0.1:{port}")), "{down}");
    assert!(!down.contains("secret"), "{down}");
    let r = sink.write(&[delivery(1, None, json!({}))]).await;
    assert_eq!(
        r[0].as_ref().unwrap_err().kind,
        ErrorKind::Retryable,
        "{r:?}"
    );
}
