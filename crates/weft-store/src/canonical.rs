//! Canonical records on SQLite: a report merged in the ingest transaction
//! (`weft_core::identity::merge`), the rows it causes, and a delivered
//! write recorded as the destination's base in the settle transaction.
//!
//! Tables (migration 5): `canonical(entity, id, state, meta, version, ...)`,
//! `links(entity, canonical_id, system, external_id, base, fingerprint,
//! how, ...)`, `match_keys`, `canonical_history`, `conflicts`; migration 6:
//! `match_blocks` (fuzzy matching's blocking values) and `matches` (reports
//! held for review).

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
    // refused changes are counted per field, kept or not ([`apply`])
    if action != "refused" {
        count(tx, entity, action, 1)?;
    }
    Ok(())
}

/// Add `n` to an entity's count of `action`, in the caller's transaction.
fn count(tx: &Connection, entity: &str, action: &str, n: usize) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO identity_counts (entity, action, n) VALUES (?1, ?2, ?3)
         ON CONFLICT (entity, action) DO UPDATE SET n = n + excluded.n",
    )?
    .execute(params![entity, action, n as i64])?;
    Ok(())
}

/// What `weft status` says of one entity's canonical records.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IdentitySummary {
    pub entity: String,
    /// Live records (merged ones excluded).
    pub records: i64,
    pub open_conflicts: i64,
    /// Reports held for review by fuzzy matching.
    pub waiting_matches: i64,
    /// History entries per action (`created`, `create_refused`, `refused`,
    /// `conflict`, `linked`, ...), counted with each entry.
    pub actions: std::collections::BTreeMap<String, i64>,
}

pub(crate) fn summary(conn: &Connection) -> Result<Vec<IdentitySummary>, StoreError> {
    let mut out: std::collections::BTreeMap<String, IdentitySummary> = Default::default();
    let q = |sql: &str| -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(conn
            .prepare_cached(sql)?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?)
    };
    let rows = [
        q(
            "SELECT entity, 'records', count(*) FROM canonical WHERE merged_into IS NULL GROUP BY entity",
        )?,
        q(
            "SELECT entity, 'conflicts', count(*) FROM conflicts WHERE status = 'open' GROUP BY entity",
        )?,
        q("SELECT entity, 'matches', count(*) FROM matches WHERE status = 'open' GROUP BY entity")?,
        q("SELECT entity, action, n FROM identity_counts")?,
    ];
    for (i, list) in rows.into_iter().enumerate() {
        for (entity, what, n) in list {
            let s = out
                .entry(entity.clone())
                .or_insert_with(|| IdentitySummary {
                    entity,
                    records: 0,
                    open_conflicts: 0,
                    waiting_matches: 0,
                    actions: Default::default(),
                });
            match i {
                0 => s.records = n,
                1 => s.open_conflicts = n,
                2 => s.waiting_matches = n,
                _ => {
                    s.actions.insert(what, n);
                }
            }
        }
    }
    Ok(out.into_values().collect())
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

/// Whether `system` holds record `cid` under an id other than `external_id`.
fn holds_other(
    tx: &Connection,
    entity: &str,
    cid: &str,
    system: &str,
    external_id: &str,
) -> Result<bool, StoreError> {
    Ok(link_of(tx, entity, cid, system)?
        .is_some_and(|l| l.external_id.as_deref().is_some_and(|x| x != external_id)))
}

/// Link `system`'s `external_id` to record `cid` (kept in its history).
#[allow(clippy::too_many_arguments)]
fn link_to(
    tx: &Connection,
    entity: &str,
    cid: &str,
    ev: &Ev<'_>,
    external_id: &str,
    how: &str,
    detail: Value,
    now: i64,
) -> Result<Link, StoreError> {
    let existing = link_of(tx, entity, cid, ev.system)?;
    tx.prepare_cached(
        "INSERT INTO links (entity, canonical_id, system, external_id, how, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (entity, canonical_id, system) DO UPDATE SET external_id = excluded.external_id,
           how = excluded.how, updated_at = excluded.updated_at",
    )?
    .execute(params![entity, cid, ev.system, external_id, how, now])?;
    history(tx, entity, cid, ev, "linked", detail, now)?;
    Ok(match existing {
        Some(l) => Link {
            external_id: Some(external_id.to_owned()),
            ..l
        },
        None => Link {
            canonical_id: cid.to_owned(),
            external_id: Some(external_id.to_owned()),
            base: None,
            written: None,
        },
    })
}

