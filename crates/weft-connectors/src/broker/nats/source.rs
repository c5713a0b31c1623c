//! The `nats` source: a JetStream durable pull consumer.
//!
//! Contract (the broker contract of [`crate::broker`]): a batch is fetched,
//! handed to `ingest` whole, and each of its messages is acked only after
//! `ingest` returned `Ok`; then the next batch is fetched. A batch the
//! store does not take (backpressure, a store error) is held and offered
//! again with backoff while weft tells the server it is still working on
//! it (`+WPI`, so `ack_wait` does not expire and no delivery is counted
//! against `max_deliver`); on shutdown it is nak'ed and redelivered at the
//! next start. Messages held by a weft that died are redelivered by the
//! server after `ack_wait`.
//!
//! Dedupe: event ids are positions (`<stream>:<seq>`, the same on every
//! redelivery) unless the message names its own (`ce-id`, `Nats-Msg-Id`);
//! the journal drops an id it already has (`Dedupe::Id`). A position
//! high-water mark cannot replace it: redeliveries are not in stream
//! order (a batch fetched by a weft that died comes back after later
//! batches were committed), so "skip what is at or below the checkpoint"
//! would lose it.
//!
//! The stream and the consumer are created when missing (`create: true`,
//! the default): the stream with file storage and the configured
//! subjects, the consumer durable with explicit acks, filtered on them. An
//! existing consumer is used as it is, after checking that it is a pull
//! consumer with explicit acks and the same filter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::config::{NatsSourceConfig, Start};
use crate::broker::{Attributes, Decoder, Incoming, NATS};
use crate::source::{Batch, Ingest, Record, Source, SourceError};

/// A running `nats` source.
pub struct NatsSource {
    system: String,
    cfg: NatsSourceConfig,
}

/// How long fetching may fail in a row before the source stops (and its
/// supervisor reports it down and starts it again).
const FAILING_FOR: Duration = Duration::from_secs(30);

