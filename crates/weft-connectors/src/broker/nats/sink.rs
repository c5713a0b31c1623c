//! The `nats` sink: JetStream publish, one message per delivery.
//!
//! Contract: every message carries `Nats-Msg-Id` = the delivery's
//! idempotency key, and a delivery is `Ok` only once the stream acked it
//! (stored; replicated when the stream is). A retry after a timeout or a
//! crash publishes the same id again, and the stream's duplicate window
//! (`duplicate_window`, 2 minutes by default) drops it: the ack says
//! `duplicate` and counts as written. A retry later than the window stores
//! a second copy with the same id; consumers that dedupe by `Nats-Msg-Id`
//! or `ce-id` still see one event.
//!
//! A batch is published pipelined (every message sent, then every ack
//! awaited), so a batch costs one round trip, not one per message; its
//! results are per message. Errors: no stream for the subject (a publish
//! answered "no responders" while JetStream's stream list has no stream
//! for it either: a server that is stopping or starting answers "no
//! responders" too, and that is retryable), a message
//! over the server's or the stream's size limit, and a subject a value made
//! invalid are permanent; timeouts, a lost connection and other server
//! errors (a full stream with `discard: new`) are retryable. A permission
//! violation is reported by the server out of band and surfaces as a
//! timeout (retryable, logged by the client).
//!
//! Headers (CloudEvents NATS binding, binary mode): `ce-specversion`,
//! `ce-id` (the idempotency key), `ce-source`, `ce-type`, `ce-time` (the
//! event's own time), `ce-subject` (the entity key), `Content-Type`,
//! `x-correlation-id`, `x-causation-id`, `traceparent`/`tracestate` when the
//! event came with one, and the configured `headers`.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{HeaderMap, jetstream::context::PublishAckFuture};
use bytes::Bytes;
use futures::future::BoxFuture;

use super::config::NatsSinkConfig;
use crate::broker::{NATS, outgoing_headers};
use crate::sink::{Delivery, Sink, SinkError, WriteResult, Written};

/// A connected (or connecting) `nats` sink.
pub struct NatsSink {
    system: String,
    cfg: NatsSinkConfig,
    js: jetstream::Context,
}

/// JetStream's "message size exceeds maximum allowed" (a stream's
/// `max_msg_size`).
const MESSAGE_TOO_LARGE: u64 = 10054;

