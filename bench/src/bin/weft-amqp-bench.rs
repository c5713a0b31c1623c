//! RabbitMQ (AMQP 0.9.1) through weft: messages/s consumed from a queue,
//! published to an exchange, and both, each durable (every message
//! committed to weft's store before it is acked; every publish persistent
//! and confirmed by the broker).
//!
//!   cargo run --release -p weft-bench --bin weft-amqp-bench -- --weft target/release/weft
//!
//! Needs a RabbitMQ (`--url`, default the machine's on 5672, guest/guest).
//! Each scenario declares its own queues and exchange and deletes them;
//! weft runs on a fresh store in a temporary folder. Prints a Markdown
//! table.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

#[derive(Parser)]
struct Args {
    /// The weft binary.
    #[arg(long)]
    weft: std::path::PathBuf,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Messages per scenario.
    #[arg(long, default_value_t = 50_000)]
    n: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let conn = Connection::connect(&a.url, ConnectionProperties::default())
        .await
        .context("RabbitMQ")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    println!("| scenario | messages | seconds | messages/s |");
    println!("|---|---:|---:|---:|");
    for s in ["consume", "publish", "through"] {
        let secs = scenario(&a, &ch, s).await?;
        println!(
            "| {} | {} | {:.1} | {:.0} |",
            match s {
                "consume" => "RabbitMQ queue -> weft -> JSON Lines file (consume)",
                "publish" => "generate -> weft -> RabbitMQ exchange (publish)",
                _ => "RabbitMQ queue -> weft -> RabbitMQ exchange",
            },
            a.n,
            secs,
            a.n as f64 / secs
        );
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

async fn ready(ch: &Channel, q: &str) -> anyhow::Result<u64> {
    let q = ch
        .queue_declare(
            q.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(u64::from(q.message_count()))
}

/// One scenario: the input made first (a preloaded queue), then weft
/// started, timed until the output holds every message.
async fn scenario(a: &Args, ch: &Channel, which: &str) -> anyhow::Result<f64> {
    let id = std::process::id();
    let (qin, x, qout) = (
        format!("bench_in_{id}"),
        format!("bench_x_{id}"),
        format!("bench_out_{id}"),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in [&qin, &qout] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
        ch.queue_declare(q.as_str().into(), durable, FieldTable::default())
            .await?;
    }
    ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        qout.as_str().into(),
        x.as_str().into(),
        "bench.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let dir = std::env::temp_dir().join(format!("weft-amqp-bench-{id}-{which}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let url = &a.url;
    let amqp_in = format!(
        "    source:\n      amqp: {{url: '{url}', queue: {qin}, batch: 1000, prefetch: 2000}}\n"
    );
    let amqp_out = format!(
        "    sink:\n      amqp: {{url: '{url}', exchange: {x}, routing_key: 'bench.{{key}}'}}\n"
    );
    let (src, dst) = match which {
        "consume" => (
            amqp_in,
            "    sink:\n      jsonl: {path: ./out.jsonl}\n".to_owned(),
        ),
        "publish" => (
            format!(
                "    source:\n      generate: {{template: '{{id: ($seq % 1000), seq: $seq}}', count: {}, batch_size: 1000}}\n",
                a.n
            ),
            amqp_out,
        ),
        _ => (amqp_in, amqp_out),
    };
    std::fs::write(
        dir.join("weft.yaml"),
        format!(
            "store:\n  path: ./store.db\nsystems:\n  a:\n{src}  b:\n{dst}flows:\n  f:\n    from: a\n    key: .id\n    to: [{{system: b, delivery: {{batch_size: 1000}}}}]\n"
        ),
    )?;
    if which != "publish" {
        let mut confirms = Vec::new();
        for i in 0..a.n {
            let body = format!("{{\"id\": {}, \"seq\": {i}}}", i % 1000);
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    qin.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_message_id(format!("in-{i}").into())
                        .with_delivery_mode(2),
                )
                .await?,
            );
            if confirms.len() == 5000 {
                for c in confirms.drain(..) {
                    c.await?;
                }
            }
        }
        for c in confirms {
            c.await?;
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
            ready(ch, &qout).await? >= a.n
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
    for q in [&qin, &qout] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(secs)
}
