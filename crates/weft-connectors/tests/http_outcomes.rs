//! The HTTP sink's business-outcome checks, status overrides and
//! create-or-update mode, configured from YAML through `weft validate`'s
//! code path and run against a real axum server on 127.0.0.1.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use weft_connectors::http::HttpSink;
use weft_connectors::{Delivery, Sink, SinkError};
use weft_core::ErrorKind;
use weft_core::config::{SinkSpec, load_str};

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    target: String,
    headers: axum::http::HeaderMap,
    body: Value,
}

type Reply = (u16, String);

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
    let (status, body) = (s.reply)(&rec);
    s.seen.lock().unwrap().push(rec);
    (StatusCode::from_u16(status).unwrap(), body).into_response()
}

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

fn load(sink_yaml: &str) -> Result<SinkSpec, String> {
    let text = format!("systems:\n  erp:\n    sink:\n      http:\n{sink_yaml}");
    match load_str(Path::new("weft.yaml"), &text, &|_| None) {
        Ok(mut c) => Ok(c.systems.remove("erp").unwrap().sink.unwrap()),
        Err(e) => Err(e.to_string()),
    }
}

/// An HTTP sink from the lines under `http:` (indented 8 spaces).
fn sink(sink_yaml: &str) -> HttpSink {
    let spec = load(sink_yaml).unwrap();
    let SinkSpec::Http {
        cfg,
        method,
        timeout,
        connect_timeout,
    } = spec
    else {
        panic!("not http")
    };
    HttpSink::new(&cfg, &method, timeout, connect_timeout).unwrap()
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
async fn success_when_false_on_200_is_a_retryable_failure_with_the_body() {
    let (addr, srv) = server(|_| {
        (
            200,
            r#"{"ok": false, "error": "duplicate email"}"#.to_owned(),
        )
    })
    .await;
    let s = sink(&format!(
        "        url: http://{addr}/contacts\n        success_when: .ok == true\n"
    ));
    let e = write_one(&s, delivery(1, json!({"email": "a@b"})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert_eq!(
        e.message,
        r#"HTTP 200 OK, but success_when `.ok == true` is false: {"ok": false, "error": "duplicate email"}"#
    );
    assert_eq!(srv.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn success_when_true_passes_and_permanent_kind_dead_letters() {
    let (addr, _srv) = server(|r| {
        if r.body["n"] == 1 {
            (201, r#"{"status": "created"}"#.to_owned())
        } else {
            (200, r#"{"status": "rejected"}"#.to_owned())
        }
    })
    .await;
    let s = sink(&format!(
        "        url: http://{addr}/x\n        success_when: '.status == \"created\"'\n        success_when_failure: permanent\n"
    ));
    write_one(&s, delivery(1, json!({"n": 1}))).await.unwrap();
    let e = write_one(&s, delivery(2, json!({"n": 2})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("is false"), "{}", e.message);
    assert!(e.message.contains("rejected"), "{}", e.message);
}

#[tokio::test]
async fn success_when_sees_a_text_body_as_a_string() {
    let (addr, _srv) = server(|r| {
        let text = if r.body["n"] == 1 {
            "OK"
        } else {
            "ERROR: locked"
        };
        (200, text.to_owned())
    })
    .await;
    let s = sink(&format!(
        "        url: http://{addr}/x\n        success_when: 'startswith(\"OK\")'\n"
    ));
    write_one(&s, delivery(1, json!({"n": 1}))).await.unwrap();
    let e = write_one(&s, delivery(2, json!({"n": 2})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert!(e.message.ends_with(": ERROR: locked"), "{}", e.message);
}

#[tokio::test]
async fn retry_on_and_permanent_on_flip_the_classification() {
    let (addr, _srv) = server(|r| {
        let code = r.body["code"].as_u64().unwrap() as u16;
        (code, format!("status {code}"))
    })
    .await;
    let default = sink(&format!("        url: http://{addr}/x\n"));
    let custom = sink(&format!(
        "        url: http://{addr}/x\n        retry_on: [409, 422]\n        permanent_on: [503]\n"
    ));
    async fn kind(s: &HttpSink, code: u16) -> SinkError {
        let d = delivery(code as i64, json!({ "code": code }));
        write_one(s, d).await.unwrap_err()
    }
    // defaults
    assert_eq!(kind(&default, 409).await.kind, ErrorKind::Permanent);
    assert_eq!(kind(&default, 503).await.kind, ErrorKind::Retryable);
    // overridden
    let e = kind(&custom, 409).await;
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert_eq!(e.message, "HTTP 409 Conflict: status 409");
    assert_eq!(kind(&custom, 422).await.kind, ErrorKind::Retryable);
    let e = kind(&custom, 503).await;
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert_eq!(e.retry_after, None);
    // untouched codes keep their default
    assert_eq!(kind(&custom, 500).await.kind, ErrorKind::Retryable);
    assert_eq!(kind(&custom, 400).await.kind, ErrorKind::Permanent);
}

fn upsert_yaml(addr: SocketAddr) -> String {
    format!(
        "        mode: upsert_lookup\n\
         \x20       lookup_url: http://{addr}/contacts/by-email/{{email}}\n\
         \x20       url: http://{addr}/contacts\n\
         \x20       update_url: http://{addr}/contacts/{{_found.id}}\n\
         \x20       capture_id: .id\n\
         \x20       headers: {{Authorization: Bearer t}}\n"
    )
}

#[tokio::test]
async fn upsert_lookup_404_gets_then_posts_with_the_idempotency_key() {
    let (addr, srv) = server(|r| match r.method.as_str() {
        "GET" => (404, r#"{"error": "no such contact"}"#.to_owned()),
        "POST" => (201, r#"{"id": "c-901", "created": true}"#.to_owned()),
        _ => (405, String::new()),
    })
    .await;
    let s = sink(&upsert_yaml(addr));
    let payload = json!({"email": "ann@example.com", "name": "Ann"});
    let written = write_one(&s, delivery(5, payload.clone())).await.unwrap();

    let seen = srv.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].target, "/contacts/by-email/ann%40example.com");
    assert!(seen[0].headers.get("idempotency-key").is_none());
    assert_eq!(seen[0].headers["authorization"], "Bearer t");
    assert_eq!(seen[0].headers["x-correlation-id"], "corr-5");
    assert_eq!(seen[1].method, "POST");
    assert_eq!(seen[1].target, "/contacts");
    assert_eq!(seen[1].headers["idempotency-key"], "idem-5");
    assert_eq!(seen[1].headers["authorization"], "Bearer t");
    assert_eq!(seen[1].body, payload);

    // the id comes back with the delivery's result (P0-3: no side channel)
    assert_eq!(written.external_id.as_deref(), Some("c-901"));
}

#[tokio::test]
async fn upsert_lookup_200_gets_then_puts_to_the_found_record() {
    let (addr, srv) = server(|r| match r.method.as_str() {
        "GET" => (200, r#"{"id": 77, "email": "ann@example.com"}"#.to_owned()),
        // an empty answer: the id is taken from the lookup
        "PUT" => (204, String::new()),
        _ => (405, String::new()),
    })
    .await;
    let s = sink(&upsert_yaml(addr));
    let payload = json!({"email": "ann@example.com", "name": "Ann B."});
    let written = write_one(&s, delivery(6, payload.clone())).await.unwrap();

    let seen = srv.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[1].method, "PUT");
    assert_eq!(seen[1].target, "/contacts/77");
    assert_eq!(seen[1].headers["idempotency-key"], "idem-6");
    assert_eq!(seen[1].body, payload);
    assert_eq!(written.external_id.as_deref(), Some("77"));
}

#[tokio::test]
async fn upsert_lookup_failure_writes_nothing() {
    let (addr, srv) = server(|r| match r.method.as_str() {
        "GET" => (500, "db down".to_owned()),
        _ => (201, "{}".to_owned()),
    })
    .await;
    let s = sink(&upsert_yaml(addr));
    let e = write_one(&s, delivery(7, json!({"email": "x@y"})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retryable);
    assert_eq!(e.message, "lookup: HTTP 500 Internal Server Error: db down");
    assert_eq!(srv.seen.lock().unwrap().len(), 1);

    // a found record without the field update_url needs: permanent, no write
    let (addr, srv) = server(|r| match r.method.as_str() {
        "GET" => (200, r#"{"uuid": "u-1"}"#.to_owned()),
        _ => (200, "{}".to_owned()),
    })
    .await;
    let s = sink(&upsert_yaml(addr));
    let e = write_one(&s, delivery(8, json!({"email": "x@y"})))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(
        e.message
            .starts_with("update_url placeholder `{_found.id}`"),
        "{}",
        e.message
    );
    assert_eq!(srv.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn request_mode_captures_the_id_and_default_method_stays_post() {
    let (addr, srv) = server(|_| (201, r#"{"data": {"id": "inv-3"}}"#.to_owned())).await;
    let s = sink(&format!(
        "        url: http://{addr}/invoices\n        capture_id: .data.id\n"
    ));
    let written = write_one(&s, delivery(9, json!({"n": 1}))).await.unwrap();
    assert_eq!(srv.seen.lock().unwrap()[0].method, "POST");
    assert_eq!(written.external_id.as_deref(), Some("inv-3"));
}

#[test]
fn validate_reports_bad_outcome_settings_with_lines() {
    let e = load("        url: http://h/x\n        success_when: '.ok =='\n").unwrap_err();
    assert!(
        e.contains("weft.yaml:6") && e.contains("systems.erp.sink.http.success_when"),
        "{e}"
    );
    let e = load("        url: http://h/x\n        capture_id: '.['\n").unwrap_err();
    assert!(e.contains("systems.erp.sink.http.capture_id"), "{e}");
    let e = load("        url: http://h/x\n        retry_on: [200]\n").unwrap_err();
    assert!(e.contains("retry_on[0]") && e.contains("`200`"), "{e}");
    let e = load("        url: http://h/x\n        retry_on: [409]\n        permanent_on: [409]\n")
        .unwrap_err();
    assert!(e.contains("`409` is also in `retry_on`"), "{e}");
    let e = load("        url: http://h/x\n        mode: upsert_lookup\n").unwrap_err();
    assert!(e.contains("needs `lookup_url`"), "{e}");
    let e = load("        url: http://h/x\n        lookup_url: http://h/y\n").unwrap_err();
    assert!(e.contains("only with `mode: upsert_lookup`"), "{e}");
    let e = load("        url: http://h/x\n        success_when_failure: permanent\n").unwrap_err();
    assert!(e.contains("only with `success_when`"), "{e}");
    let e = load("        url: http://h/x\n        mode: upsert\n").unwrap_err();
    assert!(e.contains("mode"), "{e}");
    // upsert_lookup's update method defaults to PUT
    let SinkSpec::Http { method, .. } = load(
        "        url: http://h/x\n        mode: upsert_lookup\n        lookup_url: http://h/x/{id}\n",
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(method, "PUT");
}
