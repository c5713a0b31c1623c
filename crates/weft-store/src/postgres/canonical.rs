//! Canonical records on PostgreSQL: the logic of `crate::canonical`, run
//! on a journal connection inside the journal's transactions.
//!
//! # Locking: one lock per entity
//!
//! Every transaction that matches reports to records or changes which
//! record an id belongs to (an ingest merging reports, and the manual
//! operations: conflicts, matches, `weft xref`) first takes
//! `pg_advisory_xact_lock` on that entity ([`entity_lock`]), for all its
//! entities in ascending lock order, before any key lock. Settles of
//! canonical writes and `canonical_intent` take only the locks of the
//! records they write ([`record_lock`], ascending), which a merge takes as
//! well once it knows its record (then reads that record's link again);
//! a settle that links an id the record's link does not hold yet takes
//! the entity's lock first. So the merges of one entity are serial across
//! nodes: the second of two reports that match each other (the same match key, a
//! fuzzy candidate, the echo of a create) reads the first's links and
//! records after it committed, and links to its record instead of creating
//! a second one; no link is lost to two transactions rewriting one record's
//! links. A finer lock (per match key or blocking value) was not taken: a
//! report's candidates are known only by reading (fuzzy blocks, creates in
//! flight, the links of the record it lands on), so a finer scheme would
//! lock after reading and need a retry loop. The cost: one merge
//! transaction per entity at a time, each with its commit's fsync, about
//! 60-80 reports a second here; too few for a burst of thousands of
//! edits echoed by both systems (the reason `weft validate` still refuses
//! `identity` with `store.postgres`: ARCHITECTURE.md). Entities go in
//! parallel, and so do the journal's other transactions.
//!
//! The rows a merge causes are keyed by canonical id. When the merge
//! decides whether the record needs a row at a destination, it takes that
//! record's key lock (then its order_seqs come after it, the rule of
//! `postgres/mod.rs`) and locks a row of the record waiting in the outbox
//! (`FOR SHARE`), which it relies on to carry the new state: no claim takes
//! that row (and reads the record as it was) before the merge commits. The
//! key lock comes before the row lock because a settle of that queue holds
//! the key while it rewrites the queue's rows. Transactions taking entity
//! locks take them before any key lock; a merge's canonical-id key locks
//! come in merge order, after the event's own keys. The one cycle left is
//! a settle of an identity lane that delivered nothing (retries only: it
//! takes no entity lock) holding two records' keys that a batch of merges
//! locks in the other order: PostgreSQL reports the deadlock, one of them
//! rolls back and is tried again, as everywhere in the journal.

use std::collections::BTreeSet;
use std::error::Error;

use bytes::{BufMut, BytesMut};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use super::ops::{self, Ctx};
use super::pool::Conn;
use crate::canonical::sql::{P, Rec, Sql, Val};
use crate::canonical::{self, Routed};
use crate::journal::FollowUp;
use crate::{Applied, CanonicalWritten, StoreError};

/// The advisory lock of an entity's canonical records.
pub(crate) fn entity_lock(schema: &str, entity: &str) -> i64 {
    ops::lock_id(schema, "identity", entity)
}

/// The advisory lock of one canonical record: its links' `written` and
/// `base` are read and rewritten under it (merges, intents, settles).
pub(crate) fn record_lock(schema: &str, entity: &str, cid: &str) -> i64 {
    ops::lock_id(schema, "record", &format!("{entity}\u{0}{cid}"))
}

/// Take the locks of records `(entity, canonical id)`, ascending, once.
pub(crate) async fn lock_records(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    records: &[(&str, &str)],
) -> Result<(), StoreError> {
    let locks: BTreeSet<i64> = records
        .iter()
        .map(|(e, id)| record_lock(ctx.schema, e, id))
        .collect();
    let locks: Vec<i64> = locks.into_iter().collect();
    ops::lock_keys(c, &locks).await
}

