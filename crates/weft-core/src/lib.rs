//! weft's shared model: the event envelope ([`event`]), the config file
//! ([`config`]), jq programs ([`mapping`]) and the error kind that drives
//! retries ([`ErrorKind`]).
//!
//! This crate does no I/O except reading the config file; every other weft
//! crate depends on it and it depends on none of them.

pub mod config;
pub mod event;
pub mod identity;
pub mod mapping;

pub use event::Event;

/// Whether a failure may go away by trying again. This one bit decides
/// between a retry with backoff and the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Network errors, timeouts, 408/429/5xx, a busy database: retry.
    Retryable,
    /// Bad payload, other 4xx, constraint violations, mapping errors: DLQ.
    Permanent,
}
