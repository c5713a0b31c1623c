//! `weft check CONFIG`: connect to every system of a config and print one
//! line per system and role (see `weft_connectors::probe`). Exit code 0
//! when nothing failed (warnings allowed), 1 when something did, 2 when
//! the config itself is invalid.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use weft_connectors::probe::{self, Probe, Verdict};

pub fn check(path: &Path, json: bool) -> Result<ExitCode> {
    let cfg = match crate::load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let lines: Vec<Probe> = rt.block_on(async {
        let (store, server, systems) = tokio::join!(
            probe::probe_store(&cfg.store),
            probe::probe_listeners(&cfg.server),
            probe::probe_all(&cfg)
        );
        let mut all = vec![store, server];
        all.extend(systems);
        all
    });
    // a probe's clients may leave tasks behind (a closing connection)
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    let failed = lines.iter().filter(|l| l.verdict == Verdict::Fail).count();
    let warned = lines.iter().filter(|l| l.verdict == Verdict::Warn).count();
    if json {
        let out = serde_json::json!({
            "config": path.display().to_string(),
            "ok": failed == 0,
            "checks": lines,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let width = lines.iter().map(|l| l.system.len()).max().unwrap_or(0);
        for l in &lines {
            let mark = match l.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            let what = if l.role == l.system {
                l.kind.to_string()
            } else {
                format!("{} {}", l.role, l.kind)
            };
            println!(
                "{mark}  {:<width$}  {:<20} {} ({} ms)",
                l.system, what, l.detail, l.millis
            );
        }
        println!(
            "{}: {} checks, {} failed, {} warnings",
            path.display(),
            lines.len(),
            failed,
            warned
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
