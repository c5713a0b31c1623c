//! Canonical records, on every engine that keeps them: a report merged in
//! the ingest transaction (`weft_core::identity::merge`), the rows it
//! causes, a delivered write recorded as the destination's base in the
//! settle transaction, the manual operations (conflicts, matches, the
//! crosswalk by hand) and the reads. Written once against [`sql::Sql`]:
//! SQLite runs it synchronously in its writer's transaction
//! ([`sql::Lite`]), PostgreSQL in its own (`postgres/canonical.rs`, which
//! holds the entity's lock first).
//!
//! Tables (SQLite migrations 5, 6 and 9; PostgreSQL migration 9):
//! `canonical(entity, id, state, meta, version, ..., merged_into)`,
//! `links(entity, canonical_id, system, external_id, base, written,
//! fingerprint, how, ...)`, `match_keys`, `match_blocks` (fuzzy matching's
//! blocking values), `canonical_history`, `conflicts`, `matches` (reports
//! held for review) and `identity_counts`.

pub(crate) mod sql;

use serde_json::{Map, Value, json};
use weft_core::identity::{self, Canonical, FieldMeta, Report};

use crate::{CanonicalReport, CanonicalWritten, NewDelivery, StoreError};
use sql::{P, Rec, Sql};

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

fn parse_value(s: String) -> Value {
    serde_json::from_str(&s).unwrap_or(Value::String(s))
}

/// A `LIMIT`: `usize::MAX` (no limit) as the largest the engines take.
fn lim(n: usize) -> P<'static> {
    P::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn json_text(v: &impl serde::Serialize, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(format!("canonical {what}: {e}")))
}

async fn link_by_external<D: Sql>(
    db: &mut D,
    entity: &str,
    system: &str,
    external_id: &str,
) -> Result<Option<Link>, StoreError> {
    let Some(r) = db
        .row(
            "SELECT canonical_id, external_id, base, written FROM links
             WHERE entity = $1 AND system = $2 AND external_id = $3",
            &[entity.into(), system.into(), external_id.into()],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(Link {
        canonical_id: r.text(0)?,
        external_id: r.opt_text(1)?,
        base: parse_obj(r.opt_text(2)?),
        written: parse_obj(r.opt_text(3)?),
    }))
}

async fn link_of<D: Sql>(
    db: &mut D,
    entity: &str,
    canonical_id: &str,
    system: &str,
) -> Result<Option<Link>, StoreError> {
    let Some(r) = db
        .row(
            "SELECT external_id, base, written FROM links
             WHERE entity = $1 AND canonical_id = $2 AND system = $3",
            &[entity.into(), canonical_id.into(), system.into()],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(Link {
        canonical_id: canonical_id.to_owned(),
        external_id: r.opt_text(0)?,
        base: parse_obj(r.opt_text(1)?),
        written: parse_obj(r.opt_text(2)?),
    }))
}

/// What a route's system is known to hold of record `cid`.
async fn known_at<D: Sql>(
    db: &mut D,
    entity: &str,
    cid: &str,
    system: &str,
) -> Result<Option<Map<String, Value>>, StoreError> {
    Ok(link_of(db, entity, cid, system)
        .await?
        .and_then(|l| identity::estimate(l.base.as_ref(), l.written.as_ref())))
}

async fn history<D: Sql>(
    db: &mut D,
    entity: &str,
    canonical_id: &str,
    ev: &Ev<'_>,
    action: &str,
    detail: Value,
    now: i64,
) -> Result<(), StoreError> {
    let detail = detail.to_string();
    db.exec(
        "INSERT INTO canonical_history (entity, canonical_id, at, system, event_id, correlation_id, action, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            entity.into(),
            canonical_id.into(),
            now.into(),
            ev.system.into(),
            ev.event_id.into(),
            ev.correlation_id.into(),
            action.into(),
            P::Text(&detail),
        ],
    )
    .await?;
    // refused changes are counted per field, kept or not ([`apply`])
    if action != "refused" {
        count(db, entity, action, 1).await?;
    }
    Ok(())
}

