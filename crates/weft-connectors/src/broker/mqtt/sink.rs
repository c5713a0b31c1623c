//! The `mqtt` sink: QoS 1 publishes, each written once its PUBACK came.
//!
//! Contract: every message carries the CloudEvents `id` user property =
//! the delivery's idempotency key (the same on every retry), and a
//! delivery is `Ok` only once the broker acknowledged it (PUBACK, reason
//! success or "no matching subscribers": MQTT keeps nothing for a topic
//! nobody subscribes to, unless `retain`). MQTT does not dedupe: a retry
//! after a timeout or a crash between the PUBACK and the settle publishes
//! a second copy under the same `id`, which consumers drop by that id
//! (weft's own `mqtt` source does). Never one input under two ids.
//!
//! A batch is published pipelined on one connection (every publish
//! queued, the PUBACKs matched to them by packet id within `timeout`).
//! The session is a clean one (nothing of a failed connection is sent
//! again by the client: weft retries it). Errors: a PUBACK that refuses
//! the message (not authorized, an invalid topic or payload), a topic the
//! template cannot fill and a message over the broker's maximum packet
//! size are permanent; a lost connection, a timeout and any other refusal
//! (quota, unspecified) retryable (the connection is opened again on the
//! next write).
//!
//! Properties (CloudEvents MQTT binding, MQTT 5 binary mode): user
//! properties `specversion`, `id`, `source`, `type`, `time` (the event's
//! own time), `subject` (the entity key), `x-correlation-id`,
//! `x-causation-id`, `traceparent`/`tracestate` when the event came with
//! one, and the configured `user_properties`; Content Type the format's
//! (`application/json`, `application/avro`, `application/x-protobuf`:
//! `datacontenttype`), Correlation Data the correlation id, Payload
//! Format Indicator 1 (UTF-8) for JSON, none for the binary formats.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use rumqttc::v5::ClientError;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{PubAck, PubAckReason, PublishProperties};
use tokio::sync::Mutex;

use super::config::MqttSinkConfig;
use super::{Link, Polled};
use crate::broker::{MQTT, outgoing_headers};
use crate::sink::{Delivery, Sink, SinkError, WriteResult, Written};

/// A connected (or connecting) `mqtt` sink.
pub struct MqttSink {
    system: String,
    cfg: MqttSinkConfig,
    client_id: String,
    link: Mutex<Option<Conn>>,
}

/// A connection and what the broker said of it.
struct Conn {
    link: Link,
    /// The broker's maximum packet size (CONNACK), if it named one.
    max_packet: Option<u32>,
}

/// One message ready to publish.
struct Message {
    topic: String,
    props: PublishProperties,
    body: Bytes,
}

impl MqttSink {
    /// Connect to the broker. An unreachable (or refusing) broker is not an
    /// error: the second value says why the destination is down (host and
    /// port, never the password) and the next write connects again.
    pub async fn connect(
        system: &str,
        cfg: MqttSinkConfig,
    ) -> Result<(MqttSink, Option<String>), String> {
        let client_id = cfg.client_id.clone().unwrap_or_else(|| {
            let r = uuid::Uuid::new_v4().simple().to_string();
            format!("weft-{system}-{}", &r[..8])
        });
        let sink = MqttSink {
            system: system.to_owned(),
            cfg,
            client_id,
            link: Mutex::new(None),
        };
        match sink.open().await {
            Ok(c) => {
                *sink.link.lock().await = Some(c);
                Ok((sink, None))
            }
            Err(why) => Ok((sink, Some(why))),
        }
    }

