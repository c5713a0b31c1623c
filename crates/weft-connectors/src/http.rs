//! The HTTP sink: one request per delivery to the system's API (two with
//! `mode: upsert_lookup`).
//!
//! ```yaml
//! sink:
//!   http:
//!     url: https://crm.example.com/api/contacts          # create
//!     mode: upsert_lookup
//!     lookup_url: https://crm.example.com/api/contacts/by-email/{email}
//!     update_url: https://crm.example.com/api/contacts/{_found.id}
//!     method: PATCH                                      # update (default PUT)
//!     headers: {Authorization: "Bearer ${CRM_TOKEN}"}
//!     success_when: .ok == true
//!     success_when_failure: permanent
//!     retry_on: [409]
//!     permanent_on: [503]
//!     capture_id: .data.id
//! ```
//!
//! # Request
//!
//! - **URL** from the `url` template: `{field}` and `{a.b}` placeholders are
//!   filled from the payload (strings as they are, numbers formatted; a
//!   numeric segment indexes an array, `{items.0.id}`) and percent-encoded
//!   as a path segment (everything but `A-Z a-z 0-9 - . _ ~`). A missing
//!   field, a value that is not a string or number, an empty value, or `.`
//!   / `..` (which would climb the path) is a permanent error naming the
//!   placeholder. The template's syntax is checked in [`HttpSink::new`].
//! - **Method** `method`; **body** the payload as JSON.
//! - **Headers**: `cfg.headers` first, then weft's, which win:
//!   `Idempotency-Key` (the delivery's key, the same on every attempt),
//!   `X-Correlation-Id` and `X-Causation-Id` (the event id).
//!   `Content-Type` is `application/json` unless the config sets one,
//!   which is sent as it is (never replaced).
//! - **CloudEvents** (`cloudevents`, default off; attributes in
//!   [`weft_core::event::Outbound`]: `id` the idempotency key, `source`
//!   `weft/<flow>`, `type` `weft.<flow>`, `subject` the entity key, `time`
//!   the event's): `binary` adds `ce-specversion`, `ce-id`, `ce-source`,
//!   `ce-type`, `ce-time`, `ce-subject`, `ce-correlationid`,
//!   `ce-causationid` (values percent-encoded as the HTTP binding says),
//!   the body stays the payload and `Content-Type` its content type;
//!   `structured` sends the whole event as
//!   `application/cloudevents+json; charset=utf-8` with the payload in
//!   `data`. `weft validate` refuses a configured `Content-Type` or `ce-*`
//!   header that would contradict the mode.
//! - **Timeouts** `timeout` (whole request, response body included) and
//!   `connect_timeout`. Redirects are not followed (a `POST` must not turn
//!   into a `GET`): a 3xx is a permanent error.
//!
//! # Result
//!
//! - 2xx, with the whole response read: `Ok`, unless `success_when` says
//!   otherwise (below).
//! - 408, 429, 5xx, connect errors, timeouts, a connection closed before or
//!   during the response: retryable. A retryable status with a
//!   `Retry-After` (delay seconds or an HTTP date) sets
//!   [`SinkError::retry_after`].
//! - Any other status: permanent.
//! - **Overrides** per destination: a status in `permanent_on` is
//!   permanent, one in `retry_on` retryable, whatever the default (only
//!   300-599; `weft validate` refuses a code in both lists). E.g. an API
//!   answering `409` while a parent record is still being created:
//!   `retry_on: [409]`; one answering `503` for "account suspended":
//!   `permanent_on: [503]`.
//!
//! Error messages carry the status and at most 200 characters of the
//! response body; never the request payload, the filled URL (it holds
//! payload values) or a header value.
//!
//! # Business outcome: `success_when`
//!
//! Many APIs answer `200` with `{"ok": false, "error": ...}`. `success_when`
//! is a jq predicate run on the body of a 2xx (its JSON, or its text as a
//! string when it is not JSON; at most [`MAX_RESPONSE_BYTES`]); `$event`
//! holds `id`, `correlationid`, `idempotency_key` and `attempt`. False,
//! null, no output or a jq error make the write a failure (retryable, or
//! permanent with `success_when_failure: permanent`) whose message names
//! the status and the predicate and quotes the start of the body, e.g.
//! `HTTP 200 OK, but success_when ``.ok`` is false: {"ok":false,...}`.
//! The program is compiled by `weft validate`, which reports a syntax error
//! with its line.
//!
//! # Create or update: `mode: upsert_lookup`
//!
//! For APIs without an upsert endpoint. Per delivery:
//! 1. `GET lookup_url` (a template like `url`), with the configured headers
//!    and the correlation headers but no body and no idempotency key;
//! 2. `404`: create, `method_create` (default `POST`) to `url`;
//! 3. 2xx: update, `method` (default `PUT` in this mode) to `update_url`
//!    (default `lookup_url`), whose placeholders may also use
//!    `{_found.<field>}` from the lookup's JSON answer;
//! 4. any other lookup status fails like a write would (`lookup: HTTP ...`),
//!    and nothing is written.
//!
//! The create or the update carries the delivery's `Idempotency-Key`, the
//! same for both: a create whose answer was lost is found by the retry's
//! lookup and becomes an update, so the destination sees one record.
//! Status overrides and `success_when` apply to the write.
//!
//! # The destination's id: `capture_id`
//!
//! A jq program over the write's response body (falling back to the record
//! the lookup found, e.g. on a `204`) giving the id the destination
//! assigned, a string or a number. It is logged at debug level with the
//! correlation id and returned with the delivery's result
//! ([`Written::external_id`]); the runtime commits it to the crosswalk in
//! the same transaction as the delivered state. Not finding an id does not
//! fail the write.
//!
//! # Batches
//!
//! A batch is sent with up to [`MAX_IN_FLIGHT`] requests at once, except
//! that deliveries with the same entity key go one after the other in batch
//! order; once one of them fails, the later ones for that key are not sent
//! (retryable), so a retry can never overtake them. Results come back one
//! per delivery, in batch order.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::future::BoxFuture;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use weft_core::ErrorKind;
use weft_core::config::raw::{CloudEventsMode, HttpFailureKind, HttpSinkConfig, HttpSinkMode};
use weft_core::event::{CAUSATION_HEADER, CORRELATION_HEADER, IDEMPOTENCY_HEADER, Outbound};
use weft_core::mapping::Program;

