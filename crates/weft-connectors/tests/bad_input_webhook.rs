//! Bad input at the webhook door: every malformed request gets its exact
//! status and answer, nothing of it reaches the store, and what is
//! accepted is what was sent (a BOM skipped, a 127-level body kept whole).
//! The source is configured from YAML through `weft validate`'s code path
//! and served on 127.0.0.1.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use serde_json::Value;
use sha2::{Digest, Sha256};
use weft_connectors::webhook::signature::{sign_hmac_sha256_hex, sign_stripe};
use weft_connectors::webhook::{BodyBudget, WebhookRoute};
use weft_connectors::{Batch, Ingest, IngestError, Receipt, Record};
use weft_core::Event;
use weft_core::config::load_str;

const SECRET: &str = "bad-input-secret";

/// Accepts everything; keeps the events.
#[derive(Default)]
struct Events(Mutex<Vec<Event>>);

impl Ingest for Events {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            let mut r = Receipt::default();
            for rec in batch.records {
                match rec {
                    Record::Good(e) => {
                        self.0.lock().unwrap().push(e);
                        r.accepted += 1;
                    }
                    Record::Bad(b) => panic!("a webhook hands no bad records: {b:?}"),
                }
            }
            Ok(r)
        })
    }
    fn checkpoint(&self, _key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
        Box::pin(async { Ok(None) })
    }
}

struct Served {
    url: String,
    addr: std::net::SocketAddr,
    events: Arc<Events>,
}

