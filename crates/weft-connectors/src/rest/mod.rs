//! The REST polling source: weft calls a system's API at an interval (or on
//! a cron schedule), walks its pages, and ingests the records.
//!
//! One *poll* requests the first page, hands its records to `ingest`, then
//! requests the next page (see [`pagination`]) until an empty page, the end
//! of the pages, or `max_pages`. Requests carry the configured headers,
//! query parameters and auth, go through the client-side rate limit, and
//! are retried as [`client`] describes. A poll that fails (a permanent HTTP
//! status, a body that is not JSON, retries exhausted) is logged and the
//! source waits for the next poll; it never stops for a remote problem.
//!
//! ## Ids
//! Each record's event id is `id_field`'s output (a string or a number) or
//! the SHA-256 of its canonical JSON (keys sorted, no blanks). The inbox
//! stores a `(source, id)` once, so records fetched twice are stored once.
//! A record whose `id_field` or `cursor_field` fails goes to the DLQ as a
//! parse error with the reason.
//!
//! ## Incremental sync and its checkpoint
//! With `incremental`, each poll sends `param=<cursor>` where the cursor is
//! the highest `cursor_field` seen so far (or `initial` the very first
//! time). The highest cursor is saved as the checkpoint (key
//! [`CHECKPOINT_KEY`], the value as JSON text) **in the same batch as the
//! records of the page that raised it**, so the store holds records and
//! checkpoint together or neither:
//! - `order: ascending` (default; the API returns records sorted by the
//!   cursor): the checkpoint goes with every page; a crash mid-poll resumes
//!   after the last stored page.
//! - `order: unordered`: the checkpoint goes only with the last page of a
//!   poll that reached the end; a crash mid-poll starts the poll again from
//!   the previous checkpoint.
//!
//! A poll stopped by `max_pages` before the end does not save the
//! checkpoint in unordered mode (the rest would be skipped). Records whose
//! cursor equals the saved one are fetched again by the next poll (APIs'
//! `since` parameters are usually inclusive): they are duplicates in the
//! inbox, not new events, as long as their id is stable, hence `id_field`
//! should include the cursor (`"\(.id)@\(.updated_at)"`) so that an update
//! of a record is a new event and a re-fetch is not. For an API whose
//! parameter is exclusive (`>`), `since_inclusive: false` sends the saved
//! cursor one unit earlier (see [`step_back`]): records that tie with it at
//! a page or crash boundary are fetched again instead of lost.
//!
//! ## Pages of the wrong shape
//! A `200` whose body is not JSON, lacks the records path (an error object
//! such as `{"error": "temporarily unavailable"}` where `.data` was
//! expected), or breaks the pagination program is not an empty page: it is
//! logged, counted in [`PAGE_ERRORS`] (`source`, `reason`: `not_json`,
//! `records`, `pagination`), and asked for again with the HTTP retries'
//! backoff, up to [`client::MAX_ATTEMPTS`] times; then the poll fails, the
//! checkpoint where it was. Only an explicit `null` at the records path
//! (`{"data": null}`) or an empty array is an empty page.
//!
//! Strings compare as text (use one timestamp format, e.g. RFC 3339 UTC),
//! numbers as numbers.
//!
//! ## Full re-sync
//! `full_resync_on_start: true` ignores the saved checkpoint for the first
//! poll after each start and fetches from `initial` again; later polls are
//! incremental. Records already in the inbox are duplicates and are not
//! delivered again. Remove the flag after the re-sync, or every restart
//! re-syncs.
//!
//! ## Schedule
//! `interval`: the first poll at start, then one every `interval` from the
//! start of the previous one (at once if a poll took longer). `cron` (UTC):
//! polls at the times the expression gives, none at start.

mod auth;
pub mod client;
pub mod pagination;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use reqwest::{Method, Url};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use weft_core::Event;
use weft_core::config::SourceSpec;
use weft_core::config::raw::RestOrder;
use weft_core::mapping::Program;

use crate::source::{
    BadRecord, Batch, Checkpoint, Ingest, IngestError, Record, Source, SourceError, canonical_json,
};
use client::Client;
use pagination::{Position, Style};

/// Checkpoint key of the incremental cursor.
pub const CHECKPOINT_KEY: &str = "incremental_cursor";

