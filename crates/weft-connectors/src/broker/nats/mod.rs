//! NATS JetStream: the `nats` source (a durable pull consumer) and the
//! `nats` sink (JetStream publish with `Nats-Msg-Id` = the idempotency key),
//! on `async-nats` (cargo feature `nats`).
//!
//! - [`config`]: the settings, validated with their document paths.
//! - [`source`]: fetch a batch, `ingest` it, ack each message after the
//!   commit; ids by position (`<stream>:<seq>`) unless the message names one.
//! - [`sink`]: publish a batch pipelined, each result the stream's ack.

pub mod config;
pub mod sink;
pub mod source;

pub use config::{NatsSinkConfig, NatsSourceConfig};
pub use sink::NatsSink;
pub use source::NatsSource;

use std::time::Duration;

use weft_core::config::Secret;

/// The client options weft uses for both ends: a name the server shows,
/// the token, unlimited reconnects (the client reconnects by itself and
/// resends subscriptions; JetStream state is the server's).
fn options(
    name: &str,
    token: Option<&Secret>,
    connect_timeout: Duration,
) -> async_nats::ConnectOptions {
    let mut o = async_nats::ConnectOptions::new()
        .name(format!("weft {name}"))
        .connection_timeout(connect_timeout)
        .max_reconnects(None);
    if let Some(t) = token {
        o = o.token(t.expose().to_owned());
    }
    o
}

/// The server addresses of a validated `url` (comma-separated).
fn addrs(url: &Secret) -> Result<Vec<async_nats::ServerAddr>, String> {
    url.expose()
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("not a NATS server address: {e}"))
        })
        .collect()
}

/// `host:port` of each server, for messages (never the user or password).
fn hosts(addrs: &[async_nats::ServerAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("{}:{}", a.host(), a.port()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a JetStream API error is "stream not found" (10059).
fn stream_not_found(e: &async_nats::jetstream::Error) -> bool {
    e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
}

/// `weft check` for a NATS source: connect, find the stream and the
/// durable consumer (or say that weft will create them).
pub(crate) async fn probe_source(system: &str, c: &NatsSourceConfig) -> crate::probe::Finding {
    use crate::probe::Finding;
    use async_nats::jetstream;
    let addrs = match addrs(&c.url) {
        Ok(a) => a,
        Err(e) => return Finding::fail(e),
    };
    let at = hosts(&addrs);
    let client = match async_nats::connect_with_options(
        addrs,
        options(
            &format!("{system} check"),
            c.token.as_ref(),
            c.connect_timeout,
        ),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return Finding::fail(format!("cannot connect to NATS at {at}: {e}")),
    };
    let js = jetstream::new(client);
    let mut stream = match js.get_stream(&c.stream).await {
        Ok(s) => s,
        Err(e) => {
            let missing = matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j) if stream_not_found(&j));
            return match (missing, c.create) {
                (true, true) => Finding::ok(format!(
                    "connected to {at}; stream `{}` does not exist yet: weft creates it",
                    c.stream
                )),
                (true, false) => Finding::fail(format!(
                    "connected to {at}; stream `{}` does not exist (and `create: false`)",
                    c.stream
                )),
                _ => Finding::fail(format!("cannot look up stream `{}`: {e}", c.stream)),
            };
        }
    };
    let messages = stream.info().await.map(|i| i.state.messages).unwrap_or(0);
    let consumer = stream
        .get_consumer::<jetstream::consumer::pull::Config>(&c.consumer)
        .await;
    match (consumer, c.create) {
        (Ok(_), _) => Finding::ok(format!(
            "connected to {at}; stream `{}` ({messages} messages), consumer `{}` exists",
            c.stream, c.consumer
        )),
        (Err(_), true) => Finding::ok(format!(
            "connected to {at}; stream `{}` ({messages} messages); consumer `{}` will be created",
            c.stream, c.consumer
        )),
        (Err(e), false) => Finding::fail(format!(
            "connected to {at}; consumer `{}` on stream `{}`: {e} (and `create: false`)",
            c.consumer, c.stream
        )),
    }
}