use crate::sink::{Delivery, Sink, SinkError, WriteResult, Written};

/// Most requests of one batch in flight at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// Most characters of a response body quoted in an error.
const BODY_SNIPPET_CHARS: usize = 200;
/// Largest response body read for `success_when`, `capture_id` or a lookup.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The CloudEvents attributes of a delivery.
pub fn outbound(d: &Delivery) -> Outbound<'_> {
    Outbound {
        idempotency_key: &d.idempotency_key,
        flow: &d.context.flow,
        entity_key: d.entity_key.as_deref(),
        time_ms: d.context.event_time_ms,
        correlation_id: &d.correlation_id,
        event_id: &d.event_id,
    }
}

/// Bytes percent-encoded in a `ce-*` header value (the CloudEvents HTTP
/// binding: space, `"`, `%` and everything outside printable ASCII).
const CE_HEADER: &AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'%')
    .add(0x7f);

/// The structured mode's content type.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json; charset=utf-8";

/// Bytes encoded in a placeholder's value: all but RFC 3986's unreserved.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Writes deliveries as HTTP requests.
pub struct HttpSink {
    client: reqwest::Client,
    method: Method,
    template: Vec<Part>,
    headers: HeaderMap,
    timeout: Duration,
    connect_timeout: Duration,
    success_when: Option<Program>,
    success_when_failure: ErrorKind,
    retry_on: Vec<u16>,
    permanent_on: Vec<u16>,
    upsert: Option<Upsert>,
    capture_id: Option<Program>,
    /// Writes as CloudEvents, in this content mode.
    cloudevents: Option<CloudEventsMode>,
    /// The config sets `Content-Type` (sent as it is).
    content_type_set: bool,
    /// The configured header values and the secrets inside them (a bearer
    /// token, a Basic password), masked out of every error: a destination
    /// may echo the request's credentials in its error body.
    credentials: Vec<String>,
}

/// `mode: upsert_lookup` (with a lookup) or `by_id` (without).
struct Upsert {
    lookup: Option<Vec<Part>>,
    update: Vec<Part>,
    method_create: Method,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("method", &self.method)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    /// A placeholder: its text (without braces) and its path.
    Field(String, Vec<String>),
}

