//! The `redis` source: one consumer of a Redis Streams consumer group.
//!
//! Contract (the broker contract of [`crate::broker`]): a batch is read
//! with `XREADGROUP ... COUNT batch BLOCK block ... >`, handed to `ingest`
//! whole, and acknowledged with one `XACK` of all its entry ids only after
//! `ingest` returned `Ok`; then the next batch is read. Until then the
//! entries are in this consumer's pending entries list (PEL) in Redis. A
//! batch the store does not take (backpressure, a store error) is held and
//! offered again with backoff, while weft resets the entries' idle time
//! (`XCLAIM ... JUSTID` to itself) so no other consumer claims them.
//!
//! After a crash or a lost connection, the consumer first reads its own
//! pending entries again (`XREADGROUP ... 0`, then onwards from the last
//! id read) and hands them over like new ones; then it takes over entries
//! pending on other consumers of the group for longer than `claim_idle`
//! (`XAUTOCLAIM`, at start and every `claim_idle / 2`): what a weft that
//! died held, under another consumer name, is read again by a live one.
//!
//! Dedupe: event ids are positions (`<stream>:<entry id>`, the same on
//! every redelivery) unless the entry names its own (`ce_id`); the journal
//! drops an id it already has (`Dedupe::Id`).
//!
//! The group is created when missing (`create: true`, the default) with
//! `XGROUP CREATE ... MKSTREAM` at `0` (`start: all`) or `$` (`start: new`);
//! a key that holds something other than a stream stops the source with
//! the reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use ::redis::{Client, RedisError, Value};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::config::RedisSourceConfig;
use crate::broker::{Attributes, Decoder, Incoming, REDIS};
use crate::source::{Batch, Ingest, Record, Source, SourceError};

/// A running `redis` source.
pub struct RedisSource {
    system: String,
    cfg: RedisSourceConfig,
}

/// How long reading may fail in a row before the source stops (and its
/// supervisor reports it down and starts it again).
const FAILING_FOR: Duration = Duration::from_secs(30);

/// One stream entry as read: its id and fields (`None`: it is pending but
/// was deleted from the stream, `XDEL` or trimming).
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub fields: Option<Vec<(String, Vec<u8>)>>,
}

/// Why a session with the server ended.
enum End {
    /// Shutdown was asked for.
    Shutdown,
    /// The connection or a command failed: connect again.
    Lost(String),
}

