//! The REST polling source against a real HTTP server on 127.0.0.1 (axum,
//! serving pages of an in-memory dataset, counting and logging requests,
//! injecting faults), with an in-test `Ingest` that keeps batches and
//! checkpoints in memory and dedupes by id like the inbox.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_connectors::rest::{CHECKPOINT_KEY, PollError, RestSource};
use weft_connectors::{Batch, Ingest, IngestError, Receipt, Record, Source};
use weft_core::config::SourceSpec;

// ---------------------------------------------------------------- server

#[derive(Clone, Debug)]
enum Fault {
    /// 429 with `Retry-After: <secs>`.
    TooMany(u64),
    /// 500 once.
    Error500,
    /// Revoke every issued token (the request then gets 401).
    Revoke,
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with an error object instead of a page.
    ErrorObject,
}

#[derive(Clone, Debug, Default)]
enum Expect {
    #[default]
    None,
    Bearer(&'static str),
    Basic(&'static str, &'static str),
    HeaderKey(&'static str, &'static str),
    QueryKey(&'static str, &'static str),
    OAuth,
}

#[derive(Clone, Debug)]
struct Logged {
    path: String,
    query: BTreeMap<String, String>,
    at: Instant,
    status: u16,
}

#[derive(Default)]
struct Srv {
    addr: Mutex<String>,
    data: Mutex<Vec<Value>>,
    log: Mutex<Vec<Logged>>,
    /// By API request number (from 1).
    faults: Mutex<HashMap<usize, Fault>>,
    api_count: AtomicUsize,
    token_count: AtomicUsize,
    expect: Mutex<Expect>,
    tokens: Mutex<HashSet<String>>,
}

impl Srv {
    fn fault(&self, n: usize, f: Fault) {
        self.faults.lock().unwrap().insert(n, f);
    }
    fn log(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }
    fn api_requests(&self) -> usize {
        self.api_count.load(Ordering::SeqCst)
    }
}

fn rec(id: u32, updated_at: &str) -> Value {
    json!({"id": id, "name": format!("customer {id}"), "updated_at": updated_at})
}

/// Records `1..=n`, updated one minute apart on 2024-01-01.
fn dataset(n: u32) -> Vec<Value> {
    (1..=n)
        .map(|i| rec(i, &format!("2024-01-01T00:{i:02}:00Z")))
        .collect()
}

fn form_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    let dec = form_decode;
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (dec(k), dec(v)),
            None => (dec(p), String::new()),
        })
        .collect()
}