impl HttpSink {
    pub fn new(
        cfg: &HttpSinkConfig,
        method: &str,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let template = url_template(&cfg.url)?;
        let parse_method = |m: &str| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("`{m}` is not an HTTP method"))
        };
        let method = parse_method(method)?;
        let upsert = match cfg.mode.unwrap_or_default() {
            HttpSinkMode::Request => None,
            HttpSinkMode::UpsertLookup => {
                let lookup_text = cfg
                    .lookup_url
                    .as_deref()
                    .ok_or("`mode: upsert_lookup` needs `lookup_url`")?;
                let lookup = url_template(lookup_text).map_err(|e| format!("lookup_url: {e}"))?;
                let update = match cfg.update_url.as_deref() {
                    Some(u) => url_template(u).map_err(|e| format!("update_url: {e}"))?,
                    None => lookup.clone(),
                };
                Some(Upsert {
                    lookup: Some(lookup),
                    update,
                    method_create: parse_method(cfg.method_create.as_deref().unwrap_or("POST"))?,
                })
            }
            HttpSinkMode::ById => {
                let update_text = cfg
                    .update_url
                    .as_deref()
                    .ok_or("`mode: by_id` needs `update_url` (e.g. `https://erp.example.com/customers/{_id}`)")?;
                Some(Upsert {
                    lookup: None,
                    update: url_template(update_text).map_err(|e| format!("update_url: {e}"))?,
                    method_create: parse_method(cfg.method_create.as_deref().unwrap_or("POST"))?,
                })
            }
        };
        let compile = |what: &str, code: Option<&str>| {
            code.map(|c| Program::compile(c, &[]).map_err(|e| format!("{what}: invalid jq: {e}")))
                .transpose()
        };
        let success_when = compile(
            "success_when",
            cfg.success_when.as_ref().map(|c| c.value.as_str()),
        )?;
        let capture_id = compile(
            "capture_id",
            cfg.capture_id.as_ref().map(|c| c.value.as_str()),
        )?;
        let success_when_failure = match cfg.success_when_failure {
            Some(HttpFailureKind::Permanent) => ErrorKind::Permanent,
            Some(HttpFailureKind::Retryable) | None => ErrorKind::Retryable,
        };
        for code in cfg.retry_on.iter().chain(&cfg.permanent_on) {
            if !(300..=599).contains(code) {
                return Err(format!(
                    "retry_on/permanent_on: `{code}` is not a non-2xx status from 300 to 599"
                ));
            }
        }
        let mut headers = HeaderMap::new();
        let mut credentials = Vec::new();
        for (name, value) in &cfg.headers {
            credentials.extend(secrets_in(value.expose()));
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("headers: `{name}` is not a valid header name"))?;
            let mut v = HeaderValue::from_str(value.expose()).map_err(|_| {
                format!("headers: the value of `{name}` is not a valid header value")
            })?;
            v.set_sensitive(true);
            headers.append(n, v);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("weft/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(HttpSink {
            client,
            method,
            template,
            headers,
            timeout,
            connect_timeout,
            success_when,
            success_when_failure,
            retry_on: cfg.retry_on.clone(),
            permanent_on: cfg.permanent_on.clone(),
            upsert,
            capture_id,
            cloudevents: cfg.cloudevents,
            content_type_set: cfg
                .headers
                .keys()
                .any(|k| k.eq_ignore_ascii_case("content-type")),
            credentials,
        })
    }

    /// The request URL for `payload`: the template with its placeholders
    /// filled. Errors are permanent (the payload will not change).
    pub fn render_url(&self, payload: &Value) -> Result<Url, SinkError> {
        render(&self.template, payload, "url")
    }

    /// Headers of a request; `write` adds the body's content type and the
    /// idempotency key (a lookup `GET` has neither).
    fn request_headers(&self, d: &Delivery, write: bool) -> Result<HeaderMap, SinkError> {
        let mut h = self.headers.clone();
        if write {
            match self.cloudevents {
                Some(CloudEventsMode::Structured) => {
                    h.insert(CONTENT_TYPE, HeaderValue::from_static(CLOUDEVENTS_JSON));
                }
                mode => {
                    if !self.content_type_set {
                        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    }
                    if mode == Some(CloudEventsMode::Binary) {
                        for (name, value) in outbound(d).attributes() {
                            let v = utf8_percent_encode(&value, CE_HEADER).to_string();
                            let v = HeaderValue::from_str(&v).map_err(|_| {
                                SinkError::permanent(format!(
                                    "the CloudEvents attribute `{name}` is not a valid header value"
                                ))
                            })?;
                            let n = HeaderName::from_bytes(format!("ce-{name}").as_bytes())
                                .map_err(|_| SinkError::permanent("bad CloudEvents header name"))?;
                            h.insert(n, v);
                        }
                    }
                }
            }
            let key = HeaderValue::from_str(&d.idempotency_key).map_err(|_| {
                SinkError::permanent("the idempotency key is not a valid header value")
            })?;
            h.insert(HeaderName::from_static(IDEMPOTENCY_HEADER), key);
        }
        // tracing headers are best effort: an odd id is left out, not fatal
        if let Ok(v) = HeaderValue::from_str(&d.correlation_id) {
            h.insert(HeaderName::from_static(CORRELATION_HEADER), v);
        }
        if let Ok(v) = HeaderValue::from_str(&d.event_id) {
            h.insert(HeaderName::from_static(CAUSATION_HEADER), v);
        }
        // the trace context the record arrived with (W3C Trace Context)
        if let Some(t) = d
            .context
            .traceparent
            .as_deref()
            .filter(|t| weft_core::event::valid_traceparent(t))
            && let Ok(v) = HeaderValue::from_str(t)
        {
            h.insert(HeaderName::from_static("traceparent"), v);
            if let Some(s) = d.context.tracestate.as_deref()
                && weft_core::event::valid_tracestate(s)
                && let Ok(v) = HeaderValue::from_str(s)
            {
                h.insert(HeaderName::from_static("tracestate"), v);
            }
        }
        Ok(h)
    }

    /// Send one delivery.
    pub async fn send(&self, d: &Delivery) -> WriteResult {
        let mut result = self.try_send(d).await;
        if let Err(e) = &mut result {
            e.message = weft_core::config::entities::redact(&e.message, &self.credentials);
        }
        match &result {
            Ok(_) => tracing::debug!(delivery = d.id, attempt = d.attempt, "http sink: delivered"),
            Err(e) => tracing::debug!(
                delivery = d.id,
                attempt = d.attempt,
                kind = ?e.kind,
                error = %e.message,
                "http sink: failed"
            ),
        }
        result
    }

    async fn try_send(&self, d: &Delivery) -> WriteResult {
        let Some(u) = &self.upsert else {
            let url = self.render_url(&d.payload)?;
            let (status, body) = self.write_request(self.method.clone(), url, d).await?;
            return Ok(self.capture(d, status, body.as_ref(), None, None));
        };
        let Some(lookup) = &u.lookup else {
            // by_id: `_id` decides; it is weft's, not the destination's field
            let id = d.payload.get("_id").filter(|v| !v.is_null()).cloned();
            let mut body = d.clone();
            if let Value::Object(m) = &mut body.payload {
                m.remove("_id");
            }
            return match id {
                None => {
                    let url = self.render_url(&body.payload)?;
                    let (status, resp) = self
                        .write_request(u.method_create.clone(), url, &body)
                        .await?;
                    Ok(self.capture(d, status, resp.as_ref(), None, Some(true)))
                }
                Some(_) => {
                    let url = render(&u.update, &d.payload, "update_url")?;
                    let (status, resp) =
                        self.write_request(self.method.clone(), url, &body).await?;
                    Ok(self.capture(d, status, resp.as_ref(), None, Some(false)))
                }
            };
        };
        // upsert_lookup: find, then create or update
        let lookup_url = render(lookup, &d.payload, "lookup_url")?;
        let response = self
            .client
            .get(lookup_url)
            .headers(self.request_headers(d, false)?)
            .send()
            .await
            .map_err(|e| self.transport_error(e, "sending the lookup"))?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            drop(response);
            let url = self.render_url(&d.payload)?;
            let (status, body) = self.write_request(u.method_create.clone(), url, d).await?;
            return Ok(self.capture(d, status, body.as_ref(), None, Some(true)));
        }
        if !status.is_success() {
            return Err(self.status_error(response, "lookup: ").await);
        }
        let found = match read_limited(response, MAX_RESPONSE_BYTES).await {
            Ok(Some(bytes)) => response_value(&bytes),
            Ok(None) => {
                return Err(SinkError::permanent(format!(
                    "lookup: the {status} response is larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            Err(e) => return Err(self.transport_error(e, "reading the lookup response")),
        };
        let mut ctx = match &d.payload {
            Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        ctx.insert("_found".into(), found.clone());
        let url = render(&u.update, &Value::Object(ctx), "update_url")?;
        let (status, body) = self.write_request(self.method.clone(), url, d).await?;
        Ok(self.capture(d, status, body.as_ref(), Some(&found), Some(false)))
    }

    /// Send the payload with `method` to `url` and judge the answer: status
    /// (with `retry_on` / `permanent_on`), then `success_when`. Gives the
    /// parsed response body when `success_when` or `capture_id` needs it,
    /// with the status it came with.
    async fn write_request(
        &self,
        method: Method,
        url: Url,
        d: &Delivery,
    ) -> Result<(StatusCode, Option<Value>), SinkError> {
        let headers = self.request_headers(d, true)?;
        let body = match self.cloudevents {
            Some(CloudEventsMode::Structured) => {
                serde_json::to_vec(&outbound(d).structured(&d.payload))
            }
            _ => serde_json::to_vec(&d.payload),
        }
        .map_err(|e| SinkError::permanent(format!("cannot serialise the payload: {e}")))?;
        let response = self
            .client
            .request(method, url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(e, "sending the request"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.status_error(response, "").await);
        }
        // read the whole answer: a connection cut mid-response is not a success
        let reading = format!("reading the {status} response");
        if self.success_when.is_none() && self.capture_id.is_none() {
            let mut response = response;
            loop {
                match response.chunk().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok((status, None)),
                    Err(e) => return Err(self.transport_error(e, &reading)),
                }
            }
        }
        let bytes = read_limited(response, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| self.transport_error(e, &reading))?;
        let Some(bytes) = bytes else {
            if self.success_when.is_some() {
                return Err(self.business_failure(
                    status,
                    format!(
                        "HTTP {status}, but the response is larger than {MAX_RESPONSE_BYTES} bytes: \
                         success_when cannot be checked"
                    ),
                ));
            }
            tracing::warn!(
                delivery = d.id,
                correlation_id = %d.correlation_id,
                "http sink: response too large for capture_id"
            );
            return Ok((status, None));
        };
        let value = response_value(&bytes);
        if let Some(p) = &self.success_when {
            let verdict = p.test(value.clone(), event_attrs(d));
            let why = match verdict {
                Ok(true) => None,
                Ok(false) => Some(format!("success_when `{}` is false", p.code())),
                Err(e) => Some(format!("success_when `{}` failed: {e}", p.code())),
            };
            if let Some(why) = why {
                let mut message = format!("HTTP {status}, but {why}");
                let snippet = snippet_of(&bytes);
                if !snippet.is_empty() {
                    message.push_str(": ");
                    message.push_str(&snippet);
                }
                return Err(self.business_failure(status, message));
            }
        }
        Ok((status, Some(value)))
    }

    /// A 2xx answer `success_when` refused: the status is kept with it.
    fn business_failure(&self, status: StatusCode, message: String) -> SinkError {
        let mut e = match self.success_when_failure {
            ErrorKind::Permanent => SinkError::permanent(message),
            _ => SinkError::retryable(message),
        };
        e.status = Some(status.as_u16());
        e
    }

    /// Whether a non-2xx status is worth retrying: `permanent_on`, then
    /// `retry_on`, then the default (408, 429, 5xx).
    pub fn is_retryable_status(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        if self.permanent_on.contains(&code) {
            false
        } else if self.retry_on.contains(&code) {
            true
        } else {
            status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error()
        }
    }

    /// The error for a non-2xx answer, with a snippet of its body.
    async fn status_error(&self, response: reqwest::Response, what: &str) -> SinkError {
        let status = response.status();
        let retryable = self.is_retryable_status(status);
        let retry_after = if retryable {
            parse_retry_after(response.headers(), SystemTime::now())
        } else {
            None
        };
        let snippet = body_snippet(response).await;
        let mut message = format!("{what}HTTP {status}");
        if !snippet.is_empty() {
            message.push_str(": ");
            message.push_str(&snippet);
        }
        let mut err = if retryable {
            SinkError::retryable(message)
        } else {
            SinkError::permanent(message)
        };
        err.retry_after = retry_after;
        err.status = Some(status.as_u16());
        err
    }

    /// Run `capture_id` over the write's response (else over the record the
    /// lookup found): the string or number it yields is the destination's id.
    fn capture(
        &self,
        d: &Delivery,
        status: StatusCode,
        response: Option<&Value>,
        found: Option<&Value>,
        created: Option<bool>,
    ) -> Written {
        let answered = Written {
            status: Some(status.as_u16()),
            ..Written::default()
        };
        let Some(p) = &self.capture_id else {
            return answered;
        };
        let run = |v: &Value| match p.run(v.clone(), event_attrs(d), &[]) {
            Ok(out) => out.into_iter().find_map(|v| match v {
                Value::String(s) if !s.is_empty() => Some(s),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
            Err(_) => None,
        };
        let id = response.and_then(run).or_else(|| found.and_then(run));
        let Some(external_id) = id else {
            tracing::debug!(
                delivery = d.id,
                correlation_id = %d.correlation_id,
                capture_id = p.code(),
                "http sink: capture_id gave no id"
            );
            return answered;
        };
        tracing::debug!(
            delivery = d.id,
            correlation_id = %d.correlation_id,
            external_id = %external_id,
            created = ?created,
            "http sink: captured the destination's id"
        );
        Written {
            external_id: Some(external_id),
            ..answered
        }
    }

    /// A failure below HTTP status level: retryable, except a request that
    /// could not even be built.
    fn transport_error(&self, e: reqwest::Error, doing: &str) -> SinkError {
        let e = e.without_url();
        let what = if e.is_timeout() && e.is_connect() {
            format!(
                "timed out connecting (connect timeout {:?})",
                self.connect_timeout
            )
        } else if e.is_timeout() {
            format!("timed out {doing} (timeout {:?})", self.timeout)
        } else if e.is_connect() {
            format!("cannot connect: {}", error_chain(&e))
        } else {
            format!("failed {doing}: {}", error_chain(&e))
        };
        if e.is_builder() {
            SinkError::permanent(what).with_source(e)
        } else {
            SinkError::retryable(what).with_source(e)
        }
    }
}

impl Sink for HttpSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(async move {
            // chains of deliveries that must go in order (same entity key)
            let mut chains: Vec<Vec<usize>> = Vec::new();
            let mut by_key: HashMap<&str, usize> = HashMap::new();
            for (i, d) in batch.iter().enumerate() {
                match &d.entity_key {
                    Some(k) => match by_key.get(k.as_str()) {
                        Some(&c) => chains[c].push(i),
                        None => {
                            by_key.insert(k, chains.len());
                            chains.push(vec![i]);
                        }
                    },
                    None => chains.push(vec![i]),
                }
            }
            let runs = chains.into_iter().map(|chain| async move {
                let mut out = Vec::with_capacity(chain.len());
                let mut failed = false;
                for i in chain {
                    let r = if failed {
                        Err(SinkError::retryable(
                            "not sent: an earlier delivery with the same entity key failed",
                        ))
                    } else {
                        self.send(&batch[i]).await
                    };
                    failed |= r.is_err();
                    out.push((i, r));
                }
                out
            });
            let done: Vec<Vec<(usize, WriteResult)>> = futures::stream::iter(runs)
                .buffer_unordered(MAX_IN_FLIGHT)
                .collect()
                .await;
            let mut results: Vec<Option<WriteResult>> = (0..batch.len()).map(|_| None).collect();
            for (i, r) in done.into_iter().flatten() {
                results[i] = Some(r);
            }
            results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(SinkError::retryable("internal: no result"))))
                .collect()
        })
    }

    fn max_write_time(&self, batch_len: usize) -> Duration {
        // one request per delivery (two with a lookup), MAX_IN_FLIGHT at a time
        let rounds = (batch_len.div_ceil(MAX_IN_FLIGHT) as u32).max(1) * 2;
        (self.timeout + self.connect_timeout) * rounds + Duration::from_secs(30)
    }
}

