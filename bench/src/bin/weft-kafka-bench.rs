//! Kafka through weft: messages/s consumed from a topic, produced to a
//! topic, and both, each durable (every batch committed to weft's store
//! before its offsets are committed; every message produced by the
//! idempotent producer and counted once its delivery report came).
//!
//!   cargo run --release -p weft-bench --bin weft-kafka-bench -- --weft target/release/weft
//!
//! Starts a `tansu broker` of its own (memory storage) on a free port
//! unless `--brokers` names a running cluster. Each scenario uses topics of
//! its own; weft runs on a fresh store in a temporary folder. Prints a
//! Markdown table.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

#[derive(Parser)]
struct Args {
    /// The weft binary.
    #[arg(long)]
    weft: std::path::PathBuf,
    /// A running Kafka (`host:port`); default: a tansu broker of the
    /// bench's own.
    #[arg(long)]
    brokers: Option<String>,
    /// The tansu binary, when the bench starts its own broker.
    #[arg(long, default_value = "tansu")]
    tansu: String,
    /// Messages per scenario.
    #[arg(long, default_value_t = 50_000)]
    n: u64,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 1)]
    partitions: i32,
}

/// The bench's own broker, killed at the end.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tmp = std::env::temp_dir().join(format!("weft-kafka-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let (_broker, brokers) = match &a.brokers {
        Some(b) => (None, b.clone()),
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let url = format!("tcp://127.0.0.1:{port}");
            let child = Command::new(&a.tansu)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .args(["--storage-engine", "memory://tansu/", "--silent"])
                .current_dir(&tmp)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("start {} broker", a.tansu))?;
            (Some(Broker(child)), format!("127.0.0.1:{port}"))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while metadata(&brokers).is_err() {
        if Instant::now() > deadline {
            bail!("no Kafka answering at {brokers}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("| scenario | messages | seconds | messages/s |");
    println!("|---|---:|---:|---:|");
    for s in ["consume", "publish", "through"] {
        let secs = scenario(&a, &brokers, s)?;
        println!(
            "| {} | {} | {:.1} | {:.0} |",
            match s {
                "consume" => "Kafka topic -> weft -> JSON Lines file (consume)",
                "publish" => "generate -> weft -> Kafka topic (publish)",
                _ => "Kafka topic -> weft -> Kafka topic",
            },
            a.n,
            secs,
            a.n as f64 / secs
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

fn metadata(brokers: &str) -> anyhow::Result<()> {
    let c: BaseConsumer = client(brokers).create()?;
    c.fetch_metadata(None, Duration::from_millis(500))?;
    Ok(())
}

fn create_topic(brokers: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let admin: AdminClient<DefaultClientContext> = client(brokers).create()?;
        let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for r in admin.create_topics([&t], &AdminOptions::new()).await? {
            r.map_err(|(t, e)| anyhow::anyhow!("create {t}: {e}"))?;
        }
        Ok(())
    })
}

/// Deliveries weft counts as written (the brokers acknowledged them), by
/// `weft status`. Not the topic's high watermark: tansu 0.6.0's memory
/// storage answers ListOffsets(latest) with the last batch's base offset
/// + 1.
fn delivered(weft: &std::path::Path, dir: &std::path::Path) -> u64 {
    let Ok(out) = Command::new(weft)
        .args(["status", "-c", "weft.yaml", "--json"])
        .current_dir(dir)
        .env("WEFT_LOG", "error")
        .output()
    else {
        return 0;
    };
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["lanes"][0]["delivered"].as_u64())
        .unwrap_or(0)
}

/// One scenario: the input made first (a preloaded topic), then weft
/// started, timed until the output holds every message.
fn scenario(a: &Args, brokers: &str, which: &str) -> anyhow::Result<f64> {
    let id = std::process::id();
    let (inn, out) = (
        format!("weft-bench-in-{id}-{which}"),
        format!("weft-bench-out-{id}-{which}"),
    );
    create_topic(brokers, &inn, a.partitions)?;
    create_topic(brokers, &out, a.partitions)?;
    let dir = std::env::temp_dir().join(format!("weft-kafka-bench-{id}-{which}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let kafka_in = format!(
        "    source:\n      kafka: {{brokers: '{brokers}', topics: ['{inn}'], batch: 1000}}\n"
    );
    let kafka_out = format!("    sink:\n      kafka: {{brokers: '{brokers}', topic: '{out}'}}\n");
    let (src, dst) = match which {
        "consume" => (
            kafka_in,
            "    sink:\n      jsonl: {path: ./out.jsonl}\n".to_owned(),
        ),
        "publish" => (
            format!(
                "    source:\n      generate: {{template: '{{id: ($seq % 1000), seq: $seq}}', count: {}, batch_size: 1000}}\n",
                a.n
            ),
            kafka_out,
        ),
        _ => (kafka_in, kafka_out),
    };
    std::fs::write(
        dir.join("weft.yaml"),
        format!(
            "store:\n  path: ./store.db\nsystems:\n  a:\n{src}  b:\n{dst}flows:\n  f:\n    from: a\n    key: .id\n    to: [{{system: b, delivery: {{batch_size: 1000}}}}]\n"
        ),
    )?;
    if which != "publish" {
        let p: ThreadedProducer<DefaultProducerContext> = client(brokers)
            .set("linger.ms", "20")
            .set("acks", "all")
            .create()?;
        for i in 0..a.n {
            let body = format!("{{\"id\": {}, \"seq\": {i}}}", i % 1000);
            let key = (i % 1000).to_string();
            let mut r = BaseRecord::to(&inn).payload(&body).key(&key);
            loop {
                match p.send(r) {
                    Ok(()) => break,
                    Err((e, back)) if e.to_string().contains("Queue full") => {
                        r = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => bail!("produce: {e}"),
                }
            }
        }
        p.flush(Duration::from_secs(120))?;
    }
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
    let deadline = started + Duration::from_secs(600);
    loop {
        let done = if which == "consume" {
            let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap_or_default();
            text.lines().count() as u64 >= a.n
        } else {
            delivered(&a.weft, &dir) >= a.n
        };
        if done {
            break;
        }
        if Instant::now() > deadline {
            let _ = hub.kill();
            bail!("{which}: not all through in 600 s");
        }
        std::thread::sleep(Duration::from_millis(if which == "consume" {
            50
        } else {
            200
        }));
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = hub.kill();
    let _ = hub.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(secs)
}
