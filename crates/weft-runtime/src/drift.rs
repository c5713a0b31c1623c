//! Drift detection per source stream.
//!
//! weft keeps the observed *shape* of each source's records: the field paths
//! (JSON pointers; `/*` for array elements), the JSON types seen at each, and
//! for short string fields with at most [`MAX_ENUM`] distinct values, those
//! values. A record that differs is *drift*, recorded once per
//! `(kind, path, detail)` with a masked example, counted in
//! `weft_drift_events_total{source,kind}` and logged at warn:
//! - `new_field`: a path never seen (after the first record);
//! - `missing_field`: a path present in every record so far (at least
//!   [`MIN_PRESENT`] of them) is absent;
//! - `type_changed`: a path has a type it never had (`string -> array`);
//!   `null` is not a change;
//! - `new_enum_value`: after [`LEARN_ENUMS`] records, a new value of an
//!   enum-like string field.
//!
//! Bounded (review P1-15): an object used as a map (its keys are data:
//! `{"prices": {"SKU-123": ...}}`, date-keyed objects, more than
//! [`MAP_KEYS`] keys) is one path, `<path>/{}`, for all its values, so new
//! keys are not new fields; a source's shape holds at most [`MAX_FIELDS`]
//! paths (past that, new paths are not learned, recorded once as
//! `field_limit`); and at most [`MAX_WARNINGS`] drift events per source are
//! logged at warn (the rest at debug; all are stored and counted).
//!
//! Cost: each record is walked once to hash its key-set and type signature
//! (no allocation); only a signature not seen before is analysed field by
//! field. Enum-like fields are looked up by pointer. The shape is saved when
//! it changes, with the events, in one `Op::Drift` after the batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};

use metrics::counter;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use weft_core::config::Flow;
use weft_core::config::entities::{OnDrift, escape_pointer, is_sensitive, mask};
use weft_store::{DriftBatch, FlowOutcome, JournalRead, NewDrift, Stage};

pub const DRIFT_EVENTS: &str = "weft_drift_events_total";
/// Most distinct values of an enum-like string field.
pub const MAX_ENUM: usize = 20;
/// Records during which enum values are learned without drift.
pub const LEARN_ENUMS: u64 = 100;
/// Records a field must have been always present in before its absence is drift.
pub const MIN_PRESENT: u64 = 10;
const MAX_DEPTH: usize = 6;

/// The seed of the shape signatures' hasher (any fixed value).
const SIG_SEED: u64 = 0x5eed_d41f7;
/// An object with more keys than this is a map: one path for its values.
pub const MAP_KEYS: usize = 64;
/// Most paths in one source's shape.
pub const MAX_FIELDS: usize = 2000;
/// Drift events per source logged at warn; later ones at debug.
pub const MAX_WARNINGS: u64 = 50;
const MAX_ENUM_LEN: usize = 64;
const MAX_SIGS: usize = 4096;

const T_NULL: u8 = 1;
const T_BOOL: u8 = 2;
const T_NUM: u8 = 4;
const T_STR: u8 = 8;
const T_ARR: u8 = 16;
const T_OBJ: u8 = 32;

fn tbit(v: &Value) -> u8 {
    match v {
        Value::Null => T_NULL,
        Value::Bool(_) => T_BOOL,
        Value::Number(_) => T_NUM,
        Value::String(_) => T_STR,
        Value::Array(_) => T_ARR,
        Value::Object(_) => T_OBJ,
    }
}

