//! The `mqtt` source and sink against the real Mosquitto on 127.0.0.1:1883
//! (`.ci/services.sh` starts it). Every test uses topics and client ids of
//! its own (unique names) and removes the persistent sessions it made at
//! the end. Skipped with a message when the broker is not reachable,
//! unless `CI=true`, where that is a failure.
#![cfg(feature = "mqtt")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use weft_connectors::broker::mqtt::{MqttSink, MqttSinkConfig, MqttSource, MqttSourceConfig};
use weft_connectors::sink::DeliveryContext;
use weft_connectors::{
    BadRecord, Batch, Delivery, Ingest, IngestError, Receipt, Record, Sink, Source,
};
use weft_core::ErrorKind;
use weft_core::Event as WeftEvent;
use weft_core::config::raw::ConnectorSettings;

const URL: &str = "mqtt://127.0.0.1:1883";

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!("{prefix}_{:x}", t ^ ((std::process::id() as u64) << 40))
}

/// A plain MQTT 5 client of the test's: publishes (waiting for the
/// PUBACKs) and collects what its subscriptions bring.
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Packet>,
    got: Vec<Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// A clean-session client on the machine's broker, or `None` (skip).
    async fn machine() -> Option<Client> {
        match Client::connect(1883, &unique("test"), true).await {
            Ok(c) => Some(c),
            Err(why) if ci() => {
                panic!("Mosquitto at 127.0.0.1:1883 is not reachable and CI=true: {why}")
            }
            Err(why) => {
                eprintln!(
                    "SKIPPED: Mosquitto at 127.0.0.1:1883 is not reachable ({why}); run .ci/services.sh"
                );
                None
            }
        }
    }

    async fn connect(port: u16, id: &str, clean: bool) -> Result<Client, String> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_start(clean);
        o.set_max_packet_size(Some(1 << 24));
        let (client, mut el) = AsyncClient::new(o, 1024);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(3), events.recv()).await {
            Ok(Some(Packet::ConnAck(_))) => Ok(Client {
                client,
                events,
                got: Vec::new(),
                task,
            }),
            Ok(other) => Err(format!("no CONNACK: {other:?}")),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Take events until `want` holds of one (collecting messages).
    async fn until(&mut self, what: &str, mut want: impl FnMut(&Packet) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let p = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .unwrap_or_else(|| panic!("client gone waiting for {what}"));
            let hit = want(&p);
            if let Packet::Publish(m) = p {
                self.got.push(m);
            }
            if hit {
                return;
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        self.until("SUBACK", |p| matches!(p, Packet::SubAck(_)))
            .await;
    }

    /// Publish at QoS 1 and wait for the broker's PUBACK.
    async fn publish(&mut self, topic: &str, body: &[u8], props: Vec<(&str, &str)>) {
        let mut p = PublishProperties::default();
        for (k, v) in props {
            if k == "content-type" {
                p.content_type = Some(v.to_owned());
            } else if k == "correlation-data" {
                p.correlation_data = Some(Bytes::from(v.to_owned()));
            } else {
                p.user_properties.push((k.to_owned(), v.to_owned()));
            }
        }
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_vec(), p)
            .await
            .unwrap();
        self.until("PUBACK", |p| matches!(p, Packet::PubAck(_)))
            .await;
    }

    /// Wait until `n` messages were collected.
    async fn messages(&mut self, n: usize) -> Vec<Publish> {
        while self.got.len() < n {
            let what = format!("{n} messages (have {})", self.got.len());
            self.until(&what, |p| matches!(p, Packet::Publish(_))).await;
        }
        self.got.clone()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Remove the persistent session of `client_id` from the broker.
async fn forget_session(client_id: &str) {
    if let Ok(c) = Client::connect(1883, client_id, true).await {
        let _ = c.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn prop<'a>(m: &'a Publish, name: &str) -> Option<&'a str> {
    m.properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// An [`Ingest`] that keeps what it is given, and fails while `failing`
/// (keeping the ids it was offered).
#[derive(Default)]
struct Mem {
    events: Mutex<Vec<WeftEvent>>,
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
    fn ids(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.id.clone())
            .collect()
    }
}

fn source_cfg(v: Value) -> MqttSourceConfig {
    MqttSourceConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

type Running = (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), weft_connectors::SourceError>>,
);

fn spawn(cfg: MqttSourceConfig, ingest: Arc<Mem>) -> Running {
    let stop = CancellationToken::new();
    let src: Box<dyn Source> = Box::new(MqttSource::new("bus", cfg));
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

/// Publish `warm-*` messages until the source (which subscribes after it
/// connects) has one, then one more and wait for it: every warm message
/// that gets through is in before this returns.
async fn until_subscribed(c: &mut Client, topic: &str, mem: &Mem) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while mem.count() == 0 {
        assert!(Instant::now() < deadline, "the source did not subscribe");
        c.publish(topic, b"{}", vec![("id", &format!("warm-{n}"))])
            .await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.publish(topic, b"{}", vec![("id", "warm-end")]).await;
    wait_until("the last warm message", Duration::from_secs(10), || {
        mem.ids().iter().any(|i| i == "warm-end")
    })
    .await;
}

/// What is not a warm message.
fn cold(events: &[WeftEvent]) -> Vec<WeftEvent> {
    events
        .iter()
        .filter(|e| !e.id.starts_with("warm-"))
        .cloned()
        .collect()
}

#[tokio::test]
async fn source_acks_after_ingest_and_sends_bad_messages_to_the_dlq() {
    let Some(mut c) = Client::machine().await else {
        return;
    };
    let t = unique("src");
    let client_id = unique("weft-src");
    let settings = json!({
        "url": URL, "topics": [format!("{t}/orders/#"), format!("{t}/+/ce")],
        "client_id": client_id, "session_expiry": "1m",
        "batch": 16, "max_message_bytes": 512
    });
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(source_cfg(settings.clone()), mem.clone());
    until_subscribed(&mut c, &format!("{t}/orders/warm"), &mem).await;
    let new = format!("{t}/orders/new");
    for i in 0..30 {
        c.publish(
            &new,
            json!({"n": i}).to_string().as_bytes(),
            vec![("id", &format!("m-{i}")), ("source", "/shop")],
        )
        .await;
    }
    c.publish(&new, b"{\"n\": tru", vec![("id", "bad-json")])
        .await;
    c.publish(&new, &[b' '; 600], vec![("id", "too-big")]).await;
    // not subscribed
    c.publish(
        &format!("{t}/invoices/new"),
        b"{}",
        vec![("id", "elsewhere")],
    )
    .await;
    c.publish(
        &format!("{t}/crm/ce"),
        json!({"id": 7}).to_string().as_bytes(),
        vec![
            ("specversion", "1.0"),
            ("id", "evt-1"),
            ("source", "/crm"),
            ("type", "crm.customer.created"),
            ("time", "2026-03-01T10:00:00Z"),
            ("correlation-data", "corr-7"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
    )
    .await;
    // a structured-mode CloudEvent: its id is in the body
    c.publish(
        &format!("{t}/erp/ce"),
        json!({"specversion": "1.0", "id": "9", "source": "/erp", "type": "erp.x", "data": {"n": 1}})
            .to_string()
            .as_bytes(),
        vec![("content-type", "application/cloudevents+json")],
    )
    .await;
    // no id at all: refused (DLQ), with the reason
    c.publish(&new, b"{\"n\": 1000}", vec![]).await;
    wait_until("35 records", Duration::from_secs(10), || {
        cold(&mem.events.lock().unwrap()).len() + mem.bad.lock().unwrap().len() >= 35
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();

    let events = cold(&mem.events.lock().unwrap());
    let bad = mem.bad.lock().unwrap().clone();
    assert_eq!(events.len(), 32, "{bad:?}");
    assert_eq!(bad.len(), 3, "{bad:?}");
    for (i, e) in events[..30].iter().enumerate() {
        assert_eq!(e.id, format!("/shop#m-{i}"));
        assert_eq!(e.data, json!({"n": i}));
        assert_eq!(e.subject.as_deref(), Some(new.as_str()), "the topic");
        assert_eq!(e.ty, "bus.message");
        assert_eq!(e.source, "/shop");
    }
    assert_eq!(bad[0].id, "bad-json");
    assert_eq!(bad[0].location, format!("mqtt topic {new} (id bad-json)"));
    assert!(bad[0].error.contains("not JSON"), "{}", bad[0].error);
    assert_eq!(bad[0].raw, "{\"n\": tru");
    assert!(
        bad[1]
            .error
            .contains("600 bytes is over max_message_bytes (512)"),
        "{}",
        bad[1].error
    );
    assert!(bad[2].error.contains("has no id"), "{}", bad[2].error);
    assert!(
        bad[2].error.contains("event_id: content"),
        "{}",
        bad[2].error
    );
    assert_eq!(bad[2].raw, "{\"n\": 1000}");
    assert!(
        bad[2].id.starts_with(&format!("{new}:sha256:")),
        "{}",
        bad[2].id
    );
    // CloudEvents MQTT binding: the user properties become the event's
    let ce = &events[30];
    assert_eq!(ce.id, "/crm#evt-1");
    assert_eq!(ce.source, "/crm");
    assert_eq!(ce.ty, "crm.customer.created");
    assert_eq!(ce.time.to_rfc3339(), "2026-03-01T10:00:00+00:00");
    assert_eq!(ce.correlationid, "corr-7", "from the Correlation Data");
    assert_eq!(
        ce.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(events[31].id, "/erp#9");
    assert_eq!(events[31].data, json!({"n": 1}));

    // every message was acked once stored: the session (same client id)
    // has nothing to send again but a sentinel published now
    let again = Arc::new(Mem::default());
    let (stop, h) = spawn(source_cfg(settings), again.clone());
    c.publish(&new, b"{}", vec![("id", "sentinel")]).await;
    wait_until("the sentinel", Duration::from_secs(10), || {
        again.ids().contains(&"sentinel".to_owned())
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();
    assert_eq!(again.ids(), ["sentinel"], "{:?}", again.bad.lock().unwrap());
    assert!(again.bad.lock().unwrap().is_empty());
    forget_session(&client_id).await;
}

#[tokio::test]
async fn a_refused_batch_is_held_and_the_session_keeps_messages_while_weft_is_away() {
    let Some(mut c) = Client::machine().await else {
        return;
    };
    let t = unique("hold");
    let client_id = unique("weft-hold");
    let topic = format!("{t}/items");
    let settings = json!({
        "url": URL, "topics": [format!("{t}/#")], "client_id": client_id,
        "session_expiry": "1m", "event_id": {"field": ".n"}
    });
    // a first run makes the session (and its subscription)
    let first = Arc::new(Mem::default());
    let (stop, h) = spawn(source_cfg(settings.clone()), first.clone());
    until_subscribed(&mut c, &topic, &first).await;
    stop.cancel();
    h.await.unwrap().unwrap();
    // while the source is away: kept by the session
    for i in 0..4 {
        c.publish(&topic, json!({"n": i}).to_string().as_bytes(), vec![])
            .await;
    }
    // a CloudEvents id wins over the field
    c.publish(&topic, b"{\"n\": 99}", vec![("id", "ce-5")])
        .await;
    // the field missing: DLQ with the reason
    c.publish(&topic, b"{\"m\": 1}", vec![]).await;

    let second = Arc::new(Mem::default());
    second.failing.store(true, Ordering::SeqCst);
    let (stop, h) = spawn(source_cfg(settings.clone()), second.clone());
    wait_until("three refused attempts", Duration::from_secs(10), || {
        second.attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    // the held batch is offered again as it was: what arrived without a
    // 5 ms pause (all six on a quiet machine; on a loaded one the session's
    // messages can come over several reads, so a prefix, in order)
    let offered = second.offered.lock().unwrap().clone();
    assert!(offered.iter().all(|ids| ids == &offered[0]), "{offered:?}");
    let held = offered[0].clone();
    assert!(!held.is_empty() && held.len() <= 6, "{offered:?}");
    let n = held.len().min(5);
    assert_eq!(
        &held[..n],
        &["0", "1", "2", "3", "ce-5"][..n],
        "{offered:?}"
    );
    // stopping with the batch held: not acked, so the broker sends it again
    stop.cancel();
    h.await.unwrap().unwrap();
    assert_eq!(second.count(), 0);

    let third = Arc::new(Mem::default());
    third.failing.store(true, Ordering::SeqCst);
    let (stop, h) = spawn(source_cfg(settings.clone()), third.clone());
    wait_until("a refused attempt", Duration::from_secs(10), || {
        third.attempts.load(Ordering::SeqCst) >= 2
    })
    .await;
    third.failing.store(false, Ordering::SeqCst);
    wait_until("the held batch", Duration::from_secs(10), || {
        third.count() == 6
    })
    .await;
    // and a sentinel after it: nothing else comes
    c.publish(&topic, b"{\"n\": \"sentinel\"}", vec![]).await;
    wait_until("the sentinel", Duration::from_secs(10), || {
        third.count() == 7
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();
    assert_eq!(third.ids(), ["0", "1", "2", "3", "ce-5", "sentinel"]);
    let bad = third.bad.lock().unwrap().clone();
    assert_eq!(bad.len(), 1);
    assert!(bad[0].error.contains("null at `.n`"), "{}", bad[0].error);
    if let Some(id) = held.get(5) {
        assert_eq!(&bad[0].id, id, "the same id when it comes again");
    }
    forget_session(&client_id).await;
}

#[tokio::test]
async fn content_ids_name_identical_messages_alike() {
    let Some(mut c) = Client::machine().await else {
        return;
    };
    let t = unique("content");
    let client_id = unique("weft-content");
    let topic = format!("{t}/x");
    let mem = Arc::new(Mem::default());
    let (stop, h) = spawn(
        source_cfg(json!({
            "url": URL, "topics": [topic], "client_id": client_id,
            "session_expiry": "1m", "event_id": "content"
        })),
        mem.clone(),
    );
    until_subscribed(&mut c, &topic, &mem).await;
    c.publish(&topic, b"{\"a\": 1}", vec![]).await;
    c.publish(&topic, b"{\"a\": 1}", vec![]).await;
    c.publish(&topic, b"{\"a\": 2}", vec![]).await;
    wait_until("3 events", Duration::from_secs(10), || {
        cold(&mem.events.lock().unwrap()).len() >= 3
    })
    .await;
    stop.cancel();
    h.await.unwrap().unwrap();
    let ids: Vec<String> = cold(&mem.events.lock().unwrap())
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_ne!(ids[0], ids[2]);
    assert!(ids[0].starts_with(&format!("{topic}:sha256:")), "{ids:?}");
    forget_session(&client_id).await;
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

fn sink_cfg(v: Value) -> MqttSinkConfig {
    MqttSinkConfig::from_settings("bus", &ConnectorSettings(v)).unwrap()
}

#[tokio::test]
async fn sink_publishes_acknowledged_messages_with_the_cloudevent() {
    let Some(mut c) = Client::machine().await else {
        return;
    };
    let t = unique("sink");
    c.subscribe(&format!("{t}/#")).await;
    let cfg = sink_cfg(json!({
        "url": URL, "topic": format!("{t}/customers/{{key}}"),
        "user_properties": {"x-team": "crm"}
    }));
    let (sink, down) = MqttSink::connect("bus", cfg).await.unwrap();
    assert!(down.is_none(), "{down:?}");
    let mut batch = vec![
        delivery(1, Some("42"), json!({"name": "Ada"})),
        delivery(2, Some("a/b+c #"), json!({"name": "Bob"})),
        // no entity key for `{key}`: permanent, the others go on
        delivery(3, None, json!({"name": "Cy"})),
    ];
    for i in 4..60 {
        batch.push(delivery(i, Some(&i.to_string()), json!({"n": i})));
    }
    let r = sink.write(&batch).await;
    let e = r[2].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("no entity key"), "{e}");
    assert_eq!(r.iter().filter(|r| r.is_ok()).count(), 58, "{r:?}");
    let got = c.messages(58).await;
    let m = &got[0];
    assert_eq!(
        String::from_utf8_lossy(&m.topic),
        format!("{t}/customers/42")
    );
    assert_eq!(
        String::from_utf8_lossy(&got[1].topic),
        format!("{t}/customers/a%2Fb%2Bc%20%23")
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&m.payload).unwrap(),
        json!({"name": "Ada"})
    );
    assert_eq!(m.qos, QoS::AtLeastOnce);
    assert!(!m.retain);
    let p = m.properties.as_ref().unwrap();
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(prop(m, "id"), Some("idem-1"));
    assert_eq!(prop(m, "specversion"), Some("1.0"));
    assert_eq!(prop(m, "source"), Some("weft/customers"));
    assert_eq!(prop(m, "type"), Some("weft.customers"));
    assert_eq!(prop(m, "time"), Some("2026-01-01T00:00:00.000Z"));
    assert_eq!(prop(m, "subject"), Some("42"));
    assert_eq!(prop(m, "x-correlation-id"), Some("corr-1"));
    assert_eq!(prop(m, "x-causation-id"), Some("ev-1"));
    assert_eq!(
        prop(m, "traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(prop(m, "x-team"), Some("crm"));
    // in order, every one once
    let ids: Vec<&str> = got.iter().map(|m| prop(m, "id").unwrap()).collect();
    let want: Vec<String> = [1, 2]
        .into_iter()
        .chain(4..60)
        .map(|i| format!("idem-{i}"))
        .collect();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn sink_errors_say_retryable_and_never_show_the_password() {
    if Client::machine().await.is_none() {
        return;
    }
    // nobody listening: the sink starts down, and a write is retryable
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (sink, down) = MqttSink::connect(
        "bus",
        sink_cfg(json!({
            "url": format!("mqtt://u:secret@127.0.0.1:{port}"), "topic": "a/b",
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

/// `format: {avro: ...}` on the sink: datums of the schema with the Avro
/// content type; a record the schema does not fit fails permanently and
/// the others go on.
#[tokio::test]
async fn an_avro_sink_publishes_datums_of_its_schema() {
    let Some(mut c) = Client::machine().await else {
        return;
    };
    let t = unique("avro");
    c.subscribe(&format!("{t}/#")).await;
    let schema = json!({"type": "record", "name": "Reading", "fields": [
        {"name": "sensor", "type": "string"}, {"name": "value", "type": "double"}]});
    let cfg = sink_cfg(json!({
        "url": URL, "topic": format!("{t}/readings/{{key}}"),
        "format": {"avro": {"schema": schema}}
    }));
    let (sink, _) = MqttSink::connect("bus", cfg).await.unwrap();
    let batch = vec![
        delivery(1, Some("a"), json!({"sensor": "a", "value": 1.5})),
        delivery(2, Some("b"), json!({"sensor": "b"})),
        delivery(3, Some("c"), json!({"sensor": "c", "value": -2.0})),
    ];
    let r = sink.write(&batch).await;
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    let e = r[1].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("does not fit the Avro schema"), "{e}");
    let reader: weft_connectors::broker::Format =
        serde_json::from_value(json!({"avro": {"schema": schema}})).unwrap();
    let got = c.messages(2).await;
    let values: Vec<Value> = got
        .iter()
        .map(|m| {
            let p = m.properties.as_ref().unwrap();
            assert_eq!(p.content_type.as_deref(), Some("application/avro"));
            reader.decode(&m.payload).unwrap()
        })
        .collect();
    assert_eq!(
        values,
        vec![
            json!({"sensor": "a", "value": 1.5}),
            json!({"sensor": "c", "value": -2.0})
        ]
    );
}

/// The same with Protobuf, and no UTF-8 payload format indicator on the
/// binary body.
#[tokio::test]
async fn a_protobuf_sink_publishes_messages_of_its_proto_file() {
    let Some(mut c) = Client::machine().await else {
        return;
    };
    let t = unique("proto");
    c.subscribe(&format!("{t}/#")).await;
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("iot.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\npackage iot;\nmessage Reading { string sensor = 1; double value = 2; }\n",
    )
    .unwrap();
    let format = json!({"protobuf": {"schema": proto, "message": "iot.Reading"}});
    let cfg = sink_cfg(json!({
        "url": URL, "topic": format!("{t}/readings/{{key}}"), "format": format
    }));
    let (sink, _) = MqttSink::connect("bus", cfg).await.unwrap();
    let batch = vec![
        delivery(1, Some("a"), json!({"sensor": "a", "value": 1.5})),
        delivery(2, Some("b"), json!({"sensor": "b", "value": "high"})),
        delivery(3, Some("c"), json!({"sensor": "c", "value": -2.0})),
    ];
    let r = sink.write(&batch).await;
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    let e = r[1].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(
        e.message
            .contains("does not fit Protobuf message iot.Reading"),
        "{e}"
    );
    let reader: weft_connectors::broker::Format = serde_json::from_value(format).unwrap();
    let got = c.messages(2).await;
    let values: Vec<Value> = got
        .iter()
        .map(|m| {
            let p = m.properties.as_ref().unwrap();
            assert_eq!(p.content_type.as_deref(), Some("application/x-protobuf"));
            assert_eq!(p.payload_format_indicator, None);
            reader.decode(&m.payload).unwrap()
        })
        .collect();
    assert_eq!(
        values,
        vec![
            json!({"sensor": "a", "value": 1.5}),
            json!({"sensor": "c", "value": -2.0})
        ]
    );
}