/// Counter of pages that did not have the configured shape, by `source` and
/// `reason` (`not_json`, `records`, `pagination`).
pub const PAGE_ERRORS: &str = "weft_source_page_errors_total";

/// Why a poll ended early. Nothing after the last ingested page was
/// checkpointed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// Shutdown was requested.
    #[error("stopped by shutdown")]
    Shutdown,
    /// The API failed or refused (after retries where they apply).
    #[error("{0}")]
    Http(String),
    /// A response could not be read: not JSON, records not an array,
    /// a pagination program failed.
    #[error("{0}")]
    Body(String),
    /// The store failed; the source stops.
    #[error("store error: {0}")]
    Store(String),
}

/// What one complete poll did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PollReport {
    pub pages: u64,
    pub records: usize,
    pub accepted: usize,
    pub duplicates: usize,
    /// The incremental cursor after the poll, if any.
    pub cursor: Option<Value>,
    /// The poll stopped at `max_pages` with pages left.
    pub capped: bool,
}

enum Schedule {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

struct Incremental {
    param: String,
    initial: Option<String>,
    order: RestOrder,
    cursor_field: Arc<Program>,
    /// The API's parameter is `>=` (else `>`: the saved cursor is stepped back).
    inclusive: bool,
}

/// Where the records are in a page, and how to tell a missing path from an
/// explicit `null`.
struct RecordsPath {
    program: Arc<Program>,
    /// `[path(<records>)]`, when the program is a path expression.
    paths: Option<Program>,
}

/// A page read and checked against the configured shape.
struct Page {
    items: Vec<Value>,
    next: Option<Position>,
}

/// The REST polling source.
pub struct RestSource {
    system: String,
    event_source: String,
    event_type: String,
    base: Url,
    query: Vec<(String, String)>,
    records: RecordsPath,
    id_field: Option<Arc<Program>>,
    incremental: Option<Incremental>,
    resync_pending: AtomicBool,
    style: Style,
    next_page: Option<Arc<Program>>,
    max_pages: u64,
    schedule: Schedule,
    client: Client,
}

impl RestSource {
    pub fn new(system: &str, spec: &SourceSpec) -> Result<Self, SourceError> {
        let err = |m: String| SourceError {
            system: system.to_owned(),
            message: m,
        };
        let SourceSpec::Rest {
            cfg,
            method,
            records,
            id_field,
            event_type,
            interval,
            cron,
            timeout,
            max_backoff,
            next_page,
            max_pages,
            cursor_field,
        } = spec
        else {
            return Err(err("not a rest source".into()));
        };
        let base = Url::parse(cfg.url.value.trim())
            .map_err(|e| err(format!("url `{}`: {e}", cfg.url.value)))?;
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| err(format!("`{method}` is not an HTTP method")))?;
        let schedule = match (cron, interval) {
            (Some(c), _) => Schedule::Cron(Box::new(
                croner::Cron::from_str(c)
                    .map_err(|e| err(format!("cron `{c}` is not valid: {e}")))?,
            )),
            (None, Some(i)) => Schedule::Every(*i),
            (None, None) => Schedule::Every(Duration::from_secs(60)),
        };
        let incremental = match (&cfg.incremental, cursor_field) {
            (Some(i), Some(cf)) => Some(Incremental {
                param: i.param.clone(),
                initial: i.initial.clone(),
                order: i.order.unwrap_or(RestOrder::Ascending),
                cursor_field: cf.clone(),
                inclusive: i.since_inclusive.unwrap_or(true),
            }),
            _ => None,
        };
        let http = reqwest::Client::builder()
            .timeout(*timeout)
            .connect_timeout((*timeout).min(Duration::from_secs(10)))
            .user_agent(concat!("weft/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| err(format!("cannot build the HTTP client: {e}")))?;
        let client = Client {
            http,
            method,
            headers: Client::build_headers(&cfg.headers).map_err(&err)?,
            body: cfg.body.clone(),
            auth: auth::Auth::from_config(cfg.auth.as_ref()).map_err(&err)?,
            limiter: Client::limiter(cfg.rate_limit.as_ref()),
            max_backoff: *max_backoff,
        };
        Ok(RestSource {
            system: system.to_owned(),
            event_source: format!("weft:{system}"),
            event_type: event_type.clone(),
            base,
            query: cfg
                .query
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            records: RecordsPath {
                program: records.clone(),
                paths: Program::compile(&format!("[path({})]", records.code()), &[]).ok(),
            },
            id_field: id_field.clone(),
            incremental,
            resync_pending: AtomicBool::new(cfg.full_resync_on_start),
            style: Style::from_config(cfg.pagination.as_ref()),
            next_page: next_page.clone(),
            max_pages: *max_pages,
            schedule,
            client,
        })
    }

    /// The URL of a page.
    fn url(&self, pos: &Position, since: Option<&str>) -> Url {
        let mut u = match pos {
            Position::Url(u) => u.clone(),
            _ => {
                let mut u = self.base.clone();
                {
                    let mut q = u.query_pairs_mut();
                    for (k, v) in &self.query {
                        q.append_pair(k, v);
                    }
                    if let (Some(inc), Some(s)) = (&self.incremental, since) {
                        q.append_pair(&inc.param, s);
                    }
                    for (k, v) in self.style.params(pos) {
                        q.append_pair(&k, &v);
                    }
                }
                u
            }
        };
        if let Some((k, v)) = self.client.auth.query_param()
            && !u.query_pairs().any(|(qk, _)| qk == k)
        {
            u.query_pairs_mut().append_pair(k, v);
        }
        if u.query() == Some("") {
            u.set_query(None);
        }
        u
    }

    /// One poll: every page from the first to the end, each page's records
    /// ingested (with the checkpoint, see the module docs) before the next
    /// page is requested.
    pub async fn poll_once(
        &self,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Result<PollReport, PollError> {
        let resync = self.resync_pending.load(Ordering::Acquire);
        let mut report = PollReport::default();
        // the cursor this poll starts from, and the highest seen
        let mut since: Option<Value> = None;
        let mut from_checkpoint = false;
        if let Some(inc) = &self.incremental {
            let saved = if resync {
                None
            } else {
                ingest
                    .checkpoint(CHECKPOINT_KEY)
                    .await
                    .map_err(|e| PollError::Store(e.to_string()))?
            };
            from_checkpoint = saved.is_some();
            since = match saved {
                Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                    PollError::Store(format!("the saved cursor `{text}` is not JSON: {e}"))
                })?),
                None => inc.initial.clone().map(Value::String),
            };
        }
        let since_param = match (&self.incremental, &since) {
            // `initial` is sent as written; the saved cursor one unit earlier
            (Some(inc), Some(c)) if !inc.inclusive && from_checkpoint => {
                Some(step_back(c).ok_or_else(|| {
                    PollError::Body(format!(
                        "the saved cursor {c} cannot be stepped back for the exclusive `{}` (since_inclusive: false): \
                         expected an integer, an RFC 3339 timestamp or a date; the checkpoint stays where it was",
                        inc.param
                    ))
                })?)
            }
            _ => since.as_ref().map(cursor_text),
        };
        let mut max = since.clone();
        // the highest cursor already saved
        let mut saved = since.clone();
        let mut pos = Position::First;
        loop {
            if shutdown.is_cancelled() {
                return Err(PollError::Shutdown);
            }
            let page_no = report.pages + 1;
            let url = self.url(&pos, since_param.as_deref());
            let shown = client::display_url(&url, self.client.auth.query_param().map(|q| q.0));
            let Page { items, next } = self.page(&pos, &url, page_no, &shown, shutdown).await?;
            report.pages = page_no;
            let n = items.len();
            let capped = next.is_some() && page_no >= self.max_pages;
            let last = next.is_none() || capped;

            let mut records = Vec::with_capacity(n);
            for (i, item) in items.into_iter().enumerate() {
                let location = format!("{} {shown} page {page_no} record {i}", self.client.method);
                records.push(self.record(item, &location, &mut max));
            }
            report.records += n;

            let checkpoint = match &self.incremental {
                Some(inc)
                    if max != saved && (inc.order == RestOrder::Ascending || (last && !capped)) =>
                {
                    max.as_ref().map(|m| Checkpoint {
                        key: CHECKPOINT_KEY.into(),
                        value: m.to_string(),
                    })
                }
                _ => None,
            };
            if !records.is_empty() || checkpoint.is_some() {
                let new_saved = checkpoint.as_ref().map(|_| max.clone());
                let r = self
                    .ingest_batch(
                        ingest,
                        Batch {
                            records,
                            checkpoint,
                        },
                        shutdown,
                    )
                    .await?;
                report.accepted += r.accepted;
                report.duplicates += r.duplicates;
                if let Some(s) = new_saved {
                    saved = s;
                }
            }
            if capped {
                report.capped = true;
                tracing::warn!(
                    system = %self.system,
                    max_pages = self.max_pages,
                    "stopped at max_pages with pages left; {}",
                    match &self.incremental {
                        Some(i) if i.order == RestOrder::Ascending =>
                            "the next poll continues from the checkpoint",
                        Some(_) => "the checkpoint was not advanced (order: unordered)",
                        None => "the remaining pages are not read by this poll",
                    }
                );
            }
            match next {
                Some(n) if !capped => pos = n,
                _ => break,
            }
        }
        report.cursor = saved;
        self.resync_pending.store(false, Ordering::Release);
        Ok(report)
    }

