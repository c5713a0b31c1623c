//! Metric names and the helpers that record them. Names and labels are
//! constants so every component reports the same set; [`FAMILIES`] is the
//! one list of them (name, type, labels, help), described to the exporter
//! at install (`# HELP` on every family) and documented in
//! `docs/metrics.md` (a test checks that the page lists every family).
//!
//! Counters come from the code paths as they happen, exactly what the
//! store committed. Gauges of stored state (queue depth, DLQ depth, oldest
//! pending age, accounting, freshness) and breaker states are set from the
//! store and the guards on every scrape of `/metrics`
//! ([`crate::gauges::Gauges::refresh`]) and every 2 s, so they are current
//! when read and right after a restart too.

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const RECEIVED: &str = "weft_events_received_total";
pub const FILTERED: &str = "weft_events_filtered_total";
pub const REJECTED: &str = "weft_events_rejected_total";
pub const DUPLICATES: &str = "weft_events_duplicate_total";
pub const DELIVERED: &str = "weft_deliveries_delivered_total";
pub const FAILED: &str = "weft_deliveries_failed_total";
pub const RETRIED: &str = "weft_deliveries_retried_total";
pub const DEAD_LETTERED: &str = "weft_deliveries_dead_lettered_total";
pub const QUEUE_DEPTH: &str = "weft_queue_depth";
pub const DLQ_DEPTH: &str = "weft_dlq_depth";
pub const OLDEST_PENDING: &str = "weft_oldest_pending_age_seconds";
pub const LATENCY: &str = "weft_end_to_end_latency_seconds";
pub const UNBALANCED: &str = "weft_accounting_unbalanced";
pub const CIRCUIT_STATE: &str = "weft_circuit_state";
pub const CIRCUIT_TRANSITIONS: &str = "weft_circuit_transitions_total";
pub const RATE_LIMIT_WAITS: &str = "weft_rate_limit_waits_total";
pub const RATE_LIMIT_WAIT_MS: &str = "weft_rate_limit_wait_milliseconds_total";
pub const BACKPRESSURE: &str = "weft_backpressure_rejections_total";
pub const SOURCE_UP: &str = "weft_source_up";
pub const SOURCE_RESTARTS: &str = "weft_source_restarts_total";
pub const SOURCE_LEASED: &str = "weft_source_lease_held";
pub const NODES_ALIVE: &str = "weft_nodes_alive";
pub const HEARTBEAT_AGE: &str = "weft_node_heartbeat_age_seconds";
pub const CLAIMS_REAPED: &str = "weft_claims_reaped_total";
pub const LAST_RECEIVED_AGE: &str = "weft_flow_last_received_age_seconds";
pub const FLOW_OLDEST_PENDING: &str = "weft_flow_oldest_pending_age_seconds";
pub const FRESHNESS_SLA: &str = "weft_freshness_sla_seconds";
pub const FRESHNESS_LATE: &str = "weft_freshness_late";
pub const FRESHNESS_ALERTS: &str = "weft_freshness_alerts_total";
pub const FILES_SKIPPED: &str = "weft_files_skipped_total";

/// A family's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: name, type, labels, help text.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn fam(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter as C, Gauge as G, Histogram as H};

