//! weft's engine: wires a validated config to the store and the connectors.
//!
//! Data path: source -> [`ingest::Ingestor`] (filter, key, mapping per flow;
//! one store transaction for inbox, outbox, DLQ and checkpoint) -> delivery
//! lanes ([`delivery`], one per flow and destination) -> sink. See
//! ARCHITECTURE.md for the guarantees.

pub mod contracts;
pub mod delivery;
pub mod drift;
pub mod ingest;
pub mod metrics;
pub mod server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weft_connectors::{Ingest, SourceHandle, build_sink, build_source};
use weft_core::config::Config;
use weft_store::Store;

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
    pub store: Store,
    source_stop: CancellationToken,
    lane_stop: CancellationToken,
    accepting: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    sources: Vec<(String, JoinHandle<Result<(), weft_connectors::SourceError>>)>,
    lanes: Vec<JoinHandle<()>>,
    webhooks: Vec<(weft_connectors::webhook::WebhookRoute, Arc<dyn Ingest>)>,
    gauges: JoinHandle<()>,
}

impl Runtime {
    /// Open the store, build every sink and source, start the lanes and
    /// the source tasks. Webhook routes are served by [`Runtime::router`].
    pub async fn start(config: Config) -> Result<Runtime, RuntimeError> {
        let _ = metrics::install();
        let store =
            Store::open(&config.store.path, config.store.synchronous).map_err(|source| {
                RuntimeError::Store {
                    path: config.store.path.display().to_string(),
                    source,
                }
            })?;
        let config = Arc::new(config);
        let source_stop = CancellationToken::new();
        let lane_stop = CancellationToken::new();
        let accepting = Arc::new(AtomicBool::new(true));

        // sinks: one per system, shared by the lanes that write to it
        let mut sinks = BTreeMap::new();
        for (name, sys) in &config.systems {
            if let Some(spec) = &sys.sink {
                let used = config
                    .flows
                    .iter()
                    .any(|f| f.destinations.iter().any(|d| &d.system == name));
                if used {
                    sinks.insert(name.clone(), build_sink(name, spec).await?);
                }
            }
        }
        // lanes
        let mut lanes = Vec::new();
        let mut wakes: BTreeMap<String, Vec<Arc<Notify>>> = BTreeMap::new();
        for flow in &config.flows {
            for d in &flow.destinations {
                let Some(sink) = sinks.get(&d.system) else {
                    continue;
                };
                let wake = Arc::new(Notify::new());
                wakes
                    .entry(flow.name.clone())
                    .or_default()
                    .push(wake.clone());
                let lane = delivery::Lane {
                    flow: flow.name.clone(),
                    dest: d.system.clone(),
                    policy: d.delivery.clone(),
                    sink: sink.clone(),
                    store: store.clone(),
                    wake,
                    shutdown: lane_stop.clone(),
                };
                lanes.push(tokio::spawn(lane.run()));
            }
        }
        // sources
        let mut sources = Vec::new();
        let mut webhooks = Vec::new();
        for (name, sys) in &config.systems {
            let Some(spec) = &sys.source else { continue };
            let flows: Vec<_> = config
                .flows
                .iter()
                .filter(|f| &f.from == name)
                .cloned()
                .collect();
            let wake = flows
                .iter()
                .flat_map(|f| wakes.get(&f.name).cloned().unwrap_or_default())
                .collect();
            let ingestor: Arc<dyn Ingest> = Arc::new(ingest::Ingestor {
                system: name.clone(),
                drift: Some(Arc::new(drift::Tracker::open(&store, name, &flows))),
                flows,
                store: store.clone(),
                wake,
                accepting: accepting.clone(),
            });
            match build_source(name, spec)? {
                SourceHandle::Task(src) => {
                    let stop = source_stop.clone();
                    sources.push((name.clone(), tokio::spawn(src.run(ingestor, stop))));
                }
                SourceHandle::Routes(route) => webhooks.push((route, ingestor)),
            }
        }
        let gauges = tokio::spawn(refresh_gauges(store.clone(), lane_list(&config)));
        tracing::info!(
            store = %config.store.path.display(),
            flows = config.flows.len(),
            lanes = lanes.len(),
            "weft started"
        );
        Ok(Runtime {
            config,
            store,
            source_stop,
            lane_stop,
            accepting,
            ready: Arc::new(AtomicBool::new(true)),
            sources,
            lanes,
            webhooks,
            gauges,
        })
    }

    /// The HTTP routes: health, readiness, metrics, webhooks.
    pub fn router(&mut self) -> axum::Router {
        let webhooks = std::mem::take(&mut self.webhooks);
        server::router(self.ready.clone(), webhooks)
    }

    /// Resolves when every finite source (a file, a counted generator) is
    /// done and nothing is left to deliver; returns the first source error.
    pub async fn wait_idle(&mut self) -> Result<(), weft_connectors::SourceError> {
        loop {
            let mut all_done = true;
            for (_, h) in &self.sources {
                if !h.is_finished() {
                    all_done = false;
                }
            }
            if all_done {
                for (name, h) in std::mem::take(&mut self.sources) {
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
                let store = self.store.clone();
                let left = tokio::task::spawn_blocking(move || {
                    store.reader().and_then(|r| r.outbox_len())
                })
                .await
                .ok()
                .and_then(Result::ok);
                if left == Some(0) {
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
        self.ready.store(false, Ordering::Release);
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
        self.gauges.abort();
        tracing::info!("weft stopped");
    }
}

fn lane_list(config: &Config) -> Vec<(String, String)> {
    config
        .flows
        .iter()
        .flat_map(|f| {
            f.destinations
                .iter()
                .map(|d| (f.name.clone(), d.system.clone()))
        })
        .collect()
}

async fn refresh_gauges(store: Store, lanes: Vec<(String, String)>) {
    loop {
        let s = store.clone();
        let l = lanes.clone();
        let r = tokio::task::spawn_blocking(move || {
            let reader = s.reader()?;
            Ok::<_, weft_store::StoreError>((reader.counts(&l)?, reader.dlq_depths()?))
        })
        .await;
        if let Ok(Ok((counts, dlq))) = r {
            for c in counts {
                metrics::lane_gauges(
                    &c.flow,
                    &c.destination,
                    c.pending,
                    c.oldest_pending_ms,
                    c.balanced,
                );
            }
            for (flow, dest, n) in dlq {
                metrics::dlq_gauge(&flow, &dest, n);
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
