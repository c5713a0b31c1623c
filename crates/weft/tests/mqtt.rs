//! MQTT 5 in and out through the real `weft` binary.
//!
//! Guarantees: messages consumed from a topic reach the destination topic
//! with one CloudEvents `id` per input message, none lost, whether weft is
//! SIGKILLed while consuming and publishing or the broker restarts under
//! it (MQTT does not dedupe: a publish repeated after a kill is a second
//! copy with the same `id`, counted and printed); bad messages (not JSON,
//! oversized) go to the DLQ with where they were and consumption goes on;
//! CloudEvents attributes, the correlation id and the trace context travel
//! from message to message.
//!
//! The machine's Mosquitto on 127.0.0.1:1883 (`.ci/services.sh`), topics
//! and client ids of each test's own (the persistent sessions removed at
//! the end); the restart test starts a mosquitto of its own on its own
//! port with persistence in a temporary directory. Skipped with a message
//! when Mosquitto is not there, unless `CI=true`, where that is a failure.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};

const LOG: &[(&str, &str)] = &[("WEFT_LOG", "info,weft_connectors::broker=debug")];

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A message to publish: topic, body, user properties.
type Msg = (String, Vec<u8>, Vec<(String, String)>);

/// An MQTT 5 client of the test's on its own runtime (tests are
/// synchronous): publishes wait for their PUBACKs; what its subscriptions
/// bring is collected. It connects again by itself after a broker restart
/// (a persistent session when `expiry` is set).
struct Peer {
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    acks: Arc<AtomicUsize>,
    subacks: Arc<AtomicUsize>,
    got: Arc<Mutex<Vec<Publish>>>,
}

