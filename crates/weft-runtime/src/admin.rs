//! The admin REST API under `/api/v1`, protected by a bearer token
//! (`server.admin_token`, from the environment). Without a token configured
//! every admin route answers 403 and says how to enable it.
//!
//! Routes (described in `openapi.json`, served at `/api/v1/openapi.json`):
//! - `GET  /api/v1/status`                 record accounting per flow and destination
//! - `GET  /api/v1/dlq`                    a page of dead letters; query: flow, destination, error, since (e.g. `1h`), status, after_id, limit (default 1000)
//! - `GET  /api/v1/dlq/{id}`               one entry
//! - `POST /api/v1/dlq/{id}/replay`        body (optional): `{"payload": {...}, "force": false}`
//! - `POST /api/v1/dlq/{id}/discard`
//! - `POST /api/v1/dlq/replay`             body: a filter (`flow`, `destination`, `error`, `since`, `limit`); replays every match; an empty filter only with `"all": true`
//! - `POST /api/v1/dlq/discard`            same, discards
//! - `POST /api/v1/dlq/jobs`               body: `action` (`replay`|`discard`), a filter, `chunk_size`, `pause_ms`: a background job (202)
//! - `GET  /api/v1/dlq/jobs`               the kept jobs, newest first
//! - `GET  /api/v1/dlq/jobs/{id}`          one job's progress
//! - `POST /api/v1/dlq/jobs/{id}/cancel`   stop it after its current chunk
//! - `GET  /api/v1/records/{id}`          what the store holds of the records an event id, correlation id or entity key names: every write attempt, pending rows, dead letters, destination ids; query: limit (1-1000, default 100)

// Handlers answer with a `Response` either way; boxing it on the error path
// would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use weft_core::config::{Config, Secret};
use weft_store::{DlqFilter, Journal};

use crate::dlq::DlqError;
use crate::dlq_jobs::{Jobs, JobsError};

#[derive(Clone)]
struct Admin {
    config: Arc<Config>,
    journal: Arc<dyn Journal>,
    token: Option<Secret>,
    jobs: Arc<Jobs>,
}

/// The `/api/v1` routes.
pub fn router(config: Arc<Config>, journal: Arc<dyn Journal>, jobs: Arc<Jobs>) -> Router {
    let token = config.server.admin_token.clone();
    let state = Admin {
        config,
        journal,
        token,
        jobs,
    };
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/status", get(status))
        .route("/api/v1/dlq", get(list))
        .route("/api/v1/dlq/replay", post(replay_many))
        .route("/api/v1/dlq/discard", post(discard_many))
        .route("/api/v1/dlq/jobs", get(jobs_list).post(job_start))
        .route("/api/v1/dlq/jobs/{id}", get(job_show))
        .route("/api/v1/dlq/jobs/{id}/cancel", post(job_cancel))
        .route("/api/v1/dlq/{id}", get(show))
        .route("/api/v1/dlq/{id}/replay", post(replay_one))
        .route("/api/v1/dlq/{id}/discard", post(discard_one))
        .route("/api/v1/records/{id}", get(record))
        .with_state(state)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .layer(axum::middleware::map_response(json_errors))
}

/// Every error of the admin API has a JSON body `{"error": "..."}`: also
/// the ones axum answers itself (a bad path or query parameter, a body
/// that is not JSON, a wrong method), which come as plain text.
async fn json_errors(r: Response) -> Response {
    let status = r.status();
    let is_json = r
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let (parts, body) = r.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let mut out = error(status, text);
    // keep `Allow` (405) and `Retry-After` (503)
    for (k, v) in parts.headers.iter() {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// Bearer token check: `subtle`'s constant-time compare (equal lengths and
/// bytes; the length itself is not secret).
fn authorize(a: &Admin, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &a.token else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: set server.admin_token (e.g. \"${WEFT_ADMIN_TOKEN}\")",
        ));
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let want = token.expose().as_bytes();
    let got = given.as_bytes();
    if !want.is_empty() && bool::from(subtle::ConstantTimeEq::ct_eq(want, got)) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ))
    }
}