/// The open review of a system's id: `(id, candidate, held fields)`.
fn open_match(
    tx: &Connection,
    entity: &str,
    system: &str,
    external_id: &str,
) -> Result<Option<(i64, String, String)>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT id, candidate, fields FROM matches
             WHERE entity = ?1 AND system = ?2 AND external_id = ?3 AND status = 'open'",
        )?
        .query_row(params![entity, system, external_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?)
}

/// The best fuzzy candidate for a report, and the runners-up.
struct Best {
    cid: String,
    score: identity::Score,
    /// Up to three next candidates: `(canonical id, score)`.
    others: Vec<(String, f64)>,
}

/// Compare a report with the records sharing one of its blocking values
/// (records `system` holds under another id are not candidates).
fn best_candidate(
    tx: &Connection,
    entity: &str,
    z: &identity::Fuzzy,
    r: &CanonicalReport,
    system: &str,
) -> Result<Option<Best>, StoreError> {
    let mut seen = std::collections::HashSet::new();
    let mut scored: Vec<(String, identity::Score)> = Vec::new();
    for block in z.blocks(&r.fields) {
        let ids: Vec<String> = tx
            .prepare_cached(
                "SELECT canonical_id FROM match_blocks WHERE entity = ?1 AND block = ?2 LIMIT ?3",
            )?
            .query_map(
                params![entity, block, identity::MAX_CANDIDATES as i64],
                |row| row.get(0),
            )?
            .collect::<Result<_, _>>()?;
        for cid in ids {
            if !seen.insert(cid.clone()) || holds_other(tx, entity, &cid, system, &r.external_id)? {
                continue;
            }
            let (c, version) = load(tx, entity, &cid)?;
            if version == 0 {
                continue;
            }
            if let Some(score) = z.score(&r.fields, &c.state) {
                scored.push((cid, score));
            }
        }
    }
    scored.sort_by(|a, b| b.1.total.total_cmp(&a.1.total).then_with(|| a.0.cmp(&b.0)));
    let mut it = scored.into_iter();
    Ok(it.next().map(|(cid, score)| Best {
        cid,
        score,
        others: it.take(3).map(|(c, s)| (c, s.total)).collect(),
    }))
}

