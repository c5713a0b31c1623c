//! `events: per_transaction`: one event per committed transaction, shared
//! by both CDC sources.
//!
//! The reader builds each change's per-row event as it always does and
//! hands it to a [`TxnGroup`] instead of the batcher; the group gives back
//! a transaction event ([`Part`]) when the transaction commits, or when a
//! part of a big one is complete. Because the part is sent to the batcher
//! as one change whose ordinal is the part's last change's, the batcher's
//! positions and the restart's skipping work as for per-row events: a part
//! is in the journal with the position after it, or neither is.
//!
//! ## Parts (the size bound)
//! A transaction's changes are numbered by `tx_ordinal` (1, 2, ...); part
//! `k` holds those numbered `(k-1)·max+1 ..= k·max` (`max` is
//! `max_transaction_changes`). A transaction of at most `max` changes is
//! one event, `part: 1, last: true`. A bigger one is consecutive events,
//! each with its own id (`…#<part>`), the last with `last: true`; each is
//! held in memory only until the first change of the next part arrives.
//! Parts are not bound to one journal transaction: a part is stored with
//! the position after its last change, so a crash between two parts
//! resumes at the next part, which gets the same id it would have had.
//! Numbering by ordinal (not by how many changes were sent) is what makes
//! the ids the same on a replay without saving anything more; the price is
//! that a part none of whose changes is sent (a table snapshotted alone
//! skips its changes below its snapshot, see the `postgres_cdc` docs) is
//! not sent either, so the numbers can have a gap. The last part is never
//! empty, so `last: true` always arrives.
//!
//! The ids are stable for one `max_transaction_changes`: a restart with
//! another limit in the middle of a split transaction cuts its remaining
//! parts by the new one.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use weft_core::Event;

use crate::source::Record;

/// How a CDC source turns changes into events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EventsMode {
    /// One event per changed row (the default).
    #[default]
    PerRow,
    /// One event per committed transaction (or per part of a big one).
    PerTransaction,
}

/// Default `max_transaction_changes`: a few MB of JSON for typical rows,
/// which the journal, a mapping (`[.changes[] | ...]`) and an HTTP body
/// take in one piece.
pub const DEFAULT_MAX_TRANSACTION_CHANGES: usize = 10_000;

/// Largest `max_transaction_changes` accepted: beyond it one event is
/// hundreds of MB, which is no bound at all.
pub const MAX_TRANSACTION_CHANGES: usize = 1_000_000;

/// What every transaction event of a source carries.
#[derive(Debug, Clone)]
pub struct Shape {
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `type`.
    pub ty: String,
    /// CloudEvents `subject`: the same for every transaction of the source
    /// (a flow's default key), so they are delivered one after the other,
    /// in commit order.
    pub subject: String,
    /// `max_transaction_changes`.
    pub max: usize,
}

/// A transaction event (or the rows of it that go to the DLQ), with the
/// ordinal of its last change: stored, it stands for every change of the
/// transaction up to that ordinal.
#[derive(Debug)]
pub struct Part {
    pub records: Vec<Record>,
    pub ordinal: u64,
    /// Changes in it (for the batch size).
    pub changes: usize,
}

/// The transaction being read, its current part's changes.
#[derive(Debug)]
pub struct TxnGroup {
    /// Its identity in event ids (`txn@<id>#<part>`): the commit LSN, or
    /// the binlog `file:pos` of its start.
    id: String,
    /// The transaction's fields of the event body (before `part`).
    meta: Map<String, Value>,
    time: Option<DateTime<Utc>>,
    /// The part the buffered changes belong to (0: none buffered).
    part: u64,
    changes: Vec<Value>,
    /// Rows of this part that could not be read (to the DLQ, stored with
    /// the part).
    rejected: Vec<Record>,
    ordinal: u64,
}

impl TxnGroup {
    pub fn new(id: String, meta: Map<String, Value>, time: Option<DateTime<Utc>>) -> Self {
        TxnGroup {
            id,
            meta,
            time,
            part: 0,
            changes: Vec::new(),
            rejected: Vec::new(),
            ordinal: 0,
        }
    }

    /// Change `ordinal` of the transaction (its per-row event, or a row
    /// that could not be read); the part it completes, to send first.
    pub fn push(&mut self, shape: &Shape, ordinal: u64, record: Record) -> Option<Part> {
        let part = part_of(ordinal, shape.max);
        let done = if self.part != 0 && part != self.part {
            self.take(shape, false)
        } else {
            None
        };
        self.part = part;
        self.ordinal = ordinal;
        match record {
            Record::Good(e) => self.changes.push(e.data),
            bad @ Record::Bad(_) => self.rejected.push(bad),
        }
        done
    }

    /// The transaction committed: its last part (`None`: no change of it
    /// was read in this session).
    pub fn finish(mut self, shape: &Shape) -> Option<Part> {
        if self.part == 0 {
            return None;
        }
        self.take(shape, true)
    }

