//! The webhook source against a real HTTP server on 127.0.0.1, with reqwest
//! as the sender and an in-test `Ingest` that records what it was given.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use weft_connectors::webhook::WebhookRoute;
use weft_connectors::webhook::signature::sign_hmac_sha256_hex;
use weft_connectors::{Batch, Ingest, IngestError, Receipt, Record};
use weft_core::Event;
use weft_core::config::raw::WebhookSourceConfig;
use weft_core::config::{Secret, SourceSpec};
use weft_core::mapping::Program;

const SECRET: &str = "s3cret-for-tests";
const PATH: &str = "/hooks/crm";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    Unavailable,
    Store,
}

/// Records every batch; answers as told by `mode`. Counts a record as a
/// duplicate when its id was seen in an earlier successful batch.
struct FakeIngest {
    mode: Mutex<Mode>,
    batches: Mutex<Vec<Batch>>,
}

impl FakeIngest {
    fn new(mode: Mode) -> Arc<Self> {
        Arc::new(FakeIngest {
            mode: Mutex::new(mode),
            batches: Mutex::new(Vec::new()),
        })
    }
    fn events(&self) -> Vec<Event> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.records.iter())
            .map(|r| match r {
                Record::Good(e) => e.clone(),
                Record::Bad(b) => panic!("unexpected bad record {b:?}"),
            })
            .collect()
    }
    fn batch_count(&self) -> usize {
        self.batches.lock().unwrap().len()
    }
}

impl Ingest for FakeIngest {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            let mode = *self.mode.lock().unwrap();
            match mode {
                Mode::Unavailable => return Err(IngestError::Unavailable("backlog full".into())),
                Mode::Store => return Err(IngestError::Store("disk on fire".into())),
                Mode::Ok => {}
            }
            let seen: Vec<String> = self.events().into_iter().map(|e| e.id).collect();
            let mut receipt = Receipt::default();
            for r in &batch.records {
                if let Record::Good(e) = r {
                    if seen.contains(&e.id) {
                        receipt.duplicates += 1;
                    } else {
                        receipt.accepted += 1;
                    }
                }
            }
            self.batches.lock().unwrap().push(batch);
            Ok(receipt)
        })
    }
    fn checkpoint(&self, _key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
        Box::pin(async { Ok(None) })
    }
}

struct Opts {
    secret: Option<&'static str>,
    max_body_bytes: usize,
    id_field: Option<&'static str>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            secret: Some(SECRET),
            max_body_bytes: 1024,
            id_field: None,
        }
    }
}

fn spec(o: &Opts) -> SourceSpec {
    SourceSpec::Webhook {
        cfg: WebhookSourceConfig {
            path: PATH.into(),
            secret: o.secret.map(Secret::new),
            signature_header: None,
            max_body_bytes: Some(o.max_body_bytes),
            id_header: None,
            id_field: None,
            event_type: None,
            signature: None,
        },
        id_field: o
            .id_field
            .map(|c| Arc::new(Program::compile(c, &[]).unwrap())),
        event_type: "crm.contact".into(),
        max_body_bytes: o.max_body_bytes,
        signature_header: "x-signature-256".into(),
        id_header: Some("x-event-id".into()),
        signature_tolerance: std::time::Duration::from_secs(300),
    }
}

async fn serve(o: Opts, ingest: Arc<FakeIngest>) -> String {
    let route = WebhookRoute::new("crm", &spec(&o)).unwrap();
    let app = route.router(ingest);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}{PATH}")
}

fn signed(client: &reqwest::Client, url: &str, body: &str) -> reqwest::RequestBuilder {
    let sig = sign_hmac_sha256_hex(SECRET.as_bytes(), body.as_bytes());
    client
        .post(url)
        .header("content-type", "application/json")
        .header("x-signature-256", format!("sha256={sig}"))
        .body(body.to_owned())
}

