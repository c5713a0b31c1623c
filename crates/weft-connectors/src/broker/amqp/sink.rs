//! The `amqp` sink: RabbitMQ publishes with publisher confirms.
//!
//! Contract: every message carries `message_id` = the delivery's
//! idempotency key (and `cloudEvents:id`, the same), is persistent
//! (delivery mode 2) and `mandatory`, and a delivery is `Ok` only once the
//! broker confirmed it (for a durable queue: written to disk). RabbitMQ
//! does not dedupe by `message_id`: a retry after a timeout or a crash
//! between the confirm and the settle publishes a second copy with the
//! same `message_id`, which consumers drop by that id (weft's own `amqp`
//! source does). Never one input under two ids.
//!
//! A batch is published pipelined on one confirm channel (every message
//! sent, then every confirm awaited within `timeout`). Errors: a message
//! the broker returned (no queue bound for its routing key, with
//! `mandatory`), a missing exchange (the broker closes the channel with
//! 404; checked on a fresh channel, so a channel lost for another reason
//! is not mistaken for it) and a routing key the template cannot fill are
//! permanent; a nack, a lost channel or connection and a timeout are
//! retryable (the channel is opened again on the next write).
//!
//! Headers (CloudEvents AMQP binding, binary mode): `cloudEvents:specversion`,
//! `cloudEvents:id`, `cloudEvents:source`, `cloudEvents:type`,
//! `cloudEvents:time` (the event's own time), `cloudEvents:subject` (the
//! entity key), `x-correlation-id`, `x-causation-id`,
//! `traceparent`/`tracestate` when the event came with one, and the
//! configured `headers`; properties `content_type` (`application/json`),
//! `message_id`, `correlation_id`, `timestamp` (the event's time) and
//! `app_id` (`weft`).

use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;

use super::config::AmqpSinkConfig;
use crate::broker::{AMQP, outgoing_headers};
use crate::sink::{Delivery, Sink, SinkError, WriteResult, Written};

