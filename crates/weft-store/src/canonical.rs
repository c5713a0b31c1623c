//! Canonical records on SQLite: a report merged in the ingest transaction
//! (`weft_core::identity::merge`), the rows it causes, and a delivered
//! write recorded as the destination's base in the settle transaction.
//!
//! Tables (migration 5): `canonical(entity, id, state, meta, version, ...)`,
//! `links(entity, canonical_id, system, external_id, base, fingerprint,
//! how, ...)`, `match_keys`, `canonical_history`, `conflicts`.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value, json};
use weft_core::identity::{self, Canonical, FieldMeta, Report};

use crate::{CanonicalReport, CanonicalWritten, NewDelivery, StoreError};

/// The payload of a row that writes a canonical record: the lane reads the
/// record's state when it writes, so a row never carries stale values.
pub fn row_payload(entity: &str, canonical_id: &str) -> String {
    json!({"entity": entity, "canonical_id": canonical_id}).to_string()
}

/// The event a report came in.
pub(crate) struct Ev<'a> {
    pub system: &'a str,
    pub event_id: &'a str,
    pub correlation_id: &'a str,
    pub event_time: i64,
}

struct Link {
    canonical_id: String,
    external_id: Option<String>,
    /// What the system reported last.
    base: Option<Map<String, Value>>,
    /// Per field, weft's writes it has not reported back yet.
    written: Option<Map<String, Value>>,
}

fn parse_obj(s: Option<String>) -> Option<Map<String, Value>> {
    match serde_json::from_str(&s?) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn link_by_external(
    tx: &Connection,
    entity: &str,
    system: &str,
    external_id: &str,
) -> Result<Option<Link>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT canonical_id, external_id, base, written FROM links
             WHERE entity = ?1 AND system = ?2 AND external_id = ?3",
        )?
        .query_row(params![entity, system, external_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?
        .map(|(canonical_id, external_id, base, written)| Link {
            canonical_id,
            external_id,
            base: parse_obj(base),
            written: parse_obj(written),
        }))
}

fn link_of(
    tx: &Connection,
    entity: &str,
    canonical_id: &str,
    system: &str,
) -> Result<Option<Link>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT external_id, base, written FROM links WHERE entity = ?1 AND canonical_id = ?2 AND system = ?3",
        )?
        .query_row(params![entity, canonical_id, system], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?
        .map(|(external_id, base, written)| Link {
            canonical_id: canonical_id.to_owned(),
            external_id,
            base: parse_obj(base),
            written: parse_obj(written),
        }))
}

fn history(
    tx: &Connection,
    entity: &str,
    canonical_id: &str,
    ev: &Ev<'_>,
    action: &str,
    detail: Value,
    now: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO canonical_history (entity, canonical_id, at, system, event_id, correlation_id, action, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        entity,
        canonical_id,
        now,
        ev.system,
        ev.event_id,
        ev.correlation_id,
        action,
        detail.to_string()
    ])?;
    Ok(())
}

