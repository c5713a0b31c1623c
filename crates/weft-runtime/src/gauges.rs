//! Gauges of stored state, current when read: set from the store and the
//! guards on every scrape of `/metrics` and every 2 s. Freshness per flow
//! (`freshness: 15m`) and its alerts.
//!
//! # Freshness
//!
//! A flow is *late* when its newest record was received longer ago than
//! `freshness`, or when one of its rows has waited longer than that to be
//! delivered. Both come from the store: the flow's `last_received_at`
//! (set in the ingest's transaction) and the oldest outbox row of each of
//! its lanes. A flow that never received a record counts from the hub's
//! start (`weft status`, which has no start, calls it late).
//!
//! # Alerts
//!
//! With `alerts.webhook` (top-level or the flow's), the hub POSTs a
//! structured CloudEvent (`application/cloudevents+json`, type
//! `weft.freshness.late` or `weft.freshness.ok`) when the flow becomes late
//! and once more when it recovers: a change of state is announced once,
//! not on every tick. A POST that fails is tried again (2 s doubling to
//! 60 s) until one succeeds or the state changes back. The announced state
//! is not stored: it is recomputed at start, where every flow counts as
//! announced ok, so a flow still late after a restart is announced again
//! (the previous run may have died before its POST).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_core::config::{AlertTarget, Flow};
use weft_store::{FlowCounts, Journal, LaneId, StoreError};

use crate::guard::Guard;
use crate::metrics as m;

/// A flow's freshness at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Freshness {
    pub flow: String,
    /// The flow's `freshness`, if it has one.
    pub sla: Option<Duration>,
    /// When the newest record was received (ms since 1970), if ever.
    pub newest_at: Option<i64>,
    /// Its age; from the hub's start when the flow never received one;
    /// `None` when neither is known (`weft status`).
    pub newest_age: Option<Duration>,
    /// Age of the flow's oldest pending row over all its destinations.
    pub oldest_pending: Option<Duration>,
}

impl Freshness {
    /// Breaking its SLA now (never without one).
    pub fn late(&self) -> bool {
        let Some(sla) = self.sla else {
            return false;
        };
        self.newest_age.is_none_or(|a| a > sla) || self.oldest_pending.is_some_and(|a| a > sla)
    }

    /// Why it is late or ok, in words.
    pub fn reason(&self) -> String {
        let Some(sla) = self.sla else {
            return "no freshness SLA".into();
        };
        let mut why = Vec::new();
        match (self.newest_age, self.newest_at) {
            (None, _) => why.push("no record received yet".to_owned()),
            (Some(a), None) if a > sla => why.push(format!(
                "no record received in the {} since the hub started",
                human(a)
            )),
            (Some(a), _) if a > sla => why.push(format!("newest record received {} ago", human(a))),
            _ => {}
        }
        if let Some(a) = self.oldest_pending.filter(|a| *a > sla) {
            why.push(format!("a record has waited {} to be delivered", human(a)));
        }
        if why.is_empty() {
            format!(
                "newest record {} ago, oldest pending {}, within {}",
                self.newest_age.map_or("-".into(), human),
                self.oldest_pending.map_or("none".into(), human),
                human(sla)
            )
        } else {
            format!("{} (freshness {})", why.join("; "), human(sla))
        }
    }
}

/// `1h2m`, `3m4s`, `5.2s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Every flow's freshness from one snapshot of the counts. `started_ms`:
/// when the hub started (the age of a flow that never received a record).
pub fn freshness(
    flows: &[Arc<Flow>],
    counts: &[FlowCounts],
    now_ms: i64,
    started_ms: Option<i64>,
) -> Vec<Freshness> {
    let age = |at: i64| Duration::from_millis((now_ms - at).max(0) as u64);
    flows
        .iter()
        .map(|f| {
            let lanes = counts.iter().filter(|c| c.flow == f.name);
            let newest_at = lanes.clone().filter_map(|c| c.last_received_at).max();
            let oldest_pending = lanes
                .filter_map(|c| c.oldest_pending_ms)
                .max()
                .map(|ms| Duration::from_millis(ms.max(0) as u64));
            Freshness {
                flow: f.name.clone(),
                sla: f.freshness,
                newest_at,
                newest_age: newest_at.or(started_ms).map(age),
                oldest_pending,
            }
        })
        .collect()
}

