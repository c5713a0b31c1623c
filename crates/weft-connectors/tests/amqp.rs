//! The `amqp` source and sink against the real RabbitMQ on 127.0.0.1:5672
//! (guest/guest; `.ci/services.sh` starts it). Every test declares queues
//! and exchanges of its own (unique names) and deletes them at the end.
//! Skipped with a message when the broker is not reachable, unless
//! `CI=true`, where that is a failure.
#![cfg(feature = "amqp")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_connectors::broker::amqp::{AmqpSink, AmqpSinkConfig, AmqpSource, AmqpSourceConfig};
use weft_connectors::sink::DeliveryContext;
use weft_connectors::{
    BadRecord, Batch, Delivery, Ingest, IngestError, Receipt, Record, Sink, Source,
};
use weft_core::ErrorKind;
use weft_core::Event;
use weft_core::config::raw::ConnectorSettings;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A connection and a channel on the machine's broker, or `None` (skip)
/// when it is not there.
async fn broker() -> Option<(Connection, Channel)> {
    let c = tokio::time::timeout(
        Duration::from_secs(3),
        Connection::connect(URL, ConnectionProperties::default()),
    )
    .await;
    match c {
        Ok(Ok(c)) => {
            let ch = c.create_channel().await.unwrap();
            Some((c, ch))
        }
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            if ci() {
                panic!("RabbitMQ at 127.0.0.1:5672 is not reachable and CI=true: {why}");
            }
            eprintln!(
                "SKIPPED: RabbitMQ at 127.0.0.1:5672 is not reachable ({why}); run .ci/services.sh"
            );
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

/// Queues and exchanges deleted when the test ends, also when it fails.
struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // a runtime and a connection of their own: the test's runtime is
        // blocked while this waits
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(c) = Connection::connect(URL, ConnectionProperties::default()).await else {
                    return;
                };
                for q in queues {
                    let Ok(ch) = c.create_channel().await else {
                        return;
                    };
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for x in exchanges {
                    let Ok(ch) = c.create_channel().await else {
                        return;
                    };
                    let _ = ch
                        .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = c.close(200, "done".into()).await;
            });
        })
        .join();
    }
}