/// A connected (or connecting) `amqp` sink.
pub struct AmqpSink {
    system: String,
    cfg: AmqpSinkConfig,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl AmqpSink {
    /// Connect to the broker. An unreachable broker is not an error: the
    /// second value says why the destination is down (host, port, vhost;
    /// never the password) and the next write connects again. A reachable
    /// broker without the exchange is an error, like a missing table.
    pub async fn connect(
        system: &str,
        cfg: AmqpSinkConfig,
    ) -> Result<(AmqpSink, Option<String>), String> {
        let sink = AmqpSink {
            system: system.to_owned(),
            cfg,
            link: Mutex::new(None),
        };
        match sink.open().await {
            Ok(link) => {
                if let Some(missing) = sink.exchange_missing(&link.0).await {
                    return Err(missing);
                }
                *sink.link.lock().await = Some(link);
                Ok((sink, None))
            }
            Err(why) => Ok((sink, Some(why))),
        }
    }

    /// A connection and a channel in confirm mode.
    async fn open(&self) -> Result<(Connection, Channel), String> {
        let conn = super::connect(
            &self.cfg.url,
            &format!("weft sink {}", self.system),
            self.cfg.connect_timeout,
        )
        .await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| format!("cannot open a channel: {e}"))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("confirm.select: {e}"))?;
        Ok((conn, ch))
    }

    /// The reason, when the broker says the exchange does not exist
    /// (checked passively on a channel of its own: the 404 closes it).
    async fn exchange_missing(&self, conn: &Connection) -> Option<String> {
        let x = &self.cfg.exchange;
        if x.is_empty() {
            return None;
        }
        let ch = conn.create_channel().await.ok()?;
        let r = ch
            .exchange_declare(
                x.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match r {
            Err(e) if soft(&e) == Some(AMQPSoftError::NOTFOUND) => Some(format!(
                "exchange `{x}` does not exist on RabbitMQ at {}: declare it (`rabbitmqadmin declare exchange name={x} type=topic durable=true`)",
                super::config::where_(&self.cfg.url)
            )),
            _ => {
                let _ = ch.close(200, "checked".into()).await;
                None
            }
        }
    }

    /// The channel to publish on, opened again when the last one is gone.
    async fn channel(&self) -> Result<Channel, String> {
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = link.as_ref()
            && conn.status().connected()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        if let Some((conn, _)) = link.take() {
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                conn.close(200, "reconnecting".into()),
            )
            .await;
        }
        let l = self.open().await?;
        let ch = l.1.clone();
        *link = Some(l);
        Ok(ch)
    }

    /// Drop the channel (after a timeout or an error): the next write
    /// opens a new one.
    async fn reset(&self) {
        if let Some((conn, _)) = self.link.lock().await.take() {
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                conn.close(200, "reconnecting".into()),
            )
            .await;
        }
    }

    /// The routing key, properties and body of one delivery.
    fn message(&self, d: &Delivery) -> Result<(String, BasicProperties, Vec<u8>), SinkError> {
        let key = self
            .cfg
            .routing_key
            .render(d, escape_word)
            .map_err(|e| SinkError::permanent(format!("routing_key: {e}")))?;
        if key.len() > 255 {
            return Err(SinkError::permanent(format!(
                "routing_key: {} bytes, over AMQP's 255",
                key.len()
            )));
        }
        let source = self
            .cfg
            .event_source
            .clone()
            .unwrap_or_else(|| format!("weft/{}", d.context.flow));
        let ty = self
            .cfg
            .event_type
            .clone()
            .unwrap_or_else(|| format!("weft.{}", d.context.flow));
        let mut h = FieldTable::default();
        for (k, v) in outgoing_headers(AMQP, d, &source, &ty) {
            // datacontenttype is the `content_type` property
            if k != AMQP.content_type {
                h.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
            }
        }
        for (k, v) in &self.cfg.headers {
            h.insert(
                k.as_str().into(),
                AMQPValue::LongString(LongString::from(v.as_str())),
            );
        }
        let mut props = BasicProperties::default()
            .with_content_type(self.cfg.format.content_type().into())
            .with_message_id(short(&d.idempotency_key))
            .with_correlation_id(short(&d.correlation_id))
            .with_app_id("weft".into())
            .with_headers(h);
        if self.cfg.persistent {
            props = props.with_delivery_mode(2);
        }
        if d.context.event_time_ms > 0 {
            props = props.with_timestamp((d.context.event_time_ms / 1000) as u64);
        }
        let body = self
            .cfg
            .format
            .encode(&d.payload)
            .map_err(|e| SinkError::permanent(format!("payload: {e}")))?;
        Ok((key, props, body))
    }

    async fn write_batch(&self, batch: &[Delivery]) -> Vec<WriteResult> {
        let ch = match self.channel().await {
            Ok(c) => c,
            Err(why) => {
                return (0..batch.len())
                    .map(|_| Err(SinkError::retryable(why.clone())))
                    .collect();
            }
        };
        // send every publish, then wait for every confirm
        let mut pending = Vec::with_capacity(batch.len());
        for d in batch {
            pending.push(match self.message(d) {
                Ok((key, props, body)) => ch
                    .basic_publish(
                        self.cfg.exchange.as_str().into(),
                        key.into(),
                        BasicPublishOptions {
                            mandatory: self.cfg.mandatory,
                            ..Default::default()
                        },
                        &body,
                        props,
                    )
                    .await
                    .map_err(Failed::Amqp),
                Err(e) => Err(Failed::Sink(e)),
            });
        }
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        let mut out = Vec::with_capacity(batch.len());
        let mut broken = false;
        for p in pending {
            let r = match p {
                Err(f) => Err(f),
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Err(_) => Err(Failed::Sink(SinkError::retryable(format!(
                        "RabbitMQ did not confirm within {:?}",
                        self.cfg.timeout
                    )))),
                    Ok(Err(e)) => Err(Failed::Amqp(e)),
                    Ok(Ok(Confirmation::Ack(None))) => Ok(Written::default()),
                    Ok(Ok(Confirmation::Ack(Some(ret)))) => {
                        Err(Failed::Sink(SinkError::permanent(format!(
                            "RabbitMQ returned the message: {} {} (no queue is bound to exchange `{}` for routing key `{}`)",
                            ret.reply_code,
                            ret.reply_text,
                            self.cfg.exchange,
                            ret.delivery.routing_key
                        ))))
                    }
                    Ok(Ok(Confirmation::Nack(_))) => Err(Failed::Sink(SinkError::retryable(
                        "RabbitMQ nack'ed the message (it could not store it)",
                    ))),
                    Ok(Ok(Confirmation::NotRequested)) => Err(Failed::Sink(SinkError::retryable(
                        "the channel is not in confirm mode",
                    ))),
                },
            };
            if matches!(&r, Err(Failed::Amqp(_)))
                || matches!(&r, Err(Failed::Sink(e)) if e.message.contains("did not confirm"))
            {
                broken = true;
            }
            out.push(r);
        }
        if !broken {
            return out
                .into_iter()
                .map(|r| r.map_err(Failed::into_sink))
                .collect();
        }
        // a channel error: a missing exchange (404) is permanent, anything
        // else (a lost connection) retryable; asked on a fresh connection
        self.reset().await;
        let missing = match self.open().await {
            Ok((conn, ch)) => {
                let m = self.exchange_missing(&conn).await;
                *self.link.lock().await = Some((conn, ch));
                m
            }
            Err(_) => None,
        };
        out.into_iter()
            .map(|r| match r {
                Err(Failed::Amqp(e)) => Err(match &missing {
                    Some(why) => SinkError::permanent(why.clone()),
                    None => SinkError::retryable(format!("RabbitMQ publish: {e}")),
                }
                .with_source(e)),
                other => other.map_err(Failed::into_sink),
            })
            .collect()
    }
}