/// POST `chunks` with `Transfer-Encoding: chunked` (no Content-Length) over
/// a raw connection; returns the response status.
async fn raw_chunked_post(url: &str, sig: &str, chunks: &[&str]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\nx-signature-256: {sig}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    for c in chunks {
        req.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
    }
    req.push_str("0\r\n\r\n");
    // the server may answer 413 and close before reading everything
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

async fn json_of(r: reqwest::Response) -> Value {
    r.json().await.unwrap()
}

#[tokio::test]
async fn signed_request_is_ingested_and_acknowledged() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    let body = r#"{"email":"a@example.com","name":"Ada"}"#;
    let r = signed(&client, &url, body)
        .header("x-event-id", "evt-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let corr = r.headers()["x-correlation-id"].to_str().unwrap().to_owned();
    assert!(!corr.is_empty());
    let j = json_of(r).await;
    assert_eq!(j["accepted"], 1);
    assert_eq!(j["duplicates"], 0);
    assert_eq!(j["ids"], json!(["evt-1"]));
    assert_eq!(j["correlation_id"], corr.as_str());

    let events = ingest.events();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.id, "evt-1");
    assert_eq!(e.ty, "crm.contact");
    assert_eq!(e.source, "weft:crm");
    assert_eq!(e.correlationid, corr);
    assert_eq!(e.data, json!({"email": "a@example.com", "name": "Ada"}));
    assert!(ingest.batches.lock().unwrap()[0].checkpoint.is_none());
}

#[tokio::test]
async fn wrong_signature_is_401_and_nothing_ingested() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    let sig = sign_hmac_sha256_hex(b"another secret", br#"{"a":1}"#);
    let r = client
        .post(&url)
        .header("x-signature-256", format!("sha256={sig}"))
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let j = json_of(r).await;
    assert!(
        j["error"].as_str().unwrap().contains("does not match"),
        "{j}"
    );
    // signed for a different body
    let r = signed(&client, &url, r#"{"a":1}"#)
        .body(r#"{"a":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(ingest.batch_count(), 0);
}

#[tokio::test]
async fn missing_signature_is_401() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let r = reqwest::Client::new()
        .post(&url)
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let j = json_of(r).await;
    assert!(j["error"].as_str().unwrap().contains("missing"), "{j}");
    assert_eq!(ingest.batch_count(), 0);
}

#[tokio::test]
async fn unsigned_source_accepts_unsigned_requests() {
    let ingest = FakeIngest::new(Mode::Ok);
    let opts = Opts {
        secret: None,
        ..Opts::default()
    };
    let url = serve(opts, ingest.clone()).await;
    let r = reqwest::Client::new()
        .post(&url)
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(ingest.events().len(), 1);
}

#[tokio::test]
async fn malformed_json_is_400_and_nothing_ingested() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    for body in [r#"{"a": 1"#, "not json", "", "42", r#"[{"a":1}, 2]"#] {
        let r = signed(&client, &url, body).send().await.unwrap();
        assert_eq!(r.status(), 400, "body {body:?}");
        assert!(r.headers().contains_key("x-correlation-id"));
        let j = json_of(r).await;
        assert!(j["error"].is_string(), "{j}");
    }
    assert_eq!(ingest.batch_count(), 0);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    // with Content-Length
    let r = signed(&client, &url, &big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    // chunked, no Content-Length: enforced while reading
    let sig = sign_hmac_sha256_hex(SECRET.as_bytes(), big.as_bytes());
    let status = raw_chunked_post(&url, &sig, &[&big[..1000], &big[1000..]]).await;
    assert_eq!(status, 413);
    // a small chunked body is accepted
    let small = r#"{"chunked":true}"#;
    let sig = sign_hmac_sha256_hex(SECRET.as_bytes(), small.as_bytes());
    let status = raw_chunked_post(&url, &sig, &[&small[..5], &small[5..]]).await;
    assert_eq!(status, 202);
    // exactly at the limit is fine
    let fits = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1024 - 10));
    assert_eq!(fits.len(), 1024);
    let r = signed(&client, &url, &fits).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(ingest.batch_count(), 2);
}

#[tokio::test]
async fn unavailable_is_503_with_retry_after_and_store_error_is_500() {
    let ingest = FakeIngest::new(Mode::Unavailable);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    let r = signed(&client, &url, r#"{"a":1}"#).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(json_of(r).await["error"].is_string());

    *ingest.mode.lock().unwrap() = Mode::Store;
    let r = signed(&client, &url, r#"{"a":1}"#).send().await.unwrap();
    assert_eq!(r.status(), 500);
    let j = json_of(r).await;
    // the store's own message is not shown to the sender
    assert!(
        !j["error"].as_str().unwrap().contains("disk on fire"),
        "{j}"
    );
    assert_eq!(ingest.batch_count(), 0);
}

#[tokio::test]
async fn same_event_id_header_twice_gives_the_same_id() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    let mut replies = Vec::new();
    for body in [r#"{"n":1}"#, r#"{"n":1,"retry":true}"#] {
        let r = signed(&client, &url, body)
            .header("x-event-id", "evt-42")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        replies.push(json_of(r).await);
    }
    let events = ingest.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].id, "evt-42");
    assert_eq!(events[0].id, events[1].id);
    assert_eq!(replies[1]["duplicates"], 1);
    assert_eq!(replies[1]["accepted"], 0);
}