/// The hub's gauges of stored state.
pub struct Gauges {
    journal: Arc<dyn Journal>,
    lanes: Vec<LaneId>,
    guards: Vec<(String, Arc<Guard>)>,
    flows: Vec<Arc<Flow>>,
    started_ms: i64,
    /// Lanes with a DLQ gauge set: set to 0 once their entries are gone.
    dlq_seen: std::sync::Mutex<HashSet<(String, String)>>,
    /// One refresh at a time; a scrape right after another reuses it.
    last: tokio::sync::Mutex<Option<Instant>>,
    /// The config, when it has topics: their sizes and subscribers' lags.
    topics: Option<Arc<weft_core::config::Config>>,
}

/// What one refresh read.
pub struct Snapshot {
    pub counts: Vec<FlowCounts>,
    pub freshness: Vec<Freshness>,
    /// Dead entries per (flow, destination).
    pub dlq: Vec<(String, String, i64)>,
}

impl Gauges {
    pub fn new(
        journal: Arc<dyn Journal>,
        lanes: Vec<LaneId>,
        guards: Vec<(String, Arc<Guard>)>,
        flows: Vec<Arc<Flow>>,
    ) -> Gauges {
        Gauges {
            journal,
            lanes,
            guards,
            flows,
            started_ms: weft_store::now_ms(),
            dlq_seen: Default::default(),
            last: tokio::sync::Mutex::new(None),
            topics: None,
        }
    }

    /// Also the topics of `config` (`weft_topic_messages`, `weft_topic_lag`).
    pub fn with_topics(mut self, config: Arc<weft_core::config::Config>) -> Gauges {
        if !config.topics.is_empty() {
            self.topics = Some(config);
        }
        self
    }

    /// For a scrape: refresh, unless a refresh that started after this
    /// scrape arrived has finished meanwhile (concurrent scrapes share one
    /// read; none is answered with values older than its own arrival, so
    /// a commit a client saw acknowledged before scraping is in them).
    pub async fn refresh_for_scrape(&self) {
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if last.is_some_and(|started| started >= arrived) {
            return;
        }
        let started = Instant::now();
        if let Err(e) = self.read_and_set().await {
            tracing::warn!(error = %e, "cannot refresh the gauges from the store");
        }
        *last = Some(started);
    }

    /// Read the store, set every gauge, and give what was read.
    pub async fn refresh(&self) -> Result<Snapshot, StoreError> {
        let mut last = self.last.lock().await;
        let started = Instant::now();
        let s = self.read_and_set().await;
        *last = Some(started);
        s
    }

    async fn read_and_set(&self) -> Result<Snapshot, StoreError> {
        let j = self.journal.clone();
        let l = self.lanes.clone();
        let shared = j.shared();
        let topics = self.topics.clone();
        let (counts, dlq, nodes, topics) = tokio::task::spawn_blocking(move || {
            let reader = j.read();
            let nodes = if shared { Some(reader.nodes()?) } else { None };
            let topics = match topics {
                Some(c) => crate::topic::states(reader, &c)?,
                None => Vec::new(),
            };
            Ok::<_, StoreError>((reader.counts(&l)?, reader.dlq_depths()?, nodes, topics))
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("gauge task failed: {e}")))??;
        m::topic_gauges(&topics);
        if let Some(nodes) = nodes {
            m::nodes_alive(nodes.iter().filter(|n| n.alive).count());
        }
        for c in &counts {
            m::lane_gauges(
                &c.flow,
                &c.destination,
                c.pending,
                c.oldest_pending_ms,
                c.balanced,
            );
        }
        let now: HashSet<(String, String)> =
            dlq.iter().map(|(f, d, _)| (f.clone(), d.clone())).collect();
        for (flow, dest, n) in &dlq {
            m::dlq_gauge(flow, dest, *n);
        }
        if let Ok(mut seen) = self.dlq_seen.lock() {
            // every lane has a DLQ gauge, 0 when its entries are gone
            let lanes = self
                .lanes
                .iter()
                .map(|l| (l.flow.clone(), l.destination.clone()));
            for (f, d) in seen.iter().cloned().chain(lanes) {
                if !now.contains(&(f.clone(), d.clone())) {
                    m::dlq_gauge(&f, &d, 0);
                }
            }
            seen.extend(now);
        }
        for (dest, g) in &self.guards {
            m::breaker_gauge(dest, g.state());
        }
        let freshness = freshness(
            &self.flows,
            &counts,
            weft_store::now_ms(),
            Some(self.started_ms),
        );
        for f in &freshness {
            m::freshness_gauges(f);
        }
        Ok(Snapshot {
            counts,
            freshness,
            dlq,
        })
    }
}

