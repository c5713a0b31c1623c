//! `weft-bench webhook`: signed webhook POSTs at a fixed concurrency; prints
//! requests/s and the time to a durable 2xx (p50, p99, max).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Parser)]
struct Args {
    /// Webhook URL.
    #[arg(long)]
    url: String,
    /// HMAC secret.
    #[arg(long, default_value = "bench-secret")]
    secret: String,
    /// Total requests.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Prefix of event ids (change it between runs against one store).
    #[arg(long, default_value = "bench")]
    id_prefix: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (client, next) = (client.clone(), next.clone());
        let (url, secret, prefix, total) = (
            args.url.clone(),
            args.secret.clone(),
            args.id_prefix.clone(),
            args.requests,
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let body = serde_json::json!({
                    "id": i % 5000, "first_name": "Ada", "last_name": format!("L{i}"),
                    "email": format!("ada{i}@example.com"), "seq": i
                })
                .to_string();
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
                mac.update(body.as_bytes());
                let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-event-id", format!("{prefix}-{i}"))
                    .header("x-signature-256", sig)
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(resp) if resp.status().is_success() => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    if lat.is_empty() {
        bail!("no request succeeded ({errors} errors)");
    }
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0;
    println!(
        "requests={} ok={} errors={} secs={:.2} req_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        args.requests,
        lat.len(),
        errors,
        secs,
        lat.len() as f64 / secs,
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}
