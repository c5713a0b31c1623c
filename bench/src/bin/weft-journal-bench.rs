//! The per-row cost of the journal's spine (ingest, claim, settle as
//! delivered), PgJournal against SqliteJournal, both durable: SQLite with
//! `synchronous=FULL` (weft's default), PostgreSQL with the server's
//! `synchronous_commit` (on by default: every commit fsynced). One lane,
//! distinct keys, batches of `--batch` rows (a file or SQL source) and of 1
//! row (a webhook), each without and with the attempt trail (an entry per
//! settled row, as a lane writes); prints one table.
//!
//!     cargo run --release -p weft-bench --bin weft-journal-bench -- \
//!         [--rows 20000] [--batch 500] [--pg postgresql://postgres@127.0.0.1:5432/postgres]
//!
//! The PostgreSQL run uses a database of its own (`weft_bench_<pid>`),
//! created and dropped here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use weft_store::{
    ClaimRequest, Dedupe, FlowOutcome, IngestBatch, Journal, LaneId, NewDelivery, NewEvent,
    Outcome, PgJournal, PgOptions, PgRole, Role, Settle, Settlement, SqliteJournal, Synchronous,
    WriteOutcome,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Cli {
    /// Rows per run with `--batch`-row batches.
    #[arg(long, default_value_t = 20_000)]
    rows: usize,
    /// Rows per batch (ingest, claim and settle alike).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Rows per run with 1-row batches.
    #[arg(long, default_value_t = 2_000)]
    single_rows: usize,
    /// The PostgreSQL server (any database: the bench makes its own).
    #[arg(long, default_value = "postgresql://postgres@127.0.0.1:5432/postgres")]
    pg: String,
}

#[derive(Default)]
struct Times {
    ingest: Duration,
    claim: Duration,
    settle: Duration,
    rows: usize,
}

fn event(i: usize) -> NewEvent {
    let id = format!("ev-{i}");
    NewEvent {
        event_id: id.clone(),
        correlation_id: format!("c-{i}"),
        received_at: weft_store::now_ms(),
        event_time: weft_store::now_ms(),
        source_version: None,
        group_id: None,
        traceparent: None,
        tracestate: None,
        attributes: "{\"type\":\"contact.updated\"}".into(),
        payload: format!("{{\"id\":{i},\"name\":\"contact {i}\",\"email\":\"c{i}@example.com\"}}"),
        outcomes: vec![FlowOutcome::Routed {
            flow: "f".into(),
            deliveries: vec![NewDelivery {
                destination: "d".into(),
                entity_key: Some(format!("k{i}")),
                idempotency_key: format!("ik-{i}"),
                payload: format!("{{\"contact_id\":{i},\"given_name\":\"contact {i}\"}}"),
                delivered: false,
            }],
        }],
    }
}

/// `rows` rows through ingest, claim and settle in batches of `batch`.
/// With `trail`, every settlement carries its write, as a lane's does (an
/// attempt-trail entry per row); without, none (the cost of the trail).
async fn run(
    j: &dyn Journal,
    first: usize,
    rows: usize,
    batch: usize,
    trail: bool,
) -> Result<Times> {
    let mut t = Times::default();
    let mut i = first;
    while i < first + rows {
        let n = batch.min(first + rows - i);
        let events = (i..i + n).map(event).collect();
        i += n;
        let start = Instant::now();
        j.ingest(IngestBatch {
            source: "bench".into(),
            dedupe: Dedupe::Id,
            events,
            checkpoint: Some(("pos".into(), i.to_string())),
            fence: None,
        })
        .await?;
        t.ingest += start.elapsed();
        let mut left = n;
        while left > 0 {
            let start = Instant::now();
            let claimed = j
                .claim(ClaimRequest {
                    lane: LaneId::new("f", "d"),
                    max: batch,
                    per_key: 1,
                    lease: Duration::from_secs(60),
                })
                .await?;
            t.claim += start.elapsed();
            anyhow::ensure!(
                !claimed.is_empty(),
                "nothing to claim with {left} rows left"
            );
            left = left.saturating_sub(claimed.len());
            let start = Instant::now();
            let s = j
                .settle(Settle {
                    items: claimed
                        .iter()
                        .map(|c| Settlement {
                            id: c.row.id,
                            token: c.token,
                            // as a lane settles: with its write, for the attempt trail
                            attempt: trail.then(|| weft_store::Attempt {
                                at: weft_store::now_ms(),
                                latency_ms: 1,
                                status: Some(200),
                            }),
                            outcome: Outcome::Delivered(WriteOutcome::default()),
                        })
                        .collect(),
                    follow_ups: Vec::new(),
                })
                .await?;
            t.settle += start.elapsed();
            anyhow::ensure!(s.delivered == claimed.len(), "settled {s:?}");
            t.rows += s.delivered;
        }
    }
    Ok(t)
}

fn row(engine: &str, batch: usize, trail: bool, t: &Times) {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / t.rows as f64;
    let total = t.ingest + t.claim + t.settle;
    println!(
        "| {engine} | {batch} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
        if trail { "yes" } else { "no" },
        t.rows,
        per(t.ingest),
        per(t.claim),
        per(t.settle),
        per(total),
        t.rows as f64 / total.as_secs_f64()
    );
}

/// Run `sql` on the server's maintenance connection.
async fn admin(url: &str, sql: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    let task = tokio::spawn(conn);
    client
        .batch_execute(sql)
        .await
        .with_context(|| sql.to_owned())?;
    drop(client);
    let _ = task.await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    println!(
        "| engine | batch | attempt trail | rows | ingest µs/row | claim µs/row | settle µs/row | total µs/row | rows/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");

    // each variant on a journal of its own, so that neither runs on the
    // other's rows
    for trail in [false, true] {
        let dir =
            std::env::temp_dir().join(format!("weft-journal-bench-{}-{trail}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let sqlite: Arc<dyn Journal> = Arc::new(SqliteJournal::open(
            &dir.join("journal.db"),
            Synchronous::Full,
            Role::Hub,
        )?);
        let t = run(sqlite.as_ref(), 0, cli.rows, cli.batch, trail).await?;
        row("SQLite", cli.batch, trail, &t);
        let t = run(sqlite.as_ref(), cli.rows, cli.single_rows, 1, trail).await?;
        row("SQLite", 1, trail, &t);
        drop(sqlite);
        std::fs::remove_dir_all(&dir)?;
    }

    // the same server and parameters, the bench's databases
    let (base, query) = cli.pg.split_once('?').unwrap_or((&cli.pg, ""));
    for trail in [false, true] {
        let db = format!("weft_bench_{}_{trail}", std::process::id());
        admin(base, &format!("CREATE DATABASE {db}")).await?;
        let url = match base.rsplit_once('/') {
            Some((server, _)) if query.is_empty() => format!("{server}/{db}"),
            Some((server, _)) => format!("{server}/{db}?{query}"),
            None => anyhow::bail!("--pg must end in /<database>: {}", cli.pg),
        };
        let result = async {
            let pg: Arc<dyn Journal> = Arc::new(PgJournal::open(PgOptions {
                node: "bench".into(),
                role: PgRole::Hub,
                ..PgOptions::new(url)
            })?);
            let t = run(pg.as_ref(), 0, cli.rows, cli.batch, trail).await?;
            row("PostgreSQL", cli.batch, trail, &t);
            let t = run(pg.as_ref(), cli.rows, cli.single_rows, 1, trail).await?;
            row("PostgreSQL", 1, trail, &t);
            anyhow::Ok(())
        }
        .await;
        admin(base, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
        result?;
    }
    Ok(())
}
