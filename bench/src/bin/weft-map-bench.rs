//! How fast weft's jq mappings run, without I/O: each variant is compiled
//! once and run over the first `--records` lines of a JSONL file (the
//! standard workload's contacts), printing a table.
//!
//!     cargo run --release -p weft-bench --bin weft-map-bench -- <contacts.jsonl>

use std::io::BufRead;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::Value;
use weft_core::mapping::Program;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Cli {
    /// A JSON Lines file of contacts (../shared/bench/gen/generate.py).
    file: std::path::PathBuf,
    #[arg(long, default_value_t = 100_000)]
    records: usize,
}

const VARIANTS: &[(&str, &str)] = &[
    ("identity", "."),
    ("one field", "{contact_id: .id}"),
    (
        "rename + flatten (11 fields)",
        "{contact_id: .id, given_name: .first_name, family_name: .last_name, email: .email, company_name: .company, company_category: .company_type, updated_at: .updated_at, address_street: .address.street, address_city: .address.city, address_postal_code: .address.postal_code, address_country: .address.country}",
    ),
    (
        "standard workload (inline value map)",
        r#"{contact_id: .id, given_name: .first_name, family_name: .last_name, email: .email, company_name: .company, company_category: ({customer: "CUSTOMER_ACTIVE", prospect: "LEAD_QUALIFIED", partner: "PARTNER_TECHNOLOGY", vendor: "SUPPLIER", reseller: "PARTNER_CHANNEL"}[.company_type // ""] // "UNCLASSIFIED"), updated_at: .updated_at, address_street: .address.street, address_city: .address.city, address_postal_code: .address.postal_code, address_country: .address.country}"#,
    ),
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let file =
        std::fs::File::open(&cli.file).with_context(|| format!("open {}", cli.file.display()))?;
    let mut records = Vec::with_capacity(cli.records);
    for line in std::io::BufReader::new(file).lines().take(cli.records) {
        records.push(serde_json::from_str::<Value>(&line?)?);
    }
    let event = serde_json::json!({"id": "1", "source": "bench", "type": "record", "time": "2026-01-01T00:00:00Z"});
    println!("| variant | records | µs/record | records/s |");
    println!("|---|---|---|---|");
    for (name, code) in VARIANTS {
        let p = Program::compile(code, &[]).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let t = Instant::now();
        for r in &records {
            p.run_one(r.clone(), event.clone(), &[])
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "| {name} | {} | {:.2} | {:.0} |",
            records.len(),
            secs * 1e6 / records.len() as f64,
            records.len() as f64 / secs
        );
    }
    Ok(())
}