fn load(tx: &Connection, entity: &str, id: &str) -> Result<(Canonical, i64), StoreError> {
    let row: Option<(String, String, i64)> = tx
        .prepare_cached("SELECT state, meta, version FROM canonical WHERE entity = ?1 AND id = ?2")?
        .query_row(params![entity, id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((state, meta, version)) = row else {
        return Ok((Canonical::default(), 0));
    };
    let state = parse_obj(Some(state)).unwrap_or_default();
    let meta = serde_json::from_str(&meta).unwrap_or_default();
    Ok((Canonical { state, meta }, version))
}

/// Find the record a report is about: its link, else a match key, else a
/// new record where the system may create one. `None`: refused (recorded).
fn resolve(
    tx: &Connection,
    r: &CanonicalReport,
    ev: &Ev<'_>,
    now: i64,
) -> Result<Option<Link>, StoreError> {
    let entity = &r.rules.entity;
    if let Some(l) = link_by_external(tx, entity, ev.system, &r.external_id)? {
        return Ok(Some(l));
    }
    for (field, value) in r.rules.match_values(&r.fields) {
        let ids: Vec<String> = tx
            .prepare_cached(
                "SELECT canonical_id FROM match_keys WHERE entity = ?1 AND field = ?2 AND value = ?3 LIMIT 2",
            )?
            .query_map(params![entity, field, value], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        if ids.len() != 1 {
            continue;
        }
        let cid = &ids[0];
        // the system may hold the record already under another id: no second link
        let existing = link_of(tx, entity, cid, ev.system)?;
        if existing
            .as_ref()
            .is_some_and(|l| l.external_id.as_deref().is_some_and(|x| x != r.external_id))
        {
            continue;
        }
        tx.prepare_cached(
            "INSERT INTO links (entity, canonical_id, system, external_id, how, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (entity, canonical_id, system) DO UPDATE SET external_id = excluded.external_id,
               updated_at = excluded.updated_at",
        )?
        .execute(params![entity, cid, ev.system, r.external_id, format!("match:{field}"), now])?;
        history(
            tx,
            entity,
            cid,
            ev,
            "linked",
            json!({"external_id": r.external_id, "how": "match", "field": field}),
            now,
        )?;
        return Ok(Some(match existing {
            Some(l) => l,
            None => Link {
                canonical_id: cid.clone(),
                external_id: Some(r.external_id.clone()),
                base: None,
                written: None,
            },
        }));
    }
    if !r.rules.may_create(ev.system) {
        history(
            tx,
            entity,
            "",
            ev,
            "create_refused",
            json!({"external_id": r.external_id,
                   "reason": format!("`{}` may not create {} records and no match key links it", ev.system, entity)}),
            now,
        )?;
        return Ok(None);
    }
    let cid = uuid::Uuid::now_v7().to_string();
    tx.prepare_cached(
        "INSERT INTO links (entity, canonical_id, system, external_id, how, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'source', ?5)",
    )?
    .execute(params![entity, cid, ev.system, r.external_id, now])?;
    history(
        tx,
        entity,
        &cid,
        ev,
        "created",
        json!({"external_id": r.external_id}),
        now,
    )?;
    Ok(Some(Link {
        canonical_id: cid,
        external_id: Some(r.external_id.clone()),
        base: None,
        written: None,
    }))
}

/// Merge a report into its canonical record; returns the rows to enqueue,
/// each with the flow of its route. No row where the destination already
/// holds the values, or already has a row waiting (it reads the record when
/// it is written).
pub(crate) fn apply(
    tx: &Connection,
    r: &CanonicalReport,
    ev: &Ev<'_>,
    now: i64,
) -> Result<Routed, StoreError> {
    let entity = &r.rules.entity;
    let Some(link) = resolve(tx, r, ev, now)? else {
        return Ok(Vec::new());
    };
    let cid = link.canonical_id.clone();
    let (current, version) = load(tx, entity, &cid)?;
    let event_time = r.changed_at.unwrap_or(ev.event_time);
    let m = identity::merge(
        &r.rules,
        &current,
        link.base.as_ref(),
        link.written.as_ref(),
        &Report {
            system: ev.system,
            event_time,
            received_at: now,
            fields: &r.fields,
        },
    );
    if !m.changes.is_empty() {
        let state = Value::Object(m.record.state.clone()).to_string();
        let meta = serde_json::to_string(&m.record.meta)
            .map_err(|e| StoreError::Invalid(format!("canonical record metadata: {e}")))?;
        tx.prepare_cached(
            "INSERT INTO canonical (entity, id, state, meta, version, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT (entity, id) DO UPDATE SET state = excluded.state, meta = excluded.meta,
               version = excluded.version, updated_at = excluded.updated_at",
        )?
        .execute(params![entity, cid, state, meta, version + 1, now])?;
        let touched: Vec<&str> = m.changes.iter().map(|c| c.field.as_str()).collect();
        for k in &r.rules.match_keys {
            if touched.contains(&k.as_str()) || version == 0 {
                tx.prepare_cached(
                    "DELETE FROM match_keys WHERE entity = ?1 AND field = ?2 AND canonical_id = ?3",
                )?
                .execute(params![entity, k, cid])?;
            }
        }
        for (field, value) in r.rules.match_values(&m.record.state) {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO match_keys (entity, field, value, canonical_id) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![entity, field, value, cid])?;
        }
        history(
            tx,
            entity,
            &cid,
            ev,
            "changed",
            json!({"version": version + 1, "changes": m.changes}),
            now,
        )?;
    }
    // the system holds what it reported; what weft last wrote there is no
    // longer known to be there when it changed something
    tx.prepare_cached(
        "UPDATE links SET base = ?4, written = ?7, updated_at = ?5,
           fingerprint = CASE WHEN ?6 THEN NULL ELSE fingerprint END
         WHERE entity = ?1 AND canonical_id = ?2 AND system = ?3",
    )?
    .execute(params![
        entity,
        cid,
        ev.system,
        Value::Object(m.base.clone()).to_string(),
        now,
        m.reported_change,
        Value::Object(m.written.clone()).to_string()
    ])?;
    let recorded: Vec<_> = m.refused.iter().filter(|x| x.recorded).collect();
    if !recorded.is_empty() {
        history(
            tx,
            entity,
            &cid,
            ev,
            "refused",
            json!({"refused": recorded}),
            now,
        )?;
    }
    for o in &m.open {
        tx.prepare_cached(
            "INSERT INTO conflicts (entity, canonical_id, field, current, current_system, proposed, system,
               event_id, status, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'open', ?9)",
        )?
        .execute(params![
            entity,
            cid,
            o.field,
            o.current.to_string(),
            o.current_system,
            o.proposed.to_string(),
            ev.system,
            ev.event_id,
            now
        ])?;
        history(
            tx,
            entity,
            &cid,
            ev,
            "conflict",
            json!({"field": o.field, "current": o.current, "current_system": o.current_system, "proposed": o.proposed}),
            now,
        )?;
    }
    let mut rows = Vec::new();
    for route in &r.rules.routes {
        let t = route.destination.as_str();
        let known = if t == ev.system {
            identity::estimate(Some(&m.base), Some(&m.written))
        } else {
            if m.changes.is_empty() {
                continue;
            }
            link_of(tx, entity, &cid, t)?
                .and_then(|l| identity::estimate(l.base.as_ref(), l.written.as_ref()))
        };
        rows.extend(row_for(
            tx,
            route,
            entity,
            &cid,
            &m.record.state,
            known.as_ref(),
            (ev.system, ev.event_id),
        )?);
    }
    Ok(rows)
}

/// The row writing record `cid` to `route`'s system, unless that system
/// holds `state` already (`known`) or a row of the record waits there (it
/// reads the record when it is written). `cause`: the source and event id
/// the row's idempotency key comes from.
fn row_for(
    tx: &Connection,
    route: &identity::Route,
    entity: &str,
    cid: &str,
    state: &Map<String, Value>,
    known: Option<&Map<String, Value>>,
    cause: (&str, &str),
) -> Result<Option<(String, NewDelivery)>, StoreError> {
    let t = route.destination.as_str();
    if !identity::differs(state, known) {
        return Ok(None);
    }
    let waiting: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM outbox WHERE destination = ?1 AND entity_key = ?2 AND state <> 2)",
        )?
        .query_row(params![t, cid], |row| row.get(0))?;
    if waiting {
        return Ok(None);
    }
    Ok(Some((
        route.flow.clone(),
        NewDelivery {
            destination: t.to_owned(),
            entity_key: Some(cid.to_owned()),
            idempotency_key: weft_core::event::idempotency_key(&route.flow, t, cause.0, cause.1),
            payload: row_payload(entity, cid),
        },
    )))
}

