//! `weft map test`: run a flow's filter, mapping and contracts on sample
//! payloads, without a hub or a store.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use weft_store::FlowOutcome;

use crate::ConfigArg;

#[derive(Subcommand)]
pub enum MapCmd {
    /// Run a flow's mappings on samples (JSON, a JSON array or JSON Lines;
    /// files or `-` for stdin) and print each destination's payload and any
    /// contract violation; exit 1 if any record fails.
    Test(MapTest),
}

#[derive(Args)]
pub struct MapTest {
    #[command(flatten)]
    cfg: ConfigArg,
    /// The flow to run.
    #[arg(long)]
    flow: String,
    /// Sample files; none or `-` reads stdin.
    files: Vec<PathBuf>,
}

pub fn map(cmd: MapCmd) -> Result<ExitCode> {
    let MapCmd::Test(t) = cmd;
    let cfg = match crate::load_config(&t.cfg.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Some(flow) = cfg.flows.iter().find(|f| f.name == t.flow) else {
        let known: Vec<&str> = cfg.flows.iter().map(|f| f.name.as_str()).collect();
        bail!("no flow `{}`; known: {}", t.flow, known.join(", "));
    };
    let mut inputs: Vec<(String, String)> = Vec::new();
    if t.files.is_empty() || t.files.iter().any(|f| f.as_os_str() == "-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read stdin")?;
        inputs.push(("stdin".into(), s));
    }
    for f in t.files.iter().filter(|f| f.as_os_str() != "-") {
        let s =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        inputs.push((f.display().to_string(), s));
    }
    let (mut n, mut failed) = (0usize, 0usize);
    for (name, text) in inputs {
        for (loc, rec) in records(&name, &text) {
            n += 1;
            let data = match rec {
                Ok(v) => v,
                Err(e) => {
                    failed += 1;
                    println!("{loc}: FAILED: not JSON: {e}");
                    continue;
                }
            };
            let id = format!("maptest-{n}");
            let attrs = json!({"id": id, "source": flow.from, "type": "weft.maptest", "specversion": "1.0", "correlationid": id});
            let outcome = weft_runtime::run_flow(flow, &flow.from, &id, &data, &attrs);
            match outcome {
                FlowOutcome::Filtered { .. } => println!("{loc}: filtered"),
                FlowOutcome::Canonical { report, .. } => println!(
                    "{loc}: {} `{}` of {}: {}",
                    report.rules.entity,
                    report.external_id,
                    flow.from,
                    Value::Object(report.fields)
                ),
                FlowOutcome::Rejected { error, .. } => {
                    failed += 1;
                    println!("{loc}: FAILED: {error}");
                }
                FlowOutcome::Routed { deliveries, .. } => {
                    // warn-mode flows deliver despite violations: show them here
                    let mut bad = Vec::new();
                    if let Some(m) = &flow.mapping
                        && let Ok(mapped) = m.run_one(data.clone(), attrs.clone(), &[])
                    {
                        bad.extend(
                            weft_runtime::contracts::violations_of(flow, &mapped)
                                .into_iter()
                                .map(|v| format!("entity: {v}")),
                        );
                    }
                    for (d, spec) in deliveries.iter().zip(&flow.destinations) {
                        if let (Some(c), Ok(p)) =
                            (&spec.contract, serde_json::from_str::<Value>(&d.payload))
                        {
                            bad.extend(
                                c.violations(&p, flow.data.sensitive())
                                    .into_iter()
                                    .map(|v| format!("contract of `{}`: {v}", d.destination)),
                            );
                        }
                    }
                    if bad.is_empty() {
                        println!("{loc}: ok");
                    } else {
                        failed += 1;
                        println!("{loc}: FAILED (delivered under on_violation: warn)");
                        for b in &bad {
                            println!("  violation: {b}");
                        }
                    }
                    for d in deliveries {
                        println!("  -> {}: {}", d.destination, d.payload);
                    }
                }
            }
        }
    }
    println!("{} passed, {} failed", n - failed, failed);
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A file's records: one JSON document (an array is a list of records), or
/// JSON Lines.
fn records(name: &str, text: &str) -> Vec<(String, Result<Value, String>)> {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return match v {
            Value::Array(a) => a
                .into_iter()
                .enumerate()
                .map(|(i, x)| (format!("{name}[{i}]"), Ok(x)))
                .collect(),
            other => vec![(name.to_owned(), Ok(other))],
        };
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            (
                format!("{name}:{}", i + 1),
                serde_json::from_str(l).map_err(|e| e.to_string()),
            )
        })
        .collect()
}
