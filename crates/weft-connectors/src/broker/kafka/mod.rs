//! Kafka: the `kafka` source (a consumer group, offsets committed only
//! after the commit) and the `kafka` sink (an idempotent producer, each
//! delivery written once the brokers acknowledged it), on rdkafka and the
//! librdkafka it bundles (cargo feature `kafka`).
//!
//! - [`config`]: the settings, validated with their document paths.
//! - [`source`]: read a batch, `ingest` it, then commit each partition's
//!   next offset (synchronously); ids by position
//!   (`<topic>/<partition>/<offset>`) unless the message names one.
//! - [`sink`]: every delivery of a batch produced, then every delivery
//!   report awaited; each result is its report.
//!
//! ## How a message maps to an event (both ends)
//!
//! The CloudEvents Kafka protocol binding, binary content mode:
//!
//! | Kafka | event |
//! |---|---|
//! | value | the payload, one JSON value (UTF-8) |
//! | header `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_time`, `ce_subject` | the CloudEvents attributes |
//! | header `content-type` | `datacontenttype`; `application/cloudevents+json` makes the value a structured CloudEvent, unwrapped |
//! | headers `x-correlation-id`, `x-causation-id` | weft's correlation id and the id of the event that caused the write |
//! | headers `traceparent`, `tracestate` | the W3C trace context |
//! | key | the sink writes the entity key; the source makes it the event's `subject` when there is no `ce_subject` (a flow's `key: $event.subject` takes it) |
//! | timestamp | the event's time when there is no `ce_time` |
//!
//! A message without a value (a tombstone), whose value is not JSON, is
//! over `max_message_bytes` or is a structured CloudEvent without `data`
//! is a bad record: a DLQ entry naming the topic, partition and offset and
//! the reason, committed past once that entry is stored.

pub mod config;
pub mod sink;
pub mod source;

pub use config::{KafkaSinkConfig, KafkaSourceConfig};
pub use sink::KafkaSink;
pub use source::KafkaSource;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The settings every client weft makes shares: the brokers, a client id
/// naming the system, how long a connection may take to set up, librdkafka's
/// log level following weft's.
fn client_config(brokers: &str, client_id: &str, connect_timeout: Duration) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        .set(
            "socket.connection.setup.timeout.ms",
            connect_timeout.as_millis().max(1000).to_string(),
        )
        // the first reconnect soon after a broker went away, then backing
        // off to 10 s at most
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "10000");
    c
}

/// Whether an error code means the request or the message itself is
/// refused, so that sending it again cannot succeed.
fn permanent_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::UnknownTopicOrPartition
            | C::UnknownTopic
            | C::UnknownPartition
            | C::UnknownTopicId
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
            | C::InvalidRequiredAcks
            | C::InvalidArgument
    )
}

/// The error's code, for messages: `MessageSizeTooLarge`.
fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    e.rdkafka_error_code()
}

/// `weft check` for a Kafka source: ask the brokers for the cluster's
/// metadata and check that every topic is there.
pub(crate) async fn probe_source(c: &KafkaSourceConfig) -> crate::probe::Finding {
    use crate::probe::Finding;
    let cfg = c.clone();
    let found = tokio::task::spawn_blocking(move || {
        let mut cc = client_config(&cfg.brokers, "weft-check", cfg.connect_timeout);
        cc.set("group.id", &cfg.group);
        let consumer: BaseConsumer = cc.create().map_err(|e| e.to_string())?;
        let md = consumer
            .fetch_metadata(None, cfg.connect_timeout)
            .map_err(|e| format!("cannot reach the brokers at {}: {e}", cfg.brokers))?;
        let brokers = md.brokers().len();
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for t in &cfg.topics {
            match md
                .topics()
                .iter()
                .find(|m| m.name() == t && m.error().is_none())
            {
                Some(m) => found.push(format!("`{t}` ({} partitions)", m.partitions().len())),
                None => missing.push(format!("`{t}`")),
            }
        }
        Ok::<_, String>((brokers, found, missing))
    })
    .await;
    match found {
        Ok(Ok((brokers, found, missing))) if missing.is_empty() => Finding::ok(format!(
            "connected to {} ({brokers} brokers); topics {}; group `{}`",
            c.brokers,
            found.join(", "),
            c.group
        )),
        Ok(Ok((brokers, _, missing))) => Finding::warn(format!(
            "connected to {} ({brokers} brokers); topics {} do not exist yet: weft consumes them once they are created",
            c.brokers,
            missing.join(", ")
        )),
        Ok(Err(e)) => Finding::fail(e),
        Err(e) => Finding::fail(format!("the metadata request failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_permanent_and_the_rest_retryable() {
        for c in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert!(permanent_code(c), "{c:?}");
        }
        for c in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
        ] {
            assert!(!permanent_code(c), "{c:?}");
        }
    }
}
