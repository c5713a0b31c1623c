//! weft's connectors: sources that bring records in and sinks that write
//! them out.
//!
//! A source never writes to the store itself: it hands batches to an
//! [`Ingest`] (implemented by the runtime) and only moves on (acknowledges
//! a webhook, advances past a file line) once `ingest` returned. A sink
//! receives [`Delivery`]s from the runtime's delivery workers and reports one
//! result per delivery; retries, backoff, ordering and the DLQ are the
//! runtime's business, not the sink's.
//!
//! Registration is explicit: [`build_sink`] and [`build_source`] map each
//! config variant to its connector; there is no other registry.
// a lean build (without a database feature) leaves helpers of the SQL
// connectors unused; the default build is checked with `-D warnings`
#![cfg_attr(
    not(all(
        feature = "postgres",
        feature = "mysql",
        feature = "nats",
        feature = "amqp",
        feature = "redis",
        feature = "mqtt",
        feature = "kafka"
    )),
    allow(dead_code, unused_mut, unused_variables, unused_imports)
)]

pub mod broker;
pub mod cdc;
pub mod check;
pub mod probe;
pub mod sink;
pub mod source;

pub mod export;
pub mod file;
pub mod generate;
pub mod http;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod pg_tls;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod rest;
pub mod sql_poll;
pub mod sqlite;
pub mod webhook;

pub use sink::{BuiltSink, Delivery, Sink, SinkError, WriteResult, Written, build_sink};

pub use source::{
    BadRecord, Batch, Checkpoint, Ingest, IngestError, Receipt, Record, Source, SourceError,
    SourceHandle, build_source,
};

/// The error for a connector this binary was built without.
#[allow(dead_code)]
pub(crate) fn without_feature(feature: &str, what: &str) -> String {
    format!(
        "this weft was built without {what} support: rebuild with the cargo feature `{feature}` \
         (on by default)"
    )
}
