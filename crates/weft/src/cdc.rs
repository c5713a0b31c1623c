//! `weft cdc resnapshot`: the way out of a lost replication slot or a
//! purged binlog, and of a table whose copy in the destinations is wrong.
//!
//! It records a request ([`weft_connectors::cdc::ResnapshotRequest`]) in the
//! store in one transaction and changes nothing else: no checkpoint is
//! reset, so a hub running beside it cannot overwrite the request with its
//! next batch, and nothing is lost if the command runs twice. The source
//! acts on it at its next start: a restart of the hub, or the supervisor's
//! restart of a source that stopped with an error (a lost slot or binlog
//! stops it; it is restarted with backoff). The request is served when the
//! snapshot's last rows are committed with a position naming it, so a crash
//! during the copy takes the snapshot again.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use weft_connectors::cdc::{RESNAPSHOT_KEY, ResnapshotRequest};
use weft_core::config::SourceSpec;
use weft_store::{Dedupe, IngestBatch};

use crate::ConfigArg;

#[derive(Subcommand)]
pub enum CdcCmd {
    /// Take a new snapshot of a CDC source at its next start (safe beside
    /// a running hub). Without `--tables`: a new slot (PostgreSQL) or binlog
    /// position (MariaDB/MySQL) and a copy of every table, then streaming
    /// from there. With `--tables` (PostgreSQL): those tables alone are
    /// copied again, the slot kept. The copied rows are delivered as
    /// `op: r` events: destinations that upsert by key get the current rows
    /// again.
    Resnapshot {
        #[command(flatten)]
        cfg: ConfigArg,
        /// The source system (a `postgres_cdc` or `mysql_cdc` source).
        system: String,
        /// Only these tables, `schema.table` or `table` (schema `public`),
        /// comma-separated. PostgreSQL only.
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
    },
}

pub fn cdc(cmd: CdcCmd) -> Result<ExitCode> {
    let CdcCmd::Resnapshot {
        cfg,
        system,
        tables,
    } = cmd;
    let (config, journal) = crate::dlq::open(&cfg)?;
    let Some(sys) = config.systems.get(&system) else {
        bail!("no system `{system}` in {}", cfg.config.display());
    };
    let tables: Vec<String> = match &sys.source {
        Some(SourceSpec::PostgresCdc { settings }) => {
            let tables = tables
                .iter()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
                .map(|t| {
                    if t.contains('.') {
                        t.to_owned()
                    } else {
                        format!("public.{t}")
                    }
                })
                .collect::<Vec<_>>();
            configured_pg_tables(&system, settings, &tables)?;
            tables
        }
        Some(SourceSpec::MysqlCdc { .. }) => {
            if !tables.is_empty() {
                bail!(
                    "`--tables` is for postgres_cdc sources; a mysql_cdc source takes a whole new snapshot"
                );
            }
            Vec::new()
        }
        Some(other) => bail!(
            "system `{system}` reads a `{}` source, not a CDC one",
            other.kind()
        ),
        None => bail!("system `{system}` has no source"),
    };
    let now = chrono::Utc::now().timestamp_millis();
    let request = ResnapshotRequest {
        id: format!("{now}-{}", std::process::id()),
        tables,
    };
    let value = serde_json::to_string(&request)?;
    crate::dlq::block_on(journal.ingest(IngestBatch {
        source: system.clone(),
        dedupe: Dedupe::Position,
        events: Vec::new(),
        checkpoint: Some((RESNAPSHOT_KEY.to_owned(), value)),
        fence: None,
    }))?
    .context("cannot record the request in the store")?;
    let what = if request.tables.is_empty() {
        "every table".to_owned()
    } else {
        request.tables.join(", ")
    };
    println!(
        "resnapshot of {system} ({what}) requested ({}): the source takes it at its next start \
         (a stopped source is restarted by a running hub within a minute; else at `weft run`)",
        request.id
    );
    Ok(ExitCode::SUCCESS)
}

/// Tables asked for must be among the configured ones (when the config
/// lists them; an existing publication used as it is is not checked here).
#[cfg(feature = "cdc-postgres")]
fn configured_pg_tables(
    system: &str,
    settings: &weft_core::config::raw::ConnectorSettings,
    asked: &[String],
) -> Result<()> {
    let Ok(cfg) = weft_connectors::cdc::postgres::PgCdcConfig::from_settings(system, settings)
    else {
        bail!("the source of `{system}` is not valid (run `weft validate`)");
    };
    if cfg.tables.is_empty() {
        return Ok(());
    }
    for t in asked {
        if !cfg.tables.iter().any(|(s, n)| format!("{s}.{n}") == *t) {
            bail!("table `{t}` is not among the `tables` of `{system}`");
        }
    }
    Ok(())
}

#[cfg(not(feature = "cdc-postgres"))]
fn configured_pg_tables(
    _system: &str,
    _settings: &weft_core::config::raw::ConnectorSettings,
    _asked: &[String],
) -> Result<()> {
    Ok(())
}