impl Peer {
    /// A clean-session client on the machine's broker, or `None` (skip).
    fn machine() -> Option<Peer> {
        match Peer::connect(1883, &format!("test-{}", unique_suffix()), None) {
            Ok(p) => Some(p),
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

    fn connect(port: u16, id: &str, expiry: Option<u32>) -> Result<Peer, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_start(expiry.is_none());
        o.set_session_expiry_interval(expiry);
        o.set_max_packet_size(Some(1 << 24));
        let (client, mut el) = AsyncClient::new(o, 4096);
        let acks = Arc::new(AtomicUsize::new(0));
        let subacks = Arc::new(AtomicUsize::new(0));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (acks, subacks, got) = (acks.clone(), subacks.clone(), got.clone());
            rt.spawn(async move {
                let mut first = Some(tx);
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if let Some(tx) = first.take() {
                                let _ = tx.send(Ok(()));
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => got.lock().unwrap().push(p),
                        // left on purpose: never connect again
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(e) => {
                            if let Some(tx) = first.take() {
                                let _ = tx.send(Err(e.to_string()));
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        match rx.recv_timeout(Duration::from_secs(3)) {
            Ok(Ok(())) => Ok(Peer {
                rt,
                client,
                acks,
                subacks,
                got,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("timed out".into()),
        }
    }

    fn subscribe(&self, filter: &str) {
        let before = self.subacks.load(Ordering::SeqCst);
        self.rt
            .block_on(self.client.subscribe(filter, QoS::AtLeastOnce))
            .unwrap();
        wait_for(Duration::from_secs(10), "SUBACK", || {
            self.subacks.load(Ordering::SeqCst) > before
        });
    }

    /// Publish every message at QoS 1 and wait for the PUBACKs.
    fn publish(&self, msgs: Vec<Msg>) {
        self.rt.block_on(publish(&self.client, &self.acks, msgs));
    }

    fn got(&self) -> Vec<Publish> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Leave: DISCONNECT (a persistent session stays on the broker).
    fn leave(&self) {
        let _ = self.rt.block_on(self.client.disconnect());
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn publish(client: &AsyncClient, acks: &AtomicUsize, msgs: Vec<Msg>) {
    let want = acks.load(Ordering::SeqCst) + msgs.len();
    for (topic, body, props) in msgs {
        let mut p = PublishProperties::default();
        for (k, v) in props {
            if k == "correlation-data" {
                p.correlation_data = Some(v.into_bytes().into());
            } else {
                p.user_properties.push((k, v));
            }
        }
        client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body, p)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while acks.load(Ordering::SeqCst) < want {
        assert!(Instant::now() < deadline, "no PUBACKs");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Make the persistent session `client_id` and its subscription to
/// `filter` before weft first runs, so nothing published before weft's
/// first connection is lost (the broker keeps it for the session).
fn make_session(port: u16, client_id: &str, filter: &str) {
    let p = Peer::connect(port, client_id, Some(300)).unwrap();
    let before = p.subacks.load(Ordering::SeqCst);
    p.rt.block_on(
        p.client
            .subscribe_many([Filter::new(filter, QoS::AtLeastOnce)]),
    )
    .unwrap();
    wait_for(Duration::from_secs(10), "SUBACK", || {
        p.subacks.load(Ordering::SeqCst) > before
    });
    p.leave();
}

/// Remove the persistent session `client_id` from the broker.
fn forget_session(port: u16, client_id: &str) {
    if let Ok(p) = Peer::connect(port, client_id, None) {
        p.leave();
    }
}

fn prop(m: &Publish, name: &str) -> Option<String> {
    m.properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

fn write_config(dir: &Path, url: &str, source: &str, sink: &str, flow: &str) {
    std::fs::write(
        dir.join("weft.yaml"),
        format!(
            r#"
store:
  path: ./store.db
systems:
  bus_in:
    source:
      mqtt:
        url: {url}
{source}
  bus_out:
    circuit_breaker: {{cooldown: 1s}}
    sink:
      mqtt:
        url: {url}
{sink}
flows:
  customers:
    from: bus_in
{flow}
    to: [bus_out]
"#
        ),
    )
    .unwrap();
}

#[test]
fn messages_flow_through_with_their_cloudevent_and_bad_ones_go_to_the_dlq() {
    let Some(peer) = Peer::machine() else {
        return;
    };
    let t = format!("e2e_{}", unique_suffix());
    let weft_id = format!("weft-{t}");
    peer.subscribe(&format!("{t}/out/#"));
    make_session(1883, &weft_id, &format!("{t}/in/#"));
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "mqtt://127.0.0.1:1883",
        &format!(
            "        topics: ['{t}/in/#']\n        client_id: {weft_id}\n        session_expiry: 5m\n        batch: 8\n        max_message_bytes: 2048\n"
        ),
        &format!("        topic: '{t}/out/{{key}}'\n        user_properties: {{x-origin: weft}}\n"),
        "    key: .id\n    mapping: '{id, name: (.name | ascii_upcase)}'\n",
    );
    let out_check = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    assert!(
        out_check.status.success(),
        "{}",
        String::from_utf8_lossy(&out_check.stderr)
    );
    let topic = format!("{t}/in/crm");
    let id = |s: &str| vec![("id".to_owned(), s.to_owned())];
    // published before weft runs: kept by its session
    let mut msgs: Vec<Msg> = (0..20)
        .map(|i| {
            (
                topic.clone(),
                json!({"id": i, "name": format!("n{i}")})
                    .to_string()
                    .into_bytes(),
                id(&format!("in-{i}")),
            )
        })
        .collect();
    msgs.push((topic.clone(), b"{\"id\": 99, ".to_vec(), id("in-bad")));
    msgs.push((
        topic.clone(),
        json!({"id": 98, "pad": "x".repeat(3000)})
            .to_string()
            .into_bytes(),
        id("in-big"),
    ));
    peer.publish(msgs);
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    // and while it runs
    peer.publish(vec![(
        topic.clone(),
        json!({"id": 77, "name": "ce"}).to_string().into_bytes(),
        [
            ("specversion", "1.0"),
            ("id", "crm-77"),
            ("source", "/crm"),
            ("type", "crm.customer.updated"),
            ("correlation-data", "corr-77"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect(),
    )]);
    wait_for(Duration::from_secs(20), "21 messages out", || {
        peer.count() >= 21
    });
    wait_for(Duration::from_secs(10), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["delivered"] == 21 && st["lanes"][0]["pending"] == 0
    });
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");

    let got = peer.got();
    assert_eq!(got.len(), 21);
    let ids: HashSet<String> = got.iter().filter_map(|m| prop(m, "id")).collect();
    assert_eq!(ids.len(), 21, "one id per message");
    let first = &got[0];
    assert_eq!(String::from_utf8_lossy(&first.topic), format!("{t}/out/0"));
    assert_eq!(
        serde_json::from_slice::<Value>(&first.payload).unwrap(),
        json!({"id": 0, "name": "N0"})
    );
    assert_eq!(prop(first, "type").as_deref(), Some("weft.customers"));
    assert_eq!(prop(first, "subject").as_deref(), Some("0"));
    assert_eq!(prop(first, "x-causation-id").as_deref(), Some("in-0"));
    assert_eq!(prop(first, "x-origin").as_deref(), Some("weft"));
    let ce = got
        .iter()
        .find(|m| m.topic.ends_with(b"/77"))
        .expect("the CloudEvent");
    assert_eq!(prop(ce, "x-correlation-id").as_deref(), Some("corr-77"));
    assert_eq!(
        ce.properties.as_ref().unwrap().correlation_data.as_deref(),
        Some(&b"corr-77"[..])
    );
    assert_eq!(prop(ce, "x-causation-id").as_deref(), Some("/crm#crm-77"));
    assert_eq!(
        prop(ce, "traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );

    // the two bad messages, in the DLQ with where they were
    let out = weft_cmd(dir.path(), &["dlq", "list", "-c", "weft.yaml", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dlq: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    let errors: BTreeMap<String, String> = dlq
        .iter()
        .map(|e| {
            assert_eq!(e["stage"], "parse", "{e}");
            let err = e["error"].as_str().unwrap().to_owned();
            let key = if err.contains("not JSON") {
                "bad"
            } else {
                "big"
            };
            (key.to_owned(), err)
        })
        .collect();
    assert!(
        errors["bad"].contains(&format!("mqtt topic {topic} (id in-bad)")),
        "{errors:?}"
    );
    assert!(
        errors["big"].contains("over max_message_bytes (2048)"),
        "{errors:?}"
    );
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    let flow = st["lanes"][0].clone();
    assert_eq!(flow["received"], 23, "{st}");
    assert_eq!(flow["rejected"], 2, "{st}");

    // every message acked after its commit, the bad ones too: the session
    // has nothing for the next weft but a sentinel
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    peer.publish(vec![(
        topic.clone(),
        json!({"id": 500, "name": "sentinel"})
            .to_string()
            .into_bytes(),
        id("in-sentinel"),
    )]);
    wait_for(Duration::from_secs(20), "the sentinel out", || {
        peer.got().iter().any(|m| m.topic.ends_with(b"/500"))
    });
    assert!(hub.stop().success());
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["lanes"][0]["received"], 24, "{st}");
    assert_eq!(peer.count(), 22);
    forget_session(1883, &weft_id);
}

/// Per input `seq`: its ids out, and how many copies each id has.
fn check_out(got: &[Publish], total: u64) -> usize {
    let mut ids_of: HashMap<u64, HashSet<String>> = HashMap::new();
    let mut copies: HashMap<String, usize> = HashMap::new();
    for m in got {
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        let id = prop(m, "id").expect("id");
        *copies.entry(id.clone()).or_default() += 1;
        ids_of
            .entry(v["seq"].as_u64().unwrap())
            .or_default()
            .insert(id);
    }
    let missing: Vec<u64> = (0..total).filter(|s| !ids_of.contains_key(s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let twice: Vec<_> = ids_of.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "published under two ids: {twice:?}");
    assert_eq!(copies.len() as u64, total, "one id per input message");
    copies.values().filter(|c| **c > 1).count()
}

fn seqs(topic: &str, r: std::ops::Range<u64>) -> Vec<Msg> {
    r.map(|s| {
        (
            topic.to_owned(),
            json!({"seq": s, "id": s % 97}).to_string().into_bytes(),
            vec![("id".to_owned(), format!("in-{s}"))],
        )
    })
    .collect()
}

#[test]
fn sigkill_while_consuming_and_publishing_loses_nothing_and_never_changes_an_id() {
    let Some(peer) = Peer::machine() else {
        return;
    };
    // Mosquitto keeps at most 1000 queued messages per session (its
    // default `max_queued_messages`): stay under it while weft is down
    const PRELOADED: u64 = 500;
    const LATER: u64 = 400;
    let t = format!("kill_{}", unique_suffix());
    let weft_id = format!("weft-{t}");
    peer.subscribe(&format!("{t}/out/#"));
    make_session(1883, &weft_id, &format!("{t}/in"));
    let topic = format!("{t}/in");
    peer.publish(seqs(&topic, 0..PRELOADED));
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        "mqtt://127.0.0.1:1883",
        &format!(
            "        topics: ['{t}/in']\n        client_id: {weft_id}\n        session_expiry: 5m\n        batch: 16\n"
        ),
        &format!("        topic: '{t}/out/{{key}}'\n"),
        // small batches: more commits, so the kills come mid-stream
        "    key: .id\n    delivery: {batch_size: 25}\n",
    );
    // a publisher adds messages while weft is killed and started again
    let publisher = {
        let client = peer.client.clone();
        let acks = peer.acks.clone();
        let topic = topic.clone();
        peer.rt.spawn(async move {
            for chunk in seqs(&topic, PRELOADED..PRELOADED + LATER).chunks(20) {
                publish(&client, &acks, chunk.to_vec()).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    let started = Instant::now();
    let total = PRELOADED + LATER;
    let kills = AtomicUsize::new(0);
    let seen = Mutex::new(Vec::new());
    let (n, logs) = kill_while(dir.path(), "weft.yaml", LOG, || {
        let k = kills.fetch_add(1, Ordering::SeqCst);
        if k > 0 {
            seen.lock().unwrap().push(peer.count());
        }
        k < 4 || ((!publisher.is_finished() || (peer.count() as u64) < total) && k < 12)
    });
    assert!(n >= 4);
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter()
            .filter(|c| **c > 0 && (**c as u64) < total)
            .count()
            >= 1,
        "the kills did not come mid-stream ({seen:?} out after each); make the run longer"
    );
    peer.rt.block_on(publisher).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(40), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == total
    });
    // a sentinel through the same path: whatever was still coming is in
    peer.publish(vec![(
        topic.clone(),
        json!({"seq": total, "id": "sentinel"})
            .to_string()
            .into_bytes(),
        vec![("id".to_owned(), "in-sentinel".to_owned())],
    )]);
    wait_for(Duration::from_secs(20), "the sentinel out", || {
        peer.got().iter().any(|m| m.topic.ends_with(b"/sentinel"))
    });
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");
    let got = peer.got();
    let repeated = std::panic::catch_unwind(|| check_out(&got, total + 1)).unwrap_or_else(|e| {
        eprintln!("logs:\n{}", logs.join("\n=====\n"));
        std::panic::resume_unwind(e)
    });
    // redeliveries of what a killed weft held were recognised: each
    // message received once
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(st["lanes"][0]["received"], total + 1, "{st}");
    eprintln!(
        "{total} messages through {n} SIGKILLs in {:.1}s (out after each kill: {seen:?}); {} messages out, {repeated} ids published twice (the same id: a publish repeated after a kill)",
        started.elapsed().as_secs_f64(),
        got.len()
    );
    forget_session(1883, &weft_id);
}

/// A mosquitto of the test's own, on its own port, with persistence in
/// its own directory.
struct OwnBroker {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnBroker {
    fn start() -> Option<OwnBroker> {
        let bin = Path::new("/usr/sbin/mosquitto");
        if !bin.exists() {
            if ci() {
                panic!("{} is missing and CI=true", bin.display());
            }
            eprintln!("SKIPPED: {} is not installed", bin.display());
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // mosquitto started as root runs as user `mosquitto`: its
        // persistence directory must be writable for it
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut b = OwnBroker {
            child: None,
            port,
            dir,
        };
        b.up();
        Some(b)
    }

    fn up(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for(Duration::from_secs(10), "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// SIGTERM (a clean stop: it writes its sessions and queued messages
    /// to disk) and wait for the exit.
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_broker_restart_while_weft_runs_loses_nothing_and_never_changes_an_id() {
    let Some(mut broker) = OwnBroker::start() else {
        return;
    };
    let port = broker.port;
    let url = format!("mqtt://127.0.0.1:{port}");
    let weft_id = "weft-restart";
    // the test's subscriber has a persistent session too: what weft
    // publishes while it reconnects is kept for it
    let peer = Peer::connect(port, "test-restart-out", Some(300)).unwrap();
    peer.subscribe("restart/out/#");
    make_session(port, weft_id, "restart/in");
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &url,
        &format!(
            "        topics: [restart/in]\n        client_id: {weft_id}\n        batch: 32\n        connect_timeout: 1s\n"
        ),
        "        topic: 'restart/out/{key}'\n        timeout: 1s\n        connect_timeout: 1s\n",
        "    key: .id\n    delivery: {batch_size: 50, max_backoff: 1s}\n",
    );
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    peer.publish(seqs("restart/in", 0..600));
    wait_for(Duration::from_secs(20), "some messages through", || {
        peer.count() >= 50
    });
    // the broker goes away mid-stream and comes back with its sessions
    broker.down();
    std::thread::sleep(Duration::from_millis(500));
    broker.up();
    // the test's publisher reconnects by itself too
    let publisher = Peer::connect(port, "test-restart-in", None).unwrap();
    publisher.publish(seqs("restart/in", 600..800));
    let deadline = Instant::now() + Duration::from_secs(40);
    while peer.count() < 800 {
        assert!(
            Instant::now() < deadline,
            "{} of 800 out after the restart; log:\n{}",
            peer.count(),
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(Duration::from_secs(20), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == 800
    });
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");
    let repeated = check_out(&peer.got(), 800);
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["lanes"][0]["received"], 800, "{st}");
    eprintln!(
        "800 messages through a broker restart; {} out, {repeated} ids published twice",
        peer.count()
    );
}

#[test]
fn bad_mqtt_settings_fail_validate_with_their_lines() {
    // nothing connects: no broker needed
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        r#"store:
  path: ./store.db
systems:
  bus:
    source:
      mqtt:
        url: mqtt://127.0.0.1:1883
        topics: ['orders/#']
        clean_session: true
  out:
    sink:
      mqtt:
        topic: 'out/{key}'
  out2:
    sink:
      mqtt:
        url: mqtts://u:secret@127.0.0.1:8883
        topic: 'out/+/{key}'
        qos: 0
        timeout: soon
flows:
  f:
    from: bus
    to: [out, out2]
"#,
    )
    .unwrap();
    let out = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("weft.yaml:9:") && text.contains("unknown field `clean_session`"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:12:") && text.contains("missing field `url`"),
        "{text}"
    );
    assert!(
        text.contains("systems.out2.sink.mqtt.url") && text.contains("mqtts://"),
        "{text}"
    );
    assert!(
        text.contains("systems.out2.sink.mqtt.topic") && text.contains("no wildcards"),
        "{text}"
    );
    assert!(
        text.contains("systems.out2.sink.mqtt.qos") && text.contains("QoS 0"),
        "{text}"
    );
    assert!(text.contains("systems.out2.sink.mqtt.timeout"), "{text}");
    assert!(!text.contains("secret"), "{text}");
}
