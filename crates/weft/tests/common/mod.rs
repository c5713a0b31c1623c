//! Test utilities: run the real `weft` binary, a real recording HTTP
//! server to deliver to, and signed webhook posts.
#![allow(dead_code)]

pub mod pg;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub fn weft() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weft"))
}

/// Run `weft ARGS` to completion in `dir`.
pub fn weft_cmd(dir: &Path, args: &[&str]) -> std::process::Output {
    weft_cmd_env(dir, args, &[])
}

/// Run `weft ARGS` with extra environment variables.
pub fn weft_cmd_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(weft());
    cmd.args(args).current_dir(dir).env("WEFT_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run weft")
}

/// A running `weft run` process.
pub struct Hub {
    pub child: Child,
    /// The webhook listener.
    pub addr: SocketAddr,
    /// The admin listener: admin API, `/metrics`.
    pub admin_addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Hub {
    /// Start `weft run CONFIG --listen 127.0.0.1:PORT --admin-listen
    /// 127.0.0.1:0` (PORT 0: any) in `dir` and wait until it serves.
    pub fn start(dir: &Path, config: &str, port: u16, env: &[(&str, &str)]) -> Hub {
        let mut cmd = Command::new(weft());
        cmd.args(["run", config, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", "127.0.0.1:0"])
            .current_dir(dir)
            .env("WEFT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn weft");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                for (key, admin) in [(" admin_address=", true), (" address=", false)] {
                    if let Some(i) = line.find(key) {
                        let a = line[i + key.len()..]
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_string();
                        let _ = tx.send((admin, a));
                        break;
                    }
                }
                l2.lock().unwrap().push(line);
            }
        });
        let (mut addr, mut admin_addr) = (None, None);
        while addr.is_none() || admin_addr.is_none() {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok((true, a)) => admin_addr = Some(a.parse().expect("admin address")),
                Ok((false, a)) => addr = Some(a.parse().expect("address")),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "weft did not start; log:\n{}",
                        log.lock().unwrap().join("\n")
                    );
                }
            }
        }
        Hub {
            child,
            addr: addr.expect("address"),
            admin_addr: admin_addr.expect("admin address"),
            log,
        }
    }

    /// A URL on the webhook listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A URL on the admin listener (`/api/v1/...`, `/metrics`).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        unsafe_kill(pid, 15);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("weft did not stop within 60s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send signal `sig` (19: SIGSTOP, 18: SIGCONT) and return at once.
    pub fn signal(&self, sig: i32) {
        unsafe_kill(self.child.id() as i32, sig);
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    // std has no signal API; `kill` the command is everywhere
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Hex HMAC-SHA256 of `body`, as the webhook source expects (`sha256=` prefix).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One request the recording server received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub correlation_id: Option<String>,
    pub body: serde_json::Value,
    /// Every header, names lower-case.
    pub headers: Vec<(String, String)>,
}

/// Fault modes of the [`Recorder`].
pub const OK: u32 = 0;
pub const FAIL_500: u32 = 1;
pub const FAIL_400: u32 = 2;
/// Accept the request and never answer.
pub const HANG: u32 = 3;
/// 429 with `Retry-After: 1`.
pub const TOO_MANY: u32 = 4;
/// 400 when the body has `"fail": true`, else 200.
pub const FAIL_MARKED: u32 = 5;
/// Answer 200 with `{"data": {"id": "ext-<last path segment>"}}`: a
/// destination that assigns ids (`capture_id`).
pub const ECHO_ID: u32 = 6;

/// One request as the server saw it, whatever it answered.
#[derive(Debug, Clone)]
pub struct Hit {
    pub at: Instant,
    pub status: u16,
    pub body: serde_json::Value,
}

/// A real HTTP server that records every request it accepts (`received`,
/// answered 200) and every hit (`hits`, any answer); `fail_mode` injects
/// faults (see the constants above).
pub struct Recorder {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub hits: Arc<Mutex<Vec<Hit>>>,
    pub fail_mode: Arc<AtomicU32>,
    _rt: tokio::runtime::Runtime,
}

