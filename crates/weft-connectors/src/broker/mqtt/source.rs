//! The `mqtt` source: a QoS 1 subscriber on a persistent session, manual
//! acks.
//!
//! Contract (the broker contract of [`crate::broker`]): the messages that
//! arrive together (at least one, up to `batch`, until a 5 ms pause; the
//! broker sends at most `receive_maximum` unacknowledged) are handed to
//! `ingest` as one batch, and each is acknowledged (PUBACK) only after
//! `ingest` returned `Ok`. A batch the store does not take is held,
//! unacknowledged, and offered again with backoff. MQTT has no negative
//! ack: on shutdown a held batch is simply not acked, and the broker sends
//! it again at the next connection of the session.
//!
//! The session is persistent (`clean_start` false, `session_expiry`, 7
//! days by default) under a stable client id (`weft-<system>`): while weft
//! is down the broker keeps the subscriptions and queues the QoS 1
//! messages that arrive (Mosquitto keeps at most `max_queued_messages` per
//! client, 1000 by default: raise it for long outages), and sends the
//! unacked ones again when weft is back (with DUP set). The filters are
//! subscribed again at every connection (retained messages only for a new
//! subscription). A filter removed from the config stays in the session
//! until it expires or the client id changes.
//!
//! Ids: MQTT has no stable message id (packet ids are per connection and
//! reused as soon as a message is acked), so an event's id comes from the
//! message: the CloudEvents `id` user property (with `source`: the MQTT
//! binding names user properties after the attributes; `ce-id` is read
//! too), or in structured mode the body's `id`. A message without one:
//! `event_id: auto` (default) sends it to the DLQ with the reason and the
//! way out; `event_id: {field: .id}` takes a string or number of the
//! payload; `event_id: content` names it by a hash of its topic and
//! payload (identical messages on one topic are then one event: right for
//! state, wrong for "one more click" events). The journal drops an id it
//! has (`Dedupe::Id`), so a redelivered message is stored once.
//!
//! An ack is sent only on the connection the message came on: after a
//! reconnect the broker sends the unacked messages again and those copies
//! are acked (the journal drops them). A lost connection: the event loop
//! connects again (backoff up to 5 s; after 30 s of failures in a row the
//! source stops and its supervisor reports it down and starts it again).
//! A refused login or a refused subscription stops it with the reason.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Publish, RetainForwardRule, SubscribeReasonCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::config::{MqttEventId, MqttSourceConfig};
use super::{Link, Polled};
use crate::broker::{Attributes, CORRELATION_HEADER, Decoder, EventId, Incoming, MQTT, NATS};
use crate::source::{Batch, Ingest, Record, Source, SourceError};

/// A running `mqtt` source.
pub struct MqttSource {
    system: String,
    cfg: MqttSourceConfig,
}

/// How long connecting may fail in a row before the source stops.
const FAILING_FOR: Duration = Duration::from_secs(30);

/// A batch is what arrives without a pause this long (or `batch`
/// messages).
const GATHER: Duration = Duration::from_millis(5);

/// A message and the connection it came on.
type Msg = (u64, Publish);

impl MqttSource {
    pub fn new(system: &str, cfg: MqttSourceConfig) -> Self {
        MqttSource {
            system: system.to_owned(),
            cfg,
        }
    }

    fn err(&self, message: String) -> SourceError {
        SourceError {
            system: self.system.clone(),
            message,
        }
    }