/// A delivered write of a canonical record, in the settle transaction
/// (its values became outstanding before it was sent, [`intend`]): the
/// payload's fingerprint is kept (an identical later write is skipped) and
/// the id it gave is linked. An id already linked to
/// another record is not linked twice (recorded in the history). The base
/// stays what the destination reported: only its reports say what it holds.
pub(crate) fn written(
    tx: &Connection,
    system: &str,
    external_id: Option<&str>,
    w: &CanonicalWritten,
    ev: &Ev<'_>,
    now: i64,
) -> Result<(), StoreError> {
    let mut ext = external_id;
    if let Some(x) = ext
        && let Some(other) = link_by_external(tx, &w.entity, system, x)?
        && other.canonical_id != w.canonical_id
    {
        history(
            tx,
            &w.entity,
            &w.canonical_id,
            ev,
            "link_refused",
            json!({"system": system, "external_id": x, "linked_to": other.canonical_id}),
            now,
        )?;
        ext = None;
    }
    tx.prepare_cached(
        "INSERT INTO links (entity, canonical_id, system, external_id, fingerprint, how, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'written', ?6)
         ON CONFLICT (entity, canonical_id, system) DO UPDATE SET
           external_id = COALESCE(excluded.external_id, external_id),
           fingerprint = excluded.fingerprint, updated_at = excluded.updated_at",
    )?
    .execute(params![
        w.entity,
        w.canonical_id,
        system,
        ext,
        w.fingerprint,
        now
    ])?;
    Ok(())
}

/// Rows for routes: `(flow, delivery)`.
pub(crate) type Routed = Vec<(String, NewDelivery)>;

