//! `weft dlq`: list, show, replay, discard dead letters.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use weft_store::{DlqEntry, DlqFilter, Role, SqliteJournal};

use crate::ConfigArg;

#[derive(Subcommand)]
pub enum DlqCmd {
    /// List dead letters (newest last).
    List {
        #[command(flatten)]
        cfg: ConfigArg,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show one entry: error, payload, history.
    Show {
        #[command(flatten)]
        cfg: ConfigArg,
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Send entries again: delivery failures go back to their destination
    /// with the same idempotency key; parse/map failures run through their
    /// flow again.
    Replay {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Entry ids; or use --all with filters.
        ids: Vec<i64>,
        /// Every entry matching the filters.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: FilterArgs,
        /// Replace the payload with this JSON file's content (one id only).
        #[arg(long)]
        payload: Option<PathBuf>,
        /// Replay even when a later write of the same key was delivered
        /// (the destination then ends on this older data).
        #[arg(long)]
        force: bool,
    },
    /// Give up on entries; they stay listed with status `discarded`.
    Discard {
        #[command(flatten)]
        cfg: ConfigArg,
        ids: Vec<i64>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

#[derive(Args, Clone, Default)]
pub struct FilterArgs {
    /// Only this flow.
    #[arg(long)]
    flow: Option<String>,
    /// Only this destination.
    #[arg(long)]
    destination: Option<String>,
    /// Only errors containing this text.
    #[arg(long)]
    error: Option<String>,
    /// Only entries that failed within this long (e.g. `1h`, `30m`).
    #[arg(long)]
    since: Option<String>,
    /// `dead` (default), `replayed`, `discarded` or `all`.
    #[arg(long)]
    status: Option<String>,
    /// At most this many.
    #[arg(long)]
    limit: Option<usize>,
}

impl FilterArgs {
    fn to_filter(&self) -> Result<DlqFilter> {
        let since = match &self.since {
            None => None,
            Some(s) => {
                let d = weft_core::config::parse_duration(s).map_err(anyhow::Error::msg)?;
                Some(weft_store::now_ms() - d.as_millis() as i64)
            }
        };
        Ok(DlqFilter {
            flow: self.flow.clone(),
            destination: self.destination.clone(),
            error_contains: self.error.clone(),
            status: self.status.clone(),
            since,
            after_id: None,
            limit: self.limit,
        })
    }
}

pub fn dlq(cmd: DlqCmd) -> Result<ExitCode> {
    match cmd {
        DlqCmd::List { cfg, filter, json } => {
            let reader = read(&cfg)?;
            let entries = reader.dlq_list(&filter.to_filter()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:>6}  {:<9} {:<8} {:<20} {:<14} {:>8}  {:<20} ERROR",
                    "ID", "STATUS", "STAGE", "FLOW", "DESTINATION", "ATTEMPTS", "FAILED AT"
                );
                for e in &entries {
                    println!(
                        "{:>6}  {:<9} {:<8} {:<20} {:<14} {:>8}  {:<20} {}",
                        e.id,
                        e.status,
                        e.stage,
                        e.flow,
                        if e.destination.is_empty() {
                            "-"
                        } else {
                            &e.destination
                        },
                        e.attempts,
                        time(e.failed_at),
                        one_line(&e.error, 100)
                    );
                }
                println!(
                    "{} entr{}",
                    entries.len(),
                    if entries.len() == 1 { "y" } else { "ies" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCmd::Show { cfg, id, json } => {
            let reader = read(&cfg)?;
            let Some(e) = reader.dlq_get(id)? else {
                bail!("no DLQ entry {id}");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                show(&e);
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCmd::Replay {
            cfg,
            ids,
            all,
            filter,
            payload,
            force,
        } => {
            let (config, journal) = open(&cfg)?;
            let targets = select(&read(&cfg)?, ids, all, &filter)?;
            let payload = match payload {
                None => None,
                Some(p) => {
                    if targets.len() != 1 {
                        bail!(
                            "--payload replaces one entry's payload; {} selected",
                            targets.len()
                        );
                    }
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read {}", p.display()))?;
                    serde_json::from_str::<serde_json::Value>(&text)
                        .with_context(|| format!("{} is not valid JSON", p.display()))?;
                    Some(text)
                }
            };
            let mut ok = 0;
            for e in &targets {
                match block_on(weft_runtime::dlq::replay(
                    &config,
                    journal.as_ref(),
                    e,
                    payload.as_deref(),
                    force,
                ))? {
                    Ok(()) => {
                        ok += 1;
                        println!("replayed {} (correlation id {})", e.id, e.correlation_id);
                    }
                    Err(err) => eprintln!("entry {}: {err}", e.id),
                }
            }
            println!("{ok} of {} replayed", targets.len());
            Ok(if ok == targets.len() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        DlqCmd::Discard {
            cfg,
            ids,
            all,
            filter,
        } => {
            let (_, journal) = open(&cfg)?;
            let targets = select(&read(&cfg)?, ids, all, &filter)?;
            let mut ok = 0;
            for e in &targets {
                match block_on(weft_runtime::dlq::discard(
                    journal.as_ref(),
                    e.id,
                    "discarded",
                ))? {
                    Ok(()) => ok += 1,
                    Err(err) => eprintln!("entry {}: {err}", e.id),
                }
            }
            println!("{ok} of {} discarded", targets.len());
            Ok(if ok == targets.len() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// The store, to change it: beside a running hub this is a second writer,
/// which the journal allows (SQLite: IMMEDIATE transactions; PostgreSQL:
/// row locks; no lease touched; the hub's lanes poll and see the change).
pub(crate) fn open(
    cfg: &ConfigArg,
) -> Result<(weft_core::config::Config, Arc<dyn weft_store::Journal>)> {
    let config = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(_) => bail!("the config is invalid (see above)"),
    };
    if let Some(pg) = &config.store.postgres {
        #[cfg(feature = "postgres")]
        {
            let j = crate::status::open_postgres(pg, weft_store::PgRole::Tool)?;
            return Ok((config, Arc::new(j)));
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = pg;
            bail!(
                "store.postgres: this weft was built without PostgreSQL (cargo feature `postgres`)"
            );
        }
    }
    let path = &config.store.path;
    if !path.exists() {
        bail!("no store at {} yet: `weft run` creates it", path.display());
    }
    if SqliteJournal::hub_running(path) {
        eprintln!("(a hub is running on this store: writing beside it)");
    }
    let journal = SqliteJournal::open(path, config.store.synchronous, Role::Tool)
        .with_context(|| format!("cannot open the store at {}", path.display()))?;
    Ok((config, Arc::new(journal)))
}

/// The store, to read (never created or migrated).
fn read(cfg: &ConfigArg) -> Result<crate::status::ReadStore> {
    let config = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(_) => bail!("the config is invalid (see above)"),
    };
    crate::status::open_read(&config)
}

pub(crate) fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?
        .block_on(f))
}

fn select(
    reader: &crate::status::ReadStore,
    ids: Vec<i64>,
    all: bool,
    filter: &FilterArgs,
) -> Result<Vec<DlqEntry>> {
    if all {
        if !ids.is_empty() {
            bail!("give ids or --all, not both");
        }
        // every page
        let mut f = filter.to_filter()?;
        let mut out: Vec<DlqEntry> = Vec::new();
        loop {
            let page = reader.dlq_list(&f)?;
            let Some(last) = page.last().map(|e| e.id) else {
                return Ok(out);
            };
            out.extend(page);
            f.after_id = Some(last);
        }
    }
    if ids.is_empty() {
        bail!("give one or more entry ids, or --all (with optional filters)");
    }
    ids.into_iter()
        .map(|id| {
            reader
                .dlq_get(id)?
                .with_context(|| format!("no DLQ entry {id}"))
        })
        .collect()
}

fn show(e: &DlqEntry) {
    println!("id:             {}", e.id);
    println!("status:         {}", e.status);
    println!("stage:          {}", e.stage);
    println!("flow:           {}", e.flow);
    println!(
        "destination:    {}",
        if e.destination.is_empty() {
            "-"
        } else {
            &e.destination
        }
    );
    println!("source:         {}", e.source);
    println!("event id:       {}", e.event_id);
    println!("correlation id: {}", e.correlation_id);
    if let Some(k) = &e.idempotency_key {
        println!("idempotency:    {k}");
    }
    if let Some(k) = &e.entity_key {
        println!("entity key:     {k}");
    }
    println!("accepted at:    {}", time(e.created_at));
    println!("failed at:      {}", time(e.failed_at));
    println!("attempts:       {}", e.attempts);
    println!("error:          {}", e.error);
    if let Some(at) = e.resolved_at {
        println!("resolved at:    {}", time(at));
    }
    match e.payload_dropped() {
        Some(dropped) => println!("payload:        {dropped}"),
        None => {
            let pretty = serde_json::from_str::<serde_json::Value>(&e.payload)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_else(|| e.payload.clone());
            println!("payload:\n{pretty}");
        }
    }
    println!("history:");
    if let Some(h) = e.history.as_array() {
        for item in h {
            println!("  {item}");
        }
    }
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn one_line(s: &str, max: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > max {
        format!("{}…", s.chars().take(max).collect::<String>())
    } else {
        s
    }
}
