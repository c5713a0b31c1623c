//! Identity: one canonical record per real-world thing, whichever systems
//! hold it under which ids.
//!
//! This module is the pure part, used by every journal engine inside its
//! ingest transaction: the rules of an entity (who may create, who owns
//! which field, how a conflict is decided) and [`merge`], which folds one
//! system's report of a record into the canonical record.
//!
//! # The model
//!
//! For each canonical record weft keeps its state (top-level fields), per
//! field the system that last set it and when, and per linked system a
//! **base**: the values that system is known to hold (what it reported last,
//! or what weft wrote to it last). A report from system `S` is compared field
//! by field with `S`'s base, never with timing:
//!
//! - equal to the base: `S` did not change the field (an unchanged field, or
//!   the echo of weft's own write): nothing happens;
//! - different, and `S`'s base equals the canonical value: `S` changed a field
//!   it was up to date on: a clean change, applied if `S` may set the field;
//! - different, and the canonical value moved on since `S` last synced (another
//!   system changed it meanwhile, or `S` never synced it): a **conflict**,
//!   decided by the entity's policy (last write wins by event time, source of
//!   truth by rank, or manual: queued with both values).
//!
//! After the report, `S`'s base is what `S` reported: it holds those values
//! now, so a system whose value lost a conflict differs from the canonical
//! record and is written back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How a conflict on one field is decided.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// The report with the later event time wins (a tie goes to the report).
    /// Event times come from the systems' clocks (or weft's receipt time when
    /// a source gives none): skewed clocks decide wrongly.
    #[default]
    LastWriteWins,
    /// The system ranked higher in the field's owner list wins.
    SourceOfTruth,
    /// Nothing changes; the conflict waits with both values until someone
    /// resolves it (`weft conflicts resolve`).
    Manual,
}

/// What happens to a change from a system that does not own the field.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum NonOwnerPolicy {
    /// Ignored and counted.
    #[default]
    Drop,
    /// Ignored, counted and recorded in the record's history with the value.
    Flag,
}

/// Where a canonical record's changes are written: one flow's lane to one
/// destination system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub flow: String,
    pub destination: String,
}

/// The identity rules of one entity (config `identity.<entity>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub entity: String,
    /// Systems that may create a canonical record; `None`: every system.
    pub create: Option<Vec<String>>,
    /// Owners per top-level field, ranked (first = most trusted); the key
    /// `*` gives the owners of every other field. No entry: anyone.
    pub owners: BTreeMap<String, Vec<String>>,
    pub conflict: ConflictPolicy,
    pub non_owner: NonOwnerPolicy,
    /// Fields whose normalised value links a new id to an existing record
    /// before one is created (an email, a tax id).
    pub match_keys: Vec<String>,
    /// Fuzzy matching, tried after the exact keys found nothing.
    pub fuzzy: Option<Fuzzy>,
    /// One route per destination system, in config order.
    pub routes: Vec<Route>,
}

impl Rules {
    /// The ranked owners of `field`, or `None` when anyone may set it.
    pub fn owners_of(&self, field: &str) -> Option<&[String]> {
        self.owners
            .get(field)
            .or_else(|| self.owners.get("*"))
            .map(Vec::as_slice)
    }

    pub fn may_create(&self, system: &str) -> bool {
        self.create
            .as_ref()
            .is_none_or(|c| c.iter().any(|s| s == system))
    }

    /// The normalised match keys of a record: `(field, value)` for each
    /// configured field with a non-empty value.
    pub fn match_values(&self, fields: &Map<String, Value>) -> Vec<(String, String)> {
        self.match_keys
            .iter()
            .filter_map(|k| {
                let v = fields.get(k)?;
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => return None,
                    other => other.to_string(),
                };
                let n = normalize_key(&text);
                (!n.is_empty()).then(|| (k.clone(), n))
            })
            .collect()
    }
}

/// Candidates read per blocking value: a block larger than this (a value
/// many records share) is compared with its most recent records only.
pub const MAX_CANDIDATES: usize = 200;

