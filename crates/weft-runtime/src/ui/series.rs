//! The dashboard's time series: a ring buffer per lane, in memory, filled
//! by the hub's gauge task (every 2 s, from the same store read as the
//! gauges, so it costs no read of its own) and by the lanes' own counters
//! (latency, failed attempts). History restarts with the process.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use weft_store::FlowCounts;

use crate::delivery::LaneHandle;

/// Points kept per lane: 15 minutes at one point every 2 s.
pub const KEEP: usize = 450;

/// One lane at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Point {
    at_ms: i64,
    /// Store counters (they survive restarts).
    received: i64,
    delivered: i64,
    pending: i64,
    dlq: i64,
    /// The lane's in-memory totals since the start.
    rows: u64,
    latency_ms: u64,
    failed: u64,
}

/// Rates between two points.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rate {
    pub at_ms: i64,
    /// Rows delivered per second.
    pub throughput: f64,
    /// Records received per second.
    pub received: f64,
    /// Mean delivery latency (accepted to settled) of the rows delivered
    /// in the interval, ms; `None` when none was.
    pub latency_ms: Option<f64>,
    /// Failed write attempts over all attempts, 0 to 1; `None` without
    /// attempts.
    pub error_rate: Option<f64>,
    pub pending: i64,
    pub dlq: i64,
}

/// The ring buffers of every lane.
pub struct Series {
    handles: Vec<Arc<LaneHandle>>,
    lanes: Mutex<HashMap<(String, String), VecDeque<Point>>>,
}

