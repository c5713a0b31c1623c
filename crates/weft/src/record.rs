//! `weft record ID`: what the store holds of the records one id names (an
//! event id, a correlation id or an entity key): every write attempt, the
//! rows still waiting, dead letters and the ids destinations gave. The
//! dashboard's record inspector shows the same read.

use std::process::ExitCode;

use anyhow::Result;

use crate::ConfigArg;
use crate::identity::when;

pub fn record(cfg: ConfigArg, id: String, limit: usize, json: bool) -> Result<ExitCode> {
    let cfg = match crate::load_config_for_inspection(&cfg.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let found = crate::status::open_read(&cfg)?.lookup(&id, limit)?;
    if json {
        let out = weft_runtime::admin::record_json(&found);
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if found.attempts.is_empty()
        && found.pending.is_empty()
        && found.dead.is_empty()
        && found.written.is_empty()
    {
        println!("nothing in the store names {id} (attempts are kept for store.attempt_retention)");
        return Ok(ExitCode::SUCCESS);
    }
    for a in &found.attempts {
        let status = a.status.map_or("-".to_owned(), |s| s.to_string());
        print!(
            "{} {} -> {} event {} attempt {}: {} in {} ms, status {status}",
            when(a.at),
            a.flow,
            a.destination,
            a.event_id,
            a.attempt,
            a.outcome,
            a.latency_ms
        );
        match &a.error {
            Some(e) => println!(": {e}"),
            None => println!(),
        }
    }
    for r in &found.pending {
        println!(
            "pending {} -> {} event {}: {} failed attempt(s), next try {}{}",
            r.flow,
            r.destination,
            r.event_id,
            r.attempts,
            when(r.next_at),
            r.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }
    for e in &found.dead {
        println!(
            "dlq #{} ({}) {} -> {} event {}: {}",
            e.id, e.status, e.flow, e.destination, e.event_id, e.error
        );
    }
    for w in &found.written {
        println!(
            "written {}:{} -> {} in {} (event {})",
            w.source, w.source_key, w.external_id, w.system, w.event_id
        );
    }
    Ok(ExitCode::SUCCESS)
}
