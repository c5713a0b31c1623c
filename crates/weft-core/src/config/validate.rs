//! Pure validation: raw config in, ready-to-run [`Config`] or every problem out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::raw::*;
use super::{Issue, Secret, parse_duration};
use crate::mapping::Program;

/// A validated config: every reference resolved, every program compiled.
#[derive(Debug)]
pub struct Config {
    /// The config file.
    pub file: PathBuf,
    pub store: StoreConfig,
    pub server: ServerConfig,
    pub systems: BTreeMap<String, System>,
    /// Flows in name order.
    pub flows: Vec<Arc<Flow>>,
    /// Canonical entities, contracts and value maps.
    pub data: Arc<super::entities::DataModel>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub synchronous: Synchronous,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_token: Option<Secret>,
}

#[derive(Debug)]
pub struct System {
    pub name: String,
    pub description: Option<String>,
    pub source: Option<SourceSpec>,
    pub sink: Option<SinkSpec>,
}

/// A source, with its programs compiled and paths resolved.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    Webhook {
        cfg: WebhookSourceConfig,
        id_field: Option<Arc<Program>>,
        event_type: String,
        max_body_bytes: usize,
        signature_header: String,
        id_header: String,
    },
    File {
        cfg: FileSourceConfig,
        target: FileTarget,
        id_field: Option<Arc<Program>>,
        event_type: String,
        poll_interval: Duration,
        batch_size: usize,
    },
    Generate {
        cfg: GenerateSourceConfig,
        template: Arc<Program>,
        event_type: String,
        batch_size: usize,
    },
}

impl SourceSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSpec::Webhook { .. } => "webhook",
            SourceSpec::File { .. } => "file",
            SourceSpec::Generate { .. } => "generate",
        }
    }
}

/// What a file source reads.
#[derive(Debug, Clone)]
pub enum FileTarget {
    /// A drop folder.
    Dir(PathBuf),
    /// One file, read in place.
    Path(PathBuf),
}

/// A sink, with paths resolved and durations parsed.
#[derive(Debug, Clone)]
pub enum SinkSpec {
    Http {
        cfg: HttpSinkConfig,
        method: String,
        timeout: Duration,
        connect_timeout: Duration,
    },
    Sqlite {
        cfg: SqliteSinkConfig,
        path: PathBuf,
    },
    Postgres {
        cfg: PostgresSinkConfig,
    },
    Jsonl {
        cfg: JsonlSinkConfig,
        path: PathBuf,
    },
}

impl SinkSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkSpec::Http { .. } => "http",
            SinkSpec::Sqlite { .. } => "sqlite",
            SinkSpec::Postgres { .. } => "postgres",
            SinkSpec::Jsonl { .. } => "jsonl",
        }
    }
}

/// A flow ready to run.
#[derive(Debug)]
pub struct Flow {
    pub name: String,
    /// Name of the source system.
    pub from: String,
    pub filter: Option<Arc<Program>>,
    pub key: Option<Arc<Program>>,
    pub mapping: Option<Arc<Program>>,
    pub destinations: Vec<Destination>,
    /// Entity contract, violation and drift policy.
    pub data: super::entities::FlowData,
}

/// One destination of a flow.
#[derive(Debug)]
pub struct Destination {
    /// Name of the sink system.
    pub system: String,
    pub mapping: Option<Arc<Program>>,
    pub delivery: DeliveryPolicy,
    /// Contract the payload must satisfy before it is written.
    pub contract: Option<Arc<super::entities::Contract>>,
}

/// Retry and concurrency policy of one destination of one flow.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    pub concurrency: usize,
    pub batch_size: usize,
}

struct Ctx {
    issues: Vec<Issue>,
    /// jq definitions (the value maps) compiled with every program.
    prelude: String,
}

