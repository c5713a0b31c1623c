//! The `redis` sink: `XADD` to one stream, once per idempotency key.
//!
//! Contract: Redis has no deduplication on `XADD`, so every delivery runs
//! one Lua script (atomic on the server): if the dedupe key
//! `<dedupe_prefix><stream>:<idempotency key>` exists, it holds the id of
//! the entry added before and nothing is added; else the entry is added
//! (`XADD`, `MAXLEN ~ maxlen` when configured) and the dedupe key set to
//! its id with `EX dedupe_ttl`. A delivery is `Ok` once the script
//! returned: the entry is in the server's memory (and in its append-only
//! file as the server's `appendfsync` says: `always` for no loss on a
//! server crash, the default `everysec` can lose the last second — the
//! entry and its dedupe key together, so the retry adds it once).
//!
//! The window: a retry within `dedupe_ttl` (default 1 hour) of the first
//! add — after a timeout, or a weft that crashed between the script and its
//! commit — returns the earlier entry and counts as written; a retry later
//! than that adds a second entry with the same `ce_id`, which a consumer
//! that dedupes by `ce_id` (weft's `redis` source does) still sees once.
//! The stream and its dedupe keys must be on one server (no Redis Cluster).
//!
//! A batch is one pipelined round trip (`SCRIPT LOAD`, then one `EVALSHA`
//! per delivery); its results are per delivery. Errors: `WRONGTYPE` (the
//! key holds something other than a stream), a refused command (`ERR`,
//! `NOPERM`) are permanent; a lost connection, a timeout, a server loading,
//! read-only, out of memory or busy are retryable.
//!
//! Fields (see [`crate::broker::redis`]): the payload field (`data`: JSON
//! text, or the binary Avro or Protobuf message of `format`),
//! `ce_specversion`, `ce_id` (the idempotency key), `ce_source`, `ce_type`,
//! `ce_time` (the event's own time), `ce_subject` (the entity key),
//! `content-type` (the format's), `x-correlation-id`, `x-causation-id`,
//! `traceparent`/`tracestate` when the event came with one, and the
//! configured `fields`.

use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{Client, RedisError, RedisResult, Script, Value};
use futures::future::BoxFuture;

use super::config::RedisSinkConfig;
use crate::broker::{REDIS, outgoing_headers};
use crate::sink::{Delivery, Sink, SinkError, WriteResult, Written};

/// Add an entry once per dedupe key. KEYS: the stream, the dedupe key.
/// ARGV: the dedupe TTL in seconds, MAXLEN (`0`: none), then field, value,
/// ... Returns `{1, id}` when it added entry `id`, `{0, id}` when the key
/// named entry `id` added before.
const ADD_ONCE: &str = r"
local prev = redis.call('GET', KEYS[2])
if prev then
  return {0, prev}
end
local id
if ARGV[2] ~= '0' then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
else
  id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
end
redis.call('SET', KEYS[2], id, 'EX', ARGV[1])
return {1, id}
";