/// Run blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Response> + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("task failed: {e}"),
        )
    })?
}

fn store_err(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn openapi() -> Response {
    let spec: Value = serde_json::from_str(include_str!("openapi.json")).unwrap_or(Value::Null);
    Json(spec).into_response()
}

async fn status(State(a): State<Admin>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    let lanes = crate::lane_list(&a.config);
    let journal = a.journal.clone();
    match blocking(move || {
        let r = journal.read();
        let counts = r.counts(&lanes).map_err(store_err)?;
        let dlq: i64 = r.dlq_depths().map_err(store_err)?.iter().map(|d| d.2).sum();
        Ok((counts, dlq))
    })
    .await
    {
        Ok((counts, dlq)) => {
            let balanced = counts.iter().all(|c| c.balanced);
            Json(json!({"lanes": counts, "dlq_depth": dlq, "balanced": balanced})).into_response()
        }
        Err(r) => r,
    }
}

/// DLQ filter as query parameters or a JSON body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilterParams {
    pub(crate) flow: Option<String>,
    pub(crate) destination: Option<String>,
    pub(crate) error: Option<String>,
    /// A duration such as `1h`: entries that failed within it.
    pub(crate) since: Option<String>,
    pub(crate) status: Option<String>,
    /// Entries with an id above this (the previous page's last id).
    pub(crate) after_id: Option<i64>,
    pub(crate) limit: Option<usize>,
    /// Bulk actions: act on every entry although the filter is empty.
    pub(crate) all: Option<bool>,
    /// Bulk replay: replay even over newer writes of the same key.
    pub(crate) force: Option<bool>,
}

impl FilterParams {
    pub(crate) fn is_empty(&self) -> bool {
        self.flow.is_none()
            && self.destination.is_none()
            && self.error.is_none()
            && self.since.is_none()
    }

    fn into_filter(self) -> Result<DlqFilter, Response> {
        self.into_filter_text()
            .map_err(|m| error(StatusCode::BAD_REQUEST, m))
    }

    /// The store's filter, or what is wrong with the parameters.
    pub(crate) fn into_filter_text(self) -> Result<DlqFilter, String> {
        if let Some(st) = &self.status
            && !["dead", "replayed", "discarded", "all"].contains(&st.as_str())
        {
            return Err(format!(
                "status `{st}` is none of dead, replayed, discarded, all"
            ));
        }
        let since = match &self.since {
            None => None,
            Some(s) => {
                let d = weft_core::config::parse_duration(s)?;
                Some(weft_store::now_ms() - d.as_millis() as i64)
            }
        };
        Ok(DlqFilter {
            flow: self.flow,
            destination: self.destination,
            error_contains: self.error,
            status: self.status,
            since,
            after_id: self.after_id,
            limit: self.limit,
        })
    }
}

async fn list(
    State(a): State<Admin>,
    headers: HeaderMap,
    Query(q): Query<FilterParams>,
) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    let filter = match q.into_filter() {
        Ok(f) => f,
        Err(r) => return r,
    };
    let journal = a.journal.clone();
    match blocking(move || journal.read().dlq_list(&filter).map_err(store_err)).await {
        Ok(entries) => Json(entries).into_response(),
        Err(r) => r,
    }
}

async fn show(State(a): State<Admin>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    let journal = a.journal.clone();
    match blocking(move || journal.read().dlq_get(id).map_err(store_err)).await {
        Ok(Some(e)) => Json(e).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no DLQ entry {id}")),
        Err(r) => r,
    }
}

/// `GET /api/v1/records/{id}`'s query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordParams {
    /// At most this many of each kind (default 100, at most 1000).
    limit: Option<usize>,
}