/// Find the record a report is about: its link, else a match key, else a
/// new record where the system may create one. `None`: refused (recorded).
fn resolve(
    tx: &Connection,
    r: &CanonicalReport,
    ev: &Ev<'_>,
    now: i64,
    fuzzy: bool,
) -> Result<Option<Link>, StoreError> {
    let entity = &r.rules.entity;
    if let Some(l) = link_by_external(tx, entity, ev.system, &r.external_id)? {
        return Ok(Some(l));
    }
    // held for review already: the latest report waits with it
    if let Some((mid, candidate, fields)) = open_match(tx, entity, ev.system, &r.external_id)? {
        let mut held = parse_obj(Some(fields)).unwrap_or_default();
        held.extend(r.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        tx.prepare_cached(
            "UPDATE matches SET fields = ?2, changed_at = ?3, event_id = ?4, correlation_id = ?5,
               event_time = ?6 WHERE id = ?1",
        )?
        .execute(params![
            mid,
            Value::Object(held).to_string(),
            r.changed_at,
            ev.event_id,
            ev.correlation_id,
            ev.event_time
        ])?;
        history(
            tx,
            entity,
            &candidate,
            ev,
            "match_held",
            json!({"match": mid, "external_id": r.external_id, "again": true}),
            now,
        )?;
        return Ok(None);
    }
    // the echo of a create weft has in flight there, ahead of its response
    if let Some(cid) = pending_create(tx, entity, ev.system, &r.fields)? {
        let detail = json!({"external_id": r.external_id, "how": "create_echo"});
        return link_to(
            tx,
            entity,
            &cid,
            ev,
            &r.external_id,
            "create_echo",
            detail,
            now,
        )
        .map(Some);
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
        if holds_other(tx, entity, cid, ev.system, &r.external_id)? {
            continue;
        }
        let how = format!("match:{field}");
        let detail = json!({"external_id": r.external_id, "how": "match", "field": field});
        return link_to(tx, entity, cid, ev, &r.external_id, &how, detail, now).map(Some);
    }
    if fuzzy
        && let Some(z) = &r.rules.fuzzy
        && let Some(best) = best_candidate(tx, entity, z, r, ev.system)?
    {
        // two candidates above the link threshold: a person decides
        let ambiguous = best.others.first().is_some_and(|(_, s)| *s >= z.link);
        match (z.verdict(best.score.total), ambiguous) {
            (identity::Verdict::Link, false) => {
                let detail =
                    json!({"external_id": r.external_id, "how": "fuzzy", "score": best.score});
                return link_to(
                    tx,
                    entity,
                    &best.cid,
                    ev,
                    &r.external_id,
                    "fuzzy",
                    detail,
                    now,
                )
                .map(Some);
            }
            (identity::Verdict::Create, _) => {}
            _ => {
                let detail = json!({"score": best.score, "others": best.others});
                tx.prepare_cached(
                    "INSERT INTO matches (entity, system, external_id, candidate, score, detail, fields,
                       changed_at, event_id, correlation_id, event_time, status, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'open', ?12)",
                )?
                .execute(params![
                    entity,
                    ev.system,
                    r.external_id,
                    best.cid,
                    best.score.total,
                    detail.to_string(),
                    Value::Object(r.fields.clone()).to_string(),
                    r.changed_at,
                    ev.event_id,
                    ev.correlation_id,
                    ev.event_time,
                    now
                ])?;
                let mid = tx.last_insert_rowid();
                history(
                    tx,
                    entity,
                    &best.cid,
                    ev,
                    "match_held",
                    json!({"match": mid, "external_id": r.external_id, "score": best.score.total}),
                    now,
                )?;
                return Ok(None);
            }
        }
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

/// Most creates in flight to one system compared with a report (the
/// newest): a bound on the work an unknown id costs while weft creates.
const PENDING_SCAN: i64 = 1000;

/// The record whose create weft has in flight to `system` (written, not
/// settled: no id yet) and whose written values `fields` echo, when exactly
/// one does ([`identity::echoes_create`]). Two alike are left to the other
/// rules: which of them this report is cannot be told.
fn pending_create(
    tx: &Connection,
    entity: &str,
    system: &str,
    fields: &Map<String, Value>,
) -> Result<Option<String>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT l.canonical_id, l.written FROM links l
         JOIN canonical c ON c.entity = l.entity AND c.id = l.canonical_id
         WHERE l.entity = ?1 AND l.system = ?2 AND l.external_id IS NULL
           AND l.written IS NOT NULL AND c.merged_into IS NULL
         ORDER BY l.updated_at DESC LIMIT ?3",
    )?;
    let mut rows = stmt.query(params![entity, system, PENDING_SCAN])?;
    let mut found: Option<String> = None;
    while let Some(row) = rows.next()? {
        let written = parse_obj(row.get(1)?).unwrap_or_default();
        if identity::echoes_create(&written, fields) {
            if found.is_some() {
                return Ok(None);
            }
            found = Some(row.get(0)?);
        }
    }
    Ok(found)
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
    apply_with(tx, r, ev, now, true)
}

