//! Change data capture: sources that read a database's own change log.
//!
//! - [`postgres`]: PostgreSQL logical replication (`pgoutput`), behind the
//!   `cdc-postgres` cargo feature (on by default).
//! - [`mysql`]: the MariaDB/MySQL binlog (ROW format), behind the
//!   `cdc-mysql` cargo feature (on by default).
//! - [`txn`]: `events: per_transaction`, one event per committed
//!   transaction, for both.

#[cfg(feature = "cdc-mysql")]
pub mod mysql;
#[cfg(feature = "cdc-postgres")]
pub mod postgres;
#[cfg(any(feature = "cdc-postgres", feature = "cdc-mysql"))]
pub mod txn;

/// Checkpoint key (under the source's system) of a request for a new
/// snapshot, recorded by `weft cdc resnapshot` in one store transaction.
/// The source acts on it at its next start (a hub restart, or the
/// supervisor's restart of a source that stopped with an error); it is
/// served when the source's position names its `id` (saved in the same
/// transaction as the snapshot's last rows), so a crash in between takes
/// the snapshot again.
pub const RESNAPSHOT_KEY: &str = "cdc_resnapshot";

/// A request for a new snapshot (the value under [`RESNAPSHOT_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResnapshotRequest {
    /// Unique per request (when it was made, in ms, and a counter).
    pub id: String,
    /// `schema.table` names to copy again; empty: everything (a new slot
    /// or binlog position and a full initial snapshot).
    #[serde(default)]
    pub tables: Vec<String>,
}

/// Gauge: rows read by the source's current (or last) snapshot.
pub const SNAPSHOT_ROWS: &str = "weft_cdc_snapshot_rows";
/// Gauge: the rows the database's catalog estimated for that snapshot
/// when it began (PostgreSQL `reltuples`, MariaDB `TABLE_ROWS`): an
/// estimate, 0 when the catalog has none.
pub const SNAPSHOT_ROWS_EXPECTED: &str = "weft_cdc_snapshot_rows_expected";

/// A snapshot's progress (a backfill of every row): the two gauges above,
/// set every 1,000 rows and at the end, and a log line every 5 s with the
/// rate and, against the estimate, how far it is and how long is left.
#[cfg(any(feature = "cdc-postgres", feature = "cdc-mysql"))]
pub(crate) struct SnapshotProgress {
    system: String,
    expected: u64,
    rows: u64,
    started: std::time::Instant,
    logged: std::time::Instant,
}

#[cfg(any(feature = "cdc-postgres", feature = "cdc-mysql"))]
impl SnapshotProgress {
    const EVERY: u64 = 1_000;
    const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    pub(crate) fn new(system: &str, expected: Option<u64>) -> Self {
        let expected = expected.unwrap_or(0);
        metrics::gauge!(SNAPSHOT_ROWS_EXPECTED, "source" => system.to_owned()).set(expected as f64);
        metrics::gauge!(SNAPSHOT_ROWS, "source" => system.to_owned()).set(0.0);
        let now = std::time::Instant::now();
        SnapshotProgress {
            system: system.to_owned(),
            expected,
            rows: 0,
            started: now,
            logged: now,
        }
    }

    /// One more row read.
    pub(crate) fn row(&mut self) {
        self.rows += 1;
        if !self.rows.is_multiple_of(Self::EVERY) {
            return;
        }
        metrics::gauge!(SNAPSHOT_ROWS, "source" => self.system.clone()).set(self.rows as f64);
        if self.logged.elapsed() < Self::LOG_EVERY {
            return;
        }
        self.logged = std::time::Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.rows as f64 / secs;
        if self.expected > self.rows {
            let left = (self.expected - self.rows) as f64 / rate.max(1.0);
            tracing::info!(
                system = %self.system, rows = self.rows, expected = self.expected,
                percent = format!("{:.1}", 100.0 * self.rows as f64 / self.expected as f64),
                rows_per_s = rate.round() as u64, eta_s = left.round() as u64,
                "cdc: snapshot in progress"
            );
        } else {
            tracing::info!(
                system = %self.system, rows = self.rows, rows_per_s = rate.round() as u64,
                "cdc: snapshot in progress"
            );
        }
    }

    /// Every row read.
    pub(crate) fn done(&self) {
        metrics::gauge!(SNAPSHOT_ROWS, "source" => self.system.clone()).set(self.rows as f64);
    }
}
