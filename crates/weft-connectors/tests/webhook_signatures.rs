//! Webhook signature schemes end to end: the source is configured from YAML
//! through `weft validate`'s code path, served on 127.0.0.1 and called with
//! reqwest. Timestamps are real (now), so tolerance is checked for real.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use serde_json::Value;
use weft_connectors::webhook::WebhookRoute;
use weft_connectors::webhook::signature::{
    sign_hmac_sha256_hex, sign_standard_webhooks, sign_stripe,
};
use weft_connectors::{Batch, Ingest, IngestError, Receipt, Record};
use weft_core::config::{SourceSpec, load_str};

/// Accepts everything; remembers the event ids.
#[derive(Default)]
struct Ids(Mutex<Vec<String>>);

impl Ingest for Ids {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            let mut r = Receipt::default();
            for rec in batch.records {
                if let Record::Good(e) = rec {
                    self.0.lock().unwrap().push(e.id);
                    r.accepted += 1;
                }
            }
            Ok(r)
        })
    }
    fn checkpoint(&self, _key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
        Box::pin(async { Ok(None) })
    }
}

/// Validate a config whose webhook source has `webhook_yaml` (lines
/// indented 8 spaces) and give its source spec, or the rendered errors.
fn load(webhook_yaml: &str) -> Result<SourceSpec, String> {
    let text = format!(
        "systems:\n  billing:\n    source:\n      webhook:\n        path: /hooks/billing\n{webhook_yaml}"
    );
    match load_str(Path::new("weft.yaml"), &text, &|_| None) {
        Ok(mut c) => Ok(c.systems.remove("billing").unwrap().source.unwrap()),
        Err(e) => Err(e.to_string()),
    }
}

