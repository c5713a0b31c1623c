//! `weft crosswalk list`: the ids destinations gave the records weft wrote.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use crate::ConfigArg;

#[derive(Subcommand)]
pub enum CrosswalkCmd {
    /// Crosswalk entries, newest first: destination system, source system,
    /// source key (entity key, else event id) and the destination's id.
    List {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Only this destination system.
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn crosswalk(cmd: CrosswalkCmd) -> Result<ExitCode> {
    let CrosswalkCmd::List {
        cfg,
        system,
        limit,
        json,
    } = cmd;
    let cfg = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let rows = crate::status::open_read(&cfg)?.crosswalk(system.as_deref(), limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no ids captured yet (an http sink's `capture_id` fills the crosswalk)");
    }
    for r in rows {
        let when = chrono::DateTime::from_timestamp_millis(r.updated_at)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        println!(
            "{} {}:{} -> {} (flow {}, event {}, {when})",
            r.system, r.source, r.source_key, r.external_id, r.flow, r.event_id
        );
    }
    Ok(ExitCode::SUCCESS)
}