/// What the store holds of the records an event id, correlation id or
/// entity key names: every write attempt (newest `limit`, oldest first),
/// pending rows, dead letters, destination ids. `weft record --json` and
/// the record inspector read the same.
async fn record(
    State(a): State<Admin>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<RecordParams>,
) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit {limit}: from 1 to 1000"),
        );
    }
    let journal = a.journal.clone();
    match blocking(move || journal.read().lookup(&id, limit).map_err(store_err)).await {
        Ok(found) => Json(record_json(&found)).into_response(),
        Err(r) => r,
    }
}

/// The JSON of a record lookup: `{attempts, pending, dead, written}`
/// (pending rows without their payloads).
pub fn record_json(found: &weft_store::RecordLookup) -> Value {
    let pending: Vec<Value> = found
        .pending
        .iter()
        .map(|r| {
            json!({
                "id": r.id, "flow": r.flow, "destination": r.destination,
                "event_id": r.event_id, "correlation_id": r.correlation_id,
                "entity_key": r.entity_key, "created_at": r.created_at,
                "attempts": r.attempts, "next_at": r.next_at, "last_error": r.last_error,
            })
        })
        .collect();
    json!({
        "attempts": found.attempts,
        "pending": pending,
        "dead": found.dead,
        "written": found.written,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    /// Replaces the stored payload.
    payload: Option<Value>,
    /// Replay even though a later write of the same key was delivered.
    force: Option<bool>,
}

fn dlq_error(e: DlqError) -> Response {
    match e {
        DlqError::Store(weft_store::StoreError::NotFound(m)) => error(StatusCode::NOT_FOUND, m),
        e if e.is_user_error() => error(StatusCode::CONFLICT, e.to_string()),
        e => store_err(e),
    }
}

async fn replay_one(
    State(a): State<Admin>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Option<Json<ReplayBody>>,
) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    let (payload, force) = match body {
        Some(Json(b)) => (b.payload.map(|p| p.to_string()), b.force.unwrap_or(false)),
        None => (None, false),
    };
    let journal = a.journal.clone();
    let entry = match blocking(move || journal.read().dlq_get(id).map_err(store_err)).await {
        Ok(Some(e)) => e,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no DLQ entry {id}")),
        Err(r) => return r,
    };
    match crate::dlq::replay(&a.config, &*a.journal, &entry, payload.as_deref(), force).await {
        Ok(()) => {
            Json(json!({"replayed": [id], "correlation_id": entry.correlation_id})).into_response()
        }
        Err(e) => dlq_error(e),
    }
}

async fn discard_one(State(a): State<Admin>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    match crate::dlq::discard(&*a.journal, id, "discarded via the admin API").await {
        Ok(()) => Json(json!({"discarded": [id]})).into_response(),
        Err(e) => dlq_error(e),
    }
}

async fn replay_many(
    State(a): State<Admin>,
    headers: HeaderMap,
    body: Option<Json<FilterParams>>,
) -> Response {
    many(a, headers, body.map(|Json(b)| b).unwrap_or_default(), true).await
}

async fn discard_many(
    State(a): State<Admin>,
    headers: HeaderMap,
    body: Option<Json<FilterParams>>,
) -> Response {
    many(a, headers, body.map(|Json(b)| b).unwrap_or_default(), false).await
}

async fn many(a: Admin, headers: HeaderMap, params: FilterParams, replay: bool) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    if params.is_empty() && params.all != Some(true) {
        return error(
            StatusCode::BAD_REQUEST,
            "an empty filter matches the whole DLQ: give flow, destination, error or since, or \"all\": true",
        );
    }
    let force = params.force.unwrap_or(false);
    let filter = match params.into_filter() {
        Ok(f) => f,
        Err(r) => return r,
    };
    let journal = a.journal.clone();
    let entries = match blocking(move || journal.read().dlq_list(&filter).map_err(store_err)).await
    {
        Ok(e) => e,
        Err(r) => return r,
    };
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for e in &entries {
        let r = if replay {
            crate::dlq::replay(&a.config, &*a.journal, e, None, force).await
        } else {
            crate::dlq::discard(&*a.journal, e.id, "discarded via the admin API").await
        };
        match r {
            Ok(()) => done.push(e.id),
            Err(err) => failed.push(json!({"id": e.id, "error": err.to_string()})),
        }
    }
    let r: Result<_, Response> = Ok((done, failed));
    match r {
        Ok((done, failed)) => {
            let key = if replay { "replayed" } else { "discarded" };
            Json(json!({key: done, "failed": failed})).into_response()
        }
        Err(r) => r,
    }
}

