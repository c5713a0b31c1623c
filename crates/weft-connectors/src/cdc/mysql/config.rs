//! The `mysql_cdc` source's settings: the raw serde struct (what a user
//! writes under `source: {mysql_cdc: ...}`), its pure validation into
//! [`MyCdcConfig`], and nothing that connects.
//!
//! weft-core hands the settings over as written ([`ConnectorSettings`]);
//! `weft validate` and `weft run` both come here through
//! [`crate::check::check`], so a problem is reported with its document
//! path, line and column like any other config problem.

use std::time::Duration;

use serde::Deserialize;
use weft_core::config::raw::ConnectorSettings;
use weft_core::config::{Issue, Secret, parse_duration};

pub use crate::cdc::txn::EventsMode;

/// The settings as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMyCdc {
    /// `mysql://user:password@host:3306/db` (use `${ENV}` for the
    /// password). The user needs `REPLICATION SLAVE`, `REPLICATION CLIENT`
    /// (MariaDB: `BINLOG MONITOR`) and `SELECT` on the tables.
    pub url: Secret,
    /// Tables to capture, `db.table`, or `table` in the URL's database.
    pub tables: Vec<String>,
    /// The replica id weft registers with (unique among the server's
    /// replicas: the server drops an older connection with the same id).
    /// Default: derived from the system's name, in 1073741824..2147483647.
    pub server_id: Option<u32>,
    /// `initial` (default): a consistent copy of the tables first (events
    /// with `op: r`), then every change after it. `never`: only the changes
    /// from the binlog's end at the first start on.
    pub snapshot: Option<SnapshotMode>,
    /// When the binlog weft would resume from is gone (purged) or behind
    /// the saved position (the server's binlog was reset): `fail` (default:
    /// the source stops with the reason; `weft cdc resnapshot` is the way
    /// out) or `resnapshot` (a new initial snapshot at once, then the
    /// stream from its position).
    pub on_position_lost: Option<OnPositionLost>,
    /// Changes per store commit at most (default 2000). A transaction
    /// bigger than this is committed in parts; small ones are grouped.
    pub batch_size: Option<usize>,
    /// How often the server sends a heartbeat when idle, and weft saves
    /// the position past transactions of other tables (default `10s`).
    pub heartbeat: Option<String>,
    /// CloudEvents `type` of the events (default `<system>.change`;
    /// `<system>.transaction` with `events: per_transaction`).
    pub event_type: Option<String>,
    /// `per_row` (default): one event per changed row. `per_transaction`:
    /// one event per committed transaction, its changes in commit order
    /// under `changes` (snapshot rows stay one event each).
    pub events: Option<EventsMode>,
    /// With `events: per_transaction`: changes per event at most (default
    /// 10000, at most 1000000). A bigger transaction is consecutive events
    /// (`part` 1, 2, ..., the last with `last: true`).
    pub max_transaction_changes: Option<usize>,
}

/// Whether an initial snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    #[default]
    Initial,
    Never,
}

/// What a lost binlog position does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnPositionLost {
    #[default]
    Fail,
    Resnapshot,
}

/// A validated `mysql_cdc` source.
#[derive(Debug, Clone)]
pub struct MyCdcConfig {
    pub url: Secret,
    /// `(database, table)`.
    pub tables: Vec<(String, String)>,
    pub server_id: u32,
    pub snapshot: SnapshotMode,
    pub on_position_lost: OnPositionLost,
    pub batch_size: usize,
    pub heartbeat: Duration,
    pub event_type: String,
    pub events: EventsMode,
    pub max_transaction_changes: usize,
}

/// Longest MySQL identifier, in characters.
const MAX_NAME: usize = 64;