/// [`apply`]; `fuzzy: false` skips fuzzy matching (a rejected review).
fn apply_with(
    tx: &Connection,
    r: &CanonicalReport,
    ev: &Ev<'_>,
    now: i64,
    fuzzy: bool,
) -> Result<Routed, StoreError> {
    let entity = &r.rules.entity;
    let Some(link) = resolve(tx, r, ev, now, fuzzy)? else {
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
        if let Some(z) = &r.rules.fuzzy
            && (version == 0 || z.block.iter().any(|b| touched.contains(&b.as_str())))
        {
            tx.prepare_cached("DELETE FROM match_blocks WHERE entity = ?1 AND canonical_id = ?2")?
                .execute(params![entity, cid])?;
            for block in z.blocks(&m.record.state) {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO match_blocks (entity, block, canonical_id) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![entity, block, cid])?;
            }
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
    if !m.refused.is_empty() {
        count(tx, entity, "refused", m.refused.len())?;
    }
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
            delivered: false,
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

/// A held match decided (`Journal::resolve_match`): accepted, the system's
/// id is linked to the candidate (or `r.candidate`) and the held report is
/// merged into it; rejected, the report makes a new record (where the
/// system may create one). Returns the source, event id and correlation id
/// the rows carry, and the rows.
pub(crate) fn resolve_match(
    tx: &Connection,
    r: &crate::ResolveMatch,
    now: i64,
) -> Result<(String, String, String, Routed), StoreError> {
    type Held = (
        String,
        String,
        String,
        String,
        String,
        Option<i64>,
        String,
        String,
        i64,
        String,
    );
    let row: Option<Held> = tx
        .prepare_cached(
            "SELECT entity, system, external_id, candidate, fields, changed_at, event_id, correlation_id,
               event_time, status FROM matches WHERE id = ?1",
        )?
        .query_row([r.id], |x| {
            Ok((
                x.get(0)?,
                x.get(1)?,
                x.get(2)?,
                x.get(3)?,
                x.get(4)?,
                x.get(5)?,
                x.get(6)?,
                x.get(7)?,
                x.get(8)?,
                x.get(9)?,
            ))
        })
        .optional()?;
    let Some((
        entity,
        system,
        external_id,
        candidate,
        fields,
        changed_at,
        event_id,
        correlation_id,
        event_time,
        status,
    )) = row
    else {
        return Err(StoreError::NotFound(format!("no match {}", r.id)));
    };
    if status != "open" {
        return Err(StoreError::Invalid(format!(
            "match {} is {status} already",
            r.id
        )));
    }
    if entity != r.rules.entity {
        return Err(StoreError::Invalid(format!(
            "match {} is about {entity}, not {}",
            r.id, r.rules.entity
        )));
    }
    tx.prepare_cached("UPDATE matches SET status = ?2, resolved_at = ?3, note = ?4 WHERE id = ?1")?
        .execute(params![
            r.id,
            if r.accept { "accepted" } else { "rejected" },
            now,
            r.note
        ])?;
    let ev = Ev {
        system: &system,
        event_id: &event_id,
        correlation_id: &correlation_id,
        event_time,
    };
    let report = CanonicalReport {
        rules: r.rules.clone(),
        external_id: external_id.clone(),
        fields: parse_obj(Some(fields)).unwrap_or_default(),
        changed_at,
    };
    if r.accept {
        let target = r.candidate.clone().unwrap_or(candidate);
        if load(tx, &entity, &target)?.1 == 0 {
            return Err(StoreError::NotFound(format!("no {entity} record {target}")));
        }
        if holds_other(tx, &entity, &target, &system, &external_id)? {
            return Err(StoreError::Invalid(format!(
                "{system} holds record {target} under another id already: unlink it first"
            )));
        }
        let detail =
            json!({"external_id": external_id, "how": "review", "match": r.id, "note": r.note});
        link_to(
            tx,
            &entity,
            &target,
            &ev,
            &external_id,
            "review",
            detail,
            now,
        )?;
    } else {
        history(
            tx,
            &entity,
            &candidate,
            &ev,
            "match_rejected",
            json!({"match": r.id, "external_id": external_id, "note": r.note}),
            now,
        )?;
    }
    let rows = apply_with(tx, &report, &ev, now, false)?;
    Ok((system, event_id, correlation_id, rows))
}

/// Rewrite a record's match keys and blocking values from its state.
fn index_record(
    tx: &Connection,
    rules: &identity::Rules,
    cid: &str,
    state: &Map<String, Value>,
) -> Result<(), StoreError> {
    let entity = &rules.entity;
    tx.prepare_cached("DELETE FROM match_keys WHERE entity = ?1 AND canonical_id = ?2")?
        .execute(params![entity, cid])?;
    tx.prepare_cached("DELETE FROM match_blocks WHERE entity = ?1 AND canonical_id = ?2")?
        .execute(params![entity, cid])?;
    for (field, value) in rules.match_values(state) {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO match_keys (entity, field, value, canonical_id) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![entity, field, value, cid])?;
    }
    for block in rules.fuzzy.iter().flat_map(|z| z.blocks(state)) {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO match_blocks (entity, block, canonical_id) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![entity, block, cid])?;
    }
    Ok(())
}