/// Fuzzy matching before create (config `identity.<entity>.fuzzy`): a record
/// weft has no link or exact key for is compared with the records that
/// share one of its blocking values; the best score decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Fuzzy {
    /// Compared fields (top-level, normalised as match keys are, then
    /// Jaro-Winkler) and their weights.
    pub fields: Vec<(String, f64)>,
    /// Blocking fields: only records sharing the normalised value of one of
    /// them are compared (what keeps matching cheap at a million records).
    pub block: Vec<String>,
    /// At or above: linked without asking.
    pub link: f64,
    /// At or above (and below `link`): held for review (`weft matches`);
    /// below: a new record.
    pub review: f64,
}

/// What a score means under [`Fuzzy`]'s thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Link,
    Review,
    Create,
}

/// A candidate's score: the weighted mean and each compared field's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub total: f64,
    pub fields: BTreeMap<String, f64>,
}

fn text_of(v: Option<&Value>) -> Option<String> {
    let t = match v? {
        Value::String(s) => normalize_key(s),
        Value::Null => return None,
        other => normalize_key(&other.to_string()),
    };
    (!t.is_empty()).then_some(t)
}

impl Fuzzy {
    /// The blocking values of a record: `field` + U+001F + normalised value.
    pub fn blocks(&self, fields: &Map<String, Value>) -> Vec<String> {
        self.block
            .iter()
            .filter_map(|f| text_of(fields.get(f)).map(|v| format!("{f}\u{1f}{v}")))
            .collect()
    }

    /// How alike two records are, from 0 to 1; `None` when the fields both
    /// hold carry half the total weight or less (too little to judge).
    pub fn score(&self, a: &Map<String, Value>, b: &Map<String, Value>) -> Option<Score> {
        let total: f64 = self.fields.iter().map(|(_, w)| w).sum();
        let (mut sum, mut weight) = (0.0, 0.0);
        let mut fields = BTreeMap::new();
        for (f, w) in &self.fields {
            let (Some(x), Some(y)) = (text_of(a.get(f)), text_of(b.get(f))) else {
                continue;
            };
            let s = strsim::jaro_winkler(&x, &y);
            sum += s * w;
            weight += w;
            fields.insert(f.clone(), (s * 1000.0).round() / 1000.0);
        }
        if total <= 0.0 || weight * 2.0 <= total {
            return None;
        }
        Some(Score {
            total: (sum / weight * 1000.0).round() / 1000.0,
            fields,
        })
    }

    pub fn verdict(&self, score: f64) -> Verdict {
        if score >= self.link {
            Verdict::Link
        } else if score >= self.review {
            Verdict::Review
        } else {
            Verdict::Create
        }
    }
}

/// Who set a field of a canonical record, and when (the event's time, ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldMeta {
    pub system: String,
    pub at: i64,
}

/// A canonical record as the journal keeps it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Canonical {
    pub state: Map<String, Value>,
    pub meta: BTreeMap<String, FieldMeta>,
}

/// One system's report of a record: its top-level fields after the flow's
/// mapping.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub system: &'a str,
    /// When the system changed the record (its clock), for last-write-wins.
    pub event_time: i64,
    /// When weft received the report (weft's clock).
    pub received_at: i64,
    pub fields: &'a Map<String, Value>,
}

/// A field that changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub field: String,
    pub before: Value,
    pub after: Value,
}

/// A change that was not applied, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refused {
    pub field: String,
    pub value: Value,
    pub reason: String,
    /// Recorded in the history (non-owner `flag`, a lost conflict), not
    /// only counted.
    pub recorded: bool,
}

/// A conflict left for a person (`conflict: manual`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Open {
    pub field: String,
    pub current: Value,
    pub current_system: String,
    pub proposed: Value,
}