fn basic_of(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let b = v.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn bearer_of(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(str::to_owned)
}

async fn handle(
    axum::extract::State(s): axum::extract::State<Arc<Srv>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let query = parse_query(uri.query());
    let path = uri.path().to_owned();
    if path == "/token" {
        return token(&s, &method, &headers, &body);
    }
    let n = s.api_count.fetch_add(1, Ordering::SeqCst) + 1;
    let fault = s.faults.lock().unwrap().remove(&n);
    if matches!(fault, Some(Fault::Revoke)) {
        s.tokens.lock().unwrap().clear();
    }
    let expect = s.expect.lock().unwrap().clone();
    let authorized = match &expect {
        Expect::None => true,
        Expect::Bearer(t) => bearer_of(&headers).as_deref() == Some(t),
        Expect::Basic(u, p) => basic_of(&headers) == Some((u.to_string(), p.to_string())),
        Expect::HeaderKey(h, v) => headers.get(*h).and_then(|x| x.to_str().ok()) == Some(v),
        Expect::QueryKey(k, v) => query.get(*k).map(String::as_str) == Some(v),
        Expect::OAuth => bearer_of(&headers).is_some_and(|t| s.tokens.lock().unwrap().contains(&t)),
    };
    let (status, resp) = if !authorized {
        (
            401,
            (StatusCode::UNAUTHORIZED, "who are you?").into_response(),
        )
    } else {
        match fault {
            Some(Fault::TooMany(secs)) => (
                429,
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", secs.to_string())],
                    "slow down",
                )
                    .into_response(),
            ),
            Some(Fault::Error500) => (
                500,
                (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response(),
            ),
            Some(Fault::Malformed) => (
                200,
                (
                    [("content-type", "application/json")],
                    "{\"data\": [{\"id\": 1,",
                )
                    .into_response(),
            ),
            Some(Fault::ErrorObject) => (
                200,
                axum::Json(json!({"error": "temporarily unavailable"})).into_response(),
            ),
            _ => (200, page(&s, &path, &query)),
        }
    };
    s.log.lock().unwrap().push(Logged {
        path,
        query,
        at: Instant::now(),
        status,
    });
    resp
}

fn token(s: &Srv, method: &Method, headers: &HeaderMap, body: &str) -> Response {
    let form = parse_query(Some(body));
    let ok = method == Method::POST
        && form.get("grant_type").map(String::as_str) == Some("client_credentials")
        && form.get("scope").map(String::as_str) == Some("read:customers")
        // RFC 6749 2.3.1: id and secret are form-encoded inside basic auth
        && basic_of(headers).map(|(u, p)| (form_decode(&u), form_decode(&p)))
            == Some(("client-1".into(), "s3cret/+&".into()));
    if !ok {
        return (StatusCode::UNAUTHORIZED, "{\"error\":\"invalid_client\"}").into_response();
    }
    let n = s.token_count.fetch_add(1, Ordering::SeqCst) + 1;
    let t = format!("tok-{n}");
    s.tokens.lock().unwrap().insert(t.clone());
    axum::Json(json!({"access_token": t, "token_type": "Bearer", "expires_in": 3600}))
        .into_response()
}

/// The page the request asks for, from the records with
/// `updated_at >= updated_since` in `updated_at` order.
fn page(s: &Srv, path: &str, q: &BTreeMap<String, String>) -> Response {
    let mut rows: Vec<Value> = s.data.lock().unwrap().clone();
    rows.sort_by(|a, b| a["updated_at"].as_str().cmp(&b["updated_at"].as_str()));
    if let Some(since) = q.get("updated_since") {
        rows.retain(|r| r["updated_at"].as_str().unwrap_or("") >= since.as_str());
    }
    // an exclusive parameter
    if let Some(after) = q.get("updated_after") {
        rows.retain(|r| r["updated_at"].as_str().unwrap_or("") > after.as_str());
    }
    // an API that does not sort by the cursor: by id
    if path == "/unordered" {
        rows.sort_by_key(|r| r["id"].as_u64());
    }
    let num = |k: &str, d: usize| q.get(k).and_then(|v| v.parse::<usize>().ok()).unwrap_or(d);
    let slice = |from: usize, len: usize| -> Vec<Value> {
        rows.iter().skip(from).take(len).cloned().collect()
    };
    let addr = s.addr.lock().unwrap().clone();
    let since_q = q
        .get("updated_since")
        .map(|v| format!("&updated_since={v}"))
        .unwrap_or_default();
    match path {
        "/page" | "/unordered" => {
            let size = num("per_page", 2);
            let p = num("page", 1);
            axum::Json(json!({"data": slice((p.saturating_sub(1)) * size, size)})).into_response()
        }
        "/offset" => {
            axum::Json(json!({"items": slice(num("offset", 0), num("limit", 10))})).into_response()
        }
        "/cursor" => {
            let from = q
                .get("cursor")
                .and_then(|c| c.strip_prefix("c"))
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let items = slice(from, 2);
            let next = if from + 2 < rows.len() {
                json!(format!("c{}", from + 2))
            } else {
                Value::Null
            };
            axum::Json(json!({"items": items, "meta": {"next_cursor": next}})).into_response()
        }
        "/link" => {
            let p = num("page", 1);
            let items = slice((p - 1) * 2, 2);
            let mut links = vec![format!("</link?page=1{since_q}>; rel=\"first\"")];
            if p * 2 < rows.len() {
                links.push(format!("</link?page={}{since_q}>; rel=\"next\"", p + 1));
            }
            (
                [("link", links.join(", "))],
                axum::Json(Value::Array(items)),
            )
                .into_response()
        }
        "/next" => {
            let p = num("p", 1);
            let items = slice((p - 1) * 2, 2);
            let next = if p * 2 < rows.len() {
                json!(format!("http://{addr}/next?p={}{since_q}", p + 1))
            } else {
                Value::Null
            };
            axum::Json(json!({"results": items, "next": next})).into_response()
        }
        _ => (StatusCode::NOT_FOUND, "no such path").into_response(),
    }
}

async fn serve(data: Vec<Value>, expect: Expect) -> (Arc<Srv>, String) {
    let s = Arc::new(Srv::default());
    *s.data.lock().unwrap() = data;
    *s.expect.lock().unwrap() = expect;
    let app = axum::Router::new().fallback(handle).with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    *s.addr.lock().unwrap() = addr.to_string();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (s, format!("http://{addr}"))
}

// ---------------------------------------------------------------- ingest

#[derive(Default)]
struct State {
    ids: HashSet<String>,
    events: Vec<weft_core::Event>,
    bad: Vec<weft_connectors::BadRecord>,
    checkpoints: HashMap<String, String>,
    /// The checkpoint of every accepted batch, in order.
    batch_checkpoints: Vec<Option<String>>,
    duplicates: usize,
}

/// Stores batches whole or not at all, checkpoint included; dedupes by id.
struct MemIngest {
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

impl MemIngest {
    fn new() -> Arc<Self> {
        Arc::new(MemIngest {
            state: Mutex::new(State::default()),
            changed: tokio::sync::Notify::new(),
        })
    }
    fn ids(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .events
            .iter()
            .map(|e| e.id.clone())
            .collect()
    }
    fn cursor(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .checkpoints
            .get(CHECKPOINT_KEY)
            .cloned()
    }
    /// Wait (at most 10 s) until `f` holds; no fixed sleeps.
    async fn wait_until(&self, what: &str, f: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.changed.notified();
            if f(&self.state.lock().unwrap()) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                panic!("timed out waiting until {what}");
            }
        }
    }
}