/// A live (not merged) record, or why not.
fn live(tx: &Connection, entity: &str, cid: &str) -> Result<(Canonical, i64), StoreError> {
    let merged: Option<Option<String>> = tx
        .prepare_cached("SELECT merged_into FROM canonical WHERE entity = ?1 AND id = ?2")?
        .query_row(params![entity, cid], |r| r.get(0))
        .optional()?;
    match merged {
        None => Err(StoreError::NotFound(format!("no {entity} record {cid}"))),
        Some(Some(into)) => Err(StoreError::Invalid(format!(
            "{entity} record {cid} was merged into {into}"
        ))),
        Some(None) => load(tx, entity, cid),
    }
}

fn save(
    tx: &Connection,
    entity: &str,
    cid: &str,
    c: &Canonical,
    version: i64,
    now: i64,
) -> Result<(), StoreError> {
    let meta = serde_json::to_string(&c.meta)
        .map_err(|e| StoreError::Invalid(format!("canonical record metadata: {e}")))?;
    tx.prepare_cached(
        "INSERT INTO canonical (entity, id, state, meta, version, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT (entity, id) DO UPDATE SET state = excluded.state, meta = excluded.meta,
           version = excluded.version, updated_at = excluded.updated_at",
    )?
    .execute(params![
        entity,
        cid,
        Value::Object(c.state.clone()).to_string(),
        meta,
        version,
        now
    ])?;
    Ok(())
}

