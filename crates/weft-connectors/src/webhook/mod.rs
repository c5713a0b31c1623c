//! The webhook source: a `POST` endpoint on weft's HTTP server that turns
//! each accepted request into events.
//!
//! # What a request goes through
//!
//! 0. **Content type.** A `Content-Type` that is not JSON
//!    (`application/json`, `text/json` or a `+json` type, any parameters)
//!    is `415` before the body is read; none at all is taken as JSON.
//! 1. **Size.** A `Content-Length` over `max_body_bytes` is answered `413`
//!    before the body is read; the limit is enforced again while reading
//!    (chunked bodies, lying lengths). The bytes are reserved from the
//!    server's [`BodyBudget`] (`server.max_inflight_bytes`, shared by every
//!    route) before they are read (all of a `Content-Length` at once; a
//!    chunked body chunk by chunk) and held until the answer: when it is
//!    spent the request is `503` with `Retry-After: 1`, so memory is bounded
//!    by the budget, not by the number of senders.
//! 2. **Signature**, checked on the raw body before it is parsed. A
//!    `signature:` block picks a scheme (`standard_webhooks`, `stripe`,
//!    `github` or generic `hmac`) and one or more `secrets` (any one
//!    matching passes, for rotation); schemes with a timestamp reject one
//!    further than `tolerance` (default `5m`) from now. The older shorthand
//!    `secret` (+ `signature_header`, default `x-signature-256`) is generic
//!    hmac: the hex HMAC-SHA256 of the body, optionally prefixed `sha256=`.
//!    A missing header, a malformed or wrong signature, or a stale timestamp
//!    is `401` with the reason (never the expected signature). See
//!    [`signature`] for each scheme's headers and signed content.
//!
//!    ```yaml
//!    source:
//!      webhook:
//!        path: /hooks/billing
//!        signature:
//!          scheme: stripe            # standard_webhooks | stripe | github | hmac
//!          secrets: ["${STRIPE_WHSEC}", "${STRIPE_WHSEC_OLD}"]
//!          tolerance: 5m
//!    ```
//! 3. **JSON.** A UTF-8 byte order mark is skipped (for parsing only: the
//!    signature and the body hash are over the raw bytes). The body must be
//!    JSON: a top-level **object is one event**;
//!    a top-level **array is a batch** of events, one per element, each
//!    element an object, ingested all-or-nothing in one [`Batch`]. Anything
//!    else (not JSON, a scalar, an array holding a non-object) is `400` with
//!    `{"error": "..."}`: the request is rejected at the door and nothing of
//!    it is stored, so the sender sees the problem at once.
//! 4. **Ids**, deterministic so that a retried identical request gets the
//!    same ids and the store can deduplicate it:
//!    - a single object: the `id_header` (default `x-event-id`) when
//!      present; else the `id_field` jq program run on the object, which
//!      must yield a string or a number; else the hex SHA-256 of the raw
//!      body;
//!    - an array: `<id_header>:<index>` (index from 0) when the header is
//!      present; else `id_field` run on each element; else the hex SHA-256
//!      of the element's canonical JSON (keys sorted, no whitespace). Two
//!      identical elements therefore have the same id, exactly as two
//!      identical single-object requests do: the second is a duplicate.
//!
//!    The signature scheme sets the defaults: `standard_webhooks` reads
//!    the id from `webhook-id` (signed), `github` from `x-github-delivery`
//!    (not signed), and `stripe` runs `id_field: .id` on the signed body (a
//!    Stripe event's `evt_...` id) and reads no header at all, so that a
//!    captured request replayed within the tolerance with a fresh
//!    `x-event-id` is a duplicate, not a new event. An explicit `id_header`
//!    or `id_field` wins (`weft validate` warns when an explicit header
//!    would replace a signed id).
//!
//!    An empty array is acknowledged (`accepted: 0`) after an empty
//!    ingest. An `id_field` that fails or yields anything but a string or number is
//!    `400`.
//! 5. **Correlation id**: the inbound `x-correlation-id` when present and
//!    sane (at most 200 printable ASCII characters), else a fresh one. It is
//!    echoed in the `x-correlation-id` response header of every answer.
//! 6. **Ingest.** Events get `source = weft:<system>` and `type =
//!    event_type`. The answer waits for [`Ingest::ingest`]: `Ok` is `202`
//!    with `{"accepted", "duplicates", "ids", "correlation_id"}`;
//!    [`IngestError::Unavailable`] is `503` with `Retry-After: 1`;
//!    [`IngestError::Store`] is `500`. Nothing is acknowledged before the
//!    store has it.
//!
//! Logs carry the path, the status, the correlation id and counts; never
//! the body, the signature or the secret.