/// Every family weft exports.
pub const FAMILIES: &[Family] = &[
    fam(
        RECEIVED,
        C,
        &["flow"],
        "Records a flow received (committed; duplicates excluded).",
    ),
    fam(
        FILTERED,
        C,
        &["flow"],
        "Records a flow's filter dropped (or that ended in a canonical record).",
    ),
    fam(
        REJECTED,
        C,
        &["flow"],
        "Records a flow rejected before delivery (parse, mapping or contract error), each a DLQ entry.",
    ),
    fam(
        DUPLICATES,
        C,
        &["source"],
        "Events a source handed again that were already accepted (not stored again).",
    ),
    fam(
        DELIVERED,
        C,
        &["flow", "destination"],
        "Writes a destination confirmed.",
    ),
    fam(
        FAILED,
        C,
        &["flow", "destination"],
        "Write attempts that failed (retried or dead-lettered).",
    ),
    fam(
        RETRIED,
        C,
        &["flow", "destination"],
        "Failed write attempts that will be retried.",
    ),
    fam(
        DEAD_LETTERED,
        C,
        &["flow", "destination"],
        "Deliveries moved to the DLQ (permanent error or attempts exhausted).",
    ),
    fam(
        QUEUE_DEPTH,
        G,
        &["flow", "destination"],
        "Rows waiting to be delivered, counted in the store.",
    ),
    fam(
        DLQ_DEPTH,
        G,
        &["flow", "destination"],
        "Dead DLQ entries (destination empty: rejected before delivery).",
    ),
    fam(
        OLDEST_PENDING,
        G,
        &["flow", "destination"],
        "Age of the oldest row waiting to be delivered (0 when none).",
    ),
    fam(
        LATENCY,
        H,
        &["flow", "destination"],
        "From acceptance by weft to the destination's confirmation.",
    ),
    fam(
        UNBALANCED,
        G,
        &["flow", "destination"],
        "1 when the record accounting of the lane does not add up (please report it).",
    ),
    fam(
        CIRCUIT_STATE,
        G,
        &["destination"],
        "Circuit breaker of a destination: 0 closed, 1 open, 2 half-open.",
    ),
    fam(
        CIRCUIT_TRANSITIONS,
        C,
        &["destination", "to"],
        "Circuit breaker state changes, by the state entered.",
    ),
    fam(
        RATE_LIMIT_WAITS,
        C,
        &["destination"],
        "Writes that waited for the destination's rate limit.",
    ),
    fam(
        RATE_LIMIT_WAIT_MS,
        C,
        &["destination"],
        "Milliseconds writes waited for the destination's rate limit.",
    ),
    fam(
        BACKPRESSURE,
        C,
        &["source"],
        "Batches a source was refused because a lane is over its backlog_high_water.",
    ),
    fam(
        SOURCE_UP,
        G,
        &["source"],
        "1 while a source runs (or finished), 0 while it is down waiting to be restarted.",
    ),
    fam(
        SOURCE_RESTARTS,
        C,
        &["source"],
        "Restarts of a failed source by its supervisor.",
    ),
    fam(
        SOURCE_LEASED,
        G,
        &["source"],
        "Several hubs on one PostgreSQL journal: 1 while this node holds the source's lease and runs it, 0 while another node does.",
    ),
    fam(
        NODES_ALIVE,
        G,
        &[],
        "Several hubs on one PostgreSQL journal: the nodes whose heartbeat is current, this one included.",
    ),
    fam(
        HEARTBEAT_AGE,
        G,
        &[],
        "Several hubs on one PostgreSQL journal: seconds since this node's last heartbeat the journal acknowledged (it claims no rows once this passes two thirds of `store.postgres.node_timeout`).",
    ),
    fam(
        CLAIMS_REAPED,
        C,
        &[],
        "Claimed rows of dead nodes (heartbeat run out) this node released for delivery elsewhere.",
    ),
    fam(
        LAST_RECEIVED_AGE,
        G,
        &["flow"],
        "Seconds since the flow's newest record was received (since the hub started if it never received one).",
    ),
    fam(
        FLOW_OLDEST_PENDING,
        G,
        &["flow"],
        "Age of the flow's oldest row waiting to be delivered, over all its destinations (0 when none).",
    ),
    fam(
        FRESHNESS_SLA,
        G,
        &["flow"],
        "The flow's expected freshness (`freshness`), seconds.",
    ),
    fam(
        FRESHNESS_LATE,
        G,
        &["flow"],
        "1 while the flow breaks its freshness SLA (newest record or oldest pending row older than `freshness`).",
    ),
    fam(
        FRESHNESS_ALERTS,
        C,
        &["flow", "status"],
        "Freshness alerts delivered to the alert webhook, by status (late, ok).",
    ),
    fam(
        crate::drift::DRIFT_EVENTS,
        C,
        &["source", "kind"],
        "Schema drift seen for the first time (new field, missing field, type change, new enum value).",
    ),
    fam(
        crate::contracts::VIOLATIONS,
        C,
        &["flow", "boundary", "mode"],
        "Contract violations, by boundary (entity, destination) and on_violation mode.",
    ),
    fam(
        FILES_SKIPPED,
        C,
        &["source"],
        "Files a drop folder skipped (already processed: same content hash).",
    ),
    fam(
        weft_connectors::rest::PAGE_ERRORS,
        C,
        &["source", "reason"],
        "REST pages that could not be used (asked for again with backoff).",
    ),
    fam(
        "weft_cdc_lag_seconds",
        G,
        &["source"],
        "CDC: from a change's commit to its storage in weft, seconds.",
    ),
    fam(
        "weft_cdc_slot_lag_bytes",
        G,
        &["source"],
        "PostgreSQL CDC: WAL bytes the replication slot holds behind the server.",
    ),
    fam(
        "weft_cdc_snapshot_rows",
        G,
        &["source"],
        "CDC: rows read by the source's current or last snapshot (initial, or of tables new to weft).",
    ),
    fam(
        "weft_topic_messages",
        G,
        &["topic"],
        "Topics inside the hub: messages the topic keeps (younger than its retention).",
    ),
    fam(
        "weft_topic_lag",
        G,
        &["topic", "flow"],
        "Topics inside the hub: messages the subscribing flow has not read yet.",
    ),
    fam(
        "weft_cdc_snapshot_rows_expected",
        G,
        &["source"],
        "CDC: the catalog's estimate of that snapshot's rows when it began (0: no estimate).",
    ),
];

