//! A Kafka-compatible broker of the test's own: `tansu broker` (the
//! `tansu` crate, `cargo install tansu --version 0.6.0 --locked --features
//! dynostore,libsql`; `.ci/services.sh` installs it) on a free port of
//! 127.0.0.1, killed when the value is dropped. Plus the few client calls
//! the tests make through rdkafka: create a topic, produce, read a topic.
//!
//! Shared by the connector tests and the binary's tests
//! (`crates/weft/tests/kafka.rs` includes this file by path). Every call
//! is blocking (an async test runs it on a thread of its own or with a
//! multi-threaded runtime).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// The `tansu` binary: on the PATH, else cargo's bin folder.
fn binary() -> Option<PathBuf> {
    let candidates = [
        Some(PathBuf::from("tansu")),
        std::env::var_os("CARGO_HOME").map(|h| PathBuf::from(h).join("bin/tansu")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu")),
    ];
    candidates.into_iter().flatten().find(|b| {
        Command::new(b)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A running `tansu broker`.
pub struct Tansu {
    bin: PathBuf,
    child: Option<Child>,
    pub port: u16,
    storage: String,
    dir: tempfile::TempDir,
}

impl Tansu {
    /// A broker with memory storage (lost when it stops), or `None` (skip,
    /// said loudly) when `tansu` is not installed; under `CI=true` that
    /// fails the test instead.
    pub fn start() -> Option<Tansu> {
        Self::start_with("memory://tansu/")
    }

    /// A broker on `storage`: `memory://tansu/`, or `sqlite://tansu.db` (a
    /// file in the broker's own folder; tansu 0.6.0's sqlite engine panics
    /// on idempotent produce, so no test uses it).
    pub fn start_with(storage: &str) -> Option<Tansu> {
        let Some(bin) = binary() else {
            let why = "the `tansu` binary (a Kafka-compatible broker) is not installed: \
                       cargo install tansu --version 0.6.0 --locked --features dynostore,libsql";
            if ci() {
                panic!("{why} (CI=true: the Kafka tests must run)");
            }
            eprintln!("\n!!! SKIPPED: {why}\n");
            return None;
        };
        let mut t = Tansu {
            bin,
            child: None,
            port: free_port(),
            storage: storage.to_owned(),
            dir: tempfile::tempdir().expect("a temporary folder"),
        };
        t.up();
        Some(t)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start the broker (again, on the same port and storage) and wait
    /// until it answers a metadata request.
    pub fn up(&mut self) {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("tansu log file");
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", &self.storage])
            .args(["--cluster-id", "weft-test"])
            .arg("--silent")
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("tansu exited at start ({status}):\n{}", self.log());
            }
            if metadata(&self.brokers(), Duration::from_millis(500)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not answer within 30s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the broker: SIGTERM, SIGKILL after 10 s; returns once it exited.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// What the broker logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("socket.connection.setup.timeout.ms", "2000");
    c
}

/// The names of the cluster's topics, or the error.
pub fn metadata(brokers: &str, wait: Duration) -> Result<Vec<String>, String> {
    let c: BaseConsumer = client(brokers).create().map_err(|e| e.to_string())?;
    let md = c.fetch_metadata(None, wait).map_err(|e| e.to_string())?;
    Ok(md.topics().iter().map(|t| t.name().to_owned()).collect())
}

/// Create `topic` with `partitions` partitions and wait until the
/// metadata shows it.
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let (b, name) = (brokers.to_owned(), topic.to_owned());
    let created = std::thread::spawn(move || {
        let brokers = b;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let admin: AdminClient<DefaultClientContext> =
                client(&brokers).create().map_err(|e| e.to_string())?;
            let t = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            let r = admin
                .create_topics([&t], &opts)
                .await
                .map_err(|e| e.to_string())?;
            for x in r {
                x.map_err(|(t, e)| format!("{t}: {e}"))?;
            }
            Ok::<_, String>(())
        })
    })
    .join()
    .expect("create_topic thread");
    if let Err(e) = created {
        panic!("cannot create topic {topic}: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metadata(brokers, Duration::from_secs(2)).is_ok_and(|ts| ts.iter().any(|t| t == topic)) {
        assert!(
            Instant::now() < deadline,
            "topic {topic} not in the metadata"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One message to produce.
#[derive(Debug, Clone, Default)]
pub struct Msg {
    pub key: Option<Vec<u8>>,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub partition: Option<i32>,
}

impl Msg {
    pub fn json(v: &serde_json::Value) -> Msg {
        Msg {
            value: Some(v.to_string().into_bytes()),
            ..Msg::default()
        }
    }
}

/// Produce `msgs` to `topic` (acks=all), waiting until every one is
/// acknowledged.
///
/// One message per record batch (`batch.num.messages=1`): tansu 0.6.0
/// (memory storage) answers a fetch from an offset inside a record batch
/// with only the batches after it, so a consumer group resuming from an
/// offset committed in the middle of a batch would skip the rest of that
/// batch. With one message per batch every offset is a batch's first; a
/// Kafka broker returns the batch holding the offset, so this does not
/// arise there.
pub fn produce(brokers: &str, topic: &str, msgs: &[Msg]) {
    let p: ThreadedProducer<DefaultProducerContext> = client(brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    for m in msgs {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &m.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
        if let Some(k) = &m.key {
            r = r.key(k.as_slice());
        }
        if let Some(v) = &m.value {
            r = r.payload(v.as_slice());
        }
        if let Some(p) = m.partition {
            r = r.partition(p);
        }
        let mut r = r;
        loop {
            match p.send(r) {
                Ok(()) => break,
                Err((e, back)) => {
                    assert!(
                        e.to_string().contains("Queue full"),
                        "producing to {topic}: {e}"
                    );
                    r = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    p.flush(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("producing to {topic}: {e}"));
}

/// A message as read back.
#[derive(Debug, Clone)]
pub struct Got {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().unwrap_or_default())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// Every message of `topic` (partitions `0..partitions`) from the start,
/// read without a group, until `want` came or 2 s passed without one
/// (at most `wait` in all).
pub fn read_all(
    brokers: &str,
    topic: &str,
    partitions: i32,
    want: usize,
    wait: Duration,
) -> Vec<Got> {
    let c: BaseConsumer = client(brokers)
        .set("group.id", "weft-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    let mut last = Instant::now();
    while out.len() < want || last.elapsed() < Duration::from_millis(300) {
        if Instant::now() > deadline || last.elapsed() > Duration::from_secs(2) {
            break;
        }
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            last = Instant::now();
            out.push(Got {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    out
}

/// The offsets group `group` committed on `topic`'s partitions (`-1`:
/// none).
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c: BaseConsumer = client(brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    match c.committed_offsets(tpl, Duration::from_secs(5)) {
        Ok(t) => t
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            })
            .collect(),
        Err(_) => vec![-1; partitions as usize],
    }
}

/// How many messages `topic` holds (the sum of its partitions' high
/// watermarks; 0 when the broker does not answer).
pub fn count(brokers: &str, topic: &str, partitions: i32) -> i64 {
    let Ok(c) = client(brokers).create::<BaseConsumer>() else {
        return 0;
    };
    (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(2))
                .map_or(0, |(_, high)| high)
        })
        .sum()
}
