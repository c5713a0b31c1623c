//! The HTTP sink against real servers on 127.0.0.1: an axum server that
//! records every request, and raw TCP listeners that misbehave.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_connectors::http::HttpSink;
use weft_connectors::{Delivery, Sink};
use weft_core::ErrorKind;
use weft_core::config::Secret;
use weft_core::config::raw::HttpSinkConfig;

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    /// Path and query, as sent.
    target: String,
    headers: axum::http::HeaderMap,
    body: Value,
}

type Reply = (u16, Vec<(&'static str, &'static str)>, String);

struct Server {
    seen: Mutex<Vec<Recorded>>,
    reply: Box<dyn Fn(&Recorded) -> Reply + Send + Sync>,
}

async fn record(State(s): State<Arc<Server>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let rec = Recorded {
        method: parts.method.to_string(),
        target: parts.uri.to_string(),
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    let (status, headers, body) = (s.reply)(&rec);
    s.seen.lock().unwrap().push(rec);
    let mut r = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (k, v) in headers {
        r.headers_mut().insert(k, v.parse().unwrap());
    }
    r
}

/// An axum server answering every request with `reply`.
async fn server(
    reply: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
) -> (SocketAddr, Arc<Server>) {
    let s = Arc::new(Server {
        seen: Mutex::new(Vec::new()),
        reply: Box::new(reply),
    });
    let app = axum::Router::new().fallback(record).with_state(s.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, s)
}

fn cfg(url: String, headers: &[(&str, &str)]) -> HttpSinkConfig {
    HttpSinkConfig {
        url,
        method: None,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), Secret::new(*v)))
            .collect::<BTreeMap<_, _>>(),
        ..Default::default()
    }
}

fn sink(url: String) -> HttpSink {
    HttpSink::new(
        &cfg(url, &[]),
        "POST",
        Duration::from_millis(300),
        Duration::from_millis(300),
    )
    .unwrap()
}

fn delivery(id: i64, payload: Value) -> Delivery {
    Delivery {
        id,
        idempotency_key: format!("idem-{id}"),
        correlation_id: format!("corr-{id}"),
        event_id: format!("evt-{id}"),
        entity_key: None,
        attempt: 1,
        payload,
        context: Default::default(),
    }
}

async fn write_one(s: &HttpSink, d: Delivery) -> weft_connectors::WriteResult {
    let mut r = s.write(std::slice::from_ref(&d)).await;
    assert_eq!(r.len(), 1);
    r.pop().unwrap()
}

#[tokio::test]
async fn request_carries_method_url_headers_and_body() {
    let (addr, srv) = server(|_| (201, vec![], "created".into())).await;
    let s = HttpSink::new(
        &cfg(
            format!("http://{addr}/customers/{{customer.id}}/orders/{{n}}?src=weft"),
            &[("Authorization", "Bearer t0ken"), ("x-tenant", "acme")],
        ),
        "PUT",
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .unwrap();
    let payload = json!({"customer": {"id": "c 1/ä"}, "n": 17, "total": 9.5});
    let d = delivery(7, payload.clone());
    write_one(&s, d).await.unwrap();

    let seen = srv.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.method, "PUT");
    assert_eq!(r.target, "/customers/c%201%2F%C3%A4/orders/17?src=weft");
    assert_eq!(r.headers["idempotency-key"], "idem-7");
    assert_eq!(r.headers["x-correlation-id"], "corr-7");
    assert_eq!(r.headers["x-causation-id"], "evt-7");
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["authorization"], "Bearer t0ken");
    assert_eq!(r.headers["x-tenant"], "acme");
    assert_eq!(r.body, payload);
}

#[tokio::test]
async fn batch_results_are_per_delivery_in_order() {
    let (addr, srv) = server(|r| match r.target.as_str() {
        "/items/1" => (200, vec![], String::new()),
        "/items/2" => (404, vec![], "no such item".into()),
        "/items/3" => (422, vec![], r#"{"error":"bad"}"#.into()),
        "/items/4" => (500, vec![], "boom".into()),
        _ => (204, vec![], String::new()),
    })
    .await;
    let s = sink(format!("http://{addr}/items/{{id}}"));
    let batch: Vec<Delivery> = (1..=5).map(|i| delivery(i, json!({"id": i}))).collect();
    let results = s.write(&batch).await;
    assert_eq!(results.len(), 5);
    assert!(results[0].is_ok());
    let e = results[1].as_ref().unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(
        e.message.contains("404") && e.message.contains("no such item"),
        "{}",
        e.message
    );
    assert_eq!(results[2].as_ref().unwrap_err().kind, ErrorKind::Permanent);
    assert!(results[2].as_ref().unwrap_err().message.contains("422"));
    assert_eq!(results[3].as_ref().unwrap_err().kind, ErrorKind::Retryable);
    assert!(results[4].is_ok());
    // every delivery got its own key
    let mut keys: Vec<String> = srv
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["idem-1", "idem-2", "idem-3", "idem-4", "idem-5"]);
}

