//! Sources that run on one node at a time. When several hubs share the
//! journal (`Journal::shared`: PostgreSQL), every source but webhooks (a
//! polling, file, CDC or broker source) runs only on the node that holds
//! its lease (`Journal::lease_source`, renewed every [`RENEW`], good for
//! [`SOURCE_LEASE`]). The other nodes wait on standby and take the lease
//! over once it runs out (the holder died or paused) or is given up (the
//! holder stopped); the source then resumes from its last committed
//! checkpoint. Every batch the source ingests carries the lease's epoch
//! (`IngestBatch::fence`), so a node paused past its lease commits nothing
//! after another took over.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use weft_connectors::{Ingest, Source, SourceError};
use weft_core::config::SourceSpec;
use weft_store::Journal;

use crate::health::{self, SourceState};

/// How long a source's lease is good for without renewal: the longest a
/// dead node's sources wait before another node runs them.
pub const SOURCE_LEASE: Duration = Duration::from_secs(10);
/// How often the holder renews it (and a standby node tries to take it).
pub const RENEW: Duration = Duration::from_secs(3);

fn ttl_ms() -> i64 {
    i64::try_from(SOURCE_LEASE.as_millis()).unwrap_or(i64::MAX)
}

/// Run `system`'s source under its lease until `stop`: on standby while
/// another node holds it, supervised ([`health::supervise`]) while this
/// node does, stopped as soon as the lease is lost or cannot be renewed
/// before it runs out. `fence` is the epoch the source's ingests carry.
#[allow(clippy::too_many_arguments)]
pub async fn run_leased(
    system: String,
    spec: SourceSpec,
    first: Box<dyn Source>,
    ingest: Arc<dyn Ingest>,
    stop: CancellationToken,
    state: Arc<SourceState>,
    journal: Arc<dyn Journal>,
    fence: Arc<AtomicI64>,
) -> Result<(), SourceError> {
    let mut first = Some(first);
    let mut announced = false;
    loop {
        // wait until this node holds the lease
        let epoch = loop {
            match journal.lease_source(system.clone(), ttl_ms()).await {
                Ok(Some(e)) => break e,
                Ok(None) => {
                    if !announced {
                        tracing::info!(source = %system, "another node holds this source's lease: on standby");
                        announced = true;
                    }
                    state.set_standby(&system, true);
                }
                Err(e) => {
                    tracing::warn!(source = %system, error = %e, "cannot take this source's lease; trying again");
                    state.set_standby(&system, true);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RENEW) => {}
                _ = stop.cancelled() => return Ok(()),
            }
        };
        announced = false;
        fence.store(epoch, Ordering::Release);
        state.set_standby(&system, false);
        tracing::info!(source = %system, epoch, "this node holds the source's lease: running it");
        let child = stop.child_token();
        let mut task = tokio::spawn(health::supervise(
            system.clone(),
            spec.clone(),
            first.take(),
            ingest.clone(),
            child.clone(),
            state.clone(),
        ));
        let mut renewed = Instant::now();
        let why = loop {
            tokio::select! {
                r = &mut task => {
                    // the source finished (a finite one) or the hub stops:
                    // what it committed is in; the next owner starts there
                    if let Err(e) = journal.release_source(system.clone()).await {
                        tracing::warn!(source = %system, error = %e, "cannot give up this source's lease; it runs out by itself");
                    }
                    // not running here any more, and not held either
                    crate::metrics::source_leased(&system, false);
                    return match r {
                        Ok(r) => r,
                        Err(e) => Err(SourceError {
                            system: system.clone(),
                            message: format!("the source's supervisor failed: {e}"),
                        }),
                    };
                }
                _ = tokio::time::sleep(RENEW) => {
                    match journal.lease_source(system.clone(), ttl_ms()).await {
                        Ok(Some(e)) if e == epoch => renewed = Instant::now(),
                        Ok(_) => break "another node took the lease over".to_owned(),
                        // the store is unreachable: stop before the lease can
                        // have run out, as another node may take it then
                        Err(e) if renewed.elapsed() + RENEW >= SOURCE_LEASE => {
                            break format!("the lease could not be renewed in time: {e}");
                        }
                        Err(e) => {
                            tracing::warn!(source = %system, error = %e, "cannot renew this source's lease; trying again");
                        }
                    }
                }
            }
        };
        child.cancel();
        let _ = task.await;
        state.set_standby(&system, true);
        tracing::warn!(source = %system, epoch, reason = %why, "this node stopped running the source");
        if stop.is_cancelled() {
            return Ok(());
        }
    }
}
