//! The admin REST API: token required, DLQ list/show/replay/discard with
//! filters, status, OpenAPI description.

mod common;

use std::time::Duration;

use common::*;

const SECRET: &str = "admin-hook";
const TOKEN: &str = "admin-token-0123456789abcdef0123456789";

fn config(recorder: &str, with_token: bool) -> String {
    let token = if with_token {
        "  admin_token: ${WEFT_ADMIN_TOKEN}\n"
    } else {
        ""
    };
    format!(
        r#"
store:
  path: data/weft.db
server:
  listen: 127.0.0.1:0
{token}
systems:
  crm:
    source:
      webhook: {{path: /hooks/crm, secret: "${{HOOK_SECRET}}"}}
  api:
    sink:
      http: {{url: "{recorder}/items"}}
    circuit_breaker: {{enabled: false}}
flows:
  items:
    from: crm
    mapping: '{{id, fail}}'
    to: [api]
    delivery: {{max_attempts: 1}}
"#
    )
}

const ENV: [(&str, &str); 2] = [("HOOK_SECRET", SECRET), ("WEFT_ADMIN_TOKEN", TOKEN)];

fn post_event(hub: &Hub, id: u64, fail: bool) {
    let body = serde_json::json!({"id": id, "fail": fail}).to_string();
    let s = reqwest::blocking::Client::new()
        .post(hub.url("/hooks/crm"))
        .header("x-event-id", format!("a-{id}"))
        .header("x-signature-256", sign(SECRET, body.as_bytes()))
        .body(body)
        .send()
        .unwrap()
        .status();
    assert_eq!(s.as_u16(), 202);
}

fn api(
    hub: &Hub,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let c = reqwest::blocking::Client::new();
    let mut req = match method {
        "GET" => c.get(hub.admin_url(path)),
        _ => c.post(hub.admin_url(path)),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(serde_json::Value::Null))
}

