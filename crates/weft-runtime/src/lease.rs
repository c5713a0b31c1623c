//! Sources that run on one node at a time. When several hubs share the
//! journal (`Journal::shared`: PostgreSQL), every source but webhooks (a
//! polling, file, CDC or broker source) runs only on the node that holds
//! its lease (`Journal::lease_source`, good for the node timeout,
//! [`NODE_TIMEOUT`] by default, renewed every third of it). The other
//! nodes wait on standby and take the lease over once it runs out (the
//! holder died or paused) or is given up (the holder stopped); the source
//! then resumes from its last committed checkpoint. Every batch the source
//! ingests carries the lease's epoch (`IngestBatch::fence`), so a node
//! paused past its lease commits nothing after another took over.
//!
//! On a shared journal every node is also a member ([`Membership`],
//! [`run_membership`]): it beats every third of the node timeout, and a
//! node silent for the timeout is dead: the next beat of a live node
//! releases the rows it had claimed, so they are delivered again within
//! seconds. Lanes claim only while their node's membership is fresh.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use weft_connectors::{Ingest, Source, SourceError};
use weft_store::Journal;

use crate::health::{self, SourceState};

/// How long a source's lease is good for without renewal, and a node's
/// membership without a heartbeat, by default (`store.postgres.node_timeout`):
/// the longest a dead node's sources and claimed rows wait for another node.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a lease is renewed (and a standby node tries to take it) and
/// a node beats, for a node timeout of `timeout`: a third of it.
pub fn renew_every(timeout: Duration) -> Duration {
    timeout / 3
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Run `system`'s source under its lease until `stop`: on standby while
/// another node holds it, supervised ([`health::supervise`]) while this
/// node does, stopped as soon as the lease is lost or cannot be renewed
/// before it runs out. `fence` is the epoch the source's ingests carry;
/// `timeout` how long the lease is good for (renewed every third of it).
#[allow(clippy::too_many_arguments)]
pub async fn run_leased(
    system: String,
    rebuild: health::Rebuild,
    first: Box<dyn Source>,
    ingest: Arc<dyn Ingest>,
    stop: CancellationToken,
    state: Arc<SourceState>,
    journal: Arc<dyn Journal>,
    fence: Arc<AtomicI64>,
    timeout: Duration,
) -> Result<(), SourceError> {
    let renew = renew_every(timeout);
    let ttl = ms(timeout);
    let mut first = Some(first);
    let mut announced = false;
    loop {
        // wait until this node holds the lease
        let epoch = loop {
            match journal.lease_source(system.clone(), ttl).await {
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
                _ = tokio::time::sleep(renew) => {}
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
            rebuild.clone(),
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
                _ = tokio::time::sleep(renew) => {
                    match journal.lease_source(system.clone(), ttl).await {
                        Ok(Some(e)) if e == epoch => renewed = Instant::now(),
                        Ok(_) => break "another node took the lease over".to_owned(),
                        // the store is unreachable: stop before the lease can
                        // have run out, as another node may take it then
                        Err(e) if renewed.elapsed() + renew >= timeout => {
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

/// This node's membership of the journal, as its lanes see it: fresh while
/// the last heartbeat the journal acknowledged is recent enough that no
/// other node can find this one dead before the next beat (a third of the
/// node timeout of margin). A lane claims rows only while it is fresh, so a node that was
/// paused or cut off claims nothing until it has beaten again; rows it had
/// claimed before may have gone to another node in between (their
/// settlement here is then stale, and the write may reach the destination
/// twice, under the same idempotency key).
#[derive(Debug)]
pub struct Membership {
    /// One hub per store (SQLite, memory): always a member.
    single: bool,
    /// A node silent this long is dead (`store.postgres.node_timeout`).
    timeout: Duration,
    epoch: Instant,
    /// When the last acknowledged beat was sent (ms after `epoch`); -1:
    /// none yet.
    acked_ms: AtomicI64,
}

impl Membership {
    /// One hub per store: nothing to beat, always fresh.
    pub fn single() -> Arc<Membership> {
        Arc::new(Membership {
            single: true,
            timeout: NODE_TIMEOUT,
            epoch: Instant::now(),
            acked_ms: AtomicI64::new(-1),
        })
    }

    /// A hub on a shared journal whose nodes are dead after `timeout`
    /// without a heartbeat: not fresh until its first beat.
    pub fn shared(timeout: Duration) -> Arc<Membership> {
        Arc::new(Membership {
            single: false,
            timeout,
            epoch: Instant::now(),
            acked_ms: AtomicI64::new(-1),
        })
    }

    /// Since the last acknowledged beat was sent (`None`: never, or one
    /// hub per store).
    pub fn beat_age(&self) -> Option<Duration> {
        if self.single {
            return None;
        }
        let ms = self.acked_ms.load(Ordering::Acquire);
        let sent = self
            .epoch
            .checked_add(Duration::from_millis(u64::try_from(ms).ok()?))?;
        Some(sent.elapsed())
    }

    /// Whether this node may claim rows now.
    pub fn fresh(&self) -> bool {
        self.single
            || self
                .beat_age()
                .is_some_and(|age| age + renew_every(self.timeout) < self.timeout)
    }

    /// Why not fresh, for `/readyz` (`None` when fresh).
    pub fn stale_reason(&self) -> Option<String> {
        if self.fresh() {
            return None;
        }
        Some(match self.beat_age() {
            None => "no heartbeat acknowledged by the journal yet: claiming nothing".into(),
            Some(age) => format!(
                "the last heartbeat the journal acknowledged was {:.1}s ago: claiming nothing until the next one",
                age.as_secs_f64()
            ),
        })
    }

    fn acked(&self, sent: Instant) {
        let ms = i64::try_from(sent.duration_since(self.epoch).as_millis()).unwrap_or(i64::MAX);
        self.acked_ms.fetch_max(ms, Ordering::AcqRel);
    }
}

/// Beat for this node every third of its node timeout until `stop` (each
/// beat given as long to answer); release the claims of the nodes each beat finds
/// dead; leave the journal at the end (a hub stopping, after its lanes).
pub async fn run_membership(
    journal: Arc<dyn Journal>,
    membership: Arc<Membership>,
    stop: CancellationToken,
) {
    let renew = renew_every(membership.timeout);
    let ttl = ms(membership.timeout);
    let mut first = true;
    loop {
        let sent = Instant::now();
        match tokio::time::timeout(renew, journal.heartbeat(ttl)).await {
            Ok(Ok(hb)) => {
                membership.acked(sent);
                if !hb.was_alive && !first {
                    tracing::warn!(
                        "this node's heartbeat had run out (paused or cut off): another node may have taken over the rows it had claimed; claiming again"
                    );
                }
                first = false;
                for (node, rows) in hb.reaped {
                    tracing::warn!(dead_node = %node, rows, "a node's heartbeat ran out: the rows it had claimed are released for delivery");
                    crate::metrics::claims_reaped(rows);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot send this node's heartbeat; trying again");
            }
            Err(_) => {
                tracing::warn!(
                    "this node's heartbeat got no answer within {renew:?}; trying again"
                );
            }
        }
        if let Some(age) = membership.beat_age() {
            crate::metrics::heartbeat_age(age);
        }
        tokio::select! {
            _ = tokio::time::sleep(renew) => {}
            _ = stop.cancelled() => break,
        }
    }
    match tokio::time::timeout(renew, journal.leave()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot leave the journal; this node's heartbeat runs out by itself")
        }
        Err(_) => tracing::warn!(
            "leaving the journal got no answer; this node's heartbeat runs out by itself"
        ),
    }
}
