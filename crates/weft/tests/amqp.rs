//! RabbitMQ (AMQP 0.9.1) in and out through the real `weft` binary.
//!
//! Guarantees: messages consumed from a queue reach the destination queue
//! with one `message_id` per input message, none lost, whether weft is
//! SIGKILLed while consuming and publishing or not (RabbitMQ does not
//! dedupe: a publish repeated after a kill is a second copy with the same
//! `message_id`, counted and printed); bad messages (not JSON, oversized)
//! go to the DLQ with where they were and consumption goes on; CloudEvents
//! attributes, the correlation id and the trace context travel from
//! message to message.
//!
//! The machine's RabbitMQ on 127.0.0.1:5672 (`.ci/services.sh`), queues
//! and exchanges of each test's own (deleted at the end). The restart test
//! starts a RabbitMQ node of its own (its own port, node name and data
//! directory; about 6 s to boot here) and stops and starts it under a
//! running weft. Skipped with a message when RabbitMQ is not there, unless
//! `CI=true`, where that is a failure.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The SIGKILL test and the broker restart test, one at a time: each runs
/// weft and a broker flat out, and the restart's timing suffers when they
/// share the two cores (`cargo test` runs a file's tests side by side).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}
const LOG: &[(&str, &str)] = &[("WEFT_LOG", "info,weft_connectors::broker=debug")];

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A client on its own runtime (tests are synchronous), and the queues
/// and exchanges to delete at the end.
struct Bus {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    ch: Channel,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Bus {
    /// The machine's RabbitMQ, or `None` (skip) when it is not there.
    fn machine() -> Option<Bus> {
        Bus::connect(URL)
    }

    fn connect(url: &str) -> Option<Bus> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let c = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(3),
                Connection::connect(url, ConnectionProperties::default()),
            )
            .await
        });
        let conn = match c {
            Ok(Ok(c)) => c,
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                if ci() {
                    panic!("RabbitMQ at {url} is not reachable and CI=true: {why}");
                }
                eprintln!(
                    "SKIPPED: RabbitMQ at {url} is not reachable ({why}); run .ci/services.sh"
                );
                return None;
            }
        };
        let ch = rt.block_on(async {
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            ch
        });
        Some(Bus {
            rt,
            conn,
            ch,
            queues: Vec::new(),
            exchanges: Vec::new(),
        })
    }

    fn exchange(&mut self, name: &str) {
        self.rt
            .block_on(self.ch.exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ))
            .unwrap();
        self.exchanges.push(name.to_owned());
    }

    /// A durable queue bound to `exchange` with `key`.
    fn queue(&mut self, name: &str, exchange: &str, key: &str) {
        self.rt.block_on(async {
            self.ch
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            self.ch
                .queue_bind(
                    name.into(),
                    exchange.into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        });
        self.queues.push(name.to_owned());
    }

    /// Publish every message (pipelined, persistent) and wait for the
    /// confirms.
    fn publish(&self, exchange: &str, key: &str, msgs: Vec<(Vec<u8>, BasicProperties)>) {
        self.rt.block_on(publish(&self.ch, exchange, key, msgs));
    }

    /// Messages ready in a queue.
    fn ready(&self, name: &str) -> u32 {
        self.rt.block_on(async {
            let ch = self.conn.create_channel().await.unwrap();
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
        })
    }

    /// Take every message of a queue.
    fn drain(&self, name: &str) -> Vec<lapin::message::Delivery> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            while let Some(m) = self
                .ch
                .basic_get(name.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                out.push(m.delivery);
            }
            out
        })
    }
}

async fn publish(ch: &Channel, exchange: &str, key: &str, msgs: Vec<(Vec<u8>, BasicProperties)>) {
    let mut confirms = Vec::new();
    for (body, props) in msgs {
        confirms.push(
            ch.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &body,
                props.with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        let conn = &self.conn;
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), async move {
                for q in queues {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for x in exchanges {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "done".into()).await;
            })
            .await
        });
    }
}

fn header(m: &lapin::message::Delivery, name: &str) -> Option<String> {
    match m.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => panic!("{name}: {other:?}"),
    }
}