/// A connected (or connecting) `redis` sink.
pub struct RedisSink {
    system: String,
    cfg: RedisSinkConfig,
    client: Client,
    addr: String,
    script: Script,
    /// The connection, made again after one is lost.
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl RedisSink {
    /// Connect to the server. An unreachable server is not an error: the
    /// second value says why the destination is down (naming host and
    /// port), and the first write after it is reachable connects. A
    /// reachable server whose `stream` key holds something other than a
    /// stream is an error.
    pub async fn connect(
        system: &str,
        cfg: RedisSinkConfig,
    ) -> Result<(RedisSink, Option<String>), String> {
        let (client, addr) = super::client(&cfg.url)?;
        let sink = RedisSink {
            system: system.to_owned(),
            script: Script::new(ADD_ONCE),
            client,
            addr,
            conn: tokio::sync::Mutex::new(None),
            cfg,
        };
        let mut conn = match sink.connection().await {
            Ok(c) => c,
            Err(e) => return Ok((sink, Some(e.message))),
        };
        let ty: RedisResult<String> = ::redis::cmd("TYPE")
            .arg(&sink.cfg.stream)
            .query_async(&mut conn)
            .await;
        match ty {
            Ok(t) if t == "none" || t == "stream" => {}
            Ok(t) => {
                return Err(format!(
                    "key `{}` on Redis at {} holds a {t}, not a stream",
                    sink.cfg.stream, sink.addr
                ));
            }
            Err(e) => {
                tracing::warn!(sink = %sink.system, error = %e, "cannot check the stream's key type");
            }
        }
        Ok((sink, None))
    }

    /// The connection, connecting when there is none.
    async fn connection(&self) -> Result<MultiplexedConnection, SinkError> {
        let mut held = self.conn.lock().await;
        if let Some(c) = held.as_ref() {
            return Ok(c.clone());
        }
        let c = super::connect(&self.client, self.cfg.connect_timeout, self.cfg.timeout)
            .await
            .map_err(|e| {
                SinkError::retryable(format!("cannot reach Redis at {}: {e}", self.addr))
                    .with_source(e)
            })?;
        *held = Some(c.clone());
        Ok(c)
    }

    /// Forget the connection (lost or hanging): the next write connects.
    async fn drop_connection(&self) {
        *self.conn.lock().await = None;
    }

    /// The entry fields of one delivery: field, value, ... (the payload's
    /// value binary for Avro and Protobuf).
    fn fields(&self, d: &Delivery) -> Result<Vec<(String, Vec<u8>)>, SinkError> {
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
        let body = self
            .cfg
            .format
            .encode(&d.payload)
            .map_err(|e| SinkError::permanent(format!("payload: {e}")))?;
        let mut f = vec![(self.cfg.field.clone(), body)];
        for (k, v) in outgoing_headers(REDIS, d, &source, &ty) {
            let v = if k == REDIS.content_type {
                self.cfg.format.content_type().to_owned()
            } else {
                v
            };
            f.push((k, v.into_bytes()));
        }
        f.extend(
            self.cfg
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
        );
        Ok(f)
    }

    async fn write_batch(&self, batch: &[Delivery]) -> Vec<WriteResult> {
        let mut out: Vec<Option<WriteResult>> = Vec::with_capacity(batch.len());
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        // loaded on this connection before the calls: a server restarted
        // since the last batch has lost its scripts
        pipe.load_script(&self.script).ignore();
        let ttl = self.cfg.dedupe_ttl.as_secs().max(1);
        let maxlen = self.cfg.maxlen.unwrap_or(0);
        for d in batch {
            match self.fields(d) {
                Ok(fields) => {
                    let mut inv = self.script.prepare_invoke();
                    inv.key(&self.cfg.stream)
                        .key(format!(
                            "{}{}:{}",
                            self.cfg.dedupe_prefix, self.cfg.stream, d.idempotency_key
                        ))
                        .arg(ttl)
                        .arg(maxlen);
                    for (k, v) in &fields {
                        inv.arg(k).arg(v);
                    }
                    pipe.invoke_script(&inv);
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let sent = out.iter().filter(|r| r.is_none()).count();
        if sent == 0 {
            return out.into_iter().flatten().collect();
        }
        let mut conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => {
                return fill(out, |_| Err(SinkError::like(e.kind, &e.message)));
            }
        };
        let replies = tokio::time::timeout(
            self.cfg.timeout,
            pipe.query_async::<Vec<RedisResult<Value>>>(&mut conn),
        )
        .await;
        let replies = match replies {
            Ok(Ok(r)) if r.len() == sent => r,
            Ok(Ok(r)) => {
                let msg = format!(
                    "Redis answered {} of {sent} script calls; trying them again",
                    r.len()
                );
                return fill(out, |_| Err(SinkError::retryable(msg.clone())));
            }
            Ok(Err(e)) => {
                if super::connection_lost(&e) {
                    self.drop_connection().await;
                }
                let err = classify(&e, &self.addr);
                return fill(out, |_| Err(SinkError::like(err.kind, &err.message)));
            }
            Err(_) => {
                self.drop_connection().await;
                let msg = format!(
                    "Redis at {} did not answer within {:?}",
                    self.addr, self.cfg.timeout
                );
                return fill(out, |_| Err(SinkError::retryable(msg.clone())));
            }
        };
        let mut lost = false;
        let mut replies = replies.into_iter();
        let results = fill(out, |_| match replies.next() {
            Some(Ok(v)) => {
                if let Value::Array(a) = &v
                    && matches!(a.first(), Some(Value::Int(0)))
                {
                    tracing::debug!(sink = %self.system, "already added under this idempotency key");
                }
                Ok(Written::default())
            }
            Some(Err(e)) => {
                lost |= super::connection_lost(&e);
                Err(classify(&e, &self.addr).with_source(e))
            }
            None => Err(SinkError::retryable("no reply from Redis")),
        });
        if lost {
            self.drop_connection().await;
        }
        results
    }
}

/// The results: the ones known already, the others from `f`, in order.
fn fill(
    known: Vec<Option<WriteResult>>,
    mut f: impl FnMut(usize) -> WriteResult,
) -> Vec<WriteResult> {
    known
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| f(i)))
        .collect()
}

impl Sink for RedisSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<WriteResult>> {
        Box::pin(self.write_batch(batch))
    }

    fn max_write_time(&self, batch_len: usize) -> Duration {
        // a connect, then one round trip within `timeout`
        self.cfg.connect_timeout + self.cfg.timeout + Duration::from_millis(2) * batch_len as u32
    }
}

/// Retryable or permanent, by what the server or the client said. The
/// message names the server's error, never the entry.
fn classify(e: &RedisError, addr: &str) -> SinkError {
    let msg = format!("Redis at {addr}: {e}");
    if super::connection_lost(e) {
        return SinkError::retryable(msg);
    }
    match e.code() {
        Some(c) if super::transient_code(c) => SinkError::retryable(msg),
        Some("ERR") if msg.contains("max number of clients") => SinkError::retryable(msg),
        Some("WRONGTYPE" | "NOPERM" | "ERR" | "EXECABORT") => SinkError::permanent(msg),
        // anything else the server said (an unknown code) or the client
        // could not read: retried, the breaker shows the destination down
        _ => SinkError::retryable(msg),
    }
}