    /// `weft check`: request the first page once (GET only; a POST is not
    /// sent, its host is only connected to) and check its shape.
    pub async fn probe(&self) -> crate::probe::Finding {
        use crate::probe::Finding;
        let since = self
            .incremental
            .as_ref()
            .and_then(|i| i.initial.clone())
            .map(Value::String);
        let url = self.url(&Position::First, since.as_ref().map(cursor_text).as_deref());
        let shown = client::display_url(&url, self.client.auth.query_param().map(|q| q.0));
        if self.client.method != reqwest::Method::GET {
            let host = url.host_str().unwrap_or_default().to_owned();
            let port = url.port_or_known_default().unwrap_or(443);
            return match crate::probe::tcp_reachable(&host, port, Duration::from_secs(10)).await {
                Ok(()) => Finding::warn(format!(
                    "{host}:{port} is reachable; the {} request was not sent (it may change data), so credentials are not checked",
                    self.client.method
                )),
                Err(e) => Finding::fail(e),
            };
        }
        let fetched = match self.client.fetch_once(&url).await {
            Ok(f) => f,
            Err(e) => return Finding::fail(e),
        };
        match self.parse(&Position::First, &url, &fetched) {
            Ok(page) => Finding::ok(format!(
                "GET {shown}: {} records on the first page{}",
                page.items.len(),
                if page.next.is_some() {
                    ", more pages"
                } else {
                    ""
                }
            )),
            Err((_, why)) => Finding::fail(format!("GET {shown}: {why}")),
        }
    }