#[test]
fn admin_api_needs_the_token_and_operates_the_dlq() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::start();
    std::fs::write(dir.path().join("weft.yaml"), config(&rec.url(), true)).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &ENV);

    assert_eq!(api(&hub, "GET", "/api/v1/dlq", None, None).0, 401);
    assert_eq!(api(&hub, "GET", "/api/v1/dlq", Some("wrong"), None).0, 401);
    let (s, spec) = api(&hub, "GET", "/api/v1/openapi.json", None, None);
    assert_eq!(s, 200);
    assert_eq!(spec["openapi"], "3.1.0");
    assert!(spec["paths"]["/api/v1/dlq/{id}/replay"]["post"].is_object());

    rec.set(FAIL_MARKED);
    post_event(&hub, 1, true);
    post_event(&hub, 2, true);
    post_event(&hub, 3, false);
    wait_for(Duration::from_secs(10), "two dead letters", || {
        api(&hub, "GET", "/api/v1/dlq", Some(TOKEN), None)
            .1
            .as_array()
            .map(Vec::len)
            == Some(2)
    });
    let (s, list) = api(
        &hub,
        "GET",
        "/api/v1/dlq?flow=items&error=400&since=1h",
        Some(TOKEN),
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(
        api(&hub, "GET", "/api/v1/dlq?flow=other", Some(TOKEN), None).1,
        serde_json::json!([])
    );
    assert_eq!(
        api(&hub, "GET", "/api/v1/dlq?since=soon", Some(TOKEN), None).0,
        400
    );
    // one record's attempt trail: event a-1 was sent once and refused (400)
    assert_eq!(api(&hub, "GET", "/api/v1/records/a-1", None, None).0, 401);
    let (s, rec1) = api(&hub, "GET", "/api/v1/records/a-1", Some(TOKEN), None);
    assert_eq!(s, 200, "{rec1}");
    let trail = rec1["attempts"].as_array().unwrap();
    assert_eq!(trail.len(), 1, "{rec1}");
    assert_eq!(
        (
            &trail[0]["outcome"],
            &trail[0]["status"],
            &trail[0]["attempt"]
        ),
        (
            &serde_json::json!("dead"),
            &serde_json::json!(400),
            &serde_json::json!(1)
        ),
        "{rec1}"
    );
    assert_eq!(rec1["dead"].as_array().unwrap().len(), 1, "{rec1}");
    wait_for(Duration::from_secs(10), "a-3 delivered", || {
        api(&hub, "GET", "/api/v1/records/a-3", Some(TOKEN), None).1["attempts"][0]["outcome"]
            == "delivered"
    });
    let (_, rec3) = api(&hub, "GET", "/api/v1/records/a-3", Some(TOKEN), None);
    assert_eq!(rec3["attempts"][0]["status"], 200, "{rec3}");
    assert!(rec3["attempts"][0]["error"].is_null(), "{rec3}");
    assert_eq!(
        api(
            &hub,
            "GET",
            "/api/v1/records/nothing-names-this",
            Some(TOKEN),
            None
        )
        .1,
        serde_json::json!({"attempts": [], "pending": [], "dead": [], "written": []})
    );
    for bad in ["?limit=0", "?limit=1001", "?limit=x", "?other=1"] {
        let (s, body) = api(
            &hub,
            "GET",
            &format!("/api/v1/records/a-1{bad}"),
            Some(TOKEN),
            None,
        );
        assert_eq!(s, 400, "{bad}: {body}");
        assert!(body["error"].is_string(), "{bad}: {body}");
    }
    let first = list[0]["id"].as_i64().unwrap();
    let second = list[1]["id"].as_i64().unwrap();
    let key = list[0]["idempotency_key"].as_str().unwrap().to_owned();
    let (s, one) = api(
        &hub,
        "GET",
        &format!("/api/v1/dlq/{first}"),
        Some(TOKEN),
        None,
    );
    assert_eq!((s, one["stage"].clone()), (200, "deliver".into()));
    assert_eq!(
        api(&hub, "GET", "/api/v1/dlq/999999", Some(TOKEN), None).0,
        404
    );

    // replay the first with an edited payload; it arrives with its original key
    let (s, r) = api(
        &hub,
        "POST",
        &format!("/api/v1/dlq/{first}/replay"),
        Some(TOKEN),
        Some(serde_json::json!({"payload": {"id": 1, "fail": false}})),
    );
    assert_eq!(s, 200, "{r}");
    wait_for(Duration::from_secs(10), "the replayed delivery", || {
        rec.received
            .lock()
            .unwrap()
            .iter()
            .any(|x| x.body["id"] == 1)
    });
    let got = rec
        .received
        .lock()
        .unwrap()
        .iter()
        .find(|x| x.body["id"] == 1)
        .cloned()
        .unwrap();
    assert_eq!(got.idempotency_key.as_deref(), Some(key.as_str()));
    // replaying it again is a conflict: it is no longer dead
    assert_eq!(
        api(
            &hub,
            "POST",
            &format!("/api/v1/dlq/{first}/replay"),
            Some(TOKEN),
            None
        )
        .0,
        409
    );

    // discard the rest by filter
    let (s, r) = api(
        &hub,
        "POST",
        "/api/v1/dlq/discard",
        Some(TOKEN),
        Some(serde_json::json!({"flow": "items"})),
    );
    assert_eq!(s, 200);
    assert_eq!(r["discarded"], serde_json::json!([second]));
    // P1-20: a resolved entry's payload is dropped; the API says so
    assert!(one["payload"].is_string(), "{one}");
    assert!(one.get("payload_dropped").is_none(), "{one}");
    let (s, gone) = api(
        &hub,
        "GET",
        &format!("/api/v1/dlq/{second}"),
        Some(TOKEN),
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(gone["status"], "discarded", "{gone}");
    assert_eq!(gone["payload"], serde_json::Value::Null, "{gone}");
    let sha = gone["payload_sha256"].as_str().unwrap();
    assert_eq!(
        gone["payload_dropped"].as_str(),
        Some(format!("payload dropped after resolve (sha256 {sha})").as_str()),
        "{gone}"
    );
    let (s, st) = api(&hub, "GET", "/api/v1/status", Some(TOKEN), None);
    assert_eq!(s, 200);
    wait_for(Duration::from_secs(10), "accounting", || {
        let st = api(&hub, "GET", "/api/v1/status", Some(TOKEN), None).1;
        st["lanes"][0]["delivered"] == 2 && st["lanes"][0]["discarded"] == 1
    });
    assert_eq!(st["balanced"], true, "{st}");
}

#[test]
fn admin_api_is_off_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recorder::start();
    std::fs::write(dir.path().join("weft.yaml"), config(&rec.url(), false)).unwrap();
    let hub = Hub::start(dir.path(), "weft.yaml", 0, &ENV);
    let (s, body) = api(&hub, "GET", "/api/v1/status", Some("anything"), None);
    assert_eq!(s, 403);
    assert!(
        body["error"].as_str().unwrap().contains("admin_token"),
        "{body}"
    );
}
