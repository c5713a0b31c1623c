//! NATS JetStream in and out through the real `weft` binary.
//!
//! Guarantees: messages consumed from a stream reach the destination
//! stream once each (one `Nats-Msg-Id` per message, none lost) whether
//! weft is SIGKILLed while consuming and publishing or the broker restarts
//! under it; bad messages (not JSON, oversized) go to the DLQ with where
//! they were and consumption goes on; CloudEvents attributes, the
//! correlation id and the trace context travel from message to message.
//!
//! The machine's NATS on 127.0.0.1:4222 (`.ci/services.sh`), streams of
//! each test's own (deleted at the end); the restart test starts a
//! nats-server of its own on its own port and store directory. Skipped
//! with a message when NATS is not there, unless `CI=true`, where that is
//! a failure.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use serde_json::{Value, json};

const URL: &str = "nats://127.0.0.1:4222";
const LOG: &[(&str, &str)] = &[("WEFT_LOG", "info,weft_connectors::broker=debug")];

/// A message to publish: its body and headers.
type Msg = (Vec<u8>, Vec<(&'static str, String)>);

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A JetStream client on its own runtime (tests are synchronous), and the
/// streams to delete at the end.
struct Bus {
    rt: tokio::runtime::Runtime,
    url: String,
    js: jetstream::Context,
    streams: Vec<String>,
}

impl Bus {
    /// The machine's NATS, or `None` (skip) when it is not there.
    fn machine() -> Option<Bus> {
        match Bus::connect(URL) {
            Ok(b) => Some(b),
            Err(e) if ci() => panic!("NATS at {URL} is not reachable and CI=true: {e}"),
            Err(e) => {
                eprintln!("SKIPPED: NATS at {URL} is not reachable ({e}); run .ci/services.sh");
                None
            }
        }
    }

    fn connect(url: &str) -> Result<Bus, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(3), async_nats::connect(url)).await
            })
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        // its acker task runs on the runtime
        let js = rt.block_on(async { jetstream::new(client) });
        Ok(Bus {
            js,
            rt,
            url: url.to_owned(),
            streams: Vec::new(),
        })
    }

    /// A stream with `subjects`, deleted when the test ends.
    fn stream(&mut self, name: &str, subjects: &[&str]) {
        self.rt
            .block_on(self.js.create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: subjects.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }))
            .unwrap();
        self.streams.push(name.to_owned());
    }

    /// Publish every body (pipelined), each with its headers, and wait for
    /// the stream's acks.
    fn publish(&self, subject: &str, msgs: Vec<Msg>) {
        self.rt.block_on(async {
            let mut acks = Vec::new();
            for (body, headers) in msgs {
                let mut h = async_nats::HeaderMap::new();
                for (k, v) in headers {
                    h.insert(k, v.as_str());
                }
                acks.push(
                    self.js
                        .publish_with_headers(subject.to_owned(), h, body.into())
                        .await
                        .unwrap(),
                );
            }
            for a in acks {
                a.await.unwrap();
            }
        });
    }

    fn count(&self, stream: &str) -> u64 {
        self.rt.block_on(async {
            match self.js.get_stream(stream).await {
                Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
                Err(_) => 0,
            }
        })
    }

    /// Every message a stream holds.
    fn messages(&self, stream: &str) -> Vec<jetstream::message::StreamMessage> {
        self.rt.block_on(async {
            let mut s = self.js.get_stream(stream).await.unwrap();
            let last = s.info().await.unwrap().state.last_sequence;
            let mut out = Vec::new();
            for seq in 1..=last {
                if let Ok(m) = s.get_raw_message(seq).await {
                    out.push(m);
                }
            }
            out
        })
    }

    fn consumer(&self, stream: &str, name: &str) -> jetstream::consumer::Info {
        self.rt.block_on(async {
            let s = self.js.get_stream(stream).await.unwrap();
            let mut c: jetstream::consumer::PullConsumer = s.get_consumer(name).await.unwrap();
            c.info().await.unwrap().clone()
        })
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.streams);
        let url = self.url.clone();
        // the streams weft created too; a fresh connection (the broker may
        // have restarted)
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), async move {
                let Ok(c) = async_nats::connect(url.as_str()).await else {
                    return;
                };
                let js = jetstream::new(c);
                for n in names {
                    if let Err(e) = js.delete_stream(&n).await {
                        eprintln!("cannot delete test stream {n}: {e}");
                    }
                }
            })
            .await
        });
    }
}