pub mod signature;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weft_core::Event;
use weft_core::config::SourceSpec;
use weft_core::event::{CORRELATION_HEADER, new_correlation_id};
use weft_core::mapping::Program;

use crate::source::{Batch, Ingest, IngestError, Record, SourceError, canonical_json};
use signature::{SignatureError, Verifier};

/// Longest inbound correlation id kept; longer ones are replaced.
const MAX_CORRELATION_LEN: usize = 200;
/// Longest event id taken from the id header.
const MAX_ID_LEN: usize = 200;

/// Bytes of webhook bodies held in memory at once, shared by every route
/// of a server: a request reserves its body's bytes before reading them
/// and gives them back when it is answered.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        BodyBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Reserve `n` bytes now, or say why not (`503`; `413` when `n` is
    /// more than the whole budget).
    fn take(&self, n: usize) -> Result<Option<OwnedSemaphorePermit>, Reject> {
        if n == 0 {
            return Ok(None);
        }
        if n > self.total {
            return Err(Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body larger than the in-flight budget",
                format!(
                    "body is larger than the server's in-flight budget of {} bytes",
                    self.total
                ),
            ));
        }
        let n32 = u32::try_from(n).map_err(|_| {
            Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large",
                "body is too large",
            )
        })?;
        self.bytes
            .clone()
            .try_acquire_many_owned(n32)
            .map(Some)
            .map_err(|_| {
                Reject::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "in-flight budget spent",
                    "too many request bytes in flight; retry later",
                )
            })
    }
}

/// A webhook endpoint to mount on weft's HTTP server.
pub struct WebhookRoute {
    pub system: String,
    pub path: String,
    inner: Arc<Inner>,
}

struct Inner {
    path: String,
    source: String,
    event_type: String,
    max_body_bytes: usize,
    verifier: Option<Verifier>,
    /// `None`: no header is read (Stripe: the signed body's `id` is the id).
    id_header: Option<HeaderName>,
    id_field: Option<Arc<Program>>,
}

impl std::fmt::Debug for WebhookRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRoute")
            .field("system", &self.system)
            .field("path", &self.path)
            .field("signed", &self.inner.verifier.is_some())
            .finish_non_exhaustive()
    }
}

impl WebhookRoute {
    pub fn new(system: &str, spec: &SourceSpec) -> Result<Self, SourceError> {
        let err = |message: String| SourceError {
            system: system.into(),
            message,
        };
        let SourceSpec::Webhook {
            cfg,
            id_field,
            event_type,
            max_body_bytes,
            signature_header,
            id_header,
            signature_tolerance,
        } = spec
        else {
            return Err(err("not a webhook source".into()));
        };
        check_path(&cfg.path).map_err(|why| err(format!("path `{}`: {why}", cfg.path)))?;
        if *max_body_bytes == 0 {
            return Err(err("max_body_bytes must be greater than 0".into()));
        }
        let verifier = match (&cfg.signature, &cfg.secret) {
            (Some(sig), _) => Some(
                Verifier::from_config(sig, *signature_tolerance)
                    .map_err(|e| err(format!("signature: {e}")))?,
            ),
            (None, Some(secret)) => Some(
                Verifier::shorthand(signature_header, secret)
                    .map_err(|e| err(format!("signature_header: {e}")))?,
            ),
            (None, None) => None,
        };
        let id_header = id_header
            .as_deref()
            .map(|h| {
                HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map_err(|_| err(format!("id_header: `{h}` is not a valid header name")))
            })
            .transpose()?;
        Ok(WebhookRoute {
            system: system.into(),
            path: cfg.path.clone(),
            inner: Arc::new(Inner {
                path: cfg.path.clone(),
                source: format!("weft:{system}"),
                event_type: event_type.clone(),
                max_body_bytes: *max_body_bytes,
                verifier,
                id_header,
                id_field: id_field.clone(),
            }),
        })
    }

    /// The axum router serving this endpoint, writing through `ingest`,
    /// with a budget of its own of 16 MiB (a server shares one budget
    /// between its routes: [`WebhookRoute::router_with_budget`]).
    pub fn router(self, ingest: Arc<dyn Ingest>) -> axum::Router {
        self.router_with_budget(ingest, BodyBudget::new(16 << 20))
    }

