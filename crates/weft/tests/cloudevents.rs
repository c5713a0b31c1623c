//! CloudEvents on the wire, checked by the Python CloudEvents SDK (not by
//! our own code): the HTTP sink's `binary` and `structured` modes against
//! a real HTTP server weft writes to, and the JSON Lines envelope. `id` is
//! the write's idempotency key (the same on a retry), `source`
//! `weft/<flow>`, `subject` the entity key (percent-encoded in a header),
//! `time` the event's. A configured `Content-Type` is sent as it is.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Parse each `{headers, body}` (HTTP) or `{line}` (JSON Lines) on
/// stdin with the SDK; print `[{attributes, data}]`. The SDK's 2.x core
/// API validates the attributes (required ones, types, a timezone on
/// `time`); 1.x has only `cloudevents.http`.
const PARSE: &str = r#"
import json, sys
items = json.load(sys.stdin)
try:
    from cloudevents.core.bindings.http import HTTPMessage, from_http
    from cloudevents.core.formats.json import JSONFormat
    fmt = JSONFormat()
    def http(headers, body):
        e = from_http(HTTPMessage(headers=headers, body=body), fmt)
        return e.get_attributes(), e.get_data()
    def line(text):
        e = fmt.read(None, text.encode())
        return e.get_attributes(), e.get_data()
except ImportError:
    from cloudevents.http import from_http, from_json
    def http(headers, body):
        e = from_http(headers, body)
        return e.get_attributes(), e.data
    def line(text):
        e = from_json(text)
        return e.get_attributes(), e.data
out = []
for it in items:
    if "line" in it:
        attrs, data = line(it["line"])
    else:
        attrs, data = http(it["headers"], it["body"].encode())
    attrs = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in attrs.items()}
    out.append({"attributes": attrs, "data": data})
print(json.dumps(out))
"#;

/// One request as it came over the wire.
#[derive(Debug, Clone)]
struct Req {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    status: u16,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A real HTTP server keeping every request whole; the first request to a
/// path under `/binary/` is answered 503 (a retry follows).
struct Wire {
    addr: std::net::SocketAddr,
    reqs: Arc<Mutex<Vec<Req>>>,
    _rt: tokio::runtime::Runtime,
}

impl Wire {
    fn start() -> Wire {
        use axum::http::{HeaderMap, StatusCode, Uri};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let reqs: Arc<Mutex<Vec<Req>>> = Arc::default();
        let r2 = reqs.clone();
        let app = axum::Router::new().fallback(
            move |uri: Uri, headers: HeaderMap, body: axum::body::Bytes| {
                let reqs = r2.clone();
                async move {
                    let mut reqs = reqs.lock().unwrap();
                    let path = uri.path().to_owned();
                    let first = !reqs.iter().any(|r| r.path == path);
                    let status = if first && path.starts_with("/binary/") {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    reqs.push(Req {
                        path,
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                            })
                            .collect(),
                        body: body.to_vec(),
                        status: status.as_u16(),
                    });
                    status
                }
            },
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Wire {
            addr,
            reqs,
            _rt: rt,
        }
    }

    fn ok(&self, prefix: &str) -> Vec<Req> {
        let reqs = self.reqs.lock().unwrap();
        let mut ok: Vec<Req> = reqs
            .iter()
            .filter(|r| r.status == 200 && r.path.starts_with(prefix))
            .cloned()
            .collect();
        // keys are delivered side by side, in no set order: order by the
        // path, which ends with the record's id
        ok.sort_by(|a, b| a.path.cmp(&b.path));
        ok
    }
}

fn config(url: &str) -> String {
    format!(
        r#"
store:
  path: data/weft.db
systems:
  crm:
    source:
      webhook:
        path: /hooks/crm
        id_field: .id | tostring
  bin:
    sink:
      http:
        url: {url}/binary/{{id}}
        cloudevents: binary
        headers: {{Content-Type: "application/vnd.acme+json"}}
  structured:
    sink:
      http:
        url: {url}/structured/{{id}}
        cloudevents: structured
  plain:
    sink:
      http:
        url: {url}/plain/{{id}}
        method: PATCH
        headers: {{Content-Type: "application/merge-patch+json"}}
  export:
    sink:
      jsonl:
        path: out/events.jsonl
        envelope: true
flows:
  crm_customers:
    from: crm
    key: .key
    mapping: '{{id, key, name}}'
    to: [bin, structured, plain, export]
    delivery:
      initial_backoff: 10ms
      max_backoff: 20ms
"#
    )
}

fn parse(items: &[Value]) -> Vec<Value> {
    let v = python_json(PARSE, serde_json::to_vec(items).unwrap().as_slice());
    v.as_array().unwrap().clone()
}

fn http_item(r: &Req) -> Value {
    let headers: serde_json::Map<String, Value> = r
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "headers": headers,
        // weft's bodies are JSON, so UTF-8
        "body": String::from_utf8(r.body.clone()).unwrap(),
    })
}