impl Recorder {
    pub fn start() -> Recorder {
        Self::start_on(0)
    }

    pub fn start_on(port: u16) -> Recorder {
        use axum::extract::State;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use axum::response::IntoResponse;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let fail_mode = Arc::new(AtomicU32::new(0));
        type St = (
            Arc<Mutex<Vec<Received>>>,
            Arc<Mutex<Vec<Hit>>>,
            Arc<AtomicU32>,
        );
        async fn handle(
            State((rec, hits, mode)): State<St>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> axum::response::Response {
            let json: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            let status = match mode.load(Ordering::SeqCst) {
                FAIL_500 => StatusCode::INTERNAL_SERVER_ERROR,
                FAIL_400 => StatusCode::BAD_REQUEST,
                HANG => {
                    hits.lock().unwrap().push(Hit {
                        at: Instant::now(),
                        status: 0,
                        body: json.clone(),
                    });
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return StatusCode::OK.into_response();
                }
                TOO_MANY => StatusCode::TOO_MANY_REQUESTS,
                FAIL_MARKED if json["fail"] == true => StatusCode::BAD_REQUEST,
                _ => StatusCode::OK,
            };
            hits.lock().unwrap().push(Hit {
                at: Instant::now(),
                status: status.as_u16(),
                body: json.clone(),
            });
            if status == StatusCode::TOO_MANY_REQUESTS {
                return (status, [("retry-after", "1")]).into_response();
            }
            if status != StatusCode::OK {
                return status.into_response();
            }
            let h = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            rec.lock().unwrap().push(Received {
                method: method.to_string(),
                path: uri.path().to_owned(),
                idempotency_key: h("idempotency-key"),
                correlation_id: h("x-correlation-id"),
                body: json,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                    .collect(),
            });
            if mode.load(Ordering::SeqCst) == ECHO_ID {
                let id = format!("ext-{}", uri.path().rsplit('/').next().unwrap_or(""));
                return axum::Json(serde_json::json!({"data": {"id": id}})).into_response();
            }
            StatusCode::OK.into_response()
        }
        let app = axum::Router::new().fallback(handle).with_state((
            received.clone(),
            hits.clone(),
            fail_mode.clone(),
        ));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Recorder {
            addr,
            received,
            hits,
            fail_mode,
            _rt: rt,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn hit_count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    pub fn set(&self, mode: u32) {
        self.fail_mode.store(mode, Ordering::SeqCst);
    }
}

/// A metric's value from Prometheus text, by exact series name with labels.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn scrape(hub: &Hub) -> String {
    reqwest::blocking::get(hub.admin_url("/metrics"))
        .unwrap()
        .text()
        .unwrap()
}

/// Poll `f` until it returns true, failing after `timeout` with `what`.
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// [`wait_for`] with its failure told by `why` when time runs out (the
/// hub's log, counts as they are then), polling every 100 ms (for checks
/// that run a command).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool, why: impl FnOnce() -> String) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?}: {}", why());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `weft status --json` parsed.
pub fn status(dir: &Path, config: &str, env: &[(&str, &str)]) -> serde_json::Value {
    let out = weft_cmd_env(dir, &["status", "-c", config, "--json"], env);
    assert!(
        out.status.success() || out.status.code() == Some(3),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status json")
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------
// CDC crash tests (cdc.rs, mysql_cdc.rs)
// ---------------------------------------------------------------------------

/// The lines of a JSON Lines file (the sink cuts a partial last line when
/// it opens the file again). Only whole lines: a test polling the file
/// while the hub writes may read half of the last one (regression: a
/// flaky `EOF while parsing` in `a_postgres_restart_mid_stream_…`).
pub fn jsonl_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |i| &text[..i]);
    whole
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// 16 hex digits from the clock and the process id (for names of a test's
/// own databases).
pub fn unique_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!("{:016x}", t ^ ((std::process::id() as u64) << 40))
}

/// Stop a server a test started: SIGTERM, then SIGKILL if it is still up
/// after 10 s; returns once it has exited.
pub fn terminate(c: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while matches!(c.try_wait(), Ok(None)) {
        if std::time::Instant::now() > deadline {
            let _ = c.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start weft, let it run a while, SIGKILL it, again and again while
/// `busy()` holds (pauses of 0.4 to 1.3 s). Returns how many kills and
/// each run's log.
pub fn kill_while(
    dir: &Path,
    config: &str,
    env: &[(&str, &str)],
    busy: impl Fn() -> bool,
) -> (usize, Vec<String>) {
    let mut kills = 0;
    let mut logs = Vec::new();
    let mut pause = 700u64;
    while busy() {
        let hub = Hub::start(dir, config, 0, env);
        std::thread::sleep(Duration::from_millis(pause));
        pause = 400 + (pause * 7919) % 900;
        logs.push(hub.log_text());
        hub.kill9();
        kills += 1;
    }
    (kills, logs)
}

/// The checks of a CDC destination file written with `envelope: true`,
/// redeliveries included: one idempotency key and one payload per
/// position (`pos` of a change's data), and the reverse; and per key
/// (`data.key`) the write sequence never goes back to an earlier change.
/// Snapshot rows (`op: r`) are left out. Returns each position's payload.
pub fn check_cdc_lines<P>(
    all: &[serde_json::Value],
    pos: impl Fn(&serde_json::Value) -> P,
) -> std::collections::HashMap<P, serde_json::Value>
where
    P: Ord + std::hash::Hash + Clone + std::fmt::Debug,
{
    use std::collections::HashMap;
    let mut by_pos: HashMap<P, (String, serde_json::Value)> = HashMap::new();
    let mut keys: HashMap<String, P> = HashMap::new();
    let mut last: HashMap<String, P> = HashMap::new();
    for l in all {
        let d = &l["data"];
        if d["op"] == "r" {
            continue;
        }
        let key = l["id"].as_str().unwrap().to_owned();
        let p = pos(d);
        let prev = by_pos
            .entry(p.clone())
            .or_insert_with(|| (key.clone(), d.clone()));
        assert_eq!(prev.0, key, "one position, two idempotency keys");
        assert_eq!(&prev.1, d, "one position, two payloads");
        assert_eq!(
            *keys.entry(key).or_insert(p.clone()),
            p,
            "one key, two positions"
        );
        let k = d["key"].to_string();
        if let Some(prev) = last.insert(k.clone(), p.clone()) {
            assert!(prev <= p, "key {k}: {prev:?} written after {p:?}");
        }
    }
    by_pos.into_iter().map(|(p, (_, d))| (p, d)).collect()
}

// ---------------------------------------------------------------------------
// Python parsers (metrics.rs, cloudevents.rs, freshness.rs)
// ---------------------------------------------------------------------------

/// `python3` with `modules` importable, installing `packages` with pip
/// when they are missing. `None` (said loudly) when that cannot be done;
/// under `CI=true` that fails the test instead.
pub fn python_with(modules: &[&str], packages: &[&str]) -> Option<()> {
    let import = format!("import {}", modules.join(", "));
    let importable = || {
        Command::new("python3")
            .args(["-c", &import])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if importable() {
        return Some(());
    }
    let installed = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet"])
        .args(packages)
        .status()
        .is_ok_and(|s| s.success());
    if installed && importable() {
        return Some(());
    }
    let why = format!(
        "python3 with {} is not available and `pip install {}` failed",
        modules.join(", "),
        packages.join(" ")
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why} (CI=true: this test must run)");
    }
    eprintln!("\n!!! SKIPPED: {why}\n");
    None
}

/// Run `python3 -c SCRIPT` with `input` on stdin; its stdout parsed as
/// JSON. A failing script fails the test with its stderr.
pub fn python_json(script: &str, input: &[u8]) -> serde_json::Value {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write to python3");
    let out = child.wait_with_output().expect("python3 output");
    assert!(
        out.status.success(),
        "python3 failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "python3 printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