impl NatsSource {
    pub fn new(system: &str, cfg: NatsSourceConfig) -> Self {
        NatsSource {
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
        let addrs = super::addrs(&self.cfg.url).map_err(|m| self.err(m))?;
        let hosts = super::hosts(&addrs);
        let connect = async_nats::connect_with_options(
            addrs,
            super::options(
                &self.system,
                self.cfg.token.as_ref(),
                self.cfg.connect_timeout,
            ),
        );
        let client = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            c = connect => c.map_err(|e| self.err(format!("cannot connect to NATS at {hosts}: {e}")))?,
        };
        let js = jetstream::new(client.clone());
        let consumer = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            c = self.setup(&js) => c?,
        };
        tracing::info!(
            source = %self.system, stream = %self.cfg.stream, consumer = %self.cfg.consumer,
            "consuming from NATS JetStream at {hosts}"
        );
        let decoder = Decoder {
            format: self.cfg.format.clone(),
            max_bytes: self.cfg.max_message_bytes,
            event_id: self.cfg.event_id,
            default_source: format!("weft:{}/nats", self.system),
            default_type: self.cfg.event_type.clone(),
        };
        let mut failing: Option<Instant> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            let fetched = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.next_batch(&consumer) => r,
            };
            let msgs = match fetched {
                Ok(m) => {
                    failing = None;
                    pause = Duration::from_millis(100);
                    m
                }
                Err(e) => {
                    let since = *failing.get_or_insert_with(Instant::now);
                    if since.elapsed() > FAILING_FOR {
                        return Err(self.err(format!(
                            "fetching from stream `{}` failed for {}s: {e}",
                            self.cfg.stream,
                            FAILING_FOR.as_secs()
                        )));
                    }
                    tracing::warn!(source = %self.system, error = %e, "NATS fetch failed; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if msgs.is_empty() {
                continue;
            }
            if !self.hand_over(&decoder, &msgs, &*ingest, &shutdown).await {
                break;
            }
        }
        // acks still in the client's buffer reach the server before it closes
        let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
        Ok(())
    }

    /// The stream and the durable consumer, created when missing and
    /// allowed; checked otherwise.
    async fn setup(&self, js: &jetstream::Context) -> Result<PullConsumer, SourceError> {
        let c = &self.cfg;
        let stream = match js.get_stream(&c.stream).await {
            Ok(s) => s,
            Err(e) => {
                let missing = matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j) if super::stream_not_found(&j));
                if !missing {
                    return Err(self.err(format!("cannot look up stream `{}`: {e}", c.stream)));
                }
                if !c.create {
                    return Err(self.err(format!(
                        "stream `{}` does not exist (and `create: false`): create it (`nats stream add`) or let weft create it",
                        c.stream
                    )));
                }
                tracing::info!(source = %self.system, stream = %c.stream, subjects = ?c.subjects, "creating the stream");
                js.get_or_create_stream(jetstream::stream::Config {
                    name: c.stream.clone(),
                    subjects: c.subjects.clone(),
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| self.err(format!("cannot create stream `{}`: {e}", c.stream)))?
            }
        };
        let (filter_subject, filter_subjects) = match c.subjects.as_slice() {
            [] => (String::new(), Vec::new()),
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        let existing = stream
            .get_consumer::<jetstream::consumer::pull::Config>(&c.consumer)
            .await;
        let consumer = match existing {
            Ok(mut cons) => {
                let info = cons
                    .info()
                    .await
                    .map_err(|e| self.err(format!("cannot read consumer `{}`: {e}", c.consumer)))?
                    .config
                    .clone();
                let mut theirs: Vec<String> = info.filter_subjects.clone();
                if !info.filter_subject.is_empty() {
                    theirs.push(info.filter_subject.clone());
                }
                let mut ours = c.subjects.clone();
                theirs.sort();
                ours.sort();
                if info.ack_policy != jetstream::consumer::AckPolicy::Explicit {
                    return Err(self.err(format!(
                        "consumer `{}` on stream `{}` does not use explicit acks: weft acks each message after storing it; delete the consumer or name another",
                        c.consumer, c.stream
                    )));
                }
                if theirs != ours {
                    return Err(self.err(format!(
                        "consumer `{}` on stream `{}` filters {theirs:?}, the config {ours:?}: delete the consumer or name another",
                        c.consumer, c.stream
                    )));
                }
                cons
            }
            Err(e) => {
                let text = e.to_string();
                let missing = text.contains("10014") || text.contains("consumer not found");
                if !missing {
                    return Err(self.err(format!("cannot look up consumer `{}`: {e}", c.consumer)));
                }
                if !c.create {
                    return Err(self.err(format!(
                        "consumer `{}` does not exist on stream `{}` (and `create: false`)",
                        c.consumer, c.stream
                    )));
                }
                tracing::info!(source = %self.system, consumer = %c.consumer, "creating the durable consumer");
                stream
                    .create_consumer(jetstream::consumer::pull::Config {
                        durable_name: Some(c.consumer.clone()),
                        description: Some(format!("weft source {}", self.system)),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ack_wait: c.ack_wait,
                        max_deliver: c.max_deliver,
                        max_ack_pending: c.max_ack_pending,
                        deliver_policy: match c.start {
                            Start::All => jetstream::consumer::DeliverPolicy::All,
                            Start::New => jetstream::consumer::DeliverPolicy::New,
                        },
                        filter_subject,
                        filter_subjects,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        self.err(format!("cannot create consumer `{}`: {e}", c.consumer))
                    })?
            }
        };
        Ok(consumer)
    }

    /// The next batch: what is waiting now (up to `batch`), else the first
    /// message to arrive within `max_wait` and what came with it.
    async fn next_batch(&self, c: &PullConsumer) -> Result<Vec<jetstream::Message>, String> {
        let batch = self.cfg.batch;
        let wait = self.cfg.max_wait;
        let mut out = Vec::with_capacity(batch);
        // every request expires: one sent as the server went away is never
        // answered, and the client keeps its subscription across reconnects
        let waiting = c.fetch().max_messages(batch).expires(wait).messages().await;
        collect(waiting, &mut out, wait).await?;
        if out.is_empty() {
            let first = c.batch().max_messages(1).expires(wait).messages().await;
            collect(first, &mut out, wait).await?;
            if !out.is_empty() && batch > 1 {
                let more = c
                    .fetch()
                    .max_messages(batch - 1)
                    .expires(wait)
                    .messages()
                    .await;
                // the first is in hand: an error now only ends the batch
                if let Err(e) = collect(more, &mut out, wait).await {
                    tracing::debug!(source = %self.system, error = %e, "fetch after the first message");
                }
            }
        }
        Ok(out)
    }

    /// Ingest `msgs` as one batch, then ack each; `false` when the source
    /// is stopping (the messages are nak'ed and redelivered next start).
    async fn hand_over(
        &self,
        decoder: &Decoder,
        msgs: &[jetstream::Message],
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut pause = Duration::from_millis(100);
        let hold_for = self.cfg.ack_wait / 3;
        let mut progressed = Instant::now();
        loop {
            let batch = Batch {
                records: msgs.iter().map(|m| self.record(decoder, m)).collect(),
                checkpoint: None,
            };
            match ingest.ingest(batch).await {
                Ok(r) => {
                    tracing::debug!(
                        source = %self.system, accepted = r.accepted, duplicates = r.duplicates,
                        "NATS batch stored"
                    );
                    break;
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        nak_all(msgs).await;
                        return false;
                    }
                    tracing::warn!(
                        source = %self.system, error = %e, messages = msgs.len(),
                        "the store did not take the batch; holding the messages and trying again"
                    );
                    if progressed.elapsed() >= hold_for {
                        for m in msgs {
                            let _ = m.ack_with(AckKind::Progress).await;
                        }
                        progressed = Instant::now();
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            nak_all(msgs).await;
                            return false;
                        }
                        _ = tokio::time::sleep(pause.min(hold_for)) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        for m in msgs {
            // a lost ack means a redelivery, which the journal's dedupe drops
            if let Err(e) = m.ack().await {
                tracing::warn!(source = %self.system, error = %e, "NATS ack not sent; the message will be redelivered");
            }
        }
        true
    }

    /// One message as a record.
    fn record(&self, decoder: &Decoder, m: &jetstream::Message) -> Record {
        let header = |name: &str| -> Option<String> {
            let h = m.headers.as_ref()?;
            h.get(name)
                .or_else(|| {
                    h.iter()
                        .find(|(k, _)| AsRef::<str>::as_ref(*k).eq_ignore_ascii_case(name))
                        .and_then(|(_, v)| v.first())
                })
                .map(|v| v.as_str().to_owned())
        };
        let (position_id, location, stored_at) = match m.info() {
            Ok(i) => (
                format!("{}:{}", i.stream, i.stream_sequence),
                format!(
                    "nats stream {} seq {} (subject {})",
                    i.stream, i.stream_sequence, m.subject
                ),
                chrono::DateTime::from_timestamp(
                    i.published.unix_timestamp(),
                    i.published.nanosecond(),
                ),
            ),
            // a JetStream message always has its position in its reply
            // subject; without one, its content names it
            Err(_) => {
                let h = hex::encode(&Sha256::digest(&m.payload)[..16]);
                (
                    format!("{}:sha256:{h}", self.cfg.stream),
                    format!(
                        "nats stream {} (subject {}, no position)",
                        self.cfg.stream, m.subject
                    ),
                    None,
                )
            }
        };
        let incoming = Incoming {
            position_id,
            message_id: header("Nats-Msg-Id").filter(|v| !v.is_empty()),
            location,
            subject: m.subject.as_str(),
            stored_at,
            attributes: Attributes::from_headers(NATS, header),
        };
        decoder.record(&incoming, &m.payload)
    }
}

impl Source for NatsSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).run(ingest, shutdown))
    }
}

