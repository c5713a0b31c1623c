//! `weft drift list|accept`: the schema drift weft has seen on its sources,
//! and accepting it (records showing it are no longer quarantined).

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use crate::ConfigArg;

#[derive(Subcommand)]
pub enum DriftCmd {
    /// Every drift event (new field, missing field, type change, new enum
    /// value), once each, with a masked example and how many records showed it.
    List {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Only this source system.
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Accept drift events by id (from `list`): records showing only
    /// accepted drift are no longer quarantined; a running hub follows
    /// within 2 s. `--replay` also replays the DLQ entries quarantined for
    /// drift that is all accepted now.
    Accept {
        #[command(flatten)]
        cfg: ConfigArg,
        #[arg(required = true)]
        ids: Vec<i64>,
        #[arg(long)]
        replay: bool,
    },
}

pub fn drift(cmd: DriftCmd) -> Result<ExitCode> {
    let (cfg, source, json) = match cmd {
        DriftCmd::List { cfg, source, json } => (cfg, source, json),
        DriftCmd::Accept { cfg, ids, replay } => return accept(&cfg, &ids, replay),
    };
    let cfg = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let events = crate::status::open_read(&cfg)?.drift_events(source.as_deref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&events)?);
        return Ok(ExitCode::SUCCESS);
    }
    if events.is_empty() {
        println!("no drift seen");
    }
    for e in events {
        let when = chrono::DateTime::from_timestamp_millis(e.first_seen)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        println!(
            "#{} {} {} {} {} ({} records, first {when}){} example: {}",
            e.id,
            e.source,
            e.kind,
            e.path,
            e.detail,
            e.count,
            if e.accepted_at.is_some() {
                ", accepted"
            } else {
                ""
            },
            e.example.unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn accept(cfg: &ConfigArg, ids: &[i64], replay: bool) -> Result<ExitCode> {
    let (config, journal) = crate::dlq::open(cfg)?;
    let r = crate::dlq::block_on(weft_runtime::drift::accept(
        &config,
        journal.as_ref(),
        ids,
        replay,
    ))??;
    for e in &r.accepted {
        println!(
            "accepted #{} {} {} {} ({})",
            e.id, e.source, e.kind, e.path, e.detail
        );
    }
    for id in &r.already {
        println!("#{id} was accepted before");
    }
    for id in &r.unknown {
        eprintln!("no drift event #{id} (see `weft drift list`)");
    }
    if replay {
        println!("{} quarantined entries replayed", r.replayed.len());
        if r.still_held > 0 {
            println!(
                "{} quarantined entries still show drift that is not accepted (see `weft dlq list --error drift:`)",
                r.still_held
            );
        }
        for (id, why) in &r.replay_failed {
            eprintln!("entry {id}: {why}");
        }
    }
    Ok(if r.unknown.is_empty() && r.replay_failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