fn message_id(m: &lapin::message::Delivery) -> Option<String> {
    m.properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
}

fn with_id(id: String) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

fn write_config(dir: &Path, source: &str, sink: &str, flow: &str) {
    write_config_at(dir, URL, source, sink, flow)
}

fn write_config_at(dir: &Path, url: &str, source: &str, sink: &str, flow: &str) {
    std::fs::write(
        dir.join("weft.yaml"),
        format!(
            r#"
store:
  path: ./store.db
systems:
  bus_in:
    source:
      amqp:
        url: {url}
{source}
  bus_out:
    circuit_breaker: {{cooldown: 1s}}
    sink:
      amqp:
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
    let (xin, qin) = (format!("e2e_in_x_{id}"), format!("e2e_in_q_{id}"));
    let (xout, qout) = (format!("e2e_out_x_{id}"), format!("e2e_out_q_{id}"));
    bus.exchange(&xin);
    bus.exchange(&xout);
    // the input queue exists before weft starts, so nothing published
    // before weft binds it is lost; weft declares and binds it again
    bus.queue(&qin, &xin, "crm.#");
    bus.queue(&qout, &xout, "customers.*");
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!(
            "        queue: {qin}\n        exchange: {xin}\n        routing_key: 'crm.#'\n        batch: 8\n        max_message_bytes: 2048\n"
        ),
        &format!(
            "        exchange: {xout}\n        routing_key: 'customers.{{key}}'\n        headers: {{x-origin: weft}}\n"
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
    let mut msgs: Vec<(Vec<u8>, BasicProperties)> = (0..20)
        .map(|i| {
            (
                json!({"id": i, "name": format!("n{i}")})
                    .to_string()
                    .into_bytes(),
                with_id(format!("in-{i}")),
            )
        })
        .collect();
    msgs.push((b"{\"id\": 99, ".to_vec(), with_id("in-bad".into())));
    msgs.push((
        json!({"id": 98, "pad": "x".repeat(3000)})
            .to_string()
            .into_bytes(),
        with_id("in-big".into()),
    ));
    let mut h = FieldTable::default();
    for (k, v) in [
        ("cloudEvents:id", "crm-77"),
        ("cloudEvents:source", "/crm"),
        ("cloudEvents:type", "crm.customer.updated"),
        ("cloudEvents:specversion", "1.0"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ] {
        h.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    msgs.push((
        json!({"id": 77, "name": "ce"}).to_string().into_bytes(),
        BasicProperties::default()
            .with_correlation_id("corr-77".into())
            .with_headers(h),
    ));
    bus.publish(&xin, "crm.customers", msgs);
    wait_for(Duration::from_secs(20), "21 messages out", || {
        bus.ready(&qout) >= 21
    });
    wait_for(Duration::from_secs(10), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["delivered"] == 21 && st["lanes"][0]["pending"] == 0
    });
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");

    let got = bus.drain(&qout);
    assert_eq!(got.len(), 21);
    let ids: HashSet<String> = got.iter().filter_map(message_id).collect();
    assert_eq!(ids.len(), 21, "one message_id per message");
    let first = &got[0];
    assert_eq!(first.routing_key.as_str(), "customers.0");
    assert_eq!(
        serde_json::from_slice::<Value>(&first.data).unwrap(),
        json!({"id": 0, "name": "N0"})
    );
    assert_eq!(*first.properties.delivery_mode(), Some(2));
    assert_eq!(header(first, "cloudEvents:id"), message_id(first));
    assert_eq!(
        header(first, "cloudEvents:type").as_deref(),
        Some("weft.customers")
    );
    assert_eq!(header(first, "cloudEvents:subject").as_deref(), Some("0"));
    assert_eq!(header(first, "x-causation-id").as_deref(), Some("in-0"));
    assert_eq!(header(first, "x-origin").as_deref(), Some("weft"));
    let ce = got
        .iter()
        .find(|m| m.routing_key.as_str().ends_with(".77"))
        .unwrap();
    assert_eq!(header(ce, "x-correlation-id").as_deref(), Some("corr-77"));
    assert_eq!(
        ce.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("corr-77")
    );
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
    let bad = &errors["in-bad"];
    assert!(
        bad.contains(&format!(
            "amqp queue {qin} (exchange {xin}, routing key crm.customers, message_id in-bad)"
        )),
        "{bad}"
    );
    assert!(bad.contains("not JSON"), "{bad}");
    assert!(
        errors["in-big"].contains("over max_message_bytes (2048)"),
        "{errors:?}"
    );
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    let flow = st["lanes"][0].clone();
    assert_eq!(flow["received"], 23, "{st}");
    assert_eq!(flow["rejected"], 2, "{st}");
    // every message acked after its commit, the bad ones too
    assert_eq!(bus.ready(&qin), 0);
}

#[test]
fn sigkill_while_consuming_and_publishing_loses_nothing_and_never_changes_an_id() {
    let _one_at_a_time = heavy();
    let Some(mut bus) = Bus::machine() else {
        return;
    };
    const PRELOADED: u64 = 3000;
    const LATER: u64 = 1500;
    let id = unique_suffix();
    let (xin, qin) = (format!("kill_in_x_{id}"), format!("kill_in_q_{id}"));
    let (xout, qout) = (format!("kill_out_x_{id}"), format!("kill_out_q_{id}"));
    bus.exchange(&xin);
    bus.exchange(&xout);
    bus.queue(&qin, &xin, "items");
    bus.queue(&qout, &xout, "items.*");
    let seqs = |r: std::ops::Range<u64>| {
        r.map(|s| {
            (
                json!({"seq": s, "id": s % 97}).to_string().into_bytes(),
                with_id(format!("in-{s}")),
            )
        })
        .collect::<Vec<_>>()
    };
    bus.publish(&xin, "items", seqs(0..PRELOADED));
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!("        queue: {qin}\n        batch: 16\n        prefetch: 64\n"),
        &format!("        exchange: {xout}\n        routing_key: 'items.{{key}}'\n"),
        // small batches: more commits, so the kills come mid-stream
        "    key: .id\n    delivery: {batch_size: 25}\n",
    );
    // a publisher adds messages while weft is killed and started again
    let publisher = {
        let ch = bus.ch.clone();
        let xin = xin.clone();
        bus.rt.spawn(async move {
            for chunk in seqs(PRELOADED..PRELOADED + LATER).chunks(50) {
                publish(&ch, &xin, "items", chunk.to_vec()).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    let started = Instant::now();
    let total = PRELOADED + LATER;
    let kills = AtomicUsize::new(0);
    // how much was out after each kill
    let seen = std::sync::Mutex::new(Vec::new());
    let (n, logs) = kill_while(dir.path(), "weft.yaml", LOG, || {
        let k = kills.fetch_add(1, Ordering::SeqCst);
        if k > 0 {
            seen.lock().unwrap().push(bus.ready(&qout));
        }
        // at least four kills, and more while messages are on their way
        k < 4 || ((!publisher.is_finished() || u64::from(bus.ready(&qout)) < total) && k < 12)
    });
    assert!(n >= 4);
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter()
            .filter(|c| **c > 0 && u64::from(**c) < total)
            .count()
            >= 1,
        "the kills did not come mid-stream ({seen:?} out after each); make the run longer"
    );
    bus.rt.block_on(publisher).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(40), "everything settled", || {
        let st = status(dir.path(), "weft.yaml", &[]);
        st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == total
    });
    // nothing more comes
    std::thread::sleep(Duration::from_millis(500));
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");
    // every input message out, each under one message_id only; RabbitMQ
    // keeps a second copy of a publish repeated after a kill (same id)
    let got = bus.drain(&qout);
    let mut ids_of: HashMap<u64, HashSet<String>> = HashMap::new();
    let mut copies: HashMap<String, usize> = HashMap::new();
    for m in &got {
        let v: Value = serde_json::from_slice(&m.data).unwrap();
        let id = message_id(m).expect("message_id");
        assert_eq!(header(m, "cloudEvents:id").as_ref(), Some(&id));
        *copies.entry(id.clone()).or_default() += 1;
        ids_of
            .entry(v["seq"].as_u64().unwrap())
            .or_default()
            .insert(id);
    }
    let missing: Vec<u64> = (0..total).filter(|s| !ids_of.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "lost: {missing:?}; logs:\n{}",
        logs.join("\n=====\n")
    );
    let twice: Vec<_> = ids_of.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "published under two ids: {twice:?}");
    assert_eq!(
        copies.len() as u64,
        total,
        "one message_id per input message"
    );
    let repeated = copies.values().filter(|c| **c > 1).count();
    // redeliveries of what a killed weft held were recognised: each
    // message received once
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(st["lanes"][0]["received"], total, "{st}");
    assert_eq!(bus.ready(&qin), 0, "every input message acked");
    eprintln!(
        "{total} messages through {n} SIGKILLs in {:.1}s (out after each kill: {seen:?}); {} messages out, {repeated} message_ids published twice (the same id: a publish repeated after a kill)",
        started.elapsed().as_secs_f64(),
        got.len()
    );
}

#[test]
fn bad_amqp_settings_fail_validate_with_their_lines() {
    // nothing connects: no broker needed
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("weft.yaml"),
        r#"store:
  path: ./store.db
systems:
  bus:
    source:
      amqp:
        url: amqp://guest:guest@127.0.0.1:5672/%2f
        queue: orders
        durable: true
  out:
    sink:
      amqp:
        exchange: crm
        routing_key: 'out.{key}'
  out2:
    sink:
      amqp:
        url: amqps://guest:secret@127.0.0.1:5671/%2f
        exchange: crm
        routing_key: 'out.{key'
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
        text.contains("weft.yaml:9:") && text.contains("unknown field `durable`"),
        "{text}"
    );
    assert!(
        text.contains("weft.yaml:12:") && text.contains("missing field `url`"),
        "{text}"
    );
    assert!(
        text.contains("systems.out2.sink.amqp.url") && text.contains("amqps://"),
        "{text}"
    );
    assert!(
        text.contains("systems.out2.sink.amqp.routing_key"),
        "{text}"
    );
    assert!(text.contains("systems.out2.sink.amqp.timeout"), "{text}");
    assert!(!text.contains("secret"), "{text}");
}

/// A RabbitMQ node of the test's own: its own port, node name, data and
/// log directories (owned by the `rabbitmq` user, which the server script
/// switches to), and a config of its own (the machine's names port 5672).
/// `down` stops it with `rabbitmqctl stop`; `up` starts it again on the
/// same data, so durable queues and persistent messages survive.
struct OwnRabbit {
    dir: tempfile::TempDir,
    port: u16,
    dist_port: u16,
    node: String,
    child: Option<std::process::Child>,
}

impl OwnRabbit {
    fn start() -> Option<OwnRabbit> {
        if !Path::new("/usr/sbin/rabbitmq-server").exists() {
            let why = "rabbitmq-server is not installed";
            if ci() {
                panic!("{why} and CI=true");
            }
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut r = OwnRabbit {
            port,
            dist_port: free_port(),
            node: format!("wefttest{}_{port}@localhost", std::process::id()),
            child: None,
            dir,
        };
        let p = r.dir.path();
        std::fs::create_dir_all(p.join("mnesia")).unwrap();
        std::fs::create_dir_all(p.join("log")).unwrap();
        std::fs::write(p.join("plugins"), "[].\n").unwrap();
        std::fs::write(
            p.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        let owned = std::process::Command::new("chown")
            .args(["-R", "rabbitmq"])
            .arg(p)
            .status()
            .is_ok_and(|s| s.success());
        assert!(owned, "cannot hand {} to the rabbitmq user", p.display());
        r.up();
        Some(r)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn env(&self, cmd: &mut std::process::Command) {
        let p = self.dir.path();
        cmd.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", p.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", p.join("none.conf"))
            .env("RABBITMQ_MNESIA_BASE", p.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", p.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p.join("plugins"))
            .env("RABBITMQ_PID_FILE", p.join("pid"));
    }

    fn up(&mut self) {
        let mut cmd = std::process::Command::new("rabbitmq-server");
        self.env(&mut cmd);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        self.child = Some(cmd.spawn().expect("start rabbitmq-server"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "our RabbitMQ did not start; see {}",
                self.dir.path().join("log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn down(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut cmd = std::process::Command::new("rabbitmqctl");
        self.env(&mut cmd);
        let _ = cmd
            .args(["-n", &self.node, "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.wait();
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        self.down();
    }
}

#[test]
fn a_broker_restart_while_weft_runs_loses_nothing_and_never_changes_an_id() {
    let _one_at_a_time = heavy();
    let Some(mut server) = OwnRabbit::start() else {
        return;
    };
    let url = server.url();
    let mut bus = Bus::connect(&url).expect("our RabbitMQ");
    bus.exchange("restart_in");
    bus.exchange("restart_out");
    bus.queue("restart_in_q", "restart_in", "items");
    bus.queue("restart_out_q", "restart_out", "items.*");
    let seqs = |r: std::ops::Range<u64>| {
        r.map(|s| {
            (
                json!({"seq": s, "id": s % 13}).to_string().into_bytes(),
                with_id(format!("in-{s}")),
            )
        })
        .collect::<Vec<_>>()
    };
    bus.publish("restart_in", "items", seqs(0..600));
    let dir = tempfile::tempdir().unwrap();
    write_config_at(
        dir.path(),
        &url,
        "        queue: restart_in_q\n        batch: 16\n        prefetch: 64\n",
        "        exchange: restart_out\n        routing_key: 'items.{key}'\n        timeout: 1s\n",
        "    key: .id\n    delivery: {batch_size: 25, max_backoff: 1s}\n",
    );
    let hub = Hub::start(dir.path(), "weft.yaml", 0, LOG);
    wait_for(Duration::from_secs(20), "some messages through", || {
        bus.ready("restart_out_q") >= 50
    });
    // the broker stops mid-stream and starts again on its data (the
    // client goes first, keeping its queues: they die with the node)
    let before = bus.ready("restart_out_q");
    bus.queues.clear();
    bus.exchanges.clear();
    drop(bus);
    server.down();
    std::thread::sleep(Duration::from_millis(500));
    server.up();
    let bus = Bus::connect(&url).expect("our RabbitMQ again");
    bus.publish("restart_in", "items", seqs(600..800));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let st = status(dir.path(), "weft.yaml", &[]);
        if st["lanes"][0]["pending"] == 0 && st["lanes"][0]["delivered"] == 800 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled after the restart: {st}\nlog:\n{}",
            hub.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = hub.log_text();
    assert!(hub.stop().success(), "{log}");
    let got = bus.drain("restart_out_q");
    let mut ids_of: HashMap<u64, HashSet<String>> = HashMap::new();
    for m in &got {
        let v: Value = serde_json::from_slice(&m.data).unwrap();
        ids_of
            .entry(v["seq"].as_u64().unwrap())
            .or_default()
            .insert(message_id(m).expect("message_id"));
    }
    let missing: Vec<u64> = (0..800).filter(|s| !ids_of.contains_key(s)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}; log:\n{log}");
    assert!(
        ids_of.values().all(|ids| ids.len() == 1),
        "a message published under two ids"
    );
    let st = status(dir.path(), "weft.yaml", &[]);
    assert_eq!(st["balanced"], true, "{st}");
    assert_eq!(
        st["lanes"][0]["received"], 800,
        "each message received once: {st}"
    );
    assert_eq!(bus.ready("restart_in_q"), 0, "every input message acked");
    // weft saw the broker go, and its source connected again
    assert!(
        log.contains("RabbitMQ connection lost; connecting again"),
        "the source never noticed the restart:\n{log}"
    );
    eprintln!(
        "RabbitMQ restarted under weft with {before} of the first 600 out: 800 messages, {} copies out (a publish repeated after the restart keeps its id)",
        got.len()
    );
}