async fn serve(webhook_yaml: &str) -> Served {
    let text = format!(
        "systems:\n  crm:\n    source:\n      webhook:\n        path: /hooks/crm\n{webhook_yaml}"
    );
    let mut c = load_str(Path::new("weft.yaml"), &text, &|k| {
        (k == "SECRET").then(|| SECRET.to_owned())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let spec = c.systems.remove("crm").unwrap().source.unwrap();
    let route = WebhookRoute::new("crm", &spec).unwrap();
    let events = Arc::new(Events::default());
    let app = route.router_with_budget(events.clone(), BodyBudget::new(1 << 20));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Served {
        url: format!("http://{addr}/hooks/crm"),
        addr,
        events,
    }
}

async fn post(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Signed with the shorthand secret, as JSON.
async fn signed(url: &str, body: &[u8]) -> (u16, Value) {
    let sig = sign_hmac_sha256_hex(SECRET.as_bytes(), body);
    post(
        url,
        &[
            ("content-type", "application/json"),
            ("x-signature-256", &sig),
        ],
        body.to_vec(),
    )
    .await
}

const SHORTHAND: &str = "        secret: ${SECRET}\n        max_body_bytes: 4096\n";

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[tokio::test]
async fn malformed_json_and_shapes_are_400_with_the_reason() {
    let s = serve(SHORTHAND).await;
    for (body, error) in [
        (
            &b"{\"id\": 1,"[..],
            "body is not valid JSON: EOF while parsing a value at line 1 column 9",
        ),
        (
            b"{\"id\": 1} trailing",
            "body is not valid JSON: trailing characters at line 1 column 11",
        ),
        (
            b"",
            "body is not valid JSON: EOF while parsing a value at line 1 column 0",
        ),
        (
            b"{\"name\": \"caf\xe9\"}",
            "body is not valid JSON: invalid unicode code point at line 1 column 14",
        ),
        (
            b"42",
            "body must be a JSON object (one event) or an array of objects (a batch)",
        ),
        (
            b"[{\"a\": 1}, 2]",
            "element 1 of the array is not a JSON object",
        ),
    ] {
        let (status, v) = signed(&s.url, body).await;
        assert_eq!(status, 400, "{body:?}: {v}");
        assert_eq!(v["error"], error, "{body:?}");
    }
    assert!(s.events.0.lock().unwrap().is_empty(), "nothing is stored");
}

#[tokio::test]
async fn wrong_content_type_is_415_before_the_body_is_read() {
    let s = serve(SHORTHAND).await;
    let body = br#"{"id": 1}"#;
    let sig = sign_hmac_sha256_hex(SECRET.as_bytes(), body);
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
    ] {
        let (status, v) = post(
            &s.url,
            &[("content-type", ct), ("x-signature-256", &sig)],
            body.to_vec(),
        )
        .await;
        assert_eq!(status, 415, "{ct}: {v}");
        assert_eq!(
            v["error"],
            format!("content type `{ct}` is not JSON; send `application/json`")
        );
    }
    // JSON in every spelling, and no content type at all, are accepted
    for ct in [
        Some("application/json"),
        Some("Application/JSON; charset=utf-8"),
        Some("application/cloudevents+json"),
        Some("text/json"),
        None,
    ] {
        let mut h = vec![("x-signature-256", sig.as_str())];
        if let Some(ct) = ct {
            h.push(("content-type", ct));
        }
        assert_eq!(post(&s.url, &h, body.to_vec()).await.0, 202, "{ct:?}");
    }
}

#[tokio::test]
async fn oversized_bodies_are_413_announced_or_chunked() {
    let s = serve(SHORTHAND).await;
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(4096));
    let (status, v) = signed(&s.url, big.as_bytes()).await;
    assert_eq!(status, 413);
    assert_eq!(v["error"], "body is larger than 4096 bytes");
    // chunked, no Content-Length: stopped while reading
    let addr = s.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let mut req = b"POST /hooks/crm HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        for _ in 0..5 {
            req.extend_from_slice(format!("400\r\n{}\r\n", "y".repeat(1024)).as_bytes());
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let _ = c.write_all(&req);
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("body is larger than 4096 bytes"),
        "{answer}"
    );
    assert!(s.events.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn bad_missing_or_malformed_signatures_are_401() {
    let s = serve(SHORTHAND).await;
    let body = br#"{"id": 1}"#;
    let wrong = sign_hmac_sha256_hex(b"another secret", body);
    for (headers, error) in [
        (
            vec![("x-signature-256", wrong.as_str())],
            "signature in header `x-signature-256` does not match the body",
        ),
        (vec![], "missing signature header `x-signature-256`"),
        (
            vec![("x-signature-256", "zz")],
            "malformed signature in header `x-signature-256`: not hexadecimal",
        ),
        (
            vec![("x-signature-256", "sha256=")],
            "malformed signature in header `x-signature-256`: empty",
        ),
    ] {
        let (status, v) = post(&s.url, &headers, body.to_vec()).await;
        assert_eq!(status, 401, "{headers:?}: {v}");
        assert_eq!(v["error"], error);
    }
    assert!(s.events.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_stale_timestamp_is_401_with_the_skew() {
    let s = serve("        signature: {scheme: stripe, secrets: [whsec_k]}\n").await;
    let body = br#"{"id": "evt_1"}"#;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sig = sign_stripe("whsec_k", now - 3600, body);
    let (status, v) = post(&s.url, &[("stripe-signature", &sig)], body.to_vec()).await;
    assert_eq!(status, 401, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.starts_with("timestamp in header `stripe-signature` is 360")
            && e.ends_with("s before now, outside the tolerance of 300s"),
        "{e}"
    );
    assert!(s.events.0.lock().unwrap().is_empty());
}

/// A UTF-8 BOM is skipped for parsing only: the signature and the body
/// hash (the default id) are over the raw bytes.
#[tokio::test]
async fn a_utf8_bom_is_accepted_and_signed_as_sent() {
    let s = serve(SHORTHAND).await;
    let mut body = b"\xEF\xBB\xBF".to_vec();
    body.extend_from_slice(br#"{"id": "bom-1"}"#);
    let (status, v) = signed(&s.url, &body).await;
    assert_eq!(status, 202, "{v}");
    let want_id = hex::encode(Sha256::digest(&body));
    assert_eq!(v["ids"][0], want_id.as_str());
    {
        let events = s.events.0.lock().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, serde_json::json!({"id": "bom-1"}));
    }
    // signed without the BOM but sent with it: not the bytes that were signed
    let sig = sign_hmac_sha256_hex(SECRET.as_bytes(), br#"{"id": "bom-1"}"#);
    let (status, v) = post(&s.url, &[("x-signature-256", &sig)], body.clone()).await;
    assert_eq!(status, 401, "{v}");
    // a BOM in the middle is not one
    let mut mid = br#"{"id": 1}"#.to_vec();
    mid.splice(0..0, b" \xEF\xBB\xBF".iter().copied());
    let (status, v) = signed(&s.url, &mid).await;
    assert_eq!(status, 400, "{v}");
}

/// serde_json's own limit: 127 levels are parsed and handed on unchanged
/// (never as `null`), 200 are refused at the door with the position.
#[tokio::test]
async fn deep_nesting_127_is_kept_whole_200_is_400() {
    let s = serve("        secret: ${SECRET}\n        max_body_bytes: 65536\n").await;
    let deep = |levels: usize| {
        format!(
            "{}{}",
            "{\"a\":".repeat(levels),
            "1".to_owned() + &"}".repeat(levels)
        )
    };
    let body = deep(127);
    let (status, v) = signed(&s.url, body.as_bytes()).await;
    assert_eq!(status, 202, "{v}");
    {
        let events = s.events.0.lock().unwrap();
        assert_eq!(depth(&events[0].data), 127);
        assert_eq!(serde_json::to_string(&events[0].data).unwrap(), body);
    }
    let (status, v) = signed(&s.url, deep(200).as_bytes()).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        v["error"],
        "body is not valid JSON: recursion limit exceeded at line 1 column 636"
    );
    // arrays too
    let arrays = format!("[{}{}]", "[".repeat(199), "]".repeat(199));
    let (status, v) = signed(&s.url, arrays.as_bytes()).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("body is not valid JSON: recursion limit exceeded"),
        "{v}"
    );
    assert_eq!(s.events.0.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_bad_id_header_is_400() {
    let s = serve("        secret: ${SECRET}\n        id_header: x-event-id\n").await;
    let body = br#"{"id": 1}"#;
    let sig = sign_hmac_sha256_hex(SECRET.as_bytes(), body);
    let long = "e".repeat(201);
    for (id, error) in [(
        long.as_str(),
        "header `x-event-id` is longer than 200 characters",
    )] {
        let (status, v) = post(
            &s.url,
            &[("x-signature-256", &sig), ("x-event-id", id)],
            body.to_vec(),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"], error);
    }
    let r = reqwest::Client::new()
        .post(&s.url)
        .header("x-signature-256", &sig)
        .header(
            "x-event-id",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "header `x-event-id` is not printable ASCII");
}