impl Ingest for MemIngest {
    fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
        Box::pin(async move {
            let mut r = Receipt::default();
            {
                let mut s = self.state.lock().unwrap();
                for rec in batch.records {
                    match rec {
                        Record::Good(e) => {
                            if s.ids.insert(e.id.clone()) {
                                r.accepted += 1;
                                s.events.push(e);
                            } else {
                                r.duplicates += 1;
                                s.duplicates += 1;
                            }
                        }
                        Record::Bad(b) => {
                            if s.ids.insert(b.id.clone()) {
                                r.accepted += 1;
                                s.bad.push(b);
                            }
                        }
                    }
                }
                if let Some(c) = &batch.checkpoint {
                    s.checkpoints.insert(c.key.clone(), c.value.clone());
                }
                s.batch_checkpoints
                    .push(batch.checkpoint.as_ref().map(|c| c.value.clone()));
            }
            self.changed.notify_waiters();
            Ok(r)
        })
    }
    fn checkpoint(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
        let v = self.state.lock().unwrap().checkpoints.get(key).cloned();
        Box::pin(async move { Ok(v) })
    }
}

// ---------------------------------------------------------------- helpers

/// A rest source spec from YAML, through the real config loader.
fn spec(rest_yaml: &str) -> SourceSpec {
    let indented: String = rest_yaml
        .trim_matches('\n')
        .lines()
        .map(|l| format!("        {l}\n"))
        .collect();
    let text = format!("systems:\n  api:\n    source:\n      rest:\n{indented}");
    let cfg = weft_core::config::load_str(Path::new("/tmp/weft-test.yaml"), &text, &|k| {
        (k == "API_TOKEN").then(|| "t0k3n".to_owned())
    })
    .unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
    cfg.systems["api"].source.clone().unwrap()
}

fn source(rest_yaml: &str) -> RestSource {
    RestSource::new("api", &spec(rest_yaml)).unwrap()
}

async fn poll(
    src: &RestSource,
    ingest: &Arc<MemIngest>,
) -> Result<weft_connectors::rest::PollReport, PollError> {
    src.poll_once(ingest.as_ref(), &CancellationToken::new())
        .await
}

fn sorted_ids(ingest: &MemIngest) -> Vec<String> {
    let mut v = ingest.ids();
    v.sort_by_key(|s| s.parse::<u64>().unwrap_or(u64::MAX));
    v
}

fn ids(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

// ---------------------------------------------------------------- pagination

#[tokio::test]
async fn page_pagination_reads_every_page_until_an_empty_one() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    let src = source(&format!(
        r#"
url: {base}/page
query: {{status: active}}
records: .data
id_field: .id
event_type: crm.customer
pagination:
  page: {{param: page, size_param: per_page, size: 2}}
"#
    ));
    let ingest = MemIngest::new();
    let r = poll(&src, &ingest).await.unwrap();
    assert_eq!(sorted_ids(&ingest), ids(1..=5));
    assert_eq!((r.pages, r.records, r.accepted), (4, 5, 5));
    let log = srv.log();
    let pages: Vec<&str> = log.iter().map(|l| l.query["page"].as_str()).collect();
    assert_eq!(pages, ["1", "2", "3", "4"]);
    assert!(
        log.iter()
            .all(|l| l.query["per_page"] == "2" && l.query["status"] == "active")
    );
    let s = ingest.state.lock().unwrap();
    let e = &s.events[0];
    assert_eq!(
        (e.ty.as_str(), e.source.as_str()),
        ("crm.customer", "weft:api")
    );
    assert_eq!(e.data["name"], "customer 1");
    assert!(
        s.batch_checkpoints.iter().all(Option::is_none),
        "no incremental, no checkpoint"
    );
}

#[tokio::test]
async fn a_second_poll_is_deduplicated_by_id() {
    let (_srv, base) = serve(dataset(3), Expect::None).await;
    // no id_field: the SHA-256 of each record's JSON
    let src = source(&format!(
        "url: {base}/offset\nrecords: .items\npagination: {{offset: {{limit: 2}}}}"
    ));
    let ingest = MemIngest::new();
    assert_eq!(poll(&src, &ingest).await.unwrap().accepted, 3);
    let r = poll(&src, &ingest).await.unwrap();
    assert_eq!((r.accepted, r.duplicates), (0, 3));
    assert!(ingest.ids().iter().all(|id| id.len() == 64), "sha-256 ids");
}

#[tokio::test]
async fn offset_pagination_advances_by_records_received() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    let src = source(&format!(
        "url: {base}/offset\nrecords: .items\nid_field: .id\npagination:\n  offset: {{offset_param: offset, limit_param: limit, limit: 2}}"
    ));
    let ingest = MemIngest::new();
    poll(&src, &ingest).await.unwrap();
    assert_eq!(sorted_ids(&ingest), ids(1..=5));
    let offsets: Vec<String> = srv
        .log()
        .iter()
        .map(|l| l.query["offset"].clone())
        .collect();
    assert_eq!(offsets, ["0", "2", "4", "5"]);
}

