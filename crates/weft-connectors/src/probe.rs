//! `weft check`: connect to every configured system and say, one line per
//! system and role, whether weft could work with it now: the server
//! answers, the credentials are accepted, the table, stream, queue or slot
//! is there (or can be made), the sink's key is unique.
//!
//! A probe reads and never writes business data: no record is sent, no
//! message published, no row changed. The few things it may create are
//! named in the line (a temporary replication slot, dropped at once when
//! the session ends). A REST source with `method: POST` is not requested
//! (a POST may change data on the other side): only its host is connected
//! to. An HTTP sink gets a `HEAD` on its URL up to the first placeholder,
//! with its headers: only an unreachable host, a TLS failure, 401 or 403
//! fail it, since APIs answer `HEAD` on a collection in many ways.
//!
//! Every probe runs with a deadline ([`PROBE_TIMEOUT`]); the probes run side
//! by side. Messages never quote a URL with its password.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use weft_core::config::{Config, ExportTarget, FileTarget, SinkSpec, SourceSpec};

/// The longest one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// How a probe came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// weft can work with it.
    Ok,
    /// weft can work with it, but something is worth a look (a slot that
    /// will be created, a key that is unique only with a warning).
    Warn,
    /// weft cannot work with it as configured.
    Fail,
}

/// One line of `weft check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub system: String,
    /// `source` or `sink`.
    pub role: &'static str,
    pub kind: &'static str,
    pub verdict: Verdict,
    /// What was checked and found, or why it failed.
    pub detail: String,
    pub millis: u64,
}

/// What one connector's probe found.
#[derive(Debug, Clone)]
pub struct Finding {
    pub verdict: Verdict,
    pub detail: String,
}

impl Finding {
    pub fn ok(detail: impl Into<String>) -> Self {
        Finding {
            verdict: Verdict::Ok,
            detail: detail.into(),
        }
    }
    pub fn warn(detail: impl Into<String>) -> Self {
        Finding {
            verdict: Verdict::Warn,
            detail: detail.into(),
        }
    }
    pub fn fail(detail: impl Into<String>) -> Self {
        Finding {
            verdict: Verdict::Fail,
            detail: detail.into(),
        }
    }
}

impl From<Result<String, String>> for Finding {
    fn from(r: Result<String, String>) -> Self {
        match r {
            Ok(d) => Finding::ok(d),
            Err(e) => Finding::fail(e),
        }
    }
}

type Pending<'a> = Pin<Box<dyn Future<Output = Probe> + Send + 'a>>;

/// Probe every source and sink of `config`, side by side; lines in system
/// order, the source before the sink.
pub async fn probe_all(config: &Config) -> Vec<Probe> {
    let mut pending: Vec<Pending<'_>> = Vec::new();
    for (name, sys) in &config.systems {
        if let Some(spec) = &sys.source {
            pending.push(Box::pin(timed(
                name,
                "source",
                spec.kind(),
                probe_source(name, spec),
            )));
        }
        if let Some(spec) = &sys.sink {
            pending.push(Box::pin(timed(
                name,
                "sink",
                spec.kind(),
                probe_sink(name, spec),
            )));
        }
    }
    futures::future::join_all(pending).await
}