    /// Fetch one page and check its shape; a page of the wrong shape is
    /// logged, counted and asked for again with backoff (module docs).
    async fn page(
        &self,
        pos: &Position,
        url: &Url,
        page_no: u64,
        shown: &str,
        shutdown: &CancellationToken,
    ) -> Result<Page, PollError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let fetched = self.client.fetch(url, shutdown).await?;
            let (reason, why) = match self.parse(pos, url, &fetched) {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            metrics::counter!(PAGE_ERRORS, "source" => self.system.clone(), "reason" => reason)
                .increment(1);
            let what = format!(
                "page {page_no} ({} {shown}): {why}; the checkpoint stays where it was",
                self.client.method
            );
            if attempt >= client::MAX_ATTEMPTS {
                return Err(PollError::Body(format!(
                    "{what} (gave up after {attempt} attempts)"
                )));
            }
            let wait = client::backoff(attempt, self.client.max_backoff);
            tracing::warn!(
                system = %self.system,
                attempt,
                wait_ms = wait.as_millis() as u64,
                reason,
                error = %what,
                "the page does not have the configured shape; asking for it again"
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return Err(PollError::Shutdown),
            }
        }
    }

    /// A fetched page's records and next position, or why its body does not
    /// have the configured shape (a metric reason and a message).
    fn parse(
        &self,
        pos: &Position,
        url: &Url,
        fetched: &client::Fetched,
    ) -> Result<Page, (&'static str, String)> {
        let body: Value = serde_json::from_slice(&fetched.body).map_err(|e| {
            (
                "not_json",
                format!(
                    "the body is not valid JSON ({e}); it starts with: {}",
                    client::snippet(&fetched.body)
                ),
            )
        })?;
        let items = extract_records(&self.records, &body).map_err(|m| {
            (
                "records",
                format!(
                    "{m}; the body starts with: {}",
                    client::snippet(&fetched.body)
                ),
            )
        })?;
        let next = self
            .style
            .next(
                pos,
                url,
                items.len(),
                &fetched.headers,
                &body,
                self.next_page.as_deref(),
            )
            .map_err(|m| ("pagination", m))?;
        Ok(Page { items, next })
    }

    /// Ingest one batch; while the hub is busy, wait and offer it again.
    async fn ingest_batch(
        &self,
        ingest: &dyn Ingest,
        batch: Batch,
        shutdown: &CancellationToken,
    ) -> Result<crate::source::Receipt, PollError> {
        loop {
            match ingest.ingest(batch.clone()).await {
                Ok(r) => return Ok(r),
                Err(IngestError::Unavailable(m)) => {
                    tracing::debug!(system = %self.system, reason = %m, "ingest unavailable; waiting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.cancelled() => return Err(PollError::Shutdown),
                    }
                }
                Err(IngestError::Store(m)) => return Err(PollError::Store(m)),
                // `reject` is refused at validate for non-webhook sources
                Err(IngestError::Rejected(m)) => return Err(PollError::Store(m)),
            }
        }
    }

    /// One record as an event (or a DLQ entry), raising `max` to its cursor.
    fn record(&self, item: Value, location: &str, max: &mut Option<Value>) -> Record {
        let mut text = String::new();
        canonical_json(&item, &mut text);
        let hash = hex::encode(Sha256::digest(text.as_bytes()));
        let bad = |error: String, id: String| {
            Record::Bad(BadRecord {
                id,
                location: location.to_owned(),
                raw: text.clone(),
                error,
                correlation_id: weft_core::event::new_correlation_id(),
            })
        };
        let id = match &self.id_field {
            None => hash.clone(),
            Some(p) => match p.run(item.clone(), Value::Null, &[]) {
                Ok(out) => match out.as_slice() {
                    [Value::String(s)] if !s.is_empty() => s.clone(),
                    [Value::Number(n)] => n.to_string(),
                    other => {
                        return bad(
                            format!(
                                "id_field `{}` gave {}, expected one non-empty string or number",
                                p.code(),
                                describe(other)
                            ),
                            hash,
                        );
                    }
                },
                Err(e) => return bad(format!("id_field `{}` failed: {e}", p.code()), hash),
            },
        };
        if let Some(inc) = &self.incremental {
            match inc.cursor_field.run(item.clone(), Value::Null, &[]) {
                Ok(out) => match out.as_slice() {
                    [c @ (Value::String(_) | Value::Number(_))] => {
                        if max.as_ref().is_none_or(|m| cursor_gt(c, m)) {
                            *max = Some(c.clone());
                        }
                    }
                    other => {
                        return bad(
                            format!(
                                "cursor_field `{}` gave {}, expected one string or number",
                                inc.cursor_field.code(),
                                describe(other)
                            ),
                            id,
                        );
                    }
                },
                Err(e) => {
                    return bad(
                        format!("cursor_field `{}` failed: {e}", inc.cursor_field.code()),
                        id,
                    );
                }
            }
        }
        Record::Good(Event::new(
            id,
            self.event_source.clone(),
            self.event_type.clone(),
            None,
            item,
        ))
    }

    /// When the next poll is due, after one that started at `started`.
    fn next_due(&self, started: Instant) -> Instant {
        match &self.schedule {
            Schedule::Every(d) => started + *d,
            Schedule::Cron(c) => {
                let now = chrono::Utc::now();
                match c.find_next_occurrence(&now, false) {
                    Ok(t) => {
                        let wait = (t - now).to_std().unwrap_or(Duration::ZERO);
                        Instant::now() + wait
                    }
                    Err(e) => {
                        tracing::error!(system = %self.system, error = %e, "the cron schedule has no next time; polling again in an hour");
                        Instant::now() + Duration::from_secs(3600)
                    }
                }
            }
        }
    }
}