#[tokio::test]
async fn cursor_pagination_follows_the_body_cursor_and_stops_without_one() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    let src = source(&format!(
        "url: {base}/cursor\nrecords: .items\nid_field: .id\npagination:\n  cursor: {{cursor_path: .meta.next_cursor, param: cursor}}"
    ));
    let ingest = MemIngest::new();
    let r = poll(&src, &ingest).await.unwrap();
    assert_eq!(sorted_ids(&ingest), ids(1..=5));
    assert_eq!(r.pages, 3, "the third page has no next cursor");
    let cursors: Vec<Option<String>> = srv
        .log()
        .iter()
        .map(|l| l.query.get("cursor").cloned())
        .collect();
    assert_eq!(cursors, [None, Some("c2".into()), Some("c4".into())]);
}

#[tokio::test]
async fn link_header_pagination_follows_rel_next() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    let src = source(&format!(
        "url: {base}/link\nid_field: .id\npagination: {{link_header: {{}}}}"
    ));
    let ingest = MemIngest::new();
    let r = poll(&src, &ingest).await.unwrap();
    assert_eq!(sorted_ids(&ingest), ids(1..=5));
    assert_eq!(r.pages, 3);
    let pages: Vec<Option<String>> = srv
        .log()
        .iter()
        .map(|l| l.query.get("page").cloned())
        .collect();
    assert_eq!(pages, [None, Some("2".into()), Some("3".into())]);
}

#[tokio::test]
async fn next_url_pagination_follows_the_body_url() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    let src = source(&format!(
        "url: {base}/next\nrecords: .results\nid_field: .id\npagination: {{next_url: {{path: .next}}}}"
    ));
    let ingest = MemIngest::new();
    let r = poll(&src, &ingest).await.unwrap();
    assert_eq!(sorted_ids(&ingest), ids(1..=5));
    assert_eq!(r.pages, 3);
    let last = srv.log().last().cloned().unwrap();
    assert_eq!(
        (last.path.as_str(), last.query["p"].as_str()),
        ("/next", "3")
    );
}

#[tokio::test]
async fn max_pages_caps_a_poll() {
    let (srv, base) = serve(dataset(9), Expect::None).await;
    let src = source(&format!(
        "url: {base}/page\nrecords: .data\nid_field: .id\npagination: {{page: {{size: 2, max_pages: 2}}}}"
    ));
    let ingest = MemIngest::new();
    let r = poll(&src, &ingest).await.unwrap();
    assert!(r.capped);
    assert_eq!(sorted_ids(&ingest), ids(1..=4));
    assert_eq!(srv.api_requests(), 2);
}

// ---------------------------------------------------------------- incremental

const INCREMENTAL: &str = r#"
records: .data
id_field: '"\(.id)@\(.updated_at)"'
pagination: {page: {size: 2}}
incremental:
  cursor_field: .updated_at
  param: updated_since
  initial: "1970-01-01T00:00:00Z"
"#;

fn ts(i: u32) -> String {
    format!("\"2024-01-01T00:{i:02}:00Z\"")
}

#[tokio::test]
async fn incremental_checkpoint_goes_with_each_page_and_a_restart_resumes_after_it() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    let yaml = format!("url: {base}/page\n{INCREMENTAL}");
    let ingest = MemIngest::new();
    let r = poll(&source(&yaml), &ingest).await.unwrap();
    assert_eq!(r.accepted, 5);
    {
        let s = ingest.state.lock().unwrap();
        // one batch per non-empty page, each with the highest cursor so far
        assert_eq!(
            s.batch_checkpoints,
            vec![Some(ts(2)), Some(ts(4)), Some(ts(5))]
        );
    }
    assert_eq!(srv.log()[0].query["updated_since"], "1970-01-01T00:00:00Z");

    // the API changes: record 3 is updated, 6 and 7 are new
    {
        let mut d = srv.data.lock().unwrap();
        d[2] = rec(3, "2024-01-01T00:10:00Z");
        d.push(rec(6, "2024-01-01T00:11:00Z"));
        d.push(rec(7, "2024-01-01T00:12:00Z"));
    }
    // a restart: a new source over the same store
    let before = srv.log().len();
    let r = poll(&source(&yaml), &ingest).await.unwrap();
    let log = srv.log();
    assert_eq!(log[before].query["updated_since"], "2024-01-01T00:05:00Z");
    // record 5 (cursor equal to the checkpoint) is fetched again and deduplicated
    assert_eq!((r.accepted, r.duplicates), (3, 1));
    let mut new_ids: Vec<String> = ingest.ids()[5..].to_vec();
    new_ids.sort();
    assert_eq!(
        new_ids,
        [
            "3@2024-01-01T00:10:00Z",
            "6@2024-01-01T00:11:00Z",
            "7@2024-01-01T00:12:00Z"
        ]
    );
    assert_eq!(ingest.cursor(), Some(ts(12)));
}

