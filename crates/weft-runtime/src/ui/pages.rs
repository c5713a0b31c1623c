//! The dashboard's screens. Each reads the store on a blocking thread and
//! renders one page; actions redirect back to a page (POST, then GET).

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Json, Redirect, Response};
use maud::{Markup, PreEscaped, html};
use serde::Deserialize;
use weft_store::{DlqEntry, DlqFilter, FlowCounts, HistoryFilter, StoreError};

use super::series::{Rate, recent, sparkline};
use super::{Session, Ui, layout};
use crate::admin::FilterParams;
use crate::dlq_jobs::{JobsError, Progress};

/// Rows of a DLQ preview, entries of a record search.
const PREVIEW: usize = 50;
/// Intervals the overview's "now" figures average (30 s).
const RECENT: usize = 15;

type Page = Result<Response, Response>;

fn done(p: Page) -> Response {
    p.unwrap_or_else(|r| r)
}

/// Store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot read the store: {e}"),
        )),
        Err(e) => Err(failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("task failed: {e}"),
        )),
    }
}

fn failure(status: StatusCode, why: &str) -> Response {
    super::refuse(status, why)
}

fn page(title: &str, active: &str, s: &Session, body: Markup) -> Response {
    Html(layout(title, active, s, body).into_string()).into_response()
}

/// `2026-01-02 03:04:05` (UTC).
fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn num(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}{unit}"),
        Some(v) => format!("{v:.1}{unit}"),
    }
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push('…');
        t
    }
}

/// A DLQ entry's payload, or that it was dropped when the entry was
/// resolved (never an empty box that looks like an empty payload).
fn payload_block(e: &DlqEntry) -> Markup {
    match e.payload_dropped() {
        Some(dropped) => html! { p.payload-dropped { (dropped) } },
        None => html! { pre { (pretty(&e.payload)) } },
    }
}

/// A payload as pretty JSON when it is JSON.
fn pretty(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.to_owned())
}

// ---------------------------------------------------------------- flows

pub(crate) async fn overview(State(ui): State<Ui>, Extension(s): Extension<Session>) -> Response {
    done(overview_page(ui, s).await)
}

