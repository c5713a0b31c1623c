//! `weft drift list`: the schema drift weft has seen on its sources.

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
}

pub fn drift(cmd: DriftCmd) -> Result<ExitCode> {
    let DriftCmd::List { cfg, source, json } = cmd;
    let cfg = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let events = crate::status::open_read_only(&cfg)?.drift_events(source.as_deref())?;
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
            "#{} {} {} {} {} ({} records, first {when}) example: {}",
            e.id,
            e.source,
            e.kind,
            e.path,
            e.detail,
            e.count,
            e.example.unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