/// Read a pull request's messages into `out`. An error after some
/// messages keeps them (they are delivered: dropping them would delay them
/// by `ack_wait`) and ends the batch; an error before any is returned.
async fn collect<S, E>(
    stream: Result<S, E>,
    out: &mut Vec<jetstream::Message>,
    expires: Duration,
) -> Result<(), String>
where
    S: futures::Stream<Item = Result<jetstream::Message, async_nats::Error>> + Unpin,
    E: std::fmt::Display,
{
    let mut s = stream.map_err(|e| e.to_string())?;
    // the server ends a request at `expires`; past it with a margin, the
    // answer is lost (a reconnect in between)
    let deadline = tokio::time::Instant::now() + expires + Duration::from_secs(2);
    loop {
        let next = match tokio::time::timeout_at(deadline, s.next()).await {
            Ok(n) => n,
            Err(_) if out.is_empty() => return Err("the pull request was not answered".into()),
            Err(_) => break,
        };
        match next {
            None => break,
            Some(Ok(m)) => out.push(m),
            Some(Err(e)) if out.is_empty() => return Err(e.to_string()),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "NATS pull request ended");
                break;
            }
        }
    }
    Ok(())
}

async fn nak_all(msgs: &[jetstream::Message]) {
    for m in msgs {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
}
