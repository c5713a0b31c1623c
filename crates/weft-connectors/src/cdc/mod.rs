//! Change data capture: sources that read a database's own change log.
//!
//! - [`postgres`]: PostgreSQL logical replication (`pgoutput`), behind the
//!   `cdc-postgres` cargo feature (on by default).

#[cfg(feature = "cdc-postgres")]
pub mod postgres;