/// What [`merge`] decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Merge {
    pub record: Canonical,
    /// The reporting system's new base.
    pub base: Map<String, Value>,
    /// The reporting system's writes not echoed yet, after this report.
    pub written: Map<String, Value>,
    /// Whether the report differed from the reporting system's old base
    /// (the system changed something; an echo does not).
    pub reported_change: bool,
    pub changes: Vec<Change>,
    pub refused: Vec<Refused>,
    pub open: Vec<Open>,
}

/// Most writes of one field kept as "not echoed yet" per system.
pub const OUTSTANDING: usize = 64;

/// A write whose echo has not come back this long after it was made (weft's
/// clock) is presumed lost (the write failed, weft died before sending it,
/// the destination does not report it) once the system reports another
/// value for the field: it stops counting as something the system holds.
pub const ECHO_WINDOW_MS: i64 = 30_000;

fn entry_value(e: &Value) -> Option<&Value> {
    e.get("v")
}

/// Fold `report` into `current`, given the reporting system's `base` (what
/// it reported last; `None`: never) and `written` (per field, the values
/// weft wrote to it that it has not reported back yet, oldest first).
/// A field equal to one of those is the echo of weft's own write: the
/// system holds it now, but it is not a change. Fields whose name starts
/// with `_` are weft's own (`_id`, `_ids`) and ignored.
pub fn merge(
    rules: &Rules,
    current: &Canonical,
    base: Option<&Map<String, Value>>,
    written: Option<&Map<String, Value>>,
    report: &Report<'_>,
) -> Merge {
    let mut out = Merge {
        record: current.clone(),
        base: base.cloned().unwrap_or_default(),
        written: written.cloned().unwrap_or_default(),
        ..Merge::default()
    };
    let s = report.system;
    for (f, v) in report.fields {
        if f.starts_with('_') {
            continue;
        }
        let base_v = base.and_then(|b| b.get(f));
        out.base.insert(f.clone(), v.clone());
        if base_v == Some(v) {
            continue;
        }
        // weft's own write coming back: drop it and every older one
        if let Some(Value::Array(vals)) = out.written.get_mut(f) {
            if let Some(i) = vals.iter().position(|w| entry_value(w) == Some(v)) {
                vals.drain(..=i);
                if vals.is_empty() {
                    out.written.remove(f);
                }
                continue;
            }
            // not an echo: a change the system made before weft's recent
            // writes reached it (their echoes come later, in the system's
            // order), or after writes whose echo is overdue (presumed lost)
            let since = report.received_at - ECHO_WINDOW_MS;
            vals.retain(|w| {
                w.get("at")
                    .and_then(Value::as_i64)
                    .is_some_and(|at| at >= since)
            });
            if vals.is_empty() {
                out.written.remove(f);
            }
        }
        out.reported_change = true;
        let cur = current.state.get(f);
        if cur == Some(v) {
            continue;
        }
        let owners = rules.owners_of(f);
        if let Some(list) = owners
            && !list.iter().any(|o| o == s)
        {
            out.refused.push(Refused {
                field: f.clone(),
                value: v.clone(),
                reason: format!("`{s}` does not own `{f}` (owners: {})", list.join(", ")),
                recorded: rules.non_owner == NonOwnerPolicy::Flag,
            });
            continue;
        }
        // the canonical value moved on since `s` last synced this field
        let stale = cur.is_some() && base_v != cur;
        let prev = current.meta.get(f);
        if stale && let Some(prev) = prev.filter(|p| p.system != s) {
            let won = match rules.conflict {
                ConflictPolicy::LastWriteWins => report.event_time >= prev.at,
                ConflictPolicy::SourceOfTruth => {
                    let rank = |sys: &str| {
                        owners
                            .and_then(|l| l.iter().position(|o| o == sys))
                            .unwrap_or(usize::MAX)
                    };
                    rank(s) <= rank(&prev.system)
                }
                ConflictPolicy::Manual => {
                    out.open.push(Open {
                        field: f.clone(),
                        current: cur.cloned().unwrap_or(Value::Null),
                        current_system: prev.system.clone(),
                        proposed: v.clone(),
                    });
                    continue;
                }
            };
            if !won {
                out.refused.push(Refused {
                    field: f.clone(),
                    value: v.clone(),
                    reason: match rules.conflict {
                        ConflictPolicy::LastWriteWins => format!(
                            "conflict: `{}` set it later ({} ms after this change)",
                            prev.system,
                            prev.at - report.event_time
                        ),
                        _ => format!("conflict: `{}` ranks higher for `{f}`", prev.system),
                    },
                    recorded: true,
                });
                continue;
            }
        }
        out.changes.push(Change {
            field: f.clone(),
            before: cur.cloned().unwrap_or(Value::Null),
            after: v.clone(),
        });
        out.record.state.insert(f.clone(), v.clone());
        out.record.meta.insert(
            f.clone(),
            FieldMeta {
                system: s.to_owned(),
                at: report.event_time,
            },
        );
    }
    out
}