/// Announces freshness changes to the alert webhooks (see the module docs).
pub struct Alerter {
    client: reqwest::Client,
    targets: HashMap<String, Arc<AlertTarget>>,
    state: HashMap<String, Announced>,
}

#[derive(Debug, Default)]
struct Announced {
    late: bool,
    failures: u32,
    next_try: Option<Instant>,
}

impl Alerter {
    pub fn new(flows: &[Arc<Flow>]) -> Alerter {
        let targets = flows
            .iter()
            .filter(|f| f.freshness.is_some())
            .filter_map(|f| Some((f.name.clone(), f.alerts.clone()?)))
            .collect();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("weft/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Alerter {
            client,
            targets,
            state: HashMap::new(),
        }
    }

    /// Announce each flow whose state differs from what was announced.
    pub async fn tick(&mut self, now: &[Freshness]) {
        for f in now {
            let Some(target) = self.targets.get(&f.flow).cloned() else {
                continue;
            };
            let late = f.late();
            let st = self.state.entry(f.flow.clone()).or_default();
            if st.late == late {
                st.failures = 0;
                st.next_try = None;
                continue;
            }
            if st.next_try.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            match post(&self.client, &target, f, late).await {
                Ok(()) => {
                    tracing::info!(flow = %f.flow, late, reason = %f.reason(), "freshness alert sent");
                    m::freshness_alert(&f.flow, late);
                    *st = Announced {
                        late,
                        ..Default::default()
                    };
                }
                Err(e) => {
                    st.failures += 1;
                    let wait = Duration::from_secs(2u64.saturating_pow(st.failures).min(60));
                    st.next_try = Some(Instant::now() + wait);
                    tracing::warn!(flow = %f.flow, late, error = %e, retry_in_s = wait.as_secs(), "cannot send the freshness alert");
                }
            }
        }
    }
}

/// The alert: a structured CloudEvent.
pub fn alert_event(f: &Freshness, late: bool, now_ms: i64) -> serde_json::Value {
    let time = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let status = if late { "late" } else { "ok" };
    serde_json::json!({
        "specversion": weft_core::event::SPECVERSION,
        "id": format!("{}:{status}:{now_ms}", f.flow),
        "source": format!("weft/{}", f.flow),
        "type": format!("weft.freshness.{status}"),
        "subject": f.flow,
        "time": time(now_ms),
        "datacontenttype": "application/json",
        "data": {
            "flow": f.flow,
            "status": status,
            "freshness_seconds": f.sla.map(|d| d.as_secs_f64()),
            "newest_received_at": f.newest_at.map(time),
            "newest_received_age_seconds": f.newest_age.map(|d| d.as_secs_f64()),
            "oldest_pending_age_seconds": f.oldest_pending.map(|d| d.as_secs_f64()),
            "reason": f.reason(),
        }
    })
}

async fn post(
    client: &reqwest::Client,
    target: &AlertTarget,
    f: &Freshness,
    late: bool,
) -> Result<(), String> {
    let body = alert_event(f, late, weft_store::now_ms());
    let mut req = client
        .post(&target.url)
        .header(
            reqwest::header::CONTENT_TYPE,
            weft_connectors::http::CLOUDEVENTS_JSON,
        )
        .body(body.to_string());
    for (k, v) in &target.headers {
        req = req.header(k.as_str(), v.expose());
    }
    // the error names the status only: the URL or a header may hold a secret
    let resp = req
        .send()
        .await
        .map_err(|e| format!("sending the alert failed: {}", e.without_url()))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the alert webhook answered {}", resp.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fr(sla: u64, newest: Option<u64>, pending: Option<u64>) -> Freshness {
        Freshness {
            flow: "f".into(),
            sla: Some(Duration::from_secs(sla)),
            newest_at: newest.map(|_| 1),
            newest_age: newest.map(Duration::from_secs),
            oldest_pending: pending.map(Duration::from_secs),
        }
    }

    #[test]
    fn late_when_either_age_is_past_the_sla() {
        assert!(!fr(60, Some(10), None).late());
        assert!(fr(60, Some(61), None).late());
        assert!(fr(60, Some(1), Some(61)).late());
        assert!(
            fr(60, None, None).late(),
            "nothing received, no start known"
        );
        let no_sla = Freshness {
            sla: None,
            ..fr(60, Some(1000), Some(1000))
        };
        assert!(!no_sla.late());
        assert!(fr(60, Some(61), Some(70)).reason().contains("waited 1m10s"));
    }
}