/// A manual conflict resolved (`Journal::resolve_conflict`): returns the
/// source and event id the rows carry, and the rows.
pub(crate) fn resolve_conflict(
    tx: &Connection,
    r: &crate::ResolveConflict,
    now: i64,
) -> Result<(String, String, Routed), StoreError> {
    let row: Option<(String, String, String, String, String)> = tx
        .prepare_cached(
            "SELECT entity, canonical_id, field, status, system FROM conflicts WHERE id = ?1",
        )?
        .query_row([r.id], |x| {
            Ok((x.get(0)?, x.get(1)?, x.get(2)?, x.get(3)?, x.get(4)?))
        })
        .optional()?;
    let Some((entity, cid, field, status, system)) = row else {
        return Err(StoreError::NotFound(format!("no conflict {}", r.id)));
    };
    if status != "open" {
        return Err(StoreError::Invalid(format!(
            "conflict {} is {status} already",
            r.id
        )));
    }
    if entity != r.rules.entity {
        return Err(StoreError::Invalid(format!(
            "conflict {} is about {entity}, not {}",
            r.id, r.rules.entity
        )));
    }
    let event_id = format!("conflict-{}", r.id);
    let ev = Ev {
        system: "weft",
        event_id: &event_id,
        correlation_id: &event_id,
        event_time: now,
    };
    let (mut current, version) = load(tx, &entity, &cid)?;
    let before = current.state.get(&field).cloned().unwrap_or(Value::Null);
    if let Some(v) = &r.value
        && *v != before
    {
        current.state.insert(field.clone(), v.clone());
        current.meta.insert(
            field.clone(),
            FieldMeta {
                system: "manual".into(),
                at: now,
            },
        );
        let meta = serde_json::to_string(&current.meta)
            .map_err(|e| StoreError::Invalid(format!("canonical record metadata: {e}")))?;
        tx.prepare_cached(
            "UPDATE canonical SET state = ?3, meta = ?4, version = ?5, updated_at = ?6
             WHERE entity = ?1 AND id = ?2",
        )?
        .execute(params![
            entity,
            cid,
            Value::Object(current.state.clone()).to_string(),
            meta,
            version + 1,
            now
        ])?;
    }
    let after = current.state.get(&field).cloned().unwrap_or(Value::Null);
    tx.prepare_cached("UPDATE conflicts SET status = 'resolved', resolved_at = ?2 WHERE id = ?1")?
        .execute(params![r.id, now])?;
    history(
        tx,
        &entity,
        &cid,
        &ev,
        "resolved",
        json!({"conflict": r.id, "field": field, "before": before, "after": after, "note": r.note}),
        now,
    )?;
    let mut rows = Vec::new();
    for route in &r.rules.routes {
        let t = route.destination.as_str();
        let known = link_of(tx, &entity, &cid, t)?
            .and_then(|l| identity::estimate(l.base.as_ref(), l.written.as_ref()));
        rows.extend(row_for(
            tx,
            route,
            &entity,
            &cid,
            &current.state,
            known.as_ref(),
            (&system, &event_id),
        )?);
    }
    Ok((system, event_id, rows))
}

/// Values about to be written to `system` become outstanding (before the
/// write: see `Journal::canonical_intent`).
pub(crate) fn intend(
    tx: &Connection,
    system: &str,
    w: &CanonicalWritten,
    now: i64,
) -> Result<(), StoreError> {
    let link = link_of(tx, &w.entity, &w.canonical_id, system)?;
    let state = parse_obj(Some(w.base.clone())).unwrap_or_default();
    let outstanding = identity::record_write(
        link.as_ref().and_then(|l| l.written.as_ref()),
        link.as_ref().and_then(|l| l.base.as_ref()),
        &state,
        now,
    );
    tx.prepare_cached(
        "INSERT INTO links (entity, canonical_id, system, written, how, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'written', ?5)
         ON CONFLICT (entity, canonical_id, system) DO UPDATE SET
           written = excluded.written, updated_at = excluded.updated_at",
    )?
    .execute(params![
        w.entity,
        w.canonical_id,
        system,
        Value::Object(outstanding).to_string(),
        now
    ])?;
    Ok(())
}

/// A canonical record with its links, for delivery and inspection.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CanonicalView {
    pub entity: String,
    pub id: String,
    pub state: Map<String, Value>,
    pub meta: std::collections::BTreeMap<String, FieldMeta>,
    pub version: i64,
    pub updated_at: i64,
    pub links: Vec<LinkView>,
}

/// One system's link to a canonical record.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LinkView {
    pub system: String,
    pub external_id: Option<String>,
    pub how: String,
    /// What the system reported last.
    pub base: Option<Map<String, Value>>,
    /// Per field, weft's writes it has not reported back yet.
    pub written: Option<Map<String, Value>>,
    pub fingerprint: Option<String>,
}

