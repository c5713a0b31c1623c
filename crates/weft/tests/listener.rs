//! The listeners of the real binary: webhooks apart from the admin API and
//! metrics (P2-4), timeouts and limits against slow or greedy clients
//! (P2-4), the admin token compare (P2-5), admin errors as JSON, and what
//! `weft validate` says (warnings, connector URLs).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "listener-hook";
const TOKEN: &str = "listener-token-0123456789abcdef01234";

fn config(extra_server: &str) -> String {
    format!(
        r#"
store:
  path: data/weft.db
server:
  admin_token: ${{WEFT_ADMIN_TOKEN}}
{extra_server}
systems:
  crm:
    source:
      webhook: {{path: /hooks/crm, secret: "${{HOOK_SECRET}}", id_header: x-event-id}}
  out:
    sink: {{jsonl: {{path: out.jsonl}}}}
flows:
  f: {{from: crm, to: [out]}}
"#
    )
}

const ENV: [(&str, &str); 2] = [("HOOK_SECRET", SECRET), ("WEFT_ADMIN_TOKEN", TOKEN)];

fn start(extra_server: &str) -> (tempfile::TempDir, Hub) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("weft.yaml"), config(extra_server)).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &ENV);
    (dir, hub)
}

fn get(url: &str, token: Option<&str>) -> (u16, String, Option<String>) {
    let mut req = reqwest::blocking::Client::new().get(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), r.text().unwrap(), ct)
}