/// `written` after weft wrote `state` to a system: each field's value is
/// outstanding until the system reports it back (or the echo is overdue).
pub fn record_write(
    written: Option<&Map<String, Value>>,
    base: Option<&Map<String, Value>>,
    state: &Map<String, Value>,
    now: i64,
) -> Map<String, Value> {
    // every field sent, also those the system held already: a write sends
    // the whole record, and the system's report of any of its fields must
    // be recognised as the echo it is (a report of a field the write did
    // not change, but set back over a change the system made meanwhile, is
    // an echo too)
    let _ = base;
    let mut out = written.cloned().unwrap_or_default();
    for (f, v) in state {
        let entry = out
            .entry(f.clone())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(vals) = entry {
            // one entry per write, also of an unchanged value: each write
            // comes back as its own echo
            vals.push(serde_json::json!({"v": v, "at": now}));
            if vals.len() > OUTSTANDING {
                vals.remove(0);
            }
        }
    }
    out
}

/// What a system holds now, as far as weft knows: what it reported last,
/// with weft's writes it has not reported back yet on top (they reached it
/// after that report: a system reports in order). `None`: nothing known.
pub fn estimate(
    base: Option<&Map<String, Value>>,
    written: Option<&Map<String, Value>>,
) -> Option<Map<String, Value>> {
    if base.is_none() && written.is_none_or(|w| w.is_empty()) {
        return None;
    }
    let mut out = base.cloned().unwrap_or_default();
    for (f, vals) in written.into_iter().flatten() {
        if let Some(last) = vals.as_array().and_then(|a| a.last()).and_then(entry_value) {
            out.insert(f.clone(), last.clone());
        }
    }
    Some(out)
}

/// Whether `fields`, a system's report of a record it has no link for yet,
/// is the echo of a create weft has in flight there: `written` holds weft's
/// outstanding writes to that system for one record (see [`record_write`]).
/// Every field reported and written must carry one of the written values,
/// and at least one non-null field must be among them. A system may answer
/// a create after it reported the new record (its webhook overtakes the
/// response with the id), so the report is the only way to tell.
pub fn echoes_create(written: &Map<String, Value>, fields: &Map<String, Value>) -> bool {
    let mut matched = false;
    for (f, v) in fields {
        if f.starts_with('_') {
            continue;
        }
        let Some(Value::Array(vals)) = written.get(f) else {
            continue;
        };
        if !vals.iter().any(|w| entry_value(w) == Some(v)) {
            return false;
        }
        matched |= !v.is_null();
    }
    matched
}

/// Whether a system whose base is `base` lacks any value of `state`.
pub fn differs(state: &Map<String, Value>, base: Option<&Map<String, Value>>) -> bool {
    match base {
        None => true,
        Some(b) => state.iter().any(|(k, v)| b.get(k) != Some(v)),
    }
}

