//! Health of the running hub: whether it is stopping, and each source's
//! state, for `/readyz`, `weft_source_up` and `--until-idle`; and the
//! supervisor that restarts a failed source with backoff.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use weft_connectors::{Ingest, Source, SourceError, SourceHandle, build_source};
use weft_core::config::SourceSpec;

/// How a supervisor makes a source again after it failed: `Ok(None)` when
/// there is no task to run (a webhook's routes).
pub type Rebuild = Arc<dyn Fn() -> Result<Option<Box<dyn Source>>, SourceError> + Send + Sync>;

/// [`Rebuild`] of a configured system's source, from the registry.
pub fn rebuild_from(system: &str, spec: SourceSpec) -> Rebuild {
    let system = system.to_owned();
    Arc::new(move || match build_source(&system, &spec) {
        Ok(SourceHandle::Task(s)) => Ok(Some(s)),
        Ok(SourceHandle::Routes(_)) => Ok(None),
        Err(e) => Err(e),
    })
}

use crate::metrics;

/// The first wait before restarting a failed source; doubled after each
/// failure up to [`MAX_BACKOFF`], and back to this after a source ran for
/// [`STABLE`] without failing.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
const STABLE: Duration = Duration::from_secs(60);

/// One source task's state.
#[derive(Debug, Default)]
pub struct SourceState {
    down: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Another node holds the source's lease (several hubs on one
    /// journal): not running here, and not down.
    standby: AtomicBool,
}

impl SourceState {
    fn set_up(&self, source: &str) {
        self.down.store(false, Ordering::Release);
        metrics::source_up(source, true);
    }

    fn set_down(&self, source: &str, error: &str) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error.to_owned());
        }
        self.down.store(true, Ordering::Release);
        metrics::source_up(source, false);
    }

    /// Mark the source as run by another node (`true`) or by this one.
    pub(crate) fn set_standby(&self, source: &str, standby: bool) {
        self.standby.store(standby, Ordering::Release);
        if standby {
            self.down.store(false, Ordering::Release);
            metrics::source_up(source, true);
        }
        metrics::source_leased(source, !standby);
    }

    /// Whether another node runs this source now.
    pub fn standby(&self) -> bool {
        self.standby.load(Ordering::Acquire)
    }

    /// Why the source is down now, if it is.
    pub fn down(&self) -> Option<String> {
        if !self.down.load(Ordering::Acquire) {
            return None;
        }
        self.last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .or_else(|| Some("down".into()))
    }
}

/// What `/readyz` answers from.
#[derive(Debug, Default)]
pub struct Health {
    stopping: AtomicBool,
    sources: BTreeMap<String, Arc<SourceState>>,
    /// This node's membership of a shared journal: not ready while stale.
    membership: Option<Arc<crate::lease::Membership>>,
}

impl Health {
    /// Health for these source tasks (webhook sources are routes: they are
    /// up while the listener is).
    pub fn new<'a>(task_sources: impl IntoIterator<Item = &'a str>) -> Health {
        Health {
            stopping: AtomicBool::new(false),
            sources: task_sources
                .into_iter()
                .map(|s| {
                    metrics::source_up(s, true);
                    (s.to_owned(), Arc::new(SourceState::default()))
                })
                .collect(),
            membership: None,
        }
    }

    /// Not ready while this node's membership is stale (see
    /// [`crate::lease::Membership`]).
    pub fn with_membership(mut self, m: Arc<crate::lease::Membership>) -> Health {
        self.membership = Some(m);
        self
    }

    pub fn source(&self, name: &str) -> Option<Arc<SourceState>> {
        self.sources.get(name).cloned()
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// The sources that are down now, with why.
    pub fn down_sources(&self) -> Vec<(String, String)> {
        self.sources
            .iter()
            .filter_map(|(n, s)| s.down().map(|why| (n.clone(), why)))
            .collect()
    }

    /// `Ok` when ready; `Err(text)` saying why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::Acquire) {
            return Err("stopping\n".into());
        }
        let down = self.down_sources();
        let stale = self.membership.as_ref().and_then(|m| m.stale_reason());
        if down.is_empty() && stale.is_none() {
            return Ok(());
        }
        let mut text = String::new();
        if let Some(why) = stale {
            text.push_str(&format!("membership of the shared journal: {why}\n"));
        }
        for (name, why) in down {
            text.push_str(&format!("source `{name}` is down: {why}\n"));
        }
        Err(text)
    }
}

/// Run a source task and restart it after an error or a panic, with
/// backoff, until it finishes (a finite source) or `stop` is cancelled.
/// Each restart builds the source anew from its spec, so it resumes from
/// its last committed checkpoint like a restart of the hub would.
pub async fn supervise(
    system: String,
    rebuild: Rebuild,
    first: Option<Box<dyn Source>>,
    ingest: Arc<dyn Ingest>,
    stop: CancellationToken,
    state: Arc<SourceState>,
) -> Result<(), SourceError> {
    let mut next = first;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let source = match next.take() {
            Some(s) => Ok(s),
            None => match rebuild() {
                Ok(Some(s)) => Ok(s),
                Ok(None) => return Ok(()),
                Err(e) => Err(e),
            },
        };
        let started = Instant::now();
        let result = match source {
            Ok(source) => {
                state.set_up(&system);
                match tokio::spawn(source.run(ingest.clone(), stop.clone())).await {
                    Ok(r) => r,
                    Err(e) => Err(SourceError {
                        system: system.clone(),
                        message: if e.is_panic() {
                            format!("the source task panicked: {}", panic_text(e))
                        } else {
                            "the source task was cancelled".into()
                        },
                    }),
                }
            }
            Err(e) => Err(e),
        };
        let error = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if stop.is_cancelled() {
            return Err(error);
        }
        if started.elapsed() >= STABLE {
            backoff = FIRST_BACKOFF;
        }
        state.set_down(&system, &error.message);
        metrics::source_restarted(&system);
        tracing::error!(
            source = %system,
            error = %error.message,
            restart_in_s = backoff.as_secs_f64(),
            "source failed; restarting it from its last checkpoint"
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return Err(error),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into()),
        Err(_) => "(no message)".into(),
    }
}