async fn overview_page(ui: Ui, s: Session) -> Page {
    let config = ui.parts.config.clone();
    let lanes = crate::lane_list(&config);
    let j = ui.parts.journal.clone();
    let (counts, dlq) = blocking(move || {
        let r = j.read();
        Ok((r.counts(&lanes)?, r.dlq_depths()?))
    })
    .await?;
    let now = weft_store::now_ms();
    let fresh = crate::gauges::freshness(&config.flows, &counts, now, Some(ui.started_ms));
    let depth = |c: &FlowCounts| {
        dlq.iter()
            .find(|(f, d, _)| *f == c.flow && *d == c.destination)
            .map_or(0, |x| x.2)
    };
    let breaker = |dest: &str| {
        ui.parts
            .guards
            .iter()
            .find(|(n, _)| n == dest)
            .map(|(_, g)| g.state().name())
    };
    let total = |f: fn(&FlowCounts) -> i64| counts.iter().map(f).sum::<i64>();
    let dlq_total: i64 = dlq.iter().map(|d| d.2).sum();
    let balanced = counts.iter().all(|c| c.balanced);
    let body = html! {
        meta http-equiv="refresh" content="5";
        div.cards {
            div.card { "received" b #total-received { (total(|c| c.received)) } }
            div.card { "delivered" b #total-delivered { (total(|c| c.delivered)) } }
            div.card { "pending" b #total-pending { (total(|c| c.pending)) } }
            div.card { "DLQ" b #total-dlq { (dlq_total) } }
            div.card { "accounting" b class=(if balanced { "ok" } else { "bad" }) { (if balanced { "balanced" } else { "UNBALANCED" }) } }
        }
        table #lanes {
            tr {
                th { "flow" } th { "destination" } th { "status" }
                th { "throughput" } th { "latency" } th { "errors" }
                th { "pending" } th { "DLQ" } th { "freshness" }
                th { "delivered/s, 15 min" } th { "pending, 15 min" } th { "DLQ, 15 min" }
            }
            @for c in counts.iter().filter(|c| !c.destination.is_empty()) {
                @let rates: Vec<Rate> = ui.parts.series.rates(&c.flow, &c.destination);
                @let f = fresh.iter().find(|f| f.flow == c.flow);
                @let late = f.is_some_and(|f| f.late());
                @let br = breaker(&c.destination);
                @let d = depth(c);
                @let (status, cls) = if br == Some("open") { ("breaker open", "bad") }
                    else if late { ("late", "bad") }
                    else if br == Some("half_open") { ("breaker half open", "warn") }
                    else if d > 0 { ("dead letters", "warn") }
                    else { ("ok", "ok") };
                tr data-lane=(format!("{}/{}", c.flow, c.destination)) {
                    td { (c.flow) }
                    td { (c.destination) }
                    td data-k="status" { span class=(format!("pill {cls}")) { (status) } }
                    td.num data-k="throughput" { (num(recent(&rates, RECENT, |r| Some(r.throughput)), "/s")) }
                    td.num data-k="latency" { (num(recent(&rates, RECENT, |r| r.latency_ms), " ms")) }
                    td.num data-k="errors" { (num(recent(&rates, RECENT, |r| r.error_rate).map(|e| e * 100.0), "%")) }
                    td.num data-k="pending" { (c.pending) }
                    td.num data-k="dlq" { a href=(format!("/ui/dlq?flow={}&destination={}", urlenc(&c.flow), urlenc(&c.destination))) { (d) } }
                    td data-k="freshness" class=(if late { "late small" } else { "small" }) {
                        (f.map(|f| f.reason()).unwrap_or_default())
                    }
                    td { (PreEscaped(sparkline(&rates.iter().map(|r| r.throughput).collect::<Vec<_>>(), 140, 24, "delivered per second"))) }
                    td { (PreEscaped(sparkline(&rates.iter().map(|r| r.pending as f64).collect::<Vec<_>>(), 140, 24, "pending rows"))) }
                    td { (PreEscaped(sparkline(&rates.iter().map(|r| r.dlq as f64).collect::<Vec<_>>(), 140, 24, "dead letters"))) }
                }
            }
        }
        p.muted.small {
            "Totals from the store. Rates, latency (accepted to delivered) and the error rate "
            "(failed write attempts) are the last 30 s of a series sampled every 2 s and kept "
            "in memory for 15 minutes: it starts again when weft restarts. Refreshes every 5 s."
        }
    };
    Ok(page("Flows", "/ui/", &s, body))
}

fn urlenc(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|t| t.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

// -------------------------------------------------------------- records

#[derive(Deserialize)]
pub(crate) struct RecordQuery {
    q: Option<String>,
}

pub(crate) async fn records(
    State(ui): State<Ui>,
    Extension(s): Extension<Session>,
    Query(q): Query<RecordQuery>,
) -> Response {
    done(records_page(ui, s, q.q.unwrap_or_default().trim().to_owned()).await)
}

async fn records_page(ui: Ui, s: Session, q: String) -> Page {
    let form = html! {
        form.filters method="get" action="/ui/records" {
            div { label for="q" { "event id, entity key or correlation id" }
                  input #q type="text" name="q" value=(q) size="50"; }
            button type="submit" { "Search" }
        }
    };
    if q.is_empty() {
        return Ok(page("Records", "/ui/records", &s, form));
    }
    let j = ui.parts.journal.clone();
    let identity = !ui.parts.config.identity.is_empty();
    let q2 = q.clone();
    let (found, history) = blocking(move || {
        let r = j.read();
        let found = r.lookup(&q2, PREVIEW);
        // the same read as `weft trace`: what the change did to canonical records
        let history = if identity {
            r.canonical_history(&HistoryFilter {
                correlation_id: Some(q2.clone()),
                limit: 200,
                ..Default::default()
            })?
        } else {
            Vec::new()
        };
        Ok((found, history))
    })
    .await?;
    let found = match found {
        Ok(f) => f,
        Err(e) => {
            return Ok(page(
                "Records",
                "/ui/records",
                &s,
                html! { (form) p.error { (e.to_string()) } },
            ));
        }
    };
    let nothing = found.pending.is_empty()
        && found.dead.is_empty()
        && found.written.is_empty()
        && found.attempts.is_empty()
        && history.is_empty();
    let body = html! {
        (form)
        @if nothing {
            p #no-records { "Nothing in the store names " code { (q) } ". Delivered records leave the outbox; "
                "the store keeps every write attempt (for " code { "store.attempt_retention" } "), what a destination answered with an id (the crosswalk), dead letters and pending rows." }
        }
        @if !found.attempts.is_empty() {
            h2 { "write attempts (oldest first)" }
            table #attempts {
                tr { th { "sent" } th { "flow → destination" } th { "event" } th { "key" } th { "attempt" }
                     th { "latency" } th { "status" } th { "outcome" } th { "answer" } }
                @for a in &found.attempts {
                    tr data-outcome=(a.outcome) {
                        td { (when(a.at)) } td { (a.flow) " → " (a.destination) } td { code { (a.event_id) } }
                        td { @if let Some(k) = &a.entity_key { code { (k) } } }
                        td { (a.attempt) } td { (a.latency_ms) " ms" }
                        td { @if let Some(st) = a.status { (st) } @else { "—" } }
                        td class=(if a.outcome == "delivered" { "ok" } else { "warn" }) { (a.outcome) }
                        td { @if let Some(e) = &a.error { code { (short(e, 300)) } } }
                    }
                }
            }
        }
        @for r in &found.pending {
            section.record data-kind="pending" {
                h2 { "pending: " (r.flow) " → " (r.destination) }
                ol.path {
                    li { "accepted " (when(r.created_at)) " from " b { (r.source) } ", event " code { (r.event_id) }
                         ", correlation " code { (r.correlation_id) }
                         @if let Some(k) = &r.entity_key { ", key " code { (k) } } }
                    li { "mapped by flow " b { (r.flow) } " for " b { (r.destination) } }
                    @if r.attempts == 0 { li { "waiting for its first write (ready or behind an earlier row of its key)" } }
                    @else {
                        li class="warn" { (r.attempts) " failed attempt(s); last answer: " code { (r.last_error.clone().unwrap_or_default()) } }
                        li { "next try " (when(r.next_at)) }
                    }
                }
                pre { (pretty(&r.payload)) }
            }
        }
        @for e in &found.dead {
            section.record data-kind="dead" {
                h2 { "dead letter " a href=(format!("/ui/dlq/{}", e.id)) { "#" (e.id) } ": " (e.flow) " → " (e.destination) " (" (e.status) ")" }
                ol.path {
                    li { "accepted " (when(e.created_at)) " from " b { (e.source) } ", event " code { (e.event_id) }
                         ", correlation " code { (e.correlation_id) }
                         @if let Some(k) = &e.entity_key { ", key " code { (k) } } }
                    @if e.stage == "deliver" { li { "mapped by flow " b { (e.flow) } } }
                    @for h in history_items(&e.history) { li { (h) } }
                }
                (payload_block(e))
            }
        }
        @if !found.written.is_empty() {
            h2 { "written (the destinations' answers)" }
            table #written {
                tr { th { "destination" } th { "its id" } th { "source" } th { "key" } th { "flow" } th { "event" } th { "first" } th { "last" } }
                @for w in &found.written {
                    tr { td { (w.system) } td { code { (w.external_id) } } td { (w.source) } td { (w.source_key) }
                         td { (w.flow) } td { code { (w.event_id) } } td { (when(w.created_at)) } td { (when(w.updated_at)) } }
                }
            }
        }
        @if !history.is_empty() {
            h2 { "canonical records this change touched (" code { "weft trace" } ")" }
            table {
                tr { th { "at" } th { "entity" } th { "record" } th { "system" } th { "action" } th { "detail" } }
                @for h in &history {
                    tr { td { (when(h.at)) } td { (h.entity) } td { code { (h.canonical_id) } } td { (h.system) }
                         td { (h.action) } td { code { (short(&h.detail.to_string(), 200)) } } }
                }
            }
        }
    };
    Ok(page("Records", "/ui/records", &s, body))
}

/// A DLQ entry's history, one line per step.
fn history_items(h: &serde_json::Value) -> Vec<Markup> {
    let Some(items) = h.as_array() else {
        return Vec::new();
    };
    items
        .iter()
        .map(|i| {
            let at = i["at"].as_i64().map(when).unwrap_or_default();
            let action = i["action"].as_str().unwrap_or("?");
            let rest: Vec<String> = i
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| *k != "at" && *k != "action")
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => format!("{k}: {s}"),
                    v => format!("{k}: {v}"),
                })
                .collect();
            html! { (at) " " b { (action.replace('_', " ")) } @if !rest.is_empty() { " — " code { (rest.join("; ")) } } }
        })
        .collect()
}