impl Series {
    pub fn new(handles: Vec<Arc<LaneHandle>>) -> Series {
        Series {
            handles,
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// Add a point per lane from one snapshot of the store's counts.
    pub fn record(&self, at_ms: i64, counts: &[FlowCounts], dlq: &[(String, String, i64)]) {
        let Ok(mut lanes) = self.lanes.lock() else {
            return;
        };
        for c in counts {
            let h = self
                .handles
                .iter()
                .find(|h| h.flow == c.flow && h.dest == c.destination);
            let p = Point {
                at_ms,
                received: c.received,
                delivered: c.delivered,
                pending: c.pending,
                dlq: dlq
                    .iter()
                    .find(|(f, d, _)| *f == c.flow && *d == c.destination)
                    .map_or(0, |x| x.2),
                rows: h.map_or(0, |h| h.delivered_rows.load(Ordering::Relaxed)),
                latency_ms: h.map_or(0, |h| h.delivered_latency_ms.load(Ordering::Relaxed)),
                failed: h.map_or(0, |h| h.failed_attempts.load(Ordering::Relaxed)),
            };
            let q = lanes
                .entry((c.flow.clone(), c.destination.clone()))
                .or_default();
            if q.len() == KEEP {
                q.pop_front();
            }
            q.push_back(p);
        }
    }

    /// A lane's rates, oldest first (one fewer than its points).
    pub fn rates(&self, flow: &str, dest: &str) -> Vec<Rate> {
        let Ok(lanes) = self.lanes.lock() else {
            return Vec::new();
        };
        let Some(q) = lanes.get(&(flow.to_owned(), dest.to_owned())) else {
            return Vec::new();
        };
        q.iter()
            .zip(q.iter().skip(1))
            .map(|(a, b)| rate(a, b))
            .collect()
    }
}

fn rate(a: &Point, b: &Point) -> Rate {
    let dt = ((b.at_ms - a.at_ms).max(1)) as f64 / 1000.0;
    let rows = b.rows.saturating_sub(a.rows);
    let failed = b.failed.saturating_sub(a.failed);
    Rate {
        at_ms: b.at_ms,
        throughput: (b.delivered - a.delivered).max(0) as f64 / dt,
        received: (b.received - a.received).max(0) as f64 / dt,
        latency_ms: (rows > 0)
            .then(|| b.latency_ms.saturating_sub(a.latency_ms) as f64 / rows as f64),
        error_rate: (rows + failed > 0).then(|| failed as f64 / (rows + failed) as f64),
        pending: b.pending,
        dlq: b.dlq,
    }
}

/// Mean of the rates of the last `n` intervals that have a value.
pub fn recent(rates: &[Rate], n: usize, f: impl Fn(&Rate) -> Option<f64>) -> Option<f64> {
    let vals: Vec<f64> = rates.iter().rev().take(n).filter_map(f).collect();
    (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
}

/// An inline SVG sparkline of `values` (missing values as gaps at 0),
/// `w` × `h` pixels, with the last value's dot. Empty input: a flat line.
pub fn sparkline(values: &[f64], w: u32, h: u32, label: &str) -> String {
    let mut svg = format!(
        r#"<svg class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{}"><title>{}</title>"#,
        escape(label),
        escape(label)
    );
    let max = values.iter().cloned().fold(0.0_f64, f64::max);
    let n = values.len();
    if n < 2 {
        let _ = write!(
            svg,
            r#"<line x1="0" y1="{y}" x2="{w}" y2="{y}" class="flat"/>"#,
            y = h - 1
        );
    } else {
        let x = |i: usize| i as f64 * (w as f64 - 2.0) / (n - 1) as f64 + 1.0;
        let y = |v: f64| {
            if max <= 0.0 {
                h as f64 - 1.0
            } else {
                (h as f64 - 2.0) - v / max * (h as f64 - 4.0) + 1.0
            }
        };
        let mut d = String::new();
        for (i, v) in values.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if i == 0 { "M" } else { "L" },
                x(i),
                y(*v)
            );
        }
        let _ = write!(
            svg,
            r#"<path d="{}"/><circle cx="{:.1}" cy="{:.1}" r="2"/>"#,
            d.trim_end(),
            x(n - 1),
            y(values[n - 1])
        );
    }
    svg.push_str("</svg>");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(delivered: i64, pending: i64) -> FlowCounts {
        FlowCounts {
            flow: "f".into(),
            destination: "d".into(),
            received: delivered + pending,
            filtered: 0,
            rejected: 0,
            delivered,
            dead_lettered: 0,
            discarded: 0,
            pending,
            oldest_pending_ms: None,
            last_received_at: None,
            balanced: true,
        }
    }

    #[test]
    fn rates_come_from_consecutive_points_and_the_buffer_is_bounded() {
        let h = Arc::new(LaneHandle::new("f", "d", 0, 1000));
        let s = Series::new(vec![h.clone()]);
        s.record(0, &[counts(0, 5)], &[]);
        h.delivered_rows.store(10, Ordering::Relaxed);
        h.delivered_latency_ms.store(500, Ordering::Relaxed);
        h.failed_attempts.store(10, Ordering::Relaxed);
        s.record(2000, &[counts(10, 1)], &[("f".into(), "d".into(), 3)]);
        let r = s.rates("f", "d");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].throughput, 5.0);
        assert_eq!(r[0].latency_ms, Some(50.0));
        assert_eq!(r[0].error_rate, Some(0.5));
        assert_eq!((r[0].pending, r[0].dlq), (1, 3));
        for i in 0..(KEEP as i64 + 10) {
            s.record(4000 + i * 2000, &[counts(10, 1)], &[]);
        }
        assert_eq!(s.rates("f", "d").len(), KEEP - 1);
        assert!(s.rates("f", "other").is_empty());
    }

    #[test]
    fn a_sparkline_escapes_its_label_and_draws_every_point() {
        let svg = sparkline(&[0.0, 2.0, 1.0], 100, 20, "a<b>\"c\"");
        assert!(svg.contains("a&lt;b&gt;&quot;c&quot;"), "{svg}");
        assert_eq!(svg.matches('L').count(), 2, "{svg}");
        assert!(sparkline(&[], 100, 20, "x").contains("class=\"flat\""));
    }
}