/// Add `n` to an entity's count of `action`, in the caller's transaction.
async fn count<D: Sql>(db: &mut D, entity: &str, action: &str, n: usize) -> Result<(), StoreError> {
    db.exec(
        "INSERT INTO identity_counts (entity, action, n) VALUES ($1, $2, $3)
         ON CONFLICT (entity, action) DO UPDATE SET n = identity_counts.n + excluded.n",
        &[entity.into(), action.into(), P::Int(n as i64)],
    )
    .await?;
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

pub(crate) async fn summary<D: Sql>(db: &mut D) -> Result<Vec<IdentitySummary>, StoreError> {
    let mut out: std::collections::BTreeMap<String, IdentitySummary> = Default::default();
    let queries: [&'static str; 4] = [
        "SELECT entity, 'records', count(*) FROM canonical WHERE merged_into IS NULL GROUP BY entity",
        "SELECT entity, 'conflicts', count(*) FROM conflicts WHERE status = 'open' GROUP BY entity",
        "SELECT entity, 'matches', count(*) FROM matches WHERE status = 'open' GROUP BY entity",
        "SELECT entity, action, n FROM identity_counts",
    ];
    for (i, q) in queries.into_iter().enumerate() {
        for r in db.rows(q, &[]).await? {
            let (entity, what, n) = (r.text(0)?, r.text(1)?, r.int(2)?);
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

async fn load<D: Sql>(db: &mut D, entity: &str, id: &str) -> Result<(Canonical, i64), StoreError> {
    let Some(r) = db
        .row(
            "SELECT state, meta, version FROM canonical WHERE entity = $1 AND id = $2",
            &[entity.into(), id.into()],
        )
        .await?
    else {
        return Ok((Canonical::default(), 0));
    };
    let state = parse_obj(Some(r.text(0)?)).unwrap_or_default();
    let meta = serde_json::from_str(&r.text(1)?).unwrap_or_default();
    Ok((Canonical { state, meta }, r.int(2)?))
}

/// Whether `system` holds record `cid` under an id other than `external_id`.
async fn holds_other<D: Sql>(
    db: &mut D,
    entity: &str,
    cid: &str,
    system: &str,
    external_id: &str,
) -> Result<bool, StoreError> {
    Ok(link_of(db, entity, cid, system)
        .await?
        .is_some_and(|l| l.external_id.as_deref().is_some_and(|x| x != external_id)))
}

/// Link `system`'s `external_id` to record `cid` (kept in its history).
#[allow(clippy::too_many_arguments)]
async fn link_to<D: Sql>(
    db: &mut D,
    entity: &str,
    cid: &str,
    ev: &Ev<'_>,
    external_id: &str,
    how: &str,
    detail: Value,
    now: i64,
) -> Result<Link, StoreError> {
    let existing = link_of(db, entity, cid, ev.system).await?;
    db.exec(
        "INSERT INTO links (entity, canonical_id, system, external_id, how, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (entity, canonical_id, system) DO UPDATE SET external_id = excluded.external_id,
           how = excluded.how, updated_at = excluded.updated_at",
        &[
            entity.into(),
            cid.into(),
            ev.system.into(),
            external_id.into(),
            how.into(),
            now.into(),
        ],
    )
    .await?;
    history(db, entity, cid, ev, "linked", detail, now).await?;
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

/// The best fuzzy candidate for a report, and the runners-up.
struct Best {
    cid: String,
    score: identity::Score,
    /// Up to three next candidates: `(canonical id, score)`.
    others: Vec<(String, f64)>,
}

/// Compare a report with the records sharing one of its blocking values
/// (records `system` holds under another id are not candidates).
async fn best_candidate<D: Sql>(
    db: &mut D,
    entity: &str,
    z: &identity::Fuzzy,
    r: &CanonicalReport,
    system: &str,
) -> Result<Option<Best>, StoreError> {
    let mut seen = std::collections::HashSet::new();
    let mut scored: Vec<(String, identity::Score)> = Vec::new();
    for block in z.blocks(&r.fields) {
        let ids = db
            .rows(
                "SELECT canonical_id FROM match_blocks WHERE entity = $1 AND block = $2
                 ORDER BY canonical_id LIMIT $3",
                &[
                    entity.into(),
                    P::Text(&block),
                    P::Int(identity::MAX_CANDIDATES as i64),
                ],
            )
            .await?;
        for row in ids {
            let cid = row.text(0)?;
            if !seen.insert(cid.clone())
                || holds_other(db, entity, &cid, system, &r.external_id).await?
            {
                continue;
            }
            let (c, version) = load(db, entity, &cid).await?;
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
async fn resolve<D: Sql>(
    db: &mut D,
    r: &CanonicalReport,
    ev: &Ev<'_>,
    now: i64,
    fuzzy: bool,
) -> Result<Option<Link>, StoreError> {
    let entity = &r.rules.entity;
    if let Some(l) = link_by_external(db, entity, ev.system, &r.external_id).await? {
        return Ok(Some(l));
    }
    // held for review already: the latest report waits with it
    if let Some(m) = db
        .row(
            "SELECT id, candidate, fields FROM matches
             WHERE entity = $1 AND system = $2 AND external_id = $3 AND status = 'open'",
            &[entity.into(), ev.system.into(), (&r.external_id).into()],
        )
        .await?
    {
        let (mid, candidate) = (m.int(0)?, m.text(1)?);
        let mut held = parse_obj(m.opt_text(2)?).unwrap_or_default();
        held.extend(r.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        let held = Value::Object(held).to_string();
        db.exec(
            "UPDATE matches SET fields = $2, changed_at = $3, event_id = $4, correlation_id = $5,
               event_time = $6 WHERE id = $1",
            &[
                P::Int(mid),
                P::Text(&held),
                P::opt_int(r.changed_at),
                ev.event_id.into(),
                ev.correlation_id.into(),
                P::Int(ev.event_time),
            ],
        )
        .await?;
        history(
            db,
            entity,
            &candidate,
            ev,
            "match_held",
            json!({"match": mid, "external_id": r.external_id, "again": true}),
            now,
        )
        .await?;
        return Ok(None);
    }
    // the echo of a create weft has in flight there, ahead of its response
    if let Some(cid) = pending_create(db, entity, ev.system, &r.fields).await? {
        let detail = json!({"external_id": r.external_id, "how": "create_echo"});
        return link_to(
            db,
            entity,
            &cid,
            ev,
            &r.external_id,
            "create_echo",
            detail,
            now,
        )
        .await
        .map(Some);
    }
    for (field, value) in r.rules.match_values(&r.fields) {
        let ids = db
            .rows(
                "SELECT canonical_id FROM match_keys WHERE entity = $1 AND field = $2 AND value = $3 LIMIT 2",
                &[entity.into(), P::Text(&field), P::Text(&value)],
            )
            .await?;
        if ids.len() != 1 {
            continue;
        }
        let cid = ids[0].text(0)?;
        // the system may hold the record already under another id: no second link
        if holds_other(db, entity, &cid, ev.system, &r.external_id).await? {
            continue;
        }
        let how = format!("match:{field}");
        let detail = json!({"external_id": r.external_id, "how": "match", "field": field});
        return link_to(db, entity, &cid, ev, &r.external_id, &how, detail, now)
            .await
            .map(Some);
    }
    if fuzzy
        && let Some(z) = &r.rules.fuzzy
        && let Some(best) = best_candidate(db, entity, z, r, ev.system).await?
    {
        // two candidates above the link threshold: a person decides
        let ambiguous = best.others.first().is_some_and(|(_, s)| *s >= z.link);
        match (z.verdict(best.score.total), ambiguous) {
            (identity::Verdict::Link, false) => {
                let detail =
                    json!({"external_id": r.external_id, "how": "fuzzy", "score": best.score});
                return link_to(
                    db,
                    entity,
                    &best.cid,
                    ev,
                    &r.external_id,
                    "fuzzy",
                    detail,
                    now,
                )
                .await
                .map(Some);
            }
            (identity::Verdict::Create, _) => {}
            _ => {
                let detail = json!({"score": best.score, "others": best.others}).to_string();
                let fields = Value::Object(r.fields.clone()).to_string();
                let mid = db
                    .row(
                        "INSERT INTO matches (entity, system, external_id, candidate, score, detail, fields,
                           changed_at, event_id, correlation_id, event_time, status, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'open', $12)
                         RETURNING id",
                        &[
                            entity.into(),
                            ev.system.into(),
                            (&r.external_id).into(),
                            (&best.cid).into(),
                            P::Real(best.score.total),
                            P::Text(&detail),
                            P::Text(&fields),
                            P::opt_int(r.changed_at),
                            ev.event_id.into(),
                            ev.correlation_id.into(),
                            P::Int(ev.event_time),
                            now.into(),
                        ],
                    )
                    .await?
                    .ok_or_else(|| StoreError::Failed("a held match got no id".into()))?
                    .int(0)?;
                history(
                    db,
                    entity,
                    &best.cid,
                    ev,
                    "match_held",
                    json!({"match": mid, "external_id": r.external_id, "score": best.score.total}),
                    now,
                )
                .await?;
                return Ok(None);
            }
        }
    }
    if !r.rules.may_create(ev.system) {
        history(
            db,
            entity,
            "",
            ev,
            "create_refused",
            json!({"external_id": r.external_id,
                   "reason": format!("`{}` may not create {} records and no match key links it", ev.system, entity)}),
            now,
        )
        .await?;
        return Ok(None);
    }
    let cid = uuid::Uuid::now_v7().to_string();
    db.exec(
        "INSERT INTO links (entity, canonical_id, system, external_id, how, updated_at)
         VALUES ($1, $2, $3, $4, 'source', $5)",
        &[
            entity.into(),
            (&cid).into(),
            ev.system.into(),
            (&r.external_id).into(),
            now.into(),
        ],
    )
    .await?;
    history(
        db,
        entity,
        &cid,
        ev,
        "created",
        json!({"external_id": r.external_id}),
        now,
    )
    .await?;
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
async fn pending_create<D: Sql>(
    db: &mut D,
    entity: &str,
    system: &str,
    fields: &Map<String, Value>,
) -> Result<Option<String>, StoreError> {
    let rows = db
        .rows(
            "SELECT l.canonical_id, l.written FROM links l
             JOIN canonical c ON c.entity = l.entity AND c.id = l.canonical_id
             WHERE l.entity = $1 AND l.system = $2 AND l.external_id IS NULL
               AND l.written IS NOT NULL AND c.merged_into IS NULL
             ORDER BY l.updated_at DESC LIMIT $3",
            &[entity.into(), system.into(), P::Int(PENDING_SCAN)],
        )
        .await?;
    let mut found: Option<String> = None;
    for row in rows {
        let written = parse_obj(row.opt_text(1)?).unwrap_or_default();
        if identity::echoes_create(&written, fields) {
            if found.is_some() {
                return Ok(None);
            }
            found = Some(row.text(0)?);
        }
    }
    Ok(found)
}

/// Merge a report into its canonical record; returns the rows to enqueue,
/// each with the flow of its route. No row where the destination already
/// holds the values, or already has a row waiting (it reads the record when
/// it is written).
pub(crate) async fn apply<D: Sql>(
    db: &mut D,
    r: &CanonicalReport,
    ev: &Ev<'_>,
    now: i64,
) -> Result<Routed, StoreError> {
    apply_with(db, r, ev, now, true).await
}

/// Rewrite the match keys of the fields in `fields` (`None`: every field)
/// and, when `blocks`, the blocking values of record `cid` from `state`.
async fn reindex<D: Sql>(
    db: &mut D,
    rules: &identity::Rules,
    cid: &str,
    state: &Map<String, Value>,
    fields: Option<&[&str]>,
    blocks: bool,
) -> Result<(), StoreError> {
    let entity = rules.entity.as_str();
    match fields {
        None => {
            db.exec(
                "DELETE FROM match_keys WHERE entity = $1 AND canonical_id = $2",
                &[entity.into(), cid.into()],
            )
            .await?;
        }
        Some(fields) => {
            for k in fields {
                db.exec(
                    "DELETE FROM match_keys WHERE entity = $1 AND field = $2 AND canonical_id = $3",
                    &[entity.into(), (*k).into(), cid.into()],
                )
                .await?;
            }
        }
    }
    for (field, value) in rules.match_values(state) {
        db.exec(
            "INSERT INTO match_keys (entity, field, value, canonical_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[entity.into(), P::Text(&field), P::Text(&value), cid.into()],
        )
        .await?;
    }
    if blocks {
        db.exec(
            "DELETE FROM match_blocks WHERE entity = $1 AND canonical_id = $2",
            &[entity.into(), cid.into()],
        )
        .await?;
        for block in rules.fuzzy.iter().flat_map(|z| z.blocks(state)) {
            db.exec(
                "INSERT INTO match_blocks (entity, block, canonical_id) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[entity.into(), P::Text(&block), cid.into()],
            )
            .await?;
        }
    }
    Ok(())
}

/// [`apply`]; `fuzzy: false` skips fuzzy matching (a rejected review).
async fn apply_with<D: Sql>(
    db: &mut D,
    r: &CanonicalReport,
    ev: &Ev<'_>,
    now: i64,
    fuzzy: bool,
) -> Result<Routed, StoreError> {
    let entity = &r.rules.entity;
    let Some(link) = resolve(db, r, ev, now, fuzzy).await? else {
        return Ok(Vec::new());
    };
    let cid = link.canonical_id.clone();
    // the record held (an intent or settle of it waits), its link read again
    db.lock_records(entity, &[&cid]).await?;
    let link = link_of(db, entity, &cid, ev.system).await?.unwrap_or(link);
    let (current, version) = load(db, entity, &cid).await?;
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
        save(db, entity, &cid, &m.record, version + 1, now).await?;
        let touched: Vec<&str> = m.changes.iter().map(|c| c.field.as_str()).collect();
        let keys: Vec<&str> = r
            .rules
            .match_keys
            .iter()
            .map(String::as_str)
            .filter(|k| version == 0 || touched.contains(k))
            .collect();
        let blocks =
            r.rules.fuzzy.as_ref().is_some_and(|z| {
                version == 0 || z.block.iter().any(|b| touched.contains(&b.as_str()))
            });
        reindex(db, &r.rules, &cid, &m.record.state, Some(&keys), blocks).await?;
        history(
            db,
            entity,
            &cid,
            ev,
            "changed",
            json!({"version": version + 1, "changes": m.changes}),
            now,
        )
        .await?;
    }
    // the system holds what it reported; what weft last wrote there is no
    // longer known to be there when it changed something
    let (base, written) = (
        Value::Object(m.base.clone()).to_string(),
        Value::Object(m.written.clone()).to_string(),
    );
    db.exec(
        "UPDATE links SET base = $4, written = $7, updated_at = $5,
           fingerprint = CASE WHEN $6 = 1 THEN NULL ELSE fingerprint END
         WHERE entity = $1 AND canonical_id = $2 AND system = $3",
        &[
            entity.into(),
            (&cid).into(),
            ev.system.into(),
            P::Text(&base),
            now.into(),
            P::Int(i64::from(m.reported_change)),
            P::Text(&written),
        ],
    )
    .await?;
    if !m.refused.is_empty() {
        count(db, entity, "refused", m.refused.len()).await?;
    }
    let recorded: Vec<_> = m.refused.iter().filter(|x| x.recorded).collect();
    if !recorded.is_empty() {
        history(
            db,
            entity,
            &cid,
            ev,
            "refused",
            json!({"refused": recorded}),
            now,
        )
        .await?;
    }
    for o in &m.open {
        let (current, proposed) = (o.current.to_string(), o.proposed.to_string());
        db.exec(
            "INSERT INTO conflicts (entity, canonical_id, field, current, current_system, proposed, system,
               event_id, status, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'open', $9)",
            &[
                entity.into(),
                (&cid).into(),
                (&o.field).into(),
                P::Text(&current),
                (&o.current_system).into(),
                P::Text(&proposed),
                ev.system.into(),
                ev.event_id.into(),
                now.into(),
            ],
        )
        .await?;
        history(
            db,
            entity,
            &cid,
            ev,
            "conflict",
            json!({"field": o.field, "current": o.current, "current_system": o.current_system, "proposed": o.proposed}),
            now,
        )
        .await?;
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
            known_at(db, entity, &cid, t).await?
        };
        rows.extend(
            row_for(
                db,
                route,
                entity,
                &cid,
                &m.record.state,
                known.as_ref(),
                (ev.system, ev.event_id),
            )
            .await?,
        );
    }
    Ok(rows)
}

/// The row writing record `cid` to `route`'s system, unless that system
/// holds `state` already (`known`) or a row of the record waits there (it
/// reads the record when it is written). `cause`: the source and event id
/// the row's idempotency key comes from.
async fn row_for<D: Sql>(
    db: &mut D,
    route: &identity::Route,
    entity: &str,
    cid: &str,
    state: &Map<String, Value>,
    known: Option<&Map<String, Value>>,
    cause: (&str, &str),
) -> Result<Option<(String, NewDelivery)>, StoreError> {
    let t = route.destination.as_str();
    if !identity::differs(state, known) || db.waiting(t, cid).await? {
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

/// The rows writing record `cid` (as it is now) to every route of `rules`
/// whose system may lack it, but `holder`'s.
async fn rows_for_record<D: Sql>(
    db: &mut D,
    rules: &identity::Rules,
    cid: &str,
    holder: Option<&str>,
    cause: (&str, &str),
) -> Result<Routed, StoreError> {
    let entity = rules.entity.as_str();
    let (current, _) = load(db, entity, cid).await?;
    let mut rows = Vec::new();
    for route in &rules.routes {
        let t = route.destination.as_str();
        if holder == Some(t) {
            continue;
        }
        let known = known_at(db, entity, cid, t).await?;
        rows.extend(
            row_for(
                db,
                route,
                entity,
                cid,
                &current.state,
                known.as_ref(),
                cause,
            )
            .await?,
        );
    }
    Ok(rows)
}

/// A delivered write of a canonical record, in the settle transaction
/// (its values became outstanding before it was sent, [`intend`]): the
/// payload's fingerprint is kept (an identical later write is skipped) and
/// the id it gave is linked. An id already linked to
/// another record is not linked twice (recorded in the history). The base
/// stays what the destination reported: only its reports say what it holds.
pub(crate) async fn written<D: Sql>(
    db: &mut D,
    system: &str,
    external_id: Option<&str>,
    w: &CanonicalWritten,
    ev: &Ev<'_>,
    now: i64,
) -> Result<(), StoreError> {
    db.lock_records(&w.entity, &[&w.canonical_id]).await?;
    let mut ext = external_id;
    if let Some(x) = ext
        && let Some(other) = link_by_external(db, &w.entity, system, x).await?
        && other.canonical_id != w.canonical_id
    {
        history(
            db,
            &w.entity,
            &w.canonical_id,
            ev,
            "link_refused",
            json!({"system": system, "external_id": x, "linked_to": other.canonical_id}),
            now,
        )
        .await?;
        ext = None;
    }
    db.exec(
        "INSERT INTO links (entity, canonical_id, system, external_id, fingerprint, how, updated_at)
         VALUES ($1, $2, $3, $4, $5, 'written', $6)
         ON CONFLICT (entity, canonical_id, system) DO UPDATE SET
           external_id = COALESCE(excluded.external_id, links.external_id),
           fingerprint = excluded.fingerprint, updated_at = excluded.updated_at",
        &[
            (&w.entity).into(),
            (&w.canonical_id).into(),
            system.into(),
            P::opt(ext),
            (&w.fingerprint).into(),
            now.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Rows for routes: `(flow, delivery)`.
pub(crate) type Routed = Vec<(String, NewDelivery)>;

/// A manual conflict resolved (`Journal::resolve_conflict`): returns the
/// source and event id the rows carry, and the rows.
pub(crate) async fn resolve_conflict<D: Sql>(
    db: &mut D,
    r: &crate::ResolveConflict,
    now: i64,
) -> Result<(String, String, Routed), StoreError> {
    let Some(row) = db
        .row(
            "SELECT entity, canonical_id, field, status, system FROM conflicts WHERE id = $1",
            &[P::Int(r.id)],
        )
        .await?
    else {
        return Err(StoreError::NotFound(format!("no conflict {}", r.id)));
    };
    let (entity, cid, field, status, system) = (
        row.text(0)?,
        row.text(1)?,
        row.text(2)?,
        row.text(3)?,
        row.text(4)?,
    );
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
    db.lock_records(&entity, &[&cid]).await?;
    let (mut current, version) = load(db, &entity, &cid).await?;
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
        save(db, &entity, &cid, &current, version + 1, now).await?;
    }
    let after = current.state.get(&field).cloned().unwrap_or(Value::Null);
    db.exec(
        "UPDATE conflicts SET status = 'resolved', resolved_at = $2 WHERE id = $1",
        &[P::Int(r.id), now.into()],
    )
    .await?;
    history(
        db,
        &entity,
        &cid,
        &ev,
        "resolved",
        json!({"conflict": r.id, "field": field, "before": before, "after": after, "note": r.note}),
        now,
    )
    .await?;
    let rows = rows_for_record(db, &r.rules, &cid, None, (&system, &event_id)).await?;
    Ok((system, event_id, rows))
}

/// A held match decided (`Journal::resolve_match`): accepted, the system's
/// id is linked to the candidate (or `r.candidate`) and the held report is
/// merged into it; rejected, the report makes a new record (where the
/// system may create one). Returns the source, event id and correlation id
/// the rows carry, and the rows.
pub(crate) async fn resolve_match<D: Sql>(
    db: &mut D,
    r: &crate::ResolveMatch,
    now: i64,
) -> Result<(String, String, String, Routed), StoreError> {
    let Some(row) = db
        .row(
            "SELECT entity, system, external_id, candidate, fields, changed_at, event_id, correlation_id,
               event_time, status FROM matches WHERE id = $1",
            &[P::Int(r.id)],
        )
        .await?
    else {
        return Err(StoreError::NotFound(format!("no match {}", r.id)));
    };
    let entity = row.text(0)?;
    let system = row.text(1)?;
    let external_id = row.text(2)?;
    let candidate = row.text(3)?;
    let fields = row.text(4)?;
    let changed_at = row.opt_int(5)?;
    let event_id = row.text(6)?;
    let correlation_id = row.text(7)?;
    let event_time = row.int(8)?;
    let status = row.text(9)?;
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
    db.exec(
        "UPDATE matches SET status = $2, resolved_at = $3, note = $4 WHERE id = $1",
        &[
            P::Int(r.id),
            if r.accept { "accepted" } else { "rejected" }.into(),
            now.into(),
            (&r.note).into(),
        ],
    )
    .await?;
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
        if load(db, &entity, &target).await?.1 == 0 {
            return Err(StoreError::NotFound(format!("no {entity} record {target}")));
        }
        if holds_other(db, &entity, &target, &system, &external_id).await? {
            return Err(StoreError::Invalid(format!(
                "{system} holds record {target} under another id already: unlink it first"
            )));
        }
        let detail =
            json!({"external_id": external_id, "how": "review", "match": r.id, "note": r.note});
        link_to(
            db,
            &entity,
            &target,
            &ev,
            &external_id,
            "review",
            detail,
            now,
        )
        .await?;
    } else {
        history(
            db,
            &entity,
            &candidate,
            &ev,
            "match_rejected",
            json!({"match": r.id, "external_id": external_id, "note": r.note}),
            now,
        )
        .await?;
    }
    let rows = apply_with(db, &report, &ev, now, false).await?;
    Ok((system, event_id, correlation_id, rows))
}

/// A live (not merged) record, or why not.
async fn live<D: Sql>(db: &mut D, entity: &str, cid: &str) -> Result<(Canonical, i64), StoreError> {
    let merged = db
        .row(
            "SELECT merged_into FROM canonical WHERE entity = $1 AND id = $2",
            &[entity.into(), cid.into()],
        )
        .await?;
    match merged.map(|r| r.opt_text(0)).transpose()? {
        None => Err(StoreError::NotFound(format!("no {entity} record {cid}"))),
        Some(Some(into)) => Err(StoreError::Invalid(format!(
            "{entity} record {cid} was merged into {into}"
        ))),
        Some(None) => load(db, entity, cid).await,
    }
}

async fn save<D: Sql>(
    db: &mut D,
    entity: &str,
    cid: &str,
    c: &Canonical,
    version: i64,
    now: i64,
) -> Result<(), StoreError> {
    let meta = json_text(&c.meta, "record metadata")?;
    let state = Value::Object(c.state.clone()).to_string();
    db.exec(
        "INSERT INTO canonical (entity, id, state, meta, version, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (entity, id) DO UPDATE SET state = excluded.state, meta = excluded.meta,
           version = excluded.version, updated_at = excluded.updated_at",
        &[
            entity.into(),
            cid.into(),
            P::Text(&state),
            P::Text(&meta),
            P::Int(version),
            now.into(),
        ],
    )
    .await?;
    Ok(())
}

async fn delete_link<D: Sql>(
    db: &mut D,
    entity: &str,
    cid: &str,
    system: &str,
) -> Result<(), StoreError> {
    db.exec(
        "DELETE FROM links WHERE entity = $1 AND canonical_id = $2 AND system = $3",
        &[entity.into(), cid.into(), system.into()],
    )
    .await?;
    Ok(())
}

/// A crosswalk change by hand (`Journal::xref_change`): returns the source
/// and event id the rows carry, and the rows (the records it changed,
/// written to every route whose system may lack them).
pub(crate) async fn xref_change<D: Sql>(
    db: &mut D,
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
    // the records it changes held first (intents and settles hold them)
    let held: Vec<String> = match &c.op {
        XrefOp::Link { canonical_id, .. } => vec![canonical_id.clone()],
        XrefOp::Unlink {
            system,
            external_id,
        }
        | XrefOp::Split {
            system,
            external_id,
        } => by_external(db, entity, system, external_id)
            .await?
            .into_iter()
            .collect(),
        XrefOp::Merge { keep, gone } => vec![keep.clone(), gone.clone()],
    };
    let held: Vec<&str> = held.iter().map(String::as_str).collect();
    db.lock_records(entity, &held).await?;
    match &c.op {
        XrefOp::Link {
            canonical_id: cid,
            system,
            external_id,
        } => {
            live(db, entity, cid).await?;
            if let Some(l) = link_by_external(db, entity, system, external_id).await? {
                return Err(StoreError::Invalid(if l.canonical_id == *cid {
                    format!("{system}:{external_id} is linked to {cid} already")
                } else {
                    format!(
                        "{system}:{external_id} is linked to {} already: merge the two records (`weft xref merge`) or unlink it first",
                        l.canonical_id
                    )
                }));
            }
            if let Some(other) = link_of(db, entity, cid, system)
                .await?
                .and_then(|l| l.external_id)
            {
                return Err(StoreError::Invalid(format!(
                    "{cid} is linked to {system}:{other} already: unlink it first"
                )));
            }
            let detail = json!({"system": system, "external_id": external_id, "how": "manual", "note": c.note});
            let ev = Ev { system, ..ev };
            link_to(db, entity, cid, &ev, external_id, "manual", detail, now).await?;
            out.push((cid.clone(), None));
        }
        XrefOp::Unlink {
            system,
            external_id,
        } => {
            let Some(l) = link_by_external(db, entity, system, external_id).await? else {
                return Err(StoreError::NotFound(format!(
                    "{system}:{external_id} is not linked to any {entity} record"
                )));
            };
            delete_link(db, entity, &l.canonical_id, system).await?;
            let detail = json!({"system": system, "external_id": external_id, "note": c.note});
            history(db, entity, &l.canonical_id, &ev, "unlinked", detail, now).await?;
        }
        XrefOp::Split {
            system,
            external_id,
        } => {
            let Some(l) = link_by_external(db, entity, system, external_id).await? else {
                return Err(StoreError::NotFound(format!(
                    "{system}:{external_id} is not linked to any {entity} record"
                )));
            };
            let (current, _) = live(db, entity, &l.canonical_id).await?;
            let others = db
                .row(
                    "SELECT count(*) FROM links WHERE entity = $1 AND canonical_id = $2 AND system <> $3",
                    &[entity.into(), (&l.canonical_id).into(), system.into()],
                )
                .await?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0);
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
            save(db, entity, &new_id, &split, 1, now).await?;
            db.exec(
                "UPDATE links SET canonical_id = $4, how = 'split', updated_at = $5
                 WHERE entity = $1 AND canonical_id = $2 AND system = $3",
                &[
                    entity.into(),
                    (&l.canonical_id).into(),
                    system.into(),
                    (&new_id).into(),
                    now.into(),
                ],
            )
            .await?;
            reindex(db, &c.rules, &new_id, &split.state, None, true).await?;
            let detail = json!({"system": system, "external_id": external_id, "into": new_id, "note": c.note});
            history(db, entity, &l.canonical_id, &ev, "split", detail, now).await?;
            let detail =
                json!({"split_from": l.canonical_id, "system": system, "external_id": external_id});
            history(db, entity, &new_id, &ev, "created", detail, now).await?;
            out.push((new_id, Some(system.clone())));
        }
        XrefOp::Merge { keep, gone } => {
            if keep == gone {
                return Err(StoreError::Invalid(
                    "a record cannot be merged into itself".into(),
                ));
            }
            let (mut kept, version) = live(db, entity, keep).await?;
            let (merged, _) = live(db, entity, gone).await?;
            const LINKS: &str =
                "SELECT system, external_id FROM links WHERE entity = $1 AND canonical_id = $2";
            let mut kept_links = Vec::new();
            for r in db.rows(LINKS, &[entity.into(), keep.into()]).await? {
                kept_links.push((r.text(0)?, r.opt_text(1)?));
            }
            for r in db.rows(LINKS, &[entity.into(), gone.into()]).await? {
                let (system, ext) = (r.text(0)?, r.opt_text(1)?);
                match kept_links.iter().find(|(s, _)| *s == system) {
                    Some((_, Some(k))) if ext.is_some() => {
                        return Err(StoreError::Invalid(format!(
                            "{system} holds both records ({k} and {}): merge them in {system} first, or unlink one",
                            ext.unwrap_or_default()
                        )));
                    }
                    // the kept record's link there says more: the other goes
                    Some(_) if ext.is_none() => delete_link(db, entity, gone, &system).await?,
                    // the kept record has no id there yet: the merged one's link replaces it
                    Some(_) => delete_link(db, entity, keep, &system).await?,
                    None => {}
                }
            }
            db.exec(
                "UPDATE links SET canonical_id = $3, updated_at = $4 WHERE entity = $1 AND canonical_id = $2",
                &[entity.into(), gone.into(), keep.into(), now.into()],
            )
            .await?;
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
            save(db, entity, keep, &kept, version + 1, now).await?;
            db.exec(
                "UPDATE canonical SET merged_into = $3, updated_at = $4 WHERE entity = $1 AND id = $2",
                &[entity.into(), gone.into(), keep.into(), now.into()],
            )
            .await?;
            reindex(db, &c.rules, keep, &kept.state, None, true).await?;
            reindex(db, &c.rules, gone, &Map::new(), None, true).await?;
            db.exec(
                "UPDATE conflicts SET status = 'resolved', resolved_at = $3
                 WHERE entity = $1 AND canonical_id = $2 AND status = 'open'",
                &[entity.into(), gone.into(), now.into()],
            )
            .await?;
            db.exec(
                "UPDATE matches SET candidate = $3 WHERE entity = $1 AND candidate = $2 AND status = 'open'",
                &[entity.into(), gone.into(), keep.into()],
            )
            .await?;
            let detail = json!({"merged": gone, "fields_taken": taken, "note": c.note});
            history(db, entity, keep, &ev, "merged", detail, now).await?;
            let detail = json!({"into": keep, "note": c.note});
            history(db, entity, gone, &ev, "merged_into", detail, now).await?;
            out.push((keep.clone(), None));
        }
    }
    let mut rows = Vec::new();
    for (cid, holder) in out {
        rows.extend(
            rows_for_record(db, &c.rules, &cid, holder.as_deref(), ("weft", &event_id)).await?,
        );
    }
    Ok(("weft".into(), event_id, rows))
}

/// Values about to be written to `system` become outstanding (before the
/// write: see `Journal::canonical_intent`).
pub(crate) async fn intend<D: Sql>(
    db: &mut D,
    system: &str,
    w: &CanonicalWritten,
    now: i64,
) -> Result<(), StoreError> {
    db.lock_records(&w.entity, &[&w.canonical_id]).await?;
    let link = link_of(db, &w.entity, &w.canonical_id, system).await?;
    let state = parse_obj(Some(w.base.clone())).unwrap_or_default();
    let outstanding = identity::record_write(
        link.as_ref().and_then(|l| l.written.as_ref()),
        link.as_ref().and_then(|l| l.base.as_ref()),
        &state,
        now,
    );
    let outstanding = Value::Object(outstanding).to_string();
    db.exec(
        "INSERT INTO links (entity, canonical_id, system, written, how, updated_at)
         VALUES ($1, $2, $3, $4, 'written', $5)
         ON CONFLICT (entity, canonical_id, system) DO UPDATE SET
           written = excluded.written, updated_at = excluded.updated_at",
        &[
            (&w.entity).into(),
            (&w.canonical_id).into(),
            system.into(),
            P::Text(&outstanding),
            now.into(),
        ],
    )
    .await?;
    Ok(())
}

pub(crate) async fn matches<D: Sql>(
    db: &mut D,
    status: Option<&str>,
    limit: usize,
) -> Result<Vec<MatchEntry>, StoreError> {
    let rows = db
        .rows(
            "SELECT id, entity, system, external_id, candidate, score, detail, fields, event_id, status,
               created_at, note FROM matches
             WHERE CAST($1 AS TEXT) IS NULL OR status = $1 ORDER BY id LIMIT $2",
            &[P::opt(status), lim(limit)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(MatchEntry {
                id: r.int(0)?,
                entity: r.text(1)?,
                system: r.text(2)?,
                external_id: r.text(3)?,
                candidate: r.text(4)?,
                score: r.real(5)?,
                detail: parse_value(r.text(6)?),
                fields: parse_value(r.text(7)?),
                event_id: r.text(8)?,
                status: r.text(9)?,
                created_at: r.int(10)?,
                note: r.opt_text(11)?,
            })
        })
        .collect()
}

pub(crate) async fn view<D: Sql>(
    db: &mut D,
    entity: &str,
    id: &str,
) -> Result<Option<CanonicalView>, StoreError> {
    let Some(r) = db
        .row(
            "SELECT state, meta, version, updated_at, merged_into FROM canonical WHERE entity = $1 AND id = $2",
            &[entity.into(), id.into()],
        )
        .await?
    else {
        return Ok(None);
    };
    let links = db
        .rows(
            "SELECT system, external_id, how, base, written, fingerprint FROM links
             WHERE entity = $1 AND canonical_id = $2 ORDER BY system",
            &[entity.into(), id.into()],
        )
        .await?
        .iter()
        .map(|l| {
            Ok(LinkView {
                system: l.text(0)?,
                external_id: l.opt_text(1)?,
                how: l.text(2)?,
                base: parse_obj(l.opt_text(3)?),
                written: parse_obj(l.opt_text(4)?),
                fingerprint: l.opt_text(5)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(Some(CanonicalView {
        entity: entity.to_owned(),
        id: id.to_owned(),
        state: parse_obj(Some(r.text(0)?)).unwrap_or_default(),
        meta: serde_json::from_str(&r.text(1)?).unwrap_or_default(),
        version: r.int(2)?,
        updated_at: r.int(3)?,
        merged_into: r.opt_text(4)?,
        links,
    }))
}

/// Canonical ids of an entity, newest change first.
pub(crate) async fn list<D: Sql>(
    db: &mut D,
    entity: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, String)>, StoreError> {
    db.rows(
        "SELECT entity, id FROM canonical
         WHERE (CAST($1 AS TEXT) IS NULL OR entity = $1) AND merged_into IS NULL
         ORDER BY updated_at DESC, id LIMIT $2",
        &[P::opt(entity), lim(limit)],
    )
    .await?
    .iter()
    .map(|r| Ok((r.text(0)?, r.text(1)?)))
    .collect()
}

/// The canonical id linked to a system's id.
pub(crate) async fn by_external<D: Sql>(
    db: &mut D,
    entity: &str,
    system: &str,
    external_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(link_by_external(db, entity, system, external_id)
        .await?
        .map(|l| l.canonical_id))
}

fn history_row(r: &Rec) -> Result<HistoryEntry, StoreError> {
    Ok(HistoryEntry {
        id: r.int(0)?,
        entity: r.text(1)?,
        canonical_id: r.text(2)?,
        at: r.int(3)?,
        system: r.text(4)?,
        event_id: r.text(5)?,
        correlation_id: r.text(6)?,
        action: r.text(7)?,
        detail: parse_value(r.text(8)?),
    })
}

/// A record's history (`canonical_id`), or one correlation id's entries.
pub(crate) async fn history_of<D: Sql>(
    db: &mut D,
    f: &crate::HistoryFilter,
) -> Result<Vec<HistoryEntry>, StoreError> {
    db.rows(
        "SELECT id, entity, canonical_id, at, system, event_id, correlation_id, action, detail
         FROM canonical_history
         WHERE (CAST($1 AS TEXT) IS NULL OR entity = $1) AND (CAST($2 AS TEXT) IS NULL OR canonical_id = $2)
           AND (CAST($3 AS TEXT) IS NULL OR correlation_id = $3 OR event_id = $3)
         ORDER BY id LIMIT $4",
        &[
            P::opt(f.entity.as_deref()),
            P::opt(f.canonical_id.as_deref()),
            P::opt(f.correlation_id.as_deref()),
            lim(if f.limit == 0 { 10_000 } else { f.limit }),
        ],
    )
    .await?
    .iter()
    .map(history_row)
    .collect()
}

pub(crate) async fn conflicts<D: Sql>(
    db: &mut D,
    status: Option<&str>,
    limit: usize,
) -> Result<Vec<ConflictEntry>, StoreError> {
    db.rows(
        "SELECT id, entity, canonical_id, field, current, current_system, proposed, system, event_id,
           status, created_at FROM conflicts
         WHERE CAST($1 AS TEXT) IS NULL OR status = $1 ORDER BY id LIMIT $2",
        &[P::opt(status), lim(limit)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(ConflictEntry {
            id: r.int(0)?,
            entity: r.text(1)?,
            canonical_id: r.text(2)?,
            field: r.text(3)?,
            current: parse_value(r.text(4)?),
            current_system: r.text(5)?,
            proposed: parse_value(r.text(6)?),
            system: r.text(7)?,
            event_id: r.text(8)?,
            status: r.text(9)?,
            created_at: r.int(10)?,
        })
    })
    .collect()
}
