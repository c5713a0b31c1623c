//! The `postgres_cdc` source's settings: the raw serde struct (what a user
//! writes under `source: {postgres_cdc: ...}`), its pure validation into
//! [`PgCdcConfig`], and nothing that connects.
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
pub struct RawPgCdc {
    /// `postgresql://user:password@host:5432/db` (use `${ENV}` for the
    /// password). The role needs the `REPLICATION` attribute (or superuser);
    /// creating the publication needs ownership of the tables.
    pub url: Secret,
    /// Tables to capture, `schema.table` or `table` (schema `public`). A
    /// publication that does not exist is created `FOR TABLE` these;
    /// required then. One listed here and missing from an existing
    /// publication is added to it (and copied alone at that start); tables
    /// the publication has beyond these are kept.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Publication name (default `weft_<system>`).
    pub publication: Option<String>,
    /// Replication slot name (default `weft_<system>`). The slot is weft's:
    /// one found without a position saved by weft is dropped and created
    /// again, so that the initial snapshot matches it.
    pub slot: Option<String>,
    /// `initial` (default): a consistent copy of the published tables first
    /// (events with `op: r`), then every change after it. `never`: only the
    /// changes from the slot's position on.
    pub snapshot: Option<SnapshotMode>,
    /// When the slot is gone or invalidated while weft has a saved position
    /// (changes may have been lost): `fail` (default: the source stops with
    /// the reason; `weft cdc resnapshot` is the way out) or `resnapshot` (a
    /// new slot and a new initial snapshot at once).
    pub on_slot_lost: Option<OnSlotLost>,
    /// Changes per store commit at most (default 2000). A transaction
    /// bigger than this is committed in parts; small ones are grouped.
    pub batch_size: Option<usize>,
    /// How often the position is confirmed to PostgreSQL and the slot's lag
    /// measured when nothing arrives (default `10s`).
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

/// What a lost slot does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnSlotLost {
    #[default]
    Fail,
    Resnapshot,
}

/// A validated `postgres_cdc` source.
#[derive(Debug, Clone)]
pub struct PgCdcConfig {
    pub url: Secret,
    /// `(schema, table)`.
    pub tables: Vec<(String, String)>,
    pub publication: String,
    pub slot: String,
    pub snapshot: SnapshotMode,
    pub on_slot_lost: OnSlotLost,
    pub batch_size: usize,
    pub heartbeat: Duration,
    pub event_type: String,
    pub events: EventsMode,
    pub max_transaction_changes: usize,
}

/// Longest PostgreSQL identifier, in bytes.
const MAX_NAME: usize = 63;