#[test]
fn p2_4_admin_api_and_metrics_are_not_on_the_webhook_listener() {
    let (_d, hub) = start("");
    assert_ne!(hub.addr.port(), hub.admin_addr.port());
    for path in ["/api/v1/status", "/metrics", "/api/v1/openapi.json"] {
        assert_eq!(
            get(&hub.url(path), Some(TOKEN)).0,
            404,
            "{path} on the webhook port"
        );
    }
    assert_eq!(get(&hub.admin_url("/api/v1/status"), Some(TOKEN)).0, 200);
    let (s, metrics, _) = get(&hub.admin_url("/metrics"), None);
    assert_eq!(s, 200);
    assert!(metrics.contains("weft_"), "{metrics}");
    for url in [hub.url("/healthz"), hub.admin_url("/healthz")] {
        assert_eq!(get(&url, None), (200, "ok\n".into(), get(&url, None).2));
    }
    for url in [hub.url("/readyz"), hub.admin_url("/readyz")] {
        assert_eq!(get(&url, None).0, 200);
    }
    // webhooks are not served on the admin listener
    let body = br#"{"id": 1}"#;
    let r = reqwest::blocking::Client::new()
        .post(hub.admin_url("/hooks/crm"))
        .header("x-signature-256", sign(SECRET, body))
        .body(body.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[test]
fn p2_5_token_followed_by_256_bytes_is_refused_and_errors_are_json() {
    let (_d, hub) = start("");
    let padded = format!("{TOKEN}{}", "x".repeat(256));
    let (s, body, ct) = get(&hub.admin_url("/api/v1/status"), Some(&padded));
    assert_eq!(s, 401, "{body}");
    assert_eq!(ct.as_deref(), Some("application/json"));
    assert!(body.contains("missing or wrong bearer token"), "{body}");
    assert_eq!(get(&hub.admin_url("/api/v1/status"), Some(TOKEN)).0, 200);
    assert_eq!(
        get(&hub.admin_url("/api/v1/status"), Some(&TOKEN[..31])).0,
        401
    );

    // what axum answers itself comes as JSON too
    let (s, body, ct) = get(&hub.admin_url("/api/v1/dlq/not-a-number"), Some(TOKEN));
    assert_eq!(s, 400, "{body}");
    assert_eq!(ct.as_deref(), Some("application/json"), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("parse"), "{body}");
    let (s, body, ct) = get(&hub.admin_url("/api/v1/nope"), Some(TOKEN));
    assert_eq!(
        (s, ct.as_deref()),
        (404, Some("application/json")),
        "{body}"
    );
    assert_eq!(body, r#"{"error":"no such route"}"#);
    let r = reqwest::blocking::Client::new()
        .put(hub.admin_url("/api/v1/status"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.headers().contains_key("allow"));
    let v: serde_json::Value = r.json().unwrap();
    assert!(v["error"].is_string(), "{v}");
}

/// Raw HTTP: write `head`, then the answer's status (0 when the server
/// closed the connection without one) and how long it took.
fn raw(addr: SocketAddr, head: &[u8], then_wait: Duration) -> (u16, String, Duration) {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(then_wait)).unwrap();
    s.write_all(head).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text, t0.elapsed())
}

/// A slow client cannot hold a connection: headers that never end are cut
/// after 10 s, a body that stops arriving gets `408` after 10 s.
#[test]
fn p2_4_slow_headers_and_slow_bodies_time_out() {
    let (_d, hub) = start("");
    let addr = hub.addr;
    let slow_headers = std::thread::spawn(move || {
        raw(
            addr,
            b"POST /hooks/crm HTTP/1.1\r\nHost: x\r\nX-Slow: 1",
            Duration::from_secs(30),
        )
    });
    let slow_body = std::thread::spawn(move || {
        raw(
            addr,
            b"POST /hooks/crm HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"id\":",
            Duration::from_secs(30),
        )
    });
    let (s, text, took) = slow_headers.join().unwrap();
    assert!(s == 0 || s == 408, "{s}: {text}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "{took:?}"
    );
    let (s, text, took) = slow_body.join().unwrap();
    assert_eq!(s, 408, "{text}");
    assert!(took < Duration::from_secs(25), "{took:?}");
    // and the hub still serves
    assert_eq!(get(&hub.url("/healthz"), None).0, 200);
}

/// Memory is bounded by bytes in flight: a body that does not fit in what
/// is left of `server.max_inflight_bytes` is refused with 503 and
/// `Retry-After` before it is kept (it is read and dropped, so that the
/// sender sees the answer); it fits again once the others are answered.
/// (A `max_body_bytes` above the whole budget is refused by `validate`.)
#[test]
fn p2_4_bytes_in_flight_are_bounded() {
    let (_d, hub) = start("  max_inflight_bytes: 1100000\n");
    let addr = hub.addr;
    // 600 kB announced, 10 bytes sent: the 600 kB are reserved while it waits
    let mut holder = TcpStream::connect(addr).unwrap();
    holder
        .write_all(
            b"POST /hooks/crm HTTP/1.1\r\nHost: x\r\nContent-Length: 600000\r\n\r\n0123456789",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let big = vec![b' '; 500_000];
    let post = |body: &[u8]| {
        reqwest::blocking::Client::new()
            .post(hub.url("/hooks/crm"))
            .header("x-signature-256", sign(SECRET, body))
            .header("x-event-id", "big-1")
            .body(body.to_vec())
            .send()
            .unwrap()
    };
    let mut doc = b"{\"id\": 1}".to_vec();
    doc.extend_from_slice(&big);
    let r = post(&doc);
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(
        v["error"], "too many request bytes in flight; retry later",
        "{v}"
    );
    // a small one still fits
    let r = post(br#"{"id": 2}"#);
    assert_eq!(r.status().as_u16(), 202);
    drop(holder);
    // the held bytes are given back once the server sees the connection go
    wait_for(
        Duration::from_secs(5),
        "the budget to be free again",
        || post(&doc).status().as_u16() == 202,
    );
}

/// At most `server.max_concurrent_requests` webhook requests are handled
/// at once; more get 503 at once, and health is never refused.
#[test]
fn p2_4_requests_in_progress_are_capped() {
    let (_d, hub) = start("  max_concurrent_requests: 2\n");
    let addr = hub.addr;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /hooks/crm HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            .unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let body = br#"{"id": 3}"#;
    let r = reqwest::blocking::Client::new()
        .post(hub.url("/hooks/crm"))
        .header("x-signature-256", sign(SECRET, body))
        .body(body.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(get(&hub.url("/healthz"), None).0, 200);
    drop(held);
    wait_for(Duration::from_secs(5), "a free slot", || {
        reqwest::blocking::Client::new()
            .post(hub.url("/hooks/crm"))
            .header("x-signature-256", sign(SECRET, body))
            .body(body.to_vec())
            .send()
            .unwrap()
            .status()
            .as_u16()
            == 202
    });
}

#[test]
fn validate_prints_warnings_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let text = config("").replace(", id_header: x-event-id", "");
    std::fs::write(dir.path().join("weft.yaml"), &text).unwrap();
    let out = weft_cmd_env(dir.path(), &["validate", "weft.yaml"], &ENV);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("2 warnings"), "{stdout}");
    // the shorthand has no timestamp; no stable id
    assert!(
        stderr.contains("warning: weft.yaml:10:43: at `systems.crm.source.webhook.secret`: the signature has no timestamp"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "warning: weft.yaml:10:7: at `systems.crm.source.webhook`: no `id_field` or `id_header`"
        ),
        "{stderr}"
    );
}

#[test]
fn validate_refuses_what_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let text = "systems:\n  crm:\n    source:\n      webhook: {path: /hooks/crm, id_field: .id}\n  wh:\n    sink:\n      postgres:\n        url: \"postgresql://postgres@127.0.0.1:notaport/test\"\n        table: t\n        key: [id]\n        columns: {id: text}\nflows:\n  f: {from: crm, to: [wh]}\n";
    std::fs::write(dir.path().join("weft.yaml"), text).unwrap();
    for cmd in ["validate", "run"] {
        let out = weft_cmd_env(dir.path(), &[cmd, "weft.yaml"], &ENV);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
        assert!(
            stderr.contains("weft.yaml:8:14: at `systems.wh.sink.postgres.url`: not a PostgreSQL connection URL the client accepts"),
            "{cmd}: {stderr}"
        );
        assert!(
            !stderr.contains("notaport"),
            "the URL is never quoted: {stderr}"
        );
    }
    // a webhook path the server cannot mount, a header name that is none
    let text = config("")
        .replace("path: /hooks/crm", "path: \"/hooks/{id}\"")
        .replace("x-event-id", "x event id");
    std::fs::write(dir.path().join("weft.yaml"), text).unwrap();
    let out = weft_cmd_env(dir.path(), &["validate", "weft.yaml"], &ENV);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("weft.yaml:10:7: at `systems.crm.source.webhook`: path `/hooks/{id}`: must not contain `{`, `}`, `?` or `#`"),
        "{stderr}"
    );
    // a short admin token
    let text = config("").replace("${WEFT_ADMIN_TOKEN}", "short");
    std::fs::write(dir.path().join("weft.yaml"), text).unwrap();
    let out = weft_cmd_env(dir.path(), &["validate", "weft.yaml"], &ENV);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "weft.yaml:5:16: at `server.admin_token`: is 5 bytes; at least 32 are required"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("short"), "{stderr}");
}