impl Source for RestSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let mut due = match self.schedule {
                Schedule::Every(_) => Instant::now(),
                Schedule::Cron(_) => self.next_due(Instant::now()),
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                let started = Instant::now();
                match self.poll_once(ingest.as_ref(), &shutdown).await {
                    Ok(r) => tracing::info!(
                        system = %self.system,
                        pages = r.pages,
                        records = r.records,
                        accepted = r.accepted,
                        duplicates = r.duplicates,
                        cursor = r.cursor.as_ref().map(|c| c.to_string()),
                        "poll done"
                    ),
                    Err(PollError::Shutdown) => return Ok(()),
                    Err(PollError::Store(m)) => {
                        return Err(SourceError {
                            system: self.system.clone(),
                            message: format!("store error: {m}"),
                        });
                    }
                    Err(e) => tracing::error!(
                        system = %self.system,
                        error = %e,
                        "poll failed; retrying at the next poll"
                    ),
                }
                due = self.next_due(started);
            }
        })
    }
}

/// The records of a response body: one array output is its elements, one
/// `null` is none if the body has that path (`{"data": null}`) and an error
/// if it does not (`{"error": ...}`), several outputs (e.g. `.data[]`) are
/// one record each.
fn extract_records(records: &RecordsPath, body: &Value) -> Result<Vec<Value>, String> {
    let p = &records.program;
    let mut out = p
        .run(body.clone(), Value::Null, &[])
        .map_err(|e| format!("records `{}` failed: {e}", p.code()))?;
    if out.len() == 1 {
        return match out.pop() {
            Some(Value::Array(a)) => Ok(a),
            Some(Value::Null) if has_path(records, body) => Ok(Vec::new()),
            Some(Value::Null) => Err(format!(
                "the body has nothing at the records path `{}`: the page does not have the configured shape \
                 (write `{} // []` if the API leaves the path out when there are no records)",
                p.code(),
                p.code()
            )),
            None => Ok(Vec::new()),
            Some(other) => Err(format!(
                "records `{}` gave {}, expected an array of records (or use `.path[]`)",
                p.code(),
                describe(std::slice::from_ref(&other))
            )),
        };
    }
    Ok(out)
}

