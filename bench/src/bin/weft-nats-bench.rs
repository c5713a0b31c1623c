//! NATS JetStream through weft: messages/s consumed from a stream,
//! published to a stream, and both, each durable (every message committed
//! to weft's store before it is acked; every publish acked by the stream).
//!
//!   cargo run --release -p weft-bench --bin weft-nats-bench -- --weft target/release/weft
//!
//! Needs a nats-server with JetStream (`--url`, default the machine's on
//! 4222). Each scenario makes its own streams and deletes them; weft runs
//! on a fresh store in a temporary folder. Prints a Markdown table.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The weft binary.
    #[arg(long)]
    weft: std::path::PathBuf,
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Messages per scenario.
    #[arg(long, default_value_t = 50_000)]
    n: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let client = async_nats::connect(a.url.as_str()).await.context("NATS")?;
    let js = jetstream::new(client);
    println!("| scenario | messages | seconds | messages/s |");
    println!("|---|---:|---:|---:|");
    for s in ["consume", "publish", "through"] {
        let secs = scenario(&a, &js, s).await?;
        println!(
            "| {} | {} | {:.1} | {:.0} |",
            match s {
                "consume" => "NATS stream -> weft -> JSON Lines file (consume)",
                "publish" => "generate -> weft -> NATS stream (publish)",
                _ => "NATS stream -> weft -> NATS stream",
            },
            a.n,
            secs,
            a.n as f64 / secs
        );
    }
    Ok(())
}

/// One scenario: the input made first (a preloaded stream), then weft
/// started, timed until the output holds every message.
async fn scenario(a: &Args, js: &jetstream::Context, which: &str) -> anyhow::Result<f64> {
    let id = std::process::id();
    let (inn, out) = (format!("BENCH_IN_{id}"), format!("BENCH_OUT_{id}"));
    let _ = js.delete_stream(&inn).await;
    let _ = js.delete_stream(&out).await;
    let dir = std::env::temp_dir().join(format!("weft-nats-bench-{id}-{which}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let url = &a.url;
    let nats_in = format!(
        "    source:\n      nats: {{url: '{url}', stream: {inn}, subject: bench.in, batch: 1000, max_wait: 200ms}}\n"
    );
    let nats_out =
        format!("    sink:\n      nats: {{url: '{url}', subject: 'bench.out.{{key}}'}}\n");
    let (src, dst) = match which {
        "consume" => (
            nats_in,
            "    sink:\n      jsonl: {path: ./out.jsonl}\n".to_owned(),
        ),
        "publish" => (
            format!(
                "    source:\n      generate: {{template: '{{id: ($seq % 1000), seq: $seq}}', count: {}, batch_size: 1000}}\n",
                a.n
            ),
            nats_out,
        ),
        _ => (nats_in, nats_out),
    };
    std::fs::write(
        dir.join("weft.yaml"),
        format!(
            "store:\n  path: ./store.db\nsystems:\n  a:\n{src}  b:\n{dst}flows:\n  f:\n    from: a\n    key: .id\n    to: [{{system: b, delivery: {{batch_size: 1000}}}}]\n"
        ),
    )?;
    if which != "publish" {
        js.create_stream(jetstream::stream::Config {
            name: inn.clone(),
            subjects: vec!["bench.in".into()],
            ..Default::default()
        })
        .await?;
        let mut acks = Vec::new();
        for i in 0..a.n {
            let body = format!("{{\"id\": {}, \"seq\": {i}}}", i % 1000);
            acks.push(js.publish("bench.in", body.into()).await?);
            if acks.len() == 5000 {
                for ack in acks.drain(..) {
                    ack.await?;
                }
            }
        }
        for ack in acks {
            ack.await?;
        }
    }
    if which != "consume" {
        js.create_stream(jetstream::stream::Config {
            name: out.clone(),
            subjects: vec!["bench.out.>".into()],
            ..Default::default()
        })
        .await?;
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
            match js.get_stream(&out).await {
                Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0) >= a.n,
                Err(_) => false,
            }
        };
        if done {
            break;
        }
        if Instant::now() > deadline {
            let _ = hub.kill();
            bail!("{which}: not all through in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = hub.kill();
    let _ = hub.wait();
    let _ = js.delete_stream(&inn).await;
    let _ = js.delete_stream(&out).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(secs)
}