/// Parse a URL template and check it is an http(s) URL whatever the
/// placeholders hold.
fn url_template(t: &str) -> Result<Vec<Part>, String> {
    let template = parse_template(t)?;
    let probe: String = template
        .iter()
        .map(|p| match p {
            Part::Lit(s) => s.as_str(),
            Part::Field(..) => "x",
        })
        .collect();
    let probe = Url::parse(&probe).map_err(|e| format!("url `{t}`: {e}"))?;
    if !matches!(probe.scheme(), "http" | "https") {
        return Err(format!("url `{t}`: must start with http:// or https://"));
    }
    Ok(template)
}

/// Fill a URL template from `ctx`. Errors are permanent and name the
/// template (`what`) and the placeholder, never the value.
fn render(template: &[Part], ctx: &Value, what: &str) -> Result<Url, SinkError> {
    let mut url = String::new();
    for part in template {
        match part {
            Part::Lit(s) => url.push_str(s),
            Part::Field(name, path) => {
                let text = placeholder_value(ctx, path).map_err(|why| {
                    let what = if what == "url" { "URL" } else { what };
                    SinkError::permanent(format!("{what} placeholder `{{{name}}}`: {why}"))
                })?;
                url.extend(utf8_percent_encode(&text, SEGMENT));
            }
        }
    }
    Url::parse(&url).map_err(|e| {
        SinkError::permanent(format!(
            "the filled {what} template is not a valid URL: {e}"
        ))
    })
}