/// Why one publish failed: an AMQP error (classified after the batch) or
/// an already classified one.
enum Failed {
    Amqp(lapin::Error),
    Sink(SinkError),
}

impl Failed {
    fn into_sink(self) -> SinkError {
        match self {
            Failed::Sink(e) => e,
            Failed::Amqp(e) => {
                SinkError::retryable(format!("RabbitMQ publish: {e}")).with_source(e)
            }
        }
    }
}

impl Sink for AmqpSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(self.write_batch(batch))
    }

    fn max_write_time(&self, batch_len: usize) -> Duration {
        // connecting, the sends, every confirm within `timeout`, and the
        // exchange check after an error
        self.cfg.connect_timeout * 2
            + self.cfg.timeout
            + Duration::from_millis(10) * batch_len as u32
    }
}

/// The broker's soft error (a channel-level refusal), if `e` is one.
pub(super) fn soft(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(s) => Some(s.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// A short string property (at most 255 bytes; longer is cut at a
/// character boundary).
fn short(s: &str) -> ShortString {
    let mut cut = s.len().min(255);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s[..cut].into()
}

/// One word of a routing key from a value: `.`, `*`, `#`, `%`, white space
/// and control characters percent-encoded, so a key never adds a word or
/// a wildcard; an empty value is `_`.
pub fn escape_word(s: &str) -> String {
    if s.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '.' || c == '*' || c == '#' || c == '%' || c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{escape_word, short};

    #[test]
    fn a_value_is_one_word() {
        assert_eq!(escape_word("42"), "42");
        assert_eq!(escape_word("a.b*c#d e%"), "a%2Eb%2Ac%23d%20e%25");
        assert_eq!(escape_word(""), "_");
        assert_eq!(short(&"ü".repeat(200)).as_str().len(), 254);
    }
}