/// Whether every path the records program names exists in `body` (keys
/// present, indices in range), so that its `null` is the API's own. A
/// program that is not a path expression gives no answer: `false`.
fn has_path(records: &RecordsPath, body: &Value) -> bool {
    let Some(paths) = &records.paths else {
        return false;
    };
    let Ok(out) = paths.run(body.clone(), Value::Null, &[]) else {
        return false;
    };
    let [Value::Array(paths)] = out.as_slice() else {
        return false;
    };
    !paths.is_empty()
        && paths.iter().all(|path| {
            let Value::Array(steps) = path else {
                return false;
            };
            let mut here = body;
            for step in steps {
                let next = match (here, step) {
                    (Value::Object(m), Value::String(k)) => m.get(k),
                    (Value::Array(a), Value::Number(i)) => {
                        i.as_u64().and_then(|i| a.get(usize::try_from(i).ok()?))
                    }
                    _ => None,
                };
                match next {
                    Some(v) => here = v,
                    None => return false,
                }
            }
            true
        })
}

/// The cursor one unit earlier, for an exclusive `since` parameter: an
/// integer minus 1, an RFC 3339 timestamp minus one unit of its last digit
/// (`...:05Z` → `...:04Z`, `...:05.120Z` → `...:05.119Z`), a date minus a
/// day. `None` for anything else.
pub(crate) fn step_back(c: &Value) -> Option<String> {
    match c {
        Value::Number(n) => n
            .as_i64()
            .and_then(|i| i.checked_sub(1))
            .map(|i| i.to_string()),
        Value::String(s) => {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
                let digits = s
                    .split_once('.')
                    .map(|(_, frac)| frac.bytes().take_while(u8::is_ascii_digit).count())
                    .unwrap_or(0);
                let unit = chrono::Duration::nanoseconds(
                    10i64.pow(9u32.saturating_sub(digits.min(9) as u32)),
                );
                let back = t.checked_sub_signed(unit)?;
                let format = match digits {
                    0 => chrono::SecondsFormat::Secs,
                    1..=3 => chrono::SecondsFormat::Millis,
                    4..=6 => chrono::SecondsFormat::Micros,
                    _ => chrono::SecondsFormat::Nanos,
                };
                let z = s.ends_with('Z') || s.ends_with('z');
                let mut out = back.to_rfc3339_opts(format, z);
                // keep the number of fraction digits as written
                if let (1..=8, Some((head, tail))) = (digits, out.clone().split_once('.')) {
                    let width = match format {
                        chrono::SecondsFormat::Millis => 3,
                        chrono::SecondsFormat::Micros => 6,
                        _ => 9,
                    };
                    let (frac, zone) = tail.split_at(width);
                    out = format!("{head}.{}{zone}", &frac[..digits]);
                }
                return Some(out);
            }
            let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            Some(d.pred_opt()?.format("%Y-%m-%d").to_string())
        }
        _ => None,
    }
}