/// `$event` of `success_when` and `capture_id`.
fn event_attrs(d: &Delivery) -> Value {
    serde_json::json!({
        "id": d.event_id,
        "correlationid": d.correlation_id,
        "idempotency_key": d.idempotency_key,
        "attempt": d.attempt,
    })
}

/// A response body as programs see it: its JSON, else its text as a string.
fn response_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// The whole body, or `None` when it is longer than `max` bytes.
async fn read_limited(
    mut response: reqwest::Response,
    max: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(c) = response.chunk().await? {
        if buf.len() + c.len() > max {
            return Ok(None);
        }
        buf.extend_from_slice(&c);
    }
    Ok(Some(buf))
}

/// Split a URL template into literal text and `{a.b}` placeholders.
fn parse_template(t: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut chars = t.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for (j, c) in chars.by_ref() {
                    match c {
                        '}' => {
                            closed = true;
                            break;
                        }
                        '{' => {
                            return Err(format!(
                                "url `{t}`: `{{` at byte {j} inside the placeholder opened at byte {i}"
                            ));
                        }
                        c => name.push(c),
                    }
                }
                if !closed {
                    return Err(format!("url `{t}`: `{{` at byte {i} is never closed"));
                }
                let path: Vec<String> = name.split('.').map(str::to_owned).collect();
                let ok = path.iter().all(|s| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                });
                if !ok {
                    return Err(format!(
                        "url `{t}`: placeholder `{{{name}}}` must be field names \
                         (letters, digits, `_`, `-`) separated by `.`"
                    ));
                }
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Field(name, path));
            }
            '}' => return Err(format!("url `{t}`: `}}` at byte {i} has no matching `{{`")),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        parts.push(Part::Lit(lit));
    }
    Ok(parts)
}

