//! Change data capture: sources that read a database's own change log.
//!
//! - [`postgres`]: PostgreSQL logical replication (`pgoutput`), behind the
//!   `cdc-postgres` cargo feature (on by default).
//! - [`mysql`]: the MariaDB/MySQL binlog (ROW format), behind the
//!   `cdc-mysql` cargo feature (on by default).

#[cfg(feature = "cdc-mysql")]
pub mod mysql;
#[cfg(feature = "cdc-postgres")]
pub mod postgres;
