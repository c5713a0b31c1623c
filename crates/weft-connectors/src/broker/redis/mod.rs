//! Redis Streams: the `redis` source (a consumer group read with
//! `XREADGROUP`, `XACK` after the commit, `XAUTOCLAIM` of what a dead
//! consumer held) and the `redis` sink (`XADD` through a Lua script that
//! adds each idempotency key once), on redis-rs (cargo feature `redis`).
//!
//! - [`config`]: the settings, validated with their document paths.
//! - [`source`]: read a batch, `ingest` it, one `XACK` for the batch after
//!   the commit; ids by position (`<stream>:<entry id>`) unless the entry
//!   names one.
//! - [`sink`]: one pipelined round trip per batch, each result the
//!   script's.
//!
//! ## How an entry maps to an event (both ends)
//!
//! Redis has no headers and CloudEvents has no Redis binding, so weft
//! uses the Kafka binding's names as entry fields:
//!
//! | field | meaning |
//! |---|---|
//! | `data` (`field:`) | the payload, one JSON value (UTF-8) |
//! | `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_time`, `ce_subject` | the CloudEvents attributes (binary mode) |
//! | `content-type` | `datacontenttype`; `application/cloudevents+json` makes the payload field a structured CloudEvent, unwrapped |
//! | `x-correlation-id`, `x-causation-id` | weft's correlation id and the id of the event that caused the write |
//! | `traceparent`, `tracestate` | the W3C trace context |
//!
//! The sink writes exactly these (and the configured `fields`); the source
//! reads them and ignores any other field. An entry without the payload
//! field, whose payload is not JSON, or is over `max_message_bytes` is a
//! bad record: a DLQ entry naming the stream, the entry id and the reason,
//! acknowledged once that entry is committed.

pub mod config;
pub mod sink;
pub mod source;

pub use config::{RedisSinkConfig, RedisSourceConfig};
pub use sink::RedisSink;
pub use source::RedisSource;

use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, RedisError};
use weft_core::config::Secret;

/// The client of a validated `url`, and `host:port` for messages (never
/// the user or password).
fn client(url: &Secret) -> Result<(Client, String), String> {
    let c = Client::open(url.expose().trim()).map_err(|e| {
        format!(
            "not a Redis URL: {}",
            e.detail().unwrap_or("it does not parse")
        )
    })?;
    let addr = c.get_connection_info().addr().to_string();
    Ok((c, addr))
}

/// A new connection: `connect_timeout` to connect, `response_timeout` for
/// each reply (longer than a blocking read's `BLOCK`).
async fn connect(
    client: &Client,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<MultiplexedConnection, RedisError> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

/// Whether an error means the connection is gone (reconnect) rather than
/// a refusal by a server that answered.
fn connection_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// Server errors that a retry can get past: a server loading its data, a
/// replica, a busy script, out of memory (until something is freed or
/// trimmed), a cluster moving.
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING"
            | "READONLY"
            | "BUSY"
            | "OOM"
            | "MASTERDOWN"
            | "TRYAGAIN"
            | "CLUSTERDOWN"
            | "NOSCRIPT"
            | "MISCONF"
            | "NOREPLICAS"
    )
}

/// `weft check` for a Redis source: connect, and check the stream and the
/// consumer group (or say that weft creates them).
pub(crate) async fn probe_source(c: &RedisSourceConfig) -> crate::probe::Finding {
    use crate::probe::Finding;
    let (cl, at) = match client(&c.url) {
        Ok(x) => x,
        Err(e) => return Finding::fail(e),
    };
    let mut conn = match connect(&cl, c.connect_timeout, c.connect_timeout).await {
        Ok(conn) => conn,
        Err(e) => return Finding::fail(format!("cannot connect to Redis at {at}: {e}")),
    };
    let ty: Result<String, RedisError> = ::redis::cmd("TYPE")
        .arg(&c.stream)
        .query_async(&mut conn)
        .await;
    let ty = match ty {
        Ok(t) => t,
        Err(e) => return Finding::fail(format!("connected to {at}; TYPE {}: {e}", c.stream)),
    };
    match ty.as_str() {
        "none" if c.create => {
            return Finding::ok(format!(
                "connected to {at}; stream `{}` does not exist yet: weft creates it with group `{}`",
                c.stream, c.group
            ));
        }
        "none" => {
            return Finding::fail(format!(
                "connected to {at}; stream `{}` does not exist (and `create: false`)",
                c.stream
            ));
        }
        "stream" => {}
        other => {
            return Finding::fail(format!(
                "connected to {at}; key `{}` holds a {other}, not a stream",
                c.stream
            ));
        }
    }
    let len: i64 = ::redis::cmd("XLEN")
        .arg(&c.stream)
        .query_async(&mut conn)
        .await
        .unwrap_or(0);
    let groups: Result<::redis::Value, RedisError> = ::redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&c.stream)
        .query_async(&mut conn)
        .await;
    let names = match groups {
        Ok(g) => source::group_names(&g),
        Err(e) => {
            return Finding::fail(format!("connected to {at}; XINFO GROUPS {}: {e}", c.stream));
        }
    };
    match (names.contains(&c.group), c.create) {
        (true, _) => Finding::ok(format!(
            "connected to {at}; stream `{}` ({len} entries), group `{}` exists",
            c.stream, c.group
        )),
        (false, true) => Finding::ok(format!(
            "connected to {at}; stream `{}` ({len} entries); group `{}` will be created",
            c.stream, c.group
        )),
        (false, false) => Finding::fail(format!(
            "connected to {at}; group `{}` does not exist on stream `{}` (and `create: false`); it has {names:?}",
            c.group, c.stream
        )),
    }
}