/// A bulk job: the filter's fields, what to do, and how fast.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobBody {
    /// `replay` or `discard`.
    action: String,
    flow: Option<String>,
    destination: Option<String>,
    error: Option<String>,
    since: Option<String>,
    /// Act on every dead entry although the filter is empty.
    all: Option<bool>,
    /// Replay even over newer writes of the same key.
    force: Option<bool>,
    /// Entries between two cancel checks (default 100).
    chunk_size: Option<usize>,
    /// Pause after each chunk, ms (default 0).
    pause_ms: Option<u64>,
}

/// What the API and the dashboard both need to start a job.
pub(crate) fn job_spec(
    action: &str,
    params: FilterParams,
    chunk_size: Option<usize>,
    pause_ms: Option<u64>,
    by: &'static str,
) -> Result<crate::dlq_jobs::JobSpec, String> {
    let action = crate::dlq_jobs::Action::parse(action)
        .ok_or_else(|| format!("action `{action}` is neither replay nor discard"))?;
    if params.is_empty() && params.all != Some(true) {
        return Err("an empty filter matches the whole DLQ: give flow, destination, error or since, or \"all\": true".into());
    }
    let force = params.force.unwrap_or(false);
    let filter = params.into_filter_text()?;
    Ok(crate::dlq_jobs::JobSpec {
        action,
        filter,
        force,
        chunk_size: chunk_size.unwrap_or(100),
        pause: std::time::Duration::from_millis(pause_ms.unwrap_or(0)),
        by,
    })
}