fn header(m: &jetstream::message::StreamMessage, name: &str) -> Option<String> {
    m.headers.get(name).map(|v| v.as_str().to_owned())
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
      nats:
        url: {url}
{source}
  bus_out:
    circuit_breaker: {{cooldown: 1s}}
    sink:
      nats:
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
    let Some(mut bus) = Bus::machine() else {
        return;
    };
    let id = unique_suffix();
    let (inn, out) = (format!("E2E_IN_{id}"), format!("E2E_OUT_{id}"));
    let (isub, osub) = (format!("e2ein{id}"), format!("e2eout{id}"));
    bus.streams.push(inn.clone()); // weft creates it
    bus.stream(&out, &[&format!("{osub}.>")]);
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        URL,
        &format!(
            "        stream: {inn}\n        subject: '{isub}.>'\n        batch: 8\n        max_message_bytes: 2048\n        max_wait: 300ms\n"
        ),
        &format!(
            "        subject: '{osub}.customers.{{key}}'\n        headers: {{x-origin: weft}}\n"
        ),
        "    key: .id\n    mapping: '{id, name: (.name | ascii_upcase)}'\n",
    );
    let out_check = weft_cmd(dir.path(), &["validate", "weft.yaml"]);
    assert!(
        out_check.status.success(),
        "{}",
        String::from_utf8_lossy(&out_check.stderr)
    );
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(10), "weft to create the stream", || {
        bus.rt.block_on(bus.js.get_stream(&inn)).is_ok()
    });
    let mut msgs: Vec<Msg> = (0..20)
        .map(|i| {
            (
                json!({"id": i, "name": format!("n{i}")})
                    .to_string()
                    .into_bytes(),
                vec![],
            )
        })
        .collect();
    msgs.push((b"{\"id\": 99, ".to_vec(), vec![]));
    msgs.push((
        json!({"id": 98, "pad": "x".repeat(3000)})
            .to_string()
            .into_bytes(),
        vec![],
    ));
    msgs.push((
        json!({"id": 77, "name": "ce"}).to_string().into_bytes(),
        vec![
            ("ce-id", "crm-77".to_owned()),
            ("ce-source", "/crm".to_owned()),
            ("ce-type", "crm.customer.updated".to_owned()),
            ("ce-specversion", "1.0".to_owned()),
            ("x-correlation-id", "corr-77".to_owned()),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            ),
        ],
    ));
    bus.publish(&format!("{isub}.new"), msgs);
    wait_for(Duration::from_secs(20), "21 messages out", || {
        bus.count(&out) >= 21
    });
    wait_for(Duration::from_secs(10), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["delivered"] == 21 && st["lanes"][0]["pending"] == 0
    });
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");

    let got = bus.messages(&out);
    assert_eq!(got.len(), 21);
    let ids: HashSet<String> = got
        .iter()
        .filter_map(|m| header(m, "Nats-Msg-Id"))
        .collect();
    assert_eq!(ids.len(), 21, "one Nats-Msg-Id per message");
    let first = &got[0];
    assert_eq!(first.subject.as_str(), format!("{osub}.customers.0"));
    assert_eq!(
        serde_json::from_slice::<Value>(&first.payload).unwrap(),
        json!({"id": 0, "name": "N0"})
    );
    assert_eq!(header(first, "ce-id"), header(first, "Nats-Msg-Id"));
    assert_eq!(header(first, "ce-type").as_deref(), Some("weft.customers"));
    assert_eq!(header(first, "ce-subject").as_deref(), Some("0"));
    assert_eq!(header(first, "x-causation-id"), Some(format!("{inn}:1")));
    assert_eq!(header(first, "x-origin").as_deref(), Some("weft"));
    let ce = got
        .iter()
        .find(|m| m.subject.as_str().ends_with(".77"))
        .unwrap();
    assert_eq!(header(ce, "x-correlation-id").as_deref(), Some("corr-77"));
    assert_eq!(header(ce, "x-causation-id").as_deref(), Some("/crm#crm-77"));
    assert_eq!(
        header(ce, "traceparent").as_deref(),
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
            (
                e["event_id"].as_str().unwrap().to_owned(),
                e["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let e21 = &errors[&format!("{inn}:21")];
    assert!(e21.contains(&format!("nats stream {inn} seq 21")), "{e21}");
    assert!(e21.contains("not JSON"), "{e21}");
    let e22 = &errors[&format!("{inn}:22")];
    assert!(e22.contains("over max_message_bytes (2048)"), "{e22}");
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    let flow = st["lanes"][0].clone();
    assert_eq!(flow["received"], 23, "{st}");
    assert_eq!(flow["rejected"], 2, "{st}");
    // every message acked after its commit, the bad ones too
    let c = bus.consumer(&inn, "weft-bus_in");
    assert_eq!((c.num_pending, c.num_ack_pending), (0, 0), "{c:?}");
}

/// Checks of the destination stream: one message and one `Nats-Msg-Id`
/// per input `seq`, every seq of `0..total`.
fn check_out(bus: &Bus, stream: &str, total: u64) {
    let got = bus.messages(stream);
    let mut by_seq: BTreeMap<u64, HashSet<String>> = BTreeMap::new();
    let mut ids = HashSet::new();
    for m in &got {
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        let id = header(m, "Nats-Msg-Id").expect("Nats-Msg-Id");
        assert!(ids.insert(id.clone()), "Nats-Msg-Id {id} stored twice");
        by_seq
            .entry(v["seq"].as_u64().unwrap())
            .or_default()
            .insert(id);
    }
    let missing: Vec<u64> = (0..total).filter(|s| !by_seq.contains_key(s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let twice: Vec<_> = by_seq.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "published under two ids: {twice:?}");
    assert_eq!(got.len() as u64, total, "one message per input message");
}

#[test]
fn sigkill_while_consuming_and_publishing_loses_and_duplicates_nothing() {
    let Some(mut bus) = Bus::machine() else {
        return;
    };
    const PRELOADED: u64 = 3000;
    const LATER: u64 = 1500;
    let id = unique_suffix();
    let (inn, out) = (format!("KILL_IN_{id}"), format!("KILL_OUT_{id}"));
    let (isub, osub) = (format!("killin{id}"), format!("killout{id}"));
    bus.stream(&inn, &[&isub]);
    bus.stream(&out, &[&format!("{osub}.>")]);
    let seqs = |r: std::ops::Range<u64>| {
        r.map(|s| {
            (
                json!({"seq": s, "id": s % 97}).to_string().into_bytes(),
                vec![],
            )
        })
        .collect::<Vec<_>>()
    };
    bus.publish(&isub, seqs(0..PRELOADED));
    let dir = tempfile::tempdir().unwrap();
    // ack_wait 2s: what a killed weft held comes back quickly
    write_config(
        dir.path(),
        URL,
        &format!(
            "        stream: {inn}\n        subject: {isub}\n        batch: 16\n        ack_wait: 2s\n        max_wait: 300ms\n"
        ),
        &format!("        subject: '{osub}.items.{{key}}'\n"),
        // small batches: more commits, so the kills come mid-stream
        "    key: .id\n    delivery: {batch_size: 25}\n",
    );
    // a publisher adds messages while weft is killed and started again
    let publisher = {
        let js = bus.js.clone();
        let isub = isub.clone();
        bus.rt.spawn(async move {
            for chunk in (PRELOADED..PRELOADED + LATER)
                .collect::<Vec<_>>()
                .chunks(50)
            {
                let mut acks = Vec::new();
                for s in chunk {
                    let body = json!({"seq": s, "id": s % 97}).to_string();
                    acks.push(js.publish(isub.clone(), body.into()).await.unwrap());
                }
                for a in acks {
                    a.await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    let started = Instant::now();
    let kills = AtomicUsize::new(0);
    // how much was out after each kill
    let seen = std::sync::Mutex::new(Vec::new());
    let (n, logs) = kill_while(dir.path(), "weft.yaml", LOG, || {
        let k = kills.fetch_add(1, Ordering::SeqCst);
        if k > 0 {
            seen.lock().unwrap().push(bus.count(&out));
        }
        // at least four kills, and more while messages are still on their way
        k < 4 || ((!publisher.is_finished() || bus.count(&out) < PRELOADED + LATER) && k < 12)
    });
    assert!(n >= 4);
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter()
            .filter(|c| **c > 0 && **c < PRELOADED + LATER)
            .count()
            >= 1,
        "the kills did not come mid-stream ({seen:?} out after each); make the run longer"
    );
    bus.rt.block_on(publisher).unwrap();
    let total = PRELOADED + LATER;
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    let deadline = Instant::now() + Duration::from_secs(40);
    while bus.count(&out) < total {
        if Instant::now() > deadline {
            panic!(
                "{} of {total} out after {n} kills; logs:\n{}\n=====\n{}",
                bus.count(&out),
                logs.join("\n=====\n"),
                hub.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(Duration::from_secs(20), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == total
    });
    // what the last killed weft held comes back after ack_wait (2 s): the
    // running hub takes it as a duplicate and acks it
    wait_for(Duration::from_secs(20), "every message acked", || {
        let c = bus.consumer(&inn, "weft-bus_in");
        (c.num_pending, c.num_ack_pending) == (0, 0)
    });
    assert!(hub.stop().success());
    check_out(&bus, &out, total);
    // redeliveries of what a killed weft held were recognised: each
    // message received once
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(st["lanes"][0]["received"], total, "{st}");
    let c = bus.consumer(&inn, "weft-bus_in");
    assert_eq!((c.num_pending, c.num_ack_pending), (0, 0), "{c:?}");
    eprintln!(
        "{total} messages through {n} SIGKILLs in {:.1}s (out after each kill: {seen:?})",
        started.elapsed().as_secs_f64()
    );
}

/// A nats-server of the test's own, on its own port and store directory.
struct OwnServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnServer {
    fn start() -> Option<OwnServer> {
        let bin = Path::new("/usr/sbin/nats-server");
        if !bin.exists() {
            if ci() {
                panic!("{} is missing and CI=true", bin.display());
            }
            eprintln!("SKIPPED: {} is not installed", bin.display());
            return None;
        }
        let mut s = OwnServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        s.up();
        Some(s)
    }

    fn up(&mut self) {
        let child = Command::new("/usr/sbin/nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .arg("-sd")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for(Duration::from_secs(10), "nats-server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// SIGTERM (a clean stop: its store is whole) and wait for the exit.
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_broker_restart_while_weft_runs_loses_and_duplicates_nothing() {
    let Some(mut server) = OwnServer::start() else {
        return;
    };
    let url = server.url();
    let (inn, out) = ("RESTART_IN", "RESTART_OUT");
    let bus = Bus::connect(&url).unwrap();
    bus.rt
        .block_on(bus.js.create_stream(jetstream::stream::Config {
            name: out.to_owned(),
            subjects: vec!["restart.out.>".to_owned()],
            ..Default::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &url,
        &format!(
            "        stream: {inn}\n        subject: restart.in\n        batch: 32\n        ack_wait: 2s\n        max_wait: 300ms\n"
        ),
        "        subject: 'restart.out.{key}'\n        timeout: 1s\n",
        "    key: .id\n    delivery: {batch_size: 50, max_backoff: 1s}\n",
    );
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(10), "weft to create the stream", || {
        bus.rt.block_on(bus.js.get_stream(inn)).is_ok()
    });
    let seqs = |r: std::ops::Range<u64>| {
        r.map(|s| {
            (
                json!({"seq": s, "id": s % 13}).to_string().into_bytes(),
                vec![],
            )
        })
        .collect::<Vec<_>>()
    };
    bus.publish("restart.in", seqs(0..600));
    wait_for(Duration::from_secs(20), "some messages through", || {
        bus.count(out) >= 50
    });
    // the broker goes away mid-stream and comes back with its store
    server.down();
    std::thread::sleep(Duration::from_millis(500));
    server.up();
    let bus = Bus::connect(&url).unwrap();
    bus.publish("restart.in", seqs(600..800));
    let deadline = Instant::now() + Duration::from_secs(40);
    while bus.count(out) < 800 {
        assert!(
            Instant::now() < deadline,
            "{} of 800 out after the restart; log:\n{}",
            bus.count(out),
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(Duration::from_secs(20), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == 800
    });
    assert!(hub.stop().success());
    check_out(&bus, out, 800);
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["lanes"][0]["received"], 800, "{st}");
}

#[test]
fn bad_nats_settings_fail_validate_with_their_lines() {
    // nothing connects: no server needed
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        r#"store:
  path: ./store.db
systems:
  bus:
    source:
      nats:
        url: nats://127.0.0.1:4222
        stream: ORDERS
        subject: orders.>
        durable: x
  out:
    sink:
      nats:
        subject: 'out.{key}'
  out2:
    sink:
      nats:
        url: nats://127.0.0.1:4222
        subject: 'out.*'
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
        text.contains("weft.yaml:10:") && text.contains("unknown field `durable`"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:13:") && text.contains("missing field `url`"),
        "{text}"
    );
    assert!(
        text.contains("systems.out2.sink.nats.subject") && text.contains("no wildcards"),
        "{text}"
    );
    assert!(text.contains("systems.out2.sink.nats.timeout"), "{text}");
}

/// `examples/pubsub` as a user runs it: signed CRM webhooks published once
/// to the topic `customers`, read by the ERP (JSON Lines), accounting
/// (SQLite) and a NATS subject, each message once, with its key.
#[test]
fn the_pubsub_example_fans_each_webhook_out_to_three_subscribers() {
    let Some(mut bus) = Bus::machine() else {
        return;
    };
    let prefix = format!("pubsub_{}", unique_suffix());
    let stream = prefix.to_uppercase();
    bus.stream(&stream, &[&format!("{prefix}.>")]);
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/pubsub/weft.yaml");
    std::fs::copy(&example, dir.path().join("weft.yaml")).unwrap();
    let env = [
        ("CUSTOMERS_SUBJECT", prefix.as_str()),
        ("CRM_WEBHOOK_SECRET", "example-secret"),
        ("NATS_URL", URL),
    ];
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &env);
    let client = reqwest::blocking::Client::new();
    let n = 30;
    for i in 0..n {
        // 10 customers, each changed three times
        let body = json!({"id": i % 10 + 1, "name": format!("customer {i}"), "email": format!("c{i}@example.com"), "tier": "gold"}).to_string();
        let resp = client
            .post(hub.url("/hooks/crm"))
            .header("content-type", "application/json")
            .header("x-event-id", format!("evt-{i}"))
            .header("x-signature-256", sign("example-secret", body.as_bytes()))
            .body(body)
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    }
    wait_until(
        Duration::from_secs(30),
        || {
            bus.count(&stream) >= n as u64
                && jsonl_lines(&dir.path().join("out/erp.jsonl")).len() >= n
        },
        || {
            format!(
                "not every subscriber has every message: {} on the bus, log:\n{}",
                bus.count(&stream),
                hub.log_text()
            )
        },
    );
    // the ERP feed: every change once, in order per customer
    let erp = jsonl_lines(&dir.path().join("out/erp.jsonl"));
    assert_eq!(erp.len(), n, "{erp:?}");
    for c in 1..=10 {
        let names: Vec<&str> = erp
            .iter()
            .filter(|l| l["customer_no"] == format!("C-{c}"))
            .filter_map(|l| l["name"].as_str())
            .collect();
        let want: Vec<String> = (0..n)
            .filter(|i| i % 10 + 1 == c)
            .map(|i| format!("customer {i}"))
            .collect();
        assert_eq!(names, want, "customer {c}");
    }
    // accounting: one row per customer, the last change
    wait_for(Duration::from_secs(10), "accounting has its rows", || {
        rusqlite::Connection::open(dir.path().join("out/accounting.db"))
            .and_then(|c| c.query_row("SELECT count(*) FROM customers", [], |r| r.get::<_, i64>(0)))
            .is_ok_and(|c| c == 10)
    });
    let conn = rusqlite::Connection::open(dir.path().join("out/accounting.db")).unwrap();
    let name: String = conn
        .query_row(
            "SELECT name FROM customers WHERE customer_id = '3'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(name, "customer 22");
    // the bus: one message per change, on the customer's subject, one id each
    let msgs = bus.messages(&stream);
    assert_eq!(msgs.len(), n);
    let ids: HashSet<String> = msgs
        .iter()
        .filter_map(|m| header(m, "Nats-Msg-Id"))
        .collect();
    assert_eq!(ids.len(), n, "one Nats-Msg-Id per message");
    for m in &msgs {
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            m.subject.as_str(),
            format!("{prefix}.{}", body["id"].as_str().unwrap())
        );
        assert!(header(m, "x-correlation-id").is_some());
    }
    // every subscriber at the head: no lag on /metrics
    let text = scrape(&hub);
    assert_eq!(
        metric(&text, "weft_topic_messages{topic=\"customers\"}"),
        Some(n as f64)
    );
    for flow in [
        "customers_to_erp",
        "customers_to_accounting",
        "customers_to_bus",
    ] {
        let series = format!("weft_topic_lag{{topic=\"customers\",flow=\"{flow}\"}}");
        assert_eq!(metric(&text, &series), Some(0.0), "{series} in\n{text}");
    }
    let st = status(dir.path(), "weft.yaml", &env);
    assert_eq!(st["balanced"], true, "{st}");
    drop(hub);
}

const ORDER_SCHEMA: &str = r#"{"type": "record", "name": "Order", "fields": [
  {"name": "id", "type": "long"},
  {"name": "total", "type": "string"},
  {"name": "note", "type": ["null", "string"], "default": null}]}"#;
const INVOICE_SCHEMA: &str = r#"{"type": "record", "name": "Invoice", "fields": [
  {"name": "order_id", "type": "long"},
  {"name": "amount", "type": "double"},
  {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["OPEN", "PAID"]}}]}"#;

/// Avro in and out, written and read by `fastavro` (not weft's Avro code):
/// orders decoded with the source's schema, mapped, and published as
/// invoices with the sink's schema (Content-Type `application/avro`); a
/// message written with another schema and one in JSON go to the DLQ with
/// the reason, and consumption goes on.
#[test]
fn avro_messages_are_read_and_written_with_the_schemas_of_the_config() {
    let Some(mut bus) = Bus::machine() else {
        return;
    };
    if python_with(&["fastavro"], &["fastavro"]).is_none() {
        return;
    }
    let id = unique_suffix();
    let (inn, out) = (format!("AVRO_IN_{id}"), format!("AVRO_OUT_{id}"));
    let (isub, osub) = (format!("avroin{id}"), format!("avroout{id}"));
    bus.stream(&inn, &[&format!("{isub}.>")]);
    bus.stream(&out, &[&format!("{osub}.>")]);
    let encoded = python_json(
        r#"
import io, json, sys, fastavro
req = json.load(sys.stdin)
def enc(schema, rec):
    b = io.BytesIO()
    fastavro.schemaless_writer(b, fastavro.parse_schema(json.loads(schema)), rec)
    return b.getvalue().hex()
print(json.dumps({
    "orders": [enc(req["order"], o) for o in req["orders"]],
    "other": enc(req["other"], {"sku": "a much longer string than an order has", "qty": 3, "price": 2.5}),
}))
"#,
        json!({
            "order": ORDER_SCHEMA,
            "orders": [
                {"id": 1, "total": "10.50", "note": None::<String>},
                {"id": 2, "total": "7.25", "note": "gift"},
                {"id": 3, "total": "99.00", "note": None::<String>},
            ],
            "other": r#"{"type": "record", "name": "Line", "fields": [{"name": "sku", "type": "string"}, {"name": "qty", "type": "long"}, {"name": "price", "type": "double"}]}"#,
        })
        .to_string()
        .as_bytes(),
    );
    let hex = |v: &Value| -> Vec<u8> {
        let s = v.as_str().expect("hex");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
            .collect()
    };
    let indent = |s: &str| s.replace('\n', " ");
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        URL,
        &format!(
            "        stream: {inn}\n        subject: '{isub}.>'\n        batch: 8\n        max_wait: 300ms\n        format:\n          avro:\n            schema: '{}'\n",
            indent(ORDER_SCHEMA)
        ),
        &format!(
            "        subject: '{osub}.invoices.{{key}}'\n        format:\n          avro:\n            schema: '{}'\n",
            indent(INVOICE_SCHEMA)
        ),
        "    key: .id\n    mapping: '{order_id: .id, amount: (.total | tonumber), status: (if .note == null then \"OPEN\" else \"PAID\" end)}'\n",
    );
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    let orders = encoded["orders"].as_array().expect("orders");
    let mut msgs: Vec<Msg> = vec![(hex(&orders[0]), vec![])];
    msgs.push((hex(&encoded["other"]), vec![]));
    msgs.push((b"{\"id\": 4, \"total\": \"1.00\"}".to_vec(), vec![]));
    msgs.push((hex(&orders[1]), vec![]));
    msgs.push((hex(&orders[2]), vec![]));
    bus.publish(&format!("{isub}.orders"), msgs);
    let dlq = || -> Vec<Value> {
        let out = weft_cmd(dir.path(), &["dlq", "list", "-c", "weft.yaml", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    wait_until(
        Duration::from_secs(20),
        || bus.count(&out) >= 3 && dlq().len() >= 2,
        || {
            format!(
                "{} invoices, {} dead letters; log:\n{}",
                bus.count(&out),
                dlq().len(),
                hub.log_text()
            )
        },
    );
    let dead = dlq();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead.iter().all(|e| e["error"]
            .as_str()
            .unwrap_or("")
            .contains("not Avro of the configured schema")),
        "{dead:?}"
    );
    let msgs = bus.messages(&out);
    assert_eq!(msgs.len(), 3);
    for m in &msgs {
        assert_eq!(
            header(m, "Content-Type").as_deref(),
            Some("application/avro")
        );
    }
    let bodies: Vec<String> = msgs
        .iter()
        .map(|m| m.payload.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let decoded = python_json(
        r#"
import io, json, sys, fastavro
req = json.load(sys.stdin)
s = fastavro.parse_schema(json.loads(req["schema"]))
print(json.dumps([fastavro.schemaless_reader(io.BytesIO(bytes.fromhex(h)), s) for h in req["bodies"]]))
"#,
        json!({"schema": INVOICE_SCHEMA, "bodies": bodies})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(
        decoded,
        json!([
            {"order_id": 1, "amount": 10.5, "status": "OPEN"},
            {"order_id": 2, "amount": 7.25, "status": "PAID"},
            {"order_id": 3, "amount": 99.0, "status": "OPEN"},
        ])
    );
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    drop(hub);
}

const SHOP_PROTO: &str = r#"syntax = "proto3";
package shop.v1;

import "google/protobuf/timestamp.proto";

message Order {
  int64 id = 1;
  string customer_name = 2;
  repeated Line lines = 3;
  google.protobuf.Timestamp placed_at = 4;

  message Line {
    string sku = 1;
    uint32 qty = 2;
    int64 price_cents = 3;
  }
}

message Invoice {
  int64 order_id = 1;
  int64 total_cents = 2;
  Status status = 3;
  string customer = 4;

  enum Status {
    STATUS_UNSPECIFIED = 0;
    OPEN = 1;
    PAID = 2;
  }
}

message Refund {
  string reason = 1;
  double amount = 2;
}
"#;

/// Python's protobuf runtime with `shop.proto` compiled by `grpc_tools`'
/// protoc (not weft's protox) into `shop_pb2`, for the scripts below.
const PY_SHOP: &str = r#"
import importlib.resources, json, os, sys, tempfile
from grpc_tools import protoc
req = json.load(sys.stdin)
out = tempfile.mkdtemp()
wkt = str(importlib.resources.files("grpc_tools") / "_proto")
rc = protoc.main(["protoc", "-I" + req["dir"], "-I" + wkt, "--python_out=" + out, "shop.proto"])
assert rc == 0, "protoc failed"
sys.path.insert(0, out)
import shop_pb2
from google.protobuf import json_format
"#;

/// Protobuf in and out, written and read by Python's protobuf runtime from
/// the same `.proto` compiled by protoc: orders decoded by the source
/// (proto3 JSON: lowerCamelCase, int64 as strings, the Timestamp as
/// RFC 3339), mapped, and published as Confluent-framed invoices
/// (Content-Type `application/x-protobuf`); a message of another type and
/// one in JSON go to the DLQ with the reason while the next good ones are
/// delivered. The `.proto` path is relative to the config file, which is
/// not in weft's working directory; a message name the file lacks fails
/// `weft validate` with the names it has.
#[test]
fn protobuf_messages_are_read_and_written_with_the_proto_file_of_the_config() {
    let Some(mut bus) = Bus::machine() else {
        return;
    };
    if python_with(
        &["google.protobuf", "grpc_tools"],
        &["protobuf", "grpcio-tools"],
    )
    .is_none()
    {
        return;
    }
    let id = unique_suffix();
    let (inn, out) = (format!("PROTO_IN_{id}"), format!("PROTO_OUT_{id}"));
    let (isub, osub) = (format!("protoin{id}"), format!("protoout{id}"));
    bus.stream(&inn, &[&format!("{isub}.>")]);
    bus.stream(&out, &[&format!("{osub}.>")]);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(conf.join("proto")).unwrap();
    std::fs::write(conf.join("proto/shop.proto"), SHOP_PROTO).unwrap();
    let proto_dir = conf.join("proto");
    let encoded = python_json(
        &format!(
            "{PY_SHOP}{}",
            r#"
def enc(m):
    return m.SerializeToString().hex()
orders = [enc(json_format.ParseDict(o, shop_pb2.Order())) for o in req["orders"]]
refund = enc(shop_pb2.Refund(reason="broken on arrival", amount=3.5))
print(json.dumps({"orders": orders, "refund": refund}))
"#
        ),
        json!({
            "dir": proto_dir,
            "orders": [
                {"id": 1, "customer_name": "Ada", "placed_at": "2026-03-01T10:00:00Z",
                 "lines": [{"sku": "A-1", "qty": 2, "price_cents": 450}, {"sku": "B-2", "qty": 1, "price_cents": 1000}]},
                // past 2^53: exact only as a string
                {"id": 9007199254740993_i64, "customer_name": "Bob", "lines": []},
                {"id": 3, "customer_name": "Cy", "lines": [{"sku": "C-3", "qty": 3, "price_cents": 5}]},
            ],
        })
        .to_string()
        .as_bytes(),
    );
    let hex = |v: &Value| -> Vec<u8> {
        let s = v.as_str().expect("hex");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
            .collect()
    };
    let proto = |message: &str, extra: &str| {
        format!(
            "        format:\n          protobuf:\n            schema: proto/shop.proto\n            message: {message}\n{extra}"
        )
    };
    write_config(
        &conf,
        URL,
        &format!(
            "        stream: {inn}\n        subject: '{isub}.>'\n        batch: 8\n        max_wait: 300ms\n{}",
            proto("shop.v1.Order", "")
        ),
        &format!(
            "        subject: '{osub}.invoices.{{key}}'\n{}",
            proto(
                "shop.v1.Invoice",
                "            confluent: true\n            schema_id: 7\n"
            )
        ),
        "    key: .id\n    mapping: '{order_id: .id, total_cents: ([.lines[] | (.priceCents | tonumber) * .qty] | add // 0), status: (if (.lines | length) > 0 then \"PAID\" else \"OPEN\" end), customer: .customerName, placed: .placedAt}'\n",
    );
    // the mapping writes a field Invoice does not have: `weft run` starts
    // (a record that does not fit is the delivery's problem), so the first
    // run shows the permanent failure, then the mapping is fixed
    let hub = Hub::start(dir.path(), "conf/weft.yaml", 0, LOG);
    let orders = encoded["orders"].as_array().expect("orders");
    bus.publish(&format!("{isub}.orders"), vec![(hex(&orders[0]), vec![])]);
    let dlq = || -> Vec<Value> {
        let out = weft_cmd(
            dir.path(),
            &["dlq", "list", "-c", "conf/weft.yaml", "--json"],
        );
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    wait_until(
        Duration::from_secs(20),
        || !dlq().is_empty(),
        || format!("no dead letter; log:\n{}", hub.log_text()),
    );
    let dead = dlq();
    let e = dead[0]["error"].as_str().unwrap_or("");
    assert!(
        e.contains("does not fit Protobuf message shop.v1.Invoice") && e.contains("placed"),
        "{dead:?}"
    );
    drop(hub);
    assert_eq!(bus.count(&out), 0);
    let yaml = std::fs::read_to_string(conf.join("weft.yaml")).unwrap();
    std::fs::write(
        conf.join("weft.yaml"),
        yaml.replace(", placed: .placedAt}", "}"),
    )
    .unwrap();

    let hub = Hub::start(dir.path(), "conf/weft.yaml", 0, LOG);
    let msgs: Vec<Msg> = vec![
        (hex(&encoded["refund"]), vec![]),
        (b"{\"id\": 4, \"customer_name\": \"Dee\"}".to_vec(), vec![]),
        (hex(&orders[1]), vec![]),
        (hex(&orders[2]), vec![]),
    ];
    bus.publish(&format!("{isub}.orders"), msgs);
    let deadline = Instant::now() + Duration::from_secs(20);
    while bus.count(&out) < 2 || dlq().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "{} invoices, {} dead letters; log:\n{}",
            bus.count(&out),
            dlq().len(),
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let dead = dlq();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let parse: Vec<&Value> = dead
        .iter()
        .filter(|e| {
            e["error"]
                .as_str()
                .unwrap_or("")
                .contains("not Protobuf of message shop.v1.Order")
        })
        .collect();
    assert_eq!(parse.len(), 2, "the refund and the JSON body: {dead:?}");
    // the first order's invoice, edited (without `placed`) and replayed
    let first = dead
        .iter()
        .find(|e| {
            e["error"]
                .as_str()
                .unwrap_or("")
                .contains("shop.v1.Invoice")
        })
        .expect("the first order's dead letter");
    let dlq_id = first["id"].to_string();
    std::fs::write(
        dir.path().join("fixed.json"),
        r#"{"order_id": "1", "total_cents": 1900, "status": "PAID", "customer": "Ada"}"#,
    )
    .unwrap();
    let r = weft_cmd(
        dir.path(),
        &[
            "dlq",
            "replay",
            "-c",
            "conf/weft.yaml",
            &dlq_id,
            "--payload",
            "fixed.json",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    while bus.count(&out) < 3 {
        assert!(
            Instant::now() < deadline,
            "{} invoices after the replay; dead letters {:?}; log:\n{}",
            bus.count(&out),
            dlq(),
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let msgs = bus.messages(&out);
    assert_eq!(msgs.len(), 3);
    for m in &msgs {
        assert_eq!(
            header(m, "Content-Type").as_deref(),
            Some("application/x-protobuf")
        );
    }
    let bodies: Vec<String> = msgs
        .iter()
        .map(|m| m.payload.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    // Confluent framing read by the wire format's rules: 0x00, the schema
    // id, then zigzag varints (a count, the indexes; a count of 0 is [0])
    let decoded = python_json(
        &format!(
            "{PY_SHOP}{}",
            r#"
def varint(b, i):
    v = s = 0
    while True:
        v |= (b[i] & 0x7f) << s
        i += 1
        if b[i - 1] < 0x80:
            return (v >> 1) ^ -(v & 1), i
        s += 7
out = []
for h in req["bodies"]:
    b = bytes.fromhex(h)
    assert b[0] == 0, "magic byte"
    schema_id = int.from_bytes(b[1:5], "big")
    n, i = varint(b, 5)
    idx = [0] if n == 0 else []
    for _ in range(n):
        x, i = varint(b, i)
        idx.append(x)
    msg_type = shop_pb2.DESCRIPTOR.message_types_by_name[shop_pb2.DESCRIPTOR.message_types_by_name.keys()[idx[0]]] if len(idx) == 1 else None
    inv = shop_pb2.Invoice()
    inv.ParseFromString(b[i:])
    out.append({"schema_id": schema_id, "indexes": idx, "type": msg_type.full_name,
                "order_id": str(inv.order_id), "total_cents": inv.total_cents,
                "status": shop_pb2.Invoice.Status.Name(inv.status), "customer": inv.customer})
print(json.dumps(out))
"#
        ),
        json!({"dir": proto_dir, "bodies": bodies})
            .to_string()
            .as_bytes(),
    );
    let inv = |order_id: &str, total_cents: i64, status: &str, customer: &str| {
        json!({"schema_id": 7, "indexes": [1], "type": "shop.v1.Invoice",
               "order_id": order_id, "total_cents": total_cents, "status": status, "customer": customer})
    };
    assert_eq!(
        decoded,
        json!([
            inv("9007199254740993", 0, "OPEN", "Bob"),
            inv("3", 15, "PAID", "Cy"),
            inv("1", 1900, "PAID", "Ada"),
        ])
    );
    let st = status(dir.path(), "conf/weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    drop(hub);

    // a message the file does not have: refused at load, with its path and
    // the names the file has
    std::fs::write(
        conf.join("bad.yaml"),
        std::fs::read_to_string(conf.join("weft.yaml"))
            .unwrap()
            .replace("message: shop.v1.Order\n", "message: Order\n"),
    )
    .unwrap();
    let v = weft_cmd(dir.path(), &["validate", "conf/bad.yaml"]);
    let text =
        String::from_utf8_lossy(&v.stderr).into_owned() + &String::from_utf8_lossy(&v.stdout);
    assert!(!v.status.success(), "{text}");
    assert!(
        text.contains("systems.bus_in.source.nats")
            && text.contains("has no message `Order`")
            && text.contains("shop.v1.Invoice, shop.v1.Order, shop.v1.Order.Line, shop.v1.Refund"),
        "{text}"
    );
}