#[tokio::test]
async fn a_store_failure_mid_poll_never_skips_records() {
    let (_srv, base) = serve(dataset(6), Expect::None).await;
    let yaml = format!("url: {base}/page\n{INCREMENTAL}");
    let ingest = MemIngest::new();
    // page 1 is stored, page 2's batch fails: the poll stops there
    let src = source(&yaml);
    {
        // fail the second batch only
        let i2 = ingest.clone();
        let first = poll_first_page_then_fail(&src, &i2).await;
        assert!(matches!(first, Err(PollError::Store(_))), "{first:?}");
    }
    assert_eq!(ingest.cursor(), Some(ts(2)), "only page 1's checkpoint");
    assert_eq!(ingest.ids().len(), 2);
    // restart: everything after the checkpoint arrives, nothing is missing
    poll(&source(&yaml), &ingest).await.unwrap();
    let mut got: Vec<u32> = ingest
        .state
        .lock()
        .unwrap()
        .events
        .iter()
        .map(|e| e.data["id"].as_u64().unwrap() as u32)
        .collect();
    got.sort();
    assert_eq!(got, (1..=6).collect::<Vec<_>>());
    assert_eq!(ingest.cursor(), Some(ts(6)));
}

/// Poll with an ingest that takes the first batch and fails the second.
async fn poll_first_page_then_fail(
    src: &RestSource,
    ingest: &Arc<MemIngest>,
) -> Result<weft_connectors::rest::PollReport, PollError> {
    struct FailSecond(Arc<MemIngest>, AtomicUsize);
    impl Ingest for FailSecond {
        fn ingest(&self, batch: Batch) -> BoxFuture<'_, Result<Receipt, IngestError>> {
            if self.1.fetch_add(1, Ordering::SeqCst) == 1 {
                return Box::pin(async { Err(IngestError::Store("disk on fire".into())) });
            }
            self.0.ingest(batch)
        }
        fn checkpoint(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, IngestError>> {
            self.0.checkpoint(key)
        }
    }
    let f = FailSecond(ingest.clone(), AtomicUsize::new(0));
    src.poll_once(&f, &CancellationToken::new()).await
}

#[tokio::test]
async fn unordered_mode_checkpoints_only_with_the_last_page() {
    let (_srv, base) = serve(dataset(5), Expect::None).await;
    let yaml = format!("url: {base}/page\n{INCREMENTAL}  order: unordered\n");
    let ingest = MemIngest::new();
    poll(&source(&yaml), &ingest).await.unwrap();
    let s = ingest.state.lock().unwrap();
    assert_eq!(s.batch_checkpoints, vec![None, None, None, Some(ts(5))]);
}

#[tokio::test]
async fn full_resync_on_start_ignores_the_saved_cursor_once() {
    let (srv, base) = serve(dataset(4), Expect::None).await;
    let yaml = format!("url: {base}/page\n{INCREMENTAL}");
    let ingest = MemIngest::new();
    poll(&source(&yaml), &ingest).await.unwrap();
    let resync = source(&format!("{yaml}full_resync_on_start: true\n"));
    let before = srv.log().len();
    let r = poll(&resync, &ingest).await.unwrap();
    assert_eq!(
        srv.log()[before].query["updated_since"],
        "1970-01-01T00:00:00Z"
    );
    assert_eq!(
        (r.records, r.duplicates),
        (4, 4),
        "everything again, all duplicates"
    );
    let before = srv.log().len();
    poll(&resync, &ingest).await.unwrap();
    assert_eq!(
        srv.log()[before].query["updated_since"],
        "2024-01-01T00:04:00Z",
        "later polls are incremental"
    );
}

// ---------------------------------------------------------------- auth

#[tokio::test]
async fn bearer_auth_from_env() {
    let (srv, base) = serve(dataset(3), Expect::Bearer("t0k3n")).await;
    let src = source(&format!(
        "url: {base}/page\nrecords: .data\nid_field: .id\nauth: {{bearer: \"${{API_TOKEN}}\"}}\npagination: {{page: {{size: 2}}}}"
    ));
    let ingest = MemIngest::new();
    poll(&src, &ingest).await.unwrap();
    assert_eq!(sorted_ids(&ingest), ids(1..=3));
    assert!(srv.log().iter().all(|l| l.status == 200));
}

#[tokio::test]
async fn basic_auth() {
    let (srv, base) = serve(dataset(3), Expect::Basic("svc", "pa:ss")).await;
    let yaml = format!(
        "url: {base}/page\nrecords: .data\nid_field: .id\nauth: {{basic: {{username: svc, password: \"pa:ss\"}}}}"
    );
    let ingest = MemIngest::new();
    poll(&source(&yaml), &ingest).await.unwrap();
    assert_eq!(ingest.ids().len(), 2, "one page of the default size");
    assert!(srv.log().iter().all(|l| l.status == 200));
    // wrong password: a clear error, nothing stored
    let bad = source(&yaml.replace("pa:ss", "nope"));
    let e = poll(&bad, &MemIngest::new()).await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
}