async fn timed(
    system: &str,
    role: &'static str,
    kind: &'static str,
    work: impl Future<Output = Finding>,
) -> Probe {
    let started = Instant::now();
    let finding = match tokio::time::timeout(PROBE_TIMEOUT, work).await {
        Ok(f) => f,
        Err(_) => Finding::fail(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
    };
    Probe {
        system: system.to_owned(),
        role,
        kind,
        verdict: finding.verdict,
        detail: finding.detail,
        millis: started.elapsed().as_millis() as u64,
    }
}

/// One source.
pub async fn probe_source(system: &str, spec: &SourceSpec) -> Finding {
    match spec {
        SourceSpec::Webhook { cfg, .. } => Finding::ok(format!(
            "served on server.listen at {} (the listener is checked on its own line)",
            cfg.path
        )),
        SourceSpec::File { target, .. } => match target {
            FileTarget::Dir(dir) => drop_folder(dir),
            FileTarget::Path(p) => readable_file(p),
        },
        SourceSpec::Generate { .. } => Finding::ok("generated in process: nothing to connect"),
        SourceSpec::Rest { .. } => match crate::rest::RestSource::new(system, spec) {
            Ok(s) => s.probe().await,
            Err(e) => Finding::fail(e.message),
        },
        SourceSpec::SqlPoll { .. } => match crate::sql_poll::SqlPollSource::new(system, spec) {
            Ok(mut s) => s.probe().await.into(),
            Err(e) => Finding::fail(e.message),
        },
        SourceSpec::PostgresCdc { settings } => {
            #[cfg(feature = "cdc-postgres")]
            {
                crate::cdc::postgres::probe(system, settings).await
            }
            #[cfg(not(feature = "cdc-postgres"))]
            {
                let _ = settings;
                Finding::fail(crate::without_feature(
                    "cdc-postgres",
                    "PostgreSQL change data capture",
                ))
            }
        }
        SourceSpec::MysqlCdc { settings } => {
            #[cfg(feature = "cdc-mysql")]
            {
                crate::cdc::mysql::probe(system, settings).await
            }
            #[cfg(not(feature = "cdc-mysql"))]
            {
                let _ = settings;
                Finding::fail(crate::without_feature(
                    "cdc-mysql",
                    "MariaDB/MySQL change data capture",
                ))
            }
        }
        SourceSpec::Nats { settings }
        | SourceSpec::Amqp { settings }
        | SourceSpec::Redis { settings }
        | SourceSpec::Mqtt { settings }
        | SourceSpec::Kafka { settings } => {
            crate::broker::probe_source(system, spec.kind(), settings).await
        }
    }
}

/// One sink.
pub async fn probe_sink(system: &str, spec: &SinkSpec) -> Finding {
    match spec {
        SinkSpec::Http {
            cfg,
            connect_timeout,
            timeout,
            ..
        } => crate::http::probe(cfg, *connect_timeout, *timeout).await,
        SinkSpec::Sqlite { cfg, path } => crate::sqlite::probe(cfg, path),
        SinkSpec::Postgres { cfg } => {
            #[cfg(feature = "postgres")]
            {
                crate::postgres::probe(cfg).await
            }
            #[cfg(not(feature = "postgres"))]
            {
                let _ = cfg;
                Finding::fail(crate::without_feature("postgres", "PostgreSQL"))
            }
        }
        SinkSpec::Mysql { cfg } => {
            #[cfg(feature = "mysql")]
            {
                crate::mysql::probe(cfg).await
            }
            #[cfg(not(feature = "mysql"))]
            {
                let _ = cfg;
                Finding::fail(crate::without_feature("mysql", "MariaDB/MySQL"))
            }
        }
        SinkSpec::Jsonl { target, .. } | SinkSpec::Csv { target, .. } => export_target(target),
        SinkSpec::Mqtt { settings } => crate::broker::probe_mqtt_sink(system, settings).await,
        SinkSpec::Nats { .. }
        | SinkSpec::Amqp { .. }
        | SinkSpec::Redis { .. }
        | SinkSpec::Kafka { .. } => match crate::sink::build_sink(system, spec).await {
            Ok(built) => match built.down {
                Some(why) => Finding::fail(why),
                None => Finding::ok("connected; the destination accepts the configuration"),
            },
            Err(e) => Finding::fail(e.message),
        },
    }
}

/// A drop folder: it exists, can be listed, and weft can create its
/// `processing/`, `processed/` and `quarantine/` folders and move files.
fn drop_folder(dir: &Path) -> Finding {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return Finding::fail(format!("cannot list {}: {e}", dir.display())),
    };
    let waiting = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .count();
    match writable(dir) {
        Ok(()) => Finding::ok(format!(
            "{} can be listed and written ({waiting} files in it)",
            dir.display()
        )),
        Err(e) => Finding::fail(format!(
            "{} cannot be written (weft moves read files to processed/): {e}",
            dir.display()
        )),
    }
}

fn readable_file(p: &Path) -> Finding {
    match std::fs::File::open(p).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => {
            Finding::ok(format!("{} is readable ({} bytes)", p.display(), m.len()))
        }
        Ok(_) => Finding::fail(format!("{} is not a regular file", p.display())),
        Err(e) => Finding::fail(format!("cannot open {}: {e}", p.display())),
    }
}

/// An export sink's file or folder: the folder exists (or can be created by
/// weft, i.e. its nearest existing ancestor is writable) and is writable.
fn export_target(t: &ExportTarget) -> Finding {
    let (dir, what) = match t {
        ExportTarget::File(f) => (
            f.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            f.display().to_string(),
        ),
        ExportTarget::Dir { dir, .. } => (dir.clone(), dir.display().to_string()),
    };
    let existing = nearest_existing(&dir);
    match writable(existing) {
        Ok(()) if existing == dir => Finding::ok(format!("{what}: the folder is writable")),
        Ok(()) => Finding::ok(format!(
            "{what}: the folder will be created in {} (writable)",
            existing.display()
        )),
        Err(e) => Finding::fail(format!(
            "{what}: {} is not writable: {e}",
            existing.display()
        )),
    }
}

