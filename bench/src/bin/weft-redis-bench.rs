//! Redis Streams through weft: entries/s consumed from a stream, added to
//! a stream, and both, each durable (every entry committed to weft's
//! store before it is acknowledged with `XACK`; every add through the
//! sink's dedupe script).
//!
//!   cargo run --release -p weft-bench --bin weft-redis-bench -- --weft target/release/weft
//!
//! Needs a Redis (`--url`, default the machine's on 6379). Each scenario
//! uses keys of its own and deletes them; weft runs on a fresh store in a
//! temporary folder. Prints a Markdown table.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The weft binary.
    #[arg(long)]
    weft: std::path::PathBuf,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    url: String,
    /// Entries per scenario.
    #[arg(long, default_value_t = 50_000)]
    n: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut conn = redis::Client::open(a.url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(3)))
        .context("Redis")?;
    println!("| scenario | entries | seconds | entries/s |");
    println!("|---|---:|---:|---:|");
    for s in ["consume", "publish", "through"] {
        let secs = scenario(&a, &mut conn, s)?;
        println!(
            "| {} | {} | {:.1} | {:.0} |",
            match s {
                "consume" => "Redis stream -> weft -> JSON Lines file (consume)",
                "publish" => "generate -> weft -> Redis stream (publish)",
                _ => "Redis stream -> weft -> Redis stream",
            },
            a.n,
            secs,
            a.n as f64 / secs
        );
    }
    Ok(())
}

/// Delete the scenario's keys: the two streams and the dedupe keys.
fn clean(conn: &mut redis::Connection, inn: &str, out: &str, dedupe: &str) {
    let _: Result<i64, _> = redis::cmd("DEL").arg(inn).arg(out).query(conn);
    let mut cursor = 0u64;
    loop {
        let r: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{dedupe}*"))
            .arg("COUNT")
            .arg(10_000)
            .query(conn);
        let Ok((next, keys)) = r else { return };
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("UNLINK").arg(&keys).query(conn);
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// One scenario: the input made first (a preloaded stream), then weft
/// started, timed until the output holds every entry.
fn scenario(a: &Args, conn: &mut redis::Connection, which: &str) -> anyhow::Result<f64> {
    let id = std::process::id();
    let (inn, out) = (
        format!("weft-bench:in:{id}"),
        format!("weft-bench:out:{id}"),
    );
    let dedupe = format!("weft-bench:dedupe:{id}:");
    clean(conn, &inn, &out, &dedupe);
    let dir = std::env::temp_dir().join(format!("weft-redis-bench-{id}-{which}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let url = &a.url;
    let redis_in = format!(
        "    source:\n      redis: {{url: '{url}', stream: '{inn}', batch: 1000, block: 200ms}}\n"
    );
    let redis_out = format!(
        "    sink:\n      redis: {{url: '{url}', stream: '{out}', dedupe_prefix: '{dedupe}'}}\n"
    );
    let (src, dst) = match which {
        "consume" => (
            redis_in,
            "    sink:\n      jsonl: {path: ./out.jsonl}\n".to_owned(),
        ),
        "publish" => (
            format!(
                "    source:\n      generate: {{template: '{{id: ($seq % 1000), seq: $seq}}', count: {}, batch_size: 1000}}\n",
                a.n
            ),
            redis_out,
        ),
        _ => (redis_in, redis_out),
    };
    std::fs::write(
        dir.join("weft.yaml"),
        format!(
            "store:\n  path: ./store.db\nsystems:\n  a:\n{src}  b:\n{dst}flows:\n  f:\n    from: a\n    key: .id\n    to: [{{system: b, delivery: {{batch_size: 1000}}}}]\n"
        ),
    )?;
    if which != "publish" {
        let mut left = a.n;
        let mut i = 0u64;
        while left > 0 {
            let mut p = redis::pipe();
            for _ in 0..left.min(5000) {
                let body = format!("{{\"id\": {}, \"seq\": {i}}}", i % 1000);
                p.cmd("XADD")
                    .arg(&inn)
                    .arg("*")
                    .arg("data")
                    .arg(body)
                    .ignore();
                i += 1;
                left -= 1;
            }
            let () = p.query(conn)?;
        }
    }
    let started = Instant::now();
    let mut hub = Command::new(&a.weft)
        .args([
            "run",
            "weft.yaml",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .current_dir(&dir)
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let deadline = started + Duration::from_secs(600);
    loop {
        let done = if which == "consume" {
            let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap_or_default();
            text.lines().count() as u64 >= a.n
        } else {
            redis::cmd("XLEN").arg(&out).query::<u64>(conn).unwrap_or(0) >= a.n
        };
        if done {
            break;
        }
        if Instant::now() > deadline {
            let _ = hub.kill();
            bail!("{which}: not all through in 600 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = hub.kill();
    let _ = hub.wait();
    clean(conn, &inn, &out, &dedupe);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(secs)
}