/// A crosswalk change by hand (`Journal::xref_change`): returns the source
/// and event id the rows carry, and the rows (the records it changed,
/// written to every route whose system may lack them).
pub(crate) fn xref_change(
    tx: &Connection,
    c: &crate::XrefChange,
    now: i64,
) -> Result<(String, String, Routed), StoreError> {
    use crate::XrefOp;
    let entity = c.rules.entity.as_str();
    let event_id = format!("xref-{}", uuid::Uuid::now_v7());
    let ev = Ev {
        system: "weft",
        event_id: &event_id,
        correlation_id: &event_id,
        event_time: now,
    };
    // (record, system that holds it already) to write out
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    match &c.op {
        XrefOp::Link {
            canonical_id: cid,
            system,
            external_id,
        } => {
            live(tx, entity, cid)?;
            if let Some(l) = link_by_external(tx, entity, system, external_id)? {
                return Err(StoreError::Invalid(if l.canonical_id == *cid {
                    format!("{system}:{external_id} is linked to {cid} already")
                } else {
                    format!(
                        "{system}:{external_id} is linked to {} already: merge the two records (`weft xref merge`) or unlink it first",
                        l.canonical_id
                    )
                }));
            }
            if let Some(other) = link_of(tx, entity, cid, system)?.and_then(|l| l.external_id) {
                return Err(StoreError::Invalid(format!(
                    "{cid} is linked to {system}:{other} already: unlink it first"
                )));
            }
            let detail = json!({"system": system, "external_id": external_id, "how": "manual", "note": c.note});
            let ev = Ev { system, ..ev };
            link_to(tx, entity, cid, &ev, external_id, "manual", detail, now)?;
            out.push((cid.clone(), None));
        }
        XrefOp::Unlink {
            system,
            external_id,
        } => {
            let Some(l) = link_by_external(tx, entity, system, external_id)? else {
                return Err(StoreError::NotFound(format!(
                    "{system}:{external_id} is not linked to any {entity} record"
                )));
            };
            tx.prepare_cached(
                "DELETE FROM links WHERE entity = ?1 AND canonical_id = ?2 AND system = ?3",
            )?
            .execute(params![entity, l.canonical_id, system])?;
            let detail = json!({"system": system, "external_id": external_id, "note": c.note});
            history(tx, entity, &l.canonical_id, &ev, "unlinked", detail, now)?;
        }
        XrefOp::Split {
            system,
            external_id,
        } => {
            let Some(l) = link_by_external(tx, entity, system, external_id)? else {
                return Err(StoreError::NotFound(format!(
                    "{system}:{external_id} is not linked to any {entity} record"
                )));
            };
            let (current, _) = live(tx, entity, &l.canonical_id)?;
            let others: i64 = tx
                .prepare_cached(
                    "SELECT count(*) FROM links WHERE entity = ?1 AND canonical_id = ?2 AND system <> ?3",
                )?
                .query_row(params![entity, l.canonical_id, system], |r| r.get(0))?;
            if others == 0 {
                return Err(StoreError::Invalid(format!(
                    "{} has no other link: there is nothing to split it from",
                    l.canonical_id
                )));
            }
            // the new record holds what the system reported last
            let state = l.base.clone().unwrap_or_else(|| current.state.clone());
            let meta = state
                .keys()
                .map(|k| {
                    (
                        k.clone(),
                        FieldMeta {
                            system: system.clone(),
                            at: now,
                        },
                    )
                })
                .collect();
            let split = Canonical { state, meta };
            let new_id = uuid::Uuid::now_v7().to_string();
            save(tx, entity, &new_id, &split, 1, now)?;
            tx.prepare_cached(
                "UPDATE links SET canonical_id = ?4, how = 'split', updated_at = ?5
                 WHERE entity = ?1 AND canonical_id = ?2 AND system = ?3",
            )?
            .execute(params![entity, l.canonical_id, system, new_id, now])?;
            index_record(tx, &c.rules, &new_id, &split.state)?;
            let detail = json!({"system": system, "external_id": external_id, "into": new_id, "note": c.note});
            history(tx, entity, &l.canonical_id, &ev, "split", detail, now)?;
            let detail =
                json!({"split_from": l.canonical_id, "system": system, "external_id": external_id});
            history(tx, entity, &new_id, &ev, "created", detail, now)?;
            out.push((new_id, Some(system.clone())));
        }
        XrefOp::Merge { keep, gone } => {
            if keep == gone {
                return Err(StoreError::Invalid(
                    "a record cannot be merged into itself".into(),
                ));
            }
            let (mut kept, version) = live(tx, entity, keep)?;
            let (merged, _) = live(tx, entity, gone)?;
            let links = |cid: &str| -> Result<Vec<(String, Option<String>)>, StoreError> {
                Ok(tx
                    .prepare_cached(
                        "SELECT system, external_id FROM links WHERE entity = ?1 AND canonical_id = ?2",
                    )?
                    .query_map(params![entity, cid], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?)
            };
            let kept_links = links(keep)?;
            for (system, ext) in links(gone)? {
                match kept_links.iter().find(|(s, _)| *s == system) {
                    Some((_, Some(k))) if ext.is_some() => {
                        return Err(StoreError::Invalid(format!(
                            "{system} holds both records ({k} and {}): merge them in {system} first, or unlink one",
                            ext.unwrap_or_default()
                        )));
                    }
                    // the kept record's link there says more: the other goes
                    Some(_) if ext.is_none() => {
                        tx.prepare_cached(
                            "DELETE FROM links WHERE entity = ?1 AND canonical_id = ?2 AND system = ?3",
                        )?
                        .execute(params![entity, gone, system])?;
                    }
                    // the kept record has no id there yet: the merged one's link replaces it
                    Some(_) => {
                        tx.prepare_cached(
                            "DELETE FROM links WHERE entity = ?1 AND canonical_id = ?2 AND system = ?3",
                        )?
                        .execute(params![entity, keep, system])?;
                    }
                    None => {}
                }
            }
            tx.prepare_cached(
                "UPDATE links SET canonical_id = ?3, updated_at = ?4 WHERE entity = ?1 AND canonical_id = ?2",
            )?
            .execute(params![entity, gone, keep, now])?;
            // the fields the kept record lacks come from the merged one
            let mut taken = Vec::new();
            for (k, v) in &merged.state {
                if kept.state.get(k).is_none_or(Value::is_null) && !v.is_null() {
                    kept.state.insert(k.clone(), v.clone());
                    if let Some(m) = merged.meta.get(k) {
                        kept.meta.insert(k.clone(), m.clone());
                    }
                    taken.push(k.clone());
                }
            }
            save(tx, entity, keep, &kept, version + 1, now)?;
            tx.prepare_cached(
                "UPDATE canonical SET merged_into = ?3, updated_at = ?4 WHERE entity = ?1 AND id = ?2",
            )?
            .execute(params![entity, gone, keep, now])?;
            index_record(tx, &c.rules, keep, &kept.state)?;
            tx.prepare_cached("DELETE FROM match_keys WHERE entity = ?1 AND canonical_id = ?2")?
                .execute(params![entity, gone])?;
            tx.prepare_cached("DELETE FROM match_blocks WHERE entity = ?1 AND canonical_id = ?2")?
                .execute(params![entity, gone])?;
            tx.prepare_cached(
                "UPDATE conflicts SET status = 'resolved', resolved_at = ?3
                 WHERE entity = ?1 AND canonical_id = ?2 AND status = 'open'",
            )?
            .execute(params![entity, gone, now])?;
            tx.prepare_cached(
                "UPDATE matches SET candidate = ?3 WHERE entity = ?1 AND candidate = ?2 AND status = 'open'",
            )?
            .execute(params![entity, gone, keep])?;
            let detail = json!({"merged": gone, "fields_taken": taken, "note": c.note});
            history(tx, entity, keep, &ev, "merged", detail, now)?;
            let detail = json!({"into": keep, "note": c.note});
            history(tx, entity, gone, &ev, "merged_into", detail, now)?;
            out.push((keep.clone(), None));
        }
    }
    let mut rows = Vec::new();
    for (cid, holder) in out {
        let (current, _) = load(tx, entity, &cid)?;
        for route in &c.rules.routes {
            let t = route.destination.as_str();
            if holder.as_deref() == Some(t) {
                continue;
            }
            let known = link_of(tx, entity, &cid, t)?
                .and_then(|l| identity::estimate(l.base.as_ref(), l.written.as_ref()));
            rows.extend(row_for(
                tx,
                route,
                entity,
                &cid,
                &current.state,
                known.as_ref(),
                ("weft", &event_id),
            )?);
        }
    }
    Ok(("weft".into(), event_id, rows))
}

/// A report held for review: the system's record and its best candidate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MatchEntry {
    pub id: i64,
    pub entity: String,
    pub system: String,
    pub external_id: String,
    /// The canonical record it may be.
    pub candidate: String,
    pub score: f64,
    /// Per-field scores and the runners-up.
    pub detail: Value,
    /// The held report's fields.
    pub fields: Value,
    pub event_id: String,
    pub status: String,
    pub created_at: i64,
    pub note: Option<String>,
}