#[tokio::test]
async fn api_key_in_a_header_or_the_query() {
    let (srv, base) = serve(dataset(2), Expect::HeaderKey("x-api-key", "k-123")).await;
    let src = source(&format!(
        "url: {base}/offset\nrecords: .items\nid_field: .id\nauth: {{api_key: {{header: X-Api-Key, value: k-123}}}}"
    ));
    poll(&src, &MemIngest::new()).await.unwrap();
    assert!(srv.log().iter().all(|l| l.status == 200));

    let (srv, base) = serve(dataset(5), Expect::QueryKey("api_key", "k-456")).await;
    let src = source(&format!(
        "url: {base}/next\nrecords: .results\nid_field: .id\nauth: {{api_key: {{query: api_key, value: k-456}}}}\npagination: {{next_url: {{path: .next}}}}"
    ));
    let ingest = MemIngest::new();
    poll(&src, &ingest).await.unwrap();
    assert_eq!(ingest.ids().len(), 5);
    // also on the URLs the server gave (which do not carry the key)
    assert!(
        srv.log()
            .iter()
            .all(|l| l.status == 200 && l.query["api_key"] == "k-456")
    );
}

#[tokio::test]
async fn oauth2_token_is_cached_across_pages_and_refreshed_once_on_401() {
    let (srv, base) = serve(dataset(9), Expect::OAuth).await;
    let src = source(&format!(
        r#"
url: {base}/page
records: .data
id_field: .id
pagination: {{page: {{size: 2}}}}
auth:
  oauth2_client_credentials:
    token_url: {base}/token
    client_id: client-1
    client_secret: "s3cret/+&"
    scope: "read:customers"
"#
    ));
    let ingest = MemIngest::new();
    let r = poll(&src, &ingest).await.unwrap();
    assert_eq!(r.pages, 6);
    assert_eq!(
        srv.token_count.load(Ordering::SeqCst),
        1,
        "one token for every page"
    );
    // the server revokes its tokens on the next poll's second request
    srv.fault(8, Fault::Revoke);
    let r = poll(&src, &ingest).await.unwrap();
    assert_eq!((r.pages, r.duplicates), (6, 9));
    assert_eq!(srv.token_count.load(Ordering::SeqCst), 2, "one refresh");
    let statuses: Vec<u16> = srv.log().iter().map(|l| l.status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 1);
    // the refused page was asked again, not skipped
    let log = srv.log();
    assert_eq!(log[7].status, 401);
    assert_eq!(log[7].query["page"], log[8].query["page"]);
}

#[tokio::test]
async fn oauth2_bad_client_secret_fails_the_poll_clearly() {
    let (_srv, base) = serve(dataset(2), Expect::OAuth).await;
    let src = source(&format!(
        "url: {base}/page\nauth:\n  oauth2_client_credentials: {{token_url: {base}/token, client_id: client-1, client_secret: wrong, scope: 'read:customers'}}"
    ));
    let e = poll(&src, &MemIngest::new()).await.unwrap_err();
    let m = e.to_string();
    assert!(m.contains("token endpoint") && m.contains("401"), "{m}");
    assert!(!m.contains("wrong"), "no secret in errors: {m}");
}

// ---------------------------------------------------------------- faults

#[tokio::test]
async fn retry_after_on_429_is_waited_and_the_same_page_asked_again() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    srv.fault(2, Fault::TooMany(1));
    let src = source(&format!(
        "url: {base}/page\nrecords: .data\nid_field: .id\npagination: {{page: {{size: 2}}}}"
    ));
    let ingest = MemIngest::new();
    poll(&src, &ingest).await.unwrap();
    assert_eq!(sorted_ids(&ingest), ids(1..=5));
    let log = srv.log();
    assert_eq!(log[1].status, 429);
    assert_eq!(log[1].query["page"], log[2].query["page"]);
    let waited = log[2].at - log[1].at;
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After: 1 honoured, waited {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "not much longer: {waited:?}"
    );
}

#[tokio::test]
async fn a_server_error_is_retried_on_the_same_page() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    srv.fault(2, Fault::Error500);
    let src = source(&format!(
        "url: {base}/page\nrecords: .data\nid_field: .id\npagination: {{page: {{size: 2}}}}"
    ));
    let ingest = MemIngest::new();
    poll(&src, &ingest).await.unwrap();
    assert_eq!(sorted_ids(&ingest), ids(1..=5));
    let log = srv.log();
    assert_eq!((log[1].status, log[2].status), (500, 200));
    assert_eq!(log[1].query["page"], "2");
    assert_eq!(log[2].query["page"], "2");
}

