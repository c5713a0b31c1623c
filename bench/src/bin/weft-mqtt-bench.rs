//! MQTT 5 through weft: messages/s consumed from a topic, published to a
//! topic, and both, each durable on weft's side (every message committed
//! to weft's store before it is acked; every publish at QoS 1 and counted
//! only once the broker's PUBACK came).
//!
//!   cargo run --release -p weft-bench --bin weft-mqtt-bench -- --weft target/release/weft
//!
//! Starts a mosquitto of its own (`--mosquitto`, default
//! /usr/sbin/mosquitto) on a free port with persistence in a temporary
//! folder and no limit on queued or in-flight messages (the defaults, 1000
//! queued and 20 in flight per client, would drop a preloaded backlog and
//! cap the consumer). weft runs on a fresh store per scenario. Prints a
//! Markdown table.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

#[derive(Parser)]
struct Args {
    /// The weft binary.
    #[arg(long)]
    weft: std::path::PathBuf,
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: std::path::PathBuf,
    /// Messages per scenario.
    #[arg(long, default_value_t = 50_000)]
    n: u64,
}

/// A client and its counters: PUBACKs received, messages received.
struct Peer {
    client: AsyncClient,
    acks: Arc<AtomicU64>,
    got: Arc<AtomicU64>,
}

async fn peer(port: u16, id: &str, session: bool) -> anyhow::Result<Peer> {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_start(!session);
    if session {
        o.set_session_expiry_interval(Some(3600));
    }
    o.set_max_packet_size(Some(1 << 20));
    let (client, mut el) = AsyncClient::new(o, 10_000);
    let (acks, got) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (tx, rx) = tokio::sync::oneshot::channel();
    {
        let (acks, got) = (acks.clone(), got.clone());
        tokio::spawn(async move {
            let mut tx = Some(tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                    // left on purpose: never connect again
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .context("no CONNACK from the bench's mosquitto")??;
    Ok(Peer { client, acks, got })
}

async fn wait(what: &str, f: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !f() {
        if Instant::now() > deadline {
            bail!("{what}: not done in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = std::env::temp_dir().join(format!("weft-mqtt-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // mosquitto started as root runs as user `mosquitto`: its persistence
    // directory must be writable for it
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 0\n",
            dir.display()
        ),
    )?;
    let _broker = Broker(
        Command::new(&a.mosquitto)
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start mosquitto")?,
    );
    wait("mosquitto to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await?;
    println!("| scenario | messages | seconds | messages/s |");
    println!("|---|---:|---:|---:|");
    for s in ["consume", "publish", "through"] {
        let secs = scenario(&a, port, s).await?;
        println!(
            "| {} | {} | {:.1} | {:.0} |",
            match s {
                "consume" => "MQTT topic -> weft -> JSON Lines file (consume)",
                "publish" => "generate -> weft -> MQTT topic (publish)",
                _ => "MQTT topic -> weft -> MQTT topic",
            },
            a.n,
            secs,
            a.n as f64 / secs
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One scenario: the input made first (a backlog in weft's session), then
/// weft started, timed until the output holds every message.
async fn scenario(a: &Args, port: u16, which: &str) -> anyhow::Result<f64> {
    let tin = format!("bench/{which}/in");
    let tout = format!("bench/{which}/out");
    let weft_id = format!("weft-bench-{which}");
    // the output's subscriber, up before weft publishes
    let out = peer(port, &format!("bench-out-{which}"), false).await?;
    out.client
        .subscribe(format!("{tout}/#"), QoS::AtLeastOnce)
        .await?;
    if which != "publish" {
        // weft's session, subscribed, so the backlog is kept for it
        let s = peer(port, &weft_id, true).await?;
        s.client.subscribe(&tin, QoS::AtLeastOnce).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.client.disconnect().await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let p = peer(port, &format!("bench-in-{which}"), false).await?;
        for i in 0..a.n {
            let body = format!("{{\"id\": {}, \"seq\": {i}}}", i % 1000);
            let props = PublishProperties {
                user_properties: vec![("id".into(), format!("in-{i}"))],
                ..Default::default()
            };
            p.client
                .publish_with_properties(&tin, QoS::AtLeastOnce, false, body, props)
                .await?;
        }
        let acks = p.acks.clone();
        let n = a.n;
        wait("the backlog's PUBACKs", || {
            acks.load(Ordering::Relaxed) >= n
        })
        .await?;
    }
    let dir = std::env::temp_dir().join(format!("weft-mqtt-bench-{}-{which}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let url = format!("mqtt://127.0.0.1:{port}");
    let mqtt_in = format!(
        "    source:\n      mqtt: {{url: '{url}', topics: ['{tin}'], client_id: {weft_id}, batch: 1000, receive_maximum: 2000}}\n"
    );
    let mqtt_out = format!("    sink:\n      mqtt: {{url: '{url}', topic: '{tout}/{{key}}'}}\n");
    let (src, dst) = match which {
        "consume" => (
            mqtt_in,
            "    sink:\n      jsonl: {path: ./out.jsonl}\n".to_owned(),
        ),
        "publish" => (
            format!(
                "    source:\n      generate: {{template: '{{id: ($seq % 1000), seq: $seq}}', count: {}, batch_size: 1000}}\n",
                a.n
            ),
            mqtt_out,
        ),
        _ => (mqtt_in, mqtt_out),
    };
    std::fs::write(
        dir.join("weft.yaml"),
        format!(
            "store:\n  path: ./store.db\nsystems:\n  a:\n{src}  b:\n{dst}flows:\n  f:\n    from: a\n    key: .id\n    to: [{{system: b, delivery: {{batch_size: 1000}}}}]\n"
        ),
    )?;
    let started = Instant::now();
    let mut hub = Command::new(&a.weft)
        .args([
            "run",
            "weft.yaml",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .current_dir(&dir)
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let n = a.n;
    let done = if which == "consume" {
        let file = dir.join("out.jsonl");
        wait(which, || {
            std::fs::read_to_string(&file)
                .map(|t| t.lines().count() as u64 >= n)
                .unwrap_or(false)
        })
        .await
    } else {
        let got = out.got.clone();
        wait(which, || got.load(Ordering::Relaxed) >= n).await
    };
    let secs = started.elapsed().as_secs_f64();
    let _ = hub.kill();
    let _ = hub.wait();
    done?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(secs)
}