impl PgCdcConfig {
    /// Validate the settings of system `system`'s source; every problem,
    /// each with its document path.
    pub fn from_settings(system: &str, settings: &ConnectorSettings) -> Result<Self, Vec<Issue>> {
        let base = format!("systems.{system}.source.postgres_cdc");
        let raw: RawPgCdc = match serde_path_to_error::deserialize(&settings.0) {
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
        if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
            issues.push(issue(
                format!("{base}.url"),
                "expected a `postgresql://` URL",
            ));
        } else if let Err(e) = url.parse::<tokio_postgres::Config>() {
            issues.push(issue(
                format!("{base}.url"),
                format!("not a PostgreSQL connection URL the client accepts: {e}"),
            ));
        }
        let default_name = default_name(system);
        let name = |issues: &mut Vec<Issue>, field: &str, v: Option<String>| -> String {
            let v = v.unwrap_or_else(|| default_name.clone());
            if v.is_empty()
                || v.len() > MAX_NAME
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                issues.push(issue(
                    format!("{base}.{field}"),
                    format!("`{v}`: use 1 to {MAX_NAME} lowercase letters, digits and `_`"),
                ));
            }
            v
        };
        let slot = name(&mut issues, "slot", raw.slot);
        let publication = name(&mut issues, "publication", raw.publication);
        let mut tables = Vec::new();
        for (i, t) in raw.tables.iter().enumerate() {
            let parts: Vec<&str> = t.split('.').collect();
            let (schema, table) = match parts.as_slice() {
                [t] => ("public", *t),
                [s, t] => (*s, *t),
                _ => ("", ""),
            };
            if schema.is_empty() || table.is_empty() || t.contains('"') {
                issues.push(issue(
                    format!("{base}.tables[{i}]"),
                    format!("`{t}`: expected `table` or `schema.table`"),
                ));
                continue;
            }
            let pair = (schema.to_owned(), table.to_owned());
            if tables.contains(&pair) {
                issues.push(issue(
                    format!("{base}.tables[{i}]"),
                    format!("`{t}` is listed twice"),
                ));
            }
            tables.push(pair);
        }
        let batch_size = raw.batch_size.unwrap_or(2000);
        if batch_size == 0 {
            issues.push(issue(
                format!("{base}.batch_size"),
                "must be greater than 0",
            ));
        }
        let heartbeat = match raw.heartbeat.as_deref().map(parse_duration) {
            None => Duration::from_secs(10),
            Some(Ok(d)) if d >= Duration::from_millis(100) => d,
            Some(Ok(_)) => {
                issues.push(issue(format!("{base}.heartbeat"), "must be at least 100ms"));
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
        Ok(PgCdcConfig {
            url: raw.url,
            tables,
            publication,
            slot,
            snapshot: raw.snapshot.unwrap_or_default(),
            on_slot_lost: raw.on_slot_lost.unwrap_or_default(),
            batch_size,
            heartbeat,
            event_type: raw.event_type.unwrap_or_else(|| format!("{system}.{kind}")),
            events,
            max_transaction_changes,
        })
    }
}

/// `weft_<system>`, as a PostgreSQL name: lowercase, `-` as `_`, cut to 63
/// bytes.
pub fn default_name(system: &str) -> String {
    let mut s: String = format!("weft_{system}")
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' | '_' => c,
            _ => '_',
        })
        .collect();
    s.truncate(MAX_NAME);
    s
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

    fn cfg(v: serde_json::Value) -> Result<PgCdcConfig, Vec<Issue>> {
        PgCdcConfig::from_settings("Legacy-DB", &ConnectorSettings(v))
    }

    #[test]
    fn defaults_come_from_the_system_name() {
        let c = cfg(json!({"url": "postgresql://u@h/db", "tables": ["orders", "crm.contacts"]}))
            .unwrap();
        assert_eq!(c.slot, "weft_legacy_db");
        assert_eq!(c.publication, "weft_legacy_db");
        assert_eq!(
            c.tables,
            [
                ("public".to_owned(), "orders".to_owned()),
                ("crm".to_owned(), "contacts".to_owned())
            ]
        );
        assert_eq!(c.snapshot, SnapshotMode::Initial);
        assert_eq!(c.batch_size, 2000);
        assert_eq!(c.event_type, "Legacy-DB.change");
        assert_eq!(c.events, EventsMode::PerRow);
        assert_eq!(c.max_transaction_changes, 10_000);
        let c = cfg(json!({"url": "postgresql://u@h/db", "events": "per_transaction"})).unwrap();
        assert_eq!(c.events, EventsMode::PerTransaction);
        assert_eq!(c.event_type, "Legacy-DB.transaction");
    }

    #[test]
    fn bad_event_modes_and_limits_are_refused_at_their_path() {
        let e = cfg(json!({"url": "postgresql://u@h/db", "events": "per_statement"})).unwrap_err();
        assert_eq!(e[0].path, "systems.Legacy-DB.source.postgres_cdc.events");
        assert!(e[0].message.contains("per_transaction"), "{e:?}");
        let e =
            cfg(json!({"url": "postgresql://u@h/db", "max_transaction_changes": 0})).unwrap_err();
        assert_eq!(
            e[0].path,
            "systems.Legacy-DB.source.postgres_cdc.max_transaction_changes"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let e = cfg(json!({
            "url": "mysql://x", "slot": "Bad-Name", "tables": ["a.b.c"], "batch_size": 0,
            "heartbeat": "soon"
        }))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        let b = "systems.Legacy-DB.source.postgres_cdc";
        assert_eq!(
            paths,
            [
                format!("{b}.url"),
                format!("{b}.slot"),
                format!("{b}.tables[0]"),
                format!("{b}.batch_size"),
                format!("{b}.heartbeat")
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused_at_their_path() {
        let e = cfg(json!({"url": "postgresql://u@h/db", "slots": "x"})).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("unknown field `slots`"), "{e:?}");
        let e = cfg(json!({"url": "postgresql://u@h/db", "snapshot": "sometimes"})).unwrap_err();
        assert_eq!(e[0].path, "systems.Legacy-DB.source.postgres_cdc.snapshot");
    }
}