fn jobs_error(e: JobsError) -> Response {
    match e {
        JobsError::NotFound(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        JobsError::Busy => error(StatusCode::CONFLICT, e.to_string()),
        JobsError::Invalid(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn job_start(
    State(a): State<Admin>,
    headers: HeaderMap,
    body: Option<Json<JobBody>>,
) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    let Some(Json(b)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "a JSON body is needed: {\"action\": \"replay\" | \"discard\", ...a filter}",
        );
    };
    let params = FilterParams {
        flow: b.flow,
        destination: b.destination,
        error: b.error,
        since: b.since,
        all: b.all,
        force: b.force,
        ..Default::default()
    };
    let spec = match job_spec(&b.action, params, b.chunk_size, b.pause_ms, "admin API") {
        Ok(s) => s,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    match a.jobs.start(spec) {
        Ok(p) => (StatusCode::ACCEPTED, Json(p)).into_response(),
        Err(e) => jobs_error(e),
    }
}

async fn jobs_list(State(a): State<Admin>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    Json(a.jobs.list()).into_response()
}

async fn job_show(State(a): State<Admin>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    match a.jobs.get(id) {
        Ok(p) => Json(p).into_response(),
        Err(e) => jobs_error(e),
    }
}

async fn job_cancel(State(a): State<Admin>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Err(r) = authorize(&a, &headers) {
        return r;
    }
    match a.jobs.cancel(id) {
        Ok(p) => Json(p).into_response(),
        Err(e) => jobs_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// P1-22: the store failing (a commit rolled back, a full disk) is a
    /// 500, not a 409 Conflict: the caller did nothing wrong; a refused or
    /// invalid request stays a 409, a missing entry a 404.
    #[test]
    fn p1_22_a_failing_store_is_a_server_error_not_a_conflict() {
        use weft_store::StoreError;
        let status = |e: StoreError| dlq_error(DlqError::Store(e)).status();
        assert_eq!(
            status(StoreError::Failed(
                "commit failed: database or disk is full".into()
            )),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status(StoreError::Closed),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status(StoreError::Invalid(
                "DLQ entry 3 is already replayed".into()
            )),
            StatusCode::CONFLICT
        );
        assert_eq!(
            status(StoreError::NotFound("no DLQ entry 9".into())),
            StatusCode::NOT_FOUND
        );
    }

    fn spec() -> Value {
        serde_json::from_str(include_str!("openapi.json")).expect("openapi.json is JSON")
    }

    fn sample(schema: &Value) -> Value {
        let ty = match &schema["type"] {
            Value::Array(a) => a[0].as_str(),
            t => t.as_str(),
        };
        match ty {
            Some("integer") => json!(1),
            Some("boolean") => json!(true),
            _ => match schema["enum"].as_array() {
                Some(e) => e[0].clone(),
                None => json!("1h"),
            },
        }
    }

    /// The documented filter is exactly what the API accepts: every
    /// documented field parses (unknown fields are refused), and every
    /// accepted field is documented.
    #[test]
    fn the_openapi_filter_and_parameters_match_what_the_api_accepts() {
        let spec = spec();
        let props = spec["components"]["schemas"]["Filter"]["properties"]
            .as_object()
            .unwrap();
        let mut all = serde_json::Map::new();
        for (name, schema) in props {
            all.insert(name.clone(), sample(schema));
        }
        let parsed: FilterParams = serde_json::from_value(Value::Object(all)).unwrap();
        assert!(
            parsed.flow.is_some()
                && parsed.destination.is_some()
                && parsed.error.is_some()
                && parsed.since.is_some()
                && parsed.status.is_some()
                && parsed.after_id.is_some()
                && parsed.limit.is_some()
                && parsed.all.is_some()
                && parsed.force.is_some(),
            "a field FilterParams accepts is not documented: {parsed:?}"
        );
        // the list's query parameters: the filter's, but the bulk-only ones
        let params: Vec<&str> = spec["paths"]["/api/v1/dlq"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for p in [
            "flow",
            "destination",
            "error",
            "since",
            "status",
            "after_id",
            "limit",
        ] {
            assert!(params.contains(&p), "{p} is not documented: {params:?}");
        }
        let body = &spec["paths"]["/api/v1/dlq/{id}/replay"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"]["properties"];
        let b: ReplayBody =
            serde_json::from_value(json!({"payload": {"a": 1}, "force": true})).unwrap();
        assert!(
            b.force == Some(true) && body.get("force").is_some() && body.get("payload").is_some()
        );
        // the jobs' request: every documented field is accepted, and the
        // other way round (deny_unknown_fields refuses what is not)
        let job = spec["components"]["schemas"]["JobRequest"]["properties"]
            .as_object()
            .unwrap();
        let mut body = serde_json::Map::new();
        for (name, schema) in job {
            body.insert(name.clone(), sample(schema));
        }
        let b: JobBody = serde_json::from_value(Value::Object(body)).unwrap();
        assert!(
            b.flow.is_some()
                && b.destination.is_some()
                && b.error.is_some()
                && b.since.is_some()
                && b.all.is_some()
                && b.force.is_some()
                && b.chunk_size.is_some()
                && b.pause_ms.is_some(),
            "a field JobBody accepts is not documented: {b:?}"
        );
        // every operation documents its errors: a JSON body for any status
        for (path, ops) in spec["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                assert!(
                    op["responses"]["default"]["content"]["application/json"].is_object(),
                    "{method} {path} has no default error response"
                );
            }
        }
    }
}
