//! Bulk DLQ jobs: replay or discard every dead entry a filter matches, in
//! the background, with progress and cancel. Used by the admin API
//! (`/api/v1/dlq/jobs`) and the dashboard.
//!
//! A job first lists the ids its filter matches (that number is `total`),
//! then works through them in chunks of `chunk_size`, each entry through
//! [`crate::dlq::replay`] or [`crate::dlq::discard`] (one journal
//! transaction per entry, the same code as `weft dlq replay`), with an
//! optional pause between chunks so a large replay does not crowd the
//! hub's own writes. Cancel takes effect between chunks: the chunk in
//! progress finishes, nothing after it is touched. What was done stays
//! done (each entry was committed on its own).
//!
//! Jobs live in memory: a restart forgets them (the entries they replayed
//! or discarded are in the store with their history). The last
//! [`KEEP_JOBS`] are kept; at most [`MAX_RUNNING`] run at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use weft_core::config::Config;
use weft_store::{DlqFilter, Journal, StoreError};

/// Finished jobs kept for their progress.
pub const KEEP_JOBS: usize = 50;
/// Jobs running at once.
pub const MAX_RUNNING: usize = 4;
/// Largest chunk.
pub const MAX_CHUNK: usize = 1000;
/// Longest pause between chunks.
pub const MAX_PAUSE: Duration = Duration::from_secs(10);
/// Errors kept per job (the count of failures is always exact).
const KEEP_ERRORS: usize = 20;

/// What a job does to each entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Replay,
    Discard,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "replay" => Some(Action::Replay),
            "discard" => Some(Action::Discard),
            _ => None,
        }
    }
}

/// A job to start. `filter.status`, `after_id` and `limit` are ignored:
/// a job takes every dead entry the rest of the filter matches.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub action: Action,
    pub filter: DlqFilter,
    /// Replay over newer writes of the same key.
    pub force: bool,
    /// Entries between two cancel checks (1 to [`MAX_CHUNK`]).
    pub chunk_size: usize,
    /// Pause after each chunk (at most [`MAX_PAUSE`]).
    pub pause: Duration,
    /// Who started it, for the entries' history (`admin API`, `dashboard`).
    pub by: &'static str,
}

/// A job's state, as the API and the dashboard show it.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub id: u64,
    pub action: Action,
    /// `listing` (counting the matches), `running`, `cancelling` (the
    /// chunk in progress finishes), `cancelled`, `done`, `failed`.
    pub status: &'static str,
    /// Entries the filter matched when the job started (`None` while listing).
    pub total: Option<u64>,
    /// Entries replayed or discarded.
    pub done: u64,
    /// Entries refused (superseded, no longer dead, ...), with the first errors.
    pub failed: u64,
    pub errors: Vec<JobError>,
    pub chunk_size: usize,
    pub pause_ms: u64,
    /// The filter, in words.
    pub filter: String,
    /// ms since 1970.
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

impl Progress {
    pub fn finished(&self) -> bool {
        self.finished_at.is_some()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobError {
    pub id: i64,
    pub error: String,
}

struct Job {
    progress: Mutex<Progress>,
    cancel: CancellationToken,
}

impl Job {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        if let Ok(mut p) = self.progress.lock() {
            f(&mut p)
        }
    }

    fn snapshot(&self) -> Option<Progress> {
        self.progress.lock().ok().map(|p| p.clone())
    }
}

/// Why a job could not be started or found.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("{0}")]
    Invalid(String),
    #[error("{MAX_RUNNING} DLQ jobs are running; wait for one to finish or cancel one")]
    Busy,
    #[error("no DLQ job {0}")]
    NotFound(u64),
}

/// The hub's DLQ jobs.
pub struct Jobs {
    config: Arc<Config>,
    journal: Arc<dyn Journal>,
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
}

impl Jobs {
    pub fn new(config: Arc<Config>, journal: Arc<dyn Journal>) -> Arc<Jobs> {
        Arc::new(Jobs {
            config,
            journal,
            next: AtomicU64::new(1),
            jobs: Mutex::new(BTreeMap::new()),
        })
    }