impl Ctx {
    fn at(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        });
    }
    fn at_span<T>(
        &mut self,
        path: impl Into<String>,
        span: &Spanned<T>,
        message: impl Into<String>,
    ) {
        let loc = span.referenced;
        self.issues.push(Issue {
            path: path.into(),
            line: Some(loc.line()).filter(|l| *l > 0),
            column: Some(loc.column()).filter(|c| *c > 0),
            message: message.into(),
        });
    }

    /// Compile a jq program; on error point at the line of the YAML value
    /// plus the line inside the program.
    fn program(
        &mut self,
        path: &str,
        code: &Spanned<String>,
        vars: &[&str],
    ) -> Option<Arc<Program>> {
        match Program::compile_with(&code.value, vars, &self.prelude) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                let loc = code.referenced;
                // the value's location is where its text starts, also for block scalars
                let line = loc.line() + e.line as u64 - 1;
                self.issues.push(Issue {
                    path: path.to_owned(),
                    line: Some(line).filter(|l| *l > 0),
                    column: None,
                    message: format!(
                        "invalid jq program: {} (line {}, column {} of the program)",
                        e.message, e.line, e.column
                    ),
                });
                None
            }
        }
    }

    fn duration(&mut self, path: &str, v: &Option<Spanned<String>>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(&s.value) {
                Ok(d) => d,
                Err(m) => {
                    self.at_span(path, s, m);
                    default
                }
            },
        }
    }
}

