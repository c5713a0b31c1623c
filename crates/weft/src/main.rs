//! The `weft` binary: parses the command line and wires the library crates
//! together. No business logic lives here.

mod cdc;
mod contract;
mod crosswalk;
mod dlq;
mod drift;
mod identity;
mod maptest;
mod probe;
mod progress;
mod record;
mod status;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use weft_core::config;

/// mimalloc: the pipeline allocates many small JSON values per record, and
/// glibc's allocator spent about a third of the CPU of the standard
/// workload on them (`perf`, see bench/README.md). Built without transparent
/// huge pages (`no_thp`): with them the standard workload peaked at 175-195
/// MB instead of 110-150, freed memory held in 2 MB pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "weft keeps business systems in sync: durable, observable, replayable"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the hub: sources, flows, delivery, HTTP server.
    Run {
        /// The config file.
        config: PathBuf,
        /// Exit once every finite source (a file, a counted generator) is done
        /// and nothing is left to deliver: batch loads and backfills.
        #[arg(long)]
        until_idle: bool,
        /// Webhook listen address, overriding `server.listen` (`127.0.0.1:0` picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Admin API and metrics listen address, overriding `server.admin_listen`.
        #[arg(long, env = "WEFT_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// With `--until-idle`: a progress bar on a terminal, plain lines
        /// every 5 s elsewhere (`auto`), or always one of them, or none.
        #[arg(long, value_enum, default_value = "auto")]
        progress: progress::Mode,
    },
    /// Check a config file and report every problem with its line.
    Validate {
        /// The config file.
        config: PathBuf,
    },
    /// Connect to every system of a config and say, one line each, whether
    /// weft can work with it: reachable, credentials, tables, keys, slots,
    /// streams. Reads only. Exit code 1 when a check failed.
    Check {
        /// The config file.
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Counts per flow and destination: received, delivered, dead-lettered,
    /// rejected, filtered, pending, and whether they add up.
    Status {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, replay or discard dead letters.
    Dlq {
        #[command(subcommand)]
        cmd: dlq::DlqCmd,
    },
    /// Check the compatibility of two contract versions.
    Contract {
        #[command(subcommand)]
        cmd: contract::ContractCmd,
    },
    /// Test a flow's mappings and contracts on sample payloads.
    Map {
        #[command(subcommand)]
        cmd: maptest::MapCmd,
    },
    /// List the ids destinations gave the records weft wrote.
    Crosswalk {
        #[command(subcommand)]
        cmd: crosswalk::CrosswalkCmd,
    },
    /// Canonical records and their links to each system's ids.
    Xref {
        #[command(subcommand)]
        cmd: identity::XrefCmd,
    },
    /// Every change of one canonical record (ID: canonical id or SYSTEM:ID).
    History {
        #[command(flatten)]
        cfg: ConfigArg,
        entity: String,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// What the store holds of the records an event id, correlation id or
    /// entity key names: every write attempt (when, how long, the
    /// destination's status, the outcome), pending rows, dead letters and
    /// the ids destinations gave.
    Record {
        #[command(flatten)]
        cfg: ConfigArg,
        id: String,
        /// At most this many of each kind (the newest attempts).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// What one change (a correlation id) did to canonical records.
    Trace {
        #[command(flatten)]
        cfg: ConfigArg,
        correlation_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Manual conflicts between systems (`identity.<entity>.conflict: manual`).
    Conflicts {
        #[command(subcommand)]
        cmd: identity::ConflictsCmd,
    },
    /// Records fuzzy matching holds for a person to decide
    /// (`identity.<entity>.fuzzy`).
    Matches {
        #[command(subcommand)]
        cmd: identity::MatchesCmd,
    },
    /// Change data capture sources: take a new snapshot.
    Cdc {
        #[command(subcommand)]
        cmd: cdc::CdcCmd,
    },
    /// List the schema drift seen on the sources.
    Drift {
        #[command(subcommand)]
        cmd: drift::DriftCmd,
    },
    /// The config format itself.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the JSON Schema of the config file, generated from the structs
    /// `weft validate` reads it with (their doc comments are the
    /// descriptions): for editors (`# yaml-language-server: $schema=...`)
    /// and config generators.
    Schema,
}

#[derive(Args, Clone)]
pub struct ConfigArg {
    /// The config file.
    #[arg(short, long, env = "WEFT_CONFIG", default_value = "weft.yaml")]
    pub config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        // a CLI piped into `head` should end quietly, not panic on EPIPE;
        // `weft run` keeps Rust's default (ignored) so a closed socket is an error, not a kill
        // SAFETY: called before any other thread exists; restores the default disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logs(&cli.log_format);
    let result = match cli.cmd {
        Cmd::Run {
            config,
            until_idle,
            listen,
            admin_listen,
            progress,
        } => run(&config, until_idle, listen, admin_listen, progress),
        Cmd::Validate { config } => validate(&config),
        Cmd::Check { config, json } => probe::check(&config, json),
        Cmd::Status { cfg, json } => status::status(&cfg.config, json),
        Cmd::Dlq { cmd } => dlq::dlq(cmd),
        Cmd::Contract { cmd } => contract::contract(cmd),
        Cmd::Map { cmd } => maptest::map(cmd),
        Cmd::Crosswalk { cmd } => crosswalk::crosswalk(cmd),
        Cmd::Drift { cmd } => drift::drift(cmd),
        Cmd::Cdc { cmd } => cdc::cdc(cmd),
        Cmd::Xref { cmd } => identity::xref(cmd),
        Cmd::History {
            cfg,
            entity,
            id,
            json,
        } => identity::history(cfg, entity, id, json),
        Cmd::Trace {
            cfg,
            correlation_id,
            json,
        } => identity::trace(cfg, correlation_id, json),
        Cmd::Record {
            cfg,
            id,
            limit,
            json,
        } => record::record(cfg, id, limit, json),
        Cmd::Conflicts { cmd } => identity::conflicts(cmd),
        Cmd::Matches { cmd } => identity::matches(cmd),
        Cmd::Config {
            cmd: ConfigCmd::Schema,
        } => {
            let schema = schemars::schema_for!(weft_core::config::raw::RawConfig);
            match serde_json::to_string_pretty(&schema) {
                Ok(text) => {
                    println!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(anyhow::anyhow!("cannot print the schema: {e}")),
            }
        }
        Cmd::Version => {
            println!("weft {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logs(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WEFT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,pg_walstream=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// Load and validate, printing every problem; `None` means invalid.
pub fn load_config(path: &Path) -> Result<config::Config, ExitCode> {
    config::load_checked(path, &check).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// What `weft run` would refuse when it builds things: the connectors'
/// parsers, and a PostgreSQL store in a build without it.
fn check(config: &config::Config) -> Vec<config::Issue> {
    let mut issues = weft_connectors::check::check(config);
    if cfg!(not(feature = "postgres")) && config.store.postgres.is_some() {
        issues.push(config::Issue {
            path: "store.postgres".into(),
            line: None,
            column: None,
            message:
                "this weft was built without PostgreSQL (cargo feature `postgres`, on by default)"
                    .into(),
        });
    }
    if cfg!(not(feature = "otel")) && config.otlp.is_some() {
        issues.push(config::Issue {
            path: "telemetry.otlp".into(),
            line: None,
            column: None,
            message:
                "this weft was built without OpenTelemetry (cargo feature `otel`, on by default)"
                    .into(),
        });
    }
    issues
}

/// The config for a command that only looks at the store or changes it
/// (`status`, `dlq`, `crosswalk`, `drift`): these need the store's path and
/// the flows, not the run's secrets, so an unset `${VAR}` is filled with a
/// placeholder (and the connectors are not checked) when the config does not
/// load as it is.
pub fn load_config_for_inspection(path: &Path) -> Result<config::Config, ExitCode> {
    const UNSET: &str = "weft-inspection-placeholder-for-an-unset-variable";
    let strict = config::load(path);
    let Err(e) = strict else {
        return strict.map_err(|_| ExitCode::from(2));
    };
    let lenient = std::fs::read_to_string(path).ok().and_then(|text| {
        config::load_str(path, &text, &|name| {
            Some(std::env::var(name).unwrap_or_else(|_| UNSET.to_owned()))
        })
        .ok()
    });
    lenient.ok_or_else(|| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn validate(path: &Path) -> Result<ExitCode> {
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    println!(
        "{} is valid: {} systems, {} flows{}{}",
        path.display(),
        cfg.systems.len(),
        cfg.flows.len(),
        match cfg.topics.len() {
            0 => String::new(),
            1 => ", 1 topic".to_owned(),
            n => format!(", {n} topics"),
        },
        match cfg.warnings.len() {
            0 => String::new(),
            1 => ", 1 warning".to_owned(),
            n => format!(", {n} warnings"),
        }
    );
    for w in &cfg.warnings {
        eprintln!("warning: {}", w.render(path));
    }
    for f in &cfg.flows {
        let to: Vec<&str> = f.destinations.iter().map(|d| d.system.as_str()).collect();
        println!("  flow {}: {} -> {}", f.name, f.from, to.join(", "));
    }
    for t in cfg.topics.values() {
        let readers: Vec<&str> = cfg
            .flows
            .iter()
            .filter(|f| f.from == t.name)
            .map(|f| f.name.as_str())
            .collect();
        println!(
            "  topic {}: kept {}, read by {}",
            t.name,
            humantime_secs(t.retention),
            if readers.is_empty() {
                "no flow".to_owned()
            } else {
                readers.join(", ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run(
    path: &Path,
    until_idle: bool,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    progress: progress::Mode,
) -> Result<ExitCode> {
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    for w in &cfg.warnings {
        tracing::warn!("config: {}", w.render(path));
    }
    // the exporter's thread first, outside the async runtime; flushed last
    let traces = weft_runtime::telemetry::install(cfg.otlp.as_ref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async move {
        let addr = listen.unwrap_or(cfg.server.listen);
        let admin_addr = admin_listen.unwrap_or(cfg.server.admin_listen);
        // both addresses first: a taken port fails before anything starts
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (server.listen)"))?;
        let admin_listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("cannot listen on {admin_addr} (server.admin_listen)"))?;
        let lanes = weft_runtime::lane_list(&cfg);
        let mut runtime = weft_runtime::Runtime::start(cfg).await?;
        let routers = runtime.routers();
        let local = listener.local_addr()?;
        let admin_local = admin_listener.local_addr()?;
        // the admin line first: tests and scripts read `address=` as the webhook listener
        tracing::info!(admin_address = %admin_local, "serving the admin API, /metrics, /healthz, /readyz");
        tracing::info!(address = %local, "serving webhooks, /healthz, /readyz");
        let stop_server = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(weft_runtime::server::serve(
            listener,
            routers.public,
            stop_server.clone(),
        ));
        let admin_server = tokio::spawn(weft_runtime::server::serve(
            admin_listener,
            routers.admin,
            stop_server.clone(),
        ));
        let shown = if until_idle {
            progress::start(progress, runtime.journal.clone(), lanes)
        } else {
            None
        };
        let outcome = tokio::select! {
            r = runtime.wait_idle(), if until_idle => r.map_err(anyhow::Error::from),
            s = shutdown_signal() => {
                tracing::info!(signal = s, "stopping: draining in-flight work");
                Ok(())
            }
        };
        if let Some(p) = shown {
            p.finish().await;
        }
        // webhooks get 503 while the sources stop; then the server closes
        runtime.shutdown().await;
        stop_server.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(12), server).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(12), admin_server).await;
        outcome.map(|_| ExitCode::SUCCESS)
    });
    drop(rt);
    if let Some(t) = traces {
        t.shutdown();
    }
    result
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// `7d`, `12h`, `30m`, `45s`: the largest unit that divides the duration.
fn humantime_secs(d: std::time::Duration) -> String {
    let s = d.as_secs();
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s >= n && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}