/// `# HELP` for every family (on the installed recorder).
fn describe_all() {
    for f in FAMILIES {
        match f.kind {
            Kind::Counter => describe_counter!(f.name, f.help),
            Kind::Gauge => describe_gauge!(f.name, f.help),
            Kind::Histogram => describe_histogram!(f.name, Unit::Seconds, f.help),
        }
    }
}

/// Install the process-wide Prometheus recorder (once; later calls get the
/// same handle).
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(LATENCY.to_owned()),
                    &[
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        60.0, 300.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // a recorder may already be set (tests in one process): keep ours for rendering
            let _ = metrics::set_global_recorder(recorder);
            describe_all();
            handle
        })
        .clone()
}

pub fn flow_ingested(flow: &str, received: u64, filtered: u64, rejected: u64) {
    let f = flow.to_owned();
    counter!(RECEIVED, "flow" => f.clone()).increment(received);
    if filtered > 0 {
        counter!(FILTERED, "flow" => f.clone()).increment(filtered);
    }
    if rejected > 0 {
        counter!(REJECTED, "flow" => f).increment(rejected);
    }
}

pub fn duplicates(source: &str, n: u64) {
    counter!(DUPLICATES, "source" => source.to_owned()).increment(n);
}

pub fn delivered(flow: &str, dest: &str, n: u64, latencies_s: &[f64]) {
    counter!(DELIVERED, "flow" => flow.to_owned(), "destination" => dest.to_owned()).increment(n);
    let h = histogram!(LATENCY, "flow" => flow.to_owned(), "destination" => dest.to_owned());
    for l in latencies_s {
        h.record(*l);
    }
}

pub fn failed(flow: &str, dest: &str, retried: bool) {
    counter!(FAILED, "flow" => flow.to_owned(), "destination" => dest.to_owned()).increment(1);
    if retried {
        counter!(RETRIED, "flow" => flow.to_owned(), "destination" => dest.to_owned()).increment(1);
    }
}

pub fn dead_lettered(flow: &str, dest: &str) {
    counter!(DEAD_LETTERED, "flow" => flow.to_owned(), "destination" => dest.to_owned())
        .increment(1);
}

pub fn lane_gauges(flow: &str, dest: &str, pending: i64, oldest_ms: Option<i64>, balanced: bool) {
    gauge!(QUEUE_DEPTH, "flow" => flow.to_owned(), "destination" => dest.to_owned())
        .set(pending as f64);
    gauge!(OLDEST_PENDING, "flow" => flow.to_owned(), "destination" => dest.to_owned())
        .set(oldest_ms.unwrap_or(0) as f64 / 1000.0);
    gauge!(UNBALANCED, "flow" => flow.to_owned(), "destination" => dest.to_owned())
        .set(if balanced { 0.0 } else { 1.0 });
}

pub fn dlq_gauge(flow: &str, dest: &str, depth: i64) {
    gauge!(DLQ_DEPTH, "flow" => flow.to_owned(), "destination" => dest.to_owned())
        .set(depth as f64);
}