/// The cursor as sent in a query parameter.
fn cursor_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `a > b` for cursors: numbers as numbers, otherwise as text.
fn cursor_gt(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x > y,
            _ => x.as_f64().unwrap_or(f64::NAN) > y.as_f64().unwrap_or(f64::NAN),
        },
        _ => cursor_text(a) > cursor_text(b),
    }
}

fn describe(out: &[Value]) -> String {
    match out {
        [] => "no output".into(),
        [v] => {
            let s = v.to_string();
            if s.chars().count() > 60 {
                format!("{}…", s.chars().take(60).collect::<String>())
            } else {
                s
            }
        }
        many => format!("{} outputs", many.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(code: &str) -> RecordsPath {
        RecordsPath {
            program: Arc::new(Program::compile(code, &[]).unwrap()),
            paths: Program::compile(&format!("[path({code})]"), &[]).ok(),
        }
    }

    #[test]
    fn records_forms() {
        let p = path(".data");
        assert_eq!(
            extract_records(&p, &json!({"data": [1, 2]})).unwrap(),
            vec![json!(1), json!(2)]
        );
        let e = extract_records(&p, &json!({"data": {"a": 1}})).unwrap_err();
        assert!(e.contains("expected an array"), "{e}");
        let p = path(".data[]");
        assert_eq!(
            extract_records(&p, &json!({"data": [{"a": 1}, {"a": 2}]})).unwrap(),
            vec![json!({"a": 1}), json!({"a": 2})]
        );
    }

    /// Regression: a body without the records path was an empty last page.
    #[test]
    fn a_missing_records_path_is_an_error_and_an_explicit_null_is_empty() {
        let p = path(".data");
        let e = extract_records(&p, &json!({"error": "temporarily unavailable"})).unwrap_err();
        assert!(e.contains("nothing at the records path `.data`"), "{e}");
        assert!(extract_records(&p, &json!({})).is_err());
        assert!(
            extract_records(&p, &json!({"data": null}))
                .unwrap()
                .is_empty()
        );
        let p = path(".result.items");
        assert!(
            extract_records(&p, &json!({"result": {"items": null}}))
                .unwrap()
                .is_empty()
        );
        assert!(extract_records(&p, &json!({"result": {}})).is_err());
        assert!(extract_records(&p, &json!({"result": null})).is_err());
        // the whole body
        assert!(
            extract_records(&path("."), &json!(null))
                .unwrap()
                .is_empty()
        );
        // `// []` says that a missing path means no records
        assert!(
            extract_records(&path(".data // []"), &json!({}))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn step_back_one_unit() {
        assert_eq!(step_back(&json!(42)).as_deref(), Some("41"));
        assert_eq!(
            step_back(&json!("2024-01-01T00:05:00Z")).as_deref(),
            Some("2024-01-01T00:04:59Z")
        );
        assert_eq!(
            step_back(&json!("2024-01-01T00:05:00.120Z")).as_deref(),
            Some("2024-01-01T00:05:00.119Z")
        );
        assert_eq!(
            step_back(&json!("2024-01-01T00:00:00.5+02:00")).as_deref(),
            Some("2024-01-01T00:00:00.4+02:00")
        );
        assert_eq!(
            step_back(&json!("2024-01-01T00:00:00.00+02:00")).as_deref(),
            Some("2023-12-31T23:59:59.99+02:00")
        );
        assert_eq!(
            step_back(&json!("2024-01-01T00:00:00.000001Z")).as_deref(),
            Some("2024-01-01T00:00:00.000000Z")
        );
        assert_eq!(
            step_back(&json!("2024-03-01")).as_deref(),
            Some("2024-02-29")
        );
        assert_eq!(step_back(&json!("opaque-token")), None);
        assert_eq!(step_back(&json!(1.5)), None);
    }

    #[test]
    fn cursor_order() {
        assert!(cursor_gt(&json!(10), &json!(9)));
        assert!(!cursor_gt(&json!(9.5), &json!(10)));
        assert!(cursor_gt(
            &json!("2024-01-02T00:00:00Z"),
            &json!("2024-01-01T23:59:59Z")
        ));
        assert_eq!(cursor_text(&json!("a b")), "a b");
        assert_eq!(cursor_text(&json!(42)), "42");
    }
}
