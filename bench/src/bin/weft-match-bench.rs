//! Fuzzy matching's cost at scale: `--records` canonical customers (default
//! 1M) loaded through the journal's ingest, then `--incoming` reports
//! (default 100k) from a second system matched against them: a third are
//! a known customer with a typo (linked), a third a known customer by
//! initial (held for review), a third new people (created). SQLite with
//! `synchronous=FULL`, batches of `--batch`; prints one table with the
//! rates, the outcomes, the peak memory and the store's size.
//!
//!     cargo run --release -p weft-bench --bin weft-match-bench -- [--records 1000000] [--incoming 100000]

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use serde_json::{Map, Value, json};
use weft_core::identity::{Fuzzy, Rules};
use weft_store::{
    CanonicalReport, Dedupe, FlowOutcome, IngestBatch, Journal, JournalRead, NewEvent, Role,
    SqliteJournal, Synchronous,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Cli {
    /// Canonical records loaded first.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Reports then matched against them.
    #[arg(long, default_value_t = 100_000)]
    incoming: usize,
    /// Events per ingest transaction.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Customers per company (the size of a block).
    #[arg(long, default_value_t = 20)]
    per_company: usize,
}

const FIRST: &[&str] = &[
    "John", "Mary", "Ahmed", "Wei", "Olga", "Pedro", "Aisha", "Lars", "Yuki", "Grace", "Ivan",
    "Fatima", "Noah", "Chloe", "Ravi", "Elena", "Tomas", "Mei", "Kwame", "Sofia",
];
const LAST: &[&str] = &[
    "Smith", "Garcia", "Khan", "Zhang", "Petrova", "Silva", "Okafor", "Nilsson", "Tanaka",
    "Murphy", "Horvat", "Haddad", "Cohen", "Dubois", "Patel", "Rossi", "Novak", "Lin", "Mensah",
    "Moreau", "Kowalski", "Jensen", "Schmidt", "Costa", "Yilmaz",
];

/// xorshift, seeded: the same data every run.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Customer `i`: a name, its company (`per_company` customers each).
fn customer(i: usize, per_company: usize) -> (String, String) {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
    let name = format!(
        "{} {}-{}",
        FIRST[r.below(FIRST.len())],
        LAST[r.below(LAST.len())],
        r.below(1000)
    );
    (name, format!("Company {} Limited", i / per_company))
}

fn event(system: &str, id: String, fields: Map<String, Value>, rules: &Arc<Rules>) -> NewEvent {
    NewEvent {
        event_id: format!("{system}-{id}"),
        correlation_id: format!("c-{system}-{id}"),
        received_at: weft_store::now_ms(),
        event_time: weft_store::now_ms(),
        source_version: None,
        group_id: None,
        traceparent: None,
        tracestate: None,
        attributes: String::new(),
        payload: String::new(),
        outcomes: vec![FlowOutcome::Canonical {
            flow: format!("{system}_customers"),
            report: Box::new(CanonicalReport {
                rules: rules.clone(),
                external_id: id,
                fields,
                changed_at: None,
            }),
        }],
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `n` events made by `make`, ingested in batches of `batch`; the seconds taken.
async fn ingest(
    j: &dyn Journal,
    system: &str,
    n: usize,
    batch: usize,
    mut make: impl FnMut(usize) -> NewEvent,
) -> Result<f64> {
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let events = (i..(i + batch).min(n)).map(&mut make).collect();
        i += batch;
        j.ingest(IngestBatch {
            source: system.into(),
            dedupe: Dedupe::Id,
            events,
            checkpoint: None,
            fence: None,
        })
        .await?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let rules = Arc::new(Rules {
        entity: "customer".into(),
        create: None,
        owners: Default::default(),
        conflict: Default::default(),
        non_owner: Default::default(),
        match_keys: vec!["email".into()],
        fuzzy: Some(Fuzzy {
            fields: vec![("name".into(), 1.0), ("company".into(), 1.0)],
            block: vec!["company".into()],
            link: 0.95,
            review: 0.8,
        }),
        routes: Vec::new(),
    });
    let dir = std::env::temp_dir().join(format!("weft-match-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("journal.db");
    let j = SqliteJournal::open(&path, Synchronous::Full, Role::Hub)?;

    let per_company = cli.per_company;
    let load_s = ingest(&j, "crm", cli.records, cli.batch, |i| {
        let (name, company) = customer(i, per_company);
        let f =
            obj(json!({"name": name, "company": company, "email": format!("c{i}@crm.example")}));
        event("crm", format!("C{i}"), f, &rules)
    })
    .await?;

    // the incoming system's records: known customers spelled its way, and new ones
    let mut r = Rng(42);
    let records = cli.records;
    let match_s = ingest(&j, "erp", cli.incoming, cli.batch, |k| {
        let i = r.below(records);
        let (name, company) = customer(i, per_company);
        let company = company.replace(" Limited", " Ltd.");
        let name = match k % 3 {
            // a typo: one letter doubled
            0 => {
                let (a, b) = name.split_at(2);
                format!("{a}{}{b}", &a[1..])
            }
            // the initial only
            1 => format!(
                "{}. {}",
                &name[..1],
                name.split_once(' ').map_or("", |x| x.1)
            ),
            // someone else at that company
            _ => format!("Newcomer {k}"),
        };
        let f =
            obj(json!({"name": name, "company": company, "email": format!("e{k}@erp.example")}));
        event("erp", format!("E{k}"), f, &rules)
    })
    .await?;

    let held = j.matches(Some("open"), usize::MAX)?.len();
    let total = j.canonical_list(Some("customer"), usize::MAX)?.len();
    let created = total - cli.records;
    let linked = cli.incoming - held - created;
    let size_mb = std::fs::metadata(&path).map_or(0, |m| m.len()) as f64 / 1e6;
    println!(
        "| canonical records | incoming | load rec/s | match rec/s | linked | held for review | created | peak RSS MB | store MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.0} | {:.0} | {linked} | {held} | {created} | {:.0} | {size_mb:.0} |",
        cli.records,
        cli.incoming,
        cli.records as f64 / load_s,
        cli.incoming as f64 / match_s,
        peak_rss_mb()
    );
    drop(j);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