#[tokio::test]
async fn server_error_is_retryable_with_short_message_without_payload() {
    let long = "e".repeat(1000);
    let (addr, _srv) = server(move |_| (500, vec![], long.clone())).await;
    let s = sink(format!("http://{addr}/x"));
    let e = write_one(&s, delivery(1, json!({"card": "4111-SECRET"})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(e.message.contains("500"), "{}", e.message);
    assert!(!e.message.contains("SECRET"));
    assert!(e.message.chars().count() < 260, "{}", e.message);
    assert_eq!(e.retry_after, None);
}

/// Review P2-6: one destination echoed the bearer token into its 400 body,
/// and weft stored it in the DLQ and the log.
#[tokio::test]
async fn credentials_echoed_by_the_destination_are_masked_in_the_error() {
    let (addr, _srv) = server(|r| {
        let auth = r
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let key = r
            .headers
            .get("x-api-key")
            .map(|v| v.to_str().unwrap().to_owned());
        (
            400,
            vec![],
            format!(
                "bad request; you sent {auth:?} and key {key:?} (\"{}\")",
                key.clone().unwrap_or_default()
            ),
        )
    })
    .await;
    let s = HttpSink::new(
        &cfg(
            format!("http://{addr}/x"),
            &[
                ("Authorization", "Bearer tok-9f8e7d6c5b4a"),
                ("X-Api-Key", "key-0123456789"),
            ],
        ),
        "POST",
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .unwrap();
    let e = write_one(&s, delivery(1, json!({"id": 1})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("400"), "{}", e.message);
    assert!(e.message.contains("[redacted]"), "{}", e.message);
    assert!(!e.message.contains("tok-9f8e7d6c5b4a"), "{}", e.message);
    assert!(!e.message.contains("key-0123456789"), "{}", e.message);

    // Basic: the password and user:password, as the destination may decode it
    let (addr, _srv) =
        server(|_| (401, vec![], "user ada:pa55-w0rd-x is not allowed".into())).await;
    let s = HttpSink::new(
        &cfg(
            format!("http://{addr}/x"),
            // ada:pa55-w0rd-x
            &[("Authorization", "Basic YWRhOnBhNTUtdzByZC14")],
        ),
        "POST",
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .unwrap();
    let e = write_one(&s, delivery(2, json!({"id": 2})))
        .await
        .unwrap_err();
    assert!(!e.message.contains("pa55-w0rd-x"), "{}", e.message);
}

#[tokio::test]
async fn not_found_and_unprocessable_are_permanent() {
    for status in [404u16, 422, 400, 401] {
        let (addr, _srv) = server(move |_| (status, vec![], "nope".into())).await;
        let s = sink(format!("http://{addr}/x"));
        let e = write_one(&s, delivery(1, json!({}))).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent, "{status}");
        assert!(e.message.contains(&status.to_string()));
    }
}

#[tokio::test]
async fn request_timeout_408_and_redirect_classified() {
    let (addr, _srv) = server(|_| (408, vec![], String::new())).await;
    let e = write_one(&sink(format!("http://{addr}/x")), delivery(1, json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    // a redirect is not followed (it would turn the POST into a GET)
    let (addr, srv) = server(|_| (303, vec![("location", "/elsewhere")], String::new())).await;
    let e = write_one(&sink(format!("http://{addr}/x")), delivery(1, json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert_eq!(srv.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn too_many_requests_with_retry_after() {
    let (addr, _srv) = server(|_| (429, vec![("retry-after", "2")], "slow down".into())).await;
    let s = sink(format!("http://{addr}/x"));
    let e = write_one(&s, delivery(1, json!({}))).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(2)));
    assert!(e.message.contains("429"));

    let (addr, _srv) = server(|_| {
        (
            503,
            vec![("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")],
            String::new(),
        )
    })
    .await;
    let e = write_one(&sink(format!("http://{addr}/x")), delivery(1, json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert_eq!(e.retry_after, Some(Duration::ZERO));
}

#[tokio::test]
async fn missing_url_field_is_permanent_and_nothing_is_sent() {
    let (addr, srv) = server(|_| (200, vec![], String::new())).await;
    let s = sink(format!("http://{addr}/c/{{customer.id}}"));
    let e = write_one(&s, delivery(1, json!({"customer": {}})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("customer.id"), "{}", e.message);
    let e = write_one(&s, delivery(2, json!({"customer": {"id": ".."}})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(srv.seen.lock().unwrap().is_empty());
}

/// Read one request (headers and a Content-Length body) from `s`.
async fn read_request(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return;
            }
        }
    }
}

/// A raw server that handles each connection with `f`.
async fn raw_server<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(f(stream));
        }
    });
    addr
}

#[tokio::test]
async fn server_that_never_answers_times_out_retryable() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let addr = raw_server(move |mut s| {
        let tx = tx.clone();
        async move {
            read_request(&mut s).await;
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            // hold the connection open, never answer
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        }
    })
    .await;
    let s = sink(format!("http://{addr}/x"));
    let started = Instant::now();
    let e = write_one(&s, delivery(1, json!({}))).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(e.message.contains("timed out"), "{}", e.message);
    // the request did reach the server
    rx.await.unwrap();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = sink(format!("http://127.0.0.1:{port}/x"));
    let e = write_one(&s, delivery(1, json!({}))).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(e.message.contains("connect"), "{}", e.message);
}

#[tokio::test]
async fn connection_closed_mid_response_is_retryable() {
    // 200 promised with 100 bytes, 3 sent, then closed
    let addr = raw_server(|mut s| async move {
        read_request(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
            .await;
        let _ = s.shutdown().await;
    })
    .await;
    let e = write_one(&sink(format!("http://{addr}/x")), delivery(1, json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable, "{}", e.message);

    // closed before any response
    let addr = raw_server(|mut s| async move {
        read_request(&mut s).await;
        let _ = s.shutdown().await;
    })
    .await;
    let e = write_one(&sink(format!("http://{addr}/x")), delivery(1, json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable, "{}", e.message);
}

#[tokio::test]
async fn same_entity_key_goes_in_order_and_stops_after_a_failure() {
    let (addr, srv) = server(|r| {
        if r.target == "/items/1" {
            (503, vec![], String::new())
        } else {
            (200, vec![], String::new())
        }
    })
    .await;
    let s = sink(format!("http://{addr}/items/{{id}}"));
    let mut batch: Vec<Delivery> = (1..=3).map(|i| delivery(i, json!({"id": i}))).collect();
    batch[0].entity_key = Some("A".into());
    batch[1].entity_key = Some("A".into());
    batch[2].entity_key = Some("B".into());
    let results = s.write(&batch).await;
    assert_eq!(results[0].as_ref().unwrap_err().kind, ErrorKind::Retryable);
    let skipped = results[1].as_ref().unwrap_err();
    assert_eq!(skipped.kind, ErrorKind::Retryable);
    assert!(skipped.message.contains("not sent"));
    assert!(results[2].is_ok());
    let mut targets: Vec<String> = srv
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.target.clone())
        .collect();
    targets.sort();
    assert_eq!(targets, ["/items/1", "/items/3"]);
}

#[test]
fn new_validates_template_method_and_headers() {
    let t = |url: &str| {
        HttpSink::new(
            &cfg(url.into(), &[]),
            "POST",
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
    };
    assert!(t("http://h/{id}").is_ok());
    assert!(t("http://h/{id").is_err());
    assert!(t("http://h/id}").is_err());
    assert!(t("http://h/{a{b}}").is_err());
    assert!(t("ftp://h/x").is_err());
    assert!(t("not a url").is_err());
    let bad_header = HttpSink::new(
        &cfg("http://h/x".into(), &[("bad header", "v")]),
        "POST",
        Duration::from_secs(1),
        Duration::from_secs(1),
    );
    assert!(bad_header.is_err());
    let bad_value = HttpSink::new(
        &cfg("http://h/x".into(), &[("x-k", "line\nbreak")]),
        "POST",
        Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let msg = bad_value.unwrap_err();
    assert!(!msg.contains("line\nbreak"), "{msg}");
    assert!(
        HttpSink::new(
            &cfg("http://h/x".into(), &[]),
            "NOT A METHOD",
            Duration::from_secs(1),
            Duration::from_secs(1)
        )
        .is_err()
    );
}
