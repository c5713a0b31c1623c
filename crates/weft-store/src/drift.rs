//! Drift detection records: stream shapes and drift events (migration 2).
//! The detection itself is weft-runtime's `drift.rs`; the store only keeps
//! what it found, once per `(source, kind, path, detail)`.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::{Applied, Reader, StoreError, now_ms};

/// A drift seen in a batch: new (inserted) or known (its count grows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDrift {
    /// `new_field`, `missing_field`, `type_changed` or `new_enum_value`.
    pub kind: String,
    /// JSON pointer of the field.
    pub path: String,
    /// e.g. `string -> array`, the new enum value.
    pub detail: String,
    /// A masked example (JSON text).
    pub example: String,
    /// Records showing it in this batch.
    pub count: i64,
}

/// What one source's batch found.
#[derive(Debug, Clone, Default)]
pub struct DriftBatch {
    pub source: String,
    /// The stream's shape (JSON), when it changed.
    pub shape: Option<String>,
    pub events: Vec<NewDrift>,
}

/// A recorded drift event.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DriftEvent {
    pub id: i64,
    pub source: String,
    pub kind: String,
    pub path: String,
    pub detail: String,
    pub example: Option<String>,
    /// ms since the epoch.
    pub first_seen: i64,
    pub last_seen: i64,
    /// Records that showed it.
    pub count: i64,
    /// When an operator accepted it (ms): records showing it are no longer
    /// quarantined.
    pub accepted_at: Option<i64>,
}

pub(crate) fn apply(tx: &Connection, b: &DriftBatch) -> Result<Applied, StoreError> {
    let now = now_ms();
    let mut n = 0;
    if let Some(shape) = &b.shape {
        tx.prepare_cached(
            "INSERT INTO stream_shapes (source, shape, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (source) DO UPDATE SET shape = excluded.shape, updated_at = excluded.updated_at",
        )?
        .execute(params![b.source, shape, now])?;
        n += 1;
    }
    let mut st = tx.prepare_cached(
        "INSERT INTO drift_events (source, kind, path, detail, example, first_seen, last_seen, count)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)
         ON CONFLICT (source, kind, path, detail) DO UPDATE SET
           count = count + excluded.count, last_seen = excluded.last_seen",
    )?;
    for e in &b.events {
        n += st.execute(params![
            b.source, e.kind, e.path, e.detail, e.example, now, e.count
        ])?;
    }
    Ok(Applied {
        changed: n,
        ..Default::default()
    })
}

/// Mark drift events accepted (those not yet accepted); how many were.
pub(crate) fn accept(tx: &Connection, ids: &[i64]) -> Result<Applied, StoreError> {
    let now = now_ms();
    let mut st = tx.prepare_cached(
        "UPDATE drift_events SET accepted_at = ?2 WHERE id = ?1 AND accepted_at IS NULL",
    )?;
    let mut n = 0;
    for id in ids {
        n += st.execute(params![id, now])?;
    }
    Ok(Applied {
        changed: n,
        ..Default::default()
    })
}

impl Reader {
    /// Drift events, oldest first; `source` filters.
    pub fn drift_events(&self, source: Option<&str>) -> Result<Vec<DriftEvent>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, source, kind, path, detail, example, first_seen, last_seen, count, accepted_at
             FROM drift_events WHERE (?1 IS NULL OR source = ?1) ORDER BY id",
        )?;
        let rows = st.query_map([source], |r| {
            Ok(DriftEvent {
                id: r.get(0)?,
                source: r.get(1)?,
                kind: r.get(2)?,
                path: r.get(3)?,
                detail: r.get(4)?,
                example: r.get(5)?,
                first_seen: r.get(6)?,
                last_seen: r.get(7)?,
                count: r.get(8)?,
                accepted_at: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The saved shape of a source stream (JSON).
    pub fn stream_shape(&self, source: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT shape FROM stream_shapes WHERE source = ?1",
                [source],
                |r| r.get(0),
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Journal, Role, SqliteJournal, Synchronous};

    #[tokio::test]
    async fn drift_events_are_recorded_once_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteJournal::open(&dir.path().join("w.db"), Synchronous::Normal, Role::Hub).unwrap();
        let ev = |count| NewDrift {
            kind: "type_changed".into(),
            path: "/tags".into(),
            detail: "string -> array".into(),
            example: "[\"a\"]".into(),
            count,
        };
        let batch = |events, shape: Option<&str>| DriftBatch {
            source: "crm".into(),
            shape: shape.map(str::to_owned),
            events,
        };
        store
            .record_drift(batch(vec![ev(1)], Some("{\"v\":1}")))
            .await
            .unwrap();
        store.record_drift(batch(vec![ev(4)], None)).await.unwrap();
        let r = store.reader().unwrap();
        let evs = r.drift_events(None).unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].count, 5);
        assert_eq!(evs[0].detail, "string -> array");
        assert_eq!(r.drift_events(Some("erp")).unwrap().len(), 0);
        assert_eq!(r.stream_shape("crm").unwrap().as_deref(), Some("{\"v\":1}"));
    }
}