#[tokio::test]
async fn malformed_json_fails_the_poll_keeps_the_checkpoint_and_the_source_retries() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    let yaml = format!("url: {base}/page\ninterval: 200ms\nmax_backoff: 5ms\n{INCREMENTAL}");
    let ingest = MemIngest::new();

    // a single poll: page 2 stays broken through every attempt
    for n in 2..2 + weft_connectors::rest::client::MAX_ATTEMPTS as usize {
        srv.fault(n, Fault::Malformed);
    }
    let e = poll(&source(&yaml), &ingest).await.unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, PollError::Body(_)), "{e:?}");
    assert!(m.contains("page 2") && m.contains("not valid JSON"), "{m}");
    assert!(m.contains("page=2"), "the URL is named: {m}");
    assert_eq!(ingest.cursor(), Some(ts(2)), "not past the last good page");

    // the running source: page 1 is broken once and asked for again
    let ingest = MemIngest::new();
    let n = srv.api_requests();
    srv.fault(n + 1, Fault::Malformed);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(Box::new(source(&yaml)).run(ingest.clone(), shutdown.clone()));
    ingest
        .wait_until("every record is stored", |s| s.events.len() == 5)
        .await;
    assert_eq!(ingest.cursor(), Some(ts(5)));
    let log = srv.log();
    assert_eq!(log[n].query["page"], "1");
    assert_eq!(log[n + 1].query["page"], "1", "the same page again");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops promptly")
        .unwrap()
        .unwrap();
}

/// Records `1..=n` whose cursors fall as the ids rise (record 1 is the
/// newest), served by id: what `order: unordered` is for.
fn reversed(n: u32) -> Vec<Value> {
    (1..=n)
        .map(|i| rec(i, &format!("2024-01-01T00:{:02}:00Z", n + 1 - i)))
        .collect()
}

/// Regression: a 200 page whose body lacks the records path was taken as an
/// empty last page; with `order: unordered` the poll then saved the highest
/// cursor seen so far as if complete, and every record below it was lost
/// for good (126 of 2,500 delivered, nothing logged).
#[tokio::test]
async fn a_200_page_without_the_records_path_is_retried_not_taken_as_the_last_page() {
    recorder();
    let (srv, base) = serve(reversed(10), Expect::None).await;
    srv.fault(3, Fault::ErrorObject);
    let yaml = format!(
        "url: {base}/unordered
max_backoff: 10ms
{INCREMENTAL}  order: unordered
"
    );
    let src = RestSource::new("shape_retry", &spec(&yaml)).unwrap();
    let ingest = MemIngest::new();
    let r = poll(&src, &ingest).await.unwrap();
    assert_eq!(r.accepted, 10);
    let mut got: Vec<u64> = ingest
        .state
        .lock()
        .unwrap()
        .events
        .iter()
        .map(|e| e.data["id"].as_u64().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    let log = srv.log();
    assert_eq!(log[2].query["page"], "3");
    assert_eq!(log[3].query["page"], "3", "the same page is asked again");
    assert_eq!(ingest.cursor(), Some(ts(10)));
    assert!(page_errors("shape_retry", "records") >= 1);
}

/// A page that keeps lacking the records path fails the poll after the
/// retries, names the page and the shape, and leaves the checkpoint alone.
#[tokio::test]
async fn a_page_that_keeps_the_wrong_shape_fails_the_poll_and_keeps_the_checkpoint() {
    recorder();
    let (srv, base) = serve(reversed(10), Expect::None).await;
    for n in 3..=20 {
        srv.fault(n, Fault::ErrorObject);
    }
    let yaml = format!(
        "url: {base}/unordered
max_backoff: 5ms
{INCREMENTAL}  order: unordered
"
    );
    let src = RestSource::new("shape_fail", &spec(&yaml)).unwrap();
    let ingest = MemIngest::new();
    let e = poll(&src, &ingest).await.unwrap_err();
    assert!(matches!(e, PollError::Body(_)), "{e:?}");
    let m = e.to_string();
    assert!(m.contains("page 3") && m.contains("page=3"), "{m}");
    assert!(
        m.contains("`.data`") && m.contains("temporarily unavailable"),
        "{m}"
    );
    assert!(m.contains("checkpoint stays"), "{m}");
    assert_eq!(ingest.cursor(), None, "unordered: nothing saved");
    assert_eq!(
        srv.api_requests(),
        2 + weft_connectors::rest::client::MAX_ATTEMPTS as usize
    );
    assert_eq!(
        page_errors("shape_fail", "records"),
        u64::from(weft_connectors::rest::client::MAX_ATTEMPTS)
    );
}

/// P1-19: with an exclusive `since` (`since_inclusive: false`) the saved
/// cursor is stepped back one unit, so a record that ties with it and
/// arrived after the poll is still fetched.
#[tokio::test]
async fn exclusive_since_steps_back_one_unit_so_ties_are_not_lost() {
    let (srv, base) = serve(dataset(5), Expect::None).await;
    let yaml = format!(
        "url: {base}/page
{}",
        INCREMENTAL.replace(
            "param: updated_since",
            "param: updated_after\n  since_inclusive: false"
        )
    );
    let ingest = MemIngest::new();
    poll(&source(&yaml), &ingest).await.unwrap();
    assert_eq!(ingest.cursor(), Some(ts(5)));
    // a record with the same cursor as the checkpoint arrives
    srv.data
        .lock()
        .unwrap()
        .push(rec(6, "2024-01-01T00:05:00Z"));
    let before = srv.log().len();
    let r = poll(&source(&yaml), &ingest).await.unwrap();
    assert_eq!(
        srv.log()[before].query["updated_after"],
        "2024-01-01T00:04:59Z"
    );
    assert_eq!((r.accepted, r.duplicates), (1, 1));
    assert!(ingest.ids().contains(&"6@2024-01-01T00:05:00Z".to_owned()));
}

/// The process's metrics recorder (installed by the first caller, before
/// anything is counted).
fn recorder() -> &'static metrics_util::debugging::Snapshotter {
    use metrics_util::debugging::{DebuggingRecorder, Snapshotter};
    static SNAP: std::sync::OnceLock<Snapshotter> = std::sync::OnceLock::new();
    SNAP.get_or_init(|| {
        let r = DebuggingRecorder::new();
        let s = r.snapshotter();
        r.install().unwrap();
        s
    })
}