pub(super) fn validate(raw: RawConfig, file: &Path, base: &Path) -> Result<Config, Vec<Issue>> {
    let mut cx = Ctx {
        issues: Vec::new(),
        prelude: String::new(),
    };
    let data = super::entities::model(&mut cx.issues, raw.entities, raw.value_maps, base);
    cx.prelude = data.prelude.clone();

    let store = StoreConfig {
        path: base.join(raw.store.path.as_deref().unwrap_or("weft-data/weft.db")),
        synchronous: raw.store.synchronous.unwrap_or(Synchronous::Full),
    };
    let listen_s = raw.server.listen.as_deref().unwrap_or("127.0.0.1:8080");
    let listen = match listen_s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            cx.at(
                "server.listen",
                format!(
                    "`{listen_s}` is not an address; expected `host:port` such as `127.0.0.1:8080`"
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 8080))
        }
    };
    let server = ServerConfig {
        listen,
        admin_token: raw.server.admin_token.filter(|t| !t.expose().is_empty()),
    };

    let mut systems = BTreeMap::new();
    let mut webhook_paths: BTreeMap<String, String> = BTreeMap::new();
    for (name, sys) in raw.systems {
        let p = format!("systems.{name}");
        if !valid_name(&name) {
            cx.at(&p, "system names use letters, digits, `_` and `-`");
        }
        if sys.source.is_none() && sys.sink.is_none() {
            cx.at(&p, "a system needs a `source`, a `sink` or both");
        }
        let source = sys.source.and_then(|s| {
            source_spec(
                &mut cx,
                &format!("{p}.source"),
                &name,
                s,
                base,
                &mut webhook_paths,
            )
        });
        let sink = sys
            .sink
            .and_then(|s| sink_spec(&mut cx, &format!("{p}.sink"), s, base));
        systems.insert(
            name.clone(),
            System {
                name,
                description: sys.description,
                source,
                sink,
            },
        );
    }

    let defaults = raw.defaults.delivery;
    let mut flows = Vec::new();
    for (name, f) in raw.flows {
        let p = format!("flows.{name}");
        if !valid_name(&name) {
            cx.at(&p, "flow names use letters, digits, `_` and `-`");
        }
        match systems.get(&f.from.value) {
            None => cx.at_span(
                format!("{p}.from"),
                &f.from,
                format!(
                    "unknown system `{}`; known: {}",
                    f.from.value,
                    known(&systems)
                ),
            ),
            Some(s) if s.source.is_none() => cx.at_span(
                format!("{p}.from"),
                &f.from,
                format!("system `{}` has no `source` to read from", f.from.value),
            ),
            _ => {}
        }
        let source_kind = systems
            .get(&f.from.value)
            .and_then(|s| s.source.as_ref().map(SourceSpec::kind));
        let fdata = super::entities::flow(&mut cx.issues, &p, &f, source_kind, &data);
        let filter = f
            .filter
            .as_ref()
            .and_then(|c| cx.program(&format!("{p}.filter"), c, &[]));
        let key = f
            .key
            .as_ref()
            .and_then(|c| cx.program(&format!("{p}.key"), c, &[]));
        let mapping = f
            .mapping
            .as_ref()
            .and_then(|c| cx.program(&format!("{p}.mapping"), c, &[]));
        if f.to.is_empty() {
            cx.at(format!("{p}.to"), "a flow needs at least one destination");
        }
        let mut destinations = Vec::new();
        for (i, d) in f.to.into_iter().enumerate() {
            let dp = format!("{p}.to[{i}]");
            let span = Spanned::new((), d.referenced, d.defined);
            let (system, dmap, ddel, dcontract) = match d.value {
                RawDestination::Name(n) => (n, None, None, None),
                RawDestination::Full(full) => {
                    (full.system, full.mapping, full.delivery, full.contract)
                }
            };
            let contract = super::entities::destination_contract(
                &mut cx.issues,
                &dp,
                dcontract.as_ref(),
                base,
            );
            let system = Spanned::new(system, span.referenced, span.defined);
            let kind = match systems.get(&system.value) {
                None => {
                    cx.at_span(
                        &dp,
                        &system,
                        format!(
                            "unknown system `{}`; known: {}",
                            system.value,
                            known(&systems)
                        ),
                    );
                    None
                }
                Some(s) => match &s.sink {
                    None => {
                        cx.at_span(
                            &dp,
                            &system,
                            format!("system `{}` has no `sink` to write to", system.value),
                        );
                        None
                    }
                    Some(k) => Some(k.kind()),
                },
            };
            if destinations
                .iter()
                .any(|x: &Destination| x.system == system.value)
            {
                cx.at_span(
                    &dp,
                    &system,
                    format!("system `{}` is listed twice", system.value),
                );
            }
            let mapping = dmap
                .as_ref()
                .and_then(|c| cx.program(&format!("{dp}.mapping"), c, &[]));
            let delivery = delivery_policy(
                &mut cx,
                &format!("{dp}.delivery"),
                [ddel.as_ref(), f.delivery.as_ref(), Some(&defaults)],
                kind,
            );
            destinations.push(Destination {
                system: system.value,
                mapping,
                delivery,
                contract,
            });
        }
        flows.push(Arc::new(Flow {
            name,
            from: f.from.value,
            filter,
            key,
            mapping,
            destinations,
            data: fdata,
        }));
    }

    if cx.issues.is_empty() {
        Ok(Config {
            file: file.to_owned(),
            store,
            server,
            systems,
            flows,
            data: Arc::new(data),
        })
    } else {
        Err(cx.issues)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn known(systems: &BTreeMap<String, System>) -> String {
    if systems.is_empty() {
        "none".to_owned()
    } else {
        systems
            .keys()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn source_spec(
    cx: &mut Ctx,
    p: &str,
    system: &str,
    s: RawSource,
    base: &Path,
    webhook_paths: &mut BTreeMap<String, String>,
) -> Option<SourceSpec> {
    match s {
        RawSource::Webhook(cfg) => {
            let wp = format!("{p}.webhook");
            if !cfg.path.starts_with('/') {
                cx.at(
                    format!("{wp}.path"),
                    format!("`{}` must start with `/`", cfg.path),
                );
            }
            if ["/healthz", "/readyz", "/metrics"].contains(&cfg.path.as_str())
                || cfg.path.starts_with("/api/")
            {
                cx.at(
                    format!("{wp}.path"),
                    format!("`{}` is reserved by weft's server", cfg.path),
                );
            }
            if let Some(other) = webhook_paths.insert(cfg.path.clone(), system.to_owned()) {
                cx.at(
                    format!("{wp}.path"),
                    format!("`{}` is already used by system `{other}`", cfg.path),
                );
            }
            if cfg.max_body_bytes == Some(0) {
                cx.at(format!("{wp}.max_body_bytes"), "must be greater than 0");
            }
            let id_field = cfg
                .id_field
                .as_ref()
                .and_then(|c| cx.program(&format!("{wp}.id_field"), c, &[]));
            Some(SourceSpec::Webhook {
                id_field,
                event_type: cfg
                    .event_type
                    .clone()
                    .unwrap_or_else(|| format!("{system}.webhook")),
                max_body_bytes: cfg.max_body_bytes.unwrap_or(1 << 20),
                signature_header: cfg
                    .signature_header
                    .clone()
                    .unwrap_or_else(|| "x-signature-256".into())
                    .to_ascii_lowercase(),
                id_header: cfg
                    .id_header
                    .clone()
                    .unwrap_or_else(|| "x-event-id".into())
                    .to_ascii_lowercase(),
                cfg,
            })
        }
        RawSource::File(cfg) => {
            let fp = format!("{p}.file");
            let target = match (&cfg.dir, &cfg.path) {
                (Some(d), None) => Some(FileTarget::Dir(base.join(d))),
                (None, Some(f)) => Some(FileTarget::Path(base.join(f))),
                _ => {
                    cx.at(
                        &fp,
                        "exactly one of `dir` (a drop folder) and `path` (one file) is required",
                    );
                    None
                }
            };
            if cfg.batch_size == Some(0) {
                cx.at(format!("{fp}.batch_size"), "must be greater than 0");
            }
            let poll_interval = cx.duration(
                &format!("{fp}.poll_interval"),
                &cfg.poll_interval,
                Duration::from_secs(1),
            );
            let id_field = cfg
                .id_field
                .as_ref()
                .and_then(|c| cx.program(&format!("{fp}.id_field"), c, &[]));
            Some(SourceSpec::File {
                target: target?,
                id_field,
                event_type: cfg
                    .event_type
                    .clone()
                    .unwrap_or_else(|| format!("{system}.file")),
                poll_interval,
                batch_size: cfg.batch_size.unwrap_or(1000),
                cfg,
            })
        }
        RawSource::Generate(cfg) => {
            let gp = format!("{p}.generate");
            if matches!(cfg.rate, Some(r) if !(r > 0.0 && r.is_finite())) {
                cx.at(
                    format!("{gp}.rate"),
                    "must be a positive number of records per second",
                );
            }
            if cfg.batch_size == Some(0) {
                cx.at(format!("{gp}.batch_size"), "must be greater than 0");
            }
            let template = cx.program(&format!("{gp}.template"), &cfg.template, &["seq"])?;
            Some(SourceSpec::Generate {
                template,
                event_type: cfg
                    .event_type
                    .clone()
                    .unwrap_or_else(|| format!("{system}.generated")),
                batch_size: cfg.batch_size.unwrap_or(500),
                cfg,
            })
        }
    }
}

fn sink_spec(cx: &mut Ctx, p: &str, s: RawSink, base: &Path) -> Option<SinkSpec> {
    match s {
        RawSink::Http(cfg) => {
            let hp = format!("{p}.http");
            if !(cfg.url.starts_with("http://") || cfg.url.starts_with("https://")) {
                cx.at(
                    format!("{hp}.url"),
                    format!("`{}` must start with http:// or https://", cfg.url),
                );
            }
            let method = cfg
                .method
                .clone()
                .unwrap_or_else(|| "POST".into())
                .to_ascii_uppercase();
            if !["POST", "PUT", "PATCH"].contains(&method.as_str()) {
                cx.at(
                    format!("{hp}.method"),
                    format!("`{method}`: expected POST, PUT or PATCH"),
                );
            }
            let timeout = cx.duration(
                &format!("{hp}.timeout"),
                &cfg.timeout,
                Duration::from_secs(10),
            );
            let connect_timeout = cx.duration(
                &format!("{hp}.connect_timeout"),
                &cfg.connect_timeout,
                Duration::from_secs(5),
            );
            Some(SinkSpec::Http {
                cfg,
                method,
                timeout,
                connect_timeout,
            })
        }
        RawSink::Sqlite(cfg) => {
            let sp = format!("{p}.sqlite");
            check_ident(cx, &format!("{sp}.table"), &cfg.table);
            if cfg.key.is_empty() {
                cx.at(
                    format!("{sp}.key"),
                    "at least one key column is required for the upsert",
                );
            }
            for (i, k) in cfg.key.iter().enumerate() {
                check_ident(cx, &format!("{sp}.key[{i}]"), k);
            }
            if let Some(cols) = &cfg.columns {
                for (c, t) in cols {
                    check_ident(cx, &format!("{sp}.columns.{c}"), c);
                    if !["text", "integer", "real", "boolean", "json"].contains(&t.as_str()) {
                        cx.at(
                            format!("{sp}.columns.{c}"),
                            format!("type `{t}`: expected text, integer, real, boolean or json"),
                        );
                    }
                }
                for k in &cfg.key {
                    if !cols.contains_key(k) {
                        cx.at(
                            format!("{sp}.key"),
                            format!("key column `{k}` is not among `columns`"),
                        );
                    }
                }
            }
            Some(SinkSpec::Sqlite {
                path: base.join(&cfg.path),
                cfg,
            })
        }
        RawSink::Postgres(cfg) => {
            let pp = format!("{p}.postgres");
            for part in cfg.table.split('.') {
                check_ident(cx, &format!("{pp}.table"), part);
            }
            if cfg.key.is_empty() {
                cx.at(
                    format!("{pp}.key"),
                    "at least one key column is required for the upsert",
                );
            }
            if cfg.columns.is_empty() {
                cx.at(format!("{pp}.columns"), "at least one column is required");
            }
            for (c, t) in &cfg.columns {
                check_ident(cx, &format!("{pp}.columns.{c}"), c);
                if !t
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || " _()[],".contains(ch))
                {
                    cx.at(
                        format!("{pp}.columns.{c}"),
                        format!("`{t}` is not a PostgreSQL type name"),
                    );
                }
            }
            for k in &cfg.key {
                if !cfg.columns.contains_key(k) {
                    cx.at(
                        format!("{pp}.key"),
                        format!("key column `{k}` is not among `columns`"),
                    );
                }
            }
            Some(SinkSpec::Postgres { cfg })
        }
        RawSink::Jsonl(cfg) => Some(SinkSpec::Jsonl {
            path: base.join(&cfg.path),
            cfg,
        }),
    }
}

fn check_ident(cx: &mut Ctx, path: &str, s: &str) {
    let ok = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        cx.at(
            path,
            format!("`{s}` is not a plain SQL identifier (letters, digits, `_`)"),
        );
    }
}

fn delivery_policy(
    cx: &mut Ctx,
    p: &str,
    layers: [Option<&RawDelivery>; 3],
    sink_kind: Option<&str>,
) -> DeliveryPolicy {
    fn pick<T: Clone>(
        layers: &[Option<&RawDelivery>; 3],
        f: impl Fn(&RawDelivery) -> Option<T>,
    ) -> Option<T> {
        layers.iter().flatten().find_map(|l| f(l))
    }
    let http = sink_kind == Some("http");
    let max_attempts = pick(&layers, |l| l.max_attempts).unwrap_or(8);
    if max_attempts == 0 {
        cx.at(format!("{p}.max_attempts"), "must be at least 1");
    }
    let initial_backoff = cx.duration(
        &format!("{p}.initial_backoff"),
        &pick(&layers, |l| l.initial_backoff.clone()),
        Duration::from_millis(200),
    );
    let max_backoff = cx.duration(
        &format!("{p}.max_backoff"),
        &pick(&layers, |l| l.max_backoff.clone()),
        Duration::from_secs(60),
    );
    let multiplier = pick(&layers, |l| l.multiplier).unwrap_or(2.0);
    if !(multiplier >= 1.0 && multiplier.is_finite()) {
        cx.at(format!("{p}.multiplier"), "must be a number >= 1");
    }
    let concurrency = pick(&layers, |l| l.concurrency).unwrap_or(if http { 8 } else { 1 });
    if concurrency == 0 {
        cx.at(format!("{p}.concurrency"), "must be at least 1");
    }
    let batch_size = if http {
        1
    } else {
        pick(&layers, |l| l.batch_size).unwrap_or(500)
    };
    if batch_size == 0 {
        cx.at(format!("{p}.batch_size"), "must be at least 1");
    }
    DeliveryPolicy {
        max_attempts,
        initial_backoff,
        max_backoff,
        multiplier,
        concurrency,
        batch_size,
    }
}
