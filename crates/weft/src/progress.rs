//! Progress of `weft run --until-idle` (batch loads, backfills): records
//! received and settled since the start, pending, the rate and an ETA.
//! A bar (`indicatif`) on a terminal, a plain line every few seconds
//! elsewhere (`--progress plain`, or stderr not a terminal), nothing with
//! `--progress off`.
//!
//! The figures are the store's counters (`Journal::counts`), read once a
//! second off the async workers, so they are what is durable: "done" is
//! delivered + dead-lettered + filtered + rejected + discarded.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use weft_store::{Journal, LaneId};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A bar on a terminal, plain lines elsewhere.
    Auto,
    Bar,
    Plain,
    Off,
}

/// What the store says, summed over every lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    received: i64,
    done: i64,
    delivered: i64,
    dead: i64,
    pending: i64,
}

fn totals(journal: &dyn Journal, lanes: &[LaneId]) -> Option<Totals> {
    let counts = journal.read().counts(lanes).ok()?;
    let mut t = Totals::default();
    for c in counts {
        t.received += c.received;
        t.delivered += c.delivered;
        t.dead += c.dead_lettered;
        t.done += c.delivered + c.dead_lettered + c.filtered + c.rejected + c.discarded;
        t.pending += c.pending;
    }
    Some(t)
}

async fn read(journal: &Arc<dyn Journal>, lanes: &Arc<Vec<LaneId>>) -> Option<Totals> {
    let (j, l) = (journal.clone(), lanes.clone());
    tokio::task::spawn_blocking(move || totals(j.as_ref(), &l))
        .await
        .ok()
        .flatten()
}

/// Show progress until the returned handle is stopped.
pub fn start(mode: Mode, journal: Arc<dyn Journal>, lanes: Vec<LaneId>) -> Option<Progress> {
    let bar = match mode {
        Mode::Off => return None,
        Mode::Bar => true,
        Mode::Plain => false,
        Mode::Auto => std::io::stderr().is_terminal(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(show(bar, journal, Arc::new(lanes), stop.clone()));
    Some(Progress { stop, task })
}

pub struct Progress {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Print the last figures and stop.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn show(
    bar: bool,
    journal: Arc<dyn Journal>,
    lanes: Arc<Vec<LaneId>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let base = read(&journal, &lanes).await.unwrap_or_default();
    let started = Instant::now();
    let pb = bar.then(|| {
        let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} done, {per_sec}, ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    });
    let every = if bar {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let mut last = base;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = stop.cancelled() => true,
        };
        if let Some(t) = read(&journal, &lanes).await {
            last = t;
        }
        let done = (last.done - base.done).max(0);
        let received = (last.received - base.received).max(0);
        let total = done + last.pending;
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        match &pb {
            Some(pb) => {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
                pb.set_message(format!(
                    "({} received, {} dead-lettered, {} pending)",
                    received,
                    (last.dead - base.dead).max(0),
                    last.pending
                ));
            }
            None => {
                let eta = if rate > 0.0 && last.pending > 0 {
                    format!(", ETA {:.0}s", last.pending as f64 / rate)
                } else {
                    String::new()
                };
                eprintln!(
                    "progress: {received} received, {done} done ({} delivered, {} dead-lettered), {} pending, {rate:.0} records/s{eta}",
                    (last.delivered - base.delivered).max(0),
                    (last.dead - base.dead).max(0),
                    last.pending
                );
            }
        }
        if stopping {
            if let Some(pb) = &pb {
                pb.finish();
            }
            return;
        }
    }
}