impl NatsSink {
    /// Connect to the server. The client connects in the background, so an
    /// unreachable server is not an error: the second value says why the
    /// destination is down (naming host and port), and the first write after
    /// it is reachable goes through. A reachable server without a stream for
    /// the subject is an error (with `check_stream`).
    pub async fn connect(
        system: &str,
        cfg: NatsSinkConfig,
    ) -> Result<(NatsSink, Option<String>), String> {
        let addrs = super::addrs(&cfg.url)?;
        let hosts = super::hosts(&addrs);
        let client = async_nats::connect_with_options(
            addrs,
            super::options(system, cfg.token.as_ref(), cfg.connect_timeout)
                .retry_on_initial_connect(),
        )
        .await
        .map_err(|e| format!("NATS at {hosts}: {e}"))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.timeout);
        let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
        while client.connection_state() != async_nats::connection::State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sink = NatsSink {
            system: system.to_owned(),
            cfg,
            js,
        };
        if client.connection_state() != async_nats::connection::State::Connected {
            return Ok((sink, Some(format!("cannot reach NATS at {hosts}"))));
        }
        if sink.cfg.check_stream {
            sink.check_stream().await?;
        }
        Ok((sink, None))
    }

    /// Some stream must capture the subject (placeholders as `*` when they
    /// are whole tokens; otherwise only the tokens before the first one).
    async fn check_stream(&self) -> Result<(), String> {
        let t = &self.cfg.subject;
        let pattern = if t.placeholders_are_tokens('.') {
            t.with_placeholders("*")
        } else {
            let fixed = t.with_placeholders("\u{0}");
            let head: Vec<&str> = fixed
                .split('.')
                .take_while(|s| !s.contains('\u{0}'))
                .collect();
            if head.is_empty() {
                return Ok(());
            }
            format!("{}.>", head.join("."))
        };
        match self.js.stream_by_subject(pattern.clone()).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let text = e.to_string();
                if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound {
                    Err(format!(
                        "no JetStream stream captures subject `{pattern}`: create one (`nats stream add --subjects '{pattern}'`), or set `check_stream: false`"
                    ))
                } else {
                    // the server answered something else: leave it to the writes
                    tracing::warn!(sink = %self.system, error = %text, "cannot check the stream for `{pattern}`");
                    Ok(())
                }
            }
        }
    }

    /// The message of one delivery: its subject, headers and body.
    fn message(&self, d: &Delivery) -> Result<(String, HeaderMap, Bytes), SinkError> {
        let subject = self
            .cfg
            .subject
            .render(d, escape_token)
            .map_err(|e| SinkError::permanent(format!("subject: {e}")))?;
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
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", d.idempotency_key.as_str());
        for (k, v) in outgoing_headers(NATS, d, &source, &ty) {
            h.insert(k.as_str(), v.as_str());
        }
        if !self.cfg.format.is_json() {
            h.insert(NATS.content_type, self.cfg.format.content_type());
        }
        for (k, v) in &self.cfg.headers {
            h.insert(k.as_str(), v.as_str());
        }
        let body = self
            .cfg
            .format
            .encode(&d.payload)
            .map_err(|e| SinkError::permanent(format!("payload: {e}")))?;
        Ok((subject, h, Bytes::from(body)))
    }

    async fn write_batch(&self, batch: &[Delivery]) -> Vec<WriteResult> {
        // send every publish, then wait for every ack
        let mut pending: Vec<(Option<String>, Result<PublishAckFuture, SinkError>)> =
            Vec::with_capacity(batch.len());
        for d in batch {
            pending.push(match self.message(d) {
                Ok((subject, headers, body)) => {
                    let sent = self
                        .js
                        .publish_with_headers(subject.clone(), headers, body)
                        .await
                        .map_err(classify);
                    (Some(subject), sent)
                }
                Err(e) => (None, Err(e)),
            });
        }
        let mut out = Vec::with_capacity(batch.len());
        // per subject: whether JetStream says no stream captures it
        let mut no_stream: Vec<(String, bool)> = Vec::new();
        for (subject, p) in pending {
            out.push(match p {
                Ok(ack) => match ack.await {
                    Ok(a) => {
                        if a.duplicate {
                            tracing::debug!(sink = %self.system, stream = %a.stream, "publish was a duplicate: already stored");
                        }
                        Ok(Written::default())
                    }
                    Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                        let subject = subject.unwrap_or_default();
                        let known = no_stream.iter().find(|(s, _)| *s == subject).map(|x| x.1);
                        let missing = match known {
                            Some(m) => m,
                            None => {
                                let m = self.stream_missing(&subject).await;
                                no_stream.push((subject.clone(), m));
                                m
                            }
                        };
                        Err(if missing {
                            SinkError::permanent(format!(
                                "NATS publish: no JetStream stream captures subject `{subject}`"
                            ))
                        } else {
                            // a server stopping or starting answers "no
                            // responders" while its JetStream is down
                            SinkError::retryable(format!(
                                "NATS publish to `{subject}`: no responders (JetStream not answering)"
                            ))
                        }
                        .with_source(e))
                    }
                    Err(e) => Err(classify(e)),
                },
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Whether JetStream itself says no stream captures `subject` (a
    /// publish is answered "no responders" also while a server shuts down
    /// or starts, when JetStream does not answer at all).
    async fn stream_missing(&self, subject: &str) -> bool {
        matches!(
            self.js.stream_by_subject(subject.to_owned()).await,
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound
        )
    }
}

impl Sink for NatsSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(self.write_batch(batch))
    }

    fn max_write_time(&self, batch_len: usize) -> Duration {
        // the acks are awaited one after another, each within `timeout`
        // of its send; a whole batch within twice that, plus the sends
        self.cfg.timeout * 2 + Duration::from_millis(10) * batch_len as u32
    }
}

/// Retryable or permanent, by what the server or the client said.
fn classify(e: jetstream::context::PublishError) -> SinkError {
    let kind = e.kind();
    let msg = format!("NATS publish: {e}");
    let err = match kind {
        // checked against the stream list by the caller
        PublishErrorKind::StreamNotFound => SinkError::retryable(msg),
        PublishErrorKind::MaxPayloadExceeded => SinkError::permanent(msg),
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => SinkError::retryable(msg),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            SinkError::permanent(msg)
        }
        PublishErrorKind::Other => {
            use std::error::Error as _;
            let code = e
                .source()
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .map(|j| j.error_code().0);
            match code {
                Some(c) if c == MESSAGE_TOO_LARGE => SinkError::permanent(msg),
                Some(10059) => SinkError::permanent(msg),
                _ if msg.contains("invalid subject") || msg.contains("InvalidSubject") => {
                    SinkError::permanent(msg)
                }
                _ => SinkError::retryable(msg),
            }
        }
    };
    err.with_source(e)
}

/// One subject token from a value: `.`, `*`, `>`, `%`, white space and
/// control characters percent-encoded, so a key never adds a token or a
/// wildcard; an empty value is `_`.
pub fn escape_token(s: &str) -> String {
    if s.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '.' || c == '*' || c == '>' || c == '%' || c.is_whitespace() || c.is_control() {
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
    use super::escape_token;

    #[test]
    fn a_value_is_one_token() {
        assert_eq!(escape_token("42"), "42");
        assert_eq!(escape_token("a.b*c>d e%"), "a%2Eb%2Ac%3Ed%20e%25");
        assert_eq!(escape_token(""), "_");
        assert_eq!(escape_token("ü"), "ü");
    }
}
