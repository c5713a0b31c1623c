//! `weft status`: the record accounting per flow and destination.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use weft_store::Store;

pub fn status(path: &Path, json: bool) -> Result<ExitCode> {
    let cfg = match crate::load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let store = open_store(&cfg)?;
    let lanes: Vec<(String, String)> = cfg
        .flows
        .iter()
        .flat_map(|f| {
            f.destinations
                .iter()
                .map(|d| (f.name.clone(), d.system.clone()))
        })
        .collect();
    let reader = store.reader()?;
    let counts = reader.counts(&lanes)?;
    let dlq: i64 = reader.dlq_depths()?.iter().map(|d| d.2).sum();
    let balanced = counts.iter().all(|c| c.balanced);
    if json {
        let v = serde_json::json!({"lanes": counts, "dlq_depth": dlq, "balanced": balanced});
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

pub fn open_store(cfg: &weft_core::config::Config) -> Result<Store> {
    if !cfg.store.path.exists() {
        anyhow::bail!(
            "no store at {} yet: `weft run {}` creates it",
            cfg.store.path.display(),
            cfg.file.display()
        );
    }
    Store::open(&cfg.store.path, cfg.store.synchronous)
        .with_context(|| format!("cannot open the store at {}", cfg.store.path.display()))
}