    /// The axum router serving this endpoint, writing through `ingest`,
    /// holding bodies within `budget`.
    pub fn router_with_budget(self, ingest: Arc<dyn Ingest>, budget: BodyBudget) -> axum::Router {
        let state = Handler {
            inner: self.inner,
            ingest,
            budget,
        };
        axum::Router::new()
            .route(&self.path, axum::routing::post(handle))
            .with_state(state)
    }
}

#[derive(Clone)]
struct Handler {
    inner: Arc<Inner>,
    ingest: Arc<dyn Ingest>,
    budget: BodyBudget,
}

/// A refusal: status, message for the sender, and a short reason for logs.
struct Reject {
    status: StatusCode,
    message: String,
    log: &'static str,
    /// What went wrong inside (a store error): logged, not answered.
    cause: Option<String>,
}

impl Reject {
    fn new(status: StatusCode, log: &'static str, message: impl Into<String>) -> Self {
        Reject {
            status,
            message: message.into(),
            log,
            cause: None,
        }
    }

    fn because(mut self, cause: impl Into<String>) -> Self {
        self.cause = Some(cause.into());
        self
    }
}

async fn handle(State(h): State<Handler>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let correlation_id = inbound_correlation_id(&parts.headers).unwrap_or_else(new_correlation_id);
    let inner = &h.inner;
    let result = accept(&h, &parts.headers, body, &correlation_id).await;
    let (status, body, retry_after) = match result {
        Ok(ok) => {
            tracing::info!(
                path = %inner.path,
                status = 202,
                correlation_id = %correlation_id,
                accepted = ok.accepted,
                duplicates = ok.duplicates,
                "webhook accepted"
            );
            (
                StatusCode::ACCEPTED,
                json!({
                    "accepted": ok.accepted,
                    "duplicates": ok.duplicates,
                    "ids": ok.ids,
                    "correlation_id": correlation_id,
                }),
                false,
            )
        }
        Err(r) => {
            if let Some(cause) = &r.cause {
                tracing::error!(
                    path = %inner.path,
                    status = r.status.as_u16(),
                    correlation_id = %correlation_id,
                    reason = r.log,
                    error = %cause,
                    "webhook not accepted"
                );
            } else if r.status.is_server_error() {
                tracing::warn!(
                    path = %inner.path,
                    status = r.status.as_u16(),
                    correlation_id = %correlation_id,
                    reason = r.log,
                    "webhook not accepted"
                );
            } else {
                tracing::info!(
                    path = %inner.path,
                    status = r.status.as_u16(),
                    correlation_id = %correlation_id,
                    reason = r.log,
                    "webhook rejected"
                );
            }
            (
                r.status,
                json!({ "error": r.message, "correlation_id": correlation_id }),
                r.status == StatusCode::SERVICE_UNAVAILABLE,
            )
        }
    };
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&correlation_id) {
        response.headers_mut().insert(CORRELATION_HEADER, v);
    }
    if retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

struct Accepted {
    accepted: usize,
    duplicates: usize,
    ids: Vec<String>,
}