    /// A new connection, up once the broker's CONNACK came.
    async fn open(&self) -> Result<Conn, String> {
        let c = &self.cfg;
        let at = c.broker.at();
        let o = super::options(&c.broker, &self.client_id, c.keep_alive, c.connect_timeout);
        let mut link = Link::start(o, 256);
        let deadline = tokio::time::Instant::now() + c.connect_timeout;
        loop {
            match tokio::time::timeout_at(deadline, link.events.recv()).await {
                Err(_) => {
                    return Err(format!(
                        "cannot connect to MQTT at {at}: no answer within {:?}",
                        c.connect_timeout
                    ));
                }
                Ok(None) => return Err(format!("cannot connect to MQTT at {at}")),
                Ok(Some((_, Polled::Connected { max_packet, .. }))) => {
                    tracing::info!(sink = %self.system, client_id = %self.client_id, "publishing to MQTT at {at}");
                    return Ok(Conn { link, max_packet });
                }
                Ok(Some((_, Polled::Lost { why, .. }))) => {
                    return Err(format!("cannot connect to MQTT at {at}: {why}"));
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// The topic, properties and body of one delivery.
    fn message(&self, d: &Delivery, max_packet: Option<u32>) -> Result<Message, SinkError> {
        let topic = self
            .cfg
            .topic
            .render(d, escape_level)
            .map_err(|e| SinkError::permanent(format!("topic: {e}")))?;
        if topic.is_empty() || topic.len() > 65_535 || topic.starts_with('$') {
            return Err(SinkError::permanent(format!(
                "topic: `{topic}` is not a topic to publish to (1 to 65535 bytes, not starting with `$`)"
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
        let mut props = PublishProperties {
            // 1: UTF-8 text; Avro and Protobuf bodies are bytes
            payload_format_indicator: self.cfg.format.is_json().then_some(1),
            correlation_data: Some(Bytes::from(d.correlation_id.clone().into_bytes())),
            ..Default::default()
        };
        for (k, v) in outgoing_headers(MQTT, d, &source, &ty) {
            if k == MQTT.content_type {
                props.content_type = Some(self.cfg.format.content_type().to_owned());
            } else {
                props.user_properties.push((k, v));
            }
        }
        props
            .user_properties
            .extend(self.cfg.user_properties.iter().cloned());
        let body = self
            .cfg
            .format
            .encode(&d.payload)
            .map_err(|e| SinkError::permanent(format!("payload: {e}")))?;
        if let Some(max) = max_packet {
            // the packet's size, a little over: fixed header, topic, packet
            // id, properties, payload
            let props_len: usize = props
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 5)
                .sum::<usize>()
                + props.content_type.as_ref().map_or(0, |c| c.len() + 3)
                + d.correlation_id.len()
                + 3
                + 2;
            let size = 5 + 2 + topic.len() + 2 + 4 + props_len + body.len();
            if size > max as usize {
                return Err(SinkError::permanent(format!(
                    "a message of about {size} bytes is over the broker's maximum packet size ({max} bytes)"
                )));
            }
        }
        Ok(Message {
            topic,
            props,
            body: Bytes::from(body),
        })
    }

    async fn write_batch(&self, batch: &[Delivery]) -> Vec<WriteResult> {
        let at = self.cfg.broker.at();
        let mut guard = self.link.lock().await;
        // what happened while idle: a connection the event loop lost (and
        // is trying again) is replaced by a fresh one now
        if let Some(c) = guard.as_mut() {
            while let Ok((_, ev)) = c.link.events.try_recv() {
                if let Polled::Connected { max_packet, .. } = ev {
                    c.max_packet = max_packet;
                }
            }
            if c.link.current.load(Ordering::SeqCst) == 0 {
                *guard = None;
            }
        }
        if guard.is_none() {
            match self.open().await {
                Ok(c) => *guard = Some(c),
                Err(why) => {
                    return batch
                        .iter()
                        .map(|_| Err(SinkError::retryable(why.clone())))
                        .collect();
                }
            }
        }
        let Some(conn) = guard.as_mut() else {
            return batch
                .iter()
                .map(|_| Err(SinkError::retryable(format!("MQTT at {at}: not connected"))))
                .collect();
        };
        let mut results: Vec<Option<WriteResult>> = batch.iter().map(|_| None).collect();
        let mut msgs = Vec::with_capacity(batch.len());
        for (i, d) in batch.iter().enumerate() {
            match self.message(d, conn.max_packet) {
                Ok(m) => msgs.push((i, m)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        // queued, waiting for their packet id; then sent, waiting for the PUBACK
        let mut queued: VecDeque<usize> = VecDeque::new();
        let mut sent: HashMap<u16, usize> = HashMap::new();
        let mut next = 0;
        let mut waiting = msgs.len();
        let mut broken = None;
        while waiting > 0 {
            while next < msgs.len() {
                let (i, m) = &msgs[next];
                match conn.link.client.try_publish_with_properties(
                    m.topic.clone(),
                    QoS::AtLeastOnce,
                    self.cfg.retain,
                    m.body.clone(),
                    m.props.clone(),
                ) {
                    Ok(()) => {
                        queued.push_back(next);
                        next += 1;
                    }
                    // the request channel is full: first take events
                    Err(ClientError::TryRequest(_)) if !queued.is_empty() || !sent.is_empty() => {
                        break;
                    }
                    Err(e) => {
                        results[*i] = Some(Err(SinkError::retryable(format!(
                            "MQTT publish to `{}`: {e}",
                            m.topic
                        ))));
                        waiting -= 1;
                        next += 1;
                    }
                }
            }
            if waiting == 0 {
                break;
            }
            let ev = match tokio::time::timeout_at(deadline, conn.link.events.recv()).await {
                Err(_) => {
                    broken = Some(format!(
                        "no PUBACK from MQTT at {at} within {:?}",
                        self.cfg.timeout
                    ));
                    break;
                }
                Ok(None) => {
                    broken = Some(format!("MQTT at {at}: the client stopped"));
                    break;
                }
                Ok(Some((_, ev))) => ev,
            };
            match ev {
                Polled::Sent(pkid) => {
                    if let Some(n) = queued.pop_front() {
                        sent.insert(pkid, n);
                    }
                }
                Polled::PubAck(a) => {
                    if let Some(n) = sent.remove(&a.pkid) {
                        let (i, m) = &msgs[n];
                        results[*i] = Some(outcome(&a, &m.topic));
                        waiting -= 1;
                    }
                }
                Polled::Lost { why, .. } => {
                    broken = Some(format!("MQTT at {at}: {why}"));
                    break;
                }
                Polled::Connected { max_packet, .. } => conn.max_packet = max_packet,
                Polled::Publish(_) | Polled::SubAck(_) => {}
            }
        }
        if broken.is_some() {
            // a fresh connection for the next write: nothing of this one
            // (a late PUBACK, a queued publish) can be mistaken for it
            *guard = None;
        }
        let why = broken.unwrap_or_else(|| format!("MQTT at {at}: no PUBACK"));
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(SinkError::retryable(why.clone()))))
            .collect()
    }
}

/// What a PUBACK says of one message.
fn outcome(a: &PubAck, topic: &str) -> WriteResult {
    match a.reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(Written::default()),
        PubAckReason::NotAuthorized => Err(SinkError::permanent(format!(
            "the broker refused the message to `{topic}`: not authorized (its ACL)"
        ))),
        PubAckReason::TopicNameInvalid | PubAckReason::PayloadFormatInvalid => {
            Err(SinkError::permanent(format!(
                "the broker refused the message to `{topic}`: {:?}",
                a.reason
            )))
        }
        other => Err(SinkError::retryable(format!(
            "the broker did not take the message to `{topic}`: {other:?}"
        ))),
    }
}

impl Sink for MqttSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(self.write_batch(batch))
    }

    fn max_write_time(&self, batch_len: usize) -> Duration {
        // connecting, the publishes and every PUBACK within `timeout`
        self.cfg.connect_timeout + self.cfg.timeout + Duration::from_millis(10) * batch_len as u32
    }
}

/// One topic level from a value: `/`, `+`, `#`, `%`, white space and
/// control characters (NUL too) percent-encoded, so a value never adds a
/// level or a wildcard; an empty value is `_`.
pub fn escape_level(s: &str) -> String {
    if s.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '/' || c == '+' || c == '#' || c == '%' || c.is_whitespace() || c.is_control() {
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
    use super::*;
    use rumqttc::v5::mqttbytes::v5::PubAck;

    #[test]
    fn a_value_is_one_level() {
        assert_eq!(escape_level("42"), "42");
        assert_eq!(escape_level("a/b+c#d e%\0"), "a%2Fb%2Bc%23d%20e%25%00");
        assert_eq!(escape_level(""), "_");
    }

    #[test]
    fn pubacks_are_classified() {
        let ack = |reason| PubAck {
            pkid: 1,
            reason,
            properties: None,
        };
        assert!(outcome(&ack(PubAckReason::Success), "t").is_ok());
        assert!(outcome(&ack(PubAckReason::NoMatchingSubscribers), "t").is_ok());
        let e = outcome(&ack(PubAckReason::NotAuthorized), "t").unwrap_err();
        assert_eq!(e.kind, weft_core::ErrorKind::Permanent);
        assert!(e.message.contains("not authorized"), "{e}");
        let e = outcome(&ack(PubAckReason::QuotaExceeded), "t").unwrap_err();
        assert_eq!(e.kind, weft_core::ErrorKind::Retryable);
    }
}