/// The text a placeholder stands for, or why there is none.
fn placeholder_value(payload: &Value, path: &[String]) -> Result<String, String> {
    let mut v = payload;
    for (n, seg) in path.iter().enumerate() {
        let next = match v {
            Value::Object(m) => m.get(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        v = next.ok_or_else(|| {
            format!(
                "field `{}` is missing from the payload",
                path[..=n].join(".")
            )
        })?;
    }
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Null => return Err("the field is null".into()),
        Value::Bool(_) => return Err("the field is a boolean, expected a string or number".into()),
        Value::Array(_) => return Err("the field is an array, expected a string or number".into()),
        Value::Object(_) => {
            return Err("the field is an object, expected a string or number".into());
        }
    };
    match text.as_str() {
        "" => Err("the field is an empty string".into()),
        "." | ".." => Err(format!(
            "the field is `{text}`, which would change the path"
        )),
        _ => Ok(text),
    }
}

/// `Retry-After` as delay seconds or an HTTP date (a past date is zero).
fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// At most [`BODY_SNIPPET_CHARS`] characters of the response body, on one
/// line; whatever could be read.
async fn body_snippet(mut response: reqwest::Response) -> String {
    let mut buf: Vec<u8> = Vec::new();
    // 4 bytes per char at most
    while buf.len() < BODY_SNIPPET_CHARS * 4 {
        match response.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            Ok(None) | Err(_) => break,
        }
    }
    snippet_of(&buf)
}