#[test]
fn binary_structured_and_jsonl_events_parse_with_the_sdk() {
    if python_with(&["cloudevents"], &["cloudevents"]).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let wire = Wire::start();
    std::fs::write(
        dir.path().join("weft.yaml"),
        config(&format!("http://{}", wire.addr)),
    )
    .unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &[]);
    // the key holds a space, a quote, a percent sign and a non-ASCII letter:
    // percent-encoded in `ce-subject`, decoded by the SDK
    let events = json!([
        {"id": 1, "key": "k 1 \"Zoë\" 100%", "name": "Ada"},
        {"id": 2, "key": "k2", "name": "Grace"}
    ]);
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let resp = reqwest::blocking::Client::new()
        .post(hub.url("/hooks/crm"))
        .header("x-correlation-id", "corr-ce")
        .json(&events)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let lines_path = dir.path().join("out/events.jsonl");
    wait_for(Duration::from_secs(20), "every destination written", || {
        wire.ok("/binary/").len() == 2
            && wire.ok("/structured/").len() == 2
            && wire.ok("/plain/").len() == 2
            && jsonl_lines(&lines_path).len() == 2
    });

    let check = |parsed: &[Value], mode: &str| {
        for (i, e) in parsed.iter().enumerate() {
            let a = &e["attributes"];
            let want = &events[i];
            assert_eq!(a["specversion"], "1.0", "{mode}: {a}");
            assert_eq!(a["source"], "weft/crm_customers", "{mode}");
            assert_eq!(a["type"], "weft.crm_customers", "{mode}");
            assert_eq!(a["subject"], want["key"], "{mode}: the entity key");
            assert_eq!(a["correlationid"], "corr-ce", "{mode}");
            assert_eq!(a["causationid"], want["id"].to_string(), "{mode}");
            let t = chrono::DateTime::parse_from_rfc3339(a["time"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{mode}: time {}: {e}", a["time"]));
            assert!(t > before && t < chrono::Utc::now(), "{mode}: {t}");
            assert_eq!(
                e["data"],
                json!({"id": want["id"], "key": want["key"], "name": want["name"]}),
                "{mode}: data"
            );
        }
    };

    // binary: ce-* headers, the payload as the body, the configured
    // Content-Type kept as its datacontenttype; id = Idempotency-Key
    let bin = wire.ok("/binary/");
    let parsed = parse(&bin.iter().map(http_item).collect::<Vec<_>>());
    check(&parsed, "binary");
    for (r, e) in bin.iter().zip(&parsed) {
        assert_eq!(r.header("content-type"), Some("application/vnd.acme+json"));
        assert_eq!(
            Some(e["attributes"]["id"].as_str().unwrap()),
            r.header("idempotency-key"),
            "ce-id is the idempotency key"
        );
        assert_eq!(
            e["attributes"]["datacontenttype"],
            "application/vnd.acme+json"
        );
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body, e["data"], "the body is the bare payload");
    }
    assert!(
        bin[0].header("ce-subject").unwrap().contains("%20")
            && bin[0].header("ce-subject").unwrap().contains("%C3%AB"),
        "{:?}",
        bin[0].header("ce-subject")
    );
    // the retry after the 503 carried the same id
    let all = wire.reqs.lock().unwrap().clone();
    for r in bin.iter() {
        let tries: Vec<&Req> = all.iter().filter(|x| x.path == r.path).collect();
        assert_eq!(tries.len(), 2, "{}: one 503, one 200", r.path);
        assert_eq!(tries[0].header("ce-id"), tries[1].header("ce-id"));
        assert_eq!(tries[0].header("ce-time"), tries[1].header("ce-time"));
    }

    // structured: the whole event in an application/cloudevents+json body
    let st = wire.ok("/structured/");
    let parsed_st = parse(&st.iter().map(http_item).collect::<Vec<_>>());
    check(&parsed_st, "structured");
    for (r, e) in st.iter().zip(&parsed_st) {
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("application/cloudevents+json"),
            "{:?}",
            r.header("content-type")
        );
        assert!(
            r.header("ce-id").is_none(),
            "no ce-* headers in structured mode"
        );
        assert_eq!(
            Some(e["attributes"]["id"].as_str().unwrap()),
            r.header("idempotency-key")
        );
    }
    // one event, one id per destination: the ids differ across them
    assert_ne!(
        parsed[0]["attributes"]["id"],
        parsed_st[0]["attributes"]["id"]
    );

    // without `cloudevents`: the bare payload, the configured Content-Type
    // sent as it is (it used to be replaced by application/json)
    for r in wire.ok("/plain/") {
        assert_eq!(
            r.header("content-type"),
            Some("application/merge-patch+json")
        );
        assert!(r.header("ce-id").is_none());
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(body.get("specversion").is_none(), "{body}");
    }

    // JSON Lines: each line a CloudEvent in the JSON format
    let text = std::fs::read_to_string(&lines_path).unwrap();
    let items: Vec<Value> = text.lines().map(|l| json!({"line": l})).collect();
    let mut parsed_l = parse(&items);
    // lines of different keys may be written in either order
    parsed_l.sort_by_key(|e| e["data"]["id"].as_i64());
    check(&parsed_l, "jsonl");
    assert_eq!(
        parsed_l[0]["attributes"]["datacontenttype"],
        "application/json"
    );
}

