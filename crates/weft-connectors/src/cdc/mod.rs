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