fn tnames(t: u8) -> String {
    let names = [
        (T_NULL, "null"),
        (T_BOOL, "boolean"),
        (T_NUM, "number"),
        (T_STR, "string"),
        (T_ARR, "array"),
        (T_OBJ, "object"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| t & b != 0)
        .map(|(_, n)| *n)
        .collect();
    v.join("|")
}

fn tbit_of(name: &str) -> u8 {
    match name {
        "null" => T_NULL,
        "boolean" => T_BOOL,
        "number" => T_NUM,
        "string" => T_STR,
        "array" => T_ARR,
        "object" => T_OBJ,
        _ => 0,
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Shape {
    records: u64,
    fields: BTreeMap<String, Field>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Field {
    types: u8,
    /// Present in every record so far.
    always: bool,
    /// String values seen while few; `None`: not enum-like.
    values: Option<BTreeSet<String>>,
}

type Key = (String, String, String);

#[derive(Default)]
struct State {
    shape: Shape,
    sigs: HashMap<u64, Vec<usize>>,
    keys: Vec<Key>,
    index: HashMap<Key, usize>,
    new_field: HashMap<String, usize>,
    missing: HashMap<String, usize>,
    type_changed: HashMap<(String, u8), usize>,
    /// path -> value -> key (looked up per record without copying either)
    enum_value: HashMap<String, HashMap<String, usize>>,
    /// key -> (example if new, records showing it) since the last take
    pending: BTreeMap<usize, (String, i64)>,
    dirty: bool,
    /// Drift events logged at warn so far.
    warned: u64,
    /// Keys an operator accepted: still counted, no longer drift for
    /// quarantine.
    accepted: std::collections::HashSet<usize>,
}

/// The drift detector of one source.
pub struct Tracker {
    source: String,
    sensitive: Vec<String>,
    /// Paths not tracked (a CDC event's `/source` metadata: positions and
    /// times that change with every event).
    ignored: Vec<String>,
    state: Mutex<State>,
}

/// Field names whose values are masked in examples even when no entity says so.
fn sensitive_name(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or("").to_ascii_lowercase();
    [
        "email", "phone", "tax", "ssn", "iban", "password", "secret", "token", "birth", "card",
    ]
    .iter()
    .any(|w| last.contains(w))
}

impl Tracker {
    /// A tracker for `source`, with the shape and events saved in the store.
    pub fn open(store: &dyn JournalRead, source: &str, flows: &[Arc<Flow>]) -> Tracker {
        let mut sensitive: Vec<String> = flows
            .iter()
            .flat_map(|f| f.data.sensitive().iter().cloned())
            .collect();
        sensitive.sort();
        sensitive.dedup();
        let t = Tracker::new(source, sensitive);
        let loaded = store
            .stream_shape(source)
            .and_then(|shape| Ok((shape, store.drift_events(Some(source))?)));
        match loaded {
            Ok((shape, events)) => {
                if let Ok(mut st) = t.state.lock() {
                    if let Some(s) = shape.and_then(|s| serde_json::from_str(&s).ok()) {
                        st.shape = s;
                    }
                    for e in events {
                        let (k, _) = st.key(&e.kind, &e.path, &e.detail);
                        if e.accepted_at.is_some() {
                            st.accepted.insert(k);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(source, error = %e, "cannot load the stream shape; learning it anew")
            }
        }
        t
    }

    /// A tracker with nothing learned.
    pub fn new(source: &str, sensitive: Vec<String>) -> Tracker {
        Tracker {
            source: source.to_owned(),
            sensitive,
            ignored: Vec::new(),
            state: Mutex::new(State::default()),
        }
    }

    /// Leave `prefix` and every path under it out of the shape.
    pub fn ignoring(mut self, prefix: &str) -> Tracker {
        self.ignored.push(prefix.to_owned());
        self
    }

    fn is_ignored(&self, path: &str) -> bool {
        self.ignored.iter().any(|p| {
            path == p
                || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
        })
    }

    fn example(&self, path: &str, v: Option<&Value>) -> String {
        match v {
            None => "(missing)".into(),
            Some(_) if sensitive_name(path) => "\"***\"".into(),
            Some(v) => {
                let s = mask(v, path, &self.sensitive).to_string();
                if s.chars().count() > 200 {
                    format!("{}...", s.chars().take(200).collect::<String>())
                } else {
                    s
                }
            }
        }
    }

    /// Learn from one record; `Some(summary)` when it shows drift.
    pub fn observe(&self, v: &Value) -> Option<String> {
        let Ok(mut guard) = self.state.lock() else {
            return None;
        };
        let st = &mut *guard;
        st.shape.records += 1;
        // a fixed fast hasher: the signature only picks a cached analysis
        // (a collision would reuse another shape's, as with any 64-bit hash)
        let mut h = foldhash::fast::FixedState::with_seed(SIG_SEED).build_hasher();
        hash_walk(v, &mut h, 0);
        let sig = h.finish();
        let mut shows = match st.sigs.get(&sig) {
            Some(k) => k.clone(),
            None => {
                let k = self.analyse(st, v);
                if st.sigs.len() >= MAX_SIGS {
                    st.sigs.clear();
                }
                st.sigs.insert(sig, k.clone());
                k
            }
        };
        self.enums(st, v, &mut shows);
        if shows.is_empty() {
            return None;
        }
        let mut parts = Vec::with_capacity(shows.len());
        for k in shows {
            st.pending.entry(k).or_default().1 += 1;
            if st.accepted.contains(&k) {
                continue;
            }
            if let Some((kind, path, detail)) = st.keys.get(k) {
                parts.push(format!("{kind} {path} ({detail})"));
            }
        }
        if parts.is_empty() {
            // only accepted drift: counted, not a reason to quarantine
            return None;
        }
        Some(parts.join("; "))
    }

    /// Take the operators' acceptances from the store's drift events (this
    /// source's, accepted ones): a running hub follows `weft drift accept`
    /// and the dashboard within one refresh. Returns how many keys were
    /// newly accepted.
    pub fn follow_accepted(&self, events: &[weft_store::DriftEvent]) -> usize {
        let Ok(mut st) = self.state.lock() else {
            return 0;
        };
        let mut n = 0;
        for e in events
            .iter()
            .filter(|e| e.source == self.source && e.accepted_at.is_some())
        {
            let (k, _) = st.key(&e.kind, &e.path, &e.detail);
            if st.accepted.insert(k) {
                n += 1;
                tracing::info!(source = %self.source, kind = %e.kind, path = %e.path, detail = %e.detail, "drift accepted: records showing it are no longer quarantined");
            }
        }
        n
    }

    fn record(
        &self,
        st: &mut State,
        kind: &str,
        path: &str,
        detail: String,
        example: String,
    ) -> usize {
        let (k, new) = st.key(kind, path, &detail);
        if new {
            st.pending.entry(k).or_default().0 = example.clone();
            st.warned += 1;
            if st.warned <= MAX_WARNINGS {
                tracing::warn!(source = %self.source, kind, path, detail = %detail, example = %example, "schema drift");
                if st.warned == MAX_WARNINGS {
                    tracing::warn!(source = %self.source, "{MAX_WARNINGS} drift events logged; later ones are logged at debug level (all are stored: `weft drift list`)");
                }
            } else {
                tracing::debug!(source = %self.source, kind, path, detail = %detail, example = %example, "schema drift");
            }
        }
        k
    }

    /// Compare a record of a new signature with the shape, learn it, and
    /// return the drift keys it shows.
    fn analyse(&self, st: &mut State, v: &Value) -> Vec<usize> {
        let mut fields = Vec::new();
        walk(v, &mut String::new(), 0, &mut fields);
        if !self.ignored.is_empty() {
            fields.retain(|(p, _)| !self.is_ignored(p));
        }
        fields.sort();
        fields.dedup();
        let first = st.shape.records == 1;
        for (path, t) in &fields {
            let t = *t;
            let full = st.shape.fields.len() >= MAX_FIELDS;
            match st.shape.fields.get_mut(path) {
                None if full => {
                    let detail =
                        format!("the shape holds {MAX_FIELDS} paths; new ones are not learned");
                    self.record(st, "field_limit", "", detail, "(none)".into());
                }
                None => {
                    st.shape.fields.insert(
                        path.clone(),
                        Field {
                            types: t,
                            always: first && !path.contains("/*") && !path.contains("/{}"),
                            values: (t == T_STR || t == T_NULL).then(BTreeSet::new),
                        },
                    );
                    st.dirty = true;
                    if !first {
                        let ex = self.example(path, pointer(v, path));
                        self.record(st, "new_field", path, tnames(t), ex);
                    }
                }
                Some(f) if f.types & t == 0 => {
                    let old = f.types;
                    f.types |= t;
                    if t != T_STR {
                        f.values = None;
                    }
                    st.dirty = true;
                    if t != T_NULL && old & !T_NULL != 0 {
                        let detail = format!("{} -> {}", tnames(old & !T_NULL), tnames(t));
                        let ex = self.example(path, pointer(v, path));
                        self.record(st, "type_changed", path, detail, ex);
                    }
                }
                Some(_) => {}
            }
        }
        let present: BTreeSet<&str> = fields.iter().map(|(p, _)| p.as_str()).collect();
        let absent: Vec<String> = st
            .shape
            .fields
            .iter()
            .filter(|(p, f)| f.always && !present.contains(p.as_str()))
            .map(|(p, _)| p.clone())
            .collect();
        let records = st.shape.records;
        for p in &absent {
            if let Some(f) = st.shape.fields.get_mut(p) {
                f.always = false;
            }
            st.dirty = true;
            if records > MIN_PRESENT {
                let detail = format!("present in the first {} records", records - 1);
                self.record(st, "missing_field", p, detail, "(missing)".into());
            }
        }
        // the drift this signature shows
        let mut shows = Vec::new();
        for (path, t) in &fields {
            if let Some(k) = st.new_field.get(path) {
                shows.push(*k);
            }
            if let Some(k) = st.type_changed.get(&(path.clone(), *t)) {
                shows.push(*k);
            }
        }
        for (p, k) in &st.missing {
            if !present.contains(p.as_str()) {
                shows.push(*k);
            }
        }
        shows.sort_unstable();
        shows.dedup();
        shows
    }

    fn enums(&self, st: &mut State, v: &Value, shows: &mut Vec<usize>) {
        let learning = st.shape.records <= LEARN_ENUMS;
        let mut found: Vec<(String, String)> = Vec::new();
        for (path, f) in st.shape.fields.iter_mut() {
            let Some(values) = &mut f.values else {
                continue;
            };
            let Some(Value::String(s)) = pointer(v, path) else {
                continue;
            };
            if values.contains(s) {
                if let Some(k) = st.enum_value.get(path).and_then(|m| m.get(s)) {
                    shows.push(*k);
                }
                continue;
            }
            st.dirty = true;
            if s.chars().count() > MAX_ENUM_LEN || values.len() >= MAX_ENUM {
                f.values = None; // free text, not an enum
                continue;
            }
            values.insert(s.clone());
            if !learning {
                found.push((path.clone(), s.clone()));
            }
        }
        for (path, s) in found {
            let ex = self.example(&path, pointer(v, &path));
            let detail = if sensitive_name(&path) || is_sensitive(&path, &self.sensitive) {
                format!("value #{}", st.keys.len() + 1)
            } else {
                s.clone()
            };
            let k = self.record(st, "new_enum_value", &path, detail, ex);
            st.enum_value.entry(path).or_default().insert(s, k);
            shows.push(k);
        }
    }

    /// What to store: new events, counts, the shape if it changed.
    pub fn take(&self) -> Option<DriftBatch> {
        let Ok(mut st) = self.state.lock() else {
            return None;
        };
        if st.pending.is_empty() && !st.dirty {
            return None;
        }
        let pending = std::mem::take(&mut st.pending);
        let events = pending
            .into_iter()
            .filter_map(|(k, (example, count))| {
                st.keys.get(k).map(|(kind, path, detail)| NewDrift {
                    kind: kind.clone(),
                    path: path.clone(),
                    detail: detail.clone(),
                    example,
                    count,
                })
            })
            .collect();
        let shape = if st.dirty {
            st.dirty = false;
            serde_json::to_string(&st.shape).ok()
        } else {
            None
        };
        Some(DriftBatch {
            source: self.source.clone(),
            shape,
            events,
        })
    }
}

/// Count the drift events of `b` that are new (they carry an example) in
/// `weft_drift_events_total`, once `b` was saved: the counter moves with
/// what the store holds, not with what a batch that may fail to commit saw.
pub fn count_saved(b: &DriftBatch) {
    for e in b.events.iter().filter(|e| !e.example.is_empty()) {
        counter!(DRIFT_EVENTS, "source" => b.source.clone(), "kind" => e.kind.clone()).increment(1);
    }
}

impl State {
    /// The index of a drift key, and whether it is new.
    fn key(&mut self, kind: &str, path: &str, detail: &str) -> (usize, bool) {
        let key = (kind.to_owned(), path.to_owned(), detail.to_owned());
        if let Some(k) = self.index.get(&key) {
            return (*k, false);
        }
        let k = self.keys.len();
        self.keys.push(key.clone());
        self.index.insert(key, k);
        match kind {
            "new_field" => {
                self.new_field.insert(path.to_owned(), k);
            }
            "missing_field" => {
                self.missing.insert(path.to_owned(), k);
            }
            "type_changed" => {
                let to = detail.rsplit(" -> ").next().unwrap_or("");
                self.type_changed.insert((path.to_owned(), tbit_of(to)), k);
            }
            "new_enum_value" => {
                self.enum_value
                    .entry(path.to_owned())
                    .or_default()
                    .insert(detail.to_owned(), k);
            }
            _ => {}
        }
        (k, true)
    }
}

/// What accepting drift events did.
#[derive(Debug, Default, serde::Serialize)]
pub struct AcceptReport {
    /// Accepted now.
    pub accepted: Vec<weft_store::DriftEvent>,
    /// Accepted before.
    pub already: Vec<i64>,
    /// No such event.
    pub unknown: Vec<i64>,
    /// Quarantined DLQ entries replayed (with `replay`): every drift they
    /// showed is accepted now.
    pub replayed: Vec<i64>,
    /// Entries whose replay was refused, with why.
    pub replay_failed: Vec<(i64, String)>,
    /// Quarantined entries of those sources that still show drift nobody
    /// accepted (left in the DLQ).
    pub still_held: usize,
}

/// The drift text of a quarantined entry's error, as its parts
/// (`kind path (detail)`), if it was quarantined for drift.
fn drift_parts(error: &str) -> Option<Vec<&str>> {
    error
        .strip_prefix("drift: ")
        .map(|d| d.split("; ").collect())
}

/// Accept drift events by id (`weft drift accept`, the dashboard): records
/// showing only accepted drift are no longer quarantined (a running hub
/// takes it within one gauge refresh, 2 s). With `replay`, the DLQ entries
/// of those sources that were quarantined for drift that is now all
/// accepted are replayed through their flows.
pub async fn accept(
    config: &weft_core::config::Config,
    journal: &dyn weft_store::Journal,
    ids: &[i64],
    replay: bool,
) -> Result<AcceptReport, crate::dlq::DlqError> {
    let events = journal.read().drift_events(None)?;
    let mut report = AcceptReport::default();
    let mut todo = Vec::new();
    for id in ids {
        match events.iter().find(|e| e.id == *id) {
            None => report.unknown.push(*id),
            Some(e) if e.accepted_at.is_some() => report.already.push(*id),
            Some(_) => todo.push(*id),
        }
    }
    if !todo.is_empty() {
        journal.accept_drift(todo.clone()).await?;
    }
    let events = journal.read().drift_events(None)?;
    report.accepted = events
        .iter()
        .filter(|e| todo.contains(&e.id))
        .cloned()
        .collect();
    if !replay {
        return Ok(report);
    }
    // every accepted drift of the sources concerned, as the error text has it
    let sources: BTreeSet<&str> = events
        .iter()
        .filter(|e| ids.contains(&e.id))
        .map(|e| e.source.as_str())
        .collect();
    let accepted: BTreeSet<(String, String)> = events
        .iter()
        .filter(|e| e.accepted_at.is_some() && sources.contains(e.source.as_str()))
        .map(|e| {
            (
                e.source.clone(),
                format!("{} {} ({})", e.kind, e.path, e.detail),
            )
        })
        .collect();
    let mut filter = weft_store::DlqFilter {
        error_contains: Some("drift: ".into()),
        ..Default::default()
    };
    loop {
        let page = journal.read().dlq_list(&filter)?;
        let Some(last) = page.last().map(|e| e.id) else {
            break;
        };
        for e in &page {
            let Some(parts) = drift_parts(&e.error) else {
                continue;
            };
            // the entry's source system is its flow's `from` (the entry's
            // own `source` is the event's CloudEvents source)
            let Some(from) = config
                .flows
                .iter()
                .find(|f| f.name == e.flow)
                .map(|f| f.from.clone())
            else {
                continue;
            };
            let released = sources.contains(from.as_str())
                && parts
                    .iter()
                    .all(|p| accepted.contains(&(from.clone(), (*p).to_owned())));
            if !released {
                if sources.contains(from.as_str()) {
                    report.still_held += 1;
                }
                continue;
            }
            match crate::dlq::replay(config, journal, e, None, false).await {
                Ok(()) => report.replayed.push(e.id),
                Err(err) => report.replay_failed.push((e.id, err.to_string())),
            }
        }
        filter.after_id = Some(last);
    }
    Ok(report)
}

/// Quarantine: the outcome of a flow with `on_drift: quarantine` for a
/// record that shows drift.
pub fn quarantine(flow: &Flow, drift: Option<&str>) -> Option<FlowOutcome> {
    match drift {
        Some(d) if flow.data.on_drift == OnDrift::Quarantine => Some(FlowOutcome::rejected(
            flow.name.clone(),
            Stage::Map,
            format!("drift: {d}"),
        )),
        _ => None,
    }
}

fn pointer<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    if path.contains("/*") || path.contains("/{}") {
        return None;
    }
    if path.contains('~') {
        return v.pointer(path);
    }
    // serde_json's `pointer` unescapes every token into a new string; a
    // path without `~` needs no unescaping
    if path.is_empty() {
        return Some(v);
    }
    let rest = path.strip_prefix('/')?;
    rest.split('/').try_fold(v, |v, t| match v {
        Value::Object(m) => m.get(t),
        // an index as serde_json reads one: no sign, no leading zero
        Value::Array(a) if !t.starts_with('+') && (t == "0" || !t.starts_with('0')) => {
            t.parse::<usize>().ok().and_then(|i| a.get(i))
        }
        _ => None,
    })
}

/// Hash the key-set and types of a record without allocating. Arrays
/// contribute the union of their elements' types and the shape of their
/// first element, so their length does not change the signature.
fn hash_walk(v: &Value, h: &mut impl Hasher, depth: usize) {
    h.write_u8(tbit(v));
    if depth >= MAX_DEPTH {
        return;
    }
    match v {
        Value::Object(m) if is_map(m) => {
            // like an array: the union of its values' types and the shape
            // of its first object value, whatever its keys and their number
            h.write_u8(0xfe);
            let mut u = 0u8;
            for x in m.values() {
                u |= tbit(x);
            }
            h.write_u8(u);
            if let Some(x) = m.values().find(|x| x.is_object()) {
                hash_walk(x, h, depth + 1);
            }
        }
        Value::Object(m) => {
            h.write_usize(m.len());
            for (k, x) in m {
                h.write(k.as_bytes());
                h.write_u8(0xff);
                hash_walk(x, h, depth + 1);
            }
        }
        Value::Array(a) => {
            let mut u = 0u8;
            for x in a {
                u |= tbit(x);
            }
            h.write_u8(u);
            if let Some(x) = a.iter().find(|x| x.is_object()) {
                hash_walk(x, h, depth + 1);
            }
        }
        _ => {}
    }
}

/// Whether an object is a map rather than a record: more than
/// [`MAP_KEYS`] keys, or every key is data (see [`data_key`]).
fn is_map(m: &serde_json::Map<String, Value>) -> bool {
    m.len() > MAP_KEYS || (!m.is_empty() && m.keys().all(|k| data_key(k)))
}

/// A key that is a value, not a field name: it starts with a digit
/// (`2026-12-01`, `42`), has digits right after a `-`, `:` or `.`
/// (`SKU-1`, `order:17`), or is 5 or more long with at least a third of it
/// digits (a UUID, a hex id); so `address2`, `line1` and `field_2` stay
/// field names.
fn data_key(k: &str) -> bool {
    let n = k.chars().count();
    let digits = k.chars().filter(char::is_ascii_digit).count();
    let b = k.as_bytes();
    k.starts_with(|c: char| c.is_ascii_digit())
        || b.windows(2)
            .any(|w| matches!(w[0], b'-' | b':' | b'.') && w[1].is_ascii_digit())
        || (n >= 5 && digits * 3 >= n)
}

fn walk(v: &Value, path: &mut String, depth: usize, out: &mut Vec<(String, u8)>) {
    if !path.is_empty() {
        out.push((path.clone(), tbit(v)));
    }
    if depth >= MAX_DEPTH {
        return;
    }
    match v {
        Value::Object(m) if is_map(m) => {
            let len = path.len();
            path.push_str("/{}");
            for x in m.values() {
                out.push((path.clone(), tbit(x)));
            }
            if let Some(x) = m.values().find(|x| x.is_object()) {
                walk(x, path, depth + 1, out);
            }
            path.truncate(len);
        }
        Value::Object(m) => {
            for (k, x) in m {
                let len = path.len();
                path.push('/');
                path.push_str(&escape_pointer(k));
                walk(x, path, depth + 1, out);
                path.truncate(len);
            }
        }
        Value::Array(a) => {
            let len = path.len();
            path.push_str("/*");
            for x in a {
                out.push((path.clone(), tbit(x)));
            }
            if let Some(x) = a.iter().find(|x| x.is_object()) {
                walk(x, path, depth + 1, out);
            }
            path.truncate(len);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pointer_reads_what_serde_json_pointer_reads() {
        let v = serde_json::json!({"a": {"b": [10, {"c": "x"}]}, "k~/": 1, "": 2});
        for p in [
            "",
            "/",
            "/a",
            "/a/b",
            "/a/b/0",
            "/a/b/1/c",
            "/a/b/01",
            "/a/b/+1",
            "/a/b/9",
            "/x",
            "/k~0~1",
            "/a/b/1/c/d",
            "a",
        ] {
            assert_eq!(pointer(&v, p), v.pointer(p), "{p}");
        }
    }

    use super::*;
    use serde_json::json;

    fn rec(i: u64, tags: Value) -> Value {
        json!({"id": i, "name": format!("n{i}"), "status": if i.is_multiple_of(2) {"open"} else {"closed"}, "tags": tags, "email": format!("u{i}@x.example")})
    }

    #[test]
    fn string_to_array_is_recorded_once_and_counted() {
        let t = Tracker::new("crm", vec!["/email".into()]);
        for i in 0..5 {
            assert_eq!(t.observe(&rec(i, json!("vip"))), None);
        }
        let first = t.take().unwrap();
        assert!(first.events.is_empty() && first.shape.is_some());
        let d = t.observe(&rec(5, json!(["vip", "gold"]))).unwrap();
        assert!(d.contains("type_changed /tags (string -> array)"), "{d}");
        assert!(t.observe(&rec(6, json!(["x"]))).is_some());
        assert_eq!(t.observe(&rec(7, json!("plain"))), None);
        let b = t.take().unwrap();
        let types: Vec<_> = b
            .events
            .iter()
            .filter(|e| e.kind == "type_changed")
            .collect();
        assert_eq!(types.len(), 1, "{:?}", b.events);
        assert_eq!(types[0].count, 2);
        assert_eq!(types[0].example, r#"["vip","gold"]"#);
        // the array element path is new too
        assert!(
            b.events
                .iter()
                .any(|e| e.kind == "new_field" && e.path == "/tags/*")
        );
        // nothing new afterwards
        t.observe(&rec(8, json!(["y"])));
        let b = t.take().unwrap();
        assert!(
            b.events.iter().all(|e| e.example.is_empty()),
            "{:?}",
            b.events
        );
    }

    #[test]
    fn new_and_missing_fields_and_enum_values_with_masked_examples() {
        let t = Tracker::new("crm", vec!["/email".into()]);
        for i in 0..(LEARN_ENUMS + 1) {
            t.observe(&rec(i, json!("a")));
        }
        t.take();
        let mut r = rec(500, json!("a"));
        r["status"] = json!("archived");
        r["tax_id"] = json!("DE123");
        r.as_object_mut().unwrap().remove("email");
        let d = t.observe(&r).unwrap();
        assert!(d.contains("new_enum_value /status (archived)"), "{d}");
        assert!(d.contains("new_field /tax_id"), "{d}");
        assert!(d.contains("missing_field /email"), "{d}");
        let b = t.take().unwrap();
        let tax = b.events.iter().find(|e| e.path == "/tax_id").unwrap();
        assert_eq!(tax.example, "\"***\"");
        // names are free text: more than MAX_ENUM values, never an enum
        assert!(!b.events.iter().any(|e| e.path == "/name"));
    }

    /// Review P1-15: data-keyed objects grew the shape, the events and the
    /// log without bound.
    #[test]
    fn map_like_objects_are_one_path_and_the_shape_is_bounded() {
        let t = Tracker::new("shop", vec![]);
        for i in 0..500u64 {
            let mut prices = serde_json::Map::new();
            prices.insert(format!("SKU-{i}"), json!({"net": i, "currency": "EUR"}));
            let mut by_day = serde_json::Map::new();
            by_day.insert(format!("2026-12-{:02}", i % 28 + 1), json!(i));
            let r =
                json!({"id": i, "prices": prices, "sold": by_day, "address2": "x", "line1": "y"});
            let d = t.observe(&r);
            assert!(i == 0 || d.is_none(), "record {i}: {d:?}");
        }
        let b = t.take().unwrap();
        assert!(b.events.is_empty(), "{:?}", b.events);
        let shape: Shape = serde_json::from_str(&b.shape.unwrap()).unwrap();
        let paths: Vec<&str> = shape.fields.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            vec![
                "/address2",
                "/id",
                "/line1",
                "/prices",
                "/prices/{}",
                "/prices/{}/currency",
                "/prices/{}/net",
                "/sold",
                "/sold/{}"
            ]
        );
        // a record-like object with new field names after all: new fields,
        // up to the cap, then one `field_limit` event
        let t = Tracker::new("wide", vec![]);
        t.observe(&json!({"a": {"x": 1}}));
        for i in 0..(MAX_FIELDS as u64 + 10) {
            let mut m = serde_json::Map::new();
            m.insert(format!("field_{}", letters(i)), json!(1));
            t.observe(&json!({"a": m}));
        }
        let b = t.take().unwrap();
        assert!(b.events.iter().any(|e| e.kind == "field_limit"));
        let shape: Shape = serde_json::from_str(&b.shape.unwrap()).unwrap();
        assert_eq!(shape.fields.len(), MAX_FIELDS);
    }

    #[test]
    fn ignored_paths_are_not_tracked() {
        let t = Tracker::new("cdc", vec![]).ignoring("/source");
        for i in 0..300u64 {
            let r = json!({"op": "u", "after": {"id": i % 3, "status": "open"},
                           "source": {"lsn": format!("0/{i:X}"), "table": "t"}});
            assert!(i == 0 || t.observe(&r).is_none(), "record {i}");
        }
        let b = t.take().unwrap();
        assert!(b.events.is_empty(), "{:?}", b.events);
        let shape: Shape = serde_json::from_str(&b.shape.unwrap()).unwrap();
        assert!(shape.fields.keys().all(|p| !p.starts_with("/source")));
        assert!(shape.fields.contains_key("/after/status"));
    }

    /// A field name without digits, distinct per `i`.
    fn letters(mut i: u64) -> String {
        let mut s = String::new();
        loop {
            s.push((b'a' + (i % 26) as u8) as char);
            i /= 26;
            if i == 0 {
                return s;
            }
        }
    }

    /// Review P1-10 said a batch that failed to commit (or was refused, or
    /// sent again) had already taught the tracker, so its retry would be
    /// delivered instead of quarantined. Not so: a drift key, once learned,
    /// is shown by every later record that has it, so the retry of a
    /// drifting record is drift again.
    #[test]
    fn a_retried_record_shows_its_drift_again() {
        let t = Tracker::new("crm", vec![]);
        for i in 0..20 {
            assert_eq!(t.observe(&json!({"id": i, "a": "x", "e": "gold"})), None);
        }
        for _ in 0..3 {
            let d = t.observe(&json!({"id": 99, "a": ["x"], "n": 1})).unwrap();
            assert!(d.contains("type_changed /a"), "{d}");
            assert!(d.contains("new_field /n"), "{d}");
        }
        for _ in 0..2 {
            let d = t.observe(&json!({"id": 98, "a": "y"})).unwrap();
            assert!(d.contains("missing_field /e"), "{d}");
        }
    }

    #[test]
    fn quarantine_only_when_asked() {
        let t = Tracker::new("crm", vec![]);
        t.observe(&json!({"a": "x"}));
        assert!(t.observe(&json!({"a": ["x"]})).is_some());
    }

    /// An accepted drift is still counted but no longer reported for
    /// quarantine; another drift in the same record still is.
    #[test]
    fn accepted_drift_is_counted_but_not_reported() {
        let t = Tracker::new("crm", vec![]);
        t.observe(&json!({"a": 1, "b": 1}));
        let d = t.observe(&json!({"a": "x", "b": 1})).unwrap();
        assert_eq!(d, "type_changed /a (number -> string)");
        let ev = |source: &str, accepted: Option<i64>| weft_store::DriftEvent {
            id: 1,
            source: source.into(),
            kind: "type_changed".into(),
            path: "/a".into(),
            detail: "number -> string".into(),
            example: None,
            first_seen: 0,
            last_seen: 0,
            count: 1,
            accepted_at: accepted,
        };
        // another source's acceptance, or one not accepted, changes nothing
        assert_eq!(t.follow_accepted(&[ev("erp", Some(5)), ev("crm", None)]), 0);
        assert!(t.observe(&json!({"a": "y", "b": 1})).is_some());
        assert_eq!(t.follow_accepted(&[ev("crm", Some(5))]), 1);
        assert_eq!(t.follow_accepted(&[ev("crm", Some(5))]), 0);
        assert_eq!(t.observe(&json!({"a": "z", "b": 1})), None);
        let both = t.observe(&json!({"a": "z", "b": true})).unwrap();
        assert_eq!(both, "type_changed /b (number -> boolean)");
        // still counted: 4 records showed the accepted drift since the start
        let batch = t.take().unwrap();
        let a = batch.events.iter().find(|e| e.path == "/a").unwrap();
        assert_eq!(a.count, 4);
    }
}