/// Whether the record of `w` is linked to `external_id` already (a hint
/// read before any lock: a settle that links a new id takes the entity's
/// lock).
pub(crate) async fn links_id(
    c: &mut Conn,
    row: i64,
    w: &CanonicalWritten,
    external_id: &str,
) -> Result<bool, StoreError> {
    Ok(c.query_opt(
        "SELECT 1 FROM outbox o JOIN links l ON l.system = o.destination
             WHERE o.id = $4 AND l.entity = $1 AND l.canonical_id = $2 AND l.external_id = $3",
        &[&w.entity, &w.canonical_id, &external_id, &row],
    )
    .await?
    .is_some())
}

/// Take the locks of `entities` (ascending, once) for the rest of the
/// transaction: before any key lock.
pub(crate) async fn lock_entities(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    entities: &[&str],
) -> Result<(), StoreError> {
    let locks: BTreeSet<i64> = entities
        .iter()
        .map(|e| entity_lock(ctx.schema, e))
        .collect();
    let locks: Vec<i64> = locks.into_iter().collect();
    ops::lock_keys(c, &locks).await
}

impl ToSql for P<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            P::Null => Ok(IsNull::Yes),
            P::Int(i) => match *ty {
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            P::Real(f) => f.to_sql(ty, out),
            // jsonb's binary form: a version byte, then the text
            P::Text(s) if *ty == Type::JSONB => {
                out.put_u8(1);
                out.put_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            P::Text(s) => s.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT2
                | Type::INT4
                | Type::INT8
                | Type::BOOL
                | Type::FLOAT8
                | Type::TEXT
                | Type::VARCHAR
                | Type::JSONB
        )
    }

    to_sql_checked!();
}

/// A jsonb column as its JSON text.
struct JsonText(String);

impl<'a> FromSql<'a> for JsonText {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        match raw.split_first() {
            Some((1, text)) => Ok(JsonText(std::str::from_utf8(text)?.to_owned())),
            _ => Err("jsonb: unknown binary version".into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
}

fn val(r: &tokio_postgres::Row, i: usize) -> Result<Val, StoreError> {
    let ty = r.columns()[i].type_().clone();
    Ok(match ty {
        Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map_or(Val::Null, Val::Int),
        Type::INT4 => r
            .try_get::<_, Option<i32>>(i)?
            .map_or(Val::Null, |n| Val::Int(n.into())),
        Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map_or(Val::Null, Val::Real),
        Type::BOOL => r
            .try_get::<_, Option<bool>>(i)?
            .map_or(Val::Null, |b| Val::Int(b.into())),
        Type::JSONB => r
            .try_get::<_, Option<JsonText>>(i)?
            .map_or(Val::Null, |j| Val::Text(j.0)),
        _ => r
            .try_get::<_, Option<String>>(i)?
            .map_or(Val::Null, Val::Text),
    })
}

/// A journal connection in a transaction, as the canonical logic uses it.
pub(crate) struct Pg<'a> {
    pub c: &'a mut Conn,
    /// The journal's schema (its key locks).
    pub schema: &'a str,
}

impl Sql for Pg<'_> {
    async fn exec(&mut self, sql: &'static str, p: &[P<'_>]) -> Result<u64, StoreError> {
        let refs: Vec<&(dyn ToSql + Sync)> = p.iter().map(|x| x as &(dyn ToSql + Sync)).collect();
        self.c.execute(sql, &refs).await
    }

    async fn rows(&mut self, sql: &'static str, p: &[P<'_>]) -> Result<Vec<Rec>, StoreError> {
        let refs: Vec<&(dyn ToSql + Sync)> = p.iter().map(|x| x as &(dyn ToSql + Sync)).collect();
        let rows = self.c.query(sql, &refs).await?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| val(r, i))
                    .collect::<Result<_, _>>()
                    .map(Rec)
            })
            .collect()
    }

    async fn lock_records(&mut self, entity: &str, cids: &[&str]) -> Result<(), StoreError> {
        let locks: BTreeSet<i64> = cids
            .iter()
            .map(|id| record_lock(self.schema, entity, id))
            .collect();
        let locks: Vec<i64> = locks.into_iter().collect();
        ops::lock_keys(self.c, &locks).await
    }

    async fn waiting(&mut self, destination: &str, key: &str) -> Result<bool, StoreError> {
        // the record's key lock first: a settle of its queue holds it while
        // it rewrites the queue's rows, so locking a row before the key
        // would deadlock with it
        ops::lock_keys(self.c, &[ops::key_lock(self.schema, key)]).await?;
        // not leased now (a row whose lease ran out is claimed again and
        // reads the record then); locked, so a claim skips it until commit
        let now = crate::now_ms();
        Ok(self
            .c
            .query_opt(
                "SELECT 1 FROM outbox WHERE destination = $1 AND entity_key = $2 AND lease_until <= $3
                 LIMIT 1 FOR SHARE",
                &[&destination, &key, &now],
            )
            .await?
            .is_some())
    }
}