/// One entry of a record's history.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistoryEntry {
    pub id: i64,
    pub entity: String,
    pub canonical_id: String,
    pub at: i64,
    pub system: String,
    pub event_id: String,
    pub correlation_id: String,
    pub action: String,
    pub detail: Value,
}

/// An open (or resolved) manual conflict.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConflictEntry {
    pub id: i64,
    pub entity: String,
    pub canonical_id: String,
    pub field: String,
    pub current: Value,
    pub current_system: String,
    pub proposed: Value,
    pub system: String,
    pub event_id: String,
    pub status: String,
    pub created_at: i64,
}

pub(crate) fn view(
    conn: &Connection,
    entity: &str,
    id: &str,
) -> Result<Option<CanonicalView>, StoreError> {
    let row: Option<(String, String, i64, i64)> = conn
        .prepare_cached(
            "SELECT state, meta, version, updated_at FROM canonical WHERE entity = ?1 AND id = ?2",
        )?
        .query_row(params![entity, id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((state, meta, version, updated_at)) = row else {
        return Ok(None);
    };
    let links = conn
        .prepare_cached(
            "SELECT system, external_id, how, base, written, fingerprint FROM links
             WHERE entity = ?1 AND canonical_id = ?2 ORDER BY system",
        )?
        .query_map(params![entity, id], |r| {
            Ok(LinkView {
                system: r.get(0)?,
                external_id: r.get(1)?,
                how: r.get(2)?,
                base: parse_obj(r.get(3)?),
                written: parse_obj(r.get(4)?),
                fingerprint: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(CanonicalView {
        entity: entity.to_owned(),
        id: id.to_owned(),
        state: parse_obj(Some(state)).unwrap_or_default(),
        meta: serde_json::from_str(&meta).unwrap_or_default(),
        version,
        updated_at,
        links,
    }))
}

/// Canonical ids of an entity, newest change first.
pub(crate) fn list(
    conn: &Connection,
    entity: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, String)>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT entity, id FROM canonical WHERE ?1 IS NULL OR entity = ?1
             ORDER BY updated_at DESC, id LIMIT ?2",
        )?
        .query_map(params![entity, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?)
}

/// The canonical id linked to a system's id.
pub(crate) fn by_external(
    conn: &Connection,
    entity: &str,
    system: &str,
    external_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(link_by_external(conn, entity, system, external_id)?.map(|l| l.canonical_id))
}

fn history_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HistoryEntry> {
    let detail: String = r.get(8)?;
    Ok(HistoryEntry {
        id: r.get(0)?,
        entity: r.get(1)?,
        canonical_id: r.get(2)?,
        at: r.get(3)?,
        system: r.get(4)?,
        event_id: r.get(5)?,
        correlation_id: r.get(6)?,
        action: r.get(7)?,
        detail: serde_json::from_str(&detail).unwrap_or(Value::String(detail)),
    })
}

/// A record's history (`canonical_id`), or one correlation id's entries.
pub(crate) fn history_of(
    conn: &Connection,
    entity: Option<&str>,
    canonical_id: Option<&str>,
    correlation_id: Option<&str>,
    limit: usize,
) -> Result<Vec<HistoryEntry>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT id, entity, canonical_id, at, system, event_id, correlation_id, action, detail
             FROM canonical_history
             WHERE (?1 IS NULL OR entity = ?1) AND (?2 IS NULL OR canonical_id = ?2)
               AND (?3 IS NULL OR correlation_id = ?3 OR event_id = ?3)
             ORDER BY id LIMIT ?4",
        )?
        .query_map(
            params![entity, canonical_id, correlation_id, limit as i64],
            history_row,
        )?
        .collect::<Result<_, _>>()?)
}

pub(crate) fn conflicts(
    conn: &Connection,
    status: Option<&str>,
    limit: usize,
) -> Result<Vec<ConflictEntry>, StoreError> {
    let parse = |s: String| serde_json::from_str(&s).unwrap_or(Value::String(s));
    Ok(conn
        .prepare_cached(
            "SELECT id, entity, canonical_id, field, current, current_system, proposed, system, event_id,
               status, created_at FROM conflicts WHERE ?1 IS NULL OR status = ?1 ORDER BY id LIMIT ?2",
        )?
        .query_map(params![status, limit as i64], |r| {
            Ok(ConflictEntry {
                id: r.get(0)?,
                entity: r.get(1)?,
                canonical_id: r.get(2)?,
                field: r.get(3)?,
                current: parse(r.get(4)?),
                current_system: r.get(5)?,
                proposed: parse(r.get(6)?),
                system: r.get(7)?,
                event_id: r.get(8)?,
                status: r.get(9)?,
                created_at: r.get(10)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}