    /// Start a job in the background; its first progress.
    pub fn start(self: &Arc<Self>, spec: JobSpec) -> Result<Progress, JobsError> {
        if spec.chunk_size == 0 || spec.chunk_size > MAX_CHUNK {
            return Err(JobsError::Invalid(format!(
                "chunk_size must be 1 to {MAX_CHUNK}"
            )));
        }
        if spec.pause > MAX_PAUSE {
            return Err(JobsError::Invalid(format!(
                "pause_ms must be at most {}",
                MAX_PAUSE.as_millis()
            )));
        }
        let mut jobs = self
            .jobs
            .lock()
            .map_err(|_| JobsError::Invalid("the job list is unusable".into()))?;
        let running = jobs
            .values()
            .filter(|j| j.snapshot().is_some_and(|p| !p.finished()))
            .count();
        if running >= MAX_RUNNING {
            return Err(JobsError::Busy);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let progress = Progress {
            id,
            action: spec.action,
            status: "listing",
            total: None,
            done: 0,
            failed: 0,
            errors: Vec::new(),
            chunk_size: spec.chunk_size,
            pause_ms: spec.pause.as_millis() as u64,
            filter: describe(&spec.filter),
            started_at: weft_store::now_ms(),
            finished_at: None,
        };
        let job = Arc::new(Job {
            progress: Mutex::new(progress.clone()),
            cancel: CancellationToken::new(),
        });
        jobs.insert(id, job.clone());
        // forget the oldest finished jobs
        while jobs.len() > KEEP_JOBS {
            let Some(old) = jobs
                .iter()
                .find(|(_, j)| j.snapshot().is_some_and(|p| p.finished()))
                .map(|(k, _)| *k)
            else {
                break;
            };
            jobs.remove(&old);
        }
        drop(jobs);
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = me.run(&job, &spec).await;
            job.update(|p| {
                p.finished_at = Some(weft_store::now_ms());
                p.status = match outcome {
                    Ok(()) if job.cancel.is_cancelled() => "cancelled",
                    Ok(()) => "done",
                    Err(e) => {
                        p.errors.push(JobError {
                            id: 0,
                            error: format!("the job stopped: {e}"),
                        });
                        "failed"
                    }
                };
            });
        });
        Ok(progress)
    }

    /// A job's progress.
    pub fn get(&self, id: u64) -> Result<Progress, JobsError> {
        self.job(id)?.snapshot().ok_or(JobsError::NotFound(id))
    }

    /// Every kept job, newest first.
    pub fn list(&self) -> Vec<Progress> {
        let Ok(jobs) = self.jobs.lock() else {
            return Vec::new();
        };
        jobs.values().rev().filter_map(|j| j.snapshot()).collect()
    }

    /// Ask a job to stop after its current chunk; its progress.
    pub fn cancel(&self, id: u64) -> Result<Progress, JobsError> {
        let job = self.job(id)?;
        job.cancel.cancel();
        job.update(|p| {
            if !p.finished() {
                p.status = "cancelling";
            }
        });
        job.snapshot().ok_or(JobsError::NotFound(id))
    }

    fn job(&self, id: u64) -> Result<Arc<Job>, JobsError> {
        self.jobs
            .lock()
            .ok()
            .and_then(|j| j.get(&id).cloned())
            .ok_or(JobsError::NotFound(id))
    }

    async fn run(&self, job: &Job, spec: &JobSpec) -> Result<(), StoreError> {
        let ids = self.matching_ids(&spec.filter, &job.cancel).await?;
        job.update(|p| {
            p.total = Some(ids.len() as u64);
            if p.status == "listing" {
                p.status = "running";
            }
        });
        let note = format!("discarded by a bulk job ({})", spec.by);
        for chunk in ids.chunks(spec.chunk_size) {
            if job.cancel.is_cancelled() {
                return Ok(());
            }
            for &id in chunk {
                let r = match spec.action {
                    Action::Discard => crate::dlq::discard(&*self.journal, id, &note).await,
                    Action::Replay => {
                        let j = self.journal.clone();
                        let entry = tokio::task::spawn_blocking(move || j.read().dlq_get(id))
                            .await
                            .map_err(|e| StoreError::Invalid(format!("task failed: {e}")))??;
                        match entry {
                            Some(e) => {
                                crate::dlq::replay(
                                    &self.config,
                                    &*self.journal,
                                    &e,
                                    None,
                                    spec.force,
                                )
                                .await
                            }
                            None => {
                                Err(crate::dlq::DlqError::Invalid(format!("no DLQ entry {id}")))
                            }
                        }
                    }
                };
                match r {
                    Ok(()) => job.update(|p| p.done += 1),
                    Err(e) if e.is_user_error() => job.update(|p| {
                        p.failed += 1;
                        if p.errors.len() < KEEP_ERRORS {
                            p.errors.push(JobError {
                                id,
                                error: e.to_string(),
                            });
                        }
                    }),
                    Err(crate::dlq::DlqError::Store(e)) => return Err(e),
                    Err(e) => return Err(StoreError::Invalid(e.to_string())),
                }
            }
            if !spec.pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(spec.pause) => {}
                    _ = job.cancel.cancelled() => return Ok(()),
                }
            }
        }
        Ok(())
    }

    /// The ids of every dead entry the filter matches, a page at a time.
    async fn matching_ids(
        &self,
        filter: &DlqFilter,
        cancel: &CancellationToken,
    ) -> Result<Vec<i64>, StoreError> {
        let mut ids = Vec::new();
        let mut after = None;
        loop {
            if cancel.is_cancelled() {
                return Ok(ids);
            }
            let f = DlqFilter {
                status: None,
                after_id: after,
                limit: Some(weft_store::DLQ_PAGE),
                ..filter.clone()
            };
            let j = self.journal.clone();
            let page: Vec<i64> = tokio::task::spawn_blocking(move || {
                j.read()
                    .dlq_list(&f)
                    .map(|p| p.into_iter().map(|e| e.id).collect())
            })
            .await
            .map_err(|e| StoreError::Invalid(format!("task failed: {e}")))??;
            let n = page.len();
            after = page.last().copied();
            ids.extend(page);
            if n < weft_store::DLQ_PAGE {
                return Ok(ids);
            }
        }
    }
}

/// `flow=a destination=b error~"x" since=...`, or `every dead entry`.
pub fn describe(f: &DlqFilter) -> String {
    let mut parts = Vec::new();
    if let Some(v) = &f.flow {
        parts.push(format!("flow={v}"));
    }
    if let Some(v) = &f.destination {
        parts.push(format!("destination={v}"));
    }
    if let Some(v) = &f.error_contains {
        parts.push(format!("error contains {v:?}"));
    }
    if let Some(v) = f.since {
        let at = chrono::DateTime::from_timestamp_millis(v)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default();
        parts.push(format!("failed since {at}"));
    }
    if parts.is_empty() {
        "every dead entry".into()
    } else {
        parts.join(", ")
    }
}