/// A topic's size and each subscriber's lag, as read from the store.
pub fn topic_gauges(lags: &[crate::topic::TopicState]) {
    for t in lags {
        gauge!("weft_topic_messages", "topic" => t.topic.clone()).set(t.messages as f64);
        for s in &t.subscribers {
            gauge!("weft_topic_lag", "topic" => t.topic.clone(), "flow" => s.flow.clone())
                .set(s.behind as f64);
        }
    }
}

/// The breaker's state as it is now (on a scrape: no transition counted).
pub fn breaker_gauge(dest: &str, state: crate::guard::State) {
    gauge!(CIRCUIT_STATE, "destination" => dest.to_owned()).set(state.gauge());
}

/// 0 closed, 1 open, 2 half-open.
pub fn breaker_state(dest: &str, state: crate::guard::State) {
    gauge!(CIRCUIT_STATE, "destination" => dest.to_owned()).set(state.gauge());
    counter!(CIRCUIT_TRANSITIONS, "destination" => dest.to_owned(), "to" => state.name())
        .increment(1);
}

pub fn rate_limit_wait(dest: &str, waited: std::time::Duration) {
    counter!(RATE_LIMIT_WAITS, "destination" => dest.to_owned()).increment(1);
    counter!(RATE_LIMIT_WAIT_MS, "destination" => dest.to_owned())
        .increment(waited.as_millis() as u64);
}

pub fn backpressure(source: &str) {
    counter!(BACKPRESSURE, "source" => source.to_owned()).increment(1);
}

/// 1 while a source runs (or finished its work), 0 while it is down and
/// waiting to be restarted.
pub fn source_up(source: &str, up: bool) {
    gauge!(SOURCE_UP, "source" => source.to_owned()).set(if up { 1.0 } else { 0.0 });
}

/// Whether this node holds `source`'s lease (several hubs on one journal).
pub fn source_leased(source: &str, held: bool) {
    gauge!(SOURCE_LEASED, "source" => source.to_owned()).set(if held { 1.0 } else { 0.0 });
}

/// Nodes alive on the shared journal, as last read.
pub fn nodes_alive(n: usize) {
    gauge!(NODES_ALIVE).set(n as f64);
}

/// Age of this node's last acknowledged heartbeat.
pub fn heartbeat_age(age: std::time::Duration) {
    gauge!(HEARTBEAT_AGE).set(age.as_secs_f64());
}

/// Claims of a dead node this node's heartbeat released.
pub fn claims_reaped(rows: u64) {
    counter!(CLAIMS_REAPED).increment(rows);
}

pub fn source_restarted(source: &str) {
    counter!(SOURCE_RESTARTS, "source" => source.to_owned()).increment(1);
}

/// A flow's freshness, as of now.
pub fn freshness_gauges(f: &crate::gauges::Freshness) {
    let flow = || f.flow.clone();
    if let Some(age) = f.newest_age {
        gauge!(LAST_RECEIVED_AGE, "flow" => flow()).set(age.as_secs_f64());
    }
    gauge!(FLOW_OLDEST_PENDING, "flow" => flow())
        .set(f.oldest_pending.unwrap_or_default().as_secs_f64());
    if let Some(sla) = f.sla {
        gauge!(FRESHNESS_SLA, "flow" => flow()).set(sla.as_secs_f64());
        gauge!(FRESHNESS_LATE, "flow" => flow()).set(if f.late() { 1.0 } else { 0.0 });
    }
}

pub fn freshness_alert(flow: &str, late: bool) {
    counter!(FRESHNESS_ALERTS, "flow" => flow.to_owned(), "status" => if late { "late" } else { "ok" })
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family is in the doc page's table, with its type and labels.
    #[test]
    fn docs_metrics_lists_every_family() {
        let page = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/metrics.md"
        ))
        .expect("docs/metrics.md");
        for f in FAMILIES {
            let row = page
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", f.name)))
                .unwrap_or_else(|| panic!("docs/metrics.md has no row for `{}`", f.name));
            assert!(row.contains(&format!("| {} |", f.kind.name())), "{row}");
            for l in f.labels {
                assert!(row.contains(&format!("`{l}`")), "{row}: label {l}");
            }
        }
        let names: std::collections::HashSet<_> = FAMILIES.iter().map(|f| f.name).collect();
        assert_eq!(names.len(), FAMILIES.len(), "a family listed twice");
    }
}