/// A match key's normal form: lower case, accents folded, punctuation
/// dropped, whitespace collapsed, and common company suffixes unified
/// ("Ltd"/"Limited", "Inc"/"Incorporated", "GmbH", "Corp"/"Corporation").
pub fn normalize_key(s: &str) -> String {
    let mut folded = String::with_capacity(s.len());
    for c in s.chars().flat_map(char::to_lowercase) {
        match fold_accent(c) {
            Some(base) => folded.push_str(base),
            None => folded.push(c),
        }
    }
    let words: Vec<String> = folded
        .split(|c: char| c.is_whitespace() || (c.is_ascii_punctuation() && c != '@' && c != '.'))
        .map(|w| w.trim_matches('.'))
        .filter(|w| !w.is_empty())
        .map(|w| match w {
            "limited" => "ltd".to_owned(),
            "incorporated" => "inc".to_owned(),
            "corporation" => "corp".to_owned(),
            "company" => "co".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    words.join(" ")
}

/// Latin letters with diacritics to their base letter (the common ones;
/// others pass through).
fn fold_accent(c: char) -> Option<&'static str> {
    Some(match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' => "a",
        'æ' => "ae",
        'ç' | 'č' | 'ć' => "c",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ę' | 'ě' => "e",
        'ì' | 'í' | 'î' | 'ï' | 'ī' => "i",
        'ñ' | 'ń' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => "o",
        'œ' => "oe",
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' => "u",
        'ý' | 'ÿ' => "y",
        'š' | 'ś' => "s",
        'ž' | 'ź' | 'ż' => "z",
        'ř' => "r",
        'ł' => "l",
        'ß' => "ss",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_report_echoes_a_create_only_when_every_written_field_agrees() {
        let written = record_write(
            None,
            None,
            json!({"name": "Ann", "phone": "1", "_id": null})
                .as_object()
                .unwrap(),
            5,
        );
        let f = |v: Value| v.as_object().unwrap().clone();
        assert!(echoes_create(
            &written,
            &f(json!({"name": "Ann", "phone": "1", "email": null}))
        ));
        // a field the write did not carry is not compared
        assert!(echoes_create(
            &written,
            &f(json!({"name": "Ann", "company": "X"}))
        ));
        assert!(!echoes_create(
            &written,
            &f(json!({"name": "Ann", "phone": "2"}))
        ));
        // nothing in common: no evidence
        assert!(!echoes_create(&written, &f(json!({"company": "X"}))));
        assert!(!echoes_create(&written, &f(json!({"_id": null}))));
    }

    fn rules(conflict: ConflictPolicy) -> Rules {
        Rules {
            entity: "customer".into(),
            create: Some(vec!["crm".into()]),
            owners: BTreeMap::from([
                ("credit_limit".into(), vec!["erp".into()]),
                ("*".into(), vec!["crm".into(), "erp".into()]),
            ]),
            conflict,
            non_owner: NonOwnerPolicy::Drop,
            match_keys: vec!["email".into()],
            fuzzy: None,
            routes: vec![],
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn apply(r: &Rules, cur: &Canonical, base: Option<Value>, s: &str, t: i64, f: Value) -> Merge {
        let base = base.map(obj);
        let fields = obj(f);
        merge(
            r,
            cur,
            base.as_ref(),
            None,
            &Report {
                system: s,
                event_time: t,
                received_at: t,
                fields: &fields,
            },
        )
    }

    #[test]
    fn a_new_record_takes_every_field_and_the_echo_changes_nothing() {
        let r = rules(ConflictPolicy::LastWriteWins);
        let m = apply(
            &r,
            &Canonical::default(),
            None,
            "crm",
            1,
            json!({"name": "Ada", "email": "a@x"}),
        );
        assert_eq!(m.changes.len(), 2);
        assert_eq!(m.record.state.get("name"), Some(&json!("Ada")));
        // weft wrote the record to the ERP: its base is the state; the ERP echoes it
        let base = Value::Object(m.record.state.clone());
        let echo = apply(
            &r,
            &m.record,
            Some(base),
            "erp",
            2,
            json!({"name": "Ada", "email": "a@x"}),
        );
        assert!(echo.changes.is_empty() && !echo.reported_change);
    }

    #[test]
    fn an_echo_is_recognised_by_the_values_written_not_by_timing() {
        let r = rules(ConflictPolicy::LastWriteWins);
        let cur = apply(
            &r,
            &Canonical::default(),
            None,
            "crm",
            1,
            json!({"name": "A"}),
        )
        .record;
        // weft wrote "A" to the ERP, then (after a CRM change) "B"; the ERP
        // reports "A" late, after the record moved to "C" from the CRM
        let base = obj(json!({"name": "old"}));
        let w1 = record_write(None, Some(&base), &obj(json!({"name": "A"})), 1);
        let w2 = record_write(Some(&w1), Some(&base), &obj(json!({"name": "B"})), 2);
        let cur = apply(
            &r,
            &cur,
            Some(json!({"name": "A"})),
            "crm",
            5,
            json!({"name": "C"}),
        )
        .record;
        let fields = obj(json!({"name": "A"}));
        let m = merge(
            &r,
            &cur,
            Some(&base),
            Some(&w2),
            &Report {
                system: "erp",
                event_time: 9,
                received_at: 9,
                fields: &fields,
            },
        );
        assert!(
            m.changes.is_empty() && !m.reported_change,
            "an echo is no change: {m:?}"
        );
        assert_eq!(m.record.state.get("name"), Some(&json!("C")));
        // "B" is still outstanding; a later real change is a change
        assert_eq!(m.written.get("name"), Some(&json!([{"v": "B", "at": 2}])));
        let fields = obj(json!({"name": "D"}));
        let m = merge(
            &r,
            &cur,
            Some(&m.base),
            Some(&m.written),
            &Report {
                system: "erp",
                event_time: 10,
                received_at: 10,
                fields: &fields,
            },
        );
        assert!(m.reported_change);
        // "B" may still come back (the ERP's "D" may predate weft's write)
        assert_eq!(m.written.get("name"), Some(&json!([{"v": "B", "at": 2}])));
        let known = estimate(Some(&m.base), Some(&m.written)).unwrap();
        assert_eq!(known.get("name"), Some(&json!("B")));
        // ... but not forever: a write unechoed for longer than the window is presumed lost
        let fields = obj(json!({"name": "E"}));
        let late = merge(
            &r,
            &cur,
            Some(&m.base),
            Some(&m.written),
            &Report {
                system: "erp",
                event_time: 11,
                received_at: 2 + ECHO_WINDOW_MS + 1,
                fields: &fields,
            },
        );
        assert!(late.written.get("name").is_none());
    }

    #[test]
    fn a_non_owner_change_is_refused() {
        let r = rules(ConflictPolicy::LastWriteWins);
        let cur = apply(
            &r,
            &Canonical::default(),
            None,
            "crm",
            1,
            json!({"name": "Ada"}),
        )
        .record;
        let m = apply(
            &r,
            &cur,
            Some(json!({"name": "Ada"})),
            "crm",
            2,
            json!({"name": "Ada", "credit_limit": 5}),
        );
        assert!(m.changes.is_empty());
        assert_eq!(m.refused.len(), 1);
        assert!(m.refused[0].reason.contains("does not own `credit_limit`"));
    }

    #[test]
    fn concurrent_changes_are_decided_by_the_policy() {
        let r = rules(ConflictPolicy::LastWriteWins);
        let cur = apply(
            &r,
            &Canonical::default(),
            None,
            "crm",
            1,
            json!({"name": "Ada"}),
        )
        .record;
        // both systems had "Ada"; the CRM changes to B at t=10
        let cur = apply(
            &r,
            &cur,
            Some(json!({"name": "Ada"})),
            "crm",
            10,
            json!({"name": "B"}),
        )
        .record;
        // the ERP, still on "Ada", changed to C at t=5: older, loses
        let lost = apply(
            &r,
            &cur,
            Some(json!({"name": "Ada"})),
            "erp",
            5,
            json!({"name": "C"}),
        );
        assert!(lost.changes.is_empty());
        assert_eq!(
            lost.base.get("name"),
            Some(&json!("C")),
            "the ERP holds C: it is written back"
        );
        // at t=20 it wins
        let won = apply(
            &r,
            &cur,
            Some(json!({"name": "Ada"})),
            "erp",
            20,
            json!({"name": "C"}),
        );
        assert_eq!(won.record.state.get("name"), Some(&json!("C")));

        let sot = rules(ConflictPolicy::SourceOfTruth);
        let lost = apply(
            &sot,
            &cur,
            Some(json!({"name": "Ada"})),
            "erp",
            20,
            json!({"name": "C"}),
        );
        assert!(lost.changes.is_empty(), "the CRM ranks first for name");

        let manual = rules(ConflictPolicy::Manual);
        let open = apply(
            &manual,
            &cur,
            Some(json!({"name": "Ada"})),
            "erp",
            20,
            json!({"name": "C"}),
        );
        assert!(open.changes.is_empty());
        assert_eq!(open.open.len(), 1);
        assert_eq!(open.open[0].current, json!("B"));
    }

    #[test]
    fn a_clean_change_after_syncing_applies() {
        let r = rules(ConflictPolicy::SourceOfTruth);
        let cur = apply(
            &r,
            &Canonical::default(),
            None,
            "crm",
            1,
            json!({"name": "Ada"}),
        )
        .record;
        // the ERP was up to date ("Ada") and changes it: no conflict, even though it ranks lower
        let m = apply(
            &r,
            &cur,
            Some(json!({"name": "Ada"})),
            "erp",
            0,
            json!({"name": "Ada L."}),
        );
        assert_eq!(m.record.state.get("name"), Some(&json!("Ada L.")));
    }

    #[test]
    fn match_keys_are_normalised() {
        assert_eq!(
            normalize_key("  John.Smith@Example.COM "),
            "john.smith@example.com"
        );
        assert_eq!(normalize_key("Acme Limited"), normalize_key("ACME, Ltd."));
        assert_eq!(normalize_key("Société Générale"), "societe generale");
        assert_eq!(normalize_key("Straße"), "strasse");
    }

    fn fuzzy() -> Fuzzy {
        Fuzzy {
            fields: vec![("name".into(), 1.0), ("company".into(), 1.0)],
            block: vec!["company".into()],
            link: 0.95,
            review: 0.8,
        }
    }

    #[test]
    fn fuzzy_scores_link_review_and_create() {
        let z = fuzzy();
        let john = obj(json!({"name": "John Smith", "company": "Acme Limited"}));
        // the same company after normalisation: one block
        assert_eq!(
            z.blocks(&john),
            z.blocks(&obj(json!({"company": "ACME Ltd."})))
        );
        let s = |v: Value| z.score(&john, &obj(v)).unwrap().total;
        let typo = s(json!({"name": "Jon Smith", "company": "Acme Ltd"}));
        assert_eq!(z.verdict(typo), Verdict::Link, "{typo}");
        let initial = s(json!({"name": "J. Smith", "company": "Acme Ltd"}));
        assert_eq!(z.verdict(initial), Verdict::Review, "{initial}");
        let other = s(json!({"name": "Mary Jones", "company": "Acme Ltd"}));
        assert_eq!(z.verdict(other), Verdict::Create, "{other}");
        let pair = |a: Value, b: Value| z.verdict(z.score(&obj(a), &obj(b)).unwrap().total);
        assert_eq!(
            pair(
                json!({"name": "Ann Lee", "company": "Initech Corporation"}),
                json!({"name": "Anne Lee", "company": "Initech Corp."})
            ),
            Verdict::Link
        );
        assert_eq!(
            pair(
                json!({"name": "Maria Garcia", "company": "Globex"}),
                json!({"name": "M. Garcia", "company": "GLOBEX"})
            ),
            Verdict::Review
        );
        assert_eq!(
            pair(
                json!({"name": "Maria Garcia", "company": "Globex"}),
                json!({"name": "Peter Parker", "company": "Globex"})
            ),
            Verdict::Create
        );
        // too little in common to judge
        assert_eq!(z.score(&john, &obj(json!({"company": "Acme Ltd"}))), None);
    }
}
