//! Metric names and the helpers that record them. Names and labels are
//! constants so every component reports the same set.
//!
//! Counters come from the code paths as they happen; gauges (queue depth,
//! DLQ depth, oldest pending age, accounting) are refreshed from the store
//! every few seconds, so they are right after a restart too.

use metrics::{counter, gauge, histogram};
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

pub const SOURCE_UP: &str = "weft_source_up";
pub const SOURCE_RESTARTS: &str = "weft_source_restarts_total";

/// 1 while a source runs (or finished its work), 0 while it is down and
/// waiting to be restarted.
pub fn source_up(source: &str, up: bool) {
    gauge!(SOURCE_UP, "source" => source.to_owned()).set(if up { 1.0 } else { 0.0 });
}

pub fn source_restarted(source: &str) {
    counter!(SOURCE_RESTARTS, "source" => source.to_owned()).increment(1);
}