#[test]
fn a_content_type_that_contradicts_the_mode_is_refused_by_validate() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = |ce: &str, ct: &str| {
        format!(
            r#"
systems:
  crm: {{source: {{webhook: {{path: /h}}}}}}
  api:
    sink:
      http:
        url: http://127.0.0.1:9/x
        {ce}
        headers: {{Content-Type: "{ct}"}}
flows:
  f: {{from: crm, to: [api]}}
"#
        )
    };
    for (ce, ct, says) in [
        (
            "",
            "application/cloudevents+json",
            "cloudevents: structured",
        ),
        ("cloudevents: structured", "application/json", "contradict"),
        (
            "cloudevents: binary",
            "application/cloudevents+json",
            "use `cloudevents: structured`",
        ),
    ] {
        std::fs::write(dir.path().join("w.yaml"), yaml(ce, ct)).unwrap();
        let out = weft_cmd(dir.path(), &["validate", "w.yaml"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{ce} + {ct} accepted");
        assert!(
            err.contains("systems.api.sink.http.headers") && err.contains(says),
            "{err}"
        );
    }
    std::fs::write(
        dir.path().join("w.yaml"),
        yaml("cloudevents: binary", "application/vnd.acme+json"),
    )
    .unwrap();
    let out = weft_cmd(dir.path(), &["validate", "w.yaml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// W3C trace context: a webhook's `traceparent` (and `tracestate`) travel
/// with the record through the durable queue to every HTTP write, the
/// retry after a 503 included; a malformed one is dropped, never forwarded.
#[test]
fn the_webhooks_trace_context_reaches_every_http_write() {
    let dir = tempfile::tempdir().unwrap();
    let wire = Wire::start();
    std::fs::write(
        dir.path().join("weft.yaml"),
        config(&format!("http://{}", wire.addr)),
    )
    .unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &[]);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let client = reqwest::blocking::Client::new();
    let post = |body: Value, traceparent: &str| {
        let r = client
            .post(hub.url("/hooks/crm"))
            .header("traceparent", traceparent)
            .header("tracestate", "rojo=00f067aa0ba902b7")
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    };
    post(json!({"id": 7, "key": "k7", "name": "Ada"}), tp);
    post(
        json!({"id": 8, "key": "k8", "name": "Grace"}),
        "00-not-a-trace-01",
    );
    wait_for(Duration::from_secs(20), "both records written", || {
        wire.ok("/binary/").len() == 2 && wire.ok("/plain/").len() == 2
    });
    let reqs = wire.reqs.lock().unwrap().clone();
    let of = |id: &str| -> Vec<&Req> { reqs.iter().filter(|r| r.path.ends_with(id)).collect() };
    // record 7: every request (the 503 and its retry too) carries it
    let sevens = of("/7");
    assert!(sevens.len() >= 4, "{sevens:?}");
    for r in &sevens {
        assert_eq!(r.header("traceparent"), Some(tp), "{}", r.path);
        assert_eq!(r.header("tracestate"), Some("rojo=00f067aa0ba902b7"));
    }
    // record 8: the malformed one is not passed on
    for r in of("/8") {
        assert_eq!(r.header("traceparent"), None, "{}", r.path);
        assert_eq!(r.header("tracestate"), None, "{}", r.path);
    }
    hub.stop();
}
