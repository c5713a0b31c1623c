//! RabbitMQ (AMQP 0.9.1): the `amqp` source (a queue consumer with manual
//! acks) and the `amqp` sink (persistent, mandatory publishes with
//! publisher confirms and `message_id` = the idempotency key), on `lapin`
//! (cargo feature `amqp`).
//!
//! - [`config`]: the settings, validated with their document paths.
//! - [`source`]: take what has arrived (up to `batch`), `ingest` it, ack it
//!   after the commit; ids from the message (`cloudEvents:id`,
//!   `message_id`), never from the delivery (AMQP has no stable position).
//! - [`sink`]: publish a batch pipelined, each result the broker's confirm.

pub mod config;
pub mod sink;
pub mod source;

pub use config::{AmqpSinkConfig, AmqpSourceConfig};
pub use sink::AmqpSink;
pub use source::AmqpSource;

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};

/// Connect to the broker within `timeout`, with a name the management UI
/// shows. The error names host, port and vhost, never the password.
async fn connect(
    url: &weft_core::config::Secret,
    name: &str,
    timeout: Duration,
) -> Result<lapin::Connection, String> {
    let props = lapin::ConnectionProperties::default().with_connection_name(name.into());
    let at = config::where_(url);
    match tokio::time::timeout(
        timeout,
        lapin::Connection::connect(url.expose().trim(), props),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("cannot connect to RabbitMQ at {at}: {e}")),
        Err(_) => Err(format!(
            "cannot connect to RabbitMQ at {at}: no answer within {timeout:?}"
        )),
    }
}

/// A header's value as text (strings, numbers, booleans, timestamps).
fn header_text(h: &FieldTable, name: &str) -> Option<String> {
    let v = h.inner().iter().find_map(|(k, v)| {
        (k.as_str() == name || k.as_str().eq_ignore_ascii_case(name)).then_some(v)
    })?;
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        _ => return None,
    })
}

/// `weft check` for a RabbitMQ source: connect, and check the queue with a
/// passive declare (or say that weft declares it).
pub(crate) async fn probe_source(system: &str, c: &AmqpSourceConfig) -> crate::probe::Finding {
    use crate::probe::Finding;
    let at = config::where_(&c.url);
    let conn = match connect(&c.url, &format!("weft check {system}"), c.connect_timeout).await {
        Ok(conn) => conn,
        Err(e) => return Finding::fail(e),
    };
    let ch = match conn.create_channel().await {
        Ok(ch) => ch,
        Err(e) => return Finding::fail(format!("cannot open a channel: {e}")),
    };
    let found = ch
        .queue_declare(
            c.queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let out = match (found, c.declare) {
        (Ok(q), _) => Finding::ok(format!(
            "connected to {at}; queue `{}` has {} messages and {} consumers",
            c.queue,
            q.message_count(),
            q.consumer_count()
        )),
        (Err(_), true) => Finding::ok(format!(
            "connected to {at}; queue `{}` does not exist yet: weft declares it",
            c.queue
        )),
        (Err(e), false) => Finding::fail(format!(
            "connected to {at}; queue `{}` does not exist (and `declare: false`): {e}",
            c.queue
        )),
    };
    let _ = conn.close(200, "weft check done".into()).await;
    out
}