pub(crate) fn matches(
    conn: &Connection,
    status: Option<&str>,
    limit: usize,
) -> Result<Vec<MatchEntry>, StoreError> {
    let parse = |s: String| serde_json::from_str(&s).unwrap_or(Value::String(s));
    Ok(conn
        .prepare_cached(
            "SELECT id, entity, system, external_id, candidate, score, detail, fields, event_id, status,
               created_at, note FROM matches WHERE ?1 IS NULL OR status = ?1 ORDER BY id LIMIT ?2",
        )?
        .query_map(params![status, limit as i64], |r| {
            Ok(MatchEntry {
                id: r.get(0)?,
                entity: r.get(1)?,
                system: r.get(2)?,
                external_id: r.get(3)?,
                candidate: r.get(4)?,
                score: r.get(5)?,
                detail: parse(r.get(6)?),
                fields: parse(r.get(7)?),
                event_id: r.get(8)?,
                status: r.get(9)?,
                created_at: r.get(10)?,
                note: r.get(11)?,
            })
        })?
        .collect::<Result<_, _>>()?)
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
    /// Set when this record was merged into another (`weft xref merge`).
    pub merged_into: Option<String>,
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
    type Row = (String, String, i64, i64, Option<String>);
    let row: Option<Row> = conn
        .prepare_cached(
            "SELECT state, meta, version, updated_at, merged_into FROM canonical WHERE entity = ?1 AND id = ?2",
        )?
        .query_row(params![entity, id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((state, meta, version, updated_at, merged_into)) = row else {
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
        merged_into,
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
            "SELECT entity, id FROM canonical WHERE (?1 IS NULL OR entity = ?1) AND merged_into IS NULL
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