async fn exchange(ch: &Channel, name: &str) {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn queue(ch: &Channel, name: &str, bind: Option<(&str, &str)>) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    if let Some((x, key)) = bind {
        ch.queue_bind(
            name.into(),
            x.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
}

/// Messages ready in a queue (not counting those delivered and unacked).
async fn ready(c: &Connection, name: &str) -> u32 {
    let ch = c.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = ch.close(200, "ok".into()).await;
    q.message_count()
}

fn headers(pairs: &[(&str, &str)]) -> FieldTable {
    let mut h = FieldTable::default();
    for (k, v) in pairs {
        h.insert((*k).into(), AMQPValue::LongString(LongString::from(*v)));
    }
    h
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

fn with_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

/// An [`Ingest`] that keeps what it is given, and fails while `failing`
/// (keeping the ids it was offered).
#[derive(Default)]
struct Mem {
    events: Mutex<Vec<Event>>,
    bad: Mutex<Vec<BadRecord>>,
    offered: Mutex<Vec<Vec<String>>>,
    batches: AtomicUsize,
    failing: AtomicBool,
    attempts: AtomicUsize,
}

impl Ingest for Mem {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let ids = batch
                .records
                .iter()
                .map(|r| match r {
                    Record::Good(e) => e.id.clone(),
                    Record::Bad(b) => b.id.clone(),
                })
                .collect();
            self.offered.lock().unwrap().push(ids);
            if self.failing.load(Ordering::SeqCst) {
                return Err(IngestError::Store("disk on fire".into()));
            }
            self.batches.fetch_add(1, Ordering::SeqCst);
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

fn source_cfg(v: Value) -> AmqpSourceConfig {
    AmqpSourceConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

type Running = (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), weft_connectors::SourceError>>,
);

fn spawn(cfg: AmqpSourceConfig, ingest: Arc<Mem>) -> Running {
    let stop = CancellationToken::new();
    let src: Box<dyn Source> = Box::new(AmqpSource::new("bus", cfg));
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

#[tokio::test]
async fn source_acks_after_ingest_and_sends_bad_messages_to_the_dlq() {
    let Some((conn, ch)) = broker().await else {
        return;
    };
    let (x, q) = (unique("src_x"), unique("src_q"));
    let _cleanup = Cleanup {
        queues: vec![q.clone()],
        exchanges: vec![x.clone()],
    };
    exchange(&ch, &x).await;
    // the source declares the queue and binds it to the exchange itself
    let cfg = source_cfg(json!({
        "url": URL, "queue": q, "exchange": x, "routing_key": "orders.#",
        "batch": 16, "max_message_bytes": 512
    }));
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(cfg, mem.clone());
    // the source declares and binds after it starts: publish until a
    // message gets through, then start counting
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while mem.count() == 0 {
        assert!(Instant::now() < deadline, "queue not declared and bound");
        publish(&ch, &x, "orders.warm", b"{}", with_id(&format!("warm-{n}"))).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    mem.events.lock().unwrap().clear();
    for i in 0..30 {
        publish(
            &ch,
            &x,
            "orders.new",
            json!({"n": i}).to_string().as_bytes(),
            with_id(&format!("m-{i}")),
        )
        .await;
    }
    publish(&ch, &x, "orders.new", b"{\"n\": tru", with_id("bad-json")).await;
    publish(&ch, &x, "orders.new", &[b' '; 600], with_id("too-big")).await;
    // not routed to the queue: another routing key
    publish(&ch, &x, "invoices.new", b"{}", with_id("elsewhere")).await;
    publish(
        &ch,
        &x,
        "orders.ce",
        json!({"id": 7}).to_string().as_bytes(),
        BasicProperties::default()
            .with_correlation_id("corr-7".into())
            .with_headers(headers(&[
                ("cloudEvents:id", "evt-1"),
                ("cloudEvents:source", "/crm"),
                ("cloudEvents:type", "crm.customer.created"),
                ("cloudEvents:time", "2026-03-01T10:00:00Z"),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ])),
    )
    .await;
    // the JMS-style prefix is read too
    publish(
        &ch,
        &x,
        "orders.ce",
        b"{\"id\": 8}",
        BasicProperties::default().with_headers(headers(&[
            ("cloudEvents_id", "evt-2"),
            ("cloudEvents_source", "/crm"),
        ])),
    )
    .await;
    // no id at all: refused (DLQ), with the reason
    publish(
        &ch,
        &x,
        "orders.new",
        b"{\"n\": 1000}",
        BasicProperties::default(),
    )
    .await;
    wait_until("35 records", Duration::from_secs(10), || mem.count() >= 35).await;
    stop.cancel();
    h.await.unwrap().unwrap();
    // every message acked once stored: closing the source's connection
    // requeued nothing
    assert_eq!(ready(&conn, &q).await, 0);

    let events = mem.events.lock().unwrap().clone();
    let bad = mem.bad.lock().unwrap().clone();
    assert_eq!(events.len(), 32, "{bad:?}");
    assert_eq!(bad.len(), 3, "{bad:?}");
    for (i, e) in events[..30].iter().enumerate() {
        assert_eq!(e.id, format!("m-{i}"));
        assert_eq!(e.data, json!({"n": i}));
        assert_eq!(e.subject.as_deref(), Some("orders.new"));
        assert_eq!(e.ty, "bus.message");
        assert_eq!(e.source, "weft:bus/amqp");
    }
    assert_eq!(bad[0].id, "bad-json");
    assert_eq!(
        bad[0].location,
        format!("amqp queue {q} (exchange {x}, routing key orders.new, message_id bad-json)")
    );
    assert!(bad[0].error.contains("not JSON"), "{}", bad[0].error);
    assert_eq!(bad[0].raw, "{\"n\": tru");
    assert_eq!(bad[1].id, "too-big");
    assert!(
        bad[1]
            .error
            .contains("600 bytes is over max_message_bytes (512)"),
        "{}",
        bad[1].error
    );
    assert!(bad[2].error.contains("has no id"), "{}", bad[2].error);
    assert!(
        bad[2].id.starts_with(&format!("{q}:sha256:")),
        "{}",
        bad[2].id
    );
    assert_eq!(bad[2].raw, "{\"n\": 1000}");
    // CloudEvents AMQP binding: the attributes become the event's
    let ce = &events[30];
    assert_eq!(ce.id, "/crm#evt-1");
    assert_eq!(ce.source, "/crm");
    assert_eq!(ce.ty, "crm.customer.created");
    assert_eq!(ce.time.to_rfc3339(), "2026-03-01T10:00:00+00:00");
    assert_eq!(ce.correlationid, "corr-7");
    assert_eq!(
        ce.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(events[31].id, "/crm#evt-2");
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_refused_batch_is_held_then_stored_once_and_a_requeued_one_keeps_its_ids() {
    let Some((conn, ch)) = broker().await else {
        return;
    };
    let q = unique("hold_q");
    let _cleanup = Cleanup {
        queues: vec![q.clone()],
        exchanges: Vec::new(),
    };
    queue(&ch, &q, None).await;
    for i in 0..4 {
        publish(
            &ch,
            "",
            &q,
            json!({"n": i}).to_string().as_bytes(),
            with_id(&format!("h-{i}")),
        )
        .await;
    }
    // no id: named by its content
    publish(&ch, "", &q, b"{\"anon\": true}", BasicProperties::default()).await;
    let settings = json!({"url": URL, "queue": q, "declare": false, "event_id": "content"});
    let first = Arc::new(Mem::default());
    first.failing.store(true, Ordering::SeqCst);
    let (stop, h) = spawn(source_cfg(settings.clone()), first.clone());
    wait_until("three refused attempts", Duration::from_secs(10), || {
        first.attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    // held: not acked, and not nack'ed back into the queue to come round
    assert_eq!(ready(&conn, &q).await, 0);
    let offered = first.offered.lock().unwrap().clone();
    assert!(offered.iter().all(|ids| ids == &offered[0]), "{offered:?}");
    assert_eq!(offered[0].len(), 5, "{offered:?}");
    // stopping with the batch held gives it back to the queue
    stop.cancel();
    h.await.unwrap().unwrap();
    assert_eq!(first.count(), 0);
    assert_eq!(ready(&conn, &q).await, 5);

    // the redelivery has the same ids, the one without a message_id too
    let second = Arc::new(Mem::default());
    second.failing.store(true, Ordering::SeqCst);
    let (stop, h) = spawn(source_cfg(settings), second.clone());
    wait_until("a refused attempt", Duration::from_secs(10), || {
        second.attempts.load(Ordering::SeqCst) >= 2
    })
    .await;
    second.failing.store(false, Ordering::SeqCst);
    wait_until("the held batch", Duration::from_secs(10), || {
        second.count() == 5
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();
    assert_eq!(second.batches.load(Ordering::SeqCst), 1);
    let ids: Vec<String> = second
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(ids, offered[0]);
    assert_eq!(&ids[..4], ["h-0", "h-1", "h-2", "h-3"]);
    assert!(ids[4].starts_with(&format!("{q}:sha256:")), "{ids:?}");
    assert_eq!(ready(&conn, &q).await, 0, "acked once stored");
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_missing_queue_without_declare_stops_the_source_with_the_reason() {
    let Some((conn, _ch)) = broker().await else {
        return;
    };
    let q = unique("missing_q");
    let cfg = source_cfg(json!({"url": URL, "queue": q, "declare": false}));
    let (_stop, h) = spawn(cfg, Arc::new(Mem::default()));
    let e = tokio::time::timeout(Duration::from_secs(10), h)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        e.message.contains(&format!("queue `{q}` does not exist")),
        "{e}"
    );
    assert!(e.message.contains("declare: false"), "{e}");
    let _ = conn.close(200, "done".into()).await;
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

fn sink_cfg(v: Value) -> AmqpSinkConfig {
    AmqpSinkConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

fn text(h: &FieldTable, name: &str) -> Option<String> {
    match h.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test]
async fn sink_publishes_confirmed_persistent_messages_with_the_idempotency_key() {
    let Some((conn, ch)) = broker().await else {
        return;
    };
    let (x, q) = (unique("sink_x"), unique("sink_q"));
    let _cleanup = Cleanup {
        queues: vec![q.clone()],
        exchanges: vec![x.clone()],
    };
    exchange(&ch, &x).await;
    queue(&ch, &q, Some((&x, "customers.*"))).await;
    let cfg = sink_cfg(json!({
        "url": URL, "exchange": x, "routing_key": "customers.{key}",
        "headers": {"x-team": "crm"}
    }));
    let (sink, down) = AmqpSink::connect("bus", cfg).await.unwrap();
    assert!(down.is_none());
    let batch = vec![
        delivery(1, Some("42"), json!({"name": "Ada"})),
        delivery(2, Some("a.b c"), json!({"name": "Bob"})),
        delivery(3, Some("7"), json!({"name": "Cy"})),
    ];
    let r = sink.write(&batch).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    // confirmed means in the queue
    assert_eq!(ready(&conn, &q).await, 3);
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(m.delivery);
    }
    assert_eq!(got.len(), 3);
    let m = &got[0];
    assert_eq!(m.routing_key.as_str(), "customers.42");
    assert_eq!(got[1].routing_key.as_str(), "customers.a%2Eb%20c");
    assert_eq!(
        serde_json::from_slice::<Value>(&m.data).unwrap(),
        json!({"name": "Ada"})
    );
    let p = &m.properties;
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "idem-1");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-1");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(*p.timestamp(), Some(1_767_225_600));
    let h = p.headers().as_ref().unwrap();
    assert_eq!(text(h, "cloudEvents:id").as_deref(), Some("idem-1"));
    assert_eq!(text(h, "cloudEvents:specversion").as_deref(), Some("1.0"));
    assert_eq!(
        text(h, "cloudEvents:source").as_deref(),
        Some("weft/customers")
    );
    assert_eq!(
        text(h, "cloudEvents:type").as_deref(),
        Some("weft.customers")
    );
    assert_eq!(
        text(h, "cloudEvents:time").as_deref(),
        Some("2026-01-01T00:00:00.000Z")
    );
    assert_eq!(text(h, "cloudEvents:subject").as_deref(), Some("42"));
    assert_eq!(text(h, "x-correlation-id").as_deref(), Some("corr-1"));
    assert_eq!(text(h, "x-causation-id").as_deref(), Some("ev-1"));
    assert_eq!(
        text(h, "traceparent").as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(text(h, "x-team").as_deref(), Some("crm"));
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn sink_errors_say_retryable_or_permanent() {
    let Some((conn, ch)) = broker().await else {
        return;
    };
    let (x, q) = (unique("err_x"), unique("err_q"));
    let mut cleanup = Cleanup {
        queues: vec![q.clone()],
        exchanges: vec![x.clone()],
    };
    exchange(&ch, &x).await;
    queue(&ch, &q, Some((&x, "bound.*"))).await;

    // a missing exchange: refused at start, like a missing table
    let none = unique("none_x");
    let e = AmqpSink::connect(
        "bus",
        sink_cfg(json!({"url": URL, "exchange": none, "routing_key": "a"})),
    )
    .await
    .err()
    .unwrap();
    assert!(
        e.contains(&format!("exchange `{none}` does not exist")),
        "{e}"
    );

    let (sink, _) = AmqpSink::connect(
        "bus",
        sink_cfg(json!({"url": URL, "exchange": x, "routing_key": "{kind}.{key}"})),
    )
    .await
    .unwrap();
    let r = sink
        .write(&[
            // routed nowhere: returned by the broker (mandatory)
            delivery(1, Some("1"), json!({"kind": "unbound"})),
            // no entity key for `{key}`
            delivery(2, None, json!({"kind": "bound"})),
            delivery(3, Some("3"), json!({"kind": "bound"})),
        ])
        .await;
    let e0 = r[0].as_ref().unwrap_err();
    assert_eq!(e0.kind, ErrorKind::Permanent, "{r:?}");
    assert!(e0.message.contains("returned the message"), "{e0}");
    assert!(e0.message.contains("NO_ROUTE"), "{e0}");
    let e1 = r[1].as_ref().unwrap_err();
    assert_eq!(e1.kind, ErrorKind::Permanent);
    assert!(e1.message.contains("no entity key"), "{e1}");
    assert!(r[2].is_ok(), "{r:?}");
    assert_eq!(ready(&conn, &q).await, 1);

    // the exchange deleted under a running sink: permanent, and the sink
    // works again once it is back
    ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let r = sink
        .write(&[delivery(4, Some("4"), json!({"kind": "bound"}))])
        .await;
    let e = r[0].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("does not exist"), "{e}");
    exchange(&ch, &x).await;
    queue(&ch, &q, Some((&x, "bound.*"))).await;
    let r = sink
        .write(&[delivery(5, Some("5"), json!({"kind": "bound"}))])
        .await;
    assert!(r[0].is_ok(), "{r:?}");

    // nobody listening: the sink starts down, and a write is retryable
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (sink, down) = AmqpSink::connect(
        "bus",
        sink_cfg(json!({
            "url": format!("amqp://u:secret@127.0.0.1:{port}/%2f"), "exchange": "x",
            "routing_key": "a", "timeout": "300ms", "connect_timeout": "300ms"
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
    cleanup.exchanges.push(x);
    let _ = conn.close(200, "done".into()).await;
}

/// `format: {avro: ...}` on the sink: the bodies in the queue are datums
/// of the schema (read back with the same schema as a source would), the
/// content type says Avro, and a record the schema does not fit fails
/// permanently (dead-lettered) without stopping the others.
#[tokio::test]
async fn an_avro_sink_publishes_datums_of_its_schema() {
    let Some((conn, ch)) = broker().await else {
        return;
    };
    let (x, q) = (unique("avro_x"), unique("avro_q"));
    let _cleanup = Cleanup {
        queues: vec![q.clone()],
        exchanges: vec![x.clone()],
    };
    exchange(&ch, &x).await;
    queue(&ch, &q, Some((&x, "customers.*"))).await;
    let schema = json!({"type": "record", "name": "Customer", "fields": [
        {"name": "name", "type": "string"}, {"name": "vip", "type": "boolean", "default": false}]});
    let cfg = sink_cfg(json!({
        "url": URL, "exchange": x, "routing_key": "customers.{key}",
        "format": {"avro": {"schema": schema}}
    }));
    let (sink, _) = AmqpSink::connect("bus", cfg).await.unwrap();
    let batch = vec![
        delivery(1, Some("1"), json!({"name": "Ada", "vip": true})),
        delivery(2, Some("2"), json!({"name": 5})),
        delivery(3, Some("3"), json!({"name": "Cy", "vip": false})),
    ];
    let r = sink.write(&batch).await;
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    let e = r[1].as_ref().unwrap_err();
    assert_eq!(e.kind, weft_core::ErrorKind::Permanent, "{e}");
    assert!(e.message.contains("does not fit the Avro schema"), "{e}");
    assert_eq!(ready(&conn, &q).await, 2);
    let reader: weft_connectors::broker::Format =
        serde_json::from_value(json!({"avro": {"schema": schema}})).unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert_eq!(
            m.delivery
                .properties
                .content_type()
                .as_ref()
                .unwrap()
                .as_str(),
            "application/avro"
        );
        got.push(reader.decode(&m.delivery.data).unwrap());
    }
    assert_eq!(
        got,
        vec![
            json!({"name": "Ada", "vip": true}),
            json!({"name": "Cy", "vip": false})
        ]
    );
    let _ = conn.close(200, "done".into()).await;
}

/// The same with Protobuf: messages of the `.proto`'s message with its
/// content type, a record with a field the message lacks permanent.
#[tokio::test]
async fn a_protobuf_sink_publishes_messages_of_its_proto_file() {
    let Some((conn, ch)) = broker().await else {
        return;
    };
    let (x, q) = (unique("proto_x"), unique("proto_q"));
    let _cleanup = Cleanup {
        queues: vec![q.clone()],
        exchanges: vec![x.clone()],
    };
    exchange(&ch, &x).await;
    queue(&ch, &q, Some((&x, "customers.*"))).await;
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("crm.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\npackage crm;\nmessage Customer { string name = 1; bool vip = 2; int64 since_ms = 3; }\n",
    )
    .unwrap();
    let format = json!({"protobuf": {"schema": proto, "message": "crm.Customer"}});
    let cfg = sink_cfg(json!({
        "url": URL, "exchange": x, "routing_key": "customers.{key}", "format": format
    }));
    let (sink, _) = AmqpSink::connect("bus", cfg).await.unwrap();
    let batch = vec![
        delivery(
            1,
            Some("1"),
            json!({"name": "Ada", "vip": true, "since_ms": 5}),
        ),
        delivery(
            2,
            Some("2"),
            json!({"name": "Bob", "email": "b@example.com"}),
        ),
        delivery(3, Some("3"), json!({"name": "Cy"})),
    ];
    let r = sink.write(&batch).await;
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    let e = r[1].as_ref().unwrap_err();
    assert_eq!(e.kind, weft_core::ErrorKind::Permanent, "{e}");
    assert!(
        e.message
            .contains("does not fit Protobuf message crm.Customer"),
        "{e}"
    );
    assert_eq!(ready(&conn, &q).await, 2);
    let reader: weft_connectors::broker::Format = serde_json::from_value(format).unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert_eq!(
            m.delivery
                .properties
                .content_type()
                .as_ref()
                .unwrap()
                .as_str(),
            "application/x-protobuf"
        );
        got.push(reader.decode(&m.delivery.data).unwrap());
    }
    assert_eq!(
        got,
        vec![
            json!({"name": "Ada", "vip": true, "sinceMs": "5"}),
            json!({"name": "Cy", "vip": false, "sinceMs": "0"})
        ]
    );
    let _ = conn.close(200, "done".into()).await;
}