impl MyCdcConfig {
    /// Validate the settings of system `system`'s source; every problem,
    /// each with its document path.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.source.mysql_cdc");
        let raw: RawMyCdc = match serde_path_to_error::deserialize(&settings.0) {
            Ok(r) => r,
            Err(e) => {
                let path = e.path().to_string();
                let at = if path.is_empty() || path == "." {
                    base
                } else {
                    format!("{base}.{path}")
                };
                return Err(vec![issue(at, e.into_inner().to_string())]);
            }
        };
        let mut issues = Vec::new();
        let url = raw.url.expose().trim();
        let mut url_db = None;
        if !url.starts_with("mysql://") {
            issues.push(issue(format!("{base}.url"), "expected a `mysql://` URL"));
        } else {
            match mysql_async::Opts::from_url(url) {
                Ok(o) => url_db = o.db_name().map(str::to_owned),
                Err(e) => issues.push(issue(
                    format!("{base}.url"),
                    format!("not a MariaDB/MySQL connection URL the client accepts: {e}"),
                )),
            }
        }
        let mut tables = Vec::new();
        if raw.tables.is_empty() {
            issues.push(issue(
                format!("{base}.tables"),
                "list at least one table (`db.table`)",
            ));
        }
        for (i, t) in raw.tables.iter().enumerate() {
            let parts: Vec<&str> = t.split('.').collect();
            let pair = match parts.as_slice() {
                [t] => url_db.as_deref().map(|d| (d, *t)),
                [d, t] => Some((*d, *t)),
                _ => None,
            };
            let ok = |s: &str| !s.is_empty() && s.chars().count() <= MAX_NAME && !s.contains('`');
            let Some((db, table)) = pair.filter(|(d, t)| ok(d) && ok(t)) else {
                let why = if parts.len() == 1 && url_db.is_none() {
                    format!("`{t}`: the URL names no database; write `db.table`")
                } else {
                    format!("`{t}`: expected `db.table` or `table`")
                };
                issues.push(issue(format!("{base}.tables[{i}]"), why));
                continue;
            };
            let pair = (db.to_owned(), table.to_owned());
            if tables.contains(&pair) {
                issues.push(issue(
                    format!("{base}.tables[{i}]"),
                    format!("`{t}` is listed twice"),
                ));
            }
            tables.push(pair);
        }
        let server_id = match raw.server_id {
            None => default_server_id(system),
            Some(0) => {
                issues.push(issue(
                    format!("{base}.server_id"),
                    "must be greater than 0 (0 is refused by the server)",
                ));
                0
            }
            Some(n) => n,
        };
        let batch_size = raw.batch_size.unwrap_or(2000);
        if batch_size == 0 {
            issues.push(issue(
                format!("{base}.batch_size"),
                "must be greater than 0",
            ));
        }
        let heartbeat = match raw.heartbeat.as_deref().map(parse_duration) {
            None => Duration::from_secs(10),
            Some(Ok(d)) if d >= Duration::from_millis(100) && d <= Duration::from_secs(3600) => d,
            Some(Ok(_)) => {
                issues.push(issue(
                    format!("{base}.heartbeat"),
                    "must be between 100ms and 1h",
                ));
                Duration::from_secs(10)
            }
            Some(Err(m)) => {
                issues.push(issue(format!("{base}.heartbeat"), m));
                Duration::from_secs(10)
            }
        };
        let (events, max_transaction_changes) =
            crate::cdc::txn::settings(&mut issues, &base, raw.events, raw.max_transaction_changes);
        if !issues.is_empty() {
            return Err(issues);
        }
        let kind = match events {
            EventsMode::PerRow => "change",
            EventsMode::PerTransaction => "transaction",
        };
        Ok(MyCdcConfig {
            url: raw.url,
            tables,
            server_id,
            snapshot: raw.snapshot.unwrap_or_default(),
            on_position_lost: raw.on_position_lost.unwrap_or_default(),
            batch_size,
            heartbeat,
            event_type: raw.event_type.unwrap_or_else(|| format!("{system}.{kind}")),
            events,
            max_transaction_changes,
        })
    }
}

/// A replica id from the system's name (FNV-1a), in 2^30..2^31: away from
/// the small ids servers are usually given.
pub fn default_server_id(system: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("weft:{system}").bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (1 << 30) | (h & 0x3fff_ffff)
}