    fn take(&mut self, shape: &Shape, last: bool) -> Option<Part> {
        let changes = std::mem::take(&mut self.changes);
        let mut records = Vec::with_capacity(1 + self.rejected.len());
        let n = changes.len();
        let mut data = self.meta.clone();
        data.insert("part".into(), Value::from(self.part));
        data.insert("last".into(), Value::Bool(last));
        data.insert("changes".into(), Value::Array(changes));
        let mut ev = Event::new(
            format!("txn@{}#{}", self.id, self.part),
            shape.source.clone(),
            shape.ty.clone(),
            None,
            Value::Object(data),
        );
        if let Some(t) = self.time {
            ev.time = t;
        }
        ev.subject = Some(shape.subject.clone());
        records.push(Record::Good(ev));
        records.append(&mut self.rejected);
        self.part = 0;
        Some(Part {
            records,
            ordinal: self.ordinal,
            changes: n.max(1),
        })
    }
}

/// The part change `ordinal` belongs to.
fn part_of(ordinal: u64, max: usize) -> u64 {
    let max = max.max(1) as u64;
    ordinal.saturating_sub(1) / max + 1
}

/// A time as the event bodies write it.
pub fn time_text(t: DateTime<Utc>) -> Value {
    Value::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// Validate `events` and `max_transaction_changes` of a CDC source at
/// `base`; problems go to `issues`.
pub fn settings(
    issues: &mut Vec<weft_core::config::Issue>,
    base: &str,
    events: Option<EventsMode>,
    max: Option<usize>,
) -> (EventsMode, usize) {
    let max = match max {
        None => DEFAULT_MAX_TRANSACTION_CHANGES,
        Some(0) => {
            issues.push(weft_core::config::Issue {
                path: format!("{base}.max_transaction_changes"),
                line: None,
                column: None,
                message: "must be greater than 0".into(),
            });
            DEFAULT_MAX_TRANSACTION_CHANGES
        }
        Some(n) if n > MAX_TRANSACTION_CHANGES => {
            issues.push(weft_core::config::Issue {
                path: format!("{base}.max_transaction_changes"),
                line: None,
                column: None,
                message: format!(
                    "{n} is more than {MAX_TRANSACTION_CHANGES}: an event that big is no bound; \
                     a transaction bigger than the limit is sent in parts"
                ),
            });
            DEFAULT_MAX_TRANSACTION_CHANGES
        }
        Some(n) => n,
    };
    (events.unwrap_or_default(), max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape(max: usize) -> Shape {
        Shape {
            source: "weft:db".into(),
            ty: "db.transaction".into(),
            subject: "db".into(),
            max,
        }
    }

    fn change(n: u64) -> Record {
        Record::Good(Event::new(
            format!("0/10#{n}"),
            "weft:db",
            "db.change",
            None,
            json!({"op": "c", "after": {"id": n}, "source": {"tx_ordinal": n}}),
        ))
    }

    fn group() -> TxnGroup {
        let mut meta = Map::new();
        meta.insert("commit_lsn".into(), json!("0/10"));
        TxnGroup::new("0/10".into(), meta, None)
    }

    fn body(p: &Part) -> &Value {
        match &p.records[0] {
            Record::Good(e) => &e.data,
            Record::Bad(_) => panic!("not an event"),
        }
    }

    fn id(p: &Part) -> &str {
        match &p.records[0] {
            Record::Good(e) => &e.id,
            Record::Bad(_) => panic!("not an event"),
        }
    }

    #[test]
    fn a_small_transaction_is_one_event_with_its_changes_in_order() {
        let s = shape(10);
        let mut g = group();
        for n in 1..=3 {
            assert!(g.push(&s, n, change(n)).is_none());
        }
        let p = g.finish(&s).unwrap();
        assert_eq!(p.ordinal, 3);
        assert_eq!(id(&p), "txn@0/10#1");
        let b = body(&p);
        assert_eq!(b["part"], 1);
        assert_eq!(b["last"], true);
        assert_eq!(b["commit_lsn"], "0/10");
        let ids: Vec<u64> = b["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["after"]["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [1, 2, 3]);
    }

    #[test]
    fn one_change_over_the_limit_is_a_second_part_with_the_same_ids_on_a_replay() {
        let s = shape(3);
        let mut g = group();
        let mut parts = Vec::new();
        for n in 1..=4 {
            parts.extend(g.push(&s, n, change(n)));
        }
        parts.extend(g.finish(&s));
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (id(&parts[0]), parts[0].ordinal, &body(&parts[0])["last"]),
            ("txn@0/10#1", 3, &json!(false))
        );
        assert_eq!(
            (id(&parts[1]), parts[1].ordinal, &body(&parts[1])["last"]),
            ("txn@0/10#2", 4, &json!(true))
        );
        assert_eq!(body(&parts[1])["changes"].as_array().unwrap().len(), 1);
        // resumed after part 1 was stored: changes 4.. only, part 2 again
        let mut g = group();
        assert!(g.push(&s, 4, change(4)).is_none());
        let p = g.finish(&s).unwrap();
        assert_eq!(id(&p), "txn@0/10#2");
        // resumed after the whole of it was stored: nothing
        assert!(group().finish(&s).is_none());
    }

    #[test]
    fn the_limit_is_validated() {
        let mut issues = Vec::new();
        assert_eq!(
            settings(&mut issues, "b", None, None),
            (EventsMode::PerRow, DEFAULT_MAX_TRANSACTION_CHANGES)
        );
        settings(&mut issues, "b", None, Some(0));
        settings(&mut issues, "b", None, Some(1_000_001));
        assert_eq!(issues.len(), 2);
        assert!(issues.iter().all(|i| i.path == "b.max_transaction_changes"));
    }
}