impl RedisSource {
    pub fn new(system: &str, cfg: RedisSourceConfig) -> Self {
        RedisSource {
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
        let (client, addr) = super::client(&self.cfg.url).map_err(|m| self.err(m))?;
        let decoder = Decoder {
            format: self.cfg.format.clone(),
            max_bytes: self.cfg.max_message_bytes,
            event_id: self.cfg.event_id,
            default_source: format!("weft:{}/redis", self.system),
            default_type: self.cfg.event_type.clone(),
        };
        let mut failing: Option<Instant> = None;
        let mut pause = Duration::from_millis(100);
        loop {
            let why = match self
                .session(&client, &decoder, &*ingest, &shutdown, &mut failing)
                .await?
            {
                End::Shutdown => return Ok(()),
                End::Lost(why) => why,
            };
            // a session that read something ends a run of failures
            if failing.is_none() {
                pause = Duration::from_millis(100);
            }
            let since = *failing.get_or_insert_with(Instant::now);
            if since.elapsed() > FAILING_FOR {
                return Err(self.err(format!(
                    "reading stream `{}` at {addr} failed for {}s: {why}",
                    self.cfg.stream,
                    FAILING_FOR.as_secs()
                )));
            }
            tracing::warn!(source = %self.system, error = %why, "Redis read failed; connecting again");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Connect, set the group up, read this consumer's pending entries,
    /// then claim and read new ones until shutdown or an error.
    async fn session(
        &self,
        client: &Client,
        decoder: &Decoder,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
        failing: &mut Option<Instant>,
    ) -> Result<End, SourceError> {
        let c = &self.cfg;
        let response = c.block + c.connect_timeout.max(Duration::from_secs(5));
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return Ok(End::Shutdown),
            r = super::connect(client, c.connect_timeout, response) => r,
        };
        let mut conn = match connected {
            Ok(conn) => conn,
            Err(e) => return Ok(End::Lost(format!("cannot connect: {e}"))),
        };
        if let Err(e) = self.setup(&mut conn).await {
            return match e {
                SetupError::Fatal(m) => Err(self.err(m)),
                SetupError::Redis(e) => Ok(End::Lost(e.to_string())),
            };
        }
        tracing::info!(
            source = %self.system, stream = %c.stream, group = %c.group, consumer = %c.consumer,
            "consuming from Redis stream"
        );
        // this consumer's own pending entries first: what it read and did
        // not acknowledge before a crash or a lost connection
        let mut cursor = "0".to_owned();
        loop {
            let read = tokio::select! {
                _ = shutdown.cancelled() => return Ok(End::Shutdown),
                r = self.read(&mut conn, &cursor, None) => r,
            };
            let entries = match read {
                Ok(e) => e,
                Err(e) => return Ok(End::Lost(e.to_string())),
            };
            *failing = None;
            let Some(last) = entries.last() else { break };
            cursor = last.id.clone();
            tracing::info!(source = %self.system, entries = entries.len(), "reading pending entries again");
            if let Some(end) = self
                .hand_over(&mut conn, decoder, &entries, ingest, shutdown)
                .await
            {
                return Ok(end);
            }
        }
        let mut next_claim = Instant::now();
        loop {
            if Instant::now() >= next_claim {
                if let Some(end) = self.claim(&mut conn, decoder, ingest, shutdown).await {
                    return Ok(end);
                }
                next_claim = Instant::now() + (c.claim_idle / 2).max(Duration::from_millis(500));
            }
            let read = tokio::select! {
                _ = shutdown.cancelled() => return Ok(End::Shutdown),
                r = self.read(&mut conn, ">", Some(c.block)) => r,
            };
            let entries = match read {
                Ok(e) => e,
                Err(e) => return Ok(End::Lost(e.to_string())),
            };
            *failing = None;
            if entries.is_empty() {
                continue;
            }
            if let Some(end) = self
                .hand_over(&mut conn, decoder, &entries, ingest, shutdown)
                .await
            {
                return Ok(end);
            }
        }
    }

    /// The group, created when missing and allowed; checked otherwise.
    async fn setup(&self, conn: &mut MultiplexedConnection) -> Result<(), SetupError> {
        let c = &self.cfg;
        let ty: String = ::redis::cmd("TYPE")
            .arg(&c.stream)
            .query_async(conn)
            .await?;
        if ty != "none" && ty != "stream" {
            return Err(SetupError::Fatal(format!(
                "key `{}` holds a {ty}, not a stream",
                c.stream
            )));
        }
        if c.create {
            let created: Result<Value, RedisError> = ::redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&c.stream)
                .arg(&c.group)
                .arg(c.start.id())
                .arg("MKSTREAM")
                .query_async(conn)
                .await;
            match created {
                Ok(_) => {
                    tracing::info!(source = %self.system, stream = %c.stream, group = %c.group, start = c.start.id(), "created the consumer group");
                }
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(());
        }
        if ty == "none" {
            return Err(SetupError::Fatal(format!(
                "stream `{}` does not exist (and `create: false`): create it and the group (`XGROUP CREATE {} {} $ MKSTREAM`) or let weft create them",
                c.stream, c.stream, c.group
            )));
        }
        let groups: Value = ::redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&c.stream)
            .query_async(conn)
            .await?;
        let names = group_names(&groups);
        if !names.contains(&c.group) {
            return Err(SetupError::Fatal(format!(
                "consumer group `{}` does not exist on stream `{}` (and `create: false`); it has {names:?}",
                c.group, c.stream
            )));
        }
        Ok(())
    }

    /// One `XREADGROUP` from `id` (`>`: new entries, blocking for `block`;
    /// an id: this consumer's pending entries after it).
    async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        id: &str,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, RedisError> {
        let c = &self.cfg;
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&c.group)
            .arg(&c.consumer)
            .arg("COUNT")
            .arg(c.batch);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&c.stream).arg(id);
        let v: Value = cmd.query_async(conn).await?;
        Ok(read_reply(v))
    }

    /// Take over what other consumers held for longer than `claim_idle`
    /// (`XAUTOCLAIM` from the start of the PEL to its end) and hand it
    /// over; `Some` when the session ends.
    async fn claim(
        &self,
        conn: &mut MultiplexedConnection,
        decoder: &Decoder,
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Option<End> {
        let c = &self.cfg;
        let mut cursor = "0-0".to_owned();
        loop {
            let mut cmd = ::redis::cmd("XAUTOCLAIM");
            cmd.arg(&c.stream)
                .arg(&c.group)
                .arg(&c.consumer)
                .arg(c.claim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(c.batch);
            let claimed: Result<Value, RedisError> = tokio::select! {
                _ = shutdown.cancelled() => return Some(End::Shutdown),
                r = cmd.query_async(conn) => r,
            };
            let (next, entries, deleted) = match claimed {
                Ok(v) => autoclaim_reply(v),
                Err(e) => return Some(End::Lost(format!("XAUTOCLAIM: {e}"))),
            };
            if !deleted.is_empty() {
                tracing::warn!(
                    source = %self.system, stream = %c.stream, ids = ?deleted,
                    "pending entries of a dead consumer were deleted from the stream before weft read them"
                );
            }
            if !entries.is_empty() {
                tracing::info!(source = %self.system, entries = entries.len(), "took over entries another consumer held");
                if let Some(end) = self
                    .hand_over(conn, decoder, &entries, ingest, shutdown)
                    .await
                {
                    return Some(end);
                }
            }
            match next {
                Some(n) if n != "0-0" => cursor = n,
                _ => return None,
            }
        }
    }

    /// Ingest `entries` as one batch, then `XACK` them all; `Some` when the
    /// session ends (shutdown while the store refused: the entries stay
    /// pending and are read again at the next start).
    async fn hand_over(
        &self,
        conn: &mut MultiplexedConnection,
        decoder: &Decoder,
        entries: &[Entry],
        ingest: &dyn Ingest,
        shutdown: &CancellationToken,
    ) -> Option<End> {
        let c = &self.cfg;
        let (live, gone): (Vec<&Entry>, Vec<&Entry>) =
            entries.iter().partition(|e| e.fields.is_some());
        if !gone.is_empty() {
            tracing::warn!(
                source = %self.system, stream = %c.stream,
                ids = ?gone.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
                "pending entries were deleted from the stream before weft stored them; acknowledging them"
            );
        }
        let mut pause = Duration::from_millis(100);
        let keep_fresh = c.claim_idle / 3;
        let mut refreshed = Instant::now();
        while !live.is_empty() {
            let batch = Batch {
                records: live.iter().map(|e| self.record(decoder, e)).collect(),
                checkpoint: None,
            };
            match ingest.ingest(batch).await {
                Ok(r) => {
                    tracing::debug!(
                        source = %self.system, accepted = r.accepted, duplicates = r.duplicates,
                        "Redis batch stored"
                    );
                    break;
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        return Some(End::Shutdown);
                    }
                    tracing::warn!(
                        source = %self.system, error = %e, entries = live.len(),
                        "the store did not take the batch; holding the entries and trying again"
                    );
                    if refreshed.elapsed() >= keep_fresh {
                        // still ours: reset their idle time so that no
                        // other consumer's XAUTOCLAIM takes them
                        let r: Result<Value, RedisError> = ::redis::cmd("XCLAIM")
                            .arg(&c.stream)
                            .arg(&c.group)
                            .arg(&c.consumer)
                            .arg(0)
                            .arg(live.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
                            .arg("JUSTID")
                            .query_async(conn)
                            .await;
                        if let Err(e) = r {
                            tracing::debug!(source = %self.system, error = %e, "XCLAIM to keep entries fresh");
                        }
                        refreshed = Instant::now();
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Some(End::Shutdown),
                        _ = tokio::time::sleep(pause.min(keep_fresh)) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let acked: Result<i64, RedisError> = ::redis::cmd("XACK")
            .arg(&c.stream)
            .arg(&c.group)
            .arg(&ids)
            .query_async(conn)
            .await;
        match acked {
            Ok(_) => None,
            // the entries stay pending: read again after the reconnect,
            // and dropped by the journal's dedupe
            Err(e) => Some(End::Lost(format!(
                "XACK (the entries stay pending and are read again): {e}"
            ))),
        }
    }

    /// One entry as a record.
    fn record(&self, decoder: &Decoder, e: &Entry) -> Record {
        let stream = &self.cfg.stream;
        let fields = e.fields.as_deref().unwrap_or_default();
        let get = |name: &str| -> Option<String> {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .or_else(|| fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let incoming = Incoming {
            position_id: format!("{stream}:{}", e.id),
            message_id: None,
            location: format!("redis stream {stream} entry {}", e.id),
            subject: stream,
            stored_at: entry_time(&e.id),
            attributes: Attributes::from_headers(REDIS, get),
        };
        match fields.iter().find(|(k, _)| *k == self.cfg.field) {
            Some((_, payload)) => decoder.record(&incoming, payload),
            None => {
                let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
                decoder.reject(
                    &incoming,
                    &entry_text(fields),
                    &format!(
                        "no `{}` field to read the payload from (the entry has {names:?})",
                        self.cfg.field
                    ),
                )
            }
        }
    }
}

impl Source for RedisSource {
    fn run(
        self: Box<Self>,
        ingest: Arc<dyn Ingest>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).run(ingest, shutdown))
    }
}

enum SetupError {
    /// The config and the server disagree: stop with the reason.
    Fatal(String),
    Redis(RedisError),
}

impl From<RedisError> for SetupError {
    fn from(e: RedisError) -> Self {
        SetupError::Redis(e)
    }
}

/// When an entry was added: the milliseconds of its id (`<ms>-<seq>`).
fn entry_time(id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let ms: i64 = id.split('-').next()?.parse().ok()?;
    chrono::DateTime::from_timestamp_millis(ms)
}

/// An entry's fields as a JSON object (for a DLQ entry's raw text).
fn entry_text(fields: &[(String, Vec<u8>)]) -> Vec<u8> {
    let m: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    serde_json::Value::Object(m).to_string().into_bytes()
}

/// The bytes of a string-like reply.
fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes().to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The elements of an array, or the key/value pairs of a map flattened
/// (RESP3 answers with maps where RESP2 has arrays).
fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        Value::Attribute { data, .. } => items(*data),
        _ => Vec::new(),
    }
}

/// One entry: `[id, [field, value, ...]]`; the fields nil when the entry
/// was deleted.
fn entry(v: Value) -> Option<Entry> {
    let mut it = items(v).into_iter();
    let id = text(&it.next()?)?;
    let fields = match it.next() {
        None | Some(Value::Nil) => None,
        Some(f) => {
            let flat = items(f);
            let mut out = Vec::with_capacity(flat.len() / 2);
            let mut pairs = flat.into_iter();
            while let (Some(k), Some(v)) = (pairs.next(), pairs.next()) {
                out.push((text(&k).unwrap_or_default(), bytes(&v).unwrap_or_default()));
            }
            Some(out)
        }
    };
    Some(Entry { id, fields })
}

/// The entries of an `XREADGROUP` reply (one stream): nil when nothing
/// came within `BLOCK`, else `[[stream, [entry, ...]]]`.
pub fn read_reply(v: Value) -> Vec<Entry> {
    let mut out = Vec::new();
    let streams = items(v);
    // arrays hold [stream, entries] per stream; a map flattened alternates
    let mut i = 0;
    while i < streams.len() {
        let (entries, step) = match &streams[i] {
            Value::Array(_) => (items(streams[i].clone()).into_iter().nth(1), 1),
            _ => (streams.get(i + 1).cloned(), 2),
        };
        if let Some(e) = entries {
            out.extend(items(e).into_iter().filter_map(entry));
        }
        i += step;
    }
    out
}

/// An `XAUTOCLAIM` reply: the cursor to go on from (`0-0`: the end), the
/// entries claimed, and the ids that were deleted from the stream (Redis
/// 7 removes them from the PEL).
pub fn autoclaim_reply(v: Value) -> (Option<String>, Vec<Entry>, Vec<String>) {
    let mut it = items(v).into_iter();
    let next = it.next().as_ref().and_then(text);
    let entries = it
        .next()
        .map(|e| items(e).into_iter().filter_map(entry).collect())
        .unwrap_or_default();
    let deleted = it
        .next()
        .map(|d| items(d).iter().filter_map(text).collect())
        .unwrap_or_default();
    (next, entries, deleted)
}

/// The names in an `XINFO GROUPS` reply.
pub(super) fn group_names(v: &Value) -> Vec<String> {
    items(v.clone())
        .into_iter()
        .filter_map(|g| {
            let kv = items(g);
            kv.chunks(2)
                .find(|p| p.len() == 2 && text(&p[0]).as_deref() == Some("name"))
                .and_then(|p| text(&p[1]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_are_read_in_resp2_and_resp3_shapes() {
        let e1 = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk("data"), bulk("{}"), bulk("ce_id"), bulk("7")]),
        ]);
        let gone = Value::Array(vec![bulk("2-0"), Value::Nil]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![e1.clone(), gone.clone()]),
        ])]);
        let got = read_reply(resp2);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id, "1-0");
        assert_eq!(
            got[0].fields.as_ref().unwrap()[1],
            ("ce_id".to_owned(), b"7".to_vec())
        );
        assert!(got[1].fields.is_none());
        let resp3 = Value::Map(vec![(bulk("s"), Value::Array(vec![e1.clone()]))]);
        assert_eq!(read_reply(resp3).len(), 1);
        assert!(read_reply(Value::Nil).is_empty());
        let (next, entries, deleted) = autoclaim_reply(Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![e1]),
            Value::Array(vec![bulk("3-0")]),
        ]));
        assert_eq!(next.as_deref(), Some("0-0"));
        assert_eq!(entries.len(), 1);
        assert_eq!(deleted, ["3-0"]);
    }

    #[test]
    fn entry_ids_give_the_time_they_were_added() {
        let t = entry_time("1767225600000-3").unwrap();
        assert_eq!(t.timestamp_millis(), 1_767_225_600_000);
        assert!(entry_time("x").is_none());
    }

    #[test]
    fn group_names_are_found() {
        let g = Value::Array(vec![Value::Array(vec![
            bulk("name"),
            bulk("weft-a"),
            bulk("consumers"),
            Value::Int(1),
        ])]);
        assert_eq!(group_names(&g), ["weft-a"]);
    }
}