async fn accept(
    h: &Handler,
    headers: &HeaderMap,
    body: Body,
    correlation_id: &str,
) -> Result<Accepted, Reject> {
    let inner = &h.inner;
    check_content_type(headers)?;
    // `_reserved` gives the bytes back when the request is answered
    let (raw, _reserved) = read_body(headers, body, inner.max_body_bytes, &h.budget).await?;
    if let Some(v) = &inner.verifier {
        v.verify(headers, &raw).map_err(|e| {
            let log = match e {
                SignatureError::Missing(_) => "signature missing",
                SignatureError::Malformed(..) => "signature malformed",
                SignatureError::Mismatch(_) => "bad signature",
                SignatureError::Stale { .. } => "timestamp outside tolerance",
            };
            Reject::new(StatusCode::UNAUTHORIZED, log, e.to_string())
        })?;
    }
    let json = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&raw);
    let value: Value = serde_json::from_slice(json).map_err(|e| {
        Reject::new(
            StatusCode::BAD_REQUEST,
            "invalid JSON",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let header_id = match &inner.id_header {
        Some(name) => header_event_id(headers, name)?,
        None => None,
    };
    // W3C trace context: kept when well formed, passed on to every write
    let trace = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| weft_core::event::valid_traceparent(t))
        .map(|t| {
            let state = headers
                .get("tracestate")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|s| !s.is_empty() && weft_core::event::valid_tracestate(s));
            (t.to_owned(), state.map(str::to_owned))
        });
    let traced = |mut e: Event| {
        if let Some((t, s)) = &trace {
            e.traceparent = Some(t.clone());
            e.tracestate = s.clone();
        }
        e
    };
    let events = match value {
        Value::Object(_) => {
            let id = match header_id {
                Some(id) => id,
                None => match &inner.id_field {
                    Some(p) => field_id(p, &value, None)?,
                    None => hex::encode(Sha256::digest(&raw)),
                },
            };
            vec![traced(inner.event(id, correlation_id, value))]
        }
        Value::Array(items) => {
            let mut events = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                if !item.is_object() {
                    return Err(Reject::new(
                        StatusCode::BAD_REQUEST,
                        "non-object array element",
                        format!("element {i} of the array is not a JSON object"),
                    ));
                }
                let id = match (&header_id, &inner.id_field) {
                    (Some(id), _) => format!("{id}:{i}"),
                    (None, Some(p)) => field_id(p, &item, Some(i))?,
                    (None, None) => {
                        let mut text = String::new();
                        canonical_json(&item, &mut text);
                        hex::encode(Sha256::digest(text.as_bytes()))
                    }
                };
                events.push(traced(inner.event(id, correlation_id, item)));
            }
            events
        }
        _ => {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                "not an object or array",
                "body must be a JSON object (one event) or an array of objects (a batch)",
            ));
        }
    };
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let batch = Batch {
        records: events.into_iter().map(Record::Good).collect(),
        checkpoint: None,
    };
    match h.ingest.ingest(batch).await {
        Ok(receipt) => Ok(Accepted {
            accepted: receipt.accepted,
            duplicates: receipt.duplicates,
            ids,
        }),
        Err(IngestError::Unavailable(m)) => Err(Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ingest unavailable",
            format!("not accepting now, retry later: {m}"),
        )),
        Err(IngestError::Rejected(m)) => Err(Reject::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "contract violation",
            m,
        )),
        Err(IngestError::Store(cause)) => Err(Reject::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store error",
            "the event could not be stored; retry later",
        )
        .because(cause)),
    }
}

impl Inner {
    fn event(&self, id: String, correlation_id: &str, data: Value) -> Event {
        Event::new(
            id,
            self.source.clone(),
            self.event_type.clone(),
            Some(correlation_id.to_owned()),
            data,
        )
    }
}

/// Read the whole body, refusing more than `max` bytes, with its bytes
/// reserved from `budget`.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: usize,
    budget: &BodyBudget,
) -> Result<(bytes::Bytes, Option<OwnedSemaphorePermit>), Reject> {
    let too_large = || {
        Reject::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
            format!("body is larger than {max} bytes"),
        )
    };
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len = len
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                Reject::new(
                    StatusCode::BAD_REQUEST,
                    "bad content-length",
                    "invalid Content-Length",
                )
            })?;
        if len > max as u64 {
            return Err(too_large());
        }
        // all of it up front: hyper ends the body at the announced length
        let reserved = match budget.take(len as usize) {
            Ok(r) => r,
            Err(refused) => {
                // read and drop it (at most `max` bytes, never held): a
                // sender still writing when the connection closes would
                // see a reset instead of the 503
                let mut body = Limited::new(body, max);
                while let Some(Ok(_)) = body.frame().await {}
                return Err(refused);
            }
        };
        return match Limited::new(body, max).collect().await {
            Ok(collected) => Ok((collected.to_bytes(), reserved)),
            Err(e) => Err(read_error(e, too_large)),
        };
    }
    // no length: reserve chunk by chunk as they arrive
    let mut body = Limited::new(body, max);
    let mut buf = bytes::BytesMut::new();
    let mut reserved: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| read_error(e, too_large))?;
        if let Ok(data) = frame.into_data() {
            if let Some(p) = budget.take(data.len())? {
                match &mut reserved {
                    Some(r) => r.merge(p),
                    None => reserved = Some(p),
                }
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((buf.freeze(), reserved))
}

fn read_error(
    e: Box<dyn std::error::Error + Send + Sync>,
    too_large: impl Fn() -> Reject,
) -> Reject {
    if e.downcast_ref::<LengthLimitError>().is_some() {
        return too_large();
    }
    // the listener's body idle timeout
    let timed_out = std::iter::successors(Some(&*e as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .any(|e| e.to_string().contains("timed out") || e.to_string().contains("timeout"));
    if timed_out {
        Reject::new(
            StatusCode::REQUEST_TIMEOUT,
            "body read timed out",
            "the request body stopped arriving",
        )
    } else {
        Reject::new(
            StatusCode::BAD_REQUEST,
            "body read failed",
            "could not read the request body",
        )
    }
}

/// Refuse a body that says it is not JSON.
fn check_content_type(headers: &HeaderMap) -> Result<(), Reject> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = v.to_str().unwrap_or("");
    let media = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json = media == "application/json"
        || media == "text/json"
        || (media.ends_with("+json") && media.contains('/'));
    if json {
        return Ok(());
    }
    let shown: String = text.chars().take(100).collect();
    Err(Reject::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "not JSON",
        format!("content type `{shown}` is not JSON; send `application/json`"),
    ))
}

/// A path axum can mount as it is (it panics on some): literal segments
/// only, no captures or wildcards.
fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must start with `/`");
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces");
    }
    if path.contains(['{', '}', '?', '#']) {
        return Err("must not contain `{`, `}`, `?` or `#`");
    }
    if path.split('/').any(|seg| seg.starts_with([':', '*'])) {
        return Err("segments must not start with `:` or `*`");
    }
    Ok(())
}