/// The `weft_source_page_errors_total` counter of a source and reason. A
/// snapshot resets the counters it reads, so every snapshot (tests run in
/// parallel) is added up here.
fn page_errors(source: &str, reason: &str) -> u64 {
    use metrics_util::debugging::DebugValue;
    static TOTALS: Mutex<BTreeMap<(String, String), u64>> = Mutex::new(BTreeMap::new());
    let mut totals = TOTALS.lock().unwrap();
    for (k, .., v) in recorder().snapshot().into_vec() {
        let key = k.key();
        if key.name() != weft_connectors::rest::PAGE_ERRORS {
            continue;
        }
        let label = |name: &str| {
            key.labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_default()
        };
        if let DebugValue::Counter(n) = v {
            *totals
                .entry((label("source"), label("reason")))
                .or_default() += n;
        }
    }
    totals
        .get(&(source.to_owned(), reason.to_owned()))
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn bad_records_go_to_the_dlq_and_the_rest_is_stored() {
    let mut data = dataset(3);
    data[1] = json!({"name": "no id", "updated_at": "2024-01-01T00:02:00Z"});
    let (_srv, base) = serve(data, Expect::None).await;
    let src = source(&format!(
        "url: {base}/offset\nrecords: .items\nid_field: .id"
    ));
    let ingest = MemIngest::new();
    poll(&src, &ingest).await.unwrap();
    let s = ingest.state.lock().unwrap();
    assert_eq!(s.events.len(), 2);
    assert_eq!(s.bad.len(), 1);
    assert!(
        s.bad[0].error.contains("id_field `.id` gave null"),
        "{}",
        s.bad[0].error
    );
    assert!(
        s.bad[0].location.contains("record 1"),
        "{}",
        s.bad[0].location
    );
}

#[tokio::test]
async fn shutdown_stops_a_source_waiting_on_retry_after() {
    let (srv, base) = serve(dataset(2), Expect::None).await;
    srv.fault(1, Fault::TooMany(3600));
    let ingest = MemIngest::new();
    let shutdown = CancellationToken::new();
    let src = source(&format!("url: {base}/offset\nrecords: .items"));
    let task = tokio::spawn(Box::new(src).run(ingest.clone(), shutdown.clone()));
    // wait for the 429 to be served
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.log().is_empty() {
        assert!(Instant::now() < deadline, "no request came");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops promptly")
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(ingest.ids().is_empty());
}

#[tokio::test]
async fn rate_limit_spaces_requests() {
    let (srv, base) = serve(dataset(8), Expect::None).await;
    let src = source(&format!(
        "url: {base}/page\nrecords: .data\nid_field: .id\npagination: {{page: {{size: 2}}}}\nrate_limit: {{per_second: 10, burst: 1}}"
    ));
    poll(&src, &MemIngest::new()).await.unwrap();
    let log = srv.log();
    assert_eq!(log.len(), 5);
    let span = log[4].at - log[0].at;
    assert!(
        span >= Duration::from_millis(380),
        "5 requests at 10/s: {span:?}"
    );
}

#[tokio::test]
async fn cron_schedule_polls_at_its_times() {
    let (srv, base) = serve(dataset(2), Expect::None).await;
    // every second (6 fields: seconds first)
    let src = source(&format!(
        "url: {base}/offset\nrecords: .items\nid_field: .id\ncron: \"* * * * * *\""
    ));
    let ingest = MemIngest::new();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(Box::new(src).run(ingest.clone(), shutdown.clone()));
    ingest.wait_until("two polls", |s| s.duplicates >= 2).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let log = srv.log();
    assert!(log.len() >= 2);
    let gap = log[1].at - log[0].at;
    assert!(
        gap >= Duration::from_millis(900),
        "polls a second apart: {gap:?}"
    );
}