/// Reads: no transaction of their own needed, no row waits.
pub(crate) fn reader<'a>(c: &'a mut Conn, ctx_schema: &'a str) -> Pg<'a> {
    Pg {
        c,
        schema: ctx_schema,
    }
}

pub(crate) fn pg<'a>(c: &'a mut Conn, ctx: &'a Ctx<'_>) -> Pg<'a> {
    Pg {
        c,
        schema: ctx.schema,
    }
}

/// Enqueue the rows a manual decision causes, as follow-ups of `cause`
/// (source, event id, correlation id): their key locks, then their
/// order_seqs, then the rows and their lanes' counts.
async fn enqueue(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    cause: (&str, &str, &str),
    rows: Routed,
) -> Result<Applied, StoreError> {
    let follow_ups: Vec<FollowUp> = rows
        .into_iter()
        .map(|(flow, delivery)| FollowUp {
            flow,
            source: cause.0.to_owned(),
            event_id: cause.1.to_owned(),
            correlation_id: cause.2.to_owned(),
            delivery,
        })
        .collect();
    let changed = follow_ups.len();
    ops::enqueue_follow_ups(c, ctx, &follow_ups).await?;
    Ok(Applied {
        changed,
        ..Applied::default()
    })
}

pub(crate) async fn resolve_conflict(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    r: &crate::ResolveConflict,
) -> Result<Applied, StoreError> {
    c.begin().await?;
    let res = async {
        lock_entities(c, ctx, &[r.rules.entity.as_str()]).await?;
        let (source, event_id, rows) =
            canonical::resolve_conflict(&mut pg(c, ctx), r, crate::now_ms()).await?;
        enqueue(c, ctx, (&source, &event_id, &event_id), rows).await
    }
    .await;
    c.finish(res).await
}

pub(crate) async fn xref_change(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    x: &crate::XrefChange,
) -> Result<Applied, StoreError> {
    c.begin().await?;
    let res = async {
        lock_entities(c, ctx, &[x.rules.entity.as_str()]).await?;
        let (source, event_id, rows) =
            canonical::xref_change(&mut pg(c, ctx), x, crate::now_ms()).await?;
        enqueue(c, ctx, (&source, &event_id, &event_id), rows).await
    }
    .await;
    c.finish(res).await
}

pub(crate) async fn resolve_match(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    r: &crate::ResolveMatch,
) -> Result<Applied, StoreError> {
    c.begin().await?;
    let res = async {
        lock_entities(c, ctx, &[r.rules.entity.as_str()]).await?;
        let (source, event_id, correlation_id, rows) =
            canonical::resolve_match(&mut pg(c, ctx), r, crate::now_ms()).await?;
        enqueue(c, ctx, (&source, &event_id, &correlation_id), rows).await
    }
    .await;
    c.finish(res).await
}

pub(crate) async fn intent(
    c: &mut Conn,
    ctx: &Ctx<'_>,
    system: &str,
    writes: &[CanonicalWritten],
) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    c.begin().await?;
    let res = async {
        // the records' locks only: an intent rewrites its records' links,
        // and merges change them under the same locks
        let records: Vec<(&str, &str)> = writes
            .iter()
            .map(|w| (w.entity.as_str(), w.canonical_id.as_str()))
            .collect();
        lock_records(c, ctx, &records).await?;
        let now = crate::now_ms();
        for w in writes {
            canonical::intend(&mut pg(c, ctx), system, w, now).await?;
        }
        Ok(())
    }
    .await;
    c.finish(res).await
}