/// Problems as one line each (for a source that fails to build).
pub fn describe(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| format!("at `{}`: {}", i.path, i.message))
        .collect::<Vec<_>>()
        .join("; ")
}

fn issue(path: String, message: impl Into<String>) -> Issue {
    Issue {
        path,
        line: None,
        column: None,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> Result<MyCdcConfig, Vec<Issue>> {
        MyCdcConfig::from_settings("Legacy-DB", &ConnectorSettings(v))
    }

    #[test]
    fn defaults_come_from_the_system_name_and_the_url() {
        let c =
            cfg(json!({"url": "mysql://u@h/shop", "tables": ["orders", "crm.contacts"]})).unwrap();
        assert_eq!(
            c.tables,
            [
                ("shop".to_owned(), "orders".to_owned()),
                ("crm".to_owned(), "contacts".to_owned())
            ]
        );
        assert_eq!(c.server_id, default_server_id("Legacy-DB"));
        assert!(c.server_id >= 1 << 30 && c.server_id < 1 << 31);
        assert_ne!(default_server_id("a"), default_server_id("b"));
        assert_eq!(c.snapshot, SnapshotMode::Initial);
        assert_eq!(c.on_position_lost, OnPositionLost::Fail);
        assert_eq!(c.batch_size, 2000);
        assert_eq!(c.heartbeat, Duration::from_secs(10));
        assert_eq!(c.event_type, "Legacy-DB.change");
        assert_eq!(c.events, EventsMode::PerRow);
        assert_eq!(c.max_transaction_changes, 10_000);
    }

    #[test]
    fn per_transaction_events_and_their_limit() {
        let c = cfg(json!({"url": "mysql://u@h/shop", "tables": ["t"],
            "events": "per_transaction", "max_transaction_changes": 50}))
        .unwrap();
        assert_eq!(c.events, EventsMode::PerTransaction);
        assert_eq!(c.max_transaction_changes, 50);
        assert_eq!(c.event_type, "Legacy-DB.transaction");
        let e = cfg(json!({"url": "mysql://u@h/shop", "tables": ["t"], "events": "per_txn"}))
            .unwrap_err();
        assert_eq!(e[0].path, "systems.Legacy-DB.source.mysql_cdc.events");
        let e = cfg(json!({"url": "mysql://u@h/shop", "tables": ["t"],
            "max_transaction_changes": 2000000}))
        .unwrap_err();
        assert_eq!(
            e[0].path,
            "systems.Legacy-DB.source.mysql_cdc.max_transaction_changes"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let e = cfg(json!({
            "url": "postgresql://x", "tables": ["a.b.c"], "server_id": 0, "batch_size": 0,
            "heartbeat": "soon"
        }))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        let b = "systems.Legacy-DB.source.mysql_cdc";
        assert_eq!(
            paths,
            [
                format!("{b}.url"),
                format!("{b}.tables[0]"),
                format!("{b}.server_id"),
                format!("{b}.batch_size"),
                format!("{b}.heartbeat")
            ]
        );
        let e = cfg(json!({"url": "mysql://u@h", "tables": ["orders"]})).unwrap_err();
        assert!(e[0].message.contains("names no database"), "{e:?}");
        let e = cfg(json!({"url": "mysql://u@h/db", "tables": []})).unwrap_err();
        assert_eq!(e[0].path, "systems.Legacy-DB.source.mysql_cdc.tables");
    }

    #[test]
    fn unknown_fields_are_refused_at_their_path() {
        let e = cfg(json!({"url": "mysql://u@h/db", "tables": ["t"], "slot": "x"})).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("unknown field `slot`"), "{e:?}");
        let e = cfg(json!({"url": "mysql://u@h/db", "tables": ["t"], "snapshot": "sometimes"}))
            .unwrap_err();
        assert_eq!(e[0].path, "systems.Legacy-DB.source.mysql_cdc.snapshot");
    }
}