/// At most [`BODY_SNIPPET_CHARS`] characters of `bytes` as text, on one line.
fn snippet_of(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .trim()
        .chars()
        .take(BODY_SNIPPET_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().chars().count() > BODY_SNIPPET_CHARS {
        out.push('…');
    }
    out
}

/// What to mask of one header value: the value, each of its words (the
/// token of `Bearer <token>`), and the `user:password` and password of a
/// `Basic` value.
fn secrets_in(value: &str) -> Vec<String> {
    use base64::Engine;
    let mut out = vec![value.to_owned()];
    let words: Vec<&str> = value.split_whitespace().collect();
    for w in &words {
        out.push((*w).to_owned());
    }
    if let [scheme, encoded] = words[..]
        && scheme.eq_ignore_ascii_case("basic")
        && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(encoded)
        && let Ok(text) = String::from_utf8(bytes)
    {
        if let Some((_, password)) = text.split_once(':') {
            out.push(password.to_owned());
        }
        out.push(text);
    }
    // short words (`Bearer`, `Basic`) are not secrets; `redact` skips
    // anything shorter than its minimum, and the scheme names here
    out.retain(|w| !["bearer", "basic", "token"].contains(&w.to_ascii_lowercase().as_str()));
    out
}

/// An error and its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// `weft check` for an HTTP sink: a `HEAD` on the URL up to its first
/// placeholder, with the configured headers (see [`crate::probe`]). Only
/// an unreachable host, a TLS failure, 401 or 403 fail it.
pub async fn probe(
    cfg: &HttpSinkConfig,
    connect_timeout: Duration,
    timeout: Duration,
) -> crate::probe::Finding {
    use crate::probe::Finding;
    let fixed = cfg.url.split('{').next().unwrap_or_default();
    let url = match Url::parse(fixed) {
        Ok(u) => u,
        Err(e) => return Finding::fail(format!("the URL does not parse: {e}")),
    };
    let mut shown = url.clone();
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    shown.set_query(None);
    let mut headers = HeaderMap::new();
    for (k, v) in &cfg.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v.expose()),
        ) else {
            return Finding::fail(format!("header `{k}` is not a valid header"));
        };
        headers.insert(name, value);
    }
    let client = match reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => return Finding::fail(format!("cannot build an HTTP client: {e}")),
    };
    match client.head(url).headers(headers).send().await {
        Ok(r) => {
            let s = r.status();
            if s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN {
                Finding::fail(format!(
                    "HEAD {shown} answered {s}: the credentials in `headers` are refused"
                ))
            } else {
                Finding::ok(format!("HEAD {shown} answered {s}"))
            }
        }
        Err(e) => {
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why = format!("{why}: {s}");
                src = s.source();
            }
            Finding::fail(format!("HEAD {shown} failed: {why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field(name: &str) -> Part {
        Part::Field(name.into(), name.split('.').map(str::to_owned).collect())
    }

    #[test]
    fn template_parses() {
        assert_eq!(
            parse_template("http://h/a/{id}/b/{c.d}?x={e}").unwrap(),
            vec![
                Part::Lit("http://h/a/".into()),
                field("id"),
                Part::Lit("/b/".into()),
                field("c.d"),
                Part::Lit("?x=".into()),
                field("e"),
            ]
        );
        assert_eq!(
            parse_template("http://h/x").unwrap(),
            vec![Part::Lit("http://h/x".into())]
        );
    }

    #[test]
    fn template_syntax_errors() {
        for bad in [
            "http://h/{id",
            "http://h/id}",
            "http://h/{a{b}}",
            "http://h/{}",
            "http://h/{a..b}",
            "http://h/{a b}",
            "http://h/{.a}",
        ] {
            assert!(parse_template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn placeholder_values() {
        let p = json!({"s": "a b/c", "n": 42, "f": 1.5, "o": {"k": "v"}, "l": [{"id": 7}],
                       "nul": null, "b": true, "e": "", "dd": ".."});
        let get = |path: &str| {
            placeholder_value(&p, &path.split('.').map(str::to_owned).collect::<Vec<_>>())
        };
        assert_eq!(get("s").unwrap(), "a b/c");
        assert_eq!(get("n").unwrap(), "42");
        assert_eq!(get("f").unwrap(), "1.5");
        assert_eq!(get("o.k").unwrap(), "v");
        assert_eq!(get("l.0.id").unwrap(), "7");
        assert!(get("missing").unwrap_err().contains("`missing` is missing"));
        assert!(get("o.x").unwrap_err().contains("`o.x` is missing"));
        assert!(get("s.x").is_err());
        for bad in ["nul", "b", "o", "l", "e", "dd"] {
            assert!(get(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::now();
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h, now), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = parse_retry_after(&h, now).unwrap();
        assert!(
            d > Duration::from_secs(118) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h, now), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h, now), None);
    }
}