/// `dir`, or its nearest ancestor that exists (`.` at the top of a
/// relative path): where weft would create what is missing.
fn nearest_existing(dir: &Path) -> &Path {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => return Path::new("."),
        }
    }
    existing
}

/// Create and remove a hidden file in `dir`.
pub(crate) fn writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".weft-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// Connect to `host:port` and close again: reachability without a request.
pub(crate) async fn tcp_reachable(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot connect to {host}:{port}: {e}")),
        Err(_) => Err(format!(
            "cannot connect to {host}:{port}: no answer within {timeout:?}"
        )),
    }
}

/// The store: the SQLite file (or the folder it will be made in) is
/// writable, or the PostgreSQL store answers and its schema can be used.
pub async fn probe_store(store: &weft_core::config::StoreConfig) -> Probe {
    match &store.postgres {
        Some(pg) => timed("store", "store", "postgres", store_postgres(pg)).await,
        None => {
            timed("store", "store", "sqlite", async {
                store_sqlite(&store.path)
            })
            .await
        }
    }
}

fn store_sqlite(path: &Path) -> Finding {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if path.exists() {
        return match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => Finding::ok(format!(
                "{} exists and is writable ({} bytes)",
                path.display(),
                f.metadata().map(|m| m.len()).unwrap_or(0)
            )),
            Err(e) => Finding::fail(format!("cannot open {} for writing: {e}", path.display())),
        };
    }
    let existing = nearest_existing(dir);
    match writable(existing) {
        Ok(()) => Finding::ok(format!("{} will be created (writable)", path.display())),
        Err(e) => Finding::fail(format!(
            "{} cannot be created: {} is not writable: {e}",
            path.display(),
            existing.display()
        )),
    }
}

#[cfg(feature = "postgres")]
async fn store_postgres(pg: &weft_core::config::PgStore) -> Finding {
    let tls = match crate::pg_tls::connector(pg.url.expose()) {
        Ok(t) => t,
        Err(e) => return Finding::fail(e),
    };
    let connecting = tokio_postgres::connect(tls.url.as_str(), tls.connector.clone());
    let (client, connection) = match tokio::time::timeout(Duration::from_secs(10), connecting).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Finding::fail(format!("cannot connect to the PostgreSQL store: {e}")),
        Err(_) => return Finding::fail("cannot connect to the PostgreSQL store: timed out"),
    };
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT current_user::text, \
                    EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1), \
                    has_database_privilege(current_database(), 'CREATE')",
            &[&pg.schema],
        )
        .await;
    match row {
        Ok(r) => {
            let (user, exists, create): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
            if exists {
                Finding::ok(format!(
                    "connected as `{user}`; schema `{}` exists",
                    pg.schema
                ))
            } else if create {
                Finding::ok(format!(
                    "connected as `{user}`; schema `{}` will be created",
                    pg.schema
                ))
            } else {
                Finding::fail(format!(
                    "schema `{}` does not exist and `{user}` may not create it",
                    pg.schema
                ))
            }
        }
        Err(e) => Finding::fail(format!("the PostgreSQL store answered: {e}")),
    }
}

#[cfg(not(feature = "postgres"))]
async fn store_postgres(_: &weft_core::config::PgStore) -> Finding {
    Finding::fail(crate::without_feature("postgres", "PostgreSQL"))
}

/// The two listeners: each address can be bound now. One that is taken
/// is a warning (a running weft holds it).
pub async fn probe_listeners(server: &weft_core::config::ServerConfig) -> Probe {
    timed("server", "server", "http", listeners(server)).await
}

async fn listeners(server: &weft_core::config::ServerConfig) -> Finding {
    let mut taken = Vec::new();
    let mut bad = Vec::new();
    for (what, addr) in [
        ("server.listen", server.listen),
        ("server.admin_listen", server.admin_listen),
    ] {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                taken.push(format!("{what} {addr}"))
            }
            Err(e) => bad.push(format!("{what} {addr}: {e}")),
        }
    }
    if !bad.is_empty() {
        Finding::fail(format!("cannot listen on {}", bad.join("; ")))
    } else if !taken.is_empty() {
        Finding::warn(format!(
            "{} in use (by a running weft?)",
            taken.join(" and ")
        ))
    } else {
        Finding::ok(format!(
            "{} and {} are free",
            server.listen, server.admin_listen
        ))
    }
}