#[tokio::test]
async fn without_id_header_the_id_is_the_body_hash_or_id_field() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    let body = r#"{"n": 7}"#;
    for _ in 0..2 {
        let r = signed(&client, &url, body).send().await.unwrap();
        assert_eq!(r.status(), 202);
    }
    let events = ingest.events();
    let want = hex::encode(Sha256::digest(body.as_bytes()));
    assert_eq!(events[0].id, want);
    assert_eq!(events[1].id, want);

    let ingest = FakeIngest::new(Mode::Ok);
    let opts = Opts {
        id_field: Some(".id"),
        ..Opts::default()
    };
    let url = serve(opts, ingest.clone()).await;
    let r = signed(&client, &url, r#"{"id": 123, "x": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(json_of(r).await["ids"], json!(["123"]));
    let r = signed(&client, &url, r#"{"id": "c-9"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await["ids"], json!(["c-9"]));
    // id_field yielding null is rejected at the door
    let r = signed(&client, &url, r#"{"x": 1}"#).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(ingest.events().len(), 2);
}

#[tokio::test]
async fn array_is_one_batch_with_deterministic_ids() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    let body = r#"[{"b":2,"a":1}, {"c":3}]"#;
    let r = signed(&client, &url, body).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let first = json_of(r).await;
    assert_eq!(first["accepted"], 2);
    assert_eq!(ingest.batch_count(), 1);
    let want0 = hex::encode(Sha256::digest(br#"{"a":1,"b":2}"#));
    assert_eq!(first["ids"][0], want0.as_str());
    // a retry gets the same ids
    let r = signed(&client, &url, body).send().await.unwrap();
    let again = json_of(r).await;
    assert_eq!(again["ids"], first["ids"]);
    assert_eq!(again["duplicates"], 2);
    // with an id header, elements are `<header>:<index>`
    let r = signed(&client, &url, body)
        .header("x-event-id", "req-5")
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await["ids"], json!(["req-5:0", "req-5:1"]));
}

#[tokio::test]
async fn correlation_id_from_header_is_kept_and_echoed() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    let r = signed(&client, &url, r#"{"a":1}"#)
        .header("x-correlation-id", "corr-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-correlation-id"], "corr-abc-123");
    assert_eq!(json_of(r).await["correlation_id"], "corr-abc-123");
    assert_eq!(ingest.events()[0].correlationid, "corr-abc-123");

    // an absurd one is replaced
    let long = "x".repeat(500);
    let r = signed(&client, &url, r#"{"a":2}"#)
        .header("x-correlation-id", &long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let echoed = r.headers()["x-correlation-id"].to_str().unwrap().to_owned();
    assert_ne!(echoed, long);
    assert_eq!(ingest.events()[1].correlationid, echoed);
}

#[tokio::test]
async fn other_paths_and_methods_are_not_served() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let client = reqwest::Client::new();
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let other = url.replace(PATH, "/hooks/other");
    let r = signed(&client, &other, "{}").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(ingest.batch_count(), 0);
}

#[test]
fn new_rejects_bad_header_names_and_paths() {
    let mut s = spec(&Opts::default());
    if let SourceSpec::Webhook {
        signature_header, ..
    } = &mut s
    {
        *signature_header = "not a header".into();
    }
    assert!(WebhookRoute::new("crm", &s).is_err());
    for bad in ["hooks", "/hooks/:id", "/hooks/{id}", "/hooks/*rest", "/a b"] {
        let mut s = spec(&Opts::default());
        if let SourceSpec::Webhook { cfg, .. } = &mut s {
            cfg.path = bad.into();
        }
        assert!(WebhookRoute::new("crm", &s).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn empty_array_is_acknowledged_with_nothing_accepted() {
    let ingest = FakeIngest::new(Mode::Ok);
    let url = serve(Opts::default(), ingest.clone()).await;
    let r = signed(&reqwest::Client::new(), &url, "[]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let j = json_of(r).await;
    assert_eq!(j["accepted"], 0);
    assert_eq!(j["ids"], json!([]));
    assert!(ingest.events().is_empty());
}
