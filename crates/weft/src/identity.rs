//! `weft xref`, `weft history`, `weft trace`, `weft conflicts`, `weft
//! matches`: canonical records, their links to each system's ids, what
//! changed them, and the decisions waiting for a person.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use weft_store::HistoryFilter;
use weft_store::canonical::HistoryEntry;

use crate::ConfigArg;

#[derive(Subcommand)]
pub enum XrefCmd {
    /// Canonical records, newest change first, with each system's id.
    List {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Only this entity.
        #[arg(long)]
        entity: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One canonical record: its fields (who set each, when), its links
    /// and what each linked system is known to hold. ID is the canonical
    /// id, or `SYSTEM:ID` for a system's id.
    Show {
        #[command(flatten)]
        cfg: ConfigArg,
        entity: String,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Link a system's id to a record by hand (ID: canonical id or
    /// `SYSTEM:ID` of another link); the record is then written there.
    Link {
        #[command(flatten)]
        cfg: ConfigArg,
        entity: String,
        id: String,
        /// `SYSTEM:ID`: the system's id to link.
        link: String,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Forget a system's id (`SYSTEM:ID`); its next report is matched again.
    Unlink {
        #[command(flatten)]
        cfg: ConfigArg,
        entity: String,
        link: String,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Move a system's id (`SYSTEM:ID`) off its record into a new record
    /// holding what that system reported last (two customers linked as one).
    Split {
        #[command(flatten)]
        cfg: ConfigArg,
        entity: String,
        link: String,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Fold record GONE into KEEP (canonical ids or `SYSTEM:ID`): its links
    /// move, the fields KEEP lacks are taken, GONE stays as a tombstone.
    Merge {
        #[command(flatten)]
        cfg: ConfigArg,
        entity: String,
        keep: String,
        gone: String,
        #[arg(long, default_value = "")]
        note: String,
    },
}

/// A time in ms since 1970 as people read it (UTC).
pub(crate) fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

/// `SYSTEM:ID` split at the first colon, the system checked against the config.
fn system_id(cfg: &weft_core::config::Config, s: &str) -> Result<(String, String)> {
    match s.split_once(':') {
        Some((system, id)) if cfg.systems.contains_key(system) && !id.is_empty() => {
            Ok((system.to_owned(), id.to_owned()))
        }
        _ => anyhow::bail!("`{s}`: expected SYSTEM:ID with a system of the config"),
    }
}

/// A canonical id, or the record a `SYSTEM:ID` is linked to.
fn record_id(
    cfg: &weft_core::config::Config,
    r: &crate::status::ReadStore,
    entity: &str,
    s: &str,
) -> Result<String> {
    match s.split_once(':') {
        Some((system, ext)) if cfg.systems.contains_key(system) => r
            .canonical_by_external(entity, system, ext)?
            .ok_or_else(|| anyhow::anyhow!("{s} is not linked to any {entity} record")),
        _ => Ok(s.to_owned()),
    }
}

fn change(
    cfg: ConfigArg,
    entity: &str,
    note: String,
    op: impl FnOnce(&weft_core::config::Config, &crate::status::ReadStore) -> Result<weft_store::XrefOp>,
) -> Result<ExitCode> {
    let (config, journal) = crate::dlq::open(&cfg)?;
    let reader = crate::status::open_read(&config)?;
    let Some(rules) = config.identity.get(entity).cloned() else {
        anyhow::bail!("the config has no `identity.{entity}`");
    };
    let op = op(&config, &reader)?;
    let applied =
        crate::dlq::block_on(journal.xref_change(weft_store::XrefChange { op, rules, note }))??;
    println!(
        "done; {} write(s) queued to bring the systems in line",
        applied.changed
    );
    Ok(ExitCode::SUCCESS)
}

pub fn xref(cmd: XrefCmd) -> Result<ExitCode> {
    use weft_store::XrefOp;
    match cmd {
        XrefCmd::Link {
            cfg,
            entity,
            id,
            link,
            note,
        } => change(cfg, &entity.clone(), note, |c, r| {
            let (system, external_id) = system_id(c, &link)?;
            Ok(XrefOp::Link {
                canonical_id: record_id(c, r, &entity, &id)?,
                system,
                external_id,
            })
        }),
        XrefCmd::Unlink {
            cfg,
            entity,
            link,
            note,
        } => change(cfg, &entity, note, |c, _| {
            let (system, external_id) = system_id(c, &link)?;
            Ok(XrefOp::Unlink {
                system,
                external_id,
            })
        }),
        XrefCmd::Split {
            cfg,
            entity,
            link,
            note,
        } => change(cfg, &entity, note, |c, _| {
            let (system, external_id) = system_id(c, &link)?;
            Ok(XrefOp::Split {
                system,
                external_id,
            })
        }),
        XrefCmd::Merge {
            cfg,
            entity,
            keep,
            gone,
            note,
        } => change(cfg, &entity.clone(), note, |c, r| {
            Ok(XrefOp::Merge {
                keep: record_id(c, r, &entity, &keep)?,
                gone: record_id(c, r, &entity, &gone)?,
            })
        }),
        XrefCmd::List {
            cfg,
            entity,
            limit,
            json,
        } => {
            let cfg = match crate::load_config_for_inspection(&cfg.config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let r = crate::status::open_read(&cfg)?;
            let mut views = Vec::new();
            for (e, id) in r.canonical_list(entity.as_deref(), limit)? {
                if let Some(v) = r.canonical(&e, &id)? {
                    views.push(v);
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
                return Ok(ExitCode::SUCCESS);
            }
            if views.is_empty() {
                println!("no canonical records yet (flows with `identity:` make them)");
            }
            for v in views {
                let ids: Vec<String> = v
                    .links
                    .iter()
                    .map(|l| {
                        format!(
                            "{}={}",
                            l.system,
                            l.external_id.as_deref().unwrap_or("(pending)")
                        )
                    })
                    .collect();
                println!(
                    "{} {} v{} {}  {}",
                    v.entity,
                    v.id,
                    v.version,
                    when(v.updated_at),
                    ids.join(" ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        XrefCmd::Show {
            cfg,
            entity,
            id,
            json,
        } => {
            let cfg = match crate::load_config_for_inspection(&cfg.config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let r = crate::status::open_read(&cfg)?;
            let cid = match id.split_once(':') {
                Some((system, ext)) if cfg.systems.contains_key(system) => {
                    r.canonical_by_external(&entity, system, ext)?
                }
                _ => Some(id.clone()),
            };
            let Some(v) = cid.map(|c| r.canonical(&entity, &c)).transpose()?.flatten() else {
                eprintln!("no {entity} record {id}");
                return Ok(ExitCode::from(1));
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{} {} (version {}, changed {})",
                v.entity,
                v.id,
                v.version,
                when(v.updated_at)
            );
            if let Some(into) = &v.merged_into {
                println!("  merged into {into}");
            }
            for (k, val) in &v.state {
                let by = v
                    .meta
                    .get(k)
                    .map(|m| format!("{} at {}", m.system, when(m.at)))
                    .unwrap_or_default();
                println!("  {k} = {val}    ({by})");
            }
            for l in &v.links {
                println!(
                    "  link {} = {} ({})",
                    l.system,
                    l.external_id.as_deref().unwrap_or("(pending)"),
                    l.how
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_history(rows: &[HistoryEntry], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    for h in rows {
        println!(
            "{} {} {} {} by {} (event {}, correlation {}): {}",
            when(h.at),
            h.entity,
            if h.canonical_id.is_empty() {
                "-"
            } else {
                &h.canonical_id
            },
            h.action,
            h.system,
            h.event_id,
            h.correlation_id,
            h.detail
        );
    }
    Ok(())
}

/// `weft history ENTITY ID`: every change of one record.
pub fn history(cfg: ConfigArg, entity: String, id: String, json: bool) -> Result<ExitCode> {
    let cfg = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let r = crate::status::open_read(&cfg)?;
    let cid = match id.split_once(':') {
        Some((system, ext)) if cfg.systems.contains_key(system) => {
            r.canonical_by_external(&entity, system, ext)?.unwrap_or(id)
        }
        _ => id,
    };
    let rows = r.canonical_history(&HistoryFilter {
        entity: Some(entity),
        canonical_id: Some(cid),
        ..Default::default()
    })?;
    print_history(&rows, json)?;
    Ok(ExitCode::SUCCESS)
}

/// `weft trace CORRELATION_ID`: what one change did to canonical records,
/// and the rows it caused at each destination.
pub fn trace(cfg: ConfigArg, correlation_id: String, json: bool) -> Result<ExitCode> {
    let cfg = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let r = crate::status::open_read(&cfg)?;
    let rows = r.canonical_history(&HistoryFilter {
        correlation_id: Some(correlation_id),
        ..Default::default()
    })?;
    print_history(&rows, json)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum ConflictsCmd {
    /// Decide a conflict: `--take current` keeps the canonical value,
    /// `--take proposed` takes the other system's, `--value JSON` sets one;
    /// the record is then written to every system that lacks it (beside a
    /// running hub too).
    Resolve {
        #[command(flatten)]
        cfg: ConfigArg,
        id: i64,
        #[arg(long, value_parser = ["current", "proposed"])]
        take: Option<String>,
        /// The field's value, as JSON (`"ACME Ltd"` with the quotes, `42`).
        #[arg(long, conflicts_with = "take")]
        value: Option<String>,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Manual conflicts, oldest first (open ones unless `--all`).
    List {
        #[command(flatten)]
        cfg: ConfigArg,
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn conflicts(cmd: ConflictsCmd) -> Result<ExitCode> {
    let (cfg, all, limit, json) = match cmd {
        ConflictsCmd::List {
            cfg,
            all,
            limit,
            json,
        } => (cfg, all, limit, json),
        ConflictsCmd::Resolve {
            cfg,
            id,
            take,
            value,
            note,
        } => return resolve(cfg, id, take, value, note),
    };
    let cfg = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let r = crate::status::open_read(&cfg)?;
    let rows = r.conflicts(if all { None } else { Some("open") }, limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no conflicts");
    }
    for c in rows {
        println!(
            "#{} {} {} .{}: canonical has {} (set by {}), {} says {} (event {}) [{}]",
            c.id,
            c.entity,
            c.canonical_id,
            c.field,
            c.current,
            c.current_system,
            c.system,
            c.proposed,
            c.event_id,
            c.status
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn resolve(
    cfg: ConfigArg,
    id: i64,
    take: Option<String>,
    value: Option<String>,
    note: String,
) -> Result<ExitCode> {
    let (config, journal) = crate::dlq::open(&cfg)?;
    let reader = crate::status::open_read(&config)?;
    let Some(c) = reader
        .conflicts(None, usize::MAX)?
        .into_iter()
        .find(|c| c.id == id)
    else {
        eprintln!("no conflict {id}");
        return Ok(ExitCode::from(1));
    };
    let Some(rules) = config.identity.get(&c.entity).cloned() else {
        anyhow::bail!("the config has no `identity.{}`", c.entity);
    };
    let value = match (take.as_deref(), value) {
        (Some("current"), _) => None,
        (Some(_), _) => Some(c.proposed.clone()),
        (None, Some(v)) => Some(serde_json::from_str(&v).map_err(|e| {
            anyhow::anyhow!("--value is not JSON ({e}): quote a string, e.g. '\"ACME\"'")
        })?),
        (None, None) => {
            anyhow::bail!("say which value wins: --take current|proposed or --value JSON")
        }
    };
    let applied = crate::dlq::block_on(journal.resolve_conflict(weft_store::ResolveConflict {
        id,
        value,
        rules,
        note,
    }))??;
    println!(
        "conflict {id} resolved; {} write(s) queued to bring the systems in line",
        applied.changed
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum MatchesCmd {
    /// Records held for review by fuzzy matching, oldest first (open ones
    /// unless `--all`), each with the record it may be and the scores.
    List {
        #[command(flatten)]
        cfg: ConfigArg,
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// The held record is the candidate (or `--candidate ID`): its id is
    /// linked and its fields merged; systems lacking the result are written
    /// (beside a running hub too).
    Accept {
        #[command(flatten)]
        cfg: ConfigArg,
        id: i64,
        /// Link to this canonical record instead of the candidate.
        #[arg(long)]
        candidate: Option<String>,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// The held record is someone else: it becomes a new record (where its
    /// system may create records).
    Reject {
        #[command(flatten)]
        cfg: ConfigArg,
        id: i64,
        #[arg(long, default_value = "")]
        note: String,
    },
}

pub fn matches(cmd: MatchesCmd) -> Result<ExitCode> {
    let (cfg, id, accept, candidate, note) = match cmd {
        MatchesCmd::List {
            cfg,
            all,
            limit,
            json,
        } => return list_matches(cfg, all, limit, json),
        MatchesCmd::Accept {
            cfg,
            id,
            candidate,
            note,
        } => (cfg, id, true, candidate, note),
        MatchesCmd::Reject { cfg, id, note } => (cfg, id, false, None, note),
    };
    let (config, journal) = crate::dlq::open(&cfg)?;
    let reader = crate::status::open_read(&config)?;
    let Some(m) = reader
        .matches(None, usize::MAX)?
        .into_iter()
        .find(|m| m.id == id)
    else {
        eprintln!("no match {id}");
        return Ok(ExitCode::from(1));
    };
    let Some(rules) = config.identity.get(&m.entity).cloned() else {
        anyhow::bail!("the config has no `identity.{}`", m.entity);
    };
    let applied = crate::dlq::block_on(journal.resolve_match(weft_store::ResolveMatch {
        id,
        accept,
        candidate,
        rules,
        note,
    }))??;
    println!(
        "match {id} {}; {} write(s) queued to bring the systems in line",
        if accept { "accepted" } else { "rejected" },
        applied.changed
    );
    Ok(ExitCode::SUCCESS)
}

fn list_matches(cfg: ConfigArg, all: bool, limit: usize, json: bool) -> Result<ExitCode> {
    let cfg = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let r = crate::status::open_read(&cfg)?;
    let rows = r.matches(if all { None } else { Some("open") }, limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no matches waiting");
    }
    for m in rows {
        println!(
            "#{} {} {}:{} may be {} (score {:.3}: {}) held {} [{}]",
            m.id,
            m.entity,
            m.system,
            m.external_id,
            m.candidate,
            m.score,
            m.detail
                .get("score")
                .and_then(|s| s.get("fields"))
                .map(|f| f.to_string())
                .unwrap_or_default(),
            when(m.created_at),
            m.status
        );
        println!("    held: {}", m.fields);
    }
    Ok(ExitCode::SUCCESS)
}
