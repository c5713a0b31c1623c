//! MQTT 5: the `mqtt` source (a QoS 1 subscriber on a persistent session,
//! manual acks) and the `mqtt` sink (QoS 1 publishes, each written once
//! its PUBACK came), on `rumqttc`'s v5 client (cargo feature `mqtt`).
//!
//! - [`config`]: the settings, validated with their document paths.
//! - [`source`]: take what has arrived (up to `batch`), `ingest` it, PUBACK
//!   it after the commit; ids from the message (the CloudEvents `id` user
//!   property), a payload field or a content hash, never from the packet
//!   id (the broker reuses those).
//! - [`sink`]: publish a batch pipelined, each result the broker's PUBACK.
//!
//! MQTT 5 rather than 3.1.1: the CloudEvents MQTT binding's binary mode,
//! the correlation id and the trace context need user properties, and a
//! receive maximum bounds what a consumer holds unacknowledged. Mosquitto
//! 2 speaks both.
//!
//! One task per connection drives rumqttc's event loop (it must be polled
//! for pings, acks and reconnects to happen) and reports what happened
//! over a channel; the source and the sink read that channel.

pub mod config;
pub mod sink;
pub mod source;

pub use config::{MqttSinkConfig, MqttSourceConfig};
pub use sink::MqttSink;
pub use source::MqttSource;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAck, Publish, SubAck};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use tokio::sync::mpsc;

use config::Broker;

/// The largest packet weft accepts from the broker: MQTT's own maximum.
/// The broker drops (never sends) a message larger than a client's
/// maximum, so weft sets none of its own: an oversized message comes in
/// and goes to the DLQ (`max_message_bytes`) instead of vanishing.
const MAX_PACKET: u32 = 268_435_460;

/// What the event loop task saw, with the number of the connection it
/// happened on (1, 2, ... for each CONNACK; 0 before the first).
#[derive(Debug)]
pub(crate) enum Polled {
    Connected {
        session_present: bool,
        max_packet: Option<u32>,
    },
    /// A message from the broker (a subscriber's).
    Publish(Publish),
    SubAck(SubAck),
    /// A publish of ours went out with this packet id (in the order the
    /// requests were made).
    Sent(u16),
    PubAck(PubAck),
    /// The connection failed or went away; the task connects again after a
    /// pause. `refused` when the broker said no (login, client id).
    Lost {
        why: String,
        refused: bool,
    },
}

/// A client, its event loop task and what the task reports.
pub(crate) struct Link {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<(u64, Polled)>,
    /// The connection now up (0 while down): an ack is sent only for a
    /// message of this connection.
    pub current: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The client options for `broker`.
pub(crate) fn options(
    broker: &Broker,
    client_id: &str,
    keep_alive: Duration,
    connect_timeout: Duration,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    o.set_keep_alive(keep_alive);
    o.set_connection_timeout(connect_timeout.as_secs().max(1));
    o.set_max_packet_size(Some(MAX_PACKET));
    if let Some(u) = &broker.username {
        o.set_credentials(u.clone(), broker.password.clone().unwrap_or_default());
    }
    o
}

impl Link {
    /// Start the event loop task; it connects at once, and again after a
    /// failure (pauses from 100 ms doubling to 5 s).
    pub fn start(options: MqttOptions, capacity: usize) -> Link {
        let (client, mut el) = AsyncClient::new(options, capacity);
        let (tx, events) = mpsc::unbounded_channel();
        let current = Arc::new(AtomicU64::new(0));
        let now = current.clone();
        let task = tokio::spawn(async move {
            let mut conn = 0u64;
            let mut closing = false;
            let mut pause = Duration::from_millis(100);
            loop {
                let polled = match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => {
                        conn += 1;
                        now.store(conn, Ordering::SeqCst);
                        pause = Duration::from_millis(100);
                        Polled::Connected {
                            session_present: c.session_present,
                            max_packet: c.properties.and_then(|p| p.max_packet_size),
                        }
                    }
                    Ok(_) if closing => continue,
                    Ok(Event::Incoming(Packet::Publish(p))) => Polled::Publish(p),
                    Ok(Event::Incoming(Packet::SubAck(s))) => Polled::SubAck(s),
                    Ok(Event::Incoming(Packet::PubAck(a))) => Polled::PubAck(a),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Polled::Sent(pkid),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        // the broker closes the connection once it has
                        // read the DISCONNECT, so everything before it
                        // (acks) too: wait for that (a new connection
                        // with this client id could otherwise take the
                        // session over first, dropping unread acks)
                        now.store(0, Ordering::SeqCst);
                        closing = true;
                        continue;
                    }
                    Ok(_) => continue,
                    Err(_) if closing => return,
                    Err(e) => {
                        now.store(0, Ordering::SeqCst);
                        let refused = matches!(
                            &e,
                            ConnectionError::ConnectionRefused(_)
                                | ConnectionError::MqttState(StateError::ConnFail { .. })
                        );
                        if tx
                            .send((
                                conn,
                                Polled::Lost {
                                    why: describe(&e),
                                    refused,
                                },
                            ))
                            .is_err()
                        {
                            return;
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                if tx.send((conn, polled)).is_err() {
                    return;
                }
            }
        });
        Link {
            client,
            events,
            current,
            task: Some(task),
        }
    }

    /// Send DISCONNECT after what is queued (acks) and wait (2 s at most)
    /// until the broker closed the connection: it has then read every ack
    /// before it. The broker keeps a persistent session.
    pub async fn close(mut self) {
        if tokio::time::timeout(Duration::from_millis(500), self.client.disconnect())
            .await
            .is_ok()
            && let Some(t) = self.task.take()
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

/// A connection error in words (the reason code of a refusal).
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code)
        | ConnectionError::MqttState(StateError::ConnFail { reason: code }) => {
            let hint = match code {
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                    ": check the user and password in the URL"
                }
                ConnectReturnCode::ClientIdentifierNotValid => ": check `client_id`",
                _ => "",
            };
            format!("the broker refused the connection ({code:?}){hint}")
        }
        ConnectionError::Timeout(_) => "no answer from the broker in time".into(),
        other => other.to_string(),
    }
}

/// `weft check` for an MQTT source or sink: connect with a client id of
/// its own (`weft-check-<pid>`, a clean session, so the running hub's
/// persistent session is not taken over) and wait for the CONNACK.
pub(crate) async fn probe(
    broker: &Broker,
    keep_alive: Duration,
    connect_timeout: Duration,
) -> crate::probe::Finding {
    use crate::probe::Finding;
    let at = format!("{}:{}", broker.host, broker.port);
    let id = format!("weft-check-{}", std::process::id());
    let mut o = options(broker, &id, keep_alive, connect_timeout);
    o.set_clean_start(true);
    let mut link = Link::start(o, 16);
    let deadline = tokio::time::sleep(connect_timeout.max(Duration::from_secs(1)));
    tokio::pin!(deadline);
    let out = loop {
        tokio::select! {
            _ = &mut deadline => break Finding::fail(format!("no CONNACK from {at} within {connect_timeout:?}")),
            ev = link.events.recv() => match ev {
                Some((_, Polled::Connected { max_packet, .. })) => break Finding::ok(format!(
                    "connected to {at}{}",
                    max_packet.map(|m| format!("; the broker takes messages up to {m} bytes")).unwrap_or_default()
                )),
                Some((_, Polled::Lost { why, .. })) => break Finding::fail(format!("cannot connect to {at}: {why}")),
                Some(_) => continue,
                None => break Finding::fail(format!("cannot connect to {at}: the client stopped")),
            }
        }
    };
    link.close().await;
    out
}