async fn serve(webhook_yaml: &str) -> (String, Arc<Ids>) {
    let spec = load(webhook_yaml).unwrap();
    let route = WebhookRoute::new("billing", &spec).unwrap();
    let ids = Arc::new(Ids::default());
    let app = route.router(ids.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hooks/billing"), ids)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// POST `body` with `headers`; the status and the JSON answer.
async fn post(url: &str, headers: &[(&str, String)], body: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

const SW_OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
// self-made second secret, base64 of "self-made-test-key-123456789"
const SW_NEW: &str = "whsec_c2VsZi1tYWRlLXRlc3Qta2V5LTEyMzQ1Njc4OQ==";

#[tokio::test]
async fn standard_webhooks_accepts_dedupes_by_webhook_id_and_rejects() {
    let (url, ids) = serve(&format!(
        "        signature:\n          scheme: standard_webhooks\n          secrets: [{SW_NEW}, {SW_OLD}]\n"
    ))
    .await;
    let body = r#"{"type": "invoice.paid", "amount": 12}"#;
    let headers = |secret: &str, id: &str, ts: i64| {
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_string()),
            (
                "webhook-signature",
                sign_standard_webhooks(secret, id, ts, body.as_bytes()).unwrap(),
            ),
        ]
    };

    // both rotated secrets pass; the event id is webhook-id
    let (s, v) = post(&url, &headers(SW_OLD, "msg_1", now()), body).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["ids"][0], "msg_1");
    let (s, _) = post(&url, &headers(SW_NEW, "msg_2", now()), body).await;
    assert_eq!(s, 202);
    assert_eq!(*ids.0.lock().unwrap(), vec!["msg_1", "msg_2"]);

    // wrong secret
    let (s, v) = post(&url, &headers("whsec_b3RoZXI=", "msg_3", now()), body).await;
    assert_eq!(s, 401);
    assert_eq!(
        v["error"],
        "signature in header `webhook-signature` does not match the body"
    );
    // stale timestamp, correctly signed
    let (s, v) = post(&url, &headers(SW_OLD, "msg_4", now() - 600), body).await;
    assert_eq!(s, 401);
    let e = v["error"].as_str().unwrap();
    assert!(
        e.starts_with("timestamp in header `webhook-timestamp` is 6")
            && e.ends_with("s before now, outside the tolerance of 300s"),
        "{e}"
    );
    // missing header
    let mut h = headers(SW_OLD, "msg_5", now());
    h.remove(0);
    let (s, v) = post(&url, &h, body).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"], "missing signature header `webhook-id`");
    assert_eq!(ids.0.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn stripe_accepts_takes_the_body_id_and_rejects() {
    let (url, ids) = serve(
        "        signature:\n          scheme: stripe\n          secrets: [whsec_old, whsec_new]\n          tolerance: 2m\n",
    )
    .await;
    let body = r#"{"id": "evt_1NG8Du2eZvKYlo2CUI79vXWy", "type": "charge.succeeded"}"#;
    let sig = |secret: &str, ts: i64| {
        vec![("stripe-signature", sign_stripe(secret, ts, body.as_bytes()))]
    };

    let (s, v) = post(&url, &sig("whsec_new", now()), body).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["ids"][0], "evt_1NG8Du2eZvKYlo2CUI79vXWy");
    let (s, _) = post(&url, &sig("whsec_old", now() - 60), body).await;
    assert_eq!(s, 202);

    let (s, v) = post(&url, &sig("whsec_wrong", now()), body).await;
    assert_eq!(s, 401);
    assert_eq!(
        v["error"],
        "signature in header `stripe-signature` does not match the body"
    );
    // outside 2m
    let (s, v) = post(&url, &sig("whsec_new", now() - 180), body).await;
    assert_eq!(s, 401);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .ends_with("outside the tolerance of 120s"),
        "{v}"
    );
    let (s, v) = post(&url, &[], body).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"], "missing signature header `stripe-signature`");
    assert_eq!(ids.0.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn github_documented_example_and_delivery_id() {
    let (url, ids) = serve(
        "        signature:\n          scheme: github\n          secrets: [\"It's a Secret to Everybody\"]\n",
    )
    .await;
    // GitHub's documented example: the signature passes, then the body
    // (not JSON) is refused with 400, not 401.
    let documented = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    let (s, v) = post(
        &url,
        &[("x-hub-signature-256", documented.to_owned())],
        "Hello, World!",
    )
    .await;
    assert_eq!(s, 400, "{v}");

    let body = r#"{"action": "opened"}"#;
    let good = format!(
        "sha256={}",
        sign_hmac_sha256_hex(b"It's a Secret to Everybody", body.as_bytes())
    );
    let (s, v) = post(
        &url,
        &[
            ("x-hub-signature-256", good.clone()),
            (
                "x-github-delivery",
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
            ),
        ],
        body,
    )
    .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["ids"][0], "72d3162e-cc78-11e3-81ab-4c9367dc0958");

    let (s, _) = post(
        &url,
        &[("x-hub-signature-256", documented.to_owned())],
        body,
    )
    .await;
    assert_eq!(s, 401);
    let (s, v) = post(&url, &[], body).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"], "missing signature header `x-hub-signature-256`");
    assert_eq!(ids.0.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn generic_hmac_with_timestamp_template() {
    let (url, _ids) = serve(
        "        signature:\n          scheme: hmac\n          secrets: [k-old, k-new]\n          header: X-Acme-Signature\n          prefix: \"v0=\"\n          encoding: hex\n          timestamp_header: X-Acme-Timestamp\n          signed_content: \"v0:{timestamp}:{body}\"\n          tolerance: 1m\n",
    )
    .await;
    let body = r#"{"id": 1}"#;
    let headers = |secret: &str, ts: i64| {
        let content = format!("v0:{ts}:{body}");
        vec![
            (
                "x-acme-signature",
                format!(
                    "v0={}",
                    sign_hmac_sha256_hex(secret.as_bytes(), content.as_bytes())
                ),
            ),
            ("x-acme-timestamp", ts.to_string()),
        ]
    };
    assert_eq!(post(&url, &headers("k-old", now()), body).await.0, 202);
    assert_eq!(post(&url, &headers("k-new", now()), body).await.0, 202);
    assert_eq!(post(&url, &headers("k-other", now()), body).await.0, 401);
    let (s, v) = post(&url, &headers("k-new", now() + 120), body).await;
    assert_eq!(s, 401);
    assert!(v["error"].as_str().unwrap().contains("s after now"), "{v}");
    let mut h = headers("k-new", now());
    h.pop();
    let (s, v) = post(&url, &h, body).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"], "missing signature header `x-acme-timestamp`");
}

#[test]
fn validate_reports_bad_signature_settings() {
    let e = load(
        "        secret: s\n        signature:\n          scheme: github\n          secrets: [s]\n",
    )
    .unwrap_err();
    assert!(e.contains("use one or the other"), "{e}");
    let e = load("        signature:\n          scheme: stripe\n          secrets: [s]\n          prefix: x\n")
        .unwrap_err();
    assert!(
        e.contains("webhook.signature.prefix") && e.contains("`scheme: hmac` only"),
        "{e}"
    );
    let e = load(
        "        signature:\n          scheme: standard_webhooks\n          secrets: [whsec_not-base64!]\n",
    )
    .unwrap_err();
    assert!(
        e.contains("secrets[0]") && e.contains("must be `whsec_` followed by base64"),
        "{e}"
    );
    assert!(
        !e.contains("not-base64"),
        "the secret must not be quoted: {e}"
    );
    let e =
        load("        signature:\n          scheme: hmac\n          secrets: []\n").unwrap_err();
    assert!(e.contains("at least one secret"), "{e}");
    let e = load(
        "        signature:\n          scheme: hmac\n          secrets: [s]\n          signed_content: \"{timestamp}.{body}\"\n",
    )
    .unwrap_err();
    assert!(e.contains("needs `timestamp_header`"), "{e}");
    let e = load(
        "        signature:\n          scheme: hmac\n          secrets: [s]\n          tolerance: soon\n",
    )
    .unwrap_err();
    assert!(e.contains("weft.yaml:9") && e.contains("tolerance"), "{e}");
    let e =
        load("        signature:\n          scheme: svix\n          secrets: [s]\n").unwrap_err();
    assert!(e.contains("scheme"), "{e}");

    // defaults by scheme: the id header
    let id_header = |y: &str| match load(y).unwrap() {
        SourceSpec::Webhook { id_header, .. } => id_header,
        _ => unreachable!(),
    };
    assert_eq!(
        id_header("        signature:\n          scheme: github\n          secrets: [s]\n")
            .as_deref(),
        Some("x-github-delivery")
    );
    assert_eq!(
        id_header(&format!(
            "        signature:\n          scheme: standard_webhooks\n          secrets: [{SW_OLD}]\n"
        ))
        .as_deref(),
        Some("webhook-id")
    );
    assert_eq!(
        id_header(
            "        id_header: X-Request-Id\n        signature:\n          scheme: github\n          secrets: [s]\n"
        )
        .as_deref(),
        Some("x-request-id")
    );
    assert_eq!(
        id_header("        secret: s\n").as_deref(),
        Some("x-event-id")
    );
    // Stripe: the signed body's id, no header
    assert_eq!(
        id_header("        signature:\n          scheme: stripe\n          secrets: [s]\n"),
        None
    );
}

/// P2-2: a captured Stripe request replayed within the tolerance with a
/// fresh, unsigned `x-event-id` is the same event (the signed body's `id`),
/// so the store deduplicates it; it used to be a new event (a payment
/// processed twice).
#[tokio::test]
async fn p2_2_stripe_replay_with_a_fresh_event_id_header_is_a_duplicate() {
    let (url, ids) =
        serve("        signature:\n          scheme: stripe\n          secrets: [whsec_k]\n").await;
    let body = r#"{"id": "evt_replayed", "type": "charge.succeeded"}"#;
    let captured = sign_stripe("whsec_k", now(), body.as_bytes());
    for fresh in ["evt-header-1", "evt-header-2"] {
        let (s, v) = post(
            &url,
            &[
                ("stripe-signature", captured.clone()),
                ("x-event-id", fresh.to_owned()),
            ],
            body,
        )
        .await;
        assert_eq!(s, 202, "{v}");
        assert_eq!(v["ids"][0], "evt_replayed", "{v}");
    }
    assert_eq!(*ids.0.lock().unwrap(), vec!["evt_replayed", "evt_replayed"]);
}

/// P2-2: the same for Standard Webhooks, whose `webhook-id` is signed.
#[tokio::test]
async fn p2_2_standard_webhooks_replay_with_a_fresh_event_id_header_is_a_duplicate() {
    let (url, ids) = serve(&format!(
        "        signature:\n          scheme: standard_webhooks\n          secrets: [{SW_OLD}]\n"
    ))
    .await;
    let body = r#"{"type": "invoice.paid"}"#;
    let ts = now();
    let sig = sign_standard_webhooks(SW_OLD, "msg_replayed", ts, body.as_bytes()).unwrap();
    for fresh in ["a", "b"] {
        let (s, v) = post(
            &url,
            &[
                ("webhook-id", "msg_replayed".to_owned()),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", sig.clone()),
                ("x-event-id", fresh.to_owned()),
            ],
            body,
        )
        .await;
        assert_eq!(s, 202, "{v}");
    }
    assert_eq!(*ids.0.lock().unwrap(), vec!["msg_replayed", "msg_replayed"]);
}