// ------------------------------------------------------------------ DLQ

#[derive(Deserialize, Default, Clone)]
pub(crate) struct DlqQuery {
    flow: Option<String>,
    destination: Option<String>,
    error: Option<String>,
    since: Option<String>,
}

impl DlqQuery {
    /// Empty form fields mean "any".
    fn params(&self) -> FilterParams {
        let f = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        FilterParams {
            flow: f(&self.flow),
            destination: f(&self.destination),
            error: f(&self.error),
            since: f(&self.since),
            ..Default::default()
        }
    }
}

pub(crate) async fn dlq(
    State(ui): State<Ui>,
    Extension(s): Extension<Session>,
    Query(q): Query<DlqQuery>,
) -> Response {
    done(dlq_page(ui, s, q, None).await)
}

async fn dlq_page(ui: Ui, s: Session, q: DlqQuery, error: Option<String>) -> Page {
    let filter = match q.params().into_filter_text() {
        Ok(f) => f,
        Err(m) => {
            return Ok(page(
                "Dead letters",
                "/ui/dlq",
                &s,
                html! { (dlq_form(&ui, &q)) p.error { (m) } },
            ));
        }
    };
    let j = ui.parts.journal.clone();
    let (count, first) = blocking(move || count_matching(&*j, &filter)).await?;
    let empty = q.params().is_empty();
    let jobs = ui.parts.jobs.list();
    let body = html! {
        (dlq_form(&ui, &q))
        @if let Some(e) = error { p.error #job-error { (e) } }
        p { b #dlq-count { (count) } " dead " (if count == 1 { "entry matches" } else { "entries match" }) "." }
        @if count > 0 {
            form.filters method="post" action="/ui/dlq/jobs" #bulk {
                input type="hidden" name="csrf" value=(s.csrf);
                @for (k, v) in [("flow", &q.flow), ("destination", &q.destination), ("error", &q.error), ("since", &q.since)] {
                    input type="hidden" name=(k) value=(v.clone().unwrap_or_default());
                }
                div { label for="chunk_size" { "chunk size" } input #chunk_size type="number" name="chunk_size" value="100" min="1" max="1000"; }
                div { label for="pause_ms" { "pause between chunks (ms)" } input #pause_ms type="number" name="pause_ms" value="0" min="0" max="10000"; }
                div { label { input type="checkbox" name="force" value="1"; " force (over newer writes of the key)" } }
                @if empty { div { label { input #all type="checkbox" name="all" value="1" required; " every dead entry (no filter)" } } }
                button #bulk-replay type="submit" name="action" value="replay" { "Replay " (count) }
                button.danger #bulk-discard type="submit" name="action" value="discard" { "Discard " (count) }
            }
        }
        table #dlq-entries {
            tr { th { "id" } th { "flow" } th { "destination" } th { "stage" } th { "key" } th { "failed" } th { "attempts" } th { "error" } }
            @for e in &first {
                tr data-id=(e.id) {
                    td { a href=(format!("/ui/dlq/{}", e.id)) { "#" (e.id) } }
                    td { (e.flow) } td { (e.destination) } td { (e.stage) }
                    td { (e.entity_key.clone().unwrap_or_default()) }
                    td { (when(e.failed_at)) } td.num { (e.attempts) }
                    td.small { (short(&e.error, 160)) }
                }
            }
        }
        @if count > first.len() { p.muted.small { "showing the first " (first.len()) } }
        @if !jobs.is_empty() {
            h2 { "jobs" }
            table #jobs {
                tr { th { "job" } th { "action" } th { "filter" } th { "status" } th { "done" } th { "refused" } th { "total" } th { "started" } }
                @for p in &jobs {
                    tr { td { a href=(format!("/ui/dlq/jobs/{}", p.id)) { "#" (p.id) } } td { (format!("{:?}", p.action).to_lowercase()) }
                         td { (p.filter) } td { (p.status) } td.num { (p.done) } td.num { (p.failed) }
                         td.num { (p.total.map_or("-".into(), |t| t.to_string())) } td { (when(p.started_at)) } }
                }
            }
        }
    };
    Ok(page("Dead letters", "/ui/dlq", &s, body))
}

fn dlq_form(ui: &Ui, q: &DlqQuery) -> Markup {
    let flows: Vec<&str> = ui
        .parts
        .config
        .flows
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    let mut dests: Vec<&str> = ui
        .parts
        .config
        .flows
        .iter()
        .flat_map(|f| f.destinations.iter().map(|d| d.system.as_str()))
        .collect();
    dests.sort();
    dests.dedup();
    let sel = |v: &Option<String>, x: &str| v.as_deref() == Some(x);
    html! {
        form.filters method="get" action="/ui/dlq" #dlq-filter {
            div { label for="f-flow" { "flow" }
                select #f-flow name="flow" { option value="" { "any" }
                    @for f in &flows { option value=(f) selected[sel(&q.flow, f)] { (f) } } } }
            div { label for="f-dest" { "destination" }
                select #f-dest name="destination" { option value="" { "any" }
                    @for d in &dests { option value=(d) selected[sel(&q.destination, d)] { (d) } } } }
            div { label for="f-error" { "error contains" }
                input #f-error type="text" name="error" value=(q.error.clone().unwrap_or_default()); }
            div { label for="f-since" { "failed within (e.g. 1h)" }
                input #f-since type="text" name="since" size="8" value=(q.since.clone().unwrap_or_default()); }
            button type="submit" { "Preview" }
        }
    }
}

/// How many dead entries match, and the first [`PREVIEW`] of them.
fn count_matching(
    j: &dyn weft_store::Journal,
    filter: &DlqFilter,
) -> Result<(usize, Vec<DlqEntry>), StoreError> {
    let mut count = 0;
    let mut first = Vec::new();
    let mut after = None;
    loop {
        let page = j.read().dlq_list(&DlqFilter {
            status: None,
            after_id: after,
            limit: Some(weft_store::DLQ_PAGE),
            ..filter.clone()
        })?;
        let n = page.len();
        count += n;
        after = page.last().map(|e| e.id);
        for e in page {
            if first.len() < PREVIEW {
                first.push(e);
            }
        }
        if n < weft_store::DLQ_PAGE {
            return Ok((count, first));
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct JobForm {
    action: String,
    flow: Option<String>,
    destination: Option<String>,
    error: Option<String>,
    since: Option<String>,
    all: Option<String>,
    force: Option<String>,
    chunk_size: Option<String>,
    pause_ms: Option<String>,
}

pub(crate) async fn job_start(
    State(ui): State<Ui>,
    Extension(s): Extension<Session>,
    body: axum::body::Bytes,
) -> Response {
    let form: JobForm = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(e) => return failure(StatusCode::BAD_REQUEST, &format!("a bad form: {e}")),
    };
    let q = DlqQuery {
        flow: form.flow,
        destination: form.destination,
        error: form.error,
        since: form.since,
    };
    let mut params = q.params();
    params.all = form.all.map(|_| true);
    params.force = form.force.map(|_| true);
    let parse = |v: &Option<String>, what: &str| -> Result<Option<u64>, String> {
        match v.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(t) => t
                .parse()
                .map(Some)
                .map_err(|_| format!("{what} `{t}` is not a whole number")),
        }
    };
    let spec = parse(&form.chunk_size, "chunk size").and_then(|chunk| {
        let pause = parse(&form.pause_ms, "pause")?;
        crate::admin::job_spec(
            &form.action,
            params,
            chunk.map(|c| c as usize),
            pause,
            "dashboard",
        )
    });
    let started = spec.and_then(|spec| ui.parts.jobs.start(spec).map_err(|e| e.to_string()));
    match started {
        Ok(p) => Redirect::to(&format!("/ui/dlq/jobs/{}", p.id)).into_response(),
        Err(m) => {
            let mut r = done(dlq_page(ui, s, q, Some(m)).await);
            *r.status_mut() = StatusCode::BAD_REQUEST;
            r
        }
    }
}

fn job_error(e: JobsError) -> Response {
    match e {
        JobsError::NotFound(_) => failure(StatusCode::NOT_FOUND, &e.to_string()),
        e => failure(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

pub(crate) async fn job_page(
    State(ui): State<Ui>,
    Extension(s): Extension<Session>,
    Path(id): Path<u64>,
) -> Response {
    let p = match ui.parts.jobs.get(id) {
        Ok(p) => p,
        Err(e) => return job_error(e),
    };
    let pct = progress_pct(&p);
    let body = html! {
        p { (format!("{:?}", p.action).to_lowercase()) " of " (p.filter) ", chunks of " (p.chunk_size)
            @if p.pause_ms > 0 { ", " (p.pause_ms) " ms between chunks" } }
        div.bar { div #job-bar style=(format!("width:{pct:.1}%")) {} }
        p { "status " b #job-status { (p.status) } ": "
            b #job-done { (p.done) } " done, "
            b #job-failed { (p.failed) } " refused, of "
            b #job-total { (p.total.map_or("?".into(), |t| t.to_string())) } }
        @if !p.finished() {
            form #job-cancel-form method="post" action=(format!("/ui/dlq/jobs/{id}/cancel")) {
                input type="hidden" name="csrf" value=(s.csrf);
                button.danger #job-cancel type="submit" { "Cancel" }
            }
        }
        ul #job-errors { @for e in &p.errors { li.error { "#" (e.id) ": " (e.error) } } }
        p { a href="/ui/dlq" { "back to the DLQ" } }
        script { (PreEscaped(JOB_JS.replace("JOB_ID", &id.to_string()))) }
    };
    page(&format!("DLQ job #{id}"), "/ui/dlq", &s, body)
}

fn progress_pct(p: &Progress) -> f64 {
    match p.total {
        Some(0) => 100.0,
        Some(t) => (p.done + p.failed) as f64 * 100.0 / t as f64,
        None => 0.0,
    }
}

/// Polls the job's progress every 500 ms until it has finished.
const JOB_JS: &str = r#"
(function(){
  var t = setInterval(function(){
    fetch('/ui/dlq/jobs/JOB_ID/progress', {credentials: 'same-origin'}).then(function(r){ return r.json(); }).then(function(p){
      document.getElementById('job-status').textContent = p.status;
      document.getElementById('job-done').textContent = p.done;
      document.getElementById('job-failed').textContent = p.failed;
      document.getElementById('job-total').textContent = p.total === null ? '?' : p.total;
      var pct = p.total ? (p.done + p.failed) * 100 / p.total : (p.total === 0 ? 100 : 0);
      document.getElementById('job-bar').style.width = pct.toFixed(1) + '%';
      if (p.finished_at !== null) {
        clearInterval(t);
        var f = document.getElementById('job-cancel-form'); if (f) { f.remove(); }
        var ul = document.getElementById('job-errors'); ul.textContent = '';
        p.errors.forEach(function(e){ var li = document.createElement('li'); li.className = 'error'; li.textContent = '#' + e.id + ': ' + e.error; ul.appendChild(li); });
      }
    }).catch(function(){});
  }, 500);
})();
"#;

pub(crate) async fn job_progress(State(ui): State<Ui>, Path(id): Path<u64>) -> Response {
    match ui.parts.jobs.get(id) {
        Ok(p) => Json(p).into_response(),
        Err(e) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

pub(crate) async fn job_cancel(State(ui): State<Ui>, Path(id): Path<u64>) -> Response {
    match ui.parts.jobs.cancel(id) {
        Ok(_) => Redirect::to(&format!("/ui/dlq/jobs/{id}")).into_response(),
        Err(e) => job_error(e),
    }
}

// ------------------------------------------------------------ one entry

#[derive(Deserialize)]
pub(crate) struct EntryQuery {
    done: Option<String>,
}

pub(crate) async fn dlq_entry(
    State(ui): State<Ui>,
    Extension(s): Extension<Session>,
    Path(id): Path<i64>,
    Query(q): Query<EntryQuery>,
) -> Response {
    let note = match q.done.as_deref() {
        Some("replayed") => Some("Replayed: the entry is back in its key's queue.".to_owned()),
        Some("discarded") => Some("Discarded.".to_owned()),
        _ => None,
    };
    done(
        entry_page(ui, s, id, note, None, None)
            .await
            .map(|(_, r)| r),
    )
}

/// The entry page; `error` and `draft` after a refused replay.
async fn entry_page(
    ui: Ui,
    s: Session,
    id: i64,
    note: Option<String>,
    error: Option<String>,
    draft: Option<String>,
) -> Result<(DlqEntry, Response), Response> {
    let j = ui.parts.journal.clone();
    let Some(e) = blocking(move || j.read().dlq_get(id)).await? else {
        return Err(failure(
            StatusCode::NOT_FOUND,
            &format!("no DLQ entry {id}"),
        ));
    };
    let dead = e.status == "dead";
    let body = html! {
        @if let Some(n) = note { p.ok #entry-note { (n) } }
        @if let Some(m) = &error { p.error #replay-error { (m) } }
        table #entry {
            tr { th { "status" } td #entry-status { (e.status) } }
            tr { th { "flow → destination" } td { (e.flow) " → " (e.destination) } }
            tr { th { "stage" } td { (e.stage) } }
            tr { th { "source, event" } td { (e.source) ", " code { (e.event_id) } } }
            tr { th { "correlation" } td { a href=(format!("/ui/records?q={}", urlenc(&e.correlation_id))) { code { (e.correlation_id) } } } }
            tr { th { "entity key" } td { (e.entity_key.clone().unwrap_or_default()) } }
            tr { th { "accepted, failed" } td { (when(e.created_at)) ", " (when(e.failed_at)) " after " (e.attempts) " attempt(s)" } }
            tr { th { "error" } td.error { (e.error) } }
            @if let Some(by) = &e.superseded_by { tr { th { "superseded by" } td { code { (by) } " (a replay needs force)" } } }
        }
        h2 { "history" }
        ol.path { @for h in history_items(&e.history) { li { (h) } } }
        @if dead {
            h2 { "replay" }
            form.inline method="post" action=(format!("/ui/dlq/{id}/replay")) #replay-stored {
                input type="hidden" name="csrf" value=(s.csrf);
                button #replay-as-stored type="submit" { "Replay as stored" }
            }
            " "
            form.inline method="post" action=(format!("/ui/dlq/{id}/discard")) #discard {
                input type="hidden" name="csrf" value=(s.csrf);
                button.danger #discard-entry type="submit" { "Discard" }
            }
            h2 { "edit and replay" }
            form method="post" action=(format!("/ui/dlq/{id}/replay")) #edit-form {
                input type="hidden" name="csrf" value=(s.csrf);
                textarea #payload name="payload" spellcheck="false" { (draft.clone().unwrap_or_else(|| pretty(&e.payload))) }
                p.error #payload-error {}
                label { input type="checkbox" name="force" value="1"; " force (over newer writes of the key)" }
                button #replay-edited type="submit" { "Replay with this payload" }
            }
            script { (PreEscaped(EDIT_JS)) }
        } @else {
            h2 { "payload" }
            (payload_block(&e))
        }
    };
    let r = page(&format!("Dead letter #{id}"), "/ui/dlq", &s, body);
    Ok((e, r))
}

/// The editor refuses to send a payload that is not JSON.
const EDIT_JS: &str = r#"
document.getElementById('edit-form').addEventListener('submit', function(ev){
  var t = document.getElementById('payload').value, out = document.getElementById('payload-error');
  try { JSON.parse(t); out.textContent = ''; }
  catch (e) { ev.preventDefault(); out.textContent = 'Not JSON: ' + e.message; }
});
"#;

#[derive(Deserialize)]
pub(crate) struct ReplayForm {
    payload: Option<String>,
    force: Option<String>,
}

pub(crate) async fn dlq_replay(
    State(ui): State<Ui>,
    Extension(s): Extension<Session>,
    Path(id): Path<i64>,
    body: axum::body::Bytes,
) -> Response {
    let form: ReplayForm = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(e) => return failure(StatusCode::BAD_REQUEST, &format!("a bad form: {e}")),
    };
    let force = form.force.is_some();
    // the stored payload is compact JSON, whatever the editor's layout
    let payload = match &form.payload {
        None => None,
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => Some(v.to_string()),
            Err(err) => {
                let why = format!("The payload is not JSON ({err}); nothing was replayed.");
                return refused_replay(ui, s, id, why, form.payload.clone()).await;
            }
        },
    };
    let j = ui.parts.journal.clone();
    let entry = match blocking(move || j.read().dlq_get(id)).await {
        Ok(Some(e)) => e,
        Ok(None) => return failure(StatusCode::NOT_FOUND, &format!("no DLQ entry {id}")),
        Err(r) => return r,
    };
    let config = ui.parts.config.clone();
    match crate::dlq::replay(
        &config,
        &*ui.parts.journal,
        &entry,
        payload.as_deref(),
        force,
    )
    .await
    {
        Ok(()) => Redirect::to(&format!("/ui/dlq/{id}?done=replayed")).into_response(),
        Err(e) if e.is_user_error() => {
            refused_replay(ui, s, id, format!("Refused: {e}"), form.payload).await
        }
        Err(e) => failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot replay: {e}"),
        ),
    }
}

async fn refused_replay(
    ui: Ui,
    s: Session,
    id: i64,
    why: String,
    draft: Option<String>,
) -> Response {
    match entry_page(ui, s, id, None, Some(why), draft).await {
        Ok((_, mut r)) => {
            *r.status_mut() = StatusCode::BAD_REQUEST;
            r
        }
        Err(r) => r,
    }
}

pub(crate) async fn dlq_discard(State(ui): State<Ui>, Path(id): Path<i64>) -> Response {
    match crate::dlq::discard(&*ui.parts.journal, id, "discarded on the dashboard").await {
        Ok(()) => Redirect::to(&format!("/ui/dlq/{id}?done=discarded")).into_response(),
        Err(e) if e.is_user_error() => failure(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

// --------------------------------------------------------------- system

pub(crate) async fn system(
    State(ui): State<Ui>,
    Extension(s): Extension<Session>,
    Query(q): Query<SystemQuery>,
) -> Response {
    done(system_page(ui, s, q).await)
}

#[derive(Deserialize, Default)]
pub(crate) struct SystemQuery {
    accepted: Option<i64>,
    replayed: Option<usize>,
}

#[derive(Deserialize)]
struct AcceptForm {
    replay: Option<String>,
}

/// Accept one drift event (the code of `weft drift accept`), optionally
/// replaying the entries it quarantined.
pub(crate) async fn drift_accept(
    State(ui): State<Ui>,
    Path(id): Path<i64>,
    body: axum::body::Bytes,
) -> Response {
    let form: AcceptForm = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(e) => return failure(StatusCode::BAD_REQUEST, &format!("a bad form: {e}")),
    };
    let replay = form.replay.is_some();
    match crate::drift::accept(&ui.parts.config, &*ui.parts.journal, &[id], replay).await {
        Ok(r) if !r.unknown.is_empty() => {
            failure(StatusCode::NOT_FOUND, &format!("no drift event #{id}"))
        }
        Ok(r) => Redirect::to(&format!(
            "/ui/system?accepted={id}&replayed={}",
            r.replayed.len()
        ))
        .into_response(),
        Err(e) if e.is_user_error() => failure(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn system_page(ui: Ui, s: Session, q: SystemQuery) -> Page {
    let j = ui.parts.journal.clone();
    let lanes = crate::lane_list(&ui.parts.config);
    let (drift, checkpoints, counts, dlq) = blocking(move || {
        let r = j.read();
        Ok((
            r.drift_events(None)?,
            r.checkpoints()?,
            r.counts(&lanes)?,
            r.dlq_depths()?,
        ))
    })
    .await?;
    let config = &ui.parts.config;
    let mut positions: BTreeMap<&str, Vec<&weft_store::Checkpoint>> = BTreeMap::new();
    for c in &checkpoints {
        positions.entry(c.source.as_str()).or_default().push(c);
    }
    let body = html! {
        h2 { "sources" }
        table #sources {
            tr { th { "system" } th { "kind" } th { "state" } th { "position (checkpoints)" } }
            @for (name, sys) in config.systems.iter().filter(|(_, s)| s.source.is_some()) {
                @let kind = sys.source.as_ref().map_or("", |s| s.kind());
                @let state = ui.parts.health.source(name).map(|h| h.down());
                tr data-source=(name) {
                    td { (name) } td { (kind) }
                    td { @match state {
                        Some(Some(why)) => { span.pill.bad { "down" } " " span.small { (why) } }
                        Some(None) => { span.pill.ok { "up" } }
                        None => { span.pill.ok { "serving" } }
                    } }
                    td.small { @for c in positions.get(name.as_str()).into_iter().flatten() {
                        div { b { (c.key) } " " code { (short(&c.value, 300)) } " " span.muted { (when(c.updated_at)) } }
                    } }
                }
            }
        }
        h2 { "destinations" }
        table #destinations {
            tr { th { "system" } th { "kind" } th { "circuit breaker" } th { "pending" } th { "DLQ" } }
            @for (name, g) in &ui.parts.guards {
                @let kind = config.systems.get(name).and_then(|s| s.sink.as_ref()).map_or("", |s| s.kind());
                @let st = g.state().name();
                tr data-destination=(name) {
                    td { (name) } td { (kind) }
                    td { span class=(format!("pill {}", match st { "closed" => "ok", "open" => "bad", _ => "warn" })) { (st.replace('_', " ")) } }
                    td.num { (counts.iter().filter(|c| &c.destination == name).map(|c| c.pending).sum::<i64>()) }
                    td.num { (dlq.iter().filter(|d| &d.1 == name).map(|d| d.2).sum::<i64>()) }
                }
            }
        }
        h2 { "schema drift" }
        @if let Some(id) = q.accepted {
            p.ok #accepted { "Drift #" (id) " accepted; " (q.replayed.unwrap_or(0)) " quarantined entries replayed." }
        }
        @if drift.is_empty() { p.muted #no-drift { "No drift seen." } }
        @else {
            p.muted { "Accepting a drift stops quarantining records that show it (flows with "
                code { "on_drift: quarantine" } "); the hub follows within 2 s. Same as "
                code { "weft drift accept ID [--replay]" } "." }
            table #drift {
                tr { th { "#" } th { "source" } th { "kind" } th { "path" } th { "detail" } th { "records" } th { "first seen" } th { "last seen" } th { "example" } th { "accepted" } }
                @for d in &drift {
                    tr data-drift=(d.id) { td { (d.id) } td { (d.source) } td { (d.kind.replace('_', " ")) } td { code { (d.path) } }
                         td { (d.detail) } td.num { (d.count) } td { (when(d.first_seen)) } td { (when(d.last_seen)) }
                         td.small { code { (short(d.example.as_deref().unwrap_or(""), 120)) } }
                         td {
                             @if let Some(at) = d.accepted_at { span.pill.ok { "accepted " (when(at)) } }
                             @else {
                                 form.inline method="post" action=(format!("/ui/drift/{}/accept", d.id)) {
                                     input type="hidden" name="csrf" value=(s.csrf);
                                     label.small { input type="checkbox" name="replay" value="1" checked; " replay quarantined" }
                                     " "
                                     button.accept-drift type="submit" { "Accept" }
                                 }
                             }
                         }
                    }
                }
            }
        }
    };
    Ok(page("System", "/ui/system", &s, body))
}

// --------------------------------------------------------------- queues

pub(crate) async fn queues(State(ui): State<Ui>, Extension(s): Extension<Session>) -> Response {
    done(queues_page(ui, s).await)
}

async fn queues_page(ui: Ui, s: Session) -> Page {
    let j = ui.parts.journal.clone();
    let (conflicts, matches) = blocking(move || {
        let r = j.read();
        Ok((
            r.conflicts(Some("open"), 200)?,
            r.matches(Some("open"), 200)?,
        ))
    })
    .await?;
    let body = html! {
        p.muted { "Queues waiting for a person. Decide them with " code { "weft conflicts resolve" } " and "
            code { "weft matches accept|reject" } " (read-only here for now)." }
        h2 { "manual conflicts (" (conflicts.len()) ")" }
        @if conflicts.is_empty() { p.muted { "None open." } } @else {
            table #conflicts {
                tr { th { "#" } th { "entity" } th { "record" } th { "field" } th { "current" } th { "proposed" } th { "since" } }
                @for c in &conflicts {
                    tr { td { (c.id) } td { (c.entity) } td { code { (c.canonical_id) } } td { (c.field) }
                         td { code { (short(&c.current.to_string(), 80)) } " (" (c.current_system) ")" }
                         td { code { (short(&c.proposed.to_string(), 80)) } " (" (c.system) ")" }
                         td { (when(c.created_at)) } }
                }
            }
        }
        h2 { "matches held for review (" (matches.len()) ")" }
        @if matches.is_empty() { p.muted { "None open." } } @else {
            table #matches {
                tr { th { "#" } th { "entity" } th { "system id" } th { "candidate" } th { "score" } th { "fields" } th { "since" } }
                @for m in &matches {
                    tr { td { (m.id) } td { (m.entity) } td { (m.system) ":" (m.external_id) } td { code { (m.candidate) } }
                         td.num { (format!("{:.2}", m.score)) } td.small { code { (short(&m.fields.to_string(), 120)) } }
                         td { (when(m.created_at)) } }
                }
            }
        }
        h2 { "sagas" }
        p.muted { "Not in this version." }
    };
    Ok(page("Queues", "/ui/queues", &s, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// P1-20: a resolved entry's page says its payload was dropped, with
    /// the hash; it never shows an empty payload box.
    #[test]
    fn p1_20_a_dropped_payload_is_said_not_shown_empty() {
        let mut e = DlqEntry {
            id: 7,
            status: "dead".into(),
            stage: "deliver".into(),
            flow: "f".into(),
            destination: "d".into(),
            entity_key: None,
            idempotency_key: None,
            source: "crm".into(),
            event_id: "e".into(),
            correlation_id: "c".into(),
            created_at: 0,
            failed_at: 0,
            attempts: 1,
            error: "422".into(),
            payload: "{\"id\":1}".into(),
            history: serde_json::json!([]),
            attributes: None,
            superseded_by: None,
            order_seq: None,
            resolved_at: None,
            payload_sha256: None,
        };
        let kept = payload_block(&e).into_string();
        assert!(
            kept.contains("<pre>") && kept.contains("&quot;id&quot;"),
            "{kept}"
        );
        e.status = "discarded".into();
        e.payload = String::new();
        e.resolved_at = Some(1);
        e.payload_sha256 = Some(weft_store::payload_sha256("{\"id\":1}"));
        let dropped = payload_block(&e).into_string();
        let sha = weft_store::payload_sha256("{\"id\":1}");
        assert!(
            dropped.contains(&format!("payload dropped after resolve (sha256 {sha})")),
            "{dropped}"
        );
        assert!(!dropped.contains("<pre>"), "{dropped}");
    }
}