/// The correlation id sent by the caller, when it is one we can pass on.
fn inbound_correlation_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(CORRELATION_HEADER)?.to_str().ok()?.trim();
    let sane = !v.is_empty()
        && v.len() <= MAX_CORRELATION_LEN
        && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    sane.then(|| v.to_owned())
}

/// The event id from the id header: absent or blank is `None`.
fn header_event_id(headers: &HeaderMap, name: &HeaderName) -> Result<Option<String>, Reject> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        Reject::new(
            StatusCode::BAD_REQUEST,
            "bad id header",
            format!("header `{name}` {why}"),
        )
    };
    let v = v
        .to_str()
        .map_err(|_| bad("is not printable ASCII"))?
        .trim();
    if v.is_empty() {
        return Ok(None);
    }
    if v.len() > MAX_ID_LEN {
        return Err(bad(&format!("is longer than {MAX_ID_LEN} characters")));
    }
    Ok(Some(v.to_owned()))
}

/// Run `id_field` on one object; it must give a string or a number.
fn field_id(program: &Program, value: &Value, index: Option<usize>) -> Result<String, Reject> {
    let at = match index {
        Some(i) => format!(" for element {i}"),
        None => String::new(),
    };
    let bad = |m: String| Reject::new(StatusCode::BAD_REQUEST, "id_field failed", m);
    // `$event` is not known yet (its id is what we compute): give null.
    match program.run_one(value.clone(), Value::Null, &[]) {
        Ok(Value::String(s)) if !s.is_empty() => Ok(s),
        Ok(Value::Number(n)) => Ok(n.to_string()),
        Ok(other) => Err(bad(format!(
            "id_field `{}`{at} gave {}, expected a non-empty string or a number",
            program.code(),
            kind_of(&other)
        ))),
        Err(e) => Err(bad(format!(
            "id_field `{}`{at} failed: {e}",
            program.code()
        ))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "an empty string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let a: Value =
            serde_json::from_str(r#"{"b": [1, {"z": 1, "a": "x"}], "a": null}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":null,"b":[1,{"a":"x","z":1}]}"#).unwrap();
        let (mut ta, mut tb) = (String::new(), String::new());
        canonical_json(&a, &mut ta);
        canonical_json(&b, &mut tb);
        assert_eq!(ta, r#"{"a":null,"b":[1,{"a":"x","z":1}]}"#);
        assert_eq!(ta, tb);
    }

    #[test]
    fn correlation_id_sanity() {
        let mut h = HeaderMap::new();
        assert_eq!(inbound_correlation_id(&h), None);
        h.insert(CORRELATION_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(inbound_correlation_id(&h).as_deref(), Some("abc-123"));
        h.insert(
            CORRELATION_HEADER,
            HeaderValue::from_str(&"x".repeat(201)).unwrap(),
        );
        assert_eq!(inbound_correlation_id(&h), None);
        h.insert(CORRELATION_HEADER, HeaderValue::from_static("  "));
        assert_eq!(inbound_correlation_id(&h), None);
        h.insert(
            CORRELATION_HEADER,
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert_eq!(inbound_correlation_id(&h), None);
    }
}
