//! `weft status`: the record accounting per flow and destination.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
#[cfg(feature = "postgres")]
use weft_store::JournalRead;
use weft_store::SqliteJournal;

pub fn status(path: &Path, json: bool) -> Result<ExitCode> {
    let cfg = match crate::load_config_for_inspection(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let reader = open_read(&cfg)?;
    let lanes = weft_runtime::lane_list(&cfg);
    let counts = reader.counts(&lanes)?;
    let dlq: i64 = reader.dlq_depths()?.iter().map(|d| d.2).sum();
    let balanced = counts.iter().all(|c| c.balanced);
    let identity = if cfg.identity.is_empty() {
        Vec::new()
    } else {
        reader.identity_summary()?
    };
    let leases = reader.source_leases()?;
    let topics = reader.topics(&cfg)?;
    let nodes = reader.nodes()?;
    let freshness: Vec<_> =
        weft_runtime::gauges::freshness(&cfg.flows, &counts, weft_store::now_ms(), None)
            .into_iter()
            .filter(|f| f.sla.is_some())
            .collect();
    if json {
        let fresh: Vec<_> = freshness
            .iter()
            .map(|f| {
                serde_json::json!({
                    "flow": f.flow,
                    "freshness_seconds": f.sla.map(|d| d.as_secs_f64()),
                    "newest_received_at": f.newest_at,
                    "newest_received_age_seconds": f.newest_age.map(|d| d.as_secs_f64()),
                    "oldest_pending_age_seconds": f.oldest_pending.map(|d| d.as_secs_f64()),
                    "late": f.late(),
                    "reason": f.reason(),
                })
            })
            .collect();
        let v = serde_json::json!({"lanes": counts, "dlq_depth": dlq, "balanced": balanced, "freshness": fresh, "identity": identity, "source_leases": leases, "nodes": nodes, "topics": topics});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<24} {:<16} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10}  ok",
            "FLOW",
            "DESTINATION",
            "RECEIVED",
            "DELIVERED",
            "DEAD",
            "REJECTED",
            "FILTERED",
            "DISCARDED",
            "PENDING",
            "OLDEST"
        );
        for c in &counts {
            println!(
                "{:<24} {:<16} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10}  {}",
                c.flow,
                c.destination,
                c.received,
                c.delivered,
                c.dead_lettered,
                c.rejected,
                c.filtered,
                c.discarded,
                c.pending,
                c.oldest_pending_ms
                    .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                if c.balanced { "yes" } else { "NO" }
            );
        }
        println!("DLQ depth: {dlq}");
        let now = weft_store::now_ms();
        for n in &nodes {
            if n.alive {
                println!(
                    "node {}: alive (up {:.0}s, last heartbeat {:.1}s ago), {} rows claimed",
                    n.node,
                    (now - n.started_at).max(0) as f64 / 1000.0,
                    (now - n.beat_at).max(0) as f64 / 1000.0,
                    n.claimed
                );
            } else {
                println!(
                    "node {}: heartbeat ran out {:.1}s ago ({} rows claimed; the next heartbeat of a live node releases them)",
                    n.node,
                    (now - n.alive_until).max(0) as f64 / 1000.0,
                    n.claimed
                );
            }
        }
        for l in &leases {
            if l.live {
                println!(
                    "source {}: run by node {} (lease epoch {}, held {:.0}s, renewed until {:.1}s from now)",
                    l.source,
                    l.node,
                    l.epoch,
                    (now - l.acquired_at).max(0) as f64 / 1000.0,
                    (l.lease_until - now) as f64 / 1000.0
                );
            } else {
                println!(
                    "source {}: no node holds its lease (last: node {}, epoch {}; the next hub to try takes it)",
                    l.source, l.node, l.epoch
                );
            }
        }
        for t in &topics {
            println!("topic {}: {} messages kept", t.topic, t.messages);
            for s in &t.subscribers {
                match s.position {
                    Some(_) => println!("  read by {}: {} messages behind", s.flow, s.behind),
                    None => println!(
                        "  read by {}: not started yet ({} messages to read)",
                        s.flow, s.behind
                    ),
                }
            }
        }
        for i in &identity {
            let n = |a: &str| i.actions.get(a).copied().unwrap_or(0);
            println!(
                "identity {}: {} records, {} open conflicts, {} matches waiting for review; {} creates refused, {} changes refused (non-owner)",
                i.entity,
                i.records,
                i.open_conflicts,
                i.waiting_matches,
                n("create_refused"),
                n("refused")
            );
        }
        // one line per flow with a freshness SLA; LATE in red on a terminal
        let color = std::io::IsTerminal::is_terminal(&std::io::stdout())
            && std::env::var_os("NO_COLOR").is_none();
        for f in &freshness {
            let word = match (f.late(), color) {
                (true, true) => "\x1b[1;31mLATE\x1b[0m",
                (true, false) => "LATE",
                (false, true) => "\x1b[32mok\x1b[0m",
                (false, false) => "ok",
            };
            println!("freshness {:<24} {word}  {}", f.flow, f.reason());
        }
        println!(
            "accounting: {}",
            if balanced {
                "every received record is delivered, dead-lettered, rejected, filtered, discarded or pending"
            } else {
                "UNBALANCED: counts do not add up (please report this)"
            }
        );
    }
    Ok(if balanced {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// A store opened by a command that only looks: the SQLite file read-only,
/// or the PostgreSQL journal as a reader. Neither is created, migrated or
/// compacted.
pub enum ReadStore {
    Sqlite(weft_store::Reader),
    #[cfg(feature = "postgres")]
    Postgres(weft_store::PgJournal),
}

impl ReadStore {
    pub fn counts(&self, lanes: &[weft_store::LaneId]) -> Result<Vec<weft_store::FlowCounts>> {
        Ok(match self {
            Self::Sqlite(r) => r.counts(lanes)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.counts(lanes)?,
        })
    }
    pub fn dlq_depths(&self) -> Result<Vec<(String, String, i64)>> {
        Ok(match self {
            Self::Sqlite(r) => r.dlq_depths()?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.dlq_depths()?,
        })
    }
    pub fn dlq_list(&self, f: &weft_store::DlqFilter) -> Result<Vec<weft_store::DlqEntry>> {
        Ok(match self {
            Self::Sqlite(r) => r.dlq_list(f)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.dlq_list(f)?,
        })
    }
    pub fn dlq_get(&self, id: i64) -> Result<Option<weft_store::DlqEntry>> {
        Ok(match self {
            Self::Sqlite(r) => r.dlq_get(id)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.dlq_get(id)?,
        })
    }
    pub fn crosswalk(
        &self,
        system: Option<&str>,
        limit: usize,
    ) -> Result<Vec<weft_store::CrosswalkRow>> {
        Ok(match self {
            Self::Sqlite(r) => r.crosswalk(system, limit)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.crosswalk(system, limit)?,
        })
    }
    /// What the store holds of the records `id` names (event id,
    /// correlation id or entity key), at most `limit` of each kind.
    pub fn lookup(&self, id: &str, limit: usize) -> Result<weft_store::RecordLookup> {
        Ok(match self {
            Self::Sqlite(r) => r.lookup(id, limit)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.lookup(id, limit)?,
        })
    }
    /// The hubs on the journal and their heartbeats: on PostgreSQL; none on
    /// SQLite (one hub).
    pub fn nodes(&self) -> Result<Vec<weft_store::NodeInfo>> {
        Ok(match self {
            Self::Sqlite(_) => Vec::new(),
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.nodes()?,
        })
    }
    /// Which node runs each source: on PostgreSQL; none on SQLite (one hub).
    pub fn source_leases(&self) -> Result<Vec<weft_store::SourceLease>> {
        Ok(match self {
            Self::Sqlite(_) => Vec::new(),
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.source_leases()?,
        })
    }
    pub fn drift_events(&self, source: Option<&str>) -> Result<Vec<weft_store::DriftEvent>> {
        Ok(match self {
            Self::Sqlite(r) => r.drift_events(source)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.drift_events(source)?,
        })
    }
    /// Every topic of `cfg` with its subscribers' positions and lags.
    pub fn topics(
        &self,
        cfg: &weft_core::config::Config,
    ) -> Result<Vec<weft_runtime::topic::TopicState>> {
        if cfg.topics.is_empty() {
            return Ok(Vec::new());
        }
        Ok(match self {
            Self::Sqlite(r) => weft_runtime::topic::states_from(
                cfg,
                &weft_runtime::topic::TopicReads {
                    checkpoint: &|s, k| r.checkpoint(s, k),
                    head: &|t| r.topic_head(t),
                    behind: &|t, a| r.topic_behind(t, a),
                },
            )?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => weft_runtime::topic::states(j, cfg)?,
        })
    }
    pub fn identity_summary(&self) -> Result<Vec<weft_store::canonical::IdentitySummary>> {
        Ok(match self {
            Self::Sqlite(r) => r.identity_summary()?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.identity_summary()?,
        })
    }
    /// A canonical record with its links.
    pub fn canonical(
        &self,
        entity: &str,
        id: &str,
    ) -> Result<Option<weft_store::canonical::CanonicalView>> {
        Ok(match self {
            Self::Sqlite(r) => r.canonical(entity, id)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.canonical(entity, id)?,
        })
    }
    /// `(entity, canonical id)`, newest change first.
    pub fn canonical_list(
        &self,
        entity: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        Ok(match self {
            Self::Sqlite(r) => r.canonical_list(entity, limit)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.canonical_list(entity, limit)?,
        })
    }
    /// The canonical id a system's id is linked to.
    pub fn canonical_by_external(
        &self,
        entity: &str,
        system: &str,
        external_id: &str,
    ) -> Result<Option<String>> {
        Ok(match self {
            Self::Sqlite(r) => r.canonical_by_external(entity, system, external_id)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.canonical_by_external(entity, system, external_id)?,
        })
    }
    pub fn canonical_history(
        &self,
        f: &weft_store::HistoryFilter,
    ) -> Result<Vec<weft_store::canonical::HistoryEntry>> {
        Ok(match self {
            Self::Sqlite(r) => r.canonical_history(f)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.canonical_history(f)?,
        })
    }
    pub fn conflicts(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<weft_store::canonical::ConflictEntry>> {
        Ok(match self {
            Self::Sqlite(r) => r.conflicts(status, limit)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.conflicts(status, limit)?,
        })
    }
    pub fn matches(
        &self,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<weft_store::canonical::MatchEntry>> {
        Ok(match self {
            Self::Sqlite(r) => r.matches(status, limit)?,
            #[cfg(feature = "postgres")]
            Self::Postgres(j) => j.matches(status, limit)?,
        })
    }
}

/// The config's store, to read: never created or migrated by a command
/// that only looks.
pub fn open_read(cfg: &weft_core::config::Config) -> Result<ReadStore> {
    match &cfg.store.postgres {
        #[cfg(feature = "postgres")]
        Some(pg) => Ok(ReadStore::Postgres(open_postgres(
            pg,
            weft_store::PgRole::Reader,
        )?)),
        #[cfg(not(feature = "postgres"))]
        Some(_) => anyhow::bail!(
            "store.postgres: this weft was built without PostgreSQL (cargo feature `postgres`)"
        ),
        None => Ok(ReadStore::Sqlite(open_read_only(cfg)?)),
    }
}

/// The PostgreSQL journal of `store.postgres`, opened by a command (no
/// hub's session lock, no lease touched).
#[cfg(feature = "postgres")]
pub fn open_postgres(
    pg: &weft_core::config::PgStore,
    role: weft_store::PgRole,
) -> Result<weft_store::PgJournal> {
    weft_store::PgJournal::open(weft_store::PgOptions {
        url: pg.url.expose().to_owned(),
        schema: pg.schema.clone(),
        node: pg.node.clone(),
        pool_size: 2,
        role,
    })
    .with_context(|| {
        format!(
            "cannot open the PostgreSQL journal (schema {}, node {})",
            pg.schema, pg.node
        )
    })
}

/// The SQLite store, read-only: never created or migrated by a command that
/// only looks.
pub fn open_read_only(cfg: &weft_core::config::Config) -> Result<weft_store::Reader> {
    SqliteJournal::open_read_only(&cfg.store.path)
        .with_context(|| format!("cannot read the store at {}", cfg.store.path.display()))
}
