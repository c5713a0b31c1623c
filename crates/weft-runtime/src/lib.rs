//! weft's engine: wires a validated config to the store and the connectors.
//!
//! Data path: source -> [`ingest::Ingestor`] (filter, key, mapping per flow;
//! one store transaction for inbox, outbox, DLQ and checkpoint) -> delivery
//! lanes ([`delivery`], one per flow and destination) -> sink. See
//! ARCHITECTURE.md for the guarantees.

pub mod admin;
pub mod contracts;
pub mod delivery;
pub mod dlq;
pub mod dlq_jobs;
pub mod drift;
pub mod gauges;
pub mod guard;
pub mod health;
pub mod identity;
pub mod ingest;
pub mod lease;
pub mod metrics;
pub mod references;
pub mod server;
pub mod telemetry;
pub mod testing;
pub mod topic;
pub mod ui;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weft_connectors::{Ingest, SourceHandle, build_sink, build_source};
use weft_core::config::Config;
use weft_store::{Dedupe, Journal, LaneId, Role, SqliteJournal, StoreError};

pub use ingest::{prepare, prepare_with, run_flow};

/// The runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot open the store at {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: weft_store::StoreError,
    },
    #[error(transparent)]
    Sink(#[from] weft_connectors::sink::BuildError),
    #[error(transparent)]
    Source(#[from] weft_connectors::SourceError),
}

/// A running hub.
pub struct Runtime {
    pub config: Arc<Config>,
    pub journal: Arc<dyn Journal>,
    source_stop: CancellationToken,
    lane_stop: CancellationToken,
    accepting: Arc<AtomicBool>,
    health: Arc<health::Health>,
    sources: Vec<(String, JoinHandle<Result<(), weft_connectors::SourceError>>)>,
    /// `(subscription, topic)` of every flow reading a topic: sources that
    /// never finish, idle when caught up with their topic.
    subscriptions: Vec<(String, String)>,
    lanes: Vec<JoinHandle<()>>,
    /// Heartbeats on a shared journal; stopped after the lanes.
    membership_stop: CancellationToken,
    membership_task: Option<JoinHandle<()>>,
    webhooks: Vec<(weft_connectors::webhook::WebhookRoute, Arc<dyn Ingest>)>,
    /// Every sink, to flush on shutdown.
    sinks: Vec<(String, Arc<dyn weft_connectors::Sink>)>,
    gauges: JoinHandle<()>,
    /// Gauges of stored state, also set on every scrape.
    stored_gauges: Arc<gauges::Gauges>,
    /// What the dashboard shows besides the store: breakers, the lanes'
    /// series, sources' health.
    guards: Vec<(String, Arc<guard::Guard>)>,
    series: Arc<ui::Series>,
}

impl Runtime {
    /// Open the store, build every sink and source, start the lanes and
    /// the source tasks. Webhook routes are served by [`Runtime::router`].
    pub async fn start(config: Config) -> Result<Runtime, RuntimeError> {
        let _ = metrics::install();
        let journal = open_journal(&config)?;
        let config = Arc::new(config);
        let source_stop = CancellationToken::new();
        let lane_stop = CancellationToken::new();
        let accepting = Arc::new(AtomicBool::new(true));
        // spans only where the binary installed an exporter (`telemetry.otlp`)
        let tracer = if config.otlp.is_some() {
            telemetry::Tracer::installed()
        } else {
            telemetry::Tracer::off()
        };

        // sinks: one per system, shared by the lanes that write to it; a
        // destination that cannot be reached now does not stop the hub
        let mut sinks = BTreeMap::new();
        let mut down_at_start = Vec::new();
        for (name, sys) in &config.systems {
            if let Some(spec) = &sys.sink {
                let used = config
                    .flows
                    .iter()
                    .any(|f| f.destinations.iter().any(|d| &d.system == name));
                if used {
                    let built = build_sink(name, spec).await?;
                    if let Some(why) = built.down {
                        tracing::warn!(
                            destination = %name,
                            error = %why,
                            "destination unreachable at start: its lanes start with the \
                             circuit breaker open; deliveries wait in the store"
                        );
                        down_at_start.push(name.clone());
                    }
                    sinks.insert(name.clone(), built.sink);
                }
            }
        }
        // topics inside the hub: a sink per topic a flow publishes to, and
        // one wake-up per topic for the subscribers in this process
        let published: BTreeMap<String, Arc<tokio::sync::Notify>> = config
            .topics
            .keys()
            .map(|t| (t.clone(), Arc::new(tokio::sync::Notify::new())))
            .collect();
        for (name, wake) in &published {
            let used = config
                .flows
                .iter()
                .any(|f| f.destinations.iter().any(|d| &d.system == name));
            if used {
                sinks.insert(
                    name.clone(),
                    Arc::new(topic::TopicSink {
                        topic: name.clone(),
                        journal: journal.clone(),
                        published: wake.clone(),
                    }) as Arc<dyn weft_connectors::Sink>,
                );
            }
        }
        // guards: one per destination system, shared by its lanes
        let guards: BTreeMap<String, Arc<guard::Guard>> = sinks
            .keys()
            .map(|name| {
                let sys = config.systems.get(name);
                (
                    name.clone(),
                    Arc::new(guard::Guard::new(
                        name,
                        sys.and_then(|s| s.breaker.as_ref()),
                        sys.and_then(|s| s.rate_limit.as_ref()),
                    )),
                )
            })
            .collect();
        for name in &down_at_start {
            if let Some(g) = guards.get(name) {
                g.trip();
            }
        }
        // lanes, starting with the backlog the store holds
        let pending: BTreeMap<(String, String), i64> = journal
            .read()
            .counts(&lane_list(&config))
            .map(|c| {
                c.into_iter()
                    .map(|c| ((c.flow, c.destination), c.pending))
                    .collect()
            })
            .unwrap_or_default();
        // membership of a shared journal: heartbeats, and the claims of
        // dead nodes released; lanes claim only while it is fresh
        let membership_stop = CancellationToken::new();
        let node_timeout = config
            .store
            .postgres
            .as_ref()
            .map_or(lease::NODE_TIMEOUT, |pg| pg.node_timeout);
        let (membership, membership_task) = if journal.shared() {
            let m = lease::Membership::shared(node_timeout);
            let task = tokio::spawn(lease::run_membership(
                journal.clone(),
                m.clone(),
                membership_stop.clone(),
            ));
            (m, Some(task))
        } else {
            (lease::Membership::single(), None)
        };
        let mut lanes = Vec::new();
        let mut handles: Vec<Arc<delivery::LaneHandle>> = Vec::new();
        for flow in &config.flows {
            for d in &flow.destinations {
                let (Some(sink), Some(guard)) = (sinks.get(&d.system), guards.get(&d.system))
                else {
                    continue;
                };
                let handle = Arc::new(delivery::LaneHandle::new(
                    &flow.name,
                    &d.system,
                    pending
                        .get(&(flow.name.clone(), d.system.clone()))
                        .copied()
                        .unwrap_or(0),
                    d.delivery.backlog_high_water,
                ));
                handles.push(handle.clone());
                let lane = delivery::Lane {
                    flow: flow.name.clone(),
                    dest: d.system.clone(),
                    policy: d.delivery.clone(),
                    sink: sink.clone(),
                    guard: guard.clone(),
                    journal: journal.clone(),
                    handle,
                    shutdown: lane_stop.clone(),
                    redact: !flow.data.sensitive().is_empty(),
                    identity: flow.identity.as_ref().map(|_| {
                        Arc::new(identity::LaneIdentity {
                            destination: d.system.clone(),
                            mapping: d.mapping.clone(),
                        })
                    }),
                    references: (!d.references.is_empty()).then(|| {
                        Arc::new(references::LaneRefs {
                            destination: d.system.clone(),
                            refs: d.references.clone(),
                        })
                    }),
                    tracer: tracer.clone(),
                    membership: membership.clone(),
                };
                lanes.push(tokio::spawn(lane.run()));
            }
        }
        // sources: task sources run under a supervisor (restarted with
        // backoff after an error; `/readyz` fails while one is down)
        let mut built_sources = Vec::new();
        for (name, sys) in &config.systems {
            if let Some(spec) = &sys.source {
                built_sources.push((name.clone(), spec.clone(), build_source(name, spec)?));
            }
        }
        // a subscription per flow reading a topic: a source of its own
        let subscriptions: Vec<(String, Arc<weft_core::config::Flow>)> = config
            .flows
            .iter()
            .filter(|f| config.topics.contains_key(&f.from))
            .map(|f| (topic::subscription(&f.from, &f.name), f.clone()))
            .collect();
        let health = Arc::new(
            health::Health::new(
                built_sources
                    .iter()
                    .filter_map(|(name, _, h)| {
                        matches!(h, SourceHandle::Task(_)).then_some(name.as_str())
                    })
                    .chain(subscriptions.iter().map(|(name, _)| name.as_str())),
            )
            .with_membership(membership.clone()),
        );
        let mut sources = Vec::new();
        let mut webhooks = Vec::new();
        let mut trackers: Vec<Arc<drift::Tracker>> = Vec::new();
        for (name, spec, built) in built_sources {
            let sys = &config.systems[&name];
            let Some(spec_ref) = &sys.source else {
                continue;
            };
            let name = &name;
            let flows: Vec<_> = config
                .flows
                .iter()
                .filter(|f| &f.from == name)
                .cloned()
                .collect();
            let my_lanes = handles
                .iter()
                .filter(|h| flows.iter().any(|f| f.name == h.flow))
                .cloned()
                .collect();
            // sources that resume from an exact position never hand an event
            // twice: no dedupe table for them
            let dedupe = match spec_ref {
                weft_core::config::SourceSpec::File { .. }
                | weft_core::config::SourceSpec::Generate { .. }
                | weft_core::config::SourceSpec::PostgresCdc { .. }
                | weft_core::config::SourceSpec::MysqlCdc { .. } => Dedupe::Position,
                _ => Dedupe::Id,
            };
            let tracker = Arc::new({
                let t = drift::Tracker::open(journal.read(), name, &flows);
                // a change event's positions and times are new in
                // every event: not drift
                if matches!(
                    spec_ref,
                    weft_core::config::SourceSpec::PostgresCdc { .. }
                        | weft_core::config::SourceSpec::MysqlCdc { .. }
                ) {
                    t.ignoring("/source")
                } else {
                    t
                }
            });
            trackers.push(tracker.clone());
            // a source other than webhooks runs on one node at a time when
            // hubs share the journal: its batches carry the lease's epoch
            let fence = (journal.shared() && matches!(built, SourceHandle::Task(_)))
                .then(|| Arc::new(std::sync::atomic::AtomicI64::new(0)));
            // a source that replays from its checkpoint writes its keyless
            // rows itself where it can (`ingest::DirectLane`)
            let direct = if dedupe == Dedupe::Position {
                direct_lanes(&flows, &sinks, &guards, &handles)
            } else {
                Vec::new()
            };
            let ingestor: Arc<dyn Ingest> = Arc::new(ingest::Ingestor {
                direct,
                fence: fence.clone(),
                system: name.clone(),
                drift: Some(tracker),
                flows,
                journal: journal.clone(),
                dedupe,
                lanes: my_lanes,
                accepting: accepting.clone(),
                tracer: tracer.clone(),
            });
            match built {
                SourceHandle::Task(src) => {
                    let task = spawn_source(
                        name,
                        health::rebuild_from(name, spec),
                        src,
                        ingestor,
                        SourceRun {
                            stop: source_stop.clone(),
                            health: &health,
                            journal: &journal,
                            fence,
                            node_timeout,
                        },
                    );
                    sources.push((name.clone(), task));
                }
                SourceHandle::Routes(route) => webhooks.push((route, ingestor)),
            }
        }
        let subscribed: Vec<(String, String)> = subscriptions
            .iter()
            .map(|(name, f)| (name.clone(), f.from.clone()))
            .collect();
        for (name, flow) in subscriptions {
            let Some(wake) = published.get(&flow.from) else {
                continue;
            };
            let make = {
                let (name, journal, wake) = (name.clone(), journal.clone(), wake.clone());
                let (topic, start) = (flow.from.clone(), flow.start.unwrap_or_default());
                move || -> Box<dyn weft_connectors::Source> {
                    Box::new(topic::TopicSource {
                        topic: topic.clone(),
                        name: name.clone(),
                        start,
                        journal: journal.clone(),
                        published: wake.clone(),
                    })
                }
            };
            let fence = journal
                .shared()
                .then(|| Arc::new(std::sync::atomic::AtomicI64::new(0)));
            let ingestor: Arc<dyn Ingest> = Arc::new(ingest::Ingestor {
                // a subscription resumes from its exact position too
                direct: direct_lanes(std::slice::from_ref(&flow), &sinks, &guards, &handles),
                fence: fence.clone(),
                system: name.clone(),
                drift: None,
                flows: vec![flow.clone()],
                journal: journal.clone(),
                dedupe: Dedupe::Position,
                lanes: handles
                    .iter()
                    .filter(|h| h.flow == flow.name)
                    .cloned()
                    .collect(),
                accepting: accepting.clone(),
                tracer: tracer.clone(),
            });
            let first = make();
            let task = spawn_source(
                &name,
                Arc::new(move || Ok(Some(make()))),
                first,
                ingestor,
                SourceRun {
                    stop: source_stop.clone(),
                    health: &health,
                    journal: &journal,
                    fence,
                    node_timeout,
                },
            );
            sources.push((name, task));
        }
        let stored_gauges = Arc::new(
            gauges::Gauges::new(
                journal.clone(),
                lane_list(&config),
                guards.iter().map(|(k, g)| (k.clone(), g.clone())).collect(),
                config.flows.clone(),
            )
            .with_topics(config.clone()),
        );
        let series = Arc::new(ui::Series::new(handles.clone()));
        let gauges = tokio::spawn(refresh_gauges(
            journal.clone(),
            stored_gauges.clone(),
            gauges::Alerter::new(&config.flows),
            handles,
            config.clone(),
            series.clone(),
            trackers,
        ));
        tracing::info!(
            store = %store_name(&config),
            flows = config.flows.len(),
            lanes = lanes.len(),
            "weft started"
        );
        Ok(Runtime {
            config,
            journal,
            source_stop,
            lane_stop,
            accepting,
            health,
            sources,
            subscriptions: subscribed,
            lanes,
            membership_stop,
            membership_task,
            webhooks,
            sinks: sinks.into_iter().collect(),
            gauges,
            stored_gauges,
            guards: guards.into_iter().collect(),
            series,
        })
    }

    /// The HTTP routes of the two listeners: webhooks on the public one;
    /// admin API and metrics on the admin one; health on both.
    pub fn routers(&mut self) -> server::Routers {
        let webhooks = std::mem::take(&mut self.webhooks);
        let jobs = dlq_jobs::Jobs::new(self.config.clone(), self.journal.clone());
        let admin = admin::router(self.config.clone(), self.journal.clone(), jobs.clone()).merge(
            ui::router(ui::Parts {
                config: self.config.clone(),
                journal: self.journal.clone(),
                jobs,
                guards: self.guards.clone(),
                health: self.health.clone(),
                series: self.series.clone(),
            }),
        );
        server::routers(
            &self.config.server,
            self.health.clone(),
            webhooks,
            admin,
            Some(self.stored_gauges.clone()),
        )
    }

    /// Resolves when every finite source (a file, a counted generator) is
    /// done and nothing is left to deliver; returns the first source error
    /// (a source that failed is down, even while its supervisor waits to
    /// restart it).
    pub async fn wait_idle(&mut self) -> Result<(), weft_connectors::SourceError> {
        loop {
            if let Some((system, message)) = self.health.down_sources().into_iter().next() {
                return Err(weft_connectors::SourceError { system, message });
            }
            let subscription = |name: &str| self.subscriptions.iter().any(|(s, _)| s == name);
            let mut all_done = true;
            for (name, h) in &self.sources {
                if !h.is_finished() && !subscription(name) {
                    all_done = false;
                }
            }
            if all_done {
                let (subscribers, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sources)
                    .into_iter()
                    .partition(|(name, _)| subscription(name));
                self.sources = subscribers;
                for (name, h) in others {
                    match h.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(e) => {
                            return Err(weft_connectors::SourceError {
                                system: name,
                                message: format!("source task failed: {e}"),
                            });
                        }
                    }
                }
                let journal = self.journal.clone();
                let subscriptions = self.subscriptions.clone();
                let idle = tokio::task::spawn_blocking(move || idle(&*journal, &subscriptions))
                    .await
                    .ok()
                    .and_then(Result::ok);
                if idle == Some(true) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop: sources first (nothing new accepted; webhooks answer 503), then
    /// the lanes finish what they have in flight. Nothing accepted is lost:
    /// what is still pending stays in the store for the next start.
    pub async fn shutdown(self) {
        self.health.set_stopping();
        self.accepting.store(false, Ordering::Release);
        self.source_stop.cancel();
        for (name, h) in self.sources {
            match tokio::time::timeout(Duration::from_secs(30), h).await {
                Ok(Ok(Err(e))) => {
                    tracing::warn!(source = %name, error = %e, "source stopped with an error")
                }
                Err(_) => tracing::warn!(source = %name, "source did not stop within 30s"),
                _ => {}
            }
        }
        self.lane_stop.cancel();
        for h in self.lanes {
            let _ = tokio::time::timeout(Duration::from_secs(60), h).await;
        }
        // no lane claims any more: leave the journal's membership
        self.membership_stop.cancel();
        if let Some(h) = self.membership_task {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        // staged output (rotating export files) becomes final
        for (name, sink) in &self.sinks {
            if let Err(e) = sink.flush().await {
                tracing::warn!(sink = %name, error = %e, "cannot flush the sink");
            }
        }
        self.gauges.abort();
        tracing::info!("weft stopped");
    }
}

/// The store of the config: the SQLite file, or `store.postgres`.
/// Nothing left to do once the sources that end have ended: the outbox is
/// empty, and every subscription has read its topic to the head. Read as
/// outbox and heads, then positions, then outbox and heads again, the same:
/// a subscription that caught up could have routed rows, and a lane could
/// have published, only in between, which the second read shows.
fn idle(journal: &dyn Journal, subscriptions: &[(String, String)]) -> Result<bool, StoreError> {
    let heads = |j: &dyn Journal| -> Result<Vec<i64>, StoreError> {
        subscriptions
            .iter()
            .map(|(_, topic)| j.read().topic_head(topic))
            .collect()
    };
    if journal.read().outbox_len()? != 0 {
        return Ok(false);
    }
    let before = heads(journal)?;
    for ((name, _), head) in subscriptions.iter().zip(&before) {
        let at = journal
            .read()
            .checkpoint(name, "seq")?
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        if at < *head {
            return Ok(false);
        }
    }
    Ok(journal.read().outbox_len()? == 0 && heads(journal)? == before)
}

/// The lanes whose keyless rows a source that resumes from an exact
/// position writes itself (`ingest::DirectLane`).
fn direct_lanes(
    flows: &[Arc<weft_core::config::Flow>],
    sinks: &BTreeMap<String, Arc<dyn weft_connectors::Sink>>,
    guards: &BTreeMap<String, Arc<guard::Guard>>,
    handles: &[Arc<delivery::LaneHandle>],
) -> Vec<ingest::DirectLane> {
    flows
        .iter()
        .flat_map(|f| f.destinations.iter().map(move |d| (f, d)))
        .filter_map(|(f, d)| {
            let sink = sinks.get(&d.system)?;
            let guard = guards.get(&d.system)?;
            let handle = handles
                .iter()
                .find(|h| h.flow == f.name && h.dest == d.system)?;
            ingest::DirectLane::fits(f, d, sink).then(|| ingest::DirectLane {
                flow: f.name.clone(),
                dest: d.system.clone(),
                sink: sink.clone(),
                guard: guard.clone(),
                policy: d.delivery.clone(),
                handle: handle.clone(),
            })
        })
        .collect()
}

/// What every source task of a hub shares.
struct SourceRun<'a> {
    stop: CancellationToken,
    health: &'a Arc<health::Health>,
    journal: &'a Arc<dyn Journal>,
    /// `Some` on a shared journal: the source runs under a lease.
    fence: Option<Arc<std::sync::atomic::AtomicI64>>,
    node_timeout: std::time::Duration,
}

/// A source task: supervised, and under a lease on a shared journal.
fn spawn_source(
    name: &str,
    rebuild: health::Rebuild,
    first: Box<dyn weft_connectors::Source>,
    ingestor: Arc<dyn Ingest>,
    run: SourceRun<'_>,
) -> tokio::task::JoinHandle<Result<(), weft_connectors::SourceError>> {
    let state = run
        .health
        .source(name)
        .unwrap_or_else(|| Arc::new(health::SourceState::default()));
    match run.fence {
        Some(fence) => tokio::spawn(lease::run_leased(
            name.to_owned(),
            rebuild,
            first,
            ingestor,
            run.stop,
            state,
            run.journal.clone(),
            fence,
            run.node_timeout,
        )),
        None => tokio::spawn(health::supervise(
            name.to_owned(),
            rebuild,
            Some(first),
            ingestor,
            run.stop,
            state,
        )),
    }
}

fn store_name(config: &Config) -> String {
    match &config.store.postgres {
        Some(pg) => format!("postgres (schema {}, node {})", pg.schema, pg.node),
        None => config.store.path.display().to_string(),
    }
}

/// Open the hub's journal: `store.postgres` when configured, else the
/// SQLite file.
fn open_journal(config: &Config) -> Result<Arc<dyn Journal>, RuntimeError> {
    let store = |source| RuntimeError::Store {
        path: store_name(config),
        source,
    };
    Ok(match &config.store.postgres {
        #[cfg(feature = "postgres")]
        Some(pg) => Arc::new(
            weft_store::PgJournal::open(weft_store::PgOptions {
                url: pg.url.expose().to_owned(),
                schema: pg.schema.clone(),
                node: pg.node.clone(),
                pool_size: pg.pool_size,
                role: weft_store::PgRole::Hub,
            })
            .map_err(store)?,
        ),
        #[cfg(not(feature = "postgres"))]
        Some(_) => {
            return Err(store(weft_store::StoreError::Invalid(
                "store.postgres: this weft was built without PostgreSQL (cargo feature `postgres`)"
                    .into(),
            )));
        }
        None => Arc::new(
            SqliteJournal::open(&config.store.path, config.store.synchronous, Role::Hub)
                .map_err(store)?,
        ),
    })
}

/// Every (flow, destination) of the config.
pub fn lane_list(config: &Config) -> Vec<LaneId> {
    config
        .flows
        .iter()
        .flat_map(|f| {
            f.destinations
                .iter()
                .map(|d| LaneId::new(&f.name, &d.system))
        })
        .collect()
}

/// Every 2 s: gauges and lane backlogs from the store, freshness alerts;
/// every minute: prune what is past its retention (dedupe ids, resolved
/// DLQ entries, drift events; `store.*_retention`).
async fn refresh_gauges(
    journal: Arc<dyn Journal>,
    stored: Arc<gauges::Gauges>,
    mut alerter: gauges::Alerter,
    handles: Vec<Arc<delivery::LaneHandle>>,
    config: Arc<Config>,
    series: Arc<ui::Series>,
    trackers: Vec<Arc<drift::Tracker>>,
) {
    let store = &config.store;
    let mut tick: u64 = 0;
    loop {
        // drift accepted by an operator (`weft drift accept`, the dashboard)
        if !trackers.is_empty() {
            let j = journal.clone();
            if let Ok(Ok(events)) =
                tokio::task::spawn_blocking(move || j.read().drift_events(None)).await
            {
                for t in &trackers {
                    t.follow_accepted(&events);
                }
            }
        }
        if tick.is_multiple_of(30) {
            let cutoffs = weft_store::Prune::at(
                weft_store::now_ms(),
                weft_store::Retention {
                    dedupe: store.dedupe_retention,
                    dlq: store.dlq_retention,
                    drift: store.drift_retention,
                    attempts: store.attempt_retention,
                },
            );
            match journal.prune(cutoffs).await {
                Ok(n) if n.total() > 0 => tracing::debug!(
                    dedupe_ids = n.dedupe,
                    dlq_entries = n.dlq,
                    drift_events = n.drift,
                    attempts = n.attempts,
                    "pruned past retention"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot prune past retention"),
                _ => {}
            }
            for t in config.topics.values() {
                let topic = &t.name;
                let before = weft_store::now_ms()
                    .saturating_sub(i64::try_from(t.retention.as_millis()).unwrap_or(i64::MAX));
                match journal.prune_topic(topic.clone(), before).await {
                    Ok(n) if n > 0 => {
                        tracing::debug!(topic = %topic, messages = n, "topic pruned past retention")
                    }
                    Err(e) => {
                        tracing::warn!(topic = %topic, error = %e, "cannot prune the topic")
                    }
                    _ => {}
                }
            }
        }
        tick += 1;
        let seen: Vec<i64> = handles
            .iter()
            .map(|h| {
                if h.ingesting.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                    -1
                } else {
                    h.ingested.load(std::sync::atomic::Ordering::SeqCst)
                }
            })
            .collect();
        match stored.refresh().await {
            Ok(snap) => {
                for c in &snap.counts {
                    if let Some((h, before)) = handles
                        .iter()
                        .zip(&seen)
                        .find(|(h, _)| h.flow == c.flow && h.dest == c.destination)
                    {
                        use std::sync::atomic::Ordering::SeqCst;
                        // only when no ingest of the lane ran meanwhile
                        if *before >= 0
                            && h.ingesting.load(SeqCst) == 0
                            && h.ingested.load(SeqCst) == *before
                        {
                            h.backlog.store(c.pending, SeqCst);
                        }
                    }
                }
                series.record(weft_store::now_ms(), &snap.counts, &snap.dlq);
                alerter.tick(&snap.freshness).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot refresh the gauges from the store"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