    async fn run(
        self,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let decoder = Decoder {
            format: self.cfg.format.clone(),
            max_bytes: self.cfg.max_message_bytes,
            event_id: EventId::Auto,
            default_source: format!("weft:{}/mqtt", self.system),
            default_type: self.cfg.event_type.clone(),
        };
        let c = &self.cfg;
        let mut o = super::options(&c.broker, &c.client_id, c.keep_alive, c.connect_timeout);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(
            u32::try_from(c.session_expiry.as_secs()).unwrap_or(u32::MAX - 1),
        ));
        o.set_receive_maximum(Some(c.receive_maximum));
        o.set_manual_acks(true);
        let mut link = Link::start(o, c.receive_maximum as usize + 64);
        let mut state = State {
            failing: Some(Instant::now()),
        };
        let ended = self
            .consume(&mut link, &mut state, &decoder, &*ingest, &shutdown)
            .await;
        link.close().await;
        ended
    }

    /// Hand batches over until shutdown or a fatal error.
    async fn consume(
        &self,
        link: &mut Link,
        state: &mut State,
        decoder: &Decoder,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Result<(), SourceError> {
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                ev = link.events.recv() => ev,
            };
            let Some(first) = self.on_event(link, state, ev).await? else {
                continue;
            };
            let mut batch = vec![first];
            // what arrives with it: until `batch` or a pause of `GATHER`
            while batch.len() < self.cfg.batch {
                match tokio::time::timeout(GATHER, link.events.recv()).await {
                    Ok(ev) => {
                        if let Some(m) = self.on_event(link, state, ev).await? {
                            batch.push(m);
                        }
                    }
                    Err(_) => break,
                }
            }
            if !self.hand_over(decoder, &batch, ingest, shutdown).await {
                return Ok(());
            }
            let mut stale = 0;
            for (conn, p) in &batch {
                // only on the connection it came on: after a reconnect
                // the broker sends it again, and that copy is acked
                if *conn != link.current.load(Ordering::SeqCst) {
                    stale += 1;
                    continue;
                }
                if let Err(e) = link.client.ack(p).await {
                    tracing::warn!(source = %self.system, error = %e, "MQTT ack not sent; the message will come again");
                }
            }
            if stale > 0 {
                tracing::info!(source = %self.system, messages = stale, "stored messages of a lost connection not acked; the broker sends them again and the store drops the copies");
            }
        }
    }

    /// A message, or `None` after handling another event (a connection, a
    /// SUBACK, a lost connection).
    async fn on_event(
        &self,
        link: &Link,
        state: &mut State,
        ev: Option<(u64, Polled)>,
    ) -> Result<Option<Msg>, SourceError> {
        let at = self.cfg.broker.at();
        let Some((conn, ev)) = ev else {
            return Err(self.err("the MQTT client stopped".into()));
        };
        match ev {
            Polled::Publish(p) => return Ok(Some((conn, p))),
            Polled::Connected {
                session_present, ..
            } => {
                state.failing = None;
                tracing::info!(
                    source = %self.system, client_id = %self.cfg.client_id, session_present,
                    "subscribed to MQTT at {at}"
                );
                let filters = self.cfg.topics.iter().map(|t| {
                    let mut f = Filter::new(t.clone(), QoS::AtLeastOnce);
                    f.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
                    f
                });
                if let Err(e) = link.client.subscribe_many(filters).await {
                    return Err(self.err(format!("cannot subscribe: {e}")));
                }
            }
            Polled::SubAck(s) => {
                for (t, code) in self.cfg.topics.iter().zip(&s.return_codes) {
                    match code {
                        SubscribeReasonCode::Success(QoS::AtLeastOnce | QoS::ExactlyOnce) => {}
                        SubscribeReasonCode::Success(QoS::AtMostOnce) => {
                            return Err(self.err(format!(
                                "MQTT at {at} granted QoS 0 for `{t}`: messages would not be kept until weft stored them (the broker's `max_qos`?)"
                            )));
                        }
                        other => {
                            return Err(self.err(format!(
                                "MQTT at {at} refused the subscription to `{t}`: {other:?}"
                            )));
                        }
                    }
                }
            }
            Polled::Lost { why, refused } => {
                if refused {
                    return Err(self.err(format!("MQTT at {at}: {why}")));
                }
                let since = *state.failing.get_or_insert_with(Instant::now);
                if since.elapsed() > FAILING_FOR {
                    return Err(self.err(format!(
                        "MQTT at {at}: {why} (failing for {}s)",
                        FAILING_FOR.as_secs()
                    )));
                }
                tracing::warn!(source = %self.system, error = %why, "MQTT connection lost; connecting again");
            }
            Polled::Sent(_) | Polled::PubAck(_) => {}
        }
        Ok(None)
    }

    /// Ingest `msgs` as one batch; `false` when the source is stopping
    /// with the batch not stored (the broker sends it again).
    async fn hand_over(
        &self,
        decoder: &Decoder,
        msgs: &[Msg],
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut pause = Duration::from_millis(100);
        loop {
            let batch = Batch {
                records: msgs.iter().map(|(_, p)| self.record(decoder, p)).collect(),
                checkpoint: None,
            };
            match ingest.ingest(batch).await {
                Ok(r) => {
                    tracing::debug!(
                        source = %self.system, accepted = r.accepted, duplicates = r.duplicates,
                        "MQTT batch stored"
                    );
                    return true;
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        return false;
                    }
                    tracing::warn!(
                        source = %self.system, error = %e, messages = msgs.len(),
                        "the store did not take the batch; holding the messages and trying again"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One message as a record.
    fn record(&self, decoder: &Decoder, p: &Publish) -> Record {
        let topic = String::from_utf8_lossy(&p.topic);
        let props = p.properties.as_ref();
        let get = |name: &str| -> Option<String> {
            let props = props?;
            if name == MQTT.content_type {
                return props.content_type.clone();
            }
            let u = &props.user_properties;
            let found = u
                .iter()
                .find(|(k, _)| k == name)
                .or_else(|| u.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
                .map(|(_, v)| v.clone());
            if found.is_none() && name == CORRELATION_HEADER {
                return props
                    .correlation_data
                    .as_ref()
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned);
            }
            found
        };
        let attributes =
            Attributes::from_headers(MQTT, get).or(Attributes::from_headers(NATS, get));
        let location = match &attributes.id {
            Some(id) => format!("mqtt topic {topic} (id {id})"),
            None => format!("mqtt topic {topic}"),
        };
        let mut h = Sha256::new();
        h.update(p.topic.as_ref());
        h.update([0]);
        h.update(&p.payload);
        let position_id = format!("{topic}:sha256:{}", hex::encode(&h.finalize()[..16]));
        let structured = attributes.content_type.as_deref().is_some_and(|c| {
            c.to_ascii_lowercase()
                .starts_with("application/cloudevents+json")
        });
        let mut incoming = Incoming {
            position_id,
            message_id: None,
            location,
            subject: &topic,
            stored_at: None,
            attributes,
        };
        let named = incoming.attributes.id.is_some() || structured;
        let fits = p.payload.len() <= self.cfg.max_message_bytes;
        match &self.cfg.event_id {
            MqttEventId::Content => {}
            _ if named || !fits => {}
            MqttEventId::Auto => {
                return decoder.reject(
                    &incoming,
                    &p.payload,
                    "the message has no id (no CloudEvents `id` user property; MQTT has no message id of its own): set one where it is published, or `event_id: {field: .id}` to take it from the payload, or `event_id: content` to name such messages by a hash of topic and payload",
                );
            }
            MqttEventId::Field(path) => {
                // not JSON: the decoder says so
                if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                    let mut at = &v;
                    for seg in path {
                        at = at.get(seg).unwrap_or(&Value::Null);
                    }
                    match at {
                        Value::String(s) if !s.is_empty() => incoming.message_id = Some(s.clone()),
                        Value::Number(n) => incoming.message_id = Some(n.to_string()),
                        other => {
                            return decoder.reject(
                                &incoming,
                                &p.payload,
                                &format!(
                                    "the message has no id: no CloudEvents `id` user property, and the payload has {} at `.{}` (`event_id: {{field: ...}}`), not a string or number",
                                    crate::sink::kind_of(other),
                                    path.join(".")
                                ),
                            );
                        }
                    }
                }
            }
        }
        decoder.record(&incoming, &p.payload)
    }
}

/// What the source keeps between events.
struct State {
    /// Since when connecting has failed without a success between.
    failing: Option<Instant>,
}

impl Source for MqttSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).run(ingest, shutdown))
    }
}
